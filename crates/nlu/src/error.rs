//! Errors of training, loading and reading data.

/// What went wrong in language understanding.
#[derive(Debug, thiserror::Error)]
pub enum NluError {
    /// The training examples cannot make a model.
    #[error("invalid training set: {0}")]
    InvalidTrainingSet(String),
    /// An option or argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A stored model cannot be read.
    #[error("invalid model: {0}")]
    InvalidModel(String),
    /// A stored model was written by a newer or older, incompatible format.
    #[error(
        "unsupported model format version {found} (this build reads versions 1 to {supported})"
    )]
    UnsupportedModelVersion {
        /// The version in the stored model.
        found: u16,
        /// The newest version this build reads (and the one it writes).
        supported: u16,
    },
    /// A CSV file is malformed.
    #[error("{file}:{line}: {message}")]
    Csv {
        /// The file, when read from one.
        file: String,
        /// The 1-based line where the record starts.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A file cannot be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The result of language-understanding operations.
pub type NluResult<T> = Result<T, NluError>;
