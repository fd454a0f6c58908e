//! The configurations every path is checked on: each activation option of the runner config,
//! each routing option, and batch sizes including zero tokens.

use moe_runner_core::{Activation, DType, GateUpLayout, MoeRunnerConfig, QuantScheme};

/// A named change to the base config.
pub struct Variant {
    pub name: &'static str,
    pub apply: fn(&mut MoeRunnerConfig),
    /// Whether formats that sum in their combine (masked) can express it.
    pub masked_ok: bool,
    /// Whether MegaMoE's fused program expresses it (it sums in its combine, like the masked
    /// formats, and its GEMM 1 tiles pair gate and up columns).
    pub megamoe_ok: bool,
}

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "silu",
        apply: |_| {},
        masked_ok: true,
        megamoe_ok: true,
    },
    Variant {
        name: "swiglu_limit",
        apply: |c| c.swiglu_limit = Some(0.75),
        masked_ok: true,
        megamoe_ok: true,
    },
    Variant {
        name: "gpt_oss",
        apply: |c| {
            c.swiglu_limit = Some(0.75);
            c.gemm1_alpha = Some(1.702);
            c.gate_up = GateUpLayout::Interleaved;
        },
        masked_ok: true,
        megamoe_ok: true,
    },
    Variant {
        name: "clamp_after_silu",
        apply: |c| c.gemm1_clamp_limit = Some(0.2),
        masked_ok: true,
        megamoe_ok: true,
    },
    Variant {
        name: "gelu",
        apply: |c| c.activation = Activation::Gelu,
        masked_ok: true,
        megamoe_ok: true,
    },
    Variant {
        name: "up_gate",
        apply: |c| c.gate_up = GateUpLayout::UpGate,
        masked_ok: true,
        megamoe_ok: true,
    },
    Variant {
        name: "not_gated",
        apply: |c| c.is_gated = false,
        masked_ok: true,
        megamoe_ok: false,
    },
    Variant {
        name: "routed_scaling",
        apply: |c| c.routed_scaling_factor = Some(2.5),
        masked_ok: true,
        megamoe_ok: true,
    },
    Variant {
        name: "weight_on_input",
        apply: |c| {
            c.top_k = 1;
            c.apply_router_weight_on_input = true;
        },
        masked_ok: false,
        megamoe_ok: false,
    },
    Variant {
        name: "no_combine",
        apply: |c| c.no_combine = true,
        masked_ok: false,
        megamoe_ok: false,
    },
    Variant {
        name: "inplace",
        apply: |c| c.inplace = true,
        masked_ok: false,
        megamoe_ok: false,
    },
];

/// Batch sizes: zero tokens, one, and an odd count that leaves some experts empty.
pub const TOKENS: &[usize] = &[0, 1, 37];

/// The small shape of the suite: every scheme's group sizes divide it (128 for FP8 blocks).
pub fn base_config() -> MoeRunnerConfig {
    MoeRunnerConfig::new(8, 256, 128, 2)
}

/// Activation dtype a scheme's kernels read.
pub fn hidden_dtype(scheme: QuantScheme) -> DType {
    match scheme {
        QuantScheme::F32 => DType::F32,
        QuantScheme::F16 => DType::F16,
        _ => DType::Bf16,
    }
}
