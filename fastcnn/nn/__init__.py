"""Drop-in nn.Modules that hold folded weights and call fastcnn.ops."""

from fastcnn.nn.add_relu import AddReLU
from fastcnn.nn.conv_bn_act import ConvBNAct
from fastcnn.nn.fold_bn import fold_bn
from fastcnn.nn.fused_inception import FusedInception
from fastcnn.nn.linear import Linear
from fastcnn.nn.max_pool import MaxPool2d
from fastcnn.nn.quantized import Dequantize, QConvBNAct, Quantize, Requantize

__all__ = [
    "AddReLU",
    "ConvBNAct",
    "Dequantize",
    "FusedInception",
    "Linear",
    "MaxPool2d",
    "QConvBNAct",
    "Quantize",
    "Requantize",
    "fold_bn",
]
