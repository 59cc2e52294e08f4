//! The closed set of error codes every service speaks, and their one mapping to gRPC.
//!
//! Domain errors implement [`ServiceError`]; each service converts them to `tonic::Status` with
//! [`status_from`] in exactly one place. Internal errors are logged once and masked: their text
//! never leaves the process. Clients map a `Status` back with [`ErrorCode::from_status`] and
//! decide on retries by code, never by message text.

use std::error::Error as StdError;
use std::fmt;

use tonic::Code;

/// What kind of failure happened, independent of transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed or violates a validation rule.
    InvalidArgument,
    /// The addressed entity does not exist (for this tenant).
    NotFound,
    /// The entity to create exists already.
    AlreadyExists,
    /// The request is valid but the entity is not in a state that allows it.
    FailedPrecondition,
    /// A concurrent change won (an optimistic-concurrency check failed): re-read, then retry.
    Aborted,
    /// The caller is known but may not do this.
    PermissionDenied,
    /// The caller could not be identified.
    Unauthenticated,
    /// A quota, size or capacity limit was hit.
    ResourceExhausted,
    /// A dependency is down; the request may be retried.
    Unavailable,
    /// The deadline passed before the work finished.
    DeadlineExceeded,
    /// A bug or an invariant violation; details are logged, not returned.
    Internal,
}

impl ErrorCode {
    /// Returns the gRPC code for this error code.
    pub fn grpc(self) -> Code {
        match self {
            Self::InvalidArgument => Code::InvalidArgument,
            Self::NotFound => Code::NotFound,
            Self::AlreadyExists => Code::AlreadyExists,
            Self::FailedPrecondition => Code::FailedPrecondition,
            Self::Aborted => Code::Aborted,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::ResourceExhausted => Code::ResourceExhausted,
            Self::Unavailable => Code::Unavailable,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Internal => Code::Internal,
        }
    }

    /// Maps a status received from another service back to an error code.
    pub fn from_status(status: &tonic::Status) -> Self {
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => Self::InvalidArgument,
            Code::NotFound => Self::NotFound,
            Code::AlreadyExists => Self::AlreadyExists,
            Code::FailedPrecondition => Self::FailedPrecondition,
            Code::Aborted => Self::Aborted,
            Code::PermissionDenied => Self::PermissionDenied,
            Code::Unauthenticated => Self::Unauthenticated,
            Code::ResourceExhausted => Self::ResourceExhausted,
            Code::Unavailable | Code::Cancelled => Self::Unavailable,
            Code::DeadlineExceeded => Self::DeadlineExceeded,
            Code::Ok | Code::Unknown | Code::Unimplemented | Code::Internal | Code::DataLoss => {
                Self::Internal
            }
        }
    }

    /// Returns whether a caller may retry the same request unchanged.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Unavailable | Self::DeadlineExceeded | Self::ResourceExhausted
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::InvalidArgument => "invalid_argument",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::FailedPrecondition => "failed_precondition",
            Self::Aborted => "aborted",
            Self::PermissionDenied => "permission_denied",
            Self::Unauthenticated => "unauthenticated",
            Self::ResourceExhausted => "resource_exhausted",
            Self::Unavailable => "unavailable",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Internal => "internal",
        };
        f.write_str(name)
    }
}

/// An error that knows its [`ErrorCode`].
pub trait ServiceError: StdError {
    /// Returns the code that classifies this error.
    fn code(&self) -> ErrorCode;
}

/// The text clients see instead of an internal error's message.
pub const MASKED_INTERNAL_MESSAGE: &str = "internal error";

/// Converts a service error into a gRPC status: the one mapping every service uses.
///
/// Internal errors are logged with their whole `source()` chain and returned masked.
pub fn status_from<E: ServiceError + ?Sized>(error: &E) -> tonic::Status {
    let code = error.code();
    if code == ErrorCode::Internal {
        tracing::error!(error = %DisplayChain(error), "internal error");
        return tonic::Status::internal(MASKED_INTERNAL_MESSAGE);
    }
    if code == ErrorCode::Unavailable {
        tracing::warn!(error = %DisplayChain(error), "dependency unavailable");
    }
    tonic::Status::new(code.grpc(), error.to_string())
}

/// Displays an error followed by its `source()` chain, separated by `: `.
pub struct DisplayChain<'a, E: ?Sized>(pub &'a E);

impl<E: StdError + ?Sized> fmt::Display for DisplayChain<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum SampleError {
        #[error("conversation {0} not found")]
        Missing(String),
        #[error("database write failed")]
        Storage(#[source] std::io::Error),
    }

    impl ServiceError for SampleError {
        fn code(&self) -> ErrorCode {
            match self {
                Self::Missing(_) => ErrorCode::NotFound,
                Self::Storage(_) => ErrorCode::Internal,
            }
        }
    }

    #[test]
    fn maps_codes_and_keeps_public_messages() {
        let status = status_from(&SampleError::Missing("c1".into()));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "conversation c1 not found");
    }

    #[test]
    fn masks_internal_errors() {
        let err = SampleError::Storage(std::io::Error::other("password=hunter2 at 10.0.0.1"));
        let status = status_from(&err);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), MASKED_INTERNAL_MESSAGE);
    }

    #[test]
    fn round_trips_every_code_through_grpc() {
        use ErrorCode::*;
        for code in [
            InvalidArgument,
            NotFound,
            AlreadyExists,
            FailedPrecondition,
            Aborted,
            PermissionDenied,
            Unauthenticated,
            ResourceExhausted,
            Unavailable,
            DeadlineExceeded,
            Internal,
        ] {
            let status = tonic::Status::new(code.grpc(), "x");
            assert_eq!(ErrorCode::from_status(&status), code);
        }
    }

    #[test]
    fn chain_shows_every_cause() {
        let err = SampleError::Storage(std::io::Error::other("disk full"));
        assert_eq!(
            DisplayChain(&err).to_string(),
            "database write failed: disk full"
        );
    }
}
