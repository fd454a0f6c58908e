//! Seeded uniform random fill of device tensors on the GPU: benchmarks and the tuner need
//! model-sized random (never zero) weights, which would take minutes to generate on the host.

use crate::cuda::compile_module;
use crate::{CudaDevice, DType, MoeError, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

const SOURCE: &str = include_str!("random.cu");

/// Fills `t` (f32, bf16, f16 or e4m3, on `dev`) with values uniform in `[lo, hi]`.
pub fn fill_uniform(dev: &CudaDevice, t: &Tensor, lo: f32, hi: f32, seed: u64) -> Result<()> {
    let kind: i32 = match t.dtype() {
        DType::F32 => 0,
        DType::Bf16 => 1,
        DType::F16 => 2,
        DType::F8E4M3 => 3,
        other => {
            return Err(MoeError::DType {
                what: "random fill".into(),
                expected: vec![DType::F32, DType::Bf16, DType::F16, DType::F8E4M3],
                got: other,
            })
        }
    };
    let n = t.numel() as i64;
    if n == 0 {
        return Ok(());
    }
    let f = compile_module(dev, "fill_uniform", SOURCE, &[])?
        .load_function("fill_uniform")
        .map_err(|e| MoeError::Kernel {
            name: "fill_uniform".into(),
            log: e.to_string(),
        })?;
    let ptr = t.cuda_ptr()?;
    let blocks = (n as u64).div_ceil(256).min(65_536) as u32;
    let stream = dev.stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&ptr).arg(&n).arg(&kind).arg(&lo).arg(&hi).arg(&seed);
    // SAFETY: `ptr` addresses `n` elements of the dtype matching `kind`.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
    .map(|_| ())
    .map_err(|e| MoeError::Device(e.to_string()))
}
