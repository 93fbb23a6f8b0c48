//! The Redis key layout, in one place. Keys about one session carry the session id in a
//! `{hash tag}` so a Redis Cluster keeps a session's seq, hot cache, state and members on
//! one slot (a batch can then touch them in one pipeline per node).

use crate::ids::SessionId;

/// Dedupe record of a client message: `SET NX EX`, value = message id and seq.
pub fn dedupe(sender_id: &str, client_msg_id: &str) -> String {
    format!("chatify:dedupe:{sender_id}:{client_msg_id}")
}

/// Per-session seq counter (`INCR`).
pub fn session_seq(session: &SessionId) -> String {
    format!("chatify:seq:{{{session}}}")
}

/// Hot cache of a session's recent messages: a sorted set scored by seq.
pub fn session_hot_cache(session: &SessionId) -> String {
    format!("chatify:hot:{{{session}}}")
}

/// Session state hash: last message id, last seq, updated_at.
pub fn session_state(session: &SessionId) -> String {
    format!("chatify:session:{{{session}}}")
}

/// Cached member set of a group session.
pub fn session_members(session: &SessionId) -> String {
    format!("chatify:members:{{{session}}}")
}

/// A user's live routes: hash of device id -> encoded [`crate::routing::Route`]. The seed
/// layout `chatify:user:{user_id}` extended to one field per device.
pub fn user_routes(user_id: &str) -> String {
    format!("chatify:user:{user_id}")
}

/// Set of `user_id|device_id` a gateway node registered routes for, so a restarted node
/// removes the routes it left behind when it died.
pub fn node_routes(node_id: &str) -> String {
    format!("chatify:node-routes:{node_id}")
}

/// A user's last published presence (`online` / `offline`), so a device joining while
/// another is connected, or a reconnect within the grace period, publishes nothing.
pub fn user_presence(user_id: &str) -> String {
    format!("chatify:presence:{user_id}")
}

/// A user's read cursors: hash of session id -> read seq.
pub fn user_cursors(user_id: &str) -> String {
    format!("chatify:cursor:{user_id}")
}

/// What one user's pages of one session leave out: a sorted set holding the member
/// `cleared` scored by the clear watermark, one member per hidden (deleted-for-me) message,
/// its seq as member and score, and `built` once the set was filled from Postgres (a set
/// without it is partial: rebuild). Tagged by the session so it shares the session's slot.
pub fn user_marks(session: &SessionId, user_id: &str) -> String {
    format!("chatify:marks:{{{session}}}:{user_id}")
}

/// A user's sessions by last activity: sorted set of session id scored by updated_at ms.
pub fn user_sessions(user_id: &str) -> String {
    format!("chatify:sessions:{user_id}")
}

/// Deny-list entry of a revoked token id (`SET EX` until the token would expire anyway).
pub fn revoked_token(jti: &str) -> String {
    format!("chatify:revoked:{jti}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_share_one_hash_tag() {
        let session = SessionId::single("a", "b").expect("valid");
        assert_eq!(session_seq(&session), "chatify:seq:{p2p:a:b}");
        assert_eq!(session_hot_cache(&session), "chatify:hot:{p2p:a:b}");
        assert_eq!(session_state(&session), "chatify:session:{p2p:a:b}");
        assert_eq!(
            session_members(&SessionId::Group("g1".into())),
            "chatify:members:{grp:g1}"
        );
        assert_eq!(user_marks(&session, "a"), "chatify:marks:{p2p:a:b}:a");
    }

    #[test]
    fn user_keys_follow_the_seed_layout() {
        assert_eq!(user_routes("u1001"), "chatify:user:u1001");
        assert_eq!(dedupe("u1", "c9"), "chatify:dedupe:u1:c9");
        assert_eq!(revoked_token("j1"), "chatify:revoked:j1");
    }
}
