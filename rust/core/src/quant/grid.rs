//! Small pieces shared by the read-only block formats (i-quants, ternary, fp4, q1_0/q2_0): little-endian field
//! reads at byte offsets, and the "grid point times a scale, with per-value signs" expansion of the i-quants.
//!
//! The trap these helpers keep in one place: ggml writes a signed grid value as `db * grid[j] * (neg ? -1.f :
//! 1.f)`, and the reference build (gcc `-O2`) turns the multiplication by ±1 into a sign flip, so a NaN scale
//! comes out with its sign bit flipped for negative codes. [`negate_if`] is exactly that sign flip (Rust's `-x`
//! never rounds and flips the sign bit of NaN too), which equals the multiplication for every non-NaN value.

use super::float::f16_bits_to_f32;

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

/// `v` with its sign bit flipped when `negative` (see the module docs).
#[inline(always)]
pub(super) fn negate_if(v: f32, negative: bool) -> f32 {
    if negative {
        -v
    } else {
        v
    }
}

/// Eight values of an i-quant group: `y[j] = db * grid[j]`, negated where bit `j` of `signs` is set. `grid` holds
/// the eight unsigned magnitudes, lowest byte first (ggml reads its `uint64_t`/`uint32_t` grid entries as bytes on
/// a little-endian machine).
#[inline(always)]
pub(super) fn signed_grid8(y: &mut [f32], db: f32, grid: u64, signs: u8) {
    for (j, (v, g)) in y[..8].iter_mut().zip(grid.to_le_bytes()).enumerate() {
        *v = negate_if(db * g as f32, signs >> j & 1 != 0);
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
        signed_grid8(&mut y, 0.5, 0x0807_0605_0403_0201, 0x81);
        assert_eq!(y, [-0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, -4.0]);
    }
}
