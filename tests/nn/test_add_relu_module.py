"""fastcnn.nn.AddReLU: forward equals relu(x + residual); backward equals autograd's."""

from __future__ import annotations

import torch

import fastcnn


def test_forward_matches_reference():
    x, r = torch.randn(2, 13, 7, 9), torch.randn(2, 13, 7, 9)
    torch.testing.assert_close(fastcnn.nn.AddReLU()(x, r), torch.relu(x + r), rtol=0, atol=0)


def test_backward_matches_autograd():
    x = torch.randn(2, 13, 7, 9, requires_grad=True)
    r = torch.randn(2, 13, 7, 9, requires_grad=True)
    grad = torch.randn(2, 13, 7, 9)
    fastcnn.nn.AddReLU()(x, r).backward(grad)
    x2, r2 = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    torch.relu(x2 + r2).backward(grad)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(r.grad, r2.grad)


def test_has_no_state():
    assert fastcnn.nn.AddReLU().state_dict() == {}
