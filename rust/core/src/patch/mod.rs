//! The patch engine: merge LoRA adapters into a (quantized) GGUF model in one streaming pass.
//!
//! [`PatchPlan::new`] validates everything (architectures, names, shapes, types, output path) before a byte
//! is written. [`PatchPlan::run`] then streams the model in tensor order: untouched tensors are copied by the
//! kernel from the model file; patched tensors are processed chunk by chunk of rows (dequantize the source,
//! add the scaled products, requantize; rows in parallel) while a writer thread writes the previous chunk.
//! Memory stays bounded by a few chunks plus the adapters, whatever the model's size.

mod compute;
mod kernel;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::Instant;

pub use compute::{Term, ROW_GROUP};
pub use kernel::Sums;

use crate::adapter::LoraAdapter;
use crate::error::{Error, Incompatible, Result};
use crate::gguf::split::{self, ShardedWriter, SplitRule};
use crate::gguf::{Array, TensorSpec, Value, ValueType, WriteOptions};
use crate::imatrix::Imatrix;
use crate::model::ModelFile;
use crate::quant;
use crate::types::GgmlType;

/// Namespace of the metadata keys this project adds to its outputs.
pub const METADATA_PREFIX: &str = "ggml_lora.";
/// f32 values per chunk of rows (about 4 MiB of f32 work per chunk).
const CHUNK_ELEMENTS: usize = 1 << 20;
/// Chunks in flight between the compute and the writer thread.
const PIPELINE_DEPTH: usize = 3;

/// An adapter with the user's scale for it (llama.cpp's `--lora-scaled FILE SCALE`).
pub struct AdapterInput {
    /// The adapter (shared: a loaded adapter can serve several patches).
    pub adapter: std::sync::Arc<LoraAdapter>,
    /// The user's scale (1.0 for `--lora`).
    pub scale: f32,
}

/// Settings of a patch.
#[derive(Clone, Debug, Default)]
pub struct PatchOptions {
    /// Type of every patched tensor; `None` keeps each tensor's type in the model.
    pub out_type: Option<GgmlType>,
    /// Per-tensor output types, like llama-quantize's `--tensor-type`: the first pattern (a regular expression,
    /// matched anywhere in the tensor name, case-insensitively) that matches a patched tensor sets its type,
    /// before `out_type`. Untouched tensors are copied as they are.
    pub tensor_types: Vec<(String, GgmlType)>,
    /// Importance weights for the patched tensors, used by every output type whose ggml quantizer takes them (as
    /// `llama-quantize --imatrix` does); tensors it has no entry for are quantized without.
    pub imatrix: Option<std::sync::Arc<Imatrix>>,
    /// When set, a patched tensor whose requantization to its type would keep less than this share of the LoRA
    /// change ([`TensorReport::retained`]) is written in the next larger type of its family instead ([`larger_type`]),
    /// repeatedly, until it keeps enough or the family ends.
    pub keep_lora: Option<f64>,
    /// Round W' to this type (F16 or BF16) before quantizing, as the PEFT merge → convert → quantize pipeline
    /// does; `None` quantizes from f32 (most accurate).
    pub intermediate: Option<GgmlType>,
    /// Worker threads; `None` uses all cores.
    pub threads: Option<usize>,
    /// fsync the output before renaming it into place.
    pub sync: bool,
    /// Metadata added to (or replacing in) the model's metadata, e.g. what was merged.
    pub extra_metadata: Vec<(String, Value)>,
    /// How the output is divided into shards: by default as the model is (a split model gives the same shards,
    /// each tensor in the same shard), or merged into one file, or re-split like `llama-gguf-split --split`.
    pub split: SplitRule,
}

/// Progress of a running patch, reported after each tensor and each chunk of a patched tensor.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    /// Tensors completed.
    pub tensors_done: usize,
    /// Tensors in the model.
    pub tensors_total: usize,
    /// The tensor being processed.
    pub tensor: &'a str,
    /// Output bytes produced so far.
    pub bytes_done: u64,
    /// Output bytes in all.
    pub bytes_total: u64,
}

/// The quality of one patched tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorReport {
    /// Tensor name.
    pub name: String,
    /// Its type in the model.
    pub model_type: GgmlType,
    /// Its type in the output.
    pub out_type: GgmlType,
    /// Whether its values came from the base file (`--lora-base`) rather than the model.
    pub from_base: bool,
    /// Number of adapters that patched it.
    pub n_adapters: usize,
    /// The raw sums (see [`Sums`]).
    pub sums: Sums,
    /// Whether its quantizer used importance weights.
    pub used_imatrix: bool,
    /// When the keep-LoRA rule moved it to a larger type: the type it would have had, and what that type would
    /// have retained.
    pub promoted_from: Option<(GgmlType, f64)>,
    /// Elements per row (with the rows, what a type change costs in bytes).
    pub row_len: u64,
    /// Number of rows.
    pub rows: u64,
}

impl TensorReport {
    /// ‖ΔW‖ / ‖W_src‖: how big the intended change is.
    pub fn relative_change(&self) -> f64 {
        ratio(self.sums.delta_sq.sqrt(), self.sums.src_sq.sqrt())
    }

    /// ⟨Q − W_model, ΔW⟩ / ‖ΔW‖²: the share of the intended change present in the output compared with the
    /// model the user had (1 = all of it, 0 = lost in quantization noise).
    pub fn retained(&self) -> f64 {
        ratio(self.sums.vs_model_dot_delta, self.sums.delta_sq)
    }

    /// cos(Q − W_src, ΔW): whether what changed points the way the adapter wanted.
    pub fn cosine(&self) -> f64 {
        ratio(self.sums.applied_dot_delta, (self.sums.applied_sq * self.sums.delta_sq).sqrt())
    }

    /// ‖Q − W'‖ / ‖ΔW‖: the requantization error measured against the size of the change.
    pub fn error_ratio(&self) -> f64 {
        ratio(self.sums.error_sq.sqrt(), self.sums.delta_sq.sqrt())
    }

    /// Bytes the output spends on this tensor beyond what its planned type would have taken (0 unless promoted).
    pub fn extra_bytes(&self) -> u64 {
        match self.promoted_from {
            Some((from, _)) => tensor_bytes(self.out_type, self.row_len, self.rows).saturating_sub(tensor_bytes(
                from,
                self.row_len,
                self.rows,
            )),
            None => 0,
        }
    }
}

fn tensor_bytes(ty: GgmlType, row_len: u64, rows: u64) -> u64 {
    ty.row_bytes(row_len).unwrap_or(0).saturating_mul(rows)
}

/// The next type up `ty`'s family (see [`larger_type`]) that this crate can write for rows of `row_len`.
fn next_writable_type(ty: GgmlType, row_len: u64) -> Option<GgmlType> {
    let mut next = larger_type(ty)?;
    while !(quant::can_quantize(next) && next.row_bytes(row_len).is_some()) {
        next = larger_type(next)?;
    }
    Some(next)
}

/// The next larger type of `ty`'s family, which the keep-LoRA rule moves a tensor to: q2_K → q3_K → q4_K → q5_K →
/// q6_K → q8_0 → f16, q4_0 → q5_0 → q8_0, q4_1 → q5_1 → q8_0; `None` for f16, bf16, f32 and the types this crate
/// cannot write.
pub fn larger_type(ty: GgmlType) -> Option<GgmlType> {
    use GgmlType::*;
    Some(match ty {
        Q2_K => Q3_K,
        Q3_K => Q4_K,
        Q4_K => Q5_K,
        Q5_K => Q6_K,
        Q6_K | Q5_0 | Q5_1 => Q8_0,
        Q4_0 => Q5_0,
        Q4_1 => Q5_1,
        Q8_0 => F16,
        _ => return None,
    })
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        if a == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        a / b
    }
}

/// What a finished patch reports.
#[derive(Clone, Debug)]
pub struct PatchReport {
    /// The output file (a split output's first shard, the one llama.cpp opens).
    pub out: PathBuf,
    /// Every file written, in shard order (just `out` for an unsplit output).
    pub outputs: Vec<PathBuf>,
    /// One entry per patched tensor, in file order.
    pub tensors: Vec<TensorReport>,
    /// Tensors copied untouched.
    pub copied: usize,
    /// Bytes of the output file.
    pub bytes_written: u64,
    /// Wall time of the run, in seconds.
    pub seconds: f64,
    /// Things the user should know about the result (see [`PatchPlan::notes`]).
    pub notes: Vec<String>,
}

struct PatchedTensor {
    /// (adapter index, pair index) of every term.
    terms: Vec<(usize, usize)>,
    /// Index of the source tensor in the base (if any).
    base_index: Option<usize>,
}

struct TensorPlan {
    model_index: usize,
    out_type: GgmlType,
    patch: Option<PatchedTensor>,
}

/// Compiles `--tensor-type` patterns (case-insensitive, as llama-quantize lower-cases them).
fn compile_tensor_types(patterns: &[(String, GgmlType)]) -> Result<Vec<(regex::Regex, GgmlType)>> {
    patterns
        .iter()
        .map(|(p, ty)| {
            regex::RegexBuilder::new(p).case_insensitive(true).build().map(|r| (r, *ty)).map_err(|e| {
                incompatible(Incompatible::Other(format!(
                    "tensor type pattern {p:?} is not a valid regular expression: {e}"
                )))
            })
        })
        .collect()
}

/// A validated patch, ready to run.
pub struct PatchPlan<'a> {
    model: &'a ModelFile,
    base: Option<&'a ModelFile>,
    adapters: &'a [AdapterInput],
    options: PatchOptions,
    tensors: Vec<TensorPlan>,
    metadata: Vec<(String, Value)>,
    notes: Vec<String>,
}

fn architecture(file: &ModelFile) -> Option<String> {
    file.get("general.architecture").and_then(Value::as_str).map(str::to_owned)
}

fn incompatible(i: Incompatible) -> Error {
    Error::Incompatible(i)
}

/// Names listed per type in [`Incompatible::CannotQuantize`] before "and N more".
const LISTED_TENSORS: usize = 8;

/// The error for patched tensors (name, planned output type) this project cannot quantize: every such tensor by
/// type (in first-seen order; long lists shortened), and the types it can write.
fn cannot_quantize_error(unwritable: &[(GgmlType, String)]) -> Incompatible {
    let mut types: Vec<GgmlType> = Vec::new();
    for (ty, _) in unwritable {
        if !types.contains(ty) {
            types.push(*ty);
        }
    }
    let groups: Vec<String> = types
        .iter()
        .map(|&ty| {
            let names: Vec<&str> = unwritable.iter().filter(|(t, _)| *t == ty).map(|(_, n)| n.as_str()).collect();
            let mut listed = names.iter().take(LISTED_TENSORS).copied().collect::<Vec<_>>().join(", ");
            if names.len() > LISTED_TENSORS {
                listed.push_str(&format!(" and {} more", names.len() - LISTED_TENSORS));
            }
            format!("{ty}: {listed}")
        })
        .collect();
    let writable: Vec<&str> = GgmlType::ALL.iter().filter(|&&t| quant::can_quantize(t)).map(|t| t.name()).collect();
    Incompatible::CannotQuantize {
        types: types.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
        tensors: groups.join("; "),
        writable: writable.join(", "),
    }
}

/// The llama.cpp `general.file_type` (`enum llama_ftype`) of a file whose tensors are mostly `ty`.
fn llama_file_type(ty: GgmlType) -> Option<u32> {
    Some(match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::BF16 => 32,
        _ => return None,
    })
}

impl<'a> PatchPlan<'a> {
    /// Checks that `model`, `base` and `adapters` belong together and decides every tensor's fate.
    pub fn new(
        model: &'a ModelFile,
        base: Option<&'a ModelFile>,
        adapters: &'a [AdapterInput],
        options: PatchOptions,
    ) -> Result<PatchPlan<'a>> {
        let model_name = model.path().display().to_string();
        let model_arch = architecture(model);
        let check_arch = |other: Option<String>, other_file: String| -> Result<()> {
            match (&model_arch, other) {
                (Some(m), Some(o)) if *m != o => Err(incompatible(Incompatible::Architecture {
                    model_file: model_name.clone(),
                    model: m.clone(),
                    other_file,
                    other: o,
                })),
                _ => Ok(()),
            }
        };
        if let Some(base) = base {
            check_arch(architecture(base), base.path().display().to_string())?;
        }
        for input in adapters {
            check_arch(input.adapter.architecture.clone(), input.adapter.source.clone())?;
            if !input.scale.is_finite() {
                return Err(incompatible(Incompatible::Other(format!(
                    "scale {} for adapter {} is not finite",
                    input.scale, input.adapter.source
                ))));
            }
        }
        if let Some(t) = options.intermediate {
            if !matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                return Err(incompatible(Incompatible::Other(format!(
                    "intermediate type must be f32, f16 or bf16, not {t}"
                ))));
            }
        }

        let mut tensors: Vec<TensorPlan> = model
            .tensors()
            .iter()
            .enumerate()
            .map(|(i, t)| TensorPlan { model_index: i, out_type: t.ty, patch: None })
            .collect();
        for (a, input) in adapters.iter().enumerate() {
            for (p, pair) in input.adapter.pairs.iter().enumerate() {
                let Some((index, info)) = model.tensor(&pair.target) else {
                    return Err(incompatible(Incompatible::MissingTensor {
                        file: model_name.clone(),
                        name: pair.target.clone(),
                        needed_by: format!("targeted by adapter {}", input.adapter.source),
                    }));
                };
                let shape = info.shape();
                let rows_cols = (info.n_rows(), info.row_len());
                if info.dims.len() < 2 || rows_cols != (pair.rows as u64, pair.cols as u64) {
                    return Err(incompatible(Incompatible::Shape {
                        name: pair.target.clone(),
                        expected_what: format!(
                            "the LoRA product of adapter {} (rank {})",
                            input.adapter.source, pair.rank
                        ),
                        expected: vec![pair.rows as u64, pair.cols as u64],
                        found_what: format!("the tensor in {model_name}"),
                        found: shape,
                    }));
                }
                tensors[index]
                    .patch
                    .get_or_insert_with(|| PatchedTensor { terms: Vec::new(), base_index: None })
                    .terms
                    .push((a, p));
            }
        }

        for plan in &tensors {
            let Some(patch) = &plan.patch else { continue };
            let is_dora = |&(a, p): &(usize, usize)| adapters[a].adapter.pairs[p].magnitude.is_some();
            if patch.terms.len() > 1 && patch.terms.iter().any(is_dora) {
                let sources: Vec<&str> =
                    patch.terms.iter().map(|&(a, _)| adapters[a].adapter.source.as_str()).collect();
                return Err(incompatible(Incompatible::Other(format!(
                    "tensor {:?} is patched by a DoRA adapter and other adapters ({}): DoRA rescales the whole \
                     merged row, so it must be the only adapter on a tensor; patch in two runs",
                    model.tensors()[plan.model_index].name,
                    sources.join(", ")
                ))));
            }
        }

        let tensor_types = compile_tensor_types(&options.tensor_types)?;
        if let Some(keep) = options.keep_lora {
            if !(0.0..=1.0).contains(&keep) {
                return Err(incompatible(Incompatible::Other(format!(
                    "the share of the LoRA change to keep must be between 0 and 1, not {keep}"
                ))));
            }
        }
        let mut cannot_quantize: Vec<(GgmlType, String)> = Vec::new();
        for plan in tensors.iter_mut() {
            let info = &model.tensors()[plan.model_index];
            let Some(patch) = plan.patch.as_mut() else {
                continue;
            };
            if let Some(base) = base {
                let Some((bi, binfo)) = base.tensor(&info.name) else {
                    return Err(incompatible(Incompatible::MissingTensor {
                        file: base.path().display().to_string(),
                        name: info.name.clone(),
                        needed_by: "the base must hold every patched tensor".into(),
                    }));
                };
                if binfo.dims != info.dims {
                    return Err(incompatible(Incompatible::Shape {
                        name: info.name.clone(),
                        expected_what: format!("the tensor in {model_name}"),
                        expected: info.shape(),
                        found_what: format!("the tensor in base {}", base.path().display()),
                        found: binfo.shape(),
                    }));
                }
                if !quant::can_dequantize(binfo.ty) {
                    return Err(incompatible(Incompatible::CannotDequantize {
                        file: base.path().display().to_string(),
                        name: info.name.clone(),
                        ty: binfo.ty,
                    }));
                }
                patch.base_index = Some(bi);
            }
            if base.is_none() && !quant::can_dequantize(info.ty) {
                // Without a base the model's values are the source. (With one they only feed the quality
                // report, which then measures against the base when the model's type cannot be read.)
                return Err(incompatible(Incompatible::CannotDequantize {
                    file: model_name.clone(),
                    name: info.name.clone(),
                    ty: info.ty,
                }));
            }
            let out_type = tensor_types
                .iter()
                .find(|(pattern, _)| pattern.is_match(&info.name))
                .map(|(_, ty)| *ty)
                .or(options.out_type)
                .unwrap_or(info.ty);
            if !quant::can_quantize(out_type) {
                cannot_quantize.push((out_type, info.name.clone()));
            } else if out_type.row_bytes(info.row_len()).is_none() {
                return Err(incompatible(Incompatible::Other(format!(
                    "tensor {:?}: row length {} is not a multiple of the {out_type} block size {}",
                    info.name,
                    info.row_len(),
                    out_type.block_size()
                ))));
            }
            plan.out_type = out_type;
        }
        if !cannot_quantize.is_empty() {
            return Err(incompatible(cannot_quantize_error(&cannot_quantize)));
        }

        if let Some(imatrix) = &options.imatrix {
            Self::check_imatrix(model, &tensors, imatrix)?;
        }
        let metadata = Self::output_metadata(model, &tensors, &options);
        let notes = Self::collect_notes(model, &tensors, &options);
        Ok(PatchPlan { model, base, adapters, options, tensors, metadata, notes })
    }

    /// The importance matrix must belong to this model: at least one entry names one of its tensors, and the entry
    /// of every patched tensor has one weight per column.
    fn check_imatrix(model: &ModelFile, tensors: &[TensorPlan], imatrix: &Imatrix) -> Result<()> {
        if !imatrix.entries.keys().any(|name| model.tensor(name).is_some()) {
            return Err(incompatible(Incompatible::Other(format!(
                "importance matrix {}: none of its {} entries names a tensor of {} (is it for another model?)",
                imatrix.source,
                imatrix.entries.len(),
                model.path().display()
            ))));
        }
        for plan in tensors.iter().filter(|t| t.patch.is_some()) {
            let info = &model.tensors()[plan.model_index];
            if let Some(w) = imatrix.weights(&info.name) {
                if w.len() as u64 != info.row_len() {
                    return Err(incompatible(Incompatible::Other(format!(
                        "importance matrix {}: entry {:?} has {} weights, expected {} (one per column of the tensor)",
                        imatrix.source,
                        info.name,
                        w.len(),
                        info.row_len()
                    ))));
                }
            }
        }
        Ok(())
    }

    fn output_metadata(model: &ModelFile, tensors: &[TensorPlan], options: &PatchOptions) -> Vec<(String, Value)> {
        let mut metadata = model.metadata().to_vec();
        if options.out_type.is_some() || !options.tensor_types.is_empty() || options.keep_lora.is_some() {
            // llama.cpp guesses a file's type from its most common tensor type; keep general.file_type in step.
            let mut counts: Vec<(GgmlType, usize)> = Vec::new();
            for t in tensors.iter().filter(|t| model.tensors()[t.model_index].dims.len() >= 2) {
                match counts.iter_mut().find(|(ty, _)| *ty == t.out_type) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((t.out_type, 1)),
                }
            }
            let dominant = counts.iter().max_by_key(|(_, n)| *n).map(|(t, _)| *t);
            if let Some(file_type) = dominant.and_then(llama_file_type) {
                match metadata.iter_mut().find(|(k, _)| k == "general.file_type") {
                    Some((_, v)) => *v = Value::U32(file_type),
                    None => metadata.push(("general.file_type".into(), Value::U32(file_type))),
                }
            }
        }
        for (key, value) in &options.extra_metadata {
            // A model patched before keeps its history: list values are appended to.
            match metadata.iter_mut().find(|(k, _)| k == key) {
                Some((_, Value::Array(old))) => {
                    if let Value::Array(new) = value {
                        if old.elem_type == new.elem_type {
                            old.items.extend(new.items.iter().cloned());
                            continue;
                        }
                    }
                    *old = match value {
                        Value::Array(a) => a.clone(),
                        _ => Array { elem_type: ValueType::String, items: vec![] },
                    };
                }
                Some((_, v)) => *v = value.clone(),
                None => metadata.push((key.clone(), value.clone())),
            }
        }
        metadata
    }

    fn collect_notes(model: &ModelFile, tensors: &[TensorPlan], options: &PatchOptions) -> Vec<String> {
        let mut notes = Vec::new();
        let requantized = tensors.iter().filter(|t| t.patch.is_some() && !t.out_type.is_plain()).count();
        let imatrix = model.metadata().iter().find(|(k, _)| k.starts_with("quantize.imatrix."));
        if let Some(given) = &options.imatrix {
            let without: Vec<&str> = tensors
                .iter()
                .filter(|t| t.patch.is_some() && quant::takes_imatrix(t.out_type))
                .map(|t| model.tensors()[t.model_index].name.as_str())
                .filter(|name| given.weights(name).is_none())
                .collect();
            if !without.is_empty() {
                notes.push(format!(
                    "the importance matrix {} has no entry for {} patched tensor(s), quantized without one: {}",
                    given.source,
                    without.len(),
                    without.join(", ")
                ));
            }
        } else if let (Some(_), true) = (imatrix, requantized > 0) {
            let file = model.get("quantize.imatrix.file").and_then(Value::as_str).unwrap_or("unknown file");
            notes.push(format!(
                "the model was quantized with an importance matrix ({file}); the {requantized} patched tensors are \
                 requantized with ggml's reference quantizer, without it (untouched tensors keep theirs)"
            ));
        }
        notes
    }

    /// Things worth telling the user about this patch (e.g. an importance matrix that patched tensors lose).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Names of the tensors that will be patched, in file order.
    pub fn patched_tensors(&self) -> Vec<&str> {
        self.tensors
            .iter()
            .filter(|t| t.patch.is_some())
            .map(|t| self.model.tensors()[t.model_index].name.as_str())
            .collect()
    }

    /// The metadata the output will carry.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    fn check_output_path(&self, out: &Path) -> Result<()> {
        crate::paths::check_output(out)?;
        let mut inputs: Vec<PathBuf> = self.model.shards().iter().map(|(p, _)| p.to_path_buf()).collect();
        if let Some(base) = self.base {
            inputs.extend(base.shards().iter().map(|(p, _)| p.to_path_buf()));
        }
        inputs.extend(self.adapters.iter().flat_map(|a| a.adapter.inputs.iter().cloned()));
        inputs.extend(self.adapters.iter().map(|a| PathBuf::from(&a.adapter.source)));
        crate::paths::refuse_output_onto_inputs(out, &inputs)
    }

    /// Runs the patch, writing `out` atomically. `progress` is called after each tensor and chunk; an error
    /// from it cancels the run (nothing is written). When the output has several shards ([`PatchOptions::split`])
    /// `out` names them as [`split::output_paths`] says (the first shard's name or a prefix), and the set appears
    /// only when every shard is complete.
    pub fn run(&self, out: &Path, progress: &mut dyn FnMut(&Progress<'_>) -> Result<()>) -> Result<PatchReport> {
        let known_count = match self.options.split {
            SplitRule::Keep => Some(self.model.shards().len() as u16),
            SplitRule::Merge => Some(1),
            _ => None,
        };
        // Names known before any work are checked now, so a bad one is refused before patching.
        for path in known_count.map(|n| split::output_paths(out, n)).transpose()?.unwrap_or_default() {
            self.check_output_path(&path)?;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.options.threads.unwrap_or(0))
            .build()
            .map_err(|e| incompatible(Incompatible::Other(format!("cannot start worker threads: {e}"))))?;
        self.run_in_pool(&pool, out, progress)
    }

    fn run_in_pool(
        &self,
        pool: &rayon::ThreadPool,
        out: &Path,
        progress: &mut dyn FnMut(&Progress<'_>) -> Result<()>,
    ) -> Result<PatchReport> {
        let start = Instant::now();
        let promotions = match self.options.keep_lora {
            Some(keep) => self.promotions(pool, keep)?,
            None => vec![None; self.tensors.len()],
        };
        let out_types: Vec<GgmlType> =
            self.tensors.iter().zip(&promotions).map(|(t, p)| p.as_ref().map_or(t.out_type, |p| p.to)).collect();
        let specs: Vec<TensorSpec> = self
            .tensors
            .iter()
            .zip(&out_types)
            .map(|(t, &ty)| {
                let info = &self.model.tensors()[t.model_index];
                TensorSpec { name: info.name.clone(), dims: info.dims.clone(), ty }
            })
            .collect();
        let out_sizes: Vec<u64> = specs
            .iter()
            .map(|s| crate::gguf::tensor_nbytes(&s.name, &s.dims, s.ty).map_err(Error::InvalidTensorInfo))
            .collect::<Result<_>>()?;
        let assignment = split::assign_shards(&out_sizes, self.options.split, &self.model.assignment())?;
        let paths = split::output_paths(out, assignment.last().map_or(1, |&s| s + 1))?;
        for path in &paths {
            self.check_output_path(path)?;
        }
        let options = WriteOptions { sync: self.options.sync };
        let writer = ShardedWriter::create(&paths, &self.metadata, specs, &assignment, options)?;
        let sizes: Vec<u64> = writer.tensors().map(|(_, n)| n).collect();
        let bytes_total: u64 = sizes.iter().sum();

        let (to_writer, from_compute) = mpsc::sync_channel::<Message>(PIPELINE_DEPTH);
        let (recycle_tx, recycle_rx) = mpsc::channel::<Vec<u8>>();
        let model = self.model;
        std::thread::scope(|scope| {
            let writer_thread = scope.spawn(move || write_loop(writer, from_compute, recycle_tx, model));
            let computed = self.compute_loop(pool, &to_writer, &recycle_rx, &sizes, bytes_total, &promotions, progress);
            let finish = match &computed {
                Ok(_) => to_writer.send(Message::Finish).is_ok(),
                Err(_) => false,
            };
            drop(to_writer);
            let written =
                writer_thread.join().unwrap_or_else(|_| Err(Error::WriterState("writer thread panicked".into())));
            match (computed, written) {
                // The writer's own error explains a failed send best (e.g. disk full).
                (_, Err(e)) if finish || matches!(e, Error::Io { .. }) => Err(e),
                (Err(e), _) => Err(e),
                (Ok(reports), Ok(Some(outputs))) => Ok(PatchReport {
                    out: outputs.first().cloned().unwrap_or_else(|| out.to_path_buf()),
                    copied: self.tensors.len() - reports.len(),
                    tensors: reports,
                    bytes_written: outputs.iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum(),
                    outputs,
                    seconds: start.elapsed().as_secs_f64(),
                    notes: self.notes.clone(),
                }),
                (Ok(_), _) => Err(Error::WriterState("writer stopped before the output was complete".into())),
            }
        })
    }

    #[allow(clippy::too_many_arguments)] // the pipeline's ends and the run's fixed facts, each used once
    fn compute_loop(
        &self,
        pool: &rayon::ThreadPool,
        to_writer: &SyncSender<Message>,
        recycled: &Receiver<Vec<u8>>,
        sizes: &[u64],
        bytes_total: u64,
        promotions: &[Option<Promotion>],
        progress: &mut dyn FnMut(&Progress<'_>) -> Result<()>,
    ) -> Result<Vec<TensorReport>> {
        let send = |m: Message| send_to_writer(to_writer, m);
        let mut reports = Vec::new();
        let mut bytes_done = 0u64;
        let n = self.tensors.len();
        for (i, plan) in self.tensors.iter().enumerate() {
            let info = &self.model.tensors()[plan.model_index];
            match &plan.patch {
                None => {
                    send(Message::Copy { tensor: plan.model_index })?;
                    bytes_done += sizes[i];
                }
                Some(patch) => {
                    let out_type = promotions[i].as_ref().map_or(plan.out_type, |p| p.to);
                    let mut emit = |out: Vec<u8>| {
                        bytes_done += out.len() as u64;
                        send(Message::Data(out))?;
                        progress(&Progress {
                            tensors_done: i,
                            tensors_total: n,
                            tensor: &info.name,
                            bytes_done,
                            bytes_total,
                        })
                    };
                    let mut buffer = || recycled.try_recv().unwrap_or_default();
                    let sums = self
                        .patch_tensor(pool, plan, patch, out_type, true, &mut buffer, &mut emit)
                        .map_err(|e| Error::InTensor { name: info.name.clone(), source: Box::new(e) })?;
                    reports.push(TensorReport {
                        name: info.name.clone(),
                        model_type: info.ty,
                        out_type,
                        from_base: patch.base_index.is_some(),
                        n_adapters: patch.terms.len(),
                        sums,
                        used_imatrix: self.imatrix_for(&info.name, out_type).is_some(),
                        promoted_from: promotions[i].as_ref().map(|p| (p.from, p.retained_before)),
                        row_len: info.row_len(),
                        rows: info.n_rows(),
                    });
                }
            }
            progress(&Progress { tensors_done: i + 1, tensors_total: n, tensor: &info.name, bytes_done, bytes_total })?;
        }
        Ok(reports)
    }

    /// The importance weights the quantizer of tensor `name` uses when written as `ty`.
    fn imatrix_for(&self, name: &str, ty: GgmlType) -> Option<&[f32]> {
        self.options.imatrix.as_deref().filter(|_| quant::takes_imatrix(ty)).and_then(|m| m.weights(name))
    }

    /// The keep-LoRA rule: for every patched tensor, compute it (without writing) in its planned type and then in
    /// larger types of its family until it retains at least `keep` of the LoRA change; `Some` where it moved.
    fn promotions(&self, pool: &rayon::ThreadPool, keep: f64) -> Result<Vec<Option<Promotion>>> {
        let mut result = vec![None; self.tensors.len()];
        for (i, plan) in self.tensors.iter().enumerate() {
            let Some(patch) = &plan.patch else { continue };
            let info = &self.model.tensors()[plan.model_index];
            let mut ty = plan.out_type;
            let mut first_retained = None;
            while let Some(next) = next_writable_type(ty, info.row_len()) {
                let mut scratch = Vec::new();
                let mut buffer = || std::mem::take(&mut scratch);
                let mut discard = |_: Vec<u8>| Ok(());
                let sums = self
                    .patch_tensor(pool, plan, patch, ty, false, &mut buffer, &mut discard)
                    .map_err(|e| Error::InTensor { name: info.name.clone(), source: Box::new(e) })?;
                let retained = ratio(sums.vs_model_dot_delta, sums.delta_sq);
                first_retained.get_or_insert(retained);
                if sums.delta_sq == 0.0 || retained >= keep {
                    break;
                }
                ty = next;
            }
            if ty != plan.out_type {
                result[i] =
                    Some(Promotion { from: plan.out_type, to: ty, retained_before: first_retained.unwrap_or(0.0) });
            }
        }
        Ok(result)
    }

    /// Computes one patched tensor written as `out_type`, chunk by chunk: each chunk's bytes go to `emit` in row
    /// order, in a buffer from `buffer` (recycled). With `release`, mapped source pages are dropped once used.
    #[allow(clippy::too_many_arguments)]
    fn patch_tensor(
        &self,
        pool: &rayon::ThreadPool,
        plan: &TensorPlan,
        patch: &PatchedTensor,
        out_type: GgmlType,
        release: bool,
        buffer: &mut dyn FnMut() -> Vec<u8>,
        emit: &mut dyn FnMut(Vec<u8>) -> Result<()>,
    ) -> Result<Sums> {
        let info = &self.model.tensors()[plan.model_index];
        let (src_file, src_index) = match (self.base, patch.base_index) {
            (Some(base), Some(bi)) => (base, bi),
            _ => (self.model, plan.model_index),
        };
        let src_info = &src_file.tensors()[src_index];
        let src = src_file.tensor_data(src_index);
        let model_data = self.model.tensor_data(plan.model_index);
        let cols = info.row_len() as usize;
        let rows = info.n_rows() as usize;
        let src_row_bytes = src_info.ty.row_bytes(cols as u64).unwrap_or(0) as usize;
        let model_row_bytes = info.ty.row_bytes(cols as u64).unwrap_or(0) as usize;
        let out_row_bytes = out_type.row_bytes(cols as u64).unwrap_or(0) as usize;
        let imatrix = self.imatrix_for(&info.name, out_type);
        // This tensor's factors, in f32 (read from mapped adapters now, dropped when the tensor is done).
        let mut factors = Vec::with_capacity(patch.terms.len());
        for &(a, p) in &patch.terms {
            let input = &self.adapters[a];
            let pair = &input.adapter.pairs[p];
            let (left, right) = pair.load()?;
            let magnitude = pair.magnitude.as_deref();
            factors.push((left, right, pair.rank, input.adapter.pair_scale(pair, input.scale), magnitude));
        }
        let terms: Vec<Term<'_>> = factors
            .iter()
            .map(|(left, right, rank, scale, magnitude)| Term {
                left,
                right,
                rank: *rank,
                scale: *scale,
                magnitude: *magnitude,
            })
            .collect();

        let compare_with_model = patch.base_index.is_some() && quant::can_dequantize(info.ty);
        let chunk_rows = (CHUNK_ELEMENTS / cols.max(1)).max(ROW_GROUP) / ROW_GROUP * ROW_GROUP;
        let mut sums = Sums::default();
        let mut row = 0;
        while row < rows {
            let n = chunk_rows.min(rows - row);
            let mut out = buffer();
            out.resize(n * out_row_bytes, 0);
            let src_range = row * src_row_bytes..(row + n) * src_row_bytes;
            let model_range = row * model_row_bytes..(row + n) * model_row_bytes;
            let job = compute::ChunkJob {
                src: &src[src_range.clone()],
                src_ty: src_info.ty,
                model: compare_with_model.then(|| (&model_data[model_range.clone()], info.ty)),
                first_row: row,
                cols,
                terms: &terms,
                out_ty: out_type,
                intermediate: self.options.intermediate,
                imatrix,
            };
            let chunk_sums = pool.install(|| compute::process_chunk(&job, &mut out))?;
            sums = sums.combine(chunk_sums);
            emit(out)?;
            if release {
                src_file.release_tensor_pages(src_index, src_range);
                if compare_with_model {
                    self.model.release_tensor_pages(plan.model_index, model_range);
                }
            }
            row += n;
        }
        Ok(sums)
    }
}

/// A tensor the keep-LoRA rule moved to a larger type.
#[derive(Clone, Debug)]
struct Promotion {
    from: GgmlType,
    to: GgmlType,
    retained_before: f64,
}

enum Message {
    Data(Vec<u8>),
    /// Copy model tensor `tensor` as it is, from its file.
    Copy {
        tensor: usize,
    },
    Finish,
}

/// Hands a message to the writer thread; it only refuses when the writer has stopped (its own error, e.g. a
/// full disk, is what the run then reports).
fn send_to_writer(to_writer: &SyncSender<Message>, message: Message) -> Result<()> {
    to_writer.send(message).map_err(|_| Error::WriterState("the writer stopped early".into()))
}

/// The writer thread: writes chunks in order, returns buffers for reuse, and commits on `Finish`. If the
/// compute side stops without `Finish`, the writer is dropped and its temporary file removed.
fn write_loop(
    mut writer: ShardedWriter,
    messages: Receiver<Message>,
    recycle: mpsc::Sender<Vec<u8>>,
    model: &ModelFile,
) -> Result<Option<Vec<PathBuf>>> {
    for message in messages {
        match message {
            Message::Data(buf) => {
                writer.write_data(&buf)?;
                let _ = recycle.send(buf);
            }
            Message::Copy { tensor } => {
                let (file, range) = model.tensor_source(tensor);
                writer.copy_from_file(file, range.start, range.end - range.start)?
            }
            Message::Finish => return writer.finish().map(Some),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cannot_quantize_error_names_every_tensor_by_type_and_the_writable_types() {
        let mut unwritable = vec![(GgmlType::IQ4_NL, "a".to_string()), (GgmlType::IQ2_XS, "b".to_string())];
        unwritable.extend((0..10).map(|i| (GgmlType::IQ4_NL, format!("t{i}"))));
        let message = Error::Incompatible(cannot_quantize_error(&unwritable)).to_string();
        assert!(message.contains("cannot quantize to iq4_nl, iq2_xs"), "{message}");
        assert!(message.contains("(iq4_nl: a, t0, t1, t2, t3, t4, t5, t6 and 3 more; iq2_xs: b)"), "{message}");
        assert!(message.contains("choose an output type for these tensors"), "{message}");
        assert!(message.contains("q8_0") && message.contains("f16"), "{message}");
        assert!(!message.contains("--"), "no command-line flags in the core: {message}");
    }
}
