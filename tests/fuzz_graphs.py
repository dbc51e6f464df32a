"""Differential graph fuzzing of fastcnn.optimize, in the manner of NNSmith: random small CNN
graphs built from the patterns optimize rewrites and the ones that tempt it, each run eagerly
and through optimize on every backend, compared, and on a mismatch shrunk to the smallest graph
that still shows it.

A graph is a Program: a list of Ops, each reading earlier values by index (value 0 is the
input) and making one new value, plus the values returned. FuzzNet runs a Program as an
nn.Module whose forward is a plain loop over it, so torch.fx traces it into the straight-line
graph optimize sees. Shapes are tracked while generating, so every program is valid.
"""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn.functional as F
from fastcnn_testing import randomize_batchnorm
from torch import nn

import fastcnn


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # see FuzzNet._run_op
    srcs: tuple[int, ...]  # the values it reads
    params: tuple = ()  # kind-specific, hashable


@dataclasses.dataclass(frozen=True)
class Program:
    in_channels: int
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]

    def describe(self) -> str:
        lines = [f"v0 = input [N, {self.in_channels}, H, W]"]
        for i, op in enumerate(self.ops, 1):
            srcs = ", ".join(f"v{s}" for s in op.srcs)
            lines.append(f"v{i} = {op.kind}({srcs}{', ' if op.params else ''}{op.params})")
        lines.append(f"return {', '.join(f'v{o}' for o in self.outputs)}")
        return "\n".join(lines)


Shape = tuple[int, int, int]  # (C, H, W); the batch is fixed


def _conv_out(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


class Generator:
    """Random valid programs; `shapes[i]` is value i's (C, H, W)."""

    def __init__(self, rng: random.Random, in_channels: int, h: int, w: int):
        self.rng = rng
        self.shapes: list[Shape] = [(in_channels, h, w)]
        self.ops: list[Op] = []
        self.views: set[int] = set()  # values made by a view op (never written in place)

    def _pick(self, ok=lambda s: True) -> int | None:
        found = [i for i, s in enumerate(self.shapes) if ok(s)]
        return self.rng.choice(found) if found else None

    def _add(self, op: Op, shape: Shape) -> None:
        self.ops.append(op)
        self.shapes.append(shape)

    def conv(self) -> None:
        r = self.rng
        src = self._pick(lambda s: min(s[1:]) >= 3)
        if src is None:
            return
        c, h, w = self.shapes[src]
        k = r.choice([1, 1, 3, 3, 5]) if min(h, w) >= 5 else r.choice([1, 3])
        stride = r.choice([1, 1, 2])
        pad = r.choice([0, k // 2, k // 2])
        cout = r.choice([4, 6, 8, 12])
        groups = r.choice([1, 1, 1, 2, c]) if c % 2 == 0 and cout % 2 == 0 else 1
        if cout % groups or c % groups:
            groups = 1
        bn = r.random() < 0.85
        relu = r.choice(["module", "function", "method", "inplace", None])
        bias = r.random() < 0.3
        shape = (cout, _conv_out(h, k, stride, pad), _conv_out(w, k, stride, pad))
        if min(shape[1:]) < 1:
            return
        residual, in_place_add = None, False
        if r.random() < 0.5:  # a residual add: any earlier value of the output's shape
            residual = self._pick(lambda s: s == shape)
            in_place_add = residual is not None and r.random() < 0.3
        srcs = (src,) if residual is None else (src, residual)
        params = (cout, k, stride, pad, groups, bn, relu, bias, in_place_add)
        self._add(Op("conv", srcs, params), shape)

    def pool(self) -> None:
        src = self._pick(lambda s: min(s[1:]) >= 3)
        if src is None:
            return
        c, h, w = self.shapes[src]
        k, stride = self.rng.choice([(3, 1), (3, 2), (2, 2)])
        pad = 1 if k == 3 and self.rng.random() < 0.7 else 0
        ceil = self.rng.random() < 0.5
        ho = F.max_pool2d(torch.empty(1, 1, h, w), k, stride, pad, ceil_mode=ceil).shape[-2:]
        self._add(Op("pool", (src,), (k, stride, pad, ceil)), (c, *ho))

    def add_relu(self) -> None:
        a = self._pick()
        b = self._pick(lambda s: s == self.shapes[a])
        self._add(Op("add_relu", (a, b), (self.rng.random() < 0.3,)), self.shapes[a])

    def view(self) -> None:
        """A view of an earlier value, kept as a value of its own (read later, or not)."""
        src = self._pick(lambda s: s[0] >= 2)
        if src is None:
            return
        c, h, w = self.shapes[src]
        kind = self.rng.choice(["slice", "narrow", "chunk", "transpose", "permute", "relu_"])
        if kind == "relu_" and (src == 0 or src in self.views):
            kind = "slice"  # never the caller's input; torch refuses some views' in-place ops
        lo = self.rng.randrange(c // 2)
        shape = {
            "slice": (c - lo, h, w),
            "narrow": (c // 2, h, w),
            "chunk": (c // 2, h, w),  # the second chunk of two
            "transpose": (c, w, h),
            "permute": (c, h, w),  # permuted to NHWC and back: a strided view
            "relu_": (c - lo, h, w),
        }[kind]
        self._add(Op("view", (src,), (kind, lo, c // 2)), shape)
        self.views.add(len(self.shapes) - 1)

    def inception(self) -> None:
        src = self._pick(lambda s: min(s[1:]) >= 3)
        if src is None:
            return
        r = self.rng
        c1, c2r, c2, c3r, c3, c4 = (r.choice([2, 3, 4]) for _ in range(6))
        k2, k3 = r.choice([1, 3]), r.choice([3, 5])
        pool = r.choice([3, 3, 5])
        _, h, w = self.shapes[src]
        self._add(
            Op("inception", (src,), (c1, c2r, c2, k2, c3r, c3, k3, c4, pool)),
            (c1 + c2 + c3 + c4, h, w),
        )

    def cat(self) -> None:
        a = self._pick()
        b = self._pick(lambda s: s[1:] == self.shapes[a][1:])
        c = self.shapes[a][0] + self.shapes[b][0]
        self._add(Op("cat", (a, b)), (c, *self.shapes[a][1:]))

    def scale(self) -> None:
        a = self._pick()
        self._add(Op("scale", (a,), (self.rng.choice([0.5, -1.0, 2.0]),)), self.shapes[a])

    def generate(self, n_ops: int) -> Program:
        makers = [self.conv] * 6 + [self.pool, self.add_relu, self.view, self.view]
        makers += [self.inception, self.cat, self.scale]
        while len(self.ops) < n_ops:
            self.rng.choice(makers)()
        last = len(self.shapes) - 1
        extra = self.rng.sample(range(1, last), k=min(self.rng.choice([0, 0, 1, 2]), last - 1))
        return Program(self.shapes[0][0], tuple(self.ops), tuple(sorted({last, *extra})))


def random_program(seed: int) -> tuple[Program, tuple[int, ...], bool]:
    """A program, an input shape [N, C, H, W] and whether the input is channels_last."""
    rng = random.Random(seed)
    c, h, w = rng.choice([3, 4, 8]), rng.randint(5, 13), rng.randint(5, 13)
    program = Generator(rng, c, h, w).generate(rng.randint(2, 9))
    return program, (rng.choice([1, 2]), c, h, w), rng.random() < 0.6


class FuzzNet(nn.Module):
    """Runs a Program. Its layers (real Conv2d/BatchNorm2d/ReLU/MaxPool2d modules, named
    op<i>_<name>, as optimize expects them) are made by one run on a meta tensor of the input's
    shape, so a shrunk program needs no shape bookkeeping."""

    def __init__(self, program: Program, input_shape, seed: int):
        super().__init__()
        self.program = program
        self.layers = nn.ModuleDict()
        with torch.device("meta"):
            self.forward(torch.empty(input_shape))
        self.to_empty(device="cpu")
        torch.manual_seed(seed)
        for m in self.modules():  # activations of order one through a few layers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=0.1)
        randomize_batchnorm(self, seed=seed)

    def _layer(self, name: str, make) -> nn.Module:
        if name not in self.layers:  # only while building, on meta tensors
            self.layers[name] = make().eval()
        return self.layers[name]

    def _conv(self, name: str, x, cout: int, k: int, stride=1, pad=None, groups=1, bias=False):
        pad = k // 2 if pad is None else pad
        return self._layer(
            name, lambda: nn.Conv2d(x.shape[1], cout, k, stride, pad, groups=groups, bias=bias)
        )(x)

    def _bn(self, name: str, x):
        return self._layer(name, lambda: nn.BatchNorm2d(x.shape[1]))(x)

    def _cbr(self, name: str, x, cout: int, k: int):
        return torch.relu(self._bn(f"{name}_bn", self._conv(name, x, cout, k)))

    def _run_op(self, i: int, op: Op, v: list):
        src, p = v[op.srcs[0]], f"op{i}"
        if op.kind == "conv":
            cout, k, stride, pad, groups, bn, relu, bias, in_place_add = op.params
            y = self._conv(f"{p}_conv", src, cout, k, stride, pad, groups, bias)
            if bn:
                y = self._bn(f"{p}_bn", y)
            if len(op.srcs) == 2:
                if in_place_add:
                    y += v[op.srcs[1]]
                else:
                    y = y + v[op.srcs[1]]
            if relu == "module":
                return self._layer(f"{p}_relu", nn.ReLU)(y)
            if relu == "function":
                return F.relu(y)
            if relu == "method":
                return y.relu()
            return torch.relu_(y) if relu == "inplace" else y
        if op.kind == "pool":
            k, stride, pad, ceil = op.params
            return self._layer(f"{p}_pool", lambda: nn.MaxPool2d(k, stride, pad, ceil_mode=ceil))(
                src
            )
        if op.kind == "add_relu":
            y = src + v[op.srcs[1]]
            return y.relu_() if op.params[0] else torch.relu(y)
        if op.kind == "view":
            kind, lo, half = op.params
            if kind == "slice":
                return src[:, lo:]
            if kind == "narrow":
                return src.narrow(1, lo, half)
            if kind == "chunk":
                return torch.chunk(src, 2, dim=1)[1]
            if kind == "transpose":
                return src.transpose(2, 3)
            if kind == "permute":
                return src.permute(0, 2, 3, 1).permute(0, 3, 1, 2)
            return torch.relu_(src[:, lo:])  # writes into src's memory too
        if op.kind == "inception":
            c1, c2r, c2, k2, c3r, c3, k3, c4, pool = op.params
            pooled = self._layer(
                f"{p}_pool", lambda: nn.MaxPool2d(pool, 1, pool // 2, ceil_mode=True)
            )(src)
            return torch.cat(
                [
                    self._cbr(f"{p}_b1", src, c1, 1),
                    self._cbr(f"{p}_b2", self._cbr(f"{p}_b2r", src, c2r, 1), c2, k2),
                    self._cbr(f"{p}_b3", self._cbr(f"{p}_b3r", src, c3r, 1), c3, k3),
                    self._cbr(f"{p}_b4", pooled, c4, 1),
                ],
                1,
            )
        if op.kind == "cat":
            return torch.cat([src, v[op.srcs[1]]], 1)
        if op.kind == "scale":
            return src * op.params[0]
        raise ValueError(op.kind)

    def forward(self, x):
        v = [x]
        for i, op in enumerate(self.program.ops, 1):
            v.append(self._run_op(i, op, v))
        outs = [v[o] for o in self.program.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)


class InvalidProgram(ValueError):
    """The program itself does not run eagerly (only shrinking makes such programs)."""


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def find_mismatch(program: Program, input_shape, channels_last: bool, backends, seed: int):
    """(backend, what differs) for the first backend on which optimize(model) does not compute
    what the model computes on a random input (or writes into the input, or gives something
    else on a second call); None when every backend agrees."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        model = FuzzNet(program, input_shape, seed).eval()
        with torch.no_grad():
            wide = [o.double() for o in _outputs(model.double()(x.double()))]
            model.float()
            eager = _outputs(model(x.clone()))
    except Exception as exc:  # shrinking made an invalid program (shapes no longer fit)
        raise InvalidProgram(f"{type(exc).__name__}: {exc}") from exc
    noise = [(e.double() - w).abs().max().item() for e, w in zip(eager, wide, strict=True)]
    for backend in backends:
        with torch.no_grad():
            fast = fastcnn.optimize(model, backend=backend)
            kept = x.clone()
            # twice: a second call must not see state the first left behind (weight packs,
            # overwritten buffers); once in Triton's interpreter, which is slow
            runs = [_outputs(fast(x)) for _ in range(1 if backend == "triton" else 2)]
        if not torch.equal(x, kept):
            return backend, "optimize's model wrote into its input"
        for run, got in enumerate(runs, 1):
            if len(got) != len(wide):
                return backend, f"{len(got)} outputs, eager {len(wide)}"
            for j, (y, w, n) in enumerate(zip(got, wide, noise, strict=True)):
                if y.shape != w.shape:
                    return backend, f"output {j}: shape {tuple(y.shape)}, eager {tuple(w.shape)}"
                err = (y.double() - w).abs().max().item()
                scale = max(1.0, w.abs().max().item())
                # fp32 against float64: four times eager's own error, or 1e-5 of the output's
                # scale, whichever is larger (tests/fastcnn_testing.py explains the factor)
                if not err <= max(4 * n, 1e-5 * scale):  # NaN fails too
                    return backend, (
                        f"output {j} (call {run}): max error {err:.3g} vs float64, eager's own "
                        f"{n:.3g}, scale {scale:.3g}"
                    )
    return None


def _without(program: Program, index: int) -> Program | None:
    """program without op `index` (0-based): what read its value reads its first input instead
    (the result may be invalid: shrink's predicate rejects those); the last value is returned
    when no output is left; None when no op is."""
    remap = {0: 0}
    kept_ops: list[Op] = []
    for i, op in enumerate(program.ops, 1):
        if i == index + 1:
            remap[i] = remap[op.srcs[0]]
            continue
        remap[i] = len(kept_ops) + 1
        kept_ops.append(Op(op.kind, tuple(remap[s] for s in op.srcs), op.params))
    if not kept_ops:
        return None
    outputs = tuple(sorted({remap[o] for o in program.outputs} - {0})) or (len(kept_ops),)
    return Program(program.in_channels, tuple(kept_ops), outputs)


def shrink(program: Program, fails) -> Program:
    """The smallest program (by removing ops and outputs, until no single removal keeps it
    failing) for which fails(program) is still true."""
    changed = True
    while changed:
        changed = False
        for i in range(len(program.ops)):
            smaller = _without(program, i)
            if smaller is not None and fails(smaller):
                program, changed = smaller, True
                break
        if not changed and len(program.outputs) > 1:
            for o in program.outputs:
                smaller = dataclasses.replace(
                    program, outputs=tuple(p for p in program.outputs if p != o)
                )
                if fails(smaller):
                    program, changed = smaller, True
                    break
    return program
