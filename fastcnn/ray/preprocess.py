"""Images to model input: torchvision's ImageNet evaluation preprocessing (shorter side resized
to size * 256 / 224, center crop, [0, 1], normalized by ImageNet's mean and std), and the
checks every entry point (Predictor, Serve, fastcnn-infer) shares: one BadInput naming what is
wrong with an input, never a crash or a silently different answer."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
import torch.nn.functional as F

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# An image's limits: resizing its shorter side to ~256 scales the longer one by the same factor,
# so a 1 x 30000 strip would become a 256 x 7.7M float tensor (gigabytes from a few kilobytes).
MAX_ASPECT = 10
MAX_PIXELS = 64 * 2**20
DTYPES = {"uint8": np.uint8, "float32": np.float32}  # what a JSON request may name


class BadInput(ValueError):
    """An input that is not an image or a model input (the message says why)."""


def _image_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [H, W, 3 or 4] (or [H, W]) -> float [3, size, size], preprocessed."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) == 0:
        raise BadInput(f"an image must be [H, W, 3] uint8, got shape {tuple(image.shape)}")
    h, w = image.shape[:2]
    if max(h, w) > MAX_ASPECT * min(h, w) or h * w > MAX_PIXELS:
        raise BadInput(
            f"an image of {h} x {w} pixels: at most {MAX_PIXELS} pixels and an aspect ratio "
            f"of {MAX_ASPECT}"
        )
    x = torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1)[None].float()
    scale = round(size * 256 / 224) / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                      mode="bilinear", antialias=True, align_corners=False)  # fmt: skip
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    x = x[:, :, top : top + size, left : left + size] / 255.0
    return ((x - MEAN) / STD)[0]


def _float_batch(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[1] != 3:
        raise BadInput(f"a float input must be [N, 3, H, W], got shape {tuple(array.shape)}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def to_model_input(array, size: int) -> torch.Tensor:
    """A batch as float [N, 3, size, size]: uint8 images [N, H, W, 3] (one [H, W, 3], a batch
    of grayscale [N, H, W], or a list / object array of differently sized ones) are
    preprocessed; float [N, 3, H, W] (or one [3, H, W]) is taken as it is."""
    if isinstance(array, np.ndarray) and array.dtype != object:
        if array.size == 0 or array.ndim == 0:
            raise BadInput(f"an empty input (shape {tuple(array.shape)})")
        if np.issubdtype(array.dtype, np.floating):
            return _float_batch(array)
        if array.dtype != np.uint8:
            raise BadInput(f"images must be uint8 (or float [N, 3, H, W]), got {array.dtype}")
        if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
            array = array[None]  # one image: [H, W] or [H, W, 3 or 4]
        if array.ndim not in (3, 4):  # 3: a batch of grayscale images
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


def one_image(array, size: int) -> np.ndarray:
    """One request's or file's input as float [1, 3, size, size]: an image (uint8 [H, W, 3],
    any size) or a preprocessed float [3, size, size]."""
    x = to_model_input(array, size).numpy()
    if x.shape != (1, 3, size, size):
        raise BadInput(
            f"one image each: uint8 [H, W, 3] or float [3, {size}, {size}], got shape "
            f"{tuple(np.shape(array))}"
        )
    if not np.isfinite(x).all():  # its scores could be neither right nor sent as JSON
        raise BadInput("the input holds NaN or Inf")
    return x


def decode_image(data: bytes) -> np.ndarray:
    """An encoded image (JPEG, PNG, ...) as uint8 [H, W, 3]."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadInput("an empty request body")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.array(image.convert("RGB"))  # writable: torch.from_numpy warns otherwise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise BadInput(f"not an image this server can read ({exc})") from exc


def decode_npy(data: bytes) -> np.ndarray:
    """numpy.save's bytes as an array (no pickled objects)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BadInput(f"not a .npy array ({exc})") from exc


def decode_json(data: bytes) -> np.ndarray:
    """JSON {"array": nested lists, "dtype": "float32" (default) or "uint8"} as an array."""
    try:
        request = json.loads(data)
        dtype = request.get("dtype", "float32")
        if dtype not in DTYPES:
            raise BadInput(f'"dtype" must be one of {sorted(DTYPES)}, got {dtype!r}')
        values = np.asarray(request["array"], dtype=np.float64)
    except BadInput:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise BadInput(f'JSON must be {{"array": [...]}} of numbers ({exc!r})') from exc
    if not np.isfinite(values).all():
        raise BadInput("the array holds NaN or Inf")
    if dtype == "uint8" and ((values < 0).any() or (values > 255).any() or (values % 1).any()):
        raise BadInput('"dtype": "uint8" takes whole numbers from 0 to 255')
    return values.astype(DTYPES[dtype])
