//! The 4-bit float formats mxfp4 and nvfp4 (E2M1 codes with power-of-two or E4M3 block scales): dequantize only.
//! They reproduce ggml's `dequantize_row_mxfp4` and `dequantize_row_nvfp4`.
//!
//! Codes index [`KVALUES_FP4`], the 16 E2M1 values doubled to integers (0, 1, 2, 3, 4, 6, 8, 12 and their
//! negatives, with a negative zero code giving +0); the scales are halved to compensate.
//!
//! - **mxfp4** (17 bytes, 32 values): an E8M0 exponent byte `e`, 16 bytes of nibbles (value `j` low nibble of byte
//!   `j`, value `j + 16` high nibble). The scale is `2^(e - 128)` built from bits (ggml's
//!   `ggml_e8m0_to_fp32_half`: subnormal for `e < 2`, no NaN for `e = 255`).
//! - **nvfp4** (36 bytes, 64 values): 4 UE4M3 scale bytes, one per 16 values, then 32 bytes of nibbles (sub-block
//!   `s` uses bytes `8s..8s+8`, value `j` low nibble, value `j + 8` high nibble). The scale is ggml's
//!   `ggml_ue4m3_to_fp32`: bit 7 ignored, `0x00` and `0x7F` give 0, exponent 0 is subnormal (`m * 2^-9`), others
//!   `(1 + m/8) * 2^(e - 7)`; then halved. Every step is exact.
//!
//! **Traps**: each value is `(float)code * scale` (code first).

use super::iq_tables::KVALUES_FP4;
use super::BlockFormat;
use crate::GgmlType;

/// mxfp4 blocks (`block_mxfp4`; see the module docs).
pub struct BlockMxfp4;

/// nvfp4 blocks (`block_nvfp4`; see the module docs).
pub struct BlockNvfp4;

/// ggml's `ggml_e8m0_to_fp32_half`: `2^(e - 128)` by its bits.
#[inline(always)]
fn e8m0_half(e: u8) -> f32 {
    f32::from_bits(if e < 2 { 0x0020_0000 << e } else { ((e - 1) as u32) << 23 })
}

/// ggml's `ggml_ue4m3_to_fp32` (half the UE4M3 value; see the module docs).
#[inline(always)]
fn ue4m3_half(x: u8) -> f32 {
    if x == 0 || x == 0x7F {
        return 0.0;
    }
    let exp = ((x >> 3) & 0xF) as u32;
    let man = (x & 7) as f32;
    let raw = if exp == 0 {
        man * f32::from_bits((127 - 9) << 23)
    } else {
        (1.0 + man / 8.0) * f32::from_bits((exp + 127 - 7) << 23)
    };
    raw * 0.5
}

/// `2 * len` values from `len` bytes of nibbles: low nibbles first, then high nibbles, each `code * d`.
#[inline(always)]
fn nibbles(y: &mut [f32], qs: &[u8], d: f32) {
    let (lo, hi) = y.split_at_mut(qs.len());
    for ((a, b), &q) in lo.iter_mut().zip(hi).zip(qs) {
        *a = KVALUES_FP4[(q & 0xF) as usize] as f32 * d;
        *b = KVALUES_FP4[(q >> 4) as usize] as f32 * d;
    }
}

impl BlockFormat for BlockMxfp4 {
    const TYPE: GgmlType = GgmlType::MXFP4;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        nibbles(dst, &src[1..17], e8m0_half(src[0]));
    }
}

impl BlockFormat for BlockNvfp4 {
    const TYPE: GgmlType = GgmlType::NVFP4;

    #[inline(always)]
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        for (s, y) in dst.chunks_exact_mut(16).enumerate() {
            nibbles(y, &src[4 + 8 * s..12 + 8 * s], ue4m3_half(src[s]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp4_values_are_doubled_e2m1() {
        let e2m1 = [0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        for (i, &v) in KVALUES_FP4.iter().enumerate() {
            let want = e2m1[i % 8] * 2.0 * if i >= 8 { -1.0 } else { 1.0 };
            assert_eq!(v as f32, want);
        }
    }

    #[test]
    fn scales() {
        assert_eq!(e8m0_half(127), 0.5);
        assert_eq!(e8m0_half(128), 1.0);
        assert_eq!(e8m0_half(2), 2f32.powi(-126));
        assert_eq!(e8m0_half(1).to_bits(), 0x0040_0000); // 2^-127, subnormal
        assert_eq!(e8m0_half(0).to_bits(), 0x0020_0000); // 2^-128
        assert_eq!(e8m0_half(255), 2f32.powi(127));
        // UE4M3: 0x38 = exponent 7, mantissa 0 -> 1.0; 0x7E = 448 (largest); 0x01 = 2^-9 (smallest subnormal).
        assert_eq!(ue4m3_half(0x38), 0.5);
        assert_eq!(ue4m3_half(0x7E), 224.0);
        assert_eq!(ue4m3_half(0x01), 2f32.powi(-10));
        assert_eq!(ue4m3_half(0x7F), 0.0);
        assert_eq!(ue4m3_half(0xB8), 0.5); // bit 7 ignored
        assert_eq!(ue4m3_half(0xFF), 240.0); // 0x7F's twin with bit 7 set is not special
        assert_eq!(ue4m3_half(0x3C), 0.75); // 1.5 halved
    }

    #[test]
    fn golden_blocks() {
        // mxfp4: e = 129 (scale 2); byte 0 = 0xF7: value 0 code 7 (12) -> 24, value 16 code 15 (-12) -> -24.
        let mut b = [0u8; 17];
        b[0] = 129;
        b[1] = 0xF7;
        let mut y = [0.0f32; 32];
        BlockMxfp4::dequantize_block(&b, &mut y);
        assert_eq!((y[0], y[16], y[1]), (24.0, -24.0, 0.0));
        // nvfp4: sub-block 2 scale 0x40 (exponent 8 -> 2.0, halved 1.0); its byte 0 = 0x9A: value 32 code 10 (-2),
        // value 40 code 9 (-1).
        let mut b = [0u8; 36];
        b[2] = 0x40;
        b[4 + 16] = 0x9A;
        let mut y = [1.0f32; 64];
        BlockNvfp4::dequantize_block(&b, &mut y);
        assert_eq!((y[32], y[40], y[33]), (-2.0, -1.0, 0.0));
        assert!(y[..32].iter().all(|&v| v == 0.0)); // scale byte 0 -> 0
    }
}
