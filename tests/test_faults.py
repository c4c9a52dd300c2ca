"""Fault suite: hostile GGUF inputs, output safety under failure, crash and kill, adapter safety, concurrency.

Every input byte is treated as hostile and no user file may ever be lost or corrupted:

- hostile GGUF: each real fixture truncated at every header field boundary (found by an independent walker,
  ``_faults_gguf.py``) and at random points of its data, byte flips, huge counts/lengths/dims/offsets, misaligned,
  overlapping and out-of-file tensor data, unknown type ids, duplicate names, wrong magic/version. Each case must
  raise ``ggml_lora.GGUFError`` (a ``ValueError``) with a message, or, for changes that leave the header valid,
  open and read. A watchdog bounds every batch (a liveness bound that catches a hang, not a speed claim), a
  sample is replayed in a child process (no abort), and a child measures that 100-byte files claiming huge
  counts allocate nothing much.
- output safety of ``ggml_lora.write``, ``ggml_lora.patch`` and ``ggml_lora.convert.convert``: existing targets are
  replaced only on success, inputs are never targets, unwritable folders, a full disk (RLIMIT_FSIZE in a child),
  SIGKILL of a child patching a ~230 MB model, at points the test chooses (the child pauses in its progress
  callback and says so); afterwards inputs are byte-identical, no partial target exists, and leftovers (only
  after SIGKILL) carry the ``.ggml-lora-tmp.`` marker. Unwritable folders include a permission-denied one even
  as root (an immutable folder, ``chattr +i``).
- adapter safety: hostile ``adapter_model.bin`` pickles are refused without running anything; absurd
  ``adapter_config.json`` values give clear errors.
- concurrency: patches from threads and processes at once give the bytes of a single run.

Oracles: the fault itself (a file the test corrupted, a limit or signal it imposed) and the files' own hashes:
each case must end in the documented error with the inputs unchanged. No test asserts on elapsed time. The
figures of a run (hostile inputs tried, faults injected) are printed in pytest's terminal summary (conftest.py)
and summarised in RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import select
import signal
import struct
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import ggml_lora

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _faults_gguf as g  # noqa: E402

REPO = HERE.parent
from conftest import FIXTURES, fixture_path, skip_module_without_fixtures  # noqa: E402

LLAMA = FIXTURES / "llama-gqa"
CHILD = HERE / "_faults_child.py"
TEMP_MARKER = ".ggml-lora-tmp."
#: Watchdog of a whole batch: faulthandler dumps the stacks and exits the process, so CI never hangs. A liveness
#: bound, generous on purpose: no test asserts on elapsed time.
BATCH_SECONDS = 300

#: Counters reported at the end of the run (and in RELIABILITY.md).
FIGURES: dict[str, int] = {}


def count(what: str, n: int = 1) -> None:
    FIGURES[what] = FIGURES.get(what, 0) + n


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_fixtures() -> list[Path]:
    """The small real GGUF files (adapters and the gpt2 changed-tensors file), used whole."""
    files = [p for p in sorted(FIXTURES.rglob("*.gguf")) if p.stat().st_size <= 300_000]
    assert files, f"no small .gguf fixtures under {FIXTURES}"
    return files


def big_fixtures() -> list[Path]:
    """One of each kind of the larger real files (f16 and quantized bases), used shrunk (same header)."""
    names = ["llama-gqa/base-f16.gguf", "llama-gqa/base-q4_0-mixed.gguf", "llama-gqa/base-q8_0.gguf",
             "gpt2-tiny/base-f16.gguf", "arch/phi3/base-f16.gguf", "arch/qwen3/base-f16.gguf"]
    return [fixture_path(n) for n in names]


skip_module_without_fixtures()

#: The fixture files used as inputs anywhere in this module, hashed once: every test must leave them unchanged.
INPUTS = [fixture_path("llama-gqa", "base-f16.gguf"), fixture_path("llama-gqa", "base-q4_0.gguf"),
          fixture_path("llama-gqa", "lora-r8", "ref-adapter-f32.gguf"), fixture_path("llama-gqa", "lora-qv-r4",
                                                                             "ref-adapter-f32.gguf")]
INPUT_HASHES = {p: sha256(p) for p in INPUTS}


@pytest.fixture(autouse=True)
def inputs_unchanged():
    yield
    for p, h in INPUT_HASHES.items():
        assert sha256(p) == h, f"{p} changed"


@contextlib.contextmanager
def watchdog(seconds: float = BATCH_SECONDS):
    """Kills the process with a stack dump if the block runs longer than ``seconds`` (a hang in native code
    cannot be interrupted from Python any other way)."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def read_everything(path: Path) -> int:
    """Opens ``path`` and reads every tensor (raw bytes; float values where the type is dequantizable)."""
    with ggml_lora.open(path) as f:
        _ = f.metadata
        for name, info in f.tensors.items():
            raw = f.raw(name)
            assert raw.size == info.nbytes
            if info.type in ("f32", "f16", "bf16", "q8_0", "q4_0"):
                assert f.to_numpy(name).shape == info.shape
        return len(f.tensors)


class Hostile:
    """Writes hostile variants to a folder and checks each one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.n = 0
        self.errors = 0
        self.opened = 0
        self.samples: list[tuple[str, bool]] = []

    def check(self, data: bytes, what: str, *, may_open: bool = False, must_open: bool = False) -> None:
        path = self.folder / f"case{self.n:06d}.gguf"
        self.n += 1
        path.write_bytes(data)
        try:
            read_everything(path)
        except ggml_lora.GGUFError as exc:
            assert isinstance(exc, ValueError)
            assert str(exc).strip(), f"{what}: empty message"
            assert not must_open, f"{what}: a valid file was refused: {exc}"
            self.errors += 1
            opened = False
        else:
            assert may_open or must_open, f"{what}: accepted a malformed file"
            self.opened += 1
            opened = True
        if self.n % 37 == 0 and len(self.samples) < 300:
            keep = self.folder / f"sample{len(self.samples):04d}.gguf"
            path.rename(keep)
            self.samples.append((str(keep), opened))
        else:
            path.unlink()

    def replay_samples_in_child(self) -> None:
        """The kept sample again, in a child process: it must exit normally (no abort, no signal)."""
        if not self.samples:
            return
        files = [p for p, _ in self.samples]
        proc = subprocess.run([sys.executable, str(CHILD), "open_all", json.dumps({"files": files})],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-2000:]}"
        result = json.loads(proc.stdout.strip().splitlines()[-1])["value"]
        assert result["error"] == sum(1 for _, ok in self.samples if not ok)
        assert result["ok"] == sum(1 for _, ok in self.samples if ok)
        count("hostile GGUF inputs replayed in a child process", len(files))


#: Tensor type ids ggml does not define (removed ones, the first free id, far-off values), from the package's own
#: type table so that new types do not turn these cases valid.
_KNOWN_IDS = {info.id for info in ggml_lora.GGML_TYPES.values()}
UNKNOWN_TYPE_IDS = [i for i in (4, 5, 31, 32, 33, 36, 37, 38, max(_KNOWN_IDS) + 1, 1000, 2**32 - 1)
                    if i not in _KNOWN_IDS]


def _put(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _boundaries(h: g.Header, limit: int = 600) -> list[int]:
    """Cut points: the start and the middle of every header field (array/string element fields subsampled)."""
    cuts = set()
    fields = h.fields
    if len(fields) > limit:
        step = len(fields) // limit + 1
        fields = [f for i, f in enumerate(fields) if "[" not in f.what or i % step == 0]
    for f in fields:
        cuts.add(f.offset)
        if f.size > 1:
            cuts.add(f.offset + f.size // 2)
            cuts.add(f.end - 1)
    cuts.add(h.infos_end)
    return sorted(cuts)


def hostile_variants(data: bytes, rng: random.Random):
    """Yields (bytes, description, may_open) for one valid GGUF file."""
    h = g.walk(data)
    data_end = max((h.data_offset + t.offset + g.tensor_nbytes(t.dims, t.type) for t in h.tensors
                    if t.type in g.GGML_BLOCKS), default=h.infos_end)
    # Truncation at every header field boundary (and inside each field).
    for cut in _boundaries(h):
        yield data[:cut], f"truncated at {cut}", False
    # Truncation at random points of the data: valid only if no tensor byte is cut (padding may go).
    if len(data) > h.data_offset:
        for _ in range(25):
            cut = rng.randrange(h.data_offset, len(data))
            yield data[:cut], f"data truncated at {cut}", cut >= data_end
    # Wrong magic / versions.
    for magic in (b"GGML", b"GGJT", b"\0\0\0\0", b"FUGG", b"gguf"):
        yield magic + data[4:], f"magic {magic!r}", False
    for version in (0, 1, 4, 99, 2**31, 0x03000000, 2**32 - 1):
        yield _put(data, 4, "<I", version), f"version {version}", False
    # Huge counts.
    for value in (2**64 - 1, 2**63, 2**40, h.n_tensors + 1 + 10**6):
        yield _put(data, 8, "<Q", value), f"tensor count {value}", False
        yield _put(data, 16, "<Q", value), f"kv count {value}", False
    # Huge string lengths, array counts, unknown value types.
    for key, vtype, key_len, vtype_field, start, end in h.kvs[:40]:
        for value in (2**64 - 1, 2**62, 2**30 + 1, len(data)):
            yield _put(data, key_len.offset, "<Q", value), f"key length {value} ({key})", False
        for bad in (13, 255, 2**31):
            yield _put(data, vtype_field.offset, "<I", bad), f"value type {bad} ({key})", False
        if vtype == 8:
            for value in (2**64 - 1, 2**40, len(data)):
                yield _put(data, start, "<Q", value), f"string length {value} ({key})", False
        if vtype == 9:
            for value in (2**64 - 1, 2**40, 2**30 + 1):
                yield _put(data, start + 4, "<Q", value), f"array count {value} ({key})", False
            yield _put(data, start, "<I", 77), f"array element type 77 ({key})", False
    # Tensor infos: huge/zero dims, n_dims, unknown types, misaligned / overlapping / out-of-file offsets.
    for i, t in enumerate(h.tensors[:30]):
        f = t.fields
        for value in (2**64 - 1, 2**63, 2**40, 2**32 + 1):
            yield _put(data, f["name_len"].offset, "<Q", value), f"tensor {i} name length {value}", False
            yield _put(data, f["dim0"].offset, "<Q", value), f"tensor {i} dim0 {value}", False
        yield _put(data, f["dim0"].offset, "<Q", 0), f"tensor {i} dim0 = 0", False
        for value in (0, 5, 2**31, 2**32 - 1):
            yield _put(data, f["n_dims"].offset, "<I", value), f"tensor {i} n_dims {value}", False
        for value in UNKNOWN_TYPE_IDS:
            yield _put(data, f["type"].offset, "<I", value), f"tensor {i} type {value}", False
        for delta in (1, 2, 8, 16, h.alignment - 1):
            yield _put(data, f["offset"].offset, "<Q", t.offset + delta), f"tensor {i} offset +{delta}", False
        if i > 0:
            prev = h.tensors[i - 1]
            yield _put(data, f["offset"].offset, "<Q", prev.offset), f"tensor {i} overlaps tensor {i - 1}", False
        for value in (len(data), 2**40, 2**63, 2**64 - 32):
            yield _put(data, f["offset"].offset, "<Q", value), f"tensor {i} offset {value}", False
    if h.tensors:
        # The last tensor's data ends past the file end (a dim doubled keeps offsets dense).
        last = h.tensors[-1]
        yield _put(data, last.fields["dim0"].offset, "<Q", last.dims[0] * 4096), "last tensor out of file", False
    # Duplicate key: an entry repeated.
    if h.kvs:
        key, _, key_len, _, _, end = h.kvs[0]
        entry = data[key_len.offset:end]
        dup = data[:end] + entry + data[end:]
        yield _put(dup, 16, "<Q", h.n_kv + 1), f"duplicate key {key}", False
    # Duplicate tensor name: rebuilt with tensor 1 named like tensor 0.
    if len(h.tensors) >= 2:
        kv_bytes = b"".join(data[k[2].offset:k[5]] for k in h.kvs)
        infos = [g.tensor_info(h.tensors[0].name if i == 1 else t.name, t.dims, t.type, t.offset)
                 for i, t in enumerate(h.tensors)]
        yield (g.build([kv_bytes], infos, data[h.data_offset:], n_kv=h.n_kv, alignment=h.alignment),
               "duplicate tensor name", False)
    # Alignment that is not a power of two / not UINT32.
    for payload, vtype in ((struct.pack("<I", 48), 4), (struct.pack("<I", 0), 4), (struct.pack("<Q", 32), 10)):
        extra = g.kv("general.alignment", vtype, payload)
        yield _put(data[:24] + extra + data[24:], 16, "<Q", h.n_kv + 1), f"alignment {payload.hex()}/{vtype}", False
    # Random byte flips: in the header they may or may not break it; in the data they never do.
    for _ in range(120):
        pos = rng.randrange(0, h.infos_end)
        b = bytearray(data)
        b[pos] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        yield bytes(b), f"header byte {pos} flipped", True
    if len(data) > h.data_offset:
        for _ in range(10):
            pos = rng.randrange(h.data_offset, len(data))
            b = bytearray(data)
            b[pos] ^= 0xFF
            yield bytes(b), f"data byte {pos} flipped", True


def _run_hostile(files: list[tuple[str, bytes]], folder: Path) -> Hostile:
    rng = random.Random(20240605)
    hostile = Hostile(folder)
    with watchdog():
        for tag, data in files:
            hostile.check(data, f"{tag}: unchanged", must_open=True)
            for variant, what, may_open in hostile_variants(data, rng):
                hostile.check(variant, f"{tag}: {what}", may_open=may_open)
    hostile.replay_samples_in_child()
    return hostile


def test_hostile_variants_of_small_fixtures(tmp_path: Path) -> None:
    files = [(p.relative_to(FIXTURES).as_posix(), p.read_bytes()) for p in small_fixtures()]
    hostile = _run_hostile(files, tmp_path)
    assert hostile.errors > 1000
    count("hostile GGUF inputs (in-process)", hostile.n)


def test_hostile_variants_of_shrunk_models(tmp_path: Path) -> None:
    """The larger fixtures keep their real headers (tokenizer arrays and all) with tensors cut to 2 rows."""
    files = [(p.relative_to(FIXTURES).as_posix() + " (shrunk)", g.shrink(p.read_bytes())) for p in big_fixtures()]
    hostile = _run_hostile(files, tmp_path)
    assert hostile.errors > 1000
    count("hostile GGUF inputs (in-process)", hostile.n)


def test_tiny_files_and_non_files(tmp_path: Path) -> None:
    cases = [b"", b"G", b"GGU", b"GGUF", b"GGUF\x03\0\0\0", b"GGUF\x03\0\0\0" + b"\0" * 15, b"\0" * 24, b"\xff" * 100]
    for i, data in enumerate(cases):
        path = tmp_path / f"tiny{i}.gguf"
        path.write_bytes(data)
        with pytest.raises(ggml_lora.GGUFError, match=r"\S"):
            ggml_lora.open(path)
        with pytest.raises(ggml_lora.GGUFError, match=r"\S"):
            ggml_lora.load_adapter(path)
    count("hostile GGUF inputs (in-process)", 2 * len(cases))
    with pytest.raises(FileNotFoundError):
        ggml_lora.open(tmp_path / "missing.gguf")
    with pytest.raises(OSError):
        ggml_lora.open(tmp_path)  # a directory


def test_hostile_adapters_are_refused_by_load_adapter(tmp_path: Path) -> None:
    """Adapter-level checks on real adapters with one thing broken: each a clear ValueError subclass."""
    src = fixture_path("llama-gqa", "lora-qv-r4", "ref-adapter-f32.gguf").read_bytes()
    h = g.walk(src)
    kv_by_key = {k[0]: k for k in h.kvs}
    cases = []
    # general.type = "model", adapter.type missing-ish ("LORA"), alpha of the wrong type / NaN.
    _, _, _, _, start, _ = kv_by_key["general.type"]
    assert src[start + 8:start + 15] == b"adapter"
    cases.append((src[:start + 8] + b"model!!" + src[start + 15:], "general.type"))
    _, _, _, vtype_field, start, _ = kv_by_key["adapter.lora.alpha"]
    cases.append((_put(src, start, "<f", float("nan")), "alpha"))
    cases.append((_put(src, start, "<f", float("inf")), "alpha"))
    cases.append((_put(src, vtype_field.offset, "<I", 4), "alpha"))  # UINT32 instead of FLOAT32
    # A lora_b renamed so that its lora_a has no partner; ranks that disagree.
    t_b = next(t for t in h.tensors if t.name.endswith(".lora_b"))
    name_at = t_b.fields["name_len"].offset + 8
    renamed = bytearray(src)
    renamed[name_at + len(t_b.name) - 1] = ord("c")  # ".lora_c"
    cases.append((bytes(renamed), "suffix"))
    t_a = next(t for t in h.tensors if t.name.endswith(".lora_a"))
    wrong_rank = _put(src, t_a.fields["dim1"].offset, "<Q", t_a.dims[1] // 2)
    wrong_rank = _put(wrong_rank, t_a.fields["dim0"].offset, "<Q", t_a.dims[0] * 2)  # same size, other rank
    cases.append((wrong_rank, "rank"))
    for i, (data, what) in enumerate(cases):
        path = tmp_path / f"adapter{i}.gguf"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=r"\S") as info:
            ggml_lora.load_adapter(path)
        assert isinstance(info.value, (ggml_lora.GGUFError, ggml_lora.PatchError)), (what, info.value)
    count("hostile adapter inputs (in-process)", len(cases))


HUGE_CLAIMS = [
    ("tensor count 2^62", g.build([], [], n_tensors=2**62)),
    ("kv count 2^40", g.build([], [], n_kv=2**40)),
    ("array of 2^40 strings", g.build([g.kv("a", 9, struct.pack("<IQ", 8, 2**40))], [])),
    ("array of 2^30 u64", g.build([g.kv("a", 9, struct.pack("<IQ", 10, 2**30))], [])),
    ("nested arrays of 2^40", g.build([g.kv("a", 9, struct.pack("<IQ", 9, 2**40) + struct.pack("<IQ", 9, 2**40))], [])),
    ("string of 2^40 bytes", g.build([g.kv("s", 8, struct.pack("<Q", 2**40))], [])),
    ("key of 2^30 bytes", g.build([struct.pack("<Q", 2**30) + b"k" * 20], [])),
    ("tensor of 2^60 f32", g.build([], [g.tensor_info("t", [2**30, 2**30], 0, 0)])),
    ("tensor name of 2^40 bytes", g.build([], [struct.pack("<Q", 2**40) + b"x" * 40])),
    ("4-D tensor dims 2^16 each", g.build([], [g.tensor_info("t", [2**16] * 4, 0, 0)])),
]


def test_hundred_byte_files_claiming_huge_counts_allocate_little(tmp_path: Path) -> None:
    files = []
    for i, (what, data) in enumerate(HUGE_CLAIMS):
        assert len(data) <= 128, (what, len(data))
        path = tmp_path / f"huge{i}.gguf"
        path.write_bytes(data)
        files.append(str(path))
    args = {"files": files * 20, "warmup": str(fixture_path("llama-gqa", "lora-qv-r4", "ref-adapter-f32.gguf"))}
    proc = subprocess.run([sys.executable, str(CHILD), "open_all", json.dumps(args)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])["value"]
    assert result["error"] == len(files) * 20 and result["ok"] == 0
    grown_mb = (result["rss_after_kb"] - result["rss_before_kb"]) / 1024
    assert grown_mb < 50, f"opening 100-byte files grew the peak RSS by {grown_mb:.1f} MB"
    count("hostile GGUF inputs (memory-measured child)", len(files) * 20)


def test_metadata_arrays_cannot_amplify_memory(tmp_path: Path) -> None:
    """A decoded array element takes 32 bytes: a 20 MB file holding one 20 M-element UINT8 array used to make
    the reader allocate ~640 MB. The reader now caps decoded metadata (512 MiB) and refuses such files before
    allocating; real vocabularies decode to tens of MB."""
    n = 20_000_000
    path = tmp_path / "amplify.gguf"
    path.write_bytes(g.build([g.kv("a", 9, struct.pack("<IQ", 0, n) + bytes(n))], []))
    args = {"files": [str(path)], "warmup": str(fixture_path("llama-gqa", "lora-qv-r4", "ref-adapter-f32.gguf"))}
    proc = subprocess.run([sys.executable, str(CHILD), "open_all", json.dumps(args)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])["value"]
    assert result["error"] == 1
    grown_mb = (result["rss_after_kb"] - result["rss_before_kb"]) / 1024
    assert grown_mb < 50, f"a 20 MB metadata array grew the peak RSS by {grown_mb:.1f} MB"
    with pytest.raises(ggml_lora.GGUFError, match="decoded metadata"):
        ggml_lora.open(path)
    count("hostile GGUF inputs (memory-measured child)", 1)


# ---------------------------------------------------------------------------------------------------------
# output safety

def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_MARKER in p.name or p.name.endswith(".tmp"))


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def run_child(action: str, args: dict, timeout: float = 300) -> dict:
    proc = subprocess.run([sys.executable, str(CHILD), action, json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"child {action} died ({proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture()
def model_inputs(tmp_path: Path) -> dict[str, Path]:
    """Private copies of a model, its f16 base and an adapter (so that even a buggy run cannot touch the
    shared fixtures), plus a folder for outputs."""
    d = tmp_path / "inputs"
    d.mkdir()
    out = {}
    for key, src in (("model", LLAMA / "base-q4_0.gguf"), ("base", LLAMA / "base-f16.gguf"),
                     ("adapter", LLAMA / "lora-r8" / "ref-adapter-f32.gguf")):
        out[key] = d / src.name
        shutil.copyfile(src, out[key])
    out["dir"] = tmp_path / "out"
    out["dir"].mkdir()
    return out


def nan_adapter(path: Path, source: Path) -> Path:
    """``source`` with NaN in the lora_a of its last pair: the patch fails midway, after writing has begun."""
    with ggml_lora.open(source) as f:
        tensors = {name: f.to_numpy(name).copy() for name in f.tensors}
        fields = dict(f.fields)
    last_a = [n for n in tensors if n.endswith(".lora_a")][-1]
    tensors[last_a][0, 0] = np.nan
    ggml_lora.write(path, fields, tensors)
    return path


def test_write_replaces_target_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.gguf"
    target.write_bytes(b"precious old content")
    before = snapshot(tmp_path)
    bad_cases = [
        ({"general.alignment": 48}, {"t": np.zeros(4, np.float32)}),
        ({}, {"x" * 64: np.zeros(4, np.float32)}),
        ({}, {"t": (np.zeros(17, np.uint8), "q4_0", (32,))}),
        ({}, {"t": (np.zeros(18, np.uint8), "q4_0", (33,))}),
        ({"k": object()}, {}),
        ({}, {"t": np.zeros(4, np.complex64)}),
    ]
    for metadata, tensors in bad_cases:
        with pytest.raises((ValueError, TypeError)):
            ggml_lora.write(target, metadata, tensors)
        assert snapshot(tmp_path) == before
    count("output faults injected", len(bad_cases))
    ggml_lora.write(target, {"general.architecture": "llama"}, {"t": np.ones((2, 32), np.float32)})
    assert read_everything(target) == 1
    assert leftovers(tmp_path) == []


def test_patch_replaces_target_only_on_success(model_inputs: dict[str, Path]) -> None:
    m, out_dir = model_inputs, model_inputs["dir"]
    target = out_dir / "merged.gguf"
    target.write_bytes(b"precious old content")
    inputs_before = snapshot(m["model"].parent)
    out_before = snapshot(out_dir)
    bad_adapter = nan_adapter(out_dir.parent / "nan-adapter.gguf", m["adapter"])
    failures = [
        (lambda: ggml_lora.patch(m["model"], bad_adapter, out=target), ValueError),
        (lambda: ggml_lora.patch(m["model"], LLAMA / "lora-r8" / "ref-adapter-f32.gguf",
                                 base=fixture_path("gpt2-tiny", "base-f16.gguf"), out=target), ggml_lora.PatchError),
        (lambda: ggml_lora.patch(fixture_path("gpt2-tiny", "base-f16.gguf"), m["adapter"], out=target),
         ggml_lora.PatchError),
        (lambda: ggml_lora.patch(m["model"], m["adapter"], out=target, out_type="iq2_xxs"), ggml_lora.PatchError),
    ]

    def stop_halfway(p: ggml_lora.PatchProgress) -> None:
        if p.bytes_done > p.bytes_total // 2:
            raise KeyboardInterrupt("user pressed Ctrl-C")

    for fn, exc in failures:
        with pytest.raises(exc, match=r"\S"):
            fn()
        assert snapshot(out_dir) == out_before and leftovers(out_dir) == []
    with pytest.raises(BaseException, match="Ctrl-C|interrupt"):
        ggml_lora.patch(m["model"], m["adapter"], out=target, progress=stop_halfway)
    assert snapshot(out_dir) == out_before and leftovers(out_dir) == []
    count("output faults injected", len(failures) + 1)

    result = ggml_lora.patch(m["model"], m["adapter"], base=m["base"], out=target)
    assert result.out == target and read_everything(target) > 0
    assert leftovers(out_dir) == []
    assert snapshot(m["model"].parent) == inputs_before


def test_patch_refuses_to_write_over_an_input(model_inputs: dict[str, Path]) -> None:
    m = model_inputs
    before = snapshot(m["model"].parent)
    link = m["dir"] / "link.gguf"
    link.symlink_to(m["model"])
    hard = m["dir"] / "hard.gguf"
    os.link(m["base"], hard)
    for out in (m["model"], m["adapter"], m["base"], link, hard, m["model"].parent / ".." / "inputs" / m["model"].name):
        with pytest.raises(ggml_lora.PatchError, match=r"\S"):
            ggml_lora.patch(m["model"], m["adapter"], base=m["base"], out=out)
        assert snapshot(m["model"].parent) == before
        assert leftovers(m["model"].parent) == [] and leftovers(m["dir"]) == []
    count("output faults injected", 6)


#: Linux ioctls of ``chattr`` (linux/fs.h; "long"-sized argument, of which the kernel uses an int).
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def _immutable(folder: Path, on: bool) -> None:
    """``chattr +i`` / ``-i`` on a folder: nothing can be created in an immutable folder, not even by root."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        flags = struct.unpack_from("=i", buf)[0]
        struct.pack_into("=i", buf, 0, flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL)
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, buf)
    finally:
        os.close(fd)


@contextlib.contextmanager
def unwritable_targets(tmp_path: Path):
    """Targets that cannot be created, each with the OSError it must raise: a missing folder, a 'folder' that
    is a regular file, a directory as the target, and a folder the process may not write to (PermissionError).
    Permission bits do not stop root (CI runs as root), so as root that folder is made immutable (``chattr +i``,
    which stops root too). Where the file system refuses the attribute the test fails with the reason: the
    permission case is never dropped quietly."""
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_bytes(b"x")
    (tmp_path / "a-dir.gguf").mkdir()
    ro = tmp_path / "read-only"
    ro.mkdir()
    targets: list[tuple[Path, type]] = [
        (tmp_path / "missing-folder" / "out.gguf", FileNotFoundError),
        (not_a_dir / "out.gguf", NotADirectoryError),
        (tmp_path / "a-dir.gguf", IsADirectoryError),
        (ro / "out.gguf", PermissionError),
    ]
    as_root = os.geteuid() == 0
    if as_root:
        try:
            _immutable(ro, True)
        except OSError as exc:
            pytest.fail(f"running as root, the permission-denied case needs an immutable folder (chattr +i), and "
                        f"the file system of {ro} refused it ({exc}); run the tests as another user or with "
                        "TMPDIR (pytest --basetemp) on ext4/xfs/btrfs")
    else:
        ro.chmod(0o555)
    try:
        yield targets
    finally:
        if as_root:
            _immutable(ro, False)
        else:
            ro.chmod(0o755)


def test_unwritable_folders(model_inputs: dict[str, Path], tmp_path: Path) -> None:
    m = model_inputs
    scratch = tmp_path / "unwritable"
    scratch.mkdir()
    with unwritable_targets(scratch) as targets:
        before = snapshot(scratch)
        for target, exc in targets:
            for fn in (lambda: ggml_lora.write(target, {}, {"t": np.zeros(4, np.float32)}),
                       lambda: ggml_lora.patch(m["model"], m["adapter"], out=target)):
                with pytest.raises(OSError) as info:
                    fn()
                # (a directory as the target is refused before any system call: a plain OSError naming it)
                assert isinstance(info.value, exc) or exc is IsADirectoryError, (target, info.value)
                assert str(target) in str(info.value) or target.name in str(info.value), info.value
                assert snapshot(scratch) == before and leftovers(scratch) == []
                assert not any(d.is_dir() and any(d.iterdir()) for d in scratch.iterdir())
                count("output faults injected")


def test_disk_full_mid_write(model_inputs: dict[str, Path]) -> None:
    """A child whose files may not exceed a few hundred KB (RLIMIT_FSIZE, SIGXFSZ ignored): write and patch fail
    with EFBIG, the existing target is untouched and the temporary file is gone."""
    import errno

    m, out_dir = model_inputs, model_inputs["dir"]
    target = out_dir / "out.gguf"
    target.write_bytes(b"precious old content")
    before = snapshot(out_dir)
    for limit in (100, 4096, 300_000):
        r = run_child("write", {"out": str(target), "limit": limit, "rows": 512, "n": 4})
        assert not r["ok"] and "OSError" in r["mro"] and r["errno"] == errno.EFBIG, r
        assert snapshot(out_dir) == before and leftovers(out_dir) == []
        r = run_child("patch", {"model": str(m["model"]), "adapter": str(m["adapter"]), "base": str(m["base"]),
                                "out": str(target), "limit": limit})
        assert not r["ok"] and "OSError" in r["mro"] and r["errno"] == errno.EFBIG, r
        assert snapshot(out_dir) == before and leftovers(out_dir) == []
        count("output faults injected", 2)
    # With room to spare the same child succeeds.
    r = run_child("patch", {"model": str(m["model"]), "adapter": str(m["adapter"]), "base": str(m["base"]),
                            "out": str(target), "limit": 10_000_000})
    assert r["ok"], r
    assert read_everything(target) > 0


# --- SIGKILL of a child patching a larger synthetic model -------------------------------------------------

N_LAYERS = 24
DIM = 4096
PATCHED = ["blk.3.attn_q.weight", "blk.11.attn_q.weight", "blk.19.attn_q.weight"]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ~230 MB q4_0 model (24 tensors of 4096x4096), an f16 base holding the patched tensors, and a GGUF
    LoRA adapter (rank 8) for three of them."""
    d = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(7)
    w = rng.standard_normal((DIM, DIM), dtype=np.float32) * np.float32(0.02)
    q = ggml_lora.quantize(w, "q4_0")
    model = {f"blk.{i}.attn_q.weight": (q, "q4_0", (DIM, DIM)) for i in range(N_LAYERS)}
    meta = {"general.architecture": "llama", "general.name": "fault-suite synthetic", "general.file_type": 2}
    paths = {"model": d / "big-q4_0.gguf", "base": d / "big-f16.gguf", "adapter": d / "big-lora.gguf"}
    ggml_lora.write(paths["model"], meta, model, sync=False)
    w16 = w.astype(np.float16)
    ggml_lora.write(paths["base"], meta, {name: w16 for name in PATCHED}, sync=False)
    r = 8
    adapter = {}
    for name in PATCHED:
        adapter[f"{name}.lora_a"] = rng.standard_normal((r, DIM), dtype=np.float32) * np.float32(0.01)
        adapter[f"{name}.lora_b"] = rng.standard_normal((DIM, r), dtype=np.float32) * np.float32(0.01)
    ggml_lora.write(paths["adapter"], {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 16.0,
                                       "general.architecture": "llama"}, adapter, sync=False)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [0.05, 0.5, 0.9])
def test_sigkill_mid_patch(big_model: dict[str, Path], tmp_path: Path, kill_at: float) -> None:
    """The child patches through the public ``progress`` callback, which, once ``kill_at`` of the output bytes
    are done, prints where it is and then blocks: the kill lands at that point whatever the machine's speed
    (no hook in the product). The 120 s wait for it is a liveness bound only."""
    hashes = {k: sha256(p) for k, p in big_model.items()}
    expected = big_model["model"].stat().st_size  # same types out as in: same size, give or take metadata
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "merged.gguf"
    args = {"model": str(big_model["model"]), "adapter": str(big_model["adapter"]), "base": str(big_model["base"]),
            "out": str(target), "threads": 1, "pause_at": kill_at}
    proc = subprocess.Popen([sys.executable, str(CHILD), "patch", json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "the child neither paused nor finished within 120 s (hung?)"
        line = proc.stdout.readline()  # type: ignore[union-attr]
        paused = json.loads(line).get("paused") if line.strip() else None
        assert paused is not None, f"the child did not pause: {line!r} {proc.stderr.read()[-2000:]!r}"  # type: ignore[union-attr]
        # paused inside the patch: the temporary output exists, the target does not
        assert kill_at * paused["bytes_total"] <= paused["bytes_done"] < paused["bytes_total"], paused
        temps = [p for p in out_dir.iterdir() if TEMP_MARKER in p.name]
        assert len(temps) == 1 and not target.exists(), list(out_dir.iterdir())
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    count("output faults injected")
    # Inputs byte-identical, no file at the target, only clearly-marked temporaries left.
    assert {k: sha256(p) for k, p in big_model.items()} == hashes
    assert not target.exists()
    left = list(out_dir.iterdir())
    assert all(TEMP_MARKER in p.name and p.name.startswith(".merged.gguf") for p in left), left
    # A new run in the same folder succeeds next to the leftover.
    r = ggml_lora.patch(big_model["model"], big_model["adapter"], base=big_model["base"], out=target, sync=False)
    assert r.out == target and target.stat().st_size == r.bytes_written and len(r.tensors) == len(PATCHED)
    assert abs(r.bytes_written - expected) < 4096
    assert {k: sha256(p) for k, p in big_model.items()} == hashes


# ---------------------------------------------------------------------------------------------------------
# convert (PEFT -> GGUF): output safety and hostile adapters

def _convert():
    try:
        from ggml_lora.convert import ConversionError, convert
    except ImportError as exc:  # the converter is part of the package: its absence is a failure, not a skip
        pytest.fail(f"ggml_lora.convert is missing: {exc}")
    return convert, ConversionError


@pytest.fixture()
def peft_dir(tmp_path: Path) -> Path:
    d = tmp_path / "peft"
    shutil.copytree(LLAMA / "lora-r8" / "adapter", d)
    return d


def test_convert_output_safety(peft_dir: Path, tmp_path: Path) -> None:
    convert, ConversionError = _convert()
    base = LLAMA / "base-f16.gguf"
    out_dir = tmp_path / "conv"
    out_dir.mkdir()
    target = out_dir / "adapter.gguf"
    target.write_bytes(b"precious old content")
    before = snapshot(out_dir)
    peft_before = snapshot(peft_dir)
    # A failing conversion (the config's rank disagrees with the tensors) leaves the old target.
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    broken = tmp_path / "broken"
    shutil.copytree(peft_dir, broken)
    (broken / "adapter_config.json").write_text(json.dumps({**cfg, "r": cfg["r"] * 2}))
    with pytest.raises(ConversionError, match=r"\S"):
        convert(broken, target, base=base)
    assert snapshot(out_dir) == before and leftovers(out_dir) == []
    # Disk full mid-write, in a child.
    import errno

    for fmt in ("gguf", "ggla"):
        for limit in (100, 50_000):
            r = run_child("convert", {"peft_dir": str(peft_dir), "out": str(target), "base": str(base),
                                      "limit": limit, "format": fmt})
            assert not r["ok"] and r["errno"] == errno.EFBIG, r
            assert snapshot(out_dir) == before and leftovers(out_dir) == []
    # Unwritable targets.
    scratch = tmp_path / "unwritable"
    scratch.mkdir()
    with unwritable_targets(scratch) as targets:
        for t, exc in targets:
            if t.is_dir():
                continue  # convert writes into an existing folder by design (its default file name)
            with pytest.raises(exc):
                convert(peft_dir, t, base=base)
    count("output faults injected", 1 + 4 + 3)
    # Success replaces the old target.
    assert convert(peft_dir, target, base=base) == target
    assert read_everything(target) > 0 and leftovers(out_dir) == []
    assert snapshot(peft_dir) == peft_before


def test_convert_refuses_to_write_over_an_input(peft_dir: Path, tmp_path: Path) -> None:
    """convert(out=<one of its inputs>) must be refused like patch's: the rename would replace the user's
    adapter weights, config or base model with the converted adapter. (Inputs here are private copies.)"""
    convert, ConversionError = _convert()
    base = tmp_path / "base-f16.gguf"
    shutil.copyfile(LLAMA / "base-f16.gguf", base)
    base_hash = sha256(base)
    peft_before = snapshot(peft_dir)
    for t in (peft_dir / "adapter_model.safetensors", peft_dir / "adapter_config.json", base):
        with pytest.raises((ConversionError, ValueError, OSError), match=r"\S"):
            convert(peft_dir, t, base=base)
        assert snapshot(peft_dir) == peft_before and sha256(base) == base_hash
    count("output faults injected", 3)


class _Exploit:
    """Pickles to a call of ``os.system`` creating a marker file: must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _torch_zip(pkl: bytes, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            z.writestr(f"archive/{name}", data)
    return buf.getvalue()


def hostile_bins(marker: Path) -> list[tuple[str, bytes]]:
    exploit = pickle.dumps(_Exploit(marker), protocol=2)
    state_with_exploit = pickle.dumps({"base_model.model.x.lora_A.weight": _Exploit(marker)}, protocol=2)
    eval_global = b"\x80\x02cbuiltins\neval\nX\x10\x00\x00\x00__import__('os')\x85R."
    popen = b"\x80\x02csubprocess\nPopen\n]X\x05\x00\x00\x00touchaX" + struct.pack("<I", len(str(marker))) + \
        str(marker).encode() + b"a\x85R."
    getattr_chain = b"\x80\x02cbuiltins\ngetattr\ncbuiltins\n__import__\nX\x02\x00\x00\x00os\x85RX\x06\x00\x00\x00system\x86R."
    return [
        ("plain pickle calling os.system", exploit),
        ("torch zip calling os.system", _torch_zip(exploit)),
        ("state dict holding an exploit", _torch_zip(state_with_exploit)),
        ("builtins.eval", _torch_zip(eval_global)),
        ("subprocess.Popen", _torch_zip(popen)),
        ("getattr chain", _torch_zip(getattr_chain)),
        ("truncated zip", _torch_zip(exploit)[:60]),
        ("empty file", b""),
        ("random bytes", bytes(random.Random(1).randrange(256) for _ in range(4096))),
        ("deeply nested lists", _torch_zip(b"\x80\x02" + b"]" * 100_000 + b"." )),
        ("pickle bomb (huge list repeat)", _torch_zip(b"\x80\x02]K\x01a" + b"2" * 64 + b".")),
    ]


def test_hostile_adapter_model_bin_is_refused_without_running_anything(tmp_path: Path) -> None:
    convert, ConversionError = _convert()
    marker = tmp_path / "PWNED"
    src = LLAMA / "lora-r8" / "adapter-bin"
    cases = hostile_bins(marker)
    with watchdog(120):
        for i, (what, data) in enumerate(cases):
            d = tmp_path / f"bin{i}"
            shutil.copytree(src, d)
            (d / "adapter_model.bin").write_bytes(data)
            out = tmp_path / f"out{i}.gguf"
            with pytest.raises(ConversionError, match=r"\S"):
                convert(d, out, base=LLAMA / "base-f16.gguf")
            assert not marker.exists(), f"{what}: the pickle ran code"
            assert not out.exists()
    count("hostile adapter inputs (in-process)", len(cases))


ABSURD_CONFIGS = [
    ("r = 0", {"r": 0}),
    ("r = -8", {"r": -8}),
    ("enormous r", {"r": 10**12}),
    ("r as a string", {"r": "8"}),
    ("r as a float", {"r": 8.5}),
    ("r = null", {"r": None}),
    ("negative alpha", {"lora_alpha": -16}),
    ("alpha NaN", {"lora_alpha": float("nan")}),
    ("alpha as a string", {"lora_alpha": "sixteen"}),
    ("alpha as a list", {"lora_alpha": [16]}),
    ("enormous alpha", {"lora_alpha": 1e300}),
    ("peft_type LOHA", {"peft_type": "LOHA"}),
    ("peft_type as a number", {"peft_type": 3}),
    ("DoRA", {"use_dora": True}),
    ("use_dora as a string", {"use_dora": "yes"}),
    ("rank_pattern of the wrong type", {"rank_pattern": [1, 2]}),
    ("rank_pattern with r = 0", {"rank_pattern": {"q_proj": 0}}),
    ("alpha_pattern negative", {"alpha_pattern": {"q_proj": -1}}),
    ("bias trained", {"bias": "all"}),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}),
]


def test_absurd_adapter_config_values_give_clear_errors(peft_dir: Path, tmp_path: Path) -> None:
    convert, ConversionError = _convert()
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    base = LLAMA / "base-f16.gguf"
    accepted = []
    for i, (what, change) in enumerate(ABSURD_CONFIGS):
        d = tmp_path / f"cfg{i}"
        shutil.copytree(peft_dir, d)
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        out = tmp_path / f"out{i}.gguf"
        try:
            convert(d, out, base=base)
        except ConversionError as exc:
            assert str(exc).strip(), what
            assert not out.exists(), what
        else:
            accepted.append(what)
    assert not accepted, f"absurd adapter_config.json values accepted: {accepted}"
    for i, text in enumerate(["", "{", "[]", "null", '"r"', json.dumps({"r": 8})[:-1], "\xff\xfe"]):
        d = tmp_path / f"bad{i}"
        shutil.copytree(peft_dir, d)
        (d / "adapter_config.json").write_text(text, errors="surrogateescape")
        with pytest.raises(ConversionError, match=r"\S"):
            convert(d, tmp_path / f"bad{i}.gguf", base=base)
    count("hostile adapter inputs (in-process)", len(ABSURD_CONFIGS) + 7)
    # Unknown keys are ignored (PEFT adds keys with every release); the result is the same adapter (only
    # general.name differs: it is the folder's name).
    d = tmp_path / "unknown-keys"
    shutil.copytree(peft_dir, d)
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "some_future_option": {"x": [1, 2]}, "zzz": None}))
    a = convert(peft_dir, tmp_path / "ref.gguf", base=base)
    b = convert(d, tmp_path / "unknown.gguf", base=base)
    with ggml_lora.open(a) as fa, ggml_lora.open(b) as fb:
        assert {k: v for k, v in fa.fields.items() if k != "general.name"} == {
            k: v for k, v in fb.fields.items() if k != "general.name"
        }
        assert list(fa.tensors) == list(fb.tensors)
        for name in fa.tensors:
            assert np.array_equal(fa.raw(name), fb.raw(name)), name


# ---------------------------------------------------------------------------------------------------------
# concurrency

def test_concurrent_patches_give_identical_bytes(model_inputs: dict[str, Path]) -> None:
    m, out_dir = model_inputs, model_inputs["dir"]
    ref = ggml_lora.patch(m["model"], m["adapter"], base=m["base"], out=out_dir / "single.gguf", sync=False).out
    expected = ref.read_bytes()

    def one(i: int) -> bytes:
        return ggml_lora.patch(m["model"], m["adapter"], base=m["base"], out=out_dir / f"thread{i}.gguf",
                               threads=1 + i % 2, sync=False).out.read_bytes()

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(one, range(6)))
    assert all(r == expected for r in results)
    procs = [subprocess.Popen([sys.executable, str(CHILD), "patch",
                               json.dumps({"model": str(m["model"]), "adapter": str(m["adapter"]),
                                           "base": str(m["base"]), "out": str(out_dir / f"proc{i}.gguf"),
                                           "sync": False})], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(3)]
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out.decode().strip().splitlines()[-1])["ok"]
        assert (out_dir / f"proc{i}.gguf").read_bytes() == expected
    # The same target from several threads at once: every run succeeds and the survivor is complete.
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(lambda _: ggml_lora.patch(m["model"], m["adapter"], base=m["base"],
                                                out=out_dir / "same.gguf", sync=False), range(3)))
    assert (out_dir / "same.gguf").read_bytes() == expected
    assert leftovers(out_dir) == []
    count("concurrent patches", 1 + 6 + 3 + 3)
