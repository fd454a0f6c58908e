//! The reference expert computation: per local expert, GEMM 1, the activation, GEMM 2, in f32
//! on dequantized weights, with each GEMM's input rounded as the quant scheme rounds it.
//! Experts run in parallel on rayon; each product runs on the `gemm` crate.

use moe_runner_core::registry::{downcast_io, MoeRunnerCore, RunnerIo};
use moe_runner_core::{
    as_expert_weights, ActivationKernel, DType, Device, MoeRunnerConfig, Proj, QuantInfo,
    QuantScheme, Result,
};
use rayon::prelude::*;

use crate::act_quant::{check_widths, per_tensor_scale, round_activations, GemmInput};
use crate::gemm::matmul_nt;
use crate::permute::{ExpertRows, ExpertRowsOut};

pub struct ReferenceCore {
    cfg: MoeRunnerConfig,
    act: ActivationKernel,
}

pub fn make(cfg: &MoeRunnerConfig, _device: &Device) -> Result<Box<dyn MoeRunnerCore>> {
    Ok(Box::new(ReferenceCore {
        cfg: cfg.clone(),
        act: cfg.activation_kernel()?,
    }))
}

/// Splits `buf` into the row blocks of each expert (`offsets` in rows, `width` values a row).
fn split_experts<'a>(
    mut buf: &'a mut [f32],
    offsets: &[usize],
    width: usize,
) -> Vec<&'a mut [f32]> {
    let mut parts = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let (head, tail) = buf.split_at_mut((w[1] - w[0]) * width);
        parts.push(head);
        buf = tail;
    }
    parts
}

/// GEMM outputs are stored in the activation dtype between the stages (as the GPU kernels
/// store their intermediate caches), so the reference rounds them the same way.
fn round_to(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::Bf16 => v
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        DType::F16 => v
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        _ => {}
    }
}

fn amax(x: &[f32]) -> f32 {
    x.par_iter()
        .fold(|| 0f32, |m, v| m.max(v.abs()))
        .reduce(|| 0f32, f32::max)
}

impl MoeRunnerCore for ReferenceCore {
    fn run(&self, input: RunnerIo, quant: &dyn QuantInfo) -> Result<RunnerIo> {
        let rows = downcast_io::<ExpertRows>(input, "reference core")?;
        let ExpertRows {
            mut hidden,
            offsets,
            dest,
            out_dtype,
        } = *rows;
        let weights = as_expert_weights(quant)?;
        weights.dims().check(&self.cfg)?;
        let scheme: QuantScheme = quant.scheme();
        let (h, n1, inter) = (
            self.cfg.hidden_size,
            self.cfg.gemm1_columns(),
            self.cfg.intermediate_size,
        );
        check_widths(scheme, h, inter)?;
        let total = dest.len();

        // GEMM 1 and the activation, expert by expert.
        let s1 = if scheme == QuantScheme::Fp8PerTensor {
            per_tensor_scale(quant, GemmInput::One, amax(&hidden))?
        } else {
            1.0
        };
        let mut mid = vec![0f32; total * inter];
        split_experts(&mut hidden, &offsets, h)
            .into_par_iter()
            .zip(split_experts(&mut mid, &offsets, inter))
            .enumerate()
            .filter(|(_, (x, _))| !x.is_empty())
            .try_for_each(|(e, (x, a))| -> Result<()> {
                let n = x.len() / h;
                round_activations(scheme, quant, GemmInput::One, e, x, h, s1)?;
                let mut w = vec![0f32; n1 * h];
                weights.dequantize_expert(Proj::W13, e, &mut w)?;
                let mut g = vec![0f32; n * n1];
                matmul_nt(x, &w, &mut g, n, n1, h);
                round_to(out_dtype, &mut g);
                self.act.apply_rows(self.cfg.gate_up, &g, a, inter);
                Ok(())
            })?;
        drop(hidden);

        // GEMM 2 on the (requantized) intermediate.
        let s2 = if scheme == QuantScheme::Fp8PerTensor {
            per_tensor_scale(quant, GemmInput::Two, amax(&mid))?
        } else {
            1.0
        };
        let mut out = vec![0f32; total * h];
        split_experts(&mut mid, &offsets, inter)
            .into_par_iter()
            .zip(split_experts(&mut out, &offsets, h))
            .enumerate()
            .filter(|(_, (a, _))| !a.is_empty())
            .try_for_each(|(e, (a, y))| -> Result<()> {
                let n = a.len() / inter;
                round_activations(scheme, quant, GemmInput::Two, e, a, inter, s2)?;
                let mut w = vec![0f32; h * inter];
                weights.dequantize_expert(Proj::W2, e, &mut w)?;
                matmul_nt(a, &w, y, n, h, inter);
                round_to(out_dtype, y);
                Ok(())
            })?;
        Ok(Box::new(ExpertRowsOut {
            out,
            dest,
            out_dtype,
        }))
    }
}
