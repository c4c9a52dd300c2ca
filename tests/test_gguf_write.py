"""GGUF writing: round trips of arbitrary metadata and tensors, cross-reading with gguf-py in both directions,
alignment, atomic replacement, and refusal of what ggml's loader would refuse."""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ggml_lora
from conftest import assert_reads_like_gguf_py, same_value
from ggml_lora import GGUFValueType as VT
from ggml_lora import MetadataValue as MV

GVT = gguf.GGUFValueType
HYPO = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def f32(v: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.float32(v))


# ---------------------------------------------------------------------------------------------------------
# strategies: (value to write, expected type, expected element type, expected value read back)

INT_RANGES = {
    VT.UINT8: (0, 2**8 - 1), VT.INT8: (-(2**7), 2**7 - 1), VT.UINT16: (0, 2**16 - 1), VT.INT16: (-(2**15), 2**15 - 1),
    VT.UINT32: (0, 2**32 - 1), VT.INT32: (-(2**31), 2**31 - 1), VT.UINT64: (0, 2**64 - 1),
    VT.INT64: (-(2**63), 2**63 - 1),
}
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)


def utf8_or_bytes(b: bytes) -> str | bytes:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b


def scalar_of(vt: VT) -> st.SearchStrategy[tuple[Any, Any]]:
    """(value to write, value expected back) for a scalar of type vt."""
    if vt in INT_RANGES:
        lo, hi = INT_RANGES[vt]
        return st.integers(lo, hi).map(lambda v: (v, v))
    if vt == VT.FLOAT32:
        return st.floats(width=32, allow_nan=False).map(lambda v: (v, v))
    if vt == VT.FLOAT64:
        return st.floats(allow_nan=False).map(lambda v: (v, v))
    if vt == VT.BOOL:
        return st.booleans().map(lambda v: (v, v))
    assert vt == VT.STRING
    return st.one_of(text.map(lambda s: (s, s)), st.binary(max_size=12).map(lambda b: (b, utf8_or_bytes(b))))


SCALAR_TYPES = [t for t in VT if t != VT.ARRAY]


@st.composite
def typed_value(draw: st.DrawFn) -> tuple[Any, VT, VT | None, Any]:
    vt = draw(st.sampled_from(list(VT)))
    if vt != VT.ARRAY:
        v, back = draw(scalar_of(vt))
        return MV(v, vt), vt, None, back
    sub = draw(st.sampled_from(SCALAR_TYPES))
    items = draw(st.lists(scalar_of(sub), max_size=8))
    return MV([v for v, _ in items], VT.ARRAY, sub), VT.ARRAY, sub, [b for _, b in items]


int32 = st.integers(-(2**31), 2**31 - 1)


@st.composite
def plain_value(draw: st.DrawFn) -> tuple[Any, VT, VT | None, Any]:
    """Plain Python values, typed as gguf-py's GGUFValueType.get_type types them (int -> INT32, float -> FLOAT32,
    bool, str, list -> ARRAY of its first element's type)."""
    kind = draw(st.sampled_from(["int", "float", "bool", "str", "list_int", "list_float", "list_str", "list_bool"]))
    if kind == "int":
        v = draw(int32)
    elif kind == "float":
        v = draw(st.floats(allow_nan=False))
    elif kind == "bool":
        v = draw(st.booleans())
    elif kind == "str":
        v = draw(text)
    else:
        elem = {"list_int": int32, "list_float": st.floats(allow_nan=False), "list_str": text,
                "list_bool": st.booleans()}[kind]
        v = draw(st.lists(elem, min_size=1, max_size=8))
    vt = VT(int(GVT.get_type(v)))  # gguf-py's default typing is the oracle
    if vt == VT.ARRAY:
        sub = VT(int(GVT.get_type(v[0])))
        back = [f32(x) if sub == VT.FLOAT32 else x for x in v]
        return v, vt, sub, back
    return v, vt, None, f32(v) if vt == VT.FLOAT32 else v


@st.composite
def numpy_value(draw: st.DrawFn) -> tuple[Any, VT, VT | None, Any]:
    dtype = draw(st.sampled_from([np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.float32,
                                  np.uint64, np.int64, np.float64, np.bool_]))
    arr = draw(hnp.arrays(dtype, st.integers(0, 6), elements={"allow_nan": False} if dtype in (np.float32, np.float64)
                          else None))
    vt = {np.uint8: VT.UINT8, np.int8: VT.INT8, np.uint16: VT.UINT16, np.int16: VT.INT16, np.uint32: VT.UINT32,
          np.int32: VT.INT32, np.float32: VT.FLOAT32, np.uint64: VT.UINT64, np.int64: VT.INT64,
          np.float64: VT.FLOAT64, np.bool_: VT.BOOL}[dtype]
    if draw(st.booleans()) and arr.size:
        return arr[0], vt, None, arr[0].item()  # a numpy scalar keeps its type
    return arr, VT.ARRAY, vt, arr.tolist()


key_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=24).filter(
    lambda k: k != "general.alignment")
metadata_st = st.dictionaries(key_text, st.one_of(typed_value(), plain_value(), numpy_value()), max_size=10)


def tensor_name_st() -> st.SearchStrategy[str]:
    return st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30).filter(
        lambda n: len(n.encode()) < 64)


shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)


@st.composite
def tensor_value(draw: st.DrawFn) -> tuple[Any, str, tuple[int, ...], bytes]:
    """(value to write, expected type, expected numpy shape, expected raw bytes)."""
    kind = draw(st.sampled_from(["f32", "f16", "i8", "i16", "i32", "i64", "f64", "q8_0", "q4_0", "raw_f16"]))
    if kind in ("q8_0", "q4_0"):
        shape = draw(st.tuples(st.integers(1, 3), st.integers(1, 3))).__iter__()
        rows, nb = next(shape), next(shape)
        lead = draw(st.sampled_from([(), (2,)]))
        x = draw(hnp.arrays(np.float32, lead + (rows, 32 * nb), elements=st.floats(-1e4, 1e4, width=32)))
        q = ggml_lora.quantize(x, kind)
        return (q, kind, x.shape), kind, x.shape, q.tobytes()
    if kind == "raw_f16":
        x = draw(hnp.arrays(np.float16, draw(shapes)))
        return (x.view(np.uint8), "F16", x.shape), "f16", x.shape, x.tobytes()
    dtype = {"f32": np.float32, "f16": np.float16, "i8": np.int8, "i16": np.int16, "i32": np.int32,
             "i64": np.int64, "f64": np.float64}[kind]
    x = draw(hnp.arrays(dtype, draw(shapes)))  # any values, NaN payloads included: bytes are copied
    if draw(st.booleans()) and x.ndim >= 1 and x.shape[-1] > 1:
        x = x[..., ::2]  # non-contiguous views are written in C order
    return x, kind, x.shape, np.ascontiguousarray(x).tobytes()


tensors_st = st.dictionaries(tensor_name_st(), tensor_value(), max_size=6)


def check_metadata(f: ggml_lora.GGUFFile, meta: dict[str, tuple[Any, VT, VT | None, Any]]) -> None:
    assert list(f.fields) == list(meta)
    for key, (_, vt, sub, back) in meta.items():
        field = f.fields[key]
        assert (field.type, field.sub_type) == (vt, sub), key
        assert same_value(field.value, back), (key, field.value, back)


def check_tensors(f: ggml_lora.GGUFFile, tensors: dict[str, tuple[Any, str, tuple[int, ...], bytes]]) -> None:
    assert list(f.tensors) == list(tensors)
    for name, (_, t, shape, raw) in tensors.items():
        info = f.tensors[name]
        assert (info.type, info.shape, info.nbytes) == (t, shape, len(raw)), name
        assert f.raw(name).tobytes() == raw
        if t in ("f32", "f16", "q8_0", "q4_0"):
            expected = ggml_lora.dequantize(np.frombuffer(raw, np.uint8), t, shape)
            assert np.array_equal(f.to_numpy(name), expected, equal_nan=True)


def check_layout(path: Path) -> None:
    """ggml's layout rules: data section and every tensor aligned, dense, each tensor zero-padded (the last too)."""
    content = path.read_bytes()
    with ggml_lora.open(path) as f:
        a = f.alignment
        infos = list(f.tensors.values())
        if not infos:
            return
        assert f.data_offset % a == 0
        pos = f.data_offset
        for info in infos:
            assert info.offset == pos and info.offset % a == 0
            end = info.offset + info.nbytes
            pos = end + (-end % a)
            assert content[end:pos] == b"\0" * (pos - end)
        assert len(content) == pos  # the last tensor is padded too


# ---------------------------------------------------------------------------------------------------------
# round trips


@HYPO
@given(meta=metadata_st, tensors=tensors_st)
def test_round_trip_and_gguf_py_reads_it(tmp_path: Path, meta: dict, tensors: dict) -> None:
    path = tmp_path / "rt.gguf"
    out = ggml_lora.write(path, {k: v[0] for k, v in meta.items()}, {k: v[0] for k, v in tensors.items()})
    assert out == path
    with ggml_lora.open(path) as f:
        assert f.version == 3 and f.alignment == 32
        check_metadata(f, meta)
        check_tensors(f, tensors)
    check_layout(path)
    assert_reads_like_gguf_py(path)
    assert sorted(os.listdir(tmp_path)) == ["rt.gguf"]  # no temporary files left


@HYPO
@given(alignment=st.sampled_from([8, 16, 32, 64, 128, 4096]), tensors=tensors_st,
       as_metadata_value=st.booleans())
def test_alignment_is_honoured(tmp_path: Path, alignment: int, tensors: dict, as_metadata_value: bool) -> None:
    path = tmp_path / "aligned.gguf"
    value = MV(alignment, VT.UINT32) if as_metadata_value else alignment  # a plain int is written as UINT32
    ggml_lora.write(path, {"general.alignment": value}, {k: v[0] for k, v in tensors.items()})
    with ggml_lora.open(path) as f:
        assert f.alignment == alignment
        assert f.fields["general.alignment"] == (alignment, VT.UINT32, None)
        check_tensors(f, tensors)
    check_layout(path)
    assert gguf.GGUFReader(path).alignment == alignment
    assert_reads_like_gguf_py(path)


def test_typing_of_plain_values(tmp_path: Path) -> None:
    """gguf-py's default typing for plain values; beyond it (where gguf-py fails): ints outside int32 widen to INT64
    then UINT64, mixed int/float lists become FLOAT32, empty lists are ARRAY of INT32, bytes are STRING."""
    meta = {
        "i": 1, "neg": -5, "f": 0.1, "b": True, "s": "x", "bytes": b"\xff", "li": [1, 2], "lf": [0.5], "ls": ["a"],
        "lb": [False], "big": 2**31, "bigneg": -(2**40), "huge": 2**64 - 1, "mixed": [1, 2.5], "widen": [1, 2**40],
        "empty": [], "tuple": (1, 2), "np": np.array([[1, 2], [3, 4]], dtype=np.uint16), "npf": np.float64(0.1),
    }
    path = tmp_path / "typing.gguf"
    ggml_lora.write(path, meta, {})
    with ggml_lora.open(path) as f:
        got = {k: (v.type.name, v.sub_type.name if v.sub_type else None) for k, v in f.fields.items()}
        values = f.metadata
    for k in ("i", "neg", "f", "b", "s", "li", "lf", "ls", "lb"):  # these gguf-py can type
        vt = GVT.get_type(meta[k])
        sub = GVT.get_type(meta[k][0]).name if vt == GVT.ARRAY else None
        assert got[k] == (vt.name, sub), k
    assert got["bytes"] == ("STRING", None) and values["bytes"] == b"\xff"
    assert got["big"] == ("INT64", None) and got["bigneg"] == ("INT64", None) and got["huge"] == ("UINT64", None)
    assert values["huge"] == 2**64 - 1
    assert got["mixed"] == ("ARRAY", "FLOAT32") and values["mixed"] == [1.0, 2.5]
    assert got["widen"] == ("ARRAY", "INT64") and values["widen"] == [1, 2**40]
    assert got["empty"] == ("ARRAY", "INT32") and values["empty"] == []
    assert got["tuple"] == ("ARRAY", "INT32") and values["tuple"] == [1, 2]
    assert got["np"] == ("ARRAY", "UINT16") and values["np"] == [1, 2, 3, 4]
    assert got["npf"] == ("FLOAT64", None) and values["npf"] == 0.1
    assert values["f"] == f32(0.1)


@pytest.mark.fixtures
def test_metadata_values_round_trip_from_a_read_file(tmp_path: Path) -> None:
    """GGUFFile.fields gives MetadataValues that write the same file again (metadata of a real fixture)."""
    from conftest import fixture_path

    src = fixture_path("llama-gqa", "lora-r8", "merged-ref-q8_0.gguf")
    with ggml_lora.open(src) as f:
        fields = dict(f.fields)
        tensors = {name: (f.raw(name), info.type, info.shape) for name, info in f.tensors.items()}
        path = ggml_lora.write(tmp_path / "copy.gguf", fields, tensors)
    # byte-identical: same header encoding, same layout, same data
    assert path.read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------------------------------------------
# files written by gguf-py


@HYPO
@given(tensors=tensors_st, meta=st.dictionaries(key_text, typed_value(), max_size=8),
       alignment=st.sampled_from([None, 32, 64]))
def test_files_written_by_gguf_py_are_read_identically(tmp_path: Path, tensors: dict, meta: dict,
                                                       alignment: int | None) -> None:
    path = tmp_path / "by-gguf-py.gguf"
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)  # general.alignment, UINT32
    for key, (mv, vt, sub, _) in meta.items():
        if key in ("general.architecture",) or (vt == VT.ARRAY and not mv.value):
            continue  # gguf-py refuses empty arrays
        w.add_key_value(key, mv.value, GVT(int(vt)), sub_type=GVT(int(sub)) if sub is not None else None)
    for name, (_, t, shape, raw) in tensors.items():
        if t in ("f32", "f16", "i8", "i16", "i32", "i64", "f64"):
            dtype = {"f32": np.float32, "f16": np.float16, "i8": np.int8, "i16": np.int16, "i32": np.int32,
                     "i64": np.int64, "f64": np.float64}[t]
            w.add_tensor(name, np.frombuffer(raw, dtype).reshape(shape))
        else:  # quantized: raw bytes, gguf-py derives the element shape from the byte shape
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.upper()]]
            byte_shape = shape[:-1] + (shape[-1] // block * size,)
            w.add_tensor(name, np.frombuffer(raw, np.uint8).reshape(byte_shape),
                         raw_dtype=gguf.GGMLQuantizationType[t.upper()])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_reads_like_gguf_py(path)
    with ggml_lora.open(path) as f:
        assert f.alignment == (alignment or 32)
        assert f.metadata["general.architecture"] == "llama"
        check_tensors(f, tensors)


def test_gguf_py_file_with_alignment_64_and_every_scalar_type(tmp_path: Path) -> None:
    path = tmp_path / "gp.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -2000000000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "ünïcode ✓")
    w.add_string("t.empty", "")
    w.add_array("t.arr_i", [1, 2, 3])
    w.add_array("t.arr_s", ["a", "", "ç"])
    w.add_array("t.arr_f", [0.5, -1.25])
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    w.add_tensor("a", x)
    w.add_tensor("b", x[:, :5].astype(np.float16))
    w.add_tensor("q8", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q4", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q4_0), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_reads_like_gguf_py(path)
    check_layout(path)
    with ggml_lora.open(path) as f:
        assert f.alignment == 64
        assert f.fields["general.alignment"] == (64, VT.UINT32, None)
        assert f.metadata["t.u64"] == 2**64 - 1 and f.metadata["t.f64"] == 0.1 and f.metadata["t.f32"] == f32(0.1)
        assert f.fields["t.arr_s"] == (["a", "", "ç"], VT.ARRAY, VT.STRING)
        assert np.array_equal(f.to_numpy("a"), x)
        assert f.tensors["q8"].type == "q8_0" and f.tensors["q8"].shape == (3, 64)
        assert np.array_equal(f.raw("q4"), ggml_lora.quantize(x, "q4_0").reshape(-1))


# ---------------------------------------------------------------------------------------------------------
# atomic replacement


def test_writing_replaces_an_existing_file_only_on_success(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    ggml_lora.write(path, {"v": 1}, {"a": np.zeros(4, np.float32)})
    old = path.read_bytes()
    x = np.ones((2, 64), np.float32)
    good = ggml_lora.quantize(x, "q8_0")
    failures = [
        # validation in Python / before the temporary file exists
        ({"v": 2}, {"a": np.zeros(4, np.float32), "b": np.zeros((), np.float32)}),
        ({"v": [[1]]}, {"a": np.zeros(4, np.float32)}),
        # data of the wrong size, found while streaming (after earlier tensors were written to the temporary file)
        ({"v": 2}, {"a": np.zeros(4, np.float32), "q": (good, "q8_0", x.shape), "bad": (good[:, :-1], "q8_0", x.shape)}),
        ({"v": 2}, {"a": np.zeros(4, np.float32), "bad": (good.reshape(-1)[:-1], "q8_0", x.shape)}),
    ]
    for meta, tensors in failures:
        with pytest.raises(ValueError):
            ggml_lora.write(path, meta, tensors)
        assert path.read_bytes() == old
        assert sorted(os.listdir(tmp_path)) == ["model.gguf"], "temporary files left behind"
    ggml_lora.write(path, {"v": 3}, {"q": (good, "q8_0", x.shape)}, sync=False)
    with ggml_lora.open(path) as f:
        assert f.metadata == {"v": 3} and list(f.tensors) == ["q"]
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]


def test_reading_file_stays_valid_while_it_is_replaced(tmp_path: Path) -> None:
    """A reader that has the old file mapped keeps seeing the old bytes after write() renames a new file in."""
    path = tmp_path / "m.gguf"
    ggml_lora.write(path, {}, {"a": np.arange(8, dtype=np.float32)})
    with ggml_lora.open(path) as f:
        raw = f.raw("a")
        ggml_lora.write(path, {}, {"a": np.full(8, 7, dtype=np.float32)})
        assert np.array_equal(raw.view(np.float32), np.arange(8, dtype=np.float32))
    with ggml_lora.open(path) as f:
        assert f.to_numpy("a").tolist() == [7] * 8


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        ggml_lora.write(tmp_path / "no" / "such" / "dir.gguf", {}, {})
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------------------------------------------------
# refusals


x64 = np.zeros((2, 64), np.float32)
q64 = ggml_lora.quantize(x64, "q8_0")

BAD_WRITES: list[tuple[str, dict, Any, str]] = [
    ("nested list", {"k": [[1, 2], [3]]}, {}, "nested"),
    ("nested tuple", {"k": [(1,)]}, {}, "nested"),
    ("nested MetadataValue", {"k": MV([[1]], VT.ARRAY, VT.ARRAY)}, {}, "nested"),
    ("ARRAY without sub_type", {"k": MV([1], VT.ARRAY)}, {}, "sub_type"),
    ("alignment 48", {"general.alignment": 48}, {}, "power of two"),
    ("alignment 0", {"general.alignment": 0}, {}, "power of two"),
    ("alignment 4 (spec: multiple of 8)", {"general.alignment": 4}, {}, "multiple of 8"),
    ("alignment not UINT32", {"general.alignment": MV(32, VT.UINT64)}, {}, "UINT32"),
    ("alignment negative", {"general.alignment": -32}, {}, "general.alignment"),
    ("empty key", {"": 1}, {}, "empty"),
    ("uint8 out of range", {"k": MV(300, VT.UINT8)}, {}, "k"),
    ("uint32 negative", {"k": MV(-1, VT.UINT32)}, {}, "k"),
    ("string for int", {"k": MV("x", VT.INT32)}, {}, "k"),
    ("int beyond 64 bits", {"k": 2**64}, {}, "64 bits"),
    ("None value", {"k": None}, {}, "NoneType"),
    ("dict value", {"k": {"a": 1}}, {}, "dict"),
    ("mixed list", {"k": [1, "a"]}, {}, "mixes"),
    ("name of 64 bytes", {}, {"n" * 64: np.zeros(4, np.float32)}, "63"),
    ("name of 64 UTF-8 bytes", {}, {"é" * 32: np.zeros(4, np.float32)}, "63"),
    ("duplicate names", {}, [("w", np.zeros(4, np.float32)), ("w", np.ones(4, np.float32))], "duplicate"),
    ("0-dim array", {}, {"t": np.float32(1.0)}, "0-dimensional"),
    ("5 dims", {}, {"t": np.zeros((1, 1, 1, 1, 2), np.float32)}, "dimensions"),
    ("empty dim", {}, {"t": np.zeros((0, 4), np.float32)}, "size 0"),
    ("bool array", {}, {"t": np.zeros(4, bool)}, "bool"),
    ("uint8 array", {}, {"t": np.zeros(4, np.uint8)}, "uint8"),
    ("complex array", {}, {"t": np.zeros(4, np.complex64)}, "complex64"),
    ("object array", {}, {"t": np.array([None, 1], dtype=object)}, "object"),
    ("raw of wrong size", {}, {"t": (q64.reshape(-1)[:-2], "q8_0", x64.shape)}, "bytes"),
    ("raw too large", {}, {"t": (np.zeros(q64.size + 34, np.uint8), "q8_0", x64.shape)}, "bytes"),
    ("raw not uint8", {}, {"t": (q64.view(np.int8), "q8_0", x64.shape)}, "uint8"),
    ("raw unknown type", {}, {"t": (q64, "q9_0", x64.shape)}, "tensor 't': unknown ggml type 'q9_0'"),
    ("raw row not block multiple", {}, {"t": (np.zeros(34, np.uint8), "q8_0", (33,))}, "block size"),
    ("raw 2-tuple", {}, {"t": (q64, "q8_0")}, "(raw uint8 data, type, shape)"),
]


@pytest.mark.parametrize("meta,tensors,words", [c[1:] for c in BAD_WRITES], ids=[c[0] for c in BAD_WRITES])
def test_refused_writes(tmp_path: Path, meta: dict, tensors: Any, words: str) -> None:
    path = tmp_path / "out.gguf"
    with pytest.raises(ValueError) as err:
        ggml_lora.write(path, meta, tensors)
    assert words.lower() in str(err.value).lower(), str(err.value)
    assert os.listdir(tmp_path) == [], "nothing may be created"


def test_alignment_one_to_four_per_spec(tmp_path: Path) -> None:
    """The spec says general.alignment must be a multiple of 8 (ggml accepts any power of two on read)."""
    for a in (1, 2, 4):
        with pytest.raises(ValueError, match="general.alignment"):
            ggml_lora.write(tmp_path / "never-written.gguf", {"general.alignment": a}, {})
        assert os.listdir(tmp_path) == []


def test_big_endian_and_non_contiguous_arrays_are_written_little_endian(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    b = np.arange(12, dtype=np.float16).reshape(3, 4).T  # Fortran-ordered view
    c = np.arange(10, dtype=">i2")[::3]
    ggml_lora.write(path, {}, {"a": a, "b": b, "c": c})
    with ggml_lora.open(path) as f:
        assert f.tensors["a"].type == "f32" and f.raw("a").tobytes() == a.astype("<f4").tobytes()
        assert f.tensors["b"].shape == (4, 3) and np.array_equal(f.to_numpy("b"), b.astype(np.float32))
        assert f.tensors["c"].type == "i16" and f.raw("c").tobytes() == c.astype("<i2").tobytes()
    assert_reads_like_gguf_py(path)


def test_many_tensors_and_large_data_stream(tmp_path: Path) -> None:
    """Tensors larger than the writer's buffer and many small ones: layout and bytes stay right."""
    rng = np.random.default_rng(7)
    big = rng.standard_normal((700, 1024)).astype(np.float32)  # 2.8 MB, more than one 1 MiB buffer
    tensors: dict[str, Any] = {"big": big, "bigq": (ggml_lora.quantize(big, "q4_0"), "q4_0", big.shape)}
    for i in range(200):
        tensors[f"small.{i}"] = rng.standard_normal(i % 7 + 1).astype(np.float16)
    path = ggml_lora.write(tmp_path / "many.gguf", {"general.alignment": 64}, tensors)
    check_layout(path)
    assert_reads_like_gguf_py(path)
    with ggml_lora.open(path) as f:
        assert np.array_equal(f.to_numpy("big"), big)
        assert np.array_equal(f.to_numpy("small.199"), tensors["small.199"].astype(np.float32))


def test_write_struct_is_what_the_spec_says(tmp_path: Path) -> None:
    """The header bytes of a tiny file, field by field, from the spec (docs/FORMATS.md §1)."""
    path = ggml_lora.write(tmp_path / "tiny.gguf", {"k": MV(7, VT.UINT16)}, {"t": np.array([1.5], np.float32)})
    b = path.read_bytes()
    expected = (b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IH", 2, 7)
                + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 1, 0, 0))
    assert b[: len(expected)] == expected
    data_offset = len(expected) + (-len(expected) % 32)
    assert b[len(expected):data_offset] == b"\0" * (data_offset - len(expected))
    assert b[data_offset:] == struct.pack("<f", 1.5) + b"\0" * 28


# ---------------------------------------------------------------------------------------------------------
# streaming writer (oracle: gguf-py's GGUFReader reads back the metadata and the bytes given)


@HYPO
@given(meta=metadata_st, rows=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       cuts=st.lists(st.integers(1, 5000), max_size=12), alignment=st.sampled_from([8, 32, 64]))
def test_stream_writer_chunks_read_back_by_gguf_py(tmp_path: Path, meta: dict, rows: list[int], cuts: list[int],
                                                    alignment: int) -> None:
    """Tensors streamed in chunks of arbitrary sizes (never past a tensor's end): gguf-py reads the metadata and
    every tensor's bytes back as given, and agrees with ggml_lora.open on the whole layout."""
    rng = np.random.default_rng(len(rows) * 31 + sum(cuts))
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for i, n in enumerate(rows):
        x = rng.standard_normal((n, 64)).astype(np.float32)
        kind = ("f32", "f16", "q4_0", "q6_k")[i % 4]
        data = {"f32": x, "f16": x.astype(np.float16)}.get(kind)
        if kind == "q6_k":
            x = rng.standard_normal((n, 256)).astype(np.float32)
        raw = ggml_lora.quantize(x, kind) if data is None else data
        tensors[f"t.{i}"] = (kind, x.shape, np.ascontiguousarray(raw).tobytes())
    meta = {k: v for k, v in meta.items() if k != "general.alignment"}
    metadata = {k: v[0] for k, v in meta.items()} | {"general.alignment": alignment}
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # tmp_path is shared by hypothesis' examples
    path = folder / "streamed.gguf"
    with ggml_lora.GGUFStreamWriter(path, metadata, {n: (t, s) for n, (t, s, _) in tensors.items()}) as w:
        assert [n for n, _ in w.tensors] == list(tensors)
        assert [b for _, b in w.tensors] == [len(d) for _, _, d in tensors.values()]
        sizes = iter(cuts)
        for i, (_, _, data) in enumerate(tensors.values()):
            assert w.current_tensor == i
            at = 0
            while at < len(data):
                n = min(next(sizes, len(data)), len(data) - at)
                w.write(np.frombuffer(data, np.uint8, n, at))
                at += n
        assert not path.exists(), "the file appears only when closed"
    assert os.listdir(folder) == ["streamed.gguf"]
    reader = gguf.GGUFReader(path)
    assert reader.alignment == alignment
    assert [t.name for t in reader.tensors] == list(tensors)
    for t in reader.tensors:
        kind, shape, data = tensors[t.name]
        assert t.tensor_type.name.lower() == kind and tuple(int(d) for d in reversed(t.shape)) == shape
        assert np.asarray(t.data).tobytes() == data
    assert_reads_like_gguf_py(path)
    with ggml_lora.open(path) as f:
        assert f.fields.pop("general.alignment") == (alignment, VT.UINT32, None)
        check_metadata(f, meta)


def test_stream_writer_writes_arrays_as_little_endian_bytes(tmp_path: Path) -> None:
    """write() takes any array as its little-endian bytes (oracle: gguf-py reads the values back)."""
    a = np.arange(96, dtype=">f4")
    with ggml_lora.GGUFStreamWriter(tmp_path / "a.gguf", {}, {"a": ("f32", (2, 48))}, sync=False) as w:
        w.write(a[:40])
        w.write(a[40:].reshape(8, 7))
    (t,) = gguf.GGUFReader(tmp_path / "a.gguf").tensors
    assert np.array_equal(np.asarray(t.data).reshape(-1), a.astype("<f4"))


def test_stream_writer_failures_leave_no_file(tmp_path: Path) -> None:
    """Too many bytes, an incomplete file, an exception inside the block and a closed writer: each is refused with
    its own exception, and neither the target (an existing file stays as it was) nor a temporary file is left."""
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    spec = {"a": ("f32", (4,)), "b": ("q8_0", (2, 32))}

    w = ggml_lora.GGUFStreamWriter(path, {}, spec)
    with pytest.raises(ValueError, match="only 16 of its 16 bytes remain"):
        w.write(np.zeros(5, np.float32))
    w.write(np.zeros(4, np.float32))  # the refused chunk wrote nothing: the tensor is still whole
    with pytest.raises(RuntimeError, match="incomplete"):
        w.close()
    with pytest.raises(RuntimeError, match="already finished"):
        w.write(np.zeros(1, np.uint8))
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.gguf"]

    with pytest.raises(KeyError):
        with ggml_lora.GGUFStreamWriter(path, {}, spec) as w:
            w.write(np.zeros(4, np.float32))
            raise KeyError("stop")
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.gguf"]

    with pytest.raises(ValueError, match="unknown"):
        ggml_lora.GGUFStreamWriter(tmp_path / "new.gguf", {}, {"a": ("q9_9", (4,))})
    with pytest.raises(ValueError, match="block"):
        ggml_lora.GGUFStreamWriter(tmp_path / "new.gguf", {}, {"a": ("q8_0", (33,))})
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]
