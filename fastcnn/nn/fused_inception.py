"""fastcnn.nn.FusedInception: an Inception block whose branches write straight into the concat."""

from __future__ import annotations

import torch
from torch import nn

from fastcnn import _backend, _trace, ops
from fastcnn.common.dispatch import can_skip_dispatcher
from fastcnn.common.plans import Plans, plan_key
from fastcnn.nn.conv_bn_act import ConvBNAct
from fastcnn.nn.fold_bn import fold_bn
from fastcnn.ops.inception import plan as plan_inception

_BUFFERS = ("reduce_weight", "reduce_bias", "w2", "b2", "w3", "b3", "w4", "b4")


def pool_size(pool: nn.Module) -> int | None:
    """k for a MaxPool2d(k, stride=1, padding=k // 2) with odd k (its output keeps the input's
    size, ceil_mode or not), else None."""
    if not isinstance(pool, nn.MaxPool2d):
        return None
    k, s, p, d = (
        v if isinstance(v, int) else v[0]
        for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)
    )
    same = all(
        isinstance(v, int) or v[0] == v[1]
        for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)
    )
    if same and k % 2 == 1 and s == 1 and p == k // 2 and d == 1:
        return k
    return None


class FusedInception(nn.Module):
    """Eval-mode Inception block (1x1 | 1x1 -> kxk | 1x1 -> kxk | max-pool -> 1x1, each conv
    with BN folded and ReLU, concatenated) through fastcnn.ops.inception: the three 1x1 convs on
    x as one GEMM, the pool fused into branch 4's conv, one output allocated per call.

    Buffers (BN folded in): reduce_weight/reduce_bias (branch 1's 1x1 and the two reduce 1x1s,
    concatenated), w2/b2, w3/b3 (the kxk convs), w4/b4 (the pool branch's 1x1).
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        k2: int = 3,
        k3: int = 3,
        pool: int = 3,
        device=None,
        dtype=None,
        backend: str | None = None,
    ):
        super().__init__()
        self.widths = [ch1x1, ch3x3red, ch5x5red]
        self.pool = pool
        self.backend = backend
        self._plans = Plans()  # per input signature: fastcnn.ops.inception.plan, bounded
        shapes = {
            "reduce_weight": (sum(self.widths), in_channels, 1, 1),
            "reduce_bias": (sum(self.widths),),
            "w2": (ch3x3, ch3x3red, k2, k2),
            "b2": (ch3x3,),
            "w3": (ch5x5, ch5x5red, k3, k3),
            "b3": (ch5x5,),
            "w4": (pool_proj, in_channels, 1, 1),
            "b4": (pool_proj,),
        }
        for name, shape in shapes.items():
            t = torch.zeros(shape, device=device, dtype=dtype)
            if t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            self.register_buffer(name, t)

    @classmethod
    def from_folded(
        cls, folded: list[tuple[torch.Tensor, torch.Tensor]], pool: int, backend: str | None = None
    ) -> FusedInception:
        """From six folded (weight, bias) pairs: branch1, branch2 reduce, branch2 kxk, branch3
        reduce, branch3 kxk, branch4 1x1."""
        (w1, b1), (w2r, b2r), (w2, b2), (w3r, b3r), (w3, b3), (w4, b4) = folded
        block = cls(
            w1.shape[1],
            w1.shape[0],
            w2r.shape[0],
            w2.shape[0],
            w3r.shape[0],
            w3.shape[0],
            w4.shape[0],
            k2=w2.shape[-1],
            k3=w3.shape[-1],
            pool=pool,
            device=w1.device,
            dtype=w1.dtype,
            backend=backend,
        )
        values = [torch.cat([w1, w2r, w3r]), torch.cat([b1, b2r, b3r]), w2, b2, w3, b3, w4, b4]
        with torch.no_grad():
            for name, value in zip(_BUFFERS, values, strict=True):
                getattr(block, name).copy_(value)
        return block

    @classmethod
    def from_module(cls, block: nn.Module, backend: str | None = None) -> FusedInception:
        """From an eval-mode torchvision (or fastcnn) Inception block: branch1 a conv block,
        branch2/branch3 Sequential(conv block 1x1, conv block kxk), branch4
        Sequential(MaxPool2d(k, 1, k // 2), conv block 1x1); a conv block has .conv and .bn and
        applies ReLU (torchvision's BasicConv2d)."""
        try:
            blocks = [
                block.branch1,
                block.branch2[0],
                block.branch2[1],
                block.branch3[0],
                block.branch3[1],
                block.branch4[1],
            ]
            pool = pool_size(block.branch4[0])
            folded = [fold_bn(b.conv, b.bn) for b in blocks]
        except (AttributeError, IndexError, TypeError) as exc:
            raise TypeError(
                f"FusedInception.from_module: {type(block).__name__} is not an Inception block "
                f"with branch1..branch4 of conv blocks (.conv, .bn) ({exc})"
            ) from exc
        if pool is None:
            raise ValueError(
                "FusedInception.from_module: branch4 must start with MaxPool2d(k, stride=1, "
                f"padding=k // 2), got {block.branch4[0]}"
            )
        _check_convs([b.conv for b in blocks])
        return cls.from_folded(folded, pool, backend)

    @classmethod
    def from_fused(
        cls, convs: list[ConvBNAct], pool: int, backend: str | None = None
    ) -> FusedInception:
        """From six ConvBNAct (with ReLU) in from_folded's order, e.g. fastcnn.optimize's."""
        if not all(isinstance(c, ConvBNAct) and c.relu for c in convs):
            raise TypeError("FusedInception.from_fused needs six ConvBNAct modules with ReLU")
        _check_convs(convs)
        return cls.from_folded([(c.weight, c.bias) for c in convs], pool, backend)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        buffers = self._buffers
        args = [buffers[name] for name in _BUFFERS]
        # The planned path, as in ConvBNAct: plain tensors, no out=, no trace recording; the
        # plan (fastcnn.ops.inception.plan) made once per signature and backend choice.
        if out is None and not _trace.active() and can_skip_dispatcher(x):
            key = plan_key(
                (x, *args), self.backend or _backend.get_backend(), tuple(self.widths), self.pool
            )
            run = self._plans.get(key)
            if run is None:
                run = self._plan(x, args) or False
                self._plans.add(key, run)
            if run:
                return run(x, *args)
        if self.backend is not None:
            with _backend.use_backend(self.backend):
                return ops.inception(x, *args[:2], self.widths, *args[2:], self.pool, out=out)
        return ops.inception(x, *args[:2], self.widths, *args[2:], self.pool, out=out)

    def _plan(self, x, args):
        if self.backend is None:
            return plan_inception(x, *args[:2], self.widths, *args[2:], self.pool)
        with _backend.use_backend(self.backend):
            return plan_inception(x, *args[:2], self.widths, *args[2:], self.pool)


def _check_convs(convs) -> None:
    """The layout ops.inception computes: 1x1 convs where it expects them, odd square 'same'
    kxk convs, stride 1, no groups or dilation."""
    for i, c in enumerate(convs):
        k = c.kernel_size if isinstance(c.kernel_size, tuple) else (c.kernel_size,) * 2
        pad = c.padding if isinstance(c.padding, tuple) else (c.padding,) * 2
        stride = c.stride if isinstance(c.stride, tuple) else (c.stride,) * 2
        dil = c.dilation if isinstance(c.dilation, tuple) else (c.dilation,) * 2
        kxk = i in (2, 4)
        ok = (
            stride == (1, 1)
            and dil == (1, 1)
            and c.groups == 1
            and k[0] == k[1]
            and (k[0] % 2 == 1 and pad == (k[0] // 2,) * 2 if kxk else k == (1, 1))
        )
        if not ok:
            raise ValueError(
                f"FusedInception: conv {i} ({k[0]}x{k[1]}, stride {stride}, padding {pad}, "
                f"groups {c.groups}) does not fit the Inception layout"
            )
