//! Row-parallel loops. Quantization works row by row (or block-row by block-row) with no data shared
//! between rows, so large inputs split across the rayon pool; small ones stay on the calling thread,
//! where the fork/join cost would exceed the work.

use rayon::prelude::*;

/// Elements (roughly, per call) below which a loop stays serial, and the least work one rayon task gets.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Minimum rows per rayon task for rows of `row_elems` elements.
fn min_rows_per_task(row_elems: usize) -> usize {
    (PAR_MIN_ELEMS / row_elems.max(1)).max(1)
}

/// Calls `f(row, out_row)` for each `row_len`-long row of `out`, in parallel when `elems` (the work the
/// whole call does, in elements) is large. Does nothing when `row_len` is zero.
pub(crate) fn for_each_row<A, F>(out: &mut [A], row_len: usize, elems: usize, f: F)
where
    A: Send,
    F: Fn(usize, &mut [A]) + Sync + Send,
{
    if row_len == 0 {
        return;
    }
    if elems < PAR_MIN_ELEMS {
        out.chunks_mut(row_len)
            .enumerate()
            .for_each(|(r, a)| f(r, a));
    } else {
        let per_task = min_rows_per_task(elems / (out.len() / row_len).max(1));
        out.par_chunks_mut(row_len)
            .with_min_len(per_task)
            .enumerate()
            .for_each(|(r, a)| f(r, a));
    }
}

/// Like [`for_each_row`] over two outputs whose rows correspond one to one (quantized values and their
/// scales). Does nothing when either row length is zero.
pub(crate) fn for_each_row2<A, B, F>(
    a: &mut [A],
    a_row: usize,
    b: &mut [B],
    b_row: usize,
    elems: usize,
    f: F,
) where
    A: Send,
    B: Send,
    F: Fn(usize, &mut [A], &mut [B]) + Sync + Send,
{
    if a_row == 0 || b_row == 0 {
        return;
    }
    if elems < PAR_MIN_ELEMS {
        a.chunks_mut(a_row)
            .zip(b.chunks_mut(b_row))
            .enumerate()
            .for_each(|(r, (x, y))| f(r, x, y));
    } else {
        let per_task = min_rows_per_task(elems / (a.len() / a_row).max(1));
        a.par_chunks_mut(a_row)
            .zip(b.par_chunks_mut(b_row))
            .with_min_len(per_task)
            .enumerate()
            .for_each(|(r, (x, y))| f(r, x, y));
    }
}
