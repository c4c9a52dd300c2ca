"""Quantization: bit-exactness with ggml's reference quantizers, dequantization, error bounds, idempotence,
argument checking, the type table, and the real llama-quantize fixtures.

Oracles:
- gguf-py 0.19.0 (``gguf.quants``), llama.cpp's own numpy port of ggml's reference kernels;
- an independent float32 numpy transcription of ggml's C (``quantize_row_q4_0_ref`` / ``quantize_row_q8_0_ref``,
  see docs/FORMATS.md §5), used because gguf-py differs from C on one q4_0 input (see
  ``test_q4_0_zero_block_sign_of_d``);
- the files llama-quantize wrote (../shared/fixtures/llama-gqa).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ggml_lora
from conftest import SKIP_FIXTURE_TESTS, all_gguf_fixtures, fixture_id, fixture_path

GQT = gguf.GGMLQuantizationType
QUANT_TYPES = ["q4_0", "q8_0", "f16", "bf16", "f32"]
#: Types this project dequantizes but does not quantize (tested in test_quant_readonly.py).
READ_ONLY_TYPES = {"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs", "tq1_0",
                   "tq2_0", "mxfp4", "nvfp4", "q1_0", "q2_0"}
#: Types of ggml (llama-cpp-python 0.3.36's ggml.h) newer than gguf-py 0.19.0, which therefore lacks them; their
#: sizes are checked against the C oracle in test_quant_readonly.py.
NEWER_THAN_GGUF_PY = {"q2_0"}
BLOCK_BYTES = {"q4_0": 18, "q8_0": 34}
HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

F32_MAX = float(np.finfo(np.float32).max)
F32 = np.float32


# ---------------------------------------------------------------------------------------------------------
# oracles


def gguf_py_quantize(x: np.ndarray, t: str) -> np.ndarray:
    """gguf-py's bytes for ``x``, as a uint8 array of shape x.shape[:-1] + (bytes per row,)."""
    with np.errstate(all="ignore"):
        out = gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), GQT[t.upper()])
    block, size = ggml_lora.GGML_QUANT_SIZES[t]
    return np.ascontiguousarray(out).view(np.uint8).reshape(x.shape[:-1] + (x.shape[-1] // block * size,))


def gguf_py_dequantize(raw: np.ndarray, t: str, shape: tuple[int, ...]) -> np.ndarray:
    rows = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
    with np.errstate(all="ignore"):
        out = gguf.quants.dequantize(np.ascontiguousarray(rows), GQT[t.upper()])
    return np.asarray(out, dtype=np.float32).reshape(shape)


def _c_int8(t: np.ndarray) -> np.ndarray:
    """C's ``(int8_t)`` of a float on x86-64 (gcc/clang: cvttss2si to int32, then the low byte): in-range values
    truncate toward zero and wrap to 8 bits; NaN and values outside int32 give 0x80000000, whose low byte is 0.
    (Only reachable for blocks whose 1/d overflows; ggml itself leaves it undefined.)"""
    ok = (t >= -(2.0**31)) & (t < 2.0**31)
    i = np.trunc(np.where(ok, t, 0)).astype(np.int64)
    return ((i + 128) % 256) - 128


def _f16_bytes(d: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return d.astype(np.float32).astype(np.float16).view(np.uint8).reshape(-1, 2)


def c_quantize_q4_0(x: np.ndarray) -> np.ndarray:
    """ggml's ``quantize_row_q4_0_ref`` transcribed with float32 numpy operations, each rounded like C (no FMA)."""
    b = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 32)
    a = np.abs(b)
    first_max = np.argmax(a, axis=1)  # first index of the largest magnitude: "if (amax < fabsf(v))"
    amax = a[np.arange(len(b)), first_max]
    mx = np.where(amax > 0, b[np.arange(len(b)), first_max], F32(0.0)).astype(np.float32)  # `float max = 0.0f`
    with np.errstate(all="ignore"):
        d = (mx / F32(-8)).astype(np.float32)
        inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(np.float32)
        t = (b * inv[:, None]).astype(np.float32)
        t = (t + F32(8.5)).astype(np.float32)
    q = np.minimum(15, _c_int8(t)) & 0xFF  # uint8_t xi = MIN(15, (int8_t)(x*id + 8.5f))
    qs = ((q[:, :16] | (q[:, 16:] << 4)) & 0xFF).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), qs], axis=1).reshape(x.shape[:-1] + (-1,))


def c_quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's ``quantize_row_q8_0_ref`` (roundf = round half away from zero, computed exactly in float64)."""
    b = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 32)
    amax = np.abs(b).max(axis=1)
    with np.errstate(all="ignore"):
        d = (amax / F32(127)).astype(np.float32)
        inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(np.float32)
        v = (b * inv[:, None]).astype(np.float32).astype(np.float64)
        r = np.sign(v) * np.floor(np.abs(v) + 0.5)
    q = (_c_int8(r) & 0xFF).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=1).reshape(x.shape[:-1] + (-1,))


C_ORACLES = {"q4_0": c_quantize_q4_0, "q8_0": c_quantize_q8_0}


def q4_0_gguf_py_differs_from_c(x: np.ndarray) -> np.ndarray:
    """Blocks where gguf-py is known to differ from ggml's C (documented in test_q4_0_zero_block_sign_of_d): an
    all-zero block whose first element is -0.0 (gguf-py takes d from that element: -0.0 / -8 = +0.0; C starts
    from ``max = 0.0f`` and gets -0.0)."""
    b = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    return np.all(b == 0, axis=1) & np.signbit(b[:, 0])


def assert_bytes_equal(ours: np.ndarray, ref: np.ndarray, block_bytes: int, what: str, x: np.ndarray) -> None:
    assert ours.dtype == np.uint8
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if not np.array_equal(ours, ref):
        o, r = ours.reshape(-1, block_bytes), ref.reshape(-1, block_bytes)
        bad = np.flatnonzero(np.any(o != r, axis=1))
        i = int(bad[0])
        xb = np.asarray(x, dtype=np.float32).reshape(-1, block_bytes if block_bytes <= 4 else 32)
        pytest.fail(
            f"{what}: {len(bad)} of {len(o)} blocks differ; first: block {i}\n ours {o[i].tolist()}\n ref  "
            f"{r[i].tolist()}\n x    {xb[i].tolist() if i < len(xb) else '?'} (hex {xb[i].view(np.uint32).tolist()})"
        )


def scales(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """The f16 scale of every block, read from the bytes (as float32)."""
    return np.ascontiguousarray(raw.reshape(-1, block_bytes)[:, :2]).view(np.float16).astype(np.float32)[:, 0]


def q8_codes(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw.reshape(-1, 34)[:, 2:]).view(np.int8).astype(np.int64)


def q4_codes(raw: np.ndarray) -> np.ndarray:
    qs = raw.reshape(-1, 18)[:, 2:].astype(np.int64)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # element j: low nibble of byte j; j+16: high nibble


# ---------------------------------------------------------------------------------------------------------
# strategies: blocks of 32 float32 values of many kinds


def _f32(v: float) -> np.float32:
    with np.errstate(over="ignore"):
        return np.float32(v)


def _nudge(v: np.float32, ulps: int) -> np.float32:
    step = np.float32(np.inf) if ulps > 0 else np.float32(-np.inf)
    for _ in range(abs(ulps)):
        v = np.nextafter(v, step, dtype=np.float32)
    return v


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
magnitude = st.floats(min_value=-44.0, max_value=38.4).map(lambda e: min(10.0**e, F32_MAX))
signs = st.sampled_from([1.0, -1.0])


@st.composite
def tie_block_q8(draw: st.DrawFn) -> list[float]:
    """Elements whose x*id lands on (or a few ulps around) k + 0.5, where round-half-away-from-zero matters."""
    if draw(st.booleans()):
        # d = 2^e exactly: x*id is exactly k + 0.5.
        e = draw(st.integers(-20, 20))
        d = F32(2.0**e)
        amax = F32(127) * d
        vals = [float(draw(signs) * (draw(st.integers(0, 126)) + 0.5) * d) for _ in range(31)]
    else:
        amax = _f32(draw(st.floats(1e-30, 1e30)))
        d = F32(amax / F32(127))
        vals = []
        for _ in range(31):
            target = draw(st.integers(0, 126)) + 0.5
            v = _nudge(_f32(target * float(d)), draw(st.integers(-2, 2)))
            vals.append(float(draw(signs) * v))
    pos = draw(st.integers(0, 31))
    vals.insert(pos, float(draw(signs) * amax))
    return vals


@st.composite
def tie_block_q4(draw: st.DrawFn) -> list[float]:
    """Elements whose x*id + 8.5 lands on (or a few ulps around) an integer: where trunc, the f32 rounding of the
    product and of the sum (no FMA) decide the code."""
    mx = _f32(draw(signs) * draw(st.floats(1e-30, 1e30)))
    d = F32(mx / F32(-8))
    vals = [float(mx)]
    for _ in range(31):
        n = draw(st.integers(1, 16))
        v = _nudge(_f32((n - 8.5) * float(d)), draw(st.integers(-3, 3)))
        vals.append(float(v))
    if draw(st.booleans()):  # the maximum anywhere, not only first
        draw(st.randoms()).shuffle(vals)
    return vals


@st.composite
def block(draw: st.DrawFn) -> list[float]:
    kind = draw(
        st.sampled_from(
            ["any", "scaled", "zeros", "negmax", "equal_mag", "q8_ties", "q4_ties", "huge", "subnormal", "mixed",
             "constant", "one_nonzero"]
        )
    )
    if kind == "any":
        return draw(st.lists(finite_f32, min_size=32, max_size=32))
    if kind == "scaled":
        scale = draw(magnitude)
        seed = draw(st.integers(0, 2**32 - 1))
        with np.errstate(over="ignore"):
            return (np.random.default_rng(seed).standard_normal(32) * scale).astype(np.float32).tolist()
    if kind == "zeros":
        return [draw(st.sampled_from([0.0, -0.0])) for _ in range(32)]
    if kind in ("negmax", "equal_mag"):
        vals = draw(st.lists(st.floats(-1.0, 1.0, width=32), min_size=32, max_size=32))
        scale = draw(magnitude)
        vals = [float(_f32(v * scale)) for v in vals]
        a = max(abs(v) for v in vals) * 2 or 1.0
        i = draw(st.integers(0, 31))
        vals[i] = float(-_f32(a))
        if kind == "equal_mag":  # +a and -a both present: the first one wins and keeps its sign
            j = draw(st.integers(0, 31).filter(lambda j: j != i))
            vals[j] = float(_f32(a))
        return vals
    if kind == "q8_ties":
        return draw(tie_block_q8())
    if kind == "q4_ties":
        return draw(tie_block_q4())
    if kind == "huge":  # beyond the f16 range, up to near f32 max
        return [draw(signs) * draw(st.floats(1e5, 3e38)) for _ in range(32)]
    if kind == "subnormal":  # f32 subnormals and tiny normals (1/d overflows for such blocks)
        top = draw(st.integers(1, 26))  # up to 2^-123: 1/d overflows when the block maximum is below ~2^-125
        bits = draw(st.lists(st.integers(0, (1 << top) - 1), min_size=32, max_size=32))
        vals = np.array(bits, dtype=np.uint32).view(np.float32).tolist()
        return [draw(signs) * v for v in vals]
    if kind == "mixed":
        return [draw(signs) * draw(magnitude) for _ in range(32)]
    if kind == "constant":
        v = draw(finite_f32)
        return [v] * 32
    vals = [0.0] * 32
    vals[draw(st.integers(0, 31))] = draw(finite_f32)
    return vals


@st.composite
def block_arrays(draw: st.DrawFn, max_rows: int = 3, max_blocks: int = 4) -> np.ndarray:
    """float32 arrays of shape (rows, 32 * blocks) made of independently chosen blocks."""
    rows = draw(st.integers(1, max_rows))
    nb = draw(st.integers(1, max_blocks))
    vals = [draw(block()) for _ in range(rows * nb)]
    with np.errstate(over="ignore"):
        x = np.array(vals, dtype=np.float32).reshape(rows, nb * 32)
    assume(np.all(np.isfinite(x)))
    return x


@st.composite
def float_rows(draw: st.DrawFn) -> np.ndarray:
    """Arrays for the block-size-1 types: any row length, any finite float32 values, incl. the f16 boundary
    (65504 / 65520), bf16 rounding ties and subnormals of both."""
    shape = draw(st.tuples(st.integers(1, 3), st.integers(1, 70)))
    special = st.sampled_from(
        [0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 6e-8, 3e-8, 2.9802322e-08, 5.96e-8, 1e-45, 1.0000001,
         1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-8 + 2.0**-23, 3.3895314e38, F32_MAX, -F32_MAX, 1e-40]
    )
    elem = st.one_of(finite_f32, special, magnitude.map(float))
    vals = draw(st.lists(elem, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
    with np.errstate(over="ignore"):
        x = np.array(vals, dtype=np.float32).reshape(shape)
    assume(np.all(np.isfinite(x)))
    return x


# ---------------------------------------------------------------------------------------------------------
# bit-exactness on generated arrays


@pytest.mark.parametrize("t", ["q4_0", "q8_0"])
@HYPO
@given(x=block_arrays())
def test_block_quantize_is_bit_exact(t: str, x: np.ndarray) -> None:
    ours = ggml_lora.quantize(x, t)
    assert ours.shape == (x.shape[0], x.shape[1] // 32 * BLOCK_BYTES[t])
    # The C reference, transcribed independently.
    assert_bytes_equal(ours, C_ORACLES[t](x), BLOCK_BYTES[t], f"{t} vs ggml C formula", x)
    # gguf-py, everywhere except the documented q4_0 difference.
    ref = gguf_py_quantize(x, t)
    if t == "q4_0":
        differ = q4_0_gguf_py_differs_from_c(x)
        o, r = ours.reshape(-1, 18).copy(), ref.reshape(-1, 18).copy()
        # there: same codes, d = -0.0 (C, ours) vs +0.0 (gguf-py)
        assert np.all(o[differ, :2] == [0x00, 0x80]) and np.all(r[differ, :2] == 0)
        assert np.array_equal(o[differ, 2:], r[differ, 2:])
        o[differ], r[differ] = 0, 0
        ours, ref = o.reshape(ours.shape), r.reshape(ref.shape)
    assert_bytes_equal(ours, ref, BLOCK_BYTES[t], f"{t} vs gguf-py", x)


@pytest.mark.parametrize("t", ["f16", "bf16", "f32"])
@HYPO
@given(x=float_rows())
def test_float_quantize_is_bit_exact(t: str, x: np.ndarray) -> None:
    ours = ggml_lora.quantize(x, t)
    width = {"f16": 2, "bf16": 2, "f32": 4}[t]
    assert ours.shape == x.shape[:-1] + (x.shape[-1] * width,)
    assert_bytes_equal(ours, gguf_py_quantize(x, t), width, f"{t} vs gguf-py", x)


@pytest.mark.parametrize("t", ["f16", "bf16"])
def test_float_quantize_rounding_edges(t: str) -> None:
    """Hand-picked rounding cases (RNE at ties, overflow to inf, subnormal results) against numpy/gguf-py."""
    x = np.array(
        [65504, 65519, 65520, 1e5, -1e5, 3e38, F32_MAX, 2.0**-25, 2.0**-25 * 1.5, 2.0**-24 * 1.5, 2.0**-26,
         1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 2.0**-149, -2.0**-149, 1.17e-38, 0.0, -0.0,
         3.3961776e38, 3.3895314e38, 1.0],
        dtype=np.float32,
    )
    assert_bytes_equal(ggml_lora.quantize(x, t), gguf_py_quantize(x, t), 2, t, x)
    if t == "f16":
        with np.errstate(over="ignore"):
            assert np.array_equal(ggml_lora.quantize(x, t).view(np.float16), x.astype(np.float16), equal_nan=True)


def test_q4_0_zero_block_sign_of_d() -> None:
    """The one input found where gguf-py 0.19.0 differs from ggml's C ``quantize_row_q4_0_ref``: an all-zero
    block whose first element is -0.0. C starts from ``float max = 0.0f`` and never replaces it (no |v| > 0), so
    d = 0.0f / -8 = -0.0 (f16 0x8000); gguf-py takes max = x[argmax|x|] = x[0] = -0.0, so d = +0.0. The codes agree
    (all 8). Blocks of +0.0 agree (both -0.0); q8_0 agrees (d = amax / 127 = +0.0)."""
    neg = np.full((1, 32), -0.0, dtype=np.float32)
    mixed = np.zeros((1, 32), dtype=np.float32)
    mixed[0, 0] = -0.0
    pos = np.zeros((1, 32), dtype=np.float32)
    for x in (neg, mixed, pos):
        ours = ggml_lora.quantize(x, "q4_0")
        assert ours[0, :2].tolist() == [0x00, 0x80], "C: d = 0.0f / -8 = -0.0"
        assert ours[0, 2:].tolist() == [0x88] * 16
        assert np.array_equal(ours, c_quantize_q4_0(x))
    assert gguf_py_quantize(neg, "q4_0")[0, :2].tolist() == [0, 0]  # the documented gguf-py difference
    assert np.array_equal(gguf_py_quantize(pos, "q4_0"), ggml_lora.quantize(pos, "q4_0"))
    for x in (neg, pos):
        assert np.array_equal(ggml_lora.quantize(x, "q8_0"), gguf_py_quantize(x, "q8_0"))
        assert ggml_lora.quantize(x, "q8_0").tolist() == [[0] * 34]


def test_hand_checked_blocks() -> None:
    """A few blocks whose bytes follow from the C formula by hand (not from any implementation)."""
    # q8_0: amax = 127 -> d = 1.0 (f16 0x3C00), id = 1; roundf rounds halves away from zero.
    x = np.zeros(32, dtype=np.float32)
    x[:6] = [127, 0.5, -0.5, 1.5, -2.5, 0.49999997]
    q = ggml_lora.quantize(x, "q8_0")
    assert q[:2].tolist() == [0x00, 0x3C]
    assert q[2:8].view(np.int8).tolist() == [127, 1, -1, 2, -3, 0]
    # q4_0: max = -8 (first of the largest magnitudes; +8 later does not replace it) -> d = 1.0, id = 1.
    x = np.zeros(32, dtype=np.float32)
    x[0], x[1], x[2], x[3], x[16], x[17] = -8, 8, -0.5, 0.49, 7.5, -0.51
    q = ggml_lora.quantize(x, "q4_0")
    assert q[:2].tolist() == [0x00, 0x3C]
    codes = q4_codes(q)[0]
    # trunc(x + 8.5): -8 -> 0, 8 -> min(15, 16) = 15, -0.5 -> 8, 0.49 -> 8, 7.5 -> 15 (16 clamped), -0.51 -> 7
    assert [codes[0], codes[1], codes[2], codes[3], codes[16], codes[17]] == [0, 15, 8, 8, 15, 7]
    # Beyond the f16 range the scale is inf in f16 but the codes come from the f32 d.
    x = np.zeros(32, dtype=np.float32)
    x[0] = 127 * 2.0**100  # d = 2^100 exactly (beyond f16), id = 2^-100
    x[1] = 63.5 * 2.0**100
    q = ggml_lora.quantize(x, "q8_0")
    assert q[:2].tolist() == [0x00, 0x7C]  # f16 +inf
    assert q[2:4].view(np.int8).tolist() == [127, 64]  # roundf(63.5) = 64


@pytest.mark.parametrize("t", ["q4_0", "q8_0"])
@pytest.mark.parametrize("mx", [1e-45, -1e-45, 2.0**-140, -(2.0**-126), 2.0**-125 * 0.99, 2.0**-123, 1e-38])
def test_tiny_blocks_where_1_over_d_overflows(t: str, mx: float) -> None:
    """Blocks whose scale is so small that id = 1/d overflows to inf: x*id is ±inf or NaN (0*inf), and C's
    (int8_t) of that is undefined; x86 (and gguf-py on x86) give 0. Ours must agree with both."""
    x = np.zeros((3, 32), dtype=np.float32)
    x[0, 5] = mx
    x[1, :] = np.float32(mx) * np.linspace(-1, 1, 32, dtype=np.float32)
    x[2, ::3] = -np.float32(mx)
    ours = ggml_lora.quantize(x, t)
    assert_bytes_equal(ours, C_ORACLES[t](x), BLOCK_BYTES[t], t, x)
    assert_bytes_equal(ours, gguf_py_quantize(x, t), BLOCK_BYTES[t], t, x)


# ---------------------------------------------------------------------------------------------------------
# dequantization


SPECIAL_F16 = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE00, 0x0001, 0x8001, 0x03FF, 0x0400, 0x7BFF,
               0xFBFF, 0x3C00]


@pytest.mark.parametrize("t", ["q4_0", "q8_0"])
@HYPO
@given(data=st.data())
def test_block_dequantize_matches_gguf_py(t: str, data: st.DataObject) -> None:
    rows = data.draw(st.integers(1, 3))
    nb = data.draw(st.integers(1, 4))
    bb = BLOCK_BYTES[t]
    raw = np.frombuffer(data.draw(st.binary(min_size=rows * nb * bb, max_size=rows * nb * bb)), dtype=np.uint8)
    raw = raw.copy().reshape(rows * nb, bb)
    for i in range(rows * nb):  # special scales: ±0, ±inf, NaNs, subnormals, max
        if data.draw(st.booleans()):
            raw[i, :2] = np.array([data.draw(st.sampled_from(SPECIAL_F16))], dtype="<u2").view(np.uint8)
    raw = raw.reshape(rows, nb * bb)
    shape = (rows, nb * 32)
    ours = ggml_lora.dequantize(raw, t, shape)
    ref = gguf_py_dequantize(raw, t, shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    keep = ~np.isnan(ref)
    # Bitwise, so -0.0 vs +0.0 and ±inf count.
    assert np.array_equal(ours.view(np.uint32)[keep], ref.view(np.uint32)[keep])


@pytest.mark.parametrize("t", ["f16", "bf16", "f32"])
@HYPO
@given(data=st.data())
def test_float_dequantize_matches_gguf_py(t: str, data: st.DataObject) -> None:
    width = {"f16": 2, "bf16": 2, "f32": 4}[t]
    shape = data.draw(st.tuples(st.integers(1, 3), st.integers(1, 40)))
    n = shape[0] * shape[1] * width
    raw = np.frombuffer(data.draw(st.binary(min_size=n, max_size=n)), dtype=np.uint8).copy()
    if width == 2:  # make sure NaN, inf, subnormal and zero patterns show up
        words = raw.view("<u2")
        for i in range(len(words)):
            if data.draw(st.integers(0, 3)) == 0:
                words[i] = data.draw(st.sampled_from(SPECIAL_F16 + [0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x0080, 0x007F]))
    raw = raw.reshape(shape[0], shape[1] * width)
    ours = ggml_lora.dequantize(raw, t, shape)
    ref = gguf_py_dequantize(raw, t, shape)
    assert np.array_equal(ours, ref, equal_nan=True)
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    keep = ~np.isnan(ref)
    assert np.array_equal(ours.view(np.uint32)[keep], ref.view(np.uint32)[keep])
    if t in ("bf16", "f32"):  # exact widening: even NaN payloads survive
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_dequantize_accepts_shapes_and_dtypes() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    for t in QUANT_TYPES:
        q = ggml_lora.quantize(x, t)
        y = ggml_lora.dequantize(q, t, x.shape)
        assert y.shape == x.shape and y.dtype == np.float32
        # flat bytes, a list shape, bytes objects all work the same
        assert np.array_equal(ggml_lora.dequantize(q.reshape(-1), t, list(x.shape)), y)
        assert np.array_equal(ggml_lora.dequantize(np.frombuffer(q.tobytes(), np.uint8), t, x.shape), y)
    # f16 data given as a float16 array is taken as its bytes
    h = x.astype(np.float16)
    assert np.array_equal(ggml_lora.dequantize(h, "f16", x.shape), h.astype(np.float32))


# ---------------------------------------------------------------------------------------------------------
# error bounds and idempotence


@pytest.mark.parametrize("t", ["q4_0", "q8_0"])
@HYPO
@given(x=block_arrays())
def test_block_error_bound(t: str, x: np.ndarray) -> None:
    """Per element, with q the code read from the bytes and d32 = the f32 scale ggml computes (amax/127 for q8_0,
    max/-8 for q4_0):

    1. |x - q*d32| <= |d32| * (1/2 + 1e-5), except q4_0's clamped top code (x*id in [7.5, 8]) where it is |d32|*(1
       + 1e-5). This is the issue's "<= d/2 with its exact d" (1e-5 covers the f32 rounding of x*id).
    2. The dequantized value uses the stored f16 scale d16: |x - q*d16| <= bound 1 + |q| * |d32 - d16|. The plain
       "<= d16/2" does NOT hold: d16 is rounded, and the rounding is multiplied by |q| (up to 127): in a sample of
       random blocks 0.7% of elements exceed d16/2, by up to 10% (0.55 d16); for f16-subnormal d16 far more.

    Checked where d16 is finite and 1/d32 does not overflow (|d32| >= 2^-126, an f32 normal)."""
    raw = ggml_lora.quantize(x, t)
    y = ggml_lora.dequantize(raw, t, x.shape).reshape(-1, 32).astype(np.float64)
    b = x.reshape(-1, 32).astype(np.float64)
    bb = BLOCK_BYTES[t]
    d16 = scales(raw, bb).astype(np.float64)
    if t == "q8_0":
        d32 = (np.abs(x.reshape(-1, 32)).max(axis=1) / F32(127)).astype(np.float32).astype(np.float64)
        q = q8_codes(raw)
        slack = np.full(b.shape, 0.5 + 1e-5)
    else:
        xb = x.reshape(-1, 32)
        first = np.argmax(np.abs(xb), axis=1)
        d32 = (xb[np.arange(len(xb)), first] / F32(-8)).astype(np.float32).astype(np.float64)
        codes = q4_codes(raw)
        q = codes - 8
        slack = np.where(codes == 15, 1.0 + 1e-5, 0.5 + 1e-5)
        # Only the clamped code may err by more than half a step.
        with np.errstate(all="ignore"):
            assert np.all((codes < 15) | (b / d32[:, None] >= 6.5 - 1e-4) | (np.abs(d32) < 2.0**-126)[:, None])
    ok = np.isfinite(d16) & (np.abs(d32) >= 2.0**-126)
    b, y, q, slack, d32, d16 = b[ok], y[ok], q[ok], slack[ok], d32[ok], d16[ok]
    ad32 = np.abs(d32)[:, None]
    err_exact = np.abs(b - q * d32[:, None])
    assert np.all(err_exact <= ad32 * slack), "bound 1 violated"
    err = np.abs(b - y)
    bound = ad32 * slack + np.abs(q) * np.abs(d32 - d16)[:, None]
    assert np.all(err <= bound * (1 + 2.0**-20)), "bound 2 violated"
    # all-zero blocks come back as zeros
    zero = np.all(b == 0, axis=1)
    assert np.all(y[zero] == 0)


def test_q8_0_d16_over_2_is_not_a_bound() -> None:
    """Why bound 2 above needs the |q|*|d32-d16| term: amax = 127 * 1.0004 gives d32 = 1.0004, stored as d16 = 1.0
    (f16 spacing at 1 is 2^-10). x = 100.49 * d32 gets q = 100 and dequantizes to 100 * d16 = 100.0: an error of
    0.53 > d16/2 although d16 is a normal f16 (ggml dequantizes with the stored d16, as gguf-py does)."""
    x = np.zeros(32, dtype=np.float32)
    x[0] = F32(127.0) * F32(1.0004)
    x[1] = F32(100.49) * F32(1.0004)
    raw = ggml_lora.quantize(x, "q8_0")
    assert float(scales(raw, 34)[0]) == 1.0
    assert q8_codes(raw)[0, :2].tolist() == [127, 100]
    y = ggml_lora.dequantize(raw, "q8_0", (32,))
    assert y[:2].tolist() == [127.0, 100.0]
    assert abs(float(x[1]) - float(y[1])) > 0.5
    assert np.array_equal(y, gguf_py_dequantize(raw, "q8_0", (32,)))


@pytest.mark.parametrize("t", ["f16", "bf16"])
@HYPO
@given(x=float_rows())
def test_float_idempotence(t: str, x: np.ndarray) -> None:
    """quantize(dequantize(quantize(x))) == quantize(x) whenever the rounded values are finite (values beyond
    the f16/bf16 range round to inf, which quantize refuses)."""
    y = ggml_lora.dequantize(ggml_lora.quantize(x, t), t, x.shape)
    x = np.where(np.isfinite(y), x, np.float32(0))  # drop the values that round to inf
    q = ggml_lora.quantize(x, t)
    y = ggml_lora.dequantize(q, t, x.shape)
    assert np.all(np.isfinite(y))
    assert np.array_equal(ggml_lora.quantize(y, t), q)
    # f32 is the identity, bit for bit
    assert np.array_equal(ggml_lora.dequantize(ggml_lora.quantize(x, "f32"), "f32", x.shape).view(np.uint32),
                          x.view(np.uint32))


@pytest.mark.parametrize("t", ["q4_0", "q8_0"])
@HYPO
@given(x=block_arrays())
def test_block_idempotence(t: str, x: np.ndarray) -> None:
    """Requantizing a dequantized block gives the same bytes, under this condition per block: the stored f16 scale
    d16 is finite and non-zero (or, for q8_0, every code is 0).

    Why it holds: the element of largest magnitude always gets the extreme code (q8_0: ±127; q4_0: 0, i.e. -8),
    so the dequantized block's extreme is 127*d16 (resp. -8*d16), exact in f32; its new f32 scale is d16 itself,
    already an f16, and x*id = q*(1 ± 2^-23) rounds back to q.
    Why the condition is needed: when amax/127 (max/-8) is below the f16 range, d16 = 0 and the block dequantizes
    to zeros whatever its codes (the codes came from the f32 scale); when it is above, d16 = inf and the block
    dequantizes to ±inf/NaN, which quantize refuses. (ggml behaves the same: it is the format, not this code.)"""
    q = ggml_lora.quantize(x, t)
    bb = BLOCK_BYTES[t]
    d16 = scales(q, bb)
    codes = q8_codes(q) if t == "q8_0" else q4_codes(q)
    ok = np.isfinite(d16) & ((d16 != 0) | (np.all(codes == 0, axis=1) if t == "q8_0" else False))
    with np.errstate(all="ignore"):
        y = ggml_lora.dequantize(q, t, x.shape).reshape(-1, 32)
    y = np.where(ok[:, None], y, 0).astype(np.float32).reshape(x.shape)
    q2 = ggml_lora.quantize(y, t)
    assert np.array_equal(q2.reshape(-1, bb)[ok], q.reshape(-1, bb)[ok])


def test_idempotence_condition_is_needed() -> None:
    """The counterexamples behind the condition above, against gguf-py: a block whose scale underflows f16."""
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, :2] = [1e-7, -5e-8]  # q8_0: d32 = 7.9e-10, d16 = 0; q4_0: d32 = -1.25e-8, d16 = -0
    for t in ("q8_0", "q4_0"):
        q = ggml_lora.quantize(x, t)
        assert np.array_equal(q, gguf_py_quantize(x, t))
        assert scales(q, BLOCK_BYTES[t])[0] == 0
        y = ggml_lora.dequantize(q, t, x.shape)
        assert np.all(y == 0)
        assert not np.array_equal(ggml_lora.quantize(y, t), q)


# ---------------------------------------------------------------------------------------------------------
# arguments, shapes, errors


@pytest.mark.parametrize("t", QUANT_TYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, float.fromhex("0x1.8p+128")])
def test_non_finite_input_is_refused(t: str, bad: float) -> None:
    x = np.ones((2, 64), dtype=np.float64)
    x[1, 40] = bad  # (the last one is finite in float64 but inf once converted to float32)
    with pytest.raises(ValueError, match="non-finite"):
        ggml_lora.quantize(x, t)


@pytest.mark.parametrize("t", ["q4_0", "q8_0"])
@pytest.mark.parametrize("n", [1, 16, 31, 33, 48, 100])
def test_row_length_must_be_a_block_multiple(t: str, n: int) -> None:
    with pytest.raises(ValueError, match="block size") as err:
        ggml_lora.quantize(np.zeros((2, n), dtype=np.float32), t)
    assert str(n) in str(err.value) and "32" in str(err.value)
    with pytest.raises(ValueError, match="block size"):
        ggml_lora.dequantize(np.zeros(BLOCK_BYTES[t], dtype=np.uint8), t, (n,))


@pytest.mark.parametrize("name", ["q9_0", "", "float32", "Q4", "q4_0 ", "fp16"])
def test_unknown_type_names(name: str) -> None:
    with pytest.raises(ValueError, match="unknown ggml type"):
        ggml_lora.quantize(np.zeros(32, dtype=np.float32), name)
    with pytest.raises(ValueError, match="unknown ggml type"):
        ggml_lora.dequantize(np.zeros(34, dtype=np.uint8), name, (32,))


@pytest.mark.parametrize("bad", [True, None, 4, 99, 2.0, object()])
def test_unknown_type_values(bad: object) -> None:
    with pytest.raises(ValueError):
        ggml_lora.quantize(np.zeros(32, dtype=np.float32), bad)


@pytest.mark.parametrize("t", ["q8_1", "q8_k", "i32"])
def test_types_without_kernels_are_refused(t: str) -> None:
    block = ggml_lora.GGML_QUANT_SIZES[t][0]
    with pytest.raises(ValueError, match="not supported"):
        ggml_lora.quantize(np.zeros(block, dtype=np.float32), t)
    with pytest.raises(ValueError, match="not supported"):
        ggml_lora.dequantize(np.zeros(ggml_lora.GGML_QUANT_SIZES[t][1], dtype=np.uint8), t, (block,))


def test_type_spellings() -> None:
    """A type can be named in any case, by id, or by gguf-py's enum member."""
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    ref = ggml_lora.quantize(x, "q8_0")
    for spelling in ("Q8_0", 8, GQT.Q8_0, ggml_lora.type_info("q8_0")):
        assert np.array_equal(ggml_lora.quantize(x, spelling), ref)
    assert np.array_equal(ggml_lora.dequantize(ref, GQT.Q8_0, x.shape), ggml_lora.dequantize(ref, "q8_0", x.shape))


@pytest.mark.parametrize("t", QUANT_TYPES)
@pytest.mark.parametrize("shape", [(64,), (2, 3, 64), (1, 1, 1, 32), (5, 0, 32), (0, 64)])
def test_output_shapes(t: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    block, size = ggml_lora.GGML_QUANT_SIZES[t]
    q = ggml_lora.quantize(x, t)
    assert q.dtype == np.uint8
    assert q.shape == shape[:-1] + (shape[-1] // block * size,)
    # same bytes as quantizing the rows of a 2-D view
    assert np.array_equal(q.reshape(-1, q.shape[-1]), gguf_py_quantize(x.reshape(-1, shape[-1]), t))
    y = ggml_lora.dequantize(q, t, shape)
    assert y.shape == shape and y.dtype == np.float32


def test_zero_dimensional_input_is_refused() -> None:
    for t in QUANT_TYPES:
        with pytest.raises(ValueError, match="0-dimensional"):
            ggml_lora.quantize(np.float32(1.0), t)
        with pytest.raises(ValueError, match="0-dimensional"):
            ggml_lora.quantize(np.array(2.0), t)


@pytest.mark.parametrize("t", QUANT_TYPES)
def test_float64_and_non_contiguous_inputs(t: str) -> None:
    rng = np.random.default_rng(2)
    x64 = rng.standard_normal((6, 128)) * 3
    x32 = x64.astype(np.float32)
    ref = gguf_py_quantize(x32, t)
    assert np.array_equal(ggml_lora.quantize(x64, t), ref)  # converted to float32 first, like ggml's callers
    assert np.array_equal(ggml_lora.quantize(x32.tolist(), t), ref)  # plain lists
    big = rng.standard_normal((12, 256)).astype(np.float32)
    for view in (big[::2, ::2], big.T[:64].T[:, :128], np.asfortranarray(big), big[:, 64:192], big[::-1]):
        assert not view.flags.c_contiguous or view is big[:, 64:192]
        assert np.array_equal(ggml_lora.quantize(view, t), gguf_py_quantize(np.ascontiguousarray(view), t))
    # a non-contiguous uint8 view as dequantize input
    q = ggml_lora.quantize(big, t)
    wide = np.zeros((q.shape[0], q.shape[1] * 2), dtype=np.uint8)
    wide[:, ::2] = q
    assert np.array_equal(ggml_lora.dequantize(wide[:, ::2], t, big.shape), ggml_lora.dequantize(q, t, big.shape))


@pytest.mark.parametrize("t", QUANT_TYPES)
def test_dequantize_wrong_byte_count(t: str) -> None:
    block, size = ggml_lora.GGML_QUANT_SIZES[t]
    shape = (3, block * 2)
    n = 3 * 2 * size
    for wrong in (n - 1, n + 1, n - size, 0):
        with pytest.raises(ValueError, match=f"{n} bytes"):
            ggml_lora.dequantize(np.zeros(wrong, dtype=np.uint8), t, shape)
    for bad_shape in ((), (-1, block), (3, -block)):
        with pytest.raises(ValueError):
            ggml_lora.dequantize(np.zeros(n, dtype=np.uint8), t, bad_shape)


def test_inputs_are_not_modified_and_outputs_are_fresh() -> None:
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    before = x.copy()
    q = ggml_lora.quantize(x, "q4_0")
    y = ggml_lora.dequantize(q, "q4_0", x.shape)
    assert np.array_equal(x, before)
    assert q.flags.writeable and y.flags.writeable and q.flags.c_contiguous and y.flags.c_contiguous
    assert not np.shares_memory(q, x) and not np.shares_memory(y, q)


# ---------------------------------------------------------------------------------------------------------
# the type table


def test_type_table_agrees_with_gguf_py() -> None:
    """Every type both tables know has the same id, block size and bytes per block; ours knows no type gguf-py
    does not, except those newer than gguf-py 0.19.0."""
    theirs = {t.name.lower(): t for t in GQT}
    for name, info in ggml_lora.GGML_TYPES.items():
        if name in NEWER_THAN_GGUF_PY:
            assert name not in theirs, f"gguf-py now knows {name}: drop it from NEWER_THAN_GGUF_PY"
            continue
        assert name in theirs, f"{name} is not a gguf-py type"
        member = theirs[name]
        assert info.id == member.value
        assert (info.block_size, info.type_size) == gguf.GGML_QUANT_SIZES[member] == ggml_lora.GGML_QUANT_SIZES[name]
        assert ggml_lora.type_info(member.value) == info == ggml_lora.type_info(member) == ggml_lora.type_info(
            member.name)
    # exactly the types this project (de)quantizes: these five, the affine family (test_quant_affine.py), the
    # symmetric family (test_quant_symmetric.py) and the read-only types (test_quant_readonly.py)
    families = {"q4_1", "q5_1", "q2_k", "q4_k", "q5_k"} | {"q6_k", "q5_0", "q3_k"}
    writable = {n for n, t in ggml_lora.GGML_TYPES.items() if t.can_quantize}
    assert writable == set(QUANT_TYPES) | families
    assert {n for n, t in ggml_lora.GGML_TYPES.items() if t.can_dequantize} == writable | READ_ONLY_TYPES


def test_type_table_knows_every_gguf_py_type() -> None:
    """The issue: know the block size and bytes per block of every ggml type llama.cpp defines today, so files
    holding any type can be read and copied. gguf-py 0.19.0 (the version llama.cpp's converters ship) defines
    every type listed here."""
    theirs = {t.name.lower(): v for t, v in gguf.GGML_QUANT_SIZES.items()}
    missing = {n: (GQT[n.upper()].value, v) for n, v in theirs.items() if n not in ggml_lora.GGML_QUANT_SIZES}
    assert not missing, f"ggml types unknown to ggml_lora (name: (id, (block size, bytes))): {missing}"
    assert {n: v for n, v in ggml_lora.GGML_QUANT_SIZES.items() if n not in NEWER_THAN_GGUF_PY} == theirs


# ---------------------------------------------------------------------------------------------------------
# threads: rows are split across threads, results must not depend on the split


@pytest.mark.parametrize("t", QUANT_TYPES)
def test_parallel_split_does_not_change_results(t: str) -> None:
    rng = np.random.default_rng(5)
    rows, cols = 1024, 1024
    x = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-8, 8, (rows, 1)))).astype(np.float32)
    big = ggml_lora.quantize(x, t)
    one_by_one = np.stack([ggml_lora.quantize(x[i], t) for i in range(rows)])
    assert np.array_equal(big, one_by_one)
    assert np.array_equal(big[:7], gguf_py_quantize(x[:7], t))
    assert np.array_equal(ggml_lora.quantize(x.reshape(-1)[: 32 * 4099].reshape(1, -1), t).reshape(-1),
                          big.reshape(-1)[: 4099 * ggml_lora.GGML_QUANT_SIZES[t][1] * 32 // ggml_lora.GGML_QUANT_SIZES[t][0]])
    y = ggml_lora.dequantize(big, t, x.shape)
    assert np.array_equal(y, np.stack([ggml_lora.dequantize(big[i], t, (cols,)) for i in range(rows)]))
    # one long row and many short rows give the same bytes (rows are independent)
    assert np.array_equal(ggml_lora.quantize(x.reshape(-1, 32), t).reshape(-1), big.reshape(-1))


def test_non_finite_error_reports_the_first_bad_element_even_in_parallel() -> None:
    x = np.zeros((512, 256), dtype=np.float32)
    x[300, 5] = np.nan
    x[17, 100] = np.inf
    with pytest.raises(ValueError, match="non-finite") as err:
        ggml_lora.quantize(x, "q8_0")
    assert str(17 * 256 + 100) in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# the real files made by llama-quantize


def _quantized_fixture_pairs() -> list[tuple[Path, Path]]:
    if SKIP_FIXTURE_TESTS:
        return [(fixture_path("absent.gguf"), fixture_path("absent.gguf"))]  # one skipped test shows
    gqa = fixture_path("llama-gqa")
    pairs = [(fixture_path("llama-gqa", f), fixture_path("llama-gqa", "base-f16.gguf"))
             for f in ("base-q4_0.gguf", "base-q8_0.gguf", "base-q4_0-mixed.gguf")]
    merged = sorted(gqa.glob("lora-*/merged-ref-q*.gguf"))
    if len(merged) < 3:
        raise FileNotFoundError(f"expected lora-*/merged-ref-q*.gguf fixtures under {gqa}, found {merged}")
    pairs += [(m, m.parent / "merged-ref-f16.gguf") for m in merged]
    return pairs


QUANTIZED_FIXTURES = _quantized_fixture_pairs()


@pytest.mark.fixtures
@pytest.mark.parametrize("path,source", QUANTIZED_FIXTURES, ids=[fixture_id(p) for p, _ in QUANTIZED_FIXTURES])
def test_fixture_blocks_are_reproduced_bit_exactly(path: Path, source: Path) -> None:
    """quantize(f32(f16 source of t)) == the bytes llama-quantize wrote, for every q4_0/q8_0 tensor."""
    src = {t.name: t for t in gguf.GGUFReader(source).tensors}
    n_tensors = n_blocks = 0
    with ggml_lora.open(path) as f:
        for name, info in f.tensors.items():
            if info.type not in ("q4_0", "q8_0"):
                continue
            s = src[name]
            assert s.tensor_type == GQT.F16
            x = np.asarray(s.data).astype(np.float32).reshape(info.shape)
            ours = ggml_lora.quantize(x, info.type)
            raw = f.raw(name).reshape(ours.shape)
            assert_bytes_equal(ours, raw, BLOCK_BYTES[info.type], f"{path.name}:{name}", x)
            n_tensors += 1
            n_blocks += raw.size // BLOCK_BYTES[info.type]
    assert n_tensors > 0
    expectations = json.loads(fixture_path("expectations.json").read_text())
    counts = expectations["llama-gqa"]["gguf_py_quantize_byte_identical_to_llama_quantize"]
    key = {"base-q4_0.gguf": "q4_0", "base-q8_0.gguf": "q8_0", "base-q4_0-mixed.gguf": "q4_0-mixed"}.get(path.name)
    if key is not None and path.parent.name == "llama-gqa":
        assert (n_tensors, n_blocks) == (counts[key]["tensors"], counts[key]["blocks"])


ALL_FIXTURE_FILES = all_gguf_fixtures()


@pytest.mark.fixtures
@pytest.mark.parametrize("path", ALL_FIXTURE_FILES, ids=[fixture_id(p) for p in ALL_FIXTURE_FILES])
def test_fixture_to_numpy_matches_gguf_py(path: Path) -> None:
    """Every tensor of every fixture: to_numpy == gguf-py's dequantize of gguf-py's view of the data; types this
    project cannot dequantize (q6_K) raise a ValueError saying so."""
    reader = gguf.GGUFReader(path)
    with ggml_lora.open(path) as f:
        assert list(f.tensors) == [t.name for t in reader.tensors]
        for t in reader.tensors:
            info = f.tensors[t.name]
            if not ggml_lora.GGML_TYPES[info.type].can_dequantize:
                with pytest.raises(ValueError, match="not supported"):
                    f.to_numpy(t.name)
                continue
            ours = f.to_numpy(t.name)
            ref = np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
            assert ours.shape == info.shape == ref.shape
            assert ours.dtype == np.float32
            assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), t.name


@pytest.mark.parametrize("ggml_type", ["q4_0", "q8_0", "f16", "bf16", "f32"])
def test_out_arrays_are_filled_in_place_with_the_same_bytes(ggml_type: str) -> None:
    x = np.random.default_rng(11).standard_normal((37, 96)).astype(np.float32)
    expected = ggml_lora.quantize(x, ggml_type)
    q = np.full(expected.shape, 0xAB, np.uint8)
    assert ggml_lora.quantize(x, ggml_type, out=q) is q
    assert np.array_equal(q, expected)
    w = np.full(x.shape, np.nan, np.float32)
    assert ggml_lora.dequantize(q, ggml_type, x.shape, out=w) is w
    assert np.array_equal(w, ggml_lora.dequantize(expected, ggml_type, x.shape))


def test_out_arrays_must_match_exactly() -> None:
    x = np.ones((4, 64), np.float32)
    for bad in (np.empty((4, 35), np.uint8), np.empty((4, 36), np.int8), np.empty((36, 4), np.uint8).T, [0] * 144):
        with pytest.raises(ValueError, match="out must be"):
            ggml_lora.quantize(x, "q4_0", out=bad)  # type: ignore[arg-type]
    frozen = np.empty((4, 36), np.uint8)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ggml_lora.quantize(x, "q4_0", out=frozen)
    q = ggml_lora.quantize(x, "q4_0")
    with pytest.raises(ValueError, match="out must be"):
        ggml_lora.dequantize(q, "q4_0", x.shape, out=np.empty((4, 64), np.float64))
