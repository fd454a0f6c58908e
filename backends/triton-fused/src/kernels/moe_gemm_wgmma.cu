// The grouped GEMM of moe_gemm.cu on Hopper's warpgroup tensor cores (wgmma, sm_90a), for
// blocks of 64 or 128 rows: each warpgroup of 128 threads computes 64 rows x BLOCK_N. Operand
// tiles are K-major, 128 bytes of K per row, stored with the 128-byte swizzle the wgmma
// descriptors name, filled by a cp.async pipeline (rows gathered through the sorted ids).
// `wgmma_tile` (one m64 x BLOCK_N x 32-byte-K product) is generated per BLOCK_N and element
// type by the host and prepended to this source.
//
// Compile-time parameters: BLOCK_M (64, 128), BLOCK_N (64, 128, 256), NUM_STAGES, GROUP_M,
// ELEM, A_SCALE, B_SCALE, ACT_F16 as in moe_gemm.cu; BLOCK_K_BYTES is 128.

#define WARPGROUPS (BLOCK_M / 64)
#define NUM_THREADS (WARPGROUPS * 128)
#define TILE_A (BLOCK_M * 128)
#define TILE_B (BLOCK_N * 128)
#define STAGE_BYTES (TILE_A + TILE_B)
#define NACC (BLOCK_N / 2)

#if ELEM == 2
#define ELEM_BYTES 1
#else
#define ELEM_BYTES 2
#endif

extern "C" __global__ void __launch_bounds__(NUM_THREADS) moe_gemm(
    const u8* __restrict__ A, const u8* __restrict__ B, u16* __restrict__ C,
    const float* __restrict__ a_scale, const float* __restrict__ b_scale,
    const float* __restrict__ topk_weights, const int* __restrict__ sorted_ids,
    const int* __restrict__ expert_ids, const int* __restrict__ num_post_padded,
    int N, int K, int numel, int a_row_div, int mul_weight, int num_m_blocks) {
    extern __shared__ __align__(16) u8 smem_raw[];
    __shared__ int s_row[BLOCK_M];
    __shared__ int s_id[BLOCK_M];
    // Swizzled tiles must start on 1024-byte boundaries of the shared window.
    const u32 raw = smem_addr(smem_raw);
    const u32 pad = (1024u - (raw & 1023u)) & 1023u;
    u8* smem = smem_raw + pad;
    const u32 sbase = raw + pad;

    const int num_n_blocks = (N + BLOCK_N - 1) / BLOCK_N;
    const int pid = blockIdx.x;
    const int in_group = GROUP_M * num_n_blocks;
    const int group = pid / in_group;
    const int first_m = group * GROUP_M;
    const int group_size = min(num_m_blocks - first_m, GROUP_M);
    const int pid_m = first_m + ((pid % in_group) % group_size);
    const int pid_n = (pid % in_group) / group_size;
    if (pid_m * BLOCK_M >= *num_post_padded) return;
    const int expert = expert_ids[pid_m];
    if (expert < 0) return;
    const int m0 = pid_m * BLOCK_M, n0 = pid_n * BLOCK_N;
    const int tid = threadIdx.x, lane = tid & 31;
    const int wg = tid >> 7, wi = (tid >> 5) & 3;
    const int g = lane >> 2, t4 = lane & 3;

    for (int r = tid; r < BLOCK_M; r += NUM_THREADS) {
        const int id = sorted_ids[m0 + r];
        s_id[r] = id < numel ? id : -1;
        s_row[r] = id < numel ? id / a_row_div : -1;
    }
    __syncthreads();

    const long long k_bytes = (long long)K * ELEM_BYTES;
    const int KT = (int)((k_bytes + 127) / 128);
    const u8* Bexp = B + (long long)expert * N * k_bytes;

    auto load_stage = [&](int slot, int kt) {
        u8* as = smem + slot * STAGE_BYTES;
        u8* bs = as + TILE_A;
        const long long kb = (long long)kt * 128;
        for (int c = tid; c < BLOCK_M * 8; c += NUM_THREADS) {
            const int r = c >> 3, ch = c & 7;
            const long long off = kb + ch * 16;
            const int row = s_row[r];
            const bool ok = row >= 0 && off < k_bytes;
            cp_async16(as + r * 128 + ((ch ^ (r & 7)) << 4), ok ? A + (long long)row * k_bytes + off : A, ok ? 16 : 0);
        }
        for (int c = tid; c < BLOCK_N * 8; c += NUM_THREADS) {
            const int r = c >> 3, ch = c & 7;
            const long long off = kb + ch * 16;
            const bool ok = (n0 + r) < N && off < k_bytes;
            cp_async16(bs + r * 128 + ((ch ^ (r & 7)) << 4), ok ? Bexp + (long long)(n0 + r) * k_bytes + off : B, ok ? 16 : 0);
        }
    };

#if A_SCALE == 3
    const int k_groups = (K + 127) / 128;
    const int n_groups = (N + 127) / 128;
    float* s_ascale = (float*)(smem + NUM_STAGES * STAGE_BYTES);
    float* s_bscale = s_ascale + BLOCK_M * k_groups;
    for (int x = tid; x < BLOCK_M * k_groups; x += NUM_THREADS) {
        const int row = s_row[x / k_groups];
        s_ascale[x] = row >= 0 ? a_scale[(long long)row * k_groups + x % k_groups] : 0.0f;
    }
    for (int x = tid; x < k_groups; x += NUM_THREADS)
        s_bscale[x] = b_scale[((long long)expert * n_groups + n0 / 128) * k_groups + x];
    float part[NACC];
#pragma unroll
    for (int j = 0; j < NACC; ++j) part[j] = 0.0f;
#endif

    float acc[NACC];
#pragma unroll
    for (int j = 0; j < NACC; ++j) acc[j] = 0.0f;

#pragma unroll
    for (int s = 0; s < NUM_STAGES - 1; ++s) {
        if (s < KT) load_stage(s, s);
        cp_async_commit();
    }

    const int r0 = wg * 64 + wi * 16 + g;  // this thread's accumulator rows: r0 and r0 + 8
#if A_SCALE == 3
    // Block-scaled FP8: each tile's products are folded with their scales as soon as they
    // complete, so a tile waits for its own wgmma before the next one is issued.
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<NUM_STAGES - 2>();
        // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        {
            const int nk = kt + NUM_STAGES - 1;
            if (nk < KT) load_stage(nk % NUM_STAGES, nk);
            cp_async_commit();
        }
        const u32 stage = sbase + (kt % NUM_STAGES) * STAGE_BYTES;
        const u64 da = wgmma_desc(stage + wg * 64 * 128);
        const u64 db = wgmma_desc(stage + TILE_A);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int s = 0; s < 4; ++s) wgmma_tile(part, da + 2 * s, db + 2 * s, s > 0);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        const float sb = s_bscale[kt];
        const float sa0 = s_ascale[r0 * k_groups + kt] * sb;
        const float sa1 = s_ascale[(r0 + 8) * k_groups + kt] * sb;
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j) {
            acc[4 * j + 0] += part[4 * j + 0] * sa0;
            acc[4 * j + 1] += part[4 * j + 1] * sa0;
            acc[4 * j + 2] += part[4 * j + 2] * sa1;
            acc[4 * j + 3] += part[4 * j + 3] * sa1;
        }
    }
#else
    // One tile's wgmma stays in flight while the next tile's loads are issued: after waiting
    // for all but the newest group, the previous tile's slot is free once every warpgroup has
    // passed the barrier, and it is refilled with the tile NUM_STAGES - 1 ahead.
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<NUM_STAGES - 2>();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        const u32 stage = sbase + (kt % NUM_STAGES) * STAGE_BYTES;
        const u64 da = wgmma_desc(stage + wg * 64 * 128);
        const u64 db = wgmma_desc(stage + TILE_A);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int s = 0; s < 4; ++s) wgmma_tile(acc, da + 2 * s, db + 2 * s, 1);
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
        __syncthreads();
        const int nk = kt + NUM_STAGES - 1;
        if (nk < KT) load_stage(nk % NUM_STAGES, nk);
        cp_async_commit();
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#endif
    cp_async_wait<0>();

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + h * 8;
        const int id = s_id[r];
        if (id < 0) continue;
        const float rs = row_scale(a_scale, b_scale, topk_weights, s_row[r], id, expert, mul_weight);
#pragma unroll
        for (int j = 0; j < BLOCK_N / 8; ++j) {
            const int n = n0 + j * 8 + t4 * 2;
            if (n < N) store_pair(C, b_scale, id, n, N, expert, acc[4 * j + 2 * h] * rs, acc[4 * j + 2 * h + 1] * rs);
        }
    }
}
