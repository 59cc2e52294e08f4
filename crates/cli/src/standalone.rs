//! The standalone mode: all services in one process, one gRPC port, SQLite files in a data
//! directory and the in-process bus. It is the default way to run Tandem, not a test double:
//! the same service code runs, over the storage and bus adapters that pass the same contract
//! suites as PostgreSQL and NATS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tandem_platform::auth::Authenticator;
use tandem_platform::bus::memory::MemoryBus;
use tandem_platform::config::{
    AuthConfig, BusConfig, BusKind, ConfigError, DatabaseConfig, GrpcConfig, OutboxConfig, Secret,
    ServiceConfig, TelemetryConfig, Validate, join,
};
use tandem_platform::grpc::GrpcServer;
use tandem_platform::runtime::{Service, StartContext, prepare};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Options of `tandem standalone`.
#[derive(clap::Args)]
pub struct Options {
    /// Where the SQLite files and the development key live.
    #[arg(long, default_value = ".tandem")]
    pub data_dir: PathBuf,
    /// The gRPC address; overrides the configuration.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// A TOML configuration file; `TANDEM_STANDALONE__SECTION__KEY` variables override it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Seeds the `demo` tenant (scenarios, intents, articles, queues, agents, alert and adjustment
    /// rules in Chinese and English) through the services' own APIs once the server accepts
    /// connections; skipped when the data directory already holds the same demo content.
    #[arg(long)]
    pub demo: bool,
}

/// Configuration of the standalone process: the shared sections plus each service's settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StandaloneConfig {
    /// The one gRPC server.
    pub grpc: GrpcConfig,
    /// Logs, traces, metrics.
    pub telemetry: TelemetryConfig,
    /// Token verification; without keys, a development secret in the data directory is used.
    pub auth: AuthConfig,
    /// The outbox relays.
    pub outbox: OutboxConfig,
    /// Dialog settings.
    pub dialog: tandem_dialog::Settings,
    /// Routing settings.
    pub routing: tandem_routing::Settings,
    /// Knowledge settings.
    pub knowledge: tandem_knowledge::Settings,
    /// Feedback settings.
    pub feedback: tandem_feedback::Settings,
    /// Policy settings.
    pub policy: tandem_policy::Settings,
}

impl Validate for StandaloneConfig {
    fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        self.grpc.validate(&join(path, "grpc"), errors);
        self.telemetry.validate(&join(path, "telemetry"), errors);
        // Auth without keys is completed with the development secret, then validated.
        self.outbox.validate(&join(path, "outbox"), errors);
        self.dialog.validate(&join(path, "dialog"), errors);
        self.routing.validate(&join(path, "routing"), errors);
        self.knowledge.validate(&join(path, "knowledge"), errors);
        self.feedback.validate(&join(path, "feedback"), errors);
        self.policy.validate(&join(path, "policy"), errors);
    }
}

/// The name of the development secret file in the data directory.
pub const DEV_SECRET_FILE: &str = "dev-secret";

/// Loads the standalone configuration with auth completed from the data directory.
pub fn load_config(
    config: Option<&Path>,
    data_dir: &Path,
    env: &HashMap<String, String>,
) -> anyhow::Result<StandaloneConfig> {
    let mut cfg: StandaloneConfig = tandem_platform::config::load("standalone", config, env)?;
    let has_keys = !cfg.auth.public_key_files.is_empty()
        || cfg.auth.jwks_file.is_some()
        || cfg.auth.allow_hs256;
    if !has_keys {
        cfg.auth.allow_hs256 = true;
        cfg.auth.hs256_secret = dev_secret(data_dir)?;
    }
    let mut errors = Vec::new();
    cfg.auth.validate("auth", &mut errors);
    if !errors.is_empty() {
        return Err(tandem_platform::config::ConfigErrors(errors).into());
    }
    Ok(cfg)
}

/// Reads the development secret, creating it on first use.
fn dev_secret(data_dir: &Path) -> anyhow::Result<Secret> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let path = data_dir.join(DEV_SECRET_FILE);
    if let Ok(secret) = std::fs::read_to_string(&path) {
        let secret = secret.trim().to_owned();
        if secret.len() >= 32 {
            return Ok(Secret::new(secret));
        }
    }
    use rand::distr::{Alphanumeric, SampleString as _};
    let secret = Alphanumeric.sample_string(&mut rand::rng(), 48);
    write_private(&path, &secret).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Secret::new(secret))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents.as_bytes())
}

fn service_config<T: Clone>(
    cfg: &StandaloneConfig,
    data_dir: &Path,
    name: &str,
    settings: &T,
) -> ServiceConfig<T> {
    ServiceConfig {
        grpc: cfg.grpc.clone(),
        telemetry: cfg.telemetry.clone(),
        auth: cfg.auth.clone(),
        database: DatabaseConfig {
            url: Secret::new(format!(
                "sqlite://{}",
                data_dir.join(format!("{name}.db")).display()
            )),
            max_connections: 8,
            ..DatabaseConfig::default()
        },
        bus: BusConfig {
            kind: BusKind::Memory,
            ..BusConfig::default()
        },
        outbox: OutboxConfig {
            poll_interval: std::time::Duration::from_millis(50),
            ..cfg.outbox.clone()
        },
        service: settings.clone(),
    }
}

struct Shared<'a> {
    bus: &'a MemoryBus,
    auth: &'a Arc<Authenticator>,
    server: &'a mut GrpcServer,
    tracker: &'a TaskTracker,
    shutdown: &'a CancellationToken,
}

async fn start<S: Service>(
    cfg: ServiceConfig<S::Settings>,
    shared: &mut Shared<'_>,
) -> anyhow::Result<()> {
    let (db, bus, outbox) =
        prepare::<S>(&cfg, Some(shared.bus), shared.tracker, shared.shutdown).await?;
    S::start(
        StartContext {
            db,
            bus,
            bus_config: cfg.bus.clone(),
            grpc_config: cfg.grpc.clone(),
            auth: Arc::clone(shared.auth),
            outbox,
            server: shared.server,
            tracker: shared.tracker,
            shutdown: shared.shutdown.clone(),
        },
        &cfg.service,
    )
    .await
    .with_context(|| format!("{} failed to start", S::NAME))
}

/// Runs every service in this process until Ctrl-C or SIGTERM.
pub async fn run(options: Options, env: HashMap<String, String>) -> anyhow::Result<()> {
    let mut cfg = load_config(options.config.as_deref(), &options.data_dir, &env)?;
    if let Some(listen) = options.listen {
        cfg.grpc.listen_addr = listen;
    }
    let telemetry = tandem_platform::telemetry::init("standalone", &cfg.telemetry, &env)?;
    let listener = TcpListener::bind(cfg.grpc.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.grpc.listen_addr))?;
    let shutdown = tandem_platform::shutdown::on_signal();
    let result = serve(cfg, &options.data_dir, listener, shutdown, options.demo).await;
    telemetry.shutdown().await;
    result
}

/// Serves every service on `listener` until `shutdown` is cancelled. With `demo`, the demo
/// tenant is seeded once the server accepts connections; if that fails the server stops and the
/// error is returned, since a half-seeded demo is worse than none.
pub async fn serve(
    mut cfg: StandaloneConfig,
    data_dir: &Path,
    listener: TcpListener,
    shutdown: CancellationToken,
    demo: bool,
) -> anyhow::Result<()> {
    // The bot searches the knowledge base over gRPC like a separate deployment does, here on
    // this process's own port, unless the configuration points it elsewhere.
    if cfg.dialog.knowledge_endpoint.trim().is_empty() {
        let own = listener.local_addr()?;
        let host = if own.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), own.port())
        } else {
            own
        };
        cfg.dialog.knowledge_endpoint = format!("http://{host}");
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let tracker = TaskTracker::new();
    let memory_bus = MemoryBus::open(&data_dir.join("bus.db"))
        .await
        .context("cannot open the in-process bus journal")?;
    let auth = Arc::new(
        Authenticator::from_config(&cfg.auth).context("cannot load token verification keys")?,
    );
    let mut server = GrpcServer::new(&cfg.grpc);
    {
        let mut shared = Shared {
            bus: &memory_bus,
            auth: &auth,
            server: &mut server,
            tracker: &tracker,
            shutdown: &shutdown,
        };
        start::<tandem_policy::Policy>(
            service_config(&cfg, data_dir, "policy", &cfg.policy),
            &mut shared,
        )
        .await?;
        start::<tandem_knowledge::Knowledge>(
            service_config(&cfg, data_dir, "knowledge", &cfg.knowledge),
            &mut shared,
        )
        .await?;
        start::<tandem_routing::Routing>(
            service_config(&cfg, data_dir, "routing", &cfg.routing),
            &mut shared,
        )
        .await?;
        start::<tandem_dialog::Dialog>(
            service_config(&cfg, data_dir, "dialog", &cfg.dialog),
            &mut shared,
        )
        .await?;
        start::<tandem_feedback::Feedback>(
            service_config(&cfg, data_dir, "feedback", &cfg.feedback),
            &mut shared,
        )
        .await?;
    }
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %data_dir.display(), services = server.service_names().len(), "tandem standalone serving");
    println!(
        "tandem standalone listening on {addr} (data in {})",
        data_dir.display()
    );
    println!("  services: {}", server.service_names().join(", "));
    println!(
        "  token:    tandem token --data-dir {} --tenant demo --role admin",
        data_dir.display()
    );
    println!("  press Ctrl-C to stop");
    // The listener is bound, so the seeding's connections wait in its backlog until `serve`
    // accepts them.
    let seeding = demo.then(|| {
        let auth = cfg.auth.clone();
        let data_dir = data_dir.to_owned();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                seeded = crate::demo::seed(addr, &auth, &data_dir) => match seeded {
                    Ok(summary) => {
                        crate::demo::print_ready(&summary, addr, &data_dir);
                        Ok(())
                    }
                    Err(error) => {
                        tracing::error!(error = format!("{error:#}"), "demo seeding failed; stopping");
                        shutdown.cancel();
                        Err(error.context("demo seeding failed"))
                    }
                },
                () = shutdown.cancelled() => Ok(()),
            }
        })
    });
    let served = server.serve(listener, shutdown.clone()).await;
    shutdown.cancel();
    let seeded = match seeding {
        Some(task) => task.await.context("the demo seeding task panicked")?,
        None => Ok(()),
    };
    tandem_platform::runtime::wait_for_tasks(&tracker, tandem_platform::runtime::TASKS_STOP_WITHIN)
        .await;
    if let Err(error) = memory_bus.flush().await {
        tracing::warn!(%error, "bus journal flush failed at shutdown");
    }
    served.context("grpc server failed")?;
    seeded
}
