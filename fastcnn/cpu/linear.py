"""A fully connected layer (fp32, or bf16 where oneDNN runs it natively) on the CPU through
oneDNN's inner product with a prepacked weight
(torch's mkldnn op, what Inductor's CPU freezing path runs): the weight is reordered once into
a blocked layout and kept (the weight cache: repacked when the weight changes), where aten's
addmm reads the plain weight on every call. One pack serves every batch size: the layout
oneDNN picks for a batch of PACK_BATCH runs batches of 1 to 32 as fast as their own (measured
on an AMD EPYC with AVX-512; a batch-1 layout is slower at every other size), so a server
cycling through batch sizes keeps one. What it gains in a whole model: benchmarks/cpu_ab.py
--switch linear (cpu_ab_linear.json)."""

from __future__ import annotations

import torch

from fastcnn.cpu import onednn

_mkldnn = torch.ops.mkldnn


def unsupported_reason(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> str | None:
    """Why the packed path cannot take this call (aten's linear runs then), or None."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.device.type != "cpu" or t.dtype != x.dtype for t in tensors):
        return "not CPU tensors of one dtype"
    if x.dtype not in PACKED_DTYPES:
        return f"not fp32 or bf16 ({x.dtype})"
    if x.dtype == torch.bfloat16 and not onednn.native_bf16():
        return "bf16 without native bf16 in oneDNN here (avx512_bf16 or AMX)"
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return "not a [batch, in_features] input of this layer"
    if bias is not None and bias.shape != weight.shape[:1]:
        return "a bias aten broadcasts (not one value per output feature)"
    if x.shape[0] == 0:
        return "an empty batch"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "autograd must record it"
    if torch.is_autocast_enabled("cpu"):
        return "autocast picks the dtype"
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return "a compiler or tracer is recording it"
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    return None


PACK_BATCH = 32
# oneDNN's inner product with fp32 accumulation; bf16 only where it runs natively (emulated
# bf16 is slower than aten's)
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight in oneDNN's blocked layout, packed once per weight version for every batch size."""
    return onednn.cached_pack(
        weight, ("linear",), lambda: _mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for inputs unsupported_reason accepts: a new [batch, out] tensor."""
    x = x.contiguous()
    bias = bias if bias is None else bias.contiguous()  # oneDNN reads it as a dense vector
    packed = packed_weight(weight)
    return _mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
