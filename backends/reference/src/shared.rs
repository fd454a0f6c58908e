//! Shared experts on the CPU: one gated MLP of intermediate size `I_s` (several shared experts
//! are concatenated along `I_s`, which computes their sum).

use moe_runner_core::{
    ActivationKernel, ActivationOp, GateUpLayout, MoeError, MoeRunnerConfig, Result, SharedExperts,
    Tensor,
};

use crate::gemm::matmul_nt;

pub struct CpuSharedExperts {
    /// `[N1_s, H]` f32 (2 I_s gated rows, or I_s).
    w13: Vec<f32>,
    /// `[H, I_s]` f32.
    w2: Vec<f32>,
    hidden: usize,
    inter: usize,
    act: ActivationKernel,
    gate_up: GateUpLayout,
    /// `[H]`: the output is scaled by sigmoid(x . gate) per token (Qwen2-MoE).
    gate: Option<Vec<f32>>,
}

impl CpuSharedExperts {
    /// Weights in f32, laid out like one routed expert; the activation options come from the
    /// layer's runner config, with `inter` the shared intermediate size.
    pub fn new(w13: Vec<f32>, w2: Vec<f32>, inter: usize, cfg: &MoeRunnerConfig) -> Result<Self> {
        let act = cfg.activation_kernel()?;
        let hidden = cfg.hidden_size;
        let n1 = if act.is_gated() { 2 * inter } else { inter };
        if w13.len() != n1 * hidden {
            return Err(MoeError::Shape {
                what: "shared w13".into(),
                expected: vec![n1, hidden],
                got: vec![w13.len()],
            });
        }
        if w2.len() != hidden * inter {
            return Err(MoeError::Shape {
                what: "shared w2".into(),
                expected: vec![hidden, inter],
                got: vec![w2.len()],
            });
        }
        Ok(Self {
            w13,
            w2,
            hidden,
            inter,
            act,
            gate_up: cfg.gate_up,
            gate: None,
        })
    }

    /// Scales each token's output by sigmoid(x . `gate`) (`[H]`), as Qwen2-MoE gates its shared
    /// expert.
    pub fn with_gate(mut self, gate: Vec<f32>) -> Result<Self> {
        if gate.len() != self.hidden {
            return Err(MoeError::Shape {
                what: "shared expert gate".into(),
                expected: vec![self.hidden],
                got: vec![gate.len()],
            });
        }
        self.gate = Some(gate);
        Ok(self)
    }
}

impl SharedExperts for CpuSharedExperts {
    fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let [m, h] = hidden.dims::<2>("hidden")?;
        if h != self.hidden {
            return Err(MoeError::Shape {
                what: "hidden".into(),
                expected: vec![m, self.hidden],
                got: vec![m, h],
            });
        }
        // The MLP runs on the host; a GPU layer's hidden states come over (and the layer adds
        // the result to its routed output on the host).
        let x = hidden.to_host()?.to_f32_vec()?;
        let n1 = self.w13.len() / h;
        let mut g = vec![0f32; m * n1];
        matmul_nt(&x, &self.w13, &mut g, m, n1, h);
        let mut a = vec![0f32; m * self.inter];
        self.act.apply_rows(self.gate_up, &g, &mut a, self.inter);
        drop(g);
        let mut y = vec![0f32; m * h];
        matmul_nt(&a, &self.w2, &mut y, m, h, self.inter);
        if let Some(g) = &self.gate {
            for (yr, xr) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
                let z: f32 = xr.iter().zip(g).map(|(a, b)| a * b).sum();
                let s = 1.0 / (1.0 + (-z).exp());
                yr.iter_mut().for_each(|v| *v *= s);
            }
        }
        Tensor::from_f32(&y, &[m, h], hidden.dtype())
    }
}
