"""The extension's OnednnPreparedConv (csrc/cpu/onednn_prepared.h): a direct oneDNN conv made
ready once for one call signature, as fastcnn.optimize.program's conv steps run it. Equal to the
reference on every post-op, its scratchpad found again when the thread's buffer moves, and
anything but the prepared metadata refused with an error."""

from __future__ import annotations

import pytest
import torch
from fastcnn_testing import assert_matches, conv_reference64, random_conv_inputs, random_tensor

from fastcnn import _extension
from fastcnn.cpu import onednn

_ext = _extension.load()
needs_direct = pytest.mark.usefixtures("onednn_direct")  # conftest.py: skips without it
CL = torch.channels_last


def _prepared(x, weight, bias, residual, out, stride=(1, 1), padding=(1, 1), relu=True):
    plan = onednn.plan(x, weight, bias, stride, padding, 1, residual, relu)
    packed, layout = plan.packer(weight, False)
    conv = _ext.OnednnPreparedConv(x, packed, layout, list(weight.shape), bias, residual, out,
                                   list(stride), list(padding), 1, relu)  # fmt: skip
    return conv, packed


@needs_direct
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", ["none", "separate", "in_place"])
def test_prepared_convs_match_the_reference_call_after_call(dtype, residual):
    if dtype == torch.bfloat16 and not onednn.supports(dtype):
        pytest.skip("oneDNN runs no bf16 convolutions on this CPU")
    x, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, dtype, "cpu", batch=3)
    out = torch.full((3, 20, 9, 7), float("nan"), dtype=dtype).contiguous(memory_format=CL)
    r = random_tensor((3, 20, 9, 7), dtype, "cpu", channels_last=True, seed=5)
    res = {"none": None, "separate": r, "in_place": out}[residual]
    conv, packed = _prepared(x, weight, bias, res, out)
    assert conv.ok()
    for seed in (1, 2):  # fresh inputs through the same prepared conv
        x = random_tensor(tuple(x.shape), dtype, "cpu", channels_last=True, seed=seed)
        if residual == "in_place":
            out.copy_(r)
        else:
            out.fill_(float("nan"))
        conv.run(x, packed, bias, res, out)
        expected = conv_reference64(x, weight, bias, 1, 1, None if res is None else r, relu=True)
        assert_matches(out, expected, dtype)


@needs_direct
def test_the_scratchpad_follows_the_threads_buffer():
    """A larger conv in between may move this thread's scratchpad buffer: the prepared conv
    must use where it is now (a freed buffer would be written otherwise)."""
    x, weight, bias = random_conv_inputs(16, 16, 3, 8, 8, torch.float32, "cpu", batch=1)
    out = torch.empty(1, 16, 8, 8).contiguous(memory_format=CL)
    conv, packed = _prepared(x, weight, bias, None, out)
    conv.run(x, packed, bias, None, out)
    big_x, big_w, big_b = random_conv_inputs(256, 256, 3, 56, 56, torch.float32, "cpu", batch=8)
    onednn.plan(big_x, big_w, big_b, (2, 2), (1, 1), 1, None, True)(big_x, big_w, big_b, None)
    conv.run(x, packed, bias, None, out)
    assert_matches(out, conv_reference64(x, weight, bias, 1, 1, None, relu=True), torch.float32)


@needs_direct
def test_other_metadata_is_refused():
    x, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu", batch=3)
    out = torch.empty(3, 20, 9, 7).contiguous(memory_format=CL)
    conv, packed = _prepared(x, weight, bias, None, out)
    with pytest.raises(RuntimeError, match="not the tensors it was prepared for"):
        conv.run(x[:2], packed, bias, None, out[:2])
    with pytest.raises(RuntimeError, match="not the tensors it was prepared for"):
        conv.run(x.contiguous(), packed, bias, None, out)
    with pytest.raises(RuntimeError, match="not the tensors it was prepared for"):
        conv.run(x, packed, None, None, out)
    with pytest.raises(RuntimeError, match="packed weight"):
        conv.run(x, packed[1:], bias, None, out)
    square = torch.randn(12, 12, 3, 3).contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="out is x"):
        _prepared(x, square, bias[:12].contiguous(), None, x)
