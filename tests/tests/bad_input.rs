//! Bad input gets a typed error naming what was expected; zero tokens is valid; NaN propagates
//! per token as the reference computes it.

use moe_conformance::{suite, synthetic};
use moe_dispatch::{make_dispatcher, DispatcherConfig};
use moe_runner_core::{
    DType, DeepEpLlDispatchOutput, DispatchFormat, MoeError, MoeRunner, MoeRunnerConfig,
    QuantScheme, StandardDispatchOutput, Tensor, TopK, WeightDims,
};

fn cfg() -> MoeRunnerConfig {
    MoeRunnerConfig::new(8, 256, 128, 2)
}

fn runner(format: DispatchFormat, scheme: QuantScheme) -> MoeRunner {
    moe_conformance::link_backends();
    MoeRunner::new("reference", format, scheme, cfg()).unwrap()
}

#[test]
fn zero_tokens_give_an_empty_result() {
    let r = runner(DispatchFormat::Standard, QuantScheme::Bf16);
    let quant = synthetic::weights(WeightDims::of(&cfg()), QuantScheme::Bf16, 1, &|_| {}).unwrap();
    let hidden = synthetic::hidden(0, 256, DType::Bf16, 2).unwrap();
    let out = suite::run_path(
        &r,
        &hidden,
        synthetic::topk(0, 2, 8, 3, false, false).unwrap(),
        quant.as_ref(),
    )
    .unwrap();
    assert!(out.is_empty());
}

#[test]
fn wrong_hidden_size_is_a_shape_error() {
    let d = make_dispatcher("standard", &DispatcherConfig::single(8, 256, 16)).unwrap();
    let hidden = synthetic::hidden(4, 128, DType::Bf16, 2).unwrap();
    let err = d
        .dispatch(&hidden, synthetic::topk(4, 2, 8, 3, false, false).unwrap())
        .err()
        .unwrap();
    assert!(matches!(err, MoeError::Shape { .. }), "{err}");
}

#[test]
fn expert_ids_out_of_range_are_rejected() {
    let d = make_dispatcher("standard", &DispatcherConfig::single(8, 256, 16)).unwrap();
    let hidden = synthetic::hidden(2, 256, DType::Bf16, 2).unwrap();
    let topk = TopK::from_vecs(&[0, 1, 8, -1], &[0.5; 4], 2, 2).unwrap();
    match d.dispatch(&hidden, topk).err().unwrap() {
        MoeError::ExpertIdOutOfRange {
            id,
            row,
            slot,
            num_experts,
        } => assert_eq!((id, row, slot, num_experts), (8, 1, 0, 8)),
        other => panic!("expected ExpertIdOutOfRange, got {other}"),
    }
    let topk = TopK::from_vecs(&[0, -2, 1, 2], &[0.5; 4], 2, 2).unwrap();
    assert!(matches!(
        d.dispatch(&hidden, topk),
        Err(MoeError::ExpertIdOutOfRange { id: -2, .. })
    ));
}

#[test]
fn more_tokens_than_the_dispatcher_maximum_are_rejected() {
    for a2a in ["standard", "local_masked"] {
        let d = make_dispatcher(a2a, &DispatcherConfig::single(8, 256, 4)).unwrap();
        let hidden = synthetic::hidden(5, 256, DType::Bf16, 2).unwrap();
        let err = d
            .dispatch(&hidden, synthetic::topk(5, 2, 8, 3, false, false).unwrap())
            .err()
            .unwrap();
        assert!(
            matches!(err, MoeError::TooManyTokens { max: 4, got: 5, .. }),
            "{a2a}: {err}"
        );
    }
}

#[test]
fn wrong_dtypes_are_rejected() {
    let ids = Tensor::from_f32(&[0.0, 1.0], &[1, 2], DType::F32).unwrap();
    let w = Tensor::from_f32(&[0.5, 0.5], &[1, 2], DType::F32).unwrap();
    assert!(matches!(TopK::new(ids, w), Err(MoeError::DType { .. })));

    let r = runner(DispatchFormat::Standard, QuantScheme::Bf16);
    let quant = synthetic::weights(WeightDims::of(&cfg()), QuantScheme::Bf16, 1, &|_| {}).unwrap();
    let out = StandardDispatchOutput {
        hidden: Tensor::zeros(&[2, 256], DType::I32),
        hidden_scale: None,
        topk: synthetic::topk(2, 2, 8, 3, false, false).unwrap(),
    };
    assert!(matches!(
        r.run(&out, quant.as_ref()),
        Err(MoeError::DType { .. })
    ));
}

#[test]
fn quant_scheme_and_format_mismatches_are_rejected() {
    let r = runner(DispatchFormat::Standard, QuantScheme::Bf16);
    let fp8 =
        synthetic::weights(WeightDims::of(&cfg()), QuantScheme::Fp8Block128, 1, &|_| {}).unwrap();
    let out = StandardDispatchOutput {
        hidden: synthetic::hidden(2, 256, DType::Bf16, 2).unwrap(),
        hidden_scale: None,
        topk: synthetic::topk(2, 2, 8, 3, false, false).unwrap(),
    };
    assert!(matches!(
        r.run(&out, fp8.as_ref()),
        Err(MoeError::QuantMismatch { .. })
    ));

    let masked = runner(DispatchFormat::DeepEpLowLatency, QuantScheme::Bf16);
    let bf16 = synthetic::weights(WeightDims::of(&cfg()), QuantScheme::Bf16, 1, &|_| {}).unwrap();
    assert!(matches!(
        masked.run(&out, bf16.as_ref()),
        Err(MoeError::FormatMismatch { .. })
    ));
}

#[test]
fn weights_that_do_not_match_the_config_are_rejected() {
    let r = runner(DispatchFormat::Standard, QuantScheme::Bf16);
    let mut other = cfg();
    other.intermediate_size = 64;
    let quant = synthetic::weights(WeightDims::of(&other), QuantScheme::Bf16, 1, &|_| {}).unwrap();
    let out = StandardDispatchOutput {
        hidden: synthetic::hidden(2, 256, DType::Bf16, 2).unwrap(),
        hidden_scale: None,
        topk: synthetic::topk(2, 2, 8, 3, false, false).unwrap(),
    };
    assert!(matches!(
        r.run(&out, quant.as_ref()),
        Err(MoeError::Shape { .. })
    ));
}

#[test]
fn fp8_block_needs_hidden_divisible_by_128() {
    moe_conformance::link_backends();
    let c = MoeRunnerConfig::new(4, 192, 128, 2);
    let r = MoeRunner::new(
        "reference",
        DispatchFormat::Standard,
        QuantScheme::Fp8Block128,
        c.clone(),
    )
    .unwrap();
    let quant =
        synthetic::weights(WeightDims::of(&c), QuantScheme::Fp8Block128, 1, &|_| {}).unwrap();
    let hidden = synthetic::hidden(3, 192, DType::Bf16, 2).unwrap();
    let err = suite::run_path(
        &r,
        &hidden,
        synthetic::topk(3, 2, 4, 3, false, false).unwrap(),
        quant.as_ref(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            MoeError::NotDivisible {
                value: 192,
                divisor: 128,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn masked_m_beyond_the_buffer_is_rejected() {
    let r = runner(DispatchFormat::DeepEpLowLatency, QuantScheme::Bf16);
    let quant = synthetic::weights(WeightDims::of(&cfg()), QuantScheme::Bf16, 1, &|_| {}).unwrap();
    let mut counts = vec![0i32; 8];
    counts[3] = 5; // the buffer holds 4 rows per expert
    let out = DeepEpLlDispatchOutput {
        hidden: Tensor::zeros(&[8, 4, 256], DType::Bf16),
        hidden_scale: None,
        hidden_global_scale: None,
        topk: synthetic::topk(2, 2, 8, 3, false, false).unwrap(),
        masked_m: Tensor::from_slice(&counts, &[8], DType::I32).unwrap(),
        expected_m: 1,
        src_info: Tensor::zeros(&[8, 4], DType::I32),
        layout_range: Tensor::zeros(&[8, 1], DType::I64),
        out_buffer: None,
    };
    let err = r.run(&out, quant.as_ref()).err().unwrap();
    assert!(err.to_string().contains("masked_m"), "{err}");
}

#[test]
fn nan_propagates_to_its_token_only() {
    let r = runner(DispatchFormat::Standard, QuantScheme::F32);
    let quant = synthetic::weights(WeightDims::of(&cfg()), QuantScheme::F32, 1, &|_| {}).unwrap();
    let mut x = synthetic::hidden(4, 256, DType::F32, 2)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    x[256 + 7] = f32::NAN; // token 1
    let hidden = Tensor::from_f32(&x, &[4, 256], DType::F32).unwrap();
    let out = suite::run_path(
        &r,
        &hidden,
        synthetic::topk(4, 2, 8, 3, false, false).unwrap(),
        quant.as_ref(),
    )
    .unwrap();
    assert!(out[256..512].iter().all(|v| v.is_nan()));
    assert!(out[..256].iter().chain(&out[512..]).all(|v| v.is_finite()));
}
