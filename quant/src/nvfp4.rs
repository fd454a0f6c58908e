//! NVFP4: E2M1 values in blocks of 16 along each row, one E4M3 scale per block, and one f32 global scale
//! per tensor that stretches the block scales over E4M3's range.
//!
//! The arithmetic, in this order, each step an IEEE f32 operation rounding to nearest (a GPU kernel that
//! must match uses `__fmul_rn` / `__fdiv_rn`, or plain `*` and `/` without fast-math, and no FMA):
//! - global scale: `gs = 2688 / amax` (2688 = 448 * 6), computed by [`nvfp4_global_scale`];
//! - block scale code: `sf = e4m3((gs * amax_block) / 6)`, `s = decode(sf)`;
//! - value code: `q = e2m1((x * gs) / s)`, or code 0 when `s == 0` (the block is all zero, or so small
//!   next to the tensor's amax that its scale underflows E4M3);
//! - dequantized value: `(e2m1(q) * s) / gs` (the product is exact, so one rounding).
//!
//! `(x * gs) / s` rather than `x * (gs / s)`: with `gs` derived from this tensor, `|x * gs| <= 2688`,
//! so no intermediate overflows however small `s` is. amax uses `f32::max`, which skips NaN; a NaN
//! value then encodes as +6 (what `cvt.rn.satfinite.e2m1x2.f32` gives), and an infinite one as +-6
//! with a saturated block scale of 448.

use crate::act::amax;
use crate::e2m1::{encode_pack_into, E2M1_MAX};
use crate::rows::{for_each_row, for_each_row2};
use crate::shape::{element_count, exact_div, expect_len};
use crate::{e2m1_to_f32, e4m3_from_f32, e4m3_to_f32, QuantError, E4M3_MAX};

/// Elements sharing one NVFP4 block scale.
pub const NVFP4_BLOCK: usize = 16;

/// How an NVFP4 value `v = e2m1(q) * s` (before the division by the global scale) enters a GEMM's
/// products on a GPU without FP4 tensor cores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Nvfp4Products {
    /// As it is. `v` has at most six significant bits, exact in f16, so the products run on the
    /// 16-bit tensor cores and agree with an FP4 tensor core's.
    #[default]
    Exact,
    /// Rounded to E4M3 at an eighth of its size, `8 * e4m3(v / 8)` (round to nearest even; `v / 8`
    /// is at most 336, so nothing saturates), so both operands are E4M3 and the products run on
    /// the FP8 tensor cores, twice the 16-bit rate on Hopper. The rounding adds a relative error
    /// of at most 2^-4 per value, on top of NVFP4's own (2^-2 for E2M1); values with |v| < 1/8
    /// fall in E4M3's subnormals (`v / 8` under 2^-6), with an absolute error of at most 2^-7.
    E4m3,
}

impl Nvfp4Products {
    /// `v` (code times block scale) as the products take it.
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Self::Exact => v,
            Self::E4m3 => 8.0 * e4m3_to_f32(e4m3_from_f32(v * 0.125)),
        }
    }
}

/// An NVFP4 matrix: packed E2M1 codes, E4M3 block scales and the tensor's global scale.
#[derive(Clone, Debug, PartialEq)]
pub struct Nvfp4 {
    /// `[rows, cols / 2]`, element 2i in the low nibble of byte i.
    pub packed: Vec<u8>,
    /// E4M3 block-scale codes, `[rows, cols / 16]` row-major (linear, not swizzled).
    pub scales: Vec<u8>,
    /// `gs`: values were multiplied by it before block scaling; dequantization divides by it.
    pub global_scale: f32,
    pub rows: usize,
    pub cols: usize,
}

/// The global scale `2688 / amax` for a tensor whose absolute maximum is `amax`, so that the largest
/// block scale lands on E4M3's maximum, 448. `amax` must be finite and > 0, and the quotient finite.
pub fn nvfp4_global_scale(amax: f32) -> Result<f32, QuantError> {
    let invalid = QuantError::InvalidScale {
        what: "NVFP4 tensor amax",
        value: amax,
    };
    if !(amax.is_finite() && amax > 0.0) {
        return Err(invalid);
    }
    let gs = (E4M3_MAX * E2M1_MAX) / amax;
    if gs.is_finite() {
        Ok(gs)
    } else {
        Err(invalid)
    }
}

/// Fails unless `gs` is a usable global scale (finite, > 0).
fn check_global_scale(gs: f32) -> Result<(), QuantError> {
    if gs.is_finite() && gs > 0.0 {
        Ok(())
    } else {
        Err(QuantError::InvalidScale {
            what: "NVFP4 global scale",
            value: gs,
        })
    }
}

/// Checks an NVFP4 shape; returns (element count, blocks per row).
fn check_shape(rows: usize, cols: usize) -> Result<(usize, usize), QuantError> {
    let blocks = exact_div("NVFP4 columns / block size", cols, NVFP4_BLOCK)?;
    let len = element_count("NVFP4 [rows, cols]", &[rows, cols])?;
    Ok((len, blocks))
}

/// Quantizes `x` (`[rows, cols]`, `cols` a multiple of 16) to NVFP4 with global scale `global_scale`
/// (usually [`nvfp4_global_scale`] of the tensor's amax; a calibrated one works too).
pub fn quantize_nvfp4(
    x: &[f32],
    rows: usize,
    cols: usize,
    global_scale: f32,
) -> Result<Nvfp4, QuantError> {
    let (len, blocks) = check_shape(rows, cols)?;
    expect_len("NVFP4 input [rows, cols]", len, x.len())?;
    check_global_scale(global_scale)?;
    let gs = global_scale;
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
            for ((xb, pb), sf) in x_row
                .chunks_exact(NVFP4_BLOCK)
                .zip(p_row.chunks_exact_mut(NVFP4_BLOCK / 2))
                .zip(s_row.iter_mut())
            {
                *sf = e4m3_from_f32((gs * amax(xb)) / E2M1_MAX);
                let s = e4m3_to_f32(*sf);
                if s == 0.0 {
                    pb.fill(0);
                } else {
                    encode_pack_into(xb, |v| (v * gs) / s, pb);
                }
            }
        },
    );
    Ok(Nvfp4 {
        packed,
        scales,
        global_scale,
        rows,
        cols,
    })
}

/// Dequantizes NVFP4 (`packed [rows, cols / 2]`, linear E4M3 `scales_linear [rows, cols / 16]`, global
/// scale `global_scale`) into `out` (`[rows, cols]`): `(e2m1(q) * e4m3(sf)) / gs`.
pub fn dequantize_nvfp4_into(
    packed: &[u8],
    scales_linear: &[u8],
    rows: usize,
    cols: usize,
    global_scale: f32,
    out: &mut [f32],
) -> Result<(), QuantError> {
    dequantize_nvfp4_products_into(
        packed,
        scales_linear,
        rows,
        cols,
        global_scale,
        Nvfp4Products::Exact,
        out,
    )
}

/// [`dequantize_nvfp4_into`] with each value `e2m1(q) * s` taken as `products` takes it before
/// the division by the global scale: `products.apply(e2m1(q) * e4m3(sf)) / gs`.
pub fn dequantize_nvfp4_products_into(
    packed: &[u8],
    scales_linear: &[u8],
    rows: usize,
    cols: usize,
    global_scale: f32,
    products: Nvfp4Products,
    out: &mut [f32],
) -> Result<(), QuantError> {
    let (len, blocks) = check_shape(rows, cols)?;
    expect_len("NVFP4 packed [rows, cols / 2]", len / 2, packed.len())?;
    expect_len(
        "NVFP4 scales [rows, cols / 16]",
        rows * blocks,
        scales_linear.len(),
    )?;
    expect_len("NVFP4 output [rows, cols]", len, out.len())?;
    check_global_scale(global_scale)?;
    dequantize_rows(packed, scales_linear, cols, global_scale, products, out);
    Ok(())
}

/// The work of [`dequantize_nvfp4_into`] once the arguments are known to be valid.
fn dequantize_rows(
    packed: &[u8],
    scales: &[u8],
    cols: usize,
    gs: f32,
    products: Nvfp4Products,
    out: &mut [f32],
) {
    let blocks = cols / NVFP4_BLOCK;
    let len = out.len();
    for_each_row(out, cols, len, |r, out_row| {
        let p_row = &packed[r * cols / 2..(r + 1) * cols / 2];
        let s_row = &scales[r * blocks..(r + 1) * blocks];
        for ((ob, pb), &sf) in out_row
            .chunks_exact_mut(NVFP4_BLOCK)
            .zip(p_row.chunks_exact(NVFP4_BLOCK / 2))
            .zip(s_row)
        {
            let s = e4m3_to_f32(sf);
            for (o, &byte) in ob.chunks_exact_mut(2).zip(pb) {
                o[0] = products.apply(e2m1_to_f32(byte) * s) / gs;
                o[1] = products.apply(e2m1_to_f32(byte >> 4) * s) / gs;
            }
        }
    });
}

impl Nvfp4 {
    /// Checks that the public fields describe a consistent matrix (they can be edited by hand).
    pub fn validate(&self) -> Result<(), QuantError> {
        let (len, blocks) = check_shape(self.rows, self.cols)?;
        expect_len("NVFP4 packed [rows, cols / 2]", len / 2, self.packed.len())?;
        expect_len(
            "NVFP4 scales [rows, cols / 16]",
            self.rows * blocks,
            self.scales.len(),
        )?;
        check_global_scale(self.global_scale)
    }

    /// The matrix dequantized, `[rows, cols]`. If the fields were edited into an inconsistent state
    /// ([`Nvfp4::validate`] fails) the result is `2 * packed.len()` NaNs rather than a panic.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_products(Nvfp4Products::Exact)
    }

    /// [`Nvfp4::dequantize`] with each value taken as `products` takes it.
    pub fn dequantize_products(&self, products: Nvfp4Products) -> Vec<f32> {
        let mut out = vec![f32::NAN; 2 * self.packed.len()];
        if self.validate().is_ok() {
            dequantize_rows(
                &self.packed,
                &self.scales,
                self.cols,
                self.global_scale,
                products,
                &mut out,
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_scale() {
        assert_eq!(nvfp4_global_scale(2688.0).unwrap(), 1.0);
        assert_eq!(nvfp4_global_scale(6.0).unwrap(), 448.0);
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY, f32::from_bits(1)] {
            assert!(matches!(
                nvfp4_global_scale(bad),
                Err(QuantError::InvalidScale { .. })
            ));
        }
    }

    #[test]
    fn largest_block_scale_is_448() {
        let mut x = [0.0f32; 32];
        x[0] = 12.0; // tensor amax: gs = 224
        x[16] = -3.0; // second block: 224 * 3 / 6 = 112, exact in E4M3
        x[17] = 1.0; // (1 * 224) / 112 = 2 -> code 4
        x[1] = 2.0; // (2 * 224) / 448 = 1 -> code 2
        let gs = nvfp4_global_scale(12.0).unwrap();
        let q = quantize_nvfp4(&x, 1, 32, gs).unwrap();
        assert_eq!(q.scales, vec![e4m3_from_f32(448.0), e4m3_from_f32(112.0)]);
        assert_eq!(q.packed[0], 7 | (2 << 4));
        assert_eq!(q.packed[8], 15 | (4 << 4));
        assert_eq!(q.dequantize(), x);
    }

    #[test]
    fn e4m3_products_round_each_value_once_to_nearest_even() {
        let p = Nvfp4Products::E4m3;
        // 6 * 448, the largest value: 336 = 1.0101b * 2^8 after the eighth, a tie, to 320
        // (E4M3's largest, 448, is not reached).
        assert_eq!(p.apply(2688.0), 2560.0);
        assert_eq!(p.apply(-2688.0), -2560.0);
        assert_eq!(p.apply(6.0 * 256.0), 1536.0);
        // 1.5 * 1.125 = 1.1011b: a tie between 1.101b and 1.110b, to the even one.
        assert_eq!(p.apply(1.6875), 1.75);
        // 1.5 * 1.375 = 1.0000 1b * 2: below the tie, down.
        assert_eq!(p.apply(2.0625), 2.0);
        assert_eq!(p.apply(0.0), 0.0);
        // Every code times every finite scale: within 2^-4 relative where v / 8 is normal
        // (v >= 2^-3), within half of E4M3's subnormal step times 8 below.
        for sf in 0u8..0x7f {
            let s = e4m3_to_f32(sf);
            for code in 0u8..16 {
                let v = e2m1_to_f32(code) * s;
                let r = p.apply(v);
                assert_eq!(Nvfp4Products::Exact.apply(v), v);
                let err = (r - v).abs();
                if v.abs() >= 0.125 {
                    assert!(err <= v.abs() / 16.0, "{v}: {r}");
                } else {
                    assert!(err <= 8.0 * 2f32.powi(-10), "{v}: {r}");
                }
            }
        }
    }

    /// The GPU kernels quantize without dividing by the block scale: they compare |x * gs| with
    /// the E2M1 grid's boundaries times the scale (exact products) and count the boundaries passed
    /// (`e2m1_code_scaled` in the triton backend's `fp4.cuh`). That gives the code of the correctly
    /// rounded quotient for every E4M3 scale, ties included, as checked here with the same
    /// comparisons: values within 300 ulps of every boundary and grid point times every scale,
    /// and values spread over the grid.
    #[test]
    fn boundaries_times_the_block_scale_give_the_code_of_the_quotient() {
        const BOUNDARIES: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];
        // A tie goes to the even code: at 0.25, 1.25, 2.5 and 5 it stays below the boundary.
        const TIE_STAYS_BELOW: [bool; 7] = [true, false, true, false, true, false, true];
        let by_boundaries = |y: f32, s: f32| -> u8 {
            let a = y.abs();
            let passed = BOUNDARIES
                .iter()
                .zip(TIE_STAYS_BELOW)
                .filter(|&(&m, below)| {
                    let t = m * s;
                    if below {
                        a > t
                    } else {
                        a >= t
                    }
                })
                .count() as u8;
            passed | (u8::from(y.is_sign_negative()) << 3)
        };
        let mut checked = 0usize;
        for sf in 1u8..0x7F {
            let s = e4m3_to_f32(sf);
            let mut check = |y: f32| {
                assert_eq!(
                    by_boundaries(y, s),
                    crate::e2m1_from_f32(y / s),
                    "y = {y:e} ({:#010x}), s = {s:e}",
                    y.to_bits()
                );
                checked += 1;
            };
            for m in BOUNDARIES
                .iter()
                .chain(&[0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0])
            {
                let at = (m * s).to_bits();
                for k in 0..=600u32 {
                    let y = f32::from_bits(at - 300 + k);
                    check(y);
                    check(-y);
                }
            }
            for i in 0..4096 {
                check(((i as f32) - 2048.0) / 2048.0 * 7.0 * s);
            }
        }
        assert!(checked > 126 * 4096);
    }

    #[test]
    fn underflowing_block_scale_zeroes_the_block() {
        let mut x = [0.0f32; 32];
        x[0] = 1.0;
        x[16] = 1e-6; // 2688 * 1e-6 / 6 = 4.5e-4 < 2^-10: scale code 0
        let q = quantize_nvfp4(&x, 1, 32, nvfp4_global_scale(1.0).unwrap()).unwrap();
        assert_eq!(q.scales[1], 0);
        assert!(q.packed[8..].iter().all(|&b| b == 0));
        assert_eq!(q.dequantize()[16], 0.0);
    }

    #[test]
    fn errors_and_empty_shapes() {
        assert!(matches!(
            quantize_nvfp4(&[0.0; 24], 1, 24, 1.0),
            Err(QuantError::NotDivisible {
                value: 24,
                divisor: 16,
                ..
            })
        ));
        assert!(matches!(
            quantize_nvfp4(&[0.0; 16], 1, 16, 0.0),
            Err(QuantError::InvalidScale { .. })
        ));
        assert!(matches!(
            quantize_nvfp4(&[0.0; 16], 2, 16, 1.0),
            Err(QuantError::Length {
                expected: 32,
                got: 16,
                ..
            })
        ));
        let mut out = [0.0; 16];
        assert!(dequantize_nvfp4_into(&[0; 8], &[0x38], 1, 16, f32::NAN, &mut out).is_err());
        assert!(dequantize_nvfp4_into(&[0; 8], &[], 1, 16, 1.0, &mut out).is_err());
        assert!(dequantize_nvfp4_into(&[0; 7], &[0x38], 1, 16, 1.0, &mut out).is_err());
        assert!(dequantize_nvfp4_into(&[0; 8], &[0x38], 1, 16, 1.0, &mut out[..15]).is_err());
        for (r, c) in [(0, 16), (3, 0)] {
            let q = quantize_nvfp4(&[], r, c, 1.0).unwrap();
            assert!(q.packed.is_empty() && q.scales.is_empty() && q.dequantize().is_empty());
        }
        let mut q = quantize_nvfp4(&[1.0; 16], 1, 16, 1.0).unwrap();
        q.global_scale = -1.0;
        assert!(q.validate().is_err());
        assert!(q.dequantize().iter().all(|v| v.is_nan()));
    }
}
