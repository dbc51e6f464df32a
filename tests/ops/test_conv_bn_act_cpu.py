"""The "cpu" backend's oneDNN path: weights prepacked once, repacked when they change, dropped
with their tensor; dtypes oneDNN cannot run here fall back to the reference with a note."""

from __future__ import annotations

import gc

import pytest
import torch
from fastcnn_testing import assert_matches, conv_reference64, random_conv_inputs

import fastcnn
from fastcnn.cpu import onednn

pytestmark = pytest.mark.skipif(
    not onednn.supports(torch.float32), reason="this torch build has no oneDNN (mkldnn)"
)


def _run(x, weight, bias):
    with fastcnn.use_backend("cpu"):
        return fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1)


def test_weights_are_packed_once_and_repacked_when_they_change():
    x, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, "cpu")
    _run(x, weight, bias)
    packed = onednn._packed[id(weight)][1][tuple(x.shape)]
    _run(x, weight, bias)
    assert onednn._packed[id(weight)][1][tuple(x.shape)] is packed, "the second call must reuse it"
    with torch.no_grad():
        weight.mul_(-1)  # an in-place update (an optimizer step, load_state_dict, ...)
    out = _run(x, weight, bias)
    assert onednn._packed[id(weight)][1][tuple(x.shape)] is not packed
    expected = conv_reference64(x, weight, bias, 1, 1)
    assert_matches(out, expected, torch.float32)


def test_packing_dies_with_its_weight():
    x, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, "cpu")
    _run(x, weight, bias)
    key = id(weight)
    assert key in onednn._packed
    del weight
    gc.collect()
    assert key not in onednn._packed


def test_each_input_shape_gets_its_own_packing_up_to_a_limit():
    """oneDNN picks the weight layout for the input shape (a weight packed for batch 1 is
    reordered on every batch-8 call): one packing per shape, the newest few kept."""
    _, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, "cpu")
    shapes = [(b, 13, 7 + b, 5) for b in range(1, onednn.SHAPES_PER_WEIGHT + 3)]
    for i, shape in enumerate(shapes):
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        expected = conv_reference64(x, weight, bias, 1, 1)
        assert_matches(_run(x, weight, bias), expected, torch.float32)
        kept = list(onednn._packed[id(weight)][1])
        assert kept[-1] == shape and len(kept) == min(i + 1, onednn.SHAPES_PER_WEIGHT)
    assert kept == shapes[-onednn.SHAPES_PER_WEIGHT :]


@pytest.mark.skipif(onednn.supports(torch.bfloat16), reason="this CPU runs bf16 in oneDNN")
def test_dtype_onednn_cannot_run_falls_back_with_a_note(monkeypatch):
    monkeypatch.setattr(fastcnn._backend, "_warned", set())
    x, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.bfloat16, "cpu")
    with pytest.warns(RuntimeWarning, match="oneDNN cannot run torch.bfloat16"):
        out = _run(x, weight, bias)
    expected = conv_reference64(x, weight, bias, 1, 1)
    assert_matches(out, expected, torch.bfloat16)


def test_weights_made_under_inference_mode():
    with torch.inference_mode():
        x, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, "cpu")
        out = _run(x, weight, bias)
        again = _run(x, weight, bias)
    expected = conv_reference64(x, weight, bias, 1, 1)
    assert_matches(out, expected, torch.float32)
    assert torch.equal(out, again)
