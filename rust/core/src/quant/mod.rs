//! Row (de)quantization kernels, bit-exact with ggml's reference code.
//!
//! **The reference** is `ggml/src/ggml-quants.c` compiled without floating-point contraction
//! (`-ffp-contract=off`: the x86 build without FMA, the only build every port can match): `quantize_<type>` (what
//! `llama-quantize` calls: `quantize_row_<type>_ref` without an importance matrix, `quantize_row_<type>_impl` with
//! one) and `dequantize_row_<type>`; for f16/bf16 ggml's `ggml_compute_fp32_to_fp16` / `_bf16` and inverses. q8_0
//! is `quantize_row_q8_0_ref`, not ggml-cpu's SIMD `quantize_row_q8_0` (which rounds ties to even).
//!
//! **Layout.** One file per block type, each a `Block…` struct implementing [`BlockFormat`] (and [`Quantize`] for
//! the types this crate can write). The traits have defaulted many-block and row-level methods, so a type writes
//! only its per-block code and overrides what it speeds up. Block sizes come from the one type table
//! ([`GgmlType::block_size`]). Explicit SIMD lives in one module per instruction set (`x86/`, the only `unsafe`
//! of the kernels); it never imports the block files (they call it), and every SIMD path has a portable version
//! that gives the same bytes. [`kernels`] is the one dispatch point; [`quantize_rows`] and friends validate the
//! buffers, refuse non-finite input (ggml would silently write garbage blocks) and invalid importance weights.

use rayon::prelude::*;

use crate::{Error, GgmlType, Result};

mod float;
mod fp4;
mod grid;
mod iq1;
mod iq2;
mod iq3;
mod iq4;
#[rustfmt::skip]
mod iq_tables;
mod q1_q2;
mod q2_k;
mod q3_k;
mod q4_0;
mod q4_1;
mod q4_k;
mod q5_0;
mod q5_1;
mod q5_k;
mod q6_k;
mod q8_0;
mod search_affine;
mod search_symmetric;
mod ternary;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

pub use float::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits, BF16, F16, F32};
pub use fp4::{BlockMxfp4, BlockNvfp4};
pub use iq1::{BlockIq1M, BlockIq1S};
pub use iq2::{BlockIq2S, BlockIq2Xs, BlockIq2Xxs};
pub use iq3::{BlockIq3S, BlockIq3Xxs};
pub use iq4::{BlockIq4Nl, BlockIq4Xs};
pub use q1_q2::{BlockQ1_0, BlockQ2_0};
pub use q2_k::BlockQ2K;
pub use q3_k::BlockQ3K;
pub use q4_0::{BlockQ4_0, QK4_0};
pub use q4_1::{BlockQ4_1, QK4_1};
pub use q4_k::{BlockQ4K, QK_K};
pub use q5_0::{BlockQ5_0, QK5_0};
pub use q5_1::BlockQ5_1;
pub use q5_k::BlockQ5K;
pub use q6_k::BlockQ6K;
pub use q8_0::{BlockQ8_0, QK8_0};
pub use ternary::{BlockTq1_0, BlockTq2_0};

/// A storage format made of fixed-size blocks (plain float types are blocks of one element) that this crate can
/// read.
///
/// Slices handed to the methods hold whole blocks: `src.len()` / `dst.len()` are `n * BLOCK_SIZE` elements and
/// `n * BLOCK_BYTES` bytes for the same `n` (the methods may panic otherwise). Byte slices may have any alignment.
pub trait BlockFormat {
    /// The ggml type this format stores.
    const TYPE: GgmlType;
    /// Elements per block (from the type table).
    const BLOCK_SIZE: usize = Self::TYPE.block_size();
    /// Bytes per block (from the type table).
    const BLOCK_BYTES: usize = Self::TYPE.block_bytes();

    /// ggml's `dequantize_row_<type>` for one block: `src` is `BLOCK_BYTES` bytes, `dst` `BLOCK_SIZE` values.
    /// Never fails: NaN/inf scales simply propagate.
    fn dequantize_block(src: &[u8], dst: &mut [f32]);

    /// Dequantizes whole blocks. The default runs [`BlockFormat::dequantize_block`] over them, compiled for AVX2
    /// when the CPU has it ([`run_lanes`]: the same operations, so the same values); a `dequantize_block` marked
    /// `#[inline(always)]` is then vectorised by the compiler.
    fn dequantize_blocks(src: &[u8], dst: &mut [f32])
    where
        Self: Sized,
    {
        dequantize_each_block::<Self>(src, dst)
    }
}

/// A [`BlockFormat`] this crate can also write, bit-exact with ggml's quantizer.
pub trait Quantize: BlockFormat {
    /// True when ggml's quantizer for this type uses an importance matrix (`quantize_row_<type>_impl`); false
    /// when ggml ignores one (q8_0 and the float types), and so do [`quantize_rows`] and friends.
    const TAKES_IMATRIX: bool = false;

    /// ggml's reference quantizer (`quantize_row_<type>_ref`) for one block of finite values: `src` is
    /// `BLOCK_SIZE` values, `dst` `BLOCK_BYTES` bytes.
    fn quantize_block(src: &[f32], dst: &mut [u8]);

    /// Quantizes whole blocks without an importance matrix. Returns false if `src` holds a NaN or an infinity
    /// (`dst` is then partly written and unspecified). The default checks each block, then runs
    /// [`Quantize::quantize_block`].
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool {
        quantize_each_block::<Self>(src, dst)
    }

    /// ggml's `quantize_row_<type>_impl`: one whole row of finite values (`src.len()` a multiple of
    /// `BLOCK_SIZE`) with one finite, non-negative importance weight per column (`weights.len() == src.len()`).
    /// Only called when [`Quantize::TAKES_IMATRIX`]; the default ignores the weights.
    fn quantize_row_weighted(src: &[f32], weights: &[f32], dst: &mut [u8]) {
        let _ = weights;
        Self::quantize_blocks(src, dst);
    }
}

/// LaneWork work written lane-generically: loops over `[f32; K]` arrays in which every lane does its own group's
/// f32 operations in C order, with selects for the data-dependent branches. [`run_lanes`] runs it compiled for
/// AVX2 when the CPU has it (the compiler vectorizes the lane loops) and as portable code otherwise; both give the
/// same bits since lanes only use IEEE f32 operations. `run` and everything it calls in its hot loops must be
/// `#[inline(always)]`, so that they are compiled inside the AVX2 context.
pub(crate) trait LaneWork {
    /// What the work returns.
    type Output;
    /// Does the work (must be `#[inline(always)]`).
    fn run(self) -> Self::Output;
}

/// Runs `work` compiled for AVX2 when the CPU has it, else as portable code (same results).
#[inline(always)]
pub(crate) fn run_lanes<W: LaneWork>(work: W) -> W::Output {
    #[cfg(target_arch = "x86_64")]
    let work = match x86::with_avx2(work) {
        Ok(out) => return out,
        Err(work) => work,
    };
    work.run()
}

/// Hints the CPU to load `x` into its caches ahead of use (a no-op where there is no such hint); never changes a
/// result.
#[inline(always)]
pub(crate) fn prefetch(x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    x86::prefetch(x);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// The default [`Quantize::quantize_blocks`]: checks each block, then runs [`Quantize::quantize_block`] on it.
pub(crate) fn quantize_each_block<B: Quantize + ?Sized>(src: &[f32], dst: &mut [u8]) -> bool {
    for (x, y) in src.chunks_exact(B::BLOCK_SIZE).zip(dst.chunks_exact_mut(B::BLOCK_BYTES)) {
        if !all_finite(x) {
            return false;
        }
        B::quantize_block(x, y);
    }
    true
}

/// The default [`BlockFormat::dequantize_blocks`]: [`BlockFormat::dequantize_block`] over whole blocks, compiled
/// for AVX2 when the CPU has it (for the types whose explicit SIMD kernel is unavailable, their fallback too).
pub(crate) fn dequantize_each_block<B: BlockFormat>(src: &[u8], dst: &mut [f32]) {
    run_lanes(DequantizeBlocks::<B> { src, dst, block: std::marker::PhantomData })
}

/// [`BlockFormat::dequantize_blocks`] as [`LaneWork`]: `block` (an `#[inline(always)]` one-block dequantizer of
/// `B`) over whole blocks, so that [`run_lanes`] compiles the loop for AVX2.
pub(crate) struct DequantizeBlocks<'a, B: BlockFormat> {
    pub src: &'a [u8],
    pub dst: &'a mut [f32],
    pub block: std::marker::PhantomData<B>,
}

impl<B: BlockFormat> LaneWork for DequantizeBlocks<'_, B> {
    type Output = ();

    #[inline(always)]
    fn run(self) {
        for (x, y) in self.src.chunks_exact(B::BLOCK_BYTES).zip(self.dst.chunks_exact_mut(B::BLOCK_SIZE)) {
            B::dequantize_block(x, y);
        }
    }
}

/// True when every value of `x` is finite (no NaN, no ±inf). Always inlined, so that lane work compiled for AVX2
/// checks with AVX2 too.
#[inline(always)]
pub(crate) fn all_finite(x: &[f32]) -> bool {
    float::max_abs_bits(x) < 0x7F80_0000
}

/// [`Quantize::quantize_blocks`] of one type: whole blocks, false on non-finite input.
pub type QuantizeBlocks = fn(&[f32], &mut [u8]) -> bool;
/// [`Quantize::quantize_row_weighted`] of one type: one row, its importance weights, its bytes.
pub type QuantizeRowWeighted = fn(&[f32], &[f32], &mut [u8]);

/// The kernels of one format, as [`kernels`] hands them out.
#[derive(Clone, Copy)]
pub struct Kernels {
    /// The type.
    pub ty: GgmlType,
    /// Elements per block.
    pub block_size: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    /// [`Quantize::quantize_blocks`], or `None` for types this crate can only read.
    pub quantize: Option<QuantizeBlocks>,
    /// [`Quantize::quantize_row_weighted`] for types whose ggml quantizer takes an importance matrix.
    pub quantize_weighted: Option<QuantizeRowWeighted>,
    /// [`BlockFormat::dequantize_blocks`].
    pub dequantize: fn(&[u8], &mut [f32]),
}

impl Kernels {
    fn read_only<B: BlockFormat>() -> Kernels {
        Kernels {
            ty: B::TYPE,
            block_size: B::BLOCK_SIZE,
            block_bytes: B::BLOCK_BYTES,
            quantize: None,
            quantize_weighted: None,
            dequantize: B::dequantize_blocks,
        }
    }

    fn read_write<B: Quantize>() -> Kernels {
        Kernels {
            quantize: Some(B::quantize_blocks),
            quantize_weighted: if B::TAKES_IMATRIX { Some(B::quantize_row_weighted) } else { None },
            ..Kernels::read_only::<B>()
        }
    }
}

/// The one dispatch point: the kernels for `ty`, or `None` for types this crate cannot even read.
pub fn kernels(ty: GgmlType) -> Option<Kernels> {
    Some(match ty {
        GgmlType::F32 => Kernels::read_write::<F32>(),
        GgmlType::F16 => Kernels::read_write::<F16>(),
        GgmlType::BF16 => Kernels::read_write::<BF16>(),
        GgmlType::Q8_0 => Kernels::read_write::<BlockQ8_0>(),
        GgmlType::Q4_0 => Kernels::read_write::<BlockQ4_0>(),
        GgmlType::Q4_1 => Kernels::read_write::<BlockQ4_1>(),
        GgmlType::Q5_1 => Kernels::read_write::<BlockQ5_1>(),
        GgmlType::Q2_K => Kernels::read_write::<BlockQ2K>(),
        GgmlType::Q4_K => Kernels::read_write::<BlockQ4K>(),
        GgmlType::Q5_K => Kernels::read_write::<BlockQ5K>(),
        GgmlType::Q5_0 => Kernels::read_write::<BlockQ5_0>(),
        GgmlType::Q3_K => Kernels::read_write::<BlockQ3K>(),
        GgmlType::Q6_K => Kernels::read_write::<BlockQ6K>(),
        GgmlType::IQ1_S => Kernels::read_only::<BlockIq1S>(),
        GgmlType::IQ1_M => Kernels::read_only::<BlockIq1M>(),
        GgmlType::IQ2_XXS => Kernels::read_only::<BlockIq2Xxs>(),
        GgmlType::IQ2_XS => Kernels::read_only::<BlockIq2Xs>(),
        GgmlType::IQ2_S => Kernels::read_only::<BlockIq2S>(),
        GgmlType::IQ3_XXS => Kernels::read_only::<BlockIq3Xxs>(),
        GgmlType::IQ3_S => Kernels::read_only::<BlockIq3S>(),
        GgmlType::IQ4_NL => Kernels::read_only::<BlockIq4Nl>(),
        GgmlType::IQ4_XS => Kernels::read_only::<BlockIq4Xs>(),
        GgmlType::TQ1_0 => Kernels::read_only::<BlockTq1_0>(),
        GgmlType::TQ2_0 => Kernels::read_only::<BlockTq2_0>(),
        GgmlType::MXFP4 => Kernels::read_only::<BlockMxfp4>(),
        GgmlType::NVFP4 => Kernels::read_only::<BlockNvfp4>(),
        GgmlType::Q1_0 => Kernels::read_only::<BlockQ1_0>(),
        GgmlType::Q2_0 => Kernels::read_only::<BlockQ2_0>(),
        _ => return None,
    })
}

/// The kernels for `ty` when they can quantize, else [`Error::UnsupportedType`] (op "quantize").
fn quantize_kernels(ty: GgmlType) -> Result<(Kernels, QuantizeBlocks)> {
    kernels(ty).and_then(|k| k.quantize.map(|q| (k, q))).ok_or(Error::UnsupportedType { op: "quantize", ty })
}

/// True for the types this crate can quantize to (bit-exact with ggml).
pub fn can_quantize(ty: GgmlType) -> bool {
    kernels(ty).is_some_and(|k| k.quantize.is_some())
}

/// True for the types this crate can dequantize (every type it can quantize, and read-only ones).
pub fn can_dequantize(ty: GgmlType) -> bool {
    kernels(ty).is_some()
}

/// True when quantizing to `ty` uses an importance matrix (ggml's quantizer for it takes one).
pub fn takes_imatrix(ty: GgmlType) -> bool {
    kernels(ty).is_some_and(|k| k.quantize_weighted.is_some())
}

/// Elements handed to one rayon task (a whole number of blocks): 128 KiB of f32, so per-task overhead is a
/// fraction of a percent while two threads still get hundreds of tasks on a 4096x4096 tensor.
const PAR_CHUNK_ELEMS: usize = 32 * 1024;

/// Outputs smaller than this (2 MiB of f32) are dequantized on the calling thread: dequantizing runs at memory
/// speed (about 100 us here), and waking the pool's threads costs tens of microseconds, more than they save.
const DEQUANTIZE_PAR_MIN_ELEMS: usize = 512 * 1024;

/// Checks `row_len` and returns the bytes of one row.
fn row_bytes(k: &Kernels, row_len: usize) -> Result<usize> {
    if row_len == 0 || !row_len.is_multiple_of(k.block_size) {
        return Err(Error::RowLength { ty: k.ty, row_len, block: k.block_size });
    }
    (row_len / k.block_size).checked_mul(k.block_bytes).ok_or(Error::RowLength {
        ty: k.ty,
        row_len,
        block: k.block_size,
    })
}

/// Validates a quantize call; returns the kernels, the block quantizer and the weighted row quantizer to use
/// (`None` when there are no weights or the type ignores them).
fn check_quantize(
    ty: GgmlType,
    src: &[f32],
    row_len: usize,
    dst: &[u8],
    imatrix: Option<&[f32]>,
) -> Result<(Kernels, QuantizeBlocks, Option<QuantizeRowWeighted>)> {
    let (k, quantize) = quantize_kernels(ty)?;
    let rb = row_bytes(&k, row_len)?;
    if !src.len().is_multiple_of(row_len) {
        return Err(Error::BufferSize {
            what: "quantize source (f32 elements, whole rows)",
            expected: src.len().div_ceil(row_len) * row_len,
            found: src.len(),
        });
    }
    let expected = (src.len() / row_len).saturating_mul(rb);
    if dst.len() != expected {
        return Err(Error::BufferSize { what: "quantize destination (bytes)", expected, found: dst.len() });
    }
    if let Some(w) = imatrix {
        if w.len() != row_len {
            return Err(Error::Imatrix {
                ty,
                reason: format!("expected one weight per column ({row_len}), found {}", w.len()),
            });
        }
        if let Some(index) = w.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(Error::Imatrix {
                ty,
                reason: format!("weight {index} is {}; weights must be finite and non-negative", w[index]),
            });
        }
    }
    Ok((k, quantize, imatrix.and(k.quantize_weighted)))
}

/// Validates a dequantize call; returns the kernels.
fn check_dequantize(ty: GgmlType, src: &[u8], row_len: usize, dst: &[f32]) -> Result<Kernels> {
    let k = kernels(ty).ok_or(Error::UnsupportedType { op: "dequantize", ty })?;
    let rb = row_bytes(&k, row_len)?;
    if !src.len().is_multiple_of(rb) {
        return Err(Error::BufferSize {
            what: "dequantize source (bytes, whole rows)",
            expected: src.len().div_ceil(rb) * rb,
            found: src.len(),
        });
    }
    let expected = (src.len() / rb).saturating_mul(row_len);
    if dst.len() != expected {
        return Err(Error::BufferSize { what: "dequantize destination (f32 elements)", expected, found: dst.len() });
    }
    Ok(k)
}

/// The error for a quantize call whose kernel met a non-finite value: the first one in flat order.
fn non_finite(ty: GgmlType, src: &[f32]) -> Error {
    let index = src.iter().position(|v| !v.is_finite()).expect("a kernel reported a non-finite value");
    Error::NonFinite { ty, index, value: src[index] }
}

/// One weighted row: refuses non-finite input (the weighted quantizers search iteratively and never see it).
fn quantize_row_weighted_checked(weighted: QuantizeRowWeighted, src: &[f32], weights: &[f32], dst: &mut [u8]) -> bool {
    if !all_finite(src) {
        return false;
    }
    weighted(src, weights, dst);
    true
}

/// Quantizes `src` (rows of `row_len` f32 each) to `ty` into `dst` (`rows * row_bytes` bytes), on this thread.
///
/// `imatrix` holds one importance weight per column (llama-imatrix's `in_sum2 / counts`); types whose ggml
/// quantizer takes one ([`takes_imatrix`]) then follow `quantize_row_<type>_impl`, the others ignore it, as
/// ggml does. The bytes equal ggml's `quantize_<type>` (see the module docs). Errors:
/// [`Error::UnsupportedType`] (op "quantize") for types this crate cannot write; [`Error::RowLength`] when
/// `row_len` is 0 or not a multiple of the block size; [`Error::BufferSize`] when `src` is not whole rows or `dst`
/// has the wrong size; [`Error::Imatrix`] for a weight count other than `row_len` or a negative or non-finite
/// weight; [`Error::NonFinite`] with the flat index of the first NaN/±inf. The sizes and weights are checked
/// before anything is written; after a `NonFinite` error `dst` is partly written and unspecified.
pub fn quantize_rows(ty: GgmlType, src: &[f32], row_len: usize, dst: &mut [u8], imatrix: Option<&[f32]>) -> Result<()> {
    let (k, quantize, weighted) = check_quantize(ty, src, row_len, dst, imatrix)?;
    let ok = match (weighted, imatrix) {
        (Some(weighted), Some(w)) => {
            let rb = row_bytes(&k, row_len)?;
            src.chunks_exact(row_len)
                .zip(dst.chunks_exact_mut(rb))
                .all(|(s, d)| quantize_row_weighted_checked(weighted, s, w, d))
        }
        _ => quantize(src, dst),
    };
    if ok {
        Ok(())
    } else {
        Err(non_finite(ty, src))
    }
}

/// [`quantize_rows`] with the work split across the current rayon pool: chunks of whole blocks without weights,
/// whole rows with them. Blocks (and weighted rows) are independent, so the bytes are identical to
/// [`quantize_rows`], and so is the reported first non-finite index.
pub fn quantize_rows_par(
    ty: GgmlType,
    src: &[f32],
    row_len: usize,
    dst: &mut [u8],
    imatrix: Option<&[f32]>,
) -> Result<()> {
    let (k, quantize, weighted) = check_quantize(ty, src, row_len, dst, imatrix)?;
    let ok = match (weighted, imatrix) {
        (Some(weighted), Some(w)) => {
            let rb = row_bytes(&k, row_len)?;
            src.par_chunks(row_len)
                .zip(dst.par_chunks_mut(rb))
                .all(|(s, d)| quantize_row_weighted_checked(weighted, s, w, d))
        }
        _ => {
            let blocks = (PAR_CHUNK_ELEMS / k.block_size).max(1);
            if src.len() <= blocks * k.block_size {
                quantize(src, dst)
            } else {
                src.par_chunks(blocks * k.block_size)
                    .zip(dst.par_chunks_mut(blocks * k.block_bytes))
                    .all(|(s, d)| quantize(s, d))
            }
        }
    };
    if ok {
        Ok(())
    } else {
        Err(non_finite(ty, src))
    }
}

/// Dequantizes `src` (`rows * row_bytes` bytes of type `ty`, any alignment) into `dst` (`rows * row_len` f32), on
/// this thread. Values equal ggml's `dequantize_row_*` / `ggml_*_to_fp32_row`. Errors as [`quantize_rows`] (op
/// "dequantize"), except that non-finite values are not an error here.
pub fn dequantize_rows(ty: GgmlType, src: &[u8], row_len: usize, dst: &mut [f32]) -> Result<()> {
    let k = check_dequantize(ty, src, row_len, dst)?;
    (k.dequantize)(src, dst);
    Ok(())
}

/// [`dequantize_rows`] with the work split across the current rayon pool, in chunks of whole blocks (same values).
pub fn dequantize_rows_par(ty: GgmlType, src: &[u8], row_len: usize, dst: &mut [f32]) -> Result<()> {
    let k = check_dequantize(ty, src, row_len, dst)?;
    let blocks = (PAR_CHUNK_ELEMS / k.block_size).max(1);
    if dst.len() < DEQUANTIZE_PAR_MIN_ELEMS || dst.len() <= blocks * k.block_size {
        (k.dequantize)(src, dst);
    } else {
        src.par_chunks(blocks * k.block_bytes)
            .zip(dst.par_chunks_mut(blocks * k.block_size))
            .for_each(|(s, d)| (k.dequantize)(s, d));
    }
    Ok(())
}

/// ggml's `nearest_int`: round to nearest with ties to even, through the float trick `fval + 12582912.0f`
/// (exact for |fval| <= 4194303). Outside that range (and for NaN, which the k-quant searches produce from finite
/// values near f32's limits) ggml asserts in debug builds; release builds, which make model files, return what
/// the same bit trick gives, and so does this function (NaN gives 0, +inf -4194304).
#[inline]
pub(crate) fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    ((val.to_bits() & 0x007F_FFFF) as i32) - 0x0040_0000
}

/// C's conversion of a float to `int8_t` as x86 code performs it: truncate toward zero to int32 (`cvttss2si`,
/// which gives 0x80000000 for NaN and out-of-range values), then keep the low byte. Only reachable with
/// non-finite values from the "tiny block" case of the quantizers; finite in-range values are plain truncation.
#[inline]
fn c_float_to_i8(v: f32) -> i8 {
    if !(-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        // NaN lands here too.
        0
    } else {
        (v as i32) as i8
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    /// Why a SIMD-vs-portable test fails on an x86-64 CPU without the instructions it tests: rather than pass by
    /// comparing the portable code with itself (the dispatcher's fallback).
    #[cfg(target_arch = "x86_64")]
    pub const NO_SIMD: &str =
        "this x86-64 CPU lacks AVX2/F16C: the SIMD-vs-portable comparison cannot run (it would compare the portable \
         code with itself)";

    /// Lower-case hex, for readable byte comparisons.
    pub fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// [`super::DequantizeBlocks`] of `B` run with AVX2 (directly: fails without it) equals the scalar
    /// `dequantize_block` bit for bit on random bytes (NaN, infinite and subnormal f16 scales included).
    #[cfg(target_arch = "x86_64")]
    pub fn check_dequantize_avx2<B: super::BlockFormat>() {
        assert!(is_x86_feature_detected!("avx2"), "this test needs an AVX2 machine");
        let raw: Vec<u8> =
            (0..B::BLOCK_BYTES as u32 * 700).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let n = raw.len() / B::BLOCK_BYTES * B::BLOCK_SIZE;
        let (mut a, mut b) = (vec![0f32; n], vec![1f32; n]);
        let k = super::DequantizeBlocks::<B> { src: &raw, dst: &mut a, block: std::marker::PhantomData };
        assert!(super::x86::with_avx2(k).is_ok());
        for (x, y) in raw.chunks_exact(B::BLOCK_BYTES).zip(b.chunks_exact_mut(B::BLOCK_SIZE)) {
            B::dequantize_block(x, y);
        }
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        assert!(a.iter().any(|v| !v.is_finite()));
    }

    /// `n` importance weights: random in [0, 1), with runs of zeros, near-zero and large ones.
    pub fn lcg_weights(n: usize) -> Vec<f32> {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        (0..n)
            .map(|i| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                match (i / 32) % 5 {
                    0 => u,
                    1 => 0.0,
                    2 => u * u * u * 1e-20,
                    3 => u * 1e20,
                    _ => {
                        if u < 0.5 {
                            0.0
                        } else {
                            u
                        }
                    }
                }
            })
            .collect()
    }

    /// `n` blocks of 32 finite values: random magnitudes over many scales, plus edge blocks (zero, one non-zero,
    /// equal magnitudes of both signs, integers and halves, huge, subnormal and tiny).
    pub fn lcg_block_values(n: usize) -> Vec<f32> {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u32
        };
        let mut out = Vec::with_capacity(n * 32);
        for b in 0..n {
            let scale = [1.0f32, 1e-3, 0.02, 7.0, 1e4, 1e6, 3e38, 1e-38, 1e-40, 2.3e-38, 5e-37][b % 11];
            for j in 0..32 {
                let r = next();
                let u = (r as f32 / u32::MAX as f32) * 2.0 - 1.0;
                let v = match b % 7 {
                    0..=2 => u * scale,
                    3 => ((r % 33) as f32 - 16.0) * 0.5 * scale.min(1.0), // integers and halves
                    4 => {
                        if j == 0 || j == 9 {
                            -scale.min(3e38)
                        } else if j == 20 {
                            scale.min(3e38)
                        } else {
                            u * scale * 0.9
                        }
                    }
                    5 => {
                        if j == (b / 7) % 32 {
                            u * scale
                        } else {
                            0.0
                        }
                    }
                    _ => f32::from_bits(r & 0x807F_FFFF) * if b % 2 == 0 { 1.0 } else { 1e30 }, // subnormals
                };
                out.push(if v.is_finite() { v } else { 0.0 });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::lcg_block_values;
    use super::*;

    const TYPES: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q5_0,
        GgmlType::Q3_K,
    ];
    /// The types this crate reads but does not write.
    const READ_ONLY: [GgmlType; 15] = [
        GgmlType::IQ1_S,
        GgmlType::IQ1_M,
        GgmlType::IQ2_XXS,
        GgmlType::IQ2_XS,
        GgmlType::IQ2_S,
        GgmlType::IQ3_XXS,
        GgmlType::IQ3_S,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
        GgmlType::NVFP4,
        GgmlType::Q1_0,
        GgmlType::Q2_0,
    ];

    #[test]
    fn dispatch_matches_the_type_table() {
        for &ty in GgmlType::ALL {
            let k = kernels(ty);
            assert_eq!(can_quantize(ty), TYPES.contains(&ty));
            assert_eq!(can_dequantize(ty), TYPES.contains(&ty) || READ_ONLY.contains(&ty));
            if let Some(k) = k {
                assert_eq!(k.ty, ty);
                assert_eq!(k.block_size, ty.block_size());
                assert_eq!(k.block_bytes, ty.block_bytes());
            }
        }
        // ggml has a quantizer for iq2_xxs but this crate only reads it; nothing reads q8_1 (a dot-product
        // intermediate that never appears in model files) or the integer types.
        let mut dst = vec![0u8; 66];
        assert!(matches!(
            quantize_rows(GgmlType::IQ2_XXS, &[0.0; 256], 256, &mut dst, None),
            Err(Error::UnsupportedType { op: "quantize", ty: GgmlType::IQ2_XXS })
        ));
        assert!(matches!(
            dequantize_rows(GgmlType::Q8_1, &[0; 40], 32, &mut [0.0; 32]),
            Err(Error::UnsupportedType { op: "dequantize", ty: GgmlType::Q8_1 })
        ));
    }

    #[test]
    fn row_length_and_buffer_errors() {
        let src = vec![0.5f32; 96];
        let mut dst = vec![0u8; 54];
        for row_len in [0, 16, 48] {
            assert!(matches!(
                quantize_rows(GgmlType::Q4_0, &src, row_len, &mut dst, None),
                Err(Error::RowLength { ty: GgmlType::Q4_0, block: 32, .. })
            ));
            assert!(matches!(
                dequantize_rows(GgmlType::Q8_0, &[0; 34], row_len, &mut [0.0; 32]),
                Err(Error::RowLength { ty: GgmlType::Q8_0, block: 32, .. })
            ));
        }
        assert!(matches!(
            quantize_rows(GgmlType::F16, &src, 0, &mut dst, None),
            Err(Error::RowLength { row_len: 0, block: 1, .. })
        ));
        // 96 elements are not whole rows of 64.
        assert!(matches!(
            quantize_rows(GgmlType::Q4_0, &src, 64, &mut dst, None),
            Err(Error::BufferSize { expected: 128, found: 96, .. })
        ));
        assert!(matches!(
            quantize_rows(GgmlType::Q4_0, &src, 32, &mut [0u8; 53], None),
            Err(Error::BufferSize { expected: 54, found: 53, .. })
        ));
        assert!(matches!(
            quantize_rows_par(GgmlType::Q8_0, &src, 96, &mut dst, None),
            Err(Error::BufferSize { expected: 102, found: 54, .. })
        ));
        assert!(matches!(
            dequantize_rows(GgmlType::Q4_0, &[0; 35], 32, &mut [0.0; 64]),
            Err(Error::BufferSize { expected: 36, found: 35, .. })
        ));
        assert!(matches!(
            dequantize_rows_par(GgmlType::Q4_0, &[0; 36], 32, &mut [0.0; 32]),
            Err(Error::BufferSize { expected: 64, found: 32, .. })
        ));
        // Empty input: zero rows, fine.
        quantize_rows(GgmlType::Q4_0, &[], 32, &mut [], None).unwrap();
        dequantize_rows_par(GgmlType::BF16, &[], 7, &mut []).unwrap();
    }

    #[test]
    fn non_finite_input_is_refused_with_the_first_index() {
        for &ty in &TYPES {
            let row_len = ty.block_size().max(64);
            let n = 3 * PAR_CHUNK_ELEMS + row_len;
            let rb = ty.row_bytes(row_len as u64).unwrap() as usize;
            for (first, second) in [(5usize, n - 1), (PAR_CHUNK_ELEMS + 40, n - 33), (n - 1, n - 1)] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut src = vec![0.25f32; n];
                    src[second] = f32::NAN;
                    src[first] = bad;
                    let mut dst = vec![0u8; n / row_len * rb];
                    for par in [false, true] {
                        let r = if par {
                            quantize_rows_par(ty, &src, row_len, &mut dst, None)
                        } else {
                            quantize_rows(ty, &src, row_len, &mut dst, None)
                        };
                        match r {
                            Err(Error::NonFinite { ty: t, index, value }) => {
                                assert_eq!((t, index), (ty, first), "{ty} par={par}");
                                assert_eq!(value.to_bits(), bad.to_bits());
                            }
                            other => panic!("{ty} par={par}: {other:?}"),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn parallel_equals_serial() {
        let src = lcg_block_values(4 * PAR_CHUNK_ELEMS / 32 + 5);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for &ty in &TYPES {
            let row_len = 160 * ty.block_size().max(32) / 32;
            let n = src.len() / row_len * row_len;
            let src = &src[..n];
            let bytes = n / row_len * ty.row_bytes(row_len as u64).unwrap() as usize;
            let mut a = vec![0u8; bytes];
            let mut b = vec![1u8; bytes];
            quantize_rows(ty, src, row_len, &mut a, None).unwrap();
            pool.install(|| quantize_rows_par(ty, src, row_len, &mut b, None)).unwrap();
            assert!(a == b, "{ty}");
            // Dequantizing splits only above DEQUANTIZE_PAR_MIN_ELEMS: the rows repeated past it.
            let copies = DEQUANTIZE_PAR_MIN_ELEMS / n + 2;
            let a = a.repeat(copies);
            let mut fa = vec![0f32; n * copies];
            let mut fb = vec![1f32; n * copies];
            dequantize_rows(ty, &a, row_len, &mut fa).unwrap();
            pool.install(|| dequantize_rows_par(ty, &a, row_len, &mut fb)).unwrap();
            assert!(fa.iter().zip(&fb).all(|(x, y)| x.to_bits() == y.to_bits()), "{ty}");
            if ty == GgmlType::F32 {
                assert!(fa.iter().zip(src.repeat(copies)).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
        }
    }

    #[test]
    fn c_float_to_i8_mirrors_x86() {
        assert_eq!(c_float_to_i8(8.99), 8);
        assert_eq!(c_float_to_i8(-0.99), 0);
        assert_eq!(c_float_to_i8(-127.0), -127);
        assert_eq!(c_float_to_i8(200.0), -56); // low byte of 200
        assert_eq!(c_float_to_i8(f32::NAN), 0);
        assert_eq!(c_float_to_i8(f32::INFINITY), 0);
        assert_eq!(c_float_to_i8(f32::NEG_INFINITY), 0);
        assert_eq!(c_float_to_i8(3e9), 0);
    }
}
