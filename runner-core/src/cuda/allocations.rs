//! A count of the device allocations tensors make (new device tensors and uploads), so tests
//! can show a forward pass allocates nothing once warm.

use std::sync::atomic::{AtomicU64, Ordering};

static COUNT: AtomicU64 = AtomicU64::new(0);

pub(crate) fn record() {
    COUNT.fetch_add(1, Ordering::Relaxed);
}

/// Device allocations made through [`crate::Tensor`] in this process so far.
pub fn device_allocations() -> u64 {
    COUNT.load(Ordering::Relaxed)
}
