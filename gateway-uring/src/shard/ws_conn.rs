//! A WebSocket connection from accept to close (shard-local): upgrade request under the
//! handshake deadline, authentication (401 before the upgrade), then the read loop that
//! decodes frames in place and the writer task that owns the write half.

use std::rc::Rc;

use bytes::{Buf as _, BytesMut};
use chatify_proto::Message as _;
use chatify_proto::client::v1::ClientFrame;
use monoio::io::{AsyncWriteRentExt as _, Splitable as _};
use monoio::net::TcpStream;

use super::connection::{CloseReason, Connection};
use super::lifecycle::{self, Admitted, HandshakeFailure, ReadEnd};
use super::writer::Framing;
use super::{ConnectionSlot, Shard};
use crate::auth::AuthError;
use crate::conn::ws::{self, HttpErrorStatus};
use crate::handler::Transport;
use chatify_core::routing::unix_now_ms;

/// The try-it page served at `/` (plain HTML + JS, no build step).
const TRY_IT_PAGE: &str = include_str!("../../static/index.html");

pub(super) async fn serve(shard: Rc<Shard>, mut stream: TcpStream, _peer: std::net::SocketAddr) {
    let refusal = || {
        http_error(
            HttpErrorStatus::ServiceUnavailable,
            "connection limit reached",
        )
    };
    let Some(slot) = lifecycle::claim_slot(&shard, &mut stream, refusal).await else {
        return;
    };
    let Some((admitted, buffer)) = upgrade(&shard, &mut stream, slot).await else {
        return;
    };
    run(shard, stream, admitted, buffer).await;
}

/// Reads and answers the upgrade request; `None` when the connection was refused.
async fn upgrade(
    shard: &Shard,
    stream: &mut TcpStream,
    slot: ConnectionSlot,
) -> Option<(Admitted, BytesMut)> {
    let mut buffer = BytesMut::with_capacity(4096);
    let parse = |buffer: &mut BytesMut| {
        let parsed = ws::parse_upgrade(buffer)?;
        Ok::<_, ws::HandshakeError>(parsed.map(|(request, consumed)| {
            buffer.advance(consumed);
            request
        }))
    };
    let request = match lifecycle::read_handshake(shard, stream, &mut buffer, parse).await {
        Ok(request) => request,
        Err(HandshakeFailure::Invalid(
            ws::HandshakeError::NotWebSocketUpgrade | ws::HandshakeError::NoConnectionUpgrade,
        )) if ws::plain_get_path(&buffer).as_deref() == Some("/") => {
            // A browser asking for the try-it page.
            metrics::counter!("chatify_gateway_page_served_total").increment(1);
            let mut response = BytesMut::new();
            ws::encode_html_response(TRY_IT_PAGE, &mut response);
            let _ = stream.write_all(response).await;
            return None;
        }
        Err(HandshakeFailure::Invalid(error)) => {
            metrics::counter!("chatify_gateway_refusals_total", "reason" => "bad_handshake")
                .increment(1);
            let mut response = BytesMut::new();
            error.encode_response(&mut response);
            let _ = stream.write_all(response).await;
            return None;
        }
        Err(HandshakeFailure::TimedOut) => {
            let _ = stream
                .write_all(http_error(
                    HttpErrorStatus::RequestTimeout,
                    "handshake timeout",
                ))
                .await;
            return None;
        }
        Err(HandshakeFailure::Closed) => return None,
    };
    if request.path != "/ws" {
        let _ = stream
            .write_all(http_error(
                HttpErrorStatus::NotFound,
                "websocket endpoint is /ws",
            ))
            .await;
        return None;
    }
    let admitted = match lifecycle::verify(shard, request.token().unwrap_or("")) {
        Ok(identity) => lifecycle::admit(shard, identity, Framing::WebSocket, slot).await,
        Err(error) => Err(error),
    };
    match admitted {
        Ok(admitted) => {
            let mut response = BytesMut::new();
            ws::encode_switching_protocols(&request.sec_websocket_key, &mut response);
            let (result, _) = stream.write_all(response).await;
            if result.is_err() {
                admitted.abandon(shard);
                return None;
            }
            Some((admitted, buffer))
        }
        Err(error) => {
            let status = if error == AuthError::Unavailable {
                HttpErrorStatus::ServiceUnavailable
            } else {
                HttpErrorStatus::Unauthorized
            };
            let _ = stream
                .write_all(http_error(status, error_text(error)))
                .await;
            None
        }
    }
}

fn http_error(status: HttpErrorStatus, body: &str) -> BytesMut {
    let mut response = BytesMut::new();
    ws::encode_error_response(status, body, &mut response);
    response
}

fn error_text(error: AuthError) -> &'static str {
    match error {
        AuthError::Missing => "missing token",
        AuthError::Malformed => "malformed token",
        AuthError::Algorithm => "token algorithm not allowed",
        AuthError::Signature => "bad token signature",
        AuthError::Expired => "token expired",
        AuthError::NotYetValid => "token not yet valid",
        AuthError::Claims => "token claims invalid",
        AuthError::Revoked => "token revoked",
        AuthError::Unavailable => "authentication unavailable, retry later",
    }
}

async fn run(shard: Rc<Shard>, stream: TcpStream, admitted: Admitted, mut buffer: BytesMut) {
    let (mut reader, write_half) = stream.into_split();
    let registered = admitted.start(write_half);
    let queue = registered.live.queue.clone();
    let mut connection = Connection::new(Rc::clone(&registered.live), Transport::WebSocketText);
    let mut json_scratch: Vec<u8> = Vec::with_capacity(1024);
    let mut decoder =
        ws::FrameDecoder::new(shard.limits.frame_bytes_max, shard.limits.message_bytes_max);

    let close = 'connection: loop {
        // Every complete message already in the buffer, in order.
        loop {
            let message = match decoder.decode(&mut buffer) {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(error) => {
                    metrics::counter!("chatify_gateway_refusals_total", "reason" => "ws_protocol")
                        .increment(1);
                    break 'connection CloseReason::new(error.close_code(), error.reason());
                }
            };
            let outcome = match message {
                ws::Message::Text(payload) => {
                    // simd-json parses in place, so the payload is copied into a scratch
                    // buffer reused for the life of the connection (no allocation per frame).
                    json_scratch.clear();
                    json_scratch.extend_from_slice(&payload);
                    match chatify_proto::json::decode_client_frame_in_place(&mut json_scratch) {
                        Ok(frame) => connection.on_frame(&shard, Transport::WebSocketText, frame),
                        Err(_) => Err(CloseReason::new(1007, "invalid json frame")),
                    }
                }
                ws::Message::Binary(payload) => match ClientFrame::decode(payload) {
                    Ok(ClientFrame { frame: Some(frame) }) => {
                        connection.on_frame(&shard, Transport::WebSocketBinary, frame)
                    }
                    Ok(ClientFrame { frame: None }) => {
                        Err(CloseReason::new(1007, "empty protobuf frame"))
                    }
                    Err(_) => Err(CloseReason::new(1007, "invalid protobuf frame")),
                },
                ws::Message::Ping(payload) => {
                    queue.push_control(ws::Opcode::Pong, payload);
                    Ok(())
                }
                ws::Message::Pong(_) => Ok(()),
                // Echo the client's status code (the decoder accepted only valid ones).
                ws::Message::Close(Some((code, _))) => Err(CloseReason::new(code, "closing")),
                ws::Message::Close(None) => Err(CloseReason::new(1000, "closing")),
            };
            if let Err(close) = outcome {
                if close.code == 1007 {
                    metrics::counter!("chatify_gateway_refusals_total", "reason" => "invalid_frame")
                        .increment(1);
                }
                break 'connection close;
            }
        }
        if queue.is_finished() {
            break CloseReason::new(1000, "write side closed");
        }
        match lifecycle::read_or_heartbeat_timeout(&shard, &mut reader, &mut buffer).await {
            ReadEnd::Data => connection.touch(unix_now_ms()),
            ReadEnd::TimedOut => break CloseReason::new(1000, "heartbeat timeout"),
            ReadEnd::Closed => break CloseReason::new(1000, "peer gone"),
        }
    };
    registered.close(&shard, close, reader).await;
}
