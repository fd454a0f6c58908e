//! `moe run --a2a megamoe --runner megamoe --ep N`: a MegaMoE world of N ranks in this process,
//! one GPU each (each rank's program occupies its GPU while it waits for the others, so ranks
//! cannot share one). Every rank routes its own tokens and runs the fused program; every rank's
//! output is checked against the expert-parallel reference, then the world's forward pass is
//! timed.

use crate::cli::RunArgs;
use crate::ep_world::{finish, host_rank, world, Ran};
use crate::error::Result;
use crate::model::ModelSpec;
use moe_backend_megamoe::MegaMoeWorld;
use moe_dispatch::{Dispatcher, DispatcherConfig, Wire};
use moe_runner_core::{
    quant_to_device, CudaDevice, Device, DeviceOps, DispatchFormat, MoeError, MoeRunner, QuantInfo,
    QuantScheme, Tensor, TopK,
};
use std::io::Write;
use std::time::Instant;

pub fn run_world(
    args: &RunArgs,
    spec: &ModelSpec,
    scheme: QuantScheme,
    tokens: usize,
    seeds: (u64, u64),
    out: &mut dyn Write,
) -> Result<()> {
    let mut w = world(args, spec, scheme, tokens)?;
    let ranks = args.ep.get();
    if w.gpus < ranks {
        return Err(MoeError::Config(format!(
            "a megamoe world of {ranks} ranks needs {ranks} GPUs, this machine has {}",
            w.gpus
        ))
        .into());
    }
    w.dcfg = DispatcherConfig {
        wire: Wire::Native,
        ..w.dcfg
            .clone()
            .with_intermediate(w.plan.config.intermediate_size)
    };
    let devs: Vec<CudaDevice> = (0..ranks)
        .map(CudaDevice::new)
        .collect::<moe_runner_core::Result<_>>()?;
    let dispatchers = MegaMoeWorld::in_process(&devs, &w.dcfg)?;
    let cfg = &w.plan.config;
    let mut host_inputs = Vec::with_capacity(ranks);
    let mut host_weights = Vec::with_capacity(ranks);
    let mut ranks_state = Vec::with_capacity(ranks);
    for (r, dev) in devs.iter().enumerate() {
        let (weights, (hidden, topk)) = host_rank(args, &w, scheme, tokens, seeds, r)?;
        let device = Device::Cuda(dev.clone());
        let runner = MoeRunner::on_device(
            &device,
            &args.runner,
            DispatchFormat::MegaMoe,
            scheme,
            cfg.clone(),
        )?;
        let state: (MoeRunner, Box<dyn QuantInfo>, Tensor, TopK, Tensor) = (
            runner,
            quant_to_device(weights.as_ref(), &device)?,
            hidden.to_device(&device)?,
            topk.to_device(&device)?,
            Tensor::zeros_cuda(
                dev,
                &[tokens, cfg.hidden_size],
                moe_runner_core::DType::Bf16,
            )?,
        );
        ranks_state.push(state);
        host_inputs.push((hidden, topk));
        host_weights.push(weights);
    }
    // Every rank's program is launched before any is awaited: they wait on each other.
    let forward = || -> moe_runner_core::Result<()> {
        for ((runner, weights, hidden, topk, out), d) in ranks_state.iter().zip(&dispatchers) {
            let t = TopK::new(topk.ids.clone(), topk.weights.clone())?;
            let g = d.dispatch(hidden, t)?;
            runner.run_into(g.as_ref(), weights.as_ref(), out)?;
        }
        for (dev, d) in devs.iter().zip(&dispatchers) {
            dev.synchronize()?;
            d.check()?;
        }
        Ok(())
    };
    forward()?;
    let outs = ranks_state
        .iter()
        .map(|s| Ok(s.4.to_host()?.to_f32_vec()?))
        .collect::<Result<Vec<_>>>()?;
    let mut times = Vec::with_capacity(args.iters.get());
    for _ in 0..args.iters.get() {
        let start = Instant::now();
        forward()?;
        times.push(start.elapsed());
    }
    let ran = Ran {
        path: ranks_state[0].0.describe(),
        runner: ranks_state[0].0.runner().to_string(),
        device: Device::Cuda(devs[0].clone()).name(),
        how: "every rank in this process, its GPU's program pulling rows over peer memory".into(),
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
