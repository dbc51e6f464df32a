"""ResNet-18/34/50/101/152 (He et al. 2015, as torchvision implements them) on fastcnn's fused ops.

The modules and state_dict keys are torchvision's (weights load both ways with strict=True) and
training mode computes exactly what torchvision computes. In eval mode each Conv2d -> BatchNorm2d
(-> ReLU) runs as one fused conv_bn_act with the BN folded in (cached, refreshed when weights or
statistics change), and each block's residual add + ReLU runs in its last conv's epilogue.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastcnn.nn.folded import ConvBN, FoldedConvBN, conv_bn_act_forward
from fastcnn.nn.linear import Linear
from fastcnn.nn.max_pool import MaxPool2d

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        cin, cout, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation
    )


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; relu(F(x) + x), the add and ReLU fused into conv2's epilogue."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)  # kept for torchvision parity; forward fuses it
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._folded = (FoldedConvBN(), FoldedConvBN())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_bn_act_forward(self.conv1, self.bn1, self._folded[0], x)
        return conv_bn_act_forward(self.conv2, self.bn2, self._folded[1], out, residual=identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride, as in torchvision's "v1.5") -> 1x1 expand (x4);
    relu(F(x) + x), the add and ReLU fused into conv3's epilogue."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)  # kept for torchvision parity; forward fuses it
        self.downsample = downsample
        self.stride = stride
        self._folded = (FoldedConvBN(), FoldedConvBN(), FoldedConvBN())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_bn_act_forward(self.conv1, self.bn1, self._folded[0], x)
        out = conv_bn_act_forward(self.conv2, self.bn2, self._folded[1], out)
        return conv_bn_act_forward(self.conv3, self.bn3, self._folded[2], out, residual=identity)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
    ):
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = 64
        self.dilation = 1
        replace_stride_with_dilation = replace_stride_with_dilation or [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None or a 3-element tuple, got "
                f"{replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)  # kept for torchvision parity; forward fuses it
        self.maxpool = MaxPool2d(kernel_size=3, stride=2, padding=1)  # torch's, no indices on CPU
        # Each stage halves the resolution (stride 2) and doubles the channels.
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = Linear(512 * block.expansion, num_classes)  # nn.Linear's; prepacked on CPU
        self._folded_stem = FoldedConvBN()

        for m in self.modules():  # He initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:  # each residual branch starts as zero: the block is the identity
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = ConvBN(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        layers = [
            block(
                self.inplanes,
                planes,
                stride,
                downsample,
                self.groups,
                self.base_width,
                previous_dilation,
                norm_layer,
            )
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.inplanes,
                    planes,
                    groups=self.groups,
                    base_width=self.base_width,
                    dilation=self.dilation,
                    norm_layer=norm_layer,
                )
            )
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N x 3 x 224 x 224
        x = conv_bn_act_forward(self.conv1, self.bn1, self._folded_stem, x)
        # N x 64 x 112 x 112
        x = self.maxpool(x)
        # N x 64 x 56 x 56
        x = self.layer1(x)
        # N x 64*e x 56 x 56   (e = block.expansion: 1 for BasicBlock, 4 for Bottleneck)
        x = self.layer2(x)
        # N x 128*e x 28 x 28
        x = self.layer3(x)
        # N x 256*e x 14 x 14
        x = self.layer4(x)
        # N x 512*e x 7 x 7
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        # N x 512*e
        return self.fc(x)


def _resnet(block, layers: list[int], num_classes: int, **kwargs) -> ResNet:
    return ResNet(block, layers, num_classes=num_classes, **kwargs)


def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    return _resnet(BasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    return _resnet(BasicBlock, [3, 4, 6, 3], num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 6, 3], num_classes, **kwargs)


def resnet101(num_classes: int = 1000, **kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 4, 23, 3], num_classes, **kwargs)


def resnet152(num_classes: int = 1000, **kwargs) -> ResNet:
    return _resnet(Bottleneck, [3, 8, 36, 3], num_classes, **kwargs)
