"""The pool pass: nn.MaxPool2d -> fastcnn.nn.MaxPool2d (the same layer; on channels_last CPU
tensors it skips computing the indices)."""

from __future__ import annotations

from torch import fx, nn

from fastcnn.nn.max_pool import MaxPool2d
from fastcnn.report import Report


def swap_max_pools(gm: fx.GraphModule, report: Report) -> None:
    modules = dict(gm.named_modules())
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for path in sorted(called):
        m = modules[path]
        if type(m) is nn.MaxPool2d and MaxPool2d.unsupported_reason(m) is None:
            gm.set_submodule(path, MaxPool2d.from_module(m))
            report.add(path, "MaxPool2d", "replaced", "CPU channels_last: no indices", "MaxPool2d")
