//! The all-to-all kernels (`kernels/ll.cu`, and `kernels/ll_nccl.cu` for the NCCL transport),
//! compiled per (wire format, activation dtype).

use moe_backend_triton::kernels::{COMMON, FP4};
use moe_backend_triton::stages::Arg;
use moe_dispatch::Wire;
use moe_runner_core::cuda::compile_module;
use moe_runner_core::cuda::cudarc::driver::{CudaFunction, DeviceRepr, LaunchArgs, PushKernelArg};
use moe_runner_core::{CudaDevice, MoeError, Result};

use crate::layout::LlLayout;

const LL: &str = include_str!("kernels/ll.cu");
const LL_NCCL: &str = include_str!("kernels/ll_nccl.cu");

// SAFETY: `LlLayout` is `repr(C)` plain data mirroring the CUDA struct of the same name.
unsafe impl DeviceRepr for LlLayout {}

impl Arg for LlLayout {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

pub struct LlKernels {
    pub route: CudaFunction,
    pub dispatch_send: CudaFunction,
    pub dispatch_recv: CudaFunction,
    pub combine: CudaFunction,
    /// The NCCL transport's packing around its exchanges (`kernels/ll_nccl.cu`).
    pub nccl_pack: CudaFunction,
    pub nccl_unpack: CudaFunction,
    pub nccl_combine_pack: CudaFunction,
    pub nccl_combine_sum: CudaFunction,
    /// Blocks of `combine` one SM holds at once (the fused launch must be fully resident).
    pub combine_per_sm: usize,
}

impl LlKernels {
    pub fn new(dev: &CudaDevice, wire: Wire, act_f16: bool) -> Result<Self> {
        let fp8 = match wire {
            Wire::Native => 0,
            Wire::Fp8 => 1,
            Wire::Fp8Ue8m0 => 2,
            Wire::Nvfp4 => 3,
        };
        let module = compile_module(
            dev,
            "deepep_ll",
            &format!("{COMMON}\n{FP4}\n{LL}\n{LL_NCCL}"),
            &[
                ("FP8", fp8.to_string()),
                ("ACT_F16", u8::from(act_f16).to_string()),
            ],
        )?;
        let load = |name: &str| {
            module.load_function(name).map_err(|e| MoeError::Kernel {
                name: name.into(),
                log: e.to_string(),
            })
        };
        Ok(Self {
            route: load("ll_route")?,
            dispatch_send: load("ll_dispatch_send")?,
            dispatch_recv: load("ll_dispatch_recv")?,
            combine_per_sm: load("ll_combine")?
                .occupancy_max_active_blocks_per_multiprocessor(256, 0, None)
                .map_err(|e| MoeError::Device(e.to_string()))? as usize,
            combine: load("ll_combine")?,
            nccl_pack: load("ll_nccl_pack")?,
            nccl_unpack: load("ll_nccl_unpack")?,
            nccl_combine_pack: load("ll_nccl_combine_pack")?,
            nccl_combine_sum: load("ll_nccl_combine_sum")?,
        })
    }
}
