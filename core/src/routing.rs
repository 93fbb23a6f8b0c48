//! Route records: where a user's devices are connected (gateway node + connection id),
//! stored in Redis under [`crate::keys::user_routes`], and the batched lookup the writer
//! and reader use to decide which gateway nodes to push to.
//!
//! The gateway that holds a connection rewrites its route every
//! `CHATIFY_ROUTE_REFRESH_MS` (default 30 s) with a fresh `last_active_ms` and pushes the
//! key's TTL out; a route not refreshed for [`ROUTE_STALE_MS`] belongs to a node that died
//! and is ignored by every lookup (and the key expires once no node refreshes it), so a
//! crashed gateway never leaves users looking online for long.

use std::collections::{BTreeMap, HashMap};

use redis::aio::ConnectionLike;

use crate::keys;

/// A route whose `last_active_ms` is older than this is dead (its node stopped refreshing).
pub const ROUTE_STALE_MS: u64 = 120_000;
/// TTL of a user's route hash, pushed out at every refresh.
pub const ROUTE_KEY_TTL_SECONDS: u64 = 180;

/// One live connection of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub node_id: String,
    pub connection_id: u64,
    pub connected_at_ms: u64,
    /// Last time the connection was seen active (refreshed in batches, not per frame).
    pub last_active_ms: u64,
    /// `jti` of the token the connection authenticated with (revocation finds it by this).
    pub token_id: String,
}

/// A stored route value that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed route value {0:?}")]
pub struct RouteDecodeError(pub String);

impl Route {
    /// `node|connection_id|connected_at_ms|last_active_ms|token_id` (node ids never contain
    /// `|`; the token id is last, so it may).
    pub fn encode(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.node_id,
            self.connection_id,
            self.connected_at_ms,
            self.last_active_ms,
            self.token_id
        )
    }

    pub fn decode(value: &str) -> Result<Self, RouteDecodeError> {
        let bad = || RouteDecodeError(value.to_owned());
        let mut parts = value.splitn(5, '|');
        let (
            Some(node_id),
            Some(connection_id),
            Some(connected_at_ms),
            Some(last_active_ms),
            Some(token_id),
        ) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        )
        else {
            return Err(bad());
        };
        if node_id.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            node_id: node_id.to_owned(),
            connection_id: connection_id.parse().map_err(|_| bad())?,
            connected_at_ms: connected_at_ms.parse().map_err(|_| bad())?,
            last_active_ms: last_active_ms.parse().map_err(|_| bad())?,
            token_id: token_id.to_owned(),
        })
    }

    /// Whether the node holding this route stopped refreshing it.
    pub fn is_stale(&self, now_ms: u64) -> bool {
        self.last_active_ms.saturating_add(ROUTE_STALE_MS) < now_ms
    }
}

/// Wall-clock Unix milliseconds (0 if the clock is before 1970).
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Connections to push to on one gateway node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeTargets {
    pub connection_ids: Vec<u64>,
}

/// Looks up the live routes of many users in one pipelined round trip: one list per user,
/// in the order given. Undecodable entries are skipped and logged, never fatal; stale ones
/// (see [`ROUTE_STALE_MS`]) are skipped silently.
pub async fn lookup_routes<C: ConnectionLike>(
    connection: &mut C,
    user_ids: &[&str],
) -> redis::RedisResult<Vec<Vec<Route>>> {
    Ok(lookup_device_routes(connection, user_ids)
        .await?
        .into_iter()
        .map(|devices| devices.into_iter().map(|(_, route)| route).collect())
        .collect())
}

/// [`lookup_routes`] keeping each route's device id (the field of the user's route hash):
/// one list of `(device_id, route)` per user, in the order given, with the same skipping of
/// undecodable and stale routes.
pub async fn lookup_device_routes<C: ConnectionLike>(
    connection: &mut C,
    user_ids: &[&str],
) -> redis::RedisResult<Vec<Vec<(String, Route)>>> {
    if user_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for user_id in user_ids {
        pipe.hgetall(keys::user_routes(user_id));
    }
    let replies: Vec<HashMap<String, String>> = pipe.query_async(connection).await?;
    let now_ms = unix_now_ms();
    Ok(user_ids
        .iter()
        .zip(replies)
        .map(|(user_id, devices)| {
            devices
                .into_iter()
                .filter_map(|(device_id, value)| match Route::decode(&value) {
                    Ok(route) if route.is_stale(now_ms) => None,
                    Ok(route) => Some((device_id, route)),
                    Err(error) => {
                        tracing::warn!(%error, user_id, device_id, "skipping malformed route");
                        None
                    }
                })
                .collect()
        })
        .collect())
}

/// [`lookup_routes`] grouped by gateway node: the connections to push to on each node.
pub async fn lookup_by_node<C: ConnectionLike>(
    connection: &mut C,
    user_ids: &[&str],
) -> redis::RedisResult<BTreeMap<String, NodeTargets>> {
    let mut by_node: BTreeMap<String, NodeTargets> = BTreeMap::new();
    for route in lookup_routes(connection, user_ids)
        .await?
        .into_iter()
        .flatten()
    {
        by_node
            .entry(route.node_id)
            .or_default()
            .connection_ids
            .push(route.connection_id);
    }
    Ok(by_node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_round_trips() {
        let route = Route {
            node_id: "gw-1".into(),
            connection_id: 42,
            connected_at_ms: 1_699_999_999_000,
            last_active_ms: 1_700_000_000_000,
            token_id: "j|1".into(),
        };
        assert_eq!(route.encode(), "gw-1|42|1699999999000|1700000000000|j|1");
        assert_eq!(Route::decode(&route.encode()), Ok(route.clone()));
        assert!(!route.is_stale(1_700_000_000_000 + ROUTE_STALE_MS));
        assert!(route.is_stale(1_700_000_000_001 + ROUTE_STALE_MS));
    }

    #[test]
    fn malformed_routes_are_errors() {
        for value in [
            "",
            "gw-1",
            "gw-1|x|1|2|j",
            "gw-1|1",
            "gw-1|1|2|3",
            "|1|2|3|j",
            "gw-1|1|x|3|j",
        ] {
            assert!(Route::decode(value).is_err(), "{value:?} should not decode");
        }
    }
}
