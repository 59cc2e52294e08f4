//! The routing service's one error type and its classification into platform error codes.

use tandem_platform::error::{ErrorCode, ServiceError};

/// Everything a routing use case can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// A request field is missing or out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The addressed agent, queue, ticket or offer does not exist for this tenant.
    #[error("{0}")]
    NotFound(String),
    /// The entity to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The entity is not in a state that allows the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The offer expired before it was accepted.
    #[error("offer {0} expired")]
    OfferExpired(String),
    /// The offer was answered, withdrawn or the ticket went elsewhere.
    #[error("offer {0} is no longer pending")]
    OfferTaken(String),
    /// The offer or assignment belongs to another agent.
    #[error("{0}")]
    NotYours(String),
    /// The caller may not act on this entity.
    #[error("{0}")]
    PermissionDenied(String),
    /// Two writers raced on the same rows (unique violation, deadlock, serialisation failure);
    /// the operation may be retried.
    #[error("concurrent update: {0}")]
    Conflict(String),
    /// The database failed.
    #[error("routing storage unavailable")]
    Storage(#[source] sqlx::Error),
    /// A stored row cannot be read back.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// The result of a routing use case.
pub type RoutingResult<T> = Result<T, RoutingError>;

impl ServiceError for RoutingError {
    fn code(&self) -> ErrorCode {
        match self {
            RoutingError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            RoutingError::NotFound(_) => ErrorCode::NotFound,
            RoutingError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            RoutingError::FailedPrecondition(_)
            | RoutingError::OfferExpired(_)
            | RoutingError::OfferTaken(_)
            | RoutingError::NotYours(_)
            | RoutingError::Conflict(_) => ErrorCode::FailedPrecondition,
            RoutingError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            RoutingError::Storage(_) => ErrorCode::Unavailable,
            RoutingError::Corrupt(_) => ErrorCode::Internal,
        }
    }
}

impl From<sqlx::Error> for RoutingError {
    fn from(error: sqlx::Error) -> Self {
        if let Some(db) = error.as_database_error() {
            // 40001 serialization_failure, 40P01 deadlock_detected; unique violations on both
            // engines. All of them mean another writer got there first.
            let retryable = matches!(db.code().as_deref(), Some("40001" | "40P01"));
            if retryable || db.is_unique_violation() {
                return RoutingError::Conflict(db.message().to_owned());
            }
        }
        RoutingError::Storage(error)
    }
}

impl RoutingError {
    /// Returns whether retrying the same operation may succeed.
    pub fn is_conflict(&self) -> bool {
        matches!(self, RoutingError::Conflict(_))
    }
}

/// Shorthand for an `InvalidArgument` error.
pub(crate) fn invalid(message: impl Into<String>) -> RoutingError {
    RoutingError::InvalidArgument(message.into())
}
