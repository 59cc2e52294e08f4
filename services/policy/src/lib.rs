//! The policy service: per-scenario collaboration strategy: scenarios, thresholds, guardrails,
//! decisions and adjustments.
//!
//! Layout:
//! - `app`: use cases (catalogue, versions, pins, rollbacks, decisions, adjustments);
//! - `adjust`: the pure adjustment rules (firing, hysteresis, clamping, reverting);
//! - `document`: the YAML / JSON scenario documents of import and export;
//! - `store`: PostgreSQL and SQLite persistence;
//! - `grpc`: the `PolicyService` adapter;
//! - this module: settings, wiring, the consumers of live signals (analytics alerts and queue
//!   statistics) that drive adjustments, and the periodic work (ending the episodes of rules
//!   whose signal went silent, pruning old records).
//!
//! The decision function itself lives in `tandem-policy-engine`, and the wire conversions and
//! catalogue in `tandem-policy-client`, so dialog evaluates exactly the same rules locally.

pub mod adjust;
pub mod app;
pub mod document;
pub mod grpc;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_platform::auth::AuthInterceptor;
use tandem_platform::bus::runner::{self, Handler, HandlerError, RunOptions};
use tandem_platform::bus::{ConsumerSpec, RawEvent};
use tandem_platform::config::{ConfigError, Validate};
use tandem_platform::db::Migrations;
use tandem_platform::runtime::{Service, StartContext};
use tandem_proto::events::{Event, FEEDBACK, ROUTING};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::feedback::v1::{AlertRaised, AlertResolved, MetricName};
use tandem_proto::pb::policy::v1 as pb;
use tandem_proto::pb::policy::v1::policy_service_server::PolicyServiceServer;
use tandem_proto::pb::routing::v1::QueueStatsReported;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use crate::app::{App, AppOptions, ShadowItem};
use crate::store::{Committed, Observation, Store, timestamp_micros};

/// The gRPC services this service exposes.
pub const GRPC_SERVICES: &[&str] =
    &[tandem_proto::pb::policy::v1::policy_service_server::SERVICE_NAME];

/// Default of [`Settings::adjustment_retention`]: 180 days.
pub const ADJUSTMENT_RETENTION: Duration = Duration::from_secs(180 * 86_400);
/// Bounds of [`Settings::adjustment_retention`].
const ADJUSTMENT_RETENTION_BOUNDS: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(7 * 86_400)..=Duration::from_secs(3_660 * 86_400);

/// Default of [`Settings::silence_sweep_interval`]: 30 seconds.
pub const SILENCE_SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// Bounds of [`Settings::silence_sweep_interval`].
const SILENCE_SWEEP_INTERVAL_BOUNDS: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3_600);

/// Settings of the policy service, under `[service]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How long a replica reuses a tenant's compiled catalogue before reading it again; changes
    /// made through this replica apply at once, changes through others within this delay.
    #[serde(with = "humantime_serde")]
    pub catalogue_ttl: Duration,
    /// Hysteresis band of adjustment rules, as a fraction of the rule's threshold (0..=0.5).
    pub hysteresis_margin: f64,
    /// How long signal observations are kept for adjustment windows.
    #[serde(with = "humantime_serde")]
    pub observation_retention: Duration,
    /// Shadow decisions buffered before new ones are dropped (and counted).
    pub shadow_buffer: usize,
    /// How long adjustment records (`ListAdjustments`) are kept (7 days..=3660 days). Older ones
    /// are deleted hourly; the scenario versions they caused stay, with their rule and metrics.
    #[serde(with = "humantime_serde")]
    pub adjustment_retention: Duration,
    /// How often every replica looks for adjustment rules whose signal has been silent for their
    /// `silence_timeout` (1s..=1h): an episode ends at most this long after its timeout.
    #[serde(with = "humantime_serde")]
    pub silence_sweep_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            catalogue_ttl: Duration::from_secs(2),
            hysteresis_margin: 0.1,
            observation_retention: Duration::from_secs(8 * 86_400),
            shadow_buffer: 10_000,
            adjustment_retention: ADJUSTMENT_RETENTION,
            silence_sweep_interval: SILENCE_SWEEP_INTERVAL,
        }
    }
}

impl Validate for Settings {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        if self.catalogue_ttl > Duration::from_secs(60) {
            errors.push(ConfigError::new(
                format!("{path}.catalogue_ttl"),
                "must be at most 60s",
            ));
        }
        if !(0.0..=0.5).contains(&self.hysteresis_margin) {
            errors.push(ConfigError::new(
                format!("{path}.hysteresis_margin"),
                "must be between 0 and 0.5",
            ));
        }
        if self.observation_retention < Duration::from_secs(7 * 86_400) {
            errors.push(ConfigError::new(
                format!("{path}.observation_retention"),
                "must be at least 7 days, the longest rule window",
            ));
        }
        if !ADJUSTMENT_RETENTION_BOUNDS.contains(&self.adjustment_retention) {
            errors.push(ConfigError::new(
                format!("{path}.adjustment_retention"),
                "must be between 7 days and 3660 days",
            ));
        }
        if !SILENCE_SWEEP_INTERVAL_BOUNDS.contains(&self.silence_sweep_interval) {
            errors.push(ConfigError::new(
                format!("{path}.silence_sweep_interval"),
                "must be between 1s and 1h",
            ));
        }
        if self.shadow_buffer == 0 {
            errors.push(ConfigError::new(
                format!("{path}.shadow_buffer"),
                "must be at least 1",
            ));
        }
    }
}

/// The policy service.
pub struct Policy;

impl Service for Policy {
    const NAME: &'static str = "policy";
    type Settings = Settings;

    fn migrations() -> Migrations {
        Migrations {
            postgres: sqlx::migrate!("./migrations/postgres"),
            sqlite: sqlx::migrate!("./migrations/sqlite"),
        }
    }

    async fn start(ctx: StartContext<'_>, settings: &Settings) -> anyhow::Result<()> {
        let store = Store::new(ctx.db.clone());
        let (shadow_tx, shadow_rx) = mpsc::channel(settings.shadow_buffer);
        let app = Arc::new(App::new(
            store.clone(),
            ctx.outbox.clone(),
            AppOptions {
                catalogue_ttl: settings.catalogue_ttl,
                hysteresis_margin: settings.hysteresis_margin,
            },
            Some(shadow_tx),
        ));
        ctx.server.add_service(InterceptedService::new(
            tandem_platform::limited!(
                PolicyServiceServer::new(grpc::PolicyGrpc::new(Arc::clone(&app))),
                ctx.grpc_config
            ),
            AuthInterceptor::new(Arc::clone(&ctx.auth)),
        ));
        ctx.tracker.spawn(write_shadow_decisions(
            store.clone(),
            shadow_rx,
            ctx.shutdown.clone(),
        ));
        for (durable, spec) in [
            (
                "policy-alerts",
                ConsumerSpec::new("policy-alerts", &FEEDBACK, &ctx.bus_config)
                    .event::<AlertRaised>()
                    .event::<AlertResolved>(),
            ),
            (
                "policy-queue-stats",
                ConsumerSpec::new("policy-queue-stats", &ROUTING, &ctx.bus_config)
                    .event::<QueueStatsReported>(),
            ),
        ] {
            let consumer = ctx.bus.consumer(&spec).await?;
            ctx.tracker.spawn(runner::run(
                consumer,
                Signals {
                    app: Arc::clone(&app),
                    consumer: durable,
                },
                RunOptions::new(durable),
                ctx.shutdown.clone(),
            ));
        }
        ctx.tracker.spawn(sweep_silent(
            Arc::clone(&app),
            settings.silence_sweep_interval,
            ctx.shutdown.clone(),
        ));
        ctx.tracker.spawn(prune(
            store,
            settings.observation_retention,
            settings.adjustment_retention,
            ctx.shutdown.clone(),
        ));
        Ok(())
    }
}

/// Writes shadow decisions in batches until shutdown, then drains what is buffered.
async fn write_shadow_decisions(
    store: Store,
    mut rx: mpsc::Receiver<ShadowItem>,
    shutdown: CancellationToken,
) {
    const BATCH: usize = 256;
    let mut buffer: Vec<ShadowItem> = Vec::with_capacity(BATCH);
    loop {
        let received = tokio::select! {
            n = rx.recv_many(&mut buffer, BATCH) => n,
            () = shutdown.cancelled() => {
                rx.close();
                while rx.recv_many(&mut buffer, BATCH).await > 0 {}
                0
            }
        };
        let mut by_tenant: std::collections::BTreeMap<TenantId, Vec<pb::ShadowDecisionRecord>> =
            std::collections::BTreeMap::new();
        for (tenant, record) in buffer.drain(..) {
            by_tenant.entry(tenant).or_default().push(record);
        }
        for (tenant, records) in by_tenant {
            if let Err(e) = store.put_shadow_decisions(&tenant, &records).await {
                tracing::warn!(error = %tandem_platform::error::DisplayChain(&e), count = records.len(),
                    "shadow decisions not recorded");
            }
        }
        if received == 0 {
            return;
        }
    }
}

/// Deletes observations and adjustment records older than their retentions, hourly. Every
/// replica prunes; the deletes are idempotent.
async fn prune(
    store: Store,
    observations: Duration,
    adjustments: Duration,
    shutdown: CancellationToken,
) {
    let before = |keep: Duration| {
        store::now_micros().saturating_sub(i64::try_from(keep.as_micros()).unwrap_or(i64::MAX))
    };
    let mut tick = tokio::time::interval(Duration::from_secs(3_600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(e) = store.prune_observations(before(observations)).await {
            tracing::warn!(error = %tandem_platform::error::DisplayChain(&e), "pruning observations failed");
        }
        match store.prune_adjustments(before(adjustments)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "old adjustment records deleted"),
            Err(e) => tracing::warn!(error = %tandem_platform::error::DisplayChain(&e),
                "pruning adjustment records failed"),
        }
    }
}

/// Ends the episodes of adjustment rules whose signal has gone silent, every `interval`, until
/// shutdown. Every replica sweeps; each tenant's sweep commits under its catalogue version, so
/// an episode is ended (and reverted) once.
async fn sweep_silent(app: Arc<App>, interval: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match app.sweep_silent().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(adjustments = n, "silent adjustment episodes ended"),
            Err(e) => tracing::warn!(error = %tandem_platform::error::DisplayChain(&e),
                "looking for silent adjustment episodes failed"),
        }
    }
}

/// Consumes live signals and feeds them to the adjustment rules.
struct Signals {
    app: Arc<App>,
    consumer: &'static str,
}

/// Maps an analytics metric to the adjustment signal it measures.
fn signal_of(metric: i32) -> Option<pb::AdjustmentSignal> {
    match MetricName::try_from(metric).ok()? {
        MetricName::Csat => Some(pb::AdjustmentSignal::BotCsat),
        MetricName::HandoffRate => Some(pb::AdjustmentSignal::HandoffRate),
        MetricName::QueueWait => Some(pb::AdjustmentSignal::QueueWaitP95),
        MetricName::ReopenRate => Some(pb::AdjustmentSignal::ReopenRate),
        MetricName::ContainmentRate => Some(pb::AdjustmentSignal::ContainmentRate),
        _ => None,
    }
}

/// Returns the observations an event carries, for the scenarios it concerns.
async fn observations(app: &App, event: &RawEvent) -> Result<Vec<Observation>, HandlerError> {
    let at = timestamp_micros(&prost_types::Timestamp {
        seconds: event.occurred_at.timestamp(),
        nanos: i32::try_from(event.occurred_at.timestamp_subsec_nanos()).unwrap_or(0),
    });
    // A reading needs a finite value; a resolution counts without one (its value is then NaN).
    let one = |scenario: &str, signal: Option<pb::AdjustmentSignal>, value: f64, resolution| {
        signal
            .filter(|_| !scenario.is_empty() && (resolution || value.is_finite()))
            .map(|s| Observation {
                scenario_id: scenario.to_owned(),
                signal: s as i32,
                value: if value.is_finite() { value } else { f64::NAN },
                observed_at: at,
                resolution,
            })
            .into_iter()
            .collect::<Vec<_>>()
    };
    Ok(match event.type_name.as_str() {
        AlertRaised::TYPE_NAME => {
            let e = event.decode::<AlertRaised>()?.event;
            one(&e.scenario_id, signal_of(e.metric), e.observed_value, false)
        }
        AlertResolved::TYPE_NAME => {
            let e = event.decode::<AlertResolved>()?.event;
            one(&e.scenario_id, signal_of(e.metric), e.observed_value, true)
        }
        QueueStatsReported::TYPE_NAME => {
            let e = event.decode::<QueueStatsReported>()?.event;
            let cat = app
                .catalogue(&event.tenant)
                .await
                .map_err(|e| HandlerError::Transient(e.to_string()))?;
            let mut scenarios: Vec<String> = e.scenario_ids.clone();
            for s in app
                .list(&event.tenant)
                .await
                .map_err(|e| HandlerError::Transient(e.to_string()))?
            {
                let routed_here = s.routing.as_ref().is_some_and(|r| r.queue_id == e.queue_id);
                if routed_here && !scenarios.contains(&s.id) {
                    scenarios.push(s.id);
                }
            }
            scenarios.retain(|s| cat.get(s).is_some());
            scenarios
                .iter()
                .flat_map(|s| {
                    one(
                        s,
                        Some(pb::AdjustmentSignal::QueueEta),
                        f64::from(e.eta_seconds),
                        false,
                    )
                })
                .collect()
        }
        _ => Vec::new(),
    })
}

impl Handler for Signals {
    async fn handle(&self, event: &RawEvent) -> Result<(), HandlerError> {
        let obs = observations(&self.app, event).await?;
        if obs.is_empty() {
            return Ok(());
        }
        match self
            .app
            .observe(
                &event.tenant,
                Some((self.consumer.to_owned(), event.id.clone())),
                obs,
            )
            .await
        {
            Ok(Committed::Applied | Committed::Duplicate) => Ok(()),
            Err(e) => Err(HandlerError::Transient(
                tandem_platform::error::DisplayChain(&e).to_string(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn problems(settings: &Settings) -> Vec<String> {
        let mut errors = Vec::new();
        settings.validate("service", &mut errors);
        errors.into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn adjustment_retention_is_bounded() {
        assert!(problems(&Settings::default()).is_empty());
        assert_eq!(
            Settings::default().adjustment_retention,
            Duration::from_secs(180 * 86_400)
        );
        for days in [1, 3_661] {
            let settings = Settings {
                adjustment_retention: Duration::from_secs(days * 86_400),
                ..Settings::default()
            };
            let found = problems(&settings);
            assert_eq!(found.len(), 1, "{days} days: {found:?}");
            assert_eq!(found[0], "service.adjustment_retention");
        }
    }

    #[test]
    fn silence_sweep_interval_is_bounded_and_reported_with_the_other_problems() {
        assert_eq!(
            Settings::default().silence_sweep_interval,
            Duration::from_secs(30)
        );
        for interval in [
            Duration::ZERO,
            Duration::from_millis(500),
            Duration::from_secs(3_601),
        ] {
            let settings = Settings {
                silence_sweep_interval: interval,
                ..Settings::default()
            };
            assert_eq!(
                problems(&settings),
                ["service.silence_sweep_interval"],
                "{interval:?}"
            );
        }
        for interval in [Duration::from_secs(1), Duration::from_secs(3_600)] {
            let settings = Settings {
                silence_sweep_interval: interval,
                ..Settings::default()
            };
            assert!(problems(&settings).is_empty(), "{interval:?}");
        }
        let settings = Settings {
            silence_sweep_interval: Duration::ZERO,
            shadow_buffer: 0,
            ..Settings::default()
        };
        assert_eq!(
            problems(&settings),
            ["service.silence_sweep_interval", "service.shadow_buffer"]
        );
        let parsed: Settings =
            serde_json::from_str(r#"{"silence_sweep_interval": "45s"}"#).unwrap();
        assert_eq!(parsed.silence_sweep_interval, Duration::from_secs(45));
    }
}
