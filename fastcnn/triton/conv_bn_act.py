"""conv2d + folded-BN bias (+ residual) (+ ReLU) as one Triton implicit GEMM, NHWC first.

GEMM view: M = N*Ho*Wo output pixels, N = Cout, K = KH*KW*Cin. No im2col buffer: each program
loads its [BLOCK_M, BLOCK_K] input tile straight from x through x's strides (zero outside the
padding) and its [BLOCK_K, BLOCK_N] weight tile through the weight's strides, accumulates in fp32
with tl.dot, then in the epilogue adds the bias and the residual tile, applies ReLU, casts, and
does the only store, through out's strides (so out may be a channel slice of a larger tensor).

Two K orders, chosen per call, each ONE loop (so Triton's pipeliner prefetches across taps: a
3x3 conv with 64 input channels and BLOCK_K 64 has 9 pipelined iterations, not 1 per tap):
- per tap (FLAT_K=False): iteration i is channel chunk i % n_chunks of tap i // n_chunks; the
  channel loads are contiguous in NHWC. A 1x1 stride-1 conv is exactly the GEMM [N*H*W, Cin] x
  [Cin, Cout].
- flat (FLAT_K=True): K walked as one (kh, kw, cin) index, for small Cin (the 7x7 stem has 3
  channels), where per-tap chunks of BLOCK_K would be mostly padding.

Grouped convolutions (depthwise included) run one GEMM per group in the same launch: the
grid's second axis is the group, and each program offsets x, the weight, bias, residual and
out by its group's channels.

Two extras serve the fused Inception block (fastcnn/ops/inception.py):
- POOL=P (1x1 convs only): the input tile is the max over a PxP window (stride 1, padding P//2)
  of x, so max-pool -> 1x1 conv never writes the pooled tensor;
- HAS_SPLIT: output columns >= SPLIT_N are stored to a second tensor, so one GEMM over the
  concatenated weights of several 1x1 convs on the same input writes each conv's result to its
  own destination.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading

import torch
import triton
import triton.language as tl

from fastcnn.common.env import interpreting
from fastcnn.triton._common import conv_meta, gemm_tile, output_pixels

# Hopper-leaning configs (H100/H200): large tiles with 3-4 stages feed wgmma; smaller ones cover
# narrow layers (Cout 16-64) and small M. Keyed on the GEMM shape, tuned once per GPU and kept.
# fastcnn.triton.compile_check compiles each for sm_80 and sm_90: none spills registers (a
# 128x128 fp32 accumulator needs 8 warps: with 4, or a 128x256 tile with 8, it spills), and
# configs over a GPU's shared memory are pruned there (configs_that_fit).
_GPU_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s
    )
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 4),
        (128, 128, 64, 8, 3),
        (64, 256, 64, 8, 3),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 8, 4),
        (64, 64, 64, 4, 4),
        (128, 128, 32, 8, 4),
        (64, 32, 32, 4, 5),
        (32, 64, 32, 4, 5),
    ]
]  # fmt: skip


def _interpreter_config(m: int, c_out: int, c_in: int, flat_k: bool, k_taps: int) -> dict:
    """The interpreter runs every program and loop step in Python over numpy blocks, so few,
    large blocks are fastest there (a 64-channel 3x3 conv at 32x32 on a 2-core CPU: 6.1 s with
    32x32x16 blocks, 0.3 s with 128x64x64): each block as large as its dimension, up to 256."""
    k = c_in * k_taps if flat_k else c_in
    return {
        "BLOCK_M": min(256, max(16, triton.next_power_of_2(m))),
        "BLOCK_N": min(256, max(16, triton.next_power_of_2(c_out))),
        "BLOCK_K": min(256, max(16, triton.next_power_of_2(k))),
        "GROUP_M": 8,
    }


# Below this many input channels the flat K order wastes less of each BLOCK_K chunk.
_FLAT_K_BELOW = 32


@triton.jit
def _conv_bn_act_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, out2_ptr,
    M, N_OUT, C_IN, H, W, HO, WO, SPLIT_N,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    srn, src, srh, srw,
    son, soc, soh, sow,
    s2n, s2c, s2h, s2w,
    M_BUCKET,  # next power of two of M: an autotuning key only
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    FLAT_K: tl.constexpr, POOL: tl.constexpr, HAS_SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = gemm_tile(M, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    # A grouped convolution is one GEMM per group in the same launch: program_id(1) is the
    # group, C_IN and N_OUT its own channel counts, its channels at these offsets.
    conv_group = tl.program_id(1)
    x_ptr += conv_group * C_IN * sxc
    w_ptr += conv_group * N_OUT * swo
    b_ptr += conv_group * N_OUT
    r_ptr += conv_group * N_OUT * src
    out_ptr += conv_group * N_OUT * soc

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N_OUT
    img, ho, wo, hi0, wi0 = output_pixels(offs_m, HO, WO, STRIDE_H, STRIDE_W, PAD_H, PAD_W)
    x_img = x_ptr + img * sxn  # [BLOCK_M] pointers to each output pixel's image
    w_cols = w_ptr + offs_n * swo  # [BLOCK_N] pointers to each output channel's filter

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT_K:
        K = C_IN * KH * KW
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            ci = k % C_IN
            kw = (k // C_IN) % KW
            kh = k // (C_IN * KW)
            hi = hi0[:, None] + kh[None, :]
            wi = wi0[:, None] + kw[None, :]
            a_mask = (
                mask_m[:, None] & (k[None, :] < K) & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
            )
            a = tl.load(
                x_img[:, None] + ci[None, :] * sxc + hi * sxh + wi * sxw, mask=a_mask, other=0.0
            )
            b_ptrs = w_cols[None, :] + ci[:, None] * swi + kh[:, None] * swh + kw[:, None] * sww
            b = tl.load(b_ptrs, mask=(k[:, None] < K) & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        n_chunks = tl.cdiv(C_IN, BLOCK_K)
        for it in range(0, KH * KW * n_chunks):  # (tap, channel chunk) as one pipelined loop
            tap = it // n_chunks
            ci = (it - tap * n_chunks) * BLOCK_K + offs_k
            kh = tap // KW
            kw = tap - kh * KW
            hi = hi0 + kh
            wi = wi0 + kw
            ci_ok = ci < C_IN
            if POOL:
                a = _max_pool_tile(x_img, hi, wi, ci, ci_ok, mask_m, H, W,
                                   sxc, sxh, sxw, POOL, BLOCK_M, BLOCK_K)  # fmt: skip
            else:
                row_ok = mask_m & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                a = tl.load(
                    (x_img + hi * sxh + wi * sxw)[:, None] + ci[None, :] * sxc,
                    mask=row_ok[:, None] & ci_ok[None, :],
                    other=0.0,
                )
            b = tl.load(
                (w_cols + kh * swh + kw * sww)[None, :] + ci[:, None] * swi,
                mask=ci_ok[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # Epilogue in fp32 registers: bias, residual, ReLU, one cast, the only store.
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        r_rows = r_ptr + img * srn + ho * srh + wo * srw
        acc += tl.load(r_rows[:, None] + offs_n[None, :] * src, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as in torch.relu
    val = acc.to(out_ptr.dtype.element_ty)
    o_rows = out_ptr + img * son + ho * soh + wo * sow
    if HAS_SPLIT:
        first = (offs_n < SPLIT_N)[None, :]
        tl.store(o_rows[:, None] + offs_n[None, :] * soc, val, mask=mask & first)
        o2_rows = out2_ptr + img * s2n + ho * s2h + wo * s2w
        tl.store(o2_rows[:, None] + (offs_n - SPLIT_N)[None, :] * s2c, val, mask=mask & ~first)
    else:
        tl.store(o_rows[:, None] + offs_n[None, :] * soc, val, mask=mask)


@triton.jit
def _max_pool_tile(x_img, hi, wi, ci, ci_ok, mask_m, H, W, sxc, sxh, sxw,
                   POOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """[BLOCK_M, BLOCK_K] of max_pool2d(x, POOL, stride=1, padding=POOL // 2) at (hi, wi):
    the pooled tensor is computed in registers and never stored."""
    best = tl.full((BLOCK_M, BLOCK_K), float("-inf"), tl.float32)
    for ph in tl.static_range(POOL):
        h = hi + ph - POOL // 2
        for pw in tl.static_range(POOL):
            w = wi + pw - POOL // 2
            ok = mask_m & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            v = tl.load(x_img[:, None] + ci[None, :] * sxc + (h * sxh + w * sxw)[:, None],
                        mask=ok[:, None] & ci_ok[None, :], other=float("-inf"))  # fmt: skip
            best = tl.maximum(best, v.to(tl.float32))
    # The centre is always inside, so only masked rows/channels are still -inf: zero them.
    best = tl.where(mask_m[:, None] & ci_ok[None, :], best, 0.0)
    return best.to(x_img.dtype.element_ty)


def _autotune_enabled() -> bool:
    """FASTCNN_TRITON_AUTOTUNE=0 uses heuristic_config instead of timing every config: quick
    starts, and test runs that compile each shape once rather than once per config."""
    return os.environ.get("FASTCNN_TRITON_AUTOTUNE", "1") not in ("0", "false", "off")


# Shared memory a block may opt into, by compute capability (CUDA's per-block maximum): configs
# that need more are pruned for that GPU rather than left to fail at launch.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def shared_memory_bytes(
    cfg: dict, num_stages: int, element_size: int, capability: int, pool: int = 0
) -> int:
    """Shared memory of a config: buffers of the A [BLOCK_M, BLOCK_K] and B [BLOCK_K, BLOCK_N]
    tiles, num_stages of them on sm_90 (wgmma reads its operands from shared memory) and
    num_stages - 1 before; with a fused POOLxPOOL max-pool each of its POOL^2 A loads is
    pipelined on its own. (What Triton's pipeliner allocates: fastcnn.triton.compile_check
    asserts this is never below the compiler's own figure.)"""
    a_tiles = pool * pool if pool else 1
    tiles = a_tiles * cfg["BLOCK_M"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_N"]
    buffers = num_stages if capability >= 90 else max(1, num_stages - 1)
    return buffers * tiles * element_size + _SHARED_SLACK


# Shared memory Triton adds beside the pipelined tiles (barriers, layout conversions): up to
# 4 KB seen (fp32, fused pool, sm_80); 8 KB keeps the estimate above the compiler's figure.
_SHARED_SLACK = 8192


def configs_that_fit(
    configs: list,
    element_size: int,
    capability: int,
    limit: int,
    pool: int = 0,
    flat_k: bool = False,
) -> list:
    """The configs whose shared memory fits `limit` (none may), without the ones that spill
    registers on that target under Triton 3.6 or 3.8 (fastcnn.triton.compile_check --all, run
    in CI under both):
    - the flat K loop's per-element (kh, kw, cin) index math spills beside an accumulator of
      more than 16 registers a thread (32 in fp16/bf16 was enough for Triton 3.8, not 3.6);
    - before sm_90, mma.sync holds its fp32 (tf32) operand fragments in registers: a 64-register
      accumulator with BLOCK_K = 64 spills under Triton 3.6 (BLOCK_K = 32 does not)."""
    if flat_k:
        configs = [c for c in configs if _accumulator_registers(c) <= 16]
    if element_size == 4 and capability < 90:
        configs = [c for c in configs if _accumulator_registers(c) * c.kwargs["BLOCK_K"] <= 2048]

    def size(c):
        return shared_memory_bytes(c.kwargs, c.num_stages, element_size, capability, pool)

    return [c for c in configs if size(c) <= limit]


def _accumulator_registers(c) -> int:
    """fp32 accumulator registers per thread of a config."""
    return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)


@functools.cache
def _device_limits(device: int) -> tuple[int, int]:
    """(compute capability as 80/90/..., shared memory a block may opt into) of a GPU."""
    props = triton.runtime.driver.active.utils.get_device_properties(device)
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor, props["max_shared_mem"]


def _prune_to_device(configs, named_args, **kwargs):
    """The autotuner's early_config_prune: only configs this GPU's shared memory holds."""
    x = named_args["x_ptr"]
    capability, limit = _device_limits(x.device.index or 0)
    pool, flat_k = kwargs.get("POOL", 0), kwargs.get("FLAT_K", False)
    fit = configs_that_fit(configs, x.element_size(), capability, limit, pool, flat_k)
    if fit:
        return fit
    # none fits (fp32 with a fused pool on a GPU with 163 KB): the heuristic shrinks until one does
    m, c_out, c_in = named_args["M"], named_args["N_OUT"], named_args["C_IN"]
    cfg = heuristic_config(m, c_out, c_in, x.element_size(), capability, limit, pool, flat_k)
    stages, warps = cfg.pop("num_stages"), cfg.pop("num_warps")
    return [triton.Config(cfg, num_warps=warps, num_stages=stages)]


def heuristic_config(
    m: int,
    c_out: int,
    c_in: int,
    element_size: int,
    capability: int,
    limit: int,
    pool: int = 0,
    flat_k: bool = False,
) -> dict:
    """The config FASTCNN_TRITON_AUTOTUNE=0 uses (and the autotuner when no config fits): of the
    configs that fit this GPU (the ones compile_check proves), the one nearest to tiles sized by
    the GEMM; with none fitting (fp32 with a fused pool on a 163 KB GPU), the smallest with
    fewer stages."""
    want = (128 if m >= 4096 else 64, 128 if c_out >= 128 else 64, 64 if c_in >= 64 else 32)
    fit = configs_that_fit(_GPU_CONFIGS, element_size, capability, limit, pool, flat_k)

    def distance(c):
        tiles = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
        return sum(abs(math.log2(t / w)) for t, w in zip(tiles, want, strict=True)), -c.num_stages

    if fit:
        best = min(fit, key=distance)
        return {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}

    def size(cfg, stages):
        return shared_memory_bytes(cfg, stages, element_size, capability, pool)

    smallest = min(_GPU_CONFIGS, key=lambda c: size(c.kwargs, c.num_stages))
    stages = smallest.num_stages
    while stages > 2 and size(smallest.kwargs, stages) > limit:
        stages -= 1
    return {**smallest.kwargs, "num_warps": smallest.num_warps, "num_stages": stages}


_AUTOTUNE_KEY = ["M_BUCKET", "N_OUT", "C_IN", "KH", "KW", "STRIDE_H", "FLAT_K", "POOL"]
_tuned_kernels: dict[bool, object] = {}


def _gpu_kernel(in_place: bool):
    """The autotuned kernel, made on first GPU use (the autotuner times configs on the GPU).

    in_place (out is the residual): every timed config would add onto the previous one's
    result, so the residual is saved and restored around each; other calls skip that copy.
    Tuned configs are kept on disk (Triton's cache, keyed by Triton version, GPU architecture,
    kernel source and tuning key), so a second process tunes nothing."""
    if in_place not in _tuned_kernels:
        cache = {"cache_results": True} if _AUTOTUNE_CACHES else {}
        _tuned_kernels[in_place] = triton.autotune(
            configs=_GPU_CONFIGS,
            key=_AUTOTUNE_KEY,
            prune_configs_by={"early_config_prune": _prune_to_device},
            restore_value=["r_ptr"] if in_place else None,
            **cache,
        )(_conv_bn_act_kernel)
    return _tuned_kernels[in_place]


# Triton's autotuner keeps results on disk when asked (Triton 3.3 and later).
_AUTOTUNE_CACHES = "cache_results" in inspect.signature(triton.autotune).parameters


def _tf32_allowed() -> bool:
    """torch.backends.cudnn.allow_tf32, read from the C flag it sets (a fifth of the host time
    of the module attribute, which a planned launch reads on every fp32 call)."""
    return torch._C._get_cudnn_allow_tf32()


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows cuDNN's switch, as torch's own conv2d does (TF32 on by default there).
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


class _Launch:
    """Everything about a launch that depends only on (shapes, strides, dtype, device, flags,
    pointer alignment): the integer arguments, the constexprs, the grid and, after the first
    launch on a GPU, the compiled kernel, launched directly from then on (no autotuner lookup,
    no JIT argument binding: the first launch went through both with these same arguments)."""

    __slots__ = ("compiled", "config", "grid", "groups", "ints", "meta", "tail")

    def __init__(self, ints: tuple, meta: dict, grid, config: dict | None, groups: int = 1):
        self.ints, self.meta, self.grid, self.config = ints, meta, grid, config
        self.groups = groups
        self.compiled = None
        self.tail: tuple = ()

    def launch(self, pointers: tuple, in_place: bool) -> None:
        compiled = self.compiled
        if compiled is not None and knobs_allow_direct_launch():
            stream = _current_stream(pointers[4].device.index)
            compiled.run(self.grid[0], self.groups, 1, stream, compiled.function,
                         compiled.packed_metadata, None, None, None, *pointers,
                         *self.tail)  # fmt: skip
            direct_launches[0] += 1
            return
        if self.config is None:  # autotuned: the tuner picks (once per key) and launches
            tuner = _gpu_kernel(in_place)
            # best_config belongs to the shared tuner: read it before another thread's call
            # with another key sets it (a _Launch would pair this kernel with that grid)
            with _tune_lock:
                compiled = tuner[self._grid_of](*pointers, *self.ints, **self.meta)
                config = {**tuner.best_config.kwargs} if compiled is not None else None
            if compiled is None:  # nothing compiled (fastcnn.triton.precompile recording)
                return
        else:
            config = self.config
            grid = self._grid_of(config)
            compiled = _conv_bn_act_kernel[grid](*pointers, *self.ints, **self.meta, **config)
        self.grid = self._grid_of(config)
        if _can_launch_directly(compiled):
            block = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
            self.tail = (*self.ints, *self.meta.values(), *block.values())
            self.compiled = compiled

    def _grid_of(self, cfg: dict) -> tuple[int, int]:
        m, c_out = self.ints[0], self.ints[1]  # c_out: per group
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c_out, cfg["BLOCK_N"]), self.groups)


direct_launches = [0]  # how many launches skipped the JIT (tests read it)
_tune_lock = threading.Lock()
_launches: dict[tuple, _Launch] = {}


def knobs_allow_direct_launch() -> bool:
    """Direct launches pass no launch metadata: with a profiler's launch hook installed, or
    FASTCNN_TRITON_DIRECT_LAUNCH=0, every launch goes through Triton's JIT instead."""
    return _DIRECT and not _launch_hooks_installed()


_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)


def _launch_hooks_installed() -> bool:
    """Triton 3.5+ keeps its launch hooks in HookChains (empty unless a profiler adds one);
    older versions hold a callable or None."""
    if _RUNTIME_KNOBS is None:
        return False
    for hook in (_RUNTIME_KNOBS.launch_enter_hook, _RUNTIME_KNOBS.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


_DIRECT = os.environ.get("FASTCNN_TRITON_DIRECT_LAUNCH", "1") not in ("0", "false", "off")


def _can_launch_directly(compiled) -> bool:
    """A compiled GPU kernel (the interpreter returns none) with the launcher API this code
    calls: run(grid x, y, z, stream, function, packed metadata, launch metadata, enter hook,
    exit hook, *every argument), as Triton 3.x's own JITFunction.run calls it."""
    return (
        _DIRECT
        and not interpreting()
        and compiled is not None
        and hasattr(compiled, "packed_metadata")
        and getattr(compiled, "function", None) is not None
    )


def _current_stream(device: int | None):
    return triton.runtime.driver.active.get_current_stream(device)


def _new_launch(x, weight, bias, residual, out, stride, padding, relu, pool, out2,
                groups=1) -> _Launch:  # fmt: skip
    """The launch of a call, resolved: integer arguments, constexprs, config (None: autotuned).
    With groups, C_IN and N_OUT are one group's channel counts."""
    n, _, h, w = x.shape
    c_out, c_in, kh, kw = weight.shape
    c_out //= groups
    _, split, ho, wo = out.shape
    m = n * ho * wo
    r = residual if residual is not None else out
    o2 = out2 if out2 is not None else out
    ints = (
        m, c_out, c_in, h, w, ho, wo, split,
        *x.stride(), *weight.stride(), *r.stride(), *out.stride(), *o2.stride(),
        triton.next_power_of_2(m),
    )  # fmt: skip
    flat_k = c_in < _FLAT_K_BELOW and not pool
    meta = dict(
        **conv_meta(kh, kw, stride, padding, bias is not None, residual is not None, relu),
        FLAT_K=flat_k,
        POOL=pool,
        HAS_SPLIT=out2 is not None,
        INPUT_PRECISION=_input_precision(x.dtype),
    )
    if interpreting():
        config = _interpreter_config(m, c_out, c_in, flat_k, kh * kw)
    elif not _autotune_enabled():
        capability, limit = _device_limits(x.device.index or 0)
        config = heuristic_config(m, c_out, c_in, x.element_size(), capability, limit, pool, flat_k)
    else:
        config = None
    launch = _Launch(ints, meta, None, config, groups)
    if config is not None:
        launch.grid = launch._grid_of(config)
    return launch


def conv_bn_act_out(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    relu: bool,
    pool: int = 0,
    out2: torch.Tensor | None = None,
    groups: int = 1,
) -> None:
    """Write relu(conv2d(x, weight, bias, groups=groups) + residual) into out (validated by
    fastcnn.ops).

    x is read with channels innermost: an x whose channel stride is not 1 (NCHW) is converted to
    channels_last once here; channels_last tensors and their channel slices are read in place.
    The weight is read through its strides (fastcnn keeps weights channels_last so channel loads
    are contiguous). pool=P (1x1 convs): the conv reads max_pool2d(x, P, 1, P // 2) computed in
    registers. out2: output channels from out.shape[1] on go to out2 (channel c -> out2[:, c -
    out.shape[1]]); weight and bias then hold out's and out2's channels, concatenated.

    Planned once per (shapes, strides, dtype, device, flags, pointer alignment): later calls
    with the same key only launch (see _Launch).
    """
    _launch(x, weight, bias, residual, out, stride, padding, relu, pool, out2, groups)


def _launch(x, weight, bias, residual, out, stride, padding, relu, pool, out2, groups):
    """conv_bn_act_out's work; returns the _Launch it used (None: nothing to launch)."""
    if x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last)
    r = residual if residual is not None else out  # placeholder pointers when absent
    o2 = out2 if out2 is not None else out
    b = bias if bias is not None else out
    pointers = (x, weight, b, r, out, o2)
    addresses = [t.data_ptr() for t in pointers]
    aligned = not (addresses[0] | addresses[1] | addresses[2] | addresses[3] | addresses[4]
                   | addresses[5]) & 15  # fmt: skip
    in_place = residual is not None and addresses[3] == addresses[4]
    key = (
        x.shape, x.stride(), weight.shape, weight.stride(), r.stride(), out.shape, out.stride(),
        o2.stride(), x.dtype, x.device, bias is None, residual is None, out2 is None, in_place,
        stride[0], stride[1], padding[0], padding[1], relu, pool, groups,
        aligned or tuple(a % 16 == 0 for a in addresses),
        x.dtype == torch.float32 and _tf32_allowed(), _autotune_enabled(),
    )  # fmt: skip
    resolved = _launches.get(key)
    if resolved is None:
        _, _, kh, kw = weight.shape
        if pool and (kh, kw, tuple(stride), tuple(padding)) != (1, 1, (1, 1), (0, 0)):
            raise ValueError("pool= fuses a max-pool into a 1x1, stride-1, unpadded conv only")
        resolved = _new_launch(x, weight, bias, residual, out, stride, padding, relu, pool, out2,
                               groups)  # fmt: skip
        if resolved.ints[0] == 0 or resolved.ints[1] == 0:  # no output pixel or channel
            return None
        _launches[key] = resolved
    resolved.launch(pointers, in_place)
    return resolved


def plan(x, weight, bias, residual, stride, padding, relu, groups=1):
    """A plan(x, weight, bias, residual, out) -> out for later calls whose tensors have these
    tensors' metadata, and an out of the output's shape in x's memory format (what
    fastcnn.ops.conv_bn_act.plan guarantees): per call it looks only at what can still change,
    the pointers' 16-byte alignment, whether out is the residual, and the tf32 switch, and
    keeps the _Launch of each combination (conv_bn_act_out builds a 22-field key per call
    instead). FASTCNN_TRITON_AUTOTUNE is read when a combination is first seen: reading the
    environment costs a tenth of a planned call, and either setting gives the same result (a
    tuned or a heuristic config). None for an x that is not channels_last in memory (NCHW:
    converted on every call, by conv_bn_act_out)."""
    if x.stride(1) != 1:
        return None
    has_bias, has_residual = bias is not None, residual is not None
    fp32 = x.dtype == torch.float32
    by_flags: dict[tuple, _Launch] = {}

    def run(x, weight, bias, residual, out):
        b = bias if has_bias else out
        r = residual if has_residual else out
        aligned = not (x.data_ptr() | weight.data_ptr() | b.data_ptr() | r.data_ptr()
                       | out.data_ptr()) & 15  # fmt: skip
        in_place = has_residual and r.data_ptr() == out.data_ptr()
        flags = (aligned, in_place, fp32 and _tf32_allowed())
        resolved = by_flags.get(flags) if aligned else None
        if resolved is None:  # the full path: once per combination (always when not all
            # aligned: the kernel is specialized per pointer then)
            resolved = _launch(x, weight, bias, residual, out, stride, padding, relu, 0, None,
                               groups)  # fmt: skip
            if resolved is not None and aligned:
                by_flags[flags] = resolved
            return out
        resolved.launch((x, weight, b, r, out, out), in_place)
        return out

    return run
