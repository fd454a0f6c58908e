//! The `triton` runner: the fused MoE pipeline of SGLang's and vLLM's Triton kernel, in CUDA C.
//! Per forward pass, all on the device's stream with no host synchronization (so a layer can be
//! captured in a CUDA graph): align, input quantization where the scheme needs it, grouped
//! GEMM 1 with gather, activation (+ requantization), grouped GEMM 2 with the router weight,
//! top-k sum with the routed scaling factor.

use moe_runner_core::cuda::cudarc::driver::{
    result as cu, CudaFunction, LaunchConfig, PushKernelArg,
};
use moe_runner_core::registry::FusedRunner;
use moe_runner_core::{
    downcast_dispatch, downcast_quant, ActivationKernel, CombineInput, CudaDevice, DType,
    DenseWeights, Device, DispatchFormat, DispatchOutput, ExpertWeights, Fp8BlockWeights,
    Fp8PerChannelWeights, Fp8PerTensorWeights, GateUpLayout, MoeError, MoeRunnerConfig, QuantInfo,
    QuantScheme, Result, StandardCombineInput, StandardDispatchOutput, Tensor,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::kernels::{GemmKind, GemmTile, Kernels, RowKind};
use crate::tile_config::{
    config_file_name, default_tile, find_tuned, search_dirs, TileConfig, TunedConfigs,
};
use crate::RUNNER;

fn dev_err(e: impl std::fmt::Display) -> MoeError {
    MoeError::Device(e.to_string())
}

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

/// Weight pointers and scales of the scheme being run.
struct DeviceWeights {
    w13: u64,
    w2: u64,
    s13: u64,
    s2: u64,
    /// Static per-tensor activation scales, when the checkpoint has them.
    a13_static: Option<f32>,
    a2_static: Option<f32>,
}

pub struct TritonRunner {
    cfg: MoeRunnerConfig,
    dev: CudaDevice,
    kernels: Kernels,
    act: ActivationKernel,
    tuned: Mutex<Option<Option<TunedConfigs>>>,
    /// A tile that overrides the tuned and default ones (the tuner and tests sweep tiles).
    forced: Mutex<Option<TileConfig>>,
    config_dir: Option<PathBuf>,
    workspace: Mutex<Option<Workspace>>,
    /// Whether blocks of 64+ rows use wgmma (on by default on sm_90; `MOE_TRITON_WGMMA=0` or
    /// [`TritonRunner::set_wgmma`] turn it off).
    wgmma: AtomicBool,
}

/// Most BLOCK_M blocks the align can produce: each expert that gets rows adds at most one
/// partly filled block, and at most min(E, numel) experts get rows. This bounds the GEMM grids,
/// so a decode batch launches a handful of row blocks, not one per expert.
fn max_blocks(numel: usize, experts: usize, block_m: usize) -> usize {
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
        let kernels = Kernels::new(&dev)?;
        let hopper = dev.compute_capability()? == (9, 0);
        let wgmma = hopper && std::env::var("MOE_TRITON_WGMMA").map_or(true, |v| v != "0");
        Ok(Self {
            cfg: cfg.clone(),
            dev,
            kernels,
            act: cfg.activation_kernel()?,
            tuned: Mutex::new(None),
            forced: Mutex::new(None),
            config_dir,
            workspace: Mutex::new(None),
            wgmma: AtomicBool::new(wgmma),
        })
    }

    /// Turns the wgmma path for blocks of 64+ rows on or off (it needs sm_90).
    pub fn set_wgmma(&self, on: bool) -> Result<()> {
        if on && self.dev.compute_capability()? != (9, 0) {
            return Err(MoeError::invalid("wgmma", "needs a Hopper GPU (sm_90)"));
        }
        self.wgmma.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Uses `tile` for every batch size until cleared with `None`.
    pub fn force_tile(&self, tile: Option<TileConfig>) -> Result<()> {
        *self
            .forced
            .lock()
            .map_err(|_| dev_err("tile lock poisoned"))? = tile;
        Ok(())
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// The tile for `m` tokens: the nearest entry of the tuned file for this shape and device,
    /// or the default (logged once when no file exists).
    pub fn tile_for(&self, m: usize, scheme: QuantScheme) -> Result<TileConfig> {
        if let Some(t) = *self
            .forced
            .lock()
            .map_err(|_| dev_err("tile lock poisoned"))?
        {
            return Ok(t);
        }
        let mut tuned = self
            .tuned
            .lock()
            .map_err(|_| dev_err("tuned lock poisoned"))?;
        if tuned.is_none() {
            use moe_runner_core::DeviceOps;
            let name = config_file_name(
                self.cfg.num_experts,
                self.cfg.intermediate_size,
                &Device::Cuda(self.dev.clone()).name(),
                scheme,
            );
            let found = find_tuned(&search_dirs(self.config_dir.as_deref()), &name)?;
            match &found {
                Some(c) => tracing::info!(file = %c.path.display(), "tuned MoE configs"),
                None => {
                    tracing::info!(file = %name, "no tuned MoE config file; using default tiles")
                }
            }
            *tuned = Some(found);
        }
        Ok(match tuned.as_ref().and_then(|t| t.as_ref()) {
            Some(t) => t.nearest(m),
            None => default_tile(m * self.cfg.top_k, self.cfg.num_local_experts, scheme),
        })
    }

    fn weights(&self, quant: &dyn QuantInfo) -> Result<DeviceWeights> {
        // Scales are null for unscaled weights; static activation scales come only from
        // per-tensor checkpoints.
        let ptrs = |w13: &Tensor,
                    w2: &Tensor,
                    scales: Option<(&Tensor, &Tensor)>,
                    statics: (Option<f32>, Option<f32>)| {
            Ok::<_, MoeError>(DeviceWeights {
                w13: w13.cuda_ptr()?,
                w2: w2.cuda_ptr()?,
                s13: scales.map(|(s, _)| s.cuda_ptr()).transpose()?.unwrap_or(0),
                s2: scales.map(|(_, s)| s.cuda_ptr()).transpose()?.unwrap_or(0),
                a13_static: statics.0,
                a2_static: statics.1,
            })
        };
        match quant.scheme() {
            QuantScheme::Bf16 | QuantScheme::F16 => {
                let d = downcast_quant::<DenseWeights>(quant)?;
                ptrs(&d.w13, &d.w2, None, (None, None))
            }
            QuantScheme::Fp8Block128 => {
                let d = downcast_quant::<Fp8BlockWeights>(quant)?;
                ptrs(
                    &d.w13,
                    &d.w2,
                    Some((&d.w13_scale, &d.w2_scale)),
                    (None, None),
                )
            }
            QuantScheme::Fp8PerTensor => {
                let d = downcast_quant::<Fp8PerTensorWeights>(quant)?;
                ptrs(
                    &d.w13,
                    &d.w2,
                    Some((&d.w13_scale, &d.w2_scale)),
                    (d.a13_scale, d.a2_scale),
                )
            }
            QuantScheme::Fp8PerChannel => {
                let d = downcast_quant::<Fp8PerChannelWeights>(quant)?;
                ptrs(
                    &d.w13,
                    &d.w2,
                    Some((&d.w13_scale, &d.w2_scale)),
                    (None, None),
                )
            }
            other => Err(MoeError::invalid(
                "quant scheme",
                format!("the triton runner does not run {other}"),
            )),
        }
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
            let z = |shape: &[usize], dt: DType| Tensor::zeros_cuda(&self.dev, shape, dt);
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

    fn launch(
        &self,
        f: &CudaFunction,
        grid: usize,
        threads: usize,
        smem: usize,
        args: &[&dyn Arg],
    ) -> Result<()> {
        if grid == 0 {
            return Ok(());
        }
        let stream = self.dev.stream();
        let mut b = stream.launch_builder(f);
        for a in args {
            a.push(&mut b);
        }
        let cfg = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: every pointer argument is a live device allocation sized for this launch by
        // `workspace` or checked against the config by `check_shapes`.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(dev_err)
    }

    fn memset(&self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: `ptr` is a live allocation of at least `bytes` on this stream.
        unsafe { cu::memset_d8_async(ptr, 0, bytes, self.dev.stream().cu_stream()) }
            .map_err(dev_err)
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
        let w = self.weights(quant)?;
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
        let (sorted, eids, npp) = (
            ws.sorted_ids.cuda_ptr()?,
            ws.expert_ids.cuda_ptr()?,
            ws.num_post_padded.cuda_ptr()?,
        );
        let scalars = ws.scalars.cuda_ptr()?;
        let bm = tile.block_m;
        let max_blocks = max_blocks(numel, e, bm);
        let max_sorted_rows = max_blocks * bm;

        // 1. Align.
        self.launch(
            self.kernels.align(),
            1,
            1024,
            (3 * e + 1) * 4,
            &[
                &ids,
                &(numel as i32),
                &(e as i32),
                &(bm as i32),
                &sorted,
                &eids,
                &npp,
                &(max_sorted_rows as i32),
                &(max_blocks as i32),
            ],
        )?;

        // 2. GEMM 1's input: quantized, and/or weighted when the router weight goes on the input.
        let quant_mode = match scheme {
            QuantScheme::Fp8Block128 => 1,
            QuantScheme::Fp8PerChannel => 2,
            QuantScheme::Fp8PerTensor => 3,
            _ => 0,
        };
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
                self.per_tensor_scale(
                    w.a13_static,
                    scalars,
                    rows(4),
                    "moe_quant_input",
                    m,
                    &[&hidden, &row_weight, &null, &null, &scalars, &(h as i32)],
                )?;
            }
            let f = self.kernels.row(rows(quant_mode), "moe_quant_input")?;
            self.launch(
                &f,
                m,
                256,
                0,
                &[&hidden, &row_weight, &a1, &scale_ptr, &null, &(h as i32)],
            )?;
            (a1, scale_ptr)
        };

        // 3. GEMM 1: C1[id] = A1[id / k] x w13[e]^T.
        let c1 = ws.c1.cuda_ptr()?;
        self.gemm(
            tile, kind, a1, w.w13, c1, a1_scale, w.s13, null, sorted, eids, npp, n1, h, numel, k,
            false, max_blocks,
        )?;

        // 4. Activation, with GEMM 2's input rounding.
        let (a2, a2s) = (ws.a2.cuda_ptr()?, ws.a2_scale.cuda_ptr()?);
        let scalar2 = scalars + 4;
        let a2_scale = if quant_mode == 3 { scalar2 } else { a2s };
        let (a2_out, a2_scale_out) = if quant_mode == 0 {
            (a2, null)
        } else {
            (a2, a2_scale)
        };
        if quant_mode == 3 {
            self.per_tensor_scale(
                w.a2_static,
                scalar2,
                rows(4),
                "moe_act",
                numel,
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
        let f = self.kernels.row(rows(quant_mode), "moe_act")?;
        self.launch(
            &f,
            numel,
            256,
            0,
            &[
                &c1,
                &ids,
                &a2_out,
                &a2_scale_out,
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
            self.memset(out_ptr, out.size_in_bytes())?;
            out_ptr
        } else {
            ws.c3.cuda_ptr()?
        };
        self.gemm(
            tile,
            kind,
            a2,
            w.w2,
            c3,
            a2_scale_out,
            w.s2,
            weights,
            sorted,
            eids,
            npp,
            h,
            i,
            numel,
            1,
            mul_weight,
            max_blocks,
        )?;

        // 6. Top-k sum with the routed scaling factor, its one owner on this path.
        if !cfg.no_combine {
            let f = self.kernels.row(rows(0), "moe_sum")?;
            // Column chunks of 512 (two per thread), so a decode batch fills many blocks.
            let chunks = h.div_ceil(512);
            self.launch(
                &f,
                m * chunks,
                256,
                0,
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

    /// Puts a per-tensor activation scale at `dst`: the static one, or max(amax, 1e-4) / 448
    /// of the rows `pass` (the amax variant of a row kernel) reads.
    fn per_tensor_scale(
        &self,
        fixed: Option<f32>,
        dst: u64,
        amax_kind: RowKind,
        kernel: &'static str,
        rows: usize,
        amax_args: &[&dyn Arg],
    ) -> Result<()> {
        let fill = self.kernels.row(amax_kind, "moe_fill")?;
        match fixed {
            Some(s) => self.launch(&fill, 1, 32, 0, &[&dst, &s]),
            None => {
                self.launch(&fill, 1, 32, 0, &[&dst, &0.0f32])?;
                let f = self.kernels.row(amax_kind, kernel)?;
                self.launch(&f, rows, 256, 0, amax_args)?;
                let to_scale = self.kernels.row(amax_kind, "moe_amax_to_scale")?;
                self.launch(&to_scale, 1, 32, 0, &[&dst])
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        tile: GemmTile,
        kind: GemmKind,
        a: u64,
        b: u64,
        c: u64,
        a_scale: u64,
        b_scale: u64,
        weights: u64,
        sorted: u64,
        eids: u64,
        npp: u64,
        n: usize,
        k: usize,
        numel: usize,
        a_row_div: usize,
        mul_weight: bool,
        m_blocks: usize,
    ) -> Result<()> {
        let f = self.kernels.gemm(tile, kind)?;
        let n_blocks = n.div_ceil(tile.block_n);
        let args: [&dyn Arg; 15] = [
            &a,
            &b,
            &c,
            &a_scale,
            &b_scale,
            &weights,
            &sorted,
            &eids,
            &npp,
            &(n as i32),
            &(k as i32),
            &(numel as i32),
            &(a_row_div as i32),
            &i32::from(mul_weight),
            &(m_blocks as i32),
        ];
        self.launch(
            &f,
            m_blocks * n_blocks,
            tile.threads(),
            tile.smem_bytes(kind, k),
            &args,
        )
    }
}

/// A kernel argument (device pointers are passed as u64).
pub(crate) trait Arg {
    fn push<'a>(&'a self, b: &mut moe_runner_core::cuda::cudarc::driver::LaunchArgs<'a>);
}
macro_rules! impl_arg {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn push<'a>(&'a self, b: &mut moe_runner_core::cuda::cudarc::driver::LaunchArgs<'a>) {
                b.arg(self);
            }
        }
    )*};
}
impl_arg!(u64, i32, f32);

fn as_weights(quant: &dyn QuantInfo) -> Result<&dyn ExpertWeights> {
    moe_runner_core::as_expert_weights(quant)
}

fn gate_up_code(l: GateUpLayout) -> u8 {
    match l {
        GateUpLayout::GateUp => 0,
        GateUpLayout::UpGate => 1,
        GateUpLayout::Interleaved => 2,
    }
}

/// (ACT code, limit, alpha) of the activation kernel.
fn act_params(a: ActivationKernel) -> (u8, f32, f32) {
    match a {
        ActivationKernel::SiluAndMul(_) => (0, 0.0, 0.0),
        ActivationKernel::GeluAndMul(_) => (1, 0.0, 0.0),
        ActivationKernel::LimitedSwiglu(s) => (2, s.limit, 0.0),
        ActivationKernel::ClampAfterSilu(s) => (3, s.limit, 0.0),
        ActivationKernel::GptOssSwiglu(s) => (4, s.limit, s.alpha),
        ActivationKernel::SiluPlain(_) => (5, 0.0, 0.0),
        ActivationKernel::GeluPlain(_) => (6, 0.0, 0.0),
    }
}

impl FusedRunner for TritonRunner {
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
            Tensor::zeros_cuda(&self.dev, &shape, d.hidden.dtype())?
        };
        self.run_into(input, quant, &out)?;
        Ok(Box::new(StandardCombineInput { hidden: out }))
    }
}
