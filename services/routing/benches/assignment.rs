//! Assignment benchmarks on a throwaway PostgreSQL (and SQLite for comparison), in process:
//!
//! 1. handoff latency with 100 agents: one handoff at a time, enqueue (idempotent insert, queue
//!    resolution, position and ETA, `HandoffQueued`) then drain (SKIP LOCKED claim, agent
//!    ranking, capacity reservation, offer, `HandoffOffered`): the system share of clock 1;
//! 2. assignment throughput: tickets pre-queued, 4 concurrent workers offer and accept until
//!    every ticket is assigned; afterwards the invariants are checked by SQL.
//!
//! Prints HdrHistogram percentiles and assignments per second. Run:
//! `cargo bench -p tandem-routing --bench assignment`.

#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use hdrhistogram::Histogram;
use tandem_platform::config::{DatabaseConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::outbox::OutboxWaker;
use tandem_platform::runtime::Service as _;
use tandem_proto::ids::TenantId;
use tandem_routing::Routing;
use tandem_routing::domain::agent::{AgentProfile, Presence, Skill};
use tandem_routing::engine::{Engine, SystemClock};
use tandem_routing::store::{NewTicket, OfferOutcome, PresenceReason, Store};

const AGENTS: usize = 100;
const LATENCY_HANDOFFS: usize = 1_000;
const THROUGHPUT_TICKETS: usize = 4_000;
const WORKERS: usize = 4;

fn tenant() -> TenantId {
    TenantId::new("bench").unwrap()
}

fn handoff(i: usize, round: &str) -> NewTicket {
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
        package: vec![0; 2_000],
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

async fn latency(engine: &Engine, label: &str) {
    let t = tenant();
    let mut enqueue_offer = Histogram::<u64>::new(3).unwrap();
    let mut accept = Histogram::<u64>::new(3).unwrap();
    for i in 0..LATENCY_HANDOFFS {
        let new = handoff(i, "lat");
        let started = Instant::now();
        let done = engine
            .store
            .enqueue(&t, &new, None, engine.settings.eta(), Utc::now())
            .await
            .unwrap()
            .unwrap();
        let offered = engine.drain_queue(&t, &done.ticket.queue_id).await.unwrap();
        enqueue_offer
            .record(started.elapsed().as_micros() as u64)
            .unwrap();
        assert_eq!(offered, 1, "every handoff is offered at once");
        let pending = engine
            .store
            .ticket(&t, &new.handoff_id)
            .await
            .unwrap()
            .offered_agent_id
            .unwrap();
        let offer_id = engine
            .store
            .pending_offers(&t, &pending)
            .await
            .unwrap()
            .into_iter()
            .find(|(_, ticket)| ticket.id == new.handoff_id)
            .unwrap()
            .0
            .id;
        let started = Instant::now();
        engine
            .store
            .accept(&t, &pending, &offer_id, Utc::now())
            .await
            .unwrap();
        accept.record(started.elapsed().as_micros() as u64).unwrap();
        engine
            .store
            .complete(
                &t,
                &new.handoff_id,
                None,
                tandem_routing::domain::ticket::Disposition::Resolved,
                Utc::now(),
            )
            .await
            .unwrap();
    }
    print(
        &format!("{label} handoff enqueue+offer (100 agents)"),
        &enqueue_offer,
    );
    print(&format!("{label} accept"), &accept);
}

async fn throughput(engine: Arc<Engine>, label: &str) {
    let t = tenant();
    for i in 0..THROUGHPUT_TICKETS {
        engine
            .store
            .enqueue(
                &t,
                &handoff(i, "tp"),
                None,
                engine.settings.eta(),
                Utc::now(),
            )
            .await
            .unwrap();
    }
    let queue = engine.store.queue(&t, "default").await.unwrap();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let engine = Arc::clone(&engine);
        let queue = queue.clone();
        workers.push(tokio::spawn(async move {
            let t = tenant();
            let mut claim = Histogram::<u64>::new(3).unwrap();
            let mut assigned = 0usize;
            loop {
                let ids = engine.store.queued_ids(&t, &queue, 64).await.unwrap();
                if ids.is_empty() {
                    return (assigned, claim);
                }
                for id in ids {
                    let began = Instant::now();
                    let outcome = match engine.store.offer_ticket(&t, &id, Utc::now()).await {
                        Err(e) if e.is_conflict() => continue,
                        other => other.unwrap(),
                    };
                    let OfferOutcome::Offered(made) = outcome else {
                        continue;
                    };
                    claim.record(began.elapsed().as_micros() as u64).unwrap();
                    engine
                        .store
                        .accept(&t, &made.1.agent_id, &made.1.id, Utc::now())
                        .await
                        .unwrap();
                    assigned += 1;
                }
            }
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
        "{label} throughput: {assigned} assignments (offer + accept) by {WORKERS} workers in {:.2} s = {:.0} assignments/s",
        elapsed.as_secs_f64(),
        assigned as f64 / elapsed.as_secs_f64()
    );
    print(&format!("{label} claim (offer transaction)"), &claims);
    assert_eq!(assigned, THROUGHPUT_TICKETS.min(AGENTS * 50));
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
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
        let engine = setup(db).await;
        latency(&engine, "postgres").await;
        throughput(Arc::clone(&engine), "postgres").await;

        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&DatabaseConfig {
            url: Secret::new(format!("sqlite://{}", dir.path().join("b.db").display())),
            max_connections: 8,
            ..DatabaseConfig::default()
        })
        .await
        .unwrap();
        let engine = setup(db).await;
        latency(&engine, "sqlite").await;
        throughput(engine, "sqlite").await;
    });
}
