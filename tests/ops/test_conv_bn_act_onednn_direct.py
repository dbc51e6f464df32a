"""The cpu backend's direct oneDNN convolutions (csrc/cpu/onednn_conv.cpp via
fastcnn.cpu.onednn): taken for fp32 channels_last inputs where the extension links the library,
right on every post-op combination, and every way back to torch's mkldnn ops is noted."""

from __future__ import annotations

import warnings

import pytest
import torch
from fastcnn_testing import assert_matches, conv_reference64, random_conv_inputs, random_tensor

from fastcnn import _backend, _extension
from fastcnn.cpu import onednn

_ext = _extension.load()
needs_direct = pytest.mark.skipif(
    _ext is None or not hasattr(_ext, "onednn_conv"),
    reason="the extension was built without the oneDNN library (FASTCNN_NO_ONEDNN, or the "
    "onednn-cpu-gomp wheels are not installed)",
)


class _NoTorchOps:
    def __getattr__(self, name):
        raise AssertionError(f"the direct path called torch.ops.mkldnn.{name}")


@needs_direct
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("residual", ["none", "channels_last", "in_place"])
@pytest.mark.parametrize("relu", [True, False])
def test_direct_convs_match_the_reference_without_torch_ops(monkeypatch, groups, residual, relu):
    x, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu", batch=3)
    weight = weight[:, : 12 // groups].contiguous(memory_format=torch.channels_last)
    r = None
    if residual != "none":
        r = random_tensor((3, 20, 5, 4), torch.float32, "cpu", channels_last=True, seed=5)
    expected = conv_reference64(x, weight, bias, 2, 1, r, relu=relu, groups=groups)
    monkeypatch.setattr(onednn, "_mkldnn", _NoTorchOps())
    dest = r.clone() if r is not None else None
    y = onednn.conv_bn_act(x, weight, bias, (2, 2), (1, 1), dest, relu, residual == "in_place",
                           groups)  # fmt: skip
    assert_matches(y, expected, torch.float32)
    if r is not None:
        assert (y.data_ptr() == dest.data_ptr()) == (residual == "in_place")
    assert y.is_contiguous(memory_format=torch.channels_last)


@needs_direct
def test_a_residual_in_another_layout_is_copied_then_added():
    x, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu")
    r = random_tensor((2, 20, 9, 7), torch.float32, "cpu", seed=6)  # NCHW
    assert onednn.residual_copy_reason(x, r) is not None
    y = onednn.conv_bn_act(x, weight, bias, (1, 1), (1, 1), r, True)
    assert_matches(y, conv_reference64(x, weight, bias, 1, 1, r), torch.float32)


@needs_direct
def test_a_layout_without_an_optimized_kernel_falls_back_with_a_note(monkeypatch):
    """oneDNN 3.2 has no optimized kernel for a channel slice of a wider tensor: such a conv
    goes to torch's op (which copies it dense), and says so once."""
    monkeypatch.setattr(_backend, "_warned", set())
    big = random_tensor((2, 40, 9, 7), torch.float32, "cpu", channels_last=True, seed=7)
    x = big[:, 8:20]
    _, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu")
    with pytest.warns(RuntimeWarning, match="no optimized kernel"):
        y = onednn.conv_bn_act(x, weight, bias, (1, 1), (1, 1), None, True)
    assert_matches(y, conv_reference64(x, weight, bias, 1, 1), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        onednn.conv_bn_act(x, weight, bias, (1, 1), (1, 1), None, True)


def test_without_the_library_torch_ops_run_and_it_is_noted(monkeypatch):
    class _NoOneDNN:  # an extension built without FASTCNN_WITH_ONEDNN
        pass

    monkeypatch.setattr(_extension, "load", lambda: _NoOneDNN())
    monkeypatch.setattr(onednn, "_direct_module", [])
    monkeypatch.setattr(_backend, "_warned", set())
    x, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu")
    with pytest.warns(RuntimeWarning, match="built without the oneDNN library"):
        y = onednn.conv_bn_act(x, weight, bias, (1, 1), (1, 1), None, True)
    assert not onednn.direct(x)
    assert_matches(y, conv_reference64(x, weight, bias, 1, 1), torch.float32)


@needs_direct
def test_primitives_are_made_once_per_layout():
    x, weight, bias = random_conv_inputs(12, 20, 3, 11, 5, torch.float32, "cpu", batch=5)
    onednn.conv_bn_act(x, weight, bias, (1, 1), (1, 1), None, True)
    made = _ext.onednn_conv_cached()
    for _ in range(3):
        onednn.conv_bn_act(x, weight, bias, (1, 1), (1, 1), None, True)
    assert _ext.onednn_conv_cached() == made


@needs_direct
def test_a_weight_packed_for_another_conv_is_refused():
    x, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu")
    other, _ = _ext.onednn_conv_pack(weight[:8].contiguous(), tuple(x.shape), (1, 1),
                                          (1, 1), 1)  # fmt: skip
    _, right = _ext.onednn_conv_pack(weight, tuple(x.shape), (1, 1), (1, 1), 1)
    out = torch.empty(2, 20, 9, 7).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="packed for another conv"):
        _ext.onednn_conv(x, other, right, weight.shape, bias, None, out, (1, 1), (1, 1), 1, True)
    with pytest.raises(RuntimeError, match="unknown packed weight layout"):
        _ext.onednn_conv(x, other, 10**6, weight.shape, bias, None, out, (1, 1), (1, 1), 1, True)


@needs_direct
def test_packs_and_primitives_made_under_other_thread_counts_agree():
    """oneDNN picks the packed layout by the thread count too: ResNet-18's 256->512 1x1
    stride-2 conv on a 2x2 input packs to 540,672 bytes under 1 thread, 524,288 under 2 (seen
    here; a primitive made under the other count once met the wrong pack). The primitive
    follows the pack's layout."""
    saved = torch.get_num_threads()
    try:
        for pack_threads, run_threads in ((1, 2), (2, 1)):
            x, weight, bias = random_conv_inputs(256, 512, 1, 2, 2, torch.float32, "cpu",
                                                 batch=1, seed=pack_threads)  # fmt: skip
            torch.set_num_threads(pack_threads)
            onednn.conv_bn_act(x, weight, bias, (2, 2), (0, 0), None, True)  # packs
            torch.set_num_threads(run_threads)
            y = onednn.conv_bn_act(x, weight, bias, (2, 2), (0, 0), None, True)
            assert_matches(y, conv_reference64(x, weight, bias, 2, 0), torch.float32)
    finally:
        torch.set_num_threads(saved)


def test_the_build_flags_follow_the_library(monkeypatch):
    monkeypatch.setenv("FASTCNN_NO_ONEDNN", "1")
    assert _extension.find_onednn() is None
    assert _extension._onednn_flags() == ([], [])
