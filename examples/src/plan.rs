//! From a model spec and the parallelism options to what one rank builds: the runner config,
//! the router, the weight sizes and the shared experts. Tensor parallelism splits every
//! intermediate size; expert parallelism gives rank 0 the first `E / ep` routed experts.

use crate::error::{CliError, Result};
use crate::model::{ModelSpec, Routing};
use moe_conformance::synthetic;
use moe_dispatch::{Router, RoutingMethod};
use moe_runner_core::{
    MoeError, MoeRunnerConfig, QuantScheme, WeightDims, FP8_BLOCK, MXFP4_BLOCK, NVFP4_BLOCK,
};

/// How the layer is split and whether shared experts run fused.
#[derive(Clone, Copy, Debug)]
pub struct Parallelism {
    pub tp: usize,
    pub ep: usize,
    /// Fuse fusable shared experts into the routed computation (`--no-shared-fusion` clears it).
    pub fuse_shared: bool,
}

/// How the model's shared experts run on this rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedPlan {
    None,
    /// As always-picked extra experts after the routed ones.
    Fused {
        experts: usize,
    },
    /// As one separate MLP of this intermediate size (per TP rank).
    Separate {
        intermediate: usize,
    },
}

/// What rank 0 of the layer holds and runs.
#[derive(Clone, Debug)]
pub struct LayerPlan {
    pub config: MoeRunnerConfig,
    pub router: Router,
    pub shared: SharedPlan,
    /// Why fusion was asked for but not applied, to tell the user.
    pub fusion_note: Option<String>,
}

/// Magnitude of the random `e_score_correction_bias`: enough to change some choices without
/// swamping the sigmoid scores it is added to.
const CORRECTION_BIAS: f32 = 0.05;

fn divide(option: &'static str, value: usize, what: &'static str, size: usize) -> Result<usize> {
    if size.is_multiple_of(value) {
        Ok(size / value)
    } else {
        Err(CliError::NotDivisible {
            option,
            value,
            what,
            size,
        })
    }
}

impl LayerPlan {
    /// Splits `spec` as `par` asks. `seed` draws the router's correction bias.
    pub fn new(spec: &ModelSpec, par: Parallelism, seed: u64) -> Result<Self> {
        let inter = divide(
            "--tp",
            par.tp,
            "moe intermediate size",
            spec.moe_intermediate,
        )?;
        let local_routed = divide(
            "--ep",
            par.ep,
            "number of routed experts",
            spec.routed_experts,
        )?;
        let wants_fusion = par.fuse_shared && spec.fusable_shared && spec.shared_experts > 0;
        // Fused shared experts get ids after the routed ones; split over EP ranks they would
        // sit on one rank only, so under EP they run as a separate MLP on every rank instead.
        let fused = wants_fusion && par.ep == 1;
        let fusion_note = (wants_fusion && !fused).then(|| {
            format!(
                "shared experts run unfused: fusion needs --ep 1, got --ep {}",
                par.ep
            )
        });
        let shared = if spec.shared_experts == 0 || spec.shared_intermediate == 0 {
            SharedPlan::None
        } else if fused {
            SharedPlan::Fused {
                experts: spec.shared_experts,
            }
        } else {
            SharedPlan::Separate {
                intermediate: divide(
                    "--tp",
                    par.tp,
                    "shared intermediate size",
                    spec.shared_intermediate,
                )?,
            }
        };
        let fused_experts = match shared {
            SharedPlan::Fused { experts } => experts,
            _ => 0,
        };

        let total = spec.routed_experts + fused_experts;
        let mut config =
            MoeRunnerConfig::new(total, spec.hidden, inter, spec.top_k + fused_experts);
        config.num_local_experts = if par.ep == 1 { total } else { local_routed };
        config.swiglu_limit = spec.swiglu_limit;
        config.routed_scaling_factor = spec.routed_scaling_factor;
        config.validate()?;

        let method = match spec.routing {
            Routing::Softmax { renormalize } => RoutingMethod::Softmax { renormalize },
            Routing::Grouped {
                n_group,
                topk_group,
                renormalize,
            } => RoutingMethod::DeepSeekGrouped {
                n_group,
                topk_group,
                renormalize,
                correction_bias: Some(synthetic::uniform(
                    spec.routed_experts,
                    CORRECTION_BIAS,
                    seed ^ 0xB1A5,
                )),
                // The runner config owns the scale (it applies once, in the final sum).
                routed_scaling_factor: None,
            },
        };
        let router = Router {
            method,
            num_experts: spec.routed_experts,
            top_k: spec.top_k,
            fused_shared_experts: fused_experts,
            // After the runner multiplies the sum by the scale, a fused shared expert counts once.
            fused_shared_weight: 1.0 / spec.routed_scaling_factor.unwrap_or(1.0),
        };
        router.validate()?;
        Ok(Self {
            config,
            router,
            shared,
            fusion_note,
        })
    }

    /// Sizes of this rank's routed (and fused shared) expert weights.
    pub fn weight_dims(&self) -> WeightDims {
        WeightDims::of(&self.config)
    }

    /// Host bytes of every weight this rank generates: the expert weights in `scheme` and the
    /// separate shared experts in f32.
    pub fn host_bytes(&self, scheme: QuantScheme) -> usize {
        let shared = match self.shared {
            SharedPlan::Separate { intermediate } => {
                3 * intermediate * self.config.hidden_size * size_of::<f32>()
            }
            _ => 0,
        };
        synthetic::weight_bytes(self.weight_dims(), scheme) + shared
    }

    /// Checks that the scheme's activation groups divide both GEMMs' inner widths, before
    /// gigabytes of weights are generated for a layer the runner would then refuse.
    pub fn check_scheme(&self, scheme: QuantScheme) -> Result<()> {
        let group = match scheme {
            QuantScheme::Fp8Block128 => FP8_BLOCK.1,
            QuantScheme::Nvfp4 => NVFP4_BLOCK,
            QuantScheme::Mxfp4 | QuantScheme::Mxfp4A4 | QuantScheme::Mxfp4A8 => MXFP4_BLOCK,
            _ => return Ok(()),
        };
        for (what, v) in [
            ("hidden_size", self.config.hidden_size),
            (
                "intermediate_size (after --tp)",
                self.config.intermediate_size,
            ),
        ] {
            if !v.is_multiple_of(group) {
                return Err(MoeError::NotDivisible {
                    what: format!("{what} for {scheme}"),
                    value: v,
                    divisor: group,
                }
                .into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn par(tp: usize, ep: usize, fuse_shared: bool) -> Parallelism {
        Parallelism {
            tp,
            ep,
            fuse_shared,
        }
    }

    #[test]
    fn deepseek_fuses_its_shared_expert() {
        let spec = ModelSpec::preset("deepseek-v3").unwrap();
        let plan = LayerPlan::new(&spec, par(1, 1, true), 0).unwrap();
        assert_eq!(plan.shared, SharedPlan::Fused { experts: 1 });
        assert_eq!(
            (
                plan.config.num_experts,
                plan.config.num_local_experts,
                plan.config.top_k
            ),
            (257, 257, 9)
        );
        assert_eq!(plan.router.output_k(), 9);
        assert!((plan.router.fused_shared_weight - 0.4).abs() < 1e-6);
        assert_eq!(plan.config.routed_scaling_factor, Some(2.5));
        assert!(!plan.router.scales_weights());
    }

    #[test]
    fn without_fusion_the_shared_expert_is_a_separate_mlp() {
        let spec = ModelSpec::preset("deepseek-v3").unwrap();
        let plan = LayerPlan::new(&spec, par(2, 1, false), 0).unwrap();
        assert_eq!(plan.shared, SharedPlan::Separate { intermediate: 1024 });
        assert_eq!(
            (
                plan.config.num_experts,
                plan.config.top_k,
                plan.config.intermediate_size
            ),
            (256, 8, 1024)
        );
        assert!(plan.fusion_note.is_none());
    }

    #[test]
    fn expert_parallelism_holds_a_share_and_unfuses() {
        let spec = ModelSpec::preset("deepseek-v3").unwrap();
        let plan = LayerPlan::new(&spec, par(1, 8, true), 0).unwrap();
        assert_eq!(
            (plan.config.num_experts, plan.config.num_local_experts),
            (256, 32)
        );
        assert_eq!(plan.weight_dims().experts, 32);
        assert!(matches!(plan.shared, SharedPlan::Separate { .. }));
        assert!(plan.fusion_note.is_some());
    }

    #[test]
    fn tp_and_ep_must_divide() {
        let spec = ModelSpec::preset("tiny").unwrap();
        let err = LayerPlan::new(&spec, par(3, 1, true), 0)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--tp 3 does not divide the moe intermediate size 128");
        let err = LayerPlan::new(&spec, par(1, 3, true), 0)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--ep 3 does not divide the number of routed experts 8");
    }

    #[test]
    fn scheme_groups_must_divide_the_widths() {
        let spec = ModelSpec::preset("tiny").unwrap();
        let plan = LayerPlan::new(&spec, par(2, 1, true), 0).unwrap();
        assert!(plan.check_scheme(QuantScheme::Bf16).is_ok());
        let err = plan
            .check_scheme(QuantScheme::Fp8Block128)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("intermediate_size") && err.contains("64") && err.contains("128"),
            "{err}"
        );
    }

    /// A layer of `plan` on the reference runner in f32, with the given weights.
    fn reference_layer(
        plan: &LayerPlan,
        weights: Box<dyn moe_runner_core::QuantInfo>,
        shared: Option<Box<dyn moe_runner_core::SharedExperts>>,
    ) -> moe_dispatch::MoeLayer {
        use moe_runner_core::{DispatchFormat, MoeRunner};
        let cfg = plan.config.clone();
        let runner = MoeRunner::new(
            moe_backend_reference::RUNNER,
            DispatchFormat::Standard,
            QuantScheme::F32,
            cfg.clone(),
        )
        .unwrap();
        let dcfg = moe_dispatch::DispatcherConfig::single(cfg.num_experts, cfg.hidden_size, 32);
        let dispatcher = moe_dispatch::make_dispatcher("standard", &dcfg).unwrap();
        moe_dispatch::MoeLayer::new(plan.router.clone(), dispatcher, runner, weights, shared)
            .unwrap()
    }

    /// A fused shared expert (weight 1/scale, then the runner's scale) must add exactly what
    /// the same expert adds as a separate MLP.
    #[test]
    fn fused_and_separate_shared_experts_agree() {
        use moe_runner_core::{as_expert_weights, DType, Proj};
        let spec = crate::hf_config::spec_from_json(
            r#"{"architectures": ["DeepseekV3ForCausalLM"], "n_routed_experts": 16, "n_shared_experts": 1,
                "num_experts_per_tok": 4, "hidden_size": 64, "moe_intermediate_size": 32, "n_group": 4,
                "topk_group": 2, "routed_scaling_factor": 2.5}"#,
            "test",
        )
        .unwrap();
        let fused = LayerPlan::new(&spec, par(1, 1, true), 7).unwrap();
        let separate = LayerPlan::new(&spec, par(1, 1, false), 7).unwrap();
        let no_progress = |_| {};
        // Expert weights are seeded per expert, so the first 16 of the fused set are the routed set.
        let fused_w =
            synthetic::weights(fused.weight_dims(), QuantScheme::F32, 3, &no_progress).unwrap();
        let routed_w =
            synthetic::weights(separate.weight_dims(), QuantScheme::F32, 3, &no_progress).unwrap();
        let dims = fused.weight_dims();
        let (mut w13, mut w2) = (
            vec![0f32; dims.n1 * dims.hidden],
            vec![0f32; dims.hidden * dims.inter],
        );
        let experts = as_expert_weights(fused_w.as_ref()).unwrap();
        experts.dequantize_expert(Proj::W13, 16, &mut w13).unwrap();
        experts.dequantize_expert(Proj::W2, 16, &mut w2).unwrap();
        let shared =
            moe_backend_reference::CpuSharedExperts::new(w13, w2, dims.inter, &separate.config)
                .unwrap();

        let hidden = synthetic::hidden(20, 64, DType::F32, 1).unwrap();
        let logits = synthetic::logits(20, 16, 2).unwrap();
        let a = reference_layer(&fused, fused_w, None)
            .forward(&hidden, &logits)
            .unwrap();
        let b = reference_layer(&separate, routed_w, Some(Box::new(shared)))
            .forward(&hidden, &logits)
            .unwrap();
        let c = moe_conformance::suite::compare(&a.to_f32_vec().unwrap(), &b.to_f32_vec().unwrap())
            .unwrap();
        assert!(c.rel_l2 < 1e-5, "{c:?}");
    }

    #[test]
    fn host_bytes_of_qwen3_in_bf16() {
        let spec = ModelSpec::preset("qwen3-30b-a3b").unwrap();
        let plan = LayerPlan::new(&spec, par(1, 1, true), 0).unwrap();
        assert_eq!(plan.host_bytes(QuantScheme::Bf16), 128 * 3 * 768 * 2048 * 2);
    }
}
