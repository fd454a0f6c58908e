// NVFP4 (w4a4) grouped GEMMs for Hopper, which has no FP4 tensor cores: the weights move
// through memory as E2M1 codes with E4M3 block scales and are expanded next to the tensor
// cores. An E2M1 value times an E4M3 scale has at most six significant bits and lies within
// [2^-10, 2688], so it is exact in f16: each 16-value block is expanded to f16 by byte permutes
// (a table of the eight magnitudes' high bytes, and the sign) and multiplied by its block
// scale, all exactly, and the products run on the f16 tensor cores (mma.sync m16n8k16) with f32
// accumulation. No partial sum is rescaled per block, which is what keeps the expansion cheap
// enough to hide under the weight stream. The activations are quantized to NVFP4 with each
// expert's global scale and kept as their exact values (code times block scale) in f16; the
// tensor's alpha = 1 / (gs_a * gs_w) is applied once at the end.
//
// Rows: expert e's rows start at row `base(e)` of the row space: e * cap in the masked layout,
// or row0[e] in the standard path's compact layout. Only the first counts[e] rows of an expert
// are read or written.
//
// Quantization (activations, and the intermediate after the activation) follows moe-quant's
// `quantize_nvfp4` step for step: sf = e4m3((gs * amax) / 6), s = decode(sf),
// q = e2m1((x * gs) / s), or 0 when s is 0; the value kept is e2m1(q) * s (the division by gs
// is part of alpha).
//
// Compile-time parameters: ACT and GATE_UP (the activation, as the row kernels), ACT_F16.

#define FP4_THREADS 128
#define BN 128
#define BK 64           // values per K step: four NVFP4 blocks
#define W_STRIDE 48     // bytes per weight row in shared memory: 32 of codes, padded against bank conflicts
#define A_STRIDE 72     // f16 values per activation row in shared memory: 64, padded likewise

// Byte offset of scale (m, k) in a swizzled [rows, k_sf] matrix with k_tiles = ceil(k_sf / 4).
__device__ __forceinline__ long long swz(long long m, int k, int k_tiles) {
    return (m >> 7) * (long long)(k_tiles * 512) + (k >> 2) * 512 + (m & 31) * 16 + ((m & 127) >> 5) * 4 + (k & 3);
}

__device__ __forceinline__ long long row_base(const int* row0, int cap, int e) {
    return row0 ? (long long)row0[e] : (long long)e * cap;
}

// One NVFP4 block of 16 values, written as their quantized values e2m1(q) * s in f16 (exact).
__device__ __forceinline__ void nvfp4_block(const float* v, float gs, u16* out) {
    float s;
    nvfp4_scale(v, gs, &s);
    u32 h[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        float q[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            // Exact: at most six significant bits.
            q[j] = s != 0.0f ? e2m1_value(nvfp4_code(v[2 * i + j], gs, s)) * s : 0.0f;
        }
        h[i] = (u32)f32_to_f16(q[0]) | ((u32)f32_to_f16(q[1]) << 16);
    }
    *(uint4*)out = make_uint4(h[0], h[1], h[2], h[3]);
    *(uint4*)(out + 8) = make_uint4(h[4], h[5], h[6], h[7]);
}

// Activations to NVFP4 values (f16) with the expert's global scale: thread per 16-value block.
// Row i of
// expert e reads x row src[base(e) + i] when `src` is given (the standard path's gather), else
// x row base(e) + i; times in_weight[that row] first when given (router weight on the input).
// Grid: (blocks striding over rows * K/16, E).
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_quant_rows(
    const u16* __restrict__ x, const int* __restrict__ src, const float* __restrict__ in_weight,
    const int* __restrict__ counts, const int* __restrict__ row0, int cap, int K,
    const float* __restrict__ gs_e, u16* __restrict__ a) {
    const int e = blockIdx.y, kb = K / 16;
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
        nvfp4_block(v, gs, a + (base + i) * K + b * 16);
    }
}

// Four E2M1 codes (bits 0..15, element j in nibble j) to two f16x2 (elements 0, 1 and 2, 3),
// exactly. An E2M1 value's f16 has a zero low byte: one byte permute looks the four high bytes
// up in a table of the eight magnitudes and two more interleave them with zeros (the integer
// pipe, which issues at half rate, is this loop's bottleneck, so the sign bits are moved by
// multiplications on the FMA pipe and merged with one logic operation per pair).
__device__ __forceinline__ void fp4x4_to_f16x2x2(u32 h, u32& lo, u32& hi) {
    const u32 top = __byte_perm(0x3E3C3800u, 0x46444240u, h & 0x7777u);
    const u32 s = h & 0x8888u;
    // Sign of element 0 (bit 3) to bit 15 and of element 1 (bit 7) to bit 31; 2 (bit 11) to
    // bit 15 and 3 (bit 15) to bit 31. The other products land on bits the masks drop.
    const u32 s01 = s * 0x01001000u, s23 = s * 0x00010010u;
    lo = __byte_perm(top, 0u, 0x1404);
    hi = __byte_perm(top, 0u, 0x3424);
    asm("lop3.b32 %0, %0, %1, 0x80008000, 0xF8;" : "+r"(lo) : "r"(s01));  // lo | (s01 & mask)
    asm("lop3.b32 %0, %0, %1, 0x80008000, 0xF8;" : "+r"(hi) : "r"(s23));
}

// Two E4M3 bytes (bits 0..15) to f16x2 (the low byte to the low half).
__device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 v) {
    u32 h;
    asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.rn.f16x2.e4m3x2 %0, t; }" : "=r"(h) : "r"(v));
    return h;
}

__device__ __forceinline__ u32 mul_f16x2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void mma_f16_16816(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int TBM>
struct Fp4Stage {
    u16 a[TBM * A_STRIDE];
    u8 w[BN * W_STRIDE];
    u32 sw[BN];  // the four block scales of each weight row in this K step
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
// activation dtype. A: NVFP4 values in f16 [rows, K]; W: [E, N, K/2] packed codes with block
// scales [E, swizzled(N, K/16)]. Grid: (ceil(N / BN), Y): block (x, y) computes columns
// x * BN.. of row tiles y, y + Y, ... below tile_start[E] (each tile's expert found in
// tile_start); four warps, each TBM rows by 32 columns of the tile. TBM = 16 for decode batches
// (a row tile of 64 would spend four times the tensor-core work on empty rows), 64 otherwise.
template <int TBM>
__device__ __forceinline__ void fp4_gemm_tile(
    const u16* __restrict__ A, const u8* __restrict__ W, const u8* __restrict__ W_sf,
    const int* __restrict__ counts, const int* __restrict__ row0, int cap, const int* __restrict__ tile_start,
    int E, const float* __restrict__ alpha, u16* __restrict__ C, int N, int K) {
    constexpr int MT = TBM / 16;  // m16 tiles per warp
    // Pipeline depth within the 48 KB of static shared memory.
    constexpr int STAGES = TBM == 16 ? 4 : 3;
    __shared__ __align__(16) Fp4Stage<TBM> st[STAGES];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const int kb_all = K / 16, k_tiles = (kb_all + 3) / 4, steps = (K + BK - 1) / BK;
    const int total = tile_start[E];
    for (int tile = blockIdx.y; tile < total; tile += gridDim.y) {
        int lo = 0, hi = E;  // the expert e with tile_start[e] <= tile < tile_start[e + 1]
        while (hi - lo > 1) {
            const int mid = (lo + hi) >> 1;
            if (tile_start[mid] <= tile) lo = mid; else hi = mid;
        }
        const int e = lo, m0 = (tile - tile_start[e]) * TBM, n0 = blockIdx.x * BN;
        const int rows = min(max(counts[e], 0), cap);
        const long long base = row_base(row0, cap, e);
        const u16* a_rows = A + base * K;
        const u8* w_rows = W + (long long)e * N * (K / 2);
        const u8* w_sf = W_sf + (long long)e * ((N + 127) / 128 * 128) * k_tiles * 4;

        auto load = [&](int slot, int step) {
            Fp4Stage<TBM>& s = st[slot];
            const int k0 = step * BK;
            // A: TBM rows of 64 f16 values, eight 16-byte chunks each.
#pragma unroll
            for (int q = 0; q < (TBM * 8 + FP4_THREADS - 1) / FP4_THREADS; ++q) {
                const int idx = tid + q * FP4_THREADS, r = idx >> 3, c = idx & 7;
                if (r < TBM) {
                    const bool ok = m0 + r < rows && k0 + c * 8 < K;
                    cp_async16(s.a + r * A_STRIDE + c * 8, ok ? a_rows + (long long)(m0 + r) * K + k0 + c * 8 : a_rows, ok ? 16 : 0);
                }
            }
            // W: BN rows of 32 bytes of codes, two chunks each (two per thread).
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int idx = tid + q * FP4_THREADS, r = idx >> 1, c = idx & 1;
                const bool ok = n0 + r < N && k0 + c * 32 < K;
                cp_async16(s.w + r * W_STRIDE + c * 16, ok ? w_rows + (long long)(n0 + r) * (K / 2) + k0 / 2 + c * 16 : w_rows, ok ? 16 : 0);
            }
            // Weight scales: four contiguous bytes per row (one swizzle k-tile).
            const bool ok = n0 + tid < N;
            cp_async4(&s.sw[tid], ok ? w_sf + swz(n0 + tid, step * 4, k_tiles) : w_sf, ok ? 4 : 0);
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
            // This thread's weight rows (n = g of each 8-column tile) and their scales as f16x2
            // pairs: {s0, s1} and {s2, s3} for the four blocks of the step.
            u32 sc[4][2];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const u32 v = s.sw[warp * 32 + j * 8 + g];
                sc[j][0] = e4m3x2_to_f16x2(v & 0xffffu);
                sc[j][1] = e4m3x2_to_f16x2(v >> 16);
            }
#pragma unroll
            for (int kb = 0; kb < 4; ++kb) {
                // The MMA sums over k in any order, so both operands take the block's k in the
                // order that makes each thread's four values contiguous: its fragment positions
                // 2tig, 2tig+1, 2tig+8, 2tig+9 hold k = 4tig .. 4tig+3 (two bytes of codes, and
                // one 8-byte load of activations per row).
                u32 b[4][2];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const u32 codes = *(const u16*)(s.w + (warp * 32 + j * 8 + g) * W_STRIDE + kb * 8 + 2 * tig);
                    u32 lo, hi;
                    fp4x4_to_f16x2x2(codes, lo, hi);
                    const u32 pair = sc[j][kb >> 1];
                    const u32 s2 = __byte_perm(pair, 0, (kb & 1) ? 0x3232 : 0x1010);  // {s, s}
                    b[j][0] = mul_f16x2(lo, s2);
                    b[j][1] = mul_f16x2(hi, s2);
                }
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    const u16* ar = s.a + (i * 16 + g) * A_STRIDE + kb * 16 + 4 * tig;
                    const uint2 r0 = *(const uint2*)ar, r8 = *(const uint2*)(ar + 8 * A_STRIDE);
                    const u32 a[4] = {r0.x, r8.x, r0.y, r8.y};
#pragma unroll
                    for (int j = 0; j < 4; ++j) mma_f16_16816(acc[i][j], a, b[j][0], b[j][1]);
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

#define FP4_GEMM_ARGS                                                                                        \
    const u16 *__restrict__ A, const u8 *__restrict__ W, const u8 *__restrict__ W_sf,                        \
        const int *__restrict__ counts, const int *__restrict__ row0, int cap, const int *__restrict__ tile_start, \
        int E, const float *__restrict__ alpha, u16 *__restrict__ C, int N, int K
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_gemm_m16(FP4_GEMM_ARGS) {
    fp4_gemm_tile<16>(A, W, W_sf, counts, row0, cap, tile_start, E, alpha, C, N, K);
}
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_gemm_m64(FP4_GEMM_ARGS) {
    fp4_gemm_tile<64>(A, W, W_sf, counts, row0, cap, tile_start, E, alpha, C, N, K);
}

// NVFP4 rows as the low-latency dispatch delivers them (codes [rows, K/2], E4M3 scales
// [rows, K/16] row-major, over the weights' input global scale) to GEMM 1's f16 values (code
// times block scale, exact). Grid as fp4_quant_rows.
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_expand_rows(
    const u8* __restrict__ codes, const u8* __restrict__ scales, const int* __restrict__ counts,
    const int* __restrict__ row0, int cap, int K, u16* __restrict__ a) {
    const int e = blockIdx.y, kb = K / 16;
    const int n = min(max(counts[e], 0), cap);
    const long long base = row_base(row0, cap, e);
    for (long long item = (long long)blockIdx.x * FP4_THREADS + threadIdx.x; item < (long long)n * kb;
         item += (long long)gridDim.x * FP4_THREADS) {
        const long long row = base + item / kb;
        const int b = (int)(item % kb);
        const uint2 p = *(const uint2*)(codes + row * (K / 2) + b * 8);
        const float s = e4m3_to_f32(scales[row * kb + b]);
        u32 h[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const u32 w = i < 4 ? p.x : p.y, sh = 8 * (i & 3);
            const float lo = e2m1_value((w >> sh) & 0xFu) * s, hi = e2m1_value((w >> (sh + 4)) & 0xFu) * s;
            h[i] = (u32)f32_to_f16(lo) | ((u32)f32_to_f16(hi) << 16);
        }
        u16* out = a + row * K + b * 16;
        *(uint4*)out = make_uint4(h[0], h[1], h[2], h[3]);
        *(uint4*)(out + 8) = make_uint4(h[4], h[5], h[6], h[7]);
    }
}

// GEMM 1's output rows through the activation, quantized to NVFP4 values (f16) with the
// expert's GEMM-2 global scale: thread per 16-value output block. Grid: (blocks striding over rows * I/16, E).
extern "C" __global__ void __launch_bounds__(FP4_THREADS) fp4_act_quant(
    const u16* __restrict__ c1, const int* __restrict__ counts, const int* __restrict__ row0, int cap,
    int inter, float limit, float alpha_act, const float* __restrict__ gs_e, u16* __restrict__ a) {
    const int e = blockIdx.y, kb = inter / 16;
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
        nvfp4_block(v, gs, a + (base + i) * inter + b * 16);
    }
}

// The standard path's pre-permute, in one block: counts per local expert (ids outside 0..E are
// not computed here), their starts, and for each (token, pick) its row: src[row] = token,
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
            acc += cnt[e];
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
