"""The cpu backend's Inception block: both structures (merged and separate 1x1 convs) against
the float64 reference, the one timed faster chosen once per block and input shape, recorded in
the trace, and dropped with the block's weights."""

from __future__ import annotations

import gc

import pytest
import torch
from fastcnn_testing import (
    assert_winograd_close,
    random_tensor,
    randomize_batchnorm,
    skip_unsupported,
)
from torchvision.models.googlenet import Inception

import fastcnn
from fastcnn import reference
from fastcnn.cpu import inception, onednn, winograd

pytestmark = pytest.mark.skipif(
    not onednn.supports(torch.float32), reason="this torch build has no oneDNN (mkldnn)"
)


def _fused():
    torch.manual_seed(0)
    block = randomize_batchnorm(Inception(19, 8, 6, 10, 3, 5, 7), seed=1).eval()
    return fastcnn.nn.FusedInception.from_module(block)


def _args(fused):
    return (
        fused.reduce_weight, fused.reduce_bias, fused.widths, fused.w2, fused.b2, fused.w3,
        fused.b3, fused.w4, fused.b4, fused.pool,
    )  # fmt: skip


@pytest.mark.parametrize("variant", inception.VARIANTS)
def test_each_structure_matches_the_reference(variant, monkeypatch):
    fused = _fused()
    x = random_tensor((2, 19, 7, 9), torch.float32, "cpu", channels_last=True, seed=3)
    monkeypatch.setattr(inception, "_choose", lambda run: variant)
    with torch.no_grad(), fastcnn.use_backend("cpu"), fastcnn.trace() as t:
        out = fused(x)
    assert t.kernels("inception") == {f"cpu:onednn+cat ({variant} 1x1s)"}
    args = [a.double() if isinstance(a, torch.Tensor) else a for a in _args(fused)]
    expected = reference.inception(x.double(), *args)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("winner", inception.VARIANTS)
def test_only_the_chosen_structures_keep_packs(monkeypatch, winner, onednn_direct):
    """Choosing times both structures (packing both); the loser's packs (and the split copies
    of the separate structure) go once no shape runs it, and come back when one does."""
    fused = _fused()
    block = lambda: inception._blocks.kept(fused.reduce_weight)["block"]  # noqa: E731
    choice = [winner]
    monkeypatch.setattr(inception, "_choose", lambda run: [run(v) for v in inception.VARIANTS]
                        and choice[0])  # fmt: skip
    x = random_tensor((1, 19, 7, 9), torch.float32, "cpu", channels_last=True)
    args = [a.double() if isinstance(a, torch.Tensor) else a for a in _args(fused)]
    expected = reference.inception(x.double(), *args).float()
    with torch.no_grad(), fastcnn.use_backend("cpu"):
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
        assert fused(x) is not None  # the planned call
    merged_packs = bool(onednn._cache.kept(fused.reduce_weight))
    assert merged_packs == (winner == "merged")
    assert (block()._parts is not None) == (winner == "separate")
    choice[0] = "separate" if winner == "merged" else "merged"  # another shape, the other one
    x2 = random_tensor((2, 19, 7, 9), torch.float32, "cpu", channels_last=True)
    with torch.no_grad(), fastcnn.use_backend("cpu"):
        fused(x2)
        fused(x)
    assert onednn._cache.kept(fused.reduce_weight) and block()._parts is not None


def test_the_structure_is_chosen_once_per_shape_and_dies_with_the_block():
    fused = _fused()
    calls = []
    real_choose = inception._choose

    def counting_choose(run):
        calls.append(1)
        return real_choose(run)

    x1 = random_tensor((1, 19, 7, 9), torch.float32, "cpu", channels_last=True)
    x2 = random_tensor((2, 19, 7, 9), torch.float32, "cpu", channels_last=True)
    inception._choose = counting_choose
    try:
        with torch.no_grad(), fastcnn.use_backend("cpu"), fastcnn.trace() as t:
            for x in (x1, x1, x2, x2, x1):
                fused(x)
    finally:
        inception._choose = real_choose
    assert len(calls) == 2  # one timing per input shape
    assert t.counts("max_pool2d").total() == 5  # the timing runs' own pools are not recorded
    chosen = inception._blocks.kept(fused.reduce_weight)["block"].chosen
    assert set(chosen) == {tuple(x1.shape), tuple(x2.shape)}
    assert set(chosen.values()) <= set(inception.VARIANTS)
    key = id(fused.reduce_weight)
    del fused
    gc.collect()
    assert key not in inception._blocks.entries


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_strided_biases_give_the_dense_biases_result(backend):
    # every kernel reads a bias as ptr + channel: the op makes strided views dense first
    skip_unsupported("cpu", backend, torch.float32)
    fused = _fused()
    x = random_tensor((2, 19, 7, 9), torch.float32, "cpu", channels_last=True, seed=4)
    args = list(_args(fused))
    strided = list(args)
    for i in (1, 4, 6, 8):  # reduce_bias, b2, b3, b4 as every other element of a longer tensor
        strided[i] = torch.stack([args[i], torch.full_like(args[i], 1e3)], 1).flatten()[::2]
        assert strided[i].stride(0) == 2 and torch.equal(strided[i], args[i])
    with torch.no_grad(), fastcnn.use_backend(backend):
        dense_out = fastcnn.ops.inception(x, *args)
        strided_out = fastcnn.ops.inception(x, *strided)
    assert torch.equal(strided_out, dense_out)


def _traced_then_planned(fused, x, monkeypatch, ext, check=lambda args: None):
    """fused(x) once traced (the per-conv path), then twice untraced (the planned C++ block
    call, each call's arguments passed to check): (trace, first output, planned outputs, the
    block calls' results, the float64 reference)."""
    block_calls, block_call = [], ext.onednn_inception

    def counted(*a):
        check(a)
        block_calls.append(block_call(*a))
        return block_calls[-1]

    monkeypatch.setattr(ext, "onednn_inception", counted)
    args = [a.double() if isinstance(a, torch.Tensor) else a for a in _args(fused)]
    expected = reference.inception(x.double(), *args)
    with torch.no_grad(), fastcnn.use_backend("cpu"):
        with fastcnn.trace() as t:
            first = fused(x)
        planned = [fused(x) for _ in range(2)]  # untraced calls run the plan
    return t, first, planned, block_calls, expected


@pytest.mark.parametrize("variant", inception.VARIANTS)
def test_winograd_kxk_convs_per_conv_and_in_the_block_call(variant, monkeypatch, onednn_direct):
    """3x3 branch convs wide enough for Winograd (fastcnn.cpu.winograd) take it on the first,
    per-conv call (recorded in the trace) and in the planned C++ block call after it."""
    monkeypatch.setitem(winograd._state, "enabled", True)
    torch.manual_seed(0)
    block = randomize_batchnorm(Inception(32, 16, 16, 24, 16, 20, 8), seed=1).eval()
    fused = fastcnn.nn.FusedInception.from_module(block)
    x = random_tensor((2, 32, 8, 9), torch.float32, "cpu", channels_last=True, seed=3)
    monkeypatch.setattr(inception, "_choose", lambda run: variant)

    def winograd_packed(a):
        assert any(layout < -1 for layout in a[2]), "no Winograd pack among the block's convs"

    t, first, planned, block_calls, expected = _traced_then_planned(
        fused, x, monkeypatch, onednn_direct, winograd_packed
    )
    assert t.kernels("inception") == {f"cpu:onednn+cat ({variant} 1x1s, winograd 3x3s)"}
    assert block_calls and all(block_calls), "the planned calls ran the C++ block call"
    for out in (first, *planned):
        assert_winograd_close(out, expected)


@pytest.mark.skipif(
    not onednn.supports(torch.bfloat16),
    reason="oneDNN runs no bf16 convolutions on this CPU (AVX-512 or native bf16 needed)",
)
@pytest.mark.parametrize("variant", inception.VARIANTS)
def test_bf16_blocks_run_the_block_call_within_bf16s_tolerance(variant, monkeypatch, onednn_direct):
    """A bf16 block: the per-conv path on the first call, then the planned C++ block call (its
    intermediates and pool in bf16), both against a float64 reference of the same bf16 tensors."""
    fused = _fused().to(torch.bfloat16)
    x = random_tensor((2, 19, 7, 9), torch.float32, "cpu", channels_last=True, seed=3)
    x = x.to(torch.bfloat16)
    monkeypatch.setattr(inception, "_choose", lambda run: variant)
    t, first, planned, block_calls, expected = _traced_then_planned(
        fused, x, monkeypatch, onednn_direct
    )
    assert t.kernels("inception") == {f"cpu:onednn+cat ({variant} 1x1s)"}
    assert block_calls and all(block_calls), "the planned calls ran the C++ block call"
    for out in (first, *planned):
        assert out.dtype == torch.bfloat16 and not torch.isnan(out).any()
        torch.testing.assert_close(out.double(), expected, rtol=4e-2, atol=4e-2)
