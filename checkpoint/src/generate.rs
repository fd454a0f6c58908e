//! Writes small checkpoints in the exact layouts of the supported families (config.json, the
//! Hugging Face tensor names, bf16, FP8 E4M3 with 128x128 `weight_scale_inv` blocks, or
//! ModelOpt NVFP4, one file or shards with an index), and returns the values it stored, so tests
//! can check a load against them.

use moe_quant::quantize_fp8_blocks;
use moe_runner_core::{MoeError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, View};
use serde_json::json;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use crate::arch::{scale_of, Family, Proj};
use crate::store::INDEX_FILE;

/// The model to write.
#[derive(Clone, Debug)]
pub struct GenSpec {
    /// `architectures[0]` of config.json.
    pub arch: &'static str,
    pub layers: usize,
    pub experts: usize,
    pub hidden: usize,
    /// Intermediate size of one routed expert.
    pub inter: usize,
    pub top_k: usize,
    /// Shared experts (DeepSeek, GLM: of the routed shape; Qwen2-MoE: one of `inter * 2`).
    pub shared: usize,
    /// FP8 E4M3 weights with 128x128 block scales instead of bf16.
    pub fp8: bool,
    /// NVFP4 experts in NVIDIA ModelOpt's layout instead (packed E2M1 `weight` U8, E4M3
    /// `weight_scale` per 16 values, f32 `weight_scale_2` = 1 / global scale, f32
    /// `input_scale`); a routed expert's gate and up share one global scale.
    pub nvfp4: bool,
    /// Files the tensors are spread over (1: `model.safetensors`, else shards and an index).
    pub shards: usize,
}

/// What was written, as the f32 values a loader must reproduce (bf16-rounded, or FP8 codes
/// times their block scale).
pub struct Generated {
    pub family: Family,
    /// `[layer][expert]` = (gate `[I, H]`, up `[I, H]`, down `[H, I]`).
    pub experts: Vec<Vec<[Vec<f32>; 3]>>,
    /// `[layer]` = router weight `[E, H]`.
    pub router: Vec<Vec<f32>>,
    /// `[layer]` = score-correction bias `[E]`, for families that have one.
    pub bias: Vec<Option<Vec<f32>>>,
    /// `[layer]` = shared experts (gate, up, down), for families that have them.
    pub shared: Vec<Option<[Vec<f32>; 3]>>,
}

struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn io(path: &Path, e: impl std::fmt::Display) -> MoeError {
    MoeError::Checkpoint {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

/// `values` of `shape` as bf16, and the values stored.
fn bf16(values: &[f32], shape: &[usize]) -> (Owned, Vec<f32>) {
    let q: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let data = q.iter().flat_map(|v| v.to_le_bytes()).collect();
    (
        Owned {
            dtype: Dtype::BF16,
            shape: shape.to_vec(),
            data,
        },
        q.iter().map(|v| v.to_f32()).collect(),
    )
}

/// The tensors of one weight to write, and the values they store.
type Written = (Vec<(String, Owned)>, Vec<f32>);

/// Input global scale written beside NVFP4 weights (`input_scale` = its inverse): the
/// activations' amax taken as 16.
pub const NVFP4_INPUT_AMAX: f32 = 16.0;

fn scalar(v: f32) -> Owned {
    Owned {
        dtype: Dtype::F32,
        shape: vec![],
        data: v.to_le_bytes().to_vec(),
    }
}

/// A weight `[rows, cols]` in ModelOpt's NVFP4 layout with global scale `gs`: the tensors to
/// write and the values stored, `(e2m1 * block scale) / gs`.
fn nvfp4_weight(
    name: String,
    values: &[f32],
    rows: usize,
    cols: usize,
    gs: f32,
) -> Result<Written> {
    let q = moe_quant::quantize_nvfp4(values, rows, cols, gs)?;
    let stored = q.dequantize();
    let input_gs = moe_quant::nvfp4_global_scale(NVFP4_INPUT_AMAX)?;
    let names = crate::arch::Nvfp4Names::of(&name);
    Ok((
        vec![
            (
                names.scale,
                Owned {
                    dtype: Dtype::F8_E4M3,
                    shape: vec![rows, cols / 16],
                    data: q.scales,
                },
            ),
            (names.scale_2, scalar(1.0 / gs)),
            (names.input_scale, scalar(1.0 / input_gs)),
            (
                name,
                Owned {
                    dtype: Dtype::U8,
                    shape: vec![rows, cols / 2],
                    data: q.packed,
                },
            ),
        ],
        stored,
    ))
}

/// A weight `[rows, cols]` stored as bf16, or FP8 with its `weight_scale_inv`: the tensors to
/// write and the values stored.
fn weight(name: String, values: &[f32], rows: usize, cols: usize, fp8: bool) -> Result<Written> {
    if !fp8 {
        let (t, stored) = bf16(values, &[rows, cols]);
        return Ok((vec![(name, t)], stored));
    }
    let q = quantize_fp8_blocks(values, 1, rows, cols, (128, 128))?;
    let stored = q.dequantize();
    let scales = Owned {
        dtype: Dtype::F32,
        shape: vec![rows.div_ceil(128), cols.div_ceil(128)],
        data: q.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
    };
    let codes = Owned {
        dtype: Dtype::F8_E4M3,
        shape: vec![rows, cols],
        data: q.data,
    };
    Ok((vec![(scale_of(&name), scales), (name, codes)], stored))
}

/// Seeded values uniform in [-a, a].
fn uniform(rng: &mut StdRng, n: usize, a: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-a..=a)).collect()
}

fn config(spec: &GenSpec) -> serde_json::Value {
    let mut c = json!({
        "architectures": [spec.arch],
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_experts_per_tok": spec.top_k,
    });
    let o = c.as_object_mut().expect("an object");
    let family = Family::of(spec.arch).expect("generated families are known");
    let mut set = |k: &str, v: serde_json::Value| {
        o.insert(k.into(), v);
    };
    match family {
        Family::DeepSeek | Family::Glm4Moe => {
            set("n_routed_experts", json!(spec.experts));
            set("n_shared_experts", json!(spec.shared));
            set("moe_intermediate_size", json!(spec.inter));
            set("n_group", json!(1));
            set("topk_group", json!(1));
            set("routed_scaling_factor", json!(2.5));
            set("norm_topk_prob", json!(true));
        }
        Family::Qwen2Moe => {
            set("num_experts", json!(spec.experts));
            set("moe_intermediate_size", json!(spec.inter));
            set(
                "shared_expert_intermediate_size",
                json!(spec.shared * 2 * spec.inter),
            );
            set("norm_topk_prob", json!(false));
        }
        Family::Qwen3Moe => {
            set("num_experts", json!(spec.experts));
            set("moe_intermediate_size", json!(spec.inter));
            set("norm_topk_prob", json!(true));
        }
        Family::Mixtral => {
            set("num_local_experts", json!(spec.experts));
            set("intermediate_size", json!(spec.inter));
        }
    }
    if spec.fp8 {
        set(
            "quantization_config",
            json!({"quant_method": "fp8", "weight_block_size": [128, 128]}),
        );
    }
    if spec.nvfp4 {
        set(
            "quantization_config",
            json!({"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}),
        );
    }
    c
}

/// Writes the checkpoint of `spec` into `dir` (created if needed) from `seed`.
pub fn write(dir: &Path, spec: &GenSpec, seed: u64) -> Result<Generated> {
    write_impl(dir, spec, seed, true)
}

/// As [`write`], without keeping the written values (model-sized checkpoints, for load-rate
/// measurements); the returned experts, router and shared lists are empty.
pub fn write_only(dir: &Path, spec: &GenSpec, seed: u64) -> Result<()> {
    write_impl(dir, spec, seed, false).map(|_| ())
}

fn write_impl(dir: &Path, spec: &GenSpec, seed: u64, keep: bool) -> Result<Generated> {
    let family = Family::of(spec.arch)?;
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let (h, i, e) = (spec.hidden, spec.inter, spec.experts);
    let mut rng = StdRng::seed_from_u64(seed);
    let (a13, a2) = ((3.0 / h as f32).sqrt(), (3.0 / i as f32).sqrt());
    let mut files: Vec<BTreeMap<String, Owned>> =
        (0..spec.shards.max(1)).map(|_| BTreeMap::new()).collect();
    let mut generated = Generated {
        family,
        experts: Vec::new(),
        router: Vec::new(),
        bias: Vec::new(),
        shared: Vec::new(),
    };
    let keep_values = |v: Vec<f32>| if keep { v } else { Vec::new() };
    for layer in 0..spec.layers {
        // Experts in parallel, each from its own seed.
        let made = (0..e)
            .into_par_iter()
            .map(|x| -> Result<_> {
                let mut rng = StdRng::seed_from_u64(
                    seed ^ (((layer as u64) << 32) | x as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                let mut tensors = Vec::new();
                let mut values = Vec::new();
                let projections = [
                    (Proj::Gate, i, h, uniform(&mut rng, i * h, a13)),
                    (Proj::Up, i, h, uniform(&mut rng, i * h, a13)),
                    (Proj::Down, h, i, uniform(&mut rng, h * i, a2)),
                ];
                // NVFP4: one global scale for gate and up (the stacked w13), one for down.
                let amax = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
                let gs13 = amax(&projections[0].3).max(amax(&projections[1].3));
                let gs = [gs13, gs13, amax(&projections[2].3)];
                for ((p, rows, cols, v), amax) in projections.into_iter().zip(gs) {
                    let name = family.expert(layer, x, p);
                    let (t, v) = if spec.nvfp4 {
                        // The scale a loader recovers is 1 / (the stored 1 / gs): quantize
                        // with exactly that value, so the written values are what loads.
                        let inverse = 1.0 / moe_quant::nvfp4_global_scale(amax)?;
                        nvfp4_weight(name, &v, rows, cols, 1.0 / inverse)?
                    } else {
                        weight(name, &v, rows, cols, spec.fp8)?
                    };
                    tensors.extend(t);
                    values.push(keep_values(v));
                }
                let [g, u, d]: [Vec<f32>; 3] = values.try_into().expect("three projections");
                Ok((tensors, [g, u, d]))
            })
            .collect::<Result<Vec<_>>>()?;
        let out = &mut files[layer % spec.shards.max(1)];
        let mut experts = Vec::with_capacity(e);
        for (tensors, values) in made {
            out.extend(tensors);
            experts.push(values);
        }
        if keep {
            generated.experts.push(experts);
        }
        let (r, stored) = bf16(&uniform(&mut rng, e * h, 1.0), &[e, h]);
        out.insert(family.router(layer), r);
        generated.router.push(keep_values(stored));
        let bias = match family.router_bias(layer) {
            Some(name) => {
                let b = uniform(&mut rng, e, 0.1);
                out.insert(
                    name,
                    Owned {
                        dtype: Dtype::F32,
                        shape: vec![e],
                        data: b.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    },
                );
                Some(b)
            }
            None => None,
        };
        generated.bias.push(bias);
        let mut shared = None;
        if spec.shared > 0 {
            let si = match family {
                Family::Qwen2Moe => spec.shared * 2 * i,
                _ => spec.shared * i,
            };
            if let (Some(gn), Some(un), Some(dn)) = (
                family.shared(layer, Proj::Gate),
                family.shared(layer, Proj::Up),
                family.shared(layer, Proj::Down),
            ) {
                let a_s = (3.0 / si as f32).sqrt();
                let mut one = |name, rows, cols, a| -> Result<Vec<f32>> {
                    let values = uniform(&mut rng, rows * cols, a);
                    let (t, v) = if spec.nvfp4 {
                        let amax = values.iter().fold(0f32, |m, x| m.max(x.abs()));
                        let inverse = 1.0 / moe_quant::nvfp4_global_scale(amax)?;
                        nvfp4_weight(name, &values, rows, cols, 1.0 / inverse)?
                    } else {
                        weight(name, &values, rows, cols, spec.fp8)?
                    };
                    out.extend(t);
                    Ok(v)
                };
                let g = one(gn, si, h, a13)?;
                let u = one(un, si, h, a13)?;
                let d = one(dn, h, si, a_s)?;
                shared = Some([g, u, d]);
            }
            if let Some(name) = family.shared_gate(layer) {
                out.insert(name, bf16(&uniform(&mut rng, h, 0.1), &[1, h]).0);
            }
        }
        generated.shared.push(shared);
    }
    let n = files.len();
    let mut weight_map = serde_json::Map::new();
    for (k, tensors) in files.iter().enumerate() {
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        for t in tensors.keys() {
            weight_map.insert(t.clone(), json!(name));
        }
        let path = dir.join(&name);
        safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), None, &path)
            .map_err(|e| io(&path, e))?;
    }
    if n > 1 {
        let path = dir.join(INDEX_FILE);
        let index = json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&index).map_err(|e| io(&path, e))?,
        )
        .map_err(|e| io(&path, e))?;
    }
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&config(spec)).map_err(|e| io(&path, e))?,
    )
    .map_err(|e| io(&path, e))?;
    Ok(generated)
}
