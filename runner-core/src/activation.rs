//! The activation between the two GEMMs, resolved once from [`crate::MoeRunnerConfig`] into a
//! closed set; `enum_dispatch` turns the per-element call into a match, not a virtual call.

use enum_dispatch::enum_dispatch;

#[enum_dispatch]
pub trait ActivationOp {
    /// Whether the op reads a (gate, up) pair; otherwise it reads one value.
    fn is_gated(&self) -> bool;
    /// The activation of one channel: `apply(gate, up)` when gated, `apply(x, 0.0)` otherwise.
    fn apply(&self, a: f32, b: f32) -> f32;
}

#[enum_dispatch(ActivationOp)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActivationKernel {
    SiluAndMul,
    GeluAndMul,
    LimitedSwiglu,
    ClampAfterSilu,
    GptOssSwiglu,
    SiluPlain,
    GeluPlain,
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)).
#[inline]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// silu(gate) * up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SiluAndMul;
impl ActivationOp for SiluAndMul {
    fn is_gated(&self) -> bool {
        true
    }
    fn apply(&self, gate: f32, up: f32) -> f32 {
        silu(gate) * up
    }
}

/// gelu(gate) * up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GeluAndMul;
impl ActivationOp for GeluAndMul {
    fn is_gated(&self) -> bool {
        true
    }
    fn apply(&self, gate: f32, up: f32) -> f32 {
        gelu(gate) * up
    }
}

/// `swiglu_limit` L: silu(min(gate, L)) * clamp(up, -L, L).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LimitedSwiglu {
    pub limit: f32,
}
impl ActivationOp for LimitedSwiglu {
    fn is_gated(&self) -> bool {
        true
    }
    fn apply(&self, gate: f32, up: f32) -> f32 {
        silu(gate.min(self.limit)) * up.clamp(-self.limit, self.limit)
    }
}

/// `gemm1_clamp_limit` L: min(silu(gate), L) * clamp(up, -L, L).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClampAfterSilu {
    pub limit: f32,
}
impl ActivationOp for ClampAfterSilu {
    fn is_gated(&self) -> bool {
        true
    }
    fn apply(&self, gate: f32, up: f32) -> f32 {
        silu(gate).min(self.limit) * up.clamp(-self.limit, self.limit)
    }
}

/// GPT-OSS: g = min(gate, L), u = clamp(up, -L, L), g * sigmoid(alpha * g) * (u + 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptOssSwiglu {
    pub limit: f32,
    pub alpha: f32,
}
impl ActivationOp for GptOssSwiglu {
    fn is_gated(&self) -> bool {
        true
    }
    fn apply(&self, gate: f32, up: f32) -> f32 {
        let g = gate.min(self.limit);
        let u = up.clamp(-self.limit, self.limit);
        g * sigmoid(self.alpha * g) * (u + 1.0)
    }
}

/// silu(x), not gated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SiluPlain;
impl ActivationOp for SiluPlain {
    fn is_gated(&self) -> bool {
        false
    }
    fn apply(&self, x: f32, _: f32) -> f32 {
        silu(x)
    }
}

/// gelu(x), not gated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GeluPlain;
impl ActivationOp for GeluPlain {
    fn is_gated(&self) -> bool {
        false
    }
    fn apply(&self, x: f32, _: f32) -> f32 {
        gelu(x)
    }
}

impl ActivationKernel {
    /// Applies the activation to GEMM 1 rows `g [n, N1]`, writing `a [n, inter]`; `layout`
    /// says where each channel's gate and up columns are when gated.
    pub fn apply_rows(&self, layout: crate::GateUpLayout, g: &[f32], a: &mut [f32], inter: usize) {
        let n1 = if self.is_gated() { 2 * inter } else { inter };
        for (grow, arow) in g.chunks(n1).zip(a.chunks_mut(inter)) {
            for (j, out) in arow.iter_mut().enumerate() {
                *out = if self.is_gated() {
                    let (gi, ui) = layout.columns(j, inter);
                    self.apply(grow[gi], grow[ui])
                } else {
                    self.apply(grow[j], 0.0)
                };
            }
        }
    }
}
