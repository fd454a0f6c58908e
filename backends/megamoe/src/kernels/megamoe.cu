// MegaMoE: a whole expert-parallel MoE layer in one persistent, cooperative launch.
//
// Phases, each ended by a grid barrier (and, where other ranks read or write, by flags in the
// symmetric buffers):
//   0. pre-dispatch: this rank's tokens quantized per 32 values (E2M1 or E4M3, UE8M0 scale) and
//      its top-k copied into its own symmetric buffer; rows past num_tokens get id -1, weight 0;
//      then, with several ranks, every rank is told "ready" and every rank's "ready" is awaited;
//   1. dispatch: every (source rank, token, k) entry whose expert lives here is pulled over peer
//      memory into this rank's gathered rows, in the operand layout the GEMM reads (a world of
//      one rank skips this phase and its barrier: its pre-dispatch writes those rows itself);
//   2. GEMM 1 with the activation, the router weight and requantization (an MX block of GEMM 2's
//      input is exactly one work item's 32 columns);
//   3. GEMM 2, written straight into the source rank's combine slots; then "done" to every rank;
//   4. the top-k sum of this rank's tokens once every rank is done.
// Defines: FP4_ACTS (E2M1 activations, else E4M3), MXF4 (FP4 activations kept as FP4 and widened
// in registers next to the MMA), ACT (activation.cuh), GATE_UP (the w13 row order), ITEM_ROWS
// and STAGES (the work-item tiling).
//
// Products run on the tensor cores as f16 mma.m16n8k16 with the weights as the 16-row operand and
// up to eight tokens as the 8 columns (decode batches fill an n8 tile, not an m16 one; Hopper's
// mma.sync has no FP8 form, its e4m3 variant is emulated through f16). An E2M1 nibble s|e1 e0 m
// placed as the E4M3 byte s|0 0 e1 e0 m|0 0 is the E2M1 value times 2^-6 (subnormal 0.5
// included), so widening is a shift and a mask, then one exact e4m3x2 -> f16x2 conversion per
// pair; the 2^6 goes into the final scale. Each k32 step is one scale block of both operands: its
// two k16 products are added with the two power-of-two scales.

#define KGROUP 128      // k values per load group (four k32 steps)
// ITEM_ROWS (8 or 16): tokens of one work item, one or two n8 tiles; an expert with more rows
// takes more items. STAGES: depth of the weight ring (the 8-row items leave room for four).
#define ITEM_COLS 64    // weight rows (output columns) of one work item (four 16-row tiles)
#define WARPS 8
// Each FP4 operand is widened to E4M3 as its value times 2^-6.
#if FP4_ACTS
#define WIDEN_FACTOR 4096.0f
#else
#define WIDEN_FACTOR 64.0f
#endif
#define CONSUMERS (WARPS * 32)        // the consumer warps: every phase but the weight stream
#define THREADS (CONSUMERS + 32)      // plus the producer warp

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
// u64 words after the flags: block 0's global timer (ns) at each phase boundary of the last call.
#define CTRL_STAMPS (16 + 2048)

__device__ __forceinline__ void stamp(u32* ctrl, int i) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        u64 t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        ((u64*)(ctrl + CTRL_STAMPS))[i] = t;
    }
}

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

// The consumer warps' own barrier (the producer warp does not take part).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS) : "memory"); }

// Sense-reversing grid barrier (the launch is cooperative, so every block is resident).
__device__ void grid_sync(u32* ctrl) {
    consumers_sync();
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
    consumers_sync();
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
    consumers_sync();
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
// 1 / ue8m0_value(b), exactly: a power of two (2^-127, subnormal, for b = 254; 0 for the NaN
// scale 255, whose value is infinite). Multiplying by it rounds v / s once, as the division does,
// so every code is the same, at the cost of one multiplication instead of a division.
__device__ __forceinline__ float ue8m0_recip(u32 b) {
    return b < 254u ? __uint_as_float((254u - b) << 23) : b == 254u ? __uint_as_float(0x00400000u) : 0.0f;
}

// One activation value quantized with its block's scale byte sb (v / s as v times the exact
// reciprocal): an E2M1 code (FP4) or an E4M3 byte (FP8).
__device__ __forceinline__ u32 quant_value(float v, u32 sb) {
#if FP4_ACTS
    return e2m1_code(v * ue8m0_recip(sb));
#else
    return f32_to_e4m3(v * ue8m0_recip(sb));
#endif
}
#if FP4_ACTS
#define ACT_MAX 6.0f
#else
#define ACT_MAX 448.0f
#endif
__device__ __forceinline__ u32 e2m1_to_e4m3_scaled(u32 c) { return ((c & 7u) << 2) | ((c & 8u) << 4); }

// The operand layout of a K-wide token row (gathered activations, GEMM 2's input), so that lane
// t of an mma quad reads its fragments of four k32 steps with contiguous loads. In a k32 block
// the lane's eight values are k = 2t, 2t+1, 2t+8, 2t+9 (first k16 half) and the same plus 16;
// value index i of them is k = kmap(t, i). Per group of four k32 blocks (b = 4 kg + s), per
// lane t:
//   E4M3: 32 bytes, step s at 8 s, the eight values in index order;
//   FP4 (MXF4): 16 bytes, step s at 4 s: byte i holds index i (low nibble), index i + 4 (high).
__device__ __forceinline__ int kmap(int t, int i) { return 2 * t + (i & 1) + ((i >> 1) & 1) * 8 + (i >> 2) * 16; }
// Offset of column c (0..31) of block b.
__device__ __forceinline__ long long e4_off(int b, int c) {
    const int t = (c & 7) >> 1, i = (c & 1) + ((c >> 3) & 1) * 2 + (c >> 4) * 4;
    return (long long)(b >> 2) * 128 + t * 32 + (b & 3) * 8 + i;
}
// Byte of column c of block b (column c in its low nibble when c < 16, c - 16's high nibble).
__device__ __forceinline__ long long f4_off(int b, int c) {
    const int t = (c & 7) >> 1, i = (c & 1) + ((c >> 3) & 1) * 2;
    return (long long)(b >> 2) * 64 + t * 16 + (b & 3) * 4 + i;
}

// ------------------------------------------------------------------ phase 1: dispatch
// Block b (32 values, `src` as loaded from the DESIGN layout: 16 bytes of E2M1 or 32 of E4M3) in
// the operand layout: lane quad t's piece (8 bytes, or 4 with MXF4 in .x) goes to e4_off(b, 2t)
// (f4_off with MXF4). Computed once per block, stored once per row it goes to.
struct Gathered {
    uint2 v[4];
};
__device__ __forceinline__ Gathered gather_of(const uint4* src) {
    Gathered g;
#if FP4_ACTS
    const uint4 w = src[0];
    const u32 n[4] = {w.x, w.y, w.z, w.w};  // nibble k at bits 4*(k%8) of word k/8
#define NIB(k) ((n[(k) >> 3] >> (4 * ((k) & 7))) & 15u)
#if MXF4
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        u32 v = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) v |= (NIB(kmap(t, i)) | (NIB(kmap(t, i + 4)) << 4)) << (8 * i);
        g.v[t] = make_uint2(v, 0u);
    }
#else
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        u32 lo = 0, hi = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            lo |= e2m1_to_e4m3_scaled(NIB(kmap(t, i))) << (8 * i);
            hi |= e2m1_to_e4m3_scaled(NIB(kmap(t, i + 4))) << (8 * i);
        }
        g.v[t] = make_uint2(lo, hi);
    }
#endif
#undef NIB
#else
    const uint4 lo = src[0], hi = src[1];
    // words k/4: w[0..3] = k0..15, w[4..7] = k16..31. Lane t: k 2t, 2t+1 (word t/2), 2t+8, 2t+9
    // (word 2 + t/2), and the same from the second half.
    const u32 w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        const u32 sel = (t & 1) ? 0x7632u : 0x5410u;
        g.v[t] = make_uint2(__byte_perm(w[t >> 1], w[2 + (t >> 1)], sel), __byte_perm(w[4 + (t >> 1)], w[6 + (t >> 1)], sel));
    }
#endif
    return g;
}
__device__ __forceinline__ void put_gathered(const Gathered& g, u8* dst, int b) {
#pragma unroll
    for (int t = 0; t < 4; ++t) {
#if MXF4
        *(u32*)(dst + f4_off(b, 2 * t)) = g.v[t].x;
#else
        *(uint2*)(dst + e4_off(b, 2 * t)) = g.v[t];
#endif
    }
}

#if MXF4
#define XG_ROW(K) ((K) / 2)
#else
#define XG_ROW(K) (K)
#endif
// Bytes per row of the operand rows' scales: K / 32 rounded up to 32, so every stage's 32 bytes
// of a row are one aligned bulk copy inside the row.
#define SCALE_PITCH(K) ((((K) / 32) + 31) / 32 * 32)

// ------------------------------------------------------------------ phase 0: pre-dispatch
// With DIRECT (a world of one rank), each quantized block is also written straight into the
// gathered operand rows of its token's picks, and the picks are listed per expert, as the
// dispatch would: the dispatch phase and its grid barrier are skipped.
template <bool DIRECT>
__device__ void pre_dispatch(const MegaParams& p) {
    const int H = p.hidden_size, blocks = H / 32;
    const int xrow = FP4_ACTS ? H / 2 : H;
    u8* x = p.sym + p.off_x;
    u8* xs = p.sym + p.off_xs;
    const long long total = (long long)p.m * blocks;
    for (long long i = blockIdx.x * (long long)CONSUMERS + threadIdx.x; i < total;
         i += (long long)gridDim.x * CONSUMERS) {
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
        xs[(long long)t * blocks + b] = (u8)sb;
        // Eight E2M1 codes or four E4M3 bytes a word: one or two uint4 per block.
        constexpr int BITS = FP4_ACTS ? 4 : 8, PER = 32 / BITS;
        uint4 blk[BITS / 4];
        u32* packed = (u32*)blk;
#pragma unroll
        for (int q = 0; q < BITS; ++q) {
            u32 w = 0;
#pragma unroll
            for (int j = 0; j < PER; ++j) w |= quant_value(v[q * PER + j], sb) << (BITS * j);
            packed[q] = w;
        }
        uint4* dst = (uint4*)(x + (long long)t * xrow + b * 4 * BITS);
#pragma unroll
        for (int i = 0; i < BITS / 4; ++i) dst[i] = blk[i];
        if (DIRECT) {
            const Gathered gb = gather_of(blk);
            // The token's picks, eight loads in flight before any store (the stores might alias
            // them for all the compiler knows, which would serialize one round trip per pick).
            for (int k0 = 0; k0 < p.kin; k0 += 8) {
                int id[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) id[j] = k0 + j < p.kin ? __ldg(p.topk_ids + t * p.kin + k0 + j) : -1;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    if (id[j] < 0 || id[j] >= p.num_experts) continue;
                    const long long entry = (long long)t * p.k + k0 + j;
                    put_gathered(gb, p.sym + p.off_xg + entry * XG_ROW(H), b);
                    p.sym[p.off_xgs + entry * SCALE_PITCH(H) + b] = (u8)sb;
                }
            }
        }
    }
    int* ids = (int*)(p.sym + p.off_ids);
    float* w = (float*)(p.sym + p.off_w);
    for (int i = blockIdx.x * CONSUMERS + threadIdx.x; i < p.tmax * p.k; i += gridDim.x * CONSUMERS) {
        const int t = i / p.k, kk = i % p.k;
        const bool real = t < p.m && kk < p.kin;
        const int id = real ? p.topk_ids[t * p.kin + kk] : -1;
        const float wt = real ? p.topk_w[t * p.kin + kk] : 0.0f;
        ids[i] = id;
        w[i] = wt;
        if (DIRECT && id != -1) {
            if (id < -1 || id >= p.num_experts) {
                atomicOr(p.error, 2);
                continue;
            }
            const u32 slot = atomicAdd((u32*)(p.sym + p.off_counts) + id, 1u);
            ((int*)(p.sym + p.off_list))[(long long)id * p.tmax * p.k + slot] = i;
            ((float*)(p.sym + p.off_wg))[i] = wt;
        }
    }
}

// Kernel entry for the pre-dispatch alone (its layout is checked against the CPU's).
extern "C" __global__ void __launch_bounds__(CONSUMERS) megamoe_pre_dispatch(MegaParams p) { pre_dispatch<false>(p); }

// Blocks of 32 values one lane reads at once when it pulls a row.
#define GATHER_BATCH 8

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
        if (id == -1) continue;
        if (id < -1 || id >= p.num_experts) {
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
        // Every block this lane copies in a batch is read before any is written, so the (remote)
        // reads overlap instead of queuing one round trip each.
        for (int b0 = 0; b0 < blocks; b0 += 32 * GATHER_BATCH) {
            uint4 v[GATHER_BATCH][FP4_ACTS ? 1 : 2];
            u8 sc[GATHER_BATCH];
#pragma unroll
            for (int i = 0; i < GATHER_BATCH; ++i) {
                const int b = b0 + 32 * i + lane;
                if (b >= blocks) break;
                const uint4* src = (const uint4*)(row + b * (FP4_ACTS ? 16 : 32));
                v[i][0] = __ldcg(src);
#if !FP4_ACTS
                v[i][1] = __ldcg(src + 1);
#endif
                sc[i] = __ldcg(srow + b);
            }
#pragma unroll
            for (int i = 0; i < GATHER_BATCH; ++i) {
                const int b = b0 + 32 * i + lane;
                if (b >= blocks) break;
                put_gathered(gather_of(v[i]), dst, b);
                xgs[(long long)entry * SCALE_PITCH(H) + b] = sc[i];
            }
        }
    }
}

// ------------------------------------------------------------------ GEMM work items
// d = a * b + c, f16 operands, f32 accumulators.
__device__ __forceinline__ void mma_f16(float* d, const u32* a, u32 b0, u32 b1, const float* c) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}


// ------------------------------------------------------------------ the GEMM stream
// A block's GEMM work is one stream of stages: for each of its work items (GEMM 1's, then GEMM
// 2's), the item's k groups eight at a time. The producer warp copies each stage (the eight k
// groups' packed weights and scale pairs, and the item's rows of A and their scales for them)
// into a ring of STAGES shared-memory slots with bulk copies that complete on the slot's
// mbarrier; consumer warp w multiplies k group w of the stage and releases the slot. The
// producer runs ahead across item boundaries, so HBM keeps streaming through each item's
// cross-warp reduction and epilogue.
#define STAGE_W (8 * 8 * 512)                   // eight k groups x eight tiles x 512 B
#define STAGE_S (8 * 8 * 32)                    // their scale pairs
#define A_GROUP (MXF4 ? 64 : 128)               // bytes of one row for one k group
#define A_PITCH (8 * A_GROUP + 16)              // a row's eight k groups, padded against bank conflicts
#define STAGE_A (ITEM_ROWS * A_PITCH)
#define STAGE_AS (ITEM_ROWS * 32)               // a row's scales for eight k groups
#define STAGE_BYTES (STAGE_W + STAGE_S + STAGE_A + STAGE_AS)
#define RED_FLOATS (WARPS * ITEM_ROWS * ITEM_COLS)

// Consumers and producer: hands the item prefixes (and, before GEMM 2, the grid barrier) over.
// They reach it from different instructions, so it is the non-aligned barrier (`bar.sync` is
// `barrier.sync.aligned`, which every thread of the block must execute as the same instruction).
__device__ __forceinline__ void handoff_sync() { asm volatile("barrier.sync 2, %0;" ::"n"(THREADS) : "memory"); }

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
}

__device__ __forceinline__ int find_expert(const int* pref, int E, int item) {
    int lo = 0, hi = E;  // pref[lo] <= item < pref[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (pref[mid] <= item) lo = mid; else hi = mid;
    }
    return lo;
}

// A work item: ITEM_ROWS rows of one expert by ITEM_COLS B rows (GEMM 1: 32 gate and the same 32
// up columns; GEMM 2: 64 output columns).
struct Item {
    int nt, rows, kgroups;
    const int* entries;  // the rows' entries (src rank, token, k)
    const u8* w;         // the item's packed weights and scale pairs
    const u8* ws;
    const u8* a;         // A rows by entry, `arow` bytes each; scales `apitch` bytes each
    const u8* as;
    long long arow, apitch;
};

__device__ __forceinline__ Item item_at(const MegaParams& p, const int* pref, int gemm, int item) {
    const int H = p.hidden_size, I = p.inter, cap = p.ranks * p.tmax * p.k;
    const int tiles = gemm == 1 ? I / 32 : H / ITEM_COLS, K = gemm == 1 ? H : I;
    const int e = find_expert(pref, p.local_experts, item);
    const int local = item - pref[e], chunk = local / tiles;
    const int cnt = (int)__ldcg((const u32*)(p.sym + p.off_counts) + e);
    Item it;
    it.nt = local % tiles;
    it.rows = min(ITEM_ROWS, cnt - chunk * ITEM_ROWS);
    it.kgroups = K / KGROUP;
    it.entries = (const int*)(p.sym + p.off_list) + (long long)e * cap + chunk * ITEM_ROWS;
    const long long wi = (long long)e * tiles + it.nt;
    it.w = (gemm == 1 ? p.w13 : p.w2) + wi * it.kgroups * 8 * 512;
    it.ws = (gemm == 1 ? p.w13s : p.w2s) + wi * it.kgroups * 8 * 32;
    it.a = p.sym + (gemm == 1 ? p.off_xg : p.off_h);
    it.as = p.sym + (gemm == 1 ? p.off_xgs : p.off_hs);
    it.arow = XG_ROW(K);
    it.apitch = SCALE_PITCH(K);
    return it;
}

// The rows of A (and their scales) one stage of an item needs, each lane a row.
__device__ __forceinline__ void copy_rows(const Item& it, int st, u8* base, u64* bar) {
    const int lane = threadIdx.x & 31;
    if (lane >= it.rows) return;
    const int kgs = min(8, it.kgroups - 8 * st);
    const long long entry = __ldcg(it.entries + lane);
    bulk_copy(base + STAGE_W + STAGE_S + lane * A_PITCH, it.a + entry * it.arow + st * 8 * A_GROUP, kgs * A_GROUP, bar);
    bulk_copy(base + STAGE_W + STAGE_S + STAGE_A + lane * 32, it.as + entry * it.apitch + st * 32, 32, bar);
}

// The producer: every stage of this block's GEMM 1 items, then (once the consumers are past the
// grid barrier that makes GEMM 2's input whole) of its GEMM 2 items.
__device__ void produce(const MegaParams& p, const int* pref1, const int* pref2, u8* ring, u64* full, u64* empty) {
    const int lane = threadIdx.x & 31;
    u32 n = 0;
    for (int gemm = 1; gemm <= 2; ++gemm) {
        const int* pref = gemm == 1 ? pref1 : pref2;
        handoff_sync();
        // A was written by generic stores (the dispatch, GEMM 1); the bulk copies read it.
        asm volatile("fence.proxy.async.global;" ::: "memory");
        for (int item = blockIdx.x; item < pref[p.local_experts]; item += gridDim.x) {
            const Item it = item_at(p, pref, gemm, item);
            for (int st = 0; st * 8 < it.kgroups; ++st, ++n) {
                const int slot = n % STAGES;
                if (n >= STAGES) mbar_wait(empty + slot, (n / STAGES - 1) & 1);
                const int kgs = min(8, it.kgroups - 8 * st);
                u8* base = ring + slot * STAGE_BYTES;
                if (lane == 0) {
                    mbar_expect_tx(full + slot, kgs * (4096 + 256) + it.rows * (kgs * A_GROUP + 32));
                    bulk_copy(base, it.w + (long long)st * STAGE_W, kgs * 4096, full + slot);
                    bulk_copy(base + STAGE_W, it.ws + (long long)st * STAGE_S, kgs * 256, full + slot);
                }
                __syncwarp();
                copy_rows(it, st, base, full + slot);
            }
        }
    }
}

// One k group (four k32 steps) of a warp's operands, read from a stage: per 16-row weight tile its
// two words per step and its rows' (g, g + 8) scales; per half of the item's tokens the lane's
// token g fragment and the scales of tokens 2t and 2t + 1.
struct Group {
    uint4 w[4][2];
    u64 ws[4];
#if MXF4
    uint4 a[2][1];
#else
    uint4 a[2][2];
#endif
    u32 sa[2][2];
};

__device__ __forceinline__ void load_group(Group& f, const u8* stage, int kg, int rows, int halves) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint4* wp = (const uint4*)(stage + kg * 4096 + j * 1024 + lane * 32);
        f.w[j][0] = wp[0];
        f.w[j][1] = wp[1];
        f.ws[j] = *(const u64*)(stage + STAGE_W + kg * 256 + j * 64 + g * 8);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (h >= halves) break;
        // Tokens past the item's count read its last row; their results are dropped.
        const u8* row = stage + STAGE_W + STAGE_S + min(h * 8 + g, rows - 1) * A_PITCH + kg * A_GROUP;
#if MXF4
        f.a[h][0] = *(const uint4*)(row + t * 16);
#else
        f.a[h][0] = *(const uint4*)(row + t * 32);
        f.a[h][1] = *(const uint4*)(row + t * 32 + 16);
#endif
        const u8* sc = stage + STAGE_W + STAGE_S + STAGE_A + kg * 4;
        f.sa[h][0] = *(const u32*)(sc + min(h * 8 + 2 * t, rows - 1) * 32);
        f.sa[h][1] = *(const u32*)(sc + min(h * 8 + 2 * t + 1, rows - 1) * 32);
    }
}

__device__ __forceinline__ u32 word_of(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// acc[tile][token half][4]: rows g, g + 8 of the tile by tokens 2t, 2t + 1 of the half.
template <int HALVES>
__device__ __forceinline__ void mma_group(const Group& f, float (*acc)[2][4]) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        // The tokens' fragments (both k16 halves) and the (scale - 127) << 23 of tokens 2t, 2t+1.
        u32 bf[HALVES][4];
        float sa[HALVES][2];
#pragma unroll
        for (int h = 0; h < HALVES; ++h) {
#if MXF4
            const u32 v = word_of(f.a[h][0], s);
            const u32 lo = widen_lo(v), hi = widen_hi(v);
#else
            const u32 lo = word_of(f.a[h][s >> 1], (s & 1) * 2), hi = word_of(f.a[h][s >> 1], (s & 1) * 2 + 1);
#endif
            e4m3x4_to_f16x2x2(lo, bf[h][0], bf[h][1]);
            e4m3x4_to_f16x2x2(hi, bf[h][2], bf[h][3]);
            sa[h][0] = ue8m0_value((f.sa[h][0] >> (8 * s)) & 0xffu);
            sa[h][1] = ue8m0_value((f.sa[h][1] >> (8 * s)) & 0xffu);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            u32 af[2][4];  // per k16 half: rows g (k 2t, 2t+1), g + 8 (same), g (k + 8), g + 8 (k + 8)
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const u32 w = word_of(f.w[j][s >> 1], (s & 1) * 2 + q);
                const u32 lo = widen_lo(w), hi = widen_hi(w);
                e4m3x4_to_f16x2x2(lo, af[q][0], af[q][1]);
                e4m3x4_to_f16x2x2(hi, af[q][2], af[q][3]);
            }
            // The rows' UE8M0 scales as f32 (bits: the byte << 23), from one byte permute: the
            // two bytes as 16-bit lanes shifted to bit 7, then each lane moved to bit 23.
            const u32 bytes = (s < 2 ? (u32)f.ws[j] : (u32)(f.ws[j] >> 32));
            const u32 pair = __byte_perm(bytes, 0, (s & 1) ? 0x4342 : 0x4140) << 7;
            const float wg = __uint_as_float(pair << 16), wg8 = __uint_as_float(pair & 0xffff0000u);
#pragma unroll
            for (int h = 0; h < HALVES; ++h) {
                const float zero[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                float d[4];
                mma_f16(d, af[0], bf[h][0], bf[h][1], zero);
                mma_f16(d, af[1], bf[h][2], bf[h][3], d);
                acc[j][h][0] = fmaf(d[0], wg * sa[h][0], acc[j][h][0]);
                acc[j][h][1] = fmaf(d[1], wg * sa[h][1], acc[j][h][1]);
                acc[j][h][2] = fmaf(d[2], wg8 * sa[h][0], acc[j][h][2]);
                acc[j][h][3] = fmaf(d[3], wg8 * sa[h][1], acc[j][h][3]);
            }
        }
    }
}

// One work item's sums over K into red[warp][token][col] (this warp's k groups: w, w + 8, ...)
// of one of two buffers, alternating per item: a warp goes on to the next item while the others
// finish this one's epilogue, and the barrier after the next item's sums proves they have
// before the buffer is written again. Returns the buffer.
__device__ float* item_sums(const Item& it, u8* ring, u64* full, u64* empty, u32& n, float* red, u32& items) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int halves = it.rows > 8 ? 2 : 1;
    float acc[4][2][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[j][h][q] = 0.0f;
    for (int st = 0; st * 8 < it.kgroups; ++st, ++n) {
        const int slot = n % STAGES;
        mbar_wait(full + slot, (n / STAGES) & 1);
        if (8 * st + warp < it.kgroups) {
            Group f;
            load_group(f, ring + slot * STAGE_BYTES, warp, it.rows, halves);
            if (halves == 2) mma_group<2>(f, acc);
            else mma_group<1>(f, acc);
        }
        // Every consumer thread releases the slot after its own reads of it.
        mbar_arrive(empty + slot);
    }
    float* buf = red + (items++ & 1) * RED_FLOATS;
    float* w = buf + warp * ITEM_ROWS * ITEM_COLS;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < ITEM_ROWS / 8; ++h) {
            const int tok = h * 8 + 2 * t, col = j * 16 + g;
            w[tok * ITEM_COLS + col] = acc[j][h][0];
            w[(tok + 1) * ITEM_COLS + col] = acc[j][h][1];
            w[tok * ITEM_COLS + col + 8] = acc[j][h][2];
            w[(tok + 1) * ITEM_COLS + col + 8] = acc[j][h][3];
        }
    consumers_sync();
    return buf;
}

__device__ __forceinline__ float reduced(const float* red, int r, int c) {
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += red[(w * ITEM_ROWS + r) * ITEM_COLS + c];
    return v;
}

// GEMM 1 (w13), the activation, the router weight and requantization of GEMM 2's input.
__device__ void gemm1(const MegaParams& p, const int* pref, u8* ring, u64* full, u64* empty, u32& n, float* red2,
                      u32& items) {
    const int I = p.inter;
    const float* wg = (const float*)(p.sym + p.off_wg);
    u8* h = p.sym + p.off_h;
    u8* hs = p.sym + p.off_hs;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int item = blockIdx.x; item < pref[p.local_experts]; item += gridDim.x) {
        const Item it = item_at(p, pref, 1, item);
        const float* red = item_sums(it, ring, full, empty, n, red2, items);
        // Warp w: rows w, w + 8; lane: column nt * 32 + lane of the intermediate.
        for (int r = warp; r < it.rows; r += WARPS) {
            const int entry = __ldcg(it.entries + r);
            const float gate = reduced(red, r, lane) * WIDEN_FACTOR;
            const float up = reduced(red, r, 32 + lane) * WIDEN_FACTOR;
            const float v = activation(gate, up, p.limit, p.alpha) * __ldcg(wg + entry);
            const float amax = warp_max(fabsf(v));
            const u32 sb = ue8m0_ceil(__fdiv_rn(fmaxf(amax, 1e-4f), ACT_MAX));
            const u32 q = quant_value(v, sb);
            u8* row = h + (long long)entry * XG_ROW(I);
#if MXF4
            const u32 other = __shfl_down_sync(0xffffffffu, q, 16);
            if (lane < 16) row[f4_off(it.nt, lane)] = (u8)(q | (other << 4));
#elif FP4_ACTS
            row[e4_off(it.nt, lane)] = (u8)e2m1_to_e4m3_scaled(q);
#else
            row[e4_off(it.nt, lane)] = (u8)q;
#endif
            if (lane == 0) hs[(long long)entry * SCALE_PITCH(I) + it.nt] = (u8)sb;
        }
    }
}

// GEMM 2 (w2) into the source ranks' combine slots `y [T, k, H]` bf16.
__device__ void gemm2(const MegaParams& p, const int* pref, u8* ring, u64* full, u64* empty, u32& n, float* red2,
                      u32& items) {
    const int H = p.hidden_size;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int item = blockIdx.x; item < pref[p.local_experts]; item += gridDim.x) {
        const Item it = item_at(p, pref, 2, item);
        const float* red = item_sums(it, ring, full, empty, n, red2, items);
        for (int r = warp; r < it.rows; r += WARPS) {
            const int entry = __ldcg(it.entries + r);
            const int src = entry / (p.tmax * p.k), tk = entry % (p.tmax * p.k);
            const float v0 = reduced(red, r, 2 * lane) * WIDEN_FACTOR;
            const float v1 = reduced(red, r, 2 * lane + 1) * WIDEN_FACTOR;
            u16* y = (u16*)(p.peers[src] + p.off_y) + (long long)tk * H + it.nt * ITEM_COLS + 2 * lane;
            *(u32*)y = (u32)f32_to_bf16(v0) | ((u32)f32_to_bf16(v1) << 16);
        }
    }
}

// ------------------------------------------------------------------ phase 4: top-k sum
__device__ void combine(const MegaParams& p) {
    const int H = p.hidden_size, chunks = H / 8;
    const int* ids = (const int*)(p.sym + p.off_ids);
    const u16* y = (const u16*)(p.sym + p.off_y);
    const long long total = (long long)p.m * chunks;
    for (long long i = blockIdx.x * (long long)CONSUMERS + threadIdx.x; i < total;
         i += (long long)gridDim.x * CONSUMERS) {
        const int t = (int)(i / chunks), c = (int)(i % chunks) * 8;
        float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int kk = 0; kk < p.k; ++kk) {
            // Padding, and ids the dispatch refused (flagged there): no expert wrote this slot.
            const int id = __ldcg(ids + t * p.k + kk);
            if (id < 0 || id >= p.num_experts) continue;
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

// Shared memory: the stage ring, two buffers of cross-warp sums, both GEMMs' item prefixes, the
// mbarriers.
// One block an SM: nine warps put three on one scheduler, which caps a thread at 168 registers.
extern "C" __global__ void __launch_bounds__(THREADS, 1) megamoe_fused(MegaParams p) {
    extern __shared__ float4 smem4[];
    u8* ring = (u8*)smem4;
    float* red = (float*)(ring + STAGES * STAGE_BYTES);
    int* pref1 = (int*)(red + 2 * RED_FLOATS);
    int* pref2 = pref1 + p.local_experts + 1;
    u64* full = (u64*)(((unsigned long long)(pref2 + p.local_experts + 1) + 7) & ~7ull);
    u64* empty = full + STAGES;
    u32* ctrl = (u32*)(p.sym + p.off_ctrl);
    const u32 epoch = ld_acquire_gpu(ctrl) + 1;
    if (threadIdx.x == 0) {
        for (int i = 0; i < STAGES; ++i) {
            mbar_init(full + i, 1);
            mbar_init(empty + i, CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x >= CONSUMERS) {
        produce(p, pref1, pref2, ring, full, empty);
        return;
    }

    stamp(ctrl, 0);
    if (p.ranks == 1) {
        // One rank needs no flags, and its pre-dispatch writes the gathered rows itself: the
        // phase stamps of the ready wait and the dispatch then time only the grid barrier.
        pre_dispatch<true>(p);
        stamp(ctrl, 1);
        stamp(ctrl, 2);
    } else {
        pre_dispatch<false>(p);
        grid_sync(ctrl);
        stamp(ctrl, 1);
        tell_ranks(p, p.off_ctrl + CTRL_READY * 4, epoch);
        await_ranks(p, ctrl + CTRL_READY, epoch);
        stamp(ctrl, 2);
        dispatch(p);
    }
    grid_sync(ctrl);
    stamp(ctrl, 3);
    item_prefix(p, pref1, p.inter / 32);
    item_prefix(p, pref2, p.hidden_size / ITEM_COLS);
    consumers_sync();
    u32 n = 0;
    handoff_sync();
    u32 items = 0;
    gemm1(p, pref1, ring, full, empty, n, red, items);
    grid_sync(ctrl);
    stamp(ctrl, 4);
    handoff_sync();
    gemm2(p, pref2, ring, full, empty, n, red, items);
    grid_sync(ctrl);
    stamp(ctrl, 5);
    if (p.ranks > 1) {
        tell_ranks(p, p.off_ctrl + CTRL_DONE * 4, epoch);
        await_ranks(p, ctrl + CTRL_DONE, epoch);
    }
    stamp(ctrl, 6);
    // Every block has read the epoch and finished with the counts: reset them for the next call.
    if (blockIdx.x == 0) {
        u32* counts = (u32*)(p.sym + p.off_counts);
        for (int e = threadIdx.x; e < p.local_experts; e += CONSUMERS) counts[e] = 0;
        if (threadIdx.x == 0) st_release_gpu(ctrl, epoch);
    }
    combine(p);
    stamp(ctrl, 7);
}

// ------------------------------------------------------------------ weights, once at load
// Standard MXFP4 `w [E, N, K/2]` (element 2i in the low nibble), scales `[E, N, K/32]`, to the
// layout the GEMM stream copies: per expert, per item of ITEM_COLS B rows, per KGROUP of k, per
// 16-row tile j, per lane (g = lane / 4, t = lane % 4) 32 bytes = four k32 steps s of two words
// q (k16 halves), whose byte i holds row g (i < 2) or g + 8 at k 32 s + 16 q + 2t + (i & 1) (low
// nibble) and the same k + 8 (high nibble); then per (item, kgroup, tile, g) 8 bytes of scales =
// four steps of (row g, row g + 8).
// GEMM 1 items take gate columns [32 nt, 32 nt + 32) as tiles 0, 1 and the same up columns as
// tiles 2, 3 (GATE_UP: 0 gate then up, 1 up then gate, 2 interleaved).
__device__ __forceinline__ long long b_row(int gemm1, int N, int nt, int j, int r) {
    if (!gemm1) return (long long)nt * ITEM_COLS + j * 16 + r;
    const int c = nt * 32 + (j & 1) * 16 + r;
    const bool up = j >= 2;
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
    const int tiles = N / ITEM_COLS, KG = K / KGROUP;
    const long long words = (long long)E * tiles * KG * 4 * 32 * 8;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < words;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i;
        const int q = (int)(r % 2); r /= 2;
        const int st = (int)(r % 4); r /= 4;
        const int lane = (int)(r % 32); r /= 32;
        const int j = (int)(r % 4); r /= 4;
        const int kg = (int)(r % KG); r /= KG;
        const int nt = (int)(r % tiles);
        const int e = (int)(r / tiles);
        const int g = lane >> 2, t = lane & 3;
        const int k0 = (kg * 4 + st) * 32 + 16 * q + 2 * t;
        u32 word = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            const long long row = (long long)e * N + b_row(gemm1, N, nt, j, b < 2 ? g : g + 8);
            const u8* wr = w + row * (K / 2);
            const int klo = k0 + (b & 1), khi = klo + 8;
            const u32 lo = (wr[klo >> 1] >> (4 * (klo & 1))) & 15u;
            const u32 hi = (wr[khi >> 1] >> (4 * (khi & 1))) & 15u;
            word |= (lo | (hi << 4)) << (8 * b);
        }
        *(u32*)(wk + i * 4) = word;
        if (t == 0 && q == 0) {
            const long long base = ((((long long)e * tiles + nt) * KG + kg) * 4 + j) * 64 + g * 8 + st * 2;
            const long long r0 = (long long)e * N + b_row(gemm1, N, nt, j, g);
            const long long r1 = (long long)e * N + b_row(gemm1, N, nt, j, g + 8);
            sk[base] = s[r0 * (K / 32) + kg * 4 + st];
            sk[base + 1] = s[r1 * (K / 32) + kg * 4 + st];
        }
    }
}
