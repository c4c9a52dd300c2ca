//! q6_K: super-blocks of 256 weights in 16 groups of 16, `x = d * scales[g] * (q - 32)` with 6-bit codes `q`,
//! signed 8-bit group scales and one f16 super-block scale `d` (210 bytes, 6.5625 bits per weight).
//!
//! Reproduces ggml's `quantize_row_q6_K_ref` (no importance matrix), `quantize_row_q6_K_impl` (with one: the
//! weights go straight into `make_qx_quants`, no `sigma2` term) and `dequantize_row_q6_K`.
//!
//! The algorithm: each group's scale comes from `make_qx_quants(16, 32, …, rmse_type 1)`; the scale of largest
//! magnitude (first one, sign kept) gives `iscale = -128 / max_scale`, `d = 1/iscale` stored as f16 and the group
//! scales `min(127, nearest_int(iscale * scale))`; then every group whose `d16 * sc` is non-zero is re-coded as
//! `nearest_int(x / (d16 * sc))` clamped to -32..=31; groups with `d16 * sc == 0` keep their search codes.
//!
//! **Traps.** A block whose scales are all below `GROUP_MAX_EPS` is all zero bytes (the codes are not written).
//! An all-zero group's codes are 0, not 32. `d16 * sc` uses the f16-rounded `d` (a NaN product is not zero in C
//! and re-codes the group). The division `x / d` is a true division, not a multiplication by an inverse.
//! `(int8_t)` of the scale and the dequantize product `(d * sc) * q` follow C's evaluation order.
//!
//! **Speed.** [`Quantize::quantize_blocks`] runs the 16 group searches of a block in lanes, 8 at a time
//! (`make_qx_quants_x8`: AVX2 when available), the rest compiled for AVX2 too; [`BlockQ6K::quantize`] is the
//! scalar definition the tests compare it with.

use super::float::{f16_bits_to_f32, f32_to_f16_bits};
use super::search_symmetric::{
    groups_to_lanes, lanes_to_groups, make_qx_quants, make_qx_quants_x8, nearest, recode_groups16, signed_max,
    GROUP_MAX_EPS,
};
use super::{all_finite, run_lanes, BlockFormat, LaneWork, Quantize};
use crate::GgmlType;

/// Elements per k-quant super-block (`QK_K`).
pub const QK_K: usize = 256;
/// Bytes of one q6_K block.
const BYTES: usize = 210;

/// One q6_K block as ggml lays it out (`block_q6_K`): low 4 bits of the codes, high 2 bits, group scales, `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ6K {
    /// Low nibbles: for each half `h` of 128 values, byte `64h + l` holds values `l` (low) and `l + 64` (high),
    /// byte `64h + 32 + l` holds values `l + 32` and `l + 96` (`l` in 0..32, values counted within the half).
    pub ql: [u8; QK_K / 2],
    /// High 2 bits: byte `32h + l` holds those of values `l`, `l + 32`, `l + 64`, `l + 96` of half `h` in bits
    /// 0-1, 2-3, 4-5, 6-7.
    pub qh: [u8; QK_K / 4],
    /// The 16 group scales.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale, as f16 bits.
    pub d: u16,
}

impl BlockQ6K {
    /// Reads a block from its 210 on-disk bytes.
    pub fn from_bytes(b: &[u8; BYTES]) -> BlockQ6K {
        let mut out = BlockQ6K { ql: [0; 128], qh: [0; 64], scales: [0; 16], d: u16::from_le_bytes([b[208], b[209]]) };
        out.ql.copy_from_slice(&b[..128]);
        out.qh.copy_from_slice(&b[128..192]);
        for (s, &v) in out.scales.iter_mut().zip(&b[192..208]) {
            *s = v as i8;
        }
        out
    }

    /// The block's 210 on-disk bytes.
    pub fn to_bytes(&self) -> [u8; BYTES] {
        let mut b = [0u8; BYTES];
        self.write(&mut b);
        b
    }

    /// Writes the block's 210 bytes into `b`.
    #[inline(always)]
    fn write(&self, b: &mut [u8]) {
        b[..128].copy_from_slice(&self.ql);
        b[128..192].copy_from_slice(&self.qh);
        for (o, &s) in b[192..208].iter_mut().zip(&self.scales) {
            *o = s as u8;
        }
        b[208..210].copy_from_slice(&self.d.to_le_bytes());
    }

    /// One block of ggml's `quantize_row_q6_K_ref` (`weights` None) or `quantize_row_q6_K_impl` (`weights` the
    /// block's 256 importance weights), scalar. The values should be finite.
    pub fn quantize(x: &[f32; QK_K], weights: Option<&[f32; QK_K]>) -> BlockQ6K {
        let mut codes = [0u8; QK_K];
        let mut scales = [0.0f32; QK_K / 16];
        for (g, s) in scales.iter_mut().enumerate() {
            let r = 16 * g..16 * g + 16;
            *s = make_qx_quants(32, &x[r.clone()], weights.map(|w| &w[r.clone()]), &mut codes[r]);
        }
        BlockQ6K::finish(x, &scales, &mut codes)
    }

    /// The part after the group searches: super-block scale, group scales, re-coding, packing.
    #[inline(always)]
    fn finish(x: &[f32; QK_K], scales: &[f32; QK_K / 16], codes: &mut [u8; QK_K]) -> BlockQ6K {
        let (max_scale, max_abs) = signed_max(scales);
        let mut out = BlockQ6K { ql: [0; 128], qh: [0; 64], scales: [0; 16], d: f32_to_f16_bits(0.0) };
        if max_abs < GROUP_MAX_EPS {
            return out;
        }
        let iscale = -128.0 / max_scale;
        out.d = f32_to_f16_bits(1.0 / iscale);
        for (o, &s) in out.scales.iter_mut().zip(scales) {
            *o = nearest(iscale * s).min(127) as i8;
        }
        let d = f16_bits_to_f32(out.d);
        recode_groups16(x, &out.scales.map(|sc| d * sc as f32), 32, codes);
        for h in 0..2 {
            let (c, ql, qh) = (&codes[128 * h..128 * h + 128], &mut out.ql[64 * h..64 * h + 64], &mut out.qh[32 * h..]);
            for l in 0..32 {
                let (q1, q2, q3, q4) = (c[l], c[l + 32], c[l + 64], c[l + 96]);
                ql[l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                ql[l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                qh[l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
        out
    }

    /// One block of ggml's `dequantize_row_q6_K`: `y = (d * sc) * (q - 32)` with `d` widened from f16.
    pub fn dequantize(&self, y: &mut [f32; QK_K]) {
        dequantize_bytes(&self.to_bytes(), y);
    }
}

/// `dequantize_row_q6_K` of one block straight from its bytes.
#[inline(always)]
fn dequantize_bytes(b: &[u8], y: &mut [f32]) {
    let d = f16_bits_to_f32(u16::from_le_bytes([b[208], b[209]]));
    let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
    for h in 0..2 {
        let (ql, qh, sc, y) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..], &mut y[128 * h..]);
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// The lane version of [`BlockQ6K::quantize`] for one block: the 16 group searches run in lanes, 8 at a time.
#[inline(always)]
fn quantize_block_lanes(x: &[f32], weights: Option<&[f32]>, dst: &mut [u8]) {
    let x: &[f32; QK_K] = x.try_into().expect("one whole block");
    let xt = groups_to_lanes(x);
    let mut wt = xt.map(|half| half.map(|row| row.map(|v| v * v)));
    if let Some(w) = weights {
        wt = groups_to_lanes(w);
    }
    let mut ct = [[[0u8; 8]; 16]; 2];
    let mut scales = [0.0f32; QK_K / 16];
    for h in 0..2 {
        scales[8 * h..8 * h + 8].copy_from_slice(&make_qx_quants_x8(32, &xt[h], &wt[h], &mut ct[h]));
    }
    let mut codes = [0u8; QK_K];
    lanes_to_groups(&ct, &mut codes);
    BlockQ6K::finish(x, &scales, &mut codes).write(dst);
}

/// Lane work: `quantize_row_q6_K_ref` over whole blocks (`weights` None; returns false at the first block with
/// a non-finite value) or `quantize_row_q6_K_impl` over one row (`weights` Some; the values are finite).
struct QuantizeLanes<'a> {
    src: &'a [f32],
    weights: Option<&'a [f32]>,
    dst: &'a mut [u8],
}

impl LaneWork for QuantizeLanes<'_> {
    type Output = bool;

    #[inline(always)]
    fn run(self) -> bool {
        for (b, (x, y)) in self.src.chunks_exact(QK_K).zip(self.dst.chunks_exact_mut(BYTES)).enumerate() {
            let w = self.weights.map(|w| &w[b * QK_K..(b + 1) * QK_K]);
            if w.is_none() && !all_finite(x) {
                return false;
            }
            quantize_block_lanes(x, w, y);
        }
        true
    }
}

impl BlockFormat for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6_K;

    /// See [`BlockQ6K::dequantize`].
    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        dequantize_bytes(src, dst);
    }
}

impl Quantize for BlockQ6K {
    const TAKES_IMATRIX: bool = true;

    /// See [`BlockQ6K::quantize`] (without weights).
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        BlockQ6K::quantize(src.try_into().expect("one whole block"), None).write(dst);
    }

    /// `quantize_row_q6_K_ref` with the group searches in lanes (AVX2 when available; same bytes).
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        run_lanes(QuantizeLanes { src, weights: None, dst })
    }

    /// `quantize_row_q6_K_impl` with the group searches in lanes (AVX2 when available; same bytes).
    fn quantize_row_weighted(src: &[f32], weights: &[f32], dst: &mut [u8]) {
        run_lanes(QuantizeLanes { src, weights: Some(weights), dst });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::search_symmetric::test_inputs::{per_superblock, superblocks, weights};

    fn scalar_blocks(src: &[f32], weights: Option<&[f32]>) -> Vec<u8> {
        per_superblock(src, weights, |x, w| BlockQ6K::quantize(x, w).to_bytes())
    }

    #[test]
    fn golden_exact_grid_block() {
        // Every group holds -16..=-1: max = -16 (the first), iscale = -32/-16 = 2, l = 2x in -32..=-2, an exact
        // fit: scale = sumlx/suml2 = 1/2 (sum w*x*2x / sum w*4x^2); no candidate can beat an exact fit. All scales
        // 0.5: max_scale = 0.5, iscale = -256, d = -1/256 (f16 0x9C00), sc = nearest(-256*0.5) = -128 (min 127
        // keeps it). d*sc = 0.5, re-coding x/0.5 = 2x again: codes 2x + 32 = 0, 2, ..., 30.
        let mut x = [0.0f32; QK_K];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (i % 16) as f32 - 16.0;
        }
        let b = BlockQ6K::quantize(&x, None);
        assert_eq!(b.d, 0x9C00);
        assert_eq!(b.scales, [-128; 16]);
        let codes: Vec<u8> = (0..16u8).map(|i| 2 * i).collect();
        // Codes < 32: high bits 0 except the top bit 16 of codes 16..=30 (bit 4 set): q >> 4 is 1 for i >= 8.
        for h in 0..2 {
            for l in 0..32 {
                let c = |e: usize| codes[(128 * h + e) % 16];
                assert_eq!(b.ql[64 * h + l], (c(l) & 0xF) | ((c(l + 64) & 0xF) << 4));
                assert_eq!(
                    b.qh[32 * h + l],
                    (c(l) >> 4) | ((c(l + 32) >> 4) << 2) | ((c(l + 64) >> 4) << 4) | ((c(l + 96) >> 4) << 6)
                );
            }
        }
        let mut y = [0.0f32; QK_K];
        b.dequantize(&mut y);
        // d16 * sc = (-1/256) * -128 = 0.5; (2x + 32 - 32) * 0.5 = x.
        assert_eq!(y, x);
        // Lanes agree.
        let mut out = [0u8; BYTES];
        assert!(BlockQ6K::quantize_blocks(&x, &mut out));
        assert_eq!(out, b.to_bytes());
    }

    #[test]
    fn golden_all_zero_and_tiny_blocks_are_zero_bytes() {
        for v in [0.0f32, -0.0, 1e-16, -3e-30] {
            let mut x = [v; QK_K];
            x[17] = -v;
            assert_eq!(BlockQ6K::quantize(&x, None).to_bytes(), [0u8; BYTES]);
        }
    }

    #[test]
    fn golden_one_hot_block() {
        // One value 3 at index 40 (group 2). Its search: max = 3, iscale = -32/3, l = nearest(-32.000001) = -32,
        // the zeros 0; w = 9 so sumlx = 9*3*-32 = -864, suml2 = 9*1024, scale = -0.09375 (-3/32) and best = 81.
        // With one non-zero value every candidate gives the same ratio sumlx^2/suml2 = 81 (a tie, not taken).
        // The other groups are all zero: scale 0, codes 0. max_scale = -3/32: iscale = -128/(-3/32) = 1365.3334,
        // d = 1/iscale -> f16 3/4096 = 1.5 * 2^-11 (0x1200); sc[2] = nearest(-128.00000x) = -128, the others 0
        // (those groups keep codes 0). Group 2 re-coded with d16*sc = -0.09375: 3 / -0.09375 = -32 -> code 0;
        // zeros -> code 32.
        let mut x = [0.0f32; QK_K];
        x[40] = 3.0;
        let b = BlockQ6K::quantize(&x, None);
        assert_eq!(b.d, 0x1200);
        let mut sc = [0i8; 16];
        sc[2] = -128;
        assert_eq!(b.scales, sc);
        // Group 2 is values 32..48 of half 0: codes 32 except value 40 (code 0). Values 32..48 sit in ql[32 + l]
        // low nibbles (l = 0..16) and qh bits 2-3 of byte l; code 32 = 0b10_0000: nibble 0, high bits 2.
        let mut qh = [0u8; 64];
        qh[..16].fill(2 << 2);
        qh[8] = 0;
        assert_eq!(b.ql, [0u8; 128]);
        assert_eq!(b.qh, qh);
    }

    #[test]
    fn lanes_equal_scalar_on_random_and_edge_blocks() {
        let src = superblocks(60);
        let expected = scalar_blocks(&src, None);
        let mut out = vec![0u8; expected.len()];
        assert!(QuantizeLanes { src: &src, weights: None, dst: &mut out }.run());
        assert!(out == expected, "portable lanes");
        let weights = weights(src.len());
        let expected = scalar_blocks(&src, Some(&weights));
        let mut out = vec![0u8; expected.len()];
        assert!(QuantizeLanes { src: &src, weights: Some(&weights), dst: &mut out }.run());
        assert!(out == expected, "portable weighted lanes");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_lanes_equal_scalar() {
        use crate::quant::x86::with_avx2;
        assert!(is_x86_feature_detected!("avx2"), "this test needs AVX2 to exercise the AVX2 path");
        let src = superblocks(60);
        let expected = scalar_blocks(&src, None);
        let mut out = vec![0u8; expected.len()];
        assert!(matches!(with_avx2(QuantizeLanes { src: &src, weights: None, dst: &mut out }), Ok(true)));
        assert!(out == expected);
        let weights = weights(src.len());
        let expected = scalar_blocks(&src, Some(&weights));
        assert!(matches!(with_avx2(QuantizeLanes { src: &src, weights: Some(&weights), dst: &mut out }), Ok(true)));
        assert!(out == expected);
        // Dequantize of random bytes (NaN/inf scales included), AVX2-compiled vs plain.
        let raw: Vec<u8> = (0..BYTES * 300).map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut a = vec![0f32; 300 * QK_K];
        let mut b = a.clone();
        assert!(with_avx2(crate::quant::DequantizeBlocks::<BlockQ6K> {
            src: &raw,
            dst: &mut a,
            block: std::marker::PhantomData
        })
        .is_ok());
        for (x, y) in raw.chunks_exact(BYTES).zip(b.chunks_exact_mut(QK_K)) {
            BlockQ6K::from_bytes(x.try_into().unwrap()).dequantize(y.try_into().unwrap());
        }
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}
