//! The `triton` runner: the fused MoE pipeline of SGLang's and vLLM's Triton kernel, in CUDA C.
//! Per forward pass, all on the device's stream with no host synchronization (so a layer can be
//! captured in a CUDA graph): align, input quantization where the scheme needs it, grouped
//! GEMM 1 with gather, activation (+ requantization), grouped GEMM 2 with the router weight,
//! top-k sum with the routed scaling factor.

use moe_runner_core::registry::FusedRunner;
use moe_runner_core::DeviceOps;
use moe_runner_core::{
    downcast_dispatch, ActivationKernel, CombineInput, CudaDevice, DType, Device, DispatchFormat,
    DispatchOutput, ExpertWeights, MoeError, MoeRunnerConfig, QuantInfo, QuantScheme, Result,
    StandardCombineInput, StandardDispatchOutput, Tensor,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::kernels::{GemmKind, GemmTile, RowKind};
use crate::stages::{
    act_params, dev_err, gate_up_code, quant_mode, DeviceWeights, GemmCall, GemmRows, RowMap,
    Stages,
};
use crate::tile_config::{TileConfig, TileSelector};
use crate::RUNNER;

/// Device buffers of one forward pass, grown to the largest batch seen and then reused.
struct Workspace {
    tokens: usize,
    sorted_ids: Tensor,
    expert_ids: Tensor,
    num_post_padded: Tensor,
    a1: Tensor,
    a1_scale: Tensor,
    c1: Tensor,
    a2: Tensor,
    a2_scale: Tensor,
    c3: Tensor,
    /// [0]: GEMM 1 input per-tensor scale, [1]: GEMM 2 input per-tensor scale.
    scalars: Tensor,
}

pub struct TritonRunner {
    cfg: MoeRunnerConfig,
    stages: Stages,
    act: ActivationKernel,
    tiles: TileSelector,
    workspace: Mutex<Option<Workspace>>,
    /// Whether blocks of 64+ rows use wgmma (on by default on sm_90; `MOE_TRITON_WGMMA=0` or
    /// [`TritonRunner::set_wgmma`] turn it off).
    wgmma: AtomicBool,
}

/// Most BLOCK_M blocks the align can produce: each expert that gets rows adds at most one
/// partly filled block, and at most min(E, numel) experts get rows. This bounds the GEMM grids,
/// so a decode batch launches a handful of row blocks, not one per expert.
pub fn max_blocks(numel: usize, experts: usize, block_m: usize) -> usize {
    numel.div_ceil(block_m) + numel.min(experts)
}

/// Workspace sizes covering every BLOCK_M the kernels support: (sorted ids, expert ids).
fn align_capacity(numel: usize, experts: usize) -> (usize, usize) {
    [16, 32, 64, 128].iter().fold((0, 0), |(s, b), &bm| {
        let blocks = max_blocks(numel, experts, bm);
        (s.max(blocks * bm), b.max(blocks))
    })
}

impl TritonRunner {
    pub fn new(cfg: &MoeRunnerConfig, device: &Device) -> Result<Self> {
        Self::with_config_dir(cfg, device, None)
    }

    /// A runner that looks for tuned configs in `config_dir` first.
    pub fn with_config_dir(
        cfg: &MoeRunnerConfig,
        device: &Device,
        config_dir: Option<PathBuf>,
    ) -> Result<Self> {
        cfg.validate()?;
        let dev = device.as_cuda()?.clone();
        let hopper = dev.compute_capability()? == (9, 0);
        let wgmma = hopper && std::env::var("MOE_TRITON_WGMMA").map_or(true, |v| v != "0");
        Ok(Self {
            cfg: cfg.clone(),
            tiles: TileSelector::new(
                cfg.num_experts,
                cfg.intermediate_size,
                Device::Cuda(dev.clone()).name(),
                config_dir,
            ),
            stages: Stages::new(&dev)?,
            act: cfg.activation_kernel()?,
            workspace: Mutex::new(None),
            wgmma: AtomicBool::new(wgmma),
        })
    }

    /// Turns the wgmma path for blocks of 64+ rows on or off (it needs sm_90).
    pub fn set_wgmma(&self, on: bool) -> Result<()> {
        if on && self.device().compute_capability()? != (9, 0) {
            return Err(MoeError::invalid("wgmma", "needs a Hopper GPU (sm_90)"));
        }
        self.wgmma.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Uses `tile` for every batch size until cleared with `None`.
    pub fn force_tile(&self, tile: Option<TileConfig>) -> Result<()> {
        self.tiles.force(tile)
    }

    pub fn device(&self) -> &CudaDevice {
        self.stages.device()
    }

    /// The tile for `m` tokens: the nearest entry of the tuned file for this shape and device,
    /// or the default (logged once when no file exists).
    pub fn tile_for(&self, m: usize, scheme: QuantScheme) -> Result<TileConfig> {
        self.tiles.tile_for(m, m * self.cfg.top_k, scheme)
    }

    fn check_shapes(
        &self,
        d: &StandardDispatchOutput,
        quant: &dyn QuantInfo,
    ) -> Result<(usize, DType)> {
        let cfg = &self.cfg;
        let [m, h] = d.hidden.dims::<2>("hidden")?;
        d.hidden.expect_shape("hidden", &[m, cfg.hidden_size])?;
        let act_dtypes: &[DType] = match quant.scheme() {
            QuantScheme::Bf16 => &[DType::Bf16],
            QuantScheme::F16 => &[DType::F16],
            _ => &[DType::Bf16, DType::F16],
        };
        d.hidden.expect_dtype("hidden", act_dtypes)?;
        if d.hidden_scale.is_some() {
            return Err(MoeError::invalid(
                "hidden_scale",
                "the triton runner quantizes activations itself; pass bf16/fp16 hidden states",
            ));
        }
        d.topk.ids.expect_shape("topk_ids", &[m, cfg.top_k])?;
        as_weights(quant)?.dims().check(cfg)?;
        let fp8 = GemmKind::for_scheme(quant.scheme(), false)?.elem == 2;
        let elem = if fp8 { 1 } else { 2 };
        for (what, v) in [
            ("hidden_size", h),
            ("intermediate_size", cfg.intermediate_size),
        ] {
            let need = if quant.scheme() == QuantScheme::Fp8Block128 {
                128
            } else {
                16 / elem
            };
            if v % need != 0 {
                return Err(MoeError::NotDivisible {
                    what: format!("{what} for the triton runner with {}", quant.scheme()),
                    value: v,
                    divisor: need,
                });
            }
        }
        Ok((m, d.hidden.dtype()))
    }

    fn workspace(
        &self,
        m: usize,
        kind: GemmKind,
    ) -> Result<std::sync::MutexGuard<'_, Option<Workspace>>> {
        let mut ws = self
            .workspace
            .lock()
            .map_err(|_| dev_err("workspace lock poisoned"))?;
        let cfg = &self.cfg;
        let fits = ws.as_ref().is_some_and(|w| w.tokens >= m);
        if !fits {
            let numel = m * cfg.top_k;
            let (h, i, n1, e) = (
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.gemm1_columns(),
                cfg.num_local_experts,
            );
            let z = |shape: &[usize], dt: DType| Tensor::zeros_cuda(self.device(), shape, dt);
            let act = 2;
            let q = if kind.elem == 2 { 1 } else { act };
            *ws = Some(Workspace {
                tokens: m,
                sorted_ids: z(&[align_capacity(numel, e).0], DType::I32)?,
                expert_ids: z(&[align_capacity(numel, e).1], DType::I32)?,
                num_post_padded: z(&[1], DType::I32)?,
                a1: z(&[m * h * q], DType::U8)?,
                a1_scale: z(&[m * h.div_ceil(128).max(1)], DType::F32)?,
                c1: z(&[numel * n1 * act], DType::U8)?,
                a2: z(&[numel * i * q], DType::U8)?,
                a2_scale: z(&[numel * i.div_ceil(128).max(1)], DType::F32)?,
                c3: z(&[numel * h * act], DType::U8)?,
                scalars: z(&[2], DType::F32)?,
            });
            tracing::debug!(tokens = m, "triton workspace sized");
        }
        Ok(ws)
    }

    /// Runs the layer into `out` (`[M, H]`, or `[M, k, H]` with `no_combine`, the hidden's
    /// dtype, on the device). Allocates only when the batch outgrows the workspace.
    pub fn run_into(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
        out: &Tensor,
    ) -> Result<()> {
        let d =
            downcast_dispatch::<StandardDispatchOutput>(input, RUNNER, DispatchFormat::Standard)?;
        let (m, hidden_dtype) = self.check_shapes(d, quant)?;
        let cfg = &self.cfg;
        let want = cfg.output_shape(m);
        out.expect_shape("output", &want)?;
        out.expect_dtype("output", &[hidden_dtype])?;
        if m == 0 {
            return Ok(());
        }
        let scheme = quant.scheme();
        let act_f16 = hidden_dtype == DType::F16;
        let kind = GemmKind::for_scheme(scheme, act_f16)?;
        let w = DeviceWeights::of(quant, RUNNER)?;
        let tile = GemmTile::adapt(
            self.tile_for(m, scheme)?,
            kind,
            cfg.hidden_size.max(cfg.intermediate_size),
            self.wgmma.load(Ordering::Relaxed),
        )?;
        let ws_guard = self.workspace(m, kind)?;
        let ws = ws_guard.as_ref().expect("workspace was just sized");
        let (k, h, i, n1, e) = (
            cfg.top_k,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.gemm1_columns(),
            cfg.num_local_experts,
        );
        let numel = m * k;
        let (ids, weights) = (d.topk.ids.cuda_ptr()?, d.topk.weights.cuda_ptr()?);
        let scalars = ws.scalars.cuda_ptr()?;
        let bm = tile.block_m;
        let m_blocks = max_blocks(numel, e, bm);
        let rows1 = GemmRows {
            sorted: ws.sorted_ids.cuda_ptr()?,
            expert_ids: ws.expert_ids.cuda_ptr()?,
            num_post_padded: ws.num_post_padded.cuda_ptr()?,
            numel,
            a_row_div: k,
            m_blocks,
        };
        let st = &self.stages;

        // 1. Align.
        st.align(ids, numel, e, bm, &rows1, m_blocks * bm)?;

        // 2. GEMM 1's input: quantized, and/or weighted when the router weight goes on the input.
        let quant_mode = quant_mode(scheme);
        let (act_code, limit, alpha) = act_params(self.act);
        let rows = |quant: u8| RowKind {
            act: act_code,
            gate_up: gate_up_code(cfg.gate_up),
            quant,
            act_f16,
        };
        let null = 0u64;
        let row_weight = if cfg.apply_router_weight_on_input {
            weights
        } else {
            null
        };
        let hidden = d.hidden.cuda_ptr()?;
        let (a1, a1_scale) = if quant_mode == 0 && !cfg.apply_router_weight_on_input {
            (hidden, null)
        } else {
            let (a1, a1s) = (ws.a1.cuda_ptr()?, ws.a1_scale.cuda_ptr()?);
            let scale_ptr = if quant_mode == 3 { scalars } else { a1s };
            if quant_mode == 3 {
                st.per_tensor_scale(
                    w.a13_static,
                    scalars,
                    rows(4),
                    "moe_quant_input",
                    m,
                    RowMap::Direct,
                    &[&hidden, &row_weight, &null, &null, &scalars, &(h as i32)],
                )?;
            }
            st.rows(
                rows(quant_mode),
                "moe_quant_input",
                m,
                RowMap::Direct,
                &[&hidden, &row_weight, &a1, &scale_ptr, &null, &(h as i32)],
            )?;
            (a1, scale_ptr)
        };

        // 3. GEMM 1: C1[id] = A1[id / k] x w13[e]^T.
        let c1 = ws.c1.cuda_ptr()?;
        let gemm1 = GemmCall {
            a: a1,
            b: w.w13,
            c: c1,
            a_scale: a1_scale,
            b_scale: w.s13,
            weights: null,
            n: n1,
            k: h,
        };
        st.gemm(tile, kind, &rows1, &gemm1)?;

        // 4. Activation, with GEMM 2's input rounding.
        let (a2, a2s) = (ws.a2.cuda_ptr()?, ws.a2_scale.cuda_ptr()?);
        let scalar2 = scalars + 4;
        let a2_scale = match quant_mode {
            0 => null,
            3 => scalar2,
            _ => a2s,
        };
        if quant_mode == 3 {
            st.per_tensor_scale(
                w.a2_static,
                scalar2,
                rows(4),
                "moe_act",
                numel,
                RowMap::Direct,
                &[
                    &c1,
                    &ids,
                    &null,
                    &null,
                    &scalar2,
                    &(i as i32),
                    &limit,
                    &alpha,
                ],
            )?;
        }
        st.rows(
            rows(quant_mode),
            "moe_act",
            numel,
            RowMap::Direct,
            &[
                &c1,
                &ids,
                &a2,
                &a2_scale,
                &null,
                &(i as i32),
                &limit,
                &alpha,
            ],
        )?;

        // 5. GEMM 2 with the router weight; with no_combine straight into the output.
        let mul_weight = !cfg.no_combine && !cfg.apply_router_weight_on_input;
        let out_ptr = out.cuda_ptr()?;
        let c3 = if cfg.no_combine {
            st.memset(out_ptr, out.size_in_bytes())?;
            out_ptr
        } else {
            ws.c3.cuda_ptr()?
        };
        let gemm2 = GemmCall {
            a: a2,
            b: w.w2,
            c: c3,
            a_scale: a2_scale,
            b_scale: w.s2,
            weights: if mul_weight { weights } else { null },
            n: h,
            k: i,
        };
        st.gemm(
            tile,
            kind,
            &GemmRows {
                a_row_div: 1,
                ..rows1
            },
            &gemm2,
        )?;

        // 6. Top-k sum with the routed scaling factor, its one owner on this path.
        if !cfg.no_combine {
            // Column chunks of 512 (two per thread), so a decode batch fills many blocks.
            let chunks = h.div_ceil(512);
            st.plain(
                rows(0),
                "moe_sum",
                m * chunks,
                256,
                &[
                    &c3,
                    &ids,
                    &out_ptr,
                    &(k as i32),
                    &(h as i32),
                    &cfg.output_scale(),
                    &(chunks as i32),
                ],
            )?;
        }
        Ok(())
    }
}

fn as_weights(quant: &dyn QuantInfo) -> Result<&dyn ExpertWeights> {
    moe_runner_core::as_expert_weights(quant)
}

impl FusedRunner for TritonRunner {
    fn run_into(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
        out: &Tensor,
    ) -> Result<()> {
        TritonRunner::run_into(self, input, quant, out)
    }

    fn run(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
    ) -> Result<Box<dyn CombineInput>> {
        let d =
            downcast_dispatch::<StandardDispatchOutput>(input, RUNNER, DispatchFormat::Standard)?;
        let m = d.num_tokens();
        let shape = self.cfg.output_shape(m);
        // In place: the sum, the last stage, writes over the hidden buffer, which every earlier
        // stage has finished reading by then (one stream orders them).
        let out = if self.cfg.inplace {
            d.hidden.clone()
        } else {
            Tensor::zeros_cuda(self.device(), &shape, d.hidden.dtype())?
        };
        self.run_into(input, quant, &out)?;
        Ok(Box::new(StandardCombineInput { hidden: out }))
    }
}
