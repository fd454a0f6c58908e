//! E2M1 (FP4) scalar codes and nibble packing. Codes 0..=7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6 and bit 3 is
//! the sign. Two codes share a byte: element 2i in the low nibble, element 2i+1 in the high nibble.
//!
//! Encoding uses the `float4` crate, a port of NVIDIA's `__nv_cvt_float_to_fp4` (the reference for
//! `cvt.rn.satfinite.e2m1x2.f32`): round to nearest, ties to the even code, magnitudes above 6 and
//! +-inf saturate to +-6, -0 and negative values that round to zero keep the sign (code 8), and NaN
//! (which E2M1 cannot represent) becomes +6 (code 7) whatever its sign. `tests/hw_cvt_table.rs` checks
//! this against a table of all 2^32 f32 inputs measured on an H100.

use float4::F4E2M1;

use crate::QuantError;

/// Magnitudes of codes 0..=7.
const E2M1_VALUES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;

/// Encodes `x` to a 4-bit E2M1 code (in the low nibble), rounding like `cvt.rn.satfinite.e2m1x2.f32`.
pub fn e2m1_from_f32(x: f32) -> u8 {
    F4E2M1::from_f64(f64::from(x)).to_bits() & 0x0F
}

/// The value of an E2M1 code. Only the low nibble is read, so a byte holding a code in its low half
/// decodes the same as the bare code.
pub fn e2m1_to_f32(code: u8) -> f32 {
    let magnitude = E2M1_VALUES[usize::from(code & 0x07)];
    if code & 0x08 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

/// Packs 4-bit codes two to a byte (element 2i low nibble, 2i+1 high). An odd count or a code above 15
/// is an error.
pub fn pack_e2m1(codes: &[u8]) -> Result<Vec<u8>, QuantError> {
    let bytes = crate::shape::exact_div("E2M1 code count", codes.len(), 2)?;
    if let Some(&bad) = codes.iter().find(|&&c| c > 0x0F) {
        return Err(QuantError::InvalidCode {
            what: "E2M1 code to pack",
            value: bad,
        });
    }
    let mut packed = Vec::with_capacity(bytes);
    packed.extend(codes.chunks_exact(2).map(|p| p[0] | (p[1] << 4)));
    Ok(packed)
}

/// Unpacks bytes into 4-bit codes, two per byte, low nibble first.
pub fn unpack_e2m1(packed: &[u8]) -> Vec<u8> {
    packed.iter().flat_map(|&b| [b & 0x0F, b >> 4]).collect()
}

/// Encodes `map(x)` for each `x` of `xs` and packs the codes into `out`, two per byte; the caller
/// passes `out.len() * 2 == xs.len()`.
pub(crate) fn encode_pack_into(xs: &[f32], map: impl Fn(f32) -> f32, out: &mut [u8]) {
    for (byte, pair) in out.iter_mut().zip(xs.chunks_exact(2)) {
        *byte = e2m1_from_f32(map(pair[0])) | (e2m1_from_f32(map(pair[1])) << 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for code in 0u8..16 {
            assert_eq!(e2m1_from_f32(e2m1_to_f32(code)), code, "code {code}");
        }
        assert_eq!(e2m1_to_f32(0x08).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn ties_go_to_even_code() {
        // (midpoint, code it rounds to): each tie picks the neighbour whose code is even.
        let ties = [
            (0.25, 0),
            (0.75, 2),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
        ];
        for (x, code) in ties {
            assert_eq!(e2m1_from_f32(x), code, "{x}");
            assert_eq!(e2m1_from_f32(-x), code | 8, "-{x}");
        }
    }

    #[test]
    fn saturates_and_nan() {
        assert_eq!(e2m1_from_f32(6.5), 7);
        assert_eq!(e2m1_from_f32(1e30), 7);
        assert_eq!(e2m1_from_f32(f32::INFINITY), 7);
        assert_eq!(e2m1_from_f32(f32::NEG_INFINITY), 15);
        assert_eq!(e2m1_from_f32(f32::NAN), 7);
        assert_eq!(e2m1_from_f32(-f32::NAN), 7);
        assert_eq!(e2m1_from_f32(-0.1), 8);
    }

    #[test]
    fn packing() {
        let codes = [1u8, 2, 15, 0, 7, 8];
        let packed = pack_e2m1(&codes).unwrap();
        assert_eq!(packed, vec![0x21, 0x0F, 0x87]);
        assert_eq!(unpack_e2m1(&packed), codes);
        assert!(pack_e2m1(&[]).unwrap().is_empty());
        assert!(unpack_e2m1(&[]).is_empty());
        assert!(matches!(
            pack_e2m1(&[1, 2, 3]),
            Err(QuantError::NotDivisible {
                value: 3,
                divisor: 2,
                ..
            })
        ));
        assert!(matches!(
            pack_e2m1(&[1, 16]),
            Err(QuantError::InvalidCode { value: 16, .. })
        ));
    }
}
