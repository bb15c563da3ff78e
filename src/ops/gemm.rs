//! Row-major matrix products on top of the `gemm` crate (strided, so transposes cost nothing).
//! `C = beta*C + A·B` with A either [m,k] or stored transposed as [k,m], B either [k,n] or [n,k].

use super::Real;

/// Whether an operand is stored as written (`N`) or transposed (`T`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Trans {
    N,
    T,
}

/// `c[m,n] = beta * c + op(a) · op(b)` where op(a) is [m,k] and op(b) is [k,n].
///
/// `a` is stored [m,k] for `Trans::N` or [k,m] for `Trans::T`; `b` is [k,n] or [n,k]. `c` must be
/// m*n long. With beta == 0 the previous contents of `c` are ignored (even NaN).
#[allow(clippy::too_many_arguments)]
pub fn gemm<R: Real>(
    m: usize,
    k: usize,
    n: usize,
    a: &[R],
    ta: Trans,
    b: &[R],
    tb: Trans,
    beta: R,
    c: &mut [R],
) {
    assert_eq!(
        a.len(),
        m * k,
        "gemm: a has {} elements, expected {m}x{k}",
        a.len()
    );
    assert_eq!(
        b.len(),
        k * n,
        "gemm: b has {} elements, expected {k}x{n}",
        b.len()
    );
    assert_eq!(
        c.len(),
        m * n,
        "gemm: c has {} elements, expected {m}x{n}",
        c.len()
    );
    if k == 0 {
        if beta == R::ZERO {
            c.iter_mut().for_each(|x| *x = R::ZERO);
        } else {
            c.iter_mut().for_each(|x| *x *= beta);
        }
        return;
    }
    // With beta == 0 the backend does not read C (NaN-safe).
    let (rsa, csa) = match ta {
        Trans::N => (k as isize, 1),
        Trans::T => (1, m as isize),
    };
    let (rsb, csb) = match tb {
        Trans::N => (n as isize, 1),
        Trans::T => (1, k as isize),
    };
    // SAFETY: the asserts above pin every slice to exactly the extent these strides reach.
    unsafe {
        R::gemm_raw(
            m,
            k,
            n,
            R::ONE,
            a,
            rsa,
            csa,
            b,
            rsb,
            csb,
            beta,
            c,
            n as isize,
        )
    };
}

/// `c[m,n] = beta * c + a[m,k] · b[k,n]` over strided views (row stride, column stride; `c`'s
/// column stride is 1), each view checked to lie inside its slice: the safe form of
/// [`Real::gemm_raw`] for operands that are slices of larger rows (one attention head's columns,
/// a shifted window of frames, a weight's column block).
pub fn gemm_strided<R: Real>(
    (m, k, n): (usize, usize, usize),
    (a, rsa, csa): (&[R], usize, usize),
    (b, rsb, csb): (&[R], usize, usize),
    beta: R,
    (c, rsc): (&mut [R], usize),
) {
    if m == 0 || n == 0 || k == 0 {
        if beta == R::ZERO {
            (0..m).for_each(|i| c[i * rsc..i * rsc + n].fill(R::ZERO));
        }
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(m, k, rsa, csa) < a.len() && last(k, n, rsb, csb) < b.len(),
        "gemm_strided: an operand view reaches past its slice"
    );
    assert!(
        last(m, n, rsc, 1) < c.len(),
        "gemm_strided: the output view reaches past its slice"
    );
    // SAFETY: the asserts above keep every element the strides reach inside its slice.
    unsafe {
        R::gemm_raw(
            m,
            k,
            n,
            R::ONE,
            a,
            rsa as isize,
            csa as isize,
            b,
            rsb as isize,
            csb as isize,
            beta,
            c,
            rsc as isize,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f64], ta: Trans, b: &[f64], tb: Trans) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if ta == Trans::N {
                        a[i * k + p]
                    } else {
                        a[p * m + i]
                    };
                    let bv = if tb == Trans::N {
                        b[p * n + j]
                    } else {
                        b[j * k + p]
                    };
                    s += av * bv;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn all_transposes_match_naive() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.11).cos()).collect();
        for ta in [Trans::N, Trans::T] {
            for tb in [Trans::N, Trans::T] {
                let mut c = vec![f64::NAN; m * n];
                gemm(m, k, n, &a, ta, &b, tb, 0.0, &mut c);
                let r = naive(m, k, n, &a, ta, &b, tb);
                for (x, y) in c.iter().zip(&r) {
                    assert!((x - y).abs() < 1e-12, "{ta:?} {tb:?}: {x} vs {y}");
                }
                let mut c2 = r.clone();
                gemm(m, k, n, &a, ta, &b, tb, 1.0, &mut c2);
                for (x, y) in c2.iter().zip(&r) {
                    assert!((x - 2.0 * y).abs() < 1e-12);
                }
            }
        }
    }
}
