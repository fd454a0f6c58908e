//! The standard dispatcher: tokens stay where they are; under expert parallelism each rank maps
//! global expert ids to its local ids and marks the others -1, computes its partial sum, and the
//! engine all-reduces the partial sums across ranks (as it does for tensor parallelism).

use moe_runner_core::{
    downcast_combine, CombineInput, DType, DispatchFormat, DispatchOutput, Result,
    StandardCombineInput, StandardDispatchOutput, Tensor, TopK,
};

use crate::dispatcher::{A2aBackend, Dispatcher, DispatcherConfig};

pub struct StandardDispatcher {
    cfg: DispatcherConfig,
}

impl StandardDispatcher {
    pub fn new(cfg: DispatcherConfig) -> Result<Self> {
        cfg.validate()?;
        cfg.expect_native_wire("standard")?;
        Ok(Self { cfg })
    }
}

/// Maps global expert ids to this rank's local ids; experts of other ranks become -1.
pub fn to_local_ids(ids: &[i32], first: usize, local: usize) -> Vec<i32> {
    ids.iter()
        .map(|&id| {
            let rel = id as i64 - first as i64;
            if id >= 0 && (0..local as i64).contains(&rel) {
                rel as i32
            } else {
                -1
            }
        })
        .collect()
}

impl Dispatcher for StandardDispatcher {
    fn name(&self) -> &'static str {
        "standard"
    }
    fn format(&self) -> DispatchFormat {
        DispatchFormat::Standard
    }
    fn config(&self) -> &DispatcherConfig {
        &self.cfg
    }

    fn dispatch(&self, hidden: &Tensor, topk: TopK) -> Result<Box<dyn DispatchOutput>> {
        let _span = tracing::debug_span!("dispatch.standard").entered();
        let m = self.cfg.check_batch("standard dispatcher", hidden, &topk)?;
        let k = topk.top_k();
        let topk = if self.cfg.world_size == 1 {
            topk
        } else {
            let local = to_local_ids(
                topk.ids.as_slice::<i32>()?,
                self.cfg.first_local_expert(),
                self.cfg.num_local_experts,
            );
            TopK::new(
                Tensor::from_slice(&local, &[m, k], DType::I32)?,
                topk.weights,
            )?
        };
        // Routing computed on the host follows the activations to their GPU.
        #[cfg(feature = "cuda")]
        let topk = match hidden.cuda_device() {
            Some(dev) if topk.ids.is_host() => {
                topk.to_device(&moe_runner_core::Device::Cuda(dev.clone()))?
            }
            _ => topk,
        };
        Ok(Box::new(StandardDispatchOutput {
            hidden: hidden.clone(),
            hidden_scale: None,
            topk,
        }))
    }

    fn combine(
        &self,
        output: Box<dyn CombineInput>,
        _dispatched: &dyn DispatchOutput,
    ) -> Result<Tensor> {
        Ok(downcast_combine::<StandardCombineInput>(output, DispatchFormat::Standard)?.hidden)
    }
}

inventory::submit! {
    A2aBackend {
        name: "standard",
        format: DispatchFormat::Standard,
        description: "tokens in place; local-expert mapping under expert parallelism, partial sums all-reduced by the engine",
        make: |cfg, _device| Ok(Box::new(StandardDispatcher::new(cfg.clone())?)),
    }
}
