//! MegaMoE: a whole expert-parallel MoE layer as one persistent GPU program. The a2a `megamoe`
//! only checks the batch and names this rank's symmetric buffer; the runner `megamoe` then runs,
//! in one cooperative launch per rank: pre-dispatch (this rank's tokens quantized per 32 values
//! and its top-k copied into its symmetric buffer), dispatch (each rank pulls the rows of its
//! experts from every rank's buffer over peer memory), GEMM 1, the activation times the router
//! weight, requantization, GEMM 2 written straight into the source rank's combine slots, and
//! the top-k sum. There is no launch gap and no host round trip between the steps.
//!
//! Weights are MXFP4 ([`Mxfp4Weights`](moe_runner_core::Mxfp4Weights)), repacked once into the
//! layout the kernel streams ([`PackedWeights`]). Activations are MXFP4 (scheme `mxfp4-w4a4`)
//! or E4M3 with a UE8M0 scale per 32 values (`mxfp4-w4a8`); [`flags`] resolves the
//! `fp4_acts` / `mxf4_kind` switches. Hopper has no FP4 tensor cores: FP4 is widened to E4M3 in
//! registers and multiplied on the FP8 ones.
//!
//! [`cpu`] is the same layer on the CPU, quantizing at the same points with the same rounding;
//! it is the runner's CPU path and the GPU tests' reference.

pub mod cpu;
mod dispatch_output;
mod dispatcher;
pub mod flags;
#[cfg(feature = "cuda")]
mod gpu;
pub mod layout;
mod runner;

pub use dispatch_output::{MegaMoeCombineInput, MegaMoeDispatchOutput};
pub use dispatcher::MegaMoeDispatcher;
#[cfg(feature = "cuda")]
pub use gpu::{MegaMoeWorld, PreDispatched};
pub use layout::{buffer_bytes, Layout, MegaShape};

/// The all-to-all's registered name.
pub const A2A: &str = "megamoe";
/// The runner's registered name.
pub const RUNNER: &str = "megamoe";

/// Names this crate so the linker keeps its registrations.
pub fn link() {}
