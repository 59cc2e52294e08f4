//! The storage contract pattern: one suite of async cases, written once against `Db`, run by a
//! macro against every engine (PostgreSQL on a throwaway server, SQLite in a temp dir). Service
//! repositories follow the same pattern. Here it covers the platform's own tables: the outbox
//! and the inbox.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tandem_platform::bus::memory::MemoryBus;
use tandem_platform::bus::{Bus, ConsumerSpec, RawEvent};
use tandem_platform::config::{BusConfig, DatabaseConfig, OutboxConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::outbox::OutboxRelay;
use tandem_platform::{inbox, outbox};
use tandem_proto::events::DIALOG;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::dialog::v1::{Message, MessagePosted};

/// Keeps the engine's server or directory alive for the test.
#[allow(
    dead_code,
    clippy::large_enum_variant,
    reason = "held for its Drop, one per test"
)]
enum Keep {
    Postgres(tandem_testkit::Postgres),
    Sqlite(tempfile::TempDir),
}

async fn postgres() -> (Db, Keep) {
    let pg = tandem_testkit::Postgres::start().await.unwrap();
    let url = pg.fresh_database().await.unwrap();
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(url),
        schema: "svc".into(),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    db.migrate(None).await.unwrap();
    (db, Keep::Postgres(pg))
}

async fn sqlite() -> (Db, Keep) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("svc.db").display());
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(url),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    db.migrate(None).await.unwrap();
    (db, Keep::Sqlite(dir))
}

fn events(n: i64) -> Vec<RawEvent> {
    let tenant = TenantId::new("acme").unwrap();
    (0..n)
        .map(|seq| {
            let event = MessagePosted {
                conversation_id: "c1".into(),
                message: Some(Message {
                    sequence: seq,
                    ..Message::default()
                }),
                ..MessagePosted::default()
            };
            RawEvent::new(&tenant, &event, Some("c1".into()))
        })
        .collect()
}

fn relay(db: &Db, bus: &Bus) -> OutboxRelay {
    OutboxRelay::new(
        db.clone(),
        bus.clone(),
        OutboxConfig {
            batch_size: 7,
            ..OutboxConfig::default()
        },
    )
}

async fn enqueue(db: &Db, events: &[RawEvent], commit: bool) {
    match db {
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await.unwrap();
            outbox::enqueue_pg(&mut tx, events).await.unwrap();
            if commit {
                tx.commit().await.unwrap()
            } else {
                tx.rollback().await.unwrap()
            }
        }
        Db::Sqlite(pool) => {
            let mut tx = pool.begin().await.unwrap();
            outbox::enqueue_sqlite(&mut tx, events).await.unwrap();
            if commit {
                tx.commit().await.unwrap()
            } else {
                tx.rollback().await.unwrap()
            }
        }
    }
}

async fn claim(db: &Db, consumer: &str, id: &str, commit: bool) -> bool {
    match db {
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await.unwrap();
            let fresh = inbox::claim_pg(&mut tx, consumer, id).await.unwrap();
            if commit {
                tx.commit().await.unwrap()
            } else {
                tx.rollback().await.unwrap()
            }
            fresh
        }
        Db::Sqlite(pool) => {
            let mut tx = pool.begin().await.unwrap();
            let fresh = inbox::claim_sqlite(&mut tx, consumer, id).await.unwrap();
            if commit {
                tx.commit().await.unwrap()
            } else {
                tx.rollback().await.unwrap()
            }
            fresh
        }
    }
}

async fn claim_batch(db: &Db, consumer: &str, ids: &[&str]) -> Vec<String> {
    let fresh = match db {
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await.unwrap();
            let fresh = inbox::claim_batch_pg(&mut tx, consumer, ids).await.unwrap();
            tx.commit().await.unwrap();
            fresh
        }
        Db::Sqlite(pool) => {
            let mut tx = pool.begin().await.unwrap();
            let fresh = inbox::claim_batch_sqlite(&mut tx, consumer, ids)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            fresh
        }
    };
    let mut fresh: Vec<String> = fresh.into_iter().collect();
    fresh.sort();
    fresh
}

// ---------------------------------------------------------------------------------------------
// The contract.

async fn outbox_rows_live_and_die_with_their_transaction(db: Db) {
    let bus = Bus::Memory(MemoryBus::new());
    bus.ensure_streams().await.unwrap();
    let relay = relay(&db, &bus);
    enqueue(&db, &events(5), false).await;
    assert_eq!(
        relay.pending().await.unwrap(),
        0,
        "a rolled-back change leaves no event behind"
    );
    enqueue(&db, &events(5), true).await;
    assert_eq!(relay.pending().await.unwrap(), 5);
    let twice = events(1);
    enqueue(&db, &twice, true).await;
    let again = match &db {
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await.unwrap();
            outbox::enqueue_pg(&mut tx, &twice).await
        }
        Db::Sqlite(pool) => {
            let mut tx = pool.begin().await.unwrap();
            outbox::enqueue_sqlite(&mut tx, &twice).await
        }
    };
    assert!(again.is_err(), "an event id is written once");
}

async fn relay_publishes_in_commit_order_and_empties_the_outbox(db: Db) {
    let bus = Bus::Memory(MemoryBus::new());
    bus.ensure_streams().await.unwrap();
    let sent = events(30);
    for chunk in sent.chunks(4) {
        enqueue(&db, chunk, true).await;
    }
    let relay = relay(&db, &bus);
    while relay.publish_pending().await.unwrap() > 0 {}
    relay.settled().await;
    assert_eq!(relay.pending().await.unwrap(), 0);
    let spec = ConsumerSpec::new("order", &DIALOG, &BusConfig::default()).event::<MessagePosted>();
    let mut consumer = bus.consumer(&spec).await.unwrap();
    for expected in &sent {
        let delivery = tokio::time::timeout(Duration::from_secs(2), consumer.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(delivery.event.id, expected.id);
        assert_eq!(delivery.event.payload, expected.payload);
        assert_eq!(delivery.event.occurred_at, expected.occurred_at);
        delivery.ack().await.unwrap();
    }
}

async fn inbox_claims_each_event_once_per_consumer(db: Db) {
    assert!(claim(&db, "routing-handoffs", "e1", true).await);
    assert!(
        !claim(&db, "routing-handoffs", "e1", true).await,
        "a redelivery is recognised"
    );
    assert!(
        claim(&db, "feedback-metrics", "e1", true).await,
        "consumers are independent"
    );
    assert!(claim(&db, "routing-handoffs", "e2", false).await);
    assert!(
        claim(&db, "routing-handoffs", "e2", true).await,
        "a claim rolled back with its effect is not kept"
    );
    assert_eq!(
        claim_batch(&db, "routing-handoffs", &["e1", "e2", "e3", "e4"]).await,
        ["e3", "e4"]
    );
    assert!(
        claim_batch(&db, "routing-handoffs", &["e3", "e4"])
            .await
            .is_empty()
    );
}

async fn inbox_prune_keeps_recent_claims(db: Db) {
    assert!(claim(&db, "c", "recent", true).await);
    let removed = inbox::prune(&db, Duration::from_secs(3600)).await.unwrap();
    assert_eq!(removed, 0);
    assert!(!claim(&db, "c", "recent", true).await);

    // A claim from two hours ago goes at the next round of the service's pruning task.
    assert!(claim(&db, "c", "old", true).await);
    let two_hours_ago = chrono::Utc::now() - chrono::Duration::hours(2);
    match &db {
        Db::Postgres(pool) => {
            sqlx::query("UPDATE tandem_inbox SET processed_at = $1 WHERE event_id = 'old'")
                .bind(two_hours_ago)
                .execute(pool)
                .await
                .map(drop)
        }
        Db::Sqlite(pool) => {
            sqlx::query("UPDATE tandem_inbox SET processed_at = ?1 WHERE event_id = 'old'")
                .bind(two_hours_ago.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .execute(pool)
                .await
                .map(drop)
        }
    }
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let pruning = tokio::spawn(inbox::prune_until(
        db.clone(),
        Duration::from_secs(3600),
        Duration::from_millis(10),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.cancel();
    pruning.await.unwrap();
    assert!(
        claim(&db, "c", "old", false).await,
        "the old claim was deleted"
    );
    assert!(
        !claim(&db, "c", "recent", false).await,
        "the recent one kept"
    );
}

macro_rules! storage_contract_tests {
    ($engine:ident) => {
        mod $engine {
            #[tokio::test]
            async fn outbox_rows_live_and_die_with_their_transaction() {
                let (db, _keep) = super::$engine().await;
                super::outbox_rows_live_and_die_with_their_transaction(db).await;
            }

            #[tokio::test]
            async fn relay_publishes_in_commit_order_and_empties_the_outbox() {
                let (db, _keep) = super::$engine().await;
                super::relay_publishes_in_commit_order_and_empties_the_outbox(db).await;
            }

            #[tokio::test]
            async fn inbox_claims_each_event_once_per_consumer() {
                let (db, _keep) = super::$engine().await;
                super::inbox_claims_each_event_once_per_consumer(db).await;
            }

            #[tokio::test]
            async fn inbox_prune_keeps_recent_claims() {
                let (db, _keep) = super::$engine().await;
                super::inbox_prune_keeps_recent_claims(db).await;
            }
        }
    };
}

storage_contract_tests!(postgres);
storage_contract_tests!(sqlite);
