//! The `masked_gemm` runner: the grouped GEMMs over the masked `[E_local, R*T, H]` layout, rows
//! past `masked_m` never read or written. It drives the triton backend's kernels: a masked
//! align lists each expert's valid rows, GEMM 1 reads them in place (FP8 with the dispatcher's
//! per-128 scales, or bf16/f16), the activation runs with the requantization for GEMM 2 fused,
//! and GEMM 2 writes `[E_local, R*T, H]` straight into the combine buffer the dispatcher
//! registered. `expected_m` only picks the tile.

use moe_backend_triton::kernels::{GemmKind, GemmTile, RowKind};
use moe_backend_triton::max_blocks;
use moe_backend_triton::stages::{
    act_params, gate_up_code, quant_mode, DeviceWeights, GemmCall, GemmRows, RowMap, Stages,
};
use moe_backend_triton::tile_config::TileSelector;
use moe_runner_core::registry::FusedRunner;
use moe_runner_core::{
    downcast_dispatch, ActivationKernel, CombineInput, CudaDevice, DType, DeepEpLlCombineInput,
    DeepEpLlDispatchOutput, Device, DeviceOps, DispatchFormat, DispatchOutput, MoeError,
    MoeRunnerConfig, QuantInfo, QuantScheme, Result, Tensor,
};
use std::sync::Mutex;

use crate::RUNNER;

/// Device buffers of one forward pass, sized for the largest layout seen and then reused.
struct Workspace {
    /// Rows of the layout (E_local * R*T) it was sized for.
    rows: usize,
    sorted: Tensor,
    expert_ids: Tensor,
    num_post_padded: Tensor,
    a1: Tensor,
    a1_scale: Tensor,
    c1: Tensor,
    a2: Tensor,
    a2_scale: Tensor,
    /// Bit 0: a masked_m outside 0..=R*T, or more rows than a top-k dispatch can produce.
    status: Tensor,
}

pub struct MaskedGemmRunner {
    cfg: MoeRunnerConfig,
    stages: Stages,
    act: ActivationKernel,
    tiles: TileSelector,
    workspace: Mutex<Option<Workspace>>,
    wgmma: bool,
}

/// Most rows a top-k dispatch can put on one rank's experts: each of the R*T tokens picks at
/// most top_k of them.
fn row_bound(rt: usize, experts: usize, top_k: usize) -> usize {
    rt * experts.min(top_k)
}

impl MaskedGemmRunner {
    pub fn new(cfg: &MoeRunnerConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        if cfg.apply_router_weight_on_input || cfg.no_combine || cfg.inplace {
            return Err(MoeError::Config(
                "the masked layout applies router weights and sums in its combine: apply_router_weight_on_input, no_combine and inplace do not apply".into(),
            ));
        }
        let dev = device.as_cuda()?.clone();
        Ok(Self {
            cfg: cfg.clone(),
            tiles: TileSelector::new(
                cfg.num_experts,
                cfg.intermediate_size,
                Device::Cuda(dev.clone()).name(),
                None,
            ),
            act: cfg.activation_kernel()?,
            wgmma: dev.compute_capability()? == (9, 0),
            stages: Stages::new(&dev)?,
            workspace: Mutex::new(None),
        })
    }

    pub fn device(&self) -> &CudaDevice {
        self.stages.device()
    }

    /// Waits for the device and reports a `masked_m` the kernels rejected.
    pub fn check(&self) -> Result<()> {
        let ws = self.workspace.lock().map_err(|_| poisoned())?;
        let Some(ws) = ws.as_ref() else {
            return Ok(());
        };
        let status = ws.status.to_host()?.as_slice::<i32>()?[0];
        if status & 1 != 0 {
            return Err(MoeError::invalid(
                "masked_m",
                "a count outside 0..=R*T, or more rows than R*T*top_k; the extra rows were not computed",
            ));
        }
        Ok(())
    }

    /// Validates the batch; returns (E_local, R*T, output dtype).
    fn check_input(
        &self,
        d: &DeepEpLlDispatchOutput,
        scheme: QuantScheme,
    ) -> Result<(usize, usize, DType)> {
        let cfg = &self.cfg;
        let [el, rt, h] = d.dims()?;
        d.hidden.expect_shape(
            "masked hidden",
            &[cfg.num_local_experts, rt, cfg.hidden_size],
        )?;
        let fp8_in = d.hidden.dtype() == DType::F8E4M3;
        let out = match (scheme, d.hidden.dtype()) {
            (QuantScheme::Bf16, DType::Bf16) => DType::Bf16,
            (QuantScheme::F16, DType::F16) => DType::F16,
            (QuantScheme::Fp8Block128 | QuantScheme::Fp8PerChannel, DType::Bf16 | DType::F16) => {
                d.hidden.dtype()
            }
            (QuantScheme::Fp8Block128, DType::F8E4M3) => DType::Bf16,
            (s, got) => {
                return Err(MoeError::invalid(
                    "masked hidden",
                    format!("{got:?} activations do not feed the {s} masked GEMM (FP8 activations need fp8-block weights)"),
                ))
            }
        };
        match (&d.hidden_scale, fp8_in) {
            (Some(s), true) => {
                s.expect_dtype("hidden_scale", &[DType::F32])?;
                s.expect_shape("hidden_scale", &[el, rt, h / 128])?;
            }
            (None, false) => {}
            (None, true) => {
                return Err(MoeError::invalid(
                    "hidden_scale",
                    "FP8 activations need their [E_local, R*T, H/128] f32 scales",
                ))
            }
            (Some(_), false) => {
                return Err(MoeError::invalid(
                    "hidden_scale",
                    "given for activations that are not FP8",
                ))
            }
        }
        d.masked_m.expect_shape("masked_m", &[el])?;
        d.masked_m.expect_dtype("masked_m", &[DType::I32])?;
        if d.masked_m.is_host() {
            for (e, &c) in d.masked_m.as_slice::<i32>()?.iter().enumerate() {
                if c < 0 || c as usize > rt {
                    return Err(MoeError::invalid(
                        "masked_m",
                        format!("expert {e} has {c} rows; the buffer holds 0..={rt}"),
                    ));
                }
            }
        }
        for (what, v) in [
            ("hidden_size", h),
            ("intermediate_size", cfg.intermediate_size),
        ] {
            let need = if scheme == QuantScheme::Fp8Block128 {
                128
            } else {
                16
            };
            if v % need != 0 {
                return Err(MoeError::NotDivisible {
                    what: format!("{what} for the masked runner with {scheme}"),
                    value: v,
                    divisor: need,
                });
            }
        }
        Ok((el, rt, out))
    }

    fn workspace(
        &self,
        rows: usize,
        bound: usize,
    ) -> Result<std::sync::MutexGuard<'_, Option<Workspace>>> {
        let mut ws = self.workspace.lock().map_err(|_| poisoned())?;
        if ws.as_ref().is_some_and(|w| w.rows >= rows) {
            return Ok(ws);
        }
        let cfg = &self.cfg;
        let (h, i, n1, e) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.gemm1_columns(),
            cfg.num_local_experts,
        );
        let (sorted, blocks) = [16, 32, 64, 128].iter().fold((0, 0), |(s, b), &bm| {
            let n = max_blocks(bound, e, bm);
            (s.max(n * bm), b.max(n))
        });
        let z = |n: usize, dt: DType| Tensor::zeros_cuda(self.device(), &[n.max(1)], dt);
        *ws = Some(Workspace {
            rows,
            sorted: z(sorted, DType::I32)?,
            expert_ids: z(blocks, DType::I32)?,
            num_post_padded: z(1, DType::I32)?,
            a1: z(rows * h, DType::U8)?,
            a1_scale: z(rows * (h / 128).max(1), DType::F32)?,
            c1: z(rows * n1, DType::Bf16)?,
            a2: z(rows * i * 2, DType::U8)?,
            a2_scale: z(rows * i.div_ceil(128).max(1), DType::F32)?,
            status: z(1, DType::I32)?,
        });
        tracing::debug!(rows, "masked runner workspace sized");
        Ok(ws)
    }

    /// Runs GEMM 1, the activation and GEMM 2 of `d` into `out` (`[E_local, R*T, H]`).
    pub fn run_into(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
        out: &Tensor,
    ) -> Result<()> {
        let d = downcast_dispatch::<DeepEpLlDispatchOutput>(
            input,
            RUNNER,
            DispatchFormat::DeepEpLowLatency,
        )?;
        let scheme = quant.scheme();
        let (el, rt, out_dtype) = self.check_input(d, scheme)?;
        moe_runner_core::as_expert_weights(quant)?
            .dims()
            .check(&self.cfg)?;
        let cfg = &self.cfg;
        let (h, i, n1, k) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.gemm1_columns(),
            cfg.top_k,
        );
        out.expect_shape("masked output", &[el, rt, h])?;
        out.expect_dtype("masked output", &[out_dtype])?;
        let rows = el * rt;
        if rows == 0 {
            return Ok(());
        }
        let act_f16 = out_dtype == DType::F16;
        let kind = GemmKind::for_scheme(scheme, act_f16)?;
        let w = DeviceWeights::of(quant, RUNNER)?;
        let expected = d.expected_m.clamp(1, rt);
        let numel = expected * el;
        let tile = GemmTile::adapt(
            self.tiles.tile_for(numel.div_ceil(k), numel, scheme)?,
            kind,
            h.max(i),
            self.wgmma,
        )?;
        let bound = row_bound(rt, el, k);
        let ws_guard = self.workspace(rows, bound)?;
        let ws = ws_guard.as_ref().expect("workspace was just sized");
        let bm = tile.block_m;
        let m_blocks = max_blocks(bound, el, bm);
        let max_sorted = m_blocks * bm;
        let grid_rows = max_sorted.min(4 * 1024);
        let st = &self.stages;
        let g = GemmRows {
            sorted: ws.sorted.cuda_ptr()?,
            expert_ids: ws.expert_ids.cuda_ptr()?,
            num_post_padded: ws.num_post_padded.cuda_ptr()?,
            numel: rows,
            a_row_div: 1,
            m_blocks,
        };
        let map = RowMap::Sorted {
            sorted: g.sorted,
            count: g.num_post_padded,
            sentinel: rows,
        };
        st.align_masked(
            d.masked_m.cuda_ptr()?,
            el,
            rt,
            bm,
            &g,
            max_sorted,
            ws.status.cuda_ptr()?,
        )?;

        let qmode = quant_mode(scheme);
        let (act_code, limit, alpha) = act_params(self.act);
        let row_kind = |quant: u8| RowKind {
            act: act_code,
            gate_up: gate_up_code(cfg.gate_up),
            quant,
            act_f16,
        };
        let null = 0u64;
        let hidden = d.hidden.cuda_ptr()?;
        let (a1, a1_scale) = match (&d.hidden_scale, qmode) {
            (Some(s), _) => (hidden, s.cuda_ptr()?),
            (None, 0) => (hidden, null),
            (None, q) => {
                let (a1, a1s) = (ws.a1.cuda_ptr()?, ws.a1_scale.cuda_ptr()?);
                st.rows(
                    row_kind(q),
                    "moe_quant_input",
                    grid_rows,
                    map,
                    &[&hidden, &null, &a1, &a1s, &null, &(h as i32)],
                )?;
                (a1, a1s)
            }
        };
        let c1 = ws.c1.cuda_ptr()?;
        st.gemm(
            tile,
            kind,
            &g,
            &GemmCall {
                a: a1,
                b: w.w13,
                c: c1,
                a_scale: a1_scale,
                b_scale: w.s13,
                weights: null,
                n: n1,
                k: h,
            },
        )?;
        let (a2, a2s) = (
            ws.a2.cuda_ptr()?,
            if qmode == 0 {
                null
            } else {
                ws.a2_scale.cuda_ptr()?
            },
        );
        st.rows(
            row_kind(qmode),
            "moe_act",
            grid_rows,
            map,
            &[&c1, &null, &a2, &a2s, &null, &(i as i32), &limit, &alpha],
        )?;
        st.gemm(
            tile,
            kind,
            &g,
            &GemmCall {
                a: a2,
                b: w.w2,
                c: out.cuda_ptr()?,
                a_scale: a2s,
                b_scale: w.s2,
                weights: null,
                n: h,
                k: i,
            },
        )
    }
}

fn poisoned() -> MoeError {
    MoeError::Device("masked runner lock poisoned".into())
}

impl FusedRunner for MaskedGemmRunner {
    fn run_into(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
        out: &Tensor,
    ) -> Result<()> {
        MaskedGemmRunner::run_into(self, input, quant, out)
    }

    fn run(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
    ) -> Result<Box<dyn CombineInput>> {
        let d = downcast_dispatch::<DeepEpLlDispatchOutput>(
            input,
            RUNNER,
            DispatchFormat::DeepEpLowLatency,
        )?;
        let [el, rt, h] = d.dims()?;
        let (_, _, out_dtype) = self.check_input(d, quant.scheme())?;
        let out = match &d.out_buffer {
            Some(b) if b.shape() == [el, rt, h] && b.dtype() == out_dtype && !b.is_host() => {
                b.clone()
            }
            _ => Tensor::zeros_cuda(self.device(), &[el, rt, h], out_dtype)?,
        };
        self.run_into(input, quant, &out)?;
        Ok(Box::new(DeepEpLlCombineInput { hidden: out }))
    }
}

mod registration {
    use moe_runner_core::inventory;
    use moe_runner_core::registry::{DeviceKind, FusedFunc};
    use moe_runner_core::{DispatchFormat, QuantScheme};

    inventory::submit! {
        FusedFunc {
            format: DispatchFormat::DeepEpLowLatency,
            runner: crate::RUNNER,
            schemes: &[QuantScheme::Bf16, QuantScheme::F16, QuantScheme::Fp8Block128, QuantScheme::Fp8PerChannel],
            device: DeviceKind::Cuda,
            priority: 10,
            make: |cfg, device| Ok(Box::new(super::MaskedGemmRunner::new(cfg, device)?)),
        }
    }
}
