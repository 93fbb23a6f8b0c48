//! The gateway's storage-reader client: `sync`, `read` and `recall` frames are answered by
//! storage-reader over gRPC, called as a trusted internal caller acting for the
//! connection's authenticated user (`x-chatify-internal-token` + `x-chatify-user-id`), never
//! for a user named by the client. One thread runs a small tokio runtime owning the tonic
//! channel (tonic needs tokio; the shards run monoio); shards send requests over a bounded
//! channel and get the answer frame back on a oneshot. Crosses shards: the sender half is
//! cloned into every shard.

use std::time::Duration;

use chatify_proto::client::v1::{ErrorCode, Messages, server_frame::Frame as Reply};
use chatify_proto::storage::v1::storage_service_client::StorageServiceClient;
use chatify_proto::storage::v1::{
    Direction, MarkMessageReadRequest, QueryMessagesRequest, RecallMessageRequest, SeqRange,
    query_messages_request,
};
use futures::channel::oneshot;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// Most requests waiting for the reader; beyond that a request is answered `unavailable`.
pub const READER_QUEUE_MAX: usize = 4096;
/// Metadata key of the internal-caller secret (storage-reader's `identity.rs`).
pub const INTERNAL_TOKEN_HEADER: &str = "x-chatify-internal-token";
/// Metadata key of the user an internal caller acts for.
pub const INTERNAL_USER_HEADER: &str = "x-chatify-user-id";
/// Default `sync` page when the client asks for 0.
pub const SYNC_LIMIT_DEFAULT: u32 = 50;

/// A request a client frame turns into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderCall {
    Sync {
        session_id: String,
        after_seq: u64,
        limit: u32,
    },
    Read {
        session_id: String,
        seq: u64,
    },
    Recall {
        message_id: String,
    },
}

/// The answer: a frame for the client (`messages` or `error`), or nothing (`read` and
/// `recall` succeed silently: receipts and `recalled` come as pushes).
pub type ReaderAnswer = Option<Reply>;

struct Request {
    user_id: String,
    request_id: Option<String>,
    call: ReaderCall,
    reply: oneshot::Sender<ReaderAnswer>,
}

/// Handle the shards use; cheap to clone.
#[derive(Debug, Clone)]
pub struct ReaderBridge {
    requests: flume::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("user_id", &self.user_id)
            .field("call", &self.call)
            .finish_non_exhaustive()
    }
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReaderBridgeError {
    #[error("CHATIFY_READER_URL: {0}")]
    Url(#[from] tonic::transport::Error),
    #[error("CHATIFY_INTERNAL_TOKEN is not a valid metadata value")]
    Token,
    #[error("cannot start the reader thread: {0}")]
    Thread(#[from] std::io::Error),
}

impl ReaderBridge {
    /// Starts the bridge thread; the channel connects lazily (and reconnects), so the
    /// gateway starts while the reader is down and answers `unavailable` meanwhile.
    pub fn start(
        url: &str,
        internal_token: &str,
        timeout: Duration,
    ) -> Result<Self, ReaderBridgeError> {
        let endpoint = Endpoint::from_shared(url.to_owned())?
            .timeout(timeout)
            .connect_timeout(timeout);
        let token: MetadataValue<_> = internal_token
            .parse()
            .map_err(|_| ReaderBridgeError::Token)?;
        let (requests, inbox) = flume::bounded(READER_QUEUE_MAX);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("reader-bridge".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let channel = endpoint.connect_lazy();
                    serve(channel, token, inbox).await;
                });
            })?;
        Ok(Self { requests })
    }

    /// Asks the reader; always answers (an `error` frame when the reader is down or busy).
    pub async fn call(
        &self,
        user_id: &str,
        request_id: Option<String>,
        call: ReaderCall,
    ) -> ReaderAnswer {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            user_id: user_id.to_owned(),
            request_id: request_id.clone(),
            call,
            reply,
        };
        if self.requests.try_send(request).is_err() {
            return Some(error_reply(
                ErrorCode::Unavailable,
                "history service is busy, retry later".into(),
                request_id,
            ));
        }
        answer.await.unwrap_or_else(|_| {
            Some(error_reply(
                ErrorCode::Unavailable,
                "history service is unavailable".into(),
                request_id,
            ))
        })
    }
}

async fn serve(
    channel: Channel,
    token: MetadataValue<tonic::metadata::Ascii>,
    inbox: flume::Receiver<Request>,
) {
    let client = StorageServiceClient::new(channel);
    while let Ok(request) = inbox.recv_async().await {
        let client = client.clone();
        let token = token.clone();
        // One task per request: calls from many shards multiplex on the HTTP/2 channel.
        tokio::spawn(async move {
            let answer = answer(client, token, &request).await;
            let _ = request.reply.send(answer);
        });
    }
}

fn with_caller<T>(
    message: T,
    token: &MetadataValue<tonic::metadata::Ascii>,
    user_id: &str,
) -> Result<tonic::Request<T>, Box<Reply>> {
    let mut request = tonic::Request::new(message);
    let user: MetadataValue<_> = user_id.parse().map_err(|_| {
        Box::new(error_reply(
            ErrorCode::BadRequest,
            "user id is not ascii".into(),
            None,
        ))
    })?;
    request
        .metadata_mut()
        .insert(INTERNAL_TOKEN_HEADER, token.clone());
    request.metadata_mut().insert(INTERNAL_USER_HEADER, user);
    Ok(request)
}

async fn answer(
    mut client: StorageServiceClient<Channel>,
    token: MetadataValue<tonic::metadata::Ascii>,
    request: &Request,
) -> ReaderAnswer {
    let request_id = request.request_id.clone();
    let user_id = request.user_id.clone();
    let outcome: Result<ReaderAnswer, tonic::Status> = match &request.call {
        ReaderCall::Sync {
            session_id,
            after_seq,
            limit,
        } => {
            let limit = if *limit == 0 {
                SYNC_LIMIT_DEFAULT
            } else {
                *limit
            };
            let query = QueryMessagesRequest {
                user_id: user_id.clone(),
                session_id: session_id.clone(),
                range: Some(query_messages_request::Range::Seq(SeqRange {
                    after_seq: *after_seq,
                    before_seq: 0,
                })),
                direction: Direction::Forward.into(),
                limit,
                cursor: String::new(),
            };
            match with_caller(query, &token, &user_id) {
                Ok(call) => client.query_messages(call).await.map(|page| {
                    let page = page.into_inner();
                    Some(Reply::Messages(Messages {
                        session_id: session_id.clone(),
                        messages: page.messages,
                        has_more: page.has_more,
                        request_id: request_id.clone(),
                    }))
                }),
                Err(reply) => return Some(*reply),
            }
        }
        ReaderCall::Read { session_id, seq } => {
            let mark = MarkMessageReadRequest {
                user_id: user_id.clone(),
                session_id: session_id.clone(),
                seq: *seq,
            };
            match with_caller(mark, &token, &user_id) {
                Ok(call) => client.mark_message_read(call).await.map(|_| None),
                Err(reply) => return Some(*reply),
            }
        }
        ReaderCall::Recall { message_id } => {
            let recall = RecallMessageRequest {
                user_id: user_id.clone(),
                message_id: message_id.clone(),
            };
            match with_caller(recall, &token, &user_id) {
                Ok(call) => client.recall_message(call).await.map(|_| None),
                Err(reply) => return Some(*reply),
            }
        }
    };
    match outcome {
        Ok(answer) => {
            metrics::counter!("chatify_gateway_reader_calls_total", "outcome" => "ok").increment(1);
            answer
        }
        Err(status) => {
            metrics::counter!("chatify_gateway_reader_calls_total", "outcome" => "error")
                .increment(1);
            let (code, reason) = map_status(&status);
            Some(error_reply(code, reason, request_id))
        }
    }
}

/// One mapping from the reader's gRPC codes to client error codes.
pub fn map_status(status: &tonic::Status) -> (ErrorCode, String) {
    use tonic::Code;
    let code = match status.code() {
        Code::InvalidArgument | Code::OutOfRange => ErrorCode::BadRequest,
        Code::NotFound => ErrorCode::NotFound,
        Code::PermissionDenied => ErrorCode::Forbidden,
        Code::FailedPrecondition => ErrorCode::RecallWindowPassed,
        Code::Unauthenticated => ErrorCode::Unauthorized,
        Code::ResourceExhausted => ErrorCode::RateLimited,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    let reason = if status.message().is_empty() {
        format!("history service: {}", status.code())
    } else {
        status.message().to_owned()
    };
    (code, reason)
}

pub fn error_reply(code: ErrorCode, reason: String, request_id: Option<String>) -> Reply {
    Reply::Error(chatify_proto::client::v1::Error {
        code: code.into(),
        reason,
        client_msg_id: None,
        request_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_client_codes() {
        let cases = [
            (tonic::Code::InvalidArgument, ErrorCode::BadRequest),
            (tonic::Code::NotFound, ErrorCode::NotFound),
            (tonic::Code::PermissionDenied, ErrorCode::Forbidden),
            (
                tonic::Code::FailedPrecondition,
                ErrorCode::RecallWindowPassed,
            ),
            (tonic::Code::Unauthenticated, ErrorCode::Unauthorized),
            (tonic::Code::Unavailable, ErrorCode::Unavailable),
            (tonic::Code::Internal, ErrorCode::Internal),
        ];
        for (grpc, client) in cases {
            let (code, reason) = map_status(&tonic::Status::new(grpc, "why"));
            assert_eq!(code, client, "{grpc:?}");
            assert_eq!(reason, "why");
        }
        assert!(
            map_status(&tonic::Status::new(tonic::Code::Internal, ""))
                .1
                .contains("history service")
        );
    }
}
