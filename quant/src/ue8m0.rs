//! UE8M0: an unsigned power-of-two scale stored as its biased exponent byte (value 2^(b-127), 255 = NaN),
//! used for MXFP4 block scales and the DeepGEMM-style FP8 activation scales. Scales are rounded *up* so
//! that dividing by the scale never pushes a block's amax past the element format's maximum.

/// The UE8M0 code that means NaN.
const UE8M0_NAN: u8 = 255;
/// Largest finite code (2^127).
const UE8M0_MAX_CODE: u8 = 254;

/// The exponent byte of the smallest power of two >= `scale`, clamped to the finite codes 0..=254
/// (2^-127..=2^127). Zero, negative and tiny scales give 0, +inf and scales above 2^127 give 254,
/// NaN gives 255.
pub fn ue8m0_from_f32_ceil(scale: f32) -> u8 {
    if scale.is_nan() {
        return UE8M0_NAN;
    }
    if scale <= 0.0 {
        return 0;
    }
    let bits = scale.to_bits();
    let exp_field = (bits >> 23) as i32; // sign is 0 here
    let mantissa = bits & 0x007F_FFFF;
    // For a normal f32 (exp_field >= 1) value = 2^(exp_field-127) * (1 + m), so the biased ceil exponent
    // is exp_field, plus one when any mantissa bit is set. A subnormal is mantissa * 2^-149, whose
    // ceil exponent is ceil(log2(mantissa)) - 149, biased: ceil(log2(mantissa)) - 22.
    let biased = if exp_field == 0 {
        let ceil_log2 = 32 - (mantissa - 1).leading_zeros() as i32;
        ceil_log2 - 22
    } else {
        exp_field + i32::from(mantissa != 0)
    };
    biased.clamp(0, i32::from(UE8M0_MAX_CODE)) as u8
}

/// The scale a UE8M0 byte stands for: 2^(b-127), NaN for 255.
pub fn ue8m0_to_f32(b: u8) -> f32 {
    match b {
        UE8M0_NAN => f32::NAN,
        // 2^-127 is an f32 subnormal: only the top mantissa bit set.
        0 => f32::from_bits(1 << 22),
        _ => f32::from_bits(u32::from(b) << 23),
    }
}

/// `scale` rounded up to a power of two, as stored in UE8M0 (same clamping and NaN rules as
/// [`ue8m0_from_f32_ceil`]).
pub fn round_scale_pow2_ceil(scale: f32) -> f32 {
    ue8m0_to_f32(ue8m0_from_f32_ceil(scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powers_of_two_are_exact() {
        for e in -127i32..=127 {
            let v = 2f64.powi(e) as f32;
            let code = ue8m0_from_f32_ceil(v);
            assert_eq!(i32::from(code), e + 127, "2^{e}");
            assert_eq!(ue8m0_to_f32(code), v);
        }
    }

    #[test]
    fn rounds_up_between_powers() {
        assert_eq!(round_scale_pow2_ceil(1.0000001), 2.0);
        assert_eq!(round_scale_pow2_ceil(3.0), 4.0);
        assert_eq!(round_scale_pow2_ceil(0.75), 1.0);
        assert_eq!(round_scale_pow2_ceil(448.0 / 448.0), 1.0);
        assert_eq!(round_scale_pow2_ceil(1e-4 / 448.0), 2f32.powi(-22));
        // Subnormal f32 inputs: just above 2^-127 rounds to 2^-126.
        assert_eq!(ue8m0_from_f32_ceil(f32::from_bits((1 << 22) + 1)), 1);
        assert_eq!(ue8m0_from_f32_ceil(f32::from_bits((1 << 21) + 1)), 0);
    }

    #[test]
    fn clamps_and_nan() {
        assert_eq!(ue8m0_from_f32_ceil(0.0), 0);
        assert_eq!(ue8m0_from_f32_ceil(-3.0), 0);
        assert_eq!(ue8m0_from_f32_ceil(f32::from_bits(1)), 0);
        assert_eq!(ue8m0_from_f32_ceil(f32::MAX), 254);
        assert_eq!(ue8m0_from_f32_ceil(f32::INFINITY), 254);
        assert_eq!(ue8m0_from_f32_ceil(f32::NAN), 255);
        assert!(ue8m0_to_f32(255).is_nan());
        assert!(round_scale_pow2_ceil(f32::NAN).is_nan());
    }

    #[test]
    fn every_code_round_trips() {
        for b in 0u8..=254 {
            assert_eq!(ue8m0_from_f32_ceil(ue8m0_to_f32(b)), b);
        }
    }
}
