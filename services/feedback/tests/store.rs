//! The feedback store's contract, run against PostgreSQL (a throwaway server) and SQLite (a temp
//! dir) by one macro: feedback idempotency, facts and rollups built from duplicated and
//! out-of-order events, re-attribution of early feedback, rollup grains, the trust index,
//! alerts (including those whose rule or scenario went away) and problem items.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use rand::SeedableRng as _;
use rand::seq::SliceRandom as _;
use sqlx::Row as _;
use tandem_feedback::adapters::bus::fact_input;
use tandem_feedback::adapters::sql::{Projected, Store, Stored, StoredAlert};
use tandem_feedback::domain::feedback::{FeedbackInput, FeedbackRecord, Score};
use tandem_feedback::domain::query::{MetricRequest, build_series};
use tandem_feedback::domain::rollup::metric;
use tandem_feedback::domain::{DAY, HOUR, Micros};
use tandem_platform::bus::RawEvent;
use tandem_platform::config::{DatabaseConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::runtime::Service as _;

mod common;

use common::{T0, life_events, tenant};

/// Keeps the engine's directory alive for the test.
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

fn projected(events: &[RawEvent]) -> Vec<Projected> {
    events
        .iter()
        .filter_map(|raw| {
            fact_input(raw).unwrap().map(|input| Projected {
                event_id: raw.id.clone(),
                tenant: raw.tenant.to_string(),
                input,
            })
        })
        .collect()
}

fn record(client_id: &str, conversation: &str, score: Score, at: Micros) -> FeedbackRecord {
    FeedbackRecord {
        id: uuid::Uuid::now_v7().to_string(),
        input: FeedbackInput {
            client_feedback_id: client_id.into(),
            conversation_id: conversation.into(),
            channel: 8,
            subject: 0,
            score: Some(score),
            comment: "退款太慢了".into(),
            language: 0,
            question_id: String::new(),
            submitted_at: Some(at),
        },
        score,
        language: 1,
        received_at: at + 1,
    }
}

fn event_for(record: &FeedbackRecord) -> RawEvent {
    let event = tandem_proto::pb::feedback::v1::FeedbackReceived {
        conversation_id: record.input.conversation_id.clone(),
        ..Default::default()
    };
    RawEvent::new(&tenant(), &event, None)
}

/// Every fact row and every non-zero rollup row, for comparing two databases.
async fn snapshot(db: &Db) -> Vec<String> {
    const QUERIES: [&str; 6] = [
        "SELECT conversation_id AS k, state AS v FROM fb_conversation ORDER BY 1",
        "SELECT handoff_id AS k, state AS v FROM fb_handoff ORDER BY 1",
        "SELECT suggestion_id AS k, state AS v FROM fb_suggestion ORDER BY 1",
        "SELECT (CAST(grain AS TEXT) || '|' || CAST(metric AS TEXT) || '|' || CAST(bucket AS TEXT) || '|' || scenario || '|' || intent || '|' || CAST(channel AS TEXT) || '|' || CAST(handler AS TEXT) || '|' || agent || '|' || team || '|' || CAST(reason AS TEXT) || '|' || CAST(language AS TEXT)) AS k, \
         (CAST(num AS TEXT) || '/' || CAST(den AS TEXT) || '/' || CAST(cnt AS TEXT) || '/' || CAST(total AS TEXT)) AS v \
         FROM fb_rollup WHERE num <> 0 OR den <> 0 OR cnt <> 0 OR total <> 0 ORDER BY 1",
        "SELECT (CAST(grain AS TEXT) || '|' || CAST(metric AS TEXT) || '|' || CAST(bucket AS TEXT) || '|' || scenario || '|' || agent || '|' || CAST(reason AS TEXT) || '|' || CAST(cell AS TEXT)) AS k, \
         CAST(SUM(cnt) AS TEXT) AS v FROM fb_rollup_hist GROUP BY 1 HAVING SUM(cnt) <> 0 ORDER BY 1",
        "SELECT conversation_id AS k, (outcome || '|' || CAST(followed_up AS TEXT)) AS v FROM fb_conversation ORDER BY 1",
    ];
    let mut out = Vec::new();
    for query in QUERIES {
        let rows = match db {
            Db::Postgres(pool) => sqlx::query(query)
                .fetch_all(pool)
                .await
                .unwrap()
                .iter()
                .map(|r| format!("{}={}", r.get::<String, _>("k"), r.get::<String, _>("v")))
                .collect::<Vec<_>>(),
            Db::Sqlite(pool) => sqlx::query(query)
                .fetch_all(pool)
                .await
                .unwrap()
                .iter()
                .map(|r| format!("{}={}", r.get::<String, _>("k"), r.get::<String, _>("v")))
                .collect::<Vec<_>>(),
        };
        out.extend(rows);
    }
    out
}

async fn metric_values(store: &Store, metrics: &[i32], group_by: Vec<i32>) -> Vec<String> {
    let query = MetricRequest {
        metrics: metrics.to_vec(),
        start: Some(T0 - DAY),
        end: Some(T0 + 10 * DAY),
        granularity: 3,
        group_by,
        ..MetricRequest::default()
    }
    .validate(T0 + 10 * DAY)
    .unwrap();
    let (rows, hist) = store.metrics(tenant().as_str(), &query).await.unwrap();
    build_series(&query, &rows, &hist)
        .unwrap()
        .into_iter()
        .flat_map(|s| {
            s.points.into_iter().map(move |p| {
                format!(
                    "{}{:?}: {:.4} {}/{} n={} {:?}",
                    s.metric, s.group, p.value, p.numerator, p.denominator, p.count, p.percentiles
                )
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The contract.

async fn feedback_is_idempotent_by_client_id(db: Db) {
    let store = Store::new(db);
    let first = record("f1", "c-unknown", Score::Csat(2), T0);
    let stored = store
        .insert_feedback(tenant().as_str(), &[(first.clone(), event_for(&first))])
        .await
        .unwrap();
    assert_eq!(stored, [Stored::New(first.clone())]);
    let replay = record("f1", "c-unknown", Score::Csat(5), T0);
    let stored = store
        .insert_feedback(tenant().as_str(), &[(replay.clone(), event_for(&replay))])
        .await
        .unwrap();
    assert_eq!(
        stored,
        [Stored::Existing(first.clone())],
        "the first record stays"
    );
    let twice = record("f2", "", Score::Nps(10), T0);
    let stored = store
        .insert_feedback(
            tenant().as_str(),
            &[
                (twice.clone(), event_for(&twice)),
                (twice.clone(), event_for(&twice)),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        stored,
        [Stored::New(twice.clone()), Stored::Existing(twice)]
    );
    let values = metric_values(&store, &[metric::CSAT, metric::NPS], vec![]).await;
    assert_eq!(
        values,
        ["10[]: 0.0000 0/1 n=1 None", "11[]: 100.0000 1/1 n=1 None"]
    );
}

async fn replays_in_any_order_with_duplicates_give_the_same_facts_and_rollups(
    first: Db,
    second: Db,
) {
    let events = life_events(24);
    let ordered = Store::new(first.clone());
    ordered
        .project("feedback-test", &projected(&events))
        .await
        .unwrap();

    let shuffled_store = Store::new(second.clone());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut shuffled = events.clone();
    // A third of the events is delivered twice, and everything in random order and batches.
    shuffled.extend(events.iter().step_by(3).cloned());
    shuffled.shuffle(&mut rng);
    for batch in shuffled.chunks(13) {
        let applied = shuffled_store
            .project("feedback-test", &projected(batch))
            .await
            .unwrap();
        assert!(applied <= batch.len());
    }
    // A whole redelivery changes nothing.
    assert_eq!(
        shuffled_store
            .project("feedback-test", &projected(&events))
            .await
            .unwrap(),
        0
    );
    assert_eq!(snapshot(&first).await, snapshot(&second).await);
    let all = (1..=13).collect::<Vec<i32>>();
    let a = metric_values(&ordered, &all, vec![1]).await;
    let b = metric_values(&shuffled_store, &all, vec![1]).await;
    assert_eq!(a, b);
    assert!(
        a.iter().any(|line| line.starts_with("3[(1, \"refund\")]")),
        "system latency is reported: {a:#?}"
    );
    // The rows with every dimension agree with the scenario and tenant rows.
    let by_handler = metric_values(&ordered, &[2], vec![4]).await;
    assert_eq!(
        by_handler,
        metric_values(&shuffled_store, &[2], vec![4]).await
    );
    let denominators = |lines: &[String]| -> i64 {
        lines
            .iter()
            .map(|line| {
                let frac = line
                    .split_whitespace()
                    .find(|t| t.split('/').all(|x| x.parse::<i64>().is_ok()) && t.contains('/'))
                    .unwrap();
                frac.split_once('/').unwrap().1.parse::<i64>().unwrap()
            })
            .sum()
    };
    let overall = metric_values(&ordered, &[2], vec![]).await;
    assert!(by_handler.len() >= 2, "{by_handler:?}");
    assert_eq!(denominators(&by_handler), denominators(&overall));
    // Containment + handoff rate never exceed the eligible conversations.
    let rates = metric_values(&ordered, &[1, 2], vec![]).await;
    let parse = |line: &String| -> (i64, i64) {
        let frac = line.split_whitespace().nth(2).unwrap();
        let (n, d) = frac.split_once('/').unwrap();
        (n.parse().unwrap(), d.parse().unwrap())
    };
    let (contained, eligible) = parse(&rates[0]);
    let (handed_off, eligible_too) = parse(&rates[1]);
    assert_eq!(eligible, eligible_too);
    assert!(contained + handed_off <= eligible, "{rates:?}");
    assert!(contained > 0 && handed_off > 0, "{rates:?}");
}

async fn early_feedback_moves_to_its_conversation_when_events_arrive(db: Db) {
    let store = Store::new(db);
    let events = life_events(1);
    let conversation = &projected(&events)[0].input.conversation_id.clone();
    let early = record("early", conversation, Score::Csat(5), T0 + HOUR);
    store
        .insert_feedback(tenant().as_str(), &[(early.clone(), event_for(&early))])
        .await
        .unwrap();
    let before = metric_values(&store, &[metric::CSAT], vec![1]).await;
    assert_eq!(before, ["10[(1, \"\")]: 1.0000 1/1 n=1 None"]);
    store
        .project("feedback-test", &projected(&events))
        .await
        .unwrap();
    let after = metric_values(&store, &[metric::CSAT], vec![1]).await;
    assert_eq!(after, ["10[(1, \"refund\")]: 1.0000 1/1 n=1 None"]);
}

async fn daily_and_hourly_rollups_agree(db: Db) {
    let store = Store::new(db);
    store
        .project("feedback-test", &projected(&life_events(30)))
        .await
        .unwrap();
    let query = |granularity: i32| MetricRequest {
        metrics: vec![metric::HANDOFF_RATE, metric::QUEUE_WAIT],
        start: Some(T0.div_euclid(DAY) * DAY),
        end: Some(T0.div_euclid(DAY) * DAY + 5 * DAY),
        granularity,
        ..MetricRequest::default()
    };
    let mut totals = BTreeMap::new();
    for granularity in [1, 2, 3] {
        let q = query(granularity).validate(T0 + 10 * DAY).unwrap();
        let (rows, hist) = store.metrics(tenant().as_str(), &q).await.unwrap();
        let series = build_series(&q, &rows, &hist).unwrap();
        let sum: Vec<(i32, i64, i64)> = series
            .iter()
            .map(|s| {
                (
                    s.metric,
                    s.points.iter().map(|p| p.numerator).sum(),
                    s.points.iter().map(|p| p.count).sum(),
                )
            })
            .collect();
        totals.insert(granularity, sum);
    }
    assert_eq!(totals[&1], totals[&2]);
    assert_eq!(totals[&2], totals[&3]);
    assert!(totals[&3].iter().all(|(_, _, n)| *n > 0), "{totals:?}");
}

async fn alerts_open_once_per_rule_and_scenario(db: Db) {
    let store = Store::new(db);
    let alert = |id: &str| StoredAlert {
        id: id.into(),
        rule_id: "r1".into(),
        kind: 1,
        scenario_id: "rebooking".into(),
        metric: metric::CSAT,
        observed: 0.5,
        threshold: 0.8,
        baseline: 0.0,
        window: HOUR,
        severity: 2,
        status: 1,
        explanation: "bot CSAT fell".into(),
        raised_at: T0,
        acknowledged_at: None,
        acknowledged_by: String::new(),
        resolved_at: None,
    };
    let event = |id: &str| {
        RawEvent::new(
            &tenant(),
            &tandem_proto::pb::feedback::v1::AlertRaised {
                alert_id: id.into(),
                ..Default::default()
            },
            None,
        )
    };
    assert!(
        store
            .raise(tenant().as_str(), &alert("a1"), &event("a1"), T0 - HOUR)
            .await
            .unwrap()
    );
    assert!(
        !store
            .raise(tenant().as_str(), &alert("a2"), &event("a2"), T0 - HOUR)
            .await
            .unwrap(),
        "one open alert per rule and scenario"
    );
    let acked = store
        .acknowledge(tenant().as_str(), "a1", "lead-1", "looking", T0 + 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (acked.status, acked.acknowledged_by.as_str()),
        (2, "lead-1")
    );
    assert!(
        store
            .acknowledge(tenant().as_str(), "nope", "lead-1", "", T0)
            .await
            .unwrap()
            .is_none()
    );
    let (open, resolved) = store
        .standing(tenant().as_str(), "r1", "rebooking")
        .await
        .unwrap();
    assert_eq!(open.map(|a| a.id), Some("a1".to_owned()));
    assert_eq!(resolved, None);
    assert!(
        store
            .resolve(tenant().as_str(), "a1", T0 + 5, &event("a1"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .resolve(tenant().as_str(), "a1", T0 + 6, &event("a1"))
            .await
            .unwrap()
    );
    let (open, resolved) = store
        .standing(tenant().as_str(), "r1", "rebooking")
        .await
        .unwrap();
    assert!(open.is_none());
    assert_eq!(resolved, Some(T0 + 5));
    assert!(
        !store
            .raise(tenant().as_str(), &alert("a3"), &event("a3"), T0 + 4)
            .await
            .unwrap(),
        "an alert resolved within the cool-down keeps the rule quiet"
    );
    assert!(
        store
            .raise(tenant().as_str(), &alert("a3"), &event("a3"), T0 + 5)
            .await
            .unwrap()
    );
}

async fn problem_items_join_complaints_with_their_scenario(db: Db) {
    let store = Store::new(db);
    let events = life_events(6);
    store
        .project("feedback-test", &projected(&events))
        .await
        .unwrap();
    let conversation = projected(&events)[0].input.conversation_id.clone();
    let complaint = record("c1", &conversation, Score::Csat(1), T0 + HOUR);
    let praise = record("c2", &conversation, Score::Csat(5), T0 + HOUR);
    store
        .insert_feedback(
            tenant().as_str(),
            &[
                (complaint.clone(), event_for(&complaint)),
                (praise.clone(), event_for(&praise)),
            ],
        )
        .await
        .unwrap();
    let items = store
        .problem_items(
            tenant().as_str(),
            "refund",
            0,
            (T0 - DAY, T0 + 10 * DAY),
            100,
        )
        .await
        .unwrap();
    assert!(
        items
            .iter()
            .any(|i| i.text == "退款太慢了" && i.scenario_id == "refund")
    );
    assert_eq!(
        items.iter().filter(|i| i.text == "退款太慢了").count(),
        1,
        "praise is not a problem"
    );
    assert!(
        items.iter().any(|i| i.text.contains("refund")),
        "handoff summaries are problems too: {items:?}"
    );
}

async fn alert_rules_raise_once_resolve_with_a_margin_and_cool_down(db: Db) {
    use tandem_feedback::app::FeedbackApp;
    use tandem_feedback::domain::alert::AlertRule;
    use tandem_platform::outbox::OutboxWaker;

    let store = Store::new(db.clone());
    let app = FeedbackApp::new(
        store.clone(),
        OutboxWaker::default(),
        std::time::Duration::from_secs(3600),
    );
    let now = T0 + 20 * DAY;
    let rule = app
        .upsert_rule(
            &tenant(),
            AlertRule {
                name: "rebooking bot CSAT".into(),
                ..csat_rule("", "rebooking")
            },
            now,
        )
        .await
        .unwrap();
    let started = tandem_proto::pb::dialog::v1::ConversationStarted {
        conversation_id: "live".into(),
        scenario_id: "rebooking".into(),
        ..Default::default()
    };
    let raw = RawEvent::at(
        &tenant(),
        &started,
        Some("live".into()),
        chrono::DateTime::from_timestamp_micros(now - 10 * 60 * 1_000_000).unwrap(),
    );
    store
        .project("feedback-test", &projected(&[raw]))
        .await
        .unwrap();
    let answers = |prefix: &str, score: i32, at: Micros| -> Vec<(FeedbackRecord, RawEvent)> {
        (0..3)
            .map(|i| {
                let mut r = record(&format!("{prefix}-{i}"), "live", Score::Csat(score), at + i);
                r.input.subject = 1;
                let e = event_for(&r);
                (r, e)
            })
            .collect()
    };
    store
        .insert_feedback(
            tenant().as_str(),
            &answers("bad", 1, now - 5 * 60 * 1_000_000),
        )
        .await
        .unwrap();
    assert_eq!(app.evaluate_alerts(now).await.unwrap(), (1, 0));
    assert_eq!(
        app.evaluate_alerts(now + 1).await.unwrap(),
        (0, 0),
        "one problem, one alert"
    );
    store
        .insert_feedback(tenant().as_str(), &answers("good", 5, now + 10))
        .await
        .unwrap();
    assert_eq!(app.evaluate_alerts(now + 20).await.unwrap(), (0, 1));
    store
        .insert_feedback(tenant().as_str(), &answers("worse", 1, now + 30))
        .await
        .unwrap();
    assert_eq!(
        app.evaluate_alerts(now + 40).await.unwrap(),
        (0, 0),
        "cool-down after resolving"
    );
    let later = now + 2 * HOUR;
    store
        .insert_feedback(
            tenant().as_str(),
            &answers("again", 2, later - 60 * 1_000_000),
        )
        .await
        .unwrap();
    assert_eq!(app.evaluate_alerts(later).await.unwrap(), (1, 0));
    let alerts = store
        .list_alerts(
            tenant().as_str(),
            &tandem_feedback::adapters::sql::AlertFilter {
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let statuses: Vec<(i32, &str)> = alerts
        .iter()
        .map(|a| (a.status, a.rule_id.as_str()))
        .collect();
    assert_eq!(statuses, [(1, rule.id.as_str()), (3, rule.id.as_str())]);
    let outbox = "SELECT type_name FROM tandem_outbox WHERE type_name LIKE '%Alert%' ORDER BY seq";
    let published: Vec<String> = match &db {
        Db::Postgres(pool) => sqlx::query_scalar(outbox).fetch_all(pool).await.unwrap(),
        Db::Sqlite(pool) => sqlx::query_scalar(outbox).fetch_all(pool).await.unwrap(),
    };
    assert_eq!(
        published,
        [
            "tandem.feedback.v1.AlertRaised",
            "tandem.feedback.v1.AlertResolved",
            "tandem.feedback.v1.AlertRaised"
        ]
    );
}

async fn alert_rules_of_every_tenant_are_evaluated_across_pages(db: Db) {
    use tandem_feedback::domain::alert::AlertRule;

    let store = Store::new(db.clone());
    // One rule per page, so every page boundary falls between tenants sharing a rule id.
    let app = app_paging_one_rule(&store);
    let now = T0 + 20 * DAY;
    for name in ["acme", "beta"] {
        let tenant = tandem_proto::ids::TenantId::new(name).unwrap();
        for id in ["r1", "r2", "r3"] {
            app.upsert_rule(
                &tenant,
                AlertRule {
                    name: format!("rebooking bot CSAT {id}"),
                    ..csat_rule(id, "rebooking")
                },
                now,
            )
            .await
            .unwrap();
        }
        let started = tandem_proto::pb::dialog::v1::ConversationStarted {
            conversation_id: "live".into(),
            scenario_id: "rebooking".into(),
            ..Default::default()
        };
        let raw = RawEvent::at(
            &tenant,
            &started,
            Some("live".into()),
            chrono::DateTime::from_timestamp_micros(now - 10 * 60 * 1_000_000).unwrap(),
        );
        store
            .project("feedback-test", &projected(&[raw]))
            .await
            .unwrap();
        let answers: Vec<(FeedbackRecord, RawEvent)> = (0..3)
            .map(|i| {
                let at = now - 5 * 60 * 1_000_000 + i;
                let mut r = record(&format!("bad-{i}"), "live", Score::Csat(1), at);
                r.input.subject = 1;
                let e = event_for(&r);
                (r, e)
            })
            .collect();
        store.insert_feedback(name, &answers).await.unwrap();
    }
    assert_eq!(
        app.evaluate_alerts(now).await.unwrap(),
        (6, 0),
        "every rule of every tenant raises its alert"
    );
}

/// A CSAT rule for bot answers below 0.8 over the last 3 answers of an hour.
fn csat_rule(id: &str, scenario_id: &str) -> tandem_feedback::domain::alert::AlertRule {
    tandem_feedback::domain::alert::AlertRule {
        id: id.into(),
        name: format!("bot CSAT {id}"),
        kind: 1,
        scenario_id: scenario_id.into(),
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
    }
}

/// Starts a conversation of a scenario 10 minutes before `now` with 3 bad bot CSAT answers 5
/// minutes before `now`.
async fn bad_bot_csat(store: &Store, scenario: &str, now: Micros) {
    let conversation = format!("live-{scenario}");
    let started = tandem_proto::pb::dialog::v1::ConversationStarted {
        conversation_id: conversation.clone(),
        scenario_id: scenario.into(),
        ..Default::default()
    };
    let raw = RawEvent::at(
        &tenant(),
        &started,
        Some(conversation.clone()),
        chrono::DateTime::from_timestamp_micros(now - 10 * 60 * 1_000_000).unwrap(),
    );
    store
        .project("feedback-test", &projected(&[raw]))
        .await
        .unwrap();
    let answers: Vec<(FeedbackRecord, RawEvent)> = (0..3)
        .map(|i| {
            let at = now - 5 * 60 * 1_000_000 + i;
            let id = format!("bad-{scenario}-{i}");
            let mut r = record(&id, &conversation, Score::Csat(1), at);
            r.input.subject = 1;
            let e = event_for(&r);
            (r, e)
        })
        .collect();
    store
        .insert_feedback(tenant().as_str(), &answers)
        .await
        .unwrap();
}

/// The `AlertResolved` events in the outbox, in order.
async fn resolved_events(db: &Db) -> Vec<tandem_proto::pb::feedback::v1::AlertResolved> {
    use prost::Message as _;
    let outbox = "SELECT payload FROM tandem_outbox \
        WHERE type_name = 'tandem.feedback.v1.AlertResolved' ORDER BY seq";
    let payloads: Vec<Vec<u8>> = match db {
        Db::Postgres(pool) => sqlx::query_scalar(outbox).fetch_all(pool).await.unwrap(),
        Db::Sqlite(pool) => sqlx::query_scalar(outbox).fetch_all(pool).await.unwrap(),
    };
    payloads
        .iter()
        .map(|p| tandem_proto::pb::feedback::v1::AlertResolved::decode(p.as_slice()).unwrap())
        .collect()
}

/// (rule, scenario, status) of every alert, sorted.
async fn alert_states(store: &Store) -> Vec<(String, String, i32)> {
    let mut states: Vec<(String, String, i32)> = store
        .list_alerts(
            tenant().as_str(),
            &tandem_feedback::adapters::sql::AlertFilter {
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.rule_id, a.scenario_id, a.status))
        .collect();
    states.sort();
    states
}

async fn open_alerts_resolve_when_no_enabled_rule_evaluates_them(db: Db) {
    let store = Store::new(db.clone());
    // One alert per page, so the sweep pages too.
    let app = app_paging_one_rule(&store);
    let now = T0 + 20 * DAY;
    for (id, scenario) in [
        ("disabled", "rebooking"),
        ("rescoped", ""),
        ("kept", ""),
        ("kept-one", "rebooking"),
    ] {
        app.upsert_rule(&tenant(), csat_rule(id, scenario), now)
            .await
            .unwrap();
    }
    bad_bot_csat(&store, "rebooking", now).await;
    assert_eq!(app.evaluate_alerts(now).await.unwrap(), (4, 0));
    // An open alert of a rule that is gone.
    let gone = StoredAlert {
        id: "gone-alert".into(),
        rule_id: "gone".into(),
        kind: 1,
        scenario_id: "rebooking".into(),
        metric: metric::CSAT,
        observed: 0.2,
        threshold: 0.8,
        baseline: 0.0,
        window: HOUR,
        severity: 3,
        status: 1,
        explanation: "bot CSAT fell".into(),
        raised_at: now,
        acknowledged_at: None,
        acknowledged_by: String::new(),
        resolved_at: None,
    };
    let raised = RawEvent::new(
        &tenant(),
        &tandem_proto::pb::feedback::v1::AlertRaised {
            alert_id: gone.id.clone(),
            ..Default::default()
        },
        None,
    );
    assert!(
        store
            .raise(tenant().as_str(), &gone, &raised, now - HOUR)
            .await
            .unwrap()
    );
    app.upsert_rule(
        &tenant(),
        tandem_feedback::domain::alert::AlertRule {
            enabled: false,
            ..csat_rule("disabled", "rebooking")
        },
        now + 1,
    )
    .await
    .unwrap();
    app.upsert_rule(&tenant(), csat_rule("rescoped", "billing"), now + 1)
        .await
        .unwrap();
    // The CSAT of rebooking is still bad: the rules that still evaluate it keep their alerts.
    assert_eq!(
        app.evaluate_alerts(now + 2).await.unwrap(),
        (0, 3),
        "the alerts of the disabled, re-scoped and deleted rules resolve"
    );
    assert_eq!(
        app.evaluate_alerts(now + 3).await.unwrap(),
        (0, 0),
        "each resolves once"
    );
    let r = |rule: &str, status| (rule.to_owned(), "rebooking".to_owned(), status);
    assert_eq!(
        alert_states(&store).await,
        [
            r("disabled", 3),
            r("gone", 3),
            r("kept", 1),
            r("kept-one", 1),
            r("rescoped", 3)
        ]
    );
    let mut resolved: Vec<(String, String)> = resolved_events(&db)
        .await
        .into_iter()
        .map(|e| {
            assert!(e.observed_value.is_nan(), "no measurement: {e:?}");
            assert_eq!(
                (e.scenario_id.as_str(), e.kind, e.metric),
                ("rebooking", 1, metric::CSAT)
            );
            (e.rule_id, e.alert_id)
        })
        .collect();
    resolved.sort();
    let rules: Vec<&str> = resolved.iter().map(|(rule, _)| rule.as_str()).collect();
    assert_eq!(
        rules,
        ["disabled", "gone", "rescoped"],
        "one AlertResolved per alert"
    );
    assert!(resolved.contains(&("gone".to_owned(), "gone-alert".to_owned())));
}

async fn open_alerts_of_quiet_scenarios_resolve(db: Db) {
    use tandem_feedback::app::FeedbackApp;
    use tandem_platform::outbox::OutboxWaker;

    let store = Store::new(db.clone());
    let app = FeedbackApp::new(
        store.clone(),
        OutboxWaker::default(),
        std::time::Duration::from_secs(3600),
    );
    let now = T0 + 20 * DAY;
    for (id, scenario) in [("every", ""), ("one", "rebooking")] {
        app.upsert_rule(&tenant(), csat_rule(id, scenario), now)
            .await
            .unwrap();
    }
    bad_bot_csat(&store, "rebooking", now).await;
    assert_eq!(app.evaluate_alerts(now).await.unwrap(), (2, 0));
    assert_eq!(
        app.evaluate_alerts(now + HOUR / 2).await.unwrap(),
        (0, 0),
        "the window still holds the bad answers"
    );
    // Nothing happens in rebooking for over an hour: the window has no data at all.
    let later = now + 2 * HOUR;
    assert_eq!(
        app.evaluate_alerts(later).await.unwrap(),
        (0, 2),
        "the open alerts of a quiet scenario resolve"
    );
    assert_eq!(app.evaluate_alerts(later + 1).await.unwrap(), (0, 0));
    let r = |rule: &str| (rule.to_owned(), "rebooking".to_owned(), 3);
    assert_eq!(alert_states(&store).await, [r("every"), r("one")]);
    let events = resolved_events(&db).await;
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        assert!(e.observed_value.is_nan(), "no measurement: {e:?}");
        assert_eq!(e.scenario_id, "rebooking");
        assert_eq!(e.fired_for.as_ref().map(|d| d.seconds), Some(2 * 3600));
    }
}

macro_rules! store_contract_tests {
    ($engine:ident) => {
        mod $engine {
            #[tokio::test]
            async fn feedback_is_idempotent_by_client_id() {
                let (db, _keep) = super::$engine().await;
                super::feedback_is_idempotent_by_client_id(db).await;
            }

            #[tokio::test]
            async fn replays_in_any_order_with_duplicates_give_the_same_facts_and_rollups() {
                let (first, _keep1) = super::$engine().await;
                let (second, _keep2) = super::$engine().await;
                super::replays_in_any_order_with_duplicates_give_the_same_facts_and_rollups(
                    first, second,
                )
                .await;
            }

            #[tokio::test]
            async fn early_feedback_moves_to_its_conversation_when_events_arrive() {
                let (db, _keep) = super::$engine().await;
                super::early_feedback_moves_to_its_conversation_when_events_arrive(db).await;
            }

            #[tokio::test]
            async fn daily_and_hourly_rollups_agree() {
                let (db, _keep) = super::$engine().await;
                super::daily_and_hourly_rollups_agree(db).await;
            }

            #[tokio::test]
            async fn alerts_open_once_per_rule_and_scenario() {
                let (db, _keep) = super::$engine().await;
                super::alerts_open_once_per_rule_and_scenario(db).await;
            }

            #[tokio::test]
            async fn alert_rules_raise_once_resolve_with_a_margin_and_cool_down() {
                let (db, _keep) = super::$engine().await;
                super::alert_rules_raise_once_resolve_with_a_margin_and_cool_down(db).await;
            }

            #[tokio::test]
            async fn alert_rules_of_every_tenant_are_evaluated_across_pages() {
                let (db, _keep) = super::$engine().await;
                super::alert_rules_of_every_tenant_are_evaluated_across_pages(db).await;
            }

            #[tokio::test]
            async fn open_alerts_resolve_when_no_enabled_rule_evaluates_them() {
                let (db, _keep) = super::$engine().await;
                super::open_alerts_resolve_when_no_enabled_rule_evaluates_them(db).await;
            }

            #[tokio::test]
            async fn open_alerts_of_quiet_scenarios_resolve() {
                let (db, _keep) = super::$engine().await;
                super::open_alerts_of_quiet_scenarios_resolve(db).await;
            }

            #[tokio::test]
            async fn problem_items_join_complaints_with_their_scenario() {
                let (db, _keep) = super::$engine().await;
                super::problem_items_join_complaints_with_their_scenario(db).await;
            }
        }
    };
}

store_contract_tests!(postgres);
store_contract_tests!(sqlite);

/// The feedback app over `store`, reading one alert rule (and one open alert) per page, so that
/// every page boundary is crossed.
fn app_paging_one_rule(store: &Store) -> tandem_feedback::app::FeedbackApp {
    tandem_feedback::app::FeedbackApp::new(
        store.clone(),
        tandem_platform::outbox::OutboxWaker::default(),
        std::time::Duration::from_secs(3600),
    )
    .with_rule_page(1)
}
