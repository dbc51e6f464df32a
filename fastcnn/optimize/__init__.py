"""fastcnn.optimize: an eval-mode inference copy of a model with its fusable patterns replaced.

Patterns, found on the model's torch.fx graph (module-level matching inside nn.Sequential when
FX cannot trace it), one pass per file, run in this order:
  chains.py      Conv2d -> BatchNorm2d [-> ReLU]             -> fastcnn.nn.ConvBNAct (BN folded
                 Conv2d -> BatchNorm2d -> add(., r) -> ReLU  -> ConvBNAct(x, residual=r)  in fp32)
                 Conv2d -> ReLU, Conv2d -> add -> ReLU       -> ConvBNAct with the conv's own bias
                 add(a, b) -> ReLU (no conv before it)       -> fastcnn.nn.AddReLU
  inception.py   cat([1x1(x), kxk(1x1(x)), kxk(1x1(x)), 1x1(maxpool(x))], 1) of fused convs
                                                             -> fastcnn.nn.FusedInception
  in_place.py    a fused residual conv writes into its shortcut's buffer where an alias
                 analysis proves nothing reads that memory afterwards
  drop_ins.py    nn.MaxPool2d, nn.Linear                     -> fastcnn.nn.MaxPool2d, .Linear
  leftovers.py   what no pattern took is kept, and fastcnn.report(model) says why
The result's forward runs on the CPU as one program per input signature where every layer
allows (fastcnn/optimize/program.py), module by module otherwise.
verify.py checks each rewrite and the whole model on an example input (verify=True);
module_level.py is the fallback for models FX cannot trace.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn

from fastcnn.common.arguments import check_backend, check_model, verify_tolerance
from fastcnn.cuda_graphs import MAX_GRAPHS, CUDAGraphed
from fastcnn.optimize import chains, drop_ins, in_place, inception, leftovers, program
from fastcnn.optimize._graph import traced
from fastcnn.optimize.module_level import module_level_optimize
from fastcnn.optimize.verify import FUSED_LAYER_TOLERANCE, Verifier, random_example
from fastcnn.report import Report

__all__ = ["FUSED_LAYER_TOLERANCE", "optimize"]
_CALLER = "fastcnn.optimize"


def _fx_optimize(
    work: nn.Module, gm: fx.GraphModule, report: Report, backend, check: Verifier | None
) -> nn.Module:
    """The pipeline on a traced model; returns the rewritten graph module (or, when verify finds
    the whole model's output changed even without in-place writes, the unrewritten `work`)."""
    chains.fuse_conv_chains(gm, report, backend, check)
    inception.fuse_inceptions(gm, report, backend, check)
    in_place.overwrite_dead_residuals(gm, report)
    drop_ins.swap_drop_ins(gm, report)
    leftovers.report_left_over(gm, report)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    if check is None:
        return gm
    error = check.model_error(gm, report)
    report.notes.append(check.describe(error))
    if error <= check.end_to_end_tolerance:
        return gm
    undone = in_place.undo_overwrites(gm)
    if undone:
        error = check.model_error(gm, report)
        report.notes.append(
            f"verify: in-place writes undone ({', '.join(undone)}); error now {error:.2e}"
        )
        if error <= check.end_to_end_tolerance:
            return gm
    for entry in report.entries:  # the rewrite as a whole is wrong somewhere: keep nothing
        if entry.action in ("fused", "replaced"):
            entry.action, entry.replacement = "reverted", None
            entry.reason = "verify: the whole model's output changed, nothing rewritten"
    report.kernels = {}
    report.method += " (every rewrite reverted by verify)"
    return work


def _replayed(result: nn.Module, max_graphs: int = MAX_GRAPHS) -> CUDAGraphed:
    """An optimize result wrapped in fastcnn.cuda_graphs, its report carried over and noted."""
    wrapped = CUDAGraphed(result, max_graphs)
    wrapped._fastcnn_report = result._fastcnn_report
    wrapped._fastcnn_report.notes.append(
        "cuda_graphs: forwards replayed from CUDA graphs, one per input signature"
    )
    return wrapped


def optimize(
    model: nn.Module,
    backend: str | None = None,
    inplace: bool = False,
    verify: bool | float = False,
    example_input: torch.Tensor | None = None,
    cuda_graphs: bool = False,
) -> nn.Module:
    """An eval-mode inference copy of `model` with Conv2d -> BatchNorm2d (-> ReLU) chains,
    residual add + ReLU and bare add + ReLU fused (see the module docstring).

    backend: pin the fused modules to "triton", "cuda", "cpu" or "eager" (None: whatever is in
    force when they run). inplace=False (default) deep-copies first, so `model` is untouched;
    inplace=True skips the copy (the result shares modules with `model`, which is put in eval
    mode). verify=True (or a float per-layer tolerance) runs example_input (default: a random
    [2, C, 64, 64] batch in the model's dtype and device) through both: every fused layer is
    compared with the layers it replaces and reverted if its relative error exceeds the
    tolerance; then the whole model's output is compared with the original's (bound: see
    fastcnn/optimize/verify.py), and if it differs the in-place writes are undone, and if it
    still differs every rewrite is. fastcnn.report(result) records it all, with the kernels each
    module ran on the example. What cannot be fused is kept as it was; a model that torch.fx
    cannot trace gets module-level matching inside nn.Sequential (verified the same way).
    cuda_graphs=True (a model on a CUDA device) returns the result wrapped in
    fastcnn.cuda_graphs: each input signature's forward is captured once and replayed.
    """
    check_model(_CALLER, model)
    if isinstance(model, CUDAGraphed):  # optimize the model inside, then replay that
        inner = optimize(model.model, backend, inplace, verify, example_input)
        return _replayed(inner, model.max_graphs)
    if cuda_graphs:
        devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
        if devices != {"cuda"}:
            raise ValueError(
                "fastcnn.optimize: cuda_graphs=True needs a model on a CUDA device, got one with "
                f"tensors on {sorted(devices) or 'no device (no parameters or buffers)'}"
            )
        return _replayed(optimize(model, backend, inplace, verify, example_input))
    check_backend(_CALLER, backend)
    # a float, or the per-dtype table, read once the example's dtype is known
    tolerances = verify_tolerance(_CALLER, verify, FUSED_LAYER_TOLERANCE)
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
    if tolerances is not None:
        example = example_input if example_input is not None else random_example(work)
        if example is None:
            report.notes.append("verify: NOT verified: no Conv2d to size a random input from")
    try:
        gm = traced(work)
    except Exception as exc:  # FX cannot trace data-dependent control flow and the like
        report.method = f"module-level (torch.fx could not trace: {type(exc).__name__}: {exc})"
        check = _verifier(work, example, tolerances, report, example_input is None)
        result = module_level_optimize(work, report, backend, check)
        result._fastcnn_report = report
        return result
    for name in leftovers.dropped_modules(work, gm):
        report.add(
            name,
            type(getattr(work, name)).__name__,
            "dropped",
            "the eval-mode forward never calls it (e.g. an auxiliary head)",
        )
    check = _verifier(gm, example, tolerances, report, example_input is None)
    result = _fx_optimize(work, gm, report, backend, check)
    if result is gm:
        program.install(gm)
        report.notes.append(
            "cpu program: a channels_last CPU input runs the graph as one program per input "
            "signature where every layer allows (fastcnn/optimize/program.py)"
        )
    result._fastcnn_report = report
    return result


def _verifier(model: nn.Module, example, tolerances, report: Report,
              made_up: bool) -> Verifier | None:  # fmt: skip
    """The verifier for verify=True, or None (with the reason in the report and a warning when
    verification was asked for and cannot happen)."""
    if example is None:
        return None
    why = None
    tolerance = tolerances if isinstance(tolerances, float) else tolerances.get(example.dtype)
    if tolerance is None:
        why = f"no tolerance for {example.dtype}"
    else:
        try:
            return Verifier(model, example, tolerance)
        except Exception as exc:
            if not made_up:
                raise  # the caller's own example: their error to see
            why = (
                f"the model does not run on a random {tuple(example.shape)} input "
                f"({type(exc).__name__}: {exc}); pass example_input="
            )
    report.notes.append(f"verify: NOT verified: {why}")
    warnings.warn(f"fastcnn.optimize: verify=True but NOT verified: {why}", stacklevel=3)
    return None
