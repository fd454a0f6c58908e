//! Where each architecture keeps its MoE tensors: the Hugging Face names of the routed experts'
//! projections, the router, its correction bias and the shared experts, per decoder layer.

use moe_runner_core::{MoeError, Result};

/// Checkpoint families with one naming scheme each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// DeepSeek-V2/V3/V3.2/V4 (`mlp.experts.{e}.{gate,up,down}_proj`, `mlp.shared_experts`).
    DeepSeek,
    /// GLM-4-MoE: DeepSeek's names.
    Glm4Moe,
    /// Qwen2-MoE: one shared expert (`mlp.shared_expert`) with a sigmoid gate.
    Qwen2Moe,
    /// Qwen3-MoE: no shared experts.
    Qwen3Moe,
    /// Mixtral (`block_sparse_moe.experts.{e}.w1/w3/w2`: gate, up, down).
    Mixtral,
}

/// `architectures[0]` of each family's config.json.
pub const ARCHITECTURES: &[(&str, Family)] = &[
    ("DeepseekV2ForCausalLM", Family::DeepSeek),
    ("DeepseekV3ForCausalLM", Family::DeepSeek),
    ("DeepseekV32ForCausalLM", Family::DeepSeek),
    ("DeepseekV4ForCausalLM", Family::DeepSeek),
    ("Glm4MoeForCausalLM", Family::Glm4Moe),
    ("Qwen2MoeForCausalLM", Family::Qwen2Moe),
    ("Qwen3MoeForCausalLM", Family::Qwen3Moe),
    ("MixtralForCausalLM", Family::Mixtral),
];

/// The three projections of an expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    Gate,
    Up,
    Down,
}

impl Family {
    /// The family of a config's architecture, or an error listing the known ones.
    pub fn of(arch: &str) -> Result<Self> {
        ARCHITECTURES
            .iter()
            .find(|(a, _)| *a == arch)
            .map(|(_, f)| *f)
            .ok_or_else(|| MoeError::Unknown {
                kind: "checkpoint architecture",
                name: arch.into(),
                known: ARCHITECTURES
                    .iter()
                    .map(|(a, _)| *a)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    fn mlp(self, layer: usize) -> String {
        match self {
            Family::Mixtral => format!("model.layers.{layer}.block_sparse_moe"),
            _ => format!("model.layers.{layer}.mlp"),
        }
    }

    /// The weight of routed expert `e`'s projection in `layer` (`[out, in]`, as nn.Linear).
    pub fn expert(self, layer: usize, e: usize, proj: Proj) -> String {
        let p = match (self, proj) {
            (Family::Mixtral, Proj::Gate) => "w1",
            (Family::Mixtral, Proj::Up) => "w3",
            (Family::Mixtral, Proj::Down) => "w2",
            (_, Proj::Gate) => "gate_proj",
            (_, Proj::Up) => "up_proj",
            (_, Proj::Down) => "down_proj",
        };
        format!("{}.experts.{e}.{p}.weight", self.mlp(layer))
    }

    /// The router's `[E, H]` weight.
    pub fn router(self, layer: usize) -> String {
        format!("{}.gate.weight", self.mlp(layer))
    }

    /// The router's score-correction bias `[E]` (DeepSeek-V3 and later, GLM-4-MoE).
    pub fn router_bias(self, layer: usize) -> Option<String> {
        matches!(self, Family::DeepSeek | Family::Glm4Moe)
            .then(|| format!("{}.gate.e_score_correction_bias", self.mlp(layer)))
    }

    /// The weight of the shared experts' projection (all shared experts as one MLP), if the
    /// family has them.
    pub fn shared(self, layer: usize, proj: Proj) -> Option<String> {
        let p = match proj {
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        };
        match self {
            Family::DeepSeek | Family::Glm4Moe => {
                Some(format!("{}.shared_experts.{p}.weight", self.mlp(layer)))
            }
            Family::Qwen2Moe => Some(format!("{}.shared_expert.{p}.weight", self.mlp(layer))),
            _ => None,
        }
    }

    /// Qwen2-MoE's `[1, H]` sigmoid gate on its shared expert.
    pub fn shared_gate(self, layer: usize) -> Option<String> {
        (self == Family::Qwen2Moe).then(|| format!("{}.shared_expert_gate.weight", self.mlp(layer)))
    }
}

/// The inverse block scale stored beside an FP8 weight (`weight` -> `weight_scale_inv`).
pub fn scale_of(weight: &str) -> String {
    format!("{weight}_scale_inv")
}

/// The tensors NVIDIA ModelOpt stores beside an NVFP4 `...weight` (packed E2M1, U8).
pub struct Nvfp4Names {
    /// E4M3 scales of 16-value blocks, `[rows, cols / 16]`.
    pub scale: String,
    /// f32 scalar: 1 / the weight's global scale.
    pub scale_2: String,
    /// f32 scalar: 1 / the global scale of the activations it multiplies.
    pub input_scale: String,
}

impl Nvfp4Names {
    pub fn of(weight: &str) -> Self {
        let prefix = weight.strip_suffix("weight").unwrap_or(weight);
        Self {
            scale: format!("{weight}_scale"),
            scale_2: format!("{weight}_scale_2"),
            input_scale: format!("{prefix}input_scale"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_hugging_face() {
        let ds = Family::of("DeepseekV3ForCausalLM").unwrap();
        assert_eq!(
            ds.expert(3, 17, Proj::Up),
            "model.layers.3.mlp.experts.17.up_proj.weight"
        );
        assert_eq!(
            ds.router_bias(3).unwrap(),
            "model.layers.3.mlp.gate.e_score_correction_bias"
        );
        assert_eq!(
            ds.shared(3, Proj::Down).unwrap(),
            "model.layers.3.mlp.shared_experts.down_proj.weight"
        );
        let mx = Family::of("MixtralForCausalLM").unwrap();
        assert_eq!(
            mx.expert(0, 7, Proj::Up),
            "model.layers.0.block_sparse_moe.experts.7.w3.weight"
        );
        assert_eq!(mx.router(0), "model.layers.0.block_sparse_moe.gate.weight");
        assert!(mx.shared(0, Proj::Gate).is_none());
        assert_eq!(
            Family::Qwen2Moe.shared_gate(1).unwrap(),
            "model.layers.1.mlp.shared_expert_gate.weight"
        );
        assert_eq!(scale_of("a.weight"), "a.weight_scale_inv");
    }

    #[test]
    fn unknown_architectures_list_the_known() {
        let e = Family::of("LlamaForCausalLM").unwrap_err().to_string();
        assert!(
            e.contains("LlamaForCausalLM") && e.contains("MixtralForCausalLM"),
            "{e}"
        );
    }
}
