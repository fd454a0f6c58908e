//! `moe bench-a2a`: the `deepep_ll` all-to-all over R GPUs of this process. Dispatch and
//! combine latency per batch size, their bandwidth beside the peer-to-peer copy bandwidth
//! measured in the same run, and (with `--layer`) the whole layer dispatch + `masked_gemm` +
//! combine at DeepSeek-V3 expert shapes. Each rank's work is captured in a CUDA graph on its
//! own GPU; an iteration launches every rank's graph (20 replays back to back, or one for the
//! "single" figures) and waits for all. The time reported is the one of the rank launched
//! last (launch order alternates), which holds no host launch skew, only the wait for its
//! peers' data.

use crate::cli::A2aBenchArgs;
use crate::error::Result;
use crate::output::write_json;
use moe_backend_deepep_ll::{LlDispatcher, LlWorld, MaskedGemmRunner};
use moe_conformance::{synthetic, synthetic_gpu};
use moe_dispatch::{DispatcherConfig, Wire};
use moe_runner_core::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use moe_runner_core::cuda::cudarc::driver::{CudaContext, CudaGraph};
use moe_runner_core::cuda::{copy_bandwidth_gbps, EventTimer};
use moe_runner_core::{
    CudaDevice, DType, Device, DeviceOps, MoeError, MoeRunnerConfig, QuantScheme, Tensor, TopK,
    WeightDims,
};
use serde::Serialize;
use std::io::Write;

fn dev_err(e: impl std::fmt::Display) -> MoeError {
    MoeError::Device(e.to_string())
}

#[derive(Debug, Serialize)]
pub struct A2aRow {
    pub ranks: usize,
    pub tokens_per_rank: usize,
    pub wire: String,
    /// Per call, replays back to back (no host launch latency).
    pub dispatch_us: f64,
    pub combine_us: f64,
    /// One isolated replay, host launch latency included.
    pub dispatch_single_us: f64,
    pub combine_single_us: f64,
    /// The send halves alone (routing and writes to every rank; no wait for peers).
    pub dispatch_send_us: f64,
    pub combine_send_us: f64,
    /// Whole layer (dispatch, masked GEMMs, combine), when measured.
    pub layer_us: Option<f64>,
    /// Bytes one rank writes into other ranks' buffers per dispatch / combine.
    pub dispatch_remote_bytes: u64,
    pub combine_remote_bytes: u64,
    pub dispatch_remote_gbps: f64,
    pub combine_remote_gbps: f64,
    /// All bytes a rank moves per dispatch (its own experts' copies included) over the time.
    pub dispatch_total_gbps: f64,
}

#[derive(Debug, Serialize)]
pub struct A2aReport {
    pub device: String,
    pub ranks: usize,
    pub gpus: usize,
    /// Per direction, with every GPU copying to the next at once (GB/s); None for one GPU.
    pub p2p_gbps: Option<f64>,
    /// Device-to-device copy bandwidth of one GPU (read + write, GB/s).
    pub copy_gbps: f64,
    pub rows: Vec<A2aRow>,
}

/// One graph per rank, captured from `work(rank)` on that rank's stream.
pub fn capture(
    devs: &[CudaDevice],
    mut work: impl FnMut(usize) -> moe_runner_core::Result<()>,
) -> Result<Vec<CudaGraph>> {
    devs.iter()
        .enumerate()
        .map(|(r, dev)| {
            let stream = dev.stream();
            stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(dev_err)?;
            let done = work(r);
            let graph = stream
                .end_capture(CUgraphInstantiate_flags(0))
                .map_err(dev_err)?;
            done?;
            Ok(graph.ok_or_else(|| MoeError::Device("empty graph".into()))?)
        })
        .collect()
}

/// Median microseconds of `iters` iterations (after `warmup`) of every rank's graph at once,
/// each iteration `reps` replays back to back, so the time per replay leaves out the host's
/// launch latency the way a layer inside a captured model would (1: one isolated replay).
pub fn time_graphs(
    devs: &[CudaDevice],
    graphs: &[CudaGraph],
    warmup: usize,
    iters: usize,
    reps: usize,
) -> Result<f64> {
    let mut times = Vec::with_capacity(iters);
    for it in 0..warmup + iters {
        let order: Vec<usize> = if it % 2 == 0 {
            (0..devs.len()).collect()
        } else {
            (0..devs.len()).rev().collect()
        };
        let timers = order
            .iter()
            .map(|&r| Ok((r, EventTimer::start(&devs[r])?)))
            .collect::<Result<Vec<_>>>()?;
        for _ in 0..reps {
            for &r in &order {
                graphs[r].launch().map_err(dev_err)?;
            }
        }
        let mut last = 0.0;
        for (r, t) in timers {
            last = t.stop(&devs[r])?;
        }
        if it >= warmup {
            times.push(last as f64 * 1e3 / reps as f64);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn parse_wire(s: &str) -> Result<Wire> {
    Ok(match s {
        "bf16" | "native" => Wire::Native,
        "fp8" => Wire::Fp8,
        "fp8-ue8m0" => Wire::Fp8Ue8m0,
        "nvfp4" => Wire::Nvfp4,
        other => {
            return Err(MoeError::invalid(
                "--wire",
                format!("`{other}`: expected bf16, fp8, fp8-ue8m0 or nvfp4"),
            )
            .into())
        }
    })
}

/// Bytes each rank writes to other ranks: (dispatch, combine, dispatch total).
fn traffic(cfg: &DispatcherConfig, rank: usize, topk: &TopK) -> Result<(u64, u64, u64)> {
    let el = cfg.num_local_experts;
    let h = cfg.hidden_size;
    let row = match cfg.wire {
        Wire::Native => h * 2,
        Wire::Fp8 | Wire::Fp8Ue8m0 => h + h / 128 * 4,
        Wire::Nvfp4 => h / 2 + h / 16,
    } as u64;
    let comb_row = cfg.hidden_size as u64 * 2;
    let (mut remote, mut total) = (0u64, 0u64);
    for &id in topk.ids.as_slice::<i32>()? {
        if id < 0 {
            continue;
        }
        total += 1;
        remote += u64::from(id as usize / el != rank);
    }
    Ok((remote * row, remote * comb_row, total * row))
}

pub fn bench_a2a(args: &A2aBenchArgs, out: &mut dyn Write) -> Result<()> {
    let gpus = CudaContext::device_count().map_err(dev_err)? as usize;
    if gpus == 0 {
        return Err(MoeError::NoCuda("no GPU".into()).into());
    }
    let r_n = args.ranks;
    let devs: Vec<CudaDevice> = (0..r_n)
        .map(|r| CudaDevice::new(r % gpus))
        .collect::<moe_runner_core::Result<_>>()?;
    let wire = parse_wire(&args.wire)?;
    let copy = copy_bandwidth_gbps(&devs[0], 1 << 30, 10)?;
    let distinct = r_n > 1 && gpus >= r_n;
    let p2p = if distinct {
        Some(moe_backend_deepep_ll::probe::peer_copy_gbps(
            &devs,
            1 << 30,
            10,
        )?)
    } else {
        None
    };
    let mut rows = Vec::new();
    for &t in &args.tokens {
        let cfg = DispatcherConfig {
            world_size: r_n,
            num_local_experts: args.experts / r_n,
            wire,
            // The synthetic activations are uniform in +-sqrt(3): their NVFP4 global scale.
            nvfp4_global_scale: 2688.0 / 3f32.sqrt(),
            ..DispatcherConfig::single(args.experts, args.hidden, t).with_top_k(args.top_k)
        };
        let ds: Vec<LlDispatcher> = LlWorld::in_process(&devs, &cfg)?;
        let inputs: Vec<(Tensor, TopK)> = (0..r_n)
            .map(|r| {
                let d = Device::Cuda(devs[r].clone());
                let topk =
                    synthetic::topk(t, args.top_k, args.experts, 7 + r as u64, false, false)?;
                let hidden = synthetic::hidden(t, args.hidden, DType::Bf16, 3 + r as u64)?;
                Ok((hidden.to_device(&d)?, topk))
            })
            .collect::<moe_runner_core::Result<_>>()?;
        let bytes: Vec<_> = inputs
            .iter()
            .enumerate()
            .map(|(r, (_, tk))| traffic(&cfg, r, tk))
            .collect::<Result<_>>()?;
        let topks: Vec<TopK> = inputs
            .iter()
            .zip(&devs)
            .map(|((_, tk), d)| tk.to_device(&Device::Cuda(d.clone())))
            .collect::<moe_runner_core::Result<_>>()?;
        let clone = |tk: &TopK| TopK::new(tk.ids.clone(), tk.weights.clone());
        // Eager round first (compiles kernels, sizes workspaces), keeping its outputs for the combine graph.
        let hooks: Vec<_> = ds
            .iter()
            .zip(&inputs)
            .zip(&topks)
            .map(|((d, (h, _)), tk)| d.dispatch_send(h, clone(tk)?))
            .collect::<moe_runner_core::Result<_>>()?;
        let outs: Vec<_> = hooks
            .into_iter()
            .map(|h| h.recv())
            .collect::<moe_runner_core::Result<_>>()?;
        let ys: Vec<Tensor> = outs
            .iter()
            .map(|o| o.out_buffer.clone().expect("registered buffer"))
            .collect();
        let combined: Vec<Tensor> = devs
            .iter()
            .map(|d| Tensor::zeros_cuda(d, &[t, args.hidden], DType::Bf16))
            .collect::<moe_runner_core::Result<_>>()?;
        let hooks: Vec<_> = ds
            .iter()
            .zip(&ys)
            .zip(&outs)
            .map(|((d, y), o)| d.combine_send(y, o))
            .collect::<moe_runner_core::Result<_>>()?;
        for (h, c) in hooks.into_iter().zip(&combined) {
            h.recv_into(c)?;
        }
        for d in &ds {
            d.check()?;
        }
        let dispatch_graphs = capture(&devs, |r| {
            ds[r]
                .dispatch_now(&inputs[r].0, clone(&topks[r])?)
                .map(|_| ())
        })?;
        let dispatch_us = time_graphs(&devs, &dispatch_graphs, 5, args.iters, 20)?;
        let dispatch_single_us = time_graphs(&devs, &dispatch_graphs, 5, args.iters, 1)?;
        let combine_graphs = capture(&devs, |r| {
            ds[r].combine_into(&ys[r], &outs[r], &combined[r])
        })?;
        let combine_us = time_graphs(&devs, &combine_graphs, 5, args.iters, 20)?;
        let combine_single_us = time_graphs(&devs, &combine_graphs, 5, args.iters, 1)?;
        for d in &ds {
            d.check()?;
        }
        // The send halves alone, last: their epochs run ahead of the receives', which only the
        // full rounds above rely on.
        let graphs = capture(&devs, |r| {
            ds[r]
                .dispatch_send(&inputs[r].0, clone(&topks[r])?)
                .map(|_| ())
        })?;
        let dispatch_send_us = time_graphs(&devs, &graphs, 5, args.iters, 20)?;
        let graphs = capture(&devs, |r| ds[r].combine_send(&ys[r], &outs[r]).map(|_| ()))?;
        let combine_send_us = time_graphs(&devs, &graphs, 5, args.iters, 20)?;
        let layer_us = if args.layer {
            Some(layer_time(args, &devs, &ds, &inputs, &topks, &combined)?)
        } else {
            None
        };
        let worst = |f: fn(&(u64, u64, u64)) -> u64| bytes.iter().map(f).max().unwrap_or(0);
        let (dr, cr, dt) = (worst(|b| b.0), worst(|b| b.1), worst(|b| b.2));
        let gbps = |b: u64, us: f64| b as f64 / (us * 1e-6) / 1e9;
        let row = A2aRow {
            ranks: r_n,
            tokens_per_rank: t,
            wire: args.wire.clone(),
            dispatch_us,
            combine_us,
            dispatch_single_us,
            combine_single_us,
            dispatch_send_us,
            combine_send_us,
            layer_us,
            dispatch_remote_bytes: dr,
            combine_remote_bytes: cr,
            dispatch_remote_gbps: gbps(dr, dispatch_us),
            combine_remote_gbps: gbps(cr, combine_us),
            dispatch_total_gbps: gbps(dt, dispatch_us),
        };
        writeln!(
            out,
            "R={r_n} T={t:>5} {}: dispatch {:7.1} us (single {:6.1}, send {:6.1}; {:6.1} GB/s remote, {:6.1} GB/s all)  combine {:7.1} us (single {:6.1}, send {:6.1}; {:6.1} GB/s remote){}",
            args.wire,
            row.dispatch_us,
            row.dispatch_single_us,
            row.dispatch_send_us,
            row.dispatch_remote_gbps,
            row.dispatch_total_gbps,
            row.combine_us,
            row.combine_single_us,
            row.combine_send_us,
            row.combine_remote_gbps,
            layer_us.map(|l| format!("  layer {l:8.1} us")).unwrap_or_default()
        )?;
        rows.push(row);
    }
    writeln!(
        out,
        "copy bandwidth {copy:.0} GB/s (read+write); peer-to-peer {}",
        p2p.map(|p| format!("{p:.0} GB/s per direction, all GPUs sending at once"))
            .unwrap_or_else(|| "not measured (one GPU)".into())
    )?;
    let report = A2aReport {
        device: Device::Cuda(devs[0].clone()).name(),
        ranks: r_n,
        gpus,
        p2p_gbps: p2p,
        copy_gbps: copy,
        rows,
    };
    if let Some(path) = &args.json_out {
        let mut f = std::fs::File::create(path).map_err(crate::error::CliError::Write)?;
        write_json(&mut f, &report)?;
    }
    Ok(())
}

/// The whole layer per rank, FP8 block weights of DeepSeek-V3's expert shape (I = 2048).
fn layer_time(
    args: &A2aBenchArgs,
    devs: &[CudaDevice],
    ds: &[LlDispatcher],
    inputs: &[(Tensor, TopK)],
    topks: &[TopK],
    combined: &[Tensor],
) -> Result<f64> {
    let el = args.experts / devs.len();
    let mut cfg = MoeRunnerConfig::new(args.experts, args.hidden, args.inter, args.top_k);
    cfg.num_local_experts = el;
    let dims = WeightDims {
        experts: el,
        n1: 2 * args.inter,
        hidden: args.hidden,
        inter: args.inter,
    };
    let weights: Vec<_> = devs
        .iter()
        .enumerate()
        .map(|(r, d)| {
            synthetic_gpu::device_weights(d, dims, QuantScheme::Fp8Block128, 50 + r as u64)
        })
        .collect::<moe_runner_core::Result<_>>()?;
    let runners: Vec<_> = devs
        .iter()
        .map(|d| MaskedGemmRunner::new(&cfg, &Device::Cuda(d.clone())))
        .collect::<moe_runner_core::Result<_>>()?;
    let clone = |tk: &TopK| TopK::new(tk.ids.clone(), tk.weights.clone());
    let layer = |r: usize| -> moe_runner_core::Result<()> {
        let got = ds[r].dispatch_now(&inputs[r].0, clone(&topks[r])?)?;
        let y = got.out_buffer.clone().expect("registered buffer");
        runners[r].run_into(&got, weights[r].as_ref(), &y)?;
        ds[r].combine_into(&y, &got, &combined[r])
    };
    // Eager once on every rank (workspaces, tiles), dispatches first so no rank waits on a host call.
    let hooks: Vec<_> = (0..devs.len())
        .map(|r| ds[r].dispatch_send(&inputs[r].0, clone(&topks[r])?))
        .collect::<moe_runner_core::Result<_>>()?;
    let outs: Vec<_> = hooks
        .into_iter()
        .map(|h| h.recv())
        .collect::<moe_runner_core::Result<_>>()?;
    for (r, o) in outs.iter().enumerate() {
        let y = o.out_buffer.clone().expect("registered buffer");
        runners[r].run_into(o, weights[r].as_ref(), &y)?;
    }
    let hooks: Vec<_> = outs
        .iter()
        .enumerate()
        .map(|(r, o)| ds[r].combine_send(o.out_buffer.as_ref().expect("registered buffer"), o))
        .collect::<moe_runner_core::Result<_>>()?;
    for (h, c) in hooks.into_iter().zip(combined) {
        h.recv_into(c)?;
    }
    for d in devs {
        d.synchronize()?;
    }
    let graphs = capture(devs, layer)?;
    let us = time_graphs(devs, &graphs, 3, args.iters, 5)?;
    for (d, r) in ds.iter().zip(&runners) {
        d.check()?;
        r.check()?;
    }
    Ok(us)
}
