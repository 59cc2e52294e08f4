//! The knowledge service end to end over gRPC and the bus, on both deployments: PostgreSQL with a
//! real nats-server (throwaway servers from the testkit), and the standalone engine (SQLite and
//! the in-process bus). Every case runs on both through the `both!` macro.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::time::{Duration, Instant};

use tandem_knowledge::Knowledge;
use tandem_platform::auth::{Role, TokenIssuer};
use tandem_platform::bus::memory::MemoryBus;
use tandem_platform::bus::{Bus, Consumer, ConsumerSpec, RawEvent};
use tandem_platform::config::{
    AuthConfig, BusConfig, BusKind, DatabaseConfig, OutboxConfig, Secret, ServiceConfig,
};
use tandem_proto::events::KNOWLEDGE;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1::{HandlerKind, Language};
use tandem_proto::pb::dialog::v1::{BotAction, BotReplied, ConversationResolved};
use tandem_proto::pb::knowledge::v1 as pb;
use tandem_proto::pb::knowledge::v1::knowledge_service_client::KnowledgeServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const SECRET: &str = "knowledge-test-secret-knowledge-test";

type Intercept = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
type Client = KnowledgeServiceClient<InterceptedService<Channel, Intercept>>;

/// A running replica.
struct Replica {
    url: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Running replicas of the knowledge service sharing one database and bus.
struct Rig {
    cfg: ServiceConfig<tandem_knowledge::Settings>,
    memory: Option<MemoryBus>,
    bus: Bus,
    bus_config: BusConfig,
    replicas: Vec<Replica>,
    _keep: Keep,
}

#[allow(dead_code, clippy::large_enum_variant, reason = "held for their Drop")]
enum Keep {
    Servers(tandem_testkit::Postgres, tandem_testkit::NatsServer),
    Dir(tempfile::TempDir),
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
        let url = pg.fresh_database().await.unwrap();
        let bus_config = BusConfig {
            kind: BusKind::Nats,
            nats_url: nats.url(),
            ..BusConfig::default()
        };
        let database = DatabaseConfig {
            url: Secret::new(url),
            schema: "knowledge".into(),
            ..DatabaseConfig::default()
        };
        Self::start(database, bus_config, None, Keep::Servers(pg, nats)).await
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
        let bus_config = BusConfig {
            kind: BusKind::Memory,
            ..BusConfig::default()
        };
        Self::start(database, bus_config, Some(MemoryBus::new()), Keep::Dir(dir)).await
    }

    async fn start(
        database: DatabaseConfig,
        bus_config: BusConfig,
        memory: Option<MemoryBus>,
        keep: Keep,
    ) -> Self {
        let cfg = ServiceConfig {
            auth: auth(),
            database,
            bus: bus_config.clone(),
            outbox: OutboxConfig {
                poll_interval: Duration::from_millis(50),
                ..OutboxConfig::default()
            },
            ..ServiceConfig::default()
        };
        let bus = Bus::connect(&bus_config, memory.as_ref()).await.unwrap();
        bus.ensure_streams().await.unwrap();
        let mut rig = Self {
            cfg,
            memory,
            bus,
            bus_config,
            replicas: Vec::new(),
            _keep: keep,
        };
        rig.add_replica().await;
        rig
    }

    /// Starts one more replica on the same database and bus; returns its index.
    async fn add_replica(&mut self) -> usize {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let server = {
            let (stop, memory, cfg) = (stop.clone(), self.memory.clone(), self.cfg.clone());
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
        self.replicas.push(Replica { url, stop, server });
        let n = self.replicas.len() - 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut c = self.client_of(n, "acme", "admin-1", &[Role::Admin]).await;
            if c.list_articles(pb::ListArticlesRequest::default())
                .await
                .is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "the service did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        n
    }

    async fn client(&self, tenant: &str, subject: &str, roles: &[Role]) -> Client {
        self.client_of(0, tenant, subject, roles).await
    }

    async fn client_of(
        &self,
        replica: usize,
        tenant: &str,
        subject: &str,
        roles: &[Role],
    ) -> Client {
        let issuer = TokenIssuer::from_config(&auth()).unwrap();
        let token = issuer
            .issue(
                &TenantId::new(tenant).unwrap(),
                subject,
                roles,
                Duration::from_secs(600),
            )
            .unwrap();
        let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        let channel = loop {
            match Channel::from_shared(self.replicas[replica].url.clone())
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

    async fn knowledge_events(&self, name: &str) -> Consumer {
        let spec = ConsumerSpec::new(name, &KNOWLEDGE, &self.bus_config)
            .event::<pb::ArticlePublished>()
            .event::<pb::ArticleArchived>()
            .event::<pb::CandidateCreated>();
        self.bus.consumer(&spec).await.unwrap()
    }

    async fn stop(self) {
        for r in self.replicas {
            r.stop.cancel();
            r.server.await.unwrap().unwrap();
        }
    }
}

/// The next knowledge event's type name and payload.
async fn next_event(consumer: &mut Consumer) -> RawEvent {
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("no knowledge event within 10 s")
        .unwrap();
    let event = delivery.event.clone();
    delivery.ack().await.unwrap();
    event
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod production {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Rig::production()).await }) *
        }
        mod standalone {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Rig::standalone()).await }) *
        }
    };
}

both!(
    workflow_versions_audit_and_events,
    bad_input_and_roles_are_refused_and_nothing_is_written,
    search_filters_highlights_and_gaps,
    a_publish_is_searchable_on_every_replica_within_a_second,
    import_and_export_in_every_format,
    a_reimport_with_fewer_columns_keeps_the_articles,
    an_export_without_external_ids_imports_back_without_duplicates,
    resolutions_are_mined_into_candidates_and_reviewed,
    bot_fallbacks_rank_gaps,
);

fn create(
    scenario: &str,
    title: &str,
    questions: &[&str],
    answer: &str,
    visibility: pb::Visibility,
) -> pb::CreateArticleRequest {
    pb::CreateArticleRequest {
        scenario_id: scenario.into(),
        visibility: visibility as i32,
        title: title.into(),
        questions: questions.iter().map(|q| (*q).to_owned()).collect(),
        answer: answer.into(),
        ..Default::default()
    }
}

/// Creates an article as an agent and has a supervisor approve and publish it.
async fn publish_new(rig: &Rig, tenant: &str, req: pb::CreateArticleRequest) -> pb::Article {
    let mut agent = rig.client(tenant, "agent-1", &[Role::Agent]).await;
    let mut lead = rig.client(tenant, "lead-1", &[Role::Supervisor]).await;
    let a = agent
        .create_article(req)
        .await
        .unwrap()
        .into_inner()
        .article
        .unwrap();
    publish_version(&mut agent, &mut lead, &a.id, 1).await
}

async fn publish_version(
    author: &mut Client,
    reviewer: &mut Client,
    article_id: &str,
    version: i32,
) -> pb::Article {
    author
        .submit_for_review(pb::SubmitForReviewRequest {
            article_id: article_id.into(),
            version,
            comment: "please check".into(),
        })
        .await
        .unwrap();
    reviewer
        .approve_version(pb::ApproveVersionRequest {
            article_id: article_id.into(),
            version,
            comment: String::new(),
        })
        .await
        .unwrap();
    reviewer
        .publish_version(pb::PublishVersionRequest {
            article_id: article_id.into(),
            version,
        })
        .await
        .unwrap()
        .into_inner()
        .article
        .unwrap()
}

async fn search(c: &mut Client, query: &str, audience: pb::Audience) -> pb::SearchResponse {
    c.search(pb::SearchRequest {
        query: query.into(),
        audience: audience as i32,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn workflow_versions_audit_and_events(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut events = rig.knowledge_events("test-events").await;
    let mut agent = rig.client("acme", "agent-1", &[Role::Agent]).await;
    let mut lead = rig.client("acme", "lead-1", &[Role::Supervisor]).await;
    let created = agent
        .create_article(pb::CreateArticleRequest {
            external_id: "faq-refund".into(),
            tags: vec!["billing".into()],
            ..create(
                "refund",
                "退款多久到账",
                &["退款多久到账", "退款什么时候到"],
                "退款在审核通过后 3 个工作日内原路退回。",
                pb::Visibility::Both,
            )
        })
        .await
        .unwrap()
        .into_inner();
    let a = created.article.unwrap();
    let v1 = created.version.unwrap();
    assert_eq!(a.status, pb::ArticleStatus::Draft as i32);
    assert_eq!(a.language, Language::Zh as i32, "language detected");
    assert_eq!(v1.status, pb::VersionStatus::Draft as i32);
    assert_eq!(v1.author_id, "agent-1");

    // A draft nobody reviewed cannot be published, and an author cannot review their own work.
    let err = lead
        .publish_version(pb::PublishVersionRequest {
            article_id: a.id.clone(),
            version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("draft"), "{}", err.message());
    agent
        .submit_for_review(pb::SubmitForReviewRequest {
            article_id: a.id.clone(),
            version: 1,
            comment: String::new(),
        })
        .await
        .unwrap();
    let mut self_reviewer = rig
        .client("acme", "agent-1", &[Role::Agent, Role::Supervisor])
        .await;
    let err = self_reviewer
        .approve_version(pb::ApproveVersionRequest {
            article_id: a.id.clone(),
            version: 1,
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = agent
        .approve_version(pb::ApproveVersionRequest {
            article_id: a.id.clone(),
            version: 1,
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "agents do not review");
    let approved = lead
        .approve_version(pb::ApproveVersionRequest {
            article_id: a.id.clone(),
            version: 1,
            comment: "ok".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(approved.status, pb::VersionStatus::Approved as i32);
    assert_eq!(approved.reviewer_id, "lead-1");
    let published = lead
        .publish_version(pb::PublishVersionRequest {
            article_id: a.id.clone(),
            version: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        published.article.as_ref().unwrap().status,
        pb::ArticleStatus::Published as i32
    );
    assert_eq!(published.article.as_ref().unwrap().published_version, 1);
    // Searchable as soon as the publish returns, on the replica that published.
    let hits = search(&mut agent, "退款多久能到账？", pb::Audience::Bot)
        .await
        .hits;
    assert_eq!(
        hits.first().map(|h| h.article_id.as_str()),
        Some(a.id.as_str())
    );
    assert_eq!(hits[0].version, 1);

    let e = next_event(&mut events).await;
    let p = e.decode::<pb::ArticlePublished>().unwrap().event;
    assert_eq!(
        (p.article_id.as_str(), p.version, p.previous_version),
        (a.id.as_str(), 1, 0)
    );
    assert_eq!(p.external_id, "faq-refund");
    assert_eq!(p.actor_id, "lead-1");

    // A new draft needs the latest version as its base.
    let draft = |base: i32| pb::UpdateDraftRequest {
        article_id: a.id.clone(),
        base_version: base,
        title: "退款到账时间".into(),
        questions: vec!["退款多久到账".into(), "退款几天到".into()],
        answer: "退款在审核通过后 1-3 个工作日内原路退回。".into(),
        change_note: "shorter delay".into(),
        ..Default::default()
    };
    let err = agent.update_draft(draft(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    let v2 = agent
        .update_draft(draft(1))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(v2.version, 2);
    agent
        .submit_for_review(pb::SubmitForReviewRequest {
            article_id: a.id.clone(),
            version: 2,
            comment: String::new(),
        })
        .await
        .unwrap();
    let err = lead
        .reject_version(pb::RejectVersionRequest {
            article_id: a.id.clone(),
            version: 2,
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "a rejection needs a reason"
    );
    let rejected = lead
        .reject_version(pb::RejectVersionRequest {
            article_id: a.id.clone(),
            version: 2,
            reason: "keep the 3-day promise".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    assert_eq!(rejected.status, pb::VersionStatus::Rejected as i32);
    assert_eq!(rejected.reject_reason, "keep the 3-day promise");
    // The published version is still the one searched.
    let got = agent
        .get_article(pb::GetArticleRequest {
            article_id: a.id.clone(),
            version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.version.unwrap().version, 1);
    assert_eq!(got.article.unwrap().current_version, 2);

    // Version 3 replaces version 1.
    let v3 = agent
        .update_draft(draft(2))
        .await
        .unwrap()
        .into_inner()
        .version
        .unwrap();
    let art = publish_version(&mut agent, &mut lead, &a.id, v3.version).await;
    assert_eq!(art.published_version, 3);
    let e = next_event(&mut events).await;
    let p = e.decode::<pb::ArticlePublished>().unwrap().event;
    assert_eq!((p.version, p.previous_version), (3, 1));
    let versions = agent
        .list_article_versions(pb::ListArticleVersionsRequest {
            article_id: a.id.clone(),
            page: None,
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    let statuses: Vec<(i32, i32)> = versions.iter().map(|v| (v.version, v.status)).collect();
    assert_eq!(
        statuses,
        vec![
            (3, pb::VersionStatus::Published as i32),
            (2, pb::VersionStatus::Rejected as i32),
            (1, pb::VersionStatus::Superseded as i32),
        ]
    );
    let hits = search(&mut agent, "退款几天到", pb::Audience::Agent)
        .await
        .hits;
    assert_eq!(hits[0].version, 3);

    // Archive: out of search, no more edits, an event with the last published version.
    let archived = lead
        .archive_article(pb::ArchiveArticleRequest {
            article_id: a.id.clone(),
            reason: "policy changed".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .article
        .unwrap();
    assert_eq!(archived.status, pb::ArticleStatus::Archived as i32);
    assert!(
        search(&mut agent, "退款多久到账", pb::Audience::Bot)
            .await
            .hits
            .is_empty()
    );
    let err = agent.update_draft(draft(3)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let e = next_event(&mut events).await;
    let ar = e.decode::<pb::ArticleArchived>().unwrap().event;
    assert_eq!(
        (ar.last_published_version, ar.reason.as_str()),
        (3, "policy changed")
    );

    let trail = agent
        .get_audit_trail(pb::GetAuditTrailRequest {
            article_id: a.id.clone(),
            page: Some(tandem_proto::pb::common::v1::PageRequest {
                page_size: 100,
                page_token: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let actions: Vec<i32> = trail.iter().rev().map(|e| e.action).collect();
    use pb::AuditAction as A;
    assert_eq!(
        actions,
        [
            A::Created,
            A::Submitted,
            A::Approved,
            A::Published,
            A::DraftUpdated,
            A::Submitted,
            A::Rejected,
            A::DraftUpdated,
            A::Submitted,
            A::Approved,
            A::Published,
            A::Archived,
        ]
        .map(|a| a as i32)
    );
    assert_eq!(trail[0].actor_id, "lead-1");
    rig.stop().await;
}

async fn bad_input_and_roles_are_refused_and_nothing_is_written(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut agent = rig.client("acme", "agent-1", &[Role::Agent]).await;
    let ok = create(
        "faq",
        "Title",
        &["question?"],
        "Answer.",
        pb::Visibility::Both,
    );
    let cases: Vec<(pb::CreateArticleRequest, &str)> = vec![
        (
            pb::CreateArticleRequest {
                title: String::new(),
                ..ok.clone()
            },
            "title",
        ),
        (
            pb::CreateArticleRequest {
                questions: vec![],
                ..ok.clone()
            },
            "questions",
        ),
        (
            pb::CreateArticleRequest {
                questions: (0..51).map(|i| format!("q{i}")).collect(),
                ..ok.clone()
            },
            "questions",
        ),
        (
            pb::CreateArticleRequest {
                answer: "x".repeat(20_001),
                ..ok.clone()
            },
            "answer",
        ),
        (
            pb::CreateArticleRequest {
                answer: "   ".into(),
                ..ok.clone()
            },
            "answer",
        ),
        (
            pb::CreateArticleRequest {
                scenario_id: String::new(),
                ..ok.clone()
            },
            "scenario_id",
        ),
        (
            pb::CreateArticleRequest {
                tags: vec!["x".repeat(33)],
                ..ok.clone()
            },
            "tags[0]",
        ),
        (
            pb::CreateArticleRequest {
                title: "a\u{0}b".into(),
                ..ok.clone()
            },
            "title",
        ),
        (
            pb::CreateArticleRequest {
                visibility: 9,
                ..ok.clone()
            },
            "visibility",
        ),
    ];
    for (req, path) in cases {
        let err = agent.create_article(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}: {err:?}");
        assert!(err.message().contains(path), "{path}: {}", err.message());
    }
    let listed = agent
        .list_articles(pb::ListArticlesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .articles;
    assert!(listed.is_empty(), "nothing half-written: {listed:?}");

    // Unknown ids, duplicate external ids.
    let err = agent
        .get_article(pb::GetArticleRequest {
            article_id: "nope".into(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let a = agent
        .create_article(pb::CreateArticleRequest {
            external_id: "ext-1".into(),
            ..ok.clone()
        })
        .await
        .unwrap()
        .into_inner()
        .article
        .unwrap();
    let err = agent
        .create_article(pb::CreateArticleRequest {
            external_id: "ext-1".into(),
            ..ok.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = agent
        .get_article(pb::GetArticleRequest {
            article_id: a.id.clone(),
            version: 7,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = agent
        .submit_for_review(pb::SubmitForReviewRequest {
            article_id: a.id.clone(),
            version: 0,
            comment: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Roles: agents draft but do not publish or archive; channels read nothing.
    let err = agent
        .publish_version(pb::PublishVersionRequest {
            article_id: a.id.clone(),
            version: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = agent
        .archive_article(pb::ArchiveArticleRequest {
            article_id: a.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A channel searches only what the bot may say.
    let mut channel = rig.client("acme", "chan", &[Role::Channel]).await;
    let err = channel
        .search(pb::SearchRequest {
            query: "x".into(),
            audience: pb::Audience::Agent as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Another tenant sees nothing.
    let mut other = rig.client("globex", "agent-9", &[Role::Agent]).await;
    let err = other
        .get_article(pb::GetArticleRequest {
            article_id: a.id.clone(),
            version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Queries: operators and control characters are plain text; bad requests are refused.
    let mut bot = rig.client("acme", "dialog", &[Role::Service]).await;
    for q in [
        "title:\"x\" AND (y OR z)^2 -w*",
        "\u{0}\u{7}退款\t\n",
        "???",
        "[]{}:~",
    ] {
        let out = bot
            .search(pb::SearchRequest {
                query: q.into(),
                audience: pb::Audience::Bot as i32,
                ..Default::default()
            })
            .await;
        assert!(out.is_ok(), "{q:?}: {out:?}");
    }
    for (req, path) in [
        (
            pb::SearchRequest {
                query: "x".into(),
                ..Default::default()
            },
            "audience",
        ),
        (
            pb::SearchRequest {
                query: String::new(),
                audience: 1,
                ..Default::default()
            },
            "query",
        ),
        (
            pb::SearchRequest {
                query: "x".repeat(1_001),
                audience: 1,
                ..Default::default()
            },
            "query",
        ),
        (
            pb::SearchRequest {
                query: "x".into(),
                audience: 1,
                limit: 51,
                ..Default::default()
            },
            "limit",
        ),
    ] {
        let err = bot.search(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}");
        assert!(err.message().contains(path), "{}", err.message());
    }
    rig.stop().await;
}

async fn search_filters_highlights_and_gaps(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let shipping_en = publish_new(
        &rig,
        "acme",
        pb::CreateArticleRequest {
            tags: vec!["logistics".into()],
            ..create(
                "shipping",
                "Delivery time",
                &[
                    "How long does delivery take?",
                    "When will my parcel arrive?",
                ],
                "Standard delivery takes 3 to 5 working days after dispatch.",
                pb::Visibility::Both,
            )
        },
    )
    .await;
    let internal = publish_new(
        &rig,
        "acme",
        create(
            "shipping",
            "Lost parcel procedure",
            &["parcel lost in delivery"],
            "Open a carrier claim in the courier portal, then refund the customer.",
            pb::Visibility::Agents,
        ),
    )
    .await;
    let zh = publish_new(
        &rig,
        "acme",
        create(
            "shipping",
            "发货时间",
            &["什么时候发货", "多久能发货"],
            "下单后 24 小时内发货，节假日顺延。",
            pb::Visibility::Bot,
        ),
    )
    .await;
    let mut bot = rig.client("acme", "dialog", &[Role::Service]).await;
    let mut agent = rig.client("acme", "agent-1", &[Role::Agent]).await;

    let r = search(&mut bot, "how long does delivery take", pb::Audience::Bot).await;
    let hit = &r.hits[0];
    assert_eq!(hit.article_id, shipping_en.id);
    assert_eq!(hit.scenario_id, "shipping");
    assert_eq!(hit.language, Language::En as i32);
    assert_eq!(hit.visibility, pb::Visibility::Both as i32);
    assert!(hit.score > 0.0);
    assert!(!hit.highlights.is_empty(), "{hit:?}");
    let chars: Vec<char> = hit.snippet.chars().collect();
    for span in &hit.highlights {
        let word: String = chars[span.start as usize..span.end as usize]
            .iter()
            .collect();
        assert!(
            ["delivery", "take", "takes", "long", "does", "how"]
                .contains(&word.to_lowercase().as_str()),
            "highlight {word:?} in {:?}",
            hit.snippet
        );
    }
    assert!(
        !r.hits.iter().any(|h| h.article_id == internal.id),
        "agents-only articles never reach the bot"
    );
    let r = search(&mut agent, "parcel lost", pb::Audience::Agent).await;
    assert_eq!(r.hits[0].article_id, internal.id);
    assert_eq!(r.hits[0].visibility, pb::Visibility::Agents as i32);
    let r = search(&mut agent, "什么时候发货", pb::Audience::Agent).await;
    assert!(
        !r.hits.iter().any(|h| h.article_id == zh.id),
        "bot-only article"
    );
    let r = search(&mut bot, "什么时候发货？", pb::Audience::Bot).await;
    assert_eq!(r.hits[0].article_id, zh.id);
    assert_eq!(r.hits[0].language, Language::Zh as i32);
    assert!(!r.hits[0].highlights.is_empty());

    // Filters: scenario, language and tags.
    let filtered = |scenario: &str, language: Language, tags: &[&str]| pb::SearchRequest {
        query: "delivery parcel 发货".into(),
        audience: pb::Audience::Agent as i32,
        scenario_id: scenario.into(),
        language: language as i32,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        limit: 10,
        ..Default::default()
    };
    let ids = |r: pb::SearchResponse| -> Vec<String> {
        r.hits.into_iter().map(|h| h.article_id).collect()
    };
    let all = ids(agent
        .search(filtered("shipping", Language::Unspecified, &[]))
        .await
        .unwrap()
        .into_inner());
    assert_eq!(all.len(), 2, "{all:?}");
    let none = ids(agent
        .search(filtered("billing", Language::Unspecified, &[]))
        .await
        .unwrap()
        .into_inner());
    assert!(none.is_empty());
    let zh_only = ids(agent
        .search(filtered("", Language::Zh, &[]))
        .await
        .unwrap()
        .into_inner());
    assert!(zh_only.is_empty(), "the only Chinese article is bot-only");
    let tagged = ids(agent
        .search(filtered("", Language::Unspecified, &["logistics"]))
        .await
        .unwrap()
        .into_inner());
    assert_eq!(tagged, vec![shipping_en.id.clone()]);

    // Gaps: searches for a conversation with no good answer are recorded and ranked.
    for (i, q) in [
        "can I pay with crypto",
        "Can I pay with   crypto",
        "do you ship to Mars",
        "can i pay with crypto",
    ]
    .iter()
    .enumerate()
    {
        let r = bot
            .search(pb::SearchRequest {
                query: (*q).into(),
                audience: pb::Audience::Bot as i32,
                scenario_id: "shipping".into(),
                conversation_id: format!("conv-{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.gap_recorded, "{q}");
    }
    let good = bot
        .search(pb::SearchRequest {
            query: "how long does delivery take".into(),
            audience: pb::Audience::Bot as i32,
            conversation_id: "conv-9".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!good.gap_recorded, "a good answer is no gap");
    let gaps = agent
        .get_gaps(pb::GetGapsRequest {
            scenario_id: "shipping".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .gaps;
    assert_eq!(gaps.len(), 2, "{gaps:?}");
    assert_eq!(gaps[0].query, "can i pay with crypto");
    assert_eq!(gaps[0].miss_count, 3);
    assert_eq!(gaps[0].example_conversation_ids.len(), 3);
    assert_eq!(gaps[1].miss_count, 1);
    rig.stop().await;
}

async fn a_publish_is_searchable_on_every_replica_within_a_second(rig: impl Future<Output = Rig>) {
    let mut rig = rig.await;
    let second = rig.add_replica().await;
    let mut on_second = rig
        .client_of(second, "acme", "agent-2", &[Role::Agent])
        .await;
    let mut on_first = rig.client("acme", "agent-1", &[Role::Agent]).await;
    for round in 0..3 {
        let word = ["warranty", "invoice", "voucher"][round];
        let started = Instant::now();
        let a = publish_new(
            &rig,
            "acme",
            create(
                "after-sales",
                &format!("{word} policy"),
                &[&format!("how does the {word} work")],
                &format!("The {word} is explained here."),
                pb::Visibility::Both,
            ),
        )
        .await;
        let published_at = Instant::now();
        loop {
            let hits = search(&mut on_second, word, pb::Audience::Agent).await.hits;
            if hits.iter().any(|h| h.article_id == a.id) {
                break;
            }
            assert!(
                published_at.elapsed() < Duration::from_secs(1),
                "round {round}: not searchable on the other replica within 1 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lag = published_at.elapsed();
        assert!(started.elapsed() < Duration::from_secs(10));
        eprintln!("round {round}: searchable on the other replica after {lag:?}");
        // Archive through the second replica; it disappears from the first.
        let mut lead2 = rig
            .client_of(second, "acme", "lead-2", &[Role::Supervisor])
            .await;
        lead2
            .archive_article(pb::ArchiveArticleRequest {
                article_id: a.id.clone(),
                reason: String::new(),
            })
            .await
            .unwrap();
        let archived_at = Instant::now();
        loop {
            let hits = search(&mut on_first, word, pb::Audience::Agent).await.hits;
            if !hits.iter().any(|h| h.article_id == a.id) {
                break;
            }
            assert!(
                archived_at.elapsed() < Duration::from_secs(1),
                "archive not seen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A replica started later rebuilds its index from the database.
    let kept = publish_new(
        &rig,
        "acme",
        create(
            "after-sales",
            "Repair service",
            &["where can I repair my phone"],
            "Bring it to any service centre.",
            pb::Visibility::Both,
        ),
    )
    .await;
    let third = rig.add_replica().await;
    let mut on_third = rig
        .client_of(third, "acme", "agent-3", &[Role::Agent])
        .await;
    let hits = search(&mut on_third, "repair my phone", pb::Audience::Agent)
        .await
        .hits;
    assert_eq!(hits.first().map(|h| h.article_id.clone()), Some(kept.id));
    assert!(
        search(&mut on_third, "warranty", pb::Audience::Agent)
            .await
            .hits
            .is_empty()
    );
    rig.stop().await;
}

async fn import(
    c: &mut Client,
    header: pb::ImportHeader,
    text: &str,
) -> (
    Vec<tandem_proto::pb::common::v1::RowError>,
    pb::ImportSummary,
) {
    use pb::import_articles_request::Part;
    let mut msgs = vec![pb::ImportArticlesRequest {
        part: Some(Part::Header(header)),
    }];
    // Split into small chunks, also inside multi-byte characters.
    for chunk in text.as_bytes().chunks(7) {
        msgs.push(pb::ImportArticlesRequest {
            part: Some(Part::Chunk(chunk.to_vec())),
        });
    }
    let mut out = c
        .import_articles(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let mut errors = Vec::new();
    while let Some(m) = out.message().await.unwrap() {
        match m.event.unwrap() {
            pb::import_articles_response::Event::RowError(e) => errors.push(e),
            pb::import_articles_response::Event::Progress(_) => {}
            pb::import_articles_response::Event::Summary(s) => return (errors, s),
        }
    }
    panic!("the import ended without a summary");
}

async fn export(c: &mut Client, format: pb::ArticleFormat) -> String {
    let mut out = c
        .export_articles(pb::ExportArticlesRequest {
            format: format as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(m) = out.message().await.unwrap() {
        bytes.extend(m.chunk);
    }
    String::from_utf8(bytes).unwrap()
}

async fn import_and_export_in_every_format(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut admin = rig.client("acme", "admin-1", &[Role::Admin]).await;
    let mut lead = rig.client("acme", "lead-1", &[Role::Supervisor]).await;
    let header = |format: pb::ArticleFormat, publish: bool, dry_run: bool| pb::ImportHeader {
        format: format as i32,
        default_scenario_id: "faq".into(),
        publish,
        dry_run,
        ..Default::default()
    };
    let jsonl = "{\"external_id\":\"j1\",\"title\":\"Opening hours\",\"questions\":[\"when are you open\"],\"answer\":\"9 to 5.\",\"tags\":[\"store\"]}\n\
                 this is not json\n\
                 {\"external_id\":\"j2\",\"title\":\"\",\"questions\":[\"q\"],\"answer\":\"a\"}\n\
                 {\"external_id\":\"j3\",\"title\":\"营业时间\",\"questions\":[\"你们几点开门\"],\"answer\":\"早上九点。\",\"visibility\":\"bot\"}\n";
    // Publishing on import is for admins only.
    let err = {
        use pb::import_articles_request::Part;
        lead.import_articles(tokio_stream::iter(vec![pb::ImportArticlesRequest {
            part: Some(Part::Header(header(pb::ArticleFormat::Jsonl, true, false))),
        }]))
        .await
        .unwrap_err()
    };
    assert_eq!(err.code(), Code::PermissionDenied);
    // Dry run: validated, nothing stored.
    let (errors, s) = import(
        &mut admin,
        header(pb::ArticleFormat::Jsonl, true, true),
        jsonl,
    )
    .await;
    assert_eq!(
        (s.rows_read, s.created, s.failed, s.dry_run),
        (4, 2, 2, true)
    );
    assert_eq!(errors.len(), 2);
    assert!(
        search(&mut admin, "open", pb::Audience::Agent)
            .await
            .hits
            .is_empty()
    );
    let (errors, s) = import(
        &mut admin,
        header(pb::ArticleFormat::Jsonl, true, false),
        jsonl,
    )
    .await;
    assert_eq!(
        (s.rows_read, s.created, s.updated, s.failed),
        (4, 2, 0, 2),
        "{errors:?}"
    );
    assert_eq!(errors[0].row_number, 2);
    assert_eq!(
        (errors[1].row_number, errors[1].external_id.as_str()),
        (3, "j2")
    );
    assert_eq!(errors[1].field, "title");
    let hits = search(&mut admin, "你们几点开门", pb::Audience::Bot)
        .await
        .hits;
    assert_eq!(hits.len(), 1, "published at once and searchable");
    // Idempotent by external id: unchanged rows, changed rows become versions.
    let (_, s) = import(
        &mut admin,
        header(pb::ArticleFormat::Jsonl, true, false),
        jsonl,
    )
    .await;
    assert_eq!((s.created, s.unchanged, s.failed), (0, 2, 2));
    let changed = jsonl.replace("9 to 5.", "9 to 6.");
    let (_, s) = import(
        &mut admin,
        header(pb::ArticleFormat::Jsonl, true, false),
        &changed,
    )
    .await;
    assert_eq!((s.created, s.updated, s.unchanged), (0, 1, 1));
    let hits = search(&mut admin, "when are you open", pb::Audience::Agent)
        .await
        .hits;
    assert_eq!(hits[0].version, 2);

    let csv = "external_id,title,questions,answer,tags,language\n\
               c1,Returns,\"how to return|return an item\",\"Use the form, then ship it.\",returns,en\n\
               c2,Broken,q,a,x,klingon\n";
    let (errors, s) = import(&mut lead, header(pb::ArticleFormat::Csv, false, false), csv).await;
    assert_eq!((s.created, s.failed), (1, 1), "{errors:?}");
    assert_eq!(errors[0].field, "language");
    let md = "---\nscenario_id: store\nlanguage: zh\n---\n\
              ## 会员积分\nID: m1\nQ: 积分怎么用\nQ: 积分有效期\n\n积分一年内有效，可抵扣现金。\n\n\
              ## \nQ: no title\nbody\n";
    let (errors, s) = import(
        &mut admin,
        header(pb::ArticleFormat::Markdown, true, false),
        md,
    )
    .await;
    assert_eq!((s.created, s.failed), (1, 1), "{errors:?}");
    let hits = search(&mut admin, "积分有效期", pb::Audience::Bot)
        .await
        .hits;
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].scenario_id, "store");

    // A chunk over the gRPC message limit (1 MiB with framing) is refused with an explanation;
    // the rows of the chunks before it stay imported.
    {
        use pb::import_articles_request::Part;
        let first = "{\"external_id\":\"big-1\",\"title\":\"Before the big chunk\",\"questions\":[\"q\"],\"answer\":\"a\"}\n";
        let msgs = vec![
            pb::ImportArticlesRequest {
                part: Some(Part::Header(header(pb::ArticleFormat::Jsonl, false, false))),
            },
            pb::ImportArticlesRequest {
                part: Some(Part::Chunk(first.as_bytes().to_vec())),
            },
            pb::ImportArticlesRequest {
                part: Some(Part::Chunk(vec![b' '; 1 << 20])),
            },
        ];
        let mut out = admin
            .import_articles(tokio_stream::iter(msgs))
            .await
            .unwrap()
            .into_inner();
        let err = loop {
            match out.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the import of a too large chunk succeeded"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("512 KiB"), "{err:?}");
        assert!(
            err.message().contains("1 rows before were imported"),
            "{err:?}"
        );
    }

    // Export the published articles in each format and import them back: nothing changes.
    for format in [
        pb::ArticleFormat::Jsonl,
        pb::ArticleFormat::Csv,
        pb::ArticleFormat::Markdown,
    ] {
        let text = export(&mut admin, format).await;
        let (errors, s) = import(&mut admin, header(format, true, true), &text).await;
        assert!(errors.is_empty(), "{format:?}: {errors:?}\n{text}");
        assert_eq!((s.rows_read, s.unchanged), (3, 3), "{format:?}\n{text}");
    }
    rig.stop().await;
}

/// The article and its published (or latest) version.
async fn get_article(c: &mut Client, id: &str) -> pb::GetArticleResponse {
    c.get_article(pb::GetArticleRequest {
        article_id: id.into(),
        version: 0,
    })
    .await
    .unwrap()
    .into_inner()
}

/// A row that leaves visibility, tags, scenario or language empty keeps the existing article's
/// (the header's defaults are for new articles); a row naming another scenario or language than
/// its article's fails instead of counting as unchanged.
async fn a_reimport_with_fewer_columns_keeps_the_articles(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut admin = rig.client("acme", "admin-1", &[Role::Admin]).await;
    let header = |format: pb::ArticleFormat, scenario: &str| pb::ImportHeader {
        format: format as i32,
        default_scenario_id: scenario.into(),
        default_visibility: pb::Visibility::Both as i32,
        publish: true,
        ..Default::default()
    };
    let full = "{\"external_id\":\"k1\",\"scenario_id\":\"faq\",\"language\":\"en\",\
                \"visibility\":\"agents\",\"title\":\"Courier hotline\",\
                \"questions\":[\"courier hotline number\"],\
                \"answer\":\"Call 555-0100 (staff only).\",\"tags\":[\"internal\",\"courier\"]}\n";
    let (errors, s) = import(&mut admin, header(pb::ArticleFormat::Jsonl, "faq"), full).await;
    assert_eq!((s.created, s.failed), (1, 0), "{errors:?}");
    let id = admin
        .list_articles(pb::ListArticlesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .articles[0]
        .id
        .clone();
    let check = |a: &pb::Article| {
        assert_eq!(a.visibility, pb::Visibility::Agents as i32, "{a:?}");
        assert_eq!(a.tags, ["internal", "courier"], "{a:?}");
        assert_eq!(a.scenario_id, "faq", "{a:?}");
    };
    // The same content without the visibility, tags, scenario and language columns (and
    // another default scenario): nothing changes.
    let csv = "external_id,title,questions,answer\n\
               k1,Courier hotline,courier hotline number,Call 555-0100 (staff only).\n";
    let (errors, s) = import(&mut admin, header(pb::ArticleFormat::Csv, "other"), csv).await;
    assert_eq!((s.unchanged, s.updated, s.failed), (1, 0, 0), "{errors:?}");
    check(&get_article(&mut admin, &id).await.article.unwrap());
    // New content without those columns: a new version that keeps them.
    let (errors, s) = import(
        &mut admin,
        header(pb::ArticleFormat::Csv, "other"),
        &csv.replace("555-0100", "555-0199"),
    )
    .await;
    assert_eq!((s.updated, s.failed), (1, 0), "{errors:?}");
    let out = get_article(&mut admin, &id).await;
    assert_eq!(out.version.unwrap().version, 2);
    check(&out.article.unwrap());
    let mut bot = rig.client("acme", "dialog", &[Role::Service]).await;
    assert!(
        search(&mut bot, "courier hotline number", pb::Audience::Bot)
            .await
            .hits
            .is_empty(),
        "an internal article reached the bot"
    );
    // Rows naming another scenario or language fail; the article is left alone.
    for (text, field) in [
        (full.replace("\"faq\"", "\"billing\""), "scenario_id"),
        (full.replace("\"en\"", "\"zh\""), "language"),
    ] {
        let (errors, s) = import(&mut admin, header(pb::ArticleFormat::Jsonl, "faq"), &text).await;
        assert_eq!((s.unchanged, s.updated, s.failed), (0, 0, 1), "{errors:?}");
        assert_eq!(errors[0].field, field, "{errors:?}");
        assert!(errors[0].message.contains("k1"), "{errors:?}");
    }
    let out = get_article(&mut admin, &id).await;
    assert_eq!(out.version.unwrap().version, 2);
    check(&out.article.unwrap());
    rig.stop().await;
}

/// What an article is, apart from its ids and history: title, questions, answer, tags,
/// visibility, scenario and language of its published version, sorted by title.
async fn article_contents(
    c: &mut Client,
) -> Vec<(String, Vec<String>, String, Vec<String>, i32, String, i32)> {
    let articles = c
        .list_articles(pb::ListArticlesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .articles;
    let mut out = Vec::new();
    for a in articles {
        let got = get_article(c, &a.id).await;
        let (a, v) = (got.article.unwrap(), got.version.unwrap());
        assert_eq!(v.version, a.published_version, "{a:?}");
        out.push((
            v.title,
            v.questions,
            v.answer,
            a.tags,
            a.visibility,
            a.scenario_id,
            a.language,
        ));
    }
    out.sort();
    out
}

/// Articles created through the API have no external id; their export still imports back into
/// the same tenant without duplicates (twice: nothing changes), and into an empty tenant as the
/// same articles, which a second import and an import of that tenant's own export leave alone.
async fn an_export_without_external_ids_imports_back_without_duplicates(
    rig: impl Future<Output = Rig>,
) {
    let rig = rig.await;
    let with = |mut req: pb::CreateArticleRequest, tags: &[&str], language: Language| {
        req.tags = tags.iter().map(|t| (*t).to_owned()).collect();
        req.language = language as i32;
        req
    };
    let created = [
        with(
            create(
                "faq",
                "Opening hours",
                &["when are you open", "opening times"],
                "9 to 5, \"Monday\" to Friday.\nClosed on holidays.",
                pb::Visibility::Both,
            ),
            &["store", "hours"],
            Language::En,
        ),
        with(
            create(
                "billing",
                "Refund time",
                &["how long does a refund take"],
                "Three days, staff only.",
                pb::Visibility::Agents,
            ),
            &["internal"],
            Language::En,
        ),
        with(
            create(
                "store",
                "会员积分",
                &["积分怎么用", "积分有效期"],
                "积分一年内有效，可抵扣现金。",
                pb::Visibility::Bot,
            ),
            &[],
            Language::Zh,
        ),
    ];
    for req in created {
        let a = publish_new(&rig, "acme", req).await;
        assert!(a.external_id.is_empty(), "{a:?}");
    }
    let mut acme = rig.client("acme", "admin-1", &[Role::Admin]).await;
    let mut globex = rig.client("globex", "admin-1", &[Role::Admin]).await;
    let original = article_contents(&mut acme).await;
    assert_eq!(original.len(), 3);
    let header = |format: pb::ArticleFormat| pb::ImportHeader {
        format: format as i32,
        default_scenario_id: "other".into(),
        publish: true,
        ..Default::default()
    };
    for format in [
        pb::ArticleFormat::Jsonl,
        pb::ArticleFormat::Csv,
        pb::ArticleFormat::Markdown,
    ] {
        let text = export(&mut acme, format).await;
        // Into the same tenant, twice: every row matches its article, nothing changes.
        for _ in 0..2 {
            let (errors, s) = import(&mut acme, header(format), &text).await;
            assert!(errors.is_empty(), "{format:?}: {errors:?}\n{text}");
            assert_eq!(
                (s.rows_read, s.created, s.updated, s.unchanged),
                (3, 0, 0, 3),
                "{format:?}\n{text}"
            );
            assert_eq!(article_contents(&mut acme).await, original, "{format:?}");
        }
    }
    // Into an empty tenant: the same articles, and a second import changes nothing.
    let text = export(&mut acme, pb::ArticleFormat::Jsonl).await;
    let (errors, s) = import(&mut globex, header(pb::ArticleFormat::Jsonl), &text).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!((s.created, s.updated, s.unchanged), (3, 0, 0));
    assert_eq!(article_contents(&mut globex).await, original);
    for format in [
        pb::ArticleFormat::Jsonl,
        pb::ArticleFormat::Csv,
        pb::ArticleFormat::Markdown,
    ] {
        let text = export(&mut acme, format).await;
        let (errors, s) = import(&mut globex, header(format), &text).await;
        assert!(errors.is_empty(), "{format:?}: {errors:?}");
        assert_eq!((s.created, s.updated, s.unchanged), (0, 0, 3), "{format:?}");
        assert_eq!(article_contents(&mut globex).await, original, "{format:?}");
    }
    // The other tenant's export names the articles by the same keys: back in the first tenant,
    // nothing changes.
    let text = export(&mut globex, pb::ArticleFormat::Csv).await;
    let (errors, s) = import(&mut acme, header(pb::ArticleFormat::Csv), &text).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!((s.created, s.updated, s.unchanged), (0, 0, 3), "{text}");
    assert_eq!(article_contents(&mut acme).await, original);
    rig.stop().await;
}

fn resolved(conversation: &str, agent: &str, question: &str, answer: &str) -> ConversationResolved {
    ConversationResolved {
        conversation_id: conversation.into(),
        scenario_id: "shipping".into(),
        resolved_by: HandlerKind::Agent as i32,
        agent_id: agent.into(),
        customer_question: question.into(),
        agent_answers: vec![answer.into()],
        ..Default::default()
    }
}

async fn resolutions_are_mined_into_candidates_and_reviewed(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut events = rig.knowledge_events("test-mining").await;
    let existing = publish_new(
        &rig,
        "acme",
        create(
            "shipping",
            "Delivery time",
            &["how long does delivery take"],
            "Delivery takes 3 to 5 working days.",
            pb::Visibility::Both,
        ),
    )
    .await;
    let tenant = TenantId::new("acme").unwrap();
    let mut batch = vec![
        resolved(
            "c1",
            "ag-1",
            "Can I change my delivery address?",
            "Yes, in My orders before dispatch.",
        ),
        resolved(
            "c2",
            "ag-2",
            "can I change my delivery address",
            "Yes, before the parcel is dispatched.",
        ),
        resolved(
            "c3",
            "ag-1",
            "how long does delivery take to Berlin",
            "Delivery to Berlin takes 2 days.",
        ),
        ConversationResolved {
            resolved_by: HandlerKind::Bot as i32,
            ..resolved("c4", "", "is there a bot only question", "bot answer")
        },
        resolved(
            "c5",
            "ag-3",
            "修改收货地址怎么操作",
            "在我的订单里修改收货地址。",
        ),
        // Near duplicates join the pending candidates above.
        resolved(
            "c6",
            "ag-4",
            "How can I change the delivery address",
            "Before dispatch, in My orders.",
        ),
        resolved("c7", "ag-3", "怎么修改收货地址", "在订单详情里修改。"),
    ]
    .into_iter()
    .map(|e| RawEvent::new(&tenant, &e, Some(e.conversation_id.clone())))
    .collect::<Vec<_>>();
    // A redelivered event is not counted twice.
    batch.push(batch[0].clone());
    rig.bus.publish_batch(&batch).await.unwrap();
    let mut lead = rig.client("acme", "lead-1", &[Role::Supervisor]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let candidates = loop {
        let list = lead
            .list_candidates(pb::ListCandidatesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .candidates;
        if list.len() >= 3 && list.iter().map(|c| c.source_count).sum::<i32>() >= 6 {
            break list;
        }
        assert!(Instant::now() < deadline, "candidates not mined: {list:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(candidates.len(), 3, "{candidates:?}");
    let merged = &candidates[0];
    assert_eq!(merged.source_count, 3, "duplicates merged: {candidates:?}");
    assert_eq!(merged.kind, pb::CandidateKind::NewArticle as i32);
    // Resolutions are handled concurrently: the order of the provenance may vary.
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let prov = merged.provenance.clone().unwrap();
    assert_eq!(sorted(prov.conversation_ids), vec!["c1", "c2", "c6"]);
    assert_eq!(sorted(prov.agent_ids), vec!["ag-1", "ag-2", "ag-4"]);
    let edit = candidates
        .iter()
        .find(|c| c.kind == pb::CandidateKind::EditProposal as i32)
        .unwrap_or_else(|| panic!("no edit proposal: {candidates:?}"));
    assert_eq!(edit.target_article_id, existing.id);
    assert_eq!(edit.target_version, 1);
    assert!(
        edit.similarity > 0.3 && edit.similarity <= 1.0,
        "{}",
        edit.similarity
    );
    let zh = candidates
        .iter()
        .find(|c| c.language == Language::Zh as i32)
        .expect("a Chinese candidate");
    assert_eq!(zh.source_count, 2, "{zh:?}");
    assert_eq!(
        zh.provenance.as_ref().unwrap().conversation_ids,
        vec!["c5", "c7"]
    );
    let mut created = 0;
    for _ in 0..3 {
        let e = next_event(&mut events).await;
        if e.type_name == "tandem.knowledge.v1.CandidateCreated" {
            created += 1;
        }
    }
    assert!(created >= 2, "CandidateCreated events");

    // Review: reject needs a reason; approve-and-publish makes it searchable; a merge adds a
    // question variant as a draft; a reviewed candidate cannot be reviewed again.
    let review = |id: &str, decision: pb::CandidateDecision| pb::ReviewCandidateRequest {
        candidate_id: id.into(),
        decision: decision as i32,
        ..Default::default()
    };
    let err = lead
        .review_candidate(review(&zh.id, pb::CandidateDecision::Reject))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let out = lead
        .review_candidate(pb::ReviewCandidateRequest {
            title: "Change the delivery address".into(),
            ..review(&merged.id, pb::CandidateDecision::ApproveAndPublish)
        })
        .await
        .unwrap()
        .into_inner();
    let article = out.article.unwrap();
    assert_eq!(article.status, pb::ArticleStatus::Published as i32);
    assert_eq!(out.version.unwrap().source_candidate_id, merged.id);
    assert_eq!(
        out.candidate.unwrap().status,
        pb::CandidateStatus::Approved as i32
    );
    let mut agent = rig.client("acme", "agent-1", &[Role::Agent]).await;
    let hits = search(&mut agent, "change delivery address", pb::Audience::Agent)
        .await
        .hits;
    assert_eq!(hits[0].article_id, article.id);
    let out = lead
        .review_candidate(review(&edit.id, pb::CandidateDecision::Merge))
        .await
        .unwrap()
        .into_inner();
    let v = out.version.unwrap();
    assert_eq!((v.version, v.status), (2, pb::VersionStatus::Draft as i32));
    assert_eq!(v.questions.len(), 2);
    assert_eq!(v.answer, "Delivery takes 3 to 5 working days.");
    let err = lead
        .review_candidate(pb::ReviewCandidateRequest {
            reason: "second thoughts".into(),
            ..review(&edit.id, pb::CandidateDecision::Reject)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let out = lead
        .review_candidate(pb::ReviewCandidateRequest {
            reason: "too specific".into(),
            ..review(&zh.id, pb::CandidateDecision::Reject)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        out.candidate.unwrap().status,
        pb::CandidateStatus::Rejected as i32
    );
    let pending = lead
        .list_candidates(pb::ListCandidatesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .candidates;
    assert!(pending.is_empty(), "{pending:?}");
    rig.stop().await;
}

async fn shipping_gaps(agent: &mut Client) -> Vec<pb::Gap> {
    agent
        .get_gaps(pb::GetGapsRequest {
            scenario_id: "shipping".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .gaps
}

fn replied(conversation: &str, action: BotAction) -> BotReplied {
    BotReplied {
        conversation_id: conversation.into(),
        scenario_id: "shipping".into(),
        action: action as i32,
        language: Language::En as i32,
        ..Default::default()
    }
}

async fn bot_fallbacks_rank_gaps(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut bot = rig.client("acme", "dialog", &[Role::Service]).await;
    for (conversation, query) in [
        ("conv-a", "do you ship to Mars"),
        ("conv-b", "can I pay with crypto"),
    ] {
        let r = bot
            .search(pb::SearchRequest {
                query: query.into(),
                audience: pb::Audience::Bot as i32,
                scenario_id: "shipping".into(),
                conversation_id: conversation.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.gap_recorded, "{query}");
    }
    let tenant = TenantId::new("acme").unwrap();
    let cited = BotReplied {
        articles: vec![tandem_proto::pb::common::v1::ArticleRef {
            article_id: "a-1".into(),
            version: 1,
            ..Default::default()
        }],
        ..replied("conv-b", BotAction::Handoff)
    };
    let mut batch: Vec<RawEvent> = [
        // Two fallbacks and a handoff without an answer in the conversation that missed.
        replied("conv-a", BotAction::Fallback),
        replied("conv-a", BotAction::Fallback),
        replied("conv-a", BotAction::Handoff),
        // A fallback in a conversation that recorded no query counts for its scenario.
        replied("conv-c", BotAction::Fallback),
        // Not counted: a handoff with no recorded query, answers, a handoff citing an article,
        // a test conversation.
        replied("conv-d", BotAction::Handoff),
        replied("conv-b", BotAction::Answer),
        cited,
        BotReplied {
            test: true,
            ..replied("conv-b", BotAction::Fallback)
        },
    ]
    .iter()
    .map(|e| RawEvent::new(&tenant, e, Some(e.conversation_id.clone())))
    .collect();
    // A redelivered event counts once.
    batch.push(batch[0].clone());
    rig.bus.publish_batch(&batch).await.unwrap();
    let mut agent = rig.client("acme", "agent-1", &[Role::Agent]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = shipping_gaps(&mut agent).await;
        if list.iter().map(|g| g.fallback_count).sum::<i64>() >= 4 {
            break;
        }
        assert!(Instant::now() < deadline, "fallbacks not counted: {list:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let anything counted twice show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let list = shipping_gaps(&mut agent).await;
    assert_eq!(list.len(), 3, "{list:?}");
    assert_eq!(list[0].query, "do you ship to mars", "{list:?}");
    assert_eq!((list[0].miss_count, list[0].fallback_count), (1, 3));
    assert_eq!(list[0].example_conversation_ids, vec!["conv-a"]);
    let crypto = list
        .iter()
        .find(|g| g.query == "can i pay with crypto")
        .unwrap();
    assert_eq!((crypto.miss_count, crypto.fallback_count), (1, 0));
    let unlinked = list.iter().find(|g| g.query.is_empty()).unwrap();
    assert_eq!((unlinked.miss_count, unlinked.fallback_count), (0, 1));
    assert_eq!(unlinked.example_conversation_ids, vec!["conv-c"]);
    assert_eq!(unlinked.language, Language::En as i32);
    rig.stop().await;
}
