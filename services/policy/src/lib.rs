//! The policy service: per-scenario collaboration strategy: scenarios, thresholds, guardrails, decisions and adjustments.
//!
//! Layout: `config` (the service's own settings); behaviour arrives module by module
//! (`domain` pure rules, `app` use cases, `adapters` gRPC, bus and storage).

use serde::{Deserialize, Serialize};
use tandem_platform::config::{ConfigError, Validate};
use tandem_platform::db::Migrations;
use tandem_platform::runtime::{Service, StartContext};

/// The gRPC services this service exposes.
pub const GRPC_SERVICES: &[&str] =
    &[tandem_proto::pb::policy::v1::policy_service_server::SERVICE_NAME];

/// Settings of the policy service, under `[service]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {}

impl Validate for Settings {
    fn validate(&self, _path: &str, _errors: &mut Vec<ConfigError>) {}
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

    async fn start(ctx: StartContext<'_>, _settings: &Settings) -> anyhow::Result<()> {
        for name in GRPC_SERVICES {
            ctx.server.declare(name);
        }
        Ok(())
    }
}
