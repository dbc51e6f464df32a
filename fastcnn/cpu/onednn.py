"""Conv + bias (+ residual) + ReLU on the CPU as ONE oneDNN primitive with post-ops.

The bias, the residual add and the ReLU are oneDNN post-ops applied while each output block is
still in registers/cache, instead of eager's separate passes. Two ways to reach oneDNN:

  direct: the extension's own oneDNN calls (csrc/cpu/onednn_conv.cpp, the onednn-cpu-gomp
          wheel's library), fp32 with channels innermost: primitives made once per shape and
          layout and kept, input, output and residual read and written through their strides.
  torch:  torch.ops.mkldnn._convolution_pointwise, what Inductor's CPU freezing path runs; it
          creates its primitive descriptor on every call (20-45 µs a conv). Every other case,
          and all of them where the extension was built without the library (noted once).

Weights are prepacked once per input shape into oneDNN's blocked layout and repacked only when
the weight tensor changes (version counter, storage or shape; inference tensors have no
version counter, so only a new storage or shape counts for them).
"""

from __future__ import annotations

import torch

from fastcnn import _backend, _extension
from fastcnn.common import alloc
from fastcnn.common.shapes import output_shape
from fastcnn.common.weight_cache import WeightCache, signature
from fastcnn.cpu import winograd

_mkldnn = torch.ops.mkldnn


_cache = WeightCache()
_packed = _cache.entries  # tests read it


def supports(dtype: torch.dtype) -> bool:
    """Can oneDNN run a convolution in this dtype on this CPU?"""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(_mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(_mkldnn._is_mkldnn_fp16_supported())
    return False


def cached_pack(weight: torch.Tensor, shape_key: tuple, pack) -> torch.Tensor:
    """pack()'s packed copy of weight for shape_key, made once per weight version (the last
    KEYS_PER_WEIGHT shape keys per weight are kept)."""
    return _cache.get(weight, signature(weight), shape_key, pack)


def prepacked(weight: torch.Tensor, padding, stride, input_shape, groups: int = 1) -> torch.Tensor:
    """weight in oneDNN's blocked layout for this input shape, packed once (per weight version
    and shape; the last KEYS_PER_WEIGHT shapes are kept)."""
    shape = tuple(input_shape)
    return cached_pack(
        weight,
        shape,
        lambda: _mkldnn._reorder_convolution_weight(
            weight.contiguous(), list(padding), list(stride), [1, 1], groups, list(shape)
        ),
    )


_direct_module: list = []  # [the extension, or None]: resolved on first use


def _direct():
    """The extension with its direct oneDNN convolutions, or None (noted once)."""
    if not _direct_module:
        ext = _extension.load()
        if ext is None or not hasattr(ext, "onednn_conv"):
            _backend.note_once(
                ("conv_bn_act", "onednn-direct"),
                "fastcnn: the extension was built without the oneDNN library (the "
                "onednn-cpu-gomp and onednn-devel-cpu-gomp wheels): CPU convolutions go "
                "through torch's mkldnn ops, 20-45 µs slower a call",
            )
            ext = None
        _direct_module.append(ext)
    return _direct_module[0]


def pack_key(x: torch.Tensor, winograd: bool = False) -> tuple:
    """The key of x's packed weight in the pack cache: the two paths pack apart (torch's
    packed tensor, or the direct path's bytes), both per input shape; the direct path's also
    per thread count and per kind (a Winograd pack or oneDNN's; see _direct_pack_key)."""
    shape = tuple(x.shape)
    return _direct_pack_key(shape, winograd) if direct(x) else shape


def _direct_pack_key(shape: tuple, winograd: bool) -> tuple:
    # oneDNN picks the packed layout for the thread count too, and a layout packed for another
    # count may have no optimized kernel at this one (GoogLeNet packed at 2 threads and run at
    # 1: two convs fell back to torch's path for good): a new count packs anew. Read per call,
    # as torch.set_num_threads may change between calls of one plan. A Winograd pack and
    # oneDNN's are kept apart (Winograd switched off, then on again: each pack is still there).
    return ("direct", torch.get_num_threads(), winograd, *shape)


def uses_winograd(input_shape, weight, stride, padding, groups) -> bool:
    """Does the direct path run this conv as Winograd (fastcnn.cpu.winograd)?"""
    return winograd.chosen(input_shape, weight.shape, stride, padding, groups, weight.dtype)


def direct(x: torch.Tensor) -> bool:
    """Does conv_bn_act run x through the direct oneDNN path (fp32, channels innermost)?"""
    return x.dtype == torch.float32 and x.stride(1) == 1 and _direct() is not None


def _channels_last_residual(x, residual, in_place) -> tuple[torch.Tensor | None, bool]:
    """(the residual in x's layout, whether it is still written in place): a residual in
    another layout is copied (see residual_copy_reason; the copy is a new tensor already)."""
    if residual_copy_reason(x, residual) is None:
        return residual, in_place
    return residual.contiguous(memory_format=torch.channels_last), False


def packer(input_shape, stride, padding, groups=1):
    """pack(weight, winograd=None) -> (packed bytes, layout id): the direct path's packed copy
    of a weight for convs of (fp32, channels_last) inputs of input_shape, made once per weight
    version (PackCache): transformed for Winograd where `winograd` says so (None: where
    fastcnn.cpu.winograd chooses it, read once here, so the key and the pack always agree)."""
    pack_weight = _direct().onednn_conv_pack
    shape = tuple(input_shape)
    stride, padding = tuple(stride), tuple(padding)

    def pack(weight, winograd=None):
        if winograd is None:
            winograd = uses_winograd(shape, weight, stride, padding, groups)
        return cached_pack(
            weight,
            _direct_pack_key(shape, winograd),
            lambda: pack_weight(weight, shape, stride, padding, groups, winograd),
        )

    return pack


def _runner(x, weight, stride, padding, groups, relu, out_shape, out_strides, recycle=False):
    """run(x, weight, bias, residual, out) -> out, or None where oneDNN has no optimized kernel
    for these strides: the direct conv for tensors with these tensors' metadata, out None (a
    new tensor of out_shape/out_strides; with recycle, the last one's memory where nothing else
    holds it: alloc.Recycled) or the residual (in place). Per call only the weight's pack
    lookup, the output allocation and the C++ call."""
    conv, pack = _direct().onednn_conv, packer(x.shape, stride, padding, groups)
    w_shape, stride, padding = tuple(weight.shape), tuple(stride), tuple(padding)
    out_shape, out_strides = tuple(out_shape), tuple(out_strides)
    recycled = alloc.Recycled(out_shape, out_strides) if recycle else None

    def run(x, weight, bias, residual, out, winograd=None):
        packed, layout = pack(weight, winograd)
        if out is None:
            if recycled is None:
                out = alloc.empty_strided(out_shape, out_strides, x)
            else:
                out = recycled.get(x)
        if conv(x, packed, layout, w_shape, bias, residual, out, stride, padding, groups, relu):
            return out
        return None

    return run


def _conv_direct(x, weight, bias, stride, padding, residual, relu, in_place, groups, winograd):
    """The direct path's result, or None where oneDNN has no optimized kernel for these
    strides (noted once; the torch path then runs it). A Winograd conv always runs."""
    residual, in_place = _channels_last_residual(x, residual, in_place)
    out_shape = output_shape(x.shape, weight.shape, stride, padding, (1, 1))
    _, c_out, ho, wo = out_shape
    out_strides = (ho * wo * c_out, 1, wo * c_out, c_out)  # channels_last
    run = _runner(x, weight, stride, padding, groups, relu, out_shape, out_strides)
    bias = bias if bias is None else bias.contiguous()  # oneDNN reads it as a dense vector
    y = run(x, weight, bias, residual, residual if in_place else None, winograd)
    if y is None:
        out_strides = residual.stride() if in_place else out_strides
        _backend.note_once(
            ("conv_bn_act", f"onednn-strides-{x.stride()}-{out_strides}"),
            f"fastcnn: oneDNN has no optimized kernel for x strides {x.stride()} and output "
            f"strides {out_strides}: torch's mkldnn op runs this conv (a dense copy first)",
        )
    return y


def bound(x, weight, bias, stride, padding, residual, relu, out_shape, out_strides, groups=1):
    """A run(x, weight, bias, residual, out) through the direct path for later calls whose
    tensors have these tensors' metadata, out None (a new tensor of out_shape/out_strides) or
    the residual (in place), as fastcnn.ops.conv_bn_act.plan promises (see _runner). None where
    the direct path does not take such calls (then the op's own path runs them)."""
    if not direct(x) or x.dtype != weight.dtype or residual_copy_reason(x, residual):
        return None
    if bias is not None and not bias.is_contiguous():
        return None
    direct_run = _runner(x, weight, stride, padding, groups, relu, out_shape, out_strides,
                         recycle=True)  # fmt: skip

    def run(x, weight, bias, residual, out):
        y = direct_run(x, weight, bias, residual, out)
        if y is not None:
            return y
        # no optimized kernel for these strides (the same every call: noted once there)
        in_place = out is not None and out is residual
        return conv_bn_act(x, weight, bias, stride, padding, residual, relu, in_place, groups)

    return run


def residual_copy_reason(x: torch.Tensor, residual: torch.Tensor | None) -> str | None:
    """Why conv_bn_act must copy this residual first, or None. oneDNN writes the result in
    x's layout; through torch's ops a residual in another layout is converted once (compared
    by layout, not with x's strides: the residual has the output's shape)."""
    cl = torch.channels_last
    if residual is None or not x.is_contiguous(memory_format=cl):
        return None
    if residual.is_contiguous(memory_format=cl):
        return None
    return "the residual is not channels_last like x: copied to channels_last first"


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    padding,
    residual: torch.Tensor | None,
    relu: bool,
    in_place: bool = False,
    groups: int = 1,
    winograd: bool | None = None,
) -> torch.Tensor:
    """relu(conv2d(x, weight, bias) + residual) as one oneDNN primitive; returns a new tensor
    (channels_last for a channels_last x), or with in_place=True the residual itself, overwritten
    with the result (as Inductor's CPU path does for ResNet's shortcut: no new allocation, whose
    page faults cost as much as a small conv). Grouped (and depthwise) convolutions are oneDNN's
    groups; dilation=1; a dtype `supports` accepts. winograd: whether the direct path runs it
    as Winograd (None: where fastcnn.cpu.winograd chooses it; a caller that records the kernel
    passes what it recorded)."""
    if direct(x):
        y = _conv_direct(x, weight, bias, stride, padding, residual, relu, in_place, groups,
                         winograd)  # fmt: skip
        if y is not None:
            return y
    w = prepacked(weight, padding, stride, x.shape, groups)
    pad, st, dil = list(padding), list(stride), [1, 1]
    if residual is None:
        return _mkldnn._convolution_pointwise(
            x, w, bias, pad, st, dil, groups, "relu" if relu else "none", [], ""
        )
    residual, in_place = _channels_last_residual(x, residual, in_place)
    if not in_place and residual.shape[2] * residual.shape[3] == 1:
        # torch 2.11's out-of-place binary op fails on a 1x1 output ("could not create a
        # memory"; 2.14's runs it), its in-place form runs it: into a copy of the residual
        residual, in_place = residual.clone(), True
    if in_place:  # the binary add's operand is also its destination: no new output tensor
        return _mkldnn._convolution_pointwise_.binary(
            residual,
            x,
            w,
            bias,
            pad,
            st,
            dil,
            groups,
            "add",
            None,
            "relu" if relu else None,
            [],
            "",
        )
    return _mkldnn._convolution_pointwise.binary(
        x, residual, w, bias, pad, st, dil, groups, "add", None, "relu" if relu else "none", [], ""
    )
