//! The arithmetic inner loops of the patch engine: the fused low-rank add and the quality sums.
//!
//! Both are written over fixed-width tiles so the compiler keeps the accumulators in registers and vectorizes
//! them; on x86-64 the same source is also compiled with AVX2 enabled and chosen at run time. Neither version
//! uses FMA and both perform the same f32 operations in the same order, so the output does not depend on the
//! CPU it runs on.

/// Columns per register tile.
const TILE: usize = 16;

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
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available (checked just above); the function is safe Rust compiled with AVX2 enabled.
        unsafe { add_low_rank_avx2(left, right, rank, cols, scale, patched, delta) };
        return;
    }
    add_low_rank_body(left, right, rank, cols, scale, patched, delta);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_low_rank_avx2(
    left: &[f32],
    right: &[f32],
    rank: usize,
    cols: usize,
    scale: f32,
    patched: &mut [f32],
    delta: &mut [f32],
) {
    add_low_rank_body(left, right, rank, cols, scale, patched, delta)
}

#[inline(always)]
fn add_low_rank_body(
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
    // Two rows per pass share every load of `right`; an odd last row goes alone. Each element's arithmetic
    // is the same either way.
    while r + 2 <= rows {
        let (p0, p1) = patched[r * cols..(r + 2) * cols].split_at_mut(cols);
        let (d0, d1) = delta[r * cols..(r + 2) * cols].split_at_mut(cols);
        let c0 = &left[r * rank..(r + 1) * rank];
        let c1 = &left[(r + 1) * rank..(r + 2) * rank];
        low_rank_rows::<2>([c0, c1], right, cols, scale, [p0, p1], [d0, d1]);
        r += 2;
    }
    if r < rows {
        let p = &mut patched[r * cols..(r + 1) * cols];
        let d = &mut delta[r * cols..(r + 1) * cols];
        low_rank_rows::<1>([&left[r * rank..(r + 1) * rank]], right, cols, scale, [p], [d]);
    }
}

#[inline(always)]
fn low_rank_rows<const R: usize>(
    coefs: [&[f32]; R],
    right: &[f32],
    cols: usize,
    scale: f32,
    mut patched: [&mut [f32]; R],
    mut delta: [&mut [f32]; R],
) {
    let rank = coefs[0].len();
    let full = cols / TILE * TILE;
    let mut c0 = 0;
    while c0 < full {
        let mut acc = [[0f32; TILE]; R];
        for k in 0..rank {
            let b: &[f32; TILE] = right[k * cols + c0..k * cols + c0 + TILE].try_into().expect("tile in range");
            for (acc, coefs) in acc.iter_mut().zip(coefs.iter()) {
                let coef = coefs[k];
                for j in 0..TILE {
                    acc[j] += coef * b[j];
                }
            }
        }
        for ((acc, p), d) in acc.iter().zip(patched.iter_mut()).zip(delta.iter_mut()) {
            for j in 0..TILE {
                let v = scale * acc[j];
                p[c0 + j] += v;
                d[c0 + j] += v;
            }
        }
        c0 += TILE;
    }
    for c in full..cols {
        for ((coefs, p), d) in coefs.iter().zip(patched.iter_mut()).zip(delta.iter_mut()) {
            let mut acc = 0f32;
            for (k, &coef) in coefs.iter().enumerate() {
                acc += coef * right[k * cols + c];
            }
            let v = scale * acc;
            p[c] += v;
            d[c] += v;
        }
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
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available (checked just above); the function is safe Rust compiled with AVX2 enabled.
        return unsafe { row_sums_avx2(src, delta, requant, model, cols) };
    }
    row_sums_body(src, delta, requant, model, cols)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_sums_avx2(src: &[f32], delta: &[f32], requant: &[f32], model: &[f32], cols: usize) -> Sums {
    use std::arch::x86_64::*;
    let n = src.len();
    assert!(delta.len() == n && requant.len() == n && model.len() == n && cols > 0);
    let mut total = Sums::default();
    let mut start = 0;
    while start < n {
        let end = (start + cols).min(n);
        let full = start + (end - start) / LANES * LANES;
        let mut acc = [_mm256_setzero_ps(); 6];
        let mut i = start;
        while i < full {
            // SAFETY: i + LANES <= full <= n and all four slices hold n elements, so each 8-lane unaligned load
            // reads inside its slice.
            let (w, d, q, m) = unsafe {
                (
                    _mm256_loadu_ps(src.as_ptr().add(i)),
                    _mm256_loadu_ps(delta.as_ptr().add(i)),
                    _mm256_loadu_ps(requant.as_ptr().add(i)),
                    _mm256_loadu_ps(model.as_ptr().add(i)),
                )
            };
            let applied = _mm256_sub_ps(q, w);
            let error = _mm256_sub_ps(applied, d);
            let vs_model = _mm256_sub_ps(q, m);
            acc[0] = _mm256_add_ps(acc[0], _mm256_mul_ps(d, d));
            acc[1] = _mm256_add_ps(acc[1], _mm256_mul_ps(w, w));
            acc[2] = _mm256_add_ps(acc[2], _mm256_mul_ps(applied, d));
            acc[3] = _mm256_add_ps(acc[3], _mm256_mul_ps(applied, applied));
            acc[4] = _mm256_add_ps(acc[4], _mm256_mul_ps(error, error));
            acc[5] = _mm256_add_ps(acc[5], _mm256_mul_ps(vs_model, d));
            i += LANES;
        }
        let mut row = [0f64; 6];
        for (s, v) in row.iter_mut().zip(acc) {
            let mut lanes = [0f32; LANES];
            // SAFETY: `lanes` holds exactly 8 f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
            *s = lanes.iter().map(|&x| x as f64).sum();
        }
        total = total.combine(Sums {
            delta_sq: row[0],
            src_sq: row[1],
            applied_dot_delta: row[2],
            applied_sq: row[3],
            error_sq: row[4],
            vs_model_dot_delta: row[5],
        });
        if full < end {
            // The last few elements of a row whose length is not a multiple of 8 (f16/f32 tensors only).
            let tail = full..end;
            let r = tail.len();
            total = total.combine(row_sums_body(
                &src[tail.clone()],
                &delta[tail.clone()],
                &requant[tail.clone()],
                &model[tail],
                r,
            ));
        }
        start = end;
    }
    total
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
        for i in tail..w.len() {
            let (w, d, q, m) = (w[i] as f64, d[i] as f64, q[i] as f64, m[i] as f64);
            row[0] += d * d;
            row[1] += w * w;
            row[2] += (q - w) * d;
            row[3] += (q - w) * (q - w);
            row[4] += (q - w - d) * (q - w - d);
            row[5] += (q - m) * d;
        }
        total = total.combine(Sums {
            delta_sq: row[0],
            src_sq: row[1],
            applied_dot_delta: row[2],
            applied_sq: row[3],
            error_sq: row[4],
            vs_model_dot_delta: row[5],
        });
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn low_rank_add_matches_a_plain_triple_loop_bit_for_bit() {
        let mut seed = 7;
        for (rows, rank, cols) in [(4, 16, 64), (3, 1, 37), (1, 5, 16), (2, 8, 15)] {
            let left: Vec<f32> = (0..rows * rank).map(|_| lcg(&mut seed)).collect();
            let right: Vec<f32> = (0..rank * cols).map(|_| lcg(&mut seed)).collect();
            let src: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
            let mut patched = src.clone();
            let mut delta = vec![0.5f32; rows * cols];
            add_low_rank(&left, &right, rank, cols, 0.75, &mut patched, &mut delta);
            let mut portable_p = src.clone();
            let mut portable_d = vec![0.5f32; rows * cols];
            add_low_rank_body(&left, &right, rank, cols, 0.75, &mut portable_p, &mut portable_d);
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
                }
            }
        }
    }

    #[test]
    fn row_sums_agree_with_f64_sums() {
        let mut seed = 3;
        let (rows, cols) = (3, 45);
        let v = |seed: &mut u64| (0..rows * cols).map(|_| lcg(seed)).collect::<Vec<f32>>();
        let (w, d, q, m) = (v(&mut seed), v(&mut seed), v(&mut seed), v(&mut seed));
        let s = row_sums(&w, &d, &q, &m, cols);
        let f = |i: usize| (w[i] as f64, d[i] as f64, q[i] as f64, m[i] as f64);
        let exact = (0..rows * cols).fold([0f64; 6], |mut a, i| {
            let (w, d, q, m) = f(i);
            a[0] += d * d;
            a[1] += w * w;
            a[2] += (q - w) * d;
            a[3] += (q - w) * (q - w);
            a[4] += (q - w - d) * (q - w - d);
            a[5] += (q - m) * d;
            a
        });
        let got = [s.delta_sq, s.src_sq, s.applied_dot_delta, s.applied_sq, s.error_sq, s.vs_model_dot_delta];
        for (g, e) in got.iter().zip(exact) {
            assert!((g - e).abs() <= 1e-5 * e.abs().max(1.0), "{g} vs {e}");
        }
    }
}
