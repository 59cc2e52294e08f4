//! The NATS JetStream adapter.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt as _;
use tandem_proto::events::STREAMS;
use tandem_proto::headers::EXPECTED_LAST_MSG_ID;

use super::{Acker, BusError, ConsumerSpec, Delivery, RawEvent, subject_matches};
use crate::config::BusConfig;

/// A connection to NATS with a JetStream context.
#[derive(Clone)]
pub struct NatsBus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    cfg: BusConfig,
}

/// Publishes whose acknowledgement has not arrived, at most: the client makes a further publish
/// wait for a free slot, so a batch waits for its acknowledgements this many at a time.
const ACKS_IN_FLIGHT: usize = 4096;

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

impl NatsBus {
    /// Connects to the configured server(s).
    pub async fn connect(cfg: &BusConfig) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("tandem")
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .connect(cfg.nats_url.as_str())
            .await
            .map_err(unavailable)?;
        Ok(Self::from_client(client, cfg))
    }

    /// Wraps an existing client.
    pub fn from_client(client: async_nats::Client, cfg: &BusConfig) -> Self {
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .max_ack_inflight(ACKS_IN_FLIGHT)
            .build(client.clone());
        Self {
            client,
            jetstream,
            cfg: cfg.clone(),
        }
    }

    /// Returns the underlying client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Creates or updates the stream of every context.
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        for spec in STREAMS {
            let config = stream::Config {
                name: spec.name.to_owned(),
                subjects: vec![spec.subjects.to_owned()],
                description: Some(format!("Tandem {} events", spec.context)),
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::Limits,
                num_replicas: self.cfg.stream_replicas,
                duplicate_window: self.cfg.duplicate_window,
                max_age: self.cfg.max_age,
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            };
            self.jetstream
                .create_or_update_stream(config)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Publishes in order; returns when every event is stored (duplicates count as stored).
    ///
    /// The batch is sent without waiting for each acknowledgement, so its order has to survive
    /// a broken connection: the messages still in the socket are lost, while those the client
    /// had not written yet go out after it reconnects. Every event after the first of its
    /// stream therefore names the previous one as the stream's expected last message, and the
    /// broker refuses it if that one is missing; a refused event fails the batch. This requires
    /// the caller to be the only publisher of the stream while the batch is sent, as a
    /// service's elected outbox relay is (another publisher makes batches fail, never reorders
    /// them), and a batch of events none of which is stored yet: an event already stored is
    /// acknowledged as a duplicate and leaves the stream's last message as it is, so a fresh
    /// event after it would be refused. A batch sent again after a failure goes through
    /// [`NatsBus::publish_one_by_one`].
    pub async fn publish_batch(&self, events: &[RawEvent]) -> Result<(), BusError> {
        let mut last_of_stream: HashMap<&str, &str> = HashMap::new();
        for window in events.chunks(ACKS_IN_FLIGHT) {
            let mut acks = Vec::with_capacity(window.len());
            for event in window {
                let mut headers = async_nats::HeaderMap::new();
                for (name, value) in event.header_pairs() {
                    headers.insert(name, value.as_str());
                }
                if let Some(stream) = STREAMS
                    .iter()
                    .find(|stream| subject_matches(stream.subjects, &event.subject))
                    && let Some(previous) = last_of_stream.insert(stream.name, &event.id)
                {
                    headers.insert(EXPECTED_LAST_MSG_ID, previous);
                }
                let ack = self
                    .jetstream
                    .publish_with_headers(event.subject.clone(), headers, event.payload.clone())
                    .await
                    .map_err(unavailable)?;
                acks.push(ack);
            }
            for ack in acks {
                ack.await.map_err(unavailable)?;
            }
        }
        Ok(())
    }

    /// Publishes in order, each event only once the one before it is stored: nothing is in
    /// flight behind a message that may be lost, so a broken connection cannot reorder the
    /// batch, and events already stored (acknowledged as duplicates) may come anywhere in it.
    /// One round trip per event: for batches sent again after a failure.
    pub async fn publish_one_by_one(&self, events: &[RawEvent]) -> Result<(), BusError> {
        for event in events {
            let mut headers = async_nats::HeaderMap::new();
            for (name, value) in event.header_pairs() {
                headers.insert(name, value.as_str());
            }
            self.jetstream
                .publish_with_headers(event.subject.clone(), headers, event.payload.clone())
                .await
                .map_err(unavailable)?
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Gets or creates the durable pull consumer and starts its message stream.
    pub async fn consumer(&self, spec: &ConsumerSpec) -> Result<NatsConsumer, BusError> {
        let messages = open(&self.jetstream, spec).await?;
        Ok(NatsConsumer {
            messages,
            jetstream: self.jetstream.clone(),
            spec: spec.clone(),
        })
    }

    /// Flushes pending publishes, waiting at most two seconds: with the server unreachable a
    /// flush would wait for the reconnection, and shutdown must not.
    pub async fn close(&self) {
        if tokio::time::timeout(Duration::from_secs(2), self.client.flush())
            .await
            .is_err()
        {
            tracing::warn!(
                "nats unreachable at shutdown; unflushed publishes are re-sent from the outbox"
            );
        }
    }
}

/// Gets or creates the durable pull consumer `spec` describes and starts its message stream.
async fn open(
    jetstream: &jetstream::Context,
    spec: &ConsumerSpec,
) -> Result<consumer::pull::Stream, BusError> {
    let stream = jetstream
        .get_stream(spec.stream.name)
        .await
        .map_err(unavailable)?;
    let config = consumer::pull::Config {
        durable_name: Some(spec.durable.clone()),
        description: Some(format!("tandem consumer {}", spec.durable)),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        max_deliver: spec.max_deliver,
        filter_subjects: spec.filter_subjects.clone(),
        max_ack_pending: spec.max_ack_pending,
        backoff: spec.backoff.clone(),
        ..Default::default()
    };
    // An existing durable keeps its delivery state; its settings are brought up to date.
    let consumer: consumer::PullConsumer = match stream
        .get_consumer::<consumer::pull::Config>(&spec.durable)
        .await
    {
        Ok(_) => stream.update_consumer(config).await.map_err(unavailable)?,
        Err(_) => stream
            .get_or_create_consumer(&spec.durable, config)
            .await
            .map_err(unavailable)?,
    };
    consumer
        .stream()
        .max_messages_per_batch(256)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(unavailable)
}

/// A JetStream pull consumer's message stream. When the stream ends (the durable consumer was
/// deleted on the server, or the server refused further pulls), it opens the consumer again,
/// creating it if it is gone, so a service's consumer never stops while the service runs. A
/// re-created durable starts from the stream's first event; the inbox skips those applied.
pub struct NatsConsumer {
    messages: consumer::pull::Stream,
    jetstream: jetstream::Context,
    spec: ConsumerSpec,
}

impl NatsConsumer {
    /// Waits for the next well-formed delivery; malformed messages are terminated and logged.
    pub async fn next(&mut self) -> Result<Delivery, BusError> {
        loop {
            let message = match self.messages.next().await {
                None => {
                    self.reopen().await;
                    continue;
                }
                Some(Err(e)) => {
                    // Missed heartbeats and similar are transient: the stream keeps going. The
                    // pause keeps a persistent failure (server gone) from spinning.
                    tracing::warn!(error = %e, "jetstream consumer hiccup");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Some(Ok(message)) => message,
            };
            let attempt = message
                .info()
                .map(|info| info.delivered.max(1) as u64)
                .unwrap_or(1);
            let (message, acker) = message.split();
            let subject = message.subject.clone();
            match RawEvent::from_nats(message) {
                Ok(event) => {
                    return Ok(Delivery {
                        event,
                        attempt,
                        acker: Acker::Nats(acker),
                    });
                }
                Err(error) => {
                    tracing::error!(%error, %subject, "dropping malformed event");
                    let _ = acker.ack_with(jetstream::AckKind::Term).await;
                }
            }
        }
    }

    /// Opens the consumer again, retrying with a growing pause until it works.
    async fn reopen(&mut self) {
        let mut pause = Duration::from_millis(100);
        loop {
            tracing::warn!(consumer = %self.spec.durable, "consumer stream ended, opening it again");
            match open(&self.jetstream, &self.spec).await {
                Ok(messages) => {
                    self.messages = messages;
                    return;
                }
                Err(error) => {
                    tracing::warn!(consumer = %self.spec.durable, %error, "cannot open consumer");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

impl RawEvent {
    /// Reads an event from a NATS message: its subject, its headers (the first value of each)
    /// and its payload. Core subscriptions (not only this bus's consumers) use it too.
    pub fn from_nats(message: async_nats::Message) -> Result<Self, BusError> {
        let mut headers = BTreeMap::new();
        if let Some(map) = &message.headers {
            for (name, values) in map.iter() {
                if let Some(value) = values.first() {
                    headers.insert(name.to_string(), value.to_string());
                }
            }
        }
        Self::from_parts(message.subject.as_str(), headers, message.payload)
    }
}

/// Returns a header of a plain NATS message (the ones replicas pass to each other outside every
/// stream), if it is there.
pub fn header(message: &async_nats::Message, name: &str) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(name))
        .map(|value| value.as_str().to_owned())
}

/// Returns the tenant of a subject whose last token is the tenant, if it is a valid one.
pub fn subject_tenant(subject: &str) -> Option<tandem_proto::ids::TenantId> {
    subject
        .rsplit_once('.')
        .and_then(|(_, tenant)| tandem_proto::ids::TenantId::new(tenant).ok())
}

#[cfg(test)]
mod plain_message_tests {
    use super::*;

    #[test]
    fn headers_and_tenant_of_a_plain_message() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Tandem-Agent", "fay");
        let message = async_nats::Message {
            subject: "tandem.live.routing.v1.desk.acme".into(),
            reply: None,
            payload: bytes::Bytes::new(),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        };
        assert_eq!(header(&message, "Tandem-Agent").as_deref(), Some("fay"));
        assert_eq!(header(&message, "Tandem-Replica"), None);
        assert_eq!(
            subject_tenant(&message.subject).map(|t| t.to_string()),
            Some("acme".to_owned())
        );
        assert_eq!(subject_tenant("no-dots"), None);
        assert_eq!(subject_tenant("a.b.NOT A TENANT"), None);
    }
}
