//! LayerNorm over the last dimension (biased variance, eps inside the square root), with or
//! without the affine weight/bias. Also used, without affine, for the interfaces' per-layer norm.

use super::Real;

/// What the backward pass needs from the forward pass.
pub struct LayerNormSaved<R> {
    pub mean: Vec<R>,
    pub rstd: Vec<R>,
}

/// x: [rows, d] -> y: [rows, d]. `affine` is (weight, bias), each [d].
pub fn forward<R: Real>(
    x: &[R],
    d: usize,
    affine: Option<(&[R], &[R])>,
    eps: f64,
) -> (Vec<R>, LayerNormSaved<R>) {
    let rows = x.len() / d;
    let mut y = vec![R::ZERO; x.len()];
    let mut mean = Vec::with_capacity(rows);
    let mut rstd = Vec::with_capacity(rows);
    let dn = R::from_f64(d as f64);
    let eps = R::from_f64(eps);
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let m = xr.iter().copied().sum::<R>() / dn;
        let var = xr.iter().map(|&v| (v - m) * (v - m)).sum::<R>() / dn;
        let rs = R::ONE / (var + eps).sqrt();
        for (i, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
            let xh = (v - m) * rs;
            *o = match affine {
                Some((w, b)) => xh * w[i] + b[i],
                None => xh,
            };
        }
        mean.push(m);
        rstd.push(rs);
    }
    (y, LayerNormSaved { mean, rstd })
}

/// Returns dx and, with affine, (dweight, dbias).
#[allow(clippy::type_complexity)]
pub fn backward<R: Real>(
    x: &[R],
    d: usize,
    weight: Option<&[R]>,
    saved: &LayerNormSaved<R>,
    dy: &[R],
) -> (Vec<R>, Option<(Vec<R>, Vec<R>)>) {
    let mut dx = vec![R::ZERO; x.len()];
    let mut dparams = weight.map(|_| (vec![R::ZERO; d], vec![R::ZERO; d]));
    let dn = R::from_f64(d as f64);
    let mut dxhat = vec![R::ZERO; d];
    for (r, ((xr, gr), dxr)) in x
        .chunks_exact(d)
        .zip(dy.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
        .enumerate()
    {
        let (m, rs) = (saved.mean[r], saved.rstd[r]);
        let mut sum_g = R::ZERO;
        let mut sum_gx = R::ZERO;
        for i in 0..d {
            let xh = (xr[i] - m) * rs;
            let g = match weight {
                Some(w) => gr[i] * w[i],
                None => gr[i],
            };
            if let Some((dw, db)) = dparams.as_mut() {
                dw[i] += gr[i] * xh;
                db[i] += gr[i];
            }
            dxhat[i] = g;
            sum_g += g;
            sum_gx += g * xh;
        }
        let (mg, mgx) = (sum_g / dn, sum_gx / dn);
        for i in 0..d {
            let xh = (xr[i] - m) * rs;
            dxr[i] = rs * (dxhat[i] - mg - xh * mgx);
        }
    }
    (dx, dparams)
}
