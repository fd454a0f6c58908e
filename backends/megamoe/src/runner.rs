//! The `megamoe` runner: the CPU path ([`crate::cpu`]) and the GPU program, registered for the
//! `megamoe` format with MXFP4 weights and FP4 or FP8 activations.

use moe_runner_core::registry::{DeviceKind, FusedFunc, FusedRunner};
use moe_runner_core::{
    downcast_dispatch, downcast_quant, CombineInput, DType, Device, DispatchFormat, DispatchOutput,
    MoeError, MoeRunnerConfig, Mxfp4Weights, QuantInfo, QuantScheme, Result, Tensor,
};

use crate::dispatch_output::{MegaMoeCombineInput, MegaMoeDispatchOutput};
use crate::flags::{resolve, EnvFlags, Resolved};

/// Rejects what the fused program does not do: it always weights and sums the top-k itself.
pub(crate) fn check_config(cfg: &MoeRunnerConfig) -> Result<()> {
    let refuse = |what: &str| {
        Err(MoeError::Config(format!(
            "megamoe does not support {what}: the fused program applies the router weight after the activation and sums the top-k itself"
        )))
    };
    if cfg.no_combine {
        return refuse("no_combine");
    }
    if cfg.apply_router_weight_on_input {
        return refuse("apply_router_weight_on_input");
    }
    if cfg.inplace {
        return refuse("inplace");
    }
    if !cfg.is_gated {
        return refuse("ungated activations");
    }
    cfg.activation_kernel().map(|_| ())
}

/// The switches for these weights, and the weights' sizes checked against the buffers.
pub(crate) fn prepare<'a>(
    cfg: &MoeRunnerConfig,
    input: &'a dyn DispatchOutput,
    quant: &'a dyn QuantInfo,
) -> Result<(&'a MegaMoeDispatchOutput, &'a Mxfp4Weights, Resolved)> {
    let out =
        downcast_dispatch::<MegaMoeDispatchOutput>(input, crate::RUNNER, DispatchFormat::MegaMoe)?;
    let w = downcast_quant::<Mxfp4Weights>(quant)?;
    let flags = resolve(cfg.megamoe, EnvFlags::process()?, quant.scheme())?;
    let d = moe_runner_core::ExpertWeights::dims(w);
    let s = out.shape;
    if cfg.num_local_experts != s.local_experts
        || cfg.num_experts != s.num_experts
        || cfg.hidden_size != s.hidden
        || cfg.intermediate_size != s.inter
    {
        return Err(MoeError::Config(format!(
            "the runner is configured for {} of {} experts, hidden {}, intermediate {}; the megamoe buffers for {} of {}, hidden {}, intermediate {}",
            cfg.num_local_experts, cfg.num_experts, cfg.hidden_size, cfg.intermediate_size,
            s.local_experts, s.num_experts, s.hidden, s.inter
        )));
    }
    if d.experts != s.local_experts
        || d.hidden != s.hidden
        || d.inter != s.inter
        || d.n1 != 2 * d.inter
    {
        return Err(MoeError::invalid(
            "megamoe weights",
            format!(
                "{} experts, hidden {}, intermediate {} (GEMM 1 {} rows); the buffers were sized for {} local experts, hidden {}, intermediate {}, gated",
                d.experts, d.hidden, d.inter, d.n1, s.local_experts, s.hidden, s.inter
            ),
        ));
    }
    Ok((out, w, flags))
}

struct CpuMega {
    cfg: MoeRunnerConfig,
}

impl FusedRunner for CpuMega {
    fn run(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
    ) -> Result<Box<dyn CombineInput>> {
        let (out, w, flags) = prepare(&self.cfg, input, quant)?;
        if out.shape.ranks != 1 {
            return Err(MoeError::Config("the CPU megamoe runs one rank".into()));
        }
        let hidden = out.hidden.to_host()?.to_f32_vec()?;
        let ids = out.topk.ids.to_host()?;
        let tw = out.topk.weights.to_host()?;
        let m = out.topk.num_tokens();
        let y = crate::cpu::forward(
            &hidden,
            ids.as_slice::<i32>()?,
            tw.as_slice::<f32>()?,
            out.topk.top_k(),
            w,
            &self.cfg,
            flags,
        )?;
        Ok(Box::new(MegaMoeCombineInput {
            hidden: Tensor::from_f32(&y, &[m, out.shape.hidden], DType::Bf16)?,
        }))
    }
}

const SCHEMES: &[QuantScheme] = &[QuantScheme::Mxfp4A4, QuantScheme::Mxfp4A8];

inventory::submit! {
    FusedFunc {
        format: DispatchFormat::MegaMoe,
        runner: crate::RUNNER,
        schemes: SCHEMES,
        device: DeviceKind::Cpu,
        priority: 0,
        make: |cfg, _device| {
            check_config(cfg)?;
            Ok(Box::new(CpuMega { cfg: cfg.clone() }))
        },
    }
}

#[cfg(feature = "cuda")]
inventory::submit! {
    FusedFunc {
        format: DispatchFormat::MegaMoe,
        runner: crate::RUNNER,
        schemes: SCHEMES,
        device: DeviceKind::Cuda,
        priority: 10,
        make: |cfg, device: &Device| {
            check_config(cfg)?;
            Ok(Box::new(crate::gpu::GpuMega::new(cfg, device.as_cuda()?)?))
        },
    }
}
