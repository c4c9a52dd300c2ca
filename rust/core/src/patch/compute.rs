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
