"""Plans: what a fused module makes once per call signature (the argument checks, the backend
pick, the kernel and its output layout resolved), so that later calls only launch.

A plan is a callable; a module keeps its plans in a Plans map, under the key `plan_key` builds
from the call's tensors and everything else the plan bakes in. Each module keeps at most
MAX_PLANS plans, the newest signatures, so a server that sees many input shapes does not grow
without bound; plans hold no packed weights (fastcnn.common.weight_cache keeps those, a bounded
number per weight). The map is read without a lock and replaced whole under one: concurrent
calls from several threads each find a complete plan or none.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# A server cycling through every batch size up to 32 must not plan anew on each call; plans are
# small (their outputs live within fastcnn.common.alloc's byte budget).
MAX_PLANS = 64


def plan_key(tensors, *attributes) -> tuple:
    """The key of a plan: each tensor's (shape, strides, dtype, device), None for an absent one,
    then `attributes`, everything else the plan bakes in (the backend choice, a module's plain
    attributes that a user may change after the first call). Built on every call: keep it flat."""
    return (
        *[None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors],
        *attributes,
    )


class Plans:
    """A bounded {signature: plan} map, safe to share between threads."""

    __slots__ = ("_lock", "_plans", "get")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set({})

    def _set(self, plans: dict) -> None:
        # get(key) is the current map's own dict.get: no Python frame on the per-call path. A
        # reader that took the previous get still sees a complete map.
        self._plans: dict[tuple, Callable] = plans
        self.get = plans.get

    def add(self, key: tuple, plan: Callable) -> None:
        with self._lock:
            plans = dict(self._plans)  # replaced whole: readers never see a half-updated map
            plans.pop(key, None)
            while len(plans) >= MAX_PLANS:
                del plans[next(iter(plans))]  # the oldest signature
            plans[key] = plan
            self._set(plans)

    def __deepcopy__(self, memo) -> Plans:  # a copied module plans anew (for its own weight)
        return Plans()

    def __getstate__(self) -> dict:  # nor are plans pickled (torch.save of a module)
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        with self._lock:
            self._set({})
