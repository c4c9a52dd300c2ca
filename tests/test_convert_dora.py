"""DoRA export for the patch engine: ``peft_to_lora(..., allow_dora=True)`` returns each module's magnitude
vector as ``<tensor>.dora_m`` in GGUF row order (q/k rotary permutation like lora_b), PEFT's scale folded into
lora_b and alpha 0; the default and ``convert()`` keep refusing DoRA. numpy + safetensors only.

Oracle: PEFT's DoRA merge (``DoraLinearVariant.merge_safe``) and scaling restated in float64 numpy, llama.cpp's
q/k row permutation restated (``_helpers.hf_permute``), the HF weights and adapters read with the safetensors
library itself (``safetensors.numpy``), and the fixtures' PEFT merge truth."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from _helpers import hf_permute
from safetensors.numpy import load_file as load_safetensors
from test_convert_helpers import ARCH, GPT2, LLAMA_GQA, make_adapter, write_safetensors

from ggml_lora import gguf
from ggml_lora.convert import ConversionError, convert, peft_to_lora
from conftest import skip_module_without_fixtures

skip_module_without_fixtures()

GQA_BASE = LLAMA_GQA / "base-f16.gguf"
GQA_HF = LLAMA_GQA / "hf"
MISTRAL_BASE = ARCH / "mistral" / "base-f16.gguf"
ONE = ["model.layers.0.mlp.up_proj"]

# llama-gqa: hidden 256, 4 heads, 2 kv heads (head_dim 64), 2 layers, untied output head
GQA_SHAPES = {"q_proj": (256, 256), "k_proj": (128, 256), "v_proj": (128, 256)}
GQA_HEADS = {"q_proj": 4, "k_proj": 2, "v_proj": None}
GQA_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v"}
MAG_KEYS = [".lora_magnitude_vector.weight", ".lora_magnitude_vector", ".lora_magnitude_vector.default.weight",
            ".lora_magnitude_vector.default"]

DORA_CONFIG = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 8,
    "lora_alpha": 16,
    "bias": "none",
    "use_dora": True,
    "use_rslora": False,
    "fan_in_fan_out": False,
    "target_modules": ["q_proj", "k_proj", "v_proj"],
}


def dora_merge(w: np.ndarray, delta: np.ndarray, m: np.ndarray) -> np.ndarray:
    """PEFT DoraLinearVariant.merge_safe in float64: (m / ||W + dW||_row) * (W + dW), norm over dim=1."""
    merged = w.astype(np.float64) + delta.astype(np.float64)
    norm = np.linalg.norm(merged, axis=1)
    return (m.astype(np.float64) / norm)[:, None] * merged


def peft_scale(cfg: dict, module: str) -> float:
    r, alpha = cfg["r"], cfg["lora_alpha"]
    for key, val in (cfg.get("rank_pattern") or {}).items():
        if module.endswith(key):
            r = val
            break
    for key, val in (cfg.get("alpha_pattern") or {}).items():
        if module.endswith(key):
            alpha = val
            break
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def hf_weights() -> dict[str, np.ndarray]:
    return load_safetensors(GQA_HF / "model.safetensors")


def gqa_dora_adapter(folder, config=None, *, mag_key=".lora_magnitude_vector.weight",
                     projs=("q_proj", "k_proj", "v_proj"), drop_magnitude=None, magnitude_override=None, extra=None,
                     seed=0):
    """A DoRA adapter for llama-gqa: {module: (A, B, m)} with m = ||W||_row * (random factor near 1), like a
    trained DoRA magnitude (PEFT initialises m to the row norms of W)."""
    cfg = dict(DORA_CONFIG)
    cfg.update(config or {})
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hf = hf_weights()
    tensors: dict[str, np.ndarray] = {}
    truth: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for i in range(2):
        for proj in projs:
            module = f"model.layers.{i}.self_attn.{proj}"
            n_out, n_in = GQA_SHAPES[proj]
            r = cfg["r"]
            for key, val in (cfg.get("rank_pattern") or {}).items():
                if module.endswith(key):
                    r = val
                    break
            a = rng.normal(0, 1 / math.sqrt(n_in), (r, n_in)).astype(np.float32)
            b = rng.normal(0, 0.02, (n_out, r)).astype(np.float32)
            w = hf[module + ".weight"].astype(np.float64)
            m = (np.linalg.norm(w, axis=1) * rng.uniform(0.5, 1.5, n_out)).astype(np.float32)
            truth[module] = (a, b, m)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
            if module != drop_magnitude:
                mm = magnitude_override.get(module, m) if magnitude_override else m
                tensors[f"base_model.model.{module}{mag_key}"] = mm
    tensors.update(extra or {})
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return folder, cfg, truth


# ---------------------------------------------------------------------------------------------------------
# (1) refusals without allow_dora


def test_default_refuses_dora_with_patch_hint(tmp_path):
    folder, _, _ = make_adapter(tmp_path / "a", {"use_dora": True}, modules=ONE)
    with pytest.raises(ConversionError, match="cannot represent DoRA") as exc:
        peft_to_lora(folder, MISTRAL_BASE)
    msg = str(exc.value)
    assert "llama.cpp's adapter format cannot represent DoRA" in msg
    assert "ggml-lora patch --lora PEFT_DIR" in msg
    assert "ggml_lora.patch(model, PEFT_DIR)" in msg
    assert "planned" not in msg


def test_default_refuses_real_dora_adapter(tmp_path):
    folder, _, _ = gqa_dora_adapter(tmp_path / "a")
    with pytest.raises(ConversionError, match="ggml-lora patch --lora PEFT_DIR"):
        peft_to_lora(folder, GQA_BASE)
    with pytest.raises(ConversionError, match="ggml-lora patch --lora PEFT_DIR"):
        peft_to_lora(folder, GQA_HF, allow_dora=False)


@pytest.mark.parametrize("fmt", ["gguf", "ggla"])
def test_convert_keeps_refusing_dora(tmp_path, fmt):
    folder, _, _ = gqa_dora_adapter(tmp_path / "a")
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match="cannot represent DoRA"):
        convert(folder, out, base=GQA_BASE, format=fmt)
    assert not out.exists()


def test_magnitude_without_use_dora_refused(tmp_path):
    folder, _, _ = gqa_dora_adapter(tmp_path / "a", {"use_dora": False})
    with pytest.raises(ConversionError, match="cannot represent DoRA"):
        peft_to_lora(folder, GQA_BASE)
    with pytest.raises(ConversionError, match="cannot represent DoRA"):
        convert(folder, tmp_path / "o.gguf", base=GQA_BASE)
    # allow_dora does not make an inconsistent adapter acceptable
    with pytest.raises(ConversionError, match="does not set use_dora"):
        peft_to_lora(folder, GQA_BASE, allow_dora=True)


# ---------------------------------------------------------------------------------------------------------
# (2) export


CONFIGS = {
    "plain": {},
    "rslora": {"use_rslora": True, "r": 4, "lora_alpha": 8},
    "patterns": {"r": 8, "lora_alpha": 16, "rank_pattern": {"k_proj": 4}, "alpha_pattern": {"v_proj": 3}},
    "rslora-patterns": {"use_rslora": True, "r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 2},
                        "alpha_pattern": {"k_proj": 5}},
}


@pytest.mark.parametrize("base", ["gguf", "hf"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_dora_export_llama_gqa(tmp_path, name, base):
    folder, cfg, truth = gqa_dora_adapter(tmp_path / "a", CONFIGS[name])
    lora = peft_to_lora(folder, GQA_BASE if base == "gguf" else GQA_HF, allow_dora=True)
    assert lora.dora is True
    assert lora.alpha == 0.0
    assert len(lora.tensors) == 3 * len(truth)
    for module, (a, b, m) in truth.items():
        i, proj = int(module.split(".")[2]), module.rsplit(".", 1)[1]
        name_ = f"blk.{i}.{GQA_GGUF[proj]}.weight"
        s = peft_scale(cfg, module)
        dm = lora.tensors[name_ + ".dora_m"]
        lb = lora.tensors[name_ + ".lora_b"]
        assert dm.dtype == np.float32 and dm.ndim == 1 and dm.shape[0] == lb.shape[0] == GQA_SHAPES[proj][0]
        n = GQA_HEADS[proj]
        perm = (lambda x: hf_permute(x, n)) if n else (lambda x: x)
        # magnitudes move with the rows; PEFT's scale is folded into lora_b (scale() is 1 with alpha 0)
        assert np.array_equal(dm, perm(m))
        assert np.array_equal(lora.tensors[name_ + ".lora_a"], a)
        assert np.array_equal(lb, perm((b.astype(np.float64) * s).astype(np.float32)))
        assert lora.scale(name_) == 1.0
        if n:
            assert not np.array_equal(dm, m)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dora_merge_matches_peft_in_hf_layout(tmp_path, name):
    """PEFT's DoRA merge in HF layout (HF weights), permuted into GGUF row order as llama.cpp permutes q/k, equals
    the DoRA merge in GGUF layout from base-f16.gguf and the exported lora_a/lora_b/dora_m (user scale 1)."""
    folder, cfg, truth = gqa_dora_adapter(tmp_path / "a", CONFIGS[name], seed=3)
    lora = peft_to_lora(folder, GQA_BASE, allow_dora=True)
    hf = hf_weights()
    with gguf.open(GQA_BASE) as base:
        for module, (a, b, m) in truth.items():
            i, proj = int(module.split(".")[2]), module.rsplit(".", 1)[1]
            name_ = f"blk.{i}.{GQA_GGUF[proj]}.weight"
            s = peft_scale(cfg, module)
            w_hf = hf[module + ".weight"].astype(np.float64)
            want = dora_merge(w_hf, s * (b.astype(np.float64) @ a.astype(np.float64)), m)
            n = GQA_HEADS[proj]
            if n:
                want = hf_permute(want, n)
            w_gguf = base.to_numpy(name_).astype(np.float64)
            la = lora.tensors[name_ + ".lora_a"].astype(np.float64)
            lb = lora.tensors[name_ + ".lora_b"].astype(np.float64)
            got = dora_merge(w_gguf, lora.scale(name_) * (lb @ la), lora.tensors[name_ + ".dora_m"])
            # only difference: s*B rounded to float32 once
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
            if n:  # the check has teeth: unpermuted magnitudes would be wrong
                bad = dora_merge(w_gguf, lb @ la, m)
                assert not np.allclose(bad, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("mag_key", MAG_KEYS)
def test_magnitude_key_forms(tmp_path, mag_key):
    folder, _, truth = gqa_dora_adapter(tmp_path / "a", mag_key=mag_key, projs=("k_proj",))
    lora = peft_to_lora(folder, GQA_BASE, allow_dora=True)
    for i in range(2):
        m = truth[f"model.layers.{i}.self_attn.k_proj"][2]
        assert np.array_equal(lora.tensors[f"blk.{i}.attn_k.weight.dora_m"], hf_permute(m, 2))


def test_duplicate_magnitude_keys_refused(tmp_path):
    m = np.ones(128, np.float32)
    extra = {"base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector": m}
    folder, _, _ = gqa_dora_adapter(tmp_path / "a", projs=("v_proj",), extra=extra)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.v_proj.*duplicate"):
        peft_to_lora(folder, GQA_BASE, allow_dora=True)


def test_allow_dora_leaves_plain_lora_unchanged(tmp_path):
    folder, _, _ = make_adapter(tmp_path / "a", {"use_rslora": True, "r": 4, "lora_alpha": 8})
    plain = peft_to_lora(folder, MISTRAL_BASE)
    allowed = peft_to_lora(folder, MISTRAL_BASE, allow_dora=True)
    assert allowed.dora is False and plain.dora is False
    assert allowed.alpha == plain.alpha != 0.0
    assert allowed.tensors.keys() == plain.tensors.keys()
    assert not any(k.endswith(".dora_m") for k in allowed.tensors)
    assert all(np.array_equal(allowed.tensors[k], plain.tensors[k]) for k in plain.tensors)


def dora_copy(src, folder):
    """A copy of a real PEFT folder with use_dora switched on: (folder, config, its tensors) to add magnitudes to."""
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder, cfg, dict(load_safetensors(folder / "adapter_model.safetensors"))


def test_gpt2_conv1d_dora_magnitude_per_output_feature(tmp_path):
    # fan_in_fan_out Conv1D (c_attn, fused qkv): PEFT's magnitude is per output feature = lora_B rows, no transform
    src = GPT2 / "lora-c_attn/adapter"
    folder, cfg, tensors = dora_copy(src, tmp_path / "a")
    rng = np.random.default_rng(1)
    mags = {}
    for i in range(2):
        mags[i] = rng.uniform(0.5, 2.0, 384).astype(np.float32)
        tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_magnitude_vector.weight"] = mags[i]
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    lora = peft_to_lora(folder, GPT2 / "base-f16.gguf", allow_dora=True)
    assert lora.dora and lora.alpha == 0.0
    s = cfg["lora_alpha"] / cfg["r"]
    for i in range(2):
        name = f"blk.{i}.attn_qkv.weight"
        assert np.array_equal(lora.tensors[name + ".dora_m"], mags[i])
        b = tensors[f"base_model.model.transformer.h.{i}.attn.c_attn.lora_B.weight"]
        assert np.array_equal(lora.tensors[name + ".lora_b"], (b.astype(np.float64) * s).astype(np.float32))


def test_phi3_fused_dora_magnitude_unchanged(tmp_path):
    src = ARCH / "phi3/peft-a"
    folder, cfg, tensors = dora_copy(src, tmp_path / "a")
    rng = np.random.default_rng(2)
    mags = {}
    for key in [k for k in tensors if k.endswith(".lora_B.weight")]:
        module = key[: -len(".lora_B.weight")]
        mags[module] = rng.uniform(0.5, 2.0, tensors[key].shape[0]).astype(np.float32)
        tensors[module + ".lora_magnitude_vector"] = mags[module]
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    lora = peft_to_lora(folder, ARCH / "phi3/base-f16.gguf", allow_dora=True)
    assert lora.dora and lora.alpha == 0.0
    assert np.array_equal(lora.tensors["blk.0.attn_qkv.weight.dora_m"],
                          mags["base_model.model.model.layers.0.self_attn.qkv_proj"])
    assert np.array_equal(lora.tensors["blk.0.ffn_up.weight.dora_m"],
                          mags["base_model.model.model.layers.0.mlp.gate_up_proj"])
    assert sum(k.endswith(".dora_m") for k in lora.tensors) == len(mags)


# ---------------------------------------------------------------------------------------------------------
# (3) errors with allow_dora


def test_wrong_length_magnitude_refused(tmp_path):
    bad = {"model.layers.1.self_attn.k_proj": np.ones(256, np.float32)}  # q's length on k
    folder, _, _ = gqa_dora_adapter(tmp_path / "a", magnitude_override=bad)
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.self_attn\.k_proj.*magnitude.*\(128,\)"):
        peft_to_lora(folder, GQA_BASE, allow_dora=True)


def test_two_dimensional_magnitude_refused(tmp_path):
    bad = {"model.layers.0.self_attn.v_proj": np.ones((128, 1), np.float32)}
    folder, _, _ = gqa_dora_adapter(tmp_path / "a", magnitude_override=bad)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.v_proj.*magnitude"):
        peft_to_lora(folder, GQA_BASE, allow_dora=True)


def test_missing_magnitude_refused(tmp_path):
    folder, _, _ = gqa_dora_adapter(tmp_path / "a", drop_magnitude="model.layers.0.self_attn.q_proj")
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.q_proj.*no DoRA magnitude"):
        peft_to_lora(folder, GQA_BASE, allow_dora=True)


def test_non_finite_magnitude_refused(tmp_path):
    m = np.ones(128, np.float32)
    m[3] = np.nan
    folder, _, _ = gqa_dora_adapter(tmp_path / "a", magnitude_override={"model.layers.0.self_attn.k_proj": m})
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.k_proj.*NaN"):
        peft_to_lora(folder, GQA_BASE, allow_dora=True)


def test_embedding_dora_refused(tmp_path):
    rng = np.random.default_rng(4)
    extra = {
        "base_model.model.model.embed_tokens.lora_embedding_A": rng.normal(size=(8, 512)).astype(np.float32),
        "base_model.model.model.embed_tokens.lora_embedding_B": rng.normal(size=(256, 8)).astype(np.float32),
        "base_model.model.model.embed_tokens.lora_magnitude_vector": np.ones(256, np.float32),
    }
    folder, _, _ = gqa_dora_adapter(tmp_path / "a", extra=extra)
    with pytest.raises(ConversionError, match=r"model\.embed_tokens.*DoRA on an embedding"):
        peft_to_lora(folder, GQA_BASE, allow_dora=True)
    # without a magnitude vector too: with use_dora, PEFT makes every embedding LoRA a DoRA embedding
    del extra["base_model.model.model.embed_tokens.lora_magnitude_vector"]
    folder, _, _ = gqa_dora_adapter(tmp_path / "b", extra=extra)
    with pytest.raises(ConversionError, match=r"model\.embed_tokens.*DoRA on an embedding"):
        peft_to_lora(folder, GQA_BASE, allow_dora=True)


def test_use_dora_must_be_boolean_when_allowed(tmp_path):
    folder, _, _ = gqa_dora_adapter(tmp_path / "a", {"use_dora": "yes"})
    with pytest.raises(ConversionError, match="use_dora must be true or false"):
        peft_to_lora(folder, GQA_BASE, allow_dora=True)
    with pytest.raises(ConversionError, match="cannot represent DoRA"):
        peft_to_lora(folder, GQA_BASE)


# ---------------------------------------------------------------------------------------------------------
# end to end: the patch engine merges a DoRA PEFT folder exactly


@pytest.mark.parametrize("name", ["plain", "rslora"])
def test_patch_merges_dora_folder_like_peft(tmp_path, name):
    """ggml_lora.patch(model, DORA_PEFT_DIR) equals PEFT's DoRA merge computed in HF layout (float64, from the HF
    weights), permuted into GGUF order; untouched tensors are byte-identical."""
    import ggml_lora

    folder, cfg, truth = gqa_dora_adapter(tmp_path / "a", CONFIGS[name], seed=5)
    out = tmp_path / "merged.gguf"
    result = ggml_lora.patch(GQA_BASE, folder, out=out, out_type="f32")
    patched = {t.name for t in result.tensors}
    hf = hf_weights()
    with ggml_lora.open(out) as merged, ggml_lora.open(GQA_BASE) as base:
        for module, (a, b, m) in truth.items():
            i, proj = int(module.split(".")[2]), module.rsplit(".", 1)[1]
            target = f"blk.{i}.{GQA_GGUF[proj]}.weight"
            assert target in patched
            want = dora_merge(hf[module + ".weight"].astype(np.float64),
                              peft_scale(cfg, module) * (b.astype(np.float64) @ a.astype(np.float64)), m)
            if GQA_HEADS[proj]:
                want = hf_permute(want, GQA_HEADS[proj])
            got = merged.to_numpy(target)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
            # DoRA's defining property: every merged row has its magnitude as norm (rows in GGUF order)
            m_rows = hf_permute(m[:, None], GQA_HEADS[proj])[:, 0] if GQA_HEADS[proj] else m
            np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=1), m_rows, rtol=1e-5)
        for name_, info in base.tensors.items():
            if name_ not in patched:
                assert np.array_equal(merged.raw(name_), base.raw(name_)), name_
    with pytest.raises(ConversionError, match="DoRA"):
        convert(folder, tmp_path / "x.gguf", base=GQA_BASE)
