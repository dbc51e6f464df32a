"""Calibration: run the fp32 graph over the calibration batches and observe every activation."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import fx

from fastcnn.quantize.observers import Observer


def _is_activation(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point()


def run_observing(gm: fx.GraphModule, batches, on_value: Callable[[fx.Node, torch.Tensor], None]):
    """Run gm on each batch, calling on_value(node, value) for every 4-D float activation."""

    class Watcher(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if _is_activation(value):
                on_value(n, value)
            return value

    with torch.no_grad():
        for x in batches:
            Watcher(gm).run(x)


def calibrate(gm: fx.GraphModule, batches: list, kind: str, percentile: float) -> dict:
    """{node: Observer} for every activation of gm, after the passes `kind` needs."""
    observers: dict[fx.Node, Observer] = {}

    def first_pass(node, value):
        if node not in observers:
            observers[node] = Observer(kind, percentile)
        observers[node].observe_range(value)

    run_observing(gm, batches, first_pass)
    bad = {node.name: o.nonfinite for node, o in observers.items() if o.nonfinite}
    if bad:
        where = ", ".join(f"{name} ({count})" for name, count in list(bad.items())[:5])
        warnings.warn(
            f"fastcnn.quantize: {sum(bad.values())} non-finite values (NaN/Inf) in the "
            f"calibration activations of {len(bad)} tensors, e.g. {where}: ignored, their "
            "ranges come from the finite values (a tensor with none gets scale 1); check the "
            "calibration data",
            RuntimeWarning,
            stacklevel=4,  # the caller of fastcnn.quantize
        )
    if kind != "minmax":
        run_observing(gm, batches, lambda node, value: observers[node].observe_histogram(value))
    return observers
