//! Persistence of the dialog service on PostgreSQL or SQLite.
//!
//! Every state change goes through [`Store::commit`]: one transaction that checks and bumps the
//! conversation's revision (optimistic concurrency), records the idempotency key of the request,
//! writes messages, traces, suggestions, handoffs and the outbox events, and claims the inbox
//! entry of the event that caused it. Nothing is half written: a conflict rolls everything back.
//!
//! Bodies are encoded protobuf messages. The SQL is written once and expanded per engine by
//! `on_db!` / `in_tx!`; placeholders are `$n`, which both engines accept.

use prost::Message as _;
use tandem_platform::bus::RawEvent;
use tandem_platform::db::Db;
use tandem_platform::{in_tx, on_db};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::dialog::v1 as pb;
use tandem_proto::pb::policy::v1 as policy;
use tandem_proto::pb::routing::v1 as routing;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The conversation changed since it was read, the request was recorded concurrently, or
    /// the suggestion was reviewed concurrently.
    #[error("the conversation changed concurrently")]
    Conflict,
    /// A stored body does not decode.
    #[error("stored {0} does not decode")]
    Corrupt(&'static str, #[source] prost::DecodeError),
    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

/// Everything one state change writes.
#[derive(Debug, Default)]
pub struct Change {
    /// A conversation to create; the change fails with `Conflict` when its idempotency key is
    /// taken.
    pub create: Option<pb::Conversation>,
    /// A conversation to update, with the revision it was read at.
    pub update: Option<(pb::Conversation, i64)>,
    /// `(conversation, kind, client id, response)` recorded for idempotent replays.
    pub request: Option<(String, &'static str, String, Vec<u8>)>,
    /// Messages to append.
    pub messages: Vec<pb::Message>,
    /// Decision traces.
    pub traces: Vec<pb::DecisionTrace>,
    /// Suggestions to insert, or to replace while the stored one has no review; replacing a
    /// reviewed suggestion fails the change with `Conflict`.
    pub suggestions: Vec<pb::Suggestion>,
    /// Handoff packages.
    pub handoffs: Vec<pb::HandoffPackage>,
    /// Scenarios from `PolicyUpdated` events: `(scenario, version, deleted)`.
    pub policies: Vec<(policy::Scenario, i64, bool)>,
    /// Queue statistics from `QueueStatsReported` events; an older measurement than the one
    /// stored is ignored.
    pub queue_stats: Vec<routing::QueueStatsReported>,
    /// Events for the outbox.
    pub events: Vec<RawEvent>,
    /// `(consumer, event id)` to claim; the change is skipped when already claimed.
    pub claim: Option<(String, String)>,
}

/// The result of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Written.
    Applied,
    /// The claimed event was handled before; nothing written.
    Duplicate,
}

/// A stored model version.
#[derive(Debug, Clone)]
pub struct StoredModel {
    /// The version record.
    pub version: pb::ModelVersion,
    /// The serialised classifier.
    pub bytes: Vec<u8>,
}

/// A conversation as a new request finds it ([`Store::conversation_for_request`]).
#[derive(Debug)]
pub struct ConversationForRequest {
    /// The conversation.
    pub conversation: pb::Conversation,
    /// Its revision, for the optimistic update.
    pub revision: i64,
    /// The response recorded for an earlier request with the same client id.
    pub response: Option<Vec<u8>>,
}

/// Dialog persistence.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
}

/// Microseconds since the Unix epoch of a protobuf timestamp.
pub fn timestamp_micros(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos) / 1_000)
}

/// The last activity of a conversation (its last message or state change), in microseconds
/// since the Unix epoch: what the idle sweep compares.
fn activity_micros(c: &pb::Conversation) -> i64 {
    c.updated_at
        .as_ref()
        .or(c.created_at.as_ref())
        .map_or(0, timestamp_micros)
}

fn decode<M: prost::Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt(what, e))
}

/// Decodes rows read newest first, returning them oldest first.
fn oldest_first<M: prost::Message + Default>(
    what: &'static str,
    rows: &[Vec<u8>],
) -> Result<Vec<M>, StoreError> {
    rows.iter().rev().map(|b| decode(what, b)).collect()
}

/// Decodes a stored model version; its status is the one of the row's `active` column, which
/// the unique index keeps to one version per tenant (a body written before the index existed
/// may say ACTIVE for a version that is not).
fn decode_model(body: &[u8], active: bool) -> Result<pb::ModelVersion, StoreError> {
    let mut version: pb::ModelVersion = decode("model", body)?;
    version.status = if active {
        pb::ModelStatus::Active as i32
    } else {
        pb::ModelStatus::Inactive as i32
    };
    Ok(version)
}

/// The first statement of a transaction that writes a tenant's model versions: it serialises
/// them per tenant. On PostgreSQL a transaction-scoped advisory lock on the tenant; on SQLite a
/// write that changes nothing, which takes the database's write lock at the start (waiting up to
/// the busy timeout) rather than upgrading a read transaction later, which fails at once when
/// another write came in between. `$1` is the tenant.
fn model_lock(postgres: bool) -> &'static str {
    if postgres {
        "SELECT pg_advisory_xact_lock(hashtextextended('dialog_models/' || $1, 0))"
    } else {
        "UPDATE dialog_models SET active = active WHERE tenant = $1 AND 1 = 0"
    }
}

/// Attempts of a model write before a unique violation (a concurrent write of the tenant took
/// the version number or the active version) fails it with `Conflict`.
const MODEL_WRITE_ATTEMPTS: usize = 3;

/// Runs `write` again while it fails on a unique index; `Conflict` when every attempt does.
/// Writes under [`model_lock`] do not collide; this covers writers that do not take it.
async fn retry_unique<T, F, Fut>(mut write: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    for _ in 0..MODEL_WRITE_ATTEMPTS {
        match write().await {
            Err(StoreError::Database(sqlx::Error::Database(e))) if e.is_unique_violation() => {}
            other => return other,
        }
    }
    Err(StoreError::Conflict)
}

impl Store {
    /// Wraps a migrated database.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Returns a conversation and its revision.
    pub async fn conversation(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<(pb::Conversation, i64)>, StoreError> {
        let row: Option<(Vec<u8>, i64)> = on_db!(&self.db, pool => sqlx::query_as(
            "SELECT body, revision FROM dialog_conversations WHERE tenant = $1 AND id = $2")
            .bind(tenant.as_str()).bind(id).fetch_optional(pool).await?);
        row.map(|(body, revision)| Ok((decode("conversation", &body)?, revision)))
            .transpose()
    }

    /// Returns the conversation started with an idempotency key.
    pub async fn conversation_by_client_id(
        &self,
        tenant: &TenantId,
        client_id: &str,
    ) -> Result<Option<pb::Conversation>, StoreError> {
        let row: Option<Vec<u8>> = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT body FROM dialog_conversations WHERE tenant = $1 AND client_conversation_id = $2")
            .bind(tenant.as_str()).bind(client_id).fetch_optional(pool).await?);
        row.map(|b| decode("conversation", &b)).transpose()
    }

    /// Counts the customer's conversations started at or after `since_micros` (microseconds
    /// since the Unix epoch).
    pub async fn conversations_since(
        &self,
        tenant: &TenantId,
        customer_id: &str,
        since_micros: i64,
    ) -> Result<i64, StoreError> {
        let n: i64 = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM dialog_conversations WHERE tenant = $1 AND customer_id = $2 \
             AND created_micros >= $3")
            .bind(tenant.as_str()).bind(customer_id).bind(since_micros).fetch_one(pool).await?);
        Ok(n)
    }

    /// Returns a conversation with its revision and, in the same statement, the recorded
    /// response of an earlier request with this client id (a retry), if any: what a new
    /// message needs before its turn, in one round trip. `None` when the conversation does not
    /// exist.
    pub async fn conversation_for_request(
        &self,
        tenant: &TenantId,
        conversation_id: &str,
        kind: &str,
        client_id: &str,
    ) -> Result<Option<ConversationForRequest>, StoreError> {
        let row: Option<(Vec<u8>, i64, Option<Vec<u8>>)> = on_db!(&self.db, pool => sqlx::query_as(
            "SELECT c.body, c.revision, (SELECT r.response FROM dialog_requests r \
             WHERE r.tenant = $1 AND r.conversation_id = $2 AND r.kind = $3 \
             AND r.client_message_id = $4) \
             FROM dialog_conversations c WHERE c.tenant = $1 AND c.id = $2")
            .bind(tenant.as_str()).bind(conversation_id).bind(kind).bind(client_id)
            .fetch_optional(pool).await?);
        row.map(|(body, revision, response)| {
            Ok(ConversationForRequest {
                conversation: decode("conversation", &body)?,
                revision,
                response,
            })
        })
        .transpose()
    }

    /// Returns the recorded response of an earlier request.
    pub async fn request(
        &self,
        tenant: &TenantId,
        conversation_id: &str,
        kind: &str,
        client_id: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<Vec<u8>> = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT response FROM dialog_requests WHERE tenant = $1 AND conversation_id = $2 \
             AND kind = $3 AND client_message_id = $4")
            .bind(tenant.as_str()).bind(conversation_id).bind(kind).bind(client_id)
            .fetch_optional(pool).await?);
        Ok(row)
    }

    /// Deletes up to `limit` request records (the responses kept for idempotent retries)
    /// created before `before_micros` (microseconds since the Unix epoch), oldest first;
    /// returns how many. A retry of a deleted request counts as a new request.
    pub async fn prune_requests(&self, before_micros: i64, limit: i64) -> Result<u64, StoreError> {
        let deleted = on_db!(&self.db, pool => sqlx::query(
            "DELETE FROM dialog_requests \
             WHERE (tenant, conversation_id, kind, client_message_id) IN \
             (SELECT tenant, conversation_id, kind, client_message_id FROM dialog_requests \
              WHERE created_micros < $1 ORDER BY created_micros LIMIT $2)")
            .bind(before_micros).bind(limit).execute(pool).await?.rows_affected());
        Ok(deleted)
    }

    /// Deletes up to `limit` conversations closed before `before_micros` (µs since the Unix
    /// epoch; a closed conversation's last activity is its closing), oldest first, with their
    /// messages, decision traces, suggestions, handoff packages and request records, in one
    /// transaction; returns how many conversations. Conversations in any other state stay.
    pub async fn prune_closed(&self, before_micros: i64, limit: i64) -> Result<u64, StoreError> {
        /// The batch, the same in every statement of the transaction: a conversation closed
        /// meanwhile has a later activity than the cut-off, and a closed one never changes.
        macro_rules! delete_from {
            ($table:literal, $key:literal) => {
                concat!(
                    "DELETE FROM ",
                    $table,
                    " WHERE (tenant, ",
                    $key,
                    ") IN (SELECT tenant, id FROM dialog_conversations WHERE state = $1 \
                     AND updated_micros < $2 ORDER BY updated_micros, tenant, id LIMIT $3)"
                )
            };
        }
        const STATEMENTS: [&str; 6] = [
            delete_from!("dialog_messages", "conversation_id"),
            delete_from!("dialog_traces", "conversation_id"),
            delete_from!("dialog_suggestions", "conversation_id"),
            delete_from!("dialog_handoffs", "conversation_id"),
            delete_from!("dialog_requests", "conversation_id"),
            delete_from!("dialog_conversations", "id"),
        ];
        let closed = pb::ConversationState::Closed as i32;
        let deleted = on_db!(&self.db, pool => {
            let mut tx = pool.begin().await?;
            let mut conversations = 0;
            for sql in STATEMENTS {
                conversations = sqlx::query(sql)
                    .bind(closed).bind(before_micros).bind(limit)
                    .execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            conversations
        });
        Ok(deleted)
    }

    /// Returns up to `limit` messages after `after_sequence`, in order.
    pub async fn messages(
        &self,
        tenant: &TenantId,
        conversation_id: &str,
        after_sequence: i64,
        limit: i64,
    ) -> Result<Vec<pb::Message>, StoreError> {
        let rows: Vec<Vec<u8>> = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT body FROM dialog_messages WHERE tenant = $1 AND conversation_id = $2 \
             AND sequence > $3 ORDER BY sequence LIMIT $4")
            .bind(tenant.as_str()).bind(conversation_id).bind(after_sequence).bind(limit)
            .fetch_all(pool).await?);
        rows.iter().map(|b| decode("message", b)).collect()
    }

    /// Returns the last `count` messages, oldest first.
    pub async fn last_messages(
        &self,
        tenant: &TenantId,
        conversation_id: &str,
        count: i64,
    ) -> Result<Vec<pb::Message>, StoreError> {
        let rows: Vec<Vec<u8>> = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT body FROM dialog_messages WHERE tenant = $1 AND conversation_id = $2 \
             ORDER BY sequence DESC LIMIT $3")
            .bind(tenant.as_str()).bind(conversation_id).bind(count)
            .fetch_all(pool).await?);
        oldest_first("message", &rows)
    }

    /// Returns `(tenant, id)` of up to `limit` conversations of any tenant in one of `states`
    /// whose last activity is before `before_micros` (microseconds since the Unix epoch), least
    /// recently active first.
    pub async fn idle_conversations(
        &self,
        states: &[pb::ConversationState],
        before_micros: i64,
        limit: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut out = Vec::new();
        for state in states {
            let rows: Vec<(String, String)> = on_db!(&self.db, pool => sqlx::query_as(
                "SELECT tenant, id FROM dialog_conversations WHERE state = $1 \
                 AND updated_micros < $2 ORDER BY updated_micros LIMIT $3")
                .bind(*state as i32).bind(before_micros).bind(limit).fetch_all(pool).await?);
            out.extend(rows);
        }
        Ok(out)
    }

    /// Returns a conversation's decision traces from `offset`, in turn order.
    pub async fn traces(
        &self,
        tenant: &TenantId,
        conversation_id: &str,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<pb::DecisionTrace>, StoreError> {
        let rows: Vec<Vec<u8>> = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT body FROM dialog_traces WHERE tenant = $1 AND conversation_id = $2 \
             ORDER BY turn_index LIMIT $3 OFFSET $4")
            .bind(tenant.as_str()).bind(conversation_id).bind(limit).bind(offset)
            .fetch_all(pool).await?);
        rows.iter().map(|b| decode("trace", b)).collect()
    }

    /// Returns a conversation's last `limit` decision traces, in turn order: what a turn reads
    /// of the conversation's past, so its cost does not grow with the conversation.
    pub async fn recent_traces(
        &self,
        tenant: &TenantId,
        conversation_id: &str,
        limit: i64,
    ) -> Result<Vec<pb::DecisionTrace>, StoreError> {
        let rows: Vec<Vec<u8>> = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT body FROM dialog_traces WHERE tenant = $1 AND conversation_id = $2 \
             ORDER BY turn_index DESC LIMIT $3")
            .bind(tenant.as_str()).bind(conversation_id).bind(limit)
            .fetch_all(pool).await?);
        oldest_first("trace", &rows)
    }

    /// Returns one trace by its id or by the customer message it answered.
    pub async fn trace(
        &self,
        tenant: &TenantId,
        id: Option<&str>,
        message_id: Option<&str>,
    ) -> Result<Option<pb::DecisionTrace>, StoreError> {
        let row: Option<Vec<u8>> = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT body FROM dialog_traces WHERE tenant = $1 AND (id = $2 OR message_id = $3) \
             ORDER BY turn_index LIMIT 1")
            .bind(tenant.as_str()).bind(id.unwrap_or("")).bind(message_id.unwrap_or(""))
            .fetch_optional(pool).await?);
        row.map(|b| decode("trace", &b)).transpose()
    }

    /// Returns a suggestion.
    pub async fn suggestion(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<pb::Suggestion>, StoreError> {
        let row: Option<Vec<u8>> = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT body FROM dialog_suggestions WHERE tenant = $1 AND id = $2")
            .bind(tenant.as_str()).bind(id).fetch_optional(pool).await?);
        row.map(|b| decode("suggestion", &b)).transpose()
    }

    /// Returns a handoff package.
    pub async fn handoff(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<pb::HandoffPackage>, StoreError> {
        let row: Option<Vec<u8>> = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT body FROM dialog_handoffs WHERE tenant = $1 AND id = $2")
            .bind(tenant.as_str()).bind(id).fetch_optional(pool).await?);
        row.map(|b| decode("handoff", &b)).transpose()
    }

    /// Returns the tenant's live scenarios as last received from the policy service.
    pub async fn policies(&self, tenant: &TenantId) -> Result<Vec<policy::Scenario>, StoreError> {
        let rows: Vec<Vec<u8>> = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT body FROM dialog_policies WHERE tenant = $1 AND NOT deleted ORDER BY scenario_id")
            .bind(tenant.as_str()).fetch_all(pool).await?);
        rows.iter().map(|b| decode("scenario", b)).collect()
    }

    /// Returns the last statistics reported of each of the tenant's queues.
    pub async fn queue_stats(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<routing::QueueStatsReported>, StoreError> {
        let rows: Vec<Vec<u8>> = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT body FROM dialog_queue_stats WHERE tenant = $1 ORDER BY queue_id")
            .bind(tenant.as_str()).fetch_all(pool).await?);
        rows.iter().map(|b| decode("queue statistics", b)).collect()
    }

    /// Adds examples (and intent answers); returns `(accepted, duplicates, total for scenario)`.
    pub async fn add_examples(
        &self,
        tenant: &TenantId,
        scenario_id: &str,
        replace: bool,
        examples: &[(String, String, String)],
        answers: &[(String, i32, String)],
    ) -> Result<(i32, i32, i64), StoreError> {
        let t = tenant.as_str();
        let mut accepted = 0_i32;
        let mut duplicates = 0_i32;
        on_db!(&self.db, pool => {
            let mut tx = pool.begin().await?;
            if replace {
                sqlx::query("DELETE FROM dialog_examples WHERE tenant = $1 AND scenario_id = $2")
                    .bind(t).bind(scenario_id).execute(&mut *tx).await?;
            }
            for (scenario, text, intent) in examples {
                let done = sqlx::query(
                    "INSERT INTO dialog_examples (tenant, scenario_id, text, intent) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                    .bind(t).bind(scenario).bind(text).bind(intent).execute(&mut *tx).await?;
                if done.rows_affected() == 1 { accepted += 1 } else { duplicates += 1 }
            }
            for (intent, language, answer) in answers {
                sqlx::query(
                    "INSERT INTO dialog_answers (tenant, intent, language, answer) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (tenant, intent, language) \
                     DO UPDATE SET answer = excluded.answer")
                    .bind(t).bind(intent).bind(language).bind(answer).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        let total: i64 = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM dialog_examples WHERE tenant = $1 AND scenario_id = $2")
            .bind(t).bind(scenario_id).fetch_one(pool).await?);
        Ok((accepted, duplicates, total))
    }

    /// Returns `(text, intent)` examples of the given scenarios (all when empty), in a stable order.
    pub async fn examples(
        &self,
        tenant: &TenantId,
        scenarios: &[String],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let rows: Vec<(String, String, String)> = on_db!(&self.db, pool => sqlx::query_as(
            "SELECT scenario_id, text, intent FROM dialog_examples WHERE tenant = $1 \
             ORDER BY scenario_id, intent, text")
            .bind(tenant.as_str()).fetch_all(pool).await?);
        let mut out = Vec::with_capacity(rows.len());
        for (scenario, text, intent) in rows {
            if scenarios.is_empty() || scenarios.contains(&scenario) {
                out.push((text, intent));
            }
        }
        Ok(out)
    }

    /// Returns the stored answer of an intent in a language, or in any language.
    pub async fn answer(
        &self,
        tenant: &TenantId,
        intent: &str,
        language: i32,
    ) -> Result<Option<String>, StoreError> {
        let row: Option<String> = on_db!(&self.db, pool => sqlx::query_scalar(
            "SELECT answer FROM dialog_answers WHERE tenant = $1 AND intent = $2 \
             ORDER BY CASE WHEN language = $3 THEN 0 ELSE 1 END, language LIMIT 1")
            .bind(tenant.as_str()).bind(intent).bind(language).fetch_optional(pool).await?);
        Ok(row)
    }

    /// Stores a new model version; its number is the next one of the tenant. Concurrent
    /// insertions of a tenant take their numbers one after another; `Conflict` when one keeps
    /// colliding with others on the number.
    pub async fn insert_model(
        &self,
        tenant: &TenantId,
        mut version: pb::ModelVersion,
        bytes: &[u8],
    ) -> Result<pb::ModelVersion, StoreError> {
        version.status = pb::ModelStatus::Inactive as i32;
        retry_unique(|| self.try_insert_model(tenant, version.clone(), bytes)).await
    }

    async fn try_insert_model(
        &self,
        tenant: &TenantId,
        mut version: pb::ModelVersion,
        bytes: &[u8],
    ) -> Result<pb::ModelVersion, StoreError> {
        let t = tenant.as_str();
        in_tx!(&self.db, tx, _enqueue, _claim, pg => {
            sqlx::query(model_lock(pg)).bind(t).execute(&mut *tx).await?;
            let next: i64 = sqlx::query_scalar(
                "SELECT CAST(COALESCE(MAX(version), 0) + 1 AS BIGINT) FROM dialog_models WHERE tenant = $1")
                .bind(t).fetch_one(&mut *tx).await?;
            version.version = i32::try_from(next).unwrap_or(i32::MAX);
            sqlx::query(
                "INSERT INTO dialog_models (tenant, id, version, active, body, model) \
                 VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(t).bind(&version.id).bind(version.version).bind(false)
                .bind(version.encode_to_vec()).bind(bytes).execute(&mut *tx).await?;
        });
        Ok(version)
    }

    /// Makes a version the active one and every other version of the tenant inactive; returns
    /// it and the previously active id (its own when it was active already, empty when none
    /// was). The event is written in the same transaction. Concurrent activations of a tenant
    /// apply one after another; `Conflict` when one keeps colliding with others.
    pub async fn activate_model(
        &self,
        tenant: &TenantId,
        id: &str,
        activated_at: prost_types::Timestamp,
        event: impl Fn(&pb::ModelVersion, &str) -> RawEvent,
    ) -> Result<Option<(pb::ModelVersion, String)>, StoreError> {
        retry_unique(|| self.try_activate_model(tenant, id, activated_at, &event)).await
    }

    async fn try_activate_model(
        &self,
        tenant: &TenantId,
        id: &str,
        activated_at: prost_types::Timestamp,
        event: &impl Fn(&pb::ModelVersion, &str) -> RawEvent,
    ) -> Result<Option<(pb::ModelVersion, String)>, StoreError> {
        let t = tenant.as_str();
        Ok(in_tx!(&self.db, tx, enqueue, _claim, pg => {
            sqlx::query(model_lock(pg)).bind(t).execute(&mut *tx).await?;
            let row: Option<(Vec<u8>, bool)> = sqlx::query_as(
                "SELECT body, active FROM dialog_models WHERE tenant = $1 AND id = $2")
                .bind(t).bind(id).fetch_optional(&mut *tx).await?;
            match row {
                None => None,
                Some((body, was_active)) => {
                    let mut version: pb::ModelVersion = decode("model", &body)?;
                    // Every other active version, in one statement: the unique index allows
                    // one, but rows written before it existed may hold more.
                    let others: Vec<(String, Vec<u8>)> = sqlx::query_as(
                        "UPDATE dialog_models SET active = $1 \
                         WHERE tenant = $2 AND active AND id <> $3 RETURNING id, body")
                        .bind(false).bind(t).bind(id).fetch_all(&mut *tx).await?;
                    for (other, body) in &others {
                        let mut old: pb::ModelVersion = decode("model", body)?;
                        old.status = pb::ModelStatus::Inactive as i32;
                        sqlx::query("UPDATE dialog_models SET body = $1 WHERE tenant = $2 AND id = $3")
                            .bind(old.encode_to_vec()).bind(t).bind(other)
                            .execute(&mut *tx).await?;
                    }
                    version.status = pb::ModelStatus::Active as i32;
                    version.activated_at = Some(activated_at);
                    sqlx::query("UPDATE dialog_models SET active = $1, body = $2 \
                                 WHERE tenant = $3 AND id = $4")
                        .bind(true).bind(version.encode_to_vec()).bind(t).bind(id)
                        .execute(&mut *tx).await?;
                    let previous = match others.into_iter().next() {
                        Some((other, _)) => other,
                        None if was_active => id.to_owned(),
                        None => String::new(),
                    };
                    enqueue(&mut tx, &[event(&version, &previous)]).await?;
                    Some((version, previous))
                }
            }
        }))
    }

    /// Returns a model version with its bytes.
    pub async fn model(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<StoredModel>, StoreError> {
        let row: Option<(Vec<u8>, bool, Vec<u8>)> = on_db!(&self.db, pool => sqlx::query_as(
            "SELECT body, active, model FROM dialog_models WHERE tenant = $1 AND id = $2")
            .bind(tenant.as_str()).bind(id).fetch_optional(pool).await?);
        row.map(|(body, active, bytes)| {
            Ok(StoredModel {
                version: decode_model(&body, active)?,
                bytes,
            })
        })
        .transpose()
    }

    /// Returns the active model of a tenant with its bytes.
    pub async fn active_model(&self, tenant: &TenantId) -> Result<Option<StoredModel>, StoreError> {
        let row: Option<(Vec<u8>, Vec<u8>)> = on_db!(&self.db, pool => sqlx::query_as(
            "SELECT body, model FROM dialog_models WHERE tenant = $1 AND active")
            .bind(tenant.as_str()).fetch_optional(pool).await?);
        row.map(|(body, bytes)| {
            Ok(StoredModel {
                version: decode_model(&body, true)?,
                bytes,
            })
        })
        .transpose()
    }

    /// Lists model versions, newest first.
    pub async fn models(
        &self,
        tenant: &TenantId,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<pb::ModelVersion>, StoreError> {
        let rows: Vec<(Vec<u8>, bool)> = on_db!(&self.db, pool => sqlx::query_as(
            "SELECT body, active FROM dialog_models WHERE tenant = $1 ORDER BY version DESC \
             LIMIT $2 OFFSET $3")
            .bind(tenant.as_str()).bind(limit).bind(offset).fetch_all(pool).await?);
        rows.iter()
            .map(|(b, active)| decode_model(b, *active))
            .collect()
    }

    /// Writes a change in one transaction.
    pub async fn commit(&self, tenant: &TenantId, change: Change) -> Result<Committed, StoreError> {
        let t = tenant.as_str();
        Ok(in_tx!(&self.db, tx, enqueue, claim => {
            if let Some((consumer, event_id)) = &change.claim
                && !claim(&mut tx, consumer, event_id).await?
            {
                return Ok(Committed::Duplicate);
            }
            if let Some(c) = &change.create {
                let customer = c.customer.as_ref().map_or("", |x| x.id.as_str());
                let done = sqlx::query(
                    "INSERT INTO dialog_conversations \
                     (tenant, id, client_conversation_id, state, revision, body, customer_id, \
                      created_micros, updated_micros) \
                     VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8) ON CONFLICT DO NOTHING")
                    .bind(t).bind(&c.id).bind(&c.client_conversation_id).bind(c.state)
                    .bind(c.encode_to_vec()).bind(customer)
                    .bind(c.created_at.as_ref().map_or(0, timestamp_micros))
                    .bind(activity_micros(c))
                    .execute(&mut *tx).await?;
                if done.rows_affected() != 1 {
                    return Err(StoreError::Conflict);
                }
            }
            if let Some((c, revision)) = &change.update {
                let done = sqlx::query(
                    "UPDATE dialog_conversations SET state = $1, revision = revision + 1, body = $2, \
                     updated_micros = $3 WHERE tenant = $4 AND id = $5 AND revision = $6")
                    .bind(c.state).bind(c.encode_to_vec()).bind(activity_micros(c)).bind(t)
                    .bind(&c.id).bind(*revision)
                    .execute(&mut *tx).await?;
                if done.rows_affected() != 1 {
                    return Err(StoreError::Conflict);
                }
            }
            if let Some((conversation, kind, client_id, response)) = &change.request {
                let done = sqlx::query(
                    "INSERT INTO dialog_requests \
                     (tenant, conversation_id, kind, client_message_id, response, created_micros) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING")
                    .bind(t).bind(conversation).bind(*kind).bind(client_id).bind(response)
                    .bind(tandem_platform::db::now_micros())
                    .execute(&mut *tx).await?;
                if done.rows_affected() != 1 {
                    return Err(StoreError::Conflict);
                }
            }
            if !change.messages.is_empty() {
                // One statement for all of a turn's messages (the customer's and the bot's).
                let mut insert = sqlx::QueryBuilder::new(
                    "INSERT INTO dialog_messages (tenant, conversation_id, sequence, id, body) ");
                insert.push_values(&change.messages, |mut row, m| {
                    row.push_bind(t).push_bind(&m.conversation_id).push_bind(m.sequence)
                        .push_bind(&m.id).push_bind(m.encode_to_vec());
                });
                insert.build().execute(&mut *tx).await?;
            }
            for tr in &change.traces {
                sqlx::query(
                    "INSERT INTO dialog_traces \
                     (tenant, id, conversation_id, message_id, turn_index, body) \
                     VALUES ($1, $2, $3, $4, $5, $6)")
                    .bind(t).bind(&tr.id).bind(&tr.conversation_id).bind(&tr.message_id)
                    .bind(tr.turn_index).bind(tr.encode_to_vec()).execute(&mut *tx).await?;
            }
            for s in &change.suggestions {
                // A reviewed suggestion is final: writing it again (a second review) fails.
                let done = sqlx::query(
                    "INSERT INTO dialog_suggestions (tenant, id, conversation_id, body, reviewed) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, id) DO UPDATE \
                     SET body = excluded.body, reviewed = excluded.reviewed \
                     WHERE NOT dialog_suggestions.reviewed")
                    .bind(t).bind(&s.id).bind(&s.conversation_id).bind(s.encode_to_vec())
                    .bind(s.review.is_some()).execute(&mut *tx).await?;
                if done.rows_affected() != 1 {
                    return Err(StoreError::Conflict);
                }
            }
            for h in &change.handoffs {
                sqlx::query(
                    "INSERT INTO dialog_handoffs (tenant, id, conversation_id, body) \
                     VALUES ($1, $2, $3, $4)")
                    .bind(t).bind(&h.handoff_id).bind(&h.conversation_id).bind(h.encode_to_vec())
                    .execute(&mut *tx).await?;
            }
            for (s, version, deleted) in &change.policies {
                sqlx::query(
                    "INSERT INTO dialog_policies (tenant, scenario_id, version, deleted, body) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, scenario_id) DO UPDATE \
                     SET version = excluded.version, deleted = excluded.deleted, body = excluded.body \
                     WHERE dialog_policies.version < excluded.version")
                    .bind(t).bind(&s.id).bind(*version).bind(*deleted).bind(s.encode_to_vec())
                    .execute(&mut *tx).await?;
            }
            for q in &change.queue_stats {
                let measured = q.occurred_at.as_ref().map_or(0, timestamp_micros);
                sqlx::query(
                    "INSERT INTO dialog_queue_stats (tenant, queue_id, measured_micros, body) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (tenant, queue_id) DO UPDATE \
                     SET measured_micros = excluded.measured_micros, body = excluded.body \
                     WHERE dialog_queue_stats.measured_micros < excluded.measured_micros")
                    .bind(t).bind(&q.queue_id).bind(measured).bind(q.encode_to_vec())
                    .execute(&mut *tx).await?;
            }
            if !change.events.is_empty() {
                enqueue(&mut tx, &change.events).await?;
            }
            Committed::Applied
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::borrow::Cow;

    use super::*;

    /// A database error: a unique violation or another one.
    #[derive(Debug, thiserror::Error)]
    #[error("test database error")]
    struct Failure {
        unique: bool,
    }

    impl sqlx::error::DatabaseError for Failure {
        fn message(&self) -> &str {
            "test database error"
        }

        fn code(&self) -> Option<Cow<'_, str>> {
            None
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> sqlx::error::ErrorKind {
            if self.unique {
                sqlx::error::ErrorKind::UniqueViolation
            } else {
                sqlx::error::ErrorKind::CheckViolation
            }
        }
    }

    fn failure(unique: bool) -> StoreError {
        StoreError::Database(sqlx::Error::Database(Box::new(Failure { unique })))
    }

    #[tokio::test]
    async fn unique_violations_are_tried_again_then_conflict() {
        let mut calls = 0;
        let out = retry_unique(|| {
            calls += 1;
            let n = calls;
            async move {
                if n < MODEL_WRITE_ATTEMPTS {
                    Err(failure(true))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(out.unwrap(), MODEL_WRITE_ATTEMPTS);

        let mut calls = 0;
        let out: Result<(), _> = retry_unique(|| {
            calls += 1;
            async { Err(failure(true)) }
        })
        .await;
        assert!(matches!(out, Err(StoreError::Conflict)), "{out:?}");
        assert_eq!(calls, MODEL_WRITE_ATTEMPTS);

        let mut calls = 0;
        let out: Result<(), _> = retry_unique(|| {
            calls += 1;
            async { Err(failure(false)) }
        })
        .await;
        assert!(matches!(out, Err(StoreError::Database(_))), "{out:?}");
        assert_eq!(calls, 1);
    }
}
