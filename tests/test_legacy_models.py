"""Legacy GGML / GGMF / GGJT llama models (issue 12, part 2): reading them, ``convert-model``, patching them.

Oracles: the legacy files are built here by a writer restated from the layouts in docs/FORMATS.md §4 (it never calls
ggml_lora); llama.cpp's own ``convert_llama_ggml_to_gguf.py`` (from the llama-cpp-python sdist, run with gguf-py
from PyPI: ``NO_LOCAL_GGUF``) converts the same files, and gguf-py's reader compares its output with ours tensor
for tensor and key for key; llama.cpp's loader (``llama-quantize``, built from the same sdist) loads our output.
A patch of a legacy model is compared with ggml_lora's patch of the script's GGUF of it (that GGUF path is
checked against llama.cpp in ``test_patch.py``): the property is that the container changes nothing.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import ggml_lora
from oracles.llama_tools import tool
from oracles.sdist import llama_cpp_source

MAGICS = {"ggml": 0x67676D6C, "ggmf": 0x67676D66, "ggjt": 0x67676A74}
#: ggml type ids and (block elements, block bytes, offset of the f16 scale fields to make sane) of the types
#: used here (ggml.h of the ggjt v3 era, unchanged in GGUF).
TYPES = {"f32": (0, 1, 4, ()), "f16": (1, 1, 2, ()), "q4_0": (2, 32, 18, (0,)), "q4_1": (3, 32, 20, (0, 2)),
         "q5_0": (6, 32, 22, (0,)), "q5_1": (7, 32, 24, (0, 2)), "q8_0": (8, 32, 34, (0,)),
         "q4_K": (12, 256, 144, (0, 2)), "q6_K": (14, 256, 210, (208,))}
FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q5_1": 9, "q8_0": 7, "q4_K_M": 15}


def tensor_bytes(type_name: str, n: int, rng: np.random.Generator) -> bytes:
    """Random data of ``n`` elements in ``type_name``, with small finite f16 scales in every block."""
    _, block, size, scales = TYPES[type_name]
    if type_name == "f32":
        return rng.standard_normal(n).astype("<f4").tobytes()
    if type_name == "f16":
        return (rng.standard_normal(n) * 0.1).astype("<f2").tobytes()
    blocks = np.frombuffer(rng.bytes(n // block * size), np.uint8).reshape(-1, size).copy()
    for at in scales:
        blocks[:, at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return blocks.tobytes()


def legacy_model(path: Path, container: str, version: int, *, n_embd: int = 64, n_ff: int = 128, n_head: int = 4,
                 n_kv_head: int | None = None, n_layer: int = 2, n_vocab: int = 300, ftype: int = 1,
                 types: dict[str, str] | None = None, seed: int = 0,
                 extra_tensors: list[tuple[str, list[int], int, bytes]] | None = None,
                 spec: dict[str, tuple[tuple[int, ...], str]] | None = None) -> Path:
    """A llama model in a legacy container (docs/FORMATS.md §4): magic, version (not for ggml), 7 × u32 hparams,
    the vocabulary (u32 length, bytes, f32 score except in ggml), then tensors (u32 n_dims, u32 name length, u32
    type, u32 ne[n_dims], name, data; ggjt pads the data to a 32-byte file offset). ``types`` maps a tensor
    kind (embd, attn, ffn_down, ffn, output) to a type name; norms are f32. ``spec`` receives each tensor's
    (ne, type name) under its legacy name."""
    rng = np.random.default_rng(seed)
    types = {"embd": "f16", "attn": "f16", "ffn": "f16", "ffn_down": "f16", "output": "f16", **(types or {})}
    kv = n_embd * (n_kv_head or n_head) // n_head
    out = bytearray(struct.pack("<I", MAGICS[container]))
    if container != "ggml":
        out += struct.pack("<I", version)
    out += struct.pack("<7I", n_vocab, n_embd, 256, n_head, n_layer, n_embd // n_head, ftype)
    vocab = [b"", b"", b""] + [bytes([i]) for i in range(256)] + [f" tok{i} x".encode() for i in range(n_vocab - 259)]
    vocab[5 + 256] = b""  # an empty token past the byte range: a control token for the converter
    for i, text in enumerate(vocab[:n_vocab]):
        out += struct.pack("<I", len(text)) + text
        if container != "ggml":
            out += struct.pack("<f", -float(i) / 7)
    specs: list[tuple[str, list[int], str]] = [("tok_embeddings.weight", [n_embd, n_vocab], types["embd"]),
                                               ("norm.weight", [n_embd], "f32"),
                                               ("output.weight", [n_embd, n_vocab], types["output"])]
    for b in range(n_layer):
        p = f"layers.{b}."
        specs += [(p + "attention.wq.weight", [n_embd, n_embd], types["attn"]),
                  (p + "attention.wk.weight", [n_embd, kv], types["attn"]),
                  (p + "attention.wv.weight", [n_embd, kv], types["attn"]),
                  (p + "attention.wo.weight", [n_embd, n_embd], types["attn"]),
                  (p + "feed_forward.w1.weight", [n_embd, n_ff], types["ffn"]),
                  (p + "feed_forward.w2.weight", [n_ff, n_embd], types["ffn_down"]),
                  (p + "feed_forward.w3.weight", [n_embd, n_ff], types["ffn"]),
                  (p + "attention_norm.weight", [n_embd], "f32"),
                  (p + "ffn_norm.weight", [n_embd], "f32")]
    tensors = [(name, dims, TYPES[t][0], tensor_bytes(t, int(np.prod(dims)), rng)) for name, dims, t in specs]
    if spec is not None:
        spec.update({name: (tuple(dims), t) for name, dims, t in specs})
    for name, dims, type_id, data in tensors + (extra_tensors or []):
        encoded = name.encode()
        out += struct.pack("<3I", len(dims), len(encoded), type_id) + struct.pack(f"<{len(dims)}I", *dims) + encoded
        if container == "ggjt":
            out += bytes(-len(out) % 32)
        out += data
    path.write_bytes(bytes(out))
    return path


#: Runs the script with gguf-py's byte-shape reading of raw tensors turned off (see ``llama_cpp_convert``).
_SHIM = """
import runpy, sys
import gguf.gguf_writer
gguf.gguf_writer.quant_shape_from_byte_shape = lambda shape, quant_type: tuple(shape)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_cpp_convert(src: Path, out: Path, *options: str, shim: bool = True) -> subprocess.CompletedProcess[str]:
    """llama.cpp's convert_llama_ggml_to_gguf.py on ``src`` (defaults: context 2048, eps 5e-6, gqa 1), with
    gguf-py from PyPI. The script hands gguf-py each tensor as raw bytes with its shape in elements; gguf-py
    >= 0.10 reads such a shape as a byte shape (``quant_shape_from_byte_shape``), so unshimmed the script fails
    on quantized files ("bytes per row is not a multiple of the type size") and writes f16/f32 tensors with
    ne[0] divided by the type size, a file llama.cpp refuses (shown below). With ``shim`` that one conversion is
    turned off, which restores what the script means; nothing else of it changes."""
    script = llama_cpp_source() / "convert_llama_ggml_to_gguf.py"
    env = dict(os.environ, NO_LOCAL_GGUF="1")
    args = [str(script), "--input", str(src), "--output", str(out), *options]
    cmd = [sys.executable, "-c", _SHIM, *args] if shim else [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


#: The GGUF names of the legacy tensors (gguf-py's TensorNameMap for llama, checked in the test below).
def gguf_name(legacy: str) -> str:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 8).get_name(legacy, try_suffixes=(".weight", ".bias"))


def gguf_contents(path: Path) -> tuple[dict[str, object], dict[str, tuple[tuple[int, ...], int, bytes]]]:
    reader = gguf.GGUFReader(path)
    fields = {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (tuple(int(d) for d in t.shape), int(t.tensor_type), bytes(np.asarray(t.data).tobytes()))
               for t in reader.tensors}
    return fields, tensors


CASES = {
    "ggjt-v3-f16": dict(container="ggjt", version=3, ftype=1),
    "ggjt-v3-q4_0": dict(container="ggjt", version=3, ftype=2,
                         types={"embd": "q4_0", "attn": "q4_0", "ffn": "q4_0", "ffn_down": "q4_0", "output": "q8_0"}),
    "ggjt-v3-q4_K_M": dict(container="ggjt", version=3, ftype=15, n_embd=256, n_ff=512,
                           types={"embd": "q4_K", "attn": "q4_K", "ffn": "q4_K", "ffn_down": "q6_K",
                                  "output": "q6_K"}),
    "ggjt-v2-q5_1": dict(container="ggjt", version=2, ftype=9,
                         types={"embd": "q5_1", "attn": "q5_1", "ffn": "q5_1", "ffn_down": "q5_1", "output": "f16"}),
    "ggjt-v1-f16": dict(container="ggjt", version=1, ftype=1),
    "ggmf-v1-f16": dict(container="ggmf", version=1, ftype=1),
    "ggml-f32": dict(container="ggml", version=1, ftype=0,
                     types={"embd": "f32", "attn": "f32", "ffn": "f32", "ffn_down": "f32", "output": "f32"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_model_matches_llama_cpps_converter(case: str, tmp_path: Path) -> None:
    """Same metadata (keys, types, values, order) and the same tensors (names, ne, types, bytes) as the script;
    the tensors are also those the test's writer put in the legacy file, under gguf-py's names."""
    spec: dict[str, tuple[tuple[int, ...], str]] = {}
    src = legacy_model(tmp_path / f"{case}.bin", spec=spec, **CASES[case])  # type: ignore[arg-type]
    proc = llama_cpp_convert(src, tmp_path / "ref.gguf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "ggml_lora", "convert-model", str(src), "-o",
                           str(tmp_path / "ours.gguf")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    our_fields, our_tensors = gguf_contents(tmp_path / "ours.gguf")
    ref_fields, ref_tensors = gguf_contents(tmp_path / "ref.gguf")
    assert list(our_tensors) == list(ref_tensors) == [gguf_name(n) for n in spec]
    for legacy, (ne, type_name) in spec.items():
        name = gguf_name(legacy)
        assert our_tensors[name] == ref_tensors[name], name
        assert our_tensors[name][:2] == (ne, TYPES[type_name][0]), name
    assert our_fields == ref_fields
    assert list(our_fields) == list(ref_fields)  # same key order too
    # The reader presents the same model without writing anything.
    with ggml_lora.open(src) as f:
        container, version = CASES[case]["container"], CASES[case]["version"]
        assert f.container == f"legacy {container} v{version}"
        assert list(f.tensors) == list(our_tensors)
        for name, (dims, _, data) in our_tensors.items():
            assert f.raw(name).tobytes() == data and f.tensors[name].dims == dims


def test_llama_cpp_loads_the_converted_model(tmp_path: Path) -> None:
    src = legacy_model(tmp_path / "m.bin", **CASES["ggjt-v3-q4_0"])  # type: ignore[arg-type]
    ggml_lora.convert_model(src, tmp_path / "m.gguf")
    # Unshimmed (see llama_cpp_convert), the script fails on this file, and its f16 output is refused by llama.cpp.
    failed = llama_cpp_convert(src, tmp_path / "ref.gguf", shim=False)
    assert failed.returncode != 0 and "is not a multiple of Q4_0 type size" in failed.stderr
    f16 = legacy_model(tmp_path / "f16.bin", **CASES["ggjt-v3-f16"])  # type: ignore[arg-type]
    assert llama_cpp_convert(f16, tmp_path / "ref.gguf", shim=False).returncode == 0
    refused = subprocess.run([str(tool("llama-quantize")), "--allow-requantize", str(tmp_path / "ref.gguf"),
                              str(tmp_path / "ref-q8.gguf"), "q8_0"], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "failed to load model" in refused.stdout + refused.stderr
    proc = subprocess.run([str(tool("llama-quantize")), "--allow-requantize", str(tmp_path / "m.gguf"),
                           str(tmp_path / "q8.gguf"), "q8_0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "general.architecture str              = llama" in log or "arch = llama" in log, log[-3000:]
    names = {t.name for t in gguf.GGUFReader(tmp_path / "q8.gguf").tensors}
    assert names == {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}


def test_grouped_query_attention_is_read_from_the_shapes(tmp_path: Path) -> None:
    """The script needs --gqa for LLaMA-2 70B; ggml-lora reads n_head_kv from attention.wk's shape. Oracle: the
    script run with the matching --gqa."""
    src = legacy_model(tmp_path / "gqa.bin", "ggjt", 3, n_head=8, n_kv_head=2, ftype=1)
    proc = llama_cpp_convert(src, tmp_path / "ref.gguf", "--gqa", "4", "--eps", "1e-5", "--context-length", "4096")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ggml_lora.convert_model(src, tmp_path / "ours.gguf", context_length=4096, rms_eps=1e-5)
    assert gguf_contents(tmp_path / "ours.gguf") == gguf_contents(tmp_path / "ref.gguf")
    assert gguf.GGUFReader(tmp_path / "ours.gguf").fields["llama.attention.head_count_kv"].contents() == 2


def lora_adapter(path: Path, n_embd: int, rank: int = 4, seed: int = 1) -> Path:
    """A llama.cpp GGUF LoRA adapter on blk.0.attn_q and blk.1.ffn_down (gguf-py's writer)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    for name, rows, cols in (("blk.0.attn_q.weight", n_embd, n_embd), ("blk.1.ffn_down.weight", n_embd, 2 * n_embd)):
        w.add_tensor(name + ".lora_a", (rng.standard_normal((rank, cols)) * 0.1).astype(np.float32))
        w.add_tensor(name + ".lora_b", (rng.standard_normal((rows, rank)) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("case", ["ggjt-v3-q4_0", "ggjt-v2-q5_1", "ggml-f32"])
def test_patching_a_legacy_model_equals_patching_its_gguf(case: str, tmp_path: Path) -> None:
    src = legacy_model(tmp_path / "m.bin", **CASES[case])  # type: ignore[arg-type]
    assert llama_cpp_convert(src, tmp_path / "ref.gguf").returncode == 0
    adapter = lora_adapter(tmp_path / "a.gguf", 64)
    ours = ggml_lora.patch(src, adapter, out=tmp_path / "from-legacy.gguf")
    reference = ggml_lora.patch(tmp_path / "ref.gguf", adapter, out=tmp_path / "from-gguf.gguf")
    ours_fields, ours_tensors = gguf_contents(ours.out)
    ref_fields, ref_tensors = gguf_contents(reference.out)
    assert ours_tensors == ref_tensors
    assert ours_fields == ref_fields
    assert [t.name for t in ours.tensors] == ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]


def test_a_legacy_f16_model_as_lora_base(tmp_path: Path) -> None:
    q = legacy_model(tmp_path / "q.bin", **CASES["ggjt-v3-q4_0"])  # type: ignore[arg-type]
    f16 = legacy_model(tmp_path / "f16.bin", "ggjt", 1, ftype=1, seed=7)
    assert llama_cpp_convert(f16, tmp_path / "f16.gguf").returncode == 0
    adapter = lora_adapter(tmp_path / "a.gguf", 64)
    ours = ggml_lora.patch(q, adapter, base=f16, out=tmp_path / "a-out.gguf")
    reference = ggml_lora.patch(q, adapter, base=tmp_path / "f16.gguf", out=tmp_path / "b-out.gguf")
    assert gguf_contents(ours.out)[1] == gguf_contents(reference.out)[1]
    assert all(t.from_base for t in ours.tensors)


# ---------------------------------------------------------------------------------------------------------
# layouts that changed and hostile files: a GGUFError naming the problem, one CLI line, nothing written


def refuse(src: Path, match: str, tmp_path: Path) -> None:
    before = src.read_bytes()
    with pytest.raises(ggml_lora.GGUFError, match=match):
        ggml_lora.open(src)
    out = tmp_path / "out.gguf"
    for args in (["convert-model", str(src), "-o", str(out)], ["info", str(src)],
                 ["patch", "-m", str(src), "--lora", str(lora_adapter(tmp_path / "a.gguf", 64)), "-o", str(out)]):
        done = subprocess.run([sys.executable, "-m", "ggml_lora", *args], capture_output=True, text=True, timeout=60)
        lines = done.stderr.splitlines()
        assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("ggml-lora: error: "), done.stderr
        assert re.search(match, lines[0]), (match, lines[0])
    assert not out.exists() and src.read_bytes() == before


@pytest.mark.parametrize("container, version, type_name, changed", [
    ("ggjt", 2, "q4_0", "ggjt v3"), ("ggjt", 2, "q8_0", "ggjt v3"), ("ggjt", 1, "q5_0", "ggjt v2"),
    ("ggjt", 1, "q4_1", "ggjt v3"), ("ggmf", 1, "q8_0", "ggjt v3"), ("ggml", 1, "q4_0", "ggjt v3"),
    ("ggjt", 2, "q4_K", "ggjt v3"),
])
def test_quantized_layouts_that_changed_are_refused(container: str, version: int, type_name: str, changed: str,
                                                    tmp_path: Path) -> None:
    kinds = {"embd": type_name, "attn": type_name, "ffn": type_name, "ffn_down": type_name, "output": "f16"}
    n = 256 if type_name.endswith("K") else 64
    src = legacy_model(tmp_path / "old.bin", container, version, ftype=1, types=kinds, n_embd=n, n_ff=2 * n)
    refuse(src, rf"(?i)tensor \"tok_embeddings\.weight\" is {type_name} in a {container} v{version} file.*changed in "
                rf"{changed}.*convert the model again", tmp_path)
    # llama.cpp's converter refuses these files too (by the file type it checks; here an ftype that says so).
    ftype = {"q4_0": 2, "q8_0": 7, "q5_0": 8, "q4_1": 3, "q4_K": 15}[type_name]
    old = legacy_model(tmp_path / "old2.bin", container, version, ftype=ftype, types=kinds, n_embd=n, n_ff=2 * n)
    if not (container == "ggjt" and version == 2 and type_name == "q4_K"):
        proc = llama_cpp_convert(old, tmp_path / "ref.gguf")
        assert proc.returncode != 0 and "not eligible for conversion" in proc.stderr, proc.stderr[-1000:]


def _header(container: str = "ggjt", version: int = 3, n_vocab: int = 1, ftype: int = 1) -> bytearray:
    out = bytearray(struct.pack("<I", MAGICS[container]))
    if container != "ggml":
        out += struct.pack("<I", version)
    return out + struct.pack("<7I", n_vocab, 64, 256, 4, 1, 16, ftype)


def _tensor(name: bytes, dims: list[int], type_id: int = 0, data: bytes | None = None, n_dims: int | None = None,
            offset: int = 0) -> bytes:
    head = struct.pack("<3I", len(dims) if n_dims is None else n_dims, len(name), type_id)
    head += struct.pack(f"<{len(dims)}I", *dims) + name
    pad = bytes(-(offset + len(head)) % 32)
    return head + pad + (data if data is not None else bytes(4 * int(np.prod(dims))))


VOCAB = struct.pack("<I", 1) + b"a" + struct.pack("<f", 0.0)


def _with_tensors(*tensors: tuple) -> bytes:
    out = _header() + VOCAB
    for t in tensors:
        out += _tensor(*t, offset=len(out))  # type: ignore[misc]
    return bytes(out)


HOSTILE = {
    "truncated-hparams": (bytes(_header())[:20], r"file ends inside hyperparameter"),
    "ggjt-v4": (bytes(_header(version=4)), r"unsupported version 4"),
    "ggmf-v2": (bytes(_header("ggmf", 2)), r"unsupported version 2 \(ggmf has only v1\)"),
    "unknown-ftype": (bytes(_header(ftype=5)) + VOCAB, r"unknown file type \(ftype\) 5"),
    "huge-vocab": (bytes(_header(n_vocab=0xFFFFFFFF)), r"vocabulary size n_vocab is 4294967295, more than the limit"),
    "long-token": (bytes(_header()) + struct.pack("<I", 5000) + b"x" * 5000,
                   r"length of vocabulary item 0 is 5000, more than the limit 4095"),
    "truncated-vocab": (bytes(_header(n_vocab=2)) + VOCAB, r"vocabulary size n_vocab is 2, more than the limit 1"),
    "zero-dims": (_with_tensors((b"norm.weight", [], 0, b"")), r"tensor 0.*dimensions|n_dims|dimension"),
    "five-dims": (_with_tensors((b"norm.weight", [1, 1, 1, 1, 1])), r"dimension"),
    "truncated-token": (bytes(_header()) + struct.pack("<I", 10) + b"abcdefg", r"file ends inside vocabulary item 0"),
    "unknown-type": (_with_tensors((b"norm.weight", [64], 99)), r"tensor \"norm\.weight\" has unknown ggml type id 99"),
    "data-beyond-eof": (_with_tensors((b"norm.weight", [64], 0, b"\0" * 10)), r"beyond the end of the file"),
    "zero-dim": (_with_tensors((b"norm.weight", [64, 0])), r"size 0|zero"),
    "row-not-block-multiple": (_with_tensors((b"norm.weight", [33], 2, b"\0" * 18)), r"not a multiple"),
    "duplicate-tensor": (_with_tensors((b"norm.weight", [64]), (b"norm.weight", [64])), r"duplicate tensor"),
    "unknown-name": (_with_tensors((b"layers.0.attention.wq.weight", [64, 64]), (b"mystery.weight", [64])),
                     r"tensor \"mystery\.weight\" has no GGUF name"),
    "block-beyond-n_layer": (_with_tensors((b"layers.1.ffn_norm.weight", [64])), r"N < n_layer = 1"),
    "no-feed-forward": (_with_tensors((b"norm.weight", [64])), r"feed-forward width cannot be read"),
    "name-not-utf8": (_with_tensors((b"\xff\xfe", [64])), r"not valid UTF-8"),
    "huge-name-length": (bytes(_header()) + VOCAB + struct.pack("<3I", 1, 0xFFFFFFF0, 0),
                         r"name length of tensor 0 is 4294967280, more than the limit 4095"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_legacy_files_are_refused(case: str, tmp_path: Path) -> None:
    data, match = HOSTILE[case]
    src = tmp_path / f"{case}.bin"
    src.write_bytes(data)
    refuse(src, match, tmp_path)
