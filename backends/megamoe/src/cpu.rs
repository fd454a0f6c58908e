//! MegaMoE on the CPU, quantizing where the GPU program does and rounding the same way:
//! activations per 32 values (E2M1 or E4M3 with a UE8M0 scale), GEMM 1 on the dequantized
//! values, the activation times the router weight, GEMM 2's input requantized per 32 values,
//! GEMM 2 rounded to bf16 per (token, k) slot (the combine slots hold bf16), then the top-k sum in
//! f32 in slot order, times the routed scaling factor, rounded to bf16.
//! It is the runner's CPU path and the reference of the GPU tests.

use moe_backend_reference::matmul_nt;
use moe_quant::{quantize_fp8_groups, quantize_mxfp4, ue8m0_from_f32_ceil, ScaleFormat};
use moe_runner_core::{
    as_expert_weights, ActivationOp, MoeError, MoeRunnerConfig, Mxfp4Weights, Proj, Result,
};
use rayon::prelude::*;

use crate::flags::Resolved;

/// Values per activation scale.
const BLOCK: usize = 32;

/// One expert's (token, slot) rows and their GEMM 2 outputs `[rows, H]`.
type ExpertRows = (Vec<(usize, usize)>, Vec<f32>);

/// This rank's pre-dispatched tokens, byte for byte as the symmetric buffer holds them.
#[derive(Clone, Debug, PartialEq)]
pub struct PreDispatch {
    /// `[m, H/2]` E2M1 pairs (element 2i in the low nibble) or `[m, H]` E4M3.
    pub x: Vec<u8>,
    /// `[m, H/32]` UE8M0 scales.
    pub xs: Vec<u8>,
    /// `[T, k]` global ids, -1 from token `m` (and slot `kin`) on.
    pub ids: Vec<i32>,
    /// `[T, k]` router weights, 0 where the id is padding.
    pub weights: Vec<f32>,
}

/// Quantized rows and their dequantized values.
struct Rows {
    bytes: Vec<u8>,
    scales: Vec<u8>,
    values: Vec<f32>,
}

/// `x [rows, cols]` quantized per 32 values as the GPU does (FP4 or FP8 with UE8M0 scales).
fn quantize_rows(x: &[f32], rows: usize, cols: usize, fp4: bool) -> Result<Rows> {
    if fp4 {
        let q = quantize_mxfp4(x, rows, cols)?;
        let mut values = vec![0f32; x.len()];
        moe_quant::dequantize_mxfp4_into(&q.packed, &q.scales, rows, cols, &mut values)?;
        Ok(Rows {
            bytes: q.packed,
            scales: q.scales,
            values,
        })
    } else {
        let q = quantize_fp8_groups(x, rows, cols, BLOCK, ScaleFormat::Ue8m0)?;
        let values = q.dequantize();
        Ok(Rows {
            scales: q.scales.iter().map(|&s| ue8m0_from_f32_ceil(s)).collect(),
            bytes: q.data,
            values,
        })
    }
}

/// The pre-dispatch of `m` tokens (`hidden [m, H]`, routing `(ids, weights, kin)` of `[m, kin]`)
/// into a buffer of `(tmax, k)` tokens and slots.
pub fn pre_dispatch(
    hidden: &[f32],
    h: usize,
    (ids, weights, kin): (&[i32], &[f32], usize),
    (tmax, k): (usize, usize),
    fp4: bool,
) -> Result<PreDispatch> {
    let m = hidden.len().checked_div(h).unwrap_or(0);
    let q = quantize_rows(hidden, m, h, fp4)?;
    let mut out_ids = vec![-1i32; tmax * k];
    let mut out_w = vec![0f32; tmax * k];
    for t in 0..m.min(tmax) {
        for kk in 0..kin.min(k) {
            out_ids[t * k + kk] = ids[t * kin + kk];
            out_w[t * k + kk] = weights[t * kin + kk];
        }
    }
    Ok(PreDispatch {
        x: q.bytes,
        xs: q.scales,
        ids: out_ids,
        weights: out_w,
    })
}

/// The layer for `m` tokens: `hidden [m, H]` (values as the GPU reads them, bf16), routing
/// `[m, kin]` with global expert ids over all of `weights`' experts. Returns `[m, H]` (values
/// rounded to bf16).
pub fn forward(
    hidden: &[f32],
    ids: &[i32],
    topk_weights: &[f32],
    kin: usize,
    weights: &Mxfp4Weights,
    cfg: &MoeRunnerConfig,
    flags: Resolved,
) -> Result<Vec<f32>> {
    let act = cfg.activation_kernel()?;
    if !act.is_gated() {
        return Err(MoeError::Config(
            "megamoe runs gated activations (GEMM 1 gives gate and up)".into(),
        ));
    }
    let ew = as_expert_weights(weights)?;
    let d = ew.dims();
    let (h, i) = (d.hidden, d.inter);
    if !hidden.len().is_multiple_of(h.max(1)) || d.n1 != 2 * i {
        return Err(MoeError::invalid(
            "megamoe input",
            format!(
                "hidden of {} values is not [m, {h}], or w13 is not gated",
                hidden.len()
            ),
        ));
    }
    let m = hidden.len() / h;
    let fp4 = flags.fp4_acts;
    let a = quantize_rows(hidden, m, h, fp4)?.values;
    // Entries (token, slot) per expert.
    let mut per_expert: Vec<Vec<(usize, usize)>> = vec![Vec::new(); d.experts];
    for t in 0..m {
        for kk in 0..kin {
            let id = ids[t * kin + kk];
            if id < 0 {
                continue;
            }
            let e = id as usize;
            if e >= d.experts {
                return Err(MoeError::ExpertIdOutOfRange {
                    id,
                    row: t,
                    slot: kk,
                    num_experts: d.experts,
                });
            }
            per_expert[e].push((t, kk));
        }
    }
    // y[t, kk, :] for every routed slot, bf16-rounded.
    let results: Vec<ExpertRows> = per_expert
        .into_par_iter()
        .enumerate()
        .filter(|(_, rows)| !rows.is_empty())
        .map(|(e, rows)| {
            let n = rows.len();
            let mut xa = vec![0f32; n * h];
            for (r, &(t, _)) in rows.iter().enumerate() {
                xa[r * h..(r + 1) * h].copy_from_slice(&a[t * h..(t + 1) * h]);
            }
            let mut w13 = vec![0f32; 2 * i * h];
            ew.dequantize_expert(Proj::W13, e, &mut w13)?;
            let mut g = vec![0f32; n * 2 * i];
            matmul_nt(&xa, &w13, &mut g, n, 2 * i, h);
            drop(w13);
            let mut v = vec![0f32; n * i];
            for (r, &(t, kk)) in rows.iter().enumerate() {
                let wt = topk_weights[t * kin + kk];
                for j in 0..i {
                    let (gc, uc) = cfg.gate_up.columns(j, i);
                    v[r * i + j] = act.apply(g[r * 2 * i + gc], g[r * 2 * i + uc]) * wt;
                }
            }
            let hq = quantize_rows(&v, n, i, fp4)?.values;
            let mut w2 = vec![0f32; h * i];
            ew.dequantize_expert(Proj::W2, e, &mut w2)?;
            let mut y = vec![0f32; n * h];
            matmul_nt(&hq, &w2, &mut y, n, h, i);
            y.iter_mut()
                .for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
            Ok((rows, y))
        })
        .collect::<Result<_>>()?;
    let kmax = kin.max(1);
    let mut slots = vec![0f32; m * kmax * h];
    let mut filled = vec![false; m * kmax];
    for (rows, y) in results {
        for (r, (t, kk)) in rows.into_iter().enumerate() {
            slots[(t * kmax + kk) * h..(t * kmax + kk + 1) * h]
                .copy_from_slice(&y[r * h..(r + 1) * h]);
            filled[t * kmax + kk] = true;
        }
    }
    let scale = cfg.routed_scaling_factor.unwrap_or(1.0);
    let mut out = vec![0f32; m * h];
    out.par_chunks_mut(h.max(1)).enumerate().for_each(|(t, o)| {
        for (c, v) in o.iter_mut().enumerate() {
            let mut s = 0f32;
            for kk in 0..kin {
                if filled[t * kmax + kk] {
                    s += slots[(t * kmax + kk) * h + c];
                }
            }
            *v = half::bf16::from_f32(s * scale).to_f32();
        }
    });
    Ok(out)
}
