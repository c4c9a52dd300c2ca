//! The arithmetic inner loops of the patch engine: the fused low-rank add and the quality sums.
//!
//! Both are written over fixed-width tiles so the compiler keeps the accumulators in registers and vectorizes
//! them; on x86-64 the same source is also compiled with AVX2 (and AVX-512F) enabled and chosen at run time. Neither version
//! uses FMA and both perform the same f32 operations in the same order, so the output does not depend on the
//! CPU it runs on.

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
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is available (checked just above); the function is safe Rust compiled with it.
            unsafe { add_low_rank_avx512(left, right, rank, cols, scale, patched, delta) };
            return;
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked just above); the function is safe Rust compiled with AVX2.
            unsafe { add_low_rank_avx2(left, right, rank, cols, scale, patched, delta) };
            return;
        }
    }
    add_low_rank_body::<16, 2>(left, right, rank, cols, scale, patched, delta);
}

/// Defines `$name`, the low-rank add with an explicit-SIMD tile of 4 rows x `$w` columns held in 8 registers
/// of `$lanes` f32 (two per row), for the target feature `$feature`. Only the intrinsics differ between the
/// AVX2 and AVX-512 versions; both do a separate multiply and add per element, in k order.
macro_rules! simd_low_rank {
    ($name:ident, $feature:literal, $w:literal, $lanes:literal,
     $zero:ident, $load:ident, $splat:ident, $add:ident, $mul:ident, $store:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name(
            left: &[f32],
            right: &[f32],
            rank: usize,
            cols: usize,
            scale: f32,
            patched: &mut [f32],
            delta: &mut [f32],
        ) {
            use std::arch::x86_64::*;
            #[target_feature(enable = $feature)]
            fn tile(by_k: &[[f32; 4]], right: &[f32], cols: usize, c0: usize) -> [[f32; $w]; 4] {
                let mut acc = [[$zero(); 2]; 4];
                for (k, c) in by_k.iter().enumerate() {
                    let b = &right[k * cols + c0..k * cols + c0 + $w];
                    // SAFETY: `b` holds $w f32 (the slice above is bounds-checked): two unaligned loads of $lanes.
                    let (b0, b1) = unsafe { ($load(b.as_ptr()), $load(b.as_ptr().add($lanes))) };
                    for i in 0..4 {
                        let ci = $splat(c[i]);
                        acc[i][0] = $add(acc[i][0], $mul(ci, b0));
                        acc[i][1] = $add(acc[i][1], $mul(ci, b1));
                    }
                }
                let mut out = [[0f32; $w]; 4];
                for i in 0..4 {
                    // SAFETY: each row of `out` holds $w f32: two stores of $lanes.
                    unsafe {
                        $store(out[i].as_mut_ptr(), acc[i][0]);
                        $store(out[i].as_mut_ptr().add($lanes), acc[i][1]);
                    }
                }
                out
            }
            add_low_rank_tiled::<$w>(left, right, rank, cols, scale, patched, delta, tile)
        }
    };
}

simd_low_rank!(
    add_low_rank_avx2,
    "avx2",
    16,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_set1_ps,
    _mm256_add_ps,
    _mm256_mul_ps,
    _mm256_storeu_ps
);
simd_low_rank!(
    add_low_rank_avx512,
    "avx512f",
    32,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_set1_ps,
    _mm512_add_ps,
    _mm512_mul_ps,
    _mm512_storeu_ps
);

/// An explicit-SIMD tile kernel: `(coefficients by k, right, cols, first column) -> 4 rows x W sums`.
#[cfg(target_arch = "x86_64")]
type TileFn<const W: usize> = unsafe fn(&[[f32; 4]], &[f32], usize, usize) -> [[f32; W]; 4];

/// Drives an explicit-SIMD `tile` function (4 rows x W columns of `left @ right`) over the rows and columns,
/// then applies `scale` and the adds exactly as [`low_rank_rows`] does. Leftover rows and columns go through
/// the portable code: every element gets the same operations in the same order either way.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn add_low_rank_tiled<const W: usize>(
    left: &[f32],
    right: &[f32],
    rank: usize,
    cols: usize,
    scale: f32,
    patched: &mut [f32],
    delta: &mut [f32],
    tile: TileFn<W>,
) {
    let rows = patched.len() / cols;
    let full_rows = rows / 4 * 4;
    let full_cols = cols / W * W;
    for r in (0..full_rows).step_by(4) {
        let by_k: Vec<[f32; 4]> = (0..rank).map(|k| std::array::from_fn(|i| left[(r + i) * rank + k])).collect();
        for c0 in (0..full_cols).step_by(W) {
            // SAFETY: `tile` is one of the two target-feature functions above, only passed here by their callers
            // after checking the CPU has that feature.
            let acc = unsafe { tile(&by_k, right, cols, c0) };
            for (i, acc) in acc.iter().enumerate() {
                let at = (r + i) * cols + c0;
                let p: &mut [f32; W] = (&mut patched[at..at + W]).try_into().expect("tile in row");
                let d: &mut [f32; W] = (&mut delta[at..at + W]).try_into().expect("tile in row");
                for j in 0..W {
                    let v = scale * acc[j];
                    p[j] += v;
                    d[j] += v;
                }
            }
        }
        if full_cols < cols {
            for i in 0..4 {
                let row = (r + i) * cols;
                tail_columns(
                    &left[(r + i) * rank..(r + i + 1) * rank],
                    right,
                    cols,
                    full_cols,
                    scale,
                    &mut patched[row..row + cols],
                    &mut delta[row..row + cols],
                );
            }
        }
    }
    let rest = full_rows * cols;
    add_low_rank_body::<16, 1>(
        &left[full_rows * rank..],
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
        total = total.combine(Sums::from_array(row));
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
        total = total.combine(Sums::from_array(row));
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
        for (rows, rank, cols) in
            [(4, 16, 64), (3, 1, 37), (1, 5, 16), (2, 8, 15), (7, 16, 100), (9, 3, 70), (8, 2, 96)]
        {
            let left: Vec<f32> = (0..rows * rank).map(|_| lcg(&mut seed)).collect();
            let right: Vec<f32> = (0..rank * cols).map(|_| lcg(&mut seed)).collect();
            let src: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
            let mut patched = src.clone();
            let mut delta = vec![0.5f32; rows * cols];
            add_low_rank(&left, &right, rank, cols, 0.75, &mut patched, &mut delta);
            let mut portable_p = src.clone();
            let mut portable_d = vec![0.5f32; rows * cols];
            add_low_rank_body::<16, 2>(&left, &right, rank, cols, 0.75, &mut portable_p, &mut portable_d);
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") {
                let (mut p2, mut d2) = (src.clone(), vec![0.5f32; rows * cols]);
                // SAFETY: AVX2 is available (checked just above).
                unsafe { add_low_rank_avx2(&left, &right, rank, cols, 0.75, &mut p2, &mut d2) };
                assert!(p2.iter().zip(&portable_p).all(|(a, b)| a.to_bits() == b.to_bits()), "avx2 differs");
                assert!(d2.iter().zip(&portable_d).all(|(a, b)| a.to_bits() == b.to_bits()), "avx2 differs");
            }
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
