//! The `moe` command line as a library, so every example binary shares its model specs, config
//! parsing and output: `list` prints what the linked backends registered, `run` runs one MoE
//! layer on seeded synthetic weights and compares it with the CPU reference.

pub mod cli;
pub mod error;
pub mod hf_config;
pub mod list;
pub mod memory;
pub mod model;
pub mod output;
pub mod plan;
pub mod progress;
pub mod run;
pub mod timing;

pub use error::{CliError, Result};

/// Names every backend crate this binary ships so the linker keeps their `inventory`
/// registrations; without it `list` and `run` would see empty registries.
pub fn link_backends() {
    moe_conformance::link_backends();
    moe_backend_reference::link();
}
