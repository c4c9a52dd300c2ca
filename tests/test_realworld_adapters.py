"""Adapters as found in the wild (issue 10), from `tests/fixtures/realworld/` (see its MANIFEST.md).

Oracle: PEFT itself. Every adapter there was saved by PEFT (or mergekit), and every truth is PEFT's own merge of
it (`merge_and_unload`, or PEFT's own OLoRA/PiSSA conversion then `merge_and_unload`), rounded to f16 as
llama.cpp's converter writes it; the base models are the shared fixtures' `base-f16.gguf`. Outputs are read back
with gguf-py's GGUFReader. A merged tensor must be within 1 f16 ulp of the truth (the sum in f32 may land on the
other side of an f16 rounding boundary); every tensor the truth does not list must be byte-identical to the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import FIXTURES, skip_module_without_fixtures

import ggml_lora
from ggml_lora.convert import ConversionError

skip_module_without_fixtures()

CASES = Path(__file__).resolve().parent / "fixtures" / "realworld"


def base_of(case: str) -> Path:
    return FIXTURES / json.loads((CASES / case / "case.json").read_text())["base"]


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def f16_ulps(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance in f16 units in the last place (both finite; the bit patterns are ordered by value)."""

    def ordered(x: np.ndarray) -> np.ndarray:
        bits = x.view(np.uint16).astype(np.int32)
        return np.where(bits & 0x8000, 0x8000 - bits, bits)

    return int(np.abs(ordered(a) - ordered(b)).max())


def assert_matches_truth(out: Path, case: str, truth: str = "merge") -> None:
    expected = dict(np.load(CASES / case / f"truth-{truth}.npz"))
    base, got = tensors(base_of(case)), tensors(out)
    assert set(expected) <= set(got), f"tensors the merge must change are missing: {set(expected) - set(got)}"
    for name, data in got.items():
        if name not in expected:
            assert data.tobytes() == base[name].tobytes(), f"{name} changed but PEFT's merge leaves it alone"
        elif data.dtype == np.float16:
            assert f16_ulps(data, expected[name]) <= 1, name
        else:
            np.testing.assert_array_equal(data, expected[name], err_msg=name)


def relabelled(source: Path, init: object, tmp_path: Path) -> Path:
    """A copy of a PEFT adapter folder whose config says another ``init_lora_weights``."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    config = json.loads((source / "adapter_config.json").read_text())
    config["init_lora_weights"] = init
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


@pytest.mark.parametrize("case", ["init-olora", "init-pissa", "init-olora-patterns"])
def test_adapter_converted_by_peft_from_an_initialisation_merges_exactly(case, tmp_path):
    """PEFT's own conversion of an OLoRA/PiSSA adapter (rank 2r, alpha and patterns doubled) is a plain LoRA on the
    original model: patching with it gives PEFT's merge."""
    out = tmp_path / "out.gguf"
    ggml_lora.patch(base_of(case), CASES / case / "converted", out=out)
    assert_matches_truth(out, case)


@pytest.mark.parametrize(("case", "name"), [("init-olora", "OLoRA"), ("init-pissa", "PiSSA")])
def test_adapter_trained_from_a_residual_initialisation_is_refused(case, name, tmp_path):
    """Applied as a delta on the original model it would be silently wrong (the initialisation changed the base
    weights): refused, naming the initialisation and PEFT's conversion; nothing is written."""
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match=rf"init_lora_weights = '{name.lower()}'.*{name} initialisation.*"
                                              "path_initial_model_for_weight_conversion"):
        ggml_lora.patch(base_of(case), CASES / case / "adapter", out=out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ("pissa_niter_4", "PiSSA initialisation"),
        ("corda", "CorDA initialisation"),
        ("lora_ga", "LoRA-GA initialisation"),
        ("loftq", "LoftQ's quantized residual"),
        ("something_new", "not a PEFT initialisation this converter knows"),
    ],
)
def test_every_base_changing_initialisation_is_refused(init, message, tmp_path):
    """The same refusal for each initialisation PEFT lists as changing the base weights (peft/tuners/lora/model.py,
    `_convert_state_dict_for_initial_model`; LoftQ replaces them by a quantized residual), and for unknown names."""
    adapter = relabelled(CASES / "init-olora" / "adapter", init, tmp_path)
    with pytest.raises(ConversionError, match=message):
        ggml_lora.patch(base_of("init-olora"), adapter, out=tmp_path / "out.gguf")


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_initialisations_that_keep_the_base_weights_are_accepted(init, tmp_path):
    """These leave the base weights alone (PEFT's LoraLayer init methods), so the adapter is a delta on the original
    model: the converted OLoRA adapter, relabelled, still merges to PEFT's truth."""
    adapter = relabelled(CASES / "init-olora" / "converted", init, tmp_path)
    out = tmp_path / "out.gguf"
    ggml_lora.patch(base_of("init-olora"), adapter, out=out)
    assert_matches_truth(out, "init-olora")


@pytest.mark.parametrize("kind", ["loha", "lokr", "ia3", "vera"])
def test_other_peft_types_are_refused_naming_the_type(kind, tmp_path):
    """LoHa, LoKr, IA³ and VeRA adapters saved by PEFT: no partial merge, a refusal naming the peft_type."""
    out = tmp_path / "out.gguf"
    peft_type = json.loads((CASES / "other-types" / kind / "adapter_config.json").read_text())["peft_type"]
    with pytest.raises(ConversionError, match=rf"peft_type '{peft_type}' is not supported"):
        ggml_lora.patch(base_of("other-types"), CASES / "other-types" / kind, out=out)
    assert not out.exists()


@pytest.mark.parametrize("case", ["init-olora", "init-pissa", "init-olora-patterns"])
def test_adapter_with_its_initial_state_merges_as_peft_converts_it(case, tmp_path):
    """``initial=`` (the adapter PEFT saved before training) gives PEFT's own conversion, s·(B·A − B₀·A₀), merged on
    the original model: the truth made from PEFT's converted adapter, within 1 f16 ulp."""
    out = tmp_path / "out.gguf"
    ggml_lora.patch(base_of(case), CASES / case / "adapter", out=out, initial=CASES / case / "initial")
    assert_matches_truth(out, case)


def test_cli_initial(tmp_path):
    """The CLI's ``--initial DIR`` does the same (one error-free run; the output checked against PEFT's truth)."""
    from ggml_lora.cli import main

    out = tmp_path / "out.gguf"
    case = CASES / "init-pissa"
    assert main(["patch", "-m", str(base_of("init-pissa")), "--lora", str(case / "adapter"), "--initial",
                 str(case / "initial"), "-o", str(out), "-q"]) == 0
    assert_matches_truth(out, "init-pissa")


def test_initial_of_another_adapter_is_refused(tmp_path):
    """An initial state whose targets or ranks differ from the trained adapter's is not its initial state."""
    with pytest.raises(ConversionError, match="not the initial state of"):
        ggml_lora.patch(base_of("init-olora"), CASES / "init-olora" / "adapter", out=tmp_path / "o.gguf",
                        initial=CASES / "init-olora-patterns" / "initial")


def test_initial_for_a_plain_adapter_is_refused(tmp_path):
    """``initial=`` on an adapter that is already a delta on the original model (PEFT's converted one) is refused
    rather than subtracting something that was never added."""
    with pytest.raises(ConversionError, match="already a delta on the original model"):
        ggml_lora.patch(base_of("init-olora"), CASES / "init-olora" / "converted", out=tmp_path / "o.gguf",
                        initial=CASES / "init-olora" / "initial")


def test_rslora_with_patterns_is_refused_as_peft_refuses_it(tmp_path):
    """PEFT's conversion refuses rsLoRA with rank/alpha patterns (LoraModel._convert_state_dict_for_initial_model);
    so does ``initial=``."""
    adapter = relabelled(CASES / "init-olora-patterns" / "adapter", "olora", tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["use_rslora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="rsLoRA together with rank_pattern/alpha_pattern"):
        ggml_lora.patch(base_of("init-olora"), adapter, out=tmp_path / "o.gguf",
                        initial=CASES / "init-olora-patterns" / "initial")


# --- ggml-lora info on adapters (issue 10, item 8) -------------------------------------------------------------

def run_info(path: Path, capsys) -> str:
    from ggml_lora.cli import main

    assert main(["info", str(path)]) == 0
    return capsys.readouterr().out


def test_info_lists_what_peft_saved_beside_the_lora(capsys):
    """The saved base layers and the embedding LoRA are named as PEFT saved them (``save_embedding_layers``:
    ``…embed_tokens.base_layer.weight``, ``lora_embedding_A/B``), every module with PEFT's scale alpha/r = 8/4,
    and what llama.cpp's converter does with base layers (convert_lora_to_gguf.py skips them unchecked)."""
    from ggml_lora.adapter_info import describe_adapter

    info = describe_adapter(CASES / "embeddings-changed" / "adapter")
    assert info.saved_base_layers == ["lm_head", "model.embed_tokens"]
    assert {m.name for m in info.modules if m.kind == "embedding"} == {"model.embed_tokens"}
    assert {(m.rank, m.alpha, m.scale) for m in info.modules} == {(4, 8.0, 2.0)}
    out = run_info(CASES / "embeddings-changed" / "adapter", capsys)
    assert "saved base layers: lm_head, model.embed_tokens" in out
    assert "skips them without comparing" in out


def test_info_names_modules_to_save_trainable_tokens_and_the_initialisation():
    """modules_to_save tensors (saved under the module's own name), trainable-token rows (the config's
    ``trainable_token_indices``), and a PiSSA initialisation with its llama.cpp caveat."""
    from ggml_lora.adapter_info import describe_adapter

    saved = describe_adapter(CASES / "modules-to-save" / "adapter")
    assert saved.modules_to_save == ["lm_head.weight", "model.layers.0.post_attention_layernorm.weight",
                                     "model.layers.1.post_attention_layernorm.weight"]
    tokens = describe_adapter(CASES / "trainable-tokens" / "adapter")
    assert tokens.trainable_tokens == {"model.embed_tokens": [3, 17, 100]}
    assert any("trainable tokens" in c for c in tokens.caveats)
    pissa = describe_adapter(CASES / "init-pissa" / "adapter")
    assert pissa.initialisation == "pissa"
    assert any(c.startswith("PiSSA initialisation") for c in pissa.caveats)


def test_info_scales_follow_the_patterns():
    """Per-module (r, alpha, scale) follow PEFT's rule with the patterns as the config states them (v_proj's own
    r and alpha; the others the global ones), and the alpha_pattern caveat names llama.cpp's single alpha."""
    from ggml_lora.adapter_info import describe_adapter

    info = describe_adapter(CASES / "init-olora-patterns" / "converted")
    config = json.loads((CASES / "init-olora-patterns" / "converted" / "adapter_config.json").read_text())
    by_name = {m.name: m for m in info.modules}
    v = by_name["model.layers.0.self_attn.v_proj"]
    q = by_name["model.layers.0.self_attn.q_proj"]
    assert (v.rank, v.alpha, v.scale) == (config["rank_pattern"]["v_proj"], config["alpha_pattern"]["v_proj"],
                                          config["alpha_pattern"]["v_proj"] / config["rank_pattern"]["v_proj"])
    assert (q.rank, q.alpha, q.scale) == (config["r"], config["lora_alpha"], config["lora_alpha"] / config["r"])
    assert any(c.startswith("alpha_pattern") for c in info.caveats)


def test_info_on_other_types_and_gguf_adapters(capsys):
    """A LoHa folder is described (not refused) with its peft_type; a GGUF adapter by its pairs, whose ranks and
    llama.cpp scales gguf-py's reader and ``adapter.lora.alpha / rank`` give."""
    from ggml_lora.adapter_info import describe_adapter

    loha = describe_adapter(CASES / "other-types" / "loha")
    assert loha.peft_type == "LOHA" and loha.caveats[0].startswith("peft_type LOHA")
    path = FIXTURES / "llama-gqa" / "lora-r8" / "ref-adapter-f32.gguf"
    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    expected = {t.name[: -len(".lora_a")]: int(t.shape[1]) for t in reader.tensors if t.name.endswith(".lora_a")}
    info = describe_adapter(path)
    assert info.format == "gguf" and info.architecture == "llama"
    assert {m.name: m.rank for m in info.modules} == expected
    assert {m.scale for m in info.modules} == {np.float32(alpha) / np.float32(8)}
    out = run_info(path, capsys)
    assert "gguf adapter" in out and "metadata:" in out  # the summary, then the GGUF listing


def test_resized_vocabulary_is_refused_naming_both_sizes(tmp_path):
    """``resize_token_embeddings(520)`` before training: PEFT saved 520-row embedding and head base layers for a
    512-token model. Refused naming the old and new vocabulary sizes; nothing written."""
    out = tmp_path / "out.gguf"
    expect = json.loads((CASES / "embeddings-resized" / "case.json").read_text())["expect"]
    with pytest.raises(ConversionError, match=rf"vocabulary was resized from {expect['old_vocab']} to "
                                              rf"{expect['new_vocab']} tokens"):
        ggml_lora.patch(base_of("embeddings-resized"), CASES / "embeddings-resized" / "adapter", out=out)
    assert not out.exists()
