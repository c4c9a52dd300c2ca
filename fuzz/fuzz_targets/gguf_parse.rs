//! GGUF header parsing on arbitrary bytes, then every tensor read (and dequantized where supported).
//!
//! Invariants checked on every accepted file: tensor ranges lie inside the input, offsets are dense and
//! aligned, data_offset is aligned, nbytes agrees with `tensor_nbytes`, and dequantizing a tensor gives
//! exactly n_elements values (the reader never hands out a short or overlong slice).
#![no_main]

use ggml_lora_core::gguf::{align_up, tensor_nbytes, GgufHeader, Value};
use ggml_lora_core::quant;
use libfuzzer_sys::fuzz_target;

/// Dequantize at most this many elements per input (keeps each run fast; sizes are already bounded by the
/// input length, at most 8x for q4_0).
const MAX_DEQUANT_ELEMENTS: u64 = 1 << 22;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = GgufHeader::parse(data) else { return };
    assert!(header.alignment.is_power_of_two());
    let mut expected_offset = 0u64;
    if !header.tensors.is_empty() {
        assert_eq!(header.data_offset % header.alignment, 0);
    }
    let mut budget = MAX_DEQUANT_ELEMENTS;
    for (i, t) in header.tensors.iter().enumerate() {
        assert!(!t.dims.is_empty() && t.dims.len() <= 4 && t.dims.iter().all(|&d| d > 0));
        assert!(t.name.len() < 64);
        assert_eq!(t.relative_offset, expected_offset, "offsets must be dense");
        assert_eq!(t.nbytes, tensor_nbytes(&t.name, &t.dims, t.ty).unwrap());
        expected_offset = align_up(t.relative_offset + t.nbytes, header.alignment).unwrap();
        let range = header.tensor_range(i);
        assert!(range.end <= data.len() as u64, "tensor data outside the file");
        let bytes = &data[range.start as usize..range.end as usize];
        assert_eq!(bytes.len() as u64, t.nbytes);
        // Shape helpers must not panic either.
        let _ = (t.shape(), t.n_rows(), t.row_len());
        let n = t.n_elements();
        if quant::can_dequantize(t.ty) && n <= budget {
            budget -= n;
            let mut out = vec![0f32; n as usize];
            quant::dequantize_rows(t.ty, bytes, t.row_len() as usize, &mut out).expect("validated tensor");
        }
    }
    // Metadata accessors on hostile values.
    for (key, value) in &header.metadata {
        assert!(!key.is_empty());
        let _ = (value.as_str(), value.as_int(), value.as_f64(), value.value_type());
        if let Value::Array(a) = value {
            for item in a.items.iter().take(64) {
                let _ = (item.as_str(), item.as_int(), item.as_f64());
            }
        }
    }
    let _ = header.get("general.architecture");
});
