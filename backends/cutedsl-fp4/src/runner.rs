//! The `cutedsl_fp4` runner. Per forward pass, on the device's stream and with nothing waiting
//! for the host: the row tiles from the per-expert counts; the activations to NVFP4 values
//! (each expert's input global scale; kept as code times block scale in f16, which is exact,
//! or rounded to E4M3 when the weights ask for E4M3 products); GEMM 1 (`w13`,
//! alpha = 1 / (gs_a * gs_w)) to bf16; the activation with its requantization to NVFP4 fused
//! (with E4M3 products at decode sizes, for gated activations whose gate and up are the halves
//! of `w13`, in GEMM 1's epilogue: `Fp4Kernels::gemm1_act_for`); GEMM 2 (`w2`) to bf16 (after
//! such a GEMM 1, at items of 48 and 64 rows, started before GEMM 1 has finished: `Order`). The
//! masked layout writes GEMM 2 straight into its output (the low-latency combine buffer when the
//! dispatcher registered one); the standard layout first groups its tokens per expert (a
//! pre-permute that the quantization reads through, so no gathered copy of the bf16 rows is
//! made; with E4M3 products and one input global scale for every expert, each token is
//! quantized once and its row written to each of its picks: `quantize_tokens_once`) and sums the
//! top-k after (or, with `no_combine`, leaves `[M, k, H]`; in place over the input with
//! `inplace`; the router weight on the input with `apply_router_weight_on_input`).

use moe_backend_triton::stages::{act_params, launch, launch_2d};
use moe_runner_core::registry::{DeviceKind, FusedFunc, FusedRunner};
use moe_runner_core::{
    as_expert_weights, downcast_dispatch, downcast_quant, CombineInput, CudaDevice, DType,
    DeepEpLlCombineInput, DeepEpLlDispatchOutput, Device, DispatchFormat, DispatchOutput, MoeError,
    MoeRunnerConfig, Nvfp4Products, Nvfp4Weights, QuantInfo, QuantScheme, Result, ScaleLayout,
    StandardCombineInput, StandardDispatchOutput, Tensor,
};
use std::sync::{Mutex, MutexGuard};

use crate::kernels::{Fp4Kernels, GemmArgs, GemmPlan, SEGMENT};
use crate::order::{launch_dependent, Order};
use crate::tma::{Elem, ShortBoxes, TensorMap};
use crate::RUNNER;

/// A wgmma GEMM launch over a K of at most this takes the instantiation that writes C through
/// shared memory, holding the last stage's ring slot for it (or, on two consumer warpgroups
/// with E4M3 products, a buffer of its own beside a ring that may be a slot shorter, whose
/// stores three producer warps make: `GemmPlan::staged`). There the lane-by-lane stores of C
/// are a large share of an item: H100, DeepSeek-V3 shapes, GEMM 2 (K = 2048) took 5% to 7% less
/// time at 4096 tokens and 6% less at 2048 with E4M3 products, and 1.5% to 2.5% less at 32 rows
/// per expert (no change at 1 row). GEMM 1 (K = 7168) gained nothing measurable (-3% to +3%),
/// its ring one slot shorter while C is written. A kernel that also held the staged path
/// measured 1% to 3% slower at decode, so it is a separate instantiation.
const STAGED_MAX_K: usize = 2048;
/// The standard layout's routing over several blocks (route.cu, `fp4_route_count` and
/// `fp4_route_rows`): at most this many, each taking at least `ROUTE_MIN_PICKS` picks; fewer
/// picks take the one-block `fp4_route`, which saves a launch.
const ROUTE_BLOCKS: usize = 64;
const ROUTE_MIN_PICKS: usize = 512;
/// Threads of a routing block (route.cu, `ROUTE_THREADS`).
const ROUTE_THREADS: usize = 256;

/// Device buffers of one forward pass, sized for the largest batch seen, then reused.
struct Workspace {
    /// Rows of the row space and picks (M * k) it was sized for.
    rows: usize,
    picks: usize,
    /// GEMM 1's and GEMM 2's inputs: NVFP4 values (code times block scale) in f16, or E4M3
    /// bytes (in the first half) for E4M3 products in the wgmma kernel; rows of whole
    /// 256-value segments in the GEMM's block order.
    a1: Tensor,
    c1: Tensor,
    a2: Tensor,
    /// `[1] i32` i32::MAX: the count of `fp4_quant_rows` run over the tokens as one expert of
    /// `cap` = M rows.
    all_rows: Tensor,
    /// GEMM 2's rows before the top-k sum (standard layout only).
    y: Tensor,
    counts: Tensor,
    row0: Tensor,
    tile_start: Tensor,
    /// `[1 + row tiles] i32`: GEMM 1's finished items, all and over each row tile, for a GEMM 2
    /// launched before GEMM 1 has finished (`Order`).
    done: Tensor,
    src: Tensor,
    slot_of: Tensor,
    /// `[ROUTE_BLOCKS, E] i32`: each routing block's picks per expert (route.cu,
    /// `fp4_route_count`).
    route_hist: Tensor,
    /// Bit 0: an expert count outside 0..=rows per expert.
    status: Tensor,
}

/// The weights' per-expert scalars on the device, and their block scales in the swizzled
/// layout when they came linear (checkpoint form): made once per set of weights, at warm-up.
struct Globals {
    /// Which weights these belong to: the device addresses of their tensors and their
    /// per-expert scalars (new weights at a freed address still differ in the latter).
    key: (Vec<u64>, Vec<f32>),
    alpha1: Tensor,
    alpha2: Tensor,
    gs1: Tensor,
    gs2: Tensor,
    /// Swizzled `w13` / `w2` scales, when the weights' own are linear.
    swizzled: Option<(Tensor, Tensor)>,
}

pub struct Fp4Runner {
    cfg: MoeRunnerConfig,
    dev: CudaDevice,
    /// Multiprocessors: the GEMM grid is sized to fill them, its blocks looping over work items.
    sms: usize,
    kernels: Fp4Kernels,
    /// Activation code, limit and alpha (as the triton row kernels take them).
    act: (u8, f32, f32),
    ws: Mutex<Option<Workspace>>,
    globals: Mutex<Option<Globals>>,
}

/// Where the rows of one pass live.
#[derive(Clone, Copy)]
struct Rows {
    /// `[E] i32` valid rows per expert.
    counts: u64,
    /// `[E] i32` first row of each expert (128-aligned), or 0 for `e * cap`.
    row0: u64,
    /// Rows per expert at most.
    cap: usize,
    /// Rows of the row space (the GEMM inputs' rows).
    total: usize,
    /// Rows per expert expected (tokens * top-k / experts): picks the GEMM's item size.
    expected: usize,
    /// Source rows of GEMM 1's input: 0 when row r reads activation row r, else `[rows] i32`.
    src: u64,
    /// `[source rows] f32` router weights to multiply the input by, or 0.
    in_weight: u64,
    /// NVFP4 rows from the dispatcher (codes, E4M3 scales), already quantized with the weights'
    /// input global scale: expanded instead of quantized. `None`: bf16 rows at `x`.
    nvfp4_in: Option<(u64, u64)>,
    /// The standard layout quantizes each token once and writes its row to each of its picks
    /// (`quantize_tokens_once`): `[M * k] i32` the row of each (token, pick), or -1, and k.
    tokens_once: Option<(u64, usize)>,
}

fn poisoned() -> MoeError {
    MoeError::Device("cutedsl_fp4 state poisoned by a panic".into())
}

/// Checks activations the runner quantizes itself: bf16 of `shape`, with no scales.
fn bf16_input(hidden: &Tensor, scale: Option<&Tensor>, shape: &[usize]) -> Result<()> {
    hidden.expect_shape("hidden", shape)?;
    hidden.expect_dtype(
        "hidden (bf16, which the runner quantizes, or NVFP4 from the low-latency dispatch)",
        &[DType::Bf16],
    )?;
    if scale.is_some() {
        return Err(MoeError::invalid(
            "hidden_scale",
            "given for bf16 activations, which cutedsl_fp4 quantizes itself",
        ));
    }
    Ok(())
}

/// Values per row of a GEMM input of width `k`: whole segments.
fn padded(k: usize) -> usize {
    k.div_ceil(SEGMENT) * SEGMENT
}

/// Whether the standard layout quantizes each token once, writing its row to each of its picks'
/// rows, rather than quantizing every pick: with E4M3 products, where every expert has the same
/// input global scale (`a13_global`, as checkpoints whose activations are quantized before the
/// dispatch have), no router weight goes on the input (it differs per pick), and a token has at
/// least two local picks on average (top-k times the local share of the experts). With about
/// one (wide expert parallelism) there is little to save, and tokens with no local pick would be
/// quantized for nothing. H100, 4096 tokens of DeepSeek-V3, Nsight Compute without flushing the
/// caches between kernels, as in a pass: with E4M3 products 112 us, against 302 quantizing each
/// pick, and 42 quantizing the tokens then 131 copying their rows to the picks (the kernel this
/// replaced). Exact products keep quantizing each pick: their rows are f16, twice the bytes,
/// and written to each pick this way they took 381 us against 302.
fn quantize_tokens_once(
    cfg: &MoeRunnerConfig,
    products: Nvfp4Products,
    a13_global: &[f32],
) -> bool {
    products == Nvfp4Products::E4m3
        && a13_global.windows(2).all(|p| p[0] == p[1])
        && !cfg.apply_router_weight_on_input
        && cfg.top_k * cfg.num_local_experts >= 2 * cfg.num_experts
}

impl Fp4Runner {
    pub fn new(cfg: &MoeRunnerConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        for (what, v) in [
            ("hidden_size", cfg.hidden_size),
            ("intermediate_size", cfg.intermediate_size),
        ] {
            if !v.is_multiple_of(32) {
                return Err(MoeError::NotDivisible {
                    what: format!("{what} for cutedsl_fp4 (FP4 pairs and 16-value blocks)"),
                    value: v,
                    divisor: 32,
                });
            }
        }
        let dev = device.as_cuda()?.clone();
        let act = act_params(cfg.activation_kernel()?);
        let sms = dev
            .context()
            .attribute(moe_runner_core::cuda::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| MoeError::Device(e.to_string()))? as usize;
        Ok(Self {
            sms,
            kernels: Fp4Kernels::new(&dev, act.0, cfg.gate_up)?,
            cfg: cfg.clone(),
            dev,
            act,
            ws: Mutex::new(None),
            globals: Mutex::new(None),
        })
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// Waits for the device and reports an expert count the kernels rejected.
    pub fn check(&self) -> Result<()> {
        let ws = self.ws.lock().map_err(|_| poisoned())?;
        let Some(ws) = ws.as_ref() else {
            return Ok(());
        };
        if ws.status.to_host()?.as_slice::<i32>()?[0] & 1 != 0 {
            return Err(MoeError::invalid(
                "masked_m",
                "an expert count outside 0..=the rows its buffer holds; the extra rows were not computed",
            ));
        }
        Ok(())
    }

    fn weights<'a>(&self, quant: &'a dyn QuantInfo) -> Result<&'a Nvfp4Weights> {
        let w = downcast_quant::<Nvfp4Weights>(quant)?;
        as_expert_weights(quant)?.dims().check(&self.cfg)?;
        for t in [&w.w13, &w.w13_scale, &w.w2, &w.w2_scale] {
            if t.cuda_device().is_none() {
                return Err(MoeError::invalid(
                    "weights",
                    "NVFP4 weights must be on the runner's GPU (Nvfp4Weights::to_device)",
                ));
            }
        }
        Ok(w)
    }

    /// The per-expert alphas and input global scales on the device, uploaded on first use of
    /// these weights (warm-up), then reused.
    fn globals(&self, w: &Nvfp4Weights) -> Result<MutexGuard<'_, Option<Globals>>> {
        let tensors = [&w.w13, &w.w13_scale, &w.w2, &w.w2_scale];
        let scalars = [&w.w13_global, &w.w2_global, &w.a13_global, &w.a2_global];
        let mut g = self.globals.lock().map_err(|_| poisoned())?;
        // Compared in place: nothing is allocated on the warm path.
        let same = |k: &(Vec<u64>, Vec<f32>)| -> Result<bool> {
            for (t, &p) in tensors.iter().zip(&k.0) {
                if t.cuda_ptr()? != p {
                    return Ok(false);
                }
            }
            Ok(scalars.iter().flat_map(|v| v.iter()).eq(k.1.iter()))
        };
        if let Some(old) = g.as_ref() {
            if same(&old.key)? {
                return Ok(g);
            }
        }
        let key = (
            tensors
                .iter()
                .map(|t| t.cuda_ptr())
                .collect::<Result<Vec<u64>>>()?,
            scalars.iter().flat_map(|v| v.iter().copied()).collect(),
        );
        let e = w.w13_global.len();
        let up = |v: Vec<f32>| -> Result<Tensor> {
            Tensor::from_slice(&v, &[e], DType::F32)?.to_device(&Device::Cuda(self.dev.clone()))
        };
        let alpha = |a: &[f32], b: &[f32]| -> Vec<f32> {
            a.iter().zip(b).map(|(x, y)| 1.0 / (x * y)).collect()
        };
        let swizzled = match w.scale_layout {
            ScaleLayout::Swizzled128x4 => None,
            ScaleLayout::Linear => {
                tracing::debug!("cutedsl_fp4: swizzling linear NVFP4 weight scales once");
                let k = crate::kernel_layout(w)?;
                Some((k.w13_scale, k.w2_scale))
            }
        };
        *g = Some(Globals {
            key,
            alpha1: up(alpha(&w.a13_global, &w.w13_global))?,
            alpha2: up(alpha(&w.a2_global, &w.w2_global))?,
            gs1: up(w.a13_global.clone())?,
            gs2: up(w.a2_global.clone())?,
            swizzled,
        });
        Ok(g)
    }

    fn workspace(&self, rows: usize, picks: usize) -> Result<MutexGuard<'_, Option<Workspace>>> {
        let mut ws = self.ws.lock().map_err(|_| poisoned())?;
        if ws
            .as_ref()
            .is_some_and(|w| w.rows >= rows && w.picks >= picks)
        {
            return Ok(ws);
        }
        let (rows, picks) = match ws.as_ref() {
            Some(w) => (rows.max(w.rows), picks.max(w.picks)),
            None => (rows, picks),
        };
        let cfg = &self.cfg;
        let (h, i, n1, e) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.gemm1_columns(),
            cfg.num_local_experts,
        );
        let z = |n: usize, dt: DType| Tensor::zeros_cuda(&self.dev, &[n.max(1)], dt);
        *ws = Some(Workspace {
            rows,
            picks,
            // The row kernels write every byte the GEMMs read, the padding of a partial
            // segment included (zeros), whatever layout wrote the buffer before.
            a1: z(rows * padded(h), DType::F16)?,
            c1: z(rows * n1, DType::Bf16)?,
            a2: z(rows * padded(i), DType::F16)?,
            all_rows: Tensor::from_slice(&[i32::MAX], &[1], DType::I32)?
                .to_device(&Device::Cuda(self.dev.clone()))?,
            y: z(if picks > 0 { rows * h } else { 0 }, DType::Bf16)?,
            counts: z(e, DType::I32)?,
            row0: z(e, DType::I32)?,
            tile_start: z(e + 1, DType::I32)?,
            // The row tiles' upper bound at the smallest item height (16).
            done: z(1 + rows.div_ceil(16) + e, DType::I32)?,
            src: z(if picks > 0 { rows } else { 0 }, DType::I32)?,
            slot_of: z(picks, DType::I32)?,
            route_hist: z(if picks > 0 { ROUTE_BLOCKS * e } else { 0 }, DType::I32)?,
            status: z(1, DType::I32)?,
        });
        tracing::debug!(rows, picks, "cutedsl_fp4 workspace sized");
        Ok(ws)
    }

    /// Quantize, GEMM 1, activation with requantization, GEMM 2 into `out` (`[rows, H]` bf16
    /// in the row space).
    fn experts(&self, w: &Nvfp4Weights, ws: &Workspace, r: Rows, x: u64, out: u64) -> Result<()> {
        let cfg = &self.cfg;
        let (h, i, n1, e) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.gemm1_columns(),
            cfg.num_local_experts,
        );
        let g = self.globals(w)?;
        let g = g.as_ref().expect("globals were just set");
        let k = &self.kernels;
        let (dev, cap, e_i) = (&self.dev, r.cap as i32, e as i32);
        let ts = ws.tile_start.cuda_ptr()?;
        let plan = k.gemm_for(r.expected, r.cap, w.products);
        // GEMM 1 with the activation in its epilogue where it applies (same items, same bm).
        let plan1 = k.gemm1_act_for(&plan, i);
        let plan2 = k.gemm2_for(&plan, plan1.is_some());
        let bm = plan.bm;
        // The GEMM inputs' layout (rows.cu): bit 0 the wgmma order, bit 1 E4M3 products.
        let layout = i32::from(plan.gemm.wg) | (i32::from(plan.gemm.f8) << 1);
        // Upper bound of the row tiles: each expert's count rounds up once.
        let tiles = (r.total.div_ceil(bm) + e).min(e * r.cap.div_ceil(bm));
        let bm_i = bm as i32;
        // A GEMM 2 that starts early waits on GEMM 1's counts (`Order`): the tiles kernel zeroes
        // them.
        let done = ws.done.cuda_ptr()?;
        let done_len = if plan2.early { 1 + tiles as i32 } else { 0 };
        launch(
            dev,
            &k.tiles,
            1,
            1024,
            0,
            &[
                &r.counts,
                &e_i,
                &cap,
                &bm_i,
                &ts,
                &ws.status.cuda_ptr()?,
                &done,
                &done_len,
            ],
        )?;
        // Row kernels: a thread per 16-value block, blocks striding over an expert's rows.
        let row_grid = |width: usize| (r.cap * width / 16).div_ceil(128 * 8).clamp(1, 64);
        let (a1, a2, c1) = (ws.a1.cuda_ptr()?, ws.a2.cuda_ptr()?, ws.c1.cuda_ptr()?);
        let (h_i, i_i) = (h as i32, i as i32);
        match (r.nvfp4_in, r.tokens_once) {
            (Some((codes, scales)), _) => launch_2d(
                dev,
                &k.expand_rows,
                (row_grid(h), e),
                128,
                0,
                &[
                    &codes, &scales, &r.counts, &r.row0, &cap, &h_i, &a1, &layout,
                ],
            )?,
            // The standard layout, where it pays (quantize_tokens_once): each token quantized
            // once, as one expert of M rows, and written to the row of each of its picks,
            // instead of quantizing a token once per pick.
            (None, Some((slot_of, top_k))) => {
                let (null, top_k) = (0u64, top_k as i32);
                // One expert: the whole grid on its rows, about eight blocks of 16 a thread.
                let blocks = (r.cap * h / 16).div_ceil(128 * 8).clamp(1, 4096);
                launch_2d(
                    dev,
                    &k.quant_rows,
                    (blocks, 1),
                    128,
                    0,
                    &[
                        &x,
                        &null,
                        &null,
                        &ws.all_rows.cuda_ptr()?,
                        &null,
                        &cap,
                        &h_i,
                        &g.gs1.cuda_ptr()?,
                        &a1,
                        &layout,
                        &slot_of,
                        &top_k,
                    ],
                )?;
            }
            (None, None) => launch_2d(
                dev,
                &k.quant_rows,
                (row_grid(h), e),
                128,
                0,
                &[
                    &x,
                    &r.src,
                    &r.in_weight,
                    &r.counts,
                    &r.row0,
                    &cap,
                    &h_i,
                    &g.gs1.cuda_ptr()?,
                    &a1,
                    &layout,
                    &0u64,
                    &0i32,
                ],
            )?,
        }
        // C[rows, n] = A[rows, kk] W[e, n, kk]^T: the weights' codes and A's rows through TMA
        // maps made for this pass's buffers.
        let (_, limit, alpha_act) = self.act;
        let gs2 = g.gs2.cuda_ptr()?;
        let gemm = |plan: &GemmPlan<'_>,
                    a: u64,
                    wt: &Tensor,
                    w_sf: &Tensor,
                    alpha: &Tensor,
                    c: u64,
                    n: usize,
                    kk: usize,
                    order: Order|
         -> Result<()> {
            let gk = plan.gemm;
            // With the activation in the epilogue, an item's rows of each half of W by a box
            // each.
            let box_rows = if gk.act { gk.item_n / 2 } else { gk.item_n };
            let w_map = TensorMap::tiled(
                wt.cuda_ptr()?,
                Elem::U8,
                &[kk as u64 / 2, n as u64, e as u64],
                &[kk as u64 / 2, (n * kk / 2) as u64],
                &[128, box_rows as u32, 1],
            )?;
            // Boxes of 128 bytes: 64 f16 values, or 128 E4M3 bytes for the wgmma kernel's E4M3
            // products.
            let (elem, size) = if gk.wg && gk.f8 {
                (Elem::U8, 1)
            } else {
                (Elem::F16, 2)
            };
            // A's boxes of an item: bm rows, or for a wgmma item of fewer rows the shortest of
            // 16, 32, 64 and 128 rows that holds them (gemm.cu, fp4_gemm).
            let a_box = |rows: usize| {
                TensorMap::tiled(
                    a,
                    elem,
                    &[padded(kk) as u64, r.total as u64],
                    &[(size * padded(kk)) as u64],
                    &[128 / size as u32, rows as u32],
                )
            };
            let a_map = a_box(bm)?;
            let a_short = ShortBoxes([a_box(16)?, a_box(32)?, a_box(64)?, a_box(128)?]);
            // C through shared memory (STAGED_MAX_K), where C's rows start and end on 16 bytes
            // (the runner's own buffers do; an output the caller gives may not).
            let staged_fits = kk <= STAGED_MAX_K;
            let aligned = c.is_multiple_of(16) && n.is_multiple_of(8);
            // That instantiation may keep a C buffer beside a shallower ring (`GemmPlan::staged`).
            let (f, plan) = match &gk.staged {
                Some(staged) if staged_fits && aligned => (staged, plan.staged()),
                _ => (&gk.f, *plan),
            };
            let (done, wait, wait_for) = order.args();
            let args = GemmArgs {
                w_sf: w_sf.cuda_ptr()?,
                counts: r.counts,
                row0: r.row0,
                tile_start: ts,
                alpha: alpha.cuda_ptr()?,
                c,
                cap,
                experts: e_i,
                n: n as i32,
                k: kk as i32,
                bm: bm_i,
                stages: plan.stages as i32,
                act: if gk.act { a2 } else { 0 },
                act_gs: if gk.act { gs2 } else { 0 },
                act_limit: limit,
                act_alpha: alpha_act,
                act_layout: layout,
                done,
                wait,
                wait_for,
            };
            // Persistent blocks, as many as fit; each loops over work items, so experts
            // without rows cost nothing.
            let items = tiles * n.div_ceil(gk.item_n);
            let grid = items.min(gk.per_sm * self.sms);
            match order {
                Order::Wait(..) => launch_dependent(
                    dev,
                    f,
                    grid,
                    gk.threads,
                    plan.smem,
                    &mut [
                        std::ptr::from_ref(&w_map).cast_mut().cast(),
                        std::ptr::from_ref(&a_map).cast_mut().cast(),
                        std::ptr::from_ref(&a_short).cast_mut().cast(),
                        std::ptr::from_ref(&args).cast_mut().cast(),
                    ],
                ),
                _ => launch(
                    dev,
                    f,
                    grid,
                    gk.threads,
                    plan.smem,
                    &[&w_map, &a_map, &a_short, &args],
                ),
            }
        };
        let (s13, s2) = match &g.swizzled {
            Some((a, b)) => (a, b),
            None => (&w.w13_scale, &w.w2_scale),
        };
        let order2 = match &plan1 {
            // GEMM 1 writes GEMM 2's input itself. A GEMM 2 that starts early (as GEMM 1's blocks
            // finish) waits for each row tile until GEMM 1's items over it, one every 128
            // columns of the intermediate (gemm.cu, EPI_ACT), have been counted.
            Some(p1) if plan2.early => {
                gemm(
                    p1,
                    a1,
                    &w.w13,
                    s13,
                    &g.alpha1,
                    0,
                    n1,
                    h,
                    Order::Signal(done),
                )?;
                Order::Wait(done, i.div_ceil(p1.gemm.item_n / 2) as i32)
            }
            Some(p1) => {
                gemm(p1, a1, &w.w13, s13, &g.alpha1, 0, n1, h, Order::Stream)?;
                Order::Stream
            }
            None => {
                gemm(&plan, a1, &w.w13, s13, &g.alpha1, c1, n1, h, Order::Stream)?;
                launch_2d(
                    dev,
                    &k.act_quant,
                    (row_grid(i), e),
                    128,
                    0,
                    &[
                        &c1, &r.counts, &r.row0, &cap, &i_i, &limit, &alpha_act, &gs2, &a2, &layout,
                    ],
                )?;
                Order::Stream
            }
        };
        gemm(&plan2.plan, a2, &w.w2, s2, &g.alpha2, out, h, i, order2)
    }

    fn run_masked(
        &self,
        d: &DeepEpLlDispatchOutput,
        quant: &dyn QuantInfo,
        out: &Tensor,
    ) -> Result<()> {
        let w = self.weights(quant)?;
        let cfg = &self.cfg;
        if cfg.apply_router_weight_on_input || cfg.no_combine || cfg.inplace {
            return Err(MoeError::Config(
                "the masked layout applies router weights and sums in its combine: apply_router_weight_on_input, no_combine and inplace do not apply".into(),
            ));
        }
        let [el, rt, h] = d.dims()?;
        let nvfp4_in = match d.hidden.dtype() {
            DType::E2M1x2 => Some(self.nvfp4_input(d, w, rt)?),
            _ => {
                bf16_input(
                    &d.hidden,
                    d.hidden_scale.as_ref(),
                    &[cfg.num_local_experts, rt, cfg.hidden_size],
                )?;
                None
            }
        };
        d.masked_m.expect_shape("masked_m", &[el])?;
        d.masked_m.expect_dtype("masked_m", &[DType::I32])?;
        if d.masked_m.is_host() {
            if let Some((e, c)) = d
                .masked_m
                .as_slice::<i32>()?
                .iter()
                .enumerate()
                .find(|(_, &c)| c < 0 || c as usize > rt)
            {
                return Err(MoeError::invalid(
                    "masked_m",
                    format!("expert {e} has {c} rows; the buffer holds 0..={rt}"),
                ));
            }
        }
        out.expect_shape("masked output", &[el, rt, h])?;
        out.expect_dtype("masked output", &[DType::Bf16])?;
        if el * rt == 0 {
            return Ok(());
        }
        let moved;
        let masked_m = if d.masked_m.is_host() {
            moved = d.masked_m.to_device(&Device::Cuda(self.dev.clone()))?;
            &moved
        } else {
            &d.masked_m
        };
        let ws = self.workspace(el * rt, 0)?;
        let ws = ws.as_ref().expect("workspace was just sized");
        let rows = Rows {
            counts: masked_m.cuda_ptr()?,
            row0: 0,
            cap: rt,
            total: el * rt,
            expected: d.expected_m,
            src: 0,
            in_weight: 0,
            nvfp4_in,
            tokens_once: None,
        };
        self.experts(w, ws, rows, d.hidden.cuda_ptr()?, out.cuda_ptr()?)
    }

    /// Checks NVFP4 activations from the dispatcher: their shapes, and that they were quantized
    /// with the weights' input global scale, which the GEMM's alpha assumes. Returns the codes
    /// and scales.
    fn nvfp4_input(
        &self,
        d: &DeepEpLlDispatchOutput,
        w: &Nvfp4Weights,
        rt: usize,
    ) -> Result<(u64, u64)> {
        let (el, h) = (self.cfg.num_local_experts, self.cfg.hidden_size);
        d.hidden
            .expect_shape("masked hidden (NVFP4)", &[el, rt, h / 2])?;
        let scales = d.hidden_scale.as_ref().ok_or_else(|| {
            MoeError::invalid(
                "hidden_scale",
                "NVFP4 activations need their E4M3 block scales",
            )
        })?;
        scales.expect_dtype("hidden_scale", &[DType::F8E4M3])?;
        scales.expect_shape("hidden_scale", &[el, rt, h / 16])?;
        let gs = d.hidden_global_scale.ok_or_else(|| {
            MoeError::invalid(
                "hidden_global_scale",
                "NVFP4 activations need their global scale",
            )
        })?;
        if let Some((e, &a)) = w.a13_global.iter().enumerate().find(|(_, &a)| a != gs) {
            return Err(MoeError::invalid(
                "hidden_global_scale",
                format!(
                    "the dispatcher quantized with global scale {gs}; expert {e}'s input global scale is {a} (set DispatcherConfig::nvfp4_global_scale to the weights' a13_global)"
                ),
            ));
        }
        Ok((d.hidden.cuda_ptr()?, scales.cuda_ptr()?))
    }

    fn run_standard(
        &self,
        d: &StandardDispatchOutput,
        quant: &dyn QuantInfo,
        out: &Tensor,
    ) -> Result<()> {
        let w = self.weights(quant)?;
        let cfg = &self.cfg;
        let (h, e) = (cfg.hidden_size, cfg.num_local_experts);
        let [m, _] = d.hidden.dims::<2>("hidden")?;
        bf16_input(&d.hidden, d.hidden_scale.as_ref(), &[m, h])?;
        let k = cfg.top_k;
        d.topk.ids.expect_shape("topk_ids", &[m, k])?;
        out.expect_shape("output", &cfg.output_shape(m))?;
        out.expect_dtype("output", &[DType::Bf16])?;
        if m == 0 {
            return Ok(());
        }
        let device = Device::Cuda(self.dev.clone());
        let moved;
        let topk = if d.topk.ids.is_host() || d.topk.weights.is_host() {
            moved = d.topk.to_device(&device)?;
            &moved
        } else {
            &d.topk
        };
        let picks = m * k;
        let tokens_once = quantize_tokens_once(cfg, w.products, &w.a13_global);
        let ws = self.workspace(picks, picks)?;
        let ws = ws.as_ref().expect("workspace was just sized");
        let (counts, row0, src, slot_of) = (
            ws.counts.cuda_ptr()?,
            ws.row0.cuda_ptr()?,
            ws.src.cuda_ptr()?,
            ws.slot_of.cuda_ptr()?,
        );
        let (picks_i, k_i, e_i) = (picks as i32, k as i32, e as i32);
        let ids = topk.ids.cuda_ptr()?;
        let blocks = picks.div_ceil(ROUTE_MIN_PICKS).clamp(1, ROUTE_BLOCKS);
        if blocks == 1 {
            launch(
                &self.dev,
                &self.kernels.route,
                1,
                1024,
                2 * e * 4,
                &[&ids, &picks_i, &k_i, &e_i, &counts, &row0, &src, &slot_of],
            )?;
        } else {
            let hist = ws.route_hist.cuda_ptr()?;
            launch(
                &self.dev,
                &self.kernels.route_count,
                blocks,
                ROUTE_THREADS,
                e * 4,
                &[&ids, &picks_i, &e_i, &hist],
            )?;
            launch(
                &self.dev,
                &self.kernels.route_rows,
                blocks,
                ROUTE_THREADS,
                (2 * e + 32) * 4,
                &[
                    &ids, &picks_i, &k_i, &e_i, &hist, &counts, &row0, &src, &slot_of,
                ],
            )?;
        }
        let rows = Rows {
            counts,
            row0,
            // A token picks an expert at most once.
            cap: m,
            total: picks,
            expected: picks.div_ceil(e),
            src,
            in_weight: if cfg.apply_router_weight_on_input {
                topk.weights.cuda_ptr()?
            } else {
                0
            },
            nvfp4_in: None,
            tokens_once: tokens_once.then_some((slot_of, k)),
        };
        let y = ws.y.cuda_ptr()?;
        self.experts(w, ws, rows, d.hidden.cuda_ptr()?, y)?;
        let scale = cfg.routed_scaling_factor.unwrap_or(1.0);
        let items = m * h.div_ceil(8 * 128);
        launch(
            &self.dev,
            &self.kernels.combine,
            items.clamp(1, 8 * 1024),
            128,
            0,
            &[
                &y,
                &slot_of,
                &if cfg.apply_router_weight_on_input {
                    0
                } else {
                    topk.weights.cuda_ptr()?
                },
                &(m as i32),
                &k_i,
                &(h as i32),
                &scale,
                &i32::from(cfg.no_combine),
                &out.cuda_ptr()?,
            ],
        )
    }
}

impl FusedRunner for Fp4Runner {
    fn run(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
    ) -> Result<Box<dyn CombineInput>> {
        match input.format() {
            DispatchFormat::DeepEpLowLatency => {
                let d = downcast_dispatch::<DeepEpLlDispatchOutput>(
                    input,
                    RUNNER,
                    DispatchFormat::DeepEpLowLatency,
                )?;
                let [el, rt, h] = d.dims()?;
                let out = match &d.out_buffer {
                    Some(b)
                        if b.shape() == [el, rt, h] && b.dtype() == DType::Bf16 && !b.is_host() =>
                    {
                        b.clone()
                    }
                    _ => Tensor::zeros_cuda(&self.dev, &[el, rt, h], DType::Bf16)?,
                };
                self.run_masked(d, quant, &out)?;
                Ok(Box::new(DeepEpLlCombineInput { hidden: out }))
            }
            _ => {
                let d = downcast_dispatch::<StandardDispatchOutput>(
                    input,
                    RUNNER,
                    DispatchFormat::Standard,
                )?;
                let m = d.topk.num_tokens();
                // In place: the top-k sum, the last stage, writes over the hidden buffer, which
                // the quantization finished reading before (one stream orders them).
                let out = if self.cfg.inplace {
                    d.hidden.clone()
                } else {
                    Tensor::zeros_cuda(&self.dev, &self.cfg.output_shape(m), DType::Bf16)?
                };
                self.run_standard(d, quant, &out)?;
                Ok(Box::new(StandardCombineInput { hidden: out }))
            }
        }
    }

    fn run_into(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
        out: &Tensor,
    ) -> Result<()> {
        match input.format() {
            DispatchFormat::DeepEpLowLatency => self.run_masked(
                downcast_dispatch::<DeepEpLlDispatchOutput>(
                    input,
                    RUNNER,
                    DispatchFormat::DeepEpLowLatency,
                )?,
                quant,
                out,
            ),
            _ => self.run_standard(
                downcast_dispatch::<StandardDispatchOutput>(
                    input,
                    RUNNER,
                    DispatchFormat::Standard,
                )?,
                quant,
                out,
            ),
        }
    }
}

inventory::submit! {
    FusedFunc {
        format: DispatchFormat::DeepEpLowLatency,
        runner: RUNNER,
        schemes: &[QuantScheme::Nvfp4],
        device: DeviceKind::Cuda,
        priority: 10,
        make: |cfg, device| Ok(Box::new(Fp4Runner::new(cfg, device)?)),
    }
}

inventory::submit! {
    FusedFunc {
        format: DispatchFormat::Standard,
        runner: RUNNER,
        schemes: &[QuantScheme::Nvfp4],
        device: DeviceKind::Cuda,
        priority: 10,
        make: |cfg, device| Ok(Box::new(Fp4Runner::new(cfg, device)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_quantized_once_where_they_have_several_local_picks() {
        use Nvfp4Products::{E4m3, Exact};
        let (shared, per_expert) = ([0.5f32; 4], [0.5f32, 0.5, 0.25, 0.5]);
        // DeepSeek-V3 on one rank, and the GPU tests' layers (their standard-layout tests with
        // E4M3 products but per_expert_input_scales_quantize_each_pick take the path).
        for (e, k) in [(256, 8), (8, 2), (8, 4)] {
            let cfg = MoeRunnerConfig::new(e, 512, 256, k);
            assert!(quantize_tokens_once(&cfg, E4m3, &shared), "E {e} top-{k}");
            // Exact products, scales that differ between experts, or a router weight on the
            // input keep quantizing each pick.
            assert!(!quantize_tokens_once(&cfg, Exact, &shared));
            assert!(!quantize_tokens_once(&cfg, E4m3, &per_expert));
            let mut on_input = cfg.clone();
            on_input.apply_router_weight_on_input = true;
            assert!(!quantize_tokens_once(&on_input, E4m3, &shared));
        }
        // Expert parallelism over eight ranks: one local pick a token on average.
        let mut ep8 = MoeRunnerConfig::new(256, 512, 256, 8);
        ep8.num_local_experts = 32;
        assert!(!quantize_tokens_once(&ep8, E4m3, &shared));
        ep8.num_local_experts = 64;
        assert!(quantize_tokens_once(&ep8, E4m3, &shared));
    }
}
