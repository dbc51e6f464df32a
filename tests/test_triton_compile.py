"""The Triton conv kernel compiles for the GPUs users have, without one here: sm_80 and sm_90,
fp16/bf16/fp32 (TF32), every config the autotuner may pick on each (fastcnn.triton.
compile_check: shared memory within the target's limit, tensor-core instructions, pipelined
loads, no register spills). The default run compiles each (target, dtype)'s largest config;
FASTCNN_COMPILE_ALL=1 (CI) compiles every config in every loop form."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastcnn.triton import conv_bn_act as kernels


def test_every_config_the_autotuner_may_pick_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton.backends.nvidia")
    every = os.environ.get("FASTCNN_COMPILE_ALL", "0") not in ("", "0")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "fastcnn.triton.compile_check", *(["--all"] if every else [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout
    assert "sm_80" in done.stdout and "sm_90" in done.stdout


@pytest.mark.parametrize(("capability", "element_size"), [(80, 4), (90, 4), (80, 2), (90, 2)])
def test_configs_over_the_shared_memory_limit_are_pruned(capability, element_size):
    limit = kernels.SHARED_MEMORY_LIMIT[capability]
    for pool in (0, 3):
        fit = kernels.configs_that_fit(kernels._GPU_CONFIGS, element_size, capability, limit, pool)
        for c in fit:
            size = kernels.shared_memory_bytes(
                c.kwargs, c.num_stages, element_size, capability, pool
            )
            assert size <= limit
    # a fused 3x3 pool pipelines nine input tiles: pruning must bite there
    big = kernels.configs_that_fit(kernels._GPU_CONFIGS, 2, 90, kernels.SHARED_MEMORY_LIMIT[90], 3)
    assert 0 < len(big) < len(kernels._GPU_CONFIGS)


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("pool", [0, 3])
def test_the_heuristic_config_fits_every_shape(capability, pool):
    """FASTCNN_TRITON_AUTOTUNE=0's config (and the tuner's fallback) shrinks until it fits."""
    limit = kernels.SHARED_MEMORY_LIMIT[capability]
    for element_size in (2, 4):
        for m, c_out, c_in in ((1 << 20, 512, 512), (64, 16, 16), (50000, 192, 832)):
            cfg = kernels.heuristic_config(m, c_out, c_in, element_size, capability, limit, pool)
            size = kernels.shared_memory_bytes(
                cfg, cfg["num_stages"], element_size, capability, pool
            )
            assert size <= limit, (cfg, size)


def test_only_in_place_calls_restore_the_residual_while_tuning():
    assert kernels._gpu_kernel(True).restore_value == ["r_ptr"]
    assert not kernels._gpu_kernel(False).restore_value
