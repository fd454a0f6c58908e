//! The GPU side: the symmetric buffers of a world ([`MegaMoeWorld`]), the compiled program, the
//! weights repacked for it, and the runner that launches it.

mod program;
mod runner;
mod weights;
mod world;

pub(crate) use runner::GpuMega;
pub(crate) use world::RankHandle;
pub use world::{MegaMoeWorld, PreDispatched};
