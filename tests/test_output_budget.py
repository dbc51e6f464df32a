"""The byte budget of planned outputs kept between calls (fastcnn.common.alloc.KeptOutputs): the
total never exceeds it, outputs in recent use stay when a server cycles through more shapes than
fit (a plain LRU would drop each just before its reuse), outputs out of use give way, and a
lower budget takes effect at once."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastcnn
from fastcnn.common import alloc

_LIKE = torch.empty(1)
_FLOATS = 10  # each buffer here: 40 bytes


@pytest.fixture
def budget(monkeypatch):
    """A fresh budget of 100 bytes (two of the 40-byte buffers), in place of the process's."""
    kept = alloc.KeptOutputs(100)
    monkeypatch.setattr(alloc, "kept_outputs", kept)
    return kept


def _buffers(count: int) -> list[alloc.Recycled]:
    return [alloc.Recycled((_FLOATS,), (1,)) for _ in range(count)]


def _serve(buffers, rounds: int) -> list[list[int]]:
    """Each buffer's call in turn, `rounds` times: the addresses each round handed out."""
    seen = []
    for _ in range(rounds):
        seen.append([b.get(_LIKE).data_ptr() for b in buffers])  # each freed at once
    return seen


def test_cycling_through_more_outputs_than_fit_keeps_reusing_those_kept(budget):
    shapes = _buffers(5)  # a server cycling through 5 shapes; 2 fit
    seen = _serve(shapes, 4)
    assert budget.total <= budget.budget
    assert budget.total == 2 * 4 * _FLOATS
    kept = [b for b in shapes if b._keep is not None]
    assert kept == shapes[:2]  # the first to come stay: in use every cycle
    for later in seen[1:]:
        assert later[:2] == seen[0][:2]  # their memory comes back every cycle


def test_outputs_out_of_use_give_way_to_new_ones(budget, monkeypatch):
    """Traffic moves to another shape: its outputs are refused while the old ones are in
    recent use, and displace them once they have gone RECENT_CALLS calls unused."""
    monkeypatch.setattr(alloc, "RECENT_CALLS", 8)
    old, new = _buffers(2), _buffers(2)
    _serve(old, 1)
    assert all(b._keep is not None for b in old)
    _serve(new, 1)
    assert all(b._keep is None for b in new)  # the old ones are still in recent use
    seen = _serve(new, 4)  # 8 calls after their last use the old ones are out of use
    assert all(b._keep is None for b in old)
    assert all(b._keep is not None for b in new)
    assert seen[-1] == seen[-2]  # kept: the same memory every call
    assert budget.total == 2 * 4 * _FLOATS


def test_outputs_used_since_a_reading_may_give_way_to_what_replaces_them(budget):
    """keep(displace_from=clock): outputs last used since that reading of the call clock give
    way (a CPU program replacing the module-path calls made since), older ones in recent use
    stay."""
    older, replaced = _buffers(1), _buffers(1)
    _serve(older, 1)
    start = budget.calls
    _serve(replaced, 1)
    owner = alloc.Recycled((_FLOATS,), (1,))
    assert not budget.keep(owner, 60)  # both in recent use: no room without displacing
    assert budget.keep(owner, 60, displace_from=start)
    assert older[0]._keep is not None and replaced[0]._keep is None
    assert budget.total == 4 * _FLOATS + 60 <= budget.budget


def test_an_output_larger_than_the_budget_is_never_kept(budget):
    large = alloc.Recycled((100,), (1,))  # 400 bytes
    assert large.get(_LIKE).shape == (100,)
    assert large._keep is None and budget.total == 0
    assert large.get(_LIKE).shape == (100,)  # still served: allocated per call


def test_a_lower_budget_drops_the_least_recently_used_at_once(budget):
    a, b = _buffers(2)
    _serve([a, b], 1)
    previous = fastcnn.set_cache_budget(50)
    try:
        assert previous == 100
        assert a._keep is None and b._keep is not None
        assert budget.total == 4 * _FLOATS
        fastcnn.set_cache_budget(0)
        assert budget.total == 0 and b._keep is None
    finally:
        fastcnn.set_cache_budget(previous)


def test_a_dead_owner_gives_its_bytes_back(budget):
    (a,) = _buffers(1)
    _serve([a], 1)
    assert budget.total == 4 * _FLOATS
    del a
    assert budget.total == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1G"])
def test_set_cache_budget_refuses_what_is_not_a_byte_count(bad):
    with pytest.raises(ValueError, match="a byte count >= 0"):
        fastcnn.set_cache_budget(bad)


@pytest.mark.parametrize(
    "text, expected",
    [(None, 256 << 20), ("512M", 512 << 20), ("1g", 1 << 30), ("0", 0), ("4096", 4096)],
)
def test_the_environment_sets_the_budget(text, expected):
    env = {} if text is None else {"FASTCNN_CACHE_BUDGET": text}
    assert _budget_in_subprocess(env).stdout.strip() == str(expected)


@pytest.mark.parametrize("text", ["lots", "-5M", "1T"])
def test_a_malformed_environment_budget_is_named(text):
    done = _budget_in_subprocess({"FASTCNN_CACHE_BUDGET": text})
    assert done.returncode != 0
    assert "FASTCNN_CACHE_BUDGET must be a byte count" in done.stderr


def _budget_in_subprocess(env: dict) -> subprocess.CompletedProcess:
    import os

    environment = {k: v for k, v in os.environ.items() if k != "FASTCNN_CACHE_BUDGET"}
    code = "from fastcnn.common import alloc; print(alloc.kept_outputs.budget)"
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_owner_collected_while_the_budget_is_locked_does_not_deadlock(budget, monkeypatch):
    """A Recycled that only a reference cycle holds dies when the garbage collector runs, and
    that may be inside the budget's lock (any allocation there can start a collection): its
    weak reference's callback must not wait for that lock. The collection is made to happen
    there (while keep() makes its weak reference); run in a thread, so a deadlock fails the
    test instead of hanging it."""
    import gc
    import threading

    def collecting_ref(*args):
        gc.collect()  # as an allocation in the lock may start one
        return real_ref(*args)

    def serve() -> None:
        cycle: list = []
        cycle.append(cycle)
        cycle.append(_buffers(1)[0])
        _serve(cycle[1:], 1)  # kept: its weak reference is in the budget
        del cycle  # unreachable now, freed only by a collection
        monkeypatch.setattr(alloc.weakref, "ref", collecting_ref)
        _serve(alive, 1)

    real_ref, alive = alloc.weakref.ref, _buffers(1)
    gc.disable()  # no collection but the one in the lock
    try:
        worker = threading.Thread(target=serve, daemon=True)
        worker.start()
        worker.join(timeout=60)
    finally:
        gc.enable()
    assert not worker.is_alive(), "deadlocked: a weak reference callback waited for the lock"
    monkeypatch.undo()
    assert budget.total == 4 * _FLOATS  # the dead owner's bytes given back, the new one's kept
