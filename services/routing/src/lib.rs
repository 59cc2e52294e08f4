//! The routing service: handoff to human agents: agents, presence, queues, offers,
//! exactly-once assignment, transfers.
//!
//! Layout:
//! - [`config`]: the service's settings (`[service]`).
//! - [`domain`]: pure rules (validation, business hours, priority, agent selection, ETA).
//! - [`store`]: the repository over PostgreSQL or SQLite, where exactly-once is enforced.
//! - [`engine`]: when to offer, expire, overflow and report; wakes desk sessions.
//! - [`adapters`]: the gRPC service with the agent session, conversions, bus consumers.
//! - [`error`]: the one error type.
//!
//! Dependencies point one way: `domain ← store ← engine ← adapters ← Routing::start`.

pub mod adapters;
pub mod config;
pub mod domain;
pub mod engine;
pub mod error;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

pub use config::Settings;

use tandem_platform::auth::AuthInterceptor;
use tandem_platform::bus::ConsumerSpec;
use tandem_platform::bus::runner::{self, RunOptions};
use tandem_platform::db::Migrations;
use tandem_platform::runtime::{Service, StartContext};
use tandem_proto::events::DIALOG;
use tandem_proto::pb::dialog::v1::{
    ConversationClosed, ConversationResolved, HandoffCancelled, HandoffRequested,
};
use tandem_proto::pb::routing::v1::routing_service_server::RoutingServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use crate::adapters::consumers::{DURABLE, DialogEvents};
use crate::adapters::grpc::RoutingGrpc;
use crate::engine::{Engine, SystemClock};
use crate::store::Store;

/// The gRPC services this service exposes.
pub const GRPC_SERVICES: &[&str] =
    &[tandem_proto::pb::routing::v1::routing_service_server::SERVICE_NAME];

/// The routing service.
pub struct Routing;

impl Service for Routing {
    const NAME: &'static str = "routing";
    type Settings = Settings;

    fn migrations() -> Migrations {
        Migrations {
            postgres: sqlx::migrate!("./migrations/postgres"),
            sqlite: sqlx::migrate!("./migrations/sqlite"),
        }
    }

    async fn start(ctx: StartContext<'_>, settings: &Settings) -> anyhow::Result<()> {
        let store = Store::new(ctx.db.clone(), ctx.outbox.clone(), &settings.default_queue);
        let engine = Arc::new(Engine::new(store, settings.clone(), Arc::new(SystemClock)));
        ctx.server.add_service(InterceptedService::new(
            tandem_platform::limited!(
                RoutingServiceServer::new(RoutingGrpc::new(
                    Arc::clone(&engine),
                    ctx.shutdown.clone()
                )),
                ctx.grpc_config
            ),
            AuthInterceptor::new(Arc::clone(&ctx.auth)),
        ));
        let spec = ConsumerSpec::new(DURABLE, &DIALOG, &ctx.bus_config)
            .event::<HandoffRequested>()
            .event::<ConversationClosed>()
            .event::<HandoffCancelled>()
            .event::<ConversationResolved>();
        let consumer = ctx.bus.consumer(&spec).await?;
        ctx.tracker.spawn(runner::run(
            consumer,
            DialogEvents {
                engine: Arc::clone(&engine),
            },
            RunOptions::new(DURABLE),
            ctx.shutdown.clone(),
        ));
        ctx.tracker.spawn(adapters::wakeups::run(
            Arc::clone(&engine),
            ctx.bus.clone(),
            ctx.shutdown.clone(),
        ));
        // Remembered as long as the inbox remembers the events it handled.
        ctx.tracker.spawn(prune_ended(
            Arc::clone(&engine),
            ctx.bus_config.max_age + Duration::from_secs(24 * 3600),
            ctx.shutdown.clone(),
        ));
        ctx.tracker.spawn(engine.run(ctx.shutdown.clone()));
        Ok(())
    }
}

/// Every hour, forgets the cancelled handoffs and closed conversations older than `keep`
/// ([`Store::prune_ended`]); every replica does it, and the deletes do not conflict.
async fn prune_ended(engine: Arc<Engine>, keep: Duration, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let Some(before) = chrono::TimeDelta::from_std(keep)
            .ok()
            .and_then(|keep| engine.now().checked_sub_signed(keep))
        else {
            return;
        };
        match engine.store.prune_ended(before).await {
            Ok(removed) => tracing::debug!(removed, "old cancellations and closings forgotten"),
            Err(error) => tracing::warn!(
                error = %tandem_platform::error::DisplayChain(&error),
                "cannot forget old cancellations and closings"
            ),
        }
    }
}
