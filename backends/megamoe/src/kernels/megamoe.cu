// MegaMoE: a whole expert-parallel MoE layer in one persistent, cooperative launch.
//
// Phases, each ended by a grid barrier (and, where other ranks read or write, by flags in the
// symmetric buffers):
//   0. pre-dispatch: this rank's tokens quantized per 32 values (E2M1 or E4M3, UE8M0 scale) and
//      its top-k copied into its own symmetric buffer; rows past num_tokens get id -1, weight 0;
//      then every rank is told "ready" and every rank's "ready" is awaited;
//   1. dispatch: every (source rank, token, k) entry whose expert lives here is pulled over peer
//      memory into this rank's gathered rows, in the operand layout the GEMM reads;
//   2. GEMM 1 with the activation, the router weight and requantization (an MX block of GEMM 2's
//      input is exactly one work item's 32 columns);
//   3. GEMM 2, written straight into the source rank's combine slots; then "done" to every rank;
//   4. the top-k sum of this rank's tokens once every rank is done.
// Defines: FP4_ACTS (E2M1 activations, else E4M3), MXF4 (FP4 activations kept as FP4 and widened
// in registers next to the MMA), ACT (activation.cuh).
//
// Products run on the FP8 tensor cores (mma.m16n8k32.e4m3). An E2M1 nibble s|e1 e0 m placed as
// the E4M3 byte s|0 0 e1 e0 m|0 0 is the E2M1 value times 2^-6 (subnormal 0.5 included), so
// widening is a shift and a mask and the 2^6 goes into the final scale. Each k32 step is one
// scale block of both operands: its product is added with the two power-of-two scales.

#define KGROUP 128      // k values per load group (four k32 steps)
#define ITEM_ROWS 16    // rows of one work item (one m16 tile: decode batches; more rows, more items)
#define ITEM_COLS 64    // B rows (output columns) of one work item (eight n8 tiles)
#define WARPS 8
// Each FP4 operand is widened to E4M3 as its value times 2^-6.
#if FP4_ACTS
#define WIDEN_FACTOR 4096.0f
#else
#define WIDEN_FACTOR 64.0f
#endif
#define THREADS (WARPS * 32)

struct MegaParams {
    const u16* hidden;    // [m, H] bf16, this rank's tokens
    const int* topk_ids;  // [m, kin] global expert ids
    const float* topk_w;  // [m, kin]
    const u64* peers;     // [ranks] every rank's symmetric buffer, as this rank addresses it
    u8* sym;              // this rank's symmetric buffer
    u16* out;             // [m, H] bf16
    const u8* w13;        // kernel layout (megamoe_pack_weights)
    const u8* w13s;
    const u8* w2;
    const u8* w2s;
    int* error;           // bit 0: a peer did not answer in time, bit 1: an expert id out of range
    u64 off_ctrl, off_counts, off_x, off_xs, off_ids, off_w, off_y, off_list, off_xg, off_xgs,
        off_wg, off_h, off_hs;
    long long timeout_cycles;
    int rank, ranks, m, kin, tmax, k, hidden_size, inter, local_experts, num_experts;
    float limit, alpha, scale;  // activation limit and alpha; routed scaling factor
};

// Control words: [0] epoch, [1] barrier count, [2] barrier generation, [CTRL_READY + r] ready from
// rank r, [CTRL_DONE + r] done from rank r.
#define CTRL_READY 16
#define CTRL_DONE (16 + 1024)

__device__ __forceinline__ u32 ld_acquire_gpu(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ u32 ld_acquire_sys(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void st_release_gpu(u32* p, u32 v) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_release_sys(u32* p, u32 v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// Streamed weights: read once, kept out of L1.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ u64 ld_stream8(const void* p) {
    u64 v;
    asm volatile("ld.global.nc.L1::no_allocate.u64 %0, [%1];" : "=l"(v) : "l"(p));
    return v;
}

// Starts pulling `bytes` (a multiple of 16) at `p` into L2, in the background.
__device__ __forceinline__ void prefetch_l2(const void* p, u32 bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}

// Sense-reversing grid barrier (the launch is cooperative, so every block is resident).
__device__ void grid_sync(u32* ctrl) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const u32 gen = ld_acquire_gpu(ctrl + 2);
        __threadfence();
        if (atomicAdd(ctrl + 1, 1u) == gridDim.x - 1) {
            atomicExch(ctrl + 1, 0u);
            __threadfence();
            st_release_gpu(ctrl + 2, gen + 1);
        } else {
            while (ld_acquire_gpu(ctrl + 2) == gen) {
            }
        }
    }
    __syncthreads();
}

// Waits until every rank has written `epoch` (or later) into flags[0..ranks).
__device__ void await_ranks(const MegaParams& p, const u32* flags, u32 epoch) {
    if (threadIdx.x == 0) {
        const long long start = clock64();
        for (int r = 0; r < p.ranks; ++r) {
            while ((int)(ld_acquire_sys(flags + r) - epoch) < 0) {
                if (clock64() - start > p.timeout_cycles) {
                    atomicOr(p.error, 1);
                    break;
                }
            }
        }
    }
    __syncthreads();
}

// Writes `epoch` into slot `rank` of flags at `off` in every rank's buffer (after this rank's
// writes to them, which the grid barrier before this call completed).
__device__ void tell_ranks(const MegaParams& p, u64 off, u32 epoch) {
    if (blockIdx.x == 0 && threadIdx.x < p.ranks) {
        __threadfence_system();
        u32* f = (u32*)(p.peers[threadIdx.x] + off) + p.rank;
        st_release_sys(f, epoch);
    }
}

__device__ __forceinline__ u32 ue8m0_ceil(float s) {
    const u32 b = __float_as_uint(s);
    const u32 e = (b >> 23) & 0xffu;
    if (isnan(s)) return 255u;
    if (s <= 0.0f) return 0u;
    const u32 c = e + ((b & 0x7fffffu) != 0u);
    return c > 254u ? 254u : c;
}
__device__ __forceinline__ float ue8m0_value(u32 b) { return __uint_as_float(b << 23); }

// One activation value quantized with its block's scale value s: an E2M1 code (FP4) or an E4M3
// byte (FP8).
__device__ __forceinline__ u32 quant_value(float v, float s) {
#if FP4_ACTS
    return e2m1_code(__fdiv_rn(v, s));
#else
    return f32_to_e4m3(__fdiv_rn(v, s));
#endif
}
#if FP4_ACTS
#define ACT_MAX 6.0f
#else
#define ACT_MAX 448.0f
#endif
__device__ __forceinline__ u32 e2m1_to_e4m3_scaled(u32 c) { return ((c & 7u) << 2) | ((c & 8u) << 4); }

// The operand layout of a K-wide row (gathered activations, GEMM 2's input), so that lane t of an
// mma quad reads its A fragments of four k32 steps with contiguous loads. Per group of four k32
// blocks (b = 4 kg + s), per lane t:
//   E4M3: 32 bytes, step s at 8 s: k 4t..4t+3 of block b, then k 16+4t..16+4t+3;
//   FP4 (MXF4): 16 bytes, step s at 4 s: byte i holds k 4t+i (low nibble), k 16+4t+i (high).
__device__ __forceinline__ long long e4_off(int b, int c) {
    return (long long)(b >> 2) * 128 + ((c & 15) >> 2) * 32 + (b & 3) * 8 + (c >> 4) * 4 + (c & 3);
}
__device__ __forceinline__ long long f4_off(int b, int c) {
    return (long long)(b >> 2) * 64 + (c >> 2) * 16 + (b & 3) * 4 + (c & 3);
}

// ------------------------------------------------------------------ phase 0: pre-dispatch
__device__ void pre_dispatch(const MegaParams& p) {
    const int H = p.hidden_size, blocks = H / 32;
    const int xrow = FP4_ACTS ? H / 2 : H;
    u8* x = p.sym + p.off_x;
    u8* xs = p.sym + p.off_xs;
    const long long total = (long long)p.m * blocks;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int t = (int)(i / blocks), b = (int)(i % blocks);
        const uint4* src = (const uint4*)(p.hidden + (long long)t * H + b * 32);
        float v[32];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const uint4 w = src[q];
            const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                v[q * 8 + 2 * j] = bf16_to_f32((u16)(ws[j] & 0xffffu));
                v[q * 8 + 2 * j + 1] = bf16_to_f32((u16)(ws[j] >> 16));
            }
        }
        float amax = 0.0f;
#pragma unroll
        for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(v[j]));
        const u32 sb = ue8m0_ceil(__fdiv_rn(fmaxf(amax, 1e-4f), ACT_MAX));
        const float s = ue8m0_value(sb);
        xs[(long long)t * blocks + b] = (u8)sb;
#if FP4_ACTS
        u32 packed[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            u32 w = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) w |= quant_value(v[q * 8 + j], s) << (4 * j);
            packed[q] = w;
        }
        *(uint4*)(x + (long long)t * xrow + b * 16) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
#else
        u32 packed[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) {
            u32 w = 0;
#pragma unroll
            for (int j = 0; j < 4; ++j) w |= quant_value(v[q * 4 + j], s) << (8 * j);
            packed[q] = w;
        }
        uint4* dst = (uint4*)(x + (long long)t * xrow + b * 32);
        dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
#endif
    }
    int* ids = (int*)(p.sym + p.off_ids);
    float* w = (float*)(p.sym + p.off_w);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < p.tmax * p.k; i += gridDim.x * blockDim.x) {
        const int t = i / p.k, kk = i % p.k;
        const bool real = t < p.m && kk < p.kin;
        ids[i] = real ? p.topk_ids[t * p.kin + kk] : -1;
        w[i] = real ? p.topk_w[t * p.kin + kk] : 0.0f;
    }
}

// Kernel entry for the pre-dispatch alone (its layout is checked against the CPU's).
extern "C" __global__ void __launch_bounds__(THREADS) megamoe_pre_dispatch(MegaParams p) { pre_dispatch(p); }

// ------------------------------------------------------------------ phase 1: dispatch
// Block b (32 values) of a source row (DESIGN layout) into the operand layout of row `dst`.
__device__ __forceinline__ void gather_block(const u8* src, u8* dst, int b) {
#if FP4_ACTS
    const uint4 w = __ldcg((const uint4*)src);
    const u32 n[4] = {w.x, w.y, w.z, w.w};  // nibble k at bits 4*(k%8) of word k/8
#define NIB(k) ((n[(k) >> 3] >> (4 * ((k) & 7))) & 15u)
#if MXF4
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        u32 v = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) v |= (NIB(4 * t + j) | (NIB(16 + 4 * t + j) << 4)) << (8 * j);
        *(u32*)(dst + f4_off(b, 4 * t)) = v;
    }
#else
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        u32 lo = 0, hi = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            lo |= e2m1_to_e4m3_scaled(NIB(4 * t + j)) << (8 * j);
            hi |= e2m1_to_e4m3_scaled(NIB(16 + 4 * t + j)) << (8 * j);
        }
        *(uint2*)(dst + e4_off(b, 4 * t)) = make_uint2(lo, hi);
    }
#endif
#undef NIB
#else
    const uint4 lo = __ldcg((const uint4*)src), hi = __ldcg((const uint4*)src + 1);
    // words k/4: lo = k0..15, hi = k16..31; lane t takes words t and 4 + t.
    *(uint2*)(dst + e4_off(b, 0)) = make_uint2(lo.x, hi.x);
    *(uint2*)(dst + e4_off(b, 4)) = make_uint2(lo.y, hi.y);
    *(uint2*)(dst + e4_off(b, 8)) = make_uint2(lo.z, hi.z);
    *(uint2*)(dst + e4_off(b, 12)) = make_uint2(lo.w, hi.w);
#endif
}

#if MXF4
#define XG_ROW(K) ((K) / 2)
#else
#define XG_ROW(K) (K)
#endif

__device__ void dispatch(const MegaParams& p) {
    const int H = p.hidden_size, blocks = H / 32, xrow = FP4_ACTS ? H / 2 : H;
    const int first = p.rank * p.local_experts, cap = p.ranks * p.tmax * p.k;
    u32* counts = (u32*)(p.sym + p.off_counts);
    int* list = (int*)(p.sym + p.off_list);
    u8* xg = p.sym + p.off_xg;
    u8* xgs = p.sym + p.off_xgs;
    float* wg = (float*)(p.sym + p.off_wg);
    const int lane = threadIdx.x & 31;
    const int warps = gridDim.x * WARPS;
    for (int entry = blockIdx.x * WARPS + (threadIdx.x >> 5); entry < cap; entry += warps) {
        const int src = entry / (p.tmax * p.k), tk = entry % (p.tmax * p.k);
        const u8* base = (const u8*)p.peers[src];
        const int id = __ldcg((const int*)(base + p.off_ids) + tk);
        if (id < 0) continue;
        if (id >= p.num_experts) {
            if (lane == 0) atomicOr(p.error, 2);
            continue;
        }
        if (id < first || id >= first + p.local_experts) continue;
        const int e = id - first;
        if (lane == 0) {
            const u32 slot = atomicAdd(counts + e, 1u);
            list[(long long)e * cap + slot] = entry;
            wg[entry] = __ldcg((const float*)(base + p.off_w) + tk);
        }
        const int t = tk / p.k;
        const u8* row = base + p.off_x + (long long)t * xrow;
        const u8* srow = base + p.off_xs + (long long)t * blocks;
        u8* dst = xg + (long long)entry * XG_ROW(H);
        for (int b = lane; b < blocks; b += 32) {
            gather_block(row + b * (FP4_ACTS ? 16 : 32), dst, b);
            xgs[(long long)entry * blocks + b] = __ldcg(srow + b);
        }
    }
}

// ------------------------------------------------------------------ GEMM work items
__device__ __forceinline__ void mma_e4m3(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
}
// The E4M3 bytes (times 2^-6) of the four low nibbles, and of the four high nibbles, of w.
__device__ __forceinline__ u32 widen_lo(u32 w) { return ((w << 2) & 0x1c1c1c1cu) | ((w << 4) & 0x80808080u); }
__device__ __forceinline__ u32 widen_hi(u32 w) { return ((w >> 2) & 0x1c1c1c1cu) | (w & 0x80808080u); }

// Rows of one work item: entries from the expert's list (clamped to its last row past the count,
// those results are dropped).
struct ItemRows {
    const int* entries;
    int rows;
};

// One k group (four k32 steps) of a warp's operands: the B words and scale pairs of the eight
// tiles, and the A words and scales of its two rows (g and g + 8).
struct Group {
    uint4 b[8];
    u64 bs[8];
#if MXF4
    uint4 a[2][1];
#else
    uint4 a[2][2];
#endif
    u32 sa[2];
};

__device__ __forceinline__ void load_group(Group& f, const u8* a, const u8* as, long long arow,
                                           const long long* rowoff, const u8* wt, const u8* ws, int kb, int kg) {
    const int lane = threadIdx.x & 31, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        f.b[j] = ld_stream16(wt + ((long long)kg * 8 + j) * 512 + lane * 16);
        f.bs[j] = ld_stream8(ws + ((long long)kg * 8 + j) * 32 + t * 8);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const u8* row = a + rowoff[h] * arow;
#if MXF4
        f.a[h][0] = __ldcg((const uint4*)(row + f4_off(kg * 4, 4 * t)));
#else
        const uint4* rp = (const uint4*)(row + e4_off(kg * 4, 4 * t));
        f.a[h][0] = __ldcg(rp);
        f.a[h][1] = __ldcg(rp + 1);
#endif
        f.sa[h] = __ldcg((const u32*)(as + rowoff[h] * kb + kg * 4));
    }
}

__device__ __forceinline__ void mma_group(const Group& f, float (*acc)[4]) {
    u32 af[2][4][2];  // [row half][k step][lo, hi word]
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#if MXF4
        const u32 w[4] = {f.a[h][0].x, f.a[h][0].y, f.a[h][0].z, f.a[h][0].w};
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            af[h][s][0] = widen_lo(w[s]);
            af[h][s][1] = widen_hi(w[s]);
        }
#else
        const uint4 v0 = f.a[h][0], v1 = f.a[h][1];
        af[h][0][0] = v0.x; af[h][0][1] = v0.y; af[h][1][0] = v0.z; af[h][1][1] = v0.w;
        af[h][2][0] = v1.x; af[h][2][1] = v1.y; af[h][3][0] = v1.z; af[h][3][1] = v1.w;
#endif
    }
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const float sg = ue8m0_value((f.sa[0] >> (8 * s)) & 0xffu);
        const float sg8 = ue8m0_value((f.sa[1] >> (8 * s)) & 0xffu);
        const u32 afr[4] = {af[0][s][0], af[1][s][0], af[0][s][1], af[1][s][1]};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const u32 bw = s == 0 ? f.b[j].x : s == 1 ? f.b[j].y : s == 2 ? f.b[j].z : f.b[j].w;
            float d[4];
            mma_e4m3(d, afr, widen_lo(bw), widen_hi(bw));
            const u32 sc = (u32)(f.bs[j] >> (16 * s));
            const float s0 = ue8m0_value(sc & 0xffu), s1 = ue8m0_value((sc >> 8) & 0xffu);
            acc[j][0] = fmaf(d[0], sg * s0, acc[j][0]);
            acc[j][1] = fmaf(d[1], sg * s1, acc[j][1]);
            acc[j][2] = fmaf(d[2], sg8 * s0, acc[j][2]);
            acc[j][3] = fmaf(d[3], sg8 * s1, acc[j][3]);
        }
    }
}

// One work item's partial sums over this warp's share of K: one m16 tile by eight n8 tiles.
// A rows in the operand layout (`arow` bytes per row, scales `K/32` bytes per row), B in the
// packed weight layout at `wt` (item base) and `ws`; the item was prefetched into L2.
__device__ void item_mma(const u8* a, const u8* as, long long arow, const ItemRows& ir, const u8* wt,
                         const u8* ws, int K, float (*acc)[4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2;
    const int KG = K / KGROUP, kb = K / 32;
    const int kg0 = warp * KG / WARPS, kg1 = (warp + 1) * KG / WARPS;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[j][q] = 0.0f;
    long long rowoff[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) rowoff[h] = (long long)__ldcg(ir.entries + min(h * 8 + g, ir.rows - 1));
    for (int kg = kg0; kg < kg1; ++kg) {
        Group cur;
        load_group(cur, a, as, arow, rowoff, wt, ws, kb, kg);
        mma_group(cur, acc);
    }
}

// Writes this warp's partial sums into red[warp][row][col] (ITEM_ROWS x ITEM_COLS per warp).
__device__ void stash(float* red, float (*acc)[4]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float* w = red + warp * ITEM_ROWS * ITEM_COLS;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int c = j * 8 + 2 * t;
        *(float2*)(w + g * ITEM_COLS + c) = make_float2(acc[j][0], acc[j][1]);
        *(float2*)(w + (g + 8) * ITEM_COLS + c) = make_float2(acc[j][2], acc[j][3]);
    }
}

__device__ __forceinline__ float reduced(const float* red, int r, int c) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += red[(w * ITEM_ROWS + r) * ITEM_COLS + c];
    return v;
}

// Per-expert item counts into smem: pref[e] = first item of expert e, pref[E] = total.
__device__ void item_prefix(const MegaParams& p, int* pref, int tiles) {
    const u32* counts = (const u32*)(p.sym + p.off_counts);
    if (threadIdx.x < 32) {
        int carry = 0;
        for (int base = 0; base < p.local_experts; base += 32) {
            const int e = base + threadIdx.x;
            const int n = e < p.local_experts ? (int)((__ldcg(counts + e) + ITEM_ROWS - 1) / ITEM_ROWS) * tiles : 0;
            int x = n;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, x, o);
                if (threadIdx.x >= o) x += y;
            }
            if (e < p.local_experts) pref[e] = carry + x - n;
            carry += __shfl_sync(0xffffffffu, x, 31);
        }
        if (threadIdx.x == 0) pref[p.local_experts] = carry;
    }
    __syncthreads();
}

__device__ __forceinline__ int find_expert(const int* pref, int E, int item) {
    int lo = 0, hi = E;  // pref[lo] <= item < pref[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (pref[mid] <= item) lo = mid; else hi = mid;
    }
    return lo;
}

// Starts pulling work item `item`'s weights and scales into L2 (one thread), so HBM keeps
// streaming through each item's reduction and epilogue and the warps' loads find L2.
__device__ void prefetch_item(const int* pref, int E, int item, int tiles, const u8* w, const u8* ws,
                              long long wstride, long long sstride) {
    if (item >= pref[E]) return;
    const int e = find_expert(pref, E, item);
    const long long wi = (long long)e * tiles + (item - pref[e]) % tiles;
    const u8* base = w + wi * wstride;
    for (long long off = 0; off < wstride; off += 65536)
        prefetch_l2(base + off, (u32)min(65536LL, wstride - off));
    prefetch_l2(ws + wi * sstride, (u32)sstride);
}

// GEMM 1 (w13), the activation, the router weight and requantization of GEMM 2's input. Ends
// with GEMM 2's item prefix in `pref2` and this block's first GEMM 2 item on its way to L2.
__device__ void gemm1(const MegaParams& p, float* red, int* pref, int* pref2) {
    const int H = p.hidden_size, I = p.inter, tiles = I / 32, cap = p.ranks * p.tmax * p.k;
    item_prefix(p, pref, tiles);
    const u32* counts = (const u32*)(p.sym + p.off_counts);
    const int* list = (const int*)(p.sym + p.off_list);
    const float* wg = (const float*)(p.sym + p.off_wg);
    u8* h = p.sym + p.off_h;
    u8* hs = p.sym + p.off_hs;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long wstride = (long long)(H / KGROUP) * 8 * 512, sstride = (long long)(H / KGROUP) * 8 * 32;
    if (threadIdx.x == 0) prefetch_item(pref, p.local_experts, blockIdx.x, tiles, p.w13, p.w13s, wstride, sstride);
    for (int item = blockIdx.x; item < pref[p.local_experts]; item += gridDim.x) {
        if (threadIdx.x == 0)
            prefetch_item(pref, p.local_experts, item + gridDim.x, tiles, p.w13, p.w13s, wstride, sstride);
        const int e = find_expert(pref, p.local_experts, item);
        const int local = item - pref[e], chunk = local / tiles, nt = local % tiles;
        const int cnt = (int)__ldcg(counts + e);
        ItemRows ir{list + (long long)e * cap + chunk * ITEM_ROWS, min(ITEM_ROWS, cnt - chunk * ITEM_ROWS)};
        const long long wi = (long long)e * tiles + nt;
        float acc[8][4];
        item_mma(p.sym + p.off_xg, p.sym + p.off_xgs, XG_ROW(H), ir, p.w13 + wi * wstride, p.w13s + wi * sstride, H, acc);
        stash(red, acc);
        __syncthreads();
        // Warp w: rows w, w + 8, ...; lane: column nt * 32 + lane of the intermediate.
        for (int r = warp; r < ir.rows; r += WARPS) {
            const int entry = __ldcg(ir.entries + r);
            const float gate = reduced(red, r, lane) * WIDEN_FACTOR;
            const float up = reduced(red, r, 32 + lane) * WIDEN_FACTOR;
            const float v = activation(gate, up, p.limit, p.alpha) * __ldcg(wg + entry);
            const float amax = warp_max(fabsf(v));
            const u32 sb = ue8m0_ceil(__fdiv_rn(fmaxf(amax, 1e-4f), ACT_MAX));
            const u32 q = quant_value(v, ue8m0_value(sb));
            u8* row = h + (long long)entry * XG_ROW(I);
#if MXF4
            const u32 other = __shfl_down_sync(0xffffffffu, q, 16);
            if (lane < 16) row[f4_off(nt, lane)] = (u8)(q | (other << 4));
#elif FP4_ACTS
            row[e4_off(nt, lane)] = (u8)e2m1_to_e4m3_scaled(q);
#else
            row[e4_off(nt, lane)] = (u8)q;
#endif
            if (lane == 0) hs[(long long)entry * tiles + nt] = (u8)sb;
        }
        __syncthreads();
    }
    const int tiles2 = H / ITEM_COLS;
    item_prefix(p, pref2, tiles2);
    if (threadIdx.x == 0)
        prefetch_item(pref2, p.local_experts, blockIdx.x, tiles2, p.w2, p.w2s, (long long)(I / KGROUP) * 8 * 512,
                      (long long)(I / KGROUP) * 8 * 32);
}

// GEMM 2 (w2) into the source ranks' combine slots `y [T, k, H]` bf16 (`pref` from gemm1).
__device__ void gemm2(const MegaParams& p, float* red, const int* pref) {
    const int H = p.hidden_size, I = p.inter, tiles = H / ITEM_COLS, cap = p.ranks * p.tmax * p.k;
    const u32* counts = (const u32*)(p.sym + p.off_counts);
    const int* list = (const int*)(p.sym + p.off_list);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long wstride = (long long)(I / KGROUP) * 8 * 512, sstride = (long long)(I / KGROUP) * 8 * 32;
    for (int item = blockIdx.x; item < pref[p.local_experts]; item += gridDim.x) {
        if (threadIdx.x == 0)
            prefetch_item(pref, p.local_experts, item + gridDim.x, tiles, p.w2, p.w2s, wstride, sstride);
        const int e = find_expert(pref, p.local_experts, item);
        const int local = item - pref[e], chunk = local / tiles, nt = local % tiles;
        const int cnt = (int)__ldcg(counts + e);
        ItemRows ir{list + (long long)e * cap + chunk * ITEM_ROWS, min(ITEM_ROWS, cnt - chunk * ITEM_ROWS)};
        const long long wi = (long long)e * tiles + nt;
        float acc[8][4];
        item_mma(p.sym + p.off_h, p.sym + p.off_hs, XG_ROW(I), ir, p.w2 + wi * wstride, p.w2s + wi * sstride, I, acc);
        stash(red, acc);
        __syncthreads();
        for (int r = warp; r < ir.rows; r += WARPS) {
            const int entry = __ldcg(ir.entries + r);
            const int src = entry / (p.tmax * p.k), tk = entry % (p.tmax * p.k);
            const float v0 = reduced(red, r, 2 * lane) * WIDEN_FACTOR;
            const float v1 = reduced(red, r, 2 * lane + 1) * WIDEN_FACTOR;
            u16* y = (u16*)(p.peers[src] + p.off_y) + (long long)tk * H + nt * ITEM_COLS + 2 * lane;
            *(u32*)y = (u32)f32_to_bf16(v0) | ((u32)f32_to_bf16(v1) << 16);
        }
        __syncthreads();
    }
}

// ------------------------------------------------------------------ phase 4: top-k sum
__device__ void combine(const MegaParams& p) {
    const int H = p.hidden_size, chunks = H / 8;
    const int* ids = (const int*)(p.sym + p.off_ids);
    const u16* y = (const u16*)(p.sym + p.off_y);
    const long long total = (long long)p.m * chunks;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int t = (int)(i / chunks), c = (int)(i % chunks) * 8;
        float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int kk = 0; kk < p.k; ++kk) {
            if (__ldcg(ids + t * p.k + kk) < 0) continue;
            const uint4 v = __ldcg((const uint4*)(y + ((long long)t * p.k + kk) * H + c));
            const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                s[2 * j] += bf16_to_f32((u16)(w[j] & 0xffffu));
                s[2 * j + 1] += bf16_to_f32((u16)(w[j] >> 16));
            }
        }
        u32 o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
            o[j] = (u32)f32_to_bf16(s[2 * j] * p.scale) | ((u32)f32_to_bf16(s[2 * j + 1] * p.scale) << 16);
        *(uint4*)(p.out + (long long)t * H + c) = make_uint4(o[0], o[1], o[2], o[3]);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS) megamoe_fused(MegaParams p) {
    extern __shared__ float4 smem4[];
    float* red = (float*)smem4;
    int* pref = (int*)(red + WARPS * ITEM_ROWS * ITEM_COLS);
    int* pref2 = pref + p.local_experts + 1;
    u32* ctrl = (u32*)(p.sym + p.off_ctrl);
    const u32 epoch = ld_acquire_gpu(ctrl) + 1;

    pre_dispatch(p);
    grid_sync(ctrl);
    tell_ranks(p, p.off_ctrl + CTRL_READY * 4, epoch);
    await_ranks(p, ctrl + CTRL_READY, epoch);

    dispatch(p);
    grid_sync(ctrl);
    gemm1(p, red, pref, pref2);
    grid_sync(ctrl);
    gemm2(p, red, pref2);
    grid_sync(ctrl);
    tell_ranks(p, p.off_ctrl + CTRL_DONE * 4, epoch);
    await_ranks(p, ctrl + CTRL_DONE, epoch);
    // Every block has read the epoch and finished with the counts: reset them for the next call.
    if (blockIdx.x == 0) {
        u32* counts = (u32*)(p.sym + p.off_counts);
        for (int e = threadIdx.x; e < p.local_experts; e += blockDim.x) counts[e] = 0;
        if (threadIdx.x == 0) st_release_gpu(ctrl, epoch);
    }
    combine(p);
}

// ------------------------------------------------------------------ weights, once at load
// Standard MXFP4 `w [E, N, K/2]` (element 2i in the low nibble), scales `[E, N, K/32]`, to the
// layout item_mma streams: per expert, per item of ITEM_COLS B rows, per KGROUP of k, per n8 tile
// j, per lane (g = lane / 4 the tile's column, t = lane % 4) 16 bytes = four k32 steps s, each a
// word whose byte i holds k 4t+i (low nibble) and k 16+4t+i (high nibble); scales per
// (item, kgroup, tile, t) 8 bytes = four steps of (column 2t, column 2t+1).
// GEMM 1 items take gate columns [32 nt, 32 nt + 32) as tiles 0..3 and the same up columns as
// tiles 4..7 (GATE_UP: 0 gate then up, 1 up then gate, 2 interleaved).
__device__ __forceinline__ long long b_row(int gemm1, int N, int nt, int j, int col) {
    if (!gemm1) return (long long)nt * ITEM_COLS + j * 8 + col;
    const int c = nt * 32 + (j & 3) * 8 + col;
    const bool up = j >= 4;
#if GATE_UP == 0
    return up ? N / 2 + c : c;
#elif GATE_UP == 1
    return up ? c : N / 2 + c;
#else
    return 2 * c + (up ? 1 : 0);
#endif
}

extern "C" __global__ void megamoe_pack_weights(const u8* w, const u8* s, u8* wk, u8* sk, int E, int N, int K,
                                                int gemm1) {
    const int tiles = gemm1 ? N / 64 : N / ITEM_COLS, KG = K / KGROUP;
    const long long words = (long long)E * tiles * KG * 8 * 32 * 4;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < words;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i;
        const int st = (int)(r % 4); r /= 4;
        const int lane = (int)(r % 32); r /= 32;
        const int j = (int)(r % 8); r /= 8;
        const int kg = (int)(r % KG); r /= KG;
        const int nt = (int)(r % tiles);
        const int e = (int)(r / tiles);
        const int g = lane >> 2, t = lane & 3;
        const long long row = (long long)e * N + b_row(gemm1, N, nt, j, g);
        const int k0 = (kg * 4 + st) * 32;
        const u8* wr = w + row * (K / 2);
        u32 word = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const int klo = k0 + 4 * t + b, khi = klo + 16;
            const u32 lo = (wr[klo >> 1] >> (4 * (klo & 1))) & 15u;
            const u32 hi = (wr[khi >> 1] >> (4 * (khi & 1))) & 15u;
            word |= (lo | (hi << 4)) << (8 * b);
        }
        *(u32*)(wk + i * 4) = word;
        if (g == 0) {
            // Lanes of column 0 write the scale pairs of their t: columns 2t, 2t + 1.
            const long long base = (((long long)(e * tiles + nt) * KG + kg) * 8 + j) * 32 + t * 8 + st * 2;
            const long long r0 = (long long)e * N + b_row(gemm1, N, nt, j, 2 * t);
            const long long r1 = (long long)e * N + b_row(gemm1, N, nt, j, 2 * t + 1);
            sk[base] = s[r0 * (K / 32) + kg * 4 + st];
            sk[base + 1] = s[r1 * (K / 32) + kg * 4 + st];
        }
    }
}
