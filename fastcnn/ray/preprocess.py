"""Images to model input: torchvision's ImageNet evaluation preprocessing (shorter side resized
to size * 256 / 224, center crop, [0, 1], normalized by ImageNet's mean and std)."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class BadInput(ValueError):
    """An input that is not an image or a model input (the message says why)."""


def _image_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [H, W, 3] (or [H, W]) -> float [3, size, size], preprocessed."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) == 0:
        raise BadInput(f"an image must be [H, W, 3] uint8, got shape {tuple(image.shape)}")
    x = torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1)[None].float()
    h, w = x.shape[2:]
    short = round(size * 256 / 224)
    scale = short / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bilinear", antialias=True, align_corners=False)  # fmt: skip
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    x = x[:, :, top : top + size, left : left + size] / 255.0
    return ((x - MEAN) / STD)[0]


def to_model_input(array, size: int) -> torch.Tensor:
    """A batch as float [N, 3, size, size]: uint8 images [N, H, W, 3] (or a list / object
    array of differently sized ones) are preprocessed; float [N, 3, H, W] is taken as it is."""
    if isinstance(array, np.ndarray) and array.dtype != object:
        if array.size == 0 or array.ndim == 0:
            raise BadInput(f"an empty input (shape {tuple(array.shape)})")
        if np.issubdtype(array.dtype, np.floating):
            if array.ndim == 3:
                array = array[None]
            if array.ndim != 4 or array.shape[1] != 3:
                raise BadInput(
                    f"a float input must be [N, 3, H, W], got shape {tuple(array.shape)}"
                )
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        if array.dtype != np.uint8:
            raise BadInput(f"images must be uint8 (or float [N, 3, H, W]), got {array.dtype}")
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise BadInput(f"uint8 images must be [N, H, W, 3], got shape {tuple(array.shape)}")
    if len(array) == 0:
        raise BadInput("an empty batch")
    images = []
    for image in array:
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise BadInput(f"images must be uint8, got {image.dtype}")
        images.append(_image_tensor(image, size))
    return torch.stack(images)


def decode_image(data: bytes) -> np.ndarray:
    """An encoded image (JPEG, PNG, ...) as uint8 [H, W, 3]."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadInput("an empty request body")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.array(image.convert("RGB"))  # writable: torch.from_numpy warns otherwise
    except (UnidentifiedImageError, OSError) as exc:
        raise BadInput(f"not an image this server can read ({exc})") from exc
