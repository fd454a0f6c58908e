// The gated activations of the MoE layer, chosen at compile time by ACT (0 silu*up, 1 gelu*up,
// 2 swiglu_limit, 3 clamp after silu, 4 gpt-oss, 5 silu, 6 gelu): shared by every kernel that
// applies one, so their results agree bit for bit.
#pragma once

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float activation(float gate, float up, float limit, float alpha) {
#if ACT == 0
    return gate * sigmoidf_(gate) * up;
#elif ACT == 1
    return 0.5f * gate * (1.0f + erff(gate * 0.70710678118654752f)) * up;
#elif ACT == 2
    const float gt = fminf(gate, limit), u = fminf(fmaxf(up, -limit), limit);
    return gt * sigmoidf_(gt) * u;
#elif ACT == 3
    return fminf(gate * sigmoidf_(gate), limit) * fminf(fmaxf(up, -limit), limit);
#elif ACT == 4
    const float gt = fminf(gate, limit), u = fminf(fmaxf(up, -limit), limit);
    return gt * sigmoidf_(alpha * gt) * (u + 1.0f);
#elif ACT == 5
    return gate * sigmoidf_(gate);
#else
    return 0.5f * gate * (1.0f + erff(gate * 0.70710678118654752f));
#endif
}
