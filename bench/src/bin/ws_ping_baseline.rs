//! Baseline WebSocket server for the JSON `ping` benchmark (issue 3): tokio (multi-thread
//! runtime) + tokio-tungstenite doing the per-connection work `gateway-uring` does for pings.
//!
//! `GET /ws` is refused with 401 unless the HS256 token (`Authorization: Bearer`, else
//! `?token=`) verifies with `JWT_SECRET` through the gateway's own
//! `gateway_uring::auth::Authenticator`, so both servers do the same JWT work per connection. Each text frame is parsed with
//! `chatify_proto::json::decode_client_frame`; a `ping` is answered with a JSON `pong`
//! echoing its timestamp. Replies to frames that are already readable are batched (`feed`)
//! and written with one `flush`.
//!
//! Not done here, unlike the gateway: the Redis token deny-list check at connect, connection
//! limits, idle timeouts and metrics. None of it is on the per-ping path.

use std::net::SocketAddr;

use anyhow::Context as _;
use chatify_proto::client::v1::{
    Pong, client_frame::Frame as ClientFrame, server_frame::Frame as ServerFrame,
};
use clap::Parser;
use futures::{FutureExt as _, SinkExt as _, StreamExt as _};
use gateway_uring::auth::Authenticator;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{
    self, Message,
    handshake::server::{ErrorResponse, Request, Response},
    http::StatusCode,
    protocol::WebSocketConfig,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Largest accepted frame, as the gateway's default limit order of magnitude.
const FRAME_BYTES_MAX: usize = 64 * 1024;
/// Frames answered before a flush is forced even if more are readable.
const REPLY_BATCH_MAX: usize = 64;

#[derive(Debug, Parser)]
#[command(about = "tokio + tokio-tungstenite baseline for the JSON ping benchmark")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18090")]
    listen: SocketAddr,
    /// HS256 secret, the gateway's `JWT_SECRET`.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// Runtime worker threads; 0 means one per available core (tokio's default).
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
}

fn token_from_query(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.jwt_secret.len() < gateway_uring::config::JWT_SECRET_BYTES_MIN {
        anyhow::bail!("JWT_SECRET must be at least 32 bytes");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if args.worker_threads > 0 {
        builder.worker_threads(args.worker_threads);
    }
    let runtime = builder.build().context("build tokio runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    eprintln!("ws_ping_baseline listening on ws://{}/ws", args.listen);
    let verifier = Authenticator::hs256(args.jwt_secret.as_bytes());
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: keep serving the connections we have.
                eprintln!("accept: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let verifier = verifier.clone();
        tokio::spawn(async move {
            if let Err(error) = connection(stream, verifier).await {
                eprintln!("connection: {error}");
            }
        });
    }
}

async fn connection(stream: TcpStream, verifier: Authenticator) -> anyhow::Result<()> {
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    #[allow(
        clippy::result_large_err,
        reason = "the error type is fixed by tungstenite's handshake callback"
    )]
    let callback = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        let refuse = |status: StatusCode, body: &str| {
            let mut refusal = ErrorResponse::new(Some(body.to_owned()));
            *refusal.status_mut() = status;
            refusal
        };
        if request.uri().path() != "/ws" {
            return Err(refuse(StatusCode::NOT_FOUND, "not found"));
        }
        let bearer = request
            .headers()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer") && !token.is_empty())
            .map(|(_, token)| token.trim());
        match bearer.or_else(|| token_from_query(request.uri().query())) {
            Some(token) if verifier.verify(token).is_ok() => Ok(response),
            _ => Err(refuse(StatusCode::UNAUTHORIZED, "unauthorized")),
        }
    };
    let config = WebSocketConfig::default()
        .max_frame_size(Some(FRAME_BYTES_MAX))
        .max_message_size(Some(FRAME_BYTES_MAX));
    let mut ws =
        match tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
        {
            Ok(ws) => ws,
            // A refused upgrade has been answered already; nothing more to do.
            Err(tungstenite::Error::Http(_)) => return Ok(()),
            Err(error) => return Err(error).context("websocket handshake"),
        };

    while let Some(first) = ws.next().await {
        let mut next = Some(first);
        let mut replies = 0;
        while let Some(message) = next.take() {
            let message = match message {
                Ok(message) => message,
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::Protocol(_)) => {
                    return Ok(());
                }
                Err(error) => return Err(error).context("read frame"),
            };
            match message {
                Message::Text(text) => {
                    let reply = match chatify_proto::json::decode_client_frame(text.as_bytes()) {
                        Ok(ClientFrame::Ping(ping)) => Some(ServerFrame::Pong(Pong {
                            timestamp: ping.timestamp,
                        })),
                        Ok(_) => None,
                        Err(_) => {
                            // The gateway closes with 1007 on an invalid JSON frame.
                            let _ = ws.close(None).await;
                            return Ok(());
                        }
                    };
                    if let Some(reply) = reply {
                        let json = chatify_proto::json::encode_server_frame(&reply);
                        let json = String::from_utf8(json).expect("serde_json writes UTF-8");
                        ws.feed(Message::text(json)).await.context("queue reply")?;
                        replies += 1;
                    }
                }
                Message::Close(_) => return Ok(()),
                // WebSocket pings are answered by tungstenite itself; nothing else is expected.
                _ => {}
            }
            if replies < REPLY_BATCH_MAX {
                // Take the next frame only if it is already readable, else flush what we have.
                next = match ws.next().now_or_never() {
                    Some(Some(message)) => Some(message),
                    Some(None) => {
                        let _ = ws.flush().await;
                        return Ok(());
                    }
                    None => None,
                };
            }
        }
        ws.flush().await.context("write replies")?;
    }
    Ok(())
}
