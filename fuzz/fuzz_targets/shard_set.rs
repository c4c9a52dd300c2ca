//! Sets of gguf-split shards built from arbitrary bytes: the first byte picks the number of files (1-4) and which
//! file is opened; the rest is cut into that many GGUF files named `m-0000k-of-0000N.gguf`, written to a scratch
//! folder, and `ModelFile::open` opens one of them. An accepted set must be consistent: every tensor once,
//! its bytes inside its own shard, the split keys gone from the model's metadata; and an accepted set written
//! back with `write_copy` (merged and kept) opens again with the same tensors.
#![no_main]

use std::path::PathBuf;

use ggml_lora_core::gguf::split::is_split_key;
use ggml_lora_core::gguf::{SplitRule, WriteOptions};
use ggml_lora_core::model::ModelFile;
use libfuzzer_sys::fuzz_target;

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ggml-lora-fuzz-shards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let files = usize::from(selector & 3) + 1;
    let opened = usize::from(selector >> 2) % files;
    let dir = scratch();
    // Cut points: u16 lengths at the front for all but the last file.
    let mut rest = rest;
    let mut parts = Vec::new();
    for _ in 0..files - 1 {
        if rest.len() < 2 {
            return;
        }
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        parts.push(&rest[2..2 + len]);
        rest = &rest[2 + len..];
    }
    parts.push(rest);
    let paths: Vec<PathBuf> = (0..files).map(|k| dir.join(format!("m-{:05}-of-{files:05}.gguf", k + 1))).collect();
    for (path, bytes) in paths.iter().zip(&parts) {
        std::fs::write(path, bytes).unwrap();
    }
    let Ok(model) = ModelFile::open(&paths[opened]) else { return };
    let shards = model.shards();
    let mut names = std::collections::HashSet::new();
    for (i, t) in model.tensors().iter().enumerate() {
        assert!(names.insert(t.name.clone()), "tensor {:?} twice", t.name);
        let shard = model.shard_of(i) as usize;
        assert!(shard < shards.len());
        let len = std::fs::metadata(shards[shard].0).unwrap().len();
        let range = model.tensor_source(i).1;
        assert!(range.end <= len && model.tensor_data(i).len() as u64 == t.nbytes);
    }
    assert_eq!(shards.iter().map(|s| s.1).sum::<usize>(), model.tensors().len());
    if shards.len() > 1 {
        // The three keys that place a file in its set are dropped from the model's metadata (they are rewritten
        // per shard on output); any other `split.*` key is ordinary metadata and kept.
        assert!(!model.metadata().iter().any(|(k, _)| is_split_key(k)));
    }
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    for (rule, name) in [(SplitRule::Merge, "merged.gguf"), (SplitRule::Keep, "kept")] {
        let no_sync = WriteOptions { sync: false };
        let written = model.write_copy(&out_dir.join(name), rule, &[], no_sync).expect("an accepted set copies");
        let again = ModelFile::open(&written[0]).expect("a written copy opens");
        assert_eq!(again.tensors().len(), model.tensors().len());
        for i in 0..model.tensors().len() {
            assert_eq!(again.tensor_data(i), model.tensor_data(i));
        }
    }
});
