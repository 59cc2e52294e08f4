//! Storage on PostgreSQL and SQLite.
//!
//! The SQL is the same on both engines (times are integer microseconds, upserts use
//! `ON CONFLICT`), so it is written once in [`engine!`], which generates one module per engine;
//! only the driver types, the row lock, the outbox and inbox functions and the binding of id
//! lists (one array on PostgreSQL, one parameter per value on SQLite) differ. [`Store`]
//! dispatches to the engine of the pool.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{QueryBuilder, Row as _};
use tandem_platform::bus::RawEvent;
use tandem_platform::db::Db;

use crate::domain::Micros;
use crate::domain::alert::AlertRule;
use crate::domain::fact::{
    ConversationFact, ConversationState, CustomerConversation, FactInput, HandoffFact,
    SuggestionFact, derive_followed_up,
};
use crate::domain::feedback::{FeedbackInput, FeedbackObs, FeedbackRecord, Score};
use crate::domain::problems::ProblemItem;
use crate::domain::query::{DimValue, FilterValues, HistRow, MetricQuery, RollupRow};
use crate::domain::rollup::{self, Contribution};

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or cannot be reached.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// A stored row cannot be read back.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The writer that batches the work stopped before answering (shutdown or crash); the work
    /// may or may not be stored, and retrying it is safe.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl StoreError {
    /// Returns whether retrying the same work may succeed (connection trouble, deadlock,
    /// serialization failure, a busy SQLite database).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => {
                matches!(
                    db.code().as_deref(),
                    Some("40P01" | "40001" | "5" | "6" | "517")
                )
            }
            StoreError::Database(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed,
            ) => true,
            StoreError::Unavailable(_) => true,
            StoreError::Database(_) | StoreError::Corrupt(_) => false,
        }
    }
}

/// Storage result.
pub type StoreResult<T> = Result<T, StoreError>;

/// Makes the event of a new feedback record from the index of its group (its tenant), the
/// record and the facts of its conversation (as locked in the storing transaction; `None`
/// without a conversation).
pub type MakeEvent<'a> =
    dyn Fn(usize, &FeedbackRecord, Option<&ConversationFact>) -> RawEvent + Sync + 'a;

/// Per group and record: what was stored, with the facts of a new record's conversation.
pub type GroupOutcomes = Vec<Vec<(Stored, Option<ConversationFact>)>>;

/// What storing a piece of feedback did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Stored now.
    New(FeedbackRecord),
    /// A record with the same client id existed already.
    Existing(FeedbackRecord),
}

/// An agent's review of bot output, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredReview {
    /// Id.
    pub id: String,
    /// Reviewing agent.
    pub agent_id: String,
    /// Conversation.
    pub conversation_id: String,
    /// Reviewed bot message, or empty.
    pub message_id: String,
    /// Reviewed suggestion, or empty.
    pub suggestion_id: String,
    /// `Verdict` value.
    pub verdict: i32,
    /// Comment.
    pub comment: String,
    /// Corrected answer.
    pub corrected_answer: String,
    /// Scenario (from the conversation's facts).
    pub scenario_id: String,
    /// When it was made.
    pub created_at: Micros,
}

/// A stored alert.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredAlert {
    /// Id.
    pub id: String,
    /// Rule.
    pub rule_id: String,
    /// `AlertKind` value.
    pub kind: i32,
    /// Scenario.
    pub scenario_id: String,
    /// `MetricName` value.
    pub metric: i32,
    /// Observed value.
    pub observed: f64,
    /// Threshold.
    pub threshold: f64,
    /// Baseline.
    pub baseline: f64,
    /// Window.
    pub window: Micros,
    /// `Severity` value.
    pub severity: i32,
    /// `AlertStatus` value.
    pub status: i32,
    /// Explanation.
    pub explanation: String,
    /// Raised.
    pub raised_at: Micros,
    /// Acknowledged.
    pub acknowledged_at: Option<Micros>,
    /// Acknowledged by.
    pub acknowledged_by: String,
    /// Resolved.
    pub resolved_at: Option<Micros>,
}

/// Filters of an alert listing.
#[derive(Clone, Debug, Default)]
pub struct AlertFilter {
    /// Status, 0 for all.
    pub status: i32,
    /// Scenario, empty for all.
    pub scenario_id: String,
    /// Raised at or after.
    pub from: Option<Micros>,
    /// Raised before.
    pub to: Option<Micros>,
    /// Page: alerts raised before this (raised_at, id), newest first.
    pub before: Option<(Micros, String)>,
    /// Page size.
    pub limit: i64,
}

/// What the window of an alert rule contains, as the store measures it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowValues {
    /// Numerator of a rate.
    pub hits: i64,
    /// Denominator of a rate, or number of durations / responses.
    pub samples: i64,
    /// Durations in microseconds (for duration metrics).
    pub durations: Vec<f64>,
}

/// One event for the projector: its id (the inbox key), tenant and content.
#[derive(Clone, Debug)]
pub struct Projected {
    /// Event id.
    pub event_id: String,
    /// Tenant.
    pub tenant: String,
    /// Content.
    pub input: FactInput,
}

/// Per-conversation state loaded for a projection, before and after.
struct Loaded {
    before: ConversationState,
    after: ConversationState,
    feedback: Vec<FeedbackObs>,
}

/// The customer conversations cap for first-contact resolution.
const CUSTOMER_CONVERSATIONS: i64 = 1000;
/// Rows per multi-row statement.
const CHUNK: usize = 400;

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned + Default>(text: &str) -> StoreResult<T> {
    if text.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Recomputes first-contact resolution for the conversations of the given customers.
/// `group` holds every known conversation of those customers (the touched ones in their new
/// state); returns the ids whose flag changed.
fn refresh_followed_up(group: &mut BTreeMap<String, ConversationFact>) -> Vec<String> {
    let mut by_customer: BTreeMap<String, Vec<CustomerConversation>> = BTreeMap::new();
    for fact in group.values() {
        if let Some(started_at) = fact.bucket_at()
            && !fact.customer_id.value.is_empty()
        {
            by_customer
                .entry(fact.customer_id.value.clone())
                .or_default()
                .push(CustomerConversation {
                    scenario_id: fact.scenario_id.value.clone(),
                    started_at,
                });
        }
    }
    let mut changed = Vec::new();
    for (id, fact) in group.iter_mut() {
        let others = by_customer
            .get(&fact.customer_id.value)
            .map_or(&[][..], Vec::as_slice);
        let followed = derive_followed_up(fact, others);
        if followed != fact.followed_up {
            fact.followed_up = followed;
            changed.push(id.clone());
        }
    }
    changed
}

/// What first-contact resolution depends on: customer, scenario, start and first resolution.
fn fcr_inputs(fact: &ConversationFact) -> (&str, &str, Option<Micros>, Option<Micros>) {
    (
        &fact.customer_id.value,
        &fact.scenario_id.value,
        fact.bucket_at(),
        fact.first_resolution.at,
    )
}

fn outcome(fact: &ConversationFact) -> &'static str {
    if fact.handed_off() {
        "handed_off"
    } else if fact.contained() {
        "contained"
    } else {
        "open"
    }
}

fn record_from_parts(
    id: String,
    input: FeedbackInput,
    kind: &str,
    score: i64,
    language: i64,
    received_at: Micros,
) -> StoreResult<FeedbackRecord> {
    let score = Score::from_parts(kind, i32::try_from(score).unwrap_or(-1))
        .ok_or_else(|| StoreError::Corrupt(format!("feedback {id}: kind {kind:?}")))?;
    Ok(FeedbackRecord {
        id,
        input: FeedbackInput {
            score: Some(score),
            ..input
        },
        score,
        language: i32::try_from(language).unwrap_or_default(),
        received_at,
    })
}

/// Appends ` = ANY($n)` with the values bound as one array: one parameter, no array built from
/// hundreds of parameters on every execution, and an index scan whatever the plan.
fn push_any_pg(builder: &mut QueryBuilder<sqlx::Postgres>, values: &[String]) {
    builder.push(" = ANY(").push_bind(values.to_vec()).push(")");
}

/// Appends ` IN (…)` with one parameter per value (SQLite has no array parameters).
fn push_any_sqlite(builder: &mut QueryBuilder<sqlx::Sqlite>, values: &[String]) {
    builder.push(" IN (");
    let mut list = builder.separated(", ");
    for value in values {
        list.push_bind(value.clone());
    }
    list.push_unseparated(")");
}

macro_rules! engine {
    ($module:ident, $db:ty, $pool:ty, $lock:literal, $share:literal, $begin:literal, $claim:path, $enqueue:path, $any:path) => {
        /// The store on one engine.
        pub mod $module {
            use super::*;

            type Database = $db;
            type Pool = $pool;
            type Conn = <$db as sqlx::Database>::Connection;
            /// Row lock taken on facts changed in a transaction (empty where the engine has
            /// one writer).
            const LOCK: &str = $lock;
            /// Row lock taken on facts read to attribute new feedback: it waits for a projection
            /// of the same conversation but lets feedback writers run side by side.
            const SHARE: &str = $share;

            fn push_list<T>(builder: &mut QueryBuilder<Database>, values: &[T])
            where
                T: for<'t> sqlx::Encode<'t, Database> + sqlx::Type<Database> + Clone,
            {
                builder.push("(");
                let mut list = builder.separated(", ");
                for value in values {
                    list.push_bind(value.clone());
                }
                list.push_unseparated(")");
            }

            // ---------------------------------------------------------------------------------
            // Facts.

            async fn lock_conversations(
                conn: &mut Conn,
                tenant: &str,
                ids: &[String],
                lock: &str,
            ) -> StoreResult<BTreeMap<String, ConversationFact>> {
                let mut out = BTreeMap::new();
                for chunk in ids.chunks(CHUNK) {
                    let mut insert = QueryBuilder::<Database>::new(
                        "INSERT INTO fb_conversation (tenant, conversation_id) ",
                    );
                    insert.push_values(chunk, |mut row, id| {
                        row.push_bind(tenant).push_bind(id);
                    });
                    insert.push(" ON CONFLICT DO NOTHING");
                    insert.build().execute(&mut *conn).await?;
                    let mut select = QueryBuilder::<Database>::new(
                        "SELECT conversation_id, state FROM fb_conversation WHERE tenant = ",
                    );
                    select.push_bind(tenant).push(" AND conversation_id");
                    $any(&mut select, chunk);
                    select.push(" ORDER BY conversation_id");
                    select.push(lock);
                    for row in select.build().fetch_all(&mut *conn).await? {
                        let id: String = row.try_get("conversation_id")?;
                        let state: String = row.try_get("state")?;
                        out.insert(id, from_json(&state)?);
                    }
                }
                Ok(out)
            }

            async fn customer_conversations(
                conn: &mut Conn,
                tenant: &str,
                customers: &[String],
            ) -> StoreResult<BTreeMap<String, ConversationFact>> {
                let mut out = BTreeMap::new();
                for chunk in customers.chunks(CHUNK) {
                    let mut select = QueryBuilder::<Database>::new(
                        "SELECT conversation_id, state FROM fb_conversation WHERE tenant = ",
                    );
                    // Repeats the partial index's predicate, so that a generic plan can use it.
                    select
                        .push_bind(tenant)
                        .push(" AND customer_id <> '' AND customer_id");
                    $any(&mut select, chunk);
                    select
                        .push(" ORDER BY conversation_id LIMIT ")
                        .push_bind(CUSTOMER_CONVERSATIONS * chunk.len() as i64);
                    select.push(LOCK);
                    for row in select.build().fetch_all(&mut *conn).await? {
                        let id: String = row.try_get("conversation_id")?;
                        let state: String = row.try_get("state")?;
                        out.insert(id, from_json(&state)?);
                    }
                }
                Ok(out)
            }

            async fn children(
                conn: &mut Conn,
                tenant: &str,
                ids: &[String],
                states: &mut BTreeMap<String, Loaded>,
            ) -> StoreResult<()> {
                for chunk in ids.chunks(CHUNK) {
                    let mut select = QueryBuilder::<Database>::new(
                        "SELECT conversation_id, handoff_id, state FROM fb_handoff WHERE tenant = ",
                    );
                    select.push_bind(tenant).push(" AND conversation_id");
                    $any(&mut select, chunk);
                    for row in select.build().fetch_all(&mut *conn).await? {
                        let conversation: String = row.try_get("conversation_id")?;
                        let id: String = row.try_get("handoff_id")?;
                        let state: HandoffFact = from_json(&row.try_get::<String, _>("state")?)?;
                        if let Some(loaded) = states.get_mut(&conversation) {
                            loaded.before.handoffs.insert(id, state);
                        }
                    }
                    let mut select = QueryBuilder::<Database>::new(
                        "SELECT conversation_id, suggestion_id, state FROM fb_suggestion WHERE tenant = ",
                    );
                    select.push_bind(tenant).push(" AND conversation_id");
                    $any(&mut select, chunk);
                    for row in select.build().fetch_all(&mut *conn).await? {
                        let conversation: String = row.try_get("conversation_id")?;
                        let id: String = row.try_get("suggestion_id")?;
                        let state: SuggestionFact =
                            from_json(&row.try_get::<String, _>("state")?)?;
                        if let Some(loaded) = states.get_mut(&conversation) {
                            loaded.before.suggestions.insert(id, state);
                        }
                    }
                    let mut select = QueryBuilder::<Database>::new(
                        "SELECT conversation_id, channel, subject, kind, score, at FROM fb_feedback WHERE tenant = ",
                    );
                    // The partial index's predicate, so that a generic plan can use it.
                    select
                        .push_bind(tenant)
                        .push(" AND conversation_id <> '' AND conversation_id");
                    $any(&mut select, chunk);
                    for row in select.build().fetch_all(&mut *conn).await? {
                        let conversation: String = row.try_get("conversation_id")?;
                        let kind: String = row.try_get("kind")?;
                        let score: i64 = row.try_get("score")?;
                        let score = Score::from_parts(&kind, i32::try_from(score).unwrap_or(-1))
                            .ok_or_else(|| StoreError::Corrupt(format!("feedback kind {kind:?}")))?;
                        if let Some(loaded) = states.get_mut(&conversation) {
                            loaded.feedback.push(FeedbackObs {
                                channel: i32::try_from(row.try_get::<i64, _>("channel")?)
                                    .unwrap_or_default(),
                                subject: i32::try_from(row.try_get::<i64, _>("subject")?)
                                    .unwrap_or_default(),
                                score,
                                at: row.try_get("at")?,
                            });
                        }
                    }
                }
                Ok(())
            }

            async fn save_conversations(
                conn: &mut Conn,
                tenant: &str,
                facts: &[(&String, &ConversationFact)],
            ) -> StoreResult<()> {
                for chunk in facts.chunks(CHUNK) {
                    let mut upsert = QueryBuilder::<Database>::new(
                        "INSERT INTO fb_conversation (tenant, conversation_id, customer_id, scenario_id, intent, \
                         channel, language, handler, agent_id, team, handoff_reason, bucket_at, started_at, \
                         handoff_requested_at, first_assigned_at, resolved_at, closed_at, outcome, eligible, \
                         contained, handed_off, reopened, followed_up, test, proactive, state) ",
                    );
                    upsert.push_values(chunk, |mut row, (id, f)| {
                        row.push_bind(tenant)
                            .push_bind((*id).clone())
                            .push_bind(f.customer_id.value.clone())
                            .push_bind(f.scenario_id.value.clone())
                            .push_bind(f.intent.value.clone())
                            .push_bind(i64::from(f.channel.value))
                            .push_bind(i64::from(f.language.value))
                            .push_bind(i64::from(if f.seen() { f.handler() } else { 0 }))
                            .push_bind(f.first_assignment.value.0.clone())
                            .push_bind(f.first_assignment.value.1.clone())
                            .push_bind(i64::from(f.first_handoff_reason.value))
                            .push_bind(f.bucket_at())
                            .push_bind(f.started_at)
                            .push_bind(f.handoff_requested_at)
                            .push_bind(f.first_assignment.at)
                            .push_bind(f.first_resolution.at)
                            .push_bind(f.closed_at)
                            .push_bind(outcome(f))
                            .push_bind(f.eligible())
                            .push_bind(f.contained())
                            .push_bind(f.handed_off())
                            .push_bind(f.reopened())
                            .push_bind(f.followed_up)
                            .push_bind(f.test)
                            .push_bind(f.proactive)
                            .push_bind(to_json(*f));
                    });
                    upsert.push(
                        " ON CONFLICT (tenant, conversation_id) DO UPDATE SET customer_id = excluded.customer_id, \
                         scenario_id = excluded.scenario_id, intent = excluded.intent, channel = excluded.channel, \
                         language = excluded.language, handler = excluded.handler, agent_id = excluded.agent_id, \
                         team = excluded.team, handoff_reason = excluded.handoff_reason, bucket_at = excluded.bucket_at, \
                         started_at = excluded.started_at, handoff_requested_at = excluded.handoff_requested_at, \
                         first_assigned_at = excluded.first_assigned_at, resolved_at = excluded.resolved_at, \
                         closed_at = excluded.closed_at, outcome = excluded.outcome, eligible = excluded.eligible, \
                         contained = excluded.contained, handed_off = excluded.handed_off, reopened = excluded.reopened, \
                         followed_up = excluded.followed_up, test = excluded.test, proactive = excluded.proactive, \
                         state = excluded.state",
                    );
                    upsert.build().execute(&mut *conn).await?;
                }
                Ok(())
            }

            async fn save_children(
                conn: &mut Conn,
                tenant: &str,
                states: &[(&String, &ConversationState)],
            ) -> StoreResult<()> {
                let handoffs: Vec<(&String, &ConversationFact, &String, &HandoffFact)> = states
                    .iter()
                    .flat_map(|(cid, state)| {
                        state
                            .handoffs
                            .iter()
                            .map(move |(id, h)| (*cid, &state.conversation, id, h))
                    })
                    .collect();
                for chunk in handoffs.chunks(CHUNK) {
                    let mut upsert = QueryBuilder::<Database>::new(
                        "INSERT INTO fb_handoff (tenant, handoff_id, conversation_id, scenario_id, language, reason, \
                         agent_id, team, bucket_at, requested_at, trigger_received_at, queued_at, first_offered_at, \
                         accepted_offer_at, assigned_at, first_agent_reply_at, system_latency_us, queue_wait_us, \
                         agent_accept_us, first_human_reply_us, handle_time_us, summary, intents, test, state) ",
                    );
                    upsert.push_values(chunk, |mut row, (conversation_id, c, id, h)| {
                        row.push_bind(tenant)
                            .push_bind((*id).clone())
                            .push_bind((*conversation_id).clone())
                            .push_bind(c.scenario_id.value.clone())
                            .push_bind(i64::from(c.language.value))
                            .push_bind(i64::from(h.reason.value))
                            .push_bind(h.assignment.value.1.clone())
                            .push_bind(h.assignment.value.2.clone())
                            .push_bind(h.bucket_at())
                            .push_bind(h.requested_at)
                            .push_bind(h.trigger_received_at)
                            .push_bind(h.queued_at)
                            .push_bind(h.first_offered_at)
                            .push_bind(h.assignment.value.0)
                            .push_bind(h.assignment.at)
                            .push_bind(h.first_agent_reply_at)
                            .push_bind(h.system_latency())
                            .push_bind(h.queue_wait())
                            .push_bind(h.agent_accept())
                            .push_bind(h.first_human_reply())
                            .push_bind(h.handle_time())
                            .push_bind(h.summary.join("\n"))
                            .push_bind(h.intents.join("\n"))
                            .push_bind(h.test || c.test)
                            .push_bind(to_json(*h));
                    });
                    upsert.push(
                        " ON CONFLICT (tenant, handoff_id) DO UPDATE SET conversation_id = excluded.conversation_id, \
                         scenario_id = excluded.scenario_id, language = excluded.language, reason = excluded.reason, \
                         agent_id = excluded.agent_id, team = excluded.team, bucket_at = excluded.bucket_at, \
                         requested_at = excluded.requested_at, trigger_received_at = excluded.trigger_received_at, \
                         queued_at = excluded.queued_at, first_offered_at = excluded.first_offered_at, \
                         accepted_offer_at = excluded.accepted_offer_at, assigned_at = excluded.assigned_at, \
                         first_agent_reply_at = excluded.first_agent_reply_at, system_latency_us = excluded.system_latency_us, \
                         queue_wait_us = excluded.queue_wait_us, agent_accept_us = excluded.agent_accept_us, \
                         first_human_reply_us = excluded.first_human_reply_us, handle_time_us = excluded.handle_time_us, \
                         summary = excluded.summary, intents = excluded.intents, test = excluded.test, state = excluded.state",
                    );
                    upsert.build().execute(&mut *conn).await?;
                }
                let suggestions: Vec<(&String, &ConversationFact, &String, &SuggestionFact)> = states
                    .iter()
                    .flat_map(|(cid, state)| {
                        state
                            .suggestions
                            .iter()
                            .map(move |(id, s)| (*cid, &state.conversation, id, s))
                    })
                    .collect();
                for chunk in suggestions.chunks(CHUNK) {
                    let mut upsert = QueryBuilder::<Database>::new(
                        "INSERT INTO fb_suggestion (tenant, suggestion_id, conversation_id, scenario_id, agent_id, \
                         created_at, outcome, reviewed_at, test, state) ",
                    );
                    upsert.push_values(chunk, |mut row, (conversation_id, c, id, s)| {
                        let scenario = if c.scenario_id.value.is_empty() {
                            s.scenario_id.value.clone()
                        } else {
                            c.scenario_id.value.clone()
                        };
                        row.push_bind(tenant)
                            .push_bind((*id).clone())
                            .push_bind((*conversation_id).clone())
                            .push_bind(scenario)
                            .push_bind(s.agent_id.value.clone())
                            .push_bind(s.created_at)
                            .push_bind(i64::from(s.outcome.value))
                            .push_bind(s.outcome.at)
                            .push_bind(s.test || c.test)
                            .push_bind(to_json(*s));
                    });
                    upsert.push(
                        " ON CONFLICT (tenant, suggestion_id) DO UPDATE SET conversation_id = excluded.conversation_id, \
                         scenario_id = excluded.scenario_id, agent_id = excluded.agent_id, created_at = excluded.created_at, \
                         outcome = excluded.outcome, reviewed_at = excluded.reviewed_at, test = excluded.test, \
                         state = excluded.state",
                    );
                    upsert.build().execute(&mut *conn).await?;
                }
                Ok(())
            }

            /// Adds a contribution difference to the rollups. Rows are written in key order so
            /// that concurrent transactions lock them in the same order.
            async fn apply_delta(
                conn: &mut Conn,
                tenant: &str,
                delta: &Contribution,
            ) -> StoreResult<()> {
                // The hours of one day meet in one daily row: sum them first, since one
                // statement may not touch a row twice. Keys are sorted, so concurrent
                // transactions lock rows in the same order.
                let mut sums: BTreeMap<(i64, i32, Micros, rollup::Dims), [i64; 4]> = BTreeMap::new();
                let mut cell_sums: BTreeMap<(i64, i32, Micros, rollup::Dims, i32), i64> =
                    BTreeMap::new();
                for (key, tally) in &delta.0 {
                    for (grain, bucket, dims) in key.grains() {
                        if !tally.hist.is_empty() {
                            for (cell, n) in &tally.hist {
                                *cell_sums
                                    .entry((grain, key.metric, bucket, dims.clone(), *cell))
                                    .or_default() += n;
                            }
                        }
                        let sum = sums.entry((grain, key.metric, bucket, dims)).or_default();
                        sum[0] += tally.num;
                        sum[1] += tally.den;
                        sum[2] += tally.cnt;
                        sum[3] += tally.total;
                    }
                }
                let rows: Vec<_> = sums.into_iter().filter(|(_, v)| v.iter().any(|x| *x != 0)).collect();
                let cells: Vec<_> = cell_sums.into_iter().filter(|(_, n)| *n != 0).collect();
                for chunk in rows.chunks(CHUNK) {
                    let mut upsert = QueryBuilder::<Database>::new(
                        "INSERT INTO fb_rollup (tenant, grain, metric, bucket, scenario, intent, channel, handler, \
                         agent, team, reason, language, num, den, cnt, total) ",
                    );
                    upsert.push_values(chunk, |mut row, ((grain, metric, bucket, d), tally)| {
                        row.push_bind(tenant)
                            .push_bind(*grain)
                            .push_bind(i64::from(*metric))
                            .push_bind(*bucket)
                            .push_bind(d.scenario.clone())
                            .push_bind(d.intent.clone())
                            .push_bind(i64::from(d.channel))
                            .push_bind(i64::from(d.handler))
                            .push_bind(d.agent.clone())
                            .push_bind(d.team.clone())
                            .push_bind(i64::from(d.reason))
                            .push_bind(i64::from(d.language))
                            .push_bind(tally[0])
                            .push_bind(tally[1])
                            .push_bind(tally[2])
                            .push_bind(tally[3]);
                    });
                    upsert.push(
                        " ON CONFLICT (tenant, grain, metric, bucket, scenario, intent, channel, handler, agent, team, \
                         reason, language) DO UPDATE SET num = fb_rollup.num + excluded.num, \
                         den = fb_rollup.den + excluded.den, cnt = fb_rollup.cnt + excluded.cnt, \
                         total = fb_rollup.total + excluded.total",
                    );
                    upsert.build().execute(&mut *conn).await?;
                }
                for chunk in cells.chunks(CHUNK) {
                    let mut upsert = QueryBuilder::<Database>::new(
                        "INSERT INTO fb_rollup_hist (tenant, grain, metric, bucket, scenario, intent, channel, \
                         handler, agent, team, reason, language, cell, cnt) ",
                    );
                    upsert.push_values(chunk, |mut row, ((grain, metric, bucket, d, cell), n)| {
                        row.push_bind(tenant)
                            .push_bind(*grain)
                            .push_bind(i64::from(*metric))
                            .push_bind(*bucket)
                            .push_bind(d.scenario.clone())
                            .push_bind(d.intent.clone())
                            .push_bind(i64::from(d.channel))
                            .push_bind(i64::from(d.handler))
                            .push_bind(d.agent.clone())
                            .push_bind(d.team.clone())
                            .push_bind(i64::from(d.reason))
                            .push_bind(i64::from(d.language))
                            .push_bind(i64::from(*cell))
                            .push_bind(*n);
                    });
                    upsert.push(
                        " ON CONFLICT (tenant, grain, metric, bucket, scenario, intent, channel, handler, agent, team, \
                         reason, language, cell) DO UPDATE SET cnt = fb_rollup_hist.cnt + excluded.cnt",
                    );
                    upsert.build().execute(&mut *conn).await?;
                }
                Ok(())
            }

            /// Merges events into the facts and the rollups in one transaction, skipping
            /// events the consumer handled before. Returns how many were new.
            pub async fn project(
                pool: &Pool,
                consumer: &str,
                events: &[Projected],
            ) -> StoreResult<usize> {
                let mut tx = pool.begin_with($begin).await?;
                let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
                let fresh = $claim(&mut tx, consumer, &ids).await?;
                let mut by_tenant: BTreeMap<&str, Vec<&FactInput>> = BTreeMap::new();
                let mut seen = BTreeSet::new();
                for event in events {
                    // A batch may carry the same event twice; the inbox answers once per id.
                    if fresh.contains(&event.event_id) && seen.insert(event.event_id.as_str()) {
                        by_tenant.entry(&event.tenant).or_default().push(&event.input);
                    }
                }
                let applied = seen.len();
                for (tenant, inputs) in by_tenant {
                    project_tenant(&mut tx, tenant, &inputs).await?;
                }
                tx.commit().await?;
                Ok(applied)
            }

            async fn project_tenant(
                conn: &mut Conn,
                tenant: &str,
                inputs: &[&FactInput],
            ) -> StoreResult<()> {
                let ids: Vec<String> = inputs
                    .iter()
                    .map(|i| i.conversation_id.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let facts = lock_conversations(&mut *conn, tenant, &ids, LOCK).await?;
                let mut states: BTreeMap<String, Loaded> = facts
                    .into_iter()
                    .map(|(id, conversation)| {
                        let state = ConversationState {
                            conversation,
                            ..ConversationState::default()
                        };
                        (id, Loaded { before: state.clone(), after: state, feedback: Vec::new() })
                    })
                    .collect();
                children(&mut *conn, tenant, &ids, &mut states).await?;
                for loaded in states.values_mut() {
                    loaded.after = loaded.before.clone();
                }
                for input in inputs {
                    if let Some(loaded) = states.get_mut(&input.conversation_id) {
                        loaded.after.apply(input);
                    }
                }
                // First-contact resolution: every conversation of the customers involved, when
                // something it depends on changed.
                let customers: Vec<String> = states
                    .values()
                    .filter(|l| fcr_inputs(&l.before.conversation) != fcr_inputs(&l.after.conversation))
                    .flat_map(|l| {
                        [
                            l.before.conversation.customer_id.value.clone(),
                            l.after.conversation.customer_id.value.clone(),
                        ]
                    })
                    .filter(|c| !c.is_empty())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let mut group = customer_conversations(&mut *conn, tenant, &customers).await?;
                let mut others_before = BTreeMap::new();
                for (id, fact) in &group {
                    if !states.contains_key(id) {
                        others_before.insert(id.clone(), fact.clone());
                    }
                }
                for (id, loaded) in &states {
                    // Only conversations whose whole customer group is loaded are recomputed.
                    if customers.contains(&loaded.after.conversation.customer_id.value) {
                        group.insert(id.clone(), loaded.after.conversation.clone());
                    } else {
                        group.remove(id);
                    }
                }
                let changed = refresh_followed_up(&mut group);
                let mut delta = Contribution::default();
                let mut extra_saves = Vec::new();
                for id in changed {
                    if let Some(loaded) = states.get_mut(&id) {
                        loaded.after.conversation.followed_up = group[&id].followed_up;
                    } else if let Some(before) = others_before.get(&id) {
                        let after = group[&id].clone();
                        let mut old = Contribution::default();
                        rollup::conversation_part(before, &mut old);
                        let mut new = Contribution::default();
                        rollup::conversation_part(&after, &mut new);
                        delta.add(&new.minus(&old));
                        extra_saves.push((id, after));
                    }
                }
                let mut saves: Vec<(&String, &ConversationFact)> = Vec::new();
                for (id, loaded) in &states {
                    let old = rollup::contribution(&loaded.before, &loaded.feedback);
                    let new = rollup::contribution(&loaded.after, &loaded.feedback);
                    delta.add(&new.minus(&old));
                    if loaded.after != loaded.before {
                        saves.push((id, &loaded.after.conversation));
                    }
                }
                for (id, fact) in &extra_saves {
                    saves.push((id, fact));
                }
                saves.sort_by(|a, b| a.0.cmp(b.0));
                save_conversations(&mut *conn, tenant, &saves).await?;
                let children_changed: Vec<(&String, &ConversationState)> = states
                    .iter()
                    .filter(|(_, l)| {
                        l.after.handoffs != l.before.handoffs
                            || l.after.suggestions != l.before.suggestions
                            || l.after.conversation.scenario_id != l.before.conversation.scenario_id
                            || l.after.conversation.language != l.before.conversation.language
                            || l.after.conversation.test != l.before.conversation.test
                    })
                    .map(|(id, l)| (id, &l.after))
                    .collect();
                save_children(&mut *conn, tenant, &children_changed).await?;
                apply_delta(&mut *conn, tenant, &delta).await?;
                Ok(())
            }

            /// Returns the facts of one conversation with its handoffs and suggestions.
            pub async fn conversation(
                pool: &Pool,
                tenant: &str,
                conversation_id: &str,
            ) -> StoreResult<Option<ConversationState>> {
                let mut conn = pool.acquire().await?;
                let row = sqlx::query(
                    "SELECT state FROM fb_conversation WHERE tenant = $1 AND conversation_id = $2",
                )
                .bind(tenant)
                .bind(conversation_id)
                .fetch_optional(&mut *conn)
                .await?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let conversation: ConversationFact = from_json(&row.try_get::<String, _>("state")?)?;
                let mut loaded = BTreeMap::from([(
                    conversation_id.to_owned(),
                    Loaded {
                        before: ConversationState { conversation, ..ConversationState::default() },
                        after: ConversationState::default(),
                        feedback: Vec::new(),
                    },
                )]);
                children(&mut conn, tenant, &[conversation_id.to_owned()], &mut loaded).await?;
                Ok(loaded.remove(conversation_id).map(|l| l.before))
            }

            // ---------------------------------------------------------------------------------
            // Feedback.

            const FEEDBACK_COLUMNS: &str = "id, client_feedback_id, conversation_id, channel, subject, kind, \
                score, comment, language_given, language, question_id, submitted_at, received_at";

            fn read_feedback(row: &<Database as sqlx::Database>::Row) -> StoreResult<FeedbackRecord> {
                let int = |name: &str| -> StoreResult<i32> {
                    Ok(i32::try_from(row.try_get::<i64, _>(name)?).unwrap_or_default())
                };
                let kind: String = row.try_get("kind")?;
                let input = FeedbackInput {
                    client_feedback_id: row.try_get("client_feedback_id")?,
                    conversation_id: row.try_get("conversation_id")?,
                    channel: int("channel")?,
                    subject: int("subject")?,
                    score: None,
                    comment: row.try_get("comment")?,
                    language: int("language_given")?,
                    question_id: row.try_get("question_id")?,
                    submitted_at: row.try_get("submitted_at")?,
                };
                record_from_parts(
                    row.try_get("id")?,
                    input,
                    &kind,
                    row.try_get("score")?,
                    row.try_get("language")?,
                    row.try_get("received_at")?,
                )
            }

            async fn existing_feedback(
                conn: &mut Conn,
                tenant: &str,
                client_ids: &[String],
            ) -> StoreResult<BTreeMap<String, FeedbackRecord>> {
                let mut out = BTreeMap::new();
                for chunk in client_ids.chunks(CHUNK) {
                    let mut select = QueryBuilder::<Database>::new(format!(
                        "SELECT {FEEDBACK_COLUMNS} FROM fb_feedback WHERE tenant = "
                    ));
                    select.push_bind(tenant).push(" AND client_feedback_id");
                    $any(&mut select, chunk);
                    for row in select.build().fetch_all(&mut *conn).await? {
                        let record = read_feedback(&row)?;
                        out.insert(record.input.client_feedback_id.clone(), record);
                    }
                }
                Ok(out)
            }

            /// Stores feedback records not stored yet (by client id), adds them to the rollups
            /// under their conversations' current facts, and writes their events to the outbox,
            /// all in one transaction. Returns, per record, whether it is new or which record
            /// existed. `events` are written for the new records only (same order as `records`).
            pub async fn insert_feedback(
                pool: &Pool,
                tenant: &str,
                records: &[(FeedbackRecord, RawEvent)],
            ) -> StoreResult<Vec<Stored>> {
                let plain: Vec<FeedbackRecord> = records.iter().map(|(r, _)| r.clone()).collect();
                let mut tx = pool.begin_with($begin).await?;
                let out = insert_feedback_in(&mut tx, tenant, &plain, &|i, _, _| {
                    records[i].1.clone()
                })
                .await?;
                tx.commit().await?;
                Ok(out.into_iter().map(|(stored, _)| stored).collect())
            }

            /// Stores the feedback of several tenants in one transaction (see
            /// [`insert_feedback`]); the event of a new record is made by `event` from the
            /// group index, the record and its conversation's facts as locked in the transaction.
            /// Returns, per group and record, what was stored with the facts of new records.
            pub async fn insert_feedback_groups(
                pool: &Pool,
                groups: &[(String, Vec<FeedbackRecord>)],
                event: &MakeEvent<'_>,
            ) -> StoreResult<GroupOutcomes> {
                let mut tx = pool.begin_with($begin).await?;
                let mut out = Vec::with_capacity(groups.len());
                for (group, (tenant, records)) in groups.iter().enumerate() {
                    let make = |_: usize, record: &FeedbackRecord, fact: Option<&ConversationFact>| {
                        event(group, record, fact)
                    };
                    out.push(insert_feedback_in(&mut tx, tenant, records, &make).await?);
                }
                tx.commit().await?;
                Ok(out)
            }

            async fn insert_feedback_in(
                conn: &mut Conn,
                tenant: &str,
                records: &[FeedbackRecord],
                event: &(dyn Fn(usize, &FeedbackRecord, Option<&ConversationFact>) -> RawEvent + Sync),
            ) -> StoreResult<Vec<(Stored, Option<ConversationFact>)>> {
                let client_ids: Vec<String> = records
                    .iter()
                    .map(|r| r.input.client_feedback_id.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let mut existing = existing_feedback(&mut *conn, tenant, &client_ids).await?;
                // The first record of each client id not stored yet; later ones replay it.
                let mut fresh: Vec<usize> = Vec::new();
                let mut first: BTreeMap<&str, usize> = BTreeMap::new();
                for (i, record) in records.iter().enumerate() {
                    let id = record.input.client_feedback_id.as_str();
                    if !existing.contains_key(id) && !first.contains_key(id) {
                        first.insert(id, i);
                        fresh.push(i);
                    }
                }
                let mut facts = BTreeMap::new();
                let mut inserted: BTreeSet<String> = BTreeSet::new();
                if !fresh.is_empty() {
                    let conversation_ids: Vec<String> = fresh
                        .iter()
                        .map(|i| records[*i].input.conversation_id.clone())
                        .filter(|c| !c.is_empty())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    facts = lock_conversations(&mut *conn, tenant, &conversation_ids, SHARE).await?;
                    for chunk in fresh.chunks(CHUNK) {
                        let mut insert = QueryBuilder::<Database>::new(
                            "INSERT INTO fb_feedback (tenant, id, client_feedback_id, conversation_id, channel, \
                             subject, kind, score, comment, language_given, language, question_id, submitted_at, \
                             received_at, at, negative) ",
                        );
                        insert.push_values(chunk, |mut row, i| {
                            let r = &records[*i];
                            row.push_bind(tenant)
                                .push_bind(r.id.clone())
                                .push_bind(r.input.client_feedback_id.clone())
                                .push_bind(r.input.conversation_id.clone())
                                .push_bind(i64::from(r.input.channel))
                                .push_bind(i64::from(r.input.subject))
                                .push_bind(r.score.kind())
                                .push_bind(i64::from(r.score.value()))
                                .push_bind(r.input.comment.clone())
                                .push_bind(i64::from(r.input.language))
                                .push_bind(i64::from(r.language))
                                .push_bind(r.input.question_id.clone())
                                .push_bind(r.input.submitted_at)
                                .push_bind(r.received_at)
                                .push_bind(r.at())
                                .push_bind(r.complaint());
                        });
                        // A concurrent transaction may store the same client id first: that
                        // row wins and this one becomes a replay of it.
                        insert.push(
                            " ON CONFLICT (tenant, client_feedback_id) DO NOTHING RETURNING client_feedback_id",
                        );
                        for row in insert.build().fetch_all(&mut *conn).await? {
                            inserted.insert(row.try_get("client_feedback_id")?);
                        }
                    }
                    let lost: Vec<String> = fresh
                        .iter()
                        .map(|i| records[*i].input.client_feedback_id.clone())
                        .filter(|id| !inserted.contains(id))
                        .collect();
                    if !lost.is_empty() {
                        existing.extend(existing_feedback(&mut *conn, tenant, &lost).await?);
                    }
                }
                let mut delta = Contribution::default();
                let mut events = Vec::with_capacity(inserted.len());
                let mut out = Vec::with_capacity(records.len());
                for (i, record) in records.iter().enumerate() {
                    let id = record.input.client_feedback_id.as_str();
                    if first.get(id) == Some(&i) && inserted.contains(id) {
                        let fact = facts.get(&record.input.conversation_id);
                        rollup::feedback_part(fact, &record.obs(), &mut delta);
                        events.push(event(i, record, fact));
                        out.push((Stored::New(record.clone()), fact.cloned()));
                    } else if let Some(stored) = existing.get(id) {
                        out.push((Stored::Existing(stored.clone()), None));
                    } else if let Some(earlier) = first.get(id).filter(|_| inserted.contains(id)) {
                        out.push((Stored::Existing(records[*earlier].clone()), None));
                    } else {
                        return Err(StoreError::Corrupt(format!(
                            "feedback {id:?} was neither stored nor found"
                        )));
                    }
                }
                for chunk in events.chunks(CHUNK) {
                    $enqueue(&mut *conn, chunk).await?;
                }
                // Last, so the shared rollup rows stay locked for as short a time as possible.
                apply_delta(&mut *conn, tenant, &delta).await?;
                Ok(out)
            }

            /// Stores an agent review and its event.
            pub async fn insert_review(
                pool: &Pool,
                tenant: &str,
                review: &StoredReview,
                event: &RawEvent,
            ) -> StoreResult<()> {
                let mut tx = pool.begin_with($begin).await?;
                sqlx::query(
                    "INSERT INTO fb_agent_review (tenant, id, agent_id, conversation_id, message_id, suggestion_id, \
                     verdict, comment, corrected_answer, scenario_id, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .bind(tenant)
                .bind(&review.id)
                .bind(&review.agent_id)
                .bind(&review.conversation_id)
                .bind(&review.message_id)
                .bind(&review.suggestion_id)
                .bind(i64::from(review.verdict))
                .bind(&review.comment)
                .bind(&review.corrected_answer)
                .bind(&review.scenario_id)
                .bind(review.created_at)
                .execute(&mut *tx)
                .await?;
                $enqueue(&mut tx, std::slice::from_ref(event)).await?;
                tx.commit().await?;
                Ok(())
            }

            // ---------------------------------------------------------------------------------
            // Queries.

            fn push_filters(builder: &mut QueryBuilder<Database>, query: &MetricQuery) {
                for filter in &query.filters {
                    builder.push(" AND ").push(filter.column).push(" IN ");
                    match &filter.values {
                        FilterValues::Text(values) => push_list(builder, values),
                        FilterValues::Int(values) => push_list(builder, values),
                    }
                }
            }

            fn read_group(
                row: &<Database as sqlx::Database>::Row,
                columns: &[(&str, bool)],
            ) -> StoreResult<Vec<DimValue>> {
                columns
                    .iter()
                    .enumerate()
                    .map(|(i, (_, is_enum))| {
                        let name = format!("g{i}");
                        Ok(if *is_enum {
                            DimValue::Int(row.try_get::<i64, _>(name.as_str())?)
                        } else {
                            DimValue::Text(row.try_get::<String, _>(name.as_str())?)
                        })
                    })
                    .collect()
            }

            /// Reads the summed rollup rows and histogram cells a metric query needs.
            pub async fn metrics(
                pool: &Pool,
                tenant: &str,
                query: &MetricQuery,
            ) -> StoreResult<(Vec<RollupRow>, Vec<HistRow>)> {
                let columns = query.group_columns();
                let group_select: String = columns
                    .iter()
                    .enumerate()
                    .map(|(i, (c, _))| format!(", {c} AS g{i}"))
                    .collect();
                let group_by: String = columns.iter().map(|(c, _)| format!(", {c}")).collect();
                let (from, to) = query.bucket_range();
                let metrics: Vec<i64> = query.metrics.iter().map(|m| i64::from(*m)).collect();
                // Group buckets in SQL when the output buckets allow it, so that only one row
                // per output bucket comes back.
                let bucket = match query.sql_bucketing() {
                    None => "bucket".to_owned(),
                    Some(None) => format!("CAST({from} AS BIGINT)"),
                    Some(Some(offset)) => format!(
                        "(((bucket + ({offset})) / {day}) * {day} - ({offset}))",
                        day = crate::domain::DAY
                    ),
                };
                let mut select = QueryBuilder::<Database>::new(format!(
                    "SELECT metric, {bucket} AS b{group_select}, CAST(SUM(num) AS BIGINT) AS num, \
                     CAST(SUM(den) AS BIGINT) AS den, CAST(SUM(cnt) AS BIGINT) AS cnt, \
                     CAST(SUM(total) AS BIGINT) AS total FROM fb_rollup WHERE tenant = "
                ));
                select
                    .push_bind(tenant)
                    .push(" AND grain = ")
                    .push_bind(query.grain())
                    .push(" AND metric IN ");
                push_list(&mut select, &metrics);
                select.push(" AND bucket >= ").push_bind(from).push(" AND bucket < ").push_bind(to);
                push_filters(&mut select, query);
                select.push(format!(" GROUP BY metric, b{group_by}"));
                // The sums and the histograms are read side by side, on two connections.
                let read_rows = async {
                    let mut rows = Vec::new();
                    for row in select.build().fetch_all(pool).await? {
                        rows.push(RollupRow {
                            metric: i32::try_from(row.try_get::<i64, _>("metric")?).unwrap_or_default(),
                            bucket: row.try_get("b")?,
                            group: read_group(&row, &columns)?,
                            num: row.try_get("num")?,
                            den: row.try_get("den")?,
                            cnt: row.try_get("cnt")?,
                            total: row.try_get("total")?,
                        });
                    }
                    StoreResult::Ok(rows)
                };
                let durations: Vec<i64> = metrics
                    .iter()
                    .copied()
                    .filter(|m| rollup::metric::is_duration(i32::try_from(*m).unwrap_or_default()))
                    .collect();
                let read_hist = async {
                    let mut hist = Vec::new();
                    if durations.is_empty() {
                        return StoreResult::Ok(hist);
                    }
                    let mut select = QueryBuilder::<Database>::new(format!(
                        "SELECT metric, {bucket} AS b{group_select}, cell, CAST(SUM(cnt) AS BIGINT) AS cnt \
                         FROM fb_rollup_hist WHERE tenant = "
                    ));
                    select
                        .push_bind(tenant)
                        .push(" AND grain = ")
                        .push_bind(query.grain())
                        .push(" AND metric IN ");
                    push_list(&mut select, &durations);
                    select.push(" AND bucket >= ").push_bind(from).push(" AND bucket < ").push_bind(to);
                    push_filters(&mut select, query);
                    select.push(format!(" GROUP BY metric, b{group_by}, cell"));
                    for row in select.build().fetch_all(pool).await? {
                        hist.push(HistRow {
                            metric: i32::try_from(row.try_get::<i64, _>("metric")?).unwrap_or_default(),
                            bucket: row.try_get("b")?,
                            group: read_group(&row, &columns)?,
                            cell: i32::try_from(row.try_get::<i64, _>("cell")?).unwrap_or_default(),
                            cnt: row.try_get("cnt")?,
                        });
                    }
                    Ok(hist)
                };
                tokio::try_join!(read_rows, read_hist)
            }

            /// Returns complaints (negative feedback with a comment) and failed bot turns
            /// (handoff summaries, except human-first handoffs) in a range, newest first.
            pub async fn problem_items(
                pool: &Pool,
                tenant: &str,
                scenario_id: &str,
                language: i32,
                (from, to): (Micros, Micros),
                limit: i64,
            ) -> StoreResult<Vec<ProblemItem>> {
                let mut conn = pool.acquire().await?;
                let mut select = QueryBuilder::<Database>::new(
                    "SELECT f.comment AS text, f.language AS language, COALESCE(c.scenario_id, '') AS scenario, \
                     COALESCE(c.intent, '') AS intent, f.at AS at FROM fb_feedback f LEFT JOIN fb_conversation c \
                     ON c.tenant = f.tenant AND c.conversation_id = f.conversation_id WHERE f.tenant = ",
                );
                select
                    .push_bind(tenant)
                    .push(" AND f.negative = ")
                    .push_bind(true)
                    .push(" AND f.at >= ")
                    .push_bind(from)
                    .push(" AND f.at < ")
                    .push_bind(to)
                    .push(" AND COALESCE(c.test, ")
                    .push_bind(false)
                    .push(") = ")
                    .push_bind(false);
                if !scenario_id.is_empty() {
                    select.push(" AND COALESCE(c.scenario_id, '') = ").push_bind(scenario_id);
                }
                if language != 0 {
                    select.push(" AND f.language = ").push_bind(i64::from(language));
                }
                select.push(" ORDER BY f.at DESC LIMIT ").push_bind(limit);
                let mut items = Vec::new();
                for row in select.build().fetch_all(&mut *conn).await? {
                    let intent: String = row.try_get("intent")?;
                    items.push(ProblemItem {
                        text: row.try_get("text")?,
                        scenario_id: row.try_get("scenario")?,
                        language: i32::try_from(row.try_get::<i64, _>("language")?).unwrap_or_default(),
                        intents: if intent.is_empty() { Vec::new() } else { vec![intent] },
                        at: row.try_get("at")?,
                    });
                }
                let mut select = QueryBuilder::<Database>::new(
                    "SELECT summary, intents, scenario_id, language, bucket_at FROM fb_handoff WHERE tenant = ",
                );
                select
                    .push_bind(tenant)
                    .push(" AND test = ")
                    .push_bind(false)
                    .push(" AND summary <> '' AND reason <> 7 AND bucket_at >= ")
                    .push_bind(from)
                    .push(" AND bucket_at < ")
                    .push_bind(to);
                if !scenario_id.is_empty() {
                    select.push(" AND scenario_id = ").push_bind(scenario_id);
                }
                select.push(" ORDER BY bucket_at DESC LIMIT ").push_bind(limit);
                for row in select.build().fetch_all(&mut *conn).await? {
                    let intents: String = row.try_get("intents")?;
                    let summary: String = row.try_get("summary")?;
                    let lang = i32::try_from(row.try_get::<i64, _>("language")?).unwrap_or_default();
                    if language != 0 && lang != 0 && lang != language {
                        continue;
                    }
                    items.push(ProblemItem {
                        text: summary.replace('\n', " "),
                        scenario_id: row.try_get("scenario_id")?,
                        language: lang,
                        intents: intents.lines().map(str::to_owned).collect(),
                        at: row.try_get("bucket_at")?,
                    });
                }
                Ok(items)
            }

            // ---------------------------------------------------------------------------------
            // Alerts.

            fn read_rule(row: &<Database as sqlx::Database>::Row) -> StoreResult<AlertRule> {
                let int = |name: &str| -> StoreResult<i32> {
                    Ok(i32::try_from(row.try_get::<i64, _>(name)?).unwrap_or_default())
                };
                Ok(AlertRule {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    kind: int("kind")?,
                    scenario_id: row.try_get("scenario_id")?,
                    metric: int("metric")?,
                    condition: int("cond")?,
                    threshold: row.try_get("threshold")?,
                    window: row.try_get("window_us")?,
                    baseline_window: row.try_get("baseline_window_us")?,
                    min_samples: row.try_get("min_samples")?,
                    severity: int("severity")?,
                    enabled: row.try_get("enabled")?,
                    created_at: row.try_get("created_at")?,
                    updated_at: row.try_get("updated_at")?,
                })
            }

            /// Creates or replaces a rule; keeps the creation time of a replaced one.
            pub async fn upsert_rule(pool: &Pool, tenant: &str, rule: &AlertRule) -> StoreResult<AlertRule> {
                let row = sqlx::query(
                    "INSERT INTO fb_alert_rule (tenant, id, name, kind, scenario_id, metric, cond, threshold, \
                     window_us, baseline_window_us, min_samples, severity, enabled, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                     ON CONFLICT (tenant, id) DO UPDATE SET name = excluded.name, kind = excluded.kind, \
                     scenario_id = excluded.scenario_id, metric = excluded.metric, cond = excluded.cond, \
                     threshold = excluded.threshold, window_us = excluded.window_us, \
                     baseline_window_us = excluded.baseline_window_us, min_samples = excluded.min_samples, \
                     severity = excluded.severity, enabled = excluded.enabled, updated_at = excluded.updated_at \
                     RETURNING id, name, kind, scenario_id, metric, cond, threshold, window_us, baseline_window_us, \
                     min_samples, severity, enabled, created_at, updated_at",
                )
                .bind(tenant)
                .bind(&rule.id)
                .bind(&rule.name)
                .bind(i64::from(rule.kind))
                .bind(&rule.scenario_id)
                .bind(i64::from(rule.metric))
                .bind(i64::from(rule.condition))
                .bind(rule.threshold)
                .bind(rule.window)
                .bind(rule.baseline_window)
                .bind(rule.min_samples)
                .bind(i64::from(rule.severity))
                .bind(rule.enabled)
                .bind(rule.created_at)
                .bind(rule.updated_at)
                .fetch_one(pool)
                .await?;
                read_rule(&row)
            }

            /// Lists rules (for one scenario and the every-scenario ones, or all), by id,
            /// after `after`.
            pub async fn list_rules(
                pool: &Pool,
                tenant: Option<&str>,
                scenario_id: &str,
                after: &str,
                limit: i64,
            ) -> StoreResult<Vec<(String, AlertRule)>> {
                let mut select = QueryBuilder::<Database>::new(
                    "SELECT tenant, id, name, kind, scenario_id, metric, cond, threshold, window_us, \
                     baseline_window_us, min_samples, severity, enabled, created_at, updated_at \
                     FROM fb_alert_rule WHERE id > ",
                );
                select.push_bind(after);
                if let Some(tenant) = tenant {
                    select.push(" AND tenant = ").push_bind(tenant);
                } else {
                    select.push(" AND enabled = ").push_bind(true);
                }
                if !scenario_id.is_empty() {
                    select.push(" AND scenario_id IN ('', ").push_bind(scenario_id).push(")");
                }
                select.push(" ORDER BY id LIMIT ").push_bind(limit);
                let rows = select.build().fetch_all(pool).await?;
                rows.iter()
                    .map(|row| Ok((row.try_get("tenant")?, read_rule(row)?)))
                    .collect()
            }

            /// Lists the enabled rules of every tenant, by id and tenant, after `after` (an id and
            /// a tenant): ids are unique per tenant only, so the cursor needs both.
            pub async fn enabled_rules(
                pool: &Pool,
                (after_id, after_tenant): (&str, &str),
                limit: i64,
            ) -> StoreResult<Vec<(String, AlertRule)>> {
                let rows = sqlx::query(
                    "SELECT tenant, id, name, kind, scenario_id, metric, cond, threshold, window_us, \
                     baseline_window_us, min_samples, severity, enabled, created_at, updated_at \
                     FROM fb_alert_rule WHERE enabled = $1 AND (id > $2 OR (id = $2 AND tenant > $3)) \
                     ORDER BY id, tenant LIMIT $4",
                )
                .bind(true)
                .bind(after_id)
                .bind(after_tenant)
                .bind(limit)
                .fetch_all(pool)
                .await?;
                rows.iter()
                    .map(|row| Ok((row.try_get("tenant")?, read_rule(row)?)))
                    .collect()
            }

            const ALERT_COLUMNS: &str = "id, rule_id, kind, scenario_id, metric, observed, threshold, baseline, \
                window_us, severity, status, explanation, raised_at, acknowledged_at, acknowledged_by, resolved_at";

            /// The condition (on an open alert `a`, with `$4` bound to true) that no enabled
            /// rule evaluates the alert: its rule is deleted, disabled, or now scoped to another
            /// scenario (a rule for every scenario still evaluates it).
            const ORPHANED: &str = "NOT EXISTS (SELECT 1 FROM fb_alert_rule r WHERE r.tenant = a.tenant \
                AND r.id = a.rule_id AND r.enabled = $4 AND r.scenario_id IN ('', a.scenario_id))";

            fn read_alert(row: &<Database as sqlx::Database>::Row) -> StoreResult<StoredAlert> {
                let int = |name: &str| -> StoreResult<i32> {
                    Ok(i32::try_from(row.try_get::<i64, _>(name)?).unwrap_or_default())
                };
                Ok(StoredAlert {
                    id: row.try_get("id")?,
                    rule_id: row.try_get("rule_id")?,
                    kind: int("kind")?,
                    scenario_id: row.try_get("scenario_id")?,
                    metric: int("metric")?,
                    observed: row.try_get("observed")?,
                    threshold: row.try_get("threshold")?,
                    baseline: row.try_get("baseline")?,
                    window: row.try_get("window_us")?,
                    severity: int("severity")?,
                    status: int("status")?,
                    explanation: row.try_get("explanation")?,
                    raised_at: row.try_get("raised_at")?,
                    acknowledged_at: row.try_get("acknowledged_at")?,
                    acknowledged_by: row.try_get("acknowledged_by")?,
                    resolved_at: row.try_get("resolved_at")?,
                })
            }

            /// Lists alerts, newest first.
            pub async fn list_alerts(
                pool: &Pool,
                tenant: &str,
                filter: &AlertFilter,
            ) -> StoreResult<Vec<StoredAlert>> {
                let mut select = QueryBuilder::<Database>::new(format!(
                    "SELECT {ALERT_COLUMNS} FROM fb_alert WHERE tenant = "
                ));
                select.push_bind(tenant);
                if filter.status != 0 {
                    select.push(" AND status = ").push_bind(i64::from(filter.status));
                }
                if !filter.scenario_id.is_empty() {
                    select.push(" AND scenario_id = ").push_bind(filter.scenario_id.clone());
                }
                if let Some(from) = filter.from {
                    select.push(" AND raised_at >= ").push_bind(from);
                }
                if let Some(to) = filter.to {
                    select.push(" AND raised_at < ").push_bind(to);
                }
                if let Some((at, id)) = &filter.before {
                    select
                        .push(" AND (raised_at < ")
                        .push_bind(*at)
                        .push(" OR (raised_at = ")
                        .push_bind(*at)
                        .push(" AND id < ")
                        .push_bind(id.clone())
                        .push("))");
                }
                select.push(" ORDER BY raised_at DESC, id DESC LIMIT ").push_bind(filter.limit);
                let rows = select.build().fetch_all(pool).await?;
                rows.iter().map(read_alert).collect()
            }

            /// Acknowledges an open alert; returns it, or `None` when there is no such alert.
            /// An alert that is not firing is returned unchanged.
            pub async fn acknowledge(
                pool: &Pool,
                tenant: &str,
                alert_id: &str,
                by: &str,
                comment: &str,
                at: Micros,
            ) -> StoreResult<Option<StoredAlert>> {
                sqlx::query(
                    "UPDATE fb_alert SET status = 2, acknowledged_at = $1, acknowledged_by = $2, ack_comment = $3 \
                     WHERE tenant = $4 AND id = $5 AND status = 1",
                )
                .bind(at)
                .bind(by)
                .bind(comment)
                .bind(tenant)
                .bind(alert_id)
                .execute(pool)
                .await?;
                let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {ALERT_COLUMNS} FROM fb_alert WHERE tenant = $1 AND id = $2"
                )))
                .bind(tenant)
                .bind(alert_id)
                .fetch_optional(pool)
                .await?;
                row.as_ref().map(read_alert).transpose()
            }

            /// Returns the open alert of a rule and scenario, and when the last one resolved.
            pub async fn standing(
                pool: &Pool,
                tenant: &str,
                rule_id: &str,
                scenario_id: &str,
            ) -> StoreResult<(Option<StoredAlert>, Option<Micros>)> {
                let open = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {ALERT_COLUMNS} FROM fb_alert WHERE tenant = $1 AND rule_id = $2 AND scenario_id = $3 \
                     AND status IN (1, 2)"
                )))
                .bind(tenant)
                .bind(rule_id)
                .bind(scenario_id)
                .fetch_optional(pool)
                .await?;
                let resolved: Option<Option<i64>> = sqlx::query_scalar(
                    "SELECT MAX(resolved_at) FROM fb_alert WHERE tenant = $1 AND rule_id = $2 AND scenario_id = $3 \
                     AND status = 3",
                )
                .bind(tenant)
                .bind(rule_id)
                .bind(scenario_id)
                .fetch_optional(pool)
                .await?;
                Ok((open.as_ref().map(read_alert).transpose()?, resolved.flatten()))
            }

            /// Inserts a firing alert with its event, unless one is open for the rule and
            /// scenario already (the `fb_alert_open` unique index) or one resolved after
            /// `quiet_after` (the cool-down). Both are checked by the insert itself, so replicas
            /// that evaluate the same rule at the same time raise it once. Returns whether it
            /// was raised.
            pub async fn raise(
                pool: &Pool,
                tenant: &str,
                alert: &StoredAlert,
                event: &RawEvent,
                quiet_after: Micros,
            ) -> StoreResult<bool> {
                let mut tx = pool.begin_with($begin).await?;
                let inserted = sqlx::query(
                    "INSERT INTO fb_alert (tenant, id, rule_id, kind, scenario_id, metric, observed, threshold, \
                     baseline, window_us, severity, status, explanation, raised_at) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 1, $12, $13 WHERE NOT EXISTS \
                     (SELECT 1 FROM fb_alert WHERE tenant = $1 AND rule_id = $3 AND scenario_id = $5 \
                     AND status = 3 AND resolved_at > $14) ON CONFLICT DO NOTHING",
                )
                .bind(tenant)
                .bind(&alert.id)
                .bind(&alert.rule_id)
                .bind(i64::from(alert.kind))
                .bind(&alert.scenario_id)
                .bind(i64::from(alert.metric))
                .bind(alert.observed)
                .bind(alert.threshold)
                .bind(alert.baseline)
                .bind(alert.window)
                .bind(i64::from(alert.severity))
                .bind(&alert.explanation)
                .bind(alert.raised_at)
                .bind(quiet_after)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
                if inserted {
                    $enqueue(&mut tx, std::slice::from_ref(event)).await?;
                }
                tx.commit().await?;
                Ok(inserted)
            }

            /// Resolves an open alert with its event. Returns whether it was still open.
            pub async fn resolve(
                pool: &Pool,
                tenant: &str,
                alert_id: &str,
                at: Micros,
                event: &RawEvent,
            ) -> StoreResult<bool> {
                resolve_open(pool, tenant, alert_id, at, event, false).await
            }

            /// Resolves an open alert with its event, only if no enabled rule evaluates it any
            /// more when `orphaned_only`; one transaction. Returns whether it resolved.
            async fn resolve_open(
                pool: &Pool,
                tenant: &str,
                alert_id: &str,
                at: Micros,
                event: &RawEvent,
                orphaned_only: bool,
            ) -> StoreResult<bool> {
                let condition = if orphaned_only { ORPHANED } else { "TRUE" };
                let mut tx = pool.begin_with($begin).await?;
                let sql = format!(
                    "UPDATE fb_alert AS a SET status = 3, resolved_at = $1 WHERE tenant = $2 \
                     AND id = $3 AND status IN (1, 2) AND {condition}"
                );
                let mut update = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(at)
                    .bind(tenant)
                    .bind(alert_id);
                if orphaned_only {
                    update = update.bind(true);
                }
                let updated = update.execute(&mut *tx).await?.rows_affected() == 1;
                if updated {
                    $enqueue(&mut tx, std::slice::from_ref(event)).await?;
                }
                tx.commit().await?;
                Ok(updated)
            }

            /// Returns the scenarios with an open alert of a rule.
            pub async fn open_alert_scenarios(
                pool: &Pool,
                tenant: &str,
                rule_id: &str,
            ) -> StoreResult<Vec<String>> {
                Ok(sqlx::query_scalar(
                    "SELECT scenario_id FROM fb_alert WHERE tenant = $1 AND rule_id = $2 \
                     AND status IN (1, 2) ORDER BY scenario_id",
                )
                .bind(tenant)
                .bind(rule_id)
                .fetch_all(pool)
                .await?)
            }

            /// Lists the open alerts of every tenant that no enabled rule evaluates any more:
            /// their rule is deleted, disabled, or scoped to another scenario. By tenant and id,
            /// after `after` (a tenant and an id).
            pub async fn orphaned_alerts(
                pool: &Pool,
                (after_tenant, after_id): (&str, &str),
                limit: i64,
            ) -> StoreResult<Vec<(String, StoredAlert)>> {
                let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT tenant, {ALERT_COLUMNS} FROM fb_alert a WHERE status IN (1, 2) \
                     AND (tenant > $1 OR (tenant = $1 AND id > $2)) AND {ORPHANED} \
                     ORDER BY tenant, id LIMIT $3"
                )))
                .bind(after_tenant)
                .bind(after_id)
                .bind(limit)
                .bind(true)
                .fetch_all(pool)
                .await?;
                rows.iter()
                    .map(|row| Ok((row.try_get("tenant")?, read_alert(row)?)))
                    .collect()
            }

            /// Resolves an open alert that no enabled rule evaluates any more (see
            /// [`orphaned_alerts`]) with its event; the rule is checked again in the update, so
            /// an alert whose rule came back meanwhile stays open. Returns whether it resolved.
            pub async fn resolve_orphaned(
                pool: &Pool,
                tenant: &str,
                alert_id: &str,
                at: Micros,
                event: &RawEvent,
            ) -> StoreResult<bool> {
                resolve_open(pool, tenant, alert_id, at, event, true).await
            }

            /// Returns the scenarios with conversations in a range.
            pub async fn active_scenarios(
                pool: &Pool,
                tenant: &str,
                (from, to): (Micros, Micros),
            ) -> StoreResult<Vec<String>> {
                Ok(sqlx::query_scalar(
                    "SELECT DISTINCT scenario_id FROM fb_conversation WHERE tenant = $1 AND bucket_at >= $2 \
                     AND bucket_at < $3 AND scenario_id <> '' ORDER BY scenario_id LIMIT 1000",
                )
                .bind(tenant)
                .bind(from)
                .bind(to)
                .fetch_all(pool)
                .await?)
            }

            /// Measures a rule's metric over a range for one scenario (empty: all). For CSAT,
            /// the latest `last_n` answers in the range; `bot_only` keeps those about the bot.
            pub async fn window_values(
                pool: &Pool,
                tenant: &str,
                scenario_id: &str,
                metric: i32,
                (from, to): (Micros, Micros),
                last_n: i64,
                bot_only: bool,
            ) -> StoreResult<WindowValues> {
                use crate::domain::rollup::metric as m;
                let mut out = WindowValues::default();
                match metric {
                    m::CONTAINMENT_RATE | m::HANDOFF_RATE => {
                        let column = if metric == m::HANDOFF_RATE { "handed_off" } else { "contained" };
                        let mut select = QueryBuilder::<Database>::new(format!(
                            "SELECT CAST(COUNT(*) AS BIGINT) AS samples, \
                             CAST(COALESCE(SUM(CASE WHEN {column} THEN 1 ELSE 0 END), 0) AS BIGINT) AS hits \
                             FROM fb_conversation WHERE tenant = "
                        ));
                        select
                            .push_bind(tenant)
                            .push(" AND eligible = ")
                            .push_bind(true)
                            .push(" AND bucket_at >= ")
                            .push_bind(from)
                            .push(" AND bucket_at < ")
                            .push_bind(to);
                        if !scenario_id.is_empty() {
                            select.push(" AND scenario_id = ").push_bind(scenario_id);
                        }
                        let row = select.build().fetch_one(pool).await?;
                        out.samples = row.try_get("samples")?;
                        out.hits = row.try_get("hits")?;
                    }
                    m::CSAT => {
                        let mut select = QueryBuilder::<Database>::new(
                            "SELECT f.score AS score FROM fb_feedback f LEFT JOIN fb_conversation c \
                             ON c.tenant = f.tenant AND c.conversation_id = f.conversation_id WHERE f.tenant = ",
                        );
                        select
                            .push_bind(tenant)
                            .push(" AND f.kind = 'csat' AND f.at >= ")
                            .push_bind(from)
                            .push(" AND f.at < ")
                            .push_bind(to)
                            .push(" AND COALESCE(c.test, ")
                            .push_bind(false)
                            .push(") = ")
                            .push_bind(false);
                        if !scenario_id.is_empty() {
                            select.push(" AND c.scenario_id = ").push_bind(scenario_id);
                        }
                        if bot_only {
                            select.push(
                                " AND (f.subject = 1 OR (f.subject IN (0, 3) AND COALESCE(c.handler, 1) = 1))",
                            );
                        }
                        select.push(" ORDER BY f.at DESC LIMIT ").push_bind(last_n.max(1));
                        for row in select.build().fetch_all(pool).await? {
                            let score: i64 = row.try_get("score")?;
                            out.samples += 1;
                            out.hits += i64::from(score >= 4);
                        }
                    }
                    _ => {
                        let column = match metric {
                            m::HANDOFF_SYSTEM_LATENCY => "system_latency_us",
                            m::QUEUE_WAIT => "queue_wait_us",
                            m::AGENT_ACCEPT_TIME => "agent_accept_us",
                            m::FIRST_HUMAN_REPLY => "first_human_reply_us",
                            _ => "handle_time_us",
                        };
                        let mut select = QueryBuilder::<Database>::new(format!(
                            "SELECT {column} AS v FROM fb_handoff WHERE tenant = "
                        ));
                        select
                            .push_bind(tenant)
                            .push(" AND test = ")
                            .push_bind(false)
                            .push(format!(" AND {column} IS NOT NULL AND bucket_at >= "))
                            .push_bind(from)
                            .push(" AND bucket_at < ")
                            .push_bind(to);
                        if !scenario_id.is_empty() {
                            select.push(" AND scenario_id = ").push_bind(scenario_id);
                        }
                        select.push(" LIMIT 200000");
                        for row in select.build().fetch_all(pool).await? {
                            let v: i64 = row.try_get("v")?;
                            out.durations.push(v as f64);
                        }
                        out.samples = out.durations.len() as i64;
                    }
                }
                Ok(out)
            }

            /// Returns the tenants that have enabled rules.
            pub async fn tenants_with_rules(pool: &Pool) -> StoreResult<Vec<String>> {
                Ok(sqlx::query_scalar(
                    "SELECT DISTINCT tenant FROM fb_alert_rule WHERE enabled = $1 ORDER BY tenant",
                )
                .bind(true)
                .fetch_all(pool)
                .await?)
            }
        }
    };
}

engine!(
    postgres,
    sqlx::Postgres,
    sqlx::PgPool,
    " FOR UPDATE",
    " FOR SHARE",
    "BEGIN",
    tandem_platform::inbox::claim_batch_pg,
    tandem_platform::outbox::enqueue_pg,
    push_any_pg
);
engine!(
    sqlite,
    sqlx::Sqlite,
    sqlx::SqlitePool,
    "",
    "",
    // One writer at a time, taken when the transaction starts: a transaction that reads and
    // then writes never fails with "database is locked" when another writer got there first.
    "BEGIN IMMEDIATE",
    tandem_platform::inbox::claim_batch_sqlite,
    tandem_platform::outbox::enqueue_sqlite,
    push_any_sqlite
);

/// The feedback service's storage, on the engine of its pool.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
}

macro_rules! dispatch {
    ($self:ident, $function:ident ( $($arg:expr),* )) => {
        match &$self.db {
            Db::Postgres(pool) => postgres::$function(pool, $($arg),*).await,
            Db::Sqlite(pool) => sqlite::$function(pool, $($arg),*).await,
        }
    };
}

impl Store {
    /// Wraps a migrated database.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Returns the database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// See [`postgres::project`].
    pub async fn project(&self, consumer: &str, events: &[Projected]) -> StoreResult<usize> {
        dispatch!(self, project(consumer, events))
    }

    /// See [`postgres::conversation`].
    pub async fn conversation(
        &self,
        tenant: &str,
        conversation_id: &str,
    ) -> StoreResult<Option<ConversationState>> {
        dispatch!(self, conversation(tenant, conversation_id))
    }

    /// See [`postgres::insert_feedback`].
    pub async fn insert_feedback(
        &self,
        tenant: &str,
        records: &[(FeedbackRecord, RawEvent)],
    ) -> StoreResult<Vec<Stored>> {
        dispatch!(self, insert_feedback(tenant, records))
    }

    /// See [`postgres::insert_feedback_groups`].
    pub async fn insert_feedback_groups(
        &self,
        groups: &[(String, Vec<FeedbackRecord>)],
        event: &MakeEvent<'_>,
    ) -> StoreResult<GroupOutcomes> {
        dispatch!(self, insert_feedback_groups(groups, event))
    }

    /// See [`postgres::insert_review`].
    pub async fn insert_review(
        &self,
        tenant: &str,
        review: &StoredReview,
        event: &RawEvent,
    ) -> StoreResult<()> {
        dispatch!(self, insert_review(tenant, review, event))
    }

    /// See [`postgres::metrics`].
    pub async fn metrics(
        &self,
        tenant: &str,
        query: &MetricQuery,
    ) -> StoreResult<(Vec<RollupRow>, Vec<HistRow>)> {
        dispatch!(self, metrics(tenant, query))
    }

    /// See [`postgres::problem_items`].
    pub async fn problem_items(
        &self,
        tenant: &str,
        scenario_id: &str,
        language: i32,
        range: (Micros, Micros),
        limit: i64,
    ) -> StoreResult<Vec<ProblemItem>> {
        dispatch!(
            self,
            problem_items(tenant, scenario_id, language, range, limit)
        )
    }

    /// See [`postgres::upsert_rule`].
    pub async fn upsert_rule(&self, tenant: &str, rule: &AlertRule) -> StoreResult<AlertRule> {
        dispatch!(self, upsert_rule(tenant, rule))
    }

    /// See [`postgres::list_rules`].
    pub async fn list_rules(
        &self,
        tenant: Option<&str>,
        scenario_id: &str,
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<(String, AlertRule)>> {
        dispatch!(self, list_rules(tenant, scenario_id, after, limit))
    }

    /// See [`postgres::enabled_rules`].
    pub async fn enabled_rules(
        &self,
        after: (&str, &str),
        limit: i64,
    ) -> StoreResult<Vec<(String, AlertRule)>> {
        dispatch!(self, enabled_rules(after, limit))
    }

    /// See [`postgres::list_alerts`].
    pub async fn list_alerts(
        &self,
        tenant: &str,
        filter: &AlertFilter,
    ) -> StoreResult<Vec<StoredAlert>> {
        dispatch!(self, list_alerts(tenant, filter))
    }

    /// See [`postgres::acknowledge`].
    pub async fn acknowledge(
        &self,
        tenant: &str,
        alert_id: &str,
        by: &str,
        comment: &str,
        at: Micros,
    ) -> StoreResult<Option<StoredAlert>> {
        dispatch!(self, acknowledge(tenant, alert_id, by, comment, at))
    }

    /// See [`postgres::standing`].
    pub async fn standing(
        &self,
        tenant: &str,
        rule_id: &str,
        scenario_id: &str,
    ) -> StoreResult<(Option<StoredAlert>, Option<Micros>)> {
        dispatch!(self, standing(tenant, rule_id, scenario_id))
    }

    /// See [`postgres::raise`].
    pub async fn raise(
        &self,
        tenant: &str,
        alert: &StoredAlert,
        event: &RawEvent,
        quiet_after: Micros,
    ) -> StoreResult<bool> {
        dispatch!(self, raise(tenant, alert, event, quiet_after))
    }

    /// See [`postgres::resolve`].
    pub async fn resolve(
        &self,
        tenant: &str,
        alert_id: &str,
        at: Micros,
        event: &RawEvent,
    ) -> StoreResult<bool> {
        dispatch!(self, resolve(tenant, alert_id, at, event))
    }

    /// See [`postgres::open_alert_scenarios`].
    pub async fn open_alert_scenarios(
        &self,
        tenant: &str,
        rule_id: &str,
    ) -> StoreResult<Vec<String>> {
        dispatch!(self, open_alert_scenarios(tenant, rule_id))
    }

    /// See [`postgres::orphaned_alerts`].
    pub async fn orphaned_alerts(
        &self,
        after: (&str, &str),
        limit: i64,
    ) -> StoreResult<Vec<(String, StoredAlert)>> {
        dispatch!(self, orphaned_alerts(after, limit))
    }

    /// See [`postgres::resolve_orphaned`].
    pub async fn resolve_orphaned(
        &self,
        tenant: &str,
        alert_id: &str,
        at: Micros,
        event: &RawEvent,
    ) -> StoreResult<bool> {
        dispatch!(self, resolve_orphaned(tenant, alert_id, at, event))
    }

    /// See [`postgres::active_scenarios`].
    pub async fn active_scenarios(
        &self,
        tenant: &str,
        range: (Micros, Micros),
    ) -> StoreResult<Vec<String>> {
        dispatch!(self, active_scenarios(tenant, range))
    }

    /// See [`postgres::window_values`].
    #[allow(clippy::too_many_arguments, reason = "mirrors the per-engine function")]
    pub async fn window_values(
        &self,
        tenant: &str,
        scenario_id: &str,
        metric: i32,
        range: (Micros, Micros),
        last_n: i64,
        bot_only: bool,
    ) -> StoreResult<WindowValues> {
        dispatch!(
            self,
            window_values(tenant, scenario_id, metric, range, last_n, bot_only)
        )
    }

    /// See [`postgres::tenants_with_rules`].
    pub async fn tenants_with_rules(&self) -> StoreResult<Vec<String>> {
        dispatch!(self, tenants_with_rules())
    }
}
