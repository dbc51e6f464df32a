"""Drop-in nn.Modules that hold folded weights and call fastcnn.ops."""

from fastcnn.nn.add_relu import AddReLU

__all__ = ["AddReLU"]
