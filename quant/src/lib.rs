//! Number formats for the MoE kernels and their CPU reference: FP8 (E4M3, E5M2), E2M1 (FP4) and UE8M0
//! scalars; per-token-group FP8 activations; 128x128-block, per-tensor and per-channel FP8 weights;
//! MXFP4 and NVFP4 block formats; and the 128x4 swizzled scale layout.
//!
//! Every conversion is meant to be bit-exact with the GPU kernels that consume or produce these formats,
//! so each module documents the exact f32 arithmetic (order of operations, division versus reciprocal)
//! a kernel has to use to match. Shapes are checked and reported as [`QuantError`]; zero-sized inputs
//! are valid.

mod act;
mod block;
mod e2m1;
mod error;
mod fp8;
mod mxfp4;
mod nvfp4;
mod rows;
mod shape;
mod swizzle;
mod ue8m0;

pub use act::{quantize_fp8_groups, Fp8Groups, ScaleFormat, ACT_AMAX_FLOOR};
pub use block::{
    dequantize_fp8_blocks_into, quantize_fp8_blocks, quantize_fp8_per_channel,
    quantize_fp8_per_tensor, Fp8Blocks, WEIGHT_SCALE_FLOOR,
};
pub use e2m1::{e2m1_from_f32, e2m1_to_f32, pack_e2m1, unpack_e2m1, E2M1_MAX};
pub use error::QuantError;
pub use fp8::{e4m3_from_f32, e4m3_to_f32, e5m2_from_f32, e5m2_to_f32, E4M3_MAX, E5M2_MAX};
pub use mxfp4::{dequantize_mxfp4_into, quantize_mxfp4, Mxfp4, MXFP4_BLOCK};
pub use nvfp4::{
    dequantize_nvfp4_into, dequantize_nvfp4_products_into, nvfp4_global_scale, quantize_nvfp4,
    Nvfp4, Nvfp4Products, NVFP4_BLOCK,
};
pub use swizzle::{swizzle_scales_128x4, swizzled_len, swizzled_offset, unswizzle_scales_128x4};
pub use ue8m0::{round_scale_pow2_ceil, ue8m0_from_f32_ceil, ue8m0_to_f32};
