//! Command-line arguments. Counts that must be positive are `NonZeroUsize`, so clap rejects a
//! zero with its own message before anything runs.

use clap::{Args, Parser, Subcommand};
use std::num::NonZeroUsize;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "moe",
    version,
    about = "Mixture-of-Experts runner: list registered backends, run one MoE layer"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the registered a2a backends, dispatch formats, runners, paths and quant schemes.
    List(ListArgs),
    /// Run one MoE layer on seeded synthetic weights, time it and compare it with the reference.
    Run(RunArgs),
    /// Time the triton runner on the GPU against the floor and the PyTorch peers.
    Bench(BenchArgs),
    /// Search the triton runner's tiles per batch size on the GPU and write a tuned-config file.
    Tune(TuneArgs),
    /// Write a small checkpoint (config.json, safetensors) in a family's exact layout.
    GenCheckpoint(GenCheckpointArgs),
    /// Time the deepep_ll all-to-all over this process's GPUs (dispatch, combine, whole layer).
    BenchA2a(A2aBenchArgs),
    /// Time MegaMoE against the unfused expert-parallel path on the same routing (GPU).
    BenchMega(MegaBenchArgs),
}

#[derive(Debug, Args)]
pub struct MegaBenchArgs {
    /// Ranks, one per GPU (DeepSeek-V3's 256 experts split evenly).
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Tokens per rank.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64,128")]
    pub tokens: Vec<usize>,
    /// Timed graph replays per batch size.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Also write the table as markdown here.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GenCheckpointArgs {
    /// `architectures[0]`: DeepseekV3ForCausalLM, Glm4MoeForCausalLM, Qwen2MoeForCausalLM,
    /// Qwen3MoeForCausalLM, MixtralForCausalLM, ...
    #[arg(long, default_value = "Qwen3MoeForCausalLM")]
    pub arch: String,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 16)]
    pub experts: usize,
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    #[arg(long, default_value_t = 256)]
    pub inter: usize,
    #[arg(long, default_value_t = 4)]
    pub top_k: usize,
    /// Shared experts (for the families that have them).
    #[arg(long, default_value_t = 0)]
    pub shared: usize,
    /// FP8 E4M3 weights with 128x128 block scales.
    #[arg(long, conflicts_with = "nvfp4")]
    pub fp8: bool,
    /// NVFP4 routed experts in NVIDIA ModelOpt's layout (E2M1 codes, E4M3 scales per 16,
    /// global scales).
    #[arg(long)]
    pub nvfp4: bool,
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory to write.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct A2aBenchArgs {
    /// Ranks, one per GPU (ranks share GPUs when there are fewer).
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Tokens per rank.
    #[arg(long, value_delimiter = ',', default_value = "128,4096")]
    pub tokens: Vec<usize>,
    #[arg(long, default_value_t = 7168)]
    pub hidden: usize,
    /// Expert intermediate size (for --layer).
    #[arg(long, default_value_t = 2048)]
    pub inter: usize,
    #[arg(long, default_value_t = 256)]
    pub experts: usize,
    #[arg(long, default_value_t = 8)]
    pub top_k: usize,
    /// Dispatch wire format: fp8, fp8-ue8m0, nvfp4 or bf16 (the combine sends bf16).
    #[arg(long, default_value = "fp8")]
    pub wire: String,
    /// Also time the whole layer: dispatch, masked_gemm with FP8 block weights, combine.
    #[arg(long)]
    pub layer: bool,
    /// Timed iterations.
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    /// Also write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Shapes as NAME:SCHEME (names: deepseek-v3, qwen3-30b-a3b, mixtral-8x7b).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "deepseek-v3:fp8-block-128x128,deepseek-v3:bf16,qwen3-30b-a3b:bf16,mixtral-8x7b:bf16"
    )]
    pub shapes: Vec<String>,
    /// Batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,512,4096")]
    pub tokens: Vec<usize>,
    /// JSON written by scripts/bench_peers.py in the same session (tensor-core rates, peers).
    #[arg(long, value_name = "peers.json")]
    pub peers: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
    /// Also write the table as markdown here (the form BENCHMARKS.md uses).
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Timed graph replays per batch size.
    #[arg(long, default_value_t = 15)]
    pub iters: usize,
    /// Instead: MegaMoE beside the unfused expert-parallel path on one GPU at DeepSeek-V3
    /// expert shapes, for --tokens (`moe bench-mega` takes more ranks).
    #[arg(long)]
    pub megamoe: bool,
}

#[derive(Debug, Args)]
pub struct TuneArgs {
    /// Built-in model (see `moe run --help`).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// A Hugging Face config.json; overrides --preset.
    #[arg(long, value_name = "config.json")]
    pub config: Option<PathBuf>,
    /// Quant scheme [default: the model's own].
    #[arg(long = "dtype", value_name = "SCHEME")]
    pub scheme: Option<String>,
    #[arg(long, default_value = "1")]
    pub tp: NonZeroUsize,
    #[arg(long, default_value = "1")]
    pub ep: NonZeroUsize,
    #[arg(long)]
    pub no_shared_fusion: bool,
    /// Batch sizes to tune.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,512,4096")]
    pub tokens: Vec<usize>,
    /// Timed replays per candidate.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Directory the JSON file is written to.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Built-in model: tiny, qwen3-30b-a3b, mixtral-8x7b, deepseek-v3, deepseek-v4-flash.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// A Hugging Face config.json; overrides --preset.
    #[arg(long, value_name = "config.json")]
    pub config: Option<PathBuf>,
    /// Tokens in the batch [default: 64 for tiny, 16 otherwise].
    #[arg(long, value_name = "M")]
    pub tokens: Option<usize>,
    /// Quant scheme (see `moe list`) [default: the model's own, else bf16].
    #[arg(long, value_name = "NAME")]
    pub scheme: Option<String>,
    /// A registered runner, or `auto` for the preferred one on the best device.
    #[arg(long, value_name = "NAME|auto", default_value = "auto")]
    pub runner: String,
    /// The a2a backend (dispatcher): `standard`, `local_masked` (the DeepEP low-latency layout
    /// on the CPU) or `deepep_ll` (the GPU all-to-all; with --ep N it runs all N ranks, one per
    /// GPU).
    #[arg(long, value_name = "NAME", default_value = "standard")]
    pub a2a: String,
    /// With `--a2a deepep_ll --ep N`: one process per rank (this command starts them and
    /// checks their outputs) instead of every rank in this process.
    #[arg(long)]
    pub procs: bool,
    /// How rank processes (`--procs`) exchange rows: `ipc` (CUDA IPC, GPUs of one machine) or
    /// `nccl` (NCCL send/receive, as ranks on different machines do).
    #[arg(long, value_name = "ipc|nccl", default_value = "ipc")]
    pub transport: String,
    /// Tensor parallelism: divides the intermediate sizes.
    #[arg(long, value_name = "N", default_value = "1")]
    pub tp: NonZeroUsize,
    /// Expert parallelism: rank 0 holds and runs the first E/N routed experts (with the
    /// deepep_ll a2a, every rank runs).
    #[arg(long, value_name = "N", default_value = "1")]
    pub ep: NonZeroUsize,
    /// Seed of the synthetic weights, inputs and router bias.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Timed forward passes after one warm-up.
    #[arg(long, value_name = "N", default_value = "3")]
    pub iters: NonZeroUsize,
    /// Print one JSON object instead of text (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// Run DeepSeek / GLM shared experts as a separate MLP instead of as extra routed experts.
    #[arg(long)]
    pub no_shared_fusion: bool,
    /// A Hugging Face checkpoint directory (config.json and safetensors): run one of its MoE
    /// layers with its weights and router instead of synthetic ones.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// The checkpoint's decoder layer [default: the first with routed experts].
    #[arg(long, value_name = "L", requires = "checkpoint")]
    pub layer: Option<usize>,
    /// Run every MoE layer of the checkpoint as a stack (with residuals) through every
    /// registered path for its scheme, each against the reference.
    #[arg(long, requires = "checkpoint", conflicts_with = "layer")]
    pub stack: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_of_batch_sizes_and_shapes_parse() {
        let cli = Cli::try_parse_from([
            "moe",
            "bench",
            "--tokens",
            "1,64",
            "--shapes",
            "qwen3-30b-a3b:bf16",
        ])
        .unwrap();
        match cli.command {
            Command::Bench(b) => {
                assert_eq!(b.tokens, vec![1, 64]);
                assert_eq!(b.shapes, vec!["qwen3-30b-a3b:bf16".to_string()]);
            }
            other => panic!("parsed as {other:?}"),
        }
        let cli = Cli::try_parse_from([
            "moe",
            "tune",
            "--preset",
            "deepseek-v3",
            "--dtype",
            "fp8-block-128x128",
        ])
        .unwrap();
        assert!(
            matches!(cli.command, Command::Tune(t) if t.tokens == vec![1, 8, 64, 512, 4096] && t.scheme.as_deref() == Some("fp8-block-128x128"))
        );
        assert!(Cli::try_parse_from(["moe", "bench", "--tokens", "1,x"]).is_err());
    }
}
