"""Which path the extension's CUDA convolutions took, as trace kernels and fallback reasons.

csrc/cuda/conv_bn_act.cu records one fastcnn::ConvPath number per convolution in a small
thread-local ring; `take()` reads and clears it. The ops call it only while a fastcnn.trace()
records, so untraced calls cost nothing here.
"""

from __future__ import annotations

from fastcnn import _extension

CUBLASLT, CUDNN = "cublaslt", "cudnn+epilogue"
# fastcnn::ConvPath (csrc/cuda/conv_cuda.h) -> (kernel, why a 1x1 stride-1 conv missed cuBLASLt)
PATHS: dict[int, tuple[str, str | None]] = {
    0: (CUBLASLT, None),
    1: (CUDNN, None),  # not a 1x1 stride-1 unpadded conv: cuDNN is this backend's own path
    2: (CUDNN, "the extension was built without cuBLASLt"),
    3: (CUDNN, "x is not channels_last (cuBLASLt reads NHWC rows)"),
    4: (CUDNN, "residual is not channels_last (cuBLASLt reads it as NHWC rows)"),
    5: (CUDNN, "out is not channels_last (cuBLASLt writes NHWC rows)"),
    6: (CUDNN, "cuBLASLt has no algorithm for these shapes, strides and alignments"),
    7: (CUDNN, "cuBLASLt is not used for this dtype"),
}


def take() -> list[tuple[str, str | None]]:
    """(kernel, fallback reason) of each CUDA convolution this thread ran since the last take."""
    return [PATHS.get(p, (f"path {p}", None)) for p in _extension.load().take_conv_paths()]


def summary(paths: list[tuple[str, str | None]]) -> tuple[str, str | None]:
    """One (kernel, fallback) for an op made of several convolutions, e.g. an Inception block:
    "4 cublaslt + 2 cudnn+epilogue", and the distinct fallback reasons joined."""
    counts: dict[str, int] = {}
    for kernel, _ in paths:
        counts[kernel] = counts.get(kernel, 0) + 1
    kernel = " + ".join(f"{n} {k}" for k, n in counts.items()) or "extension"
    reasons = list(dict.fromkeys(why for _, why in paths if why is not None))
    return kernel, "; ".join(reasons) or None
