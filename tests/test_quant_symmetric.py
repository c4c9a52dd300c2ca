"""The symmetric (scale-only) quantization types against ggml's own C code: q6_K, q5_0, q3_K, and q4_0 with an
importance matrix. Bytes of quantize (with and without an importance matrix) and bits of dequantize must equal
the oracle's (``tests/oracles/ggml_quants.py``: ``ggml-quants.c`` compiled ``-O2 -ffp-contract=off``).

Most properties use the oracle's ``release`` build (``-DNDEBUG``, as llama-quantize is built): identical
arithmetic, but values whose squares overflow make ggml's search produce NaN sums, and the debug build's
``nearest_int`` assertion would abort the whole test process on them, while the release build (and ggml_lora)
simply computes on. ``test_release_and_debug_oracles_agree`` checks the two builds agree where the debug one runs.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ggml_lora
from oracles import ggml_quants

#: The types of this family ggml_lora quantizes, and those whose ggml quantizer takes an importance matrix.
TYPES = ["q6_k", "q5_0", "q3_k"]
WEIGHTED = ["q6_k", "q5_0", "q4_0", "q3_k"]
#: Byte offset of the f16 super-block/block scale ``d`` inside each type's block.
D_OFFSET = {"q6_k": 208, "q5_0": 0, "q3_k": 108, "q4_0": 0}

HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def block(t: str) -> int:
    return ggml_lora.GGML_QUANT_SIZES[t][0]


def check(x: np.ndarray, t: str, imatrix: np.ndarray | None = None, *, release: bool = True) -> None:
    """ggml_lora's bytes equal the oracle's; on failure, names the first differing block."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    ours = ggml_lora.quantize(x, t, imatrix=imatrix).tobytes()
    theirs = ggml_quants.quantize(x, t, imatrix=imatrix, release=release)
    if ours != theirs:
        size = ggml_lora.GGML_QUANT_SIZES[t][1]
        first = next(i for i in range(0, len(ours), size) if ours[i:i + size] != theirs[i:i + size]) // size
        values = x.reshape(-1)[first * block(t):(first + 1) * block(t)]
        raise AssertionError(f"{t}: block {first} differs (imatrix: {imatrix is not None})\n"
                             f"values {values.tolist()}\nours   {ours[first * size:(first + 1) * size].hex()}\n"
                             f"theirs {theirs[first * size:(first + 1) * size].hex()}")
    y_ours = ggml_lora.dequantize(np.frombuffer(ours, np.uint8), t, x.shape).reshape(-1)
    y_theirs = ggml_quants.dequantize(theirs, t, x.size)
    assert np.array_equal(y_ours.view(np.uint32), y_theirs.view(np.uint32)), f"{t}: dequantize of its own bytes"


# ---------------------------------------------------------------------------------------------------------
# inputs

SCALES = [1e-30, 1e-20, 1e-8, 1e-3, 0.02, 1.0, 37.0, 1e4, 1e6, 1e8, 1e12, 1e20, 1e30]


def make_rows(seed: int, kind: str, scale: float, n_rows: int, n_blocks: int, t: str) -> np.ndarray:
    """Rows of one of many shapes (kind) at a magnitude (scale)."""
    rng = np.random.default_rng(seed)
    shape = (n_rows, n_blocks * block(t))
    n = shape[0] * shape[1]
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "ties":  # halves and integers: values landing on rounding ties of the codes
        x = rng.integers(-64, 65, n) / 2.0
    elif kind == "sparse":
        x = rng.standard_normal(n) * (rng.random(n) < 0.05)
    elif kind == "one_hot":
        x = np.zeros(n)
        x[rng.integers(0, n, max(1, n // 512))] = rng.choice([-1.0, 1.0, 0.3])
    elif kind == "constant":
        x = np.full(n, rng.choice([-1.0, 0.75, 3.0]))
    elif kind == "zeros":
        x = np.where(rng.random(n) < 0.5, -0.0, 0.0)
    elif kind == "mixed_groups":  # every 16 values at their own magnitude, 1e-6 .. 1e6
        x = rng.standard_normal(n) * np.repeat(10.0 ** rng.integers(-6, 7, n // 16), 16)
    elif kind == "subnormal":
        bits = rng.integers(1, 2**23, n, dtype=np.uint32) | (rng.integers(0, 2, n, dtype=np.uint32) << 31)
        x = bits.view(np.float32).astype(np.float64)
        scale = 1.0
    else:
        raise AssertionError(kind)
    with np.errstate(over="ignore"):
        return (x * scale).astype(np.float32).reshape(shape)


KINDS = ["normal", "ties", "sparse", "one_hot", "constant", "zeros", "mixed_groups", "subnormal"]


@st.composite
def row_sets(draw: st.DrawFn, t: str) -> np.ndarray:
    x = make_rows(draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from(KINDS)), draw(st.sampled_from(SCALES)),
                  draw(st.integers(1, 3)), draw(st.integers(1, 3)), t)
    # Values beyond f32 become inf: keep them finite (non-finite input is tested for its error).
    return np.where(np.isfinite(x), x, np.float32(3e38))


@st.composite
def weights(draw: st.DrawFn, n: int) -> np.ndarray:
    """Importance weights: random magnitudes with zeros, near-zero and large ones."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = rng.random(n) ** 2 * draw(st.sampled_from([1e-3, 1.0, 50.0, 1e4]))
    special = rng.random(n)
    w[special < 0.1] = 0.0
    w[(special >= 0.1) & (special < 0.15)] = 1e-30
    w[(special >= 0.15) & (special < 0.2)] = 1e-12
    if draw(st.booleans()):
        w[:] = draw(st.sampled_from([0.0, 1.0, 1e-20]))
    return w.astype(np.float32)


@st.composite
def arbitrary_block(draw: st.DrawFn, t: str) -> np.ndarray:
    """One block of any finite float32 values: a fill value and up to 40 others at drawn places."""
    finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
    x = np.full((1, block(t)), draw(finite), dtype=np.float32)
    for i, v in draw(st.lists(st.tuples(st.integers(0, block(t) - 1), finite), max_size=40)):
        x[0, i] = v
    return x


def edge_rows(t: str) -> np.ndarray:
    n = 2 * block(t)
    rows = [np.zeros(n), np.full(n, -0.0), np.full(n, 1.0), np.full(n, -2.5), np.full(n, 1e-30), np.full(n, 1e30), np.full(n, 2.6e16),
            np.full(n, 1e-45), np.full(n, 3.4e38), np.arange(n) - n / 2, (np.arange(n) - n / 2) / 2,
            np.eye(1, n, 7)[0], -np.eye(1, n, n - 1)[0] * 1e-20, np.tile([1e30, 0.0, -1e30, 1.0], n // 4)]
    return np.array(rows, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# quantize: properties against the oracle


@pytest.mark.parametrize("t", TYPES)
@HYPO
@given(data=st.data())
def test_quantize_matches_ggml(t: str, data: st.DataObject) -> None:
    check(data.draw(row_sets(t)), t)


@pytest.mark.parametrize("t", WEIGHTED)
@HYPO
@given(data=st.data())
def test_quantize_with_imatrix_matches_ggml(t: str, data: st.DataObject) -> None:
    x = data.draw(row_sets(t))
    check(x, t, data.draw(weights(x.shape[-1])))


@pytest.mark.parametrize("t", TYPES)
@HYPO
@given(data=st.data())
def test_quantize_of_arbitrary_floats_matches_ggml(t: str, data: st.DataObject) -> None:
    """Any finite float32 values: a fill value and up to 40 others at drawn places (hypothesis favours the
    boundaries: 0, -0, subnormals, the largest floats, ties)."""
    check(data.draw(arbitrary_block(t)), t)


@pytest.mark.parametrize("t", WEIGHTED)
@HYPO
@given(data=st.data())
def test_quantize_of_arbitrary_floats_with_imatrix_matches_ggml(t: str, data: st.DataObject) -> None:
    x = data.draw(arbitrary_block(t))
    check(x, t, data.draw(weights(x.shape[-1])))


@pytest.mark.parametrize("t", TYPES)
def test_edge_rows_match_ggml(t: str) -> None:
    """Zeros, -0.0, constants, tiny (1e-30, the smallest subnormal) and huge (1e30, 3.4e38) rows, ramps of
    integers and halves (ties), one-hot rows, huge values mixed with ordinary ones."""
    check(edge_rows(t), t)


@pytest.mark.parametrize("t", WEIGHTED)
def test_edge_rows_with_imatrix_match_ggml(t: str) -> None:
    x = edge_rows(t)
    n = x.shape[1]
    # 1e4 with the 2.6e16 row: q3_K's group scales overflow to infinity and its scale search meets them.
    for w in (np.ones(n), np.zeros(n), np.linspace(0, 2, n), np.full(n, 1e-30), np.full(n, 1e4), np.full(n, 3e38)):
        check(x, t, w.astype(np.float32))


@pytest.mark.parametrize("t", sorted(set(TYPES) | set(WEIGHTED)))
def test_large_matrix_matches_ggml(t: str) -> None:
    """A realistic weight matrix (many rows, split across threads), with and without importance weights."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((96, 2048)) * rng.choice([1e-3, 0.02, 1.0], size=(96, 1))).astype(np.float32)
    x[5, :300] = 0.0
    x[9] = np.round(x[9] * 8) / 8
    check(x, t)
    if t in WEIGHTED:
        w = (rng.random(2048) ** 3 * 10).astype(np.float32)
        w[::17] = 0.0
        check(x, t, w)


@pytest.mark.parametrize("t", sorted(set(TYPES) | set(WEIGHTED)))
def test_release_and_debug_oracles_agree(t: str) -> None:
    """The -DNDEBUG oracle build computes what the debug build computes (on inputs the debug build accepts)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 4 * block(t))) * 10.0 ** rng.integers(-8, 8, (8, 1))).astype(np.float32)
    assert ggml_quants.quantize(x, t, release=True) == ggml_quants.quantize(x, t)
    if t in WEIGHTED:
        w = rng.random(x.shape[1]).astype(np.float32)
        assert ggml_quants.quantize(x, t, w, release=True) == ggml_quants.quantize(x, t, w)
    check(x, t, release=False)


# ---------------------------------------------------------------------------------------------------------
# dequantize of arbitrary bytes


@pytest.mark.parametrize("t", TYPES)
@HYPO
@given(seed=st.integers(0, 2**32 - 1), n_blocks=st.integers(1, 8),
       special=st.sampled_from([None, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE55, 0x0001, 0x8000, 0x7BFF]))
def test_dequantize_random_bytes_matches_ggml(t: str, seed: int, n_blocks: int, special: int | None) -> None:
    """Random blocks, with a NaN (payloads included), infinite, subnormal or largest f16 scale in some blocks:
    the same float32 bits as ggml's dequantize."""
    size = ggml_lora.GGML_QUANT_SIZES[t][1]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, n_blocks * size, dtype=np.uint8)
    if special is not None:
        for b in range(0, n_blocks, 2):
            raw[b * size + D_OFFSET[t]:b * size + D_OFFSET[t] + 2] = np.frombuffer(np.uint16(special).tobytes(),
                                                                                 np.uint8)
    ours = ggml_lora.dequantize(raw, t, (n_blocks * block(t),))
    theirs = ggml_quants.dequantize(raw, t, n_blocks * block(t))
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


# ---------------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("t", TYPES)
def test_row_length_must_be_a_block_multiple(t: str) -> None:
    for n in (block(t) // 2, block(t) + 16, 3 * block(t) - 1):
        with pytest.raises(ValueError, match="multiple"):
            ggml_lora.quantize(np.zeros((2, n), np.float32), t)
        with pytest.raises(ValueError, match="multiple"):
            ggml_lora.dequantize(np.zeros(64, np.uint8), t, (n,))


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(t: str, bad: float) -> None:
    x = np.ones((3, 2 * block(t)), np.float32)
    x[2, block(t) + 3] = bad
    with pytest.raises(ValueError):
        ggml_lora.quantize(x, t)
    if t in WEIGHTED:
        with pytest.raises(ValueError):
            ggml_lora.quantize(x, t, imatrix=np.ones(x.shape[1], np.float32))


@pytest.mark.parametrize("t", WEIGHTED)
def test_bad_importance_weights_are_refused(t: str) -> None:
    x = np.ones((2, block(t)), np.float32)
    for w in (np.ones(block(t) - 1), np.full(block(t), -1.0), np.full(block(t), np.nan), np.full(block(t), np.inf)):
        with pytest.raises(ValueError):
            ggml_lora.quantize(x, t, imatrix=w.astype(np.float32))
