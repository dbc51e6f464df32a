"""fastcnn.ray.serve_app on a local Ray Serve (loopback): concurrent requests form batches and
each answer equals the single-process model's; a malformed request gets a 400 naming the
problem and the replica keeps serving."""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from conftest import SIZE, start_local_ray, within
from fastcnn_testing import assert_logits_close

from fastcnn.ray.preprocess import to_model_input

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed")
REQUESTS = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(spec):
    """(handle, url) of one replica batching up to 8 requests, waiting up to 50 ms."""
    from fastcnn.ray import serve_app

    start_local_ray()
    port = _free_port()
    try:
        with within(180, "starting Ray Serve and the fastcnn application"):
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            handle = serve.run(
                serve_app(max_batch_size=8, batch_wait_timeout_s=0.05, num_cpus=1, spec=spec),
                name="fastcnn", route_prefix="/predict",
            )  # fmt: skip
    except BaseException:
        serve.shutdown()
        ray.shutdown()
        raise
    yield handle, f"http://127.0.0.1:{port}/predict"
    serve.shutdown()
    ray.shutdown()


def _post(url, body: bytes, content_type: str):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_concurrent_requests_form_batches_and_match_one_process(app, images, reference):
    handle, _ = app
    before = len(handle.batch_sizes.remote().result(timeout_s=30))
    answers = [handle.predict.remote(images[i]) for i in range(REQUESTS)]
    logits = np.stack([answer.result(timeout_s=120)["logits"] for answer in answers])
    assert_logits_close(torch.from_numpy(logits), torch.from_numpy(reference[:REQUESTS]),
                        torch.float32)  # fmt: skip
    sizes = handle.batch_sizes.remote().result(timeout_s=30)[before:]
    assert sum(sizes) == REQUESTS and max(sizes) > 1, sizes


def test_http_answers_images_and_arrays(app, spec, images):
    from PIL import Image

    from fastcnn.ray import Predictor

    _, url = app
    png = np.random.default_rng(3).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(png).save(encoded, format="PNG")
    local = Predictor(spec=spec, top_k=5)
    cases = [
        (encoded.getvalue(), "image/png", to_model_input(png, SIZE).numpy()),
        (_npy(images[0]), "application/x-npy", images[:1]),
        (json.dumps({"array": images[1].tolist()}).encode(), "application/json", images[1:2]),
    ]
    for body, content_type, x in cases:
        status, answer = _post(url, body, content_type)
        assert status == 200, answer
        assert answer["top_k"] == local.predict(x)["top_k"][0].tolist()


@pytest.mark.parametrize(
    ("body", "content_type", "words"),
    [
        (b"", "image/jpeg", "empty"),
        (b"GIF89a not really", "image/gif", "not an image"),
        (b"{not json", "application/json", "JSON must be"),
        (b'{"array": [[1, 2], [3, 4]]}', "application/json", "[N, 3, H, W]"),
        (_npy(np.zeros((2, 3, SIZE, SIZE), np.float32)), "application/x-npy", "one image"),
        (_npy(np.zeros((3, SIZE + 1, SIZE), np.float32)), "application/x-npy", "one image"),
        (b"\x93NUMPY garbage", "application/x-npy", "not a .npy"),
        (b'{"array": [[[300]]], "dtype": "uint8"}', "application/json", "0 to 255"),
        (b'{"array": [[[1.5]]], "dtype": "uint8"}', "application/json", "whole numbers"),
        (b'{"array": [[[1]]], "dtype": "int8"}', "application/json", '"dtype" must be'),
        (b'{"array": [[[NaN]]]}', "application/json", "NaN or Inf"),
        (b"[" * 100000 + b"]" * 100000, "application/json", "JSON must be"),
        (_npy(np.full((3, SIZE, SIZE), np.nan, np.float32)), "application/x-npy", "NaN or Inf"),
        (_npy(np.zeros((1, 3000, 3), np.uint8)), "application/x-npy", "aspect ratio"),
    ],
)
def test_bad_requests_get_400_and_the_replica_keeps_serving(app, images, body, content_type,
                                                            words):  # fmt: skip
    _, url = app
    status, answer = _post(url, body, content_type)
    assert status == 400 and words in answer["error"], (status, answer)
    status, _ = _post(url, _npy(images[2]), "application/x-npy")
    assert status == 200


def test_max_ongoing_requests_is_at_least_the_batch_size():
    from fastcnn.ray.serve import deployment_options

    sizes = {"num_replicas": 2, "num_cpus": 1, "num_gpus": 0}
    options = deployment_options(max_batch_size=64, max_ongoing_requests=4, **sizes)
    assert options["max_ongoing_requests"] == 64
    assert deployment_options(max_batch_size=8, max_ongoing_requests=None, **sizes)[
        "max_ongoing_requests"] == 16  # fmt: skip
    with pytest.raises(ValueError, match="max_batch_size"):
        deployment_options(max_batch_size=0, max_ongoing_requests=None, **sizes)
