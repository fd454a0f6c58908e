//! The GPU runner: compiles the program for the switches in force (once per switch pair),
//! repacks the weights once, and launches the layer.

use moe_backend_triton::stages::act_params;
use moe_runner_core::registry::FusedRunner;
use moe_runner_core::{
    CombineInput, CudaDevice, DType, DispatchOutput, MoeError, MoeRunnerConfig, QuantInfo, Result,
    Tensor,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::program::{MegaParams, Program, Tiling};
use super::weights::PackedWeights;
use crate::dispatch_output::MegaMoeCombineInput;
use crate::flags::Resolved;
use crate::runner::prepare;

pub(crate) struct GpuMega {
    cfg: MoeRunnerConfig,
    dev: CudaDevice,
    act: (u8, f32, f32),
    programs: Mutex<HashMap<(Resolved, Tiling, usize), Arc<Program>>>,
    packed: Mutex<Option<Arc<PackedWeights>>>,
}

impl GpuMega {
    pub fn new(cfg: &MoeRunnerConfig, dev: &CudaDevice) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            dev: dev.clone(),
            act: act_params(cfg.activation_kernel()?),
            programs: Mutex::new(HashMap::new()),
            packed: Mutex::new(None),
        })
    }

    /// The program for these switches and tiling, its shared memory sized for
    /// `local_experts` (the buffers' count, which the kernel reads).
    fn program(
        &self,
        flags: Resolved,
        tiling: Tiling,
        local_experts: usize,
    ) -> Result<Arc<Program>> {
        let mut map = self
            .programs
            .lock()
            .map_err(|_| MoeError::Device("megamoe program cache poisoned".into()))?;
        if let Some(p) = map.get(&(flags, tiling, local_experts)) {
            return Ok(p.clone());
        }
        let p = Arc::new(Program::new(
            &self.dev,
            flags,
            tiling,
            self.act.0,
            self.cfg.gate_up,
            local_experts,
        )?);
        map.insert((flags, tiling, local_experts), p.clone());
        Ok(p)
    }

    fn packed(
        &self,
        program: &Program,
        w: &moe_runner_core::Mxfp4Weights,
    ) -> Result<Arc<PackedWeights>> {
        let mut slot = self
            .packed
            .lock()
            .map_err(|_| MoeError::Device("megamoe weight cache poisoned".into()))?;
        let source = PackedWeights::source_of(w)?;
        if let Some(p) = slot.as_ref().filter(|p| p.source == source) {
            return Ok(p.clone());
        }
        let p = Arc::new(PackedWeights::pack(&self.dev, program, w)?);
        *slot = Some(p.clone());
        Ok(p)
    }

    /// Runs the layer into `dst` (`[m, H]` bf16 on this GPU).
    fn run_to(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
        dst: &Tensor,
    ) -> Result<()> {
        let (out, w, flags) = prepare(&self.cfg, input, quant)?;
        let m = out.topk.num_tokens();
        dst.expect_dtype("out", &[DType::Bf16])?;
        dst.expect_shape("out", &[m, out.shape.hidden])?;
        if dst.cuda_ptr()? % 16 != 0 {
            return Err(MoeError::invalid(
                "out",
                "device address must be 16-byte aligned",
            ));
        }
        let rank = out.rank.as_ref().ok_or_else(|| {
            MoeError::Device(
                "this megamoe dispatch output has no GPU buffers: dispatch with the megamoe a2a on this GPU"
                    .into(),
            )
        })?;
        let ordinal = rank.mem().dev.context().ordinal();
        if ordinal != self.dev.context().ordinal() {
            return Err(MoeError::invalid(
                "dispatch output",
                format!(
                    "its buffers are on GPU {ordinal}, this runner on GPU {}",
                    self.dev.context().ordinal()
                ),
            ));
        }
        // The program reads the batch and writes the buffers in the order of one stream: the
        // dispatcher's (the engine's) must be the runner's.
        if rank.mem().dev.stream().cu_stream() != self.dev.stream().cu_stream() {
            return Err(MoeError::invalid(
                "dispatch output",
                "the megamoe dispatcher and runner must be built on the same device handle (one stream)",
            ));
        }
        for (what, t) in [
            ("out", dst),
            ("w13", &w.w13),
            ("w13_scale", &w.w13_scale),
            ("w2", &w.w2),
            ("w2_scale", &w.w2_scale),
        ] {
            if t.cuda_device().map(|d| d.context().ordinal()) != Some(ordinal) {
                return Err(MoeError::invalid(
                    what,
                    format!(
                        "must be on GPU {ordinal} (this rank's), got {}",
                        t.location()
                    ),
                ));
            }
        }
        let s = out.shape;
        // Rows an expert gets if every rank sends this many tokens.
        let expected = out.topk.num_tokens() * s.ranks * s.top_k / s.num_experts.max(1);
        let tiling = if expected <= 4 {
            Tiling::DECODE
        } else {
            Tiling::BATCH
        };
        let program = self.program(flags, tiling, s.local_experts)?;
        let packed = self.packed(&program, w)?;
        let (_, limit, alpha) = self.act;
        let p = MegaParams::new(rank, out, dst)?.with_weights(
            &packed,
            limit,
            alpha,
            self.cfg.routed_scaling_factor.unwrap_or(1.0),
        )?;
        program.launch(&self.dev, &p)
    }
}

impl FusedRunner for GpuMega {
    fn run(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
    ) -> Result<Box<dyn CombineInput>> {
        let m = input.num_tokens();
        let dst = Tensor::zeros_cuda(&self.dev, &[m, input.hidden_size()], DType::Bf16)?;
        self.run_to(input, quant, &dst)?;
        Ok(Box::new(MegaMoeCombineInput { hidden: dst }))
    }

    fn run_into(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
        out: &Tensor,
    ) -> Result<()> {
        self.run_to(input, quant, out)
    }
}
