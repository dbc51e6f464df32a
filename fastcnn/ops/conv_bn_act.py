"""fastcnn.ops.conv_bn_act: relu(conv2d(x, weight, bias) + residual) as one kernel.

With BatchNorm folded into weight and bias (fastcnn.fold_bn) this is eval-mode
Conv2d -> BatchNorm2d (-> + residual) (-> ReLU), which eager PyTorch runs as three to five passes
over the activation. Validation and backend choice here; the kernels: fastcnn/triton/
conv_bn_act.py ("triton"), the extension's csrc/cuda ("cuda"), fastcnn/cpu/onednn.py ("cpu"),
fastcnn/reference.py ("eager"). Registered as fastcnn::conv_bn_act and fastcnn::conv_bn_act_out
(fastcnn/ops/_registry.py); `plan` makes a module's per-signature plans.
"""

from __future__ import annotations

import torch

from fastcnn import _backend, _extension, _trace, reference
from fastcnn.common import alloc
from fastcnn.common.shapes import memory_format_of, output_shape, strides_of
from fastcnn.ops import _checks, _extension_paths
from fastcnn.ops._dispatch import extension_kernel, triton_kernel
from fastcnn.ops._registry import FusedOp

_OP = "conv_bn_act"
Pair = list[int]
# The kernels ("backend:kernel" as fastcnn.trace reports them) whose fused ReLU maps NaN to 0;
# every other path propagates NaN as torch.relu does.
NAN_TO_ZERO_KERNELS = frozenset({"cpu:onednn", "cuda:cublaslt"})


def _reference(x, weight, bias, stride, padding, groups, dilation, residual, relu, out):
    y = reference.conv_bn_act(x, weight, bias, stride, padding, groups, residual, relu, dilation)
    return as_result(x, y, out)


def _eager(*args):
    _trace.record(_OP, "eager", "reference")
    return _reference(*args)


_triton = triton_kernel("conv_bn_act", "conv_bn_act_out")
_triton_plan = triton_kernel("conv_bn_act", "plan")
_extension_cuda = extension_kernel("conv_bn_act_out")


def _triton_impl(x, weight, bias, stride, padding, groups, dilation, residual, relu, out):
    _trace.record(_OP, "triton", "implicit_gemm")
    if out is None:
        out = _allocate(x, weight, bias, stride, padding, groups, dilation, residual, relu)
    _triton(x, weight, bias, residual, out, tuple(stride), tuple(padding), relu, groups=groups)
    return out


def _cuda_impl(x, weight, bias, stride, padding, groups, dilation, residual, relu, out):
    """The extension: cuBLASLt (1x1, epilogue fused) or cuDNN + one epilogue pass; the trace
    gets the path it took and, for a 1x1 conv that missed cuBLASLt, why."""
    if out is None:
        out = _allocate(x, weight, bias, stride, padding, groups, dilation, residual, relu)
    tracing = _trace.active()
    if tracing:
        _extension_paths.take()  # forget paths of untraced calls
    _extension_cuda(x, weight, bias, stride, padding, residual, relu, out)
    if tracing:
        _trace.record(_OP, "cuda", *_extension_paths.summary(_extension_paths.take()))
    return out


def _cpu_impl(x, weight, bias, stride, padding, groups, dilation, residual, relu, out):
    from fastcnn.cpu import onednn

    if not onednn.supports(x.dtype):
        why = f"oneDNN cannot run {x.dtype} convolutions on this CPU"
        _backend.note_once(
            (_OP, f"cpu-{x.dtype}"), f"fastcnn.ops.{_OP}: {why}; they run the eager reference"
        )
        _trace.record(_OP, "cpu", "reference", why)
        return _reference(x, weight, bias, stride, padding, groups, dilation, residual, relu, out)
    conv = onednn.plan(x, weight, bias, stride, padding, groups, residual, relu)
    # read once: the kernel recorded is the one the direct path then runs (it always can)
    use_winograd = conv.winograd_now()
    _trace.record(_OP, "cpu", conv.kernel(use_winograd), conv.copy)
    in_place = out is not None and out is residual
    y = conv(x, weight, bias, residual, residual if in_place else None, use_winograd)
    return y if y is out else as_result(x, y, out)


_IMPLS = {"triton": _triton_impl, "cuda": _cuda_impl, "cpu": _cpu_impl, "eager": _eager}
# The implementations with a grouped kernel (Triton: one GEMM per group; oneDNN's groups; the
# reference is eager's own kernel); the extension's CUDA convs run grouped ones as the reference.
_GROUPED_IMPLS = {_triton_impl, _cpu_impl, _eager}


def _pair(name: str, value, minimum: int, op: str = _OP) -> Pair:
    """An int or a pair of ints, each >= minimum, as a list of two."""
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"fastcnn.ops.{op}: {name} must be an int or two ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"fastcnn.ops.{op}: {name} must be >= {minimum}, got {value!r}")
    return pair


def _validate(x, weight, bias, stride, padding, groups, dilation, residual, relu, out) -> None:
    _checks.check_dtype(_OP, "x", x)
    _checks.check_rank(_OP, "x", x, range(4, 5))
    _checks.check_rank(_OP, "weight", weight, range(4, 5))
    _checks.check_same_kind(_OP, "weight", weight, "x", x)
    if groups < 1 or x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(
            f"fastcnn.ops.{_OP}: x has {x.shape[1]} channels but weight {tuple(weight.shape)} "
            f"with groups={groups} expects {weight.shape[1] * groups} (and Cout divisible by "
            "groups)"
        )
    c_out = weight.shape[0]
    if bias is not None:
        _checks.check_same_kind(_OP, "bias", bias, "x", x)
        if tuple(bias.shape) != (c_out,):
            raise ValueError(
                f"fastcnn.ops.{_OP}: bias has shape {tuple(bias.shape)}, expected ({c_out},)"
            )
    shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
    if shape[2] < 1 or shape[3] < 1:
        raise ValueError(
            f"fastcnn.ops.{_OP}: kernel {tuple(weight.shape[2:])} (dilation {dilation}) is larger "
            f"than the padded input {tuple(x.shape[2:])} + 2*{padding}: no output"
        )
    if residual is not None:
        _checks.check_same_kind(_OP, "residual", residual, "x", x)
        if list(residual.shape) != shape:
            raise ValueError(
                f"fastcnn.ops.{_OP}: residual has shape {tuple(residual.shape)}, expected the "
                f"output's {tuple(shape)}"
            )
    if out is not None:
        _checks.check_out(_OP, out, torch.Size(shape), x)


def as_result(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """A backend's own result y as the op's: copied into out, else in x's memory format (a
    copy only when y came out in another one)."""
    if out is not None:
        return out.copy_(y)
    return y.contiguous(memory_format=memory_format_of(x))


def _allocate(x, weight, bias, stride, padding, groups, dilation, residual, relu) -> torch.Tensor:
    return alloc.new_output(x, output_shape(x.shape, weight.shape, stride, padding, dilation))


def _run(x, weight, bias, stride, padding, groups, dilation, residual, relu, out):
    if out is not None:  # a caller's out= must not share memory with what the kernel reads
        _checks.check_no_overlap(_OP, out, x=x, weight=weight, bias=bias)
        if residual is not None:  # except the residual, read and written element by element
            _checks.check_no_partial_overlap(_OP, out, residual=residual)
            if _checks.same_view(out, residual):
                residual = out  # one object, so that backends can tell an in-place call
    impl = _backend.pick(_OP, x.device, _IMPLS) if dilation == [1, 1] else None
    if impl is None or (groups != 1 and impl not in _GROUPED_IMPLS):
        why = "groups > 1 and dilation != 1 have no fused kernel (grouped: triton, cpu, eager)"
        _backend.note_once(
            (_OP, "groups/dilation"),
            f"fastcnn.ops.{_OP}: {why}; such convolutions run the eager reference",
        )
        _trace.record(_OP, "eager", "reference", why)
        impl = _reference
    return impl(x, weight, bias, stride, padding, groups, dilation, residual, relu, out)


_op = FusedOp(
    _OP,
    "(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int groups, "
    "int[2] dilation, Tensor? residual, bool relu)",
    _validate,
    _allocate,
    _run,
)


def plan(x, weight, bias, stride, padding, groups, dilation, residual, relu, in_place=False):
    """conv_bn_act planned for every later call whose tensors have these tensors' metadata
    (shapes, strides, dtypes, devices) under the same backend choice: the argument checks and
    the backend pick run now, and the returned run(x, weight, bias, residual, out) only
    launches (out: None, or the residual itself when in_place). None when such calls need the
    full path (groups/dilation: the reference with its note). fastcnn.nn.ConvBNAct keeps one
    per input layout, so a batch-1 forward pays no per-call checks."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None:
            _checks.check_tensor(_OP, name, t)
    args = _op_args(x, weight, bias, stride, padding, groups, dilation, residual, relu)
    _validate(*args, residual if in_place else None)
    if args[6] != [1, 1] or args[2] is not bias:  # dilation; a strided bias (copied per call)
        return None
    impl = _backend.pick(_OP, x.device, _IMPLS)
    if groups != 1 and impl not in _GROUPED_IMPLS:
        return None
    stride, padding, dilation = args[3], args[4], args[6]
    if impl is _cpu_impl:
        from fastcnn.cpu import onednn

        if onednn.supports(x.dtype):  # oneDNN's path, decided once: per call the pack lookup,
            # the output (the last one's memory where nothing holds it) and the call
            return onednn.plan(x, weight, bias, stride, padding, groups, residual, relu,
                               memory_format_of(x), recycle=True)  # fmt: skip
    if impl not in (_triton_impl, _cuda_impl):  # the reference allocates its own output

        def run(x, weight, bias, residual, out):
            return impl(x, weight, bias, stride, padding, groups, dilation, residual, relu, out)

        return run
    shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
    strides = strides_of(shape, memory_format_of(x))
    # The GPU kernels write into a buffer allocated here, and their launcher is resolved now:
    # a planned call is the allocation and the launcher call, nothing else (plans run only
    # while no trace records, so there is no path to record).
    stride, padding = tuple(stride), tuple(padding)
    if impl is _cuda_impl:
        # the dispatcher call of torch.ops.fastcnn_ext.conv_bn_act_out, through pybind11 (a
        # third of its host time: see csrc/bindings.cpp)
        op = _extension.load().conv_bn_act_out_planned
        (sh, sw), (ph, pw) = stride, padding

        def launch(x, weight, bias, residual, out):
            op(x, weight, bias, sh, sw, ph, pw, residual, relu, out)

    else:
        launch = _triton_plan.resolve()(x, weight, bias, residual, stride, padding, relu, groups)
    if launch is None:  # Triton with an NCHW x: the launcher converts it on every call
        full = _triton.resolve()

        def launch(x, weight, bias, residual, out):
            full(x, weight, bias, residual, out, stride, padding, relu, groups=groups)

    def run(x, weight, bias, residual, out):
        if out is None:
            out = alloc.empty_strided(shape, strides, x)
        launch(x, weight, bias, residual, out)
        return out

    return run


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    out: torch.Tensor | None = None,
    *,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """relu(conv2d(x, weight, bias, stride, padding, dilation, groups) + residual), one kernel.

    Equals ``torch.relu(F.conv2d(x, weight, bias, stride, padding, dilation, groups) +
    residual)`` (fastcnn.reference.conv_bn_act); with weight and bias from fastcnn.fold_bn, an
    eval-mode Conv2d -> BatchNorm2d (-> + residual) (-> ReLU). Accumulates in fp32 and rounds
    once; fp32 uses TF32 where torch.backends.cudnn.allow_tf32 is set, as torch's conv2d does.

    Args:
        x (Tensor[N, Cin, H, W]): float32, float16 or bfloat16; channels_last is the fast
            layout (an NCHW x is converted inside the op).
        weight (Tensor[Cout, Cin / groups, KH, KW]): any layout.
        bias (Tensor[Cout], optional).
        stride, padding, dilation (int or (int, int)); groups (int): as torch's conv2d.
        residual (Tensor[N, Cout, Ho, Wo], optional): added before the ReLU; any layout.
        relu (bool): apply the ReLU.
        out (Tensor[N, Cout, Ho, Wo], optional): written instead of a new tensor, e.g. a
            channel slice ``big[:, c0:c0 + Cout]`` of a larger tensor; it must not overlap x,
            weight or bias, but may be the residual itself (in place).

    Returns:
        Tensor[N, Cout, Ho, Wo]: out, or a new tensor in x's memory format.

    Which kernel runs (and what maps NaN to 0 through the ReLU: NAN_TO_ZERO_KERNELS):
    docs/backends.md; fastcnn.trace() records it for every call.
    """
    for name, t in (("x", x), ("weight", weight)):
        _checks.check_tensor(_OP, name, t)
    for name, t in (("bias", bias), ("residual", residual), ("out", out)):
        if t is not None:
            _checks.check_tensor(_OP, name, t)
    _checks.check_no_grad(_OP, x=x, weight=weight, bias=bias, residual=residual, out=out)
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"fastcnn.ops.{_OP}: groups must be an int, got {groups!r}")
    if not isinstance(relu, bool):
        raise TypeError(f"fastcnn.ops.{_OP}: relu must be a bool, got {relu!r}")
    args = _op_args(x, weight, bias, stride, padding, groups, dilation, residual, relu)
    return _op(*args, out=out)


def _op_args(x, weight, bias, stride, padding, groups, dilation, residual, relu) -> tuple:
    """The registered op's positional arguments, int-or-pair arguments as checked pairs."""
    return (
        x,
        weight,
        _checks.dense_vector(bias),
        _pair("stride", stride, 1),
        _pair("padding", padding, 0),
        groups,
        _pair("dilation", dilation, 1),
        residual,
        relu,
    )
