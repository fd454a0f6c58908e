//! Example for the `triton` backend: one DeepSeek-V3-shaped FP8 layer (a slice of its experts,
//! so the CPU reference stays quick) on the GPU, checked against the reference, then timed as
//! a CUDA graph. `cargo run --release --bin triton-fused [-- M]`.

use moe_backend_triton::TritonRunner;
use moe_conformance::{suite, synthetic};
use moe_runner_core::registry::FusedRunner;
use moe_runner_core::{
    cuda::time_graph_ms, downcast_combine, quant_to_device, DType, Device, DeviceOps,
    DispatchFormat, MoeRunner, MoeRunnerConfig, QuantScheme, StandardCombineInput,
    StandardDispatchOutput, Tensor, TopK, WeightDims,
};
use std::process::ExitCode;

fn main() -> ExitCode {
    moe_examples::run_example(run)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let m: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(64);
    let device = Device::cuda(0)?;
    // DeepSeek-V3 expert shapes, 32 of the 256 experts, top-8, FP8 with 128x128 weight blocks.
    let cfg = MoeRunnerConfig::new(32, 7168, 2048, 8);
    let dims = WeightDims {
        experts: 32,
        n1: 4096,
        hidden: 7168,
        inter: 2048,
    };
    let scheme = QuantScheme::Fp8Block128;
    println!(
        "generating {} FP8 experts of H=7168, I=2048 ...",
        dims.experts
    );
    let weights = synthetic::weights(dims, scheme, 1, &|_| {})?;
    let hidden = synthetic::hidden(m, 7168, DType::Bf16, 2)?;
    let topk = synthetic::topk(m, 8, 32, 3, false, false)?;

    let runner = MoeRunner::on_device(
        &device,
        "triton",
        DispatchFormat::Standard,
        scheme,
        cfg.clone(),
    )?;
    println!("path: {}", runner.describe());
    let check = suite::check_against_reference(&runner, &hidden, &topk, weights.as_ref())?;
    println!(
        "vs CPU reference: rel_l2 {:.3e}, max_abs {:.3e} (tolerance {:.0e})",
        check.rel_l2,
        check.max_abs,
        suite::tolerance(scheme)
    );

    let dev = device.as_cuda()?;
    let triton = TritonRunner::new(&cfg, &device)?;
    let dq = quant_to_device(weights.as_ref(), &device)?;
    let input = StandardDispatchOutput {
        hidden: hidden.to_device(&device)?,
        hidden_scale: None,
        topk: TopK::new(
            topk.ids.to_device(&device)?,
            topk.weights.to_device(&device)?,
        )?,
    };
    let out = Tensor::zeros_cuda(dev, &[m, 7168], DType::Bf16)?;
    let warm = triton.run(&input, dq.as_ref())?;
    drop(downcast_combine::<StandardCombineInput>(
        warm,
        DispatchFormat::Standard,
    )?);
    let mut times = time_graph_ms(dev, 3, 20, || triton.run_into(&input, dq.as_ref(), &out))?;
    times.sort_by(f32::total_cmp);
    let ms = times[times.len() / 2] as f64;
    println!(
        "{} M={m}: median {:.1} us per layer (graph replay), {:.0} tokens/s",
        device.name(),
        ms * 1e3,
        m as f64 / (ms * 1e-3)
    );
    if !check.within(suite::tolerance(scheme)) {
        return Err("the GPU result is outside the tolerance".into());
    }
    Ok(())
}
