//! The dialog service: the conversation and the bot: lifecycle, transcript, the bot's turn,
//! handoff packages, decision traces and per-tenant intent models.
//!
//! Layout:
//! - `app`: use cases (lifecycle, the bot's turn, handoff, suggestions, routing's feedback);
//! - `models`: examples, training, evaluation and versions of the tenant's intent model;
//! - `nlu`: wire conversions of the language understanding results and the bot's texts;
//! - `store`: PostgreSQL and SQLite persistence;
//! - `grpc`: the `DialogService` and `ModelService` adapters;
//! - `knowledge`: the knowledge search client (answers cited from published articles);
//! - this module: settings, wiring, and the consumers of policy updates (event-carried state:
//!   the bot keeps deciding when the policy service is down) and of routing's handoff events.
//!
//! `WatchConversation` streams the updates made by the replica the watcher is connected to
//! (an in-process broadcast per conversation) and, on NATS, the messages and suggestions the
//! other replicas write (`watch`: a plain subscription of this process to dialog's own events);
//! a watcher that reconnects resumes with its last cursor, which replays the stored messages
//! after it.

pub mod app;
pub mod grpc;
pub mod knowledge;
pub mod models;
pub mod nlu;
pub mod store;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_platform::auth::AuthInterceptor;
use tandem_platform::bus::runner::{self, Handler, HandlerError, RunOptions};
use tandem_platform::bus::{ConsumerSpec, RawEvent};
use tandem_platform::config::{ConfigError, Validate};
use tandem_platform::db::Migrations;
use tandem_platform::runtime::{Service, StartContext};
use tandem_proto::events::{Event, POLICY, ROUTING};
use tandem_proto::pb::dialog::v1 as pb;
use tandem_proto::pb::dialog::v1::dialog_service_server::DialogServiceServer;
use tandem_proto::pb::dialog::v1::model_service_server::ModelServiceServer;
use tandem_proto::pb::policy::v1::PolicyUpdated;
use tandem_proto::pb::routing::v1 as routing;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use crate::app::{App, AppOptions, DialogError, RoutingEffect};
use crate::store::Store;

/// The gRPC services this service exposes.
pub const GRPC_SERVICES: &[&str] = &[
    tandem_proto::pb::dialog::v1::dialog_service_server::SERVICE_NAME,
    tandem_proto::pb::dialog::v1::model_service_server::SERVICE_NAME,
];

/// Settings of the dialog service, under `[service]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How long a replica reuses a tenant's policy catalogue and active model before reading
    /// them again; changes received by this replica apply at once.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// The knowledge service's gRPC address (`http://host:port`); empty disables the search and
    /// the bot answers with the intents' stored answers.
    pub knowledge_endpoint: String,
    /// Deadline of one turn's knowledge look-up (search and article read); past it the bot
    /// answers with the intent's stored answer.
    #[serde(with = "humantime_serde")]
    pub knowledge_timeout: Duration,
    /// Lowest search score (BM25) of a hit the bot answers with.
    pub knowledge_min_score: f64,
    /// Hits asked for per search (1..50).
    pub knowledge_limit: i32,
    /// How far back a new conversation counts the same customer's earlier conversations (the
    /// `repeat_contacts` complexity signal); zero turns the look-up off.
    #[serde(with = "humantime_serde")]
    pub repeat_contact_window: Duration,
    /// How long a conversation with the bot (BOT) or a resolved one (RESOLVED) may stay without
    /// activity before it is closed (`CLOSE_REASON_ABANDONED`, or `CLOSE_REASON_RESOLVED` for a
    /// resolved one); conversations waiting for or held by a human are never closed this way.
    /// Zero turns the sweep off.
    #[serde(with = "humantime_serde")]
    pub idle_close_after: Duration,
    /// How long the last statistics routing reported of a queue (its ETA and whether it is
    /// within business hours) inform the bot's policy decisions; older ones count as unknown.
    /// Routing reports a queue at least every five minutes.
    #[serde(with = "humantime_serde")]
    pub queue_stats_max_age: Duration,
    /// How long the response of a customer or agent message is kept for idempotent retries
    /// (1 hour to 366 days); an hourly task deletes older ones, and a retry arriving later is
    /// treated as a new message.
    #[serde(with = "humantime_serde")]
    pub request_retention: Duration,
    /// How long a closed conversation is kept, with its messages, decision traces, suggestions
    /// and handoff packages, after it closed (1 day to 3660 days); an hourly task deletes older
    /// ones. Zero (the default) keeps them.
    #[serde(with = "humantime_serde")]
    pub conversation_retention: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            cache_ttl: Duration::from_secs(2),
            knowledge_endpoint: String::new(),
            knowledge_timeout: Duration::from_millis(150),
            knowledge_min_score: 4.0,
            knowledge_limit: 3,
            repeat_contact_window: Duration::from_secs(7 * 86_400),
            idle_close_after: Duration::from_secs(30 * 60),
            queue_stats_max_age: Duration::from_secs(15 * 60),
            request_retention: Duration::from_secs(7 * 86_400),
            conversation_retention: Duration::ZERO,
        }
    }
}

impl Validate for Settings {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        if self.cache_ttl > Duration::from_secs(60) {
            errors.push(ConfigError::new(
                format!("{path}.cache_ttl"),
                "must be at most 60s",
            ));
        }
        let endpoint = self.knowledge_endpoint.trim();
        if !endpoint.is_empty()
            && (!(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
                || tonic::transport::Endpoint::from_shared(endpoint.to_owned()).is_err())
        {
            errors.push(ConfigError::new(
                format!("{path}.knowledge_endpoint"),
                "must be empty or an http:// or https:// URL",
            ));
        }
        if self.knowledge_timeout < Duration::from_millis(1)
            || self.knowledge_timeout > Duration::from_secs(10)
        {
            errors.push(ConfigError::new(
                format!("{path}.knowledge_timeout"),
                "must be between 1ms and 10s",
            ));
        }
        if !self.knowledge_min_score.is_finite() || self.knowledge_min_score < 0.0 {
            errors.push(ConfigError::new(
                format!("{path}.knowledge_min_score"),
                "must be a non-negative number",
            ));
        }
        if !(1..=50).contains(&self.knowledge_limit) {
            errors.push(ConfigError::new(
                format!("{path}.knowledge_limit"),
                "must be between 1 and 50",
            ));
        }
        if self.repeat_contact_window > Duration::from_secs(366 * 86_400) {
            errors.push(ConfigError::new(
                format!("{path}.repeat_contact_window"),
                "must be at most 366days",
            ));
        }
        if !self.idle_close_after.is_zero()
            && (self.idle_close_after < Duration::from_secs(1)
                || self.idle_close_after > Duration::from_secs(366 * 86_400))
        {
            errors.push(ConfigError::new(
                format!("{path}.idle_close_after"),
                "must be 0s (off) or between 1s and 366days",
            ));
        }
        if self.queue_stats_max_age < Duration::from_secs(10)
            || self.queue_stats_max_age > Duration::from_secs(86_400)
        {
            errors.push(ConfigError::new(
                format!("{path}.queue_stats_max_age"),
                "must be between 10s and 1day",
            ));
        }
        if self.request_retention < Duration::from_secs(3_600)
            || self.request_retention > Duration::from_secs(366 * 86_400)
        {
            errors.push(ConfigError::new(
                format!("{path}.request_retention"),
                "must be between 1h and 366days",
            ));
        }
        if !self.conversation_retention.is_zero()
            && (self.conversation_retention < Duration::from_secs(86_400)
                || self.conversation_retention > Duration::from_secs(3_660 * 86_400))
        {
            errors.push(ConfigError::new(
                format!("{path}.conversation_retention"),
                "must be 0s (keep) or between 1day and 3660days",
            ));
        }
    }
}

/// The dialog service.
pub struct Dialog;

impl Service for Dialog {
    const NAME: &'static str = "dialog";
    type Settings = Settings;

    fn migrations() -> Migrations {
        Migrations {
            postgres: sqlx::migrate!("./migrations/postgres"),
            sqlite: sqlx::migrate!("./migrations/sqlite"),
        }
    }

    async fn start(ctx: StartContext<'_>, settings: &Settings) -> anyhow::Result<()> {
        let app = Arc::new(App::new(
            Store::new(ctx.db.clone()),
            ctx.outbox.clone(),
            AppOptions {
                cache_ttl: settings.cache_ttl,
                knowledge: knowledge_client(settings)?.map(Arc::new),
                repeat_contact_window: settings.repeat_contact_window,
                queue_stats_max_age: settings.queue_stats_max_age,
            },
        ));
        watch::relay_from_replicas(
            &ctx.bus,
            Arc::clone(&app),
            ctx.tracker,
            ctx.shutdown.clone(),
        )
        .await?;
        let grpc = grpc::DialogGrpc::new(Arc::clone(&app));
        ctx.server.add_service(InterceptedService::new(
            tandem_platform::limited!(DialogServiceServer::new(grpc.clone()), ctx.grpc_config),
            AuthInterceptor::new(Arc::clone(&ctx.auth)),
        ));
        ctx.server.add_service(InterceptedService::new(
            tandem_platform::limited!(ModelServiceServer::new(grpc), ctx.grpc_config),
            AuthInterceptor::new(Arc::clone(&ctx.auth)),
        ));
        let policy =
            ConsumerSpec::new("dialog-policy", &POLICY, &ctx.bus_config).event::<PolicyUpdated>();
        let consumer = ctx.bus.consumer(&policy).await?;
        ctx.tracker.spawn(runner::run(
            consumer,
            Consumers {
                app: Arc::clone(&app),
                name: "dialog-policy",
            },
            RunOptions::new("dialog-policy"),
            ctx.shutdown.clone(),
        ));
        let handoffs = ConsumerSpec::new("dialog-handoffs", &ROUTING, &ctx.bus_config)
            .event::<routing::HandoffQueued>()
            .event::<routing::HandoffPositionUpdated>()
            .event::<routing::HandoffAssigned>()
            .event::<routing::HandoffAbandoned>()
            .event::<routing::HandoffReturned>()
            .event::<routing::HandoffTransferred>()
            .event::<routing::AssignmentCompleted>();
        let consumer = ctx.bus.consumer(&handoffs).await?;
        ctx.tracker.spawn(runner::run(
            consumer,
            Consumers {
                app: Arc::clone(&app),
                name: "dialog-handoffs",
            },
            RunOptions::new("dialog-handoffs"),
            ctx.shutdown.clone(),
        ));
        let queues = ConsumerSpec::new("dialog-queues", &ROUTING, &ctx.bus_config)
            .event::<routing::QueueStatsReported>();
        let consumer = ctx.bus.consumer(&queues).await?;
        ctx.tracker.spawn(runner::run(
            consumer,
            Consumers {
                app: Arc::clone(&app),
                name: "dialog-queues",
            },
            RunOptions::new("dialog-queues"),
            ctx.shutdown.clone(),
        ));
        ctx.tracker.spawn(prune(
            app.store().clone(),
            Pruned::Requests,
            settings.request_retention,
            ctx.shutdown.clone(),
        ));
        if !settings.conversation_retention.is_zero() {
            ctx.tracker.spawn(prune(
                app.store().clone(),
                Pruned::ClosedConversations,
                settings.conversation_retention,
                ctx.shutdown.clone(),
            ));
        }
        if !settings.idle_close_after.is_zero() {
            ctx.tracker.spawn(sweep_idle(
                app,
                settings.idle_close_after,
                ctx.shutdown.clone(),
            ));
        }
        Ok(())
    }
}

/// Conversations closed per sweep round at most; a full round is followed by the next at once.
const SWEEP_BATCH: i64 = 200;

/// Closes idle conversations until `shutdown`: every tenth of `idle_after` (between 100 ms and
/// one minute), each round closes the conversations idle for longer than `idle_after`. Every
/// replica sweeps; a conversation closed by another replica, or active again, is skipped.
async fn sweep_idle(app: Arc<App>, idle_after: Duration, shutdown: CancellationToken) {
    let period = (idle_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        loop {
            let round = tokio::select! {
                () = shutdown.cancelled() => return,
                r = app.close_idle(idle_after, SWEEP_BATCH) => r,
            };
            match round {
                Ok(sweep) => {
                    if sweep.closed > 0 {
                        tracing::info!(closed = sweep.closed, "closed idle conversations");
                    }
                    // Another round at once only while full rounds keep closing: a round whose
                    // conversations were all skipped waits for the next tick.
                    if sweep.closed == 0
                        || sweep.found < usize::try_from(SWEEP_BATCH).unwrap_or(usize::MAX)
                    {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %tandem_platform::error::DisplayChain(&e),
                        "idle sweep failed");
                    break;
                }
            }
        }
    }
}

/// How often records past their retention are deleted.
const PRUNE_PERIOD: Duration = Duration::from_secs(3_600);

/// Request records deleted per statement at most.
const PRUNE_BATCH: i64 = 1_000;

/// Closed conversations deleted per transaction at most (each with all its records).
const CONVERSATION_PRUNE_BATCH: i64 = 200;

/// Which records a pruning task deletes.
#[derive(Clone, Copy)]
enum Pruned {
    /// Request records ([`Store::prune_requests`]).
    Requests,
    /// Closed conversations with their records ([`Store::prune_closed`]).
    ClosedConversations,
}

/// Deletes the records older than `retention` until `shutdown`: at start, then every hour, in
/// batches (a full batch is followed by the next at once). Every replica prunes; concurrent
/// deletions of the same records are harmless.
async fn prune(store: Store, what: Pruned, retention: Duration, shutdown: CancellationToken) {
    let (batch_size, name) = match what {
        Pruned::Requests => (PRUNE_BATCH, "request records"),
        Pruned::ClosedConversations => (CONVERSATION_PRUNE_BATCH, "closed conversations"),
    };
    let mut ticks = tokio::time::interval(PRUNE_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let before = tandem_platform::db::now_micros()
            .saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX));
        let mut deleted = 0_u64;
        loop {
            let pruning = async {
                match what {
                    Pruned::Requests => store.prune_requests(before, batch_size).await,
                    Pruned::ClosedConversations => store.prune_closed(before, batch_size).await,
                }
            };
            let batch = tokio::select! {
                () = shutdown.cancelled() => return,
                r = pruning => r,
            };
            match batch {
                Ok(n) => {
                    deleted += n;
                    if n < u64::try_from(batch_size).unwrap_or(u64::MAX) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %tandem_platform::error::DisplayChain(&e),
                        what = name, "pruning failed");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, what = name, "deleted records past their retention");
        }
    }
}

/// The knowledge client, when an endpoint is set.
fn knowledge_client(settings: &Settings) -> anyhow::Result<Option<knowledge::KnowledgeClient>> {
    let endpoint = settings.knowledge_endpoint.trim();
    if endpoint.is_empty() {
        return Ok(None);
    }
    Ok(Some(knowledge::KnowledgeClient::new(
        knowledge::KnowledgeOptions {
            endpoint: endpoint.to_owned(),
            timeout: settings.knowledge_timeout,
            min_score: settings.knowledge_min_score,
            limit: settings.knowledge_limit,
        },
    )?))
}

/// Applies policy updates, routing's handoff events and its queue statistics.
struct Consumers {
    app: Arc<App>,
    name: &'static str,
}

fn queue(queue_id: &str, position: i32, eta_seconds: i32) -> pb::QueueInfo {
    pb::QueueInfo {
        queue_id: queue_id.to_owned(),
        position,
        eta_seconds,
        updated_at: Some(app::now()),
    }
}

fn transient(e: &DialogError) -> HandlerError {
    match e {
        DialogError::Invalid(_) => HandlerError::Permanent(e.to_string()),
        _ => HandlerError::Transient(tandem_platform::error::DisplayChain(e).to_string()),
    }
}

impl Handler for Consumers {
    async fn handle(&self, event: &RawEvent) -> Result<(), HandlerError> {
        let claim = (self.name.to_owned(), event.id.clone());
        let tenant = &event.tenant;
        let (conversation, handoff, effect) = match event.type_name.as_str() {
            PolicyUpdated::TYPE_NAME => {
                let e = event.decode::<PolicyUpdated>()?.event;
                return self
                    .app
                    .on_policy(tenant, claim, e)
                    .await
                    .map_err(|e| transient(&e));
            }
            routing::QueueStatsReported::TYPE_NAME => {
                let e = event.decode::<routing::QueueStatsReported>()?.event;
                return self
                    .app
                    .on_queue_stats(tenant, claim, e)
                    .await
                    .map_err(|e| transient(&e));
            }
            routing::HandoffQueued::TYPE_NAME => {
                let e = event.decode::<routing::HandoffQueued>()?.event;
                let q = queue(&e.queue_id, e.position, e.eta_seconds);
                (e.conversation_id, e.handoff_id, RoutingEffect::Queued(q))
            }
            routing::HandoffPositionUpdated::TYPE_NAME => {
                let e = event.decode::<routing::HandoffPositionUpdated>()?.event;
                let q = queue(&e.queue_id, e.position, e.eta_seconds);
                (e.conversation_id, e.handoff_id, RoutingEffect::Queued(q))
            }
            routing::HandoffAssigned::TYPE_NAME => {
                let e = event.decode::<routing::HandoffAssigned>()?.event;
                (
                    e.conversation_id,
                    e.handoff_id,
                    RoutingEffect::Assigned(e.agent_id),
                )
            }
            routing::HandoffAbandoned::TYPE_NAME => {
                let e = event.decode::<routing::HandoffAbandoned>()?.event;
                (
                    e.conversation_id,
                    e.handoff_id,
                    RoutingEffect::BackToBot {
                        leave_message: false,
                    },
                )
            }
            routing::HandoffReturned::TYPE_NAME => {
                let e = event.decode::<routing::HandoffReturned>()?.event;
                let effect = RoutingEffect::BackToBot {
                    leave_message: e.leave_message,
                };
                (e.conversation_id, e.handoff_id, effect)
            }
            routing::HandoffTransferred::TYPE_NAME => {
                // A cold transfer releases the conversation at once: it waits in the queue
                // again. A warm one changes nothing until the target accepts, which routing
                // reports as a new `HandoffAssigned`.
                let e = event.decode::<routing::HandoffTransferred>()?.event;
                if e.kind != routing::TransferKind::Cold as i32 {
                    return Ok(());
                }
                let effect = RoutingEffect::Requeued {
                    from_agent: e.from_agent_id,
                };
                (e.conversation_id, e.handoff_id, effect)
            }
            routing::AssignmentCompleted::TYPE_NAME => {
                // A TRANSFERRED outcome is left to the event that follows it: the new
                // `HandoffAssigned` of a warm transfer, or the `HandoffTransferred` of a cold one.
                let e = event.decode::<routing::AssignmentCompleted>()?.event;
                let effect = if e.disposition == routing::Disposition::Resolved as i32 {
                    RoutingEffect::Resolved {
                        team: e.team,
                        agent: e.agent_id,
                    }
                } else if e.disposition == routing::Disposition::ReturnToBot as i32 {
                    RoutingEffect::BackToBot {
                        leave_message: false,
                    }
                } else {
                    return Ok(());
                };
                (e.conversation_id, e.handoff_id, effect)
            }
            _ => return Ok(()),
        };
        if conversation.is_empty() {
            return Ok(());
        }
        self.app
            .on_routing(tenant, claim, &conversation, &handoff, effect)
            .await
            .map_err(|e| transient(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(settings: &Settings) -> Vec<String> {
        let mut errors = Vec::new();
        settings.validate("service", &mut errors);
        errors.into_iter().map(|e| e.path).collect::<Vec<_>>()
    }

    #[test]
    fn idle_close_after_is_off_or_between_one_second_and_a_year() {
        assert!(problems(&Settings::default()).is_empty());
        for (value, ok) in [
            (Duration::ZERO, true),
            (Duration::from_secs(1), true),
            (Duration::from_secs(366 * 86_400), true),
            (Duration::from_millis(999), false),
            (Duration::from_secs(366 * 86_400 + 1), false),
        ] {
            let settings = Settings {
                idle_close_after: value,
                ..Settings::default()
            };
            let want: Vec<String> = if ok {
                Vec::new()
            } else {
                vec!["service.idle_close_after".into()]
            };
            assert_eq!(problems(&settings), want, "{value:?}");
        }
    }

    #[test]
    fn request_retention_is_between_an_hour_and_a_year() {
        for (value, ok) in [
            (Duration::from_secs(3_600), true),
            (Duration::from_secs(7 * 86_400), true),
            (Duration::from_secs(366 * 86_400), true),
            (Duration::from_secs(3_599), false),
            (Duration::ZERO, false),
            (Duration::from_secs(366 * 86_400 + 1), false),
        ] {
            let settings = Settings {
                request_retention: value,
                ..Settings::default()
            };
            let want: Vec<String> = if ok {
                Vec::new()
            } else {
                vec!["service.request_retention".into()]
            };
            assert_eq!(problems(&settings), want, "{value:?}");
        }
    }

    #[test]
    fn conversation_retention_is_off_or_between_a_day_and_ten_years() {
        assert_eq!(Settings::default().conversation_retention, Duration::ZERO);
        for (value, ok) in [
            (Duration::ZERO, true),
            (Duration::from_secs(86_400), true),
            (Duration::from_secs(3_660 * 86_400), true),
            (Duration::from_secs(86_399), false),
            (Duration::from_secs(3_660 * 86_400 + 1), false),
        ] {
            let settings = Settings {
                conversation_retention: value,
                ..Settings::default()
            };
            let want: Vec<String> = if ok {
                Vec::new()
            } else {
                vec!["service.conversation_retention".into()]
            };
            assert_eq!(problems(&settings), want, "{value:?}");
        }
    }
}
