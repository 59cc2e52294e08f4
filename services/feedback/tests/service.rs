//! The feedback service as clients see it, on both paths it runs on: production (PostgreSQL and
//! NATS JetStream from the testkit) and standalone (SQLite and the in-process bus). Events are
//! published on the bus as dialog and routing would; calls go through gRPC with real tokens.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tandem_feedback::{Feedback, Settings};
use tandem_platform::auth::{Role, TokenIssuer};
use tandem_platform::bus::memory::MemoryBus;
use tandem_platform::bus::{Bus, ConsumerSpec, RawEvent};
use tandem_platform::config::{
    AuthConfig, BusConfig, BusKind, DatabaseConfig, Secret, ServiceConfig,
};
use tandem_platform::grpc::GrpcServer;
use tandem_platform::runtime::{Service as _, StartContext, prepare};
use tandem_proto::events::FEEDBACK;
use tandem_proto::pb::common::v1 as wire;
use tandem_proto::pb::feedback::v1 as pb;
use tandem_proto::pb::feedback::v1::feedback_service_client::FeedbackServiceClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tonic::{Code, Request};

mod common;

use common::{T0, conversation_of, life_events, tenant};

const SECRET: &str = "feedback-service-test-secret-32-bytes!";
const S: i64 = 1_000_000;

/// A running service with what the test needs to talk to it.
struct Running {
    channel: Channel,
    bus: Bus,
    bus_config: BusConfig,
    shutdown: CancellationToken,
    _keep: Option<tempfile::TempDir>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn run(
    mut cfg: ServiceConfig<Settings>,
    memory: Option<MemoryBus>,
) -> (Channel, Bus, CancellationToken) {
    cfg.auth = AuthConfig {
        allow_hs256: true,
        hs256_secret: Secret::new(SECRET),
        ..AuthConfig::default()
    };
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (db, bus, outbox) = prepare::<Feedback>(&cfg, memory.as_ref(), &tracker, &shutdown)
        .await
        .unwrap();
    let auth =
        std::sync::Arc::new(tandem_platform::auth::Authenticator::from_config(&cfg.auth).unwrap());
    let mut server = GrpcServer::new(&cfg.grpc);
    Feedback::start(
        StartContext {
            db,
            bus: bus.clone(),
            bus_config: cfg.bus.clone(),
            grpc_config: cfg.grpc.clone(),
            auth,
            outbox,
            server: &mut server,
            tracker: &tracker,
            shutdown: shutdown.clone(),
        },
        &cfg.service,
    )
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, shutdown.clone()));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, bus, shutdown)
}

fn settings() -> Settings {
    Settings {
        alert_interval: Duration::from_millis(1000),
        alert_cooldown: Duration::from_secs(3600),
        consumer_lanes: 4,
        consumer_batch: 64,
        submit_batch: 64,
        submit_linger: Duration::from_millis(1),
        submit_writers: 2,
    }
}

async fn production() -> Running {
    let nats = tandem_testkit::shared_nats().await;
    let pg = tandem_testkit::shared_postgres().await;
    let bus_config = BusConfig {
        kind: BusKind::Nats,
        nats_url: nats.url(),
        ack_wait: Duration::from_secs(5),
        ..BusConfig::default()
    };
    let cfg = ServiceConfig {
        database: DatabaseConfig {
            url: Secret::new(pg.fresh_database().await.unwrap()),
            schema: "feedback".into(),
            ..DatabaseConfig::default()
        },
        bus: bus_config.clone(),
        service: settings(),
        ..ServiceConfig::default()
    };
    let (channel, bus, shutdown) = run(cfg, None).await;
    Running {
        channel,
        bus,
        bus_config,
        shutdown,
        _keep: None,
    }
}

async fn standalone() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let bus_config = BusConfig {
        kind: BusKind::Memory,
        ack_wait: Duration::from_secs(5),
        ..BusConfig::default()
    };
    let cfg = ServiceConfig {
        database: DatabaseConfig {
            url: Secret::new(format!(
                "sqlite://{}",
                dir.path().join("feedback.db").display()
            )),
            ..DatabaseConfig::default()
        },
        bus: bus_config.clone(),
        service: settings(),
        ..ServiceConfig::default()
    };
    let memory = MemoryBus::new();
    let (channel, bus, shutdown) = run(cfg, Some(memory)).await;
    Running {
        channel,
        bus,
        bus_config,
        shutdown,
        _keep: Some(dir),
    }
}

fn token(roles: &[Role], subject: &str) -> String {
    let cfg = AuthConfig {
        allow_hs256: true,
        hs256_secret: Secret::new(SECRET),
        ..AuthConfig::default()
    };
    TokenIssuer::from_config(&cfg)
        .unwrap()
        .issue(&tenant(), subject, roles, Duration::from_secs(600))
        .unwrap()
}

fn call<T>(message: T, roles: &[Role]) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token(roles, "lead-1"))
            .parse()
            .unwrap(),
    );
    request
}

fn ts(at: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.div_euclid(S),
        nanos: 0,
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn csat(
    client_id: &str,
    conversation: &str,
    score: i32,
    subject: i32,
) -> pb::SubmitFeedbackRequest {
    pb::SubmitFeedbackRequest {
        feedback: Some(pb::Feedback {
            client_feedback_id: client_id.into(),
            conversation_id: conversation.into(),
            channel: 8,
            subject,
            score: Some(pb::feedback::Score::Csat(score)),
            comment: "the refund takes too long".into(),
            ..Default::default()
        }),
    }
}

async fn metrics(
    client: &mut FeedbackServiceClient<Channel>,
    metrics: Vec<i32>,
    group_by: Vec<i32>,
    (start, end): (i64, i64),
) -> Vec<pb::MetricSeries> {
    client
        .get_metrics(call(
            pb::GetMetricsRequest {
                metrics,
                range: Some(wire::TimeRange {
                    start: Some(ts(start)),
                    end: Some(ts(end)),
                }),
                group_by,
                granularity: 3,
                ..Default::default()
            },
            &[Role::Supervisor],
        ))
        .await
        .unwrap()
        .into_inner()
        .series
}

/// The last day and the next hour.
fn recent() -> (i64, i64) {
    (now() - 86_400 * S, now() + 3_600 * S)
}

/// The days of the replayed conversations.
fn replayed() -> (i64, i64) {
    (T0 - 86_400 * S, T0 + 30 * 86_400 * S)
}

/// Polls until `check` holds, for at most 20 seconds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------

async fn bad_requests_are_refused_with_every_field_named(running: Running) {
    let mut client = FeedbackServiceClient::new(running.channel.clone());
    let bad = pb::SubmitFeedbackRequest {
        feedback: Some(pb::Feedback {
            channel: 42,
            score: Some(pb::feedback::Score::Csat(9)),
            ..Default::default()
        }),
    };
    let status = client
        .submit_feedback(call(bad, &[Role::Channel]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    for field in [
        "feedback.client_feedback_id",
        "feedback.channel",
        "feedback.csat",
    ] {
        assert!(status.message().contains(field), "{}", status.message());
    }
    let absurd = pb::GetMetricsRequest {
        metrics: vec![1],
        range: Some(wire::TimeRange {
            start: Some(ts(now())),
            end: Some(ts(now() - 3_600 * S)),
        }),
        ..Default::default()
    };
    let status = client
        .get_metrics(call(absurd, &[Role::Supervisor]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("range"), "{}", status.message());
    let forbidden = client
        .get_metrics(call(pb::GetMetricsRequest::default(), &[Role::Agent]))
        .await
        .unwrap_err();
    assert_eq!(forbidden.code(), Code::PermissionDenied);
    let anonymous = client
        .get_metrics(Request::new(pb::GetMetricsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let rule = pb::UpsertAlertRuleRequest {
        rule: Some(pb::AlertRule {
            name: "x".into(),
            kind: 1,
            metric: 10,
            condition: 2,
            threshold: 0.8,
            window: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            severity: 2,
            enabled: true,
            ..Default::default()
        }),
    };
    let status = client
        .upsert_alert_rule(call(rule, &[Role::Supervisor]))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "rules are for admins"
    );
}

async fn feedback_is_idempotent_and_waits_for_its_conversation(running: Running) {
    let mut client = FeedbackServiceClient::new(running.channel.clone());
    let conversation = conversation_of(0);
    let first = client
        .submit_feedback(call(csat("f-1", &conversation, 5, 1), &[Role::Channel]))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.duplicate);
    let stored = first.feedback.unwrap();
    assert!(
        stored.context.is_none(),
        "the conversation is not known yet"
    );
    let replay = client
        .submit_feedback(call(csat("f-1", &conversation, 5, 1), &[Role::Channel]))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.duplicate);
    assert_eq!(replay.feedback.unwrap().id, stored.id);
    let conflict = client
        .submit_feedback(call(csat("f-1", &conversation, 1, 1), &[Role::Channel]))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);

    running.bus.publish_batch(&life_events(1)).await.unwrap();
    eventually("the feedback to move to its scenario", || {
        let mut client = client.clone();
        async move {
            let series = metrics(&mut client, vec![10], vec![1], recent()).await;
            series.len() == 1 && series[0].group[0].value == "refund"
        }
    })
    .await;
    let again = client
        .submit_feedback(call(csat("f-1", &conversation, 5, 1), &[Role::Channel]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.feedback.unwrap().context.unwrap().scenario_id,
        "refund"
    );
}

async fn imports_report_bad_rows_and_keep_good_ones(running: Running) {
    let mut client = FeedbackServiceClient::new(running.channel.clone());
    let csv = "client_feedback_id,conversation_id,channel,subject,kind,score,comment,language,submitted_at\n\
               i-1,,survey,bot,csat,5,\"great, thanks\",en,2025-03-01T10:00:00Z\n\
               i-2,,survey,bot,csat,11,,en,\n\
               i-3,,phone,agent,nps,9,,,\n\
               i-4,,pigeon,agent,ces,3,,,\n\
               i-5,,,both,thumbs,down,\"slow, \"\"very\"\" slow\",,\n";
    let import = |dry_run: bool| pb::ImportFeedbackRequest {
        format: 1,
        content: csv.into(),
        default_channel: 8,
        dry_run,
    };
    let dry = client
        .import_feedback(call(import(true), &[Role::Admin]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((dry.imported, dry.failed), (3, 2));
    let first = client
        .import_feedback(call(import(false), &[Role::Admin]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.imported, first.duplicates, first.failed), (3, 0, 2));
    let rows: Vec<(i64, &str)> = first
        .errors
        .iter()
        .map(|e| (e.row_number, e.field.as_str()))
        .collect();
    assert_eq!(rows, [(2, "csat"), (4, "channel")]);
    assert_eq!(first.errors[0].external_id, "i-2");
    let again = client
        .import_feedback(call(import(false), &[Role::Admin]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.imported, again.duplicates, again.failed), (0, 3, 2));
    let nps = metrics(&mut client, vec![11], vec![], recent()).await;
    assert_eq!(nps[0].points[0].denominator, 1);
}

async fn events_become_metrics_and_problems(running: Running) {
    let mut client = FeedbackServiceClient::new(running.channel.clone());
    let events = life_events(12);
    for chunk in events.chunks(7).rev() {
        running.bus.publish_batch(chunk).await.unwrap();
    }
    // Conversations 0..12 without the test (7) and the proactive one (5): 10 eligible, of which
    // the even ones (0, 2, 4, 6, 8, 10) were handed off.
    eventually("every conversation to be counted", || {
        let mut client = client.clone();
        async move {
            let series = metrics(&mut client, vec![2], vec![], replayed()).await;
            series.first().is_some_and(|s| {
                let p = &s.points[0];
                (p.numerator, p.denominator) == (6, 10)
            })
        }
    })
    .await;
    eventually("every handoff to be completed", || {
        let mut client = client.clone();
        async move {
            let series = metrics(&mut client, vec![9], vec![], replayed()).await;
            series.first().is_some_and(|s| s.points[0].count == 6)
        }
    })
    .await;
    let series = metrics(
        &mut client,
        vec![1, 2, 3, 4, 5, 6, 9, 13],
        vec![],
        replayed(),
    )
    .await;
    let point = |metric: i32| {
        series
            .iter()
            .find(|s| s.metric == metric)
            .map(|s| s.points[0])
            .unwrap()
    };
    assert!(point(1).numerator + point(2).numerator <= point(1).denominator);
    assert_eq!(point(4).count, 6);
    let p50 = point(5).p50.unwrap();
    let accept = p50.seconds as f64 + f64::from(p50.nanos) / 1e9;
    assert!((5.0..=10.0).contains(&accept), "agent accept p50 {accept}");
    let reply = point(6);
    assert!(
        (reply.value - 15.0).abs() < 0.01,
        "first human reply {}",
        reply.value
    );
    assert!((point(9).value - 260.0).abs() < 0.01);
    assert_eq!(point(13).denominator, 6, "six suggestions shown");

    let problems = client
        .get_top_problems(call(
            pb::GetTopProblemsRequest {
                scenario_id: "refund".into(),
                range: Some(wire::TimeRange {
                    start: Some(ts(T0 - 86_400 * S)),
                    end: Some(ts(T0 + 5 * 86_400 * S)),
                }),
                ..Default::default()
            },
            &[Role::Supervisor],
        ))
        .await
        .unwrap()
        .into_inner();
    let top = &problems.clusters[0];
    assert_eq!(top.scenario_id, "refund");
    assert!(top.keywords.contains(&"refund".to_owned()), "{top:?}");
    assert!(top.count >= 3, "{top:?}");
    assert_eq!(top.intents, ["refund_status"]);
}

async fn a_degraded_scenario_raises_one_alert_on_the_bus(running: Running) {
    let mut client = FeedbackServiceClient::new(running.channel.clone());
    let spec =
        ConsumerSpec::new("alert-watch", &FEEDBACK, &running.bus_config).event::<pb::AlertRaised>();
    let mut watch = running.bus.consumer(&spec).await.unwrap();
    let rule = client
        .upsert_alert_rule(call(
            pb::UpsertAlertRuleRequest {
                rule: Some(pb::AlertRule {
                    name: "rebooking bot CSAT".into(),
                    kind: 1,
                    scenario_id: "rebooking".into(),
                    metric: 10,
                    condition: 2,
                    threshold: 0.8,
                    window: Some(prost_types::Duration {
                        seconds: 3600,
                        nanos: 0,
                    }),
                    min_samples: 3,
                    severity: 3,
                    enabled: true,
                    ..Default::default()
                }),
            },
            &[Role::Admin],
        ))
        .await
        .unwrap()
        .into_inner()
        .rule
        .unwrap();
    assert!(!rule.id.is_empty());
    // A rebooking conversation happening now, and three unhappy answers about the bot.
    let started = tandem_proto::pb::dialog::v1::ConversationStarted {
        conversation_id: "live-1".into(),
        scenario_id: "rebooking".into(),
        occurred_at: Some(ts(now())),
        ..Default::default()
    };
    running
        .bus
        .publish_batch(&[RawEvent::new(&tenant(), &started, Some("live-1".into()))])
        .await
        .unwrap();
    eventually("the conversation to be known", || {
        let mut client = client.clone();
        async move {
            let series = metrics(&mut client, vec![2], vec![1], recent()).await;
            series.iter().any(|s| s.group[0].value == "rebooking")
        }
    })
    .await;
    for (i, score) in [1, 2, 1].into_iter().enumerate() {
        client
            .submit_feedback(call(
                csat(&format!("live-{i}"), "live-1", score, 1),
                &[Role::Channel],
            ))
            .await
            .unwrap();
    }
    let delivery = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("an AlertRaised event")
        .unwrap();
    let raised = delivery.event.decode::<pb::AlertRaised>().unwrap().event;
    delivery.ack().await.unwrap();
    assert_eq!(raised.rule_id, rule.id);
    assert_eq!(raised.scenario_id, "rebooking");
    assert_eq!(raised.observed_value, 0.0);
    assert!(
        raised.explanation.contains("CSAT of scenario rebooking"),
        "{}",
        raised.explanation
    );
    // More evaluations of the same problem raise nothing more.
    assert!(
        tokio::time::timeout(Duration::from_secs(3), watch.next())
            .await
            .is_err(),
        "one problem, one alert"
    );
    let alerts = client
        .list_alerts(call(pb::ListAlertsRequest::default(), &[Role::Supervisor]))
        .await
        .unwrap()
        .into_inner()
        .alerts;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].status, 1);
    let acked = client
        .acknowledge_alert(call(
            pb::AcknowledgeAlertRequest {
                alert_id: alerts[0].id.clone(),
                comment: "on it".into(),
            },
            &[Role::Supervisor],
        ))
        .await
        .unwrap()
        .into_inner()
        .alert
        .unwrap();
    assert_eq!(
        (acked.status, acked.acknowledged_by.as_str()),
        (2, "lead-1")
    );
    let missing = client
        .acknowledge_alert(call(
            pb::AcknowledgeAlertRequest {
                alert_id: "nope".into(),
                comment: String::new(),
            },
            &[Role::Supervisor],
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let rules = client
        .list_alert_rules(call(
            pb::ListAlertRulesRequest::default(),
            &[Role::Supervisor],
        ))
        .await
        .unwrap()
        .into_inner()
        .rules;
    assert_eq!(rules.len(), 1);
}

macro_rules! service_tests {
    ($path:ident) => {
        mod $path {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bad_requests_are_refused_with_every_field_named() {
                super::bad_requests_are_refused_with_every_field_named(super::$path().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn feedback_is_idempotent_and_waits_for_its_conversation() {
                super::feedback_is_idempotent_and_waits_for_its_conversation(super::$path().await)
                    .await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn imports_report_bad_rows_and_keep_good_ones() {
                super::imports_report_bad_rows_and_keep_good_ones(super::$path().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn events_become_metrics_and_problems() {
                super::events_become_metrics_and_problems(super::$path().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_degraded_scenario_raises_one_alert_on_the_bus() {
                super::a_degraded_scenario_raises_one_alert_on_the_bus(super::$path().await).await;
            }
        }
    };
}

service_tests!(production);
service_tests!(standalone);
