//! A PEFT adapter folder as a LoRA adapter, built from a typed plan over its weights file.
//!
//! Python reads what belongs to the ecosystem (`adapter_config.json`, gguf-py's `TensorNameMap`, PEFT's
//! `rank_pattern`/`alpha_pattern`) and hands over a [`PeftPlan`]: for each model tensor, the names of its
//! factors in the weights file, PEFT's `r` and `alpha` for its module, and the transform. The adapter built
//! here keeps referring to the weights file ([`crate::peft_weights`]): each pair's factors are read, transformed
//! and scaled only when its target is patched, so the memory is that of one pair, whatever the adapter's size.
//!
//! Transforms (docs/FORMATS.md §2): a linear module's delta is `B @ A` (PEFT's `lora_B` n_out x r and `lora_A`
//! r x n_in, Conv1D modules included: llama.cpp's converter transposes their base weight, so the GGUF delta is
//! `B @ A` as stored); llama-family q/k rows are permuted as llama.cpp's `LlamaModel.permute` permutes the base
//! weight's ([`permute_rows`]), on `lora_B` and the DoRA magnitude; an embedding's delta is `(B @ A)ᵀ`
//! (`lora_embedding_A` r x n_vocab, `lora_embedding_B` n_embd x r), laid out for llama.cpp by
//! [`crate::adapter::gguf_layout`]. Fused modules (phi3 `qkv_proj`, `gate_up_proj`) stay fused, as in llama.cpp.

use std::sync::Arc;

use crate::adapter::{transpose, Factors, LoraAdapter, LoraPair};
use crate::error::{Error, Result};
use crate::peft_weights::PeftWeights;
use crate::scale;

/// What kind of module a target's factors come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// `lora_A.weight` / `lora_B.weight` of a linear or Conv1D module.
    Linear,
    /// `lora_embedding_A` / `lora_embedding_B` of an embedding (only `token_embd`).
    Embedding,
}

/// One model tensor's part of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftTarget {
    /// The GGUF tensor it patches, e.g. `blk.0.attn_q.weight`.
    pub target: String,
    /// The module's factors (names in the weights file).
    pub a: String,
    /// See `a`.
    pub b: String,
    /// The DoRA magnitude vector's name, for a DoRA module.
    pub magnitude: Option<String>,
    /// Linear or embedding.
    pub kind: ModuleKind,
    /// PEFT's `r` for the module (after `rank_pattern`); the factors must have this rank.
    pub r: usize,
    /// PEFT's `lora_alpha` for the module (after `alpha_pattern`).
    pub alpha: f64,
    /// `(n_head, n_head_kv)` when the rows are permuted as llama.cpp permutes rotary q (`n_head_kv ==
    /// n_head`) and k weights.
    pub permute: Option<(usize, usize)>,
}

/// Everything the core needs to build a PEFT folder's adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftPlan {
    /// Where it came from (the folder), for messages and the output's metadata.
    pub source: String,
    /// The base model's `general.architecture`.
    pub architecture: String,
    /// `use_rslora` from the config.
    pub use_rslora: bool,
    /// The targets, in the order the adapter's pairs take.
    pub targets: Vec<PeftTarget>,
}

/// How one pair's factors are made from the weights file (see [`Factors::Peft`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PeftFactors {
    /// Index of the A factor in the weights file.
    pub a: usize,
    /// Index of the B factor.
    pub b: usize,
    /// Linear or embedding.
    pub kind: ModuleKind,
    /// Row permutation of B, `(n_head, n_head_kv)`.
    pub permute: Option<(usize, usize)>,
    /// PEFT's scale folded into B (when no single header alpha carries it).
    pub fold: Option<f64>,
}

impl PeftFactors {
    /// `(left, right)` in f32 (see [`LoraPair`]): read from the file, permuted, scaled. `rows`, `cols` and
    /// `rank` are the pair's.
    pub fn load(&self, weights: &PeftWeights, rows: usize, cols: usize, rank: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let a = weights.read_f32(self.a)?;
        // B's rows are permuted as they are read: the factor is copied out of the map once.
        let permuted = self.permute.map(|(n_head, n_kv)| move |j| permuted_row(j, rows, n_head, n_kv));
        let source_row = permuted.as_ref().map(|f| f as &dyn Fn(usize) -> usize);
        let mut b = weights.read_rows_f32(self.b, source_row)?;
        if let Some(s) = self.fold {
            b.iter_mut().for_each(|v| *v = scale::fold(*v, s));
            if b.iter().any(|v| !v.is_finite()) {
                return Err(Error::InvalidTensor {
                    name: weights.tensors()[self.b].name.clone(),
                    reason: format!(
                        "values are not finite after applying PEFT's scale {s} (check lora_alpha in adapter_config.json)"
                    ),
                });
            }
        }
        Ok(match self.kind {
            // delta = B @ A: left = B (rows x r), right = A (r x cols).
            ModuleKind::Linear => (b, a),
            // delta = (B @ A)ᵀ = Aᵀ @ Bᵀ: left = Aᵀ (n_vocab x r), right = Bᵀ (r x n_embd).
            ModuleKind::Embedding => (transpose(&a, rank, rows), transpose(&b, cols, rank)),
        })
    }
}

/// The source row of output row `j` under llama.cpp's `LlamaModel.permute` of `rows` rows (see [`permute_rows`]).
pub fn permuted_row(j: usize, rows: usize, n_head: usize, n_head_kv: usize) -> usize {
    let heads = if n_head != n_head_kv { n_head_kv } else { n_head };
    let half = rows / heads / 2;
    let (h, within) = (j / (2 * half), j % (2 * half));
    (h * 2 + within % 2) * half + within / 2
}

/// llama.cpp's `LlamaModel.permute` of the rows of a rows x width matrix: with `h` heads (`n_head_kv` when it
/// differs from `n_head`), `w.reshape(h, 2, rows / h / 2, width).swapaxes(1, 2)`. `rows` must be a multiple of
/// 2h (checked when the plan is built).
pub fn permute_rows(m: &[f32], rows: usize, width: usize, n_head: usize, n_head_kv: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|j| {
            let src = permuted_row(j, rows, n_head, n_head_kv);
            m[src * width..(src + 1) * width].iter().copied()
        })
        .collect()
}

fn factor_error(tensor: &str, what: &'static str, expected: impl ToString, found: impl ToString) -> Error {
    Error::Factor { tensor: tensor.to_owned(), what, expected: expected.to_string(), found: found.to_string() }
}

/// Builds the adapter of `plan` over `weights`: every factor's shape is checked against the plan now, its
/// values only when its pair is loaded. DoRA magnitudes (small) are read, checked and permuted now. The header
/// alpha is [`scale::llama_alpha`] of the modules when it exists and no module is DoRA; otherwise alpha is 0
/// and each pair's PEFT scale is folded into its B.
pub fn build(weights: Arc<PeftWeights>, plan: &PeftPlan) -> Result<LoraAdapter> {
    let index = |name: &str| {
        weights.index(name).ok_or_else(|| factor_error(name, "not in the weights file", "a tensor", "none"))
    };
    let dora = plan.targets.iter().any(|t| t.magnitude.is_some());
    let modules: Vec<(usize, f64)> = plan.targets.iter().map(|t| (t.r, t.alpha)).collect();
    let header_alpha = if dora { None } else { scale::llama_alpha(&modules, plan.use_rslora) };
    let mut pairs = Vec::with_capacity(plan.targets.len());
    for t in &plan.targets {
        let (a, b) = (index(&t.a)?, index(&t.b)?);
        let shape = |i: usize| -> Result<(usize, usize)> {
            let info = &weights.tensors()[i];
            match info.shape[..] {
                [d0, d1] => Ok((d0 as usize, d1 as usize)),
                _ => Err(factor_error(&info.name, "dimensions", "2", format!("{:?}", info.shape))),
            }
        };
        let ((ra, a1), (b0, rb)) = (shape(a)?, shape(b)?);
        if ra != rb {
            return Err(factor_error(&t.b, "rank (columns of lora_B, rows of lora_A)", ra, rb));
        }
        if ra != t.r {
            return Err(factor_error(&t.a, "rank (adapter_config.json r)", t.r, ra));
        }
        // Linear: delta (b0 x a1); embedding: delta (a1 x b0) (n_vocab x n_embd).
        let (rows, cols) = match t.kind {
            ModuleKind::Linear => (b0, a1),
            ModuleKind::Embedding => (a1, b0),
        };
        if let Some((n_head, n_kv)) = t.permute {
            let heads = if n_head != n_kv { n_kv } else { n_head };
            if heads == 0 || rows % (2 * heads) != 0 {
                return Err(factor_error(
                    &t.b,
                    "rows (for the rotary row permutation)",
                    format!("a multiple of 2 x {heads}"),
                    rows,
                ));
            }
        }
        let magnitude = match &t.magnitude {
            None => None,
            Some(name) => {
                let i = index(name)?;
                let info = &weights.tensors()[i];
                if t.kind == ModuleKind::Embedding || info.shape != [rows as u64] {
                    return Err(factor_error(
                        name,
                        "DoRA magnitude shape",
                        format!("[{rows}]"),
                        format!("{:?}", info.shape),
                    ));
                }
                let m = weights.read_f32(i)?;
                Some(match t.permute {
                    Some((n_head, n_kv)) => permute_rows(&m, rows, 1, n_head, n_kv),
                    None => m,
                })
            }
        };
        let fold = header_alpha.is_none().then(|| scale::peft_scale(t.alpha, t.r, plan.use_rslora));
        pairs.push(LoraPair {
            target: t.target.clone(),
            scale_rank: t.r,
            rows,
            cols,
            rank: t.r,
            factors: Factors::Peft {
                weights: Arc::clone(&weights),
                factors: PeftFactors { a, b, kind: t.kind, permute: t.permute, fold },
            },
            magnitude,
        });
    }
    Ok(LoraAdapter {
        source: plan.source.clone(),
        inputs: vec![weights.path().to_path_buf()],
        architecture: Some(plan.architecture.clone()),
        alpha: header_alpha.unwrap_or(0.0) as f32,
        pairs,
        skipped: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Oracle: llama.cpp's `LlamaModel.permute` in numpy, worked by hand for 2 heads of 4 rows:
    /// `w.reshape(2, 2, 2, 1).swapaxes(1, 2).reshape(8, 1)` orders rows 0 2 1 3 4 6 5 7.
    #[test]
    fn rotary_permutation_matches_llama_cpp() {
        let rows: Vec<f32> = (0..8).map(|i| i as f32).collect();
        assert_eq!(permute_rows(&rows, 8, 1, 2, 2), [0., 2., 1., 3., 4., 6., 5., 7.]);
        // k with 1 kv head of 8 rows: reshape(1, 2, 4, 1).swapaxes(1, 2): 0 4 1 5 2 6 3 7.
        assert_eq!(permute_rows(&rows, 8, 1, 4, 1), [0., 4., 1., 5., 2., 6., 3., 7.]);
        let wide: Vec<f32> = (0..16).map(|i| i as f32).collect();
        assert_eq!(permute_rows(&wide, 4, 4, 1, 1)[4..8], [8., 9., 10., 11.]);
    }
}
