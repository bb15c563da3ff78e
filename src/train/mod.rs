//! Training-side utilities: metrics, synthetic data for the built-in demo, and the side-by-side
//! trainer that feeds one hidden-state stack to several interface + head pairs.

pub mod checkpoint;
pub mod data;
pub mod metrics;
pub mod run;
pub mod side_by_side;
pub mod synthetic;
pub mod synthetic_speech;
