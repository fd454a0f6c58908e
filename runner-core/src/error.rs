//! The typed error of the whole runner stack. Every user-facing check returns one of these
//! variants with what was expected and what came, so an engine can report it verbatim.

use crate::{DType, DispatchFormat, QuantScheme};

/// Result alias used across the workspace.
pub type Result<T, E = MoeError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum MoeError {
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    Shape {
        what: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("dtype mismatch for {what}: expected one of {expected:?}, got {got:?}")]
    DType {
        what: String,
        expected: Vec<DType>,
        got: DType,
    },
    #[error("{what} = {value} must be a multiple of {divisor}")]
    NotDivisible {
        what: String,
        value: usize,
        divisor: usize,
    },
    #[error("invalid config: {0}")]
    Config(String),
    #[error("invalid argument {what}: {msg}")]
    Invalid { what: String, msg: String },
    #[error(
        "expert id {id} at row {row}, slot {slot} is out of range: expected -1 or 0..{num_experts}"
    )]
    ExpertIdOutOfRange {
        id: i32,
        row: usize,
        slot: usize,
        num_experts: usize,
    },
    #[error("{got} tokens exceed the maximum of {max} this {what} was sized for")]
    TooManyTokens {
        what: String,
        max: usize,
        got: usize,
    },
    #[error("dispatch format mismatch: {runner} expects {expected}, got {got}")]
    FormatMismatch {
        runner: String,
        expected: DispatchFormat,
        got: DispatchFormat,
    },
    #[error("quant info mismatch: expected {expected}, got {got}")]
    QuantMismatch { expected: String, got: String },
    #[error("runner `{runner}` does not support quant scheme {scheme} for format {format}; supported: {supported}")]
    UnsupportedScheme {
        runner: String,
        format: DispatchFormat,
        scheme: QuantScheme,
        supported: String,
    },
    #[error("no path for runner `{runner}` with format {format} and scheme {scheme}; registered: {registered}")]
    NoPath {
        runner: String,
        format: DispatchFormat,
        scheme: QuantScheme,
        registered: String,
    },
    #[error("unknown {kind} `{name}`; known: {known}")]
    Unknown {
        kind: &'static str,
        name: String,
        known: String,
    },
    #[error("kernel `{name}` failed to build: {log}")]
    Kernel { name: String, log: String },
    #[error("device error: {0}")]
    Device(String),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    #[error("rank {rank}: a peer rank did not answer within {timeout_ms} ms; the all-to-all buffers must be rebuilt")]
    PeerTimeout { rank: usize, timeout_ms: u64 },
    #[error("no CUDA device available: {0}")]
    NoCuda(String),
    #[error("quantization: {0}")]
    Quant(#[from] moe_quant::QuantError),
}

impl MoeError {
    pub(crate) fn shape(what: impl Into<String>, expected: &[usize], got: &[usize]) -> Self {
        Self::Shape {
            what: what.into(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        }
    }

    /// Shorthand for [`MoeError::Invalid`].
    pub fn invalid(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            msg: msg.into(),
        }
    }
}
