"""OpenVINO and ONNX Runtime as fastcnn-bench providers: the runtimes people serve CNNs with on
CPUs (``pip install -e ".[peers]"``).

Each is set up as its documentation recommends for a fixed thread count (torch's, which
fastcnn-bench sets from --threads), and built once per input shape on the first call at that
shape, as fastcnn plans once per input shape:
- OpenVINO: ``openvino.convert_model`` of the eval-mode model (in fp32), ``Core.compile_model``
  on "CPU" with INFERENCE_NUM_THREADS, PERFORMANCE_HINT=LATENCY and INFERENCE_PRECISION_HINT=f32
  ("openvino") or bf16 ("openvino-bf16"), or no precision hint ("openvino-default": what a user
  who sets none gets, bf16 on CPUs with avx512_bf16/AMX, f32 elsewhere; the result file's
  environment names it). Each checks the precision it compiled for.
- ONNX Runtime: ``torch.onnx.export`` (torch's default, torch.export-based exporter), an
  InferenceSession with every graph optimization
  (ORT_ENABLE_ALL: its NCHWc layout transformer included), intra_op_num_threads, sequential
  execution and spinning off (its threads otherwise spin after each call and slow whatever runs
  next; fastcnn-bench also times every provider in its own process).
Both take the NCHW input as a numpy array without a copy and return a torch tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

PEERS = {
    "openvino": "OpenVINO: convert_model + compile_model on CPU, f32 precision, latency hint",
    "openvino-bf16": "OpenVINO as openvino, bf16 precision (CPUs with native bf16)",
    "openvino-default": "OpenVINO as openvino, its default precision (no hint)",
    "onnxruntime": "ONNX Runtime: torch.onnx.export + CPU session, all graph optimizations",
}


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise RuntimeError(f"{module} is not installed: pip install -e '.[peers]'") from exc


def _check_input(name: str, x: torch.Tensor, dtypes=(torch.float32,)) -> None:
    if x.dtype not in dtypes or x.device.type != "cpu":
        raise RuntimeError(f"{name}: this provider runs float32 CPU inputs only, got {x.dtype}")


# OpenVINO takes the fp32 model and input and runs the precision asked of it: a bf16 run of
# fastcnn-bench hands it bf16 inputs, converted here (a copy of the input, timed with it)
_OPENVINO_INPUTS = (torch.float32, torch.bfloat16)


def _per_shape(compile_for: Callable[[torch.Tensor], Callable]) -> Callable:
    """A callable that builds compile_for(x) on the first call with x's shape and reuses it."""
    built: dict[tuple, Callable] = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        fn = built.get(tuple(x.shape))
        if fn is None:
            fn = built[tuple(x.shape)] = compile_for(x)
        return fn(x.contiguous())

    return run


def openvino_request(model: torch.nn.Module, x: torch.Tensor, threads: int, precision="f32",
                     **config):  # fmt: skip
    """An OpenVINO infer request for model at x's shape, compiled as the openvino provider
    compiles it: INFERENCE_PRECISION_HINT=precision ("f32", "bf16"; None: OpenVINO's default),
    and config, more compile_model properties (e.g. PERF_COUNT=True)."""
    ov = _require("openvino")
    _check_input("openvino", x, _OPENVINO_INPUTS)
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", **config}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    model = copy.deepcopy(model).float() if _has_dtype_other_than_fp32(model) else model
    with torch.no_grad():
        converted = ov.convert_model(model, example_input=x.float(), input=[tuple(x.shape)])
    compiled = ov.Core().compile_model(converted, "CPU", config)
    compiled_for = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32"
    if precision is not None and compiled_for != precision:
        raise RuntimeError(f"openvino: compiled for {compiled_for}, not {precision}")
    return compiled.create_infer_request()


def _has_dtype_other_than_fp32(model: torch.nn.Module) -> bool:
    return any(p.dtype != torch.float32 for p in [*model.parameters(), *model.buffers()])


def openvino(model: torch.nn.Module, threads: int, precision="f32") -> Callable:
    _require("openvino")

    def compile_for(x: torch.Tensor) -> Callable:
        request = openvino_request(model, x, threads, precision)

        def infer(x: torch.Tensor) -> torch.Tensor:
            result = request.infer({0: _fp32_array(x)}, share_inputs=True)
            return torch.from_numpy(result[0].copy())

        return infer

    return _per_shape(compile_for)


def _fp32_array(x: torch.Tensor):
    """x as an fp32 numpy array: itself (fp32), or converted by numpy (bf16: its bits shifted
    into fp32's, exact). Not by torch: a torch op wakes torch's OpenMP threads, which then spin
    on the cores OpenVINO's own threads run on (measured: GoogLeNet batch 1 8.1 -> 12.4 ms)."""
    if x.dtype == torch.float32:
        return x.numpy()
    bits = x.contiguous().view(torch.int16).numpy()
    return (bits.astype("uint32") << 16).view("float32")


def openvino_default_precision() -> str:
    """The precision OpenVINO's CPU plugin runs when no hint is given, on this CPU."""
    ov = _require("openvino")
    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


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
            runtime = name.partition("-")[0]
            try:
                found[runtime] = __import__(runtime).__version__
            except ImportError:
                found[runtime] = "not installed"
    if "openvino-default" in providers and found.get("openvino") != "not installed":
        found["openvino default precision"] = openvino_default_precision()
    return found


def build(provider: str, model: torch.nn.Module) -> Callable:
    """The provider's callable over an eval-mode NCHW model (torch's thread count)."""
    threads = torch.get_num_threads()
    if provider == "onnxruntime":
        return onnxruntime(model, threads)
    precision = {"openvino": "f32", "openvino-bf16": "bf16", "openvino-default": None}[provider]
    return openvino(model, threads, precision)
