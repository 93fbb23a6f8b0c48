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
        let verified = self.verify(metadata)?;
        self.check_revocation(&verified).await?;
        Ok(verified.user_id)
    }

    /// Fails if a token caller's token is on the deny-list.
    pub async fn check_revocation(&self, verified: &Verified) -> Result<(), ReaderError> {
        let Some(key) = &verified.revocation_key else {
            return Ok(());
        };
        let mut redis = self.redis.clone();
        let revoked: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut redis)
            .await?;
        if revoked {
            return Err(revoked_error());
        }
        Ok(())
    }

    /// The caller's credentials checked without I/O: the internal secret, or the client
    /// token's signature and claims. A token caller is not done until its
    /// [`Verified::revocation_key`] is known to be absent (see [`Gatekeeper::caller`]; a
    /// query checks it in the pipeline that reads its page).
    pub fn verify(&self, metadata: &MetadataMap) -> Result<Verified, ReaderError> {
        if let Some(presented) = metadata.get(INTERNAL_TOKEN_HEADER) {
            self.check_internal_token(presented.as_bytes())?;
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
            return Ok(Verified {
                user_id: user.to_owned(),
                revocation_key: None,
            });
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
        Ok(Verified {
            user_id: identity.user_id,
            revocation_key: Some(keys::revoked_token(&identity.jti)),
        })
    }

    /// Admits trusted internal callers only (`x-chatify-internal-token`, no user needed):
    /// a valid client token is PermissionDenied, no credential or a bad one Unauthenticated.
    pub async fn require_internal(&self, metadata: &MetadataMap) -> Result<(), ReaderError> {
        if let Some(presented) = metadata.get(INTERNAL_TOKEN_HEADER) {
            return self.check_internal_token(presented.as_bytes());
        }
        if metadata.get("authorization").is_none() {
            return Err(ReaderError::Unauthenticated(format!(
                "this service is for internal callers: missing {INTERNAL_TOKEN_HEADER}"
            )));
        }
        let user = self.caller(metadata).await?;
        Err(ReaderError::PermissionDenied(format!(
            "{user} is a client; this service is for internal callers ({INTERNAL_TOKEN_HEADER})"
        )))
    }

    fn check_internal_token(&self, presented: &[u8]) -> Result<(), ReaderError> {
        let Some(expected) = &self.internal_token else {
            return Err(ReaderError::Unauthenticated(
                "internal callers are not enabled (CHATIFY_INTERNAL_TOKEN is unset)".into(),
            ));
        };
        if !constant_time_eq(presented, expected.as_bytes()) {
            return Err(ReaderError::Unauthenticated("bad internal token".into()));
        }
        Ok(())
    }
}

/// A caller whose credentials verified (signature, claims or internal secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub user_id: String,
    /// Deny-list key of the client token's `jti` (None for internal callers).
    pub revocation_key: Option<String>,
}

/// What a caller whose token is on the deny-list gets.
pub fn revoked_error() -> ReaderError {
    ReaderError::Unauthenticated("token revoked".into())
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
