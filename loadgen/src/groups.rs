//! Group set-up for the `group` scenario: creates each group through storage-reader's gRPC
//! `GroupService.CreateGroup` (the first member is the owner and the caller), on a small
//! tokio runtime before the load starts. The caller is an internal caller
//! (`x-chatify-internal-token` + `x-chatify-user-id`) when a token is given, else the owner's
//! own JWT.

use anyhow::Context as _;
use chatify_proto::storage::v1::CreateGroupRequest;
use chatify_proto::storage::v1::group_service_client::GroupServiceClient;

use crate::token::Identity;

/// Most CreateGroup calls in flight at once.
const CREATE_CONCURRENCY: usize = 16;

/// How the set-up authenticates.
#[derive(Debug, Clone)]
pub enum Caller {
    Internal(String),
    OwnerToken,
}

/// Creates one group per member list; returns the session ids (`grp:...`) in order.
pub fn create_groups(
    grpc_addr: &str,
    caller: &Caller,
    run_id: &str,
    groups: &[Vec<Identity>],
) -> anyhow::Result<Vec<String>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("build the tokio runtime for grpc")?;
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(grpc_addr.to_owned())
            .with_context(|| format!("grpc address {grpc_addr}"))?
            .connect()
            .await
            .with_context(|| format!("connect to storage-reader at {grpc_addr}"))?;
        let client = GroupServiceClient::new(channel);
        let mut session_ids = vec![String::new(); groups.len()];
        for (chunk_index, chunk) in groups.chunks(CREATE_CONCURRENCY).enumerate() {
            let calls = chunk.iter().enumerate().map(|(offset, members)| {
                let mut client = client.clone();
                let index = chunk_index * CREATE_CONCURRENCY + offset;
                async move {
                    let owner = members.first().context("empty group")?;
                    let mut request = tonic::Request::new(CreateGroupRequest {
                        user_id: owner.user_id.clone(),
                        name: format!("loadgen {run_id} group {index}"),
                        member_ids: members[1..]
                            .iter()
                            .map(|member| member.user_id.clone())
                            .collect(),
                    });
                    let metadata = request.metadata_mut();
                    match caller {
                        Caller::Internal(token) => {
                            metadata.insert(
                                "x-chatify-internal-token",
                                token.parse().context("internal token is not ascii")?,
                            );
                            metadata.insert(
                                "x-chatify-user-id",
                                owner.user_id.parse().context("user id is not ascii")?,
                            );
                        }
                        Caller::OwnerToken => {
                            metadata.insert(
                                "authorization",
                                format!("Bearer {}", owner.token)
                                    .parse()
                                    .context("token is not ascii")?,
                            );
                        }
                    }
                    let response = client
                        .create_group(request)
                        .await
                        .with_context(|| format!("CreateGroup for group {index}"))?;
                    anyhow::Ok((index, response.into_inner().session_id))
                }
            });
            for created in futures::future::join_all(calls).await {
                let (index, session_id) = created?;
                session_ids[index] = session_id;
            }
        }
        Ok(session_ids)
    })
}
