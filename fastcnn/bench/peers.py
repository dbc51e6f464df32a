"""OpenVINO and ONNX Runtime as fastcnn-bench providers: the runtimes people serve CNNs with on
CPUs (``pip install -e ".[peers]"``).

Each is set up as its documentation recommends for a fixed thread count (torch's, which
fastcnn-bench sets from --threads), and built once per input shape on the first call at that
shape, as fastcnn plans once per input shape:
- OpenVINO: ``openvino.convert_model`` of the eval-mode model, ``Core.compile_model`` on "CPU"
  with INFERENCE_NUM_THREADS, PERFORMANCE_HINT=LATENCY and INFERENCE_PRECISION_HINT=f32. Without
  the precision hint, OpenVINO silently runs bf16 on CPUs with avx512_bf16/AMX: not an fp32
  comparison.
- ONNX Runtime: ``torch.onnx.export`` (torch's default, torch.export-based exporter), an
  InferenceSession with every graph optimization
  (ORT_ENABLE_ALL: its NCHWc layout transformer included), intra_op_num_threads, sequential
  execution and spinning off (its threads otherwise spin after each call and slow whatever runs
  next; fastcnn-bench also times every provider in its own process).
Both take the NCHW input as a numpy array without a copy and return a torch tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PEERS = {
    "openvino": "OpenVINO: convert_model + compile_model on CPU, f32 precision, latency hint",
    "onnxruntime": "ONNX Runtime: torch.onnx.export + CPU session, all graph optimizations",
}


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise RuntimeError(f"{module} is not installed: pip install -e '.[peers]'") from exc


def _check_input(name: str, x: torch.Tensor) -> None:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise RuntimeError(f"{name}: this provider runs float32 CPU inputs only, got {x.dtype}")


def _per_shape(compile_for: Callable[[torch.Tensor], Callable]) -> Callable:
    """A callable that builds compile_for(x) on the first call with x's shape and reuses it."""
    built: dict[tuple, Callable] = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        fn = built.get(tuple(x.shape))
        if fn is None:
            fn = built[tuple(x.shape)] = compile_for(x)
        return fn(x.contiguous())

    return run


def openvino_request(model: torch.nn.Module, x: torch.Tensor, threads: int, **config):
    """An OpenVINO infer request for model at x's shape, compiled as the openvino provider
    compiles it (config: more compile_model properties, e.g. PERF_COUNT=True)."""
    ov = _require("openvino")
    _check_input("openvino", x)
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
        **config,
    }
    with torch.no_grad():
        converted = ov.convert_model(model, example_input=x, input=[tuple(x.shape)])
    compiled = ov.Core().compile_model(converted, "CPU", config)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    if precision != ov.Type.f32:
        raise RuntimeError(f"openvino: compiled for {precision}, not f32")
    return compiled.create_infer_request()


def openvino(model: torch.nn.Module, threads: int) -> Callable:
    _require("openvino")

    def compile_for(x: torch.Tensor) -> Callable:
        request = openvino_request(model, x, threads)

        def infer(x: torch.Tensor) -> torch.Tensor:
            result = request.infer({0: x.numpy()}, share_inputs=True)
            return torch.from_numpy(result[0].copy())

        return infer

    return _per_shape(compile_for)


def onnxruntime(model: torch.nn.Module, threads: int) -> Callable:
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only

    def compile_for(x: torch.Tensor) -> Callable:
        _check_input("onnxruntime", x)
        with torch.no_grad():  # torch's default exporter (torch.export based)
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
        session = ort.InferenceSession(
            program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        name = session.get_inputs()[0].name

        def infer(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

        return infer

    return _per_shape(compile_for)


def versions(providers: list[str]) -> dict[str, str]:
    """{runtime: version} of the peers among providers (for the result file's environment)."""
    found = {}
    for name in providers:
        if name in PEERS:
            try:
                found[name] = __import__(name).__version__
            except ImportError:
                found[name] = "not installed"
    return found


def build(provider: str, model: torch.nn.Module) -> Callable:
    """The provider's callable over an eval-mode NCHW model (torch's thread count)."""
    threads = torch.get_num_threads()
    return {"openvino": openvino, "onnxruntime": onnxruntime}[provider](model, threads)
