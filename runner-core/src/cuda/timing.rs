//! Timing with CUDA events on the device's stream, and replays of a captured graph.

use crate::{CudaDevice, MoeError, Result};
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaEvent;

fn dev_err(e: cudarc::driver::DriverError) -> MoeError {
    MoeError::Device(e.to_string())
}

/// A start event recorded on the stream; `stop` gives the milliseconds since.
pub struct EventTimer {
    start: CudaEvent,
}

impl EventTimer {
    pub fn start(dev: &CudaDevice) -> Result<Self> {
        Ok(Self {
            start: dev
                .stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(dev_err)?,
        })
    }

    /// Records the end, waits for it, returns the elapsed device time.
    pub fn stop(self, dev: &CudaDevice) -> Result<f32> {
        let end = dev
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(dev_err)?;
        end.synchronize().map_err(dev_err)?;
        self.start.elapsed_ms(&end).map_err(dev_err)
    }
}

/// Captures `work` (which must queue on the device's stream and not synchronize) into a graph,
/// replays it `warmup` times, then times `iters` single replays; returns each replay's ms.
pub fn time_graph_ms(
    dev: &CudaDevice,
    warmup: usize,
    iters: usize,
    mut work: impl FnMut() -> Result<()>,
) -> Result<Vec<f32>> {
    let stream = dev.stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(dev_err)?;
    let captured = work();
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .map_err(dev_err)?;
    captured?;
    let graph = graph.ok_or_else(|| MoeError::Device("the captured graph is empty".into()))?;
    for _ in 0..warmup {
        graph.launch().map_err(dev_err)?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = EventTimer::start(dev)?;
        graph.launch().map_err(dev_err)?;
        times.push(t.stop(dev)?);
    }
    Ok(times)
}

/// Device-to-device copy bandwidth in GB/s (bytes read plus bytes written, per second) over
/// `bytes`-sized buffers: the memory ceiling the floors of the benchmarks use.
pub fn copy_bandwidth_gbps(dev: &CudaDevice, bytes: usize, iters: usize) -> Result<f64> {
    let src = crate::Tensor::zeros_cuda(dev, &[bytes], crate::DType::U8)?;
    let dst = crate::Tensor::zeros_cuda(dev, &[bytes], crate::DType::U8)?;
    let (s, d) = (src.cuda_ptr()?, dst.cuda_ptr()?);
    let copy = || -> Result<()> {
        // SAFETY: both buffers hold `bytes` bytes on this device.
        unsafe { cudarc::driver::result::memcpy_dtod_async(d, s, bytes, dev.stream().cu_stream()) }
            .map_err(dev_err)
    };
    copy()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = EventTimer::start(dev)?;
        copy()?;
        times.push(t.stop(dev)?);
    }
    times.sort_by(f32::total_cmp);
    let median_ms = times[times.len() / 2] as f64;
    Ok(2.0 * bytes as f64 / (median_ms * 1e-3) / 1e9)
}
