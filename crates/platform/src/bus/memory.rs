//! The in-process bus of the standalone mode.
//!
//! It mirrors the JetStream semantics the services rely on, so the same contract suite passes on
//! both adapters: one stream per context, publishes de-duplicated by event id within a window,
//! durable consumers whose state outlives the consumer handle (a consumer that is dropped with
//! unacknowledged deliveries gets them again after the ack wait, as a crashed replica would),
//! `max_ack_pending`, naks with a delay, redelivery backoff and a delivery limit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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
}

#[derive(Default)]
struct State {
    streams: HashMap<&'static str, StreamState>,
    consumers: HashMap<String, ConsumerState>,
}

struct StreamState {
    subjects: &'static str,
    messages: BTreeMap<u64, Arc<RawEvent>>,
    next_seq: u64,
    seen: HashMap<String, Instant>,
    seen_order: VecDeque<(Instant, String)>,
    duplicate_window: Duration,
}

struct Pending {
    due: Instant,
    deliveries: u64,
}

struct ConsumerState {
    stream: &'static str,
    filters: Vec<String>,
    cursor: u64,
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
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates every stream of the catalogue (idempotent).
    pub fn ensure_streams(&self) {
        let mut state = self.lock();
        for spec in STREAMS {
            state.streams.entry(spec.name).or_insert_with(|| StreamState {
                subjects: spec.subjects,
                messages: BTreeMap::new(),
                next_seq: 1,
                seen: HashMap::new(),
                seen_order: VecDeque::new(),
                duplicate_window: Duration::from_secs(120),
            });
        }
    }

    /// Stores events in order; an id seen within the window is dropped.
    pub fn publish_batch(&self, events: &[RawEvent]) -> Result<(), BusError> {
        let now = Instant::now();
        {
            let mut state = self.lock();
            for event in events {
                let stream = state
                    .streams
                    .values_mut()
                    .find(|s| subject_matches(s.subjects, &event.subject))
                    .ok_or_else(|| BusError::Unavailable(format!("no stream captures {}", event.subject)))?;
                while let Some((at, _)) = stream.seen_order.front() {
                    if now.duration_since(*at) <= stream.duplicate_window {
                        break;
                    }
                    if let Some((_, id)) = stream.seen_order.pop_front() {
                        stream.seen.remove(&id);
                    }
                }
                if stream.seen.contains_key(&event.id) {
                    continue;
                }
                stream.seen.insert(event.id.clone(), now);
                stream.seen_order.push_back((now, event.id.clone()));
                let seq = stream.next_seq;
                stream.next_seq += 1;
                stream.messages.insert(seq, Arc::new(event.clone()));
                while stream.messages.len() > MAX_MESSAGES_PER_STREAM {
                    stream.messages.pop_first();
                }
            }
        }
        self.inner.notify.notify_waiters();
        Ok(())
    }

    /// Opens a durable consumer; an existing durable keeps its position and pending deliveries.
    pub fn consumer(&self, spec: &ConsumerSpec) -> Result<MemoryConsumer, BusError> {
        let mut state = self.lock();
        if !state.streams.contains_key(spec.stream.name) {
            return Err(BusError::InvalidSubscription(format!("stream {} does not exist", spec.stream.name)));
        }
        let consumer = state.consumers.entry(spec.durable.clone()).or_insert_with(|| ConsumerState {
            stream: spec.stream.name,
            filters: Vec::new(),
            cursor: 1,
            pending: BTreeMap::new(),
            max_ack_pending: 1,
            ack_wait: spec.ack_wait,
            max_deliver: 1,
            backoff: Vec::new(),
        });
        if consumer.stream != spec.stream.name {
            return Err(BusError::InvalidSubscription(format!("durable {} reads another stream", spec.durable)));
        }
        consumer.filters.clone_from(&spec.filter_subjects);
        consumer.max_ack_pending = usize::try_from(spec.max_ack_pending).unwrap_or(1).max(1);
        consumer.ack_wait = spec.ack_wait;
        consumer.max_deliver = u64::try_from(spec.max_deliver).unwrap_or(1).max(1);
        consumer.backoff.clone_from(&spec.backoff);
        Ok(MemoryConsumer { bus: self.clone(), durable: spec.durable.clone() })
    }

    fn settle(&self, durable: &str, seq: u64, outcome: Settle) {
        {
            let mut state = self.lock();
            let Some(consumer) = state.consumers.get_mut(durable) else { return };
            match outcome {
                Settle::Ack | Settle::Term => {
                    consumer.pending.remove(&seq);
                }
                Settle::Nak(delay) => {
                    if let Some(pending) = consumer.pending.get_mut(&seq) {
                        pending.due = Instant::now() + delay;
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
        let Some(consumer) = state.consumers.get(durable) else { return 0 };
        let Some(stream) = state.streams.get(consumer.stream) else { return 0 };
        let unseen = stream
            .messages
            .range(consumer.cursor..)
            .filter(|(_, m)| consumer.filters.iter().any(|f| subject_matches(f, &m.subject)))
            .count();
        unseen + consumer.pending.len()
    }
}

enum Settle {
    Ack,
    Nak(Duration),
    Term,
}

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
        let State { streams, consumers } = &mut *state;
        let consumer = consumers.get_mut(&self.durable).ok_or(BusError::Closed)?;
        let stream = streams.get(consumer.stream).ok_or(BusError::Closed)?;

        // Redeliveries first, oldest sequence first, as JetStream does.
        let due: Vec<u64> = consumer.pending.iter().filter(|(_, p)| p.due <= now).map(|(seq, _)| *seq).collect();
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
            let first = stream.messages.first_key_value().map_or(consumer.cursor, |(seq, _)| *seq);
            let start = consumer.cursor.max(first);
            let found = stream
                .messages
                .range(start..)
                .find(|(_, m)| consumer.filters.iter().any(|f| subject_matches(f, &m.subject)))
                .map(|(seq, m)| (*seq, Arc::clone(m)));
            match found {
                Some((seq, message)) => {
                    consumer.cursor = seq + 1;
                    let wait = consumer.wait_after(1);
                    consumer.pending.insert(seq, Pending { due: now + wait, deliveries: 1 });
                    return Ok(Next::Deliver(self.delivery(&message, seq, 1)));
                }
                None => consumer.cursor = stream.next_seq.max(start),
            }
        }
        Ok(Next::Wait(consumer.pending.values().map(|p| p.due).min()))
    }

    fn delivery(&self, message: &RawEvent, seq: u64, attempt: u64) -> Delivery {
        Delivery {
            event: message.clone(),
            attempt,
            acker: Acker::Memory(MemoryAcker { bus: self.bus.clone(), durable: self.durable.clone(), seq }),
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

    pub(super) fn term(self) {
        self.bus.settle(&self.durable, self.seq, Settle::Term);
    }
}
