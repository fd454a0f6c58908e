//! Shared experts: dense MLPs every token passes through beside the routed experts. The layer
//! adds their output to the routed sum; backends provide implementations for their device.

use crate::{Result, Tensor};

pub trait SharedExperts: Send + Sync {
    /// `hidden [M, H]` to `[M, H]`, in the hidden's dtype.
    fn forward(&self, hidden: &Tensor) -> Result<Tensor>;
}
