"""fastcnn.triton.precompile: a recorded run lists the kernels Triton's JIT would compile, and
compile_all puts them in Triton's cache under the key the JIT looks up. Runs without a GPU (an
sm_90 target, launches stubbed) in a subprocess, since the JIT path needs TRITON_INTERPRET off."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton
    import fastcnn
    from fastcnn import _backend
    from fastcnn.triton import conv_bn_act as kernels, precompile

    os.environ["FASTCNN_TRITON_AUTOTUNE"] = "0"
    kernels._device_limits = lambda device: (90, kernels.SHARED_MEMORY_LIMIT[90])
    _backend._status_cache[("triton", "cpu")] = _backend.BackendStatus(True, "recording")
    target = GPUTarget("cuda", 90, 32)
    cl = torch.channels_last
    with precompile.recording(target) as jobs, fastcnn.use_backend("triton"):
        for cin, k in ((64, 3), (32, 1)):
            x = torch.randn(2, cin, 8, 8).half().contiguous(memory_format=cl)
            w = torch.randn(16, cin, k, k).half().contiguous(memory_format=cl)
            for _ in range(2):  # the same kernel twice: one job
                fastcnn.ops.conv_bn_act(x, w, None, 1, k // 2)
    assert len(jobs) == 2, jobs.keys()
    assert precompile.compile_all(jobs, workers=2) == 2
    cache = os.environ["TRITON_CACHE_DIR"]
    before = sorted(os.listdir(cache))
    for module, name, sig, constexprs, attrs, options, tgt in jobs.values():
        fn = getattr(sys.modules[module], name)
        triton.compile(ASTSource(fn, sig, constexprs, attrs), target=tgt, options=options)
    assert sorted(os.listdir(cache)) == before, "the JIT's own compile missed the cache"
    print("ok", len(before))
    """
)


def test_recorded_kernels_land_in_the_cache_the_jit_reads(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok")
