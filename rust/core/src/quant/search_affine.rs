//! ggml's searches for an affine code `x ≈ scale * l - the_min` (`l` in `0..=nmax`), shared by the types with a
//! scale and a min: q4_K, q5_K, q2_K (super-blocks) and the importance-matrix quantizers of q4_1 and q5_1.
//!
//! - [`make_qkx_quants`] is ggml's `make_qkx2_quants` and `make_qkx3_quants` in one: for finite input with
//!   weights given (every caller here) the two are the same computation; they differ only in `max == min` versus
//!   `max <= min` for the early exit (equal unless a value is NaN) and in `make_qkx3_quants` accepting no weights
//!   (never the case for these types).
//! - [`make_qp_quants`] is ggml's `make_qp_quants`: the positive code of the sub-block scales (or mins) of a
//!   super-block, with importance weights.
//! - [`AffineLanes`] runs `make_qkx_quants` on `LANES` independent sub-blocks at once, each lane doing exactly its
//!   own sub-block's operations in C order (the sums stay sequential per lane; the data-dependent branches become
//!   per-lane selects). It is written as plain per-lane array code so the compiler vectorises it; compiled with or
//!   without AVX2 it gives the same bits (IEEE single precision, no contraction), and the tests compare it with
//!   the one-sub-block transcription.
//!
//! ggml's `make_qkx1_quants` is not here: no quantizer of this ggml version calls it (its calls are commented out).
//!
//! **Traps.** `nearest_int` rounds ties to even; every sum is sequential in index order, every expression keeps
//! C's evaluation order (`scale * l + min - x` is `(scale*l + min) - x`; `w*l*x` is `(w*l)*x`); integer codes are
//! converted to `f32` where C converts them. Out-of-range arguments of `nearest_int` (values near f32's limits
//! make NaN or infinite scales) follow release ggml's bit trick, as [`nearest_int`] does. `make_qp_quants` stores
//! unclamped (possibly negative) codes into bytes, wrapping as C does, and keeps using the wrapped bytes.

use super::nearest_int;

/// The parameters of one `make_qkx2_quants` / `make_qkx3_quants` call site.
#[derive(Clone, Copy, Debug)]
pub(super) struct Search {
    /// Largest code.
    pub nmax: i32,
    /// The first candidate inverse scale is `(rmin + nmax) / (max - min)`...
    pub rmin: f32,
    /// ...and candidate `is` uses `rmin + rdelta * is`.
    pub rdelta: f32,
    /// Candidates `0..=nstep` (none when `nstep < 1`).
    pub nstep: i32,
    /// Weighted absolute errors instead of weighted squared errors.
    pub use_mad: bool,
}

impl Search {
    /// The parameters every `quantize_row_<type>_impl` of this family uses (`make_qkx3_quants` with
    /// `-0.9f, 0.05f, 36, false`).
    pub const fn weighted(nmax: i32) -> Search {
        Search { nmax, rmin: -0.9, rdelta: 0.05, nstep: 36, use_mad: false }
    }
}

/// The error term of one element: `|diff|` or `diff²`.
#[inline(always)]
fn error_term(diff: f32, use_mad: bool) -> f32 {
    if use_mad {
        diff.abs()
    } else {
        diff * diff
    }
}

/// ggml's `make_qkx2_quants` (= `make_qkx3_quants` with weights) on one sub-block of finite values `x` with
/// weights `w` (same length, at most 32): writes the codes to `l` and returns `(scale, the_min)`, the value
/// being `scale * l - the_min`.
pub(super) fn make_qkx_quants(p: Search, x: &[f32], w: &[f32], l: &mut [u8]) -> (f32, f32) {
    let n = x.len();
    assert!(n <= 32 && w.len() == n && l.len() == n && n > 0);
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let nmax = p.nmax as f32;
    let mut iscale = nmax / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, p.nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += w[i] * error_term(diff, p.use_mad);
    }
    if p.nstep < 1 {
        return (scale, -min);
    }
    let mut laux = [0u8; 32];
    for is in 0..=p.nstep {
        iscale = (p.rmin + p.rdelta * is as f32 + nmax) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, p.nmax);
            laux[i] = q as u8;
            let q = q as f32;
            sum_l += w[i] * q;
            sum_l2 += w[i] * q * q;
            sum_xl += w[i] * q * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += w[i] * error_term(diff, p.use_mad);
            }
            if cur_error < best_error {
                l.copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qp_quants` on `x` (the sub-block scales or mins of one super-block, at most 16) with weights `w`:
/// writes the codes (`0..=nmax`, or wrapped negative ones, as C's `uint8_t` stores do) to `l` and returns the
/// scale (0 when every value is below `GROUP_MAX_EPS` = 1e-15).
pub(super) fn make_qp_quants(nmax: i32, x: &[f32], l: &mut [u8], w: &[f32]) -> f32 {
    let n = x.len();
    assert!(n <= 16 && w.len() == n && l.len() == n);
    let mut max = 0.0f32;
    for &v in x {
        // C's MAX(a, b) is `a > b ? a : b` (a NaN `v` wins).
        max = if max > v { max } else { v };
    }
    if max < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let fmax = nmax as f32;
    let mut iscale = fmax / max;
    for (q, &v) in l.iter_mut().zip(x) {
        *q = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..n {
        let diff = x[i] - scale * l[i] as f32;
        best_mse += w[i] * diff * diff;
    }
    for is in -4i32..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + fmax) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..n {
            let q = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * q as f32;
            mse += w[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for i in 0..n {
        let q = nearest_int(iscale * x[i]).min(nmax);
        l[i] = q as u8;
        sumlx += w[i] * x[i] * q as f32;
        suml2 += w[i] * q as f32 * q as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for i in 0..n {
            let li = l[i] as f32;
            let mut slx = sumlx - w[i] * x[i] * li;
            let mut sl2 = suml2 - w[i] * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l[i] as i32 {
                    slx += w[i] * x[i] * new_l as f32;
                    sl2 += w[i] * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// `LANES` values side by side: element `k` belongs to lane (sub-block) `k`.
pub(super) type Lanes<const LANES: usize> = [f32; LANES];

/// `x` (`LANES` sub-blocks of `N` values one after the other) transposed: `[i][k]` is element `i` of sub-block `k`.
#[inline(always)]
pub(super) fn transpose_in<const LANES: usize, const N: usize>(x: &[f32]) -> [Lanes<LANES>; N] {
    assert_eq!(x.len(), LANES * N);
    let mut t = [[0f32; LANES]; N];
    for (k, xs) in x.chunks_exact(N).enumerate() {
        for (i, &v) in xs.iter().enumerate() {
            t[i][k] = v;
        }
    }
    t
}

/// The importance weights of the k-quant `_impl` paths for super-blocks of 256 in lanes: per super-block
/// `sigma2 = factor * sum x² / 256` (the sum sequential; `factor` 2 for q4_K/q5_K, 1 for q2_K), per element
/// `w = qw * sqrt(sigma2 + x²)`, per sub-block (lane) the sequential sum of its weights. `xs` and `qw` hold
/// `LANES * N` values: `LANES * N / 256` super-blocks of `256 / N` sub-blocks. Returns `(xt, wt, sw)`.
#[inline(always)]
#[allow(clippy::type_complexity)]
pub(super) fn super_block_weights<const LANES: usize, const N: usize>(
    xs: &[f32],
    qw: &[f32],
    factor: f32,
) -> ([Lanes<LANES>; N], [Lanes<LANES>; N], Lanes<LANES>) {
    const QK_K: usize = 256;
    let sb = LANES * N / QK_K;
    let mut sum_x2 = [0f32; LANES];
    for l in 0..QK_K {
        for (s, acc) in sum_x2.iter_mut().take(sb).enumerate() {
            *acc += xs[s * QK_K + l] * xs[s * QK_K + l];
        }
    }
    let mut sigma2 = [0f32; LANES];
    for k in 0..LANES {
        sigma2[k] = factor * sum_x2[k / (LANES / sb)] / QK_K as f32;
    }
    let xt = transpose_in::<LANES, N>(xs);
    let mut wt = transpose_in::<LANES, N>(qw);
    let mut sw = [0f32; LANES];
    for (w, row) in wt.iter_mut().zip(&xt) {
        for k in 0..LANES {
            w[k] *= (sigma2[k] + row[k] * row[k]).sqrt();
            sw[k] += w[k];
        }
    }
    (xt, wt, sw)
}

/// The results of [`make_qkx_quants_lanes`]: per lane the scale and `the_min`, and the codes (`[i][k]`).
pub(super) struct LaneFits<const LANES: usize, const N: usize> {
    pub scale: Lanes<LANES>,
    pub the_min: Lanes<LANES>,
    pub l: [[i32; LANES]; N],
}

impl<const LANES: usize, const N: usize> LaneFits<LANES, N> {
    /// The scales, the mins and the codes (as bytes, sub-block after sub-block) of super-block `s`: lanes
    /// `SUB * s..SUB * (s + 1)`, `SUB * N == LEN`.
    #[inline(always)]
    #[allow(clippy::type_complexity)]
    pub fn super_block<const SUB: usize, const LEN: usize>(&self, s: usize) -> ([f32; SUB], [f32; SUB], [u8; LEN]) {
        assert_eq!(SUB * N, LEN);
        let lanes = SUB * s..SUB * s + SUB;
        let scales = self.scale[lanes.clone()].try_into().expect("SUB lanes");
        let mins = self.the_min[lanes].try_into().expect("SUB lanes");
        let mut l = [0u8; LEN];
        for (j, out) in l.chunks_exact_mut(N).enumerate() {
            for (o, row) in out.iter_mut().zip(&self.l) {
                *o = row[SUB * s + j] as u8;
            }
        }
        (scales, mins, l)
    }
}

/// [`make_qkx_quants`] on `LANES` sub-blocks of `N` finite values at once (`xt[i][k]`, weights `wt[i][k]`): each
/// lane does its own sub-block's operations in C order; the branches become per-lane selects.
///
/// A lane whose block takes the early exit (`max == min`) keeps computing on meaningless values, but its state
/// never changes after that and its result is set at the end. Everything is plain array code: written to be
/// inlined into an AVX2 kernel, where the compiler turns each per-lane loop into vector instructions.
#[inline(always)]
pub(super) fn make_qkx_quants_lanes<const LANES: usize, const N: usize>(
    p: Search,
    xt: &[Lanes<LANES>; N],
    wt: &[Lanes<LANES>; N],
) -> LaneFits<LANES, N> {
    let mut min = xt[0];
    let mut max = xt[0];
    let mut sum_w = wt[0];
    let mut sum_x = [0f32; LANES];
    for k in 0..LANES {
        sum_x[k] = sum_w[k] * xt[0][k];
    }
    for i in 1..N {
        for k in 0..LANES {
            let v = xt[i][k];
            min[k] = if v < min[k] { v } else { min[k] };
            max[k] = if v > max[k] { v } else { max[k] };
            sum_w[k] += wt[i][k];
            sum_x[k] += wt[i][k] * v;
        }
    }
    let mut flat = [false; LANES];
    let mut range = [0f32; LANES];
    for k in 0..LANES {
        min[k] = if min[k] > 0.0 { 0.0 } else { min[k] };
        flat[k] = max[k] == min[k];
        range[k] = max[k] - min[k];
    }
    let nmax = p.nmax as f32;
    let mut scale = [0f32; LANES];
    let mut iscale = [0f32; LANES];
    for k in 0..LANES {
        iscale[k] = nmax / range[k];
        scale[k] = 1.0 / iscale[k];
    }
    // The kept codes are not copied at each improvement (a per-lane conditional copy of 32 codes costs more
    // than the search on some CPUs): each lane remembers the inverse scale and min that made them, and the
    // codes are recomputed once at the end with the very same operations.
    let mut code_iscale = iscale;
    let mut code_min = min;
    let mut best = [0f32; LANES];
    for i in 0..N {
        for k in 0..LANES {
            let x = xt[i][k];
            let q = nearest_int(iscale[k] * (x - min[k])).min(p.nmax).max(0);
            best[k] += wt[i][k] * error_term(scale[k] * q as f32 + min[k] - x, p.use_mad);
        }
    }
    if p.nstep >= 1 {
        let mut laux = [[0i32; LANES]; N];
        for is in 0..=p.nstep {
            let num = p.rmin + p.rdelta * is as f32 + nmax;
            for k in 0..LANES {
                iscale[k] = num / (max[k] - min[k]);
            }
            let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
            for i in 0..N {
                for k in 0..LANES {
                    let x = xt[i][k];
                    let q = nearest_int(iscale[k] * (x - min[k])).min(p.nmax).max(0);
                    laux[i][k] = q;
                    let wl = wt[i][k] * q as f32;
                    sum_l[k] += wl;
                    sum_l2[k] += wl * q as f32;
                    sum_xl[k] += wl * x;
                }
            }
            let mut this_scale = [0f32; LANES];
            let mut this_min = [0f32; LANES];
            let mut take = [false; LANES];
            for k in 0..LANES {
                let d = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k];
                take[k] = d > 0.0 && !flat[k];
                let s = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / d;
                let m = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / d;
                let clamp = m > 0.0;
                this_min[k] = if clamp { 0.0 } else { m };
                this_scale[k] = if clamp { sum_xl[k] / sum_l2[k] } else { s };
            }
            let mut cur = [0f32; LANES];
            for i in 0..N {
                for k in 0..LANES {
                    let diff = this_scale[k] * laux[i][k] as f32 + this_min[k] - xt[i][k];
                    cur[k] += wt[i][k] * error_term(diff, p.use_mad);
                }
            }
            let mut any = false;
            for k in 0..LANES {
                take[k] &= cur[k] < best[k];
                any |= take[k];
            }
            if any {
                for k in 0..LANES {
                    best[k] = if take[k] { cur[k] } else { best[k] };
                    scale[k] = if take[k] { this_scale[k] } else { scale[k] };
                    code_iscale[k] = if take[k] { iscale[k] } else { code_iscale[k] };
                    code_min[k] = if take[k] { min[k] } else { code_min[k] };
                    min[k] = if take[k] { this_min[k] } else { min[k] };
                }
            }
        }
    }
    let mut the_min = [0f32; LANES];
    for k in 0..LANES {
        scale[k] = if flat[k] { 0.0 } else { scale[k] };
        the_min[k] = -min[k];
    }
    let mut l = [[0i32; LANES]; N];
    for (row, xs) in l.iter_mut().zip(xt) {
        for k in 0..LANES {
            let q = nearest_int(code_iscale[k] * (xs[k] - code_min[k])).min(p.nmax).max(0);
            row[k] = if flat[k] { 0 } else { q };
        }
    }
    LaneFits { scale, the_min, l }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q4: Search = Search { nmax: 15, rmin: -1.0, rdelta: 0.1, nstep: 20, use_mad: false };

    #[test]
    fn qkx_exact_grid_is_kept() {
        // x = k - 3: min -3, max 12, iscale = 15/15 = 1, codes k, error exactly 0; no candidate error is < 0.
        let x: Vec<f32> = (0..16).map(|k| k as f32 - 3.0).collect();
        for use_mad in [false, true] {
            let mut l = [9u8; 16];
            let (scale, the_min) = make_qkx_quants(Search { use_mad, ..Q4 }, &x, &[1.0; 16], &mut l);
            assert_eq!((scale, the_min), (1.0, 3.0));
            assert_eq!(l.to_vec(), (0..16u8).collect::<Vec<_>>());
        }
        // x = k: min = 0 stays +0.0 and the_min = -min is -0.0.
        let x: Vec<f32> = (0..16).map(|k| k as f32).collect();
        let mut l = [0u8; 16];
        let (scale, the_min) = make_qkx_quants(Q4, &x, &[0.5; 16], &mut l);
        assert_eq!((scale, the_min.to_bits()), (1.0, 0x8000_0000));
    }

    #[test]
    fn qkx_constant_blocks() {
        // Negative constant: min = max = -2.5, the early exit: codes 0, scale 0, the_min 2.5.
        let mut l = [7u8; 32];
        assert_eq!(make_qkx_quants(Q4, &[-2.5; 32], &[1.0; 32], &mut l), (0.0, 2.5));
        assert_eq!(l, [0; 32]);
        // Positive constant 1 (weights 2 as q4_K's sqrt(mean x²) + |x|): min clamps to 0, iscale 15, codes 15,
        // scale = 1/15 (whose product with 15 rounds to exactly 1: error 0); every candidate has equal codes, so
        // D = 64*(64*l²) - (64*l)² = 0 and none is tried.
        let mut l = [0u8; 32];
        let (scale, the_min) = make_qkx_quants(Q4, &[1.0; 32], &[2.0; 32], &mut l);
        assert_eq!((scale, the_min.to_bits()), (1.0 / 15.0, 0x8000_0000));
        assert_eq!(l, [15; 32]);
    }

    #[test]
    fn qp_exact_grid_and_tiny_values() {
        // max 63: iscale 1, codes = x, mse 0 (no candidate beats it); the refinement sees slx == sl2 and keeps
        // every code; scale = sumlx / suml2 = 1.
        let x = [63.0, 0.0, 21.0, 42.0, 7.0, 14.0, 35.0, 56.0];
        let mut l = [0u8; 8];
        assert_eq!(make_qp_quants(63, &x, &mut l, &[1.0; 8]), 1.0);
        assert_eq!(l, [63, 0, 21, 42, 7, 14, 35, 56]);
        // Everything below GROUP_MAX_EPS (1e-15): scale 0, codes 0.
        let mut l = [5u8; 8];
        assert_eq!(make_qp_quants(63, &[1e-16, 0.0, -3.0, 9e-16, 0.0, 0.0, 0.0, 0.0], &mut l, &[1.0; 8]), 0.0);
        assert_eq!(l, [0; 8]);
    }

    #[test]
    fn qp_negative_codes_wrap_as_c_bytes() {
        // x = [63, -2]: every candidate inverse scale (63 + 0.1 is)/63 codes them 63 and -2; -2 is stored as the
        // byte 254. sumlx = suml2 = 63² + 2² = 3973. Refinement: element 0 keeps 63 (slx = sl2 = 4); element 1 has
        // sl2 = 3973 - 254² < 0 and is skipped. Scale 3973/3973 = 1.
        let mut l = [0u8; 2];
        assert_eq!(make_qp_quants(63, &[63.0, -2.0], &mut l, &[1.0, 1.0]), 1.0);
        assert_eq!(l, [63, 254]);
    }
}
