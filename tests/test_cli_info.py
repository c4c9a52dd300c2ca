"""The ``ggml-lora`` command line: ``info`` and ``demo``, run as real processes (the console script and
``python -m ggml_lora``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

import ggml_lora
from conftest import fixture_path


def _console_script() -> str:
    """The installed ``ggml-lora`` script of this Python (fails, never skips, when it is not installed)."""
    beside = Path(sys.executable).parent / "ggml-lora"
    if beside.exists():
        return str(beside)
    found = shutil.which("ggml-lora")
    if found is None:
        pytest.fail("the ggml-lora console script is not installed (pip install -e '.[test]')")
    return found


def run(*args: str, module: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "ggml_lora", *args] if module else [_console_script(), *args]
    env = dict(os.environ, PYTHONIOENCODING="utf-8", COLUMNS="200")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


BASE = fixture_path("llama-gqa", "base-f16.gguf")
MIXED = fixture_path("llama-gqa", "base-q4_0-mixed.gguf")


def _shape_pattern(shape: tuple[int, ...]) -> str:
    return r"\s*[x×,]\s*".join(str(d) for d in shape)


@pytest.mark.parametrize("module", [False, True], ids=["console-script", "python-m"])
@pytest.mark.parametrize("path", [BASE, MIXED], ids=lambda p: p.name)
@pytest.mark.fixtures
def test_info_shows_version_metadata_and_tensor_table(path: Path, module: bool) -> None:
    proc = run("info", str(path), module=module)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    reader = gguf.GGUFReader(path)
    version = int(reader.fields["GGUF.version"].contents())
    assert re.search(rf"\bv{version}\b|version:?\s*{version}\b", out, re.I), out[:300]
    lines = out.splitlines()
    for key in (k for k in reader.fields if not k.startswith("GGUF.")):
        assert any(key in line for line in lines), f"metadata key {key} not shown"
    arch = next(line for line in lines if "general.architecture" in line)
    assert re.search(r"\bllama\b", arch.split("general.architecture", 1)[1]), arch
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # numpy order
        rows = [line for line in lines if re.search(rf"(^|\s){re.escape(t.name)}(\s|$)", line)]
        assert len(rows) == 1, f"tensor {t.name}: {rows}"
        row = rows[0]
        assert re.search(rf"\b{t.tensor_type.name.lower()}\b", row, re.I), row
        assert re.search(rf"(^|\s|\(|\[){_shape_pattern(shape)}(\s|\)|\]|$)", row), row
    assert proc.stderr == ""


@pytest.mark.fixtures
def test_info_is_the_same_from_both_entry_points() -> None:
    a, b = run("info", str(MIXED)), run("info", str(MIXED), module=True)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


@pytest.mark.fixtures
def test_long_arrays_are_summarised() -> None:
    proc = run("info", str(BASE))
    assert proc.returncode == 0, proc.stderr
    with ggml_lora.open(BASE) as f:
        tokens = f.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 512
    line = next(line for line in proc.stdout.splitlines() if "tokenizer.ggml.tokens" in line)
    assert "(512 items)" in line
    shown = sum(1 for tok in tokens if repr(tok) in line)
    assert 0 < shown < 32, f"{shown} of 512 tokens printed"
    assert repr(tokens[-1]) not in proc.stdout  # '<0x..>'-style or a word: the last token is never reached
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        line = next(line for line in proc.stdout.splitlines() if key in line)
        assert "(512 items)" in line and len(line) < 400
    assert len(proc.stdout) < 20_000


def test_missing_file_is_one_line_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    proc = run("info", str(missing))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert "missing.gguf" in err[0] and re.search(r"no such file|not found", err[0], re.I)


@pytest.mark.fixtures
def test_malformed_file_names_the_byte_offset(tmp_path: Path) -> None:
    content = MIXED.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(content[:1000])  # inside the tokenizer strings
    proc = run("info", str(bad))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "cut.gguf" in err and re.search(r"at byte \d+", err), err
    magic = tmp_path / "magic.gguf"
    magic.write_bytes(b"GGML" + content[4:])
    proc = run("info", str(magic))
    assert proc.returncode != 0 and "at byte 0" in proc.stderr and "Traceback" not in proc.stderr


def test_usage_errors() -> None:
    proc = run()
    assert proc.returncode != 0 and "usage" in proc.stderr.lower()
    proc = run("info")
    assert proc.returncode != 0 and "usage" in proc.stderr.lower()
    proc = run("--version")
    assert proc.returncode == 0 and ggml_lora.__version__ in proc.stdout + proc.stderr
    proc = run("--help")
    assert proc.returncode == 0 and "info" in proc.stdout and "demo" in proc.stdout


def test_demo_writes_a_readable_example(tmp_path: Path) -> None:
    proc = run("demo", "--dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    example = tmp_path / "example-q4_0.gguf"
    assert example.is_file()
    assert "example-q4_0.gguf" in proc.stdout
    with ggml_lora.open(example) as f:
        types = {info.type for info in f.tensors.values()}
        assert "q4_0" in types
        assert f.metadata["general.architecture"] == "llama"
        for name, info in f.tensors.items():
            if info.type == "q4_0":
                assert len(info.shape) == 2
                f.to_numpy(name)  # dequantizes
    reader = gguf.GGUFReader(example)  # llama.cpp's reader accepts it too
    assert [t.name for t in reader.tensors] == list(ggml_lora.open(example).tensors)
