//! Eigendecomposition of a real symmetric matrix (f64): Householder reduction to tridiagonal
//! form, then the implicit QL algorithm with Wilkinson-style shifts (the EISPACK tred2 / tql2
//! pair, as in JAMA). PCA + Concat fits its per-layer projections with it: D x D covariances,
//! D up to ~1024, once per run. O(n^3), exact to rounding for every eigenpair (no iteration to a
//! tolerance the caller has to pick), no dependency.

use crate::error::{Error, Result};

/// Eigenvalues in descending order and the matching unit eigenvectors as rows (`vectors[i * n..]`),
/// each signed so that its largest-magnitude entry is positive (the decomposition is otherwise
/// unique only up to sign).
pub struct SymmetricEigen {
    pub n: usize,
    pub values: Vec<f64>,
    pub vectors: Vec<f64>,
}

/// `a`: n x n row-major, symmetric (only checked to be square and finite; the lower triangle is
/// what is read).
pub fn symmetric_eigen(a: &[f64], n: usize) -> Result<SymmetricEigen> {
    if a.len() != n * n {
        return Err(Error::shape(
            "symmetric_eigen input",
            format!("{n} x {n} = {} values", n * n),
            format!("{}", a.len()),
        ));
    }
    if let Some(i) = a.iter().position(|x| !x.is_finite()) {
        return Err(Error::value(
            "symmetric_eigen input",
            format!("NaN or Inf at row {}, column {}", i / n, i % n),
        ));
    }
    if n == 0 {
        return Ok(SymmetricEigen {
            n,
            values: vec![],
            vectors: vec![],
        });
    }
    // tred2 and tql2 walk columns of V; both run on its transpose, so that they walk rows.
    let mut vt = crate::ops::shape::transpose(a, n, n);
    let (mut d, mut e) = (vec![0f64; n], vec![0f64; n]);
    tridiagonalize_transposed(&mut vt, &mut d, &mut e, n);
    tridiagonal_ql(&mut vt, &mut d, &mut e, n)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| d[y].total_cmp(&d[x]));
    let mut values = Vec::with_capacity(n);
    let mut vectors = Vec::with_capacity(n * n);
    for &k in &order {
        values.push(d[k]);
        let row = &vt[k * n..(k + 1) * n];
        let arg = (0..n).fold(0, |b, j| if row[j].abs() > row[b].abs() { j } else { b });
        let sign = if row[arg] < 0.0 { -1.0 } else { 1.0 };
        vectors.extend(row.iter().map(|x| sign * x));
    }
    Ok(SymmetricEigen { n, values, vectors })
}

/// Householder tridiagonalization (tred2) of the matrix whose transpose `vt` holds (its lower
/// triangle is read): every index of EISPACK's tred2 swapped, so that its column walks are row
/// walks. On return `vt` holds the transpose of the orthogonal transformation, `d` the diagonal
/// and `e[1..]` the subdiagonal.
fn tridiagonalize_transposed(vt: &mut [f64], d: &mut [f64], e: &mut [f64], n: usize) {
    let at = |i: usize, j: usize| i * n + j;
    for j in 0..n {
        d[j] = vt[at(j, n - 1)];
    }
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for dk in d.iter().take(i) {
            scale += dk.abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = vt[at(j, i - 1)];
                vt[at(j, i)] = 0.0;
                vt[at(i, j)] = 0.0;
            }
        } else {
            for dk in d.iter_mut().take(i) {
                *dk /= scale;
                h += *dk * *dk;
            }
            let f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            e[..i].fill(0.0);
            for j in 0..i {
                let f = d[j];
                vt[at(i, j)] = f;
                let mut g = e[j] + vt[at(j, j)] * f;
                for k in j + 1..i {
                    g += vt[at(j, k)] * d[k];
                    e[k] += vt[at(j, k)] * f;
                }
                e[j] = g;
            }
            let mut f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                let (f, g) = (d[j], e[j]);
                for k in j..i {
                    vt[at(j, k)] -= f * e[k] + g * d[k];
                }
                d[j] = vt[at(j, i - 1)];
                vt[at(j, i)] = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the transformations.
    for i in 0..n - 1 {
        vt[at(i, n - 1)] = vt[at(i, i)];
        vt[at(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = vt[at(i + 1, k)] / h;
            }
            for j in 0..=i {
                let mut g = 0.0;
                for k in 0..=i {
                    g += vt[at(i + 1, k)] * vt[at(j, k)];
                }
                for k in 0..=i {
                    vt[at(j, k)] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            vt[at(i + 1, k)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = vt[at(j, n - 1)];
        vt[at(j, n - 1)] = 0.0;
    }
    vt[at(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;
}

/// Implicit QL on the tridiagonal (`d`, `e`) (tql2), applying each rotation to the rows of `vt`
/// (the transposed transformation): on return `d` holds the eigenvalues and row k of `vt` the
/// eigenvector of `d[k]`.
fn tridiagonal_ql(vt: &mut [f64], d: &mut [f64], e: &mut [f64], n: usize) -> Result<()> {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0f64;
    let mut tst1 = 0.0f64;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            let mut iterations = 0;
            loop {
                iterations += 1;
                if iterations > 60 {
                    return Err(Error::value(
                        "symmetric_eigen",
                        format!("the QL iteration did not converge for eigenvalue {l} of {n}"),
                    ));
                }
                let g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().take(n).skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0f64, 1.0f64, 1.0f64);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0f64, 0.0f64);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    let g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    let (lo, hi) = vt.split_at_mut((i + 1) * n);
                    let (row_i, row_i1) = (&mut lo[i * n..], &mut hi[..n]);
                    for (a, b) in row_i.iter_mut().zip(row_i1.iter_mut()) {
                        let h = *b;
                        *b = s * *a + c * h;
                        *a = c * *a - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    Ok(())
}
