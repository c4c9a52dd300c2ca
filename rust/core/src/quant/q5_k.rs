//! q5_K: super-blocks of 256 weights in 8 sub-blocks of 32, `x = d * sc[j] * q - dmin * m[j]` with 5-bit codes;
//! the scales and mins are q4_K's (see `q4_k.rs`, whose super-block machinery this file uses).
//!
//! **Layout** (`block_q5_K`, 176 bytes): `d`, `dmin` (f16, little-endian), `scales[12]` (as q4_K), `qh[32]` (the
//! fifth bits: bit `2k` of byte `i` for code `64k + i`, bit `2k+1` for code `64k + 32 + i`), `qs[128]` (the low
//! nibbles, laid out as q4_K's codes).
//!
//! **Reproduces** `quantize_row_q5_K_ref` (`make_qkx2_quants` with `nmax` 31 and candidates `-0.5 + 0.1 is`,
//! `is = 0..=15`), `quantize_row_q5_K_impl` (as q4_K's, but the `make_qp_quants` codes are clamped to 63 before
//! packing) and `dequantize_row_q5_K`. Traps: those of q4_K.

use super::float::f16_bits_to_f32;
use super::q4_k::{scale_min_k4, RefLanes, SuperK4, WeightedLanes, QK_K};
use super::search_affine::Search;
use super::{run_lanes, BlockFormat, Quantize};
use crate::GgmlType;

/// One q5_K block as ggml lays it out (`block_q5_K`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ5K {
    /// Super-block scale of the sub-block scales, as f16 bits.
    pub d: u16,
    /// Super-block scale of the sub-block mins, as f16 bits.
    pub dmin: u16,
    /// 8 scales and 8 mins of 6 bits (as q4_K).
    pub scales: [u8; 12],
    /// The fifth bits of the codes.
    pub qh: [u8; QK_K / 8],
    /// The low 4 bits of the codes, two per byte.
    pub qs: [u8; QK_K / 2],
}

/// `make_qkx2_quants` parameters of `quantize_row_q5_K_ref`.
pub(super) const Q5K_SEARCH: Search = Search { nmax: 31, rmin: -0.5, rdelta: 0.1, nstep: 15, use_mad: false };

impl BlockQ5K {
    /// Reads a block from its 176 on-disk bytes.
    #[inline(always)]
    pub fn from_bytes(b: &[u8; 176]) -> BlockQ5K {
        BlockQ5K {
            d: u16::from_le_bytes([b[0], b[1]]),
            dmin: u16::from_le_bytes([b[2], b[3]]),
            scales: b[4..16].try_into().expect("12 bytes"),
            qh: b[16..48].try_into().expect("32 bytes"),
            qs: b[48..].try_into().expect("128 bytes"),
        }
    }

    /// The block's 176 on-disk bytes.
    pub fn to_bytes(&self) -> [u8; 176] {
        let mut b = [0u8; 176];
        b[..2].copy_from_slice(&self.d.to_le_bytes());
        b[2..4].copy_from_slice(&self.dmin.to_le_bytes());
        b[4..16].copy_from_slice(&self.scales);
        b[16..48].copy_from_slice(&self.qh);
        b[48..].copy_from_slice(&self.qs);
        b
    }

    /// One super-block of `quantize_row_q5_K_ref`.
    pub fn quantize(x: &[f32; QK_K]) -> BlockQ5K {
        BlockQ5K::from_codes(&SuperK4::quantize_ref(x, Q5K_SEARCH))
    }

    /// One super-block of `quantize_row_q5_K_impl` with importance weights `qw` (one per element).
    pub fn quantize_weighted(x: &[f32; QK_K], qw: &[f32; QK_K]) -> BlockQ5K {
        BlockQ5K::from_codes(&SuperK4::quantize_weighted(x, qw, 31, true))
    }

    pub(super) fn from_codes(s: &SuperK4) -> BlockQ5K {
        let mut qh = [0u8; QK_K / 8];
        let mut qs = [0u8; QK_K / 2];
        for (k, (q, l)) in qs.chunks_exact_mut(32).zip(s.l.chunks_exact(64)).enumerate() {
            for i in 0..32 {
                let (lo, hi) = (l[i], l[i + 32]);
                qh[i] |= (lo >> 4) << (2 * k) | (hi >> 4) << (2 * k + 1);
                q[i] = (lo & 0xF) | ((hi & 0xF) << 4);
            }
        }
        BlockQ5K { d: s.d, dmin: s.dmin, scales: s.scales, qh, qs }
    }

    /// One super-block of `dequantize_row_q5_K`: `y = d*sc * (q + 16 h) - dmin*m`.
    #[inline(always)]
    pub fn dequantize(&self, y: &mut [f32; QK_K]) {
        let d = f16_bits_to_f32(self.d);
        let min = f16_bits_to_f32(self.dmin);
        for (k, (q, y)) in self.qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
            let (sc1, m1) = scale_min_k4(2 * k, &self.scales);
            let (sc2, m2) = scale_min_k4(2 * k + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            for l in 0..32 {
                let h = self.qh[l] >> (2 * k);
                y[l] = d1 * ((q[l] & 0xF) + ((h & 1) << 4)) as f32 - m1;
                y[l + 32] = d2 * ((q[l] >> 4) + ((h & 2) << 3)) as f32 - m2;
            }
        }
    }
}

impl BlockFormat for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5_K;

    /// See [`BlockQ5K::dequantize`].
    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        BlockQ5K::from_bytes(src.try_into().expect("one whole block")).dequantize(dst.try_into().expect("one block"));
    }
}

impl Quantize for BlockQ5K {
    const TAKES_IMATRIX: bool = true;

    /// See [`BlockQ5K::quantize`].
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        dst.copy_from_slice(&BlockQ5K::quantize(src.try_into().expect("one whole block")).to_bytes());
    }

    /// `quantize_row_q5_K_ref` with the sub-block searches vectorised (see q4_K's `RefLanes`).
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        run_lanes(RefLanes {
            src,
            dst,
            block_bytes: Self::BLOCK_BYTES,
            search: Q5K_SEARCH,
            pack: |s: &SuperK4, y: &mut [u8]| y.copy_from_slice(&BlockQ5K::from_codes(s).to_bytes()),
        })
    }

    /// `quantize_row_q5_K_impl` on one row, the sub-block searches vectorised (see q4_K's `WeightedLanes`).
    fn quantize_row_weighted(src: &[f32], weights: &[f32], dst: &mut [u8]) {
        run_lanes(WeightedLanes {
            src,
            weights,
            dst,
            block_bytes: Self::BLOCK_BYTES,
            nmax: 31,
            clamp63: true,
            pack: |s: &SuperK4, y: &mut [u8]| y.copy_from_slice(&BlockQ5K::from_codes(s).to_bytes()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_util::hex;

    /// Expected bytes worked out by hand from the C code, not from this code.
    #[test]
    fn golden_constant_block() {
        // Ones: per sub-block iscale 31, codes 31, scale 1/31 (times 31 rounds to exactly 1: error 0), no candidate
        // (all codes equal, D = 0); the_min -0.0. Scale codes (63 / (1/31)) * (1/31) = 63, min codes 0. d =
        // f16(0.032258064 / 63) = 0x1032, dmin 0. Requantize: 1 / (f16(d) * 63 = 0.032263756) = 30.99 -> 31.
        // Codes 31: low nibbles 0xFF, fifth bits all set.
        let mut expected = vec![0x32, 0x10, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0x0F, 0x0F, 0x0F, 0x0F];
        expected.extend([0xFF; 32 + 128]);
        let mut out = [0u8; 176];
        assert!(BlockQ5K::quantize_blocks(&[1.0; QK_K], &mut out));
        assert_eq!(hex(&out), hex(&expected));
        assert!(BlockQ5K::quantize_blocks(&[0.0; QK_K], &mut out));
        assert_eq!(hex(&out), hex(&[0; 176]));
    }

    #[test]
    fn golden_dequantize() {
        // d = 0.5 (0x3800), dmin = 1 (0x3C00), scale codes j + 1, min codes j (packed by hand: all below 16, so
        // bytes 0..4 = 1..5, 4..8 = 0..4, 8..12 = (j + 1) | j << 4 for j = 4..8). Low nibbles: code i % 16 low,
        // 15 - i % 16 high; qh byte i = i: element 64k + i gets 16 if bit 2k of i is set, 64k + 32 + i if bit 2k + 1.
        let mut b = vec![0x00, 0x38, 0x00, 0x3C, 1, 2, 3, 4, 0, 1, 2, 3, 0x45, 0x56, 0x67, 0x78];
        b.extend(0..32u8);
        b.extend((0..128).map(|i| (i % 16) as u8 | ((15 - (i % 16) as u8) << 4)));
        let mut y = [0f32; QK_K];
        BlockQ5K::dequantize_block(&b, &mut y);
        for k in 0..4 {
            for i in 0..32 {
                let lo = (i % 16) as f32 + if i >> (2 * k) & 1 == 1 { 16.0 } else { 0.0 };
                let hi = (15 - i % 16) as f32 + if i >> (2 * k + 1) & 1 == 1 { 16.0 } else { 0.0 };
                let (s0, s1) = ((2 * k + 1) as f32 * 0.5, (2 * k + 2) as f32 * 0.5);
                assert_eq!(y[64 * k + i], s0 * lo - (2 * k) as f32, "{k} {i}");
                assert_eq!(y[64 * k + 32 + i], s1 * hi - (2 * k + 1) as f32, "{k} {i}");
            }
        }
    }
}
