"""verify=: every int8 conv against its fp32 ConvBNAct on the calibration data.

Each conv is checked on its own: it gets the fp32 model's real input (and residual), quantized
with the qparams it will see in the int8 model, and its dequantized output is compared with the
fp32 output. The error is relative RMS, ||int8 - fp32|| / ||fp32|| over the batches, so a layer
is blamed for what it adds (input rounding, weight rounding, output rounding and clipping), not
for what earlier layers did.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from fastcnn.nn.quantized import dequantize_tensor, quantize_tensor
from fastcnn.quantize.calibrate import run_observing
from fastcnn.quantize.graph import residual_of

# Relative RMS error above which verify=True keeps a conv in fp32. An 8-bit layer with
# well-calibrated ranges lands around 0.5-3%; 10% means a range or a weight that 8 bits
# cannot hold (one huge outlier channel, an activation with a long tail clipped away).
INT8_LAYER_TOLERANCE = 0.1


def layer_errors(gm: fx.GraphModule, batches: list, candidates: dict) -> dict[fx.Node, float]:
    """{conv node: relative RMS error} for candidates = {node: QConvBNAct}, measured on the
    fp32 graph gm's own activations."""
    values: dict[fx.Node, torch.Tensor] = {}
    sums = {node: [0.0, 0.0] for node in candidates}
    wanted = set(candidates)
    for node in candidates:
        wanted.add(node.args[0])
        if residual_of(node) is not None:
            wanted.add(residual_of(node))

    def on_value(node, value):
        if node in wanted:
            values[node] = value
        if node in candidates:
            qconv = candidates[node]
            x = quantize_tensor(values[node.args[0]], qconv.x_qparams)
            r = residual_of(node)
            rq = quantize_tensor(values[r], qconv.residual_qparams) if r is not None else None
            y = dequantize_tensor(qconv(x, residual=rq), qconv.out_qparams)
            sums[node][0] += (y.double() - value.double()).pow(2).sum().item()
            sums[node][1] += value.double().pow(2).sum().item()

    run_observing(gm, batches, on_value)
    return {n: math.sqrt(e / s) if s > 0 else math.sqrt(e) for n, (e, s) in sums.items()}


def sqnr_db(test: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of test against reference, in dB."""
    noise = (test.double() - reference.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(signal / noise)
