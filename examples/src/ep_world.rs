//! `moe run --a2a deepep_ll --ep N`: a whole expert-parallel world, one rank per GPU (ranks
//! share GPUs when there are fewer), joined by the low-latency all-to-all. Every rank in this
//! process over peer memory; or, with `--procs`, one process per rank started by this one, over
//! CUDA IPC or NCCL (`--transport`). Each rank routes its own tokens, dispatches, runs its
//! runner on its experts and combines; every rank's output is checked against the
//! expert-parallel reference, then the world's forward pass is timed. Shared experts are left
//! out (they do not cross ranks).

use crate::cli::RunArgs;
use crate::error::Result;
use crate::model::ModelSpec;
use crate::output::{write_json, Accuracy, RunReport, Shape};
use crate::plan::{LayerPlan, Parallelism};
use crate::timing::Latency;
use moe_backend_deepep_ll::{LlDispatcher, LlWorld};
use moe_conformance::{ep, suite, synthetic};
use moe_dispatch::{DispatcherConfig, Wire};
use moe_runner_core::cuda::cudarc::driver::CudaContext;
use moe_runner_core::{
    downcast_combine, quant_to_device, CudaDevice, DType, DeepEpLlCombineInput, Device, DeviceOps,
    DispatchFormat, MoeError, MoeRunner, QuantScheme, Tensor, TopK,
};
use std::io::Write;
use std::time::Instant;

/// One rank's pieces.
pub(crate) struct Rank {
    dev: CudaDevice,
    dispatcher: LlDispatcher,
    pub runner: MoeRunner,
    weights: Box<dyn moe_runner_core::QuantInfo>,
    hidden: Tensor,
    topk: TopK,
    pub out: Tensor,
}

/// One forward pass of the world: every rank's dispatch, then every rank's GEMMs, then every
/// rank's combine, so no rank's host-side work (a first-use kernel compile) stands between a
/// peer's send and its receive. Then waits for all and reports what the kernels flagged.
pub(crate) fn forward(world: &[Rank]) -> moe_runner_core::Result<()> {
    let got = world
        .iter()
        .map(|r| {
            let topk = TopK::new(r.topk.ids.clone(), r.topk.weights.clone())?;
            r.dispatcher.dispatch_now(&r.hidden, topk)
        })
        .collect::<moe_runner_core::Result<Vec<_>>>()?;
    let ys = world
        .iter()
        .zip(&got)
        .map(|(r, g)| {
            let y = r.runner.run(g, r.weights.as_ref())?;
            downcast_combine::<DeepEpLlCombineInput>(y, DispatchFormat::DeepEpLowLatency)
        })
        .collect::<moe_runner_core::Result<Vec<_>>>()?;
    for ((r, g), y) in world.iter().zip(&got).zip(&ys) {
        r.dispatcher.combine_into(&y.hidden, g, &r.out)?;
    }
    for r in world {
        r.dev.synchronize()?;
        r.dispatcher.check()?;
    }
    Ok(())
}

/// What every rank of a world agrees on.
pub(crate) struct World {
    pub plan: LayerPlan,
    pub dcfg: DispatcherConfig,
    pub dtype: DType,
    pub gpus: usize,
}

pub(crate) fn world(
    args: &RunArgs,
    spec: &ModelSpec,
    scheme: QuantScheme,
    tokens: usize,
) -> Result<World> {
    let (tp, ranks) = (args.tp.get(), args.ep.get());
    let plan = LayerPlan::new(
        spec,
        Parallelism {
            tp,
            ep: ranks,
            fuse_shared: false,
        },
        args.seed,
    )?;
    plan.check_scheme(scheme)?;
    let gpus = CudaContext::device_count().map_err(|e| MoeError::NoCuda(e.to_string()))? as usize;
    if gpus == 0 {
        return Err(MoeError::NoCuda("the deepep_ll world needs a GPU".into()).into());
    }
    let cfg = &plan.config;
    let dcfg = DispatcherConfig {
        world_size: ranks,
        num_local_experts: cfg.num_local_experts,
        routed_scaling_factor: cfg.routed_scaling_factor,
        wire: if scheme == QuantScheme::Fp8Block128 {
            Wire::Fp8
        } else {
            Wire::Native
        },
        ..DispatcherConfig::single(cfg.num_experts, cfg.hidden_size, tokens.max(1))
            .with_top_k(cfg.top_k)
    };
    let dtype = if scheme == QuantScheme::F16 {
        DType::F16
    } else {
        DType::Bf16
    };
    Ok(World {
        plan,
        dcfg,
        dtype,
        gpus,
    })
}

/// Rank `r`'s host weights, activations and routing (the same in every process).
pub(crate) fn host_rank(
    args: &RunArgs,
    w: &World,
    scheme: QuantScheme,
    tokens: usize,
    seeds: (u64, u64),
    r: usize,
) -> Result<(Box<dyn moe_runner_core::QuantInfo>, (Tensor, TopK))> {
    let cfg = &w.plan.config;
    let weights = synthetic::weights(
        w.plan.weight_dims(),
        scheme,
        args.seed + 1000 * r as u64,
        &|_| {},
    )?;
    let hidden = synthetic::hidden(tokens, cfg.hidden_size, w.dtype, seeds.0 + r as u64)?;
    let logits = synthetic::logits(tokens, cfg.num_experts, seeds.1 + r as u64)?;
    let topk = w.plan.router.route(&logits)?;
    Ok((weights, (hidden, topk)))
}

/// Rank `r` on `dev` over `dispatcher`, its inputs moved there.
pub(crate) fn device_rank(
    args: &RunArgs,
    w: &World,
    scheme: QuantScheme,
    (dev, dispatcher): (&CudaDevice, LlDispatcher),
    weights: &dyn moe_runner_core::QuantInfo,
    (hidden, topk): &(Tensor, TopK),
) -> Result<Rank> {
    let cfg = &w.plan.config;
    let device = Device::Cuda(dev.clone());
    let runner = MoeRunner::on_device(
        &device,
        &args.runner,
        DispatchFormat::DeepEpLowLatency,
        scheme,
        cfg.clone(),
    )
    .or_else(|e| match (&e, args.runner.as_str()) {
        (_, "auto") => MoeRunner::auto(
            &device,
            DispatchFormat::DeepEpLowLatency,
            scheme,
            cfg.clone(),
        ),
        _ => Err(e),
    })?;
    let tokens = hidden.shape()[0];
    Ok(Rank {
        weights: quant_to_device(weights, &device)?,
        hidden: hidden.to_device(&device)?,
        topk: topk.to_device(&device)?,
        out: Tensor::zeros_cuda(dev, &[tokens, cfg.hidden_size], w.dtype)?,
        dev: dev.clone(),
        dispatcher,
        runner,
    })
}

pub fn run_world(
    args: &RunArgs,
    spec: &ModelSpec,
    scheme: QuantScheme,
    tokens: usize,
    seeds: (u64, u64),
    out: &mut dyn Write,
) -> Result<()> {
    if args.procs {
        return crate::ep_procs::run_procs(args, spec, scheme, tokens, seeds, out);
    }
    let w = world(args, spec, scheme, tokens)?;
    let ranks = args.ep.get();
    let devs: Vec<CudaDevice> = (0..ranks)
        .map(|r| CudaDevice::new(r % w.gpus))
        .collect::<moe_runner_core::Result<_>>()?;
    let dispatchers = LlWorld::in_process(&devs, &w.dcfg)?;
    let mut host_inputs = Vec::with_capacity(ranks);
    let mut host_weights = Vec::with_capacity(ranks);
    let mut world = Vec::with_capacity(ranks);
    for (r, (dev, dispatcher)) in devs.iter().zip(dispatchers).enumerate() {
        let (weights, inputs) = host_rank(args, &w, scheme, tokens, seeds, r)?;
        world.push(device_rank(
            args,
            &w,
            scheme,
            (dev, dispatcher),
            weights.as_ref(),
            &inputs,
        )?);
        host_inputs.push(inputs);
        host_weights.push(weights);
    }
    forward(&world)?;
    let outs = world
        .iter()
        .map(|r| Ok(r.out.to_host()?.to_f32_vec()?))
        .collect::<Result<Vec<_>>>()?;
    let mut times = Vec::with_capacity(args.iters.get());
    for _ in 0..args.iters.get() {
        let start = Instant::now();
        forward(&world)?;
        times.push(start.elapsed());
    }
    let first = &world[0];
    let ran = Ran {
        path: first.runner.describe(),
        runner: first.runner.runner().to_string(),
        device: Device::Cuda(first.dev.clone()).name(),
        how: "every rank in this process, over peer memory".into(),
    };
    let hosts = (host_weights.as_slice(), host_inputs.as_slice());
    finish(
        args,
        (spec, scheme, tokens),
        &w,
        hosts,
        (&outs, &times),
        ran,
        out,
    )
}

/// How a world ran, for its report.
pub(crate) struct Ran {
    pub path: String,
    pub runner: String,
    pub device: String,
    pub how: String,
}

/// Checks every rank's output against the expert-parallel reference and reports the world.
#[allow(clippy::type_complexity)]
pub(crate) fn finish(
    args: &RunArgs,
    (spec, scheme, tokens): (&ModelSpec, QuantScheme, usize),
    w: &World,
    (host_weights, host_inputs): (&[Box<dyn moe_runner_core::QuantInfo>], &[(Tensor, TopK)]),
    (outs, times): (&[Vec<f32>], &[std::time::Duration]),
    ran: Ran,
    out: &mut dyn Write,
) -> Result<()> {
    let (tp, ranks, cfg) = (args.tp.get(), args.ep.get(), &w.plan.config);
    let refs: Vec<_> = host_weights.iter().map(|w| w.as_ref()).collect();
    let want = ep::layer_outputs(cfg, scheme, &refs, host_inputs)?;
    let mut worst = Accuracy {
        rel_l2: 0.0,
        max_abs: 0.0,
    };
    for (got, w) in outs.iter().zip(&want) {
        let c = suite::compare(got, w)?;
        worst.rel_l2 = worst.rel_l2.max(c.rel_l2);
        worst.max_abs = worst.max_abs.max(c.max_abs);
    }
    let latency = Latency::of(times)
        .ok_or_else(|| MoeError::invalid("--iters", "at least one timed iteration"))?;
    let report = RunReport {
        model: spec.name.clone(),
        arch: spec.arch.clone(),
        path: ran.path,
        device: format!("{ranks} ranks on {} x {}", w.gpus.min(ranks), ran.device),
        runner: ran.runner,
        a2a: args.a2a.clone(),
        shape: Shape {
            experts: spec.routed_experts,
            local_experts: cfg.num_local_experts,
            shared_experts: spec.shared_experts,
            fused_shared_experts: 0,
            top_k: spec.top_k,
            hidden: spec.hidden,
            intermediate: cfg.intermediate_size,
            scheme: scheme.to_string(),
            tp,
            ep: ranks,
        },
        weight_bytes: ranks * w.plan.host_bytes(scheme),
        tokens: tokens * ranks,
        iters: times.len(),
        tokens_per_s: latency.tokens_per_s(tokens * ranks),
        latency,
        error_vs_reference: Some(worst),
        notes: vec![
            format!("{tokens} tokens per rank; the worst rank's error is reported"),
            "shared experts are not part of the expert-parallel world run".into(),
            format!("dispatch wire {:?}; {}", w.dcfg.wire, ran.how),
        ],
    };
    if args.json {
        write_json(out, &report)
    } else {
        report.write_text(out)
    }
}
