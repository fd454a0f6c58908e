// Row kernels around the GEMMs, one thread block per row:
//  - moe_act: the activation of GEMM 1's output row (gate/up per GATE_UP), then the rounding
//    GEMM 2's input needs (QUANT: 0 none, 1 e4m3 per 128, 2 e4m3 per row, 3 e4m3 with a
//    per-tensor scale, 4 per-tensor amax only);
//  - moe_quant_input: GEMM 1's input row (times its router weight when the weight goes on the
//    input), with the same QUANT modes;
//  - moe_sum: out[t] = scale * sum over slots of the weighted GEMM 2 rows.
// moe_act and moe_quant_input take a row map last: with `rows_map` null, block i is row i;
// otherwise the blocks stride over positions p below *rows_count, working on row rows_map[p]
// and skipping the sentinel (the masked layout runs only its valid rows, with a grid sized
// for the GPU rather than for the largest possible batch).
// Compile-time parameters: ACT (0 silu*up, 1 gelu*up, 2 swiglu_limit, 3 clamp after silu,
// 4 gpt-oss, 5 silu, 6 gelu), GATE_UP (0 gate|up, 1 up|gate, 2 interleaved), QUANT, ACT_F16.

#define ROW_THREADS 256

// Writes one row of `n` values produced by `value(j)`: as the activation dtype, or as e4m3
// with scales per QUANT. `red` is block-reduction scratch.
template <typename F>
__device__ __forceinline__ void emit_row(F value, int n, long long row, void* out, float* scale_out,
                                         float* amax_io, float* red) {
#if QUANT == 0
    u16* o = (u16*)out + row * n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) o[j] = f32_to_act(value(j));
#elif QUANT == 1
    // One warp per 128-wide group, four values a lane: the group's amax is a warp reduction,
    // so groups proceed in parallel with no block barrier.
    u8* o = (u8*)out + row * n;
    const int groups = n / 128, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    for (int gi = warp; gi < groups; gi += nw) {
        float v[4], amax = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            v[q] = value(gi * 128 + lane * 4 + q);
            amax = fmaxf(amax, fabsf(v[q]));
        }
        amax = warp_max(amax);
        const float s = fmaxf(amax, 1e-4f) / 448.0f;
        u32 packed = 0;
#pragma unroll
        for (int q = 0; q < 4; ++q) packed |= (u32)f32_to_e4m3(v[q] / s) << (8 * q);
        *(u32*)(o + gi * 128 + lane * 4) = packed;
        if (lane == 0) scale_out[row * groups + gi] = s;
    }
#elif QUANT == 2
    u8* o = (u8*)out + row * n;
    float amax = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) amax = fmaxf(amax, fabsf(value(j)));
    amax = block_max(amax, red);
    const float s = fmaxf(amax, 1e-4f) / 448.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) o[j] = f32_to_e4m3(value(j) / s);
    if (threadIdx.x == 0) scale_out[row] = s;
#elif QUANT == 3
    u8* o = (u8*)out + row * n;
    const float s = *scale_out;
    for (int j = threadIdx.x; j < n; j += blockDim.x) o[j] = f32_to_e4m3(value(j) / s);
#else
    float amax = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) amax = fmaxf(amax, fabsf(value(j)));
    amax = block_max(amax, red);
    if (threadIdx.x == 0) atomic_max_nonneg(amax_io, amax);
#endif
}

// Positions this block visits: its own row without a map, else a grid stride over the map.
__device__ __forceinline__ int row_positions(const int* rows_map, const int* rows_count) {
    return rows_map ? *rows_count : (int)gridDim.x;
}
// The row at position p, or -1 for the sentinel.
__device__ __forceinline__ long long row_at(const int* rows_map, int p, int sentinel) {
    if (!rows_map) return p;
    const int r = rows_map[p];
    return r >= sentinel ? -1 : r;
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS) moe_act(
    const u16* __restrict__ in,      // [numel, n1] GEMM 1 output
    const int* __restrict__ topk_ids, // [numel] or null; rows with -1 were never computed
    void* __restrict__ out, float* __restrict__ scale_out, float* __restrict__ amax_io,
    int inter, float limit, float alpha,
    const int* __restrict__ rows_map, const int* __restrict__ rows_count, int sentinel) {
    __shared__ float red[ROW_THREADS / 32];
    const int positions = row_positions(rows_map, rows_count);
    for (int p = blockIdx.x; p < positions; p += gridDim.x) {
    const long long row = row_at(rows_map, p, sentinel);
    if (row < 0 || (topk_ids && topk_ids[row] < 0)) continue;
#if ACT >= 5
    const u16* x = in + row * inter;
    auto value = [&](int j) { return activation(act_to_f32(x[j]), 0.0f, limit, alpha); };
#else
    const u16* x = in + row * 2 * inter;
    auto value = [&](int j) {
#if GATE_UP == 0
        const float gate = act_to_f32(x[j]), up = act_to_f32(x[inter + j]);
#elif GATE_UP == 1
        const float up = act_to_f32(x[j]), gate = act_to_f32(x[inter + j]);
#else
        const float gate = act_to_f32(x[2 * j]), up = act_to_f32(x[2 * j + 1]);
#endif
        return activation(gate, up, limit, alpha);
    };
#endif
    emit_row(value, inter, row, out, scale_out, amax_io, red);
    }
}

extern "C" __global__ void __launch_bounds__(ROW_THREADS) moe_quant_input(
    const u16* __restrict__ in,        // [M, H]
    const float* __restrict__ row_weight, // [M] or null: multiply each row first
    void* __restrict__ out, float* __restrict__ scale_out, float* __restrict__ amax_io, int h,
    const int* __restrict__ rows_map, const int* __restrict__ rows_count, int sentinel) {
    __shared__ float red[ROW_THREADS / 32];
    const int positions = row_positions(rows_map, rows_count);
    for (int p = blockIdx.x; p < positions; p += gridDim.x) {
        const long long row = row_at(rows_map, p, sentinel);
        if (row < 0) continue;
        const u16* x = in + row * h;
        const float w = row_weight ? row_weight[row] : 1.0f;
        auto value = [&](int j) { return act_to_f32(x[j]) * w; };
        emit_row(value, h, row, out, scale_out, amax_io, red);
    }
}

// amax -> per-tensor scale, in place.
extern "C" __global__ void moe_amax_to_scale(float* amax_scale) {
    if (threadIdx.x == 0 && blockIdx.x == 0) *amax_scale = fmaxf(*amax_scale, 1e-4f) / 448.0f;
}

// Grid: tokens x column chunks of 2 * ROW_THREADS, so a small batch still spreads over many
// blocks; a token's slot ids are read once and its k row loads are independent.
extern "C" __global__ void __launch_bounds__(ROW_THREADS) moe_sum(
    const u16* __restrict__ rows,     // [M * k, H], weighted
    const int* __restrict__ topk_ids, // [M * k]
    u16* __restrict__ out,            // [M, H]
    int k, int h, float scale, int chunks) {
    const long long t = blockIdx.x / chunks;
    const int c = (blockIdx.x % chunks) * (2 * ROW_THREADS) + threadIdx.x * 2;
    if (c >= h) return;
    float s0 = 0.0f, s1 = 0.0f;
#pragma unroll 4
    for (int s = 0; s < k; ++s) {
        const int id = topk_ids[t * k + s];
        const u32 v = id >= 0 ? *(const u32*)(rows + (t * k + s) * h + c) : 0u;
        s0 += act_to_f32((u16)(v & 0xffff));
        s1 += act_to_f32((u16)(v >> 16));
    }
    *(u32*)(out + t * h + c) = (u32)f32_to_act(s0 * scale) | ((u32)f32_to_act(s1 * scale) << 16);
}

// Writes one float (a static per-tensor scale) on the stream, so graphs capture it.
extern "C" __global__ void moe_fill(float* dst, float v) {
    if (threadIdx.x == 0 && blockIdx.x == 0) *dst = v;
}
