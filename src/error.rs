use thiserror::Error;

/// Everything that can go wrong in this crate, as a value that names the problem.
#[derive(Debug, Error)]
pub enum Error {
    /// A tensor's length disagrees with the shape it is used with.
    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    Shape {
        what: &'static str,
        expected: String,
        got: String,
    },
    /// A tensor with no elements where at least one is needed.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// A NaN or infinity in input that must be finite.
    #[error("{what} holds a non-finite value ({value}) at row {row}, column {col}")]
    NonFinite {
        what: &'static str,
        row: usize,
        col: usize,
        value: f32,
    },
    /// A value outside what a format or operation accepts.
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    /// No GPU adapter could be found or opened.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
    /// A buffer would exceed a limit of the adapter.
    #[error("{what} needs {needed} bytes but the adapter's {limit} is {available} bytes")]
    Limit {
        what: String,
        limit: &'static str,
        needed: u64,
        available: u64,
    },
    /// The GPU device reported an error (validation, out of memory).
    #[error("GPU error: {0}")]
    Gpu(String),
    /// The GPU device was lost (driver reset, GPU removed, or destroyed): its buffers are gone,
    /// and work continues only on a new context with the model loaded again.
    #[error(
        "the GPU device was lost ({0}); open a new context (GpuContext::new) and load the \
         model again"
    )]
    DeviceLost(String),
    /// A safetensors file could not be read or written.
    #[error("safetensors: {0}")]
    Safetensors(String),
    /// An I/O error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(what: &'static str, expected: impl ToString, got: impl ToString) -> Self {
        Error::Shape {
            what,
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    pub(crate) fn invalid(what: &'static str, why: impl ToString) -> Self {
        Error::Invalid {
            what,
            why: why.to_string(),
        }
    }
}
