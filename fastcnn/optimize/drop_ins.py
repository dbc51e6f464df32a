"""The drop-in pass: layers fastcnn has a faster module for, the same layer with the same
state, swapped in where they are called:
  nn.MaxPool2d -> fastcnn.nn.MaxPool2d  (on channels_last CPU tensors: no indices computed)
  nn.Linear    -> fastcnn.nn.Linear     (on fp32 CPU inputs: oneDNN with a prepacked weight)"""

from __future__ import annotations

from torch import fx, nn

from fastcnn.nn.linear import Linear
from fastcnn.nn.max_pool import MaxPool2d
from fastcnn.report import Report


def _max_pool(m: nn.MaxPool2d) -> MaxPool2d | None:
    return MaxPool2d.from_module(m) if MaxPool2d.unsupported_reason(m) is None else None


def _linear(m: nn.Linear) -> Linear | None:
    # a weight that is not a Parameter is recomputed every call (weight_norm and the like):
    # it would be packed again every call, so that layer stays nn.Linear
    return Linear.from_module(m) if isinstance(m.weight, nn.Parameter) else None


# exact type -> (the drop-in for a module, or None where it cannot take it; the report's why)
_DROP_INS = {
    nn.MaxPool2d: (_max_pool, "the same layer; CPU channels_last: no indices"),
    nn.Linear: (_linear, "the same layer; fp32 CPU inference with a prepacked oneDNN weight"),
}


def swap_drop_ins(gm: fx.GraphModule, report: Report) -> None:
    modules = dict(gm.named_modules())
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for path in sorted(called):
        m = modules[path]
        drop_in = _DROP_INS.get(type(m))
        if drop_in is None:
            continue
        new = drop_in[0](m)
        if new is not None:
            gm.set_submodule(path, new)
            name = type(m).__name__
            report.add(path, name, "replaced", drop_in[1], name)
