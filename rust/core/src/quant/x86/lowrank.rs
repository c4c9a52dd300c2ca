//! x86-64 SIMD versions of the patch engine's two arithmetic loops, the low-rank add and the quality sums. Their
//! portable twins, which give the same bits, are in `patch/kernel.rs`; this file never imports the patch engine
//! (the one portable piece the sums need is handed in, as the quant kernels' `ScalarBlock` is).
//!
//! Same rules as the rest of `x86/`: each safe wrapper checks the CPU feature (std's `is_x86_feature_detected!`,
//! detected once and cached) and returns `None` without it; the kernels do a multiply and a separate add per
//! element (never an FMA), in the portable code's order.

use std::arch::x86_64::*;

/// The instruction sets the low-rank tiles are written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LowRankIsa {
    /// AVX2: tiles of 4 rows × 16 columns.
    Avx2,
    /// AVX-512F: tiles of 4 rows × 32 columns.
    Avx512,
}

impl LowRankIsa {
    /// Columns per tile.
    #[cfg(test)]
    pub(crate) fn tile_cols(self) -> usize {
        match self {
            LowRankIsa::Avx2 => 16,
            LowRankIsa::Avx512 => 32,
        }
    }

    fn available(self) -> bool {
        match self {
            LowRankIsa::Avx2 => is_x86_feature_detected!("avx2"),
            LowRankIsa::Avx512 => is_x86_feature_detected!("avx512f"),
        }
    }
}

/// The low-rank add `patched[r] += scale · (left[r] @ right)` and `delta[r] += the same` (`left` rows × rank,
/// `right` rank × cols, row-major) over the rows in groups of 4 and the columns in whole tiles, with AVX-512F
/// when the CPU has it, else AVX2. Returns the `(rows, columns)` it covered, from row 0 and column 0; the caller
/// adds the rest with the portable code. `None` without AVX2 (nothing is changed then).
///
/// Each element is `acc = 0; for k in 0..rank { acc += left[r][k] * right[k][c] }; v = scale * acc; p += v;
/// d += v` in f32, exactly as the portable loops do it.
pub(crate) fn add_low_rank_tiles(
    left: &[f32],
    right: &[f32],
    rank: usize,
    cols: usize,
    scale: f32,
    patched: &mut [f32],
    delta: &mut [f32],
) -> Option<(usize, usize)> {
    add_low_rank_tiles_with(LowRankIsa::Avx512, left, right, rank, cols, scale, patched, delta)
        .or_else(|| add_low_rank_tiles_with(LowRankIsa::Avx2, left, right, rank, cols, scale, patched, delta))
}

/// [`add_low_rank_tiles`] with the tiles of `isa`; `None` when the CPU lacks it.
#[allow(clippy::too_many_arguments)] // the low-rank add's arguments and the instruction set
pub(crate) fn add_low_rank_tiles_with(
    isa: LowRankIsa,
    left: &[f32],
    right: &[f32],
    rank: usize,
    cols: usize,
    scale: f32,
    patched: &mut [f32],
    delta: &mut [f32],
) -> Option<(usize, usize)> {
    if !isa.available() {
        return None;
    }
    check_low_rank(left, right, rank, cols, patched, delta);
    // SAFETY: the CPU has `isa` (checked above); loads and stores go through bounds-checked slices of a tile.
    Some(unsafe {
        match isa {
            LowRankIsa::Avx2 => low_rank_avx2(left, right, rank, cols, scale, patched, delta),
            LowRankIsa::Avx512 => low_rank_avx512(left, right, rank, cols, scale, patched, delta),
        }
    })
}

fn check_low_rank(left: &[f32], right: &[f32], rank: usize, cols: usize, patched: &[f32], delta: &[f32]) {
    let rows = patched.len() / cols.max(1);
    assert!(
        cols > 0 && left.len() >= rows * rank && right.len() >= rank * cols && delta.len() == patched.len(),
        "low-rank add: buffer sizes"
    );
}

/// Defines `$name`, the low-rank add over tiles of 4 rows × `$w` columns held in 8 registers of `$lanes` f32
/// (two per row), for the target feature `$feature`. Only the intrinsics differ between the AVX2 and AVX-512
/// versions; both do a separate multiply and add per element, in k order.
macro_rules! low_rank_tiles {
    ($name:ident, $feature:literal, $w:literal, $lanes:literal,
     $zero:ident, $load:ident, $splat:ident, $add:ident, $mul:ident, $store:ident) => {
        #[target_feature(enable = $feature)]
        fn $name(
            left: &[f32],
            right: &[f32],
            rank: usize,
            cols: usize,
            scale: f32,
            patched: &mut [f32],
            delta: &mut [f32],
        ) -> (usize, usize) {
            let rows = patched.len() / cols;
            let full_rows = rows / 4 * 4;
            let full_cols = cols / $w * $w;
            for r in (0..full_rows).step_by(4) {
                // The 4 rows' coefficients regrouped by k: one splat each per k.
                let by_k: Vec<[f32; 4]> =
                    (0..rank).map(|k| std::array::from_fn(|i| left[(r + i) * rank + k])).collect();
                for c0 in (0..full_cols).step_by($w) {
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
                    for (i, acc) in acc.iter().enumerate() {
                        let mut sums = [0f32; $w];
                        // SAFETY: `sums` holds $w f32: two unaligned stores of $lanes.
                        unsafe {
                            $store(sums.as_mut_ptr(), acc[0]);
                            $store(sums.as_mut_ptr().add($lanes), acc[1]);
                        }
                        let at = (r + i) * cols + c0;
                        let p: &mut [f32; $w] = (&mut patched[at..at + $w]).try_into().expect("tile in row");
                        let d: &mut [f32; $w] = (&mut delta[at..at + $w]).try_into().expect("tile in row");
                        for j in 0..$w {
                            let v = scale * sums[j];
                            p[j] += v;
                            d[j] += v;
                        }
                    }
                }
            }
            (full_rows, full_cols)
        }
    };
}

low_rank_tiles!(
    low_rank_avx2,
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
low_rank_tiles!(
    low_rank_avx512,
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

/// The portable code that adds the last elements of a row, those that do not fill 8 lanes (`src`, `delta`,
/// `requant`, `model` of equal length), to the row's six sums, in f64: what [`row_sums`] hands them to, so that
/// both versions add the same values in the same order.
pub(crate) type RowTail = fn(&[f32], &[f32], &[f32], &[f32], [f64; 6]) -> [f64; 6];

/// Elements per AVX2 vector of f32.
const LANES: usize = 8;

/// The patch engine's six quality sums over rows of `cols` values with AVX2 (see `patch::Sums`, in its field
/// order: ΔW², W², (Q−W)·ΔW, (Q−W)², (Q−W−ΔW)², (Q−W_model)·ΔW): f32 lanes within a row, each sum's 8 lanes
/// added in f64, the row's last `cols % 8` elements added to that by `tail`, then the row added to the total.
/// `None` without AVX2.
pub(crate) fn row_sums(
    src: &[f32],
    delta: &[f32],
    requant: &[f32],
    model: &[f32],
    cols: usize,
    tail: RowTail,
) -> Option<[f64; 6]> {
    if !is_x86_feature_detected!("avx2") {
        return None;
    }
    let n = src.len();
    assert!(delta.len() == n && requant.len() == n && model.len() == n && cols > 0, "row sums: buffer sizes");
    // SAFETY: AVX2 is available (checked above); the four slices hold n elements each (checked above).
    Some(unsafe { row_sums_avx2(src, delta, requant, model, cols, tail) })
}

#[target_feature(enable = "avx2")]
unsafe fn row_sums_avx2(
    src: &[f32],
    delta: &[f32],
    requant: &[f32],
    model: &[f32],
    cols: usize,
    tail: RowTail,
) -> [f64; 6] {
    let n = src.len();
    let mut total = [0f64; 6];
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
        if full < end {
            // The last few elements of a row whose length is not a multiple of 8 (f16/f32 tensors only).
            let rest = full..end;
            row = tail(&src[rest.clone()], &delta[rest.clone()], &requant[rest.clone()], &model[rest], row);
        }
        for (s, v) in total.iter_mut().zip(row) {
            *s += v;
        }
        start = end;
    }
    total
}
