//! Packed variable-length batches: the valid frames of all utterances concatenated, described by
//! cumulative offsets (flash-attention's `cu_seqlens`). No compute or memory is spent on padding.

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedBatch {
    offsets: Vec<usize>,
}

impl PackedBatch {
    /// One entry per utterance; every length must be at least one frame.
    pub fn from_lengths(lengths: &[usize]) -> Result<Self> {
        if lengths.is_empty() {
            return Err(Error::value(
                "batch",
                "a batch needs at least one utterance",
            ));
        }
        let mut offsets = Vec::with_capacity(lengths.len() + 1);
        offsets.push(0);
        for (i, &l) in lengths.iter().enumerate() {
            if l == 0 {
                return Err(Error::value(
                    "batch",
                    format!("utterance {i} has 0 frames; every utterance needs at least one frame (400 samples at 16 kHz)"),
                ));
            }
            offsets.push(offsets[i] + l);
        }
        Ok(PackedBatch { offsets })
    }

    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }
    pub fn num_utterances(&self) -> usize {
        self.offsets.len() - 1
    }
    pub fn total_frames(&self) -> usize {
        *self.offsets.last().expect("offsets start with 0")
    }
    pub fn len_of(&self, u: usize) -> usize {
        self.offsets[u + 1] - self.offsets[u]
    }
    pub fn lengths(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }
}
