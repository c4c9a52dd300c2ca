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

/// One LoRA pair to write into a ggla file: `delta = b @ a` for a model matrix of `n_out` rows of `n_in`.
#[derive(Clone, Copy, Debug)]
pub struct GglaPair<'a> {
    /// The model tensor's name (e.g. `blk.0.attn_q.weight`); the file holds `<name>.loraA` / `.loraB`.
    pub name: &'a str,
    /// `r x n_in`, row-major (PEFT's `lora_A.weight`).
    pub a: &'a [f32],
    /// `n_out x r`, row-major (PEFT's `lora_B.weight`).
    pub b: &'a [f32],
    /// The pair's rank.
    pub rank: usize,
    /// Columns of the model matrix.
    pub n_in: usize,
    /// Rows of the model matrix.
    pub n_out: usize,
}

/// The header `(r, alpha)` of a ggla file for pairs of `ranks` under llama.cpp's adapter scale rule (`alpha / r`
/// per pair, or 1 when `alpha` is 0), and whether that header reproduces every pair's scale. The old loader
/// scaled every tensor by header `alpha / r`, so the header is exact only for one rank and an integral `alpha`;
/// otherwise the header says alpha = r (a scale of 1) and the writer folds each pair's scale into its `loraB`.
pub fn ggla_header(ranks: &[usize], alpha: f64) -> (i32, i32, bool) {
    let distinct: std::collections::BTreeSet<usize> = ranks.iter().copied().collect();
    let max_rank = distinct.last().copied().unwrap_or(0).min(i32::MAX as usize) as i32;
    if distinct.len() == 1 && alpha != 0.0 && alpha.fract() == 0.0 && alpha.abs() < i32::MAX as f64 {
        (max_rank, alpha as i32, true)
    } else {
        (max_rank, max_rank, false)
    }
}

/// Writes the legacy ggla adapter of llama.cpp's `convert-lora-to-ggml.py` at `path`, atomically (the file
/// appears only when complete), for an adapter whose pairs are scaled by llama.cpp's rule with `alpha`: the
/// header of [`ggla_header`], then per pair `<name>.loraA` = Aᵀ (ne `[r, n_in]`, f16 when `a_as_f16`) and
/// `<name>.loraB` = B (ne `[r, n_out]`, always f32; times `alpha / r`, computed in f64 and rounded once, when the
/// header cannot carry the scale), each 32-byte aligned. A value outside the f16 range in an f16 `loraA`, or a pair whose slices do not match its
/// dimensions, is an error naming the tensor, and nothing is written.
pub fn write_ggla(
    path: &std::path::Path,
    pairs: &[GglaPair],
    alpha: f64,
    a_as_f16: bool,
) -> Result<std::path::PathBuf> {
    use std::io::Write;

    if pairs.is_empty() {
        return Err(Error::InvalidTensor { name: String::new(), reason: "no LoRA pairs to write".into() });
    }
    for p in pairs {
        if p.rank == 0 || p.a.len() != p.rank * p.n_in || p.b.len() != p.n_out * p.rank {
            return Err(Error::InvalidTensor {
                name: p.name.to_owned(),
                reason: format!(
                    "rank {} with {} x {} values in A and {} x {} in B does not fit a {} x {} matrix",
                    p.rank, p.rank, p.n_in, p.n_out, p.rank, p.n_out, p.n_in
                ),
            });
        }
    }
    let ranks: Vec<usize> = pairs.iter().map(|p| p.rank).collect();
    let (r_header, alpha_header, exact) = ggla_header(&ranks, alpha);
    let mut bytes: Vec<u8> = Vec::new();
    bytes.extend_from_slice(&GGLA_MAGIC.to_le_bytes());
    for v in [1, r_header, alpha_header] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let mut out = crate::atomic::AtomicFile::create(path)?;
    // Bytes already in the file: padding is to absolute multiples of 32.
    let mut at = 0usize;
    let mut put = |bytes: &mut Vec<u8>, name: String, ftype: i32, dims: [usize; 2], data: Vec<u8>| -> Result<()> {
        for v in [2, name.len() as i32, ftype, dims[0] as i32, dims[1] as i32] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(name.as_bytes());
        bytes.resize((at + bytes.len()).next_multiple_of(32) - at, 0);
        bytes.extend_from_slice(&data);
        // Written as we go: the factors of a large adapter need not all sit in memory twice.
        out.file().write_all(bytes).map_err(|e| Error::io(path, e))?;
        at += bytes.len();
        bytes.clear();
        Ok(())
    };
    for p in pairs {
        let factor = if exact || alpha == 0.0 { 1.0 } else { crate::scale::peft_scale(alpha, p.rank, false) };
        // Aᵀ: numpy (n_in, r), ne [r, n_in].
        let mut a = Vec::with_capacity(p.a.len() * if a_as_f16 { 2 } else { 4 });
        for i in 0..p.n_in {
            for k in 0..p.rank {
                let v = p.a[k * p.n_in + i];
                if a_as_f16 {
                    let h = crate::quant::f32_to_f16_bits(v);
                    if h & 0x7C00 == 0x7C00 && v.is_finite() {
                        return Err(Error::InvalidTensor {
                            name: format!("{}.loraA", p.name),
                            reason: format!("value {v} exceeds the f16 range (write f32 instead)"),
                        });
                    }
                    a.extend_from_slice(&h.to_le_bytes());
                } else {
                    a.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        // The folded factor in f64, rounded once to f32 (as numpy's float64 product cast to float32).
        let b: Vec<u8> =
            p.b.iter()
                .flat_map(|&v| (if factor == 1.0 { v } else { crate::scale::fold(v, factor) }).to_le_bytes())
                .collect();
        // `bytes` holds the file header before the first tensor, nothing after.
        put(&mut bytes, format!("{}.loraA", p.name), i32::from(a_as_f16), [p.rank, p.n_in], a)?;
        put(&mut bytes, format!("{}.loraB", p.name), 0, [p.rank, p.n_out], b)?;
    }
    out.commit(true)
}

/// Writes `adapter` as a ggla file (see [`write_ggla`]): each pair's `delta = left @ right` is `B @ A` with
/// B = left and A = right, whatever layout the adapter was read from.
pub fn write_adapter(
    path: &std::path::Path,
    adapter: &crate::adapter::LoraAdapter,
    a_as_f16: bool,
) -> Result<std::path::PathBuf> {
    let loaded = adapter.pairs.iter().map(|p| p.load()).collect::<Result<Vec<_>>>()?;
    let pairs: Vec<GglaPair> = adapter
        .pairs
        .iter()
        .zip(&loaded)
        .map(|(p, (left, right))| GglaPair {
            name: &p.target,
            a: right,
            b: left,
            rank: p.rank,
            n_in: p.cols,
            n_out: p.rows,
        })
        .collect();
    write_ggla(path, &pairs, f64::from(adapter.alpha), a_as_f16)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The bytes of a one-pair file worked out by hand from the layout (docs/FORMATS.md §3).
    #[test]
    fn writer_golden_bytes() {
        let dir = std::env::temp_dir().join(format!("ggml-lora-ggla-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.ggla");
        let pair = GglaPair { name: "w", a: &[1.5, -2.0], b: &[0.25], rank: 1, n_in: 2, n_out: 1 };
        write_ggla(&path, &[pair], 2.0, false).unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(b"algg");
        for v in [1i32, 1, 2, 2, 7, 0, 1, 2] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.extend_from_slice(b"w.loraA");
        want.resize(64, 0); // 16 + 20 + 7 = 43, padded to 64
        for v in [1.5f32, -2.0] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        for v in [2i32, 7, 0, 1, 1] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.extend_from_slice(b"w.loraB");
        want.resize(128, 0); // 72 + 20 + 7 = 99, padded to 128
        want.extend_from_slice(&0.25f32.to_le_bytes());
        assert_eq!(std::fs::read(&path).unwrap(), want);
        // One rank and an integral alpha: the header carries the scale (the loader computes alpha / r itself).
        // Two ranks, a fractional alpha, or alpha 0: each scale (alpha / r, in f64) goes into B, header alpha = r.
        assert_eq!(ggla_header(&[2, 2], 3.0), (2, 3, true));
        assert_eq!(ggla_header(&[2, 4], 3.0), (4, 4, false));
        assert_eq!(ggla_header(&[8], 2.5), (8, 8, false));
        assert_eq!(ggla_header(&[8], 0.0), (8, 8, false));
        let folded = dir.join("b.ggla");
        let pair = GglaPair { name: "w", a: &[1.0], b: &[1.0], rank: 1, n_in: 1, n_out: 1 };
        let wide = GglaPair { name: "v", a: &[1.0, 1.0], b: &[1.0, 3.0], rank: 2, n_in: 1, n_out: 1 };
        write_ggla(&folded, &[pair, wide], 3.0, false).unwrap();
        let parsed = std::fs::read(&folded).unwrap();
        assert_eq!(&parsed[8..16], &[2, 0, 0, 0, 2, 0, 0, 0]); // r = alpha = 2 (the larger rank)
        assert_eq!(parsed[parsed.len() - 4..], 4.5f32.to_le_bytes()); // 3 * (alpha 3 / rank 2)
        assert!(matches!(write_ggla(&dir.join("c.ggla"), &[], 1.0, false), Err(Error::InvalidTensor { .. })));
        let huge = GglaPair { name: "w", a: &[1e6], b: &[1.0], rank: 1, n_in: 1, n_out: 1 };
        let err = write_ggla(&dir.join("d.ggla"), &[huge], 1.0, true).unwrap_err();
        assert!(err.to_string().contains("w.loraA"), "{err}");
        assert!(!dir.join("d.ggla").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
