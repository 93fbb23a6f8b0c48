//! Who a call is made for: a verified client token (`authorization: Bearer <jwt>`, the
//! gateway's secret and claims, not revoked), or a trusted internal caller
//! (`x-chatify-internal-token` = `CHATIFY_INTERNAL_TOKEN`) naming the user in
//! `x-chatify-user-id`. Never a request field: a request's `user_id`, when set, must be the
//! caller.

use chatify_core::auth::Authenticator;
use chatify_core::{ids, keys};
use redis::aio::ConnectionManager;
use tonic::metadata::MetadataMap;

use crate::error::ReaderError;

/// Metadata key of the internal-caller secret.
pub const INTERNAL_TOKEN_HEADER: &str = "x-chatify-internal-token";
/// Metadata key of the user an internal caller acts for.
pub const INTERNAL_USER_HEADER: &str = "x-chatify-user-id";

/// Authenticates callers.
#[derive(Clone)]
pub struct Gatekeeper {
    authenticator: Authenticator,
    internal_token: Option<String>,
    redis: ConnectionManager,
}

impl std::fmt::Debug for Gatekeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gatekeeper").finish_non_exhaustive()
    }
}

impl Gatekeeper {
    pub fn new(
        authenticator: Authenticator,
        internal_token: Option<String>,
        redis: ConnectionManager,
    ) -> Self {
        Self {
            authenticator,
            internal_token,
            redis,
        }
    }

    /// The user the call is made for.
    pub async fn caller(&self, metadata: &MetadataMap) -> Result<String, ReaderError> {
        if let Some(presented) = metadata.get(INTERNAL_TOKEN_HEADER) {
            let Some(expected) = &self.internal_token else {
                return Err(ReaderError::Unauthenticated(
                    "internal callers are not enabled (CHATIFY_INTERNAL_TOKEN is unset)".into(),
                ));
            };
            if !constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
                return Err(ReaderError::Unauthenticated("bad internal token".into()));
            }
            let user = metadata
                .get(INTERNAL_USER_HEADER)
                .and_then(|value| value.to_str().ok())
                .ok_or_else(|| {
                    ReaderError::Unauthenticated(format!(
                        "internal call without {INTERNAL_USER_HEADER}"
                    ))
                })?;
            ids::validate_id(user).map_err(|error| {
                ReaderError::InvalidArgument(format!("{INTERNAL_USER_HEADER}: {error}"))
            })?;
            return Ok(user.to_owned());
        }
        let header = metadata
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| {
                ReaderError::Unauthenticated("missing authorization: Bearer <token>".into())
            })?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                ReaderError::Unauthenticated("authorization is not a Bearer token".into())
            })?;
        let identity = self
            .authenticator
            .verify(token.trim())
            .map_err(|error| ReaderError::Unauthenticated(error.to_string()))?;
        let mut redis = self.redis.clone();
        let revoked: bool = redis::cmd("EXISTS")
            .arg(keys::revoked_token(&identity.jti))
            .query_async(&mut redis)
            .await?;
        if revoked {
            return Err(ReaderError::Unauthenticated("token revoked".into()));
        }
        Ok(identity.user_id)
    }
}

/// A request's own `user_id` field may only name the caller (or be empty).
pub fn check_user_field(caller: &str, field: &str) -> Result<(), ReaderError> {
    if field.is_empty() || field == caller {
        Ok(())
    } else {
        Err(ReaderError::PermissionDenied(format!(
            "user_id {field:?} is not the authenticated caller"
        )))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_field_must_be_the_caller() {
        assert!(check_user_field("u1", "").is_ok());
        assert!(check_user_field("u1", "u1").is_ok());
        assert!(matches!(
            check_user_field("u1", "u2"),
            Err(ReaderError::PermissionDenied(_))
        ));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
