"""Issue 13: every hostile input is refused with one documented exception from the API and one
error line (exit 1) from the CLI; nothing that should not be is accepted.

Each case builds its reproducer here (small files) and asserts the whole outcome: the API raises the documented
type (a ``ValueError`` subclass) with a message naming the problem; ``python -m ggml_lora`` prints exactly one
line ``ggml-lora: error: ...`` (no traceback, no warnings) and exits 1; no output is written; the inputs are
byte-identical afterwards. The CLI subprocess has a generous 60 s timeout as a liveness bound, not a speed claim.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from test_convert_helpers import ARCH, LLAMA_GQA, make_adapter, write_safetensors

import ggml_lora
from ggml_lora import ConversionError, GGUFError
from ggml_lora.convert import torch_pickle

BASE = ARCH / "mistral" / "base-f16.gguf"
MODEL = LLAMA_GQA / "base-q8_0.gguf"
ONE = ["model.layers.0.mlp.up_proj"]
A_KEY = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"


# ---------------------------------------------------------------------------------------------------------
# the outcome contract


def _digests(paths: list[Path]) -> dict[Path, str]:
    files = [f for p in paths for f in (sorted(p.rglob("*")) if p.is_dir() else [p]) if f.is_file()]
    return {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "ggml_lora", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def assert_refused(api: Callable[[], Any], cli_args: list[str], exc_type: type[BaseException], match: str,
                   inputs: list[Path], out: Path) -> None:
    """The API raises ``exc_type`` matching ``match``; the CLI prints one error line with it and exits 1; ``out``
    is not written; ``inputs`` are unchanged."""
    before = _digests(inputs)
    folder_before = sorted(out.parent.iterdir())
    with pytest.raises(exc_type, match=match):
        api()
    done = _cli(*cli_args)
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("ggml-lora: error: "), done.stderr
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr
    assert re.search(match, lines[0]), (match, lines[0])
    assert not out.exists() and sorted(out.parent.iterdir()) == folder_before
    assert _digests(inputs) == before


def refuse_conversion(folder: Path, match: str, tmp_path: Path) -> None:
    """Both entry points of a PEFT folder: ``convert`` (API and CLI)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "adapter.gguf"
    assert_refused(lambda: ggml_lora.convert(folder, out, base=BASE),
                   ["convert", str(folder), "--base", str(BASE), "-o", str(out)],
                   ConversionError, match, [folder, BASE], out)


def refuse_patch(adapter: Path, match: str, tmp_path: Path, exc_type: type[BaseException] = GGUFError) -> None:
    """``patch`` with a file adapter (API and CLI)."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "merged.gguf"
    assert_refused(lambda: ggml_lora.patch(MODEL, adapter, out=out),
                   ["patch", "-m", str(MODEL), "--lora", str(adapter), "-o", str(out), "-q"],
                   exc_type, match, [adapter, MODEL], out)


@pytest.fixture
def peft(tmp_path: Path) -> Path:
    folder, _, _ = make_adapter(tmp_path / "peft", modules=ONE)
    return folder


def set_config(folder: Path, text: str) -> None:
    (folder / "adapter_config.json").write_text(text)


def config_with(folder: Path, key: str, raw_value: str) -> str:
    """The folder's config with ``key`` set to the literal JSON text ``raw_value``."""
    config = json.loads((folder / "adapter_config.json").read_text())
    config[key] = "@@"
    return json.dumps(config).replace('"@@"', raw_value)


def write_header(path: Path, header_text: str, data: bytes) -> None:
    """A safetensors file with this exact header text (padded to 8 bytes) and data section."""
    head = header_text.encode()
    head += b" " * ((-len(head)) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def factor_header(**changes: Any) -> tuple[dict[str, Any], bytes]:
    """The header (as a dict) and data of a valid one-module adapter, with entries of A changed."""
    a = np.ones((8, 128), np.float32)
    b = np.zeros((256, 8), np.float32)
    header: dict[str, Any] = {
        A_KEY: {"dtype": "F32", "shape": [8, 128], "data_offsets": [0, a.nbytes]},
        B_KEY: {"dtype": "F32", "shape": [256, 8], "data_offsets": [a.nbytes, a.nbytes + b.nbytes]},
    }
    header[A_KEY].update(changes)
    return header, a.tobytes() + b.tobytes()


# ---------------------------------------------------------------------------------------------------------
# item 3: every failure is one clean line


@pytest.mark.fixtures
def test_valid_control_converts(peft: Path, tmp_path: Path) -> None:
    out = ggml_lora.convert(peft, tmp_path / "ok.gguf", base=BASE)
    assert out.is_file()


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_adapter_config(peft: Path, tmp_path: Path, depth: int) -> None:
    set_config(peft, config_with(peft, "target_modules", "[" * depth + "]" * depth))
    refuse_conversion(peft, "adapter_config.json is nested too deeply", tmp_path)


@pytest.mark.parametrize("depth", [100, 100_000])
@pytest.mark.parametrize("where", ["metadata", "entry"])
def test_deeply_nested_safetensors_header(peft: Path, tmp_path: Path, depth: int, where: str) -> None:
    # The safetensors crate parses the header with serde_json (recursion limit 128): a deep value in
    # __metadata__ (strings only) or in a tensor entry is refused without exhausting the stack.
    header, data = factor_header()
    nested = {"__metadata__": {"x": "@@"}} if where == "metadata" else {"x": "@@"}
    text = json.dumps({**nested, **header}).replace('"@@"', "[" * depth + "]" * depth)
    write_header(peft / "adapter_model.safetensors", text, data)
    match = (r"invalid JSON in header: invalid type: sequence, expected a string" if where == "metadata"
             else r'tensor "x": malformed entry \(')
    refuse_conversion(peft, match, tmp_path)


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 32])
def test_dtype_of_the_wrong_json_type(peft: Path, tmp_path: Path, dtype: Any) -> None:
    header, data = factor_header(dtype=dtype)
    write_header(peft / "adapter_model.safetensors", json.dumps(header), data)
    refuse_conversion(peft, r'lora_A\.weight": malformed entry \(.*\); expected \{"dtype"', tmp_path)


@pytest.mark.parametrize("dtype", ["I32", "F8_E4M3", "BOOL"])
def test_dtype_that_is_no_lora_factor(peft: Path, tmp_path: Path, dtype: str) -> None:
    # Dtypes the safetensors crate knows, refused by the core's own check (F32/F16/BF16/F64 only).
    size = {"I32": 4, "F8_E4M3": 1, "BOOL": 1}[dtype]
    header, data = factor_header(dtype=dtype, data_offsets=[0, 8 * 128 * size])
    header[B_KEY]["data_offsets"] = [8 * 128 * size, 8 * 128 * size + 256 * 8 * 4]
    write_header(peft / "adapter_model.safetensors", json.dumps(header), data[:8 * 128 * size] + data[4096:])
    refuse_conversion(peft, rf'lora_A\.weight" has dtype {dtype}; LoRA factors must be one of F32, F16, BF16, F64',
                      tmp_path)


def test_unknown_dtype_name(peft: Path, tmp_path: Path) -> None:
    header, data = factor_header(dtype="F33")
    write_header(peft / "adapter_model.safetensors", json.dumps(header), data)
    refuse_conversion(peft, r'lora_A\.weight": malformed entry \(unknown variant `F33`', tmp_path)


def test_lora_alpha_beyond_float_range(peft: Path, tmp_path: Path) -> None:
    set_config(peft, config_with(peft, "lora_alpha", "1" + "0" * 400))
    refuse_conversion(peft, "lora_alpha must be a finite number, got <an integer of about 401 digits>", tmp_path)


def test_five_thousand_digit_integer_in_config(peft: Path, tmp_path: Path) -> None:
    set_config(peft, config_with(peft, "r", "7" * 5000))
    refuse_conversion(peft, "adapter_config.json: an integer literal of 5000 digits", tmp_path)


def test_five_thousand_digit_integer_in_shape(peft: Path, tmp_path: Path) -> None:
    header, data = factor_header()
    text = json.dumps(header).replace("[8, 128]", "[8, " + "9" * 5000 + "]", 1)
    write_header(peft / "adapter_model.safetensors", text, data)
    refuse_conversion(peft, r'lora_A\.weight": malformed entry \(number out of range', tmp_path)


@pytest.mark.parametrize("shape", [[2**40, 2**40], [0, 2**62], [0] + [2**31] * 7])
def test_shape_whose_product_overflows(peft: Path, tmp_path: Path, shape: list[int]) -> None:
    header, data = factor_header(shape=shape)
    write_header(peft / "adapter_model.safetensors", json.dumps(header), data)
    refuse_conversion(peft, r'lora_A\.weight": shape \[.*\] of F32 and data_offsets \[0, 4096\]: (overflow|invalid)',
                      tmp_path)


def test_hundred_dimension_shape(peft: Path, tmp_path: Path) -> None:
    # Consistent with its data range (1024 elements), so the crate accepts it: the core's limit refuses it.
    header, data = factor_header(shape=[1] * 99 + [1024])
    write_header(peft / "adapter_model.safetensors", json.dumps(header), data)
    refuse_conversion(peft, r'lora_A\.weight" has 100 dimensions \(at most 8\)', tmp_path)


@pytest.mark.fixtures
def test_huge_f64_values_give_one_line_and_no_warning(peft: Path, tmp_path: Path) -> None:
    a = np.full((8, 128), 1e300)
    b = np.zeros((256, 8))
    header = {A_KEY: {"dtype": "F64", "shape": [8, 128], "data_offsets": [0, a.nbytes]},
              B_KEY: {"dtype": "F64", "shape": [256, 8], "data_offsets": [a.nbytes, a.nbytes + b.nbytes]}}
    write_header(peft / "adapter_model.safetensors", json.dumps(header), a.tobytes() + b.tobytes())
    with np.errstate(all="raise"):  # any numpy warning in the reader would be an error here
        with pytest.raises(ConversionError, match="NaN or infinite"):
            ggml_lora.peft_to_lora(peft, BASE)
    refuse_conversion(peft, r'adapter_model\.safetensors: tensor ".*lora_A\.weight": contains NaN or infinite',
                      tmp_path)


@pytest.mark.parametrize("error", [MemoryError, ValueError("archive/data.pkl, byte 3: a refusal")])
def test_torch_reader_errors_become_conversion_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      error: Any) -> None:
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(b"x")

    def fail(_: Path) -> None:
        raise error

    monkeypatch.setattr(torch_pickle, "_load_torch_bin", fail)
    with pytest.raises(ConversionError, match="torch file needs more memory|archive/data.pkl, byte 3"):
        torch_pickle.load_torch_bin(path)


def test_cli_internal_error_is_one_line_and_debug_shows_traceback(tmp_path: Path) -> None:
    # An exception outside the documented ones is a bug: one line, exit 3; --debug prints the traceback.
    code = ("import sys, ggml_lora.cli as c\n"
            "def boom(args): raise TypeError('unexpected')\n"
            "c._cmd_info = boom\n"
            "sys.exit(c.main(sys.argv[1:]))\n")
    for extra, traceback in (([], False), (["--debug"], True)):
        done = subprocess.run([sys.executable, "-c", code, *extra, "info", "x.gguf"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 3, done.stderr
        assert done.stderr.splitlines()[-1].startswith("ggml-lora: internal error (a bug in ggml-lora; run with "
                                                       "--debug"), done.stderr
        assert ("Traceback" in done.stderr) == traceback
        assert traceback or len(done.stderr.splitlines()) == 1


def test_cli_debug_flag_adds_the_traceback_to_a_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    plain = _cli("info", str(missing))
    assert plain.returncode == 1 and len(plain.stderr.splitlines()) == 1 and "Traceback" not in plain.stderr
    for args in (["--debug", "info", str(missing)], ["info", str(missing), "--debug"]):
        debug = _cli(*args)
        assert debug.returncode == 1 and "Traceback" in debug.stderr, debug.stderr
        assert debug.stderr.splitlines()[-1] == plain.stderr.strip()


# ---------------------------------------------------------------------------------------------------------
# item 4: nothing accepted that should not be - safetensors


def test_duplicate_tensor_names(peft: Path, tmp_path: Path) -> None:
    header, data = factor_header()
    entry = json.dumps(header[A_KEY])
    text = json.dumps(header)[:-1] + f", {json.dumps(A_KEY)}: {entry}}}"
    write_header(peft / "adapter_model.safetensors", text, data)
    refuse_conversion(peft, r'safetensors header: tensor "base_model.*lora_A\.weight" appears twice', tmp_path)


def test_overlapping_data_ranges(peft: Path, tmp_path: Path) -> None:
    a = np.ones((8, 128), np.float32)
    b = np.zeros((256, 8), np.float32)
    # B starts inside A: both fit the file and their own shapes, but share bytes.
    header = {A_KEY: {"dtype": "F32", "shape": [8, 128], "data_offsets": [0, a.nbytes]},
              B_KEY: {"dtype": "F32", "shape": [256, 8], "data_offsets": [a.nbytes - 4, a.nbytes - 4 + b.nbytes]}}
    write_header(peft / "adapter_model.safetensors", json.dumps(header), a.tobytes() + b.tobytes()[:-4])
    refuse_conversion(peft, r'lora_B\.weight": data_offsets \[4092, 12284\] overlap tensor ".*lora_A\.weight", which '
                      r"ends at 4096", tmp_path)


def test_gap_between_data_ranges(peft: Path, tmp_path: Path) -> None:
    header, data = factor_header()
    header[B_KEY]["data_offsets"] = [o + 8 for o in header[B_KEY]["data_offsets"]]
    write_header(peft / "adapter_model.safetensors", json.dumps(header), data[:4096] + bytes(8) + data[4096:])
    refuse_conversion(peft, r'lora_B\.weight": data_offsets \[4104, 12296\] leave a gap after tensor', tmp_path)


@pytest.mark.fixtures
def test_data_ranges_listed_out_of_order_are_fine_when_they_tile(peft: Path, tmp_path: Path) -> None:
    # The header's key order carries no meaning (the safetensors crate sorts by offset): a valid control.
    header, data = factor_header()
    write_header(peft / "adapter_model.safetensors", json.dumps(dict(reversed(list(header.items())))), data)
    assert ggml_lora.peft_to_lora(peft, BASE).tensors


def test_data_not_starting_at_zero(peft: Path, tmp_path: Path) -> None:
    header, data = factor_header()
    for entry in header.values():
        entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]
    write_header(peft / "adapter_model.safetensors", json.dumps(header), bytes(4) + data)
    refuse_conversion(peft, r"leave a gap after the start of the data, which ends at 0", tmp_path)


def test_bytes_no_tensor_accounts_for(peft: Path, tmp_path: Path) -> None:
    header, data = factor_header()
    write_header(peft / "adapter_model.safetensors", json.dumps(header), data + bytes(16))
    refuse_conversion(peft, r"bytes of data \(truncated, or bytes no tensor accounts for\)", tmp_path)


@pytest.mark.fixtures
def test_peft_adapter_without_tensors(peft: Path, tmp_path: Path) -> None:
    write_header(peft / "adapter_model.safetensors", json.dumps({"__metadata__": {"format": "pt"}}), b"")
    refuse_conversion(peft, r"adapter_model\.safetensors: the adapter holds no LoRA tensors", tmp_path)


# ---------------------------------------------------------------------------------------------------------
# item 4: ggla and GGUF adapters


def ggla_bytes(rank: int, tensors: list[tuple[str, list[int]]], alpha: int = 16) -> bytes:
    """A ggla file as convert-lora-to-ggml.py wrote it (f32 tensors of 0.01)."""
    out = bytearray(b"algg" + struct.pack("<iii", 1, rank, alpha))
    for name, dims in tensors:
        out += struct.pack("<iii", len(dims), len(name), 0) + struct.pack(f"<{len(dims)}i", *dims) + name.encode()
        out += bytes((-len(out)) % 32)
        out += np.full(int(np.prod(dims)), 0.01, np.float32).tobytes()
    return bytes(out)


def llama_ggla(rank: int = 2, header_rank: int | None = None, blocks: int = 2) -> list[tuple[str, list[int]]]:
    """The q and v pairs of ``blocks`` blocks of the llama-gqa fixture (dims in ggml order)."""
    import ggml_lora as g

    with g.open(MODEL) as f:
        shapes = {name: f.tensors[name].shape for name in f.tensors}
    tensors = []
    for block in range(blocks):
        for part, gguf_part in (("wq", "attn_q"), ("wv", "attn_v")):
            n_out, n_in = shapes[f"blk.{block}.{gguf_part}.weight"]
            tensors.append((f"layers.{block}.attention.{part}.weight.loraA", [rank, n_in]))
            tensors.append((f"layers.{block}.attention.{part}.weight.loraB", [rank, n_out]))
    return tensors


@pytest.mark.fixtures
def test_ggla_valid_control_patches(tmp_path: Path) -> None:
    adapter = tmp_path / "ok.ggla"
    adapter.write_bytes(ggla_bytes(2, llama_ggla()))
    result = ggml_lora.patch(MODEL, adapter, out=tmp_path / "ok.gguf")
    assert len(result.tensors) == 4


def test_ggla_header_alone(tmp_path: Path) -> None:
    adapter = tmp_path / "a.ggla"
    adapter.write_bytes(ggla_bytes(2, []))
    refuse_patch(adapter, r"a\.ggla: .*no LoRA tensor pairs \(the file ends after its 16-byte header", tmp_path)


@pytest.mark.fixtures
def test_ggla_cut_between_the_halves_of_a_pair(tmp_path: Path) -> None:
    adapter = tmp_path / "a.ggla"
    adapter.write_bytes(ggla_bytes(2, llama_ggla()[:3]))
    refuse_patch(adapter, r"a\.ggla: .*blk\.0\.attn_v\.weight\.loraA has no matching blk\.0\.attn_v\.weight\.loraB",
                 tmp_path)


@pytest.mark.fixtures
def test_ggla_cut_between_two_pairs_of_a_block(tmp_path: Path) -> None:
    adapter = tmp_path / "a.ggla"
    adapter.write_bytes(ggla_bytes(2, llama_ggla()[:6]))
    refuse_patch(adapter, r"a\.ggla: .*block 1 has no LoRA pair for blk\.1\.attn_v\.weight .*probably truncated",
                 tmp_path)


@pytest.mark.fixtures
def test_ggla_header_rank_differs_from_the_pairs(tmp_path: Path) -> None:
    adapter = tmp_path / "a.ggla"
    adapter.write_bytes(ggla_bytes(2**31 - 1, llama_ggla(rank=8)))
    refuse_patch(adapter, r"a\.ggla: .*tensor \"layers\.0\.attention\.wq\.weight\.loraA\" has rank 8, but the "
                 r"header states r = 2147483647", tmp_path)


def test_gguf_adapter_without_tensors(tmp_path: Path) -> None:
    adapter = tmp_path / "empty.gguf"
    ggml_lora.write(adapter, {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                              "adapter.lora.alpha": 16.0}, {})
    refuse_patch(adapter, r"empty\.gguf: .*no LoRA tensor pairs \(it has no tensors at all\)", tmp_path)


@pytest.mark.fixtures
def test_ggla_reader_keeps_a_tiny_file_tiny(tmp_path: Path) -> None:
    # read to its exact end: a few stray bytes after the last tensor are a truncated tensor header
    adapter = tmp_path / "a.ggla"
    adapter.write_bytes(ggla_bytes(2, llama_ggla()) + b"\x01\x00")
    refuse_patch(adapter, r"a\.ggla: .*file ends inside tensor dimension count", tmp_path)


# ---------------------------------------------------------------------------------------------------------
# item 1: the torch .bin reader (Rust core) under a 3 GiB address-space limit
#
# Oracle: the pickle and zip specifications; every file below is assembled byte by byte here (zip bombs from one
# deflate chunk repeated, so nothing big is ever held or kept). The API runs in a child process and the CLI in
# another, both under RLIMIT_AS = 3 GiB with a generous liveness timeout (not a speed claim).

AS_LIMIT = 3 << 30

_API_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
import ggml_lora
from pathlib import Path
try:
    {call}
except BaseException as exc:
    print(type(exc).__name__)
    print(str(exc).splitlines()[0] if str(exc) else "")
else:
    print("no exception")
"""


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def _limited(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env,
                          preexec_fn=_limit_memory)


def refuse_limited(folder: Path, match: str, tmp_path: Path, exc_name: str = "ConversionError") -> None:
    """``convert`` and ``patch --lora DIR`` of a PEFT folder, API and CLI, each in a child under a 3 GiB
    address-space limit: the documented exception (API), one error line and exit 1 (CLI), no output, inputs
    unchanged."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    before = _digests([folder, BASE, MODEL])
    for out, call, cli in (
        (out_dir / "adapter.gguf", f"ggml_lora.convert(Path({str(folder)!r}), Path({str(out_dir / 'adapter.gguf')!r}), "
         f"base=Path({str(BASE)!r}))", ["convert", str(folder), "--base", str(BASE), "-o", str(out_dir / "adapter.gguf")]),
        (out_dir / "merged.gguf", f"ggml_lora.patch(Path({str(MODEL)!r}), Path({str(folder)!r}), "
         f"out=Path({str(out_dir / 'merged.gguf')!r}))",
         ["patch", "-m", str(MODEL), "--lora", str(folder), "-o", str(out_dir / "merged.gguf"), "-q"]),
    ):
        api = _limited(["-c", _API_CHILD.format(limit=AS_LIMIT, call=call)])
        assert api.returncode == 0, api.stderr
        name, message = (api.stdout.splitlines() + ["", ""])[:2]
        assert name == exc_name, api.stdout
        assert re.search(match, message), (match, message)
        done = _limited(["-m", "ggml_lora", *cli])
        lines = done.stderr.splitlines()
        assert done.returncode == 1, done.stderr
        assert len(lines) == 1 and lines[0].startswith("ggml-lora: error: "), done.stderr
        assert re.search(match, lines[0]), (match, lines[0])
        assert not out.exists() and not list(out_dir.iterdir())
    assert _digests([folder, BASE, MODEL]) == before


@pytest.fixture
def bin_folder(tmp_path: Path) -> Path:
    """A one-module PEFT folder whose weights file is ``adapter_model.bin`` (written by the test)."""
    folder, _, _ = make_adapter(tmp_path / "peft", modules=ONE)
    (folder / "adapter_model.safetensors").unlink()
    return folder


def _zip_entry(name: str, payload: bytes, *, size: int, crc: int, method: int, offset: int) -> tuple[bytes, bytes]:
    """The local header (+ payload) and the central directory entry of one member, as the zip spec lays them out."""
    fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0, crc, len(payload), size, len(name), 0)
    local = struct.pack("<I", 0x04034B50) + fields + name.encode() + payload
    central = struct.pack("<IH", 0x02014B50, 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, offset) + name.encode()
    return local, central


def write_zip(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> None:
    """A zip of (name, payload, claimed size, crc, method) members."""
    body, directory = b"", b""
    for name, payload, size, crc, method in members:
        local, central = _zip_entry(name, payload, size=size, crc=crc, method=method, offset=len(body))
        body += local
        directory += central
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), len(body), 0)
    path.write_bytes(body + directory + end)


def stored(name: str, data: bytes) -> tuple[str, bytes, int, int, int]:
    return name, data, len(data), zlib.crc32(data), 0


def zeros_bomb(name: str, mib: int, claimed: int | None = None) -> tuple[str, bytes, int, int, int]:
    """A deflate member of ``mib`` MiB of zeros: one 1 MiB chunk compressed after a full flush (so it references
    nothing before it) repeated, then an empty final block. About 1 KB per MiB; the CRC is left 0 (the reader
    refuses before it could check it)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).compress(b"") + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    payload = chunk * mib + end
    return name, payload, mib << 20 if claimed is None else claimed, 0, 8


def state_pickle(numel: int, storage: str = "FloatStorage", key: str = A_KEY) -> bytes:
    """``{key: _rebuild_tensor_v2(storage('0', numel), 0, (numel,), (1,), False, OrderedDict())}`` in protocol 2,
    opcode by opcode."""
    def text(s: str) -> bytes:
        return b"X" + struct.pack("<I", len(s)) + s.encode()
    return (b"\x80\x02}" + text(key) + b"ctorch._utils\n_rebuild_tensor_v2\n((" + text("storage")
            + f"ctorch\n{storage}\n".encode() + text("0") + text("cpu") + b"J" + struct.pack("<i", numel)
            + b"tQK\x00J" + struct.pack("<i", numel) + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs.")


def test_zeros_bomb_is_what_it_claims() -> None:
    # the bomb builder itself, checked with zlib (an independent inflater): 3 MiB of zeros from ~3 KB
    _, payload, size, _, _ = zeros_bomb("x", 3)
    d = zlib.decompressobj(-15)
    out = d.decompress(payload)
    assert d.eof and out == bytes(size) and len(payload) < 8192


def test_valid_bin_control_under_the_limit(bin_folder: Path, tmp_path: Path) -> None:
    data = np.arange(16, dtype=np.float32)
    write_zip(bin_folder / "adapter_model.bin", [stored("archive/data.pkl", state_pickle(16)),
                                                 stored("archive/data/0", data.tobytes())])
    api = _limited(["-c", _API_CHILD.format(limit=AS_LIMIT, call=(
        "from ggml_lora.convert.torch_pickle import load_torch_bin; "
        f"t = load_torch_bin({str(bin_folder / 'adapter_model.bin')!r}); print(t[{A_KEY!r}].tolist())"))])
    assert api.stdout.splitlines()[0] == str(data.tolist()), api.stdout + api.stderr


def test_nested_tuples_a_million_deep_as_a_dict_key(bin_folder: Path, tmp_path: Path) -> None:
    # {((...(None,)...),): 1} with 10^6 levels: a SIGSEGV in the old restricted unpickler
    payload = b"\x80\x02}N" + b"\x85" * 1_000_000 + b"K\x01s."
    write_zip(bin_folder / "adapter_model.bin", [stored("archive/data.pkl", payload)])
    refuse_limited(bin_folder, r"data\.pkl, byte 68: nesting depth is 65, over the limit of 64 \(MAX_DEPTH\)",
                   tmp_path)


def _memo_dag(levels: int) -> bytes:
    """t_0 = (None,), t_{i+1} = (t_i, t_i, t_i, t_i) through the memo: 4^levels leaves, levels + 1 deep."""
    p = b"N\x85r" + struct.pack("<I", 0) + b"0"
    for i in range(levels):
        get = b"j" + struct.pack("<I", i)
        p += b"(" + get * 4 + b"tr" + struct.pack("<I", i + 1) + b"0"
    return p + b"j" + struct.pack("<I", levels)


def test_memo_dag_of_2_pow_100_leaves_as_a_dict_key(bin_folder: Path, tmp_path: Path) -> None:
    # 4^50 = 2^100 leaves: hashing it never finished
    write_zip(bin_folder / "adapter_model.bin", [stored("archive/data.pkl", b"\x80\x02}" + _memo_dag(50) + b"K\x01s.")])
    refuse_limited(bin_folder, r"dict key of type tuple \(only str and int keys are accepted\)", tmp_path)


def test_memo_dag_of_2_pow_100_leaves_as_a_persistent_id(bin_folder: Path, tmp_path: Path) -> None:
    # its repr never finished
    write_zip(bin_folder / "adapter_model.bin", [stored("archive/data.pkl", b"\x80\x02" + _memo_dag(50) + b"Q.")])
    refuse_limited(bin_folder, r"persistent id is a tuple of 4 items, expected \('storage'", tmp_path)


def test_data_pkl_inflating_to_gibs(bin_folder: Path, tmp_path: Path) -> None:
    write_zip(bin_folder / "adapter_model.bin", [zeros_bomb("archive/data.pkl", 3840)])  # 3.75 GiB
    refuse_limited(bin_folder, r"archive/data\.pkl, byte 0: data\.pkl size is 4026531840, over the limit of 67108864 "
                   r"\(MAX_PICKLE_BYTES\)", tmp_path)


def test_data_pkl_whose_directory_lies_about_its_size(bin_folder: Path, tmp_path: Path) -> None:
    write_zip(bin_folder / "adapter_model.bin", [zeros_bomb("archive/data.pkl", 3840, claimed=1000)])
    refuse_limited(bin_folder, r"archive/data\.pkl, byte 1000: inflates past the 1000 bytes it promises", tmp_path)


def test_byteorder_inflating_to_gibs(bin_folder: Path, tmp_path: Path) -> None:
    write_zip(bin_folder / "adapter_model.bin", [stored("archive/data.pkl", state_pickle(4)),
                                                 zeros_bomb("archive/byteorder", 3840)])
    refuse_limited(bin_folder, r"byteorder size is 4026531840, over the limit of 16 \(MAX_BYTEORDER_BYTES\)", tmp_path)


def test_storage_inflating_past_what_its_tensor_promises(bin_folder: Path, tmp_path: Path) -> None:
    # the pickle promises 4 floats; the directory agrees; the stream holds 3.75 GiB
    write_zip(bin_folder / "adapter_model.bin", [stored("archive/data.pkl", state_pickle(4)),
                                                 zeros_bomb("archive/data/0", 3840, claimed=16)])
    refuse_limited(bin_folder, r"archive/data/0, byte 16: inflates past the 16 bytes it promises", tmp_path)


def test_storage_consistently_declaring_gibs_is_refused_not_aborted(bin_folder: Path, tmp_path: Path) -> None:
    # pickle, directory and stream agree on 3.75 GiB of float32: more than the 3 GiB address space allows, so the
    # fallible allocation fails and the file is refused (no abort, no MemoryError)
    numel = 3840 << 18
    write_zip(bin_folder / "adapter_model.bin", [stored("archive/data.pkl", state_pickle(numel)),
                                                 zeros_bomb("archive/data/0", 3840)])
    refuse_limited(bin_folder, r"archive/data/0, byte 0: cannot allocate 4026531840 bytes .*\(out of memory\)", tmp_path)


# ---------------------------------------------------------------------------------------------------------
# item 2: pattern keys without catastrophic backtracking; numbers


def _peft_pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's get_pattern_key restated with Python's re (the oracle, on inputs where it finishes)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module if module in patterns else None


def test_pattern_keys_match_as_peft_does() -> None:
    from ggml_lora.convert.peft import _get_pattern_key

    patterns = {"q_proj": 1, r"layers\.1\..*": 2, "mlp.up_proj": 3, "model.layers.0.self_attn.v_proj": 4,
                "(k|o)_proj": 5, "a)|(model": 6, r"\w+_proj": 7}
    modules = [f"model.layers.{i}.{m}" for i in range(3) for m in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
                "mlp.gate_proj", "mlp.xup_proj")] + ["q_proj", "lm_head", "a"]
    for order in (list(patterns), list(reversed(patterns))):
        ordered = {k: patterns[k] for k in order}
        for module in modules:
            assert _get_pattern_key(ordered, module) == _peft_pattern_key(ordered, module), (order, module)


@pytest.mark.fixtures
def test_catastrophic_backtracking_pattern_converts(tmp_path: Path) -> None:
    # "(.*.*)*x" hung Python's re on module names without an x; "(.*.*)*up_proj" matches up_proj (by hand: the
    # group may match empty, then "up_proj" ends the name)
    folder, _, _ = make_adapter(tmp_path / "p", modules=ONE)
    modules = [f"model.layers.{i}.mlp.{m}" for i in range(30) for m in ("up_proj", "down_proj")]
    for patterns, ranks in (({"(.*.*)*x": 4}, [8, 8]), ({"(.*.*)*x": 4, "(.*.*)*up_proj": 2}, [2, 8])):
        set_config(folder, config_with(folder, "rank_pattern", json.dumps(patterns)))
        call = ("import json; from ggml_lora.convert.peft import parse_config; "
                f"c = parse_config(json.loads(Path({str(folder / 'adapter_config.json')!r}).read_text())); "
                f"print(sorted(set((m.rsplit('.', 1)[1], c.module_rank_alpha(m)[0]) for m in {modules!r})))")
        api = _limited(["-c", _API_CHILD.format(limit=AS_LIMIT, call=call)])
        assert api.stdout.splitlines()[0] == str([("down_proj", ranks[1]), ("up_proj", ranks[0])]), api.stdout + api.stderr
    # a whole conversion with the pattern that matches nothing (the adapter's rank stays r = 8)
    set_config(folder, config_with(folder, "rank_pattern", json.dumps({"(.*.*)*x": 4})))
    out = tmp_path / "ok.gguf"
    done = _limited(["-m", "ggml_lora", "convert", str(folder), "--base", str(BASE), "-o", str(out)])
    assert done.returncode == 0 and out.is_file(), done.stderr


@pytest.mark.parametrize(("key", "why"), [
    (r"(up)\1_proj", "linear-time matcher"),
    ("(?<=mlp\\.)up_proj", "linear-time matcher"),
    ("(?!k)up_proj", "linear-time matcher"),
    ("[[:alpha:]]+", "nested class"),
    ("up_proj(", "is not a valid regex"),  # Python's re refuses it too (as PEFT would)
])
def test_pattern_keys_the_matcher_cannot_run_exactly_are_refused(peft: Path, tmp_path: Path, key: str,
                                                                 why: str) -> None:
    set_config(peft, config_with(peft, "alpha_pattern", json.dumps({key: 4})))
    shown = f"(?:{re.escape(json.dumps(key))}:|'{re.escape(key)}')"  # the core's message, or Python re's
    refuse_conversion(peft, rf"pattern key {shown} .*{why}", tmp_path)


@pytest.mark.parametrize(("key", "raw", "match"), [
    ("lora_alpha", "1e400", "lora_alpha must be a finite number, got inf"),
    ("lora_alpha", "-1e400", "lora_alpha must be a finite number, got -inf"),
    ("lora_alpha", "NaN", "lora_alpha must be a finite number, got nan"),
    ("lora_alpha", "Infinity", "lora_alpha must be a finite number, got inf"),
    ("r", "1e400", "r must be an integer, got inf"),
    ("r", "1" + "0" * 400, r"r = <an integer of about 401 digits> is absurdly large"),
    ("alpha_pattern", '{"up_proj": 1e400}', r"alpha_pattern\['up_proj'\] must be a finite number, got inf"),
    ("alpha_pattern", '{"up_proj": ' + "9" * 400 + "}", r"alpha_pattern\['up_proj'\] must be a finite number"),
    ("rank_pattern", '{"up_proj": 1e400}', r"rank_pattern\['up_proj'\] must be an integer, got inf"),
    ("rank_pattern", '{"up_proj": ' + "9" * 400 + "}", r"rank_pattern\['up_proj'\] = <an integer of about \d+ "
     "digits> is absurdly large"),
])
def test_numbers_out_of_range(peft: Path, tmp_path: Path, key: str, raw: str, match: str) -> None:
    set_config(peft, config_with(peft, key, raw))
    refuse_conversion(peft, match, tmp_path)
