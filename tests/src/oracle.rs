//! A naive per-token oracle of the whole standard-format MoE, written independently of the
//! reference runner's permute and GEMM code: for each token and slot, dot products accumulated
//! in f64 on the expert's dequantized weights. It shares only the number formats (tested in
//! `moe-quant`) and the scheme's activation rounding with the reference.

use moe_backend_reference::{per_tensor_scale, round_activations, GemmInput};
use moe_runner_core::{
    as_expert_weights, ActivationOp, DType, MoeError, MoeRunnerConfig, Proj, QuantInfo,
    QuantScheme, Result, TopK,
};

/// `x [M, H]` f32 with routing `topk` (local ids) through the experts of `quant`: `[M, H]`, or
/// `[M, k, H]` with `no_combine`. Each GEMM's output is rounded to `act_dtype` (the dtype the
/// activations are stored in between the stages), as every runner stores it.
pub fn naive_moe(
    x: &[f32],
    topk: &TopK,
    quant: &dyn QuantInfo,
    cfg: &MoeRunnerConfig,
    act_dtype: DType,
) -> Result<Vec<f32>> {
    let round = |v: f32| match act_dtype {
        DType::Bf16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    };
    let w = as_expert_weights(quant)?;
    w.dims().check(cfg)?;
    let scheme = quant.scheme();
    let (h, n1, inter, k) = (
        cfg.hidden_size,
        cfg.gemm1_columns(),
        cfg.intermediate_size,
        cfg.top_k,
    );
    let m = topk.num_tokens();
    if x.len() != m * h {
        return Err(MoeError::invalid("oracle input", "length is not M * H"));
    }
    let ids = topk.ids.as_slice::<i32>()?;
    let tw = topk.weights.as_slice::<f32>()?;
    let act = cfg.activation_kernel()?;

    let load = |proj, e: usize, len: usize| -> Result<Vec<f32>> {
        let mut v = vec![0f32; len];
        w.dequantize_expert(proj, e, &mut v)?;
        Ok(v)
    };
    let dot = |a: &[f32], b: &[f32]| -> f32 {
        a.iter()
            .zip(b)
            .map(|(&p, &q)| p as f64 * q as f64)
            .sum::<f64>() as f32
    };

    // GEMM 1 inputs of every (token, slot) pair that reaches an expert.
    let pairs: Vec<(usize, usize)> = (0..m * k)
        .filter(|&f| ids[f] >= 0)
        .map(|f| (f / k, f))
        .collect();
    let mut inputs: Vec<Vec<f32>> = pairs
        .iter()
        .map(|&(t, f)| {
            let scale = if cfg.apply_router_weight_on_input {
                tw[f]
            } else {
                1.0
            };
            x[t * h..(t + 1) * h].iter().map(|v| v * scale).collect()
        })
        .collect();
    let tensor_scale = |rows: &[Vec<f32>], which| -> Result<f32> {
        if scheme != QuantScheme::Fp8PerTensor {
            return Ok(1.0);
        }
        let amax = rows.iter().flatten().fold(0f32, |a, v| a.max(v.abs()));
        per_tensor_scale(quant, which, amax)
    };
    let s1 = tensor_scale(&inputs, GemmInput::One)?;
    let mut mids = Vec::with_capacity(pairs.len());
    for (&(_, f), xin) in pairs.iter().zip(inputs.iter_mut()) {
        let e = ids[f] as usize;
        round_activations(scheme, quant, GemmInput::One, e, xin, h, s1)?;
        let w13 = load(Proj::W13, e, n1 * h)?;
        let g: Vec<f32> = (0..n1)
            .map(|n| round(dot(xin, &w13[n * h..(n + 1) * h])))
            .collect();
        let a: Vec<f32> = (0..inter)
            .map(|j| {
                if act.is_gated() {
                    let (gi, ui) = cfg.gate_up.columns(j, inter);
                    act.apply(g[gi], g[ui])
                } else {
                    act.apply(g[j], 0.0)
                }
            })
            .collect();
        mids.push(a);
    }
    let s2 = tensor_scale(&mids, GemmInput::Two)?;
    let width = if cfg.no_combine { k * h } else { h };
    let mut out = vec![0f64; m * width];
    for (&(t, f), a) in pairs.iter().zip(mids.iter_mut()) {
        let e = ids[f] as usize;
        round_activations(scheme, quant, GemmInput::Two, e, a, inter, s2)?;
        let w2 = load(Proj::W2, e, h * inter)?;
        for c in 0..h {
            let y = round(dot(a, &w2[c * inter..(c + 1) * inter])) as f64;
            if cfg.no_combine {
                out[f * h + c] = y;
            } else {
                let wt = if cfg.apply_router_weight_on_input {
                    1.0
                } else {
                    tw[f] as f64
                };
                out[t * h + c] += wt * y;
            }
        }
    }
    let scale = if cfg.no_combine {
        1.0
    } else {
        cfg.output_scale() as f64
    };
    Ok(out.into_iter().map(|v| (v * scale) as f32).collect())
}
