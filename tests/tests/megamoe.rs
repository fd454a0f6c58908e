//! MegaMoE on the CPU: the switch resolution (explicit, environment, weights), the symmetric
//! buffer's size and its refusals, the pre-dispatch padding, and typed errors for bad input.
//! The CPU path against the oracle runs in the conformance suite; the GPU program in
//! `gpu_megamoe.rs`.

use moe_backend_megamoe::flags::{default_scheme, resolve, EnvFlags, Resolved};
use moe_backend_megamoe::{buffer_bytes, cpu, MegaMoeDispatcher, MegaShape};
use moe_conformance::synthetic;
use moe_dispatch::{Dispatcher, DispatcherConfig};
use moe_runner_core::{
    DType, Device, DispatchFormat, MegaMoeFlags, MoeError, MoeRunner, MoeRunnerConfig, QuantScheme,
};

fn env(fp4: Option<bool>, mx: Option<bool>) -> EnvFlags {
    EnvFlags {
        fp4_acts: fp4,
        mxf4_kind: mx,
    }
}

fn flags(fp4: Option<bool>, mx: Option<bool>) -> MegaMoeFlags {
    MegaMoeFlags {
        fp4_acts: fp4,
        mxf4_kind: mx,
    }
}

#[test]
fn an_explicit_switch_wins_over_the_environment() {
    // Explicit FP8 activations with FP8 weights, though the environment asks for FP4.
    let r = resolve(
        flags(Some(false), None),
        env(Some(true), Some(true)),
        QuantScheme::Mxfp4A8,
    );
    // The environment's MXF4 kind still applies to the unset switch: an inconsistent pair.
    assert!(matches!(r, Err(MoeError::Config(_))), "{r:?}");
    let r = resolve(
        flags(Some(false), Some(false)),
        env(Some(true), Some(true)),
        QuantScheme::Mxfp4A8,
    )
    .unwrap();
    assert_eq!(
        r,
        Resolved {
            fp4_acts: false,
            mxf4_kind: false
        }
    );
}

#[test]
fn the_environment_fills_unset_switches_and_the_weights_decide_the_rest() {
    let r = resolve(
        flags(None, None),
        env(None, Some(true)),
        QuantScheme::Mxfp4A4,
    )
    .unwrap();
    assert_eq!(
        r,
        Resolved {
            fp4_acts: true,
            mxf4_kind: true
        }
    );
    let r = resolve(flags(None, None), env(None, None), QuantScheme::Mxfp4A8).unwrap();
    assert!(!r.fp4_acts && !r.mxf4_kind);
    // The environment asks for FP4 activations but the weights are w4a8.
    let e = resolve(
        flags(None, None),
        env(Some(true), None),
        QuantScheme::Mxfp4A8,
    )
    .unwrap_err();
    assert!(e.to_string().contains("MOE_MEGA_FP4_ACTS"), "{e}");
    assert_eq!(
        default_scheme(flags(None, None), env(Some(true), None)),
        QuantScheme::Mxfp4A4
    );
    assert_eq!(
        default_scheme(flags(Some(false), None), env(Some(true), None)),
        QuantScheme::Mxfp4A8
    );
    assert_eq!(
        default_scheme(flags(None, None), env(None, None)),
        QuantScheme::Mxfp4A8
    );
    // Weights that are not MXFP4 with quantized activations.
    assert!(matches!(
        resolve(flags(None, None), env(None, None), QuantScheme::Mxfp4),
        Err(MoeError::UnsupportedScheme { .. })
    ));
}

#[test]
fn environment_values_are_parsed_strictly() {
    let read = |fp4: &str, mx: &str| {
        let (fp4, mx) = (fp4.to_string(), mx.to_string());
        EnvFlags::read(move |n| match n {
            "MOE_MEGA_FP4_ACTS" => Some(fp4.clone()),
            "MOE_MEGA_MXF4_KIND" => Some(mx.clone()),
            _ => None,
        })
    };
    assert_eq!(read("1", "off").unwrap(), env(Some(true), Some(false)));
    assert_eq!(read("", "true").unwrap(), env(None, Some(true)));
    let e = read("maybe", "0").unwrap_err();
    assert!(e.to_string().contains("MOE_MEGA_FP4_ACTS"), "{e}");
}

fn dcfg(tmax: usize) -> DispatcherConfig {
    DispatcherConfig::single(256, 7168, tmax)
        .with_top_k(8)
        .with_intermediate(2048)
}

#[test]
fn the_buffer_size_is_reported_before_allocation() {
    let one = buffer_bytes(&dcfg(128)).unwrap();
    let shape = MegaShape::of(&dcfg(128)).unwrap();
    let l = shape.layout().unwrap();
    assert_eq!(l.bytes, one);
    // The combine slots alone are T * k * H bf16; the received rows R*T*k of H bytes.
    assert!(l.xg - l.y >= 128 * 8 * 7168 * 2);
    assert!(l.wg - l.xg >= 128 * 8 * 7168);
    // Regions are ordered, aligned and inside the buffer.
    let offs = [
        l.ctrl, l.counts, l.x, l.xs, l.ids, l.weights, l.y, l.list, l.xg, l.xgs, l.wg, l.h, l.hs,
    ];
    assert!(offs.windows(2).all(|w| w[0] < w[1]));
    assert!(offs.iter().all(|o| o % 256 == 0) && l.hs < one);
    // Twice the tokens, (about) twice the buffer; more ranks, more received rows.
    let two = buffer_bytes(&dcfg(256)).unwrap();
    assert!(two > one * 19 / 10 && two < one * 21 / 10);
    let world = DispatcherConfig {
        world_size: 2,
        num_local_experts: 128,
        ..dcfg(128)
    };
    assert!(buffer_bytes(&world).unwrap() > one);
}

#[test]
fn sizes_the_kernel_cannot_tile_are_refused() {
    let bad = |c: DispatcherConfig| buffer_bytes(&c).unwrap_err();
    assert!(matches!(
        bad(DispatcherConfig {
            hidden_size: 7200,
            ..dcfg(8)
        }),
        MoeError::NotDivisible { divisor: 128, .. }
    ));
    assert!(matches!(
        bad(dcfg(8).with_intermediate(2000)),
        MoeError::NotDivisible { .. }
    ));
    assert!(matches!(
        bad(dcfg(8).with_intermediate(0)),
        MoeError::NotDivisible { .. }
    ));
    assert!(matches!(bad(dcfg(8).with_top_k(0)), MoeError::Config(_)));
    assert!(matches!(bad(dcfg(usize::MAX / 4)), MoeError::Config(_)));
}

#[test]
fn pre_dispatch_pads_rows_and_slots_past_the_batch() {
    let hidden = synthetic::hidden(3, 256, DType::F32, 1)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let ids = [1, 2, 3, 4, 5, 6];
    let w = [0.5, 0.25, 0.5, 0.25, 0.5, 0.25];
    for fp4 in [false, true] {
        let p = cpu::pre_dispatch(&hidden, 256, (&ids, &w, 2), (5, 3), fp4).unwrap();
        assert_eq!(
            p.ids,
            [1, 2, -1, 3, 4, -1, 5, 6, -1, -1, -1, -1, -1, -1, -1]
        );
        assert_eq!(p.weights[..3], [0.5, 0.25, 0.0]);
        assert!(p.weights[9..].iter().all(|&v| v == 0.0));
        assert_eq!(p.x.len(), 3 * if fp4 { 128 } else { 256 });
        assert_eq!(p.xs.len(), 3 * 8);
    }
}

fn small() -> (MoeRunnerConfig, DispatcherConfig) {
    let cfg = MoeRunnerConfig::new(8, 256, 128, 2);
    let d = DispatcherConfig::single(8, 256, 16)
        .with_top_k(2)
        .with_intermediate(128);
    (cfg, d)
}

#[test]
fn bad_input_gives_typed_errors() {
    moe_conformance::link_backends();
    let (cfg, dc) = small();
    let d = MegaMoeDispatcher::cpu(&dc).unwrap();
    let too_many = synthetic::hidden(17, 256, DType::Bf16, 1).unwrap();
    let topk = synthetic::topk(17, 2, 8, 2, false, false).unwrap();
    assert!(matches!(
        d.dispatch(&too_many, topk),
        Err(MoeError::TooManyTokens { .. })
    ));
    let ints = moe_runner_core::Tensor::zeros(&[2, 256], DType::I32);
    let topk = synthetic::topk(2, 2, 8, 2, false, false).unwrap();
    assert!(matches!(
        d.dispatch(&ints, topk),
        Err(MoeError::DType { .. })
    ));
    // A multi-rank world on the CPU, and a wire format megamoe does not send.
    let two = DispatcherConfig {
        world_size: 2,
        num_local_experts: 4,
        ..dc.clone()
    };
    assert!(matches!(
        MegaMoeDispatcher::cpu(&two),
        Err(MoeError::Config(_))
    ));
    let wire = DispatcherConfig {
        wire: moe_dispatch::Wire::Fp8,
        ..dc.clone()
    };
    assert!(matches!(
        MegaMoeDispatcher::cpu(&wire),
        Err(MoeError::Config(_))
    ));
    // What the fused program does not do, refused when the runner is built.
    for change in [
        (|c: &mut MoeRunnerConfig| c.no_combine = true) as fn(&mut MoeRunnerConfig),
        |c| c.inplace = true,
        |c| c.is_gated = false,
        |c| {
            c.top_k = 1;
            c.apply_router_weight_on_input = true
        },
    ] {
        let mut c = cfg.clone();
        change(&mut c);
        let r = MoeRunner::on_device(
            &Device::cpu(),
            "megamoe",
            DispatchFormat::MegaMoe,
            QuantScheme::Mxfp4A8,
            c,
        );
        assert!(matches!(r, Err(MoeError::Config(_))), "{:?}", r.err());
    }
    // Zero tokens is a valid batch.
    let w = synthetic::weights(
        moe_runner_core::WeightDims {
            experts: 8,
            n1: 256,
            hidden: 256,
            inter: 128,
        },
        QuantScheme::Mxfp4A8,
        3,
        &|_| {},
    )
    .unwrap();
    let runner = MoeRunner::on_device(
        &Device::cpu(),
        "megamoe",
        DispatchFormat::MegaMoe,
        QuantScheme::Mxfp4A8,
        cfg,
    )
    .unwrap();
    let empty = synthetic::hidden(0, 256, DType::Bf16, 1).unwrap();
    let g = d
        .dispatch(&empty, synthetic::topk(0, 2, 8, 2, false, false).unwrap())
        .unwrap();
    let out = d
        .combine(runner.run(g.as_ref(), w.as_ref()).unwrap(), g.as_ref())
        .unwrap();
    assert_eq!(out.shape(), &[0, 256]);
}

#[test]
fn a_moe_layer_routes_and_runs_megamoe() {
    moe_conformance::link_backends();
    let (e, h, i, k, m) = (8, 256, 128, 2, 12);
    let mut cfg = MoeRunnerConfig::new(e, h, i, k);
    cfg.routed_scaling_factor = Some(1.5);
    let dcfg = DispatcherConfig {
        routed_scaling_factor: Some(1.5),
        ..DispatcherConfig::single(e, h, 16)
            .with_top_k(k)
            .with_intermediate(i)
    };
    let router = moe_dispatch::Router {
        method: moe_dispatch::RoutingMethod::Softmax { renormalize: true },
        num_experts: e,
        top_k: k,
        fused_shared_experts: 0,
        fused_shared_weight: 1.0,
    };
    let dims = moe_runner_core::WeightDims {
        experts: e,
        n1: 2 * i,
        hidden: h,
        inter: i,
    };
    let weights = synthetic::weights(dims, QuantScheme::Mxfp4A4, 9, &|_| {}).unwrap();
    let host = moe_runner_core::downcast_quant::<moe_runner_core::Mxfp4Weights>(weights.as_ref())
        .unwrap()
        .to_device(&Device::cpu())
        .unwrap();
    let hidden = synthetic::hidden(m, h, DType::Bf16, 10).unwrap();
    let logits = synthetic::logits(m, e, 11).unwrap();
    let topk = router.route(&logits).unwrap();
    let runner = MoeRunner::on_device(
        &Device::cpu(),
        "megamoe",
        DispatchFormat::MegaMoe,
        QuantScheme::Mxfp4A4,
        cfg.clone(),
    )
    .unwrap();
    let layer = moe_dispatch::MoeLayer::new(
        router,
        Box::new(MegaMoeDispatcher::cpu(&dcfg).unwrap()),
        runner,
        weights,
        None,
    )
    .unwrap();
    let got = layer
        .forward(&hidden, &logits)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let want = cpu::forward(
        &hidden.to_f32_vec().unwrap(),
        topk.ids.as_slice::<i32>().unwrap(),
        topk.weights.as_slice::<f32>().unwrap(),
        k,
        &host,
        &cfg,
        Resolved {
            fp4_acts: true,
            mxf4_kind: false,
        },
    )
    .unwrap();
    assert_eq!(got, want);
    assert!(got.iter().any(|&v| v != 0.0));
}
