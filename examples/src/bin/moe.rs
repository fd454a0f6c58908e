//! The `moe` command: `moe list` and `moe run`. Errors print one line on stderr and exit 1;
//! clap's own usage errors exit 2. A reader closing stdout early ends the output quietly.

use clap::Parser;
use moe_examples::cli::{Cli, Command};
use moe_examples::{link_backends, list, run};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    link_backends();
    let cli = Cli::parse();
    // RUST_LOG selects spans and events (e.g. RUST_LOG=moe_runner_core=info); warnings by default.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut out = std::io::stdout().lock();
    let result = match &cli.command {
        Command::List(args) => list::list(args, &mut out),
        Command::Run(args) => run::run(args, &mut out),
        Command::GenCheckpoint(args) => {
            moe_examples::checkpoint_layer::gen_checkpoint(args, &mut out)
        }
        #[cfg(feature = "cuda")]
        Command::Bench(args) => moe_examples::bench::bench(args, &mut out),
        #[cfg(feature = "cuda")]
        Command::Tune(args) => moe_examples::tune::tune(args, &mut out),
        #[cfg(feature = "cuda")]
        Command::BenchA2a(args) => moe_examples::a2a_bench::bench_a2a(args, &mut out),
        #[cfg(feature = "cuda")]
        Command::BenchMega(args) => moe_examples::mega_bench::bench_mega(args, &mut out),
        #[cfg(not(feature = "cuda"))]
        Command::Bench(_) | Command::Tune(_) | Command::BenchA2a(_) | Command::BenchMega(_) => {
            Err(moe_runner_core::MoeError::NoCuda("this build has no `cuda` feature".into()).into())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
