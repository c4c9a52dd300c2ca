//! Row (de)quantization kernels for f32, f16, bf16, q8_0 and q4_0, bit-exact with ggml's reference code.
//!
//! - q4_0 / q8_0 reproduce `quantize_row_q4_0_ref` / `quantize_row_q8_0_ref` and `dequantize_row_q4_0` /
//!   `dequantize_row_q8_0` of `ggml/src/ggml-quants.c` (what llama-quantize writes without an importance matrix;
//!   not ggml-cpu's SIMD `quantize_row_q8_0`, which rounds ties to even).
//! - f16 / bf16 use ggml's `ggml_compute_fp32_to_fp16` / `ggml_compute_fp32_to_bf16` and their inverses.
//!
//! Every format implements [`BlockFormat`]; [`quantize_rows`] and friends validate the buffers, refuse non-finite
//! input (ggml would silently write garbage blocks) and dispatch in one place ([`kernels`]). The hot loops have an
//! explicit AVX2/F16C version chosen at run time (all `unsafe` lives in the private `x86` module) and a portable
//! scalar version that gives the same bytes.

use rayon::prelude::*;

use crate::{Error, GgmlType, Result};

mod float;
mod q4_0;
mod q8_0;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use float::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits, BF16, F16, F32};
pub use q4_0::{BlockQ4_0, QK4_0};
pub use q8_0::{BlockQ8_0, QK8_0};

/// A storage format made of fixed-size blocks (plain float types are blocks of one element).
///
/// The slice functions work on whole blocks: `src.len()` / `dst.len()` must be `n * BLOCK_SIZE` elements and
/// `n * BLOCK_BYTES` bytes for the same `n` (they may panic otherwise). Byte slices may have any alignment.
pub trait BlockFormat {
    /// The ggml type this format stores.
    const TYPE: GgmlType;
    /// Elements per block.
    const BLOCK_SIZE: usize;
    /// Bytes per block.
    const BLOCK_BYTES: usize;

    /// Quantizes whole blocks of `src` into `dst`. Returns false if `src` holds a NaN or an infinity; `dst` is then
    /// partly written and unspecified.
    fn quantize_blocks(src: &[f32], dst: &mut [u8]) -> bool;

    /// Dequantizes whole blocks of `src` into `dst` (never fails: NaN/inf scales simply propagate).
    fn dequantize_blocks(src: &[u8], dst: &mut [f32]);
}

/// The kernels of one format, as [`kernels`] hands them out.
#[derive(Clone, Copy)]
pub struct Kernels {
    /// The type.
    pub ty: GgmlType,
    /// Elements per block.
    pub block_size: usize,
    /// Bytes per block.
    pub block_bytes: usize,
    /// [`BlockFormat::quantize_blocks`].
    pub quantize: fn(&[f32], &mut [u8]) -> bool,
    /// [`BlockFormat::dequantize_blocks`].
    pub dequantize: fn(&[u8], &mut [f32]),
}

impl Kernels {
    fn of<B: BlockFormat>() -> Kernels {
        Kernels {
            ty: B::TYPE,
            block_size: B::BLOCK_SIZE,
            block_bytes: B::BLOCK_BYTES,
            quantize: B::quantize_blocks,
            dequantize: B::dequantize_blocks,
        }
    }
}

/// The one dispatch point: the kernels for `ty`, or [`Error::UnsupportedType`] naming `op`.
pub fn kernels(ty: GgmlType, op: &'static str) -> Result<Kernels> {
    Ok(match ty {
        GgmlType::F32 => Kernels::of::<F32>(),
        GgmlType::F16 => Kernels::of::<F16>(),
        GgmlType::BF16 => Kernels::of::<BF16>(),
        GgmlType::Q8_0 => Kernels::of::<BlockQ8_0>(),
        GgmlType::Q4_0 => Kernels::of::<BlockQ4_0>(),
        _ => return Err(Error::UnsupportedType { op, ty }),
    })
}

/// True for the types this crate can quantize to: F32, F16, BF16, Q8_0, Q4_0.
pub fn can_quantize(ty: GgmlType) -> bool {
    kernels(ty, "quantize").is_ok()
}

/// True for the types this crate can dequantize: the same set as [`can_quantize`].
pub fn can_dequantize(ty: GgmlType) -> bool {
    kernels(ty, "dequantize").is_ok()
}

/// Elements handed to one rayon task (a whole number of blocks): 128 KiB of f32, so per-task overhead is a
/// fraction of a percent while two threads still get hundreds of tasks on a 4096x4096 tensor.
const PAR_CHUNK_ELEMS: usize = 32 * 1024;

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

/// Validates a quantize call; returns the kernels.
fn check_quantize(ty: GgmlType, src: &[f32], row_len: usize, dst: &[u8]) -> Result<Kernels> {
    let k = kernels(ty, "quantize")?;
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
    Ok(k)
}

/// Validates a dequantize call; returns the kernels.
fn check_dequantize(ty: GgmlType, src: &[u8], row_len: usize, dst: &[f32]) -> Result<Kernels> {
    let k = kernels(ty, "dequantize")?;
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

/// Quantizes `src` (rows of `row_len` f32 each) to `ty` into `dst` (`rows * row_bytes` bytes), on this thread.
///
/// The bytes equal ggml's reference quantizers (see the module docs). Errors: [`Error::UnsupportedType`] (op
/// "quantize") for types other than F32/F16/BF16/Q8_0/Q4_0; [`Error::RowLength`] when `row_len` is 0 or not a
/// multiple of the block size; [`Error::BufferSize`] when `src` is not whole rows or `dst` has the wrong size;
/// [`Error::NonFinite`] with the flat index of the first NaN/±inf (for every target type). The sizes are checked
/// before anything is written; after a `NonFinite` error `dst` is partly written and unspecified.
pub fn quantize_rows(ty: GgmlType, src: &[f32], row_len: usize, dst: &mut [u8]) -> Result<()> {
    let k = check_quantize(ty, src, row_len, dst)?;
    if (k.quantize)(src, dst) {
        Ok(())
    } else {
        Err(non_finite(ty, src))
    }
}

/// [`quantize_rows`] with the work split across the current rayon pool, in chunks of whole blocks (a row is a run
/// of whole blocks and blocks are independent, so the bytes are identical to [`quantize_rows`], and so is the
/// reported first non-finite index).
pub fn quantize_rows_par(ty: GgmlType, src: &[f32], row_len: usize, dst: &mut [u8]) -> Result<()> {
    let k = check_quantize(ty, src, row_len, dst)?;
    let blocks = (PAR_CHUNK_ELEMS / k.block_size).max(1);
    let ok = if src.len() <= blocks * k.block_size {
        (k.quantize)(src, dst)
    } else {
        src.par_chunks(blocks * k.block_size)
            .zip(dst.par_chunks_mut(blocks * k.block_bytes))
            .all(|(s, d)| (k.quantize)(s, d))
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
    if dst.len() <= blocks * k.block_size {
        (k.dequantize)(src, dst);
    } else {
        src.par_chunks(blocks * k.block_bytes)
            .zip(dst.par_chunks_mut(blocks * k.block_size))
            .for_each(|(s, d)| (k.dequantize)(s, d));
    }
    Ok(())
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
    /// Lower-case hex, for readable byte comparisons.
    pub fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
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

    const TYPES: [GgmlType; 5] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0];

    #[test]
    fn dispatch_matches_the_type_table() {
        for &ty in GgmlType::ALL {
            let k = kernels(ty, "quantize");
            assert_eq!(can_quantize(ty), TYPES.contains(&ty));
            assert_eq!(can_dequantize(ty), TYPES.contains(&ty));
            if let Ok(k) = k {
                assert_eq!(k.ty, ty);
                assert_eq!(k.block_size, ty.block_size());
                assert_eq!(k.block_bytes, ty.block_bytes());
            }
        }
        let mut dst = vec![0u8; 210];
        assert!(matches!(
            quantize_rows(GgmlType::Q6_K, &[0.0; 256], 256, &mut dst),
            Err(Error::UnsupportedType { op: "quantize", ty: GgmlType::Q6_K })
        ));
        assert!(matches!(
            dequantize_rows(GgmlType::Q4_1, &[0; 20], 32, &mut [0.0; 32]),
            Err(Error::UnsupportedType { op: "dequantize", ty: GgmlType::Q4_1 })
        ));
    }

    #[test]
    fn row_length_and_buffer_errors() {
        let src = vec![0.5f32; 96];
        let mut dst = vec![0u8; 54];
        for row_len in [0, 16, 48] {
            assert!(matches!(
                quantize_rows(GgmlType::Q4_0, &src, row_len, &mut dst),
                Err(Error::RowLength { ty: GgmlType::Q4_0, block: 32, .. })
            ));
            assert!(matches!(
                dequantize_rows(GgmlType::Q8_0, &[0; 34], row_len, &mut [0.0; 32]),
                Err(Error::RowLength { ty: GgmlType::Q8_0, block: 32, .. })
            ));
        }
        assert!(matches!(
            quantize_rows(GgmlType::F16, &src, 0, &mut dst),
            Err(Error::RowLength { row_len: 0, block: 1, .. })
        ));
        // 96 elements are not whole rows of 64.
        assert!(matches!(
            quantize_rows(GgmlType::Q4_0, &src, 64, &mut dst),
            Err(Error::BufferSize { expected: 128, found: 96, .. })
        ));
        assert!(matches!(
            quantize_rows(GgmlType::Q4_0, &src, 32, &mut [0u8; 53]),
            Err(Error::BufferSize { expected: 54, found: 53, .. })
        ));
        assert!(matches!(
            quantize_rows_par(GgmlType::Q8_0, &src, 96, &mut dst),
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
        quantize_rows(GgmlType::Q4_0, &[], 32, &mut []).unwrap();
        dequantize_rows_par(GgmlType::BF16, &[], 7, &mut []).unwrap();
    }

    #[test]
    fn non_finite_input_is_refused_with_the_first_index() {
        let n = 3 * PAR_CHUNK_ELEMS + 64;
        for &ty in &TYPES {
            let rb = ty.row_bytes(64).unwrap() as usize;
            for (first, second) in [(5usize, n - 1), (PAR_CHUNK_ELEMS + 40, n - 33), (n - 1, n - 1)] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut src = vec![0.25f32; n];
                    src[second] = f32::NAN;
                    src[first] = bad;
                    let mut dst = vec![0u8; n / 64 * rb];
                    for par in [false, true] {
                        let r = if par {
                            quantize_rows_par(ty, &src, 64, &mut dst)
                        } else {
                            quantize_rows(ty, &src, 64, &mut dst)
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
            let row_len = 160;
            let n = src.len() / row_len * row_len;
            let src = &src[..n];
            let bytes = n / row_len * ty.row_bytes(row_len as u64).unwrap() as usize;
            let mut a = vec![0u8; bytes];
            let mut b = vec![1u8; bytes];
            quantize_rows(ty, src, row_len, &mut a).unwrap();
            pool.install(|| quantize_rows_par(ty, src, row_len, &mut b)).unwrap();
            assert!(a == b, "{ty}");
            let mut fa = vec![0f32; n];
            let mut fb = vec![1f32; n];
            dequantize_rows(ty, &a, row_len, &mut fa).unwrap();
            pool.install(|| dequantize_rows_par(ty, &a, row_len, &mut fb)).unwrap();
            assert!(fa.iter().zip(&fb).all(|(x, y)| x.to_bits() == y.to_bits()), "{ty}");
            if ty == GgmlType::F32 {
                assert!(fa.iter().zip(src).all(|(x, y)| x.to_bits() == y.to_bits()));
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
