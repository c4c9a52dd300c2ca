"""PEFT -> GGUF converter against the shared reference fixtures (llama.cpp's conversions and PEFT's merges)."""

from __future__ import annotations

import numpy as np
import pytest
from test_convert_helpers import ARCH, ARCHS, GPT2, LLAMA_GQA, f16_ulp_distance, implied_delta

import ggml_lora
from ggml_lora.convert import LoraTensors, convert, peft_to_lora
from conftest import skip_module_without_fixtures

skip_module_without_fixtures()


def read_adapter(path):
    with ggml_lora.open(path) as f:
        meta = f.metadata
        tensors = {name: f.to_numpy(name) for name in f.tensors}
        types = {name: info.type for name, info in f.tensors.items()}
    return meta, tensors, types


def assert_equal_to_reference(lora: LoraTensors, ref_path):
    meta, ref, types = read_adapter(ref_path)
    assert set(types.values()) == {"f32"}
    assert list(lora.tensors) == list(ref)  # same names, same order
    for name, want in ref.items():
        got = lora.tensors[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        assert np.array_equal(got, want), name
    assert lora.alpha == meta["adapter.lora.alpha"]
    assert lora.architecture == meta["general.architecture"]


# ---------------------------------------------------------------------------------------------------------
# llama-gqa: tensor-for-tensor equality with llama.cpp's convert_lora_to_gguf.py


@pytest.mark.parametrize("adapter", ["lora-qv-r4/adapter", "lora-r8/adapter", "lora-r8/adapter-bin"])
@pytest.mark.parametrize("base", ["hf", "base-f16.gguf", "base-q4_0.gguf"])
def test_llama_gqa_equals_llama_cpp(adapter, base):
    lora = peft_to_lora(LLAMA_GQA / adapter, LLAMA_GQA / base)
    ref = LLAMA_GQA / adapter.split("/")[0] / "ref-adapter-f32.gguf"
    # (.bin: the pickle lists tensors in PEFT's module order; the converter sorts by name like safetensors does)
    assert_equal_to_reference(lora, ref)


def test_llama_gqa_bin_equals_safetensors():
    a = peft_to_lora(LLAMA_GQA / "lora-r8/adapter", LLAMA_GQA / "hf")
    b = peft_to_lora(LLAMA_GQA / "lora-r8/adapter-bin", LLAMA_GQA / "hf")
    assert list(a.tensors) == list(b.tensors)
    assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.alpha == b.alpha == 16.0


@pytest.mark.parametrize("adapter", ["lora-qv-r4", "lora-r8"])
def test_llama_gqa_written_file(tmp_path, adapter):
    out = convert(LLAMA_GQA / adapter / "adapter", tmp_path / "a.gguf", base=LLAMA_GQA / "base-f16.gguf")
    meta, tensors, types = read_adapter(out)
    ref_meta, ref, _ = read_adapter(LLAMA_GQA / adapter / "ref-adapter-f32.gguf")
    with ggml_lora.open(out) as f:
        fields = f.fields
    assert fields["general.type"].value == "adapter"
    assert fields["adapter.type"].value == "lora"
    assert fields["general.architecture"].value == "llama"
    assert fields["adapter.lora.alpha"].type == ggml_lora.GGUFValueType.FLOAT32
    assert meta["adapter.lora.alpha"] == ref_meta["adapter.lora.alpha"]
    assert set(types.values()) == {"f32"}
    assert list(tensors) == list(ref)
    for name in ref:
        assert np.array_equal(tensors[name], ref[name])


@pytest.mark.parametrize("adapter", ["lora-qv-r4", "lora-r8"])
def test_llama_gqa_merge_matches_peft(adapter):
    lora = peft_to_lora(LLAMA_GQA / adapter / "adapter", LLAMA_GQA / "base-f16.gguf")
    check_merge(lora, LLAMA_GQA / "base-f16.gguf", LLAMA_GQA / adapter / "merged-ref-f16.gguf", full_truth=True)


# ---------------------------------------------------------------------------------------------------------
# merges against PEFT's truth


def check_merge(lora: LoraTensors, base_path, truth_path, *, full_truth: bool):
    """W + s*B@A (float64) rounded to f16 == PEFT's merged truth within 1 f16 ulp, for every adapted tensor;
    every other tensor of the truth byte-identical to the base."""
    targets = {name[: -len(".lora_a")] for name in lora.tensors if name.endswith(".lora_a")}
    with ggml_lora.open(base_path) as base, ggml_lora.open(truth_path) as truth:
        if full_truth:
            assert set(truth.tensors) == set(base.tensors)
        else:
            assert set(truth.tensors) == targets  # a "changed tensors only" truth
        assert targets <= set(truth.tensors)
        for name in truth.tensors:
            if name in targets:
                assert base.tensors[name].type == "f16"
                w = base.to_numpy(name).astype(np.float64)
                d = implied_delta(lora, name)
                assert d.shape == w.shape, name
                merged = (w + d).astype(np.float32).astype(np.float16)
                want = truth.to_numpy(name).astype(np.float16)
                ulps = f16_ulp_distance(merged, want)
                assert ulps.max() <= 1, (name, int(ulps.max()))
                assert (ulps == 0).mean() > 0.999, name
                # the change is real (2-6% of the weight), not a no-op within tolerance
                assert np.linalg.norm(d) > 0.01 * np.linalg.norm(w)
            else:
                assert np.array_equal(np.asarray(truth.raw(name)), np.asarray(base.raw(name))), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("base", ["base-f16.gguf", "hf"])
def test_arch_equals_llama_cpp(arch, base):
    # the arch MANIFEST: llama.cpp's conversion is right for variant a of every architecture
    lora = peft_to_lora(ARCH / arch / "peft-a", ARCH / arch / base)
    assert_equal_to_reference(lora, ARCH / arch / "lora-a-f32.gguf")


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_merge_matches_peft_truth(arch):
    lora = peft_to_lora(ARCH / arch / "peft-a", ARCH / arch / "base-f16.gguf")
    check_merge(lora, ARCH / arch / "base-f16.gguf", ARCH / arch / "merged-truth-a-f16.gguf", full_truth=True)


@pytest.mark.parametrize("base", ["base-f16.gguf", "hf"])
def test_gpt2_conv1d_matches_truth_not_llama_cpp(base):
    lora = peft_to_lora(GPT2 / "lora-c_attn/adapter", GPT2 / base)
    assert lora.architecture == "gpt2"
    check_merge(lora, GPT2 / "base-f16.gguf", GPT2 / "lora-c_attn/merged-ref-f16.changed.gguf", full_truth=False)
    # llama.cpp's convert_lora_to_gguf.py transposes each Conv1D factor (wrong: lora_a ne [n_out, r]): ours hold
    # the same numbers, correctly placed: our lora_a == its lora_b.T and our lora_b == its lora_a.T
    meta, ref, _ = read_adapter(GPT2 / "lora-c_attn/ref-adapter-f32.gguf")
    assert lora.alpha == meta["adapter.lora.alpha"]
    for blk in range(2):
        name = f"blk.{blk}.attn_qkv.weight"
        assert lora.tensors[name + ".lora_a"].shape == (8, 128)   # ne [n_in=128, r]
        assert lora.tensors[name + ".lora_b"].shape == (384, 8)   # ne [r, n_out=384]
        assert ref[name + ".lora_a"].shape == (8, 384)            # llama.cpp: ne [384, 8], refused by its loader
        assert np.array_equal(lora.tensors[name + ".lora_a"], ref[name + ".lora_b"].T)
        assert np.array_equal(lora.tensors[name + ".lora_b"], ref[name + ".lora_a"].T)


def test_base_gguf_and_hf_give_identical_tensors():
    for arch in ARCHS:
        a = peft_to_lora(ARCH / arch / "peft-a", ARCH / arch / "base-f16.gguf")
        b = peft_to_lora(ARCH / arch / "peft-a", ARCH / arch / "hf" / "config.json")
        assert a.alpha == b.alpha and list(a.tensors) == list(b.tensors)
        assert all(np.array_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
