//! Importance-matrix parsing (GGUF and legacy `.dat`) on arbitrary bytes.
#![no_main]

use ggml_lora_core::gguf::GGUF_MAGIC;
use ggml_lora_core::imatrix::Imatrix;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Imatrix::parse(data, "fuzz") else { return };
    assert_eq!(m.source, "fuzz");
    assert_eq!(m.legacy, !data.starts_with(&GGUF_MAGIC), "the format follows the magic");
    assert!(!m.entries.is_empty(), "an accepted matrix has entries");
    let mut total = 0usize;
    for (name, weights) in &m.entries {
        assert!(!weights.is_empty(), "entry {name:?} is empty");
        assert!(!m.legacy || !name.is_empty(), "legacy names are at least one byte");
        assert!(!name.contains('\0'), "entry {name:?} holds a NUL");
        for (i, w) in weights.iter().enumerate() {
            assert!(w.is_finite() && *w >= 0.0, "entry {name:?} weight {i} is {w}");
        }
        assert_eq!(m.weights(name), Some(weights.as_slice()));
        total += weights.len();
    }
    // Every weight comes from 4 bytes of the input: allocation is bounded by the input's size.
    assert!(total * 4 <= data.len(), "{total} weights from {} bytes", data.len());
    if m.legacy {
        assert!(m.datasets.len() <= 1);
    }
    assert_eq!(Imatrix::parse(data, "fuzz").ok().as_ref(), Some(&m), "parsing is deterministic");
});
