//! The C ABI from C: a program compiled against `include/moe_runner.h` and linked with the
//! shared library runs a checkpoint's layer and gets exactly what the same call gives from
//! Rust, through the router and on routing of its own; its bad calls come back as error codes
//! with messages.

use moe_checkpoint::generate::{self, GenSpec};
use moe_examples::checkpoint_layer::CheckpointLayer;
use moe_examples::plan::{LayerPlan, Parallelism};
use moe_runner::{
    moe_layer_create, moe_layer_destroy, moe_layer_forward, moe_layer_forward_routed, MoeOptions,
    MoeStatus,
};
use moe_runner_core::{DType, Tensor};
use std::ffi::CString;
use std::path::PathBuf;
use std::process::Command;

/// The directory of this test: where `cargo test` builds `libmoe_runner.so` (`target/<profile>/
/// deps`; the copy one level up is only refreshed by `cargo build`), and where a staged copy of
/// the tests for another machine keeps it.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

#[test]
fn a_c_program_runs_a_layer_like_rust_does() {
    let dir = std::env::temp_dir().join(format!("moe-capi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = GenSpec {
        arch: "Qwen3MoeForCausalLM",
        layers: 1,
        experts: 8,
        hidden: 256,
        inter: 128,
        top_k: 2,
        shared: 0,
        fp8: false,
        nvfp4: false,
        shards: 1,
    };
    let ckpt = dir.join("ckpt");
    generate::write(&ckpt, &spec, 5).unwrap();
    let tokens = 7usize;
    let hidden: Vec<u8> = (0..tokens * 256)
        .flat_map(|i| half::bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 40.0).to_le_bytes())
        .collect();
    let logits: Vec<f32> = (0..tokens * 8)
        .map(|i| ((i * 13 % 17) as f32 - 8.0) / 4.0)
        .collect();
    std::fs::write(dir.join("hidden.bin"), &hidden).unwrap();
    std::fs::write(
        dir.join("logits.bin"),
        logits
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();

    // The checkpoint's router on those logits, for the routed entry point: with no shared
    // experts it must give exactly what the whole layer gives.
    let ck = CheckpointLayer::open(&ckpt, None).unwrap();
    let mut plan = LayerPlan::new(
        &ck.spec,
        Parallelism {
            tp: 1,
            ep: 1,
            fuse_shared: false,
        },
        0,
    )
    .unwrap();
    ck.router(&mut plan).unwrap();
    let topk = plan
        .router
        .route(&Tensor::from_slice(&logits, &[tokens, 8], DType::F32).unwrap())
        .unwrap();
    let ids = topk.ids.as_slice::<i32>().unwrap().to_vec();
    let weights = topk.weights.as_slice::<f32>().unwrap().to_vec();
    std::fs::write(
        dir.join("ids.bin"),
        ids.iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    std::fs::write(
        dir.join("weights.bin"),
        weights
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();

    // The same calls from Rust.
    let mut want = vec![0u8; tokens * 256 * 2];
    let mut routed = vec![0u8; tokens * 256 * 2];
    let c_dir = CString::new(ckpt.to_str().unwrap()).unwrap();
    let runner = CString::new("reference").unwrap();
    let opts = MoeOptions {
        max_tokens: 64,
        runner: runner.as_ptr(),
        ..Default::default()
    };
    let mut layer = std::ptr::null_mut();
    // SAFETY: valid strings, options and out pointer; buffers of the sizes the layer expects.
    unsafe {
        assert_eq!(
            moe_layer_create(c_dir.as_ptr(), &opts, &mut layer),
            MoeStatus::Ok
        );
        assert_eq!(
            moe_layer_forward(
                layer,
                hidden.as_ptr().cast(),
                logits.as_ptr(),
                want.as_mut_ptr().cast(),
                tokens as i64
            ),
            MoeStatus::Ok
        );
        assert_eq!(
            moe_layer_forward_routed(
                layer,
                hidden.as_ptr().cast(),
                ids.as_ptr(),
                weights.as_ptr(),
                routed.as_mut_ptr().cast(),
                tokens as i64
            ),
            MoeStatus::Ok
        );
        moe_layer_destroy(layer);
        let bad = CString::new("no_such_runner").unwrap();
        let opts = MoeOptions {
            runner: bad.as_ptr(),
            ..opts
        };
        let mut other = std::ptr::null_mut();
        assert_eq!(
            moe_layer_create(c_dir.as_ptr(), &opts, &mut other),
            MoeStatus::NoPath
        );
    }
    assert!(want.iter().any(|&b| b != 0));
    assert_eq!(routed, want, "routed entry point on the router's choice");

    let exe = dir.join("smoke");
    let lib = lib_dir();
    // The crate's sources: where cargo built this test, else `capi/` under the current
    // directory (a copy of the tree on another machine, run from its root).
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let manifest = if built.is_dir() {
        built
    } else {
        PathBuf::from("capi")
    };
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = Command::new(&cc)
        .arg(manifest.join("tests/c/smoke.c"))
        .arg("-I")
        .arg(manifest.join("include"))
        .arg("-L")
        .arg(&lib)
        .arg("-lmoe_runner")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-Wall")
        .arg("-Werror")
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler `{cc}`: {e}"));
    assert!(
        built.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    // Cargo's LD_LIBRARY_PATH also names target/<profile>, whose copy of the library only
    // `cargo build` refreshes; point the loader at the one this test was built with.
    let ran = Command::new(&exe)
        .env("LD_LIBRARY_PATH", &lib)
        .arg(&ckpt)
        .arg(dir.join("hidden.bin"))
        .arg(dir.join("logits.bin"))
        .arg(tokens.to_string())
        .arg(dir.join("out.bin"))
        .arg(dir.join("ids.bin"))
        .arg(dir.join("weights.bin"))
        .arg(dir.join("routed.bin"))
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "the C program failed ({:?}):\n{}",
        ran.status,
        String::from_utf8_lossy(&ran.stderr)
    );
    assert_eq!(std::fs::read(dir.join("out.bin")).unwrap(), want);
    assert_eq!(std::fs::read(dir.join("routed.bin")).unwrap(), want);
    let _ = std::fs::remove_dir_all(&dir);
}
