"""throughput.png: images per second against batch size, one line per provider, per model."""

from __future__ import annotations

from pathlib import Path


def plot_throughput(rows: list[dict], path: Path, env: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(max(7, 5 * len(names)), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for provider in dict.fromkeys(r["provider"] for r in rows):
            points = [
                (r["batch"], r["img_per_s"])
                for r in rows
                if r["model"] == name and r["provider"] == provider and "img_per_s" in r
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=provider)
        ax.set_title(f"{name} ({args.dtype}, {args.device})")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    device = env["GPU"] if args.device == "cuda" else env["cpu"]
    fig.suptitle(f"fastcnn-bench on {device} ({env['date'][:10]})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
