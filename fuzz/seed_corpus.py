#!/usr/bin/env python3
"""Builds the fuzz seed corpora under fuzz/corpus/<target>/ from the real files in ../shared/fixtures (and, for
imatrix_parse, small importance matrices of both formats built here).

Nothing here is committed (fuzz/corpus is gitignored): every run rebuilds the same files from the fixtures,
plus the small hand-made edge cases committed under fuzz/seeds/<target>/. Needs only the standard library
(and tests/_faults_gguf.py, the fault suite's independent GGUF walker).

    python fuzz/seed_corpus.py            # from the repository root
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
REPO = FUZZ.parent
FIXTURES = (REPO.parent / "shared" / "fixtures").resolve()
sys.path.insert(0, str(REPO / "tests"))

import _faults_gguf as g  # noqa: E402

#: Real files at most this big go in whole (libFuzzer slows down on big inputs; -max_len caps mutations).
WHOLE_LIMIT = 64 * 1024


def put(target: str, data: bytes, tag: str) -> None:
    d = FUZZ / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{tag}-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)


def fixtures() -> list[Path]:
    files = sorted(FIXTURES.rglob("*.gguf"))
    if not files:
        sys.exit(f"no .gguf fixtures under {FIXTURES}")
    return files


def ggla_from_adapter(data: bytes, *, f16: bool, legacy_names: bool, max_pairs: int = 2, rank: int = 2) -> bytes:
    """A ggla file holding the first pairs of a GGUF adapter, cut to `rank` (loraA ne [r, n_in], loraB ne [r, n_out])."""
    h = g.walk(data)
    alpha = 16
    out = bytearray(b"algg" + struct.pack("<iii", 1, rank, alpha))
    pairs = [t for t in h.tensors if t.name.endswith(".lora_a")][:max_pairs]
    for a in pairs:
        b = next(t for t in h.tensors if t.name == a.name[:-7] + ".lora_b")
        target = a.name[:-7]
        if legacy_names and target.startswith("blk."):
            _, layer, part, _ = target.split(".", 3)
            old = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
                   "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
                   "ffn_up": "feed_forward.w3"}.get(part, part)
            target = f"layers.{layer}.{old}.weight"
        for suffix, t, n in (("loraA", a, a.dims[0]), ("loraB", b, b.dims[1])):
            # Real f32 values (the first rank*n of them), re-laid out as ne [rank, n].
            start = h.data_offset + t.offset
            vals = struct.unpack_from(f"<{rank * n}f", data, start)
            name = f"{target}.{suffix}".encode()
            out += struct.pack("<iii", 2, len(name), 1 if f16 else 0) + struct.pack("<ii", rank, n) + name
            out += b"\0" * (-len(out) % 32)
            out += struct.pack(f"<{rank * n}{'e' if f16 else 'f'}", *vals)
    return bytes(out)


def pairing_seed(model: bytes, adapter: bytes) -> bytes:
    """Raw mode of adapter_pairing: odd first byte, u16 split point, model bytes, adapter bytes."""
    split = len(model)  # the target takes split % (len - 1) + 2 as the cut after its 2 length bytes
    return b"\x01" + struct.pack("<H", split & 0xFFFF) + model + adapter


def matching_pair(base: bytes, adapter: bytes, keep: int = 2, rank: int = 2) -> tuple[bytes, bytes]:
    """A tiny model (real metadata, `keep` patched tensors cut to 4 rows) and an adapter that matches it."""
    hb, ha = g.walk(base), g.walk(adapter)
    targets = [t.name[:-7] for t in ha.tensors if t.name.endswith(".lora_a")][:keep]
    infos, blobs, off = [], [], 0
    rows = 4
    for t in hb.tensors:
        if t.name not in targets:
            continue
        dims = [t.dims[0], rows]
        n = g.tensor_nbytes(dims, t.type)
        start = hb.data_offset + t.offset
        blob = base[start:start + n]
        blob += b"\0" * (-len(blob) % 32)
        infos.append(g.tensor_info(t.name, dims, t.type, off))
        blobs.append(blob)
        off += len(blob)
    kv = b"".join(base[k[2].offset:k[5]] for k in hb.kvs if not k[0].startswith("tokenizer."))
    n_kv = sum(1 for k in hb.kvs if not k[0].startswith("tokenizer."))
    model = g.build([kv], infos, b"".join(blobs), n_kv=n_kv)
    ainfos, ablobs, off = [], [], 0
    for name in targets:
        bt = next(t for t in hb.tensors if t.name == name)
        for suffix, dims in ((".lora_a", [bt.dims[0], rank]), (".lora_b", [rank, rows])):
            t = next(t for t in ha.tensors if t.name == name + suffix)
            n = g.tensor_nbytes(dims, 0)
            start = ha.data_offset + t.offset
            blob = adapter[start:start + n]
            blob += b"\0" * (-len(blob) % 32)
            ainfos.append(g.tensor_info(name + suffix, dims, 0, off))
            ablobs.append(blob)
            off += len(blob)
    akv = b"".join(adapter[k[2].offset:k[5]] for k in ha.kvs)
    return model, g.build([akv], ainfos, b"".join(ablobs), n_kv=ha.n_kv)


def quant_seeds(base_f16: bytes, base_q4: bytes, base_q8: bytes) -> list[tuple[str, bytes]]:
    """Seeds for quant_roundtrip: byte 0 = mode (bit 3 set: bytes; bit 2: importance weights from the data) and
    blocks per row (bits 4-5), byte 1 = type index (taken modulo the number of types the mode covers)."""
    out = []
    h = g.walk(base_f16)
    t = next(t for t in h.tensors if t.type == 1 and len(t.dims) == 2)
    start = h.data_offset + t.offset
    vals = struct.unpack_from("<512e", base_f16, start)
    f32 = struct.pack("<512f", *vals)
    weights = struct.pack("<256f", *[abs(v) * 100 for v in vals[:256]])
    for ty in range(24):
        for bpr in (0, 1):
            out.append((f"real-f32-t{ty}-b{bpr}", bytes([bpr << 4, ty]) + f32))
        out.append((f"real-f32-imatrix-t{ty}", bytes([4, ty]) + weights + f32))
    special = [0.0, -0.0, 1.0, -1.0, 65504.0, 65520.0, -65536.0, 1e-40, -1e-45, 6e-8, 3e38, -3.4e38, 1e6, 0.5, 8.0, -8.0]
    block = struct.pack("<256f", *(special * 16))
    for ty in range(24):
        out.append((f"special-t{ty}", bytes([0, ty]) + block))
    nonfinite = struct.pack("<32f", *([1.0] * 7 + [float("nan")] + [float("inf")] + [2.0] * 23))
    out.append(("nonfinite", bytes([0, 3]) + nonfinite * 8))
    for name, data, ty, bb in (("q4", base_q4, 2, 18), ("q8", base_q8, 8, 34)):
        hh = g.walk(data)
        tt = next(t for t in hh.tensors if t.type == ty)
        s = hh.data_offset + tt.offset
        for index in range(48):
            out.append((f"real-{name}-bytes-t{index}", bytes([8, index]) + data[s:s + 64 * bb]))
    return out


def imatrix_gguf(stats: list[tuple[str, int, list[float], list[float]]], *, general_type: bool = True) -> bytes:
    """An imatrix GGUF as llama-imatrix writes it: general.type, imatrix.datasets/chunk_count/chunk_size, then per
    weight (name, row_len, sums, counts) `<name>.in_sum2` ne [row_len, n_expert] and `<name>.counts` ne [1, n_expert]."""
    string, u32, array = 8, 4, 9
    kvs = [g.kv("general.type", string, g.gguf_string("imatrix"))] if general_type else []
    kvs += [
        g.kv("imatrix.datasets", array, struct.pack("<IQ", string, 1) + g.gguf_string("wiki.train.raw")),
        g.kv("imatrix.chunk_count", u32, struct.pack("<I", 10)),
        g.kv("imatrix.chunk_size", u32, struct.pack("<I", 512)),
    ]
    infos, blobs, off = [], [], 0
    for name, row_len, sums, counts in sorted(stats):
        for suffix, dims, values in ((".in_sum2", [row_len, len(counts)], sums), (".counts", [1, len(counts)], counts)):
            blob = struct.pack(f"<{len(values)}f", *values)
            blob += b"\0" * (-len(blob) % 32)
            infos.append(g.tensor_info(name + suffix, dims, 0, off))
            blobs.append(blob)
            off += len(blob)
    return g.build(kvs, infos, b"".join(blobs))


def imatrix_dat(entries: list[tuple[str, int, list[float]]], trailer: bytes) -> bytes:
    """A legacy .dat as llama.cpp's imatrix-loader reads it: i32 n_entries; per entry i32 len, name, i32 ncall,
    i32 nval, f32 values; then the optional trailer (i32 chunk count, i32 len, dataset name)."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(values))
        out += struct.pack(f"<{len(values)}f", *values)
    return out + trailer


def imatrix_seeds() -> list[tuple[str, bytes]]:
    dense = [0.5 + i * 0.25 for i in range(32)]
    experts = [float(i % 7) for i in range(4 * 8)]
    stats = [("blk.0.attn_q.weight", 32, dense, [300.0]),
             ("blk.0.ffn_up_exps.weight", 8, experts, [2.5, 0.0, 0.25, 1e3])]
    trailer = struct.pack("<ii", 10, 14) + b"wiki.train.raw"
    entries = [("blk.0.attn_q.weight", 1, dense), ("blk.0.ffn_up_exps.weight", 2, experts),
               ("output.weight", 0, dense[:8])]
    return [
        ("gguf-dense-and-experts", imatrix_gguf(stats)),
        ("gguf-no-general-type", imatrix_gguf(stats[:1], general_type=False)),
        ("dat-full", imatrix_dat(entries, trailer)),
        ("dat-no-trailer", imatrix_dat(entries[:1], b"")),
        ("dat-chunk-count-only", imatrix_dat(entries[1:], struct.pack("<i", 3))),
    ]


def legacy_seeds() -> list[tuple[str, bytes]]:
    """Tiny legacy llama files (docs/FORMATS.md §4): ggjt v1-v3, ggmf v1, ggml; one block of n_embd 32, f32/f16/q4_0."""
    magics = {"ggml": 0x67676D6C, "ggmf": 0x67676D66, "ggjt": 0x67676A74}
    out = []
    for container, version, type_id, type_bytes in (("ggjt", 3, 0, 4), ("ggjt", 3, 2, 18), ("ggjt", 2, 1, 2),
                                                      ("ggjt", 1, 1, 2), ("ggmf", 1, 1, 2), ("ggml", 1, 0, 4)):
        data = bytearray(struct.pack("<I", magics[container]))
        if container != "ggml":
            data += struct.pack("<I", version)
        data += struct.pack("<7I", 4, 32, 256, 4, 1, 8, 0)
        for i, text in enumerate((b"", b"", b"", b" a")):
            data += struct.pack("<I", len(text)) + text + (struct.pack("<f", -i) if container != "ggml" else b"")
        for name, dims, ty in ((b"tok_embeddings.weight", [32, 4], type_id), (b"norm.weight", [32], 0),
                               (b"layers.0.feed_forward.w1.weight", [32, 64], type_id)):
            data += struct.pack("<3I", len(dims), len(name), ty) + struct.pack(f"<{len(dims)}I", *dims) + name
            if container == "ggjt":
                data += bytes(-len(data) % 32)
            n = dims[0] * (dims[1] if len(dims) > 1 else 1)
            size = 4 if ty == 0 else 2 if ty == 1 else 18
            data += bytes(n * size // (32 if ty == 2 else 1))
        out.append((f"{container}-v{version}-type{type_id}", bytes(data)))
    return out


def gguf_bytes(kv: list[tuple[str, int, bytes]], tensors: list[tuple[str, int]]) -> bytes:
    """A GGUF v3 file: `kv` as (key, value type id, encoded value); `tensors` as (name, f32 count) of zeros."""
    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)))
    for key, type_id, value in kv:
        out += string(key) + struct.pack("<I", type_id) + value
    offset = 0
    for name, n in tensors:
        out += string(name) + struct.pack("<IQIQ", 1, n, 0, offset)
        offset += -(-4 * n // 32) * 32
    out += bytes(-len(out) % 32)
    for _, n in tensors:
        out += bytes(-(-4 * n // 32) * 32)
    return bytes(out)


def shard_seeds() -> list[tuple[str, bytes]]:
    """Inputs for shard_set: a selector byte (files - 1 in bits 0-1, the opened file above), then each file but
    the last prefixed by its u16 length. Consistent sets of 2 and 3 shards, and a few broken ones."""
    def shard(no: int, count: int, total: int, names: list[str], arch: bool) -> bytes:
        kv = [("general.architecture", 8, struct.pack("<Q", 5) + b"llama")] if arch else []
        kv += [("split.no", 2, struct.pack("<H", no)), ("split.count", 2, struct.pack("<H", count)),
               ("split.tensors.count", 5, struct.pack("<i", total))]
        return gguf_bytes(kv, [(n, 8) for n in names])

    def pack(files: list[bytes], opened: int) -> bytes:
        out = bytearray([(len(files) - 1) | (opened << 2)])
        for f in files[:-1]:
            out += struct.pack("<H", len(f)) + f
        return bytes(out + files[-1])

    seeds = []
    for count in (2, 3):
        files = [shard(k, count, 2 * count, [f"t{k}.{j}" for j in range(2)], k == 0) for k in range(count)]
        for opened in range(count):
            seeds.append((f"set{count}-open{opened}", pack(files, opened)))
    good = [shard(k, 2, 4, [f"t{k}.{j}" for j in range(2)], k == 0) for k in range(2)]
    seeds.append(("duplicate-shard", pack([good[0], good[0]], 0)))
    seeds.append(("wrong-count", pack([good[0], shard(1, 3, 4, ["t1.0", "t1.1"], False)], 0)))
    seeds.append(("duplicate-tensor", pack([good[0], shard(1, 2, 4, ["t0.0", "t1.1"], False)], 1)))
    seeds.append(("single", pack([gguf_bytes([], [("w", 8)])], 0)))
    return seeds
def _unicode(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def torch_state_pickle(tensors: list[tuple[str, str, int, list[int], list[int]]], storage: str = "FloatStorage") -> bytes:
    """A protocol-2 pickle of ``{name: _rebuild_tensor_v2(storage(key), offset, size, stride, False, OrderedDict())}``
    written opcode by opcode (as torch.save writes it); each tensor is (name, key, numel, size, stride)."""
    p = b"\x80\x02}("
    for name, key, numel, size, stride in tensors:
        p += _unicode(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(("
        p += _unicode("storage") + f"ctorch\n{storage}\n".encode() + _unicode(key) + _unicode("cpu")
        p += b"J" + struct.pack("<i", numel) + b"tQK\x00"
        for dims in (size, stride):
            p += b"(" + b"".join(b"J" + struct.pack("<i", d) for d in dims) + b"t"
        p += b"\x89ccollections\nOrderedDict\n)RtR"
    return p + b"u."


def torch_zip(members: list[tuple[str, bytes]], deflate: bool = False) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def torch_bin_seeds(fixture: Path) -> list[tuple[str, bytes]]:
    """A small valid torch zip (stored and deflated), the fixture's pickle over tiny storages, hostile files."""
    pkl = torch_state_pickle([("a.lora_A.weight", "0", 8, [2, 4], [4, 1]), ("a.lora_B.weight", "1", 6, [3, 2], [1, 3])])
    store = [("archive/data/0", struct.pack("<8f", *range(8))), ("archive/data/1", struct.pack("<6f", *range(6)))]
    valid = [("archive/data.pkl", pkl), ("archive/byteorder", b"little"), ("archive/version", b"3\n"), *store]
    import zipfile

    with zipfile.ZipFile(fixture) as z:
        fixture_pkl = z.read("adapter_model/data.pkl")
    legacy = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + b".\x80\x02M\xe9\x03."
    return [
        ("valid-stored", torch_zip(valid)),
        ("valid-deflated", torch_zip(valid, deflate=True)),
        ("big-endian", torch_zip([valid[0], ("archive/byteorder", b"big"), *store])),
        ("bf16", torch_zip([("archive/data.pkl", torch_state_pickle([("w", "0", 4, [2, 2], [2, 1])], "BFloat16Storage")),
                            ("archive/data/0", bytes(range(8)))])),
        ("fixture-pickle-no-storages", torch_zip([("adapter_model/data.pkl", fixture_pkl)])),
        ("os-system", torch_zip([("archive/data.pkl", b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00id\x85R.")])),
        ("legacy", legacy),
        ("plain-pickle", b"\x80\x04}\x94."),
    ]


def torch_pickle_seeds() -> list[tuple[str, bytes]]:
    """Pickles that exercise each opcode family and each limit's neighbourhood (kept small)."""
    dag = b"N\x85q\x000" + b"".join(bytes([0x68, i, 0x68, i, 0x86, 0x71, i + 1, 0x30]) for i in range(40)) + b"h\x28"
    return [
        ("state-dict", torch_state_pickle([("w", "0", 4, [2, 2], [2, 1])])),
        ("nested-tuples", b"\x80\x02}N" + b"\x85" * 70 + b"K\x01s."),
        ("memo-dag-key", b"\x80\x02}" + dag + b"K\x01s."),
        ("memo-dag-pid", b"\x80\x02" + dag + b"Q."),
        ("protocol0", b"(dp0\nS'a'\np1\nI1\nsS'b'\nF1.5\nsV\\u00e9\nL12L\ns."),
        ("protocol4-frame", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94]\x94(K\x01K\x02eu."),
        ("stack-global", b"\x80\x04\x8c\x0bcollections\x8c\x0bOrderedDict\x93)R\x94."),
        ("inst", b"(S'touch x'\nios\nsystem\n."),
        ("build-metadata", b"\x80\x02ccollections\nOrderedDict\n)R}X\x09\x00\x00\x00_metadata}sb."),
    ]


def pattern_seeds() -> list[tuple[str, bytes]]:
    """Pattern keys and a module name, NUL-separated (the last piece is the name)."""
    return [
        ("simple", b"q_proj\0model.layers.0.self_attn.q_proj"),
        ("regex", b"layers\\.\\d+\\.mlp\\..*\0v_proj\0model.layers.12.mlp.up_proj"),
        ("catastrophic", b"(.*.*)*x\0" + b"a" * 64),
        ("backreference", b"(a)\\1\0aa"),
        ("lookaround", b"(?=q)q_proj\0q_proj"),
        ("class-ops", b"[[:alpha:]&&a]\0a"),
        ("group-escape", b"a)|(b\0b"),
    ]


def main() -> None:
    corpus = FUZZ / "corpus"
    if corpus.exists():
        shutil.rmtree(corpus)
    files = fixtures()
    seen = set()
    for p in files:
        data = p.read_bytes()
        tag = p.relative_to(FIXTURES).as_posix().replace("/", "_")
        if len(data) <= WHOLE_LIMIT:
            put("gguf_parse", data, tag)
        small = g.shrink(data)
        if hashlib.sha1(small).digest() not in seen:
            seen.add(hashlib.sha1(small).digest())
            put("gguf_parse", small, f"shrunk-{tag}")
        # The header alone (tensors out of file): exercises every metadata path cheaply.
        h = g.walk(data)
        put("gguf_parse", data[:h.infos_end], f"header-{tag}")

    adapters = [p for p in files if p.name.startswith(("ref-adapter", "lora-a"))]
    for p in adapters:
        data = p.read_bytes()
        tag = p.relative_to(FIXTURES).as_posix().replace("/", "_")
        for f16 in (False, True):
            for legacy in (False, True):
                put("ggla_parse", ggla_from_adapter(data, f16=f16, legacy_names=legacy), f"{tag}-f16{int(f16)}-legacy{int(legacy)}")

    llama = FIXTURES / "llama-gqa"
    base_f16 = (llama / "base-f16.gguf").read_bytes()
    base_q4 = (llama / "base-q4_0.gguf").read_bytes()
    base_q8 = (llama / "base-q8_0.gguf").read_bytes()
    for adapter_path in (llama / "lora-r8" / "ref-adapter-f32.gguf", llama / "lora-qv-r4" / "ref-adapter-f32.gguf"):
        adapter = adapter_path.read_bytes()
        for base in (base_f16, base_q4, base_q8):
            model, small_adapter = matching_pair(base, adapter)
            put("adapter_pairing", pairing_seed(model, small_adapter), "raw-gguf")
        model, _ = matching_pair(base_f16, adapter)
        put("adapter_pairing", pairing_seed(model, ggla_from_adapter(adapter, f16=False, legacy_names=True)), "raw-ggla")
    for i in range(8):  # structured mode: even first byte, the rest drives the builder
        put("adapter_pairing", bytes([0]) + hashlib.sha256(bytes([i])).digest() * 8, f"structured-{i}")

    for tag, data in quant_seeds(base_f16, base_q4, base_q8):
        put("quant_roundtrip", data, tag)

    for tag, data in imatrix_seeds():
        put("imatrix_parse", data, tag)

    for tag, data in legacy_seeds():
        put("legacy_parse", data, tag)
    for tag, data in shard_seeds():
        put("shard_set", data, tag)
    for tag, data in torch_bin_seeds(FIXTURES / "llama-gqa" / "lora-r8" / "adapter-bin" / "adapter_model.bin"):
        put("torch_bin", data, tag)
        if not data.startswith(b"PK"):
            put("torch_pickle", data, tag)
    for tag, data in torch_pickle_seeds():
        put("torch_pickle", data, tag)
    for tag, data in pattern_seeds():
        put("pattern_keys", data, tag)

    # Hand-made edge cases (committed, each < 4 KB).
    for d in sorted((FUZZ / "seeds").glob("*/*")):
        put(d.parent.name, d.read_bytes(), f"seed-{d.name}")

    for d in sorted(corpus.iterdir()):
        n = len(list(d.iterdir()))
        size = sum(f.stat().st_size for f in d.iterdir())
        print(f"{d.name}: {n} files, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
