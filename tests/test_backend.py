"""Backend selection: names, availability reasons, the env var, the context manager, auto."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import fastcnn
from fastcnn import _backend

# The module, not the function fastcnn.ops.add_relu that shadows it as an attribute.
add_relu_module = importlib.import_module("fastcnn.ops.add_relu")


@pytest.fixture(autouse=True)
def _fresh_backend_state(monkeypatch):
    monkeypatch.setattr(_backend, "_default", None)
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_status_cache", {})
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend._env_backend.cache_clear()
    yield
    _backend._env_backend.cache_clear()


def test_available_backends_report_every_backend_with_a_reason():
    states = fastcnn.available_backends()
    assert set(states) == {"triton", "cuda", "cpu", "eager"}
    assert states["eager"] and states["eager"].available
    for state in states.values():
        assert isinstance(state, fastcnn.BackendStatus) and state.reason
    if not torch.cuda.is_available():
        assert not states["cuda"] and "no CUDA device" in states["cuda"].reason


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown fastcnn backend 'fast'.*choose one of"):
        fastcnn.set_backend("fast")
    with pytest.raises(ValueError, match="unknown fastcnn backend"), fastcnn.use_backend("gpu"):
        pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
def test_unavailable_backend_is_refused_with_the_reason():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: no CUDA device"):
        fastcnn.set_backend("cuda")


def test_explicit_backend_for_the_wrong_device_says_why():
    meta = torch.device("meta")
    with (
        fastcnn.use_backend("cpu"),
        pytest.raises(RuntimeError, match="runs cpu tensors, not meta"),
    ):
        _backend.pick("add_relu", meta, add_relu_module._IMPLS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
def test_triton_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CPU tensors need TRITON_INTERPRET=1"):
        fastcnn.set_backend("triton")


def test_env_var_sets_the_default(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "eager")
    assert fastcnn.get_backend() == "eager"
    monkeypatch.setenv(_backend.ENV_VAR, "nonsense")
    _backend._env_backend.cache_clear()  # the variable is read once per process
    with pytest.raises(ValueError, match="from env FASTCNN_BACKEND"):
        fastcnn.get_backend()


def test_set_backend_beats_env_and_use_backend_beats_both(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "cpu")
    assert fastcnn.get_backend() == "cpu"
    fastcnn.set_backend("eager")
    assert fastcnn.get_backend() == "eager"
    with fastcnn.use_backend("auto"):
        assert fastcnn.get_backend() == "auto"
        with fastcnn.use_backend("cpu"):
            assert fastcnn.get_backend() == "cpu"
        assert fastcnn.get_backend() == "auto"
    assert fastcnn.get_backend() == "eager"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(KeyError), fastcnn.use_backend("eager"):
        raise KeyError
    assert fastcnn.get_backend() == "auto"


def test_auto_picks_the_extension_for_cpu_tensors():
    picked = _backend.pick("add_relu", torch.device("cpu"), add_relu_module._IMPLS)
    assert picked is add_relu_module._IMPLS["cpu"]


def test_auto_falls_back_to_eager_with_one_warning(monkeypatch):
    real = _backend.backend_status

    def no_extension(backend, device_type):
        if backend == "cpu":
            return _backend.BackendStatus(False, "pretend the build failed")
        return real(backend, device_type)

    monkeypatch.setattr(_backend, "backend_status", no_extension)
    x, r = torch.randn(2, 13, 7, 9), torch.randn(2, 13, 7, 9)
    with pytest.warns(RuntimeWarning, match="using 'eager' because 'cpu' is unavailable"):
        out = fastcnn.ops.add_relu(x, r)
    torch.testing.assert_close(out, torch.relu(x + r))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        fastcnn.ops.add_relu(x, r)


def test_explicit_backend_without_a_kernel_for_the_op(monkeypatch):
    monkeypatch.setattr(add_relu_module, "_IMPLS", {"eager": add_relu_module._IMPLS["eager"]})
    with fastcnn.use_backend("cpu"), pytest.raises(RuntimeError, match="has no kernel for this op"):
        fastcnn.ops.add_relu(torch.randn(3), torch.randn(3))
