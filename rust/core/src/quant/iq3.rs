//! The 3-bit i-quants iq3_xxs and iq3_s: dequantize only.
//!
//! Super-blocks of 256 values, an f16 scale `d` first, then 8 groups of 32 values made of 8 grid points of 4
//! magnitudes each (two points, 8 values, share one sign byte). They reproduce ggml's `dequantize_row_iq3_xxs` and
//! `dequantize_row_iq3_s`:
//!
//! - **iq3_xxs** (98 bytes): `d`, 64 grid-index bytes (8 per group, into [`IQ3XXS_GRID`]), then one little-endian
//!   `u32` per group: 4 seven-bit sign indices into [`KSIGNS_IQ2XS`] (bits 0-27) and a 4-bit scale `s` (bits
//!   28-31); the group scale is `db = d * (0.5 + s) * 0.5`.
//! - **iq3_s** (110 bytes): `d`, 64 grid-index low bytes, 8 `qh` bytes (bit `k` of group `g`'s byte is bit 8 of
//!   that group's `k`-th index into [`IQ3S_GRID`]), 32 plain sign bytes, 4 scale bytes: group `2i` uses the low
//!   nibble `s` of byte `i`, group `2i + 1` the high one, `db = d * (1 + 2 * s)` (an integer converted to float).
//!
//! **Traps**: C's operation order (`(d * (0.5 + s)) * 0.5`, then `db * grid`); the sign is a sign-bit flip even
//! for NaN (see [`super::grid`]).

use super::grid::{self, f16_at, signed_grid8, u32_at};
use super::iq_tables::{IQ3S_GRID, IQ3XXS_GRID, KSIGNS_IQ2XS};
use super::BlockFormat;
use crate::GgmlType;

/// iq3_xxs blocks (`block_iq3_xxs`; see the module docs).
pub struct BlockIq3Xxs;

/// iq3_s blocks (`block_iq3_s`; see the module docs).
pub struct BlockIq3S;

/// The grids as bytes (see [`grid::grid_bytes4`]).
static XXS: [[u8; 4]; 256] = grid::grid_bytes4(&IQ3XXS_GRID);
static S: [[u8; 4]; 512] = grid::grid_bytes4(&IQ3S_GRID);

/// Two 4-magnitude grid points as one 8-magnitude run (the first point's bytes first).
#[inline(always)]
fn pair(first: &[u8; 4], second: &[u8; 4]) -> [u8; 8] {
    [first[0], first[1], first[2], first[3], second[0], second[1], second[2], second[3]]
}

impl BlockFormat for BlockIq3Xxs {
    const TYPE: GgmlType = GgmlType::IQ3_XXS;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let d = f16_at(src, 0);
        let qs = &src[2..66];
        for (g, y) in dst.as_chunks_mut::<32>().0.iter_mut().enumerate() {
            let aux = u32_at(src, 66 + 4 * g);
            let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
            for (l, y) in y.as_chunks_mut::<8>().0.iter_mut().enumerate() {
                let signs = KSIGNS_IQ2XS[(aux >> (7 * l)) as usize & 127];
                let at = 8 * g + 2 * l;
                signed_grid8(y, db, &pair(&XXS[qs[at] as usize], &XXS[qs[at + 1] as usize]), signs);
            }
        }
    }
}

impl BlockFormat for BlockIq3S {
    const TYPE: GgmlType = GgmlType::IQ3_S;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let d = f16_at(src, 0);
        let (qs, qh, signs, scales) = (&src[2..66], &src[66..74], &src[74..106], &src[106..110]);
        for (g, y) in dst.as_chunks_mut::<32>().0.iter_mut().enumerate() {
            let s = (scales[g / 2] >> (4 * (g % 2))) & 0xF;
            let db = d * (1 + 2 * s as i32) as f32;
            let high = qh[g] as usize;
            for (l, y) in y.as_chunks_mut::<8>().0.iter_mut().enumerate() {
                let at = 8 * g + 2 * l;
                let first = qs[at] as usize | ((high << (8 - 2 * l)) & 256);
                let second = qs[at + 1] as usize | ((high << (7 - 2 * l)) & 256);
                signed_grid8(y, db, &pair(&S[first], &S[second]), signs[4 * g + l]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::grid::dequantize_one as deq;
    use super::*;

    #[test]
    fn the_grids_hold_their_magnitudes_and_distinct_points() {
        let xxs: &[u8] = &[4, 12, 20, 28, 36, 44, 52, 62];
        let s: &[u8] = &[1, 3, 5, 7, 9, 11, 13, 15];
        for (grid, levels) in [(&IQ3XXS_GRID[..], xxs), (&IQ3S_GRID[..], s)] {
            assert!(grid.iter().all(|g| g.to_le_bytes().iter().all(|b| levels.contains(b))));
            let mut sorted = grid.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), grid.len());
        }
        assert_eq!(IQ3XXS_GRID[0], 0x0404_0404);
        assert_eq!(IQ3S_GRID[0], 0x0101_0101);
    }

    #[test]
    fn iq3_xxs_golden() {
        // d = 1.0; group 0: scale 1 -> db = 1.5 * 0.5 = 0.75; run 0 uses points 0 and 0 (all 4s) with sign index 3
        // (= 3: values 0 and 1 negative). Elsewhere scale 0 -> db = 0.25, no signs -> 1.0.
        let mut b = [0u8; 98];
        b[..2].copy_from_slice(&0x3C00u16.to_le_bytes());
        b[66..70].copy_from_slice(&(3u32 | 1 << 28).to_le_bytes());
        let y = deq::<BlockIq3Xxs>(&b);
        assert_eq!(&y[..8], &[-3.0, -3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]);
        assert!(y[8..32].iter().all(|&v| v == 3.0));
        assert!(y[32..].iter().all(|&v| v == 1.0));
        // The second point of run 1 in group 2 is index qs[8*2 + 3].
        b[2 + 19] = 255;
        let y = deq::<BlockIq3Xxs>(&b);
        let want: Vec<f32> = IQ3XXS_GRID[255].to_le_bytes().iter().map(|&g| g as f32 * 0.25).collect();
        assert_eq!(&y[64 + 12..64 + 16], &want[..]);
    }

    #[test]
    fn iq3_s_golden() {
        // d = 0.5; scale byte 0 = 0x21: group 0 db = 0.5 * 3 = 1.5, group 1 db = 0.5 * 5 = 2.5. Group 1 run 3: qh
        // byte 1 bits 6 and 7 lift both indices to 256 + low byte; sign byte 0x10 (value 4 negative).
        let mut b = [0u8; 110];
        b[..2].copy_from_slice(&0x3800u16.to_le_bytes());
        b[106] = 0x21;
        b[66 + 1] = 0b1100_0000;
        b[2 + 8 + 6] = 7;
        b[2 + 8 + 7] = 9;
        b[74 + 4 + 3] = 0x10;
        let y = deq::<BlockIq3S>(&b);
        assert!(y[..32].iter().all(|&v| v == 1.5)); // IQ3S_GRID[0] is all 1s
        let (p, q) = (IQ3S_GRID[256 + 7].to_le_bytes(), IQ3S_GRID[256 + 9].to_le_bytes());
        let want: Vec<f32> =
            p.iter().chain(&q).enumerate().map(|(j, &g)| g as f32 * 2.5 * if j == 4 { -1.0 } else { 1.0 }).collect();
        assert_eq!(&y[32 + 24..64], &want[..]);
        assert!(y[64..].iter().all(|&v| v == 0.5)); // scale 0: db = d
    }
}
