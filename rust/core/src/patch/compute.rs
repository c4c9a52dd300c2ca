//! The fused per-row kernel of the patch engine: dequantize the source rows, add the scaled low-rank
//! products, optionally round to an intermediate type, requantize, and gather quality statistics.

use std::cell::RefCell;

use rayon::prelude::*;

use super::kernel::{add_low_rank, row_sums, Sums};
use crate::error::{Error, Result};
use crate::quant;
use crate::types::GgmlType;

/// Rows handled together by one task: the `right` factor rows are loaded once per group.
pub const ROW_GROUP: usize = 4;

/// One scaled low-rank term `scale * left @ right` for a tensor.
pub struct Term<'a> {
    /// rows x rank, row-major.
    pub left: &'a [f32],
    /// rank x cols, row-major.
    pub right: &'a [f32],
    /// Inner dimension.
    pub rank: usize,
    /// llama.cpp's scale for this adapter and pair.
    pub scale: f32,
    /// DoRA magnitudes (one per row of the tensor) when the pair is DoRA; the plan makes such a term the only
    /// one of its tensor.
    pub magnitude: Option<&'a [f32]>,
}

/// What one chunk of rows needs.
pub struct ChunkJob<'a> {
    /// Source rows (the base's, or the model's), raw bytes of `src_ty`.
    pub src: &'a [u8],
    /// Type of `src`.
    pub src_ty: GgmlType,
    /// The model's own rows when they differ from `src` (a base was given), for the "retained" statistic.
    pub model: Option<(&'a [u8], GgmlType)>,
    /// Index of the chunk's first row in the tensor.
    pub first_row: usize,
    /// Row length.
    pub cols: usize,
    /// The low-rank terms (indexed by absolute row).
    pub terms: &'a [Term<'a>],
    /// Type written.
    pub out_ty: GgmlType,
    /// Round W' to this type before quantizing (F16 or BF16 reproduces the convert → quantize pipeline).
    pub intermediate: Option<GgmlType>,
    /// Importance weights for `out_ty`'s quantizer (one per column), when it takes them.
    pub imatrix: Option<&'a [f32]>,
}

#[derive(Default)]
struct Scratch {
    src: Vec<f32>,
    model: Vec<f32>,
    delta: Vec<f32>,
    patched: Vec<f32>,
    rounded: Vec<u8>,
    requant: Vec<f32>,
}

thread_local! {
    // Reused by every chunk a worker thread processes: no allocation (and no fresh-page faults) per tensor.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn resize(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Processes the chunk's rows in parallel, writing the output rows into `out` (rows x out row bytes), and
/// returns the chunk's sums.
pub fn process_chunk(job: &ChunkJob<'_>, out: &mut [u8]) -> Result<Sums> {
    let cols = job.cols;
    let src_row_bytes = job.src_ty.row_bytes(cols as u64).unwrap_or(0) as usize;
    let out_row_bytes = job.out_ty.row_bytes(cols as u64).unwrap_or(0) as usize;
    if src_row_bytes == 0 || out_row_bytes == 0 {
        return Err(Error::RowLength { ty: job.out_ty, row_len: cols, block: job.out_ty.block_size() });
    }
    let n_rows = job.src.len() / src_row_bytes;
    if out.len() != n_rows * out_row_bytes {
        return Err(Error::BufferSize {
            what: "patch output chunk",
            expected: n_rows * out_row_bytes,
            found: out.len(),
        });
    }
    out.par_chunks_mut(ROW_GROUP * out_row_bytes)
        .enumerate()
        .map(|(g, out_group)| {
            let row0 = g * ROW_GROUP;
            let rows = out_group.len() / out_row_bytes;
            SCRATCH.with(|s| process_group(job, &mut s.borrow_mut(), row0, rows, out_group))
        })
        .try_reduce(Sums::default, |a, b| Ok(a.combine(b)))
}

fn process_group(job: &ChunkJob<'_>, s: &mut Scratch, row0: usize, rows: usize, out: &mut [u8]) -> Result<Sums> {
    let cols = job.cols;
    let n = rows * cols;
    let src_row_bytes = job.src_ty.row_bytes(cols as u64).unwrap_or(0) as usize;
    let src = resize(&mut s.src, n);
    quant::dequantize_rows(job.src_ty, &job.src[row0 * src_row_bytes..(row0 + rows) * src_row_bytes], cols, src)?;

    // ΔW = Σ_t scale_t · (left_t @ right_t); W' = W_src + ΔW, summed term by term in f32 like llama.cpp
    // (each term: the rank-r product first, then the scale, then the add; see kernel.rs).
    let delta = resize(&mut s.delta, n);
    delta.fill(0.0);
    let patched = resize(&mut s.patched, n);
    patched.copy_from_slice(src);
    let first = job.first_row + row0;
    for term in job.terms {
        let left = &term.left[first * term.rank..(first + rows) * term.rank];
        add_low_rank(left, term.right, term.rank, cols, term.scale, patched, delta);
        if let Some(m) = term.magnitude {
            dora_rescale(&m[first..first + rows], cols, src, patched, delta);
        }
    }

    if let Some(ty) = job.intermediate.filter(|t| *t != GgmlType::F32) {
        let bytes = ty.row_bytes(n as u64).unwrap_or(0) as usize;
        if s.rounded.len() < bytes {
            s.rounded.resize(bytes, 0);
        }
        let rounded = &mut s.rounded[..bytes];
        quant::quantize_rows(ty, patched, n, rounded, None)?;
        quant::dequantize_rows(ty, rounded, n, patched)?;
    }

    let first_element = (job.first_row + row0) * cols;
    quant::quantize_rows(job.out_ty, patched, cols, out, job.imatrix).map_err(|e| match e {
        // Report the element's index in the whole tensor, not in this group of rows.
        Error::NonFinite { ty, index, value } => Error::NonFinite { ty, index: first_element + index, value },
        other => other,
    })?;
    let requant = resize(&mut s.requant, n);
    quant::dequantize_rows(job.out_ty, out, cols, requant)?;

    let model: &[f32] = match job.model {
        Some((bytes, ty)) => {
            let rb = ty.row_bytes(cols as u64).unwrap_or(0) as usize;
            let m = resize(&mut s.model, n);
            quant::dequantize_rows(ty, &bytes[(row0) * rb..(row0 + rows) * rb], cols, m)?;
            m
        }
        None => src,
    };
    let sums = row_sums(src, delta, requant, model, cols);
    Ok(sums)
}

/// PEFT's DoRA merge (`DoraLinearVariant.merge_safe`) on rows already holding `W + ΔW`:
/// `W' = m_row / ‖W + ΔW‖_row · (W + ΔW)` (f32 multiply, the norm accumulated in f64 and rounded to f32, as
/// torch's f32 `linalg.norm` gives the correctly rounded value up to an ulp). `delta` becomes `W' − W` so the
/// quality report measures the change DoRA actually asks for.
fn dora_rescale(magnitudes: &[f32], cols: usize, src: &[f32], patched: &mut [f32], delta: &mut [f32]) {
    for (r, &m) in magnitudes.iter().enumerate() {
        let row = r * cols..(r + 1) * cols;
        let norm = patched[row.clone()].iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt() as f32;
        let factor = m / norm;
        for ((p, d), &w) in patched[row.clone()].iter_mut().zip(&mut delta[row.clone()]).zip(&src[row]) {
            *p *= factor;
            *d = *p - w;
        }
    }
}

#[cfg(test)]
mod tests {
    //! One chunk of rows against a float64 reference computed here: W' = W + Σ s·(left @ right) (DoRA: the row
    //! rescaled to its magnitude), q8_0 blocks decoded by hand (f16 scale, 32 signed bytes) and bounded by half a
    //! step, f16 rounding checked with the `half` crate, and the quality sums recomputed in f64.
    use super::super::test_util::{quality_sums_f64, sums_array};
    use super::*;

    const ROWS: usize = 9; // not a multiple of ROW_GROUP: the last group is short
    const COLS: usize = 64; // two q8_0 blocks
    const RANK: usize = 8;
    const FIRST_ROW: usize = 3; // the chunk starts inside the tensor: the terms are indexed by absolute row

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    struct Inputs {
        w: Vec<f32>,
        lefts: Vec<Vec<f32>>,
        rights: Vec<Vec<f32>>,
        scales: Vec<f32>,
    }

    /// The chunk's source rows (f32) and two low-rank terms over `FIRST_ROW + ROWS` tensor rows.
    fn inputs(seed: u64) -> Inputs {
        let mut seed = seed;
        let w = (0..ROWS * COLS).map(|_| 4.0 * lcg(&mut seed)).collect();
        let lefts = (0..2).map(|_| (0..(FIRST_ROW + ROWS) * RANK).map(|_| lcg(&mut seed)).collect()).collect();
        let rights = (0..2).map(|_| (0..RANK * COLS).map(|_| lcg(&mut seed)).collect()).collect();
        Inputs { w, lefts, rights, scales: vec![0.75, -1.5] }
    }

    impl Inputs {
        fn terms(&self) -> Vec<Term<'_>> {
            (0..2)
                .map(|t| Term {
                    left: &self.lefts[t],
                    right: &self.rights[t],
                    rank: RANK,
                    scale: self.scales[t],
                    magnitude: None,
                })
                .collect()
        }

        fn src_bytes(&self) -> Vec<u8> {
            self.w.iter().flat_map(|v| v.to_le_bytes()).collect()
        }

        /// (ΔW in f64, a bound on the f32 rounding of W' = W + ΔW) per element.
        fn reference(&self) -> (Vec<f64>, Vec<f64>) {
            let mut delta = vec![0f64; ROWS * COLS];
            let mut bound = vec![0f64; ROWS * COLS];
            for r in 0..ROWS {
                for c in 0..COLS {
                    let i = r * COLS + c;
                    let mut magnitude = f64::from(self.w[i].abs());
                    for t in 0..2 {
                        let (mut dot, mut abs) = (0f64, 0f64);
                        for k in 0..RANK {
                            let p = f64::from(self.lefts[t][(FIRST_ROW + r) * RANK + k])
                                * f64::from(self.rights[t][k * COLS + c]);
                            dot += p;
                            abs += p.abs();
                        }
                        delta[i] += f64::from(self.scales[t]) * dot;
                        magnitude += f64::from(self.scales[t].abs()) * abs;
                    }
                    // Each term: RANK products and adds, the scale and the add to W', each rounded once in f32.
                    bound[i] = (2 * (RANK + 3)) as f64 * f64::from(f32::EPSILON) * magnitude;
                }
            }
            (delta, bound)
        }
    }

    fn run(job: &ChunkJob<'_>, row_bytes: usize) -> (Vec<u8>, Sums) {
        let mut out = vec![0u8; ROWS * row_bytes];
        let sums = process_chunk(job, &mut out).expect("chunk");
        (out, sums)
    }

    fn job<'a>(src: &'a [u8], terms: &'a [Term<'a>], out_ty: GgmlType) -> ChunkJob<'a> {
        ChunkJob {
            src,
            src_ty: GgmlType::F32,
            model: None,
            first_row: FIRST_ROW,
            cols: COLS,
            terms,
            out_ty,
            intermediate: None,
            imatrix: None,
        }
    }

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    /// q8_0 by hand: each block of 34 bytes is an f16 scale d and 32 signed codes; value = d · code.
    fn decode_q8_0(bytes: &[u8]) -> (Vec<f64>, Vec<f64>) {
        let mut values = Vec::new();
        let mut steps = Vec::new();
        for block in bytes.chunks_exact(34) {
            let d = f64::from(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
            for &q in &block[2..] {
                values.push(d * f64::from(q as i8));
                steps.push(d);
            }
        }
        (values, steps)
    }

    fn assert_sums(got: Sums, expected: [f64; 6], rel: f64) {
        let got = sums_array(got);
        for (field, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!((g - e).abs() <= rel * (e.abs() + expected[0] + expected[1]), "sum {field}: {g} vs {e}");
        }
    }

    #[test]
    fn f32_output_is_w_plus_the_scaled_products() {
        let inputs = inputs(1);
        let (src, terms) = (inputs.src_bytes(), inputs.terms());
        let (out, sums) = run(&job(&src, &terms, GgmlType::F32), COLS * 4);
        let (delta, bound) = inputs.reference();
        let got = f32s(&out);
        for i in 0..ROWS * COLS {
            let expected = f64::from(inputs.w[i]) + delta[i];
            assert!((f64::from(got[i]) - expected).abs() <= bound[i], "element {i}: {} vs {expected}", got[i]);
        }
        // Q = W' up to f32 rounding: the change is all there.
        let w: Vec<f64> = inputs.w.iter().map(|&v| f64::from(v)).collect();
        let q: Vec<f64> = got.iter().map(|&v| f64::from(v)).collect();
        assert_sums(sums, quality_sums_f64(&w, &delta, &q, &w), 1e-5);
    }

    #[test]
    fn q8_0_output_is_within_half_a_step_of_the_reference() {
        let inputs = inputs(2);
        let (src, terms) = (inputs.src_bytes(), inputs.terms());
        let (out, sums) = run(&job(&src, &terms, GgmlType::Q8_0), COLS / 32 * 34);
        let (delta, bound) = inputs.reference();
        let (q, steps) = decode_q8_0(&out);
        let w: Vec<f64> = inputs.w.iter().map(|&v| f64::from(v)).collect();
        for (b, block) in q.chunks_exact(32).enumerate() {
            let range = b * 32..(b + 1) * 32;
            let amax = range.clone().map(|i| (w[i] + delta[i]).abs()).fold(0f64, f64::max);
            // d = amax / 127 rounded to f16 (11 significant bits).
            let d = steps[b * 32];
            assert!((d - amax / 127.0).abs() <= d * 2f64.powi(-11) + 1e-6, "block {b}: d {d}, amax {amax}");
            for (j, &value) in block.iter().enumerate() {
                let i = b * 32 + j;
                let error = (value - (w[i] + delta[i])).abs();
                // Half a step (of the f32 value before rounding; the f16 scale moves the grid by at most 127 ·
                // its rounding error).
                assert!(error <= d / 2.0 + 127.0 * d * 2f64.powi(-11) + bound[i], "element {i}: off by {error}");
            }
        }
        assert_sums(sums, quality_sums_f64(&w, &delta, &q, &w), 1e-5);
    }

    #[test]
    fn an_intermediate_f16_rounds_w_prime_before_the_output_type() {
        let inputs = inputs(3);
        let (src, terms) = (inputs.src_bytes(), inputs.terms());
        let job = ChunkJob { intermediate: Some(GgmlType::F16), ..job(&src, &terms, GgmlType::F32) };
        let (out, _) = run(&job, COLS * 4);
        let (delta, bound) = inputs.reference();
        for (i, &v) in f32s(&out).iter().enumerate() {
            assert_eq!(half::f16::from_f32(v).to_f32().to_bits(), v.to_bits(), "element {i} is not an f16 value");
            let expected = f64::from(inputs.w[i]) + delta[i];
            // Round to nearest f16: at most half an f16 ulp (2^-11 relative) from the f32 W'.
            assert!((f64::from(v) - expected).abs() <= expected.abs() * 2f64.powi(-11) + bound[i], "element {i}");
        }
    }

    #[test]
    fn the_model_term_of_the_sums_uses_the_models_rows_when_given() {
        let inputs = inputs(4);
        let (src, terms) = (inputs.src_bytes(), inputs.terms());
        // The model's rows differ from the source (as with a base): W_model = W + 0.125.
        let model: Vec<f32> = inputs.w.iter().map(|v| v + 0.125).collect();
        let model_bytes: Vec<u8> = model.iter().flat_map(|v| v.to_le_bytes()).collect();
        let job = ChunkJob { model: Some((&model_bytes, GgmlType::F32)), ..job(&src, &terms, GgmlType::F32) };
        let (out, sums) = run(&job, COLS * 4);
        let (delta, _) = inputs.reference();
        let w: Vec<f64> = inputs.w.iter().map(|&v| f64::from(v)).collect();
        let q: Vec<f64> = f32s(&out).iter().map(|&v| f64::from(v)).collect();
        let m: Vec<f64> = model.iter().map(|&v| f64::from(v)).collect();
        assert_sums(sums, quality_sums_f64(&w, &delta, &q, &m), 1e-5);
    }

    #[test]
    fn dora_rescales_each_row_to_its_magnitude() {
        let inputs = inputs(5);
        let src = inputs.src_bytes();
        let magnitudes: Vec<f32> = (0..FIRST_ROW + ROWS).map(|r| 0.5 + r as f32 * 0.25).collect();
        let terms = [Term {
            left: &inputs.lefts[0],
            right: &inputs.rights[0],
            rank: RANK,
            scale: 1.0,
            magnitude: Some(&magnitudes),
        }];
        let (out, sums) = run(&job(&src, &terms, GgmlType::F32), COLS * 4);
        let got = f32s(&out);
        let mut delta = vec![0f64; ROWS * COLS];
        for r in 0..ROWS {
            let row: Vec<f64> = (0..COLS)
                .map(|c| {
                    let dot: f64 = (0..RANK)
                        .map(|k| {
                            f64::from(inputs.lefts[0][(FIRST_ROW + r) * RANK + k])
                                * f64::from(inputs.rights[0][k * COLS + c])
                        })
                        .sum();
                    f64::from(inputs.w[r * COLS + c]) + dot
                })
                .collect();
            let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            let factor = f64::from(magnitudes[FIRST_ROW + r]) / norm;
            for (c, &value) in row.iter().enumerate() {
                let i = r * COLS + c;
                let expected = factor * value;
                assert!((f64::from(got[i]) - expected).abs() <= 1e-5 * (1.0 + expected.abs()), "element {i}");
                delta[i] = expected - f64::from(inputs.w[i]);
            }
            // The row's norm is its magnitude.
            let out_norm = got[r * COLS..(r + 1) * COLS].iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
            assert!((out_norm - f64::from(magnitudes[FIRST_ROW + r])).abs() <= 1e-5, "row {r}");
        }
        let w: Vec<f64> = inputs.w.iter().map(|&v| f64::from(v)).collect();
        let q: Vec<f64> = got.iter().map(|&v| f64::from(v)).collect();
        assert_sums(sums, quality_sums_f64(&w, &delta, &q, &w), 1e-4);
    }

    #[test]
    fn a_non_finite_result_names_its_index_in_the_whole_tensor() {
        let mut inputs = inputs(6);
        // Row 5 of the chunk (tensor row FIRST_ROW + 5), column 7: f32::MAX plus a positive change overflows.
        inputs.w[5 * COLS + 7] = f32::MAX;
        inputs.rights[0].iter_mut().for_each(|v| *v = v.abs() * 1e36);
        inputs.lefts[0].iter_mut().for_each(|v| *v = v.abs() + 1.0);
        inputs.scales = vec![1.0, 0.0];
        let (src, terms) = (inputs.src_bytes(), inputs.terms());
        let mut out = vec![0u8; ROWS * COLS / 32 * 34];
        match process_chunk(&job(&src, &terms, GgmlType::Q8_0), &mut out) {
            Err(Error::NonFinite { ty, index, value }) => {
                assert_eq!((ty, index), (GgmlType::Q8_0, (FIRST_ROW + 5) * COLS + 7));
                assert!(value.is_infinite());
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
        let mut short = vec![0u8; 10];
        assert!(matches!(
            process_chunk(&job(&src, &terms, GgmlType::Q8_0), &mut short),
            Err(Error::BufferSize { expected, found: 10, .. }) if expected == ROWS * COLS / 32 * 34
        ));
    }
}
