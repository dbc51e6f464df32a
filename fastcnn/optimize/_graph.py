"""FX helpers every optimize pass shares: tracing, and recognizing ReLUs, adds and users."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


class Tracer(fx.Tracer):
    """Leaves: torch.nn's own modules (the default) and fastcnn's blocks, which already run
    fused and branch on autograd state at run time."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("fastcnn.") or super().is_leaf_module(m, qualname)


def traced(model: nn.Module) -> fx.GraphModule:
    """model's FX graph module. Raises when the forward stores a tensor in a module attribute
    (a side effect FX tracing drops: the rewritten model would silently stop storing it)."""
    before = {id(m): dict(vars(m)) for m in model.modules()}
    graph = Tracer().trace(model)
    for name, m in model.named_modules():
        for attr, value in list(vars(m).items()):
            if isinstance(value, fx.Proxy):
                setattr(m, attr, before[id(m)].get(attr))  # undo what tracing stored
                raise RuntimeError(
                    f"forward stores a tensor in {name or type(model).__name__}.{attr}, a side "
                    "effect an FX graph cannot keep"
                )
    return fx.GraphModule(model, graph, model.__class__.__name__)


def sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def is_relu(node: fx.Node | None, modules: dict[str, nn.Module]) -> bool:
    if node is None:
        return False
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def is_tensor_add(node: fx.Node | None) -> bool:
    if node is None or len(node.args) != 2 or node.kwargs:
        return False
    if not all(isinstance(a, fx.Node) for a in node.args):
        return False
    if node.op == "call_function":
        return node.target in ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def is_in_place(add: fx.Node) -> bool:
    return add.target is operator.iadd or add.target == "add_"


def module_path_of(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def call_counts(graph: fx.Graph) -> dict[str, int]:
    """How many times the graph calls each module (a module called twice shares weights)."""
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    return calls


def unique_name(gm: fx.GraphModule, base: str) -> str:
    """base, or base_1, base_2, ... : the first submodule path not taken in gm (two blocks whose
    layers share a parent must not get the same fused module)."""
    name, i = base, 0
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            return name
        i += 1
        name = f"{base}_{i}"
