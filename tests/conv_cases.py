"""Every conv shape family of ResNet-18/50 and GoogLeNet: scaled down for the interpreter (odd
channel counts, spatial 5 to 11) and at full size for the CUDA tests."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ConvCase:
    name: str
    kernel: int
    stride: int
    padding: int
    small: tuple[int, int, int, int]  # (Cin, Cout, H, W) for the interpreter
    full: tuple[int, int, int, int]  # (Cin, Cout, H, W) as in the network


CASES = [
    # ResNet-18/50
    ConvCase("resnet_stem_7x7_s2", 7, 2, 3, (3, 16, 11, 11), (3, 64, 224, 224)),
    ConvCase("resnet_basic_3x3", 3, 1, 1, (13, 13, 7, 9), (64, 64, 56, 56)),
    ConvCase("resnet_basic_3x3_s2", 3, 2, 1, (13, 24, 9, 7), (128, 256, 28, 28)),
    ConvCase("resnet_downsample_1x1_s2", 1, 2, 0, (13, 24, 9, 7), (256, 512, 56, 56)),
    ConvCase("resnet_bottleneck_reduce_1x1", 1, 1, 0, (40, 13, 7, 9), (256, 64, 56, 56)),
    ConvCase("resnet_bottleneck_expand_1x1", 1, 1, 0, (13, 40, 7, 9), (64, 256, 56, 56)),
    ConvCase("resnet_bottleneck_3x3_s2", 3, 2, 1, (24, 24, 11, 10), (128, 128, 56, 56)),
    # GoogLeNet
    ConvCase("googlenet_conv2_1x1", 1, 1, 0, (16, 16, 5, 6), (64, 64, 56, 56)),
    ConvCase("googlenet_conv3_3x3", 3, 1, 1, (16, 40, 6, 5), (64, 192, 56, 56)),
    ConvCase("inception_reduce_1x1", 1, 1, 0, (40, 24, 7, 7), (192, 96, 28, 28)),
    ConvCase("inception_3x3", 3, 1, 1, (24, 40, 7, 7), (96, 128, 28, 28)),
    ConvCase("inception_5x5", 5, 1, 2, (13, 24, 7, 7), (16, 32, 28, 28)),
    ConvCase("inception_1x1_7x7", 1, 1, 0, (40, 24, 5, 5), (832, 384, 7, 7)),
]
CASE_IDS = [c.name for c in CASES]
