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
            start: dev.stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(dev_err)?,
        })
    }

    /// Records the end, waits for it, returns the elapsed device time.
    pub fn stop(self, dev: &CudaDevice) -> Result<f32> {
        let end = dev.stream().record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(dev_err)?;
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
    let graph = stream.end_capture(CUgraphInstantiate_flags(0)).map_err(dev_err)?;
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
