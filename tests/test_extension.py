"""The JIT-built C++/CUDA extension: built here, with its CUDA sources where a toolkit exists,
failures reported once, TORCH_CUDA_ARCH_LIST parsed."""

from __future__ import annotations

import os

import pytest
import torch

from fastcnn import _extension, collect_env


def test_extension_builds_here():
    status = _extension.status(build=True)
    assert status.built, status.error
    assert status.error is None
    assert status.cpu_capability in ("AVX512", "AVX2", "DEFAULT")


@pytest.mark.skipif(
    _extension.find_cuda_home() is None or os.environ.get("FASTCNN_NO_CUDA", "0") != "0",
    reason="no CUDA toolkit here (or FASTCNN_NO_CUDA set): CUDA sources are not compiled",
)
@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch build")
def test_cuda_sources_compile_and_link_even_without_a_gpu():
    status = _extension.status(build=True)
    assert status.with_cuda, status.cuda_note
    assert status.arch_list, "the extension should report the archs nvcc compiled for"
    assert any(s.endswith(".cu") for s in _extension.compiled_sources())
    # cuBLASLt (1x1 convs with fused epilogues) is compiled in whenever its header and library
    # can be found, the toolkit's or torch's CUDA wheels'
    assert status.cublaslt == (_extension.find_cublaslt(_extension.find_cuda_home()) is not None)
    # torch's cu13 wheels ship cuBLASLt
    assert status.cublaslt or not _extension._nvidia_package_dirs()


def test_no_cuda_env_compiles_cpu_sources_only(monkeypatch):
    monkeypatch.setenv("FASTCNN_NO_CUDA", "1")
    home, reason = _extension._cuda_plan()
    assert home is None and "FASTCNN_NO_CUDA" in reason
    sources = _extension.compiled_sources()
    assert sources and not any(s.endswith(".cu") for s in sources)
    assert _extension.build_dir().name.split("-")[2] == "cpu"  # never mixed with a CUDA build


def test_extension_is_importable_as_fastcnn_C():
    import sys

    _extension.load()
    assert sys.modules["fastcnn._C"].build_info()["torch_version"]


@pytest.mark.parametrize(
    ("archs", "flags"),
    [
        ("8.0;9.0", ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]),
        ("9.0a", ["-gencode=arch=compute_90a,code=sm_90a"]),
        (
            "8.6+PTX",
            ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_86,code=compute_86"],
        ),
        ("7.5 8.0", ["-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_80,code=sm_80"]),
    ],
)
def test_arch_list_parsing(archs, flags):
    assert _extension._gencode_flags(archs) == flags


def test_bad_arch_list_is_named():
    with pytest.raises(ValueError, match="'Hopper' is not like"):
        _extension._gencode_flags("Hopper")


def test_build_dir_is_per_torch_version(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTCNN_BUILD_DIR", str(tmp_path))
    path = _extension.build_dir()
    assert path.parent == tmp_path
    assert torch.__version__.replace("+", "_") in path.name


def test_failed_build_is_reported_once_and_other_backends_keep_working(monkeypatch):
    import fastcnn

    def broken(verbose):
        raise RuntimeError("Error building extension: add_relu.cpp:1: error: expected ';'")

    monkeypatch.setattr(_extension, "_compile", broken)
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_error", None)
    monkeypatch.setattr(_extension, "_attempted", False)
    with pytest.warns(RuntimeWarning, match="(?s)failed to build.*expected ';'"):
        assert _extension.load() is None
    assert _extension.load() is None  # no second attempt, no second warning
    status = _extension.status()
    assert not status.built and "expected ';'" in status.short_error()
    states = fastcnn.available_backends()
    assert not states["cpu"] and "did not build" in states["cpu"].reason
    with fastcnn.use_backend("eager"):
        x = torch.randn(5)
        torch.testing.assert_close(fastcnn.ops.add_relu(x, x), torch.relu(x + x))


def test_collect_env_reports_the_extension_and_backends():
    info = collect_env.collect()
    keys = ("torch", "torch support", "triton", "extension built", "extension CUDA sources",
            "backend eager")  # fmt: skip
    for key in keys:
        assert key in info
    assert info["extension built"] is True
    from fastcnn.cpu import int8

    assert info["int8 ISA (oneDNN, probed)"] == int8.isa()
    assert info["oneDNN ISA cap"] == "none" or "MAX_CPU_ISA=" in info["oneDNN ISA cap"]


def test_every_source_file_ships_in_the_package():
    """setup.py's package_data globs (setuptools matches them per folder) cover every file in
    csrc/: a header left out compiles here, in the checkout, and fails a non-editable install."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tree = ast.parse((root / "setup.py").read_text())
    data = next(
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.keyword) and node.arg == "package_data"
    )
    patterns = ast.literal_eval(data)["fastcnn.csrc"]
    csrc = root / "csrc"
    shipped = {p for pattern in patterns for p in csrc.glob(pattern)}
    # the sources and headers (not an editor's backup or a build's leftovers)
    every = {p for p in csrc.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")}
    assert every - shipped == set(), sorted(str(p.relative_to(csrc)) for p in every - shipped)
