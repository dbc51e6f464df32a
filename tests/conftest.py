"""Test setup: without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test imports
fastcnn.triton. On a GPU machine it is left alone and the CUDA tests run for real.

FASTCNN_TEST_NO_INTERPRET=1 opts out: TRITON_INTERPRET is removed, so CPU tensors meet the
triton backend as on a GPU machine (it refuses them). CI runs the suite once that way, so a test
that only passes under the interpreter cannot hide until the first GPU run.
"""

import os

import pytest
import torch

if os.environ.get("FASTCNN_TEST_NO_INTERPRET", "0") not in ("", "0"):
    os.environ.pop("TRITON_INTERPRET", None)
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references must be fp32, not tf32
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every buffer an op allocates starts as NaN in every test (fastcnn/ops/alloc.py): an
    element a kernel leaves unwritten cannot pass, whatever the allocator hands out."""
    from fastcnn.common.alloc import poisoned  # after TRITON_INTERPRET is set above

    with poisoned():
        yield


@pytest.fixture
def onednn_direct():
    """The extension, for tests of its direct oneDNN CPU path (csrc/cpu/onednn_conv.cpp and
    what runs through it); skips them where it was built without the oneDNN library."""
    from fastcnn import _extension

    ext = _extension.load()
    if ext is None or not hasattr(ext, "onednn_conv"):
        pytest.skip(
            "the extension was built without the oneDNN library (FASTCNN_NO_ONEDNN, or the "
            "onednn-cpu-gomp wheels are not installed): no direct path"
        )
    return ext
