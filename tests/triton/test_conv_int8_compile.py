"""The int8 Triton conv compiles for Ampere (sm_80) and Hopper (sm_90) with Triton's own
compiler on this GPU-less machine, and lowers its tl.dot to the int8 tensor-core instructions
(mma.sync ... s8.s8.s32 on sm_80, wgmma ... s32.s8.s8 on sm_90): no GPU needed to prove it."""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")


def _compile(capability: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastcnn.triton import conv_int8

    kernel = conv_int8._conv_int8_kernel
    if not isinstance(kernel, triton.runtime.JITFunction):  # TRITON_INTERPRET=1 wraps it
        kernel = triton.runtime.JITFunction(kernel.fn)
    pointers = {"x_ptr": "*u8", "w_ptr": "*i8", "mult_ptr": "*fp32", "b_ptr": "*fp32",
                "r_ptr": "*u8", "out_ptr": "*u8"}  # fmt: skip
    constants = dict(KH=3, KW=3, STRIDE_H=1, STRIDE_W=1, PAD_H=1, PAD_W=1, HAS_BIAS=True,
                     HAS_RESIDUAL=True, RELU=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                     GROUP_M=8)  # fmt: skip
    signature = {}
    for name in kernel.arg_names:
        if name in pointers:
            signature[name] = pointers[name]
        elif name in constants:
            signature[name] = "constexpr"
        elif name in ("R_SCALE", "INV_OUT_SCALE"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(kernel, signature, constexprs=constants)
    try:
        return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": 8, "num_stages": 3})  # fmt: skip
    except RuntimeError as exc:  # e.g. a Triton build without the NVIDIA backend or ptxas
        if "ptxas" in str(exc) or "backend" in str(exc).lower():
            pytest.skip(f"Triton cannot compile for CUDA here: {exc}")
        raise


INSTRUCTIONS = [
    (80, r"mma\.sync\.aligned\.m16n8k32\.row\.col\.\S*s32\.s8\.s8\.s32"),
    (90, r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8"),
]


@pytest.mark.parametrize(("capability", "instruction"), INSTRUCTIONS, ids=["sm_80", "sm_90"])
def test_int8_conv_compiles_to_int8_tensor_core_code(capability, instruction):
    compiled = _compile(capability)
    ptx = compiled.asm["ptx"]
    assert re.search(instruction, ptx), "the int8 dot did not lower to int8 tensor-core MMA"
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
