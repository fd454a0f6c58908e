//! Quant schemes: the pair (weight format, activation format) a registration declares it
//! supports, so two kernels for one (format, runner) pair need no switch on the quant info type.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum QuantScheme {
    /// f32 weights and activations (the reference's exact mode).
    F32,
    /// bf16 weights and activations, f32 accumulation.
    Bf16,
    /// fp16 weights and activations, f32 accumulation.
    F16,
    /// FP8 E4M3 weights with one f32 scale per 128x128 block; activations FP8 with one scale
    /// per token and 128 channels, quantized on the fly (DeepSeek-V3).
    Fp8Block128,
    /// FP8 weights with one scale per expert matrix; activations FP8 with one scale per tensor
    /// (static when given, otherwise the dynamic amax of the batch).
    Fp8PerTensor,
    /// FP8 weights with one scale per output channel; activations FP8 with one scale per token.
    Fp8PerChannel,
    /// NVFP4 weights and activations (w4a4): E2M1, E4M3 scale per 16 values, f32 global scale.
    Nvfp4,
    /// MXFP4 weights (E2M1, UE8M0 scale per 32 values) with bf16 activations (w4a16).
    Mxfp4,
    /// MXFP4 weights with MXFP4 activations (w4a4): both GEMM inputs quantized per row and 32
    /// values to E2M1 with a UE8M0 scale (MegaMoE's FP4 activations).
    Mxfp4A4,
    /// MXFP4 weights with FP8 activations (w4a8): E4M3 with a UE8M0 scale per row and 32
    /// values (MegaMoE's default activations).
    Mxfp4A8,
}

impl QuantScheme {
    pub const ALL: [QuantScheme; 10] = [
        QuantScheme::F32,
        QuantScheme::Bf16,
        QuantScheme::F16,
        QuantScheme::Fp8Block128,
        QuantScheme::Fp8PerTensor,
        QuantScheme::Fp8PerChannel,
        QuantScheme::Nvfp4,
        QuantScheme::Mxfp4,
        QuantScheme::Mxfp4A4,
        QuantScheme::Mxfp4A8,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            QuantScheme::F32 => "f32",
            QuantScheme::Bf16 => "bf16",
            QuantScheme::F16 => "fp16",
            QuantScheme::Fp8Block128 => "fp8-block-128x128",
            QuantScheme::Fp8PerTensor => "fp8-per-tensor",
            QuantScheme::Fp8PerChannel => "fp8-per-channel",
            QuantScheme::Nvfp4 => "nvfp4",
            QuantScheme::Mxfp4 => "mxfp4",
            QuantScheme::Mxfp4A4 => "mxfp4-w4a4",
            QuantScheme::Mxfp4A8 => "mxfp4-w4a8",
        }
    }

    pub const fn weight_format(self) -> &'static str {
        match self {
            QuantScheme::F32 => "f32",
            QuantScheme::Bf16 => "bf16",
            QuantScheme::F16 => "fp16",
            QuantScheme::Fp8Block128 => "e4m3, f32 scale per 128x128 block",
            QuantScheme::Fp8PerTensor => "e4m3, f32 scale per expert",
            QuantScheme::Fp8PerChannel => "e4m3, f32 scale per output channel",
            QuantScheme::Nvfp4 => "e2m1, e4m3 scale per 16, f32 global",
            QuantScheme::Mxfp4 | QuantScheme::Mxfp4A4 | QuantScheme::Mxfp4A8 => {
                "e2m1, ue8m0 scale per 32"
            }
        }
    }

    pub const fn activation_format(self) -> &'static str {
        match self {
            QuantScheme::F32 => "f32",
            QuantScheme::Bf16 | QuantScheme::Mxfp4 => "bf16",
            QuantScheme::F16 => "fp16",
            QuantScheme::Fp8Block128 => "e4m3, f32 scale per token per 128",
            QuantScheme::Fp8PerTensor => "e4m3, f32 scale per tensor",
            QuantScheme::Fp8PerChannel => "e4m3, f32 scale per token",
            QuantScheme::Nvfp4 => "e2m1, e4m3 scale per 16, f32 global",
            QuantScheme::Mxfp4A4 => "e2m1, ue8m0 scale per 32",
            QuantScheme::Mxfp4A8 => "e4m3, ue8m0 scale per 32",
        }
    }

    /// The activations' number format of the MXFP4 weight schemes.
    pub const fn mxfp4_acts(self) -> Option<Mxfp4Acts> {
        match self {
            QuantScheme::Mxfp4 => Some(Mxfp4Acts::Bf16),
            QuantScheme::Mxfp4A4 => Some(Mxfp4Acts::Fp4),
            QuantScheme::Mxfp4A8 => Some(Mxfp4Acts::Fp8),
            _ => None,
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// What the GEMMs of MXFP4 weights read as activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mxfp4Acts {
    /// bf16 as given (w4a16).
    #[default]
    Bf16,
    /// E2M1 with a UE8M0 scale per 32 values, `ceil_pow2(max(amax, 1e-4) / 6)` (w4a4).
    Fp4,
    /// E4M3 with a UE8M0 scale per 32 values, `ceil_pow2(max(amax, 1e-4) / 448)` (w4a8).
    Fp8,
}

impl Mxfp4Acts {
    pub const fn scheme(self) -> QuantScheme {
        match self {
            Mxfp4Acts::Bf16 => QuantScheme::Mxfp4,
            Mxfp4Acts::Fp4 => QuantScheme::Mxfp4A4,
            Mxfp4Acts::Fp8 => QuantScheme::Mxfp4A8,
        }
    }
}

impl fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Joins scheme names for messages.
pub fn scheme_list(schemes: &[QuantScheme]) -> String {
    schemes
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(", ")
}
