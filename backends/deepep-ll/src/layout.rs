//! The byte layout of one buffer set, identical on every rank so a rank addresses a peer's
//! region as the peer's base plus the same offset, and the size function engines call before
//! allocating.

use moe_dispatch::{DispatcherConfig, Wire};
use moe_runner_core::{MoeError, Result};

/// Most ranks one world may have (the receive kernel keeps per-rank offsets in shared memory).
pub const MAX_RANKS: usize = 16;

const ALIGN: u64 = 256;

/// Most experts per token (the kernels keep a token's picks in registers).
pub const MAX_TOP_K: usize = 32;
/// Token chunks the routing kernel splits a batch into (each ranked by its own warps).
pub const MAX_CHUNKS: usize = 16;

/// Byte offsets of one buffer set, passed to the kernels by value (mirrors `LlLayout` in
/// `kernels/ll.cu`), plus the routing chunk of the call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LlLayout {
    pub x: u64,
    pub x_scale: u64,
    pub src_info: u64,
    pub src_slot: u64,
    pub counts: u64,
    pub masked_m: u64,
    pub layout_range: u64,
    pub comb: u64,
    pub dflag: u64,
    pub cflag: u64,
    pub state: u64,
    pub slot_of: u64,
    pub chunk_counts: u64,
    pub status: u64,
    pub el: i32,
    pub r: i32,
    pub t: i32,
    pub h: i32,
    pub k: i32,
    pub rank: i32,
    /// Tokens per routing chunk: a multiple of 32 with at most [`MAX_CHUNKS`] chunks.
    pub chunk: i32,
    /// The NVFP4 wire's global scale, as f32 bits (the kernels quantize with it).
    pub gs_bits: u32,
}

impl LlLayout {
    /// This layout for a batch of `m` tokens: chunks of 32 tokens (one warp step each; a warp
    /// walking 128 tokens alone is slower than four warps and a prefix sum), up to
    /// [`MAX_CHUNKS`] chunks. A batch of one chunk has its counts published by each expert's
    /// warp at once.
    pub fn for_batch(mut self, m: usize) -> (Self, usize) {
        let chunk = 32 * m.div_ceil(32 * MAX_CHUNKS).max(1);
        self.chunk = chunk as i32;
        (self, m.div_ceil(chunk).max(1))
    }
}

/// One set's layout plus the runner-output region (`y`, read by the combine in place) and the
/// set's total size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetLayout {
    pub kernel: LlLayout,
    pub y: u64,
    pub bytes: u64,
}

/// The sizes a set is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlShape {
    pub ranks: usize,
    pub local_experts: usize,
    pub max_tokens: usize,
    pub hidden: usize,
    pub top_k: usize,
    pub wire: Wire,
    /// Bytes of one activation element (2: bf16 or f16).
    pub act_bytes: usize,
    /// The NVFP4 wire's global scale, as f32 bits (0 for other wires).
    pub gs_bits: u32,
}

impl LlShape {
    /// Checks a dispatcher config's sizes for this backend.
    pub fn of(cfg: &DispatcherConfig) -> Result<Self> {
        cfg.validate()?;
        let bad = |m: String| Err(MoeError::Config(m));
        if cfg.world_size > MAX_RANKS {
            return bad(format!(
                "deepep_ll supports up to {MAX_RANKS} ranks, got {}",
                cfg.world_size
            ));
        }
        if cfg.top_k == 0 || cfg.top_k > cfg.num_experts.min(MAX_TOP_K) {
            return bad(format!(
                "deepep_ll sizes its combine buffer [T, top_k, H] by top_k: set DispatcherConfig::top_k to 1..={} (got {})",
                cfg.num_experts.min(MAX_TOP_K),
                cfg.top_k
            ));
        }
        if cfg.max_tokens_per_rank == 0 {
            return bad("deepep_ll needs max_tokens_per_rank >= 1".into());
        }
        // Rows move in 16-byte pieces and scales in 4-byte words.
        let need = match cfg.wire {
            Wire::Native => 8,
            Wire::Fp8 | Wire::Fp8Ue8m0 => 128,
            Wire::Nvfp4 => 64,
        };
        if !cfg.hidden_size.is_multiple_of(need) {
            return Err(MoeError::NotDivisible {
                what: format!("hidden_size for deepep_ll with wire {:?}", cfg.wire),
                value: cfg.hidden_size,
                divisor: need,
            });
        }
        Ok(Self {
            ranks: cfg.world_size,
            local_experts: cfg.num_local_experts,
            max_tokens: cfg.max_tokens_per_rank,
            hidden: cfg.hidden_size,
            top_k: cfg.top_k,
            wire: cfg.wire,
            act_bytes: 2,
            gs_bits: if cfg.wire == Wire::Nvfp4 {
                cfg.nvfp4_global_scale.to_bits()
            } else {
                0
            },
        })
    }

    /// Bytes of one dispatched row on the wire.
    pub fn x_bytes(&self) -> usize {
        match self.wire {
            Wire::Native => self.hidden * self.act_bytes,
            Wire::Fp8 | Wire::Fp8Ue8m0 => self.hidden,
            Wire::Nvfp4 => self.hidden / 2,
        }
    }

    /// Bytes of one dispatched row's scales: f32 per 128 values (FP8), E4M3 per 16 (NVFP4).
    pub fn scale_bytes(&self) -> usize {
        match self.wire {
            Wire::Native => 0,
            Wire::Fp8 | Wire::Fp8Ue8m0 => self.hidden / 128 * 4,
            Wire::Nvfp4 => self.hidden / 16,
        }
    }

    /// Rows per local expert (R * T).
    pub fn rows(&self) -> usize {
        self.ranks * self.max_tokens
    }

    /// The layout of one set for `rank`.
    pub fn layout(&self, rank: usize) -> SetLayout {
        let mut at = 0u64;
        let mut take = |bytes: usize| {
            let off = at;
            at += (bytes as u64).div_ceil(ALIGN) * ALIGN;
            off
        };
        let (el, rt, h) = (self.local_experts, self.rows(), self.hidden);
        let scale_bytes = el * rt * self.scale_bytes();
        let e = el * self.ranks;
        let kernel = LlLayout {
            x: take(el * rt * self.x_bytes()),
            x_scale: take(scale_bytes),
            src_info: take(el * rt * 4),
            src_slot: take(el * rt * 4),
            counts: take(self.ranks * e * 8),
            masked_m: take(el * 4),
            layout_range: take(el * self.ranks * 8),
            comb: take(self.max_tokens * self.top_k * h * self.act_bytes),
            dflag: take(self.ranks * 8),
            cflag: take(self.ranks * 8),
            state: take(16 * 8),
            slot_of: take(self.max_tokens * self.top_k * 4),
            chunk_counts: take(MAX_CHUNKS * e * 4),
            status: take(4),
            el: el as i32,
            r: self.ranks as i32,
            t: self.max_tokens as i32,
            h: h as i32,
            k: self.top_k as i32,
            rank: rank as i32,
            chunk: 32,
            gs_bits: self.gs_bits,
        };
        let y = take(el * rt * h * self.act_bytes);
        SetLayout {
            kernel,
            y,
            bytes: at,
        }
    }
}

/// Device bytes one rank allocates for the low-latency all-to-all: two buffer sets for
/// (max tokens per rank, hidden, ranks, experts, top-k, wire format). Call it before building a
/// world to check the memory budget.
pub fn buffer_bytes(
    max_tokens_per_rank: usize,
    hidden: usize,
    ranks: usize,
    experts: usize,
    top_k: usize,
    wire: Wire,
) -> Result<u64> {
    let mut cfg = DispatcherConfig::single(experts, hidden, max_tokens_per_rank).with_top_k(top_k);
    cfg.world_size = ranks;
    cfg.num_local_experts = experts / ranks.max(1);
    cfg.wire = wire;
    Ok(2 * LlShape::of(&cfg)?.layout(0).bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_disjoint_aligned_and_sized() {
        let mut cfg = DispatcherConfig::single(256, 7168, 128).with_top_k(8);
        cfg.world_size = 2;
        cfg.num_local_experts = 128;
        cfg.wire = Wire::Fp8;
        let s = LlShape::of(&cfg).unwrap();
        let l = s.layout(1);
        let k = l.kernel;
        let mut regions = [
            (k.x, 128 * 256 * 7168),
            (k.x_scale, 128 * 256 * 56 * 4),
            (k.counts, 2 * 256 * 8),
            (k.comb, 128 * 8 * 7168 * 2),
            (k.status, 4),
            (l.y, 128 * 256 * 7168 * 2),
        ];
        regions.sort();
        for w in regions.windows(2) {
            assert!(w[0].0 + w[0].1 as u64 <= w[1].0, "{w:?} overlap");
        }
        assert!(regions.iter().all(|(o, _)| o % 256 == 0));
        assert_eq!(l.bytes % 256, 0);
        assert!(l.bytes >= regions.last().map(|(o, n)| o + *n as u64).unwrap());
        assert_eq!(k.rank, 1);
        assert_eq!(
            buffer_bytes(128, 7168, 2, 256, 8, Wire::Fp8).unwrap(),
            2 * l.bytes
        );
    }

    #[test]
    fn routing_chunks_are_whole_warps_and_at_most_sixteen() {
        let l = LlLayout::default();
        for m in [0, 1, 31, 32, 33, 128, 511, 512, 513, 4096, 100_000] {
            let (l, chunks) = l.for_batch(m);
            assert_eq!(l.chunk % 32, 0, "M={m}");
            assert!((1..=MAX_CHUNKS).contains(&chunks), "M={m}: {chunks}");
            assert!(chunks * l.chunk as usize >= m, "M={m}");
        }
    }

    #[test]
    fn the_nvfp4_wire_halves_the_fp8_row_and_checks_its_scale() {
        let mut cfg = DispatcherConfig::single(256, 7168, 128).with_top_k(8);
        cfg.wire = Wire::Nvfp4;
        // No global scale given: a configuration error, not a wire of zero scales.
        assert!(matches!(LlShape::of(&cfg), Err(MoeError::Config(_))));
        cfg.nvfp4_global_scale = 672.0;
        let s = LlShape::of(&cfg).unwrap();
        assert_eq!((s.x_bytes(), s.scale_bytes()), (3584, 448));
        assert_eq!(s.layout(0).kernel.gs_bits, 672f32.to_bits());
        cfg.wire = Wire::Fp8;
        let f = LlShape::of(&cfg).unwrap();
        assert_eq!((f.x_bytes(), f.scale_bytes()), (7168, 224));
        // Scales move in 4-byte words of four 16-value blocks.
        let mut odd = DispatcherConfig::single(8, 96, 4).with_top_k(2);
        odd.wire = Wire::Nvfp4;
        odd.nvfp4_global_scale = 1.0;
        assert!(matches!(
            LlShape::of(&odd),
            Err(MoeError::NotDivisible { divisor: 64, .. })
        ));
    }

    #[test]
    fn bad_sizes_are_typed_errors() {
        let cfg = DispatcherConfig::single(8, 256, 4);
        assert!(LlShape::of(&cfg).unwrap_err().to_string().contains("top_k"));
        let mut cfg = DispatcherConfig::single(8, 200, 4).with_top_k(2);
        cfg.wire = Wire::Fp8;
        assert!(matches!(
            LlShape::of(&cfg),
            Err(MoeError::NotDivisible { divisor: 128, .. })
        ));
    }
}
