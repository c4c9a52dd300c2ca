"""Reading importance matrices (``ggml_lora.read_imatrix``) in both formats llama-imatrix writes.

The GGUF files are written with gguf-py's ``GGUFWriter`` in the layout of llama.cpp's ``tools/imatrix/imatrix.cpp``
(``save_imatrix``): metadata ``general.type``, ``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``
(no ``general.architecture``), then per entry in name order ``<name>.in_sum2`` (ne ``[row_len, n_expert]``) and
``<name>.counts`` (ne ``[1, n_expert]``), all f32. The legacy ``.dat`` files are written with ``struct`` following
``common/imatrix-loader.cpp``'s reader (and ``save_imatrix_legacy`` for the stored values). The expected weights are
computed here in numpy float32 as ``tools/quantize/quantize.cpp``'s ``load_imatrix`` does, never by ggml_lora.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any, Sequence

import gguf
import numpy as np
import pytest

import ggml_lora
from ggml_lora import GGUFError

F32 = np.float32


# ---------------------------------------------------------------------------------------------------------------
# Writers


class Typed:
    """A metadata value written with a deliberately chosen (wrong) GGUF type."""

    def __init__(self, value: Any, vtype: gguf.GGUFValueType) -> None:
        self.value, self.vtype = value, vtype


def write_gguf_imatrix(
    path: Path,
    tensors: Sequence[tuple[str, np.ndarray]],
    *,
    general_type: Any = "imatrix",
    datasets: Any = ("train.txt",),
    chunk_count: Any = 10,
    chunk_size: Any = 512,
) -> Path:
    """An imatrix GGUF with exactly the given tensors (in this order) and metadata; ``None`` omits a key."""
    w = gguf.GGUFWriter(path, "unused")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE)  # GGUFWriter always adds it; llama-imatrix does not
    for key, value in (
        (gguf.Keys.General.TYPE, general_type),
        (gguf.Keys.IMatrix.DATASETS, datasets),
        (gguf.Keys.IMatrix.CHUNK_COUNT, chunk_count),
        (gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size),
    ):
        if value is None:
            continue
        if isinstance(value, Typed):
            w.add_key_value(key, value.value, value.vtype)
        elif key == gguf.Keys.General.TYPE:
            w.add_string(key, value)
        elif key == gguf.Keys.IMatrix.DATASETS:
            w.add_array(key, list(value))
        else:
            w.add_uint32(key, value)
    for name, array in tensors:
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def imatrix_tensors(stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """llama-imatrix's tensors for raw ``(sums (n_expert, row_len), counts (n_expert,))`` per weight name."""
    out = []
    for name in sorted(stats):
        sums, counts = stats[name]
        n_expert = counts.shape[0]
        out.append((f"{name}.in_sum2", np.asarray(sums, dtype=F32).reshape(n_expert, -1)))
        out.append((f"{name}.counts", np.asarray(counts, dtype=F32).reshape(n_expert, 1)))
    return out


def dat_bytes(entries: Sequence[tuple[bytes, int, np.ndarray]], trailer: bytes = b"") -> bytes:
    """A legacy file as imatrix-loader.cpp reads it: i32 n_entries; per entry i32 len, name, i32 ncall, i32 nval,
    f32 values; then the optional trailer."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        values = np.asarray(values, dtype=F32).reshape(-1)
        out += struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    return out + trailer


def dat_trailer(chunk_count: int, dataset: bytes) -> bytes:
    return struct.pack("<ii", chunk_count, len(dataset)) + dataset


def legacy_stored(sums: np.ndarray, counts: np.ndarray, chunk_size: int) -> tuple[int, np.ndarray]:
    """What save_imatrix_legacy stores for raw stats (its counts are integers: the GGUF ones rounded):
    ncall = ceil(max count / chunk size), values (sum / count) * ncall in float32, 1 * ncall for experts
    without data."""
    int_counts = [lround(c) for c in counts]
    ncall = (max(int_counts) + chunk_size - 1) // chunk_size
    out = []
    for row, count in zip(np.asarray(sums, dtype=F32), int_counts):
        c = F32(count)
        if c == 0:
            out.append(np.full(row.shape, F32(1) / F32(1) * F32(ncall), dtype=F32))
        else:
            out.append((row / c) * F32(ncall))
    return ncall, np.concatenate(out).astype(F32)


# ---------------------------------------------------------------------------------------------------------------
# The normalisation of llama-quantize's load_imatrix, in numpy float32


def lround(x: float) -> int:
    """C's lround for the non-negative values used here: half away from zero (exact in f64 for any f32)."""
    return int(math.floor(float(x) + 0.5))


def expected_gguf(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    rows = []
    for row, c in zip(np.asarray(sums, dtype=F32).reshape(len(counts), -1), counts):
        count = F32(lround(c))
        rows.append(row / count if count > 0 else np.ones(row.shape, dtype=F32))
    return np.concatenate(rows).astype(F32)


def expected_legacy(stored: np.ndarray, ncall: int) -> np.ndarray:
    stored = np.asarray(stored, dtype=F32)
    return stored / F32(ncall) if ncall > 0 else stored


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    assert got.tobytes() == want.astype(F32).tobytes(), (got, want)


def read_error(path: Path, *needles: str, exc: type[Exception] = GGUFError) -> str:
    with pytest.raises(exc) as info:
        ggml_lora.read_imatrix(path)
    message = str(info.value)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


RNG = np.random.default_rng(8)
DENSE = (RNG.random((1, 64), dtype=F32) * 50, np.array([300.0]))
# Four experts of 32 columns: a half-count (lround up), a zero count (weights 1), a count below one half
# (lround to 0: weights 1) and a large count.
EXPERTS = (RNG.random((4, 32), dtype=F32) * 9, np.array([2.5, 0.0, 0.25, 123456.0]))


# ---------------------------------------------------------------------------------------------------------------
# Valid files


def test_gguf_imatrix_is_normalised_as_llama_quantize_does(tmp_path: Path) -> None:
    stats = {"blk.0.attn_q.weight": DENSE, "blk.0.ffn_up_exps.weight": EXPERTS, "output.weight": DENSE}
    path = write_gguf_imatrix(tmp_path / "m.gguf", imatrix_tensors(stats), datasets=("a.txt", "b.txt"), chunk_count=7)
    m = ggml_lora.read_imatrix(path)
    assert isinstance(m, ggml_lora.Imatrix)
    assert (m.source, m.datasets, m.chunk_count, m.legacy) == (str(path), ["a.txt", "b.txt"], 7, False)
    assert list(m) == sorted(stats) and len(m) == 3
    for name, (sums, counts) in stats.items():
        assert_same(m[name], expected_gguf(sums, counts))
    experts = m["blk.0.ffn_up_exps.weight"].reshape(4, -1)
    assert np.all(experts[1] == 1) and np.all(experts[2] == 1)
    assert not m["output.weight"].flags.writeable
    assert "(GGUF): 3 entries, 7 chunks" in repr(m)


def test_gguf_tensors_in_any_order_and_other_tensors_ignored(tmp_path: Path) -> None:
    tensors = imatrix_tensors({"a.weight": DENSE, "b.weight": EXPERTS})
    tensors = [tensors[3], tensors[0], ("not.an.entry", np.zeros(4, dtype=F32)), tensors[2], tensors[1]]
    m = ggml_lora.read_imatrix(write_gguf_imatrix(tmp_path / "m.gguf", tensors, general_type=None))
    assert list(m) == ["a.weight", "b.weight"]
    assert_same(m["b.weight"], expected_gguf(*EXPERTS))


def test_legacy_dat_with_chunk_count_and_dataset(tmp_path: Path) -> None:
    ncall_d, stored_d = legacy_stored(*DENSE, chunk_size=512)
    ncall_e, stored_e = legacy_stored(*EXPERTS, chunk_size=512)
    assert ncall_d == 1 and ncall_e == 242
    data = dat_bytes(
        [(b"blk.0.attn_q.weight", ncall_d, stored_d), (b"blk.0.ffn_up_exps.weight", ncall_e, stored_e)],
        dat_trailer(12, b"wiki.train.raw"),
    )
    path = tmp_path / "m.dat"
    path.write_bytes(data)
    m = ggml_lora.read_imatrix(path)
    assert (m.datasets, m.chunk_count, m.legacy) == (["wiki.train.raw"], 12, True)
    assert_same(m["blk.0.attn_q.weight"], expected_legacy(stored_d, ncall_d))
    assert_same(m["blk.0.ffn_up_exps.weight"], expected_legacy(stored_e, ncall_e))
    # The same statistics as GGUF give the same weights up to the legacy format's extra rounding (experts
    # without data: 1 in both).
    g = ggml_lora.read_imatrix(write_gguf_imatrix(tmp_path / "m.gguf", imatrix_tensors({"e": EXPERTS})))
    np.testing.assert_allclose(m["blk.0.ffn_up_exps.weight"], g["e"], rtol=1e-6)


@pytest.mark.parametrize(
    "trailer, chunk_count, datasets",
    [
        (b"", 0, []),  # the oldest files: entries only
        (struct.pack("<i", 33), 33, []),  # chunk count only
        (dat_trailer(5, b""), 5, []),  # no dataset name recorded
        (dat_trailer(5, b"data/a b.txt"), 5, ["data/a b.txt"]),
    ],
)
def test_legacy_dat_trailer_is_optional(tmp_path: Path, trailer: bytes, chunk_count: int, datasets: list[str]) -> None:
    sums = np.array([0.5, 7.0, 1e-20, 0.0], dtype=F32)
    path = tmp_path / "m.dat"
    path.write_bytes(dat_bytes([(b"w", 3, sums), (b"raw", 0, sums)], trailer))
    m = ggml_lora.read_imatrix(path)
    assert (m.chunk_count, m.datasets, m.legacy) == (chunk_count, datasets, True)
    assert_same(m["w"], expected_legacy(sums, 3))
    assert_same(m["raw"], sums)  # ncall 0: the raw sums, as load_imatrix keeps them


def test_weights_drive_quantize(tmp_path: Path) -> None:
    """The weights of a 2-D entry are what quantize(imatrix=) takes (one per column)."""
    path = write_gguf_imatrix(tmp_path / "m.gguf", imatrix_tensors({"w": DENSE}))
    m = ggml_lora.read_imatrix(path)
    x = RNG.standard_normal((4, 64), dtype=F32)
    q = ggml_lora.quantize(x, "q4_0", imatrix=m["w"])
    assert q.shape == (4, 2 * 18)


def test_imatrix_from_arrays() -> None:
    src = np.arange(4, dtype=np.float64).reshape(2, 2)
    m = ggml_lora.Imatrix({"b": src, "a": [1, 2]}, source="mem", chunk_count=3)
    assert list(m) == ["a", "b"] and m["b"].dtype == np.float32 and m["b"].shape == (4,)
    src[0, 0] = 9
    assert m["b"][0] == 0 and not m["b"].flags.writeable
    assert (m.source, m.datasets, m.chunk_count, m.legacy) == ("mem", [], 3, False)


# ---------------------------------------------------------------------------------------------------------------
# Malformed GGUF imatrix files


def gguf_ok() -> list[tuple[str, np.ndarray]]:
    return imatrix_tensors({"blk.0.attn_k.weight": DENSE})


def test_gguf_of_another_type_is_refused(tmp_path: Path) -> None:
    read_error(write_gguf_imatrix(tmp_path / "m.gguf", gguf_ok(), general_type="model"), 'general.type is "model"')


@pytest.mark.parametrize("key", ["datasets", "chunk_count", "chunk_size"])
def test_gguf_missing_metadata_is_refused(tmp_path: Path, key: str) -> None:
    path = write_gguf_imatrix(tmp_path / "m.gguf", gguf_ok(), **{key: None})
    read_error(path, f"metadata key imatrix.{key} is missing")


def test_gguf_metadata_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    path = write_gguf_imatrix(tmp_path / "a.gguf", gguf_ok(), chunk_count=Typed(7, gguf.GGUFValueType.INT32))
    read_error(path, "imatrix.chunk_count is INT32, expected UINT32")
    path = write_gguf_imatrix(tmp_path / "b.gguf", gguf_ok(), datasets=Typed("x.txt", gguf.GGUFValueType.STRING))
    read_error(path, "imatrix.datasets is STRING, expected ARRAY of STRING")
    path = write_gguf_imatrix(tmp_path / "c.gguf", gguf_ok(), general_type=Typed(1, gguf.GGUFValueType.UINT32))
    read_error(path, "general.type is UINT32, expected STRING")


def test_gguf_sums_without_counts_and_counts_without_sums(tmp_path: Path) -> None:
    sums, counts = gguf_ok()
    read_error(
        write_gguf_imatrix(tmp_path / "a.gguf", [sums]),
        'entry "blk.0.attn_k.weight" has a tensor "blk.0.attn_k.weight.in_sum2" but no "blk.0.attn_k.weight.counts"',
    )
    read_error(write_gguf_imatrix(tmp_path / "b.gguf", [counts]), 'but no "blk.0.attn_k.weight.in_sum2"')


def test_gguf_non_f32_tensors_are_refused(tmp_path: Path) -> None:
    (sums_name, sums), (counts_name, counts) = gguf_ok()
    path = write_gguf_imatrix(tmp_path / "a.gguf", [(sums_name, sums.astype(np.float16)), (counts_name, counts)])
    read_error(path, f'tensor "{sums_name}" is f16, expected f32')
    path = write_gguf_imatrix(tmp_path / "b.gguf", [(sums_name, sums), (counts_name, counts.astype(np.int32))])
    read_error(path, f'tensor "{counts_name}" is i32, expected f32')


def test_gguf_sums_that_do_not_divide_into_counts(tmp_path: Path) -> None:
    tensors = [("w.in_sum2", np.ones((1, 5), dtype=F32)), ("w.counts", np.ones((2, 1), dtype=F32))]
    read_error(write_gguf_imatrix(tmp_path / "m.gguf", tensors), '"w": 5 sums', "into 2 counts", "[1, 5]", "[2, 1]")


def test_gguf_names_with_nul_are_refused(tmp_path: Path) -> None:
    tensors = imatrix_tensors({"w\0x": DENSE})
    read_error(write_gguf_imatrix(tmp_path / "m.gguf", tensors), 'tensor name "w\\0x.in_sum2" holds a NUL byte')


def test_gguf_without_entries(tmp_path: Path) -> None:
    path = write_gguf_imatrix(tmp_path / "m.gguf", [("token_embd.weight", np.ones((2, 32), dtype=F32))])
    read_error(path, "no entries", "none of its 1 tensors")


@pytest.mark.parametrize("count", [-1.0, float("nan"), float("inf"), 1e19])
def test_gguf_bad_counts(tmp_path: Path, count: float) -> None:
    tensors = imatrix_tensors({"w": (np.ones((2, 4), dtype=F32), np.array([3.0, count]))})
    read_error(write_gguf_imatrix(tmp_path / "m.gguf", tensors), '"w": count 1 is', "expected a finite number >= 0")


@pytest.mark.parametrize("value, shown", [(-2.0, "-0.5"), (float("nan"), "NaN"), (float("inf"), "inf")])
def test_gguf_bad_weights(tmp_path: Path, value: float, shown: str) -> None:
    sums = np.ones((1, 8), dtype=F32)
    sums[0, 5] = value
    tensors = imatrix_tensors({"w": (sums, np.array([4.0]))})
    read_error(write_gguf_imatrix(tmp_path / "m.gguf", tensors), f'"w": weight 5 is {shown} after normalisation')


def test_broken_gguf_container(tmp_path: Path) -> None:
    good = write_gguf_imatrix(tmp_path / "m.gguf", gguf_ok()).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(good[:100])
    read_error(path, "malformed GGUF file at byte", "file ends inside")


# ---------------------------------------------------------------------------------------------------------------
# Malformed legacy files


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


GOOD_DAT = dat_bytes([(b"w", 2, np.array([1.0, 2.0], dtype=F32))], dat_trailer(1, b"d"))


def test_legacy_without_entries(tmp_path: Path) -> None:
    read_error(write(tmp_path / "zero.dat", struct.pack("<i", 0)), "no entries")
    read_error(write(tmp_path / "empty.dat", b""), "legacy imatrix file at byte 0", "entry count")
    read_error(write(tmp_path / "neg.dat", struct.pack("<i", -3)), "at byte 0", "entry count is -3")


@pytest.mark.parametrize(
    "cut, offset, what",
    [(2, 0, "entry count"), (6, 4, "name length of entry 0"), (8, 8, "name of entry 0"),
     (12, 9, 'call count of entry 0 ("w")'), (16, 13, 'value count of entry 0 ("w")'), (20, 17, "values of entry 0")],
)
def test_legacy_truncated_entries(tmp_path: Path, cut: int, offset: int, what: str) -> None:
    read_error(write(tmp_path / "m.dat", GOOD_DAT[:cut]), f"at byte {offset}", f"file ends inside {what}")


def test_legacy_truncated_trailer(tmp_path: Path) -> None:
    entries_end = len(GOOD_DAT) - 9
    read_error(write(tmp_path / "a.dat", GOOD_DAT[: entries_end + 2]), f"at byte {entries_end}", "chunk count")
    read_error(write(tmp_path / "b.dat", GOOD_DAT[: entries_end + 6]), "dataset name length")
    read_error(write(tmp_path / "c.dat", GOOD_DAT[:-1]), f"at byte {entries_end + 8}", "dataset name")


@pytest.mark.parametrize(
    "field_at, value, needle",
    [(4, 0, "name length of entry 0 is 0, expected at least 1"), (4, -5, "name length of entry 0 is -5"),
     (13, 0, 'value count of entry 0 ("w") is 0'), (13, -1, 'value count of entry 0 ("w") is -1'),
     (9, -1, 'call count of entry 0 ("w") is -1'), (25, -4, "chunk count after the entries is -4"),
     (29, -1, "dataset name length is -1")],
)
def test_legacy_negative_and_zero_lengths(tmp_path: Path, field_at: int, value: int, needle: str) -> None:
    data = bytearray(GOOD_DAT)
    data[field_at:field_at + 4] = struct.pack("<i", value)
    read_error(write(tmp_path / "m.dat", bytes(data)), f"at byte {field_at}", needle)


def test_legacy_huge_counts_are_refused_without_allocating(tmp_path: Path) -> None:
    data = bytearray(GOOD_DAT)
    data[0:4] = struct.pack("<i", 2**31 - 1)
    # Nothing is allocated by the count: entries are read on until the file ends (the trailer is taken for
    # entry 1: name length 1, name 0x01, call count from the last 4 bytes, then no value count).
    read_error(write(tmp_path / "a.dat", bytes(data)), "at byte 34", "file ends inside value count of entry 1")
    data = bytearray(GOOD_DAT)
    data[13:17] = struct.pack("<i", 2**31 - 1)
    read_error(write(tmp_path / "b.dat", bytes(data)), "values of entry 0", "needs 8589934588 more bytes")


def test_legacy_names(tmp_path: Path) -> None:
    one = np.ones(2, dtype=F32)
    read_error(write(tmp_path / "a.dat", dat_bytes([(b"w\xff", 1, one)])), "at byte 8", "entry 0 is not valid UTF-8")
    read_error(write(tmp_path / "b.dat", dat_bytes([(b"w\0x", 1, one)])), "at byte 8", "holds a NUL byte")
    read_error(write(tmp_path / "c.dat", dat_bytes([(b"w", 1, one), (b"w", 1, one)])), 'duplicate tensor name "w"')


def test_legacy_trailing_garbage(tmp_path: Path) -> None:
    read_error(write(tmp_path / "m.dat", GOOD_DAT + b"\0\0\0"), f"at byte {len(GOOD_DAT)}", "3 bytes of trailing")


@pytest.mark.parametrize("value, shown", [(-1.0, "-0.5"), (float("nan"), "NaN"), (float("-inf"), "-inf")])
def test_legacy_bad_weights(tmp_path: Path, value: float, shown: str) -> None:
    data = dat_bytes([(b"w", 2, np.array([1.0, value, 3.0], dtype=F32))])
    read_error(write(tmp_path / "m.dat", data), f'"w": weight 1 is {shown} after normalisation')


# ---------------------------------------------------------------------------------------------------------------
# Files that are not there


def test_missing_file_and_directory(tmp_path: Path) -> None:
    read_error(tmp_path / "nope.dat", "No such file", exc=FileNotFoundError)
    read_error(tmp_path, "directory", exc=IsADirectoryError)
