//! What the `megamoe` a2a hands its runner, and what the runner hands back.

use moe_runner_core::{CombineInput, DispatchFormat, DispatchOutput, Tensor, TopK};

use crate::layout::MegaShape;

/// This rank's batch, not yet moved: the fused program pre-dispatches and dispatches it itself.
pub struct MegaMoeDispatchOutput {
    /// `[m, H]` activations (bf16 on the GPU; f32 or bf16 on the CPU).
    pub hidden: Tensor,
    /// `[m, k]` routing with global expert ids.
    pub topk: TopK,
    /// What the buffers were sized for (this rank's place in the world included).
    pub shape: MegaShape,
    /// This rank's symmetric buffer and its view of every peer's (GPU worlds).
    #[cfg(feature = "cuda")]
    pub(crate) rank: Option<crate::gpu::RankHandle>,
}

impl std::fmt::Debug for MegaMoeDispatchOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MegaMoeDispatchOutput")
            .field("hidden", &self.hidden)
            .field("topk", &self.topk)
            .field("shape", &self.shape)
            .finish()
    }
}

impl DispatchOutput for MegaMoeDispatchOutput {
    fn format(&self) -> DispatchFormat {
        DispatchFormat::MegaMoe
    }
    fn num_tokens(&self) -> usize {
        self.topk.num_tokens()
    }
    fn hidden_size(&self) -> usize {
        self.shape.hidden
    }
}

/// The layer's output for this rank's tokens, `[m, H]` bf16: the fused program ends with the
/// top-k sum, so the a2a's combine only hands it over.
#[derive(Debug)]
pub struct MegaMoeCombineInput {
    pub hidden: Tensor,
}

impl CombineInput for MegaMoeCombineInput {
    fn format(&self) -> DispatchFormat {
        DispatchFormat::MegaMoe
    }
}
