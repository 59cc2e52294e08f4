//! While the search index's writer cannot be recovered, the gRPC health service reports the
//! knowledge service NOT_SERVING, and SERVING again once a recovery succeeds; the writer metrics
//! follow. The service is served as in a deployment, on PostgreSQL with a real nats-server
//! (throwaway servers from the testkit) and on the standalone engine (SQLite and the in-process
//! bus); health is read with a gRPC health client over TCP.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tandem_knowledge::Knowledge;
use tandem_knowledge::freshness::{
    INDEX_RECOVERIES_TOTAL, INDEX_WRITER_FAILURES_TOTAL, INDEX_WRITER_UP, Indexer,
};
use tandem_platform::auth::Role;
use tandem_platform::config::{ConfigError, Validate};
use tandem_platform::db::Migrations;
use tandem_platform::runtime::{Service, StartContext};
use tandem_platform::testing::{Intercept, ServiceRig};
use tandem_proto::pb::knowledge::v1 as pb;
use tandem_proto::pb::knowledge::v1::knowledge_service_client::KnowledgeServiceClient;
use tandem_proto::pb::knowledge::v1::knowledge_service_server::SERVICE_NAME;
use tandem_search::Fault;
use tonic::Streaming;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

type Client = KnowledgeServiceClient<InterceptedService<Channel, Intercept>>;

/// Failed recovery attempts the injected faults are enough for: far more than happen before
/// the test clears them (the backoff doubles from 100 ms).
const HELD_ATTEMPTS: usize = 20;

/// The knowledge service, handing the test its indexer.
struct Observed;

/// The knowledge service's settings, and where its indexer is handed over.
#[derive(Clone, Default, Serialize, Deserialize)]
struct ObservedSettings {
    knowledge: tandem_knowledge::Settings,
    #[serde(skip)]
    indexer: Arc<OnceLock<Arc<Indexer>>>,
}

impl Validate for ObservedSettings {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        self.knowledge.validate(path, errors);
    }
}

impl Service for Observed {
    const NAME: &'static str = Knowledge::NAME;
    type Settings = ObservedSettings;

    fn migrations() -> Migrations {
        Knowledge::migrations()
    }

    async fn start(ctx: StartContext<'_>, settings: &ObservedSettings) -> anyhow::Result<()> {
        let indexer = Knowledge::start_replica(ctx, &settings.knowledge).await?;
        settings
            .indexer
            .set(indexer)
            .map_err(|_| anyhow::anyhow!("started twice"))
    }
}

/// The process's metrics, read from a Prometheus recorder installed on first use.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| PrometheusBuilder::new().install_recorder().unwrap())
}

/// The value of a metric without labels; 0 before it is first recorded.
fn metric(name: &str) -> f64 {
    recorder()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The health the service reports now.
async fn status(health: &mut HealthClient<Channel>) -> ServingStatus {
    health
        .check(HealthCheckRequest {
            service: SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// The next health the service reports on `watch`, waiting at most 10 s.
async fn next_status(watch: &mut Streaming<HealthCheckResponse>) -> ServingStatus {
    tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("no change of health within 10 s")
        .unwrap()
        .unwrap()
        .status()
}

/// Creates an article as an agent and has a supervisor approve and publish it.
async fn publish(agent: &mut Client, lead: &mut Client, title: &str, question: &str) {
    let article = agent
        .create_article(pb::CreateArticleRequest {
            scenario_id: "faq".into(),
            visibility: pb::Visibility::Both as i32,
            title: title.into(),
            questions: vec![question.into()],
            answer: format!("The answer about {title}."),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .article
        .unwrap();
    agent
        .submit_for_review(pb::SubmitForReviewRequest {
            article_id: article.id.clone(),
            version: 1,
            comment: String::new(),
        })
        .await
        .unwrap();
    lead.approve_version(pb::ApproveVersionRequest {
        article_id: article.id.clone(),
        version: 1,
        comment: String::new(),
    })
    .await
    .unwrap();
    lead.publish_version(pb::PublishVersionRequest {
        article_id: article.id,
        version: 1,
    })
    .await
    .unwrap();
}

/// The title of the best hit.
async fn top(agent: &mut Client, query: &str) -> Option<String> {
    agent
        .search(pb::SearchRequest {
            query: query.into(),
            audience: pb::Audience::Agent as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hits
        .into_iter()
        .map(|h| h.title)
        .next()
}

async fn health_is_not_serving_until_the_index_writer_is_recovered(
    rig: impl Future<Output = ServiceRig>,
    indexer: &OnceLock<Arc<Indexer>>,
) {
    // The recorder is global: one replica at a time, so that its metrics are this test's.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = ONE_AT_A_TIME.lock().await;
    recorder();
    let rig = rig.await;
    let indexer = Arc::clone(indexer.get().unwrap());
    let mut health = HealthClient::new(rig.channel().await);
    let (channel, bearer) = rig.authorised("acme", "agent-1", &[Role::Agent]).await;
    let mut agent = KnowledgeServiceClient::with_interceptor(channel, bearer);
    let (channel, bearer) = rig.authorised("acme", "lead-1", &[Role::Supervisor]).await;
    let mut lead = KnowledgeServiceClient::with_interceptor(channel, bearer);

    assert_eq!(status(&mut health).await, ServingStatus::Serving);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
    assert_eq!(metric(INDEX_WRITER_UP), 1.0);
    let failures = metric(INDEX_WRITER_FAILURES_TOTAL);
    let recoveries = metric(INDEX_RECOVERIES_TOTAL);
    publish(
        &mut agent,
        &mut lead,
        "Parcel lockers",
        "can I use a parcel locker",
    )
    .await;
    assert_eq!(
        top(&mut agent, "parcel locker").await.as_deref(),
        Some("Parcel lockers")
    );

    // The commit of the next publish fails, and so does the rebuild of every recovery attempt
    // until the faults are cleared.
    for _ in 0..=HELD_ATTEMPTS {
        indexer.index().inject_fault(Fault::CommitError);
    }
    publish(
        &mut agent,
        &mut lead,
        "Gift wrapping",
        "do you offer gift wrapping",
    )
    .await;
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    assert_eq!(status(&mut health).await, ServingStatus::NotServing);
    assert!(indexer.index().writer_failure().is_some());
    assert_eq!(metric(INDEX_WRITER_UP), 0.0);
    assert_eq!(metric(INDEX_WRITER_FAILURES_TOTAL), failures + 1.0);
    assert_eq!(metric(INDEX_RECOVERIES_TOTAL), recoveries);
    assert_eq!(indexer.recoveries(), 0);
    // Searches answer from the last commit meanwhile.
    assert_eq!(
        top(&mut agent, "parcel locker").await.as_deref(),
        Some("Parcel lockers")
    );

    // The next attempt, after the backoff, succeeds.
    indexer.index().clear_faults();
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
    assert_eq!(status(&mut health).await, ServingStatus::Serving);
    assert_eq!(indexer.index().writer_failure(), None);
    assert_eq!((indexer.writer_failures(), indexer.recoveries()), (1, 1));
    assert_eq!(metric(INDEX_WRITER_UP), 1.0);
    assert_eq!(metric(INDEX_WRITER_FAILURES_TOTAL), failures + 1.0);
    assert_eq!(metric(INDEX_RECOVERIES_TOTAL), recoveries + 1.0);
    publish(
        &mut agent,
        &mut lead,
        "Store pickup",
        "can I pick up in a store",
    )
    .await;
    for (query, title) in [
        ("parcel locker", "Parcel lockers"),
        ("offer gift wrapping", "Gift wrapping"),
        ("pick up in a store", "Store pickup"),
    ] {
        assert_eq!(
            top(&mut agent, query).await.as_deref(),
            Some(title),
            "{query}"
        );
    }
    assert_eq!(status(&mut health).await, ServingStatus::Serving);
    // An open watch would hold the drain until its timeout.
    drop(watch);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_health_is_not_serving_until_the_index_writer_is_recovered() {
    let settings = ObservedSettings::default();
    let indexer = Arc::clone(&settings.indexer);
    health_is_not_serving_until_the_index_writer_is_recovered(
        ServiceRig::production::<Observed>(settings),
        &indexer,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_health_is_not_serving_until_the_index_writer_is_recovered() {
    let settings = ObservedSettings::default();
    let indexer = Arc::clone(&settings.indexer);
    health_is_not_serving_until_the_index_writer_is_recovered(
        ServiceRig::standalone::<Observed>(settings),
        &indexer,
    )
    .await;
}
