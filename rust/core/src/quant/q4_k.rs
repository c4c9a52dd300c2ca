//! q4_K: super-blocks of 256 weights in 8 sub-blocks of 32, `x = d * sc[j] * q - dmin * m[j]` with 4-bit codes
//! `q`, 6-bit sub-block scales `sc` and mins `m`, and two f16 super-block scales. Also the scale/min machinery
//! q5_K shares (it differs only in the code width and the search parameters).
//!
//! **Layout** (`block_q4_K`, 144 bytes): `d`, `dmin` (f16, little-endian), `scales[12]` (the 8 scales and 8 mins,
//! 6 bits each, packed as [`pack_scale_min_k4`] describes), `qs[128]`: for each 64 weights, 32 bytes holding the
//! first 32 codes in the low nibbles and the next 32 in the high nibbles.
//!
//! **Reproduces** `quantize_row_q4_K_ref` (no importance matrix: per sub-block `make_qkx2_quants` with weights
//! `sqrt(mean x²) + |x|`, the scales and mins rounded to 6 bits against their maxima), `quantize_row_q4_K_impl`
//! (with one: `make_qkx3_quants` with weights `qw * sqrt(2 mean x² + x²)`, then `make_qp_quants` for the scales
//! and mins) and `dequantize_row_q4_K`.
//!
//! **Traps.** After the scales are fixed every code is recomputed as `nearest_int((x + dm) / d)`, except in a
//! sub-block whose `d` (f16 scale times its 6-bit code) is 0: there the codes of the search stay. The 6-bit scale
//! codes of the reference path are `MIN(63, (uint8_t)nearest_int(..))` (wrapping first); the importance path packs
//! `make_qp_quants`' bytes unclamped (q4_K) or clamped to 63 (q5_K), exactly as C does, bits beyond 6 spilling
//! into the packed neighbours.

use super::float::{f16_bits_to_f32, f32_to_f16_bits};
use super::search_affine::{
    make_qkx_quants, make_qkx_quants_lanes, make_qp_quants, super_block_weights, transpose_in, Search,
};
use super::{nearest_int, run_lanes, BlockFormat, LaneWork, Quantize};
use crate::GgmlType;

/// Elements per super-block (`QK_K`).
pub const QK_K: usize = GgmlType::Q4_K.block_size();
/// Sub-blocks of 32 per super-block.
const SUB: usize = QK_K / 32;

/// One q4_K block as ggml lays it out (`block_q4_K`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ4K {
    /// Super-block scale of the sub-block scales, as f16 bits.
    pub d: u16,
    /// Super-block scale of the sub-block mins, as f16 bits.
    pub dmin: u16,
    /// 8 scales and 8 mins of 6 bits (see [`pack_scale_min_k4`]).
    pub scales: [u8; 12],
    /// The 256 codes, two per byte.
    pub qs: [u8; QK_K / 2],
}

impl BlockQ4K {
    /// Reads a block from its 144 on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; 144]) -> BlockQ4K {
        BlockQ4K {
            d: u16::from_le_bytes([b[0], b[1]]),
            dmin: u16::from_le_bytes([b[2], b[3]]),
            scales: b[4..16].try_into().expect("12 bytes"),
            qs: b[16..].try_into().expect("128 bytes"),
        }
    }

    /// The block's 144 on-disk bytes.
    pub fn to_bytes(&self) -> [u8; 144] {
        let mut b = [0u8; 144];
        b[..2].copy_from_slice(&self.d.to_le_bytes());
        b[2..4].copy_from_slice(&self.dmin.to_le_bytes());
        b[4..16].copy_from_slice(&self.scales);
        b[16..].copy_from_slice(&self.qs);
        b
    }

    /// One super-block of `quantize_row_q4_K_ref`.
    pub fn quantize(x: &[f32; QK_K]) -> BlockQ4K {
        BlockQ4K::from_codes(&SuperK4::quantize_ref(x, Q4K_SEARCH))
    }

    /// One super-block of `quantize_row_q4_K_impl` with importance weights `qw` (one per element).
    pub fn quantize_weighted(x: &[f32; QK_K], qw: &[f32; QK_K]) -> BlockQ4K {
        BlockQ4K::from_codes(&SuperK4::quantize_weighted(x, qw, 15, false))
    }

    fn from_codes(s: &SuperK4) -> BlockQ4K {
        let mut qs = [0u8; QK_K / 2];
        for (q, l) in qs.chunks_exact_mut(32).zip(s.l.chunks_exact(64)) {
            for i in 0..32 {
                q[i] = l[i] | (l[i + 32] << 4);
            }
        }
        BlockQ4K { d: s.d, dmin: s.dmin, scales: s.scales, qs }
    }

    /// One super-block of `dequantize_row_q4_K`: `y = d*sc * q - dmin*m`, each product rounded to f32.
    #[inline(always)]
    pub fn dequantize(&self, y: &mut [f32; QK_K]) {
        let d = f16_bits_to_f32(self.d);
        let min = f16_bits_to_f32(self.dmin);
        for (j, (q, y)) in self.qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (sc1, m1) = scale_min_k4(2 * j, &self.scales);
            let (sc2, m2) = scale_min_k4(2 * j + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for l in 0..32 {
                y[l] = d1 * (q[l] & 0xF) as f32 - m1;
                y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

/// `make_qkx2_quants` parameters of `quantize_row_q4_K_ref`.
const Q4K_SEARCH: Search = Search { nmax: 15, rmin: -1.0, rdelta: 0.1, nstep: 20, use_mad: false };

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes.
#[inline(always)]
pub(super) fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The packing of q4_K/q5_K's 8 scale codes `ls` and min codes `lm` into 12 bytes, as the C quantizers write it:
/// bytes 0..4 hold scales 0..4 and bytes 4..8 mins 0..4 (whole bytes), bytes 8..12 the low nibbles of scale and
/// min 4..8, and bits 6-7 of bytes 0..8 their high bits. Codes above 63 keep C's behaviour: the whole byte is
/// stored for sub-blocks 0..4, and bits above the 6th are dropped or spill as C's shifts and truncations make them.
pub(super) fn pack_scale_min_k4(ls: &[u8; SUB], lm: &[u8; SUB]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..SUB {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// A q4_K/q5_K super-block before its codes are packed: f16 scales, packed 6-bit scales and mins, codes.
pub(super) struct SuperK4 {
    pub d: u16,
    pub dmin: u16,
    pub scales: [u8; 12],
    pub l: [u8; QK_K],
}

/// The sub-block results of the reference search: scales, mins (`the_min`, non-negative) and codes.
pub(super) struct SubFits {
    pub scales: [f32; SUB],
    pub mins: [f32; SUB],
    pub l: [u8; QK_K],
}

impl SubFits {
    /// The sub-block searches of `quantize_row_q4_K_ref` / `_q5_K_ref`, one `make_qkx2_quants` per sub-block with
    /// weights `sqrt(sum x² / 32) + |x|`.
    pub fn search_ref(x: &[f32; QK_K], p: Search) -> SubFits {
        let mut f = SubFits { scales: [0.0; SUB], mins: [0.0; SUB], l: [0; QK_K] };
        let mut weights = [0f32; 32];
        for (j, (xs, l)) in x.chunks_exact(32).zip(f.l.chunks_exact_mut(32)).enumerate() {
            let mut sum_x2 = 0.0f32;
            for &v in xs {
                sum_x2 += v * v;
            }
            let av_x = (sum_x2 / 32.0).sqrt();
            for (w, &v) in weights.iter_mut().zip(xs) {
                *w = av_x + v.abs();
            }
            (f.scales[j], f.mins[j]) = make_qkx_quants(p, xs, &weights, l);
        }
        f
    }
}

impl SuperK4 {
    /// `quantize_row_q4_K_ref` (`p.nmax` 15) or `quantize_row_q5_K_ref` (31) on one super-block, up to packing.
    pub fn quantize_ref(x: &[f32; QK_K], p: Search) -> SuperK4 {
        SuperK4::from_fits(x, SubFits::search_ref(x, p), p.nmax)
    }

    /// The reference path after the sub-block searches: 6-bit scales and mins against their maxima, then the
    /// codes recomputed.
    #[inline(always)]
    pub fn from_fits(x: &[f32; QK_K], f: SubFits, nmax: i32) -> SuperK4 {
        let mut max_scale = 0.0f32;
        let mut max_min = 0.0f32;
        for j in 0..SUB {
            if f.scales[j] > max_scale {
                max_scale = f.scales[j];
            }
            if f.mins[j] > max_min {
                max_min = f.mins[j];
            }
        }
        let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut ls = [0u8; SUB];
        let mut lm = [0u8; SUB];
        for j in 0..SUB {
            ls[j] = (nearest_int(inv_scale * f.scales[j]) as u8).min(63);
            lm[j] = (nearest_int(inv_min * f.mins[j]) as u8).min(63);
        }
        let mut s = SuperK4 {
            d: f32_to_f16_bits(max_scale / 63.0),
            dmin: f32_to_f16_bits(max_min / 63.0),
            scales: pack_scale_min_k4(&ls, &lm),
            l: f.l,
        };
        s.requantize(x, nmax);
        s
    }

    /// `quantize_row_q4_K_impl` (`nmax` 15, `clamp63` false) or `quantize_row_q5_K_impl` (31, true) on one
    /// super-block with importance weights `qw`, up to packing.
    pub fn quantize_weighted(x: &[f32; QK_K], qw: &[f32; QK_K], nmax: i32, clamp63: bool) -> SuperK4 {
        let mut sum_x2 = 0.0f32;
        for &v in x {
            sum_x2 += v * v;
        }
        let sigma2 = 2.0 * sum_x2 / QK_K as f32;
        let mut l = [0u8; QK_K];
        let mut scales = [0f32; SUB];
        let mut mins = [0f32; SUB];
        let mut sw = [0f32; SUB];
        let mut weights = [0f32; 32];
        for j in 0..SUB {
            let xs = &x[32 * j..32 * j + 32];
            for ((w, &q), &v) in weights.iter_mut().zip(&qw[32 * j..32 * j + 32]).zip(xs) {
                *w = q * (sigma2 + v * v).sqrt();
            }
            let mut sumw = 0.0f32;
            for &w in &weights {
                sumw += w;
            }
            sw[j] = sumw;
            (scales[j], mins[j]) = make_qkx_quants(Search::weighted(nmax), xs, &weights, &mut l[32 * j..32 * j + 32]);
        }
        SuperK4::from_weighted_fits(x, &scales, &mins, &sw, l, nmax, clamp63)
    }

    /// The importance path after the sub-block searches: `make_qp_quants` for the scales and the mins.
    #[inline(always)]
    pub fn from_weighted_fits(
        x: &[f32; QK_K],
        scales: &[f32; SUB],
        mins: &[f32; SUB],
        sw: &[f32; SUB],
        l: [u8; QK_K],
        nmax: i32,
        clamp63: bool,
    ) -> SuperK4 {
        let mut ls = [0u8; SUB];
        let mut lm = [0u8; SUB];
        let d_block = make_qp_quants(63, scales, &mut ls, sw);
        let m_block = make_qp_quants(63, mins, &mut lm, sw);
        if clamp63 {
            ls = ls.map(|v| v.min(63));
            lm = lm.map(|v| v.min(63));
        }
        let mut s = SuperK4 {
            d: f32_to_f16_bits(d_block),
            dmin: f32_to_f16_bits(m_block),
            scales: pack_scale_min_k4(&ls, &lm),
            l,
        };
        s.requantize(x, nmax);
        s
    }

    /// The final pass of both paths: every sub-block whose `d = f16(d) * sc` is non-zero gets its codes
    /// recomputed as `clamp(nearest_int((x + dm) / d), 0, nmax)`.
    #[inline(always)]
    fn requantize(&mut self, x: &[f32; QK_K], nmax: i32) {
        let d16 = f16_bits_to_f32(self.d);
        let dmin16 = f16_bits_to_f32(self.dmin);
        for (j, (xs, l)) in x.chunks_exact(32).zip(self.l.chunks_exact_mut(32)).enumerate() {
            let (sc, m) = scale_min_k4(j, &self.scales);
            let d = d16 * sc as f32;
            if d == 0.0 {
                continue;
            }
            let dm = dmin16 * m as f32;
            for (q, &v) in l.iter_mut().zip(xs) {
                *q = nearest_int((v + dm) / d).clamp(0, nmax) as u8;
            }
        }
    }
}

/// Super-blocks whose sub-block searches run side by side: 32 sub-blocks, four AVX2 vectors per lane operation,
/// enough independent work to hide the latency of the sequential sums.
const SB: usize = 4;
/// Lanes of the vectorised searches.
const LANES: usize = SB * SUB;

/// `x` (at most `SB` super-blocks) as exactly `SB` super-blocks, zero-padded in `pad` when short.
#[inline(always)]
pub(super) fn padded<'a, const LEN: usize>(x: &'a [f32], pad: &'a mut [f32; LEN]) -> &'a [f32] {
    if x.len() == LEN {
        x
    } else {
        pad[..x.len()].copy_from_slice(x);
        pad[x.len()..].fill(0.0);
        pad
    }
}

/// `quantize_row_q4_K_ref` / `_q5_K_ref` over whole super-blocks (`search` the sub-block search, `pack` the block
/// writer), with the sub-block searches of [`SB`] super-blocks in lanes. Same bytes as [`SuperK4::quantize_ref`]
/// block by block; false at the first group of super-blocks holding a non-finite value.
pub(super) struct RefLanes<'a, P: Fn(&SuperK4, &mut [u8])> {
    pub src: &'a [f32],
    pub dst: &'a mut [u8],
    pub block_bytes: usize,
    pub search: Search,
    pub pack: P,
}

impl<P: Fn(&SuperK4, &mut [u8])> LaneWork for RefLanes<'_, P> {
    type Output = bool;

    #[inline(always)]
    fn run(self) -> bool {
        let mut pad = [0f32; SB * QK_K];
        for (x, y) in self.src.chunks(SB * QK_K).zip(self.dst.chunks_mut(SB * self.block_bytes)) {
            if !super::all_finite(x) {
                return false;
            }
            let xt = transpose_in::<LANES, 32>(padded(x, &mut pad));
            // Weights sqrt(sum x² / 32) + |x| per sub-block.
            let mut sum_x2 = [0f32; LANES];
            for row in &xt {
                for k in 0..LANES {
                    sum_x2[k] += row[k] * row[k];
                }
            }
            let mut av_x = [0f32; LANES];
            for k in 0..LANES {
                av_x[k] = (sum_x2[k] / 32.0).sqrt();
            }
            let mut wt = [[0f32; LANES]; 32];
            for (w, row) in wt.iter_mut().zip(&xt) {
                for k in 0..LANES {
                    w[k] = av_x[k] + row[k].abs();
                }
            }
            let fits = make_qkx_quants_lanes(self.search, &xt, &wt);
            for (s, (xb, yb)) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(self.block_bytes)).enumerate() {
                let (scales, mins, l) = fits.super_block::<SUB, QK_K>(s);
                let f = SubFits { scales, mins, l };
                (self.pack)(&SuperK4::from_fits(xb.try_into().expect("one super-block"), f, self.search.nmax), yb);
            }
        }
        true
    }
}

/// `quantize_row_q4_K_impl` / `_q5_K_impl` on one row (`nmax` 15 or 31, `clamp63` as in
/// [`SuperK4::quantize_weighted`], `pack` the block writer), with the sub-block searches of [`SB`] super-blocks in
/// lanes. Same bytes as [`SuperK4::quantize_weighted`] block by block.
pub(super) struct WeightedLanes<'a, P: Fn(&SuperK4, &mut [u8])> {
    pub src: &'a [f32],
    pub weights: &'a [f32],
    pub dst: &'a mut [u8],
    pub block_bytes: usize,
    pub nmax: i32,
    pub clamp63: bool,
    pub pack: P,
}

impl<P: Fn(&SuperK4, &mut [u8])> LaneWork for WeightedLanes<'_, P> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        let mut pad = [0f32; SB * QK_K];
        let mut wpad = [0f32; SB * QK_K];
        let chunks = self.src.chunks(SB * QK_K).zip(self.weights.chunks(SB * QK_K));
        for ((x, qw), y) in chunks.zip(self.dst.chunks_mut(SB * self.block_bytes)) {
            let (xt, wt, sw) = super_block_weights::<LANES, 32>(padded(x, &mut pad), padded(qw, &mut wpad), 2.0);
            let fits = make_qkx_quants_lanes(Search::weighted(self.nmax), &xt, &wt);
            for (s, (xb, yb)) in x.chunks_exact(QK_K).zip(y.chunks_exact_mut(self.block_bytes)).enumerate() {
                let (scales, mins, l) = fits.super_block::<SUB, QK_K>(s);
                let sw: &[f32; SUB] = sw[SUB * s..SUB * s + SUB].try_into().expect("SUB sums");
                let xb = xb.try_into().expect("one super-block");
                (self.pack)(&SuperK4::from_weighted_fits(xb, &scales, &mins, sw, l, self.nmax, self.clamp63), yb);
            }
        }
    }
}

impl BlockFormat for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4_K;

    /// See [`BlockQ4K::dequantize`].
    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        BlockQ4K::from_bytes(src.try_into().expect("one whole block")).dequantize(dst.try_into().expect("one block"));
    }
}

impl Quantize for BlockQ4K {
    const TAKES_IMATRIX: bool = true;

    /// See [`BlockQ4K::quantize`].
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        dst.copy_from_slice(&BlockQ4K::quantize(src.try_into().expect("one whole block")).to_bytes());
    }

    /// `quantize_row_q4_K_ref` with the sub-block searches vectorised (see [`RefLanes`]).
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        run_lanes(RefLanes {
            src,
            dst,
            block_bytes: Self::BLOCK_BYTES,
            search: Q4K_SEARCH,
            pack: |s: &SuperK4, y: &mut [u8]| y.copy_from_slice(&BlockQ4K::from_codes(s).to_bytes()),
        })
    }

    /// `quantize_row_q4_K_impl` on one row, the sub-block searches vectorised (see [`WeightedLanes`]).
    fn quantize_row_weighted(src: &[f32], weights: &[f32], dst: &mut [u8]) {
        run_lanes(WeightedLanes {
            src,
            weights,
            dst,
            block_bytes: Self::BLOCK_BYTES,
            nmax: 15,
            clamp63: false,
            pack: |s: &SuperK4, y: &mut [u8]| y.copy_from_slice(&BlockQ4K::from_codes(s).to_bytes()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_util::hex;

    fn quant(x: &[f32; QK_K]) -> Vec<u8> {
        let mut out = vec![0u8; 144];
        assert!(BlockQ4K::quantize_blocks(x, &mut out));
        out
    }

    /// The hand-packed scales of `LS`/`LM` (see `pack_golden`).
    const LS: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 63];
    const LM: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 33];
    // bytes 0..4: ls[0..4] | (ls[4..8] >> 4) << 6 (only 63 >> 4 = 3 is non-zero); 4..8: lm[0..4] | (lm[4..8] >> 4)
    // << 6 (33 >> 4 = 2); 8..12: ls[j] & 15 | (lm[j] & 15) << 4 for j = 4..8.
    const PACKED: [u8; 12] = [1, 2, 3, 0xC4, 0, 1, 2, 0x83, 0x45, 0x56, 0x67, 0x1F];

    #[test]
    fn pack_golden_and_round_trip() {
        assert_eq!(pack_scale_min_k4(&LS, &LM), PACKED);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &PACKED), (LS[j], LM[j]));
        }
        // Every 6-bit pair round-trips through the packing, in every position.
        for v in 0..64u8 {
            let ls = std::array::from_fn(|j| (v + 7 * j as u8) % 64);
            let lm = std::array::from_fn(|j| (v * 3 + j as u8) % 64);
            let p = pack_scale_min_k4(&ls, &lm);
            assert!((0..8).all(|j| scale_min_k4(j, &p) == (ls[j], lm[j])));
        }
        // A code above 63 for sub-block 0 is stored whole (C's `scales[j] = ls`), so its bits 6-7 land where
        // sub-block 4 keeps its high bits.
        let mut ls = [0u8; 8];
        ls[0] = 0xC1;
        assert_eq!(scale_min_k4(4, &pack_scale_min_k4(&ls, &[0; 8])), (3 << 4, 0));
    }

    /// Expected bytes worked out by hand from the C code, not from this code.
    #[test]
    fn golden_zero_and_constant_blocks() {
        // Zeros: every sub-block takes make_qkx2_quants' early exit (scale 0); all scales 0, d = dmin = 0, no
        // sub-block is requantized (d = 0): all 144 bytes 0.
        assert_eq!(hex(&quant(&[0.0; QK_K])), hex(&[0; 144]));
        // Ones: per sub-block scale 1/15, the_min -0.0 (see the search tests). max_scale = 1/15, max_min = 0;
        // inv_scale = 63 / (1/15) = 944.99994, times 1/15 -> 63; min codes 0.
        // d = f16(0.06666667 / 63 = 0.0010582011) = 0x1456, dmin = 0. Requantize: 1 / (f16(d) * 63 = 0.066690445)
        // = 14.99 -> 15. Scales: bytes 0..4 = 63 | 3 << 6 = 0xFF, 4..8 = 0, 8..12 = 0x0F; codes 0xFF.
        let mut expected = vec![0x56, 0x14, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0x0F, 0x0F, 0x0F, 0x0F];
        expected.extend([0xFF; 128]);
        assert_eq!(hex(&quant(&[1.0; QK_K])), hex(&expected));
    }

    #[test]
    fn golden_dequantize() {
        // d = 1 (0x3C00), dmin = 2 (0x4000), the scales above; byte i of each 32 holds codes i % 16 (low) and
        // 15 - i % 16 (high): y[64k + i] = ls[2k] * (i % 16) - 2 lm[2k], y[64k + 32 + i] = ls[2k+1] * (15 - i % 16)
        // - 2 lm[2k+1].
        let mut b = vec![0x00, 0x3C, 0x00, 0x40];
        b.extend(PACKED);
        b.extend((0..128).map(|i| (i % 16) as u8 | ((15 - (i % 16) as u8) << 4)));
        let mut y = [0f32; QK_K];
        BlockQ4K::dequantize_block(&b, &mut y);
        for k in 0..4 {
            for i in 0..32 {
                let q = (i % 16) as f32;
                assert_eq!(y[64 * k + i], LS[2 * k] as f32 * q - 2.0 * LM[2 * k] as f32);
                assert_eq!(y[64 * k + 32 + i], LS[2 * k + 1] as f32 * (15.0 - q) - 2.0 * LM[2 * k + 1] as f32);
            }
        }
    }
}

/// The vectorised kernels against the one-block transcriptions: AVX2 (called directly, so the test fails rather
/// than compare the portable code with itself when the feature is missing), portable lane code, scalar.
#[cfg(all(test, target_arch = "x86_64"))]
mod lane_tests {
    use super::*;
    use crate::quant::q5_k::BlockQ5K;
    use crate::quant::test_util::{lcg_block_values, lcg_weights};
    use crate::quant::x86::with_avx2;

    fn check<B: Quantize>(
        search: Search,
        nmax: i32,
        clamp63: bool,
        pack: fn(&SuperK4, &mut [u8]),
        scalar: fn(&[f32; QK_K], Option<&[f32; QK_K]>) -> Vec<u8>,
    ) {
        assert!(is_x86_feature_detected!("avx2"), "these tests need an AVX2 machine");
        let bb = B::BLOCK_BYTES;
        let x = lcg_block_values(8 * 45); // 45 super-blocks: rows of 5 (5 % SB != 0)
        let w = lcg_weights(x.len());
        let n = x.len() / QK_K * bb;
        let (mut a, mut b, mut c) = (vec![0u8; n], vec![1u8; n], vec![2u8; n]);
        let k = |dst| RefLanes { src: &x, dst, block_bytes: bb, search, pack };
        assert!(matches!(with_avx2(k(&mut a)), Ok(true)));
        assert!(k(&mut b).run());
        for (xs, y) in x.chunks_exact(QK_K).zip(c.chunks_exact_mut(bb)) {
            y.copy_from_slice(&scalar(xs.try_into().unwrap(), None));
        }
        assert!(a == b && a == c, "reference path");
        let row = 5 * QK_K;
        for ((xs, ws), (ya, (yb, yc))) in x
            .chunks_exact(row)
            .zip(w.chunks_exact(row))
            .zip(a.chunks_exact_mut(5 * bb).zip(b.chunks_exact_mut(5 * bb).zip(c.chunks_exact_mut(5 * bb))))
        {
            let k = |dst| WeightedLanes { src: xs, weights: ws, dst, block_bytes: bb, nmax, clamp63, pack };
            assert!(with_avx2(k(ya)).is_ok());
            k(yb).run();
            for ((xb, wb), y) in xs.chunks_exact(QK_K).zip(ws.chunks_exact(QK_K)).zip(yc.chunks_exact_mut(bb)) {
                y.copy_from_slice(&scalar(xb.try_into().unwrap(), Some(wb.try_into().unwrap())));
            }
        }
        assert!(a == b && a == c, "importance path");
    }

    #[test]
    fn dequantize_avx2_and_scalar_agree() {
        crate::quant::test_util::check_dequantize_avx2::<BlockQ4K>();
        crate::quant::test_util::check_dequantize_avx2::<BlockQ5K>();
    }

    #[test]
    fn q4_k_avx2_portable_and_scalar_agree() {
        check::<BlockQ4K>(
            Q4K_SEARCH,
            15,
            false,
            |s, y| y.copy_from_slice(&BlockQ4K::from_codes(s).to_bytes()),
            |x, w| match w {
                None => BlockQ4K::quantize(x).to_bytes().to_vec(),
                Some(w) => BlockQ4K::quantize_weighted(x, w).to_bytes().to_vec(),
            },
        );
    }

    #[test]
    fn q5_k_avx2_portable_and_scalar_agree() {
        check::<BlockQ5K>(
            crate::quant::q5_k::Q5K_SEARCH,
            31,
            true,
            |s, y| y.copy_from_slice(&BlockQ5K::from_codes(s).to_bytes()),
            |x, w| match w {
                None => BlockQ5K::quantize(x).to_bytes().to_vec(),
                Some(w) => BlockQ5K::quantize_weighted(x, w).to_bytes().to_vec(),
            },
        );
    }
}
