//! ggml's scale searches for the symmetric (scale-only) types, bit-exact: `make_qx_quants` (with `rmse_type` 1,
//! the only mode its callers use: q6_K, q3_K with an importance matrix, and q4_0/q5_0 with one) and
//! `make_q3_quants` (with `do_rmse`, q3_K without an importance matrix), both from `ggml-quants.c`.
//!
//! Each search comes twice:
//! - a scalar version over one group (`x.len()` values), the readable definition;
//! - a lane version over `K` independent groups of `N` values stored transposed (`x[i][k]` is value `i` of group
//!   `k`), where every lane performs its own group's f32 operations in the scalar order (sequential sums, no
//!   reassociation, no fused multiply-add) and data-dependent branches become per-lane selects. Compiled plainly
//!   it is portable code; inlined into an AVX2 context (see `LaneWork`) the compiler turns each lane loop
//!   into vector instructions. Both give the scalar version's bits, which the tests check.
//!
//! **Traps reproduced.** Groups whose largest magnitude is below `GROUP_MAX_EPS` (1e-15) return scale 0 with
//! all codes 0 (not `nmax`). The largest magnitude is the first one met (strict `>`), sign kept. `nearest_int`
//! rounds ties to even through `v + 12582912`. The candidate scales are `-(nmax + 0.1f*is) / max` with the sum
//! rounded before the division. `w*x*l` is `(w*x)*l` and `w*l*l` is `(w*l)*l`. `suml2 ? a : b` is taken for NaN
//! too (C's truthiness), while `suml2 > 0` is not. Out-of-range or NaN arguments of `nearest_int` (reachable only
//! for values whose squares overflow) give what a release build of ggml gives: the low mantissa bits of the sum
//! (ggml's assertion is compiled out in `llama-quantize`).
//!
//! Also here: the importance-matrix row quantizer shared by q4_0 and q5_0 ([`weighted_row_32`], [`Weighted32`]),
//! whose `sigma2 = sum(x*x)/n` is one sequential sum over the whole row.

use super::LaneWork;

/// ggml's `GROUP_MAX_EPS`: groups whose largest magnitude is below it count as all zero.
pub(super) const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int` as a release build computes it (no range assertion): round to nearest, ties to even, for
/// `|v| <= 4194303`; outside that range (and for NaN) the low 23 bits of `v + 12582912` minus 2^22, as in C.
#[inline(always)]
pub(super) fn nearest(v: f32) -> i32 {
    (((v + 12_582_912.0).to_bits() & 0x007F_FFFF) as i32) - 0x0040_0000
}

/// The first value of largest magnitude (strict `>`, so the first one wins ties; sign kept; 0 when all are zero
/// or NaN) and that magnitude: the scan that starts ggml's searches and picks the super-block scales.
#[inline(always)]
pub(super) fn signed_max(x: &[f32]) -> (f32, f32) {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

/// The 18 candidate inverse scales' numerators of `make_qx_quants`: `nmax + 0.1f*is` for `is` in -9..=9 but 0,
/// in the C order (the caller negates and divides by the group's max).
#[inline(always)]
fn candidates(nmax: i32) -> [f32; 18] {
    let mut out = [0.0f32; 18];
    let steps = (-9..=9).filter(|&is: &i32| is != 0);
    for (o, is) in out.iter_mut().zip(steps) {
        *o = nmax as f32 + 0.1 * is as f32;
    }
    out
}

/// `make_qx_quants(n, nmax, x, L, 1, weights)` for one group: returns the scale and writes the codes
/// `L[i] + nmax` (in `0..2*nmax`, or all 0 for an all-zero group) into `codes`. Without weights each value's
/// weight is `x*x` (ggml's `rmse_type` 1 with a NULL weight pointer).
pub(super) fn make_qx_quants(nmax: i32, x: &[f32], weights: Option<&[f32]>, codes: &mut [u8]) -> f32 {
    let (max, amax) = signed_max(x);
    if amax < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let weight = |i: usize| weights.map_or(x[i] * x[i], |w| w[i]);
    let code = |iscale: f32, v: f32| nearest(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for (i, &v) in x.iter().enumerate() {
            let l = code(iscale, v) as f32;
            let w = weight(i);
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut best_iscale = -nmax as f32 / max;
    let (sumlx, suml2) = sums(best_iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for c in candidates(nmax) {
        let iscale = -c / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            best_iscale = iscale;
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    // The codes of the last accepted candidate, as C rewrites them on each acceptance.
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (nmax + code(best_iscale, v)) as u8;
    }
    scale
}

/// `make_q3_quants(n, nmax, x, L, true)` for one group: returns the scale and writes the codes `L[i] + nmax`
/// (or all 0 for an all-zero group) into `codes`. Weights are `x*x`; up to 5 passes of single-code changes.
pub(super) fn make_q3_quants(nmax: i32, x: &[f32], codes: &mut [u8]) -> f32 {
    let (max, amax) = signed_max(x);
    if amax < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let iscale = -nmax as f32 / max;
    let mut l = [0i32; 256];
    let l = &mut l[..x.len()];
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (li, &v) in l.iter_mut().zip(x) {
        *li = nearest(iscale * v).clamp(-nmax, nmax - 1);
        let w = v * v;
        sumlx += w * v * *li as f32;
        suml2 += w * *li as f32 * *li as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (li, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let slx = sumlx - w * v * *li as f32;
            if slx > 0.0 {
                let sl2 = suml2 - w * *li as f32 * *li as f32;
                let new_l = nearest(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != *li {
                    let slx = slx + w * v * new_l as f32;
                    let sl2 = sl2 + w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *li = new_l;
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
    for (c, &li) in codes.iter_mut().zip(l.iter()) {
        *c = (li + nmax) as u8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Per lane: the first value of largest magnitude (sign kept; 0 when all are zero) and whether the group counts
/// as all zero (largest magnitude below [`GROUP_MAX_EPS`]).
#[inline(always)]
fn lanes_max<const N: usize, const K: usize>(x: &[[f32; K]; N]) -> ([f32; K], [bool; K]) {
    let mut max = [0.0f32; K];
    let mut amax = [0.0f32; K];
    for row in x {
        for k in 0..K {
            let ax = row[k].abs();
            let gt = ax > amax[k];
            amax[k] = if gt { ax } else { amax[k] };
            max[k] = if gt { row[k] } else { max[k] };
        }
    }
    (max, amax.map(|a| a < GROUP_MAX_EPS))
}

/// Candidate inverse scales summed in one sweep over the values (independent sums, for instruction-level
/// parallelism; each sum is still sequential over the values).
const SWEEP: usize = 2;

/// `sumlx` and `suml2` of `make_qx_quants` for `SWEEP` candidate inverse scales at once, per lane; `wx` holds
/// the products `w*x`, computed once (the same rounding as C's `w*x[i]` in each pass).
#[inline(always)]
#[allow(clippy::type_complexity)]
fn lanes_sums<const N: usize, const K: usize>(
    nmax: i32,
    x: &[[f32; K]; N],
    w: &[[f32; K]; N],
    wx: &[[f32; K]; N],
    iscales: &[[f32; K]; SWEEP],
) -> [([f32; K], [f32; K]); SWEEP] {
    let mut out = [([0.0f32; K], [0.0f32; K]); SWEEP];
    for i in 0..N {
        for (m, iscale) in iscales.iter().enumerate() {
            for k in 0..K {
                let l = nearest(iscale[k] * x[i][k]).clamp(-nmax, nmax - 1) as f32;
                out[m].0[k] += wx[i][k] * l;
                out[m].1[k] += w[i][k] * l * l;
            }
        }
    }
    out
}

/// [`make_qx_quants`] for `K` groups of `N` values at once, transposed (`x[i][k]`, weights `w[i][k]`, which
/// the caller sets to `x*x` for ggml's NULL weights); writes the codes to `codes[i][k]`, returns the scales.
#[inline(always)]
pub(super) fn make_qx_quants_lanes<const N: usize, const K: usize>(
    nmax: i32,
    x: &[[f32; K]; N],
    w: &[[f32; K]; N],
    codes: &mut [[u8; K]; N],
) -> [f32; K] {
    let (max, zero) = lanes_max(x);
    let mut wx = [[0.0f32; K]; N];
    for i in 0..N {
        for k in 0..K {
            wx[i][k] = w[i][k] * x[i][k];
        }
    }
    // All 19 inverse scales: the first guess, then the 18 candidates.
    let mut iscales = [[0.0f32; K]; 19 + 1];
    let first = -nmax as f32;
    for k in 0..K {
        iscales[0][k] = first / max[k];
    }
    for (c, row) in candidates(nmax).iter().zip(&mut iscales[1..19]) {
        for k in 0..K {
            row[k] = -c / max[k];
        }
    }
    iscales[19] = iscales[18]; // padding for the last sweep; its sums are not used
    let mut sums = [([0.0f32; K], [0.0f32; K]); 20];
    for (pair, out) in iscales.chunks_exact(SWEEP).zip(sums.chunks_exact_mut(SWEEP)) {
        out.copy_from_slice(&lanes_sums(nmax, x, w, &wx, pair.try_into().expect("SWEEP rows")));
    }
    let (sumlx, suml2) = sums[0];
    let mut best_iscale = iscales[0];
    let mut scale = [0.0f32; K];
    let mut best = [0.0f32; K];
    for k in 0..K {
        scale[k] = if suml2[k] != 0.0 { sumlx[k] / suml2[k] } else { 0.0 };
        best[k] = scale[k] * sumlx[k];
    }
    for (iscale, (sumlx, suml2)) in iscales[1..19].iter().zip(&sums[1..19]) {
        for k in 0..K {
            let take = suml2[k] > 0.0 && sumlx[k] * sumlx[k] > best[k] * suml2[k];
            let s = sumlx[k] / suml2[k];
            best_iscale[k] = if take { iscale[k] } else { best_iscale[k] };
            scale[k] = if take { s } else { scale[k] };
            best[k] = if take { s * sumlx[k] } else { best[k] };
        }
    }
    for i in 0..N {
        for k in 0..K {
            let c = (nmax + nearest(best_iscale[k] * x[i][k]).clamp(-nmax, nmax - 1)) as u8;
            codes[i][k] = if zero[k] { 0 } else { c };
        }
    }
    for k in 0..K {
        scale[k] = if zero[k] { 0.0 } else { scale[k] };
    }
    scale
}

/// [`make_qx_quants`] for 8 groups of `N` values in lanes (as [`make_qx_quants_lanes`]): the explicit AVX2
/// kernel when the CPU has AVX2, else the portable lanes. Same bits either way.
#[inline(always)]
pub(super) fn make_qx_quants_x8<const N: usize>(
    nmax: i32,
    x: &[[f32; 8]; N],
    w: &[[f32; 8]; N],
    codes: &mut [[u8; 8]; N],
) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    if let Some(scales) = super::x86::make_qx_quants_x8(
        nmax,
        &candidates(nmax),
        x.as_flattened(),
        w.as_flattened(),
        codes.as_flattened_mut(),
    ) {
        return scales;
    }
    make_qx_quants_lanes(nmax, x, w, codes)
}

/// [`make_q3_quants`] for the 16 groups of each of `S` super-blocks (`S` 1 or 2), each laid out by
/// [`groups_to_lanes`]: the explicit AVX2 kernel when the CPU has AVX2, else the portable lanes. Same bits.
#[inline(always)]
pub(super) fn make_q3_quants_blocks<const S: usize>(
    nmax: i32,
    x: &[[[[f32; 8]; 16]; 2]; S],
    codes: &mut [[[[u8; 8]; 16]; 2]; S],
) -> [[f32; 16]; S] {
    let mut scales = [[0.0f32; 16]; S];
    #[cfg(target_arch = "x86_64")]
    if super::x86::make_q3_quants_sets(
        nmax,
        x.as_flattened().as_flattened().as_flattened(),
        codes.as_flattened_mut().as_flattened_mut().as_flattened_mut(),
        scales.as_flattened_mut(),
    )
    .is_some()
    {
        return scales;
    }
    for ((x, codes), scales) in x.iter().zip(codes.iter_mut()).zip(&mut scales) {
        for h in 0..2 {
            scales[8 * h..8 * h + 8].copy_from_slice(&make_q3_quants_lanes(nmax, &x[h], &mut codes[h]));
        }
    }
    scales
}

/// [`make_q3_quants`] for `K` groups of `N` values at once, transposed (`x[i][k]`); writes the codes to
/// `codes[i][k]`, returns the scales. A lane that changed nothing in a pass would change nothing in later passes
/// (its state is the same), so running the passes until no lane changes gives each lane C's early exit.
#[inline(always)]
pub(super) fn make_q3_quants_lanes<const N: usize, const K: usize>(
    nmax: i32,
    x: &[[f32; K]; N],
    codes: &mut [[u8; K]; N],
) -> [f32; K] {
    let (max, zero) = lanes_max(x);
    let (lo, hi) = (-nmax as f32, (nmax - 1) as f32);
    let mut iscale = [0.0f32; K];
    for k in 0..K {
        iscale[k] = lo / max[k];
    }
    let mut w = [[0.0f32; K]; N];
    let mut wx = [[0.0f32; K]; N];
    let mut l = [[0.0f32; K]; N];
    let mut sumlx = [0.0f32; K];
    let mut suml2 = [0.0f32; K];
    for i in 0..N {
        for k in 0..K {
            let v = x[i][k];
            w[i][k] = v * v;
            wx[i][k] = w[i][k] * v;
            l[i][k] = nearest(iscale[k] * v).clamp(-nmax, nmax - 1) as f32;
            sumlx[k] += wx[i][k] * l[i][k];
            suml2[k] += w[i][k] * l[i][k] * l[i][k];
        }
    }
    for _ in 0..5 {
        let mut changed = [false; K];
        for i in 0..N {
            for k in 0..K {
                let (v, li) = (x[i][k], l[i][k]);
                let slx = sumlx[k] - wx[i][k] * li;
                let sl2 = suml2[k] - w[i][k] * li * li;
                let new_l = nearest(v * sl2 / slx) as f32;
                let new_l = new_l.clamp(lo, hi);
                let slx_new = slx + wx[i][k] * new_l;
                let sl2_new = sl2 + w[i][k] * new_l * new_l;
                let take = slx > 0.0
                    && new_l != li
                    && sl2_new > 0.0
                    && slx_new * slx_new * suml2[k] > sumlx[k] * sumlx[k] * sl2_new;
                l[i][k] = if take { new_l } else { li };
                sumlx[k] = if take { slx_new } else { sumlx[k] };
                suml2[k] = if take { sl2_new } else { suml2[k] };
                changed[k] |= take;
            }
        }
        if !changed.contains(&true) {
            break;
        }
    }
    let mut scale = [0.0f32; K];
    for k in 0..K {
        let s = if suml2[k] > 0.0 { sumlx[k] / suml2[k] } else { 0.0 };
        scale[k] = if zero[k] { 0.0 } else { s };
    }
    for i in 0..N {
        for k in 0..K {
            codes[i][k] = if zero[k] { 0 } else { (l[i][k] as i32 + nmax) as u8 };
        }
    }
    scale
}

/// A k-quant super-block's 16 groups of 16 values as two sets of 8 lanes: `out[h][i][k]` is value `i` of group
/// `8h + k` (`x` is 256 values).
#[inline(always)]
pub(super) fn groups_to_lanes(x: &[f32]) -> [[[f32; 8]; 16]; 2] {
    let mut out = [[[0.0f32; 8]; 16]; 2];
    #[cfg(target_arch = "x86_64")]
    if super::x86::groups16_to_lanes(x, out.as_flattened_mut().as_flattened_mut()) {
        return out;
    }
    groups_to_lanes_portable(x, &mut out);
    out
}

/// The portable [`groups_to_lanes`].
#[inline(always)]
fn groups_to_lanes_portable(x: &[f32], out: &mut [[[f32; 8]; 16]; 2]) {
    for (g, values) in x.chunks_exact(16).enumerate() {
        for (i, &v) in values.iter().enumerate() {
            out[g / 8][i][g % 8] = v;
        }
    }
}

/// The inverse of [`groups_to_lanes`] for codes: `out[16g + i]` is `lanes[g / 8][i][g % 8]`.
#[inline(always)]
pub(super) fn lanes_to_groups(lanes: &[[[u8; 8]; 16]; 2], out: &mut [u8; 256]) {
    for (g, codes) in out.chunks_exact_mut(16).enumerate() {
        for (i, c) in codes.iter_mut().enumerate() {
            *c = lanes[g / 8][i][g % 8];
        }
    }
}

/// The re-coding step of q6_K and q3_K: for each group `g` of 16 values whose `d[g]` is not zero (NaN is not
/// zero: C's `if (!d)`), `codes = clamp(nearest_int(x / d[g]), -nmax, nmax - 1) + nmax` with a true division;
/// the other groups keep their search codes. AVX2 when available (same bytes).
#[inline(always)]
pub(super) fn recode_groups16(x: &[f32], d: &[f32; 16], nmax: i32, codes: &mut [u8; 256]) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::recode_groups16(x, d, nmax, codes) {
        return;
    }
    recode_groups16_portable(x, d, nmax, codes);
}

/// The portable [`recode_groups16`].
#[inline(always)]
fn recode_groups16_portable(x: &[f32], d: &[f32; 16], nmax: i32, codes: &mut [u8; 256]) {
    for ((xg, cg), &dg) in x.chunks_exact(16).zip(codes.chunks_exact_mut(16)).zip(d) {
        if dg == 0.0 {
            continue;
        }
        for (c, &v) in cg.iter_mut().zip(xg) {
            *c = (nearest(v / dg).clamp(-nmax, nmax - 1) + nmax) as u8;
        }
    }
}

/// Values per block of the legacy types (q4_0, q5_0).
const QK32: usize = 32;
/// Blocks searched together in lanes by [`Weighted32`].
const LEGACY_LANES: usize = 8;

/// The row statistic of `quantize_row_q4_0_impl` / `quantize_row_q5_0_impl`: `sigma2 = sum(x*x) / n`, the sum
/// sequential over the whole row.
#[inline(always)]
fn row_sigma2(x: &[f32]) -> f32 {
    let mut sum_x2 = 0.0f32;
    for &v in x {
        sum_x2 += v * v;
    }
    sum_x2 / x.len() as f32
}

/// Writes one legacy block from its scale `d` (f32, before the f16 rounding) and its 32 codes.
pub(super) type WriteBlock32 = fn(f32, &[u8; QK32], &mut [u8]);

/// ggml's `quantize_row_q4_0_impl` / `quantize_row_q5_0_impl` with importance weights, one row, scalar: each
/// block of 32 gets weights `qw * sqrtf(sigma2 + x*x)` and `make_qx_quants(32, nmax, …, 1, weights)`; `write`
/// stores the scale and the codes. The definition [`Weighted32`] is tested against.
#[cfg(test)]
pub(super) fn weighted_row_32(nmax: i32, src: &[f32], qw: &[f32], dst: &mut [u8], write: WriteBlock32) {
    let sigma2 = row_sigma2(src);
    let block_bytes = dst.len() / (src.len() / QK32);
    for ((x, q), y) in src.chunks_exact(QK32).zip(qw.chunks_exact(QK32)).zip(dst.chunks_exact_mut(block_bytes)) {
        let mut w = [0.0f32; QK32];
        for ((w, &q), &v) in w.iter_mut().zip(q).zip(x) {
            *w = q * (sigma2 + v * v).sqrt();
        }
        let mut codes = [0u8; QK32];
        let d = make_qx_quants(nmax, x, Some(&w), &mut codes);
        write(d, &codes, y);
    }
}

/// Lane work: [`weighted_row_32`] with the searches of 8 blocks at a time in lanes (a short last group is padded
/// with zero blocks whose results are dropped).
pub(super) struct Weighted32<'a> {
    /// `nmax` of the type (8 for q4_0, 16 for q5_0).
    pub nmax: i32,
    /// One row of finite values.
    pub src: &'a [f32],
    /// Its importance weights (finite, non-negative).
    pub qw: &'a [f32],
    /// The row's blocks.
    pub dst: &'a mut [u8],
    /// Stores one block.
    pub write: WriteBlock32,
}

impl LaneWork for Weighted32<'_> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        const K: usize = LEGACY_LANES;
        let sigma2 = row_sigma2(self.src);
        let block_bytes = self.dst.len() / (self.src.len() / QK32);
        let groups = self.src.chunks(QK32 * K).zip(self.qw.chunks(QK32 * K)).zip(self.dst.chunks_mut(block_bytes * K));
        for ((xs, qs), ys) in groups {
            let mut xt = [[0.0f32; K]; QK32];
            let mut wt = [[0.0f32; K]; QK32];
            for (k, (x, q)) in xs.chunks_exact(QK32).zip(qs.chunks_exact(QK32)).enumerate() {
                for i in 0..QK32 {
                    xt[i][k] = x[i];
                    wt[i][k] = q[i] * (sigma2 + x[i] * x[i]).sqrt();
                }
            }
            let mut ct = [[0u8; K]; QK32];
            let d = make_qx_quants_x8(self.nmax, &xt, &wt, &mut ct);
            for (k, y) in ys.chunks_exact_mut(block_bytes).enumerate() {
                let codes: [u8; QK32] = std::array::from_fn(|i| ct[i][k]);
                (self.write)(d[k], &codes, y);
            }
        }
    }
}

/// Inputs shared by the tests of the symmetric types.
#[cfg(test)]
pub(super) mod test_inputs {
    /// `n_blocks` super-blocks (256 values each) of many shapes (see `lcg_block_values`), with magnitudes above
    /// 1e8 scaled down so squares and sums stay finite (larger values make ggml's sums NaN; the Python tests cover
    /// them against the C code).
    pub fn superblocks(n_blocks: usize) -> Vec<f32> {
        let mut v = crate::quant::test_util::lcg_block_values(n_blocks * 8);
        for x in &mut v {
            if x.abs() > 1e8 {
                *x *= 1e-30;
            }
        }
        v
    }

    /// The bytes of `quantize` (a scalar block definition) run on each super-block of `src` with its weights.
    pub fn per_superblock<const B: usize>(
        src: &[f32],
        weights: Option<&[f32]>,
        quantize: impl Fn(&[f32; 256], Option<&[f32; 256]>) -> [u8; B],
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(src.len() / 256 * B);
        for (b, x) in src.chunks_exact(256).enumerate() {
            let w = weights.map(|w| w[256 * b..256 * b + 256].try_into().unwrap());
            out.extend(quantize(x.try_into().unwrap(), w));
        }
        out
    }

    /// `n` importance weights cycling through zero, near-zero, ordinary and large ones.
    pub fn weights(n: usize) -> Vec<f32> {
        (0..n).map(|i| [0.0, 1e-9, 0.5, 3.0, 7e4][i * 31 % 5]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transposes `K` groups of `N` values (group-major) into lanes.
    fn to_lanes<const N: usize, const K: usize>(groups: &[f32]) -> [[f32; K]; N] {
        let mut out = [[0.0f32; K]; N];
        for (k, g) in groups.chunks_exact(N).enumerate() {
            for (i, &v) in g.iter().enumerate() {
                out[i][k] = v;
            }
        }
        out
    }

    #[test]
    fn nearest_rounds_ties_to_even_and_wraps_like_release_c() {
        assert_eq!([nearest(0.5), nearest(1.5), nearest(2.5), nearest(-0.5), nearest(-1.5)], [0, 2, 2, 0, -2]);
        assert_eq!([nearest(31.49), nearest(-31.51), nearest(4_194_303.0)], [31, -32, 4_194_303]);
        // NaN: the quiet NaN's mantissa 0x400000 minus 2^22.
        assert_eq!(nearest(f32::NAN), 0);
    }

    #[test]
    fn golden_make_qx_quants_on_a_ramp() {
        // x = [-8, -7, ..., 7], nmax 8: max = -8 (the first of largest magnitude), first guess iscale = -8/-8 = 1
        // gives l = x exactly, so sumlx = suml2 = sum w*x*x and scale = 1. A candidate 1 + 0.1*is rounds some
        // codes off the values, so it can only lower sumlx^2/suml2: none is taken. Codes are x + 8 = 0..15.
        let x: Vec<f32> = (0..16).map(|i| i as f32 - 8.0).collect();
        let mut codes = [0u8; 16];
        assert_eq!(make_qx_quants(8, &x, None, &mut codes), 1.0);
        assert_eq!(codes.to_vec(), (0..16).collect::<Vec<u8>>());
        // Weights do not change an exact fit.
        assert_eq!(make_qx_quants(8, &x, Some(&[0.5; 16]), &mut codes), 1.0);
    }

    #[test]
    fn golden_all_zero_and_tiny_groups() {
        let mut codes = [7u8; 16];
        assert_eq!(make_qx_quants(32, &[0.0; 16], None, &mut codes).to_bits(), 0);
        assert_eq!(codes, [0; 16]);
        let mut x = [-0.0f32; 16];
        x[3] = 9e-16; // below GROUP_MAX_EPS
        codes = [7; 16];
        assert_eq!(make_q3_quants(4, &x, &mut codes).to_bits(), 0);
        assert_eq!(codes, [0; 16]);
    }

    #[test]
    fn golden_make_q3_quants_one_hot() {
        // One non-zero value v at index 2: max = v, iscale = -4/v, its l = -4 (clamped range -4..=3), the rest
        // 0. sumlx = v^3 * -4, suml2 = v^2 * 16: scale = -v/4. The refinement: for i = 2, slx = 0 (not > 0),
        // for the zeros w = 0 changes nothing. Codes l + 4.
        let mut x = [0.0f32; 16];
        x[2] = 2.0;
        let mut codes = [0u8; 16];
        assert_eq!(make_q3_quants(4, &x, &mut codes), -0.5);
        let mut expected = [4u8; 16];
        expected[2] = 0;
        assert_eq!(codes, expected);
    }

    /// Groups of 16 with many shapes: random, integers and halves, tiny, huge, sparse, constant.
    fn groups(n: usize) -> Vec<f32> {
        let mut v = crate::quant::test_util::lcg_block_values(n.div_ceil(2));
        v.truncate(n * 16);
        // Constant groups and ties.
        for (g, chunk) in v.chunks_exact_mut(16).enumerate().filter(|(g, _)| g % 13 == 0) {
            chunk.fill(if g % 2 == 0 { 0.75 } else { -3.0 });
        }
        // Keep squares and cubes finite: the C oracle aborts on the NaN sums of larger values.
        v.iter().map(|&x| if x.abs() > 1e11 { x * 1e-30 } else { x }).collect()
    }

    #[test]
    fn lanes_equal_scalar_make_qx_quants() {
        let xs = groups(16 * 40);
        for (t, chunk) in xs.chunks_exact(16 * 16).enumerate() {
            let x: [[f32; 16]; 16] = to_lanes(chunk);
            let weighted = t % 2 == 1;
            let wv: Vec<f32> = (0..256).map(|i| ((i * 7 % 5) as f32) * 0.3).collect();
            let w: [[f32; 16]; 16] =
                if weighted { to_lanes(&wv) } else { to_lanes(&chunk.iter().map(|v| v * v).collect::<Vec<_>>()) };
            let mut codes = [[0u8; 16]; 16];
            let scales = make_qx_quants_lanes(32, &x, &w, &mut codes);
            for k in 0..16 {
                let g = &chunk[16 * k..16 * k + 16];
                let mut c = [0u8; 16];
                let s = make_qx_quants(32, g, weighted.then(|| &wv[16 * k..16 * k + 16]), &mut c);
                assert_eq!(s.to_bits(), scales[k].to_bits(), "group {t}/{k}: {g:?}");
                assert_eq!(c.to_vec(), codes.iter().map(|r| r[k]).collect::<Vec<_>>(), "group {t}/{k}");
            }
        }
    }

    /// The AVX2 kernel and the portable 8-lane code against the scalar search, for groups of 16 and 32.
    fn check_x8<const N: usize>(nmax: i32) {
        let xs = groups(8 * N / 16 * 60);
        for (t, chunk) in xs.chunks_exact(8 * N).enumerate() {
            let x: [[f32; 8]; N] = to_lanes(chunk);
            let wv: Vec<f32> = (0..8 * N).map(|i| [0.0, 1e-9, 0.5, 3.0, 7e4][(i * 7 + t) % 5]).collect();
            let sq: Vec<f32> = chunk.iter().map(|v| v * v).collect();
            let w: [[f32; 8]; N] = to_lanes(if t % 2 == 1 { &wv } else { &sq });
            let mut portable = [[0u8; 8]; N];
            let portable_scales = make_qx_quants_lanes(nmax, &x, &w, &mut portable);
            #[cfg(target_arch = "x86_64")]
            let (simd_scales, simd) = {
                assert!(is_x86_feature_detected!("avx2"), "this test needs AVX2 to exercise the AVX2 kernel");
                let mut codes = [[0u8; 8]; N];
                let scales = crate::quant::x86::make_qx_quants_x8(
                    nmax,
                    &candidates(nmax),
                    x.as_flattened(),
                    w.as_flattened(),
                    codes.as_flattened_mut(),
                )
                .unwrap();
                (scales, codes)
            };
            for k in 0..8 {
                let g: Vec<f32> = (0..N).map(|i| x[i][k]).collect();
                let wg: Vec<f32> = (0..N).map(|i| w[i][k]).collect();
                let mut c = vec![0u8; N];
                let s = make_qx_quants(nmax, &g, (t % 2 == 1).then_some(&wg[..]), &mut c);
                let column = |codes: &[[u8; 8]; N]| codes.iter().map(|r| r[k]).collect::<Vec<_>>();
                assert_eq!(s.to_bits(), portable_scales[k].to_bits(), "portable {t}/{k}: {g:?}");
                assert_eq!(c, column(&portable), "portable {t}/{k}");
                #[cfg(target_arch = "x86_64")]
                {
                    assert_eq!(s.to_bits(), simd_scales[k].to_bits(), "avx2 {t}/{k}: {g:?}");
                    assert_eq!(c, column(&simd), "avx2 {t}/{k}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_recode_equals_portable() {
        assert!(is_x86_feature_detected!("avx2"), "this test needs AVX2 to exercise the AVX2 kernel");
        let xs = groups(16 * 20);
        for (t, x) in xs.chunks_exact(256).enumerate() {
            // Scales: zero, -0, NaN (re-codes), tiny (huge quotients), ordinary, negative.
            let d: [f32; 16] = std::array::from_fn(|g| {
                [0.0, -0.0, f32::NAN, 1e-38, 0.37, -2.5, 1e-3, 3e30][(g + t) % 8] * if g % 3 == 0 { -1.0 } else { 1.0 }
            });
            for nmax in [4, 32] {
                let start: [u8; 256] = std::array::from_fn(|i| (i * 7 % 11) as u8);
                let (mut a, mut b) = (start, start);
                assert!(crate::quant::x86::recode_groups16(x, &d, nmax, &mut a));
                recode_groups16_portable(x, &d, nmax, &mut b);
                assert_eq!(a, b, "set {t}, nmax {nmax}");
            }
        }
    }

    #[test]
    fn x8_dispatch_equals_scalar_on_infinite_values() {
        // q3_K's scale search can see overflowed (infinite) group scales: nearest_int then meets NaN and infinity.
        let mut x = [[0.5f32; 8]; 16];
        for (i, row) in x.iter_mut().enumerate() {
            for (k, v) in row.iter_mut().enumerate() {
                *v = match (i + k) % 4 {
                    0 => f32::NEG_INFINITY,
                    1 => f32::INFINITY,
                    2 => -3.0,
                    _ => 1e30,
                };
            }
        }
        x[3] = [f32::INFINITY; 8];
        let w = [[2.0f32; 8]; 16];
        let mut codes = [[0u8; 8]; 16];
        let scales = make_qx_quants_x8(32, &x, &w, &mut codes);
        #[cfg(target_arch = "x86_64")]
        assert!(crate::quant::x86::make_qx_quants_x8(
            32,
            &candidates(32),
            x.as_flattened(),
            w.as_flattened(),
            &mut [0; 128]
        )
        .is_none());
        for k in 0..8 {
            let g: Vec<f32> = (0..16).map(|i| x[i][k]).collect();
            let mut c = [0u8; 16];
            let s = make_qx_quants(32, &g, Some(&[2.0; 16]), &mut c);
            assert_eq!(s.to_bits(), scales[k].to_bits(), "lane {k}");
            assert_eq!(c.to_vec(), codes.iter().map(|r| r[k]).collect::<Vec<_>>(), "lane {k}");
        }
    }

    #[test]
    fn x8_kernels_equal_scalar_make_qx_quants() {
        check_x8::<16>(32);
        check_x8::<16>(4);
        check_x8::<32>(8);
        check_x8::<32>(16);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernel_equals_scalar_make_q3_quants() {
        assert!(is_x86_feature_detected!("avx2"), "this test needs AVX2 to exercise the AVX2 kernel");
        let xs = groups(16 * 60);
        for blocks in [1, 2] {
            for (t, chunk) in xs.chunks_exact(256 * blocks).enumerate() {
                let x: Vec<[[[f32; 8]; 16]; 2]> = chunk.chunks_exact(256).map(groups_to_lanes).collect();
                let mut codes = vec![[[[0u8; 8]; 16]; 2]; blocks];
                let mut scales = vec![0.0f32; 16 * blocks];
                crate::quant::x86::make_q3_quants_sets(
                    4,
                    x.as_flattened().as_flattened().as_flattened(),
                    codes.as_flattened_mut().as_flattened_mut().as_flattened_mut(),
                    &mut scales,
                )
                .unwrap();
                for (b, block) in chunk.chunks_exact(256).enumerate() {
                    let mut flat = [0u8; 256];
                    lanes_to_groups(&codes[b], &mut flat);
                    for (k, g) in block.chunks_exact(16).enumerate() {
                        let mut c = [0u8; 16];
                        let s = make_q3_quants(4, g, &mut c);
                        assert_eq!(s.to_bits(), scales[16 * b + k].to_bits(), "group {t}/{b}/{k}: {g:?}");
                        assert_eq!(c, flat[16 * k..16 * k + 16], "group {t}/{b}/{k}");
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_groups_to_lanes_is_the_index_map() {
        assert!(is_x86_feature_detected!("avx2"), "{}", crate::quant::test_util::NO_SIMD);
        // Distinct values: every element's destination is checked against the index map itself.
        let x: Vec<f32> = (0..256).map(|i| i as f32 * 0.5 - 7.0).collect();
        let mut out = [0.0f32; 256];
        assert!(crate::quant::x86::groups16_to_lanes(&x, &mut out));
        for g in 0..16 {
            for i in 0..16 {
                assert_eq!(out[128 * (g / 8) + 8 * i + g % 8], x[16 * g + i], "group {g} value {i}");
            }
        }
        let mut portable = [[[0.0f32; 8]; 16]; 2];
        groups_to_lanes_portable(&x, &mut portable);
        assert_eq!(portable.as_flattened().as_flattened(), &out[..]);
    }

    #[test]
    fn lanes_equal_scalar_make_q3_quants() {
        let xs = groups(16 * 40);
        for (t, chunk) in xs.chunks_exact(16 * 16).enumerate() {
            let x: [[f32; 16]; 16] = to_lanes(chunk);
            let mut codes = [[0u8; 16]; 16];
            let scales = make_q3_quants_lanes(4, &x, &mut codes);
            for k in 0..16 {
                let g = &chunk[16 * k..16 * k + 16];
                let mut c = [0u8; 16];
                let s = make_q3_quants(4, g, &mut c);
                assert_eq!(s.to_bits(), scales[k].to_bits(), "group {t}/{k}: {g:?}");
                assert_eq!(c.to_vec(), codes.iter().map(|r| r[k]).collect::<Vec<_>>(), "group {t}/{k}");
            }
        }
    }
}
