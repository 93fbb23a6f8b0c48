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

use super::connection::{CloseReason, Connection};
use super::lifecycle::{self, HandshakeFailure, ReadEnd};
use super::writer::Framing;
use super::{ConnectionSlot, Shard};
use crate::auth::Identity;
use crate::conn::tcp::{LengthDecoder, length_prefix};
use crate::handler::{ConnectionContext, Transport};

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

pub(super) async fn serve(shard: Rc<Shard>, mut stream: TcpStream, _peer: std::net::SocketAddr) {
    let refusal = || error_frame(ErrorCode::Unavailable, "connection limit reached");
    let Some(slot) = lifecycle::claim_slot(&shard, &mut stream, refusal).await else {
        return;
    };
    let mut decoder = LengthDecoder::new(shard.limits.frame_bytes_max);
    let mut buffer = BytesMut::with_capacity(4096);
    // The auth frame.
    let decode = |buffer: &mut BytesMut| decoder.decode(buffer);
    let payload = match lifecycle::read_handshake(&shard, &mut stream, &mut buffer, decode).await {
        Ok(payload) => payload,
        Err(HandshakeFailure::Invalid(error)) => {
            let _ = stream
                .write_all(error_frame(ErrorCode::BadRequest, error.reason()))
                .await;
            return;
        }
        Err(HandshakeFailure::TimedOut) => {
            let _ = stream
                .write_all(error_frame(ErrorCode::Unauthorized, "auth timeout"))
                .await;
            return;
        }
        Err(HandshakeFailure::Closed) => return,
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
            return;
        }
    };
    let identity = match lifecycle::authenticate(&shard, &token).await {
        Ok(identity) => identity,
        Err(error) => {
            let code = if error == crate::auth::AuthError::Unavailable {
                ErrorCode::Unavailable
            } else {
                ErrorCode::Unauthorized
            };
            let _ = stream
                .write_all(error_frame(code, &error.to_string()))
                .await;
            return;
        }
    };
    run(shard, stream, identity, buffer, decoder, slot).await;
}

async fn run(
    shard: Rc<Shard>,
    stream: TcpStream,
    identity: Identity,
    mut buffer: BytesMut,
    mut decoder: LengthDecoder,
    slot: ConnectionSlot,
) {
    let (mut reader, write_half) = stream.into_split();
    let registered = lifecycle::register(&shard, Framing::Tcp, write_half, slot);
    let queue = registered.queue.clone();
    let auth_ok = server_frame::Frame::AuthOk(AuthOk {
        user_id: identity.user_id.clone(),
        device_id: identity.device_id.clone(),
    });
    let context = ConnectionContext {
        connection_id: registered.connection_id,
        identity,
        transport: Transport::Tcp,
    };
    let mut connection = Connection::new(context, queue.clone());
    let mut close = connection.reply(auth_ok).err();

    while close.is_none() {
        loop {
            let payload = match decoder.decode(&mut buffer) {
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
                    connection.on_frame(&shard, Transport::Tcp, frame).await
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
        if close.is_some() || queue.is_finished() {
            break;
        }
        if lifecycle::read_or_heartbeat_timeout(&shard, &mut reader, &mut buffer).await
            != ReadEnd::Data
        {
            break;
        }
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
