//! Domain errors of the reader and their one mapping to gRPC status codes.

/// Why a call failed. Each variant maps to exactly one gRPC code ([`tonic::Status`]).
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unauthenticated(String),
    /// A store is down or failing: retry later.
    #[error("{store} unavailable: {reason}")]
    Unavailable { store: &'static str, reason: String },
}

impl From<sqlx::Error> for ReaderError {
    fn from(error: sqlx::Error) -> Self {
        Self::Unavailable {
            store: "postgres",
            reason: error.to_string(),
        }
    }
}

impl From<redis::RedisError> for ReaderError {
    fn from(error: redis::RedisError) -> Self {
        Self::Unavailable {
            store: "redis",
            reason: error.to_string(),
        }
    }
}

impl From<crate::hot_redis::HotRedisError> for ReaderError {
    fn from(error: crate::hot_redis::HotRedisError) -> Self {
        Self::Unavailable {
            store: "redis",
            reason: error.to_string(),
        }
    }
}

impl From<redis::ParsingError> for ReaderError {
    fn from(error: redis::ParsingError) -> Self {
        Self::Unavailable {
            store: "redis",
            reason: format!("unexpected reply: {error}"),
        }
    }
}

impl From<ReaderError> for tonic::Status {
    fn from(error: ReaderError) -> Self {
        let message = error.to_string();
        let code = match &error {
            ReaderError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            ReaderError::NotFound(_) => tonic::Code::NotFound,
            ReaderError::PermissionDenied(_) => tonic::Code::PermissionDenied,
            ReaderError::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            ReaderError::Unauthenticated(_) => tonic::Code::Unauthenticated,
            ReaderError::Unavailable { store, .. } => {
                metrics::counter!("chatify_reader_store_errors_total", "store" => *store)
                    .increment(1);
                tracing::warn!(%message, "store error");
                tonic::Code::Unavailable
            }
        };
        tonic::Status::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_code() {
        let cases = [
            (
                ReaderError::InvalidArgument("x".into()),
                tonic::Code::InvalidArgument,
            ),
            (ReaderError::NotFound("x".into()), tonic::Code::NotFound),
            (
                ReaderError::PermissionDenied("x".into()),
                tonic::Code::PermissionDenied,
            ),
            (
                ReaderError::FailedPrecondition("x".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                ReaderError::Unauthenticated("x".into()),
                tonic::Code::Unauthenticated,
            ),
            (
                ReaderError::Unavailable {
                    store: "postgres",
                    reason: "down".into(),
                },
                tonic::Code::Unavailable,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(tonic::Status::from(error).code(), code);
        }
    }
}
