"""verify=True: the original model's values on one example input, and the checks against them.

Each fused layer is compared with the layers it replaces on the values they saw in the original
model (per-layer tolerance FUSED_LAYER_TOLERANCE); then the whole rewritten model is compared
with the original, which catches what no single layer shows (an in-place write that a later read
still needed, a wrong rewiring). The end-to-end bound is the per-layer tolerance or four times
the original model's own rounding error against a float64 copy of it, whichever is larger: a
model that amplifies rounding (deep, random weights) gets the room its own arithmetic needs, and
a real mistake (errors of order one) never fits in it.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.utils import _pytree

from fastcnn._trace import trace
from fastcnn.report import Report

# Relative error (to the output's scale) above which verify=True reverts a fused layer: a few
# hundred times the dtype's unit roundoff (fp32 6e-8, fp16 4.9e-4, bf16 3.9e-3), since a layer's
# error grows with its reduction length and is measured against the output's largest element.
FUSED_LAYER_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# The end-to-end bound: this many times the original model's own error against float64.
NOISE_FACTOR = 4.0


def relative_error(got, expected) -> float:
    """Max abs error over the largest |expected| (at least 1), over every tensor of a (nested)
    output; NaN or a structure mismatch is infinitely wrong."""
    got_leaves, got_spec = _pytree.tree_flatten(got)
    exp_leaves, exp_spec = _pytree.tree_flatten(expected)
    if got_spec != exp_spec:
        return float("inf")
    worst = 0.0
    for g, e in zip(got_leaves, exp_leaves, strict=True):
        if not isinstance(e, torch.Tensor):
            if g != e:
                return float("inf")
            continue
        if not isinstance(g, torch.Tensor) or g.shape != e.shape:
            return float("inf")
        if not e.numel():
            continue
        err = (g.double() - e.double()).abs().max().item()
        scale = max(1.0, e.double().abs().max().item())
        if err != err:  # NaN is never within tolerance
            return float("inf")
        worst = max(worst, err / scale)
    return worst


def random_example(model: nn.Module) -> torch.Tensor | None:
    """A random [2, C, 64, 64] batch for the first Conv2d's channels, dtype and device."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return None
    w = convs[0].weight
    return torch.randn(2, convs[0].in_channels, 64, 64).to(w.device, w.dtype)


def float64_error(model: nn.Module, example: torch.Tensor, output) -> float | None:
    """The model's own rounding error on example: its output against a float64 copy's (None when
    the copy cannot run in float64, e.g. a custom kernel without double support)."""
    if example.dtype == torch.float64:
        return 0.0
    try:
        wide = copy.deepcopy(model).double()
        with torch.no_grad():
            return relative_error(wide(example.double()), output)
    except Exception:  # a model that cannot run in float64: the per-layer tolerance alone
        return None


class Verifier:
    """The original model's output on `example` (small) and, for an FX graph, the value at every
    node; and the checks against them."""

    def __init__(self, model: nn.Module, example: torch.Tensor, tolerance: float):
        self.example, self.tolerance = example, tolerance
        self.values: dict[fx.Node, object] = {}
        values = self.values

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                values[n] = super().run_node(n)
                return values[n]

        with torch.no_grad():
            if isinstance(model, fx.GraphModule):
                self.output = Recorder(model).run(example)
            else:
                self.output = model(example)
        noise = float64_error(model, example, self.output)
        self.noise = noise
        self.end_to_end_tolerance = max(tolerance, NOISE_FACTOR * (noise or 0.0))
        # A node a rewrite made -> the traced node whose value it computes.
        self.origin: dict[fx.Node, fx.Node] = {}

    def value(self, node: fx.Node):
        return self.values[self.origin.get(node, node)]

    def layer_disagrees(self, report: Report, path: str, original: str, got, expected) -> bool:
        """Compare a fused layer's output with the original layers'; on disagreement record the
        revert and return True."""
        error = relative_error(got, expected)
        if error <= self.tolerance:
            return False
        report.add(
            path,
            original,
            "reverted",
            f"verify: error {error:.2e} > tolerance {self.tolerance:.0e}, originals kept",
        )
        return True

    def model_error(self, model: nn.Module, report: Report | None = None) -> float:
        """The whole model's error against the original on the example; with a report, the
        kernels each module ran on it are recorded there too."""
        with torch.no_grad(), trace(model) as t:
            got = model(self.example)
        if report is not None:
            report.kernels = t.by_module()
        return relative_error(got, self.output)

    def describe(self, error: float) -> str:
        noise = "unknown" if self.noise is None else f"{self.noise:.1e}"
        return (
            f"verify: end-to-end relative error {error:.2e} on a random "
            f"{tuple(self.example.shape)} {str(self.example.dtype).removeprefix('torch.')} input "
            f"(bound {self.end_to_end_tolerance:.1e}: per-layer tolerance {self.tolerance:.0e}, "
            f"or {NOISE_FACTOR:g}x the original's own error against float64, {noise})"
        )
