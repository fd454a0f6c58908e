//! How the runner's GEMM launches are ordered on the stream: after everything before them, or
//! GEMM 2 as GEMM 1's programmatic dependent (started on the multiprocessors GEMM 1 has left,
//! waiting per row tile on counts GEMM 1 keeps: gemm.cu, `GemmArgs::done`).

use moe_runner_core::cuda::cudarc::driver::{sys, CudaFunction};
use moe_runner_core::{CudaDevice, MoeError, Result};

/// How a GEMM launch is ordered after the launches before it on the stream.
#[derive(Clone, Copy)]
pub enum Order {
    /// After all of them.
    Stream,
    /// GEMM 1 with the activation in its epilogue: after all of them, counting its finished
    /// items, all and each row tile's, in these `[1 + row tiles] i32`.
    Signal(u64),
    /// GEMM 2 after such a GEMM 1, as its programmatic dependent: its blocks start on the
    /// multiprocessors GEMM 1 has left (GEMM 1's last wave is a few items on a few of them), and
    /// each work item waits until its row tile's count reaches the second field. GEMM 2 never
    /// runs `griddepcontrol.wait`: the launches after it are ordinary ones, which wait for all
    /// the stream's work, GEMM 1 included (one launched as GEMM 2's programmatic dependent
    /// would not). The wait is unbounded: GEMM 1's blocks are all resident before GEMM 2 can
    /// start, and GEMM 1 waits on nothing of GEMM 2's, so the counts always arrive.
    Wait(u64, i32),
}

impl Order {
    /// The GEMM's `done`, `wait` and `wait_for` arguments (`GemmArgs`).
    pub fn args(self) -> (u64, u64, i32) {
        match self {
            Order::Stream => (0, 0, 0),
            Order::Signal(done) => (done, 0, 0),
            Order::Wait(wait, wait_for) => (0, wait, wait_for),
        }
    }
}

/// Launches `f` as the programmatic dependent of the kernel before it on the stream
/// (`cuLaunchKernelEx` with programmatic stream serialization): it may start once every block
/// of that kernel has run `griddepcontrol.launch_dependents`, and orders its reads of that
/// kernel's output itself. `params` point at the kernel's arguments, in order. Stream capture
/// records it as a programmatic edge of the graph (drivers of CUDA 12.3 and later; this
/// project builds against CUDA 13).
pub fn launch_dependent(
    dev: &CudaDevice,
    f: &CudaFunction,
    grid: usize,
    threads: usize,
    smem: usize,
    params: &mut [*mut std::ffi::c_void],
) -> Result<()> {
    if grid == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| MoeError::Device(e.to_string()))?;
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value: sys::CUlaunchAttributeValue {
            programmaticStreamSerializationAllowed: 1,
        },
    };
    let cfg = sys::CUlaunchConfig {
        gridDimX: grid as u32,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: threads as u32,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem as u32,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: `params` point at live values of the kernel's parameter types, in order; the
    // kernel reads device buffers the runner sized for this pass.
    let r = unsafe {
        sys::cuLaunchKernelEx(
            &cfg,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    };
    match r {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(MoeError::Device(format!(
            "cuLaunchKernelEx (programmatic dependent launch): {e:?}"
        ))),
    }
}
