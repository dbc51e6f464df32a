"""Predictor: a callable class for ray.data.Dataset.map_batches (and fastcnn.ray.serve_app's
replicas), which builds its model inside the worker from a ModelSpec.

    ds.map_batches(Predictor, fn_constructor_kwargs={"model": "resnet50"},
                   compute=ray.data.ActorPoolStrategy(size=2), num_cpus=2, batch_size=16)
"""

from __future__ import annotations

import collections
import os
import threading
import warnings

import numpy as np
import torch

from fastcnn.ray.preprocess import to_model_input
from fastcnn.ray.spec import ModelSpec

BATCH_HISTORY = 4096


def _ray_worker_mode() -> bool:
    """Is this process a Ray worker (not a driver, not outside Ray)?"""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _assigned(resource: str) -> float | None:
    """What Ray gave this worker of `resource`, or None outside a Ray worker (a driver has no
    assigned resources)."""
    if not _ray_worker_mode():
        return None
    import ray

    return ray.get_runtime_context().get_assigned_resources().get(resource)


def worker_threads() -> int:
    """torch's threads for this worker: the CPUs Ray gave it (Ray sets OMP_NUM_THREADS=1 in a
    worker started without num_cpus, and torch would then run single-threaded); a Ray worker
    given no CPUs gets 1 (a warning says to pass num_cpus: every core in each such actor
    would oversubscribe the machine); outside Ray, the machine's cores."""
    cpus = _assigned("CPU")
    if cpus:
        return max(1, int(cpus))
    if _ray_worker_mode():
        warnings.warn(
            "fastcnn.ray: this Ray worker was given no CPUs (num_cpus): torch runs 1 thread; "
            "pass num_cpus to map_batches / ray_actor_options for more",
            RuntimeWarning,
            stacklevel=2,
        )
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


class Predictor:
    """Build the model (fastcnn.optimize, or fastcnn.quantize for precision="int8") where this
    object is made, on the GPU Ray assigned (if any), with torch's threads set to the CPUs Ray
    assigned, and warm it up; then each call maps a batch:

    batch: {column: images} with images uint8 [N, H, W, 3] (Ray Data's read_images; any size:
    ImageNet's preprocessing resizes and crops) or float [N, 3, size, size] (preprocessed),
    plus any other columns, passed through. Returns those columns and "logits" [N, classes],
    "top_k" [N, k] (class indices, best first) and "top_k_scores" [N, k] (softmax).

    Keyword arguments: a ModelSpec as spec=, or its fields (model, weights, num_classes,
    precision, calibration, image_size, backend, cuda_graphs), and top_k, column, threads
    (default: worker_threads()), device ("cpu" or "cuda"; default: "cuda" where Ray assigned
    a GPU), warmup (batch sizes to run once first, planning and packing for them).
    """

    def __init__(self, *, spec: ModelSpec | None = None, top_k: int = 5, column: str = "image",
                 threads: int | None = None, device: str | None = None, warmup=(1,),
                 **fields) -> None:  # fmt: skip
        if spec is not None and fields:
            raise TypeError("fastcnn.ray.Predictor: pass spec= or ModelSpec's fields, not both")
        self.spec = spec or ModelSpec(**fields)
        self.top_k, self.column = top_k, column
        self.threads = threads or worker_threads()
        torch.set_num_threads(self.threads)
        gpus = _assigned("GPU")
        if device is None and gpus and not torch.cuda.is_available():
            warnings.warn(
                f"fastcnn.ray.Predictor: Ray assigned {gpus} GPU(s) but torch sees no CUDA "
                "device: the model runs on the CPU",
                RuntimeWarning,
                stacklevel=2,
            )
        self.device = device or ("cuda" if gpus and torch.cuda.is_available() else "cpu")
        self.model = self.spec.build(self.device)
        # the sizes of the last BATCH_HISTORY batches this predictor ran (tests and the
        # benchmark read them; bounded, as a replica may serve for months)
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=BATCH_HISTORY)
        self._lock = threading.Lock()
        size = self.spec.image_size
        for n in warmup:
            self.predict(np.zeros((n, 3, size, size), dtype=np.float32))
        self.batch_sizes.clear()

    def predict(self, images) -> dict[str, np.ndarray]:
        """logits, top_k and top_k_scores of a batch of images (see the class docstring)."""
        x = to_model_input(images, self.spec.image_size)
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        with self._lock, torch.inference_mode():  # one forward at a time per model
            self.batch_sizes.append(len(x))
            logits = self.model(x).float()
        if len(logits) != len(x):
            raise RuntimeError(
                f"fastcnn.ray.Predictor: the model returned {len(logits)} rows for {len(x)} "
                "inputs (a model must answer one row per image)"
            )
        k = min(self.top_k, logits.shape[1])
        scores, top = torch.softmax(logits, 1).topk(k, dim=1)
        return {
            "logits": logits.cpu().numpy(),
            "top_k": top.cpu().numpy(),
            "top_k_scores": scores.cpu().numpy(),
        }

    def __call__(self, batch: dict) -> dict:
        if self.column not in batch:
            raise KeyError(
                f"fastcnn.ray.Predictor: no column {self.column!r} in the batch "
                f"(columns: {sorted(batch)}); pass column="
            )
        out = {name: values for name, values in batch.items() if name != self.column}
        predicted = self.predict(batch[self.column])
        rows = len(predicted["logits"])
        if any(len(values) != rows for values in out.values()):
            raise ValueError(
                f"fastcnn.ray.Predictor: column {self.column!r} holds {rows} inputs but the "
                f"other columns {len(next(iter(out.values())))} rows (a batch of grayscale "
                "images must be [N, H, W], one image per row)"
            )
        out.update(predicted)
        return out
