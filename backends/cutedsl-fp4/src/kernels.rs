//! The NVFP4 kernels (`kernels/nvfp4.cu`), compiled per activation (the triton backend's
//! `activation`, so both backends apply it identically).

use moe_backend_triton::kernels::{ACTIVATION, COMMON, FP4};
use moe_backend_triton::stages::gate_up_code;
use moe_runner_core::cuda::compile_module;
use moe_runner_core::cuda::cudarc::driver::CudaFunction;
use moe_runner_core::{CudaDevice, GateUpLayout, MoeError, Result};

const NVFP4: &str = include_str!("kernels/nvfp4.cu");

/// Columns of one GEMM tile (`BN`).
pub const BLOCK_N: usize = 128;

pub struct Fp4Kernels {
    pub quant_rows: CudaFunction,
    pub expand_rows: CudaFunction,
    pub tiles: CudaFunction,
    /// Row tiles of 16 (decode batches) and of 64.
    pub gemm_m16: CudaFunction,
    pub gemm_m64: CudaFunction,
    pub act_quant: CudaFunction,
    pub route: CudaFunction,
    pub combine: CudaFunction,
}

impl Fp4Kernels {
    pub fn new(dev: &CudaDevice, act: u8, gate_up: GateUpLayout) -> Result<Self> {
        let gate_up = gate_up_code(gate_up);
        let module = compile_module(
            dev,
            "cutedsl_fp4",
            &format!("{COMMON}\n{FP4}\n{ACTIVATION}\n{NVFP4}"),
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
        Ok(Self {
            quant_rows: load("fp4_quant_rows")?,
            expand_rows: load("fp4_expand_rows")?,
            tiles: load("fp4_tiles")?,
            gemm_m16: load("fp4_gemm_m16")?,
            gemm_m64: load("fp4_gemm_m64")?,
            act_quant: load("fp4_act_quant")?,
            route: load("fp4_route")?,
            combine: load("fp4_combine")?,
        })
    }
}
