//! GPU foundation (feature `cuda`): the NVRTC kernel cache, device buffers that kernels write,
//! and CUDA-event timing. Backends build their launches on these.

mod allocations;
mod kernel_cache;
mod random;
mod timing;

pub use allocations::device_allocations;
pub(crate) use allocations::record as record_allocation;
pub use kernel_cache::{compile_module, kernel_cache_dir, target_arch};
pub use random::fill_uniform;
pub use timing::{copy_bandwidth_gbps, time_graph_ms, EventTimer};

/// cudarc re-exported so backends use the exact version this crate links.
pub use cudarc;
