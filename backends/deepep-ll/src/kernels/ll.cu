// DeepEP-style low-latency all-to-all over memory every rank can address (its own buffers and
// its peers', mapped by peer access or CUDA IPC). Every rank holds the same buffer-set layout
// (`LlLayout`, byte offsets from a set's base); `peers[r]` is rank r's base as this rank sees it.
//
// Dispatch (one buffer set per call, two alternating):
//  - ll_route: the slot of each (token, k) among this rank's tokens routed to its expert, in
//    token order (a warp per expert and chunk of tokens), and the count per expert published
//    to every rank, tagged with the call's epoch (by the expert's warp when the batch is one
//    chunk, else by the last block after the chunk prefix sums). Ids outside -1..E are flagged
//    and skipped.
//  - ll_dispatch_send: reads each token once (cast to E4M3 per 128 channels when FP8), waits
//    for the counts lower ranks publish for its experts, so it knows where its rows start
//    (after theirs), and writes the token straight into its final row [e_local][begin + slot]
//    on the expert's rank; the last block releases this rank's data flag everywhere.
//  - ll_dispatch_recv: waits for every rank's data, writes masked_m and layout_range (or the
//    send kernel's last block does, when the receive half is not split off).
// Combine (ll_combine, send and receive halves in one launch or two):
//  - send: each expert output row goes to its source rank's [T, K, H] slot; the last block
//    releases this rank's combine flag on every rank;
//  - receive: waits for every rank, then out[t] = scale * sum_k w[t,k] * y[t,k].
//
// Flags carry epochs that count calls per buffer set, kept in device memory, so a captured
// CUDA graph can be replayed: every kernel reads and advances its own epoch. A set is reused
// two calls later, after its combine, which every rank finishes only once every rank has read
// the set's dispatch. Waits give up after `timeout_ns` and set the status word. Status bits:
// 2 timeout, 4 expert id out of range, 8 more rows for one expert than max tokens per rank,
// 16 a combine row names a token or slot outside the batch.
//
// Compile-time parameters: ACT_F16 (activation dtype), FP8 (0 bf16/f16 on the wire, 1 E4M3
// with f32 scales, 2 E4M3 with scales rounded up to powers of two (UE8M0), 3 NVFP4: E2M1
// codes with E4M3 scales per 16 values over the global scale in the layout).

struct LlLayout {
    u64 x, x_scale, src_info, src_slot; // received rows [El, R*T, ...]
    u64 counts;       // [R, E] u64: every source rank's per-expert count, tagged with the call's
                      // epoch (epoch << 32 | count), written by the sources
    u64 masked_m;     // [El] i32
    u64 layout_range; // [El, R] i64
    u64 comb;         // [T, K, H] act dtype
    u64 dflag, cflag; // [R] u64 each: data and combine flags, written by peers
    u64 state;        // [16] u64, this rank only: epochs and done counters
    u64 slot_of;      // [T, K] i32, this rank only: slot within the token chunk
    u64 chunk_counts; // [MAX_CHUNKS, E] i32, this rank only: counts, then exclusive prefixes
    u64 status;       // i32, this rank only
    int El, R, T, H, K, rank, chunk;  // chunk: tokens per routing chunk (a multiple of 32)
    unsigned gs_bits;                 // the NVFP4 wire's global scale, as f32 bits
};

#define EP_COUNT 0
#define EP_SEND 1
#define EP_RECV 2
#define EP_CSEND 3
#define EP_CRECV 4
#define DONE_ROUTE 8
#define DONE_SEND 9
#define DONE_RECV 10
#define DONE_CSEND 11
#define DONE_CRECV 12

#define LL_THREADS 256
#define MAX_RANKS 16
#define MAX_CHUNKS 16
#define MAX_TOPK 32
// 16-byte chunks of a bf16 row each thread loads before quantizing them (a pass covers 8192
// channels).
#define QUANT_CHUNKS 4

// Bytes of a row on the wire, and its scales in 4-byte words (they follow the row in shared
// memory and in packets).
#if FP8 == 3
#define ROW_BYTES(h) ((long long)(h) / 2)
#define SCALE_WORDS(h) ((h) / 64)
#elif FP8
#define ROW_BYTES(h) ((long long)(h))
#define SCALE_WORDS(h) ((h) / 128)
#else
#define ROW_BYTES(h) ((long long)(h) * 2)
#define SCALE_WORDS(h) 0
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

// Copies n16 16-byte chunks, thread `lane` of `step` threads taking every step-th, eight loads
// in flight before their stores (a dependent load-store loop would expose the memory or
// NVLink latency once per chunk). `Ld` reads one chunk.
template <typename Ld>
__device__ __forceinline__ void copy16(uint4* __restrict__ d, const uint4* __restrict__ s, int n16,
                                       int lane, int step, Ld ld) {
    for (int j0 = lane; j0 < n16; j0 += 8 * step) {
        uint4 v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u)
            if (j0 + u * step < n16) v[u] = ld(s + j0 + u * step);
#pragma unroll
        for (int u = 0; u < 8; ++u)
            if (j0 + u * step < n16) d[j0 + u * step] = v[u];
    }
}
// Reads data no kernel writes while this one runs (inputs, the runner's outputs).
struct LdRo {
    __device__ __forceinline__ uint4 operator()(const uint4* p) const { return __ldg(p); }
};
// Reads shared memory, or data peers wrote before the flag this block acquired.
struct LdPlain {
    __device__ __forceinline__ uint4 operator()(const uint4* p) const { return *p; }
};

// Waits for a count tagged with `epoch` or later (a source publishes each expert's count as
// soon as it is known, with no flag behind it); the count, or 0 with the status set on timeout.
__device__ int tagged_count(const u64* p, u64 epoch, u64 timeout_ns, int* status) {
    const u64 start = globaltimer();
    u64 v;
    for (unsigned n = 1; ((v = ld_acquire_sys(p)) >> 32) < epoch; ++n) {
        // The timer is a slow read: looked at every 64 polls.
        if (n % 64 == 0 && globaltimer() - start > timeout_ns) {
            atomicOr(status, 2);
            return 0;
        }
        __nanosleep(32);
    }
    return (int)(v & 0xffffffffu);
}

// Thread 0 waits until every rank's flag reaches `epoch`; false (status set) on timeout.
// The whole block returns the same answer.
__device__ bool wait_all(const u64* flags, int R, u64 epoch, u64 timeout_ns, int* status) {
    __shared__ int ok;
    if (threadIdx.x == 0) {
        ok = 1;
        const u64 start = globaltimer();
        for (int r = 0; r < R && ok; ++r) {
            for (unsigned n = 1; ld_acquire_sys(flags + r) < epoch; ++n) {
                // The timer is a slow read: looked at every 64 polls.
                if (n % 64 == 0 && globaltimer() - start > timeout_ns) {
                    atomicOr(status, 2);
                    ok = 0;
                    break;
                }
                __nanosleep(32);
            }
        }
    }
    __syncthreads();
    return ok;
}

// True in the last block of the grid to finish. With `sys`, every block's earlier writes
// (to peers too) are visible system-wide before the last block goes on; otherwise on this GPU.
__device__ bool last_block(unsigned long long* done, bool sys) {
    __shared__ int is_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        if (sys) __threadfence_system(); else __threadfence();
        is_last = atomicAdd(done, 1ull) == (unsigned long long)(gridDim.x * gridDim.y - 1);
        if (is_last) {
            *done = 0;  // every block has counted: ready for the next call
            if (sys) __threadfence_system(); else __threadfence();
        }
    }
    __syncthreads();
    return is_last;
}

#if FP8 == 3
// One bf16 row to NVFP4 in `sm`: packed E2M1 codes (H/2 bytes), then the E4M3 scale of each
// 16 values (H/16 bytes), over global scale gs; a thread per block of 16.
__device__ void quantize_row(const u16* __restrict__ x, u8* sm, int H, int tid, float gs) {
    for (int b = tid; b < H / 16; b += LL_THREADS) {
        float v[16], s;
        load16(x + b * 16, v);
        const u8 sf = nvfp4_scale(v, gs, &s);
        uint2 p = {0u, 0u};
        if (s != 0.0f) {
            const E2m1Scaled g = e2m1_scaled(s);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                p.x |= nvfp4_code(v[i], gs, g) << (4 * i);
                p.y |= nvfp4_code(v[i + 8], gs, g) << (4 * i);
            }
        }
        *(uint2*)(sm + b * 8) = p;
        sm[H / 2 + b] = sf;
    }
}
#elif FP8
// One bf16 row to E4M3 codes in `sm` (H bytes) and its per-128 scales after them (H/128 floats),
// by the whole block. Sixteen threads per 128 channels, eight values each: every load of the
// row is issued before any is used, then amax (a 16-lane reduction), scale, codes.
__device__ void quantize_row(const u16* __restrict__ x, u8* sm, int H, int tid, float) {
    float* ssc = (float*)(sm + H);
    const uint4* row = (const uint4*)x;
    const int chunks = H / 8;  // 16-byte chunks of the bf16 row
    for (int base = 0; base < chunks; base += QUANT_CHUNKS * LL_THREADS) {
        uint4 raw[QUANT_CHUNKS];
#pragma unroll
        for (int u = 0; u < QUANT_CHUNKS; ++u) {
            const int c = base + tid + u * LL_THREADS;
            if (c < chunks) raw[u] = __ldg(row + c);
        }
#pragma unroll
        for (int u = 0; u < QUANT_CHUNKS; ++u) {
            // Whole 16-lane groups are in or out (H is a multiple of 128), so the shuffles
            // below always run on full warps.
            const int c = base + tid + u * LL_THREADS;
            float v[8];
            const u32 w[4] = {raw[u].x, raw[u].y, raw[u].z, raw[u].w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                v[2 * q] = act_to_f32((u16)(w[q] & 0xffff));
                v[2 * q + 1] = act_to_f32((u16)(w[q] >> 16));
            }
            float amax = 0.0f;
#pragma unroll
            for (int q = 0; q < 8; ++q) amax = fmaxf(amax, fabsf(v[q]));
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            if (c < chunks) {
                float s = fmaxf(amax, 1e-4f) / 448.0f;
#if FP8 == 2
                u32 b = __float_as_uint(s);
                if (b & 0x7fffffu) b = (b & 0xff800000u) + 0x800000u;
                s = __uint_as_float(b);
#endif
                uint2 packed = {0u, 0u};
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    packed.x |= (u32)f32_to_e4m3(v[q] / s) << (8 * q);
                    packed.y |= (u32)f32_to_e4m3(v[q + 4] / s) << (8 * q);
                }
                *(uint2*)(sm + c * 8) = packed;
                if ((c & 15) == 0) ssc[c >> 4] = s;
            }
        }
    }
}
#endif

// Grid: (ceil(E / 8), chunks) blocks of 8 warps; warp (e, c) ranks expert e's picks among the
// tokens of chunk c, in token order (a token's duplicate picks in slot order).
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_route(
    const int* __restrict__ ids, int M, int E, LlLayout L, const u64* __restrict__ peers,
    u64 local) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tid = threadIdx.x;
    const int e = blockIdx.x * (LL_THREADS / 32) + warp, c = blockIdx.y;
    const int K = L.K;
    int* chunk_counts = at<int>(local, L.chunk_counts);
    u64* state = at<u64>(local, L.state);
    const u64 epoch = state[EP_COUNT] + 1;
    const bool one_chunk = gridDim.y == 1;
    if (e < E) {
        int* slot_of = at<int>(local, L.slot_of);
        int base = 0;
        const int t_end = min(M, (c + 1) * L.chunk);
        for (int t0 = c * L.chunk; t0 < t_end; t0 += 32) {
            const int t = t0 + lane;
            int id[MAX_TOPK];
            int cnt = 0;
#pragma unroll
            for (int k = 0; k < MAX_TOPK; ++k) {
                id[k] = (k < K && t < t_end) ? __ldg(ids + t * K + k) : -1;
                cnt += id[k] == e;
                if (e == 0 && (id[k] < -1 || id[k] >= E)) atomicOr(at<int>(local, L.status), 4);
            }
            int incl = cnt;
            for (int o = 1; o < 32; o <<= 1) {
                const int v = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += v;
            }
            if (cnt) {
                int s = base + incl - cnt;
#pragma unroll
                for (int k = 0; k < MAX_TOPK; ++k)
                    if (id[k] == e) slot_of[t * K + k] = s++;
            }
            base += __shfl_sync(0xffffffffu, incl, 31);
        }
        if (lane == 0 && one_chunk) {
            // The whole batch in one chunk: this warp's count is the expert's total; publish it.
            chunk_counts[e] = 0;
            if (base > L.T) atomicOr(at<int>(local, L.status), 8);
            const u64 tagged = (epoch << 32) | (u64)min(base, L.T);
            for (int r = 0; r < L.R; ++r) st_release_sys(at<u64>(peers[r], L.counts) + L.rank * E + e, tagged);
        } else if (lane == 0) {
            chunk_counts[c * E + e] = base;
        }
    }
    if (last_block((unsigned long long*)&state[DONE_ROUTE], false)) {
        if (!one_chunk) {
            // Per expert: chunk counts to exclusive prefixes, the total to every rank.
            for (int g = tid; g < E; g += LL_THREADS) {
                int acc = 0;
                for (int q = 0; q < gridDim.y; ++q) {
                    const int v = chunk_counts[q * E + g];
                    chunk_counts[q * E + g] = acc;
                    acc += v;
                }
                if (acc > L.T) atomicOr(at<int>(local, L.status), 8);
                const u64 tagged = (epoch << 32) | (u64)min(acc, L.T);
                for (int r = 0; r < L.R; ++r) st_release_sys(at<u64>(peers[r], L.counts) + L.rank * E + g, tagged);
            }
        }
        if (tid == 0) state[EP_COUNT] = epoch;
    }
}

// masked_m and layout_range of every local expert from the counts every rank sent, by the
// threads of one block (expert e at thread e, striding).
__device__ void write_layout(const LlLayout& L, u64 local, int first, int step, u64 timeout_ns) {
    const int El = L.El, R = L.R, T = L.T, E = El * R;
    const u64* counts = at<u64>(local, L.counts);
    const u64 epoch = at<u64>(local, L.state)[EP_COUNT];
    int* status = at<int>(local, L.status);
    for (int e = first; e < El; e += step) {
        const int g = L.rank * El + e;
        long long* lr = at<long long>(local, L.layout_range) + (long long)e * R;
        int acc = 0;
        for (int r = 0; r < R; ++r) {
            const int c = min(max(tagged_count(counts + r * E + g, epoch, timeout_ns, status), 0), T);
            lr[r] = ((long long)acc << 32) | (long long)c;
            acc += c;
        }
        at<int>(local, L.masked_m)[e] = acc;
    }
}

// Grid: up to one block per token (at least one, so the flag always goes out).
// Dynamic shared memory: H bytes + H/128 floats when FP8. With `fuse_recv` the last block also
// waits for every rank's rows and writes the layout (the receive half, without a launch).
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_dispatch_send(
    const u16* __restrict__ x, const int* __restrict__ ids, int M, LlLayout L,
    const u64* __restrict__ peers, u64 local, u64 timeout_ns, int fuse_recv) {
    extern __shared__ __align__(16) u8 sm[];
    __shared__ u64 row_at[MAX_TOPK];  // row of each pick on its rank, or ~0
    __shared__ int rank_of[MAX_TOPK];
    const int H = L.H, K = L.K, El = L.El, R = L.R, T = L.T, E = El * R, RT = R * T;
    const int tid = threadIdx.x;
    u64* state = at<u64>(local, L.state);
    int* status = at<int>(local, L.status);
    const u64* counts = at<u64>(local, L.counts);
    const u64 epoch = state[EP_COUNT];
    const int* slot_of = at<int>(local, L.slot_of);
    const int* prefix = at<int>(local, L.chunk_counts);
    const long long row_bytes = ROW_BYTES(H);
    for (int t = blockIdx.x; t < M; t += gridDim.x) {
        // Thread k < K: pick k's expert and its slot among this rank's rows for it, loaded
        // before the cast so their latency hides under it.
        int pick = -1, slot = 0;
        if (tid < K) {
            pick = __ldg(ids + t * K + tid);
            if (pick >= 0 && pick < E) slot = slot_of[t * K + tid] + prefix[(t / L.chunk) * E + pick];
        }
#if FP8
        quantize_row(x + (long long)t * H, sm, H, tid, __uint_as_float(L.gs_bits));
        const u32* ssc = (const u32*)(sm + row_bytes);
        const uint4* src = (const uint4*)sm;
        const LdPlain ld;
#else
        const uint4* src = (const uint4*)(x + (long long)t * H);
        const LdRo ld;
#endif
        if (tid < K) {
            u64 off = ~0ull;
            int dst = 0;
            if (pick >= 0 && pick < E) {
                dst = pick / El;
                // After the rows lower ranks send to the same expert: their counts, waited for
                // one by one (the cast above overlaps their arrival).
                for (int s = 0; s < L.rank; ++s) slot += tagged_count(counts + s * E + pick, epoch, timeout_ns, status);
                // Rows past the buffer were flagged by ll_route.
                if (slot < RT) off = (u64)(pick % El) * RT + slot;
            }
            row_at[tid] = off;
            rank_of[tid] = dst;
        }
        __syncthreads();
        for (int k = 0; k < K; ++k) {
            const u64 row = row_at[k];
            if (row == ~0ull) continue;
            const u64 base = peers[rank_of[k]];
            copy16((uint4*)(base + L.x + row * row_bytes), src, (int)(row_bytes / 16), tid, LL_THREADS, ld);
#if FP8
            u32* ds = at<u32>(base, L.x_scale) + row * SCALE_WORDS(H);
            for (int i = tid; i < SCALE_WORDS(H); i += LL_THREADS) ds[i] = ssc[i];
#endif
            if (tid == 0) {
                at<int>(base, L.src_info)[row] = t;
                at<int>(base, L.src_slot)[row] = k;
            }
        }
        __syncthreads();
    }
    if (last_block((unsigned long long*)&state[DONE_SEND], true)) {
        if (tid == 0) {
            const u64 epoch = ++state[EP_SEND];
            for (int r = 0; r < R; ++r) st_release_sys(at<u64>(peers[r], L.dflag) + L.rank, epoch);
        }
        if (fuse_recv) {
            const u64 epoch = state[EP_RECV] + 1;
            if (wait_all(at<u64>(local, L.dflag), R, epoch, timeout_ns, status)) write_layout(L, local, tid, LL_THREADS, timeout_ns);
            if (tid == 0) state[EP_RECV] = epoch;
        }
    }
}

// The receive half on its own (split mode). Grid: blocks striding over local experts.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_dispatch_recv(
    LlLayout L, u64 local, u64 timeout_ns) {
    u64* state = at<u64>(local, L.state);
    const u64 epoch = state[EP_RECV] + 1;
    if (wait_all(at<u64>(local, L.dflag), L.R, epoch, timeout_ns, at<int>(local, L.status)))
        write_layout(L, local, blockIdx.x * LL_THREADS + threadIdx.x, gridDim.x * LL_THREADS, timeout_ns);
    if (last_block((unsigned long long*)&state[DONE_RECV], false) && threadIdx.x == 0) state[EP_RECV] = epoch;
}

// Sends every expert output row of y ([El, R*T, H] act dtype) to its source rank's [T, K, H]
// slot: blocks stride over local experts, a warp per row.
__device__ void combine_rows(const u16* __restrict__ y, const LlLayout& L, const u64* __restrict__ peers,
                             u64 local) {
    const int El = L.El, R = L.R, T = L.T, H = L.H, K = L.K, RT = R * T;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, warps = LL_THREADS / 32;
    __shared__ int begin[MAX_RANKS + 1];
    __shared__ u64 base_of[MAX_RANKS];
    const int* masked_m = at<int>(local, L.masked_m);
    const long long* lr = at<long long>(local, L.layout_range);
    const int* info = at<int>(local, L.src_info);
    const int* slots = at<int>(local, L.src_slot);
    for (int e = blockIdx.x; e < El; e += gridDim.x) {
        if (tid < R) {
            begin[tid] = (int)(lr[(long long)e * R + tid] >> 32);
            base_of[tid] = peers[tid];
        }
        if (tid == 0) begin[R] = min(max(masked_m[e], 0), RT);
        __syncthreads();
        const int rows = begin[R];
        for (int i = warp; i < rows; i += warps) {
            const int t = info[(long long)e * RT + i], k = slots[(long long)e * RT + i];
            int r = 0;
            while (r + 1 < R && i >= begin[r + 1]) ++r;
            if (t < 0 || t >= T || k < 0 || k >= K) {
                if (lane == 0) atomicOr(at<int>(local, L.status), 16);
                continue;
            }
            const uint4* s = (const uint4*)(y + ((long long)e * RT + i) * H);
            uint4* d = (uint4*)(base_of[r] + L.comb + ((long long)t * K + k) * H * 2);
            copy16(d, s, H * 2 / 16, lane, 32, LdRo());
        }
        __syncthreads();
    }
}

// Where pick k of token t came back to: the [T, K, H] slots peers write into.
struct CombSlots {
    const u16* comb;
    int H, K;
    __device__ __forceinline__ const u16* operator()(long long t, int k) const { return comb + (t * K + k) * H; }
};

// out[t] = scale * sum_k w[t,k] * row(t,k) over (token, 2048-column chunk) items striding over
// the grid, eight columns a thread. Ids outside 0..E were never sent and add nothing; `row`
// may also answer null for a pick that was not sent.
template <typename Rows>
__device__ void combine_sum(const int* __restrict__ ids, const float* __restrict__ w, u16* __restrict__ out,
                            int M, float scale, const LlLayout& L, Rows rows) {
    const int H = L.H, K = L.K, E = L.El * L.R;
    const int chunks = (H + 8 * LL_THREADS - 1) / (8 * LL_THREADS);
    for (int b = blockIdx.x; b < M * chunks; b += gridDim.x) {
        const long long t = b / chunks;
        const int c = ((b % chunks) * LL_THREADS + threadIdx.x) * 8;
        if (c >= H) continue;
        float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        // Slots in runs of eight: the run's loads are all issued before they are summed.
        for (int k0 = 0; k0 < K; k0 += 8) {
            uint4 v[8];
            float wk[8];
            bool on[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const int k = k0 + u;
                const int id = k < K ? __ldg(ids + t * K + k) : -1;
                const u16* row = (id >= 0 && id < E) ? rows(t, k) : nullptr;
                on[u] = row != nullptr;
                wk[u] = on[u] ? __ldg(w + t * K + k) : 0.0f;
                if (on[u]) v[u] = *(const uint4*)(row + c);
            }
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                if (!on[u]) continue;
                const u32 q[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    s[2 * j] += wk[u] * act_to_f32((u16)(q[j] & 0xffff));
                    s[2 * j + 1] += wk[u] * act_to_f32((u16)(q[j] >> 16));
                }
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

// mode 1: send the rows (the last block releases this rank's combine flag everywhere);
// mode 2: wait for every rank and sum; mode 3: both in one launch, whose blocks must all be
// resident at once (the grid is at most one block per SM), as every block waits in the middle.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_combine(
    const u16* __restrict__ y, const int* __restrict__ ids, const float* __restrict__ w,
    u16* __restrict__ out, int M, float scale, LlLayout L, const u64* __restrict__ peers, u64 local,
    u64 timeout_ns, int mode) {
    u64* state = at<u64>(local, L.state);
    if (mode & 1) {
        combine_rows(y, L, peers, local);
        if (last_block((unsigned long long*)&state[DONE_CSEND], true) && threadIdx.x == 0) {
            const u64 epoch = ++state[EP_CSEND];
            for (int r = 0; r < L.R; ++r) st_release_sys(at<u64>(peers[r], L.cflag) + L.rank, epoch);
        }
    }
    if (mode & 2) {
        const u64 epoch = state[EP_CRECV] + 1;
        if (wait_all(at<u64>(local, L.cflag), L.R, epoch, timeout_ns, at<int>(local, L.status)))
            combine_sum(ids, w, out, M, scale, L, CombSlots{at<u16>(local, L.comb), L.H, L.K});
        if (last_block((unsigned long long*)&state[DONE_CRECV], false) && threadIdx.x == 0)
            state[EP_CRECV] = epoch;
    }
}
