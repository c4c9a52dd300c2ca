//! Pairing an adapter with a model: what the patch engine checks before writing (`PatchPlan::new`), and, for
//! small accepted plans, the run itself.
//!
//! Two input modes (first byte, low bit):
//! - raw: the rest is split in two; the first part is written as the model file (opened with
//!   `ModelFile::open`), the second as the adapter file (loaded with `LoraAdapter::open`, GGUF or ggla);
//! - structured: a model (GGUF written with `GgufWriter`), an optional base and an adapter built with
//!   `adapter::from_tensors` are derived from the bytes, with names and shapes that mostly line up, so the
//!   deeper shape/type/rank checks and the run are reached.
//!
//! Invariants: nothing panics; a run that fails leaves no file at the target and no temporary; a run whose
//! target is an input is refused and the input is unchanged; a successful run's output opens and holds the
//! model's tensors in order.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ggml_lora_core::adapter::{from_tensors, LoraAdapter};
use ggml_lora_core::atomic::TEMP_MARKER;
use ggml_lora_core::gguf::{tensor_nbytes, GgufFile, GgufWriter, TensorInfo, TensorSpec, Value, WriteOptions};
use ggml_lora_core::model::ModelFile;
use ggml_lora_core::patch::{AdapterInput, PatchOptions, PatchPlan};
use ggml_lora_core::{Error, GgmlType};
use libfuzzer_sys::arbitrary::{Result as UResult, Unstructured};
use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &[
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.1.ffn_down.weight",
    "token_embd.weight",
    "output_norm.weight",
    "output.weight",
];
const ARCHS: &[&str] = &["llama", "gpt2", "qwen2"];
const ADAPTER_TYPES: &[GgmlType] = &[GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0];
/// Largest model (tensor data bytes) the structured mode builds, and the largest it runs a plan on.
const MAX_MODEL_BYTES: u64 = 1 << 16;

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ggml-lora-fuzz-pairing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn no_temp_files(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .all(|e| !e.file_name().to_string_lossy().contains(TEMP_MARKER))
}

fn dim(u: &mut Unstructured<'_>, block: u64) -> UResult<u64> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => 1,
        1 => block,
        2 => 2 * block,
        3 => u.int_in_range(1..=4u64)? * block,
        4 => u.int_in_range(1..=96u64)?,
        _ => 32,
    })
}

fn bytes_for(u: &mut Unstructured<'_>, n: usize, ty: GgmlType) -> UResult<Vec<u8>> {
    let mut out = vec![0u8; n];
    if u.ratio(1u8, 4u8)? {
        // Raw fuzz bytes (may hold NaN/inf scales and values).
        let src = u.bytes(u.len().min(n))?;
        for (i, b) in out.iter_mut().enumerate() {
            *b = src.get(i % src.len().max(1)).copied().unwrap_or(0);
        }
    } else {
        // Small finite values, encoded in the tensor's type (f16 0x3c00 = 1.0 as a scale for q-types).
        let seed: u32 = u.arbitrary()?;
        let mut s = seed | 1;
        for (i, b) in out.iter_mut().enumerate() {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            *b = match ty {
                GgmlType::F32 => [0, 0, 0x80, 0x3f][i % 4] ^ (s as u8 & 0x07) * u8::from(i % 4 == 0),
                GgmlType::F16 | GgmlType::BF16 => [0x00, 0x3c][i % 2] ^ (s as u8 & 0x03) * u8::from(i % 2 == 0),
                _ if ty.block_size() > 1 && i % ty.block_bytes() < 2 => [0x00, 0x3c][i % ty.block_bytes()],
                _ => s as u8,
            };
        }
    }
    Ok(out)
}

struct Model {
    specs: Vec<TensorSpec>,
    data: Vec<Vec<u8>>,
    arch: Option<&'static str>,
}

fn model(u: &mut Unstructured<'_>, like: Option<&Model>) -> UResult<Model> {
    let mut specs = Vec::new();
    let mut data = Vec::new();
    let mut total = 0u64;
    match like {
        // A base: the same tensors, other (mostly float) types, sometimes other dims or a missing tensor.
        Some(m) => {
            for s in &m.specs {
                if u.ratio(1u8, 16u8)? {
                    continue;
                }
                let ty = if u.ratio(3u8, 4u8)? { *u.choose(&ADAPTER_TYPES[..3])? } else { *u.choose(GgmlType::ALL)? };
                let dims = if u.ratio(1u8, 16u8)? { vec![dim(u, 32)?, dim(u, 1)?] } else { s.dims.clone() };
                specs.push(TensorSpec { name: s.name.clone(), dims, ty });
            }
        }
        None => {
            for _ in 0..u.int_in_range(0..=5u8)? {
                let name = (*u.choose(NAMES)?).to_owned();
                let ty = if u.ratio(3u8, 4u8)? { *u.choose(ADAPTER_TYPES)? } else { *u.choose(GgmlType::ALL)? };
                let n_dims = u.int_in_range(1..=3u8)?;
                let mut dims = vec![dim(u, ty.block_size() as u64)?];
                for _ in 1..n_dims {
                    dims.push(dim(u, 1)?);
                }
                specs.push(TensorSpec { name, dims, ty });
            }
        }
    }
    for s in &specs {
        let n = tensor_nbytes(&s.name, &s.dims, s.ty).unwrap_or(0);
        total += n;
        if total > MAX_MODEL_BYTES {
            return Err(libfuzzer_sys::arbitrary::Error::IncorrectFormat);
        }
        data.push(bytes_for(u, n as usize, s.ty)?);
    }
    let arch = if u.ratio(1u8, 5u8)? { None } else { Some(*u.choose(ARCHS)?) };
    Ok(Model { specs, data, arch })
}

/// Writes `m`; `None` when the writer refuses it (duplicate names, bad dims: also a fine outcome).
fn write_model(path: &Path, m: &Model) -> Option<ModelFile> {
    let mut metadata = vec![("general.alignment".to_string(), Value::U32(32))];
    if let Some(a) = m.arch {
        metadata.push(("general.architecture".into(), Value::string(a)));
    }
    let mut w = GgufWriter::create(path, &metadata, m.specs.clone(), WriteOptions { sync: false }).ok()?;
    for (s, d) in m.specs.iter().zip(&m.data) {
        w.write_tensor(&s.name, d).expect("sizes come from tensor_nbytes");
    }
    w.finish().expect("complete file");
    Some(ModelFile::open(path).expect("the writer's output must open"))
}

struct AdapterParts {
    infos: Vec<TensorInfo>,
    data: Vec<Vec<u8>>,
    alpha: f32,
    arch: Option<String>,
}

fn adapter(u: &mut Unstructured<'_>, m: &Model) -> UResult<AdapterParts> {
    let mut infos = Vec::new();
    let mut data = Vec::new();
    let mut push = |u: &mut Unstructured<'_>, name: String, dims: Vec<u64>| -> UResult<()> {
        let ty = *u.choose(ADAPTER_TYPES)?;
        let Ok(nbytes) = tensor_nbytes(&name, &dims, ty) else { return Ok(()) };
        if nbytes > MAX_MODEL_BYTES {
            return Ok(());
        }
        data.push(bytes_for(u, nbytes as usize, ty)?);
        infos.push(TensorInfo { name, dims, ty, relative_offset: 0, nbytes });
        Ok(())
    };
    for _ in 0..u.int_in_range(0..=4u8)? {
        // Target a model tensor (shape mostly right) or any name.
        let (target, n_in, n_out) = match m.specs.get(u.int_in_range(0..=m.specs.len())?) {
            Some(s) if u.ratio(7u8, 8u8)? => {
                let n_out: u64 = s.dims[1..].iter().product();
                (s.name.clone(), s.dims[0], n_out)
            }
            _ => ((*u.choose(NAMES)?).to_owned(), dim(u, 1)?, dim(u, 1)?),
        };
        let r = u.int_in_range(1..=8u64)?;
        let r_b = if u.ratio(1u8, 10u8)? { u.int_in_range(1..=8u64)? } else { r };
        let (a_dims, b_dims) = if target.starts_with("token_embd") {
            (vec![r, n_out], vec![r_b, n_in])
        } else {
            (vec![n_in, r], vec![r_b, n_out])
        };
        if !u.ratio(1u8, 16u8)? {
            push(u, format!("{target}.lora_a"), a_dims)?;
        }
        if !u.ratio(1u8, 16u8)? {
            push(u, format!("{target}.lora_b"), b_dims)?;
        }
        if u.ratio(1u8, 16u8)? {
            push(u, format!("{target}.lora_c"), vec![4])?;
        }
        if u.ratio(1u8, 4u8)? {
            // A DoRA magnitude: usually one per output row, sometimes the wrong length.
            let len = if u.ratio(7u8, 8u8)? { n_out } else { dim(u, 1)? };
            push(u, format!("{target}.dora_m"), vec![len])?;
        }
    }
    let alpha = if u.ratio(1u8, 8u8)? { u.arbitrary()? } else { f32::from(u.int_in_range(0..=32u8)?) };
    let arch = if u.ratio(1u8, 2u8)? { None } else { Some((*u.choose(ARCHS)?).to_owned()) };
    Ok(AdapterParts { infos, data, alpha, arch })
}

fn options(u: &mut Unstructured<'_>) -> UResult<PatchOptions> {
    Ok(PatchOptions {
        out_type: if u.ratio(1u8, 3u8)? { Some(*u.choose(GgmlType::ALL)?) } else { None },
        intermediate: if u.ratio(1u8, 4u8)? { Some(*u.choose(GgmlType::ALL)?) } else { None },
        threads: Some(1),
        sync: false,
        extra_metadata: vec![("ggml_lora.fuzz".into(), Value::U8(1))],
        keep_lora: if u.ratio(1u8, 4u8)? { Some(u.int_in_range(0..=10u8)? as f64 / 8.0) } else { None },
        ..Default::default()
    })
}

/// Runs `plan` to `out` and checks the outcome.
fn run_and_check(plan: &PatchPlan<'_>, model: &ModelFile, dir: &Path, out: &Path) {
    let _ = std::fs::remove_file(out);
    match plan.run(out, &mut |_| Ok(())) {
        Ok(report) => {
            let f = GgufFile::open(out).expect("the patch output must open");
            let names: Vec<_> = f.tensors().iter().map(|t| &t.name).collect();
            let expected: Vec<_> = model.tensors().iter().map(|t| &t.name).collect();
            assert_eq!(names, expected);
            assert_eq!(report.tensors.len() + report.copied, model.tensors().len());
        }
        Err(_) => assert!(!out.exists(), "a failed run left a file at the target"),
    }
    assert!(no_temp_files(dir), "temporary file left behind");
}

fn structured(u: &mut Unstructured<'_>, dir: &Path) -> UResult<()> {
    let m = model(u, None)?;
    let base = if u.ratio(1u8, 3u8)? { Some(model(u, Some(&m))?) } else { None };
    let parts = adapter(u, &m)?;
    let scale: f32 = if u.ratio(1u8, 8u8)? { u.arbitrary()? } else { 1.0 };
    let opts = options(u)?;
    let out_is_input = u.ratio(1u8, 16u8)?;

    let model_path = dir.join("model.gguf");
    let base_path = dir.join("base.gguf");
    let Some(model_file) = write_model(&model_path, &m) else { return Ok(()) };
    let base_file = match &base {
        Some(b) => match write_model(&base_path, b) {
            Some(f) => Some(f),
            None => return Ok(()),
        },
        None => None,
    };
    let tensors: Vec<(&TensorInfo, &[u8])> = parts.infos.iter().zip(&parts.data).map(|(i, d)| (i, &d[..])).collect();
    let Ok(lora) = from_tensors("fuzz-adapter".into(), parts.arch.clone(), parts.alpha, &tensors) else {
        return Ok(());
    };
    for p in &lora.pairs {
        let (left, right) = p.load().expect("factors of a validated pair load");
        assert_eq!(left.len(), p.rows * p.rank);
        assert_eq!(right.len(), p.rank * p.cols);
    }
    let adapters = [AdapterInput { adapter: Arc::new(lora), scale }];
    let Ok(plan) = PatchPlan::new(&model_file, base_file.as_ref(), &adapters, opts) else { return Ok(()) };
    let _ = plan.patched_tensors();
    if out_is_input {
        let before = std::fs::read(&model_path).unwrap();
        let err = plan.run(&model_path, &mut |_| Ok(())).err().expect("writing over the model must be refused");
        assert!(matches!(err, Error::Incompatible(_)), "{err}");
        assert_eq!(std::fs::read(&model_path).unwrap(), before, "the model changed");
        return Ok(());
    }
    run_and_check(&plan, &model_file, dir, &dir.join("out.gguf"));
    Ok(())
}

fn raw(data: &[u8], dir: &Path) {
    if data.len() < 2 {
        return;
    }
    let split = usize::from(u16::from_le_bytes([data[0], data[1]])) % (data.len() - 1) + 2;
    let (model_bytes, adapter_bytes) = data[2..].split_at(split - 2);
    let model_path = dir.join("raw-model.gguf");
    let adapter_path = dir.join("raw-adapter.gguf");
    std::fs::write(&model_path, model_bytes).unwrap();
    std::fs::write(&adapter_path, adapter_bytes).unwrap();
    let Ok(model) = ModelFile::open(&model_path) else { return };
    let Ok(lora) = LoraAdapter::open(&adapter_path) else { return };
    let adapters = [AdapterInput { adapter: Arc::new(lora), scale: 1.0 }];
    let Ok(plan) = PatchPlan::new(&model, None, &adapters, PatchOptions { threads: Some(1), ..Default::default() })
    else {
        return;
    };
    if model_bytes.len() as u64 <= MAX_MODEL_BYTES {
        run_and_check(&plan, &model, dir, &dir.join("raw-out.gguf"));
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    if data.first().is_some_and(|b| b & 1 == 1) {
        raw(&data[1..], &dir);
    } else {
        let mut u = Unstructured::new(data.get(1..).unwrap_or(&[]));
        let _ = structured(&mut u, &dir);
    }
});
