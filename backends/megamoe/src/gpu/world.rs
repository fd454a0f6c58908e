//! The symmetric buffers of a world of ranks in one process, one GPU each: every rank
//! allocates the same layout, and every rank's peer table holds every rank's base address.

use moe_backend_deepep_ll::alloc::{enable_peer_access, DeviceAlloc};
use moe_dispatch::DispatcherConfig;
use moe_runner_core::cuda::cudarc::driver::sys;
use moe_runner_core::{CudaDevice, DType, MoeError, Result, Tensor, TopK};
use std::sync::Arc;

use super::program::{MegaParams, Program, Tiling};
use crate::dispatch_output::MegaMoeDispatchOutput;
use crate::dispatcher::MegaMoeDispatcher;
use crate::flags::Resolved;
use crate::layout::{Layout, MegaShape};
use moe_dispatch::Dispatcher;
use moe_runner_core::GateUpLayout;

/// One rank's memory.
pub(crate) struct RankMem {
    pub dev: CudaDevice,
    pub sym: DeviceAlloc,
    pub peers: DeviceAlloc,
    /// One i32 of error bits the program sets (see `megamoe.cu`).
    pub error: DeviceAlloc,
}

/// Every rank's memory: kept alive by each rank's handle, since each rank's program writes
/// into the others' buffers.
pub(crate) struct WorldMem {
    pub ranks: Vec<RankMem>,
    pub layout: Layout,
}

/// A rank's place in a world.
#[derive(Clone)]
pub(crate) struct RankHandle {
    pub world: Arc<WorldMem>,
    pub index: usize,
}

impl RankHandle {
    pub fn mem(&self) -> &RankMem {
        &self.world.ranks[self.index]
    }
    pub fn layout(&self) -> &Layout {
        &self.world.layout
    }

    /// The batch must be bf16 on this rank's GPU, 16-byte aligned. Routing on the host is copied
    /// there (routers often run on the host); routing on another GPU is refused.
    pub fn place_inputs(&self, hidden: &Tensor, topk: TopK) -> Result<TopK> {
        hidden.expect_dtype("hidden", &[DType::Bf16])?;
        let dev = &self.mem().dev;
        let topk = if topk.ids.is_host() && topk.weights.is_host() {
            topk.to_device(&moe_runner_core::Device::Cuda(dev.clone()))?
        } else {
            topk
        };
        for (what, t) in [
            ("hidden", hidden),
            ("topk_ids", &topk.ids),
            ("topk_weights", &topk.weights),
        ] {
            match t.cuda_device() {
                Some(d) if d.context().ordinal() == dev.context().ordinal() => {}
                _ => {
                    return Err(MoeError::invalid(
                        what,
                        format!(
                            "must be on GPU {} (this rank's), got {}",
                            dev.context().ordinal(),
                            t.location()
                        ),
                    ))
                }
            }
        }
        if hidden.cuda_ptr()? % 16 != 0 {
            return Err(MoeError::invalid(
                "hidden",
                "device address must be 16-byte aligned",
            ));
        }
        Ok(topk)
    }

    /// Waits for this rank's stream and reports (and clears) what the program flagged.
    pub fn check_errors(&self) -> Result<()> {
        let m = self.mem();
        m.dev
            .stream()
            .synchronize()
            .map_err(|e| MoeError::Device(e.to_string()))?;
        let mut bits = 0i32;
        m.dev
            .context()
            .bind_to_thread()
            .map_err(|e| MoeError::Device(e.to_string()))?;
        // SAFETY: `error` holds one i32 in this context; the stream is idle, and the clear is
        // ordered on it before any later launch.
        unsafe {
            check(
                "reading megamoe errors",
                sys::cuMemcpyDtoH_v2((&mut bits as *mut i32).cast(), m.error.ptr(), 4),
            )?;
            check(
                "clearing megamoe errors",
                sys::cuMemsetD8Async(m.error.ptr(), 0, 4, m.dev.stream().cu_stream()),
            )?;
        }
        if bits & 1 != 0 {
            return Err(MoeError::PeerTimeout {
                rank: self.index,
                timeout_ms: crate::gpu::program::TIMEOUT_MS,
            });
        }
        if bits & 2 != 0 {
            return Err(MoeError::invalid(
                "topk_ids",
                "an expert id outside 0..num_experts reached the program; its slot was skipped",
            ));
        }
        Ok(())
    }
}

fn check(what: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(MoeError::Device(format!("{what}: {r:?}")))
    }
}

/// Free bytes of `dev`'s memory.
fn free_bytes(dev: &CudaDevice) -> Result<u64> {
    dev.context()
        .bind_to_thread()
        .map_err(|e| MoeError::Device(e.to_string()))?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: plain query in the current context.
    check("cuMemGetInfo", unsafe {
        sys::cuMemGetInfo_v2(&mut free, &mut total)
    })?;
    Ok(free as u64)
}

/// This rank's pre-dispatched batch as it lies in the symmetric buffer (for checks).
#[derive(Clone, Debug, PartialEq)]
pub struct PreDispatched {
    pub x: Vec<u8>,
    pub xs: Vec<u8>,
    pub ids: Vec<i32>,
    pub weights: Vec<f32>,
}

/// Builds the ranks of a MegaMoE world.
pub struct MegaMoeWorld;

impl MegaMoeWorld {
    /// One dispatcher per GPU of this process (rank r on `devices[r]`), every rank's buffer
    /// mapped into every other by peer access. Each rank's program fills its GPU and waits for
    /// the others, so the devices must be distinct. The buffer size ([`crate::buffer_bytes`]) is
    /// checked against each GPU's free memory before anything is allocated.
    pub fn in_process(
        devices: &[CudaDevice],
        cfg: &DispatcherConfig,
    ) -> Result<Vec<MegaMoeDispatcher>> {
        if cfg.world_size != devices.len() {
            return Err(MoeError::Config(format!(
                "a world of {} ranks needs {} devices, got {}",
                cfg.world_size,
                cfg.world_size,
                devices.len()
            )));
        }
        cfg.expect_native_wire(crate::A2A)?;
        let shape = MegaShape::of(cfg)?;
        let layout = shape.layout()?;
        for (i, a) in devices.iter().enumerate() {
            if devices[..i]
                .iter()
                .any(|b| b.context().ordinal() == a.context().ordinal())
            {
                return Err(MoeError::Config(format!(
                    "megamoe ranks need a GPU each (GPU {} given twice): each rank's program occupies its whole GPU while it waits for the others",
                    a.context().ordinal()
                )));
            }
            let free = free_bytes(a)?;
            if layout.bytes > free {
                return Err(MoeError::Config(format!(
                    "the megamoe buffer needs {} bytes per rank; GPU {} has {} free (lower max_tokens_per_rank or top_k)",
                    layout.bytes,
                    a.context().ordinal(),
                    free
                )));
            }
        }
        let ctxs: Vec<_> = devices.iter().map(|d| d.context().clone()).collect();
        enable_peer_access(&ctxs)?;
        let syms = ctxs
            .iter()
            .map(|c| DeviceAlloc::zeroed(c, layout.bytes as usize))
            .collect::<Result<Vec<_>>>()?;
        let bases: Vec<u64> = syms.iter().map(|s| s.ptr()).collect();
        let ranks = syms
            .into_iter()
            .zip(devices)
            .map(|(sym, dev)| {
                Ok(RankMem {
                    peers: DeviceAlloc::from_u64s(dev.context(), &bases)?,
                    error: DeviceAlloc::zeroed(dev.context(), 4)?,
                    dev: dev.clone(),
                    sym,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for c in &ctxs {
            // The zeroing must be done before any rank's program can write.
            c.synchronize()
                .map_err(|e| MoeError::Device(e.to_string()))?;
        }
        let world = Arc::new(WorldMem { ranks, layout });
        Ok((0..devices.len())
            .map(|index| {
                let cfg = DispatcherConfig {
                    rank: index,
                    ..cfg.clone()
                };
                let shape = MegaShape {
                    rank: index,
                    ..shape
                };
                MegaMoeDispatcher::gpu(
                    cfg,
                    shape,
                    RankHandle {
                        world: world.clone(),
                        index,
                    },
                )
            })
            .collect())
    }
}

impl MegaMoeDispatcher {
    /// Microseconds each phase of this rank's last call took on its first block (the phases of
    /// [`crate::layout::PHASE_NAMES`]); waits for the device.
    pub fn phase_times_us(&self) -> Result<Vec<(&'static str, f64)>> {
        let rank = self
            .rank
            .as_ref()
            .ok_or_else(|| MoeError::Device("this megamoe dispatcher has no GPU buffers".into()))?;
        let mem = rank.mem();
        mem.dev
            .stream()
            .synchronize()
            .map_err(|e| MoeError::Device(e.to_string()))?;
        let mut ns = [0u64; crate::layout::PHASES];
        let off = rank.layout().ctrl + crate::layout::STAMPS_OFFSET;
        // SAFETY: the stamps lie inside this rank's control region; the stream is idle.
        check("reading megamoe phase times", unsafe {
            sys::cuMemcpyDtoH_v2(ns.as_mut_ptr().cast(), mem.sym.ptr() + off, 8 * ns.len())
        })?;
        Ok(crate::layout::PHASE_NAMES
            .iter()
            .zip(ns.windows(2))
            .map(|(name, w)| (*name, w[1].saturating_sub(w[0]) as f64 / 1e3))
            .collect())
    }

    /// Runs only the program's pre-dispatch for `hidden`/`topk` (as [`Dispatcher::dispatch`]
    /// takes them) with FP4 (`fp4_acts`) or FP8 activations, and reads back this rank's
    /// regions: the layout the other ranks read, for checks against [`crate::cpu::pre_dispatch`].
    pub fn pre_dispatch_gpu(
        &self,
        hidden: &Tensor,
        topk: TopK,
        fp4_acts: bool,
    ) -> Result<PreDispatched> {
        let rank = self
            .rank
            .clone()
            .ok_or_else(|| MoeError::Device("this megamoe dispatcher has no GPU buffers".into()))?;
        let s = self.shape();
        let m = topk.num_tokens();
        let out = self.dispatch(hidden, topk)?;
        let out = (out as Box<dyn std::any::Any>)
            .downcast::<MegaMoeDispatchOutput>()
            .map_err(|_| MoeError::Device("megamoe dispatch output expected".into()))?;
        let mem = rank.mem();
        let flags = Resolved {
            fp4_acts,
            mxf4_kind: false,
        };
        let program = Program::new(
            &mem.dev,
            flags,
            Tiling::BATCH,
            0,
            GateUpLayout::GateUp,
            s.local_experts,
        )?;
        let dst = Tensor::zeros_cuda(&mem.dev, &[m, s.hidden], DType::Bf16)?;
        program.launch_pre_dispatch(&mem.dev, &MegaParams::new(&rank, &out, &dst)?)?;
        mem.dev
            .stream()
            .synchronize()
            .map_err(|e| MoeError::Device(e.to_string()))?;
        let l = rank.layout();
        let read = |off: u64, bytes: usize| -> Result<Vec<u8>> {
            let mut v = vec![0u8; bytes];
            mem.dev
                .context()
                .bind_to_thread()
                .map_err(|e| MoeError::Device(e.to_string()))?;
            if bytes > 0 {
                // SAFETY: the region lies inside this rank's buffer (offsets from its layout).
                check("reading the megamoe buffer", unsafe {
                    sys::cuMemcpyDtoH_v2(v.as_mut_ptr().cast(), mem.sym.ptr() + off, bytes)
                })?;
            }
            Ok(v)
        };
        let row = if fp4_acts { s.hidden / 2 } else { s.hidden };
        let words = |b: Vec<u8>| -> Vec<[u8; 4]> {
            b.chunks_exact(4)
                .map(|c| [c[0], c[1], c[2], c[3]])
                .collect()
        };
        Ok(PreDispatched {
            x: read(l.x, m * row)?,
            xs: read(l.xs, m * s.hidden / 32)?,
            ids: words(read(l.ids, s.max_tokens * s.top_k * 4)?)
                .into_iter()
                .map(i32::from_le_bytes)
                .collect(),
            weights: words(read(l.weights, s.max_tokens * s.top_k * 4)?)
                .into_iter()
                .map(f32::from_le_bytes)
                .collect(),
        })
    }
}
