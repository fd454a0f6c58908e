//! Routing: from router logits `[M, E]` to top-k expert ids and weights.
//!
//! Softmax routing (Qwen, Mixtral): probabilities = softmax(logits), keep the k largest,
//! optionally renormalize them to sum to one.
//!
//! DeepSeek-V3 biased grouped routing: scores = sigmoid(logits); the choice score adds
//! `e_score_correction_bias`; each of `n_group` groups is scored by the sum of its two best
//! choice scores; the `topk_group` best groups are kept; top-k is taken on the choice score
//! within them; the weights come from the unbiased scores, renormalized when asked, and
//! multiplied by `routed_scaling_factor` only when the router is told to own it (a `MoeLayer`
//! leaves it to the runner's final sum, its one owner).

use moe_runner_core::{DType, MoeError, Result, Tensor, TopK};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum RoutingMethod {
    Softmax {
        renormalize: bool,
    },
    DeepSeekGrouped {
        n_group: usize,
        topk_group: usize,
        renormalize: bool,
        /// `[E]`, added to the sigmoid scores for the choice only.
        #[serde(default)]
        correction_bias: Option<Vec<f32>>,
        /// Applied to the weights here only when set; leave `None` when the runner applies it.
        #[serde(default)]
        routed_scaling_factor: Option<f32>,
    },
}

/// A router: a method, the routed expert count and k, plus the shared experts fused as extra
/// experts (ids `num_experts..num_experts + fused_shared`, picked for every token).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Router {
    pub method: RoutingMethod,
    /// Routed experts (columns of the logits).
    pub num_experts: usize,
    /// Routed experts picked per token (not counting fused shared experts).
    pub top_k: usize,
    /// Shared experts fused into the routed computation as always-picked experts.
    #[serde(default)]
    pub fused_shared_experts: usize,
    /// Weight of each fused shared expert, chosen so that after the runner's
    /// `routed_scaling_factor` it contributes exactly once (1 / routed_scaling_factor).
    #[serde(default = "one")]
    pub fused_shared_weight: f32,
}

fn one() -> f32 {
    1.0
}

impl Router {
    /// Experts per token in the output: routed top-k plus fused shared experts.
    pub fn output_k(&self) -> usize {
        self.top_k + self.fused_shared_experts
    }

    /// Whether the router itself multiplies the weights by a routed scaling factor.
    pub fn scales_weights(&self) -> bool {
        matches!(self.method, RoutingMethod::DeepSeekGrouped { routed_scaling_factor: Some(_), .. })
    }

    pub fn validate(&self) -> Result<()> {
        let cfg = |m: String| Err(MoeError::Config(m));
        if self.top_k == 0 || self.top_k > self.num_experts {
            return cfg(format!("router top_k {} must be in 1..={}", self.top_k, self.num_experts));
        }
        if let RoutingMethod::DeepSeekGrouped { n_group, topk_group, correction_bias, routed_scaling_factor, .. } = &self.method {
            if *n_group == 0 || self.num_experts % n_group != 0 {
                return cfg(format!("n_group {n_group} must divide the {} experts", self.num_experts));
            }
            if *topk_group == 0 || topk_group > n_group {
                return cfg(format!("topk_group {topk_group} must be in 1..={n_group}"));
            }
            let per_group = self.num_experts / n_group;
            if per_group < 2 {
                return cfg(format!("groups need at least 2 experts to score by their top 2, got {per_group}"));
            }
            if self.top_k > topk_group * per_group {
                return cfg(format!("top_k {} exceeds the {} experts of {topk_group} kept groups", self.top_k, topk_group * per_group));
            }
            if let Some(b) = correction_bias {
                if b.len() != self.num_experts {
                    return cfg(format!("e_score_correction_bias has {} entries, expected {}", b.len(), self.num_experts));
                }
            }
            if let Some(s) = routed_scaling_factor {
                if !(s.is_finite() && *s > 0.0) {
                    return cfg(format!("routed_scaling_factor must be finite and positive, got {s}"));
                }
            }
        }
        if !(self.fused_shared_weight.is_finite()) {
            return cfg("fused_shared_weight must be finite".into());
        }
        Ok(())
    }

    /// Routes `logits [M, E]` (f32, bf16 or f16) to top-k.
    pub fn route(&self, logits: &Tensor) -> Result<TopK> {
        self.validate()?;
        let [m, e] = logits.dims::<2>("router logits")?;
        if e != self.num_experts {
            return Err(MoeError::Shape { what: "router logits".into(), expected: vec![m, self.num_experts], got: vec![m, e] });
        }
        let x = logits.to_f32_vec()?;
        let k_out = self.output_k();
        let mut ids = vec![-1i32; m * k_out];
        let mut weights = vec![0f32; m * k_out];
        ids.par_chunks_mut(k_out)
            .zip(weights.par_chunks_mut(k_out))
            .zip(x.par_chunks(e.max(1)))
            .for_each(|((id, w), row)| {
                match &self.method {
                    RoutingMethod::Softmax { renormalize } => softmax_topk_row(row, self.top_k, *renormalize, id, w),
                    RoutingMethod::DeepSeekGrouped { n_group, topk_group, renormalize, correction_bias, routed_scaling_factor } => {
                        grouped_topk_row(row, correction_bias.as_deref(), self.top_k, *n_group, *topk_group, *renormalize, *routed_scaling_factor, id, w)
                    }
                }
                for s in 0..self.fused_shared_experts {
                    id[self.top_k + s] = (self.num_experts + s) as i32;
                    w[self.top_k + s] = self.fused_shared_weight;
                }
            });
        TopK::new(Tensor::from_slice(&ids, &[m, k_out], DType::I32)?, Tensor::from_slice(&weights, &[m, k_out], DType::F32)?)
    }
}

/// Indices of the `k` largest values, largest first; ties keep the lower index first. NaN
/// scores sort last so they are never preferred over a number.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let key = |i: usize| if values[i].is_nan() { f32::NEG_INFINITY } else { values[i] };
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn softmax_topk_row(logits: &[f32], k: usize, renormalize: bool, ids: &mut [i32], weights: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let top = top_indices(&exp, k);
    let picked: f32 = top.iter().map(|&i| exp[i]).sum();
    for (s, &i) in top.iter().enumerate() {
        ids[s] = i as i32;
        weights[s] = if renormalize { exp[i] / picked } else { exp[i] / sum };
    }
}

#[allow(clippy::too_many_arguments)]
fn grouped_topk_row(
    logits: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    n_group: usize,
    topk_group: usize,
    renormalize: bool,
    scale: Option<f32>,
    ids: &mut [i32],
    weights: &mut [f32],
) {
    let scores: Vec<f32> = logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
    let choice: Vec<f32> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };
    let per_group = scores.len() / n_group;
    let group_scores: Vec<f32> = choice
        .chunks(per_group)
        .map(|g| top_indices(g, 2).iter().map(|&i| g[i]).sum())
        .collect();
    let kept = top_indices(&group_scores, topk_group);
    let masked: Vec<f32> = choice
        .iter()
        .enumerate()
        .map(|(i, &c)| if kept.contains(&(i / per_group)) { c } else { f32::NEG_INFINITY })
        .collect();
    let top = top_indices(&masked, k);
    let picked: f32 = top.iter().map(|&i| scores[i]).sum();
    for (s, &i) in top.iter().enumerate() {
        let w = if renormalize { scores[i] / picked } else { scores[i] };
        ids[s] = i as i32;
        weights[s] = w * scale.unwrap_or(1.0);
    }
}
