//! PCA + Concat (the paper's pilot study): each layer's hidden states projected onto that layer's
//! top `components` principal directions, fitted on training features and never trained, the L
//! projections concatenated layer-major ([frames, L * components]; the name `pca` keeps the total
//! near D with D / L components per layer).
//!
//! The fitted values are frozen entries of the pair's store (saved in its checkpoints):
//! `mean` [L, D], `components` [L, k, D] (row j of layer l: its j-th principal direction, unit
//! length, largest entry positive) and `fitted_frames` [1] (how many frames the fit saw; 0 = not
//! fitted, which the forward refuses). [`PcaFit`] accumulates each layer's mean and covariance
//! over stacks and [`PcaConcat::set_fit`] stores a fit.

use super::{Interface, InterfaceConfig, InterfaceKind};
use crate::autograd::{ParamId, ParamStore, Tape, Var};
use crate::error::{Error, Result};
use crate::ops::gemm::{gemm, Trans};
use crate::ops::symmetric_eigen::{symmetric_eigen, SymmetricEigen};
use crate::tensor::Tensor;

/// Frames a run fits PCA on: about 33 minutes of audio at 50 frames/s; the covariances of a
/// 768-dimensional layer are well determined long before.
pub const PCA_FIT_FRAMES: usize = 100_000;

pub struct PcaConcat {
    cfg: InterfaceConfig,
    pub components: usize,
    mean: ParamId,
    basis: ParamId,
    fitted_frames: ParamId,
}

impl PcaConcat {
    pub fn new(cfg: InterfaceConfig, store: &mut ParamStore, prefix: &str) -> Result<Self> {
        let InterfaceKind::PcaConcat { components } = cfg.kind else {
            return Err(Error::Config(
                "PcaConcat::new needs a PcaConcat config".into(),
            ));
        };
        let (l, d) = (cfg.layers, cfg.dim);
        if components == 0 || components > d {
            return Err(Error::Config(format!(
                "PCA + Concat: {components} components per layer, but a layer has {d} dimensions (use 1 to {d})"
            )));
        }
        let mean = store.add_frozen(&format!("{prefix}mean"), Tensor::zeros(&[l, d]))?;
        let basis = store.add_frozen(
            &format!("{prefix}components"),
            Tensor::zeros(&[l, components, d]),
        )?;
        let fitted_frames =
            store.add_frozen(&format!("{prefix}fitted_frames"), Tensor::zeros(&[1]))?;
        Ok(PcaConcat {
            cfg,
            components,
            mean,
            basis,
            fitted_frames,
        })
    }

    /// Frames the stored fit saw (0: not fitted yet).
    pub fn fitted_frames(&self, store: &ParamStore) -> usize {
        store.value(self.fitted_frames).data()[0] as usize
    }

    /// Stores `fit`'s means and top components in `store`.
    pub fn set_fit(&self, store: &mut ParamStore, fit: &PcaBasis) -> Result<()> {
        let (l, d, k) = (self.cfg.layers, self.cfg.dim, self.components);
        if (fit.layers, fit.dim) != (l, d) {
            return Err(Error::shape(
                "PCA fit",
                format!("{l} layers x {d}"),
                format!("{} layers x {}", fit.layers, fit.dim),
            ));
        }
        let mean: Vec<f32> = fit.mean.iter().map(|&x| x as f32).collect();
        let mut basis = Vec::with_capacity(l * k * d);
        for eig in &fit.layers_eigen {
            basis.extend(eig.vectors[..k * d].iter().map(|&x| x as f32));
        }
        store.set_value(self.mean, Tensor::from_vec(mean, &[l, d])?)?;
        store.set_value(self.basis, Tensor::from_vec(basis, &[l, k, d])?)?;
        store.set_value(
            self.fitted_frames,
            Tensor::from_vec(vec![fit.frames as f32], &[1])?,
        )
    }
}

impl Interface for PcaConcat {
    fn config(&self) -> &InterfaceConfig {
        &self.cfg
    }
    fn output_dim(&self) -> usize {
        self.cfg.layers * self.components
    }
    fn forward_checked(&self, tape: &mut Tape, store: &ParamStore, stack: Var) -> Result<Var> {
        if self.fitted_frames(store) == 0 {
            return Err(Error::Config(
                "PCA + Concat is not fitted: fit it on training features first (strata train does; a library user calls PcaFit and PcaConcat::set_fit)".into(),
            ));
        }
        let (l, d, k) = (self.cfg.layers, self.cfg.dim, self.components);
        let (mean, basis) = (
            store.value(self.mean).data(),
            store.value(self.basis).data(),
        );
        // (x - mean) W^T = x W^T - W mean: the centering rides in the bias.
        let bias: Vec<f32> = (0..l * k)
            .map(|row| {
                let (w, mu) = (&basis[row * d..(row + 1) * d], &mean[(row / k) * d..]);
                -w.iter().zip(mu).map(|(a, b)| a * b).sum::<f32>()
            })
            .collect();
        let bias = Tensor::from_vec(bias, &[l, k])?;
        tape.layer_projections(stack, store.value(self.basis), &bias)
    }
    fn as_pca(&self) -> Option<&PcaConcat> {
        Some(self)
    }
}

/// Running per-layer sums for PCA: means and covariances of the hidden states of every frame
/// added, accumulated in f64 around a shift (the first stack's means), so that features with
/// large means lose no precision to cancellation.
pub struct PcaFit {
    layers: usize,
    dim: usize,
    frames: usize,
    shift: Vec<f32>,
    sum: Vec<f64>,
    gram: Vec<f64>,
}

/// A finished fit: per-layer means ([L, D]) and eigendecompositions of the covariances.
pub struct PcaBasis {
    pub layers: usize,
    pub dim: usize,
    pub frames: usize,
    pub mean: Vec<f64>,
    pub layers_eigen: Vec<SymmetricEigen>,
}

impl PcaFit {
    pub fn new(layers: usize, dim: usize) -> Self {
        PcaFit {
            layers,
            dim,
            frames: 0,
            shift: vec![],
            sum: vec![0.0; layers * dim],
            gram: vec![0.0; layers * dim * dim],
        }
    }

    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Adds every frame of a stack [frames, L, D] (already normalized when the interface is).
    pub fn add(&mut self, stack: &Tensor) -> Result<()> {
        let (l, d) = (self.layers, self.dim);
        let s = stack.shape();
        if s.len() != 3 || s[1] != l || s[2] != d {
            return Err(Error::shape(
                "PCA fit input (hidden-state stack)",
                format!("[frames, {l}, {d}]"),
                format!("{s:?}"),
            ));
        }
        let n = s[0];
        if n == 0 {
            return Ok(());
        }
        let widened;
        let x = match stack.f32s() {
            Ok(x) => x,
            // An f16 / bf16 feature cache.
            Err(_) => {
                widened = stack.to_vec();
                &widened[..]
            }
        };
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::value(
                "PCA fit input (hidden-state stack)",
                format!("NaN or Inf at frame {}, layer {}", i / (l * d), (i / d) % l),
            ));
        }
        if self.shift.is_empty() {
            self.shift = vec![0.0; l * d];
            for row in x.chunks(l * d) {
                for (a, &b) in self.shift.iter_mut().zip(row) {
                    *a += b / n as f32;
                }
            }
        }
        let mut centered = vec![0f32; n * d];
        let mut gram = vec![0f32; d * d];
        for layer in 0..l {
            let shift = &self.shift[layer * d..(layer + 1) * d];
            let sum = &mut self.sum[layer * d..(layer + 1) * d];
            for (f, out) in centered.chunks_mut(d).enumerate() {
                let row = &x[(f * l + layer) * d..(f * l + layer + 1) * d];
                for ((o, &v), (&m, s)) in out
                    .iter_mut()
                    .zip(row)
                    .zip(shift.iter().zip(sum.iter_mut()))
                {
                    *o = v - m;
                    *s += *o as f64;
                }
            }
            // One batch's Gram matrix in f32 (the gemm), summed across batches in f64.
            gemm(
                d,
                n,
                d,
                &centered,
                Trans::T,
                &centered,
                Trans::N,
                0.0,
                &mut gram,
            );
            for (a, &b) in self.gram[layer * d * d..(layer + 1) * d * d]
                .iter_mut()
                .zip(&gram)
            {
                *a += b as f64;
            }
        }
        self.frames += n;
        Ok(())
    }

    /// Means and the covariances' eigendecompositions (covariance with the n - 1 denominator, as
    /// numpy / sklearn; the eigenvectors do not depend on it).
    pub fn finish(&self) -> Result<PcaBasis> {
        let (l, d, n) = (self.layers, self.dim, self.frames);
        if n < 2 {
            return Err(Error::value(
                "PCA fit",
                format!(
                    "{n} frames: a covariance needs at least 2 (give the training set more audio)"
                ),
            ));
        }
        let mut mean = vec![0f64; l * d];
        let per_layer: Vec<Result<SymmetricEigen>> = {
            use rayon::prelude::*;
            (0..l)
                .into_par_iter()
                .map(|layer| {
                    let sum = &self.sum[layer * d..(layer + 1) * d];
                    let dm: Vec<f64> = sum.iter().map(|s| s / n as f64).collect();
                    let g = &self.gram[layer * d * d..(layer + 1) * d * d];
                    let cov: Vec<f64> = (0..d * d)
                        .map(|ij| {
                            let (i, j) = (ij / d, ij % d);
                            (g[ij] - n as f64 * dm[i] * dm[j]) / (n - 1) as f64
                        })
                        .collect();
                    symmetric_eigen(&cov, d)
                })
                .collect()
        };
        for layer in 0..l {
            for j in 0..d {
                mean[layer * d + j] =
                    self.shift[layer * d + j] as f64 + self.sum[layer * d + j] / n as f64;
            }
        }
        Ok(PcaBasis {
            layers: l,
            dim: d,
            frames: n,
            mean,
            layers_eigen: per_layer.into_iter().collect::<Result<_>>()?,
        })
    }
}
