//! The CPU reference runner: every dispatch format and quant scheme, computed in f32 on
//! dequantized weights with each scheme's activation rounding. It is the numeric truth the
//! conformance suite compares every other backend against, and the default where no GPU is
//! present. Registered through the composable path: pre-permute per format, one core, and
//! post-permute per format.

mod act_quant;
mod core;
mod gemm;
mod permute;
mod shared;

pub use act_quant::{per_tensor_scale, round_activations, GemmInput, FP8_ACT_GROUP};
pub use gemm::matmul_nt;
pub use shared::CpuSharedExperts;

use moe_runner_core::inventory;
use moe_runner_core::registry::{DeviceKind, PostPermute, PrePermute, RunnerCore};
use moe_runner_core::{DispatchFormat, QuantScheme};

/// The runner's registered name.
pub const RUNNER: &str = "reference";

/// Names this crate so the linker keeps its registrations; call it (or `use ... as _`) from any
/// binary that should offer the reference runner.
pub fn link() {}

inventory::submit! {
    RunnerCore {
        runner: RUNNER,
        schemes: &QuantScheme::ALL,
        device: DeviceKind::Cpu,
        priority: 0,
        make: core::make,
    }
}

inventory::submit! {
    PrePermute { format: DispatchFormat::Standard, runner: RUNNER, f: permute::standard_pre }
}
inventory::submit! {
    PostPermute { runner: RUNNER, format: DispatchFormat::Standard, f: permute::standard_post }
}
inventory::submit! {
    PrePermute { format: DispatchFormat::DeepEpLowLatency, runner: RUNNER, f: permute::masked_pre }
}
inventory::submit! {
    PostPermute { runner: RUNNER, format: DispatchFormat::DeepEpLowLatency, f: permute::masked_post }
}
