//! What a runner hands back to the dispatcher's combine, one concrete type per format.

use crate::{DispatchFormat, MoeError, Result, Tensor};
use std::any::Any;

pub trait CombineInput: Any + Send + Sync {
    fn format(&self) -> DispatchFormat;
}

/// Takes the concrete combine input of a format back out of its box.
pub fn downcast_combine<T: CombineInput>(
    input: Box<dyn CombineInput>,
    expected: DispatchFormat,
) -> Result<Box<T>> {
    let got = input.format();
    (input as Box<dyn Any>)
        .downcast::<T>()
        .map_err(|_| MoeError::FormatMismatch {
            runner: "combine".into(),
            expected,
            got,
        })
}

/// Standard format: `[M, H]` (top-k summed, router weights and scaling applied), or
/// `[M, k, H]` unweighted and unsummed when the runner config has `no_combine`.
#[derive(Debug)]
pub struct StandardCombineInput {
    pub hidden: Tensor,
}

impl CombineInput for StandardCombineInput {
    fn format(&self) -> DispatchFormat {
        DispatchFormat::Standard
    }
}

/// Low-latency format: expert outputs `[E_local, R*T, H]`, rows past `masked_m` untouched; the
/// combine weights and sums them on each token's source rank.
#[derive(Debug)]
pub struct DeepEpLlCombineInput {
    pub hidden: Tensor,
}

impl CombineInput for DeepEpLlCombineInput {
    fn format(&self) -> DispatchFormat {
        DispatchFormat::DeepEpLowLatency
    }
}
