//! Core of the MoE runner: tensors and devices, the dispatch-output / combine-input / quant-info
//! traits and their per-format types, the runner configuration, and the registries that backend
//! crates fill with `inventory` so a new (format, runner) combination plugs in without editing
//! this crate.

pub mod activation;
mod combine_input;
mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod dispatch_output;
mod dtype;
mod error;
mod format;
mod quant_info;
mod quant_scheme;
pub mod registry;
mod runner;
mod shared_experts;
mod tensor;

pub use activation::{ActivationKernel, ActivationOp};
pub use combine_input::{
    downcast_combine, CombineInput, DeepEpLlCombineInput, StandardCombineInput,
};
pub use config::{Activation, GateUpLayout, MegaMoeFlags, MoeRunnerConfig};
pub use device::{CpuDevice, CudaDevice, Device, DeviceOps};
pub use dispatch_output::{
    downcast_dispatch, DeepEpLlDispatchOutput, DispatchOutput, StandardDispatchOutput, TopK,
};
pub use dtype::{DType, Element};
pub use error::{MoeError, Result};
pub use format::DispatchFormat;
/// How NVFP4 values enter the products (exact in f16, or rounded to E4M3 for the FP8 tensor
/// cores): a choice of the NVFP4 weights, which the reference follows too.
pub use moe_quant::Nvfp4Products;
pub use quant_info::{
    as_expert_weights, downcast_quant, quant_to_device, DenseWeights, ExpertWeights,
    Fp8BlockWeights, Fp8PerChannelWeights, Fp8PerTensorWeights, Mxfp4Weights, Nvfp4Weights, Proj,
    QuantInfo, ScaleLayout, WeightDims, FP8_BLOCK, MXFP4_BLOCK, NVFP4_BLOCK,
};
pub use quant_scheme::{scheme_list, Mxfp4Acts, QuantScheme};
pub use registry::{DeviceKind, PathInfo, PathKind};
pub use runner::MoeRunner;
pub use shared_experts::SharedExperts;
pub use tensor::Tensor;

/// Re-exported so backend crates register entries without naming `inventory` themselves.
pub use inventory;
