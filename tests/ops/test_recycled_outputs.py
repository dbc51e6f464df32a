"""fastcnn.common.alloc.Recycled: a planned CPU call's output memory is handed out again only when
nothing else holds it, never to two callers at once, poisoned like any new buffer in tests; and
planned convs' outputs kept by the caller keep their values."""

from __future__ import annotations

import threading

import pytest
import torch
from fastcnn_testing import assert_matches, conv_reference64, random_tensor

import fastcnn
from fastcnn import _extension
from fastcnn.common import alloc

_LIKE = torch.empty(1)


def _recycled():
    return alloc.Recycled((2, 3, 4), (12, 4, 1))


def test_the_memory_comes_back_once_nothing_holds_it():
    buffers = _recycled()
    first = buffers.get(_LIKE)
    address = first.data_ptr()
    del first
    again = buffers.get(_LIKE)
    assert again.data_ptr() == address
    assert again.shape == (2, 3, 4) and again.stride() == (12, 4, 1)


@pytest.mark.parametrize(
    "holder",
    [
        lambda t: t,  # the tensor itself
        lambda t: t[1:],  # a view of it
        lambda t: t.untyped_storage(),  # its storage
        lambda t: [t.view(-1)],  # a view kept in a container
    ],
    ids=["tensor", "view", "storage", "view-in-list"],
)
def test_memory_still_held_is_never_handed_out(holder):
    buffers = _recycled()
    first = buffers.get(_LIKE)
    first.fill_(7.0)
    address, kept = first.data_ptr(), holder(first)
    del first
    second = buffers.get(_LIKE)
    assert second.data_ptr() != address
    second.fill_(-1.0)
    assert kept is not None
    assert (torch.frombuffer(bytearray(_bytes_at(address)), dtype=torch.float32) == 7.0).all()


def _bytes_at(address: int) -> bytes:
    import ctypes

    return ctypes.string_at(address, 24 * 4)


def test_concurrent_callers_never_share_a_buffer():
    buffers = _recycled()
    barrier = threading.Barrier(4)
    seen: list[list[int]] = [[] for _ in range(4)]

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(200):
            t = buffers.get(_LIKE)
            t.fill_(float(i))
            seen[i].append(int((t != i).sum()))  # another thread wrote into our buffer?
            del t

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(count == 0 for counts in seen for count in counts)


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.share_memory_(),  # e.g. sent through torch.multiprocessing: another
        # process maps it and nothing here counts that
        lambda t: t.untyped_storage().resize_(0),  # the memory itself replaced
    ],
    ids=["moved-to-shared-memory", "storage-resized"],
)
def test_memory_that_changed_under_us_is_not_written_again(change):
    buffers = _recycled()
    first = buffers.get(_LIKE)
    change(first)
    address = first.untyped_storage().data_ptr()
    del first
    again = buffers.get(_LIKE)
    assert again.untyped_storage().data_ptr() != address or address == 0
    again.fill_(1.0)  # writable, its full size
    assert again.numel() == 24


def test_outside_inference_mode_no_inference_tensor_is_handed_out():
    buffers = _recycled()
    with torch.inference_mode():
        buffers.get(_LIKE)
    with torch.no_grad():
        t = buffers.get(_LIKE)
    assert not t.is_inference()
    t.add_(1)  # an inference tensor would refuse this outside inference_mode


def test_a_recycled_buffer_is_poisoned_again_in_tests():
    buffers = _recycled()
    with alloc.poisoned(float("nan")):
        first = buffers.get(_LIKE)
        first.fill_(1.0)
        del first
        again = buffers.get(_LIKE)
    assert torch.isnan(again).all()


_ext = _extension.load()


@pytest.mark.skipif(
    _ext is None or not hasattr(_ext, "onednn_conv"),
    reason="the extension was built without the oneDNN library: no cpu plan is made",
)
def test_planned_conv_outputs_the_caller_keeps_keep_their_values():
    conv = fastcnn.nn.ConvBNAct(6, 10, 3, padding=1, backend="cpu").eval()
    with torch.no_grad():
        conv.weight.copy_(random_tensor(conv.weight.shape, torch.float32, "cpu", seed=2) * 0.2)
        conv.bias.copy_(random_tensor((10,), torch.float32, "cpu", seed=4))
    x = random_tensor((2, 6, 7, 9), torch.float32, "cpu", channels_last=True, seed=3)
    with torch.no_grad():
        conv(x)  # plans
        kept = [conv(x * scale) for scale in (1.0, -2.0, 0.5)]
        dropped = conv(x).data_ptr()
        again = conv(x)  # the last output's memory, free again
    assert len({y.data_ptr() for y in kept}) == 3
    assert again.data_ptr() == dropped
    for y, scale in zip(kept, (1.0, -2.0, 0.5), strict=True):
        expected = conv_reference64(x * scale, conv.weight.detach(), conv.bias.detach(), 1, 1)
        assert_matches(y, expected, torch.float32)
