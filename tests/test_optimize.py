"""fastcnn.optimize on torchvision's models and on hand-made ones: same eval function, no
BatchNorm left, the input model untouched, partial optimization with the right report, verify."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from fastcnn_testing import assert_logits_close, randomize_batchnorm, skip_unsupported
from torch import nn

import fastcnn
from fastcnn.nn import AddReLU, ConvBNAct, FusedInception


def _torchvision(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    if name == "googlenet":
        kwargs.setdefault("init_weights", True)
    model = getattr(torchvision.models, name)(num_classes=10, **kwargs)
    return randomize_batchnorm(model, seed=1).eval()


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "googlenet"])
def test_same_eval_function_and_no_batchnorm_left(name, backend):
    model = _torchvision(name)
    fast = fastcnn.optimize(model, backend=None if backend == "auto" else backend)
    assert _count(fast, nn.BatchNorm2d) == 0
    if name == "googlenet":  # 3 stem convs; 9 Inception blocks of 6 convs; 2 aux heads dropped
        assert _count(fast, ConvBNAct) == 3 and _count(fast, FusedInception) == 9
    else:
        assert _count(fast, ConvBNAct) == _count(model, nn.Conv2d)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fastcnn.use_backend(backend):
        assert_logits_close(fast(x), model(x), torch.float32)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "googlenet"])
def test_triton_backend(name):
    skip_unsupported("cpu", "triton", torch.float32)
    model = _torchvision(name)
    fast = fastcnn.optimize(model, backend="triton")
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert_logits_close(fast(x), model(x), torch.float32)


def test_the_input_model_is_unchanged():
    model = _torchvision("resnet18").train()
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    fastcnn.optimize(model)
    assert model.training, "optimize must not switch the given model to eval"
    assert [type(m) for m in model.modules()] == types
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_result_is_in_eval_mode_and_reports_what_it_did():
    fast = fastcnn.optimize(_torchvision("resnet18"))
    assert not fast.training
    report = fastcnn.report(fast)
    assert len(report.fused) == 20  # 17 convs with BN (+ReLU / +add+ReLU), 3 downsample convs
    residual = [e for e in report.fused if "add" in e.original]
    assert len(residual) == 8 and all(e.replacement == "ConvBNAct" for e in residual)
    text = str(report)
    assert "layer1.0.conv2" in text and "totals: 20 fused, 2 replaced, 1 kept" in text
    # fastcnn.nn.Linear and fastcnn.nn.MaxPool2d
    assert [e.path for e in report.by_action("replaced")] == ["fc", "maxpool"]


def test_googlenet_aux_heads_are_dropped_and_reported():
    fast = fastcnn.optimize(_torchvision("googlenet", aux_logits=True))
    dropped = {e.path for e in fastcnn.report(fast).by_action("dropped")}
    assert dropped == {"aux1", "aux2"}
    assert not hasattr(fast, "aux1")


class PartlyFusable(nn.Module):
    """A grouped conv, a conv whose output has two users, an unknown layer, a bare add+relu."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.grouped_bn = nn.BatchNorm2d(16)
        self.shared = nn.Conv2d(16, 16, 1, bias=False)
        self.shared_bn = nn.BatchNorm2d(16)
        self.custom = nn.SiLU()  # a leaf FX keeps, with no fusion pattern
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        g = torch.relu(self.grouped_bn(self.grouped(x)))
        s = self.shared(g)
        y = self.shared_bn(s) + s  # the conv output has two users
        y = self.custom(y)
        return torch.relu(self.head(y) + y[:, :8])


def test_partial_optimization_with_reasons():
    torch.manual_seed(0)
    model = randomize_batchnorm(PartlyFusable(), seed=2).eval()
    fast = fastcnn.optimize(model, backend="eager")
    entries = {e.path: e for e in fastcnn.report(fast).entries}
    assert entries["stem"].action == "fused"
    assert entries["grouped"].action == "fused"  # groups fuse (oneDNN groups on the CPU)
    assert entries["shared"].action == "kept" and "2 users" in entries["shared"].reason
    assert entries["custom"].action == "kept" and "SiLU" in entries["custom"].reason
    assert entries["head"].action == "fused" and entries["head"].original.endswith("add -> ReLU")
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        assert_logits_close(fast(x), model(x), torch.float32)


def test_bare_add_relu_becomes_addrelu():
    class Residual(nn.Module):
        def forward(self, a, b):
            return torch.relu(a + b)

    fast = fastcnn.optimize(Residual())
    assert _count(fast, AddReLU) == 1
    a, b = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(fast(a, b), torch.relu(a + b))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.other = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.body(x)
        return self.other(y) if y.sum() > 0 else -self.other(y)


def test_untraceable_model_falls_back_to_module_level_matching():
    torch.manual_seed(0)
    model = randomize_batchnorm(Untraceable(), seed=3).eval()
    fast = fastcnn.optimize(model)
    report = fastcnn.report(fast)
    assert report.method.startswith("module-level (torch.fx could not trace")
    assert [e.path for e in report.fused] == ["body.0"]
    assert [e.path for e in report.kept] == ["other"]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert_logits_close(fast(x), model(x), torch.float32)


def test_verify_reverts_a_layer_that_disagrees(monkeypatch):
    model = _torchvision("resnet18")
    model.layer2[1].conv1.corrupt_me = True  # survives optimize's deep copy
    real = ConvBNAct.from_modules

    def corrupt_one(conv, bn, relu=None, backend=None):
        fused = real(conv, bn, relu, backend)
        if getattr(conv, "corrupt_me", False):
            fused.bias.add_(1.0)  # a wrong kernel, as far as verify can tell
        return fused

    monkeypatch.setattr(ConvBNAct, "from_modules", staticmethod(corrupt_one))
    fast = fastcnn.optimize(model, verify=True)
    report = fastcnn.report(fast)
    assert [e.path for e in report.by_action("reverted")] == ["layer2.1.conv1"]
    assert any(n.startswith("verify: end-to-end") for n in report.notes)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_logits_close(fast(x), model(x), torch.float32)


def test_verify_accepts_a_tolerance_and_an_example_input():
    model = _torchvision("resnet18")
    example = torch.randn(1, 3, 40, 40)
    fast = fastcnn.optimize(model, verify=1e-3, example_input=example)
    assert not fastcnn.report(fast).by_action("reverted")
    with pytest.raises(ValueError, match="verify must be a bool or a positive float"):
        fastcnn.optimize(model, verify=-1.0)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_before_or_after(dtype, when):
    model = _torchvision("resnet18")
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = model(x)
    fast = fastcnn.optimize(model.to(dtype)) if when == "before" else fastcnn.optimize(model)
    fast = fast.to(dtype)
    with torch.no_grad(), fastcnn.use_backend("eager"):
        got = fast(x.to(dtype))
    assert got.dtype == dtype
    assert_logits_close(got.float(), expected, dtype)


def test_batch_one_channels_last_inference_mode():
    model = _torchvision("resnet50")
    fast = fastcnn.optimize(model).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert_logits_close(fast(x), model(x), torch.float32)


def test_torch_compile_and_export_of_the_optimized_model():
    model = _torchvision("resnet18")
    fast = fastcnn.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
        assert_logits_close(compiled(x), expected, torch.float32)
    exported = torch.export.export(fast, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "fastcnn.conv_bn_act.default" in targets
    with torch.no_grad():
        assert_logits_close(exported.module()(x), expected, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_resnext_grouped_convs_fuse_too(backend):
    model = _torchvision("resnext50_32x4d")
    fast = fastcnn.optimize(model, backend=backend)
    report = fastcnn.report(fast)
    assert len(report.fused) == 53 and {e.original for e in report.kept} == {"AdaptiveAvgPool2d"}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    grouped = [m for m in fast.modules() if isinstance(m, ConvBNAct) and m.groups == 32]
    assert len(grouped) == 16
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fastcnn.trace() as t:
        y = fast(x)
    assert t.kernels("conv_bn_act") == {
        f"{backend}:{'onednn' if backend == 'cpu' else 'reference'}"
    }
    assert not t.fallbacks()
    with torch.no_grad():
        assert_logits_close(y, model(x), torch.float32)


def test_mobilenet_v2_depthwise_convs_fuse_on_the_cpu_backend():
    """Depthwise 3x3s (groups = channels) fold and fuse; ReLU6 is no ReLU, so it stays."""
    model = _torchvision("mobilenet_v2")
    fast = fastcnn.optimize(model, backend="cpu")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    depthwise = [m for m in fast.modules() if isinstance(m, ConvBNAct) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels for m in depthwise)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fastcnn.trace() as t:
        y = fast(x)
    assert t.kernels("conv_bn_act") == {"cpu:onednn"} and not t.fallbacks()
    with torch.no_grad():
        assert_logits_close(y, model(x), torch.float32)


def test_fastcnn_models_need_no_rewrite():
    fast = fastcnn.optimize(fastcnn.models.resnet18(num_classes=10))
    assert isinstance(fast, fastcnn.models.ResNet) and not fast.training
    assert "already" in fastcnn.report(fast).notes[0]


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"expects an nn\.Module"):
        fastcnn.optimize("resnet")
    with pytest.raises(ValueError, match="unknown fastcnn backend"):
        fastcnn.optimize(nn.Conv2d(3, 3, 1), backend="tpu")
    with pytest.raises(ValueError, match=r"not produced by fastcnn\.optimize"):
        fastcnn.report(nn.Conv2d(3, 3, 1))


def test_optimized_googlenet_exports_with_the_inception_op():
    fast = fastcnn.optimize(_torchvision("googlenet"))
    x = torch.randn(1, 3, 32, 32)
    exported = torch.export.export(fast, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "fastcnn.inception.default" in targets
    assert "aten.cat.default" not in targets


def test_verify_covers_the_module_level_fallback(monkeypatch):
    torch.manual_seed(0)
    model = randomize_batchnorm(Untraceable(), seed=3).eval()
    real = ConvBNAct.from_modules

    def corrupt(conv, bn, relu=None, backend=None):
        fused = real(conv, bn, relu, backend)
        fused.bias.add_(1.0)
        return fused

    monkeypatch.setattr(ConvBNAct, "from_modules", staticmethod(corrupt))
    fast = fastcnn.optimize(model, verify=True, example_input=torch.randn(2, 3, 9, 9))
    report = fastcnn.report(fast)
    assert report.method.startswith("module-level")
    assert [e.path for e in report.by_action("reverted")] == ["body.0"]
    assert any(n.startswith("verify: end-to-end") for n in report.notes)
    assert isinstance(fast.body[1], nn.BatchNorm2d)  # the originals are still in place


def test_verify_says_when_it_cannot_verify():
    class Fixed(nn.Module):  # runs on 9x9 inputs only, not on verify's random 64x64 one
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 7 * 7, 2)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))

    with pytest.warns(UserWarning, match="NOT verified"):
        fast = fastcnn.optimize(Fixed().eval(), verify=True)
    assert any("NOT verified" in n and "example_input" in n for n in fastcnn.report(fast).notes)
    fast = fastcnn.optimize(Fixed().eval(), verify=True, example_input=torch.randn(1, 3, 9, 9))
    assert not any("NOT verified" in n for n in fastcnn.report(fast).notes)


def test_report_names_the_kernel_each_module_ran():
    model = _torchvision("resnet18")
    fast = fastcnn.optimize(model, backend="cpu", verify=True)
    report = fastcnn.report(fast)
    key = next(iter(report.kernels["layer1.0.conv1"]))
    assert (key.op, key.backend, key.kernel, key.fallback) == ("conv_bn_act", "cpu", "onednn", None)
    assert "layer1.0.conv1: conv_bn_act cpu:onednn x1" in str(report)
    # a run on NCHW input: the pool falls back to torch's, visibly
    report = fastcnn.report(fast, example_input=torch.randn(1, 3, 32, 32))
    assert any(
        k.op == "max_pool2d" and "channels_last" in k.fallback for _, k in report.fallbacks()
    )


def test_found_by_fuzzing_sibling_inception_blocks_and_conv_plus_itself():
    """Two regressions tests/test_fuzz_optimize.py found: two Inception blocks whose convs share
    a parent module got one fused module between them (the second overwrote the first), and
    relu(conv(x) + conv(x)) (one node added to itself) crashed the chain rewrite."""
    from fuzz_graphs import FuzzNet, Op, Program

    inception = (2, 3, 3, 1, 2, 2, 5, 4, 3)
    program = Program(
        4,
        (
            Op("inception", (0,), inception),
            Op("conv", (0,), (4, 1, 1, 0, 1, False, None, True, False)),
            Op("add_relu", (2, 2), (False,)),
            Op("inception", (3,), (3, 2, 3, 1, 3, 2, 3, 3, 3)),
        ),
        (1, 4),
    )
    model = FuzzNet(program, (2, 4, 9, 9), seed=0).eval()
    fast = fastcnn.optimize(model, backend="eager")
    assert _count(fast, FusedInception) == 2
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        for got, expected in zip(fast(x), model(x), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
