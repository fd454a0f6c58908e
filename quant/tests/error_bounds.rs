//! Property tests: quantize-then-dequantize stays within the rounding error each format allows, scales
//! follow their recipes, and the layouts round-trip, for random shapes and values.

use moe_quant::*;
use proptest::prelude::*;

/// Values spanning many binades (and exact zeros), as activations and weights do.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => (-24i32..24, -1.0f32..1.0).prop_map(|(e, m)| m * 2f32.powi(e)),
        1 => -500.0f32..500.0,
        1 => Just(0.0f32),
    ]
}

/// `(rows, cols, data)` with `cols = multiple * unit`.
fn matrix(
    max_rows: usize,
    unit: usize,
    max_mult: usize,
) -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (0..=max_rows, 0..=max_mult).prop_flat_map(move |(r, m)| {
        let c = m * unit;
        (Just(r), Just(c), proptest::collection::vec(value(), r * c))
    })
}

fn amax(xs: &[f32]) -> f32 {
    xs.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Largest error E4M3 rounding may add to `x` quantized with `scale`: half an ulp, which is at most
/// 2^-4 of the value in the normal range (3 mantissa bits) and scale * 2^-10 in the subnormal range
/// (spacing 2^-9); plus a little for the f32 division and product.
fn e4m3_bound(x: f32, scale: f32) -> f64 {
    let (x, scale) = (f64::from(x), f64::from(scale));
    let y = (x / scale).abs();
    let rounding = if y >= 2f64.powi(-6) {
        x.abs() / 16.0
    } else {
        scale * 2f64.powi(-10)
    };
    rounding + x.abs() * 2f64.powi(-20)
}

/// Half the E2M1 grid spacing at magnitude `y` (in scaled units): 0.25 up to 2, 0.5 up to 4, then 1.
fn e2m1_half_spacing(y: f64) -> f64 {
    if y <= 2.0 {
        0.25
    } else if y <= 4.0 {
        0.5
    } else {
        1.0
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fp8_groups_error_bound(
        (group, (rows, cols, x)) in prop_oneof![Just(16usize), Just(32), Just(128)]
            .prop_flat_map(|g| (Just(g), matrix(5, g, 3))),
        ue8m0 in any::<bool>(),
    ) {
        let fmt = if ue8m0 { ScaleFormat::Ue8m0 } else { ScaleFormat::F32 };
        let q = quantize_fp8_groups(&x, rows, cols, group, fmt).unwrap();
        prop_assert_eq!(q.scales.len(), rows * cols / group);
        let d = q.dequantize();
        for (i, (&v, &back)) in x.iter().zip(&d).enumerate() {
            let g = i / group;
            let scale = q.scales[g];
            let want = amax(&x[g * group..(g + 1) * group]).max(1e-4) / 448.0;
            if ue8m0 {
                prop_assert!(scale >= want && scale < 2.0 * want && scale == round_scale_pow2_ceil(scale));
            } else {
                prop_assert_eq!(scale, want);
            }
            let err = f64::from((v - back).abs());
            prop_assert!(err <= e4m3_bound(v, scale), "x={} back={} scale={}", v, back, scale);
        }
        if ue8m0 {
            let bytes = q.ue8m0_scales();
            for (&b, &s) in bytes.iter().zip(&q.scales) {
                prop_assert_eq!(ue8m0_to_f32(b), s);
            }
        }
    }

    #[test]
    fn fp8_blocks_error_bound(
        batch in 0usize..3,
        n in 0usize..40,
        k in 0usize..40,
        block in prop_oneof![Just((128, 128)), Just((8, 16)), Just((3, 5)), Just((1, 1))],
        seed in proptest::collection::vec(value(), 1..64),
    ) {
        let w: Vec<f32> = (0..batch * n * k).map(|i| seed[i % seed.len()] * (1.0 + i as f32 * 1e-3)).collect();
        let q = quantize_fp8_blocks(&w, batch, n, k, block).unwrap();
        let (nb, kb) = (n.div_ceil(block.0), k.div_ceil(block.1));
        prop_assert_eq!(q.scales.len(), batch * nb * kb);
        let d = q.dequantize();
        for b in 0..batch {
            let mut one = vec![0.0; n * k];
            dequantize_fp8_blocks_into(
                &q.data[b * n * k..(b + 1) * n * k],
                &q.scales[b * nb * kb..(b + 1) * nb * kb],
                n, k, block, &mut one,
            ).unwrap();
            prop_assert_eq!(&one[..], &d[b * n * k..(b + 1) * n * k]);
            for r in 0..n {
                for c in 0..k {
                    let i = b * n * k + r * k + c;
                    let scale = q.scales[b * nb * kb + (r / block.0) * kb + c / block.1];
                    let err = f64::from((w[i] - d[i]).abs());
                    prop_assert!(err <= e4m3_bound(w[i], scale), "w={} back={} scale={}", w[i], d[i], scale);
                }
            }
        }
    }

    #[test]
    fn fp8_per_channel_error_bound((rows, cols, w) in matrix(6, 1, 70)) {
        let (data, scales) = quantize_fp8_per_channel(&w, rows, cols).unwrap();
        prop_assert_eq!(scales.len(), rows);
        for (i, &v) in w.iter().enumerate() {
            let s = scales[i / cols];
            prop_assert_eq!(s, (amax(&w[i / cols * cols..(i / cols + 1) * cols]) / 448.0).max(1e-12));
            let err = f64::from((v - e4m3_to_f32(data[i]) * s).abs());
            prop_assert!(err <= e4m3_bound(v, s));
        }
        let (data, s) = quantize_fp8_per_tensor(&w);
        for (&v, &c) in w.iter().zip(&data) {
            prop_assert!(f64::from((v - e4m3_to_f32(c) * s).abs()) <= e4m3_bound(v, s));
        }
    }

    #[test]
    fn mxfp4_error_bound((rows, cols, x) in matrix(4, 32, 3)) {
        let q = quantize_mxfp4(&x, rows, cols).unwrap();
        let d = q.dequantize();
        let mut out = vec![0.0; rows * cols];
        dequantize_mxfp4_into(&q.packed, &q.scales, rows, cols, &mut out).unwrap();
        prop_assert_eq!(&out, &d);
        for (i, (&v, &back)) in x.iter().zip(&d).enumerate() {
            let b = i / 32;
            let scale = ue8m0_to_f32(q.scales[b]);
            let want = amax(&x[b * 32..(b + 1) * 32]).max(1e-4) / 6.0;
            prop_assert!(scale >= want && scale < 2.0 * want);
            let y = f64::from(v) / f64::from(scale);
            prop_assert!(y.abs() <= 6.0);
            let err = f64::from((v - back).abs());
            prop_assert!(err <= e2m1_half_spacing(y.abs()) * f64::from(scale), "x={} back={} scale={}", v, back, scale);
        }
    }

    #[test]
    fn nvfp4_error_bound((rows, cols, x) in matrix(4, 16, 4), calibrated in any::<bool>()) {
        let tensor_amax = amax(&x);
        // A calibrated global scale from a larger amax leaves E4M3 headroom unused; from the data it
        // puts the largest block scale at 448.
        let gs = if tensor_amax == 0.0 { 1.0 } else if calibrated {
            nvfp4_global_scale(tensor_amax * 3.0).unwrap()
        } else {
            nvfp4_global_scale(tensor_amax).unwrap()
        };
        let q = quantize_nvfp4(&x, rows, cols, gs).unwrap();
        let d = q.dequantize();
        let mut out = vec![0.0; rows * cols];
        dequantize_nvfp4_into(&q.packed, &q.scales, rows, cols, gs, &mut out).unwrap();
        prop_assert_eq!(&out, &d);
        for (i, (&v, &back)) in x.iter().zip(&d).enumerate() {
            let b = i / 16;
            let block_amax = amax(&x[b * 16..(b + 1) * 16]);
            prop_assert_eq!(q.scales[b], e4m3_from_f32((gs * block_amax) / 6.0));
            let s = f64::from(e4m3_to_f32(q.scales[b]));
            let (v64, gs64) = (f64::from(v), f64::from(gs));
            let err = (v64 - f64::from(back)).abs();
            if s == 0.0 {
                // The whole block rounded to a zero scale: gs * amax / 6 <= 2^-10.
                prop_assert_eq!(back, 0.0);
                prop_assert!(f64::from(block_amax) * gs64 / 6.0 <= 2f64.powi(-10));
                continue;
            }
            // E2M1 rounding at y = x * gs / s, plus saturation when the E4M3 block scale was rounded
            // down and y slightly exceeds 6, in units of s / gs; and slack for the f32 steps.
            let y = (v64 * gs64 / s).abs();
            let units = e2m1_half_spacing(y.min(6.0)) + (y - 6.0).max(0.0) + y * 2f64.powi(-20);
            let bound = units * s / gs64 + v64.abs() * 2f64.powi(-20);
            prop_assert!(err <= bound, "x={} back={} s={} gs={}", v, back, s, gs);
            // With a normal block scale (relative E4M3 error <= 2^-4), that is at most one top-band
            // half step of the ideal scale amax_block / 6, grown by the scale's rounding.
            let ideal = gs64 * f64::from(block_amax) / 6.0;
            if ideal >= 2f64.powi(-6) {
                let loose = f64::from(block_amax) / 6.0 * (17.0 / 16.0) * (1.0 + 2f64.powi(-18));
                prop_assert!(err <= loose, "x={} back={} block amax={}", v, back, block_amax);
            }
        }
    }

    #[test]
    fn swizzle_round_trip(rows in 0usize..300, k_sf in 0usize..20, seed in any::<u8>()) {
        let linear: Vec<u8> = (0..rows * k_sf).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect();
        let sw = swizzle_scales_128x4(&linear, rows, k_sf).unwrap();
        prop_assert_eq!(sw.len(), swizzled_len(rows, k_sf));
        // Every linear byte is odd, so the non-zero bytes are exactly the real scales.
        prop_assert_eq!(sw.iter().filter(|&&b| b != 0).count(), rows * k_sf);
        prop_assert_eq!(unswizzle_scales_128x4(&sw, rows, k_sf).unwrap(), linear);
    }

    #[test]
    fn e2m1_pack_round_trip(codes in proptest::collection::vec(0u8..16, 0..40)) {
        let even = &codes[..codes.len() / 2 * 2];
        let packed = pack_e2m1(even).unwrap();
        prop_assert_eq!(packed.len(), even.len() / 2);
        prop_assert_eq!(unpack_e2m1(&packed), even.to_vec());
    }
}
