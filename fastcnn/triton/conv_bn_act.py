"""conv2d + folded-BN bias (+ residual) (+ ReLU) as one Triton implicit GEMM, NHWC first.

GEMM view: M = N*Ho*Wo output pixels, N = Cout, K = KH*KW*Cin. No im2col buffer: each program
loads its [BLOCK_M, BLOCK_K] input tile straight from x through x's strides (zero outside the
padding) and its [BLOCK_K, BLOCK_N] weight tile through the weight's strides, accumulates in fp32
with tl.dot, then in the epilogue adds the bias and the residual tile, applies ReLU, casts, and
does the only store, through out's strides (so out may be a channel slice of a larger tensor).

Two K orders, chosen per call:
- per tap (FLAT_K=False): loop over the KH*KW taps, then over Cin in BLOCK_K chunks. Row masks
  (padding) are computed once per tap and the channel loads are contiguous in NHWC. A 1x1 stride-1
  conv is exactly the GEMM [N*H*W, Cin] x [Cin, Cout].
- flat (FLAT_K=True): K walked as one (kh, kw, cin) index, for small Cin (the 7x7 stem has 3
  channels), where per-tap chunks of BLOCK_K would be mostly padding.

Two extras serve the fused Inception block (fastcnn/ops/inception.py):
- POOL=P (1x1 convs only): the input tile is the max over a PxP window (stride 1, padding P//2)
  of x, so max-pool -> 1x1 conv never writes the pooled tensor;
- HAS_SPLIT: output columns >= SPLIT_N are stored to a second tensor, so one GEMM over the
  concatenated weights of several 1x1 convs on the same input writes each conv's result to its
  own destination.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastcnn.triton._common import interpreting

# Hopper-leaning configs (H100/H200): large tiles with 3-4 stages feed wgmma; smaller ones cover
# narrow layers (Cout 16-64) and small M. Keyed on the GEMM shape, tuned once per process.
_GPU_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s
    )
    for bm, bn, bk, w, s in [
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 128, 32, 4, 4),
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
    # Grouped program order: GROUP_M row blocks share each weight column block while in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N_OUT
    wo = offs_m % WO
    ho = (offs_m // WO) % HO
    img = (offs_m // (WO * HO)).to(tl.int64)
    hi0 = ho * STRIDE_H - PAD_H
    wi0 = wo * STRIDE_W - PAD_W
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
        for kh in range(KH):
            hi = hi0 + kh
            h_ok = mask_m & (hi >= 0) & (hi < H)
            for kw in range(KW):
                wi = wi0 + kw
                row_ok = h_ok & (wi >= 0) & (wi < W)
                a_rows = x_img + hi * sxh + wi * sxw
                b_cols = w_cols + kh * swh + kw * sww
                for c0 in range(0, C_IN, BLOCK_K):
                    ci = c0 + offs_k
                    ci_ok = ci < C_IN
                    if POOL:
                        a = _max_pool_tile(x_img, hi, wi, ci, ci_ok, mask_m, H, W,
                                           sxc, sxh, sxw, POOL, BLOCK_M, BLOCK_K)  # fmt: skip
                    else:
                        a = tl.load(
                            a_rows[:, None] + ci[None, :] * sxc,
                            mask=row_ok[:, None] & ci_ok[None, :],
                            other=0.0,
                        )
                    b = tl.load(
                        b_cols[None, :] + ci[:, None] * swi,
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


_tuned_kernel = None


def _autotune_enabled() -> bool:
    """FASTCNN_TRITON_AUTOTUNE=0 uses _heuristic_config instead of timing every config: quick
    starts, and test runs that compile each shape once rather than once per config."""
    return os.environ.get("FASTCNN_TRITON_AUTOTUNE", "1") not in ("0", "false", "off")


def _heuristic_config(m: int, c_out: int, c_in: int) -> dict:
    block_n = 128 if c_out >= 128 else 64
    block_m = 128 if m >= 4096 else 64
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 64 if c_in >= 64 else 32,
            "GROUP_M": 8, "num_warps": 4, "num_stages": 3}  # fmt: skip


def _gpu_kernel():
    """The autotuned kernel, made on first GPU use (the autotuner times configs on the GPU)."""
    global _tuned_kernel
    if _tuned_kernel is None:
        _tuned_kernel = triton.autotune(
            configs=_GPU_CONFIGS,
            key=["M_BUCKET", "N_OUT", "C_IN", "KH", "KW", "STRIDE_H", "FLAT_K", "POOL"],
            # out may be the residual itself (in place): every timed config would add onto the
            # previous one's result, so the residual is saved and restored around each
            restore_value=["r_ptr"],
        )(_conv_bn_act_kernel)
    return _tuned_kernel


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows cuDNN's switch, as torch's own conv2d does (TF32 on by default there).
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


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
) -> None:
    """Write relu(conv2d(x, weight, bias) + residual) into out (validated by fastcnn.ops).

    x is read with channels innermost: an x whose channel stride is not 1 (NCHW) is converted to
    channels_last once here; channels_last tensors and their channel slices are read in place.
    The weight is read through its strides (fastcnn keeps weights channels_last so channel loads
    are contiguous). pool=P (1x1 convs): the conv reads max_pool2d(x, P, 1, P // 2) computed in
    registers. out2: output channels from out.shape[1] on go to out2 (channel c -> out2[:, c -
    out.shape[1]]); weight and bias then hold out's and out2's channels, concatenated.
    """
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    _, split, ho, wo = out.shape
    m = n * ho * wo
    if m == 0 or c_out == 0:
        return
    if pool and (kh, kw, tuple(stride), tuple(padding)) != (1, 1, (1, 1), (0, 0)):
        raise ValueError("pool= fuses a max-pool into a 1x1, stride-1, unpadded conv only")
    if x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last)
    r = residual if residual is not None else out  # placeholder pointers when absent
    o2 = out2 if out2 is not None else out
    args = (
        x, weight, bias if bias is not None else out, r, out, o2,
        m, c_out, c_in, h, w, ho, wo, split,
        *x.stride(), *weight.stride(), *r.stride(), *out.stride(), *o2.stride(),
        triton.next_power_of_2(m),
    )  # fmt: skip
    meta = dict(
        KH=kh,
        KW=kw,
        STRIDE_H=stride[0],
        STRIDE_W=stride[1],
        PAD_H=padding[0],
        PAD_W=padding[1],
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        RELU=relu,
        FLAT_K=c_in < _FLAT_K_BELOW and not pool,
        POOL=pool,
        HAS_SPLIT=out2 is not None,
        INPUT_PRECISION=_input_precision(x.dtype),
    )

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c_out, cfg["BLOCK_N"]),)

    if interpreting() or not _autotune_enabled():
        if interpreting():
            cfg = _interpreter_config(m, c_out, c_in, meta["FLAT_K"], kh * kw)
        else:
            cfg = _heuristic_config(m, c_out, c_in)
        _conv_bn_act_kernel[grid(cfg)](*args, **meta, **cfg)
    else:
        _gpu_kernel()[grid](*args, **meta)
