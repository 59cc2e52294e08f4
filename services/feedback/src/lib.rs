//! The feedback service: feedback from every channel, metrics computed from the event streams,
//! common problems and alerts.
//!
//! Layout:
//! - [`domain`]: pure rules: facts merged from events in any order, rollup contributions,
//!   feedback validation, metric queries, alert rules, problem clustering, import formats.
//! - [`app`]: use cases over the store and the outbox.
//! - [`adapters`]: [`adapters::sql`] (PostgreSQL and SQLite), [`adapters::bus`] (the dialog and
//!   routing consumers), [`adapters::grpc`] (`FeedbackService`).
//! - [`metrics`]: Prometheus metric names.
//!
//! Metric definitions are published in `docs/metrics.md`. The service reads only its own tables
//! and learns about conversations only from events.

pub mod adapters;
pub mod app;
pub mod domain;
pub mod metrics;
pub mod writer;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_platform::auth::AuthInterceptor;
use tandem_platform::bus::runner::{self, RunOptions};
use tandem_platform::config::{ConfigError, Validate, join};
use tandem_platform::db::Migrations;
use tandem_platform::runtime::{Service, StartContext};
use tandem_proto::pb::feedback::v1::feedback_service_server::FeedbackServiceServer;
use tonic::service::interceptor::InterceptedService;

use crate::adapters::bus::{
    DIALOG_CONSUMER, Projector, ROUTING_CONSUMER, dialog_spec, routing_spec,
};
use crate::adapters::grpc::FeedbackGrpc;
use crate::adapters::sql::Store;
use crate::app::FeedbackApp;
use crate::writer::WriterOptions;

/// The gRPC services this service exposes.
pub const GRPC_SERVICES: &[&str] =
    &[tandem_proto::pb::feedback::v1::feedback_service_server::SERVICE_NAME];

/// Settings of the feedback service, under `[service]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How often alert rules are evaluated; 0 turns evaluation off.
    #[serde(with = "humantime_serde")]
    pub alert_interval: Duration,
    /// How long after an alert resolved the same rule and scenario may not raise again.
    #[serde(with = "humantime_serde")]
    pub alert_cooldown: Duration,
    /// Parallel lanes of each event consumer (events of one conversation share a lane).
    pub consumer_lanes: usize,
    /// The most events of one lane projected in one transaction.
    pub consumer_batch: usize,
    /// The most submitted feedback records stored in one transaction (group commit).
    pub submit_batch: usize,
    /// How long the feedback writer waits for more submissions once it holds one, unless the
    /// batch is full; 0 stores what is queued at once.
    #[serde(with = "humantime_serde")]
    pub submit_linger: Duration,
    /// Feedback batches written at the same time.
    pub submit_writers: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            alert_interval: Duration::from_secs(60),
            alert_cooldown: Duration::from_secs(30 * 60),
            consumer_lanes: 8,
            consumer_batch: 256,
            submit_batch: 512,
            submit_linger: Duration::from_millis(1),
            submit_writers: 2,
        }
    }
}

impl Validate for Settings {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        if !self.alert_interval.is_zero() && self.alert_interval < Duration::from_secs(1) {
            errors.push(ConfigError::new(
                join(path, "alert_interval"),
                "must be 0 (off) or at least 1s",
            ));
        }
        if !(1..=64).contains(&self.consumer_lanes) {
            errors.push(ConfigError::new(
                join(path, "consumer_lanes"),
                "must be 1..64",
            ));
        }
        if !(1..=4096).contains(&self.consumer_batch) {
            errors.push(ConfigError::new(
                join(path, "consumer_batch"),
                "must be 1..4096",
            ));
        }
        if !(1..=4096).contains(&self.submit_batch) {
            errors.push(ConfigError::new(
                join(path, "submit_batch"),
                "must be 1..4096",
            ));
        }
        if !(1..=16).contains(&self.submit_writers) {
            errors.push(ConfigError::new(
                join(path, "submit_writers"),
                "must be 1..16",
            ));
        }
        if self.submit_linger > Duration::from_millis(100) {
            errors.push(ConfigError::new(
                join(path, "submit_linger"),
                "must be at most 100ms",
            ));
        }
    }
}

/// The feedback service.
pub struct Feedback;

impl Service for Feedback {
    const NAME: &'static str = "feedback";
    type Settings = Settings;

    fn migrations() -> Migrations {
        Migrations {
            postgres: sqlx::migrate!("./migrations/postgres"),
            sqlite: sqlx::migrate!("./migrations/sqlite"),
        }
    }

    async fn start(ctx: StartContext<'_>, settings: &Settings) -> anyhow::Result<()> {
        let store = Store::new(ctx.db.clone());
        let (app, writer) = FeedbackApp::with_writer(
            store.clone(),
            ctx.outbox.clone(),
            settings.alert_cooldown,
            WriterOptions {
                max_batch: settings.submit_batch,
                linger: settings.submit_linger,
                queue: settings.submit_batch * 16,
                // SQLite has one writer at a time anyway.
                writers: if matches!(ctx.db, tandem_platform::db::Db::Sqlite(_)) {
                    1
                } else {
                    settings.submit_writers
                },
            },
            ctx.shutdown.clone(),
        );
        ctx.tracker.spawn(writer);
        let grpc = FeedbackServiceServer::new(FeedbackGrpc::new(app.clone()));
        ctx.server.add_service(InterceptedService::new(
            tandem_platform::limited!(grpc, &ctx.grpc_config),
            AuthInterceptor::new(ctx.auth.clone()),
        ));
        for (spec, name) in [
            (dialog_spec(&ctx.bus_config), DIALOG_CONSUMER),
            (routing_spec(&ctx.bus_config), ROUTING_CONSUMER),
        ] {
            let consumer = ctx.bus.consumer(&spec).await?;
            let mut options = RunOptions::new(name);
            options.lanes = settings.consumer_lanes;
            options.max_batch = settings.consumer_batch;
            ctx.tracker.spawn(runner::run(
                consumer,
                Projector::new(store.clone(), name),
                options,
                ctx.shutdown.clone(),
            ));
        }
        if !settings.alert_interval.is_zero() {
            ctx.tracker.spawn(evaluate_alerts_until(
                app,
                settings.alert_interval,
                ctx.shutdown.clone(),
            ));
        }
        Ok(())
    }
}

/// Evaluates the alert rules every `interval` until shutdown.
async fn evaluate_alerts_until(
    app: FeedbackApp,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = chrono::Utc::now().timestamp_micros();
        if let Err(error) = app.evaluate_alerts(now).await {
            tracing::warn!(error = %tandem_platform::error::DisplayChain(&error), "alert evaluation failed");
        }
    }
}
