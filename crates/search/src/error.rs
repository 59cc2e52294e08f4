//! The crate's error type.

/// Everything that can go wrong when opening, feeding or querying a [`crate::SearchIndex`].
///
/// `InvalidConfig`, `InvalidDocument`, `InvalidRequest` and `EmptyQuery` are the caller's input;
/// `Closed`, `WriterFailed` and `Storage` are the index's own condition; `VisibilityTimeout` says
/// an operation was accepted but is not searchable yet.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The configuration has one or more problems, all listed.
    #[error("invalid search index configuration: {}", .0.join("; "))]
    InvalidConfig(Vec<String>),
    /// A document cannot be indexed as given.
    #[error("invalid article document: {0}")]
    InvalidDocument(String),
    /// A search request is malformed (empty tenant, limit out of range, bad score).
    #[error("invalid search request: {0}")]
    InvalidRequest(String),
    /// The query has no searchable word once control characters and punctuation are removed.
    #[error("query has no searchable words")]
    EmptyQuery,
    /// The writer has been shut down.
    #[error("search index writer is closed")]
    Closed,
    /// The writer stopped after a storage failure; the index needs to be reopened and rebuilt.
    #[error("search index writer failed: {0}")]
    WriterFailed(String),
    /// The operation did not become searchable within the given time.
    #[error("operation {seq} not visible after waiting")]
    VisibilityTimeout {
        /// Sequence number of the operation waited for.
        seq: u64,
    },
    /// tantivy reported an error while reading or writing the index.
    #[error("search index storage error")]
    Storage(#[from] tantivy::TantivyError),
}

impl SearchError {
    /// Returns true when the error is caused by the caller's input rather than by the index.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Self::InvalidConfig(_)
                | Self::InvalidDocument(_)
                | Self::InvalidRequest(_)
                | Self::EmptyQuery
        )
    }
}

/// Result alias for this crate.
pub type SearchResult<T> = Result<T, SearchError>;
