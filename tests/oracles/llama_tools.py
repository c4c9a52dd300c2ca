"""llama.cpp's own command-line tools, built from the ``llama-cpp-python`` sdist's sources and cached.

Builds ``llama-quantize``, ``llama-export-lora`` and ``llama-gguf-split`` from :func:`sdist.llama_cpp_source`
with cmake (the ``cmake`` package from PyPI when no cmake is on PATH): CPU only, Release, static libraries, no
tests, examples, server or network code. The binaries are cached in the oracle cache folder under a name keyed by
the llama-cpp-python version and a hash of the build options, so a changed option never reuses an old build. The
build happens in a temporary folder that is renamed into place when complete: a half-built tree is never used,
and concurrent callers at worst build twice.

    from tests.oracles.llama_tools import tool
    quantize = tool("llama-quantize")          # builds on first use (minutes), then returns the cached path

``python -m tests.oracles.llama_tools`` builds them and prints their paths.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .sdist import LLAMA_CPP_PYTHON_VERSION, cache_dir, llama_cpp_source

#: The tools built, by cmake target name (the binary has the same name).
TOOLS = ("llama-quantize", "llama-export-lora", "llama-gguf-split")

#: cmake options of the build. GGML_NATIVE=ON: the tools use every instruction set this machine has, as a user
#: who builds llama.cpp here gets (the comparison is against llama.cpp at its best on this CPU).
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DGGML_CPU=ON",
    "-DGGML_BACKEND_DL=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_RPC=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_LLGUIDANCE=OFF",
)


def build_key() -> str:
    """The cache folder's name: llama-cpp-python version plus a hash of the build options."""
    digest = hashlib.sha256("\n".join(CMAKE_OPTIONS + TOOLS).encode()).hexdigest()[:12]
    return f"llama-tools-{LLAMA_CPP_PYTHON_VERSION}-{digest}"


def cmake_executable(install: bool = False) -> str:
    """A cmake: the one on PATH, else the ``cmake`` PyPI package's; with ``install``, pip-installs that package
    into the running Python's environment when neither is there."""
    found = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if found:
        return found
    try:
        import cmake  # type: ignore[import-not-found]

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        if not install:
            raise RuntimeError(f"cmake is needed to build llama.cpp's tools: {sys.executable} -m pip install cmake")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "cmake"],
                   check=True)
    import cmake  # type: ignore[import-not-found]

    return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")


def tools_dir(*, install_cmake: bool = False, jobs: int = 2, log=None) -> Path:
    """The folder holding the built tools (building them first if they are not cached)."""
    final = cache_dir() / build_key()
    if all((final / t).is_file() for t in TOOLS):
        return final
    cmake = cmake_executable(install=install_cmake)
    src = llama_cpp_source()
    work = Path(tempfile.mkdtemp(prefix="build-llama-tools-", dir=cache_dir()))
    out = log if log is not None else sys.stderr
    try:
        build = work / "build"
        subprocess.run([cmake, "-S", str(src), "-B", str(build), *CMAKE_OPTIONS], check=True, stdout=out, stderr=out)
        subprocess.run([cmake, "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TOOLS],
                       check=True, stdout=out, stderr=out)
        stage = work / "tools"
        stage.mkdir()
        for t in TOOLS:
            (binary,) = [p for p in build.rglob(t) if p.is_file() and os.access(p, os.X_OK)]
            shutil.copy2(binary, stage / t)
        (stage / "BUILD").write_text(
            f"llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist ({src})\n"
            f"cmake {' '.join(CMAKE_OPTIONS)}\n"
        )
        try:
            stage.rename(final)
        except OSError:
            if not all((final / t).is_file() for t in TOOLS):  # lost a race to a build that succeeded?
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def tool(name: str, **kwargs) -> Path:
    """The path of one built tool (``llama-quantize``, ``llama-export-lora`` or ``llama-gguf-split``)."""
    if name not in TOOLS:
        raise ValueError(f"{name!r} is not one of {TOOLS}")
    return tools_dir(**kwargs) / name


if __name__ == "__main__":
    folder = tools_dir(install_cmake=True)
    for t in TOOLS:
        print(folder / t)
