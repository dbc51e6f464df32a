"""The int8 Triton conv compiles for Ampere (sm_80) and Hopper (sm_90) with Triton's own
compiler on this GPU-less machine, and lowers its tl.dot to the int8 tensor-core instructions
(mma.sync ... s8.s8.s32 on sm_80, wgmma ... s32.s8.s8 on sm_90): no GPU needed to prove it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def _compile(capability: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastcnn.triton import conv_int8

    kernel = conv_int8._conv_int8_kernel
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
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": 8, "num_stages": 3})  # fmt: skip


def _compile_in_child(capability: int, tmp_path) -> tuple[str, int]:
    """(PTX, cubin size), compiled in a fresh process with TRITON_INTERPRET unset: the test
    process runs Triton's interpreter, whose kernels (and the @triton.jit helpers they call)
    the GPU compiler cannot take."""
    ptx_file = tmp_path / f"sm_{capability}.ptx"
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_conv_int8_compile as t; "
        f"c = t._compile({capability}); "
        f"open({str(ptx_file)!r}, 'w').write(c.asm['ptx']); print(len(c.asm['cubin']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        if "ptxas" in done.stderr or "backend" in done.stderr.lower():
            pytest.skip(f"Triton cannot compile for CUDA here: {done.stderr[-300:]}")
        raise AssertionError(done.stderr[-3000:])
    return ptx_file.read_text(), int(done.stdout.split()[-1])


INSTRUCTIONS = [
    (80, r"mma\.sync\.aligned\.m16n8k32\.row\.col\.\S*s32\.s8\.s8\.s32"),
    (90, r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.s32\.s8\.s8"),
]


@pytest.mark.parametrize(("capability", "instruction"), INSTRUCTIONS, ids=["sm_80", "sm_90"])
def test_int8_conv_compiles_to_int8_tensor_core_code(capability, instruction, tmp_path):
    ptx, cubin_bytes = _compile_in_child(capability, tmp_path)
    assert re.search(instruction, ptx), "the int8 dot did not lower to int8 tensor-core MMA"
    assert cubin_bytes > 0
