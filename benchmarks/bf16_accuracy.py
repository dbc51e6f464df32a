"""bf16 accuracy of fastcnn.optimize on a bf16 model, against the same model in fp32.

Real data: the two small networks of benchmarks/digits.py (a ResNet and a GoogLeNet trained on
scikit-learn's digits, weights committed), scored on the 450 held-out images: fp32 vs bf16
top-1, the points lost, how often the two agree, and the logits' SQNR. torchvision ResNet-50
and GoogLeNet (random weights, randomized BatchNorm statistics, so no accuracy to speak of):
the logits' SQNR and relative error on 16 random 224x224 images. The bf16 model is the fp32
one cast to bf16 (`model.to(torch.bfloat16)`), its inputs cast likewise; the backend is the
cpu one (oneDNN's bf16 convolutions, fp32 accumulation).

    python benchmarks/bf16_accuracy.py --out benchmarks/results/<machine>/bf16_accuracy.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

import fastcnn
from fastcnn.bench.providers import make_model
from fastcnn.bench.results import environment, write_results
from fastcnn.quantize import sqnr_db

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits


def bf16_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fastcnn.optimize of model in bf16 (channels_last) on x in bf16, as fp32 logits."""
    fast = fastcnn.optimize(
        copy.deepcopy(model).to(torch.bfloat16, memory_format=torch.channels_last),
        backend="cpu",
    )
    with torch.no_grad():
        return torch.cat([
            fast(x[i : i + 64].to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
            for i in range(0, len(x), 64)
        ]).float()  # fmt: skip


def fp32_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + 64]) for i in range(0, len(x), 64)])


def _compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    return dict(
        agreement=(out.argmax(1) == ref.argmax(1)).float().mean().item() * 100,
        sqnr_db=sqnr_db(out, ref),
        rel_error=((out - ref).norm() / ref.norm()).item(),
    )


def digits_rows() -> list[dict]:
    _, _, test_x, test_y = digits.load_digits()
    rows = []
    for name in digits.NETS:
        model = digits.trained(name)
        ref, out = fp32_logits(model, test_x), bf16_logits(model, test_x)
        fp32_top1 = (ref.argmax(1) == test_y).float().mean().item() * 100
        bf16_top1 = (out.argmax(1) == test_y).float().mean().item() * 100
        rows.append(dict(
            model=f"digits-{name}", data=f"digits test ({len(test_y)} images)",
            fp32_top1=fp32_top1, bf16_top1=bf16_top1, points_lost=fp32_top1 - bf16_top1,
            **_compare(out, ref),
        ))  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def torchvision_rows(names) -> list[dict]:
    test = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in names:
        model = make_model(name, torch.float32, "cpu")
        ref, out = fp32_logits(model, test), bf16_logits(model, test)
        rows.append(dict(model=name, data="random N(0,1) 224x224 (16 images)",
                         **_compare(out, ref)))  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bf16-accuracy/bf16_accuracy.json"))
    parser.add_argument("--models", default="resnet50,googlenet")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = digits_rows() + torchvision_rows(args.models.split(","))
    env = environment()
    env["command"] = "python benchmarks/bf16_accuracy.py " + " ".join(argv or sys.argv[1:])
    table = write_results(
        args.out, "bf16_accuracy", rows, env,
        f"fastcnn.optimize bf16 accuracy on CPU {env['cpu']}",
        "the fp32 model cast to bf16, fastcnn.optimize(backend='cpu'), against the fp32 model "
        "(eager); torchvision models: random weights and BN statistics",
    )  # fmt: skip
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
