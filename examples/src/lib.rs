//! The `moe` command line as a library, so every example binary shares its model specs, config
//! parsing and output: `list` prints what the linked backends registered, `run` runs one MoE
//! layer on seeded synthetic weights and compares it with the CPU reference.

#[cfg(feature = "cuda")]
pub mod a2a_bench;
#[cfg(feature = "cuda")]
pub mod bench;
pub mod checkpoint_layer;
pub mod cli;
#[cfg(feature = "cuda")]
pub mod ep_procs;
#[cfg(feature = "cuda")]
pub mod ep_world;
pub mod error;
#[cfg(feature = "cuda")]
pub mod gpu_layer;
pub mod hf_config;
pub mod list;
#[cfg(feature = "cuda")]
pub mod mega_bench;
#[cfg(feature = "cuda")]
pub mod mega_world;
pub mod memory;
pub mod model;
pub mod output;
pub mod plan;
pub mod progress;
pub mod run;
pub mod stack;
pub mod timing;
#[cfg(feature = "cuda")]
pub mod tune;

pub use error::{CliError, Result};

/// Names every backend crate this binary ships so the linker keeps their `inventory`
/// registrations; without it `list` and `run` would see empty registries.
pub fn link_backends() {
    moe_conformance::link_backends();
    moe_backend_reference::link();
}

/// The `main` of the per-backend example binaries: links the backends, runs `body`, and turns
/// its error into a message on stderr and a failing exit code.
pub fn run_example(
    body: impl FnOnce() -> Result<(), Box<dyn std::error::Error>>,
) -> std::process::ExitCode {
    link_backends();
    match body() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
