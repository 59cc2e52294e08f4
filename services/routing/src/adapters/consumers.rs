//! Consumers of dialog's events (durable `routing-dialog`, shared by the replicas):
//! - `HandoffRequested` enqueues a ticket, idempotently by handoff id, and drains its queue. A
//!   live ticket of the conversation under an earlier handoff (ordered by the package's
//!   transcript sequence, then the request time) is over in dialog, which requests a handoff only
//!   while the bot holds the conversation: a waiting one is returned and replaced, an assignment
//!   completed as resolved (its `ConversationResolved` may still be on its way, or with another
//!   replica). A handoff older than the live ticket arrived late and is refused, as is one
//!   cancelled or whose conversation was closed before it was handled. All are logged and
//!   counted in [`HANDOFF_CONFLICTS_TOTAL`];
//! - `ConversationClosed` abandons a waiting ticket or ends the assignment, freeing the agent;
//! - `HandoffCancelled` hands a waiting ticket back to the bot;
//! - `ConversationResolved` completes the assignment of the handoff it names (disposition
//!   RESOLVED, the agent freed), as `CompleteAssignment` would, when an agent still holds it:
//!   dialog lets the agent resolve the conversation itself (`ResolveConversation`), and the
//!   conversation's next handoff would otherwise be refused. A resolution without a handoff, or
//!   of a ticket no longer assigned, changes nothing.
//!
//! The events of one conversation share its ordering key, so a resolution is applied before the
//! conversation's next `HandoffRequested`. Each effect and its inbox claim commit in one
//! transaction, so a redelivered event changes nothing.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use prost::Message as _;
use tandem_platform::bus::RawEvent;
use tandem_platform::bus::runner::{Handler, HandlerError};
use tandem_proto::events::Event as _;
use tandem_proto::pb::common::v1::CustomerTier;
use tandem_proto::pb::dialog::v1::{
    ConversationClosed, ConversationResolved, HandoffCancelled, HandoffPackage, HandoffRequested,
};

use super::convert;
use crate::domain::check_id;
use crate::domain::queue::check_queue_id;
use crate::domain::ticket::negative_severity;
use crate::engine::Engine;
use crate::error::RoutingError;
use crate::store::{NewTicket, Unassigned};

/// The durable consumer's name.
pub const DURABLE: &str = "routing-dialog";

/// Counter of `HandoffRequested` events that met a live ticket of the same conversation under
/// another handoff id, by `outcome`: `superseded` (the waiting ticket was returned and the new
/// one queued), `completed` (the assignment of the earlier handoff was completed as resolved and
/// the new one queued) or `stale` (the new handoff is older than the live ticket, or was
/// cancelled or its conversation closed before it was handled, and was dropped).
pub const HANDOFF_CONFLICTS_TOTAL: &str = "tandem_routing_handoff_conflicts_total";

/// Handles dialog's events.
pub struct DialogEvents {
    /// The engine.
    pub engine: Arc<Engine>,
}

fn classify(error: RoutingError) -> HandlerError {
    match error {
        RoutingError::Storage(_) | RoutingError::Conflict(_) => {
            HandlerError::Transient(error.to_string())
        }
        other => HandlerError::Permanent(other.to_string()),
    }
}

fn time(value: Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    value.and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?))
}

/// Builds the ticket of a handoff request; the package decides skills, language, priority,
/// VIP and emotion.
pub fn new_ticket(
    event: &HandoffRequested,
    occurred_at: DateTime<Utc>,
) -> Result<NewTicket, RoutingError> {
    check_id("handoff_id", &event.handoff_id)?;
    check_id("conversation_id", &event.conversation_id)?;
    let mut package = event.package.clone().unwrap_or_default();
    if package.handoff_id.is_empty() {
        package.handoff_id = event.handoff_id.clone();
    }
    if package.conversation_id.is_empty() {
        package.conversation_id = event.conversation_id.clone();
    }
    if package.scenario_id.is_empty() {
        package.scenario_id = event.scenario_id.clone();
    }
    let skills = convert::requirements(&package.required_skills)
        .into_iter()
        .filter(|s| {
            let ok = crate::domain::agent::check_skill_name("skill", &s.name).is_ok();
            if !ok {
                tracing::warn!(skill = %s.name, "handoff asks for an invalid skill, ignored");
            }
            ok
        })
        .map(|mut s| {
            s.min_level = s.min_level.clamp(1, crate::domain::agent::MAX_SKILL_LEVEL);
            s
        })
        .collect();
    let queue_id = if check_queue_id("queue_id", &package.queue_id).is_ok() {
        package.queue_id.clone()
    } else {
        String::new()
    };
    let scores: Vec<f64> = package
        .sentiment_trajectory
        .iter()
        .filter_map(|p| p.sentiment.as_ref().map(|s| s.score))
        .collect();
    let vip = package
        .customer
        .as_ref()
        .is_some_and(|c| c.tier == i32::from(CustomerTier::Vip));
    Ok(NewTicket {
        handoff_id: event.handoff_id.clone(),
        conversation_id: event.conversation_id.clone(),
        scenario_id: if event.scenario_id.is_empty() {
            package.scenario_id.clone()
        } else {
            event.scenario_id.clone()
        },
        queue_id,
        priority: package.priority.clamp(0, 100),
        vip,
        severity: negative_severity(&scores),
        skills,
        language: package.language.max(0),
        trigger_received_at: time(package.trigger_received_at),
        requested_at: time(package.requested_at)
            .or(time(event.occurred_at))
            .unwrap_or(occurred_at),
        transcript_sequence: package
            .transcript
            .as_ref()
            .map_or(0, |t| t.last_sequence.max(0)),
        package: HandoffPackage::encode_to_vec(&package),
    })
}

impl DialogEvents {
    fn after_release(&self, tenant: &tandem_proto::ids::TenantId, released: &Unassigned) {
        for offer in &released.revoked {
            self.engine.hub.notify(tenant, &offer.agent_id);
        }
        for agent in &released.freed_agents {
            self.engine.hub.notify(tenant, agent);
        }
        if !released.freed_agents.is_empty() {
            self.engine.drain_later(tenant, None);
        }
    }
}

impl Handler for DialogEvents {
    async fn handle(&self, event: &RawEvent) -> Result<(), HandlerError> {
        let engine = &self.engine;
        let now = engine.now();
        let dedup = Some((DURABLE, event.id.as_str()));
        if event.type_name == HandoffRequested::TYPE_NAME {
            let envelope = event.decode::<HandoffRequested>()?;
            let new = new_ticket(&envelope.event, envelope.occurred_at).map_err(classify)?;
            // Offered in the enqueue's own transaction when nobody waits ahead; otherwise
            // the queue's drain offers it.
            let outcome = engine
                .store
                .enqueue_and_offer(&envelope.tenant, &new, dedup, engine.settings.eta(), now)
                .await;
            if let Ok(Some(done)) = &outcome
                && let Some(superseded) = &done.superseded
            {
                let previous = superseded.ticket.as_ref().map_or("", |t| t.id.as_str());
                let outcome = if superseded
                    .ticket
                    .as_ref()
                    .is_some_and(|t| t.state == crate::domain::ticket::TicketState::Completed)
                {
                    "completed"
                } else {
                    "superseded"
                };
                tracing::warn!(
                    handoff = %new.handoff_id,
                    superseded = %previous,
                    conversation = %new.conversation_id,
                    %outcome,
                    "handoff ended the live ticket of an earlier handoff of the conversation"
                );
                metrics::counter!(HANDOFF_CONFLICTS_TOTAL, "outcome" => outcome).increment(1);
                self.after_release(&envelope.tenant, superseded);
            }
            match outcome {
                Ok(Some(done)) if !done.offered.is_empty() => {
                    for (_, offer) in &done.offered {
                        engine.hub.notify(&envelope.tenant, &offer.agent_id);
                    }
                }
                Ok(Some(done)) if done.created => {
                    if let Err(error) = engine
                        .drain_queue(&envelope.tenant, &done.ticket.queue_id)
                        .await
                    {
                        // The ticket is stored; the sweep offers it.
                        tracing::warn!(error = %tandem_platform::error::DisplayChain(&error), "drain after enqueue failed");
                    }
                }
                Ok(_) => {}
                Err(RoutingError::AlreadyExists(reason)) => {
                    // The reason names the newer live ticket of the conversation, or says the
                    // handoff was cancelled or its conversation closed before it got here.
                    tracing::warn!(
                        %reason,
                        handoff = %new.handoff_id,
                        conversation = %new.conversation_id,
                        "stale handoff refused: the conversation moved on"
                    );
                    metrics::counter!(HANDOFF_CONFLICTS_TOTAL, "outcome" => "stale").increment(1);
                }
                Err(error) => return Err(classify(error)),
            }
        } else if event.type_name == ConversationClosed::TYPE_NAME {
            let envelope = event.decode::<ConversationClosed>()?;
            check_id("conversation_id", &envelope.event.conversation_id).map_err(classify)?;
            let released = engine
                .store
                .close_conversation(
                    &envelope.tenant,
                    &envelope.event.conversation_id,
                    dedup,
                    now,
                )
                .await
                .map_err(classify)?;
            self.after_release(&envelope.tenant, &released);
        } else if event.type_name == HandoffCancelled::TYPE_NAME {
            let envelope = event.decode::<HandoffCancelled>()?;
            check_id("handoff_id", &envelope.event.handoff_id).map_err(classify)?;
            let released = engine
                .store
                .cancel_handoff(
                    &envelope.tenant,
                    &envelope.event.conversation_id,
                    &envelope.event.handoff_id,
                    dedup,
                    now,
                )
                .await
                .map_err(classify)?;
            self.after_release(&envelope.tenant, &released);
        } else if event.type_name == ConversationResolved::TYPE_NAME {
            let envelope = event.decode::<ConversationResolved>()?;
            let resolved = &envelope.event;
            if resolved.handoff_id.is_empty() {
                // Resolved by the bot without ever reaching an agent: no ticket to end.
                return Ok(());
            }
            check_id("handoff_id", &resolved.handoff_id).map_err(classify)?;
            check_id("conversation_id", &resolved.conversation_id).map_err(classify)?;
            let done = engine
                .store
                .resolve_handoff(
                    &envelope.tenant,
                    &resolved.handoff_id,
                    &resolved.conversation_id,
                    dedup,
                    now,
                )
                .await
                .map_err(classify)?;
            if let Some((completed, revoked)) = done {
                tracing::info!(
                    handoff = %resolved.handoff_id,
                    conversation = %resolved.conversation_id,
                    agent = %completed.agent_id,
                    "conversation resolved in dialog: assignment completed"
                );
                self.after_release(
                    &envelope.tenant,
                    &Unassigned {
                        freed_agents: vec![completed.agent_id.clone()],
                        ticket: Some(completed.ticket),
                        revoked,
                    },
                );
            }
        }
        Ok(())
    }
}
