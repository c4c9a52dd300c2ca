"""The affine quantization types (a scale AND a min): q4_K, q5_K, q2_K, q4_1, q5_1, byte for byte against ggml's own
C code (``tests/oracles/ggml_quants.py``: ``ggml-quants.c`` compiled ``-O2 -ffp-contract=off``, release asserts).

- quantize without an importance matrix = ``quantize_<type>(…, NULL)`` (``quantize_row_<type>_ref``);
- quantize with one = ``quantize_<type>(…, imatrix)`` (``quantize_row_<type>_impl``);
- dequantize = ``dequantize_row_<type>``, compared as bit patterns (NaN payloads included), both of bytes this
  package wrote and of random bytes (NaN, infinite and subnormal f16 scales included).

Every expected value comes from the C oracle (or, for the refusals, from the documented contract); none from
ggml_lora itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ggml_lora
from oracles import ggml_quants

#: type -> (elements per block, bytes per block, byte offsets of its two f16 fields)
TYPES: dict[str, tuple[int, int, tuple[int, int]]] = {
    "q4_k": (256, 144, (0, 2)),
    "q5_k": (256, 176, (0, 2)),
    "q2_k": (256, 84, (80, 82)),
    "q4_1": (32, 20, (0, 2)),
    "q5_1": (32, 24, (0, 2)),
}
NAMES = list(TYPES)
HYPO = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F32_MAX = float(np.finfo(np.float32).max)

#: f16 bit patterns that are NaN, infinite, subnormal or signed zero.
SPECIAL_HALVES = [0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7D01, 0xFC01, 0x7FFF, 0x0001, 0x83FF, 0x8000, 0x0000, 0x7BFF]


def oracle_quantize(x: np.ndarray, t: str, imatrix: np.ndarray | None = None) -> bytes:
    return ggml_quants.quantize(x, t, imatrix)


def ours_quantize(x: np.ndarray, t: str, imatrix: np.ndarray | None = None) -> bytes:
    q = ggml_lora.quantize(x, t, imatrix=imatrix)
    assert q.dtype == np.uint8 and q.shape == x.shape[:-1] + (x.shape[-1] // TYPES[t][0] * TYPES[t][1],)
    return q.tobytes()


def assert_same_bytes(ours: bytes, ref: bytes, t: str, x: np.ndarray, what: str) -> None:
    if ours == ref:
        return
    bb = TYPES[t][1]
    o = np.frombuffer(ours, np.uint8).reshape(-1, bb)
    r = np.frombuffer(ref, np.uint8).reshape(-1, bb)
    bad = np.flatnonzero(np.any(o != r, axis=1))
    i = int(bad[0])
    xb = x.reshape(-1, TYPES[t][0])[i]
    pytest.fail(f"{t} {what}: {len(bad)} of {len(o)} blocks differ; first block {i}\n ours {o[i].tolist()}\n"
                f" ref  {r[i].tolist()}\n x {xb.tolist()}")


def assert_same_bits(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    a = np.ascontiguousarray(ours, dtype=np.float32).reshape(-1).view(np.uint32)
    b = np.ascontiguousarray(ref, dtype=np.float32).reshape(-1).view(np.uint32)
    assert a.shape == b.shape
    if not np.array_equal(a, b):
        i = int(np.flatnonzero(a != b)[0])
        pytest.fail(f"{what}: {int(np.sum(a != b))} values differ; first at {i}: ours {a[i]:#010x} ref {b[i]:#010x}")


def check_round_trip(x: np.ndarray, t: str, imatrix: np.ndarray | None) -> None:
    """Quantize (with or without weights) equal to C, and dequantize of those bytes equal to C, bit for bit."""
    ref = oracle_quantize(x, t, imatrix)
    ours = ours_quantize(x, t, imatrix)
    assert_same_bytes(ours, ref, t, x, "quantize" + (" with imatrix" if imatrix is not None else ""))
    y_ref = ggml_quants.dequantize(ref, t, x.size)
    y = ggml_lora.dequantize(np.frombuffer(ref, np.uint8).reshape(x.shape[:-1] + (-1,)), t, x.shape)
    assert y.shape == x.shape
    assert_same_bits(y, y_ref, f"{t} dequantize")


# ---------------------------------------------------------------------------------------------------------
# strategies


KINDS = ["normal", "positive", "negative", "zeros", "constant", "one_hot", "sparse", "ties", "subnormal",
         "mixed_blocks", "raw"]


def _finite(x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        x = np.asarray(x, dtype=np.float32)
    return np.where(np.isfinite(x), x, np.float32(0)).astype(np.float32)


@st.composite
def matrices(draw: st.DrawFn, block: int, max_blocks: int = 3) -> np.ndarray:
    """1-3 rows of 1-`max_blocks` blocks of one of many kinds of finite float32 values."""
    rows = draw(st.integers(1, 3))
    n = block * draw(st.integers(1, max_blocks))
    kind = draw(st.sampled_from(KINDS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mag = 10.0 ** draw(st.floats(-45.0, 37.0))
    shape = (rows, n)
    with np.errstate(all="ignore"):
        if kind == "normal":
            x = rng.standard_normal(shape) * mag
        elif kind == "positive":
            x = rng.random(shape) * mag + (mag if draw(st.booleans()) else 0.0)
        elif kind == "negative":
            x = -(rng.random(shape) * mag)
        elif kind == "zeros":
            x = np.where(rng.random(shape) < 0.5, -0.0, 0.0)
        elif kind == "constant":
            x = np.full(shape, draw(st.sampled_from([1.0, -1.0])) * mag)
        elif kind == "one_hot":
            x = np.where(rng.random(shape) < 0.5, -0.0, 0.0)
            x[np.arange(rows), rng.integers(0, n, rows)] = draw(st.sampled_from([1.0, -1.0])) * mag
        elif kind == "sparse":
            x = rng.standard_normal(shape) * mag
            x[rng.random(shape) < draw(st.sampled_from([0.5, 0.9, 0.99]))] = draw(st.sampled_from([0.0, -0.0]))
        elif kind == "ties":
            # integers and halves times a power of two: the rounding (nearest_int ties to even, truncation of
            # `+ 0.5f`) sits exactly on its ties
            e = draw(st.integers(-30, 30))
            x = rng.integers(-32, 33, shape) / 2.0 * 2.0**e
        elif kind == "subnormal":
            bits = rng.integers(0, 1 << 23, shape, dtype=np.uint32) | (rng.integers(0, 2, shape, dtype=np.uint32) << 31)
            x = bits.view(np.float32) * (1e30 if draw(st.booleans()) else 1.0)
        elif kind == "mixed_blocks":
            # every block its own magnitude, from subnormal to near f32's limit
            x = rng.standard_normal(shape).reshape(rows, -1, block)
            x *= 10.0 ** rng.uniform(-45, 37, (rows, x.shape[1], 1))
            x = x.reshape(shape)
        else:
            x = draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32, allow_nan=False,
                                                                      allow_infinity=False)))
    return _finite(x)


@st.composite
def importances(draw: st.DrawFn, n: int) -> np.ndarray:
    """One non-negative finite weight per column: random, near zero, zero, huge, or all equal."""
    kind = draw(st.sampled_from(["uniform", "near_zero", "some_zero", "all_zero", "ones", "huge", "tiny", "raw"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "uniform":
        w = rng.random(n) * 10.0 ** draw(st.floats(-3, 3))
    elif kind == "near_zero":
        w = rng.random(n) ** 8 * 1e-6
    elif kind == "some_zero":
        w = rng.random(n)
        w[rng.random(n) < draw(st.sampled_from([0.3, 0.9]))] = 0.0
    elif kind == "all_zero":
        w = np.zeros(n)
    elif kind == "ones":
        w = np.ones(n)
    elif kind == "huge":
        w = rng.random(n) * 1e30
    elif kind == "tiny":
        w = rng.random(n) * 1e-38
    else:
        w = draw(hnp.arrays(np.float32, (n,), elements=st.floats(0, F32_MAX, width=32)))
    return np.asarray(w, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# bit-exactness against the C oracle


@pytest.mark.parametrize("t", NAMES)
@HYPO
@given(data=st.data())
def test_quantize_matches_c(t: str, data: st.DataObject) -> None:
    x = data.draw(matrices(TYPES[t][0]))
    check_round_trip(x, t, None)


@pytest.mark.parametrize("t", NAMES)
@HYPO
@given(data=st.data())
def test_quantize_with_imatrix_matches_c(t: str, data: st.DataObject) -> None:
    x = data.draw(matrices(TYPES[t][0]))
    w = data.draw(importances(x.shape[-1]))
    check_round_trip(x, t, w)


@pytest.mark.parametrize("t", NAMES)
@HYPO
@given(seed=st.integers(0, 2**32 - 1), blocks=st.integers(1, 40), specials=st.floats(0.0, 1.0))
def test_dequantize_random_bytes_matches_c(t: str, seed: int, blocks: int, specials: float) -> None:
    block, bb, (o1, o2) = TYPES[t]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (blocks, bb), dtype=np.uint8)
    for o in (o1, o2):
        pick = rng.random(blocks) < specials
        halves = np.array(SPECIAL_HALVES, dtype=np.uint16)[rng.integers(0, len(SPECIAL_HALVES), blocks)]
        raw[pick, o] = (halves[pick] & 0xFF).astype(np.uint8)
        raw[pick, o + 1] = (halves[pick] >> 8).astype(np.uint8)
    ref = ggml_quants.dequantize(raw.tobytes(), t, blocks * block)
    assert_same_bits(ggml_lora.dequantize(raw.reshape(1, -1), t, (1, blocks * block)), ref, f"{t} dequantize")


@pytest.mark.parametrize("t", NAMES)
def test_signed_zeros_and_constants(t: str) -> None:
    """All-zero blocks with -0.0 anywhere (the sign of the first zero decides q4_1/q5_1's min), constant blocks of
    either sign and many magnitudes, and one-hot blocks at every position."""
    block = TYPES[t][0]
    rows = [np.zeros(block), np.full(block, -0.0)]
    for first in (0, 1, block // 2, block - 1):
        r = np.zeros(block)
        r[first] = -0.0
        rows.append(r)
        r = np.full(block, -0.0)
        r[first] = 0.0
        rows.append(r)
    for c in (1.0, -1.0, 0.5, 3.0, 1e-30, -1e-30, 1e-40, 1e30, -1e30, F32_MAX, -F32_MAX, 2.0**-149):
        rows.append(np.full(block, c))
    for pos in range(0, block, max(1, block // 32)):
        r = np.zeros(block)
        r[pos] = (-1.0) ** pos * (pos + 1)
        rows.append(r)
    x = np.array(rows, dtype=np.float32)
    for w in (None, np.ones(block, np.float32), np.zeros(block, np.float32)):
        check_round_trip(x, t, w)


@pytest.mark.parametrize("t", NAMES)
def test_larger_random_matrices(t: str) -> None:
    """A weight-like matrix (rows with their own scale, a few outliers) with and without an importance matrix, on
    the default thread pool."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((48, 2048)).astype(np.float32) * rng.uniform(0.001, 0.1, (48, 1)).astype(np.float32)
    x[rng.random(x.shape) < 0.001] *= 50
    w = (rng.random(2048) ** 4).astype(np.float32)
    w[::97] = 0
    for imatrix in (None, w):
        check_round_trip(x, t, imatrix)


# ---------------------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("t", NAMES)
def test_row_length_not_a_multiple_of_the_block_is_refused(t: str) -> None:
    block = TYPES[t][0]
    for n in (block // 2, block + 16, 3 * block - 1):
        with pytest.raises(ValueError):
            ggml_lora.quantize(np.zeros((2, n), np.float32), t)
        with pytest.raises(ValueError):
            ggml_lora.quantize(np.zeros((2, n), np.float32), t, imatrix=np.ones(n, np.float32))


@pytest.mark.parametrize("t", NAMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("weighted", [False, True])
def test_non_finite_values_are_refused(t: str, bad: float, weighted: bool) -> None:
    block = TYPES[t][0]
    x = np.random.default_rng(3).standard_normal((3, 2 * block)).astype(np.float32)
    x[2, block + 5] = bad
    with pytest.raises(ValueError, match="non-finite"):
        ggml_lora.quantize(x, t, imatrix=np.ones(2 * block, np.float32) if weighted else None)


@pytest.mark.parametrize("t", NAMES)
def test_invalid_importance_weights_are_refused(t: str) -> None:
    block = TYPES[t][0]
    x = np.ones((2, block), np.float32)
    for w in (np.ones(block + 1), np.full(block, -1.0), np.full(block, np.nan), np.full(block, np.inf)):
        with pytest.raises(ValueError):
            ggml_lora.quantize(x, t, imatrix=w.astype(np.float32))


def test_every_affine_type_is_registered_with_an_imatrix_quantizer() -> None:
    for t in NAMES:
        info = ggml_lora.type_info(t)
        assert info.can_quantize and info.can_dequantize, t
        assert (info.block_size, info.type_size) == TYPES[t][:2]
