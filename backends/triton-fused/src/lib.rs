//! Triton-style fused MoE on CUDA: the pipeline SGLang and vLLM run as a Triton kernel, written
//! in CUDA C and compiled by NVRTC at run time. Registered as the runner `triton` for the
//! standard format, for bf16, fp16 and FP8 w8a8 (128x128 blocks, per tensor, per channel).
//! Tiles come from tuned-config files in SGLang's JSON schema (see [`tile_config`]).

pub mod tile_config;

#[cfg(feature = "cuda")]
pub mod kernels;
#[cfg(feature = "cuda")]
mod runner;
#[cfg(feature = "cuda")]
pub mod stages;

#[cfg(feature = "cuda")]
pub use runner::{max_blocks, TritonRunner};

/// The runner's registered name.
pub const RUNNER: &str = "triton";

/// Names this crate so the linker keeps its registrations.
pub fn link() {}

#[cfg(feature = "cuda")]
mod registration {
    use moe_runner_core::inventory;
    use moe_runner_core::registry::{DeviceKind, FusedFunc};
    use moe_runner_core::{DispatchFormat, QuantScheme};

    inventory::submit! {
        FusedFunc {
            format: DispatchFormat::Standard,
            runner: super::RUNNER,
            schemes: &[QuantScheme::Bf16, QuantScheme::F16, QuantScheme::Fp8Block128, QuantScheme::Fp8PerTensor, QuantScheme::Fp8PerChannel],
            device: DeviceKind::Cuda,
            priority: 10,
            make: |cfg, device| Ok(Box::new(super::TritonRunner::new(cfg, device)?)),
        }
    }
}
