//! `moe run --checkpoint DIR`: one MoE layer of a Hugging Face checkpoint instead of synthetic
//! weights. The model comes from DIR/config.json; rank 0's routed experts (its share under
//! `--ep`, its slice under `--tp`) are stacked from the safetensors files; the router's logits
//! are the checkpoint's gate applied to the input, with its score-correction bias; the shared
//! experts run as a separate CPU MLP.

use crate::error::Result;
use crate::model::ModelSpec;
use crate::plan::LayerPlan;
use crate::run::load_spec;
use moe_backend_reference::CpuSharedExperts;
use moe_checkpoint::{
    load_experts, load_router, load_shared, Checkpoint, ExpertSlice, Family, Proj,
};
use moe_dispatch::RoutingMethod;
use moe_runner_core::{DType, MoeError, QuantInfo, QuantScheme, SharedExperts, Tensor};
use rayon::prelude::*;
use std::path::Path;

pub struct CheckpointLayer {
    pub ck: Checkpoint,
    pub family: Family,
    pub spec: ModelSpec,
    pub layer: usize,
    /// The scheme the experts are stored in.
    pub scheme: QuantScheme,
}

impl CheckpointLayer {
    /// Opens `dir`; `layer` defaults to the first decoder layer with routed experts.
    pub fn open(dir: &Path, layer: Option<usize>) -> Result<Self> {
        let spec = load_spec(Some(&dir.join("config.json")), "")?;
        let family = Family::of(&spec.arch)?;
        let ck = Checkpoint::open(dir)?;
        let layer = match layer {
            Some(l) => l,
            None => (0..4096)
                .find(|&l| ck.contains(&family.expert(l, 0, Proj::Gate)))
                .ok_or_else(|| MoeError::Checkpoint {
                    path: dir.display().to_string(),
                    msg: format!("no layer has `{}`", family.expert(0, 0, Proj::Gate)),
                })?,
        };
        let first = ck.get(&family.expert(layer, 0, Proj::Gate))?;
        let scheme = match first.dtype {
            safetensors::Dtype::F8_E4M3 => QuantScheme::Fp8Block128,
            safetensors::Dtype::U8 => QuantScheme::Nvfp4,
            safetensors::Dtype::BF16 => QuantScheme::Bf16,
            safetensors::Dtype::F16 => QuantScheme::F16,
            safetensors::Dtype::F32 => QuantScheme::F32,
            other => {
                return Err(MoeError::invalid(
                    first.name,
                    format!("expert weights of dtype {other:?} are not supported"),
                )
                .into())
            }
        };
        Ok(Self {
            ck,
            family,
            spec,
            layer,
            scheme,
        })
    }

    /// Rank 0's routed experts for `plan` (its first `num_local_experts`), TP slice 0 of `tp`.
    pub fn experts(
        &self,
        plan: &LayerPlan,
        tp: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Box<dyn QuantInfo>> {
        let slice = ExpertSlice {
            layer: self.layer,
            experts: 0..plan.config.num_local_experts,
            hidden: self.spec.hidden,
            inter: self.spec.moe_intermediate,
            tp: (0, tp),
        };
        Ok(load_experts(&self.ck, self.family, &slice, progress)?)
    }

    /// As [`Self::experts`], straight from the mapped files into `dev`'s memory.
    #[cfg(feature = "cuda")]
    pub fn experts_to_device(
        &self,
        plan: &LayerPlan,
        tp: usize,
        dev: &moe_runner_core::CudaDevice,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Box<dyn QuantInfo>> {
        let slice = ExpertSlice {
            layer: self.layer,
            experts: 0..plan.config.num_local_experts,
            hidden: self.spec.hidden,
            inter: self.spec.moe_intermediate,
            tp: (0, tp),
        };
        Ok(moe_checkpoint::load_experts_to_device(
            &self.ck,
            self.family,
            &slice,
            dev,
            progress,
        )?)
    }

    /// The shared experts as a CPU MLP (not split under tensor parallelism: `None` with a note
    /// from the caller when `tp > 1`).
    pub fn shared(&self, plan: &LayerPlan) -> Result<Option<Box<dyn SharedExperts>>> {
        let Some(s) = load_shared(&self.ck, self.family, self.layer, self.spec.hidden)? else {
            return Ok(None);
        };
        let mlp = CpuSharedExperts::new(s.w13, s.w2, s.inter, &plan.config)?;
        let mlp = match s.gate {
            Some(g) => mlp.with_gate(g)?,
            None => mlp,
        };
        Ok(Some(Box::new(mlp)))
    }

    /// The checkpoint's router: its `[E, H]` weight as f32, its correction bias set into
    /// `plan`'s router.
    pub fn router(&self, plan: &mut LayerPlan) -> Result<Vec<f32>> {
        let (e, h) = (self.spec.routed_experts, self.spec.hidden);
        let r = load_router(&self.ck, self.family, self.layer, e, h)?;
        if let RoutingMethod::DeepSeekGrouped {
            correction_bias, ..
        } = &mut plan.router.method
        {
            *correction_bias = r.bias;
        }
        Ok(r.weight)
    }

    /// Router logits `[M, E]` = hidden x gate^T (and the bias into `plan`, as [`Self::router`]).
    pub fn route_inputs(&self, plan: &mut LayerPlan, hidden: &Tensor) -> Result<Tensor> {
        let (e, h) = (self.spec.routed_experts, self.spec.hidden);
        let weight = self.router(plan)?;
        let x = hidden.to_f32_vec()?;
        let m = x.len() / h;
        let mut logits = vec![0f32; m * e];
        logits
            .par_chunks_mut(e)
            .zip(x.par_chunks(h))
            .for_each(|(out, row)| {
                for (o, w) in out.iter_mut().zip(weight.chunks_exact(h)) {
                    *o = row.iter().zip(w).map(|(a, b)| a * b).sum();
                }
            });
        Ok(Tensor::from_f32(&logits, &[m, e], DType::F32)?)
    }
}

/// `moe gen-checkpoint`: writes a small checkpoint and prints where.
pub fn gen_checkpoint(
    args: &crate::cli::GenCheckpointArgs,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    let arch = moe_checkpoint::ARCHITECTURES
        .iter()
        .map(|(a, _)| *a)
        .find(|a| *a == args.arch)
        .ok_or_else(|| MoeError::Unknown {
            kind: "checkpoint architecture",
            name: args.arch.clone(),
            known: moe_checkpoint::ARCHITECTURES
                .iter()
                .map(|(a, _)| *a)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let spec = moe_checkpoint::generate::GenSpec {
        arch,
        layers: args.layers,
        experts: args.experts,
        hidden: args.hidden,
        inter: args.inter,
        top_k: args.top_k,
        shared: args.shared,
        fp8: args.fp8,
        nvfp4: args.nvfp4,
        shards: args.shards,
    };
    moe_checkpoint::generate::write_only(&args.out, &spec, args.seed)?;
    writeln!(
        out,
        "wrote {} ({} layers, {} experts) to {}",
        arch,
        args.layers,
        args.experts,
        args.out.display()
    )?;
    Ok(())
}
