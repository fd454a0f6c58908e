//! Criterion bench of the `triton` runner's whole layer on the GPU (Qwen3-30B-A3B shape, bf16,
//! and DeepSeek-V3 expert shapes with 32 experts, FP8 blocks), timed with CUDA events around
//! each iteration's launches. Without a GPU it says so and measures nothing.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use moe_backend_triton::TritonRunner;
use moe_conformance::{synthetic, synthetic_gpu};
use moe_runner_core::cuda::{fill_uniform, EventTimer};
use moe_runner_core::{
    DType, Device, MoeRunnerConfig, QuantScheme, StandardDispatchOutput, Tensor, TopK, WeightDims,
};
use std::time::Duration;

fn bench(c: &mut Criterion) {
    moe_conformance::link_backends();
    let Ok(device) = Device::cuda(0) else {
        eprintln!("triton bench: no CUDA device, nothing measured");
        return;
    };
    let dev = device.as_cuda().unwrap().clone();
    let mut group = c.benchmark_group("triton_layer");
    group.sample_size(20);
    for (name, e, h, i, k, scheme) in [
        ("qwen3_bf16", 128, 2048, 768, 8, QuantScheme::Bf16),
        (
            "deepseek_e32_fp8",
            32,
            7168,
            2048,
            8,
            QuantScheme::Fp8Block128,
        ),
    ] {
        let cfg = MoeRunnerConfig::new(e, h, i, k);
        let dims = WeightDims {
            experts: e,
            n1: 2 * i,
            hidden: h,
            inter: i,
        };
        let quant = synthetic_gpu::device_weights(&dev, dims, scheme, 1).unwrap();
        let runner = TritonRunner::new(&cfg, &device).unwrap();
        for m in [1usize, 64, 512] {
            let hidden = Tensor::zeros_cuda(&dev, &[m, h], DType::Bf16).unwrap();
            fill_uniform(&dev, &hidden, -1.7, 1.7, 2).unwrap();
            let topk = synthetic::topk(m, k, e, 3, false, false).unwrap();
            let input = StandardDispatchOutput {
                hidden,
                hidden_scale: None,
                topk: TopK::new(
                    topk.ids.to_device(&device).unwrap(),
                    topk.weights.to_device(&device).unwrap(),
                )
                .unwrap(),
            };
            let out = Tensor::zeros_cuda(&dev, &[m, h], DType::Bf16).unwrap();
            runner.run_into(&input, quant.as_ref(), &out).unwrap();
            group.bench_with_input(BenchmarkId::new(name, m), &m, |b, _| {
                b.iter_custom(|iters| {
                    let t = EventTimer::start(&dev).unwrap();
                    for _ in 0..iters {
                        runner.run_into(&input, quant.as_ref(), &out).unwrap();
                    }
                    Duration::from_secs_f64(t.stop(&dev).unwrap() as f64 * 1e-3)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
