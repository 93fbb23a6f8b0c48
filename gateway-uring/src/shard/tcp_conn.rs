//! A TCP connection (shard-local): 4-byte big-endian length + protobuf frames; the first
//! frame must be `auth` within the handshake deadline. There are no close codes on plain
//! TCP, so every refusal is an `error` frame followed by closing the socket.

use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use chatify_proto::Message as _;
use chatify_proto::client::v1::{
    AuthOk, ClientFrame, ErrorCode, ServerFrame, client_frame, server_frame,
};
use monoio::io::{AsyncWriteRentExt as _, Splitable as _};
use monoio::net::TcpStream;

use super::Shard;
use super::connection::{CloseReason, Connection};
use super::lifecycle::{self, Admitted, HandshakeFailure, ReadEnd};
use super::writer::Framing;
use crate::conn::tcp::{LengthDecoder, length_prefix};
use crate::handler::Transport;

fn error_frame(code: ErrorCode, reason: &str) -> Bytes {
    let frame = ServerFrame {
        frame: Some(server_frame::Frame::Error(
            chatify_proto::client::v1::Error {
                code: code.into(),
                reason: reason.to_owned(),
                client_msg_id: None,
                request_id: None,
            },
        )),
    };
    let payload = frame.encode_to_vec();
    let mut framed = Vec::with_capacity(payload.len() + 4);
    framed.extend_from_slice(&length_prefix(payload.len()));
    framed.extend_from_slice(&payload);
    Bytes::from(framed)
}

/// The connection's task, sized for the frame loop: the authentication's larger futures are
/// boxed and freed once the connection is admitted (see `ws_conn::serve`).
pub(super) async fn serve(shard: Rc<Shard>, mut stream: TcpStream) {
    let mut held = None;
    let admitted = Box::pin(authenticate(&shard, &mut stream, &mut held)).await;
    // Bytes after the auth frame are kept for the frame loop; an emptied buffer goes back.
    lifecycle::release_read_buffer(&shard, &mut held);
    let Some(admitted) = admitted else {
        if let Some(buffer) = held.take() {
            shard.buffers.give(buffer);
        }
        return;
    };
    let decoder = LengthDecoder::new(shard.limits.frame_bytes_max);
    run(shard, stream, admitted, held, decoder).await;
}

/// Claims a slot, reads the `auth` frame, verifies and admits the connection and answers
/// `auth_ok`; `None` when the connection was refused (the reason was written).
async fn authenticate(
    shard: &Shard,
    stream: &mut TcpStream,
    held: &mut Option<BytesMut>,
) -> Option<Admitted> {
    let refusal = || error_frame(ErrorCode::Unavailable, "connection limit reached");
    let slot = lifecycle::claim_slot(shard, stream, refusal).await?;
    let mut decoder = LengthDecoder::new(shard.limits.frame_bytes_max);
    // The auth frame.
    let decode = |buffer: &mut BytesMut| decoder.decode(buffer);
    let payload = match lifecycle::read_handshake(shard, stream, held, decode).await {
        Ok(payload) => payload,
        Err(HandshakeFailure::Invalid(error)) => {
            let _ = stream
                .write_all(error_frame(ErrorCode::BadRequest, error.reason()))
                .await;
            return None;
        }
        Err(HandshakeFailure::TimedOut) => {
            let _ = stream
                .write_all(error_frame(ErrorCode::Unauthorized, "auth timeout"))
                .await;
            return None;
        }
        Err(HandshakeFailure::Closed) => return None,
    };
    let token = match ClientFrame::decode(payload) {
        Ok(ClientFrame {
            frame: Some(client_frame::Frame::Auth(auth)),
        }) => auth.token,
        _ => {
            let _ = stream
                .write_all(error_frame(
                    ErrorCode::Unauthorized,
                    "the first frame must be auth",
                ))
                .await;
            return None;
        }
    };
    let admitted = match lifecycle::verify(shard, &token) {
        Ok(identity) => lifecycle::admit(shard, identity, Framing::Tcp, slot).await,
        Err(error) => Err(error),
    };
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(error) => {
            let code = if error == crate::auth::AuthError::Unavailable {
                ErrorCode::Unavailable
            } else {
                ErrorCode::Unauthorized
            };
            let _ = stream
                .write_all(error_frame(code, &error.to_string()))
                .await;
            return None;
        }
    };
    // `auth_ok` is written before the writer starts, so it precedes any push.
    let identity = &admitted.live.identity;
    let auth_ok = ServerFrame {
        frame: Some(server_frame::Frame::AuthOk(AuthOk {
            user_id: identity.user_id.clone(),
            device_id: identity.device_id.clone(),
        })),
    }
    .encode_to_vec();
    let mut framed = Vec::with_capacity(auth_ok.len() + 4);
    framed.extend_from_slice(&length_prefix(auth_ok.len()));
    framed.extend_from_slice(&auth_ok);
    let (written, _) = stream.write_all(framed).await;
    if written.is_err() {
        admitted.abandon(shard);
        return None;
    }
    Some(admitted)
}

/// The frame loop; like the WebSocket one, it holds a read buffer only while bytes are in
/// hand (see `ws_conn::run`).
async fn run(
    shard: Rc<Shard>,
    stream: TcpStream,
    admitted: Admitted,
    mut held: Option<BytesMut>,
    mut decoder: LengthDecoder,
) {
    let (mut reader, write_half) = stream.into_split();
    let registered = admitted.start(&shard, write_half);
    let mut connection = Connection::new(Rc::clone(&registered.live), Transport::Tcp);
    let mut close = None;

    while close.is_none() {
        while let Some(buffer) = held.as_mut() {
            let payload = match decoder.decode(buffer) {
                Ok(Some(payload)) => payload,
                Ok(None) => break,
                Err(error) => {
                    let _ = connection.reply(tcp_error(ErrorCode::TooLarge, error.reason()));
                    close = Some(CloseReason::new(1009, "frame too large"));
                    break;
                }
            };
            let outcome = match ClientFrame::decode(payload) {
                Ok(ClientFrame { frame: Some(frame) }) => {
                    connection.on_frame(&shard, Transport::Tcp, frame)
                }
                _ => {
                    let _ = connection
                        .reply(tcp_error(ErrorCode::BadRequest, "invalid protobuf frame"));
                    Err(CloseReason::new(1007, "invalid protobuf frame"))
                }
            };
            if let Err(reason) = outcome {
                close = Some(reason);
                break;
            }
        }
        lifecycle::release_read_buffer(&shard, &mut held);
        if close.is_some() || connection.queue.is_finished() {
            break;
        }
        if lifecycle::read_or_heartbeat_timeout(&shard, &registered.live, &mut reader, &mut held)
            .await
            != ReadEnd::Data
        {
            break;
        }
        connection.touch(chatify_core::routing::unix_now_ms());
    }
    if let Some(buffer) = held.take() {
        shard.buffers.give(buffer);
    }
    let reason = close.unwrap_or(CloseReason::new(1000, "closing"));
    registered.close(&shard, reason, reader).await;
}

fn tcp_error(code: ErrorCode, reason: &str) -> server_frame::Frame {
    server_frame::Frame::Error(chatify_proto::client::v1::Error {
        code: code.into(),
        reason: reason.to_owned(),
        client_msg_id: None,
        request_id: None,
    })
}
