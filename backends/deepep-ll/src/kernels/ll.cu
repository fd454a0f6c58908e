// DeepEP-style low-latency all-to-all over memory every rank can address (its own buffers and
// its peers', mapped by peer access or CUDA IPC). Every rank holds the same buffer-set layout
// (`LlLayout`, byte offsets from a set's base); `peers[r]` is rank r's base as this rank sees it.
//
// Dispatch (one buffer set per call, two alternating):
//  - ll_route: per global expert, the slot of each (token, k) among this rank's tokens routed to
//    it, in token order, and the count per expert. Ids outside -1..E are flagged and skipped.
//  - ll_dispatch_send: each token is read once (cast to E4M3 per 128 channels when FP8) and
//    written to every expert it picked, into the owner rank's staging rows
//    [e_local][src_rank * T + slot]; the last block then writes this rank's counts into every
//    rank and releases its flag there.
//  - ll_dispatch_recv: waits for every rank's flag, then writes masked_m, layout_range (source
//    ranks in rank order) and, for R > 1, packs the staging rows into [e_local][begin + i].
//    With R = 1 the staging rows are the packed rows.
// Combine:
//  - ll_combine_send: each expert output row goes to its source rank's [T, K, H] slot; the last
//    block releases this rank's combine flag on every rank.
//  - ll_combine_recv: waits for every rank, then out[t] = scale * sum_k w[t,k] * y[t,k].
//
// Flags carry epochs that count calls per buffer set, kept in device memory, so a captured
// CUDA graph can be replayed: every kernel reads and advances its own epoch. Waits give up
// after `timeout_ns` and set the status word. Status bits: 2 timeout, 4 expert id out of
// range, 8 more rows for one expert than the buffer holds, 16 a combine row names a token or
// slot outside the batch.
//
// Compile-time parameters: ACT_F16 (activation dtype), FP8 (0 bf16/f16 on the wire, 1 E4M3
// with f32 scales, 2 E4M3 with scales rounded up to powers of two (UE8M0)).

struct LlLayout {
    u64 x, x_scale, src_info, src_slot;             // packed [El, R*T, ...]
    u64 stage_x, stage_scale, stage_info, stage_slot; // staging (== packed when R == 1)
    u64 counts;       // [R, El] i32, written by source ranks
    u64 masked_m;     // [El] i32
    u64 layout_range; // [El, R] i64
    u64 comb;         // [T, K, H] act dtype
    u64 dflag, cflag; // [R] u64, written by peers
    u64 state;        // [8] u64, this rank only: 4 epochs, 4 done counters
    u64 slot_of;      // [T, K] i32, this rank only
    u64 send_counts;  // [E] i32, this rank only
    u64 status;       // i32, this rank only
    int El, R, T, H, K, rank;
};

#define EP_SEND 0
#define EP_RECV 1
#define EP_CSEND 2
#define EP_CRECV 3
#define DONE_SEND 4
#define DONE_RECV 5
#define DONE_CSEND 6
#define DONE_CRECV 7

#define LL_THREADS 256
#define MAX_RANKS 16

#if FP8
#define X_BYTES 1
#else
#define X_BYTES 2
#endif

template <typename T> __device__ __forceinline__ T* at(u64 base, u64 off) { return (T*)(base + off); }

__device__ __forceinline__ u64 globaltimer() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ u64 ld_acquire_sys(const u64* p) {
    u64 v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void st_release_sys(u64* p, u64 v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Thread 0 waits until every rank's flag reaches `epoch`; false (status set) on timeout.
// The whole block returns the same answer.
__device__ bool wait_all(const u64* flags, int R, u64 epoch, u64 timeout_ns, int* status) {
    __shared__ int ok;
    if (threadIdx.x == 0) {
        ok = 1;
        const u64 start = globaltimer();
        for (int r = 0; r < R && ok; ++r) {
            while (ld_acquire_sys(flags + r) < epoch) {
                if (globaltimer() - start > timeout_ns) {
                    atomicOr(status, 2);
                    ok = 0;
                    break;
                }
                __nanosleep(64);
            }
        }
    }
    __syncthreads();
    return ok;
}

// True in the last block of the grid to finish (all earlier blocks' writes are visible to it).
__device__ bool last_block(unsigned long long* done) {
    __shared__ int is_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        is_last = atomicAdd(done, 1ull) == (unsigned long long)(gridDim.x - 1);
        if (is_last) {
            *done = 0;  // every block has counted: ready for the next call
            __threadfence_system();
        }
    }
    __syncthreads();
    return is_last;
}

// Grid: ceil(E / 8) blocks of 8 warps, one warp per global expert.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_route(
    const int* __restrict__ ids, int M, int E, LlLayout L, u64 local) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int e = blockIdx.x * (LL_THREADS / 32) + warp;
    if (e >= E) return;
    const int K = L.K;
    int* slot_of = at<int>(local, L.slot_of);
    int base = 0;
    for (int t0 = 0; t0 < M; t0 += 32) {
        const int t = t0 + lane;
        int c = 0;
        if (t < M) {
            for (int k = 0; k < K; ++k) {
                const int id = ids[t * K + k];
                c += id == e;
                if (e == 0 && (id < -1 || id >= E)) atomicOr(at<int>(local, L.status), 4);
            }
        }
        int incl = c;
        for (int o = 1; o < 32; o <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += v;
        }
        if (c) {
            int s = base + incl - c;
            for (int k = 0; k < K; ++k)
                if (ids[t * K + k] == e) slot_of[t * K + k] = s++;
        }
        base += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) {
        at<int>(local, L.send_counts)[e] = base;
        if (base > L.T) atomicOr(at<int>(local, L.status), 8);
    }
}

// Grid: up to one block per token (at least one, so the counts and flag always go out).
// Dynamic shared memory: H bytes + H/128 floats when FP8.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_dispatch_send(
    const u16* __restrict__ x, const int* __restrict__ ids, int M, LlLayout L,
    const u64* __restrict__ peers, u64 local) {
    extern __shared__ __align__(16) u8 sm[];
    const int H = L.H, K = L.K, El = L.El, R = L.R, T = L.T, E = El * R;
    const int tid = threadIdx.x;
    const int* slot_of = at<int>(local, L.slot_of);
    const long long row_bytes = (long long)H * X_BYTES;
    for (int t = blockIdx.x; t < M; t += gridDim.x) {
#if FP8
        // One warp per 128 channels: amax, scale, E4M3 codes into shared memory.
        float* ssc = (float*)(sm + H);
        const int groups = H / 128, warp = tid >> 5, lane = tid & 31;
        for (int g = warp; g < groups; g += LL_THREADS / 32) {
            const uint2 raw = *(const uint2*)(x + (long long)t * H + g * 128 + lane * 4);
            float v[4] = {act_to_f32(raw.x & 0xffff), act_to_f32(raw.x >> 16),
                          act_to_f32(raw.y & 0xffff), act_to_f32(raw.y >> 16)};
            float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
            amax = warp_max(amax);
            float s = fmaxf(amax, 1e-4f) / 448.0f;
#if FP8 == 2
            u32 b = __float_as_uint(s);
            if (b & 0x7fffffu) b = (b & 0xff800000u) + 0x800000u;
            s = __uint_as_float(b);
#endif
            u32 packed = 0;
#pragma unroll
            for (int q = 0; q < 4; ++q) packed |= (u32)f32_to_e4m3(v[q] / s) << (8 * q);
            *(u32*)(sm + g * 128 + lane * 4) = packed;
            if (lane == 0) ssc[g] = s;
        }
        __syncthreads();
        const uint4* src = (const uint4*)sm;
#else
        const uint4* src = (const uint4*)(x + (long long)t * H);
#endif
        for (int k = 0; k < K; ++k) {
            const int g = ids[t * K + k];
            if (g < 0 || g >= E) continue;
            const int slot = slot_of[t * K + k];
            if (slot >= T) continue;  // flagged by ll_route
            const int dst = g / El, e = g % El;
            const u64 base = peers[dst];
            const long long row = ((long long)e * R + L.rank) * T + slot;
            uint4* d = (uint4*)(base + L.stage_x + row * row_bytes);
            for (int i = tid; i < row_bytes / 16; i += LL_THREADS) d[i] = src[i];
#if FP8
            float* ds = at<float>(base, L.stage_scale) + row * (H / 128);
            for (int i = tid; i < H / 128; i += LL_THREADS) ds[i] = ssc[i];
#endif
            if (tid == 0) {
                at<int>(base, L.stage_info)[row] = t;
                at<int>(base, L.stage_slot)[row] = k;
            }
        }
        __syncthreads();
    }
    u64* state = at<u64>(local, L.state);
    if (last_block((unsigned long long*)&state[DONE_SEND])) {
        const int* counts = at<int>(local, L.send_counts);
        for (int i = tid; i < E; i += LL_THREADS) {
            const int dst = i / El, e = i % El;
            at<int>(peers[dst], L.counts)[L.rank * El + e] = min(counts[i], T);
        }
        __syncthreads();
        if (tid == 0) {
            __threadfence_system();
            const u64 epoch = ++state[EP_SEND];
            for (int r = 0; r < R; ++r) st_release_sys(at<u64>(peers[r], L.dflag) + L.rank, epoch);
        }
    }
}

// Grid: El * parts blocks; block (e, part) copies every parts-th row of expert e.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_dispatch_recv(
    LlLayout L, u64 local, u64 timeout_ns, int parts) {
    const int El = L.El, R = L.R, T = L.T, H = L.H, RT = R * T;
    const int tid = threadIdx.x;
    u64* state = at<u64>(local, L.state);
    int* status = at<int>(local, L.status);
    const u64 epoch = state[EP_RECV] + 1;
    if (wait_all(at<u64>(local, L.dflag), R, epoch, timeout_ns, status)) {
        const int e = blockIdx.x % El, part = blockIdx.x / El;
        const int* counts = at<int>(local, L.counts);
        __shared__ int begin[MAX_RANKS + 1], cnt[MAX_RANKS];
        if (tid == 0) {
            int acc = 0;
            for (int r = 0; r < R; ++r) {
                const int c = min(max(counts[r * El + e], 0), T);
                begin[r] = acc;
                cnt[r] = c;
                acc += c;
            }
            begin[R] = acc;
            if (part == 0) {
                at<int>(local, L.masked_m)[e] = acc;
                long long* lr = at<long long>(local, L.layout_range) + (long long)e * R;
                for (int r = 0; r < R; ++r) lr[r] = ((long long)begin[r] << 32) | (long long)cnt[r];
            }
        }
        __syncthreads();
        if (R > 1) {
            const long long row_bytes = (long long)H * X_BYTES;
            const int warp = tid >> 5, lane = tid & 31, warps = LL_THREADS / 32;
            for (int i = part * warps + warp; i < begin[R]; i += parts * warps) {
                int r = 0;
                while (i >= begin[r + 1]) ++r;
                const long long from = ((long long)e * R + r) * T + (i - begin[r]);
                const long long to = (long long)e * RT + i;
                const uint4* s = (const uint4*)(local + L.stage_x + from * row_bytes);
                uint4* d = (uint4*)(local + L.x + to * row_bytes);
                for (int j = lane; j < row_bytes / 16; j += 32) d[j] = s[j];
#if FP8
                const float* ss = at<float>(local, L.stage_scale) + from * (H / 128);
                float* ds = at<float>(local, L.x_scale) + to * (H / 128);
                for (int j = lane; j < H / 128; j += 32) ds[j] = ss[j];
#endif
                if (lane == 0) {
                    at<int>(local, L.src_info)[to] = at<int>(local, L.stage_info)[from];
                    at<int>(local, L.src_slot)[to] = at<int>(local, L.stage_slot)[from];
                }
            }
        }
    }
    if (last_block((unsigned long long*)&state[DONE_RECV]) && tid == 0) state[EP_RECV] = epoch;
}

// Grid: blocks over local experts, a warp per row. y: [El, R*T, H] act dtype.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_combine_send(
    const u16* __restrict__ y, LlLayout L, const u64* __restrict__ peers, u64 local) {
    const int El = L.El, R = L.R, T = L.T, H = L.H, K = L.K, RT = R * T;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, warps = LL_THREADS / 32;
    const int* masked_m = at<int>(local, L.masked_m);
    const long long* lr = at<long long>(local, L.layout_range);
    const int* info = at<int>(local, L.src_info);
    const int* slots = at<int>(local, L.src_slot);
    for (int e = blockIdx.x; e < El; e += gridDim.x) {
        const int rows = min(max(masked_m[e], 0), RT);
        for (int i = warp; i < rows; i += warps) {
            int r = 0;
            for (int q = 0; q < R; ++q) {
                const long long v = lr[(long long)e * R + q];
                const int b = (int)(v >> 32), c = (int)(v & 0xffffffff);
                if (i >= b && i < b + c) r = q;
            }
            const int t = info[(long long)e * RT + i], k = slots[(long long)e * RT + i];
            if (t < 0 || t >= T || k < 0 || k >= K) {
                if (lane == 0) atomicOr(at<int>(local, L.status), 16);
                continue;
            }
            const uint4* s = (const uint4*)(y + ((long long)e * RT + i) * H);
            uint4* d = (uint4*)(peers[r] + L.comb + ((long long)t * K + k) * H * 2);
            for (int j = lane; j < H * 2 / 16; j += 32) d[j] = s[j];
        }
    }
    u64* state = at<u64>(local, L.state);
    if (last_block((unsigned long long*)&state[DONE_CSEND]) && tid == 0) {
        __threadfence_system();
        const u64 epoch = ++state[EP_CSEND];
        for (int r = 0; r < R; ++r) st_release_sys(at<u64>(peers[r], L.cflag) + L.rank, epoch);
    }
}

// Grid: at least one block; block b sums column chunk b % chunks of token b / chunks, two
// columns a thread. Ids outside 0..E were never sent and add nothing.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_combine_recv(
    const int* __restrict__ ids, const float* __restrict__ w, u16* __restrict__ out, int M,
    float scale, int chunks, LlLayout L, u64 local, u64 timeout_ns) {
    const int H = L.H, K = L.K, E = L.El * L.R;
    u64* state = at<u64>(local, L.state);
    const u64 epoch = state[EP_CRECV] + 1;
    if (wait_all(at<u64>(local, L.cflag), L.R, epoch, timeout_ns, at<int>(local, L.status))) {
        const u16* comb = at<u16>(local, L.comb);
        for (int b = blockIdx.x; b < M * chunks; b += gridDim.x) {
            const long long t = b / chunks;
            const int c = (b % chunks) * (2 * LL_THREADS) + threadIdx.x * 2;
            if (c >= H) continue;
            float s0 = 0.0f, s1 = 0.0f;
            for (int k = 0; k < K; ++k) {
                const int id = ids[t * K + k];
                if (id < 0 || id >= E) continue;
                const float wk = w[t * K + k];
                const u32 v = *(const u32*)(comb + (t * K + k) * H + c);
                s0 += wk * act_to_f32((u16)(v & 0xffff));
                s1 += wk * act_to_f32((u16)(v >> 16));
            }
            *(u32*)(out + t * H + c) = (u32)f32_to_act(s0 * scale) | ((u32)f32_to_act(s1 * scale) << 16);
        }
    }
    if (last_block((unsigned long long*)&state[DONE_CRECV]) && threadIdx.x == 0) state[EP_CRECV] = epoch;
}
