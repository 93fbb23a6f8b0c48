//! The `chatify.storage.v1.AdminService` implementation, for trusted internal callers only
//! (`x-chatify-internal-token`): token revocation (a deny-list entry in Redis, then a
//! `kicked` push to every live connection that authenticated with the token) and device
//! kicks (the same push to the connections of one device, or of every device, of a user).
//! Connections are found in the user's route hash (`keys::user_routes`, field = device id)
//! and told through one push record per gateway node, with close code 1008.

use std::collections::BTreeMap;

use chatify_core::routing::{self, Route};
use chatify_core::{ids, keys};
use chatify_proto::bus::v1::PushRecord;
use chatify_proto::client::v1::{Kicked, ServerFrame, server_frame};
use chatify_proto::storage::v1::admin_service_server::AdminService;
use chatify_proto::storage::v1::{
    KickDeviceRequest, KickDeviceResponse, RevokeTokenRequest, RevokeTokenResponse,
};
use redis::aio::ConnectionManager;
use tonic::{Request, Response, Status};

use crate::error::ReaderError;
use crate::identity::Gatekeeper;
use crate::notify::{self, Notifier};

/// WebSocket close code of a kick (policy violation), as the gateway sends it.
pub const KICK_CLOSE_CODE: u32 = 1008;
/// Reason of a revocation's kick when the request gives none.
pub const REVOKE_REASON_DEFAULT: &str = "token revoked";
/// Reason of a device kick when the request gives none.
pub const KICK_REASON_DEFAULT: &str = "device kicked";
/// Shortest life of a deny-list entry, in ms (a token already past its expiry still gets
/// one, so the key is always set with a positive TTL).
pub const REVOKED_TTL_MS_MIN: i64 = 1000;
/// Longest token id, device id and reason accepted, in bytes.
pub const ADMIN_FIELD_BYTES_MAX: usize = 256;

/// The admin service: the gatekeeper (internal callers only), Redis and the notifier.
#[derive(Debug, Clone)]
pub struct Admin {
    pub gatekeeper: Gatekeeper,
    pub redis: ConnectionManager,
    pub notifier: Notifier,
}

fn user_arg(user_id: &str) -> Result<(), ReaderError> {
    ids::validate_id(user_id)
        .map_err(|error| ReaderError::InvalidArgument(format!("user_id {user_id:?}: {error}")))
}

fn bounded_arg(name: &str, value: &str) -> Result<(), ReaderError> {
    if value.len() > ADMIN_FIELD_BYTES_MAX {
        return Err(ReaderError::InvalidArgument(format!(
            "{name} is {} bytes, over the maximum {ADMIN_FIELD_BYTES_MAX}",
            value.len()
        )));
    }
    Ok(())
}

/// The request's reason, or `default` when it is empty.
fn reason_arg(reason: &str, default: &str) -> Result<String, ReaderError> {
    bounded_arg("reason", reason)?;
    Ok(if reason.is_empty() {
        default.to_owned()
    } else {
        reason.to_owned()
    })
}

/// How long a deny-list entry for a token expiring at `expires_at_ms` lives, from `now_ms`.
fn revoked_ttl_ms(expires_at_ms: i64, now_ms: i64) -> i64 {
    expires_at_ms.saturating_sub(now_ms).max(REVOKED_TTL_MS_MIN)
}

/// One `kicked` push record per gateway node for the chosen routes.
fn kick_records(routes: &[Route], reason: &str) -> Vec<(String, PushRecord)> {
    let mut by_node: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for route in routes {
        by_node
            .entry(route.node_id.as_str())
            .or_default()
            .push(route.connection_id);
    }
    let frame = ServerFrame {
        frame: Some(server_frame::Frame::Kicked(Kicked {
            reason: reason.to_owned(),
        })),
    };
    by_node
        .into_iter()
        .map(|(node, connection_ids)| {
            (
                node.to_owned(),
                PushRecord {
                    connection_ids,
                    user_ids: Vec::new(),
                    frame: Some(frame.clone()),
                    close_code: Some(KICK_CLOSE_CODE),
                },
            )
        })
        .collect()
}

impl Admin {
    /// Tells the connections of `user_id`'s live routes that `pick` chooses to close;
    /// returns how many were told (pushes to a node with no topic do not count).
    async fn kick(
        &self,
        user_id: &str,
        reason: &str,
        pick: impl Fn(&str, &Route) -> bool,
    ) -> Result<u32, ReaderError> {
        let mut redis = self.redis.clone();
        let routes: Vec<Route> = routing::lookup_device_routes(&mut redis, &[user_id])
            .await?
            .into_iter()
            .flatten()
            .filter(|(device_id, route)| pick(device_id.as_str(), route))
            .map(|(_, route)| route)
            .collect();
        if routes.is_empty() {
            return Ok(0);
        }
        let records = kick_records(&routes, reason);
        let told: Vec<usize> = records
            .iter()
            .map(|(_, record)| record.connection_ids.len())
            .collect();
        let delivered = self.notifier.push(user_id, records).await?;
        let kicked: usize = told
            .into_iter()
            .zip(delivered)
            .filter_map(|(count, delivered)| delivered.then_some(count))
            .sum();
        metrics::counter!("chatify_reader_connections_kicked_total").increment(kicked as u64);
        Ok(kicked as u32)
    }

    async fn revoke(
        &self,
        request: RevokeTokenRequest,
    ) -> Result<RevokeTokenResponse, ReaderError> {
        user_arg(&request.user_id)?;
        if request.token_id.is_empty() {
            return Err(ReaderError::InvalidArgument(
                "token_id is empty: name the jti to revoke".into(),
            ));
        }
        bounded_arg("token_id", &request.token_id)?;
        let reason = reason_arg(&request.reason, REVOKE_REASON_DEFAULT)?;
        let ttl_ms = revoked_ttl_ms(request.expires_at_ms, notify::now_ms());
        let mut redis = self.redis.clone();
        // The deny-list first: from here on no new connection or call with the token is
        // admitted, so the kicks below cannot be raced by a reconnect.
        redis::cmd("SET")
            .arg(keys::revoked_token(&request.token_id))
            .arg(1)
            .arg("PX")
            .arg(ttl_ms)
            .exec_async(&mut redis)
            .await?;
        let connections_kicked = self
            .kick(&request.user_id, &reason, |_, route| {
                route.token_id == request.token_id
            })
            .await?;
        tracing::info!(
            user_id = %request.user_id,
            token_id = %request.token_id,
            ttl_ms,
            connections_kicked,
            "token revoked"
        );
        Ok(RevokeTokenResponse { connections_kicked })
    }

    async fn kick_devices(
        &self,
        request: KickDeviceRequest,
    ) -> Result<KickDeviceResponse, ReaderError> {
        user_arg(&request.user_id)?;
        bounded_arg("device_id", &request.device_id)?;
        let reason = reason_arg(&request.reason, KICK_REASON_DEFAULT)?;
        let connections_kicked = self
            .kick(&request.user_id, &reason, |device_id, _| {
                request.device_id.is_empty() || device_id == request.device_id
            })
            .await?;
        tracing::info!(
            user_id = %request.user_id,
            device_id = %request.device_id,
            connections_kicked,
            "device kicked"
        );
        Ok(KickDeviceResponse { connections_kicked })
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        self.gatekeeper.require_internal(request.metadata()).await?;
        Ok(Response::new(self.revoke(request.into_inner()).await?))
    }

    async fn kick_device(
        &self,
        request: Request<KickDeviceRequest>,
    ) -> Result<Response<KickDeviceResponse>, Status> {
        self.gatekeeper.require_internal(request.metadata()).await?;
        Ok(Response::new(
            self.kick_devices(request.into_inner()).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(node: &str, connection_id: u64) -> Route {
        Route {
            node_id: node.into(),
            connection_id,
            connected_at_ms: 1,
            last_active_ms: 1,
            token_id: "j".into(),
        }
    }

    #[test]
    fn a_deny_list_entry_always_lives() {
        assert_eq!(revoked_ttl_ms(10_000, 4_000), 6_000);
        assert_eq!(revoked_ttl_ms(4_000, 4_000), REVOKED_TTL_MS_MIN);
        assert_eq!(revoked_ttl_ms(0, 4_000), REVOKED_TTL_MS_MIN);
        assert_eq!(revoked_ttl_ms(i64::MIN, 4_000), REVOKED_TTL_MS_MIN);
    }

    #[test]
    fn kicks_are_one_record_per_node_with_the_close_code() {
        let records = kick_records(&[route("b", 2), route("a", 1), route("b", 3)], "bye");
        let nodes: Vec<(&str, &[u64])> = records
            .iter()
            .map(|(node, record)| (node.as_str(), record.connection_ids.as_slice()))
            .collect();
        assert_eq!(nodes, vec![("a", &[1][..]), ("b", &[2, 3][..])]);
        for (_, record) in &records {
            assert_eq!(record.close_code, Some(KICK_CLOSE_CODE));
            assert_eq!(
                record.frame.as_ref().and_then(|frame| frame.frame.clone()),
                Some(server_frame::Frame::Kicked(Kicked {
                    reason: "bye".into()
                }))
            );
        }
    }

    #[test]
    fn reasons_default_and_are_bounded() {
        assert_eq!(reason_arg("", "x").ok().as_deref(), Some("x"));
        assert_eq!(reason_arg("y", "x").ok().as_deref(), Some("y"));
        assert!(reason_arg(&"r".repeat(ADMIN_FIELD_BYTES_MAX + 1), "x").is_err());
        assert!(user_arg("").is_err());
    }
}
