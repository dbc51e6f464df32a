"""fastcnn.quantize: post-training int8 quantization (see fastcnn/quantize/api.py).

One job per file: observers.py (ranges -> qparams), calibrate.py (observing the fp32 graph),
graph.py (which tensors are uint8 and the rewritten graph), verify.py (per-layer errors),
api.py (the pipeline behind fastcnn.quantize).
"""

from fastcnn.quantize.api import quantize
from fastcnn.quantize.observers import OBSERVERS
from fastcnn.quantize.verify import VERIFY_TOLERANCE, sqnr_db

__all__ = ["OBSERVERS", "VERIFY_TOLERANCE", "quantize", "sqnr_db"]
