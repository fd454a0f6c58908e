//! Every registered path that computes on the CPU, for every scheme it declares and every
//! config variant, against the independent naive oracle on fresh random inputs.

use moe_conformance::cases::{base_config, hidden_dtype, TOKENS, VARIANTS};
use moe_conformance::{oracle::naive_moe, suite, synthetic};
use moe_runner_core::registry::{registered_paths, DeviceKind};
use moe_runner_core::{Device, DispatchFormat, MoeRunner, WeightDims};

#[test]
fn every_cpu_path_matches_the_oracle() {
    moe_conformance::link_backends();
    let paths: Vec<_> = registered_paths()
        .into_iter()
        .filter(|p| p.device == DeviceKind::Cpu)
        .collect();
    assert!(!paths.is_empty(), "no CPU paths registered");
    let mut checked = 0;
    let mut failures = Vec::new();
    for path in &paths {
        for &scheme in path.schemes {
            for (vi, variant) in VARIANTS.iter().enumerate() {
                if path.format != DispatchFormat::Standard && !variant.masked_ok {
                    continue;
                }
                if path.format == DispatchFormat::MegaMoe && !variant.megamoe_ok {
                    continue;
                }
                let mut cfg = base_config();
                (variant.apply)(&mut cfg);
                let dims = WeightDims::of(&cfg);
                let seed = 1000 + vi as u64 * 31 + scheme as u64;
                let quant = synthetic::weights(dims, scheme, seed, &|_| {}).unwrap();
                let runner = MoeRunner::on_device(
                    &Device::cpu(),
                    path.runner,
                    path.format,
                    scheme,
                    cfg.clone(),
                )
                .unwrap();
                for &m in TOKENS {
                    let hidden = synthetic::hidden(
                        m,
                        cfg.hidden_size,
                        hidden_dtype(scheme),
                        seed + m as u64,
                    )
                    .unwrap();
                    let topk =
                        synthetic::topk(m, cfg.top_k, cfg.num_experts, seed ^ 77, m > 8, m > 8)
                            .unwrap();
                    let want = naive_moe(
                        &hidden.to_f32_vec().unwrap(),
                        &topk,
                        quant.as_ref(),
                        &cfg,
                        hidden.dtype(),
                    )
                    .unwrap();
                    let got = suite::run_path(&runner, &hidden, topk, quant.as_ref()).unwrap();
                    assert_eq!(
                        got.len(),
                        want.len(),
                        "{path} {scheme} {}: output size",
                        variant.name
                    );
                    let c = suite::compare(&got, &want).unwrap();
                    if !c.within(suite::tolerance(scheme)) {
                        failures.push(format!(
                            "{path} scheme {scheme} variant {} M={m}: {c:?}",
                            variant.name
                        ));
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} cases out of tolerance:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        checked >= 2 * 8 * 8 * TOKENS.len(),
        "only {checked} cases ran"
    );
}

/// The comparison is not vacuous: a wrong gate/up order is caught at every scheme's tolerance.
#[test]
fn the_suite_detects_a_wrong_result() {
    moe_conformance::link_backends();
    let cfg = base_config();
    let dims = WeightDims {
        experts: 8,
        n1: 256,
        hidden: 256,
        inter: 128,
    };
    for scheme in moe_runner_core::QuantScheme::ALL {
        let quant = synthetic::weights(dims, scheme, 5, &|_| {}).unwrap();
        let hidden = synthetic::hidden(16, 256, hidden_dtype(scheme), 6).unwrap();
        let topk = synthetic::topk(16, 2, 8, 7, false, false).unwrap();
        let mut wrong = cfg.clone();
        wrong.gate_up = moe_runner_core::GateUpLayout::UpGate;
        let runner = MoeRunner::on_device(
            &Device::cpu(),
            "reference",
            DispatchFormat::Standard,
            scheme,
            wrong,
        )
        .unwrap();
        let want = naive_moe(
            &hidden.to_f32_vec().unwrap(),
            &topk,
            quant.as_ref(),
            &cfg,
            hidden.dtype(),
        )
        .unwrap();
        let got = suite::run_path(&runner, &hidden, topk, quant.as_ref()).unwrap();
        let c = suite::compare(&got, &want).unwrap();
        assert!(
            !c.within(suite::tolerance(scheme)),
            "{scheme}: a swapped gate/up passed: {c:?}"
        );
    }
}
