//! The gRPC adapters: `tandem.dialog.v1.DialogService` and `ModelService` over [`App`].
//!
//! Roles: channel integrations (and services) start conversations and post customer messages;
//! agents post agent messages and review suggestions; every role reads conversations, messages
//! and traces of its tenant; administrators and supervisors manage models. Among agents, only
//! the one assigned to a conversation writes in it, types in it, closes it or takes its agent
//! view (supervisors and administrators may close it and take the agent view). The tenant always
//! comes from the token, so another tenant's conversation is simply not found.

use std::pin::Pin;
use std::sync::Arc;

use tandem_platform::auth::{Caller, Role, caller};
use tandem_platform::error::status_from;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::dialog::v1 as pb;
use tandem_proto::pb::dialog::v1::dialog_service_server::DialogService;
use tandem_proto::pb::dialog::v1::model_service_server::ModelService;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::app::{Actor, App, DialogError};

const CUSTOMER_SIDE: &[Role] = &[Role::Channel, Role::Service, Role::Admin];
const EVERYONE: &[Role] = &[
    Role::Channel,
    Role::Agent,
    Role::Supervisor,
    Role::Admin,
    Role::Service,
];
const AGENTS: &[Role] = &[Role::Agent, Role::Supervisor, Role::Admin];
const MODEL_ADMINS: &[Role] = &[Role::Admin, Role::Supervisor];
/// Suggestion ids a watcher remembers to skip the second copy of an update.
const SEEN_SUGGESTIONS: usize = 64;

/// The gRPC services.
#[derive(Clone)]
pub struct DialogGrpc {
    app: Arc<App>,
}

impl DialogGrpc {
    /// Wraps the application.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

fn who<'a, T>(req: &'a Request<T>, roles: &[Role]) -> Result<&'a Caller, Status> {
    let c = caller(req)?;
    c.require_any(roles).map_err(|e| status_from(&e))?;
    Ok(c)
}

fn actor(c: &Caller) -> Actor {
    Actor {
        id: c.subject.clone(),
        agent: c.has(Role::Agent)
            && !c.has(Role::Channel)
            && !c.has(Role::Service)
            && !c.has(Role::Admin),
        supervisor: c.has(Role::Supervisor) || c.has(Role::Admin),
    }
}

fn st(e: &DialogError) -> Status {
    status_from(e)
}

/// Page size 1..=max, 0 meaning 20; offset from the token. A token so large that the offset
/// past the page (and the one more row read to tell whether there is a next page) would not fit
/// an `i64` is refused.
fn page(p: Option<&common::PageRequest>, max: i32) -> Result<(i64, i64), Status> {
    let size = match p.map_or(0, |p| p.page_size) {
        0 => 20,
        n if (1..=max).contains(&n) => n,
        n => {
            return Err(Status::invalid_argument(format!(
                "page.page_size is {n}, outside 0..={max}"
            )));
        }
    };
    let token = p.map_or("", |p| p.page_token.as_str());
    let offset = if token.is_empty() {
        0
    } else {
        token
            .parse::<i64>()
            .ok()
            .filter(|o| *o >= 0)
            .ok_or_else(|| {
                Status::invalid_argument("page.page_token is not a token of this service")
            })?
    };
    let size = i64::from(size);
    if offset.checked_add(size + 1).is_none() {
        return Err(Status::invalid_argument("page.page_token is out of range"));
    }
    Ok((size, offset))
}

fn next(has_more: bool, next_offset: i64) -> Option<common::PageResponse> {
    Some(common::PageResponse {
        next_page_token: if has_more {
            next_offset.to_string()
        } else {
            String::new()
        },
    })
}

type BoxStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// Sends a watcher the stored messages after `resume`, then the live updates of `conversation`
/// from `live`, until the client goes away, falls behind or loses the agent view.
#[allow(
    clippy::too_many_arguments,
    reason = "the watch's state, moved into its task"
)]
async fn relay_updates(
    mut live: tokio::sync::broadcast::Receiver<crate::app::Broadcast>,
    tx: tokio::sync::mpsc::Sender<Result<pb::WatchConversationResponse, Status>>,
    app: Arc<App>,
    tenant: tandem_proto::ids::TenantId,
    conversation: pb::Conversation,
    resume: Option<i64>,
    agent_view: bool,
    actor: Actor,
) {
    let mut high = resume.unwrap_or(conversation.message_count);
    if let Some(after) = resume
        && !send_stored(
            &tx,
            &app,
            &tenant,
            &conversation.id,
            after,
            10_000,
            &mut high,
        )
        .await
    {
        return;
    }
    // Suggestions already sent: a replica's own updates also come back through the bus.
    let mut suggestions = std::collections::VecDeque::with_capacity(SEEN_SUGGESTIONS);
    loop {
        let received = tokio::select! {
            r = live.recv() => r,
            // The client went away while the conversation is quiet.
            () = tx.closed() => return,
        };
        let mut b = match received {
            Ok(b) => b,
            Err(RecvError::Lagged(_)) => {
                let _ = tx
                    .send(Err(Status::aborted(
                        "the watcher fell behind; resume from the last cursor",
                    )))
                    .await;
                return;
            }
            Err(RecvError::Closed) => return,
        };
        if b.agent_only && !agent_view {
            continue;
        }
        match &b.update.update {
            Some(pb::conversation_update::Update::MessagePosted(m)) => {
                if m.sequence <= high {
                    continue;
                }
                // Updates from two replicas may overtake each other: what is missing
                // before this message comes from the store, so the watcher never skips
                // a message.
                if m.sequence > high + 1 {
                    let missing = m.sequence - high - 1;
                    let (id, from) = (&conversation.id, high);
                    if !send_stored(&tx, &app, &tenant, id, from, missing, &mut high).await {
                        return;
                    }
                }
                high = m.sequence;
            }
            // The agent view ends for an agent who no longer holds the conversation (a
            // transfer, or its return to the queue or the bot); supervisors keep it.
            Some(pb::conversation_update::Update::StateChanged(change))
                if agent_view && !actor.supervisor && change.assigned_agent_id != actor.id =>
            {
                let _ = tx
                    .send(Ok(pb::WatchConversationResponse {
                        update: Some(b.update.clone()),
                    }))
                    .await;
                let _ = tx
                    .send(Err(Status::permission_denied(
                        "the conversation is no longer assigned to this agent",
                    )))
                    .await;
                return;
            }
            Some(pb::conversation_update::Update::Suggestion(s)) => {
                if suggestions.contains(&s.id) {
                    continue;
                }
                if suggestions.len() == SEEN_SUGGESTIONS {
                    suggestions.pop_front();
                }
                suggestions.push_back(s.id.clone());
            }
            _ => {}
        }
        if b.update.cursor.is_empty() {
            b.update.cursor = high.to_string();
        }
        if tx
            .send(Ok(pb::WatchConversationResponse {
                update: Some(b.update),
            }))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Sends a watcher up to `limit` stored messages after sequence `after`, raising `high` to the
/// last one sent. Returns false when the watch must end (the reader left, or the store failed
/// and the error was sent).
async fn send_stored(
    tx: &tokio::sync::mpsc::Sender<Result<pb::WatchConversationResponse, Status>>,
    app: &App,
    tenant: &tandem_proto::ids::TenantId,
    conversation_id: &str,
    after: i64,
    limit: i64,
    high: &mut i64,
) -> bool {
    let messages = match app.messages(tenant, conversation_id, after, limit).await {
        Ok(messages) => messages,
        Err(e) => {
            let _ = tx.send(Err(st(&e))).await;
            return false;
        }
    };
    for m in messages {
        *high = (*high).max(m.sequence);
        let update = pb::ConversationUpdate {
            cursor: m.sequence.to_string(),
            occurred_at: m.created_at,
            update: Some(pb::conversation_update::Update::MessagePosted(m)),
        };
        let response = pb::WatchConversationResponse {
            update: Some(update),
        };
        if tx.send(Ok(response)).await.is_err() {
            return false;
        }
    }
    true
}

#[tonic::async_trait]
impl DialogService for DialogGrpc {
    async fn start_conversation(
        &self,
        req: Request<pb::StartConversationRequest>,
    ) -> Result<Response<pb::StartConversationResponse>, Status> {
        let tenant = who(&req, CUSTOMER_SIDE)?.tenant.clone();
        let r = self
            .app
            .start(&tenant, req.into_inner())
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(r))
    }

    async fn post_customer_message(
        &self,
        req: Request<pb::PostCustomerMessageRequest>,
    ) -> Result<Response<pb::PostCustomerMessageResponse>, Status> {
        let tenant = who(&req, CUSTOMER_SIDE)?.tenant.clone();
        // The caller's own token, forwarded to the knowledge search (see `knowledge`).
        let authorization = req.metadata().get("authorization").cloned();
        let r = self
            .app
            .post_customer(&tenant, req.into_inner(), authorization.as_ref())
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(r))
    }

    async fn post_agent_message(
        &self,
        req: Request<pb::PostAgentMessageRequest>,
    ) -> Result<Response<pb::PostAgentMessageResponse>, Status> {
        let c = who(&req, &[Role::Agent])?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let r = self
            .app
            .post_agent(&tenant, &actor, req.into_inner())
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(r))
    }

    async fn get_conversation(
        &self,
        req: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::GetConversationResponse>, Status> {
        let tenant = who(&req, EVERYONE)?.tenant.clone();
        let c = self
            .app
            .get(&tenant, &req.get_ref().conversation_id)
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(pb::GetConversationResponse {
            conversation: Some(c),
        }))
    }

    async fn list_messages(
        &self,
        req: Request<pb::ListMessagesRequest>,
    ) -> Result<Response<pb::ListMessagesResponse>, Status> {
        let tenant = who(&req, EVERYONE)?.tenant.clone();
        let r = req.get_ref();
        let (size, offset) = page(r.page.as_ref(), 200)?;
        if r.after_sequence < 0 {
            return Err(Status::invalid_argument("after_sequence is negative"));
        }
        // The token is the last sequence returned.
        let after = r.after_sequence.max(offset);
        let mut messages = self
            .app
            .messages(&tenant, &r.conversation_id, after, size + 1)
            .await
            .map_err(|e| st(&e))?;
        let more = messages.len() > usize::try_from(size).unwrap_or(usize::MAX);
        messages.truncate(usize::try_from(size).unwrap_or(usize::MAX));
        let last = messages.last().map_or(after, |m| m.sequence);
        Ok(Response::new(pb::ListMessagesResponse {
            messages,
            page: next(more, last),
        }))
    }

    type WatchConversationStream = BoxStream<pb::WatchConversationResponse>;

    async fn watch_conversation(
        &self,
        req: Request<pb::WatchConversationRequest>,
    ) -> Result<Response<Self::WatchConversationStream>, Status> {
        let c = who(&req, EVERYONE)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let r = req.into_inner();
        let view = pb::ConversationView::try_from(r.view)
            .ok()
            .filter(|v| *v != pb::ConversationView::Unspecified)
            .ok_or_else(|| Status::invalid_argument("view is required"))?;
        let agent_view = view == pb::ConversationView::Agent;
        let resume = if r.resume_after.is_empty() {
            None
        } else {
            Some(
                r.resume_after
                    .parse::<i64>()
                    .ok()
                    .filter(|c| *c >= 0)
                    .ok_or_else(|| Status::invalid_argument("resume_after is not a cursor"))?,
            )
        };
        // Subscribe first, then read the conversation and replay, so an update committed in
        // between arrives live (a message already counted by the read is skipped).
        let live = self.app.hub.subscribe(&tenant, &r.conversation_id);
        let conversation = match self.app.get(&tenant, &r.conversation_id).await {
            Ok(c)
                if agent_view
                    && !actor.supervisor
                    && !(actor.agent && c.assigned_agent_id == actor.id) =>
            {
                Err(Status::permission_denied(
                    "the agent view is for the assigned agent or a supervisor",
                ))
            }
            // A cursor past the last message would silently skip the messages up to it.
            Ok(c) if resume.is_some_and(|after| after > c.message_count) => Err(
                Status::out_of_range("resume_after is past the conversation's last message"),
            ),
            Ok(c) => Ok(c),
            Err(e) => Err(st(&e)),
        };
        let conversation = match conversation {
            Ok(c) => c,
            Err(status) => {
                drop(live);
                self.app.hub.release(&tenant, &r.conversation_id);
                return Err(status);
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let app = Arc::clone(&self.app);
        let hub = (
            Arc::clone(&self.app),
            tenant.clone(),
            conversation.id.clone(),
        );
        tokio::spawn(async move {
            relay_updates(
                live,
                tx,
                app,
                tenant,
                conversation,
                resume,
                agent_view,
                actor,
            )
            .await;
            // The stream ended (the client went away, or it was ended here): the conversation's
            // channel goes once its last watcher on this replica is gone.
            hub.0.hub.release(&hub.1, &hub.2);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn set_typing(
        &self,
        req: Request<pb::SetTypingRequest>,
    ) -> Result<Response<pb::SetTypingResponse>, Status> {
        let c = who(&req, EVERYONE)?;
        let (tenant, subject) = (c.tenant.clone(), c.subject.clone());
        // The channel (or a service relaying it) types for the customer; anyone else types as
        // an agent, and only the agent assigned to the conversation may.
        let customer_side = c.has(Role::Channel) || c.has(Role::Service);
        let r = req.get_ref();
        let conversation = self
            .app
            .get(&tenant, &r.conversation_id)
            .await
            .map_err(|e| st(&e))?;
        if conversation.state == pb::ConversationState::Closed as i32 {
            return Err(Status::failed_precondition(format!(
                "conversation {} is closed",
                conversation.id
            )));
        }
        let kind = if customer_side {
            pb::SenderKind::Customer
        } else if !subject.is_empty() && conversation.assigned_agent_id == subject {
            pb::SenderKind::Agent
        } else {
            return Err(Status::permission_denied(format!(
                "{subject} is not the agent assigned to conversation {}",
                conversation.id
            )));
        };
        self.app.hub.publish(
            &tenant,
            &conversation.id,
            vec![crate::app::Broadcast {
                update: pb::ConversationUpdate {
                    cursor: conversation.message_count.to_string(),
                    occurred_at: Some(crate::app::now()),
                    update: Some(pb::conversation_update::Update::Typing(pb::Typing {
                        sender_kind: kind as i32,
                        sender_id: subject,
                        typing: r.typing,
                    })),
                },
                agent_only: false,
            }],
        );
        Ok(Response::new(pb::SetTypingResponse {}))
    }

    async fn close_conversation(
        &self,
        req: Request<pb::CloseConversationRequest>,
    ) -> Result<Response<pb::CloseConversationResponse>, Status> {
        let c = who(&req, EVERYONE)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let c = self
            .app
            .close(&tenant, &actor, req.into_inner())
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(pb::CloseConversationResponse {
            conversation: Some(c),
        }))
    }

    async fn cancel_handoff(
        &self,
        req: Request<pb::CancelHandoffRequest>,
    ) -> Result<Response<pb::CancelHandoffResponse>, Status> {
        let tenant = who(&req, CUSTOMER_SIDE)?.tenant.clone();
        let c = self
            .app
            .cancel_handoff(&tenant, req.into_inner())
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(pb::CancelHandoffResponse {
            conversation: Some(c),
        }))
    }

    async fn resolve_conversation(
        &self,
        req: Request<pb::ResolveConversationRequest>,
    ) -> Result<Response<pb::ResolveConversationResponse>, Status> {
        let c = who(&req, EVERYONE)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let c = self
            .app
            .resolve(&tenant, &actor, req.into_inner())
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(pb::ResolveConversationResponse {
            conversation: Some(c),
        }))
    }

    async fn get_decision_trace(
        &self,
        req: Request<pb::GetDecisionTraceRequest>,
    ) -> Result<Response<pb::GetDecisionTraceResponse>, Status> {
        let tenant = who(&req, EVERYONE)?.tenant.clone();
        let (id, message) = match &req.get_ref().key {
            Some(pb::get_decision_trace_request::Key::TraceId(t)) => (Some(t.as_str()), None),
            Some(pb::get_decision_trace_request::Key::MessageId(m)) => (None, Some(m.as_str())),
            None => (None, None),
        };
        let t = self
            .app
            .trace(&tenant, id, message)
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(pb::GetDecisionTraceResponse {
            trace: Some(t),
        }))
    }

    async fn list_decision_traces(
        &self,
        req: Request<pb::ListDecisionTracesRequest>,
    ) -> Result<Response<pb::ListDecisionTracesResponse>, Status> {
        let tenant = who(&req, EVERYONE)?.tenant.clone();
        let r = req.get_ref();
        let (size, offset) = page(r.page.as_ref(), 100)?;
        let mut traces = self
            .app
            .traces(&tenant, &r.conversation_id, offset, size + 1)
            .await
            .map_err(|e| st(&e))?;
        let more = traces.len() > usize::try_from(size).unwrap_or(usize::MAX);
        traces.truncate(usize::try_from(size).unwrap_or(usize::MAX));
        Ok(Response::new(pb::ListDecisionTracesResponse {
            traces,
            page: next(more, offset.saturating_add(size)),
        }))
    }

    async fn review_suggestion(
        &self,
        req: Request<pb::ReviewSuggestionRequest>,
    ) -> Result<Response<pb::ReviewSuggestionResponse>, Status> {
        let c = who(&req, AGENTS)?;
        let (tenant, actor) = (c.tenant.clone(), actor(c));
        let s = self
            .app
            .review(&tenant, &actor, req.into_inner())
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(pb::ReviewSuggestionResponse {
            suggestion: Some(s),
        }))
    }
}

#[tonic::async_trait]
impl ModelService for DialogGrpc {
    async fn upload_examples(
        &self,
        req: Request<pb::UploadExamplesRequest>,
    ) -> Result<Response<pb::UploadExamplesResponse>, Status> {
        let tenant = who(&req, MODEL_ADMINS)?.tenant.clone();
        let r = self
            .app
            .upload_examples(&tenant, req.into_inner())
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(r))
    }

    async fn train_model(
        &self,
        req: Request<pb::TrainModelRequest>,
    ) -> Result<Response<pb::TrainModelResponse>, Status> {
        let c = who(&req, MODEL_ADMINS)?;
        let (tenant, subject) = (c.tenant.clone(), c.subject.clone());
        let v = self
            .app
            .train_model(&tenant, &subject, req.into_inner())
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(pb::TrainModelResponse {
            model_version: Some(v),
        }))
    }

    async fn evaluate_model(
        &self,
        req: Request<pb::EvaluateModelRequest>,
    ) -> Result<Response<pb::EvaluateModelResponse>, Status> {
        let tenant = who(&req, MODEL_ADMINS)?.tenant.clone();
        let (id, metrics) = self
            .app
            .evaluate_model(&tenant, req.into_inner())
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(pb::EvaluateModelResponse {
            model_version_id: id,
            metrics: Some(metrics),
        }))
    }

    async fn list_model_versions(
        &self,
        req: Request<pb::ListModelVersionsRequest>,
    ) -> Result<Response<pb::ListModelVersionsResponse>, Status> {
        let tenant = who(&req, MODEL_ADMINS)?.tenant.clone();
        let (size, offset) = page(req.get_ref().page.as_ref(), 100)?;
        let mut versions = self
            .app
            .store()
            .models(&tenant, offset, size + 1)
            .await
            .map_err(|e| st(&DialogError::from(e)))?;
        let more = versions.len() > usize::try_from(size).unwrap_or(usize::MAX);
        versions.truncate(usize::try_from(size).unwrap_or(usize::MAX));
        Ok(Response::new(pb::ListModelVersionsResponse {
            model_versions: versions,
            page: next(more, offset.saturating_add(size)),
        }))
    }

    async fn activate_model_version(
        &self,
        req: Request<pb::ActivateModelVersionRequest>,
    ) -> Result<Response<pb::ActivateModelVersionResponse>, Status> {
        let c = who(&req, MODEL_ADMINS)?;
        let (tenant, subject) = (c.tenant.clone(), c.subject.clone());
        let r = req.get_ref();
        if r.model_version_id.is_empty() {
            return Err(Status::invalid_argument("model_version_id is empty"));
        }
        crate::app::check_note("reason", &r.reason, 1_000).map_err(|e| st(&e))?;
        let (v, previous) = self
            .app
            .activate_model(&tenant, &subject, &r.model_version_id)
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(pb::ActivateModelVersionResponse {
            model_version: Some(v),
            previous_model_version_id: previous,
        }))
    }

    async fn get_model_version(
        &self,
        req: Request<pb::GetModelVersionRequest>,
    ) -> Result<Response<pb::GetModelVersionResponse>, Status> {
        let tenant = who(&req, MODEL_ADMINS)?.tenant.clone();
        let v = self
            .app
            .model_version(&tenant, &req.get_ref().model_version_id)
            .await
            .map_err(|e| st(&e))?;
        Ok(Response::new(pb::GetModelVersionResponse {
            model_version: Some(v),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use tandem_platform::config::{DatabaseConfig, Secret};
    use tandem_platform::db::Db;
    use tandem_platform::outbox::OutboxWaker;
    use tandem_platform::runtime::Service as _;
    use tandem_proto::ids::TenantId;
    use tokio_stream::StreamExt as _;

    use super::*;
    use crate::app::AppOptions;
    use crate::store::Store;

    fn as_channel<T>(message: T) -> Request<T> {
        let mut req = Request::new(message);
        req.extensions_mut().insert(Caller {
            tenant: TenantId::new("acme").unwrap(),
            subject: "web".into(),
            roles: vec![Role::Channel],
        });
        req
    }

    /// A watch whose client went away leaves nothing behind on the replica, even on a
    /// conversation that stays quiet; a cursor past the last message is refused.
    #[tokio::test]
    async fn a_dropped_watch_releases_its_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("dialog.db").display());
        let db = Db::connect(&DatabaseConfig {
            url: Secret::new(url),
            ..DatabaseConfig::default()
        })
        .await
        .unwrap();
        db.migrate(Some(crate::Dialog::migrations())).await.unwrap();
        let app = Arc::new(App::new(
            Store::new(db),
            OutboxWaker::default(),
            AppOptions {
                cache_ttl: Duration::from_secs(2),
                knowledge: None,
                repeat_contact_window: Duration::ZERO,
                queue_stats_max_age: Duration::from_secs(900),
            },
        ));
        let grpc = DialogGrpc::new(Arc::clone(&app));
        let started = grpc
            .start_conversation(as_channel(pb::StartConversationRequest {
                customer: Some(common::Customer {
                    id: "c-1".into(),
                    ..Default::default()
                }),
                channel: common::Channel::WebChat as i32,
                client_conversation_id: "k1".into(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .conversation
            .unwrap();
        let tenant = TenantId::new("acme").unwrap();
        let watch = |resume_after: &str| {
            as_channel(pb::WatchConversationRequest {
                conversation_id: started.id.clone(),
                view: pb::ConversationView::Customer as i32,
                resume_after: resume_after.into(),
            })
        };
        let past = grpc.watch_conversation(watch("99")).await.err().unwrap();
        assert_eq!(past.code(), tonic::Code::OutOfRange);
        assert!(!app.hub.watched(&tenant, &started.id));
        let stream = grpc
            .watch_conversation(watch(""))
            .await
            .unwrap()
            .into_inner();
        assert!(app.hub.watched(&tenant, &started.id));
        drop(stream);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while app.hub.watched(&tenant, &started.id) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the watch outlived its client"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A stream still open keeps receiving.
        let mut stream = grpc
            .watch_conversation(watch(""))
            .await
            .unwrap()
            .into_inner();
        app.hub.publish(
            &tenant,
            &started.id,
            vec![crate::app::Broadcast {
                update: pb::ConversationUpdate::default(),
                agent_only: false,
            }],
        );
        let got = tokio::time::timeout(Duration::from_secs(2), stream.next()).await;
        assert!(matches!(got, Ok(Some(Ok(_)))), "{got:?}");
    }
}
