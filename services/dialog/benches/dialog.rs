//! Dialog benchmarks over gRPC on the running service, with a trained intent model, on both
//! deployments (SQLite + in-process bus, and PostgreSQL + NATS from the testkit):
//!
//! 1. Latency of a customer turn (`PostCustomerMessage`: idempotency check, analysis, policy,
//!    reply, one transaction with the outbox) at a paced 200 turns/s, spread over conversations.
//! 2. Throughput: 16 concurrent clients posting turns as fast as the service answers.
//!
//! Each conversation gets at most 12 turns, below the default 20-bot-turn handoff rule, so every
//! measured turn is a full bot turn. Run with `cargo bench -p tandem-dialog --bench dialog`.

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::cast_precision_loss)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_dialog::Dialog;
use tandem_platform::auth::{Role, TokenIssuer};
use tandem_platform::bus::memory::MemoryBus;
use tandem_platform::config::{
    AuthConfig, BusConfig, BusKind, DatabaseConfig, OutboxConfig, Secret, ServiceConfig,
};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::dialog::v1 as pb;
use tandem_proto::pb::dialog::v1::dialog_service_client::DialogServiceClient;
use tandem_proto::pb::dialog::v1::model_service_client::ModelServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::Channel;

const SECRET: &str = "dialog-bench-secret-dialog-bench-secret";
const TURNS_PER_CONVERSATION: usize = 12;
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

fn auth() -> AuthConfig {
    AuthConfig {
        hs256_secret: Secret::new(SECRET.to_owned()),
        allow_hs256: true,
        ..AuthConfig::default()
    }
}

fn bearer(roles: &[Role]) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    let token = TokenIssuer::from_config(&auth())
        .unwrap()
        .issue(
            &TenantId::new("bench").unwrap(),
            "bench",
            roles,
            Duration::from_secs(3_600),
        )
        .unwrap();
    format!("Bearer {token}").parse().unwrap()
}

fn req<T>(body: T, token: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>) -> Request<T> {
    let mut r = Request::new(body);
    r.metadata_mut().insert("authorization", token.clone());
    r
}

fn percentiles(mut samples: Vec<Duration>) -> [Duration; 4] {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    [at(0.5), at(0.9), at(0.99), at(1.0)]
}

async fn setup(channel: &Channel) {
    let admin = bearer(&[Role::Admin]);
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

async fn conversation(
    c: &mut DialogServiceClient<Channel>,
    token: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    key: String,
) -> String {
    c.start_conversation(req(
        pb::StartConversationRequest {
            customer: Some(common::Customer {
                id: format!("c-{key}"),
                ..Default::default()
            }),
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

async fn turn(
    c: &mut DialogServiceClient<Channel>,
    token: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    conv: &str,
    n: usize,
) -> Duration {
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
    assert!(r.bot_turn.is_some(), "every measured turn is a bot turn");
    took
}

async fn run(label: &str, database: DatabaseConfig, bus: BusConfig, memory: Option<MemoryBus>) {
    let cfg = ServiceConfig {
        auth: auth(),
        database,
        bus,
        outbox: OutboxConfig {
            poll_interval: Duration::from_millis(50),
            ..OutboxConfig::default()
        },
        ..ServiceConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tandem_platform::runtime::serve_with::<Dialog>(cfg, memory.as_ref(), listener, stop)
                .await
        })
    };
    let channel = loop {
        match Channel::from_shared(url.clone()).unwrap().connect().await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    // Wait for the migrations and the server.
    tokio::time::sleep(Duration::from_millis(500)).await;
    setup(&channel).await;
    let token = Arc::new(bearer(&[Role::Channel]));

    // 1. Paced latency: 200 turns/s for 10 s.
    let total = 2_000;
    let mut client = DialogServiceClient::new(channel.clone());
    let mut convs = Vec::new();
    for i in 0..total / TURNS_PER_CONVERSATION + 1 {
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
    for t in tasks {
        samples.push(t.await.unwrap());
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let p = percentiles(samples);
    println!(
        "{label}: customer turn at {rate:.0} turns/s offered 200/s: p50 {:.2?} p90 {:.2?} p99 {:.2?} max {:.2?}",
        p[0], p[1], p[2], p[3]
    );

    // 2. Throughput: 16 clients, each on its own conversations.
    let workers = 16;
    let per_worker = 150;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (mut c, token, label) = (client.clone(), Arc::clone(&token), label.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut conv = String::new();
            for n in 0..per_worker {
                if n % TURNS_PER_CONVERSATION == 0 {
                    conv = conversation(&mut c, &token, format!("{label}-t{w}-{n}")).await;
                }
                turn(&mut c, &token, &conv, n).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let turns = workers * per_worker;
    println!(
        "{label}: throughput with {workers} clients: {:.0} turns/s ({turns} turns in {secs:.2} s, \
         conversation starts included)",
        turns as f64 / secs
    );
    stop.cancel();
    server.await.unwrap().unwrap();
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        run(
            "sqlite",
            DatabaseConfig {
                url: Secret::new(format!(
                    "sqlite://{}",
                    dir.path().join("dialog.db").display()
                )),
                ..DatabaseConfig::default()
            },
            BusConfig {
                kind: BusKind::Memory,
                ..BusConfig::default()
            },
            Some(MemoryBus::new()),
        )
        .await;
        match (
            tandem_testkit::Postgres::start().await,
            tandem_testkit::NatsServer::start().await,
        ) {
            (Ok(pg), Ok(nats)) => {
                let url = pg.fresh_database().await.unwrap();
                run(
                    "postgres",
                    DatabaseConfig {
                        url: Secret::new(url),
                        schema: "dialog".into(),
                        ..DatabaseConfig::default()
                    },
                    BusConfig {
                        kind: BusKind::Nats,
                        nats_url: nats.url(),
                        ..BusConfig::default()
                    },
                    None,
                )
                .await;
            }
            _ => println!("postgres: skipped, PostgreSQL or nats-server not available"),
        }
    });
}
