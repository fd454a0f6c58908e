// The NVFP4 GEMM inputs (gemm.cu): activations quantized to NVFP4 and kept as the values the
// tensor cores take (exact f16, or E4M3 bytes for E4M3 products), NVFP4 rows from the
// low-latency dispatch expanded the same way, and GEMM 1's rows through the activation,
// requantized for GEMM 2. One thread per 16-value block.
//
// Rows: expert e's rows start at row `base(e)` of the row space: e * cap in the masked layout,
// or row0[e] in the standard path's compact layout. Only the first counts[e] rows of an expert
// are computed or written.
//
// Quantization (activations, and the intermediate after the activation) follows moe-quant's
// `quantize_nvfp4` step for step: sf = e4m3((gs * amax) / 6), s = decode(sf),
// q = e2m1((x * gs) / s), or 0 when s is 0; the value kept is e2m1(q) * s (the division by gs
// is part of alpha). The codes come from comparisons of x * gs with E2M1's rounding boundaries
// times s, which give the rounded quotient's codes without dividing (fp4.cuh, e2m1_scaled).
//
// Compile-time parameters: ACT and GATE_UP (the activation, as the row kernels), ACT_F16.
//
// A GEMM input's `layout`: 0 and 1 hold f16 values in the order of mma.sync and of the wgmma
// kernel; LAYOUT_F8, the wgmma kernel's E4M3 bytes (e4m3(v / 8)), one byte a value.
#define LAYOUT_F8 3

#define FP4_THREADS 128
#define KS 256  // k values per GEMM stage, and the segment of the GEMM input layout

__device__ __forceinline__ long long row_base(const int* row0, int cap, int e) {
    return row0 ? (long long)row0[e] : (long long)e * cap;
}

// The layouts of GEMM inputs: rows of ceil(K / 256) * 256 values (whole stages), each
// 256-value segment holding its sixteen blocks in the order the GEMM's lanes read them.
//  - mma.sync (wg = 0): block b = 4t + c of a segment lies at slot 4c + t (so that lane t's
//    stage range, blocks 4t..4t+3, lies across the four TMA boxes of 64 values at the same
//    offset, conflict-free with the swizzle); within a block the values pair as the widened
//    weight codes do: (0 2), (1 3), (4 6), (5 7), then the same for 8..15.
//  - wgmma (wg = 1): value v = 4s + 2e + h of block 4t + c lies at 64c + 16s + 8h + 2t + e, so
//    that k16 step s of box c gives lane t codes 4s..4s+3 of its own block, as its A fragment
//    takes them (k 2t, 2t + 1 <- codes 4s, 4s + 2; k 2t + 8, 2t + 9 <- codes 4s + 1, 4s + 3).
//  - wgmma with E4M3 products (layout 3, bytes): value v of block 4t + c lies at byte
//    32j + 16((v & 7) / 4) + 4t + (v & 3) with j = 2c + v / 8, so that k32 step j (box j / 4 of
//    128 values, step j % 4 in it) gives lane t the eight codes 8h.. 8h + 7 (h = j % 2) of its
//    own block, as its A fragment takes them (k 4t.. 4t + 3 <- codes 8h.. 8h + 3, k 16 + 4t..
//    <- codes 8h + 4.. 8h + 7).
// A block's sixteen values v (exact, code times block scale), block b of a row starting at
// `row`, in `layout`.
__device__ __forceinline__ void store_block(const float* v, u8* row, int b, int layout) {
    const int seg = (b >> 4) * KS, t = (b & 15) >> 2, c = b & 3;
    if (layout == LAYOUT_F8) {
        u32 p[8];  // bytes of values 2i and 2i + 1
#pragma unroll
        for (int i = 0; i < 8; ++i) p[i] = f32x2_to_e4m3x2(v[2 * i] * 0.125f, v[2 * i + 1] * 0.125f);
        u8* out = row + seg + 4 * t;
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int j = 4 * h + 2 * half;  // values 8h + 4half.. 8h + 4half + 3
                *(u32*)(out + 32 * (2 * c + h) + 16 * half) = p[j] | (p[j + 1] << 16);
            }
        return;
    }
    u16* row16 = (u16*)row;
    if (layout) {
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                *(u32*)(row16 + seg + 64 * c + 16 * s + 8 * h + 2 * t) = f32x2_to_f16x2(v[4 * s + h], v[4 * s + 2 + h]);
        return;
    }
    u32 w[8];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const float* x = v + 8 * half;
        w[4 * half + 0] = f32x2_to_f16x2(x[0], x[2]);
        w[4 * half + 1] = f32x2_to_f16x2(x[1], x[3]);
        w[4 * half + 2] = f32x2_to_f16x2(x[4], x[6]);
        w[4 * half + 3] = f32x2_to_f16x2(x[5], x[7]);
    }
    u16* out = row16 + seg + (4 * c + t) * 16;
    *(uint4*)out = make_uint4(w[0], w[1], w[2], w[3]);
    *(uint4*)(out + 8) = make_uint4(w[4], w[5], w[6], w[7]);
}

// One NVFP4 block of 16 values v, quantized into q: e2m1(v * gs / s) * s (exact in f32), the
// codes from comparisons with the grid's boundaries times s (e2m1_scaled).
__device__ __forceinline__ void nvfp4_values(const float* v, float gs, float* q) {
    float s;
    nvfp4_scale(v, gs, &s);
    if (s != 0.0f) {
        const E2m1Scaled g = e2m1_scaled(s);
#pragma unroll
        for (int i = 0; i < 16; ++i) q[i] = e2m1_round_scaled(__fmul_rn(v[i], gs), g);
    } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) q[i] = 0.0f;
    }
}

// nvfp4_values of a block, written in `layout`.
__device__ __forceinline__ void nvfp4_block(const float* v, float gs, u8* row, int b, int layout) {
    float q[16];
    nvfp4_values(v, gs, q);
    store_block(q, row, b, layout);
}

// Zeros in the places of blocks kb.. of a row's last segment (none when K fills it): one
// workspace serves every layout, so they may hold another layout's bytes, and the GEMM reads
// them (times zero weights, which a NaN pattern would not survive).
__device__ __forceinline__ void store_pad(u8* row, int kb, int layout) {
    const float zeros[16] = {};
    for (int b = kb; b < (kb + 15) / 16 * 16; ++b) store_block(zeros, row, b, layout);
}

// Bytes of a GEMM input row of k values in `layout`: whole segments, one or two bytes a value.
__device__ __forceinline__ long long row_bytes(int k, int layout) {
    return (long long)((k + KS - 1) / KS * KS) * (layout == LAYOUT_F8 ? 1 : 2);
}

// Activations to NVFP4 values (in `layout`) with the expert's global scale: thread per 16-value block.
// Row i of
// expert e reads x row src[base(e) + i] when `src` is given (the standard path's gather), else
// x row base(e) + i; times in_weight[that row] first when given (router weight on the input).
// With `picks` (the standard layout's tokens quantized once, as one expert of M rows), row i is
// token i, written to the row picks[i * top_k + k] of each of its picks (none where that is -1:
// no local expert took it) instead of row i: one pass over the tokens, each quantized once.
// Grid: (blocks striding over rows * K/16, E).
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_quant_rows(
    const u16* __restrict__ x, const int* __restrict__ src, const float* __restrict__ in_weight,
    const int* __restrict__ counts, const int* __restrict__ row0, int cap, int K,
    const float* __restrict__ gs_e, u8* __restrict__ a, int layout, const int* __restrict__ picks, int top_k) {
    const int e = blockIdx.y, kb = K / 16;
    const long long pitch = row_bytes(K, layout);
    const int n = min(max(counts[e], 0), cap);
    const long long base = row_base(row0, cap, e);
    const float gs = gs_e[e];
    for (long long item = (long long)blockIdx.x * FP4_THREADS + threadIdx.x; item < (long long)n * kb;
         item += (long long)gridDim.x * FP4_THREADS) {
        const int i = (int)(item / kb), b = (int)(item % kb);
        const long long from = src ? (long long)src[base + i] : base + i;
        float v[16];
        load16(x + from * K + b * 16, v);
        if (in_weight) {
            const float w = in_weight[from];
#pragma unroll
            for (int j = 0; j < 16; ++j) v[j] *= w;
        }
        if (picks) {
            float q[16];
            nvfp4_values(v, gs, q);
            for (int k = 0; k < top_k; ++k) {
                const int r = picks[(long long)i * top_k + k];
                if (r < 0) continue;
                store_block(q, a + r * pitch, b, layout);
                if (b == kb - 1) store_pad(a + r * pitch, kb, layout);
            }
            continue;
        }
        nvfp4_block(v, gs, a + (base + i) * pitch, b, layout);
        if (b == kb - 1) store_pad(a + (base + i) * pitch, kb, layout);
    }
}
// NVFP4 rows as the low-latency dispatch delivers them (codes [rows, K/2], E4M3 scales
// [rows, K/16] row-major, over the weights' input global scale) to GEMM 1's values (code
// times block scale) in `layout`. Grid as fp4_quant_rows.
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_expand_rows(
    const u8* __restrict__ codes, const u8* __restrict__ scales, const int* __restrict__ counts,
    const int* __restrict__ row0, int cap, int K, u8* __restrict__ a, int layout) {
    const int e = blockIdx.y, kb = K / 16;
    const long long pitch = row_bytes(K, layout);
    const int n = min(max(counts[e], 0), cap);
    const long long base = row_base(row0, cap, e);
    for (long long item = (long long)blockIdx.x * FP4_THREADS + threadIdx.x; item < (long long)n * kb;
         item += (long long)gridDim.x * FP4_THREADS) {
        const long long row = base + item / kb;
        const int b = (int)(item % kb);
        const uint2 p = *(const uint2*)(codes + row * (K / 2) + b * 8);
        const float s = e4m3_to_f32(scales[row * kb + b]);
        float q[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) q[i] = e2m1_value(((i < 8 ? p.x : p.y) >> (4 * (i & 7))) & 0xFu) * s;
        store_block(q, a + row * pitch, b, layout);
        if (b == kb - 1) store_pad(a + row * pitch, kb, layout);
    }
}

// One 16-value block (b of kb) of an activation output row from sixteen of GEMM 1's columns of
// each half of its weight rows, `first` and `second` (gate and up, or up and gate by GATE_UP):
// the activation, then NVFP4 with the GEMM-2 global scale into `row` (`layout`). The activation
// kernel and GEMM 1's activation epilogue (gemm.cu, store_act_staged) both take it, from the
// same bf16 values, so their results agree bit for bit.
__device__ __forceinline__ void act_quant_block(const u16* first, const u16* second, float limit, float alpha_act,
                                                float gs, u8* row, int b, int kb, int layout) {
    float x[16], y[16], v[16];
    load16(first, x);
    load16(second, y);
#pragma unroll
    for (int j = 0; j < 16; ++j)
#if GATE_UP == 1
        v[j] = activation(y[j], x[j], limit, alpha_act);
#else
        v[j] = activation(x[j], y[j], limit, alpha_act);
#endif
    nvfp4_block(v, gs, row, b, layout);
    if (b == kb - 1) store_pad(row, kb, layout);
}

// GEMM 1's output rows through the activation, quantized to NVFP4 values (in `layout`) with the
// expert's GEMM-2 global scale: thread per 16-value output block. Grid: (blocks striding over rows * I/16, E).
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_act_quant(
    const u16* __restrict__ c1, const int* __restrict__ counts, const int* __restrict__ row0, int cap,
    int inter, float limit, float alpha_act, const float* __restrict__ gs_e, u8* __restrict__ a, int layout) {
    const int e = blockIdx.y, kb = inter / 16;
    const long long pitch = row_bytes(inter, layout);
    const int n = min(max(counts[e], 0), cap);
    const long long base = row_base(row0, cap, e);
    const float gs = gs_e[e];
#if ACT >= 5
    const int width = inter;
#else
    const int width = 2 * inter;
#endif
    for (long long item = (long long)blockIdx.x * FP4_THREADS + threadIdx.x; item < (long long)n * kb;
         item += (long long)gridDim.x * FP4_THREADS) {
        const int i = (int)(item / kb), b = (int)(item % kb);
        const u16* x = c1 + (base + i) * width;
#if ACT < 5 && GATE_UP != 2
        act_quant_block(x + b * 16, x + inter + b * 16, limit, alpha_act, gs, a + (base + i) * pitch, b, kb, layout);
#else
        float v[16];
#if ACT >= 5
        float gate[16];
        load16(x + b * 16, gate);
#pragma unroll
        for (int j = 0; j < 16; ++j) v[j] = activation(gate[j], 0.0f, limit, alpha_act);
#else
        float gu[32];
        load16(x + b * 32, gu);
        load16(x + b * 32 + 16, gu + 16);
#pragma unroll
        for (int j = 0; j < 16; ++j) v[j] = activation(gu[2 * j], gu[2 * j + 1], limit, alpha_act);
#endif
        nvfp4_block(v, gs, a + (base + i) * pitch, b, layout);
        if (b == kb - 1) store_pad(a + (base + i) * pitch, kb, layout);
#endif
    }
}
