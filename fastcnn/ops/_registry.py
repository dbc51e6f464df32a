"""The one way an op becomes a torch.library op pair, and how its public function calls it.

Each op gives: its argument schema, a validate(*args, out) that raises clear errors (metadata only,
so it also runs on fake tensors), an allocate(*args) that makes the result buffer (the same for
real and fake tensors, so traced strides match eager ones) and a run(*args, out) that picks a
backend and launches, writing into out, or, when out is None, returning a result it allocated
itself (a backend such as oneDNN makes its own output: no copy then). From those this registers

    fastcnn::NAME(args) -> Tensor           (functional)
    fastcnn::NAME_out(args, Tensor(a!) out)  (writes into out, e.g. a channel slice)

each with its fake implementation, so torch.compile(fullgraph=True) and torch.export keep the op
as one opaque node.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastcnn.common.dispatch import can_skip_dispatcher


class FusedOp:
    def __init__(
        self,
        name: str,
        schema: str,
        validate: Callable[..., None],
        allocate: Callable[..., torch.Tensor],
        run: Callable[..., torch.Tensor],
    ):
        self.name = name
        self._validate, self._allocate, self._run = validate, allocate, run

        def functional(*args):
            # Traced graphs assume the fake's strides: write into a buffer allocated alike.
            validate(*args, None)
            out = allocate(*args)
            run(*args, out)
            return out

        def functional_fake(*args):
            validate(*args, None)
            return allocate(*args)

        def into_out(*args):
            validate(*args[:-1], args[-1])
            run(*args[:-1], args[-1])

        def into_out_fake(*args):
            validate(*args[:-1], args[-1])

        inner = schema.strip()[1:-1]
        self.functional = torch.library.custom_op(
            f"fastcnn::{name}", functional, mutates_args=(), schema=f"({inner}) -> Tensor"
        )
        self.functional.register_fake(functional_fake)
        self.into_out = torch.library.custom_op(
            f"fastcnn::{name}_out",
            into_out,
            mutates_args=("out",),
            schema=f"({inner}, Tensor(a!) out) -> ()",
        )
        self.into_out.register_fake(into_out_fake)

    def __call__(self, *args, out: torch.Tensor | None = None) -> torch.Tensor:
        """Run the op on already type-checked args; returns out, or a new result when None."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if can_skip_dispatcher(*tensors, out):  # same checks and kernels, less overhead
            self._validate(*args, out)
            return self._run(*args, out)
        if out is None:
            return self.functional(*args)
        self.into_out(*args, out)
        return out
