//! q4_1: blocks of 32 weights as an f16 scale `d`, an f16 min `m` and 32 unsigned 4-bit codes (`x = d * q + m`).
//!
//! **Layout** (`block_q4_1`, 20 bytes): `d`, `m` (f16, little-endian), `qs[16]` (`q[j] | q[j + 16] << 4`).
//!
//! **Reproduces** `quantize_row_q4_1_ref` (no importance matrix: `min`/`max` of the block, `d = (max - min)/15`,
//! codes `MIN(15, (int8_t)((x - min) * id + 0.5f))`), `quantize_row_q4_1_impl` (with one: per block
//! `make_qkx3_quants` with `nmax` 15 and weights `qw * sqrt(sigma2 + x²)`, where `sigma2` is the mean of x² over the
//! WHOLE row; `m` is the negated fitted min) and `dequantize_row_q4_1` (`q * d + m`).
//!
//! **Traps.** `min`/`max` are found by strict comparisons from `FLT_MAX`/`-FLT_MAX`, so when the minimum (or
//! maximum) is zero its sign is that of the first zero of the block. The product and the `+ 0.5f` are rounded
//! separately (no FMA) and truncated. When `max - min` overflows or `1/d` does, C converts NaN or infinite floats to
//! `int8_t`; x86 gives 0 (see `c_float_to_i8`).

use super::float::{f16_bits_to_f32, f32_to_f16_bits};
use super::q4_k::padded;
#[cfg(test)]
use super::search_affine::make_qkx_quants;
use super::search_affine::{make_qkx_quants_lanes, transpose_in, Search};
use super::{c_float_to_i8, run_lanes, BlockFormat, LaneWork, Quantize};
use crate::GgmlType;

/// Elements per q4_1 / q5_1 block (`QK4_1`, `QK5_1`).
pub const QK4_1: usize = GgmlType::Q4_1.block_size();

/// One q4_1 block as ggml lays it out (`block_q4_1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ4_1 {
    /// Scale, as f16 bits.
    pub d: u16,
    /// Min (the value of code 0), as f16 bits.
    pub m: u16,
    /// The 32 codes: element `j` in the low nibble of byte `j`, element `j + 16` in its high nibble.
    pub qs: [u8; QK4_1 / 2],
}

impl BlockQ4_1 {
    /// Reads a block from its 20 on-disk bytes.
    pub fn from_bytes(b: &[u8; 20]) -> BlockQ4_1 {
        BlockQ4_1 {
            d: u16::from_le_bytes([b[0], b[1]]),
            m: u16::from_le_bytes([b[2], b[3]]),
            qs: b[4..].try_into().expect("16 bytes"),
        }
    }

    /// The block's 20 on-disk bytes.
    pub fn to_bytes(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..2].copy_from_slice(&self.d.to_le_bytes());
        b[2..4].copy_from_slice(&self.m.to_le_bytes());
        b[4..].copy_from_slice(&self.qs);
        b
    }

    /// One block of `quantize_row_q4_1_ref`.
    pub fn quantize(x: &[f32; QK4_1]) -> BlockQ4_1 {
        let (min, d, id) = min_scale(x, 15.0);
        let code = |v: f32| (c_float_to_i8((v - min) * id + 0.5) as i32).min(15) as u8;
        let mut qs = [0u8; QK4_1 / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            *q = code(x[j]) | (code(x[j + 16]) << 4);
        }
        BlockQ4_1 { d: f32_to_f16_bits(d), m: f32_to_f16_bits(min), qs }
    }

    /// One block of `dequantize_row_q4_1`.
    pub fn dequantize(&self, y: &mut [f32; QK4_1]) {
        let d = f16_bits_to_f32(self.d);
        let m = f16_bits_to_f32(self.m);
        for (j, &q) in self.qs.iter().enumerate() {
            y[j] = add_nan_first((q & 0xF) as f32 * d, m);
            y[j + 16] = add_nan_first((q >> 4) as f32 * d, m);
        }
    }
}

/// The portable reference quantizer over whole blocks (the trait's default, callable when a type overrides it):
/// false at the first block holding a non-finite value.
pub(super) fn quantize_blocks_scalar<B: Quantize>(src: &[f32], dst: &mut [u8]) -> bool {
    for (x, y) in src.chunks_exact(B::BLOCK_SIZE).zip(dst.chunks_exact_mut(B::BLOCK_BYTES)) {
        if !super::all_finite(x) {
            return false;
        }
        B::quantize_block(x, y);
    }
    true
}

/// C's `p + m` as x86 computes it: when both are NaN the first operand's NaN is the result. The compiler treats
/// addition as commutative (it does not preserve NaN payloads), so a NaN `p` is returned explicitly, out of the
/// optimiser's sight; a NaN `m` alone propagates either way. (`p` is a product, so a NaN is already quiet.)
#[inline(always)]
pub(super) fn add_nan_first(p: f32, m: f32) -> f32 {
    if p.is_nan() {
        std::hint::black_box(p)
    } else {
        p + m
    }
}

/// The reference quantizers' block statistics for q4_1 (`levels` 15) and q5_1 (31): `min` (by strict comparisons
/// from `FLT_MAX`), `d = (max - min) / levels` and `id = 1/d` (0 when `d` is 0).
pub(super) fn min_scale(x: &[f32; QK4_1], levels: f32) -> (f32, f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / levels;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (min, d, id)
}

/// `quantize_row_q4_1_impl` / `_q5_1_impl` on one row with importance weights, one block at a time (the plain
/// transcription; [`WeightedLanes`] is the same computation vectorised): `sigma2` is the mean of x² over the row;
/// each block gets `make_qkx3_quants` (`nmax` 15 or 31) and `block(scale, -the_min, codes, dst)` writes it.
#[cfg(test)]
pub(super) fn quantize_row_weighted_scalar(
    src: &[f32],
    weights: &[f32],
    dst: &mut [u8],
    nmax: i32,
    block_bytes: usize,
    block: impl Fn(f32, f32, &[u8; QK4_1], &mut [u8]),
) {
    let sigma2 = mean_square(src);
    let mut w = [0f32; QK4_1];
    let mut l = [0u8; QK4_1];
    for ((xb, qw), y) in src.chunks_exact(QK4_1).zip(weights.chunks_exact(QK4_1)).zip(dst.chunks_exact_mut(block_bytes))
    {
        for ((w, &q), &v) in w.iter_mut().zip(qw).zip(xb) {
            *w = q * (sigma2 + v * v).sqrt();
        }
        let (d, the_min) = make_qkx_quants(Search::weighted(nmax), xb, &w, &mut l);
        block(d, -the_min, &l, y);
    }
}

/// `sum x² / n` over a row, the sum sequential (C's `sigma2` of the q4_1/q5_1 importance paths).
#[inline(always)]
fn mean_square(src: &[f32]) -> f32 {
    let mut sum_x2 = 0.0f32;
    for &v in src {
        sum_x2 += v * v;
    }
    sum_x2 / src.len() as f32
}

/// Blocks whose searches run side by side.
const LANES: usize = 16;

/// `quantize_row_q4_1_impl` / `_q5_1_impl` on one row (`nmax` 15 or 31; `block(scale, -the_min, codes, dst)` writes
/// a block) with the searches of [`LANES`] blocks in lanes.
pub(super) struct WeightedLanes<'a, P: Fn(f32, f32, &[u8; QK4_1], &mut [u8])> {
    pub src: &'a [f32],
    pub weights: &'a [f32],
    pub dst: &'a mut [u8],
    pub nmax: i32,
    pub block_bytes: usize,
    pub block: P,
}

impl<P: Fn(f32, f32, &[u8; QK4_1], &mut [u8])> LaneWork for WeightedLanes<'_, P> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let sigma2 = mean_square(self.src);
        let mut pad = [0f32; LANES * QK4_1];
        let mut wpad = [0f32; LANES * QK4_1];
        let chunks = self.src.chunks(LANES * QK4_1).zip(self.weights.chunks(LANES * QK4_1));
        for ((x, qw), y) in chunks.zip(self.dst.chunks_mut(LANES * self.block_bytes)) {
            let xt = transpose_in::<LANES, QK4_1>(padded(x, &mut pad));
            let mut wt = transpose_in::<LANES, QK4_1>(padded(qw, &mut wpad));
            for (w, row) in wt.iter_mut().zip(&xt) {
                for k in 0..LANES {
                    w[k] *= (sigma2 + row[k] * row[k]).sqrt();
                }
            }
            let fits = make_qkx_quants_lanes(Search::weighted(self.nmax), &xt, &wt);
            for (k, yb) in y.chunks_exact_mut(self.block_bytes).enumerate() {
                let (d, the_min, l) = fits.super_block::<1, QK4_1>(k);
                (self.block)(d[0], -the_min[0], &l, yb);
            }
        }
    }
}

/// Writes one block of `quantize_row_q4_1_impl`: scale `d`, min `m`, codes `l`.
#[inline(always)]
fn write_weighted_block(d: f32, m: f32, l: &[u8; QK4_1], y: &mut [u8]) {
    let mut qs = [0u8; QK4_1 / 2];
    for (j, q) in qs.iter_mut().enumerate() {
        *q = l[j] | (l[j + 16] << 4);
    }
    y.copy_from_slice(&BlockQ4_1 { d: f32_to_f16_bits(d), m: f32_to_f16_bits(m), qs }.to_bytes());
}

impl BlockFormat for BlockQ4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;

    /// See [`BlockQ4_1::dequantize`].
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        BlockQ4_1::from_bytes(src.try_into().expect("one whole block")).dequantize(dst.try_into().expect("one block"));
    }

    /// `dequantize_row_q4_1`; AVX2 when available, same values.
    fn dequantize_blocks(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::x86::q4_1_q5_1_dequantize::<4>(src, dst, Self::dequantize_block) {
            return;
        }
        for (x, y) in src.chunks_exact(Self::BLOCK_BYTES).zip(dst.chunks_exact_mut(QK4_1)) {
            Self::dequantize_block(x, y);
        }
    }
}

impl Quantize for BlockQ4_1 {
    const TAKES_IMATRIX: bool = true;

    /// See [`BlockQ4_1::quantize`].
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        dst.copy_from_slice(&BlockQ4_1::quantize(src.try_into().expect("one whole block")).to_bytes());
    }

    /// `quantize_row_q4_1_ref`; AVX2 when available, same bytes.
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(ok) = super::x86::q4_1_q5_1_quantize::<4>(src, dst, Self::quantize_block) {
            return ok;
        }
        quantize_blocks_scalar::<Self>(src, dst)
    }

    /// `quantize_row_q4_1_impl` on one row.
    fn quantize_row_weighted(src: &[f32], weights: &[f32], dst: &mut [u8]) {
        run_lanes(WeightedLanes { src, weights, dst, nmax: 15, block_bytes: 20, block: write_weighted_block });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_util::hex;

    fn quant(x: &[f32; 32]) -> String {
        let mut out = [0u8; 20];
        assert!(BlockQ4_1::quantize_blocks(x, &mut out));
        hex(&out)
    }

    /// Expected bytes worked out by hand from the C formula (see the comments), not from this code.
    #[test]
    fn golden_unit_scale_block() {
        // min -2, max 13: d = 15/15 = 1 (f16 0x3C00), m = -2 (0xC000), id = 1, code = min(15, trunc(x + 2 + 0.5)).
        let mut x = [0f32; 32];
        for (j, v) in x.iter_mut().take(16).enumerate() {
            *v = j as f32 - 2.0; // code j
        }
        let hi = [0.49, 0.5, 0.51, 13.0, 12.9, -1.9, -2.0, 5.25, 5.75, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        // codes: 2.99->2, 3->3, 3.01->3, 15.5->15, 15.4->15, 0.6->0, 0.5->0, 7.75->7, 8.25->8, 2.5->2 ...
        x[16..].copy_from_slice(&hi);
        let expected = [
            0x00, 0x3C, 0x00, 0xC0, 0x20, 0x31, 0x32, 0xF3, 0xF4, 0x05, 0x06, 0x77, 0x88, 0x29, 0x2A, 0x2B, 0x2C, 0x2D,
            0x2E, 0x2F,
        ];
        assert_eq!(quant(&x), hex(&expected));
    }

    #[test]
    fn golden_zero_blocks_take_the_sign_of_the_first_zero() {
        // min/max start at FLT_MAX/-FLT_MAX and change on strict comparisons only: both become the first zero.
        // +0: d = (0 - 0)/15 = +0, m = +0. -0 first: d = (-0 - -0)/15 = +0, m = -0 (0x8000). Codes trunc(0.5) = 0.
        let mut x = [0f32; 32];
        x[3] = -0.0;
        assert_eq!(quant(&x), hex(&[0; 20]));
        x[0] = -0.0;
        let mut expected = [0u8; 20];
        expected[3] = 0x80;
        assert_eq!(quant(&x), hex(&expected));
    }

    #[test]
    fn golden_weighted_with_zero_importance_keeps_the_first_fit() {
        // All weights 0: make_qkx3_quants' first fit (min -3, max 12: iscale 1, codes nearest_int(x + 3), ties to
        // even) is kept, as every candidate has D = 0. d = 1 (0x3C00), m = -the_min = -3 (0xC200).
        let mut x = [0f32; 32];
        for (j, v) in x.iter_mut().enumerate().take(31) {
            *v = j as f32 * 0.5 - 3.0;
        }
        x[31] = 0.25; // 3.25 -> 3
        let codes = [
            0u8, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6, 7, 8, 8, 8, 9, 10, 10, 10, 11, 12, 12, 12, 13, 14, 14, 14, 15,
            3,
        ];
        let mut expected = vec![0x00, 0x3C, 0x00, 0xC2];
        expected.extend((0..16).map(|j| codes[j] | codes[j + 16] << 4));
        let mut out = [0u8; 20];
        BlockQ4_1::quantize_row_weighted(&x, &[0.0; 32], &mut out);
        assert_eq!(hex(&out), hex(&expected));
    }

    #[test]
    fn golden_dequantize() {
        // d = 0.5 (0x3800), m = -1.5 (0xBE00): y = q * 0.5 - 1.5.
        let mut b = [0u8; 20];
        b[..4].copy_from_slice(&[0x00, 0x38, 0x00, 0xBE]);
        for j in 0..16 {
            b[4 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let mut y = [0f32; 32];
        BlockQ4_1::dequantize_block(&b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.5 - 1.5);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.5 - 1.5);
        }
    }
}

/// The vectorised importance path against the one-block transcription: AVX2 (called directly, so the test fails
/// rather than compare the portable code with itself when the feature is missing), portable lane code, scalar.
#[cfg(all(test, target_arch = "x86_64"))]
mod lane_tests {
    use super::*;
    use crate::quant::q5_1::BlockQ5_1;
    use crate::quant::test_util::{lcg_block_values, lcg_weights};
    use crate::quant::x86::with_avx2;

    fn check(nmax: i32, bb: usize, block: fn(f32, f32, &[u8; QK4_1], &mut [u8])) {
        assert!(is_x86_feature_detected!("avx2"), "this test needs an AVX2 machine");
        let x = lcg_block_values(40 * 9); // rows of 40 blocks (40 % LANES != 0)
        let w = lcg_weights(x.len());
        let row = 40 * QK4_1;
        let n = x.len() / QK4_1 * bb;
        let (mut a, mut b, mut c) = (vec![0u8; n], vec![1u8; n], vec![2u8; n]);
        for ((xs, ws), (ya, (yb, yc))) in x
            .chunks_exact(row)
            .zip(w.chunks_exact(row))
            .zip(a.chunks_exact_mut(40 * bb).zip(b.chunks_exact_mut(40 * bb).zip(c.chunks_exact_mut(40 * bb))))
        {
            let k = |dst| WeightedLanes { src: xs, weights: ws, dst, nmax, block_bytes: bb, block };
            assert!(with_avx2(k(ya)).is_ok());
            k(yb).run();
            quantize_row_weighted_scalar(xs, ws, yc, nmax, bb, block);
        }
        assert!(a == b && a == c);
    }

    /// The explicit AVX2 reference quantizer and dequantizer of q4_1 (`BITS` 4) / q5_1 (5) against the scalar
    /// ones, on random and edge blocks (zero extremes, huge and tiny ranges) and random bytes.
    fn check_ref<B: Quantize, const BITS: u32>() {
        assert!(is_x86_feature_detected!("avx2"), "this test needs an AVX2 machine");
        let mut x = lcg_block_values(3000);
        x.extend(lcg_block_values(300).iter().map(|v| v.abs())); // minimum 0 in the sparse blocks
        x.extend(lcg_block_values(300).iter().map(|v| -v.abs()));
        // Five more blocks, mostly with a zero extreme, and a count that is not a multiple of 4 (the SIMD kernel's
        // groups of blocks, so its one-block tail runs too).
        x.extend(lcg_block_values(5).iter().enumerate().map(|(i, v)| if i % 7 == 0 { v.abs() } else { -v.abs() }));
        assert_ne!(x.len() / QK4_1 % 4, 0);
        let n = x.len() / QK4_1 * B::BLOCK_BYTES;
        let (mut a, mut b) = (vec![0u8; n], vec![1u8; n]);
        assert_eq!(crate::quant::x86::q4_1_q5_1_quantize::<BITS>(&x, &mut a, B::quantize_block), Some(true));
        assert!(quantize_blocks_scalar::<B>(&x, &mut b));
        assert!(a == b);
        let mut raw: Vec<u8> = (0..n as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        raw.extend(&a);
        let m = raw.len() / B::BLOCK_BYTES * QK4_1;
        let (mut fa, mut fb) = (vec![0f32; m], vec![1f32; m]);
        assert!(crate::quant::x86::q4_1_q5_1_dequantize::<BITS>(&raw, &mut fa, B::dequantize_block));
        for (r, y) in raw.chunks_exact(B::BLOCK_BYTES).zip(fb.chunks_exact_mut(QK4_1)) {
            B::dequantize_block(r, y);
        }
        assert!(fa.iter().zip(&fb).all(|(p, q)| p.to_bits() == q.to_bits()));
    }

    #[test]
    fn reference_avx2_and_scalar_agree() {
        check_ref::<BlockQ4_1, 4>();
        check_ref::<BlockQ5_1, 5>();
    }

    #[test]
    fn q4_1_avx2_portable_and_scalar_agree() {
        check(15, 20, write_weighted_block);
    }

    #[test]
    fn q5_1_avx2_portable_and_scalar_agree() {
        check(31, 24, |d, m, l, y| y.copy_from_slice(&BlockQ5_1::from_codes(d, m, l).to_bytes()));
    }
}
