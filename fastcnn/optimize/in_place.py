"""The in-place pass: a fused residual conv writes its result into its shortcut's buffer where
the graph proves that buffer dead afterwards (ResNet's shortcut dies at the add; Inductor reuses
it the same way, saving an allocation per block).

The proof is an alias analysis on the FX graph. Every tensor value has a storage root: the node
that allocated its memory. A node known to return fresh memory (a conv, a BatchNorm, an
out-of-place add, torch.cat, ...) is its own root; a node that may return its input or a view
of it (slicing, view/reshape/permute/transpose/chunk/narrow, an in-place op, nn.Identity,
Dropout in eval, ...) shares its inputs' roots; the model's inputs and parameters are roots that
may never be written. A conv may overwrite its residual R only when
  * R has exactly one root, made inside the model (never an input, a parameter or a buffer);
  * every node that may alias that root was read before the conv, except the conv's own
    residual argument (so no view taken earlier is read later);
  * no alias escapes: none is returned, and none reaches a node this analysis does not know
    (an unknown function or module could store it, e.g. in a module attribute or a list);
  * the conv's input x does not share the root.
When unsure, the answer is no: unknown nodes count as escapes.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastcnn.nn.add_relu import AddReLU
from fastcnn.nn.conv_bn_act import ConvBNAct
from fastcnn.nn.fused_inception import FusedInception
from fastcnn.report import Report

FRESH, ALIAS, ESCAPE = "fresh", "alias", "escape"

# Modules whose output is new memory, never their input or a view of it (ReLU-like modules only
# when inplace=False: checked below). ConvBNAct is fresh unless it overwrites its residual.
_FRESH_MODULES = (
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Softmax,
    nn.Sigmoid,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardswish,
    nn.Hardsigmoid,
    AddReLU,
    FusedInception,
)
# Modules that may return their input itself or a view of it, and store nothing.
_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Unflatten)

_FRESH_FUNCTIONS = {
    torch.cat,
    torch.stack,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.mean,
    torch.sum,
    torch.conv2d,
    torch.clone,
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    F.conv2d,
    F.linear,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.softmax,
    F.gelu,
    F.silu,
}
# Functions that may return an input or a view of it (or write into it), and store nothing.
_ALIAS_FUNCTIONS = {
    operator.getitem,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.flatten,
    torch.reshape,
    torch.narrow,
    torch.chunk,
    torch.split,
    torch.tensor_split,
    torch.unbind,
    torch.transpose,
    torch.permute,
    torch.squeeze,
    torch.unsqueeze,
    torch.select,
    torch.t,
    torch.movedim,
    torch.swapaxes,
    torch.relu_,
    torch.detach,
    F.relu_,
}
# Functions that may take an `inplace` argument: fresh only with inplace=False.
_MAYBE_IN_PLACE_FUNCTIONS = {F.relu, F.relu6, F.hardtanh, F.silu, F.dropout, F.dropout2d}
_FRESH_METHODS = {
    "relu",
    "sigmoid",
    "tanh",
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "mean",
    "sum",
    "softmax",
    "clone",
    "size",
    "dim",
    "numel",
}
_ALIAS_METHODS = {
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "narrow",
    "chunk",
    "split",
    "tensor_split",
    "unbind",
    "permute",
    "transpose",
    "t",
    "squeeze",
    "unsqueeze",
    "select",
    "expand",
    "expand_as",
    "movedim",
    "swapaxes",
    "unfold",
    "as_strided",
    "contiguous",
    "to",
    "type",
    "type_as",
    "float",
    "half",
    "bfloat16",
    "double",
    "detach",
    "__getitem__",
}
# getattr(x, name) of these gives metadata, no tensor memory.
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}


def _classify(user: fx.Node, value: fx.Node | None, modules: dict[str, nn.Module]) -> str:
    """What `user` does with `value` (one of its inputs): makes FRESH memory, may return an
    ALIAS of it, or lets it ESCAPE (returned, stored, or an operation this pass does not know)."""
    if user.op == "output" or user.kwargs.get("out") is not None:
        return ESCAPE  # returned, or written into some other tensor
    if user.kwargs.get("inplace") is True:
        return ALIAS
    if user.op == "call_module":
        m = modules.get(user.target)
        if isinstance(m, ConvBNAct):
            overwrites = m.overwrite_residual and user.kwargs.get("residual") is value
            return ALIAS if overwrites else FRESH
        if getattr(m, "inplace", False) is True:
            return ALIAS
        if isinstance(m, _ALIAS_MODULES):
            return ALIAS
        if isinstance(m, _FRESH_MODULES) and not getattr(m, "return_indices", False):
            return FRESH
        return ESCAPE
    if user.op == "call_function":
        target = user.target
        if target is getattr and len(user.args) > 1 and user.args[1] in _METADATA_ATTRS:
            return FRESH
        if target in _MAYBE_IN_PLACE_FUNCTIONS:
            inplace = user.kwargs.get("inplace", user.args[-1] if len(user.args) > 1 else False)
            return ALIAS if inplace is not False else FRESH
        if target in _FRESH_FUNCTIONS:
            return FRESH
        if target in _ALIAS_FUNCTIONS:
            return ALIAS
        return ESCAPE
    if user.op == "call_method":
        name = user.target
        if name.endswith("_") and not name.endswith("__"):  # in-place methods return self
            return ALIAS
        if name in _ALIAS_METHODS:
            return ALIAS
        if name in _FRESH_METHODS:
            return FRESH
        return ESCAPE
    return ESCAPE


def _inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def storage_roots(node: fx.Node, modules: dict[str, nn.Module], memo: dict) -> set[fx.Node] | None:
    """The nodes whose memory `node`'s value may live in (None: unknown). Placeholders and
    get_attr nodes are roots too; callers refuse to write them."""
    if node in memo:
        return memo[node]
    memo[node] = None  # cycles cannot occur in a graph, but be safe
    if node.op in ("placeholder", "get_attr"):
        roots: set[fx.Node] | None = {node}
    elif not _inputs(node):  # e.g. a factory function, or one that returns a global tensor
        roots = {node} if _classify(node, None, modules) == FRESH else None
    else:
        kinds = {_classify(node, i, modules) for i in _inputs(node)}
        if ESCAPE in kinds:  # an unknown op: its result may be anything, even its input
            roots = None
        elif ALIAS in kinds:
            roots = set()
            for i in _inputs(node):
                if _classify(node, i, modules) != ALIAS:
                    continue
                sub = storage_roots(i, modules, memo)
                if sub is None:
                    roots = None
                    break
                roots |= sub
        else:
            roots = {node}
    memo[node] = roots
    return roots


def _aliases_of(root: fx.Node, modules: dict[str, nn.Module]) -> set[fx.Node] | None:
    """Every node whose value may share `root`'s memory (root included); None if one escapes."""
    found, todo = {root}, [root]
    while todo:
        node = todo.pop()
        for user in node.users:
            kind = _classify(user, node, modules)
            if kind == ESCAPE:
                return None
            if kind == ALIAS and user not in found:
                found.add(user)
                todo.append(user)
    return found


def overwrite_blocker(
    conv: fx.Node, modules: dict[str, nn.Module], order: dict[fx.Node, int]
) -> str | None:
    """Why the fused conv node `conv` may not write into its residual (None: it may)."""
    residual = conv.kwargs.get("residual")
    if not isinstance(residual, fx.Node):
        return "no residual"
    memo: dict = {}
    roots = storage_roots(residual, modules, memo)
    if roots is None or len(roots) != 1:
        return "the residual's memory cannot be traced to one tensor made in the model"
    (root,) = roots
    if root.op in ("placeholder", "get_attr"):
        return "the residual is (a view of) a model input or a parameter"
    x_roots = storage_roots(conv.args[0], modules, memo)
    if x_roots is None or root in x_roots:
        return "the conv reads the same memory as its input"
    aliases = _aliases_of(root, modules)
    if aliases is None:
        return "the residual (or a view of it) escapes: returned, stored or passed to an unknown op"
    for alias in aliases:
        for user in alias.users:
            if user is conv:
                if alias is not residual or conv.args[0] is alias:
                    return "the conv reads the residual's memory through another argument"
            elif order[user] > order[conv]:
                return f"{user.name} reads the residual's memory after the conv"
    return None


def overwrite_dead_residuals(gm: fx.GraphModule, report: Report) -> None:
    """Set ConvBNAct.overwrite_residual on every fused residual conv whose residual is proven
    dead after it (see the module docstring); each decision is made in graph order, so a later
    conv sees the memory an earlier one now writes into."""
    modules = dict(gm.named_modules())
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    overwriting = []
    for node in gm.graph.nodes:
        fused = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(fused, ConvBNAct) or node.kwargs.get("residual") is None:
            continue
        if overwrite_blocker(node, modules, order) is None:
            fused.overwrite_residual = True
            overwriting.append(node.target)
    if overwriting:
        report.notes.append(
            f"{len(overwriting)} fused convs write their result into their residual, which "
            f"nothing reads afterwards (one allocation fewer each): {', '.join(overwriting)}"
        )


def undo_overwrites(gm: fx.GraphModule) -> list[str]:
    """Turn every in-place rewrite back off (verify found the model's output changed)."""
    undone = []
    for name, m in gm.named_modules():
        if isinstance(m, ConvBNAct) and m.overwrite_residual:
            m.overwrite_residual = False
            undone.append(name)
    return undone
