//! The scale arithmetic of LoRA adapters, in one place.
//!
//! Two rules meet here. PEFT scales a module's product `B @ A` by `alpha / r` (`alpha / sqrt(r)` with rsLoRA),
//! `r` and `alpha` resolved per module through `rank_pattern`/`alpha_pattern` ([`crate::patterns`]). llama.cpp
//! scales by `user_scale * alpha / rank` from one `adapter.lora.alpha` (`user_scale` alone when alpha is 0).
//! A converted adapter keeps PEFT's product exactly: one header alpha when it reproduces every module's scale
//! ([`llama_alpha`]), otherwise alpha 0 and each module's scale folded into its `lora_b` ([`fold`]). The ggla
//! writer makes the same choice for its header (`ggla::ggla_header`) with the same fold.

/// PEFT's `scaling` of one module: `alpha / sqrt(r)` with rsLoRA, else `alpha / r` (in f64, as Python computes it).
pub fn peft_scale(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// llama.cpp's scale of a pair of rank `rank` at the user's scale (`llama_adapter_lora_weight::get_scale`, f32).
pub fn llama_scale(alpha: f32, rank: usize, user_scale: f32) -> f32 {
    if alpha != 0.0 {
        user_scale * alpha / rank as f32
    } else {
        user_scale
    }
}

/// The one `adapter.lora.alpha` for which llama.cpp's `alpha / rank` equals PEFT's scale for every module, or
/// `None` (the scales must then be folded). `modules` are `(r, alpha)` per module as PEFT resolves them. The
/// value must be positive and exact in f32 (the GGUF key is a FLOAT32); with rsLoRA every r must be a square.
pub fn llama_alpha(modules: &[(usize, f64)], use_rslora: bool) -> Option<f64> {
    let mut candidate: Option<f64> = None;
    for &(r, alpha) in modules {
        let value = if use_rslora {
            let root = r.isqrt();
            if root * root != r {
                return None;
            }
            alpha * root as f64 // alpha / sqrt(r) == (alpha * sqrt(r)) / r
        } else {
            alpha
        };
        match candidate {
            Some(c) if c != value => return None,
            _ => candidate = Some(value),
        }
    }
    candidate.filter(|&v| v > 0.0 && (v as f32) as f64 == v)
}

/// `value * scale` computed in f64 and rounded once to f32, as numpy's `(x.astype(float64) * s).astype(float32)`.
pub fn fold(value: f32, scale: f64) -> f32 {
    (value as f64 * scale) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Oracle: PEFT's `LoraLayer.update_layer` (`scaling = lora_alpha / r`, or `/ math.sqrt(r)` with rsLoRA),
    /// worked out by hand.
    #[test]
    fn peft_rules() {
        assert_eq!(peft_scale(16.0, 8, false), 2.0);
        assert_eq!(peft_scale(16.0, 16, true), 4.0);
        assert_eq!(peft_scale(3.0, 2, true), 3.0 / std::f64::consts::SQRT_2);
        assert_eq!(llama_scale(16.0, 8, 0.5), 1.0);
        assert_eq!(llama_scale(0.0, 8, 0.5), 0.5);
    }

    #[test]
    fn one_header_alpha_only_when_it_is_exact() {
        assert_eq!(llama_alpha(&[(8, 16.0), (4, 16.0)], false), Some(16.0));
        assert_eq!(llama_alpha(&[(8, 16.0), (8, 32.0)], false), None);
        assert_eq!(llama_alpha(&[(16, 8.0), (4, 16.0)], true), Some(32.0));
        assert_eq!(llama_alpha(&[(8, 8.0)], true), None); // sqrt(8) is irrational
        assert_eq!(llama_alpha(&[(8, 0.1)], false), None); // 0.1 is not an f32
        assert_eq!(llama_alpha(&[(8, 0.0)], false), None);
        assert_eq!(llama_alpha(&[], false), None);
    }

    #[test]
    fn fold_rounds_once() {
        // 1/3 in f32 times 3 in f64 is 1.0000000298..., which rounds to 1.0 in f32; f32 arithmetic would too,
        // but 0.1f32 * 0.1 (f64) differs from 0.1f32 * 0.1f32 in the last bit.
        assert_eq!(fold(0.1, 0.1), (0.1f32 as f64 * 0.1) as f32);
        assert_ne!(fold(0.1, 0.1).to_bits(), (0.1f32 * 0.1f32).to_bits());
    }
}
