//! Checkpoints written in each family's exact layout load back into the runners' layout with
//! the values that were written: every expert of this rank under expert parallelism, this
//! rank's slice under tensor parallelism, bf16 and FP8 block; and bad checkpoints are errors
//! naming the tensor or file.

use moe_checkpoint::generate::{self, GenSpec};
use moe_checkpoint::{load_experts, load_router, load_shared, Checkpoint, ExpertSlice, Family};
use moe_runner_core::{as_expert_weights, MoeError, Nvfp4Weights, Proj, QuantScheme};
use std::path::PathBuf;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("moe-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn spec(arch: &'static str, fp8: bool, shards: usize) -> GenSpec {
    GenSpec {
        arch,
        layers: 2,
        experts: 8,
        hidden: 256,
        inter: 256,
        top_k: 2,
        shared: 1,
        fp8,
        nvfp4: false,
        shards,
    }
}

/// Expert `x` of the loaded weights equals the written gate, up and down, sliced for
/// tensor-parallel rank `tp.0` of `tp.1`.
fn check_expert(
    w: &dyn moe_runner_core::QuantInfo,
    local: usize,
    written: &[Vec<f32>; 3],
    (h, i): (usize, usize),
    tp: (usize, usize),
) {
    let il = i / tp.1;
    let ew = as_expert_weights(w).unwrap();
    let mut w13 = vec![0f32; 2 * il * h];
    let mut w2 = vec![0f32; h * il];
    ew.dequantize_expert(Proj::W13, local, &mut w13).unwrap();
    ew.dequantize_expert(Proj::W2, local, &mut w2).unwrap();
    let r0 = tp.0 * il;
    assert_eq!(
        &w13[..il * h],
        &written[0][r0 * h..(r0 + il) * h],
        "gate rows"
    );
    assert_eq!(
        &w13[il * h..],
        &written[1][r0 * h..(r0 + il) * h],
        "up rows"
    );
    for r in 0..h {
        assert_eq!(
            &w2[r * il..(r + 1) * il],
            &written[2][r * i + r0..r * i + r0 + il],
            "down row {r}"
        );
    }
}

#[test]
fn every_family_loads_what_was_written() {
    for (arch, fp8, shards) in [
        ("DeepseekV3ForCausalLM", true, 2),
        ("DeepseekV3ForCausalLM", false, 1),
        ("Glm4MoeForCausalLM", false, 2),
        ("Qwen2MoeForCausalLM", false, 1),
        ("Qwen3MoeForCausalLM", false, 3),
        ("MixtralForCausalLM", false, 2),
    ] {
        let d = dir(&format!("{arch}-{fp8}"));
        let s = spec(arch, fp8, shards);
        let written = generate::write(&d, &s, 7).unwrap();
        let ck = Checkpoint::open(&d).unwrap();
        let family = Family::of(arch).unwrap();
        // Expert-parallel rank 1 of 2, layer 1; and tensor-parallel rank 1 of 2 of all experts.
        for (experts, tp) in [(4..8, (0, 1)), (0..8, (1, 2))] {
            let slice = ExpertSlice {
                layer: 1,
                experts: experts.clone(),
                hidden: s.hidden,
                inter: s.inter,
                tp,
            };
            let w = load_experts(&ck, family, &slice, &|_| {}).unwrap();
            let scheme = if fp8 {
                QuantScheme::Fp8Block128
            } else {
                QuantScheme::Bf16
            };
            assert_eq!(w.scheme(), scheme, "{arch}");
            for (local, x) in experts.enumerate() {
                check_expert(
                    w.as_ref(),
                    local,
                    &written.experts[1][x],
                    (s.hidden, s.inter),
                    tp,
                );
            }
        }
        let r = load_router(&ck, family, 1, s.experts, s.hidden).unwrap();
        assert_eq!(r.weight, written.router[1]);
        assert_eq!(r.bias, written.bias[1]);
        let shared = load_shared(&ck, family, 1, s.hidden).unwrap();
        match (&shared, &written.shared[1]) {
            (Some(got), Some([g, u, d])) => {
                assert_eq!(&got.w13[..g.len()], &g[..], "{arch} shared gate");
                assert_eq!(&got.w13[g.len()..], &u[..], "{arch} shared up");
                assert_eq!(&got.w2, d, "{arch} shared down");
                assert_eq!(got.gate.is_some(), family == Family::Qwen2Moe);
            }
            (None, None) => {}
            _ => panic!(
                "{arch}: shared experts loaded {} / written {}",
                shared.is_some(),
                written.shared[1].is_some()
            ),
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// ModelOpt NVFP4 checkpoints: this rank's experts and tensor-parallel slice, the packed codes,
/// scales and global scales give back exactly the values written; broken scales are errors
/// naming the tensor.
#[test]
fn nvfp4_checkpoints_load_what_was_written() {
    for arch in ["DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM"] {
        let d = dir(&format!("nvfp4-{arch}"));
        let s = GenSpec {
            nvfp4: true,
            ..spec(arch, false, 2)
        };
        let written = generate::write(&d, &s, 9).unwrap();
        let ck = Checkpoint::open(&d).unwrap();
        let family = Family::of(arch).unwrap();
        for (experts, tp) in [(4..8, (0, 1)), (0..8, (1, 2))] {
            let slice = ExpertSlice {
                layer: 1,
                experts: experts.clone(),
                hidden: s.hidden,
                inter: s.inter,
                tp,
            };
            let w = load_experts(&ck, family, &slice, &|_| {}).unwrap();
            assert_eq!(w.scheme(), QuantScheme::Nvfp4, "{arch}");
            let q = moe_runner_core::downcast_quant::<Nvfp4Weights>(w.as_ref()).unwrap();
            let input = moe_quant::nvfp4_global_scale(generate::NVFP4_INPUT_AMAX).unwrap();
            assert!(q.a13_global.iter().all(|&g| (g / input - 1.0).abs() < 1e-6));
            for (local, x) in experts.enumerate() {
                check_expert(
                    w.as_ref(),
                    local,
                    &written.experts[1][x],
                    (s.hidden, s.inter),
                    tp,
                );
            }
        }
        // Shared experts (DeepSeek's), dequantized for the CPU MLP.
        let shared = load_shared(&ck, family, 1, s.hidden).unwrap();
        match (&shared, &written.shared[1]) {
            (Some(got), Some([g, u, d])) => {
                assert_eq!(&got.w13[..g.len()], &g[..], "{arch} shared gate");
                assert_eq!(&got.w13[g.len()..], &u[..], "{arch} shared up");
                assert_eq!(&got.w2, d, "{arch} shared down");
            }
            (None, None) => {}
            _ => panic!("{arch}: shared experts loaded {}", shared.is_some()),
        }
        drop(ck);
        // A zero global scale, then a scale of the wrong dtype: errors naming the tensor.
        let base = Family::of(arch)
            .unwrap()
            .expert(1, 3, moe_checkpoint::Proj::Down);
        let names = moe_checkpoint::arch::Nvfp4Names::of(&base);
        for (name, bad) in [(&names.scale_2, "zero"), (&names.scale, "dtype")] {
            let d2 = dir(&format!("nvfp4-bad-{arch}-{bad}"));
            generate::write(&d2, &s, 9).unwrap();
            rewrite_tensor(&d2, name, bad);
            let ck = Checkpoint::open(&d2).unwrap();
            let slice = ExpertSlice {
                layer: 1,
                experts: 0..8,
                hidden: s.hidden,
                inter: s.inter,
                tp: (0, 1),
            };
            let Err(err) = load_experts(&ck, family, &slice, &|_| {}) else {
                panic!("{arch}: a broken {bad} scale loaded");
            };
            let err = err.to_string();
            assert!(err.contains(name.as_str()), "{arch} {bad}: {err}");
            let _ = std::fs::remove_dir_all(&d2);
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// Rewrites tensor `name` in the checkpoint at `d`: `zero` stores 0 in it, `dtype` stores its
/// bytes as another dtype (U8).
fn rewrite_tensor(d: &std::path::Path, name: &str, how: &str) {
    use safetensors::tensor::{Dtype, TensorView};
    for entry in std::fs::read_dir(d).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        if !st.names().contains(&name) {
            continue;
        }
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
            .collect();
        for t in owned.iter_mut().filter(|t| t.0 == name) {
            match how {
                "zero" => t.3.iter_mut().for_each(|b| *b = 0),
                _ => t.1 = Dtype::U8,
            }
        }
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(n, dt, sh, data)| (n.clone(), TensorView::new(*dt, sh.clone(), data).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &path).unwrap();
    }
}

#[test]
fn bad_checkpoints_name_what_is_wrong() {
    let d = dir("bad");
    let s = spec("Qwen3MoeForCausalLM", false, 1);
    generate::write(&d, &s, 3).unwrap();
    let ck = Checkpoint::open(&d).unwrap();
    let slice = |layer, hidden| ExpertSlice {
        layer,
        experts: 0..8,
        hidden,
        inter: 256,
        tp: (0, 1),
    };
    // A layer the checkpoint does not have: the missing tensor is named.
    let e = load_experts(&ck, Family::Qwen3Moe, &slice(5, 256), &|_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("model.layers.5.mlp.experts.0.gate_proj.weight") && e.contains("missing"),
        "{e}"
    );
    // Dimensions that do not match the tensors: shape error naming the tensor.
    let e = load_experts(&ck, Family::Qwen3Moe, &slice(0, 512), &|_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("gate_proj.weight") && e.contains("shape"), "{e}");
    // A tensor parallelism that does not divide I.
    let bad_tp = ExpertSlice {
        tp: (0, 3),
        ..slice(0, 256)
    };
    assert!(matches!(
        load_experts(&ck, Family::Qwen3Moe, &bad_tp, &|_| {}),
        Err(MoeError::Invalid { .. })
    ));
    drop(ck);
    // A truncated file and a corrupt header: errors naming the file.
    let file = d.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = Checkpoint::open(&d).err().unwrap().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
    let mut corrupt = bytes.clone();
    corrupt[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&file, &corrupt).unwrap();
    let e = Checkpoint::open(&d).err().unwrap().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    // No files at all.
    std::fs::remove_file(&file).unwrap();
    let e = Checkpoint::open(&d).err().unwrap().to_string();
    assert!(e.contains("no safetensors files"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn wrong_dtypes_are_named() {
    let d = dir("dtype");
    generate::write(&d, &spec("MixtralForCausalLM", false, 1), 4).unwrap();
    let ck = Checkpoint::open(&d).unwrap();
    // The router's bias is absent for Mixtral; asking DeepSeek names for it reports a missing tensor.
    let e = load_router(&ck, Family::DeepSeek, 0, 8, 256)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.layers.0.mlp.gate.weight"), "{e}");
    // Router weights read as expert weights: a shape error names the tensor.
    let e = load_router(&ck, Family::Mixtral, 0, 16, 256)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("block_sparse_moe.gate.weight") && e.contains("[8, 256]"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// The direct path (mapped file to pinned staging to GPU) places the same values as the host
/// loader: an expert-parallel slice and a tensor-parallel slice, bf16, FP8 with scales, and
/// NVFP4 (loaded on the host, then moved).
#[test]
#[ignore = "needs a CUDA device"]
fn experts_load_straight_into_gpu_memory() {
    use moe_runner_core::{quant_to_device, Device};
    let Device::Cuda(dev) = Device::cuda(0).expect("this test needs a CUDA device") else {
        unreachable!("Device::cuda gives a CUDA device")
    };
    for (arch, fp8, nvfp4) in [
        ("DeepseekV3ForCausalLM", true, false),
        ("Qwen3MoeForCausalLM", false, false),
        ("Qwen3MoeForCausalLM", false, true),
    ] {
        let d = dir(&format!("device-{arch}-{nvfp4}"));
        let s = GenSpec {
            nvfp4,
            ..spec(arch, fp8, 2)
        };
        let written = generate::write(&d, &s, 11).unwrap();
        let ck = Checkpoint::open(&d).unwrap();
        let family = Family::of(arch).unwrap();
        for (experts, tp) in [(4..8, (0, 1)), (0..8, (1, 2))] {
            let slice = ExpertSlice {
                layer: 1,
                experts: experts.clone(),
                hidden: s.hidden,
                inter: s.inter,
                tp,
            };
            let on_gpu =
                moe_checkpoint::load_experts_to_device(&ck, family, &slice, &dev, &|_| {}).unwrap();
            let back = quant_to_device(on_gpu.as_ref(), &Device::cpu()).unwrap();
            assert_eq!(back.scheme(), on_gpu.scheme(), "{arch}");
            for (local, x) in experts.enumerate() {
                check_expert(
                    back.as_ref(),
                    local,
                    &written.experts[1][x],
                    (s.hidden, s.inter),
                    tp,
                );
            }
        }
        let _ = std::fs::remove_dir_all(&d);
    }
}
