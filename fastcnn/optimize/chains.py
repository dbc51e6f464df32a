"""The conv-chain pass: Conv2d -> BatchNorm2d [-> add(., r)] [-> ReLU] -> fastcnn.nn.ConvBNAct,
and a bare add -> ReLU -> fastcnn.nn.AddReLU."""

from __future__ import annotations

import dataclasses

from torch import fx, nn

from fastcnn.nn.add_relu import AddReLU
from fastcnn.nn.conv_bn_act import ConvBNAct
from fastcnn.optimize._graph import (
    call_counts,
    is_in_place,
    is_relu,
    is_tensor_add,
    module_path_of,
    sole_user,
    unique_name,
)
from fastcnn.optimize.verify import Verifier
from fastcnn.report import Report


@dataclasses.dataclass
class Chain:
    """One fusable chain in the graph: conv [-> bn] [-> add] [-> relu]."""

    conv: fx.Node
    bn: fx.Node | None = None
    add: fx.Node | None = None
    relu: fx.Node | None = None

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for n in (self.conv, self.bn, self.add, self.relu) if n is not None]

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]

    def residual(self) -> fx.Node | None:
        """The add's other operand, read now (earlier rewrites may have replaced it)."""
        if self.add is None:
            return None
        before = self.nodes[self.nodes.index(self.add) - 1]
        a, b = self.add.args[:2]
        return b if a is before else a

    def describe(self) -> str:
        parts = [
            "Conv2d",
            "BatchNorm2d" if self.bn else None,
            "add" if self.add else None,
            "ReLU" if self.relu else None,
        ]
        return " -> ".join(p for p in parts if p)


def conv_blocker(conv: nn.Conv2d, calls: int) -> str | None:
    """Why this conv cannot be fused, or None."""
    if calls > 1:
        return f"the module is called {calls} times (shared weights)"
    # groups > 1 (ResNeXt's grouped 3x3s, depthwise convs) fuse: triton runs one GEMM per group,
    # cpu oneDNN's groups; cuda records a fallback to the reference per call
    if conv.dilation != (1, 1):
        return f"dilation={conv.dilation}: the fused kernel takes dilation 1"
    return ConvBNAct.unsupported_reason(conv)


def grow_chain(
    conv_node: fx.Node, modules: dict[str, nn.Module], claimed: set[fx.Node]
) -> tuple[Chain, str | None]:
    """The longest fusable chain from a conv, and why it stops short of a BN if it does.
    An add that an earlier chain claimed stays with it (both operands may be conv chains)."""
    chain = Chain(conv_node)
    user = sole_user(conv_node)
    if user is None and any(
        u.op == "call_module" and isinstance(modules.get(u.target), nn.BatchNorm2d)
        for u in conv_node.users
    ):
        return chain, f"the conv output has {len(conv_node.users)} users, so BN cannot be folded"
    bn = modules.get(user.target) if user is not None and user.op == "call_module" else None
    if isinstance(bn, nn.BatchNorm2d):
        if bn.running_mean is None:
            return chain, "the BatchNorm2d tracks no running statistics"
        chain.bn = user
    tail = chain.last
    user = sole_user(tail)
    # relu(tail + r) with r another tensor (not relu(tail + tail)), not already claimed
    fusable_add = is_tensor_add(user) and list(user.args).count(tail) == 1
    if fusable_add and user not in claimed and is_relu(sole_user(user), modules):
        if not is_in_place(user) or user.args[0] is tail:  # `out += identity`, not the reverse
            chain.add, chain.relu = user, sole_user(user)
    elif is_relu(user, modules):
        chain.relu = user
    return chain, None


def find_chains(gm: fx.GraphModule, report: Report) -> list[Chain]:
    """Every fusable chain, in graph order; convs that cannot start one are reported as kept."""
    modules = dict(gm.named_modules())
    calls = call_counts(gm.graph)
    chains: list[Chain] = []
    claimed: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        blocker = conv_blocker(modules[node.target], calls[node.target])
        if blocker is None:
            chain, blocker = grow_chain(node, modules, claimed)
            if chain.bn is None and chain.relu is None:
                blocker = blocker or "no BatchNorm2d or ReLU follows it: nothing to fuse"
            else:
                chains.append(chain)
                claimed.update(chain.nodes)
                continue
        report.add(node.target, "Conv2d", "kept", blocker)
    return chains


def fuse_conv_chains(
    gm: fx.GraphModule, report: Report, backend: str | None, check: Verifier | None
) -> None:
    """Replace each chain with one ConvBNAct call (BN folded in fp32); with a verifier, a fused
    chain that disagrees with the original on the example is reverted."""
    modules = dict(gm.named_modules())
    graph = gm.graph
    chains = find_chains(gm, report)
    # Bare add -> ReLU pairs, found before the chains below take their adds away.
    claimed = {n for c in chains for n in c.nodes}
    add_relus = [
        n
        for n in graph.nodes
        if is_tensor_add(n) and n not in claimed and is_relu(sole_user(n), modules)
    ]
    for chain in chains:
        conv = modules[chain.conv.target]
        bn = modules[chain.bn.target] if chain.bn is not None else None
        fused = ConvBNAct.from_modules(conv, bn, relu=chain.relu is not None, backend=backend)
        x, residual = chain.conv.args[0], chain.residual()
        if check is not None:
            got = fused(
                check.value(x), residual=None if residual is None else check.value(residual)
            )
            if check.layer_disagrees(
                report, chain.conv.target, chain.describe(), got, check.value(chain.last)
            ):
                continue
        path = chain.conv.target
        gm.add_submodule(path, fused)
        kwargs = {"residual": residual} if chain.add is not None else {}
        with graph.inserting_after(chain.last):
            new = graph.call_module(path, args=(x,), kwargs=kwargs)
        chain.last.replace_all_uses_with(new)
        if check is not None:
            check.origin[new] = check.origin.get(chain.last, chain.last)
        for n in reversed(chain.nodes):
            graph.erase_node(n)
        reason = "BN folded in fp32" if bn is not None else "conv bias kept"
        if chain.add is not None:
            reason += "; residual add + ReLU in the epilogue"
        report.add(path, chain.describe(), "fused", reason, "ConvBNAct")
    _fuse_add_relus(gm, report, backend, add_relus)


def _fuse_add_relus(gm, report: Report, backend, add_relus: list[fx.Node]) -> None:
    graph = gm.graph
    for add in add_relus:
        relu = sole_user(add)
        name = unique_name(gm, "fastcnn_add_relu")
        gm.add_submodule(name, AddReLU(backend=backend))
        with graph.inserting_after(relu):
            new = graph.call_module(name, args=tuple(add.args))
        relu.replace_all_uses_with(new)
        graph.erase_node(relu)
        graph.erase_node(add)
        report.add(module_path_of(relu), "add -> ReLU", "fused", "one pass over memory", "AddReLU")
