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
        matches!(
            self.method,
            RoutingMethod::DeepSeekGrouped {
                routed_scaling_factor: Some(_),
                ..
            }
        )
    }

    pub fn validate(&self) -> Result<()> {
        let cfg = |m: String| Err(MoeError::Config(m));
        if self.top_k == 0 || self.top_k > self.num_experts {
            return cfg(format!(
                "router top_k {} must be in 1..={}",
                self.top_k, self.num_experts
            ));
        }
        if let RoutingMethod::DeepSeekGrouped {
            n_group,
            topk_group,
            correction_bias,
            routed_scaling_factor,
            ..
        } = &self.method
        {
            if *n_group == 0 || !self.num_experts.is_multiple_of(*n_group) {
                return cfg(format!(
                    "n_group {n_group} must divide the {} experts",
                    self.num_experts
                ));
            }
            if *topk_group == 0 || topk_group > n_group {
                return cfg(format!("topk_group {topk_group} must be in 1..={n_group}"));
            }
            let per_group = self.num_experts / n_group;
            if per_group < 2 {
                return cfg(format!(
                    "groups need at least 2 experts to score by their top 2, got {per_group}"
                ));
            }
            if self.top_k > topk_group * per_group {
                return cfg(format!(
                    "top_k {} exceeds the {} experts of {topk_group} kept groups",
                    self.top_k,
                    topk_group * per_group
                ));
            }
            if let Some(b) = correction_bias {
                if b.len() != self.num_experts {
                    return cfg(format!(
                        "e_score_correction_bias has {} entries, expected {}",
                        b.len(),
                        self.num_experts
                    ));
                }
            }
            if let Some(s) = routed_scaling_factor {
                if !(s.is_finite() && *s > 0.0) {
                    return cfg(format!(
                        "routed_scaling_factor must be finite and positive, got {s}"
                    ));
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
            return Err(MoeError::Shape {
                what: "router logits".into(),
                expected: vec![m, self.num_experts],
                got: vec![m, e],
            });
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
                    RoutingMethod::Softmax { renormalize } => {
                        softmax_topk_row(row, self.top_k, *renormalize, id, w)
                    }
                    RoutingMethod::DeepSeekGrouped {
                        n_group,
                        topk_group,
                        renormalize,
                        correction_bias,
                        routed_scaling_factor,
                    } => grouped_topk_row(
                        row,
                        correction_bias.as_deref(),
                        self.top_k,
                        *n_group,
                        *topk_group,
                        *renormalize,
                        *routed_scaling_factor,
                        id,
                        w,
                    ),
                }
                for s in 0..self.fused_shared_experts {
                    id[self.top_k + s] = (self.num_experts + s) as i32;
                    w[self.top_k + s] = self.fused_shared_weight;
                }
            });
        TopK::new(
            Tensor::from_slice(&ids, &[m, k_out], DType::I32)?,
            Tensor::from_slice(&weights, &[m, k_out], DType::F32)?,
        )
    }
}

/// Indices of the `k` largest values, largest first; ties keep the lower index first. NaN
/// scores sort last so they are never preferred over a number.
fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let key = |i: usize| {
        if values[i].is_nan() {
            f32::NEG_INFINITY
        } else {
            values[i]
        }
    };
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn softmax_topk_row(
    logits: &[f32],
    k: usize,
    renormalize: bool,
    ids: &mut [i32],
    weights: &mut [f32],
) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let top = top_indices(&exp, k);
    let picked: f32 = top.iter().map(|&i| exp[i]).sum();
    for (s, &i) in top.iter().enumerate() {
        ids[s] = i as i32;
        weights[s] = if renormalize {
            exp[i] / picked
        } else {
            exp[i] / sum
        };
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
        .map(|(i, &c)| {
            if kept.contains(&(i / per_group)) {
                c
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let top = top_indices(&masked, k);
    let picked: f32 = top.iter().map(|&i| scores[i]).sum();
    for (s, &i) in top.iter().enumerate() {
        let w = if renormalize {
            scores[i] / picked
        } else {
            scores[i]
        };
        ids[s] = i as i32;
        weights[s] = w * scale.unwrap_or(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + (-x).exp())
    }

    fn route(router: &Router, logits: &[f32], m: usize) -> (Vec<i32>, Vec<f32>) {
        let t = Tensor::from_f32(logits, &[m, router.num_experts], DType::F32).unwrap();
        let topk = router.route(&t).unwrap();
        (
            topk.ids.as_slice::<i32>().unwrap().to_vec(),
            topk.weights.as_slice::<f32>().unwrap().to_vec(),
        )
    }

    #[test]
    fn grouped_topk_hand_example() {
        // 8 experts in 4 groups of 2. The bias makes expert 6 the best choice although its
        // unbiased score is low; the weights still come from the unbiased scores.
        let logits = [2.0, 1.5, -1.0, -2.0, 0.5, 0.4, -3.0, -3.0];
        let mut bias = vec![0.0; 8];
        bias[6] = 2.0;
        let router = Router {
            method: RoutingMethod::DeepSeekGrouped {
                n_group: 4,
                topk_group: 2,
                renormalize: true,
                correction_bias: Some(bias),
                routed_scaling_factor: None,
            },
            num_experts: 8,
            top_k: 2,
            fused_shared_experts: 0,
            fused_shared_weight: 1.0,
        };
        // Group scores (sum of both biased scores): g0 = s(2)+s(1.5), g3 = s(-3)+2+s(-3) wins.
        let (ids, w) = route(&router, &logits, 1);
        assert_eq!(ids, vec![6, 0]);
        let (s6, s0) = (sigmoid(-3.0), sigmoid(2.0));
        assert!((w[0] - s6 / (s6 + s0)).abs() < 1e-6 && (w[1] - s0 / (s6 + s0)).abs() < 1e-6);
    }

    #[test]
    fn fused_shared_experts_are_appended() {
        let router = Router {
            method: RoutingMethod::Softmax { renormalize: true },
            num_experts: 4,
            top_k: 2,
            fused_shared_experts: 1,
            fused_shared_weight: 0.4,
        };
        let (ids, w) = route(&router, &[0.1, 3.0, 2.0, -1.0], 1);
        assert_eq!(ids, vec![1, 2, 4]);
        assert_eq!(w[2], 0.4);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn invalid_router_configs_are_errors() {
        let bad = Router {
            method: RoutingMethod::DeepSeekGrouped {
                n_group: 3,
                topk_group: 1,
                renormalize: true,
                correction_bias: None,
                routed_scaling_factor: None,
            },
            num_experts: 8,
            top_k: 2,
            fused_shared_experts: 0,
            fused_shared_weight: 1.0,
        };
        assert!(matches!(bad.validate(), Err(MoeError::Config(_))));
        let t = Tensor::from_f32(&[0.0; 6], &[1, 6], DType::F32).unwrap();
        let ok = Router {
            method: RoutingMethod::Softmax { renormalize: true },
            num_experts: 8,
            top_k: 2,
            fused_shared_experts: 0,
            fused_shared_weight: 1.0,
        };
        assert!(matches!(ok.route(&t), Err(MoeError::Shape { .. })));
    }

    proptest! {
        #[test]
        fn softmax_topk_picks_the_largest(logits in proptest::collection::vec(-8f32..8.0, 16), renorm in any::<bool>()) {
            let router = Router { method: RoutingMethod::Softmax { renormalize: renorm }, num_experts: 16, top_k: 4, fused_shared_experts: 0, fused_shared_weight: 1.0 };
            let (ids, w) = route(&router, &logits, 1);
            let min_picked = ids.iter().map(|&i| logits[i as usize]).fold(f32::INFINITY, f32::min);
            for (e, &l) in logits.iter().enumerate() {
                if !ids.contains(&(e as i32)) {
                    prop_assert!(l <= min_picked);
                }
            }
            let z: f32 = logits.iter().map(|l| l.exp()).sum();
            let picked: f32 = ids.iter().map(|&i| logits[i as usize].exp()).sum();
            for (s, &i) in ids.iter().enumerate() {
                let p = logits[i as usize].exp();
                let want = if renorm { p / picked } else { p / z };
                prop_assert!((w[s] - want).abs() < 1e-5);
            }
        }

        #[test]
        fn grouped_topk_stays_in_the_best_groups(logits in proptest::collection::vec(-4f32..4.0, 32), bias in proptest::collection::vec(-0.5f32..0.5, 32), scale in 0.5f32..3.0) {
            let router = Router {
                method: RoutingMethod::DeepSeekGrouped { n_group: 8, topk_group: 3, renormalize: true, correction_bias: Some(bias.clone()), routed_scaling_factor: Some(scale) },
                num_experts: 32,
                top_k: 4,
                fused_shared_experts: 0,
                fused_shared_weight: 1.0,
            };
            let (ids, w) = route(&router, &logits, 1);
            let choice: Vec<f32> = logits.iter().zip(&bias).map(|(l, b)| sigmoid(*l) + b).collect();
            let mut group: Vec<(f32, usize)> = choice.chunks(4).enumerate().map(|(g, c)| {
                let mut v = c.to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                (v[0] + v[1], g)
            }).collect();
            group.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let kept: Vec<usize> = group[..3].iter().map(|g| g.1).collect();
            let distinct: std::collections::HashSet<_> = ids.iter().collect();
            prop_assert_eq!(distinct.len(), 4);
            for &i in &ids {
                prop_assert!(kept.contains(&(i as usize / 4)));
            }
            let min_picked = ids.iter().map(|&i| choice[i as usize]).fold(f32::INFINITY, f32::min);
            for (e, &c) in choice.iter().enumerate() {
                if kept.contains(&(e / 4)) && !ids.contains(&(e as i32)) {
                    prop_assert!(c <= min_picked);
                }
            }
            let sum: f32 = ids.iter().map(|&i| sigmoid(logits[i as usize])).sum();
            for (s, &i) in ids.iter().enumerate() {
                prop_assert!((w[s] - scale * sigmoid(logits[i as usize]) / sum).abs() < 1e-5);
            }
        }
    }
}
