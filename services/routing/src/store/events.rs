//! The events routing publishes, built from what a transaction just changed.

use chrono::{DateTime, Utc};
use tandem_platform::bus::RawEvent;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::routing::v1 as pb;

use super::tickets::{OfferRecord, TicketRecord, TransferKind, TransferTarget};
use crate::domain::agent::Presence;
use crate::domain::ticket::{Disposition, ReturnReason};

/// A protobuf timestamp.
pub(crate) fn ts(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf duration between two times (zero when negative).
pub(crate) fn span(from: DateTime<Utc>, to: DateTime<Utc>) -> prost_types::Duration {
    let micros = (to - from).num_microseconds().unwrap_or(0).max(0);
    prost_types::Duration {
        seconds: micros / 1_000_000,
        nanos: i32::try_from((micros % 1_000_000) * 1_000).unwrap_or(0),
    }
}

pub(crate) fn presence_pb(presence: Presence) -> pb::Presence {
    match presence {
        Presence::Online => pb::Presence::Online,
        Presence::Away => pb::Presence::Away,
        Presence::Offline => pb::Presence::Offline,
    }
}

pub(crate) fn disposition_pb(disposition: Disposition) -> pb::Disposition {
    match disposition {
        Disposition::Resolved => pb::Disposition::Resolved,
        Disposition::ReturnToBot => pb::Disposition::ReturnToBot,
        Disposition::Transferred => pb::Disposition::Transferred,
        Disposition::Closed => pb::Disposition::Unspecified,
    }
}

fn key(ticket: &TicketRecord) -> Option<String> {
    Some(ticket.conversation_id.clone())
}

pub(crate) fn queued(
    tenant: &TenantId,
    ticket: &TicketRecord,
    position: i32,
    eta_seconds: i32,
) -> RawEvent {
    let event = pb::HandoffQueued {
        handoff_id: ticket.id.clone(),
        conversation_id: ticket.conversation_id.clone(),
        scenario_id: ticket.scenario_id.clone(),
        queue_id: ticket.queue_id.clone(),
        position,
        eta_seconds,
        priority: ticket.priority,
        requested_at: Some(ts(ticket.requested_at)),
        queued_at: Some(ts(ticket.enqueued_at)),
        occurred_at: Some(ts(ticket.enqueued_at)),
    };
    RawEvent::at(tenant, &event, key(ticket), ticket.enqueued_at)
}

pub(crate) fn offered(tenant: &TenantId, ticket: &TicketRecord, offer: &OfferRecord) -> RawEvent {
    let event = pb::HandoffOffered {
        handoff_id: ticket.id.clone(),
        conversation_id: ticket.conversation_id.clone(),
        scenario_id: ticket.scenario_id.clone(),
        queue_id: offer.queue_id.clone(),
        offer_id: offer.id.clone(),
        agent_id: offer.agent_id.clone(),
        attempt: offer.attempt,
        trigger_received_at: ticket.trigger_received_at.map(ts),
        requested_at: Some(ts(ticket.requested_at)),
        queued_at: Some(ts(ticket.enqueued_at)),
        offered_at: Some(ts(offer.offered_at)),
        expires_at: Some(ts(offer.expires_at)),
        occurred_at: Some(ts(offer.offered_at)),
    };
    RawEvent::at(tenant, &event, key(ticket), offer.offered_at)
}

pub(crate) fn assigned(
    tenant: &TenantId,
    ticket: &TicketRecord,
    offer: &OfferRecord,
    team: &str,
    at: DateTime<Utc>,
) -> RawEvent {
    let event = pb::HandoffAssigned {
        handoff_id: ticket.id.clone(),
        conversation_id: ticket.conversation_id.clone(),
        scenario_id: ticket.scenario_id.clone(),
        queue_id: offer.queue_id.clone(),
        offer_id: offer.id.clone(),
        agent_id: offer.agent_id.clone(),
        team: team.to_owned(),
        attempt: offer.attempt,
        trigger_received_at: ticket.trigger_received_at.map(ts),
        requested_at: Some(ts(ticket.requested_at)),
        queued_at: Some(ts(ticket.enqueued_at)),
        offered_at: Some(ts(offer.offered_at)),
        assigned_at: Some(ts(at)),
        occurred_at: Some(ts(at)),
    };
    RawEvent::at(tenant, &event, key(ticket), at)
}

pub(crate) fn declined(
    tenant: &TenantId,
    ticket: &TicketRecord,
    offer: &OfferRecord,
    reason: &str,
    at: DateTime<Utc>,
) -> RawEvent {
    let event = pb::HandoffDeclined {
        handoff_id: ticket.id.clone(),
        conversation_id: ticket.conversation_id.clone(),
        scenario_id: ticket.scenario_id.clone(),
        offer_id: offer.id.clone(),
        agent_id: offer.agent_id.clone(),
        attempt: offer.attempt,
        reason: reason.to_owned(),
        occurred_at: Some(ts(at)),
    };
    RawEvent::at(tenant, &event, key(ticket), at)
}

/// An offer ended without an answer from its agent, for the reason `lapse`.
pub(crate) fn timed_out(
    tenant: &TenantId,
    ticket: &TicketRecord,
    offer: &OfferRecord,
    lapse: pb::OfferLapse,
    at: DateTime<Utc>,
) -> RawEvent {
    let event = pb::HandoffTimedOut {
        handoff_id: ticket.id.clone(),
        conversation_id: ticket.conversation_id.clone(),
        scenario_id: ticket.scenario_id.clone(),
        offer_id: offer.id.clone(),
        agent_id: offer.agent_id.clone(),
        attempt: offer.attempt,
        offered_at: Some(ts(offer.offered_at)),
        occurred_at: Some(ts(at)),
        lapse: lapse.into(),
    };
    RawEvent::at(tenant, &event, key(ticket), at)
}

pub(crate) fn abandoned(
    tenant: &TenantId,
    ticket: &TicketRecord,
    reason: pb::AbandonReason,
    at: DateTime<Utc>,
) -> RawEvent {
    let event = pb::HandoffAbandoned {
        handoff_id: ticket.id.clone(),
        conversation_id: ticket.conversation_id.clone(),
        scenario_id: ticket.scenario_id.clone(),
        queue_id: ticket.queue_id.clone(),
        reason: reason.into(),
        waited: Some(span(ticket.enqueued_at, at)),
        occurred_at: Some(ts(at)),
    };
    RawEvent::at(tenant, &event, key(ticket), at)
}

pub(crate) fn returned(
    tenant: &TenantId,
    ticket: &TicketRecord,
    reason: ReturnReason,
    leave_message: bool,
    at: DateTime<Utc>,
) -> RawEvent {
    let reason = match reason {
        ReturnReason::OutOfHours => pb::ReturnReason::OutOfHours,
        ReturnReason::QueueFull => pb::ReturnReason::QueueFull,
        ReturnReason::Cancelled => pb::ReturnReason::Cancelled,
        ReturnReason::Superseded => pb::ReturnReason::Superseded,
    };
    let event = pb::HandoffReturned {
        handoff_id: ticket.id.clone(),
        conversation_id: ticket.conversation_id.clone(),
        scenario_id: ticket.scenario_id.clone(),
        queue_id: ticket.queue_id.clone(),
        reason: reason.into(),
        leave_message,
        occurred_at: Some(ts(at)),
    };
    RawEvent::at(tenant, &event, key(ticket), at)
}

pub(crate) fn transferred(
    tenant: &TenantId,
    ticket: &TicketRecord,
    kind: TransferKind,
    from_agent: &str,
    target: &TransferTarget,
    note: &str,
    at: DateTime<Utc>,
) -> RawEvent {
    let target = match target {
        TransferTarget::Agent(id) => pb::transfer_target::Target::AgentId(id.clone()),
        TransferTarget::Queue(id) => pb::transfer_target::Target::QueueId(id.clone()),
    };
    let event = pb::HandoffTransferred {
        handoff_id: ticket.id.clone(),
        conversation_id: ticket.conversation_id.clone(),
        scenario_id: ticket.scenario_id.clone(),
        kind: match kind {
            TransferKind::Warm => pb::TransferKind::Warm,
            TransferKind::Cold => pb::TransferKind::Cold,
        }
        .into(),
        from_agent_id: from_agent.to_owned(),
        target: Some(pb::TransferTarget {
            target: Some(target),
        }),
        note: note.to_owned(),
        occurred_at: Some(ts(at)),
    };
    RawEvent::at(tenant, &event, key(ticket), at)
}

#[allow(clippy::too_many_arguments, reason = "one field each of the event")]
pub(crate) fn completed(
    tenant: &TenantId,
    ticket: &TicketRecord,
    agent_id: &str,
    team: &str,
    disposition: Disposition,
    assigned_at: DateTime<Utc>,
    at: DateTime<Utc>,
) -> RawEvent {
    let event = pb::AssignmentCompleted {
        handoff_id: ticket.id.clone(),
        conversation_id: ticket.conversation_id.clone(),
        scenario_id: ticket.scenario_id.clone(),
        agent_id: agent_id.to_owned(),
        team: team.to_owned(),
        disposition: disposition_pb(disposition).into(),
        handle_time: Some(span(assigned_at, at)),
        assigned_at: Some(ts(assigned_at)),
        completed_at: Some(ts(at)),
        occurred_at: Some(ts(at)),
    };
    RawEvent::at(tenant, &event, key(ticket), at)
}

#[allow(clippy::too_many_arguments, reason = "one field each of the event")]
pub(crate) fn presence_changed(
    tenant: &TenantId,
    agent_id: &str,
    team: &str,
    from: Presence,
    to: Presence,
    reason: pb::PresenceChangeReason,
    note: &str,
    active_assignments: i32,
    at: DateTime<Utc>,
) -> RawEvent {
    let event = pb::AgentPresenceChanged {
        agent_id: agent_id.to_owned(),
        team: team.to_owned(),
        from_presence: presence_pb(from).into(),
        to_presence: presence_pb(to).into(),
        reason: reason.into(),
        note: note.to_owned(),
        active_assignments,
        occurred_at: Some(ts(at)),
    };
    RawEvent::at(tenant, &event, Some(agent_id.to_owned()), at)
}

pub(crate) fn queue_stats(
    tenant: &TenantId,
    stats: &pb::QueueStats,
    scenario_ids: Vec<String>,
    default_queue: bool,
) -> RawEvent {
    let at = stats
        .measured_at
        .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .unwrap_or_default();
    let event = pb::QueueStatsReported {
        queue_id: stats.queue_id.clone(),
        depth: stats.depth,
        oldest_wait: stats.oldest_wait,
        agents_available: stats.agents_available,
        eta_seconds: stats.eta_seconds,
        service_rate_per_minute: stats.service_rate_per_minute,
        scenario_ids,
        occurred_at: stats.measured_at,
        within_business_hours: Some(stats.within_business_hours),
        default_queue,
    };
    RawEvent::at(tenant, &event, Some(stats.queue_id.clone()), at)
}

/// A waiting ticket's position or ETA changed.
pub(crate) fn position_updated(
    tenant: &TenantId,
    handoff_id: &str,
    conversation_id: &str,
    queue_id: &str,
    position: i32,
    eta_seconds: i32,
    at: DateTime<Utc>,
) -> RawEvent {
    let event = pb::HandoffPositionUpdated {
        handoff_id: handoff_id.to_owned(),
        conversation_id: conversation_id.to_owned(),
        queue_id: queue_id.to_owned(),
        position,
        eta_seconds,
        occurred_at: Some(ts(at)),
    };
    RawEvent::at(tenant, &event, Some(conversation_id.to_owned()), at)
}
