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

// The E2M1 grid's rounding boundaries (the midpoints 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5) times a
// block scale s > 0, and the grid's steps times s: all exact in f32 (three significant bits
// times E4M3's four). With them a block is quantized without dividing by its scale: y / s,
// correctly rounded, lies past a midpoint m exactly when |y| lies past m * s, and it is m itself
// (a tie, which goes to the even code) exactly when |y| == m * s. For |y| != m * s the two
// differ by at least the spacing of floats next to m * s on y's side, so |y / s - m| is at
// least that over s, which is more than half the spacing of floats next to m on the same side,
// and the rounded quotient is not m. (moe-quant's test
// `boundaries_times_the_block_scale_give_the_code_of_the_quotient` checks the same comparisons
// against the division over every E4M3 scale, with every value within 300 ulps of each
// boundary.) Seven comparisons a value, where a correctly rounded division is a reciprocal, a
// correction sequence and a range check.
struct E2m1Scaled {
    float bound[7];
    float half, one, two;
};

__device__ __forceinline__ E2m1Scaled e2m1_scaled(float s) {
    const float m[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
    E2m1Scaled g;
#pragma unroll
    for (int i = 0; i < 7; ++i) g.bound[i] = m[i] * s;
    g.half = 0.5f * s;
    g.one = s;
    g.two = 2.0f * s;
    return g;
}

// Which boundaries |y| passes, as e2m1_code's ties take them (to codes 0, 2, 2, 4, 4, 6, 6):
// bit i for boundary i. Each test is written so that NaN passes it.
__device__ __forceinline__ u32 e2m1_passed(float a, const E2m1Scaled& g) {
    return (u32)!(a <= g.bound[0]) | ((u32)!(a < g.bound[1]) << 1) | ((u32)!(a <= g.bound[2]) << 2) |
           ((u32)!(a < g.bound[3]) << 3) | ((u32)!(a <= g.bound[4]) << 4) | ((u32)!(a < g.bound[5]) << 5) |
           ((u32)!(a <= g.bound[6]) << 6);
}

// e2m1_code((y / s)), the division correctly rounded, from the boundaries times s.
__device__ __forceinline__ u32 e2m1_code_scaled(float y, const E2m1Scaled& g) {
    if (isnan(y)) return 7u;
    return (u32)__popc(e2m1_passed(fabsf(y), g)) | ((__float_as_uint(y) >> 31) << 3);
}

// e2m1_value(e2m1_code(y / s)) * s, the value the quantization keeps, by adding the grid's
// steps (times s) for each boundary passed: exact, and y's sign (so -0 for small negative y);
// NaN gives +6 s, as e2m1_code's +6.
__device__ __forceinline__ float e2m1_round_scaled(float y, const E2m1Scaled& g) {
    const float a = fabsf(y);
    float r = !(a <= g.bound[0]) ? g.half : 0.0f;
    if (!(a < g.bound[1])) r += g.half;
    if (!(a <= g.bound[2])) r += g.half;
    if (!(a < g.bound[3])) r += g.half;
    if (!(a <= g.bound[4])) r += g.one;
    if (!(a < g.bound[5])) r += g.one;
    if (!(a <= g.bound[6])) r += g.two;
    return isnan(y) ? r : copysignf(r, y);
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

// The E2M1 code of one value of a block with scale value s (nonzero), given e2m1_scaled(s).
__device__ __forceinline__ u32 nvfp4_code(float x, float gs, const E2m1Scaled& g) {
    return e2m1_code_scaled(__fmul_rn(x, gs), g);
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
