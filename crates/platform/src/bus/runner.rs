//! Runs a consumer: fetches deliveries, hands them to a handler, settles them.
//!
//! Deliveries are spread over `lanes` workers by their ordering key, so events of one key
//! (one conversation) are handled one at a time and in order, while different keys proceed in
//! parallel. A transient failure is retried inside its lane, holding back later events of the
//! same key, before the event is handed back to the broker; the lane then keeps holding back the
//! key's later events (unsettled, with progress reports to the broker) until the event comes
//! back and is handled, or for twice its redelivery delay plus a second when it does not come
//! back to this lane. A permanent failure is logged and the event terminated. Handlers make their effects idempotent with [`crate::inbox`], because
//! every delivery may be a redelivery.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::{BusError, Consumer, Delivery, RawEvent};
use crate::metrics::{EVENT_LAG_SECONDS, EVENTS_HANDLED_TOTAL};

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Might succeed later (a dependency is down): retried.
    #[error("transient: {0}")]
    Transient(String),
    /// Can never succeed (the event is invalid for this consumer): terminated.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<BusError> for HandlerError {
    fn from(error: BusError) -> Self {
        match error {
            BusError::Malformed(_) | BusError::InvalidSubscription(_) => {
                HandlerError::Permanent(error.to_string())
            }
            BusError::Unavailable(_) | BusError::Closed => {
                HandlerError::Transient(error.to_string())
            }
        }
    }
}

/// Handles events. Must be idempotent.
pub trait Handler: Send + Sync + 'static {
    /// Applies one event's effect.
    fn handle(&self, event: &RawEvent) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Applies the effects of consecutive events of one lane, in order. The default handles
    /// them one by one; a handler may override it to apply a batch in one transaction. On an
    /// error the whole batch is retried, so effects already applied must be skipped (the inbox
    /// does that).
    fn handle_batch(
        &self,
        events: &[RawEvent],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            for event in events {
                self.handle(event).await?;
            }
            Ok(())
        }
    }
}

/// How a consumer runs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The consumer's name, for logs and metrics.
    pub name: String,
    /// Parallel workers; events with the same ordering key always go to the same worker.
    pub lanes: usize,
    /// Attempts inside a lane before the event is handed back to the broker.
    pub attempts_in_lane: u32,
    /// First retry delay inside a lane; doubles per attempt.
    pub retry_delay: Duration,
    /// Redelivery delay requested from the broker after the in-lane attempts of a first
    /// delivery; it doubles with every further delivery, up to `max_nak_delay`.
    pub nak_delay: Duration,
    /// The longest redelivery delay requested.
    pub max_nak_delay: Duration,
    /// The most deliveries of one lane handed to [`Handler::handle_batch`] at once.
    pub max_batch: usize,
}

impl RunOptions {
    /// Defaults for a consumer called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            lanes: 8,
            attempts_in_lane: 3,
            retry_delay: Duration::from_millis(20),
            nak_delay: Duration::from_secs(1),
            max_nak_delay: Duration::from_secs(60),
            max_batch: 64,
        }
    }
}

/// Runs `consumer` with `handler` until `shutdown` is cancelled. Deliveries in progress finish;
/// those not yet started are left unacknowledged and will be redelivered.
pub async fn run<H: Handler>(
    mut consumer: Consumer,
    handler: H,
    options: RunOptions,
    shutdown: CancellationToken,
) {
    let handler = Arc::new(handler);
    let options = Arc::new(options);
    let lanes = options.lanes.max(1);
    let tracker = TaskTracker::new();
    let mut senders = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let (tx, rx) = mpsc::channel::<Delivery>(64);
        senders.push(tx);
        tracker.spawn(lane(
            rx,
            Arc::clone(&handler),
            Arc::clone(&options),
            shutdown.clone(),
        ));
    }
    let mut round_robin = 0usize;
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => break,
            next = consumer.next() => next,
        };
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(BusError::Closed) => {
                tracing::warn!(consumer = %options.name, "consumer closed");
                break;
            }
            Err(error) => {
                tracing::warn!(consumer = %options.name, %error, "fetch failed, retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let index = match &delivery.event.ordering_key {
            Some(key) => {
                let mut hasher = DefaultHasher::new();
                key.hash(&mut hasher);
                (hasher.finish() % lanes as u64) as usize
            }
            None => {
                round_robin = round_robin.wrapping_add(1);
                round_robin % lanes
            }
        };
        if senders[index].send(delivery).await.is_err() {
            break;
        }
    }
    drop(senders);
    tracker.close();
    tracker.wait().await;
}

/// How often a lane tells the broker that the events it holds back are still being worked on.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// The later events of one key, held back in a lane behind an event of that key which was
/// handed back to the broker, so that they are handled after it.
struct Hold {
    /// The event handed back; when it comes back to this lane it runs first, then the rest.
    event_id: String,
    /// When the hold lapses even if the event has not come back here: another replica may
    /// have received it.
    until: Instant,
    /// The held events in arrival order; none of them is settled while held.
    parked: VecDeque<Delivery>,
}

impl Hold {
    /// Adds `delivery`, replacing an earlier delivery of the same event (the broker may have
    /// delivered it again), whose settlement then goes nowhere.
    fn park(&mut self, delivery: Delivery) {
        match self
            .parked
            .iter_mut()
            .find(|held| held.event.id == delivery.event.id)
        {
            Some(held) => *held = delivery,
            None => self.parked.push_back(delivery),
        }
    }
}

/// What became of a delivery handled in a lane.
enum Handled {
    /// Acknowledged or terminated.
    Settled,
    /// Handed back to the broker, to come again after this delay.
    HandedBack(Duration),
}

/// The holds of one lane, by ordering key.
#[derive(Default)]
struct Holds(HashMap<String, Hold>);

impl Holds {
    /// Holds back the events of `key` behind `event_id`, handed back for `delay`, with
    /// `parked` (later events of the key) behind it.
    fn hold(&mut self, key: String, event_id: String, delay: Duration, parked: VecDeque<Delivery>) {
        // Long enough for the redelivery to arrive, short enough not to stall the key for good
        // when another replica receives it.
        let until = Instant::now() + delay.saturating_mul(2) + Duration::from_secs(1);
        self.0.insert(
            key,
            Hold {
                event_id,
                until,
                parked,
            },
        );
    }

    fn next_lapse(&self) -> Option<Instant> {
        self.0.values().map(|hold| hold.until).min()
    }
}

async fn lane<H: Handler>(
    mut rx: mpsc::Receiver<Delivery>,
    handler: Arc<H>,
    options: Arc<RunOptions>,
    shutdown: CancellationToken,
) {
    let max_batch = options.max_batch.max(1);
    let mut holds = Holds::default();
    let mut progress_at = Instant::now() + PROGRESS_EVERY;
    loop {
        let wake = holds
            .next_lapse()
            .map_or(progress_at, |lapse| lapse.min(progress_at));
        let first = tokio::select! {
            next = rx.recv() => match next {
                Some(delivery) => Some(delivery),
                None => break,
            },
            () = tokio::time::sleep_until(wake), if !holds.0.is_empty() => None,
        };
        if shutdown.is_cancelled() {
            // Leave everything unacknowledged: the broker redelivers it to a live replica.
            holds.0.clear();
            continue;
        }
        let now = Instant::now();
        if now >= progress_at {
            for hold in holds.0.values() {
                for delivery in &hold.parked {
                    let _ = delivery.progress().await;
                }
            }
            progress_at = now + PROGRESS_EVERY;
        }
        let lapsed: Vec<String> = holds
            .0
            .iter()
            .filter(|(_, hold)| hold.until <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in lapsed {
            if let Some(hold) = holds.0.remove(&key) {
                run_in_order(key, hold.parked, &mut holds, &*handler, &options, &shutdown).await;
            }
        }
        let Some(first) = first else { continue };

        let mut batch = Vec::with_capacity(max_batch);
        let mut next = Some(first);
        while let Some(delivery) = next.take() {
            match delivery.event.ordering_key.clone() {
                Some(key) if holds.0.contains_key(&key) => {
                    let Some(hold) = holds.0.get_mut(&key) else {
                        continue;
                    };
                    if hold.event_id == delivery.event.id {
                        // The event the key waited for is back: it runs, then those behind it.
                        let mut sequence =
                            holds.0.remove(&key).map(|h| h.parked).unwrap_or_default();
                        sequence.push_front(delivery);
                        run_in_order(key, sequence, &mut holds, &*handler, &options, &shutdown)
                            .await;
                    } else {
                        hold.park(delivery);
                    }
                }
                _ => batch.push(delivery),
            }
            if batch.len() < max_batch {
                next = rx.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        let span = tracing::info_span!("event.handle_batch", consumer = %options.name, events = batch.len());
        if let Some(first) = batch.first() {
            crate::propagation::set_parent_from(&span, &first.event.headers);
        }
        handle_batch(batch, &mut holds, &*handler, &options, &shutdown)
            .instrument(span)
            .await;
    }
}

/// Handles the events of one key one by one, in order, until one is handed back: that one is
/// then held, with the rest parked behind it.
async fn run_in_order<H: Handler>(
    key: String,
    mut sequence: VecDeque<Delivery>,
    holds: &mut Holds,
    handler: &H,
    options: &RunOptions,
    shutdown: &CancellationToken,
) {
    while let Some(delivery) = sequence.pop_front() {
        let event_id = delivery.event.id.clone();
        if let Handled::HandedBack(delay) = handle_one(delivery, handler, options, shutdown).await {
            holds.hold(key, event_id, delay, sequence);
            return;
        }
    }
}

async fn handle_batch<H: Handler>(
    batch: Vec<Delivery>,
    holds: &mut Holds,
    handler: &H,
    options: &RunOptions,
    shutdown: &CancellationToken,
) {
    if batch.len() > 1 {
        let events: Vec<RawEvent> = batch.iter().map(|d| d.event.clone()).collect();
        let mut delay = options.retry_delay;
        let mut attempt = 1;
        loop {
            match handler.handle_batch(&events).await {
                Ok(()) => {
                    record_lag(&events, options);
                    let acks = batch.into_iter().map(Delivery::ack);
                    for result in futures::future::join_all(acks).await {
                        if let Err(error) = result {
                            tracing::warn!(%error, "ack failed; the event will be redelivered and skipped by the inbox");
                        }
                    }
                    metrics::counter!(EVENTS_HANDLED_TOTAL, "consumer" => options.name.clone(), "outcome" => "ok").increment(events.len() as u64);
                    return;
                }
                Err(HandlerError::Transient(reason))
                    if attempt < options.attempts_in_lane && !shutdown.is_cancelled() =>
                {
                    tracing::debug!(%reason, attempt, "transient batch failure, retrying");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                    attempt += 1;
                }
                // Isolate the failing event: handle the events one by one, in order.
                Err(_) => break,
            }
        }
    }
    for delivery in batch {
        let key = delivery.event.ordering_key.clone();
        if let Some(hold) = key.as_ref().and_then(|key| holds.0.get_mut(key)) {
            // An earlier event of its key in this batch was handed back.
            hold.park(delivery);
            continue;
        }
        let event_id = delivery.event.id.clone();
        if let (Handled::HandedBack(delay), Some(key)) =
            (handle_one(delivery, handler, options, shutdown).await, key)
        {
            holds.hold(key, event_id, delay, VecDeque::new());
        }
    }
}

fn record_lag(events: &[RawEvent], options: &RunOptions) {
    let now = chrono::Utc::now();
    let histogram = metrics::histogram!(EVENT_LAG_SECONDS, "consumer" => options.name.clone());
    for event in events {
        let lag = (now - event.occurred_at).to_std().unwrap_or_default();
        histogram.record(lag.as_secs_f64());
    }
}

async fn handle_one<H: Handler>(
    delivery: Delivery,
    handler: &H,
    options: &RunOptions,
    shutdown: &CancellationToken,
) -> Handled {
    let mut delay = options.retry_delay;
    let mut attempt = 1;
    loop {
        let result = handler.handle(&delivery.event).await;
        let (outcome, handled) = match result {
            Ok(()) => {
                record_lag(std::slice::from_ref(&delivery.event), options);
                if let Err(error) = delivery.ack().await {
                    tracing::warn!(%error, "ack failed; the event will be redelivered and skipped by the inbox");
                }
                ("ok", Handled::Settled)
            }
            Err(HandlerError::Permanent(reason)) => {
                tracing::error!(%reason, "event cannot be handled, terminating it");
                let _ = delivery.term().await;
                ("rejected", Handled::Settled)
            }
            Err(HandlerError::Transient(reason))
                if attempt < options.attempts_in_lane && !shutdown.is_cancelled() =>
            {
                tracing::debug!(%reason, attempt, "transient failure, retrying");
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
                attempt += 1;
                continue;
            }
            Err(HandlerError::Transient(reason)) => {
                let exponent =
                    u32::try_from(delivery.attempt.saturating_sub(1).min(16)).unwrap_or(16);
                let delay = options
                    .nak_delay
                    .saturating_mul(1 << exponent)
                    .min(options.max_nak_delay);
                tracing::warn!(%reason, attempt, delivery = delivery.attempt, delay_ms = delay.as_millis() as u64, "transient failure, handing the event back");
                let _ = delivery.nak(delay).await;
                ("retry", Handled::HandedBack(delay))
            }
        };
        metrics::counter!(EVENTS_HANDLED_TOTAL, "consumer" => options.name.clone(), "outcome" => outcome).increment(1);
        return handled;
    }
}
