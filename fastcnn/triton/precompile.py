"""Compile the Triton kernels a workload needs on every core at once, before running it.

Triton compiles each new kernel specialization on first launch, one after another, in the
launching process: a ResNet-50 + GoogLeNet run at two batch sizes needs about 50 of them, 1-3 s
each. Here a workload runs once with its Triton launches recorded instead of executed (every
other op runs for real, on garbage activations: only shapes matter), the recorded kernels are
compiled in a pool of processes into Triton's on-disk cache, and the real run then finds each
one there. Used by `fastcnn-bench --precompile` (benchmarks/gpu_check.sh).

    with precompile.recording() as jobs:
        model(x)                       # nothing is launched; outputs are uninitialized
    precompile.compile_all(jobs)       # the cache now holds every kernel model(x) launches

Each job is exactly what Triton's JIT would compile (its own binder and _pack_args, the
current target), so its cache key is the one the JIT computes: a job that misses costs a
compile later, never a wrong kernel.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
from collections.abc import Iterator

import triton
from triton.runtime import autotuner, jit


@contextlib.contextmanager
def recording(target=None) -> Iterator[dict]:
    """Within the block, Triton launches (autotuned ones: every config the tuner would try)
    compile and launch nothing; yields {key: job} of what they would have compiled. target:
    a triton GPUTarget (default: the current GPU's)."""
    from triton.compiler import make_backend

    if target is None:
        target = triton.runtime.driver.active.get_current_target()
    backend = make_backend(target)
    jobs: dict = {}
    binders: dict = {}

    def run(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug)
        if self not in binders:
            binders[self] = jit.create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binders[self](*args, **kwargs)
        key = (self.module, self.__name__, str(specialization), str(options))
        if key not in jobs:
            options, signature, constexprs, attrs = self._pack_args(
                backend, kwargs, bound_args, specialization, options
            )
            jobs[key] = (self.module, self.__name__, signature, constexprs, attrs,
                         options.__dict__, target)  # fmt: skip
        return None

    def tune(self, *args, **kwargs):  # every config this tuner would time, none timed
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None
        return None

    saved = jit.JITFunction.run, autotuner.Autotuner.run
    jit.JITFunction.run, autotuner.Autotuner.run = run, tune
    try:
        yield jobs
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run = saved


def _compile(job) -> str:
    import importlib

    from triton.compiler import ASTSource

    module, name, signature, constexprs, attrs, options, target = job
    fn = getattr(importlib.import_module(module), name)
    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
    return name


def compile_all(jobs: dict, workers: int | None = None) -> int:
    """Compile every recorded job into Triton's cache, `workers` at a time (default: every
    core); returns how many. Workers are fresh processes (spawn): nothing of this process's
    CUDA state is forked."""
    todo = list(jobs.values())
    if not todo:
        return 0
    workers = min(len(todo), workers or os.cpu_count() or 1)
    env = {"TRITON_INTERPRET": os.environ.pop("TRITON_INTERPRET", None)}
    try:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            list(pool.map(_compile, todo))
    finally:
        if env["TRITON_INTERPRET"] is not None:
            os.environ["TRITON_INTERPRET"] = env["TRITON_INTERPRET"]
    return len(todo)
