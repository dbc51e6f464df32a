"""Winograd F(4x4, 3x3) on the cpu backend (csrc/cpu/winograd_conv.cpp, fastcnn.cpu.winograd):
which convs take it, right against float64 on odd sizes, channel counts that are not multiples
of 16, strided inputs and outputs and every post-op, switched off and on, bad input refused."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from fastcnn_testing import (
    assert_winograd_close,
    conv_reference64,
    random_conv_inputs,
    random_tensor,
)

import fastcnn
from fastcnn import _extension
from fastcnn.cpu import onednn, winograd

conv_module = importlib.import_module("fastcnn.ops.conv_bn_act")
_ext = _extension.load()
needs_direct = pytest.mark.usefixtures("onednn_direct")  # conftest.py: skips without it


def is_winograd_layout(layout: int) -> bool:
    return layout < -1  # onednn_conv_pack's layout ids for Winograd packs (winograd_conv.h)


@pytest.fixture
def enabled():
    previous = winograd.set_enabled(True)
    yield
    winograd.set_enabled(previous)


@needs_direct
@pytest.mark.parametrize(
    ("batch", "cin", "cout", "h", "w"),
    [(2, 16, 16, 8, 8), (2, 17, 33, 9, 11), (3, 40, 24, 13, 7), (1, 64, 48, 21, 6)],
)
@pytest.mark.parametrize("residual", ["none", "separate", "in_place"])
@pytest.mark.parametrize("relu", [True, False])
def test_matches_float64(enabled, batch, cin, cout, h, w, residual, relu):
    """Edge tiles (sizes not multiples of 4), channel blocks past C and K, every post-op."""
    x, weight, bias = random_conv_inputs(cin, cout, 3, h, w, torch.float32, "cpu", batch=batch)
    r = None
    if residual != "none":
        r = random_tensor((batch, cout, h, w), torch.float32, "cpu", channels_last=True, seed=3)
    expected = conv_reference64(x, weight, bias, 1, 1, r, relu=relu)
    dest = r.clone() if r is not None else None
    with fastcnn.use_backend("cpu"), fastcnn.trace() as t:
        y = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1, residual=dest, relu=relu,
                                    out=dest if residual == "in_place" else None)  # fmt: skip
    assert t.kernels() == {"cpu:winograd"}
    assert_winograd_close(y, expected)
    if residual == "in_place":
        assert y.data_ptr() == dest.data_ptr()


def _pack(weight, x_sizes):
    return _ext.onednn_conv_pack(weight, list(x_sizes), [1, 1], [1, 1], 1, True)


@needs_direct
def test_strided_input_and_output_every_element_written():
    """A channel slice in, a channel slice of a NaN-poisoned tensor out (as the Inception
    block's branches): every element of the slice written, nothing outside it."""
    big_x = random_tensor((2, 40, 9, 10), torch.float32, "cpu", channels_last=True, seed=1)
    x = big_x[:, 5:29]
    _, weight, bias = random_conv_inputs(24, 20, 3, 9, 10, torch.float32, "cpu")
    big_out = torch.full((2, 31, 9, 10), float("nan")).contiguous(memory_format=torch.channels_last)
    out = big_out[:, 7:27]
    packed, layout = _pack(weight, x.shape)
    assert is_winograd_layout(layout)
    ran = _ext.onednn_conv(x, packed, layout, list(weight.shape), bias, None, out, [1, 1], [1, 1],
                           1, True)  # fmt: skip
    assert ran
    assert_winograd_close(out, conv_reference64(x, weight, bias, 1, 1))
    assert torch.isnan(big_out[:, :7]).all() and torch.isnan(big_out[:, 27:]).all()


@needs_direct
def test_nan_reaches_the_output_through_relu(enabled):
    """Not oneDNN's post-op ReLU (which maps NaN to 0): NaN propagates, as torch.relu."""
    x, weight, bias = random_conv_inputs(16, 16, 3, 8, 8, torch.float32, "cpu")
    x[0, :, 3, 4] = float("nan")
    with fastcnn.use_backend("cpu"), fastcnn.trace() as t:
        y = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1, relu=True)
    assert t.kernels() == {"cpu:winograd"}
    assert "cpu:winograd" not in conv_module.NAN_TO_ZERO_KERNELS
    assert torch.isnan(y[0, :, 3, 4]).all() and not torch.isnan(y[1]).any()


def _takes(x_shape, w_shape, stride, padding, groups, dtype=torch.float32) -> bool:
    """Does a call of the cpu backend's conv with these shapes run as Winograd now?"""
    x = torch.randn(x_shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(w_shape, dtype=dtype)
    return onednn.plan(x, w, None, stride, padding, groups, None, True).winograd_now()


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "stride", "padding", "groups", "dtype", "why"),
    [
        ((1, 16, 16, 16), (16, 16, 3, 3), (2, 2), (1, 1), 1, torch.float32, "stride"),
        ((1, 16, 16, 16), (16, 16, 3, 3), (1, 1), (0, 0), 1, torch.float32, "padding"),
        ((1, 16, 16, 16), (16, 16, 1, 1), (1, 1), (0, 0), 1, torch.float32, "1x1"),
        ((1, 16, 16, 16), (16, 4, 3, 3), (1, 1), (1, 1), 4, torch.float32, "groups"),
        ((1, 16, 16, 16), (16, 16, 3, 3), (1, 1), (1, 1), 1, torch.bfloat16, "bf16"),
        ((1, 8, 16, 16), (16, 8, 3, 3), (1, 1), (1, 1), 1, torch.float32, "few channels"),
        ((1, 64, 7, 7), (64, 64, 3, 3), (1, 1), (1, 1), 1, torch.float32, "few tiles"),
    ],
)
@needs_direct
def test_convs_it_does_not_take(enabled, x_shape, w_shape, stride, padding, groups, dtype, why):
    assert not _takes(x_shape, w_shape, stride, padding, groups, dtype), why


@needs_direct
def test_the_convs_it_takes(enabled):
    # ResNet-50's 3x3 layers at batch 1 (56, 28, 14: 196, 49, 16 tiles) and batch 2 at 7x7
    for shape in [(1, 64, 56, 56), (1, 128, 28, 28), (1, 256, 14, 14), (2, 512, 7, 7)]:
        c = shape[1]
        assert _takes(shape, (c, c, 3, 3), (1, 1), (1, 1), 1), shape
    winograd.set_enabled(False)
    assert not _takes((1, 64, 56, 56), (64, 64, 3, 3), (1, 1), (1, 1), 1)


@needs_direct
def test_switched_off_the_same_weight_runs_direct_and_back(enabled):
    """The pack cache keys the switch: a weight packed for Winograd is not run as such once it
    is off (the direct path's result bit for bit), and on again takes Winograd."""
    x, weight, bias = random_conv_inputs(16, 24, 3, 12, 12, torch.float32, "cpu")
    _, fresh, _ = random_conv_inputs(16, 24, 3, 12, 12, torch.float32, "cpu")
    with fastcnn.use_backend("cpu"):
        on = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1)
        winograd.set_enabled(False)
        with fastcnn.trace() as t:
            off = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1)
        assert t.kernels() == {"cpu:onednn"}
        direct = fastcnn.ops.conv_bn_act(x, fresh.copy_(weight), bias, 1, 1)
        assert torch.equal(off, direct)
        assert not torch.equal(on, off)  # Winograd rounds differently: it did run before
        winograd.set_enabled(True)
        again = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1)
    assert torch.equal(again, on)


@needs_direct
def test_planned_calls_take_it(enabled):
    """ConvBNAct's planned path (fastcnn.cpu.onednn.plan) packs for Winograd as well."""
    conv = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.BatchNorm2d(32),
                               torch.nn.ReLU()).eval()  # fmt: skip
    fused = fastcnn.optimize(conv)
    x = random_tensor((1, 32, 16, 16), torch.float32, "cpu", channels_last=True)
    with torch.no_grad():
        expected = conv.double()(x.double())
        fused(x)  # plans
        y = fused(x)
    assert_winograd_close(y, expected)
    (module,) = [m for m in fused.modules() if isinstance(m, fastcnn.nn.ConvBNAct)]
    packs = onednn._cache.kept(module.weight)
    assert [is_winograd_layout(layout) for _, layout in packs.values()] == [True]


@needs_direct
def test_bad_input_is_refused():
    weight = torch.randn(16, 16, 1, 1)
    with pytest.raises(RuntimeError, match="Winograd takes fp32 3x3 convs"):
        _ext.onednn_conv_pack(weight, [1, 16, 8, 8], [1, 1], [0, 0], 1, True)
    x, w3, bias = random_conv_inputs(16, 16, 3, 8, 8, torch.float32, "cpu")
    packed, layout = _pack(w3, (2, 16, 8, 8))
    out = torch.empty(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="Winograd pack for a conv Winograd does not take"):
        _ext.onednn_conv(x, packed, layout, list(w3.shape), bias, None, out, [2, 2], [1, 1], 1,
                         True)  # fmt: skip
    with pytest.raises(RuntimeError, match="leave nothing to compute"):
        _pack(w3, (0, 16, 8, 8))
    small = torch.empty(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="packed for another conv"):
        _ext.onednn_conv(x, packed[:-64], layout, list(w3.shape), bias, None, small, [1, 1],
                         [1, 1], 1, True)  # fmt: skip


def test_the_environment_turns_it_off():
    code = "from fastcnn.cpu import winograd; print(winograd.enabled())"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**{k: v for k, v in os.environ.items() if k != "FASTCNN_WINOGRAD"}}
        env["FASTCNN_WINOGRAD"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True)  # fmt: skip
        assert out.stdout.strip() == expected


@needs_direct
@pytest.mark.parametrize(
    ("cin", "cout", "size"),
    [(16, 16, 124), (192, 192, 52)],
    ids=["2 chunks, the last padded", "large weight: 128-tile chunks"],
)
def test_chunks(enabled, cin, cout, size):
    """961 tiles in 2 chunks of 481 (one zero tile past the last); a 5.3 MB transformed weight
    takes chunks of <= 128 tiles: 169 tiles in 2 chunks of 85."""
    x, weight, bias = random_conv_inputs(cin, cout, 3, size, size, torch.float32, "cpu", batch=1)
    out = torch.full((1, cout, size, size), float("nan")).contiguous(
        memory_format=torch.channels_last
    )
    packed, layout = _pack(weight, x.shape)
    assert _ext.onednn_conv(x, packed, layout, list(weight.shape), bias, None, out, [1, 1], [1, 1],
                            1, False)  # fmt: skip
    assert_winograd_close(out, conv_reference64(x, weight, bias, 1, 1, relu=False))


@needs_direct
def test_no_bias(enabled):
    x, weight, _ = random_conv_inputs(16, 32, 3, 9, 10, torch.float32, "cpu")
    with fastcnn.use_backend("cpu"), fastcnn.trace() as t:
        y = fastcnn.ops.conv_bn_act(x, weight, None, 1, 1)
    assert t.kernels() == {"cpu:winograd"}
    assert_winograd_close(y, conv_reference64(x, weight, None, 1, 1))


@needs_direct
@pytest.mark.parametrize("in_place", [False, True])
def test_a_cropped_input_with_an_nchw_residual(enabled, in_place):
    """x a crop of a channels_last tensor (channels innermost, not dense) and an NCHW residual:
    read through its strides, not copied, and the kernel the trace names is the one that ran."""
    big = random_tensor((2, 24, 12, 13), torch.float32, "cpu", channels_last=True, seed=2)
    x = big[:, 4:20, 1:11, 2:12]
    _, weight, bias = random_conv_inputs(16, 32, 3, 10, 10, torch.float32, "cpu")
    r = random_tensor((2, 32, 10, 10), torch.float32, "cpu", seed=4)  # NCHW
    expected = conv_reference64(x, weight, bias, 1, 1, r)
    dest = r.clone()
    with fastcnn.use_backend("cpu"), fastcnn.trace() as t:
        y = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1, residual=dest,
                                    out=dest if in_place else None)  # fmt: skip
    assert t.kernels() == {"cpu:winograd"}
    assert_winograd_close(y, expected)
    assert (y.data_ptr() == dest.data_ptr()) == in_place


@needs_direct
def test_inf_input_makes_nan_of_its_tiles_only(enabled):
    """Inf - Inf in the transforms: the output tiles whose 6x6 windows hold the Inf pixel may be
    non-finite all over (documented in fastcnn.cpu.winograd); every other tile is finite."""
    x, weight, bias = random_conv_inputs(16, 16, 3, 12, 12, torch.float32, "cpu")
    x[0, :, 5, 6] = float("inf")
    with fastcnn.use_backend("cpu"), fastcnn.trace() as t:
        y = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1, relu=False)
    assert t.kernels() == {"cpu:winograd"}
    bad = ~torch.isfinite(y[0])
    # the 6x6 window of output tile (1, 1) (outputs 4..7) spans input rows and columns 3..8,
    # the only window holding pixel (5, 6); its 3x3 neighbourhood (rows 4..6, columns 5..7),
    # non-finite in a direct conv too, lies inside that tile
    tile = torch.zeros_like(bad)
    tile[:, 4:8, 4:8] = True
    assert bad[:, 4:7, 5:8].all() and not (bad & ~tile).any()
    assert torch.isfinite(y[1]).all()


@needs_direct
def test_a_pack_for_another_batch_size_or_thread_count_is_refused_or_right():
    """A Winograd pack carries its exact layout: used for a conv whose plan picks another one
    (another batch size or thread count), the call is refused, never run in the wrong layout."""
    x, weight, bias = random_conv_inputs(64, 64, 3, 28, 28, torch.float32, "cpu", batch=1)
    packed, layout = _pack(weight, (8, 64, 28, 28))
    out = torch.empty(1, 64, 28, 28).contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    try:
        for threads in (1, before):
            torch.set_num_threads(threads)
            try:
                ran = _ext.onednn_conv(x, packed, layout, list(weight.shape), bias, None, out,
                                       [1, 1], [1, 1], 1, True)  # fmt: skip
            except RuntimeError as e:
                assert "not in this conv's layout" in str(e)
                continue
            assert ran
            assert_winograd_close(out, conv_reference64(x, weight, bias, 1, 1))
    finally:
        torch.set_num_threads(before)
