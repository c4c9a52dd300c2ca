//! The legacy GGML/GGMF/GGJT model reader on arbitrary bytes, and the GGUF view made of an accepted file.
#![no_main]

use ggml_lora_core::gguf::tensor_nbytes;
use ggml_lora_core::legacy::{gguf_name, LegacyModel};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(model) = LegacyModel::parse(data, Some("fuzz.bin")) else { return };
    assert_eq!(model.vocab.len(), model.hparams.n_vocab as usize);
    let mut end = 0u64;
    for t in &model.tensors {
        assert!(t.start >= end, "tensor data overlaps the previous tensor");
        end = t.start + t.nbytes;
        assert!(end <= data.len() as u64, "tensor data outside the file");
        assert_eq!(tensor_nbytes(&t.name, &t.dims, t.ty).ok(), Some(t.nbytes));
        assert!(gguf_name(&t.name, model.hparams.n_layer).is_some());
    }
    assert_eq!(end, data.len() as u64, "bytes after the last tensor");
    let n = model.tensors.len();
    let (metadata, tensors) = model.into_gguf();
    assert_eq!(tensors.len(), n);
    assert!(metadata.iter().any(|(k, _)| k == "tokenizer.ggml.tokens"));
    for (info, start) in &tensors {
        assert!(info.name.len() < 64 && start + info.nbytes <= data.len() as u64);
    }
});
