//! Building the ranks of a world: every rank allocates two buffer sets of the same layout, and
//! every rank learns every other rank's base addresses. Within one process, GPUs map each
//! other's memory by peer access ([`LlWorld::in_process`]); across processes of one machine,
//! by CUDA IPC handles exchanged through files in a directory ([`LlWorld::ipc`]). Ranks that
//! cannot map each other's memory (other machines) move the rows through NCCL instead
//! ([`LlWorld::nccl`]): each rank then addresses only its own buffers.

use moe_dispatch::DispatcherConfig;
use moe_runner_core::{CudaDevice, MoeError, Result};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::alloc::{enable_peer_access, ipc_handle, DeviceAlloc, IpcMapping};
use crate::dispatcher::LlDispatcher;
use crate::layout::LlShape;
use crate::nccl::{NcclComm, NcclId};
use crate::nccl_path::NcclPath;

/// One rank's memory: two buffer sets, and for each set the table of every rank's base address
/// of that set (as this rank addresses it).
pub(crate) struct RankMemory {
    pub sets: [DeviceAlloc; 2],
    pub peer_tables: [DeviceAlloc; 2],
}

/// The buffers a process holds for a world: the ranks it runs, and the peers' buffers mapped
/// from other processes. Every dispatcher and every tensor over the buffers keeps it alive,
/// since kernels write into peers' memory.
pub(crate) struct WorldMemory {
    pub local: Vec<RankMemory>,
    pub _mapped: Vec<IpcMapping>,
}

/// Builds the ranks of a world.
pub struct LlWorld;

/// One rank's two buffer sets, zeroed.
fn two_sets(
    ctx: &Arc<moe_runner_core::cuda::cudarc::driver::CudaContext>,
    shape: &LlShape,
) -> Result<[DeviceAlloc; 2]> {
    let bytes = shape.layout(0).bytes as usize;
    Ok([
        DeviceAlloc::zeroed(ctx, bytes)?,
        DeviceAlloc::zeroed(ctx, bytes)?,
    ])
}

impl LlWorld {
    /// One dispatcher per GPU of this process (rank r on `devices[r]`), every rank's buffers
    /// mapped into every other by peer access. `cfg.world_size` must be `devices.len()`; each
    /// dispatcher gets its own rank. Two ranks may share a GPU (for tests on one device) when
    /// their kernels fit on it at once.
    pub fn in_process(devices: &[CudaDevice], cfg: &DispatcherConfig) -> Result<Vec<LlDispatcher>> {
        if cfg.world_size != devices.len() {
            return Err(MoeError::Config(format!(
                "a world of {} ranks needs {} devices, got {}",
                cfg.world_size,
                cfg.world_size,
                devices.len()
            )));
        }
        let shape = LlShape::of(cfg)?;
        let ctxs: Vec<_> = devices.iter().map(|d| d.context().clone()).collect();
        enable_peer_access(&ctxs)?;
        let sets: Vec<[DeviceAlloc; 2]> = ctxs
            .iter()
            .map(|c| two_sets(c, &shape))
            .collect::<Result<_>>()?;
        let bases: [Vec<u64>; 2] = [0, 1].map(|set| sets.iter().map(|s| s[set].ptr()).collect());
        let local = sets
            .into_iter()
            .zip(&ctxs)
            .map(|(sets, ctx)| {
                Ok(RankMemory {
                    peer_tables: [
                        DeviceAlloc::from_u64s(ctx, &bases[0])?,
                        DeviceAlloc::from_u64s(ctx, &bases[1])?,
                    ],
                    sets,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let memory = Arc::new(WorldMemory {
            local,
            _mapped: Vec::new(),
        });
        devices
            .iter()
            .enumerate()
            .map(|(rank, dev)| {
                let cfg = DispatcherConfig {
                    rank,
                    ..cfg.clone()
                };
                LlDispatcher::new(cfg, shape, dev, memory.clone(), rank)
            })
            .collect()
    }

    /// Rank `cfg.rank` of a world whose ranks are separate processes of one machine, each on
    /// its GPU: this process allocates its buffers, publishes their CUDA IPC handles as a file
    /// in `rendezvous` (a directory every rank can read, empty or fresh for each world), waits
    /// up to `timeout` for every other rank's file and maps their buffers.
    pub fn ipc(
        device: &CudaDevice,
        cfg: &DispatcherConfig,
        rendezvous: &Path,
        timeout: Duration,
    ) -> Result<LlDispatcher> {
        let shape = LlShape::of(cfg)?;
        let ctx = device.context();
        let sets = two_sets(ctx, &shape)?;
        // The zeroing must be done before any peer can write.
        ctx.synchronize()
            .map_err(|e| MoeError::Device(e.to_string()))?;
        let io = |e: std::io::Error| {
            MoeError::Device(format!("rendezvous {}: {e}", rendezvous.display()))
        };
        let mut mine = Vec::with_capacity(128);
        for s in &sets {
            mine.extend_from_slice(&ipc_handle(s)?);
        }
        let file = |r: usize| rendezvous.join(format!("deepep_ll.rank{r}.handles"));
        let tmp = rendezvous.join(format!(
            "deepep_ll.rank{}.tmp{}",
            cfg.rank,
            std::process::id()
        ));
        std::fs::write(&tmp, &mine).map_err(io)?;
        std::fs::rename(&tmp, file(cfg.rank)).map_err(io)?;
        let started = Instant::now();
        let mut mapped = Vec::new();
        let mut bases = [vec![0u64; cfg.world_size], vec![0u64; cfg.world_size]];
        for r in 0..cfg.world_size {
            if r == cfg.rank {
                bases[0][r] = sets[0].ptr();
                bases[1][r] = sets[1].ptr();
                continue;
            }
            let bytes = loop {
                match std::fs::read(file(r)) {
                    Ok(b) if b.len() == 128 => break b,
                    Ok(b) => {
                        return Err(MoeError::invalid(
                            "rendezvous",
                            format!(
                                "rank {r} published {} bytes of handles, expected 128",
                                b.len()
                            ),
                        ))
                    }
                    Err(_) if started.elapsed() < timeout => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => {
                        return Err(MoeError::PeerTimeout {
                            rank: cfg.rank,
                            timeout_ms: timeout.as_millis() as u64,
                        })
                    }
                }
            };
            for (set, base) in bases.iter_mut().enumerate() {
                let mut h = [0u8; 64];
                h.copy_from_slice(&bytes[set * 64..(set + 1) * 64]);
                let m = IpcMapping::open(ctx, &h)?;
                base[r] = m.ptr();
                mapped.push(m);
            }
        }
        let memory = Arc::new(WorldMemory {
            local: vec![RankMemory {
                peer_tables: [
                    DeviceAlloc::from_u64s(ctx, &bases[0])?,
                    DeviceAlloc::from_u64s(ctx, &bases[1])?,
                ],
                sets,
            }],
            _mapped: mapped,
        });
        LlDispatcher::new(cfg.clone(), shape, device, memory, 0)
    }

    /// Rank `cfg.rank` of a world whose rows travel through NCCL: one process per GPU, on any
    /// machines. Every rank passes the same `id` (see [`NcclId`] for how ranks agree on it);
    /// joining waits up to `timeout` for the others, and so does every later exchange.
    pub fn nccl(
        device: &CudaDevice,
        cfg: &DispatcherConfig,
        id: &NcclId,
        timeout: Duration,
    ) -> Result<LlDispatcher> {
        let shape = LlShape::of(cfg)?;
        let ctx = device.context();
        let sets = two_sets(ctx, &shape)?;
        let comm = NcclComm::init(device, cfg.rank, cfg.world_size, id, timeout)?;
        let path = NcclPath::new(device, &shape, comm)?;
        // Every "peer" address is this rank's own set: the routing kernel's counts stay here
        // for NCCL to gather.
        let own = |set: usize| vec![sets[set].ptr(); cfg.world_size];
        let memory = Arc::new(WorldMemory {
            local: vec![RankMemory {
                peer_tables: [
                    DeviceAlloc::from_u64s(ctx, &own(0))?,
                    DeviceAlloc::from_u64s(ctx, &own(1))?,
                ],
                sets,
            }],
            _mapped: Vec::new(),
        });
        Ok(LlDispatcher::new(cfg.clone(), shape, device, memory, 0)?.with_nccl(path, timeout))
    }
}
