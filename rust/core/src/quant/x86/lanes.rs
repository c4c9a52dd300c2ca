//! Portable block kernels recompiled with AVX2 enabled.
//!
//! The read-only formats' dequantizers are plain scalar Rust written so that the compiler can vectorise them (fixed
//! size arrays, branch-free sign flips); compiled for the x86-64 baseline (SSE2) the compiler mostly does not, as
//! widening bytes to floats is expensive there. [`dequantize_with_avx2`] runs the same generic kernel inside an
//! AVX2-enabled function, into which it is inlined and compiled again with 256-bit vectors. The float operations
//! are the same ones in the same order (Rust never fuses a multiply and an add), so the values are identical; the
//! block files' tests compare both compilations on the same bytes.

/// Runs `kernel(src, dst)` compiled with AVX2 enabled; false (without running it) when the CPU lacks AVX2.
/// `kernel` should be an `#[inline(always)]` function item so that it is compiled into the AVX2 function.
#[inline(always)]
pub(in crate::quant) fn dequantize_with_avx2<K: Fn(&[u8], &mut [f32])>(kernel: K, src: &[u8], dst: &mut [f32]) -> bool {
    if !is_x86_feature_detected!("avx2") {
        return false;
    }
    // SAFETY: AVX2 is available (checked above); the kernel is safe code.
    unsafe { run_avx2(kernel, src, dst) };
    true
}

#[target_feature(enable = "avx2")]
unsafe fn run_avx2<K: Fn(&[u8], &mut [f32])>(kernel: K, src: &[u8], dst: &mut [f32]) {
    kernel(src, dst)
}
