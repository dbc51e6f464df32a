"""fastcnn.optimize: an eval-mode inference copy of a model with its fusable patterns replaced.

Patterns, found on the model's torch.fx graph (module-level matching inside nn.Sequential when
FX cannot trace it):
  Conv2d -> BatchNorm2d [-> ReLU]             -> fastcnn.nn.ConvBNAct (BN folded in fp32)
  Conv2d -> BatchNorm2d -> add(., r) -> ReLU  -> ConvBNAct(x, residual=r): ResNet's F(x) + x
  Conv2d -> ReLU, Conv2d -> add -> ReLU       -> ConvBNAct with the conv's own bias
  add(a, b) -> ReLU (no conv before it)       -> fastcnn.nn.AddReLU
  cat([1x1(x), kxk(1x1(x)), kxk(1x1(x)), 1x1(maxpool(x))], 1), each conv fused as above
                                              -> fastcnn.nn.FusedInception (GoogLeNet's block)
  nn.MaxPool2d                                -> fastcnn.nn.MaxPool2d (no indices on the CPU)
A fused residual conv writes into its shortcut's buffer where the graph proves nothing reads
the shortcut afterwards. Everything else is kept as it was, and fastcnn.report(model) says why.
"""

from __future__ import annotations

import copy
import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastcnn import _backend
from fastcnn.nn.add_relu import AddReLU
from fastcnn.nn.conv_bn_act import ConvBNAct
from fastcnn.nn.fused_inception import FusedInception, pool_size
from fastcnn.nn.max_pool import MaxPool2d
from fastcnn.report import Report

# Relative error (to the output's scale) above which verify=True reverts a fused layer.
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


@dataclasses.dataclass
class _Chain:
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


class _Tracer(fx.Tracer):
    """Leaves: torch.nn's own modules (the default) and fastcnn's blocks, which already run
    fused and branch on autograd state at run time."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("fastcnn.") or super().is_leaf_module(m, qualname)


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_relu(node: fx.Node | None, modules: dict[str, nn.Module]) -> bool:
    if node is None:
        return False
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_tensor_add(node: fx.Node | None) -> bool:
    if node is None or len(node.args) != 2 or node.kwargs:
        return False
    if not all(isinstance(a, fx.Node) for a in node.args):
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _is_in_place(add: fx.Node) -> bool:
    return add.target is operator.iadd or add.target == "add_"


def _conv_blocker(conv: nn.Conv2d, calls: int) -> str | None:
    """Why this conv cannot be fused, or None."""
    if calls > 1:
        return f"the module is called {calls} times (shared weights)"
    if conv.groups != 1:
        return f"groups={conv.groups}: the fused kernel takes groups=1 (kept for the Triton path)"
    if conv.dilation != (1, 1):
        return f"dilation={conv.dilation}: the fused kernel takes dilation 1"
    return ConvBNAct.unsupported_reason(conv)


def _grow_chain(
    conv_node: fx.Node, modules: dict[str, nn.Module], claimed: set[fx.Node]
) -> tuple[_Chain, str | None]:
    """The longest fusable chain from a conv, and why it stops short of a BN if it does.
    An add that an earlier chain claimed stays with it (both operands may be conv chains)."""
    chain = _Chain(conv_node)
    user = _sole_user(conv_node)
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
    user = _sole_user(tail)
    if _is_tensor_add(user) and user not in claimed and _is_relu(_sole_user(user), modules):
        if not _is_in_place(user) or user.args[0] is tail:  # `out += identity`, not the reverse
            chain.add, chain.relu = user, _sole_user(user)
    elif _is_relu(user, modules):
        chain.relu = user
    return chain, None


def _traced(model: nn.Module) -> fx.GraphModule:
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph, model.__class__.__name__)


def _module_path_of(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _capture(gm: fx.GraphModule, example: torch.Tensor) -> dict:
    """Run the (unmodified) graph on example, keeping every node's value (the example input is
    small) and the model's output under "output"."""
    kept: dict[fx.Node | str, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            kept[n] = super().run_node(n)
            return kept[n]

    with torch.no_grad():
        kept["output"] = Recorder(gm).run(example)
    return kept


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    err = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    return err / scale if err == err else float("inf")  # NaN is never within tolerance


def _example_input(model: nn.Module) -> torch.Tensor | None:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return None
    w = convs[0].weight
    return torch.randn(2, convs[0].in_channels, 64, 64, generator=None).to(w.device, w.dtype)


def _io_nodes(chain: _Chain) -> tuple[fx.Node, fx.Node | None, fx.Node]:
    return chain.conv.args[0], chain.residual(), chain.last


def _fx_optimize(gm: fx.GraphModule, report: Report, backend, verify, example) -> None:
    modules = dict(gm.named_modules())
    graph = gm.graph
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1

    chains: list[_Chain] = []
    claimed: set[fx.Node] = set()
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        blocker = _conv_blocker(modules[node.target], calls[node.target])
        if blocker is None:
            chain, blocker = _grow_chain(node, modules, claimed)
            if chain.bn is None and chain.relu is None:
                blocker = blocker or "no BatchNorm2d or ReLU follows it: nothing to fuse"
            else:
                chains.append(chain)
                claimed.update(chain.nodes)
                continue
        report.add(node.target, "Conv2d", "kept", blocker)

    add_relus = [
        n
        for n in graph.nodes
        if _is_tensor_add(n) and n not in claimed and _is_relu(_sole_user(n), modules)
    ]

    tolerance = None
    captured = {}
    if verify is not False and example is not None:
        tolerance = verify if isinstance(verify, float) else VERIFY_TOLERANCE.get(example.dtype)
        captured = _capture(gm, example)

    # Each chain's input, residual and output nodes as traced: rewrites below replace them.
    io_nodes = {id(c): _io_nodes(c) for c in chains}
    origin: dict[fx.Node, fx.Node] = {}  # new node -> the traced node whose value it computes
    for chain in chains:
        conv = modules[chain.conv.target]
        bn = modules[chain.bn.target] if chain.bn is not None else None
        fused = ConvBNAct.from_modules(conv, bn, relu=chain.relu is not None, backend=backend)
        if captured:
            x_node, r_node, out_node = io_nodes[id(chain)]
            r_val = captured[r_node] if r_node is not None else None
            with torch.no_grad():
                error = _relative_error(fused(captured[x_node], residual=r_val), captured[out_node])
            if error > tolerance:
                report.add(
                    chain.conv.target,
                    chain.describe(),
                    "reverted",
                    f"verify: error {error:.2e} > tolerance {tolerance:.0e}, originals kept",
                )
                continue
        path = chain.conv.target
        gm.add_submodule(path, fused)
        kwargs = {"residual": chain.residual()} if chain.add is not None else {}
        with graph.inserting_after(chain.last):
            new = graph.call_module(path, args=(chain.conv.args[0],), kwargs=kwargs)
        chain.last.replace_all_uses_with(new)
        origin[new] = chain.last
        for n in reversed(chain.nodes):
            graph.erase_node(n)
        reason = "BN folded in fp32" if bn is not None else "conv bias kept"
        if chain.add is not None:
            reason += "; residual add + ReLU in the epilogue"
        report.add(path, chain.describe(), "fused", reason, "ConvBNAct")

    for i, add in enumerate(add_relus):
        relu = _sole_user(add)
        name = f"fastcnn_add_relu_{i}"
        gm.add_submodule(name, AddReLU(backend=backend))
        with graph.inserting_after(relu):
            new = graph.call_module(name, args=tuple(add.args))
        relu.replace_all_uses_with(new)
        graph.erase_node(relu)
        graph.erase_node(add)
        report.add(_module_path_of(relu), "add -> ReLU", "fused", "one pass over memory", "AddReLU")

    _fuse_inceptions(gm, report, backend, captured, origin, tolerance)
    _overwrite_dead_residuals(gm, report)
    _swap_max_pools(gm, report)
    _report_left_over(gm, report)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    if captured:
        with torch.no_grad():
            error = _relative_error(gm(example), captured["output"])
        report.notes.append(
            f"verify: end-to-end relative error {error:.2e} on a random {tuple(example.shape)} "
            f"{str(example.dtype).removeprefix('torch.')} input (per-layer tolerance "
            f"{tolerance:.0e})"
        )


# Modules whose output is a tensor of their own (never their input or a view of it), so that a
# later op may overwrite it once nothing else reads it.
_FRESH_OUTPUT = (ConvBNAct, AddReLU, FusedInception, nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)


def _overwrite_dead_residuals(gm: fx.GraphModule, report: Report) -> None:
    """Let a fused conv write its result into its residual where the graph proves the residual
    dead after it: produced inside the model by a module with a fresh output (never the model's
    input, a parameter, a view or an in-place ReLU's input), not the conv's own input, read by
    nothing after this conv and not returned. ResNet's shortcut is such a tensor; Inductor
    reuses it the same way."""
    modules = dict(gm.named_modules())
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    overwriting = []
    for node in gm.graph.nodes:
        residual = node.kwargs.get("residual") if node.op == "call_module" else None
        fused = modules.get(node.target) if residual is not None else None
        if not isinstance(fused, ConvBNAct) or not isinstance(residual, fx.Node):
            continue
        fresh = residual.op == "call_module" and isinstance(
            modules.get(residual.target), _FRESH_OUTPUT
        )
        read_later = any(order[user] > order[node] for user in residual.users if user is not node)
        if fresh and not read_later and residual not in node.args:  # never the conv's own input
            fused.overwrite_residual = True
            overwriting.append(node.target)
    if overwriting:
        report.notes.append(
            f"{len(overwriting)} fused convs write their result into their residual, which "
            f"nothing reads afterwards (one allocation fewer each): {', '.join(overwriting)}"
        )


def _swap_max_pools(gm: fx.GraphModule, report: Report) -> None:
    """nn.MaxPool2d -> fastcnn.nn.MaxPool2d (the same layer; on channels_last CPU tensors it
    skips computing the indices)."""
    modules = dict(gm.named_modules())
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for path in sorted(called):
        m = modules[path]
        if type(m) is nn.MaxPool2d and MaxPool2d.unsupported_reason(m) is None:
            gm.set_submodule(path, MaxPool2d.from_module(m))
            report.add(path, "MaxPool2d", "replaced", "CPU channels_last: no indices", "MaxPool2d")


def _fused_conv(node, modules, kernel: int | None = None) -> ConvBNAct | None:
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


def _match_inception(cat: fx.Node, modules) -> tuple | None:
    """(x, the six branch conv nodes in FusedInception.from_folded order, the pool node, its
    size) when cat is torch.cat([1x1(x), kxk(1x1(x)), kxk(1x1(x)), 1x1(maxpool(x))], 1)."""
    branches = cat.args[0] if cat.args else None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(branches, (list, tuple)) or len(branches) != 4 or dim != 1:
        return None
    b1, b2, b3, b4 = branches
    if not (_fused_conv(b1, modules, 1) and _fused_conv(b2, modules) and _fused_conv(b3, modules)):
        return None
    if not _fused_conv(b4, modules, 1):
        return None
    x = b1.args[0]
    b2r, b3r, pool = b2.args[0], b3.args[0], b4.args[0]
    if not (_fused_conv(b2r, modules, 1) and _fused_conv(b3r, modules, 1)):
        return None
    if not (isinstance(pool, fx.Node) and pool.op == "call_module" and len(pool.users) == 1):
        return None
    size = pool_size(modules.get(pool.target))
    if size is None or not (b2r.args[0] is x and b3r.args[0] is x and pool.args[0] is x):
        return None
    return x, [b1, b2r, b2, b3r, b3, b4], pool, size


def _fuse_inceptions(gm, report: Report, backend, captured: dict, origin: dict, tolerance) -> None:
    """Replace each four-branch Inception concat (after conv fusion) with a FusedInception."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    matches = []
    for cat in graph.nodes:
        if cat.op == "call_function" and cat.target is torch.cat:
            match = _match_inception(cat, modules)
            if match is not None:  # x as traced, for verify: later rewrites replace it
                matches.append((cat, origin.get(match[0], match[0]), match))
    for i, (cat, x_traced, (_, convs, pool, size)) in enumerate(matches):
        x = convs[0].args[0]  # now: an earlier block may have been replaced
        paths = [c.target for c in convs]
        prefix = paths[0].rsplit(".", 2)[0] if paths[0].count(".") >= 1 else ""
        try:
            fused = FusedInception.from_fused([modules[p] for p in paths], size, backend)
        except (TypeError, ValueError) as exc:
            report.add(cat.name, "Inception concat", "kept", str(exc))
            continue
        if captured:
            with torch.no_grad():
                error = _relative_error(fused(captured[x_traced]), captured[cat])
            if error > tolerance:
                report.add(
                    prefix or cat.name,
                    "Inception block",
                    "reverted",
                    f"verify: error {error:.2e} > tolerance {tolerance:.0e}",
                )
                continue
        name = f"{prefix}.fastcnn_inception" if prefix else f"fastcnn_inception_{i}"
        gm.add_submodule(name, fused)
        with graph.inserting_after(cat):
            new = graph.call_module(name, args=(x,))
        cat.replace_all_uses_with(new)
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


def _report_left_over(gm: fx.GraphModule, report: Report) -> None:
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


def _dropped_modules(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """Top-most submodules with parameters that the eval-mode graph never calls (e.g.
    GoogLeNet's auxiliary heads)."""
    used = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    dropped = []
    for name, m in model.named_children():
        has_weights = any(True for _ in m.parameters())
        if has_weights and not any(u == name or u.startswith(name + ".") for u in used):
            dropped.append(name)
    return dropped


def _module_level_optimize(model: nn.Module, report: Report, backend) -> nn.Module:
    """FX could not trace the model: fuse conv -> bn (-> relu) runs inside nn.Sequential."""
    fused_ids = set()
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.children())
        i = 0
        while i < len(children) - 1:
            conv, bn = children[i], children[i + 1]
            relu = children[i + 2] if i + 2 < len(children) else None
            ok = isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            if ok and _conv_blocker(conv, 1) is None and bn.running_mean is not None:
                has_relu = isinstance(relu, nn.ReLU)
                seq[i] = ConvBNAct.from_modules(conv, bn, relu=has_relu, backend=backend)
                seq[i + 1] = nn.Identity()
                if has_relu:
                    seq[i + 2] = nn.Identity()
                path = f"{seq_name}.{i}" if seq_name else str(i)
                desc = "Conv2d -> BatchNorm2d" + (" -> ReLU" if has_relu else "")
                report.add(
                    path, desc, "fused", "BN folded in fp32 (in an nn.Sequential)", "ConvBNAct"
                )
                fused_ids.add(id(conv))
                i += 3 if has_relu else 2
            else:
                i += 1
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and id(m) not in fused_ids:
            report.add(
                name,
                "Conv2d",
                "kept",
                "FX could not trace the model and this conv is not followed by its "
                "BatchNorm2d inside an nn.Sequential",
            )
    return model


def optimize(
    model: nn.Module,
    backend: str | None = None,
    inplace: bool = False,
    verify: bool | float = False,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """An eval-mode inference copy of `model` with Conv2d -> BatchNorm2d (-> ReLU) chains,
    residual add + ReLU and bare add + ReLU fused (see the module docstring).

    backend: pin the fused modules to "triton", "cuda", "cpu" or "eager" (None: whatever is in
    force when they run). inplace=False (default) deep-copies first, so `model` is untouched;
    inplace=True skips the copy (the result shares modules with `model`, which is put in eval
    mode). verify=True (or a float tolerance) runs example_input (default: a random
    [2, C, 64, 64] batch in the model's dtype and device) through both, compares every fused
    layer with the layers it replaces, reverts those whose relative error exceeds the dtype's
    tolerance, and records it all in fastcnn.report(result). What cannot be fused is kept as it
    was; a model that torch.fx cannot trace gets module-level matching inside nn.Sequential.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastcnn.optimize expects an nn.Module, got {type(model).__name__}")
    if backend is not None:
        with _backend.use_backend(backend):  # refuses unknown or unavailable backends
            pass
    if isinstance(verify, bool) or verify is None:
        verify = bool(verify)
    elif not isinstance(verify, float) or verify <= 0:
        raise ValueError(
            f"fastcnn.optimize: verify must be a bool or a positive float, got {verify!r}"
        )
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    report = Report(method="torch.fx", backend=backend or "in force when run (default auto)")
    if type(work).__module__.startswith("fastcnn."):
        report.method = "none needed"
        report.notes.append(
            f"{type(work).__name__} is a fastcnn model: it runs fused in eval mode already"
        )
        work._fastcnn_report = report
        return work
    example = None
    if verify:
        example = example_input if example_input is not None else _example_input(work)
        if example is None:
            report.notes.append("verify: skipped, no Conv2d to size a random input from")
    try:
        gm = _traced(work)
    except Exception as exc:  # FX cannot trace data-dependent control flow and the like
        report.method = f"module-level (torch.fx could not trace: {type(exc).__name__}: {exc})"
        result = _module_level_optimize(work, report, backend)
        result._fastcnn_report = report
        return result
    for name in _dropped_modules(work, gm):
        report.add(
            name,
            type(getattr(work, name)).__name__,
            "dropped",
            "the eval-mode forward never calls it (e.g. an auxiliary head)",
        )
    _fx_optimize(gm, report, backend, verify, example)
    gm._fastcnn_report = report
    return gm
