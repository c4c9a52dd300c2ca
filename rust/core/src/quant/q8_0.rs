//! q8_0: blocks of 32 weights as an f16 scale and 32 signed bytes (`x = d * q`).

use super::float::{f16_bits_to_f32, f32_to_f16_bits};
use super::{c_float_to_i8, BlockFormat, Quantize};
use crate::GgmlType;

/// Elements per q8_0 block (`QK8_0`).
pub const QK8_0: usize = 32;

/// One q8_0 block as ggml lays it out (`block_q8_0`): `d` (f16 bits, little-endian on disk) then 32 `int8` codes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ8_0 {
    /// Scale, as f16 bits.
    pub d: u16,
    /// The 32 codes.
    pub qs: [i8; QK8_0],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

impl BlockQ8_0 {
    /// Reads a block from its 34 on-disk bytes (any alignment).
    pub fn from_bytes(b: &[u8; 34]) -> BlockQ8_0 {
        let mut qs = [0i8; QK8_0];
        for (q, &byte) in qs.iter_mut().zip(&b[2..]) {
            *q = byte as i8;
        }
        BlockQ8_0 { d: u16::from_le_bytes([b[0], b[1]]), qs }
    }

    /// The block's 34 on-disk bytes.
    pub fn to_bytes(&self) -> [u8; 34] {
        let mut b = [0u8; 34];
        b[..2].copy_from_slice(&self.d.to_le_bytes());
        for (byte, &q) in b[2..].iter_mut().zip(&self.qs) {
            *byte = q as u8;
        }
        b
    }

    /// One block of ggml's `quantize_row_q8_0_ref`, literally: `amax = max |x|`, `d = amax / 127`, `id = 1/d`
    /// (0 when `d == 0`; from the f32 `d`, not its f16 rounding), codes `roundf(x*id)` (ties away from zero).
    ///
    /// The input should be finite (the public entry points refuse anything else). For a block whose largest
    /// magnitude is below about 3.7e-37, `1/d` overflows to infinity and the products are ±inf or NaN; C's
    /// conversion of those to `int8_t` is undefined, x86 code gives 0 and so does gguf-py, so such blocks come out
    /// with all codes 0 (and `d` = +0 in f16).
    pub fn quantize(x: &[f32; QK8_0]) -> BlockQ8_0 {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK8_0];
        for (q, &v) in qs.iter_mut().zip(x) {
            *q = c_float_to_i8((v * id).round());
        }
        BlockQ8_0 { d: f32_to_f16_bits(d), qs }
    }

    /// One block of ggml's `dequantize_row_q8_0`: `y[j] = q[j] * d` with `d` the f16 scale widened to f32.
    pub fn dequantize(&self, y: &mut [f32; QK8_0]) {
        let d = f16_bits_to_f32(self.d);
        for (out, &q) in y.iter_mut().zip(&self.qs) {
            *out = q as f32 * d;
        }
    }
}

/// Portable `quantize_row_q8_0_ref` over whole blocks; false (stopping early) at the first block holding a
/// non-finite value.
pub(super) fn quantize_blocks_scalar(src: &[f32], dst: &mut [u8]) -> bool {
    for (x, y) in src.chunks_exact(QK8_0).zip(dst.chunks_exact_mut(34)) {
        if !super::all_finite(x) {
            return false;
        }
        BlockQ8_0::quantize_block(x, y);
    }
    true
}

/// Portable `dequantize_row_q8_0` over whole blocks.
pub(super) fn dequantize_blocks_scalar(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(QK8_0)) {
        BlockQ8_0::dequantize_block(x, y);
    }
}

impl BlockFormat for BlockQ8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;

    /// See [`BlockQ8_0::dequantize`].
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        let b = BlockQ8_0::from_bytes(src.try_into().expect("one whole block"));
        b.dequantize(dst.try_into().expect("one whole block"));
    }

    /// `dequantize_row_q8_0`; AVX2 when available, same values.
    fn dequantize_blocks(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::x86::q8_0_dequantize(src, dst) {
            return;
        }
        dequantize_blocks_scalar(src, dst)
    }
}

impl Quantize for BlockQ8_0 {
    /// See [`BlockQ8_0::quantize`].
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        dst.copy_from_slice(&BlockQ8_0::quantize(src.try_into().expect("one whole block")).to_bytes());
    }

    /// `quantize_row_q8_0_ref`; AVX2 when available, same bytes.
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(ok) = super::x86::q8_0_quantize(src, dst, Self::quantize_block) {
            return ok;
        }
        quantize_blocks_scalar(src, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::quant::test_util::NO_SIMD;
    use crate::quant::test_util::{hex, lcg_block_values};

    /// The AVX2 kernel, called directly (never the dispatcher, whose fallback is the portable code itself); fails
    /// on an x86-64 CPU without AVX2.
    #[cfg(target_arch = "x86_64")]
    fn simd_quantize(src: &[f32], dst: &mut [u8]) -> bool {
        crate::quant::x86::q8_0_quantize(src, dst, BlockQ8_0::quantize_block).expect(NO_SIMD)
    }

    #[cfg(target_arch = "x86_64")]
    fn simd_dequantize(src: &[u8], dst: &mut [f32]) {
        assert!(crate::quant::x86::q8_0_dequantize(src, dst), "{NO_SIMD}");
    }

    /// The portable kernel's bytes for one block, checked equal to the AVX2 kernel's on x86-64.
    fn quant(x: &[f32; 32]) -> Vec<u8> {
        let mut scalar = vec![0u8; 34];
        assert!(quantize_blocks_scalar(x, &mut scalar));
        #[cfg(target_arch = "x86_64")]
        {
            let mut simd = vec![0u8; 34];
            assert!(simd_quantize(x, &mut simd));
            assert_eq!(hex(&simd), hex(&scalar), "AVX2 kernel vs portable on {x:?}");
        }
        scalar
    }

    fn block(head: &[f32]) -> [f32; 32] {
        let mut x = [0f32; 32];
        x[..head.len()].copy_from_slice(head);
        x
    }

    /// Expected bytes worked out by hand from the C formula, not from this code.
    #[test]
    fn golden_unit_scale_block_and_ties() {
        // amax = 127 -> d = 1 (f16 0x3C00), id = 1, q = roundf(x): halves go away from zero.
        let x = block(&[
            127.0,
            -127.0,
            0.5,
            -0.5,
            1.5,
            2.5,
            -2.5,
            0.499_999_97,
            -0.499_999_97,
            126.5,
            -126.5,
            3.499_999_8,
            0.500_000_06,
            1e-3,
            -1e-3,
        ]);
        let mut expected =
            vec![0x00, 0x3C, 0x7F, 0x81, 0x01, 0xFF, 0x02, 0x03, 0xFD, 0x00, 0x00, 0x7F, 0x81, 0x03, 0x01, 0x00, 0x00];
        expected.resize(34, 0);
        assert_eq!(hex(&quant(&x)), hex(&expected));
    }

    #[test]
    fn golden_half_scale_block() {
        // amax = 63.5 -> d = 0.5 (f16 0x3800), id = 2.
        // 0.25 -> 0.5 -> 1; -0.75 -> -1.5 -> -2; 1.25 -> 2.5 -> 3; 10.2 -> 20.4 -> 20; -0.25 -> -1; 0.2499 -> 0.
        let x = block(&[63.5, -63.5, 0.25, -0.75, 1.25, 10.2, -0.25, 0.2499]);
        let mut expected = vec![0x00, 0x38, 0x7F, 0x81, 0x01, 0xFE, 0x03, 0x14, 0xFF, 0x00];
        expected.resize(34, 0);
        assert_eq!(hex(&quant(&x)), hex(&expected));
    }

    #[test]
    fn golden_zero_large_and_tiny_blocks() {
        // All zero: d = 0/127 = +0, id = 0, codes 0.
        assert_eq!(hex(&quant(&[0.0; 32])), hex(&[0u8; 34]));
        let mut x = [-0.0f32; 32];
        x[3] = 0.0;
        assert_eq!(hex(&quant(&x)), hex(&[0u8; 34]));
        // 1e6: d = 7874.0156 -> f16 rounds to 7876 = 0x6FB1; codes +-127.
        let mut x = [1e6f32; 32];
        x[1] = -1e6;
        let mut expected = vec![0xB1, 0x6F, 0x7F, 0x81];
        expected.resize(34, 0x7F);
        assert_eq!(hex(&quant(&x)), hex(&expected));
        // 3e38: d = 2.36e36 -> f16 +inf (0x7C00); id is finite, codes +-127.
        let x = block(&[3e38, -3e38]);
        let mut expected = vec![0x00, 0x7C, 0x7F, 0x81];
        expected.resize(34, 0);
        assert_eq!(hex(&quant(&x)), hex(&expected));
        // 1e-40: d = 7.9e-43 (subnormal), id = inf -> codes 0 (x86 / gguf-py), d -> f16 +0.
        let x = block(&[0.0, 0.0, 0.0, 1e-40, 0.0, -5e-41]);
        assert_eq!(hex(&quant(&x)), hex(&[0u8; 34]));
    }

    #[test]
    fn simd_rounding_is_roundf_on_every_tie_and_many_values() {
        // With amax = 127 the scale is exactly 1, so the codes are roundf(x) itself.
        let mut values: Vec<f32> = Vec::new();
        for k in 0..127 {
            let t = k as f32 + 0.5;
            for v in [t, f32::from_bits(t.to_bits() - 1), f32::from_bits(t.to_bits() + 1), k as f32] {
                values.push(v);
                values.push(-v);
            }
        }
        // Every 61st f32 in [0, 127].
        let mut b = 0u32;
        while f32::from_bits(b) <= 127.0 {
            values.push(f32::from_bits(b));
            values.push(-f32::from_bits(b));
            b += 61;
        }
        let mut src = Vec::new();
        for chunk in values.chunks(31) {
            src.push(127.0);
            src.extend_from_slice(chunk);
            src.resize(src.len().next_multiple_of(32), 0.0);
        }
        let mut q = vec![0u8; src.len() / 32 * 34];
        assert!(quantize_blocks_scalar(&src, &mut q));
        #[cfg(target_arch = "x86_64")]
        {
            let mut simd = vec![0u8; q.len()];
            assert!(simd_quantize(&src, &mut simd));
            assert!(simd == q, "AVX2 kernel vs portable");
        }
        for (bi, x) in src.chunks(32).enumerate() {
            assert_eq!(&q[bi * 34..bi * 34 + 2], &[0x00, 0x3C]);
            for (j, &v) in x.iter().enumerate() {
                assert_eq!(q[bi * 34 + 2 + j] as i8, v.round() as i8, "roundf({v:e})");
            }
        }
    }

    #[test]
    #[ignore = "exhaustive over every f32 in [-127, 127]: run in release by scripts/test.sh (about 15 s)"]
    fn simd_rounding_is_roundf_exhaustively() {
        // Blocks of [127, 31 values]: scale 1, so each code must be roundf(value).
        let end = 127.0f32.to_bits();
        let mut src = Vec::with_capacity(1 << 21);
        let mut q = vec![0u8; (1 << 21) / 32 * 34];
        let mut b = 0u32;
        while b <= end {
            src.clear();
            while src.len() < (1 << 21) && b <= end {
                src.push(127.0);
                for _ in 0..15 {
                    let v = f32::from_bits(b.min(end));
                    src.extend([v, -v]);
                    b += 1;
                }
                src.push(0.0);
            }
            let q = &mut q[..src.len() / 32 * 34];
            #[cfg(target_arch = "x86_64")]
            assert!(simd_quantize(&src, q));
            #[cfg(not(target_arch = "x86_64"))]
            assert!(quantize_blocks_scalar(&src, q));
            for (x, y) in src.chunks(32).zip(q.chunks(34)) {
                for (&v, &c) in x.iter().zip(&y[2..]) {
                    assert_eq!(c as i8, v.round() as i8, "roundf({v:e})");
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_matches_scalar_on_random_and_edge_blocks() {
        let blocks = lcg_block_values(4000);
        let mut a = vec![0u8; blocks.len() / 32 * 34];
        let mut b = a.clone();
        assert!(simd_quantize(&blocks, &mut a));
        assert!(quantize_blocks_scalar(&blocks, &mut b));
        assert!(a == b);
        let raw: Vec<u8> = (0..34 * 500 + 1).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut fa = vec![0f32; 500 * 32];
        let mut fb = fa.clone();
        simd_dequantize(&raw[1..], &mut fa);
        dequantize_blocks_scalar(&raw[1..], &mut fb);
        assert!(fa.iter().zip(&fb).all(|(p, q)| p.to_bits() == q.to_bits()));
        let mut y = [0f32; 32];
        BlockQ8_0::from_bytes(raw[1..35].try_into().unwrap()).dequantize(&mut y);
        assert!(y.iter().zip(&fa[..32]).all(|(p, q)| p.to_bits() == q.to_bits()));
    }

    #[test]
    fn round_trip_error_bound() {
        let blocks = lcg_block_values(2000);
        let mut q = vec![0u8; blocks.len() / 32 * 34];
        assert!(BlockQ8_0::quantize_blocks(&blocks, &mut q));
        let mut back = vec![0f32; blocks.len()];
        BlockQ8_0::dequantize_blocks(&q, &mut back);
        for (bi, (x, y)) in blocks.chunks(32).zip(back.chunks(32)).enumerate() {
            let d16 = f16_bits_to_f32(u16::from_le_bytes([q[bi * 34], q[bi * 34 + 1]]));
            if !d16.is_finite() {
                continue;
            }
            let d = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            if d != 0.0 && !(1.0 / d).is_finite() {
                continue; // tiny block: all codes 0 by definition
            }
            // Half a step, plus what the f16 rounding of the scale moves the largest code, plus f32 slack.
            let bound = d16 / 2.0 + 127.0 * (d16 - d).abs() + d * 1e-4;
            for (a, b) in x.iter().zip(y) {
                assert!((a - b).abs() <= bound, "block {bi}: {a} -> {b}, bound {bound}");
            }
        }
    }
}
