"""fastcnn.quantize: post-training int8 quantization into fused int8 conv kernels."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import fx, nn

from fastcnn.common.arguments import check_backend, check_model, verify_tolerance
from fastcnn.cpu import int8 as cpu_int8
from fastcnn.nn.conv_bn_act import ConvBNAct
from fastcnn.nn.quantized import QConvBNAct
from fastcnn.optimize import optimize
from fastcnn.quantize import graph as qgraph
from fastcnn.quantize.calibrate import calibrate
from fastcnn.quantize.config import FIELDS, QuantConfig
from fastcnn.quantize.observers import OBSERVERS
from fastcnn.quantize.verify import INT8_LAYER_TOLERANCE, layer_errors, sqnr_db
from fastcnn.report import Report

_CALLER = "fastcnn.quantize"


@dataclasses.dataclass
class _Options:  # a QuantConfig checked, with what follows from it
    observer: str
    percentile: float
    tolerance: float | None
    float_stem: bool
    keep_float: frozenset[str]
    weight_max: int
    backend: str | None
    verify_batches: int


def _batches(calibration, device) -> list[torch.Tensor]:
    """The calibration batches as a list of float tensors on the model's device. Each item may
    be a tensor or a (tensor, label, ...) tuple, as a DataLoader yields; a single 4-D tensor is
    one batch."""
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    batches = []
    for item in calibration:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise TypeError(
                "fastcnn.quantize: calibration must yield float [N, C, H, W] tensors (or tuples "
                f"whose first item is one), got {type(x).__name__}"
                + (f" of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else "")
            )
        batches.append(x.to(device=device, dtype=torch.float32))
    if not batches:
        raise ValueError("fastcnn.quantize: calibration is empty; pass at least one input batch")
    return batches


def _weight_max(overflow_fix) -> int:
    if overflow_fix == "auto":
        overflow_fix = cpu_int8.isa() != "none" and not cpu_int8.has_vnni()
    if not isinstance(overflow_fix, bool):
        raise ValueError(
            f"fastcnn.quantize: overflow_fix must be a bool or 'auto', got {overflow_fix!r}"
        )
    return cpu_int8.NO_VNNI_WEIGHT_MAX if overflow_fix else 127


def _choose_convs(gm, opts: _Options, report: Report) -> set[fx.Node]:
    """The ConvBNAct nodes to run in int8 before verify: all but the stem (float_stem), the
    keep_float paths and what QConvBNAct cannot run (grouped, depthwise, dilated), with the
    reason for each one kept."""
    convs = [n for n in gm.graph.nodes if qgraph.is_conv(gm, n)]
    chosen = set()
    for i, node in enumerate(convs):
        if opts.float_stem and i == 0:
            why = "float_stem=True: the stem conv stays fp32"
        elif node.target in opts.keep_float:
            why = "keep_float: stays fp32 as asked"
        elif (unsupported := QConvBNAct.unsupported(gm.get_submodule(node.target))) is not None:
            why = f"stays fp32: {unsupported}"
        else:
            chosen.add(node)
            continue
        entry = next((e for e in report.entries if e.path == node.target), None)
        if entry is None:
            report.add(node.target, "ConvBNAct", "kept", why)
        else:
            entry.action, entry.replacement = "kept", "ConvBNAct (fp32)"
            entry.reason += f"; {why}"
    return chosen


def _qconv_factory(gm, opts: _Options):
    def make(node, x_qp, out_qp, r_qp):
        fused = gm.get_submodule(node.target)
        return QConvBNAct.from_float(fused, x_qp, out_qp, r_qp, opts.weight_max, opts.backend)

    return make


def quantize(
    model: nn.Module, calibration, config: QuantConfig | None = None, **options
) -> nn.Module:
    """An int8 inference copy of `model` (fp32, eval-mode semantics; `model` is not changed).

    fastcnn.optimize fuses it first (BatchNorm folded in fp32, residual adds into the convs,
    Inception blocks); each fused conv then becomes a QConvBNAct: weights int8, symmetric per
    output channel; activations uint8 with one scale and zero point per tensor, calibrated on
    `calibration` (an iterable of input batches, or of (input, ...) tuples); int32
    accumulation; bias, the residual (int8), ReLU and the requantize in the kernel's epilogue.
    Residual adds stay int8; an Inception concat is int8 in one shared scale, which its
    branches write directly (an input that cannot is requantized). Max-pools run on uint8.
    What is not a conv (the classifier, average pooling) runs in fp32 between a Dequantize and
    the next Quantize.

    config: a QuantConfig (default: QuantConfig()); options: any of its fields as keywords,
    which replace the config's.
    """
    if config is None:
        config = QuantConfig()
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"{_CALLER}: config must be a QuantConfig, got {type(config).__name__}")
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise TypeError(f"{_CALLER}: unknown option(s) {unknown}; QuantConfig has {FIELDS}")
    config = dataclasses.replace(config, **options)
    observer, backend, verify = config.observer, config.backend, config.verify
    check_model(_CALLER, model)
    if observer not in OBSERVERS:
        raise ValueError(
            f"fastcnn.quantize: unknown observer {observer!r}; choose from {OBSERVERS}"
        )
    check_backend(_CALLER, backend)
    tolerance = verify_tolerance(_CALLER, verify, INT8_LAYER_TOLERANCE)
    params = list(model.parameters()) + list(model.buffers())
    floats = [p for p in params if p.is_floating_point()]
    if floats and any(p.dtype != torch.float32 for p in floats):
        raise TypeError("fastcnn.quantize: the model must be float32 (call model.float() first)")
    device = floats[0].device if floats else torch.device("cpu")
    opts = _Options(
        observer,
        config.percentile,
        tolerance,
        config.float_stem,
        frozenset(config.keep_float),
        _weight_max(config.overflow_fix),
        backend,
        config.verify_batches,
    )
    batches = _batches(calibration, device)
    fp = optimize(copy.deepcopy(model), inplace=True)
    report = copy.deepcopy(getattr(fp, "_fastcnn_report", None))
    if not isinstance(fp, fx.GraphModule) or report is None:
        raise TypeError(
            "fastcnn.quantize needs a model torch.fx can trace (torchvision-style modules); "
            f"{type(model).__name__} was not traced: "
            + (report.method if report is not None else "no graph")
        )
    return _quantize_graph(fp, batches, opts, report)


def _quantize_graph(fp: fx.GraphModule, batches, opts: _Options, report: Report) -> nn.Module:
    report.method += " + int8 (fastcnn.quantize)"
    for m in fp.modules():
        if isinstance(m, ConvBNAct):
            m.overwrite_residual = False  # calibration reads every residual after its conv
    expanded = qgraph.expand_inceptions(fp)
    if expanded:
        report.notes.append(
            f"int8: {len(expanded)} Inception blocks run as their branches (each with its own "
            "scales) into one int8 concat"
        )
    observers = calibrate(fp, batches, opts.observer, opts.percentile)
    observed = {node: obs.qparams() for node, obs in observers.items()}
    int8_convs = _choose_convs(fp, opts, report)
    quantized, qparams = qgraph.plan(fp, int8_convs, observed)
    errors = {}
    if opts.tolerance is not None:
        make = _qconv_factory(fp, opts)
        candidates = {
            n: make(n, qparams[n.args[0]], qparams[n], qparams.get(qgraph.residual_of(n)))
            for n in int8_convs
        }
        errors = layer_errors(fp, batches[: opts.verify_batches], candidates)
        failed = {n for n, e in errors.items() if not e <= opts.tolerance}
        if failed:  # re-plan without them: their neighbours' domains may change
            int8_convs -= failed
            quantized, qparams = qgraph.plan(fp, int8_convs, observed)
    reference_out = _run(fp, batches[0])
    _report_convs(report, fp, int8_convs, errors, opts.tolerance)  # before build swaps them
    q = qgraph.build(fp, quantized, qparams, _qconv_factory(fp, opts))
    in_place = qgraph.overwrite_dead_residuals(q)
    counts = qgraph.count_converters(q)
    report.notes.append(
        f"int8: observer {opts.observer}, weights within +-{opts.weight_max}, "
        f"{len(batches)} calibration batches; converters: {counts}; "
        f"{len(in_place)} convs write over their dead uint8 residual"
    )
    report.notes.append(
        f"int8: output SQNR {sqnr_db(_run(q, batches[0]), reference_out):.1f} dB against fp32 "
        "on the first calibration batch"
    )
    q._fastcnn_report = report
    return q


def _report_convs(report: Report, fp, int8_convs, errors: dict, tolerance) -> None:
    """Each conv's report entry (optimize's, or a new one for an Inception branch) says whether
    it runs int8 or stayed fp32, with the verify error when measured."""
    entries = {e.path: e for e in report.entries}
    for node in fp.graph.nodes:
        if not qgraph.is_conv(fp, node):
            continue
        entry = entries.get(node.target)
        if entry is None:
            report.add(node.target, "Conv2d -> BatchNorm2d -> ReLU", "fused", "Inception branch")
            entry = entries[node.target] = report.entries[-1]
        err = errors.get(node)
        entry.error = err
        if node in int8_convs:
            entry.replacement = "QConvBNAct"
            entry.reason += "; int8" + (f" (verify error {err:.2e})" if err is not None else "")
        elif err is not None:
            entry.action = "reverted"
            entry.replacement = "ConvBNAct (fp32)"
            entry.reason += f"; int8 reverted: verify error {err:.2e} > tolerance {tolerance:.0e}"


def _run(gm, x):
    with torch.no_grad():
        return gm(x).float()
