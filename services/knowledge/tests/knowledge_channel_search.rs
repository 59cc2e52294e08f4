//! A channel's token (forwarded by dialog in the bot's turn) may search the knowledge base for
//! the bot and read the published version of a bot-visible article, nothing else. Runs on
//! PostgreSQL with a real nats-server (testkit) and on the standalone engine (SQLite and the
//! in-process bus).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tandem_knowledge::Knowledge;
use tandem_platform::auth::{Role, TokenIssuer};
use tandem_platform::bus::memory::MemoryBus;
use tandem_platform::config::{
    AuthConfig, BusConfig, BusKind, DatabaseConfig, Secret, ServiceConfig,
};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::knowledge::v1 as pb;
use tandem_proto::pb::knowledge::v1::knowledge_service_client::KnowledgeServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const SECRET: &str = "knowledge-channel-test-secret-0123";

type Intercept = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
type Client = KnowledgeServiceClient<InterceptedService<Channel, Intercept>>;

#[allow(dead_code, clippy::large_enum_variant, reason = "held for their Drop")]
enum Keep {
    Servers(tandem_testkit::Postgres, tandem_testkit::NatsServer),
    Dir(tempfile::TempDir),
}

struct Rig {
    url: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _keep: Keep,
}

fn auth() -> AuthConfig {
    AuthConfig {
        hs256_secret: Secret::new(SECRET.to_owned()),
        allow_hs256: true,
        ..AuthConfig::default()
    }
}

impl Rig {
    async fn production() -> Self {
        let pg = tandem_testkit::Postgres::start().await.unwrap();
        let nats = tandem_testkit::NatsServer::start().await.unwrap();
        let database = DatabaseConfig {
            url: Secret::new(pg.fresh_database().await.unwrap()),
            schema: "knowledge".into(),
            ..DatabaseConfig::default()
        };
        let bus = BusConfig {
            kind: BusKind::Nats,
            nats_url: nats.url(),
            ..BusConfig::default()
        };
        Self::start(database, bus, None, Keep::Servers(pg, nats)).await
    }

    async fn standalone() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = DatabaseConfig {
            url: Secret::new(format!(
                "sqlite://{}",
                dir.path().join("knowledge.db").display()
            )),
            ..DatabaseConfig::default()
        };
        let bus = BusConfig {
            kind: BusKind::Memory,
            ..BusConfig::default()
        };
        Self::start(database, bus, Some(MemoryBus::new()), Keep::Dir(dir)).await
    }

    async fn start(
        database: DatabaseConfig,
        bus: BusConfig,
        memory: Option<MemoryBus>,
        keep: Keep,
    ) -> Self {
        let cfg: ServiceConfig<tandem_knowledge::Settings> = ServiceConfig {
            auth: auth(),
            database,
            bus,
            ..ServiceConfig::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let server = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tandem_platform::runtime::serve_with::<Knowledge>(
                    cfg,
                    memory.as_ref(),
                    listener,
                    stop,
                )
                .await
            })
        };
        let rig = Self {
            url,
            stop,
            server,
            _keep: keep,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut c = rig.client("admin-1", &[Role::Admin]).await;
            if c.list_articles(pb::ListArticlesRequest::default())
                .await
                .is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "the service did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rig
    }

    async fn client(&self, subject: &str, roles: &[Role]) -> Client {
        let token = TokenIssuer::from_config(&auth())
            .unwrap()
            .issue(
                &TenantId::new("acme").unwrap(),
                subject,
                roles,
                Duration::from_secs(600),
            )
            .unwrap();
        let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        let channel = loop {
            match Channel::from_shared(self.url.clone())
                .unwrap()
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let intercept: Intercept = Box::new(move |mut req: Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        });
        KnowledgeServiceClient::with_interceptor(channel, intercept)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
    }
}

/// Creates an article as an agent; a supervisor approves and publishes it when `publish`.
async fn article(
    rig: &Rig,
    title: &str,
    question: &str,
    visibility: pb::Visibility,
    publish: bool,
) -> String {
    let mut agent = rig.client("agent-1", &[Role::Agent]).await;
    let mut lead = rig.client("lead-1", &[Role::Supervisor]).await;
    let id = agent
        .create_article(pb::CreateArticleRequest {
            scenario_id: "orders".into(),
            visibility: visibility as i32,
            title: title.into(),
            questions: vec![question.into()],
            answer: format!("{title}: the full written answer."),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .article
        .unwrap()
        .id;
    if publish {
        agent
            .submit_for_review(pb::SubmitForReviewRequest {
                article_id: id.clone(),
                version: 1,
                comment: String::new(),
            })
            .await
            .unwrap();
        lead.approve_version(pb::ApproveVersionRequest {
            article_id: id.clone(),
            version: 1,
            comment: String::new(),
        })
        .await
        .unwrap();
        lead.publish_version(pb::PublishVersionRequest {
            article_id: id.clone(),
            version: 1,
        })
        .await
        .unwrap();
    }
    id
}

fn search(audience: pb::Audience) -> pb::SearchRequest {
    pb::SearchRequest {
        query: "refund parcel".into(),
        audience: audience as i32,
        ..Default::default()
    }
}

async fn a_channel_searches_and_reads_only_for_the_bot(rig: Rig) {
    let bot = article(
        &rig,
        "Refund parcel",
        "how do I get a refund for my parcel",
        pb::Visibility::Bot,
        true,
    )
    .await;
    let internal = article(
        &rig,
        "Refund parcel internal",
        "refund parcel escalation",
        pb::Visibility::Agents,
        true,
    )
    .await;
    let draft = article(
        &rig,
        "Refund parcel draft",
        "refund parcel draft",
        pb::Visibility::Both,
        false,
    )
    .await;
    let mut channel = rig.client("web-widget", &[Role::Channel]).await;

    // Search with the bot's audience: bot-visible published articles only.
    let deadline = Instant::now() + Duration::from_secs(5);
    let hits = loop {
        let hits = channel
            .search(search(pb::Audience::Bot))
            .await
            .unwrap()
            .into_inner()
            .hits;
        if !hits.is_empty() || Instant::now() > deadline {
            break hits;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ids: Vec<&str> = hits.iter().map(|h| h.article_id.as_str()).collect();
    assert_eq!(ids, vec![bot.as_str()]);
    assert_eq!(hits[0].version, 1);

    // Any other audience is refused, and so is writing.
    for audience in [pb::Audience::Agent, pb::Audience::Unspecified] {
        let e = channel.search(search(audience)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{audience:?}: {e:?}");
    }
    let e = channel
        .create_article(pb::CreateArticleRequest {
            title: "x".into(),
            questions: vec!["x".into()],
            answer: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Reading: the published version of a bot-visible article, not agents-only or drafts.
    let got = channel
        .get_article(pb::GetArticleRequest {
            article_id: bot.clone(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.version.unwrap().answer,
        "Refund parcel: the full written answer."
    );
    for id in [&internal, &draft] {
        let e = channel
            .get_article(pb::GetArticleRequest {
                article_id: id.clone(),
                version: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{id}: {e:?}");
    }

    // Agents and services keep searching for agents.
    let mut service = rig.client("dialog", &[Role::Service]).await;
    let hits = service
        .search(search(pb::Audience::Agent))
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert!(hits.iter().any(|h| h.article_id == internal), "{hits:?}");
    rig.stop().await;
}

mod production {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_channel_searches_and_reads_only_for_the_bot() {
        super::a_channel_searches_and_reads_only_for_the_bot(super::Rig::production().await).await
    }
}

mod standalone {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_channel_searches_and_reads_only_for_the_bot() {
        super::a_channel_searches_and_reads_only_for_the_bot(super::Rig::standalone().await).await
    }
}
