//! The patch engine on the real fixtures, driven directly from Rust (the Python suite covers the rest).

use std::path::PathBuf;
use std::sync::Arc;

use ggml_lora_core::adapter::LoraAdapter;
use ggml_lora_core::gguf::GgufFile;
use ggml_lora_core::model::ModelFile;
use ggml_lora_core::patch::{AdapterInput, PatchOptions, PatchPlan};
use ggml_lora_core::{Error, GgmlType};

mod common;

use common::Fixtures;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ggml-lora-patch-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn adapter(fx: &Fixtures, rel: &str) -> Vec<AdapterInput> {
    vec![AdapterInput { adapter: Arc::new(LoraAdapter::open(fx.path(rel)).unwrap()), scale: 1.0 }]
}

/// With an f16 base and f16 rounding, the output equals llama-quantize of PEFT's merge, byte for byte.
#[test]
fn pipeline_identical_q4_0_and_q8_0() {
    let Some(fx) = Fixtures::get("pipeline_identical_q4_0_and_q8_0") else { return };
    let base = ModelFile::open(fx.path("llama-gqa/base-f16.gguf")).unwrap();
    let adapters = adapter(&fx, "llama-gqa/lora-r8/ref-adapter-f32.gguf");
    for quant in ["q4_0", "q8_0"] {
        let model = ModelFile::open(fx.path(&format!("llama-gqa/base-{quant}.gguf"))).unwrap();
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
        let reference = GgufFile::open(fx.path(&format!("llama-gqa/lora-r8/merged-ref-{quant}.gguf"))).unwrap();
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
    let Some(fx) = Fixtures::get("cancelled_run_leaves_no_output") else { return };
    let model = ModelFile::open(fx.path("llama-gqa/base-f16.gguf")).unwrap();
    let adapters = adapter(&fx, "llama-gqa/lora-qv-r4/ref-adapter-f32.gguf");
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

/// A DoRA pair: W' = m / ‖W + s·B@A‖_row · (W + s·B@A), checked against an f64 recomputation.
#[test]
fn dora_merge_rescales_rows_to_the_magnitudes() {
    let Some(fx) = Fixtures::get("dora_merge_rescales_rows_to_the_magnitudes") else { return };
    use ggml_lora_core::adapter::from_tensors;
    use ggml_lora_core::gguf::TensorInfo;
    use ggml_lora_core::quant;

    let model = ModelFile::open(fx.path("llama-gqa/base-f16.gguf")).unwrap();
    let (index, w_info) = model.tensor("blk.0.attn_v.weight").unwrap();
    let (rows, cols, rank) = (w_info.n_rows() as usize, w_info.row_len() as usize, 4usize);
    let mut w = vec![0f32; rows * cols];
    quant::dequantize_rows(w_info.ty, model.tensor_data(index), cols, &mut w).unwrap();

    let value = |i: usize, salt: usize| (((i * 7919 + salt * 104729) % 1000) as f32 / 1000.0 - 0.5) * 0.02;
    let a: Vec<f32> = (0..rank * cols).map(|i| value(i, 1)).collect(); // numpy (r, n_in)
    let b: Vec<f32> = (0..rows * rank).map(|i| value(i, 2)).collect(); // numpy (n_out, r)
    let m: Vec<f32> = (0..rows).map(|i| 0.5 + value(i, 3) * 10.0).collect();
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let info = |name: &str, dims: Vec<u64>| TensorInfo {
        name: name.into(),
        nbytes: dims.iter().product::<u64>() * 4,
        dims,
        ty: GgmlType::F32,
        relative_offset: 0,
    };
    let (ia, ib, im) = (
        info("blk.0.attn_v.weight.lora_a", vec![cols as u64, rank as u64]),
        info("blk.0.attn_v.weight.lora_b", vec![rank as u64, rows as u64]),
        info("blk.0.attn_v.weight.dora_m", vec![rows as u64]),
    );
    let (da, db, dm) = (bytes(&a), bytes(&b), bytes(&m));
    let scale = 0.75f32;
    let adapter =
        from_tensors("dora".into(), Some("llama".into()), 0.0, &[(&ia, &da), (&ib, &db), (&im, &dm)]).unwrap();
    assert!(adapter.pairs[0].magnitude.is_some());
    let adapters = vec![AdapterInput { adapter: Arc::new(adapter), scale }];
    let options = PatchOptions { out_type: Some(GgmlType::F32), ..Default::default() };
    let plan = PatchPlan::new(&model, None, &adapters, options).unwrap();
    let out = scratch("dora.gguf");
    let report = plan.run(&out, &mut |_| Ok(())).unwrap();
    let merged = GgufFile::open(&out).unwrap();
    let (j, _) = merged.tensor("blk.0.attn_v.weight").unwrap();
    let got: Vec<f32> =
        merged.tensor_data(j).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    for r in 0..rows {
        let row: Vec<f64> = (0..cols)
            .map(|c| {
                let delta: f64 = (0..rank).map(|k| b[r * rank + k] as f64 * a[k * cols + c] as f64).sum();
                w[r * cols + c] as f64 + scale as f64 * delta
            })
            .collect();
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        for c in 0..cols {
            let expected = m[r] as f64 / norm * row[c];
            let err = (got[r * cols + c] as f64 - expected).abs();
            assert!(err <= 1e-6 * expected.abs().max(1e-3), "row {r} col {c}: {} vs {expected}", got[r * cols + c]);
        }
        let out_norm = (0..cols).map(|c| (got[r * cols + c] as f64).powi(2)).sum::<f64>().sqrt();
        assert!((out_norm - m[r] as f64).abs() <= 1e-5 * m[r] as f64, "row {r}: norm {out_norm} vs magnitude {}", m[r]);
    }
    assert_eq!(report.tensors.len(), 1);

    // DoRA together with another adapter on the same tensor is refused before writing.
    let twice = vec![
        AdapterInput { adapter: Arc::clone(&adapters[0].adapter), scale: 1.0 },
        AdapterInput { adapter: Arc::clone(&adapters[0].adapter), scale: 1.0 },
    ];
    let err = PatchPlan::new(&model, None, &twice, PatchOptions::default()).err().unwrap();
    assert!(err.to_string().contains("DoRA"), "{err}");
    // A magnitude of the wrong length is refused when the adapter is built.
    let short = info("blk.0.attn_v.weight.dora_m", vec![rows as u64 - 1]);
    let err = from_tensors("x".into(), None, 0.0, &[(&ia, &da), (&ib, &db), (&short, &dm[4..])]).unwrap_err();
    assert!(err.to_string().contains("one magnitude per row"), "{err}");
}
