"""What a GoogLeNet Inception block's planned call (one C++ call: fastcnn/cpu/inception.py,
csrc/cpu/onednn_inception.cpp) costs beyond its convolutions, in one process: the block calls
of one forward, recorded with their arguments, replayed as the model makes them, against the
same convolutions alone (the extension's onednn_conv into outputs allocated once, so warm),
calls alternating. The difference is the pools, the concats, the intermediates' memory and
the glue.

    python benchmarks/cpu_inception_overhead.py --out benchmarks/results/DIR/inception_overhead.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import fastcnn
from fastcnn.bench.measure import model_input
from fastcnn.bench.providers import make_model
from fastcnn.bench.results import ResultFile, time_samples
from fastcnn.cpu import onednn


class _Recorder:
    """The extension, with the arguments of its onednn_inception calls kept while recording
    (installed before the model plans: a plan binds the extension's function when made)."""

    def __init__(self, ext) -> None:
        self.ext, self.recording, self.calls = ext, False, []

    def __getattr__(self, name):
        return getattr(self.ext, name)

    def onednn_inception(self, *args):
        if self.recording:
            self.calls.append(args)
        return self.ext.onednn_inception(*args)


def _convs_alone(ext, blocks: list[tuple]):
    """A call running the blocks' convolutions only, each into its own output allocated once
    (merged structure: the reduce conv's slices copied into dense inputs once, not timed)."""
    cl, steps = torch.channels_last, []
    for x, packed, layouts, w_sizes, biases, widths, _, _ in blocks:
        n, _, h, w = x.shape
        # random values, not uninitialized memory (denormals or NaN would change the timing)
        ys = [torch.randn(n, s[0], h, w).contiguous(memory_format=cl) for s in w_sizes]
        if len(packed) == 6:  # separate: branch 1, reduce 2 -> kxk 2, reduce 3 -> kxk 3, pool 1x1
            inputs = [x, x, ys[1], x, ys[3], x.clone()]
        else:  # merged: the reduce, then the kxk convs on its slices, the pool's 1x1
            c1, c2r, _ = widths
            reduced = ys[0]
            slices = [reduced[:, c1 : c1 + c2r], reduced[:, c1 + c2r :]]
            inputs = [x, *(r.contiguous(memory_format=cl) for r in slices), x.clone()]
        for i, (inp, y) in enumerate(zip(inputs, ys, strict=True)):
            k = w_sizes[i][2]
            steps.append((inp, packed[i], layouts[i], w_sizes[i], biases[i], y, k // 2))

    def run():
        for inp, p, lay, ws, b, y, pad in steps:
            ext.onednn_conv(inp, p, lay, ws, b, None, y, [1, 1], [pad, pad], 1, True)

    return run


def measure(batch: int, calls: int) -> dict:
    model = make_model("googlenet", torch.float32, "cpu")
    x = model_input(batch, "fastcnn", 224, torch.float32, "cpu")
    fused = fastcnn.optimize(model.to(memory_format=torch.channels_last))
    ext = onednn.linked_extension()
    recorder = onednn._extension_module[0] = _Recorder(ext)
    try:
        with torch.inference_mode():
            for _ in range(3):  # plans (with the recorder), packs, chooses each structure
                fused(x)
            recorder.recording = True
            fused(x)
    finally:
        onednn._extension_module[0] = ext
    blocks = recorder.calls
    with torch.inference_mode():
        convs = _convs_alone(ext, blocks)

        def as_model():
            for args in blocks:
                ext.onednn_inception(*args)

        times = time_samples({"blocks": as_model, "convs": convs}, calls)
    block_ms, conv_ms = (statistics.median(times[k]) for k in ("blocks", "convs"))
    return {"model": "googlenet", "batch": batch, "blocks": len(blocks), "block_ms": block_ms,
            "conv_ms": conv_ms, "overhead_ms": block_ms - conv_ms}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--calls", type=int, default=20, help="timed calls of each, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("inception_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if onednn.linked_extension() is None:
        raise SystemExit("the extension was built without the oneDNN library: no block call")
    results = ResultFile(
        args.out,
        "inception_overhead",
        "GoogLeNet's Inception block calls against their convolutions alone, fastcnn's cpu path",
        f"float32, 224x224, {args.threads} threads, inference_mode; medians of {args.calls} "
        "calls of each, alternating in one process",
    )
    for batch in (int(b) for b in args.batches.split(",")):
        row = measure(batch, args.calls)
        print(f"googlenet b{batch}: {row['blocks']} blocks {row['block_ms']:.2f} ms, their "
              f"convs alone {row['conv_ms']:.2f} ms, overhead {row['overhead_ms']:.2f} ms",
              flush=True)  # fmt: skip
        results.add(row)
    print(results.finish())


if __name__ == "__main__":
    main()
