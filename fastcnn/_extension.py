"""The C++/CUDA extension ``fastcnn._C``: compiled just in time, on first use, with ninja.

It is built with torch.utils.cpp_extension.load against the torch that is installed now, into a
cache directory named after that torch, Python and the CUDA toolkit, so it always matches the
running torch (no ABI drift, no second torch at pip-install time). CUDA sources are compiled
whenever a CUDA toolkit is found, with or without a GPU, so a CPU-only machine still proves they
compile and link. A failed build is reported once, with the compiler's message, and fastcnn keeps
working on its other backends.

Environment:
  FASTCNN_NO_CUDA=1        compile the CPU sources only
  FASTCNN_NO_ONEDNN=1      build without the oneDNN library (CPU convs go through torch's ops)
  FASTCNN_BUILD_DIR=DIR    where to build (default: $XDG_CACHE_HOME or ~/.cache, then fastcnn/...)
  CUDA_HOME                the CUDA toolkit (else /usr/local/cuda, else the nvcc on PATH)
  TORCH_CUDA_ARCH_LIST     the GPU architectures to compile for (default "8.0;9.0")
  MAX_JOBS                 parallel compile jobs (ninja)
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

EXTENSION_NAME = "fastcnn_C"  # also importable as fastcnn._C once loaded
DEFAULT_ARCH_LIST = "8.0;9.0"

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_attempted = False


@dataclasses.dataclass(frozen=True)
class ExtensionStatus:
    built: bool
    with_cuda: bool
    cuda_note: str  # why CUDA sources were (not) compiled
    arch_list: str | None
    cublaslt: bool  # 1x1 convs run as cuBLASLt GEMMs (else through cuDNN)
    cpu_capability: str | None
    onednn: str | None  # the oneDNN library version the CPU convolutions call, or None
    build_dir: str
    error: str | None

    def short_error(self) -> str:
        if self.error is None:
            return "not built yet"
        lines = self.error.strip().splitlines()
        compiler = [ln for ln in lines if "error:" in ln.lower()]  # the compiler's first complaint
        return (compiler[0] if compiler else lines[0])[:300]


def sources_root() -> Path:
    """csrc/ beside the package (source tree, editable install) or fastcnn/csrc (wheel)."""
    beside = Path(__file__).resolve().parent.parent / "csrc"
    if (beside / "bindings.cpp").is_file():
        return beside
    return Path(str(importlib.resources.files("fastcnn") / "csrc"))


def find_cuda_home() -> str | None:
    """CUDA_HOME, else /usr/local/cuda, else the toolkit of the nvcc on PATH; None if none."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    return None


def _cuda_plan() -> tuple[str | None, str]:
    """(CUDA home to compile with, or None; the reason)."""
    if os.environ.get("FASTCNN_NO_CUDA", "0") not in ("", "0"):
        return None, "FASTCNN_NO_CUDA is set"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    home = find_cuda_home()
    if home is None:
        return None, "no CUDA toolkit found (CUDA_HOME, /usr/local/cuda, nvcc on PATH)"
    return home, f"CUDA toolkit at {home}"


def build_dir() -> Path:
    root = os.environ.get("FASTCNN_BUILD_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(cache) / "fastcnn")
    home, _ = _cuda_plan()
    flavour = f"cu{torch.version.cuda}" if home else "cpu"
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{flavour}"
    onednn = find_onednn()
    if onednn is not None:  # linked by absolute path: one build per library location
        where = hashlib.sha1(str(onednn[1]).encode()).hexdigest()[:8]
        tag += f"-onednn{onednn[2]}-{where}"
    return Path(root) / tag.replace("+", "_")


def _openmp_flags() -> list[str]:
    """at::parallel_for runs serially unless the extension itself is compiled with OpenMP
    (ATen's OpenMP backend is inline code guarded by _OPENMP); torch links libgomp already."""
    import torch.utils.cpp_extension as cpp_extension

    return [] if cpp_extension.IS_MACOS else ["-fopenmp"]


# What ATen's own AVX512 kernels are built for (its vec512 Vectorized<T> needs all four).
_AVX512 = (" avx512f", " avx512bw", " avx512vl", " avx512dq")


def _cpu_capability_flags() -> tuple[list[str], str]:
    """Vectorize the CPU kernels for the widest of AVX-512 and AVX2 that the build machine has
    (the JIT build runs where the code will run, and the flags are part of the build's
    fingerprint: a cache shared with a machine of another kind rebuilds, never loads code its
    CPU cannot run); otherwise ATen's portable Vectorized<T> is used. AVX-512 halves the
    instructions of the memory-bound kernels (max-pool, add+ReLU, int8 conversions) where they
    run from cache."""
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        if all(f in flags for f in _AVX512) and " fma" in flags:
            return [
                "-mavx512f",
                "-mavx512bw",
                "-mavx512vl",
                "-mavx512dq",
                "-mfma",
                "-mf16c",
                "-DCPU_CAPABILITY=AVX512",
                "-DCPU_CAPABILITY_AVX512",
            ], "AVX512"
        if " avx2" in flags and " fma" in flags:
            return [
                "-mavx2",
                "-mfma",
                "-mf16c",
                "-DCPU_CAPABILITY=AVX2",
                "-DCPU_CAPABILITY_AVX2",
            ], "AVX2"
    return [], "DEFAULT"


def _installed_file(distribution: str, suffix: str) -> Path | None:
    """Where the installed distribution put its file ending in `suffix`, or None."""
    from importlib import metadata

    try:
        files = metadata.files(distribution) or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if str(file).endswith(suffix):
            return Path(file.locate()).resolve()
    return None


def _onednn_dirs() -> tuple[Path, Path]:
    """(include dir, lib dir) of the onednn-devel-cpu-gomp / onednn-cpu-gomp wheels: where their
    records say they are (a --user or --target install lies outside sys.prefix), else under
    sys.prefix."""
    header = _installed_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl_version.h")
    library = _installed_file("onednn-cpu-gomp", "libdnnl.so")
    root = Path(sys.prefix)
    include = header.parents[2] if header is not None else root / "include"
    lib = library.parent if library is not None else root / "lib"
    return include, lib


def find_onednn() -> tuple[Path, Path, str] | None:
    """(include dir, lib dir, version) of the oneDNN 3.x library that the onednn-cpu-gomp and
    onednn-devel-cpu-gomp wheels install into this environment (built with GNU OpenMP, the
    runtime torch uses, so both share one thread pool), or None. Other copies are not used:
    Debian's is 2.x, and torch's own exports no symbols."""
    if os.environ.get("FASTCNN_NO_ONEDNN", "0") not in ("", "0"):
        return None
    include, lib = _onednn_dirs()
    header = include / "oneapi" / "dnnl" / "dnnl_version.h"
    if not header.is_file() or not (lib / "libdnnl.so").exists():
        return None
    version = onednn_header_version(header.read_text())
    if version is None or not version.startswith("3."):
        return None
    return include, lib, version


def onednn_header_version(text: str) -> str | None:
    """ "MAJOR.MINOR.PATCH" from dnnl_version.h's defines, or None where it has no major."""
    version = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "#define" and parts[1].startswith("DNNL_VERSION_"):
            version[parts[1].removeprefix("DNNL_VERSION_")] = parts[2]
    if "MAJOR" not in version:
        return None
    return f"{version['MAJOR']}.{version.get('MINOR', '0')}.{version.get('PATCH', '0')}"


def _onednn_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for cpu/onednn_conv.cpp, empty without the library."""
    found = find_onednn()
    if found is None:
        return [], []
    include, lib, version = found
    return (
        [f"-I{include}", f"-DFASTCNN_WITH_ONEDNN={version}"],
        [f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"],
    )


def arch_list() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST


def _gencode_flags(archs: str) -> list[str]:
    """nvcc flags for TORCH_CUDA_ARCH_LIST syntax ("8.0;9.0", "9.0a", "8.6+PTX").

    Passed explicitly (rather than left to cpp_extension) so that the arch list is part of the
    build's fingerprint: changing it rebuilds instead of silently reusing the old binary.
    """
    flags = []
    for item in archs.replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item.removesuffix("+PTX").replace(".", "")
        if not num[:2].isdigit():
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST entry {item!r} is not like 8.0, 9.0a or 8.6+PTX"
            )
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _nvidia_package_dirs() -> list[Path]:
    """The folders of torch's pip CUDA packages (nvidia/cu13, nvidia/cublas, ...), if any."""
    try:
        import nvidia  # namespace package installed with torch's CUDA wheels
    except ImportError:
        return []
    return sorted(p for root in nvidia.__path__ for p in Path(root).iterdir() if p.is_dir())


def find_cublaslt(home: str) -> tuple[Path, Path] | None:
    """(the folder holding cublasLt.h, the libcublasLt shared library) or None.

    The toolkit's own first, else the ones torch's CUDA wheels installed (a toolkit that came
    with nvcc alone has no cuBLAS)."""
    roots = [Path(home), *_nvidia_package_dirs()]
    headers = [
        r / sub / "cublasLt.h" for r in roots for sub in ("include", "targets/x86_64-linux/include")
    ]
    libs = [
        lib
        for r in roots
        for sub in ("lib64", "lib")
        for lib in sorted((r / sub).glob("libcublasLt.so*"))
    ]
    header = next((h for h in headers if h.is_file()), None)
    return (header.parent, libs[0]) if header is not None and libs else None


def _cublaslt_flags(home: str, out: Path) -> tuple[list[str], list[str]]:
    """(nvcc flags, linker flags) that compile csrc/cuda/cublaslt_conv1x1.cu against cuBLASLt;
    ([], []) without it (1x1 convs then take the cuDNN path).

    A wheel's include folder also holds its own cuda_runtime.h and friends, which must not
    shadow the toolkit's: only the two cuBLAS headers are linked into a private folder."""
    found = find_cublaslt(home)
    if found is None:
        return [], []
    include, library = found
    private = out / "cublaslt-include"
    private.mkdir(parents=True, exist_ok=True)
    for name in ("cublasLt.h", "cublas_api.h"):
        link = private / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(include / name)
    ldflags = [f"-L{library.parent}", f"-l:{library.name}", f"-Wl,-rpath,{library.parent}"]
    return [f"-I{private}", "-DFASTCNN_WITH_CUBLASLT"], ldflags


def compiled_sources() -> list[str]:
    """The source files a build compiles here (CUDA ones only when a toolkit is used)."""
    return _sources(with_cuda=_cuda_plan()[0] is not None)


def _sources(with_cuda: bool) -> list[str]:
    root = sources_root()
    files = [root / "bindings.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return [str(f) for f in files]


def _compile(verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    home, _ = _cuda_plan()
    cpu_flags, _ = _cpu_capability_flags()
    defines = ["-DFASTCNN_WITH_CUDA"] if home else []
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    lt_cflags, lt_ldflags = _cublaslt_flags(home, out) if home else ([], [])
    dnnl_cflags, dnnl_ldflags = _onednn_flags()
    saved_cuda_home = os.environ.get("CUDA_HOME")
    saved_home = cpp_extension.CUDA_HOME
    try:
        if home:
            os.environ["CUDA_HOME"] = home
            cpp_extension.CUDA_HOME = home  # read when cpp_extension was imported
        return cpp_extension.load(
            name=EXTENSION_NAME,
            sources=_sources(with_cuda=home is not None),
            extra_cflags=["-O3", *_openmp_flags(), *cpu_flags, *defines, *dnnl_cflags],
            extra_ldflags=[*_openmp_flags(), *lt_ldflags, *dnnl_ldflags],
            extra_cuda_cflags=[
                "-O3",
                "-lineinfo",
                *_gencode_flags(arch_list()),
                *defines,
                *lt_cflags,
            ],
            build_directory=str(out),
            with_cuda=home is not None,
            verbose=verbose,
        )
    finally:
        cpp_extension.CUDA_HOME = saved_home
        if saved_cuda_home is None:
            os.environ.pop("CUDA_HOME", None)
        else:
            os.environ["CUDA_HOME"] = saved_cuda_home


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled extension (building it on first call), or None if it cannot be built.

    The first failure is reported once as a warning carrying the compiler's message; later calls
    return None at once (see status().error).
    """
    global _module, _error, _attempted
    with _lock:
        if not _attempted:
            _attempted = True
            try:
                _module = _compile(verbose)
                sys.modules["fastcnn._C"] = _module
            except Exception as exc:  # a failed build must not take the other backends down
                _error = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"fastcnn: the C++/CUDA extension failed to build; the 'cpu' and 'cuda' "
                    f"backends are unavailable, the others still work.\n{_error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _module


def status(build: bool = False) -> ExtensionStatus:
    """The extension's state; with build=True, build it first if that was not tried yet."""
    if build:
        load()
    _, note = _cuda_plan()
    info = _module.build_info() if _module is not None else {}
    with_cuda = bool(info.get("with_cuda", False))
    arch = info.get("cuda_arch_list") if with_cuda else None
    return ExtensionStatus(
        built=_module is not None,
        with_cuda=with_cuda,
        cuda_note=note,
        arch_list=arch,
        cublaslt=bool(info.get("cublaslt", False)),
        cpu_capability=info.get("cpu_capability"),
        onednn=info.get("onednn"),
        build_dir=str(build_dir()),
        error=_error,
    )


def ops() -> object:
    """torch.ops.fastcnn_ext, the extension's raw kernels (CPU and CUDA per dispatch key)."""
    if load() is None:
        raise RuntimeError(f"the fastcnn C++ extension is not available: {status().short_error()}")
    return torch.ops.fastcnn_ext
