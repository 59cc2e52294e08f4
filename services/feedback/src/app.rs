//! Use cases: the domain rules orchestrated over the store and the outbox. Every function takes
//! the tenant and the current time from its caller, so tests drive time explicitly.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tandem_platform::bus::RawEvent;
use tandem_platform::error::{ErrorCode, ServiceError};
use tandem_platform::outbox::OutboxWaker;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::feedback::v1 as pb;

use crate::adapters::sql::{
    AlertFilter, Store, StoreError, Stored, StoredAlert, StoredReview, WindowValues,
};
use crate::domain::alert::{self, AlertRule, Decision, Observation, Standing};
use crate::domain::csv::{self, Header, RowProblem};
use crate::domain::fact::ConversationFact;
use crate::domain::feedback::{FeedbackInput, FeedbackRecord, Replay, compare};
use crate::domain::problems::{self, Cluster};
use crate::domain::query::{MetricRequest, Series, build_series, check_range};
use crate::domain::rollup::metric;
use crate::domain::{DAY, FieldError, Micros, describe};
use crate::metrics::{ALERTS_RAISED_TOTAL, ALERTS_RESOLVED_TOTAL, FEEDBACK_STORED_TOTAL};
use crate::writer::{EventMaker, FeedbackWriter, WriterOptions};

/// Failures of the feedback use cases.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    /// The request is invalid; the message names every field at fault.
    #[error("{0}")]
    InvalidArgument(String),
    /// Something addressed does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A different record exists under the same idempotency key.
    #[error("{0}")]
    AlreadyExists(String),
    /// The entity is not in a state that allows the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Storage failed.
    #[error("storage failed")]
    Store(#[from] StoreError),
    /// A background computation failed.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError for FeedbackError {
    fn code(&self) -> ErrorCode {
        match self {
            FeedbackError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            FeedbackError::NotFound(_) => ErrorCode::NotFound,
            FeedbackError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            FeedbackError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            FeedbackError::Store(e) if e.is_transient() => ErrorCode::Unavailable,
            FeedbackError::Store(_) | FeedbackError::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl FeedbackError {
    fn invalid(errors: &[FieldError]) -> Self {
        FeedbackError::InvalidArgument(describe(errors))
    }
}

/// Result of the feedback use cases.
pub type FeedbackResult<T> = Result<T, FeedbackError>;

/// Converts microseconds to a protobuf timestamp.
pub fn timestamp(at: Micros) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.div_euclid(1_000_000),
        nanos: i32::try_from(at.rem_euclid(1_000_000) * 1000).unwrap_or_default(),
    }
}

/// Converts a protobuf timestamp to microseconds; `None` when out of range.
pub fn micros(ts: &prost_types::Timestamp) -> Option<Micros> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    ts.seconds
        .checked_mul(1_000_000)?
        .checked_add(i64::from(ts.nanos / 1000))
}

/// Converts microseconds to a protobuf duration.
pub fn duration(us: Micros) -> prost_types::Duration {
    prost_types::Duration {
        seconds: us / 1_000_000,
        nanos: i32::try_from((us % 1_000_000) * 1000).unwrap_or_default(),
    }
}

fn utc(at: Micros) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at).unwrap_or_default()
}

/// The most rows an import may have.
pub const MAX_IMPORT_ROWS: usize = 50_000;
/// The largest import content.
pub const MAX_IMPORT_BYTES: usize = 8 * 1024 * 1024;
/// The most row errors an import response lists.
pub const MAX_ROW_ERRORS: usize = 1000;
/// Rows stored per transaction by an import.
const IMPORT_CHUNK: usize = 500;
/// The most complaints and failed turns clustered per range.
const PROBLEM_ITEMS: i64 = 20_000;

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Rows stored.
    pub imported: i64,
    /// Rows skipped as replays of stored feedback.
    pub duplicates: i64,
    /// Rows rejected.
    pub failed: i64,
    /// (row number, client id, field, message), at most [`MAX_ROW_ERRORS`].
    pub errors: Vec<(i64, String, String, String)>,
}

/// The feedback service's use cases.
#[derive(Clone)]
pub struct FeedbackApp {
    store: Store,
    outbox: OutboxWaker,
    cooldown: Duration,
    writer: FeedbackWriter,
    rule_page: i64,
}

/// Rules read per page by the evaluation loop.
pub const RULE_PAGE: i64 = 200;

impl FeedbackApp {
    /// Creates the use cases over a store; `outbox` is woken after commits that wrote events.
    /// Submitted feedback is stored by a writer task spawned on the current runtime with the
    /// default batching; it stops when the last clone of the app is dropped.
    pub fn new(store: Store, outbox: OutboxWaker, cooldown: Duration) -> Self {
        let (app, writer) = Self::with_writer(
            store,
            outbox,
            cooldown,
            WriterOptions::default(),
            tokio_util::sync::CancellationToken::new(),
        );
        tokio::spawn(writer);
        app
    }

    /// Creates the use cases and the task of their feedback writer, for the caller to spawn;
    /// the task stores what is queued and returns once `shutdown` is cancelled (or every clone
    /// of the app is dropped).
    pub fn with_writer(
        store: Store,
        outbox: OutboxWaker,
        cooldown: Duration,
        options: WriterOptions,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (writer, task) =
            FeedbackWriter::new(store.clone(), options, Self::event_maker(), shutdown);
        let wake = outbox.clone();
        let task = async move {
            task.await;
            wake.wake();
        };
        let app = Self {
            store,
            outbox,
            cooldown,
            writer,
            rule_page: RULE_PAGE,
        };
        (app, task)
    }

    /// Sets how many rules the evaluation loop reads per page (default [`RULE_PAGE`]).
    #[must_use]
    pub fn with_rule_page(mut self, size: i64) -> Self {
        self.rule_page = size.max(1);
        self
    }

    fn event_maker() -> Arc<EventMaker> {
        Arc::new(
            |tenant: &TenantId, record: &FeedbackRecord, fact: Option<&ConversationFact>| {
                Self::received_event(tenant, record, fact.filter(|f| f.seen()))
            },
        )
    }

    /// Returns the store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn received_event(
        tenant: &TenantId,
        record: &FeedbackRecord,
        context: Option<&ConversationFact>,
    ) -> RawEvent {
        let feedback = to_proto(record, context);
        let event = pb::FeedbackReceived {
            conversation_id: record.input.conversation_id.clone(),
            scenario_id: feedback
                .context
                .as_ref()
                .map(|c| c.scenario_id.clone())
                .unwrap_or_default(),
            item: Some(pb::feedback_received::Item::Feedback(feedback)),
            occurred_at: Some(timestamp(record.received_at)),
        };
        let key = (!record.input.conversation_id.is_empty())
            .then(|| record.input.conversation_id.clone());
        RawEvent::at(tenant, &event, key, utc(record.received_at))
    }

    async fn context(
        &self,
        tenant: &TenantId,
        conversation_id: &str,
    ) -> FeedbackResult<Option<ConversationFact>> {
        if conversation_id.is_empty() {
            return Ok(None);
        }
        Ok(self
            .store
            .conversation(tenant.as_str(), conversation_id)
            .await?
            .map(|s| s.conversation)
            .filter(ConversationFact::seen))
    }

    /// Records one piece of feedback. A replay with the same client id and content returns the
    /// stored record (`true` = duplicate); different content under that id is ALREADY_EXISTS.
    /// Feedback about a conversation not seen yet is accepted and attributed once its events
    /// arrive.
    pub async fn submit(
        &self,
        tenant: &TenantId,
        input: FeedbackInput,
        now: Micros,
    ) -> FeedbackResult<(pb::Feedback, bool)> {
        input
            .validate(now)
            .map_err(|errors| FeedbackError::invalid(&errors))?;
        let record = new_record(input, now);
        let input = record.input.clone();
        match self.writer.submit(tenant, record).await? {
            (Stored::New(record), context) => {
                self.outbox.wake();
                metrics::counter!(FEEDBACK_STORED_TOTAL, "kind" => record.score.kind(), "source" => "submit")
                    .increment(1);
                let context = context.filter(ConversationFact::seen);
                Ok((to_proto(&record, context.as_ref()), false))
            }
            (Stored::Existing(existing), _) => match compare(&existing, &input) {
                Replay::Same => {
                    let context = self
                        .context(tenant, &existing.input.conversation_id)
                        .await?;
                    Ok((to_proto(&existing, context.as_ref()), true))
                }
                Replay::Conflict => Err(FeedbackError::AlreadyExists(format!(
                    "feedback {:?} exists with different content",
                    input.client_feedback_id
                ))),
            },
        }
    }

    /// Imports CSV or JSON lines: bad rows are reported, good rows kept, replays skipped.
    pub async fn import(
        &self,
        tenant: &TenantId,
        format: i32,
        content: &str,
        default_channel: i32,
        dry_run: bool,
        now: Micros,
    ) -> FeedbackResult<ImportReport> {
        if content.len() > MAX_IMPORT_BYTES {
            return Err(FeedbackError::InvalidArgument(
                "content: larger than 8 MiB".into(),
            ));
        }
        if !(0..=crate::domain::feedback::MAX_CHANNEL).contains(&default_channel) {
            return Err(FeedbackError::InvalidArgument(format!(
                "default_channel: unknown channel {default_channel}"
            )));
        }
        let rows: Vec<(i64, Result<FeedbackInput, Vec<RowProblem>>)> = match format {
            1 => {
                let records = csv::parse_records(content)
                    .map_err(|e| FeedbackError::InvalidArgument(format!("content: {e}")))?;
                let Some((head, data)) = records.split_first() else {
                    return Err(FeedbackError::InvalidArgument(
                        "content: no header row".into(),
                    ));
                };
                let header = Header::parse(head)
                    .map_err(|e| FeedbackError::InvalidArgument(format!("content: {e}")))?;
                if data.len() > MAX_IMPORT_ROWS {
                    return Err(FeedbackError::InvalidArgument(
                        "content: more than 50000 rows".into(),
                    ));
                }
                data.iter()
                    .enumerate()
                    .map(|(i, row)| (i as i64 + 1, csv::read_row(&header, row, default_channel)))
                    .collect()
            }
            2 => {
                let lines: Vec<(usize, &str)> = content
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().is_empty())
                    .collect();
                if lines.len() > MAX_IMPORT_ROWS {
                    return Err(FeedbackError::InvalidArgument(
                        "content: more than 50000 rows".into(),
                    ));
                }
                lines
                    .into_iter()
                    .map(|(i, line)| (i as i64 + 1, csv::read_json_row(line, default_channel)))
                    .collect()
            }
            _ => {
                return Err(FeedbackError::InvalidArgument(
                    "format: give FEEDBACK_FORMAT_CSV or FEEDBACK_FORMAT_JSONL".into(),
                ));
            }
        };
        let mut report = ImportReport::default();
        let fail = |report: &mut ImportReport, row: i64, id: &str, field: &str, message: String| {
            report.failed += 1;
            if report.errors.len() < MAX_ROW_ERRORS {
                report.errors.push((
                    row,
                    id.to_owned(),
                    field.to_owned(),
                    crate::domain::truncate_chars(&message, 500),
                ));
            }
        };
        let mut valid = Vec::new();
        for (row, parsed) in rows {
            match parsed {
                Err(problems) => {
                    let field = problems
                        .first()
                        .map(|p| p.field.clone())
                        .unwrap_or_default();
                    let message = problems
                        .iter()
                        .map(|p| format!("{}: {}", p.field, p.message))
                        .collect::<Vec<_>>()
                        .join("; ");
                    fail(&mut report, row, "", &field, message);
                }
                Ok(input) => match input.validate(now) {
                    Err(errors) => {
                        let field = errors
                            .first()
                            .map(|e| e.field.trim_start_matches("feedback.").to_owned())
                            .unwrap_or_default();
                        fail(
                            &mut report,
                            row,
                            &input.client_feedback_id,
                            &field,
                            describe(&errors),
                        );
                    }
                    Ok(()) => valid.push((row, input)),
                },
            }
        }
        if dry_run {
            report.imported = valid.len() as i64;
            return Ok(report);
        }
        let event = |_: usize, record: &FeedbackRecord, fact: Option<&ConversationFact>| {
            Self::received_event(tenant, record, fact.filter(|f| f.seen()))
        };
        for chunk in valid.chunks(IMPORT_CHUNK) {
            let records: Vec<FeedbackRecord> = chunk
                .iter()
                .map(|(_, input)| new_record(input.clone(), now))
                .collect();
            let groups = [(tenant.as_str().to_owned(), records)];
            let stored = self
                .store
                .insert_feedback_groups(&groups, &event)
                .await?
                .into_iter()
                .flatten();
            for ((row, input), (outcome, _)) in chunk.iter().zip(stored) {
                match outcome {
                    Stored::New(record) => {
                        report.imported += 1;
                        metrics::counter!(FEEDBACK_STORED_TOTAL, "kind" => record.score.kind(), "source" => "import")
                            .increment(1);
                    }
                    Stored::Existing(existing) => match compare(&existing, input) {
                        Replay::Same => report.duplicates += 1,
                        Replay::Conflict => fail(
                            &mut report,
                            *row,
                            &input.client_feedback_id,
                            "client_feedback_id",
                            "a different feedback exists under this client_feedback_id".into(),
                        ),
                    },
                }
            }
        }
        if report.imported > 0 {
            self.outbox.wake();
        }
        Ok(report)
    }

    /// Records an agent's review of bot output; the agent comes from the token and the
    /// scenario from the conversation's facts.
    pub async fn review(
        &self,
        tenant: &TenantId,
        agent_id: &str,
        review: pb::AgentReview,
        now: Micros,
    ) -> FeedbackResult<pb::AgentReview> {
        let mut errors = Vec::new();
        if review.conversation_id.is_empty() {
            errors.push(FieldError::new("review.conversation_id", "is required"));
        } else if crate::domain::chars(&review.conversation_id) > 128 {
            errors.push(FieldError::new(
                "review.conversation_id",
                "is longer than 128 characters",
            ));
        }
        let (message_id, suggestion_id) = match &review.target {
            Some(pb::agent_review::Target::MessageId(id)) if !id.is_empty() => {
                (id.clone(), String::new())
            }
            Some(pb::agent_review::Target::SuggestionId(id)) if !id.is_empty() => {
                (String::new(), id.clone())
            }
            _ => {
                errors.push(FieldError::new(
                    "review.target",
                    "give the message_id or the suggestion_id reviewed",
                ));
                (String::new(), String::new())
            }
        };
        if !(1..=4).contains(&review.verdict) {
            errors.push(FieldError::new(
                "review.verdict",
                format!("unknown verdict {}", review.verdict),
            ));
        }
        if crate::domain::chars(&review.comment) > 2000 {
            errors.push(FieldError::new(
                "review.comment",
                "is longer than 2000 characters",
            ));
        }
        if crate::domain::chars(&review.corrected_answer) > 4000 {
            errors.push(FieldError::new(
                "review.corrected_answer",
                "is longer than 4000 characters",
            ));
        }
        if !errors.is_empty() {
            return Err(FeedbackError::invalid(&errors));
        }
        let scenario_id = self
            .context(tenant, &review.conversation_id)
            .await?
            .map(|c| c.scenario_id.value)
            .unwrap_or_default();
        let stored = StoredReview {
            id: uuid::Uuid::now_v7().to_string(),
            agent_id: agent_id.to_owned(),
            conversation_id: review.conversation_id.clone(),
            message_id,
            suggestion_id,
            verdict: review.verdict,
            comment: review.comment.clone(),
            corrected_answer: review.corrected_answer.clone(),
            scenario_id: scenario_id.clone(),
            created_at: now,
        };
        let out = pb::AgentReview {
            id: stored.id.clone(),
            agent_id: stored.agent_id.clone(),
            scenario_id,
            created_at: Some(timestamp(now)),
            articles: Vec::new(),
            ..review
        };
        let event = pb::FeedbackReceived {
            conversation_id: out.conversation_id.clone(),
            scenario_id: out.scenario_id.clone(),
            item: Some(pb::feedback_received::Item::AgentReview(out.clone())),
            occurred_at: Some(timestamp(now)),
        };
        let event = RawEvent::at(tenant, &event, Some(out.conversation_id.clone()), utc(now));
        self.store
            .insert_review(tenant.as_str(), &stored, &event)
            .await?;
        self.outbox.wake();
        Ok(out)
    }

    /// Computes metric series from the rollups.
    pub async fn metrics(
        &self,
        tenant: &TenantId,
        request: &MetricRequest,
        now: Micros,
    ) -> FeedbackResult<Vec<Series>> {
        let query = request
            .validate(now)
            .map_err(|errors| FeedbackError::invalid(&errors))?;
        let (rows, hist) = self.store.metrics(tenant.as_str(), &query).await?;
        build_series(&query, &rows, &hist).map_err(|n| {
            FeedbackError::InvalidArgument(format!(
                "the query yields {n} series, more than 1000: filter more or group by less"
            ))
        })
    }

    /// Returns the most common problems of a scenario (or all) in a range.
    pub async fn top_problems(
        &self,
        tenant: &TenantId,
        scenario_id: &str,
        range: (Option<Micros>, Option<Micros>),
        language: i32,
        limit: i32,
        now: Micros,
    ) -> FeedbackResult<Vec<Cluster>> {
        let mut errors = Vec::new();
        let limit = match limit {
            0 => 10,
            1..=50 => limit,
            _ => {
                errors.push(FieldError::new("limit", "must be 0..50"));
                10
            }
        };
        if !(0..=2).contains(&language) {
            errors.push(FieldError::new(
                "language",
                format!("unknown language {language}"),
            ));
        }
        let (start, end) = match range {
            (None, None) => (Some(now - 7 * DAY), Some(now)),
            other => other,
        };
        let checked = check_range("range", start, end, now, 400 * DAY, &mut errors);
        let (Some((from, to)), true) = (checked, errors.is_empty()) else {
            return Err(FeedbackError::invalid(&errors));
        };
        let current = self
            .store
            .problem_items(
                tenant.as_str(),
                scenario_id,
                language,
                (from, to),
                PROBLEM_ITEMS,
            )
            .await?;
        let previous = self
            .store
            .problem_items(
                tenant.as_str(),
                scenario_id,
                language,
                (from - (to - from), from),
                PROBLEM_ITEMS,
            )
            .await?;
        let limit = usize::try_from(limit).unwrap_or(10);
        tokio::task::spawn_blocking(move || problems::cluster(&current, &previous, limit))
            .await
            .map_err(|e| FeedbackError::Internal(e.to_string()))
    }

    /// Creates or replaces an alert rule.
    pub async fn upsert_rule(
        &self,
        tenant: &TenantId,
        mut rule: AlertRule,
        now: Micros,
    ) -> FeedbackResult<AlertRule> {
        if rule.id.is_empty() {
            rule.id = uuid::Uuid::now_v7().to_string();
        } else if crate::domain::chars(&rule.id) > 128 {
            return Err(FeedbackError::InvalidArgument(
                "rule.id: is longer than 128 characters".into(),
            ));
        }
        rule.validate()
            .map_err(|errors| FeedbackError::invalid(&errors))?;
        rule.created_at = now;
        rule.updated_at = now;
        Ok(self.store.upsert_rule(tenant.as_str(), &rule).await?)
    }

    /// Lists rules of a tenant after `after` (a rule id).
    pub async fn list_rules(
        &self,
        tenant: &TenantId,
        scenario_id: &str,
        after: &str,
        limit: i64,
    ) -> FeedbackResult<Vec<AlertRule>> {
        Ok(self
            .store
            .list_rules(Some(tenant.as_str()), scenario_id, after, limit)
            .await?
            .into_iter()
            .map(|(_, rule)| rule)
            .collect())
    }

    /// Lists alerts, newest first.
    pub async fn list_alerts(
        &self,
        tenant: &TenantId,
        filter: &AlertFilter,
    ) -> FeedbackResult<Vec<StoredAlert>> {
        Ok(self.store.list_alerts(tenant.as_str(), filter).await?)
    }

    /// Acknowledges a firing alert.
    pub async fn acknowledge(
        &self,
        tenant: &TenantId,
        alert_id: &str,
        by: &str,
        comment: &str,
        now: Micros,
    ) -> FeedbackResult<StoredAlert> {
        let mut errors = Vec::new();
        if alert_id.is_empty() {
            errors.push(FieldError::new("alert_id", "is required"));
        }
        if crate::domain::chars(comment) > 1000 {
            errors.push(FieldError::new("comment", "is longer than 1000 characters"));
        }
        if !errors.is_empty() {
            return Err(FeedbackError::invalid(&errors));
        }
        let alert = self
            .store
            .acknowledge(tenant.as_str(), alert_id, by, comment, now)
            .await?
            .ok_or_else(|| FeedbackError::NotFound(format!("alert {alert_id:?} not found")))?;
        if alert.status == alert::status::RESOLVED {
            return Err(FeedbackError::FailedPrecondition(format!(
                "alert {alert_id:?} is resolved"
            )));
        }
        Ok(alert)
    }

    /// Evaluates every enabled rule of every tenant once, after resolving the open alerts no
    /// enabled rule evaluates any more; returns the alerts raised and resolved.
    pub async fn evaluate_alerts(&self, now: Micros) -> FeedbackResult<(usize, usize)> {
        let mut raised = 0;
        let mut resolved = self.resolve_orphaned_alerts(now).await?;
        // Rule ids are unique per tenant only: the cursor is (id, tenant).
        let mut after = (String::new(), String::new());
        loop {
            let page = self
                .store
                .enabled_rules((&after.0, &after.1), self.rule_page)
                .await?;
            let Some((tenant, last)) = page.last() else {
                break;
            };
            after = (last.id.clone(), tenant.clone());
            for (tenant, rule) in &page {
                let Ok(tenant) = TenantId::new(tenant.clone()) else {
                    continue;
                };
                let (r, s) = self.evaluate_rule(&tenant, rule, now).await?;
                raised += r;
                resolved += s;
            }
        }
        if raised + resolved > 0 {
            self.outbox.wake();
        }
        Ok((raised, resolved))
    }

    /// Resolves the open alerts that no enabled rule evaluates any more (their rule was
    /// deleted, disabled or re-scoped to another scenario), each with its `AlertResolved`
    /// event; there is no measurement, so the event carries [`alert::NO_MEASUREMENT`]. Returns
    /// how many resolved.
    async fn resolve_orphaned_alerts(&self, now: Micros) -> FeedbackResult<usize> {
        let mut resolved = 0;
        let mut after = (String::new(), String::new());
        loop {
            let page = self
                .store
                .orphaned_alerts((&after.0, &after.1), self.rule_page)
                .await?;
            let Some((tenant, last)) = page.last() else {
                break;
            };
            after = (tenant.clone(), last.id.clone());
            for (tenant, open) in &page {
                let Ok(tenant) = TenantId::new(tenant.clone()) else {
                    continue;
                };
                let event = pb::AlertResolved {
                    alert_id: open.id.clone(),
                    rule_id: open.rule_id.clone(),
                    kind: open.kind,
                    scenario_id: open.scenario_id.clone(),
                    metric: open.metric,
                    observed_value: alert::NO_MEASUREMENT,
                    fired_for: Some(duration((now - open.raised_at).max(0))),
                    occurred_at: Some(timestamp(now)),
                };
                let event = RawEvent::at(&tenant, &event, Some(open.scenario_id.clone()), utc(now));
                if self
                    .store
                    .resolve_orphaned(tenant.as_str(), &open.id, now, &event)
                    .await?
                {
                    tracing::info!(
                        rule = %open.rule_id,
                        scenario = %open.scenario_id,
                        "alert resolved: its rule no longer evaluates it"
                    );
                    metrics::counter!(ALERTS_RESOLVED_TOTAL).increment(1);
                    resolved += 1;
                }
            }
        }
        Ok(resolved)
    }

    async fn evaluate_rule(
        &self,
        tenant: &TenantId,
        rule: &AlertRule,
        now: Micros,
    ) -> FeedbackResult<(usize, usize)> {
        let window = (now - rule.window, now);
        let scenarios = if rule.scenario_id.is_empty() {
            // The active scenarios, and those with an open alert: a scenario gone quiet still
            // has its alert evaluated, and resolved once its window has no data.
            let mut scenarios = self.store.active_scenarios(tenant.as_str(), window).await?;
            scenarios.extend(
                self.store
                    .open_alert_scenarios(tenant.as_str(), &rule.id)
                    .await?,
            );
            scenarios.sort();
            scenarios.dedup();
            scenarios
        } else {
            vec![rule.scenario_id.clone()]
        };
        let (mut raised, mut resolved) = (0, 0);
        for scenario in scenarios {
            let observation = self.observe(tenant, rule, &scenario, now).await?;
            let (open, last_resolved_at) = self
                .store
                .standing(tenant.as_str(), &rule.id, &scenario)
                .await?;
            let standing = Standing {
                open: open.is_some(),
                last_resolved_at,
            };
            let cooldown = i64::try_from(self.cooldown.as_micros()).unwrap_or(i64::MAX);
            match alert::evaluate(rule, &scenario, observation, standing, now, cooldown) {
                Decision::Keep => {}
                Decision::Raise {
                    observed,
                    baseline,
                    explanation,
                } => {
                    let stored = StoredAlert {
                        id: uuid::Uuid::now_v7().to_string(),
                        rule_id: rule.id.clone(),
                        kind: rule.kind,
                        scenario_id: scenario.clone(),
                        metric: rule.metric,
                        observed,
                        threshold: rule.threshold,
                        baseline,
                        window: rule.window,
                        severity: rule.severity,
                        status: alert::status::FIRING,
                        explanation,
                        raised_at: now,
                        acknowledged_at: None,
                        acknowledged_by: String::new(),
                        resolved_at: None,
                    };
                    let event = pb::AlertRaised {
                        alert_id: stored.id.clone(),
                        rule_id: rule.id.clone(),
                        kind: rule.kind,
                        scenario_id: scenario.clone(),
                        metric: rule.metric,
                        observed_value: observed,
                        threshold: rule.threshold,
                        baseline,
                        window: Some(duration(rule.window)),
                        severity: rule.severity,
                        explanation: stored.explanation.clone(),
                        occurred_at: Some(timestamp(now)),
                    };
                    let event = RawEvent::at(tenant, &event, Some(scenario.clone()), utc(now));
                    let quiet_after = now.saturating_sub(cooldown);
                    if self
                        .store
                        .raise(tenant.as_str(), &stored, &event, quiet_after)
                        .await?
                    {
                        tracing::info!(rule = %rule.id, scenario = %scenario, observed, "alert raised");
                        metrics::counter!(ALERTS_RAISED_TOTAL, "kind" => rule.kind.to_string())
                            .increment(1);
                        raised += 1;
                    }
                }
                Decision::Resolve { observed } => {
                    let Some(open) = open else {
                        continue;
                    };
                    let event = pb::AlertResolved {
                        alert_id: open.id.clone(),
                        rule_id: rule.id.clone(),
                        kind: rule.kind,
                        scenario_id: scenario.clone(),
                        metric: rule.metric,
                        observed_value: observed,
                        fired_for: Some(duration((now - open.raised_at).max(0))),
                        occurred_at: Some(timestamp(now)),
                    };
                    let event = RawEvent::at(tenant, &event, Some(scenario.clone()), utc(now));
                    if self
                        .store
                        .resolve(tenant.as_str(), &open.id, now, &event)
                        .await?
                    {
                        tracing::info!(rule = %rule.id, scenario = %scenario, observed, "alert resolved");
                        metrics::counter!(ALERTS_RESOLVED_TOTAL).increment(1);
                        resolved += 1;
                    }
                }
            }
        }
        Ok((raised, resolved))
    }

    async fn observe(
        &self,
        tenant: &TenantId,
        rule: &AlertRule,
        scenario: &str,
        now: Micros,
    ) -> FeedbackResult<Option<Observation>> {
        let bot_only = rule.kind == alert::kind::BOT_CSAT_BELOW_TARGET;
        let measure = |values: WindowValues| -> Option<(f64, i64)> {
            if metric::is_duration(rule.metric) {
                let mut durations = values.durations;
                alert::raw_quantile(&mut durations, 0.95).map(|v| (v / 1e6, values.samples))
            } else if values.samples > 0 {
                Some((values.hits as f64 / values.samples as f64, values.samples))
            } else {
                None
            }
        };
        let window = (now - rule.window, now);
        let current = self
            .store
            .window_values(
                tenant.as_str(),
                scenario,
                rule.metric,
                window,
                rule.min_samples.max(1),
                bot_only,
            )
            .await?;
        let Some((value, samples)) = measure(current) else {
            return Ok(None);
        };
        let baseline = if rule.uses_baseline() {
            let range = (now - rule.window - rule.baseline_window, now - rule.window);
            let values = self
                .store
                .window_values(
                    tenant.as_str(),
                    scenario,
                    rule.metric,
                    range,
                    1_000_000,
                    bot_only,
                )
                .await?;
            measure(values)
        } else {
            None
        };
        Ok(Some(Observation {
            value,
            samples,
            baseline,
        }))
    }
}

fn new_record(input: FeedbackInput, now: Micros) -> FeedbackRecord {
    let language = input.effective_language();
    FeedbackRecord {
        id: uuid::Uuid::now_v7().to_string(),
        score: input
            .score
            .unwrap_or(crate::domain::feedback::Score::Thumbs(0)),
        language,
        received_at: now,
        input,
    }
}

/// Converts a stored record to the wire, with its resolved context when known.
pub fn to_proto(record: &FeedbackRecord, context: Option<&ConversationFact>) -> pb::Feedback {
    use crate::domain::feedback::Score;
    let score = Some(match record.score {
        Score::Csat(v) => pb::feedback::Score::Csat(v),
        Score::Nps(v) => pb::feedback::Score::Nps(v),
        Score::Ces(v) => pb::feedback::Score::Ces(v),
        Score::Thumbs(v) => pb::feedback::Score::Thumbs(v),
    });
    let context = context.map(|c| pb::ResolvedContext {
        scenario_id: c.scenario_id.value.clone(),
        intent: c.intent.value.clone(),
        handler_kind: c.handler(),
        agent_id: c.first_assignment.value.0.clone(),
        team: c.first_assignment.value.1.clone(),
        handoff_reason: c.first_handoff_reason.value,
    });
    pb::Feedback {
        id: record.id.clone(),
        client_feedback_id: record.input.client_feedback_id.clone(),
        conversation_id: record.input.conversation_id.clone(),
        channel: record.input.channel,
        subject: record.input.subject,
        score,
        comment: record.input.comment.clone(),
        language: record.language,
        question_id: record.input.question_id.clone(),
        submitted_at: record.input.submitted_at.map(timestamp),
        received_at: Some(timestamp(record.received_at)),
        context,
    }
}
