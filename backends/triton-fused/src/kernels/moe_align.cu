// Align: groups rows by expert, each expert's rows padded to BLOCK_M, so every BLOCK_M block of
// `sorted_ids` belongs to one expert. One block of 1024 threads: the counts live in shared
// memory, the prefix sum is a single pass over the experts.
//  - moe_align: the (token, slot) pairs of top-k ids; the sentinel is numel.
//  - moe_align_masked: the masked layout [E, rows, H] with masked_m rows per expert: expert e
//    lists rows e*rows + 0..masked_m[e]; the sentinel is E*rows.
//
// Outputs: sorted_ids [max_sorted] (pad = sentinel), expert_ids [max_blocks] (-1 past the end),
// num_post_padded [1].

// Padded exclusive prefix sum of counts[0..E) into offsets[0..E], total in offsets[E] and
// *num_post_padded; then sentinel-fills sorted_ids and writes each block's expert.
__device__ void padded_offsets(const int* counts, int* offsets, int E, int block_m,
                               int* sorted_ids, int* expert_ids, int* num_post_padded,
                               int max_sorted, int max_blocks, int sentinel) {
    const int tid = threadIdx.x, nt = blockDim.x;
    if (tid < 32) {
        // One warp: each lane sums a run of experts, a shuffle scan joins the runs, then each
        // lane writes its run's offsets.
        const int per = (E + 31) / 32, first = tid * per, last = min(first + per, E);
        int run = 0;
        for (int e = first; e < last; ++e) run += (counts[e] + block_m - 1) / block_m * block_m;
        int incl = run;
        for (int o = 1; o < 32; o <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, incl, o);
            if (tid >= o) incl += v;
        }
        int acc = incl - run;
        for (int e = first; e < last; ++e) {
            offsets[e] = acc;
            acc += (counts[e] + block_m - 1) / block_m * block_m;
        }
        if (tid == 31) {
            offsets[E] = incl;
            *num_post_padded = min(incl, max_sorted);
        }
    }
    __syncthreads();
    for (int i = tid; i < max_sorted; i += nt) sorted_ids[i] = sentinel;
    const int used_blocks = min(offsets[E] / block_m, max_blocks);
    for (int b = tid; b < max_blocks; b += nt) {
        int e = -1;
        if (b < used_blocks) {
            // Binary search for the expert whose padded range holds block b.
            int lo = 0, hi = E - 1;
            const int pos = b * block_m;
            while (lo < hi) {
                const int mid = (lo + hi + 1) >> 1;
                if (offsets[mid] <= pos) lo = mid; else hi = mid - 1;
            }
            e = lo;
        }
        expert_ids[b] = e;
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(1024) moe_align(
    const int* __restrict__ topk_ids, int numel, int E, int block_m,
    int* __restrict__ sorted_ids, int* __restrict__ expert_ids, int* __restrict__ num_post_padded,
    int max_sorted, int max_blocks) {
    extern __shared__ int sh[];
    int* counts = sh;          // [E]
    int* offsets = sh + E;     // [E + 1]
    int* cursor = sh + 2 * E + 1; // [E]
    const int tid = threadIdx.x, nt = blockDim.x;
    for (int e = tid; e < E; e += nt) { counts[e] = 0; cursor[e] = 0; }
    __syncthreads();
    for (int i = tid; i < numel; i += nt) {
        const int e = topk_ids[i];
        if (e >= 0 && e < E) atomicAdd(&counts[e], 1);
    }
    __syncthreads();
    padded_offsets(counts, offsets, E, block_m, sorted_ids, expert_ids, num_post_padded,
                   max_sorted, max_blocks, numel);
    for (int i = tid; i < numel; i += nt) {
        const int e = topk_ids[i];
        if (e >= 0 && e < E) sorted_ids[offsets[e] + atomicAdd(&cursor[e], 1)] = i;
    }
}

extern "C" __global__ void __launch_bounds__(1024) moe_align_masked(
    const int* __restrict__ masked_m, int E, int rows, int block_m,
    int* __restrict__ sorted_ids, int* __restrict__ expert_ids, int* __restrict__ num_post_padded,
    int max_sorted, int max_blocks, int* __restrict__ status) {
    extern __shared__ int sh[];
    int* counts = sh;      // [E]
    int* offsets = sh + E; // [E + 1]
    const int tid = threadIdx.x, nt = blockDim.x;
    for (int e = tid; e < E; e += nt) {
        const int c = masked_m[e];
        if (c < 0 || c > rows) atomicOr(status, 1);
        counts[e] = min(max(c, 0), rows);
    }
    __syncthreads();
    padded_offsets(counts, offsets, E, block_m, sorted_ids, expert_ids, num_post_padded,
                   max_sorted, max_blocks, E * rows);
    if (tid == 0 && offsets[E] > max_sorted) atomicOr(status, 1);
    // One warp per expert, lanes along its rows; rows past the capacity are dropped (flagged).
    const int warp = tid >> 5, lane = tid & 31, warps = nt >> 5;
    for (int e = warp; e < E; e += warps) {
        for (int r = lane; r < counts[e]; r += 32) {
            const int pos = offsets[e] + r;
            if (pos < max_sorted) sorted_ids[pos] = e * rows + r;
        }
    }
}
