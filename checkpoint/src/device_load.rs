//! Routed experts straight from the mapped files into GPU memory. Each thread gathers one
//! expert's rows from the mapping into a pinned staging buffer of its own (the page faults read
//! the file, so several threads keep the disk busy) and copies it to its place in the device
//! tensors at full PCIe speed; no host copy of the whole layer is made.

use std::sync::Mutex;

use moe_runner_core::cuda::cudarc::driver::sys;
use moe_runner_core::{
    CudaDevice, DType, DenseWeights, Fp8BlockWeights, MoeError, QuantInfo, Result, Tensor,
};
use rayon::prelude::*;
use safetensors::tensor::Dtype;

use crate::arch::{Family, Proj};
use crate::experts::{act_dtype, ExpertSlice};
use crate::store::Checkpoint;

fn check(what: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(MoeError::Device(format!("{what}: {r:?}")))
    }
}

/// Page-locked host memory for one expert, so the copy to the GPU runs at PCIe speed without
/// the driver's own staging.
struct Pinned {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; one thread uses it at a time (it
// moves through the pool's mutex).
unsafe impl Send for Pinned {}

impl Pinned {
    fn new(len: usize) -> Result<Self> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `ptr` is valid for a write; the calling thread has the context current.
        check("allocating a pinned staging buffer", unsafe {
            sys::cuMemHostAlloc(&mut ptr, len.max(1), 0)
        })?;
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `len` bytes, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Copies bytes `at..at + len` to `dst` and waits for the copy.
    fn upload(&self, at: usize, len: usize, dst: u64) -> Result<()> {
        assert!(at + len <= self.len, "staging range within the buffer");
        // SAFETY: the source range lies in the buffer (asserted); `dst` is the caller's device
        // region of `len` bytes; the calling thread has the context current.
        check("copying expert weights to the GPU", unsafe {
            sys::cuMemcpyHtoD_v2(dst, self.ptr.add(at).cast(), len)
        })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: allocated by `cuMemHostAlloc` and freed once.
        unsafe { sys::cuMemFreeHost(self.ptr.cast()) };
    }
}

/// Gathers `rows` rows of `width` bytes, `pitch` apart in `src`, packed into `dst`.
fn gather(dst: &mut [u8], src: &[u8], pitch: usize, width: usize, rows: usize) -> Result<()> {
    if rows > 0 && src.len() < (rows - 1) * pitch + width {
        return Err(MoeError::Device(
            "checkpoint tensor shorter than its shape".into(),
        ));
    }
    for (r, out) in dst.chunks_exact_mut(width).take(rows).enumerate() {
        out.copy_from_slice(&src[r * pitch..r * pitch + width]);
    }
    Ok(())
}

/// As [`crate::load_experts`], into tensors on `dev`.
pub fn load_experts_to_device(
    ck: &Checkpoint,
    family: Family,
    slice: &ExpertSlice,
    dev: &CudaDevice,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Box<dyn QuantInfo>> {
    let il = slice.local_inter()?;
    let (h, i) = (slice.hidden, slice.inter);
    let n = slice.experts.len();
    let first = ck.get(&family.expert(slice.layer, slice.experts.start, Proj::Gate))?;
    if crate::nvfp4::is_nvfp4(ck, &first) {
        // Half the bytes of FP8 and stacked on the host in one pass: loaded there, then moved.
        let host = crate::nvfp4::load_nvfp4_experts(ck, family, slice, progress)?;
        return moe_runner_core::quant_to_device(
            host.as_ref(),
            &moe_runner_core::Device::Cuda(dev.clone()),
        );
    }
    let fp8 = first.dtype == Dtype::F8_E4M3;
    let (dtype, elem, accepted) = if fp8 {
        slice.check_fp8_blocks(il)?;
        (DType::F8E4M3, 1, [Dtype::F8_E4M3])
    } else {
        let d = act_dtype(first.dtype).ok_or_else(|| {
            MoeError::invalid(
                first.name,
                format!(
                    "expert weights of dtype {:?} are not supported",
                    first.dtype
                ),
            )
        })?;
        (d, d.size(), [first.dtype])
    };
    let w13 = Tensor::zeros_cuda(dev, &[n, 2 * il, h], dtype)?;
    let w2 = Tensor::zeros_cuda(dev, &[n, h, il], dtype)?;
    dev.stream()
        .synchronize()
        .map_err(|e| MoeError::Device(e.to_string()))?;
    let (p13, p2) = (w13.cuda_ptr()?, w2.cuda_ptr()?);
    let (row0, half) = (slice.tp.0 * il, il * h * elem);
    // One staging buffer per busy thread, reused across experts.
    let pool: Mutex<Vec<Pinned>> = Mutex::new(Vec::new());
    (0..n).into_par_iter().try_for_each(|j| -> Result<()> {
        dev.context()
            .bind_to_thread()
            .map_err(|e| MoeError::Device(e.to_string()))?;
        let e = slice.experts.start + j;
        let get = |p| ck.get(&family.expert(slice.layer, e, p));
        let (g, u, d) = (get(Proj::Gate)?, get(Proj::Up)?, get(Proj::Down)?);
        g.expect(&[i, h], &accepted)?;
        u.expect(&[i, h], &accepted)?;
        d.expect(&[h, i], &accepted)?;
        let taken = pool.lock().map(|mut p| p.pop()).unwrap_or(None);
        let mut buf = match taken {
            Some(b) => b,
            None => Pinned::new(3 * half)?,
        };
        let stage = buf.bytes();
        let rows = row0 * h * elem..(row0 + il) * h * elem;
        stage[..half].copy_from_slice(&g.bytes[rows.clone()]);
        stage[half..2 * half].copy_from_slice(&u.bytes[rows]);
        gather(
            &mut stage[2 * half..],
            &d.bytes[row0 * elem..],
            i * elem,
            il * elem,
            h,
        )?;
        buf.upload(0, 2 * half, p13 + (j * 2 * half) as u64)?;
        buf.upload(2 * half, half, p2 + (j * half) as u64)?;
        if let Ok(mut p) = pool.lock() {
            p.push(buf);
        }
        progress(3 * half as u64);
        Ok(())
    })?;
    if !fp8 {
        return Ok(Box::new(DenseWeights::new(w13, w2)?));
    }
    // The block scales are small: built on the host as `load_experts` does, then uploaded.
    let (s13, s2) = crate::experts::fp8_block_scales(ck, family, slice)?;
    let device = moe_runner_core::Device::Cuda(dev.clone());
    Ok(Box::new(Fp8BlockWeights::new(
        w13,
        s13.to_device(&device)?,
        w2,
        s2.to_device(&device)?,
    )?))
}
