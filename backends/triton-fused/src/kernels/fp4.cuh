// NVFP4 helpers shared by the kernels that quantize to it or read it (moe-quant's
// `quantize_nvfp4`, step for step): sf = e4m3((gs * amax) / 6), s = decode(sf),
// q = e2m1((x * gs) / s), or 0 when s is 0.
#pragma once

__device__ __forceinline__ float e4m3_to_f32(u8 v) {
    u32 h2;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.rn.f16x2.e4m3x2 %0, t; }" : "=r"(h2) : "h"((u16)v));
    return f16_to_f32((u16)(h2 & 0xffffu));
}

// E2M1 code of x, as cvt.rn.satfinite.e2m1x2.f32 rounds (that instruction needs sm_100):
// nearest, ties to the even code, saturating at 6; the sign kept for values that round to 0;
// NaN gives +6.
__device__ __forceinline__ u32 e2m1_code(float x) {
    if (isnan(x)) return 7u;
    const float a = fabsf(x);
    const u32 c = a <= 0.25f ? 0u : a < 0.75f ? 1u : a <= 1.25f ? 2u : a < 1.75f ? 3u
                : a <= 2.5f ? 4u : a < 3.5f ? 5u : a <= 5.0f ? 6u : 7u;
    return c | ((__float_as_uint(x) >> 31) << 3);
}

// e2m1_value(e2m1_code(y)) without the code: |y| rounded on the E2M1 grid of its range (steps of
// 0.5 below 2, of 1 below 4, of 2 above) by adding and subtracting a constant whose ulp is the
// step, which rounds to nearest with ties to the even multiple, the even code, as e2m1_code's
// thresholds do; saturated at 6, the sign kept (so -0), NaN giving +6. A dozen instructions
// instead of the comparisons and the table.
__device__ __forceinline__ float e2m1_round(float y) {
    const float a = fabsf(y);
    const float c = a < 2.0f ? 4194304.0f : a < 4.0f ? 8388608.0f : 16777216.0f;  // 2^22, 2^23, 2^24
    const float r = fminf(__fsub_rn(__fadd_rn(a, c), c), 6.0f);
    return isnan(y) ? 6.0f : copysignf(r, y);
}

// The value of an E2M1 code (sign bit 3), e.g. -0 for code 8. Built from bits, not a table: a
// table indexed per value lives in local memory, which made the quantizing row kernels slow.
// Codes 2..7 are 2^((a >> 1) - 1) * (1 + (a & 1) / 2); codes 0 and 1 are 0 and 0.5.
__device__ __forceinline__ float e2m1_value(u32 c) {
    const u32 a = c & 7u;
    const u32 mag = a < 2u ? (a ? 0x3F000000u : 0u) : (((a >> 1) + 126u) << 23) | ((a & 1u) << 22);
    return __uint_as_float(mag | ((c & 8u) << 28));
}

// The E4M3 block scale code of 16 values with global scale gs, and its value.
__device__ __forceinline__ u8 nvfp4_scale(const float* v, float gs, float* s) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
    const u8 sf = f32_to_e4m3(__fdiv_rn(__fmul_rn(gs, amax), 6.0f));
    *s = e4m3_to_f32(sf);
    return sf;
}

// The E2M1 code of one value of a block with scale value s (nonzero).
__device__ __forceinline__ u32 nvfp4_code(float x, float gs, float s) {
    return e2m1_code(__fdiv_rn(__fmul_rn(x, gs), s));
}

// Sixteen bf16/f16 activations (act dtype) to f32.
__device__ __forceinline__ void load16(const u16* p, float* v) {
    const uint4 a = *(const uint4*)p, b = *(const uint4*)(p + 8);
    const u32 w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        v[2 * i] = act_to_f32((u16)(w[i] & 0xffffu));
        v[2 * i + 1] = act_to_f32((u16)(w[i] >> 16));
    }
}
