"""python -m fastcnn.build: compile the C++/CUDA extension now instead of on first use.

Prints what it built (sources, CUDA or not, archs, where) and exits non-zero if the build failed,
with the compiler's message, or, with --require-cuda, if the CUDA sources were not compiled.
Honours FASTCNN_NO_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fastcnn import _extension


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    parser.add_argument(
        "--require-cuda",
        action="store_true",
        help="fail unless the CUDA sources were compiled too (CI, the GPU check)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    module = _extension.load(verbose=args.verbose)
    state = _extension.status()
    seconds = time.perf_counter() - start
    if module is None:
        print(
            f"fastcnn extension: build FAILED after {seconds:.1f} s\n{state.error}", file=sys.stderr
        )
        return 1
    root = _extension.sources_root()
    sources = [str(Path(s).relative_to(root)) for s in _extension.compiled_sources()]
    print(f"fastcnn extension built in {seconds:.1f} s (includes loading a cached build)")
    print(f"  module      : {module.__file__}")
    print(f"  sources     : {', '.join(sources)}")
    cuda = (
        f"yes, archs {state.arch_list}, 1x1 convs through "
        f"{'cuBLASLt' if state.cublaslt else 'cuDNN (no cuBLASLt found)'}"
        if state.with_cuda
        else f"no ({state.cuda_note})"
    )
    print(f"  CUDA        : {cuda}")
    print(f"  CPU vector  : {state.cpu_capability}")
    print(f"  oneDNN      : {state.onednn or 'not linked (CPU convs through torch mkldnn ops)'}")
    print(f"  build dir   : {state.build_dir}")
    if args.require_cuda and not state.with_cuda:
        print(f"fastcnn extension: CUDA sources required, not compiled: {state.cuda_note}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
