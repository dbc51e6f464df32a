"""The fallback for models torch.fx cannot trace: fuse Conv2d -> BatchNorm2d (-> ReLU) runs that
sit next to each other inside an nn.Sequential (the only place where module order is data order
without a graph). With a verifier, each fused run is compared with the modules it replaces on the
values they saw on the example (caught by forward hooks), and the whole model's output is
compared after the swap; if that differs, every swap is undone."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastcnn.nn.conv_bn_act import ConvBNAct
from fastcnn.optimize.chains import conv_blocker
from fastcnn.optimize.verify import Verifier
from fastcnn.report import Report


@dataclasses.dataclass
class _Run:
    seq: nn.Sequential
    path: str
    index: int
    modules: list[nn.Module]  # conv, bn (, relu)
    seen_in: torch.Tensor | None = None  # the conv's input on the example
    seen_out: torch.Tensor | None = None  # the run's output on the example
    calls: int = 0

    @property
    def describe(self) -> str:
        return "Conv2d -> BatchNorm2d" + (" -> ReLU" if len(self.modules) == 3 else "")


def _find_runs(model: nn.Module) -> list[_Run]:
    runs = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.children())
        i = 0
        while i < len(children) - 1:
            conv, bn = children[i], children[i + 1]
            ok = isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
            if ok and conv_blocker(conv, 1) is None and bn.running_mean is not None:
                relu = children[i + 2] if i + 2 < len(children) else None
                run = [conv, bn, relu] if isinstance(relu, nn.ReLU) else [conv, bn]
                path = f"{seq_name}.{i}" if seq_name else str(i)
                runs.append(_Run(seq, path, i, run))
                i += len(run)
            else:
                i += 1
    return runs


def _watch(runs: list[_Run]) -> list:
    """Forward hooks that keep each run's input and output (clones: a later in-place ReLU must
    not change what was kept) and count the conv's calls."""
    handles = []
    for run in runs:

        def seen_in(module, args, run=run):
            run.calls += 1
            run.seen_in = args[0].detach().clone()

        def seen_out(module, args, output, run=run):
            run.seen_out = output.detach().clone()

        handles.append(run.modules[0].register_forward_pre_hook(seen_in))
        handles.append(run.modules[-1].register_forward_hook(seen_out))
    return handles


def module_level_optimize(
    model: nn.Module, report: Report, backend: str | None, check: Verifier | None
) -> nn.Module:
    runs = _find_runs(model)
    if check is not None:  # record what each run sees on the example (the model is untouched)
        handles = _watch(runs)
        try:
            with torch.no_grad():
                model(check.example)
        finally:
            for h in handles:
                h.remove()
    swapped: list[_Run] = []
    for run in runs:
        conv, bn = run.modules[:2]
        if run.calls > 1:
            report.add(run.path, run.describe, "kept", f"called {run.calls} times (shared)")
            continue
        fused = ConvBNAct.from_modules(conv, bn, relu=len(run.modules) == 3, backend=backend)
        if check is not None and run.seen_in is not None:
            with torch.no_grad():
                got = fused(run.seen_in)
            if check.layer_disagrees(report, run.path, run.describe, got, run.seen_out):
                continue
        run.seq[run.index] = fused
        for j in range(1, len(run.modules)):
            run.seq[run.index + j] = nn.Identity()
        swapped.append(run)
        report.add(
            run.path, run.describe, "fused", "BN folded in fp32 (in an nn.Sequential)", "ConvBNAct"
        )
    fused_convs = {id(r.modules[0]) for r in swapped}
    reported = {e.path for e in report.entries}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and id(m) not in fused_convs and name not in reported:
            report.add(
                name,
                "Conv2d",
                "kept",
                "FX could not trace the model and this conv is not followed by its "
                "BatchNorm2d inside an nn.Sequential",
            )
    if check is None:
        return model
    error = check.model_error(model, report)
    report.notes.append(check.describe(error))
    if error > check.end_to_end_tolerance:
        report.kernels = {}
        for run in swapped:  # put the original modules back
            for j, m in enumerate(run.modules):
                run.seq[run.index + j] = m
        for entry in report.entries:
            if entry.action == "fused":
                entry.action, entry.replacement = "reverted", None
                entry.reason = "verify: the whole model's output changed, every swap undone"
    return model
