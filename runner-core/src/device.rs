//! Where a tensor lives and where a runner computes. A closed set, so `enum_dispatch` gives static
//! dispatch over it; backends that need a CUDA context take it from [`CudaDevice`].

use crate::{MoeError, Result};
use enum_dispatch::enum_dispatch;

/// Operations every device kind provides.
#[enum_dispatch]
pub trait DeviceOps {
    /// Human-readable name ("cpu", "NVIDIA H100 80GB HBM3", ...).
    fn name(&self) -> String;
    /// Waits until all work queued on this device's stream has finished.
    fn synchronize(&self) -> Result<()>;
}

#[enum_dispatch(DeviceOps)]
#[derive(Clone, Debug)]
pub enum Device {
    Cpu(CpuDevice),
    Cuda(CudaDevice),
}

impl Device {
    pub fn cpu() -> Self {
        Device::Cpu(CpuDevice)
    }

    /// A CUDA device by ordinal, or a typed error when no driver or no such GPU is present.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        CudaDevice::new(ordinal).map(Device::Cuda)
    }

    /// The first GPU when one is usable, otherwise the CPU.
    pub fn best_available() -> Self {
        Self::cuda(0).unwrap_or_else(|e| {
            tracing::info!("using the CPU: {e}");
            Self::cpu()
        })
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// The CUDA device, or a typed error naming what was expected.
    pub fn as_cuda(&self) -> Result<&CudaDevice> {
        match self {
            Device::Cuda(d) => Ok(d),
            Device::Cpu(_) => Err(MoeError::invalid(
                "device",
                "expected a CUDA device, got the CPU",
            )),
        }
    }
}

/// The host. Computation runs on rayon's thread pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuDevice;

impl DeviceOps for CpuDevice {
    fn name(&self) -> String {
        "cpu".to_string()
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use cudarc::driver::{CudaContext, CudaStream};
    use std::sync::Arc;

    /// A CUDA context and the stream work is queued on.
    #[derive(Clone, Debug)]
    pub struct CudaDevice {
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
    }

    impl CudaDevice {
        pub fn new(ordinal: usize) -> Result<Self> {
            // cudarc loads libcuda lazily and panics when it is missing; check first so a
            // machine without a driver gets an error and keeps its CPU path.
            // SAFETY: only probes whether the shared library can be opened.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err(MoeError::NoCuda(
                    "the CUDA driver library (libcuda.so) was not found".into(),
                ));
            }
            let count = CudaContext::device_count().map_err(|e| MoeError::NoCuda(e.to_string()))?;
            if ordinal >= count.max(0) as usize {
                return Err(MoeError::NoCuda(format!(
                    "device {ordinal} requested, {count} present"
                )));
            }
            let ctx = CudaContext::new(ordinal).map_err(|e| MoeError::NoCuda(e.to_string()))?;
            // Kernels take raw device addresses and order their work on one stream, so
            // cudarc's per-buffer event tracking would only add event records to every launch.
            // SAFETY: called before any buffer of this context exists.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx
                .new_stream()
                .map_err(|e| MoeError::Device(e.to_string()))?;
            Ok(Self { ctx, stream })
        }

        /// Work on a stream the engine owns (its `CUstream`, e.g. PyTorch's current stream) in
        /// GPU `ordinal`'s primary context, so kernels are ordered with the engine's own work.
        ///
        /// # Safety
        /// `stream` is a live stream of that context and outlives every use of the device.
        pub unsafe fn with_stream(
            ordinal: usize,
            stream: cudarc::driver::sys::CUstream,
        ) -> Result<Self> {
            let own = Self::new(ordinal)?;
            // SAFETY: the caller's contract.
            let stream = unsafe { own.ctx.wrap_borrowed_stream(stream) };
            Ok(Self {
                ctx: own.ctx,
                stream,
            })
        }

        pub fn context(&self) -> &Arc<CudaContext> {
            &self.ctx
        }

        pub fn stream(&self) -> &Arc<CudaStream> {
            &self.stream
        }

        /// (major, minor) compute capability, e.g. (9, 0) on Hopper.
        pub fn compute_capability(&self) -> Result<(i32, i32)> {
            self.ctx
                .compute_capability()
                .map_err(|e| MoeError::Device(e.to_string()))
        }
    }

    impl DeviceOps for CudaDevice {
        fn name(&self) -> String {
            self.ctx.name().unwrap_or_else(|_| "cuda".into())
        }
        fn synchronize(&self) -> Result<()> {
            self.stream
                .synchronize()
                .map_err(|e| MoeError::Device(e.to_string()))
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use super::*;

    /// Built without the `cuda` feature: the variant exists so code matching on [`Device`]
    /// compiles the same, but it cannot be constructed.
    #[derive(Clone, Debug)]
    pub struct CudaDevice {
        never: std::convert::Infallible,
    }

    impl CudaDevice {
        pub fn new(_ordinal: usize) -> Result<Self> {
            Err(MoeError::NoCuda(
                "this build has no `cuda` feature".to_string(),
            ))
        }
    }

    impl DeviceOps for CudaDevice {
        fn name(&self) -> String {
            match self.never {}
        }
        fn synchronize(&self) -> Result<()> {
            match self.never {}
        }
    }
}

pub use cuda::CudaDevice;
