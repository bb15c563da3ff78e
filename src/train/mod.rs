//! Training-side utilities: data sets, metrics, the feature cache, synthetic data for the built-in
//! demo, the side-by-side trainer that feeds one hidden-state stack to several interface + head
//! pairs, checkpoints, the training loop and its curves.

pub mod checkpoint;
pub mod data;
pub mod device_step;
pub mod features;
pub mod metrics;
pub mod plot;
pub mod run;
pub mod side_by_side;
pub mod synthetic;
pub mod synthetic_speech;
