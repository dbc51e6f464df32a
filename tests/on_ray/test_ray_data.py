"""fastcnn.ray.Predictor under Ray Data on a local Ray instance (loopback, 2 CPUs): every row
comes back once and equals the single-process model's output, also when an actor dies mid-run."""

from __future__ import annotations

import os
import sys

import pytest
from conftest import (
    ROWS,
    assert_predictions,
    assert_rows_match,
    infer_model_args,
    start_local_ray,  # fmt: skip
    write_input_folder,
)

from fastcnn.ray import Predictor, infer

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")


class DiesOncePredictor(Predictor):
    """Exits its process on its `on`-th batch, once per marker file (a restarted actor finds it
    and carries on)."""

    def __init__(self, *, marker: str, on: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.marker, self.on, self.calls = marker, on, 0

    def __call__(self, batch: dict) -> dict:
        self.calls += 1
        if self.calls == self.on and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(batch)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
    start_local_ray()
    yield
    ray.shutdown()


def _dataset(images):
    return ray.data.from_items([{"id": i, "image": images[i]} for i in range(ROWS)])


@pytest.mark.parametrize(("actors", "cpus"), [(1, 2), (2, 1)])
def test_map_batches_returns_every_row_once(spec, images, reference, actors, cpus):
    ds = _dataset(images).map_batches(
        Predictor,
        fn_constructor_kwargs={"spec": spec},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        batch_size=8,
        batch_format="numpy",
    )
    rows = ds.take_all()
    assert_rows_match([r["id"] for r in rows], [r["logits"] for r in rows], reference)
    assert {len(r["top_k"]) for r in rows} == {5}


def test_an_actor_killed_mid_run_is_restarted_and_no_row_is_lost(spec, images, reference,
                                                                  tmp_path):  # fmt: skip
    marker = tmp_path / "died"
    ds = _dataset(images).map_batches(
        DiesOncePredictor,
        fn_constructor_kwargs={"spec": spec, "marker": str(marker), "on": 2},
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
        batch_size=8,
        batch_format="numpy",
    )
    rows = ds.take_all()
    assert marker.exists(), "the actor never died: the test tested nothing"
    assert_rows_match([r["id"] for r in rows], [r["logits"] for r in rows], reference)


def test_predictor_threads_follow_the_cpus_ray_gave_it(spec):
    @ray.remote(num_cpus=2)
    def threads():
        import torch

        from fastcnn.ray import worker_threads

        return worker_threads(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    assert ray.get(threads.remote(), timeout=120)[0] == 2

    @ray.remote(num_cpus=2)
    class Holder:
        def __init__(self):
            self.p = Predictor(spec=spec)

        def threads(self):
            import torch

            return self.p.threads, torch.get_num_threads()

    assert ray.get(Holder.remote().threads.remote(), timeout=120) == (2, 2)


def test_a_missing_column_is_named(spec, images):
    ds = ray.data.from_items([{"id": i, "pixels": images[i]} for i in range(4)]).map_batches(
        Predictor, fn_constructor_kwargs={"spec": spec}, compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1, batch_size=4, batch_format="numpy",
    )  # fmt: skip
    with pytest.raises(Exception, match="no column 'image'"):
        ds.take_all()


def test_fastcnn_infer_on_ray_predicts_every_file(spec, images, tmp_path):
    folder, png = write_input_folder(tmp_path, images)
    out = tmp_path / "predictions.parquet"
    args = [str(folder), "--out", str(out), "--ray", "local", "--actors", "2"]
    assert infer.main(args + infer_model_args(spec)) == 0
    assert ray.is_initialized(), "fastcnn-infer shut down the caller's Ray instance"
    assert_predictions(out, spec, images, png)
