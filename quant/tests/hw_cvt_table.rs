//! Checks the FP8 and E2M1 encoders against `data/hw_cvt_table.txt`, measured on an H100 by
//! `tools/cvt_table.cu` over all 2^32 f32 inputs (FP8 by the hardware `cvt.rn.satfinite.*x2.f32`
//! instructions, E2M1 by NVIDIA's `__nv_cvt_float_to_fp4`).
//!
//! The table lists, per format and sign, the bit patterns where the output code changes while walking
//! the magnitudes from 0 up to infinity, and the codes NaN inputs give. The encoders are monotone in
//! the magnitude, so agreeing on both sides of every step means agreeing on every input; the ignored
//! test checks every input directly anyway (`cargo test --release -p moe-quant -- --ignored`).

use moe_quant::{e2m1_from_f32, e4m3_from_f32, e5m2_from_f32};

const TABLE: &str = include_str!("data/hw_cvt_table.txt");

/// An encoder under test: f32 in, code out.
type Encoder = fn(f32) -> u8;

/// One measured conversion: the steps of each sign half and the NaN codes.
struct Measured {
    name: &'static str,
    encode: Encoder,
    /// (first bit pattern, code) in increasing bit order; index 0 is positive, 1 negative.
    steps: [Vec<(u32, u8)>; 2],
    nan_codes: Vec<u8>,
}

fn parse_hex<T: TryFrom<u32>>(s: &str) -> T {
    let v = u32::from_str_radix(s, 16).expect("hex field");
    T::try_from(v).ok().expect("field fits")
}

fn measured() -> Vec<Measured> {
    let formats: [(&str, Encoder); 3] = [
        ("e4m3", e4m3_from_f32),
        ("e5m2", e5m2_from_f32),
        ("e2m1", e2m1_from_f32),
    ];
    formats
        .into_iter()
        .map(|(name, encode)| {
            let mut m = Measured {
                name,
                encode,
                steps: [Vec::new(), Vec::new()],
                nan_codes: Vec::new(),
            };
            for line in TABLE.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                match f.as_slice() {
                    ["step", fmt, bits, code] if *fmt == name => {
                        let bits: u32 = parse_hex(bits);
                        m.steps[(bits >> 31) as usize].push((bits, parse_hex(code)));
                    }
                    ["nan", fmt, _sign, code] if *fmt == name => m.nan_codes.push(parse_hex(code)),
                    _ => {}
                }
            }
            for half in &mut m.steps {
                half.sort_unstable();
            }
            m
        })
        .collect()
}

/// The measured code of `bits` (not NaN), by looking up its step.
fn lookup(steps: &[(u32, u8)], bits: u32) -> u8 {
    let i = steps.partition_point(|&(b, _)| b <= bits);
    steps[i - 1].1
}

#[test]
fn table_is_complete() {
    for m in measured() {
        for (sign, half) in m.steps.iter().enumerate() {
            assert_eq!(
                half.first().map(|s| s.0),
                Some((sign as u32) << 31),
                "{}",
                m.name
            );
        }
        assert!(!m.nan_codes.is_empty(), "{}", m.name);
    }
}

#[test]
fn both_sides_of_every_step_match_the_gpu() {
    for m in measured() {
        for (sign, half) in m.steps.iter().enumerate() {
            let inf = ((sign as u32) << 31) | 0x7F80_0000;
            for (i, &(bits, code)) in half.iter().enumerate() {
                let last = half.get(i + 1).map_or(inf, |&(next, _)| next - 1);
                for b in [bits, last] {
                    let x = f32::from_bits(b);
                    assert_eq!((m.encode)(x), code, "{} of {x:e} ({b:08x})", m.name);
                }
            }
        }
    }
}

#[test]
fn nan_matches_the_gpu() {
    for m in measured() {
        for bits in [0x7FC0_0000u32, 0x7F80_0001, 0x7FFF_FFFF, 0x7FA0_0000] {
            for b in [bits, bits | 0x8000_0000] {
                let code = (m.encode)(f32::from_bits(b));
                assert!(
                    m.nan_codes.contains(&code),
                    "{} NaN {b:08x} -> {code:02x}",
                    m.name
                );
            }
        }
    }
}

#[test]
#[ignore = "walks all 2^32 inputs; run with --release"]
fn every_input_matches_the_gpu() {
    for m in measured() {
        let mismatches = (0u32..=u32::MAX)
            .filter(|&b| {
                let code = (m.encode)(f32::from_bits(b));
                if b & 0x7FFF_FFFF > 0x7F80_0000 {
                    !m.nan_codes.contains(&code)
                } else {
                    code != lookup(&m.steps[(b >> 31) as usize], b)
                }
            })
            .count();
        assert_eq!(mismatches, 0, "{}", m.name);
    }
}
