//! The launch layer under the fused runners: compiled kernels plus the device they run on, and
//! one method per pipeline stage (align, GEMM, row kernels). The `triton` runner drives it over
//! sorted token ids; the masked runner of the low-latency backend drives the same kernels over
//! the `[E, rows, H]` layout, so both share one copy of every kernel.

use moe_runner_core::cuda::cudarc::driver::{
    result as cu, CudaFunction, LaunchArgs, LaunchConfig, PushKernelArg,
};
use moe_runner_core::{
    downcast_quant, ActivationKernel, CudaDevice, DenseWeights, Fp8BlockWeights,
    Fp8PerChannelWeights, Fp8PerTensorWeights, GateUpLayout, MoeError, QuantInfo, QuantScheme,
    Result, Tensor,
};

use crate::kernels::{GemmKind, GemmTile, Kernels, RowKind};

pub(crate) fn dev_err(e: impl std::fmt::Display) -> MoeError {
    MoeError::Device(e.to_string())
}

/// A kernel argument (device pointers are passed as u64).
pub trait Arg {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>);
}
macro_rules! impl_arg {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
                b.arg(self);
            }
        }
    )*};
}
impl_arg!(u64, i32, f32);

/// Weight pointers and scales of the scheme being run.
pub struct DeviceWeights {
    pub w13: u64,
    pub w2: u64,
    /// Null (0) for unscaled weights.
    pub s13: u64,
    pub s2: u64,
    /// Static per-tensor activation scales, when the checkpoint has them.
    pub a13_static: Option<f32>,
    pub a2_static: Option<f32>,
}

impl DeviceWeights {
    /// The device pointers of `quant`'s weights (bf16/f16 and the three FP8 schemes).
    pub fn of(quant: &dyn QuantInfo, runner: &str) -> Result<Self> {
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
                format!("the {runner} runner does not run {other}"),
            )),
        }
    }
}

/// The row kernels' QUANT code of a scheme: how GEMM inputs are rounded.
pub fn quant_mode(scheme: QuantScheme) -> u8 {
    match scheme {
        QuantScheme::Fp8Block128 => 1,
        QuantScheme::Fp8PerChannel => 2,
        QuantScheme::Fp8PerTensor => 3,
        _ => 0,
    }
}

pub fn gate_up_code(l: GateUpLayout) -> u8 {
    match l {
        GateUpLayout::GateUp => 0,
        GateUpLayout::UpGate => 1,
        GateUpLayout::Interleaved => 2,
    }
}

/// (ACT code, limit, alpha) of the activation kernel.
pub fn act_params(a: ActivationKernel) -> (u8, f32, f32) {
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

/// Where a grouped GEMM's rows come from and go to.
#[derive(Clone, Copy, Debug)]
pub struct GemmRows {
    pub sorted: u64,
    pub expert_ids: u64,
    pub num_post_padded: u64,
    /// Rows of C (and the sentinel value of padded sorted ids).
    pub numel: usize,
    /// A row = sorted id / a_row_div (top-k for the standard GEMM 1, else 1).
    pub a_row_div: usize,
    /// BLOCK_M blocks the grid covers (an upper bound of what the align produces).
    pub m_blocks: usize,
}

/// One grouped GEMM: C[id] = A[id / a_row_div] x B[expert]^T, scaled per the kind.
#[derive(Clone, Copy, Debug)]
pub struct GemmCall {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub a_scale: u64,
    pub b_scale: u64,
    /// Router weights multiplied into C when non-null.
    pub weights: u64,
    pub n: usize,
    pub k: usize,
}

/// Row kernels read rows directly (`Direct`) or through sorted ids (`Sorted`: row =
/// sorted[i] for i below the padded count, sentinel rows skipped).
#[derive(Clone, Copy, Debug)]
pub enum RowMap {
    Direct,
    Sorted {
        sorted: u64,
        count: u64,
        sentinel: usize,
    },
}

impl RowMap {
    fn args(&self) -> (u64, u64, i32) {
        match *self {
            RowMap::Direct => (0, 0, 0),
            RowMap::Sorted {
                sorted,
                count,
                sentinel,
            } => (sorted, count, sentinel as i32),
        }
    }
}

/// Launches `f` on `dev`'s stream with a 1-D grid; a grid of 0 is a no-op.
pub fn launch(
    dev: &CudaDevice,
    f: &CudaFunction,
    grid: usize,
    threads: usize,
    smem: usize,
    args: &[&dyn Arg],
) -> Result<()> {
    launch_2d(dev, f, (grid, 1), threads, smem, args)
}

/// Launches `f` on `dev`'s stream with a 2-D grid; an empty grid is a no-op.
pub fn launch_2d(
    dev: &CudaDevice,
    f: &CudaFunction,
    grid: (usize, usize),
    threads: usize,
    smem: usize,
    args: &[&dyn Arg],
) -> Result<()> {
    launch_3d(dev, f, (grid.0, grid.1, 1), threads, smem, args)
}

/// Launches `f` on `dev`'s stream with a 3-D grid; an empty grid is a no-op.
pub fn launch_3d(
    dev: &CudaDevice,
    f: &CudaFunction,
    grid: (usize, usize, usize),
    threads: usize,
    smem: usize,
    args: &[&dyn Arg],
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let stream = dev.stream();
    let mut b = stream.launch_builder(f);
    for a in args {
        a.push(&mut b);
    }
    let cfg = LaunchConfig {
        grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: callers pass live device allocations sized for the launch (workspaces sized for
    // the batch, inputs checked against the config).
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(dev_err)
}

/// Compiled kernels and the device whose stream they run on.
pub struct Stages {
    dev: CudaDevice,
    kernels: Kernels,
}

impl Stages {
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        Ok(Self {
            dev: dev.clone(),
            kernels: Kernels::new(dev)?,
        })
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// Launches `f` on the device's stream; a grid of 0 is a no-op.
    pub fn launch(
        &self,
        f: &CudaFunction,
        grid: usize,
        threads: usize,
        smem: usize,
        args: &[&dyn Arg],
    ) -> Result<()> {
        launch(&self.dev, f, grid, threads, smem, args)
    }

    pub fn memset(&self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: `ptr` is a live allocation of at least `bytes` on this stream.
        unsafe { cu::memset_d8_async(ptr, 0, bytes, self.dev.stream().cu_stream()) }
            .map_err(dev_err)
    }

    /// Sorted ids of `numel` (token, slot) pairs grouped by expert, each expert's rows padded
    /// to `block_m`.
    #[allow(clippy::too_many_arguments)]
    pub fn align(
        &self,
        topk_ids: u64,
        numel: usize,
        experts: usize,
        block_m: usize,
        out: &GemmRows,
        max_sorted: usize,
    ) -> Result<()> {
        self.launch(
            self.kernels.align(),
            1,
            1024,
            (3 * experts + 1) * 4,
            &[
                &topk_ids,
                &(numel as i32),
                &(experts as i32),
                &(block_m as i32),
                &out.sorted,
                &out.expert_ids,
                &out.num_post_padded,
                &(max_sorted as i32),
                &(out.m_blocks as i32),
            ],
        )
    }

    /// Sorted ids of the masked layout: expert e's rows e*rows + 0..masked_m[e], padded to
    /// `block_m`; the sentinel is experts * rows. Counts above `rows`, or a total past
    /// `max_sorted`, are clamped and flagged in `status` (bit 0).
    #[allow(clippy::too_many_arguments)]
    pub fn align_masked(
        &self,
        masked_m: u64,
        experts: usize,
        rows: usize,
        block_m: usize,
        out: &GemmRows,
        max_sorted: usize,
        status: u64,
    ) -> Result<()> {
        self.launch(
            self.kernels.align_masked(),
            1,
            1024,
            (3 * experts + 1) * 4,
            &[
                &masked_m,
                &(experts as i32),
                &(rows as i32),
                &(block_m as i32),
                &out.sorted,
                &out.expert_ids,
                &out.num_post_padded,
                &(max_sorted as i32),
                &(out.m_blocks as i32),
                &status,
            ],
        )
    }

    pub fn gemm(
        &self,
        tile: GemmTile,
        kind: GemmKind,
        rows: &GemmRows,
        g: &GemmCall,
    ) -> Result<()> {
        let f = self.kernels.gemm(tile, kind)?;
        let n_blocks = g.n.div_ceil(tile.block_n);
        let mul_weight = i32::from(g.weights != 0);
        let args: [&dyn Arg; 15] = [
            &g.a,
            &g.b,
            &g.c,
            &g.a_scale,
            &g.b_scale,
            &g.weights,
            &rows.sorted,
            &rows.expert_ids,
            &rows.num_post_padded,
            &(g.n as i32),
            &(g.k as i32),
            &(rows.numel as i32),
            &(rows.a_row_div as i32),
            &mul_weight,
            &(rows.m_blocks as i32),
        ];
        self.launch(
            &f,
            rows.m_blocks * n_blocks,
            tile.threads(),
            tile.smem_bytes(kind, g.k),
            &args,
        )
    }

    /// A row kernel of `kind` over `grid` rows with the row-map arguments appended.
    pub fn rows(
        &self,
        kind: RowKind,
        name: &'static str,
        grid: usize,
        map: RowMap,
        args: &[&dyn Arg],
    ) -> Result<()> {
        let f = self.kernels.row(kind, name)?;
        let (sorted, count, sentinel) = map.args();
        let mut all: Vec<&dyn Arg> = args.to_vec();
        all.extend([&sorted as &dyn Arg, &count, &sentinel]);
        self.launch(&f, grid, 256, 0, &all)
    }

    /// A row kernel without row-map arguments (`moe_sum`, `moe_fill`, `moe_amax_to_scale`).
    pub fn plain(
        &self,
        kind: RowKind,
        name: &'static str,
        grid: usize,
        threads: usize,
        args: &[&dyn Arg],
    ) -> Result<()> {
        let f = self.kernels.row(kind, name)?;
        self.launch(&f, grid, threads, 0, args)
    }

    /// Puts a per-tensor activation scale at `dst`: the static one, or max(amax, 1e-4) / 448
    /// of the rows the amax variant (QUANT 4) of `kernel` reads.
    #[allow(clippy::too_many_arguments)]
    pub fn per_tensor_scale(
        &self,
        fixed: Option<f32>,
        dst: u64,
        amax_kind: RowKind,
        kernel: &'static str,
        grid: usize,
        map: RowMap,
        amax_args: &[&dyn Arg],
    ) -> Result<()> {
        match fixed {
            Some(s) => self.plain(amax_kind, "moe_fill", 1, 32, &[&dst, &s]),
            None => {
                self.plain(amax_kind, "moe_fill", 1, 32, &[&dst, &0.0f32])?;
                self.rows(amax_kind, kernel, grid, map, amax_args)?;
                self.plain(amax_kind, "moe_amax_to_scale", 1, 32, &[&dst])
            }
        }
    }
}
