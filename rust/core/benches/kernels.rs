//! Throughput of the quantization kernels on a 4096x4096 f32 matrix, in MB/s of f32 (input for quantize, output
//! for dequantize), on a rayon pool of 1 thread and of 2 threads.
//!
//! Run: `cargo bench -p ggml-lora-core --bench kernels` (optionally `-- <filter>`, `ITERS=n`, `ROWS=n`).

use std::hint::black_box;
use std::time::Instant;

use ggml_lora_core::quant::{dequantize_rows_par, quantize_rows_par};
use ggml_lora_core::GgmlType;

const COLS: usize = 4096;

/// Median seconds of `iters` runs of `f` (after one warm-up run).
fn time(iters: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..iters)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    // ROWS=n shrinks the matrix, e.g. to see in-cache compute speed apart from memory bandwidth.
    let rows: usize = std::env::var("ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    let iters: usize = std::env::var("ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    // Weight-like data: a deterministic pseudo-random normal-ish distribution with a spread of magnitudes.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let src: Vec<f32> = (0..rows * COLS)
        .map(|_| {
            let mut s = 0.0f32;
            for _ in 0..3 {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                s += (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            s * 0.05
        })
        .collect();
    let mb = (rows * COLS * 4) as f64 / 1e6;
    let pool1 = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let pool2 = rayon::ThreadPoolBuilder::new().num_threads(2).build()?;
    println!("{rows}x{COLS} f32 ({mb:.1} MB), median of {iters} runs, MB/s of f32");
    println!("{:<18} {:>10} {:>10} {:>8}", "kernel", "1 thread", "2 threads", "scaling");
    for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::F16, GgmlType::BF16, GgmlType::F32] {
        let bytes = rows * ty.row_bytes(COLS as u64).unwrap() as usize;
        let mut q = vec![0u8; bytes];
        quantize_rows_par(ty, &src, COLS, &mut q, None)?;
        let mut back = vec![0f32; rows * COLS];
        for op in ["quantize", "dequantize"] {
            let name = format!("{ty} {op}");
            if filter.as_deref().is_some_and(|f| !name.contains(f)) {
                continue;
            }
            let mut run = |pool: &rayon::ThreadPool| {
                time(iters, || {
                    pool.install(|| {
                        if op == "quantize" {
                            quantize_rows_par(ty, black_box(&src), COLS, black_box(&mut q), None).unwrap()
                        } else {
                            dequantize_rows_par(ty, black_box(&q), COLS, black_box(&mut back)).unwrap()
                        }
                    })
                })
            };
            let t1 = run(&pool1);
            let t2 = run(&pool2);
            println!("{name:<18} {:>10.0} {:>10.0} {:>7.2}x", mb / t1, mb / t2, t1 / t2);
        }
    }
    Ok(())
}
