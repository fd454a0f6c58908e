//! Routed experts from NVIDIA ModelOpt NVFP4 checkpoints: per projection a packed E2M1 `weight`
//! (U8, two values a byte), E4M3 `weight_scale` per 16 values (row-major), and the f32 scalars
//! `weight_scale_2` (the inverse of the weight's global scale) and `input_scale` (the inverse of
//! its activations' global scale). Stacked into [`Nvfp4Weights`] with linear scales, this rank's
//! experts and tensor-parallel slice; runners that read swizzled scales convert them once.

use moe_runner_core::{DType, MoeError, Nvfp4Weights, QuantInfo, Result, ScaleLayout, Tensor};
use rayon::prelude::*;
use safetensors::tensor::Dtype;

use crate::arch::{Family, Nvfp4Names, Proj};
use crate::experts::ExpertSlice;
use crate::store::{Checkpoint, TensorRef};

/// Whether a projection's `weight` is ModelOpt NVFP4 (packed U8 with an E4M3 `weight_scale`).
pub fn is_nvfp4(ck: &Checkpoint, weight: &TensorRef<'_>) -> bool {
    weight.dtype == Dtype::U8 && ck.contains(&Nvfp4Names::of(weight.name).scale)
}

/// A scalar f32 (shape `[]` or `[1]`), as ModelOpt writes its global scales.
fn scalar(ck: &Checkpoint, name: &str) -> Result<f32> {
    let t = ck.get(name)?;
    let shape: &[usize] = if t.shape.len() == 1 { &[1] } else { &[] };
    t.expect(shape, &[Dtype::F32, Dtype::BF16])?;
    Ok(t.to_f32()?[0])
}

/// One projection's packed codes, linear scales, and global scales (of the weight and its
/// input), checked against `[rows, cols]`.
struct Projection<'a> {
    codes: TensorRef<'a>,
    scales: TensorRef<'a>,
    global: f32,
    input_global: f32,
}

fn projection<'a>(
    ck: &'a Checkpoint,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Projection<'a>> {
    let names = Nvfp4Names::of(name);
    let codes = ck.get(name)?;
    codes.expect(&[rows, cols / 2], &[Dtype::U8])?;
    let scales = ck.get(&names.scale)?;
    scales.expect(&[rows, cols / 16], &[Dtype::F8_E4M3])?;
    let inverse = |n: &str| -> Result<f32> {
        let v = scalar(ck, n)?;
        if !(v.is_finite() && v > 0.0) {
            return Err(MoeError::invalid(
                n,
                format!("{v}: expected a finite positive scale"),
            ));
        }
        Ok(1.0 / v)
    };
    Ok(Projection {
        codes,
        scales,
        global: inverse(&names.scale_2)?,
        input_global: inverse(&names.input_scale)?,
    })
}

/// The NVFP4 experts of `slice`.
pub fn load_nvfp4_experts(
    ck: &Checkpoint,
    family: Family,
    slice: &ExpertSlice,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Box<dyn QuantInfo>> {
    let il = slice.local_inter()?;
    let (h, i) = (slice.hidden, slice.inter);
    for (what, v) in [("hidden_size", h), ("per-rank intermediate size", il)] {
        if !v.is_multiple_of(32) {
            return Err(MoeError::NotDivisible {
                what: format!("{what} of an NVFP4 checkpoint (FP4 pairs and 16-value blocks)"),
                value: v,
                divisor: 32,
            });
        }
    }
    let n = slice.experts.len();
    let row0 = slice.tp.0 * il;
    let (w13_len, w2_len) = (2 * il * h / 2, h * il / 2);
    let (s13_len, s2_len) = (2 * il * h / 16, h * il / 16);
    let mut w13 = vec![0u8; n * w13_len];
    let mut w2 = vec![0u8; n * w2_len];
    let mut s13 = vec![0u8; n * s13_len];
    let mut s2 = vec![0u8; n * s2_len];
    let globals = w13
        .par_chunks_mut(w13_len)
        .zip(w2.par_chunks_mut(w2_len))
        .zip(s13.par_chunks_mut(s13_len))
        .zip(s2.par_chunks_mut(s2_len))
        .enumerate()
        .map(|(j, (((a13, a2), b13), b2))| -> Result<[f32; 4]> {
            let e = slice.experts.start + j;
            let name = |p| family.expert(slice.layer, e, p);
            let g = projection(ck, &name(Proj::Gate), i, h)?;
            let u = projection(ck, &name(Proj::Up), i, h)?;
            let d = projection(ck, &name(Proj::Down), h, i)?;
            if g.global != u.global {
                // One global scale per stacked w13: the gate's. ModelOpt usually calibrates
                // gate and up together; when not, up's values are read at the gate's scale.
                tracing::warn!(
                    expert = e,
                    gate = g.global,
                    up = u.global,
                    "NVFP4 gate and up global scales differ; w13 uses the gate's"
                );
            }
            // This rank's rows of gate and up, its columns of down.
            let (rows, srows) = (
                row0 * h / 2..(row0 + il) * h / 2,
                row0 * h / 16..(row0 + il) * h / 16,
            );
            a13[..il * h / 2].copy_from_slice(&g.codes.bytes[rows.clone()]);
            a13[il * h / 2..].copy_from_slice(&u.codes.bytes[rows]);
            b13[..il * h / 16].copy_from_slice(&g.scales.bytes[srows.clone()]);
            b13[il * h / 16..].copy_from_slice(&u.scales.bytes[srows]);
            for (r, (out, sout)) in a2
                .chunks_exact_mut(il / 2)
                .zip(b2.chunks_exact_mut(il / 16))
                .enumerate()
            {
                let at = r * i / 2 + row0 / 2;
                out.copy_from_slice(&d.codes.bytes[at..at + il / 2]);
                let at = r * i / 16 + row0 / 16;
                sout.copy_from_slice(&d.scales.bytes[at..at + il / 16]);
            }
            progress((a13.len() + a2.len()) as u64);
            Ok([g.global, d.global, g.input_global, d.input_global])
        })
        .collect::<Result<Vec<_>>>()?;
    let column = |k: usize| globals.iter().map(|g| g[k]).collect::<Vec<f32>>();
    Ok(Box::new(Nvfp4Weights::new(
        Tensor::from_slice(&w13, &[n, 2 * il, h / 2], DType::E2M1x2)?,
        Tensor::from_slice(&s13, &[n, s13_len], DType::F8E4M3)?,
        column(0),
        Tensor::from_slice(&w2, &[n, h, il / 2], DType::E2M1x2)?,
        Tensor::from_slice(&s2, &[n, s2_len], DType::F8E4M3)?,
        column(1),
        column(2),
        column(3),
        ScaleLayout::Linear,
    )?))
}

/// One ModelOpt NVFP4 weight `[rows, cols]` dequantized to f32 (shared experts, which run as a
/// CPU MLP).
pub fn dequantize(ck: &Checkpoint, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
    if !cols.is_multiple_of(16) {
        return Err(MoeError::NotDivisible {
            what: format!("columns of NVFP4 `{name}`"),
            value: cols,
            divisor: 16,
        });
    }
    let p = projection(ck, name, rows, cols)?;
    let mut out = vec![0f32; rows * cols];
    moe_quant::dequantize_nvfp4_into(
        p.codes.bytes,
        p.scales.bytes,
        rows,
        cols,
        p.global,
        &mut out,
    )?;
    Ok(out)
}
