//! The patch engine: merge LoRA adapters into a (quantized) GGUF model in one streaming pass.
//!
//! - `plan.rs`: [`PatchPlan::new`] validates everything (architectures, names, shapes, types, importance matrix)
//!   and decides every tensor's fate before a byte is written; the output path is checked again by `run`.
//! - `pipeline.rs`: [`PatchPlan::run`] streams the model in tensor order: untouched tensors are copied by the
//!   kernel from the model file; patched tensors are processed chunk by chunk of rows while a writer thread
//!   writes the previous chunk. Memory stays bounded by a few chunks plus the adapters, whatever the model's size.
//! - `compute.rs`: one chunk of rows (dequantize, add the scaled products, round, requantize, quality sums).
//! - `kernel.rs`: the portable low-rank add and quality sums; their x86 SIMD versions live with the crate's
//!   other intrinsics in `quant/x86/`.

mod compute;
mod kernel;
mod pipeline;
mod plan;

pub use compute::{Term, ROW_GROUP};
pub use kernel::Sums;
pub use pipeline::{PatchReport, Progress, TensorReport};
pub use plan::{larger_type, AdapterInput, PatchNote, PatchOptions, PatchPlan};

/// Namespace of the metadata keys this project adds to its outputs.
pub const METADATA_PREFIX: &str = "ggml_lora.";

#[cfg(test)]
mod test_util;
