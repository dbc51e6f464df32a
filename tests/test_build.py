"""python -m fastcnn.build: reports the build, and with --require-cuda fails where the CUDA
sources were not compiled (CI's GPU-versions leg and the GPU check must not pass on a CPU-only
build that would measure Triton alone)."""

from __future__ import annotations

import dataclasses

import pytest

from fastcnn import _extension, build


@pytest.fixture
def built():
    if _extension.load() is None:
        pytest.skip("the extension does not build here")
    return _extension.status()


def test_require_cuda_fails_a_build_without_its_cuda_sources(built, monkeypatch, capsys):
    cpu_only = dataclasses.replace(built, with_cuda=False, cuda_note="FASTCNN_NO_CUDA is set")
    monkeypatch.setattr(_extension, "status", lambda build=False: cpu_only)
    assert build.main([]) == 0
    assert "CUDA        : no (FASTCNN_NO_CUDA is set)" in capsys.readouterr().out
    assert build.main(["--require-cuda"]) == 1
    assert "CUDA sources required, not compiled: FASTCNN_NO_CUDA is set" in capsys.readouterr().err


def test_require_cuda_passes_where_they_were_compiled(built):
    if not built.with_cuda:
        pytest.skip(f"the CUDA sources were not compiled here: {built.cuda_note}")
    assert build.main(["--require-cuda"]) == 0
