//! Facts projected from dialog and routing events.
//!
//! Events may arrive duplicated (the inbox drops those) and in any order. Every field below is
//! therefore set only by the events that own it, through a rule whose result does not depend on
//! order: the earliest value ([`Reg::keep_earliest`], [`min_at`]), the latest value
//! ([`Reg::keep_latest`]), a sticky flag, or a sum over distinct events. Replaying any
//! permutation of the same events yields the same facts (a property test checks it).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Micros, SEVEN_DAYS};

/// A value together with the time it was observed. Ties between observations of the same time
/// go to the greater value, so the register is a maximum (or minimum) over a total order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reg<T> {
    /// When the kept value was observed; `None` until one is.
    pub at: Option<Micros>,
    /// The kept value.
    pub value: T,
}

impl<T: Ord> Reg<T> {
    /// Keeps `value` if it was observed earlier than the kept one.
    pub fn keep_earliest(&mut self, at: Micros, value: T) {
        let replace = match self.at {
            None => true,
            Some(kept) => at < kept || (at == kept && value > self.value),
        };
        if replace {
            self.at = Some(at);
            self.value = value;
        }
    }

    /// Keeps `value` if it was observed later than the kept one.
    pub fn keep_latest(&mut self, at: Micros, value: T) {
        let replace = match self.at {
            None => true,
            Some(kept) => at > kept || (at == kept && value > self.value),
        };
        if replace {
            self.at = Some(at);
            self.value = value;
        }
    }
}

/// Keeps the earlier of `slot` and `at`.
pub fn min_at(slot: &mut Option<Micros>, at: Option<Micros>) {
    if let Some(at) = at {
        *slot = Some(slot.map_or(at, |kept| kept.min(at)));
    }
}

/// Keeps the later of `slot` and `at`.
pub fn max_at(slot: &mut Option<Micros>, at: Option<Micros>) {
    if let Some(at) = at {
        *slot = Some(slot.map_or(at, |kept| kept.max(at)));
    }
}

/// `HandlerKind` values (tandem.common.v1).
pub mod handler {
    /// Unknown.
    pub const UNSPECIFIED: i32 = 0;
    /// The bot.
    pub const BOT: i32 = 1;
    /// A human agent.
    pub const AGENT: i32 = 2;
}

/// Who wrote a message, as far as the metrics care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// The customer.
    Customer,
    /// A human agent.
    Agent,
    /// The bot or the system.
    Other,
}

/// An event reduced to what the metrics need. Times are the event's own times.
#[derive(Clone, Debug, PartialEq)]
pub enum FactEvent {
    /// `ConversationStarted`.
    Started {
        /// Customer id; empty when unknown.
        customer_id: String,
        /// Channel.
        channel: i32,
        /// Language.
        language: i32,
        /// Started by the business.
        proactive: bool,
    },
    /// `MessagePosted`.
    Message {
        /// Who wrote it.
        sender: Sender,
        /// The handoff in force, if any.
        handoff_id: String,
    },
    /// `BotReplied`.
    BotTurn {
        /// Top intent.
        intent: String,
        /// Channel.
        channel: i32,
        /// Language.
        language: i32,
    },
    /// `HandoffRequested`.
    HandoffRequested {
        /// Handoff.
        handoff_id: String,
        /// Reason of the trigger.
        reason: i32,
        /// When the triggering customer message was received.
        trigger_received_at: Option<Micros>,
        /// When the handoff was requested.
        requested_at: Option<Micros>,
        /// Customer id from the package.
        customer_id: String,
        /// Channel from the package.
        channel: i32,
        /// Language from the package.
        language: i32,
        /// Customer sentences summarising the problem.
        summary: Vec<String>,
        /// Intents the bot tried.
        intents: Vec<String>,
    },
    /// A routing event about a handoff's progress (`HandoffQueued`, `HandoffOffered`,
    /// `HandoffAssigned`).
    HandoffProgress {
        /// Handoff.
        handoff_id: String,
        /// When the trigger message was received, if carried.
        trigger_received_at: Option<Micros>,
        /// When it was requested, if carried.
        requested_at: Option<Micros>,
        /// When it was queued, if carried.
        queued_at: Option<Micros>,
        /// When an offer was delivered (`HandoffOffered`).
        offered_at: Option<Micros>,
        /// The assignment (`HandoffAssigned`).
        assignment: Option<Assignment>,
    },
    /// `AssignmentCompleted`.
    AssignmentCompleted {
        /// Handoff.
        handoff_id: String,
        /// Assignment to completion.
        handle_micros: Micros,
    },
    /// `ConversationResolved`.
    Resolved {
        /// Who resolved it.
        resolved_by: i32,
        /// Top intent of the conversation.
        intent: String,
        /// Channel.
        channel: i32,
        /// Language.
        language: i32,
        /// Earlier resolutions of the conversation.
        reopen_count: i32,
    },
    /// `ConversationClosed`.
    Closed,
    /// `SuggestionCreated`.
    SuggestionCreated {
        /// Suggestion.
        suggestion_id: String,
        /// Agent it was shown to.
        agent_id: String,
    },
    /// `SuggestionReviewed`.
    SuggestionReviewed {
        /// Suggestion.
        suggestion_id: String,
        /// `SuggestionOutcome` value.
        outcome: i32,
        /// Reviewing agent.
        agent_id: String,
    },
}

/// An accepted offer, as `HandoffAssigned` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// When the accepted offer was delivered.
    pub offered_at: Option<Micros>,
    /// When the agent accepted.
    pub assigned_at: Micros,
    /// Agent.
    pub agent_id: String,
    /// Team.
    pub team: String,
}

/// One event about one conversation, with the envelope fields every event has.
#[derive(Clone, Debug, PartialEq)]
pub struct FactInput {
    /// Conversation.
    pub conversation_id: String,
    /// When the event happened.
    pub occurred_at: Micros,
    /// Scenario named by the event; empty when it names none.
    pub scenario_id: String,
    /// The event says the conversation is a test.
    pub test: bool,
    /// What happened.
    pub event: FactEvent,
}

/// What is known about one conversation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationFact {
    /// Earliest time of any event of the conversation.
    pub first_seen_at: Option<Micros>,
    /// `ConversationStarted.occurred_at`.
    pub started_at: Option<Micros>,
    /// Customer (latest non-empty).
    pub customer_id: Reg<String>,
    /// Scenario (latest non-empty).
    pub scenario_id: Reg<String>,
    /// Top intent (latest non-empty).
    pub intent: Reg<String>,
    /// Channel (latest specified).
    pub channel: Reg<i32>,
    /// Language (latest specified).
    pub language: Reg<i32>,
    /// Sticky test flag.
    pub test: bool,
    /// Started by the business.
    pub proactive: bool,
    /// Earliest evidence of a handoff request.
    pub handoff_requested_at: Option<Micros>,
    /// Reason of the earliest `HandoffRequested`.
    pub first_handoff_reason: Reg<i32>,
    /// Agent and team of the earliest assignment.
    pub first_assignment: Reg<(String, String)>,
    /// First resolution and who made it.
    pub first_resolution: Reg<i32>,
    /// Earliest resolution that was a re-resolution (`reopen_count ≥ 1`).
    pub resolved_again_at: Option<Micros>,
    /// Earliest close.
    pub closed_at: Option<Micros>,
    /// Latest customer message.
    pub last_customer_message_at: Option<Micros>,
    /// Another conversation of the customer and scenario started within 7 days after the first
    /// resolution (derived by [`derive_followed_up`]).
    pub followed_up: bool,
}

impl ConversationFact {
    /// Returns whether any event of the conversation was seen.
    pub fn seen(&self) -> bool {
        self.first_seen_at.is_some()
    }

    /// Returns the time the conversation is bucketed by.
    pub fn bucket_at(&self) -> Option<Micros> {
        self.started_at.or(self.first_seen_at)
    }

    /// Returns whether the conversation counts in containment and handoff denominators.
    pub fn eligible(&self) -> bool {
        self.seen() && !self.test && !self.proactive
    }

    /// Returns whether the conversation ended (resolved or closed).
    pub fn ended(&self) -> bool {
        self.first_resolution.at.is_some() || self.closed_at.is_some()
    }

    /// Returns whether a handoff was requested.
    pub fn handed_off(&self) -> bool {
        self.handoff_requested_at.is_some()
    }

    /// Returns whether the conversation ended without any handoff request.
    pub fn contained(&self) -> bool {
        self.ended() && !self.handed_off()
    }

    /// Returns who handled the conversation: an agent once any handoff was accepted.
    pub fn handler(&self) -> i32 {
        if self.first_assignment.at.is_some() {
            handler::AGENT
        } else {
            handler::BOT
        }
    }

    /// Returns whether the conversation was reopened within 7 days of its first resolution.
    pub fn reopened(&self) -> bool {
        let Some(resolved) = self.first_resolution.at else {
            return false;
        };
        let within = |at: Micros| at > resolved && at - resolved <= SEVEN_DAYS;
        self.resolved_again_at
            .is_some_and(|at| at - resolved <= SEVEN_DAYS)
            || self.last_customer_message_at.is_some_and(within)
    }
}

/// What is known about one handoff.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffFact {
    /// Earliest time of any event of the handoff.
    pub first_seen_at: Option<Micros>,
    /// When it was requested.
    pub requested_at: Option<Micros>,
    /// When the triggering customer message was received.
    pub trigger_received_at: Option<Micros>,
    /// Reason of the trigger (`HandoffRequested`).
    pub reason: Reg<i32>,
    /// When it was queued.
    pub queued_at: Option<Micros>,
    /// When the first offer was delivered.
    pub first_offered_at: Option<Micros>,
    /// The first assignment: accepted offer's delivery time, agent, team.
    pub assignment: Reg<(Option<Micros>, String, String)>,
    /// The first agent message carrying the handoff.
    pub first_agent_reply_at: Option<Micros>,
    /// Handle time summed over completed assignments.
    pub handle_micros: Micros,
    /// Completed assignments.
    pub completions: i64,
    /// The package says test.
    pub test: bool,
    /// Customer sentences summarising the problem (from the package).
    pub summary: Vec<String>,
    /// Intents the bot tried (from the package).
    pub intents: Vec<String>,
}

impl HandoffFact {
    /// Returns the time the handoff is bucketed by.
    pub fn bucket_at(&self) -> Option<Micros> {
        self.requested_at.or(self.queued_at).or(self.first_seen_at)
    }

    /// Triggering message received (or requested) → first offer delivered.
    pub fn system_latency(&self) -> Option<Micros> {
        interval(
            self.trigger_received_at.or(self.requested_at),
            self.first_offered_at,
        )
    }

    /// Queued → accepted offer delivered.
    pub fn queue_wait(&self) -> Option<Micros> {
        interval(self.queued_at, self.assignment.value.0)
    }

    /// Accepted offer delivered → accepted.
    pub fn agent_accept(&self) -> Option<Micros> {
        interval(self.assignment.value.0, self.assignment.at)
    }

    /// Accepted → first agent message.
    pub fn first_human_reply(&self) -> Option<Micros> {
        interval(self.assignment.at, self.first_agent_reply_at)
    }

    /// Handle time, once an assignment completed.
    pub fn handle_time(&self) -> Option<Micros> {
        (self.completions > 0 && self.handle_micros >= 0).then_some(self.handle_micros)
    }
}

/// `to − from`, or `None` when either is missing or the result is negative (clock skew).
fn interval(from: Option<Micros>, to: Option<Micros>) -> Option<Micros> {
    let delta = to? - from?;
    (delta >= 0).then_some(delta)
}

/// What is known about one bot suggestion.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuggestionFact {
    /// When it was shown (`SuggestionCreated`).
    pub created_at: Option<Micros>,
    /// The review's outcome (latest review).
    pub outcome: Reg<i32>,
    /// Agent it was shown to, or who reviewed it (latest).
    pub agent_id: Reg<String>,
    /// Scenario named by its events (latest), for a conversation not seen yet.
    pub scenario_id: Reg<String>,
    /// A suggestion event of a test conversation.
    pub test: bool,
}

impl SuggestionFact {
    /// Returns the time the suggestion is bucketed by.
    pub fn bucket_at(&self) -> Option<Micros> {
        self.created_at.or(self.outcome.at)
    }

    /// Returns whether the agent sent it, as is or edited.
    pub fn accepted(&self) -> bool {
        matches!(self.outcome.value, outcome::USED | outcome::EDITED)
    }
}

/// `SuggestionOutcome` values (tandem.dialog.v1).
pub mod outcome {
    /// Sent as is.
    pub const USED: i32 = 1;
    /// Sent after editing.
    pub const EDITED: i32 = 2;
    /// Not used.
    pub const REJECTED: i32 = 3;
}

/// A conversation with its handoffs and suggestions: the unit events are merged into.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConversationState {
    /// The conversation.
    pub conversation: ConversationFact,
    /// Its handoffs by id.
    pub handoffs: BTreeMap<String, HandoffFact>,
    /// Its suggestions by id.
    pub suggestions: BTreeMap<String, SuggestionFact>,
}

impl ConversationState {
    /// Merges one event into the state.
    pub fn apply(&mut self, input: &FactInput) {
        let at = input.occurred_at;
        let c = &mut self.conversation;
        min_at(&mut c.first_seen_at, Some(at));
        if !input.scenario_id.is_empty() {
            c.scenario_id.keep_latest(at, input.scenario_id.clone());
        }
        c.test |= input.test;
        match &input.event {
            FactEvent::Started {
                customer_id,
                channel,
                language,
                proactive,
            } => {
                min_at(&mut c.started_at, Some(at));
                set_customer(c, at, customer_id);
                set_channel_language(c, at, *channel, *language);
                c.proactive |= *proactive;
            }
            FactEvent::Message { sender, handoff_id } => match sender {
                Sender::Customer => max_at(&mut c.last_customer_message_at, Some(at)),
                Sender::Agent if !handoff_id.is_empty() => {
                    let handoff = self.handoff(handoff_id, at);
                    min_at(&mut handoff.first_agent_reply_at, Some(at));
                }
                Sender::Agent | Sender::Other => {}
            },
            FactEvent::BotTurn {
                intent,
                channel,
                language,
            } => {
                if !intent.is_empty() {
                    c.intent.keep_latest(at, intent.clone());
                }
                set_channel_language(c, at, *channel, *language);
            }
            FactEvent::HandoffRequested {
                handoff_id,
                reason,
                trigger_received_at,
                requested_at,
                customer_id,
                channel,
                language,
                summary,
                intents,
            } => {
                let requested = requested_at.unwrap_or(at);
                min_at(&mut c.handoff_requested_at, Some(requested));
                c.first_handoff_reason.keep_earliest(requested, *reason);
                set_customer(c, at, customer_id);
                set_channel_language(c, at, *channel, *language);
                let test = input.test;
                let handoff = self.handoff(handoff_id, at);
                min_at(&mut handoff.requested_at, Some(requested));
                min_at(&mut handoff.trigger_received_at, *trigger_received_at);
                handoff.reason.keep_earliest(requested, *reason);
                handoff.test |= test;
                // One package per handoff; keeping the larger text makes a replay a no-op.
                if *summary > handoff.summary {
                    handoff.summary.clone_from(summary);
                }
                if *intents > handoff.intents {
                    handoff.intents.clone_from(intents);
                }
            }
            FactEvent::HandoffProgress {
                handoff_id,
                trigger_received_at,
                requested_at,
                queued_at,
                offered_at,
                assignment,
            } => {
                min_at(
                    &mut c.handoff_requested_at,
                    requested_at.or(*queued_at).or(Some(at)),
                );
                if let Some(assignment) = assignment {
                    c.first_assignment.keep_earliest(
                        assignment.assigned_at,
                        (assignment.agent_id.clone(), assignment.team.clone()),
                    );
                }
                let handoff = self.handoff(handoff_id, at);
                min_at(&mut handoff.trigger_received_at, *trigger_received_at);
                min_at(&mut handoff.requested_at, *requested_at);
                min_at(&mut handoff.queued_at, *queued_at);
                min_at(&mut handoff.first_offered_at, *offered_at);
                if let Some(assignment) = assignment {
                    handoff.assignment.keep_earliest(
                        assignment.assigned_at,
                        (
                            assignment.offered_at,
                            assignment.agent_id.clone(),
                            assignment.team.clone(),
                        ),
                    );
                }
            }
            FactEvent::AssignmentCompleted {
                handoff_id,
                handle_micros,
            } => {
                let handoff = self.handoff(handoff_id, at);
                handoff.handle_micros += (*handle_micros).max(0);
                handoff.completions += 1;
            }
            FactEvent::Resolved {
                resolved_by,
                intent,
                channel,
                language,
                reopen_count,
            } => {
                c.first_resolution.keep_earliest(at, *resolved_by);
                if *reopen_count > 0 {
                    min_at(&mut c.resolved_again_at, Some(at));
                }
                if !intent.is_empty() {
                    c.intent.keep_latest(at, intent.clone());
                }
                set_channel_language(c, at, *channel, *language);
            }
            FactEvent::Closed => min_at(&mut c.closed_at, Some(at)),
            FactEvent::SuggestionCreated {
                suggestion_id,
                agent_id,
            } => {
                let suggestion = self.suggestion(suggestion_id, input);
                min_at(&mut suggestion.created_at, Some(at));
                if !agent_id.is_empty() {
                    suggestion.agent_id.keep_latest(at, agent_id.clone());
                }
            }
            FactEvent::SuggestionReviewed {
                suggestion_id,
                outcome,
                agent_id,
            } => {
                let suggestion = self.suggestion(suggestion_id, input);
                suggestion.outcome.keep_latest(at, *outcome);
                if !agent_id.is_empty() {
                    suggestion.agent_id.keep_latest(at, agent_id.clone());
                }
            }
        }
    }

    fn handoff(&mut self, handoff_id: &str, at: Micros) -> &mut HandoffFact {
        let handoff = self.handoffs.entry(handoff_id.to_owned()).or_default();
        min_at(&mut handoff.first_seen_at, Some(at));
        handoff
    }

    fn suggestion(&mut self, suggestion_id: &str, input: &FactInput) -> &mut SuggestionFact {
        let suggestion = self
            .suggestions
            .entry(suggestion_id.to_owned())
            .or_default();
        if !input.scenario_id.is_empty() {
            suggestion
                .scenario_id
                .keep_latest(input.occurred_at, input.scenario_id.clone());
        }
        suggestion.test |= input.test;
        suggestion
    }
}

fn set_customer(c: &mut ConversationFact, at: Micros, customer_id: &str) {
    if !customer_id.is_empty() {
        c.customer_id.keep_latest(at, customer_id.to_owned());
    }
}

fn set_channel_language(c: &mut ConversationFact, at: Micros, channel: i32, language: i32) {
    if channel != 0 {
        c.channel.keep_latest(at, channel);
    }
    if language != 0 {
        c.language.keep_latest(at, language);
    }
}

/// The conversations of one customer, for first-contact resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomerConversation {
    /// Scenario.
    pub scenario_id: String,
    /// Start (bucket time).
    pub started_at: Micros,
}

/// Returns whether another conversation of the same customer and scenario started within 7
/// days after `fact`'s first resolution. `others` are the customer's conversations, `fact`'s own
/// included or not (it never follows itself, since it started before it was resolved).
pub fn derive_followed_up(fact: &ConversationFact, others: &[CustomerConversation]) -> bool {
    let Some(resolved) = fact.first_resolution.at else {
        return false;
    };
    if fact.customer_id.value.is_empty() {
        return false;
    }
    others.iter().any(|other| {
        other.scenario_id == fact.scenario_id.value
            && other.started_at > resolved
            && other.started_at - resolved <= SEVEN_DAYS
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn input(at: Micros, scenario: &str, event: FactEvent) -> FactInput {
        FactInput {
            conversation_id: "c1".into(),
            occurred_at: at,
            scenario_id: scenario.into(),
            test: false,
            event,
        }
    }

    /// A conversation's life: start, bot turn, handoff, routing, agent reply, completion,
    /// resolution, a late reopen, a suggestion and its review.
    fn life() -> Vec<FactInput> {
        let s = 1_000_000;
        vec![
            input(
                0,
                "",
                FactEvent::Started {
                    customer_id: "cust".into(),
                    channel: 1,
                    language: 1,
                    proactive: false,
                },
            ),
            input(
                s,
                "refund",
                FactEvent::BotTurn {
                    intent: "refund_status".into(),
                    channel: 1,
                    language: 1,
                },
            ),
            input(
                2 * s,
                "",
                FactEvent::Message {
                    sender: Sender::Customer,
                    handoff_id: String::new(),
                },
            ),
            input(
                3 * s,
                "refund",
                FactEvent::HandoffRequested {
                    handoff_id: "h1".into(),
                    reason: 2,
                    trigger_received_at: Some(2 * s),
                    requested_at: Some(3 * s),
                    customer_id: "cust".into(),
                    channel: 1,
                    language: 1,
                    summary: vec!["where is my refund".into()],
                    intents: vec!["refund_status".into()],
                },
            ),
            input(
                4 * s,
                "refund",
                FactEvent::HandoffProgress {
                    handoff_id: "h1".into(),
                    trigger_received_at: Some(2 * s),
                    requested_at: Some(3 * s),
                    queued_at: Some(4 * s),
                    offered_at: None,
                    assignment: None,
                },
            ),
            input(
                5 * s,
                "refund",
                FactEvent::HandoffProgress {
                    handoff_id: "h1".into(),
                    trigger_received_at: Some(2 * s),
                    requested_at: Some(3 * s),
                    queued_at: Some(4 * s),
                    offered_at: Some(5 * s),
                    assignment: None,
                },
            ),
            input(
                7 * s,
                "refund",
                FactEvent::HandoffProgress {
                    handoff_id: "h1".into(),
                    trigger_received_at: Some(2 * s),
                    requested_at: Some(3 * s),
                    queued_at: Some(4 * s),
                    offered_at: Some(5 * s),
                    assignment: Some(Assignment {
                        offered_at: Some(5 * s),
                        assigned_at: 7 * s,
                        agent_id: "a1".into(),
                        team: "t1".into(),
                    }),
                },
            ),
            input(
                11 * s,
                "",
                FactEvent::Message {
                    sender: Sender::Agent,
                    handoff_id: "h1".into(),
                },
            ),
            input(
                12 * s,
                "refund",
                FactEvent::SuggestionCreated {
                    suggestion_id: "s1".into(),
                    agent_id: "a1".into(),
                },
            ),
            input(
                13 * s,
                "refund",
                FactEvent::SuggestionReviewed {
                    suggestion_id: "s1".into(),
                    outcome: outcome::EDITED,
                    agent_id: "a1".into(),
                },
            ),
            input(
                60 * s,
                "refund",
                FactEvent::AssignmentCompleted {
                    handoff_id: "h1".into(),
                    handle_micros: 53 * s,
                },
            ),
            input(
                61 * s,
                "refund",
                FactEvent::Resolved {
                    resolved_by: handler::AGENT,
                    intent: "refund_status".into(),
                    channel: 1,
                    language: 1,
                    reopen_count: 0,
                },
            ),
            input(
                100 * s,
                "",
                FactEvent::Message {
                    sender: Sender::Customer,
                    handoff_id: String::new(),
                },
            ),
            input(200 * s, "refund", FactEvent::Closed),
        ]
    }

    fn replay(events: &[FactInput]) -> ConversationState {
        let mut state = ConversationState::default();
        for event in events {
            state.apply(event);
        }
        state
    }

    #[test]
    fn clocks_come_from_the_owning_events() {
        let state = replay(&life());
        let h = &state.handoffs["h1"];
        let s = 1_000_000;
        assert_eq!(h.system_latency(), Some(3 * s));
        assert_eq!(h.queue_wait(), Some(s));
        assert_eq!(h.agent_accept(), Some(2 * s));
        assert_eq!(h.first_human_reply(), Some(4 * s));
        assert_eq!(h.handle_time(), Some(53 * s));
        let c = &state.conversation;
        assert!(c.eligible() && c.handed_off() && !c.contained());
        assert_eq!(c.handler(), handler::AGENT);
        assert_eq!(c.first_handoff_reason.value, 2);
        assert_eq!(c.scenario_id.value, "refund");
        assert!(c.reopened(), "the customer wrote after the resolution");
        assert!(state.suggestions["s1"].accepted());
    }

    #[test]
    fn skewed_clocks_are_dropped_not_clamped() {
        let h = HandoffFact {
            trigger_received_at: Some(10),
            first_offered_at: Some(5),
            ..HandoffFact::default()
        };
        assert_eq!(h.system_latency(), None);
    }

    #[test]
    fn a_later_conversation_of_the_same_customer_and_scenario_breaks_first_contact_resolution() {
        let state = replay(&life());
        let resolved = state.conversation.first_resolution.at.unwrap();
        let same = CustomerConversation {
            scenario_id: "refund".into(),
            started_at: resolved + SEVEN_DAYS - 1,
        };
        let other_scenario = CustomerConversation {
            scenario_id: "billing".into(),
            started_at: resolved + 1,
        };
        let too_late = CustomerConversation {
            scenario_id: "refund".into(),
            started_at: resolved + SEVEN_DAYS + 1,
        };
        assert!(derive_followed_up(&state.conversation, &[same]));
        assert!(!derive_followed_up(
            &state.conversation,
            &[other_scenario, too_late]
        ));
    }

    proptest! {
        #[test]
        fn any_order_with_duplicates_gives_the_same_facts(
            order in Just((0..14usize).collect::<Vec<_>>()).prop_shuffle(),
            duplicated in proptest::collection::vec(0..14usize, 0..6),
        ) {
            let events = life();
            let expected = replay(&events);
            // Duplicates are removed by the inbox before facts are merged, except for the
            // registers, which tolerate them; sums are guarded by the inbox, so duplicates
            // here are only of events without sums.
            let mut shuffled: Vec<FactInput> = order.iter().map(|&i| events[i].clone()).collect();
            for i in duplicated {
                if !matches!(events[i].event, FactEvent::AssignmentCompleted { .. }) {
                    shuffled.push(events[i].clone());
                }
            }
            prop_assert_eq!(replay(&shuffled), expected);
        }
    }
}
