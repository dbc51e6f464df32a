"""fastcnn.nn.MaxPool2d and the extension's CPU max-pool (no indices) against torch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcnn
from fastcnn import _extension
from fastcnn.cpu import pool

CASES = [  # (kernel, stride, padding, ceil_mode): GoogLeNet's and ResNet's pools and odd ones
    (3, 2, 0, True),
    (3, 1, 1, True),
    (2, 2, 0, True),
    (3, 2, 1, False),
    (5, 3, 2, True),
    (5, 1, 2, False),  # stride 1: the two-pass (separable) kernel, a wider window
    (2, 1, 0, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("channels", [13, 40])  # a vector tail, and whole vectors
def test_matches_torch(case, channels, dtype):
    kernel, stride, padding, ceil = case
    x = torch.randn(2, channels, 11, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    got = pool.max_pool2d(x, kernel, stride, padding, ceil)
    expected = F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil)
    assert got is not None and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, expected)  # a max is exact


def test_output_size_matches_torch():
    for size in range(1, 12):
        for kernel, stride, padding, ceil in CASES:
            if size + 2 * padding < kernel:
                continue
            x = torch.empty(1, 1, size, size)
            expected = F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil).shape[-1]
            assert pool.output_size(size, kernel, stride, padding, ceil) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stride", [2, 1])  # the direct and the two-pass kernel
def test_nan_wins_as_in_torch(stride, dtype):
    x = torch.randn(1, 19, 6, 6)
    x[0, 3, 2, 2] = float("nan")  # in a vector (16 lanes: fp32, and bf16/fp16 compared as fp32)
    x[0, 18, 0, 0] = float("nan")  # in the scalar tail
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    got = pool.max_pool2d(x, 3, stride, 0, True)
    expected = F.max_pool2d(x, 3, stride, 0, ceil_mode=True)
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert torch.isnan(got[0, 3, 0, 0]) and torch.isnan(got[0, 18, 0, 0])


def test_writes_into_a_channel_slice():
    x = torch.randn(2, 13, 9, 9).contiguous(memory_format=torch.channels_last)
    big = torch.full((2, 20, 9, 9), float("nan")).contiguous(memory_format=torch.channels_last)
    _extension.ops().max_pool2d_out(x, [3, 3], [1, 1], [1, 1], big[:, 4:17])
    assert torch.equal(big[:, 4:17], F.max_pool2d(x, 3, 1, 1))
    assert torch.isnan(big[:, :4]).all() and torch.isnan(big[:, 17:]).all()


def test_refuses_what_it_cannot_run():
    x = torch.randn(2, 13, 9, 9)
    assert "channels_last" in pool.unsupported_reason(x, 3, 2, 0, True)  # torch's kernel runs
    cl = x.contiguous(memory_format=torch.channels_last)
    assert pool.unsupported_reason(cl, 3, 2, 0, True) is None
    assert "float" in pool.unsupported_reason(cl.double(), 3, 2, 0, True)
    assert "autograd" in pool.unsupported_reason(cl.requires_grad_(), 3, 2, 0, True)
    with pytest.raises(RuntimeError, match="x must be channels_last"):
        _extension.ops().max_pool2d_out(x, [3, 3], [1, 1], [1, 1], torch.empty_like(x))


@pytest.mark.parametrize("channels_last", [True, False])
def test_module_is_a_drop_in(channels_last):
    ref = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    fast = fastcnn.nn.MaxPool2d.from_module(ref)
    assert isinstance(fast, nn.MaxPool2d) and repr(fast) == repr(ref)
    x = torch.randn(2, 13, 11, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with fastcnn.trace() as t:
        y = fast(x)
    assert torch.equal(y, ref(x))
    (event,) = t.events  # the path taken, and a visible reason when it is torch's
    if channels_last:
        assert (event.backend, event.kernel, event.fallback) == ("cpu", "indices_free", None)
    else:
        assert event.kernel == "max_pool2d" and "channels_last" in event.fallback


def test_module_keeps_autograd_and_indices():
    x = torch.randn(1, 5, 8, 8, requires_grad=True)
    fastcnn.nn.MaxPool2d(2)(x.contiguous(memory_format=torch.channels_last)).sum().backward()
    assert x.grad is not None and x.grad.sum() == 5 * 16  # one max per 2x2 window
    with_indices = fastcnn.nn.MaxPool2d(2, return_indices=True)
    assert fastcnn.nn.MaxPool2d.unsupported_reason(with_indices) is not None
    y, idx = with_indices(x.detach())
    assert idx.dtype == torch.int64 and y.shape == idx.shape


def test_module_writes_into_its_last_output_once_nothing_holds_it():
    """The layer's output memory comes back at the same shape only once the caller dropped it:
    an output still held keeps its values, and every output is right."""
    fast = fastcnn.nn.MaxPool2d(3, stride=2, ceil_mode=True)
    xs = [torch.randn(2, 13, 11, 11).contiguous(memory_format=torch.channels_last) for _ in "ab"]
    expected = [F.max_pool2d(x, 3, 2, ceil_mode=True) for x in xs]
    with torch.no_grad():
        first = fast(xs[0])
        held = fast(xs[1])  # first still held: a new buffer
        assert held.data_ptr() != first.data_ptr()
        assert torch.equal(first, expected[0]) and torch.equal(held, expected[1])
        address = held.data_ptr()
        del held
        again = fast(xs[0])  # held dropped: its memory again (first's is still held)
        assert again.data_ptr() == address and torch.equal(again, expected[0])
        assert torch.equal(first, expected[0])
        other = fast(torch.randn(1, 13, 9, 9).contiguous(memory_format=torch.channels_last))
    assert other.shape == (1, 13, 4, 4) and len(fast._outputs) == 2  # one output per shape


def test_a_pool_pickled_before_it_kept_outputs_still_runs():
    import io
    import pickle

    fast = fastcnn.nn.MaxPool2d(3, stride=2, ceil_mode=True)
    del fast.__dict__["_outputs"]  # as a fastcnn before this change pickled it
    loaded = pickle.load(io.BytesIO(pickle.dumps(fast)))
    x = torch.randn(1, 5, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(loaded(x), F.max_pool2d(x, 3, 2, ceil_mode=True))


def test_the_kernel_refuses_an_output_with_windows_past_the_input():
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    out = torch.empty(1, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="windows past x"):
        _extension.ops().max_pool2d_out(x, [3, 3], [1, 1], [1, 1], out)
