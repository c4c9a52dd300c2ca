"""llama.cpp's sources, from the ``llama-cpp-python`` sdist on PyPI, downloaded once and cached.

The cache lives in ``$GGML_LORA_ORACLE_CACHE`` (default ``~/.cache/ggml-lora-oracles``). Everything here is
idempotent and safe against concurrent test workers: the tree is extracted into a temporary folder and renamed
into place, so a half-extracted tree is never used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: The llama-cpp-python release whose vendored llama.cpp is the reference.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def cache_dir() -> Path:
    """The oracle cache folder (created)."""
    root = Path(os.environ.get("GGML_LORA_ORACLE_CACHE", Path.home() / ".cache" / "ggml-lora-oracles"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def llama_cpp_source() -> Path:
    """The root of llama.cpp's source tree (``…/vendor/llama.cpp``), fetching and extracting it when missing."""
    root = cache_dir()
    tree = root / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    src = tree / "vendor" / "llama.cpp"
    if (src / "ggml" / "src" / "ggml-quants.c").is_file():
        return src
    archive = _download(root)
    work = Path(tempfile.mkdtemp(prefix="extract-", dir=root))
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name or m.isdir()]
            tar.extractall(work, members=members, filter="data")
        (extracted,) = [p for p in work.iterdir() if p.is_dir()]
        try:
            extracted.rename(tree)
        except OSError:
            if not (src / "ggml" / "src" / "ggml-quants.c").is_file():  # lost a race to a worker that succeeded?
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return src


def _download(root: Path) -> Path:
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    archive = root / name
    if archive.is_file():
        return archive
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--no-binary", "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp],
            check=True,
        )
        os.replace(Path(tmp) / name, archive)
    return archive
