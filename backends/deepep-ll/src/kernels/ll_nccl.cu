// The NCCL transport of the low-latency all-to-all, for ranks that cannot address each other's
// memory (other machines). Compiled after ll.cu, whose routing, layout and sum it shares: the
// same `ll_route` runs with every peer address pointing at this rank's own set, so the counts
// land only here; NCCL all-gathers them, and these kernels pack the rows into one contiguous
// run of packets per destination before NCCL moves them, and unpack them after.
//
// A dispatch packet: a 16-byte header {token, pick, local expert, slot}, the row as it goes on
// the wire (ROW_BYTES(H)), then its scales (SCALE_WORDS(H) words). Packets to destination d sit in
// run d of `dsend` ([R, TK] packets), ordered by local expert, then by slot (token order); the
// same order arrives in run s of `drecv` from source s. The combine sends the expert output
// rows back in the order their packets came, so `pos_of[t, k]` (the packet's place in the
// source's send runs) is also where the row returns in `crecv`.

struct NcclBufs {
    u64 dsend, drecv;  // [R, TK] dispatch packets of `pbytes`
    u64 csend, crecv;  // [R, TK] rows of H act-dtype values
    u64 pos_of;        // [T, K] i32: pick's packet index in dsend (d * TK + i), or -1
    int tk;            // packets per (source, destination) pair: T * min(K, El)
    int pbytes;        // bytes per dispatch packet (a multiple of 16)
};

#define DONE_NUNPACK 13

// Source s's count for global expert g, as clamped by ll_route (it flags overflows).
__device__ __forceinline__ int count_of(const u64* counts, int s, int E, int g, int T) {
    return min((int)(counts[(long long)s * E + g] & 0xffffffffu), T);
}

// Grid: up to one block per token. Dynamic shared memory: H bytes + H/128 floats when FP8.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_nccl_pack(
    const u16* __restrict__ x, const int* __restrict__ ids, int M, LlLayout L, u64 local, NcclBufs B) {
    extern __shared__ __align__(16) u8 sm[];
    __shared__ long long pos_at[MAX_TOPK];
    __shared__ int4 head_at[MAX_TOPK];
    const int H = L.H, K = L.K, El = L.El, T = L.T, E = El * L.R;
    const int tid = threadIdx.x;
    const u64* counts = at<u64>(local, L.counts);
    const int* slot_of = at<int>(local, L.slot_of);
    const int* prefix = at<int>(local, L.chunk_counts);
    int* pos_of = (int*)B.pos_of;
    const long long row_bytes = ROW_BYTES(H);
    for (int t = blockIdx.x; t < M; t += gridDim.x) {
        if (tid < K) {
            const int pick = __ldg(ids + t * K + tid);
            long long pos = -1;
            int el = 0, slot = 0;
            if (pick >= 0 && pick < E) {
                const int d = pick / El;
                el = pick % El;
                slot = slot_of[t * K + tid] + prefix[(t / L.chunk) * E + pick];
                if (slot < T) {
                    int before = 0;
                    for (int e = 0; e < el; ++e) before += count_of(counts, L.rank, E, d * El + e, T);
                    pos = (long long)d * B.tk + before + slot;
                }
            }
            pos_at[tid] = pos;
            head_at[tid] = make_int4(t, tid, el, slot);
            pos_of[t * K + tid] = (int)pos;
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
        __syncthreads();
        for (int k = 0; k < K; ++k) {
            const long long pos = pos_at[k];
            if (pos < 0) continue;
            u8* packet = (u8*)B.dsend + pos * B.pbytes;
            if (tid == 0) *(int4*)packet = head_at[k];
            copy16((uint4*)(packet + 16), src, (int)(row_bytes / 16), tid, LL_THREADS, ld);
#if FP8
            u32* ds = (u32*)(packet + 16 + row_bytes);
            for (int i = tid; i < SCALE_WORDS(H); i += LL_THREADS) ds[i] = ssc[i];
#endif
        }
        __syncthreads();
    }
}

// Packets source s sent this rank: the sum of its counts for this rank's experts. By the whole
// block; every thread gets the answer.
__device__ int packets_from(const u64* counts, const LlLayout& L, int s) {
    __shared__ int n;
    const int E = L.El * L.R;
    if (threadIdx.x == 0) n = 0;
    __syncthreads();
    int mine = 0;
    for (int e = threadIdx.x; e < L.El; e += LL_THREADS) mine += count_of(counts, s, E, L.rank * L.El + e, L.T);
    if (mine) atomicAdd(&n, mine);
    __syncthreads();
    const int v = n;
    __syncthreads();
    return v;
}

// The row of [El, R*T] that packet `h` from source s fills: after the rows of lower sources for
// the same expert; -1 for a header out of range.
__device__ long long row_of(const u64* counts, const LlLayout& L, int s, int4 h) {
    const int E = L.El * L.R, RT = L.R * L.T;
    if (h.z < 0 || h.z >= L.El || h.w < 0) return -1;
    int r = h.w;
    for (int q = 0; q < s; ++q) r += count_of(counts, q, E, L.rank * L.El + h.z, L.T);
    return r < RT ? (long long)h.z * RT + r : -1;
}

// Grid: (blocks, R); block (b, s) places source s's packets b, b + blocks, ... into the masked
// layout; the last block writes masked_m and layout_range.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_nccl_unpack(
    LlLayout L, u64 local, NcclBufs B, u64 timeout_ns) {
    __shared__ long long row;
    __shared__ int4 head;
    const int H = L.H, s = blockIdx.y, tid = threadIdx.x;
    const u64* counts = at<u64>(local, L.counts);
    const long long row_bytes = ROW_BYTES(H);
    const int n = packets_from(counts, L, s);
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const u8* packet = (const u8*)B.drecv + ((long long)s * B.tk + i) * B.pbytes;
        if (tid == 0) {
            head = *(const int4*)packet;
            row = row_of(counts, L, s, head);
            if (row < 0 || head.x < 0 || head.x >= L.T || head.y < 0 || head.y >= L.K) {
                atomicOr(at<int>(local, L.status), 16);
                row = -1;
            }
        }
        __syncthreads();
        if (row >= 0) {
            copy16((uint4*)(local + L.x + row * row_bytes), (const uint4*)(packet + 16), (int)(row_bytes / 16), tid,
                   LL_THREADS, LdPlain());
#if FP8
            const u32* ss = (const u32*)(packet + 16 + row_bytes);
            u32* ds = at<u32>(local, L.x_scale) + row * SCALE_WORDS(H);
            for (int j = tid; j < SCALE_WORDS(H); j += LL_THREADS) ds[j] = ss[j];
#endif
            if (tid == 0) {
                at<int>(local, L.src_info)[row] = head.x;
                at<int>(local, L.src_slot)[row] = head.y;
            }
        }
        __syncthreads();
    }
    if (last_block((unsigned long long*)&at<u64>(local, L.state)[DONE_NUNPACK], false))
        write_layout(L, local, tid, LL_THREADS, timeout_ns);
}

// Grid: (blocks, R); block (b, s) copies the expert output rows of source s's packets b,
// b + blocks, ... (from y, [El, R*T, H]) into run s of csend, in the order the packets came.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_nccl_combine_pack(
    const u16* __restrict__ y, LlLayout L, u64 local, NcclBufs B) {
    __shared__ long long row;
    const int H = L.H, s = blockIdx.y, tid = threadIdx.x;
    const u64* counts = at<u64>(local, L.counts);
    const int n = packets_from(counts, L, s);
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const long long at_i = (long long)s * B.tk + i;
        if (tid == 0) row = row_of(counts, L, s, *(const int4*)((const u8*)B.drecv + at_i * B.pbytes));
        __syncthreads();
        if (row >= 0)
            copy16((uint4*)B.csend + at_i * H * 2 / 16, (const uint4*)(y + row * H), H * 2 / 16, tid, LL_THREADS,
                   LdRo());
        __syncthreads();
    }
}

// Where pick k of token t came back to: row pos_of[t, k] of crecv.
struct NcclSlots {
    const u16* crecv;
    const int* pos_of;
    int H, K;
    __device__ __forceinline__ const u16* operator()(long long t, int k) const {
        const int p = pos_of[t * K + k];
        return p < 0 ? nullptr : crecv + (long long)p * H;
    }
};

// out[t] = scale * sum_k w[t,k] * y[t,k] from the rows NCCL brought back.
extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_nccl_combine_sum(
    const int* __restrict__ ids, const float* __restrict__ w, u16* __restrict__ out, int M, float scale,
    LlLayout L, NcclBufs B) {
    combine_sum(ids, w, out, M, scale, L, NcclSlots{(const u16*)B.crecv, (const int*)B.pos_of, L.H, L.K});
}
