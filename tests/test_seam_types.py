"""What crosses the seam between Python and the Rust core: typed objects with named fields and useful reprs, and
metadata values that cross typed (GGUFValueType ids, never type names) in both directions.

Oracles: gguf-py (``GGUFReader`` reads what we write; ``GGUFWriter`` writes what we read; its
``GGML_QUANT_SIZES`` and ``GGMLQuantizationType`` for the ggml types), llama.cpp's adapter scale rule
(``alpha / rank``, restated from llama-adapter.cpp) and the importance weights ``in_sum2 / count`` that
llama-quantize derives (counts of 1 here, so the weights are the sums exactly).
"""

from __future__ import annotations

import copy
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
import pytest
from conftest import gguf_py_value, same_value

import ggml_lora
from ggml_lora import _native

GVT = gguf.GGUFValueType
VT = ggml_lora.GGUFValueType


def f32(v: float) -> float:
    """``v`` rounded to float32, as a FLOAT32 value reads back."""
    return float(struct.unpack("<f", struct.pack("<f", v))[0])


# (type, value written, value read back) for every scalar type, at the edges of its range.
SCALARS: list[tuple[GVT, Any, Any]] = [
    (GVT.UINT8, 255, 255),
    (GVT.INT8, -128, -128),
    (GVT.UINT16, 65535, 65535),
    (GVT.INT16, -32768, -32768),
    (GVT.UINT32, 2**32 - 1, 2**32 - 1),
    (GVT.INT32, -(2**31), -(2**31)),
    (GVT.FLOAT32, 0.1, f32(0.1)),
    (GVT.BOOL, True, True),
    (GVT.STRING, "héllo", "héllo"),
    (GVT.UINT64, 2**64 - 1, 2**64 - 1),
    (GVT.INT64, -(2**63), -(2**63)),
    (GVT.FLOAT64, 0.1, 0.1),
]
# (element type, items written, items read back) for an array of every scalar type.
ARRAYS: list[tuple[GVT, list[Any], list[Any]]] = [
    (GVT.UINT8, [0, 255], [0, 255]),
    (GVT.INT8, [-128, 127], [-128, 127]),
    (GVT.UINT16, [0, 65535], [0, 65535]),
    (GVT.INT16, [-32768, 32767], [-32768, 32767]),
    (GVT.UINT32, [0, 2**32 - 1], [0, 2**32 - 1]),
    (GVT.INT32, [-(2**31), 2**31 - 1], [-(2**31), 2**31 - 1]),
    (GVT.FLOAT32, [0.1, -2.5], [f32(0.1), -2.5]),
    (GVT.BOOL, [True, False], [True, False]),
    (GVT.STRING, ["a", "", "ü"], ["a", "", "ü"]),
    (GVT.UINT64, [0, 2**64 - 1], [0, 2**64 - 1]),
    (GVT.INT64, [-(2**63), 2**63 - 1], [-(2**63), 2**63 - 1]),
    (GVT.FLOAT64, [0.1, -1e300], [0.1, -1e300]),
]
# gguf-py's GGUFValueType and ours number the types alike: the ids are what crosses the seam.
assert {t.name: int(t) for t in GVT} == {t.name: int(t) for t in VT}


def every_type_metadata() -> dict[str, tuple[GVT, GVT | None, Any, Any]]:
    """key -> (type, element type, value to write, value expected back) covering every value type."""
    meta: dict[str, tuple[GVT, GVT | None, Any, Any]] = {}
    for vtype, value, back in SCALARS:
        meta[f"scalar.{vtype.name.lower()}"] = (vtype, None, value, back)
    for sub, items, back in ARRAYS:
        meta[f"array.{sub.name.lower()}"] = (GVT.ARRAY, sub, items, back)
    return meta


def test_every_value_type_written_by_us_reads_back_in_gguf_py(tmp_path: Path) -> None:
    """Metadata of every value type (scalars at the edges of their range, arrays of every element type) written
    by ``ggml_lora.write`` from ``MetadataValue``s: gguf-py reads each key with the same type, element type and
    value."""
    meta = every_type_metadata()
    path = ggml_lora.write(
        tmp_path / "m.gguf",
        {k: ggml_lora.MetadataValue(v, VT(int(t)), VT(int(s)) if s is not None else None)
         for k, (t, s, v, _) in meta.items()},
        {"t": np.zeros(32, np.float32)},
    )
    fields = {k: f for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(meta)
    for key, (vtype, sub, _, back) in meta.items():
        assert fields[key].types == ([vtype] if sub is None else [vtype, sub]), key
        assert same_value(gguf_py_value(fields[key]), back), (key, gguf_py_value(fields[key]), back)


def test_every_value_type_written_by_gguf_py_reads_back_typed(tmp_path: Path) -> None:
    """The reverse: gguf-py's GGUFWriter writes every value type, including nested arrays; ``GGUFFile.fields``
    and the native ``MetadataField``s carry the same type ids, element type ids and values."""
    meta = every_type_metadata()
    nested = [[1, 2], [3]]
    w = gguf.GGUFWriter(tmp_path / "g.gguf", "llama")
    for key, (vtype, sub, value, _) in meta.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.add_key_value("array.nested", nested, GVT.ARRAY)
    w.add_tensor("t", np.zeros(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expected = {"general.architecture": (GVT.STRING, None, "llama")}
    expected |= {k: (t, s, back) for k, (t, s, _, back) in meta.items()}
    expected["array.nested"] = (GVT.ARRAY, GVT.ARRAY, nested)

    native = _native.GGUFFile(str(tmp_path / "g.gguf")).metadata()
    assert [m.key for m in native] == list(expected)
    for m in native:
        vtype, sub, back = expected[m.key]
        assert (m.type, m.sub_type) == (int(vtype), int(sub) if sub is not None else None), m.key
        assert type(m.type) is int and (m.sub_type is None or type(m.sub_type) is int)
        assert same_value(m.value, back), (m.key, m.value, back)
    with ggml_lora.open(tmp_path / "g.gguf") as f:
        for key, field in f.fields.items():
            vtype, sub, back = expected[key]
            assert isinstance(field.type, VT) and field.type == vtype
            assert field.sub_type == sub and (sub is None or isinstance(field.sub_type, VT))
            assert same_value(field.value, back)


def test_read_metadata_writes_the_same_types_again(tmp_path: Path) -> None:
    """``fields`` read from a file (every type except nested arrays) written back by ``ggml_lora.write``: gguf-py
    sees identical types and values in both files."""
    meta = every_type_metadata()
    first = ggml_lora.write(
        tmp_path / "a.gguf",
        {k: ggml_lora.MetadataValue(v, VT(int(t)), VT(int(s)) if s is not None else None)
         for k, (t, s, v, _) in meta.items()},
        {},
    )
    with ggml_lora.open(first) as f:
        second = ggml_lora.write(tmp_path / "b.gguf", f.fields, {})
    a, b = gguf.GGUFReader(first).fields, gguf.GGUFReader(second).fields
    assert list(a) == list(b)
    for key in a:
        assert a[key].types == b[key].types and same_value(gguf_py_value(a[key]), gguf_py_value(b[key])), key


def test_nested_arrays_are_refused_by_our_writer(tmp_path: Path) -> None:
    """A nested array read from a gguf-py file cannot be written back (ggml's loader refuses nested arrays): the
    error names the key and nothing is written."""
    w = gguf.GGUFWriter(tmp_path / "g.gguf", "llama")
    w.add_key_value("nested", [[1, 2], [3]], GVT.ARRAY)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with ggml_lora.open(tmp_path / "g.gguf") as f:
        fields = f.fields
    with pytest.raises(ValueError, match="nested"):
        ggml_lora.write(tmp_path / "out.gguf", fields, {})
    assert not (tmp_path / "out.gguf").exists()


def test_metadata_crosses_as_type_ids_not_names(tmp_path: Path) -> None:
    """The native writer reads ``value``/``type``/``sub_type`` attributes of any object, types as ids: an object
    that is not a ``MetadataValue`` writes the same (oracle: gguf-py), and a type given as a name is refused."""
    meta = {
        "u": SimpleNamespace(value=7, type=int(GVT.UINT16), sub_type=None),
        "a": SimpleNamespace(value=["x", "y"], type=int(GVT.ARRAY), sub_type=int(GVT.STRING)),
    }
    out = _native.write_gguf(str(tmp_path / "m.gguf"), meta, [], [])
    fields = gguf.GGUFReader(out).fields
    assert fields["u"].types == [GVT.UINT16] and fields["u"].contents() == 7
    assert fields["a"].types == [GVT.ARRAY, GVT.STRING] and fields["a"].contents() == ["x", "y"]
    for bad in (SimpleNamespace(value=7, type="UINT16", sub_type=None), SimpleNamespace(value=7, type=13,
                                                                                          sub_type=None)):
        with pytest.raises(ValueError, match='metadata key "k"'):
            _native.write_gguf(str(tmp_path / "bad.gguf"), {"k": bad}, [], [])
    assert not (tmp_path / "bad.gguf").exists()


# ---------------------------------------------------------------------------------------------------------
# the typed objects


def _model_by_gguf_py(path: Path) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("n", 3)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 64), np.float32))
    q = np.zeros((2, 2 * 34), np.uint8)  # two rows of two q8_0 blocks (64 elements)
    w.add_tensor("blk.0.ffn_up.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("norm", np.zeros(7, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tensor_info_fields_and_repr(tmp_path: Path) -> None:
    """``TensorInfo`` (native, the public class): named fields as gguf-py reads the file (``offset`` absolute,
    gguf-py's ``data_offset``), a repr that evaluates to an equal object, value equality and hashing."""
    path = _model_by_gguf_py(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    infos = _native.GGUFFile(str(path)).tensors()
    assert ggml_lora.TensorInfo is _native.TensorInfo
    assert [t.name for t in infos] == [t.name for t in reader.tensors]
    for info, ref in zip(infos, reader.tensors):
        assert info.shape == tuple(int(d) for d in reversed(ref.shape)) and info.dims == tuple(int(d) for d in ref.shape)
        assert info.type == ref.tensor_type.name.lower()
        assert info.offset == ref.data_offset and info.nbytes == ref.n_bytes and info.n_elements == ref.n_elements
        assert info.shard == 0
        again = eval(repr(info), {"TensorInfo": ggml_lora.TensorInfo})  # noqa: S307 - our own repr
        assert again == info and hash(again) == hash(info)
    assert repr(infos[2]) == f"TensorInfo(name='norm', shape=(7,), type='f32', offset={reader.tensors[2].data_offset}, " \
                             f"nbytes=28, shard=0)"
    assert infos[0] != infos[1]
    assert pickle.loads(pickle.dumps(infos[1])) == infos[1] and copy.copy(infos[1]) == infos[1]
    with pytest.raises(AttributeError):
        infos[0].offset = 0  # type: ignore[misc]  # frozen


def test_shard_and_metadata_field_reprs(tmp_path: Path) -> None:
    """``Shard`` and ``MetadataField`` name their fields; the reprs show them (oracle: gguf-py's reading)."""
    path = _model_by_gguf_py(tmp_path / "m.gguf")
    native = _native.GGUFFile(str(path))
    (shard,) = native.shards()
    assert shard.path == path and shard.n_tensors == len(gguf.GGUFReader(path).tensors)
    assert repr(shard) == f"Shard(path={str(path)!r}, n_tensors=3)"
    fields = {m.key: m for m in native.metadata()}
    assert repr(fields["n"]) == "MetadataField(key='n', type=UINT32, value=3)"
    assert repr(fields["general.architecture"]) == "MetadataField(key='general.architecture', type=STRING, value='llama')"


def test_tensor_spec_and_stream_writer_tensors(tmp_path: Path) -> None:
    """``TensorSpec``: what the writers take, and what ``GGUFStreamWriter.tensors()`` gives back, with its data size
    (oracle: gguf-py's ``GGML_QUANT_SIZES``)."""
    spec = _native.TensorSpec("w", [3, 64], "q8_0")
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    assert (spec.name, spec.shape, spec.type, spec.nbytes) == ("w", (3, 64), "q8_0", 3 * 64 // block * size)
    assert repr(spec) == "TensorSpec(name='w', shape=(3, 64), type='q8_0')"
    with pytest.raises(ValueError, match="unknown ggml type"):
        _native.TensorSpec("w", [64], "q9_0")
    with pytest.raises(ValueError, match="block"):
        _ = _native.TensorSpec("w", [33], "q8_0").nbytes
    writer = _native.GGUFStreamWriter(str(tmp_path / "s.gguf"), {}, [spec, _native.TensorSpec("b", [5], "f16")])
    assert [(t.name, t.shape, t.type, t.nbytes) for t in writer.tensors()] == [("w", (3, 64), "q8_0", 204),
                                                                                ("b", (5,), "f16", 10)]
    writer.abort()


def test_type_info_fields_agree_with_gguf_py() -> None:
    """``TypeInfo`` (native, the public class) of every type gguf-py knows: id, block size and bytes per block as
    gguf-py has them; the repr names every field."""
    assert ggml_lora.TypeInfo is _native.TypeInfo
    table = _native.type_table()
    assert [t.id for t in table] == sorted(t.id for t in table)
    by_name = {t.name: t for t in table}
    for member, (block, size) in gguf.GGML_QUANT_SIZES.items():
        info = by_name[member.name.lower()]
        assert (info.id, info.block_size, info.type_size) == (int(member), block, size)
    q8 = by_name["q8_0"]
    assert repr(q8) == "TypeInfo(name='q8_0', id=8, block_size=32, type_size=34, can_quantize=True, can_dequantize=True)"
    assert ggml_lora.GGML_TYPES["q8_0"] == q8


def test_lora_pair_fields(tmp_path: Path) -> None:
    """``Adapter.pairs()`` gives ``LoraPair``s: target, the patched tensor's rows and columns, rank, llama.cpp's
    scale ``alpha / rank`` and DoRA (never, in a GGUF adapter), for an adapter written by gguf-py."""
    w = gguf.GGUFWriter(tmp_path / "a.gguf", "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.ones((4, 64), np.float32))  # (rank, cols)
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.ones((32, 4), np.float32))  # (rows, rank)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (pair,) = _native.Adapter.open(str(tmp_path / "a.gguf")).pairs()
    assert (pair.target, pair.rows, pair.cols, pair.rank, pair.scale, pair.dora) == (
        "blk.0.attn_q.weight", 32, 64, 4, 8.0 / 4, False)
    assert repr(pair) == "LoraPair(target='blk.0.attn_q.weight', rows=32, cols=64, rank=4, scale=2.0, dora=False)"


def test_imatrix_data_fields(tmp_path: Path) -> None:
    """``read_imatrix`` gives an ``ImatrixData`` with named fields; weights are ``in_sum2 / count`` (counts of 1:
    the sums exactly), entries by name, the metadata as gguf-py wrote it."""
    sums = {"blk.1.ffn_up.weight": np.arange(1, 65, dtype=np.float32), "blk.0.attn_k.weight": np.full(32, 2.5, np.float32)}
    w = gguf.GGUFWriter(tmp_path / "i.gguf", "unused")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE)
    w.add_string(gguf.Keys.General.TYPE, "imatrix")
    w.add_array(gguf.Keys.IMatrix.DATASETS, ["a.txt", "b.txt"])
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, 11)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, 512)
    for name, s in sums.items():
        w.add_tensor(f"{name}.in_sum2", s.reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.ones((1, 1), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = _native.read_imatrix(str(tmp_path / "i.gguf"))
    assert (data.source, data.datasets, data.chunk_count, data.legacy) == (
        str(tmp_path / "i.gguf"), ["a.txt", "b.txt"], 11, False)
    assert list(data.entries) == sorted(sums)
    for name, s in sums.items():
        assert data.entries[name].dtype == np.float32 and np.array_equal(data.entries[name], s)
    assert repr(data) == (f"ImatrixData(source={str(tmp_path / 'i.gguf')!r}, entries=<2 entries>, "
                          "datasets=['a.txt', 'b.txt'], chunk_count=11, legacy=False)")


def test_split_rule_is_typed():
    """The output split crosses as a ``SplitRule`` made by named constructors (no kind strings re-parsed): each
    constructor's kind and limit, equality by value, and a repr that names the constructor."""
    rules = [_native.SplitRule.keep(), _native.SplitRule.merge(), _native.SplitRule.max_tensors(7),
             _native.SplitRule.max_bytes(4_000_000_000)]
    assert [(r.kind, r.limit) for r in rules] == [("keep", None), ("merge", None), ("max_tensors", 7),
                                                  ("max_bytes", 4_000_000_000)]
    assert [repr(r) for r in rules] == ["SplitRule.keep()", "SplitRule.merge()", "SplitRule.max_tensors(7)",
                                        "SplitRule.max_bytes(4000000000)"]
    assert _native.SplitRule.max_tensors(7) == _native.SplitRule.max_tensors(7)
    assert _native.SplitRule.max_tensors(7) != _native.SplitRule.max_bytes(7)
    assert ggml_lora.gguf.split_rule(split_max_size="4G") == _native.SplitRule.max_bytes(4 * 1000**3)


@pytest.mark.parametrize(("alpha", "rank", "user"), [(16.0, 8, 1.0), (32.0, 3, 0.5), (0.0, 8, 0.75), (1e-3, 7, 2.0)])
def test_llama_scale_is_llama_cpps_rule(alpha, rank, user):
    """llama.cpp's adapter scale (llama-adapter.cpp, restated): ``alpha ? scale * alpha / rank : scale``, in f32."""
    f32 = np.float32
    expected = f32(user) * f32(alpha) / f32(rank) if alpha else f32(user)
    assert f32(_native.llama_scale(alpha, rank, user)) == expected
