//! The NVFP4 kernels (`kernels/nvfp4.cu`), compiled per activation (the triton backend's
//! `activation`, so both backends apply it identically).

use moe_backend_triton::kernels::{ACTIVATION, COMMON, FP4, HOPPER};
use moe_backend_triton::stages::gate_up_code;
use moe_backend_triton::stages::Arg;
use moe_runner_core::cuda::compile_module;
use moe_runner_core::cuda::cudarc::driver::sys::CUfunction_attribute_enum;
use moe_runner_core::cuda::cudarc::driver::{
    CudaFunction, DeviceRepr, DriverError, LaunchArgs, PushKernelArg,
};
use moe_runner_core::{CudaDevice, GateUpLayout, MoeError, Result};

const NVFP4: &str = include_str!("kernels/nvfp4.cu");

/// The GEMM's threads: eight consumer warps and the producer warp.
pub const GEMM_THREADS: usize = 288;
/// Values of K per GEMM stage: GEMM inputs are rows of whole segments of this many values.
pub const SEGMENT: usize = 256;

/// One variant of the GEMM: up to `8 * nt` rows of an expert per work item.
pub struct Gemm {
    pub f: CudaFunction,
    pub nt: usize,
    /// Weight tiles of 16 rows per warp: an item is `128 * mt` weight rows.
    pub mt: usize,
    /// Warpgroup MMAs (wgmma), which read the GEMM input in their own layout.
    pub wg: bool,
    /// Dynamic shared memory of a launch, and the blocks that fit on an SM with it.
    pub smem: usize,
    pub per_sm: usize,
}

pub struct Fp4Kernels {
    pub quant_rows: CudaFunction,
    pub expand_rows: CudaFunction,
    pub tiles: CudaFunction,
    /// The GEMM for 8, 16, 32 (mma.sync), 64 and 128 (wgmma) rows per work item, in that
    /// order.
    pub gemm: [Gemm; 5],
    pub act_quant: CudaFunction,
    pub route: CudaFunction,
    pub combine: CudaFunction,
}

/// `wgmma_rs_n{8 nt}`: one m64 x (8 nt) x k16 product, A (f16) from registers, B from shared
/// memory, accumulating in f32. The accumulator list of a wgmma instruction is one operand per
/// register, so it is generated.
fn wgmma_rs_source(nt: usize) -> String {
    let regs = 4 * nt;
    let list: Vec<String> = (0..regs).map(|i| format!("%{i}")).collect();
    let outs: Vec<String> = (0..regs).map(|i| format!("\"+f\"(d[{i}])")).collect();
    format!(
        "__device__ __forceinline__ void wgmma_rs_n{n}(float* d, const u32* a, u64 b) {{\n\
         asm volatile(\"{{\\n.reg .pred p;\\nsetp.ne.b32 p, 1, 0;\\n\
         wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{{list}}}, {{%{a0}, %{a1}, %{a2}, %{a3}}}, %{b}, p, 1, 1, 0;\\n}}\\n\"\n\
         : {outs} : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"l\"(b));\n}}\n",
        n = 8 * nt,
        a0 = regs,
        a1 = regs + 1,
        a2 = regs + 2,
        a3 = regs + 3,
        b = regs + 4,
        list = list.join(", "),
        outs = outs.join(", "),
    )
}

impl Fp4Kernels {
    pub fn new(dev: &CudaDevice, act: u8, gate_up: GateUpLayout) -> Result<Self> {
        let gate_up = gate_up_code(gate_up);
        let module = compile_module(
            dev,
            "cutedsl_fp4",
            &format!(
                "{COMMON}\n{FP4}\n{ACTIVATION}\n{HOPPER}\n{}\n{NVFP4}",
                [8, 16].map(wgmma_rs_source).join("\n")
            ),
            &[
                ("ACT", act.to_string()),
                ("GATE_UP", gate_up.to_string()),
                ("ACT_F16", "0".into()),
            ],
        )?;
        let load = |name: &str| {
            module.load_function(name).map_err(|e| MoeError::Kernel {
                name: name.into(),
                log: e.to_string(),
            })
        };
        // (rows per item / 8, weight tiles per warp, ring stages, wgmma), as nvfp4.cu
        // instantiates them.
        let gemm = |nt: usize, mt: usize, stages: usize, wg: bool| -> Result<Gemm> {
            let name = format!(
                "fp4_{}_n{nt}{}",
                if wg { "wgmma" } else { "gemm" },
                if mt > 1 {
                    format!("m{mt}")
                } else {
                    String::new()
                }
            );
            let f = load(&name)?;
            let kerr = |e: DriverError| MoeError::Kernel {
                name: name.clone(),
                log: e.to_string(),
            };
            // A stage: the weight box, four boxes of rows, the scales; then a barrier pair per
            // stage, and 1024 bytes to align the ring for the swizzle.
            let smem =
                stages * (128 * 128 * mt + 4 * 8 * nt * 128 + 2048 * mt) + stages * 16 + 1024;
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(kerr)?;
            let per_sm = f
                .occupancy_max_active_blocks_per_multiprocessor(GEMM_THREADS as u32, smem, None)
                .map_err(kerr)?
                .max(1) as usize;
            Ok(Gemm {
                f,
                nt,
                mt,
                wg,
                smem,
                per_sm,
            })
        };
        Ok(Self {
            quant_rows: load("fp4_quant_rows")?,
            expand_rows: load("fp4_expand_rows")?,
            tiles: load("fp4_tiles")?,
            gemm: [
                gemm(1, 1, 6, false)?,
                gemm(2, 1, 6, false)?,
                gemm(4, 2, 4, false)?,
                gemm(8, 1, 4, true)?,
                gemm(16, 1, 2, true)?,
            ],
            act_quant: load("fp4_act_quant")?,
            route: load("fp4_route")?,
            combine: load("fp4_combine")?,
        })
    }

    /// The GEMM variant for about `expected` rows per expert: the smallest item that holds
    /// them, so decode batches compute no empty n8 tiles. An expert with many more rows than
    /// expected takes several items, each streaming its weights again (as the dispatcher's
    /// `expected_m` is meant to prevent).
    pub fn gemm_for(&self, expected: usize) -> &Gemm {
        self.gemm
            .iter()
            .find(|g| 8 * g.nt >= expected)
            .unwrap_or(&self.gemm[self.gemm.len() - 1])
    }
}

/// The GEMM's scalar arguments (`GemmArgs` in nvfp4.cu, field for field).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GemmArgs {
    /// `[E, swizzled(N, K / 16)]` E4M3 block scales.
    pub w_sf: u64,
    pub counts: u64,
    pub row0: u64,
    pub tile_start: u64,
    pub alpha: u64,
    /// `[rows, N]` output in the activation dtype.
    pub c: u64,
    pub cap: i32,
    pub experts: i32,
    pub n: i32,
    pub k: i32,
}

// SAFETY: a plain C struct of the kernel's layout (six pointers, four ints).
unsafe impl DeviceRepr for GemmArgs {}

impl Arg for GemmArgs {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}
