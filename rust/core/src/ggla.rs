//! The legacy 'ggla' LoRA adapter file of llama.cpp's original `convert-lora-to-ggml.py` (2023-2024).
//!
//! Layout (little-endian; docs/FORMATS.md §3):
//! ```text
//! u32 magic 0x67676c61 ('ggla'; bytes "algg")   i32 version = 1   i32 r   i32 lora_alpha
//! until EOF: i32 n_dims, i32 name_len, i32 ftype (0 f32, 1 f16), i32 ne[n_dims], u8 name[name_len],
//!            zero padding to the next multiple of 32 (absolute offset), data (row-major, ne[0] fastest)
//! ```

use crate::error::{Error, Malformed, Result};
use crate::types::GgmlType;

/// Magic number of a ggla file, as a little-endian u32.
pub const GGLA_MAGIC: u32 = 0x6767_6c61;
/// Longest tensor name accepted, in bytes (names in real files are under 64).
pub const MAX_NAME_LENGTH: usize = 512;

/// One tensor of a ggla file.
#[derive(Clone, Debug, PartialEq)]
pub struct GglaTensor {
    /// Name as written, e.g. `layers.0.attention.wq.weight.loraA` or `blk.0.attn_q.weight.loraA`.
    pub name: String,
    /// Dims in ggml order (ne[0] first), 1 or 2 of them, none zero.
    pub dims: Vec<u64>,
    /// f32 or f16.
    pub ty: GgmlType,
    /// Absolute byte range of the data in the file.
    pub data: std::ops::Range<usize>,
}

/// A parsed ggla file (the tensor data stays in the caller's bytes).
#[derive(Clone, Debug, PartialEq)]
pub struct GglaFile {
    /// LoRA rank from the header (llama.cpp scaled by `alpha / r` with this r).
    pub rank: i32,
    /// LoRA alpha from the header (an integer in this format).
    pub alpha: i32,
    /// Tensors in file order.
    pub tensors: Vec<GglaTensor>,
}

fn malformed(offset: usize, kind: Malformed) -> Error {
    Error::Malformed { format: "ggla", offset: offset as u64, kind }
}

/// True when `bytes` starts with the ggla magic.
pub fn is_ggla(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) == GGLA_MAGIC
}

impl GglaFile {
    /// Parses and validates a complete ggla file.
    pub fn parse(bytes: &[u8]) -> Result<GglaFile> {
        let mut pos = 0usize;
        let read_i32 = |pos: &mut usize, what: &str| -> Result<i32> {
            let end = *pos + 4;
            let field = bytes.get(*pos..end).ok_or_else(|| {
                malformed(
                    *pos,
                    Malformed::Truncated { what: what.to_owned(), needed: 4, available: (bytes.len() - *pos) as u64 },
                )
            })?;
            *pos = end;
            Ok(i32::from_le_bytes([field[0], field[1], field[2], field[3]]))
        };
        let magic = read_i32(&mut pos, "magic")? as u32;
        if magic != GGLA_MAGIC {
            let mut found = [0u8; 4];
            found.copy_from_slice(&bytes[..4]);
            return Err(malformed(0, Malformed::BadMagic { found, expected: "algg ('ggla')" }));
        }
        let version = read_i32(&mut pos, "version")?;
        if version != 1 {
            return Err(malformed(
                4,
                Malformed::UnsupportedVersion { version: version as u32, hint: "only ggla version 1 exists" },
            ));
        }
        let rank = read_i32(&mut pos, "lora rank")?;
        if rank <= 0 {
            return Err(malformed(8, Malformed::Other(format!("LoRA rank {rank} in the header must be positive"))));
        }
        let alpha = read_i32(&mut pos, "lora alpha")?;

        let mut tensors = Vec::new();
        while pos < bytes.len() {
            let start = pos;
            let n_dims = read_i32(&mut pos, "tensor dimension count")?;
            let name_len = read_i32(&mut pos, "tensor name length")?;
            let ftype = read_i32(&mut pos, "tensor type")?;
            if !(1..=2).contains(&n_dims) {
                return Err(malformed(
                    start,
                    Malformed::Other(format!("tensor at byte {start} has {n_dims} dimensions (1 or 2 allowed)")),
                ));
            }
            if name_len <= 0 || name_len as usize > MAX_NAME_LENGTH {
                return Err(malformed(
                    start + 4,
                    Malformed::Other(format!("tensor name length {name_len} (1 to {MAX_NAME_LENGTH} allowed)")),
                ));
            }
            let ty = match ftype {
                0 => GgmlType::F32,
                1 => GgmlType::F16,
                other => {
                    return Err(malformed(
                        start + 8,
                        Malformed::Other(format!("tensor type {other} (ggla holds only 0 = f32 and 1 = f16)")),
                    ))
                }
            };
            let mut dims = Vec::with_capacity(n_dims as usize);
            for j in 0..n_dims {
                let at = pos;
                let d = read_i32(&mut pos, "tensor dimension")?;
                if d <= 0 {
                    return Err(malformed(at, Malformed::Other(format!("tensor dimension {j} is {d}"))));
                }
                dims.push(d as u64);
            }
            let name_at = pos;
            let name_bytes = bytes.get(pos..pos + name_len as usize).ok_or_else(|| {
                malformed(
                    pos,
                    Malformed::Truncated {
                        what: "tensor name".into(),
                        needed: name_len as u64,
                        available: (bytes.len() - pos) as u64,
                    },
                )
            })?;
            let name = String::from_utf8(name_bytes.to_vec())
                .map_err(|_| malformed(name_at, Malformed::InvalidUtf8 { what: "tensor name".into() }))?;
            pos += name_len as usize;
            pos = pos.div_ceil(32) * 32;
            let nbytes = dims.iter().product::<u64>() * ty.block_bytes() as u64;
            let available = bytes.len().saturating_sub(pos) as u64;
            if nbytes > available {
                return Err(malformed(
                    pos.min(bytes.len()),
                    Malformed::Truncated { what: format!("data of tensor {name:?}"), needed: nbytes, available },
                ));
            }
            let data = pos..pos + nbytes as usize;
            pos = data.end;
            if tensors.iter().any(|t: &GglaTensor| t.name == name) {
                return Err(malformed(name_at, Malformed::DuplicateTensor { name }));
            }
            tensors.push(GglaTensor { name, dims, ty, data });
        }
        Ok(GglaFile { rank, alpha, tensors })
    }
}

/// Maps a ggla tensor name (without its `.loraA`/`.loraB` suffix) to the GGUF model tensor it patches:
/// `layers.3.attention.wq.weight` → `blk.3.attn_q.weight` (the pre-GGUF names of PR #820); GGUF-era names
/// (`blk.3.attn_q.weight`) are returned unchanged. `None` for a pre-GGUF name this table does not know.
pub fn gguf_target_name(name: &str) -> Option<String> {
    const LAYER_PARTS: &[(&str, &str)] = &[
        ("attention.wq", "attn_q"),
        ("attention.wk", "attn_k"),
        ("attention.wv", "attn_v"),
        ("attention.wo", "attn_output"),
        ("feed_forward.w1", "ffn_gate"),
        ("feed_forward.w2", "ffn_down"),
        ("feed_forward.w3", "ffn_up"),
        ("attention_norm", "attn_norm"),
        ("ffn_norm", "ffn_norm"),
    ];
    const GLOBAL: &[(&str, &str)] = &[
        ("tok_embeddings.weight", "token_embd.weight"),
        ("norm.weight", "output_norm.weight"),
        ("output.weight", "output.weight"),
    ];
    if let Some(rest) = name.strip_prefix("layers.") {
        let (layer, part) = rest.split_once('.')?;
        let layer: u32 = layer.parse().ok()?;
        let part = part.strip_suffix(".weight")?;
        let (_, gguf) = LAYER_PARTS.iter().find(|(old, _)| *old == part)?;
        return Some(format!("blk.{layer}.{gguf}.weight"));
    }
    if let Some((_, gguf)) = GLOBAL.iter().find(|(old, _)| *old == name) {
        return Some((*gguf).to_owned());
    }
    name.starts_with("blk.").then(|| name.to_owned()).or_else(|| {
        ["token_embd.", "output.", "output_norm."].iter().any(|p| name.starts_with(p)).then(|| name.to_owned())
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a ggla file the way convert-lora-to-ggml.py did.
    pub(crate) fn ggla_bytes(rank: i32, alpha: i32, tensors: &[(&str, &[i32], i32, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"algg");
        for v in [1, rank, alpha] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for (name, dims, ftype, data) in tensors {
            for v in [dims.len() as i32, name.len() as i32, *ftype] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            for d in *dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(name.as_bytes());
            out.resize(out.len().div_ceil(32) * 32, 0);
            out.extend_from_slice(data);
        }
        out
    }

    #[test]
    fn parses_both_naming_schemes() {
        let bytes = ggla_bytes(
            2,
            4,
            &[
                ("layers.0.attention.wq.weight.loraA", &[2, 3], 0, vec![0; 24]),
                ("blk.0.attn_q.weight.loraB", &[2, 5], 1, vec![0; 20]),
            ],
        );
        assert!(is_ggla(&bytes));
        let f = GglaFile::parse(&bytes).unwrap();
        assert_eq!((f.rank, f.alpha), (2, 4));
        assert_eq!(f.tensors[0].dims, vec![2, 3]);
        assert_eq!(f.tensors[1].ty, GgmlType::F16);
        assert_eq!(f.tensors[0].data.start % 32, 0);
        assert_eq!(gguf_target_name("layers.0.attention.wq.weight").as_deref(), Some("blk.0.attn_q.weight"));
        assert_eq!(gguf_target_name("layers.12.feed_forward.w2.weight").as_deref(), Some("blk.12.ffn_down.weight"));
        assert_eq!(gguf_target_name("blk.1.attn_v.weight").as_deref(), Some("blk.1.attn_v.weight"));
        assert_eq!(gguf_target_name("layers.x.attention.wq.weight"), None);
        assert_eq!(gguf_target_name("something.else"), None);
    }

    #[test]
    fn every_truncation_and_bad_field_is_an_error() {
        let good = ggla_bytes(2, 4, &[("blk.0.attn_q.weight.loraA", &[2, 3], 0, vec![1; 24])]);
        for cut in 1..good.len() {
            // Cutting inside the padding still leaves a whole header; all other cuts must fail.
            if let Ok(f) = GglaFile::parse(&good[..cut]) {
                assert!(f.tensors.is_empty() && cut == 16, "truncation at {cut} accepted");
            }
        }
        let mut bad_type = good.clone();
        bad_type[24..28].copy_from_slice(&7i32.to_le_bytes());
        assert!(GglaFile::parse(&bad_type).unwrap_err().to_string().contains("type 7"));
        let mut bad_dims = good.clone();
        bad_dims[16..20].copy_from_slice(&3i32.to_le_bytes());
        assert!(GglaFile::parse(&bad_dims).unwrap_err().to_string().contains("3 dimensions"));
        let mut huge_name = good.clone();
        huge_name[20..24].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(GglaFile::parse(&huge_name).unwrap_err().to_string().contains("name length"));
        let mut bad_version = good;
        bad_version[4..8].copy_from_slice(&2i32.to_le_bytes());
        assert!(GglaFile::parse(&bad_version).is_err());
        assert!(GglaFile::parse(b"GGUF\x03\0\0\0").unwrap_err().to_string().contains("bad magic"));
    }
}
