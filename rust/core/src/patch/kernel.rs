//! The arithmetic inner loops of the patch engine: the fused low-rank add and the quality sums.
//!
//! These are the portable versions, written over fixed-width tiles so the compiler keeps the accumulators in
//! registers and vectorizes them. On x86-64 the explicit-SIMD versions (AVX2, AVX-512F) in
//! `quant/x86/lowrank.rs`, the crate's one home for `unsafe` intrinsics, are taken when the CPU has the feature;
//! they hand the leftover rows and columns back to the code here. No version uses FMA and all perform the same
//! f32 operations in the same order, so the output does not depend on the CPU it runs on.

/// For each of `rows` rows r: `patched[r] += scale · (left[r] @ right)` and `delta[r] += the same`, where
/// `left` holds `rows × rank` and `right` `rank × cols` (row-major). The product is summed over k in order
/// (0..rank), then scaled, then added: llama.cpp's order (mul_mat, scale, add).
pub fn add_low_rank(
    left: &[f32],
    right: &[f32],
    rank: usize,
    cols: usize,
    scale: f32,
    patched: &mut [f32],
    delta: &mut [f32],
) {
    let rows = patched.len() / cols.max(1);
    assert!(left.len() >= rows * rank && right.len() >= rank * cols && delta.len() == patched.len());
    #[cfg(target_arch = "x86_64")]
    if let Some((done_rows, done_cols)) =
        crate::quant::x86::lowrank::add_low_rank_tiles(left, right, rank, cols, scale, patched, delta)
    {
        add_low_rank_rest(left, right, rank, cols, scale, patched, delta, (done_rows, done_cols));
        return;
    }
    add_low_rank_body::<16, 2>(left, right, rank, cols, scale, patched, delta);
}

/// What the SIMD tiles left out, given the `(rows, columns)` they covered from row 0 and column 0: the columns
/// after `done_cols` of the covered rows, then every later row, with the portable code (each element gets the
/// same operations either way, so the order of the pieces does not matter).
#[allow(clippy::too_many_arguments)] // the low-rank add's arguments and the covered block
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn add_low_rank_rest(
    left: &[f32],
    right: &[f32],
    rank: usize,
    cols: usize,
    scale: f32,
    patched: &mut [f32],
    delta: &mut [f32],
    (done_rows, done_cols): (usize, usize),
) {
    if done_cols < cols {
        for r in 0..done_rows {
            let row = r * cols..(r + 1) * cols;
            let coefs = &left[r * rank..(r + 1) * rank];
            tail_columns(coefs, right, cols, done_cols, scale, &mut patched[row.clone()], &mut delta[row]);
        }
    }
    let rest = done_rows * cols;
    add_low_rank_body::<16, 1>(
        &left[done_rows * rank..],
        right,
        rank,
        cols,
        scale,
        &mut patched[rest..],
        &mut delta[rest..],
    );
}

/// Columns `from..cols` of one row, scalar.
#[inline(always)]
fn tail_columns(coefs: &[f32], right: &[f32], cols: usize, from: usize, scale: f32, p: &mut [f32], d: &mut [f32]) {
    for c in from..cols {
        let mut acc = 0f32;
        for (k, &coef) in coefs.iter().enumerate() {
            acc += coef * right[k * cols + c];
        }
        let v = scale * acc;
        p[c] += v;
        d[c] += v;
    }
}

#[inline(always)]
fn add_low_rank_body<const W: usize, const R: usize>(
    left: &[f32],
    right: &[f32],
    rank: usize,
    cols: usize,
    scale: f32,
    patched: &mut [f32],
    delta: &mut [f32],
) {
    let rows = patched.len() / cols;
    let mut r = 0;
    // R rows per pass share every load of `right` (R x W accumulators stay in registers); leftover rows go one
    // at a time. Each element's arithmetic is the same whatever W and R are.
    while r + R <= rows {
        let p_rows: [&mut [f32]; R] = split_rows(&mut patched[r * cols..(r + R) * cols], cols);
        let d_rows: [&mut [f32]; R] = split_rows(&mut delta[r * cols..(r + R) * cols], cols);
        let coefs: [&[f32]; R] = std::array::from_fn(|i| &left[(r + i) * rank..(r + i + 1) * rank]);
        low_rank_rows::<W, R>(coefs, right, cols, scale, p_rows, d_rows);
        r += R;
    }
    while r < rows {
        let p = &mut patched[r * cols..(r + 1) * cols];
        let d = &mut delta[r * cols..(r + 1) * cols];
        low_rank_rows::<W, 1>([&left[r * rank..(r + 1) * rank]], right, cols, scale, [p], [d]);
        r += 1;
    }
}

/// Splits `R * cols` values into `R` rows.
#[inline(always)]
fn split_rows<const R: usize>(mut values: &mut [f32], cols: usize) -> [&mut [f32]; R] {
    std::array::from_fn(|_| {
        let (row, rest) = std::mem::take(&mut values).split_at_mut(cols);
        values = rest;
        row
    })
}

#[inline(always)]
fn low_rank_rows<const W: usize, const R: usize>(
    coefs: [&[f32]; R],
    right: &[f32],
    cols: usize,
    scale: f32,
    mut patched: [&mut [f32]; R],
    mut delta: [&mut [f32]; R],
) {
    let rank = coefs[0].len();
    // Coefficients regrouped by k, so the hot loop below has only constant bounds: the compiler unrolls it and
    // keeps all R x W accumulators in registers.
    let by_k: Vec<[f32; R]> = (0..rank).map(|k| std::array::from_fn(|i| coefs[i][k])).collect();
    let full = cols / W * W;
    let mut c0 = 0;
    while c0 < full {
        let mut acc = [[0f32; W]; R];
        for (k, c) in by_k.iter().enumerate() {
            let b: &[f32; W] = right[k * cols + c0..k * cols + c0 + W].try_into().expect("tile in range");
            for i in 0..R {
                for j in 0..W {
                    acc[i][j] += c[i] * b[j];
                }
            }
        }
        for ((acc, p), d) in acc.iter().zip(patched.iter_mut()).zip(delta.iter_mut()) {
            for j in 0..W {
                let v = scale * acc[j];
                p[c0 + j] += v;
                d[c0 + j] += v;
            }
        }
        c0 += W;
    }
    for ((coefs, p), d) in coefs.iter().zip(patched.iter_mut()).zip(delta.iter_mut()) {
        tail_columns(coefs, right, cols, full, scale, p, d);
    }
}

/// Sums over a tensor from which the quality report is derived: f32 lanes within a row, f64 across rows
/// (exact enough at 1e9 elements). Q = dequant(output), W' = W_src + ΔW, W_model = the model's own tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sums {
    /// Σ ΔW²
    pub delta_sq: f64,
    /// Σ W_src²
    pub src_sq: f64,
    /// Σ (Q − W_src)·ΔW
    pub applied_dot_delta: f64,
    /// Σ (Q − W_src)²
    pub applied_sq: f64,
    /// Σ (Q − W_src − ΔW)²
    pub error_sq: f64,
    /// Σ (Q − W_model)·ΔW
    pub vs_model_dot_delta: f64,
}

impl Sums {
    /// From the six sums in field order (how the kernels accumulate them).
    fn from_array([delta_sq, src_sq, applied_dot_delta, applied_sq, error_sq, vs_model_dot_delta]: [f64; 6]) -> Sums {
        Sums { delta_sq, src_sq, applied_dot_delta, applied_sq, error_sq, vs_model_dot_delta }
    }

    /// Element-wise sum (sums of disjoint row ranges combine by addition).
    pub fn combine(self, o: Sums) -> Sums {
        Sums {
            delta_sq: self.delta_sq + o.delta_sq,
            src_sq: self.src_sq + o.src_sq,
            applied_dot_delta: self.applied_dot_delta + o.applied_dot_delta,
            applied_sq: self.applied_sq + o.applied_sq,
            error_sq: self.error_sq + o.error_sq,
            vs_model_dot_delta: self.vs_model_dot_delta + o.vs_model_dot_delta,
        }
    }
}

/// Sums over `rows` rows of `cols` values: `src` = W_src, `delta` = ΔW, `requant` = Q, `model` = W_model.
pub fn row_sums(src: &[f32], delta: &[f32], requant: &[f32], model: &[f32], cols: usize) -> Sums {
    #[cfg(target_arch = "x86_64")]
    if let Some(sums) = crate::quant::x86::lowrank::row_sums(src, delta, requant, model, cols, add_row_tail) {
        return Sums::from_array(sums);
    }
    row_sums_body(src, delta, requant, model, cols)
}

const LANES: usize = 8;

#[inline(always)]
fn row_sums_body(src: &[f32], delta: &[f32], requant: &[f32], model: &[f32], cols: usize) -> Sums {
    let mut total = Sums::default();
    let n = src.len();
    assert!(delta.len() == n && requant.len() == n && model.len() == n && cols > 0);
    let rows = src.chunks(cols).zip(delta.chunks(cols)).zip(requant.chunks(cols)).zip(model.chunks(cols));
    for (((w, d), q), m) in rows {
        // Six accumulators of LANES f32 each: independent lanes, so no reassociation is needed to vectorize.
        let (mut s0, mut s1, mut s2, mut s3, mut s4, mut s5) =
            ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
        let lanes = |x: &[f32]| -> [f32; LANES] { x.try_into().expect("chunk of LANES") };
        let chunks =
            w.chunks_exact(LANES).zip(d.chunks_exact(LANES)).zip(q.chunks_exact(LANES)).zip(m.chunks_exact(LANES));
        for (((w, d), q), m) in chunks {
            let (w, d, q, m) = (lanes(w), lanes(d), lanes(q), lanes(m));
            for j in 0..LANES {
                let applied = q[j] - w[j];
                let error = applied - d[j];
                let vs_model = q[j] - m[j];
                s0[j] += d[j] * d[j];
                s1[j] += w[j] * w[j];
                s2[j] += applied * d[j];
                s3[j] += applied * applied;
                s4[j] += error * error;
                s5[j] += vs_model * d[j];
            }
        }
        let mut row = [0f64; 6];
        for (s, lanes) in row.iter_mut().zip([s0, s1, s2, s3, s4, s5].iter()) {
            *s = lanes.iter().map(|&v| v as f64).sum();
        }
        let tail = w.len() / LANES * LANES;
        let row = add_row_tail(&w[tail..], &d[tail..], &q[tail..], &m[tail..], row);
        total = total.combine(Sums::from_array(row));
    }
    total
}

/// Adds the sums of a row's last elements, those that do not fill the f32 lanes, to the row's sums `row` (in
/// field order), in f64, element by element. Shared with the SIMD version, which hands it the same elements.
fn add_row_tail(w: &[f32], d: &[f32], q: &[f32], m: &[f32], mut row: [f64; 6]) -> [f64; 6] {
    for i in 0..w.len() {
        let (w, d, q, m) = (w[i] as f64, d[i] as f64, q[i] as f64, m[i] as f64);
        row[0] += d * d;
        row[1] += w * w;
        row[2] += (q - w) * d;
        row[3] += (q - w) * (q - w);
        row[4] += (q - w - d) * (q - w - d);
        row[5] += (q - m) * d;
    }
    row
}

#[cfg(test)]
mod tests {
    //! Oracles: a plain triple loop in f32 (the low-rank add, bit for bit: the order of operations is specified),
    //! f64 sums written out here (the quality sums, within a tolerance), and the portable code for the SIMD
    //! versions (bit for bit).
    use super::super::test_util::{quality_sums_f64, sums_array};
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// (rows, rank, cols): leftover rows and columns for both tile widths (16 and 32), and rows shorter than a tile.
    const LOW_RANK_SHAPES: [(usize, usize, usize); 9] =
        [(4, 16, 64), (3, 1, 37), (1, 5, 16), (2, 8, 15), (7, 16, 100), (9, 3, 70), (8, 2, 96), (6, 8, 80), (4, 4, 48)];

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn low_rank_add_matches_a_plain_triple_loop_bit_for_bit() {
        let mut seed = 7;
        for (rows, rank, cols) in LOW_RANK_SHAPES {
            let left: Vec<f32> = (0..rows * rank).map(|_| lcg(&mut seed)).collect();
            let right: Vec<f32> = (0..rank * cols).map(|_| lcg(&mut seed)).collect();
            let src: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
            let mut patched = src.clone();
            let mut delta = vec![0.5f32; rows * cols];
            add_low_rank(&left, &right, rank, cols, 0.75, &mut patched, &mut delta);
            let mut portable_p = src.clone();
            let mut portable_d = vec![0.5f32; rows * cols];
            add_low_rank_body::<16, 2>(&left, &right, rank, cols, 0.75, &mut portable_p, &mut portable_d);
            for r in 0..rows {
                for c in 0..cols {
                    let mut acc = 0f32;
                    for k in 0..rank {
                        acc += left[r * rank + k] * right[k * cols + c];
                    }
                    let i = r * cols + c;
                    assert_eq!(patched[i].to_bits(), (src[i] + 0.75 * acc).to_bits(), "({rows},{rank},{cols}) at {i}");
                    assert_eq!(delta[i].to_bits(), (0.5 + 0.75 * acc).to_bits());
                    assert_eq!(portable_p[i].to_bits(), patched[i].to_bits());
                    assert_eq!(portable_d[i].to_bits(), delta[i].to_bits());
                }
            }
        }
    }

    /// The AVX2 tiles plus the portable rest give the portable bits; the AVX-512 tiles too when the CPU has
    /// AVX-512F, and decline when it does not. Fails (rather than comparing the portable code with itself) on an
    /// x86-64 CPU without AVX2 or when the AVX2 entry point does not run.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_low_rank_tiles_equal_the_portable_code() {
        use crate::quant::test_util::NO_SIMD;
        use crate::quant::x86::lowrank::{add_low_rank_tiles_with, LowRankIsa};
        let mut seed = 11;
        for (rows, rank, cols) in LOW_RANK_SHAPES {
            let left: Vec<f32> = (0..rows * rank).map(|_| lcg(&mut seed)).collect();
            let right: Vec<f32> = (0..rank * cols).map(|_| lcg(&mut seed)).collect();
            let src: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
            let (mut portable_p, mut portable_d) = (src.clone(), vec![0.5f32; rows * cols]);
            add_low_rank_body::<16, 2>(&left, &right, rank, cols, -1.25, &mut portable_p, &mut portable_d);
            for isa in [LowRankIsa::Avx2, LowRankIsa::Avx512] {
                let (mut p, mut d) = (src.clone(), vec![0.5f32; rows * cols]);
                let Some(done) = add_low_rank_tiles_with(isa, &left, &right, rank, cols, -1.25, &mut p, &mut d) else {
                    match isa {
                        LowRankIsa::Avx2 => panic!("{NO_SIMD}"),
                        LowRankIsa::Avx512 => {
                            assert!(!is_x86_feature_detected!("avx512f"), "AVX-512F present but its tiles not taken");
                            continue;
                        }
                    }
                };
                assert_eq!(
                    done,
                    (rows / 4 * 4, cols / isa.tile_cols() * isa.tile_cols()),
                    "{isa:?} covers whole tiles"
                );
                add_low_rank_rest(&left, &right, rank, cols, -1.25, &mut p, &mut d, done);
                let same = (bits(&p), bits(&d)) == (bits(&portable_p), bits(&portable_d));
                assert!(same, "{isa:?} ({rows},{rank},{cols})");
            }
        }
    }

    fn random_rows(seed: &mut u64, rows: usize, cols: usize) -> [Vec<f32>; 4] {
        std::array::from_fn(|_| (0..rows * cols).map(|_| lcg(seed)).collect())
    }

    #[test]
    fn row_sums_agree_with_f64_sums() {
        let mut seed = 3;
        let (rows, cols) = (3, 45);
        let [w, d, q, m] = random_rows(&mut seed, rows, cols);
        let s = row_sums(&w, &d, &q, &m, cols);
        let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        let exact = quality_sums_f64(&f64s(&w), &f64s(&d), &f64s(&q), &f64s(&m));
        let got = sums_array(s);
        for (g, e) in got.iter().zip(exact) {
            // 45 f32 products per row in 8 lanes, each rounded once per add: far below 1e-5 relative.
            assert!((g - e).abs() <= 1e-5 * e.abs().max(1.0), "{g} vs {e}");
        }
    }

    /// The AVX2 quality sums equal the portable ones bit for bit, rows whose length is not a multiple of 8
    /// included. Fails on an x86-64 CPU without AVX2 (rather than comparing the portable code with itself).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_row_sums_equal_the_portable_code() {
        let mut seed = 5;
        for (rows, cols) in [(3, 45), (4, 64), (2, 7), (5, 2048 + 3)] {
            let [w, d, q, m] = random_rows(&mut seed, rows, cols);
            let simd = crate::quant::x86::lowrank::row_sums(&w, &d, &q, &m, cols, add_row_tail)
                .expect(crate::quant::test_util::NO_SIMD);
            let portable = row_sums_body(&w, &d, &q, &m, cols);
            let simd = Sums::from_array(simd);
            assert_eq!(format!("{simd:?}"), format!("{portable:?}"), "({rows},{cols})");
            assert_eq!(simd, portable, "({rows},{cols})");
        }
    }
}
