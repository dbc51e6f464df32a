"""python -m fastcnn.triton.compile_check: compile the Triton conv kernel for GPU targets without
a GPU, in every config the autotuner may pick there, and check what the compiler made of it.

For each target (sm_80, sm_90), dtype (fp16, bf16, fp32 as TF32) and config that survives the
autotuner's shared-memory pruning for that target (conv_bn_act.configs_that_fit), the kernel is
compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32)) and the JIT's
real specialization (its binder run on real tensors: 16-byte aligned pointers and strides,
unit strides as constants), and checked:
  - it compiles;
  - its shared memory fits the target (and the pruning estimate is not below the compiler's);
  - tensor-core instructions (wgmma on sm_90 for tiles of 64+ rows, mma.sync otherwise) and
    pipelined cp.async loads (except the stem's gathered 2-byte loads: cp.async moves 4+);
  - no register spills or local memory (cuobjdump -res-usage on the cubin).

    python -m fastcnn.triton.compile_check            # a subset: each (target, dtype)'s largest
    python -m fastcnn.triton.compile_check --all      # every config in every loop form
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

CAPABILITIES = (80, 90)
DTYPES = ("float16", "bfloat16", "float32")
# (name, Cin, Cout, k, stride, padding, H, W, pool): the loop forms the kernel has
VARIANTS = {
    "3x3": (64, 64, 3, 1, 1, 56, 56, 0),  # per-tap K loop, residual, ReLU
    "7x7-flat": (3, 64, 7, 2, 3, 224, 224, 0),  # FLAT_K: the stem's 3 channels
    "1x1-pool-split": (192, 96, 1, 1, 0, 28, 28, 3),  # Inception: pool fused, two outputs
}


@dataclasses.dataclass(frozen=True)
class Job:
    capability: int
    dtype: str
    config: int  # index into conv_bn_act._GPU_CONFIGS; HEURISTIC: FASTCNN_TRITON_AUTOTUNE=0's
    variant: str


HEURISTIC = -1


def _compile(job: Job):
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from fastcnn.triton import conv_bn_act as k

    fn = k._conv_bn_act_kernel
    target = GPUTarget("cuda", job.capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    dtype = getattr(torch, job.dtype)
    c_in, c_out, ks, stride, pad, h, w, pool = VARIANTS[job.variant]
    n = 8
    cl = torch.channels_last
    x = torch.empty(n, c_in, h, w, dtype=dtype).contiguous(memory_format=cl)
    weight = torch.empty(c_out, c_in, ks, ks, dtype=dtype).contiguous(memory_format=cl)
    bias = torch.empty(c_out, dtype=dtype)
    ho, wo = (h + 2 * pad - ks) // stride + 1, (w + 2 * pad - ks) // stride + 1
    split = c_out // 2 if pool else c_out
    out = torch.empty(n, split, ho, wo, dtype=dtype).contiguous(memory_format=cl)
    out2 = torch.empty(n, c_out - split, ho, wo, dtype=dtype).contiguous(memory_format=cl)
    residual = None if pool else torch.empty_like(out)
    saved = k.interpreting, k._autotune_enabled
    k.interpreting, k._autotune_enabled = (lambda: False), (lambda: True)
    try:
        # the launcher's own argument layout, so the check compiles what runs
        p = k._new_launch(x, weight, bias, residual, out, (stride, stride), (pad, pad), True,
                          pool, out2 if pool else None)  # fmt: skip
    finally:
        k.interpreting, k._autotune_enabled = saved
    assert isinstance(p, k._Launch)
    if job.config == HEURISTIC:
        cfg = k.heuristic_config(
            p.ints[0], c_out, c_in, x.element_size(), job.capability,
            k.SHARED_MEMORY_LIMIT[job.capability], pool, p.meta["FLAT_K"],
        )  # fmt: skip
        config = triton.Config(
            {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    else:
        config = k._GPU_CONFIGS[job.config]
    meta = {**p.meta, "INPUT_PRECISION": "tf32" if job.dtype == "float32" else "ieee"}
    r = residual if residual is not None else out
    pointers = (x, weight, bias, r, out, out2 if pool else out)
    kwargs = {**meta, **config.kwargs, "num_warps": config.num_warps,
              "num_stages": config.num_stages, "debug": False}  # fmt: skip
    bound, specialization, options = binder(*pointers, *p.ints, **kwargs)
    options = backend.parse_options(options)
    names = [param.name for param in fn.params]
    signature = {name: spec[0] for name, spec in zip(names, specialization, strict=True)}
    values = list(bound.values())
    constexprs = {(i,): values[i] for i, s in enumerate(specialization) if s[0] == "constexpr"}
    attrs = {
        (i,): backend.parse_attr(s[1])
        for i, s in enumerate(specialization)
        if s[0] != "constexpr" and isinstance(s[1], str)
    }
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    estimate = k.shared_memory_bytes(
        config.kwargs, config.num_stages, x.element_size(), job.capability, pool
    )
    return compiled, estimate, k.SHARED_MEMORY_LIMIT[job.capability], config


def _resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL from `cuobjdump -res-usage` (the one Triton ships)."""
    import triton

    cuobjdump = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return {key: int(v) for key, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def check(job: Job) -> tuple[Job, list[str], str]:
    """(job, problems, summary line) for one compiled kernel."""
    try:
        compiled, estimate, limit, config = _compile(job)
    except Exception as exc:  # a compile error is the finding
        return job, [f"does not compile: {type(exc).__name__}: {str(exc)[:300]}"], ""
    problems = []
    shared = compiled.metadata.shared
    if shared > limit:
        problems.append(f"shared memory {shared} B > the sm_{job.capability} limit {limit} B")
    if shared > estimate:
        problems.append(f"shared memory {shared} B > the pruning estimate {estimate} B")
    ptx = compiled.asm["ptx"]
    block_m = config.kwargs["BLOCK_M"]
    # wgmma takes 64-row tiles per warpgroup; a 32-row tile uses sm_80's mma.sync on sm_90 too
    mma = "wgmma" if job.capability >= 90 and block_m >= 64 else "mma.sync"
    if mma not in ptx:
        problems.append(f"no {mma} in the PTX: the dot does not use the tensor cores")
    # cp.async moves 4, 8 or 16 bytes: the stem's gathered 2-byte loads (3 channels) cannot
    gathered = job.variant == "7x7-flat" and job.dtype != "float32"
    if "cp.async" not in ptx and not gathered:
        problems.append("no cp.async in the PTX: the loads are not pipelined")
    res = _resources(compiled.asm["cubin"])
    if res.get("LOCAL", 0) or res.get("STACK", 0):
        problems.append(f"spills: {res}")
    name = "heuristic" if job.config == HEURISTIC else f"config {job.config}"
    summary = (
        f"sm_{job.capability} {job.dtype:8} {job.variant:15} {name:9}: "
        f"{shared:6d} B shared, {res.get('REG', '?')} registers, {mma}, cp.async"
    )
    return job, problems, summary


def jobs(subset: bool, capabilities=CAPABILITIES) -> list[Job]:
    """Every (target, dtype, config the autotuner may pick there or the heuristic one, loop
    form), or the subset: each (target, dtype)'s config with the most shared memory in the 3x3
    form, and the heuristic config of the fused-pool form in fp16."""
    os.environ.pop("TRITON_INTERPRET", None)
    from fastcnn.triton import conv_bn_act as k

    found = []
    for cap in capabilities:
        for dtype in DTYPES:
            size = 2 if dtype != "float32" else 4
            for variant, shape in VARIANTS.items():
                pool = shape[-1]
                flat_k = shape[0] < k._FLAT_K_BELOW and not pool
                fit = k.configs_that_fit(
                    k._GPU_CONFIGS, size, cap, k.SHARED_MEMORY_LIMIT[cap], pool, flat_k
                )
                ids = [k._GPU_CONFIGS.index(c) for c in fit]
                if not ids:  # the autotuner falls back to the heuristic config (checked below)
                    found.append(Job(cap, dtype, HEURISTIC, variant))
                    continue
                largest = max(
                    ids,
                    key=lambda i, pool=pool: k.shared_memory_bytes(
                        k._GPU_CONFIGS[i].kwargs, k._GPU_CONFIGS[i].num_stages, size, cap, pool
                    ),
                )
                if subset:
                    found += [Job(cap, dtype, largest, variant)] if variant == "3x3" else []
                else:
                    found += [Job(cap, dtype, i, variant) for i in ids]
                # what FASTCNN_TRITON_AUTOTUNE=0 launches (gpu_check's tests and models); the
                # subset keeps the one most likely to overflow, the pool's nine input tiles
                if not subset or (variant == "1x1-pool-split" and dtype == "float16"):
                    found.append(Job(cap, dtype, HEURISTIC, variant))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every config and loop form")
    parser.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    todo = jobs(not args.all, tuple(int(a) for a in args.arch.split(",")))
    failed = 0
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for job, problems, summary in pool.map(check, todo):
            if problems:
                failed += 1
                name = "heuristic" if job.config == HEURISTIC else f"config {job.config}"
                print(f"FAIL sm_{job.capability} {job.dtype} {job.variant} {name}:")
                for p in problems:
                    print(f"     {p}")
            else:
                print(f"ok   {summary}")
    print(f"{len(todo) - failed} of {len(todo)} kernels compiled and passed the checks")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
