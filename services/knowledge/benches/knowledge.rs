//! Knowledge benchmarks on the running service (PostgreSQL + NATS from the testkit) over a
//! generated knowledge base (100,000 articles by default, English and Chinese):
//!
//! 1. import: JSON lines over the `ImportArticles` stream, published at once, in articles/s,
//!    beside a baseline from the same run: the same rows written into PostgreSQL with raw
//!    multi-row INSERTs (500 rows per transaction) into one table;
//! 2. start of a second replica, which rebuilds its index from the database;
//! 3. `Search` over gRPC at a fixed rate (200 queries/s, open loop) beside the same queries run
//!    in-process on an index holding the same articles;
//! 4. publish → searchable: an article is created, reviewed and published through one replica
//!    and searched on both until found.
//!
//! Run with `cargo bench -p tandem-knowledge --bench knowledge`; `KNOWLEDGE_BENCH_ARTICLES`
//! changes the size of the knowledge base.

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::cast_precision_loss)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_knowledge::Knowledge;
use tandem_platform::auth::{Role, TokenIssuer};
use tandem_platform::config::{
    AuthConfig, BusConfig, BusKind, DatabaseConfig, Secret, ServiceConfig,
};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::knowledge::v1 as pb;
use tandem_proto::pb::knowledge::v1::knowledge_service_client::KnowledgeServiceClient;
use tandem_search::{ArticleDoc, Audience, IndexConfig, SearchIndex, SearchRequest, Visibility};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

const SECRET: &str = "knowledge-bench-secret-knowledge-bench";
const TENANT: &str = "bench";

/// Adds the bearer token to every call; cloneable, so clients can be shared by tasks.
#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = KnowledgeServiceClient<InterceptedService<Channel, Bearer>>;

fn percentiles(mut samples: Vec<Duration>) -> [Duration; 5] {
    samples.sort();
    if samples.is_empty() {
        return [Duration::ZERO; 5];
    }
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    [at(0.5), at(0.9), at(0.95), at(0.99), at(1.0)]
}

fn row(name: &str, p: [Duration; 5]) {
    println!(
        "  {name:<40} p50 {:>9.1?}  p90 {:>9.1?}  p95 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}",
        p[0], p[1], p[2], p[3], p[4]
    );
}

/// A deterministic pseudo-random generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A skewed index below `n`: small indices are more frequent, like words in text.
    fn zipf(&mut self, n: usize) -> usize {
        let u = (self.next() % 1_000_000) as f64 / 1_000_000.0;
        ((n as f64).powf(u) as usize).saturating_sub(1).min(n - 1)
    }
}

struct Vocabulary {
    en: Vec<String>,
    zh: Vec<String>,
}

impl Vocabulary {
    fn new() -> Self {
        let onsets = [
            "b", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr",
        ];
        let vowels = ["a", "e", "i", "o", "u", "ai", "ou"];
        let codas = ["", "n", "r", "s", "t", "l", "ck", "nd"];
        let mut en = Vec::new();
        for o in onsets {
            for v in vowels {
                for c in codas {
                    for o2 in ["", "m", "l", "t"] {
                        en.push(format!("{o}{v}{c}{o2}a"));
                    }
                }
            }
        }
        let chars: Vec<char> = "退款订单发货物流时间地址修改会员积分优惠券支付失败账户密码登录\
            售后维修保修发票价格活动库存尺码颜色评价客服投诉取消预约门店营业配送快递包裹签收\
            退货换货运费折扣余额充值提现银行卡信用额度利息还款逾期保险理赔航班改签行李"
            .chars()
            .collect();
        let mut zh = Vec::new();
        for (i, a) in chars.iter().enumerate() {
            for b in chars.iter().skip(i % 7).step_by(7) {
                zh.push(format!("{a}{b}"));
            }
        }
        Self { en, zh }
    }

    fn words(&self, rng: &mut Rng, zh: bool, n: usize) -> String {
        let list = if zh { &self.zh } else { &self.en };
        let words: Vec<&str> = (0..n)
            .map(|_| list[rng.zipf(list.len())].as_str())
            .collect();
        if zh { words.concat() } else { words.join(" ") }
    }
}

/// The generated articles as index documents (the JSON lines are derived from them).
fn generate(n: usize) -> Vec<ArticleDoc> {
    let vocab = Vocabulary::new();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|i| {
            let zh = i % 5 == 0;
            ArticleDoc {
                tenant: TENANT.into(),
                article_id: format!("gen-{i}"),
                version: 1,
                scenario: format!("s{}", i % 20),
                language: if zh { "zh" } else { "en" }.into(),
                visibility: Visibility::Both,
                tags: Vec::new(),
                title: vocab.words(&mut rng, zh, 4),
                questions: (0..3).map(|_| vocab.words(&mut rng, zh, 6)).collect(),
                answer: vocab.words(&mut rng, zh, if zh { 30 } else { 45 }),
            }
        })
        .collect()
}

fn jsonl(docs: &[ArticleDoc]) -> String {
    let mut out = String::new();
    for d in docs {
        let line = serde_json::json!({
            "external_id": d.article_id,
            "scenario_id": d.scenario,
            "language": d.language,
            "title": d.title,
            "questions": d.questions,
            "answer": d.answer,
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// Queries: a few words of a random article's question, sometimes with a stray word.
fn queries(docs: &[ArticleDoc], n: usize) -> Vec<String> {
    let vocab = Vocabulary::new();
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    (0..n)
        .map(|_| {
            let d = &docs[(rng.next() % docs.len() as u64) as usize];
            let q = &d.questions[(rng.next() % 3) as usize];
            let zh = d.language == "zh";
            if zh {
                let chars: Vec<char> = q.chars().collect();
                let take = chars.len().min(6);
                let mut s: String = chars[..take].iter().collect();
                s.push_str(&vocab.words(&mut rng, true, 1));
                s
            } else {
                let words: Vec<&str> = q.split(' ').take(4).collect();
                format!("{} {}?", words.join(" "), vocab.words(&mut rng, false, 1))
            }
        })
        .collect()
}

fn auth() -> AuthConfig {
    AuthConfig {
        hs256_secret: Secret::new(SECRET.to_owned()),
        allow_hs256: true,
        ..AuthConfig::default()
    }
}

async fn replica(
    cfg: &ServiceConfig<tandem_knowledge::Settings>,
    stop: &CancellationToken,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (cfg, stop) = (cfg.clone(), stop.clone());
    tokio::spawn(async move {
        tandem_platform::runtime::serve_with::<Knowledge>(cfg, None, listener, stop)
            .await
            .unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(mut c) = client(&url, "admin", &[Role::Admin]).await
            && c.list_articles(pb::ListArticlesRequest::default())
                .await
                .is_ok()
        {
            return url;
        }
        assert!(Instant::now() < deadline, "replica did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn client(
    url: &str,
    subject: &str,
    roles: &[Role],
) -> Result<Client, tonic::transport::Error> {
    let issuer = TokenIssuer::from_config(&auth()).unwrap();
    let token = issuer
        .issue(
            &TenantId::new(TENANT).unwrap(),
            subject,
            roles,
            Duration::from_secs(3_600),
        )
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let channel = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await?;
    Ok(KnowledgeServiceClient::with_interceptor(
        channel,
        Bearer(bearer),
    ))
}

async fn import(c: &mut Client, text: String) -> pb::ImportSummary {
    use pb::import_articles_request::Part;
    let mut msgs = vec![pb::ImportArticlesRequest {
        part: Some(Part::Header(pb::ImportHeader {
            format: pb::ArticleFormat::Jsonl as i32,
            default_visibility: pb::Visibility::Both as i32,
            publish: true,
            ..Default::default()
        })),
    }];
    for chunk in text.as_bytes().chunks(512 << 10) {
        msgs.push(pb::ImportArticlesRequest {
            part: Some(Part::Chunk(chunk.to_vec())),
        });
    }
    let mut out = c
        .import_articles(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = out.message().await.unwrap() {
        if let Some(pb::import_articles_response::Event::Summary(s)) = m.event {
            return s;
        }
    }
    panic!("import ended without a summary");
}

/// The in-run baseline: the same rows written straight into PostgreSQL, one table, one
/// multi-row INSERT of 500 rows per transaction, no validation, versions, audit, feed or events.
async fn raw_insert(url: &str, docs: &[ArticleDoc]) -> Duration {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query(
        "CREATE TABLE raw_articles (external_id TEXT PRIMARY KEY, scenario_id TEXT NOT NULL, \
         language TEXT NOT NULL, title TEXT NOT NULL, questions TEXT NOT NULL, \
         answer TEXT NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let started = Instant::now();
    for part in docs.chunks(500) {
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO raw_articles (external_id, scenario_id, language, title, questions, \
             answer) ",
        );
        q.push_values(part, |mut row, d| {
            row.push_bind(&d.article_id)
                .push_bind(&d.scenario)
                .push_bind(&d.language)
                .push_bind(&d.title)
                .push_bind(d.questions.join("|"))
                .push_bind(&d.answer);
        });
        let mut tx = pool.begin().await.unwrap();
        q.build().execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
    }
    let took = started.elapsed();
    pool.close().await;
    took
}

/// A search for the bot's audience, as dialog sends it.
fn bot_query(query: String) -> pb::SearchRequest {
    pb::SearchRequest {
        query,
        audience: pb::Audience::Bot as i32,
        ..Default::default()
    }
}

/// Runs `qs` over gRPC against the replica at `url` at 200 queries/s (open loop), after 200
/// warm-up queries; returns the latencies of the calls that were answered.
async fn search_over_grpc(url: &str, which: &str, qs: &Arc<Vec<String>>) -> Vec<Duration> {
    let bot = client(url, "dialog", &[Role::Service]).await.unwrap();
    // Warm up the connection and the index.
    for q in qs.iter().take(200) {
        let _ = bot.clone().search(bot_query(q.clone())).await.unwrap();
    }
    // One call in flight: the service's time without other calls competing for the cores.
    let mut alone = Vec::with_capacity(qs.len());
    for q in qs.iter() {
        let r = bot
            .clone()
            .search(bot_query(q.clone()))
            .await
            .unwrap()
            .into_inner();
        alone.push(Duration::from_micros(u64::try_from(r.took_us).unwrap_or(0)));
    }
    row(
        &format!("  {which} replica: in the service, one call at a time"),
        percentiles(alone),
    );
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(qs.len());
    let mut hits_found = 0usize;
    let run_started = Instant::now();
    for q in qs.iter() {
        tick.tick().await;
        let mut c = bot.clone();
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = c.search(bot_query(q)).await;
            let elapsed = t.elapsed();
            (
                elapsed,
                r.map(|r| {
                    let r = r.into_inner();
                    (!r.hits.is_empty(), r.took_us)
                }),
            )
        }));
    }
    let mut over_grpc = Vec::with_capacity(tasks.len());
    // The service's own time for each answered call (`took_us`: checks, index, hits).
    let mut in_service = Vec::with_capacity(qs.len());
    let mut refused = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        match t.await.unwrap() {
            (d, Ok((found, took_us))) => {
                over_grpc.push(d);
                in_service.push(Duration::from_micros(u64::try_from(took_us).unwrap_or(0)));
                hits_found += usize::from(found);
            }
            // An overloaded server sheds calls (RESOURCE_EXHAUSTED): counted, not timed.
            (_, Err(status)) => *refused.entry(format!("{:?}", status.code())).or_default() += 1,
        }
    }
    let rate = qs.len() as f64 / run_started.elapsed().as_secs_f64();
    println!(
        "  search on the {which} replica: {} queries, {rate:.0} queries/s offered, {hits_found} with hits, refused {refused:?}",
        qs.len()
    );
    row(
        &format!("  {which} replica: time in the service"),
        percentiles(in_service),
    );
    over_grpc
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("KNOWLEDGE_BENCH_ARTICLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let pg = tandem_testkit::Postgres::start().await.unwrap();
    let nats = tandem_testkit::NatsServer::start().await.unwrap();
    let cfg = ServiceConfig {
        auth: auth(),
        database: DatabaseConfig {
            url: Secret::new(pg.fresh_database().await.unwrap()),
            schema: "knowledge".into(),
            ..DatabaseConfig::default()
        },
        bus: BusConfig {
            kind: BusKind::Nats,
            nats_url: nats.url(),
            ..BusConfig::default()
        },
        ..ServiceConfig::default()
    };
    let stop = CancellationToken::new();
    let first = replica(&cfg, &stop).await;
    let docs = generate(n);
    println!("knowledge benchmarks: {n} generated articles (1 in 5 Chinese), PostgreSQL + NATS");

    // 1. Import, after the baseline.
    let baseline = raw_insert(&pg.fresh_database().await.unwrap(), &docs).await;
    let mut admin = client(&first, "admin", &[Role::Admin]).await.unwrap();
    let started = Instant::now();
    let mut created = 0;
    for part in docs.chunks(25_000) {
        let s = import(&mut admin, jsonl(part)).await;
        assert_eq!(s.failed, 0, "{s:?}");
        created += s.created;
    }
    let took = started.elapsed();
    let import_rate = created as f64 / took.as_secs_f64();
    println!(
        "  import (JSONL, published at once)        {created} articles in {took:.1?}: {import_rate:.0} articles/s"
    );
    println!(
        "  baseline: raw multi-row INSERT, same rows {n} rows in {baseline:.1?}: {:.0} rows/s (import at {:.2}x of it)",
        n as f64 / baseline.as_secs_f64(),
        import_rate / (n as f64 / baseline.as_secs_f64())
    );

    // 2. A second replica rebuilds from the database.
    let started = Instant::now();
    let second = replica(&cfg, &stop).await;
    println!(
        "  second replica start (index rebuild)     {:.1?}",
        started.elapsed()
    );

    // 3. Search over gRPC at 200 queries/s beside in-process.
    let qs = Arc::new(queries(&docs, 2_000));
    let local = SearchIndex::in_ram(IndexConfig::default()).unwrap();
    local.rebuild(docs.iter().cloned()).unwrap();
    let mut in_process = Vec::with_capacity(qs.len());
    for q in qs.iter() {
        let t = Instant::now();
        let _ = local.search(&SearchRequest {
            limit: 5,
            ..SearchRequest::new(TENANT, q.clone(), Audience::Bot)
        });
        in_process.push(t.elapsed());
    }
    drop(local);
    row("search in-process (same articles)", percentiles(in_process));
    let first_grpc = search_over_grpc(&first, "importing", &qs).await;
    let second_grpc = search_over_grpc(&second, "rebuilt", &qs).await;
    row("search over gRPC at 200 queries/s", percentiles(first_grpc));
    row("the same on the rebuilt replica", percentiles(second_grpc));

    // 4. Publish → searchable on both replicas.
    let mut author = client(&first, "agent-1", &[Role::Agent]).await.unwrap();
    let mut lead = client(&first, "lead-1", &[Role::Supervisor]).await.unwrap();
    let mut readers = [
        client(&first, "agent-2", &[Role::Agent]).await.unwrap(),
        client(&second, "agent-3", &[Role::Agent]).await.unwrap(),
    ];
    let mut lag = [Vec::new(), Vec::new()];
    for round in 0..40 {
        let word = format!("zzfresh{round}word");
        let a = author
            .create_article(pb::CreateArticleRequest {
                scenario_id: "fresh".into(),
                title: format!("Fresh {word}"),
                questions: vec![format!("what is {word}")],
                answer: format!("{word} is new."),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .article
            .unwrap();
        author
            .submit_for_review(pb::SubmitForReviewRequest {
                article_id: a.id.clone(),
                version: 1,
                comment: String::new(),
            })
            .await
            .unwrap();
        lead.approve_version(pb::ApproveVersionRequest {
            article_id: a.id.clone(),
            version: 1,
            comment: String::new(),
        })
        .await
        .unwrap();
        let published = Instant::now();
        lead.publish_version(pb::PublishVersionRequest {
            article_id: a.id.clone(),
            version: 1,
        })
        .await
        .unwrap();
        for (i, reader) in readers.iter_mut().enumerate() {
            loop {
                let r = reader
                    .search(pb::SearchRequest {
                        query: word.clone(),
                        audience: pb::Audience::Agent as i32,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if r.hits.iter().any(|h| h.article_id == a.id) {
                    lag[i].push(published.elapsed());
                    break;
                }
                assert!(
                    published.elapsed() < Duration::from_secs(10),
                    "never searchable"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    let [on_first, on_second] = lag;
    row("publish -> searchable, same replica", percentiles(on_first));
    row(
        "publish -> searchable, other replica",
        percentiles(on_second),
    );
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
}
