//! MXFP4 weights repacked once for the program: each work item's 64 B rows (GEMM 1: 32 gate and
//! the same 32 up columns) by groups of 128 k, so a warp's lane reads its fragments of four k32
//! steps with one 16-byte load, and the scales of its two output columns with one 8-byte load.

use moe_backend_triton::stages::launch;
use moe_runner_core::{CudaDevice, DType, ExpertWeights, Mxfp4Weights, Result, Tensor};

use super::program::Program;

pub struct PackedWeights {
    pub w13: Tensor,
    pub w13s: Tensor,
    pub w2: Tensor,
    pub w2s: Tensor,
    /// The device tensors these were packed from: (w13, w13_scale, w2, w2_scale) addresses,
    /// and the tensors themselves, held so that their memory (and so the addresses that say
    /// whether a cached packing is still of these weights) cannot be reused while cached.
    pub source: [u64; 4],
    _held: [Tensor; 4],
}

impl PackedWeights {
    /// The tensors' addresses, which say whether a cached packing is still of these weights.
    pub fn source_of(w: &Mxfp4Weights) -> Result<[u64; 4]> {
        Ok([
            w.w13.cuda_ptr()?,
            w.w13_scale.cuda_ptr()?,
            w.w2.cuda_ptr()?,
            w.w2_scale.cuda_ptr()?,
        ])
    }

    /// Packs `w` (on `dev`) with `program`'s packing kernel.
    pub fn pack(dev: &CudaDevice, program: &Program, w: &Mxfp4Weights) -> Result<Self> {
        let d = w.dims();
        let one = |data: &Tensor,
                   scales: &Tensor,
                   n: usize,
                   k: usize,
                   gemm1: i32|
         -> Result<(Tensor, Tensor)> {
            let wk = Tensor::zeros_cuda(dev, &[d.experts, n, k / 2], DType::U8)?;
            let sk = Tensor::zeros_cuda(dev, &[d.experts, n, k / 32], DType::U8)?;
            let words = d.experts * n * k / 8;
            launch(
                dev,
                &program.pack,
                words.div_ceil(256).min(65_535),
                256,
                0,
                &[
                    &data.cuda_ptr()?,
                    &scales.cuda_ptr()?,
                    &wk.cuda_ptr()?,
                    &sk.cuda_ptr()?,
                    &(d.experts as i32),
                    &(n as i32),
                    &(k as i32),
                    &gemm1,
                ],
            )?;
            Ok((wk, sk))
        };
        let (w13, w13s) = one(&w.w13, &w.w13_scale, d.n1, d.hidden, 1)?;
        let (w2, w2s) = one(&w.w2, &w.w2_scale, d.hidden, d.inter, 0)?;
        Ok(Self {
            w13,
            w13s,
            w2,
            w2s,
            source: Self::source_of(w)?,
            _held: [
                w.w13.clone(),
                w.w13_scale.clone(),
                w.w2.clone(),
                w.w2_scale.clone(),
            ],
        })
    }
}
