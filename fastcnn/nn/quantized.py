"""int8 modules of fastcnn.quantize: QConvBNAct over fastcnn.ops.qconv_bn_act, and the converters
between float and uint8 activations (Quantize, Dequantize, Requantize).

A quantized activation is a plain uint8 tensor; its scale and zero point are fixed at
calibration and held by the modules that produce and read it (real = scale * (q - zero_point)).
The modules keep those numbers as Python floats (no tensor reads per call) and save them in
their state_dict through nn.Module's extra state, so a quantized model's state_dict round-trips.
"""

from __future__ import annotations

import torch
from torch import nn

from fastcnn import _backend, _trace, ops
from fastcnn.common.dispatch import can_skip_dispatcher
from fastcnn.common.plans import Plans, plan_key
from fastcnn.ops import _checks
from fastcnn.reference import round_half_even


class QParams(tuple):
    """(scale, zero_point) of a uint8 activation."""

    def __new__(cls, scale: float, zero_point: int):
        return super().__new__(cls, (float(scale), int(zero_point)))

    scale = property(lambda self: self[0])
    zero_point = property(lambda self: self[1])

    def __getnewargs__(self):  # copy.deepcopy and pickle of a quantized model
        return tuple(self)


def quantize_tensor(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """float -> uint8: clamp(round_half_even(x * fp32(1 / scale)) + zero_point, 0, 255), the
    requantize step of fastcnn.reference.qconv_bn_act. A 4-D result is channels_last, the
    layout of every uint8 activation in a quantized model (the int8 kernels' own)."""
    inv = torch.tensor(1.0 / qp.scale, dtype=torch.float32, device=x.device)
    q = round_half_even(x.float() * inv) + qp.zero_point
    q = q.clamp_(0, 255).to(torch.uint8)
    return q.contiguous(memory_format=torch.channels_last) if q.dim() == 4 else q


def dequantize_tensor(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """uint8 -> float32: scale * (q - zero_point)."""
    scale = torch.tensor(qp.scale, dtype=torch.float32, device=q.device)
    return (q.float() - qp.zero_point) * scale


def quantize_weight(weight: torch.Tensor, weight_max: int = 127):
    """Symmetric per-output-channel int8: (q int8 channels_last, scale float32 [Cout]) with
    weight ~= scale[c] * q, |q| <= weight_max (127, or 63 for CPUs without VNNI)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=(1, 2, 3))
    scale = torch.where(amax > 0, amax / weight_max, torch.ones_like(amax))
    q = torch.clamp(round_half_even(w / scale.view(-1, 1, 1, 1)), -weight_max, weight_max)
    return q.to(torch.int8).contiguous(memory_format=torch.channels_last), scale.float()


class _QParamsModule(nn.Module):
    """A module whose quantization numbers live in its extra state."""

    _QPARAMS: tuple[str, ...] = ()  # attribute names; those ending in "qparams" are QParams

    def get_extra_state(self):
        return {name: getattr(self, name) for name in self._QPARAMS}

    def set_extra_state(self, state) -> None:
        plans = getattr(self, "_plans", None)
        if plans is not None:
            plans.clear()
        for name in self._QPARAMS:
            value = state[name]
            if name.endswith("qparams"):
                value = QParams(*value)
            elif isinstance(value, list):
                value = tuple(value)
            setattr(self, name, value)


class Quantize(_QParamsModule):
    """float -> uint8 with fixed qparams (where a quantized region starts)."""

    _QPARAMS = ("qparams",)

    def __init__(self, qparams: QParams):
        super().__init__()
        self.qparams = QParams(*qparams)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.dtype == torch.float32:  # the result is channels_last
            x = x.contiguous(memory_format=torch.channels_last)
        return _convert("quantize", x, quantize_tensor, self.qparams)

    def extra_repr(self) -> str:
        return f"scale={self.qparams.scale:.4g}, zero_point={self.qparams.zero_point}"


class Dequantize(Quantize):
    """uint8 -> float32 (where a quantized region ends)."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return _convert("dequantize", q, dequantize_tensor, self.qparams)


class Requantize(_QParamsModule):
    """uint8 with one (scale, zero point) -> uint8 with another, through fp32 (e.g. a concat
    input whose producer could not write in the concat's shared scale)."""

    _QPARAMS = ("source_qparams", "target_qparams")

    def __init__(self, source: QParams, target: QParams):
        super().__init__()
        self.source_qparams, self.target_qparams = QParams(*source), QParams(*target)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return _convert("requantize", q, _requantize_tensor, self.source_qparams,
                        self.target_qparams)  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.source_qparams} -> {self.target_qparams}"


def _requantize_tensor(q: torch.Tensor, source: QParams, target: QParams) -> torch.Tensor:
    return quantize_tensor(dequantize_tensor(q, source), target)


def _convert(kind: str, x: torch.Tensor, expression, *qparams) -> torch.Tensor:
    """A conversion by the extension's one-pass CPU kernel where it can take x (the same
    arithmetic), else by `expression` (torch ops), recorded in the trace as op `kind`."""
    from fastcnn.cpu import int8

    dtype_ok = x.dtype in _CONVERT_DTYPES[kind]
    why = int8.conversion_unsupported(x) if dtype_ok else f"a {x.dtype} input"
    if why is None:
        _trace.record(kind, "cpu", "one_pass")
        return getattr(int8, kind)(x, *qparams)
    _trace.record(kind, "aten", "expression", why if x.device.type == "cpu" else None)
    return expression(x, *qparams)


_CONVERT_DTYPES = {
    "quantize": (torch.float32,),
    "dequantize": (torch.uint8,),
    "requantize": (torch.uint8,),
}


class QConvBNAct(_QParamsModule):
    """int8 Conv2d (BN folded) + bias (+ int8 residual) (+ ReLU), requantized to uint8: the
    int8 counterpart of fastcnn.nn.ConvBNAct. forward(x, residual=None, out=None) takes uint8 x
    (and residual) in the qparams it was calibrated for and calls fastcnn.ops.qconv_bn_act.

    Buffers: weight (int8, channels_last), weight_scale (float32 [Cout]), bias (float32 [Cout]).
    Extra state: x_qparams, out_qparams, residual_qparams, weight_max, stride, padding, relu.
    """

    _QPARAMS = (
        "x_qparams",
        "out_qparams",
        "residual_qparams",
        "weight_max",
        "stride",
        "padding",
        "relu",
    )

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride=(1, 1),
        padding=(0, 0),
        relu: bool = True,
        weight_max: int = 127,
        device=None,
        backend: str | None = None,
    ):
        super().__init__()
        self.backend = backend
        self.overwrite_residual = False
        self._plans = Plans()  # fastcnn.cpu.int8.plan per input signature, bounded
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.relu = tuple(stride), tuple(padding), relu
        self.weight_max = weight_max
        self.x_qparams = self.out_qparams = self.residual_qparams = QParams(1.0, 0)
        weight = torch.zeros(out_channels, in_channels, *self.kernel_size, dtype=torch.int8)
        self.register_buffer(
            "weight", weight.to(device).contiguous(memory_format=torch.channels_last)
        )
        self.register_buffer("weight_scale", torch.ones(out_channels, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, device=device))

    @staticmethod
    def unsupported(fused) -> str | None:
        """Why a fastcnn.nn.ConvBNAct cannot become a QConvBNAct, or None."""
        if fused.groups != 1:
            kind = "depthwise" if fused.groups == fused.in_channels else "grouped"
            return f"a {kind} conv (groups={fused.groups}): int8 convs take groups=1 only"
        if tuple(_pair(fused.dilation)) != (1, 1):
            return f"a dilated conv (dilation={tuple(_pair(fused.dilation))}): int8 takes 1"
        return None

    @classmethod
    def from_float(
        cls,
        fused,
        x_qparams: QParams,
        out_qparams: QParams,
        residual_qparams: QParams | None = None,
        weight_max: int = 127,
        backend: str | None = None,
    ) -> QConvBNAct:
        """From a fastcnn.nn.ConvBNAct (BN already folded in fp32): weights quantized
        symmetric per output channel, bias kept in fp32."""
        why = cls.unsupported(fused)
        if why is not None:
            raise ValueError(f"QConvBNAct: {why}")
        module = cls(
            fused.in_channels,
            fused.out_channels,
            fused.kernel_size,
            stride=_pair(fused.stride),
            padding=_pair(fused.padding),
            relu=fused.relu,
            weight_max=weight_max,
            device=fused.weight.device,
            backend=backend,
        )
        q, scale = quantize_weight(fused.weight, weight_max)
        with torch.no_grad():
            module.weight.copy_(q)
            module.weight_scale.copy_(scale)
            module.bias.copy_(fused.bias.float())
        module.x_qparams, module.out_qparams = QParams(*x_qparams), QParams(*out_qparams)
        if residual_qparams is not None:
            module.residual_qparams = QParams(*residual_qparams)
        return module

    def forward(self, x, residual=None, out=None):
        # The planned path (plans are made on the cpu backend, for plain tensors; first
        # can_skip_dispatcher: False while torch.compile traces): a plan an earlier call made
        # for this signature runs the primitive, nothing else.
        if out is None and x.device.type == "cpu" and can_skip_dispatcher(x, residual):
            backend = self.backend or _backend.get_backend()
            if backend in ("cpu", "auto"):
                in_place = self.overwrite_residual and residual is not None
                tensors = self._tensors()
                key = plan_key(
                    (x, residual, *tensors), backend, self.stride, self.padding, self.relu,
                    in_place,
                )  # fmt: skip
                if in_place:  # the op refuses this too: a conv cannot write over its input
                    _checks.check_no_overlap("qconv_bn_act", residual, x=x)
                plan = self._plans.get(key)
                qparams = (self.x_qparams, self.out_qparams, self.residual_qparams)
                y = None if plan is None else plan(x, residual, *tensors, qparams)
                if y is None:
                    return self._run_and_plan(key, x, residual, qparams, in_place)
                return y
        if self.backend is not None:
            with _backend.use_backend(self.backend):
                return self._run(x, residual, out)
        return self._run(x, residual, out)

    def _tensors(self):
        """(weight, weight_scale, bias): straight from _buffers (nn.Module.__getattr__ is slow
        on the per-call path), through getattr where one is not a buffer (a Parameter)."""
        buffers = self._buffers
        tensors = (buffers.get("weight"), buffers.get("weight_scale"), buffers.get("bias"))
        if any(t is None for t in tensors):
            return self.weight, self.weight_scale, self.bias
        return tensors

    def _run_and_plan(self, key, x, residual, qparams, in_place):
        """The op, then a plan for later calls like this one if it ran oneDNN's int8 kernel."""
        from fastcnn.cpu import int8

        with _trace.trace() as seen:  # which kernel the op chose, and why
            y = self.forward_op(x, residual)
        events = [(e.op, e.backend, e.kernel, e.fallback) for e in seen.events]
        for event in events:  # the enclosing trace, if any, sees the call as usual
            _trace.record(*event)
        kernels = seen.kernels()
        if len(kernels) == 1 and next(iter(kernels)).startswith("cpu:onednn_int8"):
            plan = int8.plan(
                x, self.weight, self.weight_scale, self.bias, self.stride, self.padding,
                self.relu, qparams, residual, in_place, events,
            )  # fmt: skip
            if plan is not None:
                self._plans.add(key, plan)
        return y

    def forward_op(self, x, residual=None, out=None):
        """forward through fastcnn.ops.qconv_bn_act, every check and choice made anew."""
        if self.backend is not None:
            with _backend.use_backend(self.backend):
                return self._run(x, residual, out)
        return self._run(x, residual, out)

    def _run(self, x, residual, out):
        if self.overwrite_residual and out is None and can_skip_dispatcher(x, residual):
            out = residual  # only outside tracing: there the op must stay functional
        xq, oq, rq = self.x_qparams, self.out_qparams, self.residual_qparams
        return ops.qconv_bn_act(
            x, xq.scale, xq.zero_point, self.weight, self.weight_scale, self.bias,
            self.stride, self.padding, residual, rq.scale, rq.zero_point, self.relu,
            oq.scale, oq.zero_point, out, weight_max=self.weight_max,
        )  # fmt: skip

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.view(-1, 1, 1, 1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, relu={self.relu}, "
            f"x={self.x_qparams}, out={self.out_qparams}"
            + (", overwrite_residual=True" if self.overwrite_residual else "")
        )


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)
