"""fastcnn.fold_bn: BatchNorm folded into the preceding convolution's weight and bias."""

from __future__ import annotations

import torch
from torch import nn


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) such that conv2d(x, weight, bias) == bn(conv(x)) with bn in eval mode.

    scale = gamma / sqrt(running_var + eps); weight = conv.weight * scale (per output channel);
    bias = (conv.bias - running_mean) * scale + beta. gamma = 1 and beta = 0 when bn is not
    affine; conv.bias = 0 when the conv has none. Computed in fp32 (float64 stays float64) and
    cast back to the conv's dtype. Returns new tensors, detached from both modules.
    """
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(
            f"fold_bn expects (nn.Conv2d, nn.BatchNorm2d), got ({type(conv).__name__}, "
            f"{type(bn).__name__})"
        )
    if bn.training:
        raise RuntimeError(
            "fold_bn: the BatchNorm2d is in training mode, where it normalizes with batch "
            "statistics that folding cannot capture; call .eval() first"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "fold_bn: the BatchNorm2d has no running statistics (track_running_stats=False), "
            "so even in eval mode it uses batch statistics; there is nothing to fold"
        )
    if conv.out_channels != bn.num_features:
        raise ValueError(
            f"fold_bn: the conv has {conv.out_channels} output channels but the BatchNorm2d "
            f"normalizes {bn.num_features}"
        )
    dtype = conv.weight.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        shift = -bn.running_mean.to(acc)
        if conv.bias is not None:
            shift = shift + conv.bias.to(acc)
        if bn.affine:
            scale = scale * bn.weight.to(acc)
        bias = shift * scale
        if bn.affine:
            bias = bias + bn.bias.to(acc)
        weight = conv.weight.to(acc) * scale.reshape(-1, 1, 1, 1)
    return weight.to(dtype).detach(), bias.to(dtype).detach()
