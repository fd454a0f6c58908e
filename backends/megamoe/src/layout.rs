//! The symmetric buffer: one allocation per rank, the same layout on every rank, so a rank
//! addresses a region of any peer's buffer at the offset it uses in its own. Peers read the
//! pre-dispatched rows and top-k and write the combine slots; the rest (gathered rows, the
//! intermediate) is this rank's, kept in the same allocation so one size covers the layer.

use moe_dispatch::DispatcherConfig;
use moe_runner_core::{MoeError, Result};

/// Most ranks: each is told "ready" and "done" by one consumer thread of block 0 (256 of them);
/// the control words have room for 1024.
pub const MAX_RANKS: usize = 256;
/// Flags the control region holds per kind (ready, done).
const FLAG_SLOTS: usize = 1024;
/// k values per load group of the kernel; both GEMMs' inner sizes must be multiples of it.
pub const K_GROUP: usize = 128;
/// Phase-boundary timestamps the program keeps (u64 nanoseconds after the flags).
pub const PHASES: usize = 8;
/// Byte offset of the phase timestamps in the control region.
pub const STAMPS_OFFSET: u64 = ((16 + 2 * FLAG_SLOTS) * 4) as u64;
/// The phases between consecutive timestamps.
pub const PHASE_NAMES: [&str; PHASES - 1] = [
    "pre-dispatch",
    "ready wait",
    "dispatch",
    "GEMM 1",
    "GEMM 2",
    "done wait",
    "combine",
];

/// What the buffer is sized for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MegaShape {
    pub ranks: usize,
    pub rank: usize,
    /// Most tokens one rank sends in a call (`T`).
    pub max_tokens: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub inter: usize,
    pub num_experts: usize,
    pub local_experts: usize,
}

/// Byte offsets of each region, and the total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Epoch, grid barrier, ready and done flags (u32 each, one per rank), then the phase
    /// timestamps of the last call.
    pub ctrl: u64,
    /// `[E_local] u32`: rows received per local expert (zero between calls).
    pub counts: u64,
    /// `[T, H]` bytes: this rank's tokens, E2M1 (`H/2` bytes a row, element 2i in the low
    /// nibble) or E4M3 (`H` bytes) per the activations.
    pub x: u64,
    /// `[T, H/32]` UE8M0 scales of `x`.
    pub xs: u64,
    /// `[T, k] i32` global expert ids, -1 past the batch.
    pub ids: u64,
    /// `[T, k] f32` router weights, 0 past the batch.
    pub weights: u64,
    /// `[T, k, H] bf16`: each (token, k) result, written by the rank holding the expert.
    pub y: u64,
    /// `[E_local, R*T*k] i32`: received entries per local expert (entry = (src*T + t)*k + k').
    pub list: u64,
    /// `[R*T*k, H]` bytes: received rows in the GEMM's operand layout.
    pub xg: u64,
    /// `[R*T*k, ceil32(H/32)]` their scales.
    pub xgs: u64,
    /// `[R*T*k] f32` their router weights.
    pub wg: u64,
    /// `[R*T*k, I]` bytes: GEMM 2's quantized input.
    pub h: u64,
    /// `[R*T*k, ceil32(I/32)]` its scales.
    pub hs: u64,
    pub bytes: u64,
}

impl MegaShape {
    /// The shape of a dispatcher config; checks every size the kernel tiles need.
    pub fn of(cfg: &DispatcherConfig) -> Result<Self> {
        cfg.validate()?;
        let s = Self {
            ranks: cfg.world_size,
            rank: cfg.rank,
            max_tokens: cfg.max_tokens_per_rank,
            top_k: cfg.top_k,
            hidden: cfg.hidden_size,
            inter: cfg.intermediate_size,
            num_experts: cfg.num_experts,
            local_experts: cfg.num_local_experts,
        };
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<()> {
        let err = |m: String| Err(MoeError::Config(m));
        if self.top_k == 0 {
            return err(
                "megamoe sizes its combine slots by top_k: set the dispatcher's top_k".into(),
            );
        }
        if self.ranks == 0 || self.ranks > MAX_RANKS {
            return err(format!(
                "megamoe supports 1 to {MAX_RANKS} ranks, got {}",
                self.ranks
            ));
        }
        for (what, v) in [
            ("hidden_size", self.hidden),
            ("intermediate_size", self.inter),
        ] {
            if v == 0 || v % K_GROUP != 0 {
                return Err(MoeError::NotDivisible {
                    what: format!(
                        "megamoe {what} (the kernel reads K in groups of 128, MXFP4 blocks of 32)"
                    ),
                    value: v,
                    divisor: K_GROUP,
                });
            }
        }
        if self.local_experts == 0 {
            return err("megamoe needs at least one expert per rank".into());
        }
        Ok(())
    }

    /// Received entries a rank can hold: every rank's every (token, k) slot.
    pub fn capacity(&self) -> Result<u64> {
        mul(&[self.ranks, self.max_tokens, self.top_k])
    }

    /// The region offsets; an error when the sizes overflow.
    pub fn layout(&self) -> Result<Layout> {
        let (t, k, h, i) = (self.max_tokens, self.top_k, self.hidden, self.inter);
        let cap = self.capacity()? as usize;
        let mut at = 0u64;
        let mut take = |bytes: u64| -> Result<u64> {
            let off = at;
            at = off
                .checked_add(bytes)
                .and_then(|v| v.checked_next_multiple_of(256))
                .ok_or_else(|| MoeError::Config("megamoe buffer size overflows".into()))?;
            Ok(off)
        };
        Ok(Layout {
            ctrl: take(((16 + 2 * FLAG_SLOTS) * 4 + 8 * PHASES) as u64)?,
            counts: take(mul(&[self.local_experts, 4])?)?,
            x: take(mul(&[t, h])?)?,
            xs: take(mul(&[t, h / 32])?)?,
            ids: take(mul(&[t, k, 4])?)?,
            weights: take(mul(&[t, k, 4])?)?,
            y: take(mul(&[t, k, h, 2])?)?,
            list: take(mul(&[self.local_experts, cap, 4])?)?,
            xg: take(mul(&[cap, h])?)?,
            xgs: take(mul(&[cap, scale_pitch(h)])?)?,
            wg: take(mul(&[cap, 4])?)?,
            h: take(mul(&[cap, i])?)?,
            hs: take(mul(&[cap, scale_pitch(i)])?)?,
            bytes: take(0)?,
        })
    }
}

/// Bytes per row of the received rows' (and the intermediate's) scales: `K / 32` rounded up to
/// 32, so the kernel copies each stage's 32 scale bytes of a row as one aligned block.
fn scale_pitch(k: usize) -> usize {
    (k / 32).div_ceil(32) * 32
}

fn mul(v: &[usize]) -> Result<u64> {
    v.iter()
        .try_fold(1u64, |a, &b| a.checked_mul(b as u64))
        .ok_or_else(|| MoeError::Config("megamoe buffer size overflows".into()))
}

/// Bytes of one rank's symmetric buffer for `cfg` (its `intermediate_size` and `top_k` set),
/// to check before anything is allocated.
pub fn buffer_bytes(cfg: &DispatcherConfig) -> Result<u64> {
    Ok(MegaShape::of(cfg)?.layout()?.bytes)
}
