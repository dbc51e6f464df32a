"""The Inception block on the cpu backend, its convs through fastcnn.cpu.onednn, in the
structure that is faster on this machine for this input shape, chosen by timing both on the
first call at a shape:

  merged:   branch 1's 1x1 and the two reduce 1x1s as ONE conv over their concatenated weights
            (one pass over x, a wider GEMM), the kxk convs reading channel slices of its output
            (in place where they run as Winograd, else from dense copies).
  separate: the three 1x1 convs on x apart (three passes over x), every output dense.

Which wins depends on the CPU, the batch and the block (the wider GEMM keeps more cores busy at
a small batch; the copies cost more at a large one). Planned calls (`plan`) run the whole block
as one C++ call (csrc/cpu/onednn_inception.cpp: the direct oneDNN convs, the pool and the
concat into the output); the per-conv path (`branches`) ends with torch's concat. The choice is
kept per block and input shape, at most CHOICES_PER_BLOCK shapes per block, and dies with the
block's weights.
"""

from __future__ import annotations

import threading
import time

import torch

from fastcnn import _trace
from fastcnn.common import alloc
from fastcnn.common.weight_cache import WeightCache, signature
from fastcnn.cpu import onednn
from fastcnn.cpu.pool import max_pool2d_or_torch

VARIANTS = ("merged", "separate")
# Shapes whose choice a block keeps (a word each; choosing again times both structures): a
# server cycling through every batch size up to 32 keeps them all.
CHOICES_PER_BLOCK = 64
TRIALS = 3  # timed calls of each variant on the first call at a shape (the fastest counts)

# per reduce weight, under "block": its _Block
_blocks = WeightCache()


def _split(rw: torch.Tensor, rb: torch.Tensor, widths) -> tuple:
    """((w1, b1), (w2r, b2r), (w3r, b3r)): the merged 1x1 weight's three parts, as tensors of
    their own (stable identities, so each is packed once)."""
    ws = torch.split(rw, list(widths))
    bs = torch.split(rb, list(widths))
    return tuple(
        (w.contiguous().clone(), b.contiguous().clone()) for w, b in zip(ws, bs, strict=True)
    )


class _Block:
    """What a block keeps: {shape: variant} chosen, and the split copies of its merged 1x1
    weight while a chosen shape runs the separate structure (made again when one does; with
    their packs dropped, as the merged weight's packs are, once no shape runs their structure,
    so a block keeps one structure's packs where one wins everywhere). It holds no reference to
    the block's own weights: it dies with them (fastcnn.common.weight_cache)."""

    __slots__ = ("_lock", "_parts", "chosen")

    def __init__(self) -> None:
        self.chosen: dict[tuple, str] = {}
        self._parts: tuple | None = None
        self._lock = threading.Lock()

    def parts(self, rw, rb, widths) -> tuple:
        parts = self._parts
        if parts is None:
            with self._lock:
                parts = self._parts = self._parts or _split(rw, rb, widths)
        return parts

    def choose(self, shape: tuple, variant: str, rw) -> None:
        with self._lock:
            if len(self.chosen) >= CHOICES_PER_BLOCK:
                self.chosen.pop(next(iter(self.chosen)), None)  # the oldest shape
            self.chosen[shape] = variant
            used, parts = set(self.chosen.values()), self._parts
            if "separate" not in used:
                self._parts = None
        if "separate" not in used and parts is not None:
            onednn.forget_packs([w for w, _ in parts])
        if "merged" not in used:
            onednn.forget_packs([rw])


def _block(rw: torch.Tensor, rb: torch.Tensor, widths) -> _Block:
    """The _Block of the block whose merged 1x1 weight is rw. Its state depends on the weight,
    the bias and the widths: any of them changing in place (or by .data) starts it anew."""
    sig = (signature(rw), signature(rb), tuple(widths))
    return _blocks.get(rw, sig, "block", _Block)


def _plan(x, w, b) -> onednn.ConvPlan:
    """A "same"-padded stride-1 conv of the block with ReLU."""
    k = w.shape[-1]
    return onednn.plan(x, w, b, (1, 1), (k // 2, k // 2), 1, None, True)


def _conv(x, w, b) -> torch.Tensor:
    return _plan(x, w, b)(x, w, b, None)


def _conv_of_slice(r, w, b) -> torch.Tensor:
    """A kxk conv of a channel slice r of the merged reduce's output: read in place where it
    runs as Winograd (as the C++ block call does), else from a dense copy (oneDNN has no
    optimized kernel reading a channel slice; torch's op copies it too)."""
    conv = _plan(r, w, b)
    use_winograd = conv.winograd_now()
    if use_winograd:
        return conv(r, w, b, None, None, use_winograd)
    return _conv(r.contiguous(memory_format=torch.channels_last), w, b)


def _branches(variant: str, x, rw, rb, widths, parts, w2, b2, w3, b3, w4, b4, pool) -> list:
    if variant == "merged":
        c1, c2r, _ = widths
        reduced = _conv(x, rw, rb)
        y1, r2, r3 = reduced[:, :c1], reduced[:, c1 : c1 + c2r], reduced[:, c1 + c2r :]
        y2, y3 = _conv_of_slice(r2, w2, b2), _conv_of_slice(r3, w3, b3)
    else:
        y1, r2, r3 = (_conv(x, w, b) for w, b in parts)
        y2, y3 = _conv(r2, w2, b2), _conv(r3, w3, b3)
    y4 = _conv(max_pool2d_or_torch(x, pool, 1, pool // 2, True), w4, b4)
    return [y1, y2, y3, y4]


def _choose(run) -> str:
    """The variant whose fastest of TRIALS calls (after one untimed call each: packing) is
    fastest, sampled alternately so a drifting machine weighs on both alike."""
    for variant in VARIANTS:
        run(variant)
    best = dict.fromkeys(VARIANTS, float("inf"))
    for _ in range(TRIALS):
        for variant in VARIANTS:
            start = time.perf_counter()
            run(variant)
            best[variant] = min(best[variant], time.perf_counter() - start)
    return min(VARIANTS, key=best.__getitem__)


def _packer(input_shape, weight_shape, dtype=torch.float32) -> onednn.Packer:
    """The direct path's packer of a "same"-padded stride-1 conv of the block."""
    k = weight_shape[-1]
    return onednn.Packer(input_shape, weight_shape, (1, 1), (k // 2, k // 2), 1, dtype)


def winograd_kxk(x, widths, w2, w3) -> bool:
    """Does one of the block's kxk convs run as Winograd (fastcnn.cpu.winograd) for x?"""
    if not onednn.direct(x):
        return False
    n, _, h, w = x.shape
    kxk = ((widths[1], w2), (widths[2], w3))
    return any(_packer((n, c, h, w), wt.shape, x.dtype).winograd_now() for c, wt in kxk)


def branches(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool) -> tuple[list, str]:
    """(the four branch outputs of fastcnn.ops.inception through oneDNN, the variant run)."""
    block = _block(rw, rb, widths)
    shape = tuple(x.shape)
    variant = block.chosen.get(shape)

    def run(v):
        parts = block.parts(rw, rb, widths) if v == "separate" else None
        return _branches(v, x, rw, rb, widths, parts, w2, b2, w3, b3, w4, b4, pool)

    if variant is None:
        with _trace.trace():  # the trial calls' pool events are not this call's
            variant = _choose(run)
        block.choose(shape, variant, rw)
    return run(variant), variant


def plan(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool, out_shape, out_strides):
    """A plan(x, rw, rb, w2, b2, w3, b3, w4, b4, out=None) for later calls whose tensors have these
    tensors' metadata: the variant chosen for the shape (as `branches` chooses it, on the first
    call), then the whole block as ONE C++ call (csrc/cpu/onednn_inception.cpp: the direct
    oneDNN convs, the pool and the concat) with the weights' packed copies, looked up per call
    (a weight changed in place is packed again). None where the direct path does not take x
    (then the op's own path runs every call). Where oneDNN has no optimized kernel for a conv,
    the C++ call writes nothing and the per-conv path runs it (noted there). out: where to
    write the block's output (out_shape, out_strides: fastcnn.optimize.program's buffers); None:
    the last call's output memory where nothing holds it any more, else a new tensor."""
    cl = torch.channels_last
    if not onednn.direct(x) or not x.is_contiguous(memory_format=cl):
        return None
    n, c_in, h, w = x.shape
    c1, c2r, c3r = widths

    reduces = [(c1, c_in, 1, 1), (c2r, c_in, 1, 1), (c3r, c_in, 1, 1)]
    w_sizes = {  # each structure's convs in the C++ call's order
        "merged": [tuple(rw.shape), tuple(w2.shape), tuple(w3.shape), tuple(w4.shape)],
        "separate": [reduces[0], reduces[1], tuple(w2.shape), reduces[2], tuple(w3.shape),
                     tuple(w4.shape)],
    }  # fmt: skip
    c_ins = {"merged": [c_in, c2r, c3r, c_in], "separate": [c_in, c_in, c2r, c_in, c3r, c_in]}
    packers = {
        v: [_packer((n, c, h, w), s, x.dtype) for c, s in zip(c_ins[v], w_sizes[v], strict=True)]
        for v in VARIANTS
    }
    block_call = onednn.linked_extension().onednn_inception
    shape, output = tuple(x.shape), alloc.Recycled(out_shape, out_strides)

    def run(x, rw, rb, w2, b2, w3, b3, w4, b4, out=None):
        block = _block(rw, rb, widths)
        variant = block.chosen.get(shape)
        if out is None:
            out = output.get(x)
        if variant is not None:
            if variant == "merged":
                convs = ((rw, rb), (w2, b2), (w3, b3), (w4, b4))
            else:
                (w1, b1), (w2r, b2r), (w3r, b3r) = block.parts(rw, rb, widths)
                convs = ((w1, b1), (w2r, b2r), (w2, b2), (w3r, b3r), (w3, b3), (w4, b4))
            packs = [pack(wt, pack.winograd_now())
                     for pack, (wt, _) in zip(packers[variant], convs, strict=True)]  # fmt: skip
            if block_call(x, [p for p, _ in packs], [layout for _, layout in packs],
                     w_sizes[variant], [b for _, b in convs], widths, pool, out):  # fmt: skip
                return out
        # the first call at this shape (it times the two structures), or a conv without an
        # optimized kernel: the per-conv path
        ys, _ = branches(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool)
        return torch.cat(ys, 1, out=out)

    run.takes_out = True  # fastcnn.optimize.program hands it its own buffer
    return run
