//! The kernel sources and their compile-time specializations: every variant is compiled once
//! per process by NVRTC (and cached on disk) and its function handle kept here.

use moe_runner_core::cuda::compile_module;
use moe_runner_core::cuda::cudarc::driver::sys::CUfunction_attribute_enum;
use moe_runner_core::cuda::cudarc::driver::CudaFunction;
use moe_runner_core::{CudaDevice, MoeError, QuantScheme, Result};
use std::collections::HashMap;
use std::sync::Mutex;

use crate::tile_config::TileConfig;

/// Device helpers (types, FP8 conversions, warp reductions) other backends' kernels include.
pub const COMMON: &str = include_str!("kernels/common.cuh");
const GEMM: &str = include_str!("kernels/moe_gemm.cu");
const EPILOGUE: &str = include_str!("kernels/epilogue.cuh");
const GEMM_WGMMA: &str = include_str!("kernels/moe_gemm_wgmma.cu");
const ALIGN: &str = include_str!("kernels/moe_align.cu");
const ROWS: &str = include_str!("kernels/moe_rows.cu");
/// `activation(gate, up, limit, alpha)` for the compile-time `ACT` code (see [`RowKind`]).
pub const ACTIVATION: &str = include_str!("kernels/activation.cuh");
/// NVFP4 quantization helpers (E2M1 codes, E4M3 block scales), for kernels that write or read
/// NVFP4; include after [`COMMON`].
pub const FP4: &str = include_str!("kernels/fp4.cuh");
/// Hopper building blocks for kernels with a producer warp and a shared-memory ring (mbarriers,
/// bulk copies, the wgmma descriptor, E2M1 widened to f16); include after [`COMMON`].
pub const HOPPER: &str = include_str!("kernels/hopper.cuh");

/// Shared memory a block may use on Hopper (227 KB), less the GEMM's static arrays.
const MAX_DYNAMIC_SMEM: usize = 227 * 1024 - 1024;

fn with_common(src: &str) -> String {
    format!("{COMMON}\n{src}")
}

/// How a scheme feeds the tensor cores and where its scales apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmKind {
    /// 0 bf16, 1 f16, 2 e4m3.
    pub elem: u8,
    /// 0 none, 1 scalar, 2 per row, 3 per row per 128.
    pub a_scale: u8,
    /// 0 none, 1 per expert, 2 per channel, 3 per 128x128 block.
    pub b_scale: u8,
    /// Output (activation) dtype f16 instead of bf16.
    pub act_f16: bool,
}

impl GemmKind {
    pub fn for_scheme(scheme: QuantScheme, act_f16: bool) -> Result<Self> {
        let (elem, a_scale, b_scale) = match scheme {
            QuantScheme::Bf16 => (0, 0, 0),
            QuantScheme::F16 => (1, 0, 0),
            QuantScheme::Fp8Block128 => (2, 3, 3),
            QuantScheme::Fp8PerTensor => (2, 1, 1),
            QuantScheme::Fp8PerChannel => (2, 2, 2),
            other => {
                return Err(MoeError::invalid(
                    "quant scheme",
                    format!("the triton runner does not run {other}"),
                ))
            }
        };
        Ok(Self {
            elem,
            a_scale,
            b_scale,
            act_f16,
        })
    }

    pub fn elem_bytes(&self) -> usize {
        if self.elem == 2 {
            1
        } else {
            2
        }
    }
}

/// The `wgmma_tile` device function for one m64 x `block_n` product over 32 bytes of K: the
/// accumulator list of a wgmma instruction is one operand per register, so it is generated.
fn wgmma_tile_source(block_n: usize, elem: u8) -> String {
    let regs = block_n / 2;
    let (k, types, immediates) = match elem {
        2 => (32, "e4m3.e4m3", "p, 1, 1"),
        1 => (16, "f16.f16", "p, 1, 1, 0, 0"),
        _ => (16, "bf16.bf16", "p, 1, 1, 0, 0"),
    };
    let list: Vec<String> = (0..regs).map(|i| format!("%{i}")).collect();
    let outs: Vec<String> = (0..regs).map(|i| format!("\"+f\"(d[{i}])")).collect();
    format!(
        "__device__ __forceinline__ void wgmma_tile(float* d, u64 da, u64 db, int scale_d) {{\n\
         asm volatile(\"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{sd}, 0;\\n\
         wgmma.mma_async.sync.aligned.m64n{block_n}k{k}.f32.{types} {{{list}}}, %{a}, %{b}, {immediates};\\n}}\\n\"\n\
         : {outs} : \"l\"(da), \"l\"(db), \"r\"(scale_d));\n}}\n",
        sd = regs + 2,
        a = regs,
        b = regs + 1,
        list = list.join(", "),
        outs = outs.join(", "),
    )
}

/// A tile adapted to what the kernel supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmTile {
    pub block_m: usize,
    pub block_n: usize,
    pub block_k_bytes: usize,
    pub warps_m: usize,
    pub warps_n: usize,
    pub stages: usize,
    pub group_m: usize,
    /// Warpgroup tensor cores (sm_90a) instead of mma.sync.
    pub wgmma: bool,
}

impl GemmTile {
    /// Maps a tuned-config entry onto the kernel's supported shapes: K tiles of 64 or 128
    /// bytes (exactly 128 for block-scaled FP8), warps split so each holds whole 16x8 MMA tiles,
    /// stages reduced until shared memory fits.
    pub fn adapt(t: TileConfig, kind: GemmKind, max_k: usize, allow_wgmma: bool) -> Result<Self> {
        let bad = |what: &str, v: usize| {
            MoeError::invalid("tile config", format!("{what} = {v} is not supported"))
        };
        if ![16, 32, 64, 128].contains(&t.block_m) {
            return Err(bad("BLOCK_SIZE_M", t.block_m));
        }
        if ![16, 32, 64, 128, 256].contains(&t.block_n) {
            return Err(bad("BLOCK_SIZE_N", t.block_n));
        }
        if ![1, 2, 4, 8].contains(&t.num_warps) {
            return Err(bad("num_warps", t.num_warps));
        }
        let block_n = if kind.b_scale == 3 {
            t.block_n.min(128)
        } else {
            t.block_n
        };
        let block_k_bytes = if kind.a_scale == 3 {
            128
        } else {
            (t.block_k * kind.elem_bytes())
                .clamp(64, 128)
                .next_power_of_two()
                .min(128)
        };
        let mut warps = t.num_warps;
        let (warps_m, warps_n) = loop {
            let wm = (1..=warps)
                .rev()
                .filter(|w| w.is_power_of_two())
                .find(|&w| t.block_m / w >= 16)
                .unwrap_or(1);
            let wn = warps / wm;
            if block_n % (8 * wn) == 0 {
                break (wm, wn);
            }
            warps /= 2;
        };
        // Blocks of 64 or 128 rows run on wgmma, one warpgroup per 64 rows, 128-byte K tiles.
        let wgmma =
            allow_wgmma && [64, 128].contains(&t.block_m) && [64, 128, 256].contains(&block_n);
        let block_k_bytes = if wgmma { 128 } else { block_k_bytes };
        let mut tile = Self {
            block_m: t.block_m,
            block_n,
            block_k_bytes,
            warps_m,
            warps_n,
            stages: t.num_stages.clamp(2, 6),
            group_m: t.group_m.max(1),
            wgmma,
        };
        while tile.stages > 2 && tile.smem_bytes(kind, max_k) > MAX_DYNAMIC_SMEM {
            tile.stages -= 1;
        }
        if tile.smem_bytes(kind, max_k) > MAX_DYNAMIC_SMEM {
            return Err(MoeError::invalid(
                "tile config",
                format!(
                    "{t:?} needs {} B of shared memory for K = {max_k}",
                    tile.smem_bytes(kind, max_k)
                ),
            ));
        }
        Ok(tile)
    }

    pub fn threads(&self) -> usize {
        if self.wgmma {
            self.block_m / 64 * 128
        } else {
            self.warps_m * self.warps_n * 32
        }
    }

    /// Dynamic shared memory of a launch with reduction length `k`: the tile stages, plus the
    /// staged scales of block-scaled FP8.
    pub fn smem_bytes(&self, kind: GemmKind, k: usize) -> usize {
        let stages = if self.wgmma {
            // Unpadded swizzled rows, plus room to align the first tile to 1024 bytes.
            self.stages * (self.block_m + self.block_n) * 128 + 1024
        } else {
            self.stages * (self.block_m + self.block_n) * (self.block_k_bytes + 16)
        };
        let scales = if kind.a_scale == 3 {
            (self.block_m + 1) * k.div_ceil(128) * 4
        } else {
            0
        };
        stages + scales
    }
}

/// The row-kernel specialization: activation, gate/up layout, rounding of the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowKind {
    pub act: u8,
    pub gate_up: u8,
    pub quant: u8,
    pub act_f16: bool,
}

/// Compiled kernels, by specialization.
pub struct Kernels {
    dev: CudaDevice,
    align: CudaFunction,
    align_masked: CudaFunction,
    gemm: Mutex<HashMap<(GemmTile, GemmKind), CudaFunction>>,
    rows: Mutex<HashMap<(RowKind, &'static str), CudaFunction>>,
}

impl Kernels {
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        let module = compile_module(dev, "moe_align", &with_common(ALIGN), &[])?;
        let load = |name: &str| {
            module.load_function(name).map_err(|e| MoeError::Kernel {
                name: name.into(),
                log: e.to_string(),
            })
        };
        Ok(Self {
            dev: dev.clone(),
            align: load("moe_align")?,
            align_masked: load("moe_align_masked")?,
            gemm: Mutex::default(),
            rows: Mutex::default(),
        })
    }

    pub fn align(&self) -> &CudaFunction {
        &self.align
    }

    pub fn align_masked(&self) -> &CudaFunction {
        &self.align_masked
    }

    pub fn gemm(&self, tile: GemmTile, kind: GemmKind) -> Result<CudaFunction> {
        let mut map = self
            .gemm
            .lock()
            .map_err(|_| MoeError::Device("kernel map poisoned".into()))?;
        if let Some(f) = map.get(&(tile, kind)) {
            return Ok(f.clone());
        }
        let defines = [
            ("BLOCK_M", tile.block_m.to_string()),
            ("BLOCK_N", tile.block_n.to_string()),
            ("BLOCK_K_BYTES", tile.block_k_bytes.to_string()),
            ("WARPS_M", tile.warps_m.to_string()),
            ("WARPS_N", tile.warps_n.to_string()),
            ("NUM_STAGES", tile.stages.to_string()),
            ("GROUP_M", tile.group_m.to_string()),
            ("WGMMA", u8::from(tile.wgmma).to_string()),
            ("ELEM", kind.elem.to_string()),
            ("A_SCALE", kind.a_scale.to_string()),
            ("B_SCALE", kind.b_scale.to_string()),
            ("ACT_F16", u8::from(kind.act_f16).to_string()),
        ];
        let (name, source) = if tile.wgmma {
            (
                "moe_gemm_wgmma",
                format!(
                    "{COMMON}\n{EPILOGUE}\n{HOPPER}\n{}\n{GEMM_WGMMA}",
                    wgmma_tile_source(tile.block_n, kind.elem)
                ),
            )
        } else {
            ("moe_gemm", format!("{COMMON}\n{EPILOGUE}\n{GEMM}"))
        };
        let f = compile_module(&self.dev, name, &source, &defines)?
            .load_function("moe_gemm")
            .map_err(|e| MoeError::Kernel {
                name: "moe_gemm".into(),
                log: e.to_string(),
            })?;
        // Launches pass their own size (it depends on K); allow the most `adapt` admits.
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            MAX_DYNAMIC_SMEM as i32,
        )
        .map_err(|e| MoeError::Kernel {
            name: "moe_gemm".into(),
            log: format!("shared memory {MAX_DYNAMIC_SMEM} B: {e}"),
        })?;
        map.insert((tile, kind), f.clone());
        Ok(f)
    }

    /// One of the row kernels (`moe_act`, `moe_quant_input`, `moe_sum`, `moe_amax_to_scale`,
    /// `moe_fill`) of a specialization.
    pub fn row(&self, kind: RowKind, name: &'static str) -> Result<CudaFunction> {
        let mut map = self
            .rows
            .lock()
            .map_err(|_| MoeError::Device("kernel map poisoned".into()))?;
        if let Some(f) = map.get(&(kind, name)) {
            return Ok(f.clone());
        }
        let defines = [
            ("ACT", kind.act.to_string()),
            ("GATE_UP", kind.gate_up.to_string()),
            ("QUANT", kind.quant.to_string()),
            ("ACT_F16", u8::from(kind.act_f16).to_string()),
        ];
        let f = compile_module(
            &self.dev,
            "moe_rows",
            &format!("{COMMON}\n{ACTIVATION}\n{ROWS}"),
            &defines,
        )?
        .load_function(name)
        .map_err(|e| MoeError::Kernel {
            name: name.into(),
            log: e.to_string(),
        })?;
        map.insert((kind, name), f.clone());
        Ok(f)
    }
}
