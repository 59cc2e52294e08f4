//! Automatic adjustments through the application layer, with the clock under the test's control
//! (`App::observe_at`), on PostgreSQL (a throwaway server) and SQLite (a temp dir): whole-scenario
//! validation of a change, reverts that respect later changes and pins, reverts on resolved
//! alerts, one application per episode, adjustment paging, the pruning of old adjustments, and
//! the end of episodes whose signal went silent (`App::sweep_silent_at`, also under a clock the
//! test controls).

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::time::Duration;

use tandem_platform::config::{DatabaseConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::outbox::OutboxWaker;
use tandem_platform::runtime::Service as _;
use tandem_policy::app::{Actor, App, AppOptions};
use tandem_policy::document::{Format, parse};
use tandem_policy::store::{
    ListFilter, Observation, RuleState, Store, now_micros, timestamp_micros,
};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::policy::v1 as pb;

#[path = "support/rules.rs"]
mod rules;
use rules::live_rule_below_0_7;

/// Keeps the engine's directory alive for the test.
#[allow(dead_code, reason = "held for its Drop")]
enum Keep {
    Postgres,
    Sqlite(tempfile::TempDir),
}

/// Connects to the database of `config` and brings the policy schema up to date.
async fn migrated(config: DatabaseConfig) -> Db {
    let db = Db::connect(&config).await.unwrap();
    db.migrate(Some(tandem_policy::Policy::migrations()))
        .await
        .unwrap();
    db
}

async fn postgres() -> (Db, Keep) {
    let pg = tandem_testkit::shared_postgres().await;
    let url = pg.fresh_database().await.unwrap();
    let db = migrated(DatabaseConfig {
        url: Secret::new(url),
        schema: "policy".into(),
        ..DatabaseConfig::default()
    })
    .await;
    (db, Keep::Postgres)
}

async fn sqlite() -> (Db, Keep) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("policy.db").display());
    let db = migrated(DatabaseConfig {
        url: Secret::new(url),
        ..DatabaseConfig::default()
    })
    .await;
    (db, Keep::Sqlite(dir))
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::postgres()).await }) *
        }
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::sqlite()).await }) *
        }
    };
}

both!(
    an_adjustment_that_would_invalidate_the_scenario_is_blocked,
    a_revert_leaves_later_changes_alone,
    a_revert_blocked_by_a_pin_happens_after_unpinning,
    adjustments_of_one_batch_page_without_gaps,
    a_resolved_alert_reverts_its_rule,
    a_persisting_breach_applies_once_per_episode,
    old_adjustments_are_pruned_and_running_episodes_still_revert,
    a_silent_signal_reverts_its_rule_after_the_timeout_once,
    a_rule_without_a_silence_timeout_keeps_its_change,
    a_silent_revert_blocked_by_a_pin_happens_after_unpinning,
    a_silent_revert_leaves_later_changes_alone,
    a_silent_revert_in_shadow_mode_is_only_recorded,
    silence_timeouts_out_of_range_are_refused,
);

const DAY: i64 = 86_400 * SECOND;

const SECOND: i64 = 1_000_000;

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn person() -> Actor {
    Actor {
        id: "u-1".into(),
        reason: "test".into(),
    }
}

/// An app on `db`, with its catalogue read afresh on every decision, and the `refund` scenario.
async fn app(db: impl Future<Output = (Db, Keep)>) -> (App, Keep) {
    let (db, keep) = db.await;
    let app = App::new(
        Store::new(db),
        OutboxWaker::default(),
        AppOptions {
            catalogue_ttl: Duration::ZERO,
            ..AppOptions::default()
        },
        None,
    );
    app.import(&tenant(), document(20), &person(), false)
        .await
        .unwrap();
    (app, keep)
}

/// The `refund` scenario with `max_bot_turns` (guardrails leave room around every value).
fn document(max_bot_turns: i32) -> Vec<pb::Scenario> {
    let doc = format!(
        r"
scenarios:
  - id: refund
    intents: [refund_request]
    intent_priority: 5
    tier: TIER_STANDARD
    strategy: STRATEGY_BOT_FIRST
    thresholds:
      min_intent_confidence: 0.6
      clarify_confidence: 0.4
      max_bot_turns: {max_bot_turns}
      max_fallbacks: 2
      sentiment_window_turns: 3
    guardrails:
      min_intent_confidence: {{ min: 0.3, max: 0.9 }}
      clarify_confidence: {{ min: 0.2, max: 0.7 }}
      max_bot_turns: {{ min: 8, max: 50 }}
      max_fallbacks: {{ min: 1, max: 5 }}
      sentiment_window_turns: {{ min: 2, max: 6 }}
"
    );
    parse(Format::Yaml, &doc).unwrap()
}

/// A live rule on the bot CSAT of `refund` (below 0.7 over a minute) stepping `field` by `delta`.
async fn rule(app: &App, field: pb::ThresholdField, delta: f64) -> pb::AdjustmentRule {
    rule_on(app, pb::AdjustmentSignal::BotCsat, field, delta).await
}

async fn rule_on(
    app: &App,
    signal: pb::AdjustmentSignal,
    field: pb::ThresholdField,
    delta: f64,
) -> pb::AdjustmentRule {
    let step = pb::adjustment_rule::Effect::Step(pb::ThresholdStep {
        field: field as i32,
        delta,
    });
    app.upsert_rule(&tenant(), live_rule_below_0_7("refund", signal, 60, step))
        .await
        .unwrap()
}

/// Observes `value` of `signal` for `refund` at `at` (µs), with the clock at `at`.
/// A second rule, on the containment rate, that takes 2 off `max_bot_turns`; fired at `at`.
async fn second_rule_moves_max_bot_turns(app: &App, at: i64) {
    rule_on(
        app,
        pb::AdjustmentSignal::ContainmentRate,
        pb::ThresholdField::MaxBotTurns,
        -2.0,
    )
    .await;
    observe_signal(app, pb::AdjustmentSignal::ContainmentRate, 0.5, at).await;
}

async fn observe_signal(app: &App, signal: pb::AdjustmentSignal, value: f64, at: i64) {
    let o = Observation {
        scenario_id: "refund".into(),
        signal: signal as i32,
        value,
        observed_at: at,
        resolution: false,
    };
    app.observe_at(&tenant(), None, vec![o], at).await.unwrap();
}

/// The bot CSAT alert of `refund` resolves at `at` (µs) with `value` (NaN: no measurement), as
/// the `AlertResolved` consumer passes it on.
async fn resolve(app: &App, value: f64, at: i64) {
    let o = Observation {
        scenario_id: "refund".into(),
        signal: pb::AdjustmentSignal::BotCsat as i32,
        value,
        observed_at: at,
        resolution: true,
    };
    app.observe_at(&tenant(), None, vec![o], at).await.unwrap();
}

/// Events waiting in the outbox (no relay runs in these tests).
async fn outbox_events(app: &App) -> i64 {
    tandem_platform::on_db!(app.store().db(), pool => {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM tandem_outbox")
            .fetch_one(pool)
            .await
            .unwrap()
    })
}

async fn versions(app: &App) -> Vec<pb::PolicyVersion> {
    app.store()
        .versions(&tenant(), "refund", None, 100)
        .await
        .unwrap()
}

async fn observe(app: &App, value: f64, at: i64) {
    observe_signal(app, pb::AdjustmentSignal::BotCsat, value, at).await;
}

async fn refund(app: &App) -> pb::Scenario {
    app.get(&tenant(), "refund").await.unwrap()
}

fn thresholds(s: &pb::Scenario) -> pb::Thresholds {
    s.thresholds.unwrap_or_default()
}

/// The state the rule `rule_id` keeps for `refund`.
async fn rule_state(app: &App, rule_id: &str) -> Option<RuleState> {
    app.store()
        .rule_state(&tenant(), rule_id, "refund")
        .await
        .unwrap()
}

/// Asserts that `change` cleared the state the rule `rule_id` kept for `refund`.
async fn assert_no_rule_state(app: &App, rule_id: &str, change: &str) {
    assert_eq!(
        rule_state(app, rule_id).await,
        None,
        "{change} keeps the rule state"
    );
}

async fn adjustments(app: &App) -> Vec<pb::Adjustment> {
    app.adjustments(
        &tenant(),
        &ListFilter {
            scenario_id: "refund".into(),
            start: 0,
            end: i64::MAX,
            cursor: (i64::MAX, String::new()),
            limit: 100,
        },
    )
    .await
    .unwrap()
}

/// An hour ago, so every time of a test is in the past of the listing's default range.
fn start() -> i64 {
    now_micros() - 3_600 * SECOND
}

async fn an_adjustment_that_would_invalidate_the_scenario_is_blocked(
    db: impl Future<Output = (Db, Keep)>,
) {
    let (app, _keep) = app(db).await;
    rule(&app, pb::ThresholdField::MinIntentConfidence, -0.15).await;
    rule_on(
        &app,
        pb::AdjustmentSignal::ContainmentRate,
        pb::ThresholdField::MinIntentConfidence,
        -0.15,
    )
    .await;
    let t0 = start();
    // 0.6 -> 0.45: still above the clarify band (0.4).
    observe(&app, 0.5, t0).await;
    let s = refund(&app).await;
    assert_eq!(s.version, 2, "{:?}", adjustments(&app).await);
    let first = thresholds(&s).min_intent_confidence.unwrap();
    assert!((first - 0.45).abs() < 1e-9, "{first}");
    // The second rule's step, 0.45 -> 0.3, is inside the guardrails (0.3..=0.9) but below
    // clarify_confidence: refused.
    observe_signal(
        &app,
        pb::AdjustmentSignal::ContainmentRate,
        0.5,
        t0 + SECOND,
    )
    .await;
    let s = refund(&app).await;
    assert_eq!(s.version, 2, "the invalid step was applied: {s:?}");
    assert_eq!(thresholds(&s).min_intent_confidence, Some(first));
    let listed = adjustments(&app).await;
    assert_eq!(
        listed[0].status,
        pb::AdjustmentStatus::BlockedByGuardrail as i32,
        "{listed:?}"
    );
    assert_eq!(listed[0].to_version, 0);
    assert!(
        listed[0].explanation.contains("clarify_confidence"),
        "{}",
        listed[0].explanation
    );
    // The scenario still decides its own turns.
    let decision = app
        .decide(
            &tenant(),
            &pb::DecisionContext {
                scenario_id: "refund".into(),
                intent: "refund_request".into(),
                intent_confidence: 0.99,
                within_business_hours: Some(true),
                queue_eta_seconds: Some(10),
                ..pb::DecisionContext::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(decision.scenario_id, "refund");
}

async fn a_revert_leaves_later_changes_alone(db: impl Future<Output = (Db, Keep)>) {
    let (app, _keep) = app(db).await;
    let raise = rule(&app, pb::ThresholdField::MaxBotTurns, 5.0).await;
    let t0 = start();

    // A person edits the scenario during an episode: the rule's state goes, and recovery
    // does not put back the value from before the episode.
    observe(&app, 0.5, t0).await;
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(25));
    let mut edited = refund(&app).await;
    edited.thresholds.as_mut().unwrap().max_bot_turns = Some(30);
    app.upsert(&tenant(), edited, 0, &person(), false)
        .await
        .unwrap();
    assert_no_rule_state(&app, &raise.id, "a manual upsert").await;
    observe(&app, 0.9, t0 + 10 * SECOND).await;
    observe(&app, 0.9, t0 + 80 * SECOND).await;
    let s = refund(&app).await;
    assert_eq!(thresholds(&s).max_bot_turns, Some(30), "{s:?}");

    // A rollback and an import clear the states too.
    observe(&app, 0.5, t0 + 200 * SECOND).await;
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(35));
    app.rollback(&tenant(), "refund", 1, &person())
        .await
        .unwrap();
    assert_no_rule_state(&app, &raise.id, "a rollback").await;
    observe(&app, 0.5, t0 + 300 * SECOND).await;
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(25));
    app.import(&tenant(), document(22), &person(), false)
        .await
        .unwrap();
    assert_no_rule_state(&app, &raise.id, "an import").await;

    // Another rule moves the same field after this one: this one's revert leaves it alone.
    observe(&app, 0.5, t0 + 400 * SECOND).await;
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(27));
    second_rule_moves_max_bot_turns(&app, t0 + 401 * SECOND).await;
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(25));
    observe(&app, 0.9, t0 + 410 * SECOND).await;
    observe(&app, 0.9, t0 + 480 * SECOND).await;
    let s = refund(&app).await;
    assert_eq!(thresholds(&s).max_bot_turns, Some(25), "{s:?}");
    let state = rule_state(&app, &raise.id).await.unwrap();
    assert!(!state.firing && state.baseline.is_none(), "{state:?}");
}

async fn a_revert_blocked_by_a_pin_happens_after_unpinning(db: impl Future<Output = (Db, Keep)>) {
    let (app, _keep) = app(db).await;
    rule(&app, pb::ThresholdField::MaxBotTurns, 5.0).await;
    let t0 = start();
    observe(&app, 0.5, t0).await;
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(25));
    app.set_pin(&tenant(), "refund", true, &person())
        .await
        .unwrap();
    observe(&app, 0.9, t0 + 10 * SECOND).await;
    observe(&app, 0.9, t0 + 80 * SECOND).await;
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(25));
    assert_eq!(
        adjustments(&app).await[0].status,
        pb::AdjustmentStatus::BlockedByPin as i32
    );
    app.set_pin(&tenant(), "refund", false, &person())
        .await
        .unwrap();
    observe(&app, 0.9, t0 + 90 * SECOND).await;
    let s = refund(&app).await;
    assert_eq!(
        thresholds(&s).max_bot_turns,
        Some(20),
        "the revert was lost: {s:?}"
    );
    assert_eq!(
        adjustments(&app).await[0].status,
        pb::AdjustmentStatus::Reverted as i32
    );
}

async fn adjustments_of_one_batch_page_without_gaps(db: impl Future<Output = (Db, Keep)>) {
    let (app, _keep) = app(db).await;
    // Three rules fire on one observation: three adjustments of one commit.
    rule(&app, pb::ThresholdField::MaxBotTurns, 5.0).await;
    rule(&app, pb::ThresholdField::MaxFallbacks, 1.0).await;
    rule(&app, pb::ThresholdField::SentimentWindowTurns, 1.0).await;
    observe(&app, 0.5, start()).await;
    assert_eq!(adjustments(&app).await.len(), 3);
    // Page one by one with the cursor ListAdjustments puts in its page token.
    let mut seen = Vec::new();
    let mut cursor = (i64::MAX, String::new());
    loop {
        let page = app
            .adjustments(
                &tenant(),
                &ListFilter {
                    scenario_id: String::new(),
                    start: 0,
                    end: now_micros() + 1,
                    cursor: cursor.clone(),
                    limit: 1,
                },
            )
            .await
            .unwrap();
        let Some(last) = page.last() else {
            break;
        };
        cursor = (
            last.created_at.as_ref().map_or(0, timestamp_micros),
            last.id.clone(),
        );
        seen.push(last.id.clone());
    }
    assert_eq!(seen.len(), 3, "paging skipped adjustments: {seen:?}");
}

async fn a_resolved_alert_reverts_its_rule(db: impl Future<Output = (Db, Keep)>) {
    let (app, _keep) = app(db).await;
    // An hour's window: a reading-based recovery could not revert within this test.
    let step = pb::adjustment_rule::Effect::Step(pb::ThresholdStep {
        field: pb::ThresholdField::MaxBotTurns as i32,
        delta: 5.0,
    });
    let raise = app
        .upsert_rule(
            &tenant(),
            live_rule_below_0_7("refund", pb::AdjustmentSignal::BotCsat, 3_600, step),
        )
        .await
        .unwrap();
    let t0 = start();
    let max_bot_turns = |s: pb::Scenario| thresholds(&s).max_bot_turns;

    // The alert is raised, then resolved: the rule reverts at once.
    observe(&app, 0.5, t0).await;
    assert_eq!(max_bot_turns(refund(&app).await), Some(25));
    resolve(&app, 0.9, t0 + 60 * SECOND).await;
    let s = refund(&app).await;
    assert_eq!(max_bot_turns(s.clone()), Some(20), "not reverted: {s:?}");
    assert_eq!(s.version, 3);
    let latest = adjustments(&app).await.remove(0);
    assert_eq!(latest.status, pb::AdjustmentStatus::Reverted as i32);
    assert!(
        latest.explanation.starts_with("alert resolved"),
        "{}",
        latest.explanation
    );
    assert_eq!(latest.metrics.get("ADJUSTMENT_SIGNAL_BOT_CSAT"), Some(&0.9));

    // A resolution without a measurement (NaN) reverts too, and is not stored as a reading.
    observe(&app, 0.5, t0 + 120 * SECOND).await;
    assert_eq!(max_bot_turns(refund(&app).await), Some(25));
    resolve(&app, f64::NAN, t0 + 180 * SECOND).await;
    assert_eq!(max_bot_turns(refund(&app).await), Some(20));
    let latest = adjustments(&app).await.remove(0);
    assert_eq!(latest.status, pb::AdjustmentStatus::Reverted as i32);
    assert!(!latest.metrics.contains_key("ADJUSTMENT_SIGNAL_BOT_CSAT"));
    let stored = app
        .store()
        .aggregate(
            &tenant(),
            "refund",
            pb::AdjustmentSignal::BotCsat as i32,
            t0,
        )
        .await
        .unwrap();
    assert_eq!(stored.samples, 3, "{stored:?}");

    // A resolution at a value that still breaches the rule's threshold (a stricter alert
    // cleared) keeps the change; one at a value past the threshold reverts it, even inside the
    // hysteresis band (0.7..0.77), which readings would need to leave.
    observe(&app, 0.5, t0 + 240 * SECOND).await;
    resolve(&app, 0.65, t0 + 300 * SECOND).await;
    assert_eq!(max_bot_turns(refund(&app).await), Some(25));
    assert!(rule_state(&app, &raise.id).await.unwrap().firing);
    resolve(&app, 0.75, t0 + 360 * SECOND).await;
    assert_eq!(max_bot_turns(refund(&app).await), Some(20));

    // A resolution when the rule is not in effect changes nothing.
    let (version, listed) = (refund(&app).await.version, adjustments(&app).await.len());
    resolve(&app, 0.9, t0 + 420 * SECOND).await;
    assert_eq!(refund(&app).await.version, version);
    assert_eq!(adjustments(&app).await.len(), listed);
}

async fn a_persisting_breach_applies_once_per_episode(db: impl Future<Output = (Db, Keep)>) {
    let (app, _keep) = app(db).await;
    // Two rules on the queue ETA (above 300 s over a minute, no cooldown): one raises
    // max_bot_turns by 5, the other asks for the strategy the scenario already has.
    let on_queue_eta = |effect| pb::AdjustmentRule {
        comparison: pb::Comparison::Above as i32,
        threshold: 300.0,
        ..live_rule_below_0_7("refund", pb::AdjustmentSignal::QueueEta, 60, effect)
    };
    for effect in [
        pb::adjustment_rule::Effect::Step(pb::ThresholdStep {
            field: pb::ThresholdField::MaxBotTurns as i32,
            delta: 5.0,
        }),
        pb::adjustment_rule::Effect::SetStrategy(pb::Strategy::BotFirst as i32),
    ] {
        app.upsert_rule(&tenant(), on_queue_eta(effect))
            .await
            .unwrap();
    }
    let t0 = start();
    let events = outbox_events(&app).await;

    // Eight reports five seconds apart, all above the trigger: one adjustment, one version,
    // one PolicyUpdated. The strategy rule changes nothing and records nothing.
    for i in 0..8 {
        observe_signal(
            &app,
            pb::AdjustmentSignal::QueueEta,
            600.0,
            t0 + i * 5 * SECOND,
        )
        .await;
    }
    let s = refund(&app).await;
    assert_eq!(thresholds(&s).max_bot_turns, Some(25), "{s:?}");
    assert_eq!(s.version, 2, "{:?}", adjustments(&app).await);
    let listed = adjustments(&app).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].status, pb::AdjustmentStatus::Applied as i32);
    assert_eq!(versions(&app).await.len(), 2);
    assert_eq!(outbox_events(&app).await - events, 1);

    // Leaving the condition (a full window below the band) reverts; entering it again applies
    // once more.
    observe_signal(
        &app,
        pb::AdjustmentSignal::QueueEta,
        100.0,
        t0 + 100 * SECOND,
    )
    .await;
    observe_signal(
        &app,
        pb::AdjustmentSignal::QueueEta,
        100.0,
        t0 + 160 * SECOND,
    )
    .await;
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(20));
    for i in 0..4 {
        let at = t0 + 200 * SECOND + i * 5 * SECOND;
        observe_signal(&app, pb::AdjustmentSignal::QueueEta, 900.0, at).await;
    }
    let s = refund(&app).await;
    assert_eq!(thresholds(&s).max_bot_turns, Some(25), "{s:?}");
    assert_eq!(s.version, 4);
    assert_eq!(adjustments(&app).await.len(), 3);
    assert_eq!(outbox_events(&app).await - events, 3);
}

async fn old_adjustments_are_pruned_and_running_episodes_still_revert(
    db: impl Future<Output = (Db, Keep)>,
) {
    let (app, _keep) = app(db).await;
    rule(&app, pb::ThresholdField::MaxBotTurns, 5.0).await;
    let recent_rule = rule_on(
        &app,
        pb::AdjustmentSignal::ContainmentRate,
        pb::ThresholdField::MaxFallbacks,
        1.0,
    )
    .await;
    let now = now_micros();
    // An episode that started 200 days ago and still runs, and a recent one.
    observe(&app, 0.5, now - 200 * DAY).await;
    observe_signal(&app, pb::AdjustmentSignal::ContainmentRate, 0.5, now - DAY).await;
    assert_eq!(adjustments(&app).await.len(), 2);

    // The default retention, 180 days.
    let keep = i64::try_from(tandem_policy::ADJUSTMENT_RETENTION.as_micros()).unwrap();
    let deleted = app.store().prune_adjustments(now - keep).await.unwrap();
    assert_eq!(deleted, 1);
    let listed = adjustments(&app).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].rule_id, recent_rule.id);
    // Pruning again deletes nothing (every replica prunes).
    assert_eq!(app.store().prune_adjustments(now - keep).await.unwrap(), 0);

    // The episode whose record went still reverts: its rule state holds what it needs.
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(25));
    resolve(&app, 0.9, now).await;
    let s = refund(&app).await;
    assert_eq!(thresholds(&s).max_bot_turns, Some(20), "{s:?}");
    assert_eq!(thresholds(&s).max_fallbacks, Some(3));
}

/// A live rule on the queue ETA of `refund` (above 300 s over a minute, one sample, no cooldown)
/// raising `max_bot_turns` by 5 and reverting on recovery, whose episode ends after
/// `silence_seconds` without a report (0: never).
async fn queue_rule(app: &App, silence_seconds: i64) -> pb::AdjustmentRule {
    let step = pb::adjustment_rule::Effect::Step(pb::ThresholdStep {
        field: pb::ThresholdField::MaxBotTurns as i32,
        delta: 5.0,
    });
    app.upsert_rule(
        &tenant(),
        pb::AdjustmentRule {
            comparison: pb::Comparison::Above as i32,
            threshold: 300.0,
            silence_timeout: (silence_seconds > 0).then_some(prost_types::Duration {
                seconds: silence_seconds,
                nanos: 0,
            }),
            ..live_rule_below_0_7("refund", pb::AdjustmentSignal::QueueEta, 60, step)
        },
    )
    .await
    .unwrap()
}

/// Routing reports a queue ETA of `eta` seconds for `refund` at `at` (µs).
async fn queue_eta(app: &App, eta: f64, at: i64) {
    observe_signal(app, pb::AdjustmentSignal::QueueEta, eta, at).await;
}

/// Reports above the trigger at `t0`, `t0 + 5 s` and `t0 + 10 s`: the queue rule fires once
/// (`max_bot_turns` 20 -> 25) and the last report is at `t0 + 10 s`.
async fn fire_queue_rule(app: &App, t0: i64) {
    for i in 0..3 {
        queue_eta(app, 600.0, t0 + i * 5 * SECOND).await;
    }
    assert_eq!(thresholds(&refund(app).await).max_bot_turns, Some(25));
}

async fn sweep(app: &App, now: i64) -> usize {
    app.sweep_silent_at(now).await.unwrap()
}

async fn a_silent_signal_reverts_its_rule_after_the_timeout_once(
    db: impl Future<Output = (Db, Keep)>,
) {
    let (app, _keep) = app(db).await;
    let rule = queue_rule(&app, 600).await;
    let t0 = start();
    fire_queue_rule(&app, t0).await;
    let last = t0 + 10 * SECOND;
    assert_eq!(refund(&app).await.version, 2);
    let events = outbox_events(&app).await;

    // Not yet silent for ten minutes: nothing changes.
    assert_eq!(sweep(&app, last + 599 * SECOND).await, 0);
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(25));
    assert!(rule_state(&app, &rule.id).await.unwrap().firing);

    // Silent for ten minutes: two replicas sweep at once, the value is reverted once, as a new
    // version with its event.
    let other = App::new(
        app.store().clone(),
        OutboxWaker::default(),
        AppOptions::default(),
        None,
    );
    let now = last + 600 * SECOND;
    let (a, b) = tokio::join!(app.sweep_silent_at(now), other.sweep_silent_at(now));
    assert_eq!(a.unwrap() + b.unwrap(), 1);
    let s = refund(&app).await;
    assert_eq!(
        thresholds(&s).max_bot_turns,
        Some(20),
        "not reverted: {s:?}"
    );
    assert_eq!(s.version, 3);
    assert_eq!(outbox_events(&app).await - events, 1);
    let version = versions(&app).await.remove(0);
    assert_eq!(version.cause, pb::ChangeCause::Adjustment as i32);
    assert_eq!(version.rule_id, rule.id);
    assert_eq!(version.actor, "system");
    let listed = adjustments(&app).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0].status, pb::AdjustmentStatus::Reverted as i32);
    assert_eq!((listed[0].from_version, listed[0].to_version), (2, 3));
    assert!(
        listed[0].explanation.starts_with("signal silent for 600s"),
        "{}",
        listed[0].explanation
    );
    assert_eq!(listed[0].metrics.get("silent_seconds"), Some(&600.0));
    let state = rule_state(&app, &rule.id).await.unwrap();
    assert!(!state.firing && state.baseline.is_none(), "{state:?}");

    // Sweeping again changes nothing.
    assert_eq!(sweep(&app, now + 3_600 * SECOND).await, 0);
    assert_eq!(refund(&app).await.version, 3);
    assert_eq!(adjustments(&app).await.len(), 2);

    // The next breach starts a new episode, and a report during it postpones the timeout.
    let t1 = now + 60 * SECOND;
    queue_eta(&app, 600.0, t1).await;
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(25));
    queue_eta(&app, 650.0, t1 + 300 * SECOND).await;
    assert_eq!(sweep(&app, t1 + 700 * SECOND).await, 0);
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(25));
    assert_eq!(sweep(&app, t1 + 900 * SECOND).await, 1);
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(20));
}

async fn a_rule_without_a_silence_timeout_keeps_its_change(db: impl Future<Output = (Db, Keep)>) {
    let (app, _keep) = app(db).await;
    let rule = queue_rule(&app, 0).await;
    let t0 = start();
    fire_queue_rule(&app, t0).await;
    let events = outbox_events(&app).await;
    assert_eq!(sweep(&app, t0 + 7 * DAY).await, 0);
    let s = refund(&app).await;
    assert_eq!(thresholds(&s).max_bot_turns, Some(25), "{s:?}");
    assert_eq!(s.version, 2);
    assert_eq!(outbox_events(&app).await, events);
    assert_eq!(adjustments(&app).await.len(), 1);
    assert!(rule_state(&app, &rule.id).await.unwrap().firing);
}

async fn a_silent_revert_blocked_by_a_pin_happens_after_unpinning(
    db: impl Future<Output = (Db, Keep)>,
) {
    let (app, _keep) = app(db).await;
    let rule = queue_rule(&app, 600).await;
    let t0 = start();
    fire_queue_rule(&app, t0).await;
    app.set_pin(&tenant(), "refund", true, &person())
        .await
        .unwrap();
    let version = refund(&app).await.version;

    // The revert is due but blocked: recorded once, the episode kept.
    let due = t0 + 10 * SECOND + 600 * SECOND;
    assert_eq!(sweep(&app, due).await, 1);
    let s = refund(&app).await;
    assert_eq!(thresholds(&s).max_bot_turns, Some(25), "{s:?}");
    assert_eq!(s.version, version);
    let listed = adjustments(&app).await;
    assert_eq!(listed[0].status, pb::AdjustmentStatus::BlockedByPin as i32);
    assert!(
        listed[0].explanation.starts_with("signal silent"),
        "{}",
        listed[0].explanation
    );
    let state = rule_state(&app, &rule.id).await.unwrap();
    assert!(
        state.firing && state.silence_blocked_at.is_some(),
        "{state:?}"
    );
    // Later sweeps retry without recording the block again.
    assert_eq!(sweep(&app, due + 60 * SECOND).await, 0);
    assert_eq!(sweep(&app, due + 120 * SECOND).await, 0);
    assert_eq!(adjustments(&app).await.len(), 2);
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(25));

    // Unpinned, the next sweep reverts.
    app.set_pin(&tenant(), "refund", false, &person())
        .await
        .unwrap();
    assert_eq!(sweep(&app, due + 180 * SECOND).await, 1);
    let s = refund(&app).await;
    assert_eq!(
        thresholds(&s).max_bot_turns,
        Some(20),
        "the revert was lost: {s:?}"
    );
    assert_eq!(s.version, version + 2);
    assert_eq!(
        adjustments(&app).await[0].status,
        pb::AdjustmentStatus::Reverted as i32
    );
    let state = rule_state(&app, &rule.id).await.unwrap();
    assert!(
        !state.firing && state.silence_blocked_at.is_none(),
        "{state:?}"
    );
}

async fn a_silent_revert_leaves_later_changes_alone(db: impl Future<Output = (Db, Keep)>) {
    let (app, _keep) = app(db).await;
    let rule = queue_rule(&app, 600).await;
    let t0 = start();

    // A person edits the scenario during the episode: the silence does not put back the value
    // from before the episode.
    fire_queue_rule(&app, t0).await;
    let mut edited = refund(&app).await;
    edited.thresholds.as_mut().unwrap().max_bot_turns = Some(30);
    app.upsert(&tenant(), edited, 0, &person(), false)
        .await
        .unwrap();
    let version = refund(&app).await.version;
    let listed = adjustments(&app).await.len();
    assert_eq!(sweep(&app, t0 + DAY).await, 0);
    let s = refund(&app).await;
    assert_eq!(thresholds(&s).max_bot_turns, Some(30), "{s:?}");
    assert_eq!(s.version, version);
    assert_eq!(adjustments(&app).await.len(), listed);

    // Another rule moves the same field after this one: the episode ends, the value stays.
    let t1 = t0 + 2 * DAY;
    fire_queue_rule_from(&app, t1, 35).await;
    second_rule_moves_max_bot_turns(&app, t1 + 20 * SECOND).await;
    assert_eq!(thresholds(&refund(&app).await).max_bot_turns, Some(33));
    let version = refund(&app).await.version;
    let listed = adjustments(&app).await.len();
    assert_eq!(sweep(&app, t1 + DAY).await, 0);
    let s = refund(&app).await;
    assert_eq!(thresholds(&s).max_bot_turns, Some(33), "{s:?}");
    assert_eq!(s.version, version);
    assert_eq!(adjustments(&app).await.len(), listed);
    let state = rule_state(&app, &rule.id).await.unwrap();
    assert!(!state.firing && state.baseline.is_none(), "{state:?}");
}

/// [`fire_queue_rule`] from a `max_bot_turns` of `expected - 5`.
async fn fire_queue_rule_from(app: &App, t0: i64, expected: i32) {
    for i in 0..3 {
        queue_eta(app, 600.0, t0 + i * 5 * SECOND).await;
    }
    assert_eq!(thresholds(&refund(app).await).max_bot_turns, Some(expected));
}

async fn a_silent_revert_in_shadow_mode_is_only_recorded(db: impl Future<Output = (Db, Keep)>) {
    let (app, _keep) = app(db).await;
    let rule = queue_rule(&app, 600).await;
    let t0 = start();
    fire_queue_rule(&app, t0).await;
    // The rule is put in shadow mode during its episode.
    app.upsert_rule(
        &tenant(),
        pb::AdjustmentRule {
            mode: pb::Mode::Shadow as i32,
            ..rule.clone()
        },
    )
    .await
    .unwrap();
    let events = outbox_events(&app).await;
    assert_eq!(sweep(&app, t0 + 3_600 * SECOND).await, 1);
    let s = refund(&app).await;
    assert_eq!(thresholds(&s).max_bot_turns, Some(25), "{s:?}");
    assert_eq!(s.version, 2);
    assert_eq!(outbox_events(&app).await, events);
    let latest = adjustments(&app).await.remove(0);
    assert_eq!(latest.status, pb::AdjustmentStatus::Shadow as i32);
    assert_eq!((latest.old_value, latest.new_value), (25.0, 20.0));
    assert!(!rule_state(&app, &rule.id).await.unwrap().firing);
}

async fn silence_timeouts_out_of_range_are_refused(db: impl Future<Output = (Db, Keep)>) {
    let (app, _keep) = app(db).await;
    let with = |window: i64, silence: Option<(i64, i32)>| {
        let step = pb::adjustment_rule::Effect::Step(pb::ThresholdStep {
            field: pb::ThresholdField::MaxBotTurns as i32,
            delta: 5.0,
        });
        pb::AdjustmentRule {
            silence_timeout: silence
                .map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
            ..live_rule_below_0_7("refund", pb::AdjustmentSignal::QueueEta, window, step)
        }
    };
    for (window, silence) in [
        (60, Some((59, 0))),
        (60, Some((7 * 86_400, 1_000))),
        (60, Some((30 * 86_400, 0))),
        (60, Some((-600, 0))),
        (3_600, Some((1_800, 0))),
    ] {
        let err = app
            .upsert_rule(&tenant(), with(window, silence))
            .await
            .unwrap_err();
        let tandem_policy::app::PolicyError::Invalid(problems) = &err else {
            panic!("{silence:?}: {err:?}")
        };
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["rule.silence_timeout"], "{window} {silence:?}");
    }
    for (window, silence) in [
        (60, None),
        (60, Some((0, 0))),
        (60, Some((60, 0))),
        (3_600, Some((3_600, 0))),
        (60, Some((7 * 86_400, 0))),
    ] {
        let stored = app
            .upsert_rule(&tenant(), with(window, silence))
            .await
            .unwrap();
        assert_eq!(
            stored.silence_timeout,
            silence.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
            "{window} {silence:?}"
        );
    }
}
