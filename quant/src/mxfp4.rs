//! MXFP4 (OCP microscaling): E2M1 values in blocks of 32 along each row, one UE8M0 (power-of-two)
//! scale per block.
//!
//! Block scale: `ue8m0_ceil(max(amax, 1e-4) / 6)`, with `/ 6` an f32 division, so the block's largest
//! magnitude divided by the scale is at most 6 and nothing saturates. Values: `e2m1(x / scale)`; the
//! scale is a power of two, so this division is exact (equal to multiplying by the reciprocal) and only
//! the E2M1 rounding is lossy. The 1e-4 floor (shared with the FP8 activations and the MegaMoE FP4
//! pre-dispatch) gives an all-zero block a usable scale instead of 2^-127.

use crate::act::{amax, ACT_AMAX_FLOOR};
use crate::e2m1::{encode_pack_into, E2M1_MAX};
use crate::rows::{for_each_row, for_each_row2};
use crate::shape::{element_count, exact_div, expect_len};
use crate::{e2m1_to_f32, ue8m0_from_f32_ceil, ue8m0_to_f32, QuantError};

/// Elements sharing one MXFP4 scale.
pub const MXFP4_BLOCK: usize = 32;

/// An MXFP4 matrix: packed E2M1 codes and UE8M0 block scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Mxfp4 {
    /// `[rows, cols / 2]`, element 2i in the low nibble of byte i.
    pub packed: Vec<u8>,
    /// UE8M0 exponent bytes, `[rows, cols / 32]` row-major (linear, not swizzled).
    pub scales: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

/// Checks an MXFP4 shape; returns (element count, blocks per row).
fn check_shape(rows: usize, cols: usize) -> Result<(usize, usize), QuantError> {
    let blocks = exact_div("MXFP4 columns / block size", cols, MXFP4_BLOCK)?;
    let len = element_count("MXFP4 [rows, cols]", &[rows, cols])?;
    Ok((len, blocks))
}

/// Quantizes `x` (`[rows, cols]`, `cols` a multiple of 32) to MXFP4.
pub fn quantize_mxfp4(x: &[f32], rows: usize, cols: usize) -> Result<Mxfp4, QuantError> {
    let (len, blocks) = check_shape(rows, cols)?;
    expect_len("MXFP4 input [rows, cols]", len, x.len())?;
    let mut packed = vec![0u8; len / 2];
    let mut scales = vec![0u8; rows * blocks];
    for_each_row2(
        &mut packed,
        cols / 2,
        &mut scales,
        blocks,
        len,
        |r, p_row, s_row| {
            let x_row = &x[r * cols..(r + 1) * cols];
            for ((xb, pb), s) in x_row
                .chunks_exact(MXFP4_BLOCK)
                .zip(p_row.chunks_exact_mut(MXFP4_BLOCK / 2))
                .zip(s_row.iter_mut())
            {
                *s = ue8m0_from_f32_ceil(amax(xb).max(ACT_AMAX_FLOOR) / E2M1_MAX);
                let scale = ue8m0_to_f32(*s);
                encode_pack_into(xb, |v| v / scale, pb);
            }
        },
    );
    Ok(Mxfp4 {
        packed,
        scales,
        rows,
        cols,
    })
}

/// Dequantizes MXFP4 (`packed [rows, cols / 2]`, linear `scales [rows, cols / 32]`) into `out`
/// (`[rows, cols]`): `e2m1(code) * 2^(scale - 127)`; a NaN scale byte (255) gives NaN.
pub fn dequantize_mxfp4_into(
    packed: &[u8],
    scales: &[u8],
    rows: usize,
    cols: usize,
    out: &mut [f32],
) -> Result<(), QuantError> {
    let (len, blocks) = check_shape(rows, cols)?;
    expect_len("MXFP4 packed [rows, cols / 2]", len / 2, packed.len())?;
    expect_len(
        "MXFP4 scales [rows, cols / 32]",
        rows * blocks,
        scales.len(),
    )?;
    expect_len("MXFP4 output [rows, cols]", len, out.len())?;
    dequantize_rows(packed, scales, cols, out);
    Ok(())
}

/// The work of [`dequantize_mxfp4_into`] once the shapes are known to agree.
fn dequantize_rows(packed: &[u8], scales: &[u8], cols: usize, out: &mut [f32]) {
    let blocks = cols / MXFP4_BLOCK;
    let len = out.len();
    for_each_row(out, cols, len, |r, out_row| {
        let p_row = &packed[r * cols / 2..(r + 1) * cols / 2];
        let s_row = &scales[r * blocks..(r + 1) * blocks];
        for ((ob, pb), &s) in out_row
            .chunks_exact_mut(MXFP4_BLOCK)
            .zip(p_row.chunks_exact(MXFP4_BLOCK / 2))
            .zip(s_row)
        {
            let scale = ue8m0_to_f32(s);
            for (o, &byte) in ob.chunks_exact_mut(2).zip(pb) {
                o[0] = e2m1_to_f32(byte) * scale;
                o[1] = e2m1_to_f32(byte >> 4) * scale;
            }
        }
    });
}

impl Mxfp4 {
    /// Checks that the public fields describe a consistent matrix (they can be edited by hand).
    pub fn validate(&self) -> Result<(), QuantError> {
        let (len, blocks) = check_shape(self.rows, self.cols)?;
        expect_len("MXFP4 packed [rows, cols / 2]", len / 2, self.packed.len())?;
        expect_len(
            "MXFP4 scales [rows, cols / 32]",
            self.rows * blocks,
            self.scales.len(),
        )
    }

    /// The matrix dequantized, `[rows, cols]`. If the fields were edited into an inconsistent state
    /// ([`Mxfp4::validate`] fails) the result is `2 * packed.len()` NaNs rather than a panic.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![f32::NAN; 2 * self.packed.len()];
        if self.validate().is_ok() {
            dequantize_rows(&self.packed, &self.scales, self.cols, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_block() {
        let mut x = [0.0f32; 32];
        x[0] = 3.0; // amax 3 -> 3 / 6 = 0.5 = 2^-1 -> code 126
        x[1] = -1.5;
        x[2] = 0.2; // 0.4 in scaled units -> 0.5 -> 0.25
        x[3] = 0.1; // 0.2 -> 0
        let q = quantize_mxfp4(&x, 1, 32).unwrap();
        assert_eq!(q.scales, vec![126]);
        // codes: 6 (code 7), -3 (code 13), 0.5 (code 1), 0
        assert_eq!(q.packed[0], 7 | (13 << 4));
        assert_eq!(q.packed[1], 1);
        let d = q.dequantize();
        assert_eq!(d[..4], [3.0, -1.5, 0.25, 0.0]);
    }

    #[test]
    fn zero_block_uses_the_floor_and_scale_rounds_up() {
        let q = quantize_mxfp4(&[0.0; 64], 1, 64).unwrap();
        // 1e-4 / 6 rounds up to 2^-15.
        assert_eq!(q.scales, vec![112, 112]);
        let mut x = [0.0f32; 32];
        x[7] = 6.5; // 6.5 / 6 > 1 -> scale 2
        let q = quantize_mxfp4(&x, 1, 32).unwrap();
        assert_eq!(q.scales, vec![128]);
        assert_eq!(q.dequantize()[7], 6.0);
    }

    #[test]
    fn errors_and_empty_shapes() {
        assert!(matches!(
            quantize_mxfp4(&[0.0; 48], 1, 48),
            Err(QuantError::NotDivisible {
                value: 48,
                divisor: 32,
                ..
            })
        ));
        assert!(matches!(
            quantize_mxfp4(&[0.0; 32], 2, 32),
            Err(QuantError::Length {
                expected: 64,
                got: 32,
                ..
            })
        ));
        let mut out = [0.0; 32];
        assert!(matches!(
            dequantize_mxfp4_into(&[0; 16], &[], 1, 32, &mut out),
            Err(QuantError::Length {
                expected: 1,
                got: 0,
                ..
            })
        ));
        assert!(dequantize_mxfp4_into(&[0; 15], &[127], 1, 32, &mut out).is_err());
        assert!(dequantize_mxfp4_into(&[0; 16], &[127], 1, 32, &mut out[..31]).is_err());
        for (r, c) in [(0, 32), (3, 0)] {
            let q = quantize_mxfp4(&[], r, c).unwrap();
            assert!(q.packed.is_empty() && q.scales.is_empty() && q.dequantize().is_empty());
        }
        let mut q = quantize_mxfp4(&[1.0; 32], 1, 32).unwrap();
        q.rows = 2;
        assert!(q.validate().is_err());
        assert!(q.dequantize().iter().all(|v| v.is_nan()));
    }
}
