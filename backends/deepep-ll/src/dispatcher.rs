//! The `deepep_ll` dispatcher: one per rank, over buffers every rank of the world can address.
//! Dispatch and combine each have a send half and a receive half; `dispatch`/`combine` run both,
//! and the split API returns a hook so the receive half can run later, overlapping other work.
//! Nothing here synchronizes with the host, so a layer can be captured in a CUDA graph.

use moe_backend_triton::stages::{launch, launch_2d};
use moe_dispatch::{A2aBackend, Dispatcher, DispatcherConfig, Wire};
use moe_runner_core::cuda::cudarc::driver::sys;
use moe_runner_core::{
    downcast_combine, downcast_dispatch, CombineInput, CudaDevice, DType, DeepEpLlCombineInput,
    DeepEpLlDispatchOutput, Device, DispatchFormat, DispatchOutput, MoeError, Result, Tensor, TopK,
};
use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::kernels::LlKernels;
use crate::layout::{LlShape, SetLayout};
use crate::nccl_path::NcclPath;
use crate::world::{LlWorld, RankMemory, WorldMemory};
use crate::A2A;

/// How long a receive waits for its peers before it gives up and flags a timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct LlDispatcher {
    cfg: DispatcherConfig,
    shape: LlShape,
    layout: SetLayout,
    dev: CudaDevice,
    memory: Arc<WorldMemory>,
    /// This rank's entry in `memory.local`.
    own: usize,
    /// Kernels for bf16 [0] and f16 [1] activations, compiled at first use.
    kernels: [OnceLock<LlKernels>; 2],
    next_set: AtomicUsize,
    timeout: Duration,
    sms: usize,
    /// The NCCL transport, for ranks that cannot map each other's memory; `None`: peer memory.
    nccl: Option<NcclPath>,
}

/// The device address of `t`, which the kernels read and write 16 bytes at a time.
fn aligned(t: &Tensor, what: &str) -> Result<u64> {
    let p = t.cuda_ptr()?;
    if p % 16 != 0 {
        return Err(MoeError::invalid(
            what,
            format!("device address {p:#x} is not 16-byte aligned"),
        ));
    }
    Ok(p)
}

/// The receive half of a dispatch, to run when its result is needed.
pub struct LlRecvHook<'a> {
    d: &'a LlDispatcher,
    set: usize,
    topk: TopK,
    act: DType,
}

/// The receive half of a combine.
pub struct LlCombineHook<'a> {
    d: &'a LlDispatcher,
    set: usize,
    /// The expert outputs, kept alive until the combine has read them.
    y: Tensor,
    ids: u64,
    weights: u64,
    m: usize,
    act: DType,
}

impl LlDispatcher {
    /// How long receives wait for peers (the default is [`DEFAULT_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    /// Bytes this rank allocated for its two buffer sets (with the NCCL transport's packet
    /// regions when it has them).
    pub fn buffer_bytes(&self) -> usize {
        let packets = match self.nccl {
            Some(_) => crate::nccl_path::set_bytes(&self.shape),
            None => 0,
        };
        2 * (self.layout.bytes as usize + packets)
    }

    /// A dispatcher for `cfg.rank` over `memory.local[own]`.
    pub(crate) fn new(
        cfg: DispatcherConfig,
        shape: LlShape,
        dev: &CudaDevice,
        memory: Arc<WorldMemory>,
        own: usize,
    ) -> Result<Self> {
        let sms = dev
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| MoeError::Device(e.to_string()))? as usize;
        let d = Self {
            layout: shape.layout(cfg.rank),
            shape,
            cfg,
            dev: dev.clone(),
            memory,
            own,
            kernels: Default::default(),
            next_set: AtomicUsize::new(0),
            timeout: DEFAULT_TIMEOUT,
            sms,
            nccl: None,
        };
        // Compiled now, not at the first dispatch: peers already waiting on this rank would
        // count a first-use compile against their timeout.
        d.kernels(DType::Bf16)?;
        Ok(d)
    }

    /// Moves the rows over NCCL instead of peer memory.
    pub(crate) fn with_nccl(mut self, path: NcclPath, timeout: Duration) -> Self {
        self.nccl = Some(path);
        self.timeout = timeout;
        self
    }

    /// The transport's name, for reports.
    pub fn transport(&self) -> &'static str {
        if self.nccl.is_some() {
            "nccl"
        } else {
            "peer memory"
        }
    }

    fn mem(&self) -> &RankMemory {
        &self.memory.local[self.own]
    }

    fn kernels(&self, act: DType) -> Result<&LlKernels> {
        let f16 = act == DType::F16;
        let cell = &self.kernels[usize::from(f16)];
        if let Some(k) = cell.get() {
            return Ok(k);
        }
        let k = LlKernels::new(&self.dev, self.cfg.wire, f16)?;
        Ok(cell.get_or_init(|| k))
    }

    fn base(&self, set: usize) -> u64 {
        self.mem().sets[set].ptr()
    }

    fn timeout_ns(&self) -> u64 {
        self.timeout.as_nanos().min(u64::MAX as u128) as u64
    }

    /// A tensor over a region of this rank's set `set`.
    fn view(&self, set: usize, offset: u64, shape: &[usize], dtype: DType) -> Tensor {
        let owner: Arc<dyn Any + Send + Sync> = self.memory.clone();
        // SAFETY: every region lies inside the set's allocation (`LlShape::layout`), which the
        // world memory `owner` keeps alive.
        unsafe { Tensor::from_held_cuda(&self.dev, owner, self.base(set) + offset, shape, dtype) }
    }

    /// The send half: routes and writes every token into its experts' ranks. `hidden` `[M, H]`
    /// bf16 (or f16 with the native wire) on this rank's GPU; `topk` global expert ids. The
    /// receive half runs when the hook's `recv` is called.
    pub fn dispatch_send(&self, hidden: &Tensor, topk: TopK) -> Result<LlRecvHook<'_>> {
        let (set, topk, act) = self.send(hidden, topk, false)?;
        Ok(LlRecvHook {
            d: self,
            set,
            topk,
            act,
        })
    }

    /// Both halves, the receive one folded into the send launch.
    pub fn dispatch_now(&self, hidden: &Tensor, topk: TopK) -> Result<DeepEpLlDispatchOutput> {
        let (set, topk, act) = self.send(hidden, topk, true)?;
        Ok(self.output(set, topk, act))
    }

    fn send(&self, hidden: &Tensor, topk: TopK, fuse_recv: bool) -> Result<(usize, TopK, DType)> {
        let _span = tracing::debug_span!("dispatch.deepep_ll.send").entered();
        let m = self
            .cfg
            .check_batch("deepep_ll dispatcher", hidden, &topk)?;
        if topk.top_k() != self.shape.top_k {
            return Err(MoeError::invalid(
                "topk_ids",
                format!(
                    "{} experts per token; the buffers were sized for {}",
                    topk.top_k(),
                    self.shape.top_k
                ),
            ));
        }
        let act = hidden.dtype();
        let allowed: &[DType] = if self.cfg.wire == Wire::Native {
            &[DType::Bf16, DType::F16]
        } else {
            &[DType::Bf16]
        };
        hidden.expect_dtype("hidden for deepep_ll", allowed)?;
        let x = aligned(hidden, "hidden")?;
        let topk = if topk.ids.is_host() || topk.weights.is_host() {
            topk.to_device(&Device::Cuda(self.dev.clone()))?
        } else {
            topk
        };
        let set = self.next_set.fetch_add(1, Ordering::Relaxed) & 1;
        let k = self.kernels(act)?;
        let (l, chunks) = self.layout.kernel.for_batch(m);
        let (base, peers) = (self.base(set), self.mem().peer_tables[set].ptr());
        let ids = topk.ids.cuda_ptr()?;
        let (e, m_i) = (self.cfg.num_experts, m as i32);
        launch_2d(
            &self.dev,
            &k.route,
            (e.div_ceil(8), chunks),
            256,
            0,
            &[&ids, &m_i, &(e as i32), &l, &peers, &base],
        )?;
        // The quantized row and its scales, staged in shared memory.
        let smem = if self.cfg.wire == Wire::Native {
            0
        } else {
            self.shape.x_bytes() + self.shape.scale_bytes()
        };
        let timeout = self.timeout_ns();
        if let Some(n) = &self.nccl {
            n.dispatch(
                &self.dev,
                k,
                (set, base, l),
                (x, ids, m),
                (smem, self.sms, timeout),
                fuse_recv,
            )?;
            return Ok((set, topk, act));
        }
        let grid = m.clamp(1, 8 * self.sms);
        launch(
            &self.dev,
            &k.dispatch_send,
            grid,
            256,
            smem,
            &[
                &x,
                &ids,
                &m_i,
                &l,
                &peers,
                &base,
                &timeout,
                &i32::from(fuse_recv),
            ],
        )?;
        Ok((set, topk, act))
    }

    /// The dispatch output over set `set`'s buffers.
    fn output(&self, set: usize, topk: TopK, act: DType) -> DeepEpLlDispatchOutput {
        let s = &self.shape;
        let (el, rt, h, r) = (s.local_experts, s.rows(), s.hidden, s.ranks);
        let l = self.layout.kernel;
        let (x_dtype, x_cols, scale) = match self.cfg.wire {
            Wire::Native => (act, h, None),
            Wire::Fp8 | Wire::Fp8Ue8m0 => (
                DType::F8E4M3,
                h,
                Some(self.view(set, l.x_scale, &[el, rt, h / 128], DType::F32)),
            ),
            Wire::Nvfp4 => (
                DType::E2M1x2,
                h / 2,
                Some(self.view(set, l.x_scale, &[el, rt, h / 16], DType::F8E4M3)),
            ),
        };
        let m = topk.num_tokens();
        DeepEpLlDispatchOutput {
            hidden: self.view(set, l.x, &[el, rt, x_cols], x_dtype),
            hidden_scale: scale,
            hidden_global_scale: (self.cfg.wire == Wire::Nvfp4)
                .then_some(self.cfg.nvfp4_global_scale),
            masked_m: self.view(set, l.masked_m, &[el], DType::I32),
            expected_m: (r * m * s.top_k).div_ceil(self.cfg.num_experts).max(1),
            src_info: self.view(set, l.src_info, &[el, rt], DType::I32),
            layout_range: self.view(set, l.layout_range, &[el, r], DType::I64),
            out_buffer: Some(self.view(
                set,
                self.layout.y,
                &[el, rt, h],
                if self.cfg.wire == Wire::Native {
                    act
                } else {
                    DType::Bf16
                },
            )),
            topk,
        }
    }

    /// Which set a dispatch output of this dispatcher lives in.
    fn set_of(&self, d: &DeepEpLlDispatchOutput) -> Result<usize> {
        let p = d.masked_m.cuda_ptr().ok();
        (0..2)
            .find(|&s| p == Some(self.base(s) + self.layout.kernel.masked_m))
            .ok_or_else(|| {
                MoeError::invalid(
                    "dispatch output",
                    "was not produced by this deepep_ll dispatcher",
                )
            })
    }

    /// The send half of the combine: every expert output row of `y` (`[E_local, R*T, H]`, on
    /// this GPU; rows past `masked_m` are not read) goes back to its token's rank.
    pub fn combine_send(
        &self,
        y: &Tensor,
        dispatched: &DeepEpLlDispatchOutput,
    ) -> Result<LlCombineHook<'_>> {
        let hook = self.combine_hook(y, dispatched)?;
        hook.launch(1, None)?;
        Ok(hook)
    }

    /// Both halves of the combine into `out` (`[M, H]`): one launch for decode batches, where
    /// a launch costs more than one block per SM loses; two for larger ones, which need the
    /// whole GPU for the sum.
    pub fn combine_into(
        &self,
        y: &Tensor,
        dispatched: &DeepEpLlDispatchOutput,
        out: &Tensor,
    ) -> Result<()> {
        let hook = self.combine_hook(y, dispatched)?;
        let items = hook.m * self.shape.hidden.div_ceil(2048);
        if items <= 2 * self.fused_combine_grid(hook.act)? {
            hook.launch(3, Some(out))
        } else {
            hook.launch(1, None)?;
            hook.launch(2, Some(out))
        }
    }

    fn combine_hook<'a>(
        &'a self,
        y: &Tensor,
        dispatched: &DeepEpLlDispatchOutput,
    ) -> Result<LlCombineHook<'a>> {
        let _span = tracing::debug_span!("combine.deepep_ll").entered();
        let set = self.set_of(dispatched)?;
        let act = if self.cfg.wire == Wire::Native {
            dispatched.hidden.dtype()
        } else {
            DType::Bf16
        };
        let s = &self.shape;
        y.expect_shape("expert outputs", &[s.local_experts, s.rows(), s.hidden])?;
        y.expect_dtype("expert outputs", &[act])?;
        let y = if y.is_host() {
            y.to_device(&Device::Cuda(self.dev.clone()))?
        } else {
            y.clone()
        };
        aligned(&y, "expert outputs")?;
        Ok(LlCombineHook {
            d: self,
            set,
            y,
            ids: dispatched.topk.ids.cuda_ptr()?,
            weights: dispatched.topk.weights.cuda_ptr()?,
            m: dispatched.topk.num_tokens(),
            act,
        })
    }

    /// Blocks of the one-launch combine: at most half of what the GPU holds at once (so a rank
    /// sharing the GPU still gets room), up to four per SM.
    fn fused_combine_grid(&self, act: DType) -> Result<usize> {
        let per_sm = self.kernels(act)?.combine_per_sm;
        Ok(self.sms * (per_sm / 2).clamp(1, 4))
    }

    /// Waits for the device and reports what the kernels flagged: a peer that did not answer
    /// in time, expert ids out of range, more rows than the buffers hold.
    pub fn check(&self) -> Result<()> {
        use moe_runner_core::DeviceOps;
        match &self.nccl {
            // A peer that stopped answering would keep the stream busy for ever.
            Some(n) => n.comm.wait_stream(&self.dev)?,
            None => self.dev.synchronize()?,
        }
        let mut status = [0i32; 2];
        for (set, s) in status.iter_mut().enumerate() {
            self.dev
                .context()
                .bind_to_thread()
                .map_err(|e| MoeError::Device(e.to_string()))?;
            // SAFETY: reads the 4-byte status word inside the set's allocation.
            let r = unsafe {
                sys::cuMemcpyDtoH_v2(
                    (s as *mut i32).cast(),
                    self.base(set) + self.layout.kernel.status,
                    4,
                )
            };
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(MoeError::Device(format!(
                    "reading the all-to-all status: {r:?}"
                )));
            }
        }
        let bits = status[0] | status[1];
        if bits & 2 != 0 {
            return Err(MoeError::PeerTimeout {
                rank: self.cfg.rank,
                timeout_ms: self.timeout.as_millis() as u64,
            });
        }
        let what = [
            (4, "topk_ids", "an expert id outside -1..num_experts was skipped"),
            (8, "topk_ids", "more rows for one expert than the max_tokens_per_rank rows its buffer holds (duplicate expert ids in a token?)"),
            (16, "src_info", "a combine row named a token or slot outside the batch"),
        ];
        match what.iter().find(|(b, _, _)| bits & b != 0) {
            Some((_, arg, msg)) => Err(MoeError::invalid(*arg, *msg)),
            None => Ok(()),
        }
    }
}

impl LlRecvHook<'_> {
    /// Waits for every rank's tokens and returns this rank's masked-layout batch.
    pub fn recv(self) -> Result<DeepEpLlDispatchOutput> {
        let _span = tracing::debug_span!("dispatch.deepep_ll.recv").entered();
        let d = self.d;
        let k = d.kernels(self.act)?;
        let (l, base) = (d.layout.kernel, d.base(self.set));
        if let Some(n) = &d.nccl {
            n.recv(&d.dev, k, (self.set, base, l), d.sms, d.timeout_ns())?;
            return Ok(d.output(self.set, self.topk, self.act));
        }
        let blocks = d.shape.local_experts.div_ceil(256);
        launch(
            &d.dev,
            &k.dispatch_recv,
            blocks,
            256,
            0,
            &[&l, &base, &d.timeout_ns()],
        )?;
        Ok(d.output(self.set, self.topk, self.act))
    }
}

impl LlCombineHook<'_> {
    /// `mode` 1 sends, 2 waits and sums into `out`, 3 does both in one launch.
    fn launch(&self, mode: i32, out: Option<&Tensor>) -> Result<()> {
        let d = self.d;
        let out_ptr = match out {
            Some(o) => {
                o.expect_shape("combine output", &[self.m, d.shape.hidden])?;
                o.expect_dtype("combine output", &[self.act])?;
                aligned(o, "combine output")?
            }
            None => 0,
        };
        let k = d.kernels(self.act)?;
        let items = self.m * d.shape.hidden.div_ceil(2048);
        // The fused launch waits inside, so its blocks must all be resident.
        let grid = match mode {
            1 => d.shape.local_experts,
            2 => items.clamp(1, 4 * d.sms),
            _ => d.fused_combine_grid(self.act)?,
        };
        let scale = d.cfg.routed_scaling_factor.unwrap_or(1.0);
        let (l, base, peers) = (
            d.layout.kernel,
            d.base(self.set),
            d.mem().peer_tables[self.set].ptr(),
        );
        let y = self.y.cuda_ptr()?;
        if let Some(n) = &d.nccl {
            let at = (self.set, base, l);
            if mode & 1 != 0 {
                n.combine_send(&d.dev, k, at, y, d.sms)?;
            }
            if mode & 2 != 0 {
                let grid = items.clamp(1, 4 * d.sms);
                let io = (self.ids, self.weights, out_ptr, self.m);
                n.combine_sum(&d.dev, k, (self.set, l), io, scale, grid)?;
            }
            return Ok(());
        }
        launch(
            &d.dev,
            &k.combine,
            grid,
            256,
            0,
            &[
                &y,
                &self.ids,
                &self.weights,
                &out_ptr,
                &(self.m as i32),
                &scale,
                &l,
                &peers,
                &base,
                &d.timeout_ns(),
                &mode,
            ],
        )
    }

    /// Waits for every rank's expert outputs and writes this rank's `[M, H]` into `out`.
    pub fn recv_into(self, out: &Tensor) -> Result<()> {
        let _span = tracing::debug_span!("combine.deepep_ll.recv").entered();
        self.launch(2, Some(out))
    }

    /// As [`LlCombineHook::recv_into`], into a new tensor.
    pub fn recv(self) -> Result<Tensor> {
        let out = Tensor::zeros_cuda(&self.d.dev, &[self.m, self.d.shape.hidden], self.act)?;
        self.recv_into(&out)?;
        Ok(out)
    }
}

impl Dispatcher for LlDispatcher {
    fn name(&self) -> &'static str {
        A2A
    }
    fn format(&self) -> DispatchFormat {
        DispatchFormat::DeepEpLowLatency
    }
    fn config(&self) -> &DispatcherConfig {
        &self.cfg
    }

    fn dispatch(&self, hidden: &Tensor, topk: TopK) -> Result<Box<dyn DispatchOutput>> {
        Ok(Box::new(self.dispatch_now(hidden, topk)?))
    }

    fn combine(
        &self,
        output: Box<dyn CombineInput>,
        dispatched: &dyn DispatchOutput,
    ) -> Result<Tensor> {
        let y = downcast_combine::<DeepEpLlCombineInput>(output, DispatchFormat::DeepEpLowLatency)?
            .hidden;
        let d = downcast_dispatch::<DeepEpLlDispatchOutput>(
            dispatched,
            A2A,
            DispatchFormat::DeepEpLowLatency,
        )?;
        let out = Tensor::zeros_cuda(
            &self.dev,
            &[d.topk.num_tokens(), self.shape.hidden],
            y.dtype(),
        )?;
        self.combine_into(&y, d, &out)?;
        Ok(out)
    }

    fn check(&self) -> Result<()> {
        LlDispatcher::check(self)
    }
}

inventory::submit! {
    A2aBackend {
        name: A2A,
        format: DispatchFormat::DeepEpLowLatency,
        description: "DeepEP-style low-latency all-to-all on the GPU: FP8 or bf16 dispatch into [E_local, R*T, H], weighted combine; ranks over peer memory (LlWorld for several GPUs)",
        make: |cfg, device| {
            let dev = device.as_cuda()?;
            let mut ranks = LlWorld::in_process(std::slice::from_ref(dev), cfg)?;
            Ok(Box::new(ranks.remove(0)))
        },
    }
}
