//! q5_1: blocks of 32 weights as an f16 scale `d`, an f16 min `m` and 32 unsigned 5-bit codes (`x = d * q + m`).
//!
//! **Layout** (`block_q5_1`, 24 bytes): `d`, `m` (f16, little-endian), `qh` (4 bytes, a little-endian u32 whose bit
//! `j` is the fifth bit of code `j`), `qs[16]` (low nibbles, `q[j] | q[j + 16] << 4`).
//!
//! **Reproduces** `quantize_row_q5_1_ref` (as q4_1's with `d = (max - min)/31` and codes
//! `(uint8_t)((x - min) * id + 0.5f)`, unclamped), `quantize_row_q5_1_impl` (as q4_1's with `nmax` 31) and
//! `dequantize_row_q5_1`. Traps: those of q4_1 (`q4_1.rs`); C's float to `uint8_t` conversion is, on x86, the
//! same truncation to int32 followed by the low byte.

use super::float::{f16_bits_to_f32, f32_to_f16_bits};
use super::q4_1::{add_nan_first, min_scale, quantize_blocks_scalar, WeightedLanes, QK4_1};
use super::{c_float_to_i8, run_lanes, BlockFormat, Quantize};
use crate::GgmlType;

/// One q5_1 block as ggml lays it out (`block_q5_1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockQ5_1 {
    /// Scale, as f16 bits.
    pub d: u16,
    /// Min (the value of code 0), as f16 bits.
    pub m: u16,
    /// The fifth bits of the 32 codes (bit `j` for code `j`).
    pub qh: u32,
    /// The low 4 bits of the codes: element `j` in the low nibble of byte `j`, element `j + 16` in its high nibble.
    pub qs: [u8; QK4_1 / 2],
}

impl BlockQ5_1 {
    /// Reads a block from its 24 on-disk bytes.
    pub fn from_bytes(b: &[u8; 24]) -> BlockQ5_1 {
        BlockQ5_1 {
            d: u16::from_le_bytes([b[0], b[1]]),
            m: u16::from_le_bytes([b[2], b[3]]),
            qh: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            qs: b[8..].try_into().expect("16 bytes"),
        }
    }

    /// The block's 24 on-disk bytes.
    pub fn to_bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..2].copy_from_slice(&self.d.to_le_bytes());
        b[2..4].copy_from_slice(&self.m.to_le_bytes());
        b[4..8].copy_from_slice(&self.qh.to_le_bytes());
        b[8..].copy_from_slice(&self.qs);
        b
    }

    /// The block of scale `d`, min `m` and codes `l` (values 0..32, only their low 5 bits are kept).
    pub(super) fn from_codes(d: f32, m: f32, l: &[u8; QK4_1]) -> BlockQ5_1 {
        let mut qs = [0u8; QK4_1 / 2];
        let mut qh = 0u32;
        for (j, q) in qs.iter_mut().enumerate() {
            let (lo, hi) = (l[j], l[j + 16]);
            *q = (lo & 0xF) | ((hi & 0xF) << 4);
            qh |= (((lo & 0x10) >> 4) as u32) << j | (((hi & 0x10) >> 4) as u32) << (j + 16);
        }
        BlockQ5_1 { d: f32_to_f16_bits(d), m: f32_to_f16_bits(m), qh, qs }
    }

    /// One block of `quantize_row_q5_1_ref`.
    pub fn quantize(x: &[f32; QK4_1]) -> BlockQ5_1 {
        let (min, d, id) = min_scale(x, 31.0);
        let l = x.map(|v| c_float_to_i8((v - min) * id + 0.5) as u8);
        BlockQ5_1::from_codes(d, min, &l)
    }

    /// One block of `dequantize_row_q5_1`.
    pub fn dequantize(&self, y: &mut [f32; QK4_1]) {
        let d = f16_bits_to_f32(self.d);
        let m = f16_bits_to_f32(self.m);
        for (j, &q) in self.qs.iter().enumerate() {
            let h0 = ((self.qh >> j) << 4) & 0x10;
            let h1 = (self.qh >> (j + 12)) & 0x10;
            y[j] = add_nan_first(((q & 0xF) as u32 | h0) as f32 * d, m);
            y[j + 16] = add_nan_first(((q >> 4) as u32 | h1) as f32 * d, m);
        }
    }
}

impl BlockFormat for BlockQ5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;

    /// See [`BlockQ5_1::dequantize`].
    fn dequantize_block(src: &[u8], dst: &mut [f32]) {
        BlockQ5_1::from_bytes(src.try_into().expect("one whole block")).dequantize(dst.try_into().expect("one block"));
    }

    /// `dequantize_row_q5_1`; AVX2 when available, same values.
    fn dequantize_blocks(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::x86::q4_1_q5_1_dequantize::<5>(src, dst, Self::dequantize_block) {
            return;
        }
        for (x, y) in src.chunks_exact(Self::BLOCK_BYTES).zip(dst.chunks_exact_mut(QK4_1)) {
            Self::dequantize_block(x, y);
        }
    }
}

impl Quantize for BlockQ5_1 {
    const TAKES_IMATRIX: bool = true;

    /// See [`BlockQ5_1::quantize`].
    fn quantize_block(src: &[f32], dst: &mut [u8]) {
        dst.copy_from_slice(&BlockQ5_1::quantize(src.try_into().expect("one whole block")).to_bytes());
    }

    /// `quantize_row_q5_1_ref`; AVX2 when available, same bytes.
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Some(ok) = super::x86::q4_1_q5_1_quantize::<5>(src, dst, Self::quantize_block) {
            return ok;
        }
        quantize_blocks_scalar::<Self>(src, dst)
    }

    /// `quantize_row_q5_1_impl` on one row.
    fn quantize_row_weighted(src: &[f32], weights: &[f32], dst: &mut [u8]) {
        run_lanes(WeightedLanes {
            src,
            weights,
            dst,
            nmax: 31,
            block_bytes: 24,
            block: |d: f32, m: f32, l: &[u8; QK4_1], y: &mut [u8]| {
                y.copy_from_slice(&BlockQ5_1::from_codes(d, m, l).to_bytes())
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::test_util::hex;

    /// Expected bytes worked out by hand from the C formula, not from this code.
    #[test]
    fn golden_unit_scale_block() {
        // min -1, max 30: d = 31/31 = 1 (0x3C00), m = -1 (0xBC00), code = trunc(x + 1 + 0.5) = j for x = j - 1,
        // except x[5] = 3.49 -> trunc(4.99) = 4. Low nibbles j | (j+16) << 4 -> 0xjj (0x54 at 5), fifth bits set
        // for codes 16..32.
        let mut x: [f32; 32] = std::array::from_fn(|j| j as f32 - 1.0);
        x[5] = 3.49;
        let mut expected = vec![0x00, 0x3C, 0x00, 0xBC, 0x00, 0x00, 0xFF, 0xFF];
        expected.extend((0..16u8).map(|j| if j == 5 { 0x54 } else { j * 0x11 }));
        let mut out = [0u8; 24];
        assert!(BlockQ5_1::quantize_blocks(&x, &mut out));
        assert_eq!(hex(&out), hex(&expected));
    }

    #[test]
    fn golden_dequantize() {
        // d = 2 (0x4000), m = 0.25 (0x3400), fifth bits of elements 1 and 17: y = (q + 16 h) * 2 + 0.25.
        let mut b = [0u8; 24];
        b[..4].copy_from_slice(&[0x00, 0x40, 0x00, 0x34]);
        b[4..8].copy_from_slice(&((1u32 << 1) | (1 << 17)).to_le_bytes());
        for j in 0..16 {
            b[8 + j] = (j as u8) | (3 << 4);
        }
        let mut y = [0f32; 32];
        BlockQ5_1::dequantize_block(&b, &mut y);
        for j in 0..16 {
            let h = if j == 1 { 16.0 } else { 0.0 };
            assert_eq!(y[j], (j as f32 + h) * 2.0 + 0.25);
            assert_eq!(y[j + 16], (3.0 + h) * 2.0 + 0.25);
        }
    }
}
