"""The cpu backend's direct oneDNN convolutions (csrc/cpu/onednn_conv.cpp via
fastcnn.cpu.onednn): taken for fp32 channels_last inputs where the extension links the library,
right on every post-op combination, and every way back to torch's mkldnn ops is noted."""

from __future__ import annotations

import warnings

import pytest
import torch
from fastcnn_testing import assert_matches, conv_reference64, random_conv_inputs, random_tensor

from fastcnn import _backend, _extension
from fastcnn.cpu import onednn

_ext = _extension.load()
needs_direct = pytest.mark.usefixtures("onednn_direct")  # conftest.py: skips without it


def _conv(x, weight, bias, stride, padding, residual, relu, in_place=False, groups=1):
    """One call through the CPU conv's entry point (fastcnn.cpu.onednn.plan)."""
    conv = onednn.plan(x, weight, bias, stride, padding, groups, residual, relu)
    return conv(x, weight, bias, residual, residual if in_place else None)


class _NoTorchOps:
    def __getattr__(self, name):
        raise AssertionError(f"the direct path called torch.ops.mkldnn.{name}")


@needs_direct
# (groups, channels in, out): grouped with 8 channels a group, the fewest that oneDNN's AVX2
# kernels take in channels_last (AVX-512 ones take 3; fewer fall back, noted:
# test_a_layout_without_an_optimized_kernel_falls_back_with_a_note)
@pytest.mark.parametrize(("groups", "cin", "cout"), [(1, 12, 20), (4, 32, 32)])
@pytest.mark.parametrize("residual", ["none", "channels_last", "in_place"])
@pytest.mark.parametrize("relu", [True, False])
def test_direct_convs_match_the_reference_without_torch_ops(
    monkeypatch, groups, cin, cout, residual, relu
):
    x, weight, bias = random_conv_inputs(cin, cout, 3, 9, 7, torch.float32, "cpu", batch=3)
    weight = weight[:, : cin // groups].contiguous(memory_format=torch.channels_last)
    r = None
    if residual != "none":
        r = random_tensor((3, cout, 5, 4), torch.float32, "cpu", channels_last=True, seed=5)
    expected = conv_reference64(x, weight, bias, 2, 1, r, relu=relu, groups=groups)
    monkeypatch.setattr(onednn, "_mkldnn", _NoTorchOps())
    dest = r.clone() if r is not None else None
    y = _conv(x, weight, bias, (2, 2), (1, 1), dest, relu, residual == "in_place",
                           groups)  # fmt: skip
    assert_matches(y, expected, torch.float32)
    if r is not None:
        assert (y.data_ptr() == dest.data_ptr()) == (residual == "in_place")
    assert y.is_contiguous(memory_format=torch.channels_last)


needs_bf16 = pytest.mark.skipif(
    not onednn.supports(torch.bfloat16),
    reason="oneDNN runs no bf16 convolutions on this CPU (AVX-512 or native bf16 needed)",
)


@needs_direct
@needs_bf16
@pytest.mark.parametrize("residual", ["none", "channels_last", "in_place"])
@pytest.mark.parametrize("relu", [True, False])
def test_bf16_convs_take_the_direct_path_and_match_the_reference(monkeypatch, residual, relu):
    """bf16 in, bf16 out, fp32 accumulation with the post-ops applied before the one rounding:
    within bf16's tolerance of a float64 reference of the same bf16 inputs; primitives kept."""
    x, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.bfloat16, "cpu", batch=3)
    r = None
    if residual != "none":
        r = random_tensor((3, 20, 9, 7), torch.float32, "cpu", channels_last=True, seed=5)
        r = r.to(torch.bfloat16)
    expected = conv_reference64(x, weight, bias, 1, 1, r, relu=relu)
    monkeypatch.setattr(onednn, "_mkldnn", _NoTorchOps())
    assert onednn.direct(x)
    made = []
    for _ in range(2):
        dest = r.clone() if r is not None else None
        y = _conv(x, weight, bias, (1, 1), (1, 1), dest, relu, residual == "in_place")
        made.append(_ext.onednn_conv_cached())
    assert made[0] == made[1]  # the second call made no primitive
    assert_matches(y, expected, torch.bfloat16)
    if r is not None:
        assert (y.data_ptr() == dest.data_ptr()) == (residual == "in_place")


@needs_direct
@needs_bf16
def test_bf16_without_native_instructions_says_it_is_emulated(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(onednn, "native_bf16", lambda: False)
    x, weight, bias = random_conv_inputs(12, 20, 1, 9, 7, torch.bfloat16, "cpu")
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        y = _conv(x, weight, bias, (1, 1), (0, 0), None, True)
    assert_matches(y, conv_reference64(x, weight, bias, 1, 0), torch.bfloat16)


@pytest.mark.parametrize(
    "cap, native", [("", True), ("AVX512_CORE", False), ("avx2", False), ("AVX512_CORE_AMX", True)]
)
def test_an_isa_cap_below_bf16_makes_it_emulated(monkeypatch, cap, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert onednn.native_bf16() == native


@needs_direct
def test_a_residual_in_another_layout_is_copied_then_added():
    x, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu")
    r = random_tensor((2, 20, 9, 7), torch.float32, "cpu", seed=6)  # NCHW
    assert onednn.residual_copy_reason(x, r) is not None
    y = _conv(x, weight, bias, (1, 1), (1, 1), r, True)
    assert_matches(y, conv_reference64(x, weight, bias, 1, 1, r), torch.float32)


@needs_direct
def test_a_layout_without_an_optimized_kernel_falls_back_with_a_note(monkeypatch):
    """oneDNN 3.2 has no optimized kernel for a channel slice of a wider tensor: such a conv
    goes to torch's op (which copies it dense), and says so once."""
    monkeypatch.setattr(_backend, "_warned", set())
    big = random_tensor((2, 40, 9, 7), torch.float32, "cpu", channels_last=True, seed=7)
    x = big[:, 8:20]
    _, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu")
    with pytest.warns(RuntimeWarning, match="no optimized kernel"):
        y = _conv(x, weight, bias, (1, 1), (1, 1), None, True)
    assert_matches(y, conv_reference64(x, weight, bias, 1, 1), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        _conv(x, weight, bias, (1, 1), (1, 1), None, True)


@needs_direct
@pytest.mark.parametrize("residual", [False, True])
def test_a_planned_conv_without_an_optimized_kernel_takes_torchs_op(residual):
    """A planned conv whose input is a channel slice: the direct call writes nothing, torch's
    op computes it (into a new tensor: the plan's output was never handed out)."""
    big = random_tensor((2, 40, 9, 7), torch.float32, "cpu", channels_last=True, seed=9)
    x = big[:, 8:20]
    _, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu")
    r = random_tensor((2, 20, 9, 7), torch.float32, "cpu", channels_last=True, seed=10)
    r = r if residual else None
    run = onednn.plan(x, weight, bias, (1, 1), (1, 1), 1, r, True, torch.channels_last,
                      recycle=True)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-kernel note: the test above checks it
        y = run(x, weight, bias, r, None)
    assert_matches(y, conv_reference64(x, weight, bias, 1, 1, r), torch.float32)


@needs_direct
def test_in_place_into_a_residual_channel_slice_is_computed():
    """A residual that is a channel slice (not provably free of overlap, not overlapping) is
    written in place through the fallback, not refused."""
    big = random_tensor((2, 40, 9, 7), torch.float32, "cpu", channels_last=True, seed=11)
    x = big[:, 8:20]
    _, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu")
    wide = random_tensor((2, 48, 9, 7), torch.float32, "cpu", channels_last=True, seed=12)
    r = wide[:, :20]
    expected = conv_reference64(x, weight, bias, 1, 1, r.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-kernel note
        y = _conv(x, weight, bias, (1, 1), (1, 1), r, True, True)
    assert_matches(y, expected, torch.float32)


@needs_direct
def test_a_strided_bias_is_read_as_its_values():
    x, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu")
    strided = torch.stack([bias, -bias], 1)[:, 0]  # bias's values, stride 2
    assert not strided.is_contiguous()
    y = _conv(x, weight, strided, (1, 1), (1, 1), None, True)
    assert_matches(y, conv_reference64(x, weight, bias, 1, 1), torch.float32)


def test_without_the_library_torch_ops_run_and_it_is_noted(monkeypatch):
    class _NoOneDNN:  # an extension built without FASTCNN_WITH_ONEDNN
        pass

    monkeypatch.setattr(_extension, "load", lambda: _NoOneDNN())
    monkeypatch.setattr(onednn, "_extension_module", [])
    monkeypatch.setattr(_backend, "_warned", set())
    x, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu")
    with pytest.warns(RuntimeWarning, match="built without the oneDNN library"):
        y = _conv(x, weight, bias, (1, 1), (1, 1), None, True)
    assert not onednn.direct(x)
    assert_matches(y, conv_reference64(x, weight, bias, 1, 1), torch.float32)


@needs_direct
def test_primitives_are_made_once_per_layout(monkeypatch):
    x, weight, bias = random_conv_inputs(12, 20, 3, 11, 5, torch.float32, "cpu", batch=5)
    monkeypatch.setattr(onednn, "_mkldnn", _NoTorchOps())  # the direct path runs every call
    before = _ext.onednn_conv_cached()
    _conv(x, weight, bias, (1, 1), (1, 1), None, True)
    made = _ext.onednn_conv_cached()
    assert made == before + 1
    for _ in range(3):
        _conv(x, weight, bias, (1, 1), (1, 1), None, True)
    assert _ext.onednn_conv_cached() == made


@needs_direct
def test_a_weight_whose_strides_change_is_packed_again():
    """w.data = w.data.transpose(2, 3) keeps the storage, shape and version: only the strides
    tell the pack is stale."""
    x, weight, bias = random_conv_inputs(6, 10, 3, 7, 9, torch.float32, "cpu")
    _conv(x, weight, bias, (1, 1), (1, 1), None, False)
    weight.data = weight.data.transpose(2, 3)
    y = _conv(x, weight, bias, (1, 1), (1, 1), None, False)
    assert_matches(y, conv_reference64(x, weight, bias, 1, 1, relu=False), torch.float32)


def _conv_args(**change):
    """onednn_conv's arguments for a valid 3x3 conv (6 -> 10 channels, 7x9, padding 1), with
    `change` replacing some of them."""
    x, weight, bias = random_conv_inputs(6, 10, 3, 7, 9, torch.float32, "cpu")
    packed, layout = _ext.onednn_conv_pack(weight, tuple(x.shape), (1, 1), (1, 1), 1)
    cl = torch.channels_last
    args = dict(x=x, packed=packed, layout=layout, w=tuple(weight.shape), bias=bias,
                residual=None, out=torch.empty(2, 10, 7, 9).contiguous(memory_format=cl),
                stride=(1, 1), padding=(1, 1), groups=1, relu=True)  # fmt: skip
    args.update(change)
    return list(args.values())


_CL = torch.channels_last
_BAD_CALLS = {
    "out size": (dict(out=torch.empty(2, 10, 7, 8).contiguous(memory_format=_CL)), "output size"),
    "out dtype": (dict(out=torch.empty(2, 10, 7, 9, dtype=torch.float64)), "out is"),
    "channels": (dict(w=(10, 5, 3, 3)), "channels"),
    "bias length": (dict(bias=torch.randn(9)), "bias"),
    "residual size": (dict(residual=torch.randn(2, 10, 7, 8)), "residual"),
    "overlapping out": (dict(out=torch.empty(1, 1, 1, 1).expand(2, 10, 7, 9)), "share memory"),
}


@needs_direct
@pytest.mark.parametrize("bad", list(_BAD_CALLS))
def test_the_extension_refuses_arguments_that_do_not_fit_the_conv(bad):
    change, message = _BAD_CALLS[bad]
    with pytest.raises(RuntimeError, match=message):
        _ext.onednn_conv(*_conv_args(**change))


@needs_direct
def test_a_residual_in_place_must_be_the_output_itself():
    out = torch.randn(2, 10, 7, 9).contiguous(memory_format=torch.channels_last)
    alias = out.as_strided(out.shape, (630, 63, 9, 1))  # same start, NCHW strides
    with pytest.raises(RuntimeError, match="must be out itself"):
        _ext.onednn_conv(*_conv_args(out=out, residual=alias))
    _ext.onednn_conv(*_conv_args(out=out, residual=out))  # the real in-place call is taken


@needs_direct
def test_a_weight_packed_for_another_conv_is_refused():
    x, weight, bias = random_conv_inputs(12, 20, 3, 9, 7, torch.float32, "cpu")
    other, _ = _ext.onednn_conv_pack(weight[:8].contiguous(), tuple(x.shape), (1, 1),
                                          (1, 1), 1)  # fmt: skip
    _, right = _ext.onednn_conv_pack(weight, tuple(x.shape), (1, 1), (1, 1), 1)
    out = torch.empty(2, 20, 9, 7).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="packed for another conv"):
        _ext.onednn_conv(x, other, right, weight.shape, bias, None, out, (1, 1), (1, 1), 1, True)
    with pytest.raises(RuntimeError, match="unknown packed weight layout"):
        _ext.onednn_conv(x, other, 10**6, weight.shape, bias, None, out, (1, 1), (1, 1), 1, True)


@needs_direct
def test_packs_and_primitives_made_under_other_thread_counts_agree():
    """oneDNN picks the packed layout by the thread count too: ResNet-18's 256->512 1x1
    stride-2 conv on a 2x2 input packs to 540,672 bytes under 1 thread, 524,288 under 2 (seen
    here; a primitive made under the other count once met the wrong pack). The primitive
    follows the pack's layout."""
    saved = torch.get_num_threads()
    try:
        for pack_threads, run_threads in ((1, 2), (2, 1)):
            x, weight, bias = random_conv_inputs(256, 512, 1, 2, 2, torch.float32, "cpu",
                                                 batch=1, seed=pack_threads)  # fmt: skip
            torch.set_num_threads(pack_threads)
            _conv(x, weight, bias, (2, 2), (0, 0), None, True)  # packs
            torch.set_num_threads(run_threads)
            y = _conv(x, weight, bias, (2, 2), (0, 0), None, True)
            assert_matches(y, conv_reference64(x, weight, bias, 2, 0), torch.float32)
    finally:
        torch.set_num_threads(saved)


def test_the_build_flags_follow_the_library(monkeypatch):
    monkeypatch.setenv("FASTCNN_NO_ONEDNN", "1")
    assert _extension.find_onednn() is None
    assert _extension._onednn_flags() == ([], [])


def test_the_library_is_found_wherever_its_wheels_are_installed(monkeypatch):
    """A finder that misses an installed library would quietly turn the direct path's tests
    into skips."""
    from importlib import metadata

    monkeypatch.delenv("FASTCNN_NO_ONEDNN", raising=False)
    try:
        metadata.distribution("onednn-devel-cpu-gomp")
        metadata.distribution("onednn-cpu-gomp")
    except metadata.PackageNotFoundError:
        pytest.skip("the onednn-cpu-gomp wheels are not installed here (e.g. the GPU machine)")
    found = _extension.find_onednn()
    assert found is not None and found[2].startswith("3.")
    assert _ext is not None and hasattr(_ext, "onednn_conv"), "found but not built in"


@pytest.mark.parametrize(
    ("header", "version"),
    [
        ("#define DNNL_VERSION_MAJOR 3\n#define DNNL_VERSION_MINOR 2\n#define DNNL_VERSION_PATCH 0",
         "3.2.0"),
        ("#define DNNL_VERSION_MAJOR 2\n#define DNNL_VERSION_MINOR 7", "2.7.0"),
        ("// no defines", None),
    ],
)  # fmt: skip
def test_the_library_version_is_read_from_its_header(header, version):
    assert _extension.onednn_header_version(header) == version
