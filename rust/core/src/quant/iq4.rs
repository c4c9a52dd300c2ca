//! The non-linear 4-bit quants iq4_nl and iq4_xs: dequantize only (their ggml quantizers search scales with an
//! importance matrix; this crate reads them).
//!
//! Both map 4-bit codes through the 16 levels of [`KVALUES_IQ4NL`]. They reproduce ggml's `dequantize_row_iq4_nl`
//! and `dequantize_row_iq4_xs`:
//!
//! - **iq4_nl** (18 bytes, 32 values, q4_0's layout): f16 `d`, 16 bytes of nibbles (value `j` in the low nibble of
//!   byte `j`, value `j + 16` in its high nibble); `y = d * level`.
//! - **iq4_xs** (136 bytes, 256 values): f16 `d`, a little-endian `u16` holding the 2 high bits of each of the 8
//!   group scales, 4 bytes of their low nibbles (group `g` in nibble `g % 2` of byte `g / 2`), 128 bytes of
//!   nibbles laid out per group of 32 as in iq4_nl. The 6-bit scale `ls` gives `dl = d * (ls - 32)` (an integer
//!   converted to float), `y = dl * level`.
//!
//! **Traps**: the scale is the left operand (`d * level`, `dl * level`), which only matters for NaN payloads
//! (x86 keeps the NaN operand's, and the levels are never NaN).

use super::grid::{f16_at, u16_at};
use super::iq_tables::KVALUES_IQ4NL;
use super::BlockFormat;
use crate::GgmlType;

/// iq4_nl blocks (`block_iq4_nl`; see the module docs).
pub struct BlockIq4Nl;

/// iq4_xs blocks (`block_iq4_xs`; see the module docs).
pub struct BlockIq4Xs;

/// 32 values from 16 bytes of nibbles: `y[j] = d * level(low nibble j)`, `y[j + 16] = d * level(high nibble j)`.
#[inline(always)]
fn nibbles(y: &mut [f32], d: f32, qs: &[u8]) {
    let (lo, hi) = y[..32].split_at_mut(16);
    for ((a, b), &q) in lo.iter_mut().zip(hi).zip(&qs[..16]) {
        *a = d * KVALUES_IQ4NL[(q & 0xF) as usize] as f32;
        *b = d * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
    }
}

impl BlockFormat for BlockIq4Nl {
    const TYPE: GgmlType = GgmlType::IQ4_NL;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        nibbles(dst, f16_at(src, 0), &src[2..18]);
    }
}

impl BlockFormat for BlockIq4Xs {
    const TYPE: GgmlType = GgmlType::IQ4_XS;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let d = f16_at(src, 0);
        let high = u16_at(src, 2) as i32;
        for (g, y) in dst.chunks_exact_mut(32).enumerate() {
            let low = (src[4 + g / 2] >> (4 * (g % 2))) as i32 & 0xF;
            let ls = low | ((high >> (2 * g)) & 3) << 4;
            nibbles(y, d * (ls - 32) as f32, &src[8 + 16 * g..]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iq4_nl_golden() {
        // d = 0.5; byte 0 = 0xF0: value 0 -> level 0 (-127), value 16 -> level 15 (113); byte 3 = 0x78 -> values 3
        // and 19 at levels 8 (1) and 7 (-10).
        let mut b = [0u8; 18];
        b[..2].copy_from_slice(&0x3800u16.to_le_bytes());
        b[2] = 0xF0;
        b[5] = 0x78;
        let mut y = [0.0f32; 32];
        BlockIq4Nl::dequantize_block(&b, &mut y);
        assert_eq!((y[0], y[16], y[3], y[19]), (-63.5, 56.5, 0.5, -5.0));
        assert_eq!(y[1], -63.5);
    }

    #[test]
    fn iq4_xs_golden() {
        // d = 1.0. Group 0: low nibble 1, high bits 0b10 -> ls = 33, dl = 1. Group 3: low nibble 0 (byte 1 high
        // nibble), high bits 0b00 -> ls = 0, dl = -32. Everything else ls = 0 too except group 0.
        let mut b = [0u8; 136];
        b[..2].copy_from_slice(&0x3C00u16.to_le_bytes());
        b[2..4].copy_from_slice(&0b10u16.to_le_bytes());
        b[4] = 0x01;
        b[8] = 0x9F; // group 0: value 0 at level 15 (113), value 16 at level 9 (13)
        b[8 + 16 * 3] = 0x08; // group 3: value 0 at level 8 (1), value 16 at level 0 (-127)
        let mut y = [0.0f32; 256];
        BlockIq4Xs::dequantize_block(&b, &mut y);
        assert_eq!((y[0], y[16], y[1]), (113.0, 13.0, -127.0));
        assert_eq!((y[96], y[112]), (-32.0, 4064.0));
    }
}
