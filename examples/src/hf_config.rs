//! Derives a [`ModelSpec`] from a Hugging Face `config.json`, keyed by `architectures[0]`.
//!
//! Fields that decide the layer's shape are required and a missing one is named in the error.
//! Routing knobs that Hugging Face gives defaults for take those defaults when absent or null
//! (`n_group` and `topk_group` 1, no `routed_scaling_factor`, `norm_topk_prob` false for
//! DeepSeek-V2 / Qwen and true for DeepSeek-V3+ / GLM), so slimmed-down configs still load.

use crate::error::{CliError, Result};
use crate::model::{ModelSpec, Routing};
use moe_runner_core::QuantScheme;
use serde_json::{Map, Value};

/// Architectures this module derives a spec for.
pub const ARCHITECTURES: [&str; 8] = [
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "DeepseekV32ForCausalLM",
    "DeepseekV4ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "Glm4MoeForCausalLM",
];

/// DeepSeek-V4's clamp when its config does not carry `swiglu_limit`.
const V4_SWIGLU_LIMIT: f32 = 10.0;

/// Typed reads of one config object, with errors naming the field and the architecture.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    origin: &'a str,
    arch: &'a str,
}

/// A short rendering of a JSON value for error messages.
fn shown(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}...", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

impl Fields<'_> {
    fn wrong(&self, field: &'static str, expected: &'static str, got: &Value) -> CliError {
        CliError::FieldType {
            origin: self.origin.into(),
            field,
            expected,
            got: shown(got),
        }
    }

    /// The value of `field`, `None` when absent or null.
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn count(&self, field: &'static str) -> Result<usize> {
        let v = self.get(field).ok_or_else(|| CliError::MissingField {
            origin: self.origin.into(),
            arch: self.arch.into(),
            field,
        })?;
        match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n > 0 => Ok(n),
            _ => Err(self.wrong(field, "a positive integer", v)),
        }
    }

    fn count_or(&self, field: &'static str, default: usize) -> Result<usize> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| self.wrong(field, "a non-negative integer", v)),
        }
    }

    fn float(&self, field: &'static str) -> Result<Option<f32>> {
        self.get(field)
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| self.wrong(field, "a number", v))
            })
            .transpose()
    }

    fn flag_or(&self, field: &'static str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.wrong(field, "true or false", v)),
        }
    }

    fn text(&self, field: &'static str) -> Result<Option<&str>> {
        self.get(field)
            .map(|v| v.as_str().ok_or_else(|| self.wrong(field, "a string", v)))
            .transpose()
    }

    /// `architectures[0]`.
    fn architecture(&self) -> Result<String> {
        let field = "architectures";
        let v = self.get(field).ok_or_else(|| CliError::MissingField {
            origin: self.origin.into(),
            arch: "every model".into(),
            field,
        })?;
        v.as_array()
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| self.wrong(field, "a non-empty list of architecture names", v))
    }

    /// FP8 with 128x128 weight blocks when `quantization_config` says so, bf16 otherwise.
    fn shipped_scheme(&self) -> QuantScheme {
        let q = self.get("quantization_config");
        let method = q
            .and_then(|q| q.get("quant_method"))
            .and_then(Value::as_str);
        let block = q
            .and_then(|q| q.get("weight_block_size"))
            .and_then(Value::as_array);
        let is_128 =
            block.is_some_and(|b| b.len() == 2 && b.iter().all(|x| x.as_u64() == Some(128)));
        if method == Some("fp8") && is_128 {
            QuantScheme::Fp8Block128
        } else {
            QuantScheme::Bf16
        }
    }
}

/// Parses `text` (the contents of a config.json; `origin` names it in errors) into a spec.
pub fn spec_from_json(text: &str, origin: &str) -> Result<ModelSpec> {
    let value: Value = serde_json::from_str(text).map_err(|source| CliError::Json {
        origin: origin.into(),
        source,
    })?;
    let obj = value.as_object().ok_or_else(|| CliError::FieldType {
        origin: origin.into(),
        field: "(top level)",
        expected: "a JSON object",
        got: shown(&value),
    })?;
    let arch = Fields {
        obj,
        origin,
        arch: "",
    }
    .architecture()?;
    let f = Fields {
        obj,
        origin,
        arch: &arch,
    };
    match arch.as_str() {
        "DeepseekV2ForCausalLM"
        | "DeepseekV3ForCausalLM"
        | "DeepseekV32ForCausalLM"
        | "DeepseekV4ForCausalLM" => deepseek(&f),
        "Glm4MoeForCausalLM" => grouped(&f, "n_routed_experts", true, None),
        "Qwen2MoeForCausalLM" => qwen2(&f),
        "Qwen3MoeForCausalLM" => softmax(
            &f,
            "num_experts",
            "moe_intermediate_size",
            f.flag_or("norm_topk_prob", false)?,
        ),
        "MixtralForCausalLM" => softmax(&f, "num_local_experts", "intermediate_size", true),
        _ => Err(CliError::UnknownArchitecture {
            origin: origin.into(),
            name: arch.clone(),
            known: ARCHITECTURES.join(", "),
        }),
    }
}

/// DeepSeek V2 to V4. V2 scores with softmax by default; its group limit is not modelled by
/// the softmax router, so V2 routes over all experts. V3 and later score with sigmoid and a
/// correction bias over groups.
fn deepseek(f: &Fields) -> Result<ModelSpec> {
    let is_v2 = f.arch == "DeepseekV2ForCausalLM";
    let limit = if f.arch == "DeepseekV4ForCausalLM" {
        Some(f.float("swiglu_limit")?.unwrap_or(V4_SWIGLU_LIMIT))
    } else {
        None
    };
    let scoring = f
        .text("scoring_func")?
        .unwrap_or(if is_v2 { "softmax" } else { "sigmoid" });
    let mut spec = grouped(f, "n_routed_experts", !is_v2, limit)?;
    if scoring == "softmax" {
        spec.routing = Routing::Softmax {
            renormalize: f.flag_or("norm_topk_prob", !is_v2)?,
        };
    } else if scoring != "sigmoid" {
        tracing::warn!(
            "{}: scoring_func `{scoring}` is routed with sigmoid scores",
            f.origin
        );
    }
    Ok(spec)
}

/// Grouped sigmoid routing with fusable shared experts of the routed size (GLM-4-MoE and,
/// through [`deepseek`], DeepSeek).
fn grouped(
    f: &Fields,
    experts: &'static str,
    norm_default: bool,
    swiglu_limit: Option<f32>,
) -> Result<ModelSpec> {
    let moe_intermediate = f.count("moe_intermediate_size")?;
    let shared_experts = f.count_or("n_shared_experts", 0)?;
    Ok(ModelSpec {
        name: f.origin.into(),
        arch: f.arch.into(),
        routed_experts: f.count(experts)?,
        shared_experts,
        top_k: f.count("num_experts_per_tok")?,
        hidden: f.count("hidden_size")?,
        moe_intermediate,
        shared_intermediate: shared_experts * moe_intermediate,
        fusable_shared: true,
        routing: Routing::Grouped {
            n_group: f.count_or("n_group", 1)?.max(1),
            topk_group: f.count_or("topk_group", 1)?.max(1),
            renormalize: f.flag_or("norm_topk_prob", norm_default)?,
        },
        routed_scaling_factor: f.float("routed_scaling_factor")?,
        swiglu_limit,
        default_scheme: f.shipped_scheme(),
    })
}

/// Softmax-routed models without shared experts (Qwen3-MoE, Mixtral).
fn softmax(
    f: &Fields,
    experts: &'static str,
    inter: &'static str,
    renormalize: bool,
) -> Result<ModelSpec> {
    Ok(ModelSpec {
        name: f.origin.into(),
        arch: f.arch.into(),
        routed_experts: f.count(experts)?,
        shared_experts: 0,
        top_k: f.count("num_experts_per_tok")?,
        hidden: f.count("hidden_size")?,
        moe_intermediate: f.count(inter)?,
        shared_intermediate: 0,
        fusable_shared: false,
        routing: Routing::Softmax { renormalize },
        routed_scaling_factor: None,
        swiglu_limit: None,
        default_scheme: f.shipped_scheme(),
    })
}

/// Qwen2-MoE: one shared expert of its own intermediate size, run beside the routed experts
/// (its per-token sigmoid gate is not modelled: the shared output is added with weight 1).
fn qwen2(f: &Fields) -> Result<ModelSpec> {
    let mut spec = softmax(
        f,
        "num_experts",
        "moe_intermediate_size",
        f.flag_or("norm_topk_prob", false)?,
    )?;
    spec.shared_intermediate = f.count_or("shared_expert_intermediate_size", 0)?;
    spec.shared_experts = usize::from(spec.shared_intermediate > 0);
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelSpec> {
        spec_from_json(text, "config.json")
    }

    const V3: &str = r#"{
        "architectures": ["DeepseekV3ForCausalLM"],
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "hidden_size": 7168, "moe_intermediate_size": 2048, "n_group": 8, "topk_group": 4,
        "routed_scaling_factor": 2.5, "norm_topk_prob": true,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}
    }"#;

    #[test]
    fn deepseek_v3() {
        let s = parse(V3).unwrap();
        assert_eq!(
            (
                s.routed_experts,
                s.shared_experts,
                s.top_k,
                s.hidden,
                s.moe_intermediate
            ),
            (256, 1, 8, 7168, 2048)
        );
        assert_eq!(s.shared_intermediate, 2048);
        assert!(s.fusable_shared);
        assert_eq!(
            s.routing,
            Routing::Grouped {
                n_group: 8,
                topk_group: 4,
                renormalize: true
            }
        );
        assert_eq!(s.routed_scaling_factor, Some(2.5));
        assert_eq!(s.swiglu_limit, None);
        assert_eq!(s.default_scheme, QuantScheme::Fp8Block128);
    }

    #[test]
    fn deepseek_v4_clamp_defaults_to_ten_and_follows_the_config() {
        let v4 = V3.replace("DeepseekV3ForCausalLM", "DeepseekV4ForCausalLM");
        assert_eq!(parse(&v4).unwrap().swiglu_limit, Some(10.0));
        let v4 = v4.replace("\"n_group\": 8", "\"swiglu_limit\": 7.0, \"n_group\": 8");
        assert_eq!(parse(&v4).unwrap().swiglu_limit, Some(7.0));
    }

    #[test]
    fn deepseek_v2_scores_with_softmax_and_keeps_two_shared_experts() {
        let v2 = r#"{"architectures": ["DeepseekV2ForCausalLM"], "n_routed_experts": 64,
            "n_shared_experts": 2, "num_experts_per_tok": 6, "hidden_size": 2048,
            "moe_intermediate_size": 1408, "n_group": null, "topk_group": null}"#;
        let s = parse(v2).unwrap();
        assert_eq!(s.routing, Routing::Softmax { renormalize: false });
        assert_eq!((s.shared_experts, s.shared_intermediate), (2, 2816));
        assert_eq!(s.default_scheme, QuantScheme::Bf16);
    }

    #[test]
    fn glm4_moe() {
        let glm = r#"{"architectures": ["Glm4MoeForCausalLM"], "n_routed_experts": 160,
            "n_shared_experts": 1, "num_experts_per_tok": 8, "hidden_size": 5120,
            "moe_intermediate_size": 1536, "n_group": 1, "topk_group": 1,
            "routed_scaling_factor": 2.5, "norm_topk_prob": true}"#;
        let s = parse(glm).unwrap();
        assert_eq!(
            (s.routed_experts, s.top_k, s.hidden, s.moe_intermediate),
            (160, 8, 5120, 1536)
        );
        assert_eq!(
            s.routing,
            Routing::Grouped {
                n_group: 1,
                topk_group: 1,
                renormalize: true
            }
        );
        assert!(s.fusable_shared);
    }

    #[test]
    fn qwen2_moe_has_one_separate_shared_expert() {
        let q = r#"{"architectures": ["Qwen2MoeForCausalLM"], "num_experts": 60,
            "num_experts_per_tok": 4, "hidden_size": 2048, "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632, "norm_topk_prob": false}"#;
        let s = parse(q).unwrap();
        assert_eq!(
            (s.routed_experts, s.shared_experts, s.shared_intermediate),
            (60, 1, 5632)
        );
        assert!(!s.fusable_shared);
        assert_eq!(s.routing, Routing::Softmax { renormalize: false });
    }

    #[test]
    fn qwen3_moe_and_mixtral() {
        let q = r#"{"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128,
            "num_experts_per_tok": 8, "hidden_size": 2048, "moe_intermediate_size": 768,
            "norm_topk_prob": true, "intermediate_size": 6144}"#;
        let s = parse(q).unwrap();
        assert_eq!(
            (
                s.routed_experts,
                s.top_k,
                s.moe_intermediate,
                s.shared_experts
            ),
            (128, 8, 768, 0)
        );
        assert_eq!(s.routing, Routing::Softmax { renormalize: true });
        let m = r#"{"architectures": ["MixtralForCausalLM"], "num_local_experts": 8,
            "num_experts_per_tok": 2, "hidden_size": 4096, "intermediate_size": 14336}"#;
        let s = parse(m).unwrap();
        assert_eq!(
            (s.routed_experts, s.top_k, s.hidden, s.moe_intermediate),
            (8, 2, 4096, 14336)
        );
    }

    #[test]
    fn not_json_is_a_json_error() {
        let err = parse("{\"architectures\": [").unwrap_err();
        assert!(matches!(err, CliError::Json { .. }), "{err}");
        assert!(
            err.to_string().contains("config.json is not valid JSON"),
            "{err}"
        );
    }

    #[test]
    fn a_top_level_array_is_rejected() {
        let err = parse("[1, 2]").unwrap_err().to_string();
        assert!(
            err.contains("a JSON object") && err.contains("[1,2]"),
            "{err}"
        );
    }

    #[test]
    fn missing_field_is_named() {
        let err = parse(&V3.replace("\"hidden_size\": 7168,", "")).unwrap_err();
        assert!(
            matches!(
                err,
                CliError::MissingField {
                    field: "hidden_size",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("DeepseekV3ForCausalLM"), "{err}");
        let err = parse("{}").unwrap_err();
        assert!(
            matches!(
                err,
                CliError::MissingField {
                    field: "architectures",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn wrong_types_say_what_was_expected() {
        let err = parse(&V3.replace("\"hidden_size\": 7168", "\"hidden_size\": \"big\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hidden_size")
                && err.contains("positive integer")
                && err.contains("\"big\""),
            "{err}"
        );
        let err = parse(&V3.replace("\"num_experts_per_tok\": 8", "\"num_experts_per_tok\": 0"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_experts_per_tok"), "{err}");
        let err = parse(&V3.replace("\"norm_topk_prob\": true", "\"norm_topk_prob\": 1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("true or false"), "{err}");
        let err = parse(r#"{"architectures": []}"#).unwrap_err().to_string();
        assert!(err.contains("non-empty list"), "{err}");
    }

    #[test]
    fn unknown_architecture_lists_the_known_ones() {
        let err = parse(r#"{"architectures": ["LlamaForCausalLM"]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("LlamaForCausalLM")
                && err.contains("Qwen3MoeForCausalLM")
                && err.contains("Glm4MoeForCausalLM"),
            "{err}"
        );
    }
}
