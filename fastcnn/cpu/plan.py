"""The bounded map in which a fused module keeps its per-signature plans
(fastcnn.ops.conv_bn_act.plan: checks and backend pick done once per input signature).

A server that sees many input shapes must not grow without bound: each module keeps at most
MAX_PLANS plans, the newest signatures. Plans hold no packed weights (fastcnn.cpu.onednn keeps
at most SHAPES_PER_WEIGHT packs per weight), so a model's memory per shape stays within those
two bounds whatever mix of batch sizes it serves. The map is read without a lock and replaced
whole under one: concurrent calls from several threads each find a complete plan or none.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

MAX_PLANS = 8


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
