//! The consumers: dialog and routing events decoded into facts and projected in batches, each
//! batch in one transaction with its inbox claims.

use tandem_platform::bus::runner::{Handler, HandlerError};
use tandem_platform::bus::{ConsumerSpec, RawEvent};
use tandem_platform::config::BusConfig;
use tandem_proto::events::{DIALOG, Event, ROUTING};
use tandem_proto::pb::dialog::v1 as dialog;
use tandem_proto::pb::routing::v1 as routing;

use crate::adapters::sql::{Projected, Store};
use crate::app::micros;
use crate::domain::Micros;
use crate::domain::fact::{Assignment, FactEvent, FactInput, Sender};

/// Durable consumer of the dialog events the metrics need.
pub const DIALOG_CONSUMER: &str = "feedback-dialog";
/// Durable consumer of the routing events the metrics need.
pub const ROUTING_CONSUMER: &str = "feedback-routing";

/// The dialog subscription.
pub fn dialog_spec(cfg: &BusConfig) -> ConsumerSpec {
    ConsumerSpec::new(DIALOG_CONSUMER, &DIALOG, cfg)
        .event::<dialog::ConversationStarted>()
        .event::<dialog::MessagePosted>()
        .event::<dialog::BotReplied>()
        .event::<dialog::HandoffRequested>()
        .event::<dialog::SuggestionCreated>()
        .event::<dialog::SuggestionReviewed>()
        .event::<dialog::ConversationResolved>()
        .event::<dialog::ConversationClosed>()
}

/// The routing subscription.
pub fn routing_spec(cfg: &BusConfig) -> ConsumerSpec {
    ConsumerSpec::new(ROUTING_CONSUMER, &ROUTING, cfg)
        .event::<routing::HandoffQueued>()
        .event::<routing::HandoffOffered>()
        .event::<routing::HandoffAssigned>()
        .event::<routing::AssignmentCompleted>()
}

fn ts(value: Option<&prost_types::Timestamp>) -> Option<Micros> {
    value.and_then(micros)
}

fn decode<E: Event>(raw: &RawEvent) -> Result<E, HandlerError> {
    Ok(raw.decode::<E>()?.event)
}

/// Decodes an event into a fact input; `None` for events that carry nothing for the metrics
/// (or name no conversation).
pub fn fact_input(raw: &RawEvent) -> Result<Option<FactInput>, HandlerError> {
    let envelope_at = raw.occurred_at.timestamp_micros();
    let make = |conversation_id: String,
                scenario_id: String,
                occurred_at: Option<&prost_types::Timestamp>,
                test: bool,
                event: FactEvent| {
        (!conversation_id.is_empty()).then(|| FactInput {
            conversation_id,
            occurred_at: ts(occurred_at).unwrap_or(envelope_at),
            scenario_id,
            test,
            event,
        })
    };
    let progress = |handoff_id: String,
                    trigger: Option<&prost_types::Timestamp>,
                    requested: Option<&prost_types::Timestamp>,
                    queued: Option<&prost_types::Timestamp>,
                    offered: Option<&prost_types::Timestamp>,
                    assignment: Option<Assignment>| FactEvent::HandoffProgress {
        handoff_id,
        trigger_received_at: ts(trigger),
        requested_at: ts(requested),
        queued_at: ts(queued),
        offered_at: ts(offered),
        assignment,
    };
    Ok(match raw.type_name.as_str() {
        dialog::ConversationStarted::TYPE_NAME => {
            let e: dialog::ConversationStarted = decode(raw)?;
            let customer = e.customer.unwrap_or_default();
            make(
                e.conversation_id,
                e.scenario_id,
                e.occurred_at.as_ref(),
                e.test,
                FactEvent::Started {
                    customer_id: customer.id,
                    channel: if e.channel != 0 {
                        e.channel
                    } else {
                        customer.channel
                    },
                    language: if e.language != 0 {
                        e.language
                    } else {
                        customer.language
                    },
                    proactive: e.proactive,
                },
            )
        }
        dialog::MessagePosted::TYPE_NAME => {
            let e: dialog::MessagePosted = decode(raw)?;
            let message = e.message.unwrap_or_default();
            let sender = match message.sender_kind {
                1 => Sender::Customer,
                3 => Sender::Agent,
                _ => Sender::Other,
            };
            make(
                e.conversation_id,
                e.scenario_id,
                e.occurred_at.as_ref(),
                e.test,
                FactEvent::Message {
                    sender,
                    handoff_id: e.handoff_id,
                },
            )
        }
        dialog::BotReplied::TYPE_NAME => {
            let e: dialog::BotReplied = decode(raw)?;
            make(
                e.conversation_id,
                e.scenario_id,
                e.occurred_at.as_ref(),
                e.test,
                FactEvent::BotTurn {
                    intent: e.intent,
                    channel: e.channel,
                    language: e.language,
                },
            )
        }
        dialog::HandoffRequested::TYPE_NAME => {
            let e: dialog::HandoffRequested = decode(raw)?;
            let package = e.package.unwrap_or_default();
            let customer = package.customer.unwrap_or_default();
            let mut summary = package.summary;
            if summary.is_empty() {
                summary = package
                    .recent_messages
                    .iter()
                    .filter(|m| m.sender_kind == 1 && !m.text.trim().is_empty())
                    .map(|m| m.text.clone())
                    .collect();
            }
            let intents = package
                .intents_tried
                .iter()
                .map(|i| i.intent.clone())
                .filter(|i| !i.is_empty())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let handoff_id = if e.handoff_id.is_empty() {
                package.handoff_id
            } else {
                e.handoff_id
            };
            make(
                e.conversation_id,
                e.scenario_id,
                e.occurred_at.as_ref(),
                package.test,
                FactEvent::HandoffRequested {
                    handoff_id,
                    reason: package.trigger.map(|t| t.reason).unwrap_or_default(),
                    trigger_received_at: ts(package.trigger_received_at.as_ref()),
                    requested_at: ts(package.requested_at.as_ref()).or(ts(e.occurred_at.as_ref())),
                    customer_id: customer.id,
                    channel: if customer.channel != 0 {
                        customer.channel
                    } else {
                        0
                    },
                    language: if package.language != 0 {
                        package.language
                    } else {
                        customer.language
                    },
                    summary,
                    intents,
                },
            )
        }
        routing::HandoffQueued::TYPE_NAME => {
            let e: routing::HandoffQueued = decode(raw)?;
            let event = progress(
                e.handoff_id,
                None,
                e.requested_at.as_ref(),
                e.queued_at.as_ref(),
                None,
                None,
            );
            make(
                e.conversation_id,
                e.scenario_id,
                e.occurred_at.as_ref(),
                false,
                event,
            )
        }
        routing::HandoffOffered::TYPE_NAME => {
            let e: routing::HandoffOffered = decode(raw)?;
            let event = progress(
                e.handoff_id,
                e.trigger_received_at.as_ref(),
                e.requested_at.as_ref(),
                e.queued_at.as_ref(),
                e.offered_at.as_ref(),
                None,
            );
            make(
                e.conversation_id,
                e.scenario_id,
                e.occurred_at.as_ref(),
                false,
                event,
            )
        }
        routing::HandoffAssigned::TYPE_NAME => {
            let e: routing::HandoffAssigned = decode(raw)?;
            let assigned_at = ts(e.assigned_at.as_ref())
                .or(ts(e.occurred_at.as_ref()))
                .unwrap_or(envelope_at);
            let assignment = Assignment {
                offered_at: ts(e.offered_at.as_ref()),
                assigned_at,
                agent_id: e.agent_id,
                team: e.team,
            };
            let event = progress(
                e.handoff_id,
                e.trigger_received_at.as_ref(),
                e.requested_at.as_ref(),
                e.queued_at.as_ref(),
                None,
                Some(assignment),
            );
            make(
                e.conversation_id,
                e.scenario_id,
                e.occurred_at.as_ref(),
                false,
                event,
            )
        }
        routing::AssignmentCompleted::TYPE_NAME => {
            let e: routing::AssignmentCompleted = decode(raw)?;
            let handle_micros = e.handle_time.map_or_else(
                || match (ts(e.assigned_at.as_ref()), ts(e.completed_at.as_ref())) {
                    (Some(a), Some(c)) => (c - a).max(0),
                    _ => 0,
                },
                |d| d.seconds * 1_000_000 + i64::from(d.nanos / 1000),
            );
            make(
                e.conversation_id,
                e.scenario_id,
                e.occurred_at.as_ref(),
                false,
                FactEvent::AssignmentCompleted {
                    handoff_id: e.handoff_id,
                    handle_micros,
                },
            )
        }
        dialog::ConversationResolved::TYPE_NAME => {
            let e: dialog::ConversationResolved = decode(raw)?;
            make(
                e.conversation_id,
                e.scenario_id,
                e.occurred_at.as_ref(),
                e.test,
                FactEvent::Resolved {
                    resolved_by: e.resolved_by,
                    intent: e.intent,
                    channel: e.channel,
                    language: e.language,
                    reopen_count: e.reopen_count,
                },
            )
        }
        dialog::ConversationClosed::TYPE_NAME => {
            let e: dialog::ConversationClosed = decode(raw)?;
            make(
                e.conversation_id,
                e.scenario_id,
                e.occurred_at.as_ref(),
                e.test,
                FactEvent::Closed,
            )
        }
        dialog::SuggestionCreated::TYPE_NAME => {
            let e: dialog::SuggestionCreated = decode(raw)?;
            let suggestion = e.suggestion.unwrap_or_default();
            make(
                e.conversation_id,
                e.scenario_id,
                e.occurred_at.as_ref(),
                false,
                FactEvent::SuggestionCreated {
                    suggestion_id: suggestion.id,
                    agent_id: e.agent_id,
                },
            )
        }
        dialog::SuggestionReviewed::TYPE_NAME => {
            let e: dialog::SuggestionReviewed = decode(raw)?;
            let suggestion = e.suggestion.unwrap_or_default();
            let review = suggestion.review.unwrap_or_default();
            let id = if suggestion.id.is_empty() {
                review.suggestion_id
            } else {
                suggestion.id
            };
            make(
                e.conversation_id,
                e.scenario_id,
                e.occurred_at.as_ref(),
                false,
                FactEvent::SuggestionReviewed {
                    suggestion_id: id,
                    outcome: review.outcome,
                    agent_id: review.agent_id,
                },
            )
        }
        _ => None,
    })
}

/// Projects events into the store. Idempotent: the store claims every event in the inbox in
/// the transaction that applies it.
#[derive(Clone)]
pub struct Projector {
    store: Store,
    consumer: &'static str,
}

impl Projector {
    /// A projector for one durable consumer.
    pub fn new(store: Store, consumer: &'static str) -> Self {
        Self { store, consumer }
    }

    /// Applies a batch of events; returns how many were new. Events that name no conversation
    /// have no effect and are acknowledged as they are.
    pub async fn apply(&self, events: &[RawEvent]) -> Result<usize, HandlerError> {
        let mut projected = Vec::with_capacity(events.len());
        for raw in events {
            if let Some(input) = fact_input(raw)? {
                projected.push(Projected {
                    event_id: raw.id.clone(),
                    tenant: raw.tenant.to_string(),
                    input,
                });
            }
        }
        if projected.is_empty() {
            return Ok(0);
        }
        let applied = self
            .store
            .project(self.consumer, &projected)
            .await
            .map_err(|e| {
                HandlerError::Transient(tandem_platform::error::DisplayChain(&e).to_string())
            })?;
        metrics::counter!(crate::metrics::EVENTS_PROJECTED_TOTAL).increment(applied as u64);
        Ok(applied)
    }
}

impl Handler for Projector {
    async fn handle(&self, event: &RawEvent) -> Result<(), HandlerError> {
        self.apply(std::slice::from_ref(event)).await.map(drop)
    }

    async fn handle_batch(&self, events: &[RawEvent]) -> Result<(), HandlerError> {
        self.apply(events).await.map(drop)
    }
}
