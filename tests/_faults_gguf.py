"""GGUF bytes for the fault suite: an independent header walker (every field's offset and size) and builders.

Nothing here uses ggml_lora: the walker is a second, deliberately simple reading of the format (docs/FORMATS.md §1,
ggml's gguf.cpp), so that the fault tests can cut and corrupt files at exact field boundaries without trusting
the reader under test. ``fuzz/seed_corpus.py`` uses it too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

GGUF_MAGIC = b"GGUF"
#: Fixed value sizes by GGUF value type id (STRING = 8 and ARRAY = 9 are variable).
VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
#: ggml type id -> (block size, bytes per block), the types present in the fixtures plus a few more.
GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
               10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 30: (1, 2)}


@dataclass
class Field:
    """One header field: what it is, where it starts and how many bytes it takes."""

    what: str
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass
class Tensor:
    name: str
    dims: list[int]
    type: int
    offset: int
    #: Offsets of the tensor-info fields, for targeted corruption.
    fields: dict[str, Field] = field(default_factory=dict)


@dataclass
class Header:
    version: int
    n_tensors: int
    n_kv: int
    alignment: int
    fields: list[Field]
    #: Per metadata entry: (key, value type, Field of the key length, Field of the value type, value start, end).
    kvs: list[tuple[str, int, Field, Field, int, int]]
    tensors: list[Tensor]
    #: End of the tensor infos (before padding).
    infos_end: int
    data_offset: int


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.fields: list[Field] = []

    def take(self, fmt: str, what: str) -> tuple[int, Field]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ValueError(f"truncated at {what}")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        f = Field(what, self.pos, size)
        self.fields.append(f)
        self.pos += size
        return value, f

    def raw(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"truncated at {what}")
        f = Field(what, self.pos, n)
        self.fields.append(f)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def string(self, what: str) -> tuple[bytes, Field]:
        n, lf = self.take("<Q", f"{what} length")
        return self.raw(n, what), lf

    def value(self, vtype: int, what: str) -> object:
        if vtype in VALUE_SIZES:
            fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[VALUE_SIZES[vtype]]
            return self.take(fmt, what)[0]
        if vtype == 8:
            return self.string(what)[0]
        if vtype == 9:
            elem, _ = self.take("<I", f"{what} element type")
            count, _ = self.take("<Q", f"{what} element count")
            if elem in VALUE_SIZES:  # one field for the whole run of fixed-size elements
                self.raw(count * VALUE_SIZES[elem], f"{what} elements")
                return None
            return [self.value(elem, f"{what}[{i}]") for i in range(count)]
        raise ValueError(f"unknown value type {vtype}")


def walk(data: bytes) -> Header:
    """Walks a well-formed GGUF header, recording every field. Raises ValueError on anything unexpected."""
    c = _Cursor(data)
    if c.raw(4, "magic") != GGUF_MAGIC:
        raise ValueError("bad magic")
    version, _ = c.take("<I", "version")
    n_tensors, _ = c.take("<Q", "tensor count")
    n_kv, _ = c.take("<Q", "kv count")
    kvs = []
    alignment = 32
    for i in range(n_kv):
        key_len_at = c.pos
        key, key_len_field = c.string(f"kv{i} key")
        vtype, vtype_field = c.take("<I", f"kv{i} type")
        start = c.pos
        value = c.value(vtype, f"kv{i} value")
        if key == b"general.alignment" and vtype == 4:
            alignment = int(value)  # type: ignore[arg-type]
        kvs.append((key.decode(), vtype, key_len_field, vtype_field, start, c.pos))
        assert key_len_field.offset == key_len_at
    tensors = []
    for i in range(n_tensors):
        fs: dict[str, Field] = {}
        name, fs["name_len"] = c.string(f"tensor{i} name")
        n_dims, fs["n_dims"] = c.take("<I", f"tensor{i} n_dims")
        dims = []
        for j in range(n_dims):
            d, fs[f"dim{j}"] = c.take("<Q", f"tensor{i} dim{j}")
            dims.append(d)
        ttype, fs["type"] = c.take("<I", f"tensor{i} type")
        off, fs["offset"] = c.take("<Q", f"tensor{i} offset")
        tensors.append(Tensor(name.decode(), dims, ttype, off, fs))
    infos_end = c.pos
    data_offset = -(-infos_end // alignment) * alignment if tensors else infos_end
    return Header(version, n_tensors, n_kv, alignment, c.fields, kvs, tensors, infos_end, data_offset)


def tensor_nbytes(dims: list[int], ttype: int) -> int:
    block, nbytes = GGML_BLOCKS[ttype]
    n = 1
    for d in dims:
        n *= d
    return n // block * nbytes


# ---------------------------------------------------------------------------------------------------------
# building

def gguf_string(s: bytes | str) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    """One metadata entry; ``payload`` is the already-encoded value."""
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str | bytes, dims: list[int], ttype: int, offset: int) -> bytes:
    out = gguf_string(name) + struct.pack("<I", len(dims))
    out += b"".join(struct.pack("<Q", d) for d in dims)
    return out + struct.pack("<IQ", ttype, offset)


def build(kvs: list[bytes], infos: list[bytes], data: bytes = b"", *, version: int = 3, n_tensors: int | None = None,
          n_kv: int | None = None, alignment: int = 32, magic: bytes = GGUF_MAGIC) -> bytes:
    """A GGUF file from encoded parts; counts default to the number of parts; data is padded in after the infos."""
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    if infos:
        body += b"\0" * (-len(body) % alignment)
    return body + data


def shrink(data: bytes, *, max_rows: int = 2) -> bytes:
    """A small valid GGUF with the same metadata (copied verbatim) and tensors (names, types) as ``data``, each
    cut to at most ``max_rows`` rows of its real bytes (1-D tensors to one block): realistic seeds and fast
    fault cases."""
    h = walk(data)
    kv_bytes = b"".join(data[k[2].offset:k[5]] for k in h.kvs)
    infos, blobs, offset = [], [], 0
    for t in h.tensors:
        block, bb = GGML_BLOCKS.get(t.type, (None, None))
        if block is None:
            continue
        dims = [t.dims[0], min(t.dims[1], max_rows)] if len(t.dims) >= 2 else [block]
        n = tensor_nbytes(dims, t.type)
        start = h.data_offset + t.offset
        blob = data[start:start + n]
        infos.append(tensor_info(t.name, dims, t.type, offset))
        blob += b"\0" * (-len(blob) % h.alignment)
        blobs.append(blob)
        offset += len(blob)
    return build([kv_bytes] if kv_bytes else [], infos, b"".join(blobs), n_kv=h.n_kv, alignment=h.alignment)
