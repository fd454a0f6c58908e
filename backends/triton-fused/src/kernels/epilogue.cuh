// Epilogue pieces shared by the mma.sync and wgmma GEMMs (both compiled with A_SCALE and B_SCALE).
#pragma once

// Scale of one output row: per-tensor or per-row activation scale, per-expert weight scale and
// the router weight where it applies.
__device__ __forceinline__ float row_scale(const float* a_scale, const float* b_scale, const float* topk_weights,
                                           int row, int id, int expert, int mul_weight) {
    float rs = 1.0f;
#if A_SCALE == 1
    rs *= a_scale[0];
#elif A_SCALE == 2
    rs *= a_scale[row];
#endif
#if B_SCALE == 1
    rs *= b_scale[expert];
#endif
    if (mul_weight) rs *= topk_weights[id];
    return rs;
}

// Stores columns n and n + 1 of output row `id` as one 32-bit word, with per-channel weight
// scales where they apply.
__device__ __forceinline__ void store_pair(u16* C, const float* b_scale, int id, int n, int N, int expert, float v0,
                                           float v1) {
#if B_SCALE == 2
    v0 *= b_scale[(long long)expert * N + n];
    v1 *= b_scale[(long long)expert * N + n + 1];
#endif
    *(u32*)(C + (long long)id * N + n) = (u32)f32_to_act(v0) | ((u32)f32_to_act(v1) << 16);
}
