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
import weakref
from pathlib import Path

import torch

_onednn = torch.ops.onednn

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


# id(weight) -> (signature, {(input shape, x_scale, x_zp): packed}); dies with the weight.
_packed: dict[int, tuple[tuple, dict[tuple, torch.Tensor]]] = {}
SHAPES_PER_WEIGHT = 4  # as fastcnn.cpu.onednn: a pack for another input shape is reordered per call


def _signature(weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple:
    version = None if weight.is_inference() else weight._version
    return (weight.data_ptr(), version, tuple(weight.shape), weight_scale.data_ptr())


def prepacked(weight, weight_scale, x_scale, x_zp, stride, padding, x_shape) -> torch.Tensor:
    """weight in oneDNN's blocked int8 layout for this input shape and input quantization,
    packed once (the last SHAPES_PER_WEIGHT shapes are kept)."""
    key = id(weight)
    signature = _signature(weight, weight_scale)
    hit = _packed.get(key)
    if hit is None:
        weakref.finalize(weight, _packed.pop, key, None)
    if hit is None or hit[0] != signature:
        hit = _packed[key] = (signature, {})
    by_shape = hit[1]
    shape_key = (tuple(x_shape), x_scale, x_zp)
    packed = by_shape.get(shape_key)
    if packed is None:
        packed = _onednn.qconv_prepack(
            weight.contiguous(),
            weight_scale,
            x_scale,
            x_zp,
            list(stride),
            list(padding),
            [1, 1],
            1,
            list(x_shape),
        )
        if len(by_shape) >= SHAPES_PER_WEIGHT:
            del by_shape[next(iter(by_shape))]
        by_shape[shape_key] = packed
    return packed


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
        return _onednn.qconv_pointwise(
            x, x_scale, x_zp, w, weight_scale, zps, bias, st, pad, dil, 1,
            out_scale, out_zp, torch.uint8, act, [], "",
        )  # fmt: skip
    if accumulate_into is None:
        accumulate_into = residual.contiguous(memory_format=torch.channels_last)
        if accumulate_into is residual:
            accumulate_into = residual.clone(memory_format=torch.channels_last)
    return _onednn.qconv2d_pointwise.binary(
        x, x_scale, x_zp, w, weight_scale, zps, accumulate_into, bias, st, pad, dil, 1,
        out_scale, out_zp, torch.uint8, r_scale, r_zp, "sum", 1.0, act, [], "",
    )  # fmt: skip
