// NVFP4 (w4a4) grouped GEMMs for Hopper, which has no FP4 tensor cores: the weights move
// through memory as E2M1 codes with E4M3 block scales and are expanded next to the tensor
// cores. An E2M1 value times an E4M3 scale has at most six significant bits, so it is exact in
// f16: each code is widened to E4M3 by a shift and a mask, converted to f16 and multiplied by its
// block scale, all exactly, and the products run on the f16 tensor cores (mma.sync m16n8k16;
// Hopper's e4m3 mma.sync is itself emulated through f16) with f32 accumulation. No partial sum
// is rescaled per block, which is what keeps the expansion cheap enough to hide under the
// weight stream. The activations are quantized to NVFP4 with each expert's global scale and
// kept as their exact values (code times block scale) in f16; the tensor's
// alpha = 1 / (gs_a * gs_w) is applied once at the end.
//
// E4M3 products (F8, the `Nvfp4Products::E4m3` choice): both operands' values v (code times
// block scale) are rounded to E4M3 at an eighth of their size, e4m3(v / 8) (v / 8 is at most
// 336, so nothing saturates), and the products of those bytes run on the FP8 tensor cores,
// twice the 16-bit rate: wgmma k32 with the weights widened to E4M3 bytes in registers (from a
// table per block of the eight magnitudes times the scale, rounded once, by byte permutes) and
// the activation rows stored as E4M3 bytes. Every batch size takes the wgmma kernel then: at 1 to
// 32 rows it took 7% to 15% less time than mma.sync on f16 values rounded to E4M3 and back
// (the round trip's conversions land on the ALU that bounds decode).

__device__ __forceinline__ u32 mul_f16x2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ void mma_f16_16816(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f16x2 rounded to four E4M3 bytes (RNE, saturating), in order: a's halves to bytes 0 and 1.
__device__ __forceinline__ u32 f16x2x2_to_e4m3x4(u32 a, u32 b) {
    u32 d;
    asm("{ .reg .b16 l, h; cvt.rn.satfinite.e4m3x2.f16x2 l, %1; cvt.rn.satfinite.e4m3x2.f16x2 h, %2; mov.b32 %0, {l, h}; }"
        : "=r"(d)
        : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

// ------------------------------------------------------------------ the grouped GEMM
// C[base(e) + i, n] = alpha[e] * sum_k A[base(e) + i, k] * W[e, n, k] for i < counts[e].
//
// Decode batches fill an n8 tile of the MMA, not an m16 one, so the weights are the 16-row
// operand and up to bm rows of A the columns: a work item is 128 weight rows (output columns;
// 64 a consumer warpgroup in the wgmma kernel) of one expert by one chunk of bm of its rows,
// over the whole of K. The mma.sync variants have bm = 8 * NT; the wgmma kernel takes bm (a
// multiple of 16, up to 160) per launch and gives each item a wgmma exactly as wide as its rows,
// rounded up to 16 (to 8 past 96 rows with E4M3 products, odd_from_chunk): with random routing
// an expert's rows scatter around the mean, and an item of fixed width either computes empty
// columns or sends the rows past it to a second item that streams and widens the expert's
// weights again. A producer warp streams each item's K in
// stages of 256 through a ring of shared-memory slots: the weight box
// (the item's weight rows x 128 bytes) and A's four boxes of 64 values by TMA with the 128-byte
// swizzle, the block scales (four swizzled k-tiles per 128 weight rows, contiguous) by bulk
// copies, all completing on the slot's mbarrier. Each consumer warp takes 16 weight rows; lane
// (g, t) multiplies rows g and g + 8 of them over the stage's k range
// 64t.. 64t + 63 (four scale blocks): its codes are widened to E4M3, converted to f16 and
// multiplied by their block scale in f16, all exactly (an E2M1 value times an E4M3 scale times
// 2^-6 is a multiple of 2^-16 with at most six significant bits), so partial sums are never
// rescaled and the MMA may take k in any order. The products are mma.sync per warp, or a
// warpgroup's wgmma with these f16 fragments as its register operand and A's rows read from
// the ring. A is written in the order the chosen MMA reads it (store_block), and its rows hold
// the exact NVFP4 values (code times block scale) in f16. With E4M3 products (the wgmma kernel
// only) A's rows are E4M3 bytes, two boxes of 128 a stage, the fragments E4M3 bytes, and the
// block is the eight consumer warps and a producer warpgroup (see reg_handoff).
// The wgmma kernel with E4M3 products holds a second set of accumulators (the promoted sums):
// a whole producer warpgroup gives up registers (setmaxnreg), keeping 24, so that the two
// consumer warpgroups get 240 (64512 registers, 384 threads; 224 with the activation in
// GEMM 1's epilogue, see c_defer).
// With three consumer warpgroups it does so for both products: 24 for the producers, 160 for
// the consumers (65536 registers, 512 threads).
// With four (GEMM 1 with the activation in its epilogue, EPI_ACT, E4M3 products only, and GEMM 2
// at items of 48 and 64 rows), 24 for the producers and 112 for the consumers (61440 registers,
// 640 threads: five warps an SM sub-partition). (A producer warp alone would leave each consumer
// 96: 17 warps put five on one sub-partition.)
// Where three warps of the producer warpgroup take the epilogue (c_defer, below): with the
// activation, they take 56 registers and the consumers 224 (64512 registers); storing C, 24
// are enough for them.
#define EPI_LANES 0
#define EPI_STAGED 1
#define EPI_ACT 2
template <bool F8, int CG>
__device__ constexpr bool reg_handoff() { return F8 || CG >= 3; }
template <bool F8, int CG>
__device__ constexpr int gemm_threads() { return 128 * CG + (reg_handoff<F8, CG>() ? 128 : 32); }
template <int EPI, int CG, bool F8>
__device__ constexpr bool c_defer() { return CG == 2 && (EPI == EPI_ACT || (EPI == EPI_STAGED && F8)); }
template <int EPI, int CG>
__device__ constexpr int producer_regs() { return EPI == EPI_ACT && CG == 2 ? 56 : 24; }
template <int EPI, int CG>
__device__ constexpr int consumer_regs() { return CG == 2 ? (EPI == EPI_ACT ? 224 : 240) : CG == 3 ? 160 : 112; }
// Weight rows of an item: 128 for mma.sync (eight warps of 16), 64 a consumer warpgroup for
// wgmma (with EPI_ACT, half of them from each half of W).
template <bool WG, int CG>
__device__ constexpr int item_rows() { return WG ? 64 * CG : 128; }
// The 128-row scale tiles an item's weight rows touch: items of 192 rows start on multiples of
// 64, so they touch two.
template <int ITEM_N>
__device__ constexpr int item_scale_tiles() { return ITEM_N / 128 + (ITEM_N % 128 ? 1 : 0); }
// A wgmma kernel's epilogue: C stored lane by lane (EPI_LANES); through shared memory
// (EPI_STAGED, store_c_staged); or, for GEMM 1 of a gated activation whose gate and up are the
// halves of W, through shared memory into the activation and its requantization, written as
// GEMM 2's input instead of C (EPI_ACT, store_act_staged). An EPI_ACT item is 32 CG rows of each
// half (128 with four consumer warpgroups, 64 with two): n0.. n0 + 32 CG - 1 of the first,
// N / 2 + n0.. of the second, so that it holds 32 CG whole columns of the activation's output,
// and each half's rows lie in one 128-row scale tile when N / 2 is a multiple of 128 (the
// runner takes it only then). (Ranges
// of 96 rows, the earlier form with three warpgroups, straddled tiles: up to four a stage, and
// GEMM 1 read 5% to 16% more from DRAM.)
// EPI_ACT on two consumer warpgroups (items taller than 96 rows, c_defer): the activation and
// its requantization take a few microseconds an item, during which the consumers' tensor cores
// would idle (H100, DeepSeek-V3 shapes, 128 rows per expert: GEMM 1 2370 us with them in the
// consumers' epilogue, against 2185 us without the activation and 139 us for the activation
// kernel). So the consumers only stage their C tile into a buffer of its own and go on with the
// next item, while DEFER_WARPS warps of the producer warpgroup, which otherwise only issue
// copies, apply the activation to it (GEMM 1 2220 us against 2166 + 139). Two barriers hand the
// buffer over: full once every consumer has written its part, empty once those warps have read
// it. EPI_STAGED with E4M3 products on two consumer warpgroups (GEMM 2 at items taller than 96
// rows) hands its stores of C over the same way (1182 us against 1207).
#define DEFER_WARPS 3
#define F8_PROMOTE 2  // chunks of two k32 steps between promotions: 128 values of k
// Items up to this many n8 tiles wide sum a stage's two promotion groups apart (consume_item):
// 128 columns, 192 registers of sums, in the 240 a consumer thread of two warpgroups gets
// (H100, 128 rows per expert, where half the items are up to 128 rows tall: GEMM 1 2177 to
// 2180 us against 2208 to 2212 with 96 columns at 232 registers, GEMM 2 1216 to 1218 against
// 1228 to 1229). With three consumer warpgroups (160 registers a thread), 48 columns.
#define F8_OVERLAP_NT 16
#define F8_OVERLAP_NT_ACT 14  // in the 224 registers of c_defer with the activation
#define F8_OVERLAP_NT3 6
#define S_BYTES 2048  // a stage's scales of 128 weight rows: four swizzled k-tiles of 512 bytes

// A CUtensorMap (opaque, 64-byte aligned) passed by value.
struct __align__(64) TmaMap {
    u64 v[16];
};
// Maps of the GEMM input with boxes of 16, 32, 64 and 128 rows (ShortBoxes in tma.rs).
#define SHORT_BOXES 4
struct ShortBoxes {
    TmaMap h[SHORT_BOXES];
};

__device__ __forceinline__ void tma_2d(void* dst, const TmaMap* map, int x, int y, u64* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            smem_addr(dst)),
        "l"(map), "r"(x), "r"(y), "r"(smem_addr(bar))
        : "memory");
}
__device__ __forceinline__ void tma_3d(void* dst, const TmaMap* map, int x, int y, int z, u64* bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(
            smem_addr(dst)),
        "l"(map), "r"(x), "r"(y), "r"(z), "r"(smem_addr(bar))
        : "memory");
}

// The exclusive prefix sum of `own` over a block of THREADS threads (a multiple of 32, at most
// 1024; every thread calls it): a scan within each warp, then of the warps' sums by the first
// warp, in `warp_sum` (THREADS / 32 ints of shared memory). Also route.cu's.
template <int THREADS>
__device__ __forceinline__ int block_exclusive_scan(int own, int* warp_sum) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = own;  // inclusive scan within the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_sum[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = lane < THREADS / 32 ? warp_sum[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        if (lane < THREADS / 32) warp_sum[lane] = w;
    }
    __syncthreads();
    return x - own + (warp > 0 ? warp_sum[warp - 1] : 0);
}

// The row tiles of the GEMMs, in one block: tile_start[e] = sum over experts before e of
// ceil(min(counts, cap) / bm), tile_start[E] the total. The GEMM grid is sized from an upper
// bound of the total, so no host ever waits for the counts. A count outside 0..=cap sets bit 0
// of `status` (and is clamped). Each thread sums a run of experts, then one block-wide scan.
#define TILES_THREADS 1024
// It also zeroes GEMM 1's counts of finished items (GemmArgs::done) when a GEMM 2 will wait on
// them: `done_len` of them, 0 when none.
extern "C" __global__ void __launch_bounds__(TILES_THREADS) fp4_tiles(
    const int* __restrict__ counts, int E, int cap, int bm, int* __restrict__ tile_start, int* __restrict__ status,
    int* __restrict__ done, int done_len) {
    __shared__ int warp_sum[TILES_THREADS / 32];
    const int tid = threadIdx.x;
    for (int i = tid; i < done_len; i += TILES_THREADS) done[i] = 0;
    const int per = (E + TILES_THREADS - 1) / TILES_THREADS, e0 = min(tid * per, E), e1 = min(e0 + per, E);
    int own = 0;
    for (int e = e0; e < e1; ++e) {
        const int c = counts[e];
        if (c < 0 || c > cap) atomicOr(status, 1);
        own += (min(max(c, 0), cap) + bm - 1) / bm;
    }
    int acc = block_exclusive_scan<TILES_THREADS>(own, warp_sum);
    for (int e = e0; e < e1; ++e) {
        tile_start[e] = acc;
        acc += (min(max(counts[e], 0), cap) + bm - 1) / bm;
    }
    if (tid == TILES_THREADS - 1) tile_start[E] = acc;
}

struct GemmArgs {
    const u8* w_sf;  // [E, swizzled(N, K/16)] E4M3 block scales
    const int* counts;
    const int* row0;
    const int* tile_start;
    const float* alpha;
    u16* c;
    int cap, E, N, K;
    int bm;      // rows of an expert per item (the A boxes' height)
    int stages;  // slots of the ring
    // EPI_ACT only: GEMM 2's input (`act_layout`), the experts' GEMM-2 global scales and the
    // activation's limit and alpha.
    u8* act;
    const float* act_gs;
    float act_limit, act_alpha;
    int act_layout;
    // GEMM 2 started before GEMM 1 has finished (programmatic dependent launch, runner.rs): GEMM
    // 1 with the activation in its epilogue counts its finished items in `done[0]` and each row
    // tile's in `done[1 + tile]` (null: it counts nothing), and GEMM 2 loads a row tile's input
    // only once `wait[1 + tile]` has reached `wait_for` (null: GEMM 1 has finished).
    int* done;
    const int* wait;
    int wait_for;
};

// The item's expert, first row and weight tile.
struct GemmItem {
    int e, m0, n0, tile;
};
__device__ __forceinline__ GemmItem gemm_item(const GemmArgs& p, int item, int n_tiles, int item_n, int bm) {
    const int tile = item / n_tiles;
    int lo = 0, hi = p.E;  // the expert e with tile_start[e] <= tile < tile_start[e + 1]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (p.tile_start[mid] <= tile) lo = mid; else hi = mid;
    }
    GemmItem it;
    it.e = lo;
    it.m0 = (tile - p.tile_start[lo]) * bm;
    it.n0 = (item % n_tiles) * item_n;
    it.tile = tile;
    return it;
}

// One weight tile's A fragments for k16 steps 2h and 2h + 1 of box c: codes (0 2 | 1 3) and
// (4 6 | 5 7) of the lane's rows r0, r1 (words w[q][2c + h]), times their block scales.
__device__ __forceinline__ void widen_tile(const u32 (&w)[2][8], const u32 (&sl)[2][2], int c, int h, u32* fa,
                                           u32* fb) {
    const u32 sel = (c & 1) ? 0x3232 : 0x1010;
    u32 l[2][2], hi[2][2], sc[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
        const u32 x = w[q][2 * c + h];
        e4m3x4_to_f16x2x2(widen_lo(x), l[q][0], l[q][1]);
        e4m3x4_to_f16x2x2(widen_hi(x), hi[q][0], hi[q][1]);
        sc[q] = __byte_perm(sl[q][c >> 1], 0, sel);
    }
    fa[0] = mul_f16x2(l[0][0], sc[0]), fa[1] = mul_f16x2(l[1][0], sc[1]);
    fa[2] = mul_f16x2(hi[0][0], sc[0]), fa[3] = mul_f16x2(hi[1][0], sc[1]);
    fb[0] = mul_f16x2(l[0][1], sc[0]), fb[1] = mul_f16x2(l[1][1], sc[1]);
    fb[2] = mul_f16x2(hi[0][1], sc[0]), fb[3] = mul_f16x2(hi[1][1], sc[1]);
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// Products of f16x2 a with one half of b in both lanes (hi: the high half), the broadcast left
// to the multiply's operand selector.
template <bool HI>
__device__ __forceinline__ u32 mul_f16x2_by_half(u32 a, u32 b) {
    u32 d;
    if constexpr (HI)
        asm("{ .reg .b16 l, h; .reg .b32 s; mov.b32 {l, h}, %2; mov.b32 s, {h, h}; mul.rn.f16x2 %0, %1, s; }"
            : "=r"(d)
            : "r"(a), "r"(b));
    else
        asm("{ .reg .b16 l, h; .reg .b32 s; mov.b32 {l, h}, %2; mov.b32 s, {l, l}; mul.rn.f16x2 %0, %1, s; }"
            : "=r"(d)
            : "r"(a), "r"(b));
    return d;
}

// A block's table: the E4M3 bytes of its eight E2M1 magnitudes (0, 0.5, 1, 1.5 | 2, 3, 4, 6)
// times its scale over 8, rounded once, from the f16x2 pair of scales `sc` (its low half, or
// with HI its high one): the magnitudes times 2^-6, as the widened codes are, and times 8, all
// exact, so each product is rounded once, in the conversion.
template <bool HI>
__device__ __forceinline__ void e4m3_table(u32 sc, u32 (&tab)[2]) {
    tab[0] = f16x2x2_to_e4m3x4(mul_f16x2_by_half<HI>(0x2C000000u, sc), mul_f16x2_by_half<HI>(0x32003000u, sc));
    tab[1] = f16x2x2_to_e4m3x4(mul_f16x2_by_half<HI>(0x36003400u, sc), mul_f16x2_by_half<HI>(0x3A003800u, sc));
}

// Eight E2M1 codes (the nibbles of x) as E4M3 bytes from their block's table: codes 0..3 to the
// bytes of lo, 4..7 to those of hi. The magnitudes by byte permutes (selector nibbles with the
// sign bit cleared, which would otherwise replicate a byte's top bit); each code's sign, bit 3
// of its nibble, is bit 7 of a byte of x (odd codes) or of x << 4 (even codes), and one more
// permute of those two words puts the four signs of lo, or of hi, on their bytes' top bits.
// Nine instructions for eight codes, against eleven with a second permute and a shift for each
// four signs.
__device__ __forceinline__ void lookup8(u32 x, const u32 (&tab)[2], u32& lo, u32& hi) {
    const u32 mag = x & 0x77777777u, x4 = x << 4;
    lo = prmt(tab[0], tab[1], mag) | (prmt(x4, x, 0x5140u) & 0x80808080u);
    hi = prmt(tab[0], tab[1], mag >> 16) | (prmt(x4, x, 0x7362u) & 0x80808080u);
}

// One weight tile's A fragment (E4M3) for k32 step 2c + h: the eight codes of word w[q][2c + h]
// of the lane's rows by their block's table; codes 0..3 take k 4t.. 4t + 3, codes 4..7 take
// k 16 + 4t.. (store_block's layout 3).
__device__ __forceinline__ void widen_tile_f8(const u32 (&w)[2][8], const u32 (&tab)[2][2], int c, int h, u32* f) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
        lookup8(w[q][2 * c + h], tab[q], f[q], f[2 + q]);
    }
}

// A block's ring: `stages` slots of `stage` bytes from a 1024-byte boundary, each slot the weight
// box (the item's weight rows x 128 bytes), A's boxes of 128 bytes by bm rows (`a_box` bytes
// each: four of 64 f16 values, or two of 128 E4M3 bytes) and the block scales; then the slots'
// full and empty barriers.
struct Ring {
    u8* base;
    u64* full;
    u64* empty;
    int stage, a_box, a_boxes, stages;
    // With c_defer: the C buffer's full and empty barriers, and the buffer (bm rows of
    // c_pitch bytes) after them.
    u64* c_bar;
    u8* c_buf;
};

// The consumer warps' own barrier (the producer never joins it): CONS threads.
template <int CONS>
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(CONS) : "memory"); }

// Four 8x8 matrices of 16-bit values, each as an mma accumulator fragment holds it (lane (g, t):
// row g, columns 2t and 2t + 1 in one register), stored transposed: lane i gives the address of
// row i % 8 of matrix i / 8, which receives that matrix's column i % 8.
__device__ __forceinline__ void stmatrix_x4_trans(u32 addr, u32 r0, u32 r1, u32 r2, u32 r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0), "r"(r1),
                 "r"(r2), "r"(r3)
                 : "memory");
}

// The same for two matrices (lanes 0..15 give the addresses).
__device__ __forceinline__ void stmatrix_x2_trans(u32 addr, u32 r0, u32 r1) {
    asm volatile("stmatrix.sync.aligned.m8n8.x2.trans.shared.b16 [%0], {%1, %2};" ::"r"(addr), "r"(r0), "r"(r1)
                 : "memory");
}

__device__ __forceinline__ u32 act_pair(float lo, float hi) {
    return (u32)f32_to_act(lo) | ((u32)f32_to_act(hi) << 16);
}

// A row of the wgmma kernels' C tile in shared memory: the item's 64 CG columns (weight rows)
// of one of its rows, padded by 16 bytes so that the eight rows a transposed stmatrix writes
// start in different banks (272 or 400 bytes: 68 or 100 words, 4 banks apart).
template <int CG>
__device__ constexpr int c_pitch() { return 128 * CG + 16; }

// A warp's accumulators (its 16 weight rows by the item's 8 NT rows), times `al` (the expert's
// alpha times 64: the widened codes are values times 2^-6) and rounded to the activation dtype,
// by transposed stmatrix into `tile`: row m of the tile is the item's row m, its columns the
// item's weight rows.
template <int NT, int CG>
__device__ __forceinline__ void stmatrix_c(float al, const float (&acc)[NT][4], u8* tile, int warp, int lane) {
    constexpr int C_PITCH = c_pitch<CG>();
    const int mi = lane >> 3, tau = lane & 7;
    const u32 addr = smem_addr(tile) + (u32)((8 * (mi >> 1) + tau) * C_PITCH + (warp * 16 + 8 * (mi & 1)) * 2);
#pragma unroll
    for (int j = 0; j + 1 < NT; j += 2)
        stmatrix_x4_trans(addr + 8 * j * C_PITCH, act_pair(acc[j][0] * al, acc[j][1] * al),
                          act_pair(acc[j][2] * al, acc[j][3] * al), act_pair(acc[j + 1][0] * al, acc[j + 1][1] * al),
                          act_pair(acc[j + 1][2] * al, acc[j + 1][3] * al));
    // An odd last n8 tile (odd_from_chunk): its two matrices, by lanes 0..15's addresses, which
    // are the x4 form's first two.
    if constexpr (NT % 2)
        stmatrix_x2_trans(addr + 8 * (NT - 1) * C_PITCH, act_pair(acc[NT - 1][0] * al, acc[NT - 1][1] * al),
                          act_pair(acc[NT - 1][2] * al, acc[NT - 1][3] * al));
}

// The wgmma kernels' C through shared memory (stmatrix_c) into `tile`, the ring slot of the
// item's last stage, which the consumers hold until then.
template <int NT, int CG>
__device__ __forceinline__ void stage_c(const GemmArgs& p, const GemmItem& it, const float (&acc)[NT][4], u8* tile,
                                        int warp, int lane) {
    constexpr int CONS = 128 * CG;
    const float al = p.alpha[it.e] * 64.0f;
    // Every warp's products have read the slot (each warpgroup waited for its own).
    consumers_sync<CONS>();
    stmatrix_c<NT, CG>(al, acc, tile, warp, lane);
    consumers_sync<CONS>();
}

// The staged C's valid rows out (EPI_STAGED), 16 bytes a lane, whole 256-byte row segments a
// half-warp. Written lane by lane, C took 2-byte stores, each warp store four partial sectors.
// `rows` rows of `tile` to C's rows from `base`, thread `first` of `step` taking every step-th
// 16 bytes.
template <int CG>
__device__ __forceinline__ void store_rows(const GemmArgs& p, const GemmItem& it, const u8* tile, int rows,
                                           long long base, int first, int step) {
    constexpr int C_PITCH = c_pitch<CG>(), SEG = 8 * CG;  // 16-byte segments a row
    for (u32 i = first; i < (u32)(rows * SEG); i += step) {
        const int m = (int)(i / SEG), sg = (int)(i % SEG), col = it.n0 + sg * 8;
        if (col < p.N) *(uint4*)(p.c + (base + m) * p.N + col) = *(const uint4*)(tile + m * C_PITCH + sg * 16);
    }
}

// EPI_STAGED in the consumers: C staged into the slot of the item's last stage, then store_rows
// by every consumer thread.
template <int NT, int CG>
__device__ __forceinline__ void store_c_staged(const GemmArgs& p, const GemmItem& it, const float (&acc)[NT][4], u8* tile,
                                               int warp, int lane) {
    constexpr int CONS = 128 * CG;
    const int rows = min(min(max(p.counts[it.e], 0), p.cap) - it.m0, 8 * NT);
    const long long base = row_base(p.row0, p.cap, it.e) + it.m0;
    stage_c<NT, CG>(p, it, acc, tile, warp, lane);
    store_rows<CG>(p, it, tile, rows, base, warp * 32 + lane, CONS);
    // Generic-proxy writes to a slot the producer's TMA writes next.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// GEMM 1's epilogue with the activation (EPI_ACT): the staged tile's first 32 CG columns are the
// item's rows of the first half of W, the next 32 CG the same rows of the second. A task is one
// of the item's rows by one 16-value block of the activation's output: the activation and its
// requantization into GEMM 2's input, as the activation kernel does them from the same bf16
// values (act_quant_block), so the two agree bit for bit. C itself is never written. The tasks
// of `rows` rows of `tile`, thread `first` of `step` taking every step-th; `base`, `pitch` and
// `gs`: the item's first row of GEMM 2's input, its rows' bytes and its expert's global scale.
template <int CG>
__device__ __forceinline__ void act_rows(const GemmArgs& p, const GemmItem& it, const u8* tile, int rows,
                                         long long base, long long pitch, float gs, int first, int step) {
    constexpr int C_PITCH = c_pitch<CG>(), HALF = 32 * CG;
    constexpr int BLOCKS = HALF / 16;  // output blocks of an item row
    const int kb = p.N / 32;           // blocks of an output row (N / 2 values)
    for (int i = first; i < rows * BLOCKS; i += step) {
        const int m = i / BLOCKS, b = i % BLOCKS;
        const u16* x = (const u16*)(tile + m * C_PITCH) + 16 * b;
        act_quant_block(x, x + HALF, p.act_limit, p.act_alpha, gs, p.act + (base + m) * pitch, it.n0 / 16 + b, kb,
                        p.act_layout);
    }
}

// EPI_ACT in the consumers (four warpgroups): C staged into the slot of the item's last stage,
// then act_rows by every consumer thread.
template <int NT, int CG>
__device__ __forceinline__ void store_act_staged(const GemmArgs& p, const GemmItem& it, const float (&acc)[NT][4],
                                                 u8* tile, int warp, int lane) {
    constexpr int CONS = 128 * CG;
    const int rows = min(min(max(p.counts[it.e], 0), p.cap) - it.m0, 8 * NT);
    const long long base = row_base(p.row0, p.cap, it.e) + it.m0;
    const long long pitch = row_bytes(p.N / 2, p.act_layout);
    const float gs = p.act_gs[it.e];
    stage_c<NT, CG>(p, it, acc, tile, warp, lane);
    act_rows<CG>(p, it, tile, rows, base, pitch, gs, warp * 32 + lane, CONS);
    // A GEMM 2 that starts early reads these rows by TMA (the async proxy) once the producer has
    // counted the item (count_done): each writer orders its generic-proxy stores before that.
    if (p.done) asm volatile("fence.proxy.async.global;" ::: "memory");
    // Generic-proxy writes to a slot the producer's TMA writes next.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// One work item on the consumer warps: its K stages from the ring (n counts the slots used), then
// its rows of C. NT n8 tiles of the item's rows: the mma.sync variants' fixed width, or the width
// of this item's wgmma. F8 (wgmma only): E4M3 products. EPI (wgmma only): the epilogue, each a
// separate instantiation, since GEMM 1, which keeps the lane stores, measured slower at decode
// in a kernel that also held the staged path. CG (wgmma only): consumer warpgroups, each taking
// 64 of the item's weight rows.
template <int NT, int STAGES, bool WG, bool F8, int EPI, int CG>
__device__ __forceinline__ void consume_item(const GemmArgs& p, const GemmItem& it, const Ring& rg, u32& n, int warp,
                                             int lane) {
    constexpr int W_BYTES = item_rows<WG, CG>() * 128;
    const int g = lane >> 2, t = lane & 3;
    const int stages = (p.K + KS - 1) / KS, slots = STAGES ? STAGES : rg.stages;
    // This lane's weight rows in the item: r[0] and r[1] = r[0] + 8 of the warp's 16 (both with
    // r & 7 = g).
    const int r[2] = {warp * 16 + g, warp * 16 + g + 8};
    float acc[NT][4] = {};
    // A staged epilogue keeps the last stage's slot for C (stage_c).
    constexpr bool STAGED = EPI != EPI_LANES;
    static_assert(WG || !STAGED, "C goes through shared memory in the wgmma kernels only");
    // With c_defer, C goes to a buffer of its own, and the last stage's slot is released as
    // every other.
    constexpr bool DEFER = c_defer<EPI, CG, F8>(), HOLD = STAGED && !DEFER;
    for (int st = 0; st < stages; ++st, ++n) {
        const int slot = n % slots;
        mbar_wait(rg.full + slot, (n / slots) & 1);
        const u8* base = rg.base + slot * rg.stage;
        const bool live = st * KS + 64 * t < p.K;
        // Per row: word 2c + h holds codes 8h.. 8h + 7 of block 4t + c (blocks 4t, 4t + 1 in
        // logical chunk 2t, 4t + 2, 4t + 3 in chunk 2t + 1, each chunk stored at index
        // chunk ^ g); the f16x2 block scales {s0, s1} and {s2, s3} of those blocks
        // (swizzled k-tile t of the row's 128-row scale tile), zero past K and past N,
        // where no scale was copied.
        u32 w[2][8], sl[2][2];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const int row = r[q];
            const uint4 a = *(const uint4*)(base + row * 128 + ((2 * t) ^ g) * 16);
            const uint4 b = *(const uint4*)(base + row * 128 + ((2 * t + 1) ^ g) * 16);
            w[q][0] = a.x, w[q][1] = a.y, w[q][2] = a.z, w[q][3] = a.w;
            w[q][4] = b.x, w[q][5] = b.y, w[q][6] = b.z, w[q][7] = b.w;
            // The row's 128-row scale tile, counted from the item's first (items of 192
            // weight rows start halfway into one every other time). With EPI_ACT, each half's
            // rows lie in a tile of their own, copied one after the other: the first half's
            // from row n0 % 128 of it (64-row halves start on multiples of 64).
            constexpr int HALF_LOG = CG == 4 ? 7 : 6;  // EPI_ACT: log2 of a half's rows
            constexpr bool ALIGNED = item_rows<WG, CG>() % 128 == 0;
            const int at = ALIGNED ? row : it.n0 + row;
            const int rr = EPI == EPI_ACT ? (HALF_LOG == 7 ? 0 : it.n0 & 127) + (row & ((1 << HALF_LOG) - 1)) : at & 127;
            const int tile = EPI == EPI_ACT ? row >> HALF_LOG : (at >> 7) - (ALIGNED ? 0 : it.n0 >> 7);
            const u8* sc = base + W_BYTES + rg.a_boxes * rg.a_box + tile * S_BYTES + t * 512;
            const u32 s4 = live && it.n0 + row < p.N ? *(const u32*)(sc + (rr & 31) * 16 + (rr >> 5) * 4) : 0u;
            e4m3x4_to_f16x2x2(s4, sl[q][0], sl[q][1]);
        }
        if constexpr (F8) {
            // A chunk of two k32 steps at a time (lane block 4t + c). The FP8 tensor cores add
            // into their accumulator with much less than f32's precision (a stage summed in it
            // measured 7e-3 to 2.4e-2 from the reference), so every F8_PROMOTE chunks their sum,
            // begun afresh (scale-d 0), is added to the f32 total (promotion). The wait before
            // it stalls this warpgroup only. (The two warpgroups taking turns to issue, on named
            // barriers, measured no faster.) In items up to F8_OVERLAP_NT tiles wide, the
            // stage's second group sums apart from the first, and the first is promoted only
            // once the second is issued, while it runs: of the two waits a stage, one no longer
            // empties the tensor cores' queue. (Leaving the second group running into the next
            // stage too makes ptxas serialize every wgmma: it cannot tell which products still
            // run when their sums are read across the loop.)
            constexpr bool OVERLAP =
                NT <= (CG == 2 ? (EPI == EPI_ACT ? F8_OVERLAP_NT_ACT : F8_OVERLAP_NT) : CG == 3 ? F8_OVERLAP_NT3 : 0);
            float part[OVERLAP ? 2 : 1][NT * 4];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                // Block 4t + c's tables, one a row.
                u32 tab[2][2];
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    if (c & 1)
                        e4m3_table<true>(sl[q][c >> 1], tab[q]);
                    else
                        e4m3_table<false>(sl[q][c >> 1], tab[q]);
                }
                u32 f[2][4];  // [h][fragment] of k32 step 2c + h
#pragma unroll
                for (int h = 0; h < 2; ++h) widen_tile_f8(w, tab, c, h, f[h]);
                const bool fresh = c % F8_PROMOTE == 0;
                if (!OVERLAP && fresh && c > 0) {
                    wgmma_wait<0>();
#pragma unroll
                    for (int i = 0; i < NT * 4; ++i) (&acc[0][0])[i] += part[0][i];
                }
                wgmma_fence();
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    // k32 step j: box j / 4, 32 bytes along its rows per step.
                    const int j = 2 * c + h;
                    const u64 d = wgmma_desc(smem_addr(base + W_BYTES + (j >> 2) * rg.a_box)) + 2 * (j & 3);
                    wgmma_rs_e4m3<NT>(part[OVERLAP ? c / F8_PROMOTE : 0], f[h], d, fresh && h == 0 ? 0 : 1);
                }
                wgmma_commit();
            }
            if constexpr (OVERLAP) {
                wgmma_wait<2>();  // the first group (two commit groups of the four)
#pragma unroll
                for (int i = 0; i < NT * 4; ++i) (&acc[0][0])[i] += part[0][i];
            }
            wgmma_wait<0>();
            if (!(HOLD && st == stages - 1)) mbar_arrive(rg.empty + slot);
#pragma unroll
            for (int i = 0; i < NT * 4; ++i) (&acc[0][0])[i] += part[OVERLAP ? 1 : 0][i];
        } else if constexpr (WG) {
            // Box by box: box c is widened into registers of its own while box c - 1's k16 steps
            // run on the tensor cores; before box c reuses the registers of box c - 2, the wait
            // for all but the latest group of products retires box c - 2. So no wgmma waits for
            // the one before it, and a warpgroup holds the fragments of two boxes, not of four
            // (the accumulators of 160 rows and all four boxes do not fit in the 160 registers
            // a consumer thread gets).
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                if (c >= 2) wgmma_wait<1>();
                u32 f[2][2][4];  // [h][k16 step 2h, 2h + 1][fragment]
#pragma unroll
                for (int h = 0; h < 2; ++h) widen_tile(w, sl, c, h, f[h][0], f[h][1]);
                wgmma_fence();
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    // k16 steps 2h and 2h + 1 of box c: 32 bytes each along its rows.
                    const u64 d = wgmma_desc(smem_addr(base + W_BYTES + c * rg.a_box)) + 4 * h;
                    wgmma_rs<NT>(&acc[0][0], f[h][0], d);
                    wgmma_rs<NT>(&acc[0][0], f[h][1], d + 2);
                }
                wgmma_commit();
            }
            // The slot's rows are read by the warpgroup's MMAs: done before it is released.
            // (Products left running into the next stage make ptxas serialize every wgmma: it
            // does not follow pending products across the loop.)
            wgmma_wait<0>();
            if (!(HOLD && st == stages - 1)) mbar_arrive(rg.empty + slot);
        } else {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                // Block 4t + c of A: box c, logical chunks 2t and 2t + 1 of each row.
                const u8* ab = base + W_BYTES + c * rg.a_box;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    u32 fa[4], fb[4];
                    widen_tile(w, sl, c, h, fa, fb);
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        const uint4 b = *(const uint4*)(ab + (j * 8 + g) * 128 + ((2 * t + h) ^ g) * 16);
                        mma_f16_16816(acc[j], fa, b.x, b.y);
                        mma_f16_16816(acc[j], fb, b.z, b.w);
                    }
                }
            }
            mbar_arrive(rg.empty + slot);
        }
    }
    if constexpr (DEFER) {
        // This block's item j = n / stages - 1 (each takes `stages` slots) into the C buffer,
        // once the epilogue warps have read item j - 1 from it.
        const float al = p.alpha[it.e] * 64.0f;
        const u32 j = n / stages - 1;
        if (j > 0) mbar_wait(rg.c_bar + 1, (j - 1) & 1);
        stmatrix_c<NT, CG>(al, acc, rg.c_buf, warp, lane);
        mbar_arrive(rg.c_bar);
        return;
    } else if constexpr (STAGED) {
        const int slot = (n - 1) % slots;
        if constexpr (EPI == EPI_ACT)
            store_act_staged<NT, CG>(p, it, acc, rg.base + slot * rg.stage, warp, lane);
        else
            store_c_staged<NT, CG>(p, it, acc, rg.base + slot * rg.stage, warp, lane);
        mbar_arrive(rg.empty + slot);
        return;
    }
    // Rows of C: this item's rows 8j + 2t, + 1; columns: weight rows r[0], r[1]. The weight
    // codes were widened as value times 2^-6 (with F8, both operands are e4m3(v / 8)).
    const int rows = min(max(p.counts[it.e], 0), p.cap);
    const long long base = row_base(p.row0, p.cap, it.e);
    const float al = p.alpha[it.e] * 64.0f;
    const int n_a = it.n0 + r[0], n_b = it.n0 + r[1];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const int m = it.m0 + 8 * j + 2 * t + q;
            if (m >= rows) continue;
            u16* crow = p.c + (base + m) * p.N;
            if (n_a < p.N) crow[n_a] = f32_to_act(acc[j][q] * al);
            if (n_b < p.N) crow[n_b] = f32_to_act(acc[j][2 + q] * al);
        }
    }
}

// The wgmma kernel's items: a wgmma of 16 * C columns for an item of up to 16 * C rows, C from 1
// to wg_max_chunks (bm up to 160; 96 with three consumer warpgroups and E4M3 products, whose
// second set of sums does not fit 160 registers wider).
// With four, items up to 64 rows: past that ptxas serializes the wgmma in the 112
// registers a consumer thread gets.
template <int CG, bool F8>
__device__ constexpr int wg_max_chunks() { return CG == 4 ? 4 : CG == 3 && F8 ? 6 : 10; }
// The chunks from which items take a wgmma of an odd number of n8 tiles where their rows fit
// one: 8 columns less, for rows of an expert that do not fill the chunk's second half. On two
// consumer warpgroups with E4M3 products (items taller than 96 rows, where the tensor cores
// bound the GEMMs) only: routed counts scatter about their mean, so columns rounded up to 16
// leave 7.5 of them empty on average, and to 8 3.5 (at 128 rows per expert, 3% fewer products;
// H100, DeepSeek-V3 shapes: GEMM 1 with the activation 2160 us against 2214). Not in the
// staged instantiation (GEMM 2 at a short K), which measured slower with them (1193 against
// 1177 us): at its 240 registers, any added width makes ptxas spill in a stage loop.
template <int EPI, int CG, bool F8>
__device__ constexpr int odd_from_chunk() { return CG == 2 && F8 && EPI != EPI_STAGED ? 7 : 1 << 30; }
// consume_item at `chunks` chunks of 16 columns, or from odd_from_chunk one n8 tile less where
// the item's rows leave the last 8 columns empty (`narrow`).
template <bool F8, int EPI, int CG, int C = 1>
__device__ __forceinline__ void consume_wgmma(int chunks, bool narrow, const GemmArgs& p, const GemmItem& it,
                                              const Ring& rg, u32& n, int warp, int lane) {
    if constexpr (C < wg_max_chunks<CG, F8>()) {
        if (chunks > C) {
            consume_wgmma<F8, EPI, CG, C + 1>(chunks, narrow, p, it, rg, n, warp, lane);
            return;
        }
    }
    if constexpr (C >= odd_from_chunk<EPI, CG, F8>()) {
        if (narrow) {
            consume_item<2 * C - 1, 0, true, F8, EPI, CG>(p, it, rg, n, warp, lane);
            return;
        }
    }
    consume_item<2 * C, 0, true, F8, EPI, CG>(p, it, rg, n, warp, lane);
}

// STAGES: the ring's slots, or 0 for the launch's `stages` (the wgmma kernel's ring depth
// follows its item height). F8: E4M3 products, whose wgmma reads A as two boxes of 128 bytes.
// EPI: the epilogue (EPI_LANES, EPI_STAGED, EPI_ACT). CG: the wgmma kernel's consumer warpgroups
// (an item is 64 CG weight rows); with three, a producer warpgroup hands its registers over
// (reg_handoff), as it does for E4M3 products.
template <int NT, int STAGES, bool WG, bool F8, int EPI, int CG>
__device__ __forceinline__ void fp4_gemm(const GemmArgs& p, const TmaMap* w_map, const TmaMap* a_map,
                                         const ShortBoxes* a_short) {
    static_assert(WG || (!F8 && CG == 2), "E4M3 products and three warpgroups run in the wgmma kernel");
    static_assert(EPI != EPI_ACT || CG == 2 || CG == 4, "the activation epilogue runs on two or four warpgroups");
    static_assert(EPI != EPI_ACT || F8, "the activation epilogue takes E4M3 products");
    constexpr int CONS = 128 * CG;                     // consumer threads
    constexpr int ITEM_N = item_rows<WG, CG>();        // weight rows (output columns) of an item
    constexpr int W_BYTES = ITEM_N * 128;              // the weight box: ITEM_N rows x 128 bytes
    // With EPI_ACT, a scale tile for each half's rows.
    constexpr int SF_TILES = EPI == EPI_ACT ? 2 : item_scale_tiles<ITEM_N>();
    // Items step over N by their weight rows, or with EPI_ACT over each half of W by 32 CG.
    constexpr int STEP = EPI == EPI_ACT ? ITEM_N / 2 : ITEM_N;
    const int bm = WG ? p.bm : 8 * NT;
    extern __shared__ u8 smem_raw[];
    // The 128-byte swizzle repeats every 1024 bytes: the ring starts on such a boundary, and
    // every slot and box is a whole number of them. (Offset from the shared array itself, so
    // that reads stay shared-memory loads.)
    Ring rg;
    rg.base = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
    rg.a_box = bm * 128;
    rg.a_boxes = F8 ? 2 : 4;
    rg.stage = W_BYTES + rg.a_boxes * rg.a_box + SF_TILES * S_BYTES;
    rg.stages = STAGES ? STAGES : p.stages;
    rg.full = (u64*)(rg.base + rg.stages * rg.stage);
    rg.empty = rg.full + rg.stages;
    constexpr bool DEFER = c_defer<EPI, CG, F8>();
    static_assert(!DEFER || reg_handoff<F8, CG>(), "the epilogue warps are the producer warpgroup's");
    // setmaxnreg moves registers within the block's allocation: the count the kernel compiles to
    // (65536 over its threads, to a multiple of 8, which kernels.rs checks) times its threads.
    // The consumers' increase waits for its registers, forever if the two counts ask for more
    // (232 and 48 with the activation hung the kernel).
    constexpr int THREADS = gemm_threads<F8, CG>();
    constexpr int HANDOFF_REGS = consumer_regs<EPI, CG>() * CONS + producer_regs<EPI, CG>() * 128;
    static_assert(!reg_handoff<F8, CG>() || HANDOFF_REGS <= (65536 / THREADS & ~7) * THREADS,
                  "the consumers' and the producer's registers exceed the block's");
    rg.c_bar = rg.empty + rg.stages;
    rg.c_buf = (u8*)(rg.c_bar + 2);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (tid == 0) {
        for (int s = 0; s < rg.stages; ++s) {
            mbar_init(rg.full + s, 1);
            mbar_init(rg.empty + s, CONS);
        }
        if constexpr (DEFER) {
            mbar_init(rg.c_bar, CONS);
            mbar_init(rg.c_bar + 1, DEFER_WARPS * 32);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    // GEMM 1 with the activation lets a GEMM 2 launched as its dependent start on the
    // multiprocessors it leaves (runner.rs); that GEMM 2 waits for each row tile (p.wait).
    if constexpr (EPI == EPI_ACT) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const int span = EPI == EPI_ACT ? p.N / 2 : p.N, n_tiles = (span + STEP - 1) / STEP;
    const int items = p.tile_start[p.E] * n_tiles;
    if (warp >= CONS / 32) {
        // The producer.
        if constexpr (reg_handoff<F8, CG>())
            asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(producer_regs<EPI, CG>()));
        if constexpr (DEFER) {
            if (warp > CONS / 32) {
                // The epilogue warps: each of this block's items from the C buffer (c_defer).
                u32 j = 0;
                for (int item = blockIdx.x; item < items; item += gridDim.x, ++j) {
                    const GemmItem it = gemm_item(p, item, n_tiles, STEP, bm);
                    const int rows = min(min(max(p.counts[it.e], 0), p.cap) - it.m0, bm);
                    const long long base = row_base(p.row0, p.cap, it.e) + it.m0;
                    const int first = tid - CONS - 32, step = DEFER_WARPS * 32;
                    if constexpr (EPI == EPI_ACT) {
                        const long long pitch = row_bytes(p.N / 2, p.act_layout);
                        const float gs = p.act_gs[it.e];
                        mbar_wait(rg.c_bar, j & 1);
                        act_rows<CG>(p, it, rg.c_buf, rows, base, pitch, gs, first, step);
                        if (p.done) {
                            // Counted for a GEMM 2 that starts early, as count_done does, once
                            // all three warps have written (their own barrier).
                            asm volatile("fence.proxy.async.global;" ::: "memory");
                            asm volatile("bar.sync 2, %0;" ::"n"(DEFER_WARPS * 32) : "memory");
                            if (first == 0) {
                                asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(p.done + 1 + it.tile)
                                             : "memory");
                                asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(p.done) : "memory");
                            }
                        }
                    } else {
                        mbar_wait(rg.c_bar, j & 1);
                        store_rows<CG>(p, it, rg.c_buf, rows, base, first, step);
                    }
                    mbar_arrive(rg.c_bar + 1);
                }
                return;
            }
        }
        if (warp != CONS / 32 || lane != 0) return;
        const int stages = (p.K + KS - 1) / KS, k_tiles = (p.K + 63) / 64;
        const int sf_tiles = (p.N + 127) / 128;  // 128-row tiles of the swizzled scales
        // GEMM 1 with the activation, before a GEMM 2 that waits on it (p.done): once the
        // consumers have released the slot of ring use m, which they do after an item's last
        // stage only once its rows of GEMM 2's input are written (store_act_staged), the item
        // is counted, by this thread, which is waiting on the ring anyway. Its release at the
        // GPU's scope covers the consumers' writes, which the slot's barrier ordered before it;
        // the proxy fences (the writers' in store_act_staged, this one, GEMM 2's after its
        // acquire) order those generic-proxy writes before GEMM 2's TMA reads (they measured
        // no cost: 32 rows 2380 to 2396 us a pass against 2372 to 2412 without the writers').
        // (Counted by a consumer after a barrier of theirs, GEMM 1 took 16 us longer at decode.)
        // With c_defer the slot is released before the epilogue warps write: they count.
        auto count_done = [&](u32 m) {
            if (!p.done || m % stages != (u32)stages - 1) return;
            const int tile = (blockIdx.x + (int)(m / stages) * gridDim.x) / n_tiles;
            asm volatile("fence.proxy.async.global;" ::: "memory");
            asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(p.done + 1 + tile) : "memory");
            asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(p.done) : "memory");
        };
        u32 n = 0;
        bool gemm1_done = false;  // p.wait: all of GEMM 1's items are done
        for (int item = blockIdx.x; item < items; item += gridDim.x) {
            const GemmItem it = gemm_item(p, item, n_tiles, STEP, bm);
            const int rows0 = (int)row_base(p.row0, p.cap, it.e) + it.m0;
            // A wgmma item reads only its rows rounded up to 16 or 8 (consume_wgmma), and its rows
            // are often fewer than bm (routed counts scatter below the item height; a masked
            // buffer's rows past masked_m): it loads the shortest box of 16, 32, 64 or 128 rows
            // that holds them, if shorter than bm, so that fewer rows cross L2 (or come from
            // DRAM) unread. One box a column still: more TMA requests a stage (boxes of 16
            // rows, several an item) measured slower. (H100, ncu, against boxes of bm rows:
            // GEMM 1 at 32 rows per expert 1536 to 1538 us against 1569 to 1576 with exact
            // products, 1491 to 1520 against 1554 to 1598 with E4M3; at 64 rows 1% to 1.5% less.)
            if (p.wait && !gemm1_done) {
                // GEMM 2 launched before GEMM 1 finished: this row tile's input is complete once
                // each of GEMM 1's items over it has been counted (count_done), and all of it
                // once all of GEMM 1's items have; from then on nothing is waited for (an
                // acquire and a proxy fence before every item made GEMM 2 100 us slower at 1
                // row per expert, 820 against 720 us, even with nothing left to wait for).
                const int all = p.tile_start[p.E] * p.wait_for;
                int v;
                asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p.wait) : "memory");
                gemm1_done = v >= all;
                while (!gemm1_done) {
                    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p.wait + 1 + it.tile) : "memory");
                    if (v >= p.wait_for) break;
                    __nanosleep(256);
                }
                // The TMA reads (async proxy) after the acquire.
                asm volatile("fence.proxy.async.global;" ::: "memory");
            }
            const TmaMap* am = a_map;
            int box_bytes = rg.a_box;
            if constexpr (WG) {
                const int rows = min(min(max(p.counts[it.e], 0), p.cap) - it.m0, bm);
#pragma unroll
                for (int k = 0; k < SHORT_BOXES; ++k)
                    if ((16 << k) >= rows && (16 << k) * 128 < box_bytes) am = &a_short->h[k], box_bytes = (16 << k) * 128;
            }
            // Scale tiles past N are not copied (their rows' codes are the TMA's zeros). With
            // EPI_ACT, the tiles of the item's rows in either half.
            const int sf0 = it.n0 / 128, sfn = EPI == EPI_ACT ? 2 : min(SF_TILES, sf_tiles - sf0);
            const int sf_step = EPI == EPI_ACT ? p.N / 256 : 1;  // tiles from one copied to the next
            const u8* sf = p.w_sf + ((long long)it.e * sf_tiles + sf0) * k_tiles * 512;
            for (int st = 0; st < stages; ++st, ++n) {
                const int slot = n % rg.stages;
                if (n >= (u32)rg.stages) {
                    mbar_wait(rg.empty + slot, (n / rg.stages - 1) & 1);
                    if constexpr (EPI == EPI_ACT && !DEFER) count_done(n - rg.stages);
                }
                u8* base = rg.base + slot * rg.stage;
                const int kt = min(4, k_tiles - 4 * st);
                mbar_expect_tx(rg.full + slot, W_BYTES + rg.a_boxes * box_bytes + sfn * kt * 512);
                if constexpr (EPI == EPI_ACT) {
                    // The item's rows of each half, by a map of 128-row boxes.
                    tma_3d(base, w_map, st * (KS / 2), it.n0, it.e, rg.full + slot);
                    tma_3d(base + W_BYTES / 2, w_map, st * (KS / 2), p.N / 2 + it.n0, it.e, rg.full + slot);
                } else {
                    tma_3d(base, w_map, st * (KS / 2), it.n0, it.e, rg.full + slot);
                }
                // A shorter box lands as the first rows of a box of bm rows would (whole 1024-byte
                // swizzle periods from the same start).
                for (int c = 0; c < rg.a_boxes; ++c)
                    tma_2d(base + W_BYTES + c * rg.a_box, am, st * KS + c * (KS / rg.a_boxes), rows0, rg.full + slot);
                for (int i = 0; i < sfn; ++i)
                    bulk_copy(base + W_BYTES + rg.a_boxes * rg.a_box + i * S_BYTES,
                              sf + (long long)(i * sf_step) * k_tiles * 512 + st * 2048, kt * 512, rg.full + slot);
            }
        }
        if constexpr (EPI == EPI_ACT && !DEFER) {
            // The ring's last uses, whose slots no later stage waited for.
            if (p.done)
                for (u32 m = n > (u32)rg.stages ? n - rg.stages : 0; m < n; ++m) {
                    mbar_wait(rg.empty + m % rg.stages, (m / rg.stages) & 1);
                    count_done(m);
                }
        }
        return;
    }
    if constexpr (reg_handoff<F8, CG>())
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(consumer_regs<EPI, CG>()));
    u32 n = 0;
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
        const GemmItem it = gemm_item(p, item, n_tiles, STEP, bm);
        if constexpr (WG) {
            const int rows = min(min(max(p.counts[it.e], 0), p.cap) - it.m0, bm);
            const int chunks = min((rows + 15) >> 4, wg_max_chunks<CG, F8>());
            consume_wgmma<F8, EPI, CG>(chunks, 16 * chunks - rows >= 8, p, it, rg, n, warp, lane);
        } else {
            consume_item<NT, STAGES, false, false, EPI_LANES, CG>(p, it, rg, n, warp, lane);
        }
    }
}

#define FP4_GEMM(NAME, NT, STAGES, WG, F8, EPI, CG)                                                     \
    extern "C" __global__ void __launch_bounds__(gemm_threads<F8, CG>(), 1) NAME(                       \
        const __grid_constant__ TmaMap w_map, const __grid_constant__ TmaMap a_map,                     \
        const __grid_constant__ ShortBoxes a_short, GemmArgs p) {                                       \
        fp4_gemm<NT, STAGES, WG, F8, EPI, CG>(p, &w_map, &a_map, &a_short);                             \
    }
// Up to 16 rows an item (exact products), mma.sync per warp. One block an SM with the deepest
// ring that fits measured faster than two blocks of four stages (H100: 2120 against 2158 us at
// 1 row per expert, 2334 against 2377 at 16; eight stages at 1 row were no better than six).
// Past 16 rows, and at every size with E4M3 products, the warpgroups' wgmma, which reads each
// step of the rows once for four warps. Three consumer warpgroups (items of 192 weight rows)
// keep the tensor cores busier than two while the others widen codes and wait on dependencies
// (H100, 64 rows: GEMM 1 6% and GEMM 2 5% to 13% faster; at 8 and 16 rows mma.sync stays 3% to
// 6% faster); with E4M3 products they take items up to 96 rows, since their registers hold no
// wider second set of sums, and two take taller ones (runner.rs, gemm_for in kernels.rs).
FP4_GEMM(fp4_gemm_n1, 1, 6, false, false, EPI_LANES, 2)
FP4_GEMM(fp4_gemm_n2, 2, 6, false, false, EPI_LANES, 2)
FP4_GEMM(fp4_wgmma3, 0, 0, true, false, EPI_LANES, 3)
FP4_GEMM(fp4_wgmma_f8, 0, 0, true, true, EPI_LANES, 2)
FP4_GEMM(fp4_wgmma3_f8, 0, 0, true, true, EPI_LANES, 3)
// The same, writing C through shared memory: for a short K, where the stores of C are a large
// share of an item (runner.rs, STAGED_MAX_K).
FP4_GEMM(fp4_wgmma3_staged, 0, 0, true, false, EPI_STAGED, 3)
FP4_GEMM(fp4_wgmma_f8_staged, 0, 0, true, true, EPI_STAGED, 2)
FP4_GEMM(fp4_wgmma3_f8_staged, 0, 0, true, true, EPI_STAGED, 3)
// Four consumer warpgroups (items of 256 weight rows, up to 64 rows), with E4M3 and with exact
// products: GEMM 2 at items of 48 and 64 rows (kernels.rs, Fp4Kernels::gemm2_for).
FP4_GEMM(fp4_wgmma4_f8, 0, 0, true, true, EPI_LANES, 4)
FP4_GEMM(fp4_wgmma4_f8_staged, 0, 0, true, true, EPI_STAGED, 4)
FP4_GEMM(fp4_wgmma4, 0, 0, true, false, EPI_LANES, 4)
FP4_GEMM(fp4_wgmma4_staged, 0, 0, true, false, EPI_STAGED, 4)
// GEMM 1 of a gated activation with the activation and its requantization in the epilogue, for
// items up to 64 rows (decode): C is never written and the activation kernel not launched
// (kernels.rs, Fp4Kernels::gemm1_act_for). Only where the activation's gate and up are W's
// halves, and with E4M3 products: with exact ones, this kernel measured slower than the
// three-warpgroup GEMM 1 and the activation kernel together.
#if ACT < 5 && GATE_UP != 2
FP4_GEMM(fp4_wgmma4_f8_act, 0, 0, true, true, EPI_ACT, 4)
// The same on two consumer warpgroups, for items taller than 96 rows (kernels.rs, act_epilogue).
FP4_GEMM(fp4_wgmma_f8_act, 0, 0, true, true, EPI_ACT, 2)
#endif
