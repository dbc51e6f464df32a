"""fastcnn.ops.inception: a whole eval-mode Inception block (BN folded) in four kernels, with
every branch writing straight into its slice of the one output: no torch.cat, no branch copies.

  1. the three 1x1 convs that read x run as ONE GEMM over their concatenated weights; its first
     c1 output channels go straight into branch 1's slice of the output, the two reduce
     results into a scratch tensor;
  2./3. the two kxk convs read their reduce result from the scratch (in place, a channel slice)
     and write into branch 2's and branch 3's slices;
  4. branch 4's 1x1 conv reads max_pool2d(x) computed in registers (the pooled tensor is never
     written) and writes into its slice.
Reference: fastcnn.reference.inception. Registered as fastcnn::inception (+ fastcnn::inception_out).
"""

from __future__ import annotations

import torch

from fastcnn import _backend, _trace, reference
from fastcnn.common import alloc
from fastcnn.common.shapes import memory_format_of, strides_of
from fastcnn.ops import _checks, _extension_paths
from fastcnn.ops._dispatch import extension_kernel, triton_kernel
from fastcnn.ops._registry import FusedOp
from fastcnn.ops.conv_bn_act import as_result

_OP = "inception"
_conv = triton_kernel("conv_bn_act", "conv_bn_act_out")
_extension_cuda = extension_kernel("inception_out")


def _triton_impl(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool, out):
    _trace.record(_OP, "triton", "4 implicit_gemm launches")
    if out is None:
        out = _allocate(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool)
    c1, c2r, _ = widths
    c2, c3 = w2.shape[0], w3.shape[0]
    if x.stride(1) != 1:  # once here rather than in two launches
        x = x.contiguous(memory_format=torch.channels_last)
    n, _, h, w = x.shape
    scratch = alloc.new_output(x, [n, rw.shape[0] - c1, h, w])  # the two reduce results
    slices = torch.split(out, [c1, c2, c3, w4.shape[0]], dim=1)
    same, none = (1, 1), (0, 0)
    _conv(x, rw, rb, None, slices[0], same, none, True, out2=scratch)
    for i, (weight, bias, src) in enumerate(
        ((w2, b2, scratch[:, :c2r]), (w3, b3, scratch[:, c2r:]))
    ):
        k = weight.shape[-1] // 2
        _conv(src, weight, bias, None, slices[1 + i], same, (k, k), True)
    _conv(x, w4, b4, None, slices[3], same, none, True, pool=pool)
    return out


def _cuda_impl(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool, out):
    """The extension (csrc/cuda/inception.cu): cuBLASLt/cuDNN convs into the output's slices;
    the trace gets how many convs took each path ("4 cublaslt + 2 cudnn+epilogue")."""
    if out is None:
        out = _allocate(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool)
    tracing = _trace.active()
    if tracing:
        _extension_paths.take()  # forget paths of untraced calls
    _extension_cuda(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool, out)
    if tracing:
        _trace.record(_OP, "cuda", *_extension_paths.summary(_extension_paths.take()))
    return out


def _reference(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool, out):
    return as_result(x, reference.inception(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool), out)


def _eager(*args):
    _trace.record(_OP, "eager", "reference")
    return _reference(*args)


def _cpu_impl(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool, out):
    """oneDNN convs (bias + ReLU post-ops) in the block structure timed fastest here for this
    shape (fastcnn/cpu/inception.py), the pool branch, then one concat written into the output:
    torch's oneDNN ops cannot write into a channel slice, hence the concat."""
    from fastcnn.cpu import inception, onednn

    if not onednn.supports(x.dtype):
        why = f"oneDNN cannot run {x.dtype} convolutions on this CPU"
        _backend.note_once((_OP, f"cpu-{x.dtype}"), f"fastcnn.ops.{_OP}: {why}; the reference runs")
        _trace.record(_OP, "cpu", "reference", why)
        return _reference(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool, out)
    branches, variant = inception.branches(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool)
    winograd = ", winograd 3x3s" if inception.winograd_kxk(x, widths, w2, w3) else ""
    _trace.record(_OP, "cpu", f"onednn+cat ({variant} 1x1s{winograd})")
    if out is None:
        out = _allocate(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool)
    return torch.cat(branches, 1, out=out)


_IMPLS = {"triton": _triton_impl, "cuda": _cuda_impl, "cpu": _cpu_impl, "eager": _eager}


def _check_conv(name: str, weight, bias_name: str, bias, x, c_in: int, square_odd: bool) -> None:
    _checks.check_rank(_OP, name, weight, range(4, 5))
    _checks.check_same_kind(_OP, name, weight, "x", x)
    _checks.check_same_kind(_OP, bias_name, bias, "x", x)
    kh, kw = weight.shape[2:]
    if weight.shape[1] != c_in:
        raise ValueError(
            f"fastcnn.ops.{_OP}: {name} expects {weight.shape[1]} input channels, gets {c_in}"
        )
    if (square_odd and (kh != kw or kh % 2 == 0)) or (not square_odd and (kh, kw) != (1, 1)):
        want = "a square odd kernel" if square_odd else "a 1x1 kernel"
        raise ValueError(f"fastcnn.ops.{_OP}: {name} must have {want}, got {kh}x{kw}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"fastcnn.ops.{_OP}: {bias_name} has shape {tuple(bias.shape)}, expected "
            f"({weight.shape[0]},)"
        )


def _out_shape(x, widths, w2, w3, w4) -> list[int]:
    n, _, h, w = x.shape
    return [n, widths[0] + w2.shape[0] + w3.shape[0] + w4.shape[0], h, w]


def _validate(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool, out) -> None:
    _checks.check_dtype(_OP, "x", x)
    _checks.check_rank(_OP, "x", x, range(4, 5))
    if len(widths) != 3 or min(widths) < 1 or sum(widths) != rw.shape[0]:
        raise ValueError(
            f"fastcnn.ops.{_OP}: widths {list(widths)} must be three positive channel counts "
            f"summing to reduce_weight's {rw.shape[0]} output channels"
        )
    if pool < 1 or pool % 2 == 0:
        raise ValueError(f"fastcnn.ops.{_OP}: pool must be an odd size >= 1, got {pool}")
    c_in = x.shape[1]
    _check_conv("reduce_weight", rw, "reduce_bias", rb, x, c_in, square_odd=False)
    _check_conv("w2", w2, "b2", b2, x, widths[1], square_odd=True)
    _check_conv("w3", w3, "b3", b3, x, widths[2], square_odd=True)
    _check_conv("w4", w4, "b4", b4, x, c_in, square_odd=False)
    if out is not None:
        _checks.check_out(_OP, out, torch.Size(_out_shape(x, widths, w2, w3, w4)), x)


def _allocate(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool) -> torch.Tensor:
    return alloc.new_output(x, _out_shape(x, widths, w2, w3, w4))


def _run(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool, out):
    if out is not None:
        _checks.check_no_overlap(_OP, out, x=x)
    impl = _backend.pick(_OP, x.device, _IMPLS)
    return impl(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool, out)


_op = FusedOp(
    _OP,
    "(Tensor x, Tensor reduce_weight, Tensor reduce_bias, int[3] widths, Tensor w2, Tensor b2, "
    "Tensor w3, Tensor b3, Tensor w4, Tensor b4, int pool)",
    _validate,
    _allocate,
    _run,
)


def plan(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, pool):
    """inception planned for every later call whose tensors have these tensors' metadata under
    the same backend choice: the checks and the backend pick run now; the returned
    run(x, rw, rb, w2, b2, w3, b3, w4, b4) only computes. None where such calls take the full
    path (every backend but the cpu one's direct oneDNN convs, for now).
    fastcnn.nn.FusedInception keeps one per input signature."""
    tensors = (x, rw, rb, w2, b2, w3, b3, w4, b4)
    for name, t in zip(("x", "reduce_weight", "reduce_bias", "w2", "b2", "w3", "b3", "w4", "b4"),
                       tensors, strict=True):  # fmt: skip
        _checks.check_tensor(_OP, name, t)
    widths = [int(w) for w in widths]
    if any(not b.is_contiguous() for b in (rb, b2, b3, b4)):
        return None  # strided biases are copied dense per call by the full path
    _validate(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, int(pool), None)
    if _backend.pick(_OP, x.device, _IMPLS) is not _cpu_impl:
        return None
    from fastcnn.cpu import inception as cpu_inception
    from fastcnn.cpu import onednn

    if not onednn.supports(x.dtype):
        return None
    shape = _out_shape(x, widths, w2, w3, w4)
    strides = strides_of(shape, memory_format_of(x))
    return cpu_inception.plan(x, rw, rb, widths, w2, b2, w3, b3, w4, b4, int(pool), shape,
                               strides)  # fmt: skip


def inception(
    x: torch.Tensor,
    reduce_weight: torch.Tensor,
    reduce_bias: torch.Tensor,
    widths: list[int],
    w2: torch.Tensor,
    b2: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    w4: torch.Tensor,
    b4: torch.Tensor,
    pool: int = 3,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """An eval-mode Inception block (BN folded, every conv followed by ReLU) in four kernels.

    Equals fastcnn.reference.inception: ``torch.cat([b1, b2, b3, b4], 1)`` of branch 1's 1x1
    conv, the 1x1 reduce then kxk conv of branches 2 and 3, and branch 4's max-pool then 1x1.

    Args:
        x (Tensor[N, Cin, H, W]): float32, float16 or bfloat16.
        reduce_weight (Tensor[c1 + c2red + c3red, Cin, 1, 1]), reduce_bias: branch 1's conv and
            the two reduce convs, concatenated.
        widths ([c1, c2red, c3red]): how reduce_weight splits.
        w2, b2 / w3, b3 (Tensor[c2, c2red, k, k] / Tensor[c3, c3red, k, k], and [c]): the kxk
            convs of branches 2 and 3 (odd square kernels, "same" padding).
        w4, b4 (Tensor[c4, Cin, 1, 1], [c4]): branch 4's conv.
        pool (int): branch 4's max-pool window (stride 1, padding pool // 2).
        out (Tensor[N, c1 + c2 + c3 + c4, H, W], optional): written instead of a new tensor,
            e.g. a channel slice of a larger tensor.

    Returns:
        Tensor[N, c1 + c2 + c3 + c4, H, W]: out, or a new tensor in x's memory format.
    """
    tensors = {
        "x": x,
        "reduce_weight": reduce_weight,
        "reduce_bias": reduce_bias,
        "w2": w2,
        "b2": b2,
        "w3": w3,
        "b3": b3,
        "w4": w4,
        "b4": b4,
    }
    for name, t in tensors.items():
        _checks.check_tensor(_OP, name, t)
    if out is not None:
        _checks.check_tensor(_OP, "out", out)
    _checks.check_no_grad(_OP, out=out, **tensors)
    widths = [int(w) for w in widths]
    rb, b2, b3, b4 = (_checks.dense_vector(b) for b in (reduce_bias, b2, b3, b4))
    return _op(x, reduce_weight, rb, widths, w2, b2, w3, b3, w4, b4, int(pool), out=out)
