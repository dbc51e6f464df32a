"""fastcnn.quantize on torchvision ResNet-18 and GoogLeNet (random weights, randomized BN, small
inputs): int8 kernels everywhere a conv is, int8 residuals and concats, verify reverting the
layer that 8 bits cannot hold, the report, state_dict round trips, torch.compile and export."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torchvision
from fastcnn_testing import randomize_batchnorm, skip_unsupported

import fastcnn
from fastcnn.nn.quantized import QConvBNAct, Requantize
from fastcnn.quantize import INT8_LAYER_TOLERANCE, sqnr_db


def _batches(n, size, seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def _events(trace, op):
    return [e for e in trace.events if e.op == op]


def _cl(x):
    return x.contiguous(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    return model, fastcnn.quantize(model, _batches(2, 32, 0), verify=True)


@pytest.fixture(scope="module")
def googlenet():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True)
    model = randomize_batchnorm(model).eval()
    return model, fastcnn.quantize(model, _batches(1, 64, 0), verify=True)


def test_resnet18_runs_int8_convs_with_in_place_residuals(resnet):
    model, q = resnet
    x = _cl(_batches(1, 32, 5)[0])
    with torch.no_grad(), fastcnn.trace() as t:
        y = q(x)
    assert t.counts("conv_bn_act") == {} and len(_events(t, "qconv_bn_act")) == 20
    assert all(e.kernel.startswith("onednn_int8") for e in _events(t, "qconv_bn_act"))
    assert not t.fallbacks(), t  # residuals overwritten in place: no copy
    assert sqnr_db(y, model(x)) > 25
    report = fastcnn.report(q)
    int8 = [e for e in report.entries if e.replacement == "QConvBNAct"]
    assert len(int8) == 20 and all(e.error is not None and e.error < 0.1 for e in int8)


def test_googlenet_concats_stay_int8_in_one_scale(googlenet):
    model, q = googlenet
    assert not any(isinstance(m, Requantize) for m in q.modules())  # branches write the scale
    x = _cl(_batches(1, 64, 5)[0])
    with torch.no_grad(), fastcnn.trace() as t:
        y = q(x)
    assert len(_events(t, "qconv_bn_act")) == 57 and t.counts("conv_bn_act") == {}
    assert sqnr_db(y, model(x)) > 25
    concats = [n for n in q.graph.nodes if n.target is torch.cat]
    assert len(concats) == 9


def test_verify_keeps_an_unquantizable_layer_in_float():
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    with torch.no_grad():  # one huge weight per filter: 8 bits round the rest of it to zero
        w = model.layer2[0].conv1.weight
        w[:, 0, 0, 0] = 50 * w.abs().max()
    q = fastcnn.quantize(model, _batches(2, 32, 0), verify=True)
    report = fastcnn.report(q)
    reverted = report.by_action("reverted")
    assert [e.path for e in reverted] == ["layer2.0.conv1"]
    assert reverted[0].error > INT8_LAYER_TOLERANCE
    assert "verify error" in str(report)
    assert not isinstance(q.get_submodule("layer2.0.conv1"), QConvBNAct)
    with torch.no_grad(), fastcnn.trace() as t:
        q(_cl(_batches(1, 32, 5)[0]))
    assert len(_events(t, "conv_bn_act")) == 1 and len(_events(t, "qconv_bn_act")) == 19


def test_float_stem_and_keep_float():
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()
    q = fastcnn.quantize(model, _batches(1, 32, 0), float_stem=True, keep_float=["layer4.1.conv2"])
    kept = {e.path for e in fastcnn.report(q).kept if e.replacement == "ConvBNAct (fp32)"}
    assert kept == {"conv1", "layer4.1.conv2"}
    assert sum(isinstance(m, QConvBNAct) for m in q.modules()) == 18


def test_state_dict_round_trips(resnet):
    model, q = resnet
    other = fastcnn.quantize(model, [3 * b for b in _batches(1, 32, 9)])  # other scales
    x = _cl(_batches(1, 32, 5)[0])
    with torch.no_grad():
        assert not torch.equal(other(x), q(x))
        other.load_state_dict(q.state_dict())
        assert torch.equal(other(x), q(x))
    state = q.state_dict()
    assert state["layer1.0.conv1.weight"].dtype == torch.int8
    assert "layer1.0.conv1._extra_state" in state


def test_torch_compile_and_export_trace_the_int8_ops(resnet):
    _, q = resnet
    x = _cl(_batches(1, 32, 5)[0])
    # the int8 layers are bit-exact; the fp32 classifier runs oneDNN with a packed weight
    # eagerly and aten's linear when traced (fastcnn.nn.Linear): fp32 rounding apart
    close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        expected = q(x)
        torch._dynamo.reset()
        compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
        close(compiled(x), expected)
    exported = torch.export.export(q, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert sum("fastcnn.qconv_bn_act" in t for t in targets) == 20
    with torch.no_grad():
        close(exported.module()(x), expected)


def test_triton_and_eager_backends_agree_with_the_cpu_kernels():
    """A small quantized net run by each backend: the Triton interpreter and the eager
    reference compute the same integers; oneDNN is within a step per layer."""
    skip_unsupported("cpu", "triton", torch.float32)  # CPU tensors: the interpreter only
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, stride=2, padding=1), torch.nn.BatchNorm2d(12), torch.nn.ReLU(),
    )  # fmt: skip
    model = randomize_batchnorm(model).eval()
    q = fastcnn.quantize(model, _batches(2, 9, 0))
    x = _batches(1, 9, 3)[0]
    with torch.no_grad():
        with fastcnn.use_backend("eager"):
            eager = q(x)
        with fastcnn.use_backend("triton"), fastcnn.trace() as t:
            triton = q(x)
        cpu = q(x)
    assert t.kernels("qconv_bn_act") == {"triton:implicit_gemm_int8"}
    assert torch.equal(triton, eager)
    scale = max(1e-6, eager.abs().max().item())
    assert (cpu - eager).abs().max().item() <= 0.05 * scale


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(calibration=[]), ValueError, "calibration is empty"),
        (dict(calibration=[torch.zeros(3, 8)]), TypeError, "float"),
        (dict(observer="mse"), ValueError, "unknown observer"),
        (dict(verify=-1.0), ValueError, "positive"),
        (dict(verify="yes"), ValueError, "fastcnn.quantize: verify must be a bool or a positive"),
        (
            dict(backend="nope"),
            ValueError,
            r"unknown fastcnn backend 'nope' \(from fastcnn.quantize\)",
        ),
        (dict(overflow_fix="yes"), ValueError, "overflow_fix"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    args = dict(calibration=[torch.randn(1, 3, 8, 8)])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fastcnn.quantize(model, **args)


def test_a_config_object_and_keywords_give_the_same_model():
    """quantize(m, batches, QuantConfig(...)) is the keyword form; keywords given with a config
    replace its fields."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    batches = [torch.randn(2, 3, 8, 8)]
    x = torch.randn(1, 3, 8, 8)
    by_keywords = fastcnn.quantize(model, batches, observer="minmax", float_stem=True)
    config = fastcnn.QuantConfig(observer="minmax", float_stem=False)
    by_config = fastcnn.quantize(model, batches, config, float_stem=True)
    with torch.no_grad():
        assert torch.equal(by_keywords(x), by_config(x))
    kept = {e.path for e in fastcnn.report(by_config).entries if e.action == "kept"}
    assert kept == {"0"}  # the stem stayed fp32: the keyword replaced the config's field
    assert dataclasses.replace(config, verify=True).observer == "minmax"


@pytest.mark.parametrize(
    ("config", "options", "match"),
    [
        ("minmax", {}, "config must be a QuantConfig, got str"),
        (None, {"observers": "minmax"}, r"unknown option\(s\) \['observers'\]"),
    ],
)
def test_bad_configs_are_named(config, options, match):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    with pytest.raises(TypeError, match=match):
        fastcnn.quantize(model, [torch.randn(1, 3, 8, 8)], config, **options)


def test_overflow_fix_gives_7_bit_weights():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    q = fastcnn.quantize(model, [torch.randn(2, 3, 8, 8)], overflow_fix=True)
    conv = next(m for m in q.modules() if isinstance(m, QConvBNAct))
    assert conv.weight_max == 63 and conv.weight.abs().max().item() == 63


@pytest.mark.parametrize("observer", ["minmax", "percentile", "entropy"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_calibration_values_are_ignored_and_warned_of(observer, bad):
    """One NaN or Inf activation used to give minmax scale 1.0 / zero point 0 silently, and
    percentile and entropy a torch.histc error: now the ranges come from the finite values
    and a warning names the tensors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    clean = _batches(3, 12, seed=1)
    dirty = [b.clone() for b in clean]
    dirty[1][0, 1, 2, 3] = bad
    # the reference: the same batches with the bad value replaced by one already in range
    replaced = [b.clone() for b in clean]
    replaced[1][0, 1, 2, 3] = replaced[1][0, 1, 2, 4]
    expected = fastcnn.quantize(model, replaced, observer=observer)
    with pytest.warns(RuntimeWarning, match=r"non-finite values \(NaN/Inf\) .* input"):
        got = fastcnn.quantize(model, dirty, observer=observer)
    x = _batches(1, 12, seed=2)[0]
    with torch.no_grad():
        y, reference = got(x), expected(x)
    # the bad value also spreads into the conv's outputs of that batch, which are ignored too:
    # the ranges are those of slightly fewer values, a few quantization steps at most
    scale = reference.abs().max().item()
    assert torch.isfinite(y).all() and (y - reference).abs().max().item() <= 0.05 * scale


GROUPED_MODELS = {  # with grouped or depthwise convs: SQNR bound, dB (measured 38-42 here)
    "mobilenet_v2": 30.0,
    "efficientnet_b0": 30.0,
    "regnet_y_400mf": 30.0,
    "resnext50_32x4d": 30.0,
}


@pytest.mark.parametrize("name", sorted(GROUPED_MODELS))
def test_models_with_grouped_convs_quantize_the_rest(name):
    """quantize used to raise on any grouped or depthwise conv ("groups=1 and dilation=1
    only"); such convs now stay fp32 with the reason in the report, the others run int8."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    model = randomize_batchnorm(model, seed=1).eval()
    batches = _batches(3, 64, seed=3)
    q = fastcnn.quantize(model, batches)
    entries = fastcnn.report(q).entries
    grouped = [e for e in entries if "int8 convs take groups=1 only" in e.reason]
    assert grouped and all(e.action == "kept" for e in grouped)
    assert any(isinstance(m, QConvBNAct) for m in q.modules())
    x = _batches(1, 64, seed=4)[0]
    with torch.no_grad():
        reference, y = model(x), q(_cl(x))
    sqnr = sqnr_db(y.float(), reference)
    assert sqnr >= GROUPED_MODELS[name], f"{name}: SQNR {sqnr:.1f} dB"
    print(f"{name}: {len(grouped)} grouped convs kept fp32, SQNR {sqnr:.1f} dB")
