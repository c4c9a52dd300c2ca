//! The non-executing pickle machine alone (as `data.pkl` of a zip, so persistent ids are accepted), on arbitrary
//! bytes: mutations reach every opcode without first having to keep a zip's CRC-32 right.
#![no_main]

use ggml_lora_core::torch_bin::pickle::{unpickle, Object};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(u) = unpickle(data, "archive/data.pkl", true) {
        for o in &u.objects {
            match o {
                Object::Storage(i) => assert!(*i < u.storages.len()),
                Object::Tensor(i) => assert!(*i < u.tensors.len()),
                _ => {}
            }
        }
        for t in &u.tensors {
            assert!(t.storage < u.storages.len());
            assert_eq!(t.shape.len(), t.strides.len());
        }
    }
});
