//! Small pieces shared by the read-only block formats (i-quants, ternary, fp4, q1_0/q2_0): little-endian field
//! reads at byte offsets, the grids as byte arrays, the "grid point times a scale, with per-value signs" expansion
//! of the i-quants, and their common [`dequantize_blocks`]: the portable per-block code, which the compiler
//! vectorises when it is compiled again with AVX2 enabled (`x86::lanes`; same values, tested below).
//!
//! The trap these helpers keep in one place: ggml writes a signed grid value as `db * grid[j] * (neg ? -1.f :
//! 1.f)`, and the reference build (gcc `-O2`) turns the multiplication by ±1 into a sign flip, so a NaN scale
//! comes out with its sign bit flipped for negative codes. [`negate_if`] is exactly that sign flip (Rust's `-x`
//! never rounds and flips the sign bit of NaN too), which equals the multiplication for every non-NaN value.

use super::float::f16_bits_to_f32;
#[cfg(test)]
use super::BlockFormat;

/// The little-endian `u16` at byte `at`.
#[inline(always)]
pub(super) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The little-endian `u32` at byte `at`.
#[inline(always)]
pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The f16 at byte `at`, widened as `GGML_FP16_TO_FP32` does.
#[inline(always)]
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_bits_to_f32(u16_at(b, at))
}

/// `v` with its sign bit flipped when `negative` (see the module docs); branch-free, as the signs are random.
#[inline(always)]
pub(super) fn negate_if(v: f32, negative: bool) -> f32 {
    f32::from_bits(v.to_bits() ^ (negative as u32) << 31)
}

/// A grid table of 8-byte entries as their bytes, lowest first: ggml reads its `uint64_t` grid entries as bytes on
/// a little-endian machine. Computed at compile time; byte arrays let the compiler load a run's magnitudes as one
/// vector.
pub(super) const fn grid_bytes8<const N: usize>(table: &[u64; N]) -> [[u8; 8]; N] {
    let mut out = [[0u8; 8]; N];
    let mut i = 0;
    while i < N {
        out[i] = table[i].to_le_bytes();
        i += 1;
    }
    out
}

/// [`grid_bytes8`] for tables of 4-byte entries.
pub(super) const fn grid_bytes4<const N: usize>(table: &[u32; N]) -> [[u8; 4]; N] {
    let mut out = [[0u8; 4]; N];
    let mut i = 0;
    while i < N {
        out[i] = table[i].to_le_bytes();
        i += 1;
    }
    out
}

/// Eight values of an i-quant run: `y[j] = db * grid[j]` (the unsigned magnitudes of a grid point), negated where
/// bit `j` of `signs` is set.
#[inline(always)]
pub(super) fn signed_grid8(y: &mut [f32; 8], db: f32, grid: &[u8; 8], signs: u8) {
    for j in 0..8 {
        y[j] = negate_if(db * grid[j] as f32, signs >> j & 1 != 0);
    }
}

/// The portable dequantize of whole blocks of `B` (its `dequantize_block` over them), for the tests that compare it
/// with the AVX2 compilation of the same loop.
#[cfg(test)]
pub(super) fn blocks_portable<B: BlockFormat>(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(B::BLOCK_BYTES).zip(dst.chunks_exact_mut(B::BLOCK_SIZE)) {
        B::dequantize_block(x, y);
    }
}

/// One block of `B` dequantized into a fresh vector (for the block files' golden tests).
#[cfg(test)]
pub(super) fn dequantize_one<B: super::BlockFormat>(b: &[u8]) -> Vec<f32> {
    let mut y = vec![f32::NAN; B::BLOCK_SIZE];
    B::dequantize_block(b, &mut y);
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_sign_flips() {
        let b = [0x00, 0x3C, 0x78, 0x56, 0x34, 0x12];
        assert_eq!(u16_at(&b, 0), 0x3C00);
        assert_eq!(u32_at(&b, 2), 0x1234_5678);
        assert_eq!(f16_at(&b, 0), 1.0);
        assert_eq!(negate_if(0.0, true).to_bits(), 0x8000_0000);
        assert_eq!(negate_if(f32::from_bits(0x7FC0_2000), true).to_bits(), 0xFFC0_2000);
        assert_eq!(negate_if(-3.5, false), -3.5);
        let mut y = [0.0f32; 8];
        // magnitudes 1..8 (lowest byte first), signs on values 0 and 7
        signed_grid8(&mut y, 0.5, &[1, 2, 3, 4, 5, 6, 7, 8], 0x81);
        assert_eq!(y, [-0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, -4.0]);
        assert_eq!(grid_bytes8(&[0x0807_0605_0403_0201]), [[1, 2, 3, 4, 5, 6, 7, 8]]);
        assert_eq!(grid_bytes4(&[0x0403_0201, 0xFF]), [[1, 2, 3, 4], [0xFF, 0, 0, 0]]);
    }

    /// Random block bytes (an LCG): every field pattern, NaN/inf/subnormal scales included.
    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (state >> 56) as u8
            })
            .collect()
    }

    /// The AVX2 compilation of [`blocks_portable`] gives the same bits as the portable one. Fails (rather than
    /// passing vacuously) on an x86-64 machine without AVX2 or when the AVX2 entry point does not run.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_compilation_equals_portable() {
        use super::super::*;

        fn check<B: BlockFormat>() {
            let blocks = 300;
            let src = random_bytes(blocks * B::BLOCK_BYTES, B::TYPE.id() as u64 + 1);
            let mut portable = vec![0f32; blocks * B::BLOCK_SIZE];
            let mut avx2 = vec![1f32; blocks * B::BLOCK_SIZE];
            blocks_portable::<B>(&src, &mut portable);
            let work = DequantizeBlocks::<B> { src: &src, dst: &mut avx2, block: std::marker::PhantomData };
            assert!(super::super::x86::with_avx2(work).is_ok(), "AVX2 path not taken");
            let same = portable.iter().zip(&avx2).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{}: AVX2 and portable compilations differ", B::TYPE);
            // f16 scales: some random ones are NaN (the fp4 formats' scales never are).
            let fp4 = matches!(B::TYPE, GgmlType::MXFP4 | GgmlType::NVFP4);
            assert!(fp4 || portable.iter().any(|v| v.is_nan()), "{}: no NaN scale drawn", B::TYPE);
        }
        assert!(is_x86_feature_detected!("avx2"), "this test needs an AVX2 machine to compare the two compilations");
        check::<BlockIq1S>();
        check::<BlockIq1M>();
        check::<BlockIq2Xxs>();
        check::<BlockIq2Xs>();
        check::<BlockIq2S>();
        check::<BlockIq3Xxs>();
        check::<BlockIq3S>();
        check::<BlockIq4Nl>();
        check::<BlockIq4Xs>();
        check::<BlockTq1_0>();
        check::<BlockTq2_0>();
        check::<BlockMxfp4>();
        check::<BlockNvfp4>();
        check::<BlockQ1_0>();
        check::<BlockQ2_0>();
    }
}
