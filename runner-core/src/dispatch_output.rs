//! What a dispatcher hands to a runner. One concrete type per [`DispatchFormat`]; a runner
//! registered for a format downcasts to that type, and a mismatch is a typed error.

use crate::{DType, DispatchFormat, MoeError, Result, Tensor};
use std::any::Any;

pub trait DispatchOutput: Any + Send + Sync {
    fn format(&self) -> DispatchFormat;
    /// Tokens this rank contributed (rows of its top-k).
    fn num_tokens(&self) -> usize;
    /// Hidden size of the activations.
    fn hidden_size(&self) -> usize;
}

/// Downcasts a dispatch output to the concrete type of the format a runner was registered for.
pub fn downcast_dispatch<'a, T: DispatchOutput>(
    output: &'a dyn DispatchOutput,
    runner: &str,
    expected: DispatchFormat,
) -> Result<&'a T> {
    (output as &dyn Any)
        .downcast_ref::<T>()
        .ok_or(MoeError::FormatMismatch {
            runner: runner.to_string(),
            expected,
            got: output.format(),
        })
}

/// Routing of `M` tokens: `ids [M, k] i32` (-1 = no expert here), `weights [M, k] f32`.
#[derive(Debug)]
pub struct TopK {
    pub ids: Tensor,
    pub weights: Tensor,
}

impl TopK {
    pub fn new(ids: Tensor, weights: Tensor) -> Result<Self> {
        let [m, k] = ids.dims::<2>("topk_ids")?;
        ids.expect_dtype("topk_ids", &[DType::I32])?;
        weights.expect_dtype("topk_weights", &[DType::F32])?;
        weights.expect_shape("topk_weights", &[m, k])?;
        Ok(Self { ids, weights })
    }

    pub fn from_vecs(ids: &[i32], weights: &[f32], m: usize, k: usize) -> Result<Self> {
        Self::new(
            Tensor::from_slice(ids, &[m, k], DType::I32)?,
            Tensor::from_slice(weights, &[m, k], DType::F32)?,
        )
    }

    pub fn num_tokens(&self) -> usize {
        self.ids.shape()[0]
    }

    /// A copy with both tensors on `device`.
    pub fn to_device(&self, device: &crate::Device) -> Result<Self> {
        Self::new(self.ids.to_device(device)?, self.weights.to_device(device)?)
    }

    pub fn top_k(&self) -> usize {
        self.ids.shape()[1]
    }

    /// Checks every host-resident id is -1 or in `0..num_experts`.
    pub fn check_ids(&self, num_experts: usize) -> Result<()> {
        if !self.ids.is_host() {
            return Ok(()); // device ids are checked by the kernels that read them
        }
        let k = self.top_k();
        for (i, &id) in self.ids.as_slice::<i32>()?.iter().enumerate() {
            if id < -1 || id >= num_experts as i32 {
                return Err(MoeError::ExpertIdOutOfRange {
                    id,
                    row: i / k,
                    slot: i % k,
                    num_experts,
                });
            }
        }
        Ok(())
    }
}

/// The standard format: tokens in place, expert ids already mapped to this rank's local experts.
#[derive(Debug)]
pub struct StandardDispatchOutput {
    /// `[M, H]`: f32/bf16/f16, or FP8 E4M3 with `hidden_scale`.
    pub hidden: Tensor,
    /// `[M, H/128]` f32 when `hidden` is FP8 (per token, per 128 channels).
    pub hidden_scale: Option<Tensor>,
    /// Local expert ids (-1 for experts on other ranks) and router weights.
    pub topk: TopK,
}

impl DispatchOutput for StandardDispatchOutput {
    fn format(&self) -> DispatchFormat {
        DispatchFormat::Standard
    }
    fn num_tokens(&self) -> usize {
        self.hidden.shape().first().copied().unwrap_or(0)
    }
    fn hidden_size(&self) -> usize {
        self.hidden.shape().get(1).copied().unwrap_or(0)
    }
}

/// DeepEP low-latency (masked) format, as received by one rank.
#[derive(Debug)]
pub struct DeepEpLlDispatchOutput {
    /// `[E_local, R*T, H]`: bf16/f32, or FP8 E4M3 with `hidden_scale`; or NVFP4,
    /// `[E_local, R*T, H/2]` E2M1 pairs with `hidden_scale` and `hidden_global_scale`.
    pub hidden: Tensor,
    /// `[E_local, R*T, H/128]` f32 when `hidden` is FP8; `[E_local, R*T, H/16]` E4M3 (row-major)
    /// when it is NVFP4.
    pub hidden_scale: Option<Tensor>,
    /// The global scale NVFP4 `hidden` was quantized with: a value is
    /// `e2m1 * e4m3 scale / global scale`.
    pub hidden_global_scale: Option<f32>,
    /// This rank's own tokens' routing (global expert ids), used by the combine.
    pub topk: TopK,
    /// `[E_local] i32`: rows received per local expert; rows past it are never read or written.
    pub masked_m: Tensor,
    /// A hint of the rows per expert for kernel selection, never trusted for correctness.
    pub expected_m: usize,
    /// `[E_local, R*T] i32`: for each received row, the token index on its source rank.
    pub src_info: Tensor,
    /// `[E_local, R] i64`: `begin << 32 | count` of the rows each source rank sent.
    pub layout_range: Tensor,
    /// Where the runner should write its `[E_local, R*T, H]` output: the dispatcher's
    /// registered combine buffer (zero-copy, and no allocation per call). `None`: the runner
    /// allocates.
    pub out_buffer: Option<Tensor>,
}

impl DeepEpLlDispatchOutput {
    /// (E_local, R*T, H), with H counted in values (two per byte for NVFP4).
    pub fn dims(&self) -> Result<[usize; 3]> {
        let [e, r, h] = self.hidden.dims::<3>("masked hidden")?;
        Ok([
            e,
            r,
            if self.hidden.dtype() == DType::E2M1x2 {
                2 * h
            } else {
                h
            },
        ])
    }
}

impl DispatchOutput for DeepEpLlDispatchOutput {
    fn format(&self) -> DispatchFormat {
        DispatchFormat::DeepEpLowLatency
    }
    fn num_tokens(&self) -> usize {
        self.topk.num_tokens()
    }
    fn hidden_size(&self) -> usize {
        self.dims().map(|d| d[2]).unwrap_or(0)
    }
}
