"""fastcnn.quantize: post-training int8 quantization (see fastcnn/quantize/api.py).

One job per file: observers.py (ranges -> qparams), calibrate.py (observing the fp32 graph),
graph.py (which tensors are uint8 and the rewritten graph), verify.py (per-layer errors),
config.py (QuantConfig, its options), api.py (the pipeline behind fastcnn.quantize).
"""

from fastcnn.quantize.api import quantize
from fastcnn.quantize.config import QuantConfig
from fastcnn.quantize.observers import OBSERVERS
from fastcnn.quantize.verify import INT8_LAYER_TOLERANCE, sqnr_db

__all__ = ["INT8_LAYER_TOLERANCE", "OBSERVERS", "QuantConfig", "quantize", "sqnr_db"]
