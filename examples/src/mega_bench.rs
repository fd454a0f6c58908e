//! `moe bench-mega`: the MegaMoE program against this project's unfused expert-parallel path
//! on the same routing, at DeepSeek-V3 expert shapes (256 experts over the ranks, H=7168,
//! I=2048, top-8), per tokens per rank. The unfused path is the low-latency all-to-all, a masked
//! runner and the combine: FP8 on the wire with `masked_gemm` (w8a8), and NVFP4 on the wire with
//! `cutedsl_fp4` (w4a4, this project's other 4-bit path). Each is captured as a CUDA graph per
//! rank and replayed; with several ranks, every rank's graph is launched and all are awaited.
//! The floor is the bytes of the distinct experts hit (MXFP4: half a byte a weight and a scale
//! byte per 32) plus the activations, over the copy bandwidth measured in the same run.

use crate::cli::MegaBenchArgs;
use crate::error::Result;
use moe_backend_deepep_ll::{LlDispatcher, LlWorld};
use moe_backend_megamoe::{MegaMoeDispatcher, MegaMoeWorld};
use moe_conformance::{synthetic, synthetic_gpu};
use moe_dispatch::{Dispatcher, DispatcherConfig, Wire};
use moe_runner_core::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use moe_runner_core::cuda::{copy_bandwidth_gbps, fill_uniform};
use moe_runner_core::{
    downcast_combine, downcast_quant, CudaDevice, DType, DeepEpLlCombineInput, Device, DeviceOps,
    DispatchFormat, MegaMoeFlags, MoeError, MoeRunner, MoeRunnerConfig, Mxfp4Acts, Mxfp4Weights,
    Nvfp4Weights, QuantInfo, QuantScheme, Tensor, TopK, WeightDims,
};
use std::io::Write;
use std::time::Instant;

const E: usize = 256;
const H: usize = 7168;
const I: usize = 2048;
const K: usize = 8;

/// One path of one rank: what a forward pass runs on that rank's stream.
type Step<'a> = Box<dyn Fn() -> moe_runner_core::Result<()> + 'a>;

/// Median microseconds of one forward pass of every rank: each rank's step captured as a graph
/// on its stream; one rank's graph timed alone; several ranks' graphs launched together and
/// awaited (wall clock).
fn time_us(devs: &[CudaDevice], steps: &[Step<'_>], iters: usize) -> Result<f64> {
    let mut graphs = Vec::with_capacity(devs.len());
    for (dev, step) in devs.iter().zip(steps) {
        let stream = dev.stream();
        let dev_err =
            |e: moe_runner_core::cuda::cudarc::driver::DriverError| MoeError::Device(e.to_string());
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(dev_err)?;
        let captured = step();
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(dev_err)?;
        captured?;
        graphs.push(graph.ok_or_else(|| MoeError::Device("the captured graph is empty".into()))?);
    }
    let launch_all = || -> Result<()> {
        for g in &graphs {
            g.launch().map_err(|e| MoeError::Device(e.to_string()))?;
        }
        for d in devs {
            d.synchronize()?;
        }
        Ok(())
    };
    for _ in 0..3 {
        launch_all()?;
    }
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters {
        if devs.len() == 1 {
            let timer = moe_runner_core::cuda::EventTimer::start(&devs[0])?;
            graphs[0]
                .launch()
                .map_err(|e| MoeError::Device(e.to_string()))?;
            t.push(timer.stop(&devs[0])? as f64 * 1e3);
        } else {
            let start = Instant::now();
            launch_all()?;
            t.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// One rank's weights and runners.
struct Rank {
    dev: CudaDevice,
    mx8: Mxfp4Weights,
    mx4: Mxfp4Weights,
    fp8: Box<dyn QuantInfo>,
    nv: Box<dyn QuantInfo>,
    mega: [MoeRunner; 3],
    masked: MoeRunner,
    fp4: MoeRunner,
}

fn config(ranks: usize, flags: Option<(bool, bool)>) -> MoeRunnerConfig {
    let mut c = MoeRunnerConfig::new(E, H, I, K);
    c.num_local_experts = E / ranks;
    if let Some((fp4, mx)) = flags {
        c.megamoe = MegaMoeFlags {
            fp4_acts: Some(fp4),
            mxf4_kind: Some(mx),
        };
    }
    c
}

fn rank(dev: &CudaDevice, ranks: usize, r: usize) -> Result<Rank> {
    let device = Device::Cuda(dev.clone());
    let dims = WeightDims {
        experts: E / ranks,
        n1: 2 * I,
        hidden: H,
        inter: I,
    };
    let seed = 70 + r as u64;
    let mx = synthetic_gpu::device_weights(dev, dims, QuantScheme::Mxfp4A8, seed)?;
    let mx8 = downcast_quant::<Mxfp4Weights>(mx.as_ref())?;
    let share = |acts| {
        Mxfp4Weights::new(
            mx8.w13.clone(),
            mx8.w13_scale.clone(),
            mx8.w2.clone(),
            mx8.w2_scale.clone(),
        )
        .map(|w| w.with_acts(acts))
    };
    let mega = |fp4, mx| {
        let scheme = if fp4 {
            QuantScheme::Mxfp4A4
        } else {
            QuantScheme::Mxfp4A8
        };
        MoeRunner::on_device(
            &device,
            "megamoe",
            DispatchFormat::MegaMoe,
            scheme,
            config(ranks, Some((fp4, mx))),
        )
    };
    let ll = |runner, scheme| {
        MoeRunner::on_device(
            &device,
            runner,
            DispatchFormat::DeepEpLowLatency,
            scheme,
            config(ranks, None),
        )
    };
    Ok(Rank {
        dev: dev.clone(),
        mx8: share(Mxfp4Acts::Fp8)?,
        mx4: share(Mxfp4Acts::Fp4)?,
        fp8: synthetic_gpu::device_weights(dev, dims, QuantScheme::Fp8Block128, seed + 10)?,
        nv: synthetic_gpu::device_weights(dev, dims, QuantScheme::Nvfp4, seed + 20)?,
        mega: [mega(false, false)?, mega(true, false)?, mega(true, true)?],
        masked: ll("masked_gemm", QuantScheme::Fp8Block128)?,
        fp4: ll("cutedsl_fp4", QuantScheme::Nvfp4)?,
    })
}

fn ll_step<'a>(
    d: &'a LlDispatcher,
    runner: &'a MoeRunner,
    w: &'a dyn QuantInfo,
    (hidden, topk, out): (&'a Tensor, &'a TopK, &'a Tensor),
) -> Step<'a> {
    Box::new(move || {
        let t = TopK::new(topk.ids.clone(), topk.weights.clone())?;
        let g = d.dispatch_now(hidden, t)?;
        let y = runner.run(&g, w)?;
        let y = downcast_combine::<DeepEpLlCombineInput>(y, DispatchFormat::DeepEpLowLatency)?;
        d.combine_into(&y.hidden, &g, out)
    })
}

fn mega_step<'a>(
    d: &'a MegaMoeDispatcher,
    runner: &'a MoeRunner,
    w: &'a dyn QuantInfo,
    (hidden, topk, out): (&'a Tensor, &'a TopK, &'a Tensor),
) -> Step<'a> {
    Box::new(move || {
        let t = TopK::new(topk.ids.clone(), topk.weights.clone())?;
        let g = d.dispatch(hidden, t)?;
        runner.run_into(g.as_ref(), w, out)
    })
}

pub fn bench_mega(args: &MegaBenchArgs, out: &mut dyn Write) -> Result<()> {
    crate::link_backends();
    let ranks = args.ranks;
    if ranks == 0 || !E.is_multiple_of(ranks) {
        return Err(MoeError::Config(format!("--ranks must divide {E}, got {ranks}")).into());
    }
    let devs: Vec<CudaDevice> = (0..ranks)
        .map(CudaDevice::new)
        .collect::<moe_runner_core::Result<_>>()?;
    let tmax = args.tokens.iter().copied().max().unwrap_or(1).max(1);
    let gbps = copy_bandwidth_gbps(&devs[0], 2 << 30, 10)?;
    let name = Device::Cuda(devs[0].clone()).name();
    let world_cfg = DispatcherConfig {
        world_size: ranks,
        num_local_experts: E / ranks,
        ..DispatcherConfig::single(E, H, tmax)
            .with_top_k(K)
            .with_intermediate(I)
    };
    let world: Vec<Rank> = devs
        .iter()
        .enumerate()
        .map(|(r, d)| rank(d, ranks, r))
        .collect::<Result<_>>()?;
    let mega_world = MegaMoeWorld::in_process(&devs, &world_cfg)?;
    let fp8_world = LlWorld::in_process(
        &devs,
        &DispatcherConfig {
            wire: Wire::Fp8,
            ..world_cfg.clone()
        },
    )?;
    let nv_world = LlWorld::in_process(
        &devs,
        &DispatcherConfig {
            wire: Wire::Nvfp4,
            // The input global scale the generated NVFP4 weights carry.
            nvfp4_global_scale: downcast_quant::<Nvfp4Weights>(world[0].nv.as_ref())?.a13_global[0],
            ..world_cfg.clone()
        },
    )?;
    writeln!(
        out,
        "{name} x{ranks}: copy {gbps:.0} GB/s; DeepSeek-V3 experts (256 over {ranks} rank(s), H=7168, I=2048, top-8); median of {} graph replays",
        args.iters
    )?;
    let header = "| tokens/rank | megamoe w4a8 (us) | megamoe w4a4 (us) | megamoe w4a4 mxf4 (us) | unfused FP8: deepep_ll + masked_gemm (us) | unfused NVFP4: deepep_ll + cutedsl_fp4 (us) | floor (us) | best megamoe / floor | unfused NVFP4 / megamoe w4a4 | unfused FP8 / megamoe w4a8 |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";
    let mut table = vec![header.to_string()];
    writeln!(out, "{header}")?;
    // MXFP4 bytes of one expert: half a byte a weight, one scale byte per 32.
    let expert_bytes = (3 * H * I) as f64 * (0.5 + 1.0 / 32.0);
    for &m in &args.tokens {
        let inputs: Vec<(Tensor, TopK, Tensor)> = world
            .iter()
            .enumerate()
            .map(|(r, rk)| {
                let hidden = Tensor::zeros_cuda(&rk.dev, &[m, H], DType::Bf16)?;
                fill_uniform(&rk.dev, &hidden, -1.7, 1.7, 11 + r as u64)?;
                let topk = synthetic::topk(m, K, E, 12 + r as u64, false, false)?;
                let out = Tensor::zeros_cuda(&rk.dev, &[m, H], DType::Bf16)?;
                Ok((hidden, topk, out))
            })
            .collect::<Result<_>>()?;
        // The floor: the slowest rank's distinct experts hit, plus activations in and out.
        let mut hit = vec![false; E];
        for (_, t, _) in &inputs {
            for &id in t.ids.as_slice::<i32>()? {
                if id >= 0 {
                    hit[id as usize] = true;
                }
            }
        }
        let per_rank_hit = (0..ranks)
            .map(|r| {
                hit[r * E / ranks..(r + 1) * E / ranks]
                    .iter()
                    .filter(|&&h| h)
                    .count()
            })
            .max()
            .unwrap_or(0);
        let floor = (per_rank_hit as f64 * expert_bytes + (4 * m * H) as f64) / (gbps * 1e3);
        let dev_inputs: Vec<(Tensor, TopK, Tensor)> = inputs
            .iter()
            .zip(&world)
            .map(|((h, t, o), rk)| {
                let d = Device::Cuda(rk.dev.clone());
                Ok((h.clone(), t.to_device(&d)?, o.clone()))
            })
            .collect::<Result<_>>()?;
        let io = |r: usize| {
            let (h, t, o) = &dev_inputs[r];
            (h, t, o)
        };
        let mut mega_us = [0f64; 3];
        for (v, us) in mega_us.iter_mut().enumerate() {
            let steps: Vec<Step<'_>> = (0..ranks)
                .map(|r| {
                    let w: &dyn QuantInfo = if v == 0 { &world[r].mx8 } else { &world[r].mx4 };
                    mega_step(&mega_world[r], &world[r].mega[v], w, io(r))
                })
                .collect();
            for s in &steps {
                s()?; // compile, pack the weights, warm up outside the capture
            }
            for (d, r) in mega_world.iter().zip(&world) {
                r.dev.synchronize()?;
                d.check()?;
            }
            *us = time_us(&devs, &steps, args.iters)?;
            let phases = mega_world[0]
                .phase_times_us()?
                .iter()
                .map(|(n, t)| format!("{n} {t:.1}"))
                .collect::<Vec<_>>()
                .join(", ");
            eprintln!("  megamoe variant {v}, {m} tokens, rank 0's phases (us): {phases}");
        }
        let mut ll_us = [0f64; 2];
        for (v, us) in ll_us.iter_mut().enumerate() {
            let steps: Vec<Step<'_>> = (0..ranks)
                .map(|r| {
                    let (d, runner, w) = if v == 0 {
                        (&fp8_world[r], &world[r].masked, world[r].fp8.as_ref())
                    } else {
                        (&nv_world[r], &world[r].fp4, world[r].nv.as_ref())
                    };
                    ll_step(d, runner, w, io(r))
                })
                .collect();
            for s in &steps {
                s()?;
            }
            for r in &world {
                r.dev.synchronize()?;
            }
            *us = time_us(&devs, &steps, args.iters)?;
        }
        let best = mega_us.iter().copied().fold(f64::INFINITY, f64::min);
        let line = format!(
            "| {m} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {floor:.1} | {:.2}x | {:.2}x | {:.2}x |",
            mega_us[0],
            mega_us[1],
            mega_us[2],
            ll_us[0],
            ll_us[1],
            best / floor,
            ll_us[1] / mega_us[1].min(mega_us[2]),
            ll_us[0] / mega_us[0],
        );
        writeln!(out, "{line}")?;
        table.push(line);
    }
    for (d, r) in mega_world.iter().zip(&world) {
        r.dev.synchronize()?;
        d.check()?;
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, table.join("\n") + "\n")?;
    }
    Ok(())
}
