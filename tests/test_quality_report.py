"""The quality report of ``ggml_lora.patch``: every metric of every patched tensor against a float64
recomputation from the input files and the OUTPUT file.

Oracle: gguf-py (``GGUFReader`` + ``gguf.quants.dequantize``) reads W_src (the base, or the model), W_model and
Q = the patched tensor of the output file; ΔW = Σ s·(B @ A) is numpy float64 from the adapter files read the
same way (llama.cpp's scale alpha/rank). Nothing here calls ggml_lora's own readers or helpers. The definitions
(README "Quality report", ``TensorQuality``):

- ``relative_change`` = ‖ΔW‖ / ‖W_src‖
- ``retained`` = ⟨Q − W_model, ΔW⟩ / ‖ΔW‖²
- ``cosine`` = cos(Q − W_src, ΔW)
- ``error_ratio`` = ‖Q − W_src − ΔW‖ / ‖ΔW‖

Tolerance: the engine accumulates its sums in f32 lanes (8 lanes per row, ``cols/8`` terms each), then in f64
across lanes and rows, from its own f32 ΔW. :func:`engine_bounds` turns that into a rigorous interval per sum:
the standard bound γ_n·Σ|term| of recursive f32 summation (γ_n = n·u/(1 − n·u), u = 2^-24), plus, per element,
how far the engine's f32 ΔW can be from the float64 one (γ_{rank+terms+2}·Σ|s|·(|B| @ |A|)) and the f32
rounding of the differences and products, propagated to first order (second-order terms included). Each
metric is then bounded by interval arithmetic over its sums. On these fixtures the intervals are 1e-5 to 3e-5
wide relative (error_ratio of an f16 output, whose numerator is a small difference of large numbers: 2e-4)
while the engine's values land within ~1e-7 of the float64 ones: tight enough that any wrong definition,
swapped field or wrong sum shows, and honest because the bounds are derived, not tuned to pass.

Known answers on the fixtures: patching the f16 model keeps ~100% of the change; patching the q4_0 model
naively keeps little of it (the change is smaller than q4_0's step), and the f16 base brings it back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _helpers import adapter_factors, reader_f32

import ggml_lora

from conftest import FIXTURES, skip_module_without_fixtures

skip_module_without_fixtures()
LLAMA = FIXTURES / "llama-gqa"
BASE_F16 = LLAMA / "base-f16.gguf"
Q4_0 = LLAMA / "base-q4_0.gguf"
Q8_0 = LLAMA / "base-q8_0.gguf"
ADAPTER_R8 = LLAMA / "lora-r8" / "ref-adapter-f32.gguf"
ADAPTER_QV = LLAMA / "lora-qv-r4" / "ref-adapter-f32.gguf"

U = 2.0**-24  # unit roundoff of f32
METRICS = ("relative_change", "retained", "cosine", "error_ratio")


def gamma(n: int) -> float:
    """γ_n of Higham's error analysis: |fl(Σ n+1 terms) − Σ| <= γ_n · Σ|terms| in recursive f32 summation."""
    return n * U / (1 - n * U)


@dataclass
class Interval:
    lo: float
    hi: float

    def __contains__(self, x: float) -> bool:
        return self.lo <= x <= self.hi


def _quotient(num: tuple[float, float], den: tuple[float, float]) -> tuple[float, float]:
    """[num] / [den] with den > 0."""
    assert den[0] > 0, den
    corners = [n / d for n in num for d in den]
    return min(corners), max(corners)


def _sqrt(x: tuple[float, float]) -> tuple[float, float]:
    return math.sqrt(max(x[0], 0.0)), math.sqrt(max(x[1], 0.0))


def _widen(x: tuple[float, float]) -> Interval:
    """The final f64 operations of the engine (a few ulps)."""
    return Interval(x[0] - 1e-14 * abs(x[0]) - 1e-300, x[1] + 1e-14 * abs(x[1]) + 1e-300)


def engine_bounds(w_src: np.ndarray, w_model: np.ndarray, q: np.ndarray,
                  terms: list[tuple[float, np.ndarray, np.ndarray]]) -> dict[str, Interval]:
    """Float64 values of the four metrics, each as the interval the engine's f32-lane result must lie in.

    ``terms``: the adapters' (s, left, right) for this tensor (ΔW = Σ s · left @ right), float64."""
    w = w_src.astype(np.float64)
    m = w_model.astype(np.float64)
    q = q.astype(np.float64)
    d = sum(s * (left @ right) for s, left, right in terms)
    rank = max(left.shape[1] for _, left, _ in terms)
    # how far the engine's f32 ΔW may be from d, per element
    delta = gamma(rank + len(terms) + 2) * sum(abs(s) * (np.abs(left) @ np.abs(right)) for s, left, right in terms)
    a = q - w          # applied change
    e = a - d          # requantization error
    v = q - m          # change compared with the model
    de = U * np.abs(a) + delta + U * (np.abs(e) + U * np.abs(a) + delta)  # |f32 error - e|
    # (value of each term, first-order perturbation of each term by the f32 elementwise steps and ΔW)
    sums = {
        "delta_sq": (d * d, 2 * np.abs(d) * delta + delta * delta),
        "src_sq": (w * w, 0.0 * w),
        "applied_dot_delta": (a * d, np.abs(a) * (delta + U * (np.abs(d) + delta))),
        "applied_sq": (a * a, 2 * U * a * a + U * U * a * a),
        "error_sq": (e * e, 2 * np.abs(e) * de + de * de),
        "vs_model_dot_delta": (v * d, np.abs(v) * (delta + U * (np.abs(d) + delta))),
    }
    lanes = -(-w.shape[-1] // 8)  # terms per f32 lane in one row
    iv: dict[str, tuple[float, float]] = {}
    for key, (t, p) in sums.items():
        value = float(t.sum())
        # products rounded once (u), then summed in lanes; the perturbed terms bounded by |t| + p
        err = float(p.sum()) + gamma(lanes + 1) * float((np.abs(t) + p).sum())
        iv[key] = (value - err, value + err)
    D, W, C, P, E, V = (iv[k] for k in sums)
    return {
        "relative_change": _widen(_sqrt(_quotient(D, W))),
        "retained": _widen(_quotient(V, D)),
        "cosine": _widen(_quotient(C, _sqrt((D[0] * P[0], D[1] * P[1])))),
        "error_ratio": _widen(_sqrt(_quotient(E, D))),
    }


def check_report(result: ggml_lora.PatchResult, model: Path, adapters: list[tuple[Path, float]],
                 base: Path | None = None) -> dict[str, dict[str, float]]:
    """Every metric of every row of ``result`` inside its float64 interval; returns the metrics by tensor."""
    src = reader_f32(base if base is not None else model)
    own = reader_f32(model)
    out = reader_f32(result.out)
    factors = [adapter_factors(path, scale) for path, scale in adapters]
    targets = set().union(*factors)
    assert {t.name for t in result.tensors} == targets
    seen = {}
    for row in result.tensors:
        terms = [f[row.name] for f in factors if row.name in f]
        assert row.n_adapters == len(terms)
        assert row.from_base == (base is not None)
        want = engine_bounds(src[row.name], own[row.name], out[row.name], terms)
        for metric in METRICS:
            got = getattr(row, metric)
            iv = want[metric]
            assert got in iv, f"{row.name}.{metric} = {got!r}, float64 recomputation allows [{iv.lo!r}, {iv.hi!r}]"
            # the interval stays narrow, so the check is a real one (the 1e-5 floor is for error_ratio of f32
            # outputs, ~1e-6: there the f32 rounding of W' is all the error there is)
            assert iv.hi - iv.lo <= 1e-3 * abs(got) + 1e-5, (row.name, metric, iv)
        seen[row.name] = {metric: getattr(row, metric) for metric in METRICS}
    return seen


# ---------------------------------------------------------------------------------------------------------
# every metric, on inputs whose answer is known


def test_f16_model_keeps_the_whole_change(tmp_path: Path) -> None:
    """An f16 model patched in f16: Q − W differs from ΔW only by one f16 rounding of W', far below ΔW."""
    result = ggml_lora.patch(BASE_F16, ADAPTER_R8, out=tmp_path / "f16.gguf")
    rows = check_report(result, BASE_F16, [(ADAPTER_R8, 1.0)])
    for name, m in rows.items():
        assert 0.99 < m["retained"] < 1.01, (name, m)
        assert m["cosine"] > 0.99 and m["error_ratio"] < 0.1, (name, m)
        assert 0.01 < m["relative_change"] < 0.1, (name, m)  # MANIFEST: ‖s·B@A‖ is 2-5% of ‖W‖
    assert not result.lost and not result.suggestions


def test_naive_q4_0_patch_loses_most_of_the_change(tmp_path: Path) -> None:
    """The q4_0 model patched without a base: ΔW is mostly below q4_0's step, so requantizing rounds most of
    it away (retained well under half; the error is larger than the change)."""
    result = ggml_lora.patch(Q4_0, ADAPTER_R8, out=tmp_path / "naive.gguf")
    rows = check_report(result, Q4_0, [(ADAPTER_R8, 1.0)])
    for name, m in rows.items():
        assert m["retained"] < 0.5 and m["error_ratio"] > 0.8, (name, m)
    assert result.lost == result.tensors


def test_q4_0_from_the_f16_base_keeps_the_change(tmp_path: Path) -> None:
    """With the f16 base, W_src (base) and W_model (q4_0) differ: retained compares with the model the user
    had, cosine and error_ratio with the base. The change comes back on average, noisily (q4_0 noise)."""
    result = ggml_lora.patch(Q4_0, ADAPTER_R8, base=BASE_F16, out=tmp_path / "based.gguf")
    rows = check_report(result, Q4_0, [(ADAPTER_R8, 1.0)], base=BASE_F16)
    retained = np.array([m["retained"] for m in rows.values()])
    assert 0.9 < np.median(retained) < 1.1 and retained.min() > 0.5, retained
    assert not result.lost


@pytest.mark.parametrize("model, out_type, intermediate", [
    (Q8_0, None, None),
    (Q4_0, "q8_0", None),
    (Q4_0, None, "f16"),
    (BASE_F16, "f32", None),
])
def test_other_output_types(tmp_path: Path, model: Path, out_type: str | None, intermediate: str | None) -> None:
    result = ggml_lora.patch(model, ADAPTER_R8, base=BASE_F16, out=tmp_path / "out.gguf", out_type=out_type,
                             intermediate=intermediate)
    check_report(result, model, [(ADAPTER_R8, 1.0)], base=BASE_F16)


def test_two_adapters_with_their_scales(tmp_path: Path) -> None:
    adapters = [(ADAPTER_R8, 0.5), (ADAPTER_QV, -2.0)]
    result = ggml_lora.patch(BASE_F16, adapters, out=tmp_path / "two.gguf")
    check_report(result, BASE_F16, adapters)


# ---------------------------------------------------------------------------------------------------------
# the suggestions printed when the change is lost (oracle: the wording documented in the README and patch.py)

BASE_TIP = "--lora-base model-f16.gguf"
OUT_TYPE_TIP = "(out_type='q8_0'; CLI: --out-type q8_0)"


def test_naive_q4_0_patch_suggests_a_base_and_out_type_q8_0(tmp_path: Path) -> None:
    result = ggml_lora.patch(Q4_0, ADAPTER_R8, out=tmp_path / "naive.gguf")
    assert result.lost
    summary = result.summary()
    assert any(BASE_TIP in s for s in result.suggestions) and BASE_TIP in summary
    assert any(OUT_TYPE_TIP in s for s in result.suggestions) and OUT_TYPE_TIP in summary


def test_a_lost_change_in_a_model_quantized_with_an_imatrix_suggests_giving_it(tmp_path: Path) -> None:
    """The engine notes that the model's importance matrix (named in its ``quantize.imatrix.file``) was not
    applied; with the change lost, the suggestions say to give it."""
    with ggml_lora.open(Q4_0) as f:
        metadata = dict(f.fields)
        metadata["quantize.imatrix.file"] = "calib.imatrix"
        tensors = {n: (f.raw(n), i.type, i.shape) for n, i in f.tensors.items()}
    model = ggml_lora.write(tmp_path / "imatrix-q4_0.gguf", metadata, tensors)
    result = ggml_lora.patch(model, ADAPTER_R8, out=tmp_path / "naive.gguf")
    assert result.lost and [n.kind for n in result.notes] == ["model_imatrix_not_applied"]
    assert any("--imatrix" in s for s in result.suggestions) and "CLI: --imatrix FILE" in result.summary()
    plain = ggml_lora.patch(Q4_0, ADAPTER_R8, out=tmp_path / "plain.gguf")
    assert plain.lost and not any("--imatrix" in s for s in plain.suggestions)


def test_lost_change_in_q8_0_suggests_only_a_base(tmp_path: Path) -> None:
    """A q8_0 model is already at the precision the tip suggests: only the base tip applies."""
    result = ggml_lora.patch(Q8_0, [(ADAPTER_R8, 0.02)], out=tmp_path / "tiny.gguf")
    assert result.lost
    assert [s for s in result.suggestions if BASE_TIP in s]
    assert not [s for s in result.suggestions if OUT_TYPE_TIP in s] and OUT_TYPE_TIP not in result.summary()


def test_no_out_type_suggestion_when_the_type_was_chosen(tmp_path: Path) -> None:
    result = ggml_lora.patch(Q4_0, ADAPTER_R8, out=tmp_path / "chosen.gguf", out_type="q4_0")
    assert result.lost
    assert not [s for s in result.suggestions if OUT_TYPE_TIP in s]
    assert [s for s in result.suggestions if BASE_TIP in s]


def test_cli_prints_the_out_type_suggestion(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ggml_lora", "patch", "-m", str(Q4_0), "--lora", str(ADAPTER_R8),
                           "-o", str(tmp_path / "cli.gguf")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("  suggestion: ") and OUT_TYPE_TIP in line for line in lines), done.stdout
    assert any(line.startswith("  suggestion: ") and BASE_TIP in line for line in lines), done.stdout
