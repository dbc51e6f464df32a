"""bf16 accuracy on real data: the small ResNet and GoogLeNet trained on scikit-learn's digits
(benchmarks/digits.py; weights committed), cast to bf16 and optimized for the cpu backend,
scored on the 450 held-out images against the fp32 model. The goal is at most 0.5 points lost
(benchmarks/bf16_accuracy.py); the test allows 1 point (3 images)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fastcnn
from fastcnn.cpu import onednn

pytest.importorskip("sklearn", reason="the digits data comes from scikit-learn")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bf16_accuracy
import digits


@pytest.mark.skipif(
    not onednn.supports(torch.bfloat16),
    reason="oneDNN runs no bf16 convolutions on this CPU (AVX-512 or native bf16 needed)",
)
@pytest.mark.parametrize("name", list(digits.NETS))
def test_bf16_keeps_the_digits_accuracy(name):
    _, _, test_x, test_y = digits.load_digits()
    model = digits.trained(name)
    ref = bf16_accuracy.fp32_logits(model, test_x)
    with fastcnn.trace() as t:
        out = bf16_accuracy.bf16_logits(model, test_x[:64])
    kernels = t.kernels("conv_bn_act") | t.kernels("inception")
    assert kernels and all(k.startswith("cpu:onednn") for k in kernels), kernels
    out = bf16_accuracy.bf16_logits(model, test_x)
    assert not torch.isnan(out).any()
    fp32 = (ref.argmax(1) == test_y).float().mean().item() * 100
    bf16 = (out.argmax(1) == test_y).float().mean().item() * 100
    assert fp32 > 95, f"the committed {name} should be trained ({fp32:.1f}%)"
    assert bf16 >= fp32 - 1.0, f"bf16 {bf16:.2f}% vs fp32 {fp32:.2f}%"
    assert (out.argmax(1) == ref.argmax(1)).float().mean().item() > 0.97
