//! Per-token group FP8 activations: each row is split into groups of `group` channels (128 in the
//! DeepSeek recipe) with one scale per group, `scale = max(amax, 1e-4) / 448`, optionally rounded up to
//! a power of two (UE8M0), and values stored as E4M3.
//!
//! The quotient is computed as the f32 division `x / scale`, not `x * (1 / scale)`: the two differ in
//! the last bit for some inputs, which can flip an E4M3 rounding, and GPU kernels that must match this
//! reference bit for bit use the IEEE division (`__fdiv_rn`, CUDA's `/` without fast-math).
//!
//! NaN and infinity propagate the way this arithmetic does: amax uses `f32::max`, which (like CUDA's
//! `fmaxf`) skips NaN, so a NaN only makes its own code NaN; an infinity makes the group's scale
//! infinite (2^127 for UE8M0), so its finite neighbours quantize to code 0 (and, with an f32 scale,
//! dequantize to NaN, 0 * inf).

use crate::rows::{for_each_row, for_each_row2};
use crate::shape::{element_count, exact_div, expect_len};
use crate::ue8m0::{round_scale_pow2_ceil, ue8m0_from_f32_ceil};
use crate::{e4m3_from_f32, e4m3_to_f32, QuantError, E4M3_MAX};

/// Floor on a group's amax before dividing by 448, so an all-zero group gets a usable scale.
pub const ACT_AMAX_FLOOR: f32 = 1e-4;

/// How group scales are stored for the GEMM that consumes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleFormat {
    /// Plain f32 scale, `max(amax, 1e-4) / 448`.
    F32,
    /// The same scale rounded up to a power of two, stored on the GPU as its UE8M0 exponent byte.
    Ue8m0,
}

/// E4M3 activations with one scale per `group` channels of each row.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Groups {
    /// E4M3 codes, `[rows, cols]` row-major.
    pub data: Vec<u8>,
    /// `[rows, cols / group]`: the f32 scale each group was divided by (already a power of two when
    /// quantized with [`ScaleFormat::Ue8m0`]).
    pub scales: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
}

/// The scale of one group with absolute maximum `amax`.
fn group_scale(amax: f32, fmt: ScaleFormat) -> f32 {
    let scale = amax.max(ACT_AMAX_FLOOR) / E4M3_MAX;
    match fmt {
        ScaleFormat::F32 => scale,
        ScaleFormat::Ue8m0 => round_scale_pow2_ceil(scale),
    }
}

/// Largest |v| in `xs`, skipping NaN; 0 for an empty slice.
pub(crate) fn amax(xs: &[f32]) -> f32 {
    xs.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Quantizes `x` (`[rows, cols]` row-major) to E4M3 with one scale per `group` consecutive channels.
/// `cols` must be a multiple of `group` (and `group` non-zero); zero rows or columns are valid.
pub fn quantize_fp8_groups(
    x: &[f32],
    rows: usize,
    cols: usize,
    group: usize,
    fmt: ScaleFormat,
) -> Result<Fp8Groups, QuantError> {
    let groups_per_row = exact_div("FP8 activation columns / group size", cols, group)?;
    let len = element_count("FP8 activation [rows, cols]", &[rows, cols])?;
    expect_len("FP8 activation input [rows, cols]", len, x.len())?;
    let mut data = vec![0u8; len];
    let mut scales = vec![0f32; rows * groups_per_row];
    for_each_row2(
        &mut data,
        cols,
        &mut scales,
        groups_per_row,
        len,
        |r, q_row, s_row| {
            let x_row = &x[r * cols..(r + 1) * cols];
            for ((xg, qg), s) in x_row
                .chunks_exact(group)
                .zip(q_row.chunks_exact_mut(group))
                .zip(s_row.iter_mut())
            {
                let scale = group_scale(amax(xg), fmt);
                *s = scale;
                for (q, &v) in qg.iter_mut().zip(xg) {
                    *q = e4m3_from_f32(v / scale);
                }
            }
        },
    );
    Ok(Fp8Groups {
        data,
        scales,
        rows,
        cols,
        group,
    })
}

impl Fp8Groups {
    /// Checks that the public fields describe a consistent tensor (they can be edited by hand).
    pub fn validate(&self) -> Result<(), QuantError> {
        let groups_per_row =
            exact_div("FP8 activation columns / group size", self.cols, self.group)?;
        let len = element_count("FP8 activation [rows, cols]", &[self.rows, self.cols])?;
        expect_len("FP8 activation data [rows, cols]", len, self.data.len())?;
        expect_len(
            "FP8 activation scales [rows, cols / group]",
            self.rows * groups_per_row,
            self.scales.len(),
        )
    }

    /// `e4m3(q) * scale` for every element, `[rows, cols]`. If the fields were edited into an
    /// inconsistent state ([`Fp8Groups::validate`] fails) the result is all NaN rather than a panic.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![f32::NAN; self.data.len()];
        if self.validate().is_err() {
            return out;
        }
        let groups_per_row = self.scales.len() / self.rows.max(1);
        for_each_row(&mut out, self.cols, self.data.len(), |r, out_row| {
            let q_row = &self.data[r * self.cols..(r + 1) * self.cols];
            let s_row = &self.scales[r * groups_per_row..(r + 1) * groups_per_row];
            for ((og, qg), &s) in out_row
                .chunks_exact_mut(self.group)
                .zip(q_row.chunks_exact(self.group))
                .zip(s_row)
            {
                for (o, &q) in og.iter_mut().zip(qg) {
                    *o = e4m3_to_f32(q) * s;
                }
            }
        });
        out
    }

    /// The scales as UE8M0 exponent bytes (the smallest power of two >= each scale). Exact for tensors
    /// quantized with [`ScaleFormat::Ue8m0`]; for [`ScaleFormat::F32`] scales it rounds them up, which
    /// no longer matches the stored codes.
    pub fn ue8m0_scales(&self) -> Vec<u8> {
        self.scales
            .iter()
            .map(|&s| ue8m0_from_f32_ceil(s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        let x = vec![0.0; 256];
        assert!(matches!(
            quantize_fp8_groups(&x, 2, 128, 96, ScaleFormat::F32),
            Err(QuantError::NotDivisible {
                value: 128,
                divisor: 96,
                ..
            })
        ));
        assert!(matches!(
            quantize_fp8_groups(&x, 3, 128, 128, ScaleFormat::F32),
            Err(QuantError::Length {
                expected: 384,
                got: 256,
                ..
            })
        ));
        assert!(matches!(
            quantize_fp8_groups(&x, 2, 128, 0, ScaleFormat::F32),
            Err(QuantError::ZeroSize { .. })
        ));
        assert!(matches!(
            quantize_fp8_groups(&x, usize::MAX, 128, 128, ScaleFormat::F32),
            Err(QuantError::Overflow { .. })
        ));
    }

    #[test]
    fn empty_inputs() {
        for (rows, cols) in [(0, 128), (4, 0), (0, 0)] {
            let q = quantize_fp8_groups(&[], rows, cols, 128, ScaleFormat::Ue8m0).unwrap();
            assert!(q.data.is_empty() && q.scales.is_empty());
            assert!(q.dequantize().is_empty());
        }
    }

    #[test]
    fn scales_follow_the_recipe() {
        let mut x = vec![0.0f32; 256];
        x[5] = -3.0;
        x[200] = 1e-6;
        let q = quantize_fp8_groups(&x, 1, 256, 128, ScaleFormat::F32).unwrap();
        assert_eq!(q.scales, vec![3.0 / 448.0, 1e-4 / 448.0]);
        assert_eq!(e4m3_to_f32(q.data[5]), -448.0);
        let q = quantize_fp8_groups(&x, 1, 256, 128, ScaleFormat::Ue8m0).unwrap();
        assert_eq!(q.scales, vec![2f32.powi(-7), 2f32.powi(-22)]);
        assert_eq!(q.ue8m0_scales(), vec![120, 105]);
        // -3 / 2^-7 = -384 is exact in E4M3.
        assert_eq!(q.dequantize()[5], -3.0);
    }

    #[test]
    fn nan_stays_local_and_inf_zeroes_its_group() {
        let mut x = vec![1.0f32; 8];
        x[1] = f32::NAN;
        x[6] = f32::INFINITY;
        let q = quantize_fp8_groups(&x, 1, 8, 4, ScaleFormat::F32).unwrap();
        let d = q.dequantize();
        assert_eq!(d[0], 1.0);
        assert!(d[1].is_nan());
        assert_eq!(q.data[4], 0);
        assert!(d[4].is_nan()); // 0 * inf
        assert!(d[6].is_nan()); // inf / inf
        let q = quantize_fp8_groups(&x, 1, 8, 4, ScaleFormat::Ue8m0).unwrap();
        let d = q.dequantize();
        assert_eq!(q.scales[1], 2f32.powi(127));
        assert_eq!(d[4], 0.0);
        assert_eq!(d[6], f32::INFINITY); // saturated 448 * 2^127
    }

    #[test]
    fn inconsistent_fields_dequantize_to_nan() {
        let mut q = quantize_fp8_groups(&[1.0; 8], 2, 4, 4, ScaleFormat::F32).unwrap();
        q.scales.pop();
        assert!(q.validate().is_err());
        assert!(q.dequantize().iter().all(|v| v.is_nan()));
    }

    #[test]
    fn large_inputs_take_the_parallel_path_and_agree() {
        let (rows, cols) = (64, 1024);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 - 500.0)
            .collect();
        let q = quantize_fp8_groups(&x, rows, cols, 128, ScaleFormat::F32).unwrap();
        for r in [0, 17, 63] {
            let row =
                quantize_fp8_groups(&x[r * cols..(r + 1) * cols], 1, cols, 128, ScaleFormat::F32)
                    .unwrap();
            assert_eq!(row.data, q.data[r * cols..(r + 1) * cols]);
            assert_eq!(row.scales, q.scales[r * 8..(r + 1) * 8]);
        }
    }
}
