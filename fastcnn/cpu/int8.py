"""int8 conv + bias (+ residual) (+ ReLU) + requantize on the CPU as ONE oneDNN primitive. Two
ways to reach oneDNN, as for fp32 (fastcnn.cpu.onednn):

  direct: the extension's own oneDNN calls (csrc/cpu/onednn_qconv.cpp): primitives made once per
          shape and kept, scales and zero points passed per call, the weight packed once per
          layout (shared by every batch size whose layout agrees), the residual added as a sum
          post-op over the output's buffer. Dense tensors only (oneDNN's int8 convs take no
          channel slice: a concat's slice gets a copy of the dense result).
  torch:  torch's oneDNN quantized conv ops, as Inductor's x86 int8 path runs them
          (torch.ops.onednn.qconv_pointwise, and its binary "sum" variant for the residual),
          which make a primitive descriptor, scratchpad and output on every call. Where the
          extension was built without the oneDNN library (noted), or oneDNN has no optimized
          direct kernel for the strides (noted).

oneDNN picks its kernel for the CPU at run time: AMX tiles (Sapphire Rapids and later), AVX-512
VNNI (vpdpbusd, Cascade Lake and later), AVX-VNNI, else AVX2/AVX-512 without VNNI, and less
where ONEDNN_MAX_CPU_ISA caps it (so a tiny conv probes what it runs: isa()). Without VNNI,
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

from fastcnn import _backend, _extension, _trace
from fastcnn.common import alloc
from fastcnn.common.dispatch import can_skip_dispatcher
from fastcnn.common.env import onednn_isa_cap
from fastcnn.common.shapes import output_shape, strides_of
from fastcnn.common.weight_cache import WeightCache
from fastcnn.common.weight_cache import signature as weight_signature
from fastcnn.cpu import onednn

_onednn = torch.ops.onednn
# The overloads themselves: resolving a packet's overload costs microseconds on every call.
_qconv = _onednn.qconv_pointwise.default
_qconv_sum = _onednn.qconv2d_pointwise.binary
_CL = torch.channels_last

# |weight| bound below which vpmaddubsw's int16 pair sums cannot saturate: 255 * 63 * 2 < 32767.
NO_VNNI_WEIGHT_MAX = 63


VNNI_ISAS = ("amx", "avx512_vnni", "avx_vnni")


@functools.cache
def cpu_isa() -> str:
    """The CPU's best int8 instruction set: "amx", "avx512_vnni", "avx_vnni", "avx512" or
    "avx2" (no VNNI), "unknown" (no CPU flags to read), or "none" (no oneDNN). Read from
    /proc/cpuinfo (Linux). oneDNN may run less (isa())."""
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
    if not flags:  # not Linux on x86: what oneDNN runs is the probe's to say (has_vnni)
        return "unknown"
    for flag, name in (
        ("amx_int8", "amx"),
        ("avx512_vnni", "avx512_vnni"),
        ("avx_vnni", "avx_vnni"),
        ("avx512bw", "avx512"),
    ):
        if flag in flags:
            return name
    return "avx2"


PROBE_CHANNELS = 64


@functools.cache
@torch.compiler.disable  # run once for real, never traced into a graph
def pairs_saturate() -> bool:
    """Does an int8 conv kernel oneDNN runs here saturate u8 x s8 pair sums? The CPU's flags
    do not say: ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA (or a oneDNN that lacks the CPU's ISA)
    make it run a kernel without VNNI on a CPU with VNNI. Probed once on each oneDNN int8
    convs can run on (torch's, and the extension's direct one: two libraries): a 1x1 conv of
    255s with 127s over PROBE_CHANNELS channels sums 255 * 127 * 64 exactly with VNNI or AMX,
    and half of that (32 pair sums saturated at 32767) without."""
    c = PROBE_CHANNELS
    x = torch.full((1, c, 1, 1), 255, dtype=torch.uint8).contiguous(memory_format=_CL)
    w = torch.full((1, c, 1, 1), 127, dtype=torch.int8).contiguous(memory_format=_CL)
    ws, zps = torch.ones(1), torch.zeros(1, dtype=torch.long)
    exact = 255 * 127 * c
    packed = _onednn.qconv_prepack(w, ws, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, [1, c, 1, 1])
    y = _qconv(x, 1.0, 0, packed, ws, zps, None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0,
               torch.float32, "none", [], "")  # fmt: skip
    if y.item() != exact:
        return True
    ext = direct_extension()
    if ext is None:
        return False
    # The direct kernels want a few output channels and pixels (a 1x1 image of 1 channel may
    # get none); a uint8 output cannot hold the sum: divided by 2**13 (253 exact, 128
    # saturated). Where no kernel runs the probe, saturation is assumed (7-bit weights stay
    # exact either way).
    x = torch.full((1, c, 4, 4), 255, dtype=torch.uint8).contiguous(memory_format=_CL)
    w = torch.full((16, c, 1, 1), 127, dtype=torch.int8).contiguous(memory_format=_CL)
    out = torch.empty(1, 16, 4, 4, dtype=torch.uint8).contiguous(memory_format=_CL)
    ws = torch.ones(16)
    ran = _direct(ext, x, 1.0, 0, w, ws, None, (1, 1), (0, 0), False, 8192.0, 0, out)
    if not ran:
        _backend.note_once(
            ("int8", "direct-probe"),
            "fastcnn: the extension's oneDNN ran no int8 kernel for the saturation probe: "
            "its u8 x s8 pair sums are taken to saturate (7-bit weights run exactly)",
        )
    return not ran or bool((out != round(exact / 8192)).any())


@functools.cache
def _probe_failure() -> str | None:
    """Why oneDNN's int8 conv cannot run here (the probe raised), or None."""
    try:
        pairs_saturate()
    except RuntimeError as exc:
        return f"oneDNN's int8 conv failed a 1x1 probe ({exc})"
    return None


def _capped_isa() -> str:
    """The ISA oneDNN runs where the probe saturates on a VNNI CPU: the cap the environment
    sets (lower case, as oneDNN names it: "avx2", "avx512_core", ...), else "no_vnni"."""
    return onednn_isa_cap() or "no_vnni"


@functools.cache
def isa() -> str:
    """The int8 instruction set oneDNN runs here (what the trace shows): the CPU's (cpu_isa),
    except "none" where the probe cannot run (a note says why) and the cap's name where the
    probe finds a VNNI CPU's pair sums saturating (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA)."""
    found = cpu_isa()
    if found == "none":
        return found
    failure = _probe_failure()
    if failure is not None:
        _backend.note_once(("int8", "probe"), f"fastcnn: {failure}; int8 convs run the reference")
        return "none"
    return _capped_isa() if found in VNNI_ISAS and pairs_saturate() else found


def has_vnni() -> bool:
    """Does oneDNN's int8 kernel here sum u8 x s8 pairs exactly (VNNI or AMX)? Probed: a CPU
    whose flags say VNNI but whose oneDNN runs without it answers False."""
    return isa() != "none" and not pairs_saturate()


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


def direct_extension():
    """The extension when it runs int8 convs on its own oneDNN (onednn_qconv), else None
    (noted once: by fastcnn.cpu.onednn without the library, here for a build without them)."""
    ext = onednn.linked_extension()
    if ext is not None and not hasattr(ext, "onednn_qconv"):
        _backend.note_once(
            ("qconv_bn_act", "onednn-direct"),
            "fastcnn: the extension has no direct int8 convs (built from older sources?): "
            "int8 convs go through torch's quantized conv ops",
        )
        return None
    return ext


# Direct packs per (weight, layout): scales are passed per call, so a pack depends on the
# weight's values alone (and, through its layout, on whether the input has a zero point).
_direct_packs = WeightCache()


@functools.lru_cache(maxsize=4096)
def _direct_layout(x_shape, w_shape, stride, padding, src_zp: bool, threads: int) -> int:
    """The id of the layout oneDNN packs this conv's weight in at this thread count (asked of
    oneDNN once per conv shape and count)."""
    return direct_extension().onednn_qconv_layout(x_shape, w_shape, stride, padding, src_zp)


def direct_pack(weight, x_shape, stride, padding, src_zp: bool) -> tuple[torch.Tensor, int]:
    """(weight packed for the direct int8 conv, its layout id), made once per weight version
    and layout: every batch size whose layout agrees shares it."""
    stride, padding, shape = tuple(stride), tuple(padding), tuple(x_shape)
    layout = _direct_layout(shape, tuple(weight.shape), stride, padding, src_zp,
                            torch.get_num_threads())  # fmt: skip
    return _cached_direct_pack(weight, shape, stride, padding, src_zp, layout)


def _cached_direct_pack(weight, shape, stride, padding, src_zp, layout) -> tuple[torch.Tensor, int]:
    def pack():
        packed, made = direct_extension().onednn_qconv_pack(weight, shape, stride, padding, src_zp)
        if made != layout:  # the key would file it under another layout's pack
            raise RuntimeError(f"fastcnn: int8 weight packed in layout {made}, {layout} expected")
        return packed, made

    return _direct_packs.get(weight, weight_signature(weight), ("direct", layout), pack)


def _direct(ext, x, xs, xz, weight, ws, bias, stride, padding, relu, os_, oz, out,
            sum_residual=False, rs=1.0, rz=0) -> bool:  # fmt: skip
    """The direct int8 conv into out (holding the residual where sum_residual); False, out
    untouched, where oneDNN has no optimized kernel for these strides."""
    packed, layout = direct_pack(weight, x.shape, stride, padding, xz != 0)
    return ext.onednn_qconv(x, xs, xz, packed, layout, weight.shape, ws, bias, sum_residual,
                            rs, rz, out, stride, padding, relu, os_, oz)  # fmt: skip


def _no_kernel(x: torch.Tensor, out: torch.Tensor) -> str:
    """Why torch's op runs a conv the direct path was asked (noted once per strides)."""
    why = (
        f"oneDNN has no optimized int8 kernel for this conv's shapes, strides ({x.stride()} "
        f"-> {out.stride()}) or post-ops: torch's quantized conv op runs it"
    )
    _backend.note_once(("qconv_bn_act", f"onednn-strides-{x.stride()}-{out.stride()}"),
                       f"fastcnn: {why}")  # fmt: skip
    return why


def qconv_bn_act(
    x, x_scale, x_zp, weight, weight_scale, bias, stride, padding, residual, r_scale, r_zp,
    relu, out_scale, out_zp, accumulate_into: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, str | None]:  # fmt: skip
    """The int8 op through oneDNN: (the result, why torch's op ran it instead of the direct
    primitive or None). The result is a new uint8 tensor (channels_last), or out (without
    a residual, where it is a dense channels_last tensor: oneDNN's int8 convs write no channel
    slice, the caller copies into one), or with accumulate_into (a channels_last uint8 tensor
    holding the residual's values) the result written over it in place. A residual without
    accumulate_into is copied first."""
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None and accumulate_into is None:
        accumulate_into = residual.contiguous(memory_format=torch.channels_last)
        if accumulate_into is residual:
            accumulate_into = residual.clone(memory_format=torch.channels_last)
    ext = direct_extension()
    if ext is not None:
        if residual is not None:
            y = accumulate_into
        elif out is not None and out.is_contiguous(memory_format=_CL):
            y = out  # oneDNN's int8 convs take dense tensors only: a slice gets a copy
        else:
            y = alloc.new_output(x, output_shape(x.shape, weight.shape, stride, padding, (1, 1)))
        if _direct(ext, x, x_scale, x_zp, weight, weight_scale, bias, stride, padding, relu,
                   out_scale, out_zp, y, residual is not None, r_scale, r_zp):  # fmt: skip
            return y, None
        why = _no_kernel(x, y)
    else:  # noted once, as for fp32: the whole process runs torch's ops, not this conv
        why = None
    y = _torch_qconv(x, x_scale, x_zp, weight, weight_scale, bias, stride, padding,
                     accumulate_into, r_scale, r_zp, relu, out_scale, out_zp)  # fmt: skip
    return y, why


def _torch_qconv(x, xs, xz, weight, ws, bias, stride, padding, accumulate_into, rs, rz, relu,
                 os_, oz) -> torch.Tensor:  # fmt: skip
    """torch's oneDNN int8 op: a new tensor, or the result over accumulate_into (the residual)."""
    w = prepacked(weight, ws, xs, xz, stride, padding, x.shape)
    zps = _weight_zero_points(weight.shape[0])
    st, pad, dil = list(stride), list(padding), [1, 1]
    act = "relu" if relu else "none"
    if accumulate_into is None:
        return _qconv(x, xs, xz, w, ws, zps, bias, st, pad, dil, 1, os_, oz, torch.uint8, act,
                      [], "")  # fmt: skip
    # The op writes the result over accumulate_into and returns a copy of it (its schema must
    # not return an alias): the buffer it wrote is the result, the copy is dropped.
    _qconv_sum(
        x, xs, xz, w, ws, zps, accumulate_into, bias, st, pad, dil, 1, os_, oz, torch.uint8,
        rs, rz, "sum", 1.0, act, [], "",
    )  # fmt: skip
    return accumulate_into


def plan(
    x, weight, weight_scale, bias, stride, padding, relu, qparams, residual, in_place, events,
) -> Callable | None:  # fmt: skip
    """A plan for later calls like this one (same shapes and strides): run(x, residual, weight,
    weight_scale, bias, qparams) -> the uint8 result, or None when those are no longer the
    tensors and qparams planned for (take the op again). It records `events` (what the op
    recorded for this call) and runs the one oneDNN primitive (the direct one where it runs
    these strides), with the weight packed once per weight version (the plan itself holds no
    pack). None where such calls must always take the op (x not channels_last: the op
    converts it).

    qparams: ((x_scale, x_zp), (out_scale, out_zp), (residual_scale, residual_zp)).
    in_place: the residual's buffer becomes the result (it must be channels_last), else a copy
    of the residual is made first (oneDNN's sum post-op overwrites its operand). Without a
    residual the output's memory is recycled between calls (fastcnn.common.alloc.Recycled)."""
    if not x.is_contiguous(memory_format=_CL):
        return None
    if residual is not None and in_place and not residual.is_contiguous(memory_format=_CL):
        return None
    (xs, xz), (os_, oz), (rs, rz) = qparams
    events = tuple(events)
    ext = direct_extension()
    if ext is not None:
        return _direct_plan(ext, x, weight, weight_scale, bias, stride, padding, relu, qparams,
                            residual, in_place, events)  # fmt: skip
    record = _trace.record

    def run(x, residual, w, ws, b, q):
        if w is not weight or ws is not weight_scale or b is not bias or q != qparams:
            return None
        for event in events:
            record(*event)
        acc = None
        if residual is not None:
            acc = residual if in_place else residual.clone(memory_format=_CL)
        return _torch_qconv(x, xs, xz, w, ws, b, stride, padding, acc, rs, rz, relu, os_, oz)

    return run


def _direct_plan(ext, x, weight, weight_scale, bias, stride, padding, relu, qparams, residual,
                 in_place, events) -> Callable:  # fmt: skip
    """plan()'s run on the direct path: everything but the pack lookup (per weight version)
    and the layout (per thread count) resolved here, so that a call costs little more than
    oneDNN's own execution (the planned call of a batch-1 model runs ~50 convs)."""
    (xs, xz), (os_, oz), (rs, rz) = qparams
    stride, padding, shape = tuple(stride), tuple(padding), tuple(x.shape)
    w_shape, src_zp, sums = tuple(weight.shape), xz != 0, residual is not None
    out_shape = output_shape(shape, w_shape, stride, padding, (1, 1))
    recycled = None if sums else alloc.Recycled(out_shape, strides_of(out_shape, _CL))
    layouts: dict[int, int] = {}  # thread count -> layout id
    conv, threads, active, record = (
        ext.onednn_qconv,
        torch.get_num_threads,
        _trace.active,
        _trace.record,
    )

    def run(x, residual, w, ws, b, q):
        if w is not weight or ws is not weight_scale or b is not bias or q != qparams:
            return None
        if active():
            for event in events:
                record(*event)
        layout = layouts.get(threads())
        if layout is None:
            layout = layouts[threads()] = _direct_layout(shape, w_shape, stride, padding, src_zp,
                                                         threads())  # fmt: skip
        packed = _cached_direct_pack(w, shape, stride, padding, src_zp, layout)[0]
        if sums:
            acc = residual if in_place else residual.clone(memory_format=_CL)
        else:
            acc = recycled.get(x)
        if conv(x, xs, xz, packed, layout, w_shape, ws, b, sums, rs, rz, acc, stride, padding,
                relu, os_, oz):  # fmt: skip
            return acc
        # no optimized kernel: torch's op (acc, the residual, is untouched); the op's first
        # call fell back the same way and recorded it (events)
        _no_kernel(x, acc)
        return _torch_qconv(x, xs, xz, w, ws, b, stride, padding, acc if sums else None, rs, rz,
                            relu, os_, oz)  # fmt: skip

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
