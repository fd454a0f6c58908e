//! The low-latency all-to-all of R ranks computed on the CPU, with the GPU kernels' exact
//! layout (source ranks in rank order, each rank's tokens in token order, a token's duplicate
//! picks in slot order) and FP8 / NVFP4 rounding, so tests compare the GPU's buffers byte for
//! byte.

use moe_dispatch::{DispatcherConfig, Wire};
use moe_quant::{quantize_fp8_groups, quantize_nvfp4, unpack_e2m1, ScaleFormat};
use moe_runner_core::{DType, DeepEpLlDispatchOutput, MoeError, Result, Tensor, TopK};

/// Where one (token, slot) pair of a source rank went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub expert: usize,
    pub row: usize,
}

/// What every rank received, and where each token's copies went.
pub struct SimDispatch {
    /// Per receiving rank, host tensors in the `deepep_ll` format (rows past `masked_m` zero).
    pub outputs: Vec<DeepEpLlDispatchOutput>,
    /// Per source rank, per (token, slot): its row, or `None` for -1.
    pub placements: Vec<Vec<Option<Placement>>>,
}

/// Dispatches every rank's `(hidden [M_r, H] bf16/f16, top-k with global ids)`. `cfg` gives the
/// world (its `rank` is ignored).
pub fn dispatch(cfg: &DispatcherConfig, inputs: &[(Tensor, TopK)]) -> Result<SimDispatch> {
    let (r_n, el, t, h) = (
        cfg.world_size,
        cfg.num_local_experts,
        cfg.max_tokens_per_rank,
        cfg.hidden_size,
    );
    if inputs.len() != r_n {
        return Err(MoeError::Config(format!(
            "{} rank inputs for a world of {r_n}",
            inputs.len()
        )));
    }
    let rt = r_n * t;
    // Values per scale of the wire (0: no scales).
    let group = match cfg.wire {
        Wire::Native => 0,
        Wire::Fp8 | Wire::Fp8Ue8m0 => 128,
        Wire::Nvfp4 => 16,
    };
    let sg = h.checked_div(group).unwrap_or(0);
    // Per source rank: its rows as sent (quantized once per token): values, or codes (one per
    // value) and scales (f32 values for FP8, E4M3 codes for NVFP4).
    let mut sent = Vec::with_capacity(r_n);
    for (hidden, topk) in inputs {
        cfg.check_batch("simulated deepep_ll", hidden, topk)?;
        let m = topk.num_tokens();
        let x = hidden.to_f32_vec()?;
        sent.push(match cfg.wire {
            Wire::Native => (x, None),
            Wire::Fp8 | Wire::Fp8Ue8m0 => {
                let fmt = if cfg.wire == Wire::Fp8 {
                    ScaleFormat::F32
                } else {
                    ScaleFormat::Ue8m0
                };
                let q = quantize_fp8_groups(&x, m, h, 128, fmt)?;
                let codes: Vec<f32> = q.data.iter().map(|&b| f32::from(b)).collect();
                (codes, Some(q.scales))
            }
            Wire::Nvfp4 => {
                let q = quantize_nvfp4(&x, m, h, cfg.nvfp4_global_scale)?;
                let codes = unpack_e2m1(&q.packed).into_iter().map(f32::from).collect();
                let scales = q.scales.iter().map(|&b| f32::from(b)).collect();
                (codes, Some(scales))
            }
        });
    }
    let mut x = vec![vec![0f32; el * rt * h]; r_n];
    let mut scales = vec![vec![0f32; el * rt * sg]; r_n];
    let mut src_info = vec![vec![0i32; el * rt]; r_n];
    let mut counts = vec![vec![0usize; el]; r_n];
    let mut layout = vec![vec![0i64; el * r_n]; r_n];
    let mut placements = Vec::with_capacity(r_n);
    for (src, (_, topk)) in inputs.iter().enumerate() {
        let (m, k) = (topk.num_tokens(), topk.top_k());
        let ids = topk.ids.to_host()?;
        let ids = ids.as_slice::<i32>()?;
        let mut place = vec![None; m * k];
        for (dst, per_rank) in layout.iter_mut().enumerate() {
            for e in 0..el {
                let g = (dst * el + e) as i32;
                let begin = counts[dst][e];
                let mut n = 0;
                for tok in 0..m {
                    for s in 0..k {
                        if ids[tok * k + s] != g || n >= t {
                            continue;
                        }
                        let row = begin + n;
                        let (xs, ss) = &sent[src];
                        x[dst][(e * rt + row) * h..(e * rt + row + 1) * h]
                            .copy_from_slice(&xs[tok * h..(tok + 1) * h]);
                        if let Some(ss) = ss {
                            scales[dst][(e * rt + row) * sg..(e * rt + row + 1) * sg]
                                .copy_from_slice(&ss[tok * sg..(tok + 1) * sg]);
                        }
                        src_info[dst][e * rt + row] = tok as i32;
                        place[tok * k + s] = Some(Placement {
                            rank: dst,
                            expert: e,
                            row,
                        });
                        n += 1;
                    }
                }
                per_rank[e * r_n + src] = ((begin as i64) << 32) | n as i64;
                counts[dst][e] += n;
            }
        }
        placements.push(place);
    }
    let mut outputs = Vec::with_capacity(r_n);
    for (dst, (_, topk)) in inputs.iter().enumerate() {
        let act = inputs[dst].0.dtype();
        let codes = || x[dst].iter().map(|&c| c as u8);
        let scale_codes = || scales[dst].iter().map(|&c| c as u8).collect::<Vec<u8>>();
        let (hidden, hidden_scale) = match cfg.wire {
            Wire::Native => (Tensor::from_f32(&x[dst], &[el, rt, h], act)?, None),
            Wire::Fp8 | Wire::Fp8Ue8m0 => (
                Tensor::from_slice(&codes().collect::<Vec<u8>>(), &[el, rt, h], DType::F8E4M3)?,
                Some(Tensor::from_slice(&scales[dst], &[el, rt, sg], DType::F32)?),
            ),
            Wire::Nvfp4 => {
                // Two codes a byte, element 2i in the low nibble.
                let c: Vec<u8> = codes().collect();
                let packed: Vec<u8> = c.chunks_exact(2).map(|p| p[0] | (p[1] << 4)).collect();
                (
                    Tensor::from_slice(&packed, &[el, rt, h / 2], DType::E2M1x2)?,
                    Some(Tensor::from_slice(
                        &scale_codes(),
                        &[el, rt, sg],
                        DType::F8E4M3,
                    )?),
                )
            }
        };
        let masked: Vec<i32> = counts[dst].iter().map(|&c| c as i32).collect();
        outputs.push(DeepEpLlDispatchOutput {
            hidden,
            hidden_scale,
            hidden_global_scale: (cfg.wire == Wire::Nvfp4).then_some(cfg.nvfp4_global_scale),
            topk: TopK::new(topk.ids.to_host()?, topk.weights.to_host()?)?,
            masked_m: Tensor::from_slice(&masked, &[el], DType::I32)?,
            expected_m: 1,
            src_info: Tensor::from_slice(&src_info[dst], &[el, rt], DType::I32)?,
            layout_range: Tensor::from_slice(&layout[dst], &[el, r_n], DType::I64)?,
            out_buffer: None,
        });
    }
    Ok(SimDispatch {
        outputs,
        placements,
    })
}

/// Combines per-rank expert outputs `ys[r]` (`[E_local, R*T, H]`) back to every source rank:
/// out[t] = scale * sum_k w[t,k] * y(t,k), accumulated in f32 in slot order with fused
/// multiply-adds (as the GPU does), rounded once to `dtype`.
pub fn combine(
    cfg: &DispatcherConfig,
    sim: &SimDispatch,
    ys: &[Vec<f32>],
    dtype: DType,
) -> Result<Vec<Tensor>> {
    let (rt, h) = (cfg.world_size * cfg.max_tokens_per_rank, cfg.hidden_size);
    let scale = cfg.routed_scaling_factor.unwrap_or(1.0);
    sim.outputs
        .iter()
        .zip(&sim.placements)
        .map(|(d, place)| {
            let (m, k) = (d.topk.num_tokens(), d.topk.top_k());
            let w = d.topk.weights.as_slice::<f32>()?;
            let mut out = vec![0f32; m * h];
            for tok in 0..m {
                for s in 0..k {
                    let Some(p) = place[tok * k + s] else {
                        continue;
                    };
                    let y = &ys[p.rank][(p.expert * rt + p.row) * h..][..h];
                    for (o, &v) in out[tok * h..(tok + 1) * h].iter_mut().zip(y) {
                        *o = w[tok * k + s].mul_add(v, *o);
                    }
                }
            }
            out.iter_mut().for_each(|v| *v *= scale);
            Tensor::from_f32(&out, &[m, h], dtype)
        })
        .collect()
}
