//! Routed experts of one layer stacked into the runners' layout, once, at load: `w13 [E, 2I, H]`
//! (gate rows, then up rows), `w2 [E, H, I]`, and for 128x128 block FP8 their scales
//! `[E, 2I/128, H/128]` and `[E, H/128, I/128]`. Only the experts of this rank (a range of
//! global ids) and, under tensor parallelism, this rank's slice of I are read.

use moe_runner_core::{DType, DenseWeights, Fp8BlockWeights, MoeError, QuantInfo, Result, Tensor};
use rayon::prelude::*;
use safetensors::tensor::Dtype;
use std::ops::Range;

use crate::arch::{scale_of, Family, Proj};
use crate::store::Checkpoint;

/// What to load.
#[derive(Clone, Debug)]
pub struct ExpertSlice {
    pub layer: usize,
    /// Global expert ids this rank holds.
    pub experts: Range<usize>,
    pub hidden: usize,
    /// The expert intermediate size of the model (before tensor parallelism).
    pub inter: usize,
    /// (rank, size) of tensor parallelism over I.
    pub tp: (usize, usize),
}

const BLOCK: usize = 128;

impl ExpertSlice {
    /// FP8 block checkpoints split into whole 128x128 blocks: hidden and this rank's I.
    pub(crate) fn check_fp8_blocks(&self, il: usize) -> Result<()> {
        let h = self.hidden;
        if !il.is_multiple_of(BLOCK) || !h.is_multiple_of(BLOCK) {
            return Err(MoeError::NotDivisible {
                what: "FP8 block checkpoints: hidden and per-rank intermediate sizes".into(),
                value: if !h.is_multiple_of(BLOCK) { h } else { il },
                divisor: BLOCK,
            });
        }
        Ok(())
    }

    pub(crate) fn local_inter(&self) -> Result<usize> {
        let (rank, size) = self.tp;
        if size == 0 || rank >= size || !self.inter.is_multiple_of(size) {
            return Err(MoeError::invalid(
                "tensor parallelism",
                format!(
                    "rank {rank} of {size} cannot split intermediate size {}",
                    self.inter
                ),
            ));
        }
        Ok(self.inter / size)
    }
}

pub(crate) fn act_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::BF16 => Some(DType::Bf16),
        Dtype::F16 => Some(DType::F16),
        Dtype::F32 => Some(DType::F32),
        _ => None,
    }
}

/// Loads the experts of `slice`: dense (bf16, f16, f32) as [`DenseWeights`], FP8 E4M3 with
/// `weight_scale_inv` 128x128 blocks as [`Fp8BlockWeights`], ModelOpt NVFP4 as
/// [`Nvfp4Weights`](moe_runner_core::Nvfp4Weights) (linear scales). `progress` is called once per
/// expert with the bytes read.
pub fn load_experts(
    ck: &Checkpoint,
    family: Family,
    slice: &ExpertSlice,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Box<dyn QuantInfo>> {
    let il = slice.local_inter()?;
    let (h, i) = (slice.hidden, slice.inter);
    let n = slice.experts.len();
    let first = ck.get(&family.expert(slice.layer, slice.experts.start, Proj::Gate))?;
    if crate::nvfp4::is_nvfp4(ck, &first) {
        return crate::nvfp4::load_nvfp4_experts(ck, family, slice, progress);
    }
    let fp8 = first.dtype == Dtype::F8_E4M3;
    let (dtype, elem) = if fp8 {
        slice.check_fp8_blocks(il)?;
        (DType::F8E4M3, 1)
    } else {
        let d = act_dtype(first.dtype).ok_or_else(|| {
            MoeError::invalid(
                first.name,
                format!("expert weights of dtype {:?} are not supported (bf16, f16, f32, F8_E4M3 with 128x128 block scales)", first.dtype),
            )
        })?;
        (d, d.size())
    };
    let mut w13 = Tensor::zeros(&[n, 2 * il, h], dtype);
    let mut w2 = Tensor::zeros(&[n, h, il], dtype);
    let (row0, col0) = (slice.tp.0 * il, slice.tp.0 * il);
    let want = [Dtype::F8_E4M3, first.dtype];
    let accepted: &[Dtype] = if fp8 { &want[..1] } else { &want[1..] };
    let w13_len = 2 * il * h * elem;
    let w2_len = h * il * elem;
    w13.host_bytes_mut()?
        .par_chunks_mut(w13_len)
        .zip(w2.host_bytes_mut()?.par_chunks_mut(w2_len))
        .enumerate()
        .try_for_each(|(j, (a, b))| -> Result<()> {
            let e = slice.experts.start + j;
            let get = |p| ck.get(&family.expert(slice.layer, e, p));
            let (g, u, d) = (get(Proj::Gate)?, get(Proj::Up)?, get(Proj::Down)?);
            g.expect(&[i, h], accepted)?;
            u.expect(&[i, h], accepted)?;
            d.expect(&[h, i], accepted)?;
            let rows = row0 * h * elem..(row0 + il) * h * elem;
            a[..il * h * elem].copy_from_slice(&g.bytes[rows.clone()]);
            a[il * h * elem..].copy_from_slice(&u.bytes[rows]);
            for (r, out) in b.chunks_exact_mut(il * elem).enumerate() {
                let at = (r * i + col0) * elem;
                out.copy_from_slice(&d.bytes[at..at + il * elem]);
            }
            progress((a.len() + b.len()) as u64);
            Ok(())
        })?;
    if !fp8 {
        return Ok(Box::new(DenseWeights::new(w13, w2)?));
    }
    let (s13, s2) = fp8_block_scales(ck, family, slice)?;
    Ok(Box::new(Fp8BlockWeights::new(w13, s13, w2, s2)?))
}

/// The 128x128 block scales of `slice`'s FP8 experts, on the host: `[n, 2 I_local / 128, H / 128]`
/// (gate and up tiles stacked like their rows, this rank's I slice) and `[n, H / 128, I_local / 128]`.
pub(crate) fn fp8_block_scales(
    ck: &Checkpoint,
    family: Family,
    slice: &ExpertSlice,
) -> Result<(Tensor, Tensor)> {
    let il = slice.local_inter()?;
    let (h, i, n) = (slice.hidden, slice.inter, slice.experts.len());
    let (hb, ib, ilb, r0) = (
        h / BLOCK,
        i.div_ceil(BLOCK),
        il / BLOCK,
        slice.tp.0 * il / BLOCK,
    );
    let mut s13 = vec![0f32; n * 2 * ilb * hb];
    let mut s2 = vec![0f32; n * hb * ilb];
    s13.par_chunks_mut(2 * ilb * hb)
        .zip(s2.par_chunks_mut(hb * ilb))
        .enumerate()
        .try_for_each(|(j, (a, b))| -> Result<()> {
            let e = slice.experts.start + j;
            let get = |p| -> Result<Vec<f32>> {
                let name = scale_of(&family.expert(slice.layer, e, p));
                let t = ck.get(&name)?;
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
    Ok((
        Tensor::from_slice(&s13, &[n, 2 * ilb, hb], DType::F32)?,
        Tensor::from_slice(&s2, &[n, hb, ilb], DType::F32)?,
    ))
}

/// The router of one layer: `[E, H]` weights as f32 and the score-correction bias when the
/// family has one.
pub struct RouterWeights {
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

pub fn load_router(
    ck: &Checkpoint,
    family: Family,
    layer: usize,
    experts: usize,
    hidden: usize,
) -> Result<RouterWeights> {
    let g = ck.get(&family.router(layer))?;
    g.expect(&[experts, hidden], &[Dtype::BF16, Dtype::F16, Dtype::F32])?;
    let bias = match family.router_bias(layer) {
        Some(name) if ck.contains(&name) => {
            let b = ck.get(&name)?;
            b.expect(&[experts], &[Dtype::BF16, Dtype::F16, Dtype::F32])?;
            Some(b.to_f32()?)
        }
        _ => None,
    };
    Ok(RouterWeights {
        weight: g.to_f32()?,
        bias,
    })
}

/// The shared experts of one layer as one f32 MLP: `w13 [2 I_s, H]` (gate rows, then up),
/// `w2 [H, I_s]`, FP8 blocks dequantized.
pub struct SharedWeights {
    pub w13: Vec<f32>,
    pub w2: Vec<f32>,
    pub inter: usize,
    /// Qwen2-MoE's `[H]` sigmoid gate on the shared expert's output, when present.
    pub gate: Option<Vec<f32>>,
}

/// A weight `[rows, cols]` as f32: float tensors as they are, FP8 E4M3 times its 128x128
/// `weight_scale_inv` blocks, ModelOpt NVFP4 dequantized.
fn dense_f32(ck: &Checkpoint, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let t = ck.get(name)?;
    if crate::nvfp4::is_nvfp4(ck, &t) {
        return crate::nvfp4::dequantize(ck, name, rows, cols);
    }
    if t.dtype != Dtype::F8_E4M3 {
        t.expect(&[rows, cols], &[Dtype::BF16, Dtype::F16, Dtype::F32])?;
        return t.to_f32();
    }
    t.expect(&[rows, cols], &[Dtype::F8_E4M3])?;
    let (rb, cb) = (rows.div_ceil(BLOCK), cols.div_ceil(BLOCK));
    let s = ck.get(&scale_of(name))?;
    s.expect(&[rb, cb], &[Dtype::F32, Dtype::BF16])?;
    let s = s.to_f32()?;
    Ok(t.bytes
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            let (r, c) = (i / cols, i % cols);
            moe_quant::e4m3_to_f32(b) * s[(r / BLOCK) * cb + c / BLOCK]
        })
        .collect())
}

/// The shared experts of `layer`, or `None` for families (or layers) without them.
pub fn load_shared(
    ck: &Checkpoint,
    family: Family,
    layer: usize,
    hidden: usize,
) -> Result<Option<SharedWeights>> {
    let (Some(g), Some(u), Some(d)) = (
        family.shared(layer, Proj::Gate),
        family.shared(layer, Proj::Up),
        family.shared(layer, Proj::Down),
    ) else {
        return Ok(None);
    };
    if !ck.contains(&g) {
        return Ok(None);
    }
    let gate = ck.get(&g)?;
    // NVFP4 holds two values a byte.
    let cols = if crate::nvfp4::is_nvfp4(ck, &gate) {
        hidden / 2
    } else {
        hidden
    };
    let inter = match gate.shape {
        [i, h] if *h == cols => *i,
        other => {
            return Err(MoeError::invalid(
                g.as_str(),
                format!("shape {other:?}, expected [I_s, {cols}]"),
            ))
        }
    };
    let mut w13 = dense_f32(ck, &g, inter, hidden)?;
    w13.extend(dense_f32(ck, &u, inter, hidden)?);
    let w2 = dense_f32(ck, &d, hidden, inter)?;
    let gate = match family.shared_gate(layer) {
        Some(name) if ck.contains(&name) => Some(dense_f32(ck, &name, 1, hidden)?),
        _ => None,
    };
    Ok(Some(SharedWeights {
        w13,
        w2,
        inter,
        gate,
    }))
}
