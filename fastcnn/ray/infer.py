"""fastcnn-infer: batch inference over a folder of images (or .npy files), predictions written
as CSV or Parquet, in this process or on a Ray cluster (--ray ADDRESS).

    fastcnn-infer photos/ --out predictions.csv --model resnet50 --weights resnet50.pth
    fastcnn-infer photos/ --out predictions.parquet --ray auto --actors 4 --cpus-per-actor 2

One row per file, in path order: path, top_1, top_k (class indices, best first, space
separated), top_k_scores (softmax) and error (why a file could not be read; its prediction
columns are then empty). Ray is needed only for --ray.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

from fastcnn.ray.predictor import Predictor
from fastcnn.ray.preprocess import BadInput, decode_image, decode_npy, one_image
from fastcnn.ray.spec import PRECISIONS, ModelSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
FIELDS = ("path", "top_1", "top_k", "top_k_scores", "error")


def input_files(folder: Path) -> list[Path]:
    """The images and .npy files under folder (recursively), in path order."""
    if not folder.is_dir():
        raise SystemExit(f"fastcnn-infer: {folder} is not a folder")
    suffixes = IMAGE_SUFFIXES | {".npy"}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise SystemExit(f"fastcnn-infer: no images or .npy files under {folder}")
    return files


def load(path: str, size: int) -> np.ndarray:
    """One file as float [3, size, size], preprocessed (BadInput names what is wrong). A .npy
    holds one image: uint8 [H, W, 3] or float [3, size, size]."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadInput(f"cannot read the file ({exc})") from exc
    array = decode_npy(data) if path.lower().endswith(".npy") else decode_image(data)
    return one_image(array, size)[0]


def load_batch(batch: dict, size: int) -> dict:
    """{"path": [...], other columns} -> also "image" float [N, 3, size, size] and "error" (a
    file that cannot be read gets its reason there and a zero image, whose prediction is
    dropped)."""
    paths = [str(p) for p in batch["path"]]
    images = np.zeros((len(paths), 3, size, size), dtype=np.float32)
    errors = []
    for i, path in enumerate(paths):
        try:
            images[i] = load(path, size)
            errors.append("")
        except BadInput as exc:
            errors.append(str(exc))
    others = {name: values for name, values in batch.items() if name != "path"}
    return {**others, "path": np.array(paths), "image": images, "error": np.array(errors)}


def rows(batch: dict) -> list[dict]:
    """Output rows of one predicted batch."""
    out = []
    for i, path in enumerate(batch["path"]):
        error = str(batch["error"][i])
        top, scores = batch["top_k"][i], batch["top_k_scores"][i]
        out.append({
            "path": str(path),
            "top_1": "" if error else int(top[0]),
            "top_k": "" if error else " ".join(str(int(c)) for c in top),
            "top_k_scores": "" if error else " ".join(f"{s:.6g}" for s in scores),
            "error": error,
        })  # fmt: skip
    return out


def run_local(files: list[Path], spec: ModelSpec, batch_size: int, top_k: int) -> list[dict]:
    """Predict in this process, with a progress bar."""
    from tqdm import tqdm

    predictor = Predictor(spec=spec, top_k=top_k)
    found = []
    with tqdm(total=len(files), unit="image", file=sys.stderr) as bar:
        for start in range(0, len(files), batch_size):
            batch = load_batch({"path": files[start : start + batch_size]}, spec.image_size)
            batch.update(predictor.predict(batch["image"]))
            found += rows(batch)
            bar.update(len(batch["path"]))
    return found


def run_on_ray(files, spec, batch_size, top_k, address, actors, cpus_per_actor) -> list[dict]:
    """Predict on a Ray cluster: files read and preprocessed by Ray Data tasks, predicted by a
    pool of Predictor actors (each builds its model where it runs); Ray Data shows progress.
    address "local" starts a Ray instance on this machine's loopback; where this process has
    already started or joined one, that one runs it."""
    if address == "local" and "ray" not in sys.modules:
        # Ray reads this when imported: with it off, a local instance resolves localhost to
        # loopback instead of binding to and dialing the machine's interface address
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    started = not ray.is_initialized()  # a caller's Ray instance is used and left running
    if started and address == "local":
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    elif started:
        ray.init(address=address)
    try:
        # "index": the order of `files`, restored at the end (Ray Data may reorder blocks)
        ds = ray.data.from_items([{"index": i, "path": str(p)} for i, p in enumerate(files)])
        ds = ds.map_batches(load_batch, fn_kwargs={"size": spec.image_size},
                            batch_size=batch_size, batch_format="numpy")  # fmt: skip
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"spec": spec, "top_k": top_k},
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            batch_size=batch_size,
            batch_format="numpy",
        )
        found = []
        columns = ["index", "path", "top_k", "top_k_scores", "error"]
        for batch in ds.select_columns(columns).iter_batches(batch_format="numpy"):
            found += zip(batch["index"].tolist(), rows(batch), strict=True)
        return [row for _, row in sorted(found, key=lambda pair: pair[0])]
    finally:
        if started:
            ray.shutdown()


def write(found: list[dict], out: Path) -> None:
    """CSV, or Parquet for a .parquet path (pyarrow, installed with the ray extra)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise SystemExit("fastcnn-infer: Parquet needs pyarrow (pip install pyarrow)") from exc
        table = pa.table({name: [str(row[name]) for row in found] for name in FIELDS})
        pq.write_table(table, out)
        return
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(found)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastcnn-infer", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="images (jpg, png, ...) or .npy files, recursively")
    p.add_argument("--out", type=Path, required=True, help="predictions: .csv or .parquet")
    p.add_argument("--model", default="resnet50", help="a torchvision model name")
    p.add_argument("--weights", help="a state_dict file for the model (default: random)")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--calibration", help="int8: a .npy of calibration images")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--backend", help="pin a fastcnn backend (default: the fastest available)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--ray", metavar="ADDRESS", help='a Ray cluster ("auto", "ray://host:port", '
                   'or "local" for one on this machine); default: this process')  # fmt: skip
    p.add_argument("--actors", type=int, default=1, help="--ray: Predictor actors")
    p.add_argument("--cpus-per-actor", type=float, default=1, help="--ray: each one's threads")
    args = p.parse_args(argv)
    for name in ("batch_size", "top_k", "actors", "image_size", "cpus_per_actor"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.out.suffix not in (".csv", ".parquet"):
        p.error(f"--out must end in .csv or .parquet, got {args.out}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    files = input_files(args.folder)
    spec = ModelSpec(model=args.model, weights=args.weights, num_classes=args.num_classes,
                     precision=args.precision, calibration=args.calibration,
                     image_size=args.image_size, backend=args.backend)  # fmt: skip
    if args.ray:
        found = run_on_ray(files, spec, args.batch_size, args.top_k, args.ray, args.actors,
                           args.cpus_per_actor)  # fmt: skip
    else:
        found = run_local(files, spec, args.batch_size, args.top_k)
    write(found, args.out)
    failed = sum(bool(row["error"]) for row in found)
    print(f"fastcnn-infer: {len(found)} predictions in {args.out}"
          + (f", {failed} files unreadable (see the error column)" if failed else ""),
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
