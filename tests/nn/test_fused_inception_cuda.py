"""FusedInception on a GPU at GoogLeNet's real sizes, fp32/fp16/bf16, and its profile: no
torch.cat, no copy, no separate max-pool. Skipped without a CUDA GPU.

The kernels are checked against fastcnn.reference.inception in float64 on the block's own
folded weights, within the rounding bound of fastcnn_testing (inception_bound64: the kxk convs
carry the reduce convs' bound); that folding equals torchvision's block is checked on the CPU
(tests/nn/test_fused_inception.py)."""

from __future__ import annotations

import pytest
import torch
from fastcnn_testing import (
    NO_GPU_REASON,
    TOLERANCES,
    assert_matches,
    assert_within_bound,
    inception_bound64,
    randomize_batchnorm,
)
from inception_cases import INCEPTION_CONFIGS
from torchvision.models.googlenet import Inception

import fastcnn
from fastcnn import reference
from fastcnn.nn.fused_inception import _BUFFERS

# Roundings to the dtype of one conv on each backend's Inception path: Triton stores each
# GEMM's fp32 result once; the extension's kxk convs are cuDNN + an epilogue pass (2), its 1x1s
# cuBLASLt (1); the reference rounds conv2d's output and its bias add (2).
ROUNDINGS = {"triton": 1, "cuda": 2, "eager": 2}

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU_REASON),
]


def _block(config):
    torch.manual_seed(0)
    return randomize_batchnorm(Inception(*config), seed=1).eval().cuda()


@pytest.mark.parametrize("backend", ["triton", "cuda", "eager"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("name", list(INCEPTION_CONFIGS))
def test_full_size_matches_torchvision(name, dtype, backend):
    config, size = INCEPTION_CONFIGS[name]
    block = _block(config)
    x = torch.randn(4, config[0], size, size, device="cuda").to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused = fastcnn.nn.FusedInception.from_module(block.to(dtype))
        args = [getattr(fused, name) for name in _BUFFERS]
        f64 = [a.double() for a in args]
        expected = reference.inception(x.double(), *f64[:2], fused.widths, *f64[2:], fused.pool)
        with fastcnn.use_backend(backend):
            got = fused(x)
    if dtype == torch.float32:
        assert_matches(got, expected, dtype)
    else:
        bound = inception_bound64(x, args, fused.widths, fused.pool, dtype, ROUNDINGS[backend])
        assert_within_bound(got, expected, bound, f"{name} {dtype} {backend}")


def _profiled_op_names(backend: str) -> set[str]:
    config, size = INCEPTION_CONFIGS["4a"]
    fused = fastcnn.nn.FusedInception.from_module(_block(config).half())
    x = torch.randn(8, config[0], size, size, device="cuda").half()
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fastcnn.use_backend(backend):
        fused(x)  # compile and tune first
        torch.cuda.synchronize()
        with torch.profiler.profile() as prof:
            fused(x)
            torch.cuda.synchronize()
    return {e.name for e in prof.events()}


def test_profile_has_no_cat_copy_or_pool():
    names = _profiled_op_names("triton")
    for op in ("aten::cat", "aten::copy_", "aten::max_pool2d"):
        assert op not in names, f"{op} in the fused Inception forward"


def test_cuda_backend_profile_has_no_cat_or_copy():
    """The extension's block writes every branch into its slice (its max-pool is a real op)."""
    names = _profiled_op_names("cuda")
    for op in ("aten::cat", "aten::copy_"):
        assert op not in names, f"{op} in the extension's Inception forward"
