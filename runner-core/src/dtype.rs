//! Element types of tensors. FP8 and FP4 values are stored as bytes; the dtype says how to read them.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    F32,
    Bf16,
    F16,
    /// FP8 E4M3 (OCP "fn": no infinities, NaN = 0x7f / 0xff).
    F8E4M3,
    F8E5M2,
    /// Two E2M1 values per byte: element 2i in the low nibble, 2i+1 in the high nibble.
    E2M1x2,
    /// Power-of-two scale stored as its biased exponent byte.
    Ue8m0,
    U8,
    I32,
    I64,
}

impl DType {
    /// Bytes per stored element (a packed E2M1 byte counts as one element).
    pub const fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::F8E4M3 | DType::F8E5M2 | DType::E2M1x2 | DType::Ue8m0 | DType::U8 => 1,
            DType::I64 => 8,
        }
    }

    /// Floating-point activations a runner accepts unquantized.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::Bf16 | DType::F16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Rust element types that can view a tensor's bytes, with the dtypes they may view.
pub trait Element: bytemuck::Pod + Send + Sync {
    const DTYPES: &'static [DType];
}

impl Element for f32 {
    const DTYPES: &'static [DType] = &[DType::F32];
}
impl Element for half::bf16 {
    const DTYPES: &'static [DType] = &[DType::Bf16];
}
impl Element for half::f16 {
    const DTYPES: &'static [DType] = &[DType::F16];
}
impl Element for u8 {
    const DTYPES: &'static [DType] = &[
        DType::U8,
        DType::F8E4M3,
        DType::F8E5M2,
        DType::E2M1x2,
        DType::Ue8m0,
    ];
}
impl Element for i32 {
    const DTYPES: &'static [DType] = &[DType::I32];
}
impl Element for i64 {
    const DTYPES: &'static [DType] = &[DType::I64];
}
