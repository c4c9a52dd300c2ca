//! q5_0: blocks of 32 weights as an f16 scale and 32 unsigned 5-bit codes (`x = d * (q - 16)`), 22 bytes.
//!
//! Reproduces ggml's `quantize_row_q5_0_ref` (no importance matrix), `quantize_row_q5_0_impl` (with one) and
//! `dequantize_row_q5_0`.
//!
//! - Without weights: the element of largest magnitude (the first one on ties, sign kept; +0.0 for an all-zero
//!   block) gives `d = max / -16`, `id = 1/d` (0 when `d == 0`), codes `min(31, (int8_t)(x*id + 16.5f))` with the
//!   product and the sum rounded separately. Trap: for a block whose largest magnitude is at most about 2^-124,
//!   `1/d` overflows and every `x*id + 16.5` is ±inf or NaN; C's `(int8_t)` of those is undefined, x86 code gives
//!   0 (as for q4_0, see `c_float_to_i8`), so such blocks have all codes 0.
//! - With weights: `sigma2 = sum(x*x)/n` over the whole row (one sequential sum), per-value weights
//!   `qw * sqrtf(sigma2 + x*x)`, then `make_qx_quants(32, 16, …, rmse_type 1)` gives `d` and the codes (an
//!   all-zero block, largest magnitude below 1e-15, gets `d = 0` and codes 0, not 16).
//!
//! Layout (`block_q5_0`): `d` (f16), `qh` (4 bytes, little-endian u32: bit `j` is bit 4 of code `j`), `qs` (16
//! bytes: code `j` low nibble in the low half of byte `j`, code `j + 16` in the high half).

use super::float::{f16_bits_to_f32, f32_to_f16_bits};
use super::search_symmetric::Weighted32;
use super::{c_float_to_i8, quantize_each_block, run_lanes, BlockFormat, Quantize};
use crate::GgmlType;

/// Elements per q5_0 block (`QK5_0`).
pub const QK5_0: usize = 32;
/// Bytes of one q5_0 block.
const BYTES: usize = 22;

/// One q5_0 block as ggml lays it out (`block_q5_0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ5_0 {
    /// Scale, as f16 bits.
    pub d: u16,
    /// Bit 4 of every code: bit `j` of this little-endian u32 belongs to code `j`.
    pub qh: u32,
    /// Low 4 bits of the codes: code `j` in the low nibble of byte `j`, code `j + 16` in its high nibble.
    pub qs: [u8; QK5_0 / 2],
}

impl BlockQ5_0 {
    /// Reads a block from its 22 on-disk bytes (any alignment).
    pub fn from_bytes(b: &[u8; BYTES]) -> BlockQ5_0 {
        let mut qs = [0u8; 16];
        qs.copy_from_slice(&b[6..]);
        BlockQ5_0 { d: u16::from_le_bytes([b[0], b[1]]), qh: u32::from_le_bytes([b[2], b[3], b[4], b[5]]), qs }
    }

    /// The block's 22 on-disk bytes.
    pub fn to_bytes(&self) -> [u8; BYTES] {
        let mut b = [0u8; BYTES];
        b[..2].copy_from_slice(&self.d.to_le_bytes());
        b[2..6].copy_from_slice(&self.qh.to_le_bytes());
        b[6..].copy_from_slice(&self.qs);
        b
    }

    /// A block from its f32 scale (rounded to f16 here) and its 32 codes (each below 32).
    fn from_codes(d: f32, codes: &[u8; QK5_0]) -> BlockQ5_0 {
        let mut qs = [0u8; 16];
        let mut qh = 0u32;
        for (j, q) in qs.iter_mut().enumerate() {
            let (c0, c1) = (codes[j], codes[j + 16]);
            *q = (c0 & 0x0F) | ((c1 & 0x0F) << 4);
            qh |= (((c0 & 0x10) >> 4) as u32) << j;
            qh |= (((c1 & 0x10) >> 4) as u32) << (j + 16);
        }
        BlockQ5_0 { d: f32_to_f16_bits(d), qh, qs }
    }

    /// One block of ggml's `quantize_row_q5_0_ref` (see the module docs). The input should be finite.
    pub fn quantize(x: &[f32; QK5_0]) -> BlockQ5_0 {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let codes: [u8; QK5_0] = std::array::from_fn(|j| 31.min(c_float_to_i8(x[j] * id + 16.5) as i32) as u8);
        BlockQ5_0::from_codes(d, &codes)
    }

    /// One block of ggml's `dequantize_row_q5_0`: `y[j] = (q[j] - 16) * d` with `d` widened from f16.
    pub fn dequantize(&self, y: &mut [f32; QK5_0]) {
        dequantize_bytes(&self.to_bytes(), y);
    }
}

/// `dequantize_row_q5_0` of one block straight from its bytes.
#[inline(always)]
fn dequantize_bytes(b: &[u8], y: &mut [f32]) {
    let d = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..22].iter().enumerate() {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (((q & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// Stores one weighted block (for [`weighted_row_32`]).
fn write_block(d: f32, codes: &[u8; QK5_0], dst: &mut [u8]) {
    dst.copy_from_slice(&BlockQ5_0::from_codes(d, codes).to_bytes());
}

impl BlockFormat for BlockQ5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;

    /// See [`BlockQ5_0::dequantize`].
    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        dequantize_bytes(src, dst);
    }
}

impl Quantize for BlockQ5_0 {
    const TAKES_IMATRIX: bool = true;

    /// See [`BlockQ5_0::quantize`].
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        dst.copy_from_slice(&BlockQ5_0::quantize(src.try_into().expect("one whole block")).to_bytes());
    }

    /// `quantize_row_q5_0_ref`; AVX2 when available, same bytes.
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(ok) = super::x86::q5_0_quantize(src, dst, Self::quantize_block) {
            return ok;
        }
        quantize_each_block::<Self>(src, dst)
    }

    /// `quantize_row_q5_0_impl`, the searches of 8 blocks at a time in lanes (AVX2 when available; same bytes).
    fn quantize_row_weighted(src: &[f32], weights: &[f32], dst: &mut [u8]) {
        run_lanes(Weighted32 { nmax: 16, src, qw: weights, dst, write: write_block })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::search_symmetric::weighted_row_32;
    use crate::quant::test_util::{hex, lcg_block_values};
    use crate::quant::LaneWork;

    /// The portable kernel's bytes for one block, checked equal to the AVX2 kernel's (called directly, never the
    /// dispatcher, whose fallback is the portable code itself) on x86-64; fails there without AVX2.
    fn quant(x: &[f32; 32]) -> Vec<u8> {
        let mut scalar = vec![0u8; BYTES];
        assert!(quantize_each_block::<BlockQ5_0>(x, &mut scalar));
        #[cfg(target_arch = "x86_64")]
        {
            let mut simd = vec![0u8; BYTES];
            let ok = crate::quant::x86::q5_0_quantize(x, &mut simd, BlockQ5_0::quantize_block);
            assert_eq!(ok, Some(true), "{}", crate::quant::test_util::NO_SIMD);
            assert_eq!(hex(&simd), hex(&scalar), "AVX2 kernel vs portable on {x:?}");
        }
        scalar
    }

    /// Expected bytes worked out by hand from the C formula (see the comments), not from this code.
    #[test]
    fn golden_unit_scale_block() {
        // max = -16 at index 0 (x[16] = +16 ties in magnitude but comes later): d = 1 (f16 0x3C00), id = 1,
        // q = min(31, trunc(x + 16.5)).
        let mut x = [0f32; 32];
        for (j, v) in x.iter_mut().take(16).enumerate() {
            *v = 2.0 * j as f32 - 16.0; // q = 2j (0, 2, ..., 30)
        }
        // q:   16.5+16 = 32.5 -> 32 -> 31; 15.5 -> 31; 0.49 -> 16; -0.5 -> 16; -0.51 -> 15; 0.5 -> 17; 14.6 -> 31;
        //      -16 -> 0; 3.2 -> 19; -3.2 -> 13; zeros -> 16.
        let hi = [16.0, 15.0, 0.49, -0.5, -0.51, 0.5, 14.6, -16.0, 3.2, -3.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        x[16..].copy_from_slice(&hi);
        let lo_codes: Vec<u8> = (0..16).map(|j| 2 * j).collect();
        let hi_codes = [31u8, 31, 16, 16, 15, 17, 31, 0, 19, 13, 16, 16, 16, 16, 16, 16];
        let mut expected = vec![0x00, 0x3C];
        // qh: bit j for lo code >= 16 (j >= 8), bit j+16 for hi codes >= 16 (all but indices 4, 7, 9).
        let mut qh = 0u32;
        for j in 0..16 {
            qh |= ((lo_codes[j] >> 4) as u32) << j;
            qh |= ((hi_codes[j] >> 4) as u32) << (j + 16);
        }
        assert_eq!(qh, 0b1111_1101_0110_1111_1111_1111_0000_0000);
        expected.extend(qh.to_le_bytes());
        expected.extend((0..16).map(|j| (lo_codes[j] & 0xF) | ((hi_codes[j] & 0xF) << 4)));
        assert_eq!(hex(&quant(&x)), hex(&expected));
    }

    #[test]
    fn golden_zero_and_tiny_blocks() {
        // All zero: max stays +0.0, d = 0/-16 = -0.0 (f16 0x8000), id = 0, codes trunc(16.5) = 16: qh all ones,
        // nibbles 0.
        let mut expected = vec![0x00, 0x80, 0xFF, 0xFF, 0xFF, 0xFF];
        expected.extend([0x00; 16]);
        assert_eq!(hex(&quant(&[0.0; 32])), hex(&expected));
        // max = 1e-40: d = -6.25e-42, 1/d = -inf, every code 0 (x86's int8 of inf/NaN), d16 = -0.
        let mut x = [0f32; 32];
        x[3] = 1e-40;
        let mut expected = vec![0x00, 0x80, 0, 0, 0, 0];
        expected.extend([0x00; 16]);
        assert_eq!(hex(&quant(&x)), hex(&expected));
    }

    #[test]
    fn golden_dequantize() {
        // d = 0.5 (f16 0x3800); qh bit 0 and bit 17 set; qs[0] = 0x21, qs[1] = 0xF0.
        // y[0] = ((1 | 16) - 16) * 0.5 = 0.5; y[16] = (2 - 16) * 0.5 = -7; y[1] = (0 - 16) * 0.5 = -8;
        // y[17] = ((15 | 16) - 16) * 0.5 = 7.5; the other codes 0 -> -8.
        let mut b = vec![0x00, 0x38];
        b.extend((1u32 | 1 << 17).to_le_bytes());
        b.extend([0x21, 0xF0]);
        b.extend([0; 14]);
        let mut y = [0f32; 32];
        BlockQ5_0::from_bytes(b.as_slice().try_into().unwrap()).dequantize(&mut y);
        let mut expected = [-8.0f32; 32];
        (expected[0], expected[16], expected[1], expected[17]) = (0.5, -7.0, -8.0, 7.5);
        assert_eq!(y, expected);
    }

    #[test]
    fn simd_matches_scalar_on_random_and_edge_blocks() {
        let blocks = lcg_block_values(4000);
        let mut a = vec![0u8; blocks.len() / 32 * BYTES];
        let mut b = a.clone();
        assert!(quantize_each_block::<BlockQ5_0>(&blocks, &mut b));
        #[cfg(target_arch = "x86_64")]
        {
            assert!(is_x86_feature_detected!("avx2"), "this test needs AVX2 to exercise the AVX2 path");
            assert_eq!(crate::quant::x86::q5_0_quantize(&blocks, &mut a, BlockQ5_0::quantize_block), Some(true));
            assert!(a == b);
        }
        // Dequantize: AVX2-compiled lanes vs one block at a time, on the blocks and on random bytes (NaN/inf d).
        let raw: Vec<u8> = (0..BYTES * 500).map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for bytes in [&b, &raw] {
            let n = bytes.len() / BYTES * 32;
            let (mut fa, mut fb) = (vec![0f32; n], vec![0f32; n]);
            BlockQ5_0::dequantize_blocks(bytes, &mut fa);
            for (x, y) in bytes.chunks_exact(BYTES).zip(fb.chunks_exact_mut(32)) {
                BlockQ5_0::from_bytes(x.try_into().unwrap()).dequantize(y.try_into().unwrap());
            }
            assert!(fa.iter().zip(&fb).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
    }

    #[test]
    fn weighted_lanes_equal_scalar() {
        // 51 blocks: 6 full sets of 8 lanes and a short one.
        let mut src = crate::quant::search_symmetric::test_inputs::superblocks(7);
        src.truncate(51 * 32);
        let w = crate::quant::search_symmetric::test_inputs::weights(src.len());
        let mut expected = vec![0u8; src.len() / 32 * BYTES];
        weighted_row_32(16, &src, &w, &mut expected, write_block);
        let mut out = vec![1u8; expected.len()];
        Weighted32 { nmax: 16, src: &src, qw: &w, dst: &mut out, write: write_block }.run();
        assert!(out == expected);
        #[cfg(target_arch = "x86_64")]
        {
            assert!(is_x86_feature_detected!("avx2"), "this test needs AVX2 to exercise the AVX2 path");
            let mut out = vec![1u8; expected.len()];
            let work = Weighted32 { nmax: 16, src: &src, qw: &w, dst: &mut out, write: write_block };
            assert!(crate::quant::x86::with_avx2(work).is_ok());
            assert!(out == expected);
        }
    }
}
