//! Tickets, offers and assignments: enqueue, offer, accept, decline, expire, complete,
//! transfer, abandon, overflow, position and statistics.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use tandem_platform::bus::RawEvent;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::routing::v1 as pb;

use super::agents::{PresenceReason, change_presence, load_agent, online_agents};
use super::queues::{QueueRecord, all_queues, hold_queue, load_queue, resolve_queue};
use super::sql::{Arg, Sql, Tx, args, claiming, locking};
use super::{
    Store, events, from_json, micros, opt_time, parse_disposition, parse_state, skills_json, time,
};
use crate::domain::agent::{Agent, Presence, SkillRequirement};
use crate::domain::queue::{OutOfHours, OverflowAction};
use crate::domain::select::{Candidate, Need, is_eligible, rank, rank_salted};
use crate::domain::ticket::{Disposition, ReturnReason, TicketState, eta_seconds, static_priority};
use crate::error::{RoutingError, RoutingResult};

/// Warm or cold transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferKind {
    /// The current agent keeps the conversation until the target accepts.
    Warm,
    /// The conversation is released at once and offered to the target.
    Cold,
}

impl TransferKind {
    fn as_str(self) -> &'static str {
        match self {
            TransferKind::Warm => "warm",
            TransferKind::Cold => "cold",
        }
    }
}

/// Where a transfer goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransferTarget {
    /// A named agent.
    Agent(String),
    /// A queue.
    Queue(String),
}

/// A handoff to enqueue.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTicket {
    /// Handoff id: the ticket id and idempotency key.
    pub handoff_id: String,
    /// Conversation.
    pub conversation_id: String,
    /// Scenario.
    pub scenario_id: String,
    /// Queue named by the policy; empty to route by scenario.
    pub queue_id: String,
    /// Base priority 0..100.
    pub priority: i32,
    /// VIP customer.
    pub vip: bool,
    /// Negative-emotion severity 0..1.
    pub severity: f64,
    /// Skills the package asks for.
    pub skills: Vec<SkillRequirement>,
    /// Language (protobuf number), 0 for any.
    pub language: i32,
    /// When the triggering message arrived.
    pub trigger_received_at: Option<DateTime<Utc>>,
    /// When dialog requested the handoff.
    pub requested_at: DateTime<Utc>,
    /// Sequence of the conversation's last message when the handoff was requested (the
    /// package's transcript reference): with `requested_at` it orders the handoffs of one
    /// conversation, since each new one follows at least one more customer message.
    pub transcript_sequence: i64,
    /// The encoded handoff package.
    pub package: Vec<u8>,
}

/// What an enqueue did.
#[derive(Clone, Debug, PartialEq)]
pub struct EnqueueOutcome {
    /// The ticket (new or the one that existed).
    pub ticket: TicketRecord,
    /// False when the handoff id was known: nothing was written.
    pub created: bool,
    /// The offer made in the same transaction ([`Store::enqueue_and_offer`]), with the ticket
    /// as it is now (OFFERED); empty when the ticket waits.
    pub offered: Vec<(TicketRecord, OfferRecord)>,
    /// The waiting ticket of the same conversation under another handoff id that this one
    /// replaced (RETURNED, its pending offer revoked and the agent's unit freed), if any.
    pub superseded: Option<Unassigned>,
}

/// How a new ticket enters its queue.
enum Entry {
    /// Created RETURNED: the queue is closed or full.
    Returned(ReturnReason),
    /// Created QUEUED, `position` in line, with the online agents read for its ETA.
    Waiting {
        position: i64,
        eta_seconds: i32,
        available: i64,
        agents: Vec<Agent>,
    },
}

/// A stored ticket.
#[derive(Clone, Debug, PartialEq)]
pub struct TicketRecord {
    pub id: String,
    pub conversation_id: String,
    pub scenario_id: String,
    pub queue_id: String,
    pub state: TicketState,
    pub priority: i32,
    pub static_priority: f64,
    pub skills: Vec<SkillRequirement>,
    pub language: i32,
    pub target_agent_id: Option<String>,
    pub excluded_agent_id: Option<String>,
    pub transfer_from: Option<String>,
    pub transfer_note: Option<String>,
    pub transfer_kind: Option<TransferKind>,
    pub offered_agent_id: Option<String>,
    pub assigned_agent_id: Option<String>,
    pub attempts: i32,
    pub overflow_applied: i32,
    pub trigger_received_at: Option<DateTime<Utc>>,
    pub requested_at: DateTime<Utc>,
    pub enqueued_at: DateTime<Utc>,
    pub queue_entered_at: DateTime<Utc>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub disposition: Option<Disposition>,
    pub package: Vec<u8>,
}

#[derive(sqlx::FromRow)]
struct TicketRow {
    id: String,
    conversation_id: String,
    scenario_id: String,
    queue_id: String,
    state: String,
    priority: i64,
    static_priority: f64,
    skills: String,
    language: i64,
    target_agent_id: Option<String>,
    excluded_agent_id: Option<String>,
    transfer_from: Option<String>,
    transfer_note: Option<String>,
    transfer_kind: Option<String>,
    offered_agent_id: Option<String>,
    assigned_agent_id: Option<String>,
    attempts: i64,
    overflow_applied: i64,
    trigger_received_at: Option<i64>,
    requested_at: i64,
    enqueued_at: i64,
    queue_entered_at: i64,
    assigned_at: Option<i64>,
    ended_at: Option<i64>,
    disposition: Option<String>,
    package: Vec<u8>,
}

macro_rules! ticket_select {
    ($where:literal) => {
        concat!(
            "SELECT id, conversation_id, scenario_id, queue_id, state, priority, static_priority, \
             skills, language, target_agent_id, excluded_agent_id, transfer_from, transfer_note, \
             transfer_kind, offered_agent_id, assigned_agent_id, attempts, overflow_applied, \
             trigger_received_at, requested_at, enqueued_at, queue_entered_at, assigned_at, \
             ended_at, disposition, package FROM routing_tickets WHERE ",
            $where
        )
    };
}

impl TicketRow {
    fn into_record(self) -> RoutingResult<TicketRecord> {
        Ok(TicketRecord {
            state: parse_state(&self.state)?,
            skills: from_json("ticket skills", &self.skills)?,
            priority: i32::try_from(self.priority).unwrap_or(0),
            language: i32::try_from(self.language).unwrap_or(0),
            transfer_kind: match self.transfer_kind.as_deref() {
                Some("warm") => Some(TransferKind::Warm),
                Some("cold") => Some(TransferKind::Cold),
                _ => None,
            },
            attempts: i32::try_from(self.attempts).unwrap_or(i32::MAX),
            overflow_applied: i32::try_from(self.overflow_applied).unwrap_or(i32::MAX),
            trigger_received_at: opt_time(self.trigger_received_at)?,
            requested_at: time(self.requested_at)?,
            enqueued_at: time(self.enqueued_at)?,
            queue_entered_at: time(self.queue_entered_at)?,
            assigned_at: opt_time(self.assigned_at)?,
            ended_at: opt_time(self.ended_at)?,
            disposition: parse_disposition(self.disposition.as_deref())?,
            id: self.id,
            conversation_id: self.conversation_id,
            scenario_id: self.scenario_id,
            queue_id: self.queue_id,
            static_priority: self.static_priority,
            target_agent_id: self.target_agent_id,
            excluded_agent_id: self.excluded_agent_id,
            transfer_from: self.transfer_from,
            transfer_note: self.transfer_note,
            offered_agent_id: self.offered_agent_id,
            assigned_agent_id: self.assigned_agent_id,
            package: self.package,
        })
    }
}

/// Where an offer is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OfferState {
    Pending,
    Accepted,
    Declined,
    Expired,
    Revoked,
}

impl OfferState {
    fn parse(text: &str) -> RoutingResult<Self> {
        Ok(match text {
            "pending" => OfferState::Pending,
            "accepted" => OfferState::Accepted,
            "declined" => OfferState::Declined,
            "expired" => OfferState::Expired,
            "revoked" => OfferState::Revoked,
            other => return Err(RoutingError::Corrupt(format!("offer state {other}"))),
        })
    }
}

/// A stored offer.
#[derive(Clone, Debug, PartialEq)]
pub struct OfferRecord {
    pub id: String,
    pub ticket_id: String,
    pub conversation_id: String,
    pub agent_id: String,
    pub queue_id: String,
    pub attempt: i32,
    /// True for the offer of a warm transfer (the ticket stays with its agent meanwhile).
    pub transfer: bool,
    pub state: OfferState,
    /// Why it was revoked: `taken`, `customer_left`, `cancelled`.
    pub revoke_reason: Option<String>,
    pub offered_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct OfferRow {
    id: String,
    ticket_id: String,
    conversation_id: String,
    agent_id: String,
    queue_id: String,
    attempt: i64,
    kind: String,
    state: String,
    revoke_reason: Option<String>,
    offered_at: i64,
    expires_at: i64,
}

macro_rules! offer_select {
    ($where:literal) => {
        concat!(
            "SELECT id, ticket_id, conversation_id, agent_id, queue_id, attempt, kind, state, \
             revoke_reason, offered_at, expires_at FROM routing_offers WHERE ",
            $where
        )
    };
}

impl OfferRow {
    fn into_record(self) -> RoutingResult<OfferRecord> {
        Ok(OfferRecord {
            attempt: i32::try_from(self.attempt).unwrap_or(i32::MAX),
            transfer: self.kind == "transfer",
            state: OfferState::parse(&self.state)?,
            offered_at: time(self.offered_at)?,
            expires_at: time(self.expires_at)?,
            id: self.id,
            ticket_id: self.ticket_id,
            conversation_id: self.conversation_id,
            agent_id: self.agent_id,
            queue_id: self.queue_id,
            revoke_reason: self.revoke_reason,
        })
    }
}

/// What an attempt to offer a queued ticket did.
#[derive(Clone, Debug, PartialEq)]
pub enum OfferOutcome {
    /// The ticket was offered.
    Offered(Box<(TicketRecord, OfferRecord)>),
    /// No eligible agent has spare capacity; the ticket stays queued.
    NoAgent,
    /// The ticket is no longer queued (or another replica holds it).
    Gone,
}

/// What one batch of offers did ([`Store::offer_queued`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OfferBatch {
    /// The offers made, with their tickets (now OFFERED).
    pub offered: Vec<(TicketRecord, OfferRecord)>,
    /// Waiting tickets the batch claimed (offered or not).
    pub claimed: usize,
    /// Planned offers dropped because the agent's reservation failed (its load or presence
    /// changed since it was read); their tickets stay queued for the next pass.
    pub contended: usize,
}

/// The most tickets one offer batch claims.
pub const MAX_OFFER_BATCH: usize = 256;

/// `$first, $(first+step), …`: `count` parameter references for an `IN (…)` list whose values
/// sit every `step` parameters from `$first`.
fn placeholders(first: usize, count: usize, step: usize) -> String {
    (0..count)
        .map(|i| format!("${}", first + i * step))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rows of a multi-row `VALUES` list whose rows bind six parameters each, from `$first`:
/// `row` writes one row, given a function that lists the row's parameters in a range of its
/// six (`p(0..2)` is `$n, $(n+1)`).
fn values_rows(
    count: usize,
    first: usize,
    row: impl Fn(&dyn Fn(std::ops::Range<usize>) -> String) -> String,
) -> String {
    (0..count)
        .map(|k| {
            let base = first + k * 6;
            row(&|range: std::ops::Range<usize>| {
                range
                    .map(|i| format!("${}", base + i))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `CASE id WHEN $first THEN $(first+1) WHEN … END` over `count` (key, value) parameter pairs.
fn case_of(first: usize, count: usize) -> String {
    let mut text = String::from("CASE id");
    for i in 0..count {
        let key = first + i * 2;
        text.push_str(&format!(" WHEN ${key} THEN ${}", key + 1));
    }
    text.push_str(" END");
    text
}

/// An accepted offer.
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    /// The ticket, ASSIGNED.
    pub ticket: TicketRecord,
    /// The offer accepted.
    pub offer: OfferRecord,
    /// For a warm transfer: the agent who handed the conversation over.
    pub previous_agent: Option<String>,
    /// The ageing weight (per second) of the offer's queue, for the ticket's effective priority
    /// in the confirmation (0 when the queue is gone).
    pub ageing_per_second: f64,
}

/// One accept answered by [`Store::accept_many`]: `agent_id` accepts its offer `offer_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptRequest {
    /// The accepting agent.
    pub agent_id: String,
    /// The offer.
    pub offer_id: String,
}

/// The most accepts one [`Store::accept_many`] transaction answers.
pub const MAX_ACCEPT_BATCH: usize = 128;

/// A queue's statistics are reported again at least this often while they do not change.
pub const REPORT_UNCHANGED_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

/// A finished assignment.
#[derive(Clone, Debug, PartialEq)]
pub struct Completed {
    /// The ticket after the change.
    pub ticket: TicketRecord,
    /// The agent whose capacity was freed.
    pub agent_id: String,
}

/// What ending a waiting ticket released.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Unassigned {
    /// The ticket after the change, if there was a live one.
    pub ticket: Option<TicketRecord>,
    /// Offers withdrawn.
    pub revoked: Vec<OfferRecord>,
    /// Agents whose capacity was freed.
    pub freed_agents: Vec<String>,
}

/// A waiting ticket's place.
#[derive(Clone, Debug, PartialEq)]
pub struct PositionView {
    /// The ticket.
    pub ticket: TicketRecord,
    /// 1 = next; 0 when not waiting.
    pub position: i32,
    /// Seconds until accepted.
    pub eta_seconds: i32,
    /// Online agents with spare capacity and the ticket's skills.
    pub agents_available: i32,
    /// Whether the queue is open.
    pub within_business_hours: bool,
}

/// Live statistics of a queue, with the scenarios routed to it.
pub type QueueStatsView = (pb::QueueStats, Vec<String>);

/// What [`Store::desk_view`] read.
#[derive(Clone, Debug, PartialEq)]
pub struct DeskView {
    /// The agent's open session, if any.
    pub session_id: Option<String>,
    /// The stream epoch of that session.
    pub epoch: i64,
    /// The version of the agent's offers.
    pub version: super::OffersVersion,
    /// The pending offers, oldest first; the ticket is read only for offers the desk does not
    /// know yet.
    pub pending: Vec<(OfferRecord, Option<TicketRecord>)>,
    /// The agent's active assignments, oldest first, as (ticket id, id of the offer accepted,
    /// ticket); the ticket is read only for assignments the desk does not know yet.
    pub assigned: Vec<(String, String, Option<TicketRecord>)>,
}

/// An agent's pending offers, oldest first, with the tickets of those `known` does not name
/// (one statement for the offers, one for all the tickets wanted).
async fn pending_with_tickets(
    tx: &mut Tx,
    tenant: &TenantId,
    agent_id: &str,
    known: impl Fn(&str) -> bool,
) -> RoutingResult<Vec<(OfferRecord, Option<TicketRecord>)>> {
    let rows: Vec<OfferRow> = tx
        .fetch_all(
            offer_select!(
                "tenant = $1 AND agent_id = $2 AND state = 'pending' ORDER BY offered_at, id"
            ),
            args![tenant.as_str(), agent_id],
        )
        .await?;
    let offers = rows
        .into_iter()
        .map(OfferRow::into_record)
        .collect::<RoutingResult<Vec<_>>>()?;
    let wanted = offers
        .iter()
        .filter(|o| !known(&o.id))
        .map(|o| o.ticket_id.as_str());
    let tickets = tickets_by_id(tx, tenant, wanted).await?;
    Ok(offers
        .into_iter()
        .map(|offer| {
            let ticket = if known(&offer.id) {
                None
            } else {
                tickets.get(&offer.ticket_id).cloned()
            };
            (offer, ticket)
        })
        .collect())
}

/// The tickets with the given ids (repeats allowed), by id, in one statement.
async fn tickets_by_id<'a>(
    tx: &mut Tx,
    tenant: &TenantId,
    ids: impl Iterator<Item = &'a str>,
) -> RoutingResult<HashMap<String, TicketRecord>> {
    let mut wanted: Vec<&str> = ids.collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut tickets = HashMap::new();
    if wanted.is_empty() {
        return Ok(tickets);
    }
    let sql = format!(
        "{}tenant = $1 AND id IN ({})",
        ticket_select!(""),
        placeholders(2, wanted.len(), 1)
    );
    let mut list = args![tenant.as_str()];
    list.extend(wanted.iter().map(|id| Arg::from(*id)));
    for row in tx.fetch_all_text::<TicketRow>(&sql, list).await? {
        let ticket = row.into_record()?;
        tickets.insert(ticket.id.clone(), ticket);
    }
    Ok(tickets)
}

/// An agent's active assignments, oldest first, as (ticket id, offer id, ticket), with the
/// tickets of those `known(ticket id, offer id)` does not name (one statement for the
/// assignments, one for all the tickets wanted).
async fn assigned_with_tickets(
    tx: &mut Tx,
    tenant: &TenantId,
    agent_id: &str,
    known: impl Fn(&str, &str) -> bool,
) -> RoutingResult<Vec<(String, String, Option<TicketRecord>)>> {
    let rows: Vec<(String, String)> = tx
        .fetch_all(
            "SELECT ticket_id, offer_id FROM routing_assignments WHERE tenant = $1 \
             AND agent_id = $2 AND ended_at IS NULL ORDER BY assigned_at, id",
            args![tenant.as_str(), agent_id],
        )
        .await?;
    let wanted = rows
        .iter()
        .filter(|(ticket, offer)| !known(ticket, offer))
        .map(|(ticket, _)| ticket.as_str());
    let tickets = tickets_by_id(tx, tenant, wanted).await?;
    Ok(rows
        .into_iter()
        .map(|(ticket_id, offer_id)| {
            let ticket = if known(&ticket_id, &offer_id) {
                None
            } else {
                tickets.get(&ticket_id).cloned()
            };
            (ticket_id, offer_id, ticket)
        })
        .collect())
}

fn uuid() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub(crate) async fn load_ticket(
    tx: &mut Tx,
    tenant: &TenantId,
    id: &str,
    lock: bool,
) -> RoutingResult<Option<TicketRecord>> {
    let sql = if lock {
        locking!(ticket_select!("tenant = $1 AND id = $2"))
    } else {
        ticket_select!("tenant = $1 AND id = $2").into()
    };
    let row: Option<TicketRow> = tx.fetch_optional(sql, args![tenant.as_str(), id]).await?;
    row.map(TicketRow::into_record).transpose()
}

async fn must_ticket(tx: &mut Tx, tenant: &TenantId, id: &str) -> RoutingResult<TicketRecord> {
    load_ticket(tx, tenant, id, false)
        .await?
        .ok_or_else(|| RoutingError::Corrupt(format!("ticket {id} vanished")))
}

/// Ends the assignment of `ticket`, loaded locked and assigned, with its agent rows locked
/// first: a pending warm-transfer offer of it is withdrawn (`HandoffTimedOut`), the assignment
/// ended with `disposition` and the agent's unit freed, the ticket completed
/// (`AssignmentCompleted`); the events are queued in the outbox. Returns the completed ticket
/// with the freed agent, and the withdrawn offer.
async fn end_assigned(
    tx: &mut Tx,
    tenant: &TenantId,
    ticket: &TicketRecord,
    disposition: Disposition,
    now: DateTime<Utc>,
) -> RoutingResult<(Completed, Vec<OfferRecord>)> {
    let ticket_id = ticket.id.as_str();
    let mut out = Vec::new();
    let mut revoked = Vec::new();
    if let Some(offer) = pending_offer_of_ticket(tx, tenant, ticket_id).await?
        && release_offer(tx, tenant, &offer, "revoked", Some("cancelled"), now).await?
    {
        out.push(events::timed_out(
            tenant,
            ticket,
            &offer,
            pb::OfferLapse::Withdrawn,
            now,
        ));
        revoked.push(offer);
    }
    let (agent_id, team, assigned_at) = end_assignment(tx, tenant, ticket_id, disposition, now)
        .await?
        .ok_or_else(|| RoutingError::Corrupt(format!("ticket {ticket_id} has no assignment")))?;
    tx.execute(
        "UPDATE routing_tickets SET state = 'completed', ended_at = $3, disposition = $4, \
         offered_agent_id = NULL, updated_at = $3 WHERE tenant = $1 AND id = $2",
        args![
            tenant.as_str(),
            ticket_id,
            micros(now),
            disposition.as_str()
        ],
    )
    .await?;
    let ticket = must_ticket(tx, tenant, ticket_id).await?;
    out.push(events::completed(
        tenant,
        &ticket,
        &agent_id,
        &team,
        disposition,
        assigned_at,
        now,
    ));
    tx.enqueue(&out).await?;
    Ok((Completed { ticket, agent_id }, revoked))
}

async fn load_offer(
    tx: &mut Tx,
    tenant: &TenantId,
    id: &str,
    lock: bool,
) -> RoutingResult<Option<OfferRecord>> {
    let sql = if lock {
        locking!(offer_select!("tenant = $1 AND id = $2"))
    } else {
        offer_select!("tenant = $1 AND id = $2").into()
    };
    let row: Option<OfferRow> = tx.fetch_optional(sql, args![tenant.as_str(), id]).await?;
    row.map(OfferRow::into_record).transpose()
}

async fn pending_offer_of_ticket(
    tx: &mut Tx,
    tenant: &TenantId,
    ticket_id: &str,
) -> RoutingResult<Option<OfferRecord>> {
    let row: Option<OfferRow> = tx
        .fetch_optional(
            locking!(offer_select!(
                "tenant = $1 AND ticket_id = $2 AND state = 'pending'"
            )),
            args![tenant.as_str(), ticket_id],
        )
        .await?;
    row.map(OfferRow::into_record).transpose()
}

fn candidates(agents: &[Agent]) -> Vec<Candidate> {
    agents
        .iter()
        .map(|a| Candidate {
            id: a.profile.id.clone(),
            skills: a.profile.skills.clone(),
            languages: a.profile.languages.clone(),
            capacity: a.profile.capacity,
            load: a.load,
            last_assigned_at: a.last_assigned_at,
        })
        .collect()
}

/// Locks agent rows in id order before any offer or ticket row of the transaction (PostgreSQL;
/// on SQLite the writer lock taken at `BEGIN IMMEDIATE` covers it). `ids` is a sub-select of
/// the agent ids over the parameters `args` (`$1` is the tenant).
///
/// Every transaction that changes an agent's offers takes the agent row first: presence changes
/// (which expire the agent's offers), accept, decline, expiry, completion, transfer and the
/// customer leaving. Two of them that meet on an offer or a ticket have then already met on its
/// agent and run one after the other, so no lock cycle can form and PostgreSQL never has to
/// abort one as a deadlock. Offer batches lock waiting tickets and then their agents, both with
/// `SKIP LOCKED`, so they never wait for a row while holding tickets.
async fn lock_agents_first(tx: &mut Tx, ids: &str, args: Vec<Arg>) -> RoutingResult<()> {
    if !tx.is_postgres() {
        return Ok(());
    }
    let sql = format!(
        "SELECT id FROM routing_agents WHERE tenant = $1 AND id IN ({ids}) ORDER BY id FOR UPDATE"
    );
    let _: Vec<(String,)> = tx.fetch_all_text(&sql, args).await?;
    Ok(())
}

/// The agents of a ticket: the one holding it and the one of its pending offer.
const AGENTS_OF_TICKET: &str = "SELECT assigned_agent_id FROM routing_tickets \
     WHERE tenant = $1 AND id = $2 \
     UNION SELECT agent_id FROM routing_offers \
     WHERE tenant = $1 AND ticket_id = $2 AND state = 'pending'";

/// Reserves one unit of the agent's capacity; false when it is full or not online.
async fn reserve(
    tx: &mut Tx,
    tenant: &TenantId,
    agent_id: &str,
    now: DateTime<Utc>,
) -> RoutingResult<bool> {
    let n = tx
        .execute(
            "UPDATE routing_agents SET active_load = active_load + 1, updated_at = $3 \
             WHERE tenant = $1 AND id = $2 AND presence = 'online' AND active_load < capacity",
            args![tenant.as_str(), agent_id, micros(now)],
        )
        .await?;
    Ok(n == 1)
}

async fn release_unit(
    tx: &mut Tx,
    tenant: &TenantId,
    agent_id: &str,
    assignment: bool,
    now: DateTime<Utc>,
) -> RoutingResult<()> {
    let sql = if assignment {
        "UPDATE routing_agents SET active_load = active_load - 1, assigned = assigned - 1, \
         updated_at = $3 WHERE tenant = $1 AND id = $2"
    } else {
        "UPDATE routing_agents SET active_load = active_load - 1, updated_at = $3 \
         WHERE tenant = $1 AND id = $2"
    };
    tx.execute(sql, args![tenant.as_str(), agent_id, micros(now)])
        .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments, reason = "the offer and its context")]
async fn insert_offer(
    tx: &mut Tx,
    tenant: &TenantId,
    ticket: &TicketRecord,
    agent_id: &str,
    queue_id: &str,
    transfer: bool,
    timeout: std::time::Duration,
    now: DateTime<Utc>,
) -> RoutingResult<OfferRecord> {
    let offer = OfferRecord {
        id: uuid(),
        ticket_id: ticket.id.clone(),
        conversation_id: ticket.conversation_id.clone(),
        agent_id: agent_id.to_owned(),
        queue_id: queue_id.to_owned(),
        attempt: ticket.attempts + 1,
        transfer,
        state: OfferState::Pending,
        revoke_reason: None,
        offered_at: now,
        expires_at: now + chrono::Duration::from_std(timeout).unwrap_or_default(),
    };
    tx.execute(
        "INSERT INTO routing_offers (tenant, id, ticket_id, conversation_id, agent_id, queue_id, \
         attempt, kind, state, offered_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9, $10)",
        args![
            tenant.as_str(),
            offer.id.as_str(),
            offer.ticket_id.as_str(),
            offer.conversation_id.as_str(),
            agent_id,
            queue_id,
            offer.attempt,
            if transfer { "transfer" } else { "route" },
            micros(now),
            micros(offer.expires_at)
        ],
    )
    .await?;
    Ok(offer)
}

/// Ends a pending offer (declined, expired or revoked) and frees the agent's unit: a routing
/// offer's ticket goes back to the queue; a warm transfer's ticket stays with its agent. Returns
/// false when the offer was no longer pending (someone else resolved it).
async fn release_offer(
    tx: &mut Tx,
    tenant: &TenantId,
    offer: &OfferRecord,
    state: &str,
    revoke_reason: Option<&str>,
    now: DateTime<Utc>,
) -> RoutingResult<bool> {
    let n = tx
        .execute(
            "UPDATE routing_offers SET state = $3, revoke_reason = $4, resolved_at = $5 \
             WHERE tenant = $1 AND id = $2 AND state = 'pending'",
            args![
                tenant.as_str(),
                offer.id.as_str(),
                state,
                revoke_reason,
                micros(now)
            ],
        )
        .await?;
    if n == 0 {
        return Ok(false);
    }
    release_unit(tx, tenant, &offer.agent_id, false, now).await?;
    if offer.transfer {
        tx.execute(
            "UPDATE routing_tickets SET offered_agent_id = NULL, updated_at = $3 \
             WHERE tenant = $1 AND id = $2",
            args![tenant.as_str(), offer.ticket_id.as_str(), micros(now)],
        )
        .await?;
    } else {
        tx.execute(
            "UPDATE routing_tickets SET state = 'queued', offered_agent_id = NULL, updated_at = $4 \
             WHERE tenant = $1 AND id = $2 AND state = 'offered' AND offered_agent_id = $3",
            args![
                tenant.as_str(),
                offer.ticket_id.as_str(),
                offer.agent_id.as_str(),
                micros(now)
            ],
        )
        .await?;
    }
    Ok(true)
}

/// Expires every pending offer of an agent (it went away or offline), with events.
pub(crate) async fn expire_agent_offers(
    tx: &mut Tx,
    tenant: &TenantId,
    agent_id: &str,
    now: DateTime<Utc>,
    out: &mut Vec<RawEvent>,
) -> RoutingResult<Vec<OfferRecord>> {
    let rows: Vec<OfferRow> = tx
        .fetch_all(
            offer_select!("tenant = $1 AND agent_id = $2 AND state = 'pending' ORDER BY id"),
            args![tenant.as_str(), agent_id],
        )
        .await?;
    let mut released = Vec::new();
    for row in rows {
        let offer = row.into_record()?;
        if release_offer(tx, tenant, &offer, "expired", None, now).await? {
            let ticket = must_ticket(tx, tenant, &offer.ticket_id).await?;
            out.push(events::timed_out(
                tenant,
                &ticket,
                &offer,
                pb::OfferLapse::AgentUnavailable,
                now,
            ));
            released.push(offer);
        }
    }
    Ok(released)
}

/// Why a waiting ticket ends ([`end_waiting_ticket`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WaitingEnd {
    /// The customer left: ABANDONED.
    CustomerLeft,
    /// The customer cancelled: RETURNED.
    Cancelled,
    /// A newer handoff of the conversation replaced it: RETURNED.
    Superseded,
}

/// Ends a waiting (queued or offered) ticket, locked by the caller after its agents, inside
/// `tx`: its pending offer is revoked and the agent's unit freed, and the ticket becomes
/// ABANDONED (the customer left) or RETURNED (cancelled or superseded), its event added to `out`.
async fn end_waiting_ticket(
    tx: &mut Tx,
    tenant: &TenantId,
    ticket: &TicketRecord,
    why: WaitingEnd,
    now: DateTime<Utc>,
    out: &mut Vec<RawEvent>,
) -> RoutingResult<Unassigned> {
    let closed = why == WaitingEnd::CustomerLeft;
    let mut result = Unassigned::default();
    if let Some(offer) = pending_offer_of_ticket(tx, tenant, &ticket.id).await? {
        let reason = if closed { "customer_left" } else { "cancelled" };
        if release_offer(tx, tenant, &offer, "revoked", Some(reason), now).await? {
            result.freed_agents.push(offer.agent_id.clone());
            result.revoked.push(offer);
        }
    }
    let state = if closed { "abandoned" } else { "returned" };
    tx.execute(
        "UPDATE routing_tickets SET state = $3, ended_at = $4, offered_agent_id = NULL, \
         updated_at = $4 WHERE tenant = $1 AND id = $2",
        args![tenant.as_str(), ticket.id.as_str(), state, micros(now)],
    )
    .await?;
    let done = must_ticket(tx, tenant, &ticket.id).await?;
    out.push(if closed {
        events::abandoned(tenant, &done, pb::AbandonReason::CustomerLeft, now)
    } else {
        let reason = if why == WaitingEnd::Superseded {
            ReturnReason::Superseded
        } else {
            ReturnReason::Cancelled
        };
        events::returned(tenant, &done, reason, false, now)
    });
    result.ticket = Some(done);
    Ok(result)
}

/// Plans and writes offers of claimed (locked) queued `tickets` of `queue` to the best of the
/// online `agents`, inside `tx`: the offers, the tickets moved to OFFERED, the agents' reserved
/// units and the `HandoffOffered` events. Commits nothing. Returns the offers made and how many
/// planned offers were dropped because their agent was held or changed under the plan.
async fn offer_tickets(
    tx: &mut Tx,
    tenant: &TenantId,
    queue: &QueueRecord,
    tickets: &[TicketRecord],
    agents: &[Agent],
    now: DateTime<Utc>,
) -> RoutingResult<(Vec<(TicketRecord, OfferRecord)>, usize)> {
    let base = candidates(agents);
    let salt = Some(uuid::Uuid::now_v7().as_u128() as u64);
    let mut declined: Vec<Vec<String>> = Vec::with_capacity(tickets.len());
    for ticket in tickets {
        declined.push(if ticket.attempts > 0 {
            let rows: Vec<(String,)> = tx
                .fetch_all(
                    "SELECT DISTINCT agent_id FROM routing_offers WHERE tenant = $1 \
                         AND ticket_id = $2 AND state IN ('declined', 'expired')",
                    args![tenant.as_str(), ticket.id.as_str()],
                )
                .await?;
            rows.into_iter().map(|(id,)| id).collect()
        } else {
            Vec::new()
        });
    }
    // Plan in memory, then lock the chosen agents on PostgreSQL with SKIP LOCKED: this
    // transaction already holds its claimed tickets, so it must never wait for an agent
    // row. (A claim can also hold a ticket that another replica offered a moment before,
    // since PostgreSQL keeps the lock of a row it rechecked and skipped; an accept holding
    // that offer's agent and waiting for that ticket would otherwise close a cycle.)
    // Agents another transaction holds (an accept, a presence change, another batch) are
    // left out and the tickets planned for them are planned again over the others, at most
    // three times; what is still planned for an agent not held is dropped as contended.
    let mut held: Vec<String> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let mut pool: Vec<Candidate>;
    // (ticket index, agent index) of every planned offer.
    let mut plan: Vec<(usize, usize)>;
    let mut round = 0;
    loop {
        pool = base.clone();
        for candidate in &mut pool {
            if skipped.contains(&candidate.id) {
                candidate.load = candidate.capacity;
            }
        }
        plan = Vec::new();
        for (i, ticket) in tickets.iter().enumerate() {
            let need = Need {
                skills: &ticket.skills,
                language: ticket.language,
                declined: &declined[i],
                only_agent: ticket.target_agent_id.as_deref(),
                excluded: ticket.excluded_agent_id.as_deref(),
            };
            let best = rank_salted(&pool, &need, queue.spec.strategy, salt)
                .first()
                .map(|c| c.id.clone());
            if let Some(best) = best
                && let Some(at) = pool.iter().position(|c| c.id == best)
            {
                pool[at].load += 1;
                plan.push((i, at));
            }
        }
        if !tx.is_postgres() {
            break;
        }
        let mut to_lock: Vec<&str> = plan
            .iter()
            .map(|&(_, at)| pool[at].id.as_str())
            .filter(|id| !held.iter().any(|h| h == id))
            .collect();
        to_lock.sort_unstable();
        to_lock.dedup();
        if to_lock.is_empty() {
            break;
        }
        let lock = format!(
            "SELECT id FROM routing_agents WHERE tenant = $1 AND id IN ({}) \
                 ORDER BY id FOR UPDATE SKIP LOCKED",
            placeholders(2, to_lock.len(), 1)
        );
        let mut lock_args = args![tenant.as_str()];
        lock_args.extend(to_lock.iter().map(|id| Arg::from(*id)));
        let locked: Vec<(String,)> = tx.fetch_all_text(&lock, lock_args).await?;
        let mut missed = false;
        for id in to_lock {
            if locked.iter().any(|(l,)| l == id) {
                held.push(id.to_owned());
            } else {
                skipped.push(id.to_owned());
                missed = true;
            }
        }
        round += 1;
        if !missed || round >= 3 {
            break;
        }
    }
    if plan.is_empty() {
        return Ok((Vec::new(), 0));
    }
    // Units wanted per agent held (every planned agent on SQLite), in id order.
    let postgres = tx.is_postgres();
    let mut wanted: Vec<(String, i64)> = Vec::new();
    for &(_, at) in &plan {
        let id = &pool[at].id;
        if postgres && !held.contains(id) {
            continue;
        }
        match wanted.iter_mut().find(|(w, _)| w == id) {
            Some((_, n)) => *n += 1,
            None => wanted.push((id.clone(), 1)),
        }
    }
    wanted.sort();
    if wanted.is_empty() {
        return Ok((Vec::new(), plan.len()));
    }
    let ids_list = placeholders(3, wanted.len(), 2);
    let mut lock_args = args![tenant.as_str(), micros(now)];
    for (id, n) in &wanted {
        lock_args.push(id.into());
        lock_args.push((*n).into());
    }
    let units = case_of(3, wanted.len());
    let reserve = format!(
        "UPDATE routing_agents SET active_load = active_load + {units}, updated_at = $2 \
             WHERE tenant = $1 AND id IN ({ids_list}) AND presence = 'online' \
             AND active_load + {units} <= capacity RETURNING id"
    );
    let reserved: Vec<(String,)> = tx.fetch_all_text(&reserve, lock_args).await?;
    let reserved: Vec<String> = reserved.into_iter().map(|(id,)| id).collect();
    let mut offered: Vec<(TicketRecord, OfferRecord)> = Vec::new();
    let mut contended = 0;
    for &(i, at) in &plan {
        let agent_id = &pool[at].id;
        if !reserved.contains(agent_id) {
            contended += 1;
            continue;
        }
        let ticket = &tickets[i];
        let offer = OfferRecord {
            id: uuid(),
            ticket_id: ticket.id.clone(),
            conversation_id: ticket.conversation_id.clone(),
            agent_id: agent_id.clone(),
            queue_id: queue.spec.id.clone(),
            attempt: ticket.attempts + 1,
            transfer: false,
            state: OfferState::Pending,
            revoke_reason: None,
            offered_at: now,
            expires_at: now
                + chrono::Duration::from_std(queue.spec.offer_timeout).unwrap_or_default(),
        };
        let ticket = TicketRecord {
            state: TicketState::Offered,
            offered_agent_id: Some(agent_id.clone()),
            attempts: ticket.attempts + 1,
            ..ticket.clone()
        };
        offered.push((ticket, offer));
    }
    if offered.is_empty() {
        return Ok((offered, contended));
    }
    let mut insert = String::from(
        "INSERT INTO routing_offers (tenant, id, ticket_id, conversation_id, agent_id, \
             queue_id, attempt, kind, state, offered_at, expires_at) VALUES ",
    );
    let mut insert_args = args![tenant.as_str(), queue.spec.id.as_str(), micros(now)];
    insert.push_str(&values_rows(offered.len(), 4, |p| {
        format!(
            "($1, {}, $2, {}, 'route', 'pending', $3, {})",
            p(0..4),
            p(4..5),
            p(5..6)
        )
    }));
    for (_, offer) in &offered {
        insert_args.extend(args![
            offer.id.as_str(),
            offer.ticket_id.as_str(),
            offer.conversation_id.as_str(),
            offer.agent_id.as_str(),
            offer.attempt,
            micros(offer.expires_at)
        ]);
    }
    tx.execute_text(&insert, insert_args).await?;
    let agents_by_ticket = case_of(3, offered.len());
    let update = format!(
        "UPDATE routing_tickets SET state = 'offered', offered_agent_id = {agents_by_ticket}, \
             attempts = attempts + 1, offered_at = $2, updated_at = $2 \
             WHERE tenant = $1 AND state = 'queued' AND id IN ({})",
        placeholders(3, offered.len(), 2)
    );
    let mut update_args = args![tenant.as_str(), micros(now)];
    for (ticket, offer) in &offered {
        update_args.push(ticket.id.as_str().into());
        update_args.push(offer.agent_id.as_str().into());
    }
    let moved = tx.execute_text(&update, update_args).await?;
    if moved != offered.len() as u64 {
        // The claimed rows are locked by this transaction; anything else is a bug.
        return Err(RoutingError::Corrupt(format!(
            "{} of {} claimed tickets changed state under their lock",
            offered.len() as u64 - moved.min(offered.len() as u64),
            offered.len()
        )));
    }
    let out: Vec<RawEvent> = offered
        .iter()
        .map(|(ticket, offer)| events::offered(tenant, ticket, offer))
        .collect();
    tx.enqueue(&out).await?;
    Ok((offered, contended))
}

/// The key queued tickets are served in: effective priority (static part plus ageing), highest
/// first. `$k` is the queue's ageing per microsecond.
const ORDER_KEY: &str = "(static_priority - $3 * CAST(enqueued_at AS DOUBLE PRECISION))";

/// Counts the queued tickets of queue `$2` served before a ticket whose order key is `$4` and
/// enqueue time `$5` (`$3`: the queue's ageing per microsecond; `$6`: the ticket itself, not
/// counted).
const AHEAD: &str = "SELECT COUNT(*) FROM routing_tickets WHERE tenant = $1 AND queue_id = $2 \
     AND state = 'queued' AND id <> $6 AND ( \
     (static_priority - $3 * CAST(enqueued_at AS DOUBLE PRECISION)) > $4 \
     OR ((static_priority - $3 * CAST(enqueued_at AS DOUBLE PRECISION)) = $4 \
         AND enqueued_at < $5))";

async fn position_of(
    tx: &mut Tx,
    tenant: &TenantId,
    ticket: &TicketRecord,
    queue: &QueueRecord,
) -> RoutingResult<i64> {
    let ageing = queue.spec.weights.ageing_per_second / 1e6;
    let own_key = ticket.static_priority - ageing * micros(ticket.enqueued_at) as f64;
    let ahead = tx
        .fetch_i64(
            AHEAD,
            args![
                tenant.as_str(),
                ticket.queue_id.as_str(),
                ageing,
                own_key,
                micros(ticket.enqueued_at),
                ticket.id.as_str()
            ],
        )
        .await?;
    Ok(ahead + 1)
}

/// Assignments per minute over `window`.
fn rate_per_minute(assigned: i64, window: std::time::Duration) -> f64 {
    let minutes = (window.as_secs_f64() / 60.0).max(1.0 / 60.0);
    assigned as f64 / minutes
}

async fn service_rate(
    tx: &mut Tx,
    tenant: &TenantId,
    queue_id: &str,
    window: std::time::Duration,
    now: DateTime<Utc>,
) -> RoutingResult<f64> {
    let since = micros(now) - i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
    let assigned = tx
        .fetch_i64(
            "SELECT COUNT(*) FROM routing_assignments WHERE tenant = $1 AND queue_id = $2 \
             AND assigned_at >= $3",
            args![tenant.as_str(), queue_id, since],
        )
        .await?;
    Ok(rate_per_minute(assigned, window))
}

/// Counts online agents meeting the queue's (or ticket's) skills: (online, with spare capacity).
fn agents_for(agents: &[Agent], skills: &[SkillRequirement], language: i32) -> (i64, i64) {
    let declined: Vec<String> = Vec::new();
    let need = Need {
        skills,
        language,
        declined: &declined,
        ..Need::default()
    };
    let mut online = 0;
    let mut available = 0;
    for candidate in candidates(agents) {
        let spare = candidate.load < candidate.capacity;
        let unloaded = Candidate {
            load: 0,
            ..candidate
        };
        if is_eligible(&unloaded, &need) {
            online += 1;
            if spare {
                available += 1;
            }
        }
    }
    (online, available)
}

fn merge_skills(queue: &[SkillRequirement], ticket: &[SkillRequirement]) -> Vec<SkillRequirement> {
    let mut merged: Vec<SkillRequirement> = queue.to_vec();
    for req in ticket {
        match merged.iter_mut().find(|r| r.name == req.name) {
            Some(existing) => existing.min_level = existing.min_level.max(req.min_level),
            None => merged.push(req.clone()),
        }
    }
    merged
}

/// The skills a ticket needs after it moves from a queue requiring `from` to one requiring `to`
/// (none for a transfer to a named agent): the requirements of the queue it leaves are taken
/// off, those the handoff asked for stay, and the new queue's are added.
fn moved_skills(
    ticket: &[SkillRequirement],
    from: &[SkillRequirement],
    to: &[SkillRequirement],
) -> Vec<SkillRequirement> {
    let own: Vec<SkillRequirement> = ticket
        .iter()
        .filter(|s| !from.iter().any(|q| q.name == s.name))
        .cloned()
        .collect();
    merge_skills(to, &own)
}

/// ETA settings the store needs.
#[derive(Clone, Copy, Debug)]
pub struct EtaSettings {
    /// Sliding window of the service rate.
    pub window: std::time::Duration,
    /// Seconds per position without history.
    pub default_seconds_per_position: u64,
}

/// How waiting tickets' position changes are published ([`Store::report_positions`]).
#[derive(Clone, Copy, Debug)]
pub struct PositionUpdates {
    /// Minimum time between two updates of one ticket.
    pub interval: std::time::Duration,
    /// ETA change published even when the position stayed the same.
    pub eta_delta: std::time::Duration,
    /// Waiting tickets per queue, nearest to service first, checked per round.
    pub scan_limit: usize,
}

/// Records the position and ETA just published for a waiting ticket.
async fn record_reported(
    tx: &mut Tx,
    tenant: &TenantId,
    ticket_id: &str,
    position: i64,
    eta_seconds: i32,
    now: DateTime<Utc>,
) -> RoutingResult<()> {
    tx.execute(
        "UPDATE routing_tickets SET reported_position = $3, reported_eta = $4, \
         position_reported_at = $5 WHERE tenant = $1 AND id = $2",
        args![
            tenant.as_str(),
            ticket_id,
            position,
            eta_seconds,
            micros(now)
        ],
    )
    .await?;
    Ok(())
}

/// On PostgreSQL, serialises the transactions that start or end a conversation's handoffs in
/// routing (an enqueue, a cancellation, a closing), so each sees what the others committed: a
/// cancellation and its handoff handled at the same moment on two replicas cannot both miss
/// each other. It is the first lock these transactions take. SQLite's single writer already
/// serialises them. An empty conversation id (unknown) takes no lock.
async fn hold_conversation(
    tx: &mut Tx,
    tenant: &TenantId,
    conversation_id: &str,
) -> RoutingResult<()> {
    if tx.is_postgres() && !conversation_id.is_empty() {
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            args![conversation_lock(tenant, conversation_id)],
        )
        .await?;
    }
    Ok(())
}

/// The key of a conversation's advisory lock ([`hold_conversation`]).
fn conversation_lock(tenant: &TenantId, conversation_id: &str) -> String {
    format!("routing/conversation/{tenant}/{conversation_id}")
}

/// The refusal of a handoff whose ticket was not inserted: it was cancelled, or its
/// conversation closed, before it was handled.
async fn ended_before_queued(
    tx: &mut Tx,
    tenant: &TenantId,
    new: &NewTicket,
) -> RoutingResult<RoutingError> {
    let ended: Vec<(String,)> = tx
        .fetch_all(
            "SELECT kind FROM routing_ended WHERE tenant = $1 AND ((kind = 'handoff' \
             AND id = $2) OR (kind = 'conversation' AND id = $3)) ORDER BY kind",
            args![
                tenant.as_str(),
                new.handoff_id.as_str(),
                new.conversation_id.as_str()
            ],
        )
        .await?;
    Ok(RoutingError::AlreadyExists(
        if ended.first().is_some_and(|(kind,)| kind == "handoff") {
            format!(
                "handoff {} was cancelled before it was queued",
                new.handoff_id
            )
        } else {
            format!(
                "conversation {} was closed before handoff {} was queued",
                new.conversation_id, new.handoff_id
            )
        },
    ))
}

/// Whether handoff `new` follows ticket `other` of the same conversation: a later last message
/// (transcript sequence), or the same one requested later. Tickets stored before the sequence
/// was kept count as sequence 0.
async fn is_newer(
    tx: &mut Tx,
    tenant: &TenantId,
    new: &NewTicket,
    other: &str,
) -> RoutingResult<bool> {
    let rows: Vec<(i64, i64)> = tx
        .fetch_all(
            "SELECT transcript_sequence, requested_at FROM routing_tickets \
             WHERE tenant = $1 AND id = $2",
            args![tenant.as_str(), other],
        )
        .await?;
    Ok(rows.first().is_none_or(|&(sequence, requested_at)| {
        (new.transcript_sequence, micros(new.requested_at)) > (sequence, requested_at)
    }))
}

/// A waiting ticket as the position rounds read it.
#[derive(sqlx::FromRow)]
struct WaitingRow {
    id: String,
    conversation_id: String,
    static_priority: f64,
    enqueued_at: i64,
    skills: String,
    language: i64,
    reported_position: Option<i64>,
    reported_eta: Option<i64>,
    position_reported_at: Option<i64>,
}

impl Store {
    /// Enqueues a handoff, idempotently by handoff id: a known id returns its ticket and writes
    /// nothing. With `dedup` (consumer, event id) the inbox claim is part of the transaction;
    /// `None` is returned for an event handled before. Outside business hours or over the
    /// queue's maximum length the ticket is created RETURNED.
    pub async fn enqueue(
        &self,
        tenant: &TenantId,
        new: &NewTicket,
        dedup: Option<(&str, &str)>,
        eta: EtaSettings,
        now: DateTime<Utc>,
    ) -> RoutingResult<Option<EnqueueOutcome>> {
        self.enqueue_with(tenant, new, dedup, eta, now, false).await
    }

    /// [`Store::enqueue`], and when nobody waits ahead of the new ticket and an eligible agent
    /// has room, its offer too, in the same transaction: the handoff reaches a desk without a
    /// second transaction or a drain. Otherwise the ticket waits for the queue's drain, as
    /// with [`Store::enqueue`].
    pub async fn enqueue_and_offer(
        &self,
        tenant: &TenantId,
        new: &NewTicket,
        dedup: Option<(&str, &str)>,
        eta: EtaSettings,
        now: DateTime<Utc>,
    ) -> RoutingResult<Option<EnqueueOutcome>> {
        self.enqueue_with(tenant, new, dedup, eta, now, true).await
    }

    async fn enqueue_with(
        &self,
        tenant: &TenantId,
        new: &NewTicket,
        dedup: Option<(&str, &str)>,
        eta: EtaSettings,
        now: DateTime<Utc>,
        offer_now: bool,
    ) -> RoutingResult<Option<EnqueueOutcome>> {
        let mut tx = Tx::write(self.db()).await?;
        if let Some((consumer, event_id)) = dedup
            && !tx.claim(consumer, event_id).await?
        {
            return Ok(None);
        }
        // The ticket of this handoff, if known, and any live ticket of its conversation. On
        // PostgreSQL the same statement first takes the conversation's lock (see
        // `hold_conversation`), in a one-time filter evaluated before any row is read; the rows
        // come from the snapshot taken before a wait for it, which is enough: a live ticket is
        // locked and read again before it is changed, and the insert below, a later statement,
        // sees a cancellation or closing committed meanwhile.
        let rows: Vec<TicketRow> = tx
            .fetch_all(
                Sql::Each {
                    pg: concat!(
                        "WITH held AS MATERIALIZED \
                         (SELECT pg_advisory_xact_lock(hashtextextended($4, 0))) ",
                        ticket_select!(
                            "(SELECT COUNT(*) FROM held) = 1 AND tenant = $1 AND (id = $2 \
                             OR (conversation_id = $3 \
                             AND state IN ('queued', 'offered', 'assigned')))"
                        )
                    ),
                    sqlite: ticket_select!(
                        "$4 IS NOT NULL AND tenant = $1 AND (id = $2 OR (conversation_id = $3 \
                         AND state IN ('queued', 'offered', 'assigned')))"
                    ),
                },
                args![
                    tenant.as_str(),
                    new.handoff_id.as_str(),
                    new.conversation_id.as_str(),
                    conversation_lock(tenant, &new.conversation_id)
                ],
            )
            .await?;
        if let Some(at) = rows.iter().position(|row| row.id == new.handoff_id) {
            let ticket = rows
                .into_iter()
                .nth(at)
                .map(TicketRow::into_record)
                .transpose()?
                .ok_or_else(|| RoutingError::Corrupt("ticket row vanished".into()))?;
            tx.commit().await?;
            return Ok(Some(EnqueueOutcome {
                ticket,
                created: false,
                offered: Vec::new(),
                superseded: None,
            }));
        }
        // Another handoff of the conversation is live. Dialog requests a handoff only while
        // the bot holds the conversation, so a newer one means the live ticket's handoff is
        // over in dialog: a waiting ticket is replaced, and an assignment, whose resolution in
        // dialog has not reached routing yet (another replica may still be handling it), is
        // completed as resolved. A handoff older than the live ticket reaches routing late
        // and is refused.
        let mut superseded = None;
        if let Some(other) = rows.first() {
            let other_id = other.id.clone();
            if !is_newer(&mut tx, tenant, new, &other_id).await? {
                return Err(RoutingError::AlreadyExists(format!(
                    "handoff {} is older than ticket {} ({}) of conversation {}",
                    new.handoff_id, other_id, other.state, new.conversation_id
                )));
            }
            lock_agents_first(
                &mut tx,
                AGENTS_OF_TICKET,
                args![tenant.as_str(), other_id.as_str()],
            )
            .await?;
            if let Some(live) = load_ticket(&mut tx, tenant, &other_id, true).await? {
                match live.state {
                    TicketState::Queued | TicketState::Offered => {
                        let mut out = Vec::new();
                        let ended = end_waiting_ticket(
                            &mut tx,
                            tenant,
                            &live,
                            WaitingEnd::Superseded,
                            now,
                            &mut out,
                        )
                        .await?;
                        tx.enqueue(&out).await?;
                        superseded = Some(ended);
                    }
                    TicketState::Assigned => {
                        let (completed, revoked) =
                            end_assigned(&mut tx, tenant, &live, Disposition::Resolved, now)
                                .await?;
                        superseded = Some(Unassigned {
                            freed_agents: vec![completed.agent_id],
                            ticket: Some(completed.ticket),
                            revoked,
                        });
                    }
                    // Ended since it was read: nothing to replace.
                    _ => {}
                }
            }
        }
        let queue = resolve_queue(
            &mut tx,
            tenant,
            &new.queue_id,
            &new.scenario_id,
            &self.default_queue,
            now,
        )
        .await?;
        let skills = merge_skills(&queue.spec.required_skills, &new.skills);
        let static_part = static_priority(new.priority, new.vip, new.severity, &queue.spec.weights);
        // Position, service rate and (for a bounded queue) depth, read in one statement before
        // the ticket exists; the position counts the tickets served before it.
        let entry = if queue.spec.is_open(now) {
            let ageing = queue.spec.weights.ageing_per_second / 1e6;
            let own_key = static_part - ageing * micros(now) as f64;
            let since = micros(now) - i64::try_from(eta.window.as_micros()).unwrap_or(i64::MAX);
            let depth = if queue.spec.max_length > 0 {
                "(SELECT COUNT(*) FROM routing_tickets WHERE tenant = $1 AND queue_id = $2 \
                 AND state IN ('queued', 'offered'))"
            } else {
                "CAST(0 AS BIGINT)"
            };
            let sql = format!(
                "SELECT ({AHEAD}), (SELECT COUNT(*) FROM routing_assignments WHERE tenant = $1 \
                 AND queue_id = $2 AND assigned_at >= $7), {depth}"
            );
            let counts: Vec<(i64, i64, i64)> = tx
                .fetch_all_text(
                    &sql,
                    args![
                        tenant.as_str(),
                        queue.spec.id.as_str(),
                        ageing,
                        own_key,
                        micros(now),
                        new.handoff_id.as_str(),
                        since
                    ],
                )
                .await?;
            let (ahead, served, depth) = counts.first().copied().unwrap_or_default();
            if queue.spec.max_length > 0 && depth >= i64::from(queue.spec.max_length) {
                Entry::Returned(ReturnReason::QueueFull)
            } else {
                let position = ahead + 1;
                let agents = online_agents(&mut tx, tenant).await?;
                let (_, available) = agents_for(&agents, &skills, new.language);
                let rate = rate_per_minute(served, eta.window);
                Entry::Waiting {
                    position,
                    eta_seconds: eta_seconds(
                        position,
                        rate,
                        available,
                        eta.default_seconds_per_position,
                    ),
                    available,
                    agents,
                }
            }
        } else {
            Entry::Returned(ReturnReason::OutOfHours)
        };
        // The first position travels in HandoffQueued; later changes are compared with it.
        let reported = match &entry {
            Entry::Waiting {
                position,
                eta_seconds,
                ..
            } => Some((*position, *eta_seconds)),
            Entry::Returned(_) => None,
        };
        let state = match entry {
            Entry::Returned(_) => TicketState::Returned,
            Entry::Waiting { .. } => TicketState::Queued,
        };
        let row = TicketRow {
            id: new.handoff_id.clone(),
            conversation_id: new.conversation_id.clone(),
            scenario_id: new.scenario_id.clone(),
            queue_id: queue.spec.id.clone(),
            state: state.as_str().to_owned(),
            priority: i64::from(new.priority.clamp(0, 100)),
            static_priority: static_part,
            skills: skills_json(&skills)?,
            language: i64::from(new.language),
            target_agent_id: None,
            excluded_agent_id: None,
            transfer_from: None,
            transfer_note: None,
            transfer_kind: None,
            offered_agent_id: None,
            assigned_agent_id: None,
            attempts: 0,
            overflow_applied: 0,
            trigger_received_at: new.trigger_received_at.map(micros),
            requested_at: micros(new.requested_at),
            enqueued_at: micros(now),
            queue_entered_at: micros(now),
            assigned_at: None,
            ended_at: (state == TicketState::Returned).then_some(micros(now)),
            disposition: None,
            package: new.package.clone(),
        };
        // Not when the handoff was cancelled, or its conversation closed, before it got here:
        // the customer has left. Checked by the insert itself, a statement after the lock.
        let inserted = tx
            .execute(
                "INSERT INTO routing_tickets (tenant, id, conversation_id, scenario_id, queue_id, \
             state, priority, static_priority, vip, severity, skills, language, \
             trigger_received_at, requested_at, enqueued_at, queue_entered_at, ended_at, \
             package, updated_at, reported_position, reported_eta, position_reported_at, \
             transcript_sequence) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $15, \
             $16, $17, $15, $18, $19, $20, $21 WHERE NOT EXISTS (SELECT 1 FROM routing_ended \
             WHERE tenant = $1 AND ((kind = 'handoff' AND id = $2) \
             OR (kind = 'conversation' AND id = $3)))",
                args![
                    tenant.as_str(),
                    row.id.as_str(),
                    row.conversation_id.as_str(),
                    row.scenario_id.as_str(),
                    row.queue_id.as_str(),
                    row.state.as_str(),
                    row.priority,
                    row.static_priority,
                    new.vip,
                    new.severity,
                    row.skills.as_str(),
                    row.language,
                    row.trigger_received_at,
                    row.requested_at,
                    row.enqueued_at,
                    row.ended_at,
                    row.package.clone(),
                    reported.map(|(position, _)| position),
                    reported.map(|(_, eta_s)| i64::from(eta_s)),
                    reported.map(|_| micros(now)),
                    new.transcript_sequence
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(ended_before_queued(&mut tx, tenant, new).await?);
        }
        let ticket = row.into_record()?;
        let mut offered = Vec::new();
        match entry {
            Entry::Returned(reason) => {
                let leave_message = queue.spec.out_of_hours == OutOfHours::LeaveMessage;
                let event = events::returned(tenant, &ticket, reason, leave_message, now);
                tx.enqueue(&[event]).await?;
            }
            Entry::Waiting {
                position,
                eta_seconds,
                available,
                agents,
            } => {
                let event = events::queued(
                    tenant,
                    &ticket,
                    i32::try_from(position).unwrap_or(i32::MAX),
                    eta_seconds,
                );
                tx.enqueue(&[event]).await?;
                if offer_now && position == 1 && available > 0 {
                    (offered, _) = offer_tickets(
                        &mut tx,
                        tenant,
                        &queue,
                        std::slice::from_ref(&ticket),
                        &agents,
                        now,
                    )
                    .await?;
                }
            }
        }
        tx.commit().await?;
        self.wake_outbox();
        Ok(Some(EnqueueOutcome {
            ticket,
            created: true,
            offered,
            superseded,
        }))
    }

    /// Ids of a queue's queued tickets in service order (no locks; the offer re-checks).
    pub async fn queued_ids(
        &self,
        tenant: &TenantId,
        queue: &QueueRecord,
        limit: usize,
    ) -> RoutingResult<Vec<String>> {
        let _ = ORDER_KEY;
        let mut tx = Tx::read(self.db()).await?;
        let rows: Vec<(String,)> = tx
            .fetch_all(
                "SELECT id FROM routing_tickets WHERE tenant = $1 AND queue_id = $2 \
                 AND state = 'queued' \
                 ORDER BY (static_priority - $3 * CAST(enqueued_at AS DOUBLE PRECISION)) DESC, \
                 enqueued_at, id LIMIT $4",
                args![
                    tenant.as_str(),
                    queue.spec.id.as_str(),
                    queue.spec.weights.ageing_per_second / 1e6,
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// The (tenant, queue) pairs with queued tickets.
    pub async fn waiting_queues(&self) -> RoutingResult<Vec<(TenantId, String)>> {
        let mut tx = Tx::read(self.db()).await?;
        let rows: Vec<(String, String)> = tx
            .fetch_all(
                "SELECT DISTINCT tenant, queue_id FROM routing_tickets WHERE state = 'queued'",
                args![],
            )
            .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .filter_map(|(t, q)| TenantId::new(t).ok().map(|t| (t, q)))
            .collect())
    }

    /// Offers one queued ticket to the best eligible agent, reserving a unit of its capacity.
    /// The ticket is claimed with `FOR UPDATE SKIP LOCKED`; each capacity reservation is a
    /// conditional update whose row count decides.
    pub async fn offer_ticket(
        &self,
        tenant: &TenantId,
        ticket_id: &str,
        now: DateTime<Utc>,
    ) -> RoutingResult<OfferOutcome> {
        let mut tx = Tx::write(self.db()).await?;
        let row: Option<TicketRow> = tx
            .fetch_optional(
                claiming!(ticket_select!(
                    "tenant = $1 AND id = $2 AND state = 'queued'"
                )),
                args![tenant.as_str(), ticket_id],
            )
            .await?;
        let Some(ticket) = row.map(TicketRow::into_record).transpose()? else {
            return Ok(OfferOutcome::Gone);
        };
        let Some(queue) = load_queue(&mut tx, tenant, &ticket.queue_id).await? else {
            return Ok(OfferOutcome::NoAgent);
        };
        let agents = online_agents(&mut tx, tenant).await?;
        let declined: Vec<(String,)> = tx
            .fetch_all(
                "SELECT DISTINCT agent_id FROM routing_offers WHERE tenant = $1 AND ticket_id = $2 \
                 AND state IN ('declined', 'expired')",
                args![tenant.as_str(), ticket.id.as_str()],
            )
            .await?;
        let declined: Vec<String> = declined.into_iter().map(|(id,)| id).collect();
        let all = candidates(&agents);
        let need = Need {
            skills: &ticket.skills,
            language: ticket.language,
            declined: &declined,
            only_agent: ticket.target_agent_id.as_deref(),
            excluded: ticket.excluded_agent_id.as_deref(),
        };
        let mut chosen = None;
        for candidate in rank(&all, &need, queue.spec.strategy) {
            if reserve(&mut tx, tenant, &candidate.id, now).await? {
                chosen = Some(candidate.id.clone());
                break;
            }
        }
        let Some(agent_id) = chosen else {
            return Ok(OfferOutcome::NoAgent);
        };
        let offer = insert_offer(
            &mut tx,
            tenant,
            &ticket,
            &agent_id,
            &queue.spec.id,
            false,
            queue.spec.offer_timeout,
            now,
        )
        .await?;
        tx.execute(
            "UPDATE routing_tickets SET state = 'offered', offered_agent_id = $3, \
             attempts = attempts + 1, offered_at = $4, updated_at = $4 \
             WHERE tenant = $1 AND id = $2 AND state = 'queued'",
            args![
                tenant.as_str(),
                ticket.id.as_str(),
                agent_id.as_str(),
                micros(now)
            ],
        )
        .await?;
        let ticket = must_ticket(&mut tx, tenant, &ticket.id).await?;
        tx.enqueue(&[events::offered(tenant, &ticket, &offer)])
            .await?;
        tx.commit().await?;
        self.wake_outbox();
        Ok(OfferOutcome::Offered(Box::new((ticket, offer))))
    }

    /// Offers up to `limit` of a queue's waiting tickets in one transaction, best first.
    ///
    /// The tickets are claimed with `SELECT … ORDER BY priority … LIMIT n FOR UPDATE SKIP
    /// LOCKED` (replicas and workers each get their own), matched against the online agents in
    /// memory (the load each planned offer adds is counted, so one batch spreads over agents;
    /// equally good agents are ordered by a random salt per batch, so concurrent batches spread
    /// too), and written with a handful of statements whatever the batch size: the chosen agents
    /// are locked with `SKIP LOCKED` (the batch never waits; tickets planned for an agent held
    /// elsewhere are planned again over the others), their units reserved by one
    /// conditional `UPDATE … WHERE active_load + n <= capacity RETURNING id`, the offers
    /// inserted in one multi-row `INSERT`, the tickets moved to OFFERED by one conditional
    /// `UPDATE`, and every `HandoffOffered` written to the outbox at once. An agent whose
    /// reservation fails (its load changed meanwhile) gets nothing: its tickets stay queued for
    /// the next pass and are counted in [`OfferBatch::contended`].
    pub async fn offer_queued(
        &self,
        tenant: &TenantId,
        queue_id: &str,
        limit: usize,
        now: DateTime<Utc>,
    ) -> RoutingResult<OfferBatch> {
        let mut tx = Tx::write(self.db()).await?;
        let Some(queue) = load_queue(&mut tx, tenant, queue_id).await? else {
            return Ok(OfferBatch::default());
        };
        let rows: Vec<TicketRow> = tx
            .fetch_all(
                claiming!(ticket_select!(
                    "tenant = $1 AND queue_id = $2 AND state = 'queued' \
                     ORDER BY (static_priority - $3 * CAST(enqueued_at AS DOUBLE PRECISION)) DESC, \
                     enqueued_at, id LIMIT $4"
                )),
                args![
                    tenant.as_str(),
                    queue_id,
                    queue.spec.weights.ageing_per_second / 1e6,
                    i64::try_from(limit.clamp(1, MAX_OFFER_BATCH)).unwrap_or(1)
                ],
            )
            .await?;
        let tickets = rows
            .into_iter()
            .map(TicketRow::into_record)
            .collect::<RoutingResult<Vec<_>>>()?;
        let claimed = tickets.len();
        if tickets.is_empty() {
            return Ok(OfferBatch::default());
        }
        let agents = online_agents(&mut tx, tenant).await?;
        let (offered, contended) =
            offer_tickets(&mut tx, tenant, &queue, &tickets, &agents, now).await?;
        if offered.is_empty() {
            return Ok(OfferBatch {
                claimed,
                offered,
                contended,
            });
        }
        tx.commit().await?;
        self.wake_outbox();
        Ok(OfferBatch {
            offered,
            claimed,
            contended,
        })
    }

    /// Accepts an offer for `agent_id`: the ticket becomes ASSIGNED to it (for a warm transfer,
    /// the previous agent's assignment ends as TRANSFERRED).
    pub async fn accept(
        &self,
        tenant: &TenantId,
        agent_id: &str,
        offer_id: &str,
        now: DateTime<Utc>,
    ) -> RoutingResult<Accepted> {
        let mut tx = Tx::write(self.db()).await?;
        // The accepting agent and, for a warm transfer, the agent handing over, in id order.
        lock_agents_first(
            &mut tx,
            "SELECT CAST($2 AS TEXT) UNION SELECT t.assigned_agent_id FROM routing_offers o \
             JOIN routing_tickets t ON t.tenant = o.tenant AND t.id = o.ticket_id \
             WHERE o.tenant = $1 AND o.id = $3 AND o.kind = 'transfer' AND o.state = 'pending'",
            args![tenant.as_str(), agent_id, offer_id],
        )
        .await?;
        let offer = load_offer(&mut tx, tenant, offer_id, true)
            .await?
            .ok_or_else(|| RoutingError::NotFound(format!("offer {offer_id} not found")))?;
        if offer.agent_id != agent_id {
            return Err(RoutingError::NotYours(format!(
                "offer {offer_id} was made to another agent"
            )));
        }
        match offer.state {
            OfferState::Pending => {}
            OfferState::Expired => return Err(RoutingError::OfferExpired(offer_id.to_owned())),
            _ => return Err(RoutingError::OfferTaken(offer_id.to_owned())),
        }
        if offer.expires_at <= now {
            // Expire it here so the ticket moves on at once, then report the expiry.
            let mut out = Vec::new();
            if release_offer(&mut tx, tenant, &offer, "expired", None, now).await? {
                let ticket = must_ticket(&mut tx, tenant, &offer.ticket_id).await?;
                out.push(events::timed_out(
                    tenant,
                    &ticket,
                    &offer,
                    pb::OfferLapse::Expired,
                    now,
                ));
            }
            tx.enqueue(&out).await?;
            tx.commit().await?;
            self.wake_outbox();
            return Err(RoutingError::OfferExpired(offer_id.to_owned()));
        }
        let accepted = tx
            .execute(
                "UPDATE routing_offers SET state = 'accepted', resolved_at = $3 \
                 WHERE tenant = $1 AND id = $2 AND state = 'pending'",
                args![tenant.as_str(), offer_id, micros(now)],
            )
            .await?;
        if accepted != 1 {
            return Err(RoutingError::OfferTaken(offer_id.to_owned()));
        }
        let ticket = load_ticket(&mut tx, tenant, &offer.ticket_id, true)
            .await?
            .ok_or_else(|| RoutingError::Corrupt(format!("ticket {} vanished", offer.ticket_id)))?;
        let mut out = Vec::new();
        let mut previous_agent = None;
        if offer.transfer {
            if let Some((from, team, assigned_at)) =
                end_assignment(&mut tx, tenant, &ticket.id, Disposition::Transferred, now).await?
            {
                out.push(events::completed(
                    tenant,
                    &ticket,
                    &from,
                    &team,
                    Disposition::Transferred,
                    assigned_at,
                    now,
                ));
                previous_agent = Some(from);
            }
            // A warm transfer to another queue moves the ticket there: its skills follow, so a
            // later cold transfer or requeue does not keep the first queue's requirements.
            if offer.queue_id != ticket.queue_id {
                let from_skills = load_queue(&mut tx, tenant, &ticket.queue_id)
                    .await?
                    .map(|q| q.spec.required_skills)
                    .unwrap_or_default();
                let to_skills = load_queue(&mut tx, tenant, &offer.queue_id)
                    .await?
                    .map(|q| q.spec.required_skills)
                    .unwrap_or_default();
                let skills = moved_skills(&ticket.skills, &from_skills, &to_skills);
                tx.execute(
                    "UPDATE routing_tickets SET skills = $3 WHERE tenant = $1 AND id = $2",
                    args![tenant.as_str(), ticket.id.as_str(), skills_json(&skills)?],
                )
                .await?;
            }
        } else if ticket.state != TicketState::Offered {
            return Err(RoutingError::OfferTaken(offer_id.to_owned()));
        }
        tx.execute(
            "INSERT INTO routing_assignments (tenant, id, ticket_id, conversation_id, agent_id, \
             queue_id, offer_id, assigned_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            args![
                tenant.as_str(),
                uuid(),
                ticket.id.as_str(),
                ticket.conversation_id.as_str(),
                agent_id,
                offer.queue_id.as_str(),
                offer.id.as_str(),
                micros(now)
            ],
        )
        .await?;
        tx.execute(
            "UPDATE routing_agents SET assigned = assigned + 1, last_assigned_at = $3, \
             missed_offers = 0, updated_at = $3 WHERE tenant = $1 AND id = $2",
            args![tenant.as_str(), agent_id, micros(now)],
        )
        .await?;
        tx.execute(
            "UPDATE routing_tickets SET state = 'assigned', assigned_agent_id = $3, \
             offered_agent_id = NULL, queue_id = $4, assigned_at = $5, target_agent_id = NULL, \
             excluded_agent_id = NULL, updated_at = $5 WHERE tenant = $1 AND id = $2",
            args![
                tenant.as_str(),
                ticket.id.as_str(),
                agent_id,
                offer.queue_id.as_str(),
                micros(now)
            ],
        )
        .await?;
        let team = load_agent(&mut tx, tenant, agent_id, false)
            .await?
            .map(|a| a.profile.team)
            .unwrap_or_default();
        let ticket = must_ticket(&mut tx, tenant, &ticket.id).await?;
        let offer = OfferRecord {
            state: OfferState::Accepted,
            ..offer
        };
        out.push(events::assigned(tenant, &ticket, &offer, &team, now));
        let ageing_per_second = load_queue(&mut tx, tenant, &offer.queue_id)
            .await?
            .map_or(0.0, |q| q.spec.weights.ageing_per_second);
        tx.enqueue(&out).await?;
        tx.commit().await?;
        self.wake_outbox();
        Ok(Accepted {
            ticket,
            offer,
            previous_agent,
            ageing_per_second,
        })
    }

    /// Accepts many offers in one transaction (group commit of the accepts waiting in this
    /// process) and answers each request on its own: an offer that expired, was taken, belongs
    /// to another agent or does not exist fails only its own request. The statements are
    /// set-based and their number does not grow with the batch: the accepting agents locked in
    /// id order (with their teams), the routing offers locked, their tickets locked, then one
    /// conditional `UPDATE` of the offers (`WHERE state = 'pending'`), one multi-row `INSERT`
    /// of the assignments, one `UPDATE` of the agents, one of the tickets and one outbox insert.
    /// Offers that pass their deadline are expired one by one in the same transaction, as
    /// [`Store::accept`] does.
    ///
    /// What the batch does not cover goes through [`Store::accept`] after the commit: a warm
    /// transfer's offer (it also moves the previous agent's assignment), an offer id the batch
    /// could not find, and a second request for an offer already in the batch (it then gets
    /// the answer a second accept gets).
    ///
    /// The result has one entry per request, in order. An error of the whole call (the
    /// database failed, a constraint refused the batch) means nothing of the batch committed;
    /// the caller may then answer the requests one by one.
    pub async fn accept_many(
        &self,
        tenant: &TenantId,
        requests: &[AcceptRequest],
        now: DateTime<Utc>,
    ) -> RoutingResult<Vec<RoutingResult<Accepted>>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        // The stored precision, so the returned records equal what a reload would give.
        let now = time(micros(now))?;
        let mut results: Vec<Option<RoutingResult<Accepted>>> =
            requests.iter().map(|_| None).collect();
        // Requests answered after the commit by the single path.
        let mut single: Vec<usize> = Vec::new();
        let mut tx = Tx::write(self.db()).await?;

        // The accepting agents, in id order, locked before any offer or ticket row.
        let mut agent_ids: Vec<&str> = requests.iter().map(|r| r.agent_id.as_str()).collect();
        agent_ids.sort_unstable();
        agent_ids.dedup();
        let mut sql = format!(
            "SELECT id, team FROM routing_agents WHERE tenant = $1 AND id IN ({}) ORDER BY id",
            placeholders(2, agent_ids.len(), 1)
        );
        if tx.is_postgres() {
            sql.push_str(" FOR UPDATE");
        }
        let mut list = args![tenant.as_str()];
        list.extend(agent_ids.iter().map(|id| Arg::from(*id)));
        let teams: HashMap<String, String> = tx
            .fetch_all_text::<(String, String)>(&sql, list)
            .await?
            .into_iter()
            .collect();

        // The routing offers asked for, locked.
        let mut offer_ids: Vec<&str> = requests.iter().map(|r| r.offer_id.as_str()).collect();
        offer_ids.sort_unstable();
        offer_ids.dedup();
        let mut sql = format!(
            "{}tenant = $1 AND kind = 'route' AND id IN ({}) ORDER BY id",
            offer_select!(""),
            placeholders(2, offer_ids.len(), 1)
        );
        if tx.is_postgres() {
            sql.push_str(" FOR UPDATE");
        }
        let mut list = args![tenant.as_str()];
        list.extend(offer_ids.iter().map(|id| Arg::from(*id)));
        let mut offers: HashMap<String, OfferRecord> = HashMap::new();
        for row in tx.fetch_all_text::<OfferRow>(&sql, list).await? {
            let offer = row.into_record()?;
            offers.insert(offer.id.clone(), offer);
        }

        // Per request: its own fate, or a candidate for the set-based accept.
        let mut seen: HashSet<&str> = HashSet::new();
        let mut candidates: Vec<usize> = Vec::new();
        let mut out: Vec<RawEvent> = Vec::new();
        for (i, request) in requests.iter().enumerate() {
            let id = request.offer_id.as_str();
            let Some(offer) = offers.get(id) else {
                single.push(i);
                continue;
            };
            if offer.agent_id != request.agent_id {
                results[i] = Some(Err(RoutingError::NotYours(format!(
                    "offer {id} was made to another agent"
                ))));
                continue;
            }
            if !seen.insert(id) {
                single.push(i);
                continue;
            }
            match offer.state {
                OfferState::Pending => {}
                OfferState::Expired => {
                    results[i] = Some(Err(RoutingError::OfferExpired(id.to_owned())));
                    continue;
                }
                _ => {
                    results[i] = Some(Err(RoutingError::OfferTaken(id.to_owned())));
                    continue;
                }
            }
            if offer.expires_at <= now {
                // Expire it here so the ticket moves on at once, then report the expiry.
                if release_offer(&mut tx, tenant, offer, "expired", None, now).await? {
                    let ticket = must_ticket(&mut tx, tenant, &offer.ticket_id).await?;
                    out.push(events::timed_out(
                        tenant,
                        &ticket,
                        offer,
                        pb::OfferLapse::Expired,
                        now,
                    ));
                }
                results[i] = Some(Err(RoutingError::OfferExpired(id.to_owned())));
                continue;
            }
            candidates.push(i);
        }

        // The candidates' tickets, locked; an offer whose ticket is no longer OFFERED is taken.
        let mut accepted: Vec<(usize, TicketRecord, OfferRecord)> = Vec::new();
        if !candidates.is_empty() {
            let mut ticket_ids: Vec<&str> = candidates
                .iter()
                .filter_map(|&i| offers.get(&requests[i].offer_id))
                .map(|o| o.ticket_id.as_str())
                .collect();
            ticket_ids.sort_unstable();
            ticket_ids.dedup();
            let mut sql = format!(
                "{}tenant = $1 AND id IN ({}) ORDER BY id",
                ticket_select!(""),
                placeholders(2, ticket_ids.len(), 1)
            );
            if tx.is_postgres() {
                sql.push_str(" FOR UPDATE");
            }
            let mut list = args![tenant.as_str()];
            list.extend(ticket_ids.iter().map(|id| Arg::from(*id)));
            let mut tickets: HashMap<String, TicketRecord> = HashMap::new();
            for row in tx.fetch_all_text::<TicketRow>(&sql, list).await? {
                let ticket = row.into_record()?;
                tickets.insert(ticket.id.clone(), ticket);
            }
            for &i in &candidates {
                let Some(offer) = offers.get(&requests[i].offer_id) else {
                    continue;
                };
                match tickets.remove(&offer.ticket_id) {
                    None => {
                        results[i] = Some(Err(RoutingError::Corrupt(format!(
                            "ticket {} vanished",
                            offer.ticket_id
                        ))));
                    }
                    Some(ticket) if ticket.state != TicketState::Offered => {
                        results[i] = Some(Err(RoutingError::OfferTaken(offer.id.clone())));
                    }
                    Some(ticket) => accepted.push((i, ticket, offer.clone())),
                }
            }
        }

        let mut ageing: HashMap<String, f64> = HashMap::new();
        if !accepted.is_empty() {
            let n = accepted.len();
            // The offers: only pending ones change; under the locks all of them are.
            let sql = format!(
                "UPDATE routing_offers SET state = 'accepted', resolved_at = $2 \
                 WHERE tenant = $1 AND state = 'pending' AND id IN ({})",
                placeholders(3, n, 1)
            );
            let mut list = args![tenant.as_str(), micros(now)];
            list.extend(accepted.iter().map(|(_, _, o)| Arg::from(o.id.as_str())));
            let changed = tx.execute_text(&sql, list).await?;
            if changed != n as u64 {
                return Err(RoutingError::Corrupt(format!(
                    "{} of {n} locked offers were no longer pending",
                    n as u64 - changed.min(n as u64)
                )));
            }
            // The assignments.
            let mut sql = String::from(
                "INSERT INTO routing_assignments (tenant, id, ticket_id, conversation_id, \
                 agent_id, queue_id, offer_id, assigned_at) VALUES ",
            );
            let mut list = args![tenant.as_str(), micros(now)];
            sql.push_str(&values_rows(accepted.len(), 3, |p| {
                format!("($1, {}, $2)", p(0..6))
            }));
            for (_, ticket, offer) in &accepted {
                list.extend(args![
                    uuid(),
                    ticket.id.as_str(),
                    ticket.conversation_id.as_str(),
                    offer.agent_id.as_str(),
                    offer.queue_id.as_str(),
                    offer.id.as_str()
                ]);
            }
            tx.execute_text(&sql, list).await?;
            // The agents: one more assignment per accepted offer.
            let mut per_agent: Vec<(&str, i64)> = Vec::new();
            for (_, _, offer) in &accepted {
                match per_agent.iter_mut().find(|(id, _)| *id == offer.agent_id) {
                    Some((_, count)) => *count += 1,
                    None => per_agent.push((offer.agent_id.as_str(), 1)),
                }
            }
            per_agent.sort_unstable();
            let sql = format!(
                "UPDATE routing_agents SET assigned = assigned + {}, last_assigned_at = $2, \
                 missed_offers = 0, updated_at = $2 WHERE tenant = $1 AND id IN ({})",
                case_of(3, per_agent.len()),
                placeholders(3, per_agent.len(), 2)
            );
            let mut list = args![tenant.as_str(), micros(now)];
            for (id, count) in &per_agent {
                list.push((*id).into());
                list.push((*count).into());
            }
            tx.execute_text(&sql, list).await?;
            // The tickets: ASSIGNED to the accepting agent, in the offer's queue.
            let mut agent_case = String::from("CASE id");
            let mut queue_case = String::from("CASE id");
            for k in 0..n {
                let p = 3 + k * 3;
                agent_case.push_str(&format!(" WHEN ${p} THEN ${}", p + 1));
                queue_case.push_str(&format!(" WHEN ${p} THEN ${}", p + 2));
            }
            let sql = format!(
                "UPDATE routing_tickets SET state = 'assigned', assigned_agent_id = {agent_case} \
                 END, offered_agent_id = NULL, queue_id = {queue_case} END, assigned_at = $2, \
                 target_agent_id = NULL, excluded_agent_id = NULL, updated_at = $2 \
                 WHERE tenant = $1 AND id IN ({})",
                placeholders(3, n, 3)
            );
            let mut list = args![tenant.as_str(), micros(now)];
            for (_, ticket, offer) in &accepted {
                list.extend(args![
                    ticket.id.as_str(),
                    offer.agent_id.as_str(),
                    offer.queue_id.as_str()
                ]);
            }
            tx.execute_text(&sql, list).await?;
            for (_, _, offer) in &accepted {
                if !ageing.contains_key(&offer.queue_id) {
                    let weight = load_queue(&mut tx, tenant, &offer.queue_id)
                        .await?
                        .map_or(0.0, |q| q.spec.weights.ageing_per_second);
                    ageing.insert(offer.queue_id.clone(), weight);
                }
            }
        }
        let mut done: Vec<(usize, Accepted)> = Vec::with_capacity(accepted.len());
        for (i, ticket, offer) in accepted {
            let ticket = TicketRecord {
                state: TicketState::Assigned,
                assigned_agent_id: Some(offer.agent_id.clone()),
                offered_agent_id: None,
                queue_id: offer.queue_id.clone(),
                assigned_at: Some(now),
                target_agent_id: None,
                excluded_agent_id: None,
                ..ticket
            };
            let offer = OfferRecord {
                state: OfferState::Accepted,
                ..offer
            };
            let team = teams.get(&offer.agent_id).cloned().unwrap_or_default();
            out.push(events::assigned(tenant, &ticket, &offer, &team, now));
            let ageing_per_second = ageing.get(&offer.queue_id).copied().unwrap_or(0.0);
            done.push((
                i,
                Accepted {
                    ticket,
                    offer,
                    previous_agent: None,
                    ageing_per_second,
                },
            ));
        }
        tx.enqueue(&out).await?;
        tx.commit().await?;
        if !out.is_empty() {
            self.wake_outbox();
        }
        for (i, accepted) in done {
            results[i] = Some(Ok(accepted));
        }
        for i in single {
            let request = &requests[i];
            results[i] = Some(
                self.accept(tenant, &request.agent_id, &request.offer_id, now)
                    .await,
            );
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(RoutingError::Corrupt("accept not answered".into()))))
            .collect())
    }

    /// Declines an offer: the agent's unit is freed and the ticket goes back to the queue (a
    /// warm transfer stays with its agent). The agent is not offered the ticket again while
    /// someone else can take it.
    pub async fn decline(
        &self,
        tenant: &TenantId,
        agent_id: &str,
        offer_id: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> RoutingResult<TicketRecord> {
        let mut tx = Tx::write(self.db()).await?;
        lock_agents_first(
            &mut tx,
            "SELECT CAST($2 AS TEXT)",
            args![tenant.as_str(), agent_id],
        )
        .await?;
        let offer = load_offer(&mut tx, tenant, offer_id, true)
            .await?
            .ok_or_else(|| RoutingError::NotFound(format!("offer {offer_id} not found")))?;
        if offer.agent_id != agent_id {
            return Err(RoutingError::NotYours(format!(
                "offer {offer_id} was made to another agent"
            )));
        }
        if offer.state != OfferState::Pending
            || !release_offer(&mut tx, tenant, &offer, "declined", None, now).await?
        {
            return Err(RoutingError::OfferTaken(offer_id.to_owned()));
        }
        let ticket = must_ticket(&mut tx, tenant, &offer.ticket_id).await?;
        tx.enqueue(&[events::declined(tenant, &ticket, &offer, reason, now)])
            .await?;
        tx.commit().await?;
        self.wake_outbox();
        Ok(ticket)
    }

    /// Expires pending offers whose time is up, at most `limit`; an agent that lets
    /// `missed_before_away` offers in a row expire is set AWAY. Returns the offers expired.
    pub async fn expire_offers(
        &self,
        now: DateTime<Utc>,
        limit: usize,
        missed_before_away: u32,
    ) -> RoutingResult<Vec<(TenantId, OfferRecord)>> {
        let mut tx = Tx::read(self.db()).await?;
        let due: Vec<(String, String, String)> = tx
            .fetch_all(
                "SELECT tenant, id, agent_id FROM routing_offers WHERE state = 'pending' \
                 AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
                args![micros(now), i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await?;
        tx.commit().await?;
        let mut expired = Vec::new();
        for (tenant, id, agent_id) in due {
            let Ok(tenant) = TenantId::new(tenant) else {
                continue;
            };
            let mut tx = Tx::write(self.db()).await?;
            lock_agents_first(
                &mut tx,
                "SELECT CAST($2 AS TEXT)",
                args![tenant.as_str(), agent_id],
            )
            .await?;
            let Some(offer) = load_offer(&mut tx, &tenant, &id, true).await? else {
                continue;
            };
            if offer.state != OfferState::Pending
                || !release_offer(&mut tx, &tenant, &offer, "expired", None, now).await?
            {
                continue;
            }
            let ticket = must_ticket(&mut tx, &tenant, &offer.ticket_id).await?;
            let mut out = vec![events::timed_out(
                &tenant,
                &ticket,
                &offer,
                pb::OfferLapse::Expired,
                now,
            )];
            tx.execute(
                "UPDATE routing_agents SET missed_offers = missed_offers + 1 \
                 WHERE tenant = $1 AND id = $2",
                args![tenant.as_str(), offer.agent_id.as_str()],
            )
            .await?;
            let missed = tx
                .fetch_i64(
                    "SELECT missed_offers FROM routing_agents WHERE tenant = $1 AND id = $2",
                    args![tenant.as_str(), offer.agent_id.as_str()],
                )
                .await?;
            if missed_before_away > 0
                && missed >= i64::from(missed_before_away)
                && let Some(agent) = load_agent(&mut tx, &tenant, &offer.agent_id, true).await?
                && agent.presence == Presence::Online
            {
                change_presence(
                    &mut tx,
                    &tenant,
                    agent,
                    Presence::Away,
                    PresenceReason::MissedOffers,
                    "offers expired without an answer",
                    now,
                    &mut out,
                )
                .await?;
            }
            tx.enqueue(&out).await?;
            tx.commit().await?;
            self.wake_outbox();
            expired.push((tenant, offer));
        }
        Ok(expired)
    }

    /// Ends an assignment (resolved or returned to the bot) and frees the agent's unit. An agent
    /// caller (`actor`) must own it. A pending warm-transfer offer of the ticket is withdrawn
    /// (`HandoffTimedOut`).
    pub async fn complete(
        &self,
        tenant: &TenantId,
        ticket_id: &str,
        actor: Option<&str>,
        disposition: Disposition,
        now: DateTime<Utc>,
    ) -> RoutingResult<(Completed, Vec<OfferRecord>)> {
        let mut tx = Tx::write(self.db()).await?;
        lock_agents_first(&mut tx, AGENTS_OF_TICKET, args![tenant.as_str(), ticket_id]).await?;
        let ticket = load_ticket(&mut tx, tenant, ticket_id, true)
            .await?
            .ok_or_else(|| RoutingError::NotFound(format!("ticket {ticket_id} not found")))?;
        if ticket.state != TicketState::Assigned {
            return Err(RoutingError::FailedPrecondition(format!(
                "ticket {ticket_id} is {}, not assigned",
                ticket.state.as_str()
            )));
        }
        if let Some(actor) = actor
            && ticket.assigned_agent_id.as_deref() != Some(actor)
        {
            return Err(RoutingError::NotYours(format!(
                "ticket {ticket_id} is assigned to another agent"
            )));
        }
        let done = end_assigned(&mut tx, tenant, &ticket, disposition, now).await?;
        tx.commit().await?;
        self.wake_outbox();
        Ok(done)
    }

    /// Dialog resolved a conversation (`ConversationResolved`): the ticket of the handoff it
    /// names, when it belongs to that conversation and an agent still holds it, is completed
    /// exactly as [`Store::complete`] does with disposition RESOLVED (the agent's unit freed,
    /// `AssignmentCompleted`, a pending warm-transfer offer withdrawn). Whoever resolved it,
    /// the conversation no longer needs the agent. With `dedup` (consumer, event id) the inbox
    /// claim is part of the transaction. Returns `None` when nothing changed: the event was
    /// handled before, the ticket is unknown, of another conversation, or not assigned (waiting,
    /// or already completed or ended).
    pub async fn resolve_handoff(
        &self,
        tenant: &TenantId,
        handoff_id: &str,
        conversation_id: &str,
        dedup: Option<(&str, &str)>,
        now: DateTime<Utc>,
    ) -> RoutingResult<Option<(Completed, Vec<OfferRecord>)>> {
        let mut tx = Tx::write(self.db()).await?;
        if let Some((consumer, event_id)) = dedup
            && !tx.claim(consumer, event_id).await?
        {
            return Ok(None);
        }
        lock_agents_first(
            &mut tx,
            AGENTS_OF_TICKET,
            args![tenant.as_str(), handoff_id],
        )
        .await?;
        let ticket = load_ticket(&mut tx, tenant, handoff_id, true).await?;
        let Some(ticket) = ticket
            .filter(|t| t.state == TicketState::Assigned && t.conversation_id == conversation_id)
        else {
            tx.commit().await?;
            return Ok(None);
        };
        let done = end_assigned(&mut tx, tenant, &ticket, Disposition::Resolved, now).await?;
        tx.commit().await?;
        self.wake_outbox();
        Ok(Some(done))
    }

    /// Transfers an assigned conversation. Cold: the assignment ends (TRANSFERRED) and the
    /// ticket is queued for the target (a named agent or a queue). Warm: the current agent keeps
    /// it while the target gets an offer; on accept the assignment moves. Returns the ticket and,
    /// for warm transfers, the offer.
    #[allow(clippy::too_many_arguments, reason = "the request's fields")]
    pub async fn transfer(
        &self,
        tenant: &TenantId,
        ticket_id: &str,
        actor: Option<&str>,
        kind: TransferKind,
        target: &TransferTarget,
        note: &str,
        now: DateTime<Utc>,
    ) -> RoutingResult<(TicketRecord, Option<OfferRecord>, String)> {
        let mut tx = Tx::write(self.db()).await?;
        let named = match target {
            TransferTarget::Agent(agent) => Some(agent.as_str()),
            TransferTarget::Queue(_) => None,
        };
        lock_agents_first(
            &mut tx,
            &format!("{AGENTS_OF_TICKET} UNION SELECT CAST($3 AS TEXT)"),
            args![tenant.as_str(), ticket_id, named],
        )
        .await?;
        let ticket = load_ticket(&mut tx, tenant, ticket_id, true)
            .await?
            .ok_or_else(|| RoutingError::NotFound(format!("ticket {ticket_id} not found")))?;
        if ticket.state != TicketState::Assigned {
            return Err(RoutingError::FailedPrecondition(format!(
                "ticket {ticket_id} is {}, only assigned conversations can be transferred",
                ticket.state.as_str()
            )));
        }
        let from = ticket.assigned_agent_id.clone().unwrap_or_default();
        if let Some(actor) = actor
            && actor != from
        {
            return Err(RoutingError::NotYours(format!(
                "ticket {ticket_id} is assigned to another agent"
            )));
        }
        // The skills a cold transfer leaves on the ticket: the current queue's requirements are
        // taken off (as an overflow move does) and the target queue's added; a named agent was
        // chosen by a person, so no queue's requirement applies to them.
        let current_skills = load_queue(&mut tx, tenant, &ticket.queue_id)
            .await?
            .map(|q| q.spec.required_skills)
            .unwrap_or_default();
        let (queue_id, only_agent, cold_skills) = match target {
            TransferTarget::Agent(agent) => {
                if *agent == from {
                    return Err(RoutingError::InvalidArgument(
                        "target.agent_id is the agent who holds the conversation".into(),
                    ));
                }
                if load_agent(&mut tx, tenant, agent, false).await?.is_none() {
                    return Err(RoutingError::NotFound(format!("agent {agent} not found")));
                }
                let skills = moved_skills(&ticket.skills, &current_skills, &[]);
                (ticket.queue_id.clone(), Some(agent.clone()), skills)
            }
            TransferTarget::Queue(queue) => {
                let Some(target_queue) = hold_queue(&mut tx, tenant, queue).await? else {
                    return Err(RoutingError::NotFound(format!("queue {queue} not found")));
                };
                let skills = moved_skills(
                    &ticket.skills,
                    &current_skills,
                    &target_queue.spec.required_skills,
                );
                (queue.clone(), None, skills)
            }
        };
        if pending_offer_of_ticket(&mut tx, tenant, ticket_id)
            .await?
            .is_some()
        {
            return Err(RoutingError::FailedPrecondition(format!(
                "a transfer of ticket {ticket_id} is already pending"
            )));
        }
        let mut out = Vec::new();
        let mut offer = None;
        match kind {
            TransferKind::Cold => {
                let (agent, team, assigned_at) =
                    end_assignment(&mut tx, tenant, ticket_id, Disposition::Transferred, now)
                        .await?
                        .ok_or_else(|| {
                            RoutingError::Corrupt(format!("ticket {ticket_id} has no assignment"))
                        })?;
                out.push(events::completed(
                    tenant,
                    &ticket,
                    &agent,
                    &team,
                    Disposition::Transferred,
                    assigned_at,
                    now,
                ));
                tx.execute(
                    "UPDATE routing_tickets SET state = 'queued', queue_id = $3, \
                     assigned_agent_id = NULL, assigned_at = NULL, target_agent_id = $4, \
                     excluded_agent_id = $5, transfer_from = $5, transfer_note = $6, \
                     transfer_kind = 'cold', queue_entered_at = $7, overflow_applied = 0, \
                     skills = $8, updated_at = $7 WHERE tenant = $1 AND id = $2",
                    args![
                        tenant.as_str(),
                        ticket_id,
                        queue_id.as_str(),
                        only_agent.clone(),
                        from.as_str(),
                        note,
                        micros(now),
                        skills_json(&cold_skills)?
                    ],
                )
                .await?;
            }
            TransferKind::Warm => {
                let queue = load_queue(&mut tx, tenant, &queue_id)
                    .await?
                    .ok_or_else(|| RoutingError::NotFound(format!("queue {queue_id} not found")))?;
                let agents = online_agents(&mut tx, tenant).await?;
                let all = candidates(&agents);
                let none: Vec<String> = Vec::new();
                let skills = match only_agent {
                    Some(_) => Vec::new(),
                    None => queue.spec.required_skills.clone(),
                };
                let need = Need {
                    skills: &skills,
                    language: ticket.language,
                    declined: &none,
                    only_agent: only_agent.as_deref(),
                    excluded: Some(from.as_str()),
                };
                let mut chosen = None;
                for candidate in rank(&all, &need, queue.spec.strategy) {
                    if reserve(&mut tx, tenant, &candidate.id, now).await? {
                        chosen = Some(candidate.id.clone());
                        break;
                    }
                }
                let Some(agent_id) = chosen else {
                    return Err(RoutingError::FailedPrecondition(match only_agent {
                        Some(agent) => {
                            format!("agent {agent} is not online with spare capacity")
                        }
                        None => format!("no agent of queue {queue_id} can take it now"),
                    }));
                };
                let made = insert_offer(
                    &mut tx,
                    tenant,
                    &ticket,
                    &agent_id,
                    &queue_id,
                    true,
                    queue.spec.offer_timeout,
                    now,
                )
                .await?;
                tx.execute(
                    "UPDATE routing_tickets SET offered_agent_id = $3, attempts = attempts + 1, \
                     transfer_from = $4, transfer_note = $5, transfer_kind = 'warm', \
                     offered_at = $6, updated_at = $6 WHERE tenant = $1 AND id = $2",
                    args![
                        tenant.as_str(),
                        ticket_id,
                        agent_id.as_str(),
                        from.as_str(),
                        note,
                        micros(now)
                    ],
                )
                .await?;
                offer = Some(made);
            }
        }
        let ticket = must_ticket(&mut tx, tenant, ticket_id).await?;
        out.push(events::transferred(
            tenant, &ticket, kind, &from, target, note, now,
        ));
        if let Some(offer) = &offer {
            out.push(events::offered(tenant, &ticket, offer));
        }
        let _ = kind.as_str();
        tx.enqueue(&out).await?;
        tx.commit().await?;
        self.wake_outbox();
        Ok((ticket, offer, from))
    }

    /// The customer left: a waiting ticket of the conversation is ABANDONED (its offer withdrawn);
    /// an assigned one is completed (CLOSED) so the agent's unit is freed.
    pub async fn close_conversation(
        &self,
        tenant: &TenantId,
        conversation_id: &str,
        dedup: Option<(&str, &str)>,
        now: DateTime<Utc>,
    ) -> RoutingResult<Unassigned> {
        self.end_waiting(tenant, conversation_id, None, dedup, now, true)
            .await
    }

    /// The customer cancelled the handoff: a waiting ticket is RETURNED to the bot; an assigned
    /// one stays with its agent, and a pending warm-transfer offer of it is withdrawn
    /// (`HandoffTimedOut`).
    pub async fn cancel_handoff(
        &self,
        tenant: &TenantId,
        conversation_id: &str,
        handoff_id: &str,
        dedup: Option<(&str, &str)>,
        now: DateTime<Utc>,
    ) -> RoutingResult<Unassigned> {
        self.end_waiting(tenant, conversation_id, Some(handoff_id), dedup, now, false)
            .await
    }

    /// Forgets the cancelled handoffs and closed conversations remembered before `before`
    /// (once no event about them can still be delivered). Returns how many.
    pub async fn prune_ended(&self, before: DateTime<Utc>) -> RoutingResult<u64> {
        let mut tx = Tx::write(self.db()).await?;
        let removed = tx
            .execute(
                "DELETE FROM routing_ended WHERE ended_at < $1",
                args![micros(before)],
            )
            .await?;
        tx.commit().await?;
        Ok(removed)
    }

    async fn end_waiting(
        &self,
        tenant: &TenantId,
        conversation_id: &str,
        handoff_id: Option<&str>,
        dedup: Option<(&str, &str)>,
        now: DateTime<Utc>,
        closed: bool,
    ) -> RoutingResult<Unassigned> {
        let mut tx = Tx::write(self.db()).await?;
        if let Some((consumer, event_id)) = dedup
            && !tx.claim(consumer, event_id).await?
        {
            return Ok(Unassigned::default());
        }
        hold_conversation(&mut tx, tenant, conversation_id).await?;
        // Remembered, so that the handoff, or one of the conversation, handled after this on
        // another replica or at a retry is refused (see `enqueue_with`).
        let (kind, ended) = match handoff_id {
            Some(id) => ("handoff", id),
            None => ("conversation", conversation_id),
        };
        tx.execute(
            "INSERT INTO routing_ended (tenant, kind, id, ended_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
            args![tenant.as_str(), kind, ended, micros(now)],
        )
        .await?;
        match handoff_id {
            Some(id) => {
                lock_agents_first(&mut tx, AGENTS_OF_TICKET, args![tenant.as_str(), id]).await?;
            }
            None => {
                lock_agents_first(
                    &mut tx,
                    "SELECT assigned_agent_id FROM routing_tickets WHERE tenant = $1 \
                     AND conversation_id = $2 AND state IN ('queued', 'offered', 'assigned') \
                     UNION SELECT agent_id FROM routing_offers WHERE tenant = $1 \
                     AND conversation_id = $2 AND state = 'pending'",
                    args![tenant.as_str(), conversation_id],
                )
                .await?;
            }
        }
        let row: Option<TicketRow> = match handoff_id {
            Some(id) => {
                tx.fetch_optional(
                    locking!(ticket_select!(
                        "tenant = $1 AND id = $2 AND state IN ('queued', 'offered', 'assigned')"
                    )),
                    args![tenant.as_str(), id],
                )
                .await?
            }
            None => {
                tx.fetch_optional(
                    locking!(ticket_select!(
                        "tenant = $1 AND conversation_id = $2 \
                         AND state IN ('queued', 'offered', 'assigned')"
                    )),
                    args![tenant.as_str(), conversation_id],
                )
                .await?
            }
        };
        let Some(ticket) = row.map(TicketRow::into_record).transpose()? else {
            tx.commit().await?;
            return Ok(Unassigned::default());
        };
        let mut out = Vec::new();
        if ticket.state == TicketState::Assigned {
            let mut result = Unassigned::default();
            // The pending offer of an assigned ticket is a warm transfer's: it is withdrawn
            // with `HandoffTimedOut` (lapse WITHDRAWN), so the target's desk and every
            // subscriber hear of it.
            if let Some(offer) = pending_offer_of_ticket(&mut tx, tenant, &ticket.id).await? {
                let reason = if closed { "customer_left" } else { "cancelled" };
                if release_offer(&mut tx, tenant, &offer, "revoked", Some(reason), now).await? {
                    out.push(events::timed_out(
                        tenant,
                        &ticket,
                        &offer,
                        pb::OfferLapse::Withdrawn,
                        now,
                    ));
                    result.freed_agents.push(offer.agent_id.clone());
                    result.revoked.push(offer);
                }
            }
            if !closed {
                // A cancel after an agent took over leaves the assignment alone.
                tx.enqueue(&out).await?;
                tx.commit().await?;
                if !out.is_empty() {
                    self.wake_outbox();
                }
                return Ok(result);
            }
            let (agent, team, assigned_at) =
                end_assignment(&mut tx, tenant, &ticket.id, Disposition::Closed, now)
                    .await?
                    .ok_or_else(|| {
                        RoutingError::Corrupt(format!("ticket {} has no assignment", ticket.id))
                    })?;
            tx.execute(
                "UPDATE routing_tickets SET state = 'completed', ended_at = $3, \
                 disposition = 'closed', updated_at = $3 WHERE tenant = $1 AND id = $2",
                args![tenant.as_str(), ticket.id.as_str(), micros(now)],
            )
            .await?;
            let done = must_ticket(&mut tx, tenant, &ticket.id).await?;
            out.push(events::completed(
                tenant,
                &done,
                &agent,
                &team,
                Disposition::Closed,
                assigned_at,
                now,
            ));
            result.freed_agents.push(agent);
            result.ticket = Some(done);
            tx.enqueue(&out).await?;
            tx.commit().await?;
            self.wake_outbox();
            return Ok(result);
        }
        let why = if closed {
            WaitingEnd::CustomerLeft
        } else {
            WaitingEnd::Cancelled
        };
        let result = end_waiting_ticket(&mut tx, tenant, &ticket, why, now, &mut out).await?;
        tx.enqueue(&out).await?;
        tx.commit().await?;
        self.wake_outbox();
        Ok(result)
    }

    /// Applies due overflow steps to queued tickets; returns the (tenant, queue) pairs whose
    /// tickets changed (to drain them).
    pub async fn apply_overflow(
        &self,
        now: DateTime<Utc>,
        eta: EtaSettings,
    ) -> RoutingResult<Vec<(TenantId, String)>> {
        let mut tx = Tx::read(self.db()).await?;
        let queues = all_queues(&mut tx).await?;
        tx.commit().await?;
        let mut touched = Vec::new();
        for (tenant, queue) in queues {
            for (index, step) in queue.spec.overflow.iter().enumerate() {
                let due_before =
                    micros(now) - i64::try_from(step.after.as_micros()).unwrap_or(i64::MAX);
                let mut tx = Tx::read(self.db()).await?;
                let due: Vec<(String,)> = tx
                    .fetch_all(
                        "SELECT id FROM routing_tickets WHERE tenant = $1 AND queue_id = $2 \
                         AND state = 'queued' AND overflow_applied <= $3 AND queue_entered_at <= $4 \
                         LIMIT 200",
                        args![
                            tenant.as_str(),
                            queue.spec.id.as_str(),
                            i64::try_from(index).unwrap_or(i64::MAX),
                            due_before
                        ],
                    )
                    .await?;
                tx.commit().await?;
                for (id,) in due {
                    let mut tx = Tx::write(self.db()).await?;
                    let row: Option<TicketRow> = tx
                        .fetch_optional(
                            claiming!(ticket_select!(
                                "tenant = $1 AND id = $2 AND state = 'queued'"
                            )),
                            args![tenant.as_str(), id.as_str()],
                        )
                        .await?;
                    let Some(ticket) = row.map(TicketRow::into_record).transpose()? else {
                        continue;
                    };
                    if ticket.queue_id != queue.spec.id
                        || ticket.overflow_applied > i32::try_from(index).unwrap_or(i32::MAX)
                    {
                        continue;
                    }
                    let applied = i64::try_from(index + 1).unwrap_or(i64::MAX);
                    match &step.action {
                        OverflowAction::WidenSkills(drop) => {
                            let skills: Vec<SkillRequirement> = ticket
                                .skills
                                .iter()
                                .filter(|s| !drop.contains(&s.name))
                                .cloned()
                                .collect();
                            tx.execute(
                                "UPDATE routing_tickets SET skills = $3, overflow_applied = $4, \
                                 updated_at = $5 WHERE tenant = $1 AND id = $2",
                                args![
                                    tenant.as_str(),
                                    id.as_str(),
                                    skills_json(&skills)?,
                                    applied,
                                    micros(now)
                                ],
                            )
                            .await?;
                            tx.commit().await?;
                            touched.push((tenant.clone(), queue.spec.id.clone()));
                        }
                        OverflowAction::MoveToQueue(target) => {
                            let Some(target_queue) = hold_queue(&mut tx, &tenant, target).await?
                            else {
                                tracing::warn!(queue = %queue.spec.id, target = %target, "overflow target queue does not exist");
                                tx.execute(
                                    "UPDATE routing_tickets SET overflow_applied = $3 \
                                     WHERE tenant = $1 AND id = $2",
                                    args![tenant.as_str(), id.as_str(), applied],
                                )
                                .await?;
                                tx.commit().await?;
                                continue;
                            };
                            let skills = moved_skills(
                                &ticket.skills,
                                &queue.spec.required_skills,
                                &target_queue.spec.required_skills,
                            );
                            tx.execute(
                                "UPDATE routing_tickets SET queue_id = $3, skills = $4, \
                                 overflow_applied = 0, queue_entered_at = $5, updated_at = $5 \
                                 WHERE tenant = $1 AND id = $2",
                                args![
                                    tenant.as_str(),
                                    id.as_str(),
                                    target.as_str(),
                                    skills_json(&skills)?,
                                    micros(now)
                                ],
                            )
                            .await?;
                            let moved = must_ticket(&mut tx, &tenant, &id).await?;
                            let position =
                                position_of(&mut tx, &tenant, &moved, &target_queue).await?;
                            let rate =
                                service_rate(&mut tx, &tenant, target, eta.window, now).await?;
                            let eta_s =
                                eta_seconds(position, rate, 0, eta.default_seconds_per_position);
                            record_reported(&mut tx, &tenant, &id, position, eta_s, now).await?;
                            tx.enqueue(&[events::queued(
                                &tenant,
                                &moved,
                                i32::try_from(position).unwrap_or(i32::MAX),
                                eta_s,
                            )])
                            .await?;
                            tx.commit().await?;
                            self.wake_outbox();
                            touched.push((tenant.clone(), target.clone()));
                        }
                    }
                }
            }
        }
        touched.sort_by(|a, b| (a.0.as_str(), &a.1).cmp(&(b.0.as_str(), &b.1)));
        touched.dedup();
        Ok(touched)
    }

    /// Returns one ticket.
    pub async fn ticket(&self, tenant: &TenantId, id: &str) -> RoutingResult<TicketRecord> {
        let mut tx = Tx::reads(self.db()).await?;
        let ticket = load_ticket(&mut tx, tenant, id, false).await?;
        tx.commit().await?;
        ticket.ok_or_else(|| RoutingError::NotFound(format!("ticket {id} not found")))
    }

    /// Returns the live or latest ticket of a conversation.
    pub async fn ticket_of_conversation(
        &self,
        tenant: &TenantId,
        conversation_id: &str,
    ) -> RoutingResult<TicketRecord> {
        let mut tx = Tx::read(self.db()).await?;
        let row: Option<TicketRow> = tx
            .fetch_optional(
                ticket_select!(
                    "tenant = $1 AND conversation_id = $2 ORDER BY \
                     CASE WHEN state IN ('queued', 'offered', 'assigned') THEN 0 ELSE 1 END, \
                     requested_at DESC, enqueued_at DESC LIMIT 1"
                ),
                args![tenant.as_str(), conversation_id],
            )
            .await?;
        tx.commit().await?;
        row.map(TicketRow::into_record).transpose()?.ok_or_else(|| {
            RoutingError::NotFound(format!("conversation {conversation_id} has no ticket"))
        })
    }

    /// Returns one offer.
    pub async fn offer(&self, tenant: &TenantId, id: &str) -> RoutingResult<OfferRecord> {
        let mut tx = Tx::reads(self.db()).await?;
        let offer = load_offer(&mut tx, tenant, id, false).await?;
        tx.commit().await?;
        offer.ok_or_else(|| RoutingError::NotFound(format!("offer {id} not found")))
    }

    /// The pending offers of an agent, oldest first, with their tickets.
    pub async fn pending_offers(
        &self,
        tenant: &TenantId,
        agent_id: &str,
    ) -> RoutingResult<Vec<(OfferRecord, TicketRecord)>> {
        let mut tx = Tx::reads(self.db()).await?;
        let pending = pending_with_tickets(&mut tx, tenant, agent_id, |_| false).await?;
        tx.commit().await?;
        pending
            .into_iter()
            .map(|(offer, ticket)| {
                ticket.map(|t| (offer.clone(), t)).ok_or_else(|| {
                    RoutingError::Corrupt(format!("ticket {} vanished", offer.ticket_id))
                })
            })
            .collect()
    }

    /// What a desk session reads to catch up, in one read: the agent's session and stream
    /// epoch, its offers' version, its pending offers, oldest first, each with its ticket
    /// unless `known(offer id)` says the desk has it already, and its active assignments, each
    /// with its ticket unless `known_assignment(ticket id, offer id)` says the desk has it.
    /// `None` for an unknown agent.
    pub async fn desk_view(
        &self,
        tenant: &TenantId,
        agent_id: &str,
        known: impl Fn(&str) -> bool,
        known_assignment: impl Fn(&str, &str) -> bool,
    ) -> RoutingResult<Option<DeskView>> {
        let mut tx = Tx::reads(self.db()).await?;
        let row: Option<super::agents::VersionRow> = tx
            .fetch_optional(
                super::agents::SESSION_VERSION,
                args![tenant.as_str(), agent_id],
            )
            .await?;
        let Some((session_id, epoch, updated, load, assigned, count, newest)) = row else {
            tx.commit().await?;
            return Ok(None);
        };
        let pending = pending_with_tickets(&mut tx, tenant, agent_id, known).await?;
        let active = assigned_with_tickets(&mut tx, tenant, agent_id, known_assignment).await?;
        tx.commit().await?;
        Ok(Some(DeskView {
            session_id,
            epoch,
            version: (updated, load, assigned, count, newest),
            pending,
            assigned: active,
        }))
    }

    /// A waiting ticket's position, ETA and the agents who could take it.
    pub async fn position(
        &self,
        tenant: &TenantId,
        ticket: TicketRecord,
        eta: EtaSettings,
        now: DateTime<Utc>,
    ) -> RoutingResult<PositionView> {
        let mut tx = Tx::read(self.db()).await?;
        let queue = load_queue(&mut tx, tenant, &ticket.queue_id).await?;
        let agents = online_agents(&mut tx, tenant).await?;
        let (_, available) = agents_for(&agents, &ticket.skills, ticket.language);
        let (position, eta_s, open) = match (&queue, ticket.state) {
            (Some(queue), TicketState::Queued) => {
                let position = position_of(&mut tx, tenant, &ticket, queue).await?;
                let rate = service_rate(&mut tx, tenant, &queue.spec.id, eta.window, now).await?;
                (
                    position,
                    eta_seconds(position, rate, available, eta.default_seconds_per_position),
                    queue.spec.is_open(now),
                )
            }
            (Some(queue), TicketState::Offered) => (1, 0, queue.spec.is_open(now)),
            (Some(queue), _) => (0, 0, queue.spec.is_open(now)),
            (None, _) => (0, 0, false),
        };
        tx.commit().await?;
        Ok(PositionView {
            ticket,
            position: i32::try_from(position).unwrap_or(i32::MAX),
            eta_seconds: eta_s,
            agents_available: i32::try_from(available).unwrap_or(i32::MAX),
            within_business_hours: open,
        })
    }

    /// Live statistics of the given queues (all of the tenant's when empty).
    pub async fn queue_stats(
        &self,
        tenant: &TenantId,
        queue_ids: &[String],
        eta: EtaSettings,
        now: DateTime<Utc>,
    ) -> RoutingResult<Vec<QueueStatsView>> {
        let mut tx = Tx::read(self.db()).await?;
        let mut queues = Vec::new();
        if queue_ids.is_empty() {
            let rows: Vec<(String,)> = tx
                .fetch_all(
                    "SELECT id FROM routing_queues WHERE tenant = $1 ORDER BY id",
                    args![tenant.as_str()],
                )
                .await?;
            for (id,) in rows {
                if let Some(queue) = load_queue(&mut tx, tenant, &id).await? {
                    queues.push(queue);
                }
            }
        } else {
            for id in queue_ids {
                let queue = load_queue(&mut tx, tenant, id)
                    .await?
                    .ok_or_else(|| RoutingError::NotFound(format!("queue {id} not found")))?;
                queues.push(queue);
            }
        }
        let agents = online_agents(&mut tx, tenant).await?;
        let mut out = Vec::with_capacity(queues.len());
        for queue in queues {
            out.push(stats_of(&mut tx, tenant, &queue, &agents, eta, now).await?);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Reports each queue's statistics as an event when they changed since the last report
    /// and that report is at least `interval` old, or when the last report is
    /// [`REPORT_UNCHANGED_EVERY`] old (so consumers can tell fresh figures from stale ones).
    /// The check-and-set on `routing_queue_reports`
    /// lets replicas share the work without reporting twice. Returns how many were reported.
    pub async fn report_queue_stats(
        &self,
        now: DateTime<Utc>,
        interval: std::time::Duration,
        eta: EtaSettings,
    ) -> RoutingResult<usize> {
        let mut tx = Tx::read(self.db()).await?;
        let queues = all_queues(&mut tx).await?;
        tx.commit().await?;
        let cutoff = micros(now) - i64::try_from(interval.as_micros()).unwrap_or(i64::MAX);
        let refresh_cutoff = micros(now)
            - i64::try_from(REPORT_UNCHANGED_EVERY.max(interval).as_micros()).unwrap_or(i64::MAX);
        let mut reported = 0;
        for (tenant, queue) in queues {
            let mut tx = Tx::write(self.db()).await?;
            let agents = online_agents(&mut tx, &tenant).await?;
            let (stats, scenarios) = stats_of(&mut tx, &tenant, &queue, &agents, eta, now).await?;
            let fingerprint = format!(
                "{}/{}/{}/{}/{}",
                stats.depth,
                stats.agents_online,
                stats.agents_available,
                stats.within_business_hours,
                stats
                    .oldest_wait
                    .map(|d| d.seconds / 60)
                    .unwrap_or_default()
            );
            let inserted = tx
                .execute(
                    "INSERT INTO routing_queue_reports (tenant, queue_id, fingerprint, reported_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    args![tenant.as_str(), queue.spec.id.as_str(), fingerprint.as_str(), micros(now)],
                )
                .await?;
            let report = inserted == 1
                || tx
                    .execute(
                        "UPDATE routing_queue_reports SET fingerprint = $3, reported_at = $4 \
                         WHERE tenant = $1 AND queue_id = $2 \
                         AND ((fingerprint <> $3 AND reported_at <= $5) OR reported_at <= $6)",
                        args![
                            tenant.as_str(),
                            queue.spec.id.as_str(),
                            fingerprint.as_str(),
                            micros(now),
                            cutoff,
                            refresh_cutoff
                        ],
                    )
                    .await?
                    == 1;
            if report {
                let default_queue = queue.spec.id == self.default_queue;
                tx.enqueue(&[events::queue_stats(
                    &tenant,
                    &stats,
                    scenarios,
                    default_queue,
                )])
                .await?;
                reported += 1;
            }
            tx.commit().await?;
        }
        if reported > 0 {
            self.wake_outbox();
        }
        Ok(reported)
    }

    /// Publishes `HandoffPositionUpdated` for waiting tickets whose position changed, or whose
    /// ETA moved by more than `updates.eta_delta`, since the last position published for them
    /// (by `HandoffQueued` or an earlier update), at most once per `updates.interval` per
    /// ticket. Each queue's round reads at most `updates.scan_limit` waiting tickets, nearest
    /// to service first. The last published position is stored with the ticket and replaced by
    /// a check-and-set, so replicas running the same round publish a change once. Returns how
    /// many updates were published.
    pub async fn report_positions(
        &self,
        now: DateTime<Utc>,
        updates: PositionUpdates,
        eta: EtaSettings,
    ) -> RoutingResult<usize> {
        let mut published = 0;
        for (tenant, queue_id) in self.waiting_queues().await? {
            published += self
                .report_queue_positions(&tenant, &queue_id, now, updates, eta)
                .await?;
        }
        if published > 0 {
            self.wake_outbox();
        }
        Ok(published)
    }

    async fn report_queue_positions(
        &self,
        tenant: &TenantId,
        queue_id: &str,
        now: DateTime<Utc>,
        updates: PositionUpdates,
        eta: EtaSettings,
    ) -> RoutingResult<usize> {
        // Read without locks (on SQLite without the writer lock): offers keep claiming these
        // tickets meanwhile, and most rounds find nothing to publish.
        let mut tx = Tx::read(self.db()).await?;
        let Some(queue) = load_queue(&mut tx, tenant, queue_id).await? else {
            tx.commit().await?;
            return Ok(0);
        };
        let ageing = queue.spec.weights.ageing_per_second / 1e6;
        let rows: Vec<WaitingRow> = tx
            .fetch_all(
                "SELECT id, conversation_id, static_priority, enqueued_at, skills, language, \
                 reported_position, reported_eta, position_reported_at FROM routing_tickets \
                 WHERE tenant = $1 AND queue_id = $2 AND state = 'queued' \
                 ORDER BY (static_priority - $3 * CAST(enqueued_at AS DOUBLE PRECISION)) DESC, \
                 enqueued_at, id LIMIT $4",
                args![
                    tenant.as_str(),
                    queue_id,
                    ageing,
                    i64::try_from(updates.scan_limit.max(1)).unwrap_or(i64::MAX)
                ],
            )
            .await?;
        let cutoff = micros(now) - i64::try_from(updates.interval.as_micros()).unwrap_or(i64::MAX);
        let due = |row: &WaitingRow| row.position_reported_at.is_none_or(|at| at <= cutoff);
        if !rows.iter().any(due) {
            tx.commit().await?;
            return Ok(0);
        }
        let rate = service_rate(&mut tx, tenant, queue_id, eta.window, now).await?;
        let agents = online_agents(&mut tx, tenant).await?;
        let delta = i64::try_from(updates.eta_delta.as_secs()).unwrap_or(i64::MAX);
        // (row, position, eta) of every ticket to update.
        let mut changes: Vec<(&WaitingRow, i64, i32)> = Vec::new();
        let mut position = 0;
        let mut previous: Option<(f64, i64)> = None;
        for (i, row) in rows.iter().enumerate() {
            // 1 + the tickets strictly ahead in service order (ties share a place), as
            // `GetQueuePosition` counts.
            let key = row.static_priority - ageing * row.enqueued_at as f64;
            if previous != Some((key, row.enqueued_at)) {
                position = i64::try_from(i).unwrap_or(i64::MAX) + 1;
                previous = Some((key, row.enqueued_at));
            }
            if !due(row) {
                continue;
            }
            let skills: Vec<SkillRequirement> = from_json("ticket skills", &row.skills)?;
            let language = i32::try_from(row.language).unwrap_or(0);
            let (_, available) = agents_for(&agents, &skills, language);
            let eta_s = eta_seconds(position, rate, available, eta.default_seconds_per_position);
            let moved = row.reported_position != Some(position);
            let eta_moved = row
                .reported_eta
                .is_none_or(|last| (i64::from(eta_s) - last).abs() > delta);
            if moved || eta_moved {
                changes.push((row, position, eta_s));
            }
        }
        tx.commit().await?;
        if changes.is_empty() {
            return Ok(0);
        }
        // A ticket that moved on since the read is left out by the check-and-set below.
        let mut tx = Tx::write(self.db()).await?;
        if tx.is_postgres() {
            // Take only tickets no one else holds (an offer or an answer is changing them):
            // never wait, never deadlock; the rest are looked at next round.
            let claim = format!(
                "SELECT id FROM routing_tickets WHERE tenant = $1 AND state = 'queued' \
                 AND id IN ({}) FOR UPDATE SKIP LOCKED",
                placeholders(2, changes.len(), 1)
            );
            let mut claim_args = args![tenant.as_str()];
            for (row, _, _) in &changes {
                claim_args.push(row.id.as_str().into());
            }
            let held: Vec<(String,)> = tx.fetch_all_text(&claim, claim_args).await?;
            changes.retain(|(row, _, _)| held.iter().any(|(id,)| *id == row.id));
            if changes.is_empty() {
                tx.commit().await?;
                return Ok(0);
            }
        }
        let mut positions = String::from("CASE id");
        let mut etas = String::from("CASE id");
        for n in 0..changes.len() {
            let p = 4 + n * 3;
            positions.push_str(&format!(" WHEN ${p} THEN ${}", p + 1));
            etas.push_str(&format!(" WHEN ${p} THEN ${}", p + 2));
        }
        positions.push_str(" END");
        etas.push_str(" END");
        let update = format!(
            "UPDATE routing_tickets SET reported_position = {positions}, reported_eta = {etas}, \
             position_reported_at = $2 WHERE tenant = $1 AND state = 'queued' \
             AND (position_reported_at IS NULL OR position_reported_at <= $3) \
             AND id IN ({}) RETURNING id",
            placeholders(4, changes.len(), 3)
        );
        let mut update_args = args![tenant.as_str(), micros(now), cutoff];
        for (row, position, eta_s) in &changes {
            update_args.push(row.id.as_str().into());
            update_args.push((*position).into());
            update_args.push((*eta_s).into());
        }
        let updated: Vec<(String,)> = tx.fetch_all_text(&update, update_args).await?;
        let out: Vec<RawEvent> = changes
            .iter()
            .filter(|(row, _, _)| updated.iter().any(|(id,)| *id == row.id))
            .map(|(row, position, eta_s)| {
                events::position_updated(
                    tenant,
                    &row.id,
                    &row.conversation_id,
                    queue_id,
                    i32::try_from(*position).unwrap_or(i32::MAX),
                    *eta_s,
                    now,
                )
            })
            .collect();
        tx.enqueue(&out).await?;
        tx.commit().await?;
        Ok(out.len())
    }
}

async fn stats_of(
    tx: &mut Tx,
    tenant: &TenantId,
    queue: &QueueRecord,
    agents: &[Agent],
    eta: EtaSettings,
    now: DateTime<Utc>,
) -> RoutingResult<QueueStatsView> {
    let waiting: Vec<(i64, i64)> = tx
        .fetch_all(
            "SELECT COUNT(*), COALESCE(MIN(enqueued_at), 0) FROM routing_tickets \
             WHERE tenant = $1 AND queue_id = $2 AND state IN ('queued', 'offered')",
            args![tenant.as_str(), queue.spec.id.as_str()],
        )
        .await?;
    let (depth, oldest) = waiting.first().copied().unwrap_or((0, 0));
    let rate = service_rate(tx, tenant, &queue.spec.id, eta.window, now).await?;
    let (online, available) = agents_for(agents, &queue.spec.required_skills, 0);
    let oldest_wait = if depth > 0 {
        events::span(time(oldest)?, now)
    } else {
        prost_types::Duration::default()
    };
    let stats = pb::QueueStats {
        queue_id: queue.spec.id.clone(),
        depth: i32::try_from(depth).unwrap_or(i32::MAX),
        oldest_wait: Some(oldest_wait),
        agents_online: i32::try_from(online).unwrap_or(i32::MAX),
        agents_available: i32::try_from(available).unwrap_or(i32::MAX),
        eta_seconds: eta_seconds(depth + 1, rate, available, eta.default_seconds_per_position),
        service_rate_per_minute: rate,
        within_business_hours: queue.spec.is_open(now),
        measured_at: Some(events::ts(now)),
    };
    Ok((stats, queue.spec.scenario_ids.clone()))
}

/// Ends the ticket's active assignment and frees its agent's unit; returns (agent, team,
/// assigned_at), or `None` when there was no active assignment.
async fn end_assignment(
    tx: &mut Tx,
    tenant: &TenantId,
    ticket_id: &str,
    disposition: Disposition,
    now: DateTime<Utc>,
) -> RoutingResult<Option<(String, String, DateTime<Utc>)>> {
    let row: Option<(String, String, i64)> = tx
        .fetch_optional(
            locking!(
                "SELECT id, agent_id, assigned_at FROM routing_assignments \
                 WHERE tenant = $1 AND ticket_id = $2 AND ended_at IS NULL"
            ),
            args![tenant.as_str(), ticket_id],
        )
        .await?;
    let Some((id, agent_id, assigned_at)) = row else {
        return Ok(None);
    };
    let ended = tx
        .execute(
            "UPDATE routing_assignments SET ended_at = $3, disposition = $4 \
             WHERE tenant = $1 AND id = $2 AND ended_at IS NULL",
            args![
                tenant.as_str(),
                id.as_str(),
                micros(now),
                disposition.as_str()
            ],
        )
        .await?;
    if ended != 1 {
        return Ok(None);
    }
    release_unit(tx, tenant, &agent_id, true, now).await?;
    let team = load_agent(tx, tenant, &agent_id, false)
        .await?
        .map(|a| a.profile.team)
        .unwrap_or_default();
    Ok(Some((agent_id, team, time(assigned_at)?)))
}

#[cfg(test)]
mod tests {
    use super::{case_of, placeholders, values_rows};

    #[test]
    fn statement_fragments_number_their_parameters() {
        assert_eq!(placeholders(3, 3, 2), "$3, $5, $7");
        assert_eq!(case_of(3, 2), "CASE id WHEN $3 THEN $4 WHEN $5 THEN $6 END");
        assert_eq!(
            values_rows(2, 4, |p| format!("($1, {}, $2, {})", p(0..4), p(4..6))),
            "($1, $4, $5, $6, $7, $2, $8, $9), ($1, $10, $11, $12, $13, $2, $14, $15)"
        );
        assert_eq!(values_rows(0, 3, |p| p(0..6)), "");
    }
}
