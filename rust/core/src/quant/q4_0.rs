//! q4_0: blocks of 32 weights as an f16 scale and 32 unsigned 4-bit codes (`x = d * (q - 8)`).
//!
//! Reproduces ggml's `quantize_row_q4_0_ref` (no importance matrix; see [`BlockQ4_0::quantize`]),
//! `quantize_row_q4_0_impl` (with one: `sigma2 = sum(x*x)/n` over the whole row, weights `qw * sqrtf(sigma2 +
//! x*x)`, then `make_qx_quants(32, 8, …, rmse_type 1)` gives `d` and the codes; an all-zero block, largest
//! magnitude below 1e-15, gets `d = 0` and codes 0, not 8) and `dequantize_row_q4_0`.

use super::float::{f16_bits_to_f32, f32_to_f16_bits};
use super::search_symmetric::Weighted32;
use super::{c_float_to_i8, run_lanes, BlockFormat, Quantize};
use crate::GgmlType;

/// Elements per q4_0 block (`QK4_0`).
pub const QK4_0: usize = 32;

/// One q4_0 block as ggml lays it out (`block_q4_0`): `d` (f16 bits, little-endian on disk) then 16 bytes of
/// nibbles, `qs[j] = q[j] | q[j + 16] << 4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ4_0 {
    /// Scale, as f16 bits.
    pub d: u16,
    /// The 32 codes, two per byte: element `j` in the low nibble of byte `j`, element `j + 16` in its high nibble.
    pub qs: [u8; QK4_0 / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

impl BlockQ4_0 {
    /// Reads a block from its 18 on-disk bytes (any alignment).
    pub fn from_bytes(b: &[u8; 18]) -> BlockQ4_0 {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[2..]);
        BlockQ4_0 { d: u16::from_le_bytes([b[0], b[1]]), qs }
    }

    /// The block's 18 on-disk bytes.
    pub fn to_bytes(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[..2].copy_from_slice(&self.d.to_le_bytes());
        b[2..].copy_from_slice(&self.qs);
        b
    }

    /// One block of ggml's `quantize_row_q4_0_ref`, literally: the element of largest magnitude (the first one on
    /// ties, sign kept; +0.0 for an all-zero block) gives `d = max / -8`, `id = 1/d` (0 when `d == 0`), the codes
    /// are `min(15, (int8_t)(x*id + 8.5f))` with the product and the sum rounded separately (no FMA).
    ///
    /// The input should be finite (the public entry points refuse anything else). For a block whose largest
    /// magnitude is at most 2^-125, `1/d` overflows to infinity and every `x*id + 8.5` is ±inf or NaN; C's
    /// `(int8_t)` of those is undefined, x86 code gives 0 (`cvttss2si` yields 0x80000000, low byte 0) and so does
    /// gguf-py, so such blocks come out with all codes 0 (and `d` = ±0 in f16).
    pub fn quantize(x: &[f32; QK4_0]) -> BlockQ4_0 {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0u8; QK4_0 / 2];
        for (j, q) in qs.iter_mut().enumerate() {
            let x0 = x[j] * id;
            let x1 = x[j + QK4_0 / 2] * id;
            let xi0 = 15.min(c_float_to_i8(x0 + 8.5) as i32) as u8;
            let xi1 = 15.min(c_float_to_i8(x1 + 8.5) as i32) as u8;
            *q = xi0 | (xi1 << 4);
        }
        BlockQ4_0 { d: f32_to_f16_bits(d), qs }
    }

    /// One block of ggml's `dequantize_row_q4_0`: `y[j] = (q[j] - 8) * d` with `d` the f16 scale widened to f32.
    pub fn dequantize(&self, y: &mut [f32; QK4_0]) {
        let d = f16_bits_to_f32(self.d);
        for (j, &q) in self.qs.iter().enumerate() {
            y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
            y[j + QK4_0 / 2] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Stores one block of `quantize_row_q4_0_impl`: `d` rounded to f16, byte `j` = `L[j] | L[j + 16] << 4`.
fn write_weighted_block(d: f32, codes: &[u8; QK4_0], dst: &mut [u8]) {
    let mut qs = [0u8; QK4_0 / 2];
    for (j, q) in qs.iter_mut().enumerate() {
        *q = codes[j] | (codes[j + 16] << 4);
    }
    dst.copy_from_slice(&BlockQ4_0 { d: f32_to_f16_bits(d), qs }.to_bytes());
}

/// Portable `quantize_row_q4_0_ref` over whole blocks; false (stopping early) at the first block holding a
/// non-finite value.
pub(super) fn quantize_blocks_scalar(src: &[f32], dst: &mut [u8]) -> bool {
    for (x, y) in src.chunks_exact(QK4_0).zip(dst.chunks_exact_mut(18)) {
        if !super::all_finite(x) {
            return false;
        }
        BlockQ4_0::quantize_block(x, y);
    }
    true
}

/// Portable `dequantize_row_q4_0` over whole blocks.
pub(super) fn dequantize_blocks_scalar(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(QK4_0)) {
        BlockQ4_0::dequantize_block(x, y);
    }
}

impl BlockFormat for BlockQ4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;

    /// See [`BlockQ4_0::dequantize`].
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let b = BlockQ4_0::from_bytes(src.try_into().expect("one whole block"));
        b.dequantize(dst.try_into().expect("one whole block"));
    }

    /// `dequantize_row_q4_0`; AVX2 when available, same values.
    fn dequantize_blocks(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::x86::q4_0_dequantize(src, dst) {
            return;
        }
        dequantize_blocks_scalar(src, dst)
    }
}

impl Quantize for BlockQ4_0 {
    const TAKES_IMATRIX: bool = true;

    /// See [`BlockQ4_0::quantize`].
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        dst.copy_from_slice(&BlockQ4_0::quantize(src.try_into().expect("one whole block")).to_bytes());
    }

    /// `quantize_row_q4_0_ref`; AVX2 when available, same bytes.
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(ok) = super::x86::q4_0_quantize(src, dst, Self::quantize_block) {
            return ok;
        }
        quantize_blocks_scalar(src, dst)
    }

    /// `quantize_row_q4_0_impl`, the searches of 8 blocks at a time in lanes (AVX2 when available; same bytes).
    fn quantize_row_weighted(src: &[f32], weights: &[f32], dst: &mut [u8]) {
        run_lanes(Weighted32 { nmax: 8, src, qw: weights, dst, write: write_weighted_block })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::quant::test_util::NO_SIMD;
    use crate::quant::test_util::{hex, lcg_block_values};

    /// The AVX2 kernel, called directly (never the dispatcher, whose fallback is the portable code itself); fails
    /// on an x86-64 CPU without AVX2.
    #[cfg(target_arch = "x86_64")]
    fn simd_quantize(src: &[f32], dst: &mut [u8]) -> bool {
        crate::quant::x86::q4_0_quantize(src, dst, BlockQ4_0::quantize_block).expect(NO_SIMD)
    }

    #[cfg(target_arch = "x86_64")]
    fn simd_dequantize(src: &[u8], dst: &mut [f32]) {
        assert!(crate::quant::x86::q4_0_dequantize(src, dst), "{NO_SIMD}");
    }

    /// The portable kernel's bytes for one block, checked equal to the AVX2 kernel's on x86-64.
    fn quant(x: &[f32; 32]) -> Vec<u8> {
        let mut scalar = vec![0u8; 18];
        assert!(quantize_blocks_scalar(x, &mut scalar));
        #[cfg(target_arch = "x86_64")]
        {
            let mut simd = vec![0u8; 18];
            assert!(simd_quantize(x, &mut simd));
            assert_eq!(hex(&simd), hex(&scalar), "AVX2 kernel vs portable on {x:?}");
        }
        scalar
    }

    /// Expected bytes worked out by hand from the C formula (see the comments), not from this code.
    #[test]
    fn golden_unit_scale_block() {
        // max = -8 at index 0 (x[16] = +8 has the same magnitude but is not strictly larger: the first wins and
        // keeps its sign). d = -8 / -8 = 1 (f16 0x3C00), id = 1, q = min(15, trunc(x + 8.5)).
        let mut x = [0f32; 32];
        for (j, v) in x.iter_mut().take(16).enumerate() {
            *v = j as f32 - 8.0; // q = j
        }
        let hi = [8.0, 7.5, 0.49, -0.5, -0.51, 0.5, 1.0, -8.0, 3.2, -3.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        // q:    16->15, 16->15, 8.99->8, 8.0->8, 7.99->7, 9->9, 9.5->9, 0.5->0, 11.7->11, 5.3->5, 8.5->8 ...
        x[16..].copy_from_slice(&hi);
        let expected = [
            0x00, 0x3C, 0xF0, 0xF1, 0x82, 0x83, 0x74, 0x95, 0x96, 0x07, 0xB8, 0x59, 0x8A, 0x8B, 0x8C, 0x8D, 0x8E, 0x8F,
        ];
        assert_eq!(hex(&quant(&x)), hex(&expected));
    }

    #[test]
    fn golden_positive_max_block() {
        // max = +4 at index 5 (x[20] = -4 ties in magnitude, comes later): d = -0.5 (f16 0xB800), id = -2.
        let mut x = [0f32; 32];
        x[0] = 1.25; // -2.5 + 8.5 = 6
        x[1] = -0.25; // 0.5 + 8.5 = 9
        x[2] = 0.25; // -0.5 + 8.5 = 8
        x[3] = -1.7; // 3.4000001 + 8.5 = 11.9 -> 11
        x[5] = 4.0; // -8 + 8.5 = 0.5 -> 0
        x[20] = -4.0; // 16.5 -> 16 -> min 15
        x[21] = 0.2; // 8.1 -> 8
        x[31] = 3.9; // 0.6999998 -> 0
                     // zeros: 8.5 -> 8
        let expected = [
            0x00, 0xB8, 0x86, 0x89, 0x88, 0x8B, 0xF8, 0x80, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x08,
        ];
        assert_eq!(hex(&quant(&x)), hex(&expected));
    }

    #[test]
    fn golden_zero_block_has_negative_zero_scale() {
        // amax stays 0, max stays +0.0f, d = 0.0f / -8 = -0.0f -> f16 0x8000; id = 0; every code trunc(8.5) = 8.
        let mut expected = vec![0x00, 0x80];
        expected.extend([0x88; 16]);
        assert_eq!(hex(&quant(&[0.0; 32])), hex(&expected));
        // The C reference never takes max from the data here, so a leading -0.0 changes nothing (gguf-py's
        // argmax does take it and writes d = +0 instead: a known gguf-py difference).
        let mut x = [0.0f32; 32];
        x[0] = -0.0;
        x[7] = -0.0;
        assert_eq!(hex(&quant(&x)), hex(&expected));
    }

    #[test]
    fn golden_beyond_f16_range() {
        // max = 1e6: d = -125000 overflows f16 -> -inf (0xFC00). x*id is about -8 for 1e6 (-> 0), 8 for -1e6
        // (16.5 -> 15), 0 for 0 (-> 8).
        let mut x = [0f32; 32];
        x[0] = 1e6;
        x[16] = -1e6;
        let mut expected = vec![0x00, 0xFC, 0xF0];
        expected.extend([0x88; 15]);
        assert_eq!(hex(&quant(&x)), hex(&expected));
        // 3e38: d = -3.75e37 -> f16 -inf too.
        let mut x = [0f32; 32];
        x[31] = 3e38;
        let mut expected = vec![0x00, 0xFC];
        expected.extend([0x88; 15]);
        expected.push(0x08);
        assert_eq!(hex(&quant(&x)), hex(&expected));
    }

    #[test]
    fn golden_tiny_block_with_infinite_inverse_scale() {
        // max = 1e-40 (subnormal): d = -1.25e-41, 1/d = -inf, every product is inf or NaN -> code 0 (x86 and
        // gguf-py); d rounds to -0 in f16.
        let mut x = [0f32; 32];
        x[3] = 1e-40;
        x[5] = -5e-41;
        let mut expected = vec![0x00, 0x80];
        expected.extend([0x00; 16]);
        assert_eq!(hex(&quant(&x)), hex(&expected));
        // The smallest subnormal: d = 2^-149 / -8 underflows to -0.0, so id = 0 and this is a zero block.
        let mut x = [0f32; 32];
        x[9] = f32::from_bits(1);
        let mut expected = vec![0x00, 0x80];
        expected.extend([0x88; 16]);
        assert_eq!(hex(&quant(&x)), hex(&expected));
    }

    #[test]
    fn product_and_sum_are_rounded_separately() {
        // max = -3 -> d = 0.375, id = 1/0.375 rounded. Search inputs where fusing x*id + 8.5 into one rounding
        // would change the truncated code, and check that the separately rounded value (the C reference) wins.
        let max = -3.0f32;
        let d = max / -8.0;
        let id = 1.0 / d;
        let mut found = 0;
        for i in 0..200_000u32 {
            let x = -3.0 + 6.0 * (i as f32 / 200_000.0);
            let unfused = x * id + 8.5;
            let fused = x.mul_add(id, 8.5);
            if unfused.trunc() != fused.trunc() {
                found += 1;
                let mut b = [0f32; 32];
                b[0] = max;
                b[1] = x;
                let out = quant(&b);
                assert_eq!((out[3] & 0x0F) as f32, unfused.trunc().min(15.0), "x = {x:e}");
            }
        }
        assert!(found > 0, "no FMA-sensitive input found");
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_matches_scalar_on_random_and_edge_blocks() {
        let blocks = lcg_block_values(4000);
        let mut a = vec![0u8; blocks.len() / 32 * 18];
        let mut b = a.clone();
        assert!(simd_quantize(&blocks, &mut a));
        assert!(quantize_blocks_scalar(&blocks, &mut b));
        assert!(a == b);
        let mut fa = vec![0f32; blocks.len()];
        let mut fb = fa.clone();
        simd_dequantize(&a, &mut fa);
        dequantize_blocks_scalar(&a, &mut fb);
        assert!(fa.iter().zip(&fb).all(|(p, q)| p.to_bits() == q.to_bits()));
        // Random bytes, misaligned, including f16 NaN/inf scales.
        let raw: Vec<u8> = (0..18 * 500 + 1).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut fa = vec![0f32; 500 * 32];
        let mut fb = fa.clone();
        simd_dequantize(&raw[1..], &mut fa);
        dequantize_blocks_scalar(&raw[1..], &mut fb);
        assert!(fa.iter().zip(&fb).all(|(p, q)| p.to_bits() == q.to_bits()));
    }

    #[test]
    fn golden_weighted_block() {
        // One block [-8, -7, ..., 7] twice over, with weights: sigma2 = 2*sum(k^2, k=-8..7)/32 = 2*344/32 = 21.5,
        // weights qw*sqrt(21.5 + x^2) with qw = 1. max = -8 (the first), iscale = -8/-8 = 1: every code fits
        // exactly (l = x), scale 1, and no candidate can beat an exact fit. Codes x + 8 = 0..15, d = 1 (0x3C00).
        let x: Vec<f32> = (0..32).map(|i| (i % 16) as f32 - 8.0).collect();
        let mut out = [0u8; 18];
        BlockQ4_0::quantize_row_weighted(&x, &[1.0; 32], &mut out);
        let mut expected = vec![0x00, 0x3C];
        expected.extend((0..16u8).map(|j| j | (j << 4)));
        assert_eq!(hex(&out), hex(&expected));
        // All zero: d = 0 (+0.0, unlike the reference's -0.0) and codes 0 (unlike the reference's 8).
        BlockQ4_0::quantize_row_weighted(&[-0.0; 32], &[1.0; 32], &mut out);
        assert_eq!(out, [0u8; 18]);
    }

    #[test]
    fn weighted_lanes_equal_scalar() {
        use crate::quant::search_symmetric::weighted_row_32;
        // 51 blocks: 6 full sets of 8 lanes and a short one.
        let mut src = crate::quant::search_symmetric::test_inputs::superblocks(7);
        src.truncate(51 * 32);
        let w = crate::quant::search_symmetric::test_inputs::weights(src.len());
        let mut expected = vec![0u8; src.len() / 32 * 18];
        weighted_row_32(8, &src, &w, &mut expected, write_weighted_block);
        let mut out = vec![1u8; expected.len()];
        crate::quant::LaneWork::run(Weighted32 {
            nmax: 8,
            src: &src,
            qw: &w,
            dst: &mut out,
            write: write_weighted_block,
        });
        assert!(out == expected);
        #[cfg(target_arch = "x86_64")]
        {
            assert!(is_x86_feature_detected!("avx2"), "this test needs AVX2 to exercise the AVX2 path");
            let mut out = vec![1u8; expected.len()];
            let work = Weighted32 { nmax: 8, src: &src, qw: &w, dst: &mut out, write: write_weighted_block };
            assert!(crate::quant::x86::with_avx2(work).is_ok());
            assert!(out == expected);
        }
    }

    #[test]
    fn round_trip_error_bound() {
        let blocks = lcg_block_values(2000);
        let mut q = vec![0u8; blocks.len() / 32 * 18];
        assert!(BlockQ4_0::quantize_blocks(&blocks, &mut q));
        let mut back = vec![0f32; blocks.len()];
        BlockQ4_0::dequantize_blocks(&q, &mut back);
        for (bi, (x, y)) in blocks.chunks(32).zip(back.chunks(32)).enumerate() {
            let d16 = f16_bits_to_f32(u16::from_le_bytes([q[bi * 18], q[bi * 18 + 1]]));
            if !d16.is_finite() {
                continue;
            }
            let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = max / 8.0;
            // Rounding error d/2 except at the clamped end (x/d near +8 codes as 7): d; plus f16 scale error.
            let bound = d + 8.0 * (d16.abs() - d).abs() + max * 1e-6;
            for (a, b) in x.iter().zip(y) {
                assert!((a - b).abs() <= bound, "block {bi}: {a} -> {b}, bound {bound}");
            }
        }
    }
}
