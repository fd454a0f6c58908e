//! Example and benchmark for the `megamoe` backend. First one layer on the GPU (16 experts,
//! H=1024, I=512, top-4, 100 tokens with skewed routing) for FP8 activations, FP4 activations
//! and the MXF4 kind, each checked against the CPU path that quantizes at the same points; then
//! `moe bench-mega`: DeepSeek-V3 expert shapes against the unfused path on the same routing.
//!
//! `cargo run --release --bin megamoe [-- TOKENS,TOKENS,... [RANKS]]`

use moe_backend_megamoe::flags::Resolved;
use moe_backend_megamoe::{cpu, MegaMoeWorld};
use moe_conformance::synthetic;
use moe_dispatch::{Dispatcher, DispatcherConfig};
use moe_examples::cli::MegaBenchArgs;
use moe_runner_core::{
    downcast_quant, quant_to_device, DType, Device, DispatchFormat, MegaMoeFlags, MoeRunner,
    MoeRunnerConfig, Mxfp4Weights, TopK, WeightDims,
};
use std::process::ExitCode;

fn main() -> ExitCode {
    moe_examples::run_example(run)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let tokens: Vec<usize> = match args.next() {
        Some(a) => a.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![1, 8, 32, 64, 128],
    };
    let ranks: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1);
    check()?;
    let bench = MegaBenchArgs {
        ranks,
        tokens,
        iters: 20,
        markdown: None,
    };
    moe_examples::mega_bench::bench_mega(&bench, &mut std::io::stdout().lock())?;
    Ok(())
}

/// The small layer against the CPU path, for each switch pair.
fn check() -> Result<(), Box<dyn std::error::Error>> {
    let (e, h, i, k, m) = (16, 1024, 512, 4, 100);
    let device = Device::cuda(0)?;
    let dev = device.as_cuda()?.clone();
    let dcfg = DispatcherConfig::single(e, h, m)
        .with_top_k(k)
        .with_intermediate(i);
    let dispatcher = MegaMoeWorld::in_process(std::slice::from_ref(&dev), &dcfg)?.remove(0);
    let hidden = synthetic::hidden(m, h, DType::Bf16, 2)?;
    let topk = synthetic::topk(m, k, e, 3, true, false)?;
    for flags in [(false, false), (true, false), (true, true)] {
        let flags = Resolved {
            fp4_acts: flags.0,
            mxf4_kind: flags.1,
        };
        let scheme = flags.scheme();
        let dims = WeightDims {
            experts: e,
            n1: 2 * i,
            hidden: h,
            inter: i,
        };
        let host = synthetic::weights(dims, scheme, 1, &|_| {})?;
        let mut cfg = MoeRunnerConfig::new(e, h, i, k);
        cfg.megamoe = MegaMoeFlags {
            fp4_acts: Some(flags.fp4_acts),
            mxf4_kind: Some(flags.mxf4_kind),
        };
        let runner = MoeRunner::on_device(
            &device,
            "megamoe",
            DispatchFormat::MegaMoe,
            scheme,
            cfg.clone(),
        )?;
        let w = quant_to_device(host.as_ref(), &device)?;
        let g = dispatcher.dispatch(
            &hidden.to_device(&device)?,
            TopK::new(
                topk.ids.to_device(&device)?,
                topk.weights.to_device(&device)?,
            )?,
        )?;
        let out = dispatcher.combine(runner.run(g.as_ref(), w.as_ref())?, g.as_ref())?;
        dispatcher.check()?;
        let got = out.to_host()?.to_f32_vec()?;
        let want = cpu::forward(
            &hidden.to_f32_vec()?,
            topk.ids.as_slice::<i32>()?,
            topk.weights.as_slice::<f32>()?,
            k,
            downcast_quant::<Mxfp4Weights>(host.as_ref())?,
            &cfg,
            flags,
        )?;
        let c = moe_conformance::suite::compare(&got, &want)?;
        println!(
            "megamoe {scheme}{}: vs CPU path rel_l2 {:.3e}, max_abs {:.3e} (tolerance 1e-2)",
            if flags.mxf4_kind { " (mxf4 kind)" } else { "" },
            c.rel_l2,
            c.max_abs
        );
        if !c.within(1e-2) {
            return Err(format!("megamoe {scheme}: out of tolerance").into());
        }
    }
    Ok(())
}
