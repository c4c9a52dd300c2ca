"""Exceptions carry the facts of the error as attributes (kind, path, offset, tensor, expected, found).

Oracle: the byte layout of the GGUF header from the spec (magic 4 bytes, version u32, tensor count u64, ...), the
files built here with gguf-py, and the shapes written into them. Nothing from ggml_lora builds an expected value.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import ggml_lora
from conftest import write_with_gguf_py
from ggml_lora.convert import ConversionError

ATTRIBUTES = ("kind", "path", "offset", "tensor", "expected", "found")


def test_truncated_header_names_the_field_offset(tmp_path: Path) -> None:
    # Magic (4 bytes) and version (4) complete, then 3 of the 8 bytes of the tensor count: the field starts at 8.
    path = tmp_path / "cut.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x01\x00\x00")
    with pytest.raises(ggml_lora.GGUFError) as info:
        ggml_lora.open(path)
    e = info.value
    assert (e.kind, e.path, e.offset) == ("truncated", str(path), 8)
    assert (e.expected, e.found) == ("8 bytes", "3 bytes")
    assert e.tensor is None


def test_bad_magic_is_at_offset_zero(tmp_path: Path) -> None:
    path = tmp_path / "not.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ggml_lora.GGUFError) as info:
        ggml_lora.open(path)
    assert (info.value.kind, info.value.offset, info.value.path) == ("bad_magic", 0, str(path))


def test_missing_file_is_an_os_error_with_details(tmp_path: Path) -> None:
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError) as info:
        ggml_lora.open(path)
    assert (info.value.kind, info.value.path) == ("not_found", str(path))  # type: ignore[attr-defined]


def test_patch_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = write_with_gguf_py(tmp_path / "m.gguf", {"blk.0.attn_q.weight": (rng.standard_normal((64, 32), dtype=np.float32), None)})
    # A rank-4 adapter whose lora_b has 48 output rows, where the model's tensor has 64.
    a = rng.standard_normal((4, 32), dtype=np.float32)  # numpy (r, n_in): ne [n_in, r]
    b = rng.standard_normal((48, 4), dtype=np.float32)  # numpy (n_out, r): ne [r, n_out]
    adapter = write_with_gguf_py(
        tmp_path / "a.gguf",
        {"blk.0.attn_q.weight.lora_a": (a, None), "blk.0.attn_q.weight.lora_b": (b, None)},
        {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 4.0},
    )
    with pytest.raises(ggml_lora.PatchError) as info:
        ggml_lora.patch(model, adapter, out=tmp_path / "out.gguf")
    e = info.value
    assert e.kind == "shape_mismatch"
    assert e.tensor == "blk.0.attn_q.weight"
    # The two shapes (numpy order), in the error's own framing (which side it calls expected is its choice).
    assert {e.expected, e.found} == {"[64, 32]", "[48, 32]"}
    assert not (tmp_path / "out.gguf").exists()


def test_classes_default_every_attribute_to_none() -> None:
    for cls in (ggml_lora.GGUFError, ggml_lora.PatchError, ggml_lora.SpecialFileError, ConversionError):
        e = cls("x")
        assert all(getattr(e, name) is None for name in ATTRIBUTES), cls
        assert isinstance(e, ValueError)


def test_conversion_error_wrapping_keeps_the_facts(tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x01")
    with pytest.raises(ggml_lora.GGUFError) as info:
        ggml_lora.open(path)
    wrapped = ConversionError.wrapping(info.value, "base model: unreadable")
    assert str(wrapped) == "base model: unreadable"
    assert (wrapped.kind, wrapped.path, wrapped.offset) == ("truncated", str(path), 8)


def test_safetensors_refusals_name_the_tensor_and_both_offsets(tmp_path: Path) -> None:
    # Two f32 tensors of 4 values: B claims bytes [12, 28), overlapping A's [0, 16). The header is built here.
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [12, 28]}}
    head = json.dumps(header).encode()
    head += b" " * ((-len(head)) % 8)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + bytes(28))
    with pytest.raises(ggml_lora.GGUFError) as info:
        ggml_lora._native.PeftWeights.open_safetensors(path)
    e = info.value
    assert (e.kind, e.path, e.tensor) == ("tensor_offset", str(path), "b")
    assert (e.expected, e.found) == ("16", "12")  # where A ends, where B starts
    assert 'tensor "b": data_offsets [12, 28] overlap tensor "a", which ends at 16' in str(e)
