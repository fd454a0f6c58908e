//! Random weights generated directly in GPU memory, for benchmarks and the tuner at model
//! sizes (DeepSeek-V3's bf16 experts are 22 GB; the host would take minutes to make them).

use moe_runner_core::cuda::fill_uniform;
use moe_runner_core::{
    CudaDevice, DType, DenseWeights, Fp8BlockWeights, Fp8PerChannelWeights, Fp8PerTensorWeights,
    Nvfp4Weights, QuantInfo, QuantScheme, Result, ScaleLayout, Tensor, WeightDims, FP8_BLOCK,
};

/// Weights of `dims` in `scheme` on `dev`: values uniform with unit-variance products, scales
/// positive and near 1 / sqrt(fan_in) so outputs stay O(1).
pub fn device_weights(
    dev: &CudaDevice,
    dims: WeightDims,
    scheme: QuantScheme,
    seed: u64,
) -> Result<Box<dyn QuantInfo>> {
    let e = dims.experts;
    let mk = |shape: &[usize], dtype: DType, lo: f32, hi: f32, s: u64| -> Result<Tensor> {
        let t = Tensor::zeros_cuda(dev, shape, dtype)?;
        fill_uniform(dev, &t, lo, hi, seed.wrapping_mul(31).wrapping_add(s))?;
        Ok(t)
    };
    let dense = |dtype: DType| -> Result<Box<dyn QuantInfo>> {
        let a13 = (3.0 / dims.hidden as f32).sqrt();
        let a2 = (3.0 / dims.inter as f32).sqrt();
        Ok(Box::new(DenseWeights::new(
            mk(&[e, dims.n1, dims.hidden], dtype, -a13, a13, 1)?,
            mk(&[e, dims.hidden, dims.inter], dtype, -a2, a2, 2)?,
        )?))
    };
    // e4m3 codes spread over [-256, 256]; scales bring the products back to O(1).
    let fp8 = |shape: &[usize], s: u64| mk(shape, DType::F8E4M3, -256.0, 256.0, s);
    let scale = |shape: &[usize], fan_in: usize, s: u64| {
        let c = (3.0f32 / fan_in as f32).sqrt() / 256.0;
        mk(shape, DType::F32, 0.5 * c, 1.5 * c, s)
    };
    let (n1, h, i) = (dims.n1, dims.hidden, dims.inter);
    Ok(match scheme {
        QuantScheme::Bf16 => dense(DType::Bf16)?,
        QuantScheme::F16 => dense(DType::F16)?,
        QuantScheme::F32 => dense(DType::F32)?,
        QuantScheme::Fp8Block128 => Box::new(Fp8BlockWeights::new(
            fp8(&[e, n1, h], 3)?,
            scale(
                &[e, n1.div_ceil(FP8_BLOCK.0), h.div_ceil(FP8_BLOCK.1)],
                h,
                4,
            )?,
            fp8(&[e, h, i], 5)?,
            scale(&[e, h.div_ceil(FP8_BLOCK.0), i.div_ceil(FP8_BLOCK.1)], i, 6)?,
        )?),
        QuantScheme::Fp8PerTensor => Box::new(Fp8PerTensorWeights::new(
            fp8(&[e, n1, h], 3)?,
            scale(&[e], h, 4)?,
            fp8(&[e, h, i], 5)?,
            scale(&[e], i, 6)?,
            None,
            None,
        )?),
        QuantScheme::Fp8PerChannel => Box::new(Fp8PerChannelWeights::new(
            fp8(&[e, n1, h], 3)?,
            scale(&[e, n1], h, 4)?,
            fp8(&[e, h, i], 5)?,
            scale(&[e, h], i, 6)?,
        )?),
        QuantScheme::Nvfp4 => {
            // Random bytes are random pairs of E2M1 codes (every nibble is a code); block scales
            // near sqrt(3 / fan_in) / 3 keep the products O(1) (|E2M1| averages about 2.6).
            let codes = |shape: &[usize], s: u64| fp8(shape, s)?.cuda_view(0, shape, DType::E2M1x2);
            let sf = |rows: usize, cols: usize, s: u64| {
                let c = (3.0f32 / cols as f32).sqrt() / 3.0;
                let len = moe_quant::swizzled_len(rows, cols / moe_runner_core::NVFP4_BLOCK);
                mk(&[e, len], DType::F8E4M3, 0.5 * c, 1.5 * c, s)
            };
            let a = moe_quant::nvfp4_global_scale(6.0)?;
            Box::new(Nvfp4Weights::new(
                codes(&[e, n1, h / 2], 3)?,
                sf(n1, h, 4)?,
                vec![1.0; e],
                codes(&[e, h, i / 2], 5)?,
                sf(h, i, 6)?,
                vec![1.0; e],
                vec![a; e],
                vec![a; e],
                ScaleLayout::Swizzled128x4,
            )?)
        }
        QuantScheme::Mxfp4 | QuantScheme::Mxfp4A4 | QuantScheme::Mxfp4A8 => {
            // Random bytes are random pairs of E2M1 codes; UE8M0 scales near sqrt(3 / fan_in)
            // / 3, drawn as E4M3 values whose bytes are the exponents wanted (+-1).
            let codes = |shape: &[usize], s: u64| fp8(shape, s)?.cuda_view(0, shape, DType::E2M1x2);
            let sf = |rows: usize, cols: usize, s: u64| -> Result<Tensor> {
                let want = 127.0 + ((3.0f32 / cols as f32).sqrt() / 3.0).log2();
                let b = want.round().clamp(2.0, 125.0) as u8;
                let shape = [e, rows, cols / moe_runner_core::MXFP4_BLOCK];
                let t = mk(
                    &shape,
                    DType::F8E4M3,
                    moe_quant::e4m3_to_f32(b - 1),
                    moe_quant::e4m3_to_f32(b + 1),
                    s,
                )?;
                t.cuda_view(0, &shape, DType::Ue8m0)
            };
            Box::new(
                moe_runner_core::Mxfp4Weights::new(
                    codes(&[e, n1, h / 2], 3)?,
                    sf(n1, h, 4)?,
                    codes(&[e, h, i / 2], 5)?,
                    sf(h, i, 6)?,
                )?
                .with_acts(scheme.mxfp4_acts().unwrap_or_default()),
            )
        }
    })
}
