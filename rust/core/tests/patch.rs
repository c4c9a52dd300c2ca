//! The patch engine on the real fixtures, driven directly from Rust (the Python suite covers the rest).

use std::path::PathBuf;
use std::sync::Arc;

use ggml_lora_core::adapter::LoraAdapter;
use ggml_lora_core::gguf::GgufFile;
use ggml_lora_core::patch::{AdapterInput, PatchOptions, PatchPlan};
use ggml_lora_core::{Error, GgmlType};

fn fixture(rel: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures").join(rel);
    assert!(path.exists(), "fixture {} not found (../shared must sit beside the repository)", path.display());
    path
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ggml-lora-patch-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn adapter(rel: &str) -> Vec<AdapterInput> {
    vec![AdapterInput { adapter: Arc::new(LoraAdapter::open(fixture(rel)).unwrap()), scale: 1.0 }]
}

/// With an f16 base and f16 rounding, the output equals llama-quantize of PEFT's merge, byte for byte.
#[test]
fn pipeline_identical_q4_0_and_q8_0() {
    let base = GgufFile::open(fixture("llama-gqa/base-f16.gguf")).unwrap();
    let adapters = adapter("llama-gqa/lora-r8/ref-adapter-f32.gguf");
    for quant in ["q4_0", "q8_0"] {
        let model = GgufFile::open(fixture(&format!("llama-gqa/base-{quant}.gguf"))).unwrap();
        let options = PatchOptions { intermediate: Some(GgmlType::F16), threads: Some(2), ..Default::default() };
        let plan = PatchPlan::new(&model, Some(&base), &adapters, options).unwrap();
        assert_eq!(plan.patched_tensors().len(), 14);
        let out = scratch(&format!("merged-{quant}.gguf"));
        let mut calls = 0;
        let report = plan
            .run(&out, &mut |_| {
                calls += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!((report.tensors.len(), report.copied), (14, 7));
        assert!(calls >= 21);
        let ours = GgufFile::open(&out).unwrap();
        let reference = GgufFile::open(fixture(&format!("llama-gqa/lora-r8/merged-ref-{quant}.gguf"))).unwrap();
        for (i, t) in ours.tensors().iter().enumerate() {
            let (j, _) = reference.tensor(&t.name).unwrap();
            assert!(ours.tensor_data(i) == reference.tensor_data(j), "{quant}: {} differs", t.name);
        }
        for t in &report.tensors {
            assert!(t.retained() > 0.8 && t.retained() < 1.2, "{}: retained {}", t.name, t.retained());
        }
    }
}

/// A progress callback error cancels the run and leaves nothing at the target.
#[test]
fn cancelled_run_leaves_no_output() {
    let model = GgufFile::open(fixture("llama-gqa/base-f16.gguf")).unwrap();
    let adapters = adapter("llama-gqa/lora-qv-r4/ref-adapter-f32.gguf");
    let plan = PatchPlan::new(&model, None, &adapters, PatchOptions::default()).unwrap();
    let out = scratch("cancelled.gguf");
    let err = plan
        .run(&out, &mut |p| if p.tensors_done >= 5 { Err(Error::Cancelled("test".into())) } else { Ok(()) })
        .unwrap_err();
    assert!(matches!(err.root(), Error::Cancelled(_)), "{err}");
    assert!(!out.exists());
    let leftovers = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("cancelled.gguf"))
        .count();
    assert_eq!(leftovers, 0);
}
