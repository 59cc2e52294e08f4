//! Event path benchmark: outbox (PostgreSQL) → relay → JetStream → consumer with inbox
//! (PostgreSQL), beside a raw async-nats JetStream publish + consume measured in the same run
//! on the same throwaway servers.
//!
//! Run with `make bench` (or `cargo bench -p tandem-platform --bench event_path`).
//! `BENCH_SECONDS` (default 5) sets the latency phases' length, `BENCH_EVENTS` (default
//! 100000) the throughput phases' size, `BENCH_RATE` (default 2000/s) the latency phases' rate.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use tandem_platform::bus::runner::{self, Handler, HandlerError, RunOptions};
use tandem_platform::bus::{Bus, ConsumerSpec, RawEvent};
use tandem_platform::config::{BusConfig, DatabaseConfig, OutboxConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::outbox::{OutboxRelay, OutboxWaker};
use tandem_platform::{inbox, outbox};
use tandem_proto::events::DIALOG;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::dialog::v1::{Message, MessagePosted};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn micros(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64
}

fn sample_event(i: u64) -> MessagePosted {
    MessagePosted {
        conversation_id: format!("conv-{}", i % 500),
        scenario_id: "returns".into(),
        message: Some(Message {
            id: format!("m{i}"),
            conversation_id: format!("conv-{}", i % 500),
            sequence: i as i64,
            text: "我的订单 123456789 还没到，can you check?".into(),
            ..Message::default()
        }),
        ..MessagePosted::default()
    }
}

// ------------------------------------------------------------------------------------------
// Baseline: raw async-nats JetStream publish with ack, durable pull consumer with ack.

async fn raw_setup(
    client: &async_nats::Client,
    name: &str,
) -> (jetstream::Context, consumer::PullConsumer) {
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(format!("{name}-c")),
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    (js, consumer)
}

async fn raw_latency(
    client: &async_nats::Client,
    name: &str,
    rate: u64,
    seconds: u64,
) -> Histogram<u64> {
    let (js, consumer) = raw_setup(client, name).await;
    let total = rate * seconds;
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let base = Instant::now();
    let h = Arc::clone(&hist);
    let reader = tokio::spawn(async move {
        let mut messages = consumer.messages().await.unwrap();
        let mut n = 0;
        while n < total {
            let message = messages.next().await.unwrap().unwrap();
            let sent = u64::from_le_bytes(message.payload[..8].try_into().unwrap());
            message.ack().await.unwrap();
            let now = base.elapsed().as_micros() as u64;
            h.lock()
                .await
                .record(now.saturating_sub(sent).max(1))
                .unwrap();
            n += 1;
        }
    });
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let body = sample_event(0).encode_to_vec_helper();
    for i in 0..total {
        tick.tick().await;
        let mut payload = (base.elapsed().as_micros() as u64).to_le_bytes().to_vec();
        payload.extend_from_slice(&body);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{name}-{i}").as_str());
        js.publish_with_headers(format!("{name}.x.{}", i % 500), headers, payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    reader.await.unwrap();
    Arc::try_unwrap(hist).unwrap().into_inner()
}

/// The raw path plus the durable writes our path makes: the state change committed before the
/// publish, and the consumer's effect committed before its ack. This isolates what the outbox,
/// relay, runner and inbox add beyond the database and broker work itself.
async fn raw_with_commits_latency(
    client: &async_nats::Client,
    db_url: String,
    rate: u64,
    seconds: u64,
) -> Histogram<u64> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&db_url)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE raw_state (id TEXT PRIMARY KEY, payload BYTEA NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE raw_effects (id TEXT PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    let (js, consumer) = raw_setup(client, "RAWPG").await;
    let total = rate * seconds;
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let base = Instant::now();
    let h = Arc::clone(&hist);
    let reader_pool = pool.clone();
    let reader = tokio::spawn(async move {
        let mut messages = consumer.messages().await.unwrap();
        let mut n = 0;
        while n < total {
            let message = messages.next().await.unwrap().unwrap();
            let sent = u64::from_le_bytes(message.payload[..8].try_into().unwrap());
            let mut tx = reader_pool.begin().await.unwrap();
            sqlx::query("INSERT INTO raw_effects (id) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(format!("{n}"))
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            message.ack().await.unwrap();
            let now = base.elapsed().as_micros() as u64;
            h.lock()
                .await
                .record(now.saturating_sub(sent).max(1))
                .unwrap();
            n += 1;
        }
    });
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let body = sample_event(0).encode_to_vec_helper();
    let mut commit = Histogram::<u64>::new(3).unwrap();
    for i in 0..total {
        tick.tick().await;
        let sent = base.elapsed().as_micros() as u64;
        let started = Instant::now();
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO raw_state (id, payload) VALUES ($1, $2)")
            .bind(format!("{i}"))
            .bind(&body)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        commit
            .record(started.elapsed().as_micros().max(1) as u64)
            .unwrap();
        let mut payload = sent.to_le_bytes().to_vec();
        payload.extend_from_slice(&body);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("rawpg-{i}").as_str());
        js.publish_with_headers(format!("RAWPG.x.{}", i % 500), headers, payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    reader.await.unwrap();
    println!(
        "state commit alone (plain pool, one-row insert): p50 {} µs, p99 {} µs",
        commit.value_at_quantile(0.5),
        commit.value_at_quantile(0.99)
    );
    Arc::try_unwrap(hist).unwrap().into_inner()
}

async fn raw_throughput(client: &async_nats::Client, total: u64) -> f64 {
    let (js, consumer) = raw_setup(client, "RAWTPT").await;
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let mut messages = consumer.messages().await.unwrap();
        for _ in 0..total {
            let message = messages.next().await.unwrap().unwrap();
            message.ack().await.unwrap();
        }
    });
    let body = bytes::Bytes::from(sample_event(0).encode_to_vec_helper());
    let mut window = Vec::with_capacity(512);
    for i in 0..total {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("rawt-{i}").as_str());
        window.push(
            js.publish_with_headers(format!("RAWTPT.x.{}", i % 500), headers, body.clone())
                .await
                .unwrap(),
        );
        if window.len() == 512 {
            for ack in window.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in window.drain(..) {
        ack.await.unwrap();
    }
    reader.await.unwrap();
    total as f64 / started.elapsed().as_secs_f64()
}

trait EncodeHelper {
    fn encode_to_vec_helper(&self) -> Vec<u8>;
}

impl EncodeHelper for MessagePosted {
    fn encode_to_vec_helper(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(self)
    }
}

// ------------------------------------------------------------------------------------------
// Tandem: outbox → relay → JetStream → runner → inbox + effect, all committed.

struct Recorder {
    db: Db,
    hist: Arc<std::sync::Mutex<Histogram<u64>>>,
    received: Arc<std::sync::Mutex<Histogram<u64>>>,
    handled: Arc<std::sync::atomic::AtomicU64>,
}

impl Handler for Recorder {
    async fn handle(&self, event: &RawEvent) -> Result<(), HandlerError> {
        self.handle_batch(std::slice::from_ref(event)).await
    }

    async fn handle_batch(&self, events: &[RawEvent]) -> Result<(), HandlerError> {
        let Db::Postgres(pool) = &self.db else {
            unreachable!("bench runs on PostgreSQL")
        };
        {
            let now = chrono::Utc::now();
            let mut received = self.received.lock().unwrap();
            for event in events {
                let lag = (now - event.occurred_at).num_microseconds().unwrap_or(0);
                received.record(lag.max(1) as u64).unwrap();
            }
        }
        let transient = |e: sqlx::Error| HandlerError::Transient(e.to_string());
        let mut tx = pool.begin().await.map_err(transient)?;
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let fresh = inbox::claim_batch_pg(&mut tx, "bench", &ids)
            .await
            .map_err(transient)?;
        tx.commit().await.map_err(transient)?;
        let now = chrono::Utc::now();
        let mut hist = self.hist.lock().unwrap();
        for event in events.iter().filter(|e| fresh.contains(&e.id)) {
            let lag = (now - event.occurred_at)
                .num_microseconds()
                .unwrap_or(0)
                .max(1) as u64;
            hist.record(lag).unwrap();
        }
        self.handled
            .fetch_add(fresh.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

struct TandemPath {
    db: Db,
    waker: OutboxWaker,
    hist: Arc<std::sync::Mutex<Histogram<u64>>>,
    received: Arc<std::sync::Mutex<Histogram<u64>>>,
    handled: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
}

/// The plain NATS subject the bench's relays pass wake-ups on.
const WAKEUPS: &str = "tandem.live.outbox.v1.wake.bench";

async fn tandem_path(
    nats_url: &str,
    db_url: String,
    durable: &str,
    poll_interval: Duration,
) -> TandemPath {
    let bus_cfg = BusConfig {
        nats_url: nats_url.to_owned(),
        ..BusConfig::default()
    };
    let bus = Bus::connect(&bus_cfg, None).await.unwrap();
    bus.ensure_streams().await.unwrap();
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(db_url),
        max_connections: 16,
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    db.migrate(None).await.unwrap();
    let stop = CancellationToken::new();
    let relay = OutboxRelay::new(
        db.clone(),
        bus.clone(),
        OutboxConfig {
            batch_size: 1000,
            poll_interval,
            ..OutboxConfig::default()
        },
    )
    .with_wakeups(WAKEUPS);
    let waker = relay.waker();
    tokio::spawn(relay.run(stop.clone()));
    let hist = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let received = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let handled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let spec = ConsumerSpec::new(durable, &DIALOG, &bus_cfg).event::<MessagePosted>();
    let consumer = bus.consumer(&spec).await.unwrap();
    let recorder = Recorder {
        db: db.clone(),
        hist: Arc::clone(&hist),
        received: Arc::clone(&received),
        handled: Arc::clone(&handled),
    };
    tokio::spawn(runner::run(
        consumer,
        recorder,
        RunOptions {
            lanes: env_or("BENCH_LANES", 4) as usize,
            max_batch: 256,
            ..RunOptions::new(durable)
        },
        stop.clone(),
    ));
    TandemPath {
        db,
        waker,
        hist,
        received,
        handled,
        stop,
    }
}

async fn enqueue(db: &Db, events: &[RawEvent]) {
    let Db::Postgres(pool) = db else {
        unreachable!()
    };
    let mut tx = pool.begin().await.unwrap();
    outbox::enqueue_pg(&mut tx, events).await.unwrap();
    tx.commit().await.unwrap();
}

async fn wait_handled(path: &TandemPath, total: u64) {
    while path.handled.load(std::sync::atomic::Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn tandem_latency(
    nats_url: &str,
    db_url: String,
    rate: u64,
    seconds: u64,
) -> (Histogram<u64>, Histogram<u64>) {
    let path = tandem_path(nats_url, db_url, "bench-latency", bench_poll()).await;
    let tenant = TenantId::new("bench").unwrap();
    let total = rate * seconds;
    let mut commit = Histogram::<u64>::new(3).unwrap();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for i in 0..total {
        tick.tick().await;
        // One state change, one event, one commit; then the relay is woken.
        let event = RawEvent::new(&tenant, &sample_event(i), Some(format!("conv-{}", i % 500)));
        let started = Instant::now();
        enqueue(&path.db, std::slice::from_ref(&event)).await;
        commit
            .record(started.elapsed().as_micros().max(1) as u64)
            .unwrap();
        path.waker.wake();
    }
    wait_handled(&path, total).await;
    path.stop.cancel();
    println!(
        "outbox commit alone: p50 {} µs, p99 {} µs",
        commit.value_at_quantile(0.5),
        commit.value_at_quantile(0.99)
    );
    (
        path.hist.lock().unwrap().clone(),
        path.received.lock().unwrap().clone(),
    )
}

fn bench_poll() -> Duration {
    Duration::from_millis(env_or("BENCH_POLL_MS", 100))
}

/// Events committed on a replica whose relay stands by while another replica's relay is
/// elected, both with the default poll; the standby passes its wake-ups on when `wakeups`.
async fn standby_latency(
    nats_url: &str,
    db_url: String,
    wakeups: bool,
    rate: u64,
    seconds: u64,
) -> Histogram<u64> {
    let durable = if wakeups {
        "standby-woken"
    } else {
        "standby-polled"
    };
    let poll = OutboxConfig::default().poll_interval;
    let path = tandem_path(nats_url, db_url.clone(), durable, poll).await;
    while !path.waker.is_relaying() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let bus_cfg = BusConfig {
        nats_url: nats_url.to_owned(),
        ..BusConfig::default()
    };
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(db_url),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    let standby = OutboxRelay::new(
        db.clone(),
        Bus::connect(&bus_cfg, None).await.unwrap(),
        OutboxConfig::default(),
    );
    let standby = if wakeups {
        standby.with_wakeups(WAKEUPS)
    } else {
        standby
    };
    let waker = standby.waker();
    tokio::spawn(standby.run(path.stop.clone()));
    let tenant = TenantId::new("bench").unwrap();
    let total = rate * seconds;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for i in 0..total {
        tick.tick().await;
        let event = RawEvent::new(&tenant, &sample_event(i), Some(format!("conv-{}", i % 500)));
        enqueue(&db, std::slice::from_ref(&event)).await;
        waker.wake();
    }
    wait_handled(&path, total).await;
    assert!(!waker.is_relaying(), "the second relay stood by");
    path.stop.cancel();
    path.hist.lock().unwrap().clone()
}

async fn tandem_throughput(nats_url: &str, db_url: String, total: u64) -> f64 {
    let path = Arc::new(tandem_path(nats_url, db_url, "bench-throughput", bench_poll()).await);
    let tenant = TenantId::new("bench").unwrap();
    let started = Instant::now();
    let writers = 4;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let path = Arc::clone(&path);
        let tenant = tenant.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            let mut batch = Vec::with_capacity(50);
            while i < total {
                batch.push(RawEvent::new(
                    &tenant,
                    &sample_event(i),
                    Some(format!("conv-{}", i % 500)),
                ));
                if batch.len() == 50 {
                    enqueue(&path.db, &batch).await;
                    path.waker.wake();
                    batch.clear();
                }
                i += writers;
            }
            if !batch.is_empty() {
                enqueue(&path.db, &batch).await;
                path.waker.wake();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    wait_handled(&path, total).await;
    let rate = total as f64 / started.elapsed().as_secs_f64();
    path.stop.cancel();
    rate
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let seconds = env_or("BENCH_SECONDS", 5);
        let total = env_or("BENCH_EVENTS", 100_000);
        let rate = env_or("BENCH_RATE", 2_000);
        let nats = tandem_testkit::NatsServer::start().await.unwrap();
        let pg = tandem_testkit::Postgres::start().await.unwrap();
        let client = async_nats::connect(nats.url()).await.unwrap();
        println!("event path benchmark: nats-server {} (file storage, R1), PostgreSQL with fsync=off, 2 tokio workers", nats.version());
        println!("latency phases: {rate} events/s for {seconds} s; throughput phases: {total} events\n");

        // Warm both paths once so connection setup and JIT-like caches don't skew the figures.
        let _ = raw_latency(&client, "RAWWARM", 1000, 1).await;
        let raw = raw_latency(&client, "RAWLAT", rate, seconds).await;
        let raw_pg = raw_with_commits_latency(&client, pg.fresh_database().await.unwrap(), rate, seconds).await;
        let (ours, received) = tandem_latency(&nats.url(), pg.fresh_database().await.unwrap(), rate, seconds).await;
        let raw_tp = raw_throughput(&client, total).await;
        // Each phase's consumer reads its stream from the beginning: the throughput phase must
        // not count the latency phase's events, so the stream is emptied between phases.
        let events = jetstream::new(client.clone());
        events.get_stream(DIALOG.name).await.unwrap().purge().await.unwrap();
        let our_tp = tandem_throughput(&nats.url(), pg.fresh_database().await.unwrap(), total).await;
        let standby_rate = env_or("BENCH_STANDBY_RATE", 200);
        events.get_stream(DIALOG.name).await.unwrap().purge().await.unwrap();
        let polled = standby_latency(&nats.url(), pg.fresh_database().await.unwrap(), false, standby_rate, seconds).await;
        events.get_stream(DIALOG.name).await.unwrap().purge().await.unwrap();
        let woken = standby_latency(&nats.url(), pg.fresh_database().await.unwrap(), true, standby_rate, seconds).await;

        println!("{:<46} {:>10} {:>10} {:>10} {:>12}", "path", "p50 µs", "p99 µs", "max µs", "events/s");
        println!(
            "{:<46} {:>10.0} {:>10.0} {:>10.0} {:>12.0}",
            "raw JetStream publish+ack → pull consume+ack",
            micros(&raw, 0.5),
            micros(&raw, 0.99),
            raw.max() as f64,
            raw_tp
        );
        println!(
            "{:<46} {:>10.0} {:>10.0} {:>10.0} {:>12}",
            "raw + state commit before, inbox commit after",
            micros(&raw_pg, 0.5),
            micros(&raw_pg, 0.99),
            raw_pg.max() as f64,
            "-"
        );
        println!(
            "{:<46} {:>10.0} {:>10.0} {:>10.0} {:>12.0}",
            "outbox commit → relay → JetStream → inbox",
            micros(&ours, 0.5),
            micros(&ours, 0.99),
            ours.max() as f64,
            our_tp
        );
        println!(
            "{:<46} {:>10.0} {:>10.0} {:>10.0}",
            "  of which: outbox commit → handler start",
            micros(&received, 0.5),
            micros(&received, 0.99),
            received.max() as f64,
        );
        println!(
            "\nratios, tandem / raw:               p50 {:.2}×, p99 {:.2}×, throughput {:.2}×",
            micros(&ours, 0.5) / micros(&raw, 0.5),
            micros(&ours, 0.99) / micros(&raw, 0.99),
            our_tp / raw_tp
        );
        println!(
            "ratios, tandem / raw + same commits: p50 {:.2}×, p99 {:.2}×",
            micros(&ours, 0.5) / micros(&raw_pg, 0.5),
            micros(&ours, 0.99) / micros(&raw_pg, 0.99),
        );
        println!("goals: p99 ≤ 2.00× raw; ≥ 20000 events/s sustained");
        println!(
            "\nevents committed on a standby replica (another replica's relay elected, default {} ms poll), {standby_rate} events/s:",
            OutboxConfig::default().poll_interval.as_millis()
        );
        println!("{:<46} {:>10} {:>10} {:>10}", "path", "p50 µs", "p99 µs", "max µs");
        for (name, hist) in [
            ("standby commit → relay's poll → inbox", &polled),
            ("standby commit → wake-up over NATS → inbox", &woken),
        ] {
            println!(
                "{:<46} {:>10.0} {:>10.0} {:>10.0}",
                name,
                micros(hist, 0.5),
                micros(hist, 0.99),
                hist.max() as f64
            );
        }
        println!(
            "ratio, woken / polled: p50 {:.3}×",
            micros(&woken, 0.5) / micros(&polled, 0.5)
        );
    });
}
