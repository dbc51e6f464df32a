"""int8 conv2d + bias (+ int8 residual) (+ ReLU) + requantize as one Triton implicit GEMM.

The GEMM is conv_bn_act.py's (M = N*Ho*Wo, N = Cout, K = KH*KW*Cin, input tiles loaded through
x's strides, no im2col), with 8-bit operands and an int32 accumulator from tl.dot (mma/wgmma
int8 on sm_80/sm_90). Activations are uint8 with a zero point, and tl.dot takes two int8 operands,
so each input tile is shifted by -128 on load and the sum corrected once per column:

    sum_k (x - zp) * w = dot(x - 128, w) + (128 - zp) * sum_k w

Padding and masked rows are loaded as zp (real zero), so the identity holds for them too; the
column sums of w are accumulated from the same weight tiles the dot reads. The epilogue follows
fastcnn.reference.qconv_bn_act step by step in fp32 (multiplier, bias, dequantized residual,
ReLU, scale, round half to even, zero point, clamp to 0..255) and does the only store, uint8,
through out's strides (out may be a channel slice of a concat). The rounding is the fp32
"magic number" trick (t + 1.5 * 2^23) - 1.5 * 2^23, exact ties-to-even for |t| < 2^22 (t is
clamped into the representable range first), which the interpreter and the GPU both compute
bit for bit as IEEE fp32 adds; results equal the reference exactly in the interpreter, and on a
GPU within one quantization step where the compiler contracts a multiply-add into an FMA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcnn.common.env import interpreting
from fastcnn.reference import requantize_multiplier
from fastcnn.triton._common import conv_meta, gemm_tile, output_pixels

# Ampere/Hopper int8 tiles: K chunks of 64-128 bytes feed mma.m16n8k32 / wgmma k32.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w,
                  num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 256, 128, 8, 3),
        (128, 128, 128, 8, 3),
        (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 32, 64, 4, 5),
        (32, 64, 64, 4, 5),
    ]
]  # fmt: skip

_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds fp32 to an integer


@triton.jit
def _conv_int8_kernel(
    x_ptr, w_ptr, mult_ptr, b_ptr, r_ptr, out_ptr,
    M, N_OUT, C_IN, H, W, HO, WO,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    srn, src, srh, srw,
    son, soc, soh, sow,
    X_ZP, R_ZP, OUT_ZP, R_SCALE, INV_OUT_SCALE,
    M_BUCKET,  # autotuning key only
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = gemm_tile(M, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N_OUT
    img, ho, wo, hi0, wi0 = output_pixels(offs_m, HO, WO, STRIDE_H, STRIDE_W, PAD_H, PAD_W)
    x_img = x_ptr + img * sxn
    w_cols = w_ptr + offs_n * swo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for kh in range(KH):
        hi = hi0 + kh
        h_ok = (hi >= 0) & (hi < H)
        for kw in range(KW):
            wi = wi0 + kw
            row_ok = h_ok & (wi >= 0) & (wi < W)
            a_rows = x_img + hi * sxh + wi * sxw
            b_cols = w_cols + kh * swh + kw * sww
            for c0 in range(0, C_IN, BLOCK_K):
                ci = c0 + offs_k
                ci_ok = ci < C_IN
                # Outside the image (padding) and past M: the zero point, i.e. real zero. Past
                # C_IN the weight is 0, so whatever x holds there adds nothing.
                a = tl.load(a_rows[:, None] + ci[None, :] * sxc,
                            mask=row_ok[:, None] & ci_ok[None, :], other=X_ZP)  # fmt: skip
                a = (a.to(tl.int32) - 128).to(tl.int8)
                b = tl.load(b_cols[None, :] + ci[:, None] * swi,
                            mask=ci_ok[:, None] & mask_n[None, :], other=0)  # fmt: skip
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
                w_sum += tl.sum(b.to(tl.int32), axis=0)
    acc += (128 - X_ZP) * w_sum[None, :]

    # Epilogue: fastcnn.reference.qconv_bn_act's fp32 steps, in its order.
    mult = tl.load(mult_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * mult[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        r_rows = r_ptr + img * srn + ho * srh + wo * srw
        r = tl.load(r_rows[:, None] + offs_n[None, :] * src, mask=mask, other=0)
        y = y + (r.to(tl.float32) - R_ZP) * R_SCALE
    if RELU:
        y = tl.maximum(y, 0.0)
    t = y * INV_OUT_SCALE
    # Clamp into one step beyond the uint8 range first (so the rounding trick is exact and the
    # final clamp sees the same result), round half to even, shift, clamp.
    t = tl.minimum(tl.maximum(t, -1.0 - OUT_ZP), 256.0 - OUT_ZP)
    t = (t + 12582912.0) - 12582912.0
    q = tl.minimum(tl.maximum(t + OUT_ZP, 0.0), 255.0)
    o_rows = out_ptr + img * son + ho * soh + wo * sow
    tl.store(o_rows[:, None] + offs_n[None, :] * soc, q.to(tl.uint8), mask=mask)


def _interpreter_config(m: int, c_out: int, c_in: int) -> dict:
    """Few, large blocks: the interpreter runs each program in Python (see conv_bn_act.py)."""
    return {
        "BLOCK_M": min(256, max(16, triton.next_power_of_2(m))),
        "BLOCK_N": min(256, max(16, triton.next_power_of_2(c_out))),
        "BLOCK_K": min(256, max(32, triton.next_power_of_2(c_in))),
        "GROUP_M": 8,
    }


_tuned_kernel = None


def _gpu_kernel():
    global _tuned_kernel
    if _tuned_kernel is None:
        _tuned_kernel = triton.autotune(
            configs=_GPU_CONFIGS,
            key=["M_BUCKET", "N_OUT", "C_IN", "KH", "KW", "STRIDE_H"],
            restore_value=["r_ptr"],  # out may be the residual itself
        )(_conv_int8_kernel)
    return _tuned_kernel


def scalar_args(x_zp, r_zp, out_zp, r_scale, out_scale) -> tuple:
    """The epilogue's scalars as the kernel takes them: fp32 values rounded like the
    reference's (residual scale and 1 / out_scale as float32)."""
    f32 = torch.tensor([r_scale, 1.0 / out_scale], dtype=torch.float32).tolist()
    return (int(x_zp), int(r_zp), int(out_zp), f32[0], f32[1])


def conv_int8_out(
    x: torch.Tensor,
    x_scale: float,
    x_zp: int,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    r_scale: float,
    r_zp: int,
    relu: bool,
    out_scale: float,
    out_zp: int,
    out: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> None:
    """Write the uint8 result of fastcnn.reference.qconv_bn_act into out (validated by
    fastcnn.ops.qconv_bn_act). x is read channels-innermost (an NCHW x is converted once)."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    _, _, ho, wo = out.shape
    m = n * ho * wo
    if m == 0 or c_out == 0:
        return
    if x.stride(1) != 1:
        x = x.contiguous(memory_format=torch.channels_last)
    mult = requantize_multiplier(x_scale, weight_scale).to(x.device)
    r = residual if residual is not None else out
    args = (
        x, weight, mult, bias if bias is not None else mult, r, out,
        m, c_out, c_in, h, w, ho, wo,
        *x.stride(), *weight.stride(), *r.stride(), *out.stride(),
        *scalar_args(x_zp, r_zp, out_zp, r_scale, out_scale),
        triton.next_power_of_2(m),
    )  # fmt: skip
    meta = conv_meta(kh, kw, stride, padding, bias is not None, residual is not None, relu)

    def grid(cfg):
        return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(c_out, cfg["BLOCK_N"]),)

    if interpreting():
        cfg = _interpreter_config(m, c_out, c_in)
        _conv_int8_kernel[grid(cfg)](*args, **meta, **cfg)
    else:
        _gpu_kernel()[grid](*args, **meta)
