//! q3_K: super-blocks of 256 weights in 16 groups of 16, `x = d * (sc[g] - 32) * (q - 4)` with 3-bit codes `q`,
//! 6-bit group scales and one f16 super-block scale `d` (110 bytes, 3.4375 bits per weight).
//!
//! Reproduces ggml's `quantize_row_q3_K_ref` (no importance matrix), `quantize_row_q3_K_impl` (with one) and
//! `dequantize_row_q3_K`.
//!
//! - Without weights: each group's scale comes from `make_q3_quants(16, 4, …, do_rmse)`; the scale of largest
//!   magnitude (first one, sign kept) gives `iscale = -32 / max_scale`, the 6-bit scales
//!   `clamp((int8_t)nearest_int(iscale * scale), -32, 31) + 32` and `d = f16(1/iscale)`; if every scale is 0,
//!   `d = 0` and the scale bytes stay 0 (each group then reads as scale -32).
//! - With weights: `sigma2 = 2*sum(x*x)/256` over the super-block (one sequential sum), value weights
//!   `qw * sqrtf(sigma2 + x*x)`, group scales from `make_qx_quants(16, 4, …, rmse_type 1, weights)`, and the 6-bit
//!   scales and `d` from `make_qx_quants(16, 32, scales, …, rmse_type 1, sum of each group's weights)`.
//! - Then every group whose `d16 * (sc - 32)` is non-zero is re-coded as `clamp(nearest_int(x / (d16 * (sc - 32))),
//!   -4, 3) + 4` (a true division); groups with a zero product keep their search codes (0 for an all-zero group).
//!
//! Layout (`block_q3_K`): `hmask` (32 bytes: bit `e / 32` of byte `e % 32` is bit 2 of the code of value `e`),
//! `qs` (64 bytes: for each half `n` of 128 values, byte `32n + l` holds the low 2 bits of values `l`, `l + 32`,
//! `l + 64`, `l + 96` of the half in bits 0-1, 2-3, 4-5, 6-7), `scales` (12 bytes: low nibbles of groups 0-7 in
//! bytes 0-7, of groups 8-15 in the high halves of bytes 0-7; the high 2 bits of group `j` in bits `2*(j/4)` of
//! byte `8 + j%4`), `d` (f16).
//!
//! **Speed.** The row quantizers run the group searches in lanes (`make_q3_quants_blocks`, the 16 groups of a block;
//! with weights `make_qx_quants_x8`, 8 groups at a time, and the scale search of 8 super-blocks at a time), AVX2
//! when available;
//! [`BlockQ3K::quantize`] is the scalar definition the tests compare them with.

use super::float::{f16_bits_to_f32, f32_to_f16_bits};
use super::search_symmetric::{
    groups_to_lanes, make_q3_quants, make_q3_quants_blocks, make_qx_quants, make_qx_quants_x8, nearest,
    recode_groups16, signed_max,
};
use super::{all_finite, dequantize_each_block, prefetch, run_lanes, BlockFormat, LaneWork, Quantize};
use crate::GgmlType;

/// Elements per super-block.
const QK_K: usize = 256;
/// Bytes of one q3_K block.
const BYTES: usize = 110;
/// Offsets of the fields in a block.
const QS: usize = 32;
const SCALES: usize = 96;
const D: usize = 108;

/// One q3_K block as ggml lays it out (`block_q3_K`; see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ3K {
    /// Bit 2 of every code.
    pub hmask: [u8; QK_K / 8],
    /// Low 2 bits of every code.
    pub qs: [u8; QK_K / 4],
    /// The 16 6-bit group scales, packed.
    pub scales: [u8; 12],
    /// Super-block scale, as f16 bits.
    pub d: u16,
}

impl BlockQ3K {
    /// Reads a block from its 110 on-disk bytes.
    pub fn from_bytes(b: &[u8; BYTES]) -> BlockQ3K {
        let mut out =
            BlockQ3K { hmask: [0; 32], qs: [0; 64], scales: [0; 12], d: u16::from_le_bytes([b[D], b[D + 1]]) };
        out.hmask.copy_from_slice(&b[..QS]);
        out.qs.copy_from_slice(&b[QS..SCALES]);
        out.scales.copy_from_slice(&b[SCALES..D]);
        out
    }

    /// The block's 110 on-disk bytes.
    pub fn to_bytes(&self) -> [u8; BYTES] {
        let mut b = [0u8; BYTES];
        self.write(&mut b);
        b
    }

    #[inline(always)]
    fn write(&self, b: &mut [u8]) {
        b[..QS].copy_from_slice(&self.hmask);
        b[QS..SCALES].copy_from_slice(&self.qs);
        b[SCALES..D].copy_from_slice(&self.scales);
        b[D..D + 2].copy_from_slice(&self.d.to_le_bytes());
    }

    /// One block of ggml's `quantize_row_q3_K_ref` (`weights` None) or `quantize_row_q3_K_impl` (`weights` the
    /// block's 256 importance weights), scalar. The values should be finite.
    pub fn quantize(x: &[f32; QK_K], weights: Option<&[f32; QK_K]>) -> BlockQ3K {
        let mut codes = [0u8; QK_K];
        let mut scales = [0.0f32; 16];
        let (ls, d) = match weights {
            None => {
                for (g, s) in scales.iter_mut().enumerate() {
                    *s = make_q3_quants(4, &x[16 * g..16 * g + 16], &mut codes[16 * g..16 * g + 16]);
                }
                scale_codes(&scales)
            }
            Some(qw) => {
                let sigma2 = block_sigma2(x);
                let mut sw = [0.0f32; 16];
                for (g, (s, sw)) in scales.iter_mut().zip(&mut sw).enumerate() {
                    let r = 16 * g..16 * g + 16;
                    let w: [f32; 16] = std::array::from_fn(|i| value_weight(qw[16 * g + i], sigma2, x[16 * g + i]));
                    *sw = w.iter().fold(0.0f32, |a, &v| a + v);
                    *s = make_qx_quants(4, &x[r.clone()], Some(&w), &mut codes[r]);
                }
                let mut ls = [0u8; 16];
                let d = make_qx_quants(32, &scales, Some(&sw), &mut ls);
                (ls, f32_to_f16_bits(d))
            }
        };
        finish(x, &ls, d, |g, i| codes[16 * g + i])
    }

    /// One block of ggml's `dequantize_row_q3_K`.
    pub fn dequantize(&self, y: &mut [f32; QK_K]) {
        dequantize_bytes(&self.to_bytes(), y);
    }
}

/// `sigma2 = 2*sum(x*x)/256` of `quantize_row_q3_K_impl`, the sum sequential over the super-block.
#[inline(always)]
fn block_sigma2(x: &[f32]) -> f32 {
    let mut sumx2 = 0.0f32;
    for &v in x {
        sumx2 += v * v;
    }
    2.0 * sumx2 / QK_K as f32
}

/// The weight of one value in `quantize_row_q3_K_impl`: `qw * sqrtf(sigma2 + x*x)`.
#[inline(always)]
fn value_weight(qw: f32, sigma2: f32, x: f32) -> f32 {
    qw * (sigma2 + x * x).sqrt()
}

/// `quantize_row_q3_K_ref`'s 6-bit scales (0..=63) and f16 `d` from the 16 group scales.
#[inline(always)]
fn scale_codes(scales: &[f32; 16]) -> ([u8; 16], u16) {
    let (max_scale, _) = signed_max(scales);
    if max_scale == 0.0 {
        // C leaves the scale bytes 0 (each reads as -32) with d = 0.
        return ([0; 16], f32_to_f16_bits(0.0));
    }
    let iscale = -32.0 / max_scale;
    let ls = scales.map(|s| ((nearest(iscale * s) as i8).clamp(-32, 31) + 32) as u8);
    (ls, f32_to_f16_bits(1.0 / iscale))
}

/// The common end of both quantizers: packs the 6-bit scales `ls`, re-codes every group whose `d16 * (ls - 32)`
/// is non-zero, takes the search's codes (`search_code(group, i)`) for the others, packs the codes. Only those
/// few groups are read (the search may have left its codes in lanes; the others' search codes are discarded).
#[inline(always)]
fn finish(x: &[f32], ls: &[u8; 16], d: u16, search_code: impl Fn(usize, usize) -> u8) -> BlockQ3K {
    let mut out = BlockQ3K { hmask: [0; 32], qs: [0; 64], scales: [0; 12], d };
    // Low nibbles: groups j and j + 8 share byte j. High 2 bits: group k + 4t in bits 2t of byte 8 + k.
    for j in 0..8 {
        out.scales[j] = (ls[j] & 0xF) | ((ls[j + 8] & 0xF) << 4);
    }
    for k in 0..4 {
        out.scales[8 + k] = (0..4).fold(0, |a, t| a | ((ls[k + 4 * t] >> 4) << (2 * t)));
    }
    let d = f16_bits_to_f32(d);
    let group_d = ls.map(|l| d * (l as i32 - 32) as f32);
    let mut codes = [0u8; QK_K];
    for (g, (group, &dg)) in codes.chunks_exact_mut(16).zip(&group_d).enumerate() {
        if dg == 0.0 {
            for (i, c) in group.iter_mut().enumerate() {
                *c = search_code(g, i);
            }
        }
    }
    recode_groups16(x, &group_d, 4, &mut codes);
    // Value e = 32r + m: bit r of hmask[m]. Written with m outermost so that the compiler vectorizes over m
    // (8 contiguous loads of 32 codes); the r-outer form was turned into byte gathers.
    for (m, h) in out.hmask.iter_mut().enumerate() {
        *h = (0..8).fold(0, |a, r| a | (((codes[32 * r + m] >> 2) & 1) << r));
    }
    for n in 0..2 {
        for l in 0..32 {
            let c = |k: usize| codes[128 * n + l + 32 * k] & 3;
            out.qs[32 * n + l] = c(0) | (c(1) << 2) | (c(2) << 4) | (c(3) << 6);
        }
    }
    out
}

/// `dequantize_row_q3_K` of one block straight from its bytes: `y = (d * (sc - 32)) * (q - 4)`.
#[inline(always)]
fn dequantize_bytes(b: &[u8], y: &mut [f32]) {
    let d = f16_bits_to_f32(u16::from_le_bytes([b[D], b[D + 1]]));
    let hmask: &[u8; 32] = b[..QS].try_into().expect("block");
    let sc: &[u8; 12] = b[SCALES..D].try_into().expect("block");
    for (j, yg) in y.chunks_exact_mut(16).enumerate() {
        // Group j: half n = j / 8, bit pair k = (j % 8) / 2 of the qs bytes 32n + 16(j % 2) + l, hmask bit 4n + k.
        let low = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
        let dl = d * (((low | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32) as f32);
        let (n, k, half) = (j / 8, (j % 8) / 2, j % 2);
        let q: &[u8; 16] = b[QS + 32 * n + 16 * half..][..16].try_into().expect("block");
        let h: &[u8; 16] = hmask[16 * half..16 * half + 16].try_into().expect("block");
        let yg: &mut [f32; 16] = yg.try_into().expect("group");
        for l in 0..16 {
            let low_bits = ((q[l] >> (2 * k)) & 3) as i32;
            let high = ((h[l] >> (4 * n + k)) & 1) as i32;
            yg[l] = dl * (low_bits - 4 + 4 * high) as f32;
        }
    }
}

/// Lane work: `quantize_row_q3_K_ref` over whole blocks (false at the first block with a non-finite value).
struct QuantizeLanes<'a> {
    src: &'a [f32],
    dst: &'a mut [u8],
}

impl LaneWork for QuantizeLanes<'_> {
    type Output = bool;

    #[inline(always)]
    fn run(self) -> bool {
        // One super-block at a time: its 16 groups in two independent chains (more blocks at once measured
        // slower: every lane then waits for the slowest group's refinement passes).
        for (b, (x, y)) in self.src.chunks_exact(QK_K).zip(self.dst.chunks_exact_mut(BYTES)).enumerate() {
            if let Some(next) = self.src.get((b + 1) * QK_K..(b + 2) * QK_K) {
                prefetch(next);
            }
            if !all_finite(x) {
                return false;
            }
            quantize_ref_blocks::<1>(x, y);
        }
        true
    }
}

/// `quantize_row_q3_K_ref` of `S` super-blocks (values `x`, bytes `y`) with their group searches in lanes.
#[inline(always)]
fn quantize_ref_blocks<const S: usize>(x: &[f32], y: &mut [u8]) {
    let xt: [[[[f32; 8]; 16]; 2]; S] = std::array::from_fn(|b| groups_to_lanes(&x[b * QK_K..(b + 1) * QK_K]));
    let mut ct = [[[[0u8; 8]; 16]; 2]; S];
    let scales = make_q3_quants_blocks(4, &xt, &mut ct);
    for (b, (x, y)) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(BYTES)).enumerate() {
        let (ls, d) = scale_codes(&scales[b]);
        finish(x, &ls, d, |g, i| ct[b][g / 8][i][g % 8]).write(y);
    }
}

/// Lane work: `quantize_row_q3_K_impl` over one row: 8 super-blocks at a time, their group searches 8 groups at a
/// time in lanes, then their scale searches with one super-block per lane (a short last set is padded with zero
/// blocks whose results are dropped).
struct WeightedLanes<'a> {
    src: &'a [f32],
    qw: &'a [f32],
    dst: &'a mut [u8],
}

impl LaneWork for WeightedLanes<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let sets = self.src.chunks(8 * QK_K).zip(self.qw.chunks(8 * QK_K)).zip(self.dst.chunks_mut(8 * BYTES));
        for ((xs, qws), ys) in sets {
            // scales[i][b] and sw[i][b]: group i of super-block b (the lanes of the scale search).
            let mut scales = [[0.0f32; 8]; 16];
            let mut sw = [[0.0f32; 8]; 16];
            let mut codes = [[[[0u8; 8]; 16]; 2]; 8];
            for (b, (x, qw)) in xs.chunks_exact(QK_K).zip(qws.chunks_exact(QK_K)).enumerate() {
                let sigma2 = block_sigma2(x);
                let mut w = [0.0f32; QK_K];
                for ((w, &q), &v) in w.iter_mut().zip(qw).zip(x) {
                    *w = value_weight(q, sigma2, v);
                }
                for (g, wg) in w.chunks_exact(16).enumerate() {
                    sw[g][b] = wg.iter().fold(0.0f32, |a, &v| a + v);
                }
                let (xt, wt) = (groups_to_lanes(x), groups_to_lanes(&w));
                for h in 0..2 {
                    let s = make_qx_quants_x8(4, &xt[h], &wt[h], &mut codes[b][h]);
                    for (k, &s) in s.iter().enumerate() {
                        scales[8 * h + k][b] = s;
                    }
                }
            }
            let mut ls = [[0u8; 8]; 16];
            let d = make_qx_quants_x8(32, &scales, &sw, &mut ls);
            for (b, (x, y)) in xs.chunks_exact(QK_K).zip(ys.chunks_exact_mut(BYTES)).enumerate() {
                let lsb: [u8; 16] = std::array::from_fn(|g| ls[g][b]);
                finish(x, &lsb, f32_to_f16_bits(d[b]), |g, i| codes[b][g / 8][i][g % 8]).write(y);
            }
        }
    }
}

impl BlockFormat for BlockQ3K {
    const TYPE: GgmlType = GgmlType::Q3_K;

    /// See [`BlockQ3K::dequantize`].
    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        dequantize_bytes(src, dst);
    }

    /// `dequantize_row_q3_K`; AVX2 when available (same values).
    fn dequantize_blocks(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::x86::q3_k_dequantize(src, dst) {
            return;
        }
        dequantize_each_block::<Self>(src, dst)
    }
}

impl Quantize for BlockQ3K {
    const TAKES_IMATRIX: bool = true;

    /// See [`BlockQ3K::quantize`] (without weights).
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        BlockQ3K::quantize(src.try_into().expect("one whole block"), None).write(dst);
    }

    /// `quantize_row_q3_K_ref` with the group searches in lanes (AVX2 when available; same bytes).
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        run_lanes(QuantizeLanes { src, dst })
    }

    /// `quantize_row_q3_K_impl` with the searches in lanes (AVX2 when available; same bytes).
    fn quantize_row_weighted(src: &[f32], weights: &[f32], dst: &mut [u8]) {
        run_lanes(WeightedLanes { src, qw: weights, dst })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::search_symmetric::test_inputs::{per_superblock, superblocks, weights};

    fn scalar_blocks(src: &[f32], weights: Option<&[f32]>) -> Vec<u8> {
        per_superblock(src, weights, |x, w| BlockQ3K::quantize(x, w).to_bytes())
    }

    #[test]
    fn golden_exact_grid_block() {
        // Every group holds -4..=3 twice: max = -4 (the first), iscale = -4/-4 = 1, l = x (exact fit), w = x^2,
        // scale = sum w*x*x / sum w*x*x = 1; no single-code change can improve an exact fit. All scales 1:
        // max_scale = 1, iscale = -32, d = -1/32 (f16 0xA800), ls = nearest(-32) = -32 -> clamp -> +32 = 0, so
        // sc - 32 = -32 and d16 * -32 = 1: re-coding x / 1 = x again, codes x + 4 = 0..=7.
        let mut x = [0.0f32; QK_K];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (i % 8) as f32 - 4.0;
        }
        let b = BlockQ3K::quantize(&x, None);
        assert_eq!(b.d, 0xA800);
        assert_eq!(b.scales, [0; 12]);
        // Codes c = (e % 8): bit 2 set for e % 8 >= 4; low bits e % 4.
        for e in 0..QK_K {
            let c = (e % 8) as u8;
            assert_eq!((b.hmask[e % 32] >> (e / 32)) & 1, c >> 2, "hmask of {e}");
            let (n, l, k) = (e / 128, e % 32, (e % 128) / 32);
            assert_eq!((b.qs[32 * n + l] >> (2 * k)) & 3, c & 3, "qs of {e}");
        }
        let mut y = [0.0f32; QK_K];
        b.dequantize(&mut y);
        assert_eq!(y, x);
        let mut out = [0u8; BYTES];
        assert!(BlockQ3K::quantize_blocks(&x, &mut out));
        assert_eq!(out, b.to_bytes());
    }

    #[test]
    fn golden_all_zero_block() {
        // All groups zero: scales 0, codes 0 (not 4); max_scale = 0: scale bytes 0, d = 0; every group reads
        // d16 * -32 = -0, not re-coded. hmask 0, qs 0.
        assert_eq!(BlockQ3K::quantize(&[0.0; QK_K], None).to_bytes(), [0u8; BYTES]);
        let mut y = [1.0f32; QK_K];
        BlockQ3K::from_bytes(&[0u8; BYTES]).dequantize(&mut y);
        // (0 * -32) * (0 - 4) = -0 * -4 = +0.
        assert!(y.iter().all(|v| v.to_bits() == 0));
    }

    #[test]
    fn golden_dequantize_scale_layout() {
        // d = 1 (f16 0x3C00); group j's 6-bit scale 33 + j (so sc - 32 = 1 + j), packed by hand as the module docs
        // describe; every code 7 (hmask bits set, low bits 3): y = (1 * (1 + j)) * (3 - 0) for group j.
        let mut b = [0u8; BYTES];
        b[..QS].fill(0xFF);
        b[QS..SCALES].fill(0xFF);
        for j in 0..16usize {
            let l = 33 + j as u8;
            if j < 8 {
                b[SCALES + j] |= l & 0xF;
            } else {
                b[SCALES + j - 8] |= (l & 0xF) << 4;
            }
            b[SCALES + 8 + j % 4] |= (l >> 4) << (2 * (j / 4));
        }
        b[D..].copy_from_slice(&0x3C00u16.to_le_bytes());
        let mut y = [0.0f32; QK_K];
        BlockQ3K::from_bytes(&b).dequantize(&mut y);
        for (e, v) in y.iter().enumerate() {
            assert_eq!(*v, (1 + e / 16) as f32 * 3.0, "value {e}");
        }
    }

    #[test]
    fn lanes_equal_scalar_on_random_and_edge_blocks() {
        let src = superblocks(61);
        let expected = scalar_blocks(&src, None);
        let mut out = vec![0u8; expected.len()];
        assert!(QuantizeLanes { src: &src, dst: &mut out }.run());
        assert!(out == expected, "portable lanes");
        let weights = weights(src.len());
        let expected = scalar_blocks(&src, Some(&weights));
        let mut out = vec![0u8; expected.len()];
        WeightedLanes { src: &src, qw: &weights, dst: &mut out }.run();
        assert!(out == expected, "portable weighted lanes");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_lanes_equal_scalar() {
        use crate::quant::x86::with_avx2;
        assert!(is_x86_feature_detected!("avx2"), "this test needs AVX2 to exercise the AVX2 path");
        let src = superblocks(61);
        let expected = scalar_blocks(&src, None);
        let mut out = vec![0u8; expected.len()];
        assert!(matches!(with_avx2(QuantizeLanes { src: &src, dst: &mut out }), Ok(true)));
        assert!(out == expected);
        let weights = weights(src.len());
        let expected = scalar_blocks(&src, Some(&weights));
        assert!(with_avx2(WeightedLanes { src: &src, qw: &weights, dst: &mut out }).is_ok());
        assert!(out == expected);
        let raw: Vec<u8> = (0..BYTES * 300).map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut a = vec![0f32; 300 * QK_K];
        let mut b = a.clone();
        assert!(crate::quant::x86::q3_k_dequantize(&raw, &mut a));
        for (x, y) in raw.chunks_exact(BYTES).zip(b.chunks_exact_mut(QK_K)) {
            BlockQ3K::from_bytes(x.try_into().unwrap()).dequantize(y.try_into().unwrap());
        }
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}
