//! MoeLayer end to end: fused shared experts equal the separate shared MLP, in-place equals
//! out-of-place, expert-parallel partial sums add up to the single-rank result, and the masked
//! format gives the same layer output as the standard one.

use moe_backend_reference::CpuSharedExperts;
use moe_conformance::{suite, synthetic};
use moe_dispatch::{make_dispatcher, DispatcherConfig, MoeLayer, Router, RoutingMethod};
use moe_runner_core::{
    DType, DenseWeights, DispatchFormat, MoeError, MoeRunner, MoeRunnerConfig, QuantScheme, Tensor,
    WeightDims,
};

const E: usize = 8;
const H: usize = 128;
const I: usize = 64;
const K: usize = 2;

fn deepseek_router(shared: usize, rsf: f32) -> Router {
    Router {
        method: RoutingMethod::DeepSeekGrouped {
            n_group: 4,
            topk_group: 2,
            renormalize: true,
            correction_bias: Some(synthetic::uniform(E, 0.1, 5)),
            routed_scaling_factor: None,
        },
        num_experts: E,
        top_k: K,
        fused_shared_experts: shared,
        fused_shared_weight: 1.0 / rsf,
    }
}

fn layer(
    router: Router,
    cfg: MoeRunnerConfig,
    dcfg: DispatcherConfig,
    a2a: &str,
    w13: &[f32],
    w2: &[f32],
    shared: Option<CpuSharedExperts>,
) -> moe_runner_core::Result<MoeLayer> {
    let dims = WeightDims {
        experts: cfg.num_local_experts,
        n1: 2 * I,
        hidden: H,
        inter: I,
    };
    let quant = DenseWeights::from_f32(w13, w2, dims, DType::F32)?;
    let runner = MoeRunner::new("reference", dcfg_format(a2a), QuantScheme::F32, cfg)?;
    MoeLayer::new(
        router,
        make_dispatcher(a2a, &dcfg)?,
        runner,
        Box::new(quant),
        shared.map(|s| Box::new(s) as _),
    )
}

fn dcfg_format(a2a: &str) -> DispatchFormat {
    moe_dispatch::a2a_backends()
        .find(|b| b.name == a2a)
        .unwrap()
        .format
}

#[test]
fn fused_shared_expert_equals_the_separate_mlp() {
    moe_conformance::link_backends();
    let rsf = 2.5;
    // Nine experts' weights: eight routed, the ninth is the shared expert.
    let w13 = synthetic::uniform((E + 1) * 2 * I * H, 0.15, 1);
    let w2 = synthetic::uniform((E + 1) * H * I, 0.2, 2);
    let (r13, s13) = w13.split_at(E * 2 * I * H);
    let (r2, s2) = w2.split_at(E * H * I);

    let mut fused_cfg = MoeRunnerConfig::new(E + 1, H, I, K + 1);
    fused_cfg.routed_scaling_factor = Some(rsf);
    let fused = layer(
        deepseek_router(1, rsf),
        fused_cfg,
        DispatcherConfig::single(E + 1, H, 64),
        "standard",
        &w13,
        &w2,
        None,
    )
    .unwrap();

    let mut cfg = MoeRunnerConfig::new(E, H, I, K);
    cfg.routed_scaling_factor = Some(rsf);
    let shared = CpuSharedExperts::new(s13.to_vec(), s2.to_vec(), I, &cfg).unwrap();
    let separate = layer(
        deepseek_router(0, rsf),
        cfg,
        DispatcherConfig::single(E, H, 64),
        "standard",
        r13,
        r2,
        Some(shared),
    )
    .unwrap();

    let hidden = synthetic::hidden(33, H, DType::F32, 3).unwrap();
    let logits = synthetic::logits(33, E, 4).unwrap();
    let a = fused
        .forward(&hidden, &logits)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let b = separate
        .forward(&hidden, &logits)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let c = suite::compare(&a, &b).unwrap();
    assert!(c.within(1e-5), "{c:?}");
}

#[test]
fn inplace_writes_the_same_result_over_the_input() {
    moe_conformance::link_backends();
    let w13 = synthetic::uniform(E * 2 * I * H, 0.15, 1);
    let w2 = synthetic::uniform(E * H * I, 0.2, 2);
    let router = || Router {
        method: RoutingMethod::Softmax { renormalize: false },
        num_experts: E,
        top_k: K,
        fused_shared_experts: 0,
        fused_shared_weight: 1.0,
    };
    let cfg = MoeRunnerConfig::new(E, H, I, K);
    let mut inplace_cfg = cfg.clone();
    inplace_cfg.inplace = true;
    let shared = |c: &MoeRunnerConfig| {
        CpuSharedExperts::new(
            synthetic::uniform(2 * I * H, 0.1, 7),
            synthetic::uniform(H * I, 0.1, 8),
            I,
            c,
        )
        .unwrap()
    };
    let out_of_place = layer(
        router(),
        cfg.clone(),
        DispatcherConfig::single(E, H, 64),
        "standard",
        &w13,
        &w2,
        Some(shared(&cfg)),
    )
    .unwrap();
    let in_place = layer(
        router(),
        inplace_cfg.clone(),
        DispatcherConfig::single(E, H, 64),
        "standard",
        &w13,
        &w2,
        Some(shared(&inplace_cfg)),
    )
    .unwrap();

    let hidden = synthetic::hidden(20, H, DType::F32, 3).unwrap();
    let logits = synthetic::logits(20, E, 4).unwrap();
    let want = out_of_place
        .forward(&hidden, &logits)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let mut buf = hidden.to_f32_vec().unwrap();
    // SAFETY: `buf` outlives the borrowed tensor and nothing else touches it meanwhile.
    let mut borrowed = unsafe {
        Tensor::borrow_host(buf.as_mut_ptr().cast(), &[20, H], DType::F32, true).unwrap()
    };
    in_place.forward_inplace(&mut borrowed, &logits).unwrap();
    drop(borrowed);
    assert_eq!(buf, want);
    assert!(matches!(
        in_place.forward(&hidden, &logits),
        Err(MoeError::Config(_))
    ));
}

#[test]
fn expert_parallel_partials_sum_to_the_single_rank_result() {
    moe_conformance::link_backends();
    let w13 = synthetic::uniform(E * 2 * I * H, 0.15, 1);
    let w2 = synthetic::uniform(E * H * I, 0.2, 2);
    let router = || Router {
        method: RoutingMethod::Softmax { renormalize: true },
        num_experts: E,
        top_k: K,
        fused_shared_experts: 0,
        fused_shared_weight: 1.0,
    };
    let hidden = synthetic::hidden(17, H, DType::F32, 3).unwrap();
    let logits = synthetic::logits(17, E, 4).unwrap();
    let full = layer(
        router(),
        MoeRunnerConfig::new(E, H, I, K),
        DispatcherConfig::single(E, H, 64),
        "standard",
        &w13,
        &w2,
        None,
    )
    .unwrap();
    let want = full
        .forward(&hidden, &logits)
        .unwrap()
        .to_f32_vec()
        .unwrap();

    let mut sum = vec![0f32; want.len()];
    let local = E / 2;
    for rank in 0..2 {
        let mut cfg = MoeRunnerConfig::new(E, H, I, K);
        cfg.num_local_experts = local;
        let dcfg = DispatcherConfig {
            num_experts: E,
            num_local_experts: local,
            rank,
            world_size: 2,
            hidden_size: H,
            max_tokens_per_rank: 64,
            routed_scaling_factor: None,
            top_k: K,
            wire: Default::default(),
            nvfp4_global_scale: 0.0,
            intermediate_size: 0,
        };
        let (a, b) = (rank * local * 2 * I * H, (rank + 1) * local * 2 * I * H);
        let (c, d) = (rank * local * H * I, (rank + 1) * local * H * I);
        let part = layer(router(), cfg, dcfg, "standard", &w13[a..b], &w2[c..d], None).unwrap();
        for (s, v) in sum.iter_mut().zip(
            part.forward(&hidden, &logits)
                .unwrap()
                .to_f32_vec()
                .unwrap(),
        ) {
            *s += v;
        }
    }
    let c = suite::compare(&sum, &want).unwrap();
    assert!(c.within(1e-5), "{c:?}");
}

#[test]
fn masked_format_layer_equals_standard_layer() {
    moe_conformance::link_backends();
    let w13 = synthetic::uniform(E * 2 * I * H, 0.15, 1);
    let w2 = synthetic::uniform(E * H * I, 0.2, 2);
    let rsf = 1.5;
    let mut cfg = MoeRunnerConfig::new(E, H, I, K);
    cfg.routed_scaling_factor = Some(rsf);
    let mut dcfg = DispatcherConfig::single(E, H, 64);
    dcfg.routed_scaling_factor = Some(rsf);
    let standard = layer(
        deepseek_router(0, rsf),
        cfg.clone(),
        dcfg.clone(),
        "standard",
        &w13,
        &w2,
        None,
    )
    .unwrap();
    let masked = layer(
        deepseek_router(0, rsf),
        cfg,
        dcfg,
        "local_masked",
        &w13,
        &w2,
        None,
    )
    .unwrap();
    let hidden = synthetic::hidden(29, H, DType::F32, 3).unwrap();
    let logits = synthetic::logits(29, E, 4).unwrap();
    let a = standard
        .forward(&hidden, &logits)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let b = masked
        .forward(&hidden, &logits)
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let c = suite::compare(&b, &a).unwrap();
    assert!(c.within(1e-5), "{c:?}");
}

#[test]
fn scaling_factor_in_router_and_runner_is_rejected() {
    moe_conformance::link_backends();
    let mut router = deepseek_router(0, 2.5);
    if let RoutingMethod::DeepSeekGrouped {
        routed_scaling_factor,
        ..
    } = &mut router.method
    {
        *routed_scaling_factor = Some(2.5);
    }
    let mut cfg = MoeRunnerConfig::new(E, H, I, K);
    cfg.routed_scaling_factor = Some(2.5);
    let w13 = synthetic::uniform(E * 2 * I * H, 0.15, 1);
    let w2 = synthetic::uniform(E * H * I, 0.2, 2);
    let err = layer(
        router,
        cfg,
        DispatcherConfig::single(E, H, 64),
        "standard",
        &w13,
        &w2,
        None,
    )
    .err()
    .expect("rejected");
    assert!(matches!(err, MoeError::Config(_)), "{err}");
}

/// A single-rank reference layer (standard format) with seeded weights.
fn reference_layer(cfg: MoeRunnerConfig, shared: Option<CpuSharedExperts>) -> MoeLayer {
    let w13 = synthetic::uniform(E * 2 * I * H, 0.2, 1);
    let w2 = synthetic::uniform(E * H * I, 0.2, 2);
    layer(
        deepseek_router(0, 1.0),
        cfg,
        DispatcherConfig::single(E, H, 64),
        "standard",
        &w13,
        &w2,
        shared,
    )
    .unwrap()
}

/// A layer is `Send + Sync` and one instance serves several threads at once: each thread's
/// output equals the same batch run alone.
#[test]
fn one_layer_serves_several_threads() {
    fn shareable<T: Send + Sync>(_: &T) {}
    let cfg = MoeRunnerConfig::new(E, H, I, K);
    let shared = CpuSharedExperts::new(
        synthetic::uniform(2 * I * H, 0.2, 3),
        synthetic::uniform(H * I, 0.2, 4),
        I,
        &cfg,
    )
    .unwrap();
    let l = reference_layer(cfg, Some(shared));
    shareable(&l);
    let batch = |i: u64| {
        (
            synthetic::hidden(17 + i as usize, H, DType::F32, 10 + i).unwrap(),
            synthetic::logits(17 + i as usize, E, 20 + i).unwrap(),
        )
    };
    let alone: Vec<Vec<f32>> = (0..4)
        .map(|i| {
            let (x, g) = batch(i);
            l.forward(&x, &g).unwrap().to_f32_vec().unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let l = &l;
                s.spawn(move || {
                    let (x, g) = batch(i);
                    (0..3)
                        .map(|_| l.forward(&x, &g).unwrap().to_f32_vec().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            for got in h.join().unwrap() {
                assert_eq!(got, alone[i], "thread {i}");
            }
        }
    });
}

/// The engine's zero-allocation path needs a runner that writes into the caller's output (the
/// fused GPU runners); the composed CPU path says so instead of allocating behind its back.
#[test]
fn forward_routed_into_needs_a_runner_that_writes_in_place() {
    let l = reference_layer(MoeRunnerConfig::new(E, H, I, K), None);
    let hidden = synthetic::hidden(5, H, DType::F32, 3).unwrap();
    let topk = synthetic::topk(5, K, E, 4, false, false).unwrap();
    let out = Tensor::zeros(&[5, H], DType::F32);
    let err = l
        .forward_routed_into(&hidden, topk, &out)
        .unwrap_err()
        .to_string();
    assert!(err.contains("call run"), "{err}");
}
