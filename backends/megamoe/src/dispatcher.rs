//! The `megamoe` a2a: checks each batch against the buffers and hands the runner this rank's
//! symmetric buffer; the runner's one launch does the moving.

use moe_dispatch::{A2aBackend, Dispatcher, DispatcherConfig};
use moe_runner_core::{
    downcast_combine, CombineInput, DType, Device, DispatchFormat, DispatchOutput, MoeError,
    Result, Tensor, TopK,
};

use crate::dispatch_output::{MegaMoeCombineInput, MegaMoeDispatchOutput};
use crate::layout::MegaShape;

pub struct MegaMoeDispatcher {
    cfg: DispatcherConfig,
    shape: MegaShape,
    #[cfg(feature = "cuda")]
    pub(crate) rank: Option<crate::gpu::RankHandle>,
}

impl MegaMoeDispatcher {
    /// A single-rank dispatcher for the CPU path.
    pub fn cpu(cfg: &DispatcherConfig) -> Result<Self> {
        cfg.expect_native_wire(crate::A2A)?;
        let shape = MegaShape::of(cfg)?;
        if shape.ranks != 1 {
            return Err(MoeError::Config(
                "the CPU megamoe runs one rank; worlds of several ranks need GPUs (MegaMoeWorld)"
                    .into(),
            ));
        }
        Ok(Self {
            cfg: cfg.clone(),
            shape,
            #[cfg(feature = "cuda")]
            rank: None,
        })
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn gpu(
        cfg: DispatcherConfig,
        shape: MegaShape,
        rank: crate::gpu::RankHandle,
    ) -> Self {
        Self {
            cfg,
            shape,
            rank: Some(rank),
        }
    }

    pub fn shape(&self) -> MegaShape {
        self.shape
    }
}

impl Dispatcher for MegaMoeDispatcher {
    fn name(&self) -> &'static str {
        crate::A2A
    }
    fn format(&self) -> DispatchFormat {
        DispatchFormat::MegaMoe
    }
    fn config(&self) -> &DispatcherConfig {
        &self.cfg
    }

    fn dispatch(&self, hidden: &Tensor, topk: TopK) -> Result<Box<dyn DispatchOutput>> {
        self.cfg.check_batch(crate::A2A, hidden, &topk)?;
        #[cfg(feature = "cuda")]
        let topk = match &self.rank {
            Some(rank) => rank.place_inputs(hidden, topk)?,
            None => {
                hidden.expect_dtype("hidden", &[DType::F32, DType::Bf16])?;
                topk
            }
        };
        #[cfg(not(feature = "cuda"))]
        hidden.expect_dtype("hidden", &[DType::F32, DType::Bf16])?;
        Ok(Box::new(MegaMoeDispatchOutput {
            hidden: hidden.clone(),
            topk,
            shape: self.shape,
            #[cfg(feature = "cuda")]
            rank: self.rank.clone(),
        }))
    }

    fn combine(
        &self,
        output: Box<dyn CombineInput>,
        _dispatched: &dyn DispatchOutput,
    ) -> Result<Tensor> {
        Ok(downcast_combine::<MegaMoeCombineInput>(output, DispatchFormat::MegaMoe)?.hidden)
    }

    fn check(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(rank) = &self.rank {
            return rank.check_errors();
        }
        Ok(())
    }
}

fn make(cfg: &DispatcherConfig, device: &Device) -> Result<Box<dyn Dispatcher>> {
    match device {
        Device::Cpu(_) => Ok(Box::new(MegaMoeDispatcher::cpu(cfg)?)),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let mut v = crate::gpu::MegaMoeWorld::in_process(std::slice::from_ref(dev), cfg)?;
            Ok(Box::new(v.remove(0)))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(MoeError::NoCuda("built without the cuda feature".into())),
    }
}

inventory::submit! {
    A2aBackend {
        name: crate::A2A,
        format: DispatchFormat::MegaMoe,
        description: "MegaMoE: the fused program pre-dispatches and pulls rows over peer memory itself; buffers sized with top_k and intermediate_size",
        make,
    }
}
