//! End to end: writes a small DeepSeek-V3-layout checkpoint (FP8 128x128 blocks, a shared
//! expert, three MoE layers) and runs it as a stack (router, experts, shared experts, residual)
//! through every registered path for its scheme on this machine, each against the reference.
//! `cargo run --release --bin e2e [-- ARCH [--bf16]]`.

use moe_checkpoint::generate::{self, GenSpec};
use moe_checkpoint::ARCHITECTURES;
use std::process::ExitCode;

fn main() -> ExitCode {
    moe_examples::run_example(run)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arch = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or("DeepseekV3ForCausalLM", |a| a.as_str());
    let arch = ARCHITECTURES
        .iter()
        .map(|(a, _)| *a)
        .find(|a| *a == arch)
        .ok_or_else(|| format!("unknown architecture {arch}"))?;
    let fp8 = !args.iter().any(|a| a == "--bf16") && arch.starts_with("Deepseek");
    let dir = std::env::temp_dir().join(format!("moe-e2e-{}", std::process::id()));
    let spec = GenSpec {
        arch,
        layers: 3,
        experts: 16,
        hidden: 1024,
        inter: 512,
        top_k: 4,
        shared: 1,
        fp8,
        nvfp4: false,
        shards: 2,
    };
    generate::write(&dir, &spec, 1)?;
    println!(
        "{arch}: 3 MoE layers of 16 experts, H=1024, I=512, {}",
        if fp8 { "FP8 blocks" } else { "bf16" }
    );
    let rows = moe_examples::stack::run_all(&dir, 32, 7)?;
    let scheme = moe_examples::checkpoint_layer::CheckpointLayer::open(&dir, None)?.scheme;
    let result = moe_examples::stack::print(
        &rows,
        moe_conformance::suite::tolerance(scheme),
        false,
        &mut std::io::stdout(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(result?)
}
