//! NCCL for the low-latency all-to-all between ranks that cannot map each other's memory (GPUs
//! of different machines): the communicator, its unique id and how ranks agree on it, and the
//! grouped send/receive the transport issues. The communicator is non-blocking, so a rank that
//! never joins or stops answering ends in [`MoeError::PeerTimeout`] and an aborted
//! communicator, not a hang. libnccl is loaded at run time; without it, a typed error.

use moe_runner_core::cuda::cudarc::driver::sys as cu;
use moe_runner_core::cuda::cudarc::nccl::sys;
use moe_runner_core::{CudaDevice, MoeError, Result};
use std::ffi::c_char;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The id every rank of one NCCL world is created with. Rank 0 makes it; the others must get
/// its bytes: through a file in a directory all ranks see ([`NcclId::exchange`], which also
/// works across machines on a shared file system), or as text through the engine's own
/// launcher ([`NcclId::to_hex`] / [`NcclId::from_hex`], e.g. an environment variable).
#[derive(Clone, Copy)]
pub struct NcclId([c_char; 128]);

fn nccl_err(what: &str, r: sys::ncclResult_t) -> MoeError {
    MoeError::Device(format!("NCCL {what}: {r:?}"))
}

fn nccl(what: &str, r: sys::ncclResult_t) -> Result<()> {
    match r {
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
        other => Err(nccl_err(what, other)),
    }
}

/// libnccl, loaded once; an error naming it when it is not installed.
fn library() -> Result<()> {
    // SAFETY: only probes whether the library can be opened.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(MoeError::Device(
            "the NCCL transport needs libnccl.so (NCCL 2.28 or later) on the library path".into(),
        ))
    }
}

impl NcclId {
    /// A fresh id (rank 0 makes it once per world).
    pub fn new() -> Result<Self> {
        library()?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: `id` is valid for a write.
        nccl("ncclGetUniqueId", unsafe { sys::ncclGetUniqueId(&mut id) })?;
        Ok(Self(id.internal))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|&b| format!("{:02x}", b as u8)).collect()
    }

    pub fn from_hex(text: &str) -> Result<Self> {
        let bad = || MoeError::invalid("NCCL id", "expected 256 hex digits (from NcclId::to_hex)");
        let t = text.trim();
        if t.len() != 256 || !t.is_ascii() {
            return Err(bad());
        }
        let mut id = [0 as c_char; 128];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| bad())? as c_char;
        }
        Ok(Self(id))
    }

    /// Rank 0 makes the id and publishes it as `nccl.id` in `dir` (written whole, then renamed,
    /// so a reader never sees part of it); every other rank waits up to `timeout` for the file.
    /// `dir` must be fresh for each world (a stale id names a world that is gone).
    pub fn exchange(dir: &Path, rank: usize, timeout: Duration) -> Result<Self> {
        let file = dir.join("nccl.id");
        let io = |e: std::io::Error| MoeError::Device(format!("NCCL id in {}: {e}", dir.display()));
        if rank == 0 {
            let id = Self::new()?;
            let tmp = dir.join(format!("nccl.id.tmp{}", std::process::id()));
            std::fs::write(&tmp, id.to_hex()).map_err(io)?;
            std::fs::rename(&tmp, &file).map_err(io)?;
            return Ok(id);
        }
        let started = Instant::now();
        loop {
            match std::fs::read_to_string(&file) {
                Ok(text) => return Self::from_hex(&text),
                Err(_) if started.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => {
                    return Err(MoeError::PeerTimeout {
                        rank,
                        timeout_ms: timeout.as_millis() as u64,
                    })
                }
            }
        }
    }
}

/// One rank's non-blocking communicator, on its device's stream. Aborted when dropped.
pub(crate) struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    timeout: Duration,
    /// Set once the communicator was aborted after a timeout: every later call fails.
    aborted: AtomicBool,
}

// SAFETY: a communicator may be used from any thread, one call at a time; the dispatcher
// issues its calls from the thread that runs it, in order.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

/// One contiguous run of bytes to send to or receive from a peer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Run {
    pub peer: usize,
    pub ptr: u64,
    pub bytes: usize,
}

impl NcclComm {
    /// Joins rank `rank` of `ranks` to the world of `id`, waiting up to `timeout` for the
    /// others.
    pub fn init(
        dev: &CudaDevice,
        rank: usize,
        ranks: usize,
        id: &NcclId,
        timeout: Duration,
    ) -> Result<Self> {
        library()?;
        bind(dev)?;
        // NCCL_CONFIG_INITIALIZER for 2.28, non-blocking: every field NCCL should choose is
        // left undefined (INT_MIN / null).
        let undef = i32::MIN;
        let mut config = sys::ncclConfig_t {
            size: std::mem::size_of::<sys::ncclConfig_t>(),
            magic: 0xcafe_beef,
            version: 22800,
            blocking: 0,
            cgaClusterSize: undef,
            minCTAs: undef,
            maxCTAs: undef,
            netName: std::ptr::null(),
            splitShare: undef,
            trafficClass: undef,
            commName: std::ptr::null(),
            collnetEnable: undef,
            CTAPolicy: undef,
            shrinkShare: undef,
            nvlsCTAs: undef,
            nChannelsPerNetPeer: undef,
            nvlinkCentricSched: undef,
        };
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let uid = sys::ncclUniqueId { internal: id.0 };
        // SAFETY: `comm` and `config` are valid for the call; the device's context is current.
        nccl("ncclCommInitRankConfig", unsafe {
            sys::ncclCommInitRankConfig(&mut comm, ranks as i32, uid, rank as i32, &mut config)
        })?;
        let c = Self {
            comm,
            rank,
            timeout,
            aborted: AtomicBool::new(false),
        };
        c.settle("joining the world")?;
        Ok(c)
    }

    /// Waits until the communicator's last call has been issued (non-blocking calls return
    /// before); a peer that keeps it waiting past the timeout is a [`MoeError::PeerTimeout`].
    fn settle(&self, what: &str) -> Result<()> {
        self.live()?;
        let started = Instant::now();
        loop {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator; `state` is valid for a write.
            nccl("ncclCommGetAsyncError", unsafe {
                sys::ncclCommGetAsyncError(self.comm, &mut state)
            })?;
            match state {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress if started.elapsed() < self.timeout => {
                    std::thread::yield_now()
                }
                sys::ncclResult_t::ncclInProgress => return Err(self.abort()),
                other => return Err(nccl_err(what, other)),
            }
        }
    }

    fn timed_out(&self) -> MoeError {
        MoeError::PeerTimeout {
            rank: self.rank,
            timeout_ms: self.timeout.as_millis() as u64,
        }
    }

    /// Aborts the communicator once (NCCL's kernels waiting on a peer then leave, which
    /// unblocks the stream) and gives the timeout error.
    fn abort(&self) -> MoeError {
        if !self.aborted.swap(true, Ordering::AcqRel) {
            // SAFETY: a live communicator, aborted once (the flag).
            unsafe { sys::ncclCommAbort(self.comm) };
        }
        self.timed_out()
    }

    /// An error once the communicator was aborted.
    fn live(&self) -> Result<()> {
        if self.aborted.load(Ordering::Acquire) {
            Err(self.timed_out())
        } else {
            Ok(())
        }
    }

    /// Every rank's `count` u64 words from `words + rank * count` into `words` (in place).
    pub fn all_gather_u64(&self, dev: &CudaDevice, words: u64, count: usize) -> Result<()> {
        self.live()?;
        bind(dev)?;
        let stream = dev.stream().cu_stream() as sys::cudaStream_t;
        let send = words + (self.rank * count * 8) as u64;
        // SAFETY: `words` holds ranks * count words on this device (the caller's layout).
        nccl("ncclAllGather", unsafe {
            sys::ncclAllGather(
                send as *const _,
                words as *mut _,
                count,
                sys::ncclDataType_t::ncclUint64,
                self.comm,
                stream,
            )
        })?;
        self.settle("all-gather")
    }

    /// One grouped exchange on the device's stream: every send and receive (empty runs are
    /// skipped; a rank may send to itself).
    pub fn exchange(&self, dev: &CudaDevice, sends: &[Run], recvs: &[Run]) -> Result<()> {
        self.live()?;
        bind(dev)?;
        let stream = dev.stream().cu_stream() as sys::cudaStream_t;
        // SAFETY: starts a group this function ends below.
        nccl("ncclGroupStart", unsafe { sys::ncclGroupStart() })?;
        let mut issued = Ok(());
        for r in sends.iter().filter(|r| r.bytes > 0) {
            // SAFETY: the caller's runs lie in its device buffers.
            issued = issued.and(nccl("ncclSend", unsafe {
                sys::ncclSend(
                    r.ptr as *const _,
                    r.bytes,
                    sys::ncclDataType_t::ncclUint8,
                    r.peer as i32,
                    self.comm,
                    stream,
                )
            }));
        }
        for r in recvs.iter().filter(|r| r.bytes > 0) {
            // SAFETY: as above.
            issued = issued.and(nccl("ncclRecv", unsafe {
                sys::ncclRecv(
                    r.ptr as *mut _,
                    r.bytes,
                    sys::ncclDataType_t::ncclUint8,
                    r.peer as i32,
                    self.comm,
                    stream,
                )
            }));
        }
        // SAFETY: ends the group started above (always, so NCCL's state stays consistent).
        let ended = nccl("ncclGroupEnd", unsafe { sys::ncclGroupEnd() });
        issued?;
        ended?;
        self.settle("send/receive")
    }

    /// Waits for the device's stream, giving up after the timeout: the exchange of a peer that
    /// stopped answering would never finish, so the communicator is aborted then.
    pub fn wait_stream(&self, dev: &CudaDevice) -> Result<()> {
        self.live()?;
        bind(dev)?;
        let stream = dev.stream().cu_stream();
        let started = Instant::now();
        loop {
            // SAFETY: queries the device's live stream.
            match unsafe { cu::cuStreamQuery(stream) } {
                cu::CUresult::CUDA_SUCCESS => return self.settle("exchange"),
                cu::CUresult::CUDA_ERROR_NOT_READY if started.elapsed() < self.timeout => {
                    std::thread::sleep(Duration::from_micros(2))
                }
                // The dispatcher cannot be used after this.
                cu::CUresult::CUDA_ERROR_NOT_READY => return Err(self.abort()),
                other => return Err(MoeError::Device(format!("waiting for NCCL: {other:?}"))),
            }
        }
    }
}

fn bind(dev: &CudaDevice) -> Result<()> {
    dev.context()
        .bind_to_thread()
        .map_err(|e| MoeError::Device(e.to_string()))
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !*self.aborted.get_mut() {
            // SAFETY: a live communicator, never used again.
            unsafe { sys::ncclCommAbort(self.comm) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_travel_as_hex_and_bad_text_is_an_error() {
        let mut raw = [0 as c_char; 128];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = (i * 37 % 256) as u8 as c_char;
        }
        let id = NcclId(raw);
        let back = NcclId::from_hex(&id.to_hex()).unwrap();
        assert_eq!(back.0, raw);
        for bad in ["", "zz", &"0".repeat(255), &"g".repeat(256)] {
            assert!(NcclId::from_hex(bad).is_err(), "{bad}");
        }
    }
}
