"""What the passes left: modules no pattern took (reported as kept, with why) and modules the
eval-mode graph never calls (reported as dropped)."""

from __future__ import annotations

import torch
from torch import fx, nn

from fastcnn.nn.add_relu import AddReLU
from fastcnn.nn.conv_bn_act import ConvBNAct
from fastcnn.report import Report


def report_left_over(gm: fx.GraphModule, report: Report) -> None:
    modules = dict(gm.named_modules())
    seen = {e.path for e in report.entries}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.cat:
            report.add(
                n.name,
                "torch.cat",
                "kept",
                "branch outputs are copied into the concat (no concat elimination here)",
            )
            continue
        if n.op != "call_module" or n.target in seen:
            continue
        m = modules[n.target]
        if isinstance(m, (ConvBNAct, AddReLU)):
            continue
        seen.add(n.target)
        kind = type(m).__name__
        if isinstance(m, nn.BatchNorm2d):
            why = "not directly after a fusable Conv2d"
        elif type(m).__module__.startswith("fastcnn."):
            why = "a fastcnn block: already runs fused at inference"
        else:
            why = f"no fusion pattern for {kind}"
        report.add(n.target, kind, "kept", why)


def dropped_modules(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """Top-most submodules with parameters that the eval-mode graph never calls (e.g.
    GoogLeNet's auxiliary heads)."""
    used = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    dropped = []
    for name, m in model.named_children():
        has_weights = any(True for _ in m.parameters())
        if has_weights and not any(u == name or u.startswith(name + ".") for u in used):
            dropped.append(name)
    return dropped
