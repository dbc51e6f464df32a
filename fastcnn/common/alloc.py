"""Where every op allocates the tensors its kernels write: one place, so that tests can poison
them. With poisoning on (tests/conftest.py turns it on for the whole suite), each new buffer is
filled with NaN before the kernel runs, so an element a kernel forgets to write stays NaN and
fails the comparison, on a GPU too, where the caching allocator could otherwise hand a kernel a
block that still holds another backend's correct result."""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import weakref
from collections.abc import Iterator

import torch

from fastcnn.common.shapes import memory_format_of

_poison: float | None = None


def _fill(t: torch.Tensor) -> torch.Tensor:
    # uint8 (int8 models) cannot hold NaN: a byte pattern no test input makes marks it instead
    return t.fill_(_poison if t.is_floating_point() else 0xA5)


def empty(shape, like: torch.Tensor, memory_format=torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)
    return t if _poison is None else _fill(t)


def empty_strided(shape, strides, like: torch.Tensor) -> torch.Tensor:
    """A [shape] tensor with these strides in like's dtype and device: the cheapest allocation
    (about half of torch.empty(..., memory_format=...)'s host time), for launch plans that
    computed the strides once."""
    t = like.new_empty_strided(shape, strides)
    return t if _poison is None else _fill(t)


def _budget_from_env() -> int:
    """FASTCNN_CACHE_BUDGET: bytes, with an optional K, M or G suffix (default 256M)."""
    text = os.environ.get("FASTCNN_CACHE_BUDGET", "256M").strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    try:
        budget = int(float(number) * scale)
    except ValueError:
        budget = -1
    if budget < 0:
        raise ValueError(
            f"FASTCNN_CACHE_BUDGET must be a byte count like 268435456 or 256M, got {text!r}"
        )
    return budget


# Outputs used within this many of the latest planned calls (all modules together) are never
# dropped to make room: a server cycling through batch sizes uses every shape's outputs once a
# cycle, and a plain LRU smaller than a cycle would drop each just before its reuse (every call
# allocating anew, the kept set churning, which fragments the heap). Past the window an output
# counts as out of use and gives way: 4096 calls, 32 batch sizes of a 128-module model.
RECENT_CALLS = 4096


class KeptOutputs:
    """The memory all planned outputs keep between calls (Recycled), under one byte budget.
    A new output is kept if it fits, after dropping outputs unused for RECENT_CALLS planned
    calls (least recently used first); otherwise it is not kept (its plan allocates on each
    call, as with no budget), so what is in steady use stays and the total never exceeds the
    budget. A lower budget (set_cache_budget) drops the least recently used at once."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        # id(owner) -> (weak reference, bytes, the call count at its last use), oldest use first
        self._lru: collections.OrderedDict[int, tuple[weakref.ref, int, int]] = (
            collections.OrderedDict()
        )
        self._total = 0
        self.calls = 0  # planned calls, all owners together: the clock of "last use"
        self._lock = threading.Lock()
        # (key, weak reference) of owners that died, dropped from _lru under the lock by the
        # next call: a weak reference's callback runs wherever the garbage collector runs, and
        # that may be this thread inside the lock (any allocation there can start a
        # collection), so it takes no lock itself: list.append is atomic
        self._dead: list[tuple[int, weakref.ref]] = []

    @property
    def total(self) -> int:
        """Bytes kept now."""
        with self._lock:
            self._drop_dead()
            return self._total

    def _drop_dead(self) -> None:  # under the lock
        while self._dead:
            key, ref = self._dead.pop()
            entry = self._lru.get(key)
            if entry is not None and entry[0] is ref:  # not a new owner at a reused id
                del self._lru[key]
                self._total -= entry[1]

    def keep(self, owner: Recycled, nbytes: int, displace_from: int | None = None) -> bool:
        """owner asks to keep nbytes, now. False (owner keeps nothing) when they do not fit
        the budget beside the outputs in recent use. displace_from: a `calls` reading; outputs
        last used since then may give way too, least recently used first (a CPU program
        replaces the module-path calls made since, whose outputs it no longer needs)."""
        victims = []
        with self._lock:
            self._drop_dead()
            self.calls += 1
            _, old, _ = self._lru.pop(id(owner), (None, 0, 0))
            self._total -= old
            unused_before = self.calls - RECENT_CALLS
            over = self._total + nbytes > self.budget
            for key, (ref, size, used) in list(self._lru.items()) if over else ():  # oldest first
                if self._total + nbytes <= self.budget:
                    break
                if used > unused_before and (displace_from is None or used <= displace_from):
                    if displace_from is None:
                        break  # in recent use: so are all the later ones
                    continue
                del self._lru[key]
                self._total -= size
                victims.append(ref())
            fits = self._total + nbytes <= self.budget
            if fits:
                self._lru[id(owner)] = (weakref.ref(owner, self._died(id(owner))), nbytes,
                                        self.calls)  # fmt: skip
                self._total += nbytes
        _drop(victims)
        return fits

    def evict(self) -> None:
        """Drop the least recently used outputs until the total is within the budget."""
        victims = []
        with self._lock:
            self._drop_dead()
            while self._total > self.budget and self._lru:
                _, (ref, size, _) = self._lru.popitem(last=False)
                self._total -= size
                victims.append(ref())
        _drop(victims)

    def touch(self, owner: Recycled) -> None:
        with self._lock:
            self.calls += 1
            entry = self._lru.pop(id(owner), None)
            if entry is not None:
                self._lru[id(owner)] = (*entry[:2], self.calls)

    def forget(self, owner: Recycled) -> None:
        with self._lock:
            self._drop_dead()
            _, size, _ = self._lru.pop(id(owner), (None, 0, 0))
            self._total -= size

    def _died(self, key: int):
        def forget(ref):
            self._dead.append((key, ref))

        return forget


def _drop(victims) -> None:
    for victim in victims:  # a call holding the tensor keeps its memory alive regardless
        if victim is not None:
            victim._keep = None


kept_outputs = KeptOutputs(_budget_from_env())


def set_cache_budget(nbytes: int) -> int:
    """Bytes that planned outputs may keep between calls, all modules together (default
    256 MiB, or env FASTCNN_CACHE_BUDGET); returns the previous budget. Outputs used within the
    last RECENT_CALLS planned calls stay; a new output that does not fit beside them is not
    kept (its calls allocate afresh). 0 keeps none: every call allocates its output."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"fastcnn.set_cache_budget: a byte count >= 0 expected, got {nbytes!r}")
    previous, kept_outputs.budget = kept_outputs.budget, nbytes
    kept_outputs.evict()
    return previous


class Recycled:
    """The output buffer of one planned CPU call, handed out again once nothing else holds its
    memory: a new [shape] tensor with these strides otherwise.

    Writing into memory that was just written and freed keeps it in cache; a fresh allocation of
    a large output is cold (benchmarks/cpu_ab.py --switch recycled measures the difference:
    cpu_ab_recycled.json). Safe by construction: the buffer is reused only when its storage has no
    other holder at all (the tensor handed out, any view of it, a storage object, a C++
    reference: each holds the storage), is the memory we allocated and not shared with another
    process, checked and claimed under a lock, so two threads never get one buffer. The plan
    keeps the memory of its last output between calls, one output per plan, all of them within
    one byte budget (KeptOutputs, set_cache_budget)."""

    __slots__ = ("__weakref__", "_keep", "_lock", "_memory", "shape", "strides")

    def __init__(self, shape, strides) -> None:
        self.shape, self.strides = tuple(shape), tuple(strides)
        self._keep: torch.Tensor | None = None  # a tensor of our own on the last output's memory
        self._memory: tuple[int, int] = (0, 0)  # (address, bytes) of the memory we allocated
        self._lock = threading.Lock()

    def get(self, like: torch.Tensor) -> torch.Tensor:
        with self._lock:
            keep = self._keep
            reused = keep is not None and self._only_ours(keep)
            if reused:
                t = keep.detach()
            else:
                t = like.new_empty_strided(self.shape, self.strides)
                # detach(): an alias that is not a view, so it holds no reference to t itself
                # (a view's base would keep t's hold on the memory alive: never free)
                self._keep = t.detach()
                self._memory = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        # the budget's lock after this one's, never the other way round
        if reused:
            kept_outputs.touch(self)
        elif not kept_outputs.keep(self, self._memory[1]):
            self._keep = None
        return t if _poison is None else _fill(t)

    def _only_ours(self, keep: torch.Tensor) -> bool:
        """May keep's memory be written again? Nothing holds it but us, it is still the memory
        we allocated (a storage resized or moved to shared memory in place is not: another
        process may map it, torch.multiprocessing keeps no count of it), and it is a tensor of
        the grad mode the caller runs (an inference tensor only under inference_mode)."""
        if _holders(keep) != _ONLY_OURS:  # first: a storage object held here would count
            return False
        storage = keep.untyped_storage()
        return (
            (storage.data_ptr(), storage.nbytes()) == self._memory
            and not storage.is_shared()
            and keep.is_inference() == torch.is_inference_mode_enabled()
        )


def _holders(t: torch.Tensor) -> tuple[int, int]:
    """Who holds t's memory: tensors and views (each counts in the storage's use count, as does
    the storage's Python object, one per storage) and that Python object (its refcount)."""
    storage = t.untyped_storage()
    return torch._C._storage_Use_Count(storage._cdata), sys.getrefcount(storage)


def _only_ours() -> tuple[int, int]:
    """_holders of a tensor that nothing else holds (measured: the counts differ between torch
    versions)."""
    t = torch.empty(1)
    ours = t.detach()
    del t
    return _holders(ours)


_ONLY_OURS = _only_ours()


def new_output(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """An empty [N, C, H, W] tensor in x's memory format (channels_last in, channels_last out)."""
    return empty(shape, x, memory_format_of(x))


def empty_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x's shape and strides (x dense), in x's dtype unless `dtype` is given."""
    t = torch.empty_like(x, dtype=dtype)
    return t if _poison is None else _fill(t)


@contextlib.contextmanager
def poisoned(value: float = float("nan")) -> Iterator[None]:
    """Fill every buffer an op allocates with `value` (NaN) inside the block (for tests)."""
    global _poison
    before, _poison = _poison, value
    try:
        yield
    finally:
        _poison = before
