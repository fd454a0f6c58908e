//! f32 matrix products on the `gemm` crate (SIMD kernels, rayon threads).

use gemm::Parallelism;

/// `c[m, n] = a[m, k] * b[n, k]^T`, all row-major (`b` holds one output channel per row, the
/// layout of expert weights).
pub fn matmul_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) {
    assert!(
        a.len() == m * k && b.len() == n * k && c.len() == m * n,
        "matmul_nt: caller passed inconsistent sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    let par = if m * n * k >= 1 << 20 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the lengths are checked above; strides describe row-major a, c and b^T.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_triple_loop() {
        let (m, n, k) = (5, 7, 33);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 7.0)
            .collect();
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 53 % 19) as f32 - 9.0) / 5.0)
            .collect();
        let mut c = vec![f32::NAN; m * n];
        matmul_nt(&a, &b, &mut c, m, n, k);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|x| a[i * k + x] * b[j * k + x]).sum();
                assert!((c[i * n + j] - want).abs() <= 1e-4 * want.abs().max(1.0));
            }
        }
    }
}
