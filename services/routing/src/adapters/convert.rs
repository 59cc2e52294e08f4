//! Conversions between the protobuf contract and the domain, in both directions. Requests are
//! validated here and by the domain; a bad field becomes `INVALID_ARGUMENT` naming it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::Message as _;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::dialog::v1::HandoffPackage;
use tandem_proto::pb::routing::v1 as pb;

use crate::domain::agent::{Agent, AgentProfile, Presence, Skill, SkillRequirement};
use crate::domain::queue::{
    BusinessHours, DEFAULT_OFFER_TIMEOUT, OutOfHours, OverflowAction, OverflowStep,
    PriorityWeights, QueueSpec, Strategy, WeeklyWindow,
};
use crate::domain::ticket::{Disposition, TicketState, effective_priority};
use crate::error::{RoutingError, RoutingResult, invalid};
use crate::store::{OfferRecord, QueueRecord, TicketRecord};

pub(crate) use crate::store::events_pb::{presence_pb, ts};

/// Reads an optional protobuf duration (negative is invalid).
fn duration(field: &str, value: Option<prost_types::Duration>) -> RoutingResult<Duration> {
    let Some(value) = value else {
        return Ok(Duration::ZERO);
    };
    if value.seconds < 0 || value.nanos < 0 {
        return Err(invalid(format!("{field} must not be negative")));
    }
    Ok(Duration::new(
        u64::try_from(value.seconds).unwrap_or(0),
        u32::try_from(value.nanos).unwrap_or(0),
    ))
}

fn duration_pb(value: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(value.subsec_nanos()).unwrap_or(0),
    }
}

/// Reads a presence from a request; UNSPECIFIED is `None`.
pub(crate) fn presence(value: i32) -> RoutingResult<Option<Presence>> {
    match pb::Presence::try_from(value) {
        Ok(pb::Presence::Unspecified) => Ok(None),
        Ok(pb::Presence::Online) => Ok(Some(Presence::Online)),
        Ok(pb::Presence::Away) => Ok(Some(Presence::Away)),
        Ok(pb::Presence::Offline) => Ok(Some(Presence::Offline)),
        Err(_) => Err(invalid(format!("presence {value} is not a known value"))),
    }
}

/// Reads the disposition of a wrap-up: RESOLVED or RETURN_TO_BOT.
pub(crate) fn wrap_up_disposition(value: i32) -> RoutingResult<Disposition> {
    match pb::Disposition::try_from(value) {
        Ok(pb::Disposition::Resolved) => Ok(Disposition::Resolved),
        Ok(pb::Disposition::ReturnToBot) => Ok(Disposition::ReturnToBot),
        _ => Err(invalid(
            "disposition must be RESOLVED or RETURN_TO_BOT (transfers use TransferConversation)",
        )),
    }
}

/// The profile in a register or update request.
pub(crate) fn agent_profile(agent: &pb::Agent) -> AgentProfile {
    AgentProfile {
        id: agent.id.clone(),
        display_name: agent.display_name.clone(),
        team: agent.team.clone(),
        skills: agent
            .skills
            .iter()
            .map(|s| Skill {
                name: s.name.clone(),
                level: s.level,
            })
            .collect(),
        languages: agent.languages.clone(),
        capacity: agent.max_concurrent,
    }
}

/// An agent on the wire.
pub(crate) fn agent_pb(agent: &Agent) -> pb::Agent {
    pb::Agent {
        id: agent.profile.id.clone(),
        display_name: agent.profile.display_name.clone(),
        skills: agent
            .profile
            .skills
            .iter()
            .map(|s| pb::Skill {
                name: s.name.clone(),
                level: s.level,
            })
            .collect(),
        languages: agent.profile.languages.clone(),
        team: agent.profile.team.clone(),
        max_concurrent: agent.profile.capacity,
        presence: presence_pb(agent.presence).into(),
        active_assignments: agent.assigned,
        last_assigned_at: agent.last_assigned_at.map(ts),
        created_at: Some(ts(agent.created_at)),
        updated_at: Some(ts(agent.updated_at)),
    }
}

/// Skill requirements from the wire (validated by the domain later).
pub(crate) fn requirements(skills: &[common::SkillRequirement]) -> Vec<SkillRequirement> {
    skills
        .iter()
        .map(|s| SkillRequirement {
            name: s.name.clone(),
            min_level: s.min_level,
        })
        .collect()
}

/// A queue definition from an upsert request.
pub(crate) fn queue_spec(queue: &pb::Queue) -> RoutingResult<QueueSpec> {
    let weights = queue.weights.unwrap_or_default();
    let hours = queue.business_hours.clone().unwrap_or_default();
    let mut windows = Vec::with_capacity(hours.windows.len());
    for (i, w) in hours.windows.iter().enumerate() {
        let minute = |field: &str, v: i32| {
            u32::try_from(v).map_err(|_| {
                invalid(format!(
                    "queue.business_hours.windows[{i}].{field} must not be negative"
                ))
            })
        };
        windows.push(WeeklyWindow {
            day: u32::try_from(w.day).unwrap_or(0),
            start_minute: minute("start_minute", w.start_minute)?,
            end_minute: minute("end_minute", w.end_minute)?,
        });
    }
    let out_of_hours = match pb::OutOfHoursBehaviour::try_from(queue.out_of_hours) {
        Ok(pb::OutOfHoursBehaviour::ReturnToBot) => OutOfHours::ReturnToBot,
        Ok(_) => OutOfHours::LeaveMessage,
        Err(_) => return Err(invalid("queue.out_of_hours is not a known value")),
    };
    let mut overflow = Vec::with_capacity(queue.overflow.len());
    for (i, step) in queue.overflow.iter().enumerate() {
        let after = duration(&format!("queue.overflow[{i}].after"), step.after)?;
        let action = match pb::OverflowAction::try_from(step.action) {
            Ok(pb::OverflowAction::WidenSkills) => {
                OverflowAction::WidenSkills(step.drop_skills.clone())
            }
            Ok(pb::OverflowAction::MoveToQueue) => {
                OverflowAction::MoveToQueue(step.target_queue_id.clone())
            }
            _ => {
                return Err(invalid(format!(
                    "queue.overflow[{i}].action must be WIDEN_SKILLS or MOVE_TO_QUEUE"
                )));
            }
        };
        overflow.push(OverflowStep { after, action });
    }
    let offer_timeout = match duration("queue.offer_timeout", queue.offer_timeout)? {
        d if d.is_zero() => DEFAULT_OFFER_TIMEOUT,
        d => d,
    };
    let strategy = match pb::AssignmentStrategy::try_from(queue.assignment_strategy) {
        Ok(pb::AssignmentStrategy::RoundRobin) => Strategy::RoundRobin,
        Ok(_) => Strategy::LeastLoaded,
        Err(_) => return Err(invalid("queue.assignment_strategy is not a known value")),
    };
    Ok(QueueSpec {
        id: queue.id.clone(),
        name: queue.name.clone(),
        scenario_ids: queue.scenario_ids.clone(),
        required_skills: requirements(&queue.required_skills),
        weights: PriorityWeights {
            vip_boost: weights.vip_boost,
            emotion_weight: weights.emotion_weight,
            ageing_per_second: weights.ageing_per_second,
        },
        hours: BusinessHours {
            timezone: hours.timezone,
            windows,
            holidays: hours.holidays,
        },
        out_of_hours,
        overflow,
        max_length: queue.max_length,
        offer_timeout,
        strategy,
    })
}

/// A queue on the wire.
pub(crate) fn queue_pb(record: &QueueRecord) -> pb::Queue {
    let spec = &record.spec;
    pb::Queue {
        id: spec.id.clone(),
        name: spec.name.clone(),
        scenario_ids: spec.scenario_ids.clone(),
        required_skills: spec
            .required_skills
            .iter()
            .map(|s| common::SkillRequirement {
                name: s.name.clone(),
                min_level: s.min_level,
            })
            .collect(),
        weights: Some(pb::PriorityWeights {
            vip_boost: spec.weights.vip_boost,
            emotion_weight: spec.weights.emotion_weight,
            ageing_per_second: spec.weights.ageing_per_second,
        }),
        business_hours: Some(pb::BusinessHours {
            timezone: spec.hours.timezone.clone(),
            windows: spec
                .hours
                .windows
                .iter()
                .map(|w| pb::WeeklyWindow {
                    day: i32::try_from(w.day).unwrap_or(0),
                    start_minute: i32::try_from(w.start_minute).unwrap_or(0),
                    end_minute: i32::try_from(w.end_minute).unwrap_or(0),
                })
                .collect(),
            holidays: spec.hours.holidays.clone(),
        }),
        out_of_hours: match spec.out_of_hours {
            OutOfHours::LeaveMessage => pb::OutOfHoursBehaviour::LeaveMessage,
            OutOfHours::ReturnToBot => pb::OutOfHoursBehaviour::ReturnToBot,
        }
        .into(),
        overflow: spec
            .overflow
            .iter()
            .map(|step| {
                let (action, target, drop) = match &step.action {
                    OverflowAction::WidenSkills(drop) => {
                        (pb::OverflowAction::WidenSkills, String::new(), drop.clone())
                    }
                    OverflowAction::MoveToQueue(target) => {
                        (pb::OverflowAction::MoveToQueue, target.clone(), Vec::new())
                    }
                };
                pb::OverflowStep {
                    after: Some(duration_pb(step.after)),
                    action: action.into(),
                    target_queue_id: target,
                    drop_skills: drop,
                }
            })
            .collect(),
        max_length: spec.max_length,
        offer_timeout: Some(duration_pb(spec.offer_timeout)),
        assignment_strategy: match spec.strategy {
            Strategy::LeastLoaded => pb::AssignmentStrategy::LeastLoaded,
            Strategy::RoundRobin => pb::AssignmentStrategy::RoundRobin,
        }
        .into(),
        created_at: Some(ts(record.created_at)),
        updated_at: Some(ts(record.updated_at)),
    }
}

/// Decodes a stored handoff package.
pub(crate) fn package(ticket: &TicketRecord) -> RoutingResult<HandoffPackage> {
    HandoffPackage::decode(ticket.package.as_slice())
        .map_err(|e| RoutingError::Corrupt(format!("package of ticket {}: {e}", ticket.id)))
}

fn state_pb(state: TicketState) -> pb::TicketState {
    match state {
        TicketState::Queued => pb::TicketState::Queued,
        TicketState::Offered => pb::TicketState::Offered,
        TicketState::Assigned => pb::TicketState::Assigned,
        TicketState::Completed => pb::TicketState::Completed,
        TicketState::Abandoned => pb::TicketState::Abandoned,
        TicketState::Returned => pb::TicketState::Returned,
    }
}

/// A ticket on the wire; the package is included when `with_package`.
pub(crate) fn ticket_pb(
    ticket: &TicketRecord,
    ageing_per_second: f64,
    now: DateTime<Utc>,
    with_package: bool,
) -> RoutingResult<pb::Ticket> {
    let waited = if ticket.state.is_waiting() {
        (now - ticket.enqueued_at).num_milliseconds() as f64 / 1000.0
    } else {
        0.0
    };
    Ok(pb::Ticket {
        id: ticket.id.clone(),
        conversation_id: ticket.conversation_id.clone(),
        scenario_id: ticket.scenario_id.clone(),
        queue_id: ticket.queue_id.clone(),
        state: state_pb(ticket.state).into(),
        priority: ticket.priority,
        effective_priority: effective_priority(ticket.static_priority, ageing_per_second, waited),
        requested_at: Some(ts(ticket.requested_at)),
        enqueued_at: Some(ts(ticket.enqueued_at)),
        offered_agent_id: ticket.offered_agent_id.clone().unwrap_or_default(),
        assigned_agent_id: ticket.assigned_agent_id.clone().unwrap_or_default(),
        attempts: ticket.attempts,
        assigned_at: ticket.assigned_at.map(ts),
        ended_at: ticket.ended_at.map(ts),
        disposition: ticket
            .disposition
            .map(crate::store::events_pb::disposition_pb)
            .unwrap_or_default()
            .into(),
        package: if with_package {
            Some(package(ticket)?)
        } else {
            None
        },
    })
}

/// An offer on the wire, with the package.
pub(crate) fn offer_pb(offer: &OfferRecord, ticket: &TicketRecord) -> RoutingResult<pb::Offer> {
    Ok(pb::Offer {
        id: offer.id.clone(),
        handoff_id: offer.ticket_id.clone(),
        agent_id: offer.agent_id.clone(),
        package: Some(package(ticket)?),
        offered_at: Some(ts(offer.offered_at)),
        expires_at: Some(ts(offer.expires_at)),
        attempt: offer.attempt,
    })
}
