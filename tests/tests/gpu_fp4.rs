//! The `cutedsl_fp4` runner on a GPU: the masked layout and the standard layout against the
//! reference, which quantizes the activations to NVFP4 the same way (same scales, same
//! rounding); against the unquantized bf16 layer, within NVFP4's error; skewed routing (experts
//! with no rows and with many); rows past `masked_m` never written; no allocation once warm;
//! bad input. Every other variant (activations, layouts, flags) runs in the all-paths
//! conformance test. Ignored where no GPU is present.

use moe_conformance::{suite, synthetic};
use moe_runner_core::{
    downcast_combine, quant_to_device, DType, DeepEpLlCombineInput, DeepEpLlDispatchOutput, Device,
    DispatchFormat, DispatchOutput, MoeError, MoeRunner, MoeRunnerConfig, Nvfp4Products,
    Nvfp4Weights, QuantInfo, QuantScheme, ScaleLayout, Tensor, TopK, WeightDims,
};

fn gpu() -> Device {
    Device::cuda(0).expect("this test needs a CUDA device")
}

// Every tensor of a test lives on its runner's device (one stream), so the runner's kernels
// are ordered after the uploads and before the reads.

fn fp4(cfg: &MoeRunnerConfig, format: DispatchFormat) -> MoeRunner {
    moe_conformance::link_backends();
    MoeRunner::on_device(
        &gpu(),
        "cutedsl_fp4",
        format,
        QuantScheme::Nvfp4,
        cfg.clone(),
    )
    .unwrap()
}

fn reference(cfg: &MoeRunnerConfig, format: DispatchFormat, scheme: QuantScheme) -> MoeRunner {
    moe_conformance::link_backends();
    MoeRunner::new("reference", format, scheme, cfg.clone()).unwrap()
}

/// NVFP4 weights with swizzled scales (the kernel's layout) from dense bf16 weights, and the
/// dense ones, for the comparison with the unquantized layer.
fn weights(cfg: &MoeRunnerConfig, seed: u64) -> (Nvfp4Weights, Box<dyn QuantInfo>) {
    let dense = synthetic::weights(WeightDims::of(cfg), QuantScheme::Bf16, seed, &|_| {}).unwrap();
    let d =
        moe_runner_core::downcast_quant::<moe_runner_core::DenseWeights>(dense.as_ref()).unwrap();
    let e = cfg.num_local_experts;
    // Input global scales from a generous amax: no block scale saturates, and E4M3 scales keep
    // their relative precision anywhere in their range.
    let a13 = moe_quant::nvfp4_global_scale(64.0).unwrap();
    let a2 = moe_quant::nvfp4_global_scale(64.0).unwrap();
    let q =
        Nvfp4Weights::quantize(d, vec![a13; e], vec![a2; e], ScaleLayout::Swizzled128x4).unwrap();
    (q, dense)
}

/// The masked batch of the local (CPU) low-latency dispatcher for `m` tokens with skewed
/// routing: some experts get no rows, some many.
fn masked_batch(cfg: &MoeRunnerConfig, m: usize, seed: u64) -> DeepEpLlDispatchOutput {
    let hidden = synthetic::hidden(m, cfg.hidden_size, DType::Bf16, seed).unwrap();
    let topk = synthetic::topk(m, cfg.top_k, cfg.num_experts, seed + 1, true, true).unwrap();
    let d =
        suite::dispatcher_for(DispatchFormat::DeepEpLowLatency, cfg, m, &Device::cpu()).unwrap();
    let out = d.dispatch(&hidden, topk).unwrap();
    let d = moe_runner_core::downcast_dispatch::<DeepEpLlDispatchOutput>(
        out.as_ref(),
        "test",
        DispatchFormat::DeepEpLowLatency,
    )
    .expect("the local masked dispatcher emits the masked layout");
    DeepEpLlDispatchOutput {
        hidden: d.hidden.clone(),
        hidden_scale: None,
        hidden_global_scale: None,
        topk: TopK::new(d.topk.ids.clone(), d.topk.weights.clone()).unwrap(),
        masked_m: d.masked_m.clone(),
        expected_m: d.expected_m,
        src_info: d.src_info.clone(),
        layout_range: d.layout_range.clone(),
        out_buffer: None,
    }
}

fn to_gpu(d: &DeepEpLlDispatchOutput, out: Option<Tensor>, g: &Device) -> DeepEpLlDispatchOutput {
    DeepEpLlDispatchOutput {
        hidden: d.hidden.to_device(g).unwrap(),
        hidden_scale: None,
        hidden_global_scale: None,
        topk: d.topk.to_device(g).unwrap(),
        masked_m: d.masked_m.to_device(g).unwrap(),
        expected_m: d.expected_m,
        src_info: d.src_info.to_device(g).unwrap(),
        layout_range: d.layout_range.to_device(g).unwrap(),
        out_buffer: out,
    }
}

/// The valid rows (`< masked_m`) of a masked output, as f32.
fn valid_rows(y: &Tensor, masked_m: &[i32]) -> Vec<f32> {
    let [el, rt, h] = y.dims::<3>("y").unwrap();
    let v = y.to_host().unwrap().to_f32_vec().unwrap();
    (0..el)
        .flat_map(|e| v[e * rt * h..(e * rt + masked_m[e] as usize) * h].to_vec())
        .collect()
}

fn masked_output(r: &MoeRunner, d: &dyn DispatchOutput, q: &dyn QuantInfo) -> Tensor {
    downcast_combine::<DeepEpLlCombineInput>(r.run(d, q).unwrap(), DispatchFormat::DeepEpLowLatency)
        .unwrap()
        .hidden
}

#[test]
#[ignore = "needs a CUDA device"]
fn masked_layout_matches_the_reference_and_leaves_other_rows_alone() {
    for products in [Nvfp4Products::Exact, Nvfp4Products::E4m3] {
        for offset in [false, true] {
            masked_layout_with(products, offset);
        }
    }
}

/// The masked layout with the weights' products taken as `products`; with `offset`, into an
/// output that starts one element past an allocation, as an engine's buffer may, where the
/// GEMM cannot write C's rows 16 bytes at a time.
fn masked_layout_with(products: Nvfp4Products, offset: bool) {
    // Items of 144 rows (past STAGED_MIN_ROWS, so C goes through shared memory when it is
    // aligned), none for the last quarter of the experts.
    let cfg = MoeRunnerConfig::new(8, 512, 256, 4);
    let (q, dense) = weights(&cfg, 31);
    let q = q.with_products(products);
    let batch = masked_batch(&cfg, 200, 5);
    let counts = batch.masked_m.as_slice::<i32>().unwrap().to_vec();
    let [el, rt, h] = batch.dims().unwrap();
    eprintln!(
        "masked_m {counts:?}, rows per expert {rt}, expected_m {}",
        batch.expected_m
    );
    assert!(
        counts.contains(&0) && counts.iter().any(|&c| c > 64),
        "{counts:?}"
    );
    let want = reference_rows(&cfg, &batch, &q, QuantScheme::Nvfp4);
    let unquantized = reference_rows(&cfg, &batch, dense.as_ref(), QuantScheme::Bf16);
    // The runner writes into a buffer whose rows past masked_m hold a pattern that must stay.
    let runner = fp4(&cfg, DispatchFormat::DeepEpLowLatency);
    let g = runner.device().clone();
    let len = el * rt * h + usize::from(offset);
    let pattern = Tensor::from_f32(&vec![7.5; len], &[len], DType::Bf16).unwrap();
    let held = pattern.to_device(&g).unwrap();
    let out = if offset {
        let ptr = held.cuda_ptr().unwrap() + DType::Bf16.size() as u64;
        // SAFETY: `held` has one element more than the view and outlives it; same device.
        unsafe { Tensor::borrow_cuda(g.as_cuda().unwrap(), ptr, &[el, rt, h], DType::Bf16) }
            .unwrap()
    } else {
        held.clone().reshape(&[el, rt, h]).unwrap()
    };
    let on_gpu = to_gpu(&batch, Some(out.clone()), &g);
    let qg = quant_to_device(&q, &g).unwrap();
    let y = masked_output(&runner, &on_gpu, qg.as_ref());
    let got = valid_rows(&y, &counts);
    let c = suite::compare(&got, &want).unwrap();
    let u = suite::compare(&got, &unquantized).unwrap();
    eprintln!(
        "masked {products:?} (offset {offset}): vs NVFP4 reference {c:?}; vs unquantized bf16 {u:?}"
    );
    let mut at = 0;
    for (e, &n) in counts.iter().enumerate() {
        for (lo, hi) in [(0, 16), (16, 64), (64, 128), (128, rt)] {
            let (lo, hi) = (lo.min(n as usize), hi.min(n as usize));
            if lo < hi {
                let r = suite::compare(
                    &got[(at + lo) * h..(at + hi) * h],
                    &want[(at + lo) * h..(at + hi) * h],
                )
                .unwrap();
                eprintln!("expert {e} rows {lo}..{hi}: rel_l2 {:.3e}", r.rel_l2);
            }
        }
        at += n as usize;
    }
    assert!(c.within(1e-2), "against the NVFP4 reference: {c:?}");
    assert!(u.within(0.35), "against the unquantized layer: {u:?}");
    if offset {
        let before = held.to_host().unwrap().to_f32_vec().unwrap()[0];
        assert_eq!(before, 7.5, "the element before the output was written");
    }
    let all = y.to_host().unwrap().to_f32_vec().unwrap();
    for e in 0..el {
        for i in counts[e] as usize..rt {
            let row = &all[(e * rt + i) * h..(e * rt + i + 1) * h];
            assert!(
                row.iter().all(|&v| v == 7.5),
                "expert {e} row {i} past masked_m was written"
            );
        }
    }
}

/// A dispatcher that reports no expected rows (`expected_m` 0) while experts have rows: the
/// runner's items still hold at least 16 rows (an item height of 0 divided by zero before), and
/// every row is computed, with exact and with E4M3 products.
#[test]
#[ignore = "needs a CUDA device"]
fn an_expected_m_of_zero_computes_every_row() {
    let cfg = MoeRunnerConfig::new(8, 256, 128, 2);
    let mut batch = masked_batch(&cfg, 40, 9);
    batch.expected_m = 0;
    let counts = batch.masked_m.as_slice::<i32>().unwrap();
    assert!(counts.iter().any(|&c| c > 16), "{counts:?}");
    masked_matches_the_reference(&cfg, &batch, &weights(&cfg, 41).0, "expected_m 0");
}

/// The reference's valid rows of the masked layout for `batch`, with weights `q` of `scheme`.
fn reference_rows(
    cfg: &MoeRunnerConfig,
    batch: &DeepEpLlDispatchOutput,
    q: &dyn QuantInfo,
    scheme: QuantScheme,
) -> Vec<f32> {
    let r = reference(cfg, DispatchFormat::DeepEpLowLatency, scheme);
    valid_rows(
        &masked_output(&r, batch, q),
        batch.masked_m.as_slice::<i32>().unwrap(),
    )
}

/// The runner's valid rows of the masked layout for `batch` against the reference that
/// quantizes the same way, with exact and with E4M3 products of `exact`'s values. With E4M3
/// products, the test of `standard_layout_with`: at most a quarter as far from that reference
/// as it is from the exact one. (The FP8 tensor cores sum in less than f32, so a bf16 value of
/// GEMM 1 now and then rounds the other way and its requantized block with it: on the masked
/// batch of `gemm1_with_the_activation_in_its_epilogue_matches_the_reference`, 1.1% from the
/// E4M3 reference with or without the activation in the epilogue, bit for bit the same, where
/// the two references are 11% apart.)
fn masked_matches_the_reference(
    cfg: &MoeRunnerConfig,
    batch: &DeepEpLlDispatchOutput,
    exact: &Nvfp4Weights,
    what: &str,
) {
    let runner = fp4(cfg, DispatchFormat::DeepEpLowLatency);
    let g = runner.device().clone();
    let on_gpu = to_gpu(batch, None, &g);
    let counts = batch.masked_m.as_slice::<i32>().unwrap();
    let exact_want = reference_rows(cfg, batch, exact, QuantScheme::Nvfp4);
    for products in [Nvfp4Products::Exact, Nvfp4Products::E4m3] {
        let q = exact.clone().with_products(products);
        let want = reference_rows(cfg, batch, &q, QuantScheme::Nvfp4);
        let qg = quant_to_device(&q, &g).unwrap();
        let got = valid_rows(&masked_output(&runner, &on_gpu, qg.as_ref()), counts);
        let c = suite::compare(&got, &want).unwrap();
        eprintln!("{what}, {products:?}: {c:?}");
        if products == Nvfp4Products::Exact {
            assert!(c.within(1e-2), "{what}, {products:?}: {c:?}");
        } else {
            let gap = suite::compare(&want, &exact_want).unwrap();
            eprintln!("  the {products:?} reference vs the exact one: {gap:?}");
            assert!(
                c.rel_l2 * 4.0 < gap.rel_l2,
                "{what}: {c:?} is not much closer to the {products:?} reference than {gap:?}"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn standard_layout_matches_the_reference() {
    let cfg = MoeRunnerConfig::new(16, 1024, 512, 4);
    let (q, dense) = weights(&cfg, 41);
    let runner = fp4(&cfg, DispatchFormat::Standard);
    let want_runner = reference(&cfg, DispatchFormat::Standard, QuantScheme::Nvfp4);
    let dense_runner = reference(&cfg, DispatchFormat::Standard, QuantScheme::Bf16);
    for m in [0, 1, 7, 300] {
        let hidden = synthetic::hidden(m, cfg.hidden_size, DType::Bf16, 100 + m as u64).unwrap();
        let topk =
            synthetic::topk(m, cfg.top_k, cfg.num_experts, 200 + m as u64, true, true).unwrap();
        let copy = |t: &TopK| TopK::new(t.ids.clone(), t.weights.clone()).unwrap();
        let got = suite::run_path(&runner, &hidden, copy(&topk), &q).unwrap();
        let want = suite::run_path(&want_runner, &hidden, copy(&topk), &q).unwrap();
        let plain = suite::run_path(&dense_runner, &hidden, copy(&topk), dense.as_ref()).unwrap();
        assert_eq!(got.len(), m * cfg.hidden_size);
        if m == 0 {
            continue;
        }
        let c = suite::compare(&got, &want).unwrap();
        let u = suite::compare(&got, &plain).unwrap();
        eprintln!("standard M={m}: vs NVFP4 reference {c:?}; vs unquantized bf16 {u:?}");
        assert!(c.within(1e-2), "M={m} against the NVFP4 reference: {c:?}");
        assert!(u.within(0.35), "M={m} against the unquantized layer: {u:?}");
    }
}

/// Weights in checkpoint form (linear scales) give the same result as swizzled ones: the
/// runner swizzles them once.
#[test]
#[ignore = "needs a CUDA device"]
fn linear_scales_are_swizzled_once_and_agree() {
    let cfg = MoeRunnerConfig::new(8, 256, 128, 2);
    let linear = synthetic::weights(WeightDims::of(&cfg), QuantScheme::Nvfp4, 3, &|_| {}).unwrap();
    let l = moe_runner_core::downcast_quant::<Nvfp4Weights>(linear.as_ref()).unwrap();
    assert_eq!(l.scale_layout, ScaleLayout::Linear);
    let swizzled = moe_backend_cutedsl_fp4::kernel_layout(l).unwrap();
    let runner = fp4(&cfg, DispatchFormat::Standard);
    let hidden = synthetic::hidden(37, 256, DType::Bf16, 9).unwrap();
    let topk = synthetic::topk(37, 2, 8, 10, true, false).unwrap();
    let copy = |t: &TopK| TopK::new(t.ids.clone(), t.weights.clone()).unwrap();
    let a = suite::run_path(&runner, &hidden, copy(&topk), l).unwrap();
    let b = suite::run_path(&runner, &hidden, copy(&topk), &swizzled).unwrap();
    assert_eq!(a, b);
}

#[test]
#[ignore = "needs a CUDA device"]
fn warm_passes_allocate_nothing() {
    let cfg = MoeRunnerConfig::new(8, 256, 128, 2);
    let (q, _) = weights(&cfg, 51);
    let runner = fp4(&cfg, DispatchFormat::Standard);
    let g = runner.device().clone();
    let qg = quant_to_device(&q, &g).unwrap();
    let hidden = synthetic::hidden(20, 256, DType::Bf16, 1)
        .unwrap()
        .to_device(&g)
        .unwrap();
    let topk = synthetic::topk(20, 2, 8, 2, true, false)
        .unwrap()
        .to_device(&g)
        .unwrap();
    let input = moe_runner_core::StandardDispatchOutput {
        hidden,
        hidden_scale: None,
        topk,
    };
    let out = Tensor::zeros_cuda(g.as_cuda().unwrap(), &[20, 256], DType::Bf16).unwrap();
    runner.run_into(&input, qg.as_ref(), &out).unwrap();
    let before = moe_runner_core::cuda::device_allocations();
    for _ in 0..3 {
        runner.run_into(&input, qg.as_ref(), &out).unwrap();
    }
    assert_eq!(moe_runner_core::cuda::device_allocations(), before);
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_input_is_a_typed_error() {
    moe_conformance::link_backends();
    // Hidden not a multiple of 32.
    let err = MoeRunner::on_device(
        &gpu(),
        "cutedsl_fp4",
        DispatchFormat::Standard,
        QuantScheme::Nvfp4,
        MoeRunnerConfig::new(8, 48, 128, 2),
    )
    .unwrap_err();
    assert!(
        matches!(err, MoeError::NotDivisible { divisor: 32, .. }),
        "{err}"
    );

    let cfg = MoeRunnerConfig::new(8, 256, 128, 2);
    let (q, _) = weights(&cfg, 61);
    let runner = fp4(&cfg, DispatchFormat::DeepEpLowLatency);
    let g = runner.device().clone();
    let dev = g.as_cuda().unwrap().clone();
    let qg = quant_to_device(&q, &g).unwrap();
    let batch = masked_batch(&cfg, 10, 7);
    // masked_m beyond the buffer, from the host: rejected before any launch.
    let mut host_bad = to_gpu(&batch, None, &g);
    let [el, rt, _] = batch.dims().unwrap();
    let mut counts = vec![1i32; el];
    counts[2] = rt as i32 + 1;
    host_bad.masked_m = Tensor::from_slice(&counts, &[el], DType::I32).unwrap();
    let Err(err) = runner.run(&host_bad, qg.as_ref()) else {
        panic!("masked_m past the buffer was accepted");
    };
    assert!(matches!(err, MoeError::Invalid { .. }), "{err}");
    // The same on the device: clamped, and reported by check().
    let fused = moe_backend_cutedsl_fp4::Fp4Runner::new(&cfg, &g).unwrap();
    let mut dev_bad = to_gpu(&batch, None, &g);
    dev_bad.masked_m = host_bad.masked_m.to_device(&g).unwrap();
    use moe_runner_core::registry::FusedRunner;
    fused.run(&dev_bad, qg.as_ref()).unwrap();
    assert!(fused.check().is_err());
    // FP8 or f32 activations, a scale given with bf16 ones.
    let mut f32_in = to_gpu(&batch, None, &g);
    f32_in.hidden = Tensor::zeros_cuda(&dev, &[el, rt, 256], DType::F32).unwrap();
    assert!(runner.run(&f32_in, qg.as_ref()).is_err());
    let mut scaled = to_gpu(&batch, None, &g);
    scaled.hidden_scale = Some(Tensor::zeros_cuda(&dev, &[el, rt, 2], DType::F32).unwrap());
    assert!(runner.run(&scaled, qg.as_ref()).is_err());
    // Weights on the host.
    assert!(runner.run(&to_gpu(&batch, None, &g), &q).is_err());
}

/// NVFP4 on the wire: the low-latency dispatch quantizes each token to NVFP4 (half the bytes
/// of FP8) with the weights' input global scale, the runner expands the received codes instead
/// of quantizing, and the combined layer agrees with the reference on the same tokens.
#[test]
#[ignore = "needs a CUDA device"]
fn nvfp4_on_the_low_latency_wire_matches_the_reference() {
    use moe_backend_deepep_ll::LlWorld;
    use moe_dispatch::{DispatcherConfig, Wire};
    let cfg = MoeRunnerConfig::new(8, 512, 256, 4);
    let (q, _) = weights(&cfg, 71);
    let runner = fp4(&cfg, DispatchFormat::DeepEpLowLatency);
    let g = runner.device().clone();
    let dev = g.as_cuda().unwrap().clone();
    let m = 60;
    let dcfg = DispatcherConfig {
        wire: Wire::Nvfp4,
        nvfp4_global_scale: q.a13_global[0],
        ..DispatcherConfig::single(8, 512, m).with_top_k(4)
    };
    let d = LlWorld::in_process(std::slice::from_ref(&dev), &dcfg)
        .unwrap()
        .remove(0);
    let hidden = synthetic::hidden(m, 512, DType::Bf16, 3).unwrap();
    let topk = synthetic::topk(m, 4, 8, 4, true, true).unwrap();
    let qg = quant_to_device(&q, &g).unwrap();
    let got = d
        .dispatch_now(&hidden.to_device(&g).unwrap(), topk.to_device(&g).unwrap())
        .unwrap();
    assert_eq!(got.hidden.dtype(), DType::E2M1x2);
    assert_eq!(got.hidden.shape(), &[8, m, 256]);
    // The received codes expanded for exact products, then for E4M3 ones.
    for products in [Nvfp4Products::Exact, Nvfp4Products::E4m3] {
        let qp = q.clone().with_products(products);
        let y = masked_output(&runner, &got, quant_to_device(&qp, &g).unwrap().as_ref());
        let out = Tensor::zeros_cuda(&dev, &[m, 512], DType::Bf16).unwrap();
        d.combine_into(&y, &got, &out).unwrap();
        d.check().unwrap();
        let combined = out.to_host().unwrap().to_f32_vec().unwrap();
        let copy = TopK::new(topk.ids.clone(), topk.weights.clone()).unwrap();
        let want = suite::run_path(
            &reference(&cfg, DispatchFormat::Standard, QuantScheme::Nvfp4),
            &hidden,
            copy,
            &qp,
        )
        .unwrap();
        let c = suite::compare(&combined, &want).unwrap();
        eprintln!("NVFP4 wire, {products:?} products: vs NVFP4 reference {c:?}");
        assert!(c.within(1e-2), "{products:?}: {c:?}");
    }
    // Quantized with another global scale than the weights': refused.
    let mut other = d
        .dispatch_now(&hidden.to_device(&g).unwrap(), topk.to_device(&g).unwrap())
        .unwrap();
    other.hidden_global_scale = Some(q.a13_global[0] * 2.0);
    assert!(runner.run(&other, qg.as_ref()).is_err());
}

/// Every item size of the GEMM (8, 16 and 32 rows of an expert, then the wgmma kernel's items of
/// up to 160 rows, each as wide as its rows, which the skewed routing spreads over every width),
/// at widths that are not whole stages or weight tiles: H = 352 (a partial 256-value stage and
/// k-tile), I = 160, so GEMM 1 has 320 columns (a partial 128-row weight tile) and GEMM 2 a K of
/// 160.
#[test]
#[ignore = "needs a CUDA device"]
fn every_item_size_and_partial_tiles_match_the_reference() {
    // 1, 10, 25, 50, 125 and 175 rows per expert on average: items of 8 to 160 rows, and at
    // 175 experts past one item.
    standard_layout_at(
        MoeRunnerConfig::new(8, 352, 160, 2),
        &[5, 40, 100, 200, 500, 700],
        Nvfp4Products::Exact,
    );
}

/// E4M3 products (values rounded to E4M3 for the FP8 tensor cores; the wgmma kernel at every
/// batch size) at every item size (past 96 rows, widths in steps of 8 columns, odd numbers of
/// n8 tiles among them): against
/// the reference that rounds the same way, and much closer to it than to the exact reference,
/// so the rounding is the one the reference makes.
#[test]
#[ignore = "needs a CUDA device"]
fn e4m3_products_match_the_reference_that_rounds_the_same_way() {
    standard_layout_at(
        MoeRunnerConfig::new(8, 352, 160, 2),
        &[5, 40, 100, 200, 500, 700],
        Nvfp4Products::E4m3,
    );
    standard_layout_at(
        MoeRunnerConfig::new(1, 352, 160, 1),
        &[40, 170],
        Nvfp4Products::E4m3,
    );
}

/// K of eight stages (H = 2048), more than any ring has slots, and more work items than an H100
/// has blocks (32 experts, GEMM 2 by 16 weight tiles), so every slot is reused within an item and
/// across items: at about 6 rows per expert (the six-slot `mma.sync` kernel), 40 and 50 (the
/// `wgmma` kernel), with exact and with E4M3 products. At 40 rows with E4M3 products (items of
/// 64 rows) GEMM 1 takes the activation in its epilogue and GEMM 2, on four warpgroups, starts
/// before GEMM 1 has finished, waiting per row tile: with more items of each than blocks, and
/// skewed routing, its first items can reach tiles whose GEMM 1 items still run. At 150 rows,
/// items of 160 rows (two consumer warpgroups with E4M3 products, each sum promoted 16 times
/// over GEMM 1's K).
#[test]
#[ignore = "needs a CUDA device"]
fn long_k_and_many_items_reuse_every_ring_slot() {
    for products in [Nvfp4Products::Exact, Nvfp4Products::E4m3] {
        standard_layout_at(
            MoeRunnerConfig::new(32, 2048, 512, 2),
            &[100, 640, 800, 2400],
            products,
        );
    }
}

/// One expert, one pick a token: the wgmma kernel's items (rounded up to 16 rows) are taller
/// than all the rows there are (40: one item of 48 rows), or hold all but a few (170: 160 and
/// 10).
#[test]
#[ignore = "needs a CUDA device"]
fn items_taller_than_the_rows_match_the_reference() {
    standard_layout_at(
        MoeRunnerConfig::new(1, 352, 160, 1),
        &[40, 170],
        Nvfp4Products::Exact,
    );
}

/// GEMM 1 with the activation and its requantization in its epilogue, which batches take when I
/// is a multiple of 128 and gate and up are the halves of `w13` (items up to 64 rows on four
/// consumer warpgroups, past 96 on two; the kernels' unit test
/// `gemm_1_takes_the_activation_on_items_it_fits_with_whole_scale_tiles` checks that these
/// shapes take it): the standard layout at about 2, 10, 20, 40, 100 and 160 rows per expert
/// (items of 16 to 64 rows, then 144 and 160) with skewed routing (experts past an item take
/// several), for each gated activation
/// option with separate halves (the gpt-oss one too, with its alpha), with E4M3 products (exact
/// ones keep the activation kernel, as the interleaved layout and ungated activations do); I =
/// 384 once (three scale tiles between the halves, and the padding of a partial segment of GEMM
/// 2's input); and the masked layout.
#[test]
#[ignore = "needs a CUDA device"]
fn gemm1_with_the_activation_in_its_epilogue_matches_the_reference() {
    let gated = [
        "silu",
        "swiglu_limit",
        "clamp_after_silu",
        "gelu",
        "up_gate",
    ];
    let mut cfgs: Vec<(&str, MoeRunnerConfig)> = moe_conformance::cases::VARIANTS
        .iter()
        .filter(|v| gated.contains(&v.name))
        .map(|v| {
            let mut cfg = MoeRunnerConfig::new(8, 512, 256, 2);
            (v.apply)(&mut cfg);
            (v.name, cfg)
        })
        .collect();
    let mut gpt_oss = MoeRunnerConfig::new(8, 512, 256, 2);
    gpt_oss.swiglu_limit = Some(0.75);
    gpt_oss.gemm1_alpha = Some(1.702);
    cfgs.push(("gpt-oss activation, gate and up as halves", gpt_oss));
    cfgs.push(("I = 384", MoeRunnerConfig::new(8, 512, 384, 2)));
    for (name, cfg) in cfgs {
        eprintln!("{name}");
        standard_layout_at(
            cfg.clone(),
            &[8, 40, 80, 160, 400, 640],
            Nvfp4Products::E4m3,
        );
    }
    // The masked layout: about 20 rows per expert (items of 48 rows), skewed.
    let cfg = MoeRunnerConfig::new(8, 512, 256, 2);
    let batch = masked_batch(&cfg, 80, 13);
    eprintln!(
        "masked_m {:?}, expected_m {}",
        batch.masked_m.as_slice::<i32>().unwrap(),
        batch.expected_m
    );
    masked_matches_the_reference(&cfg, &batch, &weights(&cfg, 43).0, "masked");
}

/// Input global scales that differ between experts: the standard layout quantizes each pick's
/// row with its expert's scale. (With one scale for every expert, as the other tests have, and
/// E4M3 products, it quantizes each token once and writes its row to each of its picks.)
#[test]
#[ignore = "needs a CUDA device"]
fn per_expert_input_scales_quantize_each_pick() {
    let cfg = MoeRunnerConfig::new(8, 512, 256, 4);
    let (mut w, _) = weights(&cfg, 61);
    for (e, a) in w.a13_global.iter_mut().enumerate() {
        *a *= 1.0 + e as f32 / 4.0;
    }
    for products in [Nvfp4Products::Exact, Nvfp4Products::E4m3] {
        standard_layout_with(&cfg, &w, &[10, 300], products);
    }
}

/// The standard layout of `cfg` at each number of tokens in `ms`, with skewed routing and the
/// weights' products taken as `products`, against the reference that quantizes the same way.
/// With E4M3 products, also at most a quarter as far from it as that reference is from the
/// exact one; and then the exact weights on the same runner, whose GEMM inputs share the
/// workspace in another layout (at H = 352, with the padding of a partial segment).
fn standard_layout_at(cfg: MoeRunnerConfig, ms: &[usize], products: Nvfp4Products) {
    standard_layout_with(&cfg, &weights(&cfg, 61).0, ms, products);
}

/// `standard_layout_at` with the weights `exact` (exact products) of `cfg`.
fn standard_layout_with(
    cfg: &MoeRunnerConfig,
    exact: &Nvfp4Weights,
    ms: &[usize],
    products: Nvfp4Products,
) {
    let cfg = cfg.clone();
    let exact_q = quant_to_device(exact, &Device::cpu()).unwrap();
    let q = exact.clone().with_products(products);
    let runner = fp4(&cfg, DispatchFormat::Standard);
    let want_runner = reference(&cfg, DispatchFormat::Standard, QuantScheme::Nvfp4);
    for &m in ms {
        let hidden = synthetic::hidden(m, cfg.hidden_size, DType::Bf16, 300 + m as u64).unwrap();
        let topk =
            synthetic::topk(m, cfg.top_k, cfg.num_experts, 400 + m as u64, true, true).unwrap();
        let copy = |t: &TopK| TopK::new(t.ids.clone(), t.weights.clone()).unwrap();
        let got = suite::run_path(&runner, &hidden, copy(&topk), &q).unwrap();
        let want = suite::run_path(&want_runner, &hidden, copy(&topk), &q).unwrap();
        let c = suite::compare(&got, &want).unwrap();
        eprintln!(
            "E={} top-{} H={} I={} M={m} {products:?}: vs NVFP4 reference {c:?}",
            cfg.num_experts, cfg.top_k, cfg.hidden_size, cfg.intermediate_size
        );
        assert!(c.within(1e-2), "M={m} against the NVFP4 reference: {c:?}");
        if products != Nvfp4Products::Exact {
            let exact_want =
                suite::run_path(&want_runner, &hidden, copy(&topk), exact_q.as_ref()).unwrap();
            let gap = suite::compare(&want, &exact_want).unwrap();
            eprintln!("  the {products:?} reference vs the exact one: {gap:?}");
            assert!(
                c.rel_l2 * 4.0 < gap.rel_l2,
                "M={m}: {c:?} is not much closer to the {products:?} reference than {gap:?}"
            );
            let after = suite::run_path(&runner, &hidden, copy(&topk), exact_q.as_ref()).unwrap();
            let x = suite::compare(&after, &exact_want).unwrap();
            eprintln!("  then exact products on the same runner: {x:?}");
            assert!(x.within(1e-2), "M={m}, exact after {products:?}: {x:?}");
        }
    }
}
