//! Importance matrices (`llama-imatrix` output): per-column weights that steer the quantizers of most types.
//!
//! Two file formats exist and both are read: the GGUF one (`general.type = "imatrix"`, tensors `<name>.in_sum2`
//! and `<name>.counts`) and the legacy `.dat` one. Weights are normalised exactly as `llama-quantize` does before
//! it hands them to ggml: `in_sum2 / counts` per expert (1 where a count is 0) for GGUF, `sums / ncall` for the
//! legacy file (the raw sums where `ncall` is 0), each in f32.

use std::collections::BTreeMap;

/// The normalised weights of an importance matrix, by the name of the weight tensor they belong to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Imatrix {
    /// Where it came from (a path, for messages and provenance).
    pub source: String,
    /// Weight tensor name -> weights; for a 2-D weight one per column (its row length), for stacked experts
    /// `n_expert * row_len`.
    pub entries: BTreeMap<String, Vec<f32>>,
    /// The datasets it was computed on, as the file records them (may be empty).
    pub datasets: Vec<String>,
    /// The number of chunks it was computed on (0 when the file does not say).
    pub chunk_count: u32,
    /// Whether it came from a legacy `.dat` file.
    pub legacy: bool,
}

impl Imatrix {
    /// An importance matrix made in memory (tests, converters).
    pub fn from_entries(source: impl Into<String>, entries: BTreeMap<String, Vec<f32>>) -> Imatrix {
        Imatrix { source: source.into(), entries, ..Imatrix::default() }
    }

    /// The weights for tensor `name`, if the matrix has them.
    pub fn weights(&self, name: &str) -> Option<&[f32]> {
        self.entries.get(name).map(Vec::as_slice)
    }
}
