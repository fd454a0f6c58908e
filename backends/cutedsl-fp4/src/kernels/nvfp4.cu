// NVFP4 (w4a4) grouped GEMMs for Hopper, which has FP8 tensor cores and no FP4 ones: FP4 moves
// through memory, each 16-value block is expanded to E4M3 in registers (E2M1 values are exact
// in E4M3: a table of eight magnitudes and the sign bit), multiplied on the FP8 units with
// mma.sync m16n8k16 (one K step per NVFP4 block), and the two E4M3 block scales are applied to
// that block's partial product in f32. The tensor's alpha = 1 / (gs_a * gs_w) is applied once
// at the end.
//
// Rows: expert e's rows start at row `base(e)` of the row space: e * cap in the masked layout,
// or row0[e] (a multiple of 128) in the standard path's compact layout. Its block scales use the
// 128x4 swizzled layout of a matrix whose rows start at `sbase(e)` (e * round128(cap), or
// row0[e]), so each expert's scales are a swizzled matrix of their own. Only the first
// counts[e] rows of an expert are read or written.
//
// Quantization (activations, and the intermediate after the activation) follows
// moe-quant's `quantize_nvfp4` step for step: sf = e4m3((gs * amax) / 6), s = decode(sf),
// q = e2m1((x * gs) / s), or 0 when s is 0.
//
// Compile-time parameters: ACT and GATE_UP (the activation, as the row kernels), ACT_F16.

#define FP4_THREADS 128
#define BN 128
#define BK 64           // values per K step: four NVFP4 blocks
#define STAGES 4
#define ROW_BYTES (BK / 2)

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

// Byte offset of scale (m, k) in a swizzled [rows, k_sf] matrix with k_tiles = ceil(k_sf / 4).
__device__ __forceinline__ long long swz(long long m, int k, int k_tiles) {
    return (m >> 7) * (long long)(k_tiles * 512) + (k >> 2) * 512 + (m & 31) * 16 + ((m & 127) >> 5) * 4 + (k & 3);
}

__device__ __forceinline__ long long row_base(const int* row0, int cap, int e) {
    return row0 ? (long long)row0[e] : (long long)e * cap;
}
__device__ __forceinline__ long long scale_base(const int* row0, int cap, int e) {
    return row0 ? (long long)row0[e] : (long long)e * ((cap + 127) / 128 * 128);
}

// One NVFP4 block of 16 values: 8 packed bytes and the E4M3 scale code.
__device__ __forceinline__ uint2 nvfp4_block(const float* v, float gs, u8* sf_out) {
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
    const u8 sf = f32_to_e4m3(__fdiv_rn(__fmul_rn(gs, amax), 6.0f));
    const float s = e4m3_to_f32(sf);
    uint2 p = {0u, 0u};
    if (s != 0.0f) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            p.x |= e2m1_code(__fdiv_rn(__fmul_rn(v[i], gs), s)) << (4 * i);
            p.y |= e2m1_code(__fdiv_rn(__fmul_rn(v[i + 8], gs), s)) << (4 * i);
        }
    }
    *sf_out = sf;
    return p;
}

__device__ __forceinline__ void load16(const u16* p, float* v) {
    const uint4 a = *(const uint4*)p, b = *(const uint4*)(p + 8);
    const u32 w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        v[2 * i] = act_to_f32((u16)(w[i] & 0xffffu));
        v[2 * i + 1] = act_to_f32((u16)(w[i] >> 16));
    }
}

// Activations to NVFP4 with the expert's global scale: thread per 16-value block. Row i of
// expert e reads x row src[base(e) + i] when `src` is given (the standard path's gather), else
// x row base(e) + i; times in_weight[that row] first when given (router weight on the input).
// Grid: (blocks striding over rows * K/16, E).
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_quant_rows(
    const u16* __restrict__ x, const int* __restrict__ src, const float* __restrict__ in_weight,
    const int* __restrict__ counts, const int* __restrict__ row0, int cap, int K,
    const float* __restrict__ gs_e, u8* __restrict__ packed, u8* __restrict__ scales) {
    const int e = blockIdx.y, kb = K / 16, k_tiles = (kb + 3) / 4;
    const int n = min(max(counts[e], 0), cap);
    const long long base = row_base(row0, cap, e), sb = scale_base(row0, cap, e);
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
        u8 sf;
        *(uint2*)(packed + (base + i) * (K / 2) + b * 8) = nvfp4_block(v, gs, &sf);
        scales[sb * k_tiles * 4 + swz(i, b, k_tiles)] = sf;
    }
}

// Four E2M1 codes (bits 0..15, element j in nibble j) to four E4M3 bytes.
__device__ __forceinline__ u32 fp4x4_to_e4m3x4(u32 h) {
    const u32 mag = __byte_perm(0x3C383000u, 0x4C484440u, h & 0x7777u);
    const u32 b = (h & 0xFu) | ((h & 0xF0u) << 4) | ((h & 0xF00u) << 8) | ((h & 0xF000u) << 12);
    return mag | ((b & 0x08080808u) << 4);
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void mma_e4m3_16816(float* d, u32 a0, u32 a1, u32 b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
}

template <int TBM>
struct Fp4Stage {
    u8 a[TBM * ROW_BYTES];
    u8 w[BN * ROW_BYTES];
    u32 sa[TBM];  // the four block scales of each row in this K step
    u32 sw[BN];
};

// The row tiles of the GEMMs, in one block: tile_start[e] = sum over experts before e of
// ceil(min(counts, cap) / bm), tile_start[E] the total. The GEMM grid covers an upper bound of
// the total, so no host ever waits for the counts. A count outside 0..=cap sets bit 0 of
// `status` (and is clamped).
extern "C" __global__ void fp4_tiles(const int* __restrict__ counts, int E, int cap, int bm,
                                     int* __restrict__ tile_start, int* __restrict__ status) {
    if (threadIdx.x != 0) return;
    int acc = 0;
    for (int e = 0; e < E; ++e) {
        tile_start[e] = acc;
        const int c = counts[e];
        if (c < 0 || c > cap) *status |= 1;
        acc += (min(max(c, 0), cap) + bm - 1) / bm;
    }
    tile_start[E] = acc;
}

// C[base(e) + i, n] = alpha[e] * sum_k A[base(e) + i, k] * W[e, n, k] for i < counts[e], as the
// activation dtype. W: [E, N, K/2] packed with scales [E, swizzled(N, K/16)]. Grid:
// (ceil(N / BN), Y): block (x, y) computes columns x * BN.. of row tiles y, y + Y, ... below
// tile_start[E] (each tile's expert found in tile_start); four warps, each TBM rows by 32
// columns of the tile. TBM = 16 for
// decode batches (a row tile of 64 would spend four times the tensor-core work on empty rows),
// 64 otherwise.
template <int TBM>
__device__ __forceinline__ void fp4_gemm_tile(
    const u8* __restrict__ A, const u8* __restrict__ A_sf, const u8* __restrict__ W,
    const u8* __restrict__ W_sf, const int* __restrict__ counts, const int* __restrict__ row0, int cap,
    const int* __restrict__ tile_start, int E, const float* __restrict__ alpha, u16* __restrict__ C, int N,
    int K) {
    constexpr int MT = TBM / 16;  // m16 tiles per warp
    __shared__ __align__(16) Fp4Stage<TBM> st[STAGES];
    const int total = tile_start[E];
    for (int tile = blockIdx.y; tile < total; tile += gridDim.y) {
        int lo = 0, hi = E;  // the expert e with tile_start[e] <= tile < tile_start[e + 1]
        while (hi - lo > 1) {
            const int mid = (lo + hi) >> 1;
            if (tile_start[mid] <= tile) lo = mid; else hi = mid;
        }
        const int e = lo, m0 = (tile - tile_start[e]) * TBM, n0 = blockIdx.x * BN;
        const int rows = min(max(counts[e], 0), cap);
        const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
        const int kb_all = K / 16, k_tiles = (kb_all + 3) / 4, steps = (K + BK - 1) / BK;
        const long long base = row_base(row0, cap, e), sb = scale_base(row0, cap, e);
        const u8* a_rows = A + base * (K / 2);
        const u8* a_sf = A_sf + sb * k_tiles * 4;
        const u8* w_rows = W + (long long)e * N * (K / 2);
        const u8* w_sf = W_sf + (long long)e * ((N + 127) / 128 * 128) * k_tiles * 4;

        auto load = [&](int slot, int step) {
            Fp4Stage<TBM>& s = st[slot];
            const int k0 = step * BK;
            // A: TBM rows of 32 bytes, two 16-byte chunks each.
            if (tid < 2 * TBM) {
                const int r = tid >> 1, c = tid & 1;
                const bool ok = m0 + r < rows && k0 + c * 32 < K;
                cp_async16(s.a + r * ROW_BYTES + c * 16, ok ? a_rows + (long long)(m0 + r) * (K / 2) + k0 / 2 + c * 16 : a_rows, ok ? 16 : 0);
            }
            // W: BN rows, two chunks each (two per thread).
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int idx = tid + q * FP4_THREADS, r = idx >> 1, c = idx & 1;
                const bool ok = n0 + r < N && k0 + c * 32 < K;
                cp_async16(s.w + r * ROW_BYTES + c * 16, ok ? w_rows + (long long)(n0 + r) * (K / 2) + k0 / 2 + c * 16 : w_rows, ok ? 16 : 0);
            }
            // Scales: four contiguous bytes per row (one swizzle k-tile).
            if (tid < TBM) {
                const bool ok = m0 + tid < rows;
                cp_async4(&s.sa[tid], ok ? a_sf + swz(m0 + tid, step * 4, k_tiles) : a_sf, ok ? 4 : 0);
            }
            {
                const bool ok = n0 + tid < N;
                cp_async4(&s.sw[tid], ok ? w_sf + swz(n0 + tid, step * 4, k_tiles) : w_sf, ok ? 4 : 0);
            }
        };

        float acc[MT][4][4];
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < steps) load(s, s);
            cp_async_commit();
        }
        for (int step = 0; step < steps; ++step) {
            cp_async_wait<STAGES - 2>();
            __syncthreads();
            const int next = step + STAGES - 1;
            if (next < steps) load(next % STAGES, next);
            cp_async_commit();
            const Fp4Stage<TBM>& s = st[step % STAGES];
#pragma unroll
            for (int kb = 0; kb < 4; ++kb) {
                // Scales of this thread's rows and columns for block kb.
                float sa[MT][2], sw[4][2];
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    sa[i][0] = e4m3_to_f32((u8)(s.sa[i * 16 + g] >> (8 * kb)));
                    sa[i][1] = e4m3_to_f32((u8)(s.sa[i * 16 + g + 8] >> (8 * kb)));
                }
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int col = warp * 32 + j * 8 + tig * 2;
                    sw[j][0] = e4m3_to_f32((u8)(s.sw[col] >> (8 * kb)));
                    sw[j][1] = e4m3_to_f32((u8)(s.sw[col + 1] >> (8 * kb)));
                }
                u32 bf[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int n = warp * 32 + j * 8 + g;
                    bf[j] = fp4x4_to_e4m3x4(*(const u16*)(s.w + n * ROW_BYTES + kb * 8 + tig * 2));
                }
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    const u32 a0 = fp4x4_to_e4m3x4(*(const u16*)(s.a + (i * 16 + g) * ROW_BYTES + kb * 8 + tig * 2));
                    const u32 a1 = fp4x4_to_e4m3x4(*(const u16*)(s.a + (i * 16 + g + 8) * ROW_BYTES + kb * 8 + tig * 2));
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                        mma_e4m3_16816(t, a0, a1, bf[j]);
                        acc[i][j][0] += t[0] * (sa[i][0] * sw[j][0]);
                        acc[i][j][1] += t[1] * (sa[i][0] * sw[j][1]);
                        acc[i][j][2] += t[2] * (sa[i][1] * sw[j][0]);
                        acc[i][j][3] += t[3] * (sa[i][1] * sw[j][1]);
                    }
                }
            }
        }
        cp_async_wait<0>();
        const float al = alpha[e];
#pragma unroll
        for (int i = 0; i < MT; ++i) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = m0 + i * 16 + g + h * 8;
                if (r >= rows) continue;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int n = n0 + warp * 32 + j * 8 + tig * 2;
                    if (n >= N) continue;
                    const u32 v = (u32)f32_to_act(acc[i][j][2 * h] * al) | ((u32)f32_to_act(acc[i][j][2 * h + 1] * al) << 16);
                    *(u32*)(C + (base + r) * N + n) = v;
                }
            }
        }
        __syncthreads();  // the next tile's loads reuse the stages
    }
}

#define FP4_GEMM_ARGS                                                                                         \
    const u8 *__restrict__ A, const u8 *__restrict__ A_sf, const u8 *__restrict__ W, const u8 *__restrict__ W_sf, \
        const int *__restrict__ counts, const int *__restrict__ row0, int cap, const int *__restrict__ tile_start, \
        int E, const float *__restrict__ alpha, u16 *__restrict__ C, int N, int K
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_gemm_m16(FP4_GEMM_ARGS) {
    fp4_gemm_tile<16>(A, A_sf, W, W_sf, counts, row0, cap, tile_start, E, alpha, C, N, K);
}
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_gemm_m64(FP4_GEMM_ARGS) {
    fp4_gemm_tile<64>(A, A_sf, W, W_sf, counts, row0, cap, tile_start, E, alpha, C, N, K);
}

// GEMM 1's output rows through the activation, quantized to NVFP4 with the expert's GEMM-2
// global scale: thread per 16-value output block. Grid: (blocks striding over rows * I/16, E).
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_act_quant(
    const u16* __restrict__ c1, const int* __restrict__ counts, const int* __restrict__ row0, int cap,
    int inter, float limit, float alpha_act, const float* __restrict__ gs_e, u8* __restrict__ packed,
    u8* __restrict__ scales) {
    const int e = blockIdx.y, kb = inter / 16, k_tiles = (kb + 3) / 4;
    const int n = min(max(counts[e], 0), cap);
    const long long base = row_base(row0, cap, e), sb = scale_base(row0, cap, e);
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
        float v[16];
#if ACT >= 5
        float gate[16];
        load16(x + b * 16, gate);
#pragma unroll
        for (int j = 0; j < 16; ++j) v[j] = activation(gate[j], 0.0f, limit, alpha_act);
#elif GATE_UP == 2
        float gu[32];
        load16(x + b * 32, gu);
        load16(x + b * 32 + 16, gu + 16);
#pragma unroll
        for (int j = 0; j < 16; ++j) v[j] = activation(gu[2 * j], gu[2 * j + 1], limit, alpha_act);
#else
        float first[16], second[16];
        load16(x + b * 16, first);
        load16(x + inter + b * 16, second);
#pragma unroll
        for (int j = 0; j < 16; ++j)
#if GATE_UP == 0
            v[j] = activation(first[j], second[j], limit, alpha_act);
#else
            v[j] = activation(second[j], first[j], limit, alpha_act);
#endif
#endif
        u8 sf;
        *(uint2*)(packed + (base + i) * (inter / 2) + b * 8) = nvfp4_block(v, gs, &sf);
        scales[sb * k_tiles * 4 + swz(i, b, k_tiles)] = sf;
    }
}

// The standard path's pre-permute, in one block: counts per local expert (ids outside 0..E are
// not computed here), 128-aligned starts, and for each (token, pick) its row: src[row] = token,
// slot_of[t * K + k] = row (or -1). Rows within an expert follow no particular order; each is
// computed independently, so the results do not depend on it.
extern "C" __global__ void __launch_bounds__(1024) fp4_route(
    const int* __restrict__ ids, int picks, int K, int E, int* __restrict__ counts, int* __restrict__ row0,
    int* __restrict__ src, int* __restrict__ slot_of) {
    extern __shared__ int cnt[];  // [E] counts, then [E] cursors
    int* cur = cnt + E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < picks; p += blockDim.x) {
        const int id = ids[p];
        if (id >= 0 && id < E) atomicAdd(&cnt[id], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int e = 0; e < E; ++e) {
            row0[e] = acc;
            cur[e] = acc;
            counts[e] = cnt[e];
            acc += (cnt[e] + 127) / 128 * 128;
        }
    }
    __syncthreads();
    for (int p = threadIdx.x; p < picks; p += blockDim.x) {
        const int id = ids[p];
        int row = -1;
        if (id >= 0 && id < E) {
            row = atomicAdd(&cur[id], 1);
            src[row] = p / K;
        }
        slot_of[p] = row;
    }
}

// out[t] = scale * sum_k w[t,k] * y[slot_of[t,k]] in f32 (w = 1 when null: the weight went on
// the input), eight columns a thread; with `no_combine`, out[t, k] = y[slot_of[t,k]] as it is
// (zeros for a dropped pick). Grid: blocks striding over (token, 1024-column chunk) items.
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_combine(
    const u16* __restrict__ y, const int* __restrict__ slot_of, const float* __restrict__ w, int M, int K, int H,
    float scale, int no_combine, u16* __restrict__ out) {
    const int chunks = (H + 8 * FP4_THREADS - 1) / (8 * FP4_THREADS);
    for (long long item = blockIdx.x; item < (long long)M * chunks; item += gridDim.x) {
        const long long t = item / chunks;
        const int c = (int)(item % chunks) * 8 * FP4_THREADS + threadIdx.x * 8;
        if (c >= H) continue;
        if (no_combine) {
            for (int k = 0; k < K; ++k) {
                const int row = slot_of[t * K + k];
                const uint4 v = row < 0 ? make_uint4(0u, 0u, 0u, 0u) : *(const uint4*)(y + (long long)row * H + c);
                *(uint4*)(out + (t * K + k) * H + c) = v;
            }
            continue;
        }
        float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int k = 0; k < K; ++k) {
            const int row = slot_of[t * K + k];
            if (row < 0) continue;
            const float wk = w ? w[t * K + k] : 1.0f;
            const uint4 v = *(const uint4*)(y + (long long)row * H + c);
            const u32 q[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                s[2 * j] += wk * act_to_f32((u16)(q[j] & 0xffffu));
                s[2 * j + 1] += wk * act_to_f32((u16)(q[j] >> 16));
            }
        }
        uint4 o;
        u32* op = (u32*)&o;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            op[j] = (u32)f32_to_act(s[2 * j] * scale) | ((u32)f32_to_act(s[2 * j + 1] * scale) << 16);
        *(uint4*)(out + t * H + c) = o;
    }
}
