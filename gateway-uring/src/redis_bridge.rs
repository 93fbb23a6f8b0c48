//! The gateway's Redis client. Redis is only touched on the cold path (token deny-list at
//! connect; routes with part 2), so instead of a Redis client per shard the shards send
//! requests over one bounded channel to a thread running a small tokio runtime with one
//! multiplexed connection (concurrent lookups pipeline on it). Crosses shards: the sender
//! half is cloned into every shard.

use std::time::Duration;

use futures::channel::oneshot;

/// Most lookups waiting for the bridge; beyond that a connect is refused as unavailable
/// rather than queued without bound.
pub const BRIDGE_QUEUE_MAX: usize = 4096;
/// Longest a deny-list lookup may take.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The deny-list could not be consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("redis unavailable")]
pub struct Unavailable;

enum Request {
    IsRevoked {
        jti: String,
        reply: oneshot::Sender<Result<bool, Unavailable>>,
    },
}

/// Handle the shards use; cheap to clone.
#[derive(Debug, Clone)]
pub struct RedisBridge {
    requests: flume::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::IsRevoked { jti, .. } => f.debug_struct("IsRevoked").field("jti", jti).finish(),
        }
    }
}

impl RedisBridge {
    /// Starts the bridge thread.
    pub fn start(client: redis::Client) -> std::io::Result<Self> {
        let (requests, inbox) = flume::bounded(BRIDGE_QUEUE_MAX);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("redis-bridge".into())
            .spawn(move || runtime.block_on(serve(client, inbox)))?;
        Ok(Self { requests })
    }

    /// Whether the token id is on the deny-list. Fails closed: an error means "refuse".
    pub async fn is_revoked(&self, jti: &str) -> Result<bool, Unavailable> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .try_send(Request::IsRevoked {
                jti: jti.to_owned(),
                reply,
            })
            .map_err(|_| Unavailable)?;
        answer.await.map_err(|_| Unavailable)?
    }
}

async fn serve(client: redis::Client, inbox: flume::Receiver<Request>) {
    // ConnectionManager reconnects by itself after Redis restarts; it is created lazily so
    // the gateway starts (and reports not ready) while Redis is down.
    let mut connection: Option<redis::aio::ConnectionManager> = None;
    while let Ok(request) = inbox.recv_async().await {
        if connection.is_none() {
            connection = tokio::time::timeout(LOOKUP_TIMEOUT, client.get_connection_manager())
                .await
                .ok()
                .and_then(Result::ok);
        }
        let Some(shared) = connection.clone() else {
            answer(request, Err(Unavailable));
            continue;
        };
        // One task per request: lookups from many shards pipeline on the connection.
        tokio::spawn(async move {
            let mut shared = shared;
            match request {
                Request::IsRevoked { jti, reply } => {
                    let mut command = redis::cmd("EXISTS");
                    command.arg(chatify_core::keys::revoked_token(&jti));
                    let lookup = command.query_async::<bool>(&mut shared);
                    let result = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
                        Ok(Ok(revoked)) => Ok(revoked),
                        Ok(Err(error)) => {
                            tracing::warn!(%error, "deny-list lookup failed");
                            Err(Unavailable)
                        }
                        Err(_) => Err(Unavailable),
                    };
                    let _ = reply.send(result);
                }
            }
        });
    }
}

fn answer(request: Request, result: Result<bool, Unavailable>) {
    match request {
        Request::IsRevoked { reply, .. } => {
            let _ = reply.send(result);
        }
    }
}
