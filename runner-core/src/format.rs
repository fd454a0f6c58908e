//! Dispatch formats: the layout a token dispatcher hands to a runner. Registrations are keyed by
//! the format, not by the all-to-all library, so a new library that emits an existing format
//! reuses every runner of that format.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DispatchFormat {
    /// Tokens stay in place: `hidden [M, H]` plus their top-k ids and weights.
    Standard,
    /// DeepEP low-latency: per local expert, a masked block `[E_local, R*T, H]` with `masked_m`.
    DeepEpLowLatency,
    /// DeepEP normal (high-throughput): received tokens `[N, H]` with per-token top-k.
    DeepEpNormal,
    /// MegaMoE's symmetric buffer.
    MegaMoe,
    /// A format defined outside this crate.
    #[serde(skip)]
    Custom(&'static str),
}

impl DispatchFormat {
    /// The formats this crate knows by name.
    pub const BUILTIN: [DispatchFormat; 4] = [
        DispatchFormat::Standard,
        DispatchFormat::DeepEpLowLatency,
        DispatchFormat::DeepEpNormal,
        DispatchFormat::MegaMoe,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DispatchFormat::Standard => "standard",
            DispatchFormat::DeepEpLowLatency => "deepep_ll",
            DispatchFormat::DeepEpNormal => "deepep_normal",
            DispatchFormat::MegaMoe => "megamoe",
            DispatchFormat::Custom(name) => name,
        }
    }

    /// Parses a built-in format name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::BUILTIN.into_iter().find(|f| f.name() == name)
    }
}

impl fmt::Display for DispatchFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
