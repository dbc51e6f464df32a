"""The int8 rewrite of a fastcnn.optimize graph: which tensors are uint8, with which qparams,
and the new graph with QConvBNAct modules and the float <-> uint8 converters between regions.

Starting point: the fp32 graph fastcnn.optimize made (ConvBNAct with BN folded in fp32, residual
adds in the convs' epilogues, FusedInception blocks, MaxPool2d). FusedInception is expanded back
into its six ConvBNAct + max-pool + torch.cat first (`expand_inceptions`), because each branch
needs its own activation scales. Then, per node of that graph (`plan`):
  - a ConvBNAct chosen for int8 reads uint8 (input and residual) and writes uint8;
  - a max-pool of a uint8 tensor stays uint8 with the same qparams (max commutes with them);
  - a concat with a uint8 input is uint8 in ONE scale, its own: producers that feed only the
    concat write straight in it, any other input is requantized (or quantized) into it;
  - everything else (pooling to the classifier, Linear, a float-kept conv) runs in float.
`build` then emits the graph, converting each value at most once per direction.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fastcnn.nn.conv_bn_act import ConvBNAct
from fastcnn.nn.fused_inception import FusedInception
from fastcnn.nn.max_pool import MaxPool2d
from fastcnn.nn.quantized import Dequantize, QConvBNAct, QParams, Quantize, Requantize

# The six convs of a FusedInception in its from_folded order, as torchvision names them.
_INCEPTION_CONVS = (
    "branch1.conv",
    "branch2.0.conv",
    "branch2.1.conv",
    "branch3.0.conv",
    "branch3.1.conv",
    "branch4.1.conv",
)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_conv(gm, node) -> bool:
    return isinstance(_module(gm, node), ConvBNAct)


def _is_pool(gm, node) -> bool:
    return isinstance(_module(gm, node), nn.MaxPool2d)


def _is_cat(node) -> bool:
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim == 1


def expand_inceptions(gm: fx.GraphModule) -> list[str]:
    """Replace every FusedInception call by its branches (ConvBNAct modules named as in
    torchvision: PREFIX.branch1.conv, ...) and a torch.cat; returns the blocks' prefixes."""
    expanded = []
    for node in list(gm.graph.nodes):
        block = _module(gm, node)
        if not isinstance(block, FusedInception):
            continue
        prefix = node.target.rsplit(".", 1)[0] if "." in node.target else node.target
        c1, c2r, _ = block.widths
        rw, rb = block.reduce_weight, block.reduce_bias
        folded = [
            (rw[:c1], rb[:c1]),
            (rw[c1 : c1 + c2r], rb[c1 : c1 + c2r]),
            (block.w2, block.b2),
            (rw[c1 + c2r :], rb[c1 + c2r :]),
            (block.w3, block.b3),
            (block.w4, block.b4),
        ]
        paths = []
        for name, (w, b) in zip(_INCEPTION_CONVS, folded, strict=True):
            k = w.shape[-1]
            conv = ConvBNAct(w.shape[1], w.shape[0], k, padding=k // 2, relu=True,
                             device=w.device, dtype=w.dtype, backend=block.backend)  # fmt: skip
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
            paths.append(f"{prefix}.{name}")
            gm.add_submodule(paths[-1], conv)
        pool_path = f"{prefix}.branch4.0"
        gm.add_submodule(pool_path, MaxPool2d(block.pool, 1, block.pool // 2, ceil_mode=True))
        graph = gm.graph
        x = node.args[0]
        with graph.inserting_before(node):
            b1 = graph.call_module(paths[0], (x,))
            b2 = graph.call_module(paths[2], (graph.call_module(paths[1], (x,)),))
            b3 = graph.call_module(paths[4], (graph.call_module(paths[3], (x,)),))
            b4 = graph.call_module(paths[5], (graph.call_module(pool_path, (x,)),))
            cat = graph.call_function(torch.cat, ([b1, b2, b3, b4], 1))
        node.replace_all_uses_with(cat)
        graph.erase_node(node)
        expanded.append(prefix)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return expanded


def residual_of(node: fx.Node) -> fx.Node | None:
    r = node.kwargs.get("residual")
    return r if isinstance(r, fx.Node) else None


def plan(gm: fx.GraphModule, int8_convs: set[fx.Node], observed: dict) -> tuple[set, dict]:
    """(the nodes whose values are uint8, {node: QParams}) for the int8 graph. `observed` maps
    each observed node to its calibrated QParams."""
    quantized: set[fx.Node] = set()
    qparams: dict[fx.Node, QParams] = dict(observed)
    for node in gm.graph.nodes:
        if node in int8_convs:
            quantized.add(node)
        elif _is_pool(gm, node) and node.args[0] in quantized:
            quantized.add(node)
            qparams[node] = qparams[node.args[0]]
        elif _is_cat(node) and any(i in quantized for i in node.args[0]):
            quantized.add(node)
    # A concat's producers that feed nothing else write in the concat's scale directly.
    for node in gm.graph.nodes:
        if node in quantized and _is_cat(node):
            for i in node.args[0]:
                if i in int8_convs and len(i.users) == 1:
                    qparams[i] = qparams[node]
    return quantized, qparams


class _Builder:
    """Emits the int8 graph node by node; each value converted at most once per direction."""

    def __init__(self, gm, quantized, qparams, make_qconv):
        self.gm, self.quantized, self.qparams = gm, quantized, qparams
        self.make_qconv = make_qconv
        self.graph = fx.Graph()
        self.as_float: dict[fx.Node, fx.Node] = {}
        self.as_uint8: dict[tuple[fx.Node, QParams], fx.Node] = {}
        self.converters = 0

    def _converter(self, module: nn.Module, kind: str, source: fx.Node, new_input: fx.Node):
        self.converters += 1
        name = f"int8_{kind}_{source.name}_{self.converters}"
        self.gm.add_submodule(name, module)
        return self.graph.call_module(name, (new_input,))

    def float_of(self, node):
        if not isinstance(node, fx.Node):
            return node
        if node not in self.as_float:
            q = self.as_uint8[(node, self.qparams[node])]
            self.as_float[node] = self._converter(
                Dequantize(self.qparams[node]), "dequantize", node, q
            )
        return self.as_float[node]

    def uint8_of(self, node, target: QParams | None = None):
        own = self.qparams.get(node)
        target = target or own
        key = (node, target)
        if key not in self.as_uint8:
            if node in self.quantized:
                source = self.as_uint8[(node, own)]
                module = Requantize(own, target)
                self.as_uint8[key] = self._converter(module, "requantize", node, source)
            else:
                source = self.float_of(node)
                self.as_uint8[key] = self._converter(Quantize(target), "quantize", node, source)
        return self.as_uint8[key]

    def emit(self, node: fx.Node) -> None:
        graph, gm = self.graph, self.gm
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], self.float_of))
            return
        if node not in self.quantized:
            new = graph.node_copy(node, self.float_of)
            self.as_float[node] = new
            return
        own = self.qparams[node]
        if is_conv(gm, node):
            x, r = node.args[0], residual_of(node)
            module = self.make_qconv(node, self.qparams[x], own, self.qparams.get(r))
            gm.set_submodule(node.target, module)
            kwargs = {"residual": self.uint8_of(r)} if r is not None else {}
            new = graph.call_module(node.target, (self.uint8_of(x),), kwargs)
        elif _is_cat(node):
            inputs = [self.uint8_of(i, own) for i in node.args[0]]
            new = graph.call_function(torch.cat, (inputs, 1))
        else:  # a max-pool of a uint8 tensor
            new = graph.call_module(node.target, (self.uint8_of(node.args[0]),))
        self.as_uint8[(node, own)] = new


def build(gm: fx.GraphModule, quantized: set, qparams: dict, make_qconv) -> fx.GraphModule:
    """The int8 GraphModule (gm's modules, int8 convs swapped in place by make_qconv(node,
    x_qparams, out_qparams, residual_qparams))."""
    builder = _Builder(gm, quantized, qparams, make_qconv)
    for node in gm.graph.nodes:
        builder.emit(node)
    new = fx.GraphModule(gm, builder.graph, gm.__class__.__name__)
    new.graph.lint()
    new.recompile()
    new.delete_all_unused_submodules()
    return new


_FRESH = (QConvBNAct, Quantize, Requantize, nn.MaxPool2d)


def overwrite_dead_residuals(gm: fx.GraphModule) -> list[str]:
    """Let an int8 conv write over its uint8 residual where nothing reads that tensor later
    (ResNet's shortcut): oneDNN's sum post-op then needs no copy. Returns the conv paths."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    done = []
    for node in gm.graph.nodes:
        module = _module(gm, node)
        r = residual_of(node) if isinstance(module, QConvBNAct) else None
        if r is None or not isinstance(_module(gm, r), _FRESH) or r in node.args:
            continue
        if any(order[u] > order[node] or u.op == "output" for u in r.users if u is not node):
            continue
        module.overwrite_residual = True
        done.append(node.target)
    return done


def count_converters(gm: fx.GraphModule) -> dict[str, int]:
    counts = {"quantize": 0, "dequantize": 0, "requantize": 0}
    for m in gm.modules():
        for kind, cls in (("requantize", Requantize), ("dequantize", Dequantize)):
            if type(m) is cls:
                counts[kind] += 1
        if type(m) is Quantize:
            counts["quantize"] += 1
    return counts


__all__ = [
    "build",
    "count_converters",
    "expand_inceptions",
    "is_conv",
    "overwrite_dead_residuals",
    "plan",
    "residual_of",
]
