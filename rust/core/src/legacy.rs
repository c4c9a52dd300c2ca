//! Legacy (pre-GGUF) llama model files: unversioned `ggml`, `ggmf` v1 and `ggjt` v1-v3, read from untrusted
//! bytes and presented as the GGUF model llama.cpp's `convert_llama_ggml_to_gguf.py` makes of them.
//!
//! Layout (docs/FORMATS.md §4; llama.cpp `llama_file_loader` @2d5db4837): a u32 magic, a u32 version
//! (not in `ggml`), seven u32 hyperparameters (n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype), the
//! vocabulary (n_vocab × {u32 length, bytes, f32 score}; `ggml` has no scores), then tensors until the end of
//! the file, each {u32 n_dims, u32 name length, u32 ggml type, u32 ne[n_dims], name, data}, the data padded to
//! a 32-byte file offset in `ggjt`. Every count and length is checked against the bytes left before anything
//! is allocated, as the GGUF parser does.
//!
//! Block layouts: `ggjt` v3 stores every type as GGUF does. `ggjt` v2 (#1405) is the same except q4_0, q4_1
//! and q8_0 (f32 scales until v3, #1508). Before v2 every quantized layout differed (nibble order), so only
//! f32 and f16 tensors are read; the others are refused naming the version, the type and what to do.

use std::collections::HashSet;

use crate::error::{Error, Malformed, Result};
use crate::gguf::{tensor_nbytes, Array, TensorInfo, Value, ValueType, MAX_DIMS, MAX_METADATA_MEMORY, MAX_NAME_LENGTH};
use crate::types::GgmlType;

/// `ggml` (unversioned, no vocabulary scores), as a little-endian u32.
pub const MAGIC_GGML: u32 = 0x6767_6d6c;
/// `ggmf` (versioned, scores), as a little-endian u32.
pub const MAGIC_GGMF: u32 = 0x6767_6d66;
/// `ggjt` (versioned, scores, 32-byte aligned tensor data), as a little-endian u32.
pub const MAGIC_GGJT: u32 = 0x6767_6a74;
/// Longest vocabulary item or tensor name accepted (the converter script's bound).
pub const MAX_LEGACY_STRING: u32 = 4096;
/// Data alignment of `ggjt` tensors (absolute file offsets).
const GGJT_ALIGNMENT: u64 = 32;
/// Estimated decoded bytes per vocabulary item beyond its text (three metadata values), for the memory cap.
const DECODED_BYTES_PER_TOKEN: u64 = 3 * 32;

/// The container family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LegacyFormat {
    /// Unversioned `ggml` (no scores in the vocabulary, no padding).
    Ggml,
    /// `ggmf` v1 (scores, no padding).
    Ggmf,
    /// `ggjt` v1-v3 (scores, tensor data aligned to 32 bytes).
    Ggjt,
}

impl LegacyFormat {
    /// Lower-case name ("ggml", "ggmf", "ggjt").
    pub fn name(self) -> &'static str {
        match self {
            LegacyFormat::Ggml => "ggml",
            LegacyFormat::Ggmf => "ggmf",
            LegacyFormat::Ggjt => "ggjt",
        }
    }

    /// The converter script's spelling ("GGML", "GGMF", "GGJT").
    fn upper(self) -> &'static str {
        match self {
            LegacyFormat::Ggml => "GGML",
            LegacyFormat::Ggmf => "GGMF",
            LegacyFormat::Ggjt => "GGJT",
        }
    }
}

/// True when `bytes` start with one of the legacy magics.
pub fn is_legacy(bytes: &[u8]) -> bool {
    bytes
        .get(..4)
        .and_then(|m| m.try_into().ok())
        .map(u32::from_le_bytes)
        .is_some_and(|m| m == MAGIC_GGML || m == MAGIC_GGMF || m == MAGIC_GGJT)
}

/// The seven hyperparameters of a legacy llama file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hyperparameters {
    /// Vocabulary size.
    pub n_vocab: u32,
    /// Embedding width.
    pub n_embd: u32,
    /// Feed-forward rounding multiple (not needed: the width is read from the tensors).
    pub n_mult: u32,
    /// Attention heads.
    pub n_head: u32,
    /// Blocks.
    pub n_layer: u32,
    /// Rotary dimensions.
    pub n_rot: u32,
    /// The file type (`llama_ftype`: 0 all f32, 1 mostly f16, 2 mostly q4_0, ...).
    pub ftype: u32,
}

/// A legacy model as GGUF: its metadata, and each tensor (GGUF name) with the absolute offset of its data.
pub type GgufView = (Vec<(String, Value)>, Vec<(TensorInfo, u64)>);

/// A tensor of a legacy file, under its legacy name.
#[derive(Clone, Debug, PartialEq)]
pub struct LegacyTensor {
    /// Legacy name (`layers.0.attention.wq.weight`).
    pub name: String,
    /// Dims in ggml order (`dims[0]` is the row length), as GGUF stores them.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Absolute offset of the data.
    pub start: u64,
    /// Data bytes.
    pub nbytes: u64,
}

/// A parsed legacy model.
#[derive(Clone, Debug, PartialEq)]
pub struct LegacyModel {
    /// Container family.
    pub format: LegacyFormat,
    /// Container version (1 for `ggml`, which has no version field).
    pub version: u32,
    /// Hyperparameters.
    pub hparams: Hyperparameters,
    /// Vocabulary: (token bytes, score; 0 in `ggml` files).
    pub vocab: Vec<(Vec<u8>, f32)>,
    /// Tensors in file order.
    pub tensors: Vec<LegacyTensor>,
    /// The file's name, recorded as `general.name` as the converter script does.
    pub file_name: Option<String>,
}

/// The legacy file types the converter script knows (`GGMLFType`), by id.
fn ftype_name(ftype: u32) -> Option<&'static str> {
    Some(match ftype {
        0 => "ALL_F32",
        1 => "MOSTLY_F16",
        2 => "MOSTLY_Q4_0",
        3 => "MOSTLY_Q4_1",
        4 => "MOSTLY_Q4_1_SOME_F16",
        7 => "MOSTLY_Q8_0",
        8 => "MOSTLY_Q5_0",
        9 => "MOSTLY_Q5_1",
        10 => "MOSTLY_Q2_K",
        11 => "MOSTLY_Q3_K_S",
        12 => "MOSTLY_Q3_K_M",
        13 => "MOSTLY_Q3_K_L",
        14 => "MOSTLY_Q4_K_S",
        15 => "MOSTLY_Q4_K_M",
        16 => "MOSTLY_Q5_K_S",
        17 => "MOSTLY_Q5_K_M",
        18 => "MOSTLY_Q6_K",
        _ => return None,
    })
}

/// The container version in which `ty`'s block layout took its GGUF form, when this file predates it.
fn layout_changed_after(format: LegacyFormat, version: u32, ty: GgmlType) -> Option<&'static str> {
    use GgmlType::*;
    let ggjt = |v: u32| format == LegacyFormat::Ggjt && version >= v;
    match ty {
        F32 | F16 => None,
        Q5_0 | Q5_1 if ggjt(2) => None,
        Q5_0 | Q5_1 => Some("ggjt v2 (llama.cpp #1405, new nibble order)"),
        Q4_0 | Q4_1 | Q8_0 | Q8_1 if ggjt(3) => None,
        Q4_0 | Q4_1 | Q8_0 | Q8_1 => Some("ggjt v3 (llama.cpp #1508, f16 scales)"),
        _ if ggjt(3) => None,
        _ => Some("ggjt v3 (the k-quants and later types did not exist before it)"),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    format: &'static str,
}

impl<'a> Reader<'a> {
    fn error_at(&self, offset: usize, kind: Malformed) -> Error {
        Error::Malformed { format: self.format, offset: offset as u64, kind }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error_at(
                self.pos,
                Malformed::Truncated { what: what(), needed: n as u64, available: self.remaining() as u64 },
            ));
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn f32(&mut self, what: &dyn Fn() -> String) -> Result<f32> {
        Ok(f32::from_bits(self.u32(what)?))
    }

    /// A u32 length, at most `limit`.
    fn length(&mut self, what: &dyn Fn() -> String, limit: u32) -> Result<u32> {
        let at = self.pos;
        let n = self.u32(what)?;
        if n >= limit {
            return Err(
                self.error_at(at, Malformed::TooMany { what: what(), count: n.into(), limit: (limit - 1).into() })
            );
        }
        Ok(n)
    }
}

impl LegacyModel {
    /// Parses and validates a legacy model whose complete contents are `bytes`. Tensor data is not read, only
    /// checked to lie inside `bytes`. `file_name` becomes `general.name` (as the converter script records it).
    pub fn parse(bytes: &[u8], file_name: Option<&str>) -> Result<LegacyModel> {
        let mut r = Reader { bytes, pos: 0, format: "legacy GGML" };
        let magic = r.u32(&|| "magic".into())?;
        let format = match magic {
            MAGIC_GGML => LegacyFormat::Ggml,
            MAGIC_GGMF => LegacyFormat::Ggmf,
            MAGIC_GGJT => LegacyFormat::Ggjt,
            _ => {
                return Err(r.error_at(
                    0,
                    Malformed::BadMagic { found: magic.to_le_bytes(), expected: "lmgg, fmgg or tjgg (ggml/ggmf/ggjt)" },
                ))
            }
        };
        r.format = format.name();
        let version = match format {
            LegacyFormat::Ggml => 1,
            _ => {
                let v = r.u32(&|| "version".into())?;
                let ok = match format {
                    LegacyFormat::Ggmf => v == 1,
                    _ => (1..=3).contains(&v),
                };
                if !ok {
                    let hint = if format == LegacyFormat::Ggmf { "ggmf has only v1" } else { "ggjt has v1, v2 and v3" };
                    return Err(r.error_at(4, Malformed::UnsupportedVersion { version: v, hint }));
                }
                v
            }
        };
        let mut h = [0u32; 7];
        const NAMES: [&str; 7] = ["n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype"];
        for (value, name) in h.iter_mut().zip(NAMES) {
            *value = r.u32(&|| format!("hyperparameter {name}"))?;
        }
        let hparams = Hyperparameters {
            n_vocab: h[0],
            n_embd: h[1],
            n_mult: h[2],
            n_head: h[3],
            n_layer: h[4],
            n_rot: h[5],
            ftype: h[6],
        };
        if ftype_name(hparams.ftype).is_none() {
            return Err(r.error_at(
                r.pos - 4,
                Malformed::Other(format!("unknown file type (ftype) {} in the hyperparameters", hparams.ftype)),
            ));
        }
        if hparams.n_head == 0 || hparams.n_embd == 0 || !hparams.n_embd.is_multiple_of(hparams.n_head) {
            return Err(r.error_at(
                4 + if format == LegacyFormat::Ggml { 0 } else { 4 },
                Malformed::Other(format!(
                    "n_embd {} is not a positive multiple of n_head {}",
                    hparams.n_embd, hparams.n_head
                )),
            ));
        }

        let with_scores = format != LegacyFormat::Ggml;
        let min_item = if with_scores { 8 } else { 4 };
        let at = r.pos;
        let memory = u64::from(hparams.n_vocab) * DECODED_BYTES_PER_TOKEN;
        if u64::from(hparams.n_vocab) > (r.remaining() / min_item) as u64 || memory > MAX_METADATA_MEMORY {
            let limit = ((r.remaining() / min_item) as u64).min(MAX_METADATA_MEMORY / DECODED_BYTES_PER_TOKEN);
            return Err(r.error_at(
                at,
                Malformed::TooMany { what: "vocabulary size n_vocab".into(), count: hparams.n_vocab.into(), limit },
            ));
        }
        let mut vocab = Vec::with_capacity(hparams.n_vocab as usize);
        for i in 0..hparams.n_vocab {
            let len = r.length(&|| format!("length of vocabulary item {i}"), MAX_LEGACY_STRING)?;
            let text = r.take(len as usize, &|| format!("vocabulary item {i}"))?.to_vec();
            let score = if with_scores { r.f32(&|| format!("score of vocabulary item {i}"))? } else { 0.0 };
            vocab.push((text, score));
        }

        let mut tensors: Vec<LegacyTensor> = Vec::new();
        let mut names: HashSet<String> = HashSet::new();
        while r.remaining() > 0 {
            let at = r.pos;
            let i = tensors.len();
            let n_dims = r.u32(&|| format!("n_dims of tensor {i}"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.error_at(at, Malformed::BadDimCount { name: format!("tensor {i}"), n_dims }));
            }
            let name_len = r.length(&|| format!("name length of tensor {i}"), MAX_LEGACY_STRING)?;
            let type_at = r.pos;
            let type_id = r.u32(&|| format!("type of tensor {i}"))?;
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(u64::from(r.u32(&|| format!("dimension {d} of tensor {i}"))?));
            }
            let name_at = r.pos;
            let name_bytes = r.take(name_len as usize, &|| format!("name of tensor {i}"))?;
            let name = String::from_utf8(name_bytes.to_vec())
                .map_err(|_| r.error_at(name_at, Malformed::InvalidUtf8 { what: format!("name of tensor {i}") }))?;
            let ty = GgmlType::from_id(type_id)
                .ok_or_else(|| r.error_at(type_at, Malformed::UnknownTensorType { name: name.clone(), id: type_id }))?;
            if let Some(changed_in) = layout_changed_after(format, version, ty) {
                return Err(r.error_at(
                    type_at,
                    Malformed::LegacyLayoutChanged {
                        name,
                        ty,
                        container: format!("{} v{version}", format.name()),
                        changed_in,
                    },
                ));
            }
            let nbytes = tensor_nbytes(&name, &dims, ty).map_err(|kind| r.error_at(at, kind))?;
            if format == LegacyFormat::Ggjt {
                let pad = (GGJT_ALIGNMENT - (r.pos as u64 % GGJT_ALIGNMENT)) % GGJT_ALIGNMENT;
                r.take(pad as usize, &|| format!("padding before the data of tensor {name:?}"))?;
            }
            let start = r.pos as u64;
            if nbytes > r.remaining() as u64 {
                return Err(r.error_at(
                    at,
                    Malformed::TensorOutOfFile { name, start, end: start + nbytes, file_len: bytes.len() as u64 },
                ));
            }
            r.pos += nbytes as usize;
            if !names.insert(name.clone()) {
                return Err(r.error_at(at, Malformed::DuplicateTensor { name }));
            }
            tensors.push(LegacyTensor { name, dims, ty, start, nbytes });
        }
        let model = LegacyModel { format, version, hparams, vocab, tensors, file_name: file_name.map(str::to_owned) };
        model.check_names()?;
        Ok(model)
    }

    /// Every tensor must have a GGUF name, and the feed-forward width must be readable.
    fn check_names(&self) -> Result<()> {
        for t in &self.tensors {
            let gguf = gguf_name(&t.name, self.hparams.n_layer).ok_or_else(|| {
                self.error(format!(
                    "tensor {:?} has no GGUF name (expected llama's tok_embeddings, norm, output, rope.freqs or \
                 layers.N.{{attention.wq/wk/wv/wo, attention_norm, feed_forward.w1/w2/w3, ffn_norm}}.weight with \
                 N < n_layer = {})",
                    t.name, self.hparams.n_layer
                ))
            })?;
            if gguf.len() >= MAX_NAME_LENGTH {
                return Err(self.error(format!("tensor {:?}: its GGUF name is too long", t.name)));
            }
        }
        if self.feed_forward_length().is_none() {
            return Err(self
                .error("no 2-D tensor layers.0.feed_forward.w1.weight: the feed-forward width cannot be read".into()));
        }
        Ok(())
    }

    fn error(&self, what: String) -> Error {
        Error::Malformed { format: self.format.name(), offset: 0, kind: Malformed::Other(what) }
    }

    /// The feed-forward width: `ne[1]` of `layers.0.feed_forward.w1.weight`, as the converter script reads it.
    pub fn feed_forward_length(&self) -> Option<u64> {
        self.tensors.iter().find(|t| t.name == "layers.0.feed_forward.w1.weight").and_then(|t| t.dims.get(1).copied())
    }

    /// KV heads: from the shape of `layers.0.attention.wk.weight` (`n_head × ne[1] / n_embd`), so grouped-query
    /// models (LLaMA-2 70B) come out right without a flag; `n_head` when the shape does not say.
    pub fn head_count_kv(&self) -> u32 {
        let h = &self.hparams;
        self.tensors
            .iter()
            .find(|t| t.name == "layers.0.attention.wk.weight")
            .and_then(|t| t.dims.get(1).copied())
            .filter(|&kv_width| kv_width > 0 && (u64::from(h.n_head) * kv_width) % u64::from(h.n_embd) == 0)
            .map(|kv_width| (u64::from(h.n_head) * kv_width / u64::from(h.n_embd)) as u32)
            .filter(|&n| n > 0 && h.n_head.is_multiple_of(n))
            .unwrap_or(h.n_head)
    }

    /// The GGUF metadata and tensors of this model, as `convert_llama_ggml_to_gguf.py` writes them without
    /// `--model-metadata-dir` (context length 2048 and RMS epsilon 5e-6 are its defaults): each tensor with its
    /// GGUF name and the absolute offset of its data in the legacy file.
    pub fn into_gguf(self) -> GgufView {
        let h = self.hparams;
        let u32v = Value::U32;
        let mut md: Vec<(String, Value)> = vec![("general.architecture".into(), Value::string("llama"))];
        if let Some(name) = &self.file_name {
            md.push(("general.name".into(), Value::string(name.as_str())));
        }
        let description = format!(
            "converted from legacy {}v{} {} format",
            self.format.upper(),
            self.version,
            ftype_name(h.ftype).unwrap_or("UNKNOWN")
        );
        md.push(("general.description".into(), Value::string(description)));
        md.push(("general.file_type".into(), u32v(h.ftype)));
        md.push(("llama.context_length".into(), u32v(2048)));
        md.push(("llama.embedding_length".into(), u32v(h.n_embd)));
        md.push(("llama.block_count".into(), u32v(h.n_layer)));
        md.push(("llama.feed_forward_length".into(), u32v(self.feed_forward_length().unwrap_or(0) as u32)));
        md.push(("llama.rope.dimension_count".into(), u32v(h.n_embd / h.n_head)));
        md.push(("llama.attention.head_count".into(), u32v(h.n_head)));
        md.push(("llama.attention.head_count_kv".into(), u32v(self.head_count_kv())));
        md.push(("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(5.0e-6)));
        md.push(("tokenizer.ggml.model".into(), Value::string("llama")));
        md.push(("tokenizer.ggml.pre".into(), Value::string("default")));
        let (tokens, scores, types) = gguf_vocab(&self.vocab);
        md.push(("tokenizer.ggml.tokens".into(), Value::Array(Array { elem_type: ValueType::String, items: tokens })));
        md.push(("tokenizer.ggml.scores".into(), Value::Array(Array { elem_type: ValueType::F32, items: scores })));
        md.push(("tokenizer.ggml.token_type".into(), Value::Array(Array { elem_type: ValueType::I32, items: types })));
        md.push(("tokenizer.ggml.unknown_token_id".into(), u32v(0)));
        md.push(("tokenizer.ggml.bos_token_id".into(), u32v(1)));
        md.push(("tokenizer.ggml.eos_token_id".into(), u32v(2)));

        let n_layer = h.n_layer;
        let tensors = self
            .tensors
            .into_iter()
            .map(|t| {
                // Names were checked on parse; a name without a mapping cannot reach here.
                let name = gguf_name(&t.name, n_layer).unwrap_or_else(|| t.name.clone());
                (TensorInfo { name, dims: t.dims, ty: t.ty, relative_offset: t.start, nbytes: t.nbytes }, t.start)
            })
            .collect();
        (md, tensors)
    }
}

/// The vocabulary as the converter script writes it: tokens 0-2 become `<unk>`, `<s>`, `</s>` (types unknown,
/// control, control), empty tokens are control tokens, one-byte tokens 3-258 become `<0xXX>` byte tokens, and
/// spaces become U+2581 in the others (normal).
fn gguf_vocab(vocab: &[(Vec<u8>, f32)]) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let mut tokens = Vec::with_capacity(vocab.len());
    let mut scores = Vec::with_capacity(vocab.len());
    let mut types = Vec::with_capacity(vocab.len());
    for (id, (text, score)) in vocab.iter().enumerate() {
        let (bytes, ty): (Vec<u8>, i32) = match id {
            0 => (b"<unk>".to_vec(), 2),
            1 => (b"<s>".to_vec(), 3),
            2 => (b"</s>".to_vec(), 3),
            _ if text.is_empty() => (Vec::new(), 3),
            3..=258 if text.len() == 1 => (format!("<0x{:02X}>", text[0]).into_bytes(), 6),
            _ => {
                let mut out = Vec::with_capacity(text.len());
                for &b in text {
                    if b == b' ' {
                        out.extend_from_slice("\u{2581}".as_bytes());
                    } else {
                        out.push(b);
                    }
                }
                (out, 1)
            }
        };
        tokens.push(Value::String(bytes));
        scores.push(Value::F32(*score));
        types.push(Value::I32(ty));
    }
    (tokens, scores, types)
}

/// The GGUF name of a legacy llama tensor (gguf-py's `TensorNameMap` for llama, original-checkpoint names), for
/// blocks below `n_layer`.
pub fn gguf_name(legacy: &str, n_layer: u32) -> Option<String> {
    let fixed = match legacy {
        "tok_embeddings.weight" => Some("token_embd.weight"),
        "norm.weight" => Some("output_norm.weight"),
        "output.weight" => Some("output.weight"),
        "rope.freqs" => Some("rope_freqs"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_owned());
    }
    let rest = legacy.strip_prefix("layers.")?;
    let (block, part) = rest.split_once('.')?;
    if block.is_empty() || !block.bytes().all(|b| b.is_ascii_digit()) || (block.len() > 1 && block.starts_with('0')) {
        return None;
    }
    let n: u32 = block.parse().ok()?;
    if n >= n_layer {
        return None;
    }
    let gguf = match part {
        "attention.wq.weight" => "attn_q.weight",
        "attention.wk.weight" => "attn_k.weight",
        "attention.wv.weight" => "attn_v.weight",
        "attention.wo.weight" => "attn_output.weight",
        "attention_norm.weight" => "attn_norm.weight",
        "feed_forward.w1.weight" => "ffn_gate.weight",
        "feed_forward.w2.weight" => "ffn_down.weight",
        "feed_forward.w3.weight" => "ffn_up.weight",
        "ffn_norm.weight" => "ffn_norm.weight",
        _ => return None,
    };
    Some(format!("blk.{n}.{gguf}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_like_gguf_py() {
        assert_eq!(gguf_name("layers.3.feed_forward.w2.weight", 4).as_deref(), Some("blk.3.ffn_down.weight"));
        assert_eq!(gguf_name("layers.4.feed_forward.w2.weight", 4), None);
        assert_eq!(gguf_name("layers.01.ffn_norm.weight", 4), None);
        assert_eq!(gguf_name("norm.weight", 1).as_deref(), Some("output_norm.weight"));
    }

    #[test]
    fn layouts_that_changed_are_refused_by_version() {
        use GgmlType::*;
        assert!(layout_changed_after(LegacyFormat::Ggjt, 3, Q4_K).is_none());
        assert!(layout_changed_after(LegacyFormat::Ggjt, 2, Q5_1).is_none());
        assert!(layout_changed_after(LegacyFormat::Ggjt, 2, Q4_0).is_some());
        assert!(layout_changed_after(LegacyFormat::Ggjt, 1, Q5_0).is_some());
        assert!(layout_changed_after(LegacyFormat::Ggml, 1, F16).is_none());
        assert!(layout_changed_after(LegacyFormat::Ggmf, 1, Q8_0).is_some());
    }
}
