"""int8 providers of fastcnn-bench (--precision int8): fastcnn.quantize against the int8 paths a
CPU user would pick, all calibrated on the same random images (so no one gets better data):

  fastcnn-int8      fastcnn.quantize(model) (percentile observer), oneDNN int8 kernels
  compile-int8      PT2E with torchao's X86InductorQuantizer, torch.compile with freezing
  openvino-int8     OpenVINO with NNCF post-training quantization (nncf.quantize)
  onnxruntime-int8  ONNX Runtime, quantize_static to QDQ (per-channel int8 weights, uint8
                    activations), CPU execution provider

Each builder takes an eval-mode fp32 model (channels_last) and returns a callable on a float
tensor. Peers use the thread count fastcnn-bench runs torch with.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

INT8_PROVIDERS = {
    "fastcnn-int8": "fastcnn.quantize(model), oneDNN int8 kernels (AMX/VNNI where present)",
    "compile-int8": "PT2E X86InductorQuantizer (torchao) + torch.compile with freezing",
    "openvino-int8": "OpenVINO, NNCF post-training int8 (nncf.quantize)",
    "onnxruntime-int8": "ONNX Runtime, quantize_static QDQ (per-channel s8 weights, u8 acts)",
}
CALIBRATION_BATCHES = 4


def calibration_batches(example: torch.Tensor, batch: int = 2) -> list[torch.Tensor]:
    """The same CALIBRATION_BATCHES random N(0, 1) batches for every provider."""
    g = torch.Generator().manual_seed(1234)
    shape = (batch, *example.shape[1:])
    return [torch.randn(shape, generator=g) for _ in range(CALIBRATION_BATCHES)]


def build_int8(provider: str, model: torch.nn.Module, example: torch.Tensor) -> Callable:
    batches = calibration_batches(example)
    builders = {
        "fastcnn-int8": _fastcnn,
        "compile-int8": _inductor,
        "openvino-int8": _openvino,
        "onnxruntime-int8": _onnxruntime,
    }
    return builders[provider](model, example, batches)


def _fastcnn(model, example, batches):
    import fastcnn

    return fastcnn.quantize(model, batches, backend="cpu")


def _inductor(model, example, batches):
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    # strict=True (TorchDynamo) export: non-strict export groups every call of one module into
    # one source partition, and the quantizer's conv + add + ReLU fusion then refuses
    # torchvision's blocks, which call one nn.ReLU two or three times ("Input partition has
    # more than one output node"; pytorch/ao#4478, fixed after torchao 0.18 by skipping such
    # fusions). The batch dimension is dynamic (calibration and timing use other batch sizes),
    # traced at the calibration batch: one of size 1 would be specialized to 1.
    batch = torch.export.Dim("batch", min=1, max=1024)
    traced = batches[0].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exported = torch.export.export(
            model, (traced,), strict=True, dynamic_shapes={"x": {0: batch}}
        ).module()
        prepared = prepare_pt2e(exported, quantizer)
        for x in batches:
            prepared(x.contiguous(memory_format=torch.channels_last))
        converted = convert_pt2e(prepared)
    inductor_config.freezing = True
    torch._dynamo.reset()
    return torch.compile(converted)


def _onnx_file(model, example, folder: Path) -> Path:
    path = folder / "model.onnx"
    torch.onnx.export(
        model, (example.contiguous(),), str(path), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False,
    )  # fmt: skip
    return path


def _openvino(model, example, batches):
    import nncf
    import openvino as ov

    ov_model = ov.convert_model(model, example_input=example.contiguous())
    dataset = nncf.Dataset([b.numpy() for b in batches])
    quantized = nncf.quantize(ov_model, dataset, subset_size=sum(len(b) for b in batches))
    threads = torch.get_num_threads()
    compiled = ov.Core().compile_model(
        quantized, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    )
    request = compiled.create_infer_request()
    output = compiled.outputs[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(request.infer([x.contiguous().numpy()])[output])

    return run


def _onnxruntime(model, example, batches):
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{"x": b.numpy()} for b in batches])

        def get_next(self):
            return next(self._it, None)

    folder = Path(tempfile.mkdtemp(prefix="fastcnn-ort-int8-"))
    fp32 = _onnx_file(model, example, folder)
    int8 = folder / "model.int8.onnx"
    quantize_static(
        str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"x": x.contiguous().numpy()})[0])

    return run
