//! `moe run`: one MoE layer on seeded synthetic weights. It builds the runner first (so a
//! missing combination fails before any weight exists), checks host memory, generates the
//! weights (copied to the runner's device when it computes on a GPU), compares the chosen path
//! with the CPU reference on the same routing, then times the whole layer forward (route,
//! dispatch, run, combine, shared experts) after one warm-up.

use crate::checkpoint_layer::CheckpointLayer;
use crate::cli::RunArgs;
use crate::error::{CliError, Result};
use crate::hf_config;
use crate::memory;
use crate::model::ModelSpec;
use crate::output::{write_json, Accuracy, RunReport, Shape};
use crate::plan::{LayerPlan, Parallelism, SharedPlan};
use crate::progress::weight_bar;
use crate::timing::Latency;
use moe_backend_reference::CpuSharedExperts;
use moe_conformance::{suite, synthetic};
use moe_dispatch::{a2a_backends, make_dispatcher_on, to_local_ids, DispatcherConfig, MoeLayer};
use moe_runner_core::{
    quant_to_device, DType, Device, DeviceOps, DispatchFormat, MoeError, MoeRunner,
    MoeRunnerConfig, QuantInfo, QuantScheme, SharedExperts, Tensor, TopK,
};
use std::io::Write;
use std::time::Instant;

/// Offsets of the seeds drawn from `--seed`, so weights, inputs and routing are independent.
const SEED_HIDDEN: u64 = 1;
const SEED_LOGITS: u64 = 2;
const SEED_SHARED: u64 = 3;

/// The model of `--config` when given, else of `--preset`.
pub fn load_spec(config: Option<&std::path::Path>, preset: &str) -> Result<ModelSpec> {
    match config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| CliError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            hf_config::spec_from_json(&text, &path.display().to_string())
        }
        None => ModelSpec::preset(preset),
    }
}

pub fn parse_scheme(name: &str) -> Result<QuantScheme> {
    QuantScheme::from_name(name).ok_or_else(|| CliError::UnknownScheme {
        name: name.into(),
        known: QuantScheme::ALL.map(|s| s.name()).join(", "),
    })
}

/// The dispatch format the named a2a backend emits.
fn a2a_format(name: &str) -> Result<DispatchFormat> {
    a2a_backends()
        .find(|b| b.name == name)
        .map(|b| b.format)
        .ok_or_else(|| {
            MoeError::Unknown {
                kind: "a2a backend",
                name: name.into(),
                known: a2a_backends()
                    .map(|b| b.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into()
        })
}

/// The named runner, or with `auto` the preferred path on the first GPU, falling back to the
/// CPU when there is no GPU or no GPU path for this format and scheme. The note says why.
fn build_runner(
    name: &str,
    format: DispatchFormat,
    scheme: QuantScheme,
    config: MoeRunnerConfig,
) -> Result<(MoeRunner, Option<String>)> {
    if name != "auto" {
        return Ok((MoeRunner::new(name, format, scheme, config)?, None));
    }
    let gpu = match Device::cuda(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            let runner = MoeRunner::auto(&Device::cpu(), format, scheme, config)?;
            return Ok((runner, Some(format!("using the CPU: {e}"))));
        }
    };
    match MoeRunner::auto(&gpu, format, scheme, config.clone()) {
        Err(MoeError::NoPath { .. }) => {
            let runner = MoeRunner::auto(&Device::cpu(), format, scheme, config)?;
            let note = format!("no GPU path for ({format}, {scheme}) is registered; using the CPU");
            Ok((runner, Some(note)))
        }
        other => Ok((other?, None)),
    }
}

/// Activations in the scheme's unquantized float type (quantized schemes read bf16).
fn activation_dtype(scheme: QuantScheme) -> DType {
    match scheme {
        QuantScheme::F32 => DType::F32,
        QuantScheme::F16 => DType::F16,
        _ => DType::Bf16,
    }
}

/// Separate shared experts as f32 CPU MLPs, or `None` when they are absent or fused.
fn shared_experts(plan: &LayerPlan, seed: u64) -> Result<Option<Box<dyn SharedExperts>>> {
    let SharedPlan::Separate { intermediate } = plan.shared else {
        return Ok(None);
    };
    let h = plan.config.hidden_size;
    let w13 = synthetic::uniform(2 * intermediate * h, (3.0 / h as f32).sqrt(), seed);
    let w2 = synthetic::uniform(
        h * intermediate,
        (3.0 / intermediate as f32).sqrt(),
        seed ^ 0x5EED,
    );
    Ok(Some(Box::new(CpuSharedExperts::new(
        w13,
        w2,
        intermediate,
        &plan.config,
    )?)))
}

/// The routed output of `runner` against the reference path (standard format, CPU, host
/// copies of the same weights and input) on the same routing, unless the path is the
/// reference path itself. Under EP the ids are mapped to rank 0's local ids, as the standard
/// dispatcher does.
fn compare_with_reference(
    runner: &MoeRunner,
    plan: &LayerPlan,
    host: &Inputs,
    placed: &Inputs,
    logits: &Tensor,
) -> Result<Option<Accuracy>> {
    if runner.runner() == moe_backend_reference::RUNNER
        && runner.format() == DispatchFormat::Standard
    {
        return Ok(None);
    }
    let mut topk = plan.router.route(logits)?;
    let cfg = runner.config();
    if cfg.num_local_experts < cfg.num_experts {
        let local = to_local_ids(topk.ids.as_slice::<i32>()?, 0, cfg.num_local_experts);
        topk = TopK::new(
            Tensor::from_slice(&local, topk.ids.shape(), DType::I32)?,
            topk.weights,
        )?;
    }
    let copy = TopK::new(topk.ids.clone(), topk.weights.clone())?;
    let got = suite::run_path(runner, &placed.hidden, copy, placed.weights.as_ref())?;
    let reference = MoeRunner::new(
        moe_backend_reference::RUNNER,
        DispatchFormat::Standard,
        runner.scheme(),
        cfg.clone(),
    )?;
    let want = suite::run_path(&reference, &host.hidden, topk, host.weights.as_ref())?;
    let c = suite::compare(&got, &want)?;
    Ok(Some(Accuracy {
        rel_l2: c.rel_l2,
        max_abs: c.max_abs,
    }))
}

/// The expert weights and the hidden batch, together because they move to a device together.
struct Inputs {
    weights: Box<dyn QuantInfo>,
    hidden: Tensor,
}

/// Copies of `host` on the runner's device, or `None` when it computes on the host.
fn place(host: &Inputs, device: &Device) -> Result<Option<Inputs>> {
    if !device.is_cuda() {
        return Ok(None);
    }
    Ok(Some(Inputs {
        weights: quant_to_device(host.weights.as_ref(), device)?,
        hidden: host.hidden.to_device(device)?,
    }))
}

pub fn run(args: &RunArgs, out: &mut dyn Write) -> Result<()> {
    if let (true, Some(dir)) = (args.stack, args.checkpoint.as_deref()) {
        let tokens = args.tokens.unwrap_or(16);
        let rows = crate::stack::run_all(dir, tokens, args.seed)?;
        let scheme = CheckpointLayer::open(dir, None)?.scheme;
        return crate::stack::print(&rows, suite::tolerance(scheme), args.json, out);
    }
    let ckpt = args
        .checkpoint
        .as_deref()
        .map(|d| CheckpointLayer::open(d, args.layer))
        .transpose()?;
    let spec = match &ckpt {
        Some(c) => c.spec.clone(),
        None => load_spec(args.config.as_deref(), &args.preset)?,
    };
    let asked = args.scheme.as_deref().map(parse_scheme).transpose()?;
    let scheme = match (&ckpt, asked) {
        (Some(c), Some(s)) if s != c.scheme => {
            return Err(MoeError::invalid(
                "--scheme",
                format!("{s}: the checkpoint's experts are {}", c.scheme),
            )
            .into())
        }
        (Some(c), _) => c.scheme,
        // MegaMoE reads MXFP4 weights; its activations follow MOE_MEGA_FP4_ACTS (FP8 unset).
        (None, None) if args.runner == moe_backend_megamoe::RUNNER => {
            moe_backend_megamoe::flags::default_scheme(
                Default::default(),
                moe_backend_megamoe::flags::EnvFlags::process()?,
            )
        }
        (None, s) => s.unwrap_or(spec.default_scheme),
    };
    let tokens = args.tokens.unwrap_or_else(|| spec.default_tokens());
    let (tp, ep) = (args.tp.get(), args.ep.get());
    if args.procs && (args.a2a != "deepep_ll" || ep < 2) {
        return Err(MoeError::invalid(
            "--procs",
            "one process per rank runs an expert-parallel world: give --a2a deepep_ll --ep N with N >= 2",
        )
        .into());
    }
    #[cfg(feature = "cuda")]
    if args.a2a == moe_backend_megamoe::A2A && ep > 1 {
        let seeds = (
            args.seed.wrapping_add(SEED_HIDDEN),
            args.seed.wrapping_add(SEED_LOGITS),
        );
        return crate::mega_world::run_world(args, &spec, scheme, tokens, seeds, out);
    }
    #[cfg(feature = "cuda")]
    if args.a2a == moe_backend_deepep_ll::A2A && ep > 1 {
        if ckpt.is_some() {
            return Err(MoeError::invalid(
                "--checkpoint",
                "the expert-parallel world run uses synthetic weights; load a checkpoint with --ep 1 or the standard a2a",
            )
            .into());
        }
        let seeds = (
            args.seed.wrapping_add(SEED_HIDDEN),
            args.seed.wrapping_add(SEED_LOGITS),
        );
        return crate::ep_world::run_world(args, &spec, scheme, tokens, seeds, out);
    }
    // A checkpoint's shared experts run as their own MLP (fusing them would restack them).
    let mut plan = LayerPlan::new(
        &spec,
        Parallelism {
            tp,
            ep,
            fuse_shared: !args.no_shared_fusion && ckpt.is_none(),
        },
        args.seed,
    )?;
    plan.check_scheme(scheme)?;
    let format = a2a_format(&args.a2a)?;
    let (runner, device_note) = build_runner(&args.runner, format, scheme, plan.config.clone())?;
    let dispatcher = make_dispatcher_on(
        &args.a2a,
        &DispatcherConfig {
            num_experts: plan.config.num_experts,
            num_local_experts: plan.config.num_local_experts,
            rank: 0,
            world_size: ep,
            hidden_size: spec.hidden,
            max_tokens_per_rank: tokens.max(1),
            routed_scaling_factor: plan.config.routed_scaling_factor,
            top_k: plan.config.top_k,
            wire: Default::default(),
            nvfp4_global_scale: 0.0,
            intermediate_size: plan.config.intermediate_size,
        },
        runner.device(),
    )?;
    let weight_bytes = plan.host_bytes(scheme);
    memory::check_fits(weight_bytes, memory::available_bytes())?;

    let dims = plan.weight_dims();
    let mut notes = Vec::new();
    let hidden = synthetic::hidden(
        tokens,
        spec.hidden,
        activation_dtype(scheme),
        args.seed.wrapping_add(SEED_HIDDEN),
    )?;
    // The router runs on the host, so the logits stay there.
    let mut device_weights = None;
    let (weights, shared, logits) = match &ckpt {
        Some(c) => {
            let gb = synthetic::weight_bytes(dims, scheme) as f64 / 1e9;
            // On a GPU the experts go from the mapped files straight to device memory; the
            // reference then reads its host copy from the page cache.
            #[cfg(feature = "cuda")]
            if let moe_runner_core::Device::Cuda(dev) = runner.device() {
                let bar = weight_bar(dims.experts as u64, args.json);
                let started = Instant::now();
                let w = c.experts_to_device(&plan, tp, dev, &|_| bar.inc(1))?;
                dev.synchronize()?;
                bar.finish_and_clear();
                let secs = started.elapsed().as_secs_f64();
                notes.push(format!(
                    "layer {} of checkpoint {}: {} experts ({gb:.2} GB) into GPU memory in {secs:.2} s ({:.2} GB/s)",
                    c.layer,
                    c.ck.dir().display(),
                    dims.experts,
                    gb / secs.max(1e-9)
                ));
                device_weights = Some(w);
            }
            let bar = weight_bar(dims.experts as u64, args.json || device_weights.is_some());
            let started = Instant::now();
            let weights = c.experts(&plan, tp, &|_| bar.inc(1))?;
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            notes.push(format!(
                "layer {} of checkpoint {}: {} experts ({gb:.2} GB) into host memory in {secs:.2} s ({:.2} GB/s)",
                c.layer,
                c.ck.dir().display(),
                dims.experts,
                gb / secs.max(1e-9)
            ));
            let shared = if tp == 1 {
                c.shared(&plan)?
            } else {
                notes.push("shared experts are not split under --tp; left out".into());
                None
            };
            let logits = c.route_inputs(&mut plan, &hidden)?;
            (weights, shared, logits)
        }
        None => {
            let bar = weight_bar(2 * dims.experts as u64, args.json);
            let weights = synthetic::weights(dims, scheme, args.seed, &|n| bar.inc(n))?;
            bar.finish_and_clear();
            let shared = shared_experts(&plan, args.seed.wrapping_add(SEED_SHARED))?;
            let logits = synthetic::logits(
                tokens,
                spec.routed_experts,
                args.seed.wrapping_add(SEED_LOGITS),
            )?;
            (weights, shared, logits)
        }
    };

    let host = Inputs { weights, hidden };
    let placed = match device_weights {
        Some(weights) => Some(Inputs {
            weights,
            hidden: host.hidden.to_device(runner.device())?,
        }),
        None => place(&host, runner.device())?,
    };
    let accuracy = compare_with_reference(
        &runner,
        &plan,
        &host,
        placed.as_ref().unwrap_or(&host),
        &logits,
    )?;
    // The host copies were only needed by the reference; the layer takes the runner's.
    let Inputs { weights, hidden } = placed.unwrap_or(host);
    let layer = MoeLayer::new(plan.router.clone(), dispatcher, runner, weights, shared)?;

    layer.forward(&hidden, &logits)?;
    let mut times = Vec::with_capacity(args.iters.get());
    for _ in 0..args.iters.get() {
        let start = Instant::now();
        let output = layer.forward(&hidden, &logits)?;
        layer.runner().device().synchronize()?;
        times.push(start.elapsed());
        drop(output);
    }
    let latency = Latency::of(&times)
        .ok_or_else(|| MoeError::invalid("--iters", "at least one timed iteration"))?;

    let runner = layer.runner();
    let report = RunReport {
        model: spec.name.clone(),
        arch: spec.arch.clone(),
        path: runner.describe(),
        device: runner.device().name(),
        runner: runner.runner().to_string(),
        a2a: args.a2a.clone(),
        shape: Shape {
            experts: spec.routed_experts,
            local_experts: plan.config.num_local_experts,
            shared_experts: spec.shared_experts,
            fused_shared_experts: plan.router.fused_shared_experts,
            top_k: spec.top_k,
            hidden: spec.hidden,
            intermediate: plan.config.intermediate_size,
            scheme: scheme.to_string(),
            tp,
            ep,
        },
        weight_bytes,
        tokens,
        iters: times.len(),
        tokens_per_s: latency.tokens_per_s(tokens),
        latency,
        error_vs_reference: accuracy,
        notes: device_note
            .into_iter()
            .chain(plan.fusion_note.clone())
            .chain(notes)
            .collect(),
    };
    if args.json {
        write_json(out, &report)
    } else {
        report.write_text(out)
    }
}
