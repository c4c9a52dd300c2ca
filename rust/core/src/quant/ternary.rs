//! The ternary quants tq1_0 and tq2_0 (values `d * {-1, 0, 1}`): dequantize only. They reproduce ggml's
//! `dequantize_row_tq1_0` and `dequantize_row_tq2_0`.
//!
//! - **tq1_0** (54 bytes, 256 values): 48 bytes packing 5 trits each, 4 bytes packing 4 trits each, then the f16
//!   `d` (last). A byte `q` holds trit `n` as `((q * 3^n mod 256) * 3) >> 8` (the byte is a fixed-point fraction
//!   whose base-3 digits are the trits). Output order: trit `n` of bytes 0-31 for n = 0..5 (160 values), trit `n`
//!   of bytes 32-47 for n = 0..5 (80 values), then trit `n` of the 4 last bytes for n = 0..4 (16 values).
//! - **tq2_0** (66 bytes, 256 values): 64 bytes of 2-bit codes, then `d`. For each half of 32 bytes, the codes at
//!   bits `2l..2l+1` for l = 0..4 give 4 runs of 32 values; code `q` means `q - 1` (code 3 gives 2).
//!
//! **Traps**: the product `3^n * q` wraps to 8 bits before the `* 3 >> 8`; each value is `(float)(t - 1) * d`.

use super::grid::f16_at;
use super::BlockFormat;
use crate::GgmlType;

/// tq1_0 blocks (`block_tq1_0`; see the module docs).
pub struct BlockTq1_0;

/// tq2_0 blocks (`block_tq2_0`; see the module docs).
pub struct BlockTq2_0;

/// `3^n` for the trit positions of a byte.
const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// Trit `n` of byte `q` minus one, times `d`.
#[inline(always)]
fn trit(q: u8, n: usize, d: f32) -> f32 {
    let t = ((q.wrapping_mul(POW3[n]) as u16 * 3) >> 8) as i32;
    (t - 1) as f32 * d
}

/// Trits `0..COUNT` of `bytes`, trit-major: all bytes' trit 0, then all bytes' trit 1, ... (`y` holds
/// `COUNT * B` values).
#[inline(always)]
fn trits<const B: usize, const COUNT: usize>(y: &mut [f32], bytes: &[u8], d: f32) {
    let bytes: &[u8; B] = bytes.try_into().expect("B bytes");
    for (n, y) in y.as_chunks_mut::<B>().0.iter_mut().take(COUNT).enumerate() {
        for (v, &q) in y.iter_mut().zip(bytes) {
            *v = trit(q, n, d);
        }
    }
}

impl BlockFormat for BlockTq1_0 {
    const TYPE: GgmlType = GgmlType::TQ1_0;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let d = f16_at(src, 52);
        let (first, rest) = dst.split_at_mut(160);
        let (second, last) = rest.split_at_mut(80);
        trits::<32, 5>(first, &src[..32], d);
        trits::<16, 5>(second, &src[32..48], d);
        trits::<4, 4>(last, &src[48..52], d);
    }
}

impl BlockFormat for BlockTq2_0 {
    const TYPE: GgmlType = GgmlType::TQ2_0;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let d = f16_at(src, 64);
        for (half, y) in dst.chunks_exact_mut(128).enumerate() {
            let qs = &src[32 * half..32 * half + 32];
            for (l, y) in y.chunks_exact_mut(32).enumerate() {
                for (v, &q) in y.iter_mut().zip(qs) {
                    *v = (((q >> (2 * l)) & 3) as i32 - 1) as f32 * d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trits_of_a_byte_are_its_base_3_digits() {
        // The encoder stores trits t0..t4 as ceil(256 * (t0 t1 t2 t3 t4)_3 / 243): check every 5-trit word.
        for w in 0..243u32 {
            let q = (w * 256).div_ceil(243) as u8;
            let digits = [w / 81, w / 27 % 3, w / 9 % 3, w / 3 % 3, w % 3];
            for (n, &t) in digits.iter().enumerate() {
                assert_eq!(trit(q, n, 1.0), t as f32 - 1.0, "word {w} trit {n}");
            }
        }
    }

    #[test]
    fn tq1_0_golden() {
        // d = 2.0; byte 0 = 0 (all trits 0 -> -2); byte 1 encodes (2, 1, 0, 2, 1)_3 = 196 -> ceil(196*256/243) =
        // 207; byte 32 = 255 -> trits of 242 = (2,2,2,2,2); byte 48 (a 4-trit byte) = 255.
        let mut b = [0u8; 54];
        b[52..54].copy_from_slice(&0x4000u16.to_le_bytes());
        b[1] = 207;
        b[32] = 255;
        b[48] = 255;
        let mut y = [0.0f32; 256];
        BlockTq1_0::dequantize_block(&b, &mut y);
        assert_eq!([y[1], y[33], y[65], y[97], y[129]], [2.0, 0.0, -2.0, 2.0, 0.0]);
        assert_eq!(y[0], -2.0);
        assert_eq!([y[160], y[176], y[192], y[208], y[224]], [2.0; 5]);
        assert_eq!([y[240], y[244], y[248], y[252]], [2.0; 4]);
        assert_eq!(y[241], -2.0);
    }

    #[test]
    fn tq2_0_golden() {
        // d = 0.5; byte 0 = 0b11_10_01_00: values 0, 32, 64, 96 are codes 0..3 -> -0.5, 0, 0.5, 1.0. Byte 33
        // (second half, value 128 + 1 for l = 0) = 0b10 -> 0.5.
        let mut b = [0u8; 66];
        b[64..66].copy_from_slice(&0x3800u16.to_le_bytes());
        b[0] = 0b1110_0100;
        b[33] = 0b10;
        let mut y = [0.0f32; 256];
        BlockTq2_0::dequantize_block(&b, &mut y);
        assert_eq!([y[0], y[32], y[64], y[96]], [-0.5, 0.0, 0.5, 1.0]);
        assert_eq!((y[129], y[161], y[1]), (0.5, -0.5, -0.5));
    }
}
