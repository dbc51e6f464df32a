"""One provider at one batch: its input, its first (checked) call, and the callable to time.
Shared by fastcnn-bench's in-process run and its per-process workers (fastcnn/bench/isolated.py).
"""

from __future__ import annotations

import time

import torch

from fastcnn.bench.providers import channels_last

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest relative error (to the logits' scale) at which a provider still "matches eager".
MATCH_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1e-1}
INT8_MATCH_TOLERANCE = 0.25  # int8 logits of random-weight models: SQNR ~30 dB
# Inputs are rotated through copies totalling about this many bytes, so a small input is not
# timed hot in the cache call after call (CUDA graphs capture one fixed input instead).
ROTATE_BYTES = 64 << 20
MAX_COPIES = 16


def model_input(batch: int, provider: str, size: int, dtype, device) -> torch.Tensor:
    """The model input at this batch (the same values for every provider: seeded by batch), in
    the layout the provider takes."""
    g = torch.Generator(device=device).manual_seed(batch)
    x = torch.randn(batch, 3, size, size, device=device, generator=g).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last(provider) else x


# Peers that run a precision of their own whatever the run's dtype: OpenVINO's default is bf16
# on CPUs with native bf16 (it reports so; an fp32 run still times it, checked as bf16)
OWN_PRECISION = {"openvino-bf16": torch.bfloat16, "openvino-default": torch.bfloat16}


def precision_tolerance(provider: str) -> float | None:
    """The tolerance of a provider that computes in a precision of its own (int8 providers,
    OpenVINO told to run bf16 or left to its default), None for the others."""
    if provider.endswith("-int8"):
        return INT8_MATCH_TOLERANCE
    own = OWN_PRECISION.get(provider)
    return None if own is None else MATCH_TOLERANCE[own]


def tolerance_for(provider: str, dtype: torch.dtype) -> float:
    """How far provider's output may be from the reference (int8 and bf16 peers: loosely)."""
    own = precision_tolerance(provider)
    return MATCH_TOLERANCE[dtype] if own is None else max(own, MATCH_TOLERANCE[dtype])


def first_call(fn, x: torch.Tensor, expected: torch.Tensor | None, row: dict, tolerance) -> bool:
    """Call fn(x) once (it may compile, tune or pack weights), fill row's setup_s (the first
    call's seconds, added to any build seconds already there) and max_rel_error against
    expected (None: this output becomes the reference, returned in row["_output"]), and say
    whether fn may be timed; a failure or a mismatch is written to row["status"]."""
    start = time.perf_counter()
    try:
        y = fn(x).float()
    except Exception as exc:
        row["status"] = f"failed: {type(exc).__name__}: {exc}"
        return False
    row["setup_s"] = time.perf_counter() - start + row.get("setup_s", 0.0)
    if expected is None:
        expected = row["_output"] = y
    scale = max(1.0, expected.abs().max().item())
    row["max_rel_error"] = (y - expected).abs().max().item() / scale
    if not row["max_rel_error"] <= tolerance:
        row["status"] = "output differs from the reference: not timed"
        return False
    return True


def make_timer(fn, x: torch.Tensor, cuda_graphs: bool = False):
    """A no-argument callable to time: fn over rotating copies of x, or a CUDA graph of fn(x)."""
    if not cuda_graphs:
        copies = min(MAX_COPIES, max(1, -(-ROTATE_BYTES // (x.numel() * x.element_size()))))
        inputs = [x] + [x.clone() for _ in range(copies - 1)]
        turn = iter(range(1 << 62))
        return lambda: fn(inputs[next(turn) % copies])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return graph.replay
