"""ConvBNAct's plans on the triton backend (fastcnn.triton.conv_bn_act.plan): after the first
call per (alignment, in place, tf32) combination, calls launch the kept launch plan
without the launcher's full per-call key; unaligned pointers always take the full path. Run in
Triton's interpreter on CPU tensors (skipped without it, as on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
from fastcnn_testing import assert_matches, conv_reference64, random_tensor, skip_unsupported

from fastcnn.nn import ConvBNAct
from fastcnn.triton import conv_bn_act as kernels


def _module():
    m = ConvBNAct(16, 24, 3, padding=1, backend="triton").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
        m.bias.copy_(torch.randn(24, generator=g) * 0.1)
    return m


def _counting_full_path(monkeypatch) -> list:
    calls = []
    full = kernels._launch

    def counted(*args, **kwargs):
        calls.append(1)
        return full(*args, **kwargs)

    monkeypatch.setattr(kernels, "_launch", counted)
    return calls


@pytest.mark.parametrize("with_residual", [False, True])
def test_later_calls_launch_the_kept_plan(with_residual, monkeypatch):
    skip_unsupported("cpu", "triton", torch.float32)
    m = _module()
    m.overwrite_residual = with_residual
    full_path = _counting_full_path(monkeypatch)
    with torch.no_grad():
        for seed in range(3):  # fresh values each call: a stale result cannot pass
            x = random_tensor((2, 16, 7, 9), torch.float32, "cpu", channels_last=True, seed=seed)
            r = random_tensor((2, 24, 7, 9), torch.float32, "cpu", channels_last=True, seed=9)
            residual = r if with_residual else None
            expected = conv_reference64(x, m.weight, m.bias, 1, 1, residual)
            got = m(x, residual)
            assert_matches(got, expected, torch.float32)
            if with_residual:
                assert got.data_ptr() == r.data_ptr()  # written into the residual
    assert len(full_path) == 1, "only the first call should take the launcher's full path"


def test_unaligned_pointers_always_take_the_full_path(monkeypatch):
    skip_unsupported("cpu", "triton", torch.float32)
    m = _module()
    full_path = _counting_full_path(monkeypatch)
    x = random_tensor((2, 16, 7, 9), torch.float32, "cpu", channels_last=True)
    # the same values one element into a larger buffer: 4-byte aligned, not 16
    shifted = torch.empty(x.numel() + 1).as_strided(x.shape, x.stride(), 1).copy_(x)
    with torch.no_grad():
        for _ in range(2):
            assert_matches(m(shifted), conv_reference64(x, m.weight, m.bias, 1, 1), torch.float32)
    assert len(full_path) == 2
