//! Regression tests for hostile inputs found by fuzzing (`fuzz/`, see FUZZING.md) and by the fault suite
//! (`tests/test_faults.py`). Every crash or blow-up found gets a test here, its input built inline, so the
//! normal `cargo test` keeps it fixed without cargo-fuzz.
//!
//! Also replays the committed hand-made fuzz seeds (`fuzz/seeds/<target>/*`) through the same entry points as
//! the fuzz targets: they must never panic.

use std::path::{Path, PathBuf};

use ggml_lora_core::adapter::{from_ggla, from_tensors};
use ggml_lora_core::ggla::GglaFile;
use ggml_lora_core::gguf::{GgufHeader, MAX_METADATA_MEMORY};
use ggml_lora_core::quant;
use ggml_lora_core::{Error, GgmlType, Malformed};

/// GGUF bytes built field by field.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn header(n_tensors: u64, n_kv: u64) -> Bytes {
        Bytes::default().raw(b"GGUF").u32(3).u64(n_tensors).u64(n_kv)
    }
    fn u32(mut self, v: u32) -> Bytes {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Bytes {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn raw(mut self, b: &[u8]) -> Bytes {
        self.0.extend_from_slice(b);
        self
    }
    fn str(self, s: &str) -> Bytes {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    fn zeros(mut self, n: usize) -> Bytes {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

fn malformed(bytes: &[u8]) -> Malformed {
    match GgufHeader::parse(bytes) {
        Err(Error::Malformed { kind, .. }) => kind,
        other => panic!("expected a Malformed error, got {other:?}"),
    }
}

/// Found by the fault suite's memory check (tests/test_faults.py): one UINT8 array element decodes to a
/// 32-byte `Value`, so a 16 MB file holding a single 16 M-element UINT8 array made the parser allocate 490 MB
/// (a 1 GB file: 32 GB). Fixed by `MAX_METADATA_MEMORY`, charged before each array allocation.
#[test]
fn metadata_arrays_cannot_amplify_memory() {
    for (elem_type, elem_size) in [(0u32, 1usize), (7, 1), (2, 2)] {
        let n = (MAX_METADATA_MEMORY / 32 + 1) as usize;
        let b = Bytes::header(0, 1).str("a").u32(9).u32(elem_type).u64(n as u64).zeros(n * elem_size);
        let k = malformed(&b.0);
        assert!(matches!(k, Malformed::TooMany { limit: MAX_METADATA_MEMORY, .. }), "{k}");
    }
    // Many arrays adding up are caught too: 40 arrays of 500 k one-byte elements (640 MB decoded).
    let mut b = Bytes::header(0, 40);
    for i in 0..40 {
        b = b.str(&format!("a{i:02}")).u32(9).u32(0).u64(500_000).zeros(500_000);
    }
    assert!(matches!(malformed(&b.0), Malformed::TooMany { .. }));
}

/// The hostile "100-byte files" of the fault suite: huge counts and lengths are refused from the header alone.
#[test]
fn small_files_claiming_huge_sizes() {
    let cases: Vec<Vec<u8>> = vec![
        Bytes::header(1 << 62, 0).0,
        Bytes::header(0, 1 << 40).0,
        Bytes::header(0, 1).str("a").u32(9).u32(8).u64(1 << 40).0,
        Bytes::header(0, 1).str("a").u32(9).u32(9).u64(1 << 40).u32(9).u64(1 << 40).0,
        Bytes::header(0, 1).str("s").u32(8).u64(1 << 40).0,
        Bytes::header(1, 0).str("t").u32(2).u64(1 << 30).u64(1 << 30).u32(0).u64(0).0,
        Bytes::header(1, 0).str("t").u32(4).u64(1 << 16).u64(1 << 16).u64(1 << 16).u64(1 << 16).u32(0).u64(0).0,
    ];
    for bytes in cases {
        assert!(bytes.len() <= 128);
        assert!(GgufHeader::parse(&bytes).is_err());
    }
}

/// ggla dims at the i32 limit: the data size (2^31-1)^2 * 4 must not overflow before the bounds check.
#[test]
fn ggla_extreme_dims_are_truncation_errors() {
    let mut b = b"algg".to_vec();
    for v in [1i32, 4, 8, 2, 1, 0, i32::MAX, i32::MAX] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.push(b'x');
    assert!(GglaFile::parse(&b).is_err());
    assert!(from_ggla(&b, "t").is_err());
}

/// Adapter tensors whose halves disagree in rank, or whose values are not dequantizable, are errors.
#[test]
fn adapter_rank_mismatch_and_bad_types() {
    use ggml_lora_core::gguf::TensorInfo;
    let info = |name: &str, dims: &[u64], ty: GgmlType| TensorInfo {
        name: name.into(),
        dims: dims.to_vec(),
        ty,
        relative_offset: 0,
        nbytes: ggml_lora_core::gguf::tensor_nbytes(name, dims, ty).unwrap(),
    };
    let a = info("w.lora_a", &[4, 2], GgmlType::F32);
    let b = info("w.lora_b", &[3, 5], GgmlType::F32);
    let (da, db) = (vec![0u8; a.nbytes as usize], vec![0u8; b.nbytes as usize]);
    assert!(from_tensors("t".into(), None, 1.0, &[(&a, &da), (&b, &db)]).is_err());
    let q = info("w.lora_b", &[256, 2], GgmlType::Q8_1);
    let dq = vec![0u8; q.nbytes as usize];
    let a2 = info("w.lora_a", &[4, 256], GgmlType::F32);
    let da2 = vec![0u8; a2.nbytes as usize];
    assert!(from_tensors("t".into(), None, 1.0, &[(&a2, &da2), (&q, &dq)]).is_err());
    assert!(from_tensors("t".into(), None, f32::NAN, &[]).is_err());
}

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds").join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// Every committed seed goes through the fuzz targets' entry points without panicking; the valid ones parse.
#[test]
fn fuzz_seeds_replay() {
    for (path, bytes) in seeds("gguf_parse") {
        if let Ok(h) = GgufHeader::parse(&bytes) {
            for (i, t) in h.tensors.iter().enumerate() {
                let r = h.tensor_range(i);
                let data = &bytes[r.start as usize..r.end as usize];
                if quant::can_dequantize(t.ty) {
                    let mut out = vec![0f32; t.n_elements() as usize];
                    quant::dequantize_rows(t.ty, data, t.row_len() as usize, &mut out).unwrap();
                }
            }
        } else {
            let name = path.file_name().unwrap().to_string_lossy();
            assert!(name.contains("big-endian"), "{} should parse", path.display());
        }
    }
    for (path, bytes) in seeds("ggla_parse") {
        GglaFile::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let _ = from_ggla(&bytes, "seed");
    }
    for (_, bytes) in seeds("adapter_pairing") {
        // Raw-mode layout: flag byte, u16 split, model bytes, adapter bytes.
        let split = u16::from_le_bytes([bytes[1], bytes[2]]) as usize;
        let (model, adapter) = bytes[3..].split_at(split);
        GgufHeader::parse(model).unwrap();
        GgufHeader::parse(adapter).unwrap();
    }
}

/// Issue 13: a GGUF adapter without tensors was accepted and applied nothing; it is refused, naming the file.
#[test]
fn gguf_adapter_without_tensors_is_refused() {
    let kv = |b: Bytes, key: &str, value: &str| b.str(key).u32(8).str(value);
    let bytes = kv(kv(Bytes::header(0, 2), "general.type", "adapter"), "adapter.type", "lora");
    let dir = std::env::temp_dir().join(format!("ggml-lora-empty-adapter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("empty.gguf");
    std::fs::write(&path, &bytes.0).unwrap();
    let err = ggml_lora_core::adapter::LoraAdapter::open(&path).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(err.root(), Error::Malformed { kind: Malformed::NoTensors { .. }, .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("empty.gguf") && message.contains("no LoRA tensor pairs"), "{message}");
}
