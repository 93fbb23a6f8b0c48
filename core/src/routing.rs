//! Route records: where a user's devices are connected (gateway node + connection id),
//! stored in Redis under [`crate::keys::user_routes`], and the batched lookup the writer
//! and reader use to decide which gateway nodes to push to.

use std::collections::{BTreeMap, HashMap};

use redis::aio::ConnectionLike;

use crate::keys;

/// One live connection of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub node_id: String,
    pub connection_id: u64,
    pub last_active_ms: u64,
}

/// A stored route value that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed route value {0:?}")]
pub struct RouteDecodeError(pub String);

impl Route {
    /// `node|connection_id|last_active_ms` (node ids never contain `|`).
    pub fn encode(&self) -> String {
        format!(
            "{}|{}|{}",
            self.node_id, self.connection_id, self.last_active_ms
        )
    }

    pub fn decode(value: &str) -> Result<Self, RouteDecodeError> {
        let bad = || RouteDecodeError(value.to_owned());
        let mut parts = value.split('|');
        let (Some(node_id), Some(connection_id), Some(last_active_ms), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if node_id.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            node_id: node_id.to_owned(),
            connection_id: connection_id.parse().map_err(|_| bad())?,
            last_active_ms: last_active_ms.parse().map_err(|_| bad())?,
        })
    }
}

/// Connections to push to on one gateway node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeTargets {
    pub connection_ids: Vec<u64>,
}

/// Looks up the live routes of many users in one pipelined round trip: one list per user,
/// in the order given. Undecodable entries are skipped and logged, never fatal.
pub async fn lookup_routes<C: ConnectionLike>(
    connection: &mut C,
    user_ids: &[&str],
) -> redis::RedisResult<Vec<Vec<Route>>> {
    if user_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for user_id in user_ids {
        pipe.hgetall(keys::user_routes(user_id));
    }
    let replies: Vec<HashMap<String, String>> = pipe.query_async(connection).await?;
    Ok(user_ids
        .iter()
        .zip(replies)
        .map(|(user_id, devices)| {
            devices
                .into_iter()
                .filter_map(|(device_id, value)| match Route::decode(&value) {
                    Ok(route) => Some(route),
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
            last_active_ms: 1_700_000_000_000,
        };
        assert_eq!(route.encode(), "gw-1|42|1700000000000");
        assert_eq!(Route::decode(&route.encode()), Ok(route));
    }

    #[test]
    fn malformed_routes_are_errors() {
        for value in ["", "gw-1", "gw-1|x|1", "gw-1|1", "gw-1|1|2|3", "|1|2"] {
            assert!(Route::decode(value).is_err(), "{value:?} should not decode");
        }
    }
}
