//! Expert weights from Hugging Face safetensors checkpoints. [`Checkpoint`] memory-maps a
//! directory's shards and indexes their tensors; [`load_experts`] stacks one layer's routed
//! experts (this rank's share under expert parallelism, its slice under tensor parallelism)
//! into the runners' `w13` / `w2` layout once, in parallel (bf16, FP8 blocks, or ModelOpt
//! NVFP4); [`load_router`] reads the gate.
//! [`generate`] writes small checkpoints in the same layouts, for tests and examples.
//! Errors name the tensor or file at fault: a missing tensor, a wrong shape or dtype, a
//! truncated or corrupt file, an unknown architecture.

pub mod arch;
#[cfg(feature = "cuda")]
pub mod device_load;
pub mod experts;
pub mod generate;
mod nvfp4;
pub mod store;

pub use arch::{Family, Proj, ARCHITECTURES};
#[cfg(feature = "cuda")]
pub use device_load::load_experts_to_device;
pub use experts::{
    load_experts, load_router, load_shared, ExpertSlice, RouterWeights, SharedWeights,
};
pub use store::{Checkpoint, TensorRef};
