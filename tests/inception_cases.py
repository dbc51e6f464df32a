"""GoogLeNet's nine Inception configurations, as fastcnn.models.googlenet builds them."""

from fastcnn.models.googlenet import INCEPTION_CONFIGS

__all__ = ["INCEPTION_CONFIGS"]
