//! fastwebsockets peer for the JSON `ping` benchmark (issue 7): tokio + hyper's HTTP/1
//! upgrade + fastwebsockets, the way its README's echo server is written, doing the
//! per-connection work `gateway-uring` does for pings.
//!
//! `GET /ws` is upgraded only when the HS256 token (`Authorization: Bearer` or `?token=`)
//! verifies with `JWT_SECRET` through the gateway's own `gateway_uring::auth::Authenticator`;
//! the identity is kept for the connection's life. Each text frame (fragments collected) is
//! parsed with `chatify_proto::json::decode_client_frame`; a `ping` is answered with a JSON
//! `pong` echoing its timestamp (one `write_frame` per reply, fastwebsockets has no batching).
//! Invalid JSON closes the connection with 1007, as the gateway does.
//!
//! Not done here, unlike the gateway: the Redis token deny-list check at connect, connection
//! limits, idle timeouts and metrics. None of it is on the per-ping path.

use std::net::SocketAddr;

use anyhow::Context as _;
use chatify_proto::client::v1::{
    Pong, client_frame::Frame as ClientFrame, server_frame::Frame as ServerFrame,
};
use clap::Parser;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload, WebSocketError, upgrade};
use gateway_uring::auth::{Authenticator, Identity};
use http_body_util::Empty;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Largest accepted message, the gateway's default frame limit.
const FRAME_BYTES_MAX: usize = 64 * 1024;
/// Close code for a text frame that is not a valid JSON client frame (RFC 6455 §7.4.1).
const CLOSE_INVALID_PAYLOAD: u16 = 1007;

#[derive(Debug, Parser)]
#[command(about = "tokio + fastwebsockets peer for the JSON ping benchmark")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18091")]
    listen: SocketAddr,
    /// HS256 secret, the gateway's `JWT_SECRET`.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// Runtime worker threads; 0 means one per available core (tokio's default).
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
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
    eprintln!(
        "ws_ping_fastwebsockets listening on ws://{}/ws",
        args.listen
    );
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
        if let Err(error) = stream.set_nodelay(true) {
            eprintln!("TCP_NODELAY: {error}");
        }
        let verifier = verifier.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| upgrade_request(request, verifier.clone()));
            let connection = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(error) = connection.await {
                eprintln!("http: {error}");
            }
        });
    }
}

/// The token to verify: the `Authorization: Bearer` header wins over `?token=`.
fn token(request: &Request<Incoming>) -> Option<String> {
    let bearer = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer") && !token.is_empty())
        .map(|(_, token)| token.trim().to_owned());
    bearer.or_else(|| {
        request
            .uri()
            .query()?
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .map(str::to_owned)
    })
}

fn refusal(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = status;
    response
}

async fn upgrade_request(
    mut request: Request<Incoming>,
    verifier: Authenticator,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    if request.uri().path() != "/ws" {
        return Ok(refusal(StatusCode::NOT_FOUND));
    }
    let identity = match token(&request).map(|token| verifier.verify(&token)) {
        Some(Ok(identity)) => identity,
        _ => return Ok(refusal(StatusCode::UNAUTHORIZED)),
    };
    let (response, upgraded) = upgrade::upgrade(&mut request)?;
    tokio::spawn(async move {
        if let Err(error) = connection(upgraded, identity).await {
            eprintln!("connection: {error}");
        }
    });
    Ok(response)
}

async fn connection(upgraded: upgrade::UpgradeFut, identity: Identity) -> anyhow::Result<()> {
    let mut ws = upgraded.await.context("upgrade")?;
    ws.set_max_message_size(FRAME_BYTES_MAX);
    let mut ws = FragmentCollector::new(ws);
    // Held for the connection's life, as the gateway holds it (sender of what it sends).
    let _identity = identity;
    loop {
        let frame = match ws.read_frame().await {
            Ok(frame) => frame,
            Err(WebSocketError::ConnectionClosed | WebSocketError::UnexpectedEOF) => {
                return Ok(());
            }
            Err(error) => return Err(error).context("read frame"),
        };
        match frame.opcode {
            OpCode::Text => {
                let reply = match chatify_proto::json::decode_client_frame(&frame.payload) {
                    Ok(ClientFrame::Ping(ping)) => ServerFrame::Pong(Pong {
                        timestamp: ping.timestamp,
                    }),
                    Ok(_) => continue,
                    Err(_) => {
                        let close = Frame::close(CLOSE_INVALID_PAYLOAD, b"invalid JSON frame");
                        let _ = ws.write_frame(close).await;
                        return Ok(());
                    }
                };
                let json = chatify_proto::json::encode_server_frame(&reply);
                ws.write_frame(Frame::text(Payload::Owned(json)))
                    .await
                    .context("write reply")?;
            }
            OpCode::Close => return Ok(()),
            // Pings are answered by fastwebsockets itself (auto pong); binary is not spoken.
            _ => {}
        }
    }
}
