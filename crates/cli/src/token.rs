//! `tandem token`: development tokens.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tandem_platform::auth::{Role, TokenIssuer};
use tandem_proto::ids::TenantId;

/// Options of `tandem token`.
#[derive(clap::Args)]
pub struct Options {
    /// The tenant the token acts for.
    #[arg(long)]
    pub tenant: String,
    /// channel, agent, supervisor, admin or service; repeat for several.
    #[arg(long = "role", required = true)]
    pub roles: Vec<String>,
    /// The subject (agent id, integration name); defaults to the first role's name.
    #[arg(long)]
    pub subject: Option<String>,
    /// How long the token is valid, e.g. `12h`.
    #[arg(long, default_value = "24h", value_parser = humantime_serde::re::humantime::parse_duration)]
    pub ttl: Duration,
    /// The standalone configuration whose `[auth]` section holds the signing key.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The standalone data directory with the development secret.
    #[arg(long, default_value = ".tandem")]
    pub data_dir: PathBuf,
}

/// Prints a token.
pub fn run(options: Options, env: &HashMap<String, String>) -> anyhow::Result<()> {
    let tenant = TenantId::new(options.tenant)?;
    let roles = options
        .roles
        .iter()
        .map(|r| r.parse::<Role>())
        .collect::<Result<Vec<_>, _>>()?;
    let subject = options.subject.unwrap_or_else(|| roles[0].to_string());
    let cfg = crate::standalone::load_config(options.config.as_deref(), &options.data_dir, env)?;
    let issuer = TokenIssuer::from_config(&cfg.auth).context("cannot sign tokens")?;
    let token = issuer.issue(&tenant, &subject, &roles, options.ttl)?;
    println!("{token}");
    Ok(())
}
