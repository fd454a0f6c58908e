// Measures how the GPU converts every one of the 2^32 f32 bit patterns to E4M3, E5M2 (the hardware
// `cvt.rn.satfinite.{e4m3,e5m2}x2.f32` instructions, sm_89+) and E2M1 (`__nv_cvt_float_to_fp4` from
// cuda_fp4.h, NVIDIA's reference for `cvt.rn.satfinite.e2m1x2.f32`, which Hopper lacks), and prints the
// result as a step table that `tests/hw_cvt_table.rs` checks the Rust conversions against.
//
// Each conversion is monotone in |x| within one sign, so it is fully described by: the code of +-0, the
// bit patterns where the code changes (walking 0x00000000..=0x7F800000 and the same with the sign bit
// set), and the set of codes NaN inputs produce.
//
// Build and run on a Hopper GPU (from quant/): nvcc -arch=sm_90a -O2 -o /tmp/cvt_table tools/cvt_table.cu
// && /tmp/cvt_table > tests/data/hw_cvt_table.txt  (about 0.5 s on an H100).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <vector>
#include <cuda_fp4.h>

constexpr int kFormats = 3;
constexpr unsigned kMaxSteps = 1 << 14;
const char *kNames[kFormats] = {"e4m3", "e5m2", "e2m1"};

struct Step {
    uint32_t fmt, bits, code;
};

struct Results {
    unsigned steps_len;
    Step steps[kMaxSteps];
    uint32_t nan_codes[kFormats][2][8];  // bit set of the 256 possible codes, per format and sign
    unsigned x2_mismatch;                // the two halves of an x2 conversion disagreed
};

__device__ __forceinline__ uint32_t convert(int fmt, uint32_t bits, Results *r) {
    float x = __uint_as_float(bits);
    uint16_t d;
    if (fmt == 0) {
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(x), "f"(x));
    } else if (fmt == 1) {
        asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(d) : "f"(x), "f"(x));
    } else {
        return __nv_cvt_float_to_fp4(x, __NV_E2M1, cudaRoundNearest) & 0xF;
    }
    if ((d >> 8) != (d & 0xFF)) atomicAdd(&r->x2_mismatch, 1u);
    return d & 0xFF;
}

__global__ void scan(Results *r) {
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (1ull << 32); i += stride) {
        uint32_t u = (uint32_t)i;
        uint32_t mag = u & 0x7FFFFFFFu;
        uint32_t sign = u >> 31;
        for (int f = 0; f < kFormats; ++f) {
            uint32_t c = convert(f, u, r);
            if (mag > 0x7F800000u) {
                atomicOr(&r->nan_codes[f][sign][c >> 5], 1u << (c & 31));
            } else if (mag == 0 || convert(f, u - 1, r) != c) {
                unsigned at = atomicAdd(&r->steps_len, 1u);
                if (at < kMaxSteps) r->steps[at] = Step{(uint32_t)f, u, c};
            }
        }
    }
}

int main() {
    Results *d;
    if (cudaMalloc(&d, sizeof(Results)) != cudaSuccess) return 1;
    cudaMemset(d, 0, sizeof(Results));
    scan<<<132 * 16, 256>>>(d);
    if (cudaDeviceSynchronize() != cudaSuccess) {
        fprintf(stderr, "kernel failed\n");
        return 1;
    }
    Results *h = (Results *)malloc(sizeof(Results));
    cudaMemcpy(h, d, sizeof(Results), cudaMemcpyDeviceToHost);
    if (h->steps_len > kMaxSteps) {
        fprintf(stderr, "too many steps: %u\n", h->steps_len);
        return 1;
    }
    std::vector<Step> steps(h->steps, h->steps + h->steps_len);
    std::sort(steps.begin(), steps.end(), [](const Step &a, const Step &b) {
        return a.fmt != b.fmt ? a.fmt < b.fmt : a.bits < b.bits;
    });
    printf("# x2_mismatch %u\n", h->x2_mismatch);
    for (const Step &s : steps) printf("step %s %08x %02x\n", kNames[s.fmt], s.bits, s.code);
    for (int f = 0; f < kFormats; ++f)
        for (int s = 0; s < 2; ++s)
            for (int c = 0; c < 256; ++c)
                if (h->nan_codes[f][s][c >> 5] >> (c & 31) & 1)
                    printf("nan %s %d %02x\n", kNames[f], s, c);
    return 0;
}
