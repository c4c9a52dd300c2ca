//! Inputs for the patch engine's unit tests, built in the test: tiny GGUF models written with the crate's GGUF
//! writer (inputs only; expected values are worked out in the tests) and adapters held in memory.

use std::path::PathBuf;
use std::sync::Arc;

use crate::adapter::{Factors, LoraAdapter, LoraPair};
use crate::gguf::{GgufWriter, TensorSpec, Value, WriteOptions};
use crate::model::ModelFile;
use crate::types::GgmlType;

use super::AdapterInput;

/// A fresh folder for one test (removed first if a previous run left it).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ggml-lora-patch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// A tensor of a test model: name, numpy shape (rows, cols) or (len,), type and raw bytes.
pub struct TestTensor {
    pub name: &'static str,
    pub shape: Vec<u64>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

impl TestTensor {
    /// An f32 tensor holding `values` (row-major).
    pub fn f32(name: &'static str, shape: &[u64], values: &[f32]) -> TestTensor {
        assert_eq!(shape.iter().product::<u64>() as usize, values.len());
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TestTensor { name, shape: shape.to_vec(), ty: GgmlType::F32, data }
    }

    /// A tensor of type `ty` whose bytes are all zero (for a block type: scales 0, so every value is 0).
    pub fn zeros(name: &'static str, shape: &[u64], ty: GgmlType) -> TestTensor {
        let cols = *shape.last().expect("shape");
        let rows: u64 = shape[..shape.len() - 1].iter().product();
        let bytes = ty.row_bytes(cols).expect("whole blocks") * rows;
        TestTensor { name, shape: shape.to_vec(), ty, data: vec![0; bytes as usize] }
    }
}

/// Writes a GGUF model `name` in `dir` with `general.architecture = "llama"`, the `extra` metadata and `tensors`,
/// and opens it.
pub fn model(dir: &std::path::Path, name: &str, extra: &[(&str, Value)], tensors: &[TestTensor]) -> ModelFile {
    let path = dir.join(name);
    let mut metadata = vec![("general.architecture".to_string(), Value::String(b"llama".to_vec()))];
    metadata.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let specs = tensors
        .iter()
        .map(|t| TensorSpec { name: t.name.into(), dims: t.shape.iter().rev().copied().collect(), ty: t.ty })
        .collect();
    let mut writer = GgufWriter::create(&path, &metadata, specs, WriteOptions { sync: false }).expect("create");
    for t in tensors {
        writer.write_tensor(t.name, &t.data).expect("tensor data");
    }
    writer.finish().expect("finish");
    ModelFile::open(&path).expect("open the model just written")
}

/// A rank-`rank` pair patching `target` (rows x cols) with `left` (rows x rank) and `right` (rank x cols).
pub fn pair(target: &str, rows: usize, cols: usize, rank: usize, left: Vec<f32>, right: Vec<f32>) -> LoraPair {
    assert_eq!((left.len(), right.len()), (rows * rank, rank * cols));
    LoraPair {
        target: target.into(),
        scale_rank: rank,
        rows,
        cols,
        rank,
        factors: Factors::Loaded { left, right },
        magnitude: None,
    }
}

/// An adapter (alpha 0: each pair's scale is the user's `scale`) for architecture `arch`.
pub fn adapter(source: &str, arch: Option<&str>, pairs: Vec<LoraPair>, scale: f32) -> AdapterInput {
    let adapter = LoraAdapter {
        source: source.into(),
        inputs: Vec::new(),
        architecture: arch.map(str::to_owned),
        alpha: 0.0,
        pairs,
        skipped: Vec::new(),
    };
    AdapterInput { adapter: Arc::new(adapter), scale }
}

/// The quality sums (`Sums`, in field order) recomputed in f64 from their definitions: W = `w`, ΔW = `delta`,
/// Q = `q`, W_model = `model`.
pub fn quality_sums_f64(w: &[f64], delta: &[f64], q: &[f64], model: &[f64]) -> [f64; 6] {
    let mut s = [0f64; 6];
    for i in 0..w.len() {
        let (w, d, q, m) = (w[i], delta[i], q[i], model[i]);
        s[0] += d * d;
        s[1] += w * w;
        s[2] += (q - w) * d;
        s[3] += (q - w) * (q - w);
        s[4] += (q - w - d) * (q - w - d);
        s[5] += (q - m) * d;
    }
    s
}

/// `sums` as an array in field order.
pub fn sums_array(sums: super::Sums) -> [f64; 6] {
    [sums.delta_sq, sums.src_sq, sums.applied_dot_delta, sums.applied_sq, sums.error_sq, sums.vs_model_dot_delta]
}
