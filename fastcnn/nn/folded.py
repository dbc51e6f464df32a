"""Eval-time folding for models that keep torchvision's Conv2d + BatchNorm2d modules.

fastcnn.models keep the real Conv2d and BatchNorm2d children (so their state_dict is
torchvision's and training is torchvision's), and at inference run one fused conv_bn_act with
the BN folded in. FoldedConvBN caches that fold and refreshes it whenever any tensor it came from
changed: a new optimizer step, a training forward that updated the running statistics, a
load_state_dict, a .to()/.half(). It compares each tensor's version counter and storage, so
evaluating after more training never uses stale folded weights (the pitfall of
pytorch/pytorch#108863).
"""

from __future__ import annotations

import torch
from torch import nn

from fastcnn import _trace, ops
from fastcnn.nn.fold_bn import fold_bn
from fastcnn.ops._checks import SUPPORTED_DTYPES


def _signature(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple | None:
    parts: list = [bn.eps]
    for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var):
        if t is None:
            parts.append(None)
            continue
        try:
            parts.append((t.data_ptr(), t._version, t.dtype, t.device))
        except RuntimeError:  # inference tensors have no version counter: never cache them
            return None
    return tuple(parts)


class FoldedConvBN:
    """fold_bn(conv, bn), kept channels_last and recomputed only when its inputs change.

    Not an nn.Module on purpose: it adds nothing to the state_dict.
    """

    __slots__ = ("_key", "_pins", "_value")

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pins: tuple = ()

    def clear(self) -> None:
        """Fold again on the next call (fastcnn.refresh: the weights changed unseen)."""
        self._key, self._value, self._pins = None, None, ()

    def get(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        key = _signature(conv, bn)
        if key is None or key != self._key or self._value is None:
            weight, bias = fold_bn(conv, bn)
            self._value = (weight.contiguous(memory_format=torch.channels_last), bias)
            self._key = key
            # Keep the source storages alive while the key names their addresses: a freed one's
            # address could be handed to new weights (a .half().float() round trip) whose
            # version counter matches too, and the stale fold would be reused.
            sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
            self._pins = tuple(t.untyped_storage() for t in sources if t is not None)
        return self._value


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def runs_fused(module: nn.Module, x: torch.Tensor) -> bool:
    """Will `module` (built on conv_bn_act_forward) take the fused inference path for x?
    Not in training mode, not for a dtype the fused ops do not take (float64: the plain
    modules run, as in torchvision), and not while autograd must record x or the parameters."""
    if module.training or x.dtype not in SUPPORTED_DTYPES:
        return False
    if not torch.is_grad_enabled():
        return True
    return not x.requires_grad and not any(p.requires_grad for p in module.parameters())


class ConvBN(nn.Sequential):
    """nn.Sequential(conv, bn), e.g. ResNet's downsample shortcut (state_dict keys "0.*" and
    "1.*" as in torchvision), run as one fused conv_bn_act at inference."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__(conv, bn)
        self._folded = FoldedConvBN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn_act_forward(self[0], self[1], self._folded, x, relu=False)


def conv_bn_act_forward(
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    cache: FoldedConvBN,
    x: torch.Tensor,
    relu: bool = True,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """relu(bn(conv(x)) + residual), exactly as torchvision computes it when training or when
    autograd must see the parameters (e.g. fine-tuning with frozen BN); otherwise one fused
    fastcnn.ops.conv_bn_act with the cached folded weights. With out=, the result is written
    there (e.g. a channel slice of a concat output) and returned."""
    unfused = bn.training or _needs_autograd(
        x, residual, conv.weight, conv.bias, bn.weight, bn.bias
    )
    if not unfused and x.dtype not in SUPPORTED_DTYPES:
        unfused = True
        _trace.record("conv_bn_act", "eager", "modules", f"{x.dtype} has no fused kernel")
    if unfused:
        y = bn(conv(x))
        if residual is not None:
            y = y + residual
        if relu:
            y = torch.relu(y)
        return y if out is None else out.copy_(y)
    weight, bias = cache.get(conv, bn)
    return ops.conv_bn_act(
        x,
        weight,
        bias,
        stride=conv.stride,
        padding=conv.padding,
        groups=conv.groups,
        residual=residual,
        relu=relu,
        out=out,
        dilation=conv.dilation,
    )
