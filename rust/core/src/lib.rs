//! ggml-lora-core: the pure-Rust core of ggml-lora (no PyO3 here).
//!
//! - [`types`]: ggml tensor types, block sizes.
//! - [`quant`]: f32/f16/bf16/q8_0/q4_0 kernels, bit-exact with ggml's reference quantizers.
//! - [`gguf`]: memory-mapped GGUF reader and streaming, atomic GGUF writer.
//! - [`model`]: a model as distributed (one GGUF, a set of gguf-split shards, or a legacy GGML/GGJT file)
//!   presented as one set of tensors; [`legacy`]: the pre-GGUF containers; [`mapped`]: memory-mapped inputs.
//! - [`imatrix`]: importance matrices (llama-imatrix output, GGUF and legacy).
//! - [`atomic`]: temporary-file-then-rename output files.
//! - [`torch_bin`]: a non-executing, bounded reader of torch `.bin` state dicts (zip + pickle).
//! - [`patterns`]: PEFT's `rank_pattern`/`alpha_pattern` key matching, in linear time.
//! - [`peft_weights`]: a PEFT folder's weights (safetensors mapped through the `safetensors` crate, torch `.bin`);
//!   [`peft`]: the adapter built from them by a typed plan; [`scale`]: PEFT's and llama.cpp's scale arithmetic.
//! - [`paths`]: which kinds of path are accepted as inputs and outputs (regular files only).
#![deny(missing_docs)]

pub mod adapter;
pub mod atomic;
pub mod error;
pub mod ggla;
pub mod gguf;
pub mod imatrix;
pub mod legacy;
pub mod mapped;
pub mod model;
pub mod patch;
pub mod paths;
pub mod patterns;
pub mod peft;
pub mod peft_weights;
pub mod quant;
pub mod scale;
pub mod torch_bin;
pub mod types;

pub use error::{BadImatrix, Error, ErrorDetails, Malformed, Result, SafetensorsProblem, ShardProblem, TorchBin};
pub use types::GgmlType;
