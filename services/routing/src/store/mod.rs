//! Routing's storage: one implementation over [`Db`], PostgreSQL or SQLite, with the same SQL.
//!
//! Every state change runs in one transaction that also writes the events it causes to the
//! outbox; the relay is woken after commit. The invariants of exactly-once assignment live in
//! the schema (see the migrations) and in the conditional statements here:
//! - a ticket is claimed for an offer only while `state = 'queued'`, with `FOR UPDATE SKIP
//!   LOCKED` on PostgreSQL so replicas never wait for (or take) each other's tickets;
//! - a unit of an agent's capacity is reserved by `UPDATE … SET active_load = active_load + 1
//!   WHERE active_load < capacity`, whose row count is checked;
//! - an offer changes state only from `pending`, so an accept, a decline and an expiry of the
//!   same offer cannot both win.
//!
//! Times are passed in by the caller (the service's clock), so tests control expiry.

mod agents;
mod events;
/// Wire helpers shared with the gRPC adapter.
pub(crate) mod events_pb {
    pub(crate) use super::events::{disposition_pb, presence_pb, ts};
}
mod queues;
pub(crate) mod sql;
mod tickets;

use chrono::{DateTime, Utc};

use tandem_platform::db::Db;
use tandem_platform::outbox::OutboxWaker;

use crate::domain::agent::{Agent, AgentProfile, Presence, Skill, SkillRequirement};
use crate::domain::ticket::{Disposition, TicketState};
use crate::error::{RoutingError, RoutingResult};

pub use agents::{AgentFilter, PresenceReason, SessionOpened};
pub use queues::QueueRecord;
pub use tickets::{
    AcceptRequest, Accepted, Completed, DeskView, EnqueueOutcome, EtaSettings, MAX_ACCEPT_BATCH,
    MAX_OFFER_BATCH, NewTicket, OfferBatch, OfferOutcome, OfferRecord, OfferState, PositionUpdates,
    PositionView, QueueStatsView, TicketRecord, TransferKind, TransferTarget, Unassigned,
};

/// A version of an agent's offers: (updated_at, load, assigned, pending offers, newest pending
/// offer id).
pub type OffersVersion = (i64, i64, i64, i64, String);

/// The routing repository.
#[derive(Clone)]
pub struct Store {
    db: Db,
    waker: OutboxWaker,
    default_queue: String,
}

impl Store {
    /// Wraps a migrated database; `waker` is told when events were committed; handoffs that name
    /// no queue and whose scenario has none go to `default_queue` (created on first use).
    pub fn new(db: Db, waker: OutboxWaker, default_queue: impl Into<String>) -> Self {
        Self {
            db,
            waker,
            default_queue: default_queue.into(),
        }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    pub(crate) fn wake_outbox(&self) {
        self.waker.wake();
    }
}

/// Microseconds since the epoch, the stored form of a time.
pub(crate) fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

/// Reads a stored time.
pub(crate) fn time(value: i64) -> RoutingResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(value)
        .ok_or_else(|| RoutingError::Corrupt(format!("time {value} out of range")))
}

/// Reads an optional stored time.
pub(crate) fn opt_time(value: Option<i64>) -> RoutingResult<Option<DateTime<Utc>>> {
    value.map(time).transpose()
}

fn json<T: serde::Serialize>(value: &T) -> RoutingResult<String> {
    serde_json::to_string(value).map_err(|e| RoutingError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> RoutingResult<T> {
    serde_json::from_str(text).map_err(|e| RoutingError::Corrupt(format!("{what}: {e}")))
}

/// An agent row.
#[derive(sqlx::FromRow)]
pub(crate) struct AgentRow {
    id: String,
    display_name: String,
    team: String,
    skills: String,
    languages: String,
    capacity: i64,
    active_load: i64,
    assigned: i64,
    presence: String,
    last_heartbeat_at: Option<i64>,
    last_assigned_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

impl AgentRow {
    pub(crate) fn into_agent(self) -> RoutingResult<Agent> {
        let skills: Vec<Skill> = from_json("agent skills", &self.skills)?;
        let languages: Vec<i32> = from_json("agent languages", &self.languages)?;
        Ok(Agent {
            profile: AgentProfile {
                id: self.id,
                display_name: self.display_name,
                team: self.team,
                skills,
                languages,
                capacity: i32::try_from(self.capacity)
                    .map_err(|e| RoutingError::Corrupt(e.to_string()))?,
            },
            presence: Presence::parse(&self.presence)
                .ok_or_else(|| RoutingError::Corrupt(format!("presence {}", self.presence)))?,
            load: i32::try_from(self.active_load).unwrap_or(i32::MAX),
            assigned: i32::try_from(self.assigned).unwrap_or(i32::MAX),
            last_assigned_at: opt_time(self.last_assigned_at)?,
            last_heartbeat_at: opt_time(self.last_heartbeat_at)?,
            created_at: time(self.created_at)?,
            updated_at: time(self.updated_at)?,
        })
    }
}

pub(crate) fn parse_state(text: &str) -> RoutingResult<TicketState> {
    TicketState::parse(text).ok_or_else(|| RoutingError::Corrupt(format!("ticket state {text}")))
}

pub(crate) fn parse_disposition(text: Option<&str>) -> RoutingResult<Option<Disposition>> {
    text.map(|t| {
        Disposition::parse(t).ok_or_else(|| RoutingError::Corrupt(format!("disposition {t}")))
    })
    .transpose()
}

pub(crate) fn skills_json(skills: &[SkillRequirement]) -> RoutingResult<String> {
    json(&skills)
}
