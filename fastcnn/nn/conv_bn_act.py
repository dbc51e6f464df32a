"""fastcnn.nn.ConvBNAct: Conv2d + BatchNorm2d (+ ReLU) as one module over one fused kernel."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastcnn import _backend, _trace, ops
from fastcnn.common.dispatch import can_skip_dispatcher
from fastcnn.common.plans import Plans, plan_key
from fastcnn.nn.fold_bn import fold_bn
from fastcnn.ops import _checks
from fastcnn.ops.conv_bn_act import plan as plan_conv


class ConvBNAct(nn.Module):
    """relu(conv2d(x, weight, bias) + residual) with BatchNorm already folded into weight/bias.

    Holds the folded ``weight`` [Cout, Cin/groups, KH, KW] (kept channels_last, the layout the
    Triton kernel reads fastest) and ``bias`` [Cout] as buffers, so it loads from its own
    state_dict and moves with .to(). forward(x, residual=None, out=None) calls
    fastcnn.ops.conv_bn_act; it is an inference module (build one from trained modules with
    from_modules, or load folded weights). ``backend`` pins the backend it runs on (None: the
    one in force, see fastcnn.set_backend).

    ``overwrite_residual`` (default False): write the result into the residual tensor instead of
    a new one, where nothing reads the residual afterwards. fastcnn.optimize sets it where the
    graph proves that (ResNet's shortcut), as Inductor does; it saves an allocation per block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        groups: int = 1,
        relu: bool = True,
        dilation: int | tuple[int, int] = 1,
        device=None,
        dtype=None,
        backend: str | None = None,
    ):
        super().__init__()
        self.backend = backend
        self.overwrite_residual = False
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"ConvBNAct: in_channels {in_channels} and out_channels {out_channels} must be "
                f"divisible by groups {groups}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        # tuples, not lists: they are part of the (hashable) plan key
        stride, padding, dilation = (
            tuple(v) if isinstance(v, list) else v for v in (stride, padding, dilation)
        )
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.relu = groups, relu
        weight = torch.empty(
            out_channels, in_channels // groups, kh, kw, device=device, dtype=dtype
        )
        # nn.Conv2d's default initialization, never uninitialized memory: a module built
        # directly (not from_modules, no load_state_dict yet) computes with defined weights
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", torch.zeros(out_channels, device=device, dtype=dtype))
        # Launch plans per input layout and backend (fastcnn.ops.conv_bn_act.plan): checks and
        # backend pick done once, later calls only launch.
        self._plans = Plans()  # bounded, safe to share between threads

    @staticmethod
    def unsupported_reason(conv: nn.Conv2d) -> str | None:
        """Why this Conv2d cannot become a ConvBNAct, or None if it can."""
        if isinstance(conv.padding, str):
            return f"padding={conv.padding!r} is not supported (use ints)"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r} is not supported"
        return None

    @classmethod
    def from_modules(
        cls,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d | None,
        relu: nn.Module | bool | None = None,
        backend: str | None = None,
    ) -> ConvBNAct:
        """Fuse an eval-mode Conv2d -> BatchNorm2d (-> ReLU): relu is an nn.ReLU, True, or None
        / False for no activation; bn=None fuses a bare Conv2d (-> ReLU) with its own bias. The
        originals are not modified."""
        if isinstance(relu, nn.Module) and not isinstance(relu, nn.ReLU):
            raise TypeError(f"ConvBNAct fuses nn.ReLU only, got {type(relu).__name__}")
        reason = cls.unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"ConvBNAct: {reason}")
        if bn is None:
            weight = conv.weight.detach().clone()
            bias = torch.zeros_like(weight[:, 0, 0, 0]) if conv.bias is None else conv.bias
            bias = bias.detach().clone()
        else:
            weight, bias = fold_bn(conv, bn)
        module = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            groups=conv.groups,
            relu=relu is not None and relu is not False,
            dilation=conv.dilation,
            device=weight.device,
            dtype=weight.dtype,
            backend=backend,
        )
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
        return module

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The planned path: plain tensors, no out=, no trace recording (a trace wants each
        # call's backend pick, fallbacks included). It runs on every call of a batch-1 forward,
        # so it reads the buffers straight from _buffers (nn.Module.__getattr__ is slow) and
        # needs no use_backend() around it (the plan was made under the pinned backend).
        if out is None and not _trace.active() and can_skip_dispatcher(x, residual):
            weight, bias = self._buffers["weight"], self._buffers["bias"]
            in_place = self.overwrite_residual and residual is not None
            key = plan_key(
                (x, weight, bias, residual), in_place, self.backend or _backend.get_backend(),
                self.stride, self.padding, self.groups, self.dilation, self.relu,
            )  # fmt: skip
            run = self._plans.get(key)
            if run is None:
                run = self._plan(x, residual, weight, bias, in_place) or False
                self._plans.add(key, run)
            if run:
                if in_place:
                    _checks.check_no_overlap("conv_bn_act", residual, x=x)
                    return run(x, weight, bias, residual, residual)
                return run(x, weight, bias, residual, None)
        if self.backend is not None:
            with _backend.use_backend(self.backend):
                return self._run(x, residual, out)
        return self._run(x, residual, out)

    def _run(self, x, residual, out) -> torch.Tensor:
        if self.overwrite_residual and out is None and can_skip_dispatcher(x, residual):
            # Only outside tracing/compiling: there the op must stay functional.
            out = residual
        return ops.conv_bn_act(
            x,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            residual=residual,
            relu=self.relu,
            out=out,
            dilation=self.dilation,
        )

    def _plan(self, x, residual, w, b, in_place):
        args = (self.stride, self.padding, self.groups, self.dilation, residual, self.relu)
        if self.backend is None:
            return plan_conv(x, w, b, *args, in_place=in_place)
        with _backend.use_backend(self.backend):
            return plan_conv(x, w, b, *args, in_place=in_place)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, relu={self.relu}"
            + (", overwrite_residual=True" if self.overwrite_residual else "")
        )
