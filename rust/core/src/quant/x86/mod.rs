//! Explicit x86-64 SIMD kernels (AVX2, F16C), selected at run time. This folder is the only place of the crate's
//! quantization code that uses `unsafe`; it takes slices and never imports the block files.
//!
//! Each safe wrapper returns `None`/`false` when the CPU lacks the feature, so the caller falls back to the portable
//! scalar code, which gives the same bytes (the unit tests compare the two on the same inputs). The kernels do
//! exactly the C reference's f32 operations in the same order: a multiply and a separate add (never an FMA), the
//! same division and reciprocal computed in scalar code per block.

use std::arch::x86_64::*;

use super::float::{f16_bits_to_f32, f32_to_f16_bits};
use super::LaneWork;

/// The patch engine's low-rank add and quality sums (the crate's other `unsafe` intrinsics, kept here too).
pub(crate) mod lowrank;

/// Elements per q4_0 / q5_0 / q8_0 block.
const QK4_0: usize = 32;
const QK8_0: usize = 32;

/// A portable quantizer of one whole block (`src` one block of values, `dst` its bytes): what the SIMD kernels
/// hand the rare blocks they do not handle themselves, so this module never depends on the block files.
pub(in crate::quant) type ScalarBlock = fn(&[f32], &mut [u8]);

fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
}

/// Runs lane-generic `work` (see [`LaneWork`]) compiled for AVX2 when the CPU has it, else hands it back: its
/// `#[inline(always)]` `run` is inlined into an AVX2 function, where the compiler turns the lane loops into AVX2
/// instructions (never fused multiply-adds: AVX2 does not enable FMA).
#[inline(always)]
pub(in crate::quant) fn with_avx2<W: LaneWork>(work: W) -> Result<W::Output, W> {
    #[target_feature(enable = "avx2")]
    fn run<W: LaneWork>(work: W) -> W::Output {
        work.run()
    }
    if !has_avx2() {
        return Err(work);
    }
    // SAFETY: AVX2 is available (checked above); `run` only calls safe code.
    Ok(unsafe { run(work) })
}

/// Hints the CPU to load `x` (each of its 64-byte lines) into the caches. For the k-quant searches, which spend
/// thousands of cycles on each super-block: the hardware prefetcher does not run that far ahead, and the first
/// touch of each super-block cost a tenth of q3_K's time.
#[inline(always)]
pub(in crate::quant) fn prefetch(x: &[f32]) {
    for line in x.chunks(16) {
        // SAFETY: a prefetch is only a hint and never faults; its instruction (SSE) is part of x86-64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
}

fn has_avx2_f16c() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
}

/// q4_0 quantize of whole blocks with AVX2 (blocks whose inverse scale overflows go to `scalar`); `None` without
/// AVX2. Same bytes as `quantize_row_q4_0_ref`.
pub(in crate::quant) fn q4_0_quantize(src: &[f32], dst: &mut [u8], scalar: ScalarBlock) -> Option<bool> {
    if !has_avx2() {
        return None;
    }
    assert!(src.len().is_multiple_of(QK4_0) && dst.len() == src.len() / QK4_0 * 18, "q4_0 quantize: buffer sizes");
    // SAFETY: AVX2 is available (checked above); the kernel only touches memory through in-bounds slice chunks.
    Some(unsafe { q4_0_quantize_avx2(src, dst, scalar) })
}

/// q5_0 quantize of whole blocks with AVX2 (blocks whose inverse scale overflows go to `scalar`); `None` without
/// AVX2. Same bytes as `quantize_row_q5_0_ref`.
pub(in crate::quant) fn q5_0_quantize(src: &[f32], dst: &mut [u8], scalar: ScalarBlock) -> Option<bool> {
    if !has_avx2() {
        return None;
    }
    assert!(src.len().is_multiple_of(QK4_0) && dst.len() == src.len() / QK4_0 * 22, "q5_0 quantize: buffer sizes");
    // SAFETY: AVX2 is available (checked above); the kernel only touches memory through in-bounds slice chunks.
    Some(unsafe { q5_0_quantize_avx2(src, dst, scalar) })
}

/// ggml's `make_qx_quants(n, nmax, x, L, 1, w)` for 8 groups in the 8 AVX2 lanes; `None` without AVX2 or when a
/// value of `x` is not finite (the caller then uses the portable lanes).
///
/// `x` and `w` hold `n <= 32` rows of 8 (row `i` is value `i` of each group), `candidates` the 18 numerators
/// `nmax + 0.1f*is` in C order; `codes` receives `n` rows of 8 codes; returns the 8 scales. Same bits as the scalar
/// search (see `search_symmetric`): every lane does its group's operations in C order. `nearest_int` becomes
/// `_mm256_round_ps` to nearest even, equal for `|v| < 2^22`: with finite values every argument is `iscale * x`
/// with `|x| <= |max|` and `|max| >= 1e-15`, so at most `nmax + 1` in magnitude (lanes of all-zero groups compute
/// garbage that is masked out). An infinite `x` (reachable when q3_K's scale search runs on overflowed group
/// scales) would give `nearest_int`'s NaN/infinity results instead, hence the fallback.
pub(in crate::quant) fn make_qx_quants_x8(
    nmax: i32,
    candidates: &[f32; 18],
    x: &[f32],
    w: &[f32],
    codes: &mut [u8],
) -> Option<[f32; 8]> {
    if !has_avx2() {
        return None;
    }
    assert!(
        x.len().is_multiple_of(8) && x.len() <= 8 * MAX_ROWS && w.len() == x.len() && codes.len() == x.len(),
        "make_qx_quants_x8: buffer sizes"
    );
    assert!((1..=64).contains(&nmax), "make_qx_quants_x8: nmax");
    // SAFETY: AVX2 is available (checked above); the kernel only reads and writes within the checked slices.
    unsafe { make_qx_quants_avx2(nmax, candidates, x, w, codes) }
}

/// ggml's `make_q3_quants(n, nmax, x, L, true)` for `8 * sets` groups (`sets` 2 or 4: one or two q3_K
/// super-blocks) in the lanes of `sets` AVX2 vectors, which give as many independent chains of the sequential
/// refinement (instruction-level parallelism); `None` without AVX2 or when a value of `x` is not finite (the
/// caller then uses the portable lanes).
///
/// `x` holds `sets` sets of `n <= 32` rows of 8 (set `s`, row `i`, lane `k`: value `i` of group `8s + k`),
/// `codes` receives the codes in the same layout and `scales` the `8 * sets` scales. Same bits as the scalar
/// search: the first guess `nearest_int(iscale * x)` is bounded as in [`make_qx_quants_x8`] (`_mm256_round_ps`),
/// the refinement's `nearest_int(x * sl2 / slx)` is not (a tiny `slx` makes it huge), so it uses ggml's
/// `+ 12582912` bit trick.
pub(in crate::quant) fn make_q3_quants_sets(nmax: i32, x: &[f32], codes: &mut [u8], scales: &mut [f32]) -> Option<()> {
    if !has_avx2() {
        return None;
    }
    let sets = scales.len() / 8;
    assert!(
        matches!(sets, 2 | 4) && scales.len() == 8 * sets && x.len() == 8 * sets * Q3_ROWS && codes.len() == x.len(),
        "make_q3_quants_sets: buffer sizes"
    );
    assert!((1..=64).contains(&nmax), "make_q3_quants_sets: nmax");
    // SAFETY: AVX2 is available (checked above); the kernel only reads and writes within the checked slices.
    let out = unsafe {
        if sets == 2 {
            make_q3_quants_avx2::<2, Q3_ROWS>(nmax, x, codes, scales)
        } else {
            make_q3_quants_avx2::<4, Q3_ROWS>(nmax, x, codes, scales)
        }
    };
    out.then_some(())
}

/// The re-coding step of q6_K and q3_K with AVX2: for each group `g` of 16 values whose `d[g]` is not zero (NaN
/// is not zero, as in C's `if (!d)`), `codes[16g + i] = clamp(nearest_int(x[16g + i] / d[g]), -nmax, nmax - 1) +
/// nmax`, a true division and ggml's exact `nearest_int` (the quotient may be huge or NaN); other groups keep
/// their codes. False without AVX2.
pub(in crate::quant) fn recode_groups16(x: &[f32], d: &[f32], nmax: i32, codes: &mut [u8]) -> bool {
    if !has_avx2() {
        return false;
    }
    assert!(x.len() == 16 * d.len() && codes.len() == x.len(), "recode_groups16: buffer sizes");
    assert!((1..=64).contains(&nmax), "recode_groups16: nmax");
    // SAFETY: AVX2 is available (checked above); the kernel only touches memory through in-bounds slice chunks.
    unsafe { recode_groups16_avx2(x, d, nmax, codes) };
    true
}

/// A k-quant super-block's 16 groups of 16 values (`x`, 256 values) in the lane layout of q3_K/q6_K's searches:
/// `out[128h + 8i + k] = x[16(8h + k) + i]`, four 8 x 8 transposes in registers (the scalar scatter cost as much
/// as a search pass). False without AVX2.
pub(in crate::quant) fn groups16_to_lanes(x: &[f32], out: &mut [f32]) -> bool {
    if !has_avx2() {
        return false;
    }
    assert!(x.len() == 256 && out.len() == 256, "groups16_to_lanes: buffer sizes");
    // SAFETY: AVX2 is available (checked above); loads and stores go through in-bounds slices of 8 values.
    unsafe { groups16_to_lanes_avx2(x, out) };
    true
}

#[target_feature(enable = "avx2")]
unsafe fn groups16_to_lanes_avx2(x: &[f32], out: &mut [f32]) {
    for h in 0..2 {
        for half in 0..2 {
            // Row k: values 8*half..8*half + 8 of group 8h + k.
            let r: [__m256; 8] =
                std::array::from_fn(|k| _mm256_loadu_ps(x[16 * (8 * h + k) + 8 * half..][..8].as_ptr()));
            let t = transpose_8x8(r);
            for (j, row) in t.iter().enumerate() {
                _mm256_storeu_ps(out[128 * h + 8 * (8 * half + j)..][..8].as_mut_ptr(), *row);
            }
        }
    }
}

/// The transpose of an 8 x 8 matrix of f32 held as 8 rows: output row `j` holds element `j` of every input row.
#[target_feature(enable = "avx2")]
#[inline]
fn transpose_8x8(r: [__m256; 8]) -> [__m256; 8] {
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let s = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    [
        _mm256_permute2f128_ps::<0x20>(s[0], s[4]),
        _mm256_permute2f128_ps::<0x20>(s[1], s[5]),
        _mm256_permute2f128_ps::<0x20>(s[2], s[6]),
        _mm256_permute2f128_ps::<0x20>(s[3], s[7]),
        _mm256_permute2f128_ps::<0x31>(s[0], s[4]),
        _mm256_permute2f128_ps::<0x31>(s[1], s[5]),
        _mm256_permute2f128_ps::<0x31>(s[2], s[6]),
        _mm256_permute2f128_ps::<0x31>(s[3], s[7]),
    ]
}

/// q3_K dequantize of whole blocks with AVX2; false without AVX2. Same values as `dequantize_row_q3_K`:
/// `(d * (sc - 32)) * (q - 4)` per value, with the block layout of `block_q3_K` (see `q3_k.rs`).
pub(in crate::quant) fn q3_k_dequantize(src: &[u8], dst: &mut [f32]) -> bool {
    if !has_avx2() {
        return false;
    }
    assert!(dst.len().is_multiple_of(256) && src.len() == dst.len() / 256 * 110, "q3_K dequantize: buffer sizes");
    // SAFETY: AVX2 is available (checked above); the kernel only touches memory through in-bounds slice chunks.
    unsafe { q3_k_dequantize_avx2(src, dst) };
    true
}

/// q4_0 dequantize of whole blocks with AVX2; false without AVX2. Same values as `dequantize_row_q4_0`.
pub(in crate::quant) fn q4_0_dequantize(src: &[u8], dst: &mut [f32]) -> bool {
    if !has_avx2() {
        return false;
    }
    assert!(dst.len().is_multiple_of(QK4_0) && src.len() == dst.len() / QK4_0 * 18, "q4_0 dequantize: buffer sizes");
    // SAFETY: AVX2 is available (checked above); the kernel only touches memory through in-bounds slice chunks.
    unsafe { q4_0_dequantize_avx2(src, dst) };
    true
}

/// q8_0 quantize of whole blocks with AVX2 (blocks whose inverse scale overflows go to `scalar`); `None` without
/// AVX2. Same bytes as `quantize_row_q8_0_ref`.
pub(in crate::quant) fn q8_0_quantize(src: &[f32], dst: &mut [u8], scalar: ScalarBlock) -> Option<bool> {
    if !has_avx2() {
        return None;
    }
    assert!(src.len().is_multiple_of(QK8_0) && dst.len() == src.len() / QK8_0 * 34, "q8_0 quantize: buffer sizes");
    // SAFETY: AVX2 is available (checked above); the kernel only touches memory through in-bounds slice chunks.
    Some(unsafe { q8_0_quantize_avx2(src, dst, scalar) })
}

/// q8_0 dequantize of whole blocks with AVX2; false without AVX2. Same values as `dequantize_row_q8_0`.
pub(in crate::quant) fn q8_0_dequantize(src: &[u8], dst: &mut [f32]) -> bool {
    if !has_avx2() {
        return false;
    }
    assert!(dst.len().is_multiple_of(QK8_0) && src.len() == dst.len() / QK8_0 * 34, "q8_0 dequantize: buffer sizes");
    // SAFETY: AVX2 is available (checked above); the kernel only touches memory through in-bounds slice chunks.
    unsafe { q8_0_dequantize_avx2(src, dst) };
    true
}

/// q4_1 (`BITS` 4, 20-byte blocks) or q5_1 (`BITS` 5, 24-byte blocks) quantize of whole blocks with AVX2 and F16C
/// (blocks whose min or max is zero, or whose scale or inverse scale is not finite, go to `scalar`); `None` without
/// them.
/// Same bytes as `quantize_row_q4_1_ref` / `quantize_row_q5_1_ref`.
pub(in crate::quant) fn q4_1_q5_1_quantize<const BITS: u32>(
    src: &[f32],
    dst: &mut [u8],
    scalar: ScalarBlock,
) -> Option<bool> {
    if !has_avx2_f16c() {
        return None;
    }
    let bb = if BITS == 4 { 20 } else { 24 };
    assert!(src.len().is_multiple_of(QK4_0) && dst.len() == src.len() / QK4_0 * bb, "q4_1/q5_1 quantize: sizes");
    // SAFETY: AVX2 is available (checked above); the kernel only touches memory through in-bounds slice chunks.
    Some(unsafe { q4_1_q5_1_quantize_avx2::<BITS>(src, dst, scalar) })
}

/// q4_1 (`BITS` 4) or q5_1 (`BITS` 5) dequantize of whole blocks with AVX2; false without AVX2. Same values as
/// `dequantize_row_q4_1` / `dequantize_row_q5_1`.
///
/// Blocks whose `d` or `m` is infinite or NaN go to `scalar`: with two NaN operands x86 returns the first one's
/// payload, and the compiler may swap the operands of a vector addition (it does not preserve NaN payloads), so
/// only the scalar code keeps C's `q*d + m` order there.
pub(in crate::quant) fn q4_1_q5_1_dequantize<const BITS: u32>(
    src: &[u8],
    dst: &mut [f32],
    scalar: fn(&[u8], &mut [f32]),
) -> bool {
    if !has_avx2() {
        return false;
    }
    let bb = if BITS == 4 { 20 } else { 24 };
    assert!(dst.len().is_multiple_of(QK4_0) && src.len() == dst.len() / QK4_0 * bb, "q4_1/q5_1 dequantize: sizes");
    // SAFETY: AVX2 is available (checked above); the kernel only touches memory through in-bounds slice chunks.
    unsafe { q4_1_q5_1_dequantize_avx2::<BITS>(src, dst, scalar) };
    true
}

/// q2_K dequantize of whole 84-byte super-blocks with AVX2; false without AVX2. Same values as
/// `dequantize_row_q2_K`.
pub(in crate::quant) fn q2_k_dequantize(src: &[u8], dst: &mut [f32]) -> bool {
    if !has_avx2() {
        return false;
    }
    assert!(dst.len().is_multiple_of(256) && src.len() == dst.len() / 256 * 84, "q2_K dequantize: buffer sizes");
    // SAFETY: AVX2 is available (checked above); the kernel only touches memory through in-bounds slice chunks.
    unsafe { q2_k_dequantize_avx2(src, dst) };
    true
}

/// f32 -> f16 (little-endian bytes) with F16C, round to nearest even; `None` without F16C/AVX2, else whether every
/// input was finite (the output is then unspecified).
pub(in crate::quant) fn f32_to_f16_row(src: &[f32], dst: &mut [u8]) -> Option<bool> {
    if !has_avx2_f16c() {
        return None;
    }
    assert_eq!(dst.len(), src.len() * 2, "f16 quantize: buffer sizes");
    // SAFETY: AVX2 and F16C are available (checked above); the kernel only touches memory through in-bounds
    // slice chunks.
    Some(unsafe { f32_to_f16_f16c(src, dst) })
}

/// f16 (little-endian bytes) -> f32 with F16C; false without F16C/AVX2.
pub(in crate::quant) fn f16_to_f32_row(src: &[u8], dst: &mut [f32]) -> bool {
    if !has_avx2_f16c() {
        return false;
    }
    assert_eq!(src.len(), dst.len() * 2, "f16 dequantize: buffer sizes");
    // SAFETY: AVX2 and F16C are available (checked above); the kernel only touches memory through in-bounds
    // slice chunks.
    unsafe { f16_to_f32_f16c(src, dst) };
    true
}

// ---- kernels: every pointer below comes from a slice chunk of exactly the length the loads/stores cover ----

/// Asks for the block (both of its 64-byte lines) 32 blocks (4 KiB) ahead of `x`. A single thread streaming from
/// memory is bound by the latency of its misses, not by bandwidth: asking one line 1 KiB ahead left q4_1 at 40%
/// of its in-cache speed on a 16.8 MB array, 4 KiB and both lines ran 2.4x faster there (CPU-time A/B).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn prefetch_ahead(x: &[f32]) {
    // A prefetch is only a hint: it never faults, even past the end of the slice (hence `wrapping_add`).
    _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().wrapping_add(1024).cast());
    _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().wrapping_add(1040).cast());
}

/// Loads the 32 floats of a block (4 unaligned loads).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load_block(x: &[f32]) -> [__m256; 4] {
    debug_assert!(x.len() >= 32);
    let p = x.as_ptr();
    [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))]
}

/// `|x|` bit patterns of the 4 vectors, and their largest one across all 32 lanes (integer order equals float
/// order for non-negative floats; inf/NaN patterns are the largest).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn abs_bits_and_max(v: &[__m256; 4]) -> ([__m256i; 4], u32) {
    let mask = _mm256_set1_epi32(0x7FFF_FFFF);
    let a = [
        _mm256_and_si256(_mm256_castps_si256(v[0]), mask),
        _mm256_and_si256(_mm256_castps_si256(v[1]), mask),
        _mm256_and_si256(_mm256_castps_si256(v[2]), mask),
        _mm256_and_si256(_mm256_castps_si256(v[3]), mask),
    ];
    let m = _mm256_max_epi32(_mm256_max_epi32(a[0], a[1]), _mm256_max_epi32(a[2], a[3]));
    let m = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256::<1>(m));
    let m = _mm_max_epi32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
    let m = _mm_max_epi32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
    (a, _mm_cvtsi128_si32(m) as u32)
}

/// One block of a legacy symmetric type (q4_0, q5_0) as [`legacy_codes`] sees it.
enum LegacyBlock {
    /// The block holds NaN or an infinity.
    NonFinite,
    /// `1/d` overflows: the caller leaves the block to the scalar definition.
    Tiny,
    /// The f32 scale `d` and the 32 codes in 4 vectors of 8 (elements 0-7, 8-15, 16-23, 24-31).
    Codes(f32, [__m256i; 4]),
}

/// The shared part of `quantize_row_q4_0_ref` / `quantize_row_q5_0_ref`: `max` the first element of largest
/// magnitude (sign kept; +0.0 for an all-zero block, as C starts from `max = 0.0f` and only replaces it on a
/// strictly larger magnitude), `d = max / div`, `id = 1/d` (0 when `d == 0`), codes `min(top, trunc(x*id +
/// bias))` with the product and the sum rounded separately (never fused). A finite `id` keeps every `x*id + bias`
/// in `[0.5, 2*bias]`, so the int32 truncation equals C's `(int8_t)`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn legacy_codes(x: &[f32], div: f32, bias: f32, top: i32) -> LegacyBlock {
    let v = load_block(x);
    let (a, amax_bits) = abs_bits_and_max(&v);
    if amax_bits >= 0x7F80_0000 {
        return LegacyBlock::NonFinite;
    }
    let max = if amax_bits == 0 {
        0.0f32
    } else {
        let t = _mm256_set1_epi32(amax_bits as i32);
        let mut mask = 0u32;
        for (k, ak) in a.iter().enumerate() {
            mask |= (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(*ak, t))) as u32) << (8 * k);
        }
        x[mask.trailing_zeros() as usize]
    };
    let d = max / div;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    if !id.is_finite() {
        return LegacyBlock::Tiny;
    }
    let (idv, biasv, topv) = (_mm256_set1_ps(id), _mm256_set1_ps(bias), _mm256_set1_epi32(top));
    let q = |k: usize| _mm256_min_epi32(_mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v[k], idv), biasv)), topv);
    LegacyBlock::Codes(d, [q(0), q(1), q(2), q(3)])
}

/// Bytes `j` = `lo[j] | hi[j] << 4` of 16 codes `lo` (2 vectors of 8) and 16 codes `hi`, each below 16.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn pack_nibbles(lo: [__m256i; 2], hi: [__m256i; 2]) -> __m128i {
    let r0 = _mm256_or_si256(lo[0], _mm256_slli_epi32::<4>(hi[0]));
    let r1 = _mm256_or_si256(lo[1], _mm256_slli_epi32::<4>(hi[1]));
    let w0 = _mm_packs_epi32(_mm256_castsi256_si128(r0), _mm256_extracti128_si256::<1>(r0));
    let w1 = _mm_packs_epi32(_mm256_castsi256_si128(r1), _mm256_extracti128_si256::<1>(r1));
    _mm_packus_epi16(w0, w1)
}

#[target_feature(enable = "avx2")]
unsafe fn q4_0_quantize_avx2(src: &[f32], dst: &mut [u8], scalar: ScalarBlock) -> bool {
    for (x, y) in src.chunks_exact(QK4_0).zip(dst.chunks_exact_mut(18)) {
        prefetch_ahead(x);
        match legacy_codes(x, -8.0, 8.5, 15) {
            LegacyBlock::NonFinite => return false,
            LegacyBlock::Tiny => scalar(x, y),
            LegacyBlock::Codes(d, q) => {
                y[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
                // Byte j = q[j] | q[j+16] << 4: elements 0..8 pair with 16..24, 8..16 with 24..32.
                _mm_storeu_si128(y[2..18].as_mut_ptr().cast(), pack_nibbles([q[0], q[1]], [q[2], q[3]]));
            }
        }
    }
    true
}

#[target_feature(enable = "avx2")]
unsafe fn q5_0_quantize_avx2(src: &[f32], dst: &mut [u8], scalar: ScalarBlock) -> bool {
    let low = _mm256_set1_epi32(0x0F);
    for (x, y) in src.chunks_exact(QK4_0).zip(dst.chunks_exact_mut(22)) {
        prefetch_ahead(x);
        match legacy_codes(x, -16.0, 16.5, 31) {
            LegacyBlock::NonFinite => return false,
            LegacyBlock::Tiny => scalar(x, y),
            LegacyBlock::Codes(d, q) => {
                y[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
                // Bit 4 of code j is bit j of qh: shifted into the sign bit, 8 codes per movemask.
                let mut qh = 0u32;
                for (k, qk) in q.iter().enumerate() {
                    qh |= (_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32::<27>(*qk))) as u32) << (8 * k);
                }
                y[2..6].copy_from_slice(&qh.to_le_bytes());
                let n = q.map(|v| _mm256_and_si256(v, low));
                _mm_storeu_si128(y[6..22].as_mut_ptr().cast(), pack_nibbles([n[0], n[1]], [n[2], n[3]]));
            }
        }
    }
    true
}

/// Rows (values per group) [`make_qx_quants_x8`] accepts.
const MAX_ROWS: usize = 32;
/// Candidate inverse scales summed in one sweep over the values: independent sums for instruction-level
/// parallelism (each one still sequential over the values, as in C).
const SWEEP: usize = 3;

/// `l = clamp(nearest(iscale * v), lo, hi)` as a float.
#[target_feature(enable = "avx2")]
#[inline]
fn qx_code(iscale: __m256, v: __m256, lo: __m256, hi: __m256) -> __m256 {
    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(iscale, v));
    _mm256_max_ps(_mm256_min_ps(r, hi), lo)
}

/// `sumlx = sum((w*x)*l)` and `suml2 = sum((w*l)*l)` for `M` inverse scales at once, sequential over the rows.
#[target_feature(enable = "avx2")]
#[inline]
fn qx_sums<const M: usize>(
    rows: &[[__m256; 3]],
    iscales: &[__m256],
    lo: __m256,
    hi: __m256,
) -> ([__m256; M], [__m256; M]) {
    let mut sx = [_mm256_setzero_ps(); M];
    let mut s2 = [_mm256_setzero_ps(); M];
    for &[v, wv, wxv] in rows {
        for m in 0..M {
            let l = qx_code(iscales[m], v, lo, hi);
            sx[m] = _mm256_add_ps(sx[m], _mm256_mul_ps(wxv, l));
            s2[m] = _mm256_add_ps(s2[m], _mm256_mul_ps(_mm256_mul_ps(wv, l), l));
        }
    }
    (sx, s2)
}

#[target_feature(enable = "avx2")]
unsafe fn make_qx_quants_avx2(
    nmax: i32,
    candidates: &[f32; 18],
    x: &[f32],
    w: &[f32],
    codes: &mut [u8],
) -> Option<[f32; 8]> {
    let n = x.len() / 8;
    let sign = _mm256_set1_ps(-0.0);
    let zero = _mm256_setzero_ps();
    let mut finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    // Rows of (x, w, w*x); the first value of largest magnitude per lane (strict >, sign kept).
    let mut rows = [[zero; 3]; MAX_ROWS];
    let (mut amax, mut max) = (zero, zero);
    for (i, row) in rows.iter_mut().enumerate().take(n) {
        let v = _mm256_loadu_ps(x[8 * i..8 * i + 8].as_ptr());
        let wv = _mm256_loadu_ps(w[8 * i..8 * i + 8].as_ptr());
        let a = _mm256_andnot_ps(sign, v);
        finite = _mm256_and_ps(finite, _mm256_cmp_ps::<_CMP_LT_OQ>(a, _mm256_set1_ps(f32::INFINITY)));
        let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(a, amax);
        amax = _mm256_blendv_ps(amax, a, gt);
        max = _mm256_blendv_ps(max, v, gt);
        *row = [v, wv, _mm256_mul_ps(wv, v)];
    }
    if _mm256_movemask_ps(finite) != 0xFF {
        return None;
    }
    let rows = &rows[..n];
    // Lanes whose group is all zero (largest magnitude below ggml's GROUP_MAX_EPS = 1e-15).
    let all_zero = _mm256_cmp_ps::<_CMP_LT_OQ>(amax, _mm256_set1_ps(1e-15));
    let (lo, hi) = (_mm256_set1_ps(-nmax as f32), _mm256_set1_ps((nmax - 1) as f32));
    // The 19 inverse scales: the first guess -nmax/max, then -(candidate)/max.
    let mut iscales = [zero; 19];
    iscales[0] = _mm256_div_ps(lo, max);
    for (is, &c) in iscales[1..].iter_mut().zip(candidates) {
        *is = _mm256_div_ps(_mm256_set1_ps(-c), max);
    }
    let mut sumlx = [zero; 19];
    let mut suml2 = [zero; 19];
    for start in (0..18).step_by(SWEEP) {
        let (sx, s2) = qx_sums::<SWEEP>(rows, &iscales[start..start + SWEEP], lo, hi);
        sumlx[start..start + SWEEP].copy_from_slice(&sx);
        suml2[start..start + SWEEP].copy_from_slice(&s2);
    }
    let (sx, s2) = qx_sums::<1>(rows, &iscales[18..], lo, hi);
    (sumlx[18], suml2[18]) = (sx[0], s2[0]);
    // `suml2 ? sumlx/suml2 : 0` (NaN counts as true), then the candidates in C order.
    let mut scale = _mm256_and_ps(_mm256_div_ps(sumlx[0], suml2[0]), _mm256_cmp_ps::<_CMP_NEQ_UQ>(suml2[0], zero));
    let mut best = _mm256_mul_ps(scale, sumlx[0]);
    let mut best_iscale = iscales[0];
    for c in 1..19 {
        let (sx, s2) = (sumlx[c], suml2[c]);
        let take = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_GT_OQ>(s2, zero),
            _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_mul_ps(sx, sx), _mm256_mul_ps(best, s2)),
        );
        let s = _mm256_div_ps(sx, s2);
        best_iscale = _mm256_blendv_ps(best_iscale, iscales[c], take);
        scale = _mm256_blendv_ps(scale, s, take);
        best = _mm256_blendv_ps(best, _mm256_mul_ps(s, sx), take);
    }
    // Codes l + nmax of the last accepted scale; 0 (and scale 0) for all-zero groups.
    let keep = _mm256_castps_si256(_mm256_xor_ps(all_zero, _mm256_castsi256_ps(_mm256_set1_epi32(-1))));
    let offset = _mm256_set1_epi32(nmax);
    for (i, &[v, _, _]) in rows.iter().enumerate() {
        let l = _mm256_cvttps_epi32(qx_code(best_iscale, v, lo, hi));
        let c = _mm256_and_si256(_mm256_add_epi32(l, offset), keep);
        let c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256::<1>(c));
        _mm_storel_epi64(codes[8 * i..8 * i + 8].as_mut_ptr().cast(), _mm_packus_epi16(c16, c16));
    }
    let mut out = [0.0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_andnot_ps(all_zero, scale));
    Some(out)
}

/// ggml's `nearest_int` exactly (the `+ 12582912` bit trick, whatever the magnitude), as a float.
#[target_feature(enable = "avx2")]
#[inline]
fn nearest_int_trick(v: __m256) -> __m256i {
    let bits = _mm256_castps_si256(_mm256_add_ps(v, _mm256_set1_ps(12_582_912.0)));
    _mm256_sub_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x007F_FFFF)), _mm256_set1_epi32(0x0040_0000))
}

/// Values per group of [`make_q3_quants_sets`] (q3_K's groups of 16). A compile-time row count keeps the
/// per-row state arrays exactly as large as needed: zeroing `MAX_ROWS`-sized ones cost more than a search pass.
const Q3_ROWS: usize = 16;

#[target_feature(enable = "avx2")]
unsafe fn make_q3_quants_avx2<const G: usize, const N: usize>(
    nmax: i32,
    x: &[f32],
    codes: &mut [u8],
    scales: &mut [f32],
) -> bool {
    let sign = _mm256_set1_ps(-0.0);
    let zero = _mm256_setzero_ps();
    let (lo, hi) = (_mm256_set1_ps(-nmax as f32), _mm256_set1_ps((nmax - 1) as f32));
    let (lo_i, hi_i) = (_mm256_set1_epi32(-nmax), _mm256_set1_epi32(nmax - 1));
    // Per set and row: x, w = x*x, w*x; the first value of largest magnitude. The per-row arrays are written in
    // place, never zeroed or copied first: that cost a tenth of the search.
    let (mut amax, mut max) = ([zero; G], [zero; G]);
    let mut finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    let mut rows = std::mem::MaybeUninit::<[[[__m256; 3]; G]; N]>::uninit();
    let row_at = rows.as_mut_ptr().cast::<[__m256; 3]>();
    for i in 0..N {
        for g in 0..G {
            let at = 8 * (g * N + i);
            let v = _mm256_loadu_ps(x[at..at + 8].as_ptr());
            let a = _mm256_andnot_ps(sign, v);
            finite = _mm256_and_ps(finite, _mm256_cmp_ps::<_CMP_LT_OQ>(a, _mm256_set1_ps(f32::INFINITY)));
            let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(a, amax[g]);
            amax[g] = _mm256_blendv_ps(amax[g], a, gt);
            max[g] = _mm256_blendv_ps(max[g], v, gt);
            let w = _mm256_mul_ps(v, v);
            // SAFETY: i * G + g < N * G, the number of [__m256; 3] in `rows`.
            row_at.add(i * G + g).write([v, w, _mm256_mul_ps(w, v)]);
        }
    }
    // SAFETY: the loops above wrote every element.
    let rows = rows.assume_init_ref();
    if _mm256_movemask_ps(finite) != 0xFF {
        return false;
    }
    let mut sumlx = [zero; G];
    let mut suml2 = [zero; G];
    let iscale = max.map(|m| _mm256_div_ps(lo, m));
    // The codes l (as floats) and C's products w*x*L and w*L*L of each value's current code, kept up to date
    // with the codes.
    let mut state = std::mem::MaybeUninit::<[[[__m256; 3]; G]; N]>::uninit();
    let state_at = state.as_mut_ptr().cast::<[__m256; 3]>();
    for (i, row) in rows.iter().enumerate() {
        for g in 0..G {
            let [v, w, wx] = row[g];
            let li = qx_code(iscale[g], v, lo, hi);
            let (lxi, l2i) = (_mm256_mul_ps(wx, li), _mm256_mul_ps(_mm256_mul_ps(w, li), li));
            sumlx[g] = _mm256_add_ps(sumlx[g], lxi);
            suml2[g] = _mm256_add_ps(suml2[g], l2i);
            // SAFETY: as for `rows`.
            state_at.add(i * G + g).write([li, lxi, l2i]);
        }
    }
    // SAFETY: the loop above wrote every element.
    let state = state.assume_init_mut();
    let mut sumlx_sq = sumlx.map(|s| _mm256_mul_ps(s, s));
    // C's up to 5 passes over the rows as one sequence of steps (pass * N + row). A step changes nothing when
    // its lane's sums did not change since the same row's step one pass earlier: its inputs are those of that
    // step, which took nothing (else it would be the last change). So a set of 8 groups is done N steps after its
    // last change: C's early exit (a pass without change) at the granularity of 8 groups, without the rest of
    // the pass after the last change, which C evaluates for nothing.
    let mut last_change = [-1isize; G];
    for step in 0..5 * N {
        let i = step % N;
        let (row, st) = (&rows[i], &mut state[i]);
        let mut any = false;
        for g in 0..G {
            if step as isize > last_change[g] + N as isize {
                continue;
            }
            any = true;
            let [v, w, wx] = row[g];
            let [li, lxi, l2i] = st[g];
            let slx = _mm256_sub_ps(sumlx[g], lxi);
            let sl2 = _mm256_sub_ps(suml2[g], l2i);
            let q = nearest_int_trick(_mm256_div_ps(_mm256_mul_ps(v, sl2), slx));
            let new_l = _mm256_cvtepi32_ps(_mm256_max_epi32(_mm256_min_epi32(q, hi_i), lo_i));
            let (new_lx, new_l2) = (_mm256_mul_ps(wx, new_l), _mm256_mul_ps(_mm256_mul_ps(w, new_l), new_l));
            let slx_new = _mm256_add_ps(slx, new_lx);
            let sl2_new = _mm256_add_ps(sl2, new_l2);
            let better = _mm256_cmp_ps::<_CMP_GT_OQ>(
                _mm256_mul_ps(_mm256_mul_ps(slx_new, slx_new), suml2[g]),
                _mm256_mul_ps(sumlx_sq[g], sl2_new),
            );
            let take = _mm256_and_ps(
                _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(slx, zero), _mm256_cmp_ps::<_CMP_NEQ_OQ>(new_l, li)),
                _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(sl2_new, zero), better),
            );
            // Most values keep their code: branching (well predicted) instead of always blending keeps the sums
            // off the division's latency chain, as C's branches do.
            if _mm256_movemask_ps(take) != 0 {
                st[g] = [
                    _mm256_blendv_ps(li, new_l, take),
                    _mm256_blendv_ps(lxi, new_lx, take),
                    _mm256_blendv_ps(l2i, new_l2, take),
                ];
                sumlx[g] = _mm256_blendv_ps(sumlx[g], slx_new, take);
                suml2[g] = _mm256_blendv_ps(suml2[g], sl2_new, take);
                sumlx_sq[g] = _mm256_mul_ps(sumlx[g], sumlx[g]);
                last_change[g] = step as isize;
            }
        }
        if !any {
            break;
        }
    }
    let offset = _mm256_set1_epi32(nmax);
    for g in 0..G {
        let all_zero = _mm256_cmp_ps::<_CMP_LT_OQ>(amax[g], _mm256_set1_ps(1e-15));
        let keep = _mm256_castps_si256(_mm256_xor_ps(all_zero, _mm256_castsi256_ps(_mm256_set1_epi32(-1))));
        for (i, st) in state.iter().enumerate() {
            let c = _mm256_and_si256(_mm256_add_epi32(_mm256_cvttps_epi32(st[g][0]), offset), keep);
            let c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256::<1>(c));
            let at = 8 * (g * N + i);
            _mm_storel_epi64(codes[at..at + 8].as_mut_ptr().cast(), _mm_packus_epi16(c16, c16));
        }
        // suml2 > 0 ? sumlx / suml2 : 0, and 0 for all-zero groups.
        let positive = _mm256_andnot_ps(all_zero, _mm256_cmp_ps::<_CMP_GT_OQ>(suml2[g], zero));
        let scale = _mm256_and_ps(_mm256_div_ps(sumlx[g], suml2[g]), positive);
        _mm256_storeu_ps(scales[8 * g..8 * g + 8].as_mut_ptr(), scale);
    }
    true
}

#[target_feature(enable = "avx2")]
unsafe fn q8_0_quantize_avx2(src: &[f32], dst: &mut [u8], scalar: ScalarBlock) -> bool {
    // roundf(v) for |v| < 2^23 is trunc(v + copysign(0.5 - 2^-25, v)) with one f32 addition: the largest float
    // below 0.5 rounds down, exact halves round away (see the tests, which compare against f32::round).
    let almost_half = _mm256_set1_ps(f32::from_bits(0x3EFF_FFFF));
    let sign = _mm256_set1_ps(-0.0);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (x, y) in src.chunks_exact(QK8_0).zip(dst.chunks_exact_mut(34)) {
        prefetch_ahead(x);
        let v = load_block(x);
        let (_, amax_bits) = abs_bits_and_max(&v);
        if amax_bits >= 0x7F80_0000 {
            return false;
        }
        let d = f32::from_bits(amax_bits) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        if !id.is_finite() {
            // Tiny block (see the block file): leave it to the scalar definition.
            scalar(x, y);
            continue;
        }
        y[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
        let idv = _mm256_set1_ps(id);
        // |x*id| <= 127.00002 for finite id: the codes fit in int8 and the saturating packs never saturate.
        let q = |k: usize| {
            let p = _mm256_mul_ps(v[k], idv);
            _mm256_cvttps_epi32(_mm256_add_ps(p, _mm256_or_ps(_mm256_and_ps(p, sign), almost_half)))
        };
        let (q0, q1, q2, q3) = (q(0), q(1), q(2), q(3));
        // packs work per 128-bit lane: dword k of the result holds 4 codes of q(k%4), low half for k < 4.
        let b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
        let b = _mm256_permutevar8x32_epi32(b, order);
        _mm256_storeu_si256(y[2..34].as_mut_ptr().cast(), b);
    }
    true
}

/// The smallest and the largest of the 32 values (as a tree: equal to C's sequential strict comparisons unless
/// the result is a zero, whose sign the tree does not track).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block_min_max(v: &[__m256; 4]) -> (f32, f32) {
    let lo = _mm256_min_ps(_mm256_min_ps(v[0], v[1]), _mm256_min_ps(v[2], v[3]));
    let hi = _mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3]));
    let lo = _mm_min_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps::<1>(lo));
    let hi = _mm_max_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps::<1>(hi));
    let lo = _mm_min_ps(lo, _mm_movehl_ps(lo, lo));
    let hi = _mm_max_ps(hi, _mm_movehl_ps(hi, hi));
    let lo = _mm_min_ss(lo, _mm_shuffle_ps::<0b01>(lo, lo));
    let hi = _mm_max_ss(hi, _mm_shuffle_ps::<0b01>(hi, hi));
    (_mm_cvtss_f32(lo), _mm_cvtss_f32(hi))
}

/// The smallest value of each of 4 vectors (lane `k` of the result: the minimum of `v[k]`); with `MAX`, the
/// largest. A 4 x 4 transpose folded into the comparisons.
#[target_feature(enable = "avx2")]
#[inline]
fn min_max_of_4<const MAX: bool>(v: [__m128; 4]) -> __m128 {
    let f = |a, b| if MAX { _mm_max_ps(a, b) } else { _mm_min_ps(a, b) };
    // [a0 a2, b0 b2, a1 a3, b1 b3] folded, then the same for c and d.
    let ab = f(_mm_unpacklo_ps(v[0], v[1]), _mm_unpackhi_ps(v[0], v[1]));
    let cd = f(_mm_unpacklo_ps(v[2], v[3]), _mm_unpackhi_ps(v[2], v[3]));
    f(_mm_movelh_ps(ab, cd), _mm_movehl_ps(cd, ab))
}

/// Blocks per group of [`q4_1_q5_1_quantize_avx2`].
const Q41_GROUP: usize = 4;

#[target_feature(enable = "avx2,f16c")]
unsafe fn q4_1_q5_1_quantize_avx2<const BITS: u32>(src: &[f32], dst: &mut [u8], scalar: ScalarBlock) -> bool {
    let (levels, bb) = if BITS == 4 { (15.0f32, 20) } else { (31.0f32, 24) };
    // Four blocks at a time: their minima, maxima, scales and reciprocals side by side in 4 lanes. One block at a
    // time, the two dependent scalar divisions per block bound the loop by latency; here two vector divisions
    // serve four blocks. Then each block's codes from its values (reloaded: still in L1, and keeping 16 vectors
    // live would spill).
    let mut xs = src.chunks_exact(Q41_GROUP * QK4_0);
    let mut ys = dst.chunks_exact_mut(Q41_GROUP * bb);
    let abs_mask = _mm256_set1_epi32(0x7FFF_FFFF);
    let (zero, one, inf, sign) = (_mm_setzero_ps(), _mm_set1_ps(1.0), _mm_set1_ps(f32::INFINITY), _mm_set1_ps(-0.0));
    for (x4, y4) in (&mut xs).zip(&mut ys) {
        let mut amax = _mm256_setzero_si256();
        let mut lows = [zero; Q41_GROUP];
        let mut highs = [zero; Q41_GROUP];
        for (b, x) in x4.chunks_exact(QK4_0).enumerate() {
            prefetch_ahead(x);
            let v = load_block(x);
            for vk in v {
                amax = _mm256_max_epi32(amax, _mm256_and_si256(_mm256_castps_si256(vk), abs_mask));
            }
            let lo = _mm256_min_ps(_mm256_min_ps(v[0], v[1]), _mm256_min_ps(v[2], v[3]));
            let hi = _mm256_max_ps(_mm256_max_ps(v[0], v[1]), _mm256_max_ps(v[2], v[3]));
            lows[b] = _mm_min_ps(_mm256_castps256_ps128(lo), _mm256_extractf128_ps::<1>(lo));
            highs[b] = _mm_max_ps(_mm256_castps256_ps128(hi), _mm256_extractf128_ps::<1>(hi));
        }
        if _mm256_movemask_epi8(_mm256_cmpgt_epi32(amax, _mm256_set1_epi32(0x7F7F_FFFF))) != 0 {
            return false;
        }
        // As a tree, equal to C's sequential strict comparisons unless the result is a zero (see below).
        let (min, max) = (min_max_of_4::<false>(lows), min_max_of_4::<true>(highs));
        let d = _mm_div_ps(_mm_sub_ps(max, min), _mm_set1_ps(levels));
        // id = d != 0 ? 1/d : 0 (`!=` is true for NaN, as in C).
        let id = _mm_and_ps(_mm_div_ps(one, d), _mm_cmp_ps::<_CMP_NEQ_UQ>(d, zero));
        // A zero extreme takes the sign of the block's first zero; overflowing scales convert NaN/inf to integers:
        // both left to the scalar definition.
        let special = _mm_or_ps(
            _mm_or_ps(_mm_cmp_ps::<_CMP_EQ_OQ>(min, zero), _mm_cmp_ps::<_CMP_EQ_OQ>(max, zero)),
            _mm_or_ps(
                _mm_cmp_ps::<_CMP_NLT_UQ>(_mm_andnot_ps(sign, d), inf),
                _mm_cmp_ps::<_CMP_NLT_UQ>(_mm_andnot_ps(sign, id), inf),
            ),
        );
        let special = _mm_movemask_ps(special);
        // F16C rounds finite values to nearest even, as ggml's software conversion does: (d, min) of block b are
        // the halves 2b, 2b + 1, the block's first 4 bytes.
        let dm = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_set_m128(
            _mm_unpackhi_ps(d, min),
            _mm_unpacklo_ps(d, min),
        ));
        let mut dm_words = [0u32; Q41_GROUP];
        let (mut mins, mut ids) = ([0f32; Q41_GROUP], [0f32; Q41_GROUP]);
        _mm_storeu_si128(dm_words.as_mut_ptr().cast(), dm);
        _mm_storeu_ps(mins.as_mut_ptr(), min);
        _mm_storeu_ps(ids.as_mut_ptr(), id);
        for (b, (x, y)) in x4.chunks_exact(QK4_0).zip(y4.chunks_exact_mut(bb)).enumerate() {
            if special & (1 << b) != 0 {
                scalar(x, y);
                continue;
            }
            y[..4].copy_from_slice(&dm_words[b].to_le_bytes());
            q4_1_q5_1_codes::<BITS>(&load_block(x), mins[b], ids[b], y);
        }
    }
    for (x, y) in xs.remainder().chunks_exact(QK4_0).zip(ys.into_remainder().chunks_exact_mut(bb)) {
        prefetch_ahead(x);
        let v = load_block(x);
        let (_, amax_bits) = abs_bits_and_max(&v);
        if amax_bits >= 0x7F80_0000 {
            return false;
        }
        let (min, max) = block_min_max(&v);
        let d = (max - min) / levels;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        if min == 0.0 || max == 0.0 || !d.is_finite() || !id.is_finite() {
            scalar(x, y);
            continue;
        }
        let dm = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_setr_ps(d, min, 0.0, 0.0));
        y[..4].copy_from_slice(&(_mm_cvtsi128_si32(dm) as u32).to_le_bytes());
        q4_1_q5_1_codes::<BITS>(&v, min, id, y);
    }
    true
}

/// The codes of one q4_1 / q5_1 block (`y` after its 4 bytes of `d` and `m`): `(x - min) * id`, then `+ 0.5`
/// (separate roundings), truncated: in `[0, levels + 0.5]` for a finite `id`; q4_1 clamps to 15.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn q4_1_q5_1_codes<const BITS: u32>(v: &[__m256; 4], min: f32, id: f32, y: &mut [u8]) {
    let (minv, idv, half) = (_mm256_set1_ps(min), _mm256_set1_ps(id), _mm256_set1_ps(0.5));
    let q = |k: usize| _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(v[k], minv), idv), half));
    let (q0, q1, q2, q3) = (q(0), q(1), q(2), q(3));
    let qs = if BITS == 4 {
        let fifteen = _mm256_set1_epi32(15);
        let m = |q: __m256i| _mm256_min_epi32(q, fifteen);
        nibbles(m(q0), m(q1), m(q2), m(q3))
    } else {
        // Fifth bits to the sign bit, one movemask per 8 codes: bit j of qh for code j.
        let h = |q: __m256i| _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_slli_epi32::<27>(q))) as u32;
        let qh = h(q0) | h(q1) << 8 | h(q2) << 16 | h(q3) << 24;
        y[4..8].copy_from_slice(&qh.to_le_bytes());
        let low = _mm256_set1_epi32(0x0F);
        let m = |q: __m256i| _mm256_and_si256(q, low);
        nibbles(m(q0), m(q1), m(q2), m(q3))
    };
    let bb = y.len();
    _mm_storeu_si128(y[bb - 16..].as_mut_ptr().cast(), qs);
}

/// 32 codes (0..16, in four vectors of 8 for elements 0..8, 8..16, 16..24, 24..32) as 16 bytes
/// `q[j] | q[j + 16] << 4`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles(q0: __m256i, q1: __m256i, q2: __m256i, q3: __m256i) -> __m128i {
    let r0 = _mm256_or_si256(q0, _mm256_slli_epi32::<4>(q2));
    let r1 = _mm256_or_si256(q1, _mm256_slli_epi32::<4>(q3));
    let w0 = _mm_packs_epi32(_mm256_castsi256_si128(r0), _mm256_extracti128_si256::<1>(r0));
    let w1 = _mm_packs_epi32(_mm256_castsi256_si128(r1), _mm256_extracti128_si256::<1>(r1));
    _mm_packus_epi16(w0, w1)
}

#[target_feature(enable = "avx2")]
unsafe fn q4_1_q5_1_dequantize_avx2<const BITS: u32>(src: &[u8], dst: &mut [f32], scalar: fn(&[u8], &mut [f32])) {
    let bb = if BITS == 4 { 20 } else { 24 };
    let low = _mm_set1_epi8(0x0F);
    // For q5_1: bit j of qh selects 16 for element j; each lane of 8 tests its own bit.
    let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let sixteen = _mm256_set1_epi32(16);
    for (x, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(QK4_0)) {
        let (dh, mh) = (u16::from_le_bytes([x[0], x[1]]), u16::from_le_bytes([x[2], x[3]]));
        if dh & 0x7C00 == 0x7C00 || mh & 0x7C00 == 0x7C00 {
            scalar(x, y);
            continue;
        }
        let d = _mm256_set1_ps(f16_bits_to_f32(dh));
        let m = _mm256_set1_ps(f16_bits_to_f32(mh));
        let qh = if BITS == 4 { 0 } else { u32::from_le_bytes([x[4], x[5], x[6], x[7]]) };
        let qs = _mm_loadu_si128(x[bb - 16..].as_ptr().cast());
        let lo = _mm_and_si128(qs, low);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), low);
        // q * d, then + m (two roundings, as C), 8 codes at a time; `k` is the first element's index.
        let f = |b: __m128i, k: u32| {
            let mut q = _mm256_cvtepu8_epi32(b);
            if BITS == 5 {
                let h = _mm256_and_si256(_mm256_set1_epi32((qh >> k) as i32 & 0xFF), bits);
                q = _mm256_or_si256(q, _mm256_and_si256(_mm256_cmpeq_epi32(h, bits), sixteen));
            }
            _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), d), m)
        };
        let p = y.as_mut_ptr();
        _mm256_storeu_ps(p, f(lo, 0));
        _mm256_storeu_ps(p.add(8), f(_mm_srli_si128::<8>(lo), 8));
        _mm256_storeu_ps(p.add(16), f(hi, 16));
        _mm256_storeu_ps(p.add(24), f(_mm_srli_si128::<8>(hi), 24));
    }
}

#[target_feature(enable = "avx2")]
unsafe fn q2_k_dequantize_avx2(src: &[u8], dst: &mut [f32]) {
    let three = _mm256_set1_epi8(3);
    let low = _mm_set1_epi8(0x0F);
    for (x, y) in src.chunks_exact(84).zip(dst.chunks_exact_mut(256)) {
        let d = _mm256_set1_ps(f16_bits_to_f32(u16::from_le_bytes([x[80], x[81]])));
        let min = _mm256_set1_ps(f16_bits_to_f32(u16::from_le_bytes([x[82], x[83]])));
        // dl = d * (sc & 15), ml = min * (sc >> 4) for the 16 sub-blocks.
        let sc = _mm_loadu_si128(x.as_ptr().cast());
        let (lo, hi) = (_mm_and_si128(sc, low), _mm_and_si128(_mm_srli_epi16::<4>(sc), low));
        let f = |b: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
        let mut dl = [0f32; 16];
        let mut ml = [0f32; 16];
        _mm256_storeu_ps(dl.as_mut_ptr(), _mm256_mul_ps(d, f(lo)));
        _mm256_storeu_ps(dl.as_mut_ptr().add(8), _mm256_mul_ps(d, f(_mm_srli_si128::<8>(lo))));
        _mm256_storeu_ps(ml.as_mut_ptr(), _mm256_mul_ps(min, f(hi)));
        _mm256_storeu_ps(ml.as_mut_ptr().add(8), _mm256_mul_ps(min, f(_mm_srli_si128::<8>(hi))));
        for h in 0..2 {
            let q = _mm256_loadu_si256(x[16 + 32 * h..16 + 32 * h + 32].as_ptr().cast());
            for k in 0..4 {
                // Codes of elements 128h + 32k + 0..32: bits 2k..2k+2 of the 32 bytes.
                let c = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * k as i32)), three);
                let halves = [_mm256_castsi256_si128(c), _mm256_extracti128_si256::<1>(c)];
                for (half, c) in halves.into_iter().enumerate() {
                    let s = 8 * h + 2 * k + half;
                    let (dls, mls) = (_mm256_set1_ps(dl[s]), _mm256_set1_ps(ml[s]));
                    let p = y.as_mut_ptr().add(16 * s);
                    // dl * q, then - ml (two roundings, as C).
                    _mm256_storeu_ps(p, _mm256_sub_ps(_mm256_mul_ps(dls, f(c)), mls));
                    _mm256_storeu_ps(p.add(8), _mm256_sub_ps(_mm256_mul_ps(dls, f(_mm_srli_si128::<8>(c))), mls));
                }
            }
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn q4_0_dequantize_avx2(src: &[u8], dst: &mut [f32]) {
    let low = _mm_set1_epi8(0x0F);
    let eight = _mm256_set1_epi32(8);
    for (x, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(QK4_0)) {
        let d = _mm256_set1_ps(f16_bits_to_f32(u16::from_le_bytes([x[0], x[1]])));
        let qs = _mm_loadu_si128(x[2..18].as_ptr().cast());
        let lo = _mm_and_si128(qs, low);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), low);
        // (q - 8) as f32 * d, 8 codes at a time.
        let f = |b: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(b), eight)), d);
        let p = y.as_mut_ptr();
        _mm256_storeu_ps(p, f(lo));
        _mm256_storeu_ps(p.add(8), f(_mm_srli_si128::<8>(lo)));
        _mm256_storeu_ps(p.add(16), f(hi));
        _mm256_storeu_ps(p.add(24), f(_mm_srli_si128::<8>(hi)));
    }
}

#[target_feature(enable = "avx2")]
unsafe fn recode_groups16_avx2(x: &[f32], d: &[f32], nmax: i32, codes: &mut [u8]) {
    let (lo, hi, offset) = (_mm256_set1_epi32(-nmax), _mm256_set1_epi32(nmax - 1), _mm256_set1_epi32(nmax));
    for ((xg, cg), &dg) in x.chunks_exact(16).zip(codes.chunks_exact_mut(16)).zip(d) {
        if dg == 0.0 {
            continue;
        }
        let dv = _mm256_set1_ps(dg);
        let code = |v: __m256| {
            let q = nearest_int_trick(_mm256_div_ps(v, dv));
            _mm256_add_epi32(_mm256_max_epi32(_mm256_min_epi32(q, hi), lo), offset)
        };
        let c0 = code(_mm256_loadu_ps(xg.as_ptr()));
        let c1 = code(_mm256_loadu_ps(xg[8..].as_ptr()));
        // Codes are in 0..2*nmax <= 128: the saturating packs keep them, then restore the element order.
        let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(c0, c1));
        let b = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
        _mm_storeu_si128(cg.as_mut_ptr().cast(), b);
    }
}

#[target_feature(enable = "avx2")]
unsafe fn q3_k_dequantize_avx2(src: &[u8], dst: &mut [f32]) {
    let three = _mm_set1_epi8(3);
    let one = _mm_set1_epi8(1);
    let four = _mm_set1_epi8(4);
    for (b, y) in src.chunks_exact(110).zip(dst.chunks_exact_mut(256)) {
        let d = f16_bits_to_f32(u16::from_le_bytes([b[108], b[109]]));
        let sc = &b[96..108];
        for (j, yg) in y.chunks_exact_mut(16).enumerate() {
            let low = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
            let dl = _mm256_set1_ps(d * (((low | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32) as f32));
            let (n, k, half) = (j / 8, (j % 8) / 2, j % 2);
            let q = _mm_loadu_si128(b[32 + 32 * n + 16 * half..][..16].as_ptr().cast());
            let h = _mm_loadu_si128(b[16 * half..16 * half + 16].as_ptr().cast());
            // Byte-wise shifts through 16-bit lanes: the masks drop the bits shifted in from the neighbour byte.
            let low_bits = _mm_and_si128(_mm_srl_epi16(q, _mm_cvtsi32_si128(2 * k as i32)), three);
            let high = _mm_and_si128(_mm_srl_epi16(h, _mm_cvtsi32_si128((4 * n + k) as i32)), one);
            // q - (high ? 0 : 4) = low_bits - 4 + 4*high, in -4..=3.
            let v = _mm_sub_epi8(_mm_or_si128(low_bits, _mm_slli_epi16::<2>(high)), four);
            let p = yg.as_mut_ptr();
            _mm256_storeu_ps(p, _mm256_mul_ps(dl, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))));
            _mm256_storeu_ps(
                p.add(8),
                _mm256_mul_ps(dl, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v)))),
            );
        }
    }
}

#[target_feature(enable = "avx2")]
unsafe fn q8_0_dequantize_avx2(src: &[u8], dst: &mut [f32]) {
    for (x, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(QK8_0)) {
        let d = _mm256_set1_ps(f16_bits_to_f32(u16::from_le_bytes([x[0], x[1]])));
        let qs = &x[2..34];
        let p = y.as_mut_ptr();
        for k in 0..4 {
            let q = _mm_loadl_epi64(qs[8 * k..8 * k + 8].as_ptr().cast());
            _mm256_storeu_ps(p.add(8 * k), _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
        }
    }
}

#[target_feature(enable = "avx2,f16c")]
unsafe fn f32_to_f16_f16c(src: &[f32], dst: &mut [u8]) -> bool {
    let mask = _mm256_set1_epi32(0x7FFF_FFFF);
    let mut acc = _mm256_setzero_si256();
    let mut s = src.chunks_exact(8);
    let mut d = dst.chunks_exact_mut(16);
    for (x, y) in (&mut s).zip(&mut d) {
        let v = _mm256_loadu_ps(x.as_ptr());
        acc = _mm256_max_epi32(acc, _mm256_and_si256(_mm256_castps_si256(v), mask));
        _mm_storeu_si128(y.as_mut_ptr().cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
    }
    let mut ok = true;
    for (&x, y) in s.remainder().iter().zip(d.into_remainder().chunks_exact_mut(2)) {
        ok &= x.is_finite();
        y.copy_from_slice(&f32_to_f16_bits(x).to_le_bytes());
    }
    let limit = _mm256_set1_epi32(0x7F7F_FFFF);
    ok && _mm256_movemask_epi8(_mm256_cmpgt_epi32(acc, limit)) == 0
}

#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_to_f32_f16c(src: &[u8], dst: &mut [f32]) {
    let mut s = src.chunks_exact(32);
    let mut d = dst.chunks_exact_mut(16);
    for (x, y) in (&mut s).zip(&mut d) {
        let h0 = _mm_loadu_si128(x[..16].as_ptr().cast());
        let h1 = _mm_loadu_si128(x[16..].as_ptr().cast());
        _mm256_storeu_ps(y[..8].as_mut_ptr(), _mm256_cvtph_ps(h0));
        _mm256_storeu_ps(y[8..].as_mut_ptr(), _mm256_cvtph_ps(h1));
    }
    for (x, y) in s.remainder().chunks_exact(2).zip(d.into_remainder()) {
        *y = f16_bits_to_f32(u16::from_le_bytes([x[0], x[1]]));
    }
}
