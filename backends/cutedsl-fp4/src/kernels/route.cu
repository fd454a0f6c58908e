// The standard layout's pre-permute (each expert's rows, before rows.cu and gemm.cu) and
// post-permute (the top-k sum after GEMM 2).
//
// The standard path's pre-permute, in one block (few picks; fp4_route_count and fp4_route_rows
// below spread many over several): counts per local expert (ids outside 0..E are
// not computed here), their starts, and for each (token, pick) its row: src[row] = token,
// slot_of[t * K + k] = row (or -1). Rows within an expert follow no particular order; each is
// computed independently, so the results do not depend on it. Each thread loads ROUTE_BATCH ids
// before it uses any: one block has few loads in flight, and a load at a time (32 dependent
// rounds a pass at 4096 tokens) made the two passes latency-bound.
#define ROUTE_BATCH 8
// Picks p0, p0 + blockDim.x, ... (ROUTE_BATCH of them) of `ids`, -1 past the end.
__device__ __forceinline__ void route_ids(const int* __restrict__ ids, int p0, int picks, int (&id)[ROUTE_BATCH]) {
#pragma unroll
    for (int j = 0; j < ROUTE_BATCH; ++j) {
        const int p = p0 + j * blockDim.x;
        id[j] = p < picks ? ids[p] : -1;
    }
}

extern "C" __global__ void __launch_bounds__(1024) fp4_route(
    const int* __restrict__ ids, int picks, int K, int E, int* __restrict__ counts, int* __restrict__ row0,
    int* __restrict__ src, int* __restrict__ slot_of) {
    extern __shared__ int cnt[];  // [E] counts, then [E] cursors
    int* cur = cnt + E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    const int step = ROUTE_BATCH * blockDim.x;
    for (int p0 = threadIdx.x; p0 < picks; p0 += step) {
        int id[ROUTE_BATCH];
        route_ids(ids, p0, picks, id);
#pragma unroll
        for (int j = 0; j < ROUTE_BATCH; ++j)
            if (id[j] >= 0 && id[j] < E) atomicAdd(&cnt[id[j]], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
        // The starts: an exclusive scan by the first warp, 32 experts a round.
        const int lane = threadIdx.x;
        int acc = 0;
        for (int e0 = 0; e0 < E; e0 += 32) {
            const int e = e0 + lane;
            const int c = e < E ? cnt[e] : 0;
            int incl = c;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += v;
            }
            if (e < E) {
                row0[e] = acc + incl - c;
                cur[e] = acc + incl - c;
                counts[e] = c;
            }
            acc += __shfl_sync(0xffffffffu, incl, 31);
        }
    }
    __syncthreads();
    for (int p0 = threadIdx.x; p0 < picks; p0 += step) {
        int id[ROUTE_BATCH];
        route_ids(ids, p0, picks, id);
#pragma unroll
        for (int j = 0; j < ROUTE_BATCH; ++j) {
            const int p = p0 + j * blockDim.x;
            if (p >= picks) continue;
            int row = -1;
            if (id[j] >= 0 && id[j] < E) {
                row = atomicAdd(&cur[id[j]], 1);
                src[row] = p / K;
            }
            slot_of[p] = row;
        }
    }
}

// The same over several blocks, for many picks (runner.rs, ROUTE_MIN_PICKS): one block is bound
// by the latency of its loads and atomics (H100, 32768 picks: 41 us, against 3.5 + 7.3 us over
// 64 blocks). Block b of either kernel
// takes the b-th of gridDim.x equal runs of the picks (the same runs in both). fp4_route_count
// counts its run's picks per expert into hist[b * E + e]; fp4_route_rows sums those counts
// into each expert's count and start (block 0 writes them), starts its own rows of expert e
// past those of the blocks before it, and gives its picks their rows as fp4_route does.
#define ROUTE_THREADS 256
__device__ __forceinline__ void route_run(int picks, int& p0, int& p1) {
    const int run = (picks + gridDim.x - 1) / gridDim.x;
    p0 = min(blockIdx.x * run, picks);
    p1 = min(p0 + run, picks);
}

extern "C" __global__ void __launch_bounds__(ROUTE_THREADS) fp4_route_count(
    const int* __restrict__ ids, int picks, int E, int* __restrict__ hist) {
    extern __shared__ int cnt[];  // [E]
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    int p0, p1;
    route_run(picks, p0, p1);
    for (int p = p0 + threadIdx.x; p < p1; p += blockDim.x) {
        const int id = ids[p];
        if (id >= 0 && id < E) atomicAdd(&cnt[id], 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[blockIdx.x * E + e] = cnt[e];
}

extern "C" __global__ void __launch_bounds__(ROUTE_THREADS) fp4_route_rows(
    const int* __restrict__ ids, int picks, int K, int E, const int* __restrict__ hist, int* __restrict__ counts,
    int* __restrict__ row0, int* __restrict__ src, int* __restrict__ slot_of) {
    extern __shared__ int cur[];  // [E] this block's next row of each expert, [E] counts, [32] warp sums
    int* total = cur + E;
    int* warp_sum = total + E;
    const int tid = threadIdx.x, nb = gridDim.x;
    // Each thread a run of experts: their counts, and the rows the blocks before this one take.
    const int per = (E + ROUTE_THREADS - 1) / ROUTE_THREADS, e0 = min(tid * per, E), e1 = min(e0 + per, E);
    int own = 0;
    for (int e = e0; e < e1; ++e) {
        int tot = 0, before = 0;
#pragma unroll 8
        for (int b = 0; b < nb; ++b) {
            const int c = hist[b * E + e];
            tot += c;
            before += b < (int)blockIdx.x ? c : 0;
        }
        total[e] = tot;
        cur[e] = before;
        own += tot;
    }
    // The experts' starts: an exclusive scan of the runs' sums.
    int start = block_exclusive_scan<ROUTE_THREADS>(own, warp_sum);
    for (int e = e0; e < e1; ++e) {
        if (blockIdx.x == 0) {
            counts[e] = total[e];
            row0[e] = start;
        }
        cur[e] += start;
        start += total[e];
    }
    __syncthreads();
    int p0, p1;
    route_run(picks, p0, p1);
    for (int p = p0 + tid; p < p1; p += blockDim.x) {
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
