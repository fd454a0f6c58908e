//! Timing of one MoE layer on the GPU for `moe bench` and `moe tune`: random device weights,
//! several routings per batch (so repeated replays do not find the same experts in L2), one
//! CUDA graph of all of them, median of its replays over the routings.

use crate::error::Result;
use moe_backend_triton::TritonRunner;
use moe_conformance::{synthetic, synthetic_gpu};
use moe_runner_core::cuda::{fill_uniform, time_graph_ms};
use moe_runner_core::{
    CudaDevice, DType, Device, MoeRunner, MoeRunnerConfig, QuantInfo, QuantScheme,
    StandardDispatchOutput, Tensor, TopK, WeightDims,
};

/// One layer shape to time.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerShape {
    pub name: String,
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub inter: usize,
    pub scheme: QuantScheme,
    /// The activation clamp of the model (DeepSeek-V4: 10), part of what is timed.
    pub swiglu_limit: Option<f32>,
}

impl LayerShape {
    pub fn config(&self) -> MoeRunnerConfig {
        {
            let mut cfg = MoeRunnerConfig::new(self.experts, self.hidden, self.inter, self.top_k);
            cfg.swiglu_limit = self.swiglu_limit;
            cfg
        }
    }

    pub fn dims(&self) -> WeightDims {
        WeightDims {
            experts: self.experts,
            n1: 2 * self.inter,
            hidden: self.hidden,
            inter: self.inter,
        }
    }

    /// Bytes of one expert's weights (both projections, with their scales).
    pub fn expert_bytes(&self) -> f64 {
        let (n1, h, i) = (2 * self.inter, self.hidden, self.inter);
        let elems = (n1 * h + h * i) as f64;
        match self.scheme {
            QuantScheme::Fp8Block128 => {
                elems
                    + 4.0
                        * ((n1.div_ceil(128) * h.div_ceil(128) + h.div_ceil(128) * i.div_ceil(128))
                            as f64)
            }
            QuantScheme::Fp8PerTensor => elems + 8.0,
            QuantScheme::Fp8PerChannel => elems + 4.0 * (n1 + h) as f64,
            QuantScheme::F32 => 4.0 * elems,
            _ => 2.0 * elems,
        }
    }

    pub fn is_fp8(&self) -> bool {
        matches!(
            self.scheme,
            QuantScheme::Fp8Block128 | QuantScheme::Fp8PerTensor | QuantScheme::Fp8PerChannel
        )
    }
}

/// A shape's weights on the GPU and a runner for it.
pub struct GpuLayer {
    pub shape: LayerShape,
    pub dev: CudaDevice,
    pub runner: TritonRunner,
    pub quant: Box<dyn QuantInfo>,
}

/// Inputs of one batch size: the activations and `R` routings, all on the device.
pub struct Batch {
    pub m: usize,
    pub hidden: Tensor,
    pub routings: Vec<TopK>,
    pub out: Tensor,
    /// Average distinct experts hit per routing.
    pub distinct_experts: f64,
}

impl GpuLayer {
    pub fn new(shape: LayerShape, device: &Device, seed: u64) -> Result<Self> {
        let dev = device.as_cuda()?.clone();
        let quant = synthetic_gpu::device_weights(&dev, shape.dims(), shape.scheme, seed)?;
        let runner = TritonRunner::new(&shape.config(), device)?;
        Ok(Self {
            shape,
            dev,
            runner,
            quant,
        })
    }

    pub fn batch(&self, m: usize, routings: usize, seed: u64) -> Result<Batch> {
        let device = Device::Cuda(self.dev.clone());
        let hidden = Tensor::zeros_cuda(&self.dev, &[m, self.shape.hidden], DType::Bf16)?;
        fill_uniform(&self.dev, &hidden, -1.7, 1.7, seed)?;
        let mut distinct = 0usize;
        let mut list = Vec::with_capacity(routings);
        for r in 0..routings {
            let t = synthetic::topk(
                m,
                self.shape.top_k,
                self.shape.experts,
                seed + 1 + r as u64,
                false,
                false,
            )?;
            let mut seen = vec![false; self.shape.experts];
            for &id in t.ids.as_slice::<i32>()? {
                seen[id as usize] = true;
            }
            distinct += seen.iter().filter(|&&s| s).count();
            list.push(t.to_device(&device)?);
        }
        let out = Tensor::zeros_cuda(&self.dev, &[m, self.shape.hidden], DType::Bf16)?;
        Ok(Batch {
            m,
            hidden,
            routings: list,
            out,
            distinct_experts: distinct as f64 / routings.max(1) as f64,
        })
    }

    /// Median milliseconds of one layer over graph replays of every routing of `batch`.
    pub fn time_ms(&self, batch: &Batch, warmup: usize, iters: usize) -> Result<f64> {
        self.time_with(batch, warmup, iters, |input, out| {
            self.runner.run_into(input, self.quant.as_ref(), out)
        })
    }

    /// As [`Self::time_ms`], through a runner resolved from the registry (an explicit path or
    /// `auto`), on the same weights.
    pub fn time_runner_ms(
        &self,
        runner: &MoeRunner,
        batch: &Batch,
        warmup: usize,
        iters: usize,
    ) -> Result<f64> {
        self.time_with(batch, warmup, iters, |input, out| {
            runner.run_into(input, self.quant.as_ref(), out)
        })
    }

    fn time_with(
        &self,
        batch: &Batch,
        warmup: usize,
        iters: usize,
        run: impl Fn(&StandardDispatchOutput, &Tensor) -> moe_runner_core::Result<()>,
    ) -> Result<f64> {
        let inputs: Vec<StandardDispatchOutput> = batch
            .routings
            .iter()
            .map(|t| -> Result<StandardDispatchOutput> {
                Ok(StandardDispatchOutput {
                    hidden: batch.hidden.clone(),
                    hidden_scale: None,
                    topk: TopK::new(t.ids.clone(), t.weights.clone())?,
                })
            })
            .collect::<Result<_>>()?;
        // Eager pass first: compiles the kernels and sizes the workspace outside the capture.
        for input in &inputs {
            run(input, &batch.out)?;
        }
        let mut times = time_graph_ms(&self.dev, warmup, iters, || {
            for input in &inputs {
                run(input, &batch.out)?;
            }
            Ok(())
        })?;
        times.sort_by(f32::total_cmp);
        Ok(times[times.len() / 2] as f64 / inputs.len() as f64)
    }
}
