"""Which CPU convolutions run as Winograd F(4x4, 3x3) (csrc/cpu/winograd_conv.cpp).

fp32 3x3 convs of stride 1 and padding 1 (ResNet's and GoogLeNet's 3x3 layers) take 4x fewer
multiplies this way, and oneDNN's direct kernels already run near the FMA peak, so this is where
fastcnn's CPU path gains on runtimes that run them directly (OpenVINO, ONNX Runtime): each conv
alone in benchmarks/cpu_winograd_convs.py (winograd_convs.json), whole models in
benchmarks/cpu_ab.py --switch winograd (cpu_ab_winograd.json).

Precision: the transforms multiply by up to 5 (input) and 8 (output) before the products are
summed, so rounding errors grow with the channel count and exceed direct's (winograd_convs.json
has both against float64; tests hold them to fastcnn_testing's Winograd tolerance).
`set_enabled(False)` or FASTCNN_WINOGRAD=0 in the environment turns it
off (every conv then runs oneDNN's direct kernels). A conv taking it records "cpu:winograd" in
fastcnn.trace. Non-finite inputs: its ReLU propagates NaN (oneDNN's post-op ReLU maps it to 0),
and a NaN or Inf input pixel makes NaN of the whole 4x4 output tiles whose 6x6 windows hold it
(Inf - Inf in the transforms), where a direct conv gives NaN or +-Inf in its 3x3 neighbourhood.
So whether a conv of the cpu backend maps NaN to 0 depends on which kernel its shape takes: the
trace says which.
"""

from __future__ import annotations

import os

ENV = "FASTCNN_WINOGRAD"
# Below these the transforms and the channel padding (to 16) cost more than the products save.
MIN_CHANNELS = 16
# Fewer 4x4 tiles than this (ResNet-50's 7x7 layers at batch 1 have 4) and the transformed
# weight (4x direct's: 38 MB for 512 -> 512) is read for too little work.
MIN_TILES = 8

_state = {"enabled": os.environ.get(ENV, "1") != "0"}


def enabled() -> bool:
    return _state["enabled"]


def set_enabled(on: bool) -> bool:
    """Turn Winograd on or off for later calls; returns the previous setting."""
    previous, _state["enabled"] = _state["enabled"], bool(on)
    return previous


def tiles(input_shape) -> int:
    n, _, h, w = input_shape
    return n * -(-h // 4) * -(-w // 4)


def eligible(input_shape, weight_shape, stride, padding, groups) -> bool:
    """May an fp32 conv of these shapes run as Winograd (whether a call does: also the switch,
    `enabled()`, read by fastcnn.cpu.onednn.Packer.winograd_now)?"""
    if groups != 1:
        return False
    k_out, c_in, kh, kw = weight_shape
    if (kh, kw) != (3, 3) or tuple(stride) != (1, 1) or tuple(padding) != (1, 1):
        return False
    return min(c_in, k_out) >= MIN_CHANNELS and tiles(input_shape) >= MIN_TILES
