"""FusedInception's per-signature plans on the cpu backend (fastcnn.ops.inception.plan ->
fastcnn.cpu.inception.plan): later calls skip the op and run the planned direct oneDNN convs, in
either structure, stay right when the weights change in place, and inputs the direct path does
not take keep the op's own path."""

from __future__ import annotations

import threading

import pytest
import torch
from fastcnn_testing import random_tensor, randomize_batchnorm
from torchvision.models.googlenet import Inception

import fastcnn
from fastcnn import _extension, reference
from fastcnn.cpu import inception

_ext = _extension.load()
pytestmark = pytest.mark.skipif(
    _ext is None or not hasattr(_ext, "onednn_conv"),
    reason="the extension was built without the oneDNN library: no plan is made",
)


def _fused():
    torch.manual_seed(0)
    block = randomize_batchnorm(Inception(19, 8, 6, 10, 3, 5, 7), seed=1).eval()
    return fastcnn.nn.FusedInception.from_module(block, backend="cpu")


def _expected(fused, x):
    args = [
        fused.reduce_weight, fused.reduce_bias, fused.widths, fused.w2, fused.b2, fused.w3,
        fused.b3, fused.w4, fused.b4, fused.pool,
    ]  # fmt: skip
    args = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    return reference.inception(x.double(), *args)


def _no_op(*args, **kwargs):
    raise AssertionError("a planned call went through fastcnn.ops.inception")


def _planned(variant, shape, seed, monkeypatch):
    """(a fused block planned for x in the given structure, x, the planning call's output)."""
    fused = _fused()
    x = random_tensor(shape, torch.float32, "cpu", channels_last=True, seed=seed)
    monkeypatch.setattr(inception, "_choose", lambda run: variant)
    with torch.no_grad():
        first = fused(x)  # plans, and chooses the structure
    assert len(fused._plans) == 1 and next(iter(fused._plans._plans.values()))
    return fused, x, first


@pytest.mark.parametrize("variant", inception.VARIANTS)
def test_planned_calls_skip_the_op_and_match_the_reference(variant, monkeypatch):
    fused, x, first = _planned(variant, (2, 19, 7, 9), 3, monkeypatch)
    monkeypatch.setattr(fastcnn.ops, "inception", _no_op)
    with torch.no_grad():
        second = fused(x)
    for out in (first, second):
        torch.testing.assert_close(out.double(), _expected(fused, x), rtol=1e-5, atol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("variant", inception.VARIANTS)
def test_a_planned_block_is_one_call_into_the_extension(variant, monkeypatch):
    fused, x, _ = _planned(variant, (3, 19, 6, 5), 6, monkeypatch)
    monkeypatch.setattr(inception, "branches", _no_op)  # the per-conv path: not taken
    calls = []
    real = _ext.onednn_inception

    class _Counting:
        def __getattr__(self, name):
            return getattr(_ext, name)

        def onednn_inception(self, *args):
            calls.append(len(args[1]))  # the structure's conv count
            return real(*args)

    monkeypatch.setattr(inception.onednn, "_extension_module", [_Counting()])
    fused._plans._plans.clear()  # plan again, binding the counting extension
    with torch.no_grad():
        out = fused(x)
    assert calls == [4 if variant == "merged" else 6]
    torch.testing.assert_close(out.double(), _expected(fused, x), rtol=1e-5, atol=1e-5)


def test_a_block_the_extension_does_not_take_runs_conv_by_conv(monkeypatch):
    """Where oneDNN has no optimized kernel for one of the block's convs the C++ call writes
    nothing and returns False: the per-conv path (which notes each fallback) computes it."""

    class _Refusing:
        def __getattr__(self, name):
            return getattr(_ext, name)

        def onednn_inception(self, *args):
            return False

    monkeypatch.setattr(inception.onednn, "_extension_module", [_Refusing()])
    fused, x, _ = _planned("separate", (2, 19, 5, 7), 7, monkeypatch)
    with torch.no_grad():
        out = fused(x)  # poisoned (NaN) before the refused call: all of it written after
    torch.testing.assert_close(out.double(), _expected(fused, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", inception.VARIANTS)
@pytest.mark.parametrize("changed", ["reduce_weight", "reduce_bias", "w2", "b4"])
def test_weights_changed_in_place_are_used_by_the_plan(variant, changed, monkeypatch):
    fused, x, _ = _planned(variant, (1, 19, 5, 6), 4, monkeypatch)
    with torch.no_grad():
        fused(x)
        getattr(fused, changed).mul_(-0.5)  # e.g. load_state_dict copies new values in
        out = fused(x)
    torch.testing.assert_close(out.double(), _expected(fused, x), rtol=1e-5, atol=1e-5)


def test_inputs_the_direct_path_does_not_take_keep_the_op():
    fused = _fused()
    x = random_tensor((2, 19, 7, 9), torch.float32, "cpu", seed=5)  # NCHW
    with torch.no_grad():
        out = fused(x)
        assert list(fused._plans._plans.values()) == [False]
        with fastcnn.trace() as t:  # the op runs (and records) on every call
            again = fused(x)
    assert t.kernels("inception"), str(t)
    for y in (out, again):
        torch.testing.assert_close(y.double(), _expected(fused, x), rtol=1e-5, atol=1e-5)


def _uniform_block_call(convs: int, w_size, widths, pool: int):
    """onednn_inception on a 1x8x5x5 x with `convs` copies of one 8 -> 8 1x1 conv, claimed to
    be of w_size, with these widths and pool window (for the calls it must refuse)."""
    x = random_tensor((1, 8, 5, 5), torch.float32, "cpu", channels_last=True, seed=8)
    packed, layout = _ext.onednn_conv_pack(torch.randn(8, 8, 1, 1), (1, 8, 5, 5), (1, 1),
                                           (0, 0), 1)  # fmt: skip
    bias, out = torch.randn(8), torch.empty(1, 8, 5, 5)
    _ext.onednn_inception(x, [packed] * convs, [layout] * convs, [w_size] * convs,
                          [bias] * convs, widths, pool, out)  # fmt: skip


def test_the_block_call_refuses_a_structure_it_does_not_know():
    with pytest.raises(RuntimeError, match="4 \\(merged\\) or 6 \\(separate\\) convs"):
        _uniform_block_call(5, (8, 8, 1, 1), (2, 3, 3), 3)
    with pytest.raises(RuntimeError, match="square odd kernels"):
        _uniform_block_call(4, (8, 8, 2, 2), (2, 3, 3), 3)


def test_the_block_call_refuses_an_output_of_another_size():
    fused = _fused()
    x = random_tensor((1, 19, 5, 6), torch.float32, "cpu", channels_last=True, seed=9)
    convs = [(fused.reduce_weight, fused.reduce_bias, 0), (fused.w2, fused.b2, 1),
             (fused.w3, fused.b3, 2), (fused.w4, fused.b4, 3)]  # fmt: skip
    c_in = {0: 19, 1: fused.widths[1], 2: fused.widths[2], 3: 19}
    packs = [_ext.onednn_conv_pack(w, (1, c_in[i], 5, 6), (1, 1), (w.shape[-1] // 2,) * 2, 1)
             for w, _, i in convs]  # fmt: skip
    wrong = torch.empty(1, 5, 5, 6).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="is not the block's output"):
        _ext.onednn_inception(x, [p for p, _ in packs], [lay for _, lay in packs],
                              [tuple(w.shape) for w, _, _ in convs], [b for _, b, _ in convs],
                              tuple(fused.widths), fused.pool, wrong)  # fmt: skip


def test_the_block_call_refuses_an_even_pool():
    with pytest.raises(RuntimeError, match="odd pool window"):
        _uniform_block_call(4, (8, 8, 1, 1), (2, 3, 3), 2)


@pytest.mark.parametrize("variant", inception.VARIANTS)
def test_blocks_of_other_sizes_share_the_kept_intermediates_safely(variant, monkeypatch):
    """The intermediates live in one buffer per thread, kept between calls and grown for a
    larger block: a small block, a larger one (the buffer grows and moves), the small one again
    are each right, and an output handed out earlier is never that buffer (unchanged after the
    later calls)."""
    small, x_small, _ = _planned(variant, (1, 19, 5, 6), 11, monkeypatch)
    large, x_large, _ = _planned(variant, (3, 19, 17, 15), 12, monkeypatch)
    with torch.no_grad():
        first = small(x_small)
        kept = first.clone()
        grown = large(x_large)
        again = small(x_small)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    torch.testing.assert_close(grown.double(), _expected(large, x_large), rtol=1e-5, atol=1e-5)
    for y in (first, again):
        torch.testing.assert_close(y.double(), _expected(small, x_small), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", inception.VARIANTS)
def test_threads_running_blocks_at_once_each_get_their_own_intermediates(variant, monkeypatch):
    """Two threads, each looping over its own input through one block at the same time: every
    output right (a shared intermediates buffer would mix their branches)."""
    fused, _, _ = _planned(variant, (2, 19, 9, 8), 13, monkeypatch)
    inputs = [random_tensor((2, 19, 9, 8), torch.float32, "cpu", channels_last=True, seed=s)
              for s in (14, 15)]  # fmt: skip
    expected = [_expected(fused, x) for x in inputs]
    errors: list[float] = []

    def loop(i):
        with torch.no_grad():
            for _ in range(30):
                errors.append((fused(inputs[i]).double() - expected[i]).abs().max().item())

    threads = [threading.Thread(target=loop, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 60 and max(errors) < 1e-4, max(errors)


@pytest.mark.parametrize("widths", [(2, 3, 4), (-1, 5, 4)])
def test_the_block_call_refuses_widths_that_do_not_fit_the_reduce_conv(widths):
    """The intermediates are sized from the widths: ones that do not add up to the merged
    reduce conv's outputs (or are negative) are refused before anything is written."""
    with pytest.raises(RuntimeError, match="add up to the reduce conv"):
        _uniform_block_call(4, (8, 8, 1, 1), widths, 3)
