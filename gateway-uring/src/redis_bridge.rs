//! The gateway's Redis client: the token deny-list, routes and presence. Redis is only
//! touched on the cold path (connect, close, a route refresh every
//! `CHATIFY_ROUTE_REFRESH_MS`), so instead of a Redis client per shard the shards send
//! requests over one bounded channel to a thread running a small tokio runtime with one
//! multiplexed connection (concurrent requests pipeline on it). Crosses shards: the sender
//! half is cloned into every shard.
//!
//! Routes (SPEC §2): `chatify:user:{user}` holds one field per device, value
//! `node|connection|connected_at|last_active|jti` ([`chatify_core::routing::Route`]);
//! `chatify:node-routes:{node}` lists what this node registered so a restart removes what a
//! crash left. Presence: `online` is published when a user's first device connects,
//! `offline` only after `CHATIFY_PRESENCE_GRACE_MS` with no live route left, both on
//! `{prefix}.user-events`; `chatify:presence:{user}` remembers the last state published so
//! a second device or a quick reconnect publishes nothing.
//!
//! The scripts touch keys of several users (node route set, routes, presence) and build
//! key names inside Lua: fine on one Redis, a Redis Cluster needs them split per slot.

use std::sync::Arc;
use std::time::Duration;

use chatify_core::keys;
use chatify_core::routing::{ROUTE_KEY_TTL_SECONDS, Route, unix_now_ms};
use chatify_core::topics::Topics;
use chatify_proto::Message as _;
use chatify_proto::bus::v1::{PushRecord, UserEvent, user_event};
use chatify_proto::client::v1::{Kicked, ServerFrame, server_frame};
use futures::channel::oneshot;
use redis::aio::ConnectionManager;

use crate::upstream::{Pending, Upstream};

/// Most requests waiting for the bridge; beyond that a connect is refused as unavailable
/// rather than queued without bound.
pub const BRIDGE_QUEUE_MAX: usize = 4096;
/// Longest a connect-time lookup may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Routes written per script call of a refresh.
const REFRESH_CHUNK: usize = 500;
/// Why an older connection of the same device is closed.
pub const REPLACED_REASON: &str = "replaced by a newer connection of this device";

/// Redis could not be consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("redis unavailable")]
pub struct Unavailable;

/// What a connect found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Not revoked; the route is registered.
    Admitted,
    /// The token id is on the deny-list; nothing was registered.
    Revoked,
}

/// One connection's route as the shard sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub user_id: String,
    pub device_id: String,
    pub token_id: String,
    pub connection_id: u64,
    pub connected_at_ms: u64,
    pub last_active_ms: u64,
}

enum Request {
    Connect {
        entry: RouteEntry,
        reply: oneshot::Sender<Result<Admission, Unavailable>>,
    },
    Disconnect {
        entry: RouteEntry,
    },
    Refresh {
        entries: Vec<RouteEntry>,
    },
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect { entry, .. } => f.debug_tuple("Connect").field(entry).finish(),
            Self::Disconnect { entry } => f.debug_tuple("Disconnect").field(entry).finish(),
            Self::Refresh { entries } => f.debug_tuple("Refresh").field(&entries.len()).finish(),
        }
    }
}

/// Who this bridge works for.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    pub node_id: String,
    pub topics: Topics,
    pub presence_grace_ms: u64,
}

/// Handle the shards use; cheap to clone.
#[derive(Debug, Clone)]
pub struct RedisBridge {
    requests: flume::Sender<Request>,
}

/// Registers a route unless the token is revoked; returns (admitted?, went online?, the
/// device's previous route).
const CONNECT_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0, false} end
local previous = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[3])
local was = redis.call('GET', KEYS[4])
redis.call('SET', KEYS[4], 'online', 'EX', ARGV[4])
local online = 0
if was ~= 'online' then online = 1 end
return {1, online, previous or false}
";

/// Removes a route if it is still this connection's; returns the routes left.
const DISCONNECT_SCRIPT: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and string.sub(current, 1, string.len(ARGV[2])) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[3])
end
return redis.call('HLEN', KEYS[1])
";

/// Rewrites routes still owned by their connection (or lost, e.g. Redis restarted empty)
/// and pushes the TTLs out. ARGV: routes key prefix, presence key prefix, ttl, then (user,
/// device, owner prefix, value) per route. A device that moved to another connection keeps
/// its newer route.
const REFRESH_SCRIPT: &str = r"
local routes, presence, ttl = ARGV[1], ARGV[2], ARGV[3]
for i = 4, #ARGV, 4 do
  local key = routes .. ARGV[i]
  local current = redis.call('HGET', key, ARGV[i + 1])
  if (not current) or string.sub(current, 1, string.len(ARGV[i + 2])) == ARGV[i + 2] then
    redis.call('HSET', key, ARGV[i + 1], ARGV[i + 3])
    redis.call('SADD', KEYS[1], ARGV[i] .. '|' .. ARGV[i + 1])
  end
  redis.call('EXPIRE', key, ttl)
  redis.call('EXPIRE', presence .. ARGV[i], ttl)
end
return 0
";

/// At start: removes every route this node left behind; returns the users concerned.
const CLEAR_NODE_SCRIPT: &str = r"
local members = redis.call('SMEMBERS', KEYS[1])
local users = {}
for _, member in ipairs(members) do
  local sep = string.find(member, '|', 1, true)
  if sep then
    local user, device = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
    local key = ARGV[2] .. user
    local current = redis.call('HGET', key, device)
    if current and string.sub(current, 1, string.len(ARGV[1])) == ARGV[1] then
      redis.call('HDEL', key, device)
    end
    table.insert(users, user)
  end
end
redis.call('DEL', KEYS[1])
return users
";

/// Marks a user offline if it was online; 1 when it changed.
const OFFLINE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == 'online' then
  redis.call('SET', KEYS[1], 'offline', 'EX', ARGV[1])
  return 1
end
return 0
";

/// How long an `offline` presence record is kept (it only suppresses repeats).
const OFFLINE_TTL_SECONDS: u64 = 86_400;

impl RedisBridge {
    /// Starts the bridge thread. Before serving, routes this node left behind (a crash)
    /// are removed and their users get an offline check, so nobody looks online forever.
    pub fn start(
        client: redis::Client,
        settings: BridgeSettings,
        upstream: Arc<Upstream>,
    ) -> std::io::Result<Self> {
        let (requests, inbox) = flume::bounded(BRIDGE_QUEUE_MAX);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("redis-bridge".into())
            .spawn(move || {
                let bridge = Bridge {
                    client,
                    settings: Arc::new(settings),
                    upstream,
                };
                runtime.block_on(bridge.serve(inbox));
            })?;
        Ok(Self { requests })
    }

    /// Checks the deny-list and registers the connection's route, in one round trip.
    /// Fails closed: an error means "refuse".
    pub async fn connect(&self, entry: RouteEntry) -> Result<Admission, Unavailable> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .try_send(Request::Connect { entry, reply })
            .map_err(|_| Unavailable)?;
        answer.await.map_err(|_| Unavailable)?
    }

    /// Removes the connection's route (if still its own) and, when it was the user's last,
    /// starts the offline grace period. Never waits; a full queue leaves the route to expire.
    pub fn disconnect(&self, entry: RouteEntry) {
        if self
            .requests
            .try_send(Request::Disconnect { entry })
            .is_err()
        {
            metrics::counter!("chatify_gateway_bridge_dropped_total", "request" => "disconnect")
                .increment(1);
        }
    }

    /// Rewrites these routes with their last-active times and pushes the TTLs out.
    pub fn refresh_routes(&self, entries: Vec<RouteEntry>) {
        if self
            .requests
            .try_send(Request::Refresh { entries })
            .is_err()
        {
            metrics::counter!("chatify_gateway_bridge_dropped_total", "request" => "refresh")
                .increment(1);
        }
    }
}

struct Bridge {
    client: redis::Client,
    settings: Arc<BridgeSettings>,
    upstream: Arc<Upstream>,
}

impl Bridge {
    async fn serve(self, inbox: flume::Receiver<Request>) {
        // ConnectionManager reconnects by itself after Redis restarts; it is created lazily
        // so the gateway starts (and reports not ready) while Redis is down.
        let mut connection: Option<ConnectionManager> = None;
        let mut cleared = false;
        while let Ok(request) = inbox.recv_async().await {
            if connection.is_none() {
                // The bridge's own LOOKUP_TIMEOUT decides when a registration has failed, so
                // the client's response timeout (redis-rs: 500 ms by default) is set above
                // it: a late answer must not make the manager reconnect, or the removal of
                // a refused connection's route (`remove_unknown_route`) could reach Redis on
                // the new connection before the registration still queued on the old one.
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(LOOKUP_TIMEOUT * 2));
                connection = tokio::time::timeout(
                    LOOKUP_TIMEOUT,
                    self.client.get_connection_manager_with_config(config),
                )
                .await
                .ok()
                .and_then(Result::ok);
            }
            let Some(shared) = connection.clone() else {
                if let Request::Connect { reply, .. } = request {
                    let _ = reply.send(Err(Unavailable));
                }
                continue;
            };
            if !cleared {
                cleared = self.clear_node_routes(shared.clone()).await;
            }
            let settings = Arc::clone(&self.settings);
            let upstream = Arc::clone(&self.upstream);
            // One task per request: requests from many shards pipeline on the connection.
            tokio::spawn(handle(shared, settings, upstream, request));
        }
    }

    /// Removes the routes this node registered before it (last) stopped. True when done.
    async fn clear_node_routes(&self, mut redis: ConnectionManager) -> bool {
        let node = &self.settings.node_id;
        let script = redis::Script::new(CLEAR_NODE_SCRIPT);
        let mut invocation = script.key(keys::node_routes(node));
        invocation
            .arg(format!("{node}|"))
            .arg(keys::user_routes(""));
        let cleared: redis::RedisResult<Vec<String>> = invocation.invoke_async(&mut redis).await;
        match cleared {
            Ok(users) => {
                if !users.is_empty() {
                    tracing::info!(
                        routes = users.len(),
                        "removed routes left by this node's last run"
                    );
                }
                for user in users {
                    tokio::spawn(offline_after_grace(
                        redis.clone(),
                        Arc::clone(&self.settings),
                        Arc::clone(&self.upstream),
                        user,
                        String::new(),
                    ));
                }
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot clear this node's stale routes yet");
                false
            }
        }
    }
}

fn route_value(node_id: &str, entry: &RouteEntry) -> String {
    Route {
        node_id: node_id.to_owned(),
        connection_id: entry.connection_id,
        connected_at_ms: entry.connected_at_ms,
        last_active_ms: entry.last_active_ms,
        token_id: entry.token_id.clone(),
    }
    .encode()
}

/// `node|connection|`: how a route value says which connection owns it.
fn owner_prefix(node_id: &str, connection_id: u64) -> String {
    format!("{node_id}|{connection_id}|")
}

async fn handle(
    mut redis: ConnectionManager,
    settings: Arc<BridgeSettings>,
    upstream: Arc<Upstream>,
    request: Request,
) {
    let node = settings.node_id.as_str();
    match request {
        Request::Connect { entry, reply } => {
            let script = redis::Script::new(CONNECT_SCRIPT);
            let mut invocation = script.key(keys::revoked_token(&entry.token_id));
            invocation
                .key(keys::user_routes(&entry.user_id))
                .key(keys::node_routes(node))
                .key(keys::user_presence(&entry.user_id))
                .arg(&entry.device_id)
                .arg(route_value(node, &entry))
                .arg(format!("{}|{}", entry.user_id, entry.device_id))
                .arg(ROUTE_KEY_TTL_SECONDS);
            let call = invocation.invoke_async::<(i64, i64, Option<String>)>(&mut redis);
            let outcome = match tokio::time::timeout(LOOKUP_TIMEOUT, call).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "route registration failed");
                    let _ = reply.send(Err(Unavailable));
                    remove_unknown_route(&mut redis, node, &entry).await;
                    return;
                }
                Err(_) => {
                    metrics::counter!("chatify_gateway_route_registration_timeouts_total")
                        .increment(1);
                    let _ = reply.send(Err(Unavailable));
                    remove_unknown_route(&mut redis, node, &entry).await;
                    return;
                }
            };
            let (admitted, went_online, previous) = outcome;
            if admitted == 0 {
                let _ = reply.send(Ok(Admission::Revoked));
                return;
            }
            let _ = reply.send(Ok(Admission::Admitted));
            if went_online == 1 {
                publish_presence(&upstream, &settings, &entry, user_event::Kind::Online);
            }
            // The same device connected again (a reconnect before the old socket died, or a
            // second copy of the app): the older connection is closed wherever it lives.
            if let Some(previous) = previous
                .as_deref()
                .and_then(|value| Route::decode(value).ok())
                && !(previous.node_id == node && previous.connection_id == entry.connection_id)
            {
                kick_replaced(&upstream, &settings.topics, &previous);
            }
        }
        Request::Disconnect { entry } => match remove_route(&mut redis, node, &entry).await {
            Ok(0) => {
                offline_after_grace(redis, settings, upstream, entry.user_id, entry.device_id)
                    .await;
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "route removal failed; it will expire"),
        },
        Request::Refresh { entries } => {
            for chunk in entries.chunks(REFRESH_CHUNK) {
                let script = redis::Script::new(REFRESH_SCRIPT);
                let mut invocation = script.key(keys::node_routes(node));
                invocation
                    .arg(keys::user_routes(""))
                    .arg(keys::user_presence(""))
                    .arg(ROUTE_KEY_TTL_SECONDS);
                for entry in chunk {
                    invocation
                        .arg(&entry.user_id)
                        .arg(&entry.device_id)
                        .arg(owner_prefix(node, entry.connection_id))
                        .arg(route_value(node, entry));
                }
                if let Err(error) = invocation.invoke_async::<i64>(&mut redis).await {
                    tracing::warn!(%error, "route refresh failed");
                    metrics::counter!("chatify_gateway_route_refresh_failures_total").increment(1);
                    return;
                }
            }
            metrics::counter!("chatify_gateway_routes_refreshed_total")
                .increment(entries.len() as u64);
        }
    }
}

/// The connection was refused because its registration did not answer in time, but the
/// script may still run (it was sent; Redis was only slow): without this, a route to a
/// connection that never existed would stay until its key expired, pushes for that user
/// would go to nothing and the user would look online. Sent on the same connection after
/// the registration, so Redis runs it after the script; it removes the route only if it is
/// still this connection's (a newer connection of the device keeps its own).
async fn remove_unknown_route(redis: &mut ConnectionManager, node: &str, entry: &RouteEntry) {
    if let Err(error) = remove_route(redis, node, entry).await {
        tracing::warn!(%error, user_id = entry.user_id, "refused connection's route not removed; it will expire");
    }
}

/// Removes the device's route if it is still this connection's; answers how many devices
/// of the user have a route left.
async fn remove_route(
    redis: &mut ConnectionManager,
    node: &str,
    entry: &RouteEntry,
) -> redis::RedisResult<i64> {
    let script = redis::Script::new(DISCONNECT_SCRIPT);
    let mut invocation = script.key(keys::user_routes(&entry.user_id));
    invocation
        .key(keys::node_routes(node))
        .arg(&entry.device_id)
        .arg(owner_prefix(node, entry.connection_id))
        .arg(format!("{}|{}", entry.user_id, entry.device_id));
    invocation.invoke_async::<i64>(redis).await
}

/// After the grace period: if the user has no live route left anywhere, publish offline
/// (once: the presence record says whether it already was).
async fn offline_after_grace(
    mut redis: ConnectionManager,
    settings: Arc<BridgeSettings>,
    upstream: Arc<Upstream>,
    user_id: String,
    device_id: String,
) {
    tokio::time::sleep(Duration::from_millis(settings.presence_grace_ms)).await;
    let routes = match chatify_core::routing::lookup_routes(&mut redis, &[user_id.as_str()]).await {
        Ok(mut routes) => routes.pop().unwrap_or_default(),
        Err(error) => {
            tracing::warn!(%error, user_id, "offline check failed");
            return;
        }
    };
    if !routes.is_empty() {
        return;
    }
    let script = redis::Script::new(OFFLINE_SCRIPT);
    let mut invocation = script.key(keys::user_presence(&user_id));
    invocation.arg(OFFLINE_TTL_SECONDS);
    let changed = invocation.invoke_async::<i64>(&mut redis).await;
    if matches!(changed, Ok(1)) {
        let entry = RouteEntry {
            user_id,
            device_id,
            token_id: String::new(),
            connection_id: 0,
            connected_at_ms: 0,
            last_active_ms: 0,
        };
        publish_presence(&upstream, &settings, &entry, user_event::Kind::Offline);
    }
}

fn publish_presence(
    upstream: &Upstream,
    settings: &BridgeSettings,
    entry: &RouteEntry,
    kind: user_event::Kind,
) {
    let now_ms = unix_now_ms();
    let event = UserEvent {
        event_id: format!("{}:{}:{}", settings.node_id, entry.user_id, now_ms),
        kind: kind.into(),
        user_id: entry.user_id.clone(),
        device_id: entry.device_id.clone(),
        node_id: settings.node_id.clone(),
        timestamp: now_ms as i64,
    };
    let label = match kind {
        user_event::Kind::Online => "online",
        _ => "offline",
    };
    metrics::counter!("chatify_gateway_presence_events_total", "state" => label).increment(1);
    if let Err(error) = upstream.produce(
        &settings.topics.user_events(),
        &entry.user_id,
        &event.encode_to_vec(),
        Pending::Event { kind: "presence" },
    ) {
        tracing::warn!(%error, user_id = entry.user_id, "presence event not produced");
    }
}

fn kick_replaced(upstream: &Upstream, topics: &Topics, previous: &Route) {
    let record = PushRecord {
        connection_ids: vec![previous.connection_id],
        user_ids: Vec::new(),
        frame: Some(ServerFrame {
            frame: Some(server_frame::Frame::Kicked(Kicked {
                reason: REPLACED_REASON.into(),
            })),
        }),
        close_code: Some(1008),
    };
    metrics::counter!("chatify_gateway_replaced_connections_total").increment(1);
    if let Err(error) = upstream.produce(
        &topics.push(&previous.node_id),
        &previous.connection_id.to_string(),
        &record.encode_to_vec(),
        Pending::Event { kind: "kick" },
    ) {
        tracing::warn!(%error, "replaced-connection kick not produced");
    }
}
