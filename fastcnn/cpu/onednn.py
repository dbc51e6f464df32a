"""Conv + bias (+ residual) + ReLU on the CPU as ONE oneDNN primitive with post-ops.

The bias, the residual add and the ReLU are oneDNN post-ops applied while each output block is
still in registers/cache, instead of eager's separate passes. Two ways to reach oneDNN:

  direct: the extension's own oneDNN calls (csrc/cpu/onednn_conv.cpp, the onednn-cpu-gomp
          wheel's library), fp32 or bf16 with channels innermost: primitives made once per
          shape and layout and kept, input, output and residual read and written through their
          strides.
  torch:  torch.ops.mkldnn._convolution_pointwise, what Inductor's CPU freezing path runs; it
          creates its primitive descriptor on every call. Every other case,
          and all of them where the extension was built without the library (noted once).

Weights are prepacked once per input shape into oneDNN's blocked layout and repacked only when
the weight tensor changes (version counter, storage or shape; inference tensors have no
version counter, so only a new storage or shape counts for them).
"""

from __future__ import annotations

import functools

import torch

from fastcnn import _backend, _extension
from fastcnn.common import alloc
from fastcnn.common.env import onednn_isa_cap
from fastcnn.common.shapes import output_shape, strides_of
from fastcnn.common.weight_cache import WeightCache, signature
from fastcnn.cpu import winograd

_mkldnn = torch.ops.mkldnn


_cache = WeightCache()
_packed = _cache.entries  # tests read it


@functools.cache  # the torch build's and the CPU's answer: asked once
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


def forget_packs(weights) -> None:
    """Drop the packs of these weights (their convs no longer run; packed again if they do)."""
    _cache.forget(weights)


def prepacked(weight: torch.Tensor, padding, stride, input_shape, groups: int = 1) -> torch.Tensor:
    """weight in oneDNN's blocked layout for this input shape (torch's mkldnn path, whose layout
    is opaque: one pack per conv and input shape), packed once per weight version; the last
    KEYS_PER_WEIGHT kept."""
    shape = tuple(input_shape)
    return cached_pack(
        weight,
        ("torch", shape, tuple(stride), tuple(padding), groups),
        lambda: _mkldnn._reorder_convolution_weight(
            weight.contiguous(), list(padding), list(stride), [1, 1], groups, list(shape)
        ),
    )


_extension_module: list = []  # [the extension, or None]: resolved on first use


def linked_extension():
    """The extension when it links the oneDNN library (its direct convolutions), else None
    (noted once)."""
    if not _extension_module:
        ext = _extension.load()
        if ext is None or not hasattr(ext, "onednn_conv"):
            _backend.note_once(
                ("conv_bn_act", "onednn-direct"),
                "fastcnn: the extension was built without the oneDNN library (the "
                "onednn-cpu-gomp and onednn-devel-cpu-gomp wheels): CPU convolutions go "
                "through torch's mkldnn ops, which make a primitive descriptor per call",
            )
            ext = None
        _extension_module.append(ext)
    return _extension_module[0]


def direct(x: torch.Tensor) -> bool:
    """Does a conv of x run through the direct oneDNN path (fp32, or bf16 where oneDNN runs
    it; channels innermost)?"""
    if x.dtype == torch.bfloat16:
        if not supports(torch.bfloat16):
            return False
        if not native_bf16():
            _backend.note_once(
                ("conv_bn_act", "bf16-emulated"),
                "fastcnn: this CPU has no native bf16 (avx512_bf16 or AMX, or oneDNN is capped "
                "below them): oneDNN emulates bf16 convolutions, usually slower than fp32 here",
            )
    elif x.dtype != torch.float32:
        return False
    return x.stride(1) == 1 and linked_extension() is not None


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that keep its native bf16 kernels: the avx512_core_bf16
# level and every one above it (AMX, AVX10)
_BF16_CAPS = ("bf16", "fp16", "amx", "avx10", "default", "all")


def native_bf16() -> bool:
    """Does oneDNN run bf16 natively here (avx512_bf16 or AMX instructions, not capped below
    them)? Without, it emulates bf16 on AVX-512 (and torch runs none on AVX2)."""
    cpu = torch.cpu
    flags = (
        getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    )
    cap = onednn_isa_cap()
    return bool(flags) and (not cap or any(name in cap for name in _BF16_CAPS))


def residual_copy_reason(x: torch.Tensor, residual: torch.Tensor | None) -> str | None:
    """Why the conv must copy this residual first, or None. oneDNN writes the result in x's
    layout; a residual in another layout is converted once (compared by layout, not with x's
    strides: the residual has the output's shape)."""
    cl = torch.channels_last
    if residual is None or not x.is_contiguous(memory_format=cl):
        return None
    if residual.is_contiguous(memory_format=cl):
        return None
    return "the residual is not channels_last like x: copied to channels_last first"


class Packer:
    """pack(weight, use_winograd) -> (packed bytes, layout id): the direct path's packed copy
    of one conv's weight for (dtype, channels_last) inputs of one shape, transformed for
    Winograd when asked (fp32 only). Packs are kept per weight version and layout
    (fastcnn.common.weight_cache), not per shape: every batch size whose layout agrees (oneDNN
    picks it per shape and thread count; most convs have one for every batch size) shares one
    pack. `eligible`: whether Winograd may take this conv (fastcnn.cpu.winograd.eligible;
    whether it does also depends on the switch, winograd.enabled(), read once per call)."""

    __slots__ = ("_layout_of", "_layouts", "_make", "dtype", "eligible", "groups", "padding",
                 "shape", "stride", "w_shape")  # fmt: skip

    def __init__(self, input_shape, weight_shape, stride, padding, groups: int = 1,
                 dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        self.shape, self.stride, self.padding = tuple(input_shape), tuple(stride), tuple(padding)
        self.w_shape, self.groups, self.dtype = tuple(weight_shape), groups, dtype
        self.eligible = dtype == torch.float32 and winograd.eligible(
            self.shape, weight_shape, stride, padding, groups
        )
        ext = linked_extension()
        self._make, self._layout_of = ext.onednn_conv_pack, ext.onednn_conv_layout
        self._layouts: dict[tuple, int] = {}  # (thread count, Winograd?) -> layout id

    def layout(self, use_winograd: bool) -> int:
        """The id of the layout this conv's weight is packed in now. oneDNN picks it for the
        thread count too, which may change between calls (torch.set_num_threads): read per
        call, the layout asked of oneDNN once per count."""
        key = (torch.get_num_threads(), use_winograd)
        found = self._layouts.get(key)
        if found is None:
            found = self._layouts[key] = self._layout_of(
                self.shape,
                self.w_shape,
                self.stride,
                self.padding,
                self.groups,
                use_winograd,
                self.dtype,
            )
        return found

    def __call__(self, weight: torch.Tensor, use_winograd: bool) -> tuple[torch.Tensor, int]:
        layout = self.layout(use_winograd)
        return cached_pack(
            weight, ("direct", layout), lambda: self._pack(weight, use_winograd, layout)
        )

    def _pack(self, weight, use_winograd, layout) -> tuple[torch.Tensor, int]:
        packed, made = self._make(
            weight, self.shape, self.stride, self.padding, self.groups, use_winograd
        )
        if made != layout:  # the key would file it under another layout's pack
            raise RuntimeError(f"fastcnn: packed in layout {made}, {layout} expected")
        return packed, made

    def winograd_now(self) -> bool:
        """Does a call now run this conv as Winograd (eligible, the switch on)?"""
        return self.eligible and winograd.enabled()


class ConvPlan:
    """relu(conv2d(x, weight, bias) + residual) on the CPU for every call whose tensors have the
    metadata of the ones it was made for: which path runs (the direct oneDNN call, Winograd
    among it, or torch's mkldnn op), the output's shape and layout, whether the residual must
    be copied first, all decided once here.

    plan(x, weight, bias, residual, out=None, use_winograd=None) -> the result: a new tensor
    (in out_format; None: channels_last from the direct path, what torch's op gives otherwise;
    with recycle, the last call's output memory where nothing else holds it:
    fastcnn.common.alloc.Recycled), or out, holding the result: written in place where out is
    the residual (any other out gets a copy, the residual left as it was). use_winograd: what
    the caller recorded (None: the switch is read now). Attributes: `copy`, why the residual
    is copied first (or None); `packer`, the direct path's (or None); `kernel(use_winograd)`,
    "winograd" or "onednn", as fastcnn.trace records it.
    """

    __slots__ = (
        "_args",
        "_dense_bias",
        "_format",
        "_out",
        "_recycled",
        "_w_shape",
        "copy",
        "packer",
    )

    def __init__(self, x, weight, bias, stride, padding, groups, residual, relu,
                 out_format=None, recycle=False) -> None:  # fmt: skip
        stride, padding = tuple(stride), tuple(padding)
        self.copy = residual_copy_reason(x, residual)
        # oneDNN reads the bias as a dense vector (the op passes one; other callers may not)
        self._dense_bias = bias is not None and not bias.is_contiguous()
        self._format = out_format
        shape = tuple(output_shape(x.shape, weight.shape, stride, padding, (1, 1)))
        self._out = (shape, strides_of(shape, out_format or torch.channels_last))
        self._recycled = alloc.Recycled(*self._out) if recycle else None
        self._w_shape, self._args = tuple(weight.shape), (stride, padding, groups, relu)
        self.packer = (
            Packer(x.shape, weight.shape, stride, padding, groups, x.dtype) if direct(x) else None
        )

    def kernel(self, use_winograd: bool) -> str:
        return "winograd" if use_winograd else "onednn"

    def pack_key(self, x: torch.Tensor, use_winograd: bool = False) -> tuple:
        """The key under which the weight cache keeps this conv's pack for a call on x now."""
        if self.packer is not None:
            return ("direct", self.packer.layout(use_winograd))
        return ("torch", tuple(x.shape), *self._args[:3])

    def winograd_now(self) -> bool:
        return self.packer is not None and self.packer.winograd_now()

    def __call__(self, x, weight, bias, residual, out=None, use_winograd=None) -> torch.Tensor:
        if self.copy is not None:  # a new tensor already: the result is not written in place
            residual = residual.contiguous(memory_format=torch.channels_last)
        if self._dense_bias:
            bias = bias.contiguous()
        # written in place only into the residual itself, and not into a copy of it
        target = out if out is not None and out is residual and self.copy is None else None
        if self.packer is not None:
            if use_winograd is None:
                use_winograd = self.packer.winograd_now()
            y = self._direct(x, weight, bias, residual, target, use_winograd)
        else:
            y = None
        if y is None:
            y = _torch_conv(x, weight, bias, residual, target is not None, *self._args)
            if target is None and self._format is not None:
                y = y.contiguous(memory_format=self._format)
        if out is not None and y is not out:
            return out.copy_(y)
        return y

    def _direct(self, x, weight, bias, residual, out, use_winograd):
        """The direct call's result, or None where oneDNN has no optimized kernel for these
        strides (noted once; torch's op runs it then). A Winograd conv always runs."""
        packed, layout = self.packer(weight, use_winograd)
        y = out
        if y is None:
            y = self._recycled.get(x) if self._recycled else alloc.empty_strided(*self._out, x)
        conv = linked_extension().onednn_conv
        if conv(x, packed, layout, self._w_shape, bias, residual, y, *self._args):
            return y
        _backend.note_once(
            ("conv_bn_act", f"onednn-strides-{x.stride()}-{y.stride()}"),
            f"fastcnn: oneDNN has no optimized kernel for x strides {x.stride()} and output "
            f"strides {y.stride()}: torch's mkldnn op runs this conv (a dense copy first)",
        )
        return None


def plan(x, weight, bias, stride, padding, groups, residual, relu, out_format=None,
         recycle=False) -> ConvPlan:  # fmt: skip
    """The CPU conv's one entry point (the op, its plans and the Inception block take it): a
    ConvPlan for calls whose tensors have these tensors' metadata; fp32 and the dtypes
    `supports` accepts, dilation 1."""
    return ConvPlan(x, weight, bias, stride, padding, groups, residual, relu, out_format, recycle)


def _torch_conv(x, weight, bias, residual, in_place, stride, padding, groups, relu):
    """torch's mkldnn op (a primitive descriptor per call), the weight prepacked for x's
    shape; with in_place, the residual overwritten with the result."""
    w = prepacked(weight, padding, stride, x.shape, groups)
    pad, st, dil = list(padding), list(stride), [1, 1]
    if residual is None:
        return _mkldnn._convolution_pointwise(
            x, w, bias, pad, st, dil, groups, "relu" if relu else "none", [], ""
        )
    # torch's in-place binary op falls back to aten's add_relu_ for a bf16/fp16 NCHW x, which
    # has no kernel for them ("Unsupported datatype for add_relu"): out of place, then copied
    in_place_runs = x.dtype == torch.float32 or x.is_contiguous(memory_format=torch.channels_last)
    if in_place and not in_place_runs:
        y = _torch_conv(x, weight, bias, residual, False, stride, padding, groups, relu)
        return residual.copy_(y)
    if not in_place and in_place_runs and residual.shape[2] * residual.shape[3] == 1:
        # torch 2.11's out-of-place binary op fails on a 1x1 output ("could not create a
        # memory"; 2.14's runs it), its in-place form runs it: into a copy of the residual
        residual, in_place = residual.clone(), True
    if in_place:  # the binary add's operand is also its destination: no new output tensor
        return _mkldnn._convolution_pointwise_.binary(
            residual, x, w, bias, pad, st, dil, groups, "add", None, "relu" if relu else None,
            [], "",
        )  # fmt: skip
    return _mkldnn._convolution_pointwise.binary(
        x, residual, w, bias, pad, st, dil, groups, "add", None, "relu" if relu else "none", [], ""
    )
