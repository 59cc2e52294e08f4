//! The knowledge service: the shared knowledge base: articles, versions, review workflow,
//! near-real-time search, mining.
//!
//! Layout:
//! - `app`: use cases (article workflow, search with gap recording, mining, candidate review);
//! - `store`: PostgreSQL and SQLite persistence, written once for both;
//! - `freshness`: the replica's in-memory search index, rebuilt at start and kept current from
//!   the database's change feed;
//! - `formats`: JSON lines, CSV and Markdown article files;
//! - `grpc`: the `KnowledgeService` adapter;
//! - `import`: the streaming import, written in chunks of rows;
//! - this module: settings, wiring, the consumer of human resolutions that feeds mining, the
//!   consumer of bot turns that counts fallbacks in the gaps, and feed pruning.

pub mod app;
pub mod formats;
pub mod freshness;
pub mod grpc;
pub mod import;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_platform::auth::AuthInterceptor;
use tandem_platform::bus::runner::{self, Handler, HandlerError, RunOptions};
use tandem_platform::bus::{ConsumerSpec, RawEvent};
use tandem_platform::config::{ConfigError, Validate};
use tandem_platform::db::Migrations;
use tandem_platform::error::DisplayChain;
use tandem_platform::runtime::{Service, StartContext};
use tandem_proto::events::DIALOG;
use tandem_proto::pb::dialog::v1::{BotReplied, ConversationResolved};
use tandem_proto::pb::knowledge::v1::knowledge_service_server::KnowledgeServiceServer;
use tandem_search::{IndexConfig, SearchIndex};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use crate::app::{App, AppOptions};
use crate::freshness::Indexer;
use crate::store::Store;

/// The gRPC services this service exposes.
pub const GRPC_SERVICES: &[&str] =
    &[tandem_proto::pb::knowledge::v1::knowledge_service_server::SERVICE_NAME];

/// The durable consumer of resolutions.
const MINING_CONSUMER: &str = "knowledge-mining";
/// The durable consumer of bot turns, which counts fallbacks in the gaps.
const FALLBACK_CONSUMER: &str = "knowledge-fallbacks";

/// Settings of the knowledge service, under `[service]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How often a replica reads the change feed for publishes and archives made elsewhere.
    #[serde(with = "humantime_serde")]
    pub feed_poll_interval: Duration,
    /// How long change-feed rows are kept; a replica that falls further behind rebuilds its
    /// index from the database.
    #[serde(with = "humantime_serde")]
    pub feed_retention: Duration,
    /// Longest time an accepted index write waits for its commit.
    #[serde(with = "humantime_serde")]
    pub index_commit_interval: Duration,
    /// A search whose best BM25 score is below this counts as having no good answer.
    pub good_result_score: f32,
    /// A mined question whose best published match scores at least this (BM25) and is similar
    /// enough (`edit_proposal_similarity`) becomes an edit proposal for that article instead of
    /// a new-article candidate.
    pub edit_proposal_score: f32,
    /// Least share of terms (Jaccard, 0..1) a mined question shares with the matched question of
    /// an article for an edit proposal.
    pub edit_proposal_similarity: f64,
    /// Least similarity (Jaccard, 0..1, over analysed terms and, for Chinese, character bigrams)
    /// of a mined question with a pending candidate's question for the two to be merged.
    pub duplicate_similarity: f64,
    /// How long a mined candidate waits for review before it expires.
    #[serde(with = "humantime_serde")]
    pub candidate_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        let app = AppOptions::default();
        Self {
            feed_poll_interval: Duration::from_millis(150),
            feed_retention: Duration::from_secs(3_600),
            index_commit_interval: Duration::from_millis(100),
            good_result_score: app.good_result_score,
            edit_proposal_score: app.edit_proposal_score,
            edit_proposal_similarity: app.edit_proposal_similarity,
            duplicate_similarity: app.duplicate_similarity,
            candidate_ttl: app.candidate_ttl,
        }
    }
}

impl Validate for Settings {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        if self.feed_poll_interval < Duration::from_millis(10)
            || self.feed_poll_interval > Duration::from_millis(800)
        {
            errors.push(ConfigError::new(
                format!("{path}.feed_poll_interval"),
                "must be between 10ms and 800ms so publishes are searchable within a second",
            ));
        }
        if self.feed_retention < Duration::from_secs(60) {
            errors.push(ConfigError::new(
                format!("{path}.feed_retention"),
                "must be at least 1m",
            ));
        }
        if self.index_commit_interval < Duration::from_millis(1)
            || self.index_commit_interval > Duration::from_millis(500)
        {
            errors.push(ConfigError::new(
                format!("{path}.index_commit_interval"),
                "must be between 1ms and 500ms",
            ));
        }
        for (name, v) in [
            ("good_result_score", self.good_result_score),
            ("edit_proposal_score", self.edit_proposal_score),
        ] {
            if !v.is_finite() || v <= 0.0 {
                errors.push(ConfigError::new(
                    format!("{path}.{name}"),
                    "must be a positive number",
                ));
            }
        }
        for (name, v) in [
            ("edit_proposal_similarity", self.edit_proposal_similarity),
            ("duplicate_similarity", self.duplicate_similarity),
        ] {
            if !(0.0..=1.0).contains(&v) {
                errors.push(ConfigError::new(
                    format!("{path}.{name}"),
                    "must be between 0 and 1",
                ));
            }
        }
        if self.candidate_ttl < Duration::from_secs(3_600) {
            errors.push(ConfigError::new(
                format!("{path}.candidate_ttl"),
                "must be at least 1h",
            ));
        }
    }
}

/// The knowledge service.
pub struct Knowledge;

impl Service for Knowledge {
    const NAME: &'static str = "knowledge";
    type Settings = Settings;

    fn migrations() -> Migrations {
        Migrations {
            postgres: sqlx::migrate!("./migrations/postgres"),
            sqlite: sqlx::migrate!("./migrations/sqlite"),
        }
    }

    async fn start(ctx: StartContext<'_>, settings: &Settings) -> anyhow::Result<()> {
        Self::start_replica(ctx, settings).await.map(drop)
    }
}

impl Knowledge {
    /// Does what [`Service::start`] does and returns the replica's indexer, so that a test can
    /// reach the search index of a service served as in a deployment (to inject faults).
    pub async fn start_replica(
        ctx: StartContext<'_>,
        settings: &Settings,
    ) -> anyhow::Result<Arc<Indexer>> {
        let store = Store::new(ctx.db.clone());
        let index = SearchIndex::in_ram(IndexConfig {
            commit_interval: settings.index_commit_interval,
            good_result_score: settings.good_result_score,
            ..IndexConfig::default()
        })?;
        freshness::describe_metrics();
        let indexer = Arc::new(Indexer::start(Arc::new(index), store.clone()).await?);
        indexer.report_health(
            ctx.server.health(),
            tandem_proto::pb::knowledge::v1::knowledge_service_server::SERVICE_NAME,
            ctx.shutdown.clone(),
        );
        let app = Arc::new(App::new(
            store,
            ctx.outbox.clone(),
            Arc::clone(&indexer),
            AppOptions {
                good_result_score: settings.good_result_score,
                edit_proposal_score: settings.edit_proposal_score,
                edit_proposal_similarity: settings.edit_proposal_similarity,
                duplicate_similarity: settings.duplicate_similarity,
                candidate_ttl: settings.candidate_ttl,
                ..AppOptions::default()
            },
        ));
        ctx.server.add_service(InterceptedService::new(
            tandem_platform::limited!(
                KnowledgeServiceServer::new(grpc::KnowledgeGrpc::new(Arc::clone(&app))),
                ctx.grpc_config
            ),
            AuthInterceptor::new(Arc::clone(&ctx.auth)),
        ));
        ctx.tracker
            .spawn(Arc::clone(&indexer).poll(settings.feed_poll_interval, ctx.shutdown.clone()));
        let spec = ConsumerSpec::new(MINING_CONSUMER, &DIALOG, &ctx.bus_config)
            .event::<ConversationResolved>();
        let consumer = ctx.bus.consumer(&spec).await?;
        ctx.tracker.spawn(runner::run(
            consumer,
            Mining {
                app: Arc::clone(&app),
            },
            RunOptions::new(MINING_CONSUMER),
            ctx.shutdown.clone(),
        ));
        let spec =
            ConsumerSpec::new(FALLBACK_CONSUMER, &DIALOG, &ctx.bus_config).event::<BotReplied>();
        let consumer = ctx.bus.consumer(&spec).await?;
        ctx.tracker.spawn(runner::run(
            consumer,
            Fallbacks {
                app: Arc::clone(&app),
            },
            RunOptions::new(FALLBACK_CONSUMER),
            ctx.shutdown.clone(),
        ));
        ctx.tracker.spawn(prune_feed(
            Arc::clone(&app),
            settings.feed_retention,
            ctx.shutdown.clone(),
        ));
        ctx.tracker
            .spawn(expire_candidates(app, ctx.shutdown.clone()));
        Ok(indexer)
    }
}

/// Expires candidates not reviewed in time, forgets week-old gap queries of conversations and
/// deletes gaps not seen for [`app::GAP_RETENTION`], hourly.
async fn expire_candidates(app: Arc<App>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(3_600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match app.expire_candidates().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "candidates expired"),
            Err(e) => tracing::warn!(error = %DisplayChain(&e), "expiring candidates failed"),
        }
        if let Err(e) = app.prune_gap_links().await {
            tracing::warn!(error = %DisplayChain(&e), "forgetting old gap queries failed");
        }
        match app.prune_gaps().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "old gaps deleted"),
            Err(e) => tracing::warn!(error = %DisplayChain(&e), "deleting old gaps failed"),
        }
    }
}

/// Prunes the change feed of rows older than `retention`, every tenth of it (at most every
/// minute). Every replica prunes; the work is idempotent.
async fn prune_feed(app: Arc<App>, retention: Duration, shutdown: CancellationToken) {
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let keep = i64::try_from(retention.as_micros()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let before = tandem_platform::db::now_micros().saturating_sub(keep);
        match app.store().prune_changes(before).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "change feed pruned"),
            Err(e) => tracing::warn!(error = %DisplayChain(&e), "pruning the change feed failed"),
        }
    }
}

/// Turns human resolutions into candidates.
struct Mining {
    app: Arc<App>,
}

impl Handler for Mining {
    async fn handle(&self, event: &RawEvent) -> Result<(), HandlerError> {
        let resolved = event.decode::<ConversationResolved>()?.event;
        self.app
            .mine(&event.tenant, MINING_CONSUMER, &event.id, &resolved)
            .await
            .map(|_| ())
            .map_err(|e| HandlerError::Transient(DisplayChain(&e).to_string()))
    }
}

/// Counts the bot's fallbacks in the gaps.
struct Fallbacks {
    app: Arc<App>,
}

impl Handler for Fallbacks {
    async fn handle(&self, event: &RawEvent) -> Result<(), HandlerError> {
        let replied = event.decode::<BotReplied>()?.event;
        self.app
            .record_fallback(&event.tenant, FALLBACK_CONSUMER, &event.id, &replied)
            .await
            .map(|_| ())
            .map_err(|e| HandlerError::Transient(DisplayChain(&e).to_string()))
    }
}
