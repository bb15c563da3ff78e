//! The tape: a flat list of nodes in creation order. Each node keeps its value, its inputs and (when
//! any input needs a gradient) a backward closure that maps the output's gradient to the inputs'.

use super::params::{ParamId, ParamStore};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A handle to a value recorded on a [`Tape`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub(crate) usize);

/// Maps the output gradient to one optional gradient per input (None where not needed).
pub(crate) type BackwardFn = Box<dyn FnOnce(&[f32], &[bool]) -> Vec<Option<Vec<f32>>>>;

struct Node {
    value: Tensor,
    inputs: Vec<Var>,
    backward: Option<BackwardFn>,
    param: Option<ParamId>,
    requires_grad: bool,
}

pub struct Tape {
    nodes: Vec<Node>,
    grad_enabled: bool,
    /// backward consumes the closures: a second call would silently compute nothing.
    backward_done: bool,
}

/// Gradients of the non-parameter leaves created with [`Tape::input_requiring_grad`].
#[derive(Default, Debug)]
pub struct Gradients {
    leaves: Vec<(Var, Vec<f32>)>,
}

impl Gradients {
    pub fn get(&self, v: Var) -> Option<&[f32]> {
        self.leaves
            .iter()
            .find(|(w, _)| *w == v)
            .map(|(_, g)| g.as_slice())
    }
}

impl Default for Tape {
    fn default() -> Self {
        Self::new()
    }
}

impl Tape {
    /// A tape that records backward closures.
    pub fn new() -> Self {
        Tape {
            nodes: Vec::new(),
            grad_enabled: true,
            backward_done: false,
        }
    }

    /// A tape that only computes values (inference, the frozen upstream).
    pub fn no_grad() -> Self {
        Tape {
            nodes: Vec::new(),
            grad_enabled: false,
            backward_done: false,
        }
    }

    pub fn grad_enabled(&self) -> bool {
        self.grad_enabled
    }

    pub fn value(&self, v: Var) -> &Tensor {
        &self.nodes[v.0].value
    }

    pub fn shape(&self, v: Var) -> &[usize] {
        self.nodes[v.0].value.shape()
    }

    pub fn requires_grad(&self, v: Var) -> bool {
        self.nodes[v.0].requires_grad
    }

    fn leaf(&mut self, value: Tensor, param: Option<ParamId>, requires_grad: bool) -> Var {
        self.nodes.push(Node {
            value,
            inputs: Vec::new(),
            backward: None,
            param,
            requires_grad,
        });
        Var(self.nodes.len() - 1)
    }

    /// A value that never receives a gradient (e.g. the frozen upstream's hidden-state stack).
    pub fn constant(&mut self, value: Tensor) -> Result<Var> {
        value.f32s()?;
        Ok(self.leaf(value, None, false))
    }

    /// A non-parameter leaf whose gradient [`Tape::backward`] returns (e.g. the stack gradient for
    /// a trainable upstream, or gradient checks).
    pub fn input_requiring_grad(&mut self, value: Tensor) -> Result<Var> {
        value.f32s()?;
        let rg = self.grad_enabled;
        Ok(self.leaf(value, None, rg))
    }

    /// A trainable parameter; its gradient is added into the store by `backward`.
    pub fn param(&mut self, store: &ParamStore, id: ParamId) -> Var {
        let rg = self.grad_enabled;
        self.leaf(store.value(id).clone(), Some(id), rg)
    }

    /// Records an op's output. `make_backward` is only called when some input needs a gradient.
    pub(crate) fn push(
        &mut self,
        value: Vec<f32>,
        shape: &[usize],
        inputs: &[Var],
        make_backward: impl FnOnce() -> BackwardFn,
    ) -> Result<Var> {
        Ok(self.push_tensor(Tensor::from_vec(value, shape)?, inputs, make_backward))
    }

    /// [`Self::push`] of a value already in a tensor, which the backward may hold too (a shared
    /// buffer, not a copy).
    pub(crate) fn push_tensor(
        &mut self,
        value: Tensor,
        inputs: &[Var],
        make_backward: impl FnOnce() -> BackwardFn,
    ) -> Var {
        let requires_grad =
            self.grad_enabled && inputs.iter().any(|v| self.nodes[v.0].requires_grad);
        let backward = requires_grad.then(make_backward);
        self.nodes.push(Node {
            value,
            inputs: inputs.to_vec(),
            backward,
            param: None,
            requires_grad,
        });
        Var(self.nodes.len() - 1)
    }

    /// Runs backward from a scalar `loss`, adding parameter gradients into `store` (they accumulate
    /// across calls until `store.zero_grad()`). Consumes the recorded closures.
    pub fn backward(&mut self, loss: Var, store: &mut ParamStore) -> Result<Gradients> {
        if self.backward_done {
            return Err(Error::Config(
                "backward already ran on this tape: record a new forward pass on a new tape".into(),
            ));
        }
        if self.nodes[loss.0].value.numel() != 1 {
            return Err(Error::shape(
                "backward",
                "a scalar loss",
                format!("{:?}", self.nodes[loss.0].value.shape()),
            ));
        }
        if !self.nodes[loss.0].requires_grad {
            return Err(Error::Config(
                "backward: the loss does not depend on any trainable parameter (or the tape is no_grad)".into(),
            ));
        }
        self.backward_done = true;
        let mut grads: Vec<Option<Vec<f32>>> = (0..=loss.0).map(|_| None).collect();
        grads[loss.0] = Some(vec![1.0]);
        let mut out = Gradients::default();
        for i in (0..=loss.0).rev() {
            let Some(g) = grads[i].take() else { continue };
            let node = &mut self.nodes[i];
            if let Some(pid) = node.param {
                store.accumulate_grad(pid, &g);
                continue;
            }
            let Some(bw) = node.backward.take() else {
                if node.requires_grad && node.inputs.is_empty() {
                    out.leaves.push((Var(i), g));
                }
                continue;
            };
            let inputs = node.inputs.clone();
            let need: Vec<bool> = inputs
                .iter()
                .map(|v| self.nodes[v.0].requires_grad)
                .collect();
            let input_grads = bw(&g, &need);
            for ((v, gi), needed) in inputs.iter().zip(input_grads).zip(need) {
                let (Some(gi), true) = (gi, needed) else {
                    continue;
                };
                match &mut grads[v.0] {
                    Some(acc) => acc.iter_mut().zip(&gi).for_each(|(a, b)| *a += b),
                    slot => *slot = Some(gi),
                }
            }
        }
        out.leaves.reverse();
        Ok(out)
    }
}
