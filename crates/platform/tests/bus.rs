//! The bus contract suite: every case runs against NATS JetStream (a throwaway nats-server,
//! with PostgreSQL for the outbox and inbox) and against the in-process bus (with its SQLite
//! journal, and SQLite for the outbox and inbox), so neither adapter can drift.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_platform::bus::memory::MemoryBus;
use tandem_platform::bus::runner::{self, Handler, HandlerError, RunOptions};
use tandem_platform::bus::{Bus, ConsumerSpec, RawEvent};
use tandem_platform::config::{BusConfig, DatabaseConfig, OutboxConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::outbox::{OutboxRelay, OutboxWaker};
use tandem_platform::{inbox, outbox};
use tandem_proto::events::DIALOG;
use tandem_proto::headers;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::dialog::v1::{HandoffRequested, Message, MessagePosted};
use tandem_proto::pb::routing::v1::HandoffQueued;
use tandem_testkit::{NatsServer, Postgres, TcpLink};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[allow(clippy::large_enum_variant, reason = "one per test")]
enum Broker {
    Nats {
        server: NatsServer,
        _pg: Postgres,
    },
    Memory {
        journal: PathBuf,
        _dir: tempfile::TempDir,
    },
}

struct Rig {
    bus: Bus,
    cfg: BusConfig,
    db: Db,
    broker: Broker,
}

impl Rig {
    async fn nats() -> Rig {
        let server = NatsServer::start().await.unwrap();
        let pg = Postgres::start().await.unwrap();
        let cfg = BusConfig {
            nats_url: server.url(),
            ..BusConfig::default()
        };
        let bus = Bus::connect(&cfg, None).await.unwrap();
        bus.ensure_streams().await.unwrap();
        let db = Db::connect(&DatabaseConfig {
            url: Secret::new(pg.fresh_database().await.unwrap()),
            ..DatabaseConfig::default()
        })
        .await
        .unwrap();
        db.migrate(None).await.unwrap();
        Rig::finish(bus, cfg, db, Broker::Nats { server, _pg: pg }).await
    }

    async fn memory() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("bus.db");
        let cfg = BusConfig {
            kind: tandem_platform::config::BusKind::Memory,
            ..BusConfig::default()
        };
        let bus = Bus::Memory(MemoryBus::open(&journal).await.unwrap());
        bus.ensure_streams().await.unwrap();
        let url = format!("sqlite://{}", dir.path().join("service.db").display());
        let db = Db::connect(&DatabaseConfig {
            url: Secret::new(url),
            ..DatabaseConfig::default()
        })
        .await
        .unwrap();
        db.migrate(None).await.unwrap();
        Rig::finish(bus, cfg, db, Broker::Memory { journal, _dir: dir }).await
    }

    async fn finish(bus: Bus, cfg: BusConfig, db: Db, broker: Broker) -> Rig {
        let create =
            "CREATE TABLE effects (event_id TEXT NOT NULL, key TEXT NOT NULL, seq BIGINT NOT NULL)";
        match &db {
            Db::Postgres(pool) => sqlx::query(create).execute(pool).await.map(drop),
            Db::Sqlite(pool) => sqlx::query(create).execute(pool).await.map(drop),
        }
        .unwrap();
        Rig {
            bus,
            cfg,
            db,
            broker,
        }
    }

    /// Kills the broker and brings it back, as after a crash. For the in-process bus that means
    /// dropping it without a flush and reopening its journal.
    async fn restart_broker(&mut self) {
        match &mut self.broker {
            Broker::Nats { server, .. } => {
                server.kill().await.unwrap();
                server.restart().await.unwrap();
            }
            Broker::Memory { journal, .. } => {
                let reopened = Bus::Memory(MemoryBus::open(journal).await.unwrap());
                reopened.ensure_streams().await.unwrap();
                self.bus = reopened;
            }
        }
    }

    fn spec(&self, durable: &str) -> ConsumerSpec {
        let mut spec = ConsumerSpec::new(durable, &DIALOG, &self.cfg).event::<MessagePosted>();
        spec.ack_wait = Duration::from_secs(1);
        spec.backoff = Vec::new();
        spec
    }

    async fn enqueue(&self, events: &[RawEvent]) {
        match &self.db {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await.unwrap();
                outbox::enqueue_pg(&mut tx, events).await.unwrap();
                tx.commit().await.unwrap();
            }
            Db::Sqlite(pool) => {
                let mut tx = pool.begin().await.unwrap();
                outbox::enqueue_sqlite(&mut tx, events).await.unwrap();
                tx.commit().await.unwrap();
            }
        }
    }

    async fn effects(&self) -> Vec<(String, String, i64)> {
        let sql = "SELECT event_id, key, seq FROM effects";
        match &self.db {
            Db::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
            Db::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
        }
    }

    fn relay(&self, batch_size: u32) -> OutboxRelay {
        let cfg = OutboxConfig {
            batch_size,
            poll_interval: Duration::from_millis(20),
            ..OutboxConfig::default()
        };
        OutboxRelay::new(self.db.clone(), self.bus.clone(), cfg)
    }
}

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn posted(key: &str, seq: i64) -> RawEvent {
    let event = MessagePosted {
        conversation_id: key.to_owned(),
        message: Some(Message {
            conversation_id: key.to_owned(),
            sequence: seq,
            text: format!("message {seq}"),
            ..Message::default()
        }),
        ..MessagePosted::default()
    };
    RawEvent::new(&tenant(), &event, Some(key.to_owned()))
}

/// Applies each event once: an inbox claim and an `effects` row in one transaction. It can
/// be told to fail after committing (as a crash before the ack would), to prove the inbox.
#[derive(Clone)]
struct Effects {
    db: Db,
    fail_after_commit: Arc<Mutex<HashSet<String>>>,
}

impl Handler for Effects {
    async fn handle(&self, event: &RawEvent) -> Result<(), HandlerError> {
        let envelope = event.decode::<MessagePosted>()?;
        let seq = envelope.event.message.map_or(0, |m| m.sequence);
        let key = envelope.event.conversation_id;
        let transient = |e: sqlx::Error| HandlerError::Transient(e.to_string());
        match &self.db {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(transient)?;
                if inbox::claim_pg(&mut tx, "effects", &event.id)
                    .await
                    .map_err(transient)?
                {
                    sqlx::query("INSERT INTO effects (event_id, key, seq) VALUES ($1, $2, $3)")
                        .bind(&event.id)
                        .bind(&key)
                        .bind(seq)
                        .execute(&mut *tx)
                        .await
                        .map_err(transient)?;
                }
                tx.commit().await.map_err(transient)?;
            }
            Db::Sqlite(pool) => {
                let mut tx = pool.begin().await.map_err(transient)?;
                if inbox::claim_sqlite(&mut tx, "effects", &event.id)
                    .await
                    .map_err(transient)?
                {
                    sqlx::query("INSERT INTO effects (event_id, key, seq) VALUES (?1, ?2, ?3)")
                        .bind(&event.id)
                        .bind(&key)
                        .bind(seq)
                        .execute(&mut *tx)
                        .await
                        .map_err(transient)?;
                }
                tx.commit().await.map_err(transient)?;
            }
        }
        if self.fail_after_commit.lock().unwrap().remove(&event.id) {
            return Err(HandlerError::Transient(
                "simulated crash after commit".into(),
            ));
        }
        Ok(())
    }
}

async fn wait_for_effects(rig: &Rig, want: usize, within: Duration) -> Vec<(String, String, i64)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let effects = rig.effects().await;
        if effects.len() >= want || tokio::time::Instant::now() > deadline {
            return effects;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_exactly_once(effects: &[(String, String, i64)], sent: &[RawEvent]) {
    let mut seen = HashSet::new();
    for (id, _, _) in effects {
        assert!(seen.insert(id.clone()), "event {id} took effect twice");
    }
    let missing: Vec<&str> = sent
        .iter()
        .filter(|e| !seen.contains(&e.id))
        .map(|e| e.id.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} events never took effect",
        missing.len(),
        sent.len()
    );
    assert_eq!(effects.len(), sent.len());
}

// ---------------------------------------------------------------------------------------------
// The contract.

async fn typed_events_round_trip(rig: Rig) {
    let handoff = HandoffRequested {
        conversation_id: "c1".into(),
        ..HandoffRequested::default()
    };
    let raw = RawEvent::new(&tenant(), &handoff, Some("c1".into()));
    assert_eq!(raw.subject, "tandem.dialog.v1.handoff.requested.acme");
    rig.bus
        .publish_batch(std::slice::from_ref(&raw))
        .await
        .unwrap();

    let spec = ConsumerSpec::new("typed", &DIALOG, &rig.cfg).event::<HandoffRequested>();
    let mut consumer = rig.bus.consumer(&spec).await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(delivery.attempt, 1);
    assert_eq!(delivery.event.id, raw.id);
    assert_eq!(delivery.event.tenant, tenant());
    assert_eq!(delivery.event.ordering_key.as_deref(), Some("c1"));
    let envelope = delivery.event.decode::<HandoffRequested>().unwrap();
    assert_eq!(envelope.event, handoff);
    assert!(
        delivery.event.decode::<HandoffQueued>().is_err(),
        "a payload is never decoded as another type"
    );
    delivery.ack().await.unwrap();

    // A consumer filtered on one event type never sees another.
    rig.bus.publish_batch(&[posted("c1", 1)]).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), consumer.next())
            .await
            .is_err()
    );
}

async fn duplicate_publishes_are_dropped(rig: Rig) {
    let event = posted("c1", 1);
    for _ in 0..3 {
        rig.bus
            .publish_batch(std::slice::from_ref(&event))
            .await
            .unwrap();
    }
    rig.bus
        .publish_batch(&[event.clone(), event.clone()])
        .await
        .unwrap();
    let mut consumer = rig.bus.consumer(&rig.spec("dedupe")).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.event.id, event.id);
    first.ack().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), consumer.next())
            .await
            .is_err(),
        "a duplicate was delivered"
    );
}

async fn delivery_survives_a_consumer_crash(rig: Rig) {
    let event = posted("c1", 1);
    rig.bus
        .publish_batch(std::slice::from_ref(&event))
        .await
        .unwrap();
    {
        let mut crashed = rig.bus.consumer(&rig.spec("crashy")).await.unwrap();
        let delivery = tokio::time::timeout(Duration::from_secs(5), crashed.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(delivery.event.id, event.id);
        drop(delivery); // the replica dies before acknowledging
    }
    let mut restarted = rig.bus.consumer(&rig.spec("crashy")).await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(10), restarted.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.event.id, event.id);
    assert!(again.attempt >= 2, "redelivery is marked as such");
    again.ack().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), restarted.next())
            .await
            .is_err(),
        "acked events stay acked"
    );
}

async fn nak_redelivers_after_the_delay(rig: Rig) {
    rig.bus.publish_batch(&[posted("c1", 1)]).await.unwrap();
    let mut consumer = rig.bus.consumer(&rig.spec("naks")).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap();
    let id = first.event.id.clone();
    let started = tokio::time::Instant::now();
    first.nak(Duration::from_millis(400)).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.event.id, id);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "redelivered too early: {:?}",
        started.elapsed()
    );
    second.ack().await.unwrap();
}

async fn replicas_share_a_durable_consumer(rig: Rig) {
    let events: Vec<RawEvent> = (0..200)
        .map(|i| posted(&format!("c{}", i % 10), i))
        .collect();
    rig.bus.publish_batch(&events).await.unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for replica in 0..2 {
        let mut consumer = rig.bus.consumer(&rig.spec("shared")).await.unwrap();
        let received = Arc::clone(&received);
        tasks.push(tokio::spawn(async move {
            let mut mine = 0;
            while let Ok(Ok(delivery)) =
                tokio::time::timeout(Duration::from_millis(1500), consumer.next()).await
            {
                received.lock().unwrap().push(delivery.event.id.clone());
                delivery.ack().await.unwrap();
                mine += 1;
            }
            (replica, mine)
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let received = received.lock().unwrap();
    let unique: HashSet<&String> = received.iter().collect();
    assert_eq!(unique.len(), 200, "every event reached one replica");
    assert_eq!(received.len(), 200, "no event reached both replicas");
}

async fn outbox_relay_restart_loses_and_doubles_nothing(rig: Rig) {
    let keys = ["a", "b", "c", "d", "e", "f"];
    let events: Vec<RawEvent> = (0..600)
        .map(|i| posted(keys[i as usize % keys.len()], i))
        .collect();
    for chunk in events.chunks(20) {
        rig.enqueue(chunk).await;
    }
    // One in ten events "crashes" after its effect committed, before the ack.
    let fail: HashSet<String> = events.iter().step_by(10).map(|e| e.id.clone()).collect();
    let handler = Effects {
        db: rig.db.clone(),
        fail_after_commit: Arc::new(Mutex::new(fail)),
    };
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let consumer = rig.bus.consumer(&rig.spec("relay-restart")).await.unwrap();
    tracker.spawn(runner::run(
        consumer,
        handler,
        RunOptions::new("relay-restart"),
        stop.clone(),
    ));

    // The relay publishes a few batches, then dies mid-stream.
    let relay_stop = CancellationToken::new();
    let relay = tokio::spawn(rig.relay(50).run(relay_stop.clone()));
    // Stopped as soon as it has published something, however slow the machine is.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while rig.relay(50).pending().await.unwrap() >= 600 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    relay_stop.cancel();
    relay.await.unwrap();
    let left = rig.relay(50).pending().await.unwrap();
    assert!(
        left > 0 && left < 600,
        "the relay stopped mid-stream ({left} left)"
    );

    // Rows published but not yet marked are sent again by the next relay.
    let restarted = CancellationToken::new();
    tracker.spawn(rig.relay(50).run(restarted.clone()));
    let effects = wait_for_effects(&rig, 600, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await; // let redeliveries land
    assert_exactly_once(&rig.effects().await, &events);
    assert_eq!(effects.len(), 600);
    assert_eq!(rig.relay(50).pending().await.unwrap(), 0);
    stop.cancel();
    restarted.cancel();
    tracker.close();
    tracker.wait().await;
}

async fn broker_restart_mid_stream_loses_nothing(mut rig: Rig) {
    let events: Vec<RawEvent> = (0..1000)
        .map(|i| posted(&format!("k{}", i % 7), i))
        .collect();
    let handler = Effects {
        db: rig.db.clone(),
        fail_after_commit: Arc::new(Mutex::new(HashSet::new())),
    };

    let run = |rig: &Rig, stop: &CancellationToken, tracker: &TaskTracker| {
        let bus = rig.bus.clone();
        let spec = rig.spec("broker-restart");
        let handler = handler.clone();
        let stop_consumer = stop.clone();
        tracker.spawn(async move {
            // The consumer may come up before the broker is back: retry like a service would.
            loop {
                match bus.consumer(&spec).await {
                    Ok(consumer) => {
                        return runner::run(
                            consumer,
                            handler,
                            RunOptions::new("broker-restart"),
                            stop_consumer,
                        )
                        .await;
                    }
                    Err(_) if !stop_consumer.is_cancelled() => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(_) => return,
                }
            }
        });
        tracker.spawn(rig.relay(100).run(stop.clone()));
    };

    let first = CancellationToken::new();
    let tracker = TaskTracker::new();
    run(&rig, &first, &tracker);
    for chunk in events[..500].chunks(25) {
        rig.enqueue(chunk).await;
    }
    wait_for_effects(&rig, 100, Duration::from_secs(20)).await;

    // The broker dies mid-stream; the service keeps writing to its outbox meanwhile.
    if matches!(rig.broker, Broker::Memory { .. }) {
        // The in-process bus lives in the process: a broker restart is a process restart, so
        // the old process's relay and consumer are gone before the journal is opened again.
        first.cancel();
        tracker.close();
        tracker.wait().await;
        tracker.reopen();
    }
    rig.restart_broker().await;
    for chunk in events[500..].chunks(25) {
        rig.enqueue(chunk).await;
    }
    let second = CancellationToken::new();
    if matches!(rig.broker, Broker::Memory { .. }) {
        run(&rig, &second, &tracker);
    }
    wait_for_effects(&rig, 1000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_exactly_once(&rig.effects().await, &events);
    first.cancel();
    second.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Fails the first attempt of some events (transiently), recording the order of successes.
/// Like every handler it is idempotent: an event already applied is skipped (the inbox's job
/// in a service), because a failed batch is retried as a whole.
struct Ordered {
    seen: Arc<Mutex<BTreeMap<String, Vec<i64>>>>,
    applied: Mutex<HashSet<String>>,
    attempts: Mutex<HashMap<String, u32>>,
}

impl Handler for Ordered {
    async fn handle(&self, event: &RawEvent) -> Result<(), HandlerError> {
        if self.applied.lock().unwrap().contains(&event.id) {
            return Ok(());
        }
        let envelope = event.decode::<MessagePosted>()?;
        let seq = envelope.event.message.map_or(0, |m| m.sequence);
        let first_try = {
            let mut attempts = self.attempts.lock().unwrap();
            let n = attempts.entry(event.id.clone()).or_default();
            *n += 1;
            *n == 1
        };
        if first_try && seq % 5 == 0 {
            return Err(HandlerError::Transient("flaky dependency".into()));
        }
        // Give other lanes a chance to overtake, which they may, unlike events of this key.
        tokio::time::sleep(Duration::from_micros(200 * (seq as u64 % 3))).await;
        self.seen
            .lock()
            .unwrap()
            .entry(envelope.event.conversation_id)
            .or_default()
            .push(seq);
        self.applied.lock().unwrap().insert(event.id.clone());
        Ok(())
    }
}

async fn per_key_order_is_kept(rig: Rig) {
    per_key_order(rig, RunOptions::new("ordered").attempts_in_lane).await;
}

/// Events whose first attempt fails are handed back to the broker at once: the later events
/// of their key wait for them.
async fn per_key_order_is_kept_when_an_event_is_handed_back(rig: Rig) {
    per_key_order(rig, 1).await;
}

async fn per_key_order(rig: Rig, attempts_in_lane: u32) {
    let keys = ["k1", "k2", "k3", "k4"];
    let per_key = 60;
    let mut events = Vec::new();
    for seq in 0..per_key {
        for key in keys {
            events.push(posted(key, seq));
        }
    }
    for chunk in events.chunks(40) {
        rig.enqueue(chunk).await;
    }
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let handler = Ordered {
        seen: Arc::clone(&seen),
        applied: Mutex::new(HashSet::new()),
        attempts: Mutex::new(HashMap::new()),
    };
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    // Order is promised while deliveries are handled within the ack wait.
    let spec = ConsumerSpec {
        ack_wait: Duration::from_secs(20),
        ..rig.spec("ordered")
    };
    let consumer = rig.bus.consumer(&spec).await.unwrap();
    let options = RunOptions {
        lanes: 4,
        attempts_in_lane,
        nak_delay: Duration::from_millis(100),
        ..RunOptions::new("ordered")
    };
    tracker.spawn(runner::run(consumer, handler, options, stop.clone()));
    tracker.spawn(rig.relay(64).run(stop.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().values().map(Vec::len).sum::<usize>() < events.len()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    let seen = seen.lock().unwrap();
    for key in keys {
        let expected: Vec<i64> = (0..per_key).collect();
        assert_eq!(seen.get(key), Some(&expected), "order of {key}");
    }
}

macro_rules! bus_contract_tests {
    ($adapter:ident, $rig:expr) => {
        mod $adapter {
            use super::*;

            #[tokio::test]
            async fn typed_events_round_trip() {
                super::typed_events_round_trip($rig).await;
            }

            #[tokio::test]
            async fn duplicate_publishes_are_dropped() {
                super::duplicate_publishes_are_dropped($rig).await;
            }

            #[tokio::test]
            async fn delivery_survives_a_consumer_crash() {
                super::delivery_survives_a_consumer_crash($rig).await;
            }

            #[tokio::test]
            async fn nak_redelivers_after_the_delay() {
                super::nak_redelivers_after_the_delay($rig).await;
            }

            #[tokio::test]
            async fn replicas_share_a_durable_consumer() {
                super::replicas_share_a_durable_consumer($rig).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn outbox_relay_restart_loses_and_doubles_nothing() {
                super::outbox_relay_restart_loses_and_doubles_nothing($rig).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn broker_restart_mid_stream_loses_nothing() {
                super::broker_restart_mid_stream_loses_nothing($rig).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn per_key_order_is_kept() {
                super::per_key_order_is_kept($rig).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn per_key_order_is_kept_when_an_event_is_handed_back() {
                super::per_key_order_is_kept_when_an_event_is_handed_back($rig).await;
            }
        }
    };
}

bus_contract_tests!(nats_jetstream, Rig::nats().await);
bus_contract_tests!(in_process, Rig::memory().await);

// ---------------------------------------------------------------------------------------------
// Replicas sharing one PostgreSQL outbox: one relay is elected, the others stand by.

const WAKEUPS: &str = "tandem.live.outbox.v1.wake.bus-test";

/// A replica's relay: its own broker connection, the shared database.
async fn replica_relay(rig: &Rig, poll_interval: Duration) -> OutboxRelay {
    let bus = Bus::connect(&rig.cfg, None).await.unwrap();
    let cfg = OutboxConfig {
        poll_interval,
        ..OutboxConfig::default()
    };
    OutboxRelay::new(rig.db.clone(), bus, cfg).with_wakeups(WAKEUPS)
}

async fn wait_until(what: &str, within: Duration, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a replica's relay until `stop` and waits until it is elected.
async fn elected_relay(
    rig: &Rig,
    poll: Duration,
    stop: &CancellationToken,
) -> (OutboxWaker, tokio::task::JoinHandle<()>) {
    let relay = replica_relay(rig, poll).await;
    let waker = relay.waker();
    let run = tokio::spawn(relay.run(stop.clone()));
    wait_until("the relay is elected", Duration::from_secs(10), || {
        waker.is_relaying()
    })
    .await;
    (waker, run)
}

/// Runs the effects consumer on the rig's bus until `stop`.
async fn apply_effects(rig: &Rig, durable: &str, tracker: &TaskTracker, stop: &CancellationToken) {
    let handler = Effects {
        db: rig.db.clone(),
        fail_after_commit: Arc::default(),
    };
    let consumer = rig.bus.consumer(&rig.spec(durable)).await.unwrap();
    tracker.spawn(runner::run(
        consumer,
        handler,
        RunOptions::new(durable),
        stop.clone(),
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replica_wakes_the_elected_relay() {
    let rig = Rig::nats().await;
    let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
    apply_effects(&rig, "standby-wakeups", &tracker, &stop).await;
    // A poll far longer than the test: only a wake-up can get the events out in time.
    let poll = Duration::from_secs(120);
    let (elected_waker, elected) = elected_relay(&rig, poll, &stop).await;
    let standby = replica_relay(&rig, poll).await;
    let standby_waker = standby.waker();
    tracker.spawn(standby.run(stop.clone()));

    // Rounds of commits on the standby replica, each woken there only.
    for round in 0..3 {
        let events: Vec<RawEvent> = (0..5).map(|i| posted("standby", round * 5 + i)).collect();
        rig.enqueue(&events).await;
        standby_waker.wake();
        let want = (round as usize + 1) * 5;
        let effects = wait_for_effects(&rig, want, Duration::from_secs(20)).await;
        assert_eq!(effects.len(), want, "round {round} was published");
    }
    assert!(elected_waker.is_relaying());
    assert!(!standby_waker.is_relaying());
    stop.cancel();
    elected.await.unwrap();
    tracker.close();
    tracker.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_relay_takes_over_when_the_elected_one_stops() {
    let rig = Rig::nats().await;
    let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
    apply_effects(&rig, "relay-takeover", &tracker, &stop).await;
    let poll = Duration::from_millis(50);
    let first_stop = CancellationToken::new();
    let (first_waker, first_run) = elected_relay(&rig, poll, &first_stop).await;
    let second = replica_relay(&rig, poll).await;
    let second_waker = second.waker();
    tracker.spawn(second.run(stop.clone()));

    let before: Vec<RawEvent> = (0..10).map(|i| posted("takeover", i)).collect();
    rig.enqueue(&before).await;
    second_waker.wake();
    assert_eq!(
        wait_for_effects(&rig, 10, Duration::from_secs(20))
            .await
            .len(),
        10
    );
    assert!(!second_waker.is_relaying(), "one relay at a time");

    first_stop.cancel();
    first_run.await.unwrap();
    assert!(!first_waker.is_relaying());
    wait_until("the standby takes over", Duration::from_secs(20), || {
        second_waker.is_relaying()
    })
    .await;
    let after: Vec<RawEvent> = (10..20).map(|i| posted("takeover", i)).collect();
    rig.enqueue(&after).await;
    second_waker.wake();
    let effects = wait_for_effects(&rig, 20, Duration::from_secs(20)).await;
    let all: Vec<RawEvent> = before.into_iter().chain(after).collect();
    assert_exactly_once(&effects, &all);
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

/// A batch that cannot be published holds back the batches after it, even the one the relay
/// claimed while publishing it. Made with an event no stream captures, last in its batch, so
/// that the broker refuses it after storing the others, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fails_holds_back_the_next_one_already_claimed() {
    let rig = Rig::nats().await;
    let batch = 1000;
    let mut events: Vec<RawEvent> = (0..3 * i64::from(batch))
        .map(|i| posted("held", i))
        .collect();
    events[batch as usize - 1].subject = "tandem.nowhere.v1.event.acme".to_owned();
    for chunk in events.chunks(500) {
        rig.enqueue(chunk).await;
    }
    let relay = rig.relay(batch);
    for round in 0..3 {
        let result = relay.publish_pending().await;
        assert!(result.is_err(), "round {round}: {result:?}");
    }
    relay.settled().await;
    assert_eq!(
        relay.pending().await.unwrap(),
        events.len() as i64,
        "nothing after the failing batch was published"
    );
}

/// A connection that breaks in the middle of a batch loses what was in the socket, while the
/// client sends what it had not written yet once it has reconnected. The events sent after the
/// reconnection must not be stored ahead of the lost ones: the stream keeps the outbox's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_broken_mid_batch_keeps_the_stream_in_order() {
    let rig = Rig::nats().await;
    let Broker::Nats { server, .. } = &rig.broker else {
        unreachable!("a NATS rig")
    };
    let link = TcpLink::start(([127, 0, 0, 1], server.port()).into())
        .await
        .unwrap();
    let cfg = BusConfig {
        nats_url: link.url("nats"),
        ..rig.cfg.clone()
    };
    let bus = Bus::connect(&cfg, None).await.unwrap();
    // One batch of 32 MiB, far more than the socket buffers hold: when the link breaks, part
    // of the batch is lost in the sockets and part is still waiting in the client.
    let batch = 1000;
    let events: Vec<RawEvent> = (0..i64::from(batch))
        .map(|i| RawEvent {
            payload: bytes::Bytes::from(vec![b'x'; 32 * 1024]),
            ..posted("cut", i)
        })
        .collect();
    let relay = OutboxRelay::new(
        rig.db.clone(),
        bus,
        OutboxConfig {
            batch_size: batch,
            ..OutboxConfig::default()
        },
    );
    // A relay's first batch goes out one event at a time; the batch under test is pipelined.
    let first_of_all = posted("before", 0);
    rig.enqueue(std::slice::from_ref(&first_of_all)).await;
    assert_eq!(relay.publish_pending().await.unwrap(), 1);
    for chunk in events.chunks(100) {
        rig.enqueue(chunk).await;
    }
    link.break_after(4 << 20);
    let first = relay.publish_pending().await;
    assert_eq!(link.breaks(), 1, "the link broke during the batch");
    assert!(
        first.is_err(),
        "a batch cut short is not confirmed: {first:?}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while relay.pending().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the batch went out");
        let _ = relay.publish_pending().await;
    }

    let mut stored = Vec::new();
    for id in stored_ids(server).await {
        if !stored.contains(&id) {
            stored.push(id);
        }
    }
    let sent: Vec<String> = std::iter::once(&first_of_all)
        .chain(&events)
        .map(|e| e.id.clone())
        .collect();
    assert_eq!(stored.len(), sent.len(), "every event stored once");
    let first_out_of_place = stored.iter().zip(&sent).position(|(s, e)| s != e);
    assert_eq!(
        first_out_of_place, None,
        "the stream holds the events in the outbox's order"
    );
}

/// An operator deletes a service's durable consumer on the server: the service's consumer opens
/// it again and goes on, and the events it reads again are applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_durable_consumer_is_opened_again() {
    let rig = Rig::nats().await;
    let Broker::Nats { server, .. } = &rig.broker else {
        unreachable!("a NATS rig")
    };
    let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
    apply_effects(&rig, "deleted", &tracker, &stop).await;
    let before: Vec<RawEvent> = (0..5).map(|i| posted("deleted", i)).collect();
    rig.bus.publish_batch(&before).await.unwrap();
    wait_for_effects(&rig, 5, Duration::from_secs(20)).await;

    let client = async_nats::connect(server.url()).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream(DIALOG.name)
        .await
        .unwrap();
    stream.delete_consumer("deleted").await.unwrap();
    let after: Vec<RawEvent> = (5..10).map(|i| posted("deleted", i)).collect();
    rig.bus.publish_batch(&after).await.unwrap();
    let effects = wait_for_effects(&rig, 10, Duration::from_secs(30)).await;
    // Whatever the re-created consumer delivers again must be skipped, not applied twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all: Vec<RawEvent> = before.into_iter().chain(after).collect();
    assert_eq!(effects.len(), 10);
    assert_exactly_once(&rig.effects().await, &all);
    stream.consumer_info("deleted").await.unwrap();
    stop.cancel();
    tracker.close();
    tracker.wait().await;
}

/// A batch larger than the publishes the client lets wait for an acknowledgement (4,096) goes
/// out whole, instead of waiting forever for a free slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_acknowledgements_in_flight_goes_out() {
    let rig = Rig::nats().await;
    let events: Vec<RawEvent> = (0..5000).map(|i| posted("large", i)).collect();
    for chunk in events.chunks(1000) {
        rig.enqueue(chunk).await;
    }
    let relay = rig.relay(10_000);
    let published = tokio::time::timeout(Duration::from_secs(60), relay.publish_pending())
        .await
        .expect("the batch did not wait forever")
        .unwrap();
    assert_eq!(published, 5000);
    // Published rows are deleted off the relay's path; wait for those deletions.
    relay.settled().await;
    assert_eq!(relay.pending().await.unwrap(), 0);
}

/// The in-process bus keeps messages for its retention's max age, in memory and in its journal,
/// and de-duplicates within its retention's window.
#[tokio::test]
async fn the_in_process_bus_drops_messages_past_their_age() {
    use tandem_platform::bus::memory::Retention;

    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("bus.db");
    let bus = MemoryBus::open(&journal).await.unwrap();
    bus.set_retention(Retention {
        max_age: Duration::from_millis(300),
        duplicate_window: Duration::from_millis(100),
    });
    let old: Vec<RawEvent> = (0..3).map(|i| posted("aged", i)).collect();
    bus.publish_batch(&old).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Past the duplicate window the same id is stored again, as JetStream would.
    let new = vec![posted("aged", 3), old[0].clone()];
    bus.publish_batch(&new).await.unwrap();
    bus.flush().await.unwrap();

    let want = vec![new[0].id.clone(), new[1].id.clone()];
    assert_eq!(
        delivered(&bus, "aged").await,
        want,
        "only the young messages"
    );
    drop(bus);
    let reopened = MemoryBus::open(&journal).await.unwrap();
    assert_eq!(
        delivered(&reopened, "fresh").await,
        want,
        "the journal dropped them too"
    );
}

/// The ids a new durable consumer of the dialog stream receives, until none comes for 300 ms.
async fn delivered(bus: &MemoryBus, durable: &str) -> Vec<String> {
    let spec = ConsumerSpec::new(durable, &DIALOG, &BusConfig::default()).event::<MessagePosted>();
    let mut consumer = bus.consumer(&spec).unwrap();
    let mut ids = Vec::new();
    while let Ok(Ok(delivery)) =
        tokio::time::timeout(Duration::from_millis(300), consumer.next()).await
    {
        ids.push(delivery.event.id.clone());
        delivery.ack().await.unwrap();
    }
    ids
}

/// A relay taking over may find a batch another relay left half stored, with events committed
/// since in between: its first batch (one event at a time) still goes out whole, and so do the
/// pipelined ones after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_left_half_stored_goes_out_whole_from_the_next_relay() {
    let rig = Rig::nats().await;
    let events: Vec<RawEvent> = (0..6).map(|i| posted("taken-over", i)).collect();
    // The relay before stored the 1st and the 3rd of these, then died; the 2nd committed late.
    rig.bus
        .publish_batch(&[events[0].clone(), events[2].clone()])
        .await
        .unwrap();
    rig.enqueue(&events[..4]).await;
    let relay = rig.relay(100);
    assert_eq!(relay.publish_pending().await.unwrap(), 4);
    rig.enqueue(&events[4..]).await;
    assert_eq!(relay.publish_pending().await.unwrap(), 2);
    // Published rows are deleted off the relay's path; wait for those deletions.
    relay.settled().await;
    assert_eq!(relay.pending().await.unwrap(), 0);

    let Broker::Nats { server, .. } = &rig.broker else {
        unreachable!("a NATS rig")
    };
    let stored = stored_ids(server).await;
    let order = [0, 2, 1, 3, 4, 5].map(|i| events[i].id.clone());
    assert_eq!(
        stored, order,
        "each event once, the late one after those stored before it"
    );
}

/// The event ids the dialog stream holds, in stream order.
async fn stored_ids(server: &NatsServer) -> Vec<String> {
    let client = async_nats::connect(server.url()).await.unwrap();
    let mut stream = async_nats::jetstream::new(client)
        .get_stream(DIALOG.name)
        .await
        .unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut stored = Vec::new();
    for seq in 1..=last {
        let message = stream.get_raw_message(seq).await.unwrap();
        stored.push(message.headers.get(headers::MSG_ID).unwrap().to_string());
    }
    stored
}
