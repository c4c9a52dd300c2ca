//! q1_0 and q2_0, the 1- and 2-bit codes of one f16 scale (18-byte blocks): dequantize only. They reproduce ggml's
//! `dequantize_row_q1_0` and `dequantize_row_q2_0`.
//!
//! - **q1_0** (128 values): f16 `d`, then 16 bytes of bits, value `j` at bit `j % 8` of byte `j / 8`: `y = d` where
//!   the bit is set, `-d` where it is clear.
//! - **q2_0** (64 values; type id 42, newer than gguf-py 0.19.0, see the type table): f16 `d`, then 16 bytes of
//!   codes, value `j` at bits `2 (j % 4)` of byte `j / 4`; `y = (float)(code - 1) * d` (codes mean -1, 0, 1, 2).
//!
//! **Traps**: q1_0's `-d` is a sign flip (also of a NaN `d`; `+0.0` becomes `-0.0`); q2_0's code 1 gives `0 * d`,
//! a zero with `d`'s sign (NaN for NaN or infinite `d`).

use super::grid::{f16_at, negate_if};
use super::BlockFormat;
use crate::GgmlType;

/// q1_0 blocks (`block_q1_0`; see the module docs).
pub struct BlockQ1_0;

/// q2_0 blocks (`block_q2_0`; see the module docs).
pub struct BlockQ2_0;

/// The 16 code bytes after the f16 scale, each with the values it holds (`per_byte` of them).
#[inline(always)]
fn code_bytes<'a>(src: &'a [u8], dst: &'a mut [f32], per_byte: usize) -> impl Iterator<Item = (&'a mut [f32], u8)> {
    dst.chunks_exact_mut(per_byte).zip(src[2..18].iter().copied())
}

impl BlockFormat for BlockQ1_0 {
    const TYPE: GgmlType = GgmlType::Q1_0;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let d = f16_at(src, 0);
        for (y, bits) in code_bytes(src, dst, 8) {
            for (j, v) in y.iter_mut().enumerate() {
                *v = negate_if(d, bits >> j & 1 == 0);
            }
        }
    }
}

impl BlockFormat for BlockQ2_0 {
    const TYPE: GgmlType = GgmlType::Q2_0;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let d = f16_at(src, 0);
        for (y, q) in code_bytes(src, dst, 4) {
            for (j, v) in y.iter_mut().enumerate() {
                *v = (((q >> (2 * j)) & 3) as i32 - 1) as f32 * d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::grid::dequantize_one;
    use super::*;

    /// A block with f16 scale bits `d` and the given code bytes at their positions.
    fn block(d: u16, codes: &[(usize, u8)]) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[..2].copy_from_slice(&d.to_le_bytes());
        for &(i, c) in codes {
            b[2 + i] = c;
        }
        b
    }

    #[test]
    fn q1_0_golden() {
        // d = 1.5; byte 0 = 0b0000_0101: values 0 and 2 positive; byte 15's bit 7: value 127 positive.
        let y = dequantize_one::<BlockQ1_0>(&block(0x3E00, &[(0, 0b101), (15, 0x80)]));
        assert_eq!(&y[..4], &[1.5, -1.5, 1.5, -1.5]);
        assert_eq!((y[126], y[127]), (-1.5, 1.5));
        let y = dequantize_one::<BlockQ1_0>(&block(0, &[(0, 0b101)])); // d = +0: clear bits give -0.0
        assert_eq!((y[0].to_bits(), y[1].to_bits()), (0, 0x8000_0000));
    }

    #[test]
    fn q2_0_golden() {
        // d = -2.0; byte 0 = 0b11_10_01_00 -> codes 0..3 -> 2, -0, -2, -4; byte 15 high bits 0b10 -> value 63 = -2.
        let y = dequantize_one::<BlockQ2_0>(&block(0xC000, &[(0, 0b1110_0100), (15, 0b1000_0000)]));
        assert_eq!(&y[..4], &[2.0, -0.0, -2.0, -4.0]);
        assert_eq!(y[1].to_bits(), 0x8000_0000);
        assert_eq!((y[62], y[63]), (2.0, -2.0));
    }
}
