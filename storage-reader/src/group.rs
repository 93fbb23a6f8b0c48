//! The `chatify.storage.v1.GroupService` implementation: groups with owner / admin / member
//! roles and a maximum size. Membership changes of one group are serialised by locking its
//! `sessions` row, so the size limit holds under concurrent calls; every change deletes the
//! Redis members cache the writer reads ([`keys::session_members`]), so the next message is
//! checked against the new list.

use std::collections::BTreeSet;

use chatify_core::ids::{self, SessionId};
use chatify_core::keys;
use chatify_proto::storage::v1::group_service_server::GroupService;
use chatify_proto::storage::v1::{
    AddMembersRequest, AddMembersResponse, CreateGroupRequest, CreateGroupResponse,
    ListMembersRequest, ListMembersResponse, Member, RemoveMembersRequest, RemoveMembersResponse,
    Role,
};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

use crate::error::ReaderError;
use crate::identity::{Gatekeeper, check_user_field};
use crate::service::{QUERY_LIMIT_DEFAULT, QUERY_LIMIT_MAX};

/// Longest group name, in characters.
pub const GROUP_NAME_CHARS_MAX: usize = 128;

/// The group service: store clients, the gatekeeper and the size limit.
#[derive(Debug, Clone)]
pub struct Groups {
    pub gatekeeper: Gatekeeper,
    pub postgres: PgPool,
    pub redis: ConnectionManager,
    pub members_max: usize,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Owner => "owner",
        Role::Admin => "admin",
        Role::Member | Role::Unspecified => "member",
    }
}

fn role_of(name: &str) -> Role {
    match name {
        "owner" => Role::Owner,
        "admin" => Role::Admin,
        _ => Role::Member,
    }
}

fn group_arg(text: &str) -> Result<SessionId, ReaderError> {
    match SessionId::parse(text) {
        Ok(session) if session.is_group() => Ok(session),
        _ => Err(ReaderError::InvalidArgument(format!(
            "session_id {text:?} is not a group id (grp:...)"
        ))),
    }
}

/// Valid, distinct user ids, without `except`.
fn member_ids(ids: &[String], except: &str) -> Result<Vec<String>, ReaderError> {
    let mut out = BTreeSet::new();
    for id in ids {
        ids::validate_id(id)
            .map_err(|error| ReaderError::InvalidArgument(format!("member id {id:?}: {error}")))?;
        if id != except {
            out.insert(id.clone());
        }
    }
    Ok(out.into_iter().collect())
}

impl Groups {
    async fn forget_members(&self, session: &SessionId) -> Result<(), ReaderError> {
        let mut redis = self.redis.clone();
        redis::cmd("DEL")
            .arg(keys::session_members(session))
            .exec_async(&mut redis)
            .await?;
        Ok(())
    }

    /// Locks the group row and returns the caller's role (None: not a member).
    async fn lock_group(
        transaction: &mut sqlx::PgConnection,
        session: &SessionId,
        caller: &str,
    ) -> Result<Option<Role>, ReaderError> {
        let exists: Option<(String,)> =
            sqlx::query_as("SELECT session_id FROM sessions WHERE session_id = $1 FOR UPDATE")
                .bind(session.to_string())
                .fetch_optional(&mut *transaction)
                .await?;
        if exists.is_none() {
            return Err(ReaderError::NotFound(format!(
                "group {session} does not exist"
            )));
        }
        let role: Option<(String,)> = sqlx::query_as(
            "SELECT role FROM session_members WHERE session_id = $1 AND user_id = $2",
        )
        .bind(session.to_string())
        .bind(caller)
        .fetch_optional(&mut *transaction)
        .await?;
        Ok(role.map(|(name,)| role_of(&name)))
    }

    async fn create(
        &self,
        caller: &str,
        request: CreateGroupRequest,
    ) -> Result<CreateGroupResponse, ReaderError> {
        check_user_field(caller, &request.user_id)?;
        let name = request.name.trim();
        if name.is_empty() || name.chars().count() > GROUP_NAME_CHARS_MAX {
            return Err(ReaderError::InvalidArgument(format!(
                "name must be 1..={GROUP_NAME_CHARS_MAX} characters"
            )));
        }
        let members = member_ids(&request.member_ids, caller)?;
        if members.len() + 1 > self.members_max {
            return Err(ReaderError::InvalidArgument(format!(
                "{} members is over the maximum group size {}",
                members.len() + 1,
                self.members_max
            )));
        }
        let session = SessionId::group(&uuid::Uuid::now_v7().to_string())
            .map_err(|error| ReaderError::InvalidArgument(error.to_string()))?;
        let mut transaction = self.postgres.begin().await?;
        sqlx::query(
            "INSERT INTO sessions (session_id, kind, name, owner_id) VALUES ($1, 'group', $2, $3)",
        )
        .bind(session.to_string())
        .bind(name)
        .bind(caller)
        .execute(&mut *transaction)
        .await?;
        let mut users = vec![caller.to_owned()];
        let mut roles = vec!["owner"];
        for member in &members {
            users.push(member.clone());
            roles.push("member");
        }
        sqlx::query(
            "INSERT INTO session_members (session_id, user_id, role) \
             SELECT $1, u, r FROM unnest($2::text[], $3::text[]) AS t(u, r)",
        )
        .bind(session.to_string())
        .bind(&users)
        .bind(&roles)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(CreateGroupResponse {
            session_id: session.to_string(),
        })
    }

    async fn add(
        &self,
        caller: &str,
        request: AddMembersRequest,
    ) -> Result<AddMembersResponse, ReaderError> {
        check_user_field(caller, &request.user_id)?;
        let session = group_arg(&request.session_id)?;
        let role = Role::try_from(request.role).unwrap_or(Role::Unspecified);
        if role == Role::Owner {
            return Err(ReaderError::InvalidArgument(
                "a group has one owner; add members or admins".into(),
            ));
        }
        let members = member_ids(&request.member_ids, caller)?;
        let mut transaction = self.postgres.begin().await?;
        match Self::lock_group(&mut transaction, &session, caller).await? {
            None => {
                return Err(ReaderError::PermissionDenied(format!(
                    "{caller} is not a member of {session}"
                )));
            }
            Some(Role::Member | Role::Unspecified) => {
                return Err(ReaderError::PermissionDenied(
                    "only the owner or an admin may add members".into(),
                ));
            }
            Some(Role::Admin) if role == Role::Admin => {
                return Err(ReaderError::PermissionDenied(
                    "only the owner may add admins".into(),
                ));
            }
            Some(_) => {}
        }
        let (count,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM session_members WHERE session_id = $1")
                .bind(session.to_string())
                .fetch_one(&mut *transaction)
                .await?;
        let added = sqlx::query(
            "INSERT INTO session_members (session_id, user_id, role) \
             SELECT $1, u, $3 FROM unnest($2::text[]) AS u ON CONFLICT DO NOTHING",
        )
        .bind(session.to_string())
        .bind(&members)
        .bind(role_name(role))
        .execute(&mut *transaction)
        .await?
        .rows_affected() as usize;
        if count as usize + added > self.members_max {
            // The transaction rolls back on drop: nothing is added.
            return Err(ReaderError::FailedPrecondition(format!(
                "{session} would have {} members, over the maximum {}",
                count as usize + added,
                self.members_max
            )));
        }
        transaction.commit().await?;
        self.forget_members(&session).await?;
        Ok(AddMembersResponse {
            added: added as u32,
        })
    }

    async fn remove(
        &self,
        caller: &str,
        request: RemoveMembersRequest,
    ) -> Result<RemoveMembersResponse, ReaderError> {
        check_user_field(caller, &request.user_id)?;
        let session = group_arg(&request.session_id)?;
        let mut targets = BTreeSet::new();
        for id in &request.member_ids {
            ids::validate_id(id).map_err(|error| {
                ReaderError::InvalidArgument(format!("member id {id:?}: {error}"))
            })?;
            targets.insert(id.clone());
        }
        let targets: Vec<String> = targets.into_iter().collect();
        let mut transaction = self.postgres.begin().await?;
        let caller_role = Self::lock_group(&mut transaction, &session, caller)
            .await?
            .ok_or_else(|| {
                ReaderError::PermissionDenied(format!("{caller} is not a member of {session}"))
            })?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT user_id, role FROM session_members WHERE session_id = $1 AND user_id = ANY($2)",
        )
        .bind(session.to_string())
        .bind(&targets)
        .fetch_all(&mut *transaction)
        .await?;
        for (user, role) in &rows {
            let role = role_of(role);
            let leaving = user == caller;
            let allowed = match (caller_role, role) {
                (_, Role::Owner) => false,
                _ if leaving => true,
                (Role::Owner, _) => true,
                (Role::Admin, Role::Member | Role::Unspecified) => true,
                _ => false,
            };
            if !allowed {
                return Err(if role == Role::Owner {
                    ReaderError::FailedPrecondition("the owner cannot be removed or leave".into())
                } else {
                    ReaderError::PermissionDenied(format!(
                        "{caller} may not remove {user} from {session}"
                    ))
                });
            }
        }
        let removed =
            sqlx::query("DELETE FROM session_members WHERE session_id = $1 AND user_id = ANY($2)")
                .bind(session.to_string())
                .bind(&targets)
                .execute(&mut *transaction)
                .await?
                .rows_affected();
        transaction.commit().await?;
        self.forget_members(&session).await?;
        Ok(RemoveMembersResponse {
            removed: removed as u32,
        })
    }

    async fn list(
        &self,
        caller: &str,
        request: ListMembersRequest,
    ) -> Result<ListMembersResponse, ReaderError> {
        check_user_field(caller, &request.user_id)?;
        let session = group_arg(&request.session_id)?;
        let limit = match request.limit as usize {
            0 => QUERY_LIMIT_DEFAULT,
            n if n <= QUERY_LIMIT_MAX => n,
            n => {
                return Err(ReaderError::InvalidArgument(format!(
                    "limit {n} is over the maximum {QUERY_LIMIT_MAX}"
                )));
            }
        };
        crate::store::require_member(&self.postgres, &session, caller).await?;
        // Keyset pagination by user id: the cursor is the last user id of the page.
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT user_id, role, (extract(epoch FROM joined_at) * 1000)::int8 \
             FROM session_members WHERE session_id = $1 AND user_id > $2 \
             ORDER BY user_id LIMIT $3",
        )
        .bind(session.to_string())
        .bind(&request.cursor)
        .bind((limit + 1) as i64)
        .fetch_all(&self.postgres)
        .await?;
        let has_more = rows.len() > limit;
        let members: Vec<Member> = rows
            .into_iter()
            .take(limit)
            .map(|(user_id, role, joined_at_ms)| Member {
                user_id,
                role: role_of(&role) as i32,
                joined_at_ms,
            })
            .collect();
        let next_cursor = match (has_more, members.last()) {
            (true, Some(last)) => last.user_id.clone(),
            _ => String::new(),
        };
        Ok(ListMembersResponse {
            members,
            next_cursor,
        })
    }
}

#[tonic::async_trait]
impl GroupService for Groups {
    async fn create_group(
        &self,
        request: Request<CreateGroupRequest>,
    ) -> Result<Response<CreateGroupResponse>, Status> {
        rpc!(self, request, create)
    }

    async fn add_members(
        &self,
        request: Request<AddMembersRequest>,
    ) -> Result<Response<AddMembersResponse>, Status> {
        rpc!(self, request, add)
    }

    async fn remove_members(
        &self,
        request: Request<RemoveMembersRequest>,
    ) -> Result<Response<RemoveMembersResponse>, Status> {
        rpc!(self, request, remove)
    }

    async fn list_members(
        &self,
        request: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        rpc!(self, request, list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_are_validated_and_deduplicated() {
        let ids = vec![
            "b".to_owned(),
            "a".to_owned(),
            "b".to_owned(),
            "me".to_owned(),
        ];
        assert_eq!(
            member_ids(&ids, "me").ok(),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
        assert!(member_ids(&["bad id".to_owned()], "me").is_err());
        assert!(group_arg("p2p:a:b").is_err());
        assert!(group_arg("grp:g1").is_ok());
    }
}
