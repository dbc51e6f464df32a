"""fastcnn on Ray (optional extra: pip install -e ".[ray]"): offline batch inference with Ray
Data and online serving with dynamic batching on Ray Serve. The model is built inside each
worker from a picklable ModelSpec, never pickled to it. See docs/serving.md.

    ds.map_batches(Predictor, fn_constructor_kwargs={"model": "resnet50"},
                   compute=ray.data.ActorPoolStrategy(size=2), num_cpus=2, batch_size=16)
    serve.run(serve_app(model="resnet50", max_batch_size=16, batch_wait_timeout_s=0.005))
"""

from fastcnn.ray.predictor import Predictor, worker_threads
from fastcnn.ray.spec import ModelSpec

__all__ = ["ModelSpec", "Predictor", "serve_app", "worker_threads"]


def serve_app(**kwargs):
    """The Ray Serve application (fastcnn.ray.serve.serve_app); imports Ray Serve on use."""
    from fastcnn.ray.serve import serve_app as make

    return make(**kwargs)
