//! FP8 conversions against an independent, deliberately plain model: the list of representable values
//! built from the format definition, and round-to-nearest-even by searching that list in f64.

use moe_quant::{e4m3_from_f32, e4m3_to_f32, e5m2_from_f32, e5m2_to_f32, E4M3_MAX, E5M2_MAX};

/// One FP8 format as the model sees it.
struct Format {
    name: &'static str,
    mantissa_bits: u32,
    bias: i32,
    /// Largest finite positive code.
    max_code: u8,
    encode: fn(f32) -> u8,
    decode: fn(u8) -> f32,
}

const E4M3: Format = Format {
    name: "e4m3",
    mantissa_bits: 3,
    bias: 7,
    max_code: 0x7E,
    encode: e4m3_from_f32,
    decode: e4m3_to_f32,
};

const E5M2: Format = Format {
    name: "e5m2",
    mantissa_bits: 2,
    bias: 15,
    max_code: 0x7B,
    encode: e5m2_from_f32,
    decode: e5m2_to_f32,
};

impl Format {
    /// Value of a non-negative finite code, from the definition: subnormal when the exponent field is 0.
    fn value(&self, code: u8) -> f64 {
        let e = i32::from(code >> self.mantissa_bits);
        let m = f64::from(code & ((1 << self.mantissa_bits) - 1));
        let frac = f64::from(1u32 << self.mantissa_bits);
        if e == 0 {
            m / frac * 2f64.powi(1 - self.bias)
        } else {
            (1.0 + m / frac) * 2f64.powi(e - self.bias)
        }
    }

    /// Positive finite values, indexed by code.
    fn values(&self) -> Vec<f64> {
        (0..=self.max_code).map(|c| self.value(c)).collect()
    }

    fn is_nan_code(&self, code: u8) -> bool {
        let mag = code & 0x7F;
        if self.mantissa_bits == 3 {
            mag == 0x7F
        } else {
            mag > 0x7C
        }
    }

    /// Round-to-nearest-even with saturation, by search over the value list.
    fn reference_encode(&self, x: f32, values: &[f64]) -> u8 {
        if x.is_nan() {
            return 0x7F;
        }
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        let a = f64::from(x).abs();
        let top = values.len() - 1;
        if a >= values[top] {
            return sign | top as u8;
        }
        let lo = values.partition_point(|&v| v <= a) - 1;
        // 2a and lo + hi are exact in f64, so the comparison is exact too.
        let (twice, mid2) = (2.0 * a, values[lo] + values[lo + 1]);
        let code = if twice < mid2 || (twice == mid2 && lo % 2 == 0) {
            lo
        } else {
            lo + 1
        };
        sign | code as u8
    }
}

/// A small deterministic generator (splitmix64), so the test needs no RNG crate and is reproducible.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[test]
fn decoding_matches_the_definition() {
    for f in [E4M3, E5M2] {
        for code in 0..=255u8 {
            let got = (f.decode)(code);
            if f.is_nan_code(code) {
                assert!(got.is_nan(), "{} {code:02x}", f.name);
            } else if code & 0x7F > f.max_code {
                assert_eq!(got.abs(), f32::INFINITY, "{} {code:02x}", f.name); // E5M2 +-inf
            } else {
                let v = f.value(code & 0x7F);
                let v = if code & 0x80 != 0 { -v } else { v };
                assert_eq!(f64::from(got), v, "{} {code:02x}", f.name);
                assert_eq!(
                    got.is_sign_negative(),
                    code & 0x80 != 0,
                    "{} {code:02x}",
                    f.name
                );
            }
        }
    }
    assert_eq!(e4m3_to_f32(0x7E), E4M3_MAX);
    assert_eq!(e5m2_to_f32(0x7B), E5M2_MAX);
}

#[test]
fn every_code_round_trips() {
    for f in [E4M3, E5M2] {
        for code in 0..=255u8 {
            let back = (f.encode)((f.decode)(code));
            if f.is_nan_code(code) {
                assert!(f.is_nan_code(back), "{} {code:02x} -> {back:02x}", f.name);
            } else if code & 0x7F > f.max_code {
                // E5M2 infinity saturates to the largest finite value of its sign.
                assert_eq!(back, (code & 0x80) | f.max_code, "{}", f.name);
            } else {
                assert_eq!(back, code, "{} {code:02x}", f.name);
            }
        }
    }
}

#[test]
fn midpoints_round_to_the_even_code() {
    for f in [E4M3, E5M2] {
        let values = f.values();
        for lo in 0..values.len() - 1 {
            let mid = ((values[lo] + values[lo + 1]) / 2.0) as f32;
            assert_eq!(
                f64::from(mid) * 2.0,
                values[lo] + values[lo + 1],
                "midpoint exact"
            );
            let even = if lo % 2 == 0 { lo } else { lo + 1 } as u8;
            assert_eq!((f.encode)(mid), even, "{} midpoint {mid:e}", f.name);
            assert_eq!(
                (f.encode)(-mid),
                even | 0x80,
                "{} midpoint -{mid:e}",
                f.name
            );
            // Just off the midpoint the nearer neighbour wins.
            let below = f32::from_bits(mid.to_bits() - 1);
            let above = f32::from_bits(mid.to_bits() + 1);
            assert_eq!((f.encode)(below), lo as u8, "{} below {mid:e}", f.name);
            assert_eq!((f.encode)(above), lo as u8 + 1, "{} above {mid:e}", f.name);
        }
        // Half of the smallest subnormal ties to zero, and keeps its sign.
        let half_min = (values[1] / 2.0) as f32;
        assert_eq!((f.encode)(half_min), 0);
        assert_eq!((f.encode)(-half_min), 0x80);
        assert_eq!((f.encode)(-0.0), 0x80);
    }
}

#[test]
fn beyond_max_saturates() {
    for (f, max) in [(E4M3, E4M3_MAX), (E5M2, E5M2_MAX)] {
        for x in [
            max,
            f32::from_bits(max.to_bits() + 1),
            max * 1.07,
            max * 1.5,
            1e30,
            f32::MAX,
            f32::INFINITY,
        ] {
            assert_eq!((f.encode)(x), f.max_code, "{} {x:e}", f.name);
            assert_eq!((f.encode)(-x), 0x80 | f.max_code, "{} -{x:e}", f.name);
        }
        assert_eq!((f.encode)(f32::NAN), 0x7F);
        assert_eq!((f.encode)(-f32::NAN), 0x7F);
    }
}

#[test]
fn random_inputs_match_the_reference() {
    let mut rng = SplitMix(0x5EED);
    for f in [E4M3, E5M2] {
        let values = f.values();
        let max_exp = f.value(f.max_code).log2().ceil() as i32 + 2;
        let min_exp = (f.value(1)).log2() as i32 - 3;
        for i in 0..300_000 {
            let r = rng.next();
            let x = match i % 3 {
                // Any bit pattern: covers huge, tiny, NaN and infinite inputs.
                0 => f32::from_bits(r as u32),
                // Log-uniform over the format's range and a little past it.
                1 => {
                    let e = min_exp + (r % (max_exp - min_exp) as u64) as i32;
                    let m = 1.0 + ((r >> 32) as u32 as f64) / f64::from(u32::MAX);
                    let s = if r >> 63 == 1 { -1.0 } else { 1.0 };
                    (s * m * 2f64.powi(e)) as f32
                }
                // A few ulps around a random midpoint.
                _ => {
                    let lo = (r as usize) % (values.len() - 1);
                    let mid = ((values[lo] + values[lo + 1]) / 2.0) as f32;
                    let delta = ((r >> 32) % 7) as i64 - 3;
                    f32::from_bits((i64::from(mid.to_bits()) + delta) as u32)
                }
            };
            assert_eq!(
                (f.encode)(x),
                f.reference_encode(x, &values),
                "{} of {x:e} ({:08x})",
                f.name,
                x.to_bits()
            );
        }
    }
}
