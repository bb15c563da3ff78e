//! The crate's error type. Every failure a user can cause (shapes, files, configs, labels) is an
//! `Error` whose message names the offending thing and what was expected; nothing here panics.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// Shapes that do not fit together: `what` names the tensor or argument.
    Shape {
        what: String,
        expected: String,
        got: String,
    },
    /// A value outside its allowed range (a label outside the vocabulary, a bad hyper-parameter).
    Value { what: String, detail: String },
    /// A configuration that cannot be built (e.g. HConv with a stride < 2).
    Config(String),
    /// An unsupported dtype or device for an operation.
    Unsupported(String),
    /// A file or checkpoint problem: `path` plus what went wrong.
    Io { path: String, detail: String },
    /// A GPU / kernel failure (compile error, launch error), naming the kernel.
    Device(String),
    /// A buffer the device (or the emulator's host memory) could not provide: its size, where,
    /// the memory left; what to make smaller is the caller's to say.
    Allocation(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(
        what: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
    pub fn value(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Value {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// A device or allocation failure with `context` (which run, which work) put in front; other
    /// errors, which name their tensor already, unchanged.
    pub fn in_device_context(self, context: &str) -> Self {
        match self {
            Error::Device(why) => Error::Device(format!("{context}: {why}")),
            Error::Allocation(why) => Error::Allocation(format!("{context}: {why}")),
            other => other,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape {
                what,
                expected,
                got,
            } => {
                write!(
                    f,
                    "shape mismatch in {what}: expected {expected}, got {got}"
                )
            }
            Error::Value { what, detail } => write!(f, "invalid {what}: {detail}"),
            Error::Config(msg) => write!(f, "invalid configuration: {msg}"),
            Error::Unsupported(msg) => write!(f, "unsupported: {msg}"),
            Error::Io { path, detail } => write!(f, "{path}: {detail}"),
            Error::Device(msg) | Error::Allocation(msg) => write!(f, "device error: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

/// Returns a shape error unless `got == expected`.
pub(crate) fn check_shape(what: &str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::shape(
            what,
            format!("{expected:?}"),
            format!("{got:?}"),
        ))
    }
}
