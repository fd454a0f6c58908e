//! Model specs: the few numbers of one MoE layer that decide its shape and its routing, either
//! from a built-in preset or derived from a Hugging Face `config.json` (see `hf_config`).

use crate::error::{CliError, Result};
use moe_runner_core::QuantScheme;
use serde::Serialize;

/// How a model picks its experts.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Routing {
    /// softmax(logits), top-k, optionally renormalized (Qwen, Mixtral).
    Softmax { renormalize: bool },
    /// sigmoid scores plus a correction bias for the choice, `topk_group` of `n_group` groups
    /// kept, top-k within them (DeepSeek-V3 family, GLM-4-MoE).
    Grouped {
        n_group: usize,
        topk_group: usize,
        renormalize: bool,
    },
}

/// One MoE layer of a model, before any parallelism.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelSpec {
    /// Preset name or the config's `architectures[0]`.
    pub name: String,
    pub arch: String,
    pub routed_experts: usize,
    pub shared_experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    /// Intermediate size of one routed expert.
    pub moe_intermediate: usize,
    /// Intermediate size of all shared experts together (0 without shared experts).
    pub shared_intermediate: usize,
    /// Whether the shared experts have the routed experts' shape, so they can run fused as
    /// always-picked extra experts (DeepSeek, GLM) instead of as a separate MLP (Qwen2-MoE).
    pub fusable_shared: bool,
    pub routing: Routing,
    /// Multiplies the routed sum; owned by the runner config, never by the router too.
    pub routed_scaling_factor: Option<f32>,
    pub swiglu_limit: Option<f32>,
    /// The scheme the model ships its experts in, used when `--scheme` is not given.
    pub default_scheme: QuantScheme,
}

/// Built-in presets, by name.
pub const PRESETS: [&str; 5] = [
    "tiny",
    "qwen3-30b-a3b",
    "mixtral-8x7b",
    "deepseek-v3",
    "deepseek-v4-flash",
];

/// Fields every DeepSeek-style preset shares: grouped sigmoid routing, one fusable shared
/// expert of the routed experts' size, FP8 block weights.
fn deepseek(
    name: &str,
    arch: &str,
    top_k: usize,
    hidden: usize,
    (n_group, topk_group): (usize, usize),
    routed_scaling_factor: f32,
    swiglu_limit: Option<f32>,
) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        arch: arch.into(),
        routed_experts: 256,
        shared_experts: 1,
        top_k,
        hidden,
        moe_intermediate: 2048,
        shared_intermediate: 2048,
        fusable_shared: true,
        routing: Routing::Grouped {
            n_group,
            topk_group,
            renormalize: true,
        },
        routed_scaling_factor: Some(routed_scaling_factor),
        swiglu_limit,
        default_scheme: QuantScheme::Fp8Block128,
    }
}

/// Softmax-routed models without shared experts.
fn softmax(
    name: &str,
    arch: &str,
    experts: usize,
    top_k: usize,
    hidden: usize,
    inter: usize,
) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        arch: arch.into(),
        routed_experts: experts,
        shared_experts: 0,
        top_k,
        hidden,
        moe_intermediate: inter,
        shared_intermediate: 0,
        fusable_shared: false,
        routing: Routing::Softmax { renormalize: true },
        routed_scaling_factor: None,
        swiglu_limit: None,
        default_scheme: QuantScheme::Bf16,
    }
}

impl ModelSpec {
    /// A built-in preset. `deepseek-v4-flash` uses the published shape with the group limit
    /// off (one group); give the model's own `config.json` with `--config` for its exact
    /// routing values.
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "tiny" => softmax(name, "tiny", 8, 2, 256, 128),
            "qwen3-30b-a3b" => softmax(name, "Qwen3MoeForCausalLM", 128, 8, 2048, 768),
            "mixtral-8x7b" => softmax(name, "MixtralForCausalLM", 8, 2, 4096, 14336),
            "deepseek-v3" => deepseek(name, "DeepseekV3ForCausalLM", 8, 7168, (8, 4), 2.5, None),
            "deepseek-v4-flash" => deepseek(
                name,
                "DeepseekV4ForCausalLM",
                6,
                4096,
                (1, 1),
                1.5,
                Some(10.0),
            ),
            _ => {
                return Err(CliError::UnknownPreset {
                    name: name.into(),
                    known: PRESETS.join(", "),
                });
            }
        })
    }

    /// Tokens `moe run` uses when `--tokens` is not given: a batch that shows the kernels'
    /// behaviour on the tiny model, and a decode-sized one that stays quick on big models.
    pub fn default_tokens(&self) -> usize {
        if self.name == "tiny" {
            64
        } else {
            16
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_preset_resolves() {
        for name in PRESETS {
            let spec = ModelSpec::preset(name).unwrap();
            assert_eq!(spec.name, name);
            assert!(spec.top_k <= spec.routed_experts);
        }
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let err = ModelSpec::preset("gpt-5").unwrap_err().to_string();
        assert!(
            err.contains("gpt-5") && err.contains("deepseek-v3") && err.contains("tiny"),
            "{err}"
        );
    }
}
