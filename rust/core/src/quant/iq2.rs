//! The 2-bit i-quants iq2_xxs, iq2_xs and iq2_s: dequantize only (ggml's quantizers for them search a lattice with
//! an importance matrix; this crate reads them).
//!
//! All three hold super-blocks of 256 values as an f16 scale `d` and 8 groups of 32; each group is 4 runs of 8
//! values, each run a grid point (8 magnitudes from [`IQ2XXS_GRID`] & co.) with 8 sign bits. They reproduce
//! ggml's `dequantize_row_iq2_xxs` / `_iq2_xs` / `_iq2_s`:
//!
//! - **iq2_xxs** (66 bytes): `d`, then per group two little-endian `u32`: the first holds 4 grid indices (one byte
//!   each), the second 4 seven-bit sign indices into [`KSIGNS_IQ2XS`] (bits 0-27) and a 4-bit scale `s` (bits
//!   28-31); the run scale is `db = d * (0.5 + s) * 0.25`.
//! - **iq2_xs** (74 bytes): `d`, 32 little-endian `u16` (9-bit grid index into [`IQ2XS_GRID`], 7-bit sign index),
//!   8 scale bytes: runs 0-1 of group `g` use the low nibble `s` of byte `g`, runs 2-3 the high one, with the same
//!   `db = d * (0.5 + s) * 0.25`.
//! - **iq2_s** (82 bytes): `d`, 32 grid-index low bytes, 32 sign bytes (8 plain sign bits each, no sign table),
//!   8 `qh` bytes (bits `2l..2l+1` of byte `g` are bits 8-9 of run `l`'s index into [`IQ2S_GRID`]), 8 scale bytes
//!   as iq2_xs.
//!
//! **Traps**: the float operations are C's, in C's order: `(d * (0.5 + s)) * 0.25`, then `db * grid`; the sign is
//! a sign-bit flip even for NaN (see [`super::grid`]); scales with NaN/inf f16 bits simply propagate.

use super::grid::{self, f16_at, signed_grid8, u16_at, u32_at};
use super::iq_tables::{IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, KSIGNS_IQ2XS};
use super::BlockFormat;
use crate::GgmlType;

/// iq2_xxs blocks (`block_iq2_xxs`; see the module docs).
pub struct BlockIq2Xxs;

/// iq2_xs blocks (`block_iq2_xs`; see the module docs).
pub struct BlockIq2Xs;

/// iq2_s blocks (`block_iq2_s`; see the module docs).
pub struct BlockIq2S;

/// The grids as bytes (see [`grid::grid_bytes8`]).
static XXS: [[u8; 8]; 256] = grid::grid_bytes8(&IQ2XXS_GRID);
static XS: [[u8; 8]; 512] = grid::grid_bytes8(&IQ2XS_GRID);
static S: [[u8; 8]; 1024] = grid::grid_bytes8(&IQ2S_GRID);

/// `d * (0.5 + s) * 0.25`, the run scale of the three formats for a 4-bit `s`.
#[inline(always)]
fn run_scale(d: f32, s: u8) -> f32 {
    d * (0.5 + s as f32) * 0.25
}

impl BlockFormat for BlockIq2Xxs {
    const TYPE: GgmlType = GgmlType::IQ2_XXS;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let d = f16_at(src, 0);
        for (g, y) in dst.as_chunks_mut::<32>().0.iter_mut().enumerate() {
            let indices = u32_at(src, 2 + 8 * g).to_le_bytes();
            let aux = u32_at(src, 6 + 8 * g);
            let db = run_scale(d, (aux >> 28) as u8);
            for (l, y) in y.as_chunks_mut::<8>().0.iter_mut().enumerate() {
                let signs = KSIGNS_IQ2XS[(aux >> (7 * l)) as usize & 127];
                signed_grid8(y, db, &XXS[indices[l] as usize], signs);
            }
        }
    }
}

impl BlockFormat for BlockIq2Xs {
    const TYPE: GgmlType = GgmlType::IQ2_XS;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let d = f16_at(src, 0);
        for (g, y) in dst.as_chunks_mut::<32>().0.iter_mut().enumerate() {
            let scales = src[66 + g];
            let db = [run_scale(d, scales & 0xF), run_scale(d, scales >> 4)];
            for (l, y) in y.as_chunks_mut::<8>().0.iter_mut().enumerate() {
                let q = u16_at(src, 2 + 2 * (4 * g + l));
                let signs = KSIGNS_IQ2XS[(q >> 9) as usize];
                signed_grid8(y, db[l / 2], &XS[(q & 511) as usize], signs);
            }
        }
    }
}

impl BlockFormat for BlockIq2S {
    const TYPE: GgmlType = GgmlType::IQ2_S;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let d = f16_at(src, 0);
        let (low, signs, qh, scales) = (&src[2..34], &src[34..66], &src[66..74], &src[74..82]);
        for (g, y) in dst.as_chunks_mut::<32>().0.iter_mut().enumerate() {
            let db = [run_scale(d, scales[g] & 0xF), run_scale(d, scales[g] >> 4)];
            for (l, y) in y.as_chunks_mut::<8>().0.iter_mut().enumerate() {
                let high = ((qh[g] as usize) << (8 - 2 * l)) & 0x300;
                let index = low[4 * g + l] as usize | high;
                signed_grid8(y, db[l / 2], &S[index], signs[4 * g + l]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::grid::dequantize_one as deq;
    use super::*;

    #[test]
    fn the_tables_have_the_documented_shape() {
        // KSIGNS: the low 7 bits are the index; bit 7 makes the count of set bits even.
        for (i, &s) in KSIGNS_IQ2XS.iter().enumerate() {
            assert_eq!(s & 127, i as u8);
            assert_eq!(s.count_ones() % 2, 0);
        }
        // The iq2 grids hold the magnitudes 8, 25 and 43 only, and are distinct points.
        for grid in [&IQ2XXS_GRID[..], &IQ2XS_GRID[..], &IQ2S_GRID[..]] {
            assert!(grid.iter().all(|g| g.to_le_bytes().iter().all(|b| [8, 25, 43].contains(b))));
            let mut sorted = grid.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), grid.len());
        }
        assert_eq!(IQ2XXS_GRID[0], 0x0808_0808_0808_0808);
    }

    #[test]
    fn iq2_xxs_golden() {
        // d = 1.0; group 0: grid 0 for every run (all 8s), sign index 1 (= 129: values 0 and 7 negative) for run 0,
        // scale 3 -> db = (0.5 + 3) * 0.25 = 0.875, value 8 * 0.875 = 7. Other groups: all-zero words -> grid 0,
        // no signs, scale 0 -> db = 0.125 -> 1.0.
        let mut b = [0u8; 66];
        b[..2].copy_from_slice(&0x3C00u16.to_le_bytes());
        b[6..10].copy_from_slice(&(1u32 | 3 << 28).to_le_bytes());
        let y = deq::<BlockIq2Xxs>(&b);
        assert_eq!(&y[..8], &[-7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, -7.0]);
        assert!(y[8..32].iter().all(|&v| v == 7.0));
        assert!(y[32..].iter().all(|&v| v == 1.0));
        // d = -0.0: every value is a zero whose sign is d's sign flipped by the code's sign.
        b[..2].copy_from_slice(&0x8000u16.to_le_bytes());
        let y = deq::<BlockIq2Xxs>(&b);
        assert_eq!(y[0].to_bits(), 0.0f32.to_bits());
        assert_eq!(y[1].to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn iq2_xs_golden() {
        // d = 2.0; group 1 scales byte 0x51: runs 0-1 db = 2 * 1.5 * 0.25 = 0.75, runs 2-3 db = 2 * 5.5 * 0.25 =
        // 2.75. Run 4 (group 1, run 0): index 0 (all 8s), sign index 2 (= 130: values 1 and 7 negative).
        let mut b = [0u8; 74];
        b[..2].copy_from_slice(&0x4000u16.to_le_bytes());
        b[66 + 1] = 0x51;
        b[2 + 2 * 4..2 + 2 * 5].copy_from_slice(&(2u16 << 9).to_le_bytes());
        let y = deq::<BlockIq2Xs>(&b);
        assert_eq!(&y[32..40], &[6.0, -6.0, 6.0, 6.0, 6.0, 6.0, 6.0, -6.0]);
        assert!(y[40..48].iter().all(|&v| v == 6.0));
        assert!(y[48..64].iter().all(|&v| v == 22.0));
        assert!(y[..32].iter().all(|&v| v == 2.0)); // 8 * 2 * 0.5 * 0.25
                                                    // The index's 9 bits pick the grid point: IQ2XS_GRID[511].
        b[2..4].copy_from_slice(&511u16.to_le_bytes());
        let y = deq::<BlockIq2Xs>(&b);
        let want: Vec<f32> = IQ2XS_GRID[511].to_le_bytes().iter().map(|&g| g as f32 * 0.25).collect();
        assert_eq!(&y[..8], &want[..]);
    }

    #[test]
    fn iq2_s_golden() {
        // d = 1.0, group 0 scale 0x20: runs 0-1 db = 0.125, runs 2-3 db = 0.625. Run 1: low byte 0x05, qh bits 2-3
        // = 0b11 -> index 0x305; sign byte 0x0F (values 0-3 negative).
        let mut b = [0u8; 82];
        b[..2].copy_from_slice(&0x3C00u16.to_le_bytes());
        b[74] = 0x20;
        b[2 + 1] = 0x05;
        b[66] = 0b1100;
        b[34 + 1] = 0x0F;
        let y = deq::<BlockIq2S>(&b);
        let grid = IQ2S_GRID[0x305].to_le_bytes();
        for j in 0..8 {
            let m = grid[j] as f32 * 0.125;
            assert_eq!(y[8 + j], if j < 4 { -m } else { m });
            assert_eq!(y[j], 8.0 * 0.125);
            assert_eq!(y[16 + j], 8.0 * 0.625);
        }
    }
}
