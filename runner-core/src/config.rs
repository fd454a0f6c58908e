//! The runner configuration. Every field's semantics is fixed here, once, so every backend
//! implements the same function and the conformance suite can compare them.

use crate::activation::{
    ActivationKernel, ClampAfterSilu, GeluAndMul, GeluPlain, GptOssSwiglu, LimitedSwiglu,
    SiluAndMul, SiluPlain,
};
use crate::{MoeError, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Silu,
    /// GELU with the exact erf form.
    Gelu,
}

/// How GEMM 1's `2I` output columns hold the gate and up halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateUpLayout {
    /// Rows `0..I` of `w13` are the gate, rows `I..2I` the up projection.
    #[default]
    GateUp,
    /// Rows `0..I` are up, `I..2I` gate.
    UpGate,
    /// Even rows gate, odd rows up (GPT-OSS).
    Interleaved,
}

impl GateUpLayout {
    /// Column indices (gate, up) of intermediate channel `j` in a `2I`-wide GEMM 1 row.
    #[inline]
    pub fn columns(self, j: usize, inter: usize) -> (usize, usize) {
        match self {
            GateUpLayout::GateUp => (j, inter + j),
            GateUpLayout::UpGate => (inter + j, j),
            GateUpLayout::Interleaved => (2 * j, 2 * j + 1),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeRunnerConfig {
    /// Experts in the whole model (all ranks).
    pub num_experts: usize,
    /// Experts held by this rank; ids reaching a runner are local ids `0..num_local_experts`.
    pub num_local_experts: usize,
    pub hidden_size: usize,
    /// Intermediate size per partition (after tensor parallelism), `I`.
    pub intermediate_size: usize,
    pub top_k: usize,
    #[serde(default)]
    pub activation: Activation,
    /// Gated (GEMM 1 produces `2I` columns, act(gate) * up) or not (`I` columns, act(x)).
    #[serde(default = "default_true")]
    pub is_gated: bool,
    #[serde(default)]
    pub gate_up: GateUpLayout,
    /// L: gate = min(gate, L), up = clamp(up, -L, L), then silu(gate) * up (DeepSeek-V4: 10).
    #[serde(default)]
    pub swiglu_limit: Option<f32>,
    /// a, with `swiglu_limit` L (GPT-OSS): gate = min(gate, L), up = clamp(up, -L, L),
    /// out = gate * sigmoid(a * gate) * (up + 1).
    #[serde(default)]
    pub gemm1_alpha: Option<f32>,
    /// L alone: min(silu(gate), L) * clamp(up, -L, L), the clamp after the SiLU.
    #[serde(default)]
    pub gemm1_clamp_limit: Option<f32>,
    /// Multiplies the routed experts' sum. Its one owner is the final top-k sum (the runner's
    /// combine step); routers leave weights unscaled when a layer passes it here.
    #[serde(default)]
    pub routed_scaling_factor: Option<f32>,
    /// Router weights multiply GEMM 1's input instead of GEMM 2's output (requires top-k 1).
    #[serde(default)]
    pub apply_router_weight_on_input: bool,
    /// The output is written over the input hidden buffer.
    #[serde(default)]
    pub inplace: bool,
    /// Output `[M, top_k, H]`: no router weight, no sum.
    #[serde(default)]
    pub no_combine: bool,
    /// MegaMoE's number-format switches; other runners ignore them.
    #[serde(default)]
    pub megamoe: MegaMoeFlags,
}

/// MegaMoE's switches, each unset by default. An unset switch takes its environment override
/// (`MOE_MEGA_FP4_ACTS`, `MOE_MEGA_MXF4_KIND`, read once per process), then its default: the
/// activations of the weights' scheme, and no MXF4 kind. An explicit value is never overridden.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MegaMoeFlags {
    /// Activations as E2M1 with a UE8M0 scale per 32 values (w4a4); otherwise E4M3 with a
    /// UE8M0 scale per 32 (w4a8). Must agree with the weights' scheme.
    #[serde(default)]
    pub fp4_acts: Option<bool>,
    /// The FP4 x FP4 product: FP4 activations stay FP4 through the dispatch and both operands
    /// are widened in registers next to the MMA, instead of the activations being widened to
    /// E4M3 once when they arrive. Only with FP4 activations.
    #[serde(default)]
    pub mxf4_kind: Option<bool>,
}

fn default_true() -> bool {
    true
}

impl MoeRunnerConfig {
    /// A gated SiLU config with every option off.
    pub fn new(
        num_experts: usize,
        hidden_size: usize,
        intermediate_size: usize,
        top_k: usize,
    ) -> Self {
        Self {
            num_experts,
            num_local_experts: num_experts,
            hidden_size,
            intermediate_size,
            top_k,
            activation: Activation::Silu,
            is_gated: true,
            gate_up: GateUpLayout::GateUp,
            swiglu_limit: None,
            gemm1_alpha: None,
            gemm1_clamp_limit: None,
            routed_scaling_factor: None,
            apply_router_weight_on_input: false,
            inplace: false,
            no_combine: false,
            megamoe: MegaMoeFlags::default(),
        }
    }

    /// Columns of GEMM 1's output: `2I` when gated, `I` otherwise.
    pub fn gemm1_columns(&self) -> usize {
        if self.is_gated {
            2 * self.intermediate_size
        } else {
            self.intermediate_size
        }
    }

    /// Shape of the layer output for `m` tokens: `[m, H]`, or `[m, top_k, H]` with `no_combine`.
    pub fn output_shape(&self, m: usize) -> Vec<usize> {
        if self.no_combine {
            vec![m, self.top_k, self.hidden_size]
        } else {
            vec![m, self.hidden_size]
        }
    }

    /// The scale the final top-k sum applies (1 when unset).
    pub fn output_scale(&self) -> f32 {
        self.routed_scaling_factor.unwrap_or(1.0)
    }

    /// Checks sizes and that the options form one of the documented activations.
    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(MoeError::Config(m));
        for (name, v) in [
            ("num_experts", self.num_experts),
            ("num_local_experts", self.num_local_experts),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("top_k", self.top_k),
        ] {
            if v == 0 {
                return err(format!("{name} must be at least 1"));
            }
        }
        if self.num_local_experts > self.num_experts {
            return err(format!(
                "num_local_experts {} exceeds num_experts {}",
                self.num_local_experts, self.num_experts
            ));
        }
        if self.top_k > self.num_experts {
            return err(format!(
                "top_k {} exceeds num_experts {}",
                self.top_k, self.num_experts
            ));
        }
        for (name, v) in [
            ("swiglu_limit", self.swiglu_limit),
            ("gemm1_clamp_limit", self.gemm1_clamp_limit),
            ("routed_scaling_factor", self.routed_scaling_factor),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return err(format!("{name} must be finite and positive, got {v}"));
                }
            }
        }
        if let Some(a) = self.gemm1_alpha {
            if !a.is_finite() {
                return err(format!("gemm1_alpha must be finite, got {a}"));
            }
        }
        if self.apply_router_weight_on_input && self.top_k != 1 {
            return err(format!(
                "apply_router_weight_on_input needs top_k 1, got {}",
                self.top_k
            ));
        }
        if self.inplace && self.no_combine {
            return err("inplace and no_combine exclude each other: the [M, k, H] output cannot overwrite the [M, H] input".into());
        }
        self.activation_kernel().map(|_| ())
    }

    /// Resolves the activation options into the one kernel they describe.
    pub fn activation_kernel(&self) -> Result<ActivationKernel> {
        let limited = self.swiglu_limit.is_some()
            || self.gemm1_alpha.is_some()
            || self.gemm1_clamp_limit.is_some();
        if limited && (!self.is_gated || self.activation != Activation::Silu) {
            return Err(MoeError::Config(
                "swiglu_limit, gemm1_alpha and gemm1_clamp_limit apply to gated SiLU only".into(),
            ));
        }
        Ok(
            match (
                self.activation,
                self.is_gated,
                self.swiglu_limit,
                self.gemm1_alpha,
                self.gemm1_clamp_limit,
            ) {
                (Activation::Silu, false, ..) => SiluPlain.into(),
                (Activation::Gelu, false, ..) => GeluPlain.into(),
                (Activation::Gelu, true, ..) => GeluAndMul.into(),
                (Activation::Silu, true, None, None, None) => SiluAndMul.into(),
                (Activation::Silu, true, Some(limit), None, None) => LimitedSwiglu { limit }.into(),
                (Activation::Silu, true, Some(limit), Some(alpha), None) => {
                    GptOssSwiglu { limit, alpha }.into()
                }
                (Activation::Silu, true, None, None, Some(limit)) => {
                    ClampAfterSilu { limit }.into()
                }
                (Activation::Silu, true, None, Some(_), _) => {
                    return Err(MoeError::Config(
                        "gemm1_alpha needs swiglu_limit (the GPT-OSS clamp)".into(),
                    ))
                }
                (Activation::Silu, true, Some(_), _, Some(_)) => {
                    return Err(MoeError::Config(
                        "gemm1_clamp_limit and swiglu_limit exclude each other".into(),
                    ))
                }
            },
        )
    }
}
