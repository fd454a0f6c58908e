//! A single-rank dispatcher that emits the DeepEP low-latency (masked) format: each local
//! expert's tokens packed into `[E_local, T, H]` with `masked_m`, `src_info` and `layout_range`
//! exactly as the multi-rank all-to-all lays them out for R = 1. It lets masked-layout runners
//! run and be tested on one device; the multi-rank transport lives in its own backend.

use moe_runner_core::{
    downcast_combine, downcast_dispatch, CombineInput, DType, DeepEpLlCombineInput,
    DeepEpLlDispatchOutput, DispatchFormat, DispatchOutput, MoeError, Result, Tensor, TopK,
};

use crate::dispatcher::{A2aBackend, Dispatcher, DispatcherConfig};

pub struct LocalMaskedDispatcher {
    cfg: DispatcherConfig,
}

impl LocalMaskedDispatcher {
    pub fn new(cfg: DispatcherConfig) -> Result<Self> {
        cfg.validate()?;
        cfg.expect_native_wire("local_masked")?;
        if cfg.world_size != 1 {
            return Err(MoeError::Config(format!(
                "the local masked dispatcher serves a world of one rank, got {}",
                cfg.world_size
            )));
        }
        Ok(Self { cfg })
    }
}

impl Dispatcher for LocalMaskedDispatcher {
    fn name(&self) -> &'static str {
        "local_masked"
    }
    fn format(&self) -> DispatchFormat {
        DispatchFormat::DeepEpLowLatency
    }
    fn config(&self) -> &DispatcherConfig {
        &self.cfg
    }

    fn dispatch(&self, hidden: &Tensor, topk: TopK) -> Result<Box<dyn DispatchOutput>> {
        let _span = tracing::debug_span!("dispatch.local_masked").entered();
        let m = self
            .cfg
            .check_batch("local masked dispatcher", hidden, &topk)?;
        let (e_local, t, h) = (
            self.cfg.num_local_experts,
            self.cfg.max_tokens_per_rank,
            self.cfg.hidden_size,
        );
        let x = hidden.to_f32_vec()?;
        let ids = topk.ids.as_slice::<i32>()?;
        let k = topk.top_k();
        let mut packed = vec![0f32; e_local * t * h];
        let mut counts = vec![0i32; e_local];
        let mut src_info = vec![-1i32; e_local * t];
        for tok in 0..m {
            for &id in &ids[tok * k..(tok + 1) * k] {
                if id < 0 {
                    continue;
                }
                let e = id as usize;
                let row = counts[e] as usize;
                packed[(e * t + row) * h..(e * t + row + 1) * h]
                    .copy_from_slice(&x[tok * h..(tok + 1) * h]);
                src_info[e * t + row] = tok as i32;
                counts[e] += 1;
            }
        }
        let layout: Vec<i64> = counts.iter().map(|&c| c as i64).collect();
        Ok(Box::new(DeepEpLlDispatchOutput {
            hidden: Tensor::from_f32(&packed, &[e_local, t, h], hidden.dtype())?,
            hidden_scale: None,
            hidden_global_scale: None,
            topk,
            masked_m: Tensor::from_slice(&counts, &[e_local], DType::I32)?,
            expected_m: (m * k).div_ceil(e_local.max(1)),
            src_info: Tensor::from_slice(&src_info, &[e_local, t], DType::I32)?,
            layout_range: Tensor::from_slice(&layout, &[e_local, 1], DType::I64)?,
            out_buffer: None,
        }))
    }

    fn combine(
        &self,
        output: Box<dyn CombineInput>,
        dispatched: &dyn DispatchOutput,
    ) -> Result<Tensor> {
        let _span = tracing::debug_span!("combine.local_masked").entered();
        let y = downcast_combine::<DeepEpLlCombineInput>(output, DispatchFormat::DeepEpLowLatency)?
            .hidden;
        let d = downcast_dispatch::<DeepEpLlDispatchOutput>(
            dispatched,
            self.name(),
            DispatchFormat::DeepEpLowLatency,
        )?;
        let (e_local, t, h) = (
            self.cfg.num_local_experts,
            self.cfg.max_tokens_per_rank,
            self.cfg.hidden_size,
        );
        y.expect_shape("expert outputs", &[e_local, t, h])?;
        let (m, k) = (d.topk.num_tokens(), d.topk.top_k());
        let ids = d.topk.ids.as_slice::<i32>()?;
        let w = d.topk.weights.as_slice::<f32>()?;
        let src = d.src_info.as_slice::<i32>()?;
        let counts = d.masked_m.as_slice::<i32>()?;
        let yv = y.to_f32_vec()?;
        let mut out = vec![0f32; m * h];
        for e in 0..e_local {
            let rows = counts[e];
            if rows < 0 || rows as usize > t {
                return Err(MoeError::invalid(
                    "masked_m",
                    format!("expert {e} has {rows} rows; the buffer holds 0..={t}"),
                ));
            }
            for r in 0..rows as usize {
                let tok = src[e * t + r];
                if tok < 0 || tok as usize >= m {
                    return Err(MoeError::invalid(
                        "src_info",
                        format!("row {r} of expert {e} names token {tok} of {m}"),
                    ));
                }
                let tok = tok as usize;
                let slot = (0..k)
                    .find(|&s| ids[tok * k + s] == e as i32)
                    .ok_or_else(|| {
                        MoeError::invalid(
                            "src_info",
                            format!(
                                "row {r} of expert {e} names token {tok}, which did not pick it"
                            ),
                        )
                    })?;
                let wt = w[tok * k + slot];
                for (o, v) in out[tok * h..(tok + 1) * h]
                    .iter_mut()
                    .zip(&yv[(e * t + r) * h..(e * t + r + 1) * h])
                {
                    *o += wt * v;
                }
            }
        }
        if let Some(s) = self.cfg.routed_scaling_factor {
            out.iter_mut().for_each(|v| *v *= s);
        }
        Tensor::from_f32(&out, &[m, h], y.dtype())
    }
}

inventory::submit! {
    A2aBackend {
        name: "local_masked",
        format: DispatchFormat::DeepEpLowLatency,
        description: "one rank, DeepEP low-latency masked layout [E_local, T, H] with masked_m, src_info, layout_range",
        make: |cfg, device| {
            if device.is_cuda() {
                return Err(MoeError::Config(
                    "local_masked packs on the host; on a GPU use the deepep_ll dispatcher".into(),
                ));
            }
            Ok(Box::new(LocalMaskedDispatcher::new(cfg.clone())?))
        },
    }
}
