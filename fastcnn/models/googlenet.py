"""GoogLeNet (Szegedy et al. 2014, as torchvision implements it) on fastcnn's fused ops.

Modules and state_dict keys are torchvision's (weights load both ways with strict=True); training
mode computes what torchvision computes, auxiliary classifiers included. In eval mode every
BasicConv2d (conv + BN + ReLU) is one fused conv_bn_act, the auxiliary heads are skipped, and each
Inception block runs as fastcnn.ops.inception (the FusedInception op): its three 1x1 convs on the
block input as one GEMM, the max-pool fused into branch 4's conv, every branch writing straight
into its slice of one output, so there is no torch.cat.
"""

from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import nn

from fastcnn import ops
from fastcnn.nn.folded import FoldedConvBN, conv_bn_act_forward, runs_fused
from fastcnn.nn.fused_inception import pool_size
from fastcnn.nn.linear import Linear
from fastcnn.nn.max_pool import MaxPool2d

__all__ = [
    "BasicConv2d",
    "GoogLeNet",
    "GoogLeNetOutputs",
    "Inception",
    "InceptionAux",
    "googlenet",
    "googlenet_loss",
]

# Each Inception block: (in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj), and
# the spatial size it runs at for a 224x224 input.
INCEPTION_CONFIGS = {
    "3a": ((192, 64, 96, 128, 16, 32, 32), 28),
    "3b": ((256, 128, 128, 192, 32, 96, 64), 28),
    "4a": ((480, 192, 96, 208, 16, 48, 64), 14),
    "4b": ((512, 160, 112, 224, 24, 64, 64), 14),
    "4c": ((512, 128, 128, 256, 24, 64, 64), 14),
    "4d": ((512, 112, 144, 288, 32, 64, 64), 14),
    "4e": ((528, 256, 160, 320, 32, 128, 128), 14),
    "5a": ((832, 256, 160, 320, 32, 128, 128), 7),
    "5b": ((832, 384, 192, 384, 48, 128, 128), 7),
}

# Field names as torchvision's, so code written for one reads the other.
GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])


class BasicConv2d(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d(eps=0.001) -> ReLU; fused at inference, where out= lets
    it write into a slice of a larger tensor."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self._folded = FoldedConvBN()

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return conv_bn_act_forward(self.conv, self.bn, self._folded, x, relu=True, out=out)


class Inception(nn.Module):
    """Four branches on one input, concatenated on channels: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3
    (5x5 in the paper: branch3_kernel=5; torchvision uses 3) | 3x3 max-pool -> 1x1."""

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        conv_block=None,
        branch3_kernel: int = 3,
    ):
        super().__init__()
        conv_block = conv_block or BasicConv2d
        self.branch1 = conv_block(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            conv_block(in_channels, ch3x3red, kernel_size=1),
            conv_block(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            conv_block(in_channels, ch5x5red, kernel_size=1),
            conv_block(ch5x5red, ch5x5, kernel_size=branch3_kernel, padding=branch3_kernel // 2),
        )
        self.branch4 = nn.Sequential(
            MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            conv_block(in_channels, pool_proj, kernel_size=1),
        )
        self._merged: tuple | None = None  # (the folds it came from, merged weight, merged bias)

    def _fused_args(self) -> list:
        """ops.inception's weights from the branches' cached folds; the three 1x1 convs on x
        concatenated once and again only when one of their folds changed."""
        convs = [
            self.branch1,
            self.branch2[0],
            self.branch3[0],
            self.branch2[1],
            self.branch3[1],
            self.branch4[1],
        ]
        (w1, b1), (w2r, b2r), (w3r, b3r), (w2, b2), (w3, b3), (w4, b4) = [
            c._folded.get(c.conv, c.bn) for c in convs
        ]
        sources = (w1, w2r, w3r, b1, b2r, b3r)
        if self._merged is None or any(
            a is not b for a, b in zip(self._merged[0], sources, strict=True)
        ):
            weight = torch.cat([w1, w2r, w3r]).contiguous(memory_format=torch.channels_last)
            self._merged = (sources, weight, torch.cat([b1, b2r, b3r]))
        widths = [w1.shape[0], w2r.shape[0], w3r.shape[0]]
        return [self._merged[1], self._merged[2], widths, w2, b2, w3, b3, w4, b4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = pool_size(self.branch4[0])
        if runs_fused(self, x) and pool is not None:
            return ops.inception(x, *self._fused_args(), pool)
        outputs = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(outputs, 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier (training only): 4x4 average pool -> 1x1 conv -> FC -> FC."""

    def __init__(self, in_channels: int, num_classes: int, conv_block=None, dropout: float = 0.7):
        super().__init__()
        conv_block = conv_block or BasicConv2d
        self.conv = conv_block(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # aux1: N x 512 x 14 x 14, aux2: N x 528 x 14 x 14
        x = F.adaptive_avg_pool2d(x, (4, 4))
        # N x 128 x 4 x 4 after the conv, N x 2048 flattened
        x = torch.flatten(self.conv(x), 1)
        x = self.dropout(F.relu(self.fc1(x), inplace=True))
        # N x 1024 -> N x num_classes
        return self.fc2(x)


class GoogLeNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        aux_logits: bool = True,
        transform_input: bool = False,
        init_weights: bool = True,
        dropout: float = 0.2,
        dropout_aux: float = 0.7,
        branch3_kernel: int = 3,
    ):
        super().__init__()
        self.aux_logits = aux_logits
        self.transform_input = transform_input

        def inception(name: str) -> Inception:
            return Inception(*INCEPTION_CONFIGS[name][0], branch3_kernel=branch3_kernel)

        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = inception("3a")
        self.inception3b = inception("3b")
        self.maxpool3 = MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = inception("4a")
        self.inception4b = inception("4b")
        self.inception4c = inception("4c")
        self.inception4d = inception("4d")
        self.inception4e = inception("4e")
        self.maxpool4 = MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = inception("5a")
        self.inception5b = inception("5b")
        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes, dropout=dropout_aux)
            self.aux2 = InceptionAux(528, num_classes, dropout=dropout_aux)
        else:
            self.aux1 = None
            self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = Linear(1024, num_classes)  # nn.Linear's; prepacked on CPU
        if init_weights:  # torchvision's scheme
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform_input:  # ImageNet normalization -> the (0.5, 0.5) the weights expect
            x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
            x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
            x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
            x = torch.cat((x_ch0, x_ch1, x_ch2), 1)
        return x

    def forward(self, x: torch.Tensor):
        """Logits; in training mode with aux_logits, GoogLeNetOutputs(logits, aux2, aux1)."""
        x = self._transform_input(x)
        # N x 3 x 224 x 224
        x = self.maxpool1(self.conv1(x))
        # N x 64 x 56 x 56
        x = self.maxpool2(self.conv3(self.conv2(x)))
        # N x 192 x 28 x 28
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        # N x 480 x 14 x 14
        x = self.inception4a(x)
        # N x 512 x 14 x 14
        use_aux = self.training and self.aux1 is not None
        aux1 = self.aux1(x) if use_aux else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        # N x 528 x 14 x 14
        aux2 = self.aux2(x) if use_aux else None
        x = self.maxpool4(self.inception4e(x))
        # N x 832 x 7 x 7
        x = self.inception5b(self.inception5a(x))
        # N x 1024 x 7 x 7
        x = torch.flatten(self.avgpool(x), 1)
        # N x 1024
        x = self.fc(self.dropout(x))
        # N x num_classes
        if self.training and self.aux_logits:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


def googlenet(
    num_classes: int = 1000, aux_logits: bool = True, transform_input: bool = False, **kwargs
) -> GoogLeNet:
    """GoogLeNet with torchvision's modules and keys; kwargs: init_weights, dropout,
    dropout_aux, branch3_kernel (3 as torchvision, 5 as the paper)."""
    return GoogLeNet(num_classes, aux_logits, transform_input, **kwargs)


def googlenet_loss(outputs, target: torch.Tensor, aux_weight: float = 0.3) -> torch.Tensor:
    """Cross-entropy of the logits plus aux_weight times each auxiliary head's (the paper's 0.3);
    plain logits (eval, or aux_logits=False) give the plain cross-entropy. Takes fastcnn's or
    torchvision's GoogLeNetOutputs (same field names)."""
    if hasattr(outputs, "aux_logits1"):
        loss = F.cross_entropy(outputs.logits, target)
        for aux in (outputs.aux_logits1, outputs.aux_logits2):
            if aux is not None:
                loss = loss + aux_weight * F.cross_entropy(aux, target)
        return loss
    return F.cross_entropy(outputs, target)
