"""int8 accuracy on real data: the small ResNet and GoogLeNet trained on scikit-learn's digits
(benchmarks/digits.py; weights committed), quantized with the default observer, scored on the
450 held-out images. The goal is at most 0.5 points lost; the test allows 1 point (3 images)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fastcnn

pytest.importorskip("sklearn", reason="the digits data comes from scikit-learn")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import digits


@pytest.mark.parametrize("name", list(digits.NETS))
def test_int8_keeps_the_digits_accuracy(name):
    if not (digits.WEIGHTS / f"{name}.pt").exists():
        pytest.fail(f"{digits.WEIGHTS / name}.pt is missing: run benchmarks/int8_accuracy.py")
    train_x, _, test_x, test_y = digits.load_digits()
    model = digits.trained(name)
    q = fastcnn.quantize(model, [train_x[i : i + 64] for i in range(0, 256, 64)], verify=True)
    fp32, fp32_pred = digits.accuracy(model, test_x, test_y)
    int8, int8_pred = digits.accuracy(q, test_x, test_y)
    assert fp32 > 95, f"the committed {name} should be trained ({fp32:.1f}%)"
    assert int8 >= fp32 - 1.0, f"int8 {int8:.2f}% vs fp32 {fp32:.2f}%"
    assert (int8_pred == fp32_pred).float().mean().item() > 0.97
    with torch.no_grad(), fastcnn.trace() as t:
        q(test_x[:8])
    assert t.counts("conv_bn_act") == {} or fastcnn.report(q).by_action("reverted")
