//! How each quant scheme rounds the activations a GEMM reads. The reference applies the same
//! rounding a GPU kernel does (quantize, then compute on the dequantized values), so a kernel is
//! compared against a reference that quantizes exactly the same way.

use half::{bf16, f16};
use moe_quant::{quantize_fp8_groups, quantize_nvfp4, ScaleFormat};
use moe_runner_core::{
    downcast_quant, Fp8PerTensorWeights, MoeError, Nvfp4Weights, QuantInfo, QuantScheme, Result,
    MXFP4_BLOCK,
};

/// Which GEMM's input is being rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmInput {
    One,
    Two,
}

/// Group size of FP8 block activations (DeepSeek-V3: 1x128).
pub const FP8_ACT_GROUP: usize = 128;

/// Checks that the scheme's activation groups divide the widths both GEMMs read.
pub fn check_widths(scheme: QuantScheme, hidden: usize, inter: usize) -> Result<()> {
    let group = match scheme {
        QuantScheme::Fp8Block128 => FP8_ACT_GROUP,
        QuantScheme::Nvfp4 => moe_runner_core::NVFP4_BLOCK,
        QuantScheme::Mxfp4 | QuantScheme::Mxfp4A4 | QuantScheme::Mxfp4A8 => {
            moe_runner_core::MXFP4_BLOCK
        }
        _ => return Ok(()),
    };
    for (what, v) in [("hidden_size", hidden), ("intermediate_size", inter)] {
        if v % group != 0 {
            return Err(MoeError::NotDivisible {
                what: format!("{what} for {scheme}"),
                value: v,
                divisor: group,
            });
        }
    }
    Ok(())
}

/// A per-tensor scale shared by all rows of one GEMM input: the static scale when the weights
/// carry one, otherwise the dynamic amax of the whole input (computed by the caller over every
/// expert's rows, as a per-tensor kernel does over its whole activation buffer).
pub fn per_tensor_scale(quant: &dyn QuantInfo, which: GemmInput, amax: f32) -> Result<f32> {
    let w = downcast_quant::<Fp8PerTensorWeights>(quant)?;
    let fixed = match which {
        GemmInput::One => w.a13_scale,
        GemmInput::Two => w.a2_scale,
    };
    Ok(fixed.unwrap_or(amax.max(1e-4) / moe_quant::E4M3_MAX))
}

/// Rounds `x` (`rows x cols`, rows of expert `expert`) the way `scheme` feeds it to a GEMM.
/// `tensor_scale` is used by the per-tensor scheme only.
pub fn round_activations(
    scheme: QuantScheme,
    quant: &dyn QuantInfo,
    which: GemmInput,
    expert: usize,
    x: &mut [f32],
    cols: usize,
    tensor_scale: f32,
) -> Result<()> {
    if x.is_empty() {
        return Ok(());
    }
    let rows = x.len() / cols;
    match scheme {
        QuantScheme::F32 => {}
        QuantScheme::Bf16 | QuantScheme::Mxfp4 => {
            x.iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32())
        }
        QuantScheme::F16 => x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32()),
        QuantScheme::Fp8Block128 => {
            let q = quantize_fp8_groups(x, rows, cols, FP8_ACT_GROUP, ScaleFormat::F32)?;
            x.copy_from_slice(&q.dequantize());
        }
        QuantScheme::Fp8PerChannel => {
            let q = quantize_fp8_groups(x, rows, cols, cols, ScaleFormat::F32)?;
            x.copy_from_slice(&q.dequantize());
        }
        QuantScheme::Fp8PerTensor => {
            for v in x.iter_mut() {
                *v = moe_quant::e4m3_to_f32(moe_quant::e4m3_from_f32(*v / tensor_scale))
                    * tensor_scale;
            }
        }
        QuantScheme::Mxfp4A4 => {
            let q = moe_quant::quantize_mxfp4(x, rows, cols)?;
            let mut out = vec![0f32; x.len()];
            moe_quant::dequantize_mxfp4_into(&q.packed, &q.scales, rows, cols, &mut out)?;
            x.copy_from_slice(&out);
        }
        QuantScheme::Mxfp4A8 => {
            let q = quantize_fp8_groups(x, rows, cols, MXFP4_BLOCK, ScaleFormat::Ue8m0)?;
            x.copy_from_slice(&q.dequantize());
        }
        QuantScheme::Nvfp4 => {
            let w = downcast_quant::<Nvfp4Weights>(quant)?;
            let gs = match which {
                GemmInput::One => w.a13_global[expert],
                GemmInput::Two => w.a2_global[expert],
            };
            let q = quantize_nvfp4(x, rows, cols, gs)?;
            x.copy_from_slice(&q.dequantize_products(w.products));
        }
    }
    Ok(())
}
