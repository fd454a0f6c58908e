// Hopper (sm_90a) building blocks shared by the kernels that stream operands through a
// shared-memory ring (the NVFP4 GEMM, MegaMoE, the wgmma GEMM): mbarriers and bulk copies for a
// producer warp, the wgmma shared-memory descriptor, and the widening of E2M1 codes to exact f16
// values for the f16 tensor cores. Include after common.cuh.
#pragma once

__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void mbar_arrive(u64* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
    }
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory,
// completing on `bar`.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, u32 bytes, u64* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}

// Shared-memory matrix descriptor of a K-major wgmma operand with the 128-byte swizzle (8-row
// groups 1024 bytes apart), from its shared-window address.
__device__ __forceinline__ u64 wgmma_desc(u32 saddr) {
    return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

// The E4M3 bytes (value times 2^-6) of the four low nibbles of w, and of the four high ones: an
// E2M1 nibble s|e1 e0 m placed as the E4M3 byte s|0 0 e1 e0 m|0 0 is its value times 2^-6
// (the subnormal 0.5 included), so widening is a shift and a mask.
__device__ __forceinline__ u32 widen_lo(u32 w) { return ((w << 2) & 0x1c1c1c1cu) | ((w << 4) & 0x80808080u); }
__device__ __forceinline__ u32 widen_hi(u32 w) { return ((w >> 2) & 0x1c1c1c1cu) | (w & 0x80808080u); }
// Four E4M3 bytes to two f16x2 (bytes 0, 1 into `lo`, bytes 2, 3 into `hi`), exactly: the halves
// are read as 16-bit operands, so no shift precedes the second conversion.
__device__ __forceinline__ void e4m3x4_to_f16x2x2(u32 v, u32& lo, u32& hi) {
    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.rn.f16x2.e4m3x2 %0, l; cvt.rn.f16x2.e4m3x2 %1, h; }"
        : "=r"(lo), "=r"(hi)
        : "r"(v));
}
