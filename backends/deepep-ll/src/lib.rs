//! DeepEP-style low-latency expert parallelism: the `deepep_ll` all-to-all, which sends each
//! token to the ranks that hold its experts into the masked `[E_local, R*T, H]` layout (FP8 or
//! bf16 on the wire) and brings the expert outputs back as a weighted sum, and the
//! `masked_gemm` runner for that layout. Ranks address each other's buffers directly: GPUs of
//! one process through peer access ([`LlWorld::in_process`]), processes of one machine through
//! CUDA IPC handles ([`LlWorld::ipc`]); ranks on different machines exchange rows through NCCL
//! ([`LlWorld::nccl`], agreeing on the world by an [`NcclId`]).
//!
//! [`sim`] is the CPU model of the same all-to-all for any number of ranks, with the GPU's
//! exact layout and rounding; the tests hold the kernels to it.

pub mod layout;
pub mod sim;

#[cfg(feature = "cuda")]
pub mod alloc;
#[cfg(feature = "cuda")]
mod dispatcher;
#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
mod nccl;
#[cfg(feature = "cuda")]
mod nccl_path;
#[cfg(feature = "cuda")]
pub mod probe;
#[cfg(feature = "cuda")]
mod runner;
#[cfg(feature = "cuda")]
mod world;

pub use layout::buffer_bytes;

#[cfg(feature = "cuda")]
pub use dispatcher::{LlCombineHook, LlDispatcher, LlRecvHook, DEFAULT_TIMEOUT};
#[cfg(feature = "cuda")]
pub use nccl::NcclId;
#[cfg(feature = "cuda")]
pub use runner::MaskedGemmRunner;
#[cfg(feature = "cuda")]
pub use world::LlWorld;

/// The all-to-all's registered name.
pub const A2A: &str = "deepep_ll";
/// The runner's registered name.
pub const RUNNER: &str = "masked_gemm";

/// Names this crate so the linker keeps its registrations.
pub fn link() {}
