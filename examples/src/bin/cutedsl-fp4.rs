//! Example and benchmark for the `cutedsl_fp4` backend. First one NVFP4 layer on the GPU
//! (16 experts, H=1024, I=512), checked against the CPU reference, which quantizes the
//! activations the same way, in both the standard and the masked layout, with exact products
//! and with E4M3 ones. Then the masked
//! grouped GEMMs are timed at DeepSeek-V3 expert shapes (256 experts, H=7168, I=2048) for a
//! range of rows per expert (in buffers sized for the tokens those rows come from; from 64
//! rows also the standard layout with routed tokens, beside `triton`), each as a
//! CUDA graph, with exact products and with E4M3 products (`Nvfp4Products`), beside this
//! project's FP8 `masked_gemm` runner on the same rows and against the
//! floor: the weight bytes over the measured copy bandwidth, or the FLOPs over the FP8
//! tensor-core rate, whichever is larger.
//!
//! `cargo run --release --bin cutedsl-fp4 [-- [--time-only] ROWS,ROWS,... [FP8_TFLOPS]]`; the
//! rate defaults to the dense FP8 rate `scripts/bench_peers.py` measured on an H100
//! (BENCHMARKS.md). `--time-only` skips the check, for profiling the timed passes alone
//! (`scripts/cutedsl-fp4-ab.sh`).

use moe_conformance::{suite, synthetic, synthetic_gpu};
use moe_runner_core::cuda::{copy_bandwidth_gbps, fill_uniform, time_graph_ms};
use moe_runner_core::{
    downcast_quant, CudaDevice, DType, DeepEpLlDispatchOutput, Device, DeviceOps, DispatchFormat,
    DispatchOutput, MoeRunner, MoeRunnerConfig, Nvfp4Products, Nvfp4Weights, QuantInfo,
    QuantScheme, StandardDispatchOutput, Tensor, TopK, WeightDims,
};
use std::process::ExitCode;

/// Dense FP8 tensor-core rate measured on an H100 (TFLOP/s), the default compute floor.
const H100_FP8_TFLOPS: f64 = 1256.0;

fn main() -> ExitCode {
    moe_examples::run_example(run)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).peekable();
    let time_only = args.next_if(|a| a == "--time-only").is_some();
    let rows: Vec<usize> = match args.next() {
        Some(a) => a.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![1, 8, 16, 32, 64, 128],
    };
    let fp8_tflops: f64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(H100_FP8_TFLOPS);
    let device = Device::cuda(0)?;
    if !time_only {
        check(&device)?;
    }
    time(&device, &rows, fp8_tflops)
}

/// The small layer against the reference, in both layouts.
fn check(device: &Device) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = MoeRunnerConfig::new(16, 1024, 512, 4);
    let dims = WeightDims::of(&cfg);
    let exact = synthetic::weights(dims, QuantScheme::Nvfp4, 1, &|_| {})?;
    let e4m3 = with_products(exact.as_ref(), Nvfp4Products::E4m3)?;
    let hidden = synthetic::hidden(100, 1024, DType::Bf16, 2)?;
    let topk = synthetic::topk(100, 4, 16, 3, true, false)?;
    let tol = suite::tolerance(QuantScheme::Nvfp4);
    let formats = [DispatchFormat::Standard, DispatchFormat::DeepEpLowLatency];
    for (format, weights) in formats
        .into_iter()
        .flat_map(|f| [(f, exact.as_ref()), (f, &e4m3 as &dyn QuantInfo)])
    {
        let products = downcast_quant::<Nvfp4Weights>(weights)?.products;
        let runner = MoeRunner::on_device(
            device,
            "cutedsl_fp4",
            format,
            QuantScheme::Nvfp4,
            cfg.clone(),
        )?;
        let c = suite::check_against_reference(
            &runner,
            &hidden,
            &TopK::new(topk.ids.clone(), topk.weights.clone())?,
            weights,
        )?;
        println!(
            "{} ({products:?} products): vs CPU reference rel_l2 {:.3e}, max_abs {:.3e} (tolerance {tol:.0e})",
            runner.describe(),
            c.rel_l2,
            c.max_abs
        );
        if !c.within(tol) {
            return Err(format!("{format} {products:?}: out of tolerance").into());
        }
    }
    Ok(())
}

/// The same NVFP4 weights (their tensors shared) with their products taken as `products`.
fn with_products(
    w: &dyn QuantInfo,
    products: Nvfp4Products,
) -> Result<Nvfp4Weights, Box<dyn std::error::Error>> {
    Ok(downcast_quant::<Nvfp4Weights>(w)?
        .clone()
        .with_products(products))
}

/// Bytes of the experts' weights (both GEMMs, with their scales) in `scheme`.
fn weight_bytes(d: WeightDims, scheme: QuantScheme) -> f64 {
    let elems = (d.experts * (d.n1 * d.hidden + d.hidden * d.inter)) as f64;
    match scheme {
        // Half a byte a value, one E4M3 scale per 16 values.
        QuantScheme::Nvfp4 => elems / 2.0 + elems / 16.0,
        // A byte a value, one f32 per 128x128 block.
        _ => elems + 4.0 * elems / (128.0 * 128.0),
    }
}

/// What one runner pass needs: the dispatch output, the weights, the output.
type Pass<'a> = (&'a dyn DispatchOutput, &'a dyn QuantInfo, &'a Tensor);

/// Median microseconds of `r` over graph replays of one pass.
fn time_us(
    dev: &CudaDevice,
    r: &MoeRunner,
    (d, w, out): Pass<'_>,
) -> Result<f64, Box<dyn std::error::Error>> {
    r.run_into(d, w, out)?;
    let mut t = time_graph_ms(dev, 3, 20, || r.run_into(d, w, out))?;
    t.sort_by(f32::total_cmp);
    Ok(t[t.len() / 2] as f64 * 1e3)
}

fn time(
    device: &Device,
    rows: &[usize],
    fp8_tflops: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let dev = device.as_cuda()?.clone();
    let (e, h, i) = (256, 7168, 2048);
    let cfg = MoeRunnerConfig::new(e, h, i, 8);
    let dims = WeightDims::of(&cfg);
    let gbps = copy_bandwidth_gbps(&dev, 2 << 30, 10)?;
    println!(
        "\n{}: copy {gbps:.0} GB/s, FP8 {fp8_tflops:.0} TFLOP/s; DeepSeek-V3 experts (256, H=7168, I=2048), bf16 activations",
        device.name()
    );
    let fp4 = synthetic_gpu::device_weights(&dev, dims, QuantScheme::Nvfp4, 5)?;
    let fp4_e4m3 = with_products(fp4.as_ref(), Nvfp4Products::E4m3)?;
    let fp8 = synthetic_gpu::device_weights(&dev, dims, QuantScheme::Fp8Block128, 6)?;
    let runner = |name: &str, format, scheme| {
        MoeRunner::on_device(device, name, format, scheme, cfg.clone())
    };
    let floor = |m: usize| {
        let act_bytes = (2 * e * m * h * 2) as f64;
        let mem_us = (weight_bytes(dims, QuantScheme::Nvfp4) + act_bytes) / (gbps * 1e3);
        let flops = 2.0 * (e * m) as f64 * (dims.n1 * h + h * i) as f64;
        let compute_us = flops / (fp8_tflops * 1e6);
        let bound = if mem_us >= compute_us {
            "memory"
        } else {
            "compute"
        };
        (mem_us.max(compute_us), bound)
    };
    println!("| layout | rows/expert | tokens (top-8) | cutedsl_fp4 (us) | FP4 floor (us) | of floor | E4M3 products (us) | of floor | FP8 runner | FP8 (us) | FP4 speedup (exact, E4M3) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|");
    let row = |layout: &str, m: usize, [exact, e4m3]: [f64; 2], fp8_name: &str, fp8_us: f64| {
        let (floor, bound) = floor(m);
        println!(
            "| {layout} | {m} | {} | {exact:.1} | {floor:.1} ({bound}) | {:.0}% | {e4m3:.1} | {:.0}% | {fp8_name} | {fp8_us:.1} | {:.2}x, {:.2}x |",
            m * e / 8,
            100.0 * floor / exact,
            100.0 * floor / e4m3,
            fp8_us / exact,
            fp8_us / e4m3
        );
    };
    for &m in rows {
        if m >= 64 {
            // Large batches: the standard layout, every token with 8 distinct experts.
            let tokens = m * e / 8;
            let hidden = Tensor::zeros_cuda(&dev, &[tokens, h], DType::Bf16)?;
            fill_uniform(&dev, &hidden, -1.7, 1.7, 11)?;
            let topk = synthetic::topk(tokens, 8, e, 12, false, false)?.to_device(device)?;
            let input = StandardDispatchOutput {
                hidden,
                hidden_scale: None,
                topk,
            };
            let out = Tensor::zeros_cuda(&dev, &[tokens, h], DType::Bf16)?;
            let std = DispatchFormat::Standard;
            let fp4_runner = runner("cutedsl_fp4", std, QuantScheme::Nvfp4)?;
            let a = [
                time_us(&dev, &fp4_runner, (&input, fp4.as_ref(), &out))?,
                time_us(&dev, &fp4_runner, (&input, &fp4_e4m3, &out))?,
            ];
            let b = time_us(
                &dev,
                &runner("triton", std, QuantScheme::Fp8Block128)?,
                (&input, fp8.as_ref(), &out),
            )?;
            row("standard", m, a, "`triton`", b);
        }
        if m > 64 {
            continue;
        }
        // Decode (up to 64 rows per expert, both layouts at 64): the masked layout, in the
        // buffers a dispatch of this many rows has (m rows on each of 256 experts are m * 32
        // tokens, each expert's buffer holding every token). Smaller buffers would cap the
        // rows a top-8 dispatch can deliver, and the FP8 runner computes no more than that.
        let cap = (m * e / 8).max(1);
        let hidden = Tensor::zeros_cuda(&dev, &[e, cap, h], DType::Bf16)?;
        fill_uniform(&dev, &hidden, -1.7, 1.7, 11)?;
        let out = Tensor::zeros_cuda(&dev, &[e, cap, h], DType::Bf16)?;
        let batch = DeepEpLlDispatchOutput {
            hidden,
            hidden_scale: None,
            hidden_global_scale: None,
            topk: TopK::from_vecs(&[0], &[1.0], 1, 1)?.to_device(device)?,
            masked_m: Tensor::from_slice(&vec![m as i32; e], &[e], DType::I32)?
                .to_device(device)?,
            expected_m: m,
            src_info: Tensor::zeros_cuda(&dev, &[e, cap], DType::I32)?,
            layout_range: Tensor::zeros_cuda(&dev, &[e, 1], DType::I64)?,
            out_buffer: None,
        };
        let ll = DispatchFormat::DeepEpLowLatency;
        let fp4_runner = runner("cutedsl_fp4", ll, QuantScheme::Nvfp4)?;
        let a = [
            time_us(&dev, &fp4_runner, (&batch, fp4.as_ref(), &out))?,
            time_us(&dev, &fp4_runner, (&batch, &fp4_e4m3, &out))?,
        ];
        let b = time_us(
            &dev,
            &runner("masked_gemm", ll, QuantScheme::Fp8Block128)?,
            (&batch, fp8.as_ref(), &out),
        )?;
        row("masked", m, a, "`masked_gemm`", b);
    }
    dev.synchronize()?;
    Ok(())
}
