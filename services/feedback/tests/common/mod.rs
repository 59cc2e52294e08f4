//! Conversations as dialog and routing would publish them, for the feedback tests.

#![allow(dead_code, reason = "each test binary uses part of it")]

use chrono::DateTime;
use tandem_platform::bus::RawEvent;
use tandem_proto::events::Event;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::dialog::v1 as dialog;
use tandem_proto::pb::routing::v1 as routing;

/// 2025-03-01T10:00:00Z.
pub const T0: i64 = 1_740_823_200_000_000;
const S: i64 = 1_000_000;

/// The test tenant.
pub fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn ts(at: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: at.div_euclid(S),
        nanos: i32::try_from(at.rem_euclid(S) * 1000).unwrap(),
    })
}

fn raw<E: Event>(event: &E, conversation: &str, at: i64) -> RawEvent {
    RawEvent::at(
        &tenant(),
        event,
        Some(conversation.to_owned()),
        DateTime::from_timestamp_micros(at).unwrap(),
    )
}

/// The scenario of conversation `i`.
pub fn scenario_of(i: usize) -> &'static str {
    if i % 3 == 2 { "rebooking" } else { "refund" }
}

/// The id of conversation `i`.
pub fn conversation_of(i: usize) -> String {
    format!("conv-{i:03}")
}

/// The events of `n` conversations started 20 minutes apart: even ones are handed off (queued,
/// offered, assigned, answered by an agent who gets a suggestion, completed, resolved), the
/// others resolved by the bot or left; conversation 5 is proactive, 7 a test, 4 reopened.
pub fn life_events(n: usize) -> Vec<RawEvent> {
    let mut out = Vec::new();
    for i in 0..n {
        let id = conversation_of(i);
        let scenario = scenario_of(i).to_owned();
        let start = T0 + i as i64 * 20 * 60 * S;
        let test = i == 7;
        let intent = if scenario == "refund" {
            "refund_status"
        } else {
            "rebook_flight"
        };
        out.push(raw(
            &dialog::ConversationStarted {
                conversation_id: id.clone(),
                scenario_id: if i % 2 == 0 {
                    scenario.clone()
                } else {
                    String::new()
                },
                customer: Some(common::Customer {
                    id: format!("cust-{}", i % 5),
                    ..Default::default()
                }),
                channel: if i % 2 == 0 { 1 } else { 6 },
                language: 1,
                test,
                proactive: i == 5,
                occurred_at: ts(start),
            },
            &id,
            start,
        ));
        out.push(raw(
            &dialog::MessagePosted {
                conversation_id: id.clone(),
                message: Some(dialog::Message {
                    id: format!("{id}-m1"),
                    sender_kind: 1,
                    text: "where is my refund".into(),
                    ..Default::default()
                }),
                test,
                occurred_at: ts(start + 5 * S),
                ..Default::default()
            },
            &id,
            start + 5 * S,
        ));
        out.push(raw(
            &dialog::BotReplied {
                conversation_id: id.clone(),
                scenario_id: scenario.clone(),
                message_id: format!("{id}-m1"),
                intent: intent.into(),
                channel: if i % 2 == 0 { 1 } else { 6 },
                language: 1,
                test,
                occurred_at: ts(start + 10 * S),
                ..Default::default()
            },
            &id,
            start + 10 * S,
        ));
        if i % 2 == 0 {
            let handoff = format!("{id}-h1");
            let agent = format!("agent-{}", i % 3);
            out.push(raw(
                &dialog::HandoffRequested {
                    handoff_id: handoff.clone(),
                    conversation_id: id.clone(),
                    scenario_id: scenario.clone(),
                    package: Some(dialog::HandoffPackage {
                        handoff_id: handoff.clone(),
                        trigger: Some(dialog::HandoffTrigger {
                            reason: 1 + (i as i32 / 2) % 8,
                            ..Default::default()
                        }),
                        summary: vec!["my refund is late again".into()],
                        intents_tried: vec![dialog::IntentAttempt {
                            intent: intent.into(),
                            ..Default::default()
                        }],
                        trigger_received_at: ts(start + 29 * S),
                        requested_at: ts(start + 30 * S),
                        test,
                        ..Default::default()
                    }),
                    occurred_at: ts(start + 30 * S),
                },
                &id,
                start + 30 * S,
            ));
            out.push(raw(
                &routing::HandoffQueued {
                    handoff_id: handoff.clone(),
                    conversation_id: id.clone(),
                    scenario_id: scenario.clone(),
                    requested_at: ts(start + 30 * S),
                    queued_at: ts(start + 31 * S),
                    occurred_at: ts(start + 31 * S),
                    ..Default::default()
                },
                &id,
                start + 31 * S,
            ));
            let offered = start + 31 * S + (i as i64 + 1) * 100_000;
            out.push(raw(
                &routing::HandoffOffered {
                    handoff_id: handoff.clone(),
                    conversation_id: id.clone(),
                    scenario_id: scenario.clone(),
                    agent_id: agent.clone(),
                    attempt: 1,
                    trigger_received_at: ts(start + 29 * S),
                    requested_at: ts(start + 30 * S),
                    queued_at: ts(start + 31 * S),
                    offered_at: ts(offered),
                    occurred_at: ts(offered),
                    ..Default::default()
                },
                &id,
                offered,
            ));
            out.push(raw(
                &routing::HandoffAssigned {
                    handoff_id: handoff.clone(),
                    conversation_id: id.clone(),
                    scenario_id: scenario.clone(),
                    agent_id: agent.clone(),
                    team: "team-a".into(),
                    attempt: 1,
                    trigger_received_at: ts(start + 29 * S),
                    requested_at: ts(start + 30 * S),
                    queued_at: ts(start + 31 * S),
                    offered_at: ts(offered),
                    assigned_at: ts(start + 40 * S),
                    occurred_at: ts(start + 40 * S),
                    ..Default::default()
                },
                &id,
                start + 40 * S,
            ));
            out.push(raw(
                &dialog::MessagePosted {
                    conversation_id: id.clone(),
                    message: Some(dialog::Message {
                        sender_kind: 3,
                        text: "let me check".into(),
                        ..Default::default()
                    }),
                    handoff_id: handoff.clone(),
                    assigned_agent_id: agent.clone(),
                    test,
                    occurred_at: ts(start + 55 * S),
                    ..Default::default()
                },
                &id,
                start + 55 * S,
            ));
            let suggestion = format!("{id}-s1");
            out.push(raw(
                &dialog::SuggestionCreated {
                    conversation_id: id.clone(),
                    scenario_id: scenario.clone(),
                    agent_id: agent.clone(),
                    suggestion: Some(dialog::Suggestion {
                        id: suggestion.clone(),
                        ..Default::default()
                    }),
                    occurred_at: ts(start + 60 * S),
                },
                &id,
                start + 60 * S,
            ));
            out.push(raw(
                &dialog::SuggestionReviewed {
                    conversation_id: id.clone(),
                    scenario_id: scenario.clone(),
                    suggestion: Some(dialog::Suggestion {
                        id: suggestion.clone(),
                        review: Some(dialog::SuggestionReview {
                            suggestion_id: suggestion,
                            outcome: 1 + (i as i32 / 2) % 3,
                            agent_id: agent.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    occurred_at: ts(start + 70 * S),
                },
                &id,
                start + 70 * S,
            ));
            out.push(raw(
                &routing::AssignmentCompleted {
                    handoff_id: handoff,
                    conversation_id: id.clone(),
                    scenario_id: scenario.clone(),
                    agent_id: agent.clone(),
                    team: "team-a".into(),
                    disposition: 1,
                    handle_time: Some(prost_types::Duration {
                        seconds: 260,
                        nanos: 0,
                    }),
                    assigned_at: ts(start + 40 * S),
                    completed_at: ts(start + 300 * S),
                    occurred_at: ts(start + 300 * S),
                },
                &id,
                start + 300 * S,
            ));
            out.push(raw(
                &dialog::ConversationResolved {
                    conversation_id: id.clone(),
                    scenario_id: scenario.clone(),
                    resolved_by: 2,
                    agent_id: agent,
                    intent: intent.into(),
                    test,
                    occurred_at: ts(start + 301 * S),
                    ..Default::default()
                },
                &id,
                start + 301 * S,
            ));
        } else if i % 4 == 1 {
            out.push(raw(
                &dialog::ConversationResolved {
                    conversation_id: id.clone(),
                    scenario_id: scenario.clone(),
                    resolved_by: 1,
                    intent: intent.into(),
                    test,
                    occurred_at: ts(start + 120 * S),
                    ..Default::default()
                },
                &id,
                start + 120 * S,
            ));
        }
        if i == 4 {
            out.push(raw(
                &dialog::MessagePosted {
                    conversation_id: id.clone(),
                    message: Some(dialog::Message {
                        sender_kind: 1,
                        text: "it is still not there".into(),
                        ..Default::default()
                    }),
                    occurred_at: ts(start + 86_400 * S),
                    ..Default::default()
                },
                &id,
                start + 86_400 * S,
            ));
        }
        out.push(raw(
            &dialog::ConversationClosed {
                conversation_id: id.clone(),
                scenario_id: scenario.clone(),
                reason: if i % 4 == 3 { 1 } else { 2 },
                test,
                occurred_at: ts(start + 400 * S),
                ..Default::default()
            },
            &id,
            start + 400 * S,
        ));
    }
    out
}
