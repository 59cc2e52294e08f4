//! The routing service: handoff to human agents: agents, presence, queues, offers,
//! exactly-once assignment, transfers.
//!
//! Layout:
//! - [`config`]: the service's settings (`[service]`).
//! - [`domain`]: pure rules (validation, business hours, priority, agent selection, ETA).
//! - [`store`]: the repository over PostgreSQL or SQLite, where exactly-once is enforced.
//! - [`error`]: the one error type.

pub mod config;
pub mod domain;
pub mod error;
pub mod store;

pub use config::Settings;

use tandem_platform::db::Migrations;
use tandem_platform::runtime::{Service, StartContext};

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

    async fn start(ctx: StartContext<'_>, _settings: &Settings) -> anyhow::Result<()> {
        for name in GRPC_SERVICES {
            ctx.server.declare(name);
        }
        Ok(())
    }
}
