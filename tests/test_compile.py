"""fastcnn ops are single opaque torch.library ops: torch.compile(fullgraph=True) and
torch.export trace through a model that uses them without graph breaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastcnn


class TinyResidual(nn.Module):
    """A ResNet-ish block from every fastcnn op: conv_bn_act (+ residual, into out= too) and
    add_relu (module and functional with out=)."""

    def __init__(self, channels: int = 13):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels).eval()
        self.fused = fastcnn.nn.ConvBNAct.from_modules(self.conv, self.bn, nn.ReLU())
        self.add_relu = fastcnn.nn.AddReLU()

    def forward(self, x):
        y = self.fused(x)  # fastcnn::conv_bn_act
        z = self.fused(y, residual=x, out=torch.empty_like(y))  # fastcnn::conv_bn_act_out
        w = self.add_relu(z, x)  # fastcnn::add_relu
        return fastcnn.ops.add_relu(w, y, out=torch.empty_like(w))  # fastcnn::add_relu_out


@pytest.fixture
def model_and_input():
    torch.manual_seed(0)
    model = TinyResidual().eval()
    x = torch.randn(2, 13, 7, 9).contiguous(memory_format=torch.channels_last)
    return model, x


def _eager_reference(model, x):
    def block(t, residual=None):
        y = model.bn(model.conv(t))
        return torch.relu(y if residual is None else y + residual)

    y = block(x)
    z = block(y, x)
    return torch.relu(torch.relu(z + x) + y)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(model_and_input, compiler):
    model, x = model_and_input
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    with torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out, _eager_reference(model, x), rtol=1e-5, atol=1e-5)


def test_a_trace_around_a_compiled_model_records_each_run_once(model_and_input):
    """The compiled graph's fastcnn ops record their kernels when they run; nothing is recorded
    while Dynamo traces the modules (Dynamo 2.11 cannot trace the trace's ContextVar)."""
    model, x = model_and_input
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for _ in range(2):  # the first call compiles, the second only runs
            with fastcnn.trace() as t:
                out = compiled(x)
            assert [e.op for e in t.events] == ["conv_bn_act"] * 2 + ["add_relu"] * 2
        torch.testing.assert_close(out, _eager_reference(model, x), rtol=1e-5, atol=1e-5)


def test_torch_export_keeps_the_fastcnn_ops(model_and_input):
    model, x = model_and_input
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    for op in ("conv_bn_act", "conv_bn_act_out", "add_relu", "add_relu_out"):
        assert f"fastcnn.{op}.default" in targets, f"fastcnn::{op} missing from the graph"
    with torch.no_grad():
        torch.testing.assert_close(
            exported.module()(x), _eager_reference(model, x), rtol=1e-5, atol=1e-5
        )


def test_fake_implementation_checks_inputs_at_trace_time():
    def bad(x):
        return fastcnn.ops.add_relu(x, x[:, :1])

    with pytest.raises(Exception, match="residual has shape"):
        torch.compile(bad, fullgraph=True, backend="aot_eager")(torch.randn(2, 3, 4, 4))


def test_fake_conv_output_strides_match_eager(model_and_input):
    """The fake implementation allocates like the real one: channels_last in, channels_last out."""
    model, x = model_and_input
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_x = mode.from_tensor(x)
        fake_w = mode.from_tensor(model.fused.weight)
        fake_out = torch.ops.fastcnn.conv_bn_act(
            fake_x, fake_w, None, [1, 1], [1, 1], 1, [1, 1], None, True
        )
    with torch.no_grad():
        real = fastcnn.ops.conv_bn_act(x, model.fused.weight, None, 1, 1)
    assert fake_out.shape == real.shape and fake_out.stride() == real.stride()
