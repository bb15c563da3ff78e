//! The mission's trainable modules: interfaces (hidden-state stack -> features) and downstream heads.

pub mod asr_head;
pub mod head;
pub mod interface;
pub mod mlsuperb_head;
pub mod nn;
pub mod upstream;
