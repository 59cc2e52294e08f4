//! Policy benchmarks, each printed beside a baseline measured in the same run:
//!
//! 1. `Decide` in-process: the tenant catalogue's full path (context validation, scenario
//!    resolution, the engine, the wire decision) against the bare engine function.
//! 2. `Decide` over gRPC on the running service (PostgreSQL + NATS from the testkit) against a
//!    bare unary call to the same server (the gRPC health check).
//! 3. From an analytics alert published on the bus to the `PolicyUpdated` event it causes,
//!    against the same bus's publish → consume of the alert itself.
//!
//! Run with `cargo bench -p tandem-policy --bench policy` (or `make bench`).

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::cast_precision_loss)]

use std::time::{Duration, Instant};

use tandem_platform::auth::{Role, TokenIssuer};
use tandem_platform::bus::{Bus, ConsumerSpec, RawEvent};
use tandem_platform::config::{
    AuthConfig, BusConfig, BusKind, DatabaseConfig, OutboxConfig, Secret, ServiceConfig,
};
use tandem_policy::Policy;
use tandem_policy_client::{Catalogue, context_from_wire};
use tandem_proto::events::{FEEDBACK, POLICY};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::feedback::v1::{AlertRaised, MetricName};
use tandem_proto::pb::policy::v1 as pb;
use tandem_proto::pb::policy::v1::policy_service_client::PolicyServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const SECRET: &str = "policy-bench-secret-policy-bench-secret";

fn percentiles(mut samples: Vec<Duration>) -> [Duration; 4] {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    [at(0.5), at(0.9), at(0.99), at(1.0)]
}

fn row(name: &str, p: [Duration; 4]) {
    println!(
        "  {name:<44} p50 {:>9.1?}  p90 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}",
        p[0], p[1], p[2], p[3]
    );
}

fn ratio(name: &str, ours: [Duration; 4], base: [Duration; 4]) {
    println!(
        "  {name:<44} p50 {:.2}x  p99 {:.2}x",
        ours[0].as_secs_f64() / base[0].as_secs_f64(),
        ours[2].as_secs_f64() / base[2].as_secs_f64()
    );
}

/// A deterministic stream of turn contexts over the catalogue's intents.
fn contexts(intents: &[String], n: usize) -> Vec<pb::DecisionContext> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 10_000) as f64 / 10_000.0
    };
    (0..n)
        .map(|i| pb::DecisionContext {
            intent: intents[i % intents.len()].clone(),
            intent_confidence: next(),
            sentiment: next() * 2.0 - 1.0,
            sentiment_drop: next() * 1.5,
            complexity: next(),
            fallbacks: (next() * 4.0) as i32,
            bot_turns: (next() * 30.0) as i32,
            queue_eta_seconds: Some((next() * 900.0) as i32),
            within_business_hours: Some(next() > 0.1),
            human_requested: next() > 0.95,
            ..pb::DecisionContext::default()
        })
        .collect()
}

fn example(name: &str) -> String {
    std::fs::read_to_string(
        tandem_testkit::workspace_root().join(format!("examples/policies/{name}.yaml")),
    )
    .unwrap()
}

fn in_process() {
    let scenarios = tandem_policy::document::parse(
        tandem_policy::document::Format::Yaml,
        &example("ecommerce"),
    )
    .unwrap();
    let intents: Vec<String> = scenarios.iter().flat_map(|s| s.intents.clone()).collect();
    let (cat, rejected) = Catalogue::build(scenarios);
    assert!(rejected.is_empty());
    let ctxs = contexts(&intents, 200_000);
    // Warm up.
    for c in ctxs.iter().take(10_000) {
        std::hint::black_box(cat.decide(c).unwrap());
    }
    let mut ours = Vec::with_capacity(ctxs.len());
    for c in &ctxs {
        let t = Instant::now();
        std::hint::black_box(cat.decide(c).unwrap());
        ours.push(t.elapsed());
    }
    let mut base = Vec::with_capacity(ctxs.len());
    for c in &ctxs {
        let entry = cat.resolve("", &c.intent).unwrap();
        let turn = context_from_wire(c).unwrap();
        let t = Instant::now();
        std::hint::black_box(tandem_policy_engine::decide(&entry.engine, &turn));
        base.push(t.elapsed());
    }
    let (ours, base) = (percentiles(ours), percentiles(base));
    println!(
        "Decide in-process, {} turns (goal: p99 <= 100 us)",
        ctxs.len()
    );
    row("baseline: engine::decide alone", base);
    row("Catalogue::decide (validate, resolve, wire)", ours);
    ratio("ratio", ours, base);
}

fn auth() -> AuthConfig {
    AuthConfig {
        hs256_secret: Secret::new(SECRET.to_owned()),
        allow_hs256: true,
        ..AuthConfig::default()
    }
}

async fn over_the_wire() {
    let pg = tandem_testkit::Postgres::start().await.unwrap();
    let nats = tandem_testkit::NatsServer::start().await.unwrap();
    let bus_config = BusConfig {
        kind: BusKind::Nats,
        nats_url: nats.url(),
        ..BusConfig::default()
    };
    let cfg = ServiceConfig {
        auth: auth(),
        database: DatabaseConfig {
            url: Secret::new(pg.fresh_database().await.unwrap()),
            schema: "policy".into(),
            ..DatabaseConfig::default()
        },
        bus: bus_config.clone(),
        outbox: OutboxConfig::default(),
        ..ServiceConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(tandem_platform::runtime::serve_with::<Policy>(
        cfg,
        None,
        listener,
        stop.clone(),
    ));
    let channel = loop {
        match tonic::transport::Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let token = TokenIssuer::from_config(&auth())
        .unwrap()
        .issue(
            &TenantId::new("bench").unwrap(),
            "bench",
            &[Role::Admin, Role::Service],
            Duration::from_secs(3_600),
        )
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut client =
        PolicyServiceClient::with_interceptor(channel.clone(), move |mut r: Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        });
    let mut health = HealthClient::new(channel);
    // Wait for the service, then load a catalogue.
    loop {
        let req = pb::ImportScenariosRequest {
            format: pb::ScenarioFormat::Yaml as i32,
            content: example("ecommerce"),
            validate_only: false,
            reason: "bench".into(),
        };
        if client.import_scenarios(req).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let scenarios = client
        .list_scenarios(pb::ListScenariosRequest::default())
        .await
        .unwrap()
        .into_inner()
        .scenarios;
    let intents: Vec<String> = scenarios.iter().flat_map(|s| s.intents.clone()).collect();
    let ctxs = contexts(&intents, 5_000);
    for c in ctxs.iter().take(500) {
        client
            .decide(pb::DecideRequest {
                context: Some(c.clone()),
            })
            .await
            .unwrap();
        health.check(HealthCheckRequest::default()).await.unwrap();
    }
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for c in &ctxs {
        let t = Instant::now();
        client
            .decide(pb::DecideRequest {
                context: Some(c.clone()),
            })
            .await
            .unwrap();
        ours.push(t.elapsed());
        let t = Instant::now();
        health.check(HealthCheckRequest::default()).await.unwrap();
        base.push(t.elapsed());
    }
    let (ours, base) = (percentiles(ours), percentiles(base));
    println!(
        "Decide over gRPC (loopback, sequential, {} calls; goal: p99 <= 1 ms)",
        ctxs.len()
    );
    row("baseline: health check on the same server", base);
    row("Decide (JWT verified, cached catalogue)", ours);
    ratio("ratio", ours, base);

    // Alert → PolicyUpdated. One scenario per trial, each fired once by a global rule.
    let bus = Bus::connect(&bus_config, None).await.unwrap();
    let rule = pb::AdjustmentRule {
        name: "bench".into(),
        signal: pb::AdjustmentSignal::BotCsat as i32,
        comparison: pb::Comparison::Below as i32,
        threshold: 0.7,
        window: Some(prost_types::Duration {
            seconds: 3_600,
            nanos: 0,
        }),
        min_samples: 1,
        effect: Some(pb::adjustment_rule::Effect::SetStrategy(
            pb::Strategy::AgentAssist as i32,
        )),
        enabled: true,
        mode: pb::Mode::Live as i32,
        ..pb::AdjustmentRule::default()
    };
    client
        .upsert_adjustment_rule(pb::UpsertAdjustmentRuleRequest { rule: Some(rule) })
        .await
        .unwrap();
    let trials = 40;
    let mut doc = String::from("scenarios:\n");
    for i in 0..trials {
        doc.push_str(&format!(
            "  - id: s{i}\n    intents: [i{i}]\n    tier: TIER_STANDARD\n    \
             strategy: STRATEGY_BOT_FIRST\n    guardrails:\n      allowed_strategies: \
             [STRATEGY_BOT_FIRST, STRATEGY_AGENT_ASSIST]\n"
        ));
    }
    client
        .import_scenarios(pb::ImportScenariosRequest {
            format: pb::ScenarioFormat::Yaml as i32,
            content: doc,
            validate_only: false,
            reason: "bench".into(),
        })
        .await
        .unwrap();
    let mut updates = bus
        .consumer(
            &ConsumerSpec::new("bench-updates", &POLICY, &bus_config).event::<pb::PolicyUpdated>(),
        )
        .await
        .unwrap();
    let mut alerts = bus
        .consumer(&ConsumerSpec::new("bench-alerts", &FEEDBACK, &bus_config).event::<AlertRaised>())
        .await
        .unwrap();
    // Skip the import's updates (and the earlier ones).
    let skip = scenarios.len() + trials;
    for _ in 0..skip {
        updates.next().await.unwrap().ack().await.unwrap();
    }
    let tenant = TenantId::new("bench").unwrap();
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for i in 0..trials {
        let event = RawEvent::new(
            &tenant,
            &AlertRaised {
                alert_id: format!("a{i}"),
                scenario_id: format!("s{i}"),
                metric: MetricName::Csat as i32,
                observed_value: 0.4,
                threshold: 0.7,
                ..AlertRaised::default()
            },
            Some(format!("s{i}")),
        );
        let t = Instant::now();
        bus.publish_batch(&[event]).await.unwrap();
        alerts.next().await.unwrap().ack().await.unwrap();
        base.push(t.elapsed());
        loop {
            let d = tokio::time::timeout(Duration::from_secs(5), updates.next())
                .await
                .expect("no PolicyUpdated within 5 s")
                .unwrap();
            let e = d.event.decode::<pb::PolicyUpdated>().unwrap().event;
            d.ack().await.unwrap();
            if e.scenario_id == format!("s{i}") && e.cause == pb::ChangeCause::Adjustment as i32 {
                break;
            }
        }
        ours.push(t.elapsed());
    }
    let (ours, base) = (percentiles(ours), percentiles(base));
    println!("Analytics alert -> PolicyUpdated ({trials} alerts; goal: <= 1 s)");
    row("baseline: alert publish -> consume", base);
    row("alert -> adjustment -> PolicyUpdated", ours);
    ratio("ratio", ours, base);
    stop.cancel();
    server.await.unwrap().unwrap();
}

fn main() {
    println!(
        "tandem-policy benchmarks ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    in_process();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(over_the_wire());
}
