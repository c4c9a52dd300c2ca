//! The ggml tensor types: ids, names, block sizes and block byte sizes.
//!
//! Every type that llama.cpp defines today is known here (ggml.h of the llama-cpp-python 0.3.36 sources,
//! `GGML_TYPE_COUNT = 43`), so a file holding any of them can be read, validated and copied untouched, even where
//! this crate cannot (de)quantize it. Sizes match gguf-py's `GGML_QUANT_SIZES` (checked by the Python tests) for
//! every type gguf-py 0.19.0 knows; q2_0 (id 42) is newer than gguf-py 0.19.0, its size comes from `block_q2_0` in
//! ggml-common.h (checked against the C oracle's `sizeof` by the Python tests).

use std::fmt;

/// Elements per super-block of the k-quants and most i-quants (`QK_K` in ggml).
const QK_K: usize = 256;

macro_rules! ggml_types {
    ($( $variant:ident = $id:literal, $name:literal, $block:expr, $bytes:expr; )*) => {
        /// A ggml tensor type (`enum ggml_type`). Discriminants are the on-disk type ids.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        #[repr(u32)]
        pub enum GgmlType {
            $(
                #[doc = concat!("`", $name, "`: ", stringify!($block), " elements in ", stringify!($bytes), " bytes.")]
                $variant = $id,
            )*
        }

        impl GgmlType {
            /// Every known type, in id order.
            pub const ALL: &'static [GgmlType] = &[$(GgmlType::$variant,)*];

            /// The type with on-disk id `id`, or `None` for ids that are unknown or were removed from ggml
            /// (4, 5, 31-33, 36-38).
            pub fn from_id(id: u32) -> Option<GgmlType> {
                match id {
                    $($id => Some(GgmlType::$variant),)*
                    _ => None,
                }
            }

            /// Lower-case name as gguf-py spells `GGMLQuantizationType` members ("q4_0", "q6_k", "bf16", ...).
            pub fn name(self) -> &'static str {
                match self {
                    $(GgmlType::$variant => $name,)*
                }
            }

            /// Number of elements in one block (1 for plain element types).
            pub const fn block_size(self) -> usize {
                match self {
                    $(GgmlType::$variant => $block,)*
                }
            }

            /// Bytes taken by one block.
            pub const fn block_bytes(self) -> usize {
                match self {
                    $(GgmlType::$variant => $bytes,)*
                }
            }
        }
    };
}

ggml_types! {
    F32 = 0, "f32", 1, 4;
    F16 = 1, "f16", 1, 2;
    Q4_0 = 2, "q4_0", 32, 2 + 16;
    Q4_1 = 3, "q4_1", 32, 2 + 2 + 16;
    Q5_0 = 6, "q5_0", 32, 2 + 4 + 16;
    Q5_1 = 7, "q5_1", 32, 2 + 2 + 4 + 16;
    Q8_0 = 8, "q8_0", 32, 2 + 32;
    Q8_1 = 9, "q8_1", 32, 4 + 4 + 32;
    Q2_K = 10, "q2_k", QK_K, 2 + 2 + QK_K / 16 + QK_K / 4;
    Q3_K = 11, "q3_k", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12;
    Q4_K = 12, "q4_k", QK_K, 2 + 2 + QK_K / 2 + 12;
    Q5_K = 13, "q5_k", QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12;
    Q6_K = 14, "q6_k", QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16;
    Q8_K = 15, "q8_k", QK_K, 4 + QK_K + QK_K / 8;
    IQ2_XXS = 16, "iq2_xxs", QK_K, 2 + QK_K / 4;
    IQ2_XS = 17, "iq2_xs", QK_K, 2 + QK_K / 4 + QK_K / 32;
    IQ3_XXS = 18, "iq3_xxs", QK_K, 2 + QK_K / 4 + QK_K / 8;
    IQ1_S = 19, "iq1_s", QK_K, 2 + QK_K / 8 + QK_K / 16;
    IQ4_NL = 20, "iq4_nl", 32, 2 + 16;
    IQ3_S = 21, "iq3_s", QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4;
    IQ2_S = 22, "iq2_s", QK_K, 2 + QK_K / 4 + QK_K / 16;
    IQ4_XS = 23, "iq4_xs", QK_K, 2 + 2 + QK_K / 2 + QK_K / 64;
    I8 = 24, "i8", 1, 1;
    I16 = 25, "i16", 1, 2;
    I32 = 26, "i32", 1, 4;
    I64 = 27, "i64", 1, 8;
    F64 = 28, "f64", 1, 8;
    IQ1_M = 29, "iq1_m", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32;
    BF16 = 30, "bf16", 1, 2;
    TQ1_0 = 34, "tq1_0", QK_K, 2 + 4 * 13;
    TQ2_0 = 35, "tq2_0", QK_K, 2 + 64;
    MXFP4 = 39, "mxfp4", 32, 1 + 16;
    NVFP4 = 40, "nvfp4", 64, 4 + 32;
    Q1_0 = 41, "q1_0", 128, 2 + 16;
    Q2_0 = 42, "q2_0", 64, 2 + 16;
}

impl GgmlType {
    /// One past the largest type id ggml defines (`GGML_TYPE_COUNT`: 43 in the llama-cpp-python 0.3.36 sources,
    /// which added Q2_0 after gguf-py 0.19.0's NVFP4 and Q1_0, themselves after the type list of gguf-py 0.19.0).
    pub const COUNT: u32 = 43;

    /// The on-disk type id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Parses a name as [`GgmlType::name`] prints it; case-insensitive ("Q4_0", "q6_K" and "q6_k" all work).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        let lower = name.to_ascii_lowercase();
        GgmlType::ALL.iter().copied().find(|t| t.name() == lower)
    }

    /// Bytes taken by a row of `row_len` elements, or `None` when `row_len` is not a multiple of the block size
    /// or the size overflows.
    pub fn row_bytes(self, row_len: u64) -> Option<u64> {
        let block = self.block_size() as u64;
        if !row_len.is_multiple_of(block) {
            return None;
        }
        (row_len / block).checked_mul(self.block_bytes() as u64)
    }

    /// True for the types whose blocks hold a single element (f32, f16, bf16, i8..i64, f64).
    pub fn is_plain(self) -> bool {
        self.block_size() == 1
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_removed_ids_are_unknown() {
        for &t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
            assert!(t.id() < GgmlType::COUNT);
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 43, u32::MAX] {
            assert_eq!(GgmlType::from_id(removed), None, "id {removed}");
        }
        assert_eq!(GgmlType::ALL.len(), 35);
    }

    #[test]
    fn sizes_of_the_types_this_project_quantizes() {
        assert_eq!((GgmlType::Q4_0.block_size(), GgmlType::Q4_0.block_bytes()), (32, 18));
        assert_eq!((GgmlType::Q8_0.block_size(), GgmlType::Q8_0.block_bytes()), (32, 34));
        assert_eq!((GgmlType::Q6_K.block_size(), GgmlType::Q6_K.block_bytes()), (256, 210));
        assert_eq!(GgmlType::Q4_0.row_bytes(64), Some(36));
        assert_eq!(GgmlType::Q4_0.row_bytes(48), None);
        assert_eq!(GgmlType::F16.row_bytes(3), Some(6));
        assert_eq!(GgmlType::F32.row_bytes(u64::MAX), None);
    }
}
