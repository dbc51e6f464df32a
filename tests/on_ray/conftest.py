"""Fixtures of the fastcnn.ray tests: a small model spec with saved weights (every worker loads
the same), its inputs, the single-process reference, and Ray kept on loopback."""

from __future__ import annotations

import contextlib
import csv
import os
import signal

import numpy as np
import pytest
import torch
import torchvision
from fastcnn_testing import assert_logits_close

from fastcnn.ray import ModelSpec, Predictor
from fastcnn.ray.preprocess import to_model_input

ROWS = 40
SIZE = 32

# Every Ray process on 127.0.0.1: by default Ray binds to and dials the machine's interface
# address even when given 127.0.0.1; with this variable off it resolves localhost to loopback
# (seen with Ray 2.60). Ray reads it when imported, so it is set before any test module imports
# Ray; workers inherit it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


@contextlib.contextmanager
def within(seconds: int, what: str):
    """Fails the test, naming `what`, if the block takes longer (Ray's start has no timeout
    of its own: a node it cannot reach makes ray.init wait for ever). Main thread only."""

    def expire(signum, frame):
        raise TimeoutError(f"{what} took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def start_local_ray(**kwargs) -> None:
    """ray.init on loopback with 2 logical CPUs (with 1, a read task and a 1-CPU actor starve
    each other: a known Ray trap), after shutting down any earlier instance."""
    import ray

    ray.shutdown()
    try:
        with within(120, "starting a local Ray instance"):
            ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, **kwargs)  # fmt: skip
    except BaseException:
        ray.shutdown()  # whatever half started
        raise


@pytest.fixture(autouse=True)
def _torch_threads():
    """A Predictor sets torch's threads for its process (as a worker should); in this test
    process the count is put back after each test, or every later test would run with it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def spec(tmp_path_factory) -> ModelSpec:
    """ResNet-18 (10 classes) at 32x32, its weights saved so every worker builds the same."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return ModelSpec(model="resnet18", num_classes=10, weights=str(path), image_size=SIZE)


@pytest.fixture(scope="session")
def images() -> np.ndarray:
    """ROWS preprocessed inputs, float [ROWS, 3, SIZE, SIZE], fresh random values."""
    return np.random.default_rng(1).standard_normal((ROWS, 3, SIZE, SIZE), dtype=np.float32)


@pytest.fixture(scope="session")
def reference(spec, images) -> np.ndarray:
    """The single-process model's logits of every row."""
    threads = torch.get_num_threads()
    try:
        return Predictor(spec=spec, threads=1).predict(images)["logits"]
    finally:
        torch.set_num_threads(threads)


def assert_rows_match(ids, logits, reference) -> None:
    """Every row exactly once, each equal to the single-process output (fp32: thread counts
    differ between workers, so summation order may too)."""
    ids = np.asarray(ids)
    assert sorted(ids.tolist()) == list(range(len(reference))), "rows lost or duplicated"
    got = torch.from_numpy(np.asarray(logits)[np.argsort(ids)])
    assert_logits_close(got, torch.from_numpy(reference), torch.float32)


def write_input_folder(tmp_path, images):
    """A folder for fastcnn-infer: images[:5] as .npy files, a PNG in a subfolder, and a file
    that is not an image. Returns (folder, the PNG's pixels)."""
    from PIL import Image

    folder = tmp_path / "inputs"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        np.save(folder / f"{i:02d}.npy", images[i])
    png = np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(png).save(folder / "sub" / "photo.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder, png


def infer_model_args(spec) -> list[str]:
    """fastcnn-infer's arguments for `spec`'s model, batches of 3, top 2."""
    return ["--model", spec.model, "--num-classes", str(spec.num_classes), "--weights",
            spec.weights, "--image-size", str(spec.image_size), "--batch-size", "3",
            "--top-k", "2"]  # fmt: skip


def assert_predictions(out, spec, images, png) -> None:
    """fastcnn-infer's file has one row per input in path order, each the single-process
    model's top 2, and the broken file's row says why it has none."""
    if out.suffix == ".csv":
        with open(out) as f:
            rows = list(csv.DictReader(f))
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    assert [r["path"].split("inputs/")[1] for r in rows] == [
        "00.npy", "01.npy", "02.npy", "03.npy", "04.npy", "broken.jpg", "sub/photo.png"
    ]  # fmt: skip
    x = np.concatenate([images[:5], to_model_input(png, spec.image_size).numpy()])
    expected = Predictor(spec=spec, top_k=2).predict(x)["top_k"]
    for row, i in zip(rows, [*range(5), None, 5], strict=True):
        if i is None:
            assert "not an image" in row["error"] and row["top_k"] == ""
            continue
        assert row["error"] == ""
        assert row["top_k"] == " ".join(str(c) for c in expected[i])
        assert int(row["top_1"]) == expected[i][0]
