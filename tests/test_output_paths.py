"""Output path rules (issue 13, item 5), judged by the file system itself (``os.stat``, ``stat.S_ISCHR``, ...).

- The output must be a regular file or a new name: a character device (``/dev/null``), a FIFO or a directory
  is refused before any work, with a message naming the path and what it is, and is never replaced.
- Inputs that are not regular files (a FIFO as the model, adapter, base, importance matrix, PEFT weights or
  convert base) are refused without blocking: the CLI runs in a subprocess with a generous 60 s liveness
  timeout (not a speed claim: without the rule it would block in ``open`` forever).
- Any legal output name (255 bytes) works: the temporary name stays within NAME_MAX.
- An interrupt never reports "no output was written" once the output is in place: delivered before the
  rename it cancels the run and nothing is written; delivered after it, the message says the output is
  complete. The signal is raised at a known point (``signal.raise_signal`` from a test hook), never timed.

Every test checks that the inputs are unchanged and that no output or temporary file is left where none
should be.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

import ggml_lora
from ggml_lora import SpecialFileError, cli
from ggml_lora.convert import convert
from conftest import FIXTURES, skip_module_without_fixtures

skip_module_without_fixtures()
from test_faults import model_inputs  # noqa: F401 - the fixture, shared

LLAMA = FIXTURES / "llama-gqa"
TEMP_MARKER = ".ggml-lora-tmp."
LIVENESS_TIMEOUT = 60  # seconds; a hang guard for the subprocess, not a speed claim


@pytest.fixture()
def inputs(model_inputs: dict[str, Path]) -> dict[str, Path]:
    """test_faults' private copies of a q4_0 model, its f16 base and a GGUF adapter, an output folder, and a
    private copy of the PEFT folder the adapter was converted from."""
    model_inputs["peft"] = model_inputs["model"].parent / "peft"
    shutil.copytree(LLAMA / "lora-r8" / "adapter", model_inputs["peft"])
    return model_inputs


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry below ``folder``: (mode, sha256 of a regular file's bytes or '')."""
    result = {}
    for p in sorted(folder.rglob("*")):
        st = os.lstat(p)
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        result[str(p.relative_to(folder))] = (st.st_mode, digest)
    return result


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_MARKER in p.name)


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    """The CLI in a child process (so that a blocking open cannot hang the test run)."""
    return subprocess.run([sys.executable, "-m", "ggml_lora", *map(str, args)], capture_output=True, text=True,
                          timeout=LIVENESS_TIMEOUT)


def one_error_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ggml-lora: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def dev_null_state() -> tuple[int, int, int]:
    st = os.stat("/dev/null")
    return st.st_mode, st.st_rdev, st.st_ino


# ---------------------------------------------------------------------------------------------------------------
# Outputs that are not regular files


def test_dev_null_as_output_is_refused_and_stays_a_device(inputs: dict[str, Path]) -> None:
    """As root (CI), renaming onto /dev/null would succeed and replace the device: it must be refused first."""
    before, dev = snapshot(inputs["model"].parent), dev_null_state()
    assert stat.S_ISCHR(dev[0])
    message = "/dev/null is a character device; the output must be a regular file or a new name"
    one_error_line(run_cli("patch", "-m", inputs["model"], "--lora", inputs["adapter"], "-o", "/dev/null"), message)
    with pytest.raises(SpecialFileError, match=message):
        ggml_lora.patch(inputs["model"], inputs["adapter"], out="/dev/null")
    assert issubclass(SpecialFileError, ValueError)
    with pytest.raises(SpecialFileError, match=message):
        ggml_lora.write("/dev/null", {}, {})
    for fmt in ("gguf", "ggla"):
        with pytest.raises(SpecialFileError, match=message):
            convert(inputs["peft"], "/dev/null", base=inputs["base"], format=fmt)
        one_error_line(run_cli("convert", inputs["peft"], "--base", inputs["base"], "-o", "/dev/null",
                               "--format", fmt), message)
    assert dev_null_state() == dev and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert temps(Path("/dev")) == []
    assert snapshot(inputs["model"].parent) == before


def test_the_output_is_refused_before_any_work(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Before any input is read: with inputs that do not exist, the error is about the output."""
    missing = tmp_path / "no-such-model.gguf"
    with pytest.raises(SpecialFileError, match="/dev/null is a character device"):
        ggml_lora.patch(missing, tmp_path / "no-such-adapter.gguf", out="/dev/null")
    with pytest.raises(SpecialFileError, match="/dev/null is a character device"):
        convert(tmp_path / "no-such-peft", "/dev/null", base=missing)


def test_fifo_as_output_is_refused_and_stays_a_fifo(inputs: dict[str, Path]) -> None:
    out_dir = inputs["dir"]
    fifo = out_dir / "merged.gguf"
    os.mkfifo(fifo)
    before = snapshot(inputs["model"].parent)
    message = f"{fifo} is a FIFO (named pipe); the output must be a regular file or a new name"
    one_error_line(run_cli("patch", "-m", inputs["model"], "--lora", inputs["adapter"], "-o", fifo), message)
    with pytest.raises(SpecialFileError, match="is a FIFO"):
        ggml_lora.patch(inputs["model"], inputs["adapter"], out=fifo)
    for fmt in ("gguf", "ggla"):
        one_error_line(run_cli("convert", inputs["peft"], "--base", inputs["base"], "-o", fifo, "--format", fmt),
                       message)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in out_dir.iterdir()] == ["merged.gguf"]
    assert snapshot(inputs["model"].parent) == before


def test_directory_as_output_is_refused(inputs: dict[str, Path]) -> None:
    target = inputs["dir"] / "merged.gguf"
    target.mkdir()
    before = snapshot(inputs["model"].parent)
    one_error_line(run_cli("patch", "-m", inputs["model"], "--lora", inputs["adapter"], "-o", target),
                   f"{target} is a directory; the output must be a regular file or a new name")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        ggml_lora.patch(inputs["model"], inputs["adapter"], out=target)
    assert stat.S_ISDIR(os.lstat(target).st_mode) and list(target.iterdir()) == []
    assert [p.name for p in inputs["dir"].iterdir()] == ["merged.gguf"]
    assert snapshot(inputs["model"].parent) == before


def test_symlink_to_a_device_is_judged_by_its_target(inputs: dict[str, Path]) -> None:
    link = inputs["dir"] / "merged.gguf"
    link.symlink_to("/dev/null")
    with pytest.raises(SpecialFileError, match="is a character device"):
        ggml_lora.patch(inputs["model"], inputs["adapter"], out=link)
    assert os.readlink(link) == "/dev/null" and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert temps(inputs["dir"]) == []


# ---------------------------------------------------------------------------------------------------------------
# Inputs that are not regular files: refused without blocking


@pytest.mark.parametrize("role", ["model", "lora", "lora-base", "imatrix"])
def test_fifo_as_patch_input_is_refused_without_blocking(inputs: dict[str, Path], role: str) -> None:
    fifo = inputs["dir"] / "pipe.gguf"
    os.mkfifo(fifo)
    args = {"model": inputs["model"], "lora": inputs["adapter"], "lora-base": inputs["base"], "imatrix": None}
    args[role] = fifo
    argv: list[object] = ["patch", "-m", args["model"], "--lora", args["lora"], "--lora-base", args["lora-base"]]
    if args["imatrix"] is not None:
        argv += ["--imatrix", args["imatrix"]]
    out = inputs["dir"] / "merged.gguf"
    before = snapshot(inputs["model"].parent)
    one_error_line(run_cli(*argv, "-o", out), f"{fifo} is a FIFO (named pipe); an input must be a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in inputs["dir"].iterdir()] == ["pipe.gguf"]
    assert snapshot(inputs["model"].parent) == before


def test_fifo_inputs_are_refused_by_the_api_without_blocking(inputs: dict[str, Path]) -> None:
    """In process (each refusal is a stat, never an open): ggml_lora.open, read_imatrix, Adapter.open."""
    fifo = inputs["dir"] / "pipe.gguf"
    os.mkfifo(fifo)
    code = (
        "import sys, ggml_lora\n"
        "from ggml_lora import _native\n"
        "for fn in (ggml_lora.open, ggml_lora.read_imatrix, _native.Adapter.open, ggml_lora.load_adapter):\n"
        "    try:\n"
        "        fn(sys.argv[1])\n"
        "    except ggml_lora.SpecialFileError as exc:\n"
        "        print(type(exc).__name__, exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True,
                          timeout=LIVENESS_TIMEOUT)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 4, (proc.stdout, proc.stderr)
    assert all(line == f"SpecialFileError {fifo} is a FIFO (named pipe); an input must be a regular file"
               for line in lines), lines


@pytest.mark.parametrize("where", ["adapter_model.safetensors", "adapter_config.json", "base"])
def test_fifo_in_a_peft_conversion_is_refused_without_blocking(inputs: dict[str, Path], where: str) -> None:
    peft, base = inputs["peft"], inputs["base"]
    if where == "base":
        base = inputs["dir"] / "base.gguf"
        fifo = base
    else:
        fifo = peft / where
        fifo.unlink()
    os.mkfifo(fifo)
    out = inputs["dir"] / "a.gguf"
    one_error_line(run_cli("convert", peft, "--base", base, "-o", out),
                   f"{fifo} is a FIFO (named pipe); an input must be a regular file")
    # and through patch, which converts a PEFT folder in memory
    one_error_line(run_cli("patch", "-m", inputs["model"] if where != "base" else base, "--lora", peft,
                           "-o", out), f"{fifo} is a FIFO (named pipe); an input must be a regular file")
    assert not out.exists() and temps(inputs["dir"]) == []


# ---------------------------------------------------------------------------------------------------------------
# Long names


def test_a_255_byte_output_name_works(inputs: dict[str, Path]) -> None:
    """NAME_MAX is 255: the temporary name (marker, pid, counter) is cut to fit, so the longest name works."""
    before = snapshot(inputs["model"].parent)
    out_dir = inputs["dir"]
    reference = ggml_lora.patch(inputs["model"], inputs["adapter"], out=out_dir / "short.gguf").out
    long_name = out_dir / ("m" * 250 + ".gguf")
    assert len(os.fsencode(long_name.name)) == 255
    proc = run_cli("patch", "-q", "-m", inputs["model"], "--lora", inputs["adapter"], "-o", long_name)
    assert proc.returncode == 0, proc.stderr
    assert long_name.read_bytes() == reference.read_bytes()
    # the same through the API, replacing the existing file
    ggml_lora.patch(inputs["model"], inputs["adapter"], out=long_name)
    assert long_name.read_bytes() == reference.read_bytes()
    # multi-byte characters: 127 x 2 bytes + "x" = 255 bytes
    wide = out_dir / ("é" * 127 + "x")
    assert len(os.fsencode(wide.name)) == 255
    ggml_lora.patch(inputs["model"], inputs["adapter"], out=wide)
    assert wide.read_bytes() == reference.read_bytes()
    for fmt, suffix in (("gguf", ".gguf"), ("ggla", ".bin")):
        short = convert(inputs["peft"], out_dir / f"short{suffix}", base=inputs["base"], format=fmt)
        target = out_dir / ("c" * (255 - len(suffix)) + suffix)
        proc = run_cli("convert", inputs["peft"], "--base", inputs["base"], "-o", target, "--format", fmt)
        assert proc.returncode == 0, proc.stderr
        assert target.read_bytes() == short.read_bytes()
    assert temps(out_dir) == []
    assert snapshot(inputs["model"].parent) == before


# ---------------------------------------------------------------------------------------------------------------
# Interrupts: the message tells the truth


def interrupt_after(real: Callable[..., object]) -> Callable[..., object]:
    """``real``, then SIGINT: the interrupt arrives once the writer has renamed the output into place, before
    any Python code has seen the result (``raise_signal`` runs the handler and raises at once)."""

    def wrapper(*args: object, **kwargs: object) -> object:
        result = real(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("SIGINT did not raise KeyboardInterrupt")  # pragma: no cover
        return result

    return wrapper


def patch_argv(inputs: dict[str, Path], out: Path) -> list[str]:
    return ["patch", "-m", str(inputs["model"]), "--lora", str(inputs["adapter"]), "-o", str(out)]


def test_interrupt_after_the_rename_says_the_output_is_complete(
        inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = inputs["dir"] / "merged.gguf"
    reference = ggml_lora.patch(inputs["model"], inputs["adapter"], out=inputs["dir"] / "reference.gguf").out
    monkeypatch.setattr(ggml_lora._native, "patch", interrupt_after(ggml_lora._native.patch))
    assert cli.main([*patch_argv(inputs, out), "-q"]) == 130
    err = capsys.readouterr().err
    assert err == f"ggml-lora: interrupted after the output was complete: {out}\n", err
    assert "no output was written" not in err
    assert out.read_bytes() == reference.read_bytes()
    assert temps(inputs["dir"]) == []


@pytest.mark.parametrize("fmt", ["gguf", "ggla"])
def test_interrupt_after_a_conversion_rename_says_the_output_is_complete(
        inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        fmt: str) -> None:
    reference = convert(inputs["peft"], inputs["dir"] / "reference", base=inputs["base"], format=fmt)
    out = inputs["dir"] / "adapter.out"
    # The native writer returns with the output in place (and recorded); the interrupt arrives right after.
    writer = "write_gguf" if fmt == "gguf" else "write_ggla"
    monkeypatch.setattr(ggml_lora._native, writer, interrupt_after(getattr(ggml_lora._native, writer)))
    argv = ["convert", str(inputs["peft"]), "--base", str(inputs["base"]), "-o", str(out), "--format", fmt]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err == f"ggml-lora: interrupted after the output was complete: {out}\n", err
    assert out.read_bytes() == reference.read_bytes()
    assert temps(inputs["dir"]) == []


def test_interrupt_before_the_rename_cancels_and_writes_nothing(
        inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGINT at the last progress report (all tensors computed, the output not yet renamed): honoured, and
    the message that nothing was written is true."""
    out = inputs["dir"] / "merged.gguf"
    out.write_bytes(b"previous output")
    seen: list[tuple[int, int]] = []

    class InterruptAtTheEnd:
        def __init__(self, stream: object = None) -> None:
            pass

        def __call__(self, p: ggml_lora.PatchProgress) -> None:
            seen.append((p.tensors_done, p.tensors_total))
            if p.tensors_done == p.tensors_total:
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(cli, "_ProgressBar", InterruptAtTheEnd)
    before = snapshot(inputs["model"].parent)
    assert cli.main(patch_argv(inputs, out)) == 130
    assert capsys.readouterr().err == "ggml-lora: interrupted; no output was written\n"
    assert seen and seen[-1][0] == seen[-1][1]
    assert out.read_bytes() == b"previous output"
    assert temps(inputs["dir"]) == []
    assert snapshot(inputs["model"].parent) == before
