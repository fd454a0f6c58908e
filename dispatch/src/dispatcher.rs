//! The token dispatcher interface and the a2a registry. A dispatcher emits one
//! [`DispatchFormat`]; a runner registered for that format consumes it.

use moe_runner_core::{
    CombineInput, Device, DispatchFormat, DispatchOutput, MoeError, Result, Tensor, TopK,
};
use serde::{Deserialize, Serialize};

/// What a dispatcher is sized for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DispatcherConfig {
    /// Experts in the model, over all ranks.
    pub num_experts: usize,
    /// Experts on this rank (expert parallelism splits them evenly: rank r holds
    /// `r * num_local_experts .. (r + 1) * num_local_experts`).
    pub num_local_experts: usize,
    pub rank: usize,
    pub world_size: usize,
    pub hidden_size: usize,
    /// Most tokens one rank dispatches in a call.
    pub max_tokens_per_rank: usize,
    /// Scale of the top-k sum for formats whose combine computes that sum (the masked
    /// formats). The standard format's sum belongs to the runner, so the standard dispatcher
    /// ignores it; a `MoeLayer` sets it from the runner config, so it applies exactly once.
    #[serde(default)]
    pub routed_scaling_factor: Option<f32>,
    /// Experts per token. Dispatchers that keep one result slot per (token, expert) size their
    /// buffers by it (the low-latency combine buffer is `[T, top_k, H]`); 0 = not fixed, which
    /// those dispatchers reject.
    #[serde(default)]
    pub top_k: usize,
    /// What dispatchers that move tokens send: the activations as they are, E4M3 with
    /// per-token, per-128-channel scales, or NVFP4.
    #[serde(default)]
    pub wire: Wire,
    /// The global scale NVFP4 on the wire is quantized with (`448 * 6 / amax` of the
    /// activations); the runner's weights must carry the same input global scale. Only read
    /// with [`Wire::Nvfp4`], which requires it finite and positive.
    #[serde(default)]
    pub nvfp4_global_scale: f32,
    /// The experts' intermediate size, for dispatchers whose buffers also hold the expert
    /// pass's intermediate rows (MegaMoE's symmetric buffer); 0 = not given, which those
    /// dispatchers reject.
    #[serde(default)]
    pub intermediate_size: usize,
}

/// The number format of dispatched activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wire {
    /// The activations' own dtype (bf16 or f16).
    #[default]
    Native,
    /// E4M3 per token and 128 channels, f32 scale = max(amax, 1e-4) / 448.
    Fp8,
    /// As `Fp8` with each scale rounded up to a power of two (UE8M0-representable).
    Fp8Ue8m0,
    /// NVFP4: E2M1 codes, an E4M3 scale per 16 channels (row-major), over
    /// [`DispatcherConfig::nvfp4_global_scale`]: half the bytes of FP8.
    Nvfp4,
}

impl DispatcherConfig {
    /// One rank holding every expert.
    pub fn single(num_experts: usize, hidden_size: usize, max_tokens_per_rank: usize) -> Self {
        Self {
            num_experts,
            num_local_experts: num_experts,
            rank: 0,
            world_size: 1,
            hidden_size,
            max_tokens_per_rank,
            routed_scaling_factor: None,
            top_k: 0,
            wire: Wire::Native,
            nvfp4_global_scale: 0.0,
            intermediate_size: 0,
        }
    }

    /// The same config with the experts' intermediate size.
    pub fn with_intermediate(mut self, intermediate_size: usize) -> Self {
        self.intermediate_size = intermediate_size;
        self
    }

    /// The same config with `top_k` experts per token.
    pub fn with_top_k(mut self, top_k: usize) -> Self {
        self.top_k = top_k;
        self
    }

    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(MoeError::Config(m));
        if self.world_size == 0 || self.rank >= self.world_size {
            return err(format!(
                "rank {} is outside a world of {}",
                self.rank, self.world_size
            ));
        }
        if self.num_local_experts * self.world_size != self.num_experts {
            return err(format!(
                "{} local experts on {} ranks do not make {} experts",
                self.num_local_experts, self.world_size, self.num_experts
            ));
        }
        if self.hidden_size == 0 {
            return err("hidden_size must be at least 1".into());
        }
        let gs = self.nvfp4_global_scale;
        if self.wire == Wire::Nvfp4 && !(gs.is_finite() && gs > 0.0) {
            return err(format!(
                "the NVFP4 wire needs a finite positive nvfp4_global_scale (448 * 6 / amax of the activations), got {gs}"
            ));
        }
        Ok(())
    }

    /// Rejects a wire format other than the activations' own, for dispatchers that do not
    /// move tokens or cannot cast them.
    pub fn expect_native_wire(&self, dispatcher: &str) -> Result<()> {
        if self.wire != Wire::Native {
            return Err(MoeError::Config(format!(
                "the {dispatcher} dispatcher sends activations as they are; wire {:?} needs an all-to-all that casts (deepep_ll)",
                self.wire
            )));
        }
        Ok(())
    }

    /// First global expert id on this rank.
    pub fn first_local_expert(&self) -> usize {
        self.rank * self.num_local_experts
    }

    /// Checks a batch against the sizes this dispatcher was built for.
    pub fn check_batch(&self, what: &str, hidden: &Tensor, topk: &TopK) -> Result<usize> {
        let [m, h] = hidden.dims::<2>("hidden")?;
        if h != self.hidden_size {
            return Err(MoeError::Shape {
                what: "hidden".into(),
                expected: vec![m, self.hidden_size],
                got: vec![m, h],
            });
        }
        if m > self.max_tokens_per_rank {
            return Err(MoeError::TooManyTokens {
                what: what.to_string(),
                max: self.max_tokens_per_rank,
                got: m,
            });
        }
        if topk.num_tokens() != m {
            return Err(MoeError::Shape {
                what: "topk_ids".into(),
                expected: vec![m, topk.top_k()],
                got: topk.ids.shape().to_vec(),
            });
        }
        if self.top_k != 0 && topk.top_k() > self.top_k {
            return Err(MoeError::invalid(
                "topk_ids",
                format!(
                    "{} experts per token; the dispatcher was sized for {}",
                    topk.top_k(),
                    self.top_k
                ),
            ));
        }
        topk.check_ids(self.num_experts)?;
        Ok(m)
    }
}

pub trait Dispatcher: Send + Sync {
    fn name(&self) -> &'static str;
    fn format(&self) -> DispatchFormat;
    fn config(&self) -> &DispatcherConfig;
    /// Sends each token to its experts. `topk` holds global expert ids.
    fn dispatch(&self, hidden: &Tensor, topk: TopK) -> Result<Box<dyn DispatchOutput>>;
    /// Brings the experts' results back to each token: `[M, H]` for this rank's tokens.
    fn combine(
        &self,
        output: Box<dyn CombineInput>,
        dispatched: &dyn DispatchOutput,
    ) -> Result<Tensor>;
    /// Waits for the device and reports errors its kernels flagged (a peer rank that did not
    /// answer in time, ids the kernels skipped). Dispatchers that check everything on the host
    /// have nothing to report.
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

/// A registered all-to-all backend. `make` builds a single-process dispatcher for `device`
/// (multi-rank worlds have their own constructors, which exchange buffers between ranks); it
/// fails with a typed error when the backend cannot run there.
pub struct A2aBackend {
    pub name: &'static str,
    pub format: DispatchFormat,
    pub description: &'static str,
    pub make: fn(&DispatcherConfig, &Device) -> Result<Box<dyn Dispatcher>>,
}
inventory::collect!(A2aBackend);

pub fn a2a_backends() -> impl Iterator<Item = &'static A2aBackend> {
    inventory::iter::<A2aBackend>.into_iter()
}

/// Builds a registered dispatcher by name for the CPU, or lists the known ones.
pub fn make_dispatcher(name: &str, cfg: &DispatcherConfig) -> Result<Box<dyn Dispatcher>> {
    make_dispatcher_on(name, cfg, &Device::cpu())
}

/// Builds a registered dispatcher by name for `device`, or lists the known ones.
pub fn make_dispatcher_on(
    name: &str,
    cfg: &DispatcherConfig,
    device: &Device,
) -> Result<Box<dyn Dispatcher>> {
    cfg.validate()?;
    let backend = a2a_backends()
        .find(|b| b.name == name)
        .ok_or_else(|| MoeError::Unknown {
            kind: "a2a backend",
            name: name.to_string(),
            known: a2a_backends()
                .map(|b| b.name)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    (backend.make)(cfg, device)
}
