//! The legacy ggla adapter parser and the adapter built from it, on arbitrary bytes.
#![no_main]

use ggml_lora_core::adapter::from_ggla;
use ggml_lora_core::ggla::{gguf_target_name, GglaFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GglaFile::parse(data) {
        assert!(file.rank > 0);
        for t in &file.tensors {
            assert!(t.data.end <= data.len(), "tensor data outside the file");
            assert!(matches!(t.dims.len(), 1 | 2));
            let n: u64 = t.dims.iter().product();
            assert_eq!((t.data.end - t.data.start) as u64, n * t.ty.block_bytes() as u64);
            let _ = gguf_target_name(t.name.trim_end_matches(".loraA").trim_end_matches(".loraB"));
        }
    }
    if let Ok(adapter) = from_ggla(data, "fuzz") {
        for pair in &adapter.pairs {
            let (left, right) = pair.load().expect("ggla factors are in memory");
            assert_eq!(left.len(), pair.rows * pair.rank);
            assert_eq!(right.len(), pair.rank * pair.cols);
            let _ = adapter.pair_scale(pair, 1.0);
        }
    }
});
