//! Who a call is made for: a verified client token (`authorization: Bearer <jwt>`, the
//! gateway's secret and claims, not revoked), or a trusted internal caller
//! (`x-chatify-internal-token` = `CHATIFY_INTERNAL_TOKEN`) naming the user in
//! `x-chatify-user-id`. Never a request field: a request's `user_id`, when set, must be the
//! caller. Verified client tokens are remembered until they expire ([`VerifiedTokens`]);
//! the deny-list is not: it is read on every call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chatify_core::auth::{Authenticator, CLOCK_SKEW_SECONDS};
use chatify_core::{ids, keys};
use redis::aio::ConnectionManager;
use tonic::metadata::MetadataMap;

use crate::error::ReaderError;

/// Metadata key of the internal-caller secret.
pub const INTERNAL_TOKEN_HEADER: &str = "x-chatify-internal-token";
/// Metadata key of the user an internal caller acts for.
pub const INTERNAL_USER_HEADER: &str = "x-chatify-user-id";

/// Most client tokens [`VerifiedTokens`] remembers (two generations of half as many).
pub const VERIFIED_TOKENS_MAX: usize = 16_384;

/// Authenticates callers.
#[derive(Clone)]
pub struct Gatekeeper {
    authenticator: Authenticator,
    internal_token: Option<String>,
    redis: ConnectionManager,
    verified: Arc<VerifiedTokens>,
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
            verified: Arc::new(VerifiedTokens::new(VERIFIED_TOKENS_MAX)),
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
        let token = token.trim();
        let now_s = unix_seconds();
        if let Some(verified) = self.verified.get(token, now_s) {
            return Ok(verified);
        }
        let identity = self
            .authenticator
            .verify(token)
            .map_err(|error| ReaderError::Unauthenticated(error.to_string()))?;
        let verified = Verified {
            user_id: identity.user_id,
            revocation_key: Some(keys::revoked_token(&identity.jti)),
        };
        // Accepted for as long as `verify` would accept it: `exp` plus the clock skew.
        self.verified.insert(
            token,
            verified.clone(),
            identity.expires_at.saturating_add(CLOCK_SKEW_SECONDS),
        );
        Ok(verified)
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

/// Client tokens that verified, by their whole text, each until the last second `verify`
/// would still accept it. An HS256 check (base64, HMAC-SHA256, JSON claims) costs more than
/// the rest of a cached page's CPU in the reader, and a client presents the same token on
/// every call. The secret does not change while the process runs, so a token that verified
/// once verifies again until it expires; only its revocation can change, and that is read
/// from Redis on every call, never from here. Keyed by the whole token, not a digest: a
/// lookup compares every byte, so no other string can stand in for a cached token.
///
/// Bounded, approximately least recently used: two generations of at most `max / 2` each;
/// a new entry goes into the young one, a hit in the old one moves back to the young one,
/// and when the young one is full the old one is dropped and the young one becomes old.
/// Only tokens that verified get in, so bad tokens cannot push good ones out.
pub struct VerifiedTokens {
    generations: Mutex<Generations>,
    per_generation: usize,
}

#[derive(Default)]
struct Generations {
    young: HashMap<Box<str>, CachedToken>,
    old: HashMap<Box<str>, CachedToken>,
}

struct CachedToken {
    verified: Verified,
    /// Last Unix second at which the token is still accepted.
    valid_through_s: u64,
}

impl VerifiedTokens {
    pub fn new(max: usize) -> Self {
        Self {
            generations: Mutex::new(Generations::default()),
            per_generation: (max / 2).max(1),
        }
    }

    /// The caller `token` verified as, if it did and is still valid at `now_s`.
    pub fn get(&self, token: &str, now_s: u64) -> Option<Verified> {
        let mut generations = self.lock();
        if let Some(cached) = generations.young.get(token) {
            if now_s <= cached.valid_through_s {
                return Some(cached.verified.clone());
            }
            generations.young.remove(token);
            return None;
        }
        let (key, cached) = generations.old.remove_entry(token)?;
        if now_s > cached.valid_through_s {
            return None;
        }
        let verified = cached.verified.clone();
        generations.admit(key, cached, self.per_generation);
        Some(verified)
    }

    pub fn insert(&self, token: &str, verified: Verified, valid_through_s: u64) {
        let cached = CachedToken {
            verified,
            valid_through_s,
        };
        self.lock().admit(token.into(), cached, self.per_generation);
    }

    /// Tokens held, both generations.
    pub fn len(&self) -> usize {
        let generations = self.lock();
        generations.young.len() + generations.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // The maps hold no invariant a panicking holder could break half-way.
        self.generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Generations {
    fn admit(&mut self, key: Box<str>, cached: CachedToken, per_generation: usize) {
        if self.young.len() >= per_generation && !self.young.contains_key(&key) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, cached);
    }
}

impl std::fmt::Debug for VerifiedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedTokens")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
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

    fn verified(user: &str) -> Verified {
        Verified {
            user_id: user.to_owned(),
            revocation_key: Some(format!("revoked:{user}")),
        }
    }

    #[test]
    fn verified_tokens_are_remembered_until_they_expire() {
        let tokens = VerifiedTokens::new(8);
        tokens.insert("t1", verified("u1"), 100);
        assert_eq!(tokens.get("t1", 99), Some(verified("u1")));
        assert_eq!(tokens.get("t1", 100), Some(verified("u1")));
        assert_eq!(tokens.get("t1", 101), None, "expired");
        assert_eq!(tokens.get("t1", 50), None, "an expired token is dropped");
        assert_eq!(tokens.get("t2", 50), None);
        // The whole text is the key: a prefix or a longer string is another token.
        tokens.insert("t3", verified("u3"), 100);
        assert_eq!(tokens.get("t", 50), None);
        assert_eq!(tokens.get("t33", 50), None);
    }

    #[test]
    fn verified_tokens_stay_bounded_and_keep_the_recently_used() {
        let tokens = VerifiedTokens::new(4);
        tokens.insert("a", verified("a"), 100);
        tokens.insert("b", verified("b"), 100);
        // Young is full: the next one turns {a, b} old.
        tokens.insert("c", verified("c"), 100);
        // A hit in the old generation moves `a` back to the young one.
        assert!(tokens.get("a", 1).is_some());
        // Young {c, a} is full again: {c, a} turns old, {b} is dropped.
        tokens.insert("d", verified("d"), 100);
        assert!(tokens.get("b", 1).is_none(), "least recently used, dropped");
        for kept in ["a", "c", "d"] {
            assert!(tokens.get(kept, 1).is_some(), "{kept}");
        }
        for i in 0..100 {
            tokens.insert(&format!("x{i}"), verified("x"), 100);
            assert!(tokens.len() <= 4, "{}", tokens.len());
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
