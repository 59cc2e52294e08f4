//! The dialog store's model versions and request records, on PostgreSQL (a throwaway server) and
//! SQLite (a temp dir): concurrent activations leave exactly one active version, concurrent
//! training numbers versions one after another, the migration repairs several active versions,
//! and request records older than a cut-off are pruned.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use prost::Message as _;
use tandem_dialog::Dialog;
use tandem_dialog::store::{Change, Store};
use tandem_platform::bus::RawEvent;
use tandem_platform::config::{DatabaseConfig, Secret};
use tandem_platform::db::{Db, Migrations};
use tandem_platform::on_db;
use tandem_platform::runtime::Service as _;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::dialog::v1 as pb;

/// Keeps the engine's directory alive for the test.
#[allow(dead_code, reason = "held for its Drop")]
enum Keep {
    Postgres,
    Sqlite(tempfile::TempDir),
}

/// A fresh database on the shared PostgreSQL, not migrated.
async fn postgres_unmigrated() -> (Db, Keep) {
    let pg = tandem_testkit::shared_postgres().await;
    let url = pg.fresh_database().await.unwrap();
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(url),
        schema: "dialog".into(),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    (db, Keep::Postgres)
}

/// A fresh SQLite database in a temp dir, not migrated.
async fn sqlite_unmigrated() -> (Db, Keep) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("dialog.db").display());
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(url),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    (db, Keep::Sqlite(dir))
}

async fn postgres() -> (Db, Keep) {
    let (db, keep) = postgres_unmigrated().await;
    db.migrate(Some(Dialog::migrations())).await.unwrap();
    (db, keep)
}

async fn sqlite() -> (Db, Keep) {
    let (db, keep) = sqlite_unmigrated().await;
    db.migrate(Some(Dialog::migrations())).await.unwrap();
    (db, keep)
}

/// Dialog's migrations before version `version`.
fn migrations_before(version: i64) -> Migrations {
    let mut set = Dialog::migrations();
    for migrator in [&mut set.postgres, &mut set.sqlite] {
        let kept: Vec<_> = migrator
            .migrations
            .iter()
            .filter(|m| m.version < version)
            .cloned()
            .collect();
        migrator.migrations = kept.into();
    }
    set
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (db, _keep) = super::postgres().await;
                super::$name(db).await;
            })*
        }
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (db, _keep) = super::sqlite().await;
                super::$name(db).await;
            })*
        }
    };
}

both!(
    concurrent_activations_leave_exactly_one_active_version,
    concurrent_training_numbers_versions_one_after_another,
    activation_reports_the_previous_version,
    prune_deletes_request_records_older_than_the_cut_off,
    prune_deletes_conversations_closed_before_the_cut_off,
);

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn activated(v: &pb::ModelVersion, previous: &str) -> RawEvent {
    RawEvent::new(
        &tenant(),
        &pb::IntentModelActivated {
            model_version_id: v.id.clone(),
            version: v.version,
            previous_model_version_id: previous.to_owned(),
            ..Default::default()
        },
        None,
    )
}

fn timestamp() -> prost_types::Timestamp {
    let now = chrono::Utc::now();
    prost_types::Timestamp {
        seconds: now.timestamp(),
        nanos: i32::try_from(now.timestamp_subsec_nanos()).unwrap(),
    }
}

async fn insert(store: &Store, id: &str) -> pb::ModelVersion {
    let version = pb::ModelVersion {
        id: id.to_owned(),
        ..Default::default()
    };
    store
        .insert_model(&tenant(), version, b"model")
        .await
        .unwrap()
}

/// Counts the tenant's rows marked active.
async fn active_rows(db: &Db) -> i64 {
    on_db!(db, pool => sqlx::query_scalar::<_, i64>(
        "SELECT COUNT(*) FROM dialog_models WHERE tenant = $1 AND active")
        .bind("acme").fetch_one(pool).await.unwrap())
}

async fn concurrent_activations_leave_exactly_one_active_version(db: Db) {
    let store = Store::new(db.clone());
    let a = insert(&store, "model-a").await;
    let b = insert(&store, "model-b").await;
    let mut tasks = Vec::new();
    for n in 0..20 {
        let store = store.clone();
        let id = if n % 2 == 0 {
            a.id.clone()
        } else {
            b.id.clone()
        };
        tasks.push(tokio::spawn(async move {
            store
                .activate_model(&tenant(), &id, timestamp(), activated)
                .await
        }));
    }
    for task in tasks {
        let (version, _) = task.await.unwrap().unwrap().unwrap();
        assert_eq!(version.status, pb::ModelStatus::Active as i32);
    }
    assert_eq!(active_rows(&db).await, 1);
    let listed = store.models(&tenant(), 0, 10).await.unwrap();
    let active: Vec<&str> = listed
        .iter()
        .filter(|v| v.status == pb::ModelStatus::Active as i32)
        .map(|v| v.id.as_str())
        .collect();
    assert_eq!(active.len(), 1, "{listed:?}");
    let served = store.active_model(&tenant()).await.unwrap().unwrap();
    assert_eq!(served.version.id, active[0]);
    assert_eq!(served.version.status, pb::ModelStatus::Active as i32);
    let other = if served.version.id == a.id {
        &b.id
    } else {
        &a.id
    };
    let other = store.model(&tenant(), other).await.unwrap().unwrap();
    assert_eq!(other.version.status, pb::ModelStatus::Inactive as i32);
}

async fn concurrent_training_numbers_versions_one_after_another(db: Db) {
    let store = Store::new(db);
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let version = pb::ModelVersion {
                id: format!("model-{n}"),
                ..Default::default()
            };
            store.insert_model(&tenant(), version, b"model").await
        }));
    }
    let mut versions = BTreeSet::new();
    for task in tasks {
        versions.insert(task.await.unwrap().unwrap().version);
    }
    assert_eq!(versions, (1..=8).collect::<BTreeSet<i32>>());
    let listed = store.models(&tenant(), 0, 20).await.unwrap();
    assert_eq!(listed.len(), 8);
}

async fn activation_reports_the_previous_version(db: Db) {
    let store = Store::new(db.clone());
    let a = insert(&store, "model-a").await;
    let b = insert(&store, "model-b").await;
    assert_eq!((a.version, b.version), (1, 2));
    let (v, previous) = store
        .activate_model(&tenant(), &a.id, timestamp(), activated)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((v.id.as_str(), previous.as_str()), ("model-a", ""));
    let (v, previous) = store
        .activate_model(&tenant(), &b.id, timestamp(), activated)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((v.id.as_str(), previous.as_str()), ("model-b", "model-a"));
    // Activating the active version again keeps it and names it as the previous one.
    let (v, previous) = store
        .activate_model(&tenant(), &b.id, timestamp(), activated)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((v.id.as_str(), previous.as_str()), ("model-b", "model-b"));
    // An unknown version changes nothing.
    assert!(
        store
            .activate_model(&tenant(), "missing", timestamp(), activated)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(active_rows(&db).await, 1);
    let a = store.model(&tenant(), &a.id).await.unwrap().unwrap();
    assert_eq!(a.version.status, pb::ModelStatus::Inactive as i32);
    assert_eq!(
        store
            .active_model(&tenant())
            .await
            .unwrap()
            .unwrap()
            .version
            .id,
        "model-b"
    );
}

/// A writer that does not take the tenant's lock (a replica of an earlier release) holds an
/// uncommitted version number and an uncommitted active version: the store's writes wait for it,
/// fail on the unique indexes once it commits, and succeed when tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writes_colliding_with_an_unlocked_writer_are_tried_again() {
    let (db, _keep) = postgres().await;
    let Db::Postgres(pool) = &db else {
        unreachable!()
    };
    let store = Store::new(db.clone());
    let a = insert(&store, "model-a").await;

    let mut outsider = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO dialog_models (tenant, id, version, active, body, model) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind("acme")
    .bind("outsider")
    .bind(2)
    .bind(true)
    .bind(
        pb::ModelVersion {
            id: "outsider".into(),
            version: 2,
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .bind(b"model".to_vec())
    .execute(&mut *outsider)
    .await
    .unwrap();
    let inserting = {
        let store = store.clone();
        tokio::spawn(async move { insert(&store, "model-b").await })
    };
    let activating = {
        let (store, id) = (store.clone(), a.id.clone());
        tokio::spawn(async move {
            store
                .activate_model(&tenant(), &id, timestamp(), activated)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!inserting.is_finished() && !activating.is_finished());
    outsider.commit().await.unwrap();

    assert_eq!(inserting.await.unwrap().version, 3);
    let (version, previous) = activating.await.unwrap().unwrap().unwrap();
    assert_eq!(
        (version.id.as_str(), previous.as_str()),
        ("model-a", "outsider")
    );
    assert_eq!(active_rows(&db).await, 1);
}

/// Records a request (an idempotency record) for `client_id`.
async fn record(store: &Store, client_id: &str) {
    let change = Change {
        request: Some((
            "conversation-1".to_owned(),
            "customer",
            client_id.to_owned(),
            client_id.as_bytes().to_vec(),
        )),
        ..Change::default()
    };
    store.commit(&tenant(), change).await.unwrap();
}

async fn recorded(store: &Store, client_id: &str) -> bool {
    store
        .request(&tenant(), "conversation-1", "customer", client_id)
        .await
        .unwrap()
        .is_some()
}

async fn prune_deletes_request_records_older_than_the_cut_off(db: Db) {
    let store = Store::new(db);
    record(&store, "old-1").await;
    record(&store, "old-2").await;
    record(&store, "old-3").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut_off = tandem_platform::db::now_micros();
    tokio::time::sleep(Duration::from_millis(20)).await;
    record(&store, "new").await;

    // Batches of two: the old records go in two rounds, the new one stays.
    assert_eq!(store.prune_requests(cut_off, 2).await.unwrap(), 2);
    assert_eq!(store.prune_requests(cut_off, 2).await.unwrap(), 1);
    assert_eq!(store.prune_requests(cut_off, 2).await.unwrap(), 0);
    for id in ["old-1", "old-2", "old-3"] {
        assert!(!recorded(&store, id).await, "{id}");
    }
    assert!(recorded(&store, "new").await);

    // A pruned request is new again: its record can be written once more.
    record(&store, "old-1").await;
    assert!(recorded(&store, "old-1").await);
}

/// Stores conversation `id` in `state`, last active at `at` (µs), with a message, a decision
/// trace, a suggestion, a handoff package and a request record.
async fn conversation_with_records(store: &Store, id: &str, state: pb::ConversationState, at: i64) {
    let time = prost_types::Timestamp {
        seconds: at / 1_000_000,
        nanos: i32::try_from(at % 1_000_000 * 1_000).unwrap(),
    };
    let conversation = pb::Conversation {
        id: id.to_owned(),
        client_conversation_id: format!("client-{id}"),
        state: state as i32,
        created_at: Some(time),
        updated_at: Some(time),
        ..Default::default()
    };
    let change = Change {
        create: Some(conversation),
        request: Some((
            id.to_owned(),
            "customer",
            "m1".to_owned(),
            b"response".to_vec(),
        )),
        messages: vec![pb::Message {
            id: format!("{id}-m1"),
            conversation_id: id.to_owned(),
            sequence: 1,
            text: "hello".into(),
            ..Default::default()
        }],
        traces: vec![pb::DecisionTrace {
            id: format!("{id}-t1"),
            conversation_id: id.to_owned(),
            message_id: format!("{id}-m1"),
            ..Default::default()
        }],
        suggestions: vec![pb::Suggestion {
            id: format!("{id}-s1"),
            conversation_id: id.to_owned(),
            ..Default::default()
        }],
        handoffs: vec![pb::HandoffPackage {
            handoff_id: format!("{id}-h1"),
            conversation_id: id.to_owned(),
            ..Default::default()
        }],
        ..Change::default()
    };
    store.commit(&tenant(), change).await.unwrap();
}

/// Rows of `table` that belong to conversation `id`.
async fn rows_of(db: &Db, table: &str, id: &str) -> i64 {
    let sql = match table {
        "dialog_messages" => "SELECT COUNT(*) FROM dialog_messages WHERE conversation_id = $1",
        "dialog_traces" => "SELECT COUNT(*) FROM dialog_traces WHERE conversation_id = $1",
        "dialog_suggestions" => {
            "SELECT COUNT(*) FROM dialog_suggestions WHERE conversation_id = $1"
        }
        "dialog_handoffs" => "SELECT COUNT(*) FROM dialog_handoffs WHERE conversation_id = $1",
        "dialog_requests" => "SELECT COUNT(*) FROM dialog_requests WHERE conversation_id = $1",
        _ => "SELECT COUNT(*) FROM dialog_conversations WHERE id = $1",
    };
    on_db!(db, pool => sqlx::query_scalar(sql).bind(id).fetch_one(pool).await.unwrap())
}

const TABLES: [&str; 6] = [
    "dialog_conversations",
    "dialog_messages",
    "dialog_traces",
    "dialog_suggestions",
    "dialog_handoffs",
    "dialog_requests",
];

/// Conversations closed before the cut-off go with every record of theirs, in batches, oldest
/// first; closed later, or in any other state however old, they stay whole.
async fn prune_deletes_conversations_closed_before_the_cut_off(db: Db) {
    let store = Store::new(db.clone());
    let day = 86_400_000_000_i64;
    let now = tandem_platform::db::now_micros();
    let cut_off = now - 30 * day;
    let closed = pb::ConversationState::Closed;
    for (id, state, at) in [
        ("old-closed-1", closed, now - 90 * day),
        ("old-closed-2", closed, now - 60 * day),
        ("old-closed-3", closed, now - 31 * day),
        ("recent-closed", closed, now - day),
        ("old-bot", pb::ConversationState::Bot, now - 90 * day),
        ("old-queued", pb::ConversationState::Queued, now - 90 * day),
        (
            "old-resolved",
            pb::ConversationState::Resolved,
            now - 90 * day,
        ),
    ] {
        conversation_with_records(&store, id, state, at).await;
    }
    for table in TABLES {
        assert_eq!(rows_of(&db, table, "old-closed-1").await, 1, "{table}");
    }

    assert_eq!(store.prune_closed(cut_off, 2).await.unwrap(), 2);
    // Oldest first: the third old one is still there after the first batch.
    assert_eq!(
        rows_of(&db, "dialog_conversations", "old-closed-3").await,
        1
    );
    assert_eq!(rows_of(&db, "dialog_messages", "old-closed-3").await, 1);
    assert_eq!(store.prune_closed(cut_off, 2).await.unwrap(), 1);
    assert_eq!(store.prune_closed(cut_off, 2).await.unwrap(), 0);
    for id in ["old-closed-1", "old-closed-2", "old-closed-3"] {
        for table in TABLES {
            assert_eq!(rows_of(&db, table, id).await, 0, "{id} in {table}");
        }
        assert!(
            store.conversation(&tenant(), id).await.unwrap().is_none(),
            "{id}"
        );
    }
    for id in ["recent-closed", "old-bot", "old-queued", "old-resolved"] {
        for table in TABLES {
            assert_eq!(rows_of(&db, table, id).await, 1, "{id} in {table}");
        }
    }
}

/// Stores a model row as written before migration 1005, active or not.
async fn raw_model(db: &Db, id: &str, version: i32, active: bool) {
    let status = if active {
        pb::ModelStatus::Active
    } else {
        pb::ModelStatus::Inactive
    };
    let body = pb::ModelVersion {
        id: id.to_owned(),
        version,
        status: status as i32,
        ..Default::default()
    }
    .encode_to_vec();
    on_db!(db, pool => sqlx::query(
        "INSERT INTO dialog_models (tenant, id, version, active, body, model) \
         VALUES ($1, $2, $3, $4, $5, $6)")
        .bind("acme").bind(id).bind(version).bind(active).bind(body).bind(b"model".to_vec())
        .execute(pool).await.unwrap().rows_affected());
}

/// Several active versions of a tenant (left by concurrent activations before migration 1005)
/// are repaired to one, `kept`; request records stored before it count as created when it ran.
async fn migration_repairs_active_models_and_dates_requests(db: Db, kept: &str) {
    let store = Store::new(db.clone());
    let before = tandem_platform::db::now_micros();
    on_db!(&db, pool => sqlx::query(
        "INSERT INTO dialog_requests (tenant, conversation_id, kind, client_message_id, response) \
         VALUES ($1, $2, $3, $4, $5)")
        .bind("acme").bind("conversation-1").bind("customer").bind("stored")
        .bind(b"response".to_vec()).execute(pool).await.unwrap().rows_affected());
    db.migrate(Some(Dialog::migrations())).await.unwrap();
    let after = tandem_platform::db::now_micros();

    assert_eq!(active_rows(&db).await, 1);
    let active = store.active_model(&tenant()).await.unwrap().unwrap();
    assert_eq!(active.version.id, kept);
    let listed = store.models(&tenant(), 0, 10).await.unwrap();
    let statuses: Vec<(String, i32)> = listed.iter().map(|v| (v.id.clone(), v.status)).collect();
    for (id, status) in &statuses {
        let want = if id == kept {
            pb::ModelStatus::Active
        } else {
            pb::ModelStatus::Inactive
        };
        assert_eq!(*status, want as i32, "{statuses:?}");
    }
    // A second active version is refused.
    let other = statuses
        .iter()
        .find(|(id, _)| id != kept)
        .unwrap()
        .0
        .clone();
    let refused = on_db!(&db, pool => sqlx::query(
        "UPDATE dialog_models SET active = $1 WHERE tenant = $2 AND id = $3")
        .bind(true).bind("acme").bind(&other).execute(pool).await.map(|r| r.rows_affected()));
    assert!(refused.is_err());

    // The stored record counts as created while the migration ran: kept by a cut-off before.
    assert_eq!(store.prune_requests(before, 100).await.unwrap(), 0);
    assert!(recorded(&store, "stored").await);
    assert_eq!(store.prune_requests(after + 1, 100).await.unwrap(), 1);
    assert!(!recorded(&store, "stored").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migration_keeps_the_most_recent_activation() {
    let (db, _keep) = postgres_unmigrated().await;
    db.migrate(Some(migrations_before(1005))).await.unwrap();
    // Version 3 was activated last (its row written last), though version 4 is newer.
    raw_model(&db, "model-1", 1, false).await;
    raw_model(&db, "model-4", 4, true).await;
    raw_model(&db, "model-2", 2, true).await;
    raw_model(&db, "model-3", 3, false).await;
    on_db!(&db, pool => sqlx::query(
        "UPDATE dialog_models SET active = $1 WHERE tenant = $2 AND id = $3")
        .bind(true).bind("acme").bind("model-3").execute(pool).await.unwrap().rows_affected());
    migration_repairs_active_models_and_dates_requests(db, "model-3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_migration_keeps_the_newest_active_version() {
    let (db, _keep) = sqlite_unmigrated().await;
    db.migrate(Some(migrations_before(1005))).await.unwrap();
    raw_model(&db, "model-1", 1, false).await;
    raw_model(&db, "model-4", 4, true).await;
    raw_model(&db, "model-2", 2, true).await;
    raw_model(&db, "model-3", 3, true).await;
    migration_repairs_active_models_and_dates_requests(db, "model-4").await;
}
