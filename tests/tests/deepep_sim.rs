//! The low-latency all-to-all of several ranks, modelled on the CPU (`moe_backend_deepep_ll::sim`)
//! around the reference masked runner, agrees with the expert-parallel reference: the layout
//! (which rows each rank receives, `masked_m`, `src_info`, `layout_range`) and the weighted
//! combine carry every token to its experts and back.

use moe_backend_deepep_ll::sim;
use moe_conformance::{ep, suite, synthetic};
use moe_dispatch::{DispatcherConfig, Wire};
use moe_runner_core::{
    DType, DeepEpLlCombineInput, DispatchFormat, MoeRunner, MoeRunnerConfig, QuantScheme,
    WeightDims,
};

const E: usize = 8;
const H: usize = 256;
const I: usize = 128;
const K: usize = 2;
const T: usize = 16;

fn world(ranks: usize, wire: Wire) -> DispatcherConfig {
    DispatcherConfig {
        world_size: ranks,
        num_local_experts: E / ranks,
        routed_scaling_factor: Some(2.5),
        wire,
        // The synthetic NVFP4 weights' input global scale (an activation amax of 6).
        nvfp4_global_scale: moe_quant::nvfp4_global_scale(6.0).unwrap(),
        ..DispatcherConfig::single(E, H, T).with_top_k(K)
    }
}

#[test]
fn simulated_ranks_agree_with_the_expert_parallel_reference() {
    moe_conformance::link_backends();
    for (ranks, wire, scheme) in [
        (1, Wire::Native, QuantScheme::Bf16),
        (2, Wire::Native, QuantScheme::Bf16),
        (4, Wire::Fp8, QuantScheme::Fp8Block128),
        (8, Wire::Fp8, QuantScheme::Fp8Block128),
        (2, Wire::Nvfp4, QuantScheme::Nvfp4),
    ] {
        let dcfg = world(ranks, wire);
        let mut cfg = MoeRunnerConfig::new(E, H, I, K);
        cfg.num_local_experts = E / ranks;
        cfg.routed_scaling_factor = Some(2.5);
        let dims = WeightDims {
            experts: E / ranks,
            n1: 2 * I,
            hidden: H,
            inter: I,
        };
        let weights: Vec<_> = (0..ranks)
            .map(|r| synthetic::weights(dims, scheme, 40 + r as u64, &|_| {}).unwrap())
            .collect();
        // Ranks with a full batch, a partial one and (with 4 or 8 ranks) none.
        let inputs: Vec<_> = (0..ranks)
            .map(|r| {
                let m = [T, 9, 0, 5, 1, T, 0, 3][r];
                (
                    synthetic::hidden(m, H, DType::Bf16, 7 + r as u64).unwrap(),
                    synthetic::topk(m, K, E, 11 + r as u64, r == 0, true).unwrap(),
                )
            })
            .collect();
        let got = sim::dispatch(&dcfg, &inputs).unwrap();
        // Every (token, slot) with an expert lands in exactly one row, named by src_info.
        for (src, place) in got.placements.iter().enumerate() {
            let ids = inputs[src].1.ids.as_slice::<i32>().unwrap();
            for (i, p) in place.iter().enumerate() {
                assert_eq!(p.is_some(), ids[i] >= 0);
                if let Some(p) = p {
                    assert_eq!(p.rank * (E / ranks) + p.expert, ids[i] as usize);
                    let d = &got.outputs[p.rank];
                    let rt = ranks * T;
                    assert_eq!(
                        d.src_info.as_slice::<i32>().unwrap()[p.expert * rt + p.row],
                        (i / K) as i32
                    );
                    let lr = d.layout_range.as_slice::<i64>().unwrap()[p.expert * ranks + src];
                    let (begin, count) = ((lr >> 32) as usize, (lr & 0xffff_ffff) as usize);
                    assert!((begin..begin + count).contains(&p.row));
                }
            }
        }
        let runner = MoeRunner::new(
            moe_backend_reference::RUNNER,
            DispatchFormat::DeepEpLowLatency,
            scheme,
            cfg.clone(),
        )
        .unwrap();
        let ys: Vec<Vec<f32>> = got
            .outputs
            .iter()
            .zip(&weights)
            .map(|(d, w)| {
                let y = runner.run(d, w.as_ref()).unwrap();
                let y = moe_runner_core::downcast_combine::<DeepEpLlCombineInput>(
                    y,
                    DispatchFormat::DeepEpLowLatency,
                )
                .unwrap();
                y.hidden.to_f32_vec().unwrap()
            })
            .collect();
        let outs = sim::combine(&dcfg, &got, &ys, DType::Bf16).unwrap();
        let refs: Vec<_> = weights.iter().map(|w| w.as_ref()).collect();
        let want = ep::layer_outputs(&cfg, scheme, &refs, &inputs).unwrap();
        // (UE8M0 scales round activations apart from the reference's f32 scales; their layout
        // is the FP8 one, checked here, and their rounding is checked byte for byte on the GPU.)
        let tol = suite::tolerance(scheme);
        for (r, (o, w)) in outs.iter().zip(&want).enumerate() {
            let c = suite::compare(&o.to_f32_vec().unwrap(), w).unwrap();
            assert!(c.within(tol), "R={ranks} {wire:?} rank {r}: {c:?}");
        }
    }
}
