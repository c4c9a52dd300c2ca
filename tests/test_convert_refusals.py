"""Converter refusals: everything that is not a plain LoRA product, bad configs, unknown architectures/tensors,
tied output heads, and hostile torch pickles (which must never run)."""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
from test_convert_helpers import ARCH, GPT2, LLAMA_GQA, make_adapter

from ggml_lora.convert import ConversionError, convert, peft_to_lora
from ggml_lora.convert.torch_pickle import load_torch_bin

MISTRAL = ARCH / "mistral"
BASE = MISTRAL / "base-f16.gguf"
ONE = ["model.layers.0.mlp.up_proj"]


def refused(folder, base=BASE, match=None):
    with pytest.raises(ConversionError, match=match):
        peft_to_lora(folder, base)


def test_conversion_error_is_value_error():
    assert issubclass(ConversionError, ValueError)


def test_dora_refused_with_patch_engine_note(tmp_path):
    folder, _, _ = make_adapter(tmp_path / "a", {"use_dora": True}, modules=ONE)
    with pytest.raises(ConversionError, match="DoRA") as exc:
        peft_to_lora(folder, BASE)
    assert "cannot represent DoRA" in str(exc.value) and "ggml-lora patch --lora PEFT_DIR" in str(exc.value)


@pytest.mark.fixtures
def test_dora_magnitude_tensor_refused_even_without_flag(tmp_path):
    extra = {"base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector": np.ones(256, np.float32)}
    folder, _, _ = make_adapter(tmp_path / "a", modules=ONE, extra=extra)
    refused(folder, match="DoRA")


@pytest.mark.parametrize("peft_type", ["LOHA", "LOKR", "IA3", "ADALORA", "OFT", "lorax"])
def test_other_peft_types_refused(tmp_path, peft_type):
    folder, _, _ = make_adapter(tmp_path / "a", {"peft_type": peft_type}, modules=ONE)
    refused(folder, match=f"peft_type '{peft_type}'")


def test_loha_with_its_own_tensors_refused(tmp_path):
    # a LoHa adapter as PEFT writes it: hada_w1_a/... tensors, peft_type LOHA
    folder = tmp_path / "loha"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": 8, "alpha": 8}))
    from test_convert_helpers import write_safetensors

    write_safetensors(folder / "adapter_model.safetensors",
                      {"base_model.model.model.layers.0.mlp.up_proj.hada_w1_a": np.ones((256, 8), np.float32)})
    refused(folder, match="LOHA")


def test_modules_to_save_refused(tmp_path):
    extra = {"base_model.model.lm_head.modules_to_save.default.weight": np.ones((512, 128), np.float32)}
    folder, _, _ = make_adapter(tmp_path / "a", {"modules_to_save": ["lm_head"]}, modules=ONE, extra=extra)
    refused(folder, match="modules_to_save")


@pytest.mark.fixtures
def test_full_weight_tensor_refused_even_without_config(tmp_path):
    extra = {"base_model.model.lm_head.weight": np.ones((512, 128), np.float32)}
    folder, _, _ = make_adapter(tmp_path / "a", modules=ONE, extra=extra)
    refused(folder, match="lm_head.weight")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_refused(tmp_path, bias):
    folder, _, _ = make_adapter(tmp_path / "a", {"bias": bias}, modules=ONE)
    refused(folder, match="bias")


@pytest.mark.fixtures
def test_lora_bias_refused(tmp_path):
    extra = {"base_model.model.model.layers.0.mlp.up_proj.lora_B.bias": np.ones(256, np.float32)}
    folder, _, _ = make_adapter(tmp_path / "a", {"lora_bias": True}, modules=ONE, extra=extra)
    refused(folder, match="lora_bias")
    folder, _, _ = make_adapter(tmp_path / "b", modules=ONE, extra=extra)
    refused(folder, match="bias")


@pytest.mark.parametrize(
    "update, match",
    [
        ({"r": 0}, "r must be positive"),
        ({"r": -4}, "r must be positive"),
        ({"r": 8.0}, "r must be an integer"),
        ({"r": "8"}, "r must be an integer"),
        ({"r": True}, "r must be an integer"),
        ({"r": 10**9}, "absurdly large"),
        ({"lora_alpha": -16}, "must not be negative"),
        ({"lora_alpha": "16"}, "finite number"),
        ({"lora_alpha": None}, "finite number"),
        ({"lora_alpha": [16]}, "finite number"),
        ({"lora_alpha": float("nan")}, "finite number"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern must be an object"),
        ({"alpha_pattern": {"q_proj": -1}}, "alpha_pattern"),
        ({"alpha_pattern": {"(": 1}}, "not a valid regex"),
        ({"peft_type": None}, "peft_type must be a string"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"trainable_token_indices": [1, 2]}, "trainable tokens"),
    ],
)
@pytest.mark.fixtures
def test_absurd_configs_refused(tmp_path, update, match):
    folder, _, _ = make_adapter(tmp_path / "a", modules=ONE)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(update)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, allow_nan=True))
    refused(folder, match=match)


def test_config_not_an_object(tmp_path):
    folder, _, _ = make_adapter(tmp_path / "a", modules=ONE)
    (folder / "adapter_config.json").write_text("[1, 2]")
    refused(folder, match="JSON object")
    (folder / "adapter_config.json").write_text("{not json")
    refused(folder, match="not valid JSON")


@pytest.mark.fixtures
def test_rank_disagreeing_with_config_refused(tmp_path):
    folder, _, _ = make_adapter(tmp_path / "a", {"r": 8}, modules=ONE, ranks={ONE[0]: 4})
    refused(folder, match="rank 4 but adapter_config.json gives r = 8")


@pytest.mark.fixtures
def test_missing_factor_refused(tmp_path):
    extra = {"base_model.model.model.layers.1.mlp.up_proj.lora_A.weight": np.ones((8, 128), np.float32)}
    folder, _, _ = make_adapter(tmp_path / "a", modules=ONE, extra=extra)
    refused(folder, match="lora_B factor is missing")


@pytest.mark.fixtures
def test_nonfinite_factor_refused(tmp_path):
    folder, _, _ = make_adapter(tmp_path / "a", modules=ONE)
    from test_convert_helpers import write_safetensors

    a = np.ones((8, 128), np.float32)
    a[0, 0] = np.inf
    write_safetensors(folder / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": a,
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": np.ones((256, 8), np.float32)})
    refused(folder, match="NaN or infinite")


@pytest.mark.fixtures
def test_shape_mismatch_with_base_refused(tmp_path):
    # a llama-gqa adapter (hidden 256) against the mistral base (hidden 128)
    refused(LLAMA_GQA / "lora-r8/adapter", BASE, match="base tensor is")


@pytest.mark.fixtures
def test_unknown_module_refused(tmp_path):
    folder, _, _ = make_adapter(tmp_path / "a", modules=ONE)
    from test_convert_helpers import write_safetensors

    write_safetensors(folder / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.mlp.frobnicator.lora_A.weight": np.ones((8, 128), np.float32),
        "base_model.model.model.layers.0.mlp.frobnicator.lora_B.weight": np.ones((256, 8), np.float32)})
    refused(folder, match="frobnicator")


@pytest.mark.fixtures
def test_unknown_architecture_refused(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    cfg = json.loads((MISTRAL / "hf/config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (hf / "config.json").write_text(json.dumps(cfg))
    refused(MISTRAL / "peft-a", hf, match="FalconForCausalLM")
    # a GGUF base of an unsupported architecture
    import ggml_lora

    with ggml_lora.open(BASE) as f:
        fields = dict(f.fields)
    fields["general.architecture"] = "falcon"
    fields = {k: v for k, v in fields.items() if not k.startswith("llama.")}
    fields["falcon.block_count"] = 2
    ggml_lora.write(tmp_path / "falcon.gguf", fields, {"token_embd.weight": np.zeros((4, 32), np.float16)})
    refused(MISTRAL / "peft-a", tmp_path / "falcon.gguf", match="'falcon' is not supported")


def test_wrong_model_family_refused():
    # a gpt2 adapter against a llama base: no such tensors
    refused(GPT2 / "lora-c_attn/adapter", BASE, match="c_attn")


@pytest.mark.fixtures
def test_lm_head_on_tied_model_refused(tmp_path):
    folder, _, _ = make_adapter(tmp_path / "a", modules=ONE, lm_head_rank=8)
    for base in (ARCH / "llama-tied/base-f16.gguf", ARCH / "llama-tied/hf", ARCH / "gemma2/hf"):
        refused(folder, base, match="tied")


def test_embedding_on_tied_model_refused(tmp_path):
    folder, _, _ = make_adapter(tmp_path / "a", modules=ONE, embedding_rank=8)
    refused(folder, ARCH / "llama-tied/base-f16.gguf", match="tied")


def test_missing_inputs(tmp_path):
    refused(tmp_path / "nope", match="not a directory")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", match="adapter_config.json")
    folder, _, _ = make_adapter(tmp_path / "a", modules=ONE)
    (folder / "adapter_model.safetensors").unlink()
    refused(folder, match="adapter_model.safetensors or adapter_model.bin")
    folder, _, _ = make_adapter(tmp_path / "b", modules=ONE)
    refused(folder, tmp_path / "no-such-base.gguf", match="not found")
    refused(folder, tmp_path / "empty", match="config.json")


def test_truncated_safetensors_refused(tmp_path):
    folder, _, _ = make_adapter(tmp_path / "a", modules=ONE)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[:-100])
    refused(folder, match=r"data ends at byte 12288 of the data section but the file holds 12188 bytes of data "
                          r"\(truncated")
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
    refused(folder, match="implausible")
    (folder / "adapter_model.safetensors").write_bytes(b"\x01" * 4)
    refused(folder, match=r"not a safetensors file \(shorter than 8 bytes: 4\)")


def test_bad_outtype_and_format(tmp_path):
    with pytest.raises(ConversionError, match="q4_0"):
        convert(MISTRAL / "peft-a", tmp_path / "x.gguf", base=BASE, out_type="q4_0")
    with pytest.raises(ConversionError, match="ggla"):
        convert(MISTRAL / "peft-a", tmp_path / "x.bin", base=BASE, out_type="q8_0", format="ggla")
    with pytest.raises(ConversionError, match="format"):
        convert(MISTRAL / "peft-a", tmp_path / "x.bin", base=BASE, format="safetensors")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------
# hostile pickles


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _torch_zip(path, payload_obj=None, *, raw_pkl: bytes | None = None):
    data = raw_pkl if raw_pkl is not None else pickle.dumps(payload_obj, protocol=2)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/data/0", b"\0" * 64)


def _hostile_payloads(marker):
    cmd = f"touch {marker}"
    return {
        "posix.system": _Evil(os.system, cmd),
        "builtins.eval": _Evil(builtins.eval, f"__import__('os').system({cmd!r})"),
        "builtins.exec": _Evil(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Evil(subprocess.Popen, ["touch", str(marker)]),
        "shutil.copyfile": _Evil(shutil.copyfile, os.devnull, str(marker)),
    }


def test_hostile_payloads_are_live(tmp_path):
    # sanity: the payloads really would run with an unrestricted unpickler
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Evil(os.system, f"touch {marker}")))
    assert marker.exists()


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                  "shutil.copyfile"])
def test_hostile_torch_zip_never_runs(tmp_path, name):
    marker = tmp_path / "marker"
    payload = _hostile_payloads(marker)[name]
    folder, _, _ = make_adapter(tmp_path / "a", modules=ONE)
    (folder / "adapter_model.safetensors").unlink()
    # the hostile object hides inside an otherwise normal-looking state dict
    _torch_zip(folder / "adapter_model.bin", {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": payload})
    with pytest.raises(ConversionError, match=name.replace(".", r"\.")):
        peft_to_lora(folder, BASE)
    with pytest.raises(ConversionError, match="nothing was executed"):
        load_torch_bin(folder / "adapter_model.bin")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "subprocess.Popen"])
def test_hostile_plain_pickle_never_runs(tmp_path, name):
    marker = tmp_path / "marker"
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(pickle.dumps({"x": _hostile_payloads(marker)[name]}, protocol=4))
    with pytest.raises(ConversionError, match=name.replace(".", r"\.")):
        load_torch_bin(path)
    assert not marker.exists()


def test_hostile_global_via_stack_global_and_inst(tmp_path):
    marker = tmp_path / "marker"
    # protocol 4 uses STACK_GLOBAL; protocol 0 uses GLOBAL/INST-style text opcodes
    for proto in (0, 4):
        path = tmp_path / f"p{proto}.bin"
        _torch_zip(path, raw_pkl=pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=proto))
        with pytest.raises(ConversionError, match=r"posix\.system"):
            load_torch_bin(path)
    inst = b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."
    _torch_zip(tmp_path / "inst.bin", raw_pkl=inst)
    with pytest.raises(ConversionError, match=r"os\.system"):
        load_torch_bin(tmp_path / "inst.bin")
    assert not marker.exists()


def test_storage_class_cannot_be_called(tmp_path):
    # torch.FloatStorage is allowed as a tag, but REDUCE-calling it is refused
    pkl = b"\x80\x02ctorch\nFloatStorage\nq\x00)R."
    _torch_zip(tmp_path / "s.bin", raw_pkl=pkl)
    with pytest.raises(ConversionError, match="FloatStorage"):
        load_torch_bin(tmp_path / "s.bin")


@pytest.mark.fixtures
def test_tensor_reading_past_storage_refused(tmp_path):
    # a real PEFT .bin with one tensor's size inflated beyond its storage
    src = LLAMA_GQA / "lora-r8/adapter-bin/adapter_model.bin"
    with zipfile.ZipFile(src) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    pkl = entries["adapter_model/data.pkl"]
    # first tensor: size (8, 256) encoded as K\x08 M\x00\x01 -> make it (8, 4096)
    needle = b"K\x08M\x00\x01\x86"
    assert needle in pkl
    entries["adapter_model/data.pkl"] = pkl.replace(needle, b"K\x08M\x00\x10\x86", 1)
    with zipfile.ZipFile(tmp_path / "bad.bin", "w") as zf:
        for n, d in entries.items():
            zf.writestr(n, d)
    with pytest.raises(ConversionError, match="past its storage"):
        load_torch_bin(tmp_path / "bad.bin")


def test_legacy_torch_format_refused(tmp_path):
    path = tmp_path / "legacy.bin"
    buf = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, buf, protocol=2)
    pickle.dump(1001, buf, protocol=2)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ConversionError, match="legacy"):
        load_torch_bin(path)


@pytest.mark.fixtures
def test_no_torch_no_network(tmp_path):
    # run a full conversion (safetensors and .bin) in a fresh interpreter where importing torch fails and any
    # socket use raises
    import subprocess as sp
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import socket, sys
        sys.modules["torch"] = None
        sys.modules["transformers"] = None
        def _no_net(*a, **k):
            raise RuntimeError("network access attempted")
        socket.socket = _no_net
        socket.create_connection = _no_net
        socket.getaddrinfo = _no_net
        from ggml_lora.convert import convert
        convert({str(LLAMA_GQA / 'lora-r8/adapter-bin')!r}, {str(tmp_path / 'a.gguf')!r},
                base={str(LLAMA_GQA / 'hf')!r}, out_type="q8_0")
        convert({str(GPT2 / 'lora-c_attn/adapter')!r}, {str(tmp_path / 'g.bin')!r},
                base={str(GPT2 / 'base-f16.gguf')!r}, format="ggla")
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
    """)
    res = sp.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
