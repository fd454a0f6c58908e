//! NVFP4 (w4a4) grouped GEMMs for Hopper, the runner `cutedsl_fp4`. Hopper has no FP4 tensor
//! cores, so the value of FP4 there is bytes: weights and activations move as E2M1 with E4M3
//! block scales. A producer warp streams the weights through shared memory by TMA; the
//! consumer warps widen each code to f16 and multiply it by its block scale, exactly, just
//! before the f16 tensor cores, with the weights as the MMA's 16 rows and the tokens as its
//! columns (decode batches fill an n8 tile, not an m16 one).
//!
//! One runner serves both layouts: the masked `[E_local, R*T, H]` layout of the low-latency
//! all-to-all (rows past `masked_m` never read or written), and the standard layout, whose
//! tokens a pre-permute groups into the same per-expert rows (no second copy of the kernels).
//! The weights are [`Nvfp4Weights`](moe_runner_core::Nvfp4Weights) with swizzled block scales
//! ([`kernel_layout`] converts checkpoint scales at load; linear scales given to the runner
//! are swizzled once, at its first pass over them); the activations are quantized on the GPU
//! with each expert's input global scale.

#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
mod order;
#[cfg(feature = "cuda")]
mod runner;
#[cfg(feature = "cuda")]
mod tma;
#[cfg(feature = "cuda")]
mod weights;

#[cfg(feature = "cuda")]
pub use runner::Fp4Runner;
#[cfg(feature = "cuda")]
pub use weights::kernel_layout;

/// The runner's registered name.
pub const RUNNER: &str = "cutedsl_fp4";

/// Names this crate so the linker keeps its registrations.
pub fn link() {}
