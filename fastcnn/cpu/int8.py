"""int8 conv + bias (+ residual) (+ ReLU) + requantize on the CPU: torch's oneDNN quantized conv
ops, as Inductor's x86 int8 path runs them (torch.ops.onednn.qconv_pointwise, and its binary
"sum" variant for the residual, which writes into the residual's buffer).

oneDNN picks its kernel for the CPU at run time: AMX tiles (Sapphire Rapids and later), AVX-512
VNNI (vpdpbusd, Cascade Lake and later), AVX-VNNI, else AVX2/AVX-512 without VNNI. Without VNNI,
oneDNN multiplies u8 x s8 pairs with vpmaddubsw, whose int16 pair sums saturate (255 * 127 * 2 >
32767): a model whose weights use the full int8 range would be silently wrong there. So
`exact_here(weight_max)` says whether this CPU runs a weight range exactly (VNNI/AMX: any;
without: |w| <= 63, what fastcnn.quantize(..., overflow_fix=True) produces, as NNCF's overflow
fix does), and the op runs the exact reference otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from fastcnn import _extension, _trace
from fastcnn.common import alloc
from fastcnn.common.dispatch import can_skip_dispatcher
from fastcnn.common.weight_cache import WeightCache
from fastcnn.common.weight_cache import signature as weight_signature

_onednn = torch.ops.onednn
# The overloads themselves: resolving a packet's overload costs microseconds on every call.
_qconv = _onednn.qconv_pointwise.default
_qconv_sum = _onednn.qconv2d_pointwise.binary
_CL = torch.channels_last

# |weight| bound below which vpmaddubsw's int16 pair sums cannot saturate: 255 * 63 * 2 < 32767.
NO_VNNI_WEIGHT_MAX = 63


@functools.cache
def isa() -> str:
    """The int8 instruction set oneDNN will use here: "amx", "avx512_vnni", "avx_vnni",
    "avx512" or "avx2" (no VNNI), or "none" (no oneDNN). Read from /proc/cpuinfo (Linux)."""
    if not torch.backends.mkldnn.is_available():
        return "none"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    for flag, name in (
        ("amx_int8", "amx"),
        ("avx512_vnni", "avx512_vnni"),
        ("avx_vnni", "avx_vnni"),
        ("avx512bw", "avx512"),
    ):
        if flag in flags:
            return name
    return "avx2"


def has_vnni() -> bool:
    return isa() in ("amx", "avx512_vnni", "avx_vnni")


def exact_here(weight_max: int) -> bool:
    """Does oneDNN compute exact int32 sums for weights within +-weight_max on this CPU?"""
    return isa() != "none" and (has_vnni() or weight_max <= NO_VNNI_WEIGHT_MAX)


# Packs per (conv, input size, x_scale, x_zp), bounded as fastcnn.cpu.onednn's fp32 ones.
_cache = WeightCache()


def signature(weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple:
    """What a packed weight depends on: the weight and its scales (both are in the pack)."""
    return (*weight_signature(weight), *weight_signature(weight_scale))


def prepacked(weight, weight_scale, x_scale, x_zp, stride, padding, x_shape) -> torch.Tensor:
    """weight in oneDNN's blocked int8 layout for this conv, input quantization and input
    size, packed once per weight version. Not per batch size: the layout does not depend on it
    (a pack made at batch 1 runs batch 8 and 32 as fast as their own), so a server cycling
    through batch sizes keeps one pack (the last KEYS_PER_WEIGHT input sizes are kept)."""

    def pack() -> torch.Tensor:  # only on a miss: the hot path builds no arguments
        return _onednn.qconv_prepack(
            weight.contiguous(), weight_scale, x_scale, x_zp, list(stride), list(padding),
            [1, 1], 1, list(x_shape),
        )  # fmt: skip

    key = (tuple(x_shape[1:]), tuple(stride), tuple(padding), x_scale, x_zp)
    return _cache.get(weight, signature(weight, weight_scale), key, pack)


_zero_points: dict[int, torch.Tensor] = {}


def _weight_zero_points(c_out: int) -> torch.Tensor:
    zp = _zero_points.get(c_out)
    if zp is None:
        zp = _zero_points[c_out] = torch.zeros(c_out, dtype=torch.long)
    return zp


def qconv_bn_act(
    x, x_scale, x_zp, weight, weight_scale, bias, stride, padding, residual, r_scale, r_zp,
    relu, out_scale, out_zp, accumulate_into: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The int8 op through oneDNN; returns a new uint8 tensor (channels_last), or with
    accumulate_into (a channels_last uint8 tensor holding the residual's values) the result
    written over it in place. A residual without accumulate_into is copied first."""
    x = x.contiguous(memory_format=torch.channels_last)
    w = prepacked(weight, weight_scale, x_scale, x_zp, stride, padding, x.shape)
    zps = _weight_zero_points(weight.shape[0])
    st, pad, dil = list(stride), list(padding), [1, 1]
    act = "relu" if relu else "none"
    if residual is None:
        return _qconv(
            x, x_scale, x_zp, w, weight_scale, zps, bias, st, pad, dil, 1,
            out_scale, out_zp, torch.uint8, act, [], "",
        )  # fmt: skip
    if accumulate_into is None:
        accumulate_into = residual.contiguous(memory_format=torch.channels_last)
        if accumulate_into is residual:
            accumulate_into = residual.clone(memory_format=torch.channels_last)
    # The op writes the result over accumulate_into and returns a copy of it (its schema must
    # not return an alias): the buffer it wrote is the result, the copy is dropped.
    _qconv_sum(
        x, x_scale, x_zp, w, weight_scale, zps, accumulate_into, bias, st, pad, dil, 1,
        out_scale, out_zp, torch.uint8, r_scale, r_zp, "sum", 1.0, act, [], "",
    )  # fmt: skip
    return accumulate_into


def plan(
    x, weight, weight_scale, bias, stride, padding, relu, qparams, residual, in_place, events,
) -> Callable | None:  # fmt: skip
    """A plan for later calls like this one (same shapes and strides): run(x, residual, weight,
    weight_scale, bias, qparams) -> the uint8 result, or None when those are no longer the
    tensors and qparams planned for (take the op again). It records `events` (what the op
    recorded for this call) and runs the one oneDNN primitive, with the weight packed for this
    input shape (`prepacked`: repacked if its values changed; the plan itself holds no pack, so
    memory stays within KEYS_PER_WEIGHT packs a weight). None where such calls must always
    take the op (x not channels_last: the op converts it).

    qparams: ((x_scale, x_zp), (out_scale, out_zp), (residual_scale, residual_zp)).
    in_place: the residual's buffer becomes the result (it must be channels_last), else a copy
    of the residual is made first (oneDNN's sum post-op overwrites its operand)."""
    if not x.is_contiguous(memory_format=_CL):
        return None
    if residual is not None and in_place and not residual.is_contiguous(memory_format=_CL):
        return None
    (xs, xz), (os_, oz), (rs, rz) = qparams
    zps = _weight_zero_points(weight.shape[0])
    st, pad, dil = list(stride), list(padding), [1, 1]
    act = "relu" if relu else "none"
    events = tuple(events)
    record = _trace.record

    def run(x, residual, w, ws, b, q):
        if w is not weight or ws is not weight_scale or b is not bias or q != qparams:
            return None
        packed = prepacked(w, ws, xs, xz, stride, padding, x.shape)
        for event in events:
            record(*event)
        if residual is None:
            return _qconv(
                x, xs, xz, packed, ws, zps, b, st, pad, dil, 1, os_, oz, torch.uint8, act, [], ""
            )
        acc = residual if in_place else residual.clone(memory_format=_CL)
        _qconv_sum(
            x, xs, xz, packed, ws, zps, acc, b, st, pad, dil, 1, os_, oz, torch.uint8,
            rs, rz, "sum", 1.0, act, [], "",
        )  # fmt: skip
        return acc

    return run


# The float <-> uint8 conversions at a quantized region's edges (fastcnn.nn.quantized's
# Quantize, Dequantize, Requantize): one pass each in the extension (csrc/cpu/quantize.cpp),
# bit-identical to the torch expression they replace, which still runs where the extension
# cannot (and records why on a CPU).


def conversion_unsupported(x: torch.Tensor) -> str | None:
    """Why the extension's one-pass conversion cannot take x, or None."""
    if x.device.type != "cpu":
        return "not a CPU tensor"
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=_CL))):
        return "the input is neither contiguous nor channels_last"
    if not can_skip_dispatcher(x):
        return "torch.compile, export or autograd must see the torch expression"
    if _extension.load() is None:
        return "the C++ extension did not build"
    return None


def quantize(x: torch.Tensor, qparams: tuple) -> torch.Tensor:
    """float32 x (dense) -> uint8 in x's layout, qparams = (scale, zero_point); one pass."""
    out = alloc.empty_like(x, torch.uint8)  # x's strides
    _extension.ops().quantize_u8_out(x, *qparams, out)
    return out


def dequantize(q: torch.Tensor, qparams: tuple) -> torch.Tensor:
    out = alloc.empty_like(q, torch.float32)
    _extension.ops().dequantize_u8_out(q, *qparams, out)
    return out


def requantize(q: torch.Tensor, source: tuple, target: tuple) -> torch.Tensor:
    out = alloc.empty_like(q, torch.uint8)
    _extension.ops().requantize_u8_out(q, *source, *target, out)
    return out
