//! Layered, typed, validated configuration.
//!
//! Layers, later ones winning: compiled defaults → an optional TOML file → environment variables
//! `TANDEM_<SERVICE>__<SECTION>__<KEY>` (e.g. `TANDEM_ROUTING__GRPC__LISTEN_ADDR`). The loader
//! takes the environment as a map, so nothing else reads `std::env` and tests need no globals.
//!
//! Every problem is reported at once: each section is deserialised on its own so that a bad value
//! in `[grpc]` does not hide another in `[database]`, then [`Validate`] checks the semantics.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// One configuration problem, located by its dotted path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the problem is, e.g. `grpc.max_message_bytes`.
    pub path: String,
    /// What is wrong, lowercase, no trailing punctuation.
    pub message: String,
}

impl ConfigError {
    /// Creates an error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Every problem found while loading a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} problem", self.0.len())?;
        if self.0.len() != 1 {
            f.write_str("s")?;
        }
        f.write_str("):")?;
        for error in &self.0 {
            write!(f, "\n  - {}: {}", error.path, error.message)?;
        }
        Ok(())
    }
}

/// Semantic checks that run after deserialisation.
pub trait Validate {
    /// Pushes every problem found onto `errors`; `path` is the dotted prefix of this value.
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>);
}

/// Joins a dotted path.
pub fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Returns the environment variable prefix of a service, e.g. `TANDEM_ROUTING`.
pub fn env_prefix(service: &str) -> String {
    format!("TANDEM_{}", service.to_uppercase().replace('-', "_"))
}

/// Loads `T` from its defaults, an optional TOML file and the environment map.
pub fn load<T>(
    service: &str,
    file: Option<&Path>,
    env: &HashMap<String, String>,
) -> Result<T, ConfigErrors>
where
    T: Serialize + DeserializeOwned + Default + Validate,
{
    let one = |path: &str, message: String| ConfigErrors(vec![ConfigError::new(path, message)]);
    let defaults = Config::try_from(&T::default()).map_err(|e| one("<defaults>", e.to_string()))?;

    let mut builder = Config::builder().add_source(defaults.clone());
    if let Some(path) = file {
        if !path.is_file() {
            return Err(one(
                "<file>",
                format!("{} does not exist or is not a file", path.display()),
            ));
        }
        builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
    }
    let prefix = env_prefix(service);
    let env: HashMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{prefix}__")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    builder = builder.add_source(
        Environment::with_prefix(&prefix)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("auth.public_key_files")
            .with_list_parse_key("bus.redelivery_backoff")
            .source(Some(env)),
    );
    let merged = builder
        .build()
        .map_err(|e| one("<source>", e.to_string()))?;

    match merged.clone().try_deserialize::<T>() {
        Ok(value) => {
            let mut errors = Vec::new();
            value.validate("", &mut errors);
            if errors.is_empty() {
                Ok(value)
            } else {
                Err(ConfigErrors(errors))
            }
        }
        Err(first) => Err(ConfigErrors(section_errors::<T>(&defaults, &merged, first))),
    }
}

/// Deserialises each top-level section over the defaults on its own, so that every broken
/// section is reported rather than only the first; then validates the sections that did parse,
/// so that a broken section does not hide the semantic problems of the others either.
fn section_errors<T: DeserializeOwned + Validate>(
    defaults: &Config,
    merged: &Config,
    first: config::ConfigError,
) -> Vec<ConfigError> {
    let known: HashMap<String, config::Value> =
        defaults.clone().try_deserialize().unwrap_or_default();
    let Ok(sections) = merged
        .clone()
        .try_deserialize::<HashMap<String, config::Value>>()
    else {
        return vec![ConfigError::new("<root>", first.to_string())];
    };
    let mut errors = Vec::new();
    let mut parsed = Vec::new();
    let mut names: Vec<&String> = sections.keys().collect();
    names.sort();
    for name in names {
        if !known.contains_key(name) {
            errors.push(ConfigError::new(name.clone(), "unknown section"));
            continue;
        }
        let single = Config::builder()
            .add_source(defaults.clone())
            .set_override(name.as_str(), sections[name].clone())
            .and_then(|b| b.build())
            .and_then(|c| c.try_deserialize::<T>());
        match single {
            Ok(_) => parsed.push(name),
            Err(e) => {
                let broken_keys = key_errors::<T>(defaults, name, &sections[name]);
                if broken_keys.is_empty() {
                    errors.push(ConfigError::new(
                        name.clone(),
                        strip_config_noise(&e.to_string()),
                    ));
                } else {
                    errors.extend(broken_keys);
                }
            }
        }
    }
    if errors.is_empty() {
        errors.push(ConfigError::new("<root>", first.to_string()));
    }
    let broken: Vec<String> = errors.iter().map(|e| e.path.clone()).collect();
    let valid_parts = parsed
        .iter()
        .try_fold(Config::builder().add_source(defaults.clone()), |b, name| {
            b.set_override(name.as_str(), sections[*name].clone())
        })
        .and_then(|b| b.build())
        .and_then(|c| c.try_deserialize::<T>());
    if let Ok(value) = valid_parts {
        let mut semantic = Vec::new();
        value.validate("", &mut semantic);
        // A broken section was validated as its defaults; problems of those are not the user's.
        errors.extend(
            semantic
                .into_iter()
                .filter(|e| !broken.iter().any(|b| section_of(&e.path) == b)),
        );
    }
    errors
}

/// Deserialises each key of a broken section over the defaults on its own, so that every broken
/// key of it is reported. Empty when the section is not a table, or no key fails alone (the
/// section's own error then stands).
fn key_errors<T: DeserializeOwned>(
    defaults: &Config,
    section: &str,
    value: &config::Value,
) -> Vec<ConfigError> {
    let Ok(keys) = value.clone().into_table() else {
        return Vec::new();
    };
    let mut names: Vec<&String> = keys.keys().collect();
    names.sort();
    let mut errors = Vec::new();
    for key in names {
        let path = format!("{section}.{key}");
        let single = Config::builder()
            .add_source(defaults.clone())
            .set_override(path.as_str(), keys[key].clone())
            .and_then(|b| b.build())
            .and_then(|c| c.try_deserialize::<T>());
        if let Err(e) = single {
            errors.push(ConfigError::new(path, strip_config_noise(&e.to_string())));
        }
    }
    errors
}

/// Returns the top-level section of a dotted path: `auth` for `auth.public_key_files[0]`.
fn section_of(path: &str) -> &str {
    path.split(['.', '[']).next().unwrap_or(path)
}

fn strip_config_noise(message: &str) -> String {
    message.trim_end_matches('.').to_owned()
}

/// A string that never shows in `Debug` output or logs.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Returns the secret itself; call only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Returns whether no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Secret(<empty>)"
        } else {
            "Secret(<redacted>)"
        })
    }
}

/// The gRPC server: address and limits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Where the server listens.
    pub listen_addr: SocketAddr,
    /// The largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// The longest a unary call may run; a client's shorter `grpc-timeout` wins.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// In-flight requests per connection; beyond it requests are shed with RESOURCE_EXHAUSTED
    /// (tonic's answer: this caller uses more than its share of a connection).
    pub concurrency_limit_per_connection: usize,
    /// In-flight requests across the process; beyond it requests are shed with UNAVAILABLE.
    pub global_concurrency_limit: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keep-alive ping interval.
    #[serde(with = "humantime_serde")]
    pub http2_keepalive_interval: Duration,
    /// Recycle connections after this age so load balancers can rebalance; `0s` disables.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Serve gRPC server reflection (switch off in production if clients don't need it).
    pub reflection: bool,
    /// After a shutdown signal, how long health reports NOT_SERVING before the server drains.
    #[serde(with = "humantime_serde")]
    pub not_serving_delay: Duration,
    /// The longest the drain of in-flight calls may take before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_message_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            concurrency_limit_per_connection: 256,
            global_concurrency_limit: 4096,
            max_concurrent_streams: 1024,
            http2_keepalive_interval: Duration::from_secs(30),
            max_connection_age: Duration::from_secs(300),
            reflection: true,
            not_serving_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(20),
        }
    }
}

impl Validate for GrpcConfig {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        if !(1024..=64 * 1024 * 1024).contains(&self.max_message_bytes) {
            errors.push(ConfigError::new(
                join(path, "max_message_bytes"),
                "must be between 1 KiB and 64 MiB",
            ));
        }
        if self.request_timeout.is_zero() {
            errors.push(ConfigError::new(
                join(path, "request_timeout"),
                "must be positive",
            ));
        }
        if !(1..=1_000_000).contains(&self.concurrency_limit_per_connection) {
            errors.push(ConfigError::new(
                join(path, "concurrency_limit_per_connection"),
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=1_000_000).contains(&self.global_concurrency_limit) {
            errors.push(ConfigError::new(
                join(path, "global_concurrency_limit"),
                "must be between 1 and 1000000",
            ));
        }
        if self.max_concurrent_streams == 0 {
            errors.push(ConfigError::new(
                join(path, "max_concurrent_streams"),
                "must be positive",
            ));
        }
        if self.drain_timeout.is_zero() {
            errors.push(ConfigError::new(
                join(path, "drain_timeout"),
                "must be positive",
            ));
        }
    }
}

/// How logs look.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, for terminals.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logs, traces and metrics.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `pretty` or `json`.
    pub log_format: LogFormat,
    /// A tracing filter such as `info,tandem=debug`; `RUST_LOG` overrides it.
    pub log_filter: String,
    /// An OTLP/gRPC collector endpoint such as `http://127.0.0.1:4317`; empty disables export.
    pub otlp_endpoint: String,
    /// Fraction of traces sampled when exporting, 0.0 to 1.0.
    pub trace_sample_ratio: f64,
    /// Where Prometheus scrapes `/metrics`; empty disables the listener.
    pub metrics_addr: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Pretty,
            log_filter: "info,opentelemetry=warn,opentelemetry_sdk=warn".into(),
            otlp_endpoint: String::new(),
            trace_sample_ratio: 1.0,
            metrics_addr: String::new(),
        }
    }
}

impl Validate for TelemetryConfig {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_filter) {
            errors.push(ConfigError::new(
                join(path, "log_filter"),
                format!("not a valid filter: {e}"),
            ));
        }
        let endpoint = &self.otlp_endpoint;
        if !(endpoint.is_empty()
            || endpoint.starts_with("http://")
            || endpoint.starts_with("https://"))
        {
            errors.push(ConfigError::new(
                join(path, "otlp_endpoint"),
                "must be an http:// or https:// URL",
            ));
        }
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            errors.push(ConfigError::new(
                join(path, "trace_sample_ratio"),
                "must be between 0.0 and 1.0",
            ));
        }
        if !self.metrics_addr.is_empty() && self.metrics_addr.parse::<SocketAddr>().is_err() {
            errors.push(ConfigError::new(
                join(path, "metrics_addr"),
                "must be a socket address such as 0.0.0.0:9090",
            ));
        }
    }
}

/// Token verification.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Expected `iss` claim; empty accepts any issuer.
    pub issuer: String,
    /// Expected `aud` claim; empty accepts any audience.
    pub audience: String,
    /// PEM files with RSA, EC or Ed25519 public keys that verify tokens (RS*, PS*, ES*, EdDSA).
    pub public_key_files: Vec<PathBuf>,
    /// A JWKS document (JSON) with the verifying keys, matched by `kid`.
    pub jwks_file: Option<PathBuf>,
    /// Shared HS256 secret. For development only: refused unless `allow_hs256` is true.
    pub hs256_secret: Secret,
    /// Accepts HS256 tokens signed with `hs256_secret`.
    pub allow_hs256: bool,
    /// A PEM private key that `tandem token` signs development tokens with (instead of HS256).
    pub signing_key_file: Option<PathBuf>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: "tandem".into(),
            audience: "tandem".into(),
            public_key_files: Vec::new(),
            jwks_file: None,
            hs256_secret: Secret::default(),
            allow_hs256: false,
            signing_key_file: None,
            leeway_secs: 30,
        }
    }
}

impl Validate for AuthConfig {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        let has_asymmetric = !self.public_key_files.is_empty() || self.jwks_file.is_some();
        if self.allow_hs256 && self.hs256_secret.expose().len() < 32 {
            errors.push(ConfigError::new(
                join(path, "hs256_secret"),
                "must be at least 32 bytes when allow_hs256 is true",
            ));
        }
        if !self.allow_hs256 && !self.hs256_secret.is_empty() {
            errors.push(ConfigError::new(
                join(path, "hs256_secret"),
                "is set but allow_hs256 is false",
            ));
        }
        if !self.allow_hs256 && !has_asymmetric {
            errors.push(ConfigError::new(path.to_owned(), "no verification key: set public_key_files or jwks_file (or allow_hs256 with hs256_secret for development)"));
        }
        for (i, file) in self.public_key_files.iter().enumerate() {
            if !file.is_file() {
                errors.push(ConfigError::new(
                    format!("{}[{i}]", join(path, "public_key_files")),
                    format!("{} does not exist", file.display()),
                ));
            }
        }
        if let Some(file) = &self.jwks_file
            && !file.is_file()
        {
            errors.push(ConfigError::new(
                join(path, "jwks_file"),
                format!("{} does not exist", file.display()),
            ));
        }
        if self.leeway_secs > 300 {
            errors.push(ConfigError::new(
                join(path, "leeway_secs"),
                "must be at most 300",
            ));
        }
    }
}

/// The service's database.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://…` or `sqlite://path/to/file.db`.
    pub url: Secret,
    /// PostgreSQL schema the service owns (created if missing); empty uses `public`.
    pub schema: String,
    /// Pool size.
    pub max_connections: u32,
    /// How long to wait for a connection from the pool.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: Secret::default(),
            schema: String::new(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

impl Validate for DatabaseConfig {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        let url = self.url.expose();
        if url.is_empty() {
            errors.push(ConfigError::new(join(path, "url"), "is required"));
        } else if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            errors.push(ConfigError::new(
                join(path, "url"),
                "must start with postgres:// or sqlite:",
            ));
        }
        if !self.schema.is_empty()
            && !self
                .schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            errors.push(ConfigError::new(
                join(path, "schema"),
                "may contain only lowercase letters, digits and '_'",
            ));
        }
        if self.max_connections == 0 || self.max_connections > 1000 {
            errors.push(ConfigError::new(
                join(path, "max_connections"),
                "must be between 1 and 1000",
            ));
        }
    }
}

/// Which bus adapter carries events.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// NATS JetStream (production).
    Nats,
    /// The in-process bus (standalone mode).
    Memory,
}

/// The event bus.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// `nats` or `memory`.
    pub kind: BusKind,
    /// NATS server URL(s), comma separated.
    pub nats_url: String,
    /// Stream replicas (1 for a single server, 3 in production clusters).
    pub stream_replicas: usize,
    /// Window in which JetStream drops a re-published event with the same id.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// How long a stream keeps events.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Unacknowledged deliveries a consumer may have in flight.
    pub max_ack_pending: i64,
    /// How long a delivery may stay unacknowledged before it is redelivered.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Delivery attempts before an event is given up (and logged).
    pub max_deliver: i64,
    /// Optional per-delivery acknowledgement deadlines (JetStream `backoff`): entry N is how long
    /// delivery N+1 may stay unacknowledged, the last entry repeating. Empty uses `ack_wait` for
    /// every delivery. Failures the handler reports are redelivered after its own growing delay.
    #[serde(with = "duration_list")]
    pub redelivery_backoff: Vec<Duration>,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            kind: BusKind::Nats,
            nats_url: "nats://127.0.0.1:4222".into(),
            stream_replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_ack_pending: 1024,
            ack_wait: Duration::from_secs(30),
            max_deliver: 20,
            redelivery_backoff: Vec::new(),
        }
    }
}

impl Validate for BusConfig {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        if self.kind == BusKind::Nats
            && !self
                .nats_url
                .split(',')
                .all(|u| u.trim().starts_with("nats://") || u.trim().starts_with("tls://"))
        {
            errors.push(ConfigError::new(
                join(path, "nats_url"),
                "must be nats:// or tls:// URLs",
            ));
        }
        if !(1..=5).contains(&self.stream_replicas) {
            errors.push(ConfigError::new(
                join(path, "stream_replicas"),
                "must be between 1 and 5",
            ));
        }
        if self.duplicate_window.is_zero() || self.duplicate_window > self.max_age {
            errors.push(ConfigError::new(
                join(path, "duplicate_window"),
                "must be positive and at most max_age",
            ));
        }
        if !(1..=100_000).contains(&self.max_ack_pending) {
            errors.push(ConfigError::new(
                join(path, "max_ack_pending"),
                "must be between 1 and 100000",
            ));
        }
        if self
            .redelivery_backoff
            .iter()
            .any(|d| *d < Duration::from_millis(100))
        {
            errors.push(ConfigError::new(
                join(path, "redelivery_backoff"),
                "every entry must be at least 100ms",
            ));
        }
        if self.ack_wait < Duration::from_millis(100) {
            errors.push(ConfigError::new(
                join(path, "ack_wait"),
                "must be at least 100ms",
            ));
        }
        if self.max_deliver < 1 || (self.max_deliver as usize) <= self.redelivery_backoff.len() {
            errors.push(ConfigError::new(
                join(path, "max_deliver"),
                "must be positive and larger than the number of backoff steps",
            ));
        }
    }
}

/// The transactional outbox relay.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Rows read and published per round.
    pub batch_size: u32,
    /// How often the relay looks for rows written by other processes.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Published rows are kept this long before deletion (for inspection); `0s` deletes at once.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            batch_size: 512,
            poll_interval: Duration::from_millis(200),
            retention: Duration::ZERO,
        }
    }
}

impl Validate for OutboxConfig {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        if !(1..=10_000).contains(&self.batch_size) {
            errors.push(ConfigError::new(
                join(path, "batch_size"),
                "must be between 1 and 10000",
            ));
        }
        if self.poll_interval < Duration::from_millis(5) {
            errors.push(ConfigError::new(
                join(path, "poll_interval"),
                "must be at least 5ms",
            ));
        }
    }
}

/// Everything a service process needs: the shared sections plus its own under `[service]`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig<T> {
    /// The gRPC server.
    pub grpc: GrpcConfig,
    /// Logs, traces, metrics.
    pub telemetry: TelemetryConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// The service's database.
    pub database: DatabaseConfig,
    /// The event bus.
    pub bus: BusConfig,
    /// The outbox relay.
    pub outbox: OutboxConfig,
    /// Settings of this service alone.
    pub service: T,
}

impl<T: Validate> Validate for ServiceConfig<T> {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        self.grpc.validate(&join(path, "grpc"), errors);
        self.telemetry.validate(&join(path, "telemetry"), errors);
        self.auth.validate(&join(path, "auth"), errors);
        self.database.validate(&join(path, "database"), errors);
        self.bus.validate(&join(path, "bus"), errors);
        self.outbox.validate(&join(path, "outbox"), errors);
        self.service.validate(&join(path, "service"), errors);
    }
}

/// A service with no settings of its own yet.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

impl Validate for NoSettings {
    fn validate(&self, _path: &str, _errors: &mut Vec<ConfigError>) {}
}

/// Serde for a list of human-readable durations (`["100ms", "1s"]`).
mod duration_list {
    use std::time::Duration;

    use humantime_serde::re::humantime;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &[Duration], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            value
                .iter()
                .map(|d| humantime::format_duration(*d).to_string()),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|text| humantime::parse_duration(text.trim()).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Cfg = ServiceConfig<NoSettings>;

    fn dev_env() -> HashMap<String, String> {
        HashMap::from([
            (
                "TANDEM_ROUTING__AUTH__ALLOW_HS256".to_owned(),
                "true".to_owned(),
            ),
            (
                "TANDEM_ROUTING__AUTH__HS256_SECRET".to_owned(),
                "x".repeat(32),
            ),
            (
                "TANDEM_ROUTING__DATABASE__URL".to_owned(),
                "sqlite::memory:".to_owned(),
            ),
        ])
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("routing.toml");
        std::fs::write(
            &file,
            "[grpc]\nlisten_addr = \"127.0.0.1:6000\"\nrequest_timeout = \"3s\"\n",
        )
        .unwrap();
        let mut env = dev_env();
        env.insert(
            "TANDEM_ROUTING__GRPC__REQUEST_TIMEOUT".into(),
            "250ms".into(),
        );
        env.insert(
            "TANDEM_DIALOG__GRPC__REQUEST_TIMEOUT".into(),
            "not for us".into(),
        );
        let cfg: Cfg = load("routing", Some(&file), &env).unwrap();
        assert_eq!(cfg.grpc.listen_addr, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(cfg.grpc.request_timeout, Duration::from_millis(250));
        assert_eq!(cfg.grpc.max_message_bytes, 1024 * 1024);
    }

    #[test]
    fn reports_every_problem_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(
            &file,
            "[grpc]\nlisten_addr = \"nowhere\"\nrequest_timeout = \"soon\"\n\
             [bus]\nmax_ack_pending = \"many\"\n[nonsense]\nx = 1\n",
        )
        .unwrap();
        let errors = load::<Cfg>("routing", Some(&file), &dev_env())
            .unwrap_err()
            .0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        // Every broken key, two of them in one section.
        assert_eq!(
            paths,
            [
                "bus.max_ack_pending",
                "grpc.listen_addr",
                "grpc.request_timeout",
                "nonsense"
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn broken_sections_do_not_hide_semantic_problems_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(
            &file,
            "[grpc]\nmax_message_bytes = 1\n[bus]\nmax_ack_pending = \"many\"\n[nonsense]\nx = 1\n",
        )
        .unwrap();
        let mut env = dev_env();
        env.insert("TANDEM_ROUTING__OUTBOX__BATCH_SIZE".into(), "0".into());
        let errors = load::<Cfg>("routing", Some(&file), &env).unwrap_err().0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bus.max_ack_pending",
                "nonsense",
                "grpc.max_message_bytes",
                "outbox.batch_size"
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn reports_every_semantic_problem() {
        let env = HashMap::from([
            (
                "TANDEM_ROUTING__GRPC__MAX_MESSAGE_BYTES".to_owned(),
                "0".to_owned(),
            ),
            (
                "TANDEM_ROUTING__BUS__STREAM_REPLICAS".to_owned(),
                "9".to_owned(),
            ),
            // Large enough to make a semaphore panic if it were accepted.
            (
                "TANDEM_ROUTING__GRPC__GLOBAL_CONCURRENCY_LIMIT".to_owned(),
                "3000000000000000000".to_owned(),
            ),
        ]);
        let errors = load::<Cfg>("routing", None, &env).unwrap_err().0;
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert!(
            paths.contains(&"grpc.global_concurrency_limit"),
            "{paths:?}"
        );
        assert!(paths.contains(&"grpc.max_message_bytes"), "{paths:?}");
        assert!(paths.contains(&"bus.stream_replicas"), "{paths:?}");
        assert!(paths.contains(&"auth"), "{paths:?}");
        assert!(paths.contains(&"database.url"), "{paths:?}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let mut env = dev_env();
        env.insert(
            "TANDEM_ROUTING__GRPC__LISTEN_ADDRESS".into(),
            "127.0.0.1:1".into(),
        );
        let errors = load::<Cfg>("routing", None, &env).unwrap_err().0;
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "grpc.listen_address");
        assert!(errors[0].message.contains("listen_address"), "{errors:?}");
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let cfg: Cfg = load("routing", None, &dev_env()).unwrap();
        assert!(!format!("{cfg:?}").contains(&"x".repeat(32)));
    }
}
