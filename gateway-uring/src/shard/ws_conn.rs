//! A WebSocket connection from accept to close (shard-local): upgrade request under the
//! handshake deadline, authentication (401 before the upgrade), then the frame loop that
//! decodes frames in place (the connection's one task also writes: see
//! `lifecycle::Admitted::run`).

use std::future::Future;

use std::rc::Rc;

use bytes::{Buf as _, BytesMut};
use chatify_proto::Message as _;
use chatify_proto::client::v1::ClientFrame;
use monoio::io::{AsyncWriteRentExt as _, OwnedReadHalf, OwnedWriteHalf, Splitable as _};
use monoio::net::TcpStream;

use super::connection::{CloseReason, Connection};
use super::lifecycle::{self, Admitted, HandshakeFailure};
use super::writer::Framing;
use super::{ConnectionSlot, Shard};
use crate::auth::AuthError;
use crate::conn::ws::{self, HttpErrorStatus};
use crate::handler::Transport;

/// The try-it page served at `/` (plain HTML + JS, no build step).
const TRY_IT_PAGE: &str = include_str!("../../static/index.html");

/// The connection's task. Its allocation lives as long as the connection, so it is sized
/// for the frame loop: the handshake ([`start`]: HTTP parsing, the Redis admission, the
/// answers, and the stream itself, 80 B with its cached addresses) is boxed and freed once
/// the connection is admitted, and then the task holds only the frame loop
/// ([`lifecycle::boxed_start_then`]).
pub(super) fn serve(shard: Rc<Shard>, stream: TcpStream) -> impl Future<Output = ()> {
    lifecycle::boxed_start_then(start(shard, stream))
}

/// The handshake of [`serve`]; the frame loop of the admitted connection, or `None` when
/// it was refused.
async fn start(shard: Rc<Shard>, mut stream: TcpStream) -> Option<impl Future<Output = ()>> {
    let (admitted, held) = accept(&shard, &mut stream).await?;
    let (reader, sink) = stream.into_split();
    Some(run(shard, reader, sink, admitted, held))
}

/// Claims a slot, then reads and answers the upgrade request; `None` when the connection
/// was refused. Returns what the client sent after the request, if anything.
async fn accept(shard: &Shard, stream: &mut TcpStream) -> Option<(Admitted, Option<BytesMut>)> {
    let refusal = || {
        http_error(
            HttpErrorStatus::ServiceUnavailable,
            "connection limit reached",
        )
    };
    let slot = lifecycle::claim_slot(shard, stream, refusal).await?;
    let mut held = None;
    let result = upgrade(shard, stream, slot, &mut held).await;
    // Bytes after the request are kept for the frame loop; an emptied buffer goes back.
    lifecycle::release_read_buffer(shard, &mut held);
    let admitted = result?;
    Some((admitted, held))
}

/// Reads and answers the upgrade request; `None` when the connection was refused.
async fn upgrade(
    shard: &Shard,
    stream: &mut TcpStream,
    slot: ConnectionSlot,
    held: &mut Option<BytesMut>,
) -> Option<Admitted> {
    let parse = |buffer: &mut BytesMut| {
        let parsed = ws::parse_upgrade(buffer)?;
        Ok::<_, ws::HandshakeError>(parsed.map(|(request, consumed)| {
            buffer.advance(consumed);
            request
        }))
    };
    let request = match lifecycle::read_handshake(shard, stream, held, parse).await {
        Ok(request) => request,
        Err(HandshakeFailure::Invalid(
            ws::HandshakeError::NotWebSocketUpgrade | ws::HandshakeError::NoConnectionUpgrade,
        )) if ws::plain_get_path(held.as_deref().unwrap_or_default()).as_deref() == Some("/") => {
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
            Some(admitted)
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

/// The frame loop: the connection's task from admission to close (see [`Admitted::run`]),
/// with what WebSocket adds: the frame decoder and what each message means.
fn run(
    shard: Rc<Shard>,
    reader: OwnedReadHalf<TcpStream>,
    sink: OwnedWriteHalf<TcpStream>,
    admitted: Admitted,
    held: Option<BytesMut>,
) -> impl Future<Output = ()> {
    let mut connection = Connection::new(Rc::clone(&admitted.live), Transport::WebSocketText);
    let mut decoder =
        ws::FrameDecoder::new(shard.limits.frame_bytes_max, shard.limits.message_bytes_max);
    let on_bytes = move |shard: &Shard, buffer: &mut BytesMut| {
        // Every complete message read so far, in order.
        while let Some(message) = decoder.decode(buffer).map_err(|error| {
            metrics::counter!("chatify_gateway_refusals_total", "reason" => "ws_protocol")
                .increment(1);
            CloseReason::new(error.close_code(), error.reason())
        })? {
            on_message(shard, &mut connection, message).inspect_err(|close| {
                if close.code == 1007 {
                    metrics::counter!("chatify_gateway_refusals_total", "reason" => "invalid_frame")
                        .increment(1);
                }
            })?;
        }
        Ok(())
    };
    admitted.run(shard, reader, sink, held, on_bytes)
}

/// One decoded message; `Err` closes the connection with that reason.
fn on_message(
    shard: &Shard,
    connection: &mut Connection,
    message: ws::Message,
) -> Result<(), CloseReason> {
    match message {
        ws::Message::Text(payload) => {
            // simd-json parses in place: in the shard's scratch copy of the payload.
            let frame = shard.buffers.with_json_scratch(
                &payload,
                chatify_proto::json::decode_client_frame_with_buffers,
            );
            match frame {
                Ok(frame) => connection.on_frame(shard, Transport::WebSocketText, frame),
                Err(_) => Err(CloseReason::new(1007, "invalid json frame")),
            }
        }
        ws::Message::Binary(payload) => match ClientFrame::decode(payload) {
            Ok(ClientFrame { frame: Some(frame) }) => {
                connection.on_frame(shard, Transport::WebSocketBinary, frame)
            }
            Ok(ClientFrame { frame: None }) => Err(CloseReason::new(1007, "empty protobuf frame")),
            Err(_) => Err(CloseReason::new(1007, "invalid protobuf frame")),
        },
        ws::Message::Ping(payload) => {
            connection.queue().push_control(ws::Opcode::Pong, payload);
            Ok(())
        }
        ws::Message::Pong(_) => Ok(()),
        // Echo the client's status code (the decoder accepted only valid ones).
        ws::Message::Close(Some((code, _))) => Err(CloseReason::new(code, "closing")),
        ws::Message::Close(None) => Err(CloseReason::new(1000, "closing")),
    }
}
