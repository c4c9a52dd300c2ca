"""Converter outputs: GGUF outtypes (f16/bf16/q8_0), the legacy ggla file, default paths, and the CLI.

Oracles: llama.cpp's own f32 adapter (``ref-adapter-f32.gguf``) read by gguf-py, gguf-py's quantization and
llama.cpp's outtype rule (restated from its sources, see ``llama_cpp_outtype_rule``), an independent ggla reader
(``test_convert_helpers.read_ggla``), PEFT's merge truth files, and float64 numpy."""

from __future__ import annotations

import argparse

import gguf
import numpy as np
import pytest
from test_convert_helpers import ARCH, GPT2, LLAMA_GQA, f16_ulp_distance, make_adapter, read_ggla

import ggml_lora
from ggml_lora.convert import DEFAULT_GGLA_NAME, DEFAULT_GGUF_NAME, convert, peft_to_lora
from ggml_lora.convert.cli import add_convert_subcommand
from conftest import skip_module_without_fixtures

skip_module_without_fixtures()

R8 = LLAMA_GQA / "lora-r8"
BASE = LLAMA_GQA / "base-f16.gguf"


def llama_cpp_outtype_rule(want: np.ndarray, outtype: str) -> tuple[str, bytes]:
    """The (type, bytes) llama.cpp's converters write for a 2-D lora_a/lora_b tensor at ``--outtype``, computed
    with gguf-py, the library they call. Reference: ``ModelBase.prepare_tensors`` in llama.cpp's
    ``conversion/base.py`` (checked by :func:`test_outtype_rule_is_the_one_in_llama_cpp_sources`): names ending
    in ``.lora_a``/``.lora_b`` take the file type's type; ``gguf.quants.quantize`` raises ``QuantError`` when a
    row is not a whole number of blocks (lora_b: r elements) and the converter then falls back to F16."""
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    try:
        data = gguf.quants.quantize(want, qtype)
    except gguf.QuantError:
        qtype = gguf.GGMLQuantizationType.F16
        data = gguf.quants.quantize(want, qtype)
    return qtype.name.lower(), np.ascontiguousarray(data).tobytes()


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_gguf_outtypes(tmp_path, outtype):
    """Read back with gguf-py, every tensor has llama.cpp's type and gguf-py's own bytes for the f32 values of
    llama.cpp's f32 adapter (``ref-adapter-f32.gguf``, made by convert_lora_to_gguf.py from the same PEFT
    folder). Oracle: gguf-py (reader and quantize), never ggml_lora's own quantization."""
    ref = {t.name: np.array(t.data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
           for t in gguf.GGUFReader(R8 / "ref-adapter-f32.gguf").tensors}
    out = convert(R8 / "adapter", tmp_path / "a.gguf", base=BASE, out_type=outtype)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 16.0
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    assert [t.name for t in reader.tensors] == list(ref)
    types = set()
    for t in reader.tensors:
        want = ref[t.name]
        assert tuple(int(d) for d in reversed(t.shape)) == want.shape, t.name
        want_type, want_bytes = llama_cpp_outtype_rule(want, outtype)
        assert t.tensor_type.name.lower() == want_type, t.name
        assert np.asarray(t.data).tobytes() == want_bytes, t.name
        types.add(want_type)
    # lora_a rows (n_in long) are q8_0; lora_b rows (r = 8 long) cannot be and are f16
    assert types == ({"q8_0", "f16"} if outtype == "q8_0" else {outtype})


def test_outtype_rule_is_the_one_in_llama_cpp_sources():
    """The reference of :func:`llama_cpp_outtype_rule`, read from llama.cpp's sources (the llama-cpp-python
    sdist the other oracles use): running convert_lora_to_gguf.py itself needs torch, which the tests avoid, so
    the lines the rule restates are checked to still be there."""
    from oracles.sdist import llama_cpp_source

    src = (llama_cpp_source() / "conversion" / "base.py").read_text()
    body = src[src.index("def prepare_tensors(self):"):]
    body = body[: body.index("\n    def ", 1)]
    for line in (
        'or new_name[-7:] not in (".weight", ".lora_a", ".lora_b")',  # lora factors are not forced to F32
        "elif self.ftype == gguf.LlamaFileType.MOSTLY_Q8_0:",
        "data_qtype = gguf.GGMLQuantizationType.Q8_0",
        "except gguf.QuantError as e:",
        'logger.warning("%s, %s", e, "falling back to F16")',
        "data_qtype = gguf.GGMLQuantizationType.F16",
    ):
        assert line in body, f"llama.cpp's prepare_tensors changed: {line!r} is gone"
    # gguf-py raises QuantError exactly for rows that are not whole blocks
    with pytest.raises(gguf.QuantError):
        gguf.quants.quantize(np.zeros((4, 8), np.float32), gguf.GGMLQuantizationType.Q8_0)


def test_bf16_round_trip_is_round_to_nearest_even(tmp_path):
    lora = peft_to_lora(R8 / "adapter", BASE)
    out = convert(R8 / "adapter", tmp_path / "a.gguf", base=BASE, out_type="bf16")
    with ggml_lora.open(out) as f:
        name = "blk.0.attn_q.weight.lora_a"
        got = f.to_numpy(name)
        raw = np.asarray(f.raw(name)).view(np.uint16).reshape(got.shape)
    want = lora.tensors[name]
    bits = want.view(np.uint32)
    rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    assert np.array_equal(raw, rne)
    assert np.array_equal(got, (rne.astype(np.uint32) << 16).view(np.float32))


def test_f16_output_merge_still_within_tolerance(tmp_path):
    out = convert(ARCH / "qwen2/peft-a", tmp_path / "a.gguf", base=ARCH / "qwen2/base-f16.gguf", out_type="f16")
    with ggml_lora.open(out) as f:
        assert {i.type for i in f.tensors.values()} == {"f16"}
        alpha = f.metadata["adapter.lora.alpha"]
        tensors = {n: f.to_numpy(n) for n in f.tensors}
    with ggml_lora.open(ARCH / "qwen2/base-f16.gguf") as base, ggml_lora.open(
            ARCH / "qwen2/merged-truth-a-f16.gguf") as truth:
        for name in {n[: -len(".lora_a")] for n in tensors if n.endswith(".lora_a")}:
            a = tensors[name + ".lora_a"].astype(np.float64)
            b = tensors[name + ".lora_b"].astype(np.float64)
            w = base.to_numpy(name).astype(np.float64)
            t = truth.to_numpy(name).astype(np.float64)
            merged = (w + alpha / b.shape[1] * (b @ a)).astype(np.float16).astype(np.float64)
            # f16 factors (and the f16 rounding of the merge itself) keep the arch MANIFEST's delta criterion
            assert np.linalg.norm(merged - t) / np.linalg.norm(t - w) < 1e-2, name


def test_gguf_metadata_and_default_path(tmp_path):
    folder, _, _ = make_adapter(tmp_path / "my-lora", {"use_rslora": True},
                                modules=["model.layers.0.self_attn.q_proj"])
    out = convert(folder, base=ARCH / "mistral/base-f16.gguf")
    assert out == folder / DEFAULT_GGUF_NAME
    with ggml_lora.open(out) as f:
        fields = f.fields
    assert fields["general.architecture"].value == "llama"
    assert fields["general.type"].value == "adapter"
    assert fields["adapter.type"].value == "lora"
    assert fields["adapter.lora.alpha"] == ggml_lora.MetadataValue(0.0, ggml_lora.GGUFValueType.FLOAT32)
    assert fields["general.name"].value == "my-lora"
    # an existing folder as `out` gets the default file name inside it
    (tmp_path / "outdir").mkdir()
    assert convert(folder, tmp_path / "outdir", base=ARCH / "mistral/hf") == tmp_path / "outdir" / DEFAULT_GGUF_NAME
    assert convert(folder, base=ARCH / "mistral/hf", format="ggla") == folder / DEFAULT_GGLA_NAME


# ---------------------------------------------------------------------------------------------------------
# ggla


def ggla_delta(tensors, name, r, alpha):
    """What the old llama.cpp loader adds: mul_mat(loraA, loraB) * alpha/r, numpy layout of the base tensor."""
    a = tensors[name + ".loraA"][2].astype(np.float64)   # numpy (n_in, r)  = ne [r, n_in]
    b = tensors[name + ".loraB"][2].astype(np.float64)   # numpy (n_out, r) = ne [r, n_out]
    return (alpha / r) * (b @ a.T)


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_ggla_layout(tmp_path, outtype):
    lora = peft_to_lora(R8 / "adapter", BASE)
    out = convert(R8 / "adapter", tmp_path / "a.bin", base=BASE, format="ggla", out_type=outtype)
    data = out.read_bytes()
    assert data[:4] == b"algg" and int.from_bytes(data[:4], "little") == 0x67676C61
    r, alpha, tensors = read_ggla(out)
    assert (r, alpha) == (8, 16)
    bases = [n[: -len(".lora_a")] for n in lora.tensors if n.endswith(".lora_a")]
    assert list(tensors) == [b + s for b in bases for s in (".loraA", ".loraB")]
    with ggml_lora.open(BASE) as base:
        shapes = {n: i.dims for n, i in base.tensors.items()}
    for name in bases:
        ftype_a, ne_a, a, off_a = tensors[name + ".loraA"]
        ftype_b, ne_b, b, off_b = tensors[name + ".loraB"]
        assert off_a % 32 == 0 and off_b % 32 == 0
        assert ftype_a == (0 if outtype == "f32" else 1) and ftype_b == 0  # loraB always f32, as the original
        # loraA = lora_A.T: ne [r, n_in]; loraB = lora_B: ne [r, n_out]; the old loader's shape checks
        n_in, n_out = shapes[name]
        assert ne_a == [8, n_in] and ne_b == [8, n_out]
        want_a = lora.tensors[name + ".lora_a"].T
        if outtype == "f16":
            want_a = want_a.astype(np.float16)
        assert np.array_equal(a, want_a)
        assert np.array_equal(b, lora.tensors[name + ".lora_b"])  # q/k rows already permuted
        np.testing.assert_allclose(ggla_delta(tensors, name, r, alpha),
                                   (16 / 8) * lora.tensors[name + ".lora_b"].astype(np.float64)
                                   @ lora.tensors[name + ".lora_a"], rtol=1e-12 if outtype == "f32" else 0,
                                   atol=0 if outtype == "f32" else 2e-3 * np.abs(ggla_delta(tensors, name, r, alpha)).max())


def test_ggla_folds_when_alpha_is_not_expressible(tmp_path):
    folder, cfg, _ = make_adapter(tmp_path / "a", {"r": 8, "lora_alpha": 16, "use_rslora": True,
                                                   "alpha_pattern": {"o_proj": 3}})
    base = ARCH / "mistral/base-f16.gguf"
    lora = peft_to_lora(folder, base)
    out = convert(folder, tmp_path / "a.bin", base=base, format="ggla")
    r, alpha, tensors = read_ggla(out)
    assert r == alpha == 8  # scale 1: every tensor's PEFT scale is in loraB
    for name in {n[: -len(".lora_a")] for n in lora.tensors}:
        got = ggla_delta(tensors, name, r, alpha)
        want = lora.tensors[name + ".lora_b"].astype(np.float64) @ lora.tensors[name + ".lora_a"]
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_ggla_gpt2_matches_truth(tmp_path):
    out = convert(GPT2 / "lora-c_attn/adapter", tmp_path / "g.bin", base=GPT2 / "hf", format="ggla")
    r, alpha, tensors = read_ggla(out)
    assert list(tensors) == ["blk.0.attn_qkv.weight.loraA", "blk.0.attn_qkv.weight.loraB",
                             "blk.1.attn_qkv.weight.loraA", "blk.1.attn_qkv.weight.loraB"]
    with ggml_lora.open(GPT2 / "base-f16.gguf") as base, ggml_lora.open(
            GPT2 / "lora-c_attn/merged-ref-f16.changed.gguf") as truth:
        for blk in range(2):
            name = f"blk.{blk}.attn_qkv.weight"
            assert tensors[name + ".loraA"][1][1] == base.tensors[name].dims[0]  # base.ne[0] == loraA.ne[1]
            assert tensors[name + ".loraB"][1][1] == base.tensors[name].dims[1]  # base.ne[1] == loraB.ne[1]
            merged = (base.to_numpy(name) + ggla_delta(tensors, name, r, alpha)).astype(np.float16)
            assert f16_ulp_distance(merged, truth.to_numpy(name)).max() <= 1


def test_ggla_embedding(tmp_path):
    folder, cfg, factors = make_adapter(tmp_path / "a", modules=[], embedding_rank=8)
    base = ARCH / "mistral/base-f16.gguf"
    lora = peft_to_lora(folder, base)
    out = convert(folder, tmp_path / "e.bin", base=base, format="ggla")
    r, alpha, tensors = read_ggla(out)
    assert tensors["token_embd.weight.loraA"][1] == [8, 128]  # base token_embd ne [128, 512]
    assert tensors["token_embd.weight.loraB"][1] == [8, 512]
    a, b = factors["model.embed_tokens"]
    np.testing.assert_allclose(ggla_delta(tensors, "token_embd.weight", r, alpha),
                               2.0 * (b.astype(np.float64) @ a).T, rtol=1e-6)
    assert lora.alpha == 16.0


# ---------------------------------------------------------------------------------------------------------
# CLI


def parser():
    p = argparse.ArgumentParser(prog="ggml-lora")
    sub = p.add_subparsers(dest="command", required=True)
    add_convert_subcommand(sub)
    return p


def test_cli_convert(tmp_path, capsys):
    args = parser().parse_args(["convert", str(R8 / "adapter"), "--base", str(LLAMA_GQA / "hf"),
                                "-o", str(tmp_path / "x.gguf"), "--outtype", "f16"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "x.gguf") in printed and "alpha = 16" in printed and "14 tensor pairs" in printed
    with ggml_lora.open(tmp_path / "x.gguf") as f:
        assert {i.type for i in f.tensors.values()} == {"f16"}


def test_cli_convert_ggla_and_defaults(tmp_path, capsys):
    folder, _, _ = make_adapter(tmp_path / "a", {"use_rslora": True}, modules=["model.layers.0.mlp.up_proj"])
    args = parser().parse_args(["convert", str(folder), "--base", str(ARCH / "mistral/base-f16.gguf")])
    assert args.out_type == "f32" and args.format == "gguf" and args.out is None
    assert args.func(args) == 0
    assert "folded" in capsys.readouterr().out
    assert (folder / DEFAULT_GGUF_NAME).is_file()
    args = parser().parse_args(["convert", str(folder), "--base", str(ARCH / "mistral/hf"), "--format", "ggla"])
    assert args.func(args) == 0
    assert "ggla" in capsys.readouterr().out
    assert (folder / DEFAULT_GGLA_NAME).read_bytes()[:4] == b"algg"


def test_cli_requires_base_and_rejects_unknown_outtype(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["convert", "x"])
    with pytest.raises(SystemExit):
        parser().parse_args(["convert", "x", "--base", "y", "--outtype", "q4_0"])


def test_package_is_callable_as_convert(tmp_path):
    import ggml_lora.convert as pkg

    out = pkg(ARCH / "qwen3/peft-a", tmp_path / "q.gguf", base=ARCH / "qwen3/hf", out_type="bf16")
    assert out == tmp_path / "q.gguf"
    assert ggml_lora.convert is pkg and callable(ggml_lora.convert)
    with ggml_lora.open(out) as f:
        assert {i.type for i in f.tensors.values()} == {"bf16"}


def test_real_cli_convert_then_patch_equals_llama_cpp_merge(tmp_path):
    """`ggml-lora convert` through the installed entry point, then `ggml-lora patch` with the result: the
    merged q4_0 model is llama-quantize of PEFT's merge, byte for byte."""
    import subprocess
    import sys

    adapter = tmp_path / "adapter.gguf"
    done = subprocess.run([sys.executable, "-m", "ggml_lora", "convert", str(R8 / "adapter"), "--base",
                           str(LLAMA_GQA / "base-q4_0.gguf"), "-o", str(adapter)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "merged.gguf"
    done = subprocess.run([sys.executable, "-m", "ggml_lora", "patch", "-m", str(LLAMA_GQA / "base-q4_0.gguf"),
                           "--lora", str(adapter), "--lora-base", str(LLAMA_GQA / "base-f16.gguf"),
                           "--intermediate", "f16", "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with ggml_lora.open(out) as ours, ggml_lora.open(R8 / "merged-ref-q4_0.gguf") as ref:
        assert list(ours.tensors) == list(ref.tensors)
        for name in ours.tensors:
            assert np.array_equal(ours.raw(name), ref.raw(name)), name
    done = subprocess.run([sys.executable, "-m", "ggml_lora", "convert", str(tmp_path / "missing"), "--base",
                           str(LLAMA_GQA / "base-q4_0.gguf")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "missing" in done.stderr and "Traceback" not in done.stderr


def test_cli_accepts_both_spellings_of_the_out_type() -> None:
    """llama.cpp's ``--outtype`` and this tool's ``--out-type`` set the same option (oracle: argparse's result)."""
    parser = argparse.ArgumentParser()
    add_convert_subcommand(parser.add_subparsers())
    for flag in ("--outtype", "--out-type"):
        args = parser.parse_args(["convert", "peft/", "--base", "m.gguf", flag, "f16"])
        assert args.out_type == "f16"
