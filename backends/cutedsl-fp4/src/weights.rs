//! NVFP4 weights in the layout the kernels read: block scales in the 128x4 swizzled layout.
//! Checkpoints (ModelOpt) store them row-major; this rearranges them once, at load.

use moe_runner_core::{DType, Device, Nvfp4Weights, Result, ScaleLayout, Tensor};

/// `w` with its block scales swizzled (unchanged when they already are), on `w`'s device, its
/// products taken as `w`'s.
pub fn kernel_layout(w: &Nvfp4Weights) -> Result<Nvfp4Weights> {
    if w.scale_layout == ScaleLayout::Swizzled128x4 {
        return Ok(w.clone());
    }
    let [e, n1, h2] = w.w13.dims::<3>("w13")?;
    let [_, h, i2] = w.w2.dims::<3>("w2")?;
    let swizzle = |t: &Tensor, rows: usize, cols: usize| -> Result<Tensor> {
        let k_sf = cols / moe_runner_core::NVFP4_BLOCK;
        let per = rows * k_sf;
        t.expect_shape("linear NVFP4 scales", &[e, per])?;
        let host = t.to_host()?;
        let bytes = host.host_bytes()?;
        let mut out = Vec::with_capacity(e * moe_quant::swizzled_len(rows, k_sf));
        for chunk in bytes.chunks_exact(per.max(1)).take(e) {
            out.extend(moe_quant::swizzle_scales_128x4(chunk, rows, k_sf)?);
        }
        let len = moe_quant::swizzled_len(rows, k_sf);
        let t = Tensor::from_slice(&out, &[e, len], DType::F8E4M3)?;
        match w.w13.cuda_device() {
            Some(d) => t.to_device(&Device::Cuda(d.clone())),
            None => Ok(t),
        }
    };
    Nvfp4Weights::new(
        w.w13.clone(),
        swizzle(&w.w13_scale, n1, 2 * h2)?,
        w.w13_global.clone(),
        w.w2.clone(),
        swizzle(&w.w2_scale, h, 2 * i2)?,
        w.w2_global.clone(),
        w.a13_global.clone(),
        w.a2_global.clone(),
        ScaleLayout::Swizzled128x4,
    )
    .map(|k| k.with_products(w.products))
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_runner_core::{DenseWeights, Nvfp4Products, WeightDims};

    #[test]
    fn the_kernel_layout_keeps_the_products_choice() {
        let dims = WeightDims {
            experts: 2,
            n1: 64,
            hidden: 32,
            inter: 32,
        };
        let w13: Vec<f32> = (0..2 * 64 * 32)
            .map(|i| ((i * 7) % 13) as f32 - 6.0)
            .collect();
        let w2: Vec<f32> = (0..2 * 32 * 32)
            .map(|i| ((i * 5) % 11) as f32 - 5.0)
            .collect();
        let dense = DenseWeights::from_f32(&w13, &w2, dims, DType::F32).unwrap();
        for layout in [ScaleLayout::Linear, ScaleLayout::Swizzled128x4] {
            let w = Nvfp4Weights::quantize(&dense, vec![1.0; 2], vec![1.0; 2], layout)
                .unwrap()
                .with_products(Nvfp4Products::E4m3);
            let k = kernel_layout(&w).unwrap();
            assert_eq!(k.scale_layout, ScaleLayout::Swizzled128x4);
            assert_eq!(k.products, Nvfp4Products::E4m3, "{layout:?}");
        }
    }
}
