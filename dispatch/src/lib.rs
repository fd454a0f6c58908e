//! Routing, token dispatch and the MoE layer. Dispatchers (all-to-all backends) register in an
//! `inventory` registry keyed by name and declare the [`moe_runner_core::DispatchFormat`] they
//! emit; [`MoeLayer`] joins a router, a dispatcher, a runner and its weights.

mod dispatcher;
mod layer;
mod masked;
mod routing;
mod standard;

pub use dispatcher::{
    a2a_backends, make_dispatcher, make_dispatcher_on, A2aBackend, Dispatcher, DispatcherConfig,
    Wire,
};
pub use layer::{MoeLayer, SharedExpertOrder};
pub use masked::LocalMaskedDispatcher;
pub use routing::{Router, RoutingMethod};
pub use standard::{to_local_ids, StandardDispatcher};
