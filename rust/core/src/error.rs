//! The one error type of the core. The bindings map each variant onto a
//! Python exception; nothing here knows about Python.

use std::fmt;

/// Everything that can go wrong in the core, with enough context to find the
/// offending row, file or field.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// Input that breaks a documented contract (shape, range, value).
    InvalidInput(String),
    /// A name that is not registered (estimator, format, tier, ...).
    UnknownName {
        what: &'static str,
        name: String,
        valid: Vec<String>,
    },
    /// An I/O failure, with the path it concerns.
    Io { path: String, message: String },
}

impl Error {
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidInput(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidInput(message) => f.write_str(message),
            Error::UnknownName { what, name, valid } => write!(
                f,
                "unknown {what} {name:?}; expected one of: {}",
                valid.join(", ")
            ),
            Error::Io { path, message } => write!(f, "{path}: {message}"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
