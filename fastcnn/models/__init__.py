"""Ready models built from fastcnn's fused blocks, torchvision state_dict compatible."""

from fastcnn.models.googlenet import GoogLeNet, GoogLeNetOutputs, googlenet, googlenet_loss
from fastcnn.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152

__all__ = [
    "GoogLeNet",
    "GoogLeNetOutputs",
    "ResNet",
    "googlenet",
    "googlenet_loss",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]
