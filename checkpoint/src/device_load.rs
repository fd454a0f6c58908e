//! Routed experts straight from the mapped files into GPU memory: each expert's rows are copied
//! from the page cache (or disk, on first touch) to their place in the device tensors by several
//! threads at once, so reading the file and crossing PCIe overlap and no host copy of the layer
//! is made.

use moe_runner_core::cuda::cudarc::driver::sys;
use moe_runner_core::{
    CudaDevice, DType, DenseWeights, Fp8BlockWeights, MoeError, QuantInfo, Result, Tensor,
};
use rayon::prelude::*;
use safetensors::tensor::Dtype;

use crate::arch::{scale_of, Family, Proj};
use crate::experts::{act_dtype, ExpertSlice, BLOCK};
use crate::store::Checkpoint;

fn check(what: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(MoeError::Device(format!("{what}: {r:?}")))
    }
}

/// Copies `rows` rows of `width` bytes, `src_pitch` apart on the host, to `dst` (packed).
fn copy_rows(dst: u64, src: &[u8], src_pitch: usize, width: usize, rows: usize) -> Result<()> {
    if rows == 0 || width == 0 {
        return Ok(());
    }
    if src.len() < (rows - 1) * src_pitch + width {
        return Err(MoeError::Device(
            "checkpoint tensor shorter than its shape".into(),
        ));
    }
    let copy = sys::CUDA_MEMCPY2D_st {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
        srcHost: src.as_ptr().cast(),
        srcDevice: 0,
        srcArray: std::ptr::null_mut(),
        srcPitch: src_pitch,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst,
        dstArray: std::ptr::null_mut(),
        dstPitch: width,
        WidthInBytes: width,
        Height: rows,
    };
    // SAFETY: `src` holds the rows (checked above); `dst` holds rows * width bytes (the
    // caller's device tensor region); the calling thread has the context current.
    check("copying expert weights to the GPU", unsafe {
        sys::cuMemcpy2D_v2(&copy)
    })
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
        let base13 = p13 + (j * 2 * half) as u64;
        let rows = row0 * h * elem..(row0 + il) * h * elem;
        copy_rows(base13, &g.bytes[rows.clone()], h * elem, h * elem, il)?;
        copy_rows(base13 + half as u64, &u.bytes[rows], h * elem, h * elem, il)?;
        copy_rows(
            p2 + (j * half) as u64,
            &d.bytes[row0 * elem..],
            i * elem,
            il * elem,
            h,
        )?;
        progress(3 * half as u64);
        Ok(())
    })?;
    if !fp8 {
        return Ok(Box::new(DenseWeights::new(w13, w2)?));
    }
    // The block scales are small: built on the host as `load_experts` does, then uploaded.
    let (hb, ib, ilb, r0) = (h / BLOCK, i.div_ceil(BLOCK), il / BLOCK, row0 / BLOCK);
    let mut s13 = vec![0f32; n * 2 * ilb * hb];
    let mut s2 = vec![0f32; n * hb * ilb];
    s13.par_chunks_mut(2 * ilb * hb)
        .zip(s2.par_chunks_mut(hb * ilb))
        .enumerate()
        .try_for_each(|(j, (a, b))| -> Result<()> {
            let e = slice.experts.start + j;
            let get = |p| -> Result<Vec<f32>> {
                let t = ck.get(&scale_of(&family.expert(slice.layer, e, p)))?;
                let shape = if p == Proj::Down { [hb, ib] } else { [ib, hb] };
                t.expect(&shape, &[Dtype::F32, Dtype::BF16])?;
                t.to_f32()
            };
            let (g, u, d) = (get(Proj::Gate)?, get(Proj::Up)?, get(Proj::Down)?);
            a[..ilb * hb].copy_from_slice(&g[r0 * hb..(r0 + ilb) * hb]);
            a[ilb * hb..].copy_from_slice(&u[r0 * hb..(r0 + ilb) * hb]);
            for (r, out) in b.chunks_exact_mut(ilb).enumerate() {
                out.copy_from_slice(&d[r * ib + r0..r * ib + r0 + ilb]);
            }
            Ok(())
        })?;
    let device = moe_runner_core::Device::Cuda(dev.clone());
    Ok(Box::new(Fp8BlockWeights::new(
        w13,
        Tensor::from_slice(&s13, &[n, 2 * ilb, hb], DType::F32)?.to_device(&device)?,
        w2,
        Tensor::from_slice(&s2, &[n, hb, ilb], DType::F32)?.to_device(&device)?,
    )?))
}
