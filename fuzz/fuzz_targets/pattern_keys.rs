//! PEFT pattern keys: arbitrary keys compiled and matched against an arbitrary module name. Input: the keys
//! and the module name separated by NUL bytes (the last piece is the name).
#![no_main]

use ggml_lora_core::patterns::PatternKeys;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut pieces: Vec<&str> = text.split('\0').collect();
    let module = pieces.pop().unwrap_or_default();
    pieces.truncate(8);
    if let Ok(keys) = PatternKeys::new(&pieces) {
        if let Some(i) = keys.first_match(module) {
            assert!(i < pieces.len());
        }
        // PEFT's exact-name fallback: a name equal to some key always finds a key
        if pieces.contains(&module) {
            assert!(keys.first_match(module).is_some());
        }
    }
});
