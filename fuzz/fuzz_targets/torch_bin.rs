//! The torch `.bin` reader (zip archive + pickle + tensor views) on arbitrary bytes: a zip goes through the
//! archive reader, anything else through the pickle machine as torch's legacy format would.
#![no_main]

use ggml_lora_core::torch_bin::read_torch_bin_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = read_torch_bin_bytes(data) {
        for t in &tensors {
            let numel: u64 = t.shape.iter().product();
            assert_eq!(t.data.len() as u64, numel * t.dtype.output_size(), "tensor bytes disagree with its shape");
        }
    }
});
