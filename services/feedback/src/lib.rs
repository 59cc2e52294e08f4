//! The feedback service: feedback from every channel, metrics computed from the event streams, common problems and alerts.
//!
//! Layout: `config` (the service's own settings); behaviour arrives module by module
//! (`domain` pure rules, `app` use cases, `adapters` gRPC, bus and storage).

pub mod domain;

use serde::{Deserialize, Serialize};
use tandem_platform::config::{ConfigError, Validate};
use tandem_platform::db::Migrations;
use tandem_platform::runtime::{Service, StartContext};

/// The gRPC services this service exposes.
pub const GRPC_SERVICES: &[&str] =
    &[tandem_proto::pb::feedback::v1::feedback_service_server::SERVICE_NAME];

/// Settings of the feedback service, under `[service]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {}

impl Validate for Settings {
    fn validate(&self, _path: &str, _errors: &mut Vec<ConfigError>) {}
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

    async fn start(ctx: StartContext<'_>, _settings: &Settings) -> anyhow::Result<()> {
        for name in GRPC_SERVICES {
            ctx.server.declare(name);
        }
        Ok(())
    }
}
