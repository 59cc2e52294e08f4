//! The agent desk's live session (`AgentSession`).
//!
//! The client opens with `hello`; routing records the session (replacing any other of the same
//! agent), answers `welcome` and pushes the agent's active assignments (`assignment_confirmed`,
//! so a desk that dropped during an accept still learns of the conversation) and pending offers. A `hello` whose
//! `resume_session_id` names the agent's session that is still open or ended less than
//! `session_grace` ago resumes it: the welcome carries that id, presence stays as it is and the
//! pending offers are sent once on the new stream. Any other id (unknown, expired, another
//! agent's) opens a new session, as a `hello` without one does; the welcome's session id tells
//! the desk which happened. From then on the session
//! pushes what the database says: a new pending offer (preceded by a transfer note when the
//! conversation was transferred), and a revocation when an offer it showed stops being pending
//! for any reason other than this session's own answer. It wakes when this process changes the
//! agent's offers and also polls, so offers made by other replicas arrive too. The stream
//! ending is a session drop: the agent goes offline after the grace period.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;

use tandem_proto::ids::TenantId;
use tandem_proto::pb::routing::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::convert;
use crate::domain::agent::Presence;
use crate::domain::{check_id, check_len};
use crate::engine::Engine;
use crate::error::{RoutingError, RoutingResult};
use crate::store::{DeskView, OfferState, PresenceReason};

type Outbound = mpsc::Sender<Result<pb::AgentSessionResponse, Status>>;

fn error_code(error: &RoutingError) -> pb::SessionErrorCode {
    match error {
        RoutingError::NotFound(_) | RoutingError::NotYours(_) => pb::SessionErrorCode::NotFound,
        RoutingError::OfferExpired(_) => pb::SessionErrorCode::OfferExpired,
        RoutingError::OfferTaken(_) => pb::SessionErrorCode::OfferTaken,
        RoutingError::InvalidArgument(_) => pb::SessionErrorCode::InvalidArgument,
        RoutingError::FailedPrecondition(_) | RoutingError::PermissionDenied(_) => {
            pb::SessionErrorCode::InvalidArgument
        }
        RoutingError::AlreadyExists(_)
        | RoutingError::Conflict(_)
        | RoutingError::Storage(_)
        | RoutingError::Corrupt(_) => pb::SessionErrorCode::Internal,
    }
}

fn error_event(code: pb::SessionErrorCode, message: String) -> pb::agent_session_response::Event {
    pb::agent_session_response::Event::Error(pb::SessionError {
        code: code.into(),
        message,
    })
}

/// Answers a request refused before the session is open (the stream then ends).
async fn refuse(out: &Outbound, in_reply_to: String, error: &RoutingError) {
    let _ = out
        .send(Ok(pb::AgentSessionResponse {
            in_reply_to,
            event: Some(error_event(error_code(error), error.to_string())),
        }))
        .await;
}

struct Session {
    engine: Arc<Engine>,
    tenant: TenantId,
    agent_id: String,
    session_id: String,
    /// This stream's epoch of the session (another stream may resume the same id).
    epoch: i64,
    out: Outbound,
    /// Offers shown to the desk and still believed pending.
    shown: HashMap<String, ()>,
    /// Offers whose accept is with the batcher: they leave `shown` when it answers, not when a
    /// sync finds them no longer pending.
    answering: HashSet<String>,
    /// Tickets whose assignment to this agent the desk was told of (an `AssignmentConfirmed`)
    /// and which are still assigned.
    confirmed: HashSet<String>,
}

/// What the session loop acts on next.
enum Step {
    Command(pb::AgentSessionRequest),
    Accepted(Box<AcceptDone>),
    Wake,
    Poll,
}

/// The `AssignmentConfirmed` event of an assigned ticket.
fn confirmation(
    ticket: &crate::store::TicketRecord,
    ageing_per_second: f64,
    now: chrono::DateTime<chrono::Utc>,
) -> RoutingResult<pb::agent_session_response::Event> {
    let package = convert::package(ticket)?;
    let ticket = convert::ticket_pb(ticket, ageing_per_second, now, true)?;
    Ok(pb::agent_session_response::Event::AssignmentConfirmed(
        pb::AssignmentConfirmed {
            ticket: Some(ticket),
            package: Some(package),
        },
    ))
}

/// An accept the batcher answered.
struct AcceptDone {
    request_id: String,
    offer_id: String,
    result: RoutingResult<crate::store::Accepted>,
}

impl Session {
    async fn send(&self, in_reply_to: &str, event: pb::agent_session_response::Event) -> bool {
        self.out
            .send(Ok(pb::AgentSessionResponse {
                in_reply_to: in_reply_to.to_owned(),
                event: Some(event),
            }))
            .await
            .is_ok()
    }

    async fn fail(&self, in_reply_to: &str, error: &RoutingError) -> bool {
        if matches!(error, RoutingError::Storage(_) | RoutingError::Corrupt(_)) {
            tracing::warn!(error = %tandem_platform::error::DisplayChain(error), "session command failed");
        }
        let message = match error {
            RoutingError::Storage(_) | RoutingError::Corrupt(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        self.send(in_reply_to, error_event(error_code(error), message))
            .await
    }

    /// Whether the desk knows of the assignment of `ticket_id` by accepting `offer_id`: it was
    /// confirmed on this stream, or this stream's accept of it is still being answered.
    fn knows_assignment(&self, ticket_id: &str, offer_id: &str) -> bool {
        self.confirmed.contains(ticket_id) || self.answering.contains(offer_id)
    }

    /// Pushes assignments the desk was not told of, new pending offers and revocations of shown
    /// ones, from a [`DeskView`] read with `known` = the offers shown and the assignments known
    /// (so only new offers' and assignments' tickets were read).
    ///
    /// Assignments come first: a new stream (a reconnect, a resume) learns this way of the
    /// conversations it holds, including one whose accept committed while the previous stream
    /// was dropping and so never got its confirmation.
    async fn sync(&mut self, view: DeskView) -> RoutingResult<bool> {
        let assigned = view.assigned;
        self.confirmed
            .retain(|ticket| assigned.iter().any(|(id, _, _)| id == ticket));
        let now = self.engine.now();
        for (ticket_id, offer_id, ticket) in &assigned {
            if self.knows_assignment(ticket_id, offer_id) {
                continue;
            }
            let Some(ticket) = ticket else {
                return Err(RoutingError::Corrupt(format!(
                    "ticket {ticket_id} of an assignment vanished"
                )));
            };
            // An assigned ticket waits no longer, so its queue's ageing weight does not count.
            if !self.send("", confirmation(ticket, 0.0, now)?).await {
                return Ok(false);
            }
            self.confirmed.insert(ticket_id.clone());
        }
        let pending = view.pending;
        for (offer, ticket) in &pending {
            if self.shown.contains_key(&offer.id) {
                continue;
            }
            // Read pending just before its accept committed (the two reads are separate
            // statements): the assignment above stands for it.
            if assigned
                .iter()
                .any(|(_, accepted, _)| *accepted == offer.id)
            {
                continue;
            }
            let Some(ticket) = ticket else {
                return Err(RoutingError::Corrupt(format!(
                    "ticket {} of offer {} vanished",
                    offer.ticket_id, offer.id
                )));
            };
            if let Some(from) = &ticket.transfer_from {
                let note = pb::TransferNote {
                    from_agent_id: from.clone(),
                    note: ticket.transfer_note.clone().unwrap_or_default(),
                    package: Some(convert::package(ticket)?),
                    kind: match ticket.transfer_kind {
                        Some(crate::store::TransferKind::Warm) => pb::TransferKind::Warm,
                        Some(crate::store::TransferKind::Cold) => pb::TransferKind::Cold,
                        None => pb::TransferKind::Unspecified,
                    }
                    .into(),
                };
                if !self
                    .send("", pb::agent_session_response::Event::TransferNote(note))
                    .await
                {
                    return Ok(false);
                }
            }
            let event = pb::agent_session_response::Event::Offer(convert::offer_pb(offer, ticket)?);
            if !self.send("", event).await {
                return Ok(false);
            }
            self.shown.insert(offer.id.clone(), ());
        }
        let gone: Vec<String> = self
            .shown
            .keys()
            .filter(|id| !self.answering.contains(*id))
            .filter(|id| !pending.iter().any(|(o, _)| &o.id == *id))
            .cloned()
            .collect();
        for id in gone {
            self.shown.remove(&id);
            let offer = self.engine.store.offer(&self.tenant, &id).await?;
            let reason = match (offer.state, offer.revoke_reason.as_deref()) {
                (OfferState::Expired, _) => pb::OfferRevokedReason::Timeout,
                (OfferState::Revoked, Some("customer_left")) => {
                    pb::OfferRevokedReason::CustomerLeft
                }
                (OfferState::Revoked, Some("cancelled")) => pb::OfferRevokedReason::Cancelled,
                (OfferState::Revoked, _) => pb::OfferRevokedReason::Taken,
                // Answered by this agent (perhaps on another replica's session).
                (OfferState::Accepted | OfferState::Declined | OfferState::Pending, _) => continue,
            };
            let event = pb::agent_session_response::Event::OfferRevoked(pb::OfferRevoked {
                offer_id: id,
                reason: reason.into(),
            });
            if !self.send("", event).await {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Answers an accept once the batcher did it: the assignment confirmation, or the error.
    /// Returns false when the stream is gone.
    async fn answer_accept(&mut self, done: AcceptDone) -> bool {
        let AcceptDone {
            request_id,
            offer_id,
            result,
        } = done;
        let engine = Arc::clone(&self.engine);
        let now = engine.now();
        let result = match result {
            Ok(done) => {
                self.shown.remove(&done.offer.id);
                if let Some(previous) = &done.previous_agent {
                    engine.hub.notify(&self.tenant, previous);
                }
                let event = confirmation(&done.ticket, done.ageing_per_second, now);
                if event.is_ok() {
                    self.confirmed.insert(done.ticket.id.clone());
                }
                event
            }
            Err(error) => {
                if matches!(error, RoutingError::OfferExpired(_)) {
                    self.shown.remove(&offer_id);
                    engine.drain_later(&self.tenant, None);
                }
                Err(error)
            }
        };
        match result {
            Ok(event) => self.send(&request_id, event).await,
            Err(error) => self.fail(&request_id, &error).await,
        }
    }

    /// Handles one command; returns false when the session must end.
    async fn handle(&mut self, request: pb::AgentSessionRequest) -> bool {
        use pb::agent_session_request::Command;
        let reply = request.request_id.as_str();
        let engine = Arc::clone(&self.engine);
        let now = engine.now();
        let result: RoutingResult<Option<pb::agent_session_response::Event>> = match request.command
        {
            Some(Command::Hello(_)) => {
                return self
                    .send(
                        reply,
                        error_event(
                            pb::SessionErrorCode::Protocol,
                            "hello was already sent".into(),
                        ),
                    )
                    .await;
            }
            None => Err(RoutingError::InvalidArgument(
                "the message has no command".into(),
            )),
            Some(Command::Accept(_)) => {
                // Accepts are answered through the batcher (see `run`); never reached.
                Err(RoutingError::InvalidArgument(
                    "accept handled elsewhere".into(),
                ))
            }
            Some(Command::Decline(decline)) => match check_len("reason", &decline.reason, 200) {
                Err(error) => Err(error),
                Ok(()) => engine
                    .store
                    .decline(
                        &self.tenant,
                        &self.agent_id,
                        &decline.offer_id,
                        &decline.reason,
                        now,
                    )
                    .await
                    .map(|ticket| {
                        self.shown.remove(&decline.offer_id);
                        engine.drain_later(&self.tenant, Some(ticket.queue_id.as_str()));
                        None
                    }),
            },
            Some(Command::Heartbeat(_)) => {
                match engine
                    .store
                    .heartbeat(
                        &self.tenant,
                        &self.agent_id,
                        &self.session_id,
                        self.epoch,
                        now,
                    )
                    .await
                {
                    Ok(true) => Ok(None),
                    Ok(false) => {
                        self.send(
                            reply,
                            error_event(
                                pb::SessionErrorCode::Superseded,
                                "another session of this agent replaced this one".into(),
                            ),
                        )
                        .await;
                        return false;
                    }
                    Err(error) => Err(error),
                }
            }
            Some(Command::WrapUp(wrap)) => {
                match convert::wrap_up_disposition(wrap.disposition)
                    .and_then(|d| check_len("notes", &wrap.notes, 2000).map(|()| d))
                {
                    Err(error) => Err(error),
                    Ok(disposition) => engine
                        .store
                        .complete(
                            &self.tenant,
                            &wrap.ticket_id,
                            Some(&self.agent_id),
                            disposition,
                            now,
                        )
                        .await
                        .map(|(_, revoked)| {
                            for offer in revoked {
                                engine.hub.notify(&self.tenant, &offer.agent_id);
                            }
                            engine.drain_later(&self.tenant, None);
                            None
                        }),
                }
            }
            Some(Command::SetPresence(set)) => {
                match convert::presence(set.presence).and_then(|p| {
                    p.ok_or_else(|| RoutingError::InvalidArgument("presence is required".into()))
                }) {
                    Err(error) => Err(error),
                    Ok(to) => match check_len("reason", &set.reason, 200) {
                        Err(error) => Err(error),
                        Ok(()) => engine
                            .store
                            .set_presence(
                                &self.tenant,
                                &self.agent_id,
                                to,
                                PresenceReason::Manual,
                                &set.reason,
                                now,
                            )
                            .await
                            .map(|_| {
                                engine.drain_later(&self.tenant, None);
                                None
                            }),
                    },
                }
            }
        };
        match result {
            Ok(Some(event)) => self.send(reply, event).await,
            Ok(None) => true,
            Err(error) => self.fail(reply, &error).await,
        }
    }
}

/// Whether the stream `epoch` of session `mine` was replaced: another session is open, or a
/// newer stream resumed this one.
fn replaced(current: Option<&str>, current_epoch: i64, mine: &str, epoch: i64) -> bool {
    current.is_some_and(|current| current != mine || current_epoch != epoch)
}

/// Runs one session until the client ends the stream, the session is replaced, or shutdown.
pub async fn run(
    engine: Arc<Engine>,
    tenant: TenantId,
    agent_id: String,
    mut inbound: Streaming<pb::AgentSessionRequest>,
    out: Outbound,
    shutdown: CancellationToken,
) {
    let first = tokio::select! {
        first = inbound.message() => first,
        () = shutdown.cancelled() => return,
    };
    let (request_id, hello) = match first {
        Ok(Some(pb::AgentSessionRequest {
            request_id,
            command: Some(pb::agent_session_request::Command::Hello(hello)),
        })) => (request_id, hello),
        Ok(Some(other)) => {
            let _ = out
                .send(Ok(pb::AgentSessionResponse {
                    in_reply_to: other.request_id,
                    event: Some(error_event(
                        pb::SessionErrorCode::Protocol,
                        "the first message must be hello".into(),
                    )),
                }))
                .await;
            return;
        }
        Ok(None) | Err(_) => return,
    };
    let presence = match convert::presence(hello.presence) {
        Ok(p) => p,
        Err(error) => {
            refuse(&out, request_id, &error).await;
            return;
        }
    };
    let resume = hello.resume_session_id.as_str();
    if !resume.is_empty()
        && let Err(error) = check_id("resume_session_id", resume)
    {
        refuse(&out, request_id, &error).await;
        return;
    }
    let new_session_id = uuid::Uuid::now_v7().to_string();
    let signal = engine.hub.subscribe(&tenant, &agent_id);
    let opened = engine
        .store
        .open_session(
            &tenant,
            &agent_id,
            &new_session_id,
            Some(resume).filter(|r| !r.is_empty()),
            presence,
            engine.settings.session_grace,
            engine.now(),
        )
        .await;
    let (agent, session_id, epoch) = match opened {
        Ok(opened) => {
            if opened.replaced.is_some() {
                // Wake the stream this one replaces, so it notices at once.
                engine.hub.notify(&tenant, &agent_id);
            }
            if !resume.is_empty() && !opened.resumed {
                tracing::debug!(agent = %agent_id, "session to resume unknown or expired, opened a new one");
            }
            (opened.agent, opened.session_id, opened.epoch)
        }
        Err(error) => {
            refuse(&out, request_id, &error).await;
            return;
        }
    };
    let welcome = pb::agent_session_response::Event::Welcome(pb::SessionWelcome {
        session_id: session_id.clone(),
        heartbeat_interval: Some(prost_types::Duration {
            seconds: i64::try_from(engine.settings.heartbeat_interval.as_secs()).unwrap_or(10),
            nanos: i32::try_from(engine.settings.heartbeat_interval.subsec_nanos()).unwrap_or(0),
        }),
        agent: Some(convert::agent_pb(&agent)),
    });
    let mut session = Session {
        engine: Arc::clone(&engine),
        tenant: tenant.clone(),
        agent_id: agent_id.clone(),
        session_id: session_id.clone(),
        epoch,
        out,
        shown: HashMap::new(),
        answering: HashSet::new(),
        confirmed: HashSet::new(),
    };
    if !session.send(&request_id, welcome).await {
        return;
    }
    if agent.presence == Presence::Online
        && let Err(error) = engine.drain_tenant(&tenant).await
    {
        tracing::warn!(error = %tandem_platform::error::DisplayChain(&error), "drain at session open failed");
    }
    let mut poll = tokio::time::interval(engine.settings.session_poll_interval);
    let mut superseded = false;
    // The offers' version at the last full sync; a poll that finds it unchanged skips the sync.
    let mut synced: Option<crate::store::OffersVersion> = None;
    // Accepts handed to the batcher and not answered yet. A desk may send many accepts in a
    // row; they commit together and are answered as they complete.
    let mut accepting: FuturesUnordered<BoxFuture<'static, AcceptDone>> = FuturesUnordered::new();
    'session: loop {
        let step = tokio::select! {
            () = shutdown.cancelled() => break,
            message = inbound.message() => match message {
                Ok(Some(request)) => Step::Command(request),
                Ok(None) | Err(_) => break,
            },
            Some(done) = accepting.next(), if !accepting.is_empty() => Step::Accepted(Box::new(done)),
            () = signal.notified() => Step::Wake,
            _ = poll.tick() => Step::Poll,
        };
        let polled = match step {
            Step::Accepted(done) => {
                session.answering.remove(&done.offer_id);
                if !session.answer_accept(*done).await {
                    break;
                }
                continue;
            }
            Step::Command(pb::AgentSessionRequest {
                request_id,
                command: Some(pb::agent_session_request::Command::Accept(accept)),
            }) => {
                let engine = Arc::clone(&engine);
                let tenant = tenant.clone();
                let agent_id = agent_id.clone();
                session.answering.insert(accept.offer_id.clone());
                accepting.push(Box::pin(async move {
                    let now = engine.now();
                    let result = engine
                        .accept(&tenant, &agent_id, &accept.offer_id, now)
                        .await;
                    AcceptDone {
                        request_id,
                        offer_id: accept.offer_id,
                        result,
                    }
                }));
                continue;
            }
            Step::Command(request) => {
                // Any other command acts after this session's accepts are answered, in the
                // order the desk sent them.
                while let Some(done) = accepting.next().await {
                    session.answering.remove(&done.offer_id);
                    if !session.answer_accept(done).await {
                        break 'session;
                    }
                }
                if !session.handle(request).await {
                    break;
                }
                false
            }
            Step::Wake => false,
            Step::Poll => true,
        };
        if polled {
            match engine.store.session_version(&tenant, &agent_id).await {
                Ok(Some((current, current_epoch, version)))
                    if synced.as_ref() == Some(&version)
                        && !replaced(current.as_deref(), current_epoch, &session_id, epoch) =>
                {
                    continue;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %tandem_platform::error::DisplayChain(&error), "session check failed");
                }
            }
        }
        let view = engine
            .store
            .desk_view(
                &tenant,
                &agent_id,
                |id| session.shown.contains_key(id),
                |ticket, offer| session.knows_assignment(ticket, offer),
            )
            .await;
        match view {
            Ok(Some(view)) => {
                if replaced(view.session_id.as_deref(), view.epoch, &session_id, epoch) {
                    superseded = true;
                    session
                        .send(
                            "",
                            error_event(
                                pb::SessionErrorCode::Superseded,
                                "another session of this agent replaced this one".into(),
                            ),
                        )
                        .await;
                    break;
                }
                synced = Some(view.version.clone());
                match session.sync(view).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(error) => {
                        synced = None;
                        tracing::warn!(error = %tandem_platform::error::DisplayChain(&error), "session sync failed");
                    }
                }
            }
            Ok(None) => {}
            Err(error) => {
                synced = None;
                tracing::warn!(error = %tandem_platform::error::DisplayChain(&error), "session sync failed");
            }
        }
    }
    if !superseded
        && let Err(error) = engine
            .store
            .close_session(&tenant, &agent_id, &session_id, epoch, engine.now())
            .await
    {
        tracing::warn!(error = %tandem_platform::error::DisplayChain(&error), "cannot record the session's end");
    }
}
