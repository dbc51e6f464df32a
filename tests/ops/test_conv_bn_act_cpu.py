"""The "cpu" backend's oneDNN path: weights prepacked once, repacked when they change, dropped
with their tensor; dtypes oneDNN cannot run here fall back to the reference with a note."""

from __future__ import annotations

import gc
import importlib
import warnings

import pytest
import torch
from fastcnn_testing import assert_matches, conv_reference64, random_conv_inputs, runs_on

import fastcnn
from fastcnn.common.weight_cache import KEYS_PER_WEIGHT
from fastcnn.cpu import onednn, winograd

conv_module = importlib.import_module("fastcnn.ops.conv_bn_act")

pytestmark = pytest.mark.skipif(
    not onednn.supports(torch.float32), reason="this torch build has no oneDNN (mkldnn)"
)


def _run(x, weight, bias):
    with fastcnn.use_backend("cpu"):
        return fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1)


def _pack_key(x, weight, bias, use_winograd=False):
    return onednn.plan(x, weight, bias, (1, 1), (1, 1), 1, None, True).pack_key(x, use_winograd)


def test_weights_are_packed_once_and_repacked_when_they_change():
    x, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, "cpu")
    _run(x, weight, bias)
    key = _pack_key(x, weight, bias)
    packed = onednn._cache.kept(weight)[key]
    _run(x, weight, bias)
    assert onednn._cache.kept(weight)[key] is packed, "the second call must reuse it"
    with torch.no_grad():
        weight.mul_(-1)  # an in-place update (an optimizer step, load_state_dict, ...)
    out = _run(x, weight, bias)
    assert onednn._cache.kept(weight)[key] is not packed
    expected = conv_reference64(x, weight, bias, 1, 1)
    assert_matches(out, expected, torch.float32)


def test_packing_dies_with_its_weight():
    x, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, "cpu")
    _run(x, weight, bias)
    key = id(weight)
    assert key in onednn._packed
    del weight
    gc.collect()
    assert key not in onednn._packed


def test_input_shapes_share_a_pack_where_the_layout_agrees(onednn_direct):
    """The direct path's pack depends on the layout oneDNN picks (per conv and thread count),
    not on the batch size: serving every batch size keeps one pack per layout."""
    _, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, "cpu")
    shapes = [(b, 13, 11, 5) for b in range(1, KEYS_PER_WEIGHT + 4)]
    keys = set()
    for shape in shapes:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        expected = conv_reference64(x, weight, bias, 1, 1)
        assert_matches(_run(x, weight, bias), expected, torch.float32)
        keys.add(_pack_key(x, weight, bias))
    assert set(onednn._cache.kept(weight)) == keys
    assert len(keys) < len(shapes)  # this conv has one layout for all of them (as most do)


def test_the_torch_path_packs_per_input_shape_and_conv_up_to_a_limit():
    """torch's mkldnn ops take an opaque pack made for one input shape, stride and padding:
    one per (shape, conv), the newest few kept."""
    _, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, "cpu")
    shapes = [(b, 13, 7 + b, 5) for b in range(1, KEYS_PER_WEIGHT + 3)]
    for i, shape in enumerate(shapes):
        x = torch.randn(shape)  # NCHW: torch's path
        assert not onednn.direct(x)
        assert_matches(
            _run(x, weight, bias), conv_reference64(x, weight, bias, 1, 1), torch.float32
        )
        kept = list(onednn._cache.kept(weight))
        assert kept[-1] == _pack_key(x, weight, bias)
        assert len(kept) == min(i + 1, KEYS_PER_WEIGHT)
    x = torch.randn(shapes[-1])
    with fastcnn.use_backend("cpu"):  # the same weight at stride 2: a pack of its own
        y = fastcnn.ops.conv_bn_act(x, weight, bias, 2, 1)
    assert_matches(y, conv_reference64(x, weight, bias, 2, 1), torch.float32)
    assert list(onednn._cache.kept(weight))[-1] == ("torch", tuple(x.shape), (2, 2), (1, 1), 1)


class _NoTorchPath:
    def __getattr__(self, name):
        raise AssertionError(f"torch's mkldnn.{name} ran: the direct path fell back")


@pytest.mark.parametrize("winograd_on", [False, True], ids=["direct", "winograd"])
def test_each_thread_count_runs_the_pack_of_its_layout_on_the_direct_path(
    monkeypatch, winograd_on, onednn_direct
):
    """oneDNN picks the packed layout for the thread count too, and a pack made at another
    count may have no optimized kernel (GoogLeNet packed at 2 threads and run at 1 once fell
    back to torch's path for good): each count runs a pack in its own layout, planned calls
    too, and counts whose layouts agree share it. Winograd's packs (oneDNN's matmul layout)
    as well."""
    x, weight, bias = random_conv_inputs(32, 64, 3, 14, 14, torch.float32, "cpu", batch=1)
    module = fastcnn.nn.ConvBNAct(32, 64, 3, padding=1, backend="cpu")
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    expected = conv_reference64(x, weight, bias, 1, 1)
    monkeypatch.setattr(onednn, "_mkldnn", _NoTorchPath())  # a fallback fails the test
    monkeypatch.setitem(winograd._state, "enabled", winograd_on)
    kernels = {"cpu:winograd"} if winograd_on else ()
    conv = onednn.plan(x, weight, bias, (1, 1), (1, 1), 1, None, True)
    assert conv.winograd_now() == winograd_on
    before = torch.get_num_threads()
    keys = []
    try:
        for threads in (2, 1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                for _ in range(2):  # the second call is a planned one
                    assert_matches(module(x), expected, torch.float32, kernels)
            keys.append(conv.pack_key(x, winograd_on))
    finally:
        torch.set_num_threads(before)
    assert keys[0] == keys[2]
    packs = onednn._cache.kept(module.weight)
    assert set(packs) == set(keys)
    assert all((layout < -1) == winograd_on for _, layout in packs.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_runs_onednn_where_this_cpu_has_it(dtype):
    """bf16/fp16 through oneDNN on a CPU that has them (AVX-512 bf16/fp16, AMX); elsewhere the
    reference, with the fallback and its reason in the trace (runs_on asserts whichever applies
    to this CPU)."""
    x, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, dtype, "cpu")
    res = torch.randn(2, 24, 7, 9).to(dtype).contiguous(memory_format=torch.channels_last)
    with runs_on("conv_bn_act", "cpu", dtype) as t:
        out = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1, residual=res)
    assert t.events[0].kernel == ("onednn" if onednn.supports(dtype) else "reference")
    assert_matches(out, conv_reference64(x, weight, bias, 1, 1, res), dtype)


@pytest.mark.parametrize("op", ["conv_bn_act", "inception"])
def test_dtype_onednn_cannot_run_falls_back_visibly(monkeypatch, op):
    """Simulated on any CPU: oneDNN refusing the dtype sends the call to the reference, with a
    one-time warning and the reason on every traced call."""
    monkeypatch.setattr(fastcnn._backend, "_warned", set())
    monkeypatch.setattr(onednn, "supports", lambda dtype: False)
    x, weight, bias = random_conv_inputs(13, 24, 1, 7, 9, torch.float32, "cpu")
    if op == "conv_bn_act":
        call = lambda: fastcnn.ops.conv_bn_act(x, weight, bias)  # noqa: E731
        expected = conv_reference64(x, weight, bias, 1, 0).float()
    else:
        c = [torch.randn(w, ci, k, k) * 0.2 for w, ci, k in ((18, 13, 1), (5, 6, 3), (4, 5, 3))]
        w4, b = torch.randn(3, 13, 1, 1) * 0.2, lambda n: torch.randn(n) * 0.1
        args = (c[0], b(18), [7, 6, 5], c[1], b(5), c[2], b(4), w4, b(3))
        call = lambda: fastcnn.ops.inception(x, *args)  # noqa: E731
        expected = fastcnn.reference.inception(x.double(), *[_f64(a) for a in args]).float()
    with (
        pytest.warns(RuntimeWarning, match="oneDNN cannot run torch.float32"),
        fastcnn.use_backend("cpu"),
        fastcnn.trace() as t,
    ):
        out = call()
        call()
    assert len(t.events) == 2
    for event in t.events:
        assert (event.backend, event.kernel) == ("cpu", "reference")
        assert "oneDNN cannot run torch.float32" in event.fallback
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _f64(a):
    return a.double() if isinstance(a, torch.Tensor) else a


def test_weights_made_under_inference_mode():
    with torch.inference_mode():
        x, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, "cpu")
        out = _run(x, weight, bias)
        again = _run(x, weight, bias)
    expected = conv_reference64(x, weight, bias, 1, 1)
    assert_matches(out, expected, torch.float32)
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    ("h", "k", "stride", "padding"),
    [(3, 3, 1, 0), (2, 1, 2, 0), (1, 3, 1, 1)],
    ids=["3x3-valid", "1x1-stride2", "1x1-input"],
)
def test_residual_into_a_1x1_output(h, k, stride, padding):
    """An output of one pixel with a residual (ResNet's last stage on a small input): torch
    2.11's out-of-place binary mkldnn op refuses it ("could not create a memory"). NCHW x takes
    torch's path; the caller's residual stays as it was."""
    x, weight, bias = random_conv_inputs(13, 24, k, h, h, torch.float32, "cpu",
                                         channels_last=False)  # fmt: skip
    res = torch.randn(2, 24, 1, 1)
    kept = res.clone()
    with runs_on("conv_bn_act", "cpu", torch.float32) as t:
        out = fastcnn.ops.conv_bn_act(x, weight, bias, stride, padding, residual=res)
    assert t.kernels() == {"cpu:onednn"}
    assert torch.equal(res, kept)
    assert_matches(out, conv_reference64(x, weight, bias, stride, padding, res), torch.float32)


def test_a_plan_writes_into_another_out_without_touching_the_residual():
    """A ConvPlan's out that is not the residual gets the result; the residual (which torch's
    in-place op would have overwritten) stays as it was, on either path."""
    for channels_last in (True, False):  # the direct path, torch's path
        x, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.float32, "cpu",
                                             channels_last=channels_last)  # fmt: skip
        r = torch.randn(2, 24, 7, 9)
        kept, out = r.clone(), torch.empty(2, 24, 7, 9)
        conv = onednn.plan(x, weight, bias, (1, 1), (1, 1), 1, r, True)
        assert conv(x, weight, bias, r, out) is out
        assert torch.equal(r, kept)
        assert_matches(out, conv_reference64(x, weight, bias, 1, 1, r), torch.float32)


def test_a_planned_conv_of_a_channel_slice_gives_the_ops_result_and_layout():
    """x a channel slice of a wider channels_last tensor (channels innermost, not dense): the
    plan gives what the op gives, values and strides."""
    big = torch.randn(2, 40, 9, 7).contiguous(memory_format=torch.channels_last)
    x = big[:, 8:20]
    _, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu")
    with fastcnn.use_backend("cpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note that oneDNN has no kernel for the slice
        expected = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1)
        run = conv_module.plan(x, weight, bias, 1, 1, 1, 1, None, True)
        planned = run(x, weight, bias, None, None)
    assert planned.stride() == expected.stride()
    assert_matches(planned, conv_reference64(x, weight, bias, 1, 1), torch.float32)


@pytest.mark.skipif(not onednn.supports(torch.bfloat16), reason="oneDNN has no bf16 on this CPU")
def test_bf16_in_place_over_the_residual_of_an_nchw_input():
    """torch's in-place binary op has no bf16 kernel for an NCHW x (an internal assert in
    torch): the result is computed out of place and written over the residual."""
    x, weight, bias = random_conv_inputs(13, 24, 3, 7, 9, torch.bfloat16, "cpu",
                                         channels_last=False)  # fmt: skip
    r = torch.randn(2, 24, 7, 9).bfloat16()
    expected = conv_reference64(x, weight, bias, 1, 1, r)
    with runs_on("conv_bn_act", "cpu", torch.bfloat16):
        y = fastcnn.ops.conv_bn_act(x, weight, bias, 1, 1, residual=r, out=r)
    assert y is r
    assert_matches(y, expected, torch.bfloat16)
