//! The event bus: one port, two adapters.
//!
//! - [`nats::NatsBus`]: NATS JetStream, one stream per context, durable pull consumers shared by
//!   a service's replicas, `Nats-Msg-Id` de-duplication, bounded `max_ack_pending`, redelivery
//!   with backoff.
//! - [`memory::MemoryBus`]: the in-process bus of the standalone mode, with the same semantics
//!   (durable consumers, acks, redelivery after the ack wait, de-duplication by event id).
//!
//! Services do not publish directly: they write events to the transactional outbox
//! ([`crate::outbox`]) in the same transaction as the state change, and the relay publishes them.
//! Consumers run through [`runner::run`] and make their effects idempotent with the inbox
//! ([`crate::inbox`]).

pub mod memory;
pub mod nats;
pub mod runner;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tandem_proto::events::{self, Event, Stream};
use tandem_proto::headers;
use tandem_proto::ids::TenantId;

use crate::config::{BusConfig, BusKind};
use crate::error::{ErrorCode, ServiceError};

/// Bus failures.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The broker cannot be reached or did not confirm in time; retry later.
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    /// A message that is not a well-formed Tandem event.
    #[error("malformed event: {0}")]
    Malformed(String),
    /// A consumer asked for a stream or subject outside the catalogue.
    #[error("invalid subscription: {0}")]
    InvalidSubscription(String),
    /// The bus was shut down.
    #[error("event bus closed")]
    Closed,
}

impl ServiceError for BusError {
    fn code(&self) -> ErrorCode {
        match self {
            BusError::Unavailable(_) | BusError::Closed => ErrorCode::Unavailable,
            BusError::Malformed(_) | BusError::InvalidSubscription(_) => ErrorCode::Internal,
        }
    }
}

/// An event as it travels: envelope fields plus the encoded protobuf payload.
#[derive(Clone, Debug, PartialEq)]
pub struct RawEvent {
    /// Unique id (UUIDv7); the de-duplication key everywhere.
    pub id: String,
    /// Full subject, tenant included.
    pub subject: String,
    /// Fully qualified protobuf type of the payload.
    pub type_name: String,
    /// The tenant.
    pub tenant: TenantId,
    /// When the fact happened.
    pub occurred_at: DateTime<Utc>,
    /// The key whose order consumers keep, usually a conversation id.
    pub ordering_key: Option<String>,
    /// Other headers, such as the W3C trace context.
    pub headers: BTreeMap<String, String>,
    /// The encoded event message.
    pub payload: Bytes,
}

/// A decoded event with its envelope.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope<E> {
    /// Unique event id.
    pub id: String,
    /// The tenant.
    pub tenant: TenantId,
    /// When the fact happened.
    pub occurred_at: DateTime<Utc>,
    /// The ordering key, if any.
    pub ordering_key: Option<String>,
    /// The event itself.
    pub event: E,
}

impl RawEvent {
    /// Encodes `event` for `tenant`, stamped now with a new id and the current trace context.
    pub fn new<E: Event>(tenant: &TenantId, event: &E, ordering_key: Option<String>) -> Self {
        Self::at(tenant, event, ordering_key, Utc::now())
    }

    /// Like [`RawEvent::new`] with an explicit occurrence time.
    pub fn at<E: Event>(
        tenant: &TenantId,
        event: &E,
        ordering_key: Option<String>,
        occurred_at: DateTime<Utc>,
    ) -> Self {
        use chrono::SubsecRound as _;
        // Microseconds are what headers and both databases keep; round here so an event reads
        // back exactly as it was written.
        let occurred_at = occurred_at.trunc_subsecs(6);
        let mut headers = BTreeMap::new();
        crate::propagation::inject_current(&mut headers);
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            subject: events::subject_for::<E>(tenant),
            type_name: E::TYPE_NAME.to_owned(),
            tenant: tenant.clone(),
            occurred_at,
            ordering_key,
            headers,
            payload: Bytes::from(event.encode_to_vec()),
        }
    }

    /// Returns the stream this event belongs to.
    pub fn stream(&self) -> Option<&'static Stream> {
        events::spec_by_type(&self.type_name).map(|spec| spec.stream)
    }

    /// Decodes the payload as `E`, refusing an event whose subject or type is not `E`'s.
    pub fn decode<E: Event>(&self) -> Result<Envelope<E>, BusError> {
        if self.type_name != E::TYPE_NAME {
            return Err(BusError::Malformed(format!(
                "expected {}, got {}",
                E::TYPE_NAME,
                self.type_name
            )));
        }
        let expected = events::subject_for::<E>(&self.tenant);
        if self.subject != expected {
            return Err(BusError::Malformed(format!(
                "{} arrived on {}, expected {expected}",
                self.type_name, self.subject
            )));
        }
        let event = E::decode(self.payload.clone())
            .map_err(|e| BusError::Malformed(format!("{}: {e}", self.type_name)))?;
        Ok(Envelope {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            occurred_at: self.occurred_at,
            ordering_key: self.ordering_key.clone(),
            event,
        })
    }

    /// Returns all envelope fields as headers, for adapters that carry headers.
    pub fn header_pairs(&self) -> Vec<(&str, String)> {
        let mut pairs = vec![
            (headers::MSG_ID, self.id.clone()),
            (headers::EVENT_TYPE, self.type_name.clone()),
            (headers::TENANT, self.tenant.to_string()),
            (
                headers::OCCURRED_AT,
                self.occurred_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
        ];
        if let Some(key) = &self.ordering_key {
            pairs.push((headers::ORDERING_KEY, key.clone()));
        }
        for (k, v) in &self.headers {
            pairs.push((k.as_str(), v.clone()));
        }
        pairs
    }

    /// Binds the event's columns (`event_id, subject, type_name, tenant, ordering_key,
    /// occurred_at, headers, payload`) to a SQLite row: the outbox and the in-process bus's
    /// journal store events the same way.
    pub(crate) fn push_sqlite_columns(
        &self,
        row: &mut sqlx::query_builder::Separated<'_, sqlx::Sqlite, &'static str>,
    ) {
        row.push_bind(&self.id)
            .push_bind(&self.subject)
            .push_bind(&self.type_name)
            .push_bind(self.tenant.as_str())
            .push_bind(&self.ordering_key)
            .push_bind(
                self.occurred_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            )
            .push_bind(self.headers_json())
            .push_bind(self.payload.as_ref());
    }

    /// Returns the extra headers as a JSON object, for storage.
    pub(crate) fn headers_json(&self) -> String {
        serde_json::to_string(&self.headers).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Rebuilds an event from a subject, headers and payload, checking the envelope.
    pub fn from_parts(
        subject: &str,
        mut headers_in: BTreeMap<String, String>,
        payload: Bytes,
    ) -> Result<Self, BusError> {
        let mut take = |name: &str| headers_in.remove(name);
        let id = take(headers::MSG_ID)
            .ok_or_else(|| BusError::Malformed(format!("{subject}: no {}", headers::MSG_ID)))?;
        let type_name = take(headers::EVENT_TYPE)
            .ok_or_else(|| BusError::Malformed(format!("{subject}: no {}", headers::EVENT_TYPE)))?;
        let tenant = take(headers::TENANT)
            .ok_or_else(|| BusError::Malformed(format!("{subject}: no {}", headers::TENANT)))?;
        let tenant = TenantId::new(tenant).map_err(|e| BusError::Malformed(e.to_string()))?;
        let occurred_at = take(headers::OCCURRED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc))
            .ok_or_else(|| {
                BusError::Malformed(format!(
                    "{subject}: missing or bad {}",
                    headers::OCCURRED_AT
                ))
            })?;
        let ordering_key = take(headers::ORDERING_KEY);
        Ok(Self {
            id,
            subject: subject.to_owned(),
            type_name,
            tenant,
            occurred_at,
            ordering_key,
            headers: headers_in,
            payload,
        })
    }
}

/// What a durable consumer reads and how.
#[derive(Clone, Debug)]
pub struct ConsumerSpec {
    /// Durable name, shared by every replica of the consuming service (e.g. `routing-handoffs`).
    pub durable: String,
    /// The stream read.
    pub stream: &'static Stream,
    /// Subject filters within the stream (at least one).
    pub filter_subjects: Vec<String>,
    /// Deliveries in flight before the broker waits for acks.
    pub max_ack_pending: i64,
    /// How long a delivery may stay unacknowledged before redelivery.
    pub ack_wait: Duration,
    /// Attempts before the broker gives up on an event.
    pub max_deliver: i64,
    /// Redelivery delays after failed attempts.
    pub backoff: Vec<Duration>,
}

impl ConsumerSpec {
    /// Starts a spec for `durable` using the bus defaults; add events with [`ConsumerSpec::event`].
    pub fn new(durable: impl Into<String>, stream: &'static Stream, cfg: &BusConfig) -> Self {
        Self {
            durable: durable.into(),
            stream,
            filter_subjects: Vec::new(),
            max_ack_pending: cfg.max_ack_pending,
            ack_wait: cfg.ack_wait,
            max_deliver: cfg.max_deliver,
            backoff: cfg.redelivery_backoff.clone(),
        }
    }

    /// Adds event type `E` (every tenant) to the filter.
    pub fn event<E: Event>(mut self) -> Self {
        self.filter_subjects.push(events::all_tenants::<E>());
        self
    }

    /// Checks that the spec is consistent with the catalogue.
    pub fn validate(&self) -> Result<(), BusError> {
        let bad = |why: String| {
            Err(BusError::InvalidSubscription(format!(
                "{}: {why}",
                self.durable
            )))
        };
        if self.durable.is_empty()
            || !self
                .durable
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("durable names use letters, digits, '-' and '_'".into());
        }
        if self.filter_subjects.is_empty() {
            return bad("no subjects".into());
        }
        let prefix = self.stream.subjects.trim_end_matches('>');
        for subject in &self.filter_subjects {
            if !subject.starts_with(prefix) {
                return bad(format!("{subject} is not in stream {}", self.stream.name));
            }
        }
        Ok(())
    }
}

/// Returns whether a NATS-style subject filter (`*` one token, `>` the rest) matches `subject`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The bus a service runs on.
#[derive(Clone)]
pub enum Bus {
    /// NATS JetStream.
    Nats(Box<nats::NatsBus>),
    /// The in-process bus.
    Memory(memory::MemoryBus),
}

impl Bus {
    /// Connects according to the configuration; `memory` takes the process's in-process bus.
    pub async fn connect(
        cfg: &BusConfig,
        memory: Option<&memory::MemoryBus>,
    ) -> Result<Self, BusError> {
        match cfg.kind {
            BusKind::Nats => Ok(Bus::Nats(Box::new(nats::NatsBus::connect(cfg).await?))),
            BusKind::Memory => Ok(Bus::Memory(memory.cloned().unwrap_or_default())),
        }
    }

    /// Creates (or updates) every stream of the catalogue.
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        match self {
            Bus::Nats(bus) => bus.ensure_streams().await,
            Bus::Memory(bus) => {
                bus.ensure_streams();
                Ok(())
            }
        }
    }

    /// Publishes events in order and returns once the broker stored every one of them.
    /// Re-publishing an event id already stored is a no-op.
    pub async fn publish_batch(&self, events: &[RawEvent]) -> Result<(), BusError> {
        match self {
            Bus::Nats(bus) => bus.publish_batch(events).await,
            Bus::Memory(bus) => bus.publish_batch(events).await,
        }
    }

    /// Like [`Bus::publish_batch`], but each event is sent only once the one before it is
    /// stored: slower, and safe for a batch that may hold events already stored (a batch sent
    /// again after a failure). See [`nats::NatsBus::publish_one_by_one`].
    pub async fn publish_one_by_one(&self, events: &[RawEvent]) -> Result<(), BusError> {
        match self {
            Bus::Nats(bus) => bus.publish_one_by_one(events).await,
            Bus::Memory(bus) => bus.publish_batch(events).await,
        }
    }

    /// Opens a durable consumer, creating it if needed.
    pub async fn consumer(&self, spec: &ConsumerSpec) -> Result<Consumer, BusError> {
        spec.validate()?;
        match self {
            Bus::Nats(bus) => Ok(Consumer::Nats(Box::new(bus.consumer(spec).await?))),
            Bus::Memory(bus) => Ok(Consumer::Memory(bus.consumer(spec)?)),
        }
    }

    /// Flushes pending publishes and closes the connection.
    pub async fn close(&self) {
        match self {
            Bus::Nats(bus) => bus.close().await,
            Bus::Memory(bus) => {
                if let Err(error) = bus.flush().await {
                    tracing::warn!(%error, "bus journal flush failed at close");
                }
            }
        }
    }
}

/// A durable consumer's stream of deliveries.
pub enum Consumer {
    /// From JetStream.
    Nats(Box<nats::NatsConsumer>),
    /// From the in-process bus.
    Memory(memory::MemoryConsumer),
}

impl Consumer {
    /// Waits for the next delivery.
    pub async fn next(&mut self) -> Result<Delivery, BusError> {
        match self {
            Consumer::Nats(c) => c.next().await,
            Consumer::Memory(c) => c.next().await,
        }
    }
}

/// One delivery of an event; acknowledge it once its effect is committed.
pub struct Delivery {
    /// The event.
    pub event: RawEvent,
    /// 1 for the first delivery, more for redeliveries.
    pub attempt: u64,
    acker: Acker,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("event", &self.event.id)
            .field("attempt", &self.attempt)
            .finish()
    }
}

#[allow(
    clippy::large_enum_variant,
    reason = "one per delivery, moved a few times; boxing would allocate per event"
)]
enum Acker {
    Nats(async_nats::jetstream::message::Acker),
    Memory(memory::MemoryAcker),
}

impl Delivery {
    /// Confirms processing. On JetStream this is a plain (fire-and-forget) ack: if it is lost,
    /// the event is redelivered and the consumer's inbox skips it, so waiting for the broker to
    /// confirm it (a double ack) would only add a round trip per event.
    pub async fn ack(self) -> Result<(), BusError> {
        match self.acker {
            Acker::Nats(acker) => acker
                .ack()
                .await
                .map_err(|e| BusError::Unavailable(e.to_string())),
            Acker::Memory(acker) => {
                acker.ack();
                Ok(())
            }
        }
    }

    /// Asks for redelivery after `delay`.
    pub async fn nak(self, delay: Duration) -> Result<(), BusError> {
        match self.acker {
            Acker::Nats(acker) => acker
                .ack_with(async_nats::jetstream::AckKind::Nak(Some(delay)))
                .await
                .map_err(|e| BusError::Unavailable(e.to_string())),
            Acker::Memory(acker) => {
                acker.nak(delay);
                Ok(())
            }
        }
    }

    /// Tells the broker the event is still being worked on: its redelivery waits another ack
    /// wait. The delivery stays open.
    pub async fn progress(&self) -> Result<(), BusError> {
        match &self.acker {
            Acker::Nats(acker) => acker
                .ack_with(async_nats::jetstream::AckKind::Progress)
                .await
                .map_err(|e| BusError::Unavailable(e.to_string())),
            Acker::Memory(acker) => {
                acker.progress();
                Ok(())
            }
        }
    }

    /// Gives the event up for good (it can never be handled).
    pub async fn term(self) -> Result<(), BusError> {
        match self.acker {
            Acker::Nats(acker) => acker
                .ack_with(async_nats::jetstream::AckKind::Term)
                .await
                .map_err(|e| BusError::Unavailable(e.to_string())),
            Acker::Memory(acker) => {
                acker.term();
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_like_nats() {
        assert!(subject_matches(
            "tandem.routing.v1.>",
            "tandem.routing.v1.handoff.queued.acme"
        ));
        assert!(subject_matches(
            "tandem.routing.v1.handoff.queued.*",
            "tandem.routing.v1.handoff.queued.acme"
        ));
        assert!(!subject_matches(
            "tandem.routing.v1.handoff.queued.*",
            "tandem.routing.v1.handoff.queued"
        ));
        assert!(!subject_matches(
            "tandem.routing.v1.handoff.queued.*",
            "tandem.routing.v1.handoff.offered.acme"
        ));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
    }
}
