"""The Inception pass: torch.cat([1x1(x), kxk(1x1(x)), kxk(1x1(x)), 1x1(maxpool(x))], 1), each
conv already a fused ConvBNAct, -> one fastcnn.nn.FusedInception (GoogLeNet's block)."""

from __future__ import annotations

import torch
from torch import fx

from fastcnn.nn.conv_bn_act import ConvBNAct
from fastcnn.nn.fused_inception import FusedInception, pool_size
from fastcnn.optimize._graph import unique_name
from fastcnn.optimize.verify import Verifier
from fastcnn.report import Report


def fused_conv(node, modules, kernel: int | None = None) -> ConvBNAct | None:
    """node's ConvBNAct if it is a plain one (ReLU, no residual, one user); kernel=1 asks for a
    1x1 conv."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or node.kwargs:
        return None
    m = modules.get(node.target)
    if not isinstance(m, ConvBNAct) or not m.relu or len(node.users) != 1:
        return None
    if kernel is not None and tuple(m.kernel_size) != (kernel, kernel):
        return None
    return m


def match_inception(cat: fx.Node, modules) -> tuple | None:
    """(x, the six branch conv nodes in FusedInception.from_folded order, the pool node, its
    size) when cat is torch.cat([1x1(x), kxk(1x1(x)), kxk(1x1(x)), 1x1(maxpool(x))], 1)."""
    branches = cat.args[0] if cat.args else None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(branches, (list, tuple)) or len(branches) != 4 or dim != 1:
        return None
    b1, b2, b3, b4 = branches
    if not (fused_conv(b1, modules, 1) and fused_conv(b2, modules) and fused_conv(b3, modules)):
        return None
    if not fused_conv(b4, modules, 1):
        return None
    x = b1.args[0]
    b2r, b3r, pool = b2.args[0], b3.args[0], b4.args[0]
    if not (fused_conv(b2r, modules, 1) and fused_conv(b3r, modules, 1)):
        return None
    if not (isinstance(pool, fx.Node) and pool.op == "call_module" and len(pool.users) == 1):
        return None
    size = pool_size(modules.get(pool.target))
    if size is None or not (b2r.args[0] is x and b3r.args[0] is x and pool.args[0] is x):
        return None
    return x, [b1, b2r, b2, b3r, b3, b4], pool, size


def fuse_inceptions(gm, report: Report, backend, check: Verifier | None) -> None:
    """Replace each four-branch Inception concat (after conv fusion) with a FusedInception."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    matches = []
    for cat in graph.nodes:
        if cat.op == "call_function" and cat.target is torch.cat:
            match = match_inception(cat, modules)
            if match is not None:
                matches.append((cat, match))
    for cat, (_, convs, pool, size) in matches:
        x = convs[0].args[0]  # now: an earlier block may have been replaced
        paths = [c.target for c in convs]
        prefix = paths[0].rsplit(".", 2)[0] if paths[0].count(".") >= 1 else ""
        try:
            fused = FusedInception.from_fused([modules[p] for p in paths], size, backend)
        except (TypeError, ValueError) as exc:
            report.add(cat.name, "Inception concat", "kept", str(exc))
            continue
        if check is not None:
            with torch.no_grad():
                got = fused(check.value(x))
            if check.layer_disagrees(
                report, prefix or cat.name, "Inception block", got, check.value(cat)
            ):
                continue
        name = unique_name(gm, f"{prefix}.fastcnn_inception" if prefix else "fastcnn_inception")
        gm.add_submodule(name, fused)
        with graph.inserting_after(cat):
            new = graph.call_module(name, args=(x,))
        cat.replace_all_uses_with(new)
        if check is not None:
            check.origin[new] = check.origin.get(cat, cat)
        graph.erase_node(cat)
        for n in [convs[5], pool, convs[4], convs[3], convs[2], convs[1], convs[0]]:
            graph.erase_node(n)
        for entry in report.entries:
            if entry.path in paths:
                entry.replacement = "FusedInception"
                entry.reason += f" (inside {name})"
        report.add(
            name,
            "4 branches -> torch.cat",
            "fused",
            "1x1s on the input as one GEMM, max-pool fused, no concat",
            "FusedInception",
        )
