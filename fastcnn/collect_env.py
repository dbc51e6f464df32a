"""python -m fastcnn.collect_env: versions, the device, the extension's build state, the backends.

Paste its output into bug reports. It builds the extension if that was not done yet.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys

import torch

# The torch releases CI runs the whole suite on (.ci/run's two legs): the oldest is the GPU
# machine's (.ci/gpu-machine-versions.txt) and pyproject.toml's floor, the newest is what the CI
# machines install (tests/test_versions.py and .ci/run keep the three in step).
TESTED_TORCH = ("2.11", "2.14")


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def torch_support(version: str = torch.__version__) -> str:
    """Where `version` stands against the torch releases CI tests."""
    oldest, newest = TESTED_TORCH
    tested = f"CI tests {oldest} and {newest}"
    here = _minor(version)
    if here in (_minor(oldest), _minor(newest)):
        return f"tested ({tested})"
    if here < _minor(oldest):
        return f"older than the oldest tested, unsupported ({tested})"
    if here > _minor(newest):
        return f"newer than the newest tested, untested ({tested})"
    return f"between the tested releases, not run by CI ({tested})"


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _nvcc_version(cuda_home: str | None) -> str:
    if cuda_home is None:
        return "not found"
    out = _run([f"{cuda_home}/bin/nvcc", "--version"])
    release = [ln for ln in (out or "").splitlines() if "release" in ln]
    return f"{release[0].strip() if release else 'unknown'} ({cuda_home})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect() -> dict[str, object]:
    """Everything collect_env prints, as a dict (also used by the benchmarks' result files)."""
    from fastcnn import __version__, _backend, _extension
    from fastcnn.cpu import int8 as cpu_int8

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    driver = None
    if shutil.which("nvidia-smi"):
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    ext = _extension.status(build=True)
    info: dict[str, object] = {
        "fastcnn": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "torch support": torch_support(),
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "CUDA toolkit (nvcc)": _nvcc_version(_extension.find_cuda_home()),
        "CUDA driver": driver.splitlines()[0] if driver else "none",
        "GPU": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "extension built": ext.built,
        "extension CUDA sources": (
            f"compiled (archs {ext.arch_list}, cuBLASLt {'yes' if ext.cublaslt else 'no'})"
            if ext.with_cuda
            else f"no ({ext.cuda_note})"
        ),
        "extension CPU vectorization": ext.cpu_capability or "n/a",
        "extension oneDNN (CPU convs)": ext.onednn or "not linked: torch's mkldnn ops instead",
        "extension build dir": ext.build_dir,
    }
    if ext.error:
        info["extension error"] = ext.short_error()
    # A cap makes oneDNN run less than the CPU has (a benchmark run under one says so here)
    cap = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
           if os.environ.get(k)]  # fmt: skip
    info["oneDNN ISA cap"] = ", ".join(cap) or "none"
    info["int8 ISA (oneDNN, probed)"] = cpu_int8.isa()
    info["backend in force"] = _backend.get_backend()
    for name, state in _backend.available_backends().items():
        info[f"backend {name}"] = f"{'yes' if state else 'no'}: {state.reason}"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--expect-tested",
        choices=["oldest", "newest"],
        help="only check that the installed torch is the oldest (newest) release CI tests; "
        "exit 1 with the reason if not (CI's legs)",
    )
    args = parser.parse_args(argv)
    if args.expect_tested:
        want = TESTED_TORCH[0] if args.expect_tested == "oldest" else TESTED_TORCH[-1]
        if _minor(torch.__version__) != _minor(want):
            print(f"torch {torch.__version__}: the {args.expect_tested} tested is {want} "
                  "(fastcnn.collect_env.TESTED_TORCH)", file=sys.stderr)  # fmt: skip
            return 1
        print(f"torch {torch.__version__}: the {args.expect_tested} release CI tests")
        return 0
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}} : {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
