//! The 1-bit i-quants iq1_s and iq1_m: dequantize only.
//!
//! Super-blocks of 256 values in 8 groups of 32; each group is 4 runs of 8 values taken from an 11-bit index into
//! [`IQ1S_GRID`] (8 values in {-1, 0, 1}), shifted by `±delta` (0.125) and scaled. They reproduce ggml's
//! `dequantize_row_iq1_s` and `dequantize_row_iq1_m`:
//!
//! - **iq1_s** (50 bytes): f16 `d`, 32 index low bytes, 8 little-endian `u16` `qh` (one per group: bits `3l..3l+2`
//!   are the high bits of run `l`'s index, bits 12-14 a 3-bit scale `s`, bit 15 the sign of delta for the whole
//!   group). `y = (d * (2s + 1)) * (grid + delta)`.
//! - **iq1_m** (56 bytes): 32 index low bytes, 16 `qh` bytes (two per group; in each, bits 0-2 / 4-6 are the high
//!   bits of the first / second run's index, bit 3 / 7 their delta signs), 4 little-endian `u16` scale words. The
//!   block scale is an f16 assembled from the top nibbles of the four words (word 0's nibble lowest); group `g`
//!   takes two 3-bit scales from word `g / 2`, at bit `6 (g % 2)` for runs 0-1 and 3 bits higher for runs 2-3.
//!
//! **Traps**: `grid + delta` is an int8 converted to float plus the float delta, then one multiplication by the
//! run scale `d * (2s + 1)` (an integer converted to float); no sign flips here.

use super::float::f16_bits_to_f32;
use super::grid::{self, f16_at, u16_at};
use super::iq_tables::{IQ1M_DELTA, IQ1S_DELTA, IQ1S_GRID};
use super::BlockFormat;
use crate::GgmlType;

/// iq1_s blocks (`block_iq1_s`; see the module docs).
pub struct BlockIq1S;

/// iq1_m blocks (`block_iq1_m`; see the module docs).
pub struct BlockIq1M;

/// Eight values `dl * (grid[j] + delta)` of grid point `index` (signed bytes).
#[inline(always)]
fn run(y: &mut [f32; 8], dl: f32, index: usize, delta: f32) {
    let g = &GRID[index];
    for j in 0..8 {
        y[j] = dl * (g[j] as i8 as f32 + delta);
    }
}

/// [`IQ1S_GRID`] as bytes (see [`grid::grid_bytes8`]).
static GRID: [[u8; 8]; 2048] = grid::grid_bytes8(&IQ1S_GRID);

/// `±delta`, negative when `negative`.
#[inline(always)]
fn shift(delta: f32, negative: bool) -> f32 {
    if negative {
        -delta
    } else {
        delta
    }
}

impl BlockFormat for BlockIq1S {
    const TYPE: GgmlType = GgmlType::IQ1_S;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let d = f16_at(src, 0);
        let qs = &src[2..34];
        for (g, y) in dst.as_chunks_mut::<32>().0.iter_mut().enumerate() {
            let qh = u16_at(src, 34 + 2 * g) as usize;
            let dl = d * (2 * ((qh >> 12) & 7) + 1) as f32;
            let delta = shift(IQ1S_DELTA, qh & 0x8000 != 0);
            for (l, y) in y.as_chunks_mut::<8>().0.iter_mut().enumerate() {
                run(y, dl, qs[4 * g + l] as usize | ((qh >> (3 * l)) & 7) << 8, delta);
            }
        }
    }
}

impl BlockFormat for BlockIq1M {
    const TYPE: GgmlType = GgmlType::IQ1_M;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let (qs, qh) = (&src[..32], &src[32..48]);
        let sc = [u16_at(src, 48), u16_at(src, 50), u16_at(src, 52), u16_at(src, 54)];
        let d = f16_bits_to_f32((sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) | (sc[3] & 0xF000));
        for (g, y) in dst.as_chunks_mut::<32>().0.iter_mut().enumerate() {
            let word = sc[g / 2] as usize;
            let at = 6 * (g % 2);
            let dl = [d * (2 * ((word >> at) & 7) + 1) as f32, d * (2 * ((word >> (at + 3)) & 7) + 1) as f32];
            for (l, y) in y.as_chunks_mut::<8>().0.iter_mut().enumerate() {
                let h = qh[2 * g + l / 2] as usize >> (4 * (l % 2));
                let index = qs[4 * g + l] as usize | (h & 7) << 8;
                run(y, dl[l / 2], index, shift(IQ1M_DELTA, h & 8 != 0));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::grid::dequantize_one as deq;
    use super::*;

    #[test]
    fn the_grid_holds_minus_one_zero_one() {
        assert!(IQ1S_GRID.iter().all(|g| g.to_le_bytes().iter().all(|&b| [0xFF, 0, 1].contains(&b))));
        assert_eq!(IQ1S_GRID[0], u64::MAX); // all -1
        assert_eq!(IQ1S_GRID[2047], 0x0101_0101_0101_0101); // all +1
        assert_eq!(IQ1S_DELTA, 0.125);
    }

    #[test]
    fn iq1_s_golden() {
        // d = 1.0. Group 0: qh = scale 2 (bits 12-14), delta negative (bit 15), run 1's high bits 0b111 (bits 3-5)
        // with low byte 0xFF -> index 2047 (all +1): (1 - 0.125) * 5 = 4.375; the other runs use index 0 (all -1):
        // (-1 - 0.125) * 5 = -5.625. Other groups: qh = 0 -> dl = 1, delta +0.125, index 0: -0.875.
        let mut b = [0u8; 50];
        b[..2].copy_from_slice(&0x3C00u16.to_le_bytes());
        b[2 + 1] = 0xFF;
        b[34..36].copy_from_slice(&(0x8000u16 | 2 << 12 | 0b111 << 3).to_le_bytes());
        let y = deq::<BlockIq1S>(&b);
        assert!(y[..8].iter().all(|&v| v == -5.625));
        assert!(y[8..16].iter().all(|&v| v == 4.375));
        assert!(y[16..32].iter().all(|&v| v == -5.625));
        assert!(y[32..].iter().all(|&v| v == -0.875));
    }

    #[test]
    fn iq1_m_golden() {
        // Block scale f16 0x3C00 (1.0) spread over the scale words' top nibbles: 0x0, 0x0, 0xC, 0x3 (lowest
        // first). Word 0 low bits: group 0 scales 1 (runs 0-1: dl = 3) and 2 (runs 2-3: dl = 5), group 1 scale 3 / 0
        // (dl = 7 / 1). Group 0 run 1: high bits 0b111 + low 0xFF -> 2047 (all +1), delta negative (bit 7 of qh 0).
        let mut b = [0u8; 56];
        let words: [u16; 4] = [1 | 2 << 3 | 3 << 6, 0x0000, 0xC000, 0x3000];
        for (i, w) in words.iter().enumerate() {
            b[48 + 2 * i..50 + 2 * i].copy_from_slice(&w.to_le_bytes());
        }
        b[1] = 0xFF;
        b[32] = 0b1111_0000;
        let y = deq::<BlockIq1M>(&b);
        assert!(y[..8].iter().all(|&v| v == 3.0 * -0.875)); // index 0 (all -1), delta +0.125
        assert!(y[8..16].iter().all(|&v| v == 3.0 * 0.875)); // all +1, delta -0.125
        assert!(y[16..32].iter().all(|&v| v == 5.0 * -0.875));
        assert!(y[32..48].iter().all(|&v| v == 7.0 * -0.875));
        assert!(y[48..64].iter().all(|&v| v == -0.875));
    }
}
