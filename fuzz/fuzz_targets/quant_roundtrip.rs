//! Quantize/dequantize on arbitrary floats and bytes, for every type the crate reads or writes.
//!
//! First byte: mode and row length; second byte: the type (any type the crate can quantize in float mode, any it
//! can dequantize in byte mode). Float mode: the rest is read as f32 values (whole rows), quantized (with
//! importance weights taken from the data when the mode bit says so) and dequantized; non-finite input must be
//! refused with `NonFinite` naming the first bad index; finite input must come back finite wherever the block
//! scale is finite, and within the type's per-block bound for the types that have a simple one. Byte mode: the rest
//! is dequantized as raw blocks (any bit pattern) and must not panic. Serial and parallel paths must agree.
#![no_main]

use ggml_lora_core::quant::{
    self, bf16_bits_to_f32, dequantize_rows, dequantize_rows_par, f16_bits_to_f32, quantize_rows, quantize_rows_par,
};
use ggml_lora_core::{Error, GgmlType};
use libfuzzer_sys::fuzz_target;


/// Largest error allowed for each element of `block` (one block of `ty`) given its quantized bytes `q`.
fn bound(ty: GgmlType, block: &[f32], q: &[u8], x: f32) -> Option<f64> {
    let amax = block.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
    match ty {
        GgmlType::F32 => Some(0.0),
        // Round to nearest: half an ulp relative (2^-11), or half the smallest subnormal step (2^-25).
        // Values that overflow f16 (|x| >= 65520) become inf, as in ggml: no bound.
        GgmlType::F16 => (x.abs() < 65520.0).then(|| (f64::from(x.abs()) * 2f64.powi(-11)).max(2f64.powi(-25))),
        GgmlType::BF16 => (x.abs() < 3.389e38).then(|| (f64::from(x.abs()) * 2f64.powi(-8)).max(2f64.powi(-133))),
        GgmlType::Q8_0 => {
            let d16 = f64::from(f16_bits_to_f32(u16::from_le_bytes([q[0], q[1]])));
            if !d16.is_finite() {
                return None; // the scale overflowed f16 (amax > ~8.3e6): ggml writes inf too
            }
            let d = amax / 127.0;
            let tiny = d != 0.0 && !(1.0 / (d as f32)).is_finite();
            // Half a step, the f16 rounding of the scale times the largest code, f32 slack; a "tiny" block
            // (1/d overflows) codes everything 0: error at most amax.
            let b = d16.abs() / 2.0 + 127.0 * (d16.abs() - d).abs() + d * 1e-4;
            Some(if tiny { b.max(amax) } else { b })
        }
        GgmlType::Q4_0 => {
            let d16 = f64::from(f16_bits_to_f32(u16::from_le_bytes([q[0], q[1]])));
            if !d16.is_finite() {
                return None;
            }
            let d = amax / 8.0;
            let tiny = d != 0.0 && !(1.0 / (d as f32)).is_finite();
            // d/2 except at the clamped end (code 16 -> 15): d; plus 8x the f16 error of the scale; f32 slack.
            let b = d + 8.0 * (d16.abs() - d).abs() + amax * 1e-6;
            Some(if tiny { b.max(amax) } else { b })
        }
        // The other types search for their scales; they have no closed-form bound, only the finiteness check.
        _ => None,
    }
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fuzz_target!(|data: &[u8]| {
    let [sel, type_byte, rest @ ..] = data else { return };
    let floats_mode = sel & 8 == 0;
    let types: Vec<GgmlType> = GgmlType::ALL
        .iter()
        .copied()
        .filter(|&t| if floats_mode { quant::can_quantize(t) } else { quant::can_dequantize(t) })
        .collect();
    let ty = types[usize::from(*type_byte) % types.len()];
    let (bs, bb) = (ty.block_size(), ty.block_bytes());
    let blocks_per_row = usize::from((sel >> 4) % 4) + 1;
    let row_len = bs * blocks_per_row;
    if floats_mode {
        // Floats; with bit 2 set, the first row's worth of values (absolute values, non-finite ones zeroed)
        // becomes the importance weights.
        let floats: Vec<f32> = rest.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let use_imatrix = sel & 4 != 0 && floats.len() >= row_len;
        let (weights, floats) = if use_imatrix {
            let w: Vec<f32> = floats[..row_len].iter().map(|v| if v.is_finite() { v.abs() } else { 0.0 }).collect();
            (Some(w), &floats[row_len..])
        } else {
            (None, &floats[..])
        };
        let n = floats.len() / row_len * row_len;
        let src = &floats[..n];
        let mut q = vec![0u8; n / bs * bb];
        let serial = quantize_rows(ty, src, row_len, &mut q, weights.as_deref());
        let mut q_par = vec![0u8; q.len()];
        let par = quantize_rows_par(ty, src, row_len, &mut q_par, weights.as_deref());
        match src.iter().position(|v| !v.is_finite()) {
            Some(first) => {
                for r in [&serial, &par] {
                    match r {
                        Err(Error::NonFinite { index, ty: t, .. }) => assert_eq!((*index, *t), (first, ty)),
                        other => panic!("non-finite input at {first} gave {other:?}"),
                    }
                }
                return;
            }
            None => {
                serial.expect("finite input must quantize");
                par.expect("finite input must quantize");
                assert_eq!(q, q_par, "parallel quantization differs");
            }
        }
        let mut back = vec![0f32; n];
        dequantize_rows(ty, &q, row_len, &mut back).unwrap();
        // Without weights, inputs whose largest magnitude stays well inside f16 range give finite output for every
        // type (f16 scales then cannot overflow; weighted searches may divide by a zero weight sum, as ggml does).
        if weights.is_none() && src.iter().all(|v| v.abs() < 1e4) {
            assert!(back.iter().all(|v| v.is_finite()), "{ty}: finite input of moderate size gave non-finite output");
        }
        for (bi, (block, qb)) in src.chunks(bs).zip(q.chunks(bb)).enumerate() {
            for (j, &x) in block.iter().enumerate() {
                let y = back[bi * bs + j];
                if let Some(b) = bound(ty, block, qb, x).filter(|_| weights.is_none() || ty != GgmlType::Q4_0) {
                    let err = (f64::from(x) - f64::from(y)).abs();
                    assert!(err <= b, "{ty} block {bi}: {x:e} -> {y:e} (error {err:e} > bound {b:e}); block {block:?}");
                }
            }
        }
        // Float types round-trip exactly once rounded: requantizing the dequantized values gives the same bytes.
        if matches!(ty, GgmlType::F16 | GgmlType::BF16 | GgmlType::F32) && back.iter().all(|v| v.is_finite()) {
            let mut q2 = vec![0u8; q.len()];
            quantize_rows(ty, &back, row_len, &mut q2, None).unwrap();
            assert_eq!(q, q2);
        }
    } else {
        // Bytes: any bit pattern dequantizes without panicking, serial == parallel.
        let n_rows = rest.len() / (bb * blocks_per_row);
        let src = &rest[..n_rows * bb * blocks_per_row];
        let mut out = vec![0f32; n_rows * row_len];
        dequantize_rows(ty, src, row_len, &mut out).unwrap();
        let mut out_par = vec![1f32; out.len()];
        dequantize_rows_par(ty, src, row_len, &mut out_par).unwrap();
        assert!(same_bits(&out, &out_par));
        if ty == GgmlType::F16 {
            for (i, v) in out.iter().enumerate() {
                let h = f16_bits_to_f32(u16::from_le_bytes([src[2 * i], src[2 * i + 1]]));
                assert!(same_bits(&[h], &[*v]));
            }
        }
        if ty == GgmlType::BF16 {
            for (i, v) in out.iter().enumerate() {
                let h = bf16_bits_to_f32(u16::from_le_bytes([src[2 * i], src[2 * i + 1]]));
                assert!(same_bits(&[h], &[*v]));
            }
        }
        // Wrong sizes are errors, never panics.
        let _ = dequantize_rows(ty, &rest[..rest.len().min(bb + 1)], row_len, &mut [0f32; 7]);
        let _ = quant::can_dequantize(ty);
    }
});
