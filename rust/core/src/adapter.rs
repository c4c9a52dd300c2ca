//! The LoRA adapter model: pairs of low-rank factors, each patching one model tensor.
//!
//! Whatever the source (llama.cpp's GGUF adapter, the legacy ggla file, or arrays from the PEFT converter),
//! every pair is normalised to `delta = left @ right` in numpy order, `left` (rows x rank) and `right`
//! (rank x cols), where the model tensor is rows x cols (numpy shape; cols = ggml ne[0]). The scale is
//! llama.cpp's `get_scale`: `alpha ? user_scale * alpha / rank : user_scale`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Malformed, Result};
use crate::ggla::{gguf_target_name, GglaFile};
use crate::gguf::{GgufFile, TensorInfo, Value};
use crate::peft::PeftFactors;
use crate::peft_weights::PeftWeights;
use crate::quant;
use crate::types::GgmlType;

/// Where a pair's factors are.
#[derive(Clone, Debug)]
pub enum Factors {
    /// In memory, f32: `left` rows x rank and `right` rank x cols, row-major.
    Loaded {
        /// rows x rank.
        left: Vec<f32>,
        /// rank x cols.
        right: Vec<f32>,
    },
    /// Tensors `a` (lora_a) and `b` (lora_b) of an open GGUF adapter, converted to f32 only while their target
    /// is patched: memory stays bounded by the largest pair, however large the adapter.
    Mapped {
        /// The adapter file.
        file: Arc<GgufFile>,
        /// Index of the lora_a tensor.
        a: usize,
        /// Index of the lora_b tensor.
        b: usize,
    },
    /// Factors of a PEFT adapter's weights file (mapped safetensors, or a `.bin`'s tensors), read, transformed
    /// and scaled only while their target is patched (see [`crate::peft`]).
    Peft {
        /// The weights file.
        weights: Arc<PeftWeights>,
        /// Which tensors, and how they become this pair's factors.
        factors: PeftFactors,
    },
}

/// `(left, right)` factors in f32, borrowed or freshly read.
pub type FactorPair<'a> = (Cow<'a, [f32]>, Cow<'a, [f32]>);

/// One low-rank update of one model tensor.
#[derive(Clone, Debug)]
pub struct LoraPair {
    /// Name of the model tensor it patches, e.g. `blk.0.attn_q.weight`.
    pub target: String,
    /// Rank r used in the scale `alpha / r` (llama.cpp: `lora_b.ne[0]`; ggla: the header's r).
    pub scale_rank: usize,
    /// Rows of the patched tensor (numpy shape[0]; ggml ne[1]).
    pub rows: usize,
    /// Columns of the patched tensor (numpy shape[1]; ggml ne[0]).
    pub cols: usize,
    /// Inner dimension of the product.
    pub rank: usize,
    /// The factors.
    pub factors: Factors,
    /// DoRA magnitude vector (one value per row), when the adapter is DoRA: the merge is then
    /// `W' = m / ‖W + ΔW‖_row · (W + ΔW)` (PEFT's `DoraLinearVariant.merge_safe`), not `W + ΔW`.
    pub magnitude: Option<Vec<f32>>,
}

impl LoraPair {
    /// The factors in f32: `(left, right)`, rows x rank and rank x cols. Borrowed when already in memory;
    /// read from the adapter's map (whose pages are then released) otherwise.
    pub fn load(&self) -> Result<FactorPair<'_>> {
        match &self.factors {
            Factors::Loaded { left, right } => Ok((Cow::Borrowed(left), Cow::Borrowed(right))),
            Factors::Mapped { file, a, b } => {
                let (ta, tb) = (&file.tensors()[*a], &file.tensors()[*b]);
                let a_values = to_f32(ta.ty, file.tensor_data(*a), &ta.dims, &ta.name)?;
                let b_values = to_f32(tb.ty, file.tensor_data(*b), &tb.dims, &tb.name)?;
                for i in [*a, *b] {
                    let range = file.header().tensor_range(i);
                    file.release_pages(range.start as usize..range.end as usize);
                }
                let (left, right) = gguf_factors(&self.target, tb, a_values, b_values);
                Ok((Cow::Owned(left), Cow::Owned(right)))
            }
            Factors::Peft { weights, factors } => {
                let (left, right) = factors.load(weights, self.rows, self.cols, self.rank)?;
                Ok((Cow::Owned(left), Cow::Owned(right)))
            }
        }
    }

    /// The pair as llama.cpp's GGUF adapter stores it: `(lora_a, lora_a shape, lora_b, lora_b shape)`, values
    /// f32 row-major, shapes in numpy order (see [`gguf_shape`] for the layout; the inverse of reading one).
    pub fn gguf_layout(&self) -> Result<GgufPair> {
        let (left, right) = self.load()?;
        let (rows, cols, rank) = (self.rows, self.cols, self.rank);
        Ok(if is_token_embd(&self.target) {
            // lora_a numpy (n_vocab, r) = left; lora_b numpy (n_embd, r) = rightᵀ.
            (left.into_owned(), [rows, rank], transpose(&right, rank, cols), [cols, rank])
        } else {
            // lora_a numpy (r, n_in) = right; lora_b numpy (n_out, r) = left.
            (right.into_owned(), [rank, cols], left.into_owned(), [rows, rank])
        })
    }
}

/// `(lora_a, its numpy shape, lora_b, its numpy shape)` of a pair in llama.cpp's GGUF adapter layout.
pub type GgufPair = (Vec<f32>, [usize; 2], Vec<f32>, [usize; 2]);

/// A loaded LoRA adapter.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// Where it came from (file path or a description), for messages and the output's metadata.
    pub source: String,
    /// The files it reads (which no output may replace).
    pub inputs: Vec<PathBuf>,
    /// `general.architecture` of the adapter, when it says.
    pub architecture: Option<String>,
    /// LoRA alpha; 0 means absent (the user scale is then applied alone).
    pub alpha: f32,
    /// The pairs, in file order.
    pub pairs: Vec<LoraPair>,
    /// Tensors present in the file but ignored, as llama.cpp ignores them (1-D norm vectors).
    pub skipped: Vec<String>,
}

impl LoraAdapter {
    /// llama.cpp's scale for `pair` with the user's `scale`: `alpha ? scale * alpha / rank : scale`, in f32.
    pub fn pair_scale(&self, pair: &LoraPair, user_scale: f32) -> f32 {
        crate::scale::llama_scale(self.alpha, pair.scale_rank, user_scale)
    }

    /// Loads an adapter file, GGUF (llama.cpp's LoRA format) or legacy ggla, by its magic.
    pub fn open(path: impl AsRef<Path>) -> Result<LoraAdapter> {
        let path = path.as_ref();
        let mut magic = [0u8; 4];
        {
            use std::io::Read;
            // A FIFO or device is refused here, without blocking (see `paths`).
            let mut f = crate::paths::open_input(path)?;
            let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
            if n < 4 {
                return Err(Error::Malformed {
                    format: "adapter",
                    offset: 0,
                    kind: Malformed::Truncated { what: "magic".into(), needed: 4, available: n as u64 },
                }
                .in_file(path));
            }
        }
        if crate::ggla::is_ggla(&magic) {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let mut adapter = from_ggla(&bytes, &path.display().to_string()).map_err(|e| e.in_file(path))?;
            adapter.inputs.push(path.to_path_buf());
            Ok(adapter)
        } else {
            let file = Arc::new(GgufFile::open(path)?);
            from_gguf(file).map_err(|e| e.in_file(path))
        }
    }
}

fn adapter_error(kind: Malformed) -> Error {
    Error::Malformed { format: "LoRA adapter", offset: 0, kind }
}

fn to_f32(ty: GgmlType, data: &[u8], dims: &[u64], name: &str) -> Result<Vec<f32>> {
    let n: u64 = dims.iter().product();
    let mut out = vec![0f32; n as usize];
    quant::dequantize_rows(ty, data, dims[0] as usize, &mut out).map_err(|e| match e {
        Error::UnsupportedType { ty, .. } => adapter_error(Malformed::Other(format!(
            "tensor {name:?} has type {ty}; adapter tensors must be f32, f16, bf16 or q8_0"
        ))),
        other => other,
    })?;
    Ok(out)
}

/// The two halves of each pair, by target name, in first-seen order.
#[derive(Default)]
struct Halves(Vec<(String, Option<usize>, Option<usize>)>);

impl Halves {
    /// Records tensor `index` as the A (`is_a`) or B half of `target`.
    fn add(&mut self, target: &str, is_a: bool, index: usize) {
        let slot = match self.0.iter().position(|(n, _, _)| n == target) {
            Some(p) => p,
            None => {
                self.0.push((target.to_owned(), None, None));
                self.0.len() - 1
            }
        };
        if is_a {
            self.0[slot].1 = Some(index);
        } else {
            self.0[slot].2 = Some(index);
        }
    }

    /// `(target, a index, b index)` per pair; a half without its partner is an error naming both suffixes.
    fn complete(self, a_suffix: &str, b_suffix: &str) -> Result<Vec<(String, usize, usize)>> {
        self.0
            .into_iter()
            .map(|(target, a, b)| match (a, b) {
                (Some(a), Some(b)) => Ok((target, a, b)),
                (Some(_), None) => Err(adapter_error(Malformed::Other(format!(
                    "{target}{a_suffix} has no matching {target}{b_suffix}"
                )))),
                (None, _) => Err(adapter_error(Malformed::Other(format!(
                    "{target}{b_suffix} has no matching {target}{a_suffix}"
                )))),
            })
            .collect()
    }
}

/// Transposes a rows x cols row-major matrix.
pub fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = m[r * cols + c];
        }
    }
    out
}

/// Loads llama.cpp's GGUF LoRA adapter (`general.type = adapter`, `adapter.type = lora`).
pub fn from_gguf(file: Arc<GgufFile>) -> Result<LoraAdapter> {
    let header = file.header();
    let text = |key: &str| header.get(key).and_then(Value::as_str).map(str::to_owned);
    match text("general.type").as_deref() {
        Some("adapter") => {}
        other => {
            return Err(adapter_error(Malformed::Other(format!(
                "general.type is {other:?}, expected \"adapter\" (is this a model rather than a LoRA adapter?)"
            ))))
        }
    }
    match text("adapter.type").as_deref() {
        Some("lora") => {}
        other => return Err(adapter_error(Malformed::Other(format!("adapter.type is {other:?}, expected \"lora\"")))),
    }
    let alpha = match header.get("adapter.lora.alpha") {
        None => 0.0,
        Some(Value::F32(a)) => *a,
        Some(other) => {
            return Err(adapter_error(Malformed::Other(format!(
                "adapter.lora.alpha has type {}, expected FLOAT32",
                other.value_type()
            ))))
        }
    };
    check_alpha(alpha)?;
    let infos: Vec<&TensorInfo> = file.tensors().iter().collect();
    let (halves, skipped) = pair_names(&infos)?;
    require_pairs(halves.len(), infos.len())?;
    let mut pairs = Vec::with_capacity(halves.len());
    for (target, a, b, m) in halves {
        let (ta, tb) = (infos[a], infos[b]);
        for t in [ta, tb] {
            check_factor_type(t)?;
        }
        let shape = gguf_shape(&target, ta, tb)?;
        let magnitude = m.map(|m| magnitude(&target, infos[m], file.tensor_data(m), shape.rows)).transpose()?;
        pairs.push(shape.pair(target, Factors::Mapped { file: Arc::clone(&file), a, b }, magnitude));
    }
    Ok(LoraAdapter {
        source: file.path().display().to_string(),
        inputs: vec![file.path().to_path_buf()],
        architecture: text("general.architecture"),
        alpha,
        pairs,
        skipped,
    })
}

/// Builds an adapter from tensors in llama.cpp's adapter layout and naming (`<target>.lora_a`,
/// `<target>.lora_b`, 1-D `*_norm` tensors skipped), whatever file or converter they come from.
pub fn from_tensors(
    source: String,
    architecture: Option<String>,
    alpha: f32,
    tensors: &[(&TensorInfo, &[u8])],
) -> Result<LoraAdapter> {
    check_alpha(alpha)?;
    let infos: Vec<&TensorInfo> = tensors.iter().map(|(t, _)| *t).collect();
    let (halves, skipped) = pair_names(&infos)?;
    require_pairs(halves.len(), infos.len())?;
    let mut pairs = Vec::with_capacity(halves.len());
    for (target, a, b, m) in halves {
        let ((ta, da), (tb, db)) = (tensors[a], tensors[b]);
        let shape = gguf_shape(&target, ta, tb)?;
        let a_values = to_f32(ta.ty, da, &ta.dims, &ta.name)?;
        let b_values = to_f32(tb.ty, db, &tb.dims, &tb.name)?;
        let (left, right) = gguf_factors(&target, tb, a_values, b_values);
        let magnitude = m.map(|m| magnitude(&target, tensors[m].0, tensors[m].1, shape.rows)).transpose()?;
        pairs.push(shape.pair(target, Factors::Loaded { left, right }, magnitude));
    }
    Ok(LoraAdapter { source, inputs: Vec::new(), architecture, alpha, pairs, skipped })
}

/// An adapter must apply something: no pairs at all (no tensors, or only skipped 1-D norms) is an error.
fn require_pairs(pairs: usize, tensors: usize) -> Result<()> {
    if pairs > 0 {
        return Ok(());
    }
    let detail = match tensors {
        0 => "it has no tensors at all".to_owned(),
        n => format!("its {n} tensor(s) are all 1-D norm vectors, which are ignored"),
    };
    Err(adapter_error(Malformed::NoTensors { detail }))
}

/// `(target, lora_a index, lora_b index, DoRA magnitude index)`.
type PairIndices = (String, usize, usize, Option<usize>);

/// Pairs llama.cpp adapter tensors by name: `(target, lora_a index, lora_b index)` per pair, and the 1-D
/// `*_norm` tensors llama.cpp skips. Any other name is an error.
fn pair_names(infos: &[&TensorInfo]) -> Result<(Vec<PairIndices>, Vec<String>)> {
    let mut halves = Halves::default();
    let mut skipped = Vec::new();
    let mut magnitudes: Vec<(String, usize)> = Vec::new();
    for (i, t) in infos.iter().enumerate() {
        let (base, is_a) = if let Some(b) = t.name.strip_suffix(".lora_a") {
            (b, true)
        } else if let Some(b) = t.name.strip_suffix(".lora_b") {
            (b, false)
        } else if let Some(b) = t.name.strip_suffix(".dora_m") {
            magnitudes.push((b.to_owned(), i));
            continue;
        } else if t.dims.len() == 1 && t.name.contains("_norm") {
            skipped.push(t.name.clone());
            continue;
        } else {
            return Err(adapter_error(Malformed::Other(format!(
                "tensor {:?} has an unexpected suffix (expected .lora_a, .lora_b or .dora_m)",
                t.name
            ))));
        };
        halves.add(base, is_a, i);
    }
    let mut pairs: Vec<PairIndices> =
        halves.complete(".lora_a", ".lora_b")?.into_iter().map(|(t, a, b)| (t, a, b, None)).collect();
    for (target, i) in magnitudes {
        let pair = pairs.iter_mut().find(|p| p.0 == target).ok_or_else(|| {
            adapter_error(Malformed::Other(format!("{target}.dora_m has no matching {target}.lora_a/.lora_b")))
        })?;
        pair.3 = Some(i);
    }
    Ok((pairs, skipped))
}

/// Checks a DoRA magnitude tensor against its pair (1-D, one value per row, finite) and reads it.
fn magnitude(target: &str, t: &TensorInfo, data: &[u8], rows: usize) -> Result<Vec<f32>> {
    if is_token_embd(target) {
        return Err(adapter_error(Malformed::Other(format!("{target}.dora_m: DoRA on token_embd is not supported"))));
    }
    if t.dims.len() != 1 || t.dims[0] as usize != rows {
        return Err(adapter_error(Malformed::Other(format!(
            "{target}.dora_m has dims {:?}, expected [{rows}] (one magnitude per row)",
            t.dims
        ))));
    }
    check_factor_type(t)?;
    let values = to_f32(t.ty, data, &t.dims, &t.name)?;
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(adapter_error(Malformed::Other(format!("{target}.dora_m holds {bad}"))));
    }
    Ok(values)
}

fn check_alpha(alpha: f32) -> Result<()> {
    if alpha.is_finite() {
        Ok(())
    } else {
        Err(adapter_error(Malformed::Other(format!("adapter.lora.alpha is {alpha}"))))
    }
}

fn check_factor_type(t: &TensorInfo) -> Result<()> {
    if quant::can_dequantize(t.ty) {
        Ok(())
    } else {
        Err(adapter_error(Malformed::Other(format!(
            "tensor {:?} has type {}; adapter tensors must be f32, f16, bf16 or q8_0",
            t.name, t.ty
        ))))
    }
}

fn two_dims(t: &TensorInfo) -> Result<(usize, usize)> {
    match t.dims[..] {
        [d0, d1] => Ok((d0 as usize, d1 as usize)),
        [d0, d1, 1] | [d0, d1, 1, 1] => Ok((d0 as usize, d1 as usize)),
        _ => Err(adapter_error(Malformed::Other(format!("tensor {:?} has dims {:?}, expected 2-D", t.name, t.dims)))),
    }
}

/// The shape of a pair, known before its factors are read.
struct PairShape {
    scale_rank: usize,
    rows: usize,
    cols: usize,
    rank: usize,
}

impl PairShape {
    fn pair(self, target: String, factors: Factors, magnitude: Option<Vec<f32>>) -> LoraPair {
        LoraPair {
            target,
            scale_rank: self.scale_rank,
            rows: self.rows,
            cols: self.cols,
            rank: self.rank,
            factors,
            magnitude,
        }
    }
}

fn is_token_embd(target: &str) -> bool {
    target.starts_with("token_embd")
}

/// Checks llama.cpp's layout and gives the pair's shape: linear `lora_a` ne [n_in, r], `lora_b` ne [r, n_out];
/// token_embd (flipped, PR #11131) `lora_a` ne [r, n_vocab], `lora_b` ne [r, n_embd]. Rank = `lora_b.ne[0]`.
fn gguf_shape(target: &str, ta: &TensorInfo, tb: &TensorInfo) -> Result<PairShape> {
    let (a0, a1) = two_dims(ta)?;
    let (b0, b1) = two_dims(tb)?;
    let (rank_a, shape) = if is_token_embd(target) {
        // delta (n_vocab x n_embd) = A_np (n_vocab x r) @ B_np^T (r x n_embd)
        (a0, PairShape { scale_rank: b0, rows: a1, cols: b1, rank: b0 })
    } else {
        // delta (n_out x n_in) = B_np (n_out x r) @ A_np (r x n_in)
        (a1, PairShape { scale_rank: b0, rows: b1, cols: a0, rank: b0 })
    };
    if rank_a != b0 {
        return Err(adapter_error(Malformed::Other(format!(
            "{target}: rank mismatch, lora_a dims {:?} give rank {rank_a}, lora_b dims {:?} give rank {b0}",
            ta.dims, tb.dims
        ))));
    }
    Ok(shape)
}

/// `(left, right)` from the f32 values of `lora_a` and `lora_b` in llama.cpp's layout (see [`gguf_shape`]).
fn gguf_factors(target: &str, tb: &TensorInfo, a: Vec<f32>, b: Vec<f32>) -> (Vec<f32>, Vec<f32>) {
    if is_token_embd(target) {
        let (rank, n_embd) = (tb.dims[0] as usize, tb.dims[1] as usize);
        (a, transpose(&b, n_embd, rank))
    } else {
        (b, a)
    }
}

/// Loads a legacy ggla adapter from its bytes. Pairs are matched by the `.loraA` / `.loraB` suffixes and
/// named by their GGUF targets. The product is applied as llama.cpp applied it (no q/k row permutation:
/// the historical converter never permuted lora_B, docs/FORMATS.md §3).
///
/// The format has no tensor count, so a file cut at a tensor boundary parses. What is checked instead: the file
/// has pairs at all, every `.loraA` has its `.loraB` (a cut between the halves), every pair's rank is the
/// header's r (which the scale uses), and every block (`blk.N.`) carries the same set of tensors as the others
/// (the converter wrote the same target modules for every layer, block by block: a cut inside a block leaves
/// that block short). A cut exactly between two blocks, or between two pairs of the only block, cannot be told
/// from an adapter on fewer layers or modules.
pub fn from_ggla(bytes: &[u8], source: &str) -> Result<LoraAdapter> {
    let file = GglaFile::parse(bytes)?;
    if file.tensors.is_empty() {
        return Err(adapter_error(Malformed::NoTensors {
            detail: "the file ends after its 16-byte header; it may be truncated".into(),
        }));
    }
    let mut halves = Halves::default();
    let mut skipped = Vec::new();
    for (i, t) in file.tensors.iter().enumerate() {
        let (base, is_a) = match (t.name.strip_suffix(".loraA"), t.name.strip_suffix(".loraB")) {
            (Some(b), _) => (b, true),
            (_, Some(b)) => (b, false),
            _ => {
                return Err(adapter_error(Malformed::Other(format!(
                    "ggla tensor {:?} has an unexpected suffix (expected .loraA or .loraB)",
                    t.name
                ))))
            }
        };
        if t.dims.len() == 1 {
            skipped.push(t.name.clone());
            continue;
        }
        let target = gguf_target_name(base).ok_or_else(|| {
            adapter_error(Malformed::Other(format!("ggla tensor {:?}: unknown tensor name {base:?}", t.name)))
        })?;
        halves.add(&target, is_a, i);
    }
    let halves = halves.complete(".loraA", ".loraB")?;
    require_pairs(halves.len(), file.tensors.len())?;
    check_blocks_alike(halves.iter().map(|(target, _, _)| target.as_str()))?;
    let mut pairs = Vec::with_capacity(halves.len());
    for (target, a, b) in halves {
        let (ta, tb) = (&file.tensors[a], &file.tensors[b]);
        // loraA ne [r, n_in] (numpy n_in x r), loraB ne [r, n_out] (numpy n_out x r);
        // llama.cpp: BA = mul_mat(loraA, loraB) → ne [n_in, n_out] = B_np @ A_np^T.
        let (ra, n_in) = (ta.dims[0] as usize, ta.dims[1] as usize);
        let (rb, n_out) = (tb.dims[0] as usize, tb.dims[1] as usize);
        if ra != rb {
            return Err(adapter_error(Malformed::Other(format!(
                "{target}: rank mismatch, loraA dims {:?}, loraB dims {:?}",
                ta.dims, tb.dims
            ))));
        }
        if ra as u64 != file.rank as u64 {
            return Err(adapter_error(Malformed::RankMismatch {
                tensor: ta.name.clone(),
                header: file.rank.into(),
                found: ra as u64,
            }));
        }
        let a_data = to_f32(ta.ty, &bytes[ta.data.clone()], &ta.dims, &ta.name)?;
        let b_data = to_f32(tb.ty, &bytes[tb.data.clone()], &tb.dims, &tb.name)?;
        pairs.push(LoraPair {
            target,
            scale_rank: file.rank as usize,
            rows: n_out,
            cols: n_in,
            rank: ra,
            factors: Factors::Loaded { left: b_data, right: transpose(&a_data, n_in, ra) },
            magnitude: None,
        });
    }
    Ok(LoraAdapter {
        source: source.to_owned(),
        inputs: Vec::new(),
        architecture: None,
        alpha: file.alpha as f32,
        pairs,
        skipped,
    })
}

/// Every block (`blk.N.<part>`) among `targets` must hold the same parts: a ggla file cut between two pairs of a
/// block leaves that block short of the others.
fn check_blocks_alike<'a>(targets: impl Iterator<Item = &'a str>) -> Result<()> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut blocks: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    for target in targets {
        let Some(rest) = target.strip_prefix("blk.") else { continue };
        let Some((n, part)) = rest.split_once('.') else { continue };
        let Ok(n) = n.parse::<u64>() else { continue };
        blocks.entry(n).or_default().insert(part);
    }
    let all: BTreeSet<&str> = blocks.values().flatten().copied().collect();
    for (n, parts) in &blocks {
        if let Some(missing) = all.iter().find(|p| !parts.contains(*p)) {
            let (with, _) = blocks.iter().find(|(_, ps)| ps.contains(missing)).expect("a part comes from a block");
            return Err(adapter_error(Malformed::Other(format!(
                "block {n} has no LoRA pair for blk.{n}.{missing} though block {with} has one: the file is \
                 probably truncated (ggla files hold the same tensors for every block)"
            ))));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_follows_llama_cpp() {
        let pair = LoraPair {
            target: "t".into(),
            scale_rank: 8,
            rows: 1,
            cols: 1,
            rank: 8,
            factors: Factors::Loaded { left: vec![], right: vec![] },
            magnitude: None,
        };
        let mut adapter = LoraAdapter {
            source: "x".into(),
            inputs: vec![],
            architecture: None,
            alpha: 16.0,
            pairs: vec![],
            skipped: vec![],
        };
        assert_eq!(adapter.pair_scale(&pair, 1.0), 2.0);
        assert_eq!(adapter.pair_scale(&pair, 0.5), 1.0);
        adapter.alpha = 0.0;
        assert_eq!(adapter.pair_scale(&pair, 0.5), 0.5);
    }

    fn f32_bytes(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect()
    }

    /// A ggla adapter of rank `rank` on `blocks` blocks x (wq, wv), each 4x4, as the converter wrote it.
    fn ggla_blocks(header_rank: i32, rank: i32, blocks: usize) -> Vec<u8> {
        let names: Vec<String> = (0..blocks)
            .flat_map(|b| {
                ["wq", "wv"].into_iter().flat_map(move |m| {
                    ["loraA", "loraB"].into_iter().map(move |h| format!("layers.{b}.attention.{m}.weight.{h}"))
                })
            })
            .collect();
        let n = 4 * rank as usize;
        let dims = [rank, 4];
        let tensors: Vec<(&str, &[i32], i32, Vec<u8>)> =
            names.iter().map(|name| (name.as_str(), &dims[..], 0, f32_bytes(n))).collect();
        crate::ggla::tests::ggla_bytes(header_rank, 16, &tensors)
    }

    fn malformed_kind(err: Error) -> Malformed {
        match err {
            Error::Malformed { kind, .. } => kind,
            other => panic!("expected a Malformed error, got {other:?}"),
        }
    }

    #[test]
    fn ggla_cut_at_every_tensor_boundary_is_refused() {
        let whole = ggla_blocks(2, 2, 3);
        let adapter = from_ggla(&whole, "mem").unwrap();
        assert_eq!(adapter.pairs.len(), 6);
        let file = GglaFile::parse(&whole).unwrap();
        // Every tensor boundary must be refused except those the file alone cannot tell from a smaller adapter:
        // between two blocks, at the end, and after block 0's first pair (no whole block to compare with).
        let block_ends = [file.tensors[1].data.end, file.tensors[3].data.end, file.tensors[7].data.end, whole.len()];
        let mut boundaries = vec![16usize];
        boundaries.extend(file.tensors.iter().map(|t| t.data.end));
        for cut in boundaries {
            let result = from_ggla(&whole[..cut], "mem");
            if block_ends.contains(&cut) {
                assert!(result.is_ok(), "cut at block boundary {cut}");
                continue;
            }
            let message = result.unwrap_err().to_string();
            assert!(
                message.contains("no LoRA tensor pairs")
                    || message.contains("has no matching")
                    || message.contains("probably truncated"),
                "cut at {cut}: {message}"
            );
        }
        let header_only = malformed_kind(from_ggla(&whole[..16], "mem").unwrap_err());
        assert!(matches!(header_only, Malformed::NoTensors { .. }), "{header_only}");
    }

    #[test]
    fn ggla_header_rank_must_equal_every_pair_rank() {
        let kind = malformed_kind(from_ggla(&ggla_blocks(i32::MAX, 2, 1), "mem").unwrap_err());
        assert_eq!(
            kind,
            Malformed::RankMismatch {
                tensor: "layers.0.attention.wq.weight.loraA".into(),
                header: i32::MAX as i64,
                found: 2
            }
        );
        assert!(kind.to_string().contains("r = 2147483647"), "{kind}");
        assert!(from_ggla(&ggla_blocks(1, 2, 1), "mem").is_err());
        assert!(from_ggla(&ggla_blocks(2, 2, 1), "mem").is_ok());
    }

    #[test]
    fn adapter_without_pairs_is_refused() {
        let kind = malformed_kind(from_tensors("t".into(), None, 1.0, &[]).unwrap_err());
        assert!(matches!(kind, Malformed::NoTensors { .. }), "{kind}");
        let norm = TensorInfo {
            name: "blk.0.attn_norm.weight".into(),
            dims: vec![4],
            ty: GgmlType::F32,
            relative_offset: 0,
            nbytes: 16,
        };
        let data = f32_bytes(4);
        let kind = malformed_kind(from_tensors("t".into(), None, 1.0, &[(&norm, &data)]).unwrap_err());
        assert!(kind.to_string().contains("1-D norm"), "{kind}");
    }

    #[test]
    fn ggla_product_matches_llama_cpp_layout() {
        // rank 1: loraA ne [1, 2] holds A^T = [1, 2]; loraB ne [1, 3] holds B = [1, 10, 100].
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let bytes = crate::ggla::tests::ggla_bytes(
            1,
            2,
            &[
                ("layers.0.attention.wv.weight.loraA", &[1, 2], 0, f32s(&[1.0, 2.0])),
                ("layers.0.attention.wv.weight.loraB", &[1, 3], 0, f32s(&[1.0, 10.0, 100.0])),
            ],
        );
        let adapter = from_ggla(&bytes, "mem").unwrap();
        let p = &adapter.pairs[0];
        assert_eq!(p.target, "blk.0.attn_v.weight");
        assert_eq!((p.rows, p.cols, p.rank), (3, 2, 1));
        let (left, right) = p.load().unwrap();
        assert_eq!(&*left, &[1.0, 10.0, 100.0]);
        assert_eq!(&*right, &[1.0, 2.0]);
        assert_eq!(adapter.pair_scale(p, 1.0), 2.0);
    }
}
