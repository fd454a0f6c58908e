//! The registry is filled by the linked backends, has no ambiguous keys, and its lookups fail
//! with errors that list what is registered.

use moe_runner_core::registry::{duplicate_keys, registered_paths, runner_names, PathKind};
use moe_runner_core::{DispatchFormat, MoeError, MoeRunner, MoeRunnerConfig, QuantScheme};

fn cfg() -> MoeRunnerConfig {
    MoeRunnerConfig::new(8, 256, 128, 2)
}

#[test]
fn registry_is_filled_and_unambiguous() {
    moe_conformance::link_backends();
    let paths = registered_paths();
    assert!(!paths.is_empty());
    assert!(
        duplicate_keys().is_empty(),
        "duplicate keys: {:?}",
        duplicate_keys()
    );
    for format in [DispatchFormat::Standard, DispatchFormat::DeepEpLowLatency] {
        let p = paths
            .iter()
            .find(|p| p.runner == "reference" && p.format == format)
            .expect("reference path");
        assert_eq!(p.kind, PathKind::Composed);
        assert_eq!(p.schemes, &QuantScheme::ALL[..]);
    }
    assert!(runner_names().contains(&"reference"));
    assert!(moe_dispatch::a2a_backends()
        .any(|b| b.name == "standard" && b.format == DispatchFormat::Standard));
    assert!(moe_dispatch::a2a_backends()
        .any(|b| b.name == "local_masked" && b.format == DispatchFormat::DeepEpLowLatency));
}

#[test]
fn unknown_runner_lists_the_known_ones() {
    moe_conformance::link_backends();
    let err = MoeRunner::new(
        "no_such_runner",
        DispatchFormat::Standard,
        QuantScheme::Bf16,
        cfg(),
    )
    .unwrap_err();
    match &err {
        MoeError::Unknown { name, known, .. } => {
            assert_eq!(name, "no_such_runner");
            assert!(known.contains("reference"), "{err}");
        }
        other => panic!("expected Unknown, got {other}"),
    }
}

#[test]
fn missing_format_fails_at_construction_with_the_registered_list() {
    moe_conformance::link_backends();
    let err = MoeRunner::new(
        "reference",
        DispatchFormat::MegaMoe,
        QuantScheme::Bf16,
        cfg(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, MoeError::NoPath { .. }), "{msg}");
    assert!(
        msg.contains("(standard, reference)") && msg.contains("(deepep_ll, reference)"),
        "{msg}"
    );
}

#[test]
fn invalid_config_fails_at_construction() {
    moe_conformance::link_backends();
    let mut c = cfg();
    c.gemm1_alpha = Some(1.0); // needs swiglu_limit
    let err =
        MoeRunner::new("reference", DispatchFormat::Standard, QuantScheme::Bf16, c).unwrap_err();
    assert!(matches!(err, MoeError::Config(_)), "{err}");
}
