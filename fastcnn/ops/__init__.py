"""Functional fused ops: each checks its inputs, picks a backend and runs its kernel."""

from fastcnn.ops.add_relu import add_relu
from fastcnn.ops.conv_bn_act import conv_bn_act
from fastcnn.ops.inception import inception
from fastcnn.ops.qconv_bn_act import qconv_bn_act

__all__ = ["add_relu", "conv_bn_act", "inception", "qconv_bn_act"]
