//! The peer-to-peer bandwidth the all-to-all is measured against: every GPU copies a buffer to
//! the next one at the same time (copy engines over NVLink or PCIe), between `cuMemAlloc`
//! allocations with peer access enabled, as the all-to-all's own buffers are.

use moe_runner_core::cuda::cudarc::driver::result as cu;
use moe_runner_core::cuda::EventTimer;
use moe_runner_core::{CudaDevice, MoeError, Result};

use crate::alloc::{enable_peer_access, DeviceAlloc};

/// Per-direction GB/s: `bytes` over the median (of `iters`) time of the slowest GPU's copy.
pub fn peer_copy_gbps(devs: &[CudaDevice], bytes: usize, iters: usize) -> Result<f64> {
    if devs.len() < 2 {
        return Err(MoeError::invalid("devices", "a peer copy needs two GPUs"));
    }
    let ctxs: Vec<_> = devs.iter().map(|d| d.context().clone()).collect();
    enable_peer_access(&ctxs)?;
    let bufs: Vec<(DeviceAlloc, DeviceAlloc)> = ctxs
        .iter()
        .map(|c| {
            Ok((
                DeviceAlloc::zeroed(c, bytes)?,
                DeviceAlloc::zeroed(c, bytes)?,
            ))
        })
        .collect::<Result<_>>()?;
    let mut times = Vec::with_capacity(iters);
    for it in 0..iters + 2 {
        let mut timers = Vec::with_capacity(devs.len());
        for (r, d) in devs.iter().enumerate() {
            let next = (r + 1) % devs.len();
            let t = EventTimer::start(d)?;
            // SAFETY: both allocations hold `bytes` bytes in their GPUs' contexts.
            unsafe {
                cu::memcpy_peer_async(
                    ctxs[next].cu_ctx(),
                    bufs[next].1.ptr(),
                    ctxs[r].cu_ctx(),
                    bufs[r].0.ptr(),
                    bytes,
                    d.stream().cu_stream(),
                )
            }
            .map_err(|e| MoeError::Device(e.to_string()))?;
            timers.push((r, t));
        }
        let mut worst = 0f32;
        for (r, t) in timers {
            worst = worst.max(t.stop(&devs[r])?);
        }
        if it >= 2 {
            times.push(worst as f64);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(bytes as f64 / (times[times.len() / 2] * 1e-3) / 1e9)
}
