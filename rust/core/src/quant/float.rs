//! The plain float element types: f32, f16 and bf16, with ggml's exact scalar conversions.
//!
//! The scalar conversions are transcriptions of ggml's software routines (`ggml-impl.h`), so that NaN, infinity,
//! subnormals and ties come out exactly as ggml writes them. The bulk row kernels use F16C when the CPU has it (same
//! bits for every finite input; non-finite inputs are refused by the quantize entry points anyway).

use super::{BlockFormat, Quantize};
use crate::GgmlType;

/// `GGML_FP32_TO_FP16`: ggml's `ggml_compute_fp32_to_fp16` (round to nearest even; overflow gives ±inf; NaN gives
/// `sign | 0x7E00`, dropping the payload).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    // Maratos' FP16 algorithm as in ggml: the two multiplications round the mantissa to 10 bits (nearest even)
    // and push overflowing values to infinity; the addition of a power of two aligns subnormals.
    let scale_to_inf = f32::from_bits(0x7780_0000); // 0x1.0p+112f
    let scale_to_zero = f32::from_bits(0x0880_0000); // 0x1.0p-110f
    let mut base = (x.abs() * scale_to_inf) * scale_to_zero;
    let w = x.to_bits();
    let shl1_w = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let mut bias = shl1_w & 0xFF00_0000;
    if bias < 0x7100_0000 {
        bias = 0x7100_0000;
    }
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let exp_bits = (bits >> 13) & 0x0000_7C00;
    let mantissa_bits = bits & 0x0000_0FFF;
    let nonsign = exp_bits + mantissa_bits;
    ((sign >> 16) | if shl1_w > 0xFF00_0000 { 0x7E00 } else { nonsign }) as u16
}

/// `GGML_FP16_TO_FP32`: ggml's `ggml_compute_fp16_to_fp32` (exact; NaN payloads are kept and quieted).
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let w = (h as u32) << 16;
    let sign = w & 0x8000_0000;
    let two_w = w.wrapping_add(w);
    let exp_offset = 0xE0u32 << 23;
    let exp_scale = f32::from_bits(0x0780_0000); // 0x1.0p-112f
    let normalized = f32::from_bits((two_w >> 4) + exp_offset) * exp_scale;
    let magic_mask = 126u32 << 23;
    let denormalized = f32::from_bits((two_w >> 17) | magic_mask) - 0.5;
    let denormalized_cutoff = 1u32 << 27;
    let result = sign | if two_w < denormalized_cutoff { denormalized.to_bits() } else { normalized.to_bits() };
    f32::from_bits(result)
}

/// ggml's `ggml_compute_fp32_to_bf16`: NaN becomes `(bits >> 16) | 64` (forced quiet), everything else is rounded to
/// nearest even on the upper 16 bits (so large finite values may round to ±inf).
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16
}

/// ggml's `ggml_compute_bf16_to_fp32`: the bits shifted into the upper half (exact).
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Largest absolute-value bit pattern of `src` (`bits & 0x7FFF_FFFF`, maximum as integers); the slice is all
/// finite iff the result is below `0x7F80_0000`. Written so the compiler vectorizes it.
#[inline(always)]
pub(super) fn max_abs_bits(src: &[f32]) -> u32 {
    let mut acc = [0u32; 16];
    let mut chunks = src.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = (*a).max(v.to_bits() & 0x7FFF_FFFF);
        }
    }
    let tail = chunks.remainder().iter().fold(0, |m, v| u32::max(m, v.to_bits() & 0x7FFF_FFFF));
    acc.iter().fold(tail, |m, &a| m.max(a))
}

/// Writes `f(x)` for every element (`N` bytes each) and returns whether all elements were finite; written in
/// fixed-size groups so the compiler vectorizes both the check and the conversion.
#[inline]
fn convert_checked<const N: usize>(src: &[f32], dst: &mut [u8], f: impl Fn(f32) -> [u8; N]) -> bool {
    const G: usize = 16;
    let mut acc = [0u32; G];
    let mut s = src.chunks_exact(G);
    let mut d = dst.chunks_exact_mut(G * N);
    for (x, y) in (&mut s).zip(&mut d) {
        for i in 0..G {
            acc[i] = acc[i].max(x[i].to_bits() & 0x7FFF_FFFF);
            y[i * N..i * N + N].copy_from_slice(&f(x[i]));
        }
    }
    let mut ok = true;
    for (&x, y) in s.remainder().iter().zip(d.into_remainder().chunks_exact_mut(N)) {
        ok &= x.is_finite();
        y.copy_from_slice(&f(x));
    }
    ok && acc.iter().all(|&a| a < 0x7F80_0000)
}

/// The f32 element type (`GGML_TYPE_F32`): little-endian IEEE single.
pub struct F32;

impl BlockFormat for F32 {
    const TYPE: GgmlType = GgmlType::F32;

    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        Self::dequantize_blocks(src, dst)
    }

    fn dequantize_blocks(src: &[u8], dst: &mut [f32]) {
        debug_assert_eq!(src.len(), dst.len() * 4);
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        }
    }
}

impl Quantize for F32 {
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        Self::quantize_blocks(src, dst);
    }

    /// A little-endian copy (what ggml's `ggml_cpy` to f32 writes).
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        debug_assert_eq!(dst.len(), src.len() * 4);
        convert_checked::<4>(src, dst, |x| x.to_le_bytes())
    }
}

/// The f16 element type (`GGML_TYPE_F16`): little-endian IEEE half.
pub struct F16;

impl BlockFormat for F16 {
    const TYPE: GgmlType = GgmlType::F16;

    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        Self::dequantize_blocks(src, dst)
    }

    /// `ggml_fp16_to_fp32_row` (each element through [`f16_bits_to_f32`]; F16C `vcvtph2ps` when available).
    fn dequantize_blocks(src: &[u8], dst: &mut [f32]) {
        debug_assert_eq!(src.len(), dst.len() * 2);
        #[cfg(target_arch = "x86_64")]
        if super::x86::f16_to_f32_row(src, dst) {
            return;
        }
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
            *d = f16_bits_to_f32(u16::from_le_bytes([s[0], s[1]]));
        }
    }
}

impl Quantize for F16 {
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        Self::quantize_blocks(src, dst);
    }

    /// `ggml_fp32_to_fp16_row` (each element through [`f32_to_f16_bits`]; F16C `vcvtps2ph` when available, which
    /// gives the same bits for every finite input).
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        debug_assert_eq!(dst.len(), src.len() * 2);
        #[cfg(target_arch = "x86_64")]
        if let Some(ok) = super::x86::f32_to_f16_row(src, dst) {
            return ok;
        }
        convert_checked::<2>(src, dst, |x| f32_to_f16_bits(x).to_le_bytes())
    }
}

/// The bf16 element type (`GGML_TYPE_BF16`): the upper half of an f32, little-endian.
pub struct BF16;

impl BlockFormat for BF16 {
    const TYPE: GgmlType = GgmlType::BF16;

    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        Self::dequantize_blocks(src, dst)
    }

    /// `ggml_bf16_to_fp32_row` (each element through [`bf16_bits_to_f32`]).
    fn dequantize_blocks(src: &[u8], dst: &mut [f32]) {
        debug_assert_eq!(src.len(), dst.len() * 2);
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
            *d = bf16_bits_to_f32(u16::from_le_bytes([s[0], s[1]]));
        }
    }
}

impl Quantize for BF16 {
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        Self::quantize_blocks(src, dst);
    }

    /// `ggml_fp32_to_bf16_row_ref` (each element through [`f32_to_bf16_bits`]).
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        debug_assert_eq!(dst.len(), src.len() * 2);
        convert_checked::<2>(src, dst, |x| {
            // Finite input (non-finite makes the whole call fail): only the rounding branch of `f32_to_bf16_bits`.
            let u = x.to_bits();
            ((u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16).to_le_bytes()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "x86_64")]
    use crate::quant::test_util::NO_SIMD;

    /// Reference f32 -> f16 from the `half` crate (round to nearest even) with ggml's NaN rule applied on top.
    fn half_ref(x: f32) -> u16 {
        if x.is_nan() {
            ((x.to_bits() >> 16) as u16 & 0x8000) | 0x7E00
        } else {
            half::f16::from_f32(x).to_bits()
        }
    }

    #[test]
    fn f16_hand_picked_cases() {
        let cases: &[(f32, u16)] = &[
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3C00),
            (-2.0, 0xC000),
            (65504.0, 0x7BFF),
            // 65519.996 is below the midpoint 65520 between 65504 and 65536 (inf): stays finite.
            (65519.0, 0x7BFF),
            (65519.996, 0x7BFF),
            // 65520 is exactly the midpoint; 0x7BFF is odd, so it rounds up to infinity.
            (65520.0, 0x7C00),
            (-65520.0, 0xFC00),
            (1e6, 0x7C00),
            (3e38, 0x7C00),
            (f32::INFINITY, 0x7C00),
            (f32::NEG_INFINITY, 0xFC00),
            (f32::NAN, 0x7E00),
            (-f32::NAN, 0xFE00),
            (f32::from_bits(0x7F80_0001), 0x7E00), // signalling NaN: payload dropped
            (f32::from_bits(0xFFFF_FFFF), 0xFE00),
            // Smallest f16 subnormal 2^-24, and ties around it.
            (5.960_464_5e-8, 0x0001),
            (2.980_232_2e-8, 0x0000),              // 2^-25: tie between 0 and 2^-24 -> even (0)
            (f32::from_bits(0x3300_0001), 0x0001), // just above the tie
            (8.940_697e-8, 0x0002),                // 1.5 * 2^-24: tie between 1 and 2 -> even (2)
            (1.490_116_1e-7, 0x0002),              // 2.5 * 2^-24: tie between 2 and 3 -> even (2)
            (6.097_555e-5, 0x03FF),                // largest subnormal
            (6.103_515_6e-5, 0x0400),              // smallest normal 2^-14
            (1.0 + 1.0 / 2048.0, 0x3C00),          // tie between 1 and 1+2^-10 -> even (1)
            (1.0 + 3.0 / 2048.0, 0x3C02),          // tie between 1+2^-10 and 1+2^-9 -> even
            (1e-10, 0x0000),
            (-1e-10, 0x8000),
        ];
        for &(x, bits) in cases {
            assert_eq!(f32_to_f16_bits(x), bits, "f32_to_f16_bits({x:e})");
        }
    }

    #[test]
    fn f16_matches_half_on_a_spread_of_bit_patterns() {
        // Every 4099th bit pattern (about a million values spanning all exponents), plus the neighbourhood of
        // every f16 rounding boundary in the normal range.
        let mut u: u64 = 0;
        while u <= u32::MAX as u64 {
            let x = f32::from_bits(u as u32);
            assert_eq!(f32_to_f16_bits(x), half_ref(x), "bits {u:#010x}");
            u += 4099;
        }
        for h in 0u16..0x7C00 {
            let x = half::f16::from_bits(h).to_f32().to_bits();
            for b in [x.wrapping_sub(1), x, x + 1, x + 0x1000 - 1, x + 0x1000, x + 0x1001] {
                let v = f32::from_bits(b);
                assert_eq!(f32_to_f16_bits(v), half_ref(v), "bits {b:#010x}");
                assert_eq!(f32_to_f16_bits(-v), half_ref(-v), "bits -{b:#010x}");
            }
        }
    }

    #[test]
    #[ignore = "exhaustive over 2^32 values: run in release by scripts/test.sh (about 15 s)"]
    fn f16_matches_half_exhaustively() {
        // The scalar conversion against the `half` crate for every bit pattern, and the F16C row kernel (called
        // directly, x86-64) against the scalar one for every finite pattern, in chunks.
        const CHUNK: u32 = 1 << 16;
        let mut src = vec![0f32; CHUNK as usize];
        let mut simd = vec![0u8; 2 * CHUNK as usize];
        for start in (0..=u32::MAX - (CHUNK - 1)).step_by(CHUNK as usize) {
            for (k, x) in src.iter_mut().enumerate() {
                let u = start + k as u32;
                *x = f32::from_bits(u);
                assert_eq!(f32_to_f16_bits(*x), half_ref(*x), "bits {u:#010x}");
            }
            #[cfg(target_arch = "x86_64")]
            if src.iter().all(|x| x.is_finite()) {
                assert_eq!(crate::quant::x86::f32_to_f16_row(&src, &mut simd), Some(true), "{NO_SIMD}");
                for (x, h) in src.iter().zip(simd.chunks_exact(2)) {
                    assert_eq!(u16::from_le_bytes([h[0], h[1]]), f32_to_f16_bits(*x), "F16C on {:#010x}", x.to_bits());
                }
            }
        }
    }

    #[test]
    fn f16_to_f32_is_exact_for_every_half() {
        for h in 0..=u16::MAX {
            let got = f16_bits_to_f32(h);
            let want = half::f16::from_bits(h).to_f32();
            assert_eq!(got.to_bits(), want.to_bits(), "h {h:#06x}");
            if !got.is_nan() {
                assert_eq!(f32_to_f16_bits(got), h, "round trip {h:#06x}");
            }
        }
        // Signalling NaN comes out quiet, payload kept (black_box: a release build would fold the constant NaN
        // arithmetic at compile time, with LLVM's canonical NaN, unlike the run-time multiply).
        assert_eq!(f16_bits_to_f32(std::hint::black_box(0x7C01)).to_bits(), 0x7FC0_2000);
        assert_eq!(f16_bits_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f16_bits_to_f32(0xFC00), f32::NEG_INFINITY);
    }

    #[test]
    fn bf16_cases() {
        let cases: &[(u32, u16)] = &[
            (0x3F80_0000, 0x3F80),      // 1.0
            (0x3F80_8000, 0x3F80),      // tie, even stays
            (0x3F81_8000, 0x3F82),      // tie, odd rounds up
            (0x3F80_8001, 0x3F81),      // above tie
            (0x3F80_7FFF, 0x3F80),      // below tie
            (0x7F7F_FFFF, 0x7F80),      // f32::MAX rounds to +inf
            (0xFF7F_FFFF, 0xFF80),      // -f32::MAX rounds to -inf
            (0x7F80_0000, 0x7F80),      // +inf
            (0x8000_0000, 0x8000),      // -0
            (0x0000_0001, 0x0000),      // smallest subnormal rounds to 0
            (0x0000_8000, 0x0000),      // tie to even 0
            (0x0001_8000, 0x0002),      // tie to even 2
            (0x7FC0_0000, 0x7FC0),      // quiet NaN
            (0x7F80_0001, 0x7FC0),      // sNaN with low payload: quiet bit forced
            (0xFF81_2345, 0xFF81 | 64), // negative sNaN keeps sign and high payload
            (0x7FFF_FFFF, 0x7FFF),      // NaN: truncated, not rounded
        ];
        for &(x, h) in cases {
            assert_eq!(f32_to_bf16_bits(f32::from_bits(x)), h, "{x:#010x}");
        }
        for h in 0..=u16::MAX {
            let f = bf16_bits_to_f32(h);
            assert_eq!(f.to_bits(), (h as u32) << 16);
            if !f.is_nan() {
                assert_eq!(f32_to_bf16_bits(f), h);
            }
        }
    }

    #[test]
    fn row_kernels_match_scalar_conversions() {
        let src: Vec<f32> = (0..1000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761) & 0xBFFF_FFFF)) // finite, all magnitudes
            .chain([65520.0, 65519.0, -0.0, 1e-8, 2.980_232_2e-8])
            .collect();
        assert!(max_abs_bits(&src) < 0x7F80_0000);
        let mut h = vec![0u8; src.len() * 2];
        assert!(F16::quantize_blocks(&src, &mut h));
        // The F16C kernels, called directly on x86-64 (the dispatcher would fall back to the scalar code).
        #[cfg(target_arch = "x86_64")]
        {
            let mut simd = vec![0u8; src.len() * 2];
            assert_eq!(crate::quant::x86::f32_to_f16_row(&src, &mut simd), Some(true), "{NO_SIMD}");
            assert!(simd == h);
            let mut back = vec![0f32; src.len()];
            assert!(crate::quant::x86::f16_to_f32_row(&h, &mut back), "{NO_SIMD}");
            for (y, c) in back.iter().zip(h.chunks_exact(2)) {
                assert_eq!(y.to_bits(), f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]])).to_bits());
            }
        }
        let mut b = vec![0u8; src.len() * 2];
        assert!(BF16::quantize_blocks(&src, &mut b));
        let mut f = vec![0u8; src.len() * 4];
        assert!(F32::quantize_blocks(&src, &mut f));
        for (i, &x) in src.iter().enumerate() {
            assert_eq!(u16::from_le_bytes([h[2 * i], h[2 * i + 1]]), f32_to_f16_bits(x), "f16 of {x:e}");
            assert_eq!(u16::from_le_bytes([b[2 * i], b[2 * i + 1]]), f32_to_bf16_bits(x), "bf16 of {x:e}");
            assert_eq!(&f[4 * i..4 * i + 4], &x.to_le_bytes());
        }
        let mut back = vec![0f32; src.len()];
        F16::dequantize_blocks(&h, &mut back);
        for (i, &y) in back.iter().enumerate() {
            assert_eq!(y.to_bits(), f16_bits_to_f32(u16::from_le_bytes([h[2 * i], h[2 * i + 1]])).to_bits());
        }
        // Every f16 bit pattern through the bulk kernel, at an odd (misaligned) offset.
        let all: Vec<u8> = std::iter::once(0xAAu8).chain((0..=u16::MAX).flat_map(|h| h.to_le_bytes())).collect();
        let mut out = vec![0f32; 65536];
        F16::dequantize_blocks(&all[1..], &mut out);
        for (h, y) in out.iter().enumerate() {
            assert_eq!(y.to_bits(), f16_bits_to_f32(h as u16).to_bits(), "h {h:#06x}");
        }
        BF16::dequantize_blocks(&all[1..], &mut out);
        for (h, y) in out.iter().enumerate() {
            assert_eq!(y.to_bits(), (h as u32) << 16);
        }
    }

    #[test]
    fn row_kernels_refuse_non_finite() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for pos in [0, 7, 8, 30] {
                let mut src = vec![1.0f32; 31];
                src[pos] = bad;
                assert!(!F32::quantize_blocks(&src, &mut [0; 31 * 4]));
                assert!(!F16::quantize_blocks(&src, &mut [0; 31 * 2]));
                assert!(!BF16::quantize_blocks(&src, &mut [0; 31 * 2]));
            }
        }
    }
}
