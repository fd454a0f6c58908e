//! `moe run --checkpoint DIR` on checkpoints written in each family's layout: the layer runs
//! with the checkpoint's experts, router and shared experts, and agrees with the reference.

use clap::Parser;
use moe_checkpoint::generate::{self, GenSpec};
use moe_examples::cli::{Cli, Command};

fn run_json(args: &[&str]) -> serde_json::Value {
    moe_examples::link_backends();
    let cli = Cli::try_parse_from(args).unwrap();
    let Command::Run(run) = cli.command else {
        panic!("not a run command")
    };
    let mut out = Vec::new();
    moe_examples::run::run(&run, &mut out).unwrap();
    serde_json::from_slice(&out).unwrap()
}

#[test]
fn checkpoint_layers_run_and_match_the_reference() {
    for (arch, want_scheme, shared) in [
        ("DeepseekV3ForCausalLM", "fp8-block-128x128", 1),
        ("Qwen2MoeForCausalLM", "bf16", 1),
        ("MixtralForCausalLM", "bf16", 0),
        ("Qwen3MoeForCausalLM", "nvfp4", 0),
    ] {
        let dir = std::env::temp_dir().join(format!("moe-run-ckpt-{}-{arch}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = GenSpec {
            arch,
            layers: 2,
            experts: 8,
            hidden: 256,
            inter: 256,
            top_k: 2,
            shared,
            fp8: want_scheme.starts_with("fp8"),
            nvfp4: want_scheme == "nvfp4",
            shards: 2,
        };
        generate::write(&dir, &spec, 11).unwrap();
        let d = dir.to_str().unwrap();
        // The CPU reference runner in the masked format, so the comparison is a real one.
        let report = run_json(&[
            "moe",
            "run",
            "--checkpoint",
            d,
            "--layer",
            "1",
            "--tokens",
            "9",
            "--json",
            "--runner",
            "reference",
            "--a2a",
            "local_masked",
            "--iters",
            "1",
        ]);
        let scheme = report["shape"]["scheme"].as_str().unwrap();
        assert_eq!(scheme, want_scheme, "{arch}");
        assert_eq!(
            report["shape"]["shared_experts"].as_u64().unwrap(),
            shared as u64
        );
        let err = report["error_vs_reference"]["rel_l2"].as_f64().unwrap();
        assert!(err < 3e-2, "{arch}: rel L2 {err}");
        let notes = report["notes"].to_string();
        assert!(notes.contains("layer 1 of checkpoint"), "{arch}: {notes}");
        // Expert parallelism: rank 0's half of the experts.
        let report = run_json(&[
            "moe",
            "run",
            "--checkpoint",
            d,
            "--ep",
            "2",
            "--tokens",
            "5",
            "--json",
            "--iters",
            "1",
        ]);
        assert_eq!(
            report["shape"]["local_experts"].as_u64().unwrap(),
            4,
            "{arch}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn checkpoint_stacks_agree_through_every_path() {
    for (arch, fp8, nvfp4) in [
        ("Qwen2MoeForCausalLM", false, false),
        ("DeepseekV3ForCausalLM", true, false),
        ("Qwen3MoeForCausalLM", false, true),
    ] {
        let dir = std::env::temp_dir().join(format!("moe-stack-{}-{arch}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let spec = GenSpec {
            arch,
            layers: 3,
            experts: 8,
            hidden: 256,
            inter: 256,
            top_k: 2,
            shared: 1,
            fp8,
            nvfp4,
            shards: 1,
        };
        generate::write(&dir, &spec, 13).unwrap();
        let rows = run_json(&[
            "moe",
            "run",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--stack",
            "--tokens",
            "6",
            "--json",
        ]);
        let rows = rows.as_array().unwrap();
        // Both CPU paths (standard and masked) at least, more on a GPU machine.
        assert!(rows.len() >= 2, "{arch}: {rows:?}");
        for r in rows {
            assert_eq!(r["layers"].as_u64().unwrap(), 3);
            assert!(r["rel_l2"].as_f64().unwrap() < 3e-2, "{arch}: {r}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
