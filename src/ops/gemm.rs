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

/// Zeros on pages already written, for a buffer that GEMMs (or loops) add into. On a fresh
/// allocation's untouched pages, a GEMM's read of its output before adding maps the shared zero
/// page, and the write after it is a copy-on-write fault whose TLB flush interrupts every thread
/// of the GEMM (`do_wp_page` / `smp_call_function_many_cond` under `perf`: ~10% of HConv's CPU
/// backward, ~5% of the ML-SUPERB head's). Writing the zeros first costs one pass of stores.
pub fn zeros_to_accumulate_into<R: Real>(len: usize) -> Vec<R> {
    let mut v = vec![R::ZERO; len];
    // black_box: the compiler knows the allocation is zeroed and would drop a plain fill.
    std::hint::black_box(v.as_mut_slice()).fill(R::ZERO);
    v
}

/// Lanes of the few-rows product's partial sums: one AVX-512 register of f32.
const LANES: usize = 16;

/// The R x J dot products of rows of `a` with rows of `b` (each `k` long), as LANES partial sums
/// added in a fixed order: the same bits on every CPU and thread count.
#[inline(always)]
fn dots<const R: usize, const J: usize>(a: [&[f32]; R], b: [&[f32]; J], k: usize) -> [[f32; J]; R] {
    let body = k - k % LANES;
    let mut acc = [[[0f32; LANES]; J]; R];
    for p in (0..body).step_by(LANES) {
        let av: [&[f32; LANES]; R] =
            std::array::from_fn(|r| a[r][p..p + LANES].try_into().expect("LANES"));
        let bv: [&[f32; LANES]; J] =
            std::array::from_fn(|j| b[j][p..p + LANES].try_into().expect("LANES"));
        for r in 0..R {
            for j in 0..J {
                for l in 0..LANES {
                    acc[r][j][l] = av[r][l].mul_add(bv[j][l], acc[r][j][l]);
                }
            }
        }
    }
    let mut out = [[0f32; J]; R];
    for r in 0..R {
        for j in 0..J {
            let mut s = acc[r][j].iter().fold(0f32, |x, &y| x + y);
            for q in body..k {
                s = a[r][q].mul_add(b[j][q], s);
            }
            out[r][j] = s;
        }
    }
    out
}

/// [`dots`] with AVX-512 registers: the same fused multiply-adds in the same order, so the same
/// bits (the compiler vectorizes `dots`'s R x J accumulators only 4 lanes wide).
///
/// # Safety
/// The CPU must have AVX-512F, and every row of `a` and `b` must hold at least `k` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512<const R: usize, const J: usize>(
    a: [&[f32]; R],
    b: [&[f32]; J],
    k: usize,
) -> [[f32; J]; R] {
    use std::arch::x86_64::*;
    let body = k - k % LANES;
    let mut acc = [[_mm512_setzero_ps(); J]; R];
    for p in (0..body).step_by(LANES) {
        // SAFETY: p + LANES <= k <= every row's length (the caller's contract).
        let av: [__m512; R] =
            std::array::from_fn(|r| unsafe { _mm512_loadu_ps(a[r].as_ptr().add(p)) });
        let bv: [__m512; J] =
            std::array::from_fn(|j| unsafe { _mm512_loadu_ps(b[j].as_ptr().add(p)) });
        for r in 0..R {
            for j in 0..J {
                acc[r][j] = _mm512_fmadd_ps(av[r], bv[j], acc[r][j]);
            }
        }
    }
    let mut out = [[0f32; J]; R];
    for r in 0..R {
        for j in 0..J {
            let mut lanes = [0f32; LANES];
            // SAFETY: `lanes` holds LANES floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[r][j]) };
            let mut s = lanes.iter().fold(0f32, |x, &y| x + y);
            for q in body..k {
                s = a[r][q].mul_add(b[j][q], s);
            }
            out[r][j] = s;
        }
    }
    out
}

/// [`dots`] compiled for AVX2 + FMA: hardware fused multiply-adds (the baseline build calls
/// libm's `fmaf` for each), the same bits.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const R: usize, const J: usize>(
    a: [&[f32]; R],
    b: [&[f32]; J],
    k: usize,
) -> [[f32; J]; R] {
    dots(a, b, k)
}

/// Whether this CPU runs the few-rows product on fused multiply-add hardware (AVX-512F, or AVX2
/// and FMA). Without it `mul_add` is a libm call per element, far slower than the gemm crate.
pub fn few_rows_is_fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            || (std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`dots`] on the widest registers the CPU has.
#[inline(always)]
fn dots_fast<const R: usize, const J: usize>(
    a: [&[f32]; R],
    b: [&[f32]; J],
    k: usize,
) -> [[f32; J]; R] {
    assert!(a.iter().all(|r| r.len() >= k) && b.iter().all(|r| r.len() >= k));
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present (checked just above); the rows hold k values (asserted).
            return unsafe { dots_avx512(a, b, k) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA are present (checked just above).
            return unsafe { dots_avx2(a, b, k) };
        }
    }
    dots(a, b, k)
}

/// `out[j * m + r] = a[r] · b_rows[j]` for the rows of one block of b, in tiles of up to 4 rows
/// of a by 4 of b (16 accumulators: each loaded vector feeds 4 products).
fn few_rows_block(m: usize, k: usize, a: &[f32], b_rows: &[f32], out: &mut [f32]) {
    let jn = b_rows.len() / k;
    let mut j = 0;
    while j < jn {
        let jw = if j + 4 <= jn { 4 } else { 1 };
        let mut r = 0;
        while r < m {
            let rw = match m - r {
                4.. => 4,
                2 | 3 => 2,
                _ => 1,
            };
            let at = (m, k, a, b_rows, r, j);
            match (rw, jw) {
                (4, 4) => tile::<4, 4>(at, out),
                (2, 4) => tile::<2, 4>(at, out),
                (1, 4) => tile::<1, 4>(at, out),
                (4, _) => tile::<4, 1>(at, out),
                (2, _) => tile::<2, 1>(at, out),
                _ => tile::<1, 1>(at, out),
            }
            r += rw;
        }
        j += jw;
    }
}

/// One R x J tile of [`few_rows_block`]: rows r.. of a against rows j.. of the block.
#[inline(always)]
fn tile<const R: usize, const J: usize>(
    (m, k, a, b_rows, r, j): (usize, usize, &[f32], &[f32], usize, usize),
    out: &mut [f32],
) {
    let d = dots_fast::<R, J>(
        std::array::from_fn(|i| &a[(r + i) * k..(r + i + 1) * k]),
        std::array::from_fn(|q| &b_rows[(j + q) * k..(j + q + 1) * k]),
        k,
    );
    for (i, row) in d.iter().enumerate() {
        for (q, v) in row.iter().enumerate() {
            out[(j + q) * m + r + i] = *v;
        }
    }
}

/// `c[m,n] = a[m,k] · b[n,k]^T` for a few rows m (a recurrence's step, one row per sequence):
/// dot products that read each row of `b` once, split over threads by blocks of b's rows. The
/// `gemm` crate repacks all of `b` on every call, which at m = 8 and a 4096 x 1024 `b` cost
/// three times the arithmetic. Deterministic (the sums' order does not depend on the threads).
pub fn gemm_nt_few_rows(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    use rayon::prelude::*;
    assert_eq!(a.len(), m * k, "gemm_nt_few_rows: a is not {m}x{k}");
    assert_eq!(b.len(), n * k, "gemm_nt_few_rows: b is not {n}x{k}");
    assert_eq!(c.len(), m * n, "gemm_nt_few_rows: c is not {m}x{n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    // Blocks of b's rows: about 256 KB of b each (the L2's share), at least 4 rows.
    let rows = ((1 << 16) / k).clamp(4, n.max(4)) / 4 * 4;
    let blocks: Vec<Vec<f32>> = b
        .par_chunks(rows * k)
        .map(|block| {
            let mut out = vec![0f32; block.len() / k * m];
            few_rows_block(m, k, a, block, &mut out);
            out
        })
        .collect();
    for (bi, out) in blocks.iter().enumerate() {
        for (jj, col) in out.chunks_exact(m).enumerate() {
            for (r, v) in col.iter().enumerate() {
                c[r * n + bi * rows + jj] = *v;
            }
        }
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
    fn few_rows_product_matches_naive_at_every_tile_edge() {
        // Every tile shape (rows of a: 4, 2, 1; rows of b: 4, 1), k around the vector width,
        // and at k = 1024 several blocks of b's rows (64 each) with a partial last one.
        for (k, ns) in [(1, 9), (15, 13), (16, 6), (17, 7), (37, 11), (1024, 203)] {
            for m in 1..=9 {
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect();
                let b: Vec<f32> = (0..ns * k)
                    .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
                    .collect();
                let mut c = vec![f32::NAN; m * ns];
                gemm_nt_few_rows(m, k, ns, &a, &b, &mut c);
                let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                let want = naive(m, k, ns, &wide(&a), Trans::N, &wide(&b), Trans::T);
                let scale = want.iter().fold(1f64, |s, v| s.max(v.abs()));
                for (i, (x, y)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        (*x as f64 - y).abs() <= 1e-6 * scale * (k as f64).sqrt(),
                        "m {m} k {k} n {ns} [{i}]: {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn few_rows_dots_give_the_same_bits_on_every_path() {
        let k = 100;
        let rows: Vec<Vec<f32>> = (0..8)
            .map(|r| {
                (0..k)
                    .map(|i| ((i * 7 + r * 13) % 29) as f32 * 0.1 - 1.3)
                    .collect()
            })
            .collect();
        let a: [&[f32]; 4] = std::array::from_fn(|i| rows[i].as_slice());
        let b: [&[f32]; 4] = std::array::from_fn(|i| rows[4 + i].as_slice());
        let want = dots::<4, 4>(a, b, k);
        assert_eq!(dots_fast::<4, 4>(a, b, k), want);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA are present (checked just above).
            assert_eq!(unsafe { dots_avx2::<4, 4>(a, b, k) }, want);
        }
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
