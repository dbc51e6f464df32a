"""fastcnn: fused inference kernels for GoogLeNet- and ResNet-style CNNs.

See README.md for the API in brief and its Structure section for the layers.
"""

from fastcnn import models, nn, ops, reference
from fastcnn._backend import (
    BackendStatus,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from fastcnn._trace import KernelEvent, KernelKey, Trace, trace
from fastcnn.caches import CacheInfo, cache_info, refresh, set_cache_budget
from fastcnn.cuda_graphs import CUDAGraphed, cuda_graphs
from fastcnn.nn.fold_bn import fold_bn
from fastcnn.optimize import optimize
from fastcnn.quantize import QuantConfig, quantize
from fastcnn.report import Report, report

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "CUDAGraphed",
    "CacheInfo",
    "KernelEvent",
    "KernelKey",
    "QuantConfig",
    "Report",
    "Trace",
    "__version__",
    "available_backends",
    "cache_info",
    "cuda_graphs",
    "fold_bn",
    "get_backend",
    "models",
    "nn",
    "ops",
    "optimize",
    "quantize",
    "reference",
    "refresh",
    "report",
    "set_backend",
    "set_cache_budget",
    "trace",
    "use_backend",
]
