//! The NCCL transport of [`LlDispatcher`]: the same routing kernel and the same masked layout
//! as over peer memory, with the counts all-gathered by NCCL and the rows moved as one run of
//! packets per pair of ranks (`kernels/ll_nccl.cu` packs and unpacks them). The host reads the
//! counts to size the runs, so a dispatch waits for its routing once: this transport is for
//! ranks that cannot map each other's memory, and it cannot be captured in a CUDA graph
//! (capturing returns an error).

use moe_backend_triton::stages::{launch, launch_2d, Arg};
use moe_runner_core::cuda::cudarc::driver::{sys, DeviceRepr, LaunchArgs, PushKernelArg};
use moe_runner_core::{CudaDevice, MoeError, Result};
use std::sync::Mutex;

use crate::alloc::DeviceAlloc;
use crate::layout::{LlLayout, LlShape};
use crate::nccl::{NcclComm, Run};

/// Mirrors `NcclBufs` in `kernels/ll_nccl.cu`: one buffer set's packet regions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct NcclBufs {
    pub dsend: u64,
    pub drecv: u64,
    pub csend: u64,
    pub crecv: u64,
    pub pos_of: u64,
    pub tk: i32,
    pub pbytes: i32,
}

// SAFETY: `repr(C)` plain data mirroring the CUDA struct of the same name.
unsafe impl DeviceRepr for NcclBufs {}

impl Arg for NcclBufs {
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(self);
    }
}

/// Rows one dispatch moved: to each rank, and from each rank.
#[derive(Clone, Debug, Default)]
struct Moved {
    sent: Vec<usize>,
    received: Vec<usize>,
}

pub(crate) struct NcclPath {
    pub comm: NcclComm,
    _allocs: [DeviceAlloc; 2],
    bufs: [NcclBufs; 2],
    /// Per buffer set: the rows of its last dispatch, which its combine sends back.
    moved: Mutex<[Moved; 2]>,
    /// Bytes of one expert output row going back.
    row_bytes: usize,
}

/// Bytes of one dispatch packet: the 16-byte header, the row on the wire, its scales.
fn packet_bytes(shape: &LlShape) -> usize {
    (16 + shape.x_bytes() + shape.scale_bytes()).div_ceil(16) * 16
}

/// Device bytes of one set's packet regions.
pub(crate) fn set_bytes(shape: &LlShape) -> usize {
    let (tk, r) = (
        shape.max_tokens * shape.top_k.min(shape.local_experts),
        shape.ranks,
    );
    let aligned = |b: usize| b.div_ceil(256) * 256;
    2 * aligned(r * tk * packet_bytes(shape))
        + 2 * aligned(r * tk * shape.hidden * shape.act_bytes)
        + aligned(shape.max_tokens * shape.top_k * 4)
}

impl NcclPath {
    pub fn new(dev: &CudaDevice, shape: &LlShape, comm: NcclComm) -> Result<Self> {
        let tk = shape.max_tokens * shape.top_k.min(shape.local_experts);
        let (r, pbytes) = (shape.ranks, packet_bytes(shape));
        let row_bytes = shape.hidden * shape.act_bytes;
        let aligned = |b: usize| (b.div_ceil(256) * 256) as u64;
        let make = || -> Result<(DeviceAlloc, NcclBufs)> {
            let a = DeviceAlloc::zeroed(dev.context(), set_bytes(shape))?;
            let p = a.ptr();
            let (d, c) = (aligned(r * tk * pbytes), aligned(r * tk * row_bytes));
            let bufs = NcclBufs {
                dsend: p,
                drecv: p + d,
                csend: p + 2 * d,
                crecv: p + 2 * d + c,
                pos_of: p + 2 * d + 2 * c,
                tk: tk as i32,
                pbytes: pbytes as i32,
            };
            Ok((a, bufs))
        };
        let ((a0, b0), (a1, b1)) = (make()?, make()?);
        Ok(Self {
            comm,
            _allocs: [a0, a1],
            bufs: [b0, b1],
            moved: Mutex::new(Default::default()),
            row_bytes,
        })
    }

    fn moved(&self, set: usize) -> Result<Moved> {
        self.moved
            .lock()
            .map(|m| m[set].clone())
            .map_err(|_| MoeError::Device("NCCL transport state poisoned".into()))
    }

    /// After the routing kernel: all-gather the counts, pack, size the runs from the counts,
    /// exchange; with `fuse_recv` also unpack into the masked layout.
    #[allow(clippy::too_many_arguments)]
    pub fn dispatch(
        &self,
        dev: &CudaDevice,
        k: &crate::kernels::LlKernels,
        (set, base, l): (usize, u64, LlLayout),
        (x, ids, m): (u64, u64, usize),
        (smem, sms, timeout_ns): (usize, usize, u64),
        fuse_recv: bool,
    ) -> Result<()> {
        let (r, el) = (l.r as usize, l.el as usize);
        let e = r * el;
        self.comm.all_gather_u64(dev, base + l.counts, e)?;
        let b = self.bufs[set];
        let m_i = m as i32;
        launch(
            dev,
            &k.nccl_pack,
            m.clamp(1, 8 * sms),
            256,
            smem,
            &[&x, &ids, &m_i, &l, &base, &b],
        )?;
        // The runs' sizes come from the counts: the one wait of the dispatch.
        self.comm.wait_stream(dev)?;
        let mut counts = vec![0u64; r * e];
        // SAFETY: reads the set's [R, E] counts (inside its allocation) into `counts`; the
        // stream that wrote them is idle (waited for above).
        let rc =
            unsafe { sys::cuMemcpyDtoH_v2(counts.as_mut_ptr().cast(), base + l.counts, r * e * 8) };
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(MoeError::Device(format!("reading the counts: {rc:?}")));
        }
        let t = l.t as usize;
        let count = |s: usize, g: usize| ((counts[s * e + g] & 0xffff_ffff) as usize).min(t);
        let me = l.rank as usize;
        let moved = Moved {
            sent: (0..r)
                .map(|d| (0..el).map(|j| count(me, d * el + j)).sum())
                .collect(),
            received: (0..r)
                .map(|s| (0..el).map(|j| count(s, me * el + j)).sum())
                .collect(),
        };
        let pb = b.pbytes as usize;
        let run = |base: u64, peer: usize, rows: usize| Run {
            peer,
            ptr: base + (peer * b.tk as usize * pb) as u64,
            bytes: rows * pb,
        };
        let sends: Vec<Run> = (0..r).map(|d| run(b.dsend, d, moved.sent[d])).collect();
        let recvs: Vec<Run> = (0..r).map(|s| run(b.drecv, s, moved.received[s])).collect();
        self.comm.exchange(dev, &sends, &recvs)?;
        let most = moved.received.iter().copied().max().unwrap_or(0);
        self.moved
            .lock()
            .map_err(|_| MoeError::Device("NCCL transport state poisoned".into()))?[set] = moved;
        if fuse_recv {
            self.unpack(dev, k, (set, base, l), most, sms, timeout_ns)?;
        }
        Ok(())
    }

    /// The packets received into the masked layout, then masked_m and layout_range.
    pub fn recv(
        &self,
        dev: &CudaDevice,
        k: &crate::kernels::LlKernels,
        (set, base, l): (usize, u64, LlLayout),
        sms: usize,
        timeout_ns: u64,
    ) -> Result<()> {
        let most = self.moved(set)?.received.into_iter().max().unwrap_or(0);
        self.unpack(dev, k, (set, base, l), most, sms, timeout_ns)
    }

    fn unpack(
        &self,
        dev: &CudaDevice,
        k: &crate::kernels::LlKernels,
        (set, base, l): (usize, u64, LlLayout),
        most: usize,
        sms: usize,
        timeout_ns: u64,
    ) -> Result<()> {
        let r = l.r as usize;
        let blocks = most.clamp(1, (4 * sms / r).max(1));
        launch_2d(
            dev,
            &k.nccl_unpack,
            (blocks, r),
            256,
            0,
            &[&l, &base, &self.bufs[set], &timeout_ns],
        )
    }

    /// The combine's send half: the expert output rows `y` back to their sources.
    pub fn combine_send(
        &self,
        dev: &CudaDevice,
        k: &crate::kernels::LlKernels,
        (set, base, l): (usize, u64, LlLayout),
        y: u64,
        sms: usize,
    ) -> Result<()> {
        let moved = self.moved(set)?;
        let (r, b) = (l.r as usize, self.bufs[set]);
        let most = moved.received.iter().copied().max().unwrap_or(0);
        launch_2d(
            dev,
            &k.nccl_combine_pack,
            (most.clamp(1, (4 * sms / r).max(1)), r),
            256,
            0,
            &[&y, &l, &base, &b],
        )?;
        let run = |base: u64, peer: usize, rows: usize| Run {
            peer,
            ptr: base + (peer * b.tk as usize * self.row_bytes) as u64,
            bytes: rows * self.row_bytes,
        };
        let sends: Vec<Run> = (0..r).map(|s| run(b.csend, s, moved.received[s])).collect();
        let recvs: Vec<Run> = (0..r).map(|d| run(b.crecv, d, moved.sent[d])).collect();
        self.comm.exchange(dev, &sends, &recvs)
    }

    /// The combine's receive half: the weighted top-k sum into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_sum(
        &self,
        dev: &CudaDevice,
        k: &crate::kernels::LlKernels,
        (set, l): (usize, LlLayout),
        (ids, weights, out, m): (u64, u64, u64, usize),
        scale: f32,
        grid: usize,
    ) -> Result<()> {
        launch(
            dev,
            &k.nccl_combine_sum,
            grid,
            256,
            0,
            &[
                &ids,
                &weights,
                &out,
                &(m as i32),
                &scale,
                &l,
                &self.bufs[set],
            ],
        )
    }
}
