//! The compiled program (`kernels/megamoe.cu`) and its launch: one cooperative grid per rank,
//! as many blocks as fit on the GPU at once (the grid barriers need every block resident).

use moe_backend_triton::kernels::{ACTIVATION, COMMON, FP4, HOPPER};
use moe_backend_triton::stages::gate_up_code;
use moe_runner_core::cuda::compile_module;
use moe_runner_core::cuda::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use moe_runner_core::cuda::cudarc::driver::{
    CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg,
};
use moe_runner_core::{CudaDevice, GateUpLayout, MoeError, Result, Tensor};

use super::weights::PackedWeights;
use super::world::RankHandle;
use crate::dispatch_output::MegaMoeDispatchOutput;
use crate::flags::Resolved;

const SOURCE: &str = include_str!("../kernels/megamoe.cu");
/// Threads of a block: eight consumer warps and the producer warp.
pub const THREADS: u32 = 288;
/// Threads of the standalone pre-dispatch (the consumer warps).
const CONSUMERS: u32 = 256;
/// The work-item shape: tokens per item and the depth of the weight ring. The 8-token items
/// leave shared memory for a fourth stage, which latency-bound decode batches want; larger
/// batches want 16-token items, so an expert's weights stream once for up to 16 rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiling {
    pub item_rows: usize,
    pub stages: usize,
}

impl Tiling {
    pub const DECODE: Tiling = Tiling {
        item_rows: 8,
        stages: 4,
    };
    pub const BATCH: Tiling = Tiling {
        item_rows: 16,
        stages: 3,
    };

    /// Shared memory of `megamoe_fused` as the kernel lays it out: the stage ring (weights,
    /// their scales, the item's token rows and their scales), two buffers of cross-warp sums,
    /// both GEMMs' item prefixes, the mbarriers.
    fn smem(self, flags: Resolved, local_experts: usize) -> usize {
        let a_group = if flags.mxf4_kind { 64 } else { 128 };
        let stage = 8 * 8 * 512 + 8 * 8 * 32 + self.item_rows * (8 * a_group + 16 + 32);
        self.stages * stage
            + 2 * 8 * self.item_rows * 64 * 4
            + 2 * (local_experts + 1) * 4
            + 8
            + 2 * self.stages * 8
    }
}

/// How long a rank waits for the others before flagging a timeout.
pub const TIMEOUT_MS: u64 = 10_000;
/// The same in SM clock cycles, at 2 GHz (Hopper's clocks are below, so the wait is longer).
pub const TIMEOUT_CYCLES: i64 = TIMEOUT_MS as i64 * 2_000_000;

/// The kernel's parameter block (`struct MegaParams` in `megamoe.cu`, field for field).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MegaParams {
    pub hidden: u64,
    pub topk_ids: u64,
    pub topk_w: u64,
    pub peers: u64,
    pub sym: u64,
    pub out: u64,
    pub w13: u64,
    pub w13s: u64,
    pub w2: u64,
    pub w2s: u64,
    pub error: u64,
    pub off: [u64; 13],
    pub timeout_cycles: i64,
    pub rank: i32,
    pub ranks: i32,
    pub m: i32,
    pub kin: i32,
    pub tmax: i32,
    pub k: i32,
    pub hidden_size: i32,
    pub inter: i32,
    pub local_experts: i32,
    pub num_experts: i32,
    pub limit: f32,
    pub alpha: f32,
    pub scale: f32,
}

// SAFETY: plain old data laid out as the C struct the kernel declares.
unsafe impl DeviceRepr for MegaParams {}

impl MegaParams {
    /// The block for `out`'s batch on `rank`, writing `[m, H]` into `dst`; no weights yet.
    pub fn new(rank: &RankHandle, out: &MegaMoeDispatchOutput, dst: &Tensor) -> Result<Self> {
        let mem = rank.mem();
        let l = rank.layout();
        let s = out.shape;
        Ok(Self {
            hidden: out.hidden.cuda_ptr()?,
            topk_ids: out.topk.ids.cuda_ptr()?,
            topk_w: out.topk.weights.cuda_ptr()?,
            peers: mem.peers.ptr(),
            sym: mem.sym.ptr(),
            out: dst.cuda_ptr()?,
            error: mem.error.ptr(),
            off: [
                l.ctrl, l.counts, l.x, l.xs, l.ids, l.weights, l.y, l.list, l.xg, l.xgs, l.wg, l.h,
                l.hs,
            ],
            timeout_cycles: TIMEOUT_CYCLES,
            rank: s.rank as i32,
            ranks: s.ranks as i32,
            m: out.topk.num_tokens() as i32,
            kin: out.topk.top_k() as i32,
            tmax: s.max_tokens as i32,
            k: s.top_k as i32,
            hidden_size: s.hidden as i32,
            inter: s.inter as i32,
            local_experts: s.local_experts as i32,
            num_experts: s.num_experts as i32,
            scale: 1.0,
            ..Self::default()
        })
    }

    /// The same block with the packed weights, the activation's limit and alpha, and the
    /// routed scaling factor.
    pub fn with_weights(
        mut self,
        w: &PackedWeights,
        limit: f32,
        alpha: f32,
        scale: f32,
    ) -> Result<Self> {
        self.w13 = w.w13.cuda_ptr()?;
        self.w13s = w.w13s.cuda_ptr()?;
        self.w2 = w.w2.cuda_ptr()?;
        self.w2s = w.w2s.cuda_ptr()?;
        self.limit = limit;
        self.alpha = alpha;
        self.scale = scale;
        Ok(self)
    }
}

pub struct Program {
    pub fused: CudaFunction,
    pub pre_dispatch: CudaFunction,
    pub pack: CudaFunction,
    /// Blocks of the cooperative grid.
    pub blocks: u32,
    pub smem: u32,
}

impl Program {
    pub fn new(
        dev: &CudaDevice,
        flags: Resolved,
        tiling: Tiling,
        act: u8,
        gate_up: GateUpLayout,
        local_experts: usize,
    ) -> Result<Self> {
        let gate_up = gate_up_code(gate_up);
        let module = compile_module(
            dev,
            "megamoe",
            &format!("{COMMON}\n{FP4}\n{ACTIVATION}\n{HOPPER}\n{SOURCE}"),
            &[
                ("ACT", act.to_string()),
                ("GATE_UP", gate_up.to_string()),
                ("ACT_F16", "0".into()),
                ("FP4_ACTS", u8::from(flags.fp4_acts).to_string()),
                ("MXF4", u8::from(flags.mxf4_kind).to_string()),
                ("ITEM_ROWS", tiling.item_rows.to_string()),
                ("STAGES", tiling.stages.to_string()),
                (
                    "MIN_BLOCKS",
                    std::env::var("MOE_MEGA_MIN_BLOCKS").unwrap_or_else(|_| "1".into()),
                ),
            ],
        )?;
        let load = |name: &str| {
            module.load_function(name).map_err(|e| MoeError::Kernel {
                name: name.into(),
                log: e.to_string(),
            })
        };
        let kerr = |e: moe_runner_core::cuda::cudarc::driver::DriverError| MoeError::Kernel {
            name: "megamoe_fused".into(),
            log: e.to_string(),
        };
        let fused = load("megamoe_fused")?;
        let smem = tiling.smem(flags, local_experts) as u32;
        fused
            .set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| MoeError::Kernel {
                name: "megamoe_fused".into(),
                log: format!(
                    "{smem} B of shared memory ({local_experts} local experts, {tiling:?}) do not fit on an SM: {e}"
                ),
            })?;
        let per_sm = fused
            .occupancy_max_active_blocks_per_multiprocessor(THREADS, smem as usize, None)
            .map_err(kerr)?;
        let attr = |a| {
            dev.context()
                .attribute(a)
                .map_err(|e| MoeError::Device(e.to_string()))
        };
        let sms = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        if per_sm < 1 {
            return Err(MoeError::Kernel {
                name: "megamoe_fused".into(),
                log: format!("no block of {THREADS} threads with {smem} B of shared memory fits on an SM ({local_experts} local experts)"),
            });
        }
        Ok(Self {
            fused,
            pre_dispatch: load("megamoe_pre_dispatch")?,
            pack: load("megamoe_pack_weights")?,
            blocks: per_sm * sms as u32,
            smem,
        })
    }

    /// Launches the whole layer on `dev`'s stream.
    pub fn launch(&self, dev: &CudaDevice, p: &MegaParams) -> Result<()> {
        let mut b = dev.stream().launch_builder(&self.fused);
        b.arg(p);
        let cfg = LaunchConfig {
            grid_dim: (self.blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: self.smem,
        };
        // SAFETY: the parameter block addresses live buffers sized by the layout and checked
        // shapes; the grid fits on the device (occupancy above), as a cooperative launch needs.
        unsafe { b.launch_cooperative(cfg) }
            .map(|_| ())
            .map_err(|e| MoeError::Device(format!("launching megamoe_fused: {e}")))
    }

    /// Launches the pre-dispatch alone (a checkable step of the program).
    pub fn launch_pre_dispatch(&self, dev: &CudaDevice, p: &MegaParams) -> Result<()> {
        let mut b = dev.stream().launch_builder(&self.pre_dispatch);
        b.arg(p);
        let cfg = LaunchConfig {
            grid_dim: (self.blocks, 1, 1),
            block_dim: (CONSUMERS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as for `launch`; this kernel writes only this rank's pre-dispatch regions.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| MoeError::Device(format!("launching megamoe_pre_dispatch: {e}")))
    }
}
