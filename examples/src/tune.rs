//! `moe tune`: searches the tile space of the triton runner per batch size on the GPU and writes
//! the best tiles in SGLang's JSON schema, under the file name the runner looks for.

use crate::cli::TuneArgs;
use crate::error::{CliError, Result};
use crate::gpu_layer::{GpuLayer, LayerShape};
use crate::output::write_table;
use crate::plan::{LayerPlan, Parallelism};
use crate::run::{load_spec, parse_scheme};
use moe_backend_triton::tile_config::{config_file_name, TileConfig, TunedConfigs};
use moe_runner_core::{Device, DeviceOps, QuantScheme};
use std::collections::BTreeMap;
use std::io::Write;

/// Candidate tiles for `per_expert` rows per expert: block M near the rows an expert gets,
/// the N, warps, stages and K widths the kernel supports.
pub fn candidates(per_expert: usize, scheme: QuantScheme) -> Vec<TileConfig> {
    let fp8 = matches!(
        scheme,
        QuantScheme::Fp8Block128 | QuantScheme::Fp8PerTensor | QuantScheme::Fp8PerChannel
    );
    let max_bm = (per_expert.next_power_of_two() * 2).clamp(16, 128);
    let mut out = Vec::new();
    // 64-row blocks run on wgmma; they are tried at every size, since at decode the empty rows
    // cost no memory traffic and the warpgroup MMA may stream the weights better.
    for bm in [16, 32, 64, 128]
        .into_iter()
        .filter(|&b| b <= max_bm.max(64))
    {
        for bn in [32, 64, 128, 256] {
            if scheme == QuantScheme::Fp8Block128 && bn > 128 {
                continue;
            }
            // 128-byte K tiles (128 e4m3 or 64 bf16 values); decode-sized blocks also try
            // 256-byte tiles, which read longer runs of each weight row.
            let bks: &[usize] = match (fp8, bm) {
                (true, 16) => &[128, 256],
                (false, 16) => &[64, 128],
                (true, _) => &[128],
                (false, _) => &[64],
            };
            for &bk in bks {
                for warps in [4, 8] {
                    if warps == 8 && bm * bn < 64 * 128 {
                        continue; // too little work per warp
                    }
                    for stages in [3, 4] {
                        let group = if bm >= 64 { 8 } else { 1 };
                        out.push(TileConfig {
                            block_m: bm,
                            block_n: bn,
                            block_k: bk,
                            group_m: group,
                            num_warps: warps,
                            num_stages: stages,
                        });
                    }
                }
            }
        }
    }
    out
}

pub fn tune(args: &TuneArgs, out: &mut dyn Write) -> Result<()> {
    let spec = load_spec(args.config.as_deref(), &args.preset)?;
    let scheme = args
        .scheme
        .as_deref()
        .map(parse_scheme)
        .transpose()?
        .unwrap_or(spec.default_scheme);
    let plan = LayerPlan::new(
        &spec,
        Parallelism {
            tp: args.tp.get(),
            ep: args.ep.get(),
            fuse_shared: !args.no_shared_fusion,
        },
        0,
    )?;
    let cfg = &plan.config;
    let shape = LayerShape {
        name: spec.name.clone(),
        experts: cfg.num_local_experts,
        top_k: cfg.top_k,
        hidden: cfg.hidden_size,
        inter: cfg.intermediate_size,
        scheme,
        swiglu_limit: cfg.swiglu_limit,
    };
    let device = Device::cuda(0)?;
    let layer = GpuLayer::new(shape.clone(), &device, 11)?;
    let mut best = BTreeMap::new();
    let mut rows = Vec::new();
    for &m in &args.tokens {
        let batch = layer.batch(m, if m <= 512 { 4 } else { 1 }, 200 + m as u64)?;
        let cands = candidates(m * shape.top_k / shape.experts.max(1), scheme);
        let bar = crate::progress::weight_bar(cands.len() as u64, false);
        bar.set_message(format!("M={m}"));
        let mut found: Option<(f64, TileConfig)> = None;
        for c in cands {
            layer.runner.force_tile(Some(c))?;
            // A tile the device cannot launch (shared memory) is skipped, not fatal.
            if let Ok(ms) = layer.time_ms(&batch, 1, args.iters) {
                if found.is_none_or(|(b, _)| ms < b) {
                    found = Some((ms, c));
                }
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        let (ms, tile) = found
            .ok_or_else(|| moe_runner_core::MoeError::Device(format!("no tile ran for M={m}")))?;
        rows.push(vec![
            m.to_string(),
            format!("{:.1}", ms * 1e3),
            format!("{tile:?}"),
        ]);
        best.insert(m, tile);
    }
    layer.runner.force_tile(None)?;
    let name = config_file_name(shape.experts, shape.inter, &device.name(), scheme);
    std::fs::create_dir_all(&args.out).map_err(CliError::Write)?;
    let path = args.out.join(&name);
    let file = TunedConfigs {
        path: path.clone(),
        by_m: best,
    };
    std::fs::write(&path, file.to_json()).map_err(CliError::Write)?;
    write_table(
        out,
        &format!("{} -> {}", spec.name, path.display()),
        &["M", "best us", "tile"],
        &rows,
    )
}
