//! q2_K: super-blocks of 256 weights in 16 sub-blocks of 16, `x = d * sc[j] * q - dmin * m[j]` with 2-bit codes
//! and 4-bit sub-block scales `sc` and mins `m`.
//!
//! **Layout** (`block_q2_K`, 84 bytes; note the f16 scales come last): `scales[16]` (scale code in the low nibble,
//! min code in the high nibble), `qs[64]` (for each 128 weights, 32 bytes: code `128h + 32k + i` in bits `2k..2k+2`
//! of byte `32h + i`), `d`, `dmin` (f16, little-endian).
//!
//! **Reproduces** `quantize_row_q2_K_ref` (per sub-block `make_qkx2_quants` with weights `|x|`, absolute errors,
//! `nmax` 3, candidates `-0.5 + 0.1 is`, `is = 0..=15`; scales and mins rounded to 4 bits against their maxima),
//! `quantize_row_q2_K_impl` (`make_qkx3_quants` with weights `qw * sqrt(mean x² + x²)`, then `make_qp_quants` with
//! `nmax` 15 for the scales and the mins) and `dequantize_row_q2_K`.
//!
//! **Traps.** The reference's 4-bit codes are not clamped: `nearest_int` is stored into the byte and the min code
//! OR-ed in shifted, wrapping as C's `uint8_t` does. A sub-block whose `d` is 0 keeps its search codes (the final
//! `nearest_int((x + dm) / d)` pass skips it). `d`/`dmin` are `+0` when the largest scale/min is not positive.

use super::float::{f16_bits_to_f32, f32_to_f16_bits};
use super::q4_k::padded;
use super::search_affine::{
    make_qkx_quants, make_qkx_quants_lanes, make_qp_quants, super_block_weights, transpose_in, Search,
};
use super::{nearest_int, run_lanes, BlockFormat, LaneWork, Quantize};
use crate::GgmlType;

/// Elements per super-block (`QK_K`).
const QK_K: usize = GgmlType::Q2_K.block_size();
/// Sub-blocks of 16 per super-block.
const SUB: usize = QK_K / 16;

/// One q2_K block as ggml lays it out (`block_q2_K`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ2K {
    /// Per sub-block: scale code (low nibble) and min code (high nibble).
    pub scales: [u8; SUB],
    /// The 256 codes, four per byte.
    pub qs: [u8; QK_K / 4],
    /// Super-block scale of the sub-block scales, as f16 bits.
    pub d: u16,
    /// Super-block scale of the sub-block mins, as f16 bits.
    pub dmin: u16,
}

/// `make_qkx2_quants` parameters of `quantize_row_q2_K_ref`.
const Q2K_SEARCH: Search = Search { nmax: 3, rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: true };

impl BlockQ2K {
    /// Reads a block from its 84 on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; 84]) -> BlockQ2K {
        BlockQ2K {
            scales: b[..16].try_into().expect("16 bytes"),
            qs: b[16..80].try_into().expect("64 bytes"),
            d: u16::from_le_bytes([b[80], b[81]]),
            dmin: u16::from_le_bytes([b[82], b[83]]),
        }
    }

    /// The block's 84 on-disk bytes.
    pub fn to_bytes(&self) -> [u8; 84] {
        let mut b = [0u8; 84];
        b[..16].copy_from_slice(&self.scales);
        b[16..80].copy_from_slice(&self.qs);
        b[80..82].copy_from_slice(&self.d.to_le_bytes());
        b[82..].copy_from_slice(&self.dmin.to_le_bytes());
        b
    }

    /// One super-block of `quantize_row_q2_K_ref`.
    pub fn quantize(x: &[f32; QK_K]) -> BlockQ2K {
        let mut l = [0u8; QK_K];
        let mut scales = [0f32; SUB];
        let mut mins = [0f32; SUB];
        let mut weights = [0f32; 16];
        for (j, (xs, l)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            for (w, &v) in weights.iter_mut().zip(xs) {
                *w = v.abs();
            }
            (scales[j], mins[j]) = make_qkx_quants(Q2K_SEARCH, xs, &weights, l);
        }
        BlockQ2K::from_fits(x, &scales, &mins, l)
    }

    /// The reference path after the sub-block searches: 4-bit scale and min codes against their maxima, then the
    /// codes recomputed.
    #[inline(always)]
    fn from_fits(x: &[f32; QK_K], scales: &[f32; SUB], mins: &[f32; SUB], l: [u8; QK_K]) -> BlockQ2K {
        let mut max_scale = 0.0f32;
        let mut max_min = 0.0f32;
        for j in 0..SUB {
            if scales[j] > max_scale {
                max_scale = scales[j];
            }
            if mins[j] > max_min {
                max_min = mins[j];
            }
        }
        let mut b = BlockQ2K { scales: [0; SUB], qs: [0; QK_K / 4], d: 0, dmin: 0 };
        if max_scale > 0.0 {
            let iscale = 15.0 / max_scale;
            for (sc, &s) in b.scales.iter_mut().zip(scales) {
                *sc = nearest_int(iscale * s) as u8;
            }
            b.d = f32_to_f16_bits(max_scale / 15.0);
        }
        if max_min > 0.0 {
            let iscale = 15.0 / max_min;
            for (sc, &m) in b.scales.iter_mut().zip(mins) {
                *sc |= (nearest_int(iscale * m) << 4) as u8;
            }
            b.dmin = f32_to_f16_bits(max_min / 15.0);
        }
        b.finish(x, l);
        b
    }

    /// One super-block of `quantize_row_q2_K_impl` with importance weights `qw` (one per element).
    pub fn quantize_weighted(x: &[f32; QK_K], qw: &[f32; QK_K]) -> BlockQ2K {
        let mut sum_x2 = 0.0f32;
        for &v in x {
            sum_x2 += v * v;
        }
        let sigma2 = sum_x2 / QK_K as f32;
        let mut l = [0u8; QK_K];
        let mut scales = [0f32; SUB];
        let mut mins = [0f32; SUB];
        let mut sw = [0f32; SUB];
        let mut weights = [0f32; 16];
        for (j, (xs, l)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            for ((w, &q), &v) in weights.iter_mut().zip(&qw[16 * j..16 * j + 16]).zip(xs) {
                *w = q * (sigma2 + v * v).sqrt();
            }
            for &w in &weights {
                sw[j] += w;
            }
            (scales[j], mins[j]) = make_qkx_quants(Search::weighted(3), xs, &weights, l);
        }
        BlockQ2K::from_weighted_fits(x, &scales, &mins, &sw, l)
    }

    /// The importance path after the sub-block searches: `make_qp_quants` for the scales and the mins, then the
    /// codes recomputed.
    #[inline(always)]
    fn from_weighted_fits(
        x: &[f32; QK_K],
        scales: &[f32; SUB],
        mins: &[f32; SUB],
        sw: &[f32; SUB],
        l: [u8; QK_K],
    ) -> BlockQ2K {
        let mut ls = [0u8; SUB];
        let mut lm = [0u8; SUB];
        let dm = make_qp_quants(15, scales, &mut ls, sw);
        let mm = make_qp_quants(15, mins, &mut lm, sw);
        let mut b = BlockQ2K { scales: [0; SUB], qs: [0; QK_K / 4], d: f32_to_f16_bits(dm), dmin: f32_to_f16_bits(mm) };
        for j in 0..SUB {
            b.scales[j] = ls[j] | (lm[j] << 4);
        }
        b.finish(x, l);
        b
    }

    /// The final pass of both paths: codes recomputed as `clamp(nearest_int((x + dm) / d), 0, 3)` in every
    /// sub-block whose `d` is non-zero, then packed.
    #[inline(always)]
    fn finish(&mut self, x: &[f32; QK_K], mut l: [u8; QK_K]) {
        let d16 = f16_bits_to_f32(self.d);
        let dmin16 = f16_bits_to_f32(self.dmin);
        for (j, (xs, l)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
            let d = d16 * (self.scales[j] & 0xF) as f32;
            if d == 0.0 {
                continue;
            }
            let dm = dmin16 * (self.scales[j] >> 4) as f32;
            for (q, &v) in l.iter_mut().zip(xs) {
                *q = nearest_int((v + dm) / d).clamp(0, 3) as u8;
            }
        }
        for (q, l) in self.qs.chunks_exact_mut(32).zip(l.chunks_exact(128)) {
            for i in 0..32 {
                q[i] = l[i] | (l[i + 32] << 2) | (l[i + 64] << 4) | (l[i + 96] << 6);
            }
        }
    }

    /// One super-block of `dequantize_row_q2_K`: `y = d*sc * q - dmin*m`.
    #[inline(always)]
    pub fn dequantize(&self, y: &mut [f32; QK_K]) {
        let d = f16_bits_to_f32(self.d);
        let min = f16_bits_to_f32(self.dmin);
        // Element 128h + 32k + 16half + i: bits 2k..2k+2 of byte 32h + 16half + i, sub-block 8h + 2k + half.
        for (s, y) in y.chunks_exact_mut(16).enumerate() {
            let (h, k, half) = (s / 8, (s / 2) % 4, s % 2);
            let sc = self.scales[s];
            let (dl, ml) = (d * (sc & 0xF) as f32, min * (sc >> 4) as f32);
            let q: &[u8; 16] = self.qs[32 * h + 16 * half..][..16].try_into().expect("16 bytes");
            let shift = 2 * k as u32;
            for (y, &b) in y.iter_mut().zip(q) {
                *y = dl * ((b as u32 >> shift) & 3) as f32 - ml;
            }
        }
    }
}

/// Super-blocks whose sub-block searches run side by side (32 sub-blocks of 16 in the lanes).
const SB: usize = 2;
/// Lanes of the vectorised searches.
const LANES: usize = SB * SUB;

/// `quantize_row_q2_K_ref` over whole super-blocks with the sub-block searches of [`SB`] super-blocks in lanes.
/// Same bytes as [`BlockQ2K::quantize`] block by block; false at the first group holding a non-finite value.
struct RefLanes<'a> {
    src: &'a [f32],
    dst: &'a mut [u8],
}

impl LaneWork for RefLanes<'_> {
    type Output = bool;

    #[inline(always)]
    fn run(self) -> bool {
        let mut pad = [0f32; SB * QK_K];
        for (x, y) in self.src.chunks(SB * QK_K).zip(self.dst.chunks_mut(SB * BlockQ2K::BLOCK_BYTES)) {
            if !super::all_finite(x) {
                return false;
            }
            let xt = transpose_in::<LANES, 16>(padded(x, &mut pad));
            let wt = xt.map(|row| row.map(f32::abs));
            let fits = make_qkx_quants_lanes(Q2K_SEARCH, &xt, &wt);
            for (s, (xb, yb)) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(BlockQ2K::BLOCK_BYTES)).enumerate() {
                let (scales, mins, l) = fits.super_block::<SUB, QK_K>(s);
                let b = BlockQ2K::from_fits(xb.try_into().expect("one super-block"), &scales, &mins, l);
                yb.copy_from_slice(&b.to_bytes());
            }
        }
        true
    }
}

/// `quantize_row_q2_K_impl` on one row with the sub-block searches of [`SB`] super-blocks in lanes. Same bytes as
/// [`BlockQ2K::quantize_weighted`] block by block.
struct WeightedLanes<'a> {
    src: &'a [f32],
    weights: &'a [f32],
    dst: &'a mut [u8],
}

impl LaneWork for WeightedLanes<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let mut pad = [0f32; SB * QK_K];
        let mut wpad = [0f32; SB * QK_K];
        let chunks = self.src.chunks(SB * QK_K).zip(self.weights.chunks(SB * QK_K));
        for ((x, qw), y) in chunks.zip(self.dst.chunks_mut(SB * BlockQ2K::BLOCK_BYTES)) {
            let (xt, wt, sw) = super_block_weights::<LANES, 16>(padded(x, &mut pad), padded(qw, &mut wpad), 1.0);
            let fits = make_qkx_quants_lanes(Search::weighted(3), &xt, &wt);
            for (s, (xb, yb)) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(BlockQ2K::BLOCK_BYTES)).enumerate() {
                let (scales, mins, l) = fits.super_block::<SUB, QK_K>(s);
                let sw: &[f32; SUB] = sw[SUB * s..SUB * s + SUB].try_into().expect("SUB sums");
                let b = BlockQ2K::from_weighted_fits(xb.try_into().expect("one super-block"), &scales, &mins, sw, l);
                yb.copy_from_slice(&b.to_bytes());
            }
        }
    }
}

impl BlockFormat for BlockQ2K {
    const TYPE: GgmlType = GgmlType::Q2_K;

    /// See [`BlockQ2K::dequantize`].
    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        BlockQ2K::from_bytes(src.try_into().expect("one whole block")).dequantize(dst.try_into().expect("one block"));
    }

    /// `dequantize_row_q2_K`; AVX2 when available, same values.
    fn dequantize_blocks(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::x86::q2_k_dequantize(src, dst) {
            return;
        }
        for (x, y) in src.chunks_exact(Self::BLOCK_BYTES).zip(dst.chunks_exact_mut(QK_K)) {
            Self::dequantize_block(x, y);
        }
    }
}

impl Quantize for BlockQ2K {
    const TAKES_IMATRIX: bool = true;

    /// See [`BlockQ2K::quantize`].
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        dst.copy_from_slice(&BlockQ2K::quantize(src.try_into().expect("one whole block")).to_bytes());
    }

    /// `quantize_row_q2_K_ref` with the sub-block searches vectorised (see [`RefLanes`]).
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        run_lanes(RefLanes { src, dst })
    }

    /// `quantize_row_q2_K_impl` on one row, the sub-block searches vectorised (see [`WeightedLanes`]).
    fn quantize_row_weighted(src: &[f32], weights: &[f32], dst: &mut [u8]) {
        run_lanes(WeightedLanes { src, weights, dst })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_util::hex;

    /// Expected bytes worked out by hand from the C code, not from this code.
    #[test]
    fn golden_constant_blocks() {
        // Ones, weights |x| = 1, nmax 3: iscale 3, codes 3, scale 1/3 (times 3 rounds to 1: error 0), D = 0 for
        // every candidate; the_min -0.0. max_scale = 1/3: scale codes nearest_int(15 / (1/3) * (1/3)) = 15; no min
        // codes (max_min 0, dmin 0). d = f16(0.33333334 / 15) = 0x25B0 (0.022216797). Requantize: 1 / (0.022216797
        // * 15) = 3.0007 -> 3. Codes 3 everywhere: bytes 0xFF. Zeros: all scales 0, every byte 0.
        let mut expected = vec![0x0F; 16];
        expected.extend([0xFF; 64]);
        expected.extend([0xB0, 0x25, 0x00, 0x00]);
        let mut out = [0u8; 84];
        assert!(BlockQ2K::quantize_blocks(&[1.0; QK_K], &mut out));
        assert_eq!(hex(&out), hex(&expected));
        assert!(BlockQ2K::quantize_blocks(&[0.0; QK_K], &mut out));
        assert_eq!(hex(&out), hex(&[0; 84]));
    }

    #[test]
    fn golden_dequantize() {
        // scales[s] = (s % 16) | (15 - s) << 4, d = 0.5 (0x3800), dmin = 0.25 (0x3400), qs byte b = b: element
        // 128h + 32k + i (i < 32) has code (qs[32h + i] >> 2k) & 3 and sub-block (32k + i) / 16 + 8h.
        let mut b: Vec<u8> = (0..16u8).map(|s| s | ((15 - s) << 4)).collect();
        b.extend(0..64u8);
        b.extend([0x00, 0x38, 0x00, 0x34]);
        let mut y = [0f32; QK_K];
        BlockQ2K::dequantize_block(&b, &mut y);
        for (e, &v) in y.iter().enumerate() {
            let (h, k, i) = (e / 128, (e % 128) / 32, e % 32);
            let q = ((32 * h + i) >> (2 * k)) & 3;
            let s = e / 16;
            assert_eq!(v, 0.5 * s as f32 * q as f32 - 0.25 * (15 - s) as f32, "{e}");
        }
    }
}

/// The vectorised kernels against the one-block transcriptions: AVX2 (called directly, so the test fails rather
/// than compare the portable code with itself when the feature is missing), portable lane code, scalar.
#[cfg(all(test, target_arch = "x86_64"))]
mod lane_tests {
    use super::*;
    use crate::quant::test_util::{lcg_block_values, lcg_weights};
    use crate::quant::x86::with_avx2;

    #[test]
    fn dequantize_avx2_and_scalar_agree() {
        let raw: Vec<u8> = (0..84 * 700u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let (mut a, mut b) = (vec![0f32; 700 * QK_K], vec![1f32; 700 * QK_K]);
        assert!(crate::quant::x86::q2_k_dequantize(&raw, &mut a));
        for (x, y) in raw.chunks_exact(84).zip(b.chunks_exact_mut(QK_K)) {
            BlockQ2K::dequantize_block(x, y);
        }
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    }

    #[test]
    fn q2_k_avx2_portable_and_scalar_agree() {
        assert!(is_x86_feature_detected!("avx2"), "this test needs an AVX2 machine");
        let x = lcg_block_values(8 * 45); // 45 super-blocks: rows of 5 (5 % SB != 0)
        let w = lcg_weights(x.len());
        let n = x.len() / QK_K * 84;
        let (mut a, mut b, mut c) = (vec![0u8; n], vec![1u8; n], vec![2u8; n]);
        assert!(matches!(with_avx2(RefLanes { src: &x, dst: &mut a }), Ok(true)));
        assert!(RefLanes { src: &x, dst: &mut b }.run());
        for (xs, y) in x.chunks_exact(QK_K).zip(c.chunks_exact_mut(84)) {
            y.copy_from_slice(&BlockQ2K::quantize(xs.try_into().unwrap()).to_bytes());
        }
        assert!(a == b && a == c, "reference path");
        let row = 5 * QK_K;
        for ((xs, ws), (ya, (yb, yc))) in x
            .chunks_exact(row)
            .zip(w.chunks_exact(row))
            .zip(a.chunks_exact_mut(5 * 84).zip(b.chunks_exact_mut(5 * 84).zip(c.chunks_exact_mut(5 * 84))))
        {
            assert!(with_avx2(WeightedLanes { src: xs, weights: ws, dst: ya }).is_ok());
            WeightedLanes { src: xs, weights: ws, dst: yb }.run();
            for ((xb, wb), y) in xs.chunks_exact(QK_K).zip(ws.chunks_exact(QK_K)).zip(yc.chunks_exact_mut(84)) {
                let blk = BlockQ2K::quantize_weighted(xb.try_into().unwrap(), wb.try_into().unwrap());
                y.copy_from_slice(&blk.to_bytes());
            }
        }
        assert!(a == b && a == c, "importance path");
    }
}
