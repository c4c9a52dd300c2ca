//! Integration tests against the real files in ../shared/fixtures (made by llama.cpp's own tools).

use ggml_lora_core::gguf::{GgufFile, GgufWriter, TensorSpec, Value, WriteOptions};
use ggml_lora_core::torch_bin::read_torch_bin;
use ggml_lora_core::{quant, GgmlType};

mod common;

use common::Fixtures;

fn open(fx: &Fixtures, rel: &str) -> GgufFile {
    GgufFile::open(fx.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn reads_every_fixture_model() {
    let Some(fx) = Fixtures::get("reads_every_fixture_model") else { return };
    for rel in [
        "llama-gqa/base-f16.gguf",
        "llama-gqa/base-q4_0.gguf",
        "llama-gqa/base-q8_0.gguf",
        "llama-gqa/base-q4_0-mixed.gguf",
        "llama-gqa/lora-r8/ref-adapter-f32.gguf",
        "gpt2-tiny/base-f16.gguf",
    ] {
        let f = open(&fx, rel);
        assert_eq!(f.header().version, 3, "{rel}");
        assert_eq!(f.header().alignment, 32, "{rel}");
        assert!(!f.tensors().is_empty(), "{rel}");
        for (i, t) in f.tensors().iter().enumerate() {
            assert_eq!(f.tensor_data(i).len() as u64, t.nbytes);
        }
    }
    let mixed = open(&fx, "llama-gqa/base-q4_0-mixed.gguf");
    assert_eq!(mixed.tensor("output.weight").unwrap().1.ty, GgmlType::Q6_K);
    assert_eq!(
        open(&fx, "llama-gqa/base-f16.gguf").header().get("general.architecture").and_then(Value::as_str),
        Some("llama")
    );
}

/// quantize(f32(f16 source)) equals llama-quantize's bytes for every q4_0 / q8_0 tensor.
#[test]
fn requantizing_the_f16_model_reproduces_llama_quantize() {
    let Some(fx) = Fixtures::get("requantizing_the_f16_model_reproduces_llama_quantize") else { return };
    let f16 = open(&fx, "llama-gqa/base-f16.gguf");
    let mut checked = 0;
    for rel in ["llama-gqa/base-q4_0.gguf", "llama-gqa/base-q8_0.gguf", "llama-gqa/base-q4_0-mixed.gguf"] {
        let q = open(&fx, rel);
        for (i, t) in q.tensors().iter().enumerate() {
            if !matches!(t.ty, GgmlType::Q4_0 | GgmlType::Q8_0) {
                continue;
            }
            let (j, src) = f16.tensor(&t.name).unwrap();
            let row_len = src.row_len() as usize;
            let mut values = vec![0f32; src.n_elements() as usize];
            quant::dequantize_rows(src.ty, f16.tensor_data(j), row_len, &mut values).unwrap();
            let mut out = vec![0u8; t.nbytes as usize];
            quant::quantize_rows_par(t.ty, &values, row_len, &mut out, None).unwrap();
            assert!(out == q.tensor_data(i), "{rel}: {} differs", t.name);
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} tensors checked");
}

/// Copying every tensor of a real file (q6_K included) through the writer gives a file that reads back equal.
#[test]
fn copy_through_writer_preserves_everything() {
    let Some(fx) = Fixtures::get("copy_through_writer_preserves_everything") else { return };
    let src = open(&fx, "llama-gqa/base-q4_0-mixed.gguf");
    let dir = std::env::temp_dir().join(format!("ggml-lora-fixture-copy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("copy.gguf");
    let specs: Vec<TensorSpec> =
        src.tensors().iter().map(|t| TensorSpec { name: t.name.clone(), dims: t.dims.clone(), ty: t.ty }).collect();
    let mut w = GgufWriter::create(&out, &src.header().metadata, specs, WriteOptions { sync: false }).unwrap();
    for (i, t) in src.tensors().iter().enumerate() {
        w.write_tensor(&t.name, src.tensor_data(i)).unwrap();
    }
    w.finish().unwrap();
    // Same header, same layout: the copy is byte-identical to llama.cpp's file.
    assert!(std::fs::read(&out).unwrap() == src.bytes(), "copy differs from the source file");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The safetensors fixture's (name, shape, little-endian f32 bytes), found by scanning its JSON header.
fn safetensors_f32(bytes: &[u8]) -> Vec<(String, Vec<u64>, Vec<u8>)> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let numbers = |s: &str| -> Vec<u64> { s.split(',').map(|x| x.trim().parse().unwrap()).collect() };
    let mut out = Vec::new();
    for part in header.split("\"base_model").skip(1) {
        let name = format!("base_model{}", &part[..part.find('"').unwrap()]);
        let between = |a: &str| {
            let from = part.find(a).unwrap() + a.len();
            &part[from..from + part[from..].find(']').unwrap()]
        };
        assert!(part.contains("\"F32\""));
        let (shape, range) = (numbers(between("\"shape\":[")), numbers(between("\"data_offsets\":[")));
        out.push((name, shape, bytes[8 + n + range[0] as usize..8 + n + range[1] as usize].to_vec()));
    }
    out
}

/// The torch zip that `torch.save` wrote holds the same tensors as PEFT's safetensors file of the same adapter
/// (the core's bounded reader, against the safetensors header read here).
#[test]
fn torch_save_fixture_equals_the_safetensors_adapter() {
    let Some(fx) = Fixtures::get("torch_save_fixture_equals_the_safetensors_adapter") else { return };
    let tensors = read_torch_bin(&fx.path("llama-gqa/lora-r8/adapter-bin/adapter_model.bin")).unwrap();
    let safetensors = std::fs::read(fx.path("llama-gqa/lora-r8/adapter/adapter_model.safetensors")).unwrap();
    let mut expected = safetensors_f32(&safetensors);
    assert_eq!(tensors.len(), 28);
    // torch.save keeps the state dict's order; safetensors sorts by name
    let mut got: Vec<_> = tensors.into_iter().map(|t| (t.name, t.shape, t.data)).collect();
    assert_eq!(got[0].0, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    assert_eq!(got[0].1, [8, 256]);
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
}
