//! Client identities and their tokens: HS256 JWTs minted from the gateway's secret with the
//! claims the gateway checks (`sub`, `did`, `jti`, `exp`; core/src/auth.rs), or read from a
//! file (one token a line, the user id taken from its unverified `sub`).

use std::path::Path;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};

/// Lifetime of a minted token, in seconds (a run never lasts this long).
pub const TOKEN_LIFETIME_SECONDS: u64 = 24 * 3600;

/// One client: who it is and how it authenticates.
#[derive(Clone)]
pub struct Identity {
    pub user_id: String,
    pub device_id: String,
    pub token: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    did: &'a str,
    jti: &'a str,
    exp: u64,
}

#[derive(Debug, serde::Deserialize)]
struct UnverifiedClaims {
    sub: String,
    #[serde(default)]
    did: String,
}

fn unix_seconds() -> anyhow::Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs())
}

/// Mints a token for `user_id` / `device_id`, unique per call through `jti`.
pub fn mint(secret: &[u8], user_id: &str, device_id: &str, jti: &str) -> anyhow::Result<String> {
    let claims = Claims {
        sub: user_id,
        did: device_id,
        jti,
        exp: unix_seconds()? + TOKEN_LIFETIME_SECONDS,
    };
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .context("mint jwt")
}

/// The user id of client slot `slot`.
pub fn user_id(prefix: &str, slot: usize) -> String {
    format!("{prefix}{slot}")
}

/// Identities for `slots`, minted from `secret`.
pub fn mint_identities(
    secret: &[u8],
    prefix: &str,
    run_id: &str,
    slots: std::ops::Range<usize>,
) -> anyhow::Result<Vec<Identity>> {
    slots
        .map(|slot| {
            let user_id = user_id(prefix, slot);
            let device_id = "d0".to_owned();
            let token = mint(secret, &user_id, &device_id, &format!("lg-{run_id}-{slot}"))?;
            Ok(Identity {
                user_id,
                device_id,
                token,
            })
        })
        .collect()
}

/// Identities from a token file (one JWT a line; blank lines and `#` comments skipped);
/// slot `i` takes line `i`. Fails when the file has fewer tokens than slots.
pub fn read_identities(
    path: &Path,
    slots: std::ops::Range<usize>,
) -> anyhow::Result<Vec<Identity>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let tokens: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    anyhow::ensure!(
        tokens.len() >= slots.end,
        "{} holds {} tokens, {} connections need one each",
        path.display(),
        tokens.len(),
        slots.end
    );
    slots
        .map(|slot| {
            let token = tokens[slot];
            let claims = unverified_claims(token)
                .with_context(|| format!("token on line {} of {}", slot + 1, path.display()))?;
            Ok(Identity {
                user_id: claims.sub,
                device_id: claims.did,
                token: token.to_owned(),
            })
        })
        .collect()
}

/// The claims of a JWT without checking its signature (the server does that).
fn unverified_claims(token: &str) -> anyhow::Result<UnverifiedClaims> {
    let payload = token
        .split('.')
        .nth(1)
        .context("not a jwt (no payload part)")?;
    let json = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .context("jwt payload is not base64url")?;
    serde_json::from_slice(&json).context("jwt payload is not json with a sub")
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};

    #[derive(Debug, serde::Deserialize)]
    struct Decoded {
        sub: String,
        did: String,
        jti: String,
        exp: u64,
    }

    #[test]
    fn minted_tokens_carry_the_claims_the_gateway_checks() {
        let secret = b"a-secret-of-enough-length-for-hs256-0123";
        let identities = mint_identities(secret, "lg-x-", "run1", 3..5).expect("mint");
        assert_eq!(identities.len(), 2);
        assert_eq!(identities[0].user_id, "lg-x-3");
        let decoded = jsonwebtoken::decode::<Decoded>(
            &identities[1].token,
            &DecodingKey::from_secret(secret),
            &Validation::new(Algorithm::HS256),
        )
        .expect("valid hs256");
        assert_eq!(decoded.claims.sub, "lg-x-4");
        assert_eq!(decoded.claims.did, "d0");
        assert_eq!(decoded.claims.jti, "lg-run1-4");
        assert!(decoded.claims.exp > unix_seconds().expect("clock"));
    }

    #[test]
    fn token_files_give_user_ids_from_sub() {
        let secret = b"another-secret-of-enough-length-0123456";
        let a = mint(secret, "alice", "phone", "j1").expect("mint");
        let b = mint(secret, "bob", "web", "j2").expect("mint");
        let path = std::env::temp_dir().join(format!("loadgen-tokens-{}", std::process::id()));
        std::fs::write(&path, format!("# tokens\n{a}\n\n{b}\n")).expect("write");
        let identities = read_identities(&path, 0..2).expect("read");
        assert_eq!(identities[0].user_id, "alice");
        assert_eq!(identities[1].device_id, "web");
        assert!(read_identities(&path, 0..3).is_err(), "too few tokens");
        std::fs::remove_file(&path).expect("remove");
    }
}
