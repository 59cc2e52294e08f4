//! Assignment benchmarks. Run: `cargo bench -p tandem-routing --bench assignment`.
//!
//! 1. Baselines in the same run: a raw JetStream publish + consume round trip and one
//!    PostgreSQL commit of a one-row insert.
//! 2. Handoff system latency: a routing process (the `tandem-routing` binary) on PostgreSQL and
//!    NATS with 100 agent desks connected over gRPC; a dialog stand-in publishes
//!    `HandoffRequested` on NATS at 50 per second; measured from the publish until the offer
//!    arrives on the agent's `AgentSession` stream.
//! 3. Assignment throughput with two routing processes (and one, for comparison): 4,000
//!    handoffs queued while the 100 agents are away; the agents go online through their desks
//!    and accept every offer; measured until every assignment is confirmed to its desk.
//!    Afterwards the checker over the database and the published events must find no double
//!    assignment and no capacity violation.
//! 4. The store alone in process, PostgreSQL and SQLite: batched offers + accepts by 4 workers.
//!
//! Prints HdrHistogram percentiles and rates.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use cluster::{Cluster, Desk, DeskEvent, check_database, check_events, handoff};
use hdrhistogram::Histogram;
use tandem_platform::bus::{ConsumerSpec, RawEvent};
use tandem_platform::config::{DatabaseConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::outbox::OutboxWaker;
use tandem_platform::runtime::Service as _;
use tandem_proto::events::ROUTING;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::routing::v1 as pb;
use tandem_routing::Routing;
use tandem_routing::domain::agent::{AgentProfile, Presence, Skill};
use tandem_routing::engine::{Engine, SystemClock};
use tandem_routing::store::{NewTicket, PresenceReason, Store};
use tokio::sync::mpsc;

const AGENTS: usize = 100;
const LATENCY_HANDOFFS: usize = 1_000;
const LATENCY_RATE: u64 = 50;
const THROUGHPUT_TICKETS: usize = 4_000;
const BASELINE_ROUNDS: usize = 500;
const WORKERS: usize = 4;

fn print(name: &str, h: &Histogram<u64>) {
    println!(
        "{name}: n={} p50={:.2} ms p90={:.2} ms p99={:.2} ms max={:.2} ms",
        h.len(),
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.90) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}

fn micros(d: Duration) -> u64 {
    d.as_micros().max(1) as u64
}

/// Raw JetStream publish + consume, and one PostgreSQL commit, on the cluster's servers.
async fn baselines(cluster: &Cluster) {
    let spec = ConsumerSpec::new("bench-baseline", &ROUTING, &cluster.bus_config)
        .event::<pb::QueueStatsReported>();
    let mut consumer = cluster.bus.consumer(&spec).await.unwrap();
    let mut bus = Histogram::<u64>::new(3).unwrap();
    for _ in 0..BASELINE_ROUNDS {
        let event = RawEvent::new(&cluster::tenant(), &pb::QueueStatsReported::default(), None);
        let started = Instant::now();
        cluster.publish(std::slice::from_ref(&event)).await;
        loop {
            let delivery = consumer.next().await.unwrap();
            let id = delivery.event.id.clone();
            delivery.ack().await.unwrap();
            if id == event.id {
                break;
            }
        }
        bus.record(micros(started.elapsed())).unwrap();
    }
    print("baseline raw JetStream publish + consume", &bus);
    let Db::Postgres(pool) = &cluster.db else {
        unreachable!()
    };
    sqlx::query("CREATE TABLE bench_commit (id BIGINT PRIMARY KEY, at BIGINT NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
    let mut commit = Histogram::<u64>::new(3).unwrap();
    for i in 0..BASELINE_ROUNDS {
        let started = Instant::now();
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO bench_commit (id, at) VALUES ($1, $2)")
            .bind(i as i64)
            .bind(Utc::now().timestamp_micros())
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        commit.record(micros(started.elapsed())).unwrap();
    }
    print("baseline PostgreSQL one-row insert + commit", &commit);
}

/// Handoff latency through one routing process with 100 desks, 50 handoffs per second.
async fn system_latency() {
    let cluster = Cluster::start().await;
    baselines(&cluster).await;
    let agents = cluster.agents(AGENTS, 50).await;
    let replica = cluster.replica("latency", &[]).await;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut desks = Vec::new();
    for agent in &agents {
        desks.push(
            Desk::open(
                &replica.url,
                agent,
                pb::Presence::Online,
                true,
                events_tx.clone(),
            )
            .await,
        );
    }
    // Warm up: a few handoffs not measured.
    for i in 0..20 {
        cluster.publish(&[handoff(&format!("warm-{i}"))]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    while events.try_recv().is_ok() {}

    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut arrived: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / LATENCY_RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    for i in 0..LATENCY_HANDOFFS {
        tick.tick().await;
        let key = format!("lat-{i}");
        let event = handoff(&key);
        sent.insert(format!("h-{key}"), Instant::now());
        cluster.publish(&[event]).await;
        while let Ok(event) = events.try_recv() {
            if let DeskEvent::Offer(handoff, at) = event {
                arrived.entry(handoff).or_insert(at);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while arrived.len() < LATENCY_HANDOFFS && Instant::now() < deadline {
        if let Ok(Some(DeskEvent::Offer(handoff, at))) =
            tokio::time::timeout(Duration::from_secs(1), events.recv()).await
        {
            arrived.entry(handoff).or_insert(at);
        }
    }
    let elapsed = started.elapsed();
    let mut latency = Histogram::<u64>::new(3).unwrap();
    for (handoff, at) in &arrived {
        if let Some(sent) = sent.get(handoff) {
            latency.record(micros(at.duration_since(*sent))).unwrap();
        }
    }
    println!(
        "system latency: {} handoffs at {LATENCY_RATE}/s over {:.1} s, {AGENTS} desks, one routing process",
        sent.len(),
        elapsed.as_secs_f64()
    );
    print(
        "handoff HandoffRequested published -> offer on the desk stream",
        &latency,
    );
    if latency.len() as usize != LATENCY_HANDOFFS {
        // The process fell behind the offered load: the percentiles above cover only the
        // handoffs offered within 30 s of the last publish, so say so loudly.
        println!(
            "system latency: ONLY {} of {LATENCY_HANDOFFS} handoffs were offered; routing did not keep up with {LATENCY_RATE}/s",
            latency.len()
        );
    }
    drop(desks);
}

/// 4,000 queued handoffs assigned through desks by `replicas` routing processes.
async fn system_throughput(replicas: usize) {
    let cluster = Cluster::start().await;
    let agents = cluster.agents(AGENTS, 50).await;
    for i in 0..THROUGHPUT_TICKETS {
        let new = ticket(i, "tp");
        cluster
            .store
            .enqueue(
                &cluster::tenant(),
                &new,
                None,
                tandem_routing::Settings::default().eta(),
                Utc::now(),
            )
            .await
            .unwrap();
    }
    let mut checker = cluster.routing_events("bench-checker").await;
    let mut processes = Vec::new();
    for r in 0..replicas {
        processes.push(cluster.replica(&format!("r{r}"), &[]).await);
    }
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut desks = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        let url = &processes[i % replicas].url;
        desks.push(Desk::open(url, agent, pb::Presence::Away, true, events_tx.clone()).await);
    }
    let started = Instant::now();
    for desk in &desks {
        desk.set_presence(pb::Presence::Online).await;
    }
    let mut confirmed = 0;
    let mut offered = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while confirmed < THROUGHPUT_TICKETS && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(DeskEvent::Assigned(..))) => confirmed += 1,
            Ok(Some(DeskEvent::Offer(..))) => offered += 1,
            Ok(Some(DeskEvent::Closed(agent))) => panic!("{agent}'s session ended"),
            Ok(None) | Err(_) => {}
        }
    }
    let elapsed = started.elapsed();
    println!(
        "system throughput, {replicas} routing process(es): {confirmed} assignments (offer pushed to the desk, accepted, confirmed) in {:.2} s = {:.0} assignments/s ({offered} offers seen)",
        elapsed.as_secs_f64(),
        confirmed as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(confirmed, THROUGHPUT_TICKETS);
    let violations = check_database(&cluster.db).await;
    let (counts, event_violations) = check_events(&mut checker, Duration::from_secs(3)).await;
    println!(
        "checker, {replicas} process(es): database violations {:?}, events {:?} ({} HandoffAssigned for {} handoffs, {} redelivered)",
        violations, event_violations, counts.assigned, THROUGHPUT_TICKETS, counts.redelivered
    );
    assert!(violations.is_empty() && event_violations.is_empty());
    assert_eq!(counts.assigned, THROUGHPUT_TICKETS);
    for mut process in processes {
        process.kill9().await;
    }
}

fn tenant() -> TenantId {
    TenantId::new("bench").unwrap()
}

fn ticket(i: usize, round: &str) -> NewTicket {
    NewTicket {
        handoff_id: format!("{round}-h{i}"),
        conversation_id: format!("{round}-c{i}"),
        scenario_id: "s".into(),
        queue_id: String::new(),
        priority: 50,
        vip: i.is_multiple_of(10),
        severity: 0.0,
        skills: Vec::new(),
        language: 1,
        trigger_received_at: None,
        requested_at: Utc::now(),
        transcript_sequence: 3,
        // A real package of about 2 KB: desks receive it decoded with every offer.
        package: prost::Message::encode_to_vec(&tandem_proto::pb::dialog::v1::HandoffPackage {
            handoff_id: format!("{round}-h{i}"),
            conversation_id: format!("{round}-c{i}"),
            scenario_id: "s".into(),
            summary: vec!["The customer asks where the refund of order 12345 is.".repeat(36)],
            ..Default::default()
        }),
    }
}

async fn setup(db: Db) -> Arc<Engine> {
    db.migrate(Some(Routing::migrations())).await.unwrap();
    let store = Store::new(db, OutboxWaker::default(), "default");
    let now = Utc::now();
    for i in 0..AGENTS {
        let profile = AgentProfile {
            id: format!("agent-{i:03}"),
            display_name: format!("Agent {i}"),
            team: "care".into(),
            skills: vec![Skill {
                name: "billing".into(),
                level: 1 + (i % 10) as i32,
            }],
            languages: vec![1],
            capacity: 50,
        };
        store
            .register_agent(&tenant(), &profile, now)
            .await
            .unwrap();
        store
            .set_presence(
                &tenant(),
                &profile.id,
                Presence::Online,
                PresenceReason::Manual,
                "",
                now,
            )
            .await
            .unwrap();
    }
    Arc::new(Engine::new(
        store,
        tandem_routing::Settings::default(),
        Arc::new(SystemClock),
    ))
}

/// In process: tickets pre-queued, 4 workers each take batches of offers and accept them.
async fn store_throughput(engine: Arc<Engine>, label: &str) {
    let t = tenant();
    for i in 0..THROUGHPUT_TICKETS {
        engine
            .store
            .enqueue(
                &t,
                &ticket(i, "tp"),
                None,
                engine.settings.eta(),
                Utc::now(),
            )
            .await
            .unwrap();
    }
    let batch = engine.settings.offer_batch;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let engine = Arc::clone(&engine);
        workers.push(tokio::spawn(async move {
            let t = tenant();
            let mut claim = Histogram::<u64>::new(3).unwrap();
            let mut assigned = 0usize;
            let mut idle = 0;
            while idle < 3 {
                let began = Instant::now();
                let done = match engine
                    .store
                    .offer_queued(&t, "default", batch, Utc::now())
                    .await
                {
                    Err(e) if e.is_conflict() => continue,
                    other => other.unwrap(),
                };
                if done.offered.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                idle = 0;
                claim.record(micros(began.elapsed())).unwrap();
                for (_, offer) in done.offered {
                    engine
                        .store
                        .accept(&t, &offer.agent_id, &offer.id, Utc::now())
                        .await
                        .unwrap();
                    assigned += 1;
                }
            }
            (assigned, claim)
        }));
    }
    let mut assigned = 0;
    let mut claims = Histogram::<u64>::new(3).unwrap();
    for worker in workers {
        let (n, h) = worker.await.unwrap();
        assigned += n;
        claims.add(h).unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "{label} store throughput: {assigned} assignments (batched offer + accept) by {WORKERS} workers in {:.2} s = {:.0} assignments/s",
        elapsed.as_secs_f64(),
        assigned as f64 / elapsed.as_secs_f64()
    );
    print(
        &format!("{label} offer batch of up to {batch} (one transaction)"),
        &claims,
    );
    assert_eq!(assigned, THROUGHPUT_TICKETS.min(AGENTS * 50));
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // `ROUTING_BENCH_ONLY=latency` (or `throughput`, `store`) runs one section.
    let only = std::env::var("ROUTING_BENCH_ONLY").unwrap_or_default();
    let run = |section: &str| only.is_empty() || only == section;
    runtime.block_on(async {
        if run("latency") {
            system_latency().await;
        }
        if run("throughput") {
            system_throughput(2).await;
            system_throughput(1).await;
        }
        if !run("store") {
            return;
        }

        let pg = tandem_testkit::Postgres::start().await.unwrap();
        let url = pg.fresh_database().await.unwrap();
        let db = Db::connect(&DatabaseConfig {
            url: Secret::new(url),
            schema: "routing".into(),
            max_connections: 16,
            ..DatabaseConfig::default()
        })
        .await
        .unwrap();
        store_throughput(setup(db).await, "postgres").await;

        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseConfig {
            url: Secret::new(format!("sqlite://{}", dir.path().join("b.db").display())),
            max_connections: 8,
            ..DatabaseConfig::default()
        })
        .await
        .unwrap();
        store_throughput(setup(db).await, "sqlite").await;
    });
}
