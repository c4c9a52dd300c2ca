"""Split GGUF models (issue 12, part 1): reading shard sets, writing them, and refusing broken ones.

Oracles: llama.cpp's own ``llama-gguf-split`` (built from the llama-cpp-python sdist by ``tests/oracles/llama_tools``)
splits the fixtures and merges our shards; ``llama-quantize`` loads our shard set through llama.cpp's model loader
(which applies the split checks of ``llama-model-loader.cpp``); gguf-py's ``GGUFReader`` reads every file (tensor
bytes, metadata, split keys); malformed sets are built here with gguf-py's ``GGUFWriter``. Patched tensors are
compared with ggml_lora's patch of the unsplit model, whose output is itself checked against llama.cpp's merges in
``test_patch.py``: the property here is that splitting changes nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import ggml_lora
from conftest import fixture_path, skip_module_without_fixtures
from oracles.llama_tools import tool

skip_module_without_fixtures()

F16 = fixture_path("llama-gqa", "base-f16.gguf")
MIXED = fixture_path("llama-gqa", "base-q4_0-mixed.gguf")
ADAPTER = fixture_path("llama-gqa", "lora-r8", "ref-adapter-f32.gguf")
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")


def gguf_split(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(tool("llama-gguf-split")), *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def split_with_llama(model: Path, prefix: Path, *options: str) -> list[Path]:
    """The shards ``llama-gguf-split --split`` makes of ``model``, in order."""
    gguf_split("--split", *options, model, prefix)
    shards = sorted(prefix.parent.glob(prefix.name + "-*-of-*.gguf"))
    assert len(shards) > 1, shards
    return shards


def fields(path: Path, skip_split: bool = True) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {k: (f.types, f.contents()) for k, f in reader.fields.items()
            if not k.startswith("GGUF.") and not (skip_split and k in SPLIT_KEYS)}


def tensors(paths: list[Path]) -> dict[str, tuple[tuple[int, ...], int, bytes]]:
    """name -> (ggml dims, type id, bytes), over all files (gguf-py)."""
    out: dict[str, tuple[tuple[int, ...], int, bytes]] = {}
    for p in paths:
        for t in gguf.GGUFReader(p).tensors:
            assert t.name not in out
            out[t.name] = (tuple(int(d) for d in t.shape), int(t.tensor_type), bytes(np.asarray(t.data).tobytes()))
    return out


def names_per_shard(paths: list[Path]) -> list[list[str]]:
    return [[t.name for t in gguf.GGUFReader(p).tensors] for p in paths]


@pytest.fixture(scope="module")
def llama_shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The mixed q4_0 fixture split by llama-gguf-split, 6 tensors per shard (4 shards)."""
    folder = tmp_path_factory.mktemp("llama-split")
    return split_with_llama(MIXED, folder / "mixed", "--split-max-tensors", "6")


@pytest.mark.parametrize("which", [0, 1, -1], ids=["first", "second", "last"])
def test_shards_written_by_llama_gguf_split_read_as_the_unsplit_file(llama_shards: list[Path], which: int) -> None:
    with ggml_lora.open(llama_shards[which]) as f:
        assert f.container == f"GGUF v3, split into {len(llama_shards)} shards"
        assert [p for p, _ in f.shards] == llama_shards
        assert [n for _, n in f.shards] == [len(names) for names in names_per_shard(llama_shards)]
        expected = tensors([MIXED])
        assert list(f.tensors) == list(expected)  # model order = shard order = the original order
        for name, (dims, type_id, data) in expected.items():
            info = f.tensors[name]
            assert info.dims == dims and ggml_lora.GGML_TYPES[info.type].id == type_id
            assert f.raw(name).tobytes() == data, name
        assert [info.shard for info in f.tensors.values()] == [
            k for k, names in enumerate(names_per_shard(llama_shards)) for _ in names]
        # The first shard's metadata without the split keys is the unsplit file's metadata.
        ours = {k: v.value for k, v in f.fields.items()}
    reference = fields(MIXED)
    assert list(ours) == list(reference)
    assert not any(k in ours for k in SPLIT_KEYS)


def test_info_shows_the_split(llama_shards: list[Path]) -> None:
    proc = subprocess.run([sys.executable, "-m", "ggml_lora", "info", str(llama_shards[2])], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"split into {len(llama_shards)} shards" in proc.stdout
    for k, (path, names) in enumerate(zip(llama_shards, names_per_shard(llama_shards))):
        assert re.search(rf"shard {k + 1}/{len(llama_shards)}: {re.escape(path.name)}\s+{len(names)} tensors",
                         proc.stdout), proc.stdout[:2000]


def test_patch_of_a_split_model_keeps_the_shards_and_equals_the_unsplit_patch(llama_shards: list[Path],
                                                                               tmp_path: Path) -> None:
    whole = ggml_lora.patch(MIXED, ADAPTER, out=tmp_path / "whole.gguf")
    split = ggml_lora.patch(llama_shards[1], ADAPTER, out=tmp_path / "patched")  # a prefix
    n = len(llama_shards)
    assert split.outputs == [tmp_path / f"patched-{k:05d}-of-{n:05d}.gguf" for k in range(1, n + 1)]
    assert split.out == split.outputs[0]
    # Same tensor-to-shard assignment and split keys as the input shards (gguf-py).
    assert names_per_shard(split.outputs) == names_per_shard(llama_shards)
    for k, path in enumerate(split.outputs):
        keys = gguf.GGUFReader(path).fields
        assert keys["split.no"].contents() == k and keys["split.no"].types == [gguf.GGUFValueType.UINT16]
        assert keys["split.count"].contents() == n and keys["split.count"].types == [gguf.GGUFValueType.UINT16]
        assert keys["split.tensors.count"].contents() == 21
        assert keys["split.tensors.count"].types == [gguf.GGUFValueType.INT32]
        if k > 0:  # as llama-gguf-split writes them: the model's metadata only in the first shard
            assert set(fields(path)) == set()
    # Tensor for tensor the patch of the unsplit model; metadata too (apart from the split keys).
    assert tensors(split.outputs) == tensors([whole.out])
    assert fields(split.outputs[0]) == fields(whole.out)
    assert [t.name for t in split.tensors] == [t.name for t in whole.tensors]


def test_our_shards_are_accepted_by_llama_gguf_split_merge_and_llama_cpps_loader(llama_shards: list[Path],
                                                                                 tmp_path: Path) -> None:
    split = ggml_lora.patch(llama_shards[0], ADAPTER, out=tmp_path / f"ours-00001-of-{len(llama_shards):05d}.gguf")
    merged_ours = ggml_lora.patch(llama_shards[0], ADAPTER, out=tmp_path / "merged-ours.gguf", merge_shards=True)
    assert merged_ours.outputs == [tmp_path / "merged-ours.gguf"]
    gguf_split("--merge", split.outputs[0], tmp_path / "merged-llama.gguf")
    assert tensors([tmp_path / "merged-llama.gguf"]) == tensors([merged_ours.out])
    assert fields(tmp_path / "merged-llama.gguf") == fields(merged_ours.out)
    assert not any(k in fields(merged_ours.out, skip_split=False) for k in SPLIT_KEYS)
    # llama.cpp's model loader opens the set from the first shard (llama-quantize --keep-split reads every shard
    # through llama_model_loader, which checks split.no of each and the tensor count).
    proc = subprocess.run([str(tool("llama-quantize")), "--allow-requantize", "--keep-split", str(split.outputs[0]),
                           str(tmp_path / "requant.gguf"), "q8_0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"additional {len(llama_shards) - 1} GGUFs metadata loaded" in proc.stdout + proc.stderr
    assert len(list(tmp_path.glob("requant-*-of-*.gguf"))) == len(llama_shards)


@pytest.mark.parametrize("options", [("--split-max-tensors", "4"), ("--split-max-size", "1M")],
                         ids=["max-tensors", "max-size"])
def test_resplit_divides_like_llama_gguf_split(options: tuple[str, str], tmp_path: Path) -> None:
    limit: int | str = int(options[1]) if options[0] == "--split-max-tensors" else options[1]
    ours = ggml_lora.patch(F16, ADAPTER, out=tmp_path / "ours",
                           **{options[0][2:].replace("-", "_"): limit})  # type: ignore[arg-type]
    merged = ggml_lora.patch(F16, ADAPTER, out=tmp_path / "merged.gguf")
    # The oracle: llama-gguf-split's own division of the same (unsplit) output.
    (tmp_path / "ref").mkdir()
    reference = split_with_llama(merged.out, tmp_path / "ref" / "ref", *options)
    assert names_per_shard(ours.outputs) == names_per_shard(reference)
    assert tensors(ours.outputs) == tensors(reference)
    # The CLI spells it the same way.
    proc = subprocess.run([sys.executable, "-m", "ggml_lora", "patch", "-m", str(F16), "--lora", str(ADAPTER), "-q",
                           "-o", str(tmp_path / "cli"), *options], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert names_per_shard(sorted(tmp_path.glob("cli-*-of-*.gguf"))) == names_per_shard(reference)


def test_a_split_model_as_lora_base(llama_shards: list[Path], tmp_path: Path) -> None:
    base_shards = split_with_llama(F16, tmp_path / "f16", "--split-max-tensors", "8")
    ours = ggml_lora.patch(MIXED, ADAPTER, base=base_shards[-1], out=tmp_path / "a.gguf")
    reference = ggml_lora.patch(MIXED, ADAPTER, base=F16, out=tmp_path / "b.gguf")
    assert tensors([ours.out]) == tensors([reference.out])
    assert all(t.from_base for t in ours.tensors)


@pytest.mark.parametrize("out_name, match", [
    ("out.gguf", r"ambiguous.*out-00001-of-00004\.gguf"),
    ("out-00002-of-00004.gguf", r"names shard 2 of 4.*out-00001-of-00004\.gguf"),
    ("out-00001-of-00005.gguf", r"names shard 1 of 5"),
])
def test_output_names_that_cannot_name_the_shards_are_refused(llama_shards: list[Path], tmp_path: Path,
                                                              out_name: str, match: str) -> None:
    out = tmp_path / out_name
    with pytest.raises(ggml_lora.PatchError, match=match):
        ggml_lora.patch(llama_shards[0], ADAPTER, out=out)
    assert list(tmp_path.iterdir()) == []


def test_a_single_file_output_cannot_take_a_shard_name(tmp_path: Path) -> None:
    with pytest.raises(ggml_lora.PatchError, match=r"one file.*shard 1 of 3"):
        ggml_lora.patch(MIXED, ADAPTER, out=tmp_path / "x-00001-of-00003.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_cancelled_split_patch_leaves_no_shard_and_no_temporary(llama_shards: list[Path], tmp_path: Path) -> None:
    seen = []

    def stop(p: ggml_lora.PatchProgress) -> None:
        seen.append(p.tensors_done)
        if p.tensors_done >= 18:  # in the last shard: the first three are complete by now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ggml_lora.patch(llama_shards[0], ADAPTER, out=tmp_path / "cut", progress=stop)
    assert max(seen) >= 18
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# malformed sets, built with gguf-py's writer


def write_shard(path: Path, tensors_: dict[str, np.ndarray], keys: dict[str, tuple[object, str]],
                arch: bool = True) -> None:
    w = gguf.GGUFWriter(path, "llama")
    if not arch:
        w.kv_data[0].pop("general.architecture", None)
    for key, (value, kind) in keys.items():
        getattr(w, f"add_{kind}")(key, value)
    for name, array in tensors_.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_set(folder: Path, count: int = 3, per_shard: int = 2, **overrides: object) -> list[Path]:
    """A consistent set ``m-0000k-of-0000N.gguf``; ``overrides[f"{k}"]`` replaces shard k's split keys or
    tensors."""
    paths = []
    total = count * per_shard
    for k in range(count):
        keys: dict[str, tuple[object, str]] = {"split.no": (k, "uint16"), "split.count": (count, "uint16"),
                                               "split.tensors.count": (total, "int32")}
        tensors_ = {f"t{k}.{j}": np.full((2, 4), k * 10 + j, dtype=np.float32) for j in range(per_shard)}
        change = overrides.get(str(k), {})
        assert isinstance(change, dict)
        keys = change.get("keys", keys)
        tensors_ = change.get("tensors", tensors_)
        path = folder / f"m-{k + 1:05d}-of-{count:05d}.gguf"
        write_shard(path, tensors_, keys, arch=(k == 0))
        paths.append(path)
    return paths


def refuse(path: Path, match: str, tmp_path: Path) -> None:
    """Opening, ``info`` and ``patch -m`` refuse the set with a GGUFError naming the shard; nothing written."""
    before = sorted(path.parent.iterdir())
    with pytest.raises(ggml_lora.GGUFError, match=match):
        ggml_lora.open(path)
    out = tmp_path / "out.gguf"
    for args in (["info", str(path)], ["patch", "-m", str(path), "--lora", str(ADAPTER), "-o", str(out), "-q"]):
        done = subprocess.run([sys.executable, "-m", "ggml_lora", *args], capture_output=True, text=True,
                              timeout=60)
        lines = done.stderr.splitlines()
        assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("ggml-lora: error: "), done.stderr
        assert re.search(match, lines[0]), (match, lines[0])
    assert not out.exists() and sorted(path.parent.iterdir()) == before


def test_a_consistent_built_set_opens(tmp_path: Path) -> None:
    paths = make_set(tmp_path)
    with ggml_lora.open(paths[1]) as f:
        assert list(f.tensors) == [f"t{k}.{j}" for k in range(3) for j in range(2)]
        assert float(f.to_numpy("t2.1")[0, 0]) == 21.0


def test_missing_shard(tmp_path: Path) -> None:
    paths = make_set(tmp_path)
    paths[2].unlink()
    refuse(paths[0], rf"m-00003-of-00003\.gguf: shard 3 of 3 is missing", tmp_path)


def test_shard_with_another_count(tmp_path: Path) -> None:
    paths = make_set(tmp_path, **{"1": {"keys": {"split.no": (1, "uint16"), "split.count": (4, "uint16"),
                                                  "split.tensors.count": (6, "int32")}}})
    refuse(paths[0], r"m-00002-of-00003\.gguf: split\.count is 4, but the first shard says the set has 3",
           tmp_path)


def test_duplicated_shard(tmp_path: Path) -> None:
    paths = make_set(tmp_path)
    shutil.copy(paths[1], paths[2])  # shard 2 copied over shard 3
    refuse(paths[0], r"m-00003-of-00003\.gguf: split\.no is 1 \(shard 2\), but the file is named as shard 3",
           tmp_path)


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    dup = {"t0.0": np.zeros((2, 4), np.float32), "t2.1": np.zeros((2, 4), np.float32)}
    paths = make_set(tmp_path, **{"2": {"tensors": dup}})
    refuse(paths[0], r"m-00003-of-00003\.gguf: tensor \"t0\.0\" is also in .*m-00001-of-00003\.gguf", tmp_path)


def test_tensors_that_do_not_add_up(tmp_path: Path) -> None:
    keys = {"split.no": (0, "uint16"), "split.count": (3, "uint16"), "split.tensors.count": (7, "int32")}
    paths = make_set(tmp_path, **{"0": {"keys": keys}})
    refuse(paths[1], r"m-00002-of-00003\.gguf: split\.tensors\.count is 6, but the first shard says 7", tmp_path)
    for p in paths[1:]:
        write_shard(p, {f"u{p.name}": np.zeros((2, 4), np.float32)},
                    {"split.no": (paths.index(p), "uint16"), "split.count": (3, "uint16")}, arch=False)
    refuse(paths[0], r"m-00001-of-00003\.gguf: the 3 shards hold 4 tensors in all, but split\.tensors\.count says 7",
           tmp_path)


def test_a_file_in_the_set_that_is_not_a_shard(tmp_path: Path) -> None:
    paths = make_set(tmp_path)
    write_shard(paths[1], {"t1.0": np.zeros((2, 4), np.float32)}, {}, arch=False)
    refuse(paths[0], r"m-00002-of-00003\.gguf: named as shard 2 of 3, but it is not a shard", tmp_path)


def test_a_shard_that_is_not_gguf(tmp_path: Path) -> None:
    paths = make_set(tmp_path)
    paths[2].write_bytes(b"not a model at all")
    refuse(paths[0], r"m-00003-of-00003\.gguf: malformed GGUF file at byte 0", tmp_path)


def test_a_shard_under_a_name_that_hides_its_siblings(tmp_path: Path) -> None:
    paths = make_set(tmp_path)
    renamed = tmp_path / "renamed.gguf"
    shutil.copy(paths[0], renamed)
    refuse(renamed, r"renamed\.gguf: the file says it is shard 1 of 3 .* does not end in -00001-of-00003\.gguf",
           tmp_path)


@pytest.mark.parametrize("key, kind, value, match", [
    ("split.no", "uint32", 0, r"split\.no is UINT32, expected UINT16"),
    ("split.count", "int32", 3, r"split\.count is INT32, expected UINT16"),
    ("split.tensors.count", "uint64", 6, r"split\.tensors\.count is UINT64, expected INT32"),
])
def test_split_keys_of_the_wrong_type(tmp_path: Path, key: str, kind: str, value: int, match: str) -> None:
    keys: dict[str, tuple[object, str]] = {"split.no": (0, "uint16"), "split.count": (3, "uint16"),
                                           "split.tensors.count": (6, "int32")}
    keys[key] = (value, kind)
    paths = make_set(tmp_path, **{"0": {"keys": keys}})
    refuse(paths[0], match, tmp_path)


def test_split_no_beyond_the_count(tmp_path: Path) -> None:
    keys = {"split.no": (5, "uint16"), "split.count": (3, "uint16"), "split.tensors.count": (6, "int32")}
    paths = make_set(tmp_path, **{"0": {"keys": keys}})
    refuse(paths[0], r"split\.no is 5, but split\.count is 3", tmp_path)
