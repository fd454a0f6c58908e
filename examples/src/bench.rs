//! `moe bench`: per shape and batch size, the triton runner's time, the floor of DESIGN.md
//! (bytes of the distinct experts hit plus activations over the measured copy bandwidth; FLOPs
//! over the measured tensor-core rate), our fraction of it, and the PyTorch peers measured by
//! `scripts/bench_peers.py` on the same shapes in the same session; and what `auto` picks
//! there, timed beside the fastest explicit registered path.

use crate::cli::BenchArgs;
use crate::error::{CliError, Result};
use crate::gpu_layer::{GpuLayer, LayerShape};
use crate::output::{write_json, write_table};
use crate::run::parse_scheme;
use moe_runner_core::cuda::copy_bandwidth_gbps;
use moe_runner_core::registry::registered_paths;
use moe_runner_core::{
    Device, DeviceKind, DeviceOps, DispatchFormat, MoeError, MoeRunner, QuantScheme,
};
use serde::{Deserialize, Serialize};
use std::io::Write;

/// The shapes of the targets, by name.
pub fn bench_shape(name: &str, scheme: QuantScheme) -> Result<LayerShape> {
    let (experts, top_k, hidden, inter) = match name {
        "deepseek-v3" => (256, 8, 7168, 2048),
        "qwen3-30b-a3b" => (128, 8, 2048, 768),
        "mixtral-8x7b" => (8, 2, 4096, 14336),
        other => {
            return Err(CliError::UnknownPreset {
                name: other.into(),
                known: "deepseek-v3, qwen3-30b-a3b, mixtral-8x7b".into(),
            })
        }
    };
    Ok(LayerShape {
        name: name.into(),
        experts,
        top_k,
        hidden,
        inter,
        scheme,
        swiglu_limit: None,
    })
}

/// What `scripts/bench_peers.py` measured.
#[derive(Debug, Deserialize)]
pub struct PeersFile {
    pub device: String,
    pub bf16_tflops: f64,
    pub fp8_tflops: f64,
    pub copy_gbps: f64,
    pub rows: Vec<PeerRow>,
}

#[derive(Debug, Deserialize)]
pub struct PeerRow {
    pub shape: String,
    pub m: usize,
    pub grouped_mm_ms: Option<f64>,
    pub naive_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct BenchRow {
    pub shape: String,
    pub scheme: String,
    pub m: usize,
    pub ours_us: f64,
    pub floor_us: f64,
    /// "memory" or "compute": the larger term of the floor.
    pub bound: &'static str,
    pub fraction_of_floor: f64,
    pub distinct_experts: f64,
    pub grouped_mm_us: Option<f64>,
    pub naive_loop_us: Option<f64>,
    /// The path `auto` resolved to and its time, beside the fastest explicit registered path
    /// for this format, scheme and device (each timed through the registry on the same batch).
    pub auto_path: String,
    pub auto_us: f64,
    pub best_explicit_path: String,
    pub best_explicit_us: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub copy_gbps: f64,
    pub bf16_tflops: Option<f64>,
    pub fp8_tflops: Option<f64>,
    pub rows: Vec<BenchRow>,
}

/// The report as a markdown table, with the speedup over the grouped-GEMM peer.
pub fn markdown(report: &BenchReport) -> String {
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let mut s = format!(
        "{}: copy {:.0} GB/s, bf16 {} TFLOP/s, FP8 {} TFLOP/s\n\n\
         | shape | scheme | M | ours (us) | floor (us) | of floor | torch `_grouped_mm` (us) | naive loop (us) | vs grouped_mm | auto (us) | best explicit (us) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
        report.device,
        report.copy_gbps,
        opt(report.bf16_tflops),
        opt(report.fp8_tflops)
    );
    for r in &report.rows {
        let speedup = r
            .grouped_mm_us
            .map(|g| format!("{:.2}x", g / r.ours_us))
            .unwrap_or_else(|| "-".into());
        s += &format!(
            "| {} | {} | {} | {:.1} | {:.1} ({}) | {:.0}% | {} | {} | {} | {:.1} `{}` | {:.1} `{}` |\n",
            r.shape,
            r.scheme,
            r.m,
            r.ours_us,
            r.floor_us,
            r.bound,
            100.0 * r.fraction_of_floor,
            opt(r.grouped_mm_us),
            opt(r.naive_loop_us),
            speedup,
            r.auto_us,
            r.auto_path,
            r.best_explicit_us,
            r.best_explicit_path
        );
    }
    s
}

/// `auto` for the shape's scheme on the standard format, and every registered path it could
/// have picked on this device, each resolved explicitly.
fn registry_paths(device: &Device, shape: &LayerShape) -> Result<(MoeRunner, Vec<MoeRunner>)> {
    let (format, cfg) = (DispatchFormat::Standard, shape.config());
    let auto = MoeRunner::auto(device, format, shape.scheme, cfg.clone())?;
    let explicit = registered_paths()
        .into_iter()
        .filter(|p| {
            p.format == format
                && p.device == DeviceKind::of(device)
                && p.schemes.contains(&shape.scheme)
        })
        .map(|p| MoeRunner::on_device(device, p.runner, format, shape.scheme, cfg.clone()))
        .collect::<moe_runner_core::Result<Vec<_>>>()?;
    Ok((auto, explicit))
}

pub fn bench(args: &BenchArgs, out: &mut dyn Write) -> Result<()> {
    if args.megamoe {
        let mega = crate::cli::MegaBenchArgs {
            ranks: 1,
            tokens: args.tokens.clone(),
            iters: args.iters,
            markdown: args.markdown.clone(),
        };
        return crate::mega_bench::bench_mega(&mega, out);
    }
    let device = Device::cuda(0)?;
    let dev = device.as_cuda()?.clone();
    let peers: Option<PeersFile> = match &args.peers {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| CliError::Read {
                path: p.clone(),
                source,
            })?;
            Some(
                serde_json::from_str(&text).map_err(|source| CliError::Json {
                    origin: p.display().to_string(),
                    source,
                })?,
            )
        }
        None => None,
    };
    let copy_gbps = copy_bandwidth_gbps(&dev, 2 << 30, 10)?;
    let mut rows = Vec::new();
    for spec in &args.shapes {
        let (name, scheme) = spec
            .split_once(':')
            .ok_or_else(|| MoeError::invalid("--shapes", format!("`{spec}` is not NAME:SCHEME")))?;
        let shape = bench_shape(name, parse_scheme(scheme)?)?;
        let layer = GpuLayer::new(shape.clone(), &device, 7)?;
        let (auto, explicit) = registry_paths(&device, &shape)?;
        for &m in &args.tokens {
            let routings = if m <= 512 { 8 } else { 2 };
            let batch = layer.batch(m, routings, 100 + m as u64)?;
            let ms = layer.time_ms(&batch, 3, args.iters)?;
            let auto_us = 1e3 * layer.time_runner_ms(&auto, &batch, 3, args.iters)?;
            let mut best = (String::new(), f64::INFINITY);
            for r in &explicit {
                let us = 1e3 * layer.time_runner_ms(r, &batch, 3, args.iters)?;
                if us < best.1 {
                    best = (r.runner().to_string(), us);
                }
            }
            let bytes =
                batch.distinct_experts * shape.expert_bytes() + (m * shape.hidden * 2 * 2) as f64;
            let flops = 6.0 * (m * shape.top_k * shape.hidden * shape.inter) as f64;
            let mem_us = bytes / (copy_gbps * 1e9) * 1e6;
            let rate = peers.as_ref().map(|p| {
                if shape.is_fp8() {
                    p.fp8_tflops
                } else {
                    p.bf16_tflops
                }
            });
            let compute_us = rate.map(|r| flops / (r * 1e12) * 1e6).unwrap_or(0.0);
            let peer = peers
                .as_ref()
                .and_then(|p| p.rows.iter().find(|r| r.shape == shape.name && r.m == m));
            let ours_us = ms * 1e3;
            rows.push(BenchRow {
                shape: shape.name.clone(),
                scheme: shape.scheme.to_string(),
                m,
                ours_us,
                floor_us: mem_us.max(compute_us),
                bound: if mem_us >= compute_us {
                    "memory"
                } else {
                    "compute"
                },
                fraction_of_floor: mem_us.max(compute_us) / ours_us,
                distinct_experts: batch.distinct_experts,
                grouped_mm_us: peer.and_then(|p| p.grouped_mm_ms).map(|v| v * 1e3),
                naive_loop_us: peer.and_then(|p| p.naive_ms).map(|v| v * 1e3),
                auto_path: auto.runner().to_string(),
                auto_us,
                best_explicit_path: best.0,
                best_explicit_us: best.1,
            });
            eprintln!(
                "{} {} M={m}: {:.1} us; auto ({}) {auto_us:.1} us, best explicit {:.1} us",
                shape.name,
                shape.scheme,
                ours_us,
                auto.runner(),
                best.1
            );
        }
    }
    let report = BenchReport {
        device: Device::Cuda(dev).name(),
        copy_gbps,
        bf16_tflops: peers.as_ref().map(|p| p.bf16_tflops),
        fp8_tflops: peers.as_ref().map(|p| p.fp8_tflops),
        rows,
    };
    if let Some(path) = &args.json_out {
        let mut f = std::fs::File::create(path).map_err(CliError::Write)?;
        write_json(&mut f, &report)?;
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, markdown(&report)).map_err(CliError::Write)?;
    }
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
    let table: Vec<Vec<String>> = report
        .rows
        .iter()
        .map(|r| {
            vec![
                r.shape.clone(),
                r.scheme.clone(),
                r.m.to_string(),
                format!("{:.1}", r.ours_us),
                format!("{:.1} ({})", r.floor_us, r.bound),
                format!("{:.0}%", 100.0 * r.fraction_of_floor),
                opt(r.grouped_mm_us),
                opt(r.naive_loop_us),
                format!("{:.1} {}", r.auto_us, r.auto_path),
                format!("{:.1} {}", r.best_explicit_us, r.best_explicit_path),
            ]
        })
        .collect();
    write_table(
        out,
        &format!(
            "{}: copy {:.0} GB/s, bf16 {} TFLOP/s, fp8 {} TFLOP/s",
            report.device,
            report.copy_gbps,
            opt(report.bf16_tflops),
            opt(report.fp8_tflops)
        ),
        &[
            "shape",
            "scheme",
            "M",
            "ours us",
            "floor us",
            "of floor",
            "torch grouped_mm us",
            "naive loop us",
            "auto us",
            "best explicit us",
        ],
        &table,
    )
}
