//! Two routing processes (the `tandem-routing` binary) on one PostgreSQL and one nats-server take
//! handoffs while agent desks accept offers; one process is killed with SIGKILL mid-run. Its
//! desks reconnect to the survivor. Afterwards every handoff has exactly one ticket, every
//! ticket ends assigned (capacity suffices), and the checker over the database and the
//! published events finds no double assignment and no capacity violation.

#![allow(clippy::unwrap_used)]

#[path = "support/cluster.rs"]
mod cluster;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cluster::{Cluster, Desk, DeskEvent, check_database, check_events, handoff, ticket_states};
use tandem_proto::pb::routing::v1 as pb;
use tokio::sync::mpsc;

const AGENTS: usize = 20;
const HANDOFFS: usize = 300;
const KILL_AFTER: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_replica_loses_and_doubles_nothing() {
    let cluster = Cluster::start().await;
    let agents = cluster.agents(AGENTS, 50).await;
    let mut checker = cluster.routing_events("fault-checker").await;
    let mut a = cluster.replica("a", &[]).await;
    let b = cluster.replica("b", &[]).await;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let mut desks = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        let url = if i < AGENTS / 2 { &a.url } else { &b.url };
        desks.push(Desk::open(url, agent, pb::Presence::Online, true, events_tx.clone()).await);
    }

    let started = Instant::now();
    for chunk in (0..HANDOFFS).collect::<Vec<_>>().chunks(20) {
        let batch: Vec<_> = chunk.iter().map(|i| handoff(&i.to_string())).collect();
        cluster.publish(&batch).await;
        if chunk[0] + 20 == KILL_AFTER {
            // Let the replica get busy with what it was sent, then kill it mid-flight.
            tokio::time::sleep(Duration::from_millis(30)).await;
            a.kill9().await;
            // The killed replica's desks reconnect to the survivor.
            for desk in desks.iter_mut().take(AGENTS / 2) {
                *desk = Desk::open(
                    &b.url,
                    &desk.agent,
                    pb::Presence::Online,
                    true,
                    events_tx.clone(),
                )
                .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!a.running());

    // Wait until every handoff is assigned (20 agents × 50 > 300).
    let deadline = Instant::now() + Duration::from_secs(80);
    let states = loop {
        let states = ticket_states(&cluster.db).await;
        if states.get("assigned").copied().unwrap_or(0) == HANDOFFS as i64 {
            break states;
        }
        assert!(
            Instant::now() < deadline,
            "handoffs not all assigned after {:?}: {states:?}\n{}",
            started.elapsed(),
            std::fs::read_to_string(&b.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let total: i64 = states.values().sum();
    assert_eq!(total, HANDOFFS as i64, "one ticket per handoff: {states:?}");

    // Every handoff id has its ticket.
    let tandem_platform::db::Db::Postgres(pool) = &cluster.db else {
        unreachable!()
    };
    let ids: Vec<(String,)> = sqlx::query_as("SELECT id FROM routing_tickets")
        .fetch_all(pool)
        .await
        .unwrap();
    let ids: HashSet<String> = ids.into_iter().map(|(id,)| id).collect();
    for i in 0..HANDOFFS {
        assert!(ids.contains(&format!("h-{i}")), "handoff h-{i} lost");
    }

    assert_eq!(check_database(&cluster.db).await, Vec::<String>::new());
    let (counts, violations) = check_events(&mut checker, Duration::from_secs(3)).await;
    assert_eq!(violations, Vec::<String>::new());
    assert_eq!(counts.assigned, HANDOFFS, "{counts:?}");

    // No desk was confirmed a handoff another desk was confirmed too.
    let mut confirmed: HashMap<String, HashSet<String>> = HashMap::new();
    while let Ok(event) = events.try_recv() {
        if let DeskEvent::Assigned(ticket, agent) = event {
            confirmed.entry(ticket).or_default().insert(agent);
        }
    }
    assert!(confirmed.values().all(|agents| agents.len() == 1));
    assert!(
        confirmed.len() > HANDOFFS / 2,
        "desks saw their confirmations"
    );
}
