//! A TCP connection (shard-local): 4-byte big-endian length + protobuf frames; the first
//! frame must be `auth` within the handshake deadline. There are no close codes on plain
//! TCP, so every refusal is an `error` frame followed by closing the socket.

use std::future::Future;

use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use chatify_proto::Message as _;
use chatify_proto::client::v1::{
    AuthOk, ClientFrame, ErrorCode, ServerFrame, client_frame, server_frame,
};
use monoio::io::{AsyncWriteRentExt as _, OwnedReadHalf, OwnedWriteHalf, Splitable as _};
use monoio::net::TcpStream;

use super::Shard;
use super::connection::{CloseReason, Connection};
use super::lifecycle::{self, Admitted, HandshakeFailure};
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

/// The connection's task, sized for the frame loop: the authentication (and the stream
/// until it is split) is boxed and freed once the connection is admitted (see
/// `ws_conn::serve`).
pub(super) fn serve(shard: Rc<Shard>, stream: TcpStream) -> impl Future<Output = ()> {
    lifecycle::boxed_start_then(start(shard, stream))
}

/// The authentication of [`serve`]; the frame loop of the admitted connection, or `None`
/// when it was refused.
async fn start(shard: Rc<Shard>, mut stream: TcpStream) -> Option<impl Future<Output = ()>> {
    let mut held = None;
    let admitted = authenticate(&shard, &mut stream, &mut held).await;
    // Bytes after the auth frame are kept for the frame loop; an emptied buffer goes back.
    lifecycle::release_read_buffer(&shard, &mut held);
    let Some(admitted) = admitted else {
        if let Some(buffer) = held.take() {
            shard.buffers.give(buffer);
        }
        return None;
    };
    let decoder = LengthDecoder::new(shard.limits.frame_bytes_max);
    let (reader, sink) = stream.into_split();
    Some(run(shard, reader, sink, admitted, held, decoder))
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
            user_id: identity.user_id().to_owned(),
            device_id: identity.device_id().to_owned(),
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

/// The frame loop: the connection's task from admission to close (see [`Admitted::run`]),
/// with what TCP adds: the length prefix and an `error` frame before each refusal.
fn run(
    shard: Rc<Shard>,
    reader: OwnedReadHalf<TcpStream>,
    sink: OwnedWriteHalf<TcpStream>,
    admitted: Admitted,
    held: Option<BytesMut>,
    mut decoder: LengthDecoder,
) -> impl Future<Output = ()> {
    let mut connection = Connection::new(Rc::clone(&admitted.live), Transport::Tcp);
    let on_bytes = move |shard: &Shard, buffer: &mut BytesMut| {
        loop {
            let payload = match decoder.decode(buffer) {
                Ok(Some(payload)) => payload,
                Ok(None) => return Ok(()),
                Err(error) => {
                    let _ = connection.reply(tcp_error(ErrorCode::TooLarge, error.reason()));
                    return Err(CloseReason::new(1009, "frame too large"));
                }
            };
            match ClientFrame::decode(payload) {
                Ok(ClientFrame { frame: Some(frame) }) => {
                    connection.on_frame(shard, Transport::Tcp, frame)?;
                }
                _ => {
                    let _ = connection
                        .reply(tcp_error(ErrorCode::BadRequest, "invalid protobuf frame"));
                    return Err(CloseReason::new(1007, "invalid protobuf frame"));
                }
            }
        }
    };
    admitted.run(shard, reader, sink, held, on_bytes)
}

fn tcp_error(code: ErrorCode, reason: &str) -> server_frame::Frame {
    server_frame::Frame::Error(chatify_proto::client::v1::Error {
        code: code.into(),
        reason: reason.to_owned(),
        client_msg_id: None,
        request_id: None,
    })
}
