//! Device memory from `cuMemAlloc`, not the stream-ordered pool: peer access enabled with
//! `cuCtxEnablePeerAccess` and CUDA IPC handles only cover such allocations.

use moe_runner_core::cuda::cudarc::driver::{sys, CudaContext};
use moe_runner_core::{MoeError, Result};
use std::sync::Arc;

fn check(what: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(MoeError::Device(format!("{what}: {r:?}")))
    }
}

/// A zero-filled device allocation, freed on drop.
pub struct DeviceAlloc {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
}

// SAFETY: the allocation is plain device memory; the context handle is thread-safe.
unsafe impl Send for DeviceAlloc {}
unsafe impl Sync for DeviceAlloc {}

impl DeviceAlloc {
    pub fn zeroed(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread()
            .map_err(|e| MoeError::Device(e.to_string()))?;
        let mut ptr = 0;
        // SAFETY: the context is current; `ptr` receives the allocation.
        check(
            &format!("allocating {bytes} bytes for the all-to-all buffers"),
            unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes.max(1)) },
        )?;
        let a = Self {
            ctx: ctx.clone(),
            ptr,
        };
        // SAFETY: `ptr` holds `bytes` bytes in the current context.
        check("zeroing the all-to-all buffers", unsafe {
            sys::cuMemsetD8_v2(ptr, 0, bytes.max(1))
        })?;
        Ok(a)
    }

    /// A copy of `words` in device memory (peer address tables).
    pub fn from_u64s(ctx: &Arc<CudaContext>, words: &[u64]) -> Result<Self> {
        let a = Self::zeroed(ctx, words.len() * 8)?;
        // SAFETY: the allocation holds `words.len() * 8` bytes.
        check("uploading a peer table", unsafe {
            sys::cuMemcpyHtoD_v2(a.ptr, words.as_ptr().cast(), words.len() * 8)
        })?;
        Ok(a)
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // SAFETY: frees the allocation made in `zeroed`, in its own context. Errors at teardown
        // (a context already destroyed) leave nothing to recover.
        unsafe {
            if self.ctx.bind_to_thread().is_ok() {
                let _ = sys::cuMemFree_v2(self.ptr);
            }
        }
    }
}

/// Lets every GPU of `ctxs` read and write every other's `cuMemAlloc` memory.
pub fn enable_peer_access(ctxs: &[Arc<CudaContext>]) -> Result<()> {
    for (i, a) in ctxs.iter().enumerate() {
        for (j, b) in ctxs.iter().enumerate() {
            if i == j || a.cu_device() == b.cu_device() {
                continue;
            }
            let mut can = 0;
            // SAFETY: plain queries on valid device handles.
            check("cuDeviceCanAccessPeer", unsafe {
                sys::cuDeviceCanAccessPeer(&mut can, a.cu_device(), b.cu_device())
            })?;
            if can == 0 {
                return Err(MoeError::Device(format!(
                    "GPU {} cannot access GPU {} directly (no NVLink or PCIe peer path)",
                    a.ordinal(),
                    b.ordinal()
                )));
            }
            a.bind_to_thread()
                .map_err(|e| MoeError::Device(e.to_string()))?;
            // SAFETY: `a` is current; `b` is a live context.
            let r = unsafe { sys::cuCtxEnablePeerAccess(b.cu_ctx(), 0) };
            if r != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
                check("cuCtxEnablePeerAccess", r)?;
            }
        }
    }
    Ok(())
}

/// The CUDA IPC handle of an allocation, for another process to map it.
pub fn ipc_handle(a: &DeviceAlloc) -> Result<[u8; 64]> {
    a.ctx
        .bind_to_thread()
        .map_err(|e| MoeError::Device(e.to_string()))?;
    let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
    // SAFETY: `a` is a live `cuMemAlloc` allocation in the current context.
    check("cuIpcGetMemHandle", unsafe {
        sys::cuIpcGetMemHandle(&mut h, a.ptr)
    })?;
    Ok(h.reserved.map(|b| b as u8))
}

/// Another process's allocation mapped into this one; unmapped on drop.
pub struct IpcMapping {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
}

// SAFETY: as for `DeviceAlloc`.
unsafe impl Send for IpcMapping {}
unsafe impl Sync for IpcMapping {}

impl IpcMapping {
    pub fn open(ctx: &Arc<CudaContext>, handle: &[u8; 64]) -> Result<Self> {
        ctx.bind_to_thread()
            .map_err(|e| MoeError::Device(e.to_string()))?;
        let h = sys::CUipcMemHandle {
            reserved: handle.map(|b| b as _),
        };
        let mut ptr = 0;
        // SAFETY: the handle came from `ipc_handle` in a live peer process; the flag lets the
        // driver enable peer access between the two GPUs when they differ.
        check("cuIpcOpenMemHandle", unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        })?;
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
        })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps what `open` mapped, in its context.
        unsafe {
            if self.ctx.bind_to_thread().is_ok() {
                let _ = sys::cuIpcCloseMemHandle(self.ptr);
            }
        }
    }
}
