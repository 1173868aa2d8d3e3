//! The one error type of the core; every message names the file, field, tensor or id at fault.

use std::path::PathBuf;

/// Everything that can go wrong in the core, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum EngramError {
    /// A configuration field is missing or has a value the algorithm cannot use.
    #[error("invalid engram config: field `{field}`: {reason}")]
    Config { field: String, reason: String },

    /// A file could not be read or parsed.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },

    /// A tensor in a weights file is missing or has the wrong shape or dtype.
    #[error("{}: tensor `{tensor}`: {message}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },

    /// A token id outside the tokenizer's vocabulary.
    #[error(
        "token id {id} at position {position} is out of range: the vocabulary has {vocab_size} ids"
    )]
    TokenOutOfRange {
        id: i64,
        position: usize,
        vocab_size: usize,
    },

    /// A row id outside a table.
    #[error("row id {row} is out of range: table `{table}` has {rows} rows")]
    RowOutOfRange { row: u64, rows: u64, table: String },

    /// A caller's buffer or tensor has the wrong size.
    #[error("shape mismatch for {what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },

    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Other(String),
}

/// Result with [`EngramError`].
pub type Result<T, E = EngramError> = std::result::Result<T, E>;

impl EngramError {
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        message: impl std::fmt::Display,
    ) -> Self {
        Self::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            message: message.to_string(),
        }
    }

    pub fn shape(
        what: impl Into<String>,
        expected: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> Self {
        Self::Shape {
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
}
