"""fastcnn ops are single opaque torch.library ops: torch.compile(fullgraph=True) and
torch.export trace through a model that uses them without graph breaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastcnn


class TinyResidual(nn.Module):
    """conv -> (+ x) -> relu through fastcnn's AddReLU, and once more with out=."""

    def __init__(self, channels: int = 13):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.add_relu = fastcnn.nn.AddReLU()

    def forward(self, x):
        y = self.add_relu(self.conv(x), x)
        return fastcnn.ops.add_relu(y, x, out=torch.empty_like(y))


@pytest.fixture
def model_and_input():
    torch.manual_seed(0)
    return TinyResidual().eval(), torch.randn(2, 13, 7, 9)


def _eager_reference(model, x):
    y = torch.relu(model.conv(x) + x)
    return torch.relu(y + x)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(model_and_input, compiler):
    model, x = model_and_input
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    with torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out, _eager_reference(model, x), rtol=1e-5, atol=1e-5)


def test_torch_export_keeps_the_fastcnn_ops(model_and_input):
    model, x = model_and_input
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "fastcnn.add_relu.default" in targets
    assert "fastcnn.add_relu_out.default" in targets
    with torch.no_grad():
        torch.testing.assert_close(
            exported.module()(x), _eager_reference(model, x), rtol=1e-5, atol=1e-5
        )


def test_fake_implementation_checks_inputs_at_trace_time():
    def bad(x):
        return fastcnn.ops.add_relu(x, x[:, :1])

    with pytest.raises(Exception, match="residual has shape"):
        torch.compile(bad, fullgraph=True, backend="aot_eager")(torch.randn(2, 3, 4, 4))
