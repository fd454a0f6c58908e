//! Expert-parallel references: the layer output of every rank's tokens when R ranks each hold
//! E/R experts, computed with the reference runner in the standard format on every rank's
//! weights (each rank's partial sum over the experts it holds) and summed.

use moe_dispatch::{make_dispatcher, DispatcherConfig};
use moe_runner_core::{
    DispatchFormat, MoeRunner, MoeRunnerConfig, QuantInfo, QuantScheme, Result, Tensor, TopK,
};

/// Per source rank, its `[M_r, H]` output as f32. `cfg` is the per-rank runner config (global
/// `num_experts`, `num_local_experts` = E / R); `weights[r]` holds rank r's experts.
pub fn layer_outputs(
    cfg: &MoeRunnerConfig,
    scheme: QuantScheme,
    weights: &[&dyn QuantInfo],
    inputs: &[(Tensor, TopK)],
) -> Result<Vec<Vec<f32>>> {
    let ranks = weights.len();
    let reference = MoeRunner::new(
        moe_backend_reference::RUNNER,
        DispatchFormat::Standard,
        scheme,
        cfg.clone(),
    )?;
    inputs
        .iter()
        .map(|(hidden, topk)| {
            let m = topk.num_tokens();
            let mut sum = vec![0f32; m * cfg.hidden_size];
            for (rank, w) in weights.iter().enumerate() {
                let dcfg = DispatcherConfig {
                    rank,
                    world_size: ranks,
                    num_local_experts: cfg.num_local_experts,
                    ..DispatcherConfig::single(cfg.num_experts, cfg.hidden_size, m.max(1))
                };
                let d = make_dispatcher("standard", &dcfg)?;
                let topk = TopK::new(topk.ids.to_host()?, topk.weights.to_host()?)?;
                let dispatched = d.dispatch(&hidden.to_host()?, topk)?;
                let out = reference.run(dispatched.as_ref(), *w)?;
                let part = d.combine(out, dispatched.as_ref())?.to_f32_vec()?;
                sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
            }
            Ok(sum)
        })
        .collect()
}
