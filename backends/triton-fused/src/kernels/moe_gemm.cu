// Grouped GEMM of the fused MoE: C[id, n] = sum_k A[row(id), k] * B[expert, n, k] for the rows
// of each BLOCK_M block of sorted ids (all of one expert). A rows are gathered through the
// sorted ids (row = id / A_ROW_DIV), B is K-major, accumulation in f32 on tensor cores
// (mma.sync m16n8k16 for bf16/f16, m16n8k32 for e4m3). A multi-stage cp.async pipeline feeds
// shared memory; padded rows keep fragment loads free of bank conflicts.
//
// Compile-time parameters (-D): BLOCK_M, BLOCK_N, BLOCK_K_BYTES (64, 128 or 256; a multiple
// of 128 for per-128 scales), WARPS_M, WARPS_N,
// NUM_STAGES, GROUP_M, ELEM (0 bf16, 1 f16, 2 e4m3), A_SCALE (0 none, 1 scalar, 2 per row,
// 3 per row per 128 of K), B_SCALE (0 none, 1 per expert, 2 per channel, 3 per 128x128 block),
// ACT_F16 (output dtype f16 instead of bf16).

#define NUM_THREADS (WARPS_M * WARPS_N * 32)
#define ROW_BYTES (BLOCK_K_BYTES + 16)
#define WM (BLOCK_M / WARPS_M)
#define WN (BLOCK_N / WARPS_N)
#define MT (WM / 16)
#define NT (WN / 8)
#define CHUNKS_PER_ROW (BLOCK_K_BYTES / 16)

#if ELEM == 2
#define ELEM_BYTES 1
#else
#define ELEM_BYTES 2
#endif

__device__ __forceinline__ void mma(float* c, const u32* a, const u32* b) {
#if ELEM == 2
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#elif ELEM == 1
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#endif
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

extern "C" __global__ void __launch_bounds__(NUM_THREADS) moe_gemm(
    const u8* __restrict__ A,              // [rows, K] elements
    const u8* __restrict__ B,              // [E, N, K] elements
    u16* __restrict__ C,                   // [numel, N] bf16/f16, row = sorted id
    const float* __restrict__ a_scale,     // see A_SCALE
    const float* __restrict__ b_scale,     // see B_SCALE
    const float* __restrict__ topk_weights, // [numel], used when mul_weight
    const int* __restrict__ sorted_ids,
    const int* __restrict__ expert_ids,
    const int* __restrict__ num_post_padded,
    int N, int K, int numel, int a_row_div, int mul_weight, int num_m_blocks) {
    extern __shared__ __align__(16) u8 smem[];
    u8* As = smem;                                              // [NUM_STAGES][BLOCK_M][ROW_BYTES]
    u8* Bs = smem + NUM_STAGES * BLOCK_M * ROW_BYTES;           // [NUM_STAGES][BLOCK_N][ROW_BYTES]
    __shared__ int s_row[BLOCK_M];                              // A row of each tile row, -1 = pad
    __shared__ int s_id[BLOCK_M];

    // Grouped ordering: GROUP_M m-blocks share each n-block sweep, for L2 reuse of B.
    const int num_n_blocks = (N + BLOCK_N - 1) / BLOCK_N;
    const int pid = blockIdx.x;
    const int in_group = GROUP_M * num_n_blocks;
    const int group = pid / in_group;
    const int first_m = group * GROUP_M;
    const int group_size = min(num_m_blocks - first_m, GROUP_M);
    const int pid_m = first_m + ((pid % in_group) % group_size);
    const int pid_n = (pid % in_group) / group_size;
    // Two independent loads: whether this block holds rows, and its expert.
    const int post_padded = *num_post_padded;
    const int expert = expert_ids[pid_m];
    if (pid_m * BLOCK_M >= post_padded || expert < 0) return;
    const int m0 = pid_m * BLOCK_M, n0 = pid_n * BLOCK_N;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
    const int g = lane >> 2, t4 = lane & 3;

    const long long k_bytes = (long long)K * ELEM_BYTES;
    const int KT = (int)((k_bytes + BLOCK_K_BYTES - 1) / BLOCK_K_BYTES);
    const u8* Bexp = B + (long long)expert * N * k_bytes;

    auto load_a = [&](int slot, int kt) {
        u8* as = As + slot * BLOCK_M * ROW_BYTES;
        const long long kb = (long long)kt * BLOCK_K_BYTES;
        for (int c = tid; c < BLOCK_M * CHUNKS_PER_ROW; c += NUM_THREADS) {
            const int r = c / CHUNKS_PER_ROW, ch = c % CHUNKS_PER_ROW;
            const long long off = kb + ch * 16;
            const int row = s_row[r];
            const bool ok = row >= 0 && off < k_bytes;
            const u8* src = ok ? A + (long long)row * k_bytes + off : A;
            cp_async16(as + r * ROW_BYTES + ch * 16, src, ok ? 16 : 0);
        }
    };
    auto load_b = [&](int slot, int kt) {
        u8* bs = Bs + slot * BLOCK_N * ROW_BYTES;
        const long long kb = (long long)kt * BLOCK_K_BYTES;
        for (int c = tid; c < BLOCK_N * CHUNKS_PER_ROW; c += NUM_THREADS) {
            const int r = c / CHUNKS_PER_ROW, ch = c % CHUNKS_PER_ROW;
            const long long off = kb + ch * 16;
            const bool ok = (n0 + r) < N && off < k_bytes;
            const u8* src = ok ? Bexp + (long long)(n0 + r) * k_bytes + off : B;
            cp_async16(bs + r * ROW_BYTES + ch * 16, src, ok ? 16 : 0);
        }
    };
    auto load_stage = [&](int slot, int kt) {
        load_a(slot, kt);
        load_b(slot, kt);
    };

    // The prologue's weight tiles need only the expert: they start streaming before the
    // token rows are known (they join the first cp.async group below).
#pragma unroll
    for (int s = 0; s < NUM_STAGES - 1; ++s)
        if (s < KT) load_b(s, s);

    for (int r = tid; r < BLOCK_M; r += NUM_THREADS) {
        const int id = sorted_ids[m0 + r];
        s_id[r] = id < numel ? id : -1;
        s_row[r] = id < numel ? id / a_row_div : -1;
    }
    __syncthreads();

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

#if A_SCALE == 3
    // Every scale this block needs, staged once in shared memory behind the tile stages:
    // activations [BLOCK_M][k_groups] (0 for padding rows), weights [k_groups] of this n-block.
    const int k_groups = (K + 127) / 128;
    const int n_groups = (N + 127) / 128;
    float* s_ascale = (float*)(Bs + NUM_STAGES * BLOCK_N * ROW_BYTES);
    float* s_bscale = s_ascale + BLOCK_M * k_groups;
    for (int x = tid; x < BLOCK_M * k_groups; x += NUM_THREADS) {
        const int row = s_row[x / k_groups];
        s_ascale[x] = row >= 0 ? a_scale[(long long)row * k_groups + x % k_groups] : 0.0f;
    }
    for (int x = tid; x < k_groups; x += NUM_THREADS)
        s_bscale[x] = b_scale[((long long)expert * n_groups + n0 / 128) * k_groups + x];
    // Made visible by the barrier at the top of the first K iteration.
#endif

#pragma unroll
    for (int s = 0; s < NUM_STAGES - 1; ++s) {
        if (s < KT) load_a(s, s);
        cp_async_commit();
    }

    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<NUM_STAGES - 2>();
        __syncthreads();
        {
            const int nk = kt + NUM_STAGES - 1;
            if (nk < KT) load_stage(nk % NUM_STAGES, nk);
            cp_async_commit();
        }
        const u8* as = As + (kt % NUM_STAGES) * BLOCK_M * ROW_BYTES;
        const u8* bs = Bs + (kt % NUM_STAGES) * BLOCK_N * ROW_BYTES;
#if A_SCALE == 3
        // Products of each 128-wide K group collect here, then fold into `acc` with the group's
        // activation scale per row and the weight block's scale.
        float part[MT][NT][4];
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int q = 0; q < 4; ++q) part[i][j][q] = 0.0f;
#define ACC part
#else
#define ACC acc
#endif
#pragma unroll
        for (int kk = 0; kk < BLOCK_K_BYTES; kk += 32) {
            u32 af[MT][4], bf[NT][2];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const u8* p = as + (warp_m * WM + i * 16 + g) * ROW_BYTES + kk + t4 * 4;
                af[i][0] = *(const u32*)(p);
                af[i][1] = *(const u32*)(p + 8 * ROW_BYTES);
                af[i][2] = *(const u32*)(p + 16);
                af[i][3] = *(const u32*)(p + 8 * ROW_BYTES + 16);
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const u8* p = bs + (warp_n * WN + j * 8 + g) * ROW_BYTES + kk + t4 * 4;
                bf[j][0] = *(const u32*)(p);
                bf[j][1] = *(const u32*)(p + 16);
            }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) mma(ACC[i][j], af[i], bf[j]);
#if A_SCALE == 3
            if ((kk & 127) == 96) {
                const int grp = kt * (BLOCK_K_BYTES / 128) + (kk >> 7);
                // A tile past the last group (K tail) holds zero-filled products only.
                const float sb = grp < k_groups ? s_bscale[grp] : 0.0f;
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    const float sa0 = grp < k_groups ? s_ascale[(warp_m * WM + i * 16 + g) * k_groups + grp] * sb : 0.0f;
                    const float sa1 = grp < k_groups ? s_ascale[(warp_m * WM + i * 16 + g + 8) * k_groups + grp] * sb : 0.0f;
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        acc[i][j][0] += part[i][j][0] * sa0;
                        acc[i][j][1] += part[i][j][1] * sa0;
                        acc[i][j][2] += part[i][j][2] * sa1;
                        acc[i][j][3] += part[i][j][3] * sa1;
#pragma unroll
                        for (int q = 0; q < 4; ++q) part[i][j][q] = 0.0f;
                    }
                }
            }
#endif
        }
#undef ACC
    }
    cp_async_wait<0>();

    // Epilogue: scales, router weight, adjacent column pairs stored as one 32-bit word.
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = warp_m * WM + i * 16 + g + h * 8;
            const int id = s_id[r];
            if (id < 0) continue;
            const float rs = row_scale(a_scale, b_scale, topk_weights, s_row[r], id, expert, mul_weight);
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int n = n0 + warp_n * WN + j * 8 + t4 * 2;
                if (n < N) store_pair(C, b_scale, id, n, N, expert, acc[i][j][h * 2] * rs, acc[i][j][h * 2 + 1] * rs);
            }
        }
    }
}
