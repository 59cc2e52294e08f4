//! The in-process bus of the standalone mode.
//!
//! It mirrors the JetStream semantics the services rely on, so the same contract suite passes on
//! both adapters: one stream per context, publishes de-duplicated by event id within a window,
//! durable consumers whose state outlives the consumer handle (a consumer that is dropped with
//! unacknowledged deliveries gets them again after the ack wait, as a crashed replica would),
//! `max_ack_pending`, naks with a delay, redelivery backoff and a delivery limit.
//!
//! [`MemoryBus::open`] keeps a journal in a SQLite file: a publish returns only once its events
//! are on disk, and acknowledgements are recorded shortly after. When the process restarts, the
//! journal is read back and every event a durable consumer had not acknowledged is delivered
//! again, so a crash of the standalone process loses no event that left an outbox. (A lost
//! acknowledgement only causes a redelivery, which the consumers' inbox absorbs.)
//! [`MemoryBus::new`] is the same bus without a journal. Messages are kept for
//! [`Retention::max_age`] (and at most a million per stream); set it from the bus configuration
//! with [`MemoryBus::set_retention`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::str::FromStr as _;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row as _, SqlitePool};

use tandem_proto::events::STREAMS;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Acker, BusError, ConsumerSpec, Delivery, RawEvent, subject_matches};

/// Messages kept per stream before the oldest are dropped.
const MAX_MESSAGES_PER_STREAM: usize = 1_000_000;

/// The in-process bus; clones share one broker.
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    notify: Notify,
    journal: Option<SqlitePool>,
    /// Serialises journaled publishes so sequence numbers reach the disk, and then the consumers,
    /// in order.
    publishing: tokio::sync::Mutex<()>,
}

/// How long the streams keep messages and remember ids for de-duplication, as `bus.max_age` and
/// `bus.duplicate_window` do for JetStream.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Messages older than this are dropped.
    pub max_age: Duration,
    /// A message id seen within this window is dropped as a duplicate.
    pub duplicate_window: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        let defaults = crate::config::BusConfig::default();
        Self {
            max_age: defaults.max_age,
            duplicate_window: defaults.duplicate_window,
        }
    }
}

#[derive(Default)]
struct State {
    retention: Retention,
    streams: HashMap<&'static str, StreamState>,
    consumers: HashMap<String, ConsumerState>,
    /// Acknowledgements read from the journal, claimed by a durable when it reconnects.
    restored_acks: HashMap<String, BTreeSet<u64>>,
    /// Acknowledgements not yet written to the journal: (durable, stream, seq).
    unsaved_acks: Vec<(String, &'static str, u64)>,
    /// Sequence numbers dropped from memory and to be dropped from the journal, per stream.
    trimmed_below: HashMap<&'static str, u64>,
}

struct StreamState {
    name: &'static str,
    subjects: &'static str,
    messages: BTreeMap<u64, Arc<RawEvent>>,
    /// When each message was stored (milliseconds since the epoch), in sequence order.
    stored_at: VecDeque<(u64, i64)>,
    next_seq: u64,
    seen: HashMap<String, Instant>,
    seen_order: VecDeque<(Instant, String)>,
    duplicate_window: Duration,
}

impl State {
    fn apply(&mut self, retention: Retention) {
        self.retention = retention;
        for stream in self.streams.values_mut() {
            stream.duplicate_window = retention.duplicate_window;
        }
        self.trim(now_millis());
    }

    /// Drops the messages past the age or count limit, and records the trim for the journal.
    fn trim(&mut self, now_ms: i64) {
        let max_age_ms = i64::try_from(self.retention.max_age.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms.saturating_sub(max_age_ms);
        for stream in self.streams.values_mut() {
            let mut trimmed = false;
            while let Some(&(seq, at)) = stream.stored_at.front() {
                if at >= cutoff && stream.messages.len() <= MAX_MESSAGES_PER_STREAM {
                    break;
                }
                stream.stored_at.pop_front();
                stream.messages.remove(&seq);
                trimmed = true;
            }
            if trimmed {
                let below = stream
                    .messages
                    .first_key_value()
                    .map_or(stream.next_seq, |(seq, _)| *seq);
                self.trimmed_below.insert(stream.name, below);
            }
        }
    }
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

struct Pending {
    due: Instant,
    deliveries: u64,
}

struct ConsumerState {
    stream: &'static str,
    filters: Vec<String>,
    cursor: u64,
    /// Sequences at or after the cursor acknowledged before a restart.
    acked_ahead: BTreeSet<u64>,
    pending: BTreeMap<u64, Pending>,
    max_ack_pending: usize,
    ack_wait: Duration,
    max_deliver: u64,
    backoff: Vec<Duration>,
}

impl ConsumerState {
    fn wait_after(&self, deliveries: u64) -> Duration {
        usize::try_from(deliveries.saturating_sub(1))
            .ok()
            .and_then(|i| self.backoff.get(i).copied())
            .unwrap_or(self.ack_wait)
    }
}

impl MemoryBus {
    /// Creates an empty bus without a journal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens a bus journaled in the SQLite file at `path`, restoring its events and the
    /// acknowledgements of its durable consumers.
    pub async fn open(path: &Path) -> Result<Self, BusError> {
        let journal_error =
            |e: sqlx::Error| BusError::Unavailable(format!("bus journal {}: {e}", path.display()));
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(journal_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(journal_error)?;
        for statement in JOURNAL_SCHEMA {
            sqlx::query(*statement)
                .execute(&pool)
                .await
                .map_err(journal_error)?;
        }
        // Journals written before messages carried their store time: theirs count from now.
        let has_stored_at: bool = sqlx::query_scalar(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('bus_log') WHERE name = 'stored_at'",
        )
        .fetch_one(&pool)
        .await
        .map_err(journal_error)?;
        if !has_stored_at {
            sqlx::query("ALTER TABLE bus_log ADD COLUMN stored_at INTEGER NOT NULL DEFAULT 0")
                .execute(&pool)
                .await
                .map_err(journal_error)?;
        }
        let bus = Self {
            inner: Arc::new(Inner {
                journal: Some(pool.clone()),
                ..Inner::default()
            }),
        };
        bus.ensure_streams();
        let rows = sqlx::query(
            "SELECT stream, seq, event_id, subject, type_name, tenant, ordering_key, occurred_at, headers, payload, stored_at \
             FROM bus_log ORDER BY stream, seq",
        )
        .fetch_all(&pool)
        .await
        .map_err(journal_error)?;
        let acks = sqlx::query("SELECT durable, seq FROM bus_acks")
            .fetch_all(&pool)
            .await
            .map_err(journal_error)?;
        {
            let mut state = bus.lock();
            let now = Instant::now();
            let loaded_at = now_millis();
            for row in rows {
                let stream_name: String = row.try_get("stream").map_err(journal_error)?;
                let Some(stream) = state.streams.values_mut().find(|s| *s.name == *stream_name)
                else {
                    continue;
                };
                let seq = u64::try_from(row.try_get::<i64, _>("seq").map_err(journal_error)?)
                    .unwrap_or(0);
                let event = event_from_row(&row)
                    .map_err(|e| BusError::Malformed(format!("bus journal: {e}")))?;
                let stored_at: i64 = row.try_get("stored_at").map_err(journal_error)?;
                stream.seen.insert(event.id.clone(), now);
                stream.seen_order.push_back((now, event.id.clone()));
                stream.next_seq = stream.next_seq.max(seq + 1);
                stream.messages.insert(seq, Arc::new(event));
                stream
                    .stored_at
                    .push_back((seq, if stored_at > 0 { stored_at } else { loaded_at }));
            }
            for row in acks {
                let durable: String = row.try_get("durable").map_err(journal_error)?;
                let seq = u64::try_from(row.try_get::<i64, _>("seq").map_err(journal_error)?)
                    .unwrap_or(0);
                state.restored_acks.entry(durable).or_default().insert(seq);
            }
            state.trim(loaded_at);
        }
        tokio::spawn(flush_acks_periodically(Arc::downgrade(&bus.inner)));
        Ok(bus)
    }

    /// Writes pending acknowledgements and trims to the journal.
    pub async fn flush(&self) -> Result<(), BusError> {
        flush(&self.inner).await
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates every stream of the catalogue (idempotent).
    pub fn ensure_streams(&self) {
        let mut state = self.lock();
        for spec in STREAMS {
            state
                .streams
                .entry(spec.name)
                .or_insert_with(|| StreamState {
                    name: spec.name,
                    subjects: spec.subjects,
                    messages: BTreeMap::new(),
                    stored_at: VecDeque::new(),
                    next_seq: 1,
                    seen: HashMap::new(),
                    seen_order: VecDeque::new(),
                    duplicate_window: Retention::default().duplicate_window,
                });
        }
        let retention = state.retention;
        state.apply(retention);
    }

    /// Sets how long messages and de-duplication ids are kept (from `bus.max_age` and
    /// `bus.duplicate_window`); older messages go at once, from memory and from the journal.
    pub fn set_retention(&self, retention: Retention) {
        self.lock().apply(retention);
    }

    /// Stores events in order; an id seen within the window is dropped. With a journal, returns
    /// once the events are on disk.
    pub async fn publish_batch(&self, events: &[RawEvent]) -> Result<(), BusError> {
        let _serial = self.inner.publishing.lock().await;
        let now = Instant::now();
        // Decide which events are new and number them, without making them visible yet.
        let accepted: Vec<(&'static str, u64, &RawEvent)> = {
            let mut state = self.lock();
            let mut next: HashMap<&'static str, u64> = HashMap::new();
            let mut batch_ids = std::collections::HashSet::new();
            let mut accepted = Vec::with_capacity(events.len());
            for event in events {
                let stream = state
                    .streams
                    .values_mut()
                    .find(|s| subject_matches(s.subjects, &event.subject))
                    .ok_or_else(|| {
                        BusError::Unavailable(format!("no stream captures {}", event.subject))
                    })?;
                while let Some((at, _)) = stream.seen_order.front() {
                    if now.duration_since(*at) <= stream.duplicate_window {
                        break;
                    }
                    if let Some((_, id)) = stream.seen_order.pop_front() {
                        stream.seen.remove(&id);
                    }
                }
                if stream.seen.contains_key(&event.id) || !batch_ids.insert(event.id.as_str()) {
                    continue;
                }
                let seq = next.entry(stream.name).or_insert(stream.next_seq);
                accepted.push((stream.name, *seq, event));
                *seq += 1;
            }
            accepted
        };
        if accepted.is_empty() {
            return Ok(());
        }
        let stored_at = now_millis();
        if let Some(journal) = &self.inner.journal {
            write_events(journal, &accepted, stored_at)
                .await
                .map_err(|e| BusError::Unavailable(format!("bus journal: {e}")))?;
        }
        {
            let mut state = self.lock();
            for (name, seq, event) in &accepted {
                let Some(stream) = state.streams.get_mut(name) else {
                    continue;
                };
                stream.seen.insert(event.id.clone(), now);
                stream.seen_order.push_back((now, event.id.clone()));
                stream.next_seq = stream.next_seq.max(seq + 1);
                stream.messages.insert(*seq, Arc::new((*event).clone()));
                stream.stored_at.push_back((*seq, stored_at));
            }
            state.trim(stored_at);
        }
        self.inner.notify.notify_waiters();
        Ok(())
    }

    /// Opens a durable consumer; an existing durable keeps its position and pending deliveries.
    pub fn consumer(&self, spec: &ConsumerSpec) -> Result<MemoryConsumer, BusError> {
        let mut state = self.lock();
        if !state.streams.contains_key(spec.stream.name) {
            return Err(BusError::InvalidSubscription(format!(
                "stream {} does not exist",
                spec.stream.name
            )));
        }
        let restored = state
            .restored_acks
            .remove(&spec.durable)
            .unwrap_or_default();
        let consumer = state
            .consumers
            .entry(spec.durable.clone())
            .or_insert_with(|| ConsumerState {
                stream: spec.stream.name,
                filters: Vec::new(),
                cursor: 1,
                acked_ahead: restored,
                pending: BTreeMap::new(),
                max_ack_pending: 1,
                ack_wait: spec.ack_wait,
                max_deliver: 1,
                backoff: Vec::new(),
            });
        if consumer.stream != spec.stream.name {
            return Err(BusError::InvalidSubscription(format!(
                "durable {} reads another stream",
                spec.durable
            )));
        }
        consumer.filters.clone_from(&spec.filter_subjects);
        consumer.max_ack_pending = usize::try_from(spec.max_ack_pending).unwrap_or(1).max(1);
        consumer.ack_wait = spec.ack_wait;
        consumer.max_deliver = u64::try_from(spec.max_deliver).unwrap_or(1).max(1);
        consumer.backoff.clone_from(&spec.backoff);
        Ok(MemoryConsumer {
            bus: self.clone(),
            durable: spec.durable.clone(),
        })
    }

    fn settle(&self, durable: &str, seq: u64, outcome: Settle) {
        {
            let mut state = self.lock();
            let journaled = self.inner.journal.is_some();
            let State {
                consumers,
                unsaved_acks,
                ..
            } = &mut *state;
            let Some(consumer) = consumers.get_mut(durable) else {
                return;
            };
            match outcome {
                Settle::Ack | Settle::Term => {
                    if consumer.pending.remove(&seq).is_some() && journaled {
                        unsaved_acks.push((durable.to_owned(), consumer.stream, seq));
                    }
                }
                Settle::Nak(delay) => {
                    if let Some(pending) = consumer.pending.get_mut(&seq) {
                        pending.due = Instant::now() + delay;
                    }
                }
                Settle::Progress => {
                    let wait = consumer
                        .pending
                        .get(&seq)
                        .map(|pending| consumer.wait_after(pending.deliveries));
                    if let (Some(pending), Some(wait)) = (consumer.pending.get_mut(&seq), wait) {
                        pending.due = Instant::now() + wait;
                    }
                }
            }
        }
        self.inner.notify.notify_waiters();
    }

    /// Returns how many events a durable has not yet acknowledged or received (for tests and
    /// health reporting).
    pub fn backlog(&self, durable: &str) -> usize {
        let state = self.lock();
        let Some(consumer) = state.consumers.get(durable) else {
            return 0;
        };
        let Some(stream) = state.streams.get(consumer.stream) else {
            return 0;
        };
        let unseen = stream
            .messages
            .range(consumer.cursor..)
            .filter(|(seq, m)| {
                !consumer.acked_ahead.contains(seq)
                    && consumer
                        .filters
                        .iter()
                        .any(|f| subject_matches(f, &m.subject))
            })
            .count();
        unseen + consumer.pending.len()
    }
}

enum Settle {
    Ack,
    Nak(Duration),
    Progress,
    Term,
}

#[allow(clippy::large_enum_variant, reason = "short-lived return value")]
enum Next {
    Deliver(Delivery),
    Wait(Option<Instant>),
}

/// A handle on a durable consumer of the in-process bus.
pub struct MemoryConsumer {
    bus: MemoryBus,
    durable: String,
}

impl MemoryConsumer {
    /// Waits for the next delivery: a redelivery that is due, else the next matching event.
    pub async fn next(&mut self) -> Result<Delivery, BusError> {
        loop {
            let notified = self.bus.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.poll_once()? {
                Next::Deliver(delivery) => return Ok(delivery),
                Next::Wait(Some(due)) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(due) => {}
                    }
                }
                Next::Wait(None) => notified.await,
            }
        }
    }

    fn poll_once(&self) -> Result<Next, BusError> {
        let now = Instant::now();
        let mut state = self.bus.lock();
        let State {
            streams, consumers, ..
        } = &mut *state;
        let consumer = consumers.get_mut(&self.durable).ok_or(BusError::Closed)?;
        let stream = streams.get(consumer.stream).ok_or(BusError::Closed)?;

        // Redeliveries first, oldest sequence first, as JetStream does.
        let due: Vec<u64> = consumer
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in due {
            let Some(message) = stream.messages.get(&seq) else {
                consumer.pending.remove(&seq);
                continue;
            };
            let deliveries = consumer.pending.get(&seq).map_or(0, |p| p.deliveries);
            if deliveries >= consumer.max_deliver {
                tracing::warn!(durable = %self.durable, event_id = %message.id, deliveries, "delivery limit reached, event dropped");
                consumer.pending.remove(&seq);
                continue;
            }
            let wait = consumer.wait_after(deliveries + 1);
            if let Some(pending) = consumer.pending.get_mut(&seq) {
                pending.deliveries += 1;
                pending.due = now + wait;
            }
            return Ok(Next::Deliver(self.delivery(message, seq, deliveries + 1)));
        }

        if consumer.pending.len() < consumer.max_ack_pending {
            let first = stream
                .messages
                .first_key_value()
                .map_or(consumer.cursor, |(seq, _)| *seq);
            let start = consumer.cursor.max(first);
            let acked_ahead = &consumer.acked_ahead;
            let found = stream
                .messages
                .range(start..)
                .find(|(seq, m)| {
                    !acked_ahead.contains(seq)
                        && consumer
                            .filters
                            .iter()
                            .any(|f| subject_matches(f, &m.subject))
                })
                .map(|(seq, m)| (*seq, Arc::clone(m)));
            match found {
                Some((seq, message)) => {
                    consumer.cursor = seq + 1;
                    consumer.acked_ahead = consumer.acked_ahead.split_off(&consumer.cursor);
                    let wait = consumer.wait_after(1);
                    consumer.pending.insert(
                        seq,
                        Pending {
                            due: now + wait,
                            deliveries: 1,
                        },
                    );
                    return Ok(Next::Deliver(self.delivery(&message, seq, 1)));
                }
                None => {
                    consumer.cursor = stream.next_seq.max(start);
                    consumer.acked_ahead.clear();
                }
            }
        }
        Ok(Next::Wait(consumer.pending.values().map(|p| p.due).min()))
    }

    fn delivery(&self, message: &RawEvent, seq: u64, attempt: u64) -> Delivery {
        Delivery {
            event: message.clone(),
            attempt,
            acker: Acker::Memory(MemoryAcker {
                bus: self.bus.clone(),
                durable: self.durable.clone(),
                seq,
            }),
        }
    }
}

/// Settles one delivery of the in-process bus.
pub struct MemoryAcker {
    bus: MemoryBus,
    durable: String,
    seq: u64,
}

impl MemoryAcker {
    pub(super) fn ack(self) {
        self.bus.settle(&self.durable, self.seq, Settle::Ack);
    }

    pub(super) fn nak(self, delay: Duration) {
        self.bus.settle(&self.durable, self.seq, Settle::Nak(delay));
    }

    pub(super) fn progress(&self) {
        self.bus.settle(&self.durable, self.seq, Settle::Progress);
    }

    pub(super) fn term(self) {
        self.bus.settle(&self.durable, self.seq, Settle::Term);
    }
}

const JOURNAL_SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS bus_log (\
        stream TEXT NOT NULL, seq INTEGER NOT NULL, event_id TEXT NOT NULL, subject TEXT NOT NULL, \
        type_name TEXT NOT NULL, tenant TEXT NOT NULL, ordering_key TEXT, occurred_at TEXT NOT NULL, \
        headers TEXT NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (stream, seq))",
    "CREATE TABLE IF NOT EXISTS bus_acks (\
        durable TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (durable, stream, seq))",
];

async fn write_events(
    journal: &SqlitePool,
    events: &[(&'static str, u64, &RawEvent)],
    stored_at: i64,
) -> Result<(), sqlx::Error> {
    let mut tx = journal.begin().await?;
    // SQLite allows 32,766 bound parameters per statement; 11 per row.
    for chunk in events.chunks(2900) {
        let mut builder = QueryBuilder::new(
            "INSERT OR IGNORE INTO bus_log (stream, seq, event_id, subject, type_name, tenant, ordering_key, occurred_at, headers, payload, stored_at) ",
        );
        builder.push_values(chunk, |mut row, (stream, seq, event)| {
            row.push_bind(*stream)
                .push_bind(i64::try_from(*seq).unwrap_or(i64::MAX));
            event.push_sqlite_columns(&mut row);
            row.push_bind(stored_at);
        });
        builder.build().execute(&mut *tx).await?;
    }
    tx.commit().await
}

fn event_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<RawEvent, String> {
    let get = |name: &str| row.try_get::<String, _>(name).map_err(|e| e.to_string());
    let tenant = tandem_proto::ids::TenantId::new(get("tenant")?).map_err(|e| e.to_string())?;
    let occurred_at = chrono::DateTime::parse_from_rfc3339(&get("occurred_at")?)
        .map_err(|e| e.to_string())?
        .with_timezone(&chrono::Utc);
    let headers: BTreeMap<String, String> =
        serde_json::from_str(&get("headers")?).map_err(|e| e.to_string())?;
    let payload: Vec<u8> = row.try_get("payload").map_err(|e| e.to_string())?;
    Ok(RawEvent {
        id: get("event_id")?,
        subject: get("subject")?,
        type_name: get("type_name")?,
        tenant,
        occurred_at,
        ordering_key: row.try_get("ordering_key").map_err(|e| e.to_string())?,
        headers,
        payload: payload.into(),
    })
}

async fn flush(inner: &Inner) -> Result<(), BusError> {
    let Some(journal) = &inner.journal else {
        return Ok(());
    };
    let (acks, trims) = {
        let mut state = inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (
            std::mem::take(&mut state.unsaved_acks),
            std::mem::take(&mut state.trimmed_below),
        )
    };
    if acks.is_empty() && trims.is_empty() {
        return Ok(());
    }
    let result: Result<(), sqlx::Error> = async {
        let mut tx = journal.begin().await?;
        for chunk in acks.chunks(8000) {
            let mut builder =
                QueryBuilder::new("INSERT OR IGNORE INTO bus_acks (durable, stream, seq) ");
            builder.push_values(chunk, |mut row, (durable, stream, seq)| {
                row.push_bind(durable.as_str())
                    .push_bind(*stream)
                    .push_bind(i64::try_from(*seq).unwrap_or(i64::MAX));
            });
            builder.build().execute(&mut *tx).await?;
        }
        for (stream, below) in &trims {
            let below = i64::try_from(*below).unwrap_or(i64::MAX);
            sqlx::query("DELETE FROM bus_log WHERE stream = ?1 AND seq < ?2")
                .bind(*stream)
                .bind(below)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM bus_acks WHERE stream = ?1 AND seq < ?2")
                .bind(*stream)
                .bind(below)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }
    .await;
    result.map_err(|e| BusError::Unavailable(format!("bus journal: {e}")))
}

async fn flush_acks_periodically(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if let Err(error) = flush(&inner).await {
            tracing::warn!(%error, "cannot record acknowledgements; they will be redelivered after a restart");
        }
    }
}
