//! `MoeLayer`: route, dispatch, run the experts, combine, and add the shared experts.
//!
//! Shared experts run before the routed experts when the runner works in place (the input is
//! overwritten, so anything that reads it must run first) and after them otherwise, so the
//! routed path's workspace is released before the shared experts allocate theirs and the two
//! peaks never coincide.

use moe_runner_core::{
    DispatchFormat, MoeError, MoeRunner, QuantInfo, Result, SharedExperts, Tensor, TopK,
};
use tracing::debug_span;

use crate::dispatcher::Dispatcher;
use crate::routing::Router;

/// When the shared experts run relative to the routed ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SharedExpertOrder {
    /// Before when the runner works in place, after otherwise.
    #[default]
    Auto,
    Before,
    After,
}

pub struct MoeLayer {
    router: Router,
    dispatcher: Box<dyn Dispatcher>,
    runner: MoeRunner,
    quant: Box<dyn QuantInfo>,
    shared: Option<Box<dyn SharedExperts>>,
    order: SharedExpertOrder,
}

impl MoeLayer {
    /// Joins the parts and checks they agree: the dispatcher's format and the runner's, the
    /// router's expert count and k against the config, the weights' scheme against the runner.
    pub fn new(
        router: Router,
        dispatcher: Box<dyn Dispatcher>,
        runner: MoeRunner,
        quant: Box<dyn QuantInfo>,
        shared: Option<Box<dyn SharedExperts>>,
    ) -> Result<Self> {
        router.validate()?;
        let cfg = runner.config();
        if dispatcher.format() != runner.format() {
            return Err(MoeError::FormatMismatch {
                runner: runner.runner().to_string(),
                expected: runner.format(),
                got: dispatcher.format(),
            });
        }
        if quant.scheme() != runner.scheme() {
            return Err(MoeError::QuantMismatch {
                expected: runner.scheme().to_string(),
                got: quant.scheme().to_string(),
            });
        }
        let routed_total = router.num_experts + router.fused_shared_experts;
        if routed_total != cfg.num_experts || router.output_k() != cfg.top_k {
            return Err(MoeError::Config(format!(
                "router gives {} experts and k {} (with fused shared experts); the runner expects {} and {}",
                routed_total,
                router.output_k(),
                cfg.num_experts,
                cfg.top_k
            )));
        }
        if dispatcher.config().num_experts != cfg.num_experts
            || dispatcher.config().num_local_experts != cfg.num_local_experts
        {
            return Err(MoeError::Config(
                "dispatcher and runner disagree on the expert counts".into(),
            ));
        }
        if dispatcher.format() != DispatchFormat::Standard
            && dispatcher.config().routed_scaling_factor != cfg.routed_scaling_factor
        {
            return Err(MoeError::Config(
                "this format sums the top-k in its combine: give the dispatcher the runner's routed_scaling_factor".into(),
            ));
        }
        if router.scales_weights() && cfg.routed_scaling_factor.is_some() {
            return Err(MoeError::Config(
                    "routed_scaling_factor is set in both the router and the runner; it must apply once (leave it to the runner)".into(),
                ));
        }
        if shared.is_some() && cfg.no_combine {
            return Err(MoeError::Config(
                "no_combine returns [M, k, H]; shared experts cannot be added to it".into(),
            ));
        }
        Ok(Self {
            router,
            dispatcher,
            runner,
            quant,
            shared,
            order: SharedExpertOrder::Auto,
        })
    }

    /// Overrides the shared-expert order (for measurements; `Auto` is right for serving).
    pub fn with_shared_order(mut self, order: SharedExpertOrder) -> Self {
        self.order = order;
        self
    }

    pub fn runner(&self) -> &MoeRunner {
        &self.runner
    }

    pub fn dispatcher(&self) -> &dyn Dispatcher {
        self.dispatcher.as_ref()
    }

    fn shared_first(&self) -> bool {
        match self.order {
            SharedExpertOrder::Auto => self.runner.config().inplace,
            SharedExpertOrder::Before => true,
            SharedExpertOrder::After => false,
        }
    }

    /// Routed experts only: route, dispatch, run, combine.
    fn routed(&self, hidden: &Tensor, router_logits: &Tensor) -> Result<Tensor> {
        let topk = {
            let _s = debug_span!("route").entered();
            self.router.route(router_logits)?
        };
        self.forward_routed(hidden, topk)
    }

    /// `hidden [M, H]` and the engine's routing `topk` to the routed experts' output `[M, H]`
    /// (dispatch, run, combine) on any path; shared experts are the engine's to add. GPU
    /// engines that own the output use [`Self::forward_routed_into`].
    pub fn forward_routed(&self, hidden: &Tensor, topk: TopK) -> Result<Tensor> {
        let dispatched = self.dispatcher.dispatch(hidden, topk)?;
        let expert_out = self.runner.run(dispatched.as_ref(), self.quant.as_ref())?;
        let _s = debug_span!("combine").entered();
        self.dispatcher.combine(expert_out, dispatched.as_ref())
    }

    fn compute(&self, hidden: &Tensor, router_logits: &Tensor) -> Result<Tensor> {
        let _span = debug_span!(
            "moe_layer.forward",
            tokens = hidden.shape().first().copied().unwrap_or(0)
        )
        .entered();
        let Some(shared) = &self.shared else {
            return self.routed(hidden, router_logits);
        };
        let (shared_out, routed_out) = if self.shared_first() {
            let s = shared.forward(hidden)?;
            (s, self.routed(hidden, router_logits)?)
        } else {
            let r = self.routed(hidden, router_logits)?;
            (shared.forward(hidden)?, r)
        };
        shared_out.expect_shape("shared experts output", routed_out.shape())?;
        let mut sum = routed_out.to_host()?.to_f32_vec()?;
        for (a, b) in sum.iter_mut().zip(shared_out.to_host()?.to_f32_vec()?) {
            *a += b;
        }
        drop(shared_out);
        let mut out = routed_out.to_host()?;
        out.write_f32(&sum)?;
        // Back to the GPU when the routed output lives there.
        #[cfg(feature = "cuda")]
        if let Some(dev) = routed_out.cuda_device() {
            return out.to_device(&moe_runner_core::Device::Cuda(dev.clone()));
        }
        Ok(out)
    }

    /// The engine's path: `hidden [M, H]` and its routing `topk` (computed by the engine, on the
    /// same device) to the routed experts' output written into `out` `[M, H]`, memory the
    /// engine owns. With a fused GPU runner nothing is allocated once warm and nothing waits
    /// for the host, so the call can be captured in a CUDA graph. Standard format only (the
    /// masked formats sum in their dispatcher's combine, e.g. `combine_into` of `deepep_ll`);
    /// shared experts are the engine's to add.
    pub fn forward_routed_into(&self, hidden: &Tensor, topk: TopK, out: &Tensor) -> Result<()> {
        if self.dispatcher.format() != DispatchFormat::Standard {
            return Err(MoeError::Config(format!(
                "forward_routed_into runs the standard format; this layer's dispatcher emits {}",
                self.dispatcher.format()
            )));
        }
        let dispatched = self.dispatcher.dispatch(hidden, topk)?;
        self.runner
            .run_into(dispatched.as_ref(), self.quant.as_ref(), out)
    }

    /// `hidden [M, H]` and `router_logits [M, E]` to the layer output `[M, H]` (or
    /// `[M, k, H]` with `no_combine`). For an in-place runner use [`Self::forward_inplace`].
    pub fn forward(&self, hidden: &Tensor, router_logits: &Tensor) -> Result<Tensor> {
        if self.runner.config().inplace {
            return Err(MoeError::Config(
                "the runner is configured inplace; call forward_inplace".into(),
            ));
        }
        self.compute(hidden, router_logits)
    }

    /// Writes the layer output over `hidden` (which must be writable).
    pub fn forward_inplace(&self, hidden: &mut Tensor, router_logits: &Tensor) -> Result<()> {
        if !self.runner.config().inplace {
            return Err(MoeError::Config(
                "forward_inplace needs a runner configured with inplace".into(),
            ));
        }
        let out = self.compute(hidden, router_logits)?;
        hidden.write_f32(&out.to_f32_vec()?)
    }
}
