"""The types this project reads but does not write: the i-quants (iq1_s, iq1_m, iq2_xxs, iq2_xs, iq2_s, iq3_xxs,
iq3_s, iq4_nl, iq4_xs), the ternary tq1_0/tq2_0, the fp4 formats mxfp4/nvfp4, and q1_0/q2_0.

Oracles, never ggml_lora itself:
- ggml's C code (``tests/oracles/ggml_quants.py``: ``dequantize_row_<type>``, and ``quantize_<type>`` to make
  realistic blocks): every dequantized value must be bit-identical, NaN payloads and signs included;
- gguf-py 0.19.0 (``gguf.quants.dequantize``) for the types it has (all but q1_0 and q2_0). gguf-py multiplies by
  ``-1.0`` where the compiled C flips the sign bit, so a NaN scale comes out of gguf-py with the other sign: against
  gguf-py the non-NaN values must be bit-identical and the NaNs in the same places.

Limits of the oracle, not of this project: ggml's i-quant quantizers abort (``GGML_ASSERT``) on rows with values
beyond ~1e15, and iq3_s's on blocks of subnormals, so the blocks made by the oracle's quantizer stay within those
ranges for the types concerned; the random-byte tests cover every scale, including NaN and infinite ones.
"""

from __future__ import annotations

import importlib.util
import re
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ggml_lora
from conftest import write_with_gguf_py
from oracles import ggml_quants as oracle

REPO = Path(__file__).resolve().parent.parent

#: The read-only types, each with the byte offset of its f16 scale (None: no plain f16 scale field).
READ_ONLY = {
    "iq1_s": 0, "iq1_m": None, "iq2_xxs": 0, "iq2_xs": 0, "iq2_s": 0, "iq3_xxs": 0, "iq3_s": 0, "iq4_nl": 0,
    "iq4_xs": 0, "tq1_0": 52, "tq2_0": 64, "mxfp4": None, "nvfp4": None, "q1_0": 0, "q2_0": 0,
}
TYPES = list(READ_ONLY)
#: gguf-py 0.19.0 has no dequantizer for these (q1_0) or does not know the type at all (q2_0).
NOT_IN_GGUF_PY = {"q1_0", "q2_0"}
#: Types whose ggml quantizer is an iterative search that aborts on huge values (see the module docs).
SEARCHING_QUANTIZERS = {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"}
#: Types whose ggml quantizer takes an importance matrix (the others ignore one).
TAKES_IMATRIX = SEARCHING_QUANTIZERS | {"iq4_nl"}

HYPO = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: f16 scale patterns worth a test of their own: infinities, quiet and signalling NaNs with payloads, zeros,
#: subnormals, the largest finite.
SPECIAL_F16 = [0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0x7DFF, 0xFD55, 0xFFFF, 0x0000, 0x8000, 0x0001, 0x83FF,
               0x7BFF, 0xFBFF, 0x3C00]


def sizes(t: str) -> tuple[int, int]:
    return ggml_lora.GGML_QUANT_SIZES[t]


def ours(raw: bytes | np.ndarray, t: str, n: int) -> np.ndarray:
    return ggml_lora.dequantize(np.frombuffer(bytes(raw), dtype=np.uint8), t, (n,))


def assert_same_bits(a: np.ndarray, b: np.ndarray, what: str) -> None:
    bad = np.nonzero(a.view(np.uint32) != b.view(np.uint32))[0]
    assert bad.size == 0, f"{what}: {bad.size} values differ, first at {bad[0]}: {a[bad[0]]!r} vs {b[bad[0]]!r} " \
                          f"(bits {a.view(np.uint32)[bad[0]]:#010x} vs {b.view(np.uint32)[bad[0]]:#010x})"


def gguf_py(raw: bytes | np.ndarray, t: str, n: int) -> np.ndarray:
    rows = np.frombuffer(bytes(raw), dtype=np.uint8).reshape(1, -1)
    with np.errstate(all="ignore"):
        out = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[t.upper()])
    return np.asarray(out, dtype=np.float32).reshape(n)


def check_dequantize(raw: bytes | np.ndarray, t: str, n: int) -> None:
    """Our dequantize of ``raw`` equals the C oracle bit for bit, and gguf-py where it has the type."""
    mine = ours(raw, t, n)
    assert_same_bits(mine, oracle.dequantize(bytes(raw), t, n), f"{t} vs C")
    if t not in NOT_IN_GGUF_PY:
        theirs = gguf_py(raw, t, n)
        nan = np.isnan(mine)
        assert np.array_equal(nan, np.isnan(theirs)), f"{t}: NaNs at other places than gguf-py's"
        assert_same_bits(mine[~nan], theirs[~nan], f"{t} vs gguf-py")


# ---------------------------------------------------------------------------------------------------------
# the tables and the type table


def test_the_iq_tables_file_is_generated_from_ggml_common_h() -> None:
    """iq_tables.rs is exactly what scripts/gen_iq_tables.py makes from the oracle's ggml-common.h: the grids and
    value tables are ggml's, not hand-copied."""
    spec = importlib.util.spec_from_file_location("gen_iq_tables", REPO / "scripts" / "gen_iq_tables.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    header = oracle.llama_cpp_source() / "ggml" / "src" / "ggml-common.h"
    assert gen.render(header.read_text()) == gen.OUTPUT.read_text()


def test_read_only_types_in_the_type_table() -> None:
    for t in TYPES:
        info = ggml_lora.type_info(t)
        assert info.can_dequantize and not info.can_quantize, t
        assert info.id == oracle.type_id(t)
    # q2_0 is newer than gguf-py 0.19.0: id and sizes from ggml.h / ggml-common.h, checked against the C sizeof.
    assert "Q2_0" not in gguf.GGMLQuantizationType.__members__
    q2 = ggml_lora.type_info("q2_0")
    assert (q2.id, q2.block_size, q2.type_size) == oracle.EXTRA_TYPES["q2_0"]
    assert q2.type_size == oracle.block_bytes_in_c("q2_0")
    assert ggml_lora.type_info(42) == q2


@pytest.mark.parametrize("t", TYPES)
def test_quantizing_to_a_read_only_type_is_refused(t: str) -> None:
    with pytest.raises(ValueError, match=f"quantizing to {t} is not supported"):
        ggml_lora.quantize(np.zeros(sizes(t)[0], dtype=np.float32), t)


@pytest.mark.parametrize("t", TYPES)
def test_row_length_and_byte_count_errors(t: str) -> None:
    block, size = sizes(t)
    with pytest.raises(ValueError, match="multiple of its block size"):
        ggml_lora.dequantize(np.zeros(size, dtype=np.uint8), t, (block // 2,))
    with pytest.raises(ValueError, match="multiple of its block size"):
        ggml_lora.dequantize(np.zeros(3 * size, dtype=np.uint8), t, (block * 3 + 1,))
    with pytest.raises(ValueError, match=f"{2 * size} bytes"):
        ggml_lora.dequantize(np.zeros(2 * size - 1, dtype=np.uint8), t, (2, block))
    assert ggml_lora.dequantize(np.zeros(0, dtype=np.uint8), t, (0, block)).shape == (0, block)


# ---------------------------------------------------------------------------------------------------------
# (a) blocks made by ggml's own quantizer


KINDS = ["normal", "mixed_scales", "zeros", "neg_zeros", "constant", "ties", "one_hot", "sparse", "tiny",
         "subnormal", "large", "huge", "uniform_signs"]


def make_rows(kind: str, seed: int, rows: int, n: int, t: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.float32(10.0 ** rng.uniform(-6, 4))
    if kind == "normal":
        x = rng.standard_normal((rows, n)) * scale
    elif kind == "mixed_scales":  # every block of 32 at its own magnitude
        x = rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-8, 5, (rows, n // 32, 1)).repeat(32, 1).reshape(
            rows, n)
    elif kind == "zeros":
        x = np.zeros((rows, n))
    elif kind == "neg_zeros":
        x = np.full((rows, n), -0.0)
        x[:, ::7] = 0.0
    elif kind == "constant":
        x = np.full((rows, n), rng.choice([-1.0, 1.0]) * scale)
    elif kind == "ties":  # halves and quarters: values on rounding boundaries
        x = rng.integers(-16, 17, (rows, n)) * 0.25
    elif kind == "one_hot":
        x = np.zeros((rows, n))
        x[np.arange(rows), rng.integers(0, n, rows)] = rng.choice([-1.0, 1.0], rows) * scale
    elif kind == "sparse":
        x = rng.standard_normal((rows, n)) * scale * (rng.random((rows, n)) < 0.03)
    elif kind == "tiny":
        x = rng.standard_normal((rows, n)) * 1e-30
    elif kind == "subnormal":
        x = rng.standard_normal((rows, n)) * (1e-40 if t != "iq3_s" else 1e-35)
    elif kind == "large":
        x = rng.standard_normal((rows, n)) * 1e6
    elif kind == "huge":  # the searching quantizers abort here (module docs): they get large values instead
        x = rng.standard_normal((rows, n)) * (1e30 if t not in SEARCHING_QUANTIZERS else 1e9)
    else:  # uniform_signs
        x = rng.choice([-1.0, 1.0], (rows, n)) * rng.uniform(0.5, 1.0, (rows, n)) * scale
    return np.asarray(x, dtype=np.float32)


@pytest.mark.parametrize("t", TYPES)
@HYPO
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 3),
       blocks=st.integers(1, 3), weighted=st.booleans())
def test_dequantize_of_ggml_quantized_blocks(t: str, kind: str, seed: int, rows: int, blocks: int,
                                             weighted: bool) -> None:
    n = 256 * blocks  # a multiple of every block size here
    x = make_rows(kind, seed, rows, n, t)
    imatrix = None
    if weighted and t in TAKES_IMATRIX:
        rng = np.random.default_rng(seed + 1)
        imatrix = rng.uniform(0, 3, n).astype(np.float32) * (rng.random(n) < 0.9)  # zeros included
        imatrix[rng.random(n) < 0.05] = 1e-30
    raw = oracle.quantize(x, t, imatrix=imatrix)
    check_dequantize(raw, t, rows * n)
    # the same bytes as a 2-D array of rows
    per_row = oracle.row_bytes(t, n)
    two_d = ggml_lora.dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(rows, per_row), t, (rows, n))
    assert_same_bits(two_d.reshape(-1), ours(raw, t, rows * n), f"{t} 2-D")


@pytest.mark.parametrize("t", TYPES)
def test_dequantize_of_a_large_ggml_quantized_matrix(t: str) -> None:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 1024)) * np.exp(rng.uniform(-6, 6, (64, 1)))).astype(np.float32)
    raw = oracle.quantize(x, t)
    check_dequantize(raw, t, x.size)


# ---------------------------------------------------------------------------------------------------------
# (b) any bytes


def random_blocks(t: str, count: int, seed: int) -> bytearray:
    """``count`` random blocks, a quarter of them with a special f16 scale (or every E8M0 / UE4M3 scale byte)."""
    block, size = sizes(t)
    rng = np.random.default_rng(seed)
    raw = bytearray(rng.integers(0, 256, count * size, dtype=np.uint8).tobytes())
    at = READ_ONLY[t]
    for i in range(0, count, 4):
        special = SPECIAL_F16[(i // 4) % len(SPECIAL_F16)]
        if at is not None:
            raw[i * size + at:i * size + at + 2] = struct.pack("<H", special)
        elif t == "iq1_m":  # the f16 scale's four nibbles sit in the top nibbles of the four scale words
            for k in range(4):
                hi = i * size + 48 + 2 * k + 1
                raw[hi] = (raw[hi] & 0x0F) | ((special >> (4 * k)) & 0xF) << 4
    return raw


@pytest.mark.parametrize("t", TYPES)
def test_dequantize_of_random_bytes_with_special_scales(t: str) -> None:
    block, _ = sizes(t)
    count = 4096 * 32 // block  # 131072 values per type
    raw = random_blocks(t, count, seed=sum(map(ord, t)))
    check_dequantize(raw, t, count * block)


@pytest.mark.parametrize("t", TYPES)
@HYPO
@given(data=st.data())
def test_dequantize_of_any_bytes(t: str, data: st.DataObject) -> None:
    block, size = sizes(t)
    blocks = data.draw(st.integers(1, 4), label="blocks")
    raw = bytearray(data.draw(st.binary(min_size=blocks * size, max_size=blocks * size), label="bytes"))
    at = READ_ONLY[t]
    if at is not None and data.draw(st.booleans(), label="special scale"):
        raw[at:at + 2] = struct.pack("<H", data.draw(st.sampled_from(SPECIAL_F16), label="scale"))
    check_dequantize(raw, t, blocks * block)


@pytest.mark.parametrize("t", ["mxfp4", "nvfp4"])
def test_every_fp4_scale_byte(t: str) -> None:
    """All 256 E8M0 (mxfp4) and UE4M3 (nvfp4) scale bytes, each with every code."""
    block, size = sizes(t)
    codes = bytes(range(256))
    raw = bytearray()
    for scale in range(256):
        if t == "mxfp4":  # 16 code bytes per block: 16 blocks cover the 256 code pairs
            for k in range(16):
                raw += bytes([scale]) + codes[16 * k:16 * k + 16]
        else:  # 4 scale bytes, then 32 code bytes per block: 8 blocks
            for k in range(8):
                raw += bytes([scale, scale ^ 0x80, scale ^ 0x7F, 0x7F]) + codes[32 * k:32 * k + 32]
    check_dequantize(raw, t, len(raw) // size * block)


# ---------------------------------------------------------------------------------------------------------
# files holding these types


def _retype_to_q2_0(path: Path, name: str) -> None:
    """gguf-py cannot write q2_0 (id 42): turn the q1_0 tensor ``name`` (2-D) into q2_0 in place. Both have
    18-byte blocks; q2_0's hold 64 values instead of 128, so the row length halves and the data is unchanged."""
    data = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    n_dims, ne0 = struct.unpack_from("<IQ", data, at)
    assert n_dims == 2
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_at)[0] == int(gguf.GGMLQuantizationType.Q1_0)
    struct.pack_into("<Q", data, at + 4, ne0 // 2)
    struct.pack_into("<I", data, type_at, 42)
    path.write_bytes(bytes(data))


def test_open_and_to_numpy_read_every_read_only_type(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3, 512)) * 0.05).astype(np.float32)
    made = {t: oracle.quantize(x, t) for t in TYPES}
    tensors = {}
    for t, raw in made.items():
        data = np.frombuffer(raw, dtype=np.uint8).reshape(3, -1)
        if t == "q2_0":
            tensors["t.q2_0"] = (data, gguf.GGMLQuantizationType.Q1_0)  # retyped below
        else:
            tensors[f"t.{t}"] = (data, gguf.GGMLQuantizationType[t.upper()])
    tensors["norm"] = (np.arange(512, dtype=np.float32), gguf.GGMLQuantizationType.F32)
    path = write_with_gguf_py(tmp_path / "all.gguf", tensors)
    _retype_to_q2_0(path, "t.q2_0")
    with ggml_lora.open(path) as f:
        for t, raw in made.items():
            info = f.tensors[f"t.{t}"]
            assert (info.type, info.shape, info.nbytes) == (t, (3, 512), len(raw))
            assert bytes(f.raw(f"t.{t}")) == raw
            values = f.to_numpy(f"t.{t}")
            assert values.shape == (3, 512) and values.dtype == np.float32
            assert_same_bits(values.reshape(-1), oracle.dequantize(raw, t, x.size), f"{t} to_numpy")
        assert np.array_equal(f.to_numpy("norm"), np.arange(512, dtype=np.float32))


# ---------------------------------------------------------------------------------------------------------
# patching a model of a read-only type


def _adapter(path: Path, targets: dict[str, tuple[int, int]], rank: int = 4, seed: int = 3) -> Path:
    """A llama.cpp LoRA GGUF (docs/FORMATS.md §2): general.type adapter, adapter.type lora, adapter.lora.alpha, and
    ``<target>.lora_a`` (numpy shape (rank, n_in)) / ``.lora_b`` ((n_out, rank)) in f32."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (n_out, n_in) in targets.items():
        tensors[f"{name}.lora_a"] = ((rng.standard_normal((rank, n_in)) * 0.1).astype(np.float32),
                                     gguf.GGMLQuantizationType.F32)
        tensors[f"{name}.lora_b"] = ((rng.standard_normal((n_out, rank)) * 0.1).astype(np.float32),
                                     gguf.GGMLQuantizationType.F32)
    metadata: dict[str, str | float] = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0}
    return write_with_gguf_py(path, tensors, metadata)


def _lora_delta(adapter: Path, name: str) -> np.ndarray:
    reader = gguf.GGUFReader(adapter)
    t = {x.name: np.asarray(x.data, dtype=np.float64) for x in reader.tensors}
    a, b = t[f"{name}.lora_a"], t[f"{name}.lora_b"]
    return 8.0 / b.shape[1] * (b @ a)


@pytest.fixture
def iq4_nl_model(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A small iq4_nl model (plus one iq3_s tensor and an f32 norm) made of oracle bytes, and an adapter on its
    three matrices. Returns (model, adapter, {tensor: its values as ggml dequantizes them})."""
    rng = np.random.default_rng(5)
    shapes = {"blk.0.attn_q.weight": ("iq4_nl", (64, 256)), "blk.0.attn_k.weight": ("iq4_nl", (32, 256)),
              "blk.0.ffn_up.weight": ("iq3_s", (64, 256))}
    tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] = {}
    values = {}
    for name, (t, shape) in shapes.items():
        raw = oracle.quantize((rng.standard_normal(shape) * 0.02).astype(np.float32), t)
        tensors[name] = (np.frombuffer(raw, dtype=np.uint8).reshape(shape[0], -1), gguf.GGMLQuantizationType[t.upper()])
        values[name] = oracle.dequantize(raw, t, shape[0] * shape[1]).reshape(shape)
    tensors["blk.0.attn_norm.weight"] = (np.ones(256, dtype=np.float32), gguf.GGMLQuantizationType.F32)
    model = write_with_gguf_py(tmp_path / "model-iq4_nl.gguf", tensors)
    adapter = _adapter(tmp_path / "adapter.gguf", {n: s for n, (_, s) in shapes.items()})
    return model, adapter, values


def test_patching_a_read_only_model_needs_an_output_type(tmp_path: Path,
                                                         iq4_nl_model: tuple[Path, Path, dict[str, np.ndarray]]
                                                         ) -> None:
    model, adapter, values = iq4_nl_model
    out = tmp_path / "out.gguf"
    with pytest.raises(ggml_lora.PatchError) as err:
        ggml_lora.patch(model, adapter, out=out)
    message = str(err.value)
    assert not out.exists()
    # every patched tensor, by its type, and what to do about it
    assert "iq4_nl: blk.0.attn_q.weight, blk.0.attn_k.weight" in message, message
    assert "iq3_s: blk.0.ffn_up.weight" in message, message
    assert "attn_norm" not in message
    assert "choose an output type for these tensors" in message and "q8_0" in message
    assert "out_type=" in message  # the Python argument that does it

    # The same on the command line names the flag.
    done = subprocess.run([sys.executable, "-m", "ggml_lora", "patch", "-m", str(model), "--lora", str(adapter),
                           "-o", str(out)], capture_output=True, text=True)
    assert done.returncode != 0 and "--out-type" in done.stderr and "iq4_nl" in done.stderr, done.stderr
    assert not out.exists()

    # With an output type it can write, the patch goes through: patched tensors become q8_0 of W + delta.
    result = ggml_lora.patch(model, adapter, out=out, out_type="q8_0")
    assert {t.name: t.out_type for t in result.tensors} == dict.fromkeys(values, "q8_0")
    reader = gguf.GGUFReader(out)
    by_name = {t.name: t for t in reader.tensors}
    for name, w in values.items():
        t = by_name[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        got = np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float64).reshape(w.shape)
        want = w.astype(np.float64) + _lora_delta(adapter, name)
        step = np.abs(want).max(axis=1, keepdims=True) / 127  # one q8_0 step per row bounds the error
        assert np.all(np.abs(got - want) <= step), name
    assert np.array_equal(np.asarray(by_name["blk.0.attn_norm.weight"].data), np.ones(256, dtype=np.float32))


def test_a_read_only_model_can_be_the_base(tmp_path: Path,
                                           iq4_nl_model: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    """An iq4_nl/iq3_s file as the --lora-base of a q8_0 model: W comes from the base's values, the output keeps
    the model's q8_0."""
    base, adapter, values = iq4_nl_model
    model = write_with_gguf_py(tmp_path / "model-q8_0.gguf", {
        name: (gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
               gguf.GGMLQuantizationType.Q8_0) for name, w in values.items()
    } | {"blk.0.attn_norm.weight": (np.ones(256, dtype=np.float32), gguf.GGMLQuantizationType.F32)})
    out = tmp_path / "merged.gguf"
    ggml_lora.patch(model, adapter, base=base, out=out)
    reader = gguf.GGUFReader(out)
    for t in reader.tensors:
        if t.name not in values:
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        got = np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float64)
        want = values[t.name].astype(np.float64) + _lora_delta(adapter, t.name)
        step = np.abs(want).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(got.reshape(want.shape) - want) <= step), t.name


def test_the_engine_error_has_no_command_line_flags() -> None:
    """The core's message speaks of output types, not flags: only the Python layer adds ``out_type=``/``--out-type``
    (checked on the text the core writes, which the binding passes through)."""
    source = (REPO / "rust" / "core" / "src" / "error.rs").read_text()
    m = re.search(r'#\[error\(\s*"(cannot write the patched tensors.*?)"\s*\)\]', source, re.S)
    assert m is not None
    assert "--" not in m.group(1) and "out_type" not in m.group(1)
