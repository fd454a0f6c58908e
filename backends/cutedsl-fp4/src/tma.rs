//! TMA tensor maps for the GEMM's producer warp: the driver encodes each map on the host (no
//! device work), and the kernel takes it by value as a `__grid_constant__` parameter, so a map
//! is made per pass for the buffers of that pass and is captured into CUDA graphs with it.

use moe_backend_triton::stages::Arg;
use moe_runner_core::cuda::cudarc::driver::sys::{
    cuTensorMapEncodeTiled, CUresult, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill,
    CUtensorMapInterleave, CUtensorMapL2promotion, CUtensorMapSwizzle,
};
use moe_runner_core::cuda::cudarc::driver::{DeviceRepr, LaunchArgs, PushKernelArg};
use moe_runner_core::{MoeError, Result};

/// An encoded `CUtensorMap` (128 bytes, 64-byte aligned), passed to kernels by value.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct TensorMap(CUtensorMap);

// SAFETY: a plain 128-byte C struct, which the kernels declare with the same size and alignment.
unsafe impl DeviceRepr for TensorMap {}

impl Arg for TensorMap {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

/// Maps of one tensor with boxes of 16, 32, 64 and 128 rows (`ShortBoxes` in gemm.cu), passed
/// by value as one kernel parameter.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct ShortBoxes(pub [TensorMap; 4]);

// SAFETY: four 128-byte maps, as the kernels declare them.
unsafe impl DeviceRepr for ShortBoxes {}

impl Arg for ShortBoxes {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

/// The element type of a tiled map.
#[derive(Clone, Copy)]
pub enum Elem {
    U8,
    F16,
}

impl TensorMap {
    /// A tiled map over `dims` (innermost first) of `elem` at `ptr`, whose outer dimensions are
    /// `strides` bytes apart (multiples of 16), read in boxes of `bx` with the 128-byte swizzle
    /// (the box's inner extent must be 128 bytes). Coordinates past `dims` read as zeros.
    pub fn tiled(ptr: u64, elem: Elem, dims: &[u64], strides: &[u64], bx: &[u32]) -> Result<Self> {
        let rank = dims.len();
        debug_assert!(rank >= 2 && strides.len() == rank - 1 && bx.len() == rank);
        let ty = match elem {
            Elem::U8 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            Elem::F16 => CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        };
        let ones = [1u32; 5];
        let mut map = std::mem::MaybeUninit::<CUtensorMap>::zeroed();
        // SAFETY: every array holds `rank` (strides: rank - 1) entries and `map` is a writable
        // CUtensorMap; the driver only reads the arguments and writes the map.
        let r = unsafe {
            cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                ty,
                rank as u32,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                bx.as_ptr(),
                ones.as_ptr(),
                CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if r != CUresult::CUDA_SUCCESS {
            return Err(MoeError::Device(format!(
                "cuTensorMapEncodeTiled({dims:?}, strides {strides:?}, box {bx:?}): {r:?}"
            )));
        }
        // SAFETY: the driver wrote the whole map on success.
        Ok(Self(unsafe { map.assume_init() }))
    }
}
