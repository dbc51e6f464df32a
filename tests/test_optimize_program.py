"""fastcnn.optimize's result runs a channels_last CPU input as one program per input signature
(fastcnn/optimize/program.py): the same output as the module path, buffers that never leave it, and
the module path wherever the program cannot prove it still applies."""

from __future__ import annotations

import pytest
import torch
import torchvision
from fastcnn_testing import assert_logits_close, randomize_batchnorm, run_threads
from torch import nn

import fastcnn
from fastcnn.cpu import onednn
from fastcnn.optimize import program

pytestmark = pytest.mark.skipif(
    onednn.linked_extension() is None,
    reason="the extension was built without the oneDNN library: no direct CPU path to program",
)

CL = torch.channels_last


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(num_classes=10, **kwargs)
    return randomize_batchnorm(model, seed=seed + 1).eval()


def _input(batch: int = 2, size: int = 40, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size).to(dtype).contiguous(memory_format=CL)


def _module_path(fast: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The optimized model's output module by module (its programs set aside)."""
    programs = fast.__dict__.pop("_fastcnn_programs")
    try:
        return fast(x)
    finally:
        fast._fastcnn_programs = programs


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "googlenet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_program_runs_and_equals_the_module_path(name, dtype):
    if dtype == torch.bfloat16 and not onednn.native_bf16():
        pytest.skip("no native bf16 on this CPU: the bf16 convs do not take the direct path")
    model = _model(name).to(dtype)
    fast = fastcnn.optimize(model)
    x = _input(dtype=dtype)
    with torch.inference_mode():
        first = fast(x)  # made (and verified) here
        assert fast._fastcnn_programs.reason(x) is None
        second = fast(x)  # run here
        expected = _module_path(fast, x)
        reference = model(x)
    tolerance = program.TOLERANCE[dtype]
    scale = max(1.0, expected.abs().max().item())
    for y in (first, second):
        assert not torch.isnan(y).any()
        assert (y.double() - expected.double()).abs().max().item() <= tolerance * scale
    assert_logits_close(second, reference, dtype)


def test_outputs_never_change_after_they_are_returned():
    fast = fastcnn.optimize(_model("resnet18"))
    x1, x2 = _input(), _input()
    with torch.inference_mode():
        fast(x1)
        y1 = fast(x1)
        kept = y1.clone()
        y2 = fast(x2)
    assert torch.equal(y1, kept), "a later call wrote into an earlier call's output"
    assert not torch.equal(y1, y2)


def test_an_unsupported_layer_keeps_the_module_path_and_says_why():
    class Gate(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    model = _model("resnet18")
    model.layer1.append(Gate())
    fast = fastcnn.optimize(model)
    x = _input()
    with torch.inference_mode():
        y = fast(x)
        why = fast._fastcnn_programs.reason(x)
        assert why is not None and "sigmoid" in why
        assert_logits_close(y, model(x), torch.float32)


def _changes():
    """(what a user does to the optimized model after its program was made, its name)."""

    def weight_in_place(fast):
        with torch.no_grad():
            fast.get_submodule("layer1.0.conv1").weight.mul_(-1.5)

    def new_weight(fast):
        conv = fast.get_submodule("layer2.0.conv2")
        conv.weight = conv.weight.detach() * 0.5

    def relu_off(fast):
        fast.get_submodule("layer3.1.conv1").relu = False

    def hook(fast):
        fast.get_submodule("layer1.1.conv2").register_forward_hook(lambda m, i, o: o * 2)

    def new_classifier(fast):
        fast.fc = nn.Linear(512, 10)

    def classifier_data(fast):
        fast.fc.weight.data = torch.randn_like(fast.fc.weight)

    def refreshed_write(fast):
        fast.fc.weight.data.neg_()  # no version counter sees it
        fastcnn.refresh(fast)

    return [weight_in_place, new_weight, relu_off, hook, new_classifier, classifier_data,
            refreshed_write]  # fmt: skip


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_a_changed_model_gets_what_the_module_path_computes(change):
    fast = fastcnn.optimize(_model("resnet18"))
    x = _input()
    with torch.no_grad():
        before = fast(x)
        fast(x)
        change(fast)
        after = fast(x)
        again = fast(x)
        expected = _module_path(fast, x)
    assert not torch.allclose(after, before), "the change must change the output"
    for y in (after, again):
        assert (y - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_a_busy_program_sends_other_calls_down_the_module_path(monkeypatch):
    fast = fastcnn.optimize(_model("resnet18"))
    x = _input()
    runs = []
    run = program.Program.run
    monkeypatch.setattr(program.Program, "run", lambda self, x: runs.append(x) or run(self, x))
    with torch.inference_mode():
        fast(x)
        fast(x)
        assert len(runs) == 2  # verified when made, then run
        programs = fast._fastcnn_programs
        assert programs._lock.acquire()  # as if another thread were running it
        try:
            y = fast(x)
        finally:
            programs._lock.release()
        assert len(runs) == 2
        assert_logits_close(y, _module_path(fast, x), torch.float32)


def test_threads_share_a_model_safely():
    fast = fastcnn.optimize(_model("resnet18"))
    inputs = [_input() for _ in range(4)]
    with torch.inference_mode():
        expected = [_module_path(fast, x) for x in inputs]
    wrong = []

    def serve(i):
        with torch.inference_mode():
            for _ in range(5):
                y = fast(inputs[i])
                if (y - expected[i]).abs().max().item() > 1e-5 * expected[i].abs().max().item():
                    wrong.append(i)

    run_threads(serve, 4, timeout=120)
    assert not wrong


@pytest.mark.parametrize(
    "setting", ["trace", "training", "autograd", "nchw", "budget0"], ids=lambda s: s
)
def test_the_module_path_runs_where_a_program_must_not(setting):
    fast = fastcnn.optimize(_model("resnet18"))
    x = _input()
    if setting == "nchw":
        x = x.contiguous()
    before = fastcnn.set_cache_budget(0) if setting == "budget0" else None
    try:
        if setting == "training":
            fast.train()
        grad = torch.enable_grad() if setting == "autograd" else torch.no_grad()
        if setting == "autograd":
            x.requires_grad_(True)
        with grad:
            if setting == "trace":
                with fastcnn.trace() as t:
                    fast(x)
                    assert program.gate(fast, x) is not None
                assert "cpu:onednn" in t.kernels("conv_bn_act")  # each layer's own pick, traced
            elif setting == "autograd":  # the fused modules refuse it, as without a program
                with pytest.raises(RuntimeError, match="inference-only"):
                    fast(x)
            else:
                fast(x)
            if setting != "trace":
                assert program.gate(fast, x) is not None
        assert fast._fastcnn_programs.reason(x) == "no program made for this input signature"
    finally:
        if before is not None:
            fastcnn.set_cache_budget(before)


def test_programs_are_kept_per_signature_and_bounded():
    fast = fastcnn.optimize(_model("resnet18"))
    with torch.inference_mode():
        for batch in range(1, program.MAX_PROGRAMS + 3):
            x = _input(batch)
            assert_logits_close(fast(x), _module_path(fast, x), torch.float32)
    assert len(fast._fastcnn_programs._programs) == program.MAX_PROGRAMS
    before = fastcnn.cache_info().outputs
    fastcnn.refresh(fast)  # drops them, and their buffers leave the budget
    assert not fast._fastcnn_programs._programs
    assert fastcnn.cache_info().outputs < before


def test_a_program_takes_the_budget_of_the_module_path_it_replaces(monkeypatch):
    """The module path's kept outputs (in recent use: the call that makes the program runs
    it) may fill the budget; the program, which needs fewer bytes, displaces them instead of
    being refused (ResNet-50 at batch 8 was, at the default 256 MiB)."""
    from fastcnn.common import alloc

    monkeypatch.setattr(alloc, "kept_outputs", alloc.KeptOutputs(1 << 30))
    fast = fastcnn.optimize(_model("resnet18"))
    x = _input(4)
    with torch.inference_mode():
        expected = _module_path(fast, x)
        module_path_bytes = alloc.kept_outputs.total
        alloc.kept_outputs.budget = module_path_bytes  # full
        assert_logits_close(fast(x), expected, torch.float32)
        assert fast._fastcnn_programs.reason(x) is None
        program_bytes = alloc.kept_outputs.total
        assert 0 < program_bytes <= module_path_bytes
        assert_logits_close(fast(x), expected, torch.float32)


def test_a_recompiled_graph_runs_its_new_code():
    fast = fastcnn.optimize(_model("resnet18"))
    x = _input()
    with torch.inference_mode():
        fast(x)
        for node in fast.graph.nodes:  # the classifier's output doubled
            if node.op == "output":
                with fast.graph.inserting_before(node):
                    doubled = fast.graph.call_function(torch.mul, (node.args[0], 2.0))
                node.args = (doubled,)
        fast.recompile()
        expected = _module_path(fast, x)
        assert_logits_close(fast(x), expected, torch.float32)
