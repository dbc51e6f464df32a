"""Differential fuzzing of fastcnn.optimize (tests/fuzz_graphs.py): random small CNN graphs,
each run eagerly and through optimize on every backend this machine has; a mismatch fails with
the smallest graph that still shows it.

In CI: 200 graphs. On demand: FASTCNN_FUZZ_GRAPHS=5000 FASTCNN_FUZZ_SEED=100000 python -m pytest
tests/test_fuzz_optimize.py (the seed offsets the graphs, so new runs see new graphs).
"""

from __future__ import annotations

import collections
import os
import warnings

import pytest
import torch
from fuzz_graphs import InvalidProgram, Op, Program, find_mismatch, random_program, shrink

from fastcnn.common.env import interpreting

GRAPHS = int(os.environ.get("FASTCNN_FUZZ_GRAPHS", "200"))
FIRST_SEED = int(os.environ.get("FASTCNN_FUZZ_SEED", "0"))
CHUNKS = 8  # test cases, so that progress shows and a failure names a range of seeds
BACKENDS = ["eager", "cpu", *(["triton"] if interpreting() else [])]


def _failure(program, shape, channels_last, backends, seed) -> tuple[str, str] | None:
    try:
        return find_mismatch(program, shape, channels_last, backends, seed)
    except InvalidProgram:  # not a graph at all: no failure of optimize's
        return None
    except Exception as exc:  # a crash on a valid graph is a bug too
        return "?", f"{type(exc).__name__}: {exc}"


@pytest.fixture
def one_thread():
    """The graphs are tiny: with two OpenMP threads on a busy machine, each small op waits for
    the other thread (measured 7x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_optimize_agrees_with_eager_on_random_graphs(chunk, one_thread):
    seeds = range(FIRST_SEED + chunk, FIRST_SEED + GRAPHS, CHUNKS)
    reports = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallback notes: the trace tests check those
        for seed in seeds:
            program, shape, channels_last = random_program(seed)
            found = _failure(program, shape, channels_last, BACKENDS, seed)
            if found is None:
                continue
            backend = found[0]
            backends = BACKENDS if backend == "?" else [backend]

            def fails(p, shape=shape, channels_last=channels_last, backends=backends, seed=seed):
                return _failure(p, shape, channels_last, backends, seed) is not None

            small = shrink(program, fails)
            what = _failure(small, shape, channels_last, backends, seed)
            reports.append(
                f"seed {seed}, input {shape} {'channels_last' if channels_last else 'NCHW'}, "
                f"backend {what[0]}: {what[1]}\nsmallest graph:\n{small.describe()}"
            )
    assert not reports, "\n\n".join(reports)


def test_the_generator_covers_every_pattern():
    kinds, conv_params = collections.Counter(), collections.Counter()
    layouts, outputs = set(), set()
    for seed in range(GRAPHS):
        program, _, channels_last = random_program(seed)
        layouts.add(channels_last)
        outputs.add(len(program.outputs) > 1)
        for op in program.ops:
            kinds[op.kind if op.kind != "view" else f"view:{op.params[0]}"] += 1
            if op.kind == "conv":
                _, _, stride, _, groups, bn, relu, _, in_place_add = op.params
                conv_params.update(
                    {
                        "residual": len(op.srcs) == 2,
                        "in-place add": in_place_add,
                        "stride 2": stride == 2,
                        "grouped": groups > 1,
                        "no BN": not bn,
                        f"relu {relu}": True,
                    }
                )
        users = collections.Counter(s for op in program.ops for s in op.srcs)
        outputs.add("several users" if max(users.values(), default=0) > 1 else "one user")
    expected_kinds = {"conv", "pool", "add_relu", "inception", "cat", "scale"}
    expected_kinds |= {f"view:{v}" for v in ("slice", "narrow", "chunk", "transpose")}
    expected_kinds |= {"view:permute", "view:relu_"}
    assert expected_kinds <= set(kinds), kinds
    for want in ("residual", "in-place add", "stride 2", "grouped", "no BN", "relu inplace"):
        assert conv_params[want] > 0, want
    assert layouts == {True, False} and {True, False, "several users"} <= outputs


def test_shrink_finds_a_smallest_failing_graph():
    program, _, _ = next(
        random_program(s) for s in range(1000) if _has(random_program(s)[0], "inception")
    )
    small = shrink(program, lambda p: _has(p, "inception"))
    assert [op.kind for op in small.ops] == ["inception"] and small.outputs == (1,)
    assert small.ops[0].srcs == (0,)


def _has(program: Program, kind: str) -> bool:
    return any(op.kind == kind for op in program.ops)


def test_a_seeded_bug_is_caught_and_shrunk(monkeypatch):
    """A deliberately broken rewrite (every fused conv's bias off by 0.5) must fail the check."""
    from fastcnn.nn import ConvBNAct

    real = ConvBNAct.from_modules

    def broken(conv, bn, relu=None, backend=None):
        fused = real(conv, bn, relu, backend)
        fused.bias.add_(0.5)
        return fused

    monkeypatch.setattr(ConvBNAct, "from_modules", staticmethod(broken))
    conv = Op("conv", (0,), (4, 3, 1, 1, 1, True, "module", False, False))
    pool = Op("pool", (0,), (3, 1, 1, False))
    program = Program(3, (pool, conv, Op("scale", (2,), (2.0,))), (1, 3))
    shape = (2, 3, 7, 7)
    assert _failure(program, shape, True, ["cpu"], 0) is not None
    small = shrink(program, lambda p: _failure(p, shape, True, ["cpu"], 0) is not None)
    assert [op.kind for op in small.ops] == ["conv"]
