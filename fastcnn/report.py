"""What fastcnn.optimize did to a model: per module, what was fused, what was kept and why."""

from __future__ import annotations

import collections
import dataclasses

import torch
from torch import nn

from fastcnn._trace import trace

ACTIONS = ("fused", "replaced", "kept", "reverted", "dropped")


@dataclasses.dataclass
class ReportEntry:
    path: str  # the module path (the first module of a fused chain)
    original: str  # e.g. "Conv2d -> BatchNorm2d -> add -> ReLU"
    action: str  # one of ACTIONS: reverted = fused, then undone by verify
    replacement: str | None  # e.g. "ConvBNAct" when fused
    reason: str  # what was fused, or why it was kept / reverted / dropped
    error: float | None = None  # measured by verify (fastcnn.quantize: relative RMS error)

    @property
    def fused(self) -> bool:
        return self.action == "fused"


@dataclasses.dataclass
class Report:
    method: str  # "torch.fx" or "module-level (...)"
    backend: str
    entries: list[ReportEntry] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    # module path -> {KernelKey: calls}, from one traced run of the model (verify=True, or
    # fastcnn.report(model, example_input=x)); empty until the model has run so.
    kernels: dict[str, collections.Counter] = dataclasses.field(default_factory=dict)

    def add(
        self, path: str, original: str, action: str, reason: str, replacement=None, error=None
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown report action {action!r}")
        self.entries.append(ReportEntry(path, original, action, replacement, reason, error))

    def by_action(self, action: str) -> list[ReportEntry]:
        return [e for e in self.entries if e.action == action]

    @property
    def fused(self) -> list[ReportEntry]:
        return self.by_action("fused")

    @property
    def kept(self) -> list[ReportEntry]:
        return self.by_action("kept")

    def __str__(self) -> str:
        rows = [("module", "original", "now", "reason")]
        rows += [(e.path, e.original, e.replacement or e.action, e.reason) for e in self.entries]
        widths = [min(48, max(len(r[i]) for r in rows)) for i in range(3)]
        lines = [f"fastcnn.optimize report (matching: {self.method}; backend: {self.backend})"]
        for i, row in enumerate(rows):
            cells = [row[c].ljust(widths[c]) for c in range(3)]
            lines.append("  ".join([*cells, row[3]]).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in [*widths, 6]))
        lines.append("totals: " + ", ".join(f"{len(self.by_action(a))} {a}" for a in ACTIONS))
        lines += [f"note: {n}" for n in self.notes]
        if self.kernels:
            lines.append("kernels run on the example (module: op backend:kernel x calls):")
            for path, counts in self.kernels.items():
                for key, n in counts.items():
                    why = f"  FALLBACK: {key.fallback}" if key.fallback else ""
                    lines.append(
                        f"  {path or '(model)'}: {key.op} {key.backend}:{key.kernel} x{n}{why}"
                    )
        return "\n".join(lines)

    def fallbacks(self) -> list[tuple[str, object]]:
        """(module path, KernelKey) of every slower path seen in the traced run."""
        return [(p, k) for p, c in self.kernels.items() for k in c if k.fallback is not None]


def report(model: nn.Module, example_input: torch.Tensor | None = None) -> Report:
    """The Report of a model returned by fastcnn.optimize. With example_input, the model runs
    once on it (no grad) and the report's `kernels` say which kernel every module ran, fallbacks
    with their reasons."""
    found = getattr(model, "_fastcnn_report", None)
    if found is None:
        raise ValueError(
            "fastcnn.report: this model was not produced by fastcnn.optimize (no report on it)"
        )
    if example_input is not None:
        with torch.no_grad(), trace(model) as t:
            model(example_input)
        found.kernels = t.by_module()
    return found
