//! Group commit of submitted feedback and alert evaluation on several replicas, against
//! PostgreSQL (a throwaway server) and SQLite (a temp dir) by one macro: concurrent submissions
//! with duplicates inside and across batches count once, a bad record fails alone, a writer
//! killed mid-batch loses nothing it acknowledged, and two replicas raise an alert once.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tandem_feedback::adapters::sql::{Store, StoreError, Stored};
use tandem_feedback::app::{FeedbackApp, FeedbackError};
use tandem_feedback::domain::feedback::{FeedbackInput, FeedbackRecord, Score};
use tandem_feedback::domain::rollup::{grain, metric};
use tandem_feedback::domain::{HOUR, Micros};
use tandem_feedback::writer::{FeedbackWriter, WriterOptions};
use tandem_platform::bus::RawEvent;
use tandem_platform::config::{DatabaseConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::error::{ErrorCode, ServiceError as _};
use tandem_platform::outbox::OutboxWaker;
use tandem_platform::runtime::Service as _;
use tokio_util::sync::CancellationToken;

mod common;

use common::tenant;

#[allow(dead_code, reason = "held for its Drop")]
enum Keep {
    Postgres,
    Sqlite(tempfile::TempDir),
}

async fn postgres() -> (Db, Keep) {
    let pg = tandem_testkit::shared_postgres().await;
    let url = pg.fresh_database().await.unwrap();
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(url),
        schema: "feedback".into(),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    db.migrate(Some(tandem_feedback::Feedback::migrations()))
        .await
        .unwrap();
    (db, Keep::Postgres)
}

async fn sqlite() -> (Db, Keep) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("feedback.db").display());
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(url),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    db.migrate(Some(tandem_feedback::Feedback::migrations()))
        .await
        .unwrap();
    (db, Keep::Sqlite(dir))
}

/// Now in microseconds (submissions are checked against the clock).
fn now() -> Micros {
    chrono::Utc::now().timestamp_micros()
}

fn input(client_id: &str, score: i32) -> FeedbackInput {
    FeedbackInput {
        client_feedback_id: client_id.into(),
        conversation_id: format!("conv-{}", client_id.len() % 3),
        channel: 8,
        subject: 1,
        score: Some(Score::Csat(score)),
        comment: "the refund took too long".into(),
        language: 0,
        question_id: String::new(),
        submitted_at: Some(submitted_at()),
    }
}

/// One submission time for the whole test process, so replays carry identical content.
fn submitted_at() -> Micros {
    static AT: std::sync::OnceLock<Micros> = std::sync::OnceLock::new();
    *AT.get_or_init(|| now() - HOUR)
}

fn app(db: &Db, options: WriterOptions) -> (FeedbackApp, tokio::task::JoinHandle<()>) {
    let (app, writer) = FeedbackApp::with_writer(
        Store::new(db.clone()),
        OutboxWaker::default(),
        Duration::from_secs(3600),
        options,
        CancellationToken::new(),
    );
    (app, tokio::spawn(writer))
}

async fn scalar(db: &Db, sql: &str) -> i64 {
    match db {
        Db::Postgres(pool) => sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(pool)
            .await
            .unwrap(),
        Db::Sqlite(pool) => sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(pool)
            .await
            .unwrap(),
    }
}

/// Stored records, their events in the outbox, and the CSAT answers counted by the rollups
/// (hourly detail and daily tenant rows).
async fn counts(db: &Db) -> (i64, i64, i64, i64) {
    (
        scalar(db, "SELECT COUNT(*) FROM fb_feedback").await,
        scalar(
            db,
            "SELECT COUNT(*) FROM tandem_outbox WHERE type_name = 'tandem.feedback.v1.FeedbackReceived'",
        )
        .await,
        scalar(
            db,
            &format!(
                "SELECT CAST(COALESCE(SUM(den), 0) AS BIGINT) FROM fb_rollup WHERE grain = {} AND metric = {}",
                grain::HOUR,
                metric::CSAT
            ),
        )
        .await,
        scalar(
            db,
            &format!(
                "SELECT CAST(COALESCE(SUM(den), 0) AS BIGINT) FROM fb_rollup WHERE grain = {} AND metric = {}",
                grain::TENANT_DAY,
                metric::CSAT
            ),
        )
        .await,
    )
}

async fn concurrent_submissions_count_each_client_id_once(db: Db) {
    let (app, _writer) = app(
        &db,
        WriterOptions {
            max_batch: 16,
            linger: Duration::from_millis(5),
            queue: 1024,
            writers: 2,
        },
    );
    // 60 client ids, each submitted three times at once: replays meet in one batch and
    // across batches.
    let mut calls = Vec::new();
    for round in 0..3 {
        for i in 0..60 {
            let app = app.clone();
            calls.push(tokio::spawn(async move {
                let id = format!("fb-{i:03}");
                let at = now();
                let (stored, duplicate) = app
                    .submit(&tenant(), input(&id, 1 + i % 5), at)
                    .await
                    .unwrap();
                (round, id, stored.id, duplicate)
            }));
        }
    }
    let mut by_id: BTreeMap<String, Vec<(String, bool)>> = BTreeMap::new();
    for call in calls {
        let (_, id, record, duplicate) = call.await.unwrap();
        by_id.entry(id).or_default().push((record, duplicate));
    }
    assert_eq!(by_id.len(), 60);
    for (id, answers) in &by_id {
        assert_eq!(
            answers.iter().filter(|(_, dup)| !dup).count(),
            1,
            "{id}: exactly one call stores it, the others are replays: {answers:?}"
        );
        assert!(
            answers.iter().all(|(record, _)| *record == answers[0].0),
            "{id}: every call answers with the same record"
        );
    }
    assert_eq!(counts(&db).await, (60, 60, 60, 60));

    // A second wave, in later batches: all replays, nothing counted again.
    let mut calls = Vec::new();
    for i in 0..60 {
        let app = app.clone();
        calls.push(tokio::spawn(async move {
            app.submit(&tenant(), input(&format!("fb-{i:03}"), 1 + i % 5), now())
                .await
                .unwrap()
                .1
        }));
    }
    for call in calls {
        assert!(call.await.unwrap(), "a replay is reported as a duplicate");
    }
    let conflict = app
        .submit(&tenant(), input("fb-000", 5), now())
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), ErrorCode::AlreadyExists);
    assert_eq!(counts(&db).await, (60, 60, 60, 60));
}

async fn a_bad_record_fails_alone(db: Db) {
    let (app, _writer) = app(
        &db,
        WriterOptions {
            max_batch: 64,
            linger: Duration::from_millis(20),
            queue: 1024,
            writers: 2,
        },
    );
    // Invalid submissions are refused with their field named; the others are stored.
    let mut calls = Vec::new();
    for i in 0..32 {
        let app = app.clone();
        calls.push(tokio::spawn(async move {
            let mut input = input(&format!("ok-{i:02}"), 4);
            match i {
                7 => input.score = Some(Score::Csat(9)),
                11 => input.comment = "nul \0 inside".into(),
                _ => {}
            }
            (i, app.submit(&tenant(), input, now()).await)
        }));
    }
    for call in calls {
        let (i, outcome) = call.await.unwrap();
        match (i, outcome) {
            (7 | 11, Err(FeedbackError::InvalidArgument(message))) => {
                assert!(message.contains("feedback."), "{message}");
            }
            (7 | 11, other) => panic!("record {i} should be refused: {other:?}"),
            (_, outcome) => assert!(!outcome.unwrap().1),
        }
    }
    assert_eq!(counts(&db).await, (30, 30, 30, 30));

    // A record the database itself refuses (PostgreSQL stores no NUL in text) reaches the
    // writer in the same batch as good ones: the batch is stored without it.
    let store = Store::new(db.clone());
    let event = Arc::new(
        |tenant: &tandem_proto::ids::TenantId,
         record: &FeedbackRecord,
         _: Option<&tandem_feedback::domain::fact::ConversationFact>| {
            RawEvent::new(
                tenant,
                &tandem_proto::pb::feedback::v1::FeedbackReceived {
                    conversation_id: record.input.conversation_id.clone(),
                    ..Default::default()
                },
                None,
            )
        },
    );
    let (writer, task) = FeedbackWriter::new(
        store,
        WriterOptions {
            max_batch: 64,
            linger: Duration::from_millis(50),
            queue: 1024,
            writers: 2,
        },
        event,
        CancellationToken::new(),
    );
    tokio::spawn(task);
    let mut calls = Vec::new();
    for i in 0..20 {
        let writer = writer.clone();
        calls.push(tokio::spawn(async move {
            let mut input = input(&format!("raw-{i:02}"), 5);
            if i == 13 {
                input.comment = "nul \0 inside".into();
            }
            let at = now();
            let record = FeedbackRecord {
                id: uuid::Uuid::now_v7().to_string(),
                score: Score::Csat(5),
                language: 2,
                received_at: at,
                input,
            };
            (i, writer.submit(&tenant(), record).await)
        }));
    }
    let postgres = matches!(db, Db::Postgres(_));
    let mut stored = 0;
    for call in calls {
        let (i, outcome) = call.await.unwrap();
        match outcome {
            Ok((Stored::New(_), _)) => stored += 1,
            Ok((Stored::Existing(record), _)) => panic!("{i}: not a replay: {record:?}"),
            Err(e) => {
                assert!(postgres && i == 13, "{i}: {e:?}");
                assert!(matches!(e, StoreError::Database(_)), "{e:?}");
            }
        }
    }
    let expected = if postgres { 19 } else { 20 };
    assert_eq!(stored, expected);
    assert_eq!(
        counts(&db).await,
        (30 + expected, 30 + expected, 30 + expected, 30 + expected)
    );
}

async fn a_writer_killed_mid_batch_loses_nothing_acknowledged(db: Db) {
    let options = WriterOptions {
        max_batch: 8,
        linger: Duration::from_millis(2),
        queue: 1024,
        writers: 2,
    };
    let (first, writer) = app(&db, options);
    let answered = Arc::new(AtomicUsize::new(0));
    let mut calls = Vec::new();
    for i in 0..200 {
        let (app, answered) = (first.clone(), answered.clone());
        calls.push(tokio::spawn(async move {
            let id = format!("k-{i:03}");
            let outcome = app.submit(&tenant(), input(&id, 3), now()).await;
            answered.fetch_add(1, Ordering::SeqCst);
            (id, outcome)
        }));
    }
    while answered.load(Ordering::SeqCst) < 20 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    writer.abort();
    let mut acknowledged = Vec::new();
    let mut failed = Vec::new();
    for call in calls {
        let (id, outcome) = call.await.unwrap();
        match outcome {
            Ok((record, duplicate)) => {
                assert!(!duplicate);
                acknowledged.push((id, record.id));
            }
            Err(e) => {
                assert_eq!(e.code(), ErrorCode::Unavailable, "{e:?}");
                failed.push(id);
            }
        }
    }
    assert!(acknowledged.len() >= 20);
    assert!(
        !failed.is_empty(),
        "the writer died before answering everyone"
    );
    let stored = scalar(&db, "SELECT COUNT(*) FROM fb_feedback").await;
    assert!(stored >= acknowledged.len() as i64);
    assert!(stored < 200, "the queued records were not stored");

    // The callers retry through another replica: acknowledged records are replays of what
    // they were told, the others are stored now or (committed before the crash) replayed.
    let (second, _writer) = app(&db, options);
    let mut retries = Vec::new();
    for i in 0..200 {
        let app = second.clone();
        retries.push(tokio::spawn(async move {
            let id = format!("k-{i:03}");
            let (record, duplicate) = app.submit(&tenant(), input(&id, 3), now()).await.unwrap();
            (id, record.id, duplicate)
        }));
    }
    let acknowledged: BTreeMap<String, String> = acknowledged.into_iter().collect();
    for retry in retries {
        let (id, record, duplicate) = retry.await.unwrap();
        if let Some(first_record) = acknowledged.get(&id) {
            assert!(duplicate, "{id} was acknowledged, so it is stored");
            assert_eq!(&record, first_record);
        }
    }
    assert_eq!(counts(&db).await, (200, 200, 200, 200));
}

async fn two_replicas_raise_an_alert_once(db: Db) {
    use tandem_feedback::domain::alert::AlertRule;

    let (one, _w1) = app(&db, WriterOptions::default());
    let (two, _w2) = app(&db, WriterOptions::default());
    let at = now();
    one.upsert_rule(
        &tenant(),
        AlertRule {
            id: "csat-low".into(),
            name: "CSAT below 80 %".into(),
            kind: 1,
            scenario_id: String::new(),
            metric: metric::CSAT,
            condition: 2,
            threshold: 0.8,
            window: HOUR,
            baseline_window: 0,
            min_samples: 3,
            severity: 3,
            enabled: true,
            created_at: 0,
            updated_at: 0,
        },
        at,
    )
    .await
    .unwrap();
    // The scenario is known from a conversation's events.
    let started = tandem_proto::pb::dialog::v1::ConversationStarted {
        conversation_id: "conv-1".into(),
        scenario_id: "refund".into(),
        ..Default::default()
    };
    let raw = RawEvent::at(
        &tenant(),
        &started,
        Some("conv-1".into()),
        chrono::DateTime::from_timestamp_micros(at - 20 * 60 * 1_000_000).unwrap(),
    );
    tandem_feedback::adapters::bus::Projector::new(Store::new(db.clone()), "feedback-test")
        .apply(&[raw])
        .await
        .unwrap();
    for i in 0..5 {
        let mut bad = input(&format!("bad-{i}"), 1);
        bad.conversation_id = "conv-1".into();
        bad.submitted_at = Some(at - 10 * 60 * 1_000_000 + i);
        one.submit(&tenant(), bad, at).await.unwrap();
    }
    let evaluate_at = at + 1_000_000;
    let (a, b) = tokio::join!(
        one.evaluate_alerts(evaluate_at),
        two.evaluate_alerts(evaluate_at)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.0 + b.0, 1, "two replicas, one alert: {a:?} {b:?}");
    assert_eq!(two.evaluate_alerts(evaluate_at + 1).await.unwrap(), (0, 0));
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM fb_alert").await, 1);
    assert_eq!(
        scalar(
            &db,
            "SELECT COUNT(*) FROM tandem_outbox WHERE type_name = 'tandem.feedback.v1.AlertRaised'"
        )
        .await,
        1
    );
}

macro_rules! batching_tests {
    ($engine:ident) => {
        mod $engine {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_submissions_count_each_client_id_once() {
                let (db, _keep) = super::$engine().await;
                super::concurrent_submissions_count_each_client_id_once(db).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_bad_record_fails_alone() {
                let (db, _keep) = super::$engine().await;
                super::a_bad_record_fails_alone(db).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_writer_killed_mid_batch_loses_nothing_acknowledged() {
                let (db, _keep) = super::$engine().await;
                super::a_writer_killed_mid_batch_loses_nothing_acknowledged(db).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_replicas_raise_an_alert_once() {
                let (db, _keep) = super::$engine().await;
                super::two_replicas_raise_an_alert_once(db).await;
            }
        }
    };
}

batching_tests!(postgres);
batching_tests!(sqlite);
