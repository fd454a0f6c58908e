//! The 128x4 swizzled block-scale layout that Blackwell/Hopper FP4 GEMMs (CUTLASS `SfAtom`, the CuteDSL
//! and TensorRT-LLM kernels) read: scales of a `[rows, k_sf]` matrix (k_sf = columns / block size) are
//! stored as `[ceil(rows / 128), ceil(k_sf / 4), 32, 4, 4]`, so one 512-byte tile holds 128 rows by 4
//! scale columns, with row m at `(m % 32) * 16 + ((m % 128) / 32) * 4`. Rows are padded to 128 and
//! k_sf to 4; the padding bytes are 0.

use crate::shape::{element_count, expect_len};
use crate::QuantError;

/// Rows of one swizzle tile.
const TILE_ROWS: usize = 128;
/// Scale columns of one swizzle tile.
const TILE_COLS: usize = 4;
/// Bytes of one swizzle tile.
const TILE_BYTES: usize = TILE_ROWS * TILE_COLS;

/// Byte offset of scale (m, k) in the swizzled layout of a matrix with `k_sf` scale columns:
/// `mTile * (kTiles * 512) + kTile * 512 + (m % 32) * 16 + ((m % 128) / 32) * 4 + k % 4`, where
/// `mTile = m / 128`, `kTile = k / 4`, `kTiles = ceil(k_sf / 4)`.
pub fn swizzled_offset(m: usize, k: usize, k_sf: usize) -> usize {
    let k_tiles = k_sf.div_ceil(TILE_COLS);
    (m / TILE_ROWS) * (k_tiles * TILE_BYTES)
        + (k / TILE_COLS) * TILE_BYTES
        + (m % 32) * 16
        + ((m % TILE_ROWS) / 32) * 4
        + k % TILE_COLS
}

/// Bytes of the swizzled layout: rows padded to a multiple of 128 times `k_sf` padded to a multiple of 4.
pub fn swizzled_len(rows: usize, k_sf: usize) -> usize {
    rows.div_ceil(TILE_ROWS) * TILE_ROWS * k_sf.div_ceil(TILE_COLS) * TILE_COLS
}

/// [`swizzled_len`] with overflow reported as an error.
fn checked_swizzled_len(rows: usize, k_sf: usize) -> Result<usize, QuantError> {
    element_count(
        "swizzled scales [ceil(rows / 128) * 128, ceil(k_sf / 4) * 4]",
        &[
            rows.div_ceil(TILE_ROWS),
            TILE_BYTES,
            k_sf.div_ceil(TILE_COLS),
        ],
    )
}

/// Rearranges row-major `[rows, k_sf]` scales into the 128x4 swizzled layout, zero-filling the padding.
pub fn swizzle_scales_128x4(
    linear: &[u8],
    rows: usize,
    k_sf: usize,
) -> Result<Vec<u8>, QuantError> {
    let len = element_count("linear scales [rows, k_sf]", &[rows, k_sf])?;
    expect_len("linear scales [rows, k_sf]", len, linear.len())?;
    let mut out = vec![0u8; checked_swizzled_len(rows, k_sf)?];
    for m in 0..rows {
        for (k, &v) in linear[m * k_sf..(m + 1) * k_sf].iter().enumerate() {
            out[swizzled_offset(m, k, k_sf)] = v;
        }
    }
    Ok(out)
}

/// Inverse of [`swizzle_scales_128x4`]: row-major `[rows, k_sf]` scales from the swizzled layout
/// (whose length must be [`swizzled_len`]`(rows, k_sf)`); padding is dropped.
pub fn unswizzle_scales_128x4(
    swizzled: &[u8],
    rows: usize,
    k_sf: usize,
) -> Result<Vec<u8>, QuantError> {
    expect_len(
        "swizzled scales [ceil(rows / 128) * 128, ceil(k_sf / 4) * 4]",
        checked_swizzled_len(rows, k_sf)?,
        swizzled.len(),
    )?;
    let mut out = vec![0u8; rows * k_sf];
    for m in 0..rows {
        for (k, v) in out[m * k_sf..(m + 1) * k_sf].iter_mut().enumerate() {
            *v = swizzled[swizzled_offset(m, k, k_sf)];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_offsets() {
        // k_sf = 8: two k-tiles, so one 128-row tile spans 1024 bytes.
        assert_eq!(swizzled_offset(0, 0, 8), 0);
        assert_eq!(swizzled_offset(0, 3, 8), 3);
        assert_eq!(swizzled_offset(1, 0, 8), 16);
        assert_eq!(swizzled_offset(32, 0, 8), 4);
        assert_eq!(swizzled_offset(33, 2, 8), 16 + 4 + 2);
        assert_eq!(swizzled_offset(127, 3, 8), 31 * 16 + 3 * 4 + 3);
        assert_eq!(swizzled_offset(0, 4, 8), 512);
        assert_eq!(swizzled_offset(128, 0, 8), 1024);
        assert_eq!(swizzled_offset(130, 5, 8), 1024 + 512 + 2 * 16 + 1);
        // k_sf = 5 pads to 8 columns.
        assert_eq!(swizzled_offset(128, 0, 5), 1024);
        assert_eq!(swizzled_len(1, 1), 512);
        assert_eq!(swizzled_len(129, 5), 256 * 8);
        assert_eq!(swizzled_len(0, 7), 0);
        assert_eq!(swizzled_len(7, 0), 0);
    }

    #[test]
    fn offset_is_a_bijection_onto_the_padded_range() {
        for (rows, k_sf) in [(128, 4), (256, 12), (384, 8)] {
            let len = swizzled_len(rows, k_sf);
            assert_eq!(len, rows * k_sf);
            let mut seen = vec![false; len];
            for m in 0..rows {
                for k in 0..k_sf {
                    let o = swizzled_offset(m, k, k_sf);
                    assert!(!seen[o], "offset {o} hit twice");
                    seen[o] = true;
                }
            }
            assert!(seen.iter().all(|&s| s));
        }
    }

    #[test]
    fn padding_is_zero_and_lengths_are_checked() {
        let linear: Vec<u8> = (1..=15).collect(); // 3 rows x 5 scale columns
        let sw = swizzle_scales_128x4(&linear, 3, 5).unwrap();
        assert_eq!(sw.len(), 128 * 8);
        assert_eq!(sw.iter().filter(|&&b| b != 0).count(), 15);
        assert_eq!(unswizzle_scales_128x4(&sw, 3, 5).unwrap(), linear);
        assert!(matches!(
            swizzle_scales_128x4(&linear, 3, 4),
            Err(QuantError::Length {
                expected: 12,
                got: 15,
                ..
            })
        ));
        assert!(matches!(
            unswizzle_scales_128x4(&sw[1..], 3, 5),
            Err(QuantError::Length {
                expected: 1024,
                got: 1023,
                ..
            })
        ));
        assert!(swizzle_scales_128x4(&[], 0, 5).unwrap().is_empty());
        assert!(unswizzle_scales_128x4(&[], 0, 5).unwrap().is_empty());
        assert!(matches!(
            swizzle_scales_128x4(&[], usize::MAX, 2),
            Err(QuantError::Overflow { .. })
        ));
    }
}
