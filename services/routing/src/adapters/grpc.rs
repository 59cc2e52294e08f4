//! The `RoutingService` gRPC adapter: authorisation by role, request validation, and the one
//! mapping of [`RoutingError`] to `tonic::Status`.
//!
//! Roles: supervisors and admins manage agents and queues and may act for any agent; agents act
//! for themselves (their token's subject is their agent id); the service role (other Tandem
//! services) reads tickets and positions and may complete assignments; channels read queue
//! positions.

use std::sync::Arc;

use tandem_platform::auth::{Caller, Role};
use tandem_platform::error::status_from;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::routing::v1 as pb;
use tandem_proto::pb::routing::v1::routing_service_server::RoutingService;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use crate::domain::{check_id, check_len};
use crate::engine::Engine;
use crate::error::{RoutingError, RoutingResult, invalid};
use crate::store::{AgentFilter, PresenceReason, TransferKind, TransferTarget};

impl From<RoutingError> for Status {
    fn from(error: RoutingError) -> Self {
        status_from(&error)
    }
}

const MANAGERS: &[Role] = &[Role::Supervisor, Role::Admin];
const READERS: &[Role] = &[Role::Supervisor, Role::Admin, Role::Service, Role::Agent];

/// The gRPC service.
#[derive(Clone)]
pub struct RoutingGrpc {
    engine: Arc<Engine>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl RoutingGrpc {
    /// Wraps the engine; sessions end when `shutdown` is cancelled.
    pub fn new(engine: Arc<Engine>, shutdown: tokio_util::sync::CancellationToken) -> Self {
        Self { engine, shutdown }
    }
}

fn caller<T>(request: &Request<T>, roles: &[Role]) -> Result<Caller, Status> {
    let caller = tandem_platform::auth::caller(request)?.clone();
    caller.require_any(roles).map_err(|e| status_from(&e))?;
    Ok(caller)
}

fn manages(caller: &Caller) -> bool {
    MANAGERS.iter().any(|r| caller.has(*r))
}

/// The agent a request is about: the caller's own id when empty; another agent's only for
/// supervisors and admins.
fn acting_for(caller: &Caller, requested: &str) -> RoutingResult<String> {
    if requested.is_empty() || requested == caller.subject {
        return Ok(caller.subject.clone());
    }
    if manages(caller) || caller.has(Role::Service) {
        return Ok(requested.to_owned());
    }
    Err(RoutingError::PermissionDenied(
        "agents may only act for themselves".into(),
    ))
}

/// The agent whose ownership a call must respect: `None` for supervisors, admins and services.
fn owner(caller: &Caller) -> Option<&str> {
    if manages(caller) || caller.has(Role::Service) {
        None
    } else {
        Some(caller.subject.as_str())
    }
}

fn page(
    page: Option<&tandem_proto::pb::common::v1::PageRequest>,
) -> RoutingResult<(String, usize)> {
    let page = page.cloned().unwrap_or_default();
    let size = match page.page_size {
        0 => 20,
        n @ 1..=100 => usize::try_from(n).unwrap_or(20),
        n => return Err(invalid(format!("page.page_size is {n}, must be 0..=100"))),
    };
    check_len("page.page_token", &page.page_token, 128)?;
    Ok((page.page_token, size))
}

fn next_token(
    more: bool,
    last: Option<&str>,
) -> Option<tandem_proto::pb::common::v1::PageResponse> {
    Some(tandem_proto::pb::common::v1::PageResponse {
        next_page_token: if more {
            last.unwrap_or_default().to_owned()
        } else {
            String::new()
        },
    })
}

impl RoutingGrpc {
    async fn ticket_view(
        &self,
        tenant: &TenantId,
        ticket: &crate::store::TicketRecord,
        with_package: bool,
    ) -> RoutingResult<pb::Ticket> {
        let ageing = match self.engine.store.queue(tenant, &ticket.queue_id).await {
            Ok(queue) => queue.spec.weights.ageing_per_second,
            Err(RoutingError::NotFound(_)) => 0.0,
            Err(error) => return Err(error),
        };
        convert::ticket_pb(ticket, ageing, self.engine.now(), with_package)
    }
}

#[tonic::async_trait]
impl RoutingService for RoutingGrpc {
    async fn register_agent(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        let caller = caller(&request, MANAGERS)?;
        let agent = request
            .into_inner()
            .agent
            .ok_or_else(|| invalid("agent is required"))?;
        let profile = convert::agent_profile(&agent);
        let stored = self
            .engine
            .store
            .register_agent(&caller.tenant, &profile, self.engine.now())
            .await?;
        Ok(Response::new(pb::RegisterAgentResponse {
            agent: Some(convert::agent_pb(&stored)),
        }))
    }

    async fn update_agent(
        &self,
        request: Request<pb::UpdateAgentRequest>,
    ) -> Result<Response<pb::UpdateAgentResponse>, Status> {
        let caller = caller(&request, MANAGERS)?;
        let request = request.into_inner();
        let update = request.agent.ok_or_else(|| invalid("agent is required"))?;
        check_id("agent.id", &update.id)?;
        let wanted = convert::agent_profile(&update);
        let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
        for path in &paths {
            if !matches!(
                path.as_str(),
                "display_name" | "skills" | "languages" | "team" | "max_concurrent"
            ) {
                return Err(invalid(format!("update_mask path {path:?} is not writable")).into());
            }
        }
        let all = paths.is_empty();
        let wants = move |field: &str| all || paths.iter().any(|p| p == field);
        // The mask is applied by the store to the row it holds locked, so a concurrent update
        // of other fields is never overwritten with what this request read before it.
        let (current, stored) = self
            .engine
            .store
            .change_agent(
                &caller.tenant,
                &update.id,
                move |profile| {
                    if wants("display_name") {
                        profile.display_name = wanted.display_name;
                    }
                    if wants("skills") {
                        profile.skills = wanted.skills;
                    }
                    if wants("languages") {
                        profile.languages = wanted.languages;
                    }
                    if wants("team") {
                        profile.team = wanted.team;
                    }
                    if wants("max_concurrent") {
                        profile.capacity = wanted.capacity;
                    }
                },
                self.engine.now(),
            )
            .await?;
        if stored.profile.capacity > current.profile.capacity {
            self.engine.drain_later(&caller.tenant, None);
        }
        Ok(Response::new(pb::UpdateAgentResponse {
            agent: Some(convert::agent_pb(&stored)),
        }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let caller = caller(&request, READERS)?;
        let id = acting_for(&caller, &request.get_ref().agent_id)?;
        let agent = self.engine.store.agent(&caller.tenant, &id).await?;
        Ok(Response::new(pb::GetAgentResponse {
            agent: Some(convert::agent_pb(&agent)),
        }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let caller = caller(&request, &[Role::Supervisor, Role::Admin, Role::Service])?;
        let request = request.into_inner();
        let (after, size) = page(request.page.as_ref())?;
        let filter = AgentFilter {
            team: (!request.team.is_empty()).then_some(request.team),
            presence: convert::presence(request.presence)?,
            skill: (!request.skill.is_empty()).then_some(request.skill),
        };
        let (agents, more) = self
            .engine
            .store
            .list_agents(&caller.tenant, &filter, &after, size)
            .await?;
        let last = agents.last().map(|a| a.profile.id.clone());
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(convert::agent_pb).collect(),
            page: next_token(more, last.as_deref()),
        }))
    }

    async fn set_presence(
        &self,
        request: Request<pb::SetPresenceRequest>,
    ) -> Result<Response<pb::SetPresenceResponse>, Status> {
        let caller = caller(&request, &[Role::Agent, Role::Supervisor, Role::Admin])?;
        let request = request.into_inner();
        let id = acting_for(&caller, &request.agent_id)?;
        let to =
            convert::presence(request.presence)?.ok_or_else(|| invalid("presence is required"))?;
        check_len("reason", &request.reason, 200)?;
        let reason = if id == caller.subject {
            PresenceReason::Manual
        } else {
            PresenceReason::Supervisor
        };
        let (agent, released) = self
            .engine
            .store
            .set_presence(
                &caller.tenant,
                &id,
                to,
                reason,
                &request.reason,
                self.engine.now(),
            )
            .await?;
        self.engine.hub.notify(&caller.tenant, &id);
        if to == crate::domain::agent::Presence::Online || !released.is_empty() {
            self.engine.drain_later(&caller.tenant, None);
        }
        Ok(Response::new(pb::SetPresenceResponse {
            agent: Some(convert::agent_pb(&agent)),
        }))
    }

    type AgentSessionStream = ReceiverStream<Result<pb::AgentSessionResponse, Status>>;

    async fn agent_session(
        &self,
        request: Request<Streaming<pb::AgentSessionRequest>>,
    ) -> Result<Response<Self::AgentSessionStream>, Status> {
        let caller = caller(&request, &[Role::Agent])?;
        let inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(super::session::run(
            Arc::clone(&self.engine),
            caller.tenant,
            caller.subject,
            inbound,
            tx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_queue_position(
        &self,
        request: Request<pb::GetQueuePositionRequest>,
    ) -> Result<Response<pb::GetQueuePositionResponse>, Status> {
        let caller = caller(
            &request,
            &[
                Role::Channel,
                Role::Service,
                Role::Supervisor,
                Role::Admin,
                Role::Agent,
            ],
        )?;
        let store = &self.engine.store;
        let ticket = match request.into_inner().key {
            Some(pb::get_queue_position_request::Key::ConversationId(id)) => {
                check_id("conversation_id", &id)?;
                store.ticket_of_conversation(&caller.tenant, &id).await?
            }
            Some(pb::get_queue_position_request::Key::HandoffId(id)) => {
                check_id("handoff_id", &id)?;
                store.ticket(&caller.tenant, &id).await?
            }
            None => return Err(invalid("conversation_id or handoff_id is required").into()),
        };
        let view = store
            .position(
                &caller.tenant,
                ticket,
                self.engine.settings.eta(),
                self.engine.now(),
            )
            .await?;
        let state = convert::ticket_pb(&view.ticket, 0.0, self.engine.now(), false)?.state;
        Ok(Response::new(pb::GetQueuePositionResponse {
            handoff_id: view.ticket.id.clone(),
            queue_id: view.ticket.queue_id.clone(),
            state,
            position: view.position,
            eta_seconds: view.eta_seconds,
            agents_available: view.agents_available,
            within_business_hours: view.within_business_hours,
        }))
    }

    async fn transfer_conversation(
        &self,
        request: Request<pb::TransferConversationRequest>,
    ) -> Result<Response<pb::TransferConversationResponse>, Status> {
        let caller = caller(&request, &[Role::Agent, Role::Supervisor, Role::Admin])?;
        let request = request.into_inner();
        check_id("ticket_id", &request.ticket_id)?;
        check_len("note", &request.note, 2000)?;
        let kind = match pb::TransferKind::try_from(request.kind) {
            Ok(pb::TransferKind::Warm) => TransferKind::Warm,
            Ok(pb::TransferKind::Cold) => TransferKind::Cold,
            _ => return Err(invalid("kind must be WARM or COLD").into()),
        };
        let target = match request.target.and_then(|t| t.target) {
            Some(pb::transfer_target::Target::AgentId(id)) => {
                check_id("target.agent_id", &id)?;
                TransferTarget::Agent(id)
            }
            Some(pb::transfer_target::Target::QueueId(id)) => {
                crate::domain::queue::check_queue_id("target.queue_id", &id)?;
                TransferTarget::Queue(id)
            }
            None => return Err(invalid("target.agent_id or target.queue_id is required").into()),
        };
        let (ticket, offer, from) = self
            .engine
            .store
            .transfer(
                &caller.tenant,
                &request.ticket_id,
                owner(&caller),
                kind,
                &target,
                &request.note,
                self.engine.now(),
            )
            .await?;
        self.engine.hub.notify(&caller.tenant, &from);
        match offer {
            Some(offer) => self.engine.hub.notify(&caller.tenant, &offer.agent_id),
            None => self
                .engine
                .drain_later(&caller.tenant, Some(ticket.queue_id.as_str())),
        }
        let with_package = manages(&caller);
        Ok(Response::new(pb::TransferConversationResponse {
            ticket: Some(
                self.ticket_view(&caller.tenant, &ticket, with_package)
                    .await?,
            ),
        }))
    }

    async fn complete_assignment(
        &self,
        request: Request<pb::CompleteAssignmentRequest>,
    ) -> Result<Response<pb::CompleteAssignmentResponse>, Status> {
        let caller = caller(
            &request,
            &[Role::Agent, Role::Supervisor, Role::Admin, Role::Service],
        )?;
        let request = request.into_inner();
        check_id("ticket_id", &request.ticket_id)?;
        check_len("notes", &request.notes, 2000)?;
        let disposition = convert::wrap_up_disposition(request.disposition)?;
        let (done, revoked) = self
            .engine
            .store
            .complete(
                &caller.tenant,
                &request.ticket_id,
                owner(&caller),
                disposition,
                self.engine.now(),
            )
            .await?;
        for offer in &revoked {
            self.engine.hub.notify(&caller.tenant, &offer.agent_id);
        }
        self.engine.drain_later(&caller.tenant, None);
        Ok(Response::new(pb::CompleteAssignmentResponse {
            ticket: Some(
                self.ticket_view(&caller.tenant, &done.ticket, false)
                    .await?,
            ),
        }))
    }

    async fn upsert_queue(
        &self,
        request: Request<pb::UpsertQueueRequest>,
    ) -> Result<Response<pb::UpsertQueueResponse>, Status> {
        let caller = caller(&request, MANAGERS)?;
        let queue = request
            .into_inner()
            .queue
            .ok_or_else(|| invalid("queue is required"))?;
        let spec = convert::queue_spec(&queue)?;
        let (record, created) = self
            .engine
            .store
            .upsert_queue(&caller.tenant, &spec, self.engine.now())
            .await?;
        self.engine
            .drain_later(&caller.tenant, Some(record.spec.id.as_str()));
        Ok(Response::new(pb::UpsertQueueResponse {
            queue: Some(convert::queue_pb(&record)),
            created,
        }))
    }

    async fn get_queue(
        &self,
        request: Request<pb::GetQueueRequest>,
    ) -> Result<Response<pb::GetQueueResponse>, Status> {
        let caller = caller(&request, READERS)?;
        let id = &request.get_ref().queue_id;
        crate::domain::queue::check_queue_id("queue_id", id)?;
        let record = self.engine.store.queue(&caller.tenant, id).await?;
        Ok(Response::new(pb::GetQueueResponse {
            queue: Some(convert::queue_pb(&record)),
        }))
    }

    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let caller = caller(&request, READERS)?;
        let (after, size) = page(request.get_ref().page.as_ref())?;
        let (queues, more) = self
            .engine
            .store
            .list_queues(&caller.tenant, &after, size)
            .await?;
        let last = queues.last().map(|q| q.spec.id.clone());
        Ok(Response::new(pb::ListQueuesResponse {
            queues: queues.iter().map(convert::queue_pb).collect(),
            page: next_token(more, last.as_deref()),
        }))
    }

    async fn delete_queue(
        &self,
        request: Request<pb::DeleteQueueRequest>,
    ) -> Result<Response<pb::DeleteQueueResponse>, Status> {
        let caller = caller(&request, MANAGERS)?;
        let id = &request.get_ref().queue_id;
        crate::domain::queue::check_queue_id("queue_id", id)?;
        self.engine.store.delete_queue(&caller.tenant, id).await?;
        Ok(Response::new(pb::DeleteQueueResponse {}))
    }

    async fn get_queue_stats(
        &self,
        request: Request<pb::GetQueueStatsRequest>,
    ) -> Result<Response<pb::GetQueueStatsResponse>, Status> {
        let caller = caller(&request, READERS)?;
        let ids = &request.get_ref().queue_ids;
        if ids.len() > 100 {
            return Err(invalid("queue_ids has more than 100 entries").into());
        }
        for id in ids {
            crate::domain::queue::check_queue_id("queue_ids", id)?;
        }
        let stats = self
            .engine
            .store
            .queue_stats(
                &caller.tenant,
                ids,
                self.engine.settings.eta(),
                self.engine.now(),
            )
            .await?;
        Ok(Response::new(pb::GetQueueStatsResponse {
            stats: stats.into_iter().map(|(s, _)| s).collect(),
        }))
    }

    async fn get_ticket(
        &self,
        request: Request<pb::GetTicketRequest>,
    ) -> Result<Response<pb::GetTicketResponse>, Status> {
        let caller = caller(&request, READERS)?;
        let store = &self.engine.store;
        let ticket = match request.into_inner().key {
            Some(pb::get_ticket_request::Key::TicketId(id)) => {
                check_id("ticket_id", &id)?;
                store.ticket(&caller.tenant, &id).await?
            }
            Some(pb::get_ticket_request::Key::ConversationId(id)) => {
                check_id("conversation_id", &id)?;
                store.ticket_of_conversation(&caller.tenant, &id).await?
            }
            None => return Err(invalid("ticket_id or conversation_id is required").into()),
        };
        let agent_involved = [&ticket.assigned_agent_id, &ticket.offered_agent_id]
            .into_iter()
            .any(|a| a.as_deref() == Some(caller.subject.as_str()));
        if owner(&caller).is_some() && !agent_involved {
            return Err(RoutingError::NotFound(format!("ticket {} not found", ticket.id)).into());
        }
        let with_package = manages(&caller) || caller.has(Role::Service) || agent_involved;
        Ok(Response::new(pb::GetTicketResponse {
            ticket: Some(
                self.ticket_view(&caller.tenant, &ticket, with_package)
                    .await?,
            ),
        }))
    }
}
