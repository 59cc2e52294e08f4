//! The routing service: handoff to human agents: agents, presence, queues, offers, exactly-once assignment, transfers.
//!
//! Layout: `config` (the service's own settings); behaviour arrives module by module
//! (`domain` pure rules, `app` use cases, `adapters` gRPC, bus and storage).

use serde::{Deserialize, Serialize};
use tandem_platform::config::{ConfigError, Validate};
use tandem_platform::db::Migrations;
use tandem_platform::runtime::{Service, StartContext};

/// The gRPC services this service exposes.
pub const GRPC_SERVICES: &[&str] =
    &[tandem_proto::pb::routing::v1::routing_service_server::SERVICE_NAME];

/// Settings of the routing service, under `[service]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {}

impl Validate for Settings {
    fn validate(&self, _path: &str, _errors: &mut Vec<ConfigError>) {}
}

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
