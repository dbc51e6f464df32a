"""ModelSpec: how a worker builds its model, picklable so that Ray ships the recipe to each
worker instead of the built model (an optimized model holds custom ops, JIT-built extension
state and packed weights that must be made where they run)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

PRECISIONS = ("fp32", "int8")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """model: a torchvision model name ("resnet50", "googlenet", ...) or a zero-argument
    factory returning an nn.Module (picklable: a module-level function or a class).
    weights: a file torch.load reads as the model's state_dict (None: the factory's or
    torchvision's random weights). precision: "fp32" (fastcnn.optimize) or "int8"
    (fastcnn.quantize, calibrated on `calibration`: a .npy file of images, uint8 [N, H, W, 3]
    or float [N, 3, H, W], else `calibration_batches` random batches). backend: pin one
    (None: auto). cuda_graphs: on a GPU, replay each batch size from a CUDA graph.
    optimize=False: the plain PyTorch model in channels_last (the baseline fastcnn is
    measured against; fp32 only)."""

    model: str | Callable[[], nn.Module] = "resnet50"
    weights: str | None = None
    num_classes: int | None = None
    precision: str = "fp32"
    calibration: str | None = None
    calibration_batches: int = 4
    image_size: int = 224
    backend: str | None = None
    cuda_graphs: bool = False
    optimize: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"ModelSpec: precision must be one of {PRECISIONS}")
        if not self.optimize and (self.precision != "fp32" or self.backend or self.cuda_graphs):
            raise ValueError(
                "ModelSpec: optimize=False (plain PyTorch) runs fp32 only, without a fastcnn "
                "backend or CUDA graphs"
            )
        if not isinstance(self.model, str) and not callable(self.model):
            raise TypeError(
                f"ModelSpec: model must be a torchvision name or a factory, got {self.model!r}"
            )

    def plain_model(self) -> nn.Module:
        """The eval-mode model before fastcnn: built, then its weights loaded."""
        if isinstance(self.model, str):
            import torchvision

            kwargs = {} if self.num_classes is None else {"num_classes": self.num_classes}
            if self.model.startswith("googlenet") or self.model.startswith("inception"):
                kwargs.update(aux_logits=False, init_weights=False)
            try:
                model = torchvision.models.get_model(self.model, weights=None, **kwargs)
            except ValueError as exc:
                raise ValueError(f"ModelSpec: unknown torchvision model {self.model!r}") from exc
        else:
            model = self.model()
            if not isinstance(model, nn.Module):
                raise TypeError(f"ModelSpec: the factory returned {type(model).__name__}")
        if self.weights is not None:
            state = torch.load(Path(self.weights), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        return model.eval()

    def build(self, device: str = "cpu") -> nn.Module:
        """The model as a worker runs it: fused (or int8), channels_last, on `device`."""
        import fastcnn

        model = self.plain_model().to(device)
        if not self.optimize:
            return model.to(memory_format=torch.channels_last)
        if self.precision == "int8":
            batches = [torch.from_numpy(b) for b in self._calibration()]
            fast = fastcnn.quantize(model, [b.to(device) for b in batches], backend=self.backend)
        else:
            fast = fastcnn.optimize(model, backend=self.backend)
        fast = fast.to(memory_format=torch.channels_last)
        if self.cuda_graphs and device.startswith("cuda"):
            fast = fastcnn.cuda_graphs(fast)
        elif self.cuda_graphs:
            warnings.warn(f"ModelSpec: cuda_graphs=True on {device}: CUDA graphs need a GPU, "
                          "the model runs without them", RuntimeWarning, stacklevel=2)  # fmt: skip
        return fast

    def _calibration(self) -> list[np.ndarray]:
        from fastcnn.ray.preprocess import to_model_input

        if self.calibration is None:
            g = np.random.default_rng(0)
            size = self.image_size
            return [g.standard_normal((4, 3, size, size), dtype=np.float32)
                    for _ in range(self.calibration_batches)]  # fmt: skip
        images = np.load(self.calibration)
        x = to_model_input(images, self.image_size).numpy()
        return [x[i : i + 8] for i in range(0, len(x), 8)]
