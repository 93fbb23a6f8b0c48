//! Ids: user ids, session ids (`p2p:{lo}:{hi}`, `grp:{id}`) and message ids.

use std::fmt;

use sha2::{Digest, Sha256};

/// Longest user id or group id we accept, in bytes.
pub const ID_BYTES_MAX: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id is empty")]
    Empty,
    #[error("id is longer than {ID_BYTES_MAX} bytes")]
    TooLong,
    #[error("id contains a character other than ascii letters, digits, '-', '_', '.', '@'")]
    BadCharacter,
    #[error("session id must look like p2p:{{lo}}:{{hi}} or grp:{{id}}")]
    BadSession,
    #[error("single-chat session needs two different users in bytewise order")]
    BadPair,
    #[error("message id is not a uuid")]
    BadMessageId,
}

/// Checks a user or group id: 1..=64 bytes of `[A-Za-z0-9._@-]` (no `:`, which separates
/// the parts of a session id).
pub fn validate_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > ID_BYTES_MAX {
        return Err(IdError::TooLong);
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
    {
        return Err(IdError::BadCharacter);
    }
    Ok(())
}

/// A conversation: a single chat between two users or a group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SessionId {
    /// `p2p:{lo}:{hi}`: the two users sorted bytewise, so both sides derive the same id.
    Single { lo: String, hi: String },
    /// `grp:{id}`.
    Group(String),
}

impl SessionId {
    /// The single-chat session between `a` and `b` (in either order).
    pub fn single(a: &str, b: &str) -> Result<Self, IdError> {
        validate_id(a)?;
        validate_id(b)?;
        if a == b {
            return Err(IdError::BadPair);
        }
        let (lo, hi) = if a.as_bytes() < b.as_bytes() {
            (a, b)
        } else {
            (b, a)
        };
        Ok(Self::Single {
            lo: lo.to_owned(),
            hi: hi.to_owned(),
        })
    }

    pub fn group(id: &str) -> Result<Self, IdError> {
        validate_id(id)?;
        Ok(Self::Group(id.to_owned()))
    }

    /// Parses `p2p:{lo}:{hi}` (lo < hi bytewise) or `grp:{id}`.
    pub fn parse(text: &str) -> Result<Self, IdError> {
        if let Some(rest) = text.strip_prefix("p2p:") {
            let (lo, hi) = rest.split_once(':').ok_or(IdError::BadSession)?;
            let session = Self::single(lo, hi)?;
            // Only the canonical order is a valid id, so one chat never has two ids.
            if lo.as_bytes() >= hi.as_bytes() {
                return Err(IdError::BadPair);
            }
            return Ok(session);
        }
        if let Some(id) = text.strip_prefix("grp:") {
            return Self::group(id);
        }
        Err(IdError::BadSession)
    }

    pub fn is_group(&self) -> bool {
        matches!(self, Self::Group(_))
    }

    /// For a single chat, the other participant of `user`; `None` for groups or strangers.
    pub fn peer_of(&self, user: &str) -> Option<&str> {
        match self {
            Self::Single { lo, hi } if lo == user => Some(hi),
            Self::Single { lo, hi } if hi == user => Some(lo),
            _ => None,
        }
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Single { lo, hi } => write!(f, "p2p:{lo}:{hi}"),
            Self::Group(id) => write!(f, "grp:{id}"),
        }
    }
}

/// A message id: a UUIDv7 whose time part is when the gateway first received the message
/// and whose random part is a hash of (sender, client_msg_id). The same Kafka record
/// always yields the same id, so a replay finishes with the id it started with, and ids
/// sort by time (the archive can derive `created_at` from them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(uuid::Uuid);

impl MessageId {
    pub fn derive(sender_id: &str, client_msg_id: &str, received_at_ms: u64) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(sender_id.as_bytes());
        hasher.update([0]);
        hasher.update(client_msg_id.as_bytes());
        let digest = hasher.finalize();
        let mut random = [0_u8; 10];
        random.copy_from_slice(&digest[..10]);
        Self(uuid::Builder::from_unix_timestamp_millis(received_at_ms, &random).into_uuid())
    }

    /// A UUIDv7 from a Unix-ms time and the 74 bits after it (given as 10 bytes; the bits
    /// the version and variant take are overwritten). The gateway fills them with its node,
    /// shard, boot nonce and a counter, so ids are unique without coordination.
    pub fn from_unix_ms_and_bits(unix_ms: u64, bits: [u8; 10]) -> Self {
        Self(uuid::Builder::from_unix_timestamp_millis(unix_ms, &bits).into_uuid())
    }

    pub fn parse(text: &str) -> Result<Self, IdError> {
        uuid::Uuid::parse_str(text)
            .map(Self)
            .map_err(|_| IdError::BadMessageId)
    }

    pub fn as_uuid(&self) -> uuid::Uuid {
        self.0
    }

    /// Unix milliseconds embedded in the id.
    pub fn timestamp_ms(&self) -> u64 {
        let (seconds, nanos) = self
            .0
            .get_timestamp()
            .map(|ts| ts.to_unix())
            .unwrap_or((0, 0));
        seconds * 1000 + u64::from(nanos) / 1_000_000
    }
}

impl From<uuid::Uuid> for MessageId {
    fn from(value: uuid::Uuid) -> Self {
        Self(value)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_session_is_the_same_from_both_sides() {
        let ab = SessionId::single("alice", "bob").expect("valid");
        let ba = SessionId::single("bob", "alice").expect("valid");
        assert_eq!(ab, ba);
        assert_eq!(ab.to_string(), "p2p:alice:bob");
        assert_eq!(SessionId::parse("p2p:alice:bob"), Ok(ab.clone()));
        assert_eq!(ab.peer_of("alice"), Some("bob"));
        assert_eq!(ab.peer_of("carol"), None);
    }

    #[test]
    fn bytewise_order_not_numeric() {
        assert_eq!(
            SessionId::single("9", "10").expect("valid").to_string(),
            "p2p:10:9"
        );
    }

    #[test]
    fn bad_session_ids_are_refused() {
        assert_eq!(SessionId::parse("p2p:bob:alice"), Err(IdError::BadPair));
        assert_eq!(SessionId::parse("p2p:alice:alice"), Err(IdError::BadPair));
        assert_eq!(SessionId::parse("p2p:alice"), Err(IdError::BadSession));
        assert_eq!(SessionId::parse("room:1"), Err(IdError::BadSession));
        assert_eq!(SessionId::parse("grp:"), Err(IdError::Empty));
        assert_eq!(SessionId::parse("grp:a b"), Err(IdError::BadCharacter));
        assert_eq!(
            SessionId::parse(&format!("grp:{}", "x".repeat(65))),
            Err(IdError::TooLong)
        );
        assert_eq!(
            SessionId::parse("grp:team-1"),
            Ok(SessionId::Group("team-1".into()))
        );
    }

    #[test]
    fn message_id_is_deterministic_and_time_ordered() {
        let first = MessageId::derive("u1", "c1", 1_700_000_000_123);
        assert_eq!(first, MessageId::derive("u1", "c1", 1_700_000_000_123));
        assert_ne!(first, MessageId::derive("u1", "c2", 1_700_000_000_123));
        assert_ne!(first, MessageId::derive("u2", "c1", 1_700_000_000_123));
        assert_eq!(first.timestamp_ms(), 1_700_000_000_123);
        assert!(MessageId::derive("u9", "c9", 1_700_000_000_124) > first);
        assert_eq!(MessageId::parse(&first.to_string()), Ok(first));
        assert_eq!(first.as_uuid().get_version_num(), 7);
    }
}
