//! Example for the `deepep_ll` backend: one DeepSeek-V3-shaped layer (a slice of 32 experts, so
//! the CPU reference stays quick) over R ranks, one per GPU (ranks share a GPU when there are
//! fewer): FP8 dispatch, the `masked_gemm` runner with FP8 block weights, bf16 combine. Checked
//! against the expert-parallel reference, then timed as one CUDA graph per rank.
//! `cargo run --release --bin deepep-ll [-- RANKS [TOKENS_PER_RANK]]`.

use moe_backend_deepep_ll::{LlWorld, MaskedGemmRunner};
use moe_conformance::{ep, suite, synthetic};
use moe_dispatch::{DispatcherConfig, Wire};
use moe_examples::a2a_bench::{capture, time_graphs};
use moe_runner_core::cuda::cudarc::driver::CudaContext;
use moe_runner_core::{
    quant_to_device, CudaDevice, DType, Device, DeviceOps, MoeRunnerConfig, QuantScheme, Tensor,
    TopK, WeightDims,
};
use std::process::ExitCode;

fn main() -> ExitCode {
    moe_examples::run_example(run)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, d: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(std::env::args()
            .nth(i)
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(d))
    };
    let (ranks, t) = (arg(1, 1)?, arg(2, 128)?);
    let gpus = CudaContext::device_count()? as usize;
    let devs: Vec<CudaDevice> = (0..ranks)
        .map(|r| CudaDevice::new(r % gpus.max(1)))
        .collect::<Result<_, _>>()?;
    let (e, h, i, k) = (32, 7168, 2048, 8);
    let dcfg = DispatcherConfig {
        world_size: ranks,
        num_local_experts: e / ranks,
        wire: Wire::Fp8,
        routed_scaling_factor: Some(2.5),
        ..DispatcherConfig::single(e, h, t).with_top_k(k)
    };
    let mut cfg = MoeRunnerConfig::new(e, h, i, k);
    cfg.num_local_experts = e / ranks;
    cfg.routed_scaling_factor = dcfg.routed_scaling_factor;
    let dims = WeightDims {
        experts: e / ranks,
        n1: 2 * i,
        hidden: h,
        inter: i,
    };
    println!("{ranks} rank(s) on {gpus} GPU(s), {t} tokens per rank, {} experts per rank of H={h}, I={i}, FP8", e / ranks);
    let scheme = QuantScheme::Fp8Block128;
    let weights: Vec<_> = (0..ranks)
        .map(|r| synthetic::weights(dims, scheme, 10 + r as u64, &|_| {}))
        .collect::<Result<_, _>>()?;
    let ds = LlWorld::in_process(&devs, &dcfg)?;
    let dw: Vec<_> = devs
        .iter()
        .zip(&weights)
        .map(|(d, w)| quant_to_device(w.as_ref(), &Device::Cuda(d.clone())))
        .collect::<Result<_, _>>()?;
    let runners: Vec<_> = devs
        .iter()
        .map(|d| MaskedGemmRunner::new(&cfg, &Device::Cuda(d.clone())))
        .collect::<Result<_, _>>()?;
    let inputs: Vec<(Tensor, TopK)> = (0..ranks)
        .map(|r| {
            Ok((
                synthetic::hidden(t, h, DType::Bf16, 20 + r as u64)?,
                synthetic::topk(t, k, e, 30 + r as u64, false, false)?,
            ))
        })
        .collect::<moe_runner_core::Result<_>>()?;
    let moved: Vec<(Tensor, TopK)> = inputs
        .iter()
        .zip(&devs)
        .map(|((x, tk), d)| {
            let d = Device::Cuda(d.clone());
            Ok((x.to_device(&d)?, tk.to_device(&d)?))
        })
        .collect::<moe_runner_core::Result<_>>()?;
    let outs: Vec<Tensor> = devs
        .iter()
        .map(|d| Tensor::zeros_cuda(d, &[t, h], DType::Bf16))
        .collect::<Result<_, _>>()?;
    let clone = |tk: &TopK| TopK::new(tk.ids.clone(), tk.weights.clone());
    // Every rank's dispatch is queued before any rank's GEMMs, as independent processes would.
    let hooks: Vec<_> = (0..ranks)
        .map(|r| ds[r].dispatch_send(&moved[r].0, clone(&moved[r].1)?))
        .collect::<Result<_, _>>()?;
    let got: Vec<_> = hooks
        .into_iter()
        .map(|h| h.recv())
        .collect::<Result<_, _>>()?;
    for r in 0..ranks {
        let y = got[r]
            .out_buffer
            .clone()
            .expect("deepep_ll registers the combine buffer");
        runners[r].run_into(&got[r], dw[r].as_ref(), &y)?;
    }
    let hooks: Vec<_> = (0..ranks)
        .map(|r| ds[r].combine_send(got[r].out_buffer.as_ref().expect("buffer"), &got[r]))
        .collect::<Result<_, _>>()?;
    for (hk, o) in hooks.into_iter().zip(&outs) {
        hk.recv_into(o)?;
    }
    for (d, r) in ds.iter().zip(&runners) {
        d.check()?;
        r.check()?;
    }
    let refs: Vec<_> = weights.iter().map(|w| w.as_ref()).collect();
    let want = ep::layer_outputs(&cfg, scheme, &refs, &inputs)?;
    let mut ok = true;
    for (r, (o, w)) in outs.iter().zip(&want).enumerate() {
        let c = suite::compare(&o.to_host()?.to_f32_vec()?, w)?;
        let pass = c.within(suite::tolerance(scheme));
        ok &= pass;
        println!(
            "rank {r}: rel L2 {:.2e}, max |diff| {:.3e} of max {:.3} -> {}",
            c.rel_l2,
            c.max_abs,
            c.ref_max,
            if pass { "ok" } else { "FAIL" }
        );
    }
    let layer = |r: usize| -> moe_runner_core::Result<()> {
        let got = ds[r].dispatch_now(&moved[r].0, clone(&moved[r].1)?)?;
        let y = got.out_buffer.clone().expect("buffer");
        runners[r].run_into(&got, dw[r].as_ref(), &y)?;
        ds[r].combine_into(&y, &got, &outs[r])
    };
    for d in &devs {
        d.synchronize()?;
    }
    let graphs = capture(&devs, layer)?;
    let us = time_graphs(&devs, &graphs, 3, 20, 5)?;
    for d in &ds {
        d.check()?;
    }
    println!("layer (dispatch + masked GEMMs + combine), median of 20 x 5 back-to-back graph replays: {us:.1} us");
    if !ok {
        return Err("the layer does not match the reference".into());
    }
    Ok(())
}
