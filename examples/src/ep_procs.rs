//! `moe run --a2a deepep_ll --ep N --procs`: one process per rank, as engines run expert
//! parallelism. This command starts the N rank processes (itself, with the rank in the
//! environment) around a fresh rendezvous directory; each joins the world over CUDA IPC or NCCL
//! (`--transport`), runs its rank and leaves its output and timings in the directory; this
//! process then checks every rank against the expert-parallel reference and reports.
//!
//! Across machines the same rank processes are started by the engine's launcher instead, with
//! `MOE_EP_RANK` set and `MOE_EP_DIR` on a file system every machine sees (the NCCL id is
//! exchanged there; see `NcclId`).

use crate::cli::RunArgs;
use crate::ep_world::{device_rank, finish, forward, host_rank, world, Ran, World};
use crate::error::Result;
use crate::model::ModelSpec;
use moe_backend_deepep_ll::{LlDispatcher, LlWorld, NcclId};
use moe_dispatch::DispatcherConfig;
use moe_runner_core::{CudaDevice, Device, DeviceOps, MoeError, QuantScheme};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// The rank of a rank process.
pub const RANK_ENV: &str = "MOE_EP_RANK";
/// The rendezvous directory of a rank process.
pub const DIR_ENV: &str = "MOE_EP_DIR";

/// How long a rank waits for the others to join or answer.
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run_procs(
    args: &RunArgs,
    spec: &ModelSpec,
    scheme: QuantScheme,
    tokens: usize,
    seeds: (u64, u64),
    out: &mut dyn Write,
) -> Result<()> {
    if !matches!(args.transport.as_str(), "ipc" | "nccl") {
        return Err(MoeError::invalid(
            "--transport",
            format!("`{}`: expected ipc or nccl", args.transport),
        )
        .into());
    }
    let w = world(args, spec, scheme, tokens)?;
    if let (Ok(rank), Ok(dir)) = (std::env::var(RANK_ENV), std::env::var(DIR_ENV)) {
        let rank: usize = rank
            .parse()
            .map_err(|_| MoeError::invalid(RANK_ENV, format!("`{rank}` is not a rank")))?;
        return run_rank(args, &w, scheme, (tokens, seeds), rank, Path::new(&dir));
    }
    let ranks = args.ep.get();
    let dir = std::env::temp_dir().join(format!("moe-ep-{}", std::process::id()));
    let io = |e: std::io::Error| MoeError::Device(format!("rendezvous {}: {e}", dir.display()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io)?;
    let exe = std::env::current_exe().map_err(io)?;
    let children = (0..ranks)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(std::env::args_os().skip(1))
                .env(RANK_ENV, r.to_string())
                .env(DIR_ENV, &dir)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(io)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut failed = Vec::new();
    for (r, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().map_err(io)?;
        if !o.status.success() {
            failed.push(format!(
                "rank {r} ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
    }
    let read = |name: String| std::fs::read(dir.join(name)).map_err(io);
    let collected = (|| -> Result<_> {
        if !failed.is_empty() {
            return Err(MoeError::Device(failed.join("\n")).into());
        }
        let mut outs = Vec::with_capacity(ranks);
        let mut per_rank = Vec::with_capacity(ranks);
        for r in 0..ranks {
            outs.push(f32s(&read(format!("out.{r}"))?));
            per_rank.push(f32s(&read(format!("times.{r}"))?));
        }
        let ran: Vec<String> = String::from_utf8_lossy(&read("ran.0".into())?)
            .lines()
            .map(String::from)
            .collect();
        Ok((outs, per_rank, ran))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let (outs, per_rank, ran) = collected?;
    // An iteration of the world lasts as long as its slowest rank.
    let times: Vec<Duration> = (0..args.iters.get())
        .map(|i| {
            let ms = per_rank
                .iter()
                .map(|t| t.get(i).copied().unwrap_or(0.0))
                .fold(0.0f32, f32::max);
            Duration::from_secs_f64(ms as f64 / 1e3)
        })
        .collect();
    let mut hosts = (Vec::new(), Vec::new());
    for r in 0..ranks {
        let (weights, inputs) = host_rank(args, &w, scheme, tokens, seeds, r)?;
        hosts.0.push(weights);
        hosts.1.push(inputs);
    }
    let line = |i: usize| ran.get(i).cloned().unwrap_or_default();
    let ran = Ran {
        path: line(0),
        runner: line(1),
        device: line(2),
        how: format!("one process per rank over {}", args.transport),
    };
    finish(
        args,
        (spec, scheme, tokens),
        &w,
        (&hosts.0, &hosts.1),
        (&outs, &times),
        ran,
        out,
    )
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// One rank process: join, run once for the check, then the timed iterations; results into
/// `dir`.
fn run_rank(
    args: &RunArgs,
    w: &World,
    scheme: QuantScheme,
    (tokens, seeds): (usize, (u64, u64)),
    rank: usize,
    dir: &Path,
) -> Result<()> {
    let ranks = args.ep.get();
    if rank >= ranks {
        return Err(
            MoeError::invalid(RANK_ENV, format!("rank {rank} of a world of {ranks}")).into(),
        );
    }
    let dev = CudaDevice::new(rank % w.gpus)?;
    let cfg = DispatcherConfig {
        rank,
        ..w.dcfg.clone()
    };
    let dispatcher: LlDispatcher = match args.transport.as_str() {
        "nccl" => {
            let id = NcclId::exchange(dir, rank, JOIN_TIMEOUT)?;
            LlWorld::nccl(&dev, &cfg, &id, JOIN_TIMEOUT)?
        }
        _ => LlWorld::ipc(&dev, &cfg, dir, JOIN_TIMEOUT)?,
    };
    let (weights, inputs) = host_rank(args, w, scheme, tokens, seeds, rank)?;
    let r = device_rank(
        args,
        w,
        scheme,
        (&dev, dispatcher),
        weights.as_ref(),
        &inputs,
    )?;
    let world = std::slice::from_ref(&r);
    forward(world)?;
    let io = |e: std::io::Error| MoeError::Device(format!("rendezvous {}: {e}", dir.display()));
    std::fs::write(
        dir.join(format!("out.{rank}")),
        bytes(&r.out.to_host()?.to_f32_vec()?),
    )
    .map_err(io)?;
    let mut times = Vec::with_capacity(args.iters.get());
    for _ in 0..args.iters.get() {
        let start = Instant::now();
        forward(world)?;
        times.push(start.elapsed().as_secs_f32() * 1e3);
    }
    std::fs::write(dir.join(format!("times.{rank}")), bytes(&times)).map_err(io)?;
    if rank == 0 {
        let ran = format!(
            "{}\n{}\n{}\n",
            r.runner.describe(),
            r.runner.runner(),
            Device::Cuda(dev.clone()).name()
        );
        std::fs::write(dir.join("ran.0"), ran).map_err(io)?;
    }
    dev.synchronize()?;
    Ok(())
}
