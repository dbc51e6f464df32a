"""Two Ray nodes on this machine (ray.cluster_utils.Cluster, loopback, 2 CPUs each): Ray Data
splits the rows across both nodes' Predictor actors, and every row comes back once, equal to
the single-process model's output."""

from __future__ import annotations

import sys

import pytest
from conftest import ROWS, assert_rows_match, within

from fastcnn.ray import Predictor

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")


class NodeRecordingPredictor(Predictor):
    """Adds the Ray node each row ran on."""

    def __call__(self, batch: dict) -> dict:
        out = super().__call__(batch)
        out["node"] = [ray.get_runtime_context().get_node_id()] * len(out["logits"])
        return out


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    ray.shutdown()
    loopback = {"num_cpus": 2, "node_ip_address": "127.0.0.1"}
    cluster = None
    try:
        with within(180, "starting two Ray nodes"):
            cluster = Cluster(initialize_head=True,
                              head_node_args={**loopback, "include_dashboard": False})  # fmt: skip
            cluster.add_node(**loopback)
            ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
            cluster.wait_for_nodes()
    except BaseException:
        ray.shutdown()  # whatever half started
        if cluster is not None:
            cluster.shutdown()
        raise
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers lack tests/
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_rows_split_across_two_nodes_come_back_once(two_nodes, spec, images, reference):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    ds = ray.data.from_items([{"id": i, "image": images[i]} for i in range(ROWS)])
    ds = ds.map_batches(
        NodeRecordingPredictor,
        fn_constructor_kwargs={"spec": spec},
        # one actor a node: each takes 2 CPUs of a 2-CPU node, so they cannot share one
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=2,
        batch_size=4,
        batch_format="numpy",
    )
    rows = ds.take_all()
    assert_rows_match([r["id"] for r in rows], [r["logits"] for r in rows], reference)
    assert len({r["node"] for r in rows}) == 2, "the rows ran on one node only"
