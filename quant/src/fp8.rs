//! FP8 scalar conversions (E4M3 "fn" and E5M2), bit-exact with the GPU's
//! `cvt.rn.satfinite.e4m3x2.f32` / `cvt.rn.satfinite.e5m2x2.f32`: round to nearest even, finite
//! overflow and +-inf saturate to +-max finite, subnormals rounded exactly, -0 kept.
//!
//! Encoding uses the `float8` crate, whose `from_f32` widens to f64 (exact) and rounds once with
//! NVIDIA's host algorithm in saturate-finite mode; `tests/hw_cvt_table.rs` checks it against a table
//! measured on an H100 for all 2^32 inputs. The one place it differs from the hardware is NaN: the crate
//! keeps the input's sign (and for E5M2 its top payload bits), while the hardware always returns the
//! positive canonical code 0x7F for both formats, so NaN is handled here before calling the crate.

use float8::{F8E4M3, F8E5M2};

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Largest finite E5M2 value.
pub const E5M2_MAX: f32 = 57344.0;
/// The code the GPU produces for any NaN input, in both FP8 formats.
const FP8_CANONICAL_NAN: u8 = 0x7F;

/// Encodes `x` as E4M3 the way `cvt.rn.satfinite.e4m3x2.f32` does (NaN gives 0x7F).
pub fn e4m3_from_f32(x: f32) -> u8 {
    if x.is_nan() {
        FP8_CANONICAL_NAN
    } else {
        F8E4M3::from_f32(x).to_bits()
    }
}

/// Decodes an E4M3 byte; 0x7F and 0xFF are NaN, every other code is finite.
pub fn e4m3_to_f32(b: u8) -> f32 {
    F8E4M3::from_bits(b).to_f32()
}

/// Encodes `x` as E5M2 the way `cvt.rn.satfinite.e5m2x2.f32` does (NaN gives 0x7F, infinities
/// saturate to +-57344, so the infinity codes are never produced).
pub fn e5m2_from_f32(x: f32) -> u8 {
    if x.is_nan() {
        FP8_CANONICAL_NAN
    } else {
        F8E5M2::from_f32(x).to_bits()
    }
}

/// Decodes an E5M2 byte; 0x7C/0xFC are +-inf and 0x7D..=0x7F, 0xFD..=0xFF are NaN.
pub fn e5m2_to_f32(b: u8) -> f32 {
    F8E5M2::from_bits(b).to_f32()
}
