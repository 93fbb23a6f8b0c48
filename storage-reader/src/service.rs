//! The `chatify.storage.v1.StorageService` implementation. Every call: authenticate the
//! caller ([`crate::identity`]), check the request, check membership, then read or write
//! through [`crate::store`]; errors map to status codes in one place ([`crate::error`]).

use chatify_core::ids::{MessageId, SessionId};
use chatify_proto::bus::v1::message_event;
use chatify_proto::client::v1::{ReadReceipt, Recalled, ServerFrame, server_frame};
use chatify_proto::storage::v1::storage_service_server::StorageService;
use chatify_proto::storage::v1::{
    ClearSessionRequest, ClearSessionResponse, DeleteMessageRequest, DeleteMessageResponse,
    Direction, GetMessageRequest, GetMessageResponse, GetUnreadCountRequest,
    GetUnreadCountResponse, ListSessionsRequest, ListSessionsResponse, MarkMessageReadRequest,
    MarkMessageReadResponse, QueryMessagesRequest, QueryMessagesResponse, RecallMessageRequest,
    RecallMessageResponse, SessionSummary, query_messages_request,
};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::error::ReaderError;
use crate::hot_redis::HotRedis;
use crate::identity::{Gatekeeper, Verified, check_user_field, revoked_error};
use crate::notify::{self, Notifier};
use crate::store::{self, SeqPage};

/// Page size when a query names none.
pub const QUERY_LIMIT_DEFAULT: usize = 50;
/// Largest page a query may ask for.
pub const QUERY_LIMIT_MAX: usize = 200;

/// The service: store clients, the gatekeeper and the notifier.
#[derive(Debug, Clone)]
pub struct Storage {
    pub gatekeeper: Gatekeeper,
    pub postgres: PgPool,
    pub redis: ConnectionManager,
    /// A cache-hit page's one Redis round trip (the deny-list entry, members, marks and
    /// window), on the reader's own client: [`crate::hot_redis`].
    pub hot: std::sync::Arc<HotRedis>,
    pub mongo: mongodb::Collection<mongodb::bson::Document>,
    pub notifier: Notifier,
    /// How long after sending a sender may recall, in ms.
    pub recall_window_ms: i64,
    /// Which store serves pages the hot cache cannot.
    pub archive: store::ArchiveStore,
    /// Life of a user's marks of a session in Redis ([`chatify_core::keys::user_marks`]),
    /// from their last rebuild or change, in seconds.
    pub marks_ttl_seconds: u64,
}

fn session_arg(text: &str) -> Result<SessionId, ReaderError> {
    SessionId::parse(text)
        .map_err(|error| ReaderError::InvalidArgument(format!("session_id {text:?}: {error}")))
}

fn message_id_arg(text: &str) -> Result<MessageId, ReaderError> {
    MessageId::parse(text)
        .map_err(|_| ReaderError::InvalidArgument(format!("message_id {text:?} is not a uuid")))
}

/// Whether a MarkMessageRead of `requested` sends a read receipt, given the cursor
/// `read_seq` after it: when the cursor stands where this call put it — moved now, or a
/// repeat of the call that moved it, whose receipt may have failed to publish (receipts are
/// idempotent: "read up to seq"). A mark below the cursor announces nothing; of two
/// concurrent marks, only the higher one does.
fn announces_read(requested: u64, read_seq: u64) -> bool {
    requested > 0 && requested == read_seq
}

fn limit_arg(limit: u32) -> Result<usize, ReaderError> {
    match limit as usize {
        0 => Ok(QUERY_LIMIT_DEFAULT),
        n if n <= QUERY_LIMIT_MAX => Ok(n),
        n => Err(ReaderError::InvalidArgument(format!(
            "limit {n} is over the maximum {QUERY_LIMIT_MAX}"
        ))),
    }
}

fn cursor_arg(cursor: &str) -> Result<Option<u64>, ReaderError> {
    if cursor.is_empty() {
        return Ok(None);
    }
    cursor.parse().map(Some).map_err(|_| {
        ReaderError::InvalidArgument(format!("cursor {cursor:?} is not one this service gave"))
    })
}

impl Storage {
    async fn query(
        &self,
        caller: &Verified,
        request: QueryMessagesRequest,
    ) -> Result<QueryMessagesResponse, ReaderError> {
        let user = caller.user_id.as_str();
        check_user_field(user, &request.user_id)?;
        let session = session_arg(&request.session_id)?;
        let limit = limit_arg(request.limit)?;
        let cursor = cursor_arg(&request.cursor)?;
        let backward = Direction::try_from(request.direction) == Ok(Direction::Backward);
        let page = match request.range {
            Some(query_messages_request::Range::Time(range)) => {
                if backward {
                    return Err(ReaderError::InvalidArgument(
                        "time ranges are read forward only".into(),
                    ));
                }
                // 0 is unbounded at either end (proto `TimeRange`).
                if range.end_ms != 0 && range.end_ms <= range.start_ms {
                    return Err(ReaderError::InvalidArgument(
                        "time range end_ms must be after start_ms (or 0, unbounded)".into(),
                    ));
                }
                self.gatekeeper.check_revocation(caller).await?;
                store::require_member(&self.postgres, &session, user).await?;
                let mut redis = self.redis.clone();
                let state = store::user_state(&self.postgres, &mut redis, user, &session).await?;
                let after = cursor.unwrap_or(0).max(state.cleared_seq);
                let mut messages = store::time_page(
                    &self.postgres,
                    user,
                    &session,
                    (range.start_ms, range.end_ms),
                    after,
                    limit,
                )
                .await?;
                let has_more = messages.len() > limit;
                messages.truncate(limit);
                let last_seq = messages.last().map(|message| message.seq);
                store::Page {
                    messages: store::PageMessages::Decoded(messages),
                    has_more,
                    last_seq,
                    source: store::Source::Archive,
                }
            }
            seq => {
                let (after, before) = match seq {
                    Some(query_messages_request::Range::Seq(range)) => {
                        (range.after_seq, range.before_seq)
                    }
                    _ => (0, 0),
                };
                if before != 0 && before <= after + 1 {
                    return Err(ReaderError::InvalidArgument(format!(
                        "empty seq range: after {after}, before {before}"
                    )));
                }
                // The cursor continues the page in its direction.
                let (after, before) = match (backward, cursor) {
                    (false, Some(cursor)) => (cursor.max(after), before),
                    (true, Some(cursor)) => (after, cursor),
                    (_, None) => (after, before),
                };
                self.seq_query(
                    caller,
                    &session,
                    SeqPage {
                        after,
                        before,
                        backward,
                        limit,
                    },
                )
                .await?
            }
        };
        let next_cursor = match (page.has_more, page.last_seq) {
            (true, Some(last)) => last.to_string(),
            _ => String::new(),
        };
        let (messages, encoded_messages) = match page.messages {
            store::PageMessages::Decoded(messages) => (messages, Vec::new()),
            store::PageMessages::Encoded(encoded) => (Vec::new(), encoded),
        };
        Ok(QueryMessagesResponse {
            messages,
            next_cursor,
            has_more: page.has_more,
            encoded_messages,
        })
    }

    /// A seq page. One pipelined Redis round trip reads everything a cache hit needs: the
    /// token's deny-list entry, a group's cached members, the caller's marks (clear
    /// watermark, hidden seqs) and the cached window; Postgres is asked only when Redis
    /// lacks something (members or marks not cached, the page not in the hot cache). A
    /// forward page starting below the caller's clear watermark reads its window again
    /// from the watermark (a second round trip); a backward one needs no second read
    /// ([`store::add_window_read`]).
    async fn seq_query(
        &self,
        caller: &Verified,
        session: &SessionId,
        page: SeqPage,
    ) -> Result<store::Page, ReaderError> {
        let user = caller.user_id.as_str();
        let mut pipe = redis::pipe();
        if let Some(key) = &caller.revocation_key {
            pipe.cmd("EXISTS").arg(key);
        }
        if session.is_group() {
            store::add_member_read(&mut pipe, session, user);
        }
        store::add_marks_read(&mut pipe, user, session, page.after, page.before);
        store::add_window_read(&mut pipe, session, page);
        let mut replies = self.hot.query(&pipe).await?.into_iter();
        let mut next = || replies.next().ok_or_else(store::too_few_replies);
        if caller.revocation_key.is_some() && next()?.into_bool()? {
            return Err(revoked_error());
        }
        let membership = if session.is_group() {
            let is_member = next()?.into_bool()?;
            let members = next()?.into_u64()?;
            store::cached_membership(session, user, is_member, members)
        } else {
            store::member_by_id(session, user)
        };
        match membership {
            Some(known) => known?,
            None => store::require_member(&self.postgres, session, user).await?,
        }
        let scores = next()?.into_optional_numbers()?;
        let members = next()?.into_bulks()?;
        let marks = match store::marks_from(&scores, &members) {
            Some(marks) => marks,
            None => {
                store::rebuild_marks(
                    &self.postgres,
                    &mut self.redis.clone(),
                    user,
                    session,
                    (page.after, page.before),
                    self.marks_ttl_seconds,
                )
                .await?
            }
        };
        // The clear watermark hides everything up to it.
        let clamped = SeqPage {
            after: page.after.max(marks.cleared_seq),
            ..page
        };
        if clamped.before != 0 && clamped.before <= clamped.after + 1 {
            return Ok(store::Page {
                messages: store::PageMessages::Decoded(Vec::new()),
                has_more: false,
                last_seq: None,
                source: store::Source::Cache,
            });
        }
        // A backward page's cache read has no lower bound: it serves the clamped page too.
        let cached = if clamped.after == page.after || page.backward {
            store::cached_window(session, clamped, &mut replies)?
        } else {
            return store::seq_page(
                &self.postgres,
                &self.mongo,
                self.archive,
                &self.hot,
                &marks.hidden,
                session,
                clamped,
            )
            .await;
        };
        store::page_from(
            &self.postgres,
            &self.mongo,
            self.archive,
            session,
            clamped,
            &marks.hidden,
            cached,
        )
        .await
    }

    async fn get(
        &self,
        caller: &str,
        request: GetMessageRequest,
    ) -> Result<GetMessageResponse, ReaderError> {
        check_user_field(caller, &request.user_id)?;
        let message_id = message_id_arg(&request.message_id)?;
        let not_found =
            || ReaderError::NotFound(format!("message {} does not exist", request.message_id));
        let (message, hidden) = store::message_by_id(&self.postgres, caller, message_id.as_uuid())
            .await?
            .ok_or_else(not_found)?;
        let session = session_arg(&message.session_id)?;
        store::require_member(&self.postgres, &session, caller).await?;
        let mut redis = self.redis.clone();
        let state = store::user_state(&self.postgres, &mut redis, caller, &session).await?;
        // Deleted for me, burned, or cleared: as if it did not exist, for this user.
        if hidden || message.seq <= state.cleared_seq {
            return Err(not_found());
        }
        Ok(GetMessageResponse {
            message: Some(message),
        })
    }

    async fn delete(
        &self,
        caller: &str,
        request: DeleteMessageRequest,
    ) -> Result<DeleteMessageResponse, ReaderError> {
        check_user_field(caller, &request.user_id)?;
        let message_id = message_id_arg(&request.message_id)?;
        let (message, _) = store::message_by_id(&self.postgres, caller, message_id.as_uuid())
            .await?
            .ok_or_else(|| {
                ReaderError::NotFound(format!("message {} does not exist", request.message_id))
            })?;
        let session = session_arg(&message.session_id)?;
        store::require_member(&self.postgres, &session, caller).await?;
        // Redis marks: dropped first, written through after Postgres (see store::forget_marks).
        let mut redis = self.redis.clone();
        store::forget_marks(&mut redis, caller, &session).await?;
        sqlx::query(
            "INSERT INTO message_hides (user_id, message_id, session_id, seq, reason) \
             VALUES ($1, $2, $3, $4, 'deleted') ON CONFLICT (user_id, message_id) DO NOTHING",
        )
        .bind(caller)
        .bind(message_id.as_uuid())
        .bind(session.to_string())
        .bind(message.seq as i64)
        .execute(&self.postgres)
        .await?;
        store::note_hidden(
            &mut redis,
            caller,
            &session,
            message.seq,
            self.marks_ttl_seconds,
        )
        .await?;
        Ok(DeleteMessageResponse {})
    }

    async fn clear(
        &self,
        caller: &str,
        request: ClearSessionRequest,
    ) -> Result<ClearSessionResponse, ReaderError> {
        check_user_field(caller, &request.user_id)?;
        let session = session_arg(&request.session_id)?;
        store::require_member(&self.postgres, &session, caller).await?;
        let mut redis = self.redis.clone();
        let last = store::last_seq(&self.postgres, &mut redis, &session).await?;
        store::forget_marks(&mut redis, caller, &session).await?;
        // A watermark, not a rewrite: everything up to `last` is hidden for this user only.
        let (cleared,): (i64,) = sqlx::query_as(
            "INSERT INTO user_session_state (user_id, session_id, cleared_seq, read_seq) \
             VALUES ($1, $2, $3, $3) ON CONFLICT (user_id, session_id) DO UPDATE \
             SET cleared_seq = GREATEST(user_session_state.cleared_seq, EXCLUDED.cleared_seq), \
                 read_seq = GREATEST(user_session_state.read_seq, EXCLUDED.read_seq), \
                 updated_at = now() \
             RETURNING cleared_seq",
        )
        .bind(caller)
        .bind(session.to_string())
        .bind(last as i64)
        .fetch_one(&self.postgres)
        .await?;
        store::note_cleared(
            &mut redis,
            caller,
            &session,
            cleared as u64,
            self.marks_ttl_seconds,
        )
        .await?;
        Ok(ClearSessionResponse {
            cleared_through_seq: cleared as u64,
        })
    }

    async fn mark_read(
        &self,
        caller: &str,
        request: MarkMessageReadRequest,
    ) -> Result<MarkMessageReadResponse, ReaderError> {
        check_user_field(caller, &request.user_id)?;
        let session = session_arg(&request.session_id)?;
        store::require_member(&self.postgres, &session, caller).await?;
        let mut redis = self.redis.clone();
        let last = store::last_seq(&self.postgres, &mut redis, &session).await?;
        if request.seq > last {
            return Err(ReaderError::InvalidArgument(format!(
                "seq {} is past the last message ({last}) of {session}",
                request.seq
            )));
        }
        let before = store::user_state(&self.postgres, &mut redis, caller, &session)
            .await?
            .read_seq;
        // Burn timers first (idempotent: only timers not yet started), so a call that fails
        // after them and is retried finds them started, and one that fails before them has
        // not moved the cursor yet.
        if request.seq > before {
            store::start_burn_timers(&self.postgres, &session, caller, before, request.seq).await?;
        }
        let read_seq =
            store::mark_read(&self.postgres, &mut redis, caller, &session, request.seq).await?;
        if announces_read(request.seq, read_seq) {
            // A receipt to the other members (and the reader's other devices).
            let members = notify::members(&self.postgres, &session).await?;
            let users: Vec<&str> = members.iter().map(String::as_str).collect();
            let frame = ServerFrame {
                frame: Some(server_frame::Frame::ReadReceipt(ReadReceipt {
                    session_id: session.to_string(),
                    user_id: caller.to_owned(),
                    seq: read_seq,
                })),
            };
            let event = notify::event(message_event::Kind::Read, &session, caller, "", read_seq);
            self.notifier
                .publish(&mut redis, &session, &users, frame, event)
                .await?;
        }
        Ok(MarkMessageReadResponse { read_seq })
    }

    async fn recall(
        &self,
        caller: &str,
        request: RecallMessageRequest,
    ) -> Result<RecallMessageResponse, ReaderError> {
        check_user_field(caller, &request.user_id)?;
        let message_id = message_id_arg(&request.message_id)?;
        let target = store::recall_target(&self.postgres, message_id.as_uuid())
            .await?
            .ok_or_else(|| {
                ReaderError::NotFound(format!("message {} does not exist", request.message_id))
            })?;
        let session = session_arg(&target.session_id)?;
        store::require_member(&self.postgres, &session, caller).await?;
        if !target.recalled {
            let moderator = session.is_group()
                && matches!(
                    store::group_role(&self.postgres, &session, caller)
                        .await?
                        .as_deref(),
                    Some("owner" | "admin")
                );
            let now_ms = notify::now_ms();
            if !moderator {
                if target.sender_id != caller {
                    return Err(ReaderError::PermissionDenied(
                        "only the sender, or a group's owner or admins, may recall".into(),
                    ));
                }
                if now_ms - target.created_ms > self.recall_window_ms {
                    return Err(ReaderError::FailedPrecondition(format!(
                        "the recall window of {} s has passed",
                        self.recall_window_ms / 1000
                    )));
                }
            }
        }
        let mut redis = self.redis.clone();
        store::tombstone(
            &self.postgres,
            &self.mongo,
            &mut redis,
            message_id.as_uuid(),
            caller,
        )
        .await?;
        // Announced on every call, so a retry after a failed publish still reaches clients.
        let members = notify::members(&self.postgres, &session).await?;
        let users: Vec<&str> = members.iter().map(String::as_str).collect();
        let frame = ServerFrame {
            frame: Some(server_frame::Frame::Recalled(Recalled {
                session_id: session.to_string(),
                message_id: message_id.to_string(),
                seq: target.seq,
            })),
        };
        let event = notify::event(
            message_event::Kind::Recalled,
            &session,
            caller,
            &message_id.to_string(),
            target.seq,
        );
        self.notifier
            .publish(&mut redis, &session, &users, frame, event)
            .await?;
        Ok(RecallMessageResponse {
            session_id: session.to_string(),
            seq: target.seq,
        })
    }

    async fn sessions(
        &self,
        caller: &str,
        request: ListSessionsRequest,
    ) -> Result<ListSessionsResponse, ReaderError> {
        check_user_field(caller, &request.user_id)?;
        let limit = limit_arg(request.limit)?;
        let cursor = if request.cursor.is_empty() {
            None
        } else {
            let parsed = request
                .cursor
                .split_once(':')
                .and_then(|(ms, session)| Some((ms.parse::<i64>().ok()?, session.to_owned())));
            Some(parsed.ok_or_else(|| {
                ReaderError::InvalidArgument(format!(
                    "cursor {:?} is not one this service gave",
                    request.cursor
                ))
            })?)
        };
        let mut redis = self.redis.clone();
        let (entries, has_more) =
            store::session_page(&self.postgres, &mut redis, caller, cursor, limit).await?;
        let next_cursor = match (has_more, entries.last()) {
            (true, Some(last)) => format!("{}:{}", last.updated_at_ms, last.session_id),
            _ => String::new(),
        };
        let sessions = entries
            .into_iter()
            .map(|entry| SessionSummary {
                unread_count: entry
                    .last_seq
                    .saturating_sub(entry.read_seq.max(entry.cleared_seq)),
                session_id: entry.session_id,
                last_message: entry.last_message,
                last_seq: entry.last_seq,
                read_seq: entry.read_seq,
                updated_at_ms: entry.updated_at_ms,
            })
            .collect();
        Ok(ListSessionsResponse {
            sessions,
            next_cursor,
        })
    }

    async fn unread(
        &self,
        caller: &str,
        request: GetUnreadCountRequest,
    ) -> Result<GetUnreadCountResponse, ReaderError> {
        check_user_field(caller, &request.user_id)?;
        let session = session_arg(&request.session_id)?;
        store::require_member(&self.postgres, &session, caller).await?;
        let mut redis = self.redis.clone();
        let last = store::last_seq(&self.postgres, &mut redis, &session).await?;
        let state = store::user_state(&self.postgres, &mut redis, caller, &session).await?;
        // What arrived after the later of my read cursor (which my own sends also move)
        // and my clear watermark.
        let seen = state.read_seq.max(state.cleared_seq);
        Ok(GetUnreadCountResponse {
            unread_count: last.saturating_sub(seen),
        })
    }
}

#[tonic::async_trait]
impl StorageService for Storage {
    async fn query_messages(
        &self,
        request: Request<QueryMessagesRequest>,
    ) -> Result<Response<QueryMessagesResponse>, Status> {
        // Credentials are checked here; the deny-list entry in the page's own round trip.
        let caller = self.gatekeeper.verify(request.metadata())?;
        self.query(&caller, request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn get_message(
        &self,
        request: Request<GetMessageRequest>,
    ) -> Result<Response<GetMessageResponse>, Status> {
        rpc!(self, request, get)
    }

    async fn delete_message(
        &self,
        request: Request<DeleteMessageRequest>,
    ) -> Result<Response<DeleteMessageResponse>, Status> {
        rpc!(self, request, delete)
    }

    async fn recall_message(
        &self,
        request: Request<RecallMessageRequest>,
    ) -> Result<Response<RecallMessageResponse>, Status> {
        rpc!(self, request, recall)
    }

    async fn clear_session(
        &self,
        request: Request<ClearSessionRequest>,
    ) -> Result<Response<ClearSessionResponse>, Status> {
        rpc!(self, request, clear)
    }

    async fn mark_message_read(
        &self,
        request: Request<MarkMessageReadRequest>,
    ) -> Result<Response<MarkMessageReadResponse>, Status> {
        rpc!(self, request, mark_read)
    }

    async fn list_sessions(
        &self,
        request: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        rpc!(self, request, sessions)
    }

    async fn get_unread_count(
        &self,
        request: Request<GetUnreadCountRequest>,
    ) -> Result<Response<GetUnreadCountResponse>, Status> {
        rpc!(self, request, unread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_cursors_are_checked() {
        assert_eq!(limit_arg(0).ok(), Some(QUERY_LIMIT_DEFAULT));
        assert_eq!(limit_arg(200).ok(), Some(200));
        assert!(matches!(
            limit_arg(201),
            Err(ReaderError::InvalidArgument(_))
        ));
        assert_eq!(cursor_arg("").ok(), Some(None));
        assert_eq!(cursor_arg("42").ok(), Some(Some(42)));
        assert!(cursor_arg("x").is_err());
        assert!(session_arg("room:1").is_err());
        assert!(message_id_arg("nope").is_err());
    }

    #[test]
    fn a_read_is_announced_by_the_mark_that_set_the_cursor_and_by_its_retries() {
        // Moved 3 -> 5 now, or a retry of that mark after its receipt failed: announced.
        assert!(announces_read(5, 5));
        // Below the cursor (an older device, or the lower of two concurrent marks): not.
        assert!(!announces_read(4, 5));
        // Nothing read yet.
        assert!(!announces_read(0, 0));
    }
}
