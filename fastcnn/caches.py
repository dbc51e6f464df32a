"""What fastcnn keeps derived from a model's weights, how much, and how to drop it.

fastcnn keeps, per weight, values made from it (oneDNN's packed copies, Winograd's transformed
weights, an Inception block's split copies, int8 packs, BatchNorm folds) and makes them again
when the weight changes in a way a version counter sees: load_state_dict, in-place ops,
assignment of a new tensor, .to() / .half(). A write that no counter sees (`param.data.copy_(...)`,
`param.data.mul_(...)`, a numpy or DLPack view written in place) is not seen: call
fastcnn.refresh(model) after it. Planned outputs kept between calls are bounded by one byte
budget (fastcnn.set_cache_budget).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from fastcnn.common import alloc
from fastcnn.common.plans import Plans
from fastcnn.common.weight_cache import WeightCache
from fastcnn.cuda_graphs import CUDAGraphed
from fastcnn.nn.folded import FoldedConvBN
from fastcnn.optimize.program import Programs

set_cache_budget = alloc.set_cache_budget


def refresh(model: nn.Module) -> nn.Module:
    """Make `model` use its weights as they are now, after writes no version counter sees
    (`.data`, numpy, DLPack): every value fastcnn derived from its parameters and buffers is
    dropped (made again on the next call), every module's plans and CPU programs too, and CUDA
    graphs are recaptured. Returns model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastcnn.refresh expects an nn.Module, got {type(model).__name__}")
    tensors = [*model.parameters(), *model.buffers()]
    for cache in list(WeightCache.instances):
        cache.forget(tensors)
    for module in model.modules():
        for value in vars(module).values():
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, (Plans, FoldedConvBN, Programs)):
                    item.clear()
        if isinstance(module, CUDAGraphed):
            module.reset()
    return model


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    packs: int  # bytes of values derived from weights (of the model's, when one is given)
    outputs: int  # bytes planned outputs keep between calls, all models together
    budget: int  # the bound on `outputs` (fastcnn.set_cache_budget)


def cache_info(model: nn.Module | None = None) -> CacheInfo:
    """How many bytes fastcnn keeps beside the weights themselves."""
    tensors = None if model is None else [*model.parameters(), *model.buffers()]
    packs = sum(cache.nbytes(tensors) for cache in list(WeightCache.instances))
    return CacheInfo(packs, alloc.kept_outputs.total, alloc.kept_outputs.budget)
