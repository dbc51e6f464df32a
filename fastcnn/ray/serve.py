"""fastcnn on Ray Serve: a deployment whose replicas each build a Predictor and answer
requests in dynamic batches (@serve.batch), over HTTP and through a deployment handle.

HTTP (POST to the route): an encoded image (JPEG, PNG, ...) as the body, or
application/x-npy (numpy.save's bytes: uint8 [H, W, 3] or float [3, H, W]), or JSON
{"array": [...]} of the same; the answer is JSON {"top_k": [...], "top_k_scores": [...]}.
A request that is none of these gets a 400 naming the problem; the replica keeps serving.
Handle: `await handle.predict.remote(array)` -> {"logits", "top_k", "top_k_scores"}.
"""

from __future__ import annotations

import numpy as np
from ray import serve

from fastcnn.ray.predictor import Predictor
from fastcnn.ray.preprocess import BadInput, decode_image, decode_json, decode_npy, one_image


def _array(body: bytes, content_type: str) -> np.ndarray:
    """One request's image or model input as an array (BadInput names what is wrong)."""
    if content_type.startswith("application/json"):
        return decode_json(body)
    if content_type.startswith("application/x-npy"):
        return decode_npy(body)
    return decode_image(body)


@serve.deployment
class FastCNNDeployment:
    """One replica: a Predictor and a batched predict (its batch size and wait set here)."""

    def __init__(self, predictor: dict, max_batch_size: int, batch_wait_timeout_s: float):
        self.predictor = Predictor(**predictor)
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def predict_batch(self, inputs: list[np.ndarray]) -> list[dict]:
        out = self.predictor.predict(np.concatenate(inputs))
        return [{k: v[i] for k, v in out.items()} for i in range(len(inputs))]

    async def predict(self, array) -> dict:
        """One input (an image, or one preprocessed float [3, size, size]); the answer of its
        batch's forward. Checked and preprocessed alone, so a bad one fails by itself."""
        return await self.predict_batch(one_image(array, self.predictor.spec.image_size))

    def batch_sizes(self) -> list[int]:
        """Every batch this replica's model ran (tests read it)."""
        return list(self.predictor.batch_sizes)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        body = await request.body()
        try:
            array = _array(body, request.headers.get("content-type", ""))
            out = await self.predict(array)
        except BadInput as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"top_k": out["top_k"].tolist(),
                             "top_k_scores": out["top_k_scores"].tolist()})  # fmt: skip


def deployment_options(*, max_batch_size: int, num_replicas: int, num_cpus: float,
                       num_gpus: float, max_ongoing_requests: int | None) -> dict:  # fmt: skip
    """The deployment's options; max_ongoing_requests (default: twice the batch size) is
    raised to the batch size at least: Serve never forms a batch larger than the requests a
    replica may hold."""
    if max_batch_size < 1 or num_replicas < 1:
        raise ValueError("fastcnn.ray.serve_app: max_batch_size and num_replicas must be >= 1")
    return {
        "num_replicas": num_replicas,
        "max_ongoing_requests": max(max_batch_size, max_ongoing_requests or 2 * max_batch_size),
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
    }


def serve_app(*, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005,
              num_replicas: int = 1, num_cpus: float = 1, num_gpus: float = 0,
              max_ongoing_requests: int | None = None, **predictor):  # fmt: skip
    """A Ray Serve application serving fastcnn: serve.run(serve_app(model="resnet50")).

    predictor: Predictor's keyword arguments (model, weights, precision, top_k, spec, ...).
    Each of num_replicas replicas gets num_cpus CPUs (torch's threads) and num_gpus GPUs, and
    batches up to max_batch_size requests, waiting at most batch_wait_timeout_s for a batch to
    fill (max_ongoing_requests: see deployment_options)."""
    options = deployment_options(
        max_batch_size=max_batch_size, num_replicas=num_replicas, num_cpus=num_cpus,
        num_gpus=num_gpus, max_ongoing_requests=max_ongoing_requests,
    )  # fmt: skip
    return FastCNNDeployment.options(**options).bind(predictor, max_batch_size,
                                                     batch_wait_timeout_s)  # fmt: skip
