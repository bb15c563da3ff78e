//! The ops as recorded on the tape: shape checks (errors that name the shapes), the forward call
//! into `crate::ops`, and a backward closure. Tensors are 2-D [rows, features] unless stated; the
//! hidden-state stack is [frames, L, D].

use super::tape::{Tape, Var};
use crate::batch::PackedBatch;
use crate::error::{check_shape, Error, Result};
use crate::ops::{self, attention::AttnGeom, ctc::Reduction, layer_conv::ConvGeom};

fn last_dim(shape: &[usize]) -> usize {
    *shape.last().unwrap_or(&1)
}

/// The last dimension of an op that normalises over it: it must hold at least one element.
fn nonzero_last_dim(op: &str, shape: &[usize]) -> Result<usize> {
    match last_dim(shape) {
        0 => Err(Error::shape(
            op,
            "a non-empty last dimension",
            format!("{shape:?}"),
        )),
        d => Ok(d),
    }
}

impl Tape {
    fn data_of(&self, v: Var) -> Vec<f32> {
        self.value(v).data().to_vec()
    }

    fn shared(&self, v: Var) -> crate::tensor::Tensor {
        self.value(v).clone()
    }

    /// y = x W^T + b; x [.., in], w [out, in], b [out].
    pub fn linear(&mut self, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
        let (xs, ws) = (self.shape(x).to_vec(), self.shape(w).to_vec());
        if ws.len() != 2 || xs.is_empty() || last_dim(&xs) != ws[1] {
            return Err(Error::shape(
                "linear",
                format!("input [.., {}] for weight {ws:?}", ws.get(1).unwrap_or(&0)),
                format!("{xs:?}"),
            ));
        }
        let (in_f, out_f) = (ws[1], ws[0]);
        if in_f == 0 {
            return Err(Error::shape(
                "linear",
                "at least one input feature",
                format!("weight {ws:?}"),
            ));
        }
        if let Some(b) = b {
            check_shape("linear bias", self.shape(b), &[out_f])?;
        }
        let rows = xs.iter().product::<usize>() / in_f;
        let (xt, wt) = (self.shared(x), self.shared(w));
        let y = ops::linear::forward(
            xt.data(),
            rows,
            in_f,
            wt.data(),
            out_f,
            b.map(|b| self.value(b).data()),
        );
        let mut ys = xs.clone();
        *ys.last_mut().unwrap() = out_f;
        let inputs: Vec<Var> = std::iter::once(x)
            .chain(std::iter::once(w))
            .chain(b)
            .collect();
        self.push(y, &ys, &inputs, move || {
            Box::new(move |g, need| {
                let (dx, dw, db) =
                    ops::linear::backward(xt.data(), rows, in_f, wt.data(), out_f, g, need[0]);
                vec![dx, Some(dw), Some(db)]
            })
        })
    }

    /// Each layer of a stack x [n, l, d] through a fixed Linear of its own (w [l, k, d], b [l, k],
    /// constants: nothing trains them), outputs side by side -> [n, l * k]; the same as
    /// `select_layer` + `linear` per layer + `concat_cols`, without the copies.
    pub fn layer_projections(
        &mut self,
        x: Var,
        w: &crate::tensor::Tensor,
        b: &crate::tensor::Tensor,
    ) -> Result<Var> {
        let xs = self.shape(x).to_vec();
        let ws = w.shape().to_vec();
        if xs.len() != 3 || ws.len() != 3 || ws[0] != xs[1] || ws[2] != xs[2] {
            return Err(Error::shape(
                "layer_projections",
                format!(
                    "a stack [n, {}, {}] for weights {ws:?}",
                    ws.first().unwrap_or(&0),
                    ws.get(2).unwrap_or(&0)
                ),
                format!("{xs:?}"),
            ));
        }
        let (n, l, d, k) = (xs[0], xs[1], xs[2], ws[1]);
        check_shape("layer_projections bias", b.shape(), &[l, k])?;
        let xt = self.shared(x);
        // f32 tensors share their buffer (no copy); narrower ones are converted.
        let w = w.to_dtype(crate::tensor::DType::F32);
        let b = b.to_dtype(crate::tensor::DType::F32);
        let y = ops::linear::per_layer_forward(xt.data(), (n, l, d), w.data(), b.data(), k);
        self.push(y, &[n, l * k], &[x], move || {
            Box::new(move |g, _| {
                vec![Some(ops::linear::per_layer_backward_input(
                    g,
                    (n, l, d),
                    w.data(),
                    k,
                ))]
            })
        })
    }

    pub fn relu(&mut self, x: Var) -> Result<Var> {
        let y = ops::activation::relu_forward(self.value(x).data());
        let shape = self.shape(x).to_vec();
        let yt = crate::tensor::Tensor::from_vec(y.clone(), &shape)?;
        self.push(y, &shape, &[x], move || {
            Box::new(move |g, _| vec![Some(ops::activation::relu_backward(yt.data(), g))])
        })
    }

    pub fn gelu(&mut self, x: Var) -> Result<Var> {
        let xt = self.shared(x);
        let y = ops::activation::gelu_forward(xt.data());
        let shape = self.shape(x).to_vec();
        self.push(y, &shape, &[x], move || {
            Box::new(move |g, _| vec![Some(ops::activation::gelu_backward(xt.data(), g))])
        })
    }

    /// LayerNorm over the last dimension; `affine` = (weight, bias), each [d].
    pub fn layer_norm(&mut self, x: Var, affine: Option<(Var, Var)>, eps: f64) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        let d = nonzero_last_dim("layer_norm", &shape)?;
        if let Some((w, b)) = affine {
            check_shape("layer_norm weight", self.shape(w), &[d])?;
            check_shape("layer_norm bias", self.shape(b), &[d])?;
        }
        let xt = self.shared(x);
        let wt = affine.map(|(w, _)| self.shared(w));
        let (y, saved) = ops::layernorm::forward(
            xt.data(),
            d,
            affine.map(|(w, b)| (self.value(w).data(), self.value(b).data())),
            eps,
        );
        let inputs: Vec<Var> = match affine {
            Some((w, b)) => vec![x, w, b],
            None => vec![x],
        };
        self.push(y, &shape, &inputs, move || {
            Box::new(move |g, _| {
                let (dx, dp) = ops::layernorm::backward(
                    xt.data(),
                    d,
                    wt.as_ref().map(|w| w.data()),
                    &saved,
                    g,
                );
                match dp {
                    Some((dw, db)) => vec![Some(dx), Some(dw), Some(db)],
                    None => vec![Some(dx)],
                }
            })
        })
    }

    pub fn softmax(&mut self, x: Var) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        let d = nonzero_last_dim("softmax", &shape)?;
        let y = ops::softmax::softmax_forward(self.value(x).data(), d);
        let yt = crate::tensor::Tensor::from_vec(y.clone(), &shape)?;
        self.push(y, &shape, &[x], move || {
            Box::new(move |g, _| vec![Some(ops::softmax::softmax_backward(yt.data(), g, d))])
        })
    }

    pub fn log_softmax(&mut self, x: Var) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        let d = nonzero_last_dim("log_softmax", &shape)?;
        let y = ops::softmax::log_softmax_forward(self.value(x).data(), d);
        let yt = crate::tensor::Tensor::from_vec(y.clone(), &shape)?;
        self.push(y, &shape, &[x], move || {
            Box::new(move |g, _| vec![Some(ops::softmax::log_softmax_backward(yt.data(), g, d))])
        })
    }

    /// Inverted dropout with drop probability `p`; the mask is a function of `seed` only.
    pub fn dropout(&mut self, x: Var, p: f64, seed: u64) -> Result<Var> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::value(
                "dropout probability",
                format!("{p} is outside [0, 1]"),
            ));
        }
        let shape = self.shape(x).to_vec();
        let y = ops::dropout::forward(self.value(x).data(), p, seed);
        self.push(y, &shape, &[x], move || {
            Box::new(move |g, _| vec![Some(ops::dropout::backward(g, p, seed))])
        })
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let shape = self.shape(a).to_vec();
        check_shape("add (second operand)", self.shape(b), &shape)?;
        let y: Vec<f32> = self
            .value(a)
            .data()
            .iter()
            .zip(self.value(b).data())
            .map(|(x, y)| x + y)
            .collect();
        self.push(y, &shape, &[a, b], || {
            Box::new(|g, _| vec![Some(g.to_vec()), Some(g.to_vec())])
        })
    }

    /// sum(x * r) for a constant r of x's shape: a scalar probe loss whose gradient is r.
    pub fn dot_const(&mut self, x: Var, r: &crate::tensor::Tensor) -> Result<Var> {
        check_shape("dot_const operand", r.shape(), self.shape(x))?;
        let r = r.f32s()?.to_vec();
        let y: f32 = self
            .value(x)
            .data()
            .iter()
            .zip(&r)
            .map(|(a, b)| a * b)
            .sum();
        self.push(vec![y], &[], &[x], move || {
            Box::new(move |g, _| vec![Some(r.iter().map(|v| v * g[0]).collect())])
        })
    }

    /// Multiplies by a constant (e.g. 1/k to average k micro-batches).
    pub fn scale(&mut self, x: Var, s: f32) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        let y = self.value(x).data().iter().map(|v| v * s).collect();
        self.push(y, &shape, &[x], move || {
            Box::new(move |g, _| vec![Some(g.iter().map(|v| v * s).collect())])
        })
    }

    pub fn reshape(&mut self, x: Var, shape: &[usize]) -> Result<Var> {
        let n: usize = shape.iter().product();
        if n != self.value(x).numel() {
            return Err(Error::shape(
                "reshape",
                format!("{} elements", self.value(x).numel()),
                format!("{shape:?}"),
            ));
        }
        let y = self.data_of(x);
        self.push(y, shape, &[x], || Box::new(|g, _| vec![Some(g.to_vec())]))
    }

    /// Mean over each utterance's frames: x [frames, c] -> [utterances, c].
    pub fn mean_pool(&mut self, x: Var, batch: &PackedBatch) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        if shape.len() != 2 || shape[0] != batch.total_frames() {
            return Err(Error::shape(
                "mean_pool input",
                format!("[{} frames, c]", batch.total_frames()),
                format!("{shape:?}"),
            ));
        }
        let c = shape[1];
        let offsets = batch.offsets().to_vec();
        let y = ops::pooling::mean_forward(self.value(x).data(), c, &offsets);
        self.push(y, &[batch.num_utterances(), c], &[x], move || {
            Box::new(move |g, _| vec![Some(ops::pooling::mean_backward(g, c, &offsets))])
        })
    }

    /// A TDNN layer's input: x [frames, c] -> [frames', context * c], each output frame its
    /// utterance's frames t, t + dilation, ... side by side (no window crosses utterances; each
    /// utterance loses (context - 1) dilation frames). Returns the output and its batch.
    pub fn time_context(
        &mut self,
        x: Var,
        batch: &PackedBatch,
        context: usize,
        dilation: usize,
    ) -> Result<(Var, PackedBatch)> {
        let shape = self.shape(x).to_vec();
        if shape.len() != 2 || shape[0] != batch.total_frames() || context == 0 || dilation == 0 {
            return Err(Error::shape(
                "time_context input",
                format!(
                    "[{} frames, c], context and dilation >= 1",
                    batch.total_frames()
                ),
                format!("{shape:?}, context {context}, dilation {dilation}"),
            ));
        }
        for u in 0..batch.num_utterances() {
            if ops::speaker::context_frames(batch.len_of(u), context, dilation).is_none() {
                return Err(Error::value(
                    "speaker head input",
                    format!(
                        "utterance {u} of the batch has {} frames, fewer than the x-vector's TDNN windows need: give it more audio (or leave it out with --skip-bad)",
                        batch.len_of(u)
                    ),
                ));
            }
        }
        let c = shape[1];
        let offsets = batch.offsets().to_vec();
        let (y, out_offsets) = ops::speaker::time_context_forward(
            self.value(x).data(),
            c,
            &offsets,
            context,
            dilation,
        );
        let lengths: Vec<usize> = out_offsets.windows(2).map(|w| w[1] - w[0]).collect();
        let out_batch = PackedBatch::from_lengths(&lengths)?;
        let out = self.push(
            y,
            &[out_batch.total_frames(), context * c],
            &[x],
            move || {
                Box::new(move |g, _| {
                    vec![Some(ops::speaker::time_context_backward(
                        g,
                        c,
                        &offsets,
                        &out_offsets,
                        context,
                        dilation,
                    ))]
                })
            },
        )?;
        Ok((out, out_batch))
    }

    /// Statistics pooling: x [frames, c] -> [utterances, 2c], each utterance's mean then its
    /// standard deviation (n - 1 denominator, as torch.std). Needs 2 frames per utterance.
    pub fn stats_pool(&mut self, x: Var, batch: &PackedBatch) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        if shape.len() != 2 || shape[0] != batch.total_frames() {
            return Err(Error::shape(
                "stats_pool input",
                format!("[{} frames, c]", batch.total_frames()),
                format!("{shape:?}"),
            ));
        }
        if let Some(u) = (0..batch.num_utterances()).find(|&u| batch.len_of(u) < 2) {
            return Err(Error::value(
                "statistics pooling",
                format!("utterance {u} of the batch has {} frame(s): a standard deviation needs 2 (give it more audio)", batch.len_of(u)),
            ));
        }
        let c = shape[1];
        let offsets = batch.offsets().to_vec();
        let xt = self.shared(x);
        let y = ops::speaker::stats_pool_forward(xt.data(), c, &offsets);
        let yc = y.clone();
        self.push(y, &[batch.num_utterances(), 2 * c], &[x], move || {
            Box::new(move |g, _| {
                vec![Some(ops::speaker::stats_pool_backward(
                    g,
                    xt.data(),
                    &yc,
                    c,
                    &offsets,
                ))]
            })
        })
    }

    /// F.normalize(x, dim=-1) of x [rows, c].
    pub fn l2_normalize(&mut self, x: Var) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        let c = last_dim(&shape);
        if shape.is_empty() || c == 0 {
            return Err(Error::shape(
                "l2_normalize input",
                "[rows, c >= 1]",
                format!("{shape:?}"),
            ));
        }
        let xt = self.shared(x);
        let y = ops::speaker::l2_normalize_forward(xt.data(), c);
        self.push(y, &shape, &[x], move || {
            Box::new(move |g, _| vec![Some(ops::speaker::l2_normalize_backward(g, xt.data(), c))])
        })
    }

    /// Conv1d over the layer axis of x [n, l_in, c_in]: weight [c_out, c_in, k], bias [c_out].
    pub fn layer_conv(&mut self, x: Var, w: Var, b: Var, stride: usize, pad: usize) -> Result<Var> {
        let xs = self.shape(x).to_vec();
        let ws = self.shape(w).to_vec();
        if xs.len() != 3 || ws.len() != 3 || ws[1] != xs[2] {
            return Err(Error::shape(
                "layer_conv",
                format!(
                    "input [n, l, {}] for weight {ws:?}",
                    ws.get(1).unwrap_or(&0)
                ),
                format!("{xs:?}"),
            ));
        }
        check_shape("layer_conv bias", self.shape(b), &[ws[0]])?;
        let g = ConvGeom {
            l_in: xs[1],
            c_in: xs[2],
            c_out: ws[0],
            kernel: ws[2],
            stride,
            pad,
        };
        if stride == 0 || xs[1] + 2 * pad < ws[2] {
            return Err(Error::Config(format!(
                "layer_conv: kernel {} does not fit {} layers with padding {pad} (stride {stride})",
                ws[2], xs[1]
            )));
        }
        let n = xs[0];
        let (xt, wt) = (self.shared(x), self.shared(w));
        let y = ops::layer_conv::forward(xt.data(), n, wt.data(), self.value(b).data(), &g);
        self.push(y, &[n, g.l_out(), g.c_out], &[x, w, b], move || {
            Box::new(move |gy, need| {
                let (dx, dw, db) =
                    ops::layer_conv::backward(xt.data(), n, wt.data(), &g, gy, need[0]);
                vec![dx, Some(dw), Some(db)]
            })
        })
    }

    /// Softmax(w)-weighted sum of layers first..first+len(w) of x [n, L, d] -> [n, d].
    pub fn layer_weighted_sum(&mut self, x: Var, w: Var, first: usize) -> Result<Var> {
        let xs = self.shape(x).to_vec();
        let k = self.value(w).numel();
        if xs.len() != 3 || first + k > xs[1] || k == 0 {
            return Err(Error::shape(
                "layer_weighted_sum",
                format!(
                    "a stack [n, >= {}, d] for {k} weights from layer {first}",
                    first + k
                ),
                format!("{xs:?}"),
            ));
        }
        let (l, d, n) = (xs[1], xs[2], xs[0]);
        let (xt, wt) = (self.shared(x), self.shared(w));
        let y = ops::layer_sum::forward(xt.data(), l, d, first, wt.data());
        self.push(y, &[n, d], &[x, w], move || {
            Box::new(move |g, need| {
                let (dw, dx) =
                    ops::layer_sum::backward(xt.data(), l, d, first, wt.data(), g, need[0]);
                vec![dx, Some(dw)]
            })
        })
    }

    /// [n, L, d] -> [n, d]: one hidden state of every frame.
    pub fn select_layer(&mut self, x: Var, layer: usize) -> Result<Var> {
        let xs = self.shape(x).to_vec();
        if xs.len() != 3 || layer >= xs[1] {
            return Err(Error::shape(
                "select_layer",
                format!("a stack [n, > {layer}, d]"),
                format!("{xs:?}"),
            ));
        }
        let (l, d) = (xs[1], xs[2]);
        let y = ops::shape::select_layer(self.value(x).data(), l, d, layer);
        self.push(y, &[xs[0], d], &[x], move || {
            Box::new(move |g, _| vec![Some(ops::shape::select_layer_backward(g, l, d, layer))])
        })
    }

    /// Concatenates [rows, w_i] matrices along the feature axis.
    pub fn concat_cols(&mut self, parts: &[Var]) -> Result<Var> {
        let rows = self.shape(parts[0])[0];
        let mut widths = Vec::new();
        for &p in parts {
            let s = self.shape(p);
            if s.len() != 2 || s[0] != rows {
                return Err(Error::shape(
                    "concat_cols",
                    format!("[{rows}, w] matrices"),
                    format!("{s:?}"),
                ));
            }
            widths.push(s[1]);
        }
        let datas: Vec<&[f32]> = parts.iter().map(|&p| self.value(p).data()).collect();
        let y = ops::shape::concat_cols(&datas, &widths, rows);
        let total = widths.iter().sum();
        self.push(y, &[rows, total], parts, move || {
            Box::new(move |g, _| {
                ops::shape::split_cols(g, &widths, rows)
                    .into_iter()
                    .map(Some)
                    .collect()
            })
        })
    }

    /// [n, l, d] and token [d] -> [n, l+1, d] with the token first.
    pub fn prepend_token(&mut self, x: Var, token: Var) -> Result<Var> {
        let xs = self.shape(x).to_vec();
        if xs.len() != 3 {
            return Err(Error::shape(
                "prepend_token",
                "a stack [n, l, d]",
                format!("{xs:?}"),
            ));
        }
        check_shape("prepend_token token", self.shape(token), &[xs[2]])?;
        let (l, d) = (xs[1], xs[2]);
        let y = ops::shape::prepend_token(self.value(x).data(), l, d, self.value(token).data());
        self.push(y, &[xs[0], l + 1, d], &[x, token], move || {
            Box::new(move |g, _| {
                let (dx, dt) = ops::shape::prepend_token_backward(g, l, d);
                vec![Some(dx), Some(dt)]
            })
        })
    }

    /// [n, l, c] -> [n, c*l], channel-major (HConv's final flatten).
    pub fn flatten_channel_major(&mut self, x: Var) -> Result<Var> {
        let xs = self.shape(x).to_vec();
        if xs.len() != 3 {
            return Err(Error::shape(
                "flatten_channel_major",
                "[n, l, c]",
                format!("{xs:?}"),
            ));
        }
        let (l, c) = (xs[1], xs[2]);
        let y = ops::shape::flatten_channel_major(self.value(x).data(), l, c);
        self.push(y, &[xs[0], l * c], &[x], move || {
            Box::new(move |g, _| vec![Some(ops::shape::flatten_channel_major_backward(g, l, c))])
        })
    }

    /// Multi-head attention per frame: q [n, sq, e], k and v [n, sk, e], e = heads * head_dim.
    pub fn attention(&mut self, q: Var, k: Var, v: Var, heads: usize) -> Result<Var> {
        let (qs, ks) = (self.shape(q).to_vec(), self.shape(k).to_vec());
        if qs.len() != 3
            || ks.len() != 3
            || qs[0] != ks[0]
            || qs[2] != ks[2]
            || heads == 0
            || qs[2] % heads != 0
        {
            return Err(Error::shape(
                "attention",
                format!("q [n, sq, e], k/v [n, sk, e] with e divisible by {heads} heads"),
                format!("q {qs:?}, k {ks:?}"),
            ));
        }
        check_shape("attention v", self.shape(v), &ks)?;
        let g = AttnGeom {
            sq: qs[1],
            sk: ks[1],
            heads,
            head_dim: qs[2] / heads,
        };
        let n = qs[0];
        let (qt, kt, vt) = (self.shared(q), self.shared(k), self.shared(v));
        let (y, probs) = ops::attention::forward(qt.data(), kt.data(), vt.data(), n, &g);
        self.push(y, &qs, &[q, k, v], move || {
            Box::new(move |gy, _| {
                let (dq, dk, dv) =
                    ops::attention::backward(qt.data(), kt.data(), vt.data(), &probs, gy, n, &g);
                vec![Some(dq), Some(dk), Some(dv)]
            })
        })
    }

    /// Each utterance's frames minus its mean frame: x [frames, c] of a packed batch (ESPnet's
    /// utterance mean normalization).
    pub fn utterance_center(&mut self, x: Var, batch: &PackedBatch) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        if shape.len() != 2 || shape[0] != batch.total_frames() {
            return Err(Error::shape(
                "utterance_center input",
                format!("[{} frames, c]", batch.total_frames()),
                format!("{shape:?}"),
            ));
        }
        let c = shape[1];
        let offsets = batch.offsets().to_vec();
        let y = ops::pooling::center(self.value(x).data(), c, &offsets);
        self.push(y, &shape, &[x], move || {
            Box::new(move |g, _| vec![Some(ops::pooling::center(g, c, &offsets))])
        })
    }

    /// The checks of a 2-D convolution's input x [frames, freq * channels]; returns freq'.
    fn conv2d_input_check(
        &self,
        shape: &[usize],
        batch: &PackedBatch,
        geom: &ops::conv2d::PatchGeom,
    ) -> Result<usize> {
        let width = geom.freq * geom.channels;
        if shape.len() != 2 || shape[0] != batch.total_frames() || shape[1] != width {
            return Err(Error::shape(
                "2-D convolution input",
                format!(
                    "[{} frames, {} features x {} channels]",
                    batch.total_frames(),
                    geom.freq,
                    geom.channels
                ),
                format!("{shape:?}"),
            ));
        }
        match (
            geom.out_len(geom.freq),
            ops::conv2d::out_offsets(batch.offsets(), geom),
        ) {
            (Some(out_freq), Some(_)) => Ok(out_freq),
            _ => {
                let short = (0..batch.num_utterances())
                    .find(|&u| geom.out_len(batch.len_of(u)).is_none())
                    .map(|u| format!("utterance {u} of the batch has {} frames", batch.len_of(u)))
                    .unwrap_or_else(|| format!("the frames have {} features", geom.freq));
                Err(Error::value(
                    "2-D convolution input",
                    format!(
                        "{short}, fewer than its {0} x {0} kernel needs: give it more audio (or leave it out with --skip-bad)",
                        geom.kernel
                    ),
                ))
            }
        }
    }

    /// The im2col patches of a 2-D convolution over each utterance's (time, feature) plane:
    /// x [frames, freq * channels] (channels fastest) -> [frames' * freq', channels * k * k]
    /// (see [`ops::conv2d`]). Returns the patches, the output batch and freq'.
    pub fn conv2d_patches(
        &mut self,
        x: Var,
        batch: &PackedBatch,
        geom: ops::conv2d::PatchGeom,
    ) -> Result<(Var, PackedBatch, usize)> {
        let out_freq = self.conv2d_input_check(self.shape(x), batch, &geom)?;
        let offsets = batch.offsets().to_vec();
        let (y, outs) = ops::conv2d::patches_forward(self.value(x).data(), &offsets, &geom);
        let lengths: Vec<usize> = outs.windows(2).map(|w| w[1] - w[0]).collect();
        let out_batch = PackedBatch::from_lengths(&lengths)?;
        let rows = out_batch.total_frames() * out_freq;
        let out = self.push(y, &[rows, geom.patch_width()], &[x], move || {
            Box::new(move |g, _| {
                vec![Some(ops::conv2d::patches_backward(
                    g, &offsets, &outs, &geom,
                ))]
            })
        })?;
        Ok((out, out_batch, out_freq))
    }

    /// A stride-1 2-D convolution over each utterance's (time, feature) plane without im2col
    /// patches ([`ops::conv2d::shifted_forward`]): x [frames, freq * c_in] (channels fastest),
    /// w [c_out, k * k * c_in], b [c_out] -> [frames' * freq', c_out] and the output batch.
    pub fn conv2d_stride1(
        &mut self,
        x: Var,
        batch: &PackedBatch,
        (w, b): (Var, Var),
        geom: ops::conv2d::PatchGeom,
    ) -> Result<(Var, PackedBatch)> {
        let ws = self.shape(w).to_vec();
        if geom.stride != 1 || ws.len() != 2 || ws[1] != geom.patch_width() {
            return Err(Error::shape(
                "conv2d_stride1 weight",
                format!("[c_out, {}] at stride 1", geom.patch_width()),
                format!("{ws:?} at stride {}", geom.stride),
            ));
        }
        let c_out = ws[0];
        check_shape("conv2d_stride1 bias", self.shape(b), &[c_out])?;
        let out_freq = self.conv2d_input_check(self.shape(x), batch, &geom)?;
        let offsets = batch.offsets().to_vec();
        let (xt, wt) = (self.shared(x), self.shared(w));
        let (y, outs) = ops::conv2d::shifted_forward(
            xt.data(),
            &offsets,
            &geom,
            wt.data(),
            self.value(b).data(),
            c_out,
        );
        let lengths: Vec<usize> = outs.windows(2).map(|w| w[1] - w[0]).collect();
        let out_batch = PackedBatch::from_lengths(&lengths)?;
        let rows = out_batch.total_frames() * out_freq;
        let out = self.push(y, &[rows, c_out], &[x, w, b], move || {
            Box::new(move |gy, need| {
                let (dx, dw, db) = ops::conv2d::shifted_backward(
                    xt.data(),
                    &offsets,
                    &outs,
                    &geom,
                    wt.data(),
                    c_out,
                    gy,
                    need[0],
                );
                vec![dx, Some(dw), Some(db)]
            })
        })?;
        Ok((out, out_batch))
    }

    /// Multi-head self-attention within each utterance of a packed batch: q, k, v [frames, e]
    /// already projected, e = heads * head_dim; `dropout` on the attention probabilities.
    pub fn packed_self_attention(
        &mut self,
        (q, k, v): (Var, Var, Var),
        batch: &PackedBatch,
        heads: usize,
        dropout: Option<ops::attention::ProbDropout>,
    ) -> Result<Var> {
        let qs = self.shape(q).to_vec();
        if qs.len() != 2
            || qs[0] != batch.total_frames()
            || heads == 0
            || !qs[1].is_multiple_of(heads)
        {
            return Err(Error::shape(
                "packed_self_attention",
                format!(
                    "q [{} frames, e] with e divisible by {heads} heads",
                    batch.total_frames()
                ),
                format!("{qs:?}"),
            ));
        }
        check_shape("packed_self_attention k", self.shape(k), &qs)?;
        check_shape("packed_self_attention v", self.shape(v), &qs)?;
        let head_dim = qs[1] / heads;
        let offsets = batch.offsets().to_vec();
        let (qt, kt, vt) = (self.shared(q), self.shared(k), self.shared(v));
        let (y, probs) = ops::attention::packed_forward(
            (qt.data(), kt.data(), vt.data()),
            &offsets,
            heads,
            head_dim,
            dropout,
        );
        self.push(y, &qs, &[q, k, v], move || {
            Box::new(move |gy, _| {
                let (dq, dk, dv) = ops::attention::packed_backward(
                    (qt.data(), kt.data(), vt.data()),
                    &probs,
                    gy,
                    &offsets,
                    heads,
                    head_dim,
                    dropout,
                );
                vec![Some(dq), Some(dk), Some(dv)]
            })
        })
    }

    /// One direction of an LSTM layer over each utterance of a packed batch (`ops::lstm`): x
    /// [frames, in] and PyTorch's `weight_ih` [4H, in], `weight_hh` [4H, H], `bias_ih`, `bias_hh`
    /// [4H] -> h [frames, H]; `reverse` reads each utterance from its last frame.
    pub fn lstm(
        &mut self,
        x: Var,
        (w_ih, w_hh, b_ih, b_hh): (Var, Var, Var, Var),
        batch: &PackedBatch,
        reverse: bool,
    ) -> Result<Var> {
        let (xs, ws) = (self.shape(x).to_vec(), self.shape(w_ih).to_vec());
        if ws.len() != 2 || ws[0] % 4 != 0 || ws[0] == 0 || ws[1] == 0 {
            return Err(Error::shape(
                "lstm weight_ih",
                "[4 * hidden, input] with hidden, input >= 1",
                format!("{ws:?}"),
            ));
        }
        let (h4, in_f) = (ws[0], ws[1]);
        let hidden = h4 / 4;
        if xs != [batch.total_frames(), in_f] {
            return Err(Error::shape(
                "lstm input",
                format!("[{} frames, {in_f}]", batch.total_frames()),
                format!("{xs:?}"),
            ));
        }
        check_shape("lstm weight_hh", self.shape(w_hh), &[h4, hidden])?;
        check_shape("lstm bias_ih", self.shape(b_ih), &[h4])?;
        check_shape("lstm bias_hh", self.shape(b_hh), &[h4])?;
        let frames = xs[0];
        let offsets = batch.offsets().to_vec();
        let (xt, wit, wht) = (self.shared(x), self.shared(w_ih), self.shared(w_hh));
        let bias: Vec<f32> = (self.value(b_ih).data().iter())
            .zip(self.value(b_hh).data())
            .map(|(a, b)| a + b)
            .collect();
        let pre = ops::linear::forward(xt.data(), frames, in_f, wit.data(), h4, Some(&bias));
        let (h, saved) = ops::lstm::forward(&pre, wht.data(), &offsets, hidden, reverse);
        drop(pre);
        // The backward reads h (each step's previous state): the node's own buffer, shared.
        let ht = crate::tensor::Tensor::from_vec(h, &[frames, hidden])?;
        Ok(
            self.push_tensor(ht.clone(), &[x, w_ih, w_hh, b_ih, b_hh], move || {
                Box::new(move |g, need| {
                    let (dpre, dw_hh) = ops::lstm::backward(
                        g,
                        ht.data(),
                        &saved,
                        wht.data(),
                        &offsets,
                        hidden,
                        reverse,
                    );
                    let (dx, dw_ih, db) = ops::linear::backward(
                        xt.data(),
                        frames,
                        in_f,
                        wit.data(),
                        h4,
                        &dpre,
                        need[0],
                    );
                    vec![dx, Some(dw_ih), Some(dw_hh), Some(db.clone()), Some(db)]
                })
            }),
        )
    }

    /// Frames mixed by fixed taps (`ops::resample`: SpecAugment's time warp): x [frames, c] ->
    /// [taps.len(), c], output frame j = sum of w * x[frame] over its taps.
    pub fn time_mix(&mut self, x: Var, taps: Vec<ops::resample::Taps>) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        let frames = shape.first().copied().unwrap_or(0);
        if shape.len() != 2 || taps.iter().flatten().any(|&(f, _)| f >= frames) {
            return Err(Error::shape(
                "time_mix input",
                "[frames, c] holding every tapped frame",
                format!("{shape:?}"),
            ));
        }
        let c = shape[1];
        let y = ops::resample::mix_forward(self.value(x).data(), c, &taps);
        self.push(y, &[taps.len(), c], &[x], move || {
            Box::new(move |g, _| vec![Some(ops::resample::mix_backward(g, c, &taps, frames))])
        })
    }

    /// x * m elementwise for a constant m of x's shape (SpecAugment's masks).
    pub fn mul_const(&mut self, x: Var, m: &crate::tensor::Tensor) -> Result<Var> {
        let shape = self.shape(x).to_vec();
        check_shape("mul_const operand", m.shape(), &shape)?;
        let m = m.f32s()?.to_vec();
        let y = (self.value(x).data().iter().zip(&m))
            .map(|(a, b)| a * b)
            .collect();
        self.push(y, &shape, &[x], move || {
            Box::new(move |g, _| vec![Some(g.iter().zip(&m).map(|(a, b)| a * b).collect())])
        })
    }

    /// CTC loss of log-probabilities [frames, V] of a packed batch against per-utterance targets.
    /// Errors name the utterance: a label outside 1..V (0 is the blank) or a target longer than
    /// its input.
    pub fn ctc_loss(
        &mut self,
        log_probs: Var,
        batch: &PackedBatch,
        targets: &[Vec<usize>],
        reduction: Reduction,
        zero_infinity: bool,
    ) -> Result<Var> {
        let s = self.shape(log_probs).to_vec();
        if s.len() != 2 || s[0] != batch.total_frames() {
            return Err(Error::shape(
                "ctc_loss log_probs",
                format!("[{} frames, vocab]", batch.total_frames()),
                format!("{s:?}"),
            ));
        }
        if targets.len() != batch.num_utterances() {
            return Err(Error::shape(
                "ctc_loss targets",
                format!("{} utterances", batch.num_utterances()),
                format!("{}", targets.len()),
            ));
        }
        let v = s[1];
        let blank = 0;
        for (u, t) in targets.iter().enumerate() {
            if let Some(&bad) = t.iter().find(|&&c| c == blank || c >= v) {
                return Err(Error::value(
                    "ctc target",
                    format!(
                        "utterance {u} has label {bad}; labels must be in 1..{v} (0 is the blank)"
                    ),
                ));
            }
            if t.len() > batch.len_of(u) {
                return Err(Error::shape(
                    "ctc_loss",
                    format!(
                        "utterance {u}: target length <= input length {}",
                        batch.len_of(u)
                    ),
                    format!("target length {}", t.len()),
                ));
            }
        }
        let mut flat = Vec::new();
        let mut toff = vec![0];
        for t in targets {
            flat.extend_from_slice(t);
            toff.push(flat.len());
        }
        let r = ops::ctc::forward_backward(
            self.value(log_probs).data(),
            v,
            batch.offsets(),
            &flat,
            &toff,
            blank,
            reduction,
            zero_infinity,
        );
        let grad = r.grad;
        self.push(vec![r.loss], &[], &[log_probs], move || {
            Box::new(move |g, _| vec![Some(grad.iter().map(|x| x * g[0]).collect())])
        })
    }

    /// Softmax cross-entropy of logits [b, c] against labels (each < c).
    pub fn cross_entropy(
        &mut self,
        logits: Var,
        labels: &[usize],
        reduction: Reduction,
    ) -> Result<Var> {
        let s = self.shape(logits).to_vec();
        if s.len() != 2 || s[0] != labels.len() {
            return Err(Error::shape(
                "cross_entropy logits",
                format!("[{} labels, classes]", labels.len()),
                format!("{s:?}"),
            ));
        }
        if let Some((i, &bad)) = labels.iter().enumerate().find(|(_, &y)| y >= s[1]) {
            return Err(Error::value(
                "class label",
                format!(
                    "example {i} has label {bad}; the head has {} classes (0..{})",
                    s[1], s[1]
                ),
            ));
        }
        let (loss, grad) = ops::cross_entropy::forward_backward(
            self.value(logits).data(),
            s[1],
            labels,
            reduction,
        );
        self.push(vec![loss], &[], &[logits], move || {
            Box::new(move |g, _| vec![Some(grad.iter().map(|x| x * g[0]).collect())])
        })
    }
}
