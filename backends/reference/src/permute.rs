//! Pre- and post-permutes between the dispatch formats and the reference core's layout: the
//! rows of each local expert stored contiguously, with where each row came from.

use moe_runner_core::{
    downcast_dispatch, registry::downcast_io, registry::RunnerIo, CombineInput, DType,
    DeepEpLlCombineInput, DeepEpLlDispatchOutput, DispatchFormat, DispatchOutput, MoeError,
    MoeRunnerConfig, QuantInfo, Result, StandardCombineInput, StandardDispatchOutput, Tensor,
};

use crate::RUNNER;

/// The core's input: activation rows grouped by local expert.
pub struct ExpertRows {
    /// `[rows, H]` f32.
    pub hidden: Vec<f32>,
    /// `[E_local + 1]`: rows of expert e are `offsets[e]..offsets[e + 1]`.
    pub offsets: Vec<usize>,
    /// Per row, the flat index it returns to (standard: `token * k + slot`; masked:
    /// `expert * R*T + row`).
    pub dest: Vec<usize>,
    /// Dtype the post-permute writes.
    pub out_dtype: DType,
}

/// The core's output: GEMM 2 results in the same row order, with the input's bookkeeping.
pub struct ExpertRowsOut {
    /// `[rows, H]` f32.
    pub out: Vec<f32>,
    pub dest: Vec<usize>,
    pub out_dtype: DType,
}

/// The values of an activation tensor as f32: float dtypes converted, FP8 dequantized with its
/// per-128-channel scales, NVFP4 with its per-16 E4M3 scales and global scale.
fn activations_f32(
    hidden: &Tensor,
    scale: Option<&Tensor>,
    global: Option<f32>,
    rows: usize,
    h: usize,
) -> Result<Vec<f32>> {
    match (hidden.dtype(), scale) {
        (d, None) if d.is_float() => hidden.to_f32_vec(),
        (DType::E2M1x2, Some(s)) => {
            s.expect_dtype("hidden_scale", &[DType::F8E4M3])?;
            let gs = global.ok_or_else(|| {
                MoeError::invalid(
                    "hidden_global_scale",
                    "NVFP4 activations need their global scale",
                )
            })?;
            let mut out = vec![0f32; rows * h];
            moe_quant::dequantize_nvfp4_into(
                hidden.as_slice::<u8>()?,
                s.as_slice::<u8>()?,
                rows,
                h,
                gs,
                &mut out,
            )?;
            Ok(out)
        }
        (DType::F8E4M3, Some(s)) => {
            if !h.is_multiple_of(128) {
                return Err(MoeError::NotDivisible {
                    what: "hidden size of FP8 activations".into(),
                    value: h,
                    divisor: 128,
                });
            }
            s.expect_dtype("hidden_scale", &[DType::F32])?;
            let groups = h / 128;
            if s.numel() != rows * groups {
                return Err(MoeError::Shape {
                    what: "hidden_scale".into(),
                    expected: vec![rows, groups],
                    got: s.shape().to_vec(),
                });
            }
            let scales = s.as_slice::<f32>()?;
            Ok(hidden
                .as_slice::<u8>()?
                .iter()
                .enumerate()
                .map(|(i, &b)| moe_quant::e4m3_to_f32(b) * scales[i / 128])
                .collect())
        }
        (DType::F8E4M3, None) => Err(MoeError::invalid(
            "hidden_scale",
            "FP8 activations need their scales",
        )),
        (got, _) => Err(MoeError::DType {
            what: "hidden".into(),
            expected: vec![
                DType::F32,
                DType::Bf16,
                DType::F16,
                DType::F8E4M3,
                DType::E2M1x2,
            ],
            got,
        }),
    }
}

/// Output dtype: the activations' float dtype, bf16 for FP8 and NVFP4 inputs.
fn out_dtype(hidden: DType) -> DType {
    if hidden.is_float() {
        hidden
    } else {
        DType::Bf16
    }
}

pub fn standard_pre(
    input: &dyn DispatchOutput,
    _quant: &dyn QuantInfo,
    cfg: &MoeRunnerConfig,
) -> Result<RunnerIo> {
    let d = downcast_dispatch::<StandardDispatchOutput>(input, RUNNER, DispatchFormat::Standard)?;
    let [m, h] = d.hidden.dims::<2>("hidden")?;
    d.hidden.expect_shape("hidden", &[m, cfg.hidden_size])?;
    d.topk.ids.expect_shape("topk_ids", &[m, cfg.top_k])?;
    d.topk.check_ids(cfg.num_local_experts)?;
    let x = activations_f32(&d.hidden, d.hidden_scale.as_ref(), None, m, h)?;
    let ids = d.topk.ids.as_slice::<i32>()?;
    let weights = d.topk.weights.as_slice::<f32>()?;
    let e_local = cfg.num_local_experts;

    let mut offsets = vec![0usize; e_local + 1];
    for &id in ids.iter().filter(|&&id| id >= 0) {
        offsets[id as usize + 1] += 1;
    }
    for e in 0..e_local {
        offsets[e + 1] += offsets[e];
    }
    let rows = offsets[e_local];
    let mut next = offsets.clone();
    let mut hidden = vec![0f32; rows * h];
    let mut dest = vec![0usize; rows];
    for (flat, &id) in ids.iter().enumerate() {
        if id < 0 {
            continue;
        }
        let r = next[id as usize];
        next[id as usize] += 1;
        let t = flat / cfg.top_k;
        let row = &mut hidden[r * h..(r + 1) * h];
        row.copy_from_slice(&x[t * h..(t + 1) * h]);
        if cfg.apply_router_weight_on_input {
            row.iter_mut().for_each(|v| *v *= weights[flat]);
        }
        dest[r] = flat;
    }
    Ok(Box::new(ExpertRows {
        hidden,
        offsets,
        dest,
        out_dtype: out_dtype(d.hidden.dtype()),
    }))
}

pub fn standard_post(
    output: RunnerIo,
    input: &dyn DispatchOutput,
    cfg: &MoeRunnerConfig,
) -> Result<Box<dyn CombineInput>> {
    let y = downcast_io::<ExpertRowsOut>(output, "reference post-permute")?;
    let d = downcast_dispatch::<StandardDispatchOutput>(input, RUNNER, DispatchFormat::Standard)?;
    let (m, k, h) = (d.num_tokens(), cfg.top_k, cfg.hidden_size);
    let hidden = if cfg.no_combine {
        let mut out = vec![0f32; m * k * h];
        for (r, &flat) in y.dest.iter().enumerate() {
            out[flat * h..(flat + 1) * h].copy_from_slice(&y.out[r * h..(r + 1) * h]);
        }
        Tensor::from_f32(&out, &[m, k, h], y.out_dtype)?
    } else {
        let weights = d.topk.weights.as_slice::<f32>()?;
        let mut out = vec![0f32; m * h];
        for (r, &flat) in y.dest.iter().enumerate() {
            let w = if cfg.apply_router_weight_on_input {
                1.0
            } else {
                weights[flat]
            };
            let t = flat / k;
            for (o, v) in out[t * h..(t + 1) * h]
                .iter_mut()
                .zip(&y.out[r * h..(r + 1) * h])
            {
                *o += w * v;
            }
        }
        let scale = cfg.output_scale();
        if scale != 1.0 {
            out.iter_mut().for_each(|v| *v *= scale);
        }
        Tensor::from_f32(&out, &[m, h], y.out_dtype)?
    };
    Ok(Box::new(StandardCombineInput { hidden }))
}

/// `masked_m` as row counts, each checked against the buffer's `R*T` rows.
pub fn masked_counts(d: &DeepEpLlDispatchOutput, e_local: usize) -> Result<Vec<usize>> {
    let [e, rt, _] = d.dims()?;
    if e != e_local {
        return Err(MoeError::Shape {
            what: "masked hidden experts".into(),
            expected: vec![e_local],
            got: vec![e],
        });
    }
    d.masked_m.expect_dtype("masked_m", &[DType::I32])?;
    d.masked_m.expect_shape("masked_m", &[e_local])?;
    d.masked_m
        .as_slice::<i32>()?
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            if c < 0 || c as usize > rt {
                Err(MoeError::invalid(
                    "masked_m",
                    format!("expert {i} has {c} rows; the buffer holds 0..={rt}"),
                ))
            } else {
                Ok(c as usize)
            }
        })
        .collect()
}

pub fn masked_pre(
    input: &dyn DispatchOutput,
    _quant: &dyn QuantInfo,
    cfg: &MoeRunnerConfig,
) -> Result<RunnerIo> {
    let d = downcast_dispatch::<DeepEpLlDispatchOutput>(
        input,
        RUNNER,
        DispatchFormat::DeepEpLowLatency,
    )?;
    if cfg.apply_router_weight_on_input || cfg.no_combine {
        return Err(MoeError::Config(
            "the masked format applies router weights in its combine; apply_router_weight_on_input and no_combine do not apply".into(),
        ));
    }
    let [e_local, rt, h] = d.dims()?;
    // NVFP4 holds two values a byte.
    let cols = if d.hidden.dtype() == DType::E2M1x2 {
        cfg.hidden_size / 2
    } else {
        cfg.hidden_size
    };
    d.hidden
        .expect_shape("masked hidden", &[cfg.num_local_experts, rt, cols])?;
    let counts = masked_counts(d, e_local)?;
    let x = activations_f32(
        &d.hidden,
        d.hidden_scale.as_ref(),
        d.hidden_global_scale,
        e_local * rt,
        h,
    )?;
    let mut offsets = vec![0usize; e_local + 1];
    let mut hidden = Vec::with_capacity(counts.iter().sum::<usize>() * h);
    let mut dest = Vec::new();
    for (e, &c) in counts.iter().enumerate() {
        hidden.extend_from_slice(&x[e * rt * h..(e * rt + c) * h]);
        dest.extend((0..c).map(|r| e * rt + r));
        offsets[e + 1] = offsets[e] + c;
    }
    Ok(Box::new(ExpertRows {
        hidden,
        offsets,
        dest,
        out_dtype: out_dtype(d.hidden.dtype()),
    }))
}

pub fn masked_post(
    output: RunnerIo,
    input: &dyn DispatchOutput,
    cfg: &MoeRunnerConfig,
) -> Result<Box<dyn CombineInput>> {
    let y = downcast_io::<ExpertRowsOut>(output, "reference post-permute")?;
    let d = downcast_dispatch::<DeepEpLlDispatchOutput>(
        input,
        RUNNER,
        DispatchFormat::DeepEpLowLatency,
    )?;
    let [e_local, rt, _] = d.dims()?;
    let h = cfg.hidden_size;
    let mut out = vec![0f32; e_local * rt * h];
    for (r, &slot) in y.dest.iter().enumerate() {
        out[slot * h..(slot + 1) * h].copy_from_slice(&y.out[r * h..(r + 1) * h]);
    }
    Ok(Box::new(DeepEpLlCombineInput {
        hidden: Tensor::from_f32(&out, &[e_local, rt, h], y.out_dtype)?,
    }))
}
