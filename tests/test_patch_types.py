"""Patching models in their own per-tensor types: k-quant mixtures, ``tensor_types``, importance matrices and
``keep_lora``.

Oracles, none of which calls ggml_lora:
- ggml's own C quantizers (``tests/oracles/ggml_quants.py``: ``ggml-quants.c`` compiled alone, the code
  llama-quantize runs) for the expected bytes of every requantized tensor;
- llama.cpp's ``llama-export-lora`` outputs in the fixtures (``export-f16.gguf``: the f16 merge from the f16 base;
  ``export-from-q4_0.gguf``: the f16 merge from the q4_0 model), read with gguf-py, as the merged values that
  ``llama-quantize`` would then quantize;
- numpy float64 for the quality metrics, with the adapter read by gguf-py (``tests/_helpers.py``).
The k-quant mixture model itself is written here with gguf-py from the C oracle's bytes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from _helpers import adapter_deltas, reader_f32
from conftest import fixture_path, skip_module_without_fixtures
from oracles import ggml_quants

import ggml_lora

skip_module_without_fixtures()

GQA = "llama-gqa"
ADAPTER = (GQA, "lora-r8", "ref-adapter-f32.gguf")


def raw_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    """``{name: (type name, raw bytes)}`` as gguf-py reads them."""
    return {t.name: (t.tensor_type.name.lower(), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def mixture_type(name: str, shape: tuple[int, ...]) -> str:
    """A Q4_K_M-like choice: q6_K for the output and for attn_v / ffn_down of layer 0, q4_K for other matrices,
    f32 for vectors."""
    if len(shape) < 2:
        return "f32"
    if name == "output.weight" or name in ("blk.0.attn_v.weight", "blk.0.ffn_down.weight"):
        return "q6_k"
    return "q4_k"


def write_model(path: Path, source: Path, choose, imatrix: dict[str, np.ndarray] | None = None) -> Path:
    """A copy of ``source`` (metadata and tensor order) whose tensors are quantized by ggml's C code to
    ``choose(name, numpy shape)``."""
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(path, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    values = reader_f32(source)
    for t in reader.tensors:
        x = values[t.name]
        ty = choose(t.name, x.shape)
        if ty == "f32":
            writer.add_tensor(t.name, x.astype(np.float32))
            continue
        w = None if imatrix is None else imatrix.get(t.name)
        raw = np.frombuffer(ggml_quants.quantize(x.reshape(-1, x.shape[-1]), ty, imatrix=w), dtype=np.uint8)
        qtype = gguf.GGMLQuantizationType[ty.upper()]
        writer.add_tensor(t.name, raw.reshape(x.shape[0] if x.ndim > 1 else 1, -1), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def kmix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama-gqa quantized as a q4_K/q6_K mixture by ggml's C code (every row length is a multiple of 256)."""
    return write_model(tmp_path_factory.mktemp("kmix") / "model-q4_k_m.gguf", fixture_path(GQA, "base-f16.gguf"),
                       mixture_type)


def expected_requant(merged: dict[str, np.ndarray], types: dict[str, str], names, imatrix=None) -> dict[str, bytes]:
    """What llama-quantize writes for each named tensor of a merged model (f32 values of its f16 tensors)."""
    out = {}
    for name in names:
        x = merged[name]
        w = None if imatrix is None else imatrix.get(name)
        out[name] = ggml_quants.quantize(x.reshape(-1, x.shape[-1]), types[name], imatrix=w)
    return out


def assert_pipeline_identical(out: Path, model: Path, export: Path, imatrix=None) -> list[str]:
    """Every patched tensor of ``out`` equals ggml's quantization of llama.cpp's f16 merge (``export``) to the
    model's type for it; every other tensor is the model's bytes. Returns the patched names."""
    ours, mine, merged = raw_tensors(out), raw_tensors(model), reader_f32(export)
    targets = list(adapter_deltas(fixture_path(*ADAPTER)))
    types = {name: ty for name, (ty, _) in mine.items()}
    want = expected_requant(merged, types, targets, imatrix)
    for name, (ty, data) in ours.items():
        assert ty == types[name], name
        if name in targets:
            assert data == want[name], f"{name} ({ty}) differs from llama-quantize of llama.cpp's merge"
        else:
            assert data == mine[name][1], f"{name} was not copied byte for byte"
    return targets


def test_kquant_mixture_with_f16_base_reproduces_export_lora_then_llama_quantize(kmix: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    result = ggml_lora.patch(kmix, fixture_path(*ADAPTER), base=fixture_path(GQA, "base-f16.gguf"), out=out,
                             intermediate="f16")
    targets = assert_pipeline_identical(out, kmix, fixture_path("llama-gqa", "lora-r8", "export-f16.gguf"))
    # A mixture stays a mixture: both k-quant types were patched, each in its own type.
    patched_types = {t.out_type for t in result.tensors}
    assert patched_types == {"q4_k", "q6_k"}, patched_types
    assert {t.name for t in result.tensors} == set(targets)


def test_quantized_model_without_base_reproduces_export_lora_then_requantize(tmp_path: Path) -> None:
    """llama-export-lora on the q4_0 model (no base) writes f16 merges; llama-quantize --allow-requantize then
    quantizes them to q4_0: our f16-intermediate patch of the q4_0 model gives those bytes."""
    model = fixture_path(GQA, "base-q4_0.gguf")
    out = tmp_path / "out.gguf"
    lora = fixture_path("llama-gqa", "lora-qv-r4", "ref-adapter-f32.gguf")
    ggml_lora.patch(model, lora, out=out, intermediate="f16")
    ours, mine = raw_tensors(out), raw_tensors(model)
    merged = reader_f32(fixture_path("llama-gqa", "lora-qv-r4", "export-from-q4_0.gguf"))
    targets = list(adapter_deltas(lora))
    want = expected_requant(merged, {n: "q4_0" for n in targets}, targets)
    for name in targets:
        assert ours[name] == ("q4_0", want[name]), name
    assert all(ours[n] == mine[n] for n in mine if n not in targets)


def test_tensor_types_override_per_tensor_before_out_type(tmp_path: Path) -> None:
    model = fixture_path(GQA, "base-q4_0.gguf")
    out = tmp_path / "out.gguf"
    result = ggml_lora.patch(model, fixture_path(*ADAPTER), base=fixture_path(GQA, "base-f16.gguf"), out=out,
                             intermediate="f16", out_type="q8_0",
                             tensor_types={r"ATTN_V": "q6_k", r"blk\.1\.attn_q": "f16"})
    types = {t.name: t.out_type for t in result.tensors}
    for name, ty in types.items():
        want = "q6_k" if "attn_v" in name else "f16" if name == "blk.1.attn_q.weight" else "q8_0"
        assert ty == want, (name, ty)
    merged = reader_f32(fixture_path("llama-gqa", "lora-r8", "export-f16.gguf"))
    ours = raw_tensors(out)
    for name, ty in types.items():
        if ty == "f16":
            assert ours[name][1] == merged[name].astype(np.float16).tobytes()
        else:
            assert ours[name] == (ty, expected_requant(merged, types, [name])[name]), name


def test_imatrix_quantizes_patched_tensors_as_llama_quantize_imatrix(kmix: Path, tmp_path: Path) -> None:
    """With an importance matrix, every patched tensor equals ggml's quantize_<type> with those weights (the
    _impl quantizers), for q4_K, q6_K and (second model) q4_0."""
    rng = np.random.default_rng(7)
    shapes = {name: x.shape for name, x in reader_f32(fixture_path(GQA, "base-f16.gguf")).items()}
    weights = {name: (rng.random(s[-1]) ** 3).astype(np.float32) for name, s in shapes.items() if len(s) == 2}
    for model in (kmix, fixture_path(GQA, "base-q4_0.gguf")):
        out = tmp_path / f"out-{model.stem}.gguf"
        result = ggml_lora.patch(model, fixture_path(*ADAPTER), base=fixture_path(GQA, "base-f16.gguf"), out=out,
                                 intermediate="f16", imatrix=weights)
        assert all(t.used_imatrix for t in result.tensors)
        assert_pipeline_identical(out, model, fixture_path("llama-gqa", "lora-r8", "export-f16.gguf"), weights)


def test_imatrix_without_an_entry_for_some_patched_tensors_says_so(tmp_path: Path) -> None:
    shapes = reader_f32(fixture_path(GQA, "base-f16.gguf"))
    weights = {"blk.0.attn_q.weight": np.ones(shapes["blk.0.attn_q.weight"].shape[-1], np.float32)}
    result = ggml_lora.patch(fixture_path(GQA, "base-q4_0.gguf"), fixture_path(*ADAPTER), out=tmp_path / "o.gguf",
                             imatrix=weights)
    used = {t.name for t in result.tensors if t.used_imatrix}
    assert used == {"blk.0.attn_q.weight"}
    note = [n for n in result.notes if n.kind == "imatrix_missing_entries"]
    assert note and "blk.1.attn_v.weight" in note[0].tensors and "blk.0.attn_q.weight" not in note[0].tensors
    assert "has no entry for" in result.summary() and "blk.1.attn_v.weight" in result.summary()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tensor_types": {"attn_(": "q8_0"}}, r'"attn_\(" is not a valid regular expression'),
        ({"tensor_types": {"attn": "q9_9"}}, "q9_9"),
        ({"keep_lora": 1.5}, "between 0 and 1"),
        ({"imatrix": {"not.a.tensor": np.ones(256, np.float32)}}, "none of its 1 entries names a tensor"),
        ({"imatrix": {"blk.0.attn_q.weight": np.ones(100, np.float32)}}, "has 100 weights, expected 256"),
    ],
)
def test_bad_type_options_are_refused_before_writing(tmp_path: Path, kwargs: dict, match: str) -> None:
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match=match):
        ggml_lora.patch(fixture_path(GQA, "base-q4_0.gguf"), fixture_path(*ADAPTER), out=out, **kwargs)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def retained_f64(model: np.ndarray, out: np.ndarray, delta: np.ndarray) -> float:
    """⟨Q − W_model, ΔW⟩ / ‖ΔW‖² in float64."""
    d = delta.astype(np.float64)
    return float(np.sum((out.astype(np.float64) - model) * d) / np.sum(d * d))


def test_keep_lora_moves_tensors_that_would_lose_the_change_to_a_larger_type(tmp_path: Path) -> None:
    """A naive q4_0 patch loses most of a small LoRA; keep_lora=0.6 writes such tensors in q5_0 or q8_0 (or f16)
    instead. The decision and the reported figures are checked against ggml's quantizers and float64."""
    model = fixture_path(GQA, "base-q4_0.gguf")
    out = tmp_path / "out.gguf"
    result = ggml_lora.patch(model, fixture_path(*ADAPTER), out=out, keep_lora=0.6)
    w_model = reader_f32(model)
    ours = reader_f32(out)
    deltas = adapter_deltas(fixture_path(*ADAPTER))
    family = ["q4_0", "q5_0", "q8_0", "f16"]
    assert result.promoted, "no tensor was promoted: the fixture no longer tests anything"
    for t in result.tensors:
        w, delta = w_model[t.name].astype(np.float64), deltas[t.name]
        merged = (w + delta).astype(np.float32)
        # What each type of the family would retain, with ggml's C quantizers.
        retained_by_type = {}
        for ty in family[:-1]:
            q = ggml_quants.dequantize(ggml_quants.quantize(merged, ty), ty, merged.size).reshape(merged.shape)
            retained_by_type[ty] = retained_f64(w, q, delta)
        retained_by_type["f16"] = retained_f64(w, merged.astype(np.float16), delta)
        want = next((ty for ty in family if retained_by_type[ty] >= 0.6), "f16")
        assert t.out_type == want, (t.name, retained_by_type)
        assert t.retained == pytest.approx(retained_f64(w, ours[t.name], delta), rel=1e-4, abs=1e-4)
        if want == "q4_0":
            assert t.promoted_from is None and t.extra_bytes == 0
        else:
            assert t.promoted_from == "q4_0"
            assert t.retained_before_promotion == pytest.approx(retained_by_type["q4_0"], rel=1e-3, abs=1e-3)
            n = w.size
            size = {"q5_0": n // 32 * 22, "q8_0": n // 32 * 34, "f16": n * 2}[want]
            assert t.extra_bytes == size - n // 32 * 18
    cost = sum(t.extra_bytes for t in result.promoted)
    assert f"{len(result.promoted)} tensor(s) in a larger type (+{cost / 2**20:.2f} MiB)" in result.summary()


def test_cli_takes_tensor_type_keep_lora_and_shows_type_counts(kmix: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    done = subprocess.run(
        [sys.executable, "-m", "ggml_lora", "patch", "-m", str(kmix), "--lora", str(fixture_path(*ADAPTER)),
         "--tensor-type", "attn_q=q8_0", "--tensor-type", "ffn_up=q5_k", "-o", str(out), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    types = {name: ty for name, (ty, _) in raw_tensors(out).items()}
    assert types["blk.0.attn_q.weight"] == "q8_0" and types["blk.1.ffn_up.weight"] == "q5_k"
    assert types["blk.0.attn_v.weight"] == "q6_k" and types["blk.1.attn_k.weight"] == "q4_k"
    kept = subprocess.run(
        [sys.executable, "-m", "ggml_lora", "patch", "-m", str(fixture_path(GQA, "base-q4_0.gguf")), "--lora",
         str(fixture_path(*ADAPTER)), "--keep-lora", "0.6", "-o", str(tmp_path / "kept.gguf"), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert kept.returncode == 0 and "in a larger type" in kept.stdout, kept.stdout + kept.stderr
    bad = subprocess.run([sys.executable, "-m", "ggml_lora", "patch", "-m", str(kmix), "--lora",
                          str(fixture_path(*ADAPTER)), "--tensor-type", "attn_q", "-o", str(tmp_path / "x.gguf")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "PATTERN=TYPE" in bad.stderr
    info = subprocess.run([sys.executable, "-m", "ggml_lora", "info", str(kmix)], capture_output=True, text=True,
                          timeout=300)
    counts = {ty: sum(1 for n, (t, _) in raw_tensors(kmix).items() if t == ty) for ty in ("q4_k", "q6_k", "f32")}
    assert f"tensor types: {counts['q4_k']} q4_k, {counts['f32']} f32, {counts['q6_k']} q6_k" in info.stdout
