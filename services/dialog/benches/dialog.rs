//! Dialog benchmarks over gRPC on the running service, beside a running knowledge service (with
//! published Chinese and English articles that answer the bench's questions) and a running
//! policy service (with a scenario for them), on both deployments: SQLite + the in-process bus,
//! and PostgreSQL + NATS from the testkit (the three services share those servers).
//!
//! 1. Baseline: a bare tonic unary call (the gRPC health check on dialog's own server) followed
//!    by a one-row INSERT and commit on the deployment's database engine, at a paced 200/s.
//! 2. Latency of a customer turn (`PostCustomerMessage`: idempotency check, analysis, the
//!    scenario's policy, the knowledge search, reply, one transaction with the outbox) at the
//!    same pace, spread over conversations; printed beside the baseline, with the ratio.
//! 3. Throughput: 16 concurrent clients posting turns as fast as the service answers.
//!
//! Each conversation gets at most 12 turns, below the scenario's 20-bot-turn handoff rule, so
//! every measured turn is a full bot turn. The share of turns whose reply cites a knowledge
//! article is printed, so a run whose look-ups failed or timed out shows it.
//!
//! `cargo bench -p tandem-dialog --bench dialog` runs 2,000 paced turns and 8,000 throughput
//! turns per deployment (`BENCH_THROUGHPUT_TURNS` changes the latter; about 7 s of sustained
//! load); without `--bench` (as `cargo test --bench dialog` runs it) a tenth of that, as a smoke
//! test.

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::cast_precision_loss,
    clippy::too_many_lines
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_dialog::Dialog;
use tandem_knowledge::Knowledge;
use tandem_platform::auth::{Role, TokenIssuer};
use tandem_platform::bus::memory::MemoryBus;
use tandem_platform::config::{
    AuthConfig, BusConfig, BusKind, DatabaseConfig, OutboxConfig, Secret, ServiceConfig,
};
use tandem_platform::db::Db;
use tandem_platform::runtime::Service;
use tandem_policy::Policy;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::dialog::v1 as pb;
use tandem_proto::pb::dialog::v1::dialog_service_client::DialogServiceClient;
use tandem_proto::pb::dialog::v1::model_service_client::ModelServiceClient;
use tandem_proto::pb::knowledge::v1 as kpb;
use tandem_proto::pb::knowledge::v1::knowledge_service_client::KnowledgeServiceClient;
use tandem_proto::pb::policy::v1 as ppb;
use tandem_proto::pb::policy::v1::policy_service_client::PolicyServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

type Token = tonic::metadata::MetadataValue<tonic::metadata::Ascii>;

const SECRET: &str = "dialog-bench-secret-dialog-bench-secret";
const TURNS_PER_CONVERSATION: usize = 12;
const SCENARIO: &str = "orders";
const TEXTS: [&str; 8] = [
    "我要退款",
    "快递到哪里了",
    "how do I get a refund",
    "where is my parcel",
    "退款什么时候到账",
    "track my delivery",
    "我的包裹什么时候到",
    "when will my refund arrive",
];

/// Published articles: `(language, title, questions, answer)`. The first four answer the bench's
/// questions; the others are about other matters, so the search has something to tell apart.
const ARTICLES: [(common::Language, &str, &[&str], &str); 10] = [
    (
        common::Language::En,
        "Refunds",
        &["how do I get a refund", "when will my refund arrive"],
        "Once the returned item reaches our warehouse, the refund goes back to your card within \
         3 working days.",
    ),
    (
        common::Language::Zh,
        "退款",
        &["我要退款", "退款什么时候到账"],
        "退货包裹签收后，退款当天原路退回，一般1到3个工作日到账。",
    ),
    (
        common::Language::En,
        "Delivery tracking",
        &["where is my parcel", "track my delivery"],
        "Open the order and press Track: the courier's latest scan and the expected delivery day \
         are shown there.",
    ),
    (
        common::Language::Zh,
        "物流查询",
        &["快递到哪里了", "我的包裹什么时候到"],
        "在订单详情中点击查看物流，可以看到快递的最新位置和预计送达时间。",
    ),
    (
        common::Language::En,
        "Password reset",
        &["I forgot my password", "how do I change my password"],
        "Use Forgot password on the sign-in page; the link we e-mail you is valid for an hour.",
    ),
    (
        common::Language::Zh,
        "修改密码",
        &["忘记密码了", "怎么修改登录密码"],
        "在登录页点击忘记密码，按短信验证码提示设置新密码。",
    ),
    (
        common::Language::En,
        "Invoices",
        &["can I get an invoice", "I need a VAT invoice for my order"],
        "Invoices can be downloaded from the order page once the order has shipped.",
    ),
    (
        common::Language::Zh,
        "发票",
        &["怎么开发票", "我需要增值税发票"],
        "订单发货后，可在订单详情页申请并下载电子发票。",
    ),
    (
        common::Language::En,
        "Membership points",
        &["how do membership points work", "when do my points expire"],
        "Every yuan spent earns one point; points expire at the end of the following year.",
    ),
    (
        common::Language::Zh,
        "会员积分",
        &["会员积分怎么用", "积分什么时候过期"],
        "每消费1元积1分，积分在次年年底过期。",
    ),
];

const SCENARIOS: &str = r"
scenarios:
  - id: orders
    names: { zh: 订单与退款, en: Orders and refunds }
    description: Refunds and delivery questions, answered by the bot from the knowledge base.
    intents: [refund, delivery]
    intent_priority: 100
    tier: TIER_STANDARD
    strategy: STRATEGY_BOT_FIRST
    mode: MODE_LIVE
    thresholds:
      min_intent_confidence: 0.5
      clarify_confidence: 0.3
      negative_sentiment: -0.6
      sentiment_drop: 0.8
      sentiment_window_turns: 3
      max_fallbacks: 2
      max_bot_turns: 20
      max_complexity: 0.8
      max_queue_wait: 600s
    guardrails:
      min_intent_confidence: { min: 0.4, max: 0.8 }
      clarify_confidence: { min: 0.2, max: 0.55 }
      negative_sentiment: { min: -0.85, max: -0.4 }
      sentiment_drop: { min: 0.5, max: 1.4 }
      sentiment_window_turns: { min: 2, max: 5 }
      max_fallbacks: { min: 1, max: 4 }
      max_bot_turns: { min: 8, max: 40 }
      max_complexity: { min: 0.6, max: 0.95 }
      max_queue_wait: { min: 120s, max: 1800s }
      allowed_strategies: [STRATEGY_BOT_FIRST, STRATEGY_AGENT_ASSIST]
    routing:
      queue_id: orders
      priority: 30
";

fn auth() -> AuthConfig {
    AuthConfig {
        hs256_secret: Secret::new(SECRET.to_owned()),
        allow_hs256: true,
        ..AuthConfig::default()
    }
}

fn bearer(subject: &str, roles: &[Role]) -> Token {
    let token = TokenIssuer::from_config(&auth())
        .unwrap()
        .issue(
            &TenantId::new("bench").unwrap(),
            subject,
            roles,
            Duration::from_secs(3_600),
        )
        .unwrap();
    format!("Bearer {token}").parse().unwrap()
}

fn req<T>(body: T, token: &Token) -> Request<T> {
    let mut r = Request::new(body);
    r.metadata_mut().insert("authorization", token.clone());
    r
}

fn percentiles(mut samples: Vec<Duration>) -> [Duration; 4] {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    [at(0.5), at(0.9), at(0.99), at(1.0)]
}

/// Where one deployment keeps its data and events.
struct Deployment {
    label: &'static str,
    bus: BusConfig,
    memory: Option<MemoryBus>,
    databases: Databases,
}

enum Databases {
    Sqlite(std::path::PathBuf),
    Postgres(Box<tandem_testkit::Postgres>),
}

impl Deployment {
    /// A database of its own for `name` (a service, or the baseline).
    async fn database(&self, name: &str) -> DatabaseConfig {
        match &self.databases {
            Databases::Sqlite(dir) => DatabaseConfig {
                url: Secret::new(format!(
                    "sqlite://{}",
                    dir.join(format!("{name}.db")).display()
                )),
                ..DatabaseConfig::default()
            },
            Databases::Postgres(pg) => DatabaseConfig {
                url: Secret::new(pg.fresh_database().await.unwrap()),
                schema: name.into(),
                ..DatabaseConfig::default()
            },
        }
    }
}

/// A service running in this process.
struct Running {
    url: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start<S: Service>(d: &Deployment, settings: S::Settings) -> Self {
        let cfg = ServiceConfig {
            auth: auth(),
            database: d.database(S::NAME).await,
            bus: d.bus.clone(),
            outbox: OutboxConfig {
                poll_interval: Duration::from_millis(50),
                ..OutboxConfig::default()
            },
            service: settings,
            ..ServiceConfig::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let server = {
            let (stop, memory) = (stop.clone(), d.memory.clone());
            tokio::spawn(async move {
                tandem_platform::runtime::serve_with::<S>(cfg, memory.as_ref(), listener, stop)
                    .await
            })
        };
        let running = Self { url, stop, server };
        // Serving once the health check answers (after the migrations).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut health = HealthClient::new(running.channel().await);
            if health.check(HealthCheckRequest::default()).await.is_ok() {
                return running;
            }
            assert!(Instant::now() < deadline, "{} did not start", S::NAME);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn channel(&self) -> Channel {
        loop {
            match Channel::from_shared(self.url.clone())
                .unwrap()
                .connect()
                .await
            {
                Ok(c) => return c,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
    }
}

/// The policy service's scenario for the bench's intents.
async fn import_scenario(policy: &Running) {
    let mut p = PolicyServiceClient::new(policy.channel().await);
    let out = p
        .import_scenarios(req(
            ppb::ImportScenariosRequest {
                format: ppb::ScenarioFormat::Yaml as i32,
                content: SCENARIOS.into(),
                validate_only: false,
                reason: "bench".into(),
            },
            &bearer("admin", &[Role::Admin]),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(out.errors.is_empty(), "{:?}", out.errors);
}

/// Writes, reviews and publishes the articles; returns once every one is searchable.
async fn publish_articles(knowledge: &Running) {
    let channel = knowledge.channel().await;
    let mut k = KnowledgeServiceClient::new(channel);
    let (author, reviewer) = (
        bearer("agent-1", &[Role::Agent]),
        bearer("lead-1", &[Role::Supervisor]),
    );
    let bot = bearer("bench-channel", &[Role::Channel]);
    for (language, title, questions, answer) in ARTICLES {
        let id = k
            .create_article(req(
                kpb::CreateArticleRequest {
                    scenario_id: SCENARIO.into(),
                    language: language as i32,
                    visibility: kpb::Visibility::Both as i32,
                    title: title.into(),
                    questions: questions.iter().map(|q| (*q).to_owned()).collect(),
                    answer: answer.into(),
                    ..Default::default()
                },
                &author,
            ))
            .await
            .unwrap()
            .into_inner()
            .article
            .unwrap()
            .id;
        k.submit_for_review(req(
            kpb::SubmitForReviewRequest {
                article_id: id.clone(),
                version: 1,
                comment: String::new(),
            },
            &author,
        ))
        .await
        .unwrap();
        k.approve_version(req(
            kpb::ApproveVersionRequest {
                article_id: id.clone(),
                version: 1,
                comment: String::new(),
            },
            &reviewer,
        ))
        .await
        .unwrap();
        k.publish_version(req(
            kpb::PublishVersionRequest {
                article_id: id.clone(),
                version: 1,
            },
            &reviewer,
        ))
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let hits = k
                .search(req(
                    kpb::SearchRequest {
                        query: questions[0].into(),
                        audience: kpb::Audience::Bot as i32,
                        ..Default::default()
                    },
                    &bot,
                ))
                .await
                .unwrap()
                .into_inner()
                .hits;
            if hits.iter().any(|h| h.article_id == id) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "article {title} never searchable"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Trains and activates dialog's intent model for the bench's questions.
async fn train(channel: &Channel) {
    let admin = bearer("admin", &[Role::Admin]);
    let mut m = ModelServiceClient::new(channel.clone());
    let mut csv = String::from("text,intent,answer\n");
    for (i, t) in TEXTS.iter().enumerate() {
        let intent = if t.contains("退款") || t.contains("refund") {
            "refund"
        } else {
            "delivery"
        };
        for p in ["", "请问", "hi ", "麻烦"] {
            csv.push_str(&format!("\"{p}{t}\",{intent},answer {i}\n"));
        }
    }
    m.upload_examples(req(
        pb::UploadExamplesRequest {
            scenario_id: SCENARIO.into(),
            format: pb::ExampleFormat::Csv as i32,
            raw: csv,
            ..Default::default()
        },
        &admin,
    ))
    .await
    .unwrap();
    m.train_model(req(
        pb::TrainModelRequest {
            activate: true,
            ..Default::default()
        },
        &admin,
    ))
    .await
    .unwrap();
}

async fn conversation(c: &mut DialogServiceClient<Channel>, token: &Token, key: String) -> String {
    c.start_conversation(req(
        pb::StartConversationRequest {
            customer: Some(common::Customer {
                id: format!("c-{key}"),
                ..Default::default()
            }),
            scenario_hint: SCENARIO.into(),
            client_conversation_id: key,
            ..Default::default()
        },
        token,
    ))
    .await
    .unwrap()
    .into_inner()
    .conversation
    .unwrap()
    .id
}

/// One customer turn: how long it took and whether the reply cites an article.
async fn turn(
    c: &mut DialogServiceClient<Channel>,
    token: &Token,
    conv: &str,
    n: usize,
) -> (Duration, bool) {
    let t = Instant::now();
    let r = c
        .post_customer_message(req(
            pb::PostCustomerMessageRequest {
                conversation_id: conv.to_owned(),
                client_message_id: format!("m{n}"),
                text: TEXTS[n % TEXTS.len()].to_owned(),
                ..Default::default()
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    let took = t.elapsed();
    let bot = r.bot_turn.expect("every measured turn is a bot turn");
    assert_eq!(bot.action, pb::BotAction::Answer as i32, "{bot:?}");
    (took, !bot.cited_articles.is_empty())
}

/// Waits until dialog decides with the policy service's scenario (received as an event) and a
/// turn is answered from the knowledge base; returns that turn's decision trace.
async fn wait_ready(c: &mut DialogServiceClient<Channel>, token: &Token) -> pb::DecisionTrace {
    let deadline = Instant::now() + Duration::from_secs(30);
    for attempt in 0.. {
        let conv = conversation(c, token, format!("ready-{attempt}")).await;
        let r = c
            .post_customer_message(req(
                pb::PostCustomerMessageRequest {
                    conversation_id: conv,
                    client_message_id: "m".into(),
                    text: TEXTS[2].into(),
                    ..Default::default()
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner();
        let bot = r.bot_turn.unwrap();
        let trace = c
            .get_decision_trace(req(
                pb::GetDecisionTraceRequest {
                    key: Some(pb::get_decision_trace_request::Key::TraceId(
                        bot.decision_trace_id.clone(),
                    )),
                },
                token,
            ))
            .await
            .unwrap()
            .into_inner()
            .trace
            .unwrap();
        let decision = trace.policy_decision.clone().unwrap_or_default();
        if decision.scenario_id == SCENARIO
            && decision.policy_version >= 1
            && !bot.cited_articles.is_empty()
        {
            return trace;
        }
        assert!(
            Instant::now() < deadline,
            "dialog never used the scenario and the knowledge base: {trace:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!()
}

/// The baseline: a bare tonic unary call and a one-row commit, paced like the turns.
async fn baseline(d: &Deployment, dialog: &Channel, total: usize) -> Vec<Duration> {
    let db = Arc::new(Db::connect(&d.database("baseline").await).await.unwrap());
    tandem_platform::on_db!(&*db, pool => sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_baseline (id BIGINT PRIMARY KEY, body BYTEA NOT NULL)")
        .execute(pool).await.map(drop).unwrap());
    let health = HealthClient::new(dialog.clone());
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut tasks = Vec::with_capacity(total);
    for n in 0..total {
        tick.tick().await;
        let (mut health, db) = (health.clone(), Arc::clone(&db));
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            health.check(HealthCheckRequest::default()).await.unwrap();
            let id = i64::try_from(n).unwrap();
            tandem_platform::on_db!(&*db, pool => {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("INSERT INTO bench_baseline (id, body) VALUES ($1, $2)")
                    .bind(id).bind(vec![0_u8; 64]).execute(&mut *tx).await.unwrap();
                tx.commit().await.unwrap();
            });
            t.elapsed()
        }));
    }
    let mut samples = Vec::with_capacity(total);
    for t in tasks {
        samples.push(t.await.unwrap());
    }
    db.close().await;
    samples
}

fn share(cited: usize, total: usize) -> String {
    format!("{:.1} %", 100.0 * cited as f64 / total as f64)
}

async fn run(d: Deployment, scale: usize) {
    let label = d.label;
    let policy = Running::start::<Policy>(&d, tandem_policy::Settings::default()).await;
    let knowledge = Running::start::<Knowledge>(&d, tandem_knowledge::Settings::default()).await;
    let dialog = Running::start::<Dialog>(
        &d,
        tandem_dialog::Settings {
            knowledge_endpoint: knowledge.url.clone(),
            ..tandem_dialog::Settings::default()
        },
    )
    .await;
    import_scenario(&policy).await;
    publish_articles(&knowledge).await;
    let channel = dialog.channel().await;
    train(&channel).await;
    let token = Arc::new(bearer("bench-channel", &[Role::Channel]));
    let mut client = DialogServiceClient::new(channel.clone());
    let sample = wait_ready(&mut client, &token).await;

    // 1. Baseline at 200/s.
    let total = 2_000 / scale;
    let base = percentiles(baseline(&d, &channel, total).await);
    println!(
        "{label}: baseline (tonic health check + one-row commit) at 200/s: p50 {:.2?} p90 {:.2?} \
         p99 {:.2?} max {:.2?}",
        base[0], base[1], base[2], base[3]
    );

    // 2. Paced turns: 200 turns/s.
    // As many conversations as the full run needs, whatever the scale: turns of one
    // conversation stay 0.8 s apart, so they never overlap (even unoptimised).
    let mut convs = Vec::new();
    for i in 0..2_000 / TURNS_PER_CONVERSATION + 1 {
        convs.push(conversation(&mut client, &token, format!("{label}-p{i}")).await);
    }
    let convs = Arc::new(convs);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut tasks = Vec::with_capacity(total);
    let started = Instant::now();
    for n in 0..total {
        tick.tick().await;
        let (mut c, token, convs) = (client.clone(), Arc::clone(&token), Arc::clone(&convs));
        // Turn n of conversation n % len: consecutive turns of one conversation are far apart.
        let conv = convs[n % convs.len()].clone();
        tasks.push(tokio::spawn(
            async move { turn(&mut c, &token, &conv, n).await },
        ));
    }
    let mut samples = Vec::with_capacity(total);
    let mut cited = 0;
    for t in tasks {
        let (took, c) = t.await.unwrap();
        samples.push(took);
        cited += usize::from(c);
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let p = percentiles(samples);
    println!(
        "{label}: customer turn at {rate:.0} turns/s offered 200/s: p50 {:.2?} p90 {:.2?} p99 \
         {:.2?} max {:.2?}; {} of the replies cite an article",
        p[0],
        p[1],
        p[2],
        p[3],
        share(cited, total)
    );
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!(
        "{label}: turn / baseline: p50 x{:.1} p90 x{:.1} p99 x{:.1}",
        ratio(p[0], base[0]),
        ratio(p[1], base[1]),
        ratio(p[2], base[2])
    );
    let stages: Vec<String> = sample
        .stage_latencies
        .iter()
        .map(|s| format!("{} {} µs", s.stage, s.micros))
        .collect();
    println!(
        "{label}: a sample turn's trace: scenario {} policy v{}, cites {:?}, {} (total {} µs)",
        sample
            .policy_decision
            .as_ref()
            .map_or("", |d| d.scenario_id.as_str()),
        sample
            .policy_decision
            .as_ref()
            .map_or(0, |d| d.policy_version),
        sample
            .articles
            .iter()
            .map(|a| a.title.as_str())
            .collect::<Vec<_>>(),
        stages.join(", "),
        sample.total_micros
    );

    // 3. Throughput: 16 clients, each on its own conversations.
    let workers = 16;
    let total: usize = std::env::var("BENCH_THROUGHPUT_TURNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8_000);
    let per_worker = (total / workers / scale).max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (mut c, token) = (client.clone(), Arc::clone(&token));
        tasks.push(tokio::spawn(async move {
            let mut conv = String::new();
            let mut cited = 0;
            for n in 0..per_worker {
                if n % TURNS_PER_CONVERSATION == 0 {
                    conv = conversation(&mut c, &token, format!("{label}-t{w}-{n}")).await;
                }
                cited += usize::from(turn(&mut c, &token, &conv, n).await.1);
            }
            cited
        }));
    }
    let mut cited = 0;
    for t in tasks {
        cited += t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let turns = workers * per_worker;
    println!(
        "{label}: throughput with {workers} clients: {:.0} turns/s ({turns} turns in {secs:.2} s, \
         conversation starts included); {} of the replies cite an article",
        turns as f64 / secs,
        share(cited, turns)
    );
    dialog.stop().await;
    knowledge.stop().await;
    policy.stop().await;
}

fn main() {
    // `cargo bench` passes `--bench`; without it (`cargo test --bench dialog`) a short smoke run.
    let scale = if std::env::args().any(|a| a == "--bench") {
        1
    } else {
        10
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        run(
            Deployment {
                label: "sqlite",
                bus: BusConfig {
                    kind: BusKind::Memory,
                    ..BusConfig::default()
                },
                memory: Some(MemoryBus::new()),
                databases: Databases::Sqlite(dir.path().to_owned()),
            },
            scale,
        )
        .await;
        match (
            tandem_testkit::Postgres::start().await,
            tandem_testkit::NatsServer::start().await,
        ) {
            (Ok(pg), Ok(nats)) => {
                run(
                    Deployment {
                        label: "postgres",
                        bus: BusConfig {
                            kind: BusKind::Nats,
                            nats_url: nats.url(),
                            ..BusConfig::default()
                        },
                        memory: None,
                        databases: Databases::Postgres(Box::new(pg)),
                    },
                    scale,
                )
                .await;
                drop(nats);
            }
            _ => println!("postgres: skipped, PostgreSQL or nats-server not available"),
        }
    });
}
