"""Helpers shared by the Triton conv kernels (fp and int8) and their launchers."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gemm_tile(M, N_OUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: GROUP_M row blocks share each weight
    column block while it is in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def output_pixels(offs_m, HO, WO, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
                  PAD_H: tl.constexpr, PAD_W: tl.constexpr):  # fmt: skip
    """For GEMM rows offs_m (output pixels, N*HO*WO in NHW order): each one's image (int64,
    for large batches), output row and column, and the input row/column of its window's
    top-left tap."""
    wo = offs_m % WO
    ho = (offs_m // WO) % HO
    img = (offs_m // (WO * HO)).to(tl.int64)
    return img, ho, wo, ho * STRIDE_H - PAD_H, wo * STRIDE_W - PAD_W


def conv_meta(kh: int, kw: int, stride, padding, has_bias: bool, has_residual: bool, relu: bool):
    """The constexpr arguments both conv kernels take."""
    return dict(
        KH=kh,
        KW=kw,
        STRIDE_H=stride[0],
        STRIDE_W=stride[1],
        PAD_H=padding[0],
        PAD_W=padding[1],
        HAS_BIAS=has_bias,
        HAS_RESIDUAL=has_residual,
        RELU=relu,
    )
