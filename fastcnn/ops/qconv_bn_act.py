"""fastcnn.ops.qconv_bn_act: int8 conv + bias (+ int8 residual) (+ ReLU) + requantize, one kernel.

The int8 twin of conv_bn_act for models from fastcnn.quantize: uint8 activations with a per-tensor
scale and zero point, int8 weights symmetric per output channel, int32 accumulation, and the
epilogue (dequantize, bias, residual, ReLU, requantize to uint8) applied before the only store.
Layers: validation and dispatch here; kernels in fastcnn/cpu/int8.py (oneDNN) and
fastcnn/triton/conv_int8.py; the exact reference is fastcnn.reference.qconv_bn_act. Registered
as fastcnn::qconv_bn_act and fastcnn::qconv_bn_act_out (fastcnn/ops/_registry.py).
"""

from __future__ import annotations

import torch

from fastcnn import _backend, _trace, reference
from fastcnn.common import alloc
from fastcnn.common.shapes import output_shape
from fastcnn.ops import _checks
from fastcnn.ops._dispatch import triton_kernel
from fastcnn.ops._registry import FusedOp
from fastcnn.ops.conv_bn_act import _pair, as_result

_OP = "qconv_bn_act"
_CL = torch.channels_last
_triton = triton_kernel("conv_int8", "conv_int8_out")


def _reference(x, xs, xz, w, ws, wmax, b, stride, padding, r, rs, rz, relu, os_, oz, out):
    y = reference.qconv_bn_act(x, xs, xz, w, ws, b, stride, padding, r, rs, rz, relu, os_, oz)
    return as_result(x, y, out)


def _eager(*args):
    _trace.record(_OP, "eager", "reference")
    return _reference(*args)


def _triton_impl(x, xs, xz, w, ws, wmax, b, stride, padding, r, rs, rz, relu, os_, oz, out):
    _trace.record(_OP, "triton", "implicit_gemm_int8")
    if out is None:
        out = _allocate(x, xs, xz, w, ws, wmax, b, stride, padding, r, rs, rz, relu, os_, oz)
    _triton(x, xs, xz, w, ws, b, r, rs, rz, relu, os_, oz, out, tuple(stride), tuple(padding))
    return out


def _cpu_impl(x, xs, xz, w, ws, wmax, b, stride, padding, r, rs, rz, relu, os_, oz, out):
    from fastcnn.cpu import int8

    if not int8.exact_here(wmax):
        why = (
            f"oneDNN's int8 kernel here ({int8.isa()}, no VNNI: probed, so ONEDNN_MAX_CPU_ISA "
            f"counts) can saturate with weights up to {wmax}: quantize with overflow_fix=True "
            "for 7-bit weights it runs exactly"
        )
        _backend.note_once((_OP, "cpu-saturation"), f"fastcnn.ops.{_OP}: {why}; the reference runs")
        _trace.record(_OP, "cpu", "reference", why)
        return _reference(x, xs, xz, w, ws, wmax, b, stride, padding, r, rs, rz, relu, os_, oz, out)
    copy = None
    accumulate_into = None
    if r is not None:
        # oneDNN's "sum" post-op writes the result over the residual's buffer: that buffer is
        # out itself when the caller allows it (in place), else a copy of the residual.
        in_place = out is not None and out is r and out.is_contiguous(memory_format=_CL)
        if in_place:
            accumulate_into = out
        elif out is not None and out.is_contiguous(memory_format=_CL):
            accumulate_into = out.copy_(r)
        else:
            copy = "the residual is copied (oneDNN's sum post-op overwrites its operand)"
    y, torch_op = int8.qconv_bn_act(x, xs, xz, w, ws, b, stride, padding, r, rs, rz, relu, os_,
                                    oz, accumulate_into, out if r is None else None)  # fmt: skip
    why = "; ".join(reason for reason in (copy, torch_op) if reason) or None
    _trace.record(_OP, "cpu", f"onednn_int8({int8.isa()})", why)
    return y if y is out else as_result(x, y, out)


_IMPLS = {"triton": _triton_impl, "cpu": _cpu_impl, "eager": _eager}


def _check_u8(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.uint8:
        raise TypeError(f"fastcnn.ops.{_OP}: {name} must be uint8 (quantized), got {t.dtype}")


def _check_zero_point(name: str, zp: int) -> None:
    if not 0 <= zp <= 255:
        raise ValueError(f"fastcnn.ops.{_OP}: {name} must be in 0..255 for uint8, got {zp}")


def _check_scale(name: str, s: float) -> None:
    if not (s > 0 and s < float("inf")):
        raise ValueError(f"fastcnn.ops.{_OP}: {name} must be a positive finite float, got {s}")


def _validate(x, xs, xz, w, ws, wmax, b, stride, padding, r, rs, rz, relu, os_, oz, out) -> None:
    _check_u8("x", x)
    _checks.check_rank(_OP, "x", x, range(4, 5))
    _checks.check_rank(_OP, "weight", w, range(4, 5))
    if w.dtype != torch.int8:
        raise TypeError(f"fastcnn.ops.{_OP}: weight must be int8, got {w.dtype}")
    for name, t in (("weight", w), ("weight_scale", ws), ("bias", b), ("residual", r)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"fastcnn.ops.{_OP}: {name} is on {t.device} but x on {x.device}")
    c_out = w.shape[0]
    if x.shape[1] != w.shape[1]:
        raise ValueError(
            f"fastcnn.ops.{_OP}: x has {x.shape[1]} channels but weight {tuple(w.shape)} "
            f"expects {w.shape[1]} (groups=1)"
        )
    if ws.dtype != torch.float32 or tuple(ws.shape) != (c_out,):
        raise ValueError(
            f"fastcnn.ops.{_OP}: weight_scale must be float32 of shape ({c_out},), got "
            f"{ws.dtype} {tuple(ws.shape)}"
        )
    if b is not None and (b.dtype != torch.float32 or tuple(b.shape) != (c_out,)):
        raise ValueError(
            f"fastcnn.ops.{_OP}: bias must be float32 of shape ({c_out},), got {b.dtype} "
            f"{tuple(b.shape)}"
        )
    for name, s in (("x_scale", xs), ("out_scale", os_)):
        _check_scale(name, s)
    for name, zp in (("x_zero_point", xz), ("out_zero_point", oz)):
        _check_zero_point(name, zp)
    if not 1 <= wmax <= 127:
        raise ValueError(f"fastcnn.ops.{_OP}: weight_max must be in 1..127, got {wmax}")
    shape = output_shape(x.shape, w.shape, stride, padding, [1, 1])
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(
            f"fastcnn.ops.{_OP}: kernel {tuple(w.shape[2:])} is larger than the padded input "
            f"{tuple(x.shape[2:])} + 2*{padding}: no output"
        )
    if r is not None:
        _check_u8("residual", r)
        _check_scale("residual_scale", rs)
        _check_zero_point("residual_zero_point", rz)
        if list(r.shape) != shape:
            raise ValueError(
                f"fastcnn.ops.{_OP}: residual has shape {tuple(r.shape)}, expected the "
                f"output's {tuple(shape)}"
            )
    if out is not None:
        _checks.check_out(_OP, out, torch.Size(shape), x)


def _allocate(x, xs, xz, w, ws, wmax, b, stride, padding, r, rs, rz, relu, os_, oz):
    return alloc.new_output(x, output_shape(x.shape, w.shape, stride, padding, [1, 1]))


def _run(x, xs, xz, w, ws, wmax, b, stride, padding, r, rs, rz, relu, os_, oz, out):
    if out is not None:
        _checks.check_no_overlap(_OP, out, x=x, weight=w)
        if r is not None:
            _checks.check_no_partial_overlap(_OP, out, residual=r)
            if _checks.same_view(out, r):
                r = out
    impl = _backend.pick(_OP, x.device, _IMPLS)
    return impl(x, xs, xz, w, ws, wmax, b, stride, padding, r, rs, rz, relu, os_, oz, out)


_op = FusedOp(
    _OP,
    "(Tensor x, float x_scale, int x_zero_point, Tensor weight, Tensor weight_scale, "
    "int weight_max, Tensor? bias, int[2] stride, int[2] padding, Tensor? residual, "
    "float residual_scale, int residual_zero_point, bool relu, float out_scale, "
    "int out_zero_point)",
    _validate,
    _allocate,
    _run,
)


def qconv_bn_act(
    x: torch.Tensor,
    x_scale: float,
    x_zero_point: int,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    residual: torch.Tensor | None = None,
    residual_scale: float = 1.0,
    residual_zero_point: int = 0,
    relu: bool = True,
    out_scale: float = 1.0,
    out_zero_point: int = 0,
    out: torch.Tensor | None = None,
    *,
    weight_max: int = 127,
) -> torch.Tensor:
    """uint8 relu(conv2d(x, weight) * scales + bias + residual), requantized.

    Equals fastcnn.reference.qconv_bn_act (the arithmetic step by step is there): int32 sums
    (exact on every backend), then fp32 scales, bias, residual and ReLU, rounded once to uint8.

    Args:
        x (uint8 Tensor[N, Cin, H, W]): holds x_scale * (x - x_zero_point); channels_last is
            the fast layout.
        weight (int8 Tensor[Cout, Cin, KH, KW]): real value weight_scale[c] * weight.
        weight_scale (float32 Tensor[Cout]).
        bias (float32 Tensor[Cout], optional).
        stride, padding (int or (int, int)).
        residual (uint8 Tensor[N, Cout, Ho, Wo], optional): with its own scale and zero point.
        relu (bool); out_scale, out_zero_point: the result's quantization.
        out (uint8 Tensor[N, Cout, Ho, Wo], optional): written instead of a new tensor (e.g. a
            channel slice of a concat), or the residual itself (in place).
        weight_max (int): the largest |weight|: 127, or 63 for weights quantized for CPUs
            without VNNI (only those run oneDNN there; docs/int8.md).

    Returns:
        uint8 Tensor[N, Cout, Ho, Wo]: out, or a new tensor in x's memory format.
    """
    for name, t in (("x", x), ("weight", weight), ("weight_scale", weight_scale)):
        _checks.check_tensor(_OP, name, t)
    for name, t in (("bias", bias), ("residual", residual), ("out", out)):
        if t is not None:
            _checks.check_tensor(_OP, name, t)
    if not isinstance(relu, bool):
        raise TypeError(f"fastcnn.ops.{_OP}: relu must be a bool, got {relu!r}")
    args = (
        x,
        float(x_scale),
        int(x_zero_point),
        weight,
        _checks.dense_vector(weight_scale),
        int(weight_max),
        _checks.dense_vector(bias),
        _pair("stride", stride, 1, _OP),
        _pair("padding", padding, 0, _OP),
        residual,
        float(residual_scale),
        int(residual_zero_point),
        relu,
        float(out_scale),
        int(out_zero_point),
    )
    return _op(*args, out=out)
