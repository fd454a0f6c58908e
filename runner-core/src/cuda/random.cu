// Seeded uniform fill of device buffers (weights and activations for benchmarks and the tuner),
// so model-sized tensors never cross the host bus. kind: 0 f32, 1 bf16, 2 f16, 3 e4m3.
typedef unsigned long long u64;

__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

extern "C" __global__ void fill_uniform(unsigned char* dst, long long n, int kind, float lo, float hi, u64 seed) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float u = (float)(splitmix64(seed ^ (u64)i * 0xD1B54A32D192ED03ull) >> 40) * (1.0f / 16777216.0f);
        const float v = lo + (hi - lo) * u;
        if (kind == 0) {
            ((float*)dst)[i] = v;
        } else if (kind == 1) {
            unsigned short r;
            asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
            ((unsigned short*)dst)[i] = r;
        } else if (kind == 2) {
            unsigned short r;
            asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(v));
            ((unsigned short*)dst)[i] = r;
        } else {
            unsigned short r;
            asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(v));
            dst[i] = (unsigned char)(r & 0xff);
        }
    }
}
