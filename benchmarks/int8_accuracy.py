"""int8 accuracy of fastcnn.quantize on real data and on torchvision's models.

Real data: the two small networks of benchmarks/digits.py (a ResNet and a GoogLeNet trained on
scikit-learn's digits, weights committed), calibrated on 256 training images, scored on the 450
held-out images: fp32 vs int8 top-1, the points lost, how often the two agree, and the logits'
SQNR, for each observer. torchvision ResNet-18/50 and GoogLeNet (random weights, randomized
BatchNorm statistics, so no accuracy to speak of): the logits' SQNR on 16 random 224x224 images
after calibrating on 16 others.

    python benchmarks/int8_accuracy.py --out benchmarks/results/<machine>/int8_accuracy.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import fastcnn
from fastcnn.bench.providers import make_model
from fastcnn.bench.results import environment, write_results
from fastcnn.nn.quantized import QConvBNAct
from fastcnn.quantize import sqnr_db

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits


def _convs(q) -> tuple[int, int]:
    report = fastcnn.report(q)
    convs = [e for e in report.entries if e.replacement in ("QConvBNAct", "ConvBNAct (fp32)")]
    return sum(isinstance(m, QConvBNAct) for m in q.modules()), len(convs)


def _logits(model, x):
    with torch.no_grad():
        return torch.cat([model(x[i : i + 64]) for i in range(0, len(x), 64)])


def digits_rows(observers) -> list[dict]:
    train_x, _, test_x, test_y = digits.load_digits()
    calibration = [train_x[i : i + 64] for i in range(0, 256, 64)]
    rows = []
    for name in digits.NETS:
        model = digits.trained(name)
        ref = _logits(model, test_x)
        fp32_top1 = (ref.argmax(1) == test_y).float().mean().item() * 100
        for observer in observers:
            start = time.perf_counter()
            q = fastcnn.quantize(model, calibration, observer=observer, verify=True)
            seconds = time.perf_counter() - start
            out = _logits(q, test_x)
            int8_top1 = (out.argmax(1) == test_y).float().mean().item() * 100
            int8, convs = _convs(q)
            rows.append(dict(
                model=f"digits-{name}", data=f"digits test ({len(test_y)} images)",
                observer=observer, fp32_top1=fp32_top1, int8_top1=int8_top1,
                points_lost=fp32_top1 - int8_top1,
                agreement=(out.argmax(1) == ref.argmax(1)).float().mean().item() * 100,
                sqnr_db=sqnr_db(out, ref), int8_convs=int8, convs=convs, quantize_s=seconds,
            ))  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def torchvision_rows(names, observer: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randn(4, 3, 224, 224, generator=g) for _ in range(4)]
    test = torch.randn(16, 3, 224, 224, generator=g)
    rows = []
    for name in names:
        model = make_model(name, torch.float32, "cpu")
        start = time.perf_counter()
        q = fastcnn.quantize(model, calibration, observer=observer, verify=True)
        seconds = time.perf_counter() - start
        ref, out = _logits(model, test), _logits(q, test)
        int8, convs = _convs(q)
        rows.append(dict(
            model=name, data="random N(0,1) 224x224 (16 images)", observer=observer,
            agreement=(out.argmax(1) == ref.argmax(1)).float().mean().item() * 100,
            sqnr_db=sqnr_db(out, ref), int8_convs=int8, convs=convs, quantize_s=seconds,
        ))  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("int8-accuracy/int8_accuracy.json"))
    parser.add_argument("--observers", default="percentile,minmax,entropy")
    parser.add_argument("--models", default="resnet18,resnet50,googlenet")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    observers = args.observers.split(",")
    rows = digits_rows(observers) + torchvision_rows(args.models.split(","), observers[0])
    env = environment()
    env["command"] = "python benchmarks/int8_accuracy.py " + " ".join(argv or sys.argv[1:])
    table = write_results(
        args.out, "int8_accuracy", rows, env,
        f"fastcnn.quantize int8 accuracy on CPU {env['cpu']}",
        "verify=True (tolerance 0.1); digits: calibrated on 256 training images; torchvision "
        "models: random weights and BN statistics, calibrated on 16 random images",
    )  # fmt: skip
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
