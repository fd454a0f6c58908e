//! The shared conformance suite (run per backend, on the CPU and, where a GPU is present, on
//! CUDA) and the seeded synthetic weights and inputs it, the benches and the `moe` command use.

pub mod cases;
pub mod ep;
pub mod oracle;
pub mod suite;
pub mod synthetic;
#[cfg(feature = "cuda")]
pub mod synthetic_gpu;

/// Keeps every backend's registrations linked into the binaries using this crate.
pub fn link_backends() {
    moe_backend_reference::link();
    moe_backend_triton::link();
    moe_backend_deepep_ll::link();
    moe_backend_cutedsl_fp4::link();
    moe_backend_megamoe::link();
}
