//! Seeded random weights and inputs. Weights are generated and quantized one expert at a time
//! straight into their final tensors, so model-sized layers never exist in f32.

use half::{bf16, f16};
use moe_runner_core::{
    DType, DenseWeights, Fp8BlockWeights, Fp8PerChannelWeights, Fp8PerTensorWeights, MoeError,
    Mxfp4Weights, Nvfp4Weights, QuantInfo, QuantScheme, Result, ScaleLayout, Tensor, TopK,
    WeightDims, FP8_BLOCK, MXFP4_BLOCK, NVFP4_BLOCK,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// Amax assumed for the intermediate activations when choosing NVFP4 input global scales of
/// GEMM 2 (SiLU-and-mul of unit-variance gate and up stays well below it).
pub const NVFP4_A2_AMAX: f32 = 32.0;

/// `n` values uniform in `[-a, a]` from `seed`.
pub fn uniform(n: usize, a: f32, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        c.iter_mut().for_each(|x| *x = rng.random_range(-a..=a));
    });
    v
}

/// Activations `[m, h]` of unit variance.
pub fn hidden(m: usize, h: usize, dtype: DType, seed: u64) -> Result<Tensor> {
    Tensor::from_f32(&uniform(m * h, 3f32.sqrt(), seed), &[m, h], dtype)
}

/// Router logits `[m, e]`.
pub fn logits(m: usize, e: usize, seed: u64) -> Result<Tensor> {
    Tensor::from_f32(&uniform(m * e, 2.0, seed), &[m, e], DType::F32)
}

/// Random routing: `k` distinct experts per token with softmax-like positive weights. With
/// `skew`, tokens favour the first quarter of the experts and the last quarter gets none, so
/// some experts have many rows and some none. A few slots are -1 (dropped) when `drops`.
pub fn topk(
    m: usize,
    k: usize,
    experts: usize,
    seed: u64,
    skew: bool,
    drops: bool,
) -> Result<TopK> {
    let mut rng = StdRng::seed_from_u64(seed);
    let reachable = if skew {
        (experts * 3 / 4).max(k)
    } else {
        experts
    };
    let mut ids = Vec::with_capacity(m * k);
    let mut weights = Vec::with_capacity(m * k);
    for _ in 0..m {
        let mut row: Vec<i32> = Vec::with_capacity(k);
        while row.len() < k {
            let e = if skew && rng.random_bool(0.6) {
                rng.random_range(0..(reachable / 4).max(1))
            } else {
                rng.random_range(0..reachable)
            } as i32;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        if drops && k > 1 && rng.random_bool(0.1) {
            row[k - 1] = -1;
        }
        let w: Vec<f32> = (0..k).map(|_| rng.random_range(0.05f32..1.0)).collect();
        let sum: f32 = w.iter().sum();
        ids.extend(row);
        weights.extend(w.iter().map(|x| x / sum));
    }
    TopK::from_vecs(&ids, &weights, m, k)
}

/// One expert matrix in the stored form of a scheme.
struct Quantized {
    data: Vec<u8>,
    scales: Vec<u8>,
    global: f32,
}

fn to_bytes<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn quantize_matrix(
    scheme: QuantScheme,
    x: &[f32],
    r: usize,
    c: usize,
    layout: ScaleLayout,
) -> Result<Quantized> {
    let plain = |data: Vec<u8>| Quantized {
        data,
        scales: Vec::new(),
        global: 1.0,
    };
    Ok(match scheme {
        QuantScheme::F32 => plain(to_bytes(x)),
        QuantScheme::Bf16 => plain(to_bytes(
            &x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(),
        )),
        QuantScheme::F16 => plain(to_bytes(
            &x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
        )),
        QuantScheme::Fp8Block128 => {
            let q = moe_quant::quantize_fp8_blocks(x, 1, r, c, FP8_BLOCK)?;
            Quantized {
                data: q.data,
                scales: to_bytes(&q.scales),
                global: 1.0,
            }
        }
        QuantScheme::Fp8PerTensor => {
            let (data, s) = moe_quant::quantize_fp8_per_tensor(x);
            Quantized {
                data,
                scales: to_bytes(&[s]),
                global: 1.0,
            }
        }
        QuantScheme::Fp8PerChannel => {
            let (data, s) = moe_quant::quantize_fp8_per_channel(x, r, c)?;
            Quantized {
                data,
                scales: to_bytes(&s),
                global: 1.0,
            }
        }
        QuantScheme::Nvfp4 => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let gs = moe_quant::nvfp4_global_scale(amax)?;
            let q = moe_quant::quantize_nvfp4(x, r, c, gs)?;
            let scales = match layout {
                ScaleLayout::Linear => q.scales,
                ScaleLayout::Swizzled128x4 => {
                    moe_quant::swizzle_scales_128x4(&q.scales, r, c / NVFP4_BLOCK)?
                }
            };
            Quantized {
                data: q.packed,
                scales,
                global: gs,
            }
        }
        QuantScheme::Mxfp4 | QuantScheme::Mxfp4A4 | QuantScheme::Mxfp4A8 => {
            let q = moe_quant::quantize_mxfp4(x, r, c)?;
            Quantized {
                data: q.packed,
                scales: q.scales,
                global: 1.0,
            }
        }
    })
}

/// (dtype, values per stored element) of a scheme's weights, and its scale dtype and count per
/// expert matrix.
fn storage(
    scheme: QuantScheme,
    r: usize,
    c: usize,
    layout: ScaleLayout,
) -> (DType, usize, DType, usize) {
    match scheme {
        QuantScheme::F32 => (DType::F32, 1, DType::F32, 0),
        QuantScheme::Bf16 => (DType::Bf16, 1, DType::F32, 0),
        QuantScheme::F16 => (DType::F16, 1, DType::F32, 0),
        QuantScheme::Fp8Block128 => (
            DType::F8E4M3,
            1,
            DType::F32,
            r.div_ceil(FP8_BLOCK.0) * c.div_ceil(FP8_BLOCK.1),
        ),
        QuantScheme::Fp8PerTensor => (DType::F8E4M3, 1, DType::F32, 1),
        QuantScheme::Fp8PerChannel => (DType::F8E4M3, 1, DType::F32, r),
        QuantScheme::Nvfp4 => (
            DType::E2M1x2,
            2,
            DType::F8E4M3,
            match layout {
                ScaleLayout::Linear => r * c / NVFP4_BLOCK,
                ScaleLayout::Swizzled128x4 => moe_quant::swizzled_len(r, c / NVFP4_BLOCK),
            },
        ),
        QuantScheme::Mxfp4 | QuantScheme::Mxfp4A4 | QuantScheme::Mxfp4A8 => {
            (DType::E2M1x2, 2, DType::Ue8m0, r * c / MXFP4_BLOCK)
        }
    }
}

/// The weights of one projection for all experts, plus per-expert global scales.
struct Projection {
    data: Tensor,
    scales: Tensor,
    globals: Vec<f32>,
}

fn projection(
    scheme: QuantScheme,
    experts: usize,
    r: usize,
    c: usize,
    layout: ScaleLayout,
    seed: u64,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Projection> {
    let (dtype, pack, sdtype, per_scale) = storage(scheme, r, c, layout);
    if !c.is_multiple_of(pack) {
        return Err(MoeError::NotDivisible {
            what: "weight columns".into(),
            value: c,
            divisor: pack,
        });
    }
    let mut data = Tensor::zeros(&[experts, r, c / pack], dtype);
    // Schemes without scales get one unused slot per expert so every expert has a chunk.
    let mut scales = Tensor::zeros(&[experts, per_scale.max(1)], sdtype);
    let data_per = r * (c / pack) * dtype.size();
    let scale_per = per_scale.max(1) * sdtype.size();
    let bound = (3.0 / c as f32).sqrt();
    let globals: Vec<f32> = data
        .host_bytes_mut()?
        .par_chunks_mut(data_per.max(1))
        .zip(scales.host_bytes_mut()?.par_chunks_mut(scale_per))
        .enumerate()
        .map(|(e, (d, s))| -> Result<f32> {
            let x = uniform(r * c, bound, seed.wrapping_add(e as u64 * 7919));
            let q = quantize_matrix(scheme, &x, r, c, layout)?;
            d.copy_from_slice(&q.data);
            s[..q.scales.len()].copy_from_slice(&q.scales);
            progress(1);
            Ok(q.global)
        })
        .collect::<Result<_>>()?;
    Ok(Projection {
        data,
        scales,
        globals,
    })
}

/// Random expert weights of `dims` in `scheme`, generated per expert from `seed`. Values are
/// uniform with unit-variance products (bound sqrt(3 / fan_in)). `progress` is called once per
/// expert matrix (2 * experts calls).
pub fn weights(
    dims: WeightDims,
    scheme: QuantScheme,
    seed: u64,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Box<dyn QuantInfo>> {
    let layout = ScaleLayout::Linear;
    let w13 = projection(
        scheme,
        dims.experts,
        dims.n1,
        dims.hidden,
        layout,
        seed,
        progress,
    )?;
    let w2 = projection(
        scheme,
        dims.experts,
        dims.hidden,
        dims.inter,
        layout,
        seed ^ 0x5EED,
        progress,
    )?;
    let e = dims.experts;
    Ok(match scheme {
        QuantScheme::F32 | QuantScheme::Bf16 | QuantScheme::F16 => {
            Box::new(DenseWeights::new(w13.data, w2.data)?)
        }
        QuantScheme::Fp8Block128 => Box::new(Fp8BlockWeights::new(
            w13.data,
            w13.scales
                .reshape(&[e, dims.n1.div_ceil(128), dims.hidden.div_ceil(128)])?,
            w2.data,
            w2.scales
                .reshape(&[e, dims.hidden.div_ceil(128), dims.inter.div_ceil(128)])?,
        )?),
        QuantScheme::Fp8PerTensor => Box::new(Fp8PerTensorWeights::new(
            w13.data,
            w13.scales.reshape(&[e])?,
            w2.data,
            w2.scales.reshape(&[e])?,
            None,
            None,
        )?),
        QuantScheme::Fp8PerChannel => Box::new(Fp8PerChannelWeights::new(
            w13.data, w13.scales, w2.data, w2.scales,
        )?),
        QuantScheme::Nvfp4 => {
            // Activations are unit variance: an amax of 4 sigma plus margin for GEMM 1's input.
            let a13 = moe_quant::nvfp4_global_scale(6.0)?;
            let a2 = moe_quant::nvfp4_global_scale(NVFP4_A2_AMAX)?;
            Box::new(Nvfp4Weights::new(
                w13.data,
                w13.scales,
                w13.globals,
                w2.data,
                w2.scales,
                w2.globals,
                vec![a13; e],
                vec![a2; e],
                layout,
            )?)
        }
        QuantScheme::Mxfp4 | QuantScheme::Mxfp4A4 | QuantScheme::Mxfp4A8 => Box::new(
            Mxfp4Weights::new(
                w13.data,
                w13.scales
                    .reshape(&[e, dims.n1, dims.hidden / MXFP4_BLOCK])?,
                w2.data,
                w2.scales
                    .reshape(&[e, dims.hidden, dims.inter / MXFP4_BLOCK])?,
            )?
            .with_acts(scheme.mxfp4_acts().unwrap_or_default()),
        ),
    })
}

/// Bytes the weights of `dims` take in `scheme` (data and scales), to check memory first.
pub fn weight_bytes(dims: WeightDims, scheme: QuantScheme) -> usize {
    let one = |r: usize, c: usize| {
        let (dtype, pack, sdtype, per_scale) = storage(scheme, r, c, ScaleLayout::Linear);
        r * (c / pack) * dtype.size() + per_scale * sdtype.size()
    };
    dims.experts * (one(dims.n1, dims.hidden) + one(dims.hidden, dims.inter))
}
