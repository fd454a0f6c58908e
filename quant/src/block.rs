//! FP8 weights: 128x128 block scales (DeepSeek-V3 style), and the per-tensor and per-channel schemes.
//!
//! Every weight scale is `max(amax / 448, 1e-12)`: the weight is exactly representable up to E4M3
//! rounding, and the 1e-12 floor only matters for an all-zero block, where it avoids dividing by zero
//! (the codes come out 0 either way). Values are quantized as the f32 division `w / scale`, the same
//! arithmetic as the activations (see `act.rs`), so a GPU quantizer using IEEE division matches bit for
//! bit. Edge blocks of a matrix whose sides are not multiples of the block are partial and get their own
//! scale from the elements they hold.

use crate::act::amax;
use crate::rows::{for_each_row, for_each_row2};
use crate::shape::{element_count, expect_len, nonzero};
use crate::{e4m3_from_f32, e4m3_to_f32, QuantError, E4M3_MAX};

/// Floor on a weight scale, so an all-zero block or tensor does not divide by zero.
pub const WEIGHT_SCALE_FLOOR: f32 = 1e-12;

/// The scale of a block, channel or tensor with absolute maximum `amax`.
fn weight_scale(amax: f32) -> f32 {
    (amax / E4M3_MAX).max(WEIGHT_SCALE_FLOOR)
}

/// A batch of E4M3 matrices (one per expert) with one f32 scale per `block.0 x block.1` tile.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Blocks {
    /// E4M3 codes, `[batch, n, k]` row-major.
    pub data: Vec<u8>,
    /// `[batch, ceil(n / block.0), ceil(k / block.1)]`.
    pub scales: Vec<f32>,
    pub batch: usize,
    pub n: usize,
    pub k: usize,
    /// (rows, columns) of one scale tile, (128, 128) in the DeepSeek recipe.
    pub block: (usize, usize),
}

/// Number of scale tiles along each side of an `n x k` matrix.
fn tiles(n: usize, k: usize, block: (usize, usize)) -> Result<(usize, usize), QuantError> {
    let bn = nonzero("FP8 weight block rows", block.0)?;
    let bk = nonzero("FP8 weight block columns", block.1)?;
    Ok((n.div_ceil(bn), k.div_ceil(bk)))
}

/// Quantizes `w` (`[batch, n, k]`) to E4M3 with one scale per `block` tile of each matrix.
pub fn quantize_fp8_blocks(
    w: &[f32],
    batch: usize,
    n: usize,
    k: usize,
    block: (usize, usize),
) -> Result<Fp8Blocks, QuantError> {
    let (nb, kb) = tiles(n, k, block)?;
    let len = element_count("FP8 weight [batch, n, k]", &[batch, n, k])?;
    expect_len("FP8 weight input [batch, n, k]", len, w.len())?;
    let (bn, bk) = block;
    let mut data = vec![0u8; len];
    let mut scales = vec![0f32; batch * nb * kb];
    // One unit of work is a block-row: `bn` rows of one matrix (fewer at the bottom edge) and its `kb`
    // scales. Batches first, so that block-rows never straddle two matrices.
    for_each_row2(
        &mut data,
        n * k,
        &mut scales,
        nb * kb,
        len,
        |b, q_mat, s_mat| {
            let w_mat = &w[b * n * k..(b + 1) * n * k];
            for_each_row2(q_mat, bn * k, s_mat, kb, n * k, |rb, q_rows, s_row| {
                let w_rows = &w_mat[rb * bn * k..rb * bn * k + q_rows.len()];
                quantize_block_row(w_rows, q_rows, s_row, k, bk);
            });
        },
    );
    Ok(Fp8Blocks {
        data,
        scales,
        batch,
        n,
        k,
        block,
    })
}

/// Quantizes one block-row (`w.len() / k` rows of width `k`) whose tiles are `bk` columns wide.
fn quantize_block_row(w: &[f32], q: &mut [u8], scales: &mut [f32], k: usize, bk: usize) {
    for (t, s) in scales.iter_mut().enumerate() {
        let cols = t * bk..((t + 1) * bk).min(k);
        let tile_amax = w
            .chunks_exact(k)
            .fold(0.0f32, |m, row| m.max(amax(&row[cols.clone()])));
        let scale = weight_scale(tile_amax);
        *s = scale;
        for (q_row, w_row) in q.chunks_exact_mut(k).zip(w.chunks_exact(k)) {
            for (qv, &v) in q_row[cols.clone()].iter_mut().zip(&w_row[cols.clone()]) {
                *qv = e4m3_from_f32(v / scale);
            }
        }
    }
}

/// Dequantizes one `n x k` matrix with `block` tile scales into `out` (`[n, k]`):
/// `out = e4m3(data) * scales[row / block.0, col / block.1]`.
pub fn dequantize_fp8_blocks_into(
    data: &[u8],
    scales: &[f32],
    n: usize,
    k: usize,
    block: (usize, usize),
    out: &mut [f32],
) -> Result<(), QuantError> {
    let (nb, kb) = tiles(n, k, block)?;
    let len = element_count("FP8 weight [n, k]", &[n, k])?;
    expect_len("FP8 weight data [n, k]", len, data.len())?;
    expect_len("FP8 weight output [n, k]", len, out.len())?;
    expect_len(
        "FP8 weight scales [ceil(n / bn), ceil(k / bk)]",
        nb * kb,
        scales.len(),
    )?;
    dequantize_matrix(data, scales, k, block, out);
    Ok(())
}

/// The work of [`dequantize_fp8_blocks_into`] once the shapes are known to agree.
fn dequantize_matrix(
    data: &[u8],
    scales: &[f32],
    k: usize,
    block: (usize, usize),
    out: &mut [f32],
) {
    let (bn, bk) = block;
    let kb = k.div_ceil(bk);
    let len = out.len();
    for_each_row(out, k, len, |r, out_row| {
        let q_row = &data[r * k..(r + 1) * k];
        let s_row = &scales[(r / bn) * kb..(r / bn + 1) * kb];
        for ((o, q), &s) in out_row.chunks_mut(bk).zip(q_row.chunks(bk)).zip(s_row) {
            for (ov, &qv) in o.iter_mut().zip(q) {
                *ov = e4m3_to_f32(qv) * s;
            }
        }
    });
}

impl Fp8Blocks {
    /// Checks that the public fields describe a consistent batch (they can be edited by hand).
    pub fn validate(&self) -> Result<(), QuantError> {
        let (nb, kb) = tiles(self.n, self.k, self.block)?;
        let len = element_count("FP8 weight [batch, n, k]", &[self.batch, self.n, self.k])?;
        expect_len("FP8 weight data [batch, n, k]", len, self.data.len())?;
        expect_len(
            "FP8 weight scales [batch, ceil(n / bn), ceil(k / bk)]",
            self.batch * nb * kb,
            self.scales.len(),
        )
    }

    /// All matrices dequantized, `[batch, n, k]`. If the fields were edited into an inconsistent state
    /// ([`Fp8Blocks::validate`] fails) the result is all NaN rather than a panic.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![f32::NAN; self.data.len()];
        if self.validate().is_err() {
            return out;
        }
        let mat = self.n * self.k;
        let scales_per_mat = self.scales.len() / self.batch.max(1);
        for ((o, q), s) in out
            .chunks_exact_mut(mat.max(1))
            .zip(self.data.chunks_exact(mat.max(1)))
            .zip(self.scales.chunks_exact(scales_per_mat.max(1)))
        {
            dequantize_matrix(q, s, self.k, self.block, o);
        }
        out
    }
}

/// Quantizes a whole tensor with one scale, `max(amax / 448, 1e-12)`; returns (codes, scale).
pub fn quantize_fp8_per_tensor(w: &[f32]) -> (Vec<u8>, f32) {
    let scale = weight_scale(amax(w));
    (w.iter().map(|&v| e4m3_from_f32(v / scale)).collect(), scale)
}

/// Quantizes `w` (`[rows, cols]`) with one scale per row (output channel), `max(amax / 448, 1e-12)`;
/// returns (codes `[rows, cols]`, scales `[rows]`). Per-token dynamic activations for this scheme are
/// [`crate::quantize_fp8_groups`] with `group = cols`.
pub fn quantize_fp8_per_channel(
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<(Vec<u8>, Vec<f32>), QuantError> {
    let len = element_count("FP8 per-channel weight [rows, cols]", &[rows, cols])?;
    expect_len("FP8 per-channel weight input [rows, cols]", len, w.len())?;
    let mut data = vec![0u8; len];
    // A zero-width matrix still has one (floor) scale per row.
    let mut scales = vec![WEIGHT_SCALE_FLOOR; rows];
    for_each_row2(&mut data, cols, &mut scales, 1, len, |r, q_row, s| {
        let w_row = &w[r * cols..(r + 1) * cols];
        let scale = weight_scale(amax(w_row));
        s[0] = scale;
        for (q, &v) in q_row.iter_mut().zip(w_row) {
            *q = e4m3_from_f32(v / scale);
        }
    });
    Ok((data, scales))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_edge_blocks_get_their_own_scales() {
        // One 3x5 matrix in 2x2 blocks: tiles of 2x2, 2x2, 2x1 / 1x2, 1x2, 1x1.
        let w: Vec<f32> = (0..15).map(|i| i as f32).collect();
        let q = quantize_fp8_blocks(&w, 1, 3, 5, (2, 2)).unwrap();
        assert_eq!(q.scales.len(), 6);
        let amaxes = [6.0, 8.0, 9.0, 11.0, 13.0, 14.0];
        for (s, a) in q.scales.iter().zip(amaxes) {
            assert_eq!(*s, a / 448.0);
        }
        // Small integers are exact in E4M3 after scaling by their block's amax / 448.
        let d = q.dequantize();
        for (got, want) in d.iter().zip(&w) {
            assert!((got - want).abs() <= want * 0.0625, "{got} vs {want}");
        }
        let mut one = vec![0.0; 15];
        dequantize_fp8_blocks_into(&q.data, &q.scales, 3, 5, (2, 2), &mut one).unwrap();
        assert_eq!(one, d);
    }

    #[test]
    fn batches_are_independent() {
        let w: Vec<f32> = (0..2 * 4 * 4)
            .map(|i| if i < 16 { 1.0 } else { 100.0 })
            .collect();
        let q = quantize_fp8_blocks(&w, 2, 4, 4, (128, 128)).unwrap();
        assert_eq!(q.scales, vec![1.0 / 448.0, 100.0 / 448.0]);
        assert_eq!(q.dequantize(), w);
    }

    #[test]
    fn zero_blocks_use_the_floor() {
        let q = quantize_fp8_blocks(&[0.0; 4], 1, 2, 2, (128, 128)).unwrap();
        assert_eq!(q.scales, vec![WEIGHT_SCALE_FLOOR]);
        assert_eq!(q.data, vec![0; 4]);
        let (d, s) = quantize_fp8_per_tensor(&[]);
        assert!(d.is_empty());
        assert_eq!(s, WEIGHT_SCALE_FLOOR);
    }

    #[test]
    fn errors_and_empty_shapes() {
        assert!(matches!(
            quantize_fp8_blocks(&[0.0; 4], 1, 2, 2, (0, 128)),
            Err(QuantError::ZeroSize { .. })
        ));
        assert!(matches!(
            quantize_fp8_blocks(&[0.0; 4], 2, 2, 2, (128, 128)),
            Err(QuantError::Length {
                expected: 8,
                got: 4,
                ..
            })
        ));
        let mut out = [0.0; 4];
        assert!(matches!(
            dequantize_fp8_blocks_into(&[0; 4], &[1.0, 1.0], 2, 2, (128, 128), &mut out),
            Err(QuantError::Length {
                expected: 1,
                got: 2,
                ..
            })
        ));
        assert!(matches!(
            dequantize_fp8_blocks_into(&[0; 4], &[1.0], 2, 2, (128, 128), &mut out[..3]),
            Err(QuantError::Length {
                expected: 4,
                got: 3,
                ..
            })
        ));
        for (b, n, k) in [(0, 4, 4), (2, 0, 4), (2, 4, 0)] {
            let q = quantize_fp8_blocks(&[], b, n, k, (128, 128)).unwrap();
            assert!(q.data.is_empty() && q.dequantize().is_empty());
        }
        let mut q = quantize_fp8_blocks(&[1.0; 4], 1, 2, 2, (128, 128)).unwrap();
        q.k = 3;
        assert!(q.validate().is_err());
        assert!(q.dequantize().iter().all(|v| v.is_nan()));
    }

    #[test]
    fn per_tensor_and_per_channel() {
        let w = [1.0, -2.0, 0.5, 4.0, 0.0, 0.0];
        let (d, s) = quantize_fp8_per_tensor(&w);
        assert_eq!(s, 4.0 / 448.0);
        assert_eq!(e4m3_to_f32(d[3]), 448.0);
        let (d, s) = quantize_fp8_per_channel(&w, 3, 2).unwrap();
        assert_eq!(s, vec![1.0 / 224.0, 4.0 / 448.0, WEIGHT_SCALE_FLOOR]);
        assert_eq!(e4m3_to_f32(d[1]), -448.0);
        assert_eq!(d[4..], [0, 0]);
        let (d, s) = quantize_fp8_per_channel(&[], 3, 0).unwrap();
        assert!(d.is_empty());
        assert_eq!(s, vec![WEIGHT_SCALE_FLOOR; 3]);
        assert!(matches!(
            quantize_fp8_per_channel(&w, 2, 2),
            Err(QuantError::Length {
                expected: 4,
                got: 6,
                ..
            })
        ));
    }
}
