//! The NVFP4 kernels, compiled as one module per activation (the triton backend's
//! `activation`, so both backends apply it identically): `kernels/rows.cu` (the GEMM inputs:
//! quantization, expansion, the activation), `kernels/gemm.cu` (the row tiles and the grouped
//! GEMM) and `kernels/route.cu` (the standard layout's grouping and top-k sum).

use moe_backend_triton::kernels::{ACTIVATION, COMMON, FP4, HOPPER};
use moe_backend_triton::stages::gate_up_code;
use moe_backend_triton::stages::Arg;
use moe_runner_core::cuda::compile_module;
use moe_runner_core::cuda::cudarc::driver::sys::CUfunction_attribute_enum;
use moe_runner_core::cuda::cudarc::driver::{
    CudaFunction, DeviceRepr, DriverError, LaunchArgs, PushKernelArg,
};
use moe_runner_core::{CudaDevice, GateUpLayout, MoeError, Nvfp4Products, Result};

const NVFP4: &str = concat!(
    include_str!("kernels/rows.cu"),
    include_str!("kernels/gemm.cu"),
    include_str!("kernels/route.cu")
);

/// A block's registers: a kernel whose producer warpgroup hands its registers to the consumers
/// (`setmaxnreg` in gemm.cu, `reg_handoff`) must be compiled to this over its threads (to a
/// multiple of 8: 168 for 384 threads, 128 for 512, 96 for 640), which the two counts add up
/// to.
const BLOCK_REGS: usize = 65536;
/// Values of K per GEMM stage: GEMM inputs are rows of whole segments of this many values.
pub const SEGMENT: usize = 256;

/// The most rows of an expert the wgmma kernel takes in one work item (its widest wgmma).
pub const WG_MAX_ROWS: usize = 160;
/// The most rows an item of the wgmma kernel with three consumer warpgroups and E4M3 products
/// takes (gemm.cu, `wg_max_chunks`): items up to this tall take that kernel, whose third
/// warpgroup keeps the tensor cores busier while the others widen codes and wait (its registers
/// hold no wider sums). With exact products it takes every height.
pub const WG3_MAX_ROWS_E4M3: usize = 96;
/// The most rows an item of GEMM 1 with the activation in its epilogue on four consumer
/// warpgroups takes (at 112 registers: past this, ptxas serializes their wgmma); items taller
/// than `WG3_MAX_ROWS_E4M3` take it on two (`act_epilogue`).
pub const ACT_MAX_ROWS: usize = 64;
/// The item heights at which GEMM 2 takes four consumer warpgroups (items of 256 weight rows,
/// which divide H of DeepSeek-V3 and Qwen3, 7168 and 4096, where 192 leaves a third of the last
/// item empty, and an expert's input rows are read 28 times, not 38, at H = 7168). H100,
/// DeepSeek-V3 shapes, whole passes at 32 rows per expert (items of 64): E4M3 products 2409 to
/// 2442 us against 2449 to 2506 with three warpgroups, exact products 2464 to 2478 against 2484
/// to 2516. With E4M3 products at 16 rows (items of 32) 2274 to 2279 against 2263 to 2272, and
/// alone under Nsight Compute at 1 row 1% slower, so not below 48 (exact products take
/// `mma.sync` there).
const GEMM2_WG4_ROWS: std::ops::RangeInclusive<usize> = 48..=ACT_MAX_ROWS;
/// Dynamic shared memory a block may opt into on Hopper (227 KiB).
const SMEM_MAX: usize = 232_448;

/// One variant of the GEMM.
pub struct Gemm {
    pub f: CudaFunction,
    /// The wgmma kernels' instantiation that writes C through shared memory, 16 bytes a lane,
    /// where C's rows start on 16 bytes (gemm.cu, `store_c_staged`).
    pub staged: Option<CudaFunction>,
    /// Rows of an expert per work item: the mma.sync variants' fixed `8 * nt`, or, for the
    /// wgmma kernel, the most it takes (each launch picks its own, a multiple of 16).
    pub rows: usize,
    /// Weight rows (output columns) of an item: 128 for mma.sync, 64 a consumer warpgroup for
    /// wgmma (with `act`, half of them from each half of `w13`).
    pub item_n: usize,
    /// GEMM 1 with the activation and its requantization in its epilogue (gemm.cu,
    /// `act_rows`: by the consumers, or on two consumer warpgroups by the producer
    /// warpgroup's epilogue warps): it writes GEMM 2's input instead of C.
    pub act: bool,
    /// Warpgroup MMAs (wgmma), which read the GEMM input in their own layout.
    pub wg: bool,
    /// E4M3 products (`Nvfp4Products::E4m3`).
    pub f8: bool,
    /// Ring slots: the mma.sync variants' (tuned), or the most the wgmma kernel uses.
    pub stages: usize,
    /// Threads a block.
    pub threads: usize,
    /// Blocks an SM holds.
    pub per_sm: usize,
}

impl Gemm {
    /// The 128-row scale tiles a ring slot holds: those the item's rows touch, or with `act`
    /// one for each half of `w13` (gemm.cu, `SF_TILES`).
    fn sf_tiles(&self) -> usize {
        if self.act {
            2
        } else {
            scale_tiles(self.item_n)
        }
    }

    /// Shared memory past the ring at items of `bm` rows, for the instantiation that writes C
    /// through shared memory (`staged`, or the activation's): on two consumer warpgroups with
    /// E4M3 products, its C buffer (gemm.cu, `c_defer`), `bm` rows of 272 bytes after two
    /// barriers.
    fn c_buffer(&self, bm: usize, staged: bool) -> usize {
        // Items of 128 weight rows: two consumer warpgroups.
        if (staged || self.act) && self.wg && self.f8 && self.item_n == 128 {
            16 + bm * (2 * self.item_n + 16)
        } else {
            0
        }
    }
}

/// One launch's choice: the variant, rows of an expert per item, ring slots and the dynamic
/// shared memory they take.
#[derive(Clone, Copy)]
pub struct GemmPlan<'a> {
    pub gemm: &'a Gemm,
    pub bm: usize,
    pub stages: usize,
    pub smem: usize,
}

/// GEMM 2's launch (`Fp4Kernels::gemm2_for`).
pub struct Gemm2Plan<'a> {
    pub plan: GemmPlan<'a>,
    /// GEMM 2 starts on the multiprocessors GEMM 1 leaves, as its programmatic dependent, and
    /// waits per row tile for GEMM 1's items over it (runner.rs, `Order`). Where GEMM 1's items
    /// are bound by each multiprocessor's work rather than by the memory they share, its last
    /// wave of a few items leaves most multiprocessors idle: H100, DeepSeek-V3 shapes, 32 rows
    /// per expert, whole passes 2387 to 2441 us against 2425 to 2461 with neither change (the
    /// same GEMM 2 waiting for GEMM 1 to finish: 2409 to 2442). At 1 and 16 rows the early
    /// start measured 8 to 10 us slower (GEMM 1 counting its items, and GEMM 2's blocks taking
    /// memory bandwidth from GEMM 1's last items, which gain nothing when the memory bounds
    /// them).
    pub early: bool,
}

/// Bytes of one row of a GEMM input per stage of `SEGMENT` values: f16, or E4M3 bytes for the
/// wgmma kernel with E4M3 products.
fn a_row_bytes(wg: bool, f8: bool) -> usize {
    if wg && f8 {
        SEGMENT
    } else {
        2 * SEGMENT
    }
}

/// Dynamic shared memory of a ring: per slot the weight box (`item_n` rows of 128 bytes), a
/// stage of `bm` rows of the GEMM input (`a_row` bytes each) and `sf_tiles` tiles of block
/// scales (2048 bytes each), then a barrier pair per slot, and 1024 bytes to align the ring
/// for the swizzle.
fn ring_bytes(bm: usize, item_n: usize, stages: usize, a_row: usize, sf_tiles: usize) -> usize {
    stages * (item_n * 128 + bm * a_row + 2048 * sf_tiles) + stages * 16 + 1024
}

/// The 128-row scale tiles an item of `item_n` weight rows touches (gemm.cu,
/// `item_scale_tiles`).
fn scale_tiles(item_n: usize) -> usize {
    item_n / 128 + usize::from(!item_n.is_multiple_of(128))
}

/// Rows of an expert per item of the wgmma kernel for about `expected` rows per expert, at most
/// `cap`: `expected + 3 sqrt(expected)`, rounded up to 16 (so at least 16, also for an
/// `expected` of 0, which a dispatcher may report), at most `WG_MAX_ROWS`.
fn wgmma_item_rows(expected: usize, cap: usize) -> usize {
    let spread = expected + (expected as f64).sqrt().ceil() as usize * 3;
    spread
        .clamp(1, cap.max(1))
        .next_multiple_of(16)
        .min(WG_MAX_ROWS)
}

/// The deepest ring of items of `bm` rows (`a_row` bytes of input each a stage) by `item_n`
/// weight rows (`sf_tiles` scale tiles) that fits in shared memory beside `extra` bytes, up to
/// `most` slots (two at the tallest f16 items, three with E4M3 products).
fn wgmma_stages(
    bm: usize,
    item_n: usize,
    most: usize,
    a_row: usize,
    sf_tiles: usize,
    extra: usize,
) -> usize {
    (1..=most)
        .rev()
        .find(|&s| ring_bytes(bm, item_n, s, a_row, sf_tiles) + extra <= SMEM_MAX)
        .unwrap_or(1)
}

pub struct Fp4Kernels {
    pub quant_rows: CudaFunction,
    pub expand_rows: CudaFunction,
    pub tiles: CudaFunction,
    /// The GEMM for 8 and 16 rows per work item (mma.sync), with exact (f16) products.
    pub mma_sync: [Gemm; 2],
    /// The wgmma kernel with exact products (three consumer warpgroups), past 16 rows.
    pub wgmma: Gemm,
    /// The wgmma kernel with E4M3 products, for every batch size: three consumer warpgroups up
    /// to `WG3_MAX_ROWS_E4M3` rows an item, then two.
    pub wgmma_e4m3: [Gemm; 2],
    /// GEMM 1 with the activation in its epilogue, E4M3 products: for gated activations whose
    /// gate and up are the halves of `w13` (not interleaved). Four consumer warpgroups (items
    /// up to `ACT_MAX_ROWS`), then two (items past `WG3_MAX_ROWS_E4M3`).
    pub gemm1_act: Option<[Gemm; 2]>,
    /// GEMM 2 with E4M3 products at items of 48 and 64 rows: four consumer warpgroups, items of
    /// 256 weight rows (`gemm2_for`).
    pub gemm2_wg4: Gemm,
    /// The same with exact products.
    pub gemm2_wg4_exact: Gemm,
    pub act_quant: CudaFunction,
    pub route: CudaFunction,
    pub route_count: CudaFunction,
    pub route_rows: CudaFunction,
    pub combine: CudaFunction,
}

/// `wgmma_rs<NT>`: one m64 x (8 NT) x k16 product, A (f16) from registers, B from shared memory,
/// accumulating in f32, for every width the wgmma kernel issues (8 to 160 columns in steps of
/// 8: gemm.cu's items take widths in steps of 16, and odd_from_chunk's also those between);
/// `wgmma_rs_e4m3<NT>` the same as m64 x (8 NT) x k32 of E4M3 bytes. The accumulator list
/// of a wgmma instruction is one operand per register, so they are generated.
fn wgmma_rs_source() -> String {
    let mut src = String::new();
    // (name, k and types, the immediates after scale-d: with A from registers the 16-bit form
    // also names B's transposition, which FP8 has not)
    for (name, shape, imm, scale_d) in [
        ("wgmma_rs", "k16.f32.f16.f16", "1, 1, 0", false),
        ("wgmma_rs_e4m3", "k32.f32.e4m3.e4m3", "1, 1", true),
    ] {
        src += &wgmma_family(name, shape, imm, scale_d);
    }
    src
}

/// One family of `wgmma_rs` forms; with `scale_d`, a last argument that is 0 where the product
/// starts its accumulators afresh (scale-d false) instead of adding to them.
fn wgmma_family(name: &str, shape: &str, imm: &str, scale_d: bool) -> String {
    let param = if scale_d { ", int scale_d" } else { "" };
    let mut src = format!(
        "template <int NT> __device__ __forceinline__ void {name}(float* d, const u32* a, u64 b{param});\n",
    );
    for nt in 1..=20 {
        let regs = 4 * nt;
        let list: Vec<String> = (0..regs).map(|i| format!("%{i}")).collect();
        let outs: Vec<String> = (0..regs).map(|i| format!("\"+f\"(d[{i}])")).collect();
        let (pred, pred_arg) = if scale_d {
            (format!("%{}", regs + 5), ", \"r\"(scale_d)")
        } else {
            ("1".to_string(), "")
        };
        src += &format!(
            "template <> __device__ __forceinline__ void {name}<{nt}>(float* d, const u32* a, u64 b{param}) {{\n\
             asm volatile(\"{{\\n.reg .pred p;\\nsetp.ne.b32 p, {pred}, 0;\\n\
             wgmma.mma_async.sync.aligned.m64n{n}{shape} {{{list}}}, {{%{a0}, %{a1}, %{a2}, %{a3}}}, %{b}, p, {imm};\\n}}\\n\"\n\
             : {outs} : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"l\"(b){pred_arg});\n}}\n",
            n = 8 * nt,
            a0 = regs,
            a1 = regs + 1,
            a2 = regs + 2,
            a3 = regs + 3,
            b = regs + 4,
            list = list.join(", "),
            outs = outs.join(", "),
        );
    }
    src
}

impl Fp4Kernels {
    pub fn new(dev: &CudaDevice, act: u8, gate_up: GateUpLayout) -> Result<Self> {
        let gate_up = gate_up_code(gate_up);
        let module = compile_module(
            dev,
            "cutedsl_fp4",
            &format!(
                "{COMMON}\n{FP4}\n{ACTIVATION}\n{HOPPER}\n{}\n{NVFP4}",
                wgmma_rs_source()
            ),
            &[
                ("ACT", act.to_string()),
                ("GATE_UP", gate_up.to_string()),
                ("ACT_F16", "0".into()),
            ],
        )?;
        let load = |name: &str| {
            module.load_function(name).map_err(|e| MoeError::Kernel {
                name: name.into(),
                log: e.to_string(),
            })
        };
        // (rows per item / 8, consumer warpgroups, ring stages, wgmma, E4M3 products, the
        // activation in the epilogue), as gemm.cu instantiates them; the wgmma kernel's `nt` is
        // its widest item.
        let gemm =
            |nt: usize, cg: usize, stages: usize, wg: bool, f8: bool, act: bool| -> Result<Gemm> {
                let name = match (wg, cg) {
                    (true, 2) => "fp4_wgmma".to_string(),
                    (true, _) => format!("fp4_wgmma{cg}"),
                    (false, _) => format!("fp4_gemm_n{nt}"),
                } + if f8 { "_f8" } else { "" }
                    + if act { "_act" } else { "" };
                let item_n = if wg { 64 * cg } else { 128 };
                let smem = if wg {
                    SMEM_MAX
                } else {
                    ring_bytes(
                        8 * nt,
                        item_n,
                        stages,
                        a_row_bytes(wg, f8),
                        scale_tiles(item_n),
                    )
                };
                // Consumer warps (two, three or four warpgroups), then the producer: a warp, or a
                // warpgroup whose registers go to the consumers (gemm.cu, `reg_handoff`).
                let handoff = wg && (f8 || cg >= 3);
                let threads = 128 * cg + if handoff { 128 } else { 32 };
                // Loads one instantiation and opens its shared memory.
                let prepare = |name: &str| -> Result<CudaFunction> {
                    let f = load(name)?;
                    let kerr = |e: DriverError| MoeError::Kernel {
                        name: name.into(),
                        log: e.to_string(),
                    };
                    f.set_attribute(
                        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem as i32,
                    )
                    .map_err(kerr)?;
                    if handoff {
                        // setmaxnreg hands the producer warpgroup's registers to the consumers:
                        // their counts balance only at the block's registers over its threads,
                        // which the kernel is compiled to; with fewer, the consumers' request
                        // would wait forever.
                        let want = (BLOCK_REGS / threads) as i32 & !7;
                        let regs = f.num_regs().map_err(kerr)?;
                        if regs != want {
                            return Err(MoeError::Kernel {
                                name: name.into(),
                                log: format!(
                                "compiled to {regs} registers a thread; setmaxnreg assumes {want}"
                            ),
                            });
                        }
                    }
                    Ok(f)
                };
                let f = prepare(&name)?;
                let staged = if wg && !act {
                    Some(prepare(&format!("{name}_staged"))?)
                } else {
                    None
                };
                let per_sm = f
                    .occupancy_max_active_blocks_per_multiprocessor(threads as u32, smem, None)
                    .map_err(|e| MoeError::Kernel {
                        name: name.clone(),
                        log: e.to_string(),
                    })?
                    .max(1) as usize;
                Ok(Gemm {
                    f,
                    staged,
                    rows: 8 * nt,
                    item_n,
                    act,
                    wg,
                    f8,
                    stages,
                    threads,
                    per_sm,
                })
            };
        Ok(Self {
            quant_rows: load("fp4_quant_rows")?,
            expand_rows: load("fp4_expand_rows")?,
            tiles: load("fp4_tiles")?,
            mma_sync: [
                gemm(1, 2, 6, false, false, false)?,
                gemm(2, 2, 6, false, false, false)?,
            ],
            wgmma: gemm(WG_MAX_ROWS / 8, 3, 4, true, false, false)?,
            wgmma_e4m3: [
                gemm(WG3_MAX_ROWS_E4M3 / 8, 3, 4, true, true, false)?,
                gemm(WG_MAX_ROWS / 8, 2, 4, true, true, false)?,
            ],
            // gemm.cu instantiates it for the activations of ACT < 5 (gated) unless
            // interleaved.
            gemm1_act: if act < 5 && gate_up != 2 {
                Some([
                    gemm(ACT_MAX_ROWS / 8, 4, 4, true, true, true)?,
                    gemm(WG_MAX_ROWS / 8, 2, 4, true, true, true)?,
                ])
            } else {
                None
            },
            gemm2_wg4: gemm(ACT_MAX_ROWS / 8, 4, 4, true, true, false)?,
            gemm2_wg4_exact: gemm(ACT_MAX_ROWS / 8, 4, 4, true, false, false)?,
            act_quant: load("fp4_act_quant")?,
            route: load("fp4_route")?,
            route_count: load("fp4_route_count")?,
            route_rows: load("fp4_route_rows")?,
            combine: load("fp4_combine")?,
        })
    }

    /// The GEMM for about `expected` rows per expert, at most `cap`. Up to 16, the smallest
    /// mma.sync item that holds them, so decode batches compute no empty n8 tiles. Past that,
    /// the wgmma kernel, whose items take up to `expected + 3 sqrt(expected)` rows (rounded up
    /// to 16, at most 160): routed counts scatter about their mean like a Poisson count, so
    /// nearly every expert fits one item, and each item's wgmma is only as wide as its rows.
    /// An expert past the item takes a second one, which streams its weights again. With E4M3
    /// products, items up to `WG3_MAX_ROWS_E4M3` tall take three consumer warpgroups, taller
    /// ones two; exact products take three at every height.
    /// E4M3 products take the wgmma kernel at every size: at 1 to 32 rows it took 7% to 15% less
    /// time than mma.sync on f16 values rounded to E4M3 and back.
    pub fn gemm_for(&self, expected: usize, cap: usize, products: Nvfp4Products) -> GemmPlan<'_> {
        let bm = wgmma_item_rows(expected, cap);
        let g = match products {
            Nvfp4Products::E4m3 => &self.wgmma_e4m3[usize::from(bm > WG3_MAX_ROWS_E4M3)],
            Nvfp4Products::Exact => {
                if let Some(g) = self.mma_sync.iter().find(|g| g.rows >= expected) {
                    return GemmPlan {
                        gemm: g,
                        bm: g.rows,
                        stages: g.stages,
                        smem: ring_bytes(
                            g.rows,
                            g.item_n,
                            g.stages,
                            a_row_bytes(false, false),
                            g.sf_tiles(),
                        ),
                    };
                }
                &self.wgmma
            }
        };
        wgmma_plan(g, bm)
    }

    /// GEMM 1 with the activation and its requantization in its epilogue, where it applies
    /// (`act_epilogue`) beside `plan`, the plan `gemm_for` gave: same products, same items.
    pub fn gemm1_act_for(&self, plan: &GemmPlan<'_>, inter: usize) -> Option<GemmPlan<'_>> {
        let [four, two] = self.gemm1_act.as_ref()?;
        let g = if plan.bm <= ACT_MAX_ROWS { four } else { two };
        act_epilogue(plan.gemm.f8, plan.bm, inter).then(|| wgmma_plan(g, plan.bm))
    }
    /// GEMM 2's launch beside `plan`, the plan `gemm_for` gave (same products, same items), and
    /// `act`, whether GEMM 1 takes the activation in its epilogue (`gemm1_act_for`): at items of
    /// 48 or 64 rows (`GEMM2_WG4_ROWS`), the four-warpgroup kernel of the plan's products, and
    /// after such a GEMM 1 (E4M3 products only) an early start; after such a GEMM 1 at items
    /// taller than `WG3_MAX_ROWS_E4M3` (two consumer warpgroups), the plan's kernel with an
    /// early start.
    pub fn gemm2_for<'a>(&'a self, plan: &GemmPlan<'a>, act: bool) -> Gemm2Plan<'a> {
        if gemm2_wg4(plan.gemm.wg, plan.bm) {
            let g = if plan.gemm.f8 {
                &self.gemm2_wg4
            } else {
                &self.gemm2_wg4_exact
            };
            Gemm2Plan {
                plan: wgmma_plan(g, plan.bm),
                early: early_start(act, plan.bm),
            }
        } else {
            Gemm2Plan {
                plan: *plan,
                early: early_start(act, plan.bm),
            }
        }
    }
}

/// Whether GEMM 2 takes the four-warpgroup kernel (`Fp4Kernels::gemm2_for`): a `wg` (wgmma)
/// plan of items of `bm` rows in `GEMM2_WG4_ROWS`.
fn gemm2_wg4(wg: bool, bm: usize) -> bool {
    wg && GEMM2_WG4_ROWS.contains(&bm)
}

/// Whether GEMM 2 starts early, as GEMM 1's dependent (`Gemm2Plan::early`), after a GEMM 1 that
/// takes the activation in its epilogue (`act`, items of `bm` rows): at items of 48 and 64 rows
/// (four consumer warpgroups both), and past `WG3_MAX_ROWS_E4M3` (two; H100, DeepSeek-V3
/// shapes, 128 rows per expert, three alternating rounds: passes 3970 to 4040 us against 4007
/// to 4125). Not at smaller items, where it measured 8 to 10 us slower a pass (GEMM 1 bound by
/// memory there).
fn early_start(act: bool, bm: usize) -> bool {
    act && (GEMM2_WG4_ROWS.contains(&bm) || bm > WG3_MAX_ROWS_E4M3)
}

/// Whether GEMM 1 of a gated activation whose gate and up are the halves of `w13` takes the
/// activation in its epilogue: with E4M3 products (`f8`), items up to `ACT_MAX_ROWS` rows
/// (`bm`, four consumer warpgroups) or taller than `WG3_MAX_ROWS_E4M3` (two), and an
/// intermediate size `inter` that is a multiple of 128, so that the rows an item takes of each
/// half of `w13` lie in one scale tile. Then the activation kernel is not
/// launched and C of GEMM 1 is never written: at decode that kernel and C's round trip are a
/// few percent of a pass that otherwise streams the weights at the copy rate (H100, DeepSeek-V3
/// shapes: 16 rows 1489 to 1446 us, 32 rows 1556 to 1519 us for GEMM 1 and the activation).
/// Exact products keep the activation kernel: their four-warpgroup GEMM 1 measured slower than
/// the three-warpgroup one and the activation kernel together (32 rows: 1595 against 1577 us).
fn act_epilogue(f8: bool, bm: usize, inter: usize) -> bool {
    f8 && (bm <= ACT_MAX_ROWS || bm > WG3_MAX_ROWS_E4M3) && inter.is_multiple_of(128)
}

impl GemmPlan<'_> {
    /// The plan for the gemm's instantiation that writes C through shared memory (`staged`):
    /// the same, or where that one keeps a C buffer beside its ring (`Gemm::c_buffer`), the
    /// deepest ring that fits beside it.
    pub fn staged(&self) -> Self {
        if self.gemm.wg && self.gemm.c_buffer(self.bm, true) > self.gemm.c_buffer(self.bm, false) {
            wgmma_plan_beside(self.gemm, self.bm, self.gemm.c_buffer(self.bm, true))
        } else {
            *self
        }
    }
}

/// A wgmma kernel's plan for items of `bm` rows: the deepest ring that fits.
fn wgmma_plan(g: &Gemm, bm: usize) -> GemmPlan<'_> {
    wgmma_plan_beside(g, bm, g.c_buffer(bm, false))
}

/// `wgmma_plan` beside `extra` bytes of shared memory past the ring.
fn wgmma_plan_beside(g: &Gemm, bm: usize, extra: usize) -> GemmPlan<'_> {
    let a_row = a_row_bytes(true, g.f8);
    let stages = wgmma_stages(bm, g.item_n, g.stages, a_row, g.sf_tiles(), extra);
    GemmPlan {
        gemm: g,
        bm,
        stages,
        smem: ring_bytes(bm, g.item_n, stages, a_row, g.sf_tiles()) + extra,
    }
}

/// The GEMM's scalar arguments (`GemmArgs` in gemm.cu, field for field).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GemmArgs {
    /// `[E, swizzled(N, K / 16)]` E4M3 block scales.
    pub w_sf: u64,
    pub counts: u64,
    pub row0: u64,
    pub tile_start: u64,
    pub alpha: u64,
    /// `[rows, N]` output in the activation dtype.
    pub c: u64,
    pub cap: i32,
    pub experts: i32,
    pub n: i32,
    pub k: i32,
    /// Rows of an expert per work item.
    pub bm: i32,
    /// Ring slots.
    pub stages: i32,
    /// Read by GEMM 1 with the activation in its epilogue only (every other launch passes null
    /// pointers): GEMM 2's input, the experts' GEMM-2 input global scales, the activation's
    /// limit and alpha, and the input's layout.
    pub act: u64,
    pub act_gs: u64,
    pub act_limit: f32,
    pub act_alpha: f32,
    pub act_layout: i32,
    /// GEMM 1 with the activation: `[1 + row tiles] i32` counts of its finished items, all of
    /// them first, then each row tile's (0: none).
    pub done: u64,
    /// GEMM 2 launched as GEMM 1's dependent: those counts (0: none) and the count a row tile
    /// reaches (GEMM 1's items over it).
    pub wait: u64,
    pub wait_for: i32,
}

// SAFETY: a plain C struct of the kernel's layout (six pointers, six ints, two pointers, two
// floats, an int, two pointers, an int; 128 bytes with the padding both add).
unsafe impl DeviceRepr for GemmArgs {}

impl Arg for GemmArgs {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wgmma_items_hold_the_expected_rows_and_their_spread() {
        for expected in 0..=200 {
            for cap in [expected, 2 * expected, 100_000] {
                let bm = wgmma_item_rows(expected, cap);
                // At least one row tile (the GEMM's tiles divide by it), a whole one.
                assert!(
                    bm >= 16 && bm.is_multiple_of(16),
                    "expected {expected} cap {cap}: {bm}"
                );
                assert!(bm <= WG_MAX_ROWS && bm <= cap.max(1).next_multiple_of(16));
                // Up to the widest item, at least the mean and three deviations (or the cap).
                let want = (expected + 3 * (expected as f64).sqrt() as usize).min(cap);
                assert!(
                    bm >= want.min(WG_MAX_ROWS),
                    "expected {expected} cap {cap}: {bm}"
                );
            }
        }
    }

    #[test]
    fn gemm_1_takes_the_activation_on_items_it_fits_with_whole_scale_tiles() {
        // With E4M3 products, DeepSeek-V3 (I = 2048) and the GPU test's layer (I = 256):
        // items of the expected rows and three deviations take it up to about 40 rows per
        // expert (four consumer warpgroups) and from about 70 (two).
        for inter in [2048, 256] {
            for expected in 1..=40 {
                let bm = wgmma_item_rows(expected, 100_000);
                assert!(
                    act_epilogue(true, bm, inter),
                    "I {inter} expected {expected}"
                );
                // Exact products keep the activation kernel.
                assert!(!act_epilogue(false, bm, inter));
            }
            // Items of 65 to 96 rows (three consumer warpgroups) keep the activation kernel;
            // taller ones take it on two.
            for expected in [50, 64] {
                assert!(!act_epilogue(
                    true,
                    wgmma_item_rows(expected, 100_000),
                    inter
                ));
            }
            for expected in [80, 128] {
                let bm = wgmma_item_rows(expected, 100_000);
                assert!(bm > WG3_MAX_ROWS_E4M3 && act_epilogue(true, bm, inter));
            }
        }
        // The GPU test's runs (gemm1_with_the_activation_in_its_epilogue_matches_the_reference):
        // 8 experts, top-2, the standard layout's cap of M rows, I = 256 and 384.
        for inter in [256, 384] {
            for m in [8usize, 40, 80, 160, 400, 640] {
                let bm = wgmma_item_rows((2 * m).div_ceil(8), m);
                assert!(act_epilogue(true, bm, inter), "I {inter} M {m}: bm {bm}");
            }
        }
        // A half of w13 whose rows straddle scale tiles keeps it too.
        assert!(!act_epilogue(true, 16, 160));
    }

    #[test]
    fn gemm_2_takes_four_warpgroups_and_starts_early_from_about_18_to_43_rows_and_from_70() {
        // DeepSeek-V3 (I = 2048) with E4M3 products: 32 rows per expert take both (items of
        // 64 rows), 16 neither (items of 32), 64 neither (items of 96). Exact products take
        // the four warpgroups at the same heights, with no early start (no epilogue).
        for (expected, both) in [(16, false), (18, true), (32, true), (43, true), (44, false)] {
            let bm = wgmma_item_rows(expected, 100_000);
            let early = early_start(act_epilogue(true, bm, 2048), bm);
            assert_eq!(gemm2_wg4(true, bm), both);
            assert_eq!(early, both, "expected {expected}: bm {bm}");
            assert!(!gemm2_wg4(false, bm), "mma.sync plans keep their kernel");
            assert!(
                !act_epilogue(false, bm, 2048),
                "exact products: no early start"
            );
        }
        assert!(!gemm2_wg4(true, wgmma_item_rows(64, 100_000)));
        // From about 70 rows (items past 96: GEMM 1 with the activation on two consumer
        // warpgroups), GEMM 2 keeps its kernel and starts early; not at 69.
        for (expected, early) in [(69, false), (70, true), (128, true)] {
            let bm = wgmma_item_rows(expected, 100_000);
            assert!(!gemm2_wg4(true, bm));
            assert_eq!(early_start(act_epilogue(true, bm, 2048), bm), early);
        }
        // The GPU test that runs the early start over more items than blocks
        // (long_k_and_many_items_reuse_every_ring_slot: 32 experts, top-2, I = 512, 640 tokens,
        // the standard layout's cap of M rows) takes it.
        let bm = wgmma_item_rows(640 * 2 / 32, 640);
        assert!(
            gemm2_wg4(true, bm) && act_epilogue(true, bm, 512),
            "bm {bm}"
        );
    }

    #[test]
    fn wgmma_rings_fit_in_shared_memory() {
        for f8 in [false, true] {
            let a_row = a_row_bytes(true, f8);
            // Items of 128, 192 and 256 weight rows, and GEMM 1 with the activation on four
            // consumer warpgroups (a scale tile for each half of `w13`), which stage C in a
            // slot (on two they keep a buffer of their own, below).
            for (item_n, most_rows, sf) in [
                (128, WG_MAX_ROWS, 1),
                (192, WG_MAX_ROWS, 2),
                (256, ACT_MAX_ROWS, 2),
            ] {
                for bm in (16..=most_rows).step_by(16) {
                    let s = wgmma_stages(bm, item_n, 4, a_row, sf, 0);
                    // E4M3 rows take half the bytes: at least three slots at the tallest items.
                    let least = if f8 { 3 } else { 2 };
                    assert!((least..=4).contains(&s), "bm {bm} f8 {f8}: {s} stages");
                    assert!(ring_bytes(bm, item_n, s, a_row, sf) <= SMEM_MAX);
                    assert!(s == 4 || ring_bytes(bm, item_n, s + 1, a_row, sf) > SMEM_MAX);
                    // A slot holds the staged C tile: bm rows of the item's columns as 16-bit
                    // values, padded by 16 bytes (gemm.cu, c_pitch).
                    let slot = item_n * 128 + bm * a_row + 2048 * sf;
                    assert!(bm * (2 * item_n + 16) <= slot, "bm {bm} item_n {item_n}");
                }
            }
        }
        // Two consumer warpgroups with E4M3 products, items past 96 rows: GEMM 1 with the
        // activation (two scale tiles) and GEMM 2's staged stores (one) keep three slots beside
        // their C buffer of bm rows of 272 bytes.
        let a_row = a_row_bytes(true, true);
        for sf in [1, 2] {
            for bm in (WG3_MAX_ROWS_E4M3 + 16..=WG_MAX_ROWS).step_by(16) {
                let extra = 16 + bm * 272;
                let s = wgmma_stages(bm, 128, 4, a_row, sf, extra);
                assert!((3..=4).contains(&s), "bm {bm} sf {sf}: {s} stages");
                assert!(ring_bytes(bm, 128, s, a_row, sf) + extra <= SMEM_MAX);
            }
        }
    }
}
