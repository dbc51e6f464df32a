"""fastcnn.ray without a Ray cluster: preprocessing, the Predictor in this process (as Ray Data
calls it), its GPU form, and fastcnn-infer run locally. Ray itself is not needed here."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SIZE, assert_predictions, infer_model_args, write_input_folder
from fastcnn_testing import HAS_CUDA, NO_GPU_REASON, assert_logits_close

from fastcnn.ray import ModelSpec, Predictor, infer, worker_threads
from fastcnn.ray.preprocess import BadInput, decode_json, one_image, to_model_input


def test_predictor_maps_a_batch_like_the_optimized_model(spec, images):
    predictor = Predictor(spec=spec, top_k=3)
    out = predictor({"image": images[:5], "id": np.arange(5)})
    assert out["id"].tolist() == [0, 1, 2, 3, 4]  # other columns pass through
    with torch.no_grad():
        expected = spec.build()(torch.from_numpy(images[:5]))
    assert_logits_close(torch.from_numpy(out["logits"]), expected, torch.float32)
    assert out["top_k"].shape == (5, 3)
    assert (out["top_k"] == expected.topk(3, dim=1).indices.numpy()).all()
    assert np.allclose(out["top_k_scores"].sum(1) <= 1 + 1e-6, True)
    assert list(predictor.batch_sizes) == [5]


def test_uint8_images_get_imagenets_preprocessing():
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    x = to_model_input(image, SIZE)
    assert x.shape == (1, 3, SIZE, SIZE)
    crop = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    # the mean over the crop equals the normalized mean over the resized image's center
    assert torch.isfinite(x).all() and abs(x.mean() - ((crop - mean) / std).mean()) < 0.2
    mixed = np.empty(2, dtype=object)
    mixed[0], mixed[1] = image, image[:40, :60]  # differently sized images in one batch
    assert to_model_input(mixed, SIZE).shape == (2, 3, SIZE, SIZE)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (np.zeros((0, 3, SIZE, SIZE), np.float32), "empty"),
        (np.zeros((2, 4, SIZE, SIZE), np.float32), "[N, 3, H, W]"),
        (np.zeros((5, 5, 3), np.int64), "uint8"),
        (np.zeros((5, 5, 3, 2, 1), np.uint8), "[N, H, W, 3]"),
    ],
)
def test_bad_inputs_are_refused_by_name(bad, words):
    with pytest.raises(BadInput, match=words.replace("[", r"\[").replace("]", r"\]")):
        to_model_input(bad, SIZE)


def test_grayscale_batches_and_extreme_images():
    gray = np.random.default_rng(5).integers(0, 256, (4, 40, 50), dtype=np.uint8)
    x = to_model_input(gray, SIZE)
    assert x.shape == (4, 3, SIZE, SIZE)  # [N, H, W]: N grayscale images, not one image
    assert torch.equal(x[1], to_model_input(gray[1], SIZE)[0])
    with pytest.raises(BadInput, match="aspect ratio"):  # would resize to gigabytes
        to_model_input(np.zeros((1, 3000, 3), np.uint8), SIZE)
    with pytest.raises(BadInput, match="one image each"):
        one_image(gray, SIZE)
    with pytest.raises(BadInput, match="NaN or Inf"):
        one_image(np.full((3, SIZE, SIZE), np.inf, np.float32), SIZE)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'{"array": [[[300]]], "dtype": "uint8"}', "0 to 255"),
        (b'{"array": [[[-1]]], "dtype": "uint8"}', "0 to 255"),
        (b'{"array": [[[1]]], "dtype": "int8"}', '"dtype" must be'),
        (b'{"array": [[[NaN]]]}', "NaN or Inf"),
        (b'{"array": [[[1e400]]]}', "NaN or Inf"),
        (b"[" * 100000 + b"]" * 100000, "JSON must be"),
        (b'{"array": "abc"}', "JSON must be"),
    ],
)
def test_json_requests_are_checked(body, words):
    with pytest.raises(BadInput, match=words.replace('"', '"')):
        decode_json(body)


def test_json_uint8_and_float_arrays_decode():
    assert decode_json(b'{"array": [[1, 2]], "dtype": "uint8"}').dtype == np.uint8
    assert decode_json(b'{"array": [[0.5]]}').tolist() == [[0.5]]


def test_an_unreadable_file_is_an_error_row(tmp_path):
    batch = infer.load_batch({"path": [str(tmp_path / "gone.png")], "id": [7]}, SIZE)
    assert "cannot read" in batch["error"][0] and batch["id"] == [7]


def test_spec_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="precision"):
        ModelSpec(precision="int4")
    with pytest.raises(ValueError, match="unknown torchvision model"):
        ModelSpec(model="no_such_net").build()
    with pytest.raises(TypeError, match="factory"):
        ModelSpec(model=3)
    with pytest.raises(ValueError, match="fp32 only"):
        ModelSpec(optimize=False, precision="int8")
    with pytest.raises(ValueError, match="without a fastcnn backend"):
        ModelSpec(optimize=False, backend="cpu")


def test_cuda_graphs_on_the_cpu_say_they_are_not_used(spec):
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a GPU"):
        replace(spec, cuda_graphs=True).build("cpu")


def test_the_plain_baseline_is_torchs_own_model(spec, images):
    plain = replace(spec, optimize=False).build()
    assert not any(type(m).__module__.startswith("fastcnn") for m in plain.modules())
    got = Predictor(spec=replace(spec, optimize=False)).predict(images[:3])["logits"]
    expected = Predictor(spec=spec).predict(images[:3])["logits"]
    assert_logits_close(torch.from_numpy(got), torch.from_numpy(expected), torch.float32)


def test_threads_outside_ray_are_the_machines_cores():
    assert worker_threads() >= 1
    assert Predictor(model="resnet18", num_classes=10, image_size=SIZE, threads=1).threads == 1


def test_int8_predictor_calibrates_from_the_spec(spec, images, tmp_path):
    np.save(tmp_path / "calibration.npy", images[:16])
    calibration = str(tmp_path / "calibration.npy")
    predictor = Predictor(spec=replace(spec, precision="int8", calibration=calibration))
    fp32 = Predictor(spec=spec).predict(images[:8])["logits"]
    int8 = predictor.predict(images[:8])["logits"]
    sqnr = 10 * np.log10((fp32**2).sum() / ((fp32 - int8) ** 2).sum())
    assert 15 < sqnr < 80, sqnr  # int8 ran (not fp32 again) and close to fp32


@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU_REASON)
@pytest.mark.parametrize("graphs", [False, True])
def test_gpu_predictor_matches_the_cpu_one(spec, images, graphs):
    gpu = Predictor(spec=replace(spec, cuda_graphs=graphs), device="cuda")
    cpu = Predictor(spec=spec).predict(images[:8])["logits"]
    for _ in range(2):  # a CUDA graph is captured on the first call, replayed on the second
        got = gpu.predict(images[:8])["logits"]
        assert_logits_close(torch.from_numpy(got), torch.from_numpy(cpu), torch.float32)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_fastcnn_infer_predicts_every_file_in_this_process(spec, images, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (the ray extra has it)")
    folder, png = write_input_folder(tmp_path, images)
    out = tmp_path / f"predictions{suffix}"
    assert infer.main([str(folder), "--out", str(out), *infer_model_args(spec)]) == 0
    assert_predictions(out, spec, images, png)


def test_fastcnn_infer_refuses_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="not a folder"):
        infer.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "p.csv")])
    with pytest.raises(SystemExit, match="no images"):
        infer.main([str(tmp_path), "--out", str(tmp_path / "p.csv")])
    with pytest.raises(SystemExit):  # argparse: wrong suffix
        infer.main([str(tmp_path), "--out", str(tmp_path / "p.txt")])
