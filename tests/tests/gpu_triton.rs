//! GPU conformance of every CUDA path (the `triton` and `masked_gemm` runners) against the CPU reference on
//! fresh random inputs, a sweep of tile shapes, and a CUDA-graph replay against an eager run.
//! Ignored where no GPU is present; `.device/run.sh` runs them on the GPU machine.

use moe_backend_triton::tile_config::TileConfig;
use moe_backend_triton::TritonRunner;
use moe_conformance::cases::{base_config, hidden_dtype, TOKENS, VARIANTS};
use moe_conformance::{suite, synthetic};
use moe_runner_core::registry::{registered_paths, DeviceKind, FusedRunner};
use moe_runner_core::{
    quant_to_device, Device, DispatchFormat, MoeRunner, MoeRunnerConfig, QuantScheme,
    StandardDispatchOutput, Tensor, TopK, WeightDims,
};

fn gpu() -> Device {
    Device::cuda(0).expect("this test needs a CUDA device")
}

#[test]
#[ignore = "needs a CUDA device"]
fn every_cuda_path_matches_the_reference() {
    moe_conformance::link_backends();
    let device = gpu();
    let paths: Vec<_> = registered_paths()
        .into_iter()
        .filter(|p| p.device == DeviceKind::Cuda)
        .collect();
    assert!(!paths.is_empty(), "no CUDA paths registered");
    let mut failures = Vec::new();
    let mut checked = 0;
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
                let seed = 9000 + vi as u64 * 13 + scheme as u64;
                let quant =
                    synthetic::weights(WeightDims::of(&cfg), scheme, seed, &|_| {}).unwrap();
                let runner =
                    MoeRunner::on_device(&device, path.runner, path.format, scheme, cfg.clone())
                        .unwrap();
                for &m in TOKENS.iter().chain(&[200]) {
                    let hidden = synthetic::hidden(
                        m,
                        cfg.hidden_size,
                        hidden_dtype(scheme),
                        seed + m as u64,
                    )
                    .unwrap();
                    let topk =
                        synthetic::topk(m, cfg.top_k, cfg.num_experts, seed ^ 5, m > 8, m > 8)
                            .unwrap();
                    let c = suite::check_against_reference(&runner, &hidden, &topk, quant.as_ref())
                        .unwrap();
                    if !c.within(suite::tolerance(scheme)) {
                        failures.push(format!("{path} {scheme} {} M={m}: {c:?}", variant.name));
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} out of tolerance:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A larger shape with skewed routing through every tile shape the kernel supports, on the
/// mma.sync and (for blocks of 64+ rows) the wgmma path: all must agree with the reference.
#[test]
#[ignore = "needs a CUDA device"]
fn triton_tiles_agree_with_the_reference() {
    moe_conformance::link_backends();
    let device = gpu();
    let mut failures = Vec::new();
    for scheme in [
        QuantScheme::Bf16,
        QuantScheme::Fp8Block128,
        QuantScheme::Fp8PerChannel,
    ] {
        let cfg = MoeRunnerConfig::new(16, 512, 256, 4);
        let quant = synthetic::weights(WeightDims::of(&cfg), scheme, 77, &|_| {}).unwrap();
        let runner = MoeRunner::on_device(
            &device,
            "triton",
            DispatchFormat::Standard,
            scheme,
            cfg.clone(),
        )
        .unwrap();
        let triton = TritonRunner::new(&cfg, &device).unwrap();
        let hidden = synthetic::hidden(300, 512, hidden_dtype(scheme), 78).unwrap();
        let topk = synthetic::topk(300, 4, 16, 79, true, true).unwrap();
        let reference =
            MoeRunner::new("reference", DispatchFormat::Standard, scheme, cfg.clone()).unwrap();
        let want = suite::run_path(
            &reference,
            &hidden,
            TopK::new(topk.ids.clone(), topk.weights.clone()).unwrap(),
            quant.as_ref(),
        )
        .unwrap();
        let dq = quant_to_device(quant.as_ref(), &device).unwrap();
        let input = StandardDispatchOutput {
            hidden: hidden.to_device(&device).unwrap(),
            hidden_scale: None,
            topk: TopK::new(
                topk.ids.to_device(&device).unwrap(),
                topk.weights.to_device(&device).unwrap(),
            )
            .unwrap(),
        };
        drop(runner);
        for (bm, bn, bk, warps, stages, group) in [
            (16, 32, 64, 1, 2, 1),
            (16, 64, 128, 4, 4, 1),
            (16, 128, 256, 4, 3, 1),
            (16, 32, 128, 4, 4, 1),
            (32, 64, 64, 4, 3, 4),
            (32, 128, 128, 4, 4, 8),
            (64, 128, 64, 4, 3, 8),
            (64, 256, 64, 8, 3, 1),
            (128, 128, 128, 8, 3, 8),
            (128, 64, 128, 4, 2, 16),
        ] {
            for wgmma in [false, true] {
                let tile = TileConfig {
                    block_m: bm,
                    block_n: bn,
                    block_k: bk,
                    group_m: group,
                    num_warps: warps,
                    num_stages: stages,
                };
                triton.force_tile(Some(tile)).unwrap();
                triton.set_wgmma(wgmma).unwrap();
                let out = triton.run(&input, dq.as_ref()).unwrap();
                let got =
                    moe_runner_core::downcast_combine::<moe_runner_core::StandardCombineInput>(
                        out,
                        DispatchFormat::Standard,
                    )
                    .unwrap()
                    .hidden
                    .to_host()
                    .unwrap()
                    .to_f32_vec()
                    .unwrap();
                let c = suite::compare(&got, &want).unwrap();
                if !c.within(suite::tolerance(scheme)) {
                    failures.push(format!("{scheme} {tile:?} wgmma={wgmma}: {c:?}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The whole layer captured in a CUDA graph and replayed gives exactly the eager result: no
/// host synchronization or allocation happens inside the forward pass.
#[test]
#[ignore = "needs a CUDA device"]
fn graph_replay_matches_eager() {
    moe_conformance::link_backends();
    let device = gpu();
    let dev = device.as_cuda().unwrap();
    let mut cfg = MoeRunnerConfig::new(8, 256, 128, 2);
    cfg.routed_scaling_factor = Some(2.5);
    for scheme in [
        QuantScheme::Bf16,
        QuantScheme::Fp8Block128,
        QuantScheme::Fp8PerTensor,
    ] {
        let quant = synthetic::weights(WeightDims::of(&cfg), scheme, 3, &|_| {}).unwrap();
        let dq = quant_to_device(quant.as_ref(), &device).unwrap();
        let runner = TritonRunner::new(&cfg, &device).unwrap();
        let hidden = synthetic::hidden(33, 256, moe_runner_core::DType::Bf16, 4).unwrap();
        let topk = synthetic::topk(33, 2, 8, 5, true, true).unwrap();
        let input = StandardDispatchOutput {
            hidden: hidden.to_device(&device).unwrap(),
            hidden_scale: None,
            topk: TopK::new(
                topk.ids.to_device(&device).unwrap(),
                topk.weights.to_device(&device).unwrap(),
            )
            .unwrap(),
        };
        let out = Tensor::zeros_cuda(dev, &[33, 256], moe_runner_core::DType::Bf16).unwrap();
        runner.run_into(&input, dq.as_ref(), &out).unwrap();
        let eager = out.to_host().unwrap().to_f32_vec().unwrap();
        // A fresh output that only the graph's replays write (capturing executes nothing).
        let replay_out = Tensor::zeros_cuda(dev, &[33, 256], moe_runner_core::DType::Bf16).unwrap();
        let times = moe_runner_core::cuda::time_graph_ms(dev, 1, 3, || {
            runner.run_into(&input, dq.as_ref(), &replay_out)
        })
        .unwrap();
        assert_eq!(times.len(), 3);
        let replayed = replay_out.to_host().unwrap().to_f32_vec().unwrap();
        assert_eq!(eager.len(), replayed.len());
        assert!(
            eager
                .iter()
                .zip(&replayed)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{scheme}: replay differs from eager"
        );
        assert!(eager.iter().all(|v| v.is_finite()));
    }
}

/// After a warm-up call, forward passes into the caller's output allocate no device memory:
/// the count of tensor allocations does not move.
#[test]
#[ignore = "needs a CUDA device"]
fn warm_forward_passes_allocate_nothing() {
    let device = gpu();
    let dev = device.as_cuda().unwrap();
    let cfg = MoeRunnerConfig::new(8, 256, 128, 2);
    for scheme in [QuantScheme::Bf16, QuantScheme::Fp8Block128] {
        let quant = synthetic::weights(WeightDims::of(&cfg), scheme, 3, &|_| {}).unwrap();
        let dq = quant_to_device(quant.as_ref(), &device).unwrap();
        let runner = TritonRunner::new(&cfg, &device).unwrap();
        let hidden = synthetic::hidden(40, 256, moe_runner_core::DType::Bf16, 4).unwrap();
        let topk = synthetic::topk(40, 2, 8, 5, true, true).unwrap();
        let input = StandardDispatchOutput {
            hidden: hidden.to_device(&device).unwrap(),
            hidden_scale: None,
            topk: topk.to_device(&device).unwrap(),
        };
        let out = Tensor::zeros_cuda(dev, &[40, 256], moe_runner_core::DType::Bf16).unwrap();
        runner.run_into(&input, dq.as_ref(), &out).unwrap();
        let before = moe_runner_core::cuda::device_allocations();
        for _ in 0..5 {
            runner.run_into(&input, dq.as_ref(), &out).unwrap();
        }
        assert_eq!(
            moe_runner_core::cuda::device_allocations(),
            before,
            "{scheme}"
        );
        assert!(out
            .to_host()
            .unwrap()
            .to_f32_vec()
            .unwrap()
            .iter()
            .any(|v| *v != 0.0));
    }
}

/// The engine's path through a `MoeLayer`: its own routing on the GPU, output into its own
/// buffer. Once warm nothing is allocated, and the call captured in a CUDA graph replays to
/// exactly the eager result.
#[test]
#[ignore = "needs a CUDA device"]
fn layer_forward_routed_into_is_allocation_free_and_capturable() {
    moe_conformance::link_backends();
    let device = gpu();
    let dev = device.as_cuda().unwrap();
    let cfg = MoeRunnerConfig::new(8, 256, 128, 2);
    let quant =
        synthetic::weights(WeightDims::of(&cfg), QuantScheme::Fp8Block128, 3, &|_| {}).unwrap();
    let dq = quant_to_device(quant.as_ref(), &device).unwrap();
    let runner = MoeRunner::on_device(
        &device,
        "triton",
        DispatchFormat::Standard,
        QuantScheme::Fp8Block128,
        cfg.clone(),
    )
    .unwrap();
    let dcfg = moe_dispatch::DispatcherConfig::single(8, 256, 64).with_top_k(2);
    let dispatcher = moe_dispatch::make_dispatcher_on("standard", &dcfg, &device).unwrap();
    let router = moe_dispatch::Router {
        method: moe_dispatch::RoutingMethod::Softmax { renormalize: true },
        num_experts: 8,
        top_k: 2,
        fused_shared_experts: 0,
        fused_shared_weight: 1.0,
    };
    let layer = moe_dispatch::MoeLayer::new(router, dispatcher, runner, dq, None).unwrap();
    let hidden = synthetic::hidden(40, 256, moe_runner_core::DType::Bf16, 4)
        .unwrap()
        .to_device(&device)
        .unwrap();
    let topk = synthetic::topk(40, 2, 8, 5, true, true)
        .unwrap()
        .to_device(&device)
        .unwrap();
    let copy = || TopK::new(topk.ids.clone(), topk.weights.clone()).unwrap();
    let eager = Tensor::zeros_cuda(dev, &[40, 256], moe_runner_core::DType::Bf16).unwrap();
    layer.forward_routed_into(&hidden, copy(), &eager).unwrap();
    let before = moe_runner_core::cuda::device_allocations();
    for _ in 0..3 {
        layer.forward_routed_into(&hidden, copy(), &eager).unwrap();
    }
    assert_eq!(moe_runner_core::cuda::device_allocations(), before);
    let replayed = Tensor::zeros_cuda(dev, &[40, 256], moe_runner_core::DType::Bf16).unwrap();
    moe_runner_core::cuda::time_graph_ms(dev, 1, 2, || {
        layer.forward_routed_into(&hidden, copy(), &replayed)
    })
    .unwrap();
    let (a, b) = (
        eager.to_host().unwrap().to_f32_vec().unwrap(),
        replayed.to_host().unwrap().to_f32_vec().unwrap(),
    );
    assert!(a.iter().any(|v| *v != 0.0));
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "replay differs"
    );
}
