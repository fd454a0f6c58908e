//! The command line's one error type. Every bad input ends here with what was expected and what
//! came, so `moe` prints one line and exits non-zero instead of panicking.

use moe_runner_core::MoeError;
use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = CliError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Anything the runner stack rejects (unknown runner, missing path, bad shapes).
    #[error(transparent)]
    Moe(#[from] MoeError),

    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{origin} is not valid JSON: {source}")]
    Json {
        origin: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("writing the output: {0}")]
    Write(#[from] std::io::Error),

    #[error("encoding the JSON output: {0}")]
    Encode(#[from] serde_json::Error),

    #[error("{origin}: missing field `{field}`, which {arch} needs")]
    MissingField {
        origin: String,
        arch: String,
        field: &'static str,
    },

    #[error("{origin}: field `{field}` should be {expected}, got {got}")]
    FieldType {
        origin: String,
        field: &'static str,
        expected: &'static str,
        got: String,
    },

    #[error("{origin}: unknown architecture `{name}`; known: {known}")]
    UnknownArchitecture {
        origin: String,
        name: String,
        known: String,
    },

    #[error("unknown preset `{name}`; known: {known}")]
    UnknownPreset { name: String, known: String },

    #[error("unknown quant scheme `{name}`; known: {known}")]
    UnknownScheme { name: String, known: String },

    #[error("{option} {value} does not divide the {what} {size}")]
    NotDivisible {
        option: &'static str,
        value: usize,
        what: &'static str,
        size: usize,
    },

    #[error(
        "the weights need {need_gb:.1} GB of host memory but {available_gb:.1} GB is available; \
         hold fewer experts with --ep N, use a smaller --scheme (e.g. fp8-block-128x128), \
         or run on a machine with more memory or a GPU"
    )]
    OutOfMemory { need_gb: f64, available_gb: f64 },
}

impl CliError {
    /// Whether stdout was closed by its reader (`moe list | head`): not a failure of `moe`.
    pub fn is_broken_pipe(&self) -> bool {
        let pipe = Some(std::io::ErrorKind::BrokenPipe);
        match self {
            CliError::Write(e) => Some(e.kind()) == pipe,
            CliError::Encode(e) => e.io_error_kind() == pipe,
            _ => false,
        }
    }
}
