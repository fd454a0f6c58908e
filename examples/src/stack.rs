//! The end-to-end run: every MoE layer of a checkpoint as a stack (router, routed experts,
//! shared experts, residual: x <- x + moe(x)), through every registered path that runs the
//! checkpoint's scheme on this machine (the CPU's, and the GPU's when one is present), each
//! compared with the same stack through the reference path.

use crate::checkpoint_layer::CheckpointLayer;
use crate::error::Result;
use crate::plan::{LayerPlan, Parallelism};
use moe_conformance::{suite, synthetic};
use moe_dispatch::MoeLayer;
use moe_runner_core::registry::{registered_paths, DeviceKind};
use moe_runner_core::{
    quant_to_device, DType, Device, DeviceOps, DispatchFormat, MoeError, MoeRunner, Tensor,
};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// One path's run of the whole stack.
#[derive(Debug, Serialize)]
pub struct StackRow {
    pub path: String,
    pub layers: usize,
    /// The worst layer's relative L2 error against the reference, each layer on the
    /// reference's input.
    pub rel_l2: f64,
    /// Relative L2 error of the free-running stack's output.
    pub stack_rel_l2: f64,
    /// Wall time of one pass through the stack (first use included).
    pub ms: f64,
}

/// The decoder layers of `dir` that hold routed experts.
fn moe_layers(dir: &Path) -> Result<Vec<CheckpointLayer>> {
    let first = CheckpointLayer::open(dir, None)?;
    let mut layers = vec![];
    let mut l = first.layer;
    while first
        .ck
        .contains(&first.family.expert(l, 0, moe_checkpoint::Proj::Gate))
    {
        layers.push(CheckpointLayer::open(dir, Some(l))?);
        l += 1;
    }
    Ok(layers)
}

/// One `[tokens, H]` f32 matrix per layer.
type Rows = Vec<Vec<f32>>;

/// Each layer's input and output `[tokens, H]` (f32) through `runner` (format `format`) on
/// `device`. With `inputs`, every layer reads the given input (the reference's), so each
/// layer's error is measured alone; without, the stack runs free from seeded tokens, each
/// layer reading the previous one's residual sum.
fn run_layers(
    layers: &[CheckpointLayer],
    runner_name: &str,
    format: DispatchFormat,
    device: &Device,
    tokens: usize,
    seed: u64,
    inputs: Option<&[Vec<f32>]>,
) -> Result<(Rows, Rows)> {
    let spec = &layers[0].spec;
    let act = if layers[0].scheme == moe_runner_core::QuantScheme::F16 {
        DType::F16
    } else {
        DType::Bf16
    };
    let mut x = synthetic::hidden(tokens, spec.hidden, act, seed)?.to_f32_vec()?;
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for (l, ck) in layers.iter().enumerate() {
        if let Some(given) = inputs {
            x = given[l].clone();
        }
        let mut plan = LayerPlan::new(
            &ck.spec,
            Parallelism {
                tp: 1,
                ep: 1,
                fuse_shared: false,
            },
            seed,
        )?;
        let router = ck.router(&mut plan)?;
        let runner =
            MoeRunner::on_device(device, runner_name, format, ck.scheme, plan.config.clone())?;
        let weights = ck.experts(&plan, 1, &|_| {})?;
        let weights = if device.is_cuda() {
            quant_to_device(weights.as_ref(), device)?
        } else {
            weights
        };
        let dispatcher = suite::dispatcher_for(format, &plan.config, tokens.max(1), device)?;
        let layer = MoeLayer::new(
            plan.router.clone(),
            dispatcher,
            runner,
            weights,
            ck.shared(&plan)?,
        )?;
        let (e, h) = (spec.routed_experts, spec.hidden);
        let logits: Vec<f32> = x
            .chunks_exact(h)
            .flat_map(|row| {
                router
                    .chunks_exact(h)
                    .map(|w| row.iter().zip(w).map(|(a, b)| a * b).sum::<f32>())
                    .collect::<Vec<_>>()
            })
            .collect();
        let logits = Tensor::from_f32(&logits, &[tokens, e], DType::F32)?;
        let hidden = Tensor::from_f32(&x, &[tokens, h], act)?;
        let input = if device.is_cuda() {
            hidden.to_device(device)?
        } else {
            hidden
        };
        let y = layer.forward(&input, &logits)?.to_host()?.to_f32_vec()?;
        // Residual, rounded to the activation dtype as the next layer reads it.
        let sum: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
        xs.push(std::mem::replace(
            &mut x,
            Tensor::from_f32(&sum, &[tokens, h], act)?.to_f32_vec()?,
        ));
        ys.push(y);
    }
    xs.push(x);
    Ok((xs, ys))
}

/// Prints the rows of [`run_all`] (or JSON); an error when a path's error exceeds the
/// scheme's tolerance.
pub fn print(
    rows: &[StackRow],
    scheme_tol: f64,
    json: bool,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    if json {
        crate::output::write_json(out, &rows)?;
    } else {
        for r in rows {
            writeln!(
                out,
                "{:<70} {} layers  worst layer rel L2 {:.2e}  free stack {:.2e}  {:8.1} ms",
                r.path, r.layers, r.rel_l2, r.stack_rel_l2, r.ms
            )?;
        }
    }
    if let Some(bad) = rows.iter().find(|r| r.rel_l2 > scheme_tol) {
        return Err(MoeError::invalid(
            "stack",
            format!(
                "{} is {:.2e} from the reference (tolerance {scheme_tol:.0e})",
                bad.path, bad.rel_l2
            ),
        )
        .into());
    }
    Ok(())
}

/// Every registered path for the checkpoint's scheme on the CPU and (when present) the first
/// GPU, each against the reference: every layer on the reference's input (the error that is
/// checked), and the stack running free (routing is discrete, so a token whose top-k flips on a
/// near tie moves the free-running output by more than any layer's rounding: reported only).
pub fn run_all(dir: &Path, tokens: usize, seed: u64) -> Result<Vec<StackRow>> {
    let layers = moe_layers(dir)?;
    let scheme = layers[0].scheme;
    let cpu = Device::cpu();
    let reference = moe_backend_reference::RUNNER;
    let (ref_in, ref_out) = run_layers(
        &layers,
        reference,
        DispatchFormat::Standard,
        &cpu,
        tokens,
        seed,
        None,
    )?;
    let gpu = Device::cuda(0).ok();
    let mut rows = Vec::new();
    for p in registered_paths() {
        if !p.schemes.contains(&scheme) {
            continue;
        }
        let device = match (p.device, &gpu) {
            (DeviceKind::Cpu, _) => cpu.clone(),
            (DeviceKind::Cuda, Some(g)) => g.clone(),
            (DeviceKind::Cuda, None) => continue,
        };
        let started = Instant::now();
        let (_, outs) = run_layers(
            &layers,
            p.runner,
            p.format,
            &device,
            tokens,
            seed,
            Some(&ref_in),
        )?;
        device.synchronize()?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let mut worst = 0f64;
        for (got, want) in outs.iter().zip(&ref_out) {
            worst = worst.max(suite::compare(got, want)?.rel_l2);
        }
        let (free, _) = run_layers(&layers, p.runner, p.format, &device, tokens, seed, None)?;
        let stack = suite::compare(&free[layers.len()], &ref_in[layers.len()])?.rel_l2;
        rows.push(StackRow {
            path: format!("({}, {}) {scheme} on {}", p.format, p.runner, device.name()),
            layers: layers.len(),
            rel_l2: worst,
            stack_rel_l2: stack,
            ms,
        });
    }
    if rows.is_empty() {
        return Err(
            MoeError::invalid("checkpoint", format!("no registered path runs {scheme}")).into(),
        );
    }
    Ok(rows)
}
