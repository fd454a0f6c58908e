//! Criterion bench of the CPU reference runner on the `tiny` shape (E=8, k=2, H=256, I=128)
//! and a Qwen3-30B-A3B-shaped layer cut to 16 experts, bf16, standard format.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use moe_conformance::{suite, synthetic};
use moe_runner_core::{
    DType, DispatchFormat, MoeRunner, MoeRunnerConfig, QuantScheme, TopK, WeightDims,
};

fn bench(c: &mut Criterion) {
    moe_conformance::link_backends();
    let mut group = c.benchmark_group("reference_standard_bf16");
    group.sample_size(10);
    for (name, e, h, i, k) in [("tiny", 8, 256, 128, 2), ("qwen3_e16", 16, 2048, 768, 8)] {
        let cfg = MoeRunnerConfig::new(e, h, i, k);
        let quant = synthetic::weights(
            WeightDims {
                experts: e,
                n1: 2 * i,
                hidden: h,
                inter: i,
            },
            QuantScheme::Bf16,
            1,
            &|_| {},
        )
        .unwrap();
        let runner = MoeRunner::new(
            "reference",
            DispatchFormat::Standard,
            QuantScheme::Bf16,
            cfg,
        )
        .unwrap();
        for m in [1usize, 64] {
            let hidden = synthetic::hidden(m, h, DType::Bf16, 2).unwrap();
            let topk = synthetic::topk(m, k, e, 3, false, false).unwrap();
            group.bench_with_input(BenchmarkId::new(name, m), &m, |b, _| {
                b.iter(|| {
                    let t = TopK::new(topk.ids.clone(), topk.weights.clone()).unwrap();
                    suite::run_path(&runner, &hidden, t, quant.as_ref()).unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
