//! Client authentication: JWT verification with the algorithm pinned to HS256 and the
//! identity a caller carries. The gateway verifies a connection's token with it (shared by
//! every shard, read-only after start-up) and storage-reader a gRPC caller's, with the same
//! secret and claims. The revocation deny-list ([`crate::keys::revoked_token`]) is checked
//! by each service.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const CLOCK_SKEW_SECONDS: u64 = 5;

/// Who a connection belongs to. The sender of everything it sends is `user_id`, whatever
/// a frame says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub device_id: String,
    pub jti: String,
    /// Unix seconds after which the token is no longer valid.
    pub expires_at: u64,
}

/// Why a token was refused. Plain enum: refusals are counted by variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm not allowed")]
    Algorithm,
    #[error("bad token signature")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token claims invalid")]
    Claims,
    #[error("token revoked")]
    Revoked,
    #[error("token check unavailable")]
    Unavailable,
}

impl AuthError {
    /// Label for the refusal counter.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Algorithm => "algorithm",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Claims => "claims",
            Self::Revoked => "revoked",
            Self::Unavailable => "unavailable",
        }
    }
}

#[derive(Debug, serde::Deserialize)]
struct Claims {
    sub: String,
    did: String,
    jti: String,
    exp: u64,
}

/// Verifies HS256 tokens with one secret. Cheap to clone (one per shard).
#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn hs256(secret: &[u8]) -> Self {
        // `Validation::new` pins the accepted algorithms to exactly HS256, so `none` and
        // algorithm confusion (e.g. an RS256 header) are refused before any key is used.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = CLOCK_SKEW_SECONDS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Checks signature, algorithm, `exp`, `nbf` and the claims Chatify needs.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        // The header first: one that does not parse (e.g. `"alg":"none"`, which is not an
        // algorithm jsonwebtoken knows) is malformed; any algorithm but HS256 is refused
        // before the signature is looked at.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(AuthError::Algorithm);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|error| classify(error.kind()))?;
        let claims = data.claims;
        let ids_valid = crate::ids::validate_id(&claims.sub).is_ok()
            && crate::ids::validate_id(&claims.did).is_ok()
            && !claims.jti.is_empty()
            && claims.jti.len() <= 128;
        if !ids_valid {
            return Err(AuthError::Claims);
        }
        Ok(Identity {
            user_id: claims.sub,
            device_id: claims.did,
            jti: claims.jti,
            expires_at: claims.exp,
        })
    }
}

fn classify(kind: &jsonwebtoken::errors::ErrorKind) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::InvalidSignature => AuthError::Signature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::Algorithm,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => AuthError::Claims,
        _ => AuthError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    fn token(algorithm: Algorithm, secret: &[u8], claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(algorithm),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("encode")
    }

    fn claims(exp: u64) -> serde_json::Value {
        serde_json::json!({"sub": "u1001", "did": "phone-1", "jti": "j-1", "exp": exp})
    }

    fn b64(json: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn a_good_token_yields_its_identity() {
        let auth = Authenticator::hs256(SECRET);
        let identity = auth
            .verify(&token(Algorithm::HS256, SECRET, claims(now() + 60)))
            .expect("valid");
        assert_eq!(identity.user_id, "u1001");
        assert_eq!(identity.device_id, "phone-1");
        assert_eq!(identity.jti, "j-1");
    }

    #[test]
    fn bad_tokens_are_refused_for_the_right_reason() {
        let auth = Authenticator::hs256(SECRET);
        let fresh = now() + 60;
        assert_eq!(auth.verify(""), Err(AuthError::Missing));
        assert_eq!(auth.verify("not.a.jwt"), Err(AuthError::Malformed));
        assert_eq!(
            auth.verify(&token(
                Algorithm::HS256,
                b"another-secret-another-secret-xx",
                claims(fresh)
            )),
            Err(AuthError::Signature)
        );
        assert_eq!(
            auth.verify(&token(Algorithm::HS384, SECRET, claims(fresh))),
            Err(AuthError::Algorithm)
        );
        assert_eq!(
            auth.verify(&token(Algorithm::HS256, SECRET, claims(now() - 3600))),
            Err(AuthError::Expired)
        );
        let future = serde_json::json!({"sub": "u1", "did": "d", "jti": "j", "exp": fresh, "nbf": now() + 3600});
        assert_eq!(
            auth.verify(&token(Algorithm::HS256, SECRET, future)),
            Err(AuthError::NotYetValid)
        );
        let no_device = serde_json::json!({"sub": "u1", "jti": "j", "exp": fresh});
        assert_eq!(
            auth.verify(&token(Algorithm::HS256, SECRET, no_device)),
            Err(AuthError::Claims)
        );
        let bad_user = serde_json::json!({"sub": "u:1", "did": "d", "jti": "j", "exp": fresh});
        assert_eq!(
            auth.verify(&token(Algorithm::HS256, SECRET, bad_user)),
            Err(AuthError::Claims)
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let auth = Authenticator::hs256(SECRET);
        let payload = b64(&claims(now() + 60).to_string());
        for header in [r#"{"alg":"none","typ":"JWT"}"#, r#"{"alg":"None"}"#] {
            let unsigned = format!("{}.{payload}.", b64(header));
            let refused = auth
                .verify(&unsigned)
                .expect_err("alg none must be refused");
            assert!(
                matches!(refused, AuthError::Algorithm | AuthError::Malformed),
                "{header}: {refused:?}"
            );
        }
    }
}
