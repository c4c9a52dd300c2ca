"""The patch engine against llama.cpp's and PEFT's own outputs (../shared/fixtures) and independent numpy
recomputations. Oracles: gguf-py (GGUFReader, quants) and numpy float64 arithmetic; never our own output."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from _helpers import adapter_deltas, reader_f32

import ggml_lora
from ggml_lora import GGUFValueType, MetadataValue

from conftest import FIXTURES, skip_module_without_fixtures

LLAMA = FIXTURES / "llama-gqa"
skip_module_without_fixtures()

BASE_F16 = LLAMA / "base-f16.gguf"
ADAPTER_R8 = LLAMA / "lora-r8" / "ref-adapter-f32.gguf"
ADAPTER_QV = LLAMA / "lora-qv-r4" / "ref-adapter-f32.gguf"


def reader_tensors(path: Path) -> dict[str, np.ndarray]:
    """Raw bytes of every tensor, read by gguf-py."""
    reader = gguf.GGUFReader(path)
    return {t.name: np.asarray(t.data).reshape(-1).view(np.uint8).copy() for t in reader.tensors}


def f16_ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in f16 units in the last place between two f16 byte arrays (same sign assumed nearby)."""
    x = a.view(np.int16).astype(np.int32)
    y = b.view(np.int16).astype(np.int32)
    x = np.where(x < 0, -32768 - x, x)
    y = np.where(y < 0, -32768 - y, y)
    return np.abs(x - y)


def block_agreement(ours: np.ndarray, ref: np.ndarray, block_bytes: int) -> tuple[int, int]:
    a = ours.reshape(-1, block_bytes)
    b = ref.reshape(-1, block_bytes)
    return int((a == b).all(axis=1).sum()), len(a)


# ---------------------------------------------------------------------------------------------------------
# f16 base: the merge itself


@pytest.mark.parametrize("lora", ["lora-r8", "lora-qv-r4"])
def test_f16_merge_matches_peft_truth_to_one_ulp(tmp_path: Path, lora: str) -> None:
    out = tmp_path / "merged.gguf"
    result = ggml_lora.patch(BASE_F16, LLAMA / lora / "ref-adapter-f32.gguf", out=out)
    ours = reader_tensors(out)
    truth = reader_tensors(LLAMA / lora / "merged-ref-f16.gguf")
    base = reader_tensors(BASE_F16)
    patched = {t.name for t in result.tensors}
    assert patched == set(adapter_deltas(LLAMA / lora / "ref-adapter-f32.gguf"))
    assert list(ours) == list(base)
    n_diff = n_total = 0
    for name, data in ours.items():
        if name in patched:
            ulps = f16_ulps(data, truth[name])
            assert ulps.max() <= 1, name
            n_diff += int((ulps > 0).sum())
            n_total += ulps.size
            assert not np.array_equal(data, base[name]), f"{name} was not changed"
        else:
            assert np.array_equal(data, base[name]), f"untouched {name} differs from the model"
    # llama.cpp's export-lora differs from the truth in 7 of 1,179,648 values (lora-r8): be at least as good.
    assert n_diff <= max(8, n_total // 100_000), (n_diff, n_total)


@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
def test_pipeline_identical_mode_reproduces_llama_quantize_of_peft_merge(tmp_path: Path, quant: str) -> None:
    out = tmp_path / f"merged-{quant}.gguf"
    ggml_lora.patch(LLAMA / f"base-{quant}.gguf", ADAPTER_R8, base=BASE_F16, out=out, intermediate="f16")
    assert out.read_bytes()[:4] == b"GGUF"
    ours = reader_tensors(out)
    ref = reader_tensors(LLAMA / "lora-r8" / f"merged-ref-{quant}.gguf")
    assert list(ours) == list(ref)
    for name in ours:
        assert np.array_equal(ours[name], ref[name]), name


def test_pipeline_identical_q4_0_for_the_qv_adapter(tmp_path: Path) -> None:
    out = tmp_path / "merged.gguf"
    ggml_lora.patch(LLAMA / "base-q4_0.gguf", ADAPTER_QV, base=BASE_F16, out=out, intermediate="f16")
    ours = reader_tensors(out)
    ref = reader_tensors(LLAMA / "lora-qv-r4" / "merged-ref-q4_0.gguf")
    for name in ours:
        assert np.array_equal(ours[name], ref[name]), name


@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
def test_f32_mode_equals_quantization_of_float64_merge(tmp_path: Path, quant: str) -> None:
    """Default mode: W' = f32(base) + s·B@A quantized from f32. Compare with gguf-py quantizing W' computed in
    float64 (rounded once to f32): identical blocks except where f32 rounding of the sum lands on the other side
    of a quantization boundary."""
    out = tmp_path / "merged.gguf"
    result = ggml_lora.patch(LLAMA / f"base-{quant}.gguf", ADAPTER_R8, base=BASE_F16, out=out)
    base = reader_f32(BASE_F16)
    deltas = adapter_deltas(ADAPTER_R8)
    ours = reader_tensors(out)
    model = reader_tensors(LLAMA / f"base-{quant}.gguf")
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    block_bytes = ggml_lora.GGML_QUANT_SIZES[quant][1]
    same = total = 0
    for name, data in ours.items():
        if name in deltas:
            expected = (base[name].astype(np.float64) + deltas[name]).astype(np.float32)
            ref = gguf.quants.quantize(expected, qtype).reshape(-1).view(np.uint8)
            s, t = block_agreement(data, ref, block_bytes)
            same += s
            total += t
        else:
            assert np.array_equal(data, model[name]), name
    assert total == sum(np.prod(base[t.name].shape) // 32 for t in result.tensors)
    assert same / total >= 0.995, f"{same}/{total} blocks identical"


def test_output_is_readable_by_gguf_py_with_metadata(tmp_path: Path) -> None:
    out = tmp_path / "merged.gguf"
    ggml_lora.patch(LLAMA / "base-q4_0.gguf", [(ADAPTER_R8, 0.5)], base=BASE_F16, out=out)
    reader = gguf.GGUFReader(out)
    model = gguf.GGUFReader(LLAMA / "base-q4_0.gguf")
    for key, field in model.fields.items():
        if key.startswith("GGUF."):
            continue
        assert reader.fields[key].contents() == field.contents(), key
    assert reader.fields["ggml_lora.adapters"].contents() == ["ref-adapter-f32.gguf"]
    assert reader.fields["ggml_lora.adapter_scales"].contents() == [0.5]
    assert reader.fields["ggml_lora.base"].contents() == "base-f16.gguf"
    assert reader.fields["general.file_type"].contents() == 2


# ---------------------------------------------------------------------------------------------------------
# several adapters, scales, out_type


def test_two_adapters_with_different_targets_and_scales(tmp_path: Path) -> None:
    out = tmp_path / "merged.gguf"
    result = ggml_lora.patch(BASE_F16, [(ADAPTER_R8, 0.5), (ADAPTER_QV, 2.0)], out=out, out_type="f32")
    d1 = adapter_deltas(ADAPTER_R8, 0.5)
    d2 = adapter_deltas(ADAPTER_QV, 2.0)
    assert set(d2) < set(d1)
    base = reader_f32(BASE_F16)
    ours = reader_f32(out)
    for t in result.tensors:
        expected = base[t.name].astype(np.float64) + d1.get(t.name, 0) + d2.get(t.name, 0)
        np.testing.assert_allclose(ours[t.name], expected, rtol=0, atol=2e-6)
        assert t.n_adapters == (2 if t.name in d2 else 1)
        assert t.out_type == "f32" and t.model_type == "f16"
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == 0


def test_scale_argument_applies_to_plain_entries(tmp_path: Path) -> None:
    a = ggml_lora.patch(BASE_F16, ADAPTER_QV, out=tmp_path / "a.gguf", scale=0.25, out_type="f32")
    b = ggml_lora.patch(BASE_F16, [(ADAPTER_QV, 0.25)], out=tmp_path / "b.gguf", out_type="f32")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    assert [t.retained for t in a.tensors] == [t.retained for t in b.tensors]


def test_out_type_q8_0_on_a_q4_0_model_updates_file_type(tmp_path: Path) -> None:
    out = tmp_path / "merged.gguf"
    ggml_lora.patch(LLAMA / "base-q4_0.gguf", ADAPTER_R8, base=BASE_F16, out=out, out_type="q8_0")
    with ggml_lora.open(out) as f:
        patched = set(adapter_deltas(ADAPTER_R8))
        for name, info in f.tensors.items():
            if name in patched:
                assert info.type == "q8_0"
        assert f.metadata["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0: 14 of 16 matrices


def test_mixed_model_keeps_its_q6_k_tensor_untouched(tmp_path: Path) -> None:
    out = tmp_path / "merged.gguf"
    ggml_lora.patch(LLAMA / "base-q4_0-mixed.gguf", ADAPTER_R8, base=BASE_F16, out=out)
    ours = reader_tensors(out)
    model = reader_tensors(LLAMA / "base-q4_0-mixed.gguf")
    assert np.array_equal(ours["output.weight"], model["output.weight"])


# ---------------------------------------------------------------------------------------------------------
# quality report


def test_quality_report_tells_lost_from_kept(tmp_path: Path) -> None:
    """(Every metric is checked against a float64 recomputation in test_quality_report.py.)"""
    naive = ggml_lora.patch(LLAMA / "base-q4_0.gguf", ADAPTER_R8, out=tmp_path / "naive.gguf")
    with_base = ggml_lora.patch(LLAMA / "base-q4_0.gguf", ADAPTER_R8, base=BASE_F16, out=tmp_path / "based.gguf")
    assert all(t.lost for t in naive.tensors)
    assert naive.suggestions and "--lora-base" in naive.summary()
    assert not with_base.lost and not with_base.suggestions


def test_progress_is_monotonic_and_an_exception_cancels(tmp_path: Path) -> None:
    seen: list[ggml_lora.PatchProgress] = []
    ggml_lora.patch(BASE_F16, ADAPTER_R8, out=tmp_path / "a.gguf", progress=seen.append)
    assert seen[-1].tensors_done == seen[-1].tensors_total == 21
    assert seen[-1].bytes_done == seen[-1].bytes_total
    assert all(a.bytes_done <= b.bytes_done for a, b in zip(seen, seen[1:]))

    def stop(p: ggml_lora.PatchProgress) -> None:
        if p.tensors_done >= 3:
            raise KeyboardInterrupt

    out = tmp_path / "b.gguf"
    with pytest.raises(KeyboardInterrupt):
        ggml_lora.patch(BASE_F16, ADAPTER_R8, out=out, progress=stop)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]


# ---------------------------------------------------------------------------------------------------------
# legacy ggla adapters and the token_embd layout


def write_ggla(path: Path, rank: int, alpha: int, tensors: list[tuple[str, np.ndarray]]) -> None:
    """The layout of llama.cpp's convert-lora-to-ggml.py (docs/FORMATS.md §3), written independently here."""
    with open(path, "wb") as f:
        f.write(b"algg")
        f.write(struct.pack("<iii", 1, rank, alpha))
        for name, array in tensors:
            ftype = 1 if array.dtype == np.float16 else 0
            encoded = name.encode()
            f.write(struct.pack("<iii", array.ndim, len(encoded), ftype))
            f.write(struct.pack(f"<{array.ndim}i", *reversed(array.shape)))
            f.write(encoded)
            f.seek((f.tell() + 31) & -32)
            array.tofile(f)


@pytest.mark.parametrize("naming", ["pre-gguf", "gguf"])
def test_ggla_adapter_gives_the_same_merge_as_the_gguf_adapter(tmp_path: Path, naming: str) -> None:
    reader = gguf.GGUFReader(ADAPTER_QV)
    alpha = int(reader.fields["adapter.lora.alpha"].contents())
    f32 = reader_f32(ADAPTER_QV)
    old_names = {"attn_q": "attention.wq", "attn_v": "attention.wv"}
    entries = []
    rank = 0
    for name, a in f32.items():
        if not name.endswith(".lora_a"):
            continue
        target = name[: -len(".lora_a")]
        b = f32[target + ".lora_b"]
        rank = b.shape[1]
        if naming == "pre-gguf":
            _, layer, part, _ = target.split(".")
            stem = f"layers.{layer}.{old_names[part]}.weight"
        else:
            stem = target
        # PEFT lora_A (r, in) was written transposed (in, r) as f16; lora_B (out, r) as f32.
        entries.append((stem + ".loraA", np.ascontiguousarray(a.T).astype(np.float16)))
        entries.append((stem + ".loraB", b.astype(np.float32)))
    path = tmp_path / "adapter.bin"
    write_ggla(path, rank, alpha, entries)
    via_ggla = ggml_lora.patch(BASE_F16, path, out=tmp_path / "ggla.gguf", out_type="f32")
    deltas = adapter_deltas(ADAPTER_QV)
    base = reader_f32(BASE_F16)
    ours = reader_f32(tmp_path / "ggla.gguf")
    assert {t.name for t in via_ggla.tensors} == set(deltas)
    for name, delta in deltas.items():
        # loraA went through f16: compare with the same rounding applied to A.
        a = f32[name + ".lora_a"].astype(np.float16).astype(np.float64)
        b = f32[name + ".lora_b"].astype(np.float64)
        expected = base[name] + (alpha / rank) * (b @ a)
        np.testing.assert_allclose(ours[name], expected, rtol=0, atol=2e-6)


def test_token_embd_lora_uses_llama_cpp_flipped_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    n_vocab, n_embd, rank = 512, 256, 4
    a = rng.normal(0, 0.01, (n_vocab, rank)).astype(np.float32)  # ne [r, n_vocab]
    b = rng.normal(0, 0.01, (n_embd, rank)).astype(np.float32)  # ne [r, n_embd]
    adapter = tmp_path / "embd.gguf"
    ggml_lora.write(
        adapter,
        {
            "general.type": "adapter",
            "adapter.type": "lora",
            "general.architecture": "llama",
            "adapter.lora.alpha": MetadataValue(8.0, GGUFValueType.FLOAT32),
        },
        {"token_embd.weight.lora_a": a, "token_embd.weight.lora_b": b},
    )
    ggml_lora.patch(BASE_F16, adapter, out=tmp_path / "out.gguf", out_type="f32")
    base = reader_f32(BASE_F16)["token_embd.weight"].astype(np.float64)
    ours = reader_f32(tmp_path / "out.gguf")["token_embd.weight"]
    np.testing.assert_allclose(ours, base + 2.0 * (a.astype(np.float64) @ b.T), rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------
# bad input: a clear error and nothing written


def write_adapter(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama", **extra: object) -> Path:
    metadata: dict[str, object] = {
        "general.type": "adapter",
        "adapter.type": "lora",
        "general.architecture": arch,
        "adapter.lora.alpha": MetadataValue(8.0, GGUFValueType.FLOAT32),
    }
    metadata.update(extra)
    return ggml_lora.write(path, metadata, tensors)


def lora_pair(n_out: int, n_in: int, rank: int, value: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    return np.full((rank, n_in), value, np.float32), np.full((n_out, rank), value, np.float32)


def expect_refusal(tmp_path: Path, error: type[BaseException], match: str, **kwargs: object) -> None:
    out = tmp_path / "never.gguf"
    kwargs.setdefault("model", BASE_F16)
    with pytest.raises(error, match=match):
        ggml_lora.patch(out=out, **kwargs)  # type: ignore[arg-type]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "ggml-lora-tmp" in p.name]


def test_refuses_architecture_mismatch(tmp_path: Path) -> None:
    a, b = lora_pair(256, 256, 2)
    adapter = write_adapter(tmp_path / "a.gguf", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b}, arch="qwen2")
    expect_refusal(tmp_path, ggml_lora.PatchError, "architecture mismatch.*qwen2", adapter=adapter)


def test_refuses_shape_mismatch_naming_tensor_and_shapes(tmp_path: Path) -> None:
    a, b = lora_pair(128, 256, 2)  # attn_q is 256x256
    adapter = write_adapter(tmp_path / "a.gguf", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b})
    expect_refusal(tmp_path, ggml_lora.PatchError, r"blk.0.attn_q.weight.*\[128, 256\].*\[256, 256\]", adapter=adapter)


def test_refuses_missing_target_tensor(tmp_path: Path) -> None:
    a, b = lora_pair(256, 256, 2)
    adapter = write_adapter(tmp_path / "a.gguf", {"blk.7.attn_q.weight.lora_a": a, "blk.7.attn_q.weight.lora_b": b})
    expect_refusal(tmp_path, ggml_lora.PatchError, 'no tensor "blk.7.attn_q.weight"', adapter=adapter)


def test_refuses_lora_a_without_lora_b_and_rank_mismatch(tmp_path: Path) -> None:
    a, b = lora_pair(256, 256, 2)
    lonely = write_adapter(tmp_path / "a.gguf", {"blk.0.attn_q.weight.lora_a": a})
    expect_refusal(tmp_path, ggml_lora.GGUFError, "lora_a has no matching", adapter=lonely)
    _, b3 = lora_pair(256, 256, 3)
    mismatch = write_adapter(tmp_path / "b.gguf", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b3})
    expect_refusal(tmp_path, ggml_lora.GGUFError, "rank mismatch", adapter=mismatch)
    odd = write_adapter(tmp_path / "c.gguf", {"blk.0.attn_q.weight.something": a})
    expect_refusal(tmp_path, ggml_lora.GGUFError, "unexpected suffix", adapter=odd)


def test_refuses_a_model_as_adapter(tmp_path: Path) -> None:
    expect_refusal(tmp_path, ggml_lora.GGUFError, "general.type", adapter=LLAMA / "base-q4_0.gguf")


def test_refuses_tensor_missing_in_base(tmp_path: Path) -> None:
    with ggml_lora.open(BASE_F16) as f:
        tensors = {n: (f.raw(n), i.type, i.shape) for n, i in f.tensors.items() if n != "blk.0.attn_q.weight"}
        base = ggml_lora.write(tmp_path / "base.gguf", f.fields, tensors)
    expect_refusal(
        tmp_path, ggml_lora.PatchError, 'no tensor "blk.0.attn_q.weight"', model=LLAMA / "base-q4_0.gguf",
        adapter=ADAPTER_R8, base=base,
    )


def test_refuses_non_finite_result(tmp_path: Path) -> None:
    a, b = lora_pair(256, 256, 2, value=1e30)
    adapter = write_adapter(tmp_path / "a.gguf", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b})
    expect_refusal(tmp_path, ValueError, "blk.0.attn_q.weight.*non-finite", adapter=adapter)


def model_with_output_type(path: Path, ty: str) -> Path:
    """The mixed fixture model with its output.weight (512x256) stored as zero bytes of type ``ty``."""
    f = ggml_lora.open(LLAMA / "base-q4_0-mixed.gguf")
    block, size = ggml_lora.GGML_QUANT_SIZES[ty]
    tensors = {n: (f.raw(n), t.type, t.shape) for n, t in f.tensors.items()}
    tensors["output.weight"] = (np.zeros(512 * 256 // block * size, np.uint8), ty, (512, 256))
    return ggml_lora.write(path, f.metadata, tensors)


def test_refuses_unquantizable_output_type_and_suggests_out_type(tmp_path: Path) -> None:
    mixed = model_with_output_type(tmp_path / "mixed-iq2_xxs.gguf", "iq2_xxs")
    a, b = lora_pair(512, 256, 2)
    adapter = write_adapter(tmp_path / "a.gguf", {"output.weight.lora_a": a, "output.weight.lora_b": b})
    expect_refusal(tmp_path, ggml_lora.PatchError, "iq2_xxs.*output.weight.*out_type", model=mixed, adapter=adapter, base=BASE_F16)
    # iq2_xxs can be read (so it is a valid source without a base), but not written.
    expect_refusal(tmp_path, ggml_lora.PatchError, "iq2_xxs.*output.weight.*out_type", model=mixed, adapter=adapter)
    # q8_1 (a dot-product intermediate) cannot even be read: without a base there is no source.
    unreadable = model_with_output_type(tmp_path / "mixed-q8_1.gguf", "q8_1")
    expect_refusal(tmp_path, ggml_lora.PatchError, "dequantizing q8_1.*--lora-base", model=unreadable, adapter=adapter)


def test_advice_is_added_to_the_engines_message_by_kind(tmp_path: Path) -> None:
    """The engine's message names no argument or flag; ``patch`` appends them for the error's ``kind``, keeping
    the exception's class and attributes (oracle: the model and tensor built here, the wording in patch.py)."""
    unreadable = model_with_output_type(tmp_path / "mixed-q8_1.gguf", "q8_1")
    a, b = lora_pair(512, 256, 2)
    adapter = write_adapter(tmp_path / "a.gguf", {"output.weight.lora_a": a, "output.weight.lora_b": b})
    with pytest.raises(ggml_lora.PatchError) as info:
        ggml_lora.patch(unreadable, adapter, out=tmp_path / "never.gguf")
    e = info.value
    assert (e.kind, e.path, e.tensor, e.found) == ("cannot_dequantize", str(unreadable), "output.weight", "q8_1")
    message = str(e)
    assert message.endswith("give a base model in f16/f32/bf16/q8_0/q4_0 (base=..., CLI: --lora-base)"), message
    assert message.count("--lora-base") == 1
    mixed = model_with_output_type(tmp_path / "mixed-iq2_xxs.gguf", "iq2_xxs")
    with pytest.raises(ggml_lora.PatchError) as info:
        ggml_lora.patch(mixed, adapter, base=BASE_F16, out=tmp_path / "never.gguf")
    assert info.value.kind == "cannot_quantize"
    assert str(info.value).endswith("e.g. out_type='q8_0' (CLI: --out-type q8_0)"), str(info.value)


def test_refuses_output_onto_an_input(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes((LLAMA / "base-q4_0.gguf").read_bytes())
    before = model.read_bytes()
    with pytest.raises(ggml_lora.PatchError, match="onto an input"):
        ggml_lora.patch(model, ADAPTER_R8, out=model)
    link = tmp_path / "link.gguf"
    link.symlink_to(model)
    with pytest.raises(ggml_lora.PatchError, match="onto an input"):
        ggml_lora.patch(model, ADAPTER_R8, out=link)
    assert model.read_bytes() == before


def test_unreadable_and_truncated_inputs(tmp_path: Path) -> None:
    expect_refusal(tmp_path, FileNotFoundError, "missing.gguf", adapter=tmp_path / "missing.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((LLAMA / "base-q4_0.gguf").read_bytes()[:5000])
    expect_refusal(tmp_path, ggml_lora.GGUFError, "cut.gguf.*at byte", model=cut, adapter=ADAPTER_R8)
    cut_adapter = tmp_path / "cut-adapter.gguf"
    cut_adapter.write_bytes(ADAPTER_R8.read_bytes()[:-100])
    expect_refusal(tmp_path, ggml_lora.GGUFError, "beyond the end of the file", adapter=cut_adapter)


def test_existing_output_is_replaced_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    a, b = lora_pair(256, 256, 2, value=1e30)
    bad = write_adapter(tmp_path / "bad.gguf", {"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": b})
    with pytest.raises(ValueError):
        ggml_lora.patch(BASE_F16, bad, out=out)
    assert out.read_bytes() == b"precious"
    ggml_lora.patch(BASE_F16, ADAPTER_QV, out=out)
    assert out.read_bytes()[:4] == b"GGUF"


# ---------------------------------------------------------------------------------------------------------
# command line


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ggml_lora", *args], capture_output=True, text=True, timeout=120)


def test_cli_patch_with_llama_cpp_flags(tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    done = run_cli(
        "patch", "-m", str(LLAMA / "base-q4_0.gguf"), "--lora-scaled", f"{ADAPTER_R8}:0.5",
        "--lora-scaled", str(ADAPTER_QV), "2", "--lora-base", str(BASE_F16), "-o", str(out), "-t", "2", "--table",
    )
    assert done.returncode == 0, done.stderr
    assert "14 tensors patched, 7 copied untouched" in done.stdout
    assert "blk.0.attn_q.weight" in done.stdout and "retained" in done.stdout
    assert done.stderr == ""  # no progress bar when not a terminal
    api = ggml_lora.patch(LLAMA / "base-q4_0.gguf", [(ADAPTER_R8, 0.5), (ADAPTER_QV, 2.0)], base=BASE_F16,
                          out=tmp_path / "api.gguf")
    assert reader_tensors(out).keys() == reader_tensors(api.out).keys()
    for name, data in reader_tensors(out).items():
        assert np.array_equal(data, reader_tensors(api.out)[name]), name


def test_default_output_is_model_stem_lora_gguf_beside_the_model(tmp_path: Path) -> None:
    """Documented in the README, ``patch()``'s docstring and ``--output``'s help: without ``out`` the output is
    ``<model stem>-lora.gguf`` next to the model (oracle: that sentence, spelled out here as literal names)."""
    import shutil

    for how in ("api", "cli"):
        folder = tmp_path / how
        folder.mkdir()
        model = folder / "My Model.Q4_0.gguf"
        shutil.copyfile(LLAMA / "base-q4_0.gguf", model)
        if how == "api":
            result = ggml_lora.patch(model, ADAPTER_QV, base=BASE_F16)
            assert result.out == folder / "My Model.Q4_0-lora.gguf"
        else:
            done = run_cli("patch", "-m", str(model), "--lora", str(ADAPTER_QV), "--lora-base", str(BASE_F16))
            assert done.returncode == 0, done.stderr
            assert str(folder / "My Model.Q4_0-lora.gguf") in done.stdout
        assert sorted(p.name for p in folder.iterdir()) == ["My Model.Q4_0-lora.gguf", "My Model.Q4_0.gguf"]
        assert gguf.GGUFReader(folder / "My Model.Q4_0-lora.gguf").fields["ggml_lora.adapters"].contents() == [
            "ref-adapter-f32.gguf"]


def test_cli_patch_errors_are_one_line(tmp_path: Path) -> None:
    done = run_cli("patch", "-m", str(BASE_F16), "-o", str(tmp_path / "x.gguf"))
    assert done.returncode != 0 and "--lora" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("patch", "-m", str(BASE_F16), "--lora-scaled", f"{ADAPTER_R8}:abc", "-o", str(tmp_path / "x.gguf"))
    assert done.returncode != 0 and "not a number" in done.stderr
    done = run_cli("patch", "-m", str(LLAMA / "base-q4_0-mixed.gguf"), "--lora", str(ADAPTER_R8), "--out-type", "iq2_xxs",
                   "-o", str(tmp_path / "x.gguf"))
    assert done.returncode != 0 and "--out-type" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_cli_demo_runs_a_real_patch(tmp_path: Path) -> None:
    done = run_cli("demo", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "warning: most of the LoRA change was lost" in done.stdout  # the naive q4_0 patch
    assert (tmp_path / "example-merged-q4_0.gguf").exists()
    with ggml_lora.open(tmp_path / "example-merged-q4_0.gguf") as f:
        assert f.metadata["ggml_lora.adapters"] == ["example-lora.gguf"]


# ---------------------------------------------------------------------------------------------------------
# PEFT directories are converted in memory


def test_patch_accepts_a_peft_directory_and_reproduces_llama_quantize(tmp_path: Path) -> None:
    out = tmp_path / "merged.gguf"
    ggml_lora.patch(LLAMA / "base-q4_0.gguf", LLAMA / "lora-r8" / "adapter", base=BASE_F16, out=out,
                    intermediate="f16")
    ours = reader_tensors(out)
    ref = reader_tensors(LLAMA / "lora-r8" / "merged-ref-q4_0.gguf")
    for name in ours:
        assert np.array_equal(ours[name], ref[name]), name
    with ggml_lora.open(out) as f:
        assert f.metadata["ggml_lora.adapters"] == ["adapter"]


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gemma2", "phi3", "llama-tied"])
def test_patch_with_peft_directory_matches_peft_merge_truth(tmp_path: Path, arch: str) -> None:
    folder = FIXTURES / "arch" / arch
    out = tmp_path / "merged.gguf"
    result = ggml_lora.patch(folder / "base-f16.gguf", folder / "peft-a", out=out)
    ours = reader_tensors(out)
    truth = reader_tensors(folder / "merged-truth-a-f16.gguf")
    base = reader_tensors(folder / "base-f16.gguf")
    patched = {t.name for t in result.tensors}
    assert patched
    for name, data in ours.items():
        if name in patched:
            assert f16_ulps(data, truth[name]).max() <= 1, name
        else:
            assert np.array_equal(data, base[name]), name


def test_cli_patch_gpt2_conv1d_peft_directory(tmp_path: Path) -> None:
    folder = FIXTURES / "gpt2-tiny"
    out = tmp_path / "gpt2.gguf"
    done = run_cli("patch", "-m", str(folder / "base-f16.gguf"), "--lora", str(folder / "lora-c_attn" / "adapter"),
                   "-o", str(out))
    assert done.returncode == 0, done.stderr
    ours = reader_tensors(out)
    truth = reader_tensors(folder / "lora-c_attn" / "merged-ref-f16.changed.gguf")
    for name, data in truth.items():
        assert f16_ulps(ours[name], data).max() <= 1, name


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_adapter_tensors_in_f16_bf16_q8_0(tmp_path: Path, outtype: str) -> None:
    adapter = ggml_lora.convert(LLAMA / "lora-r8" / "adapter", tmp_path / f"a-{outtype}.gguf", base=BASE_F16,
                                out_type=outtype)
    with ggml_lora.open(adapter) as f:
        assert outtype in {t.type for t in f.tensors.values()}
    ggml_lora.patch(BASE_F16, adapter, out=tmp_path / "ours.gguf", out_type="f32")
    ours = reader_f32(tmp_path / "ours.gguf")
    # Independent recomputation from gguf-py's dequantization of the very same adapter file.
    deltas = adapter_deltas(adapter)
    base = reader_f32(BASE_F16)
    for name, delta in deltas.items():
        np.testing.assert_allclose(ours[name], base[name] + delta, rtol=0, atol=2e-6)


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    import os
    import pty

    out = tmp_path / "tty.gguf"
    pid, fd = pty.fork()
    if pid == 0:  # child: stdout/stderr are the terminal
        os.execv(sys.executable, [sys.executable, "-m", "ggml_lora", "patch", "-m", str(BASE_F16), "--lora",
                                  str(ADAPTER_R8), "-o", str(out)])
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "21/21 tensors" in text and "ETA" in text and "/s" in text, text
    assert out.exists()


def test_bf16_intermediate_rounds_w_prime_to_bf16(tmp_path: Path) -> None:
    out = tmp_path / "bf16.gguf"
    result = ggml_lora.patch(BASE_F16, ADAPTER_QV, out=out, out_type="f32", intermediate="bf16")
    ours = reader_f32(out)
    base = reader_f32(BASE_F16)
    deltas = adapter_deltas(ADAPTER_QV)
    for t in result.tensors:
        values = ours[t.name]
        assert not np.any(values.view(np.uint32) & 0xFFFF), f"{t.name}: not bf16-representable"
        expected = base[t.name].astype(np.float64) + deltas[t.name]
        # within half a bf16 ulp (2^-8 relative) of the float64 merge
        assert np.all(np.abs(values - expected) <= np.abs(expected) * 2.0**-8 + 1e-30), t.name
    with ggml_lora.open(out) as f:
        assert f.metadata["ggml_lora.intermediate"] == "bf16"


def test_imatrix_quantized_model_gets_a_note(tmp_path: Path) -> None:
    with ggml_lora.open(LLAMA / "base-q4_0.gguf") as f:
        metadata = dict(f.fields)
        metadata["quantize.imatrix.file"] = "imatrix.dat"
        tensors = {n: (f.raw(n), i.type, i.shape) for n, i in f.tensors.items()}
        model = ggml_lora.write(tmp_path / "imatrix-q4_0.gguf", metadata, tensors)
    result = ggml_lora.patch(model, ADAPTER_QV, base=BASE_F16, out=tmp_path / "out.gguf")
    [note] = result.notes
    requantized = sum(t.out_type not in ("f32", "f16", "bf16") for t in result.tensors)
    assert (note.kind, note.file, note.requantized) == ("model_imatrix_not_applied", "imatrix.dat", requantized)
    assert "importance matrix (imatrix.dat)" in result.summary()
    assert repr(note) == f"PatchNote(kind='model_imatrix_not_applied', file='imatrix.dat', requantized={requantized})"
    assert (note.source, note.tensors) == (None, [])  # fields of the other kind
    assert isinstance(note, ggml_lora.PatchNote)
    assert "note: the model was quantized with an importance matrix" in result.summary()
    plain = ggml_lora.patch(LLAMA / "base-q4_0.gguf", ADAPTER_QV, base=BASE_F16, out=tmp_path / "plain.gguf")
    assert plain.notes == []
    as_f16 = ggml_lora.patch(model, ADAPTER_QV, base=BASE_F16, out=tmp_path / "f16.gguf", out_type="f16")
    assert as_f16.notes == []  # nothing is requantized
