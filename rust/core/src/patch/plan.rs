//! The plan of a patch: every check made before a byte is written, and every decision about each tensor (patched
//! or copied, its source, its output type), the output's metadata and the notes for the user.

use std::path::{Path, PathBuf};

use crate::adapter::LoraAdapter;
use crate::error::{Error, Incompatible, Result};
use crate::gguf::split::SplitRule;
use crate::gguf::{Array, Value, ValueType};
use crate::imatrix::Imatrix;
use crate::model::ModelFile;
use crate::quant;
use crate::types::GgmlType;

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
    /// change ([`TensorReport::retained`](super::TensorReport::retained)) is written in the next larger type of its family instead ([`larger_type`]),
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

/// The next type up `ty`'s family (see [`larger_type`]) that this crate can write for rows of `row_len`.
pub(super) fn next_writable_type(ty: GgmlType, row_len: u64) -> Option<GgmlType> {
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

/// How a patched tensor is made.
pub(super) struct PatchedTensor {
    /// (adapter index, pair index) of every term.
    pub(super) terms: Vec<(usize, usize)>,
    /// Index of the source tensor in the base (if any).
    pub(super) base_index: Option<usize>,
}

/// The fate of one model tensor, in model order.
pub(super) struct TensorPlan {
    /// Its index in the model.
    pub(super) model_index: usize,
    /// Its planned output type (the keep-LoRA rule may still move a patched tensor up its family).
    pub(super) out_type: GgmlType,
    /// How it is patched; `None` copies it untouched.
    pub(super) patch: Option<PatchedTensor>,
}

/// Compiles `--tensor-type` patterns (case-insensitive, as llama-quantize lower-cases them).
fn compile_tensor_types(patterns: &[(String, GgmlType)]) -> Result<Vec<(regex::Regex, GgmlType)>> {
    patterns
        .iter()
        .map(|(p, ty)| {
            regex::RegexBuilder::new(p).case_insensitive(true).build().map(|r| (r, *ty)).map_err(|e| {
                incompatible(Incompatible::TensorTypePattern { pattern: p.clone(), reason: e.to_string() })
            })
        })
        .collect()
}

/// Something the user should know about a patch that is not an error: facts (files, tensors, counts) for the
/// caller to put into words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatchNote {
    /// The importance matrix given has no entry for these patched tensors, whose output types take one: they
    /// are quantized without importance weights.
    ImatrixMissingEntries {
        /// Where the importance matrix came from ([`Imatrix::source`]).
        source: String,
        /// The patched tensors without an entry, in file order.
        tensors: Vec<String>,
    },
    /// The model was quantized with an importance matrix (its `quantize.imatrix.*` metadata says so) and none
    /// was given: the requantized patched tensors are quantized by ggml's reference quantizer, without it
    /// (untouched tensors keep their bytes).
    ModelImatrixNotApplied {
        /// The model's `quantize.imatrix.file`, when it is a string.
        file: Option<String>,
        /// How many patched tensors are requantized (planned output type not f32/f16/bf16).
        requantized: usize,
    },
}

impl PatchNote {
    /// A short stable name of the note's kind (`imatrix_missing_entries`, `model_imatrix_not_applied`).
    pub fn kind(&self) -> &'static str {
        match self {
            PatchNote::ImatrixMissingEntries { .. } => "imatrix_missing_entries",
            PatchNote::ModelImatrixNotApplied { .. } => "model_imatrix_not_applied",
        }
    }
}

/// A validated patch, ready to run.
pub struct PatchPlan<'a> {
    pub(super) model: &'a ModelFile,
    pub(super) base: Option<&'a ModelFile>,
    pub(super) adapters: &'a [AdapterInput],
    pub(super) options: PatchOptions,
    pub(super) tensors: Vec<TensorPlan>,
    metadata: Vec<(String, Value)>,
    pub(super) notes: Vec<PatchNote>,
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
                return Err(incompatible(Incompatible::Scale {
                    adapter: input.adapter.source.clone(),
                    scale: input.scale,
                }));
            }
        }
        if let Some(t) = options.intermediate {
            if !matches!(t, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                return Err(incompatible(Incompatible::IntermediateType { ty: t }));
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
                return Err(incompatible(Incompatible::DoraNotAlone {
                    tensor: model.tensors()[plan.model_index].name.clone(),
                    adapters: sources.join(", "),
                }));
            }
        }

        let tensor_types = compile_tensor_types(&options.tensor_types)?;
        if let Some(keep) = options.keep_lora {
            if !(0.0..=1.0).contains(&keep) {
                return Err(incompatible(Incompatible::KeepShare { share: keep }));
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
                return Err(incompatible(Incompatible::RowLength {
                    tensor: info.name.clone(),
                    row_len: info.row_len(),
                    ty: out_type,
                    block: out_type.block_size(),
                }));
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
            return Err(incompatible(Incompatible::ImatrixForAnotherModel {
                source_name: imatrix.source.clone(),
                entries: imatrix.entries.len(),
                model: model.path().display().to_string(),
            }));
        }
        for plan in tensors.iter().filter(|t| t.patch.is_some()) {
            let info = &model.tensors()[plan.model_index];
            if let Some(w) = imatrix.weights(&info.name) {
                if w.len() as u64 != info.row_len() {
                    return Err(incompatible(Incompatible::ImatrixEntryLength {
                        source_name: imatrix.source.clone(),
                        tensor: info.name.clone(),
                        found: w.len(),
                        expected: info.row_len(),
                    }));
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

    fn collect_notes(model: &ModelFile, tensors: &[TensorPlan], options: &PatchOptions) -> Vec<PatchNote> {
        let mut notes = Vec::new();
        let requantized = tensors.iter().filter(|t| t.patch.is_some() && !t.out_type.is_plain()).count();
        let imatrix = model.metadata().iter().find(|(k, _)| k.starts_with("quantize.imatrix."));
        if let Some(given) = &options.imatrix {
            let without: Vec<String> = tensors
                .iter()
                .filter(|t| t.patch.is_some() && quant::takes_imatrix(t.out_type))
                .map(|t| &model.tensors()[t.model_index].name)
                .filter(|name| given.weights(name).is_none())
                .cloned()
                .collect();
            if !without.is_empty() {
                notes.push(PatchNote::ImatrixMissingEntries { source: given.source.clone(), tensors: without });
            }
        } else if let (Some(_), true) = (imatrix, requantized > 0) {
            let file = model.get("quantize.imatrix.file").and_then(Value::as_str).map(str::to_owned);
            notes.push(PatchNote::ModelImatrixNotApplied { file, requantized });
        }
        notes
    }

    /// Things worth telling the user about this patch (e.g. an importance matrix that patched tensors lose).
    pub fn notes(&self) -> &[PatchNote] {
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

    pub(super) fn check_output_path(&self, out: &Path) -> Result<()> {
        crate::paths::check_output(out)?;
        let mut inputs: Vec<PathBuf> = self.model.shards().iter().map(|(p, _)| p.to_path_buf()).collect();
        if let Some(base) = self.base {
            inputs.extend(base.shards().iter().map(|(p, _)| p.to_path_buf()));
        }
        inputs.extend(self.adapters.iter().flat_map(|a| a.adapter.inputs.iter().cloned()));
        inputs.extend(self.adapters.iter().map(|a| PathBuf::from(&a.adapter.source)));
        crate::paths::refuse_output_onto_inputs(out, &inputs)
    }
}

#[cfg(test)]
mod tests {
    //! The plan's decisions and refusals on tiny models built here. Oracles: the rules as stated (llama-quantize's
    //! `--tensor-type` order, llama.cpp's `enum llama_ftype` numbers, restated by hand), and the inputs' own
    //! names and shapes for the errors' facts.
    use super::super::test_util::{adapter, model, pair, scratch, TestTensor};
    use super::*;

    /// A llama-like model: an embedding (f32), two q8_0 projections of 4 x 64, a 1-D norm.
    fn small_model(dir: &Path, name: &str, extra: &[(&str, Value)]) -> ModelFile {
        model(
            dir,
            name,
            extra,
            &[
                TestTensor::zeros("token_embd.weight", &[8, 64], GgmlType::F32),
                TestTensor::zeros("blk.0.attn_q.weight", &[4, 64], GgmlType::Q8_0),
                TestTensor::zeros("blk.0.attn_v.weight", &[4, 64], GgmlType::Q8_0),
                TestTensor::zeros("blk.0.attn_norm.weight", &[64], GgmlType::F32),
            ],
        )
    }

    /// A rank-1 pair of 4 x 64 on `target`.
    fn pair_4x64(target: &str) -> crate::adapter::LoraPair {
        pair(target, 4, 64, 1, vec![1.0; 4], vec![0.5; 64])
    }

    fn qv_adapter() -> Vec<AdapterInput> {
        vec![adapter(
            "qv.gguf",
            Some("llama"),
            vec![pair_4x64("blk.0.attn_q.weight"), pair_4x64("blk.0.attn_v.weight")],
            1.0,
        )]
    }

    fn out_types(plan: &PatchPlan<'_>) -> Vec<(String, GgmlType, bool)> {
        plan.tensors
            .iter()
            .map(|t| (plan.model.tensors()[t.model_index].name.clone(), t.out_type, t.patch.is_some()))
            .collect()
    }

    fn incompatible_of(result: Result<PatchPlan<'_>>) -> Incompatible {
        match result {
            Err(Error::Incompatible(i)) => i,
            Err(other) => panic!("expected Error::Incompatible, got {other:?}"),
            Ok(_) => panic!("expected a refusal, the plan was accepted"),
        }
    }

    #[test]
    fn only_the_targets_are_patched_and_keep_their_type_by_default() {
        let dir = scratch("plan-default");
        let m = small_model(&dir, "m.gguf", &[]);
        let adapters = qv_adapter();
        let plan = PatchPlan::new(&m, None, &adapters, PatchOptions::default()).expect("plan");
        assert_eq!(plan.patched_tensors(), ["blk.0.attn_q.weight", "blk.0.attn_v.weight"]);
        let expected = [
            ("token_embd.weight", GgmlType::F32, false),
            ("blk.0.attn_q.weight", GgmlType::Q8_0, true),
            ("blk.0.attn_v.weight", GgmlType::Q8_0, true),
            ("blk.0.attn_norm.weight", GgmlType::F32, false),
        ];
        assert_eq!(out_types(&plan), expected.map(|(n, t, p)| (n.to_string(), t, p)));
        assert!(plan.notes().is_empty());
        // No type option: general.file_type is left as the model has it (absent here).
        assert!(!plan.metadata().iter().any(|(k, _)| k == "general.file_type"));
    }

    #[test]
    fn the_first_matching_tensor_type_pattern_wins_then_out_type() {
        let dir = scratch("plan-types");
        let m = small_model(&dir, "m.gguf", &[]);
        let adapters = qv_adapter();
        let options = PatchOptions {
            out_type: Some(GgmlType::Q5_0),
            // Case-insensitive, found anywhere in the name; the first match decides.
            tensor_types: vec![("ATTN_V".into(), GgmlType::Q4_0), ("attn".into(), GgmlType::Q4_1)],
            ..PatchOptions::default()
        };
        let plan = PatchPlan::new(&m, None, &adapters, options).expect("plan");
        let types: Vec<GgmlType> = out_types(&plan).into_iter().map(|(_, t, _)| t).collect();
        // Untouched tensors keep their type whatever the patterns say.
        assert_eq!(types, [GgmlType::F32, GgmlType::Q4_1, GgmlType::Q4_0, GgmlType::F32]);

        let options = PatchOptions { out_type: Some(GgmlType::Q5_0), ..PatchOptions::default() };
        let plan = PatchPlan::new(&m, None, &adapters, options).expect("plan");
        let types: Vec<GgmlType> = out_types(&plan).into_iter().map(|(_, t, _)| t).collect();
        assert_eq!(types, [GgmlType::F32, GgmlType::Q5_0, GgmlType::Q5_0, GgmlType::F32]);
        // Of the 2-D tensors, two are q5_0 and one f32: llama.cpp's LLAMA_FTYPE_MOSTLY_Q5_0 is 8.
        let file_type = plan.metadata().iter().find(|(k, _)| k == "general.file_type").map(|(_, v)| v.clone());
        assert_eq!(file_type, Some(Value::U32(8)));
    }

    #[test]
    fn extra_metadata_replaces_values_and_extends_lists() {
        let dir = scratch("plan-metadata");
        let history = |items: &[&str]| {
            Value::Array(Array {
                elem_type: ValueType::String,
                items: items.iter().map(|s| Value::String(s.as_bytes().to_vec())).collect(),
            })
        };
        let m = small_model(&dir, "m.gguf", &[("ggml_lora.adapters", history(&["old.gguf"])), ("x.n", Value::U32(1))]);
        let adapters = qv_adapter();
        let options = PatchOptions {
            extra_metadata: vec![
                ("ggml_lora.adapters".into(), history(&["qv.gguf"])),
                ("x.n".into(), Value::U32(2)),
                ("x.new".into(), Value::Bool(true)),
            ],
            ..PatchOptions::default()
        };
        let plan = PatchPlan::new(&m, None, &adapters, options).expect("plan");
        let get = |key: &str| plan.metadata().iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        assert_eq!(get("ggml_lora.adapters"), Some(history(&["old.gguf", "qv.gguf"])));
        assert_eq!(get("x.n"), Some(Value::U32(2)));
        assert_eq!(get("x.new"), Some(Value::Bool(true)));
        assert_eq!(get("general.architecture"), Some(Value::String(b"llama".to_vec())));
    }

    #[test]
    fn notes_name_the_tensors_an_imatrix_lacks_and_a_lost_model_imatrix() {
        let dir = scratch("plan-notes");
        let m = small_model(&dir, "m.gguf", &[]);
        let adapters = qv_adapter();
        let imatrix = Imatrix::from_entries("im.gguf", [("blk.0.attn_q.weight".to_string(), vec![1.0; 64])].into());
        // q4_0 takes importance weights: attn_v has none.
        let options = PatchOptions {
            out_type: Some(GgmlType::Q4_0),
            imatrix: Some(std::sync::Arc::new(imatrix.clone())),
            ..PatchOptions::default()
        };
        let plan = PatchPlan::new(&m, None, &adapters, options).expect("plan");
        let expected =
            PatchNote::ImatrixMissingEntries { source: "im.gguf".into(), tensors: vec!["blk.0.attn_v.weight".into()] };
        assert_eq!(plan.notes(), std::slice::from_ref(&expected));
        assert_eq!(expected.kind(), "imatrix_missing_entries");
        // q8_0 ignores importance weights (as ggml does): nothing is missing.
        let options = PatchOptions { imatrix: Some(std::sync::Arc::new(imatrix)), ..PatchOptions::default() };
        assert!(PatchPlan::new(&m, None, &adapters, options).expect("plan").notes().is_empty());

        let with_imatrix = [("quantize.imatrix.file", Value::String(b"calib.dat".to_vec()))];
        let m = small_model(&dir, "mi.gguf", &with_imatrix);
        let plan = PatchPlan::new(&m, None, &adapters, PatchOptions::default()).expect("plan");
        let expected = PatchNote::ModelImatrixNotApplied { file: Some("calib.dat".into()), requantized: 2 };
        assert_eq!(plan.notes(), std::slice::from_ref(&expected));
        assert_eq!(expected.kind(), "model_imatrix_not_applied");
        // Written as f16, nothing is requantized: no note.
        let options = PatchOptions { out_type: Some(GgmlType::F16), ..PatchOptions::default() };
        assert!(PatchPlan::new(&m, None, &adapters, options).expect("plan").notes().is_empty());
    }

    #[test]
    fn inputs_that_do_not_belong_together_are_refused_with_their_facts() {
        let dir = scratch("plan-refusals");
        let m = small_model(&dir, "m.gguf", &[]);
        let model_file = m.path().display().to_string();

        let gpt2 = [adapter("gpt2.gguf", Some("gpt2"), vec![pair_4x64("blk.0.attn_q.weight")], 1.0)];
        let expected = Incompatible::Architecture {
            model_file: model_file.clone(),
            model: "llama".into(),
            other_file: "gpt2.gguf".into(),
            other: "gpt2".into(),
        };
        assert_eq!(incompatible_of(PatchPlan::new(&m, None, &gpt2, PatchOptions::default())), expected);

        let missing = [adapter("a.gguf", None, vec![pair_4x64("blk.9.attn_q.weight")], 1.0)];
        match incompatible_of(PatchPlan::new(&m, None, &missing, PatchOptions::default())) {
            Incompatible::MissingTensor { file, name, .. } => {
                assert_eq!((file.as_str(), name.as_str()), (model_file.as_str(), "blk.9.attn_q.weight"))
            }
            other => panic!("{other:?}"),
        }

        let wide =
            [adapter("a.gguf", None, vec![pair("blk.0.attn_q.weight", 4, 32, 1, vec![1.0; 4], vec![0.0; 32])], 1.0)];
        match incompatible_of(PatchPlan::new(&m, None, &wide, PatchOptions::default())) {
            Incompatible::Shape { name, expected, found, .. } => {
                assert_eq!((name.as_str(), expected, found), ("blk.0.attn_q.weight", vec![4, 32], vec![4, 64]))
            }
            other => panic!("{other:?}"),
        }

        let mut dora = pair_4x64("blk.0.attn_q.weight");
        dora.magnitude = Some(vec![1.0; 4]);
        let two = [
            adapter("dora.gguf", None, vec![dora], 1.0),
            adapter("plain.gguf", None, vec![pair_4x64("blk.0.attn_q.weight")], 1.0),
        ];
        let expected = Incompatible::DoraNotAlone {
            tensor: "blk.0.attn_q.weight".into(),
            adapters: "dora.gguf, plain.gguf".into(),
        };
        assert_eq!(incompatible_of(PatchPlan::new(&m, None, &two, PatchOptions::default())), expected);

        let adapters = qv_adapter();
        let refused = |options: PatchOptions| incompatible_of(PatchPlan::new(&m, None, &adapters, options));
        let inf_scale = [adapter("a.gguf", None, vec![pair_4x64("blk.0.attn_q.weight")], f32::INFINITY)];
        let expected = Incompatible::Scale { adapter: "a.gguf".into(), scale: f32::INFINITY };
        assert_eq!(incompatible_of(PatchPlan::new(&m, None, &inf_scale, PatchOptions::default())), expected);
        let expected = Incompatible::IntermediateType { ty: GgmlType::Q8_0 };
        assert_eq!(refused(PatchOptions { intermediate: Some(GgmlType::Q8_0), ..PatchOptions::default() }), expected);
        match refused(PatchOptions { tensor_types: vec![("(".into(), GgmlType::Q8_0)], ..PatchOptions::default() }) {
            Incompatible::TensorTypePattern { pattern, .. } => assert_eq!(pattern, "("),
            other => panic!("{other:?}"),
        }
        let expected = Incompatible::KeepShare { share: 1.5 };
        assert_eq!(refused(PatchOptions { keep_lora: Some(1.5), ..PatchOptions::default() }), expected);
        // 64 columns are not a whole q4_K super-block (256).
        let expected = Incompatible::RowLength {
            tensor: "blk.0.attn_q.weight".into(),
            row_len: 64,
            ty: GgmlType::Q4_K,
            block: 256,
        };
        assert_eq!(refused(PatchOptions { out_type: Some(GgmlType::Q4_K), ..PatchOptions::default() }), expected);
        let details = Error::Incompatible(expected).details();
        assert_eq!((details.kind, details.tensor.as_deref()), ("row_length", Some("blk.0.attn_q.weight")));
        match incompatible_of(PatchPlan::new(
            &m,
            None,
            &adapters,
            PatchOptions { out_type: Some(GgmlType::IQ4_NL), ..PatchOptions::default() },
        )) {
            Incompatible::CannotQuantize { types, tensors, .. } => {
                assert_eq!(
                    (types.as_str(), tensors.as_str()),
                    ("iq4_nl", "iq4_nl: blk.0.attn_q.weight, blk.0.attn_v.weight")
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_base_must_hold_every_patched_tensor_in_the_same_shape_and_a_readable_type() {
        let dir = scratch("plan-base");
        let m = small_model(&dir, "m.gguf", &[]);
        let adapters = qv_adapter();
        let q = |shape: &[u64], ty| TestTensor::zeros("blk.0.attn_q.weight", shape, ty);
        let v = |ty| TestTensor::zeros("blk.0.attn_v.weight", &[4, 64], ty);

        let base = model(&dir, "only-q.gguf", &[], &[q(&[4, 64], GgmlType::F16)]);
        match incompatible_of(PatchPlan::new(&m, Some(&base), &adapters, PatchOptions::default())) {
            Incompatible::MissingTensor { file, name, .. } => {
                assert_eq!((file, name.as_str()), (base.path().display().to_string(), "blk.0.attn_v.weight"))
            }
            other => panic!("{other:?}"),
        }
        let base = model(&dir, "wide.gguf", &[], &[q(&[4, 128], GgmlType::F16), v(GgmlType::F16)]);
        match incompatible_of(PatchPlan::new(&m, Some(&base), &adapters, PatchOptions::default())) {
            Incompatible::Shape { name, expected, found, .. } => {
                assert_eq!((name.as_str(), expected, found), ("blk.0.attn_q.weight", vec![4, 64], vec![4, 128]))
            }
            other => panic!("{other:?}"),
        }
        // q8_1 is a dot-product intermediate nothing reads.
        let base = model(&dir, "q8_1.gguf", &[], &[q(&[4, 64], GgmlType::Q8_1), v(GgmlType::F16)]);
        let expected = Incompatible::CannotDequantize {
            file: base.path().display().to_string(),
            name: "blk.0.attn_q.weight".into(),
            ty: GgmlType::Q8_1,
        };
        assert_eq!(incompatible_of(PatchPlan::new(&m, Some(&base), &adapters, PatchOptions::default())), expected);
        let base = model(&dir, "f16.gguf", &[], &[q(&[4, 64], GgmlType::F16), v(GgmlType::F16)]);
        let plan = PatchPlan::new(&m, Some(&base), &adapters, PatchOptions::default()).expect("plan");
        let sources: Vec<Option<usize>> =
            plan.tensors.iter().map(|t| t.patch.as_ref().and_then(|p| p.base_index)).collect();
        assert_eq!(sources, [None, Some(0), Some(1), None]);

        // Without a base, the model's own values are the source and must be readable.
        let unreadable = model(&dir, "m-q8_1.gguf", &[], &[q(&[4, 64], GgmlType::Q8_1)]);
        let one = [adapter("a.gguf", None, vec![pair_4x64("blk.0.attn_q.weight")], 1.0)];
        let expected = Incompatible::CannotDequantize {
            file: unreadable.path().display().to_string(),
            name: "blk.0.attn_q.weight".into(),
            ty: GgmlType::Q8_1,
        };
        assert_eq!(incompatible_of(PatchPlan::new(&unreadable, None, &one, PatchOptions::default())), expected);
        let message = Error::Incompatible(expected).to_string();
        assert!(!message.contains("--") && !message.contains("base="), "no flag or keyword in the core: {message}");
    }

    #[test]
    fn an_imatrix_for_another_model_or_of_the_wrong_width_is_refused() {
        let dir = scratch("plan-imatrix");
        let m = small_model(&dir, "m.gguf", &[]);
        let adapters = qv_adapter();
        let with = |entries: Vec<(&str, usize)>| PatchOptions {
            imatrix: Some(std::sync::Arc::new(Imatrix::from_entries(
                "im.dat",
                entries.into_iter().map(|(n, len)| (n.to_string(), vec![1.0; len])).collect(),
            ))),
            ..PatchOptions::default()
        };
        let expected = Incompatible::ImatrixForAnotherModel {
            source_name: "im.dat".into(),
            entries: 1,
            model: m.path().display().to_string(),
        };
        assert_eq!(incompatible_of(PatchPlan::new(&m, None, &adapters, with(vec![("other.weight", 64)]))), expected);
        let expected = Incompatible::ImatrixEntryLength {
            source_name: "im.dat".into(),
            tensor: "blk.0.attn_v.weight".into(),
            found: 32,
            expected: 64,
        };
        let found = incompatible_of(PatchPlan::new(&m, None, &adapters, with(vec![("blk.0.attn_v.weight", 32)])));
        assert_eq!(found, expected);
        // The facts Python's exception carries as attributes.
        let details = Error::Incompatible(expected).details();
        assert_eq!((details.kind, details.tensor.as_deref()), ("imatrix_entry_length", Some("blk.0.attn_v.weight")));
        assert_eq!((details.expected.as_deref(), details.found.as_deref()), (Some("64"), Some("32")));
    }

    #[test]
    fn the_output_may_not_be_an_input() {
        let dir = scratch("plan-output");
        let m = small_model(&dir, "m.gguf", &[]);
        let adapters = qv_adapter();
        let plan = PatchPlan::new(&m, None, &adapters, PatchOptions::default()).expect("plan");
        let expected = Incompatible::OutputIsInput { path: m.path().display().to_string() };
        match plan.run(m.path(), &mut |_| Ok(())) {
            Err(Error::Incompatible(i)) => assert_eq!(i, expected),
            other => panic!("{:?}", other.map(|r| r.out)),
        }
    }

    #[test]
    fn the_keep_lora_rule_climbs_each_family() {
        use GgmlType::*;
        let chains = [vec![Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0, F16], vec![Q4_0, Q5_0, Q8_0], vec![Q4_1, Q5_1, Q8_0]];
        for chain in chains {
            for step in chain.windows(2) {
                assert_eq!(larger_type(step[0]), Some(step[1]));
            }
        }
        for top in [F16, BF16, F32, IQ4_NL] {
            assert_eq!(larger_type(top), None);
        }
        // 64 columns: no k-quant fits, so q2_K's next writable type is q8_0 (via q6_K's successor).
        assert_eq!(next_writable_type(Q2_K, 64), Some(Q8_0));
        assert_eq!(next_writable_type(Q2_K, 256), Some(Q3_K));
    }

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
