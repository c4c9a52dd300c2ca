"""GGUF reading: every fixture against gguf-py's GGUFReader, the zero-copy views, and malformed files built by
hand (each must raise ggml_lora.GGUFError naming the file and the byte offset of the offending field)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterable

import gguf
import numpy as np
import pytest

import ggml_lora
from conftest import all_gguf_fixtures, assert_reads_like_gguf_py, fixture_id, fixture_path, write_with_gguf_py

GVT = gguf.GGUFValueType
ALL_FIXTURES = all_gguf_fixtures()


# ---------------------------------------------------------------------------------------------------------
# every fixture against gguf-py


@pytest.mark.parametrize("path", ALL_FIXTURES, ids=[fixture_id(p) for p in ALL_FIXTURES])
@pytest.mark.fixtures
def test_fixture_reads_like_gguf_py(path: Path) -> None:
    assert_reads_like_gguf_py(path)


@pytest.mark.fixtures
def test_expectations_agree(fixtures_dir: Path) -> None:
    """The header facts recorded in expectations.json (read there with gguf 0.19.0)."""
    import json

    facts = json.loads((fixtures_dir / "expectations.json").read_text())
    headers = facts["gguf_headers"]
    assert headers
    for rel, h in headers.items():
        with ggml_lora.open(fixtures_dir / rel) as f:
            assert f.version == h["version"]
            assert f.data_offset == h["data_offset"]
            assert len(f.fields) == h["n_kv"]
            assert len(f.tensors) == h["n_tensors"]
            if h["general.alignment"] is None:
                assert "general.alignment" not in f.fields and f.alignment == 32
            else:
                assert f.alignment == h["general.alignment"]
    for name, types in facts["llama-gqa"]["tensor_types"].items():
        with ggml_lora.open(fixtures_dir / "llama-gqa" / name) as f:
            assert {k: v.type for k, v in f.tensors.items()} == types
            assert f.metadata["general.file_type"] == facts["llama-gqa"]["general.file_type"][name]


@pytest.mark.parametrize("qtype", list(gguf.GGMLQuantizationType), ids=lambda q: q.name)
def test_files_holding_any_ggml_type_are_read(tmp_path: Path, qtype: gguf.GGMLQuantizationType) -> None:
    """The issue: files holding any type llama.cpp defines can be read and their tensors copied untouched. Each type
    gguf-py 0.19.0 knows, written by gguf-py as raw bytes (2 rows of 2 blocks), must read back identically."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(qtype.value)
    data = rng.integers(0, 256, (2, 2 * size), dtype=np.uint8)
    path = tmp_path / f"{qtype.name}.gguf"
    write_with_gguf_py(path, {"t": (data, qtype), "after": (np.arange(3, dtype=np.float32).view(np.uint8),
                                                             gguf.GGMLQuantizationType.F32)})
    with ggml_lora.open(path) as f:
        info = f.tensors["t"]
        assert info.type == qtype.name.lower()
        assert info.shape == (2, 2 * block)
        assert info.nbytes == data.size
        assert np.array_equal(f.raw("t"), data.reshape(-1))
        assert f.to_numpy("after").tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------
# the GGUFFile object


@pytest.mark.fixtures
def test_raw_is_read_only_and_zero_copy() -> None:
    path = fixture_path("llama-gqa", "base-q4_0-mixed.gguf")
    with ggml_lora.open(path) as f:
        for name in f.tensors:
            a, b = f.raw(name), f.raw(name)
            assert np.shares_memory(a, b)  # both view the same mapped bytes
            assert not a.flags.writeable and not a.flags.owndata
            with pytest.raises(ValueError):
                a[0] = 1
            with pytest.raises(ValueError):
                a.flags.writeable = True
        names = list(f.tensors)
        assert not np.shares_memory(f.raw(names[0]), f.raw(names[1]))
        q6 = f.raw("output.weight")
        assert f.tensors["output.weight"].type == "q6_k"
        kept = q6.copy()
    # closed: the arrays handed out stay valid (they keep the map alive), the file refuses new requests
    assert np.array_equal(q6, kept)
    with pytest.raises(ValueError, match="closed"):
        f.raw(names[0])
    with pytest.raises(ValueError, match="closed"):
        f.to_numpy(names[0])


@pytest.mark.fixtures
def test_to_numpy_returns_fresh_float32_arrays() -> None:
    with ggml_lora.open(fixture_path("llama-gqa", "base-f16.gguf")) as f:
        for name, info in f.tensors.items():
            a = f.to_numpy(name)
            assert a.dtype == np.float32 and a.shape == info.shape and a.flags.writeable
            a[...] = 0  # writing to it does not touch the file
            assert np.any(f.to_numpy(name) != 0)
            break


@pytest.mark.fixtures
def test_unknown_tensor_names_raise_key_error() -> None:
    path = fixture_path("llama-gqa", "base-q8_0.gguf")
    f = ggml_lora.open(path)
    try:
        for method in (f.raw, f.to_numpy):
            with pytest.raises(KeyError, match="no.such"):
                method("no.such.tensor")
        with pytest.raises(KeyError):
            f.tensors["no.such.tensor"]
    finally:
        f.close()
    f.close()  # closing twice is fine


@pytest.mark.fixtures
def test_open_accepts_str_and_pathlike() -> None:
    path = fixture_path("llama-gqa", "lora-qv-r4", "ref-adapter-f32.gguf")
    with ggml_lora.open(str(path)) as a, ggml_lora.open(path) as b:
        assert a.metadata == b.metadata
        assert a.path == b.path == path
        assert "GGUFFile" in repr(a) and str(len(a.tensors)) in repr(a)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ggml_lora.open(tmp_path / "missing.gguf")
    with pytest.raises(OSError):
        ggml_lora.open(tmp_path)


def test_gguf_error_is_a_value_error() -> None:
    assert issubclass(ggml_lora.GGUFError, ValueError)


# ---------------------------------------------------------------------------------------------------------
# hand-built files


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def tinfo(name: str | bytes, dims: Iterable[int], ttype: int, offset: int) -> bytes:
    dims = list(dims)
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ttype) + u64(offset)


def header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + u32(version) + u64(n_tensors) + u64(n_kv)


def gguf_file(kvs: list[bytes], infos: list[bytes], data: bytes = b"", align: int = 32, n_t: int | None = None,
              n_kv: int | None = None, version: int = 3) -> bytes:
    head = header(len(infos) if n_t is None else n_t, len(kvs) if n_kv is None else n_kv, version)
    head += b"".join(kvs) + b"".join(infos)
    if infos:
        head += b"\0" * (-len(head) % align)
    return head + data


def expect_error(tmp_path: Path, content: bytes, at: int | set[int], *words: str, name: str = "bad.gguf") -> str:
    """Opening ``content`` raises GGUFError naming the file and one of the byte offsets ``at``."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ggml_lora.GGUFError) as err:
        ggml_lora.open(path)
    msg = str(err.value)
    assert str(path) in msg, msg
    allowed = {at} if isinstance(at, int) else at
    assert any(f"at byte {n}" in msg for n in allowed), f"expected 'at byte N' with N in {sorted(allowed)}: {msg}"
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg!r}"
    return msg


def test_minimal_hand_built_file_reads(tmp_path: Path) -> None:
    data = np.arange(8, dtype=np.float32).tobytes()
    content = gguf_file([kv("a.b", 4, u32(7))], [tinfo("t", [4, 2], 0, 0)], data + b"\0" * 0)
    path = tmp_path / "ok.gguf"
    path.write_bytes(content)
    with ggml_lora.open(path) as f:
        assert f.version == 3 and f.alignment == 32
        assert f.metadata == {"a.b": 7}
        assert f.fields["a.b"].type == ggml_lora.GGUFValueType.UINT32
        assert f.tensors["t"].shape == (2, 4)
        data_offset = len(content) - len(data)
        assert data_offset == 96  # 24 + 19 (key/value) + 41 (tensor info) = 84, padded to 32
        assert f.data_offset == data_offset and f.tensors["t"].offset == data_offset
        assert np.array_equal(f.to_numpy("t"), np.arange(8, dtype=np.float32).reshape(2, 4))
    # gguf-py agrees on this file too
    r = gguf.GGUFReader(path)
    assert r.tensors[0].data_offset == data_offset


def test_v2_files_are_read(tmp_path: Path) -> None:
    content = gguf_file([kv("k", 8, gstr("v2 file"))], [tinfo("t", [32], 8, 0)], bytes(range(34)), version=2)
    path = tmp_path / "v2.gguf"
    path.write_bytes(content)
    with ggml_lora.open(path) as f:
        assert f.version == 2
        assert f.metadata == {"k": "v2 file"}
        assert f.raw("t").tolist() == list(range(34))
    assert int(gguf.GGUFReader(path).fields["GGUF.version"].contents()) == 2


def test_file_without_tensors_has_no_padding(tmp_path: Path) -> None:
    content = gguf_file([kv("k", 0, b"\x05")], [])
    path = tmp_path / "empty-tensors.gguf"
    path.write_bytes(content)
    with ggml_lora.open(path) as f:
        assert f.tensors == {} and f.metadata == {"k": 5}
        assert f.data_offset == len(content)


def test_nested_arrays_are_read_as_nested_lists(tmp_path: Path) -> None:
    """The spec allows arrays of arrays (ggml's loader refuses them, gguf-py flattens them); we read them."""
    inner1 = u32(4) + u64(2) + u32(5) + u32(6)
    inner2 = u32(4) + u64(1) + u32(7)
    inner3 = u32(8) + u64(0)
    nested = kv("nested.u32", 9, u32(9) + u64(2) + inner1 + inner2)
    strings = kv("nested.str", 9, u32(9) + u64(2) + (u32(8) + u64(2) + gstr("a") + gstr("")) + inner3)
    deep = kv("nested.deep", 9, u32(9) + u64(1) + u32(9) + u64(1) + u32(5) + u64(1) + struct.pack("<i", -3))
    path = tmp_path / "nested.gguf"
    path.write_bytes(gguf_file([nested, strings, deep], []))
    with ggml_lora.open(path) as f:
        assert f.metadata == {"nested.u32": [[5, 6], [7]], "nested.str": [["a", ""], []], "nested.deep": [[[-3]]]}
        for key in f.fields:
            assert f.fields[key].type == ggml_lora.GGUFValueType.ARRAY
            assert f.fields[key].sub_type == ggml_lora.GGUFValueType.ARRAY


def test_every_value_type_by_hand(tmp_path: Path) -> None:
    vals = [
        kv("u8", 0, b"\xff"), kv("i8", 1, b"\x80"), kv("u16", 2, struct.pack("<H", 65535)),
        kv("i16", 3, struct.pack("<h", -32768)), kv("u32", 4, u32(2**32 - 1)), kv("i32", 5, struct.pack("<i", -(2**31))),
        kv("f32", 6, struct.pack("<f", -1.5)), kv("b0", 7, b"\0"), kv("b1", 7, b"\1"), kv("s", 8, gstr("héllo ✓")),
        kv("u64", 10, u64(2**64 - 1)), kv("i64", 11, struct.pack("<q", -(2**63))), kv("f64", 12, struct.pack("<d", 1e300)),
        kv("nonutf8", 8, gstr(b"\xff\xfe")), kv("arr", 9, u32(7) + u64(3) + b"\1\0\1"),
        kv("f32inf", 6, struct.pack("<f", float("inf"))),
    ]
    path = tmp_path / "types.gguf"
    path.write_bytes(gguf_file(vals, []))
    with ggml_lora.open(path) as f:
        assert f.metadata == {
            "u8": 255, "i8": -128, "u16": 65535, "i16": -32768, "u32": 2**32 - 1, "i32": -(2**31), "f32": -1.5,
            "b0": False, "b1": True, "s": "héllo ✓", "u64": 2**64 - 1, "i64": -(2**63), "f64": 1e300,
            "nonutf8": b"\xff\xfe", "arr": [True, False, True], "f32inf": float("inf"),
        }
        assert [v.type.name for v in f.fields.values()] == [
            "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "BOOL", "STRING", "UINT64",
            "INT64", "FLOAT64", "STRING", "ARRAY", "FLOAT32"]
        assert type(f.metadata["b1"]) is bool and type(f.metadata["u8"]) is int and type(f.metadata["f32"]) is float


# ---------------------------------------------------------------------------------------------------------
# malformed files


def test_wrong_magic(tmp_path: Path) -> None:
    for magic in (b"GGML", b"gguf", b"\0\0\0\0", b"GGU\0"):
        expect_error(tmp_path, magic + u32(3) + u64(0) + u64(0), 0, "magic")


def test_big_endian_file(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_uint32("test.value", 5)
    w.add_tensor("t", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expect_error(tmp_path, path.read_bytes(), 4, "big-endian")


@pytest.mark.parametrize("version,words", [(1, ["v1"]), (0, ["version"]), (4, ["version 4"]), (0xFFFF, ["version"])])
def test_unsupported_versions(tmp_path: Path, version: int, words: list[str]) -> None:
    body = u32(0) + u32(0) if version == 1 else u64(0) + u64(0)  # v1 used u32 counts
    expect_error(tmp_path, b"GGUF" + u32(version) + body, 4, *words)


def test_empty_file(tmp_path: Path) -> None:
    expect_error(tmp_path, b"", 0)


@pytest.mark.parametrize("n", [2**63 - 1, 2**64 - 1, 2**40, 1000])
def test_huge_counts(tmp_path: Path, n: int) -> None:
    expect_error(tmp_path, header(n, 0) + b"\0" * 64, 8, "tensor count")
    expect_error(tmp_path, header(0, n) + b"\0" * 64, 16, "count")


def test_huge_string_lengths(tmp_path: Path) -> None:
    # key length
    expect_error(tmp_path, header(0, 1) + u64(2**64 - 1) + b"x" * 40, {24, 32})
    expect_error(tmp_path, header(0, 1) + u64(2**40) + b"x" * 40, {24, 32})
    # string value length: the length field (at 24 + 9 + 4 = 37) or its first byte (45)
    expect_error(tmp_path, header(0, 1) + gstr("k") + u32(8) + u64(2**62) + b"abc", {37, 45})
    expect_error(tmp_path, header(0, 1) + gstr("k") + u32(8) + u64(1 << 20) + b"abc", {37, 45})
    # tensor name length
    expect_error(tmp_path, header(1, 0) + u64(2**63) + b"\0" * 64, {24, 32})


@pytest.mark.parametrize("vtype", [13, 100, 2**32 - 1])
def test_unknown_value_type(tmp_path: Path, vtype: int) -> None:
    expect_error(tmp_path, header(0, 1) + gstr("key") + u32(vtype) + b"\0" * 16, 24 + 11, "type")
    # as an array element type
    expect_error(tmp_path, header(0, 1) + gstr("key") + u32(9) + u32(vtype) + u64(1) + b"\0" * 16, 24 + 15, "type")


def test_huge_array_count(tmp_path: Path) -> None:
    for n in (2**64 - 1, 2**31, 100):
        expect_error(tmp_path, header(0, 1) + gstr("key") + u32(9) + u32(4) + u64(n) + b"\0" * 64, 24 + 19)


def test_array_nesting_is_bounded(tmp_path: Path) -> None:
    payload = b"".join(u32(9) + u64(1) for _ in range(64)) + u32(4) + u64(1) + u32(1)
    path = tmp_path / "deep.gguf"
    path.write_bytes(header(0, 1) + gstr("k") + u32(9) + payload)
    with pytest.raises(ggml_lora.GGUFError, match="at byte"):
        ggml_lora.open(path)


def test_bad_bool_empty_and_invalid_keys(tmp_path: Path) -> None:
    expect_error(tmp_path, header(0, 1) + gstr("k") + u32(7) + b"\x02", 24 + 9 + 4, "bool")
    expect_error(tmp_path, header(0, 1) + gstr("") + u32(0) + b"\x01", 24, "empty")
    expect_error(tmp_path, header(0, 1) + gstr(b"\xff\xfe") + u32(0) + b"\x01", {24, 32}, "utf-8")
    expect_error(tmp_path, header(1, 0) + tinfo(b"\xc3(", [1], 0, 0) + b"\0" * 64, {24, 32}, "utf-8")


def test_duplicate_key(tmp_path: Path) -> None:
    first = kv("dup.key", 0, b"\x01")
    content = gguf_file([kv("a", 0, b"\x00"), first, kv("dup.key", 0, b"\x02")], [])
    expect_error(tmp_path, content, 24 + len(kv("a", 0, b"\x00")) + len(first), "duplicate", "dup.key")


def _one_tensor_file(info: bytes, data_len: int = 4096) -> tuple[bytes, int]:
    """A file with one metadata key and one tensor info; returns (bytes, absolute offset of the info)."""
    kvs = [kv("general.architecture", 8, gstr("llama"))]
    start = len(header(1, 1) + kvs[0])
    return gguf_file(kvs, [info], b"\0" * data_len), start


@pytest.mark.parametrize("ttype", [4, 5, 31, 32, 33, 36, 37, 38, 43, 1000, 2**32 - 1])
def test_unknown_ggml_type(tmp_path: Path, ttype: int) -> None:
    content, at = _one_tensor_file(tinfo("t", [32, 2], ttype, 0))
    expect_error(tmp_path, content, at + 9 + 4 + 16, "type", str(ttype))


@pytest.mark.parametrize("dims,bad_index", [([0], 0), ([32, 0], 1), ([4, 4, 4, 0], 3), ([0, 0], 0)])
def test_zero_dim(tmp_path: Path, dims: list[int], bad_index: int) -> None:
    content, at = _one_tensor_file(tinfo("t", dims, 0, 0))
    expect_error(tmp_path, content, {at + 9, at + 13 + 8 * bad_index}, "size 0")


@pytest.mark.parametrize("n_dims", [0, 5, 100])
def test_dim_count(tmp_path: Path, n_dims: int) -> None:
    content, at = _one_tensor_file(tinfo("t", [1] * min(n_dims, 5), 0, 0)[: 9 + 0] + u32(n_dims) + u64(1) * 5
                                   + u32(0) + u64(0))
    expect_error(tmp_path, content, at + 9, "dimensions")


def test_size_overflow_and_row_length(tmp_path: Path) -> None:
    content, at = _one_tensor_file(tinfo("t", [2**32, 2**32], 0, 0))
    expect_error(tmp_path, content, {at + 9, at + 13, at + 21}, "too large")
    content, at = _one_tensor_file(tinfo("t", [2**62, 4], 0, 0))
    expect_error(tmp_path, content, {at + 9, at + 13, at + 21})
    content, at = _one_tensor_file(tinfo("t", [33, 2], 2, 0))  # q4_0 rows must be multiples of 32
    expect_error(tmp_path, content, {at + 9, at + 13}, "block size")


def test_name_length(tmp_path: Path) -> None:
    content, at = _one_tensor_file(tinfo("n" * 64, [4], 0, 0))
    expect_error(tmp_path, content, at, "64")
    ok, _ = _one_tensor_file(tinfo("n" * 63, [4], 0, 0))
    (tmp_path / "ok.gguf").write_bytes(ok)
    with ggml_lora.open(tmp_path / "ok.gguf") as f:
        assert list(f.tensors) == ["n" * 63]


def test_duplicate_tensor_name(tmp_path: Path) -> None:
    a = tinfo("w", [8], 0, 0)
    content = gguf_file([], [a, tinfo("w", [8], 0, 32)], b"\0" * 64)
    expect_error(tmp_path, content, 24 + len(a), "duplicate", "w")


@pytest.mark.parametrize("offsets", [(4,), (32,), (0, 4), (0, 64), (0, 0), (0, 31)])
def test_misaligned_or_non_dense_offsets(tmp_path: Path, offsets: tuple[int, ...]) -> None:
    """ggml requires offset_i == sum of the padded sizes before it (dense, in info order, each aligned)."""
    infos = [tinfo(f"t{i}", [8], 0, o) for i, o in enumerate(offsets)]  # 32 bytes each
    content = gguf_file([], infos, b"\0" * 256)
    bad = next(i for i, o in enumerate(offsets) if o != 32 * i)
    at = 24 + sum(len(x) for x in infos[: bad + 1]) - 8  # the offset field of the first wrong tensor
    expect_error(tmp_path, content, at, "offset")


def test_tensor_past_end_of_file(tmp_path: Path) -> None:
    infos = [tinfo("a", [8], 0, 0), tinfo("b", [64], 0, 32)]
    head = gguf_file([], infos)
    data_offset = len(head)
    for data_len in (0, 31, 32, 32 + 255):
        content = head + b"\0" * data_len
        first_bad = 0 if data_len < 32 else 1
        offset_field = 24 + sum(len(x) for x in infos[: first_bad + 1]) - 8
        expect_error(tmp_path, content, {offset_field, data_offset + 32 * first_bad}, "beyond the end")
    # complete data without the last tensor's padding is readable (like llama.cpp's mmap loader)
    path = tmp_path / "nopad.gguf"
    path.write_bytes(head + b"\1" * (32 + 256))
    with ggml_lora.open(path) as f:
        assert f.raw("b").tolist() == [1] * 256


@pytest.mark.parametrize("vtype,payload,words", [
    (10, u64(32), ["UINT32"]), (5, struct.pack("<i", 32), ["UINT32"]), (8, gstr("32"), ["UINT32"]),
    (4, u32(48), ["power of two"]), (4, u32(0), ["power of two"]), (4, u32(2**31 + 1), ["power of two"]),
])
def test_bad_alignment(tmp_path: Path, vtype: int, payload: bytes, words: list[str]) -> None:
    prefix = header(1, 2) + kv("a", 0, b"\0")
    content = prefix + kv("general.alignment", vtype, payload) + tinfo("t", [8], 0, 0) + b"\0" * 256
    key_at = len(prefix)
    type_at = key_at + 8 + len("general.alignment")
    expect_error(tmp_path, content, {key_at, type_at, type_at + 4}, "alignment", *words)


def test_custom_alignment_is_honoured(tmp_path: Path) -> None:
    kvs = [kv("general.alignment", 4, u32(256))]
    infos = [tinfo("a", [3], 0, 0), tinfo("b", [5], 0, 256)]
    content = gguf_file(kvs, infos, align=256)
    assert len(content) % 256 == 0
    content += np.arange(3, dtype=np.float32).tobytes() + b"\0" * 244 + np.arange(5, dtype=np.float32).tobytes()
    path = tmp_path / "a256.gguf"
    path.write_bytes(content)
    with ggml_lora.open(path) as f:
        assert f.alignment == 256 and f.data_offset % 256 == 0
        assert f.tensors["b"].offset == f.data_offset + 256
        assert f.to_numpy("b").tolist() == [0, 1, 2, 3, 4]
    r = gguf.GGUFReader(path)
    assert r.alignment == 256 and r.tensors[1].data_offset == f.tensors["b"].offset
    # the same file with the second tensor at 32 (the default alignment) is malformed under alignment 256
    bad = gguf_file(kvs, [infos[0], tinfo("b", [5], 0, 32)], b"\0" * 600, align=256)
    expect_error(tmp_path, bad, len(header(2, 1) + kvs[0] + infos[0] + tinfo("b", [5], 0, 32)) - 8, "offset")


# ---------------------------------------------------------------------------------------------------------
# truncation of real files at every header field


def _header_fields(buf: bytes) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int, list[int]]:
    """Walks a GGUF v3 header (independently of the code under test). Returns the primitive fields as (start,
    end), the count fields as (start of the count, end of the items it counts), the end of the header, and the
    position of each tensor's offset field."""
    fields: list[tuple[int, int]] = []
    counts: list[tuple[int, int]] = []
    offset_fields: list[int] = []
    pos = 0

    def prim(n: int) -> bytes:
        nonlocal pos
        fields.append((pos, pos + n))
        pos += n
        return buf[pos - n : pos]

    def num(n: int) -> int:
        return int.from_bytes(prim(n), "little")

    def string() -> None:
        n = num(8)
        if n:
            prim(n)

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def value(vt: int) -> None:
        if vt in sizes:
            prim(sizes[vt])
        elif vt == 8:
            string()
        else:
            et = num(4)
            at = pos
            n = num(8)
            for _ in range(n):
                value(et)
            counts.append((at, pos))

    prim(4)
    prim(4)
    nt_at = pos
    nt = num(8)
    nkv_at = pos
    nkv = num(8)
    for _ in range(nkv):
        string()
        value(num(4))
    counts.append((nkv_at, pos))
    for _ in range(nt):
        string()
        nd = num(4)
        for _ in range(nd):
            prim(8)
        prim(4)
        offset_fields.append(pos)
        prim(8)
    counts.append((nt_at, pos))
    return fields, counts, pos, offset_fields


def _truncation_cases(path: Path, limit: int) -> tuple[bytes, list[tuple[int, set[int]]]]:
    buf = path.read_bytes()
    fields, counts, end, _ = _header_fields(buf)
    cases = []
    for cut in range(0, min(limit, end)):
        field = next((s, e) for s, e in fields if s <= cut < e)
        allowed = {field[0]} | {at for at, items_end in counts if at + 8 <= cut < items_end}
        cases.append((cut, allowed))
    return buf, cases


@pytest.mark.parametrize("rel,limit", [(("llama-gqa", "lora-qv-r4", "ref-adapter-f32.gguf"), 10**9),
                                       (("llama-gqa", "base-f16.gguf"), 2000)])
@pytest.mark.fixtures
def test_truncation_at_every_header_byte(tmp_path: Path, rel: tuple[str, ...], limit: int) -> None:
    """Cut a real file at every byte of its header (all of it for the adapter, whose header is < 1 KiB; the first
    2000 bytes of base-f16): GGUFError at the start of the field the cut falls in, or at the count field whose items
    were cut off (a count is checked against the bytes left before anything is allocated)."""
    path = fixture_path(*rel)
    buf, cases = _truncation_cases(path, limit)
    assert len(cases) >= 900
    target = tmp_path / "cut.gguf"
    for cut, allowed in cases:
        target.write_bytes(buf[:cut])
        with pytest.raises(ggml_lora.GGUFError) as err:
            ggml_lora.open(target)
        msg = str(err.value)
        assert str(target) in msg
        assert any(f"at byte {n}" in msg for n in allowed), f"cut at {cut}: expected one of {sorted(allowed)}: {msg}"


@pytest.mark.fixtures
def test_truncation_in_the_data(tmp_path: Path) -> None:
    path = fixture_path("llama-gqa", "lora-qv-r4", "ref-adapter-f32.gguf")
    buf = path.read_bytes()
    _, _, end, offset_fields = _header_fields(buf)
    with ggml_lora.open(path) as f:
        infos = list(f.tensors.values())
        data_offset = f.data_offset
    assert len(offset_fields) == len(infos) > 2
    target = tmp_path / "cut.gguf"
    for cut in [end, data_offset - 1, data_offset, data_offset + 1, infos[1].offset + 3, infos[-1].offset,
                infos[-1].offset + infos[-1].nbytes - 1]:
        first_bad = next(i for i, t in enumerate(infos) if t.offset + t.nbytes > cut)
        target.write_bytes(buf[:cut])
        with pytest.raises(ggml_lora.GGUFError) as err:
            ggml_lora.open(target)
        msg = str(err.value)
        assert str(target) in msg
        assert any(f"at byte {n}" in msg for n in (offset_fields[first_bad], infos[first_bad].offset)), (cut, msg)
        assert infos[first_bad].name in msg
    target.write_bytes(buf[: infos[-1].offset + infos[-1].nbytes])  # only the final padding missing: readable
    with ggml_lora.open(target) as f:
        assert np.array_equal(f.raw(infos[-1].name), np.frombuffer(buf, np.uint8)[infos[-1].offset :][
            : infos[-1].nbytes])
