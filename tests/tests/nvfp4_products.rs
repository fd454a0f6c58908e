//! NVFP4 with E4M3 products on the CPU: the reference rounds each weight value (code times block
//! scale) to E4M3 at an eighth of its size, within the bound `Nvfp4Products` documents, and the
//! layer it computes stays within NVFP4's error of the unquantized one. (The GPU kernels are
//! compared against this reference in `gpu_fp4`.)

use moe_conformance::{suite, synthetic};
use moe_runner_core::{
    downcast_quant, ExpertWeights, MoeRunner, MoeRunnerConfig, Nvfp4Products, Nvfp4Weights, Proj,
    QuantScheme, WeightDims,
};
use moe_runner_core::{DType, DispatchFormat};

#[test]
fn e4m3_products_round_each_weight_within_the_documented_bound() {
    let cfg = MoeRunnerConfig::new(2, 256, 128, 1);
    let q = synthetic::weights(WeightDims::of(&cfg), QuantScheme::Nvfp4, 7, &|_| {}).unwrap();
    let exact = downcast_quant::<Nvfp4Weights>(q.as_ref()).unwrap();
    let e4m3 = exact.clone().with_products(Nvfp4Products::E4m3);
    let (r, c) = WeightDims::of(&cfg).matrix(Proj::W13);
    let (mut a, mut b) = (vec![0f32; r * c], vec![0f32; r * c]);
    let mut rounded = 0;
    for e in 0..cfg.num_local_experts {
        exact.dequantize_expert(Proj::W13, e, &mut a).unwrap();
        e4m3.dequantize_expert(Proj::W13, e, &mut b).unwrap();
        let gs = exact.w13_global[e];
        for (&x, &y) in a.iter().zip(&b) {
            // |v| >= 1/8 (v = x * gs): within 2^-4 relative; below, 2^-7 absolute (in v).
            let bound = (x.abs() / 16.0).max(2f32.powi(-7) / gs) * 1.0001;
            assert!((x - y).abs() <= bound, "expert {e}: {x} -> {y}");
            rounded += usize::from(x != y);
        }
    }
    // Values with five or six significant bits are rounded: a good share of them.
    assert!(
        rounded * 10 > 2 * r * c,
        "{rounded} of {} rounded",
        2 * r * c
    );
}

#[test]
fn the_e4m3_reference_layer_stays_within_nvfp4_error() {
    moe_conformance::link_backends();
    let cfg = MoeRunnerConfig::new(4, 256, 128, 2);
    let q = synthetic::weights(WeightDims::of(&cfg), QuantScheme::Nvfp4, 11, &|_| {}).unwrap();
    let dense = synthetic::weights(WeightDims::of(&cfg), QuantScheme::Bf16, 11, &|_| {}).unwrap();
    let e4m3 = downcast_quant::<Nvfp4Weights>(q.as_ref())
        .unwrap()
        .clone()
        .with_products(Nvfp4Products::E4m3);
    let m = 24;
    let hidden = synthetic::hidden(m, cfg.hidden_size, DType::Bf16, 12).unwrap();
    let topk = synthetic::topk(m, cfg.top_k, cfg.num_experts, 13, true, false).unwrap();
    let run = |scheme, w: &dyn moe_runner_core::QuantInfo| {
        let r = MoeRunner::new("reference", DispatchFormat::Standard, scheme, cfg.clone()).unwrap();
        let t = moe_runner_core::TopK::new(topk.ids.clone(), topk.weights.clone()).unwrap();
        suite::run_path(&r, &hidden, t, w).unwrap()
    };
    let exact = run(QuantScheme::Nvfp4, q.as_ref());
    let rounded = run(QuantScheme::Nvfp4, &e4m3);
    let plain = run(QuantScheme::Bf16, dense.as_ref());
    let gap = suite::compare(&rounded, &exact).unwrap();
    let e = suite::compare(&exact, &plain).unwrap();
    let r = suite::compare(&rounded, &plain).unwrap();
    eprintln!("E4M3 vs exact {gap:?}; exact vs bf16 {e:?}; E4M3 vs bf16 {r:?}");
    assert!(gap.rel_l2 > 1e-3, "E4M3 products changed nothing: {gap:?}");
    assert!(
        r.within(suite::tolerance(QuantScheme::Nvfp4) * 6.0),
        "{r:?}"
    );
    assert!(r.rel_l2 < 1.5 * e.rel_l2, "E4M3 {r:?} against exact {e:?}");
}
