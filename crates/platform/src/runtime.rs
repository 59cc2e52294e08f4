//! Wiring a service process: the same steps for every service, whether it runs alone
//! (`tandem serve <service>`, its own binary) or beside the others in the standalone mode.
//!
//! A service implements [`Service`]: its settings, its migrations and a `start` that registers
//! its gRPC services and spawns its consumers. [`serve`] does the rest: database and migrations,
//! bus and streams, the outbox relay, authentication, the gRPC server and an orderly shutdown.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::bus::Bus;
use crate::bus::memory::MemoryBus;
use crate::config::{BusConfig, GrpcConfig, ServiceConfig, Validate};
use crate::db::{Db, Migrations};
use crate::grpc::GrpcServer;
use crate::inbox;
use crate::outbox::{OutboxRelay, OutboxWaker};

/// What a service gets to wire itself.
pub struct StartContext<'a> {
    /// The service's database, migrated.
    pub db: Db,
    /// The event bus, streams ensured.
    pub bus: Bus,
    /// Bus settings, for consumer specs.
    pub bus_config: BusConfig,
    /// gRPC limits, for `limited!`.
    pub grpc_config: GrpcConfig,
    /// Token verification for the business services.
    pub auth: Arc<Authenticator>,
    /// Wakes the outbox relay after a commit that wrote events.
    pub outbox: OutboxWaker,
    /// The server to add gRPC services to.
    pub server: &'a mut GrpcServer,
    /// Tracks background tasks; the process waits for them at shutdown.
    pub tracker: &'a TaskTracker,
    /// Cancelled when the process shuts down.
    pub shutdown: CancellationToken,
}

/// A Tandem service.
pub trait Service {
    /// The context name: `dialog`, `routing`, …
    const NAME: &'static str;
    /// Settings of this service, under `[service]` in its configuration.
    type Settings: Serialize + DeserializeOwned + Default + Validate + Clone + Send + Sync + 'static;

    /// The service's migrations for both engines.
    fn migrations() -> Migrations;

    /// Registers gRPC services and spawns background work.
    fn start(
        ctx: StartContext<'_>,
        settings: &Self::Settings,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Opens the database, migrates, connects the bus and starts the outbox relay of one service,
/// and the pruning of its inbox.
pub async fn prepare<S: Service>(
    cfg: &ServiceConfig<S::Settings>,
    memory_bus: Option<&MemoryBus>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Db, Bus, OutboxWaker)> {
    let db = Db::connect(&cfg.database)
        .await
        .with_context(|| format!("{}: cannot open the database", S::NAME))?;
    db.migrate(Some(S::migrations()))
        .await
        .with_context(|| format!("{}: migrations failed", S::NAME))?;
    let bus = Bus::connect(&cfg.bus, memory_bus)
        .await
        .with_context(|| format!("{}: cannot connect to the event bus", S::NAME))?;
    bus.ensure_streams()
        .await
        .with_context(|| format!("{}: cannot create the event streams", S::NAME))?;
    let relay = OutboxRelay::new(db.clone(), bus.clone(), cfg.outbox.clone())
        .with_wakeups(tandem_proto::events::outbox_wakeups_for(S::NAME));
    let waker = relay.waker();
    tracker.spawn(relay.run(shutdown.clone()));
    tracker.spawn(inbox::prune_until(
        db.clone(),
        cfg.bus.max_age + std::time::Duration::from_secs(24 * 3600),
        inbox::PRUNE_EVERY,
        shutdown.clone(),
    ));
    Ok((db, bus, waker))
}

/// Runs one service on `listener` until `shutdown` is cancelled.
pub async fn serve<S: Service>(
    cfg: ServiceConfig<S::Settings>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with::<S>(cfg, None, listener, shutdown).await
}

/// Like [`serve`], on `memory_bus` when the configuration selects the in-process bus: several
/// services (or a test and a service) in one process then share one bus.
pub async fn serve_with<S: Service>(
    cfg: ServiceConfig<S::Settings>,
    memory_bus: Option<&MemoryBus>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Unreadable or malformed key files stop the start before any connection is made.
    let auth = Arc::new(
        Authenticator::from_config(&cfg.auth).context("cannot load token verification keys")?,
    );
    let tracker = TaskTracker::new();
    // A dependency that is down can make start-up wait; a shutdown request still ends it.
    let prepared = tokio::select! {
        prepared = prepare::<S>(&cfg, memory_bus, &tracker, &shutdown) => prepared?,
        () = shutdown.cancelled() => {
            tracing::info!(service = S::NAME, "shutdown requested during start-up");
            tracker.close();
            tracker.wait().await;
            return Ok(());
        }
    };
    let (db, bus, outbox) = prepared;
    let mut server = GrpcServer::new(&cfg.grpc);
    S::start(
        StartContext {
            db: db.clone(),
            bus: bus.clone(),
            bus_config: cfg.bus.clone(),
            grpc_config: cfg.grpc.clone(),
            auth,
            outbox,
            server: &mut server,
            tracker: &tracker,
            shutdown: shutdown.clone(),
        },
        &cfg.service,
    )
    .await?;
    tracing::info!(service = S::NAME, addr = %listener.local_addr()?, "serving");
    let served = server.serve(listener, shutdown.clone()).await;
    shutdown.cancel();
    wait_for_tasks(&tracker, TASKS_STOP_WITHIN).await;
    bus.close().await;
    if tokio::time::timeout(DB_CLOSE_WITHIN, db.close())
        .await
        .is_err()
    {
        tracing::warn!("database connections still in use at shutdown, leaving them");
    }
    served.context("grpc server failed")
}

/// How long a stopping process waits for its background tasks after the gRPC drain. They were
/// told to stop when shutdown began, so they have had the drain's time already. Together with
/// the bus flush (at most 2 s) and [`DB_CLOSE_WITHIN`], a process ends at most 9 s after its
/// drain (`scripts/check_k8s_policy.py` counts them against the pod's grace period).
pub const TASKS_STOP_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a stopping process waits for its database connections to be given back: a call the
/// drain gave up on may still hold one.
pub const DB_CLOSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits for background tasks to stop, at most `limit`: a task stuck on an unreachable
/// dependency must not keep the process alive (whatever it had not finished is redone by the
/// outbox and the broker's redelivery).
pub async fn wait_for_tasks(tracker: &TaskTracker, limit: std::time::Duration) {
    tracker.close();
    if tokio::time::timeout(limit, tracker.wait()).await.is_err() {
        tracing::warn!(
            remaining = tracker.len(),
            "background tasks did not stop in time"
        );
    }
}

/// Command-line options every service binary accepts.
#[derive(Debug, Default, Clone)]
pub struct Args {
    /// An optional TOML configuration file.
    pub config: Option<PathBuf>,
}

impl Args {
    /// Parses `--config FILE` (or `-c FILE`) from the process arguments.
    pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Self> {
        let mut out = Args::default();
        let mut args = args.into_iter().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-c" | "--config" => {
                    out.config = Some(args.next().context("--config needs a file")?.into())
                }
                "-h" | "--help" => anyhow::bail!(
                    "usage: [--config FILE]; settings also come from TANDEM_<SERVICE>__SECTION__KEY"
                ),
                other => anyhow::bail!("unknown argument {other:?}"),
            }
        }
        Ok(out)
    }
}

/// The `main` of a service binary: reads the process's arguments and environment, runs the
/// service and turns the outcome into an exit code, printing the error chain on failure.
pub async fn binary_main<S: Service>() -> std::process::ExitCode {
    let env = std::env::vars().collect();
    let result = match Args::parse(std::env::args()) {
        Ok(args) => main::<S>(args, env).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tandem-{}: {error:#}", S::NAME);
            std::process::ExitCode::FAILURE
        }
    }
}

/// The whole life of a single-service process: configuration, telemetry, bind, serve.
pub async fn main<S: Service>(args: Args, env: HashMap<String, String>) -> anyhow::Result<()> {
    let cfg: ServiceConfig<S::Settings> =
        crate::config::load(S::NAME, args.config.as_deref(), &env)?;
    let telemetry = crate::telemetry::init(S::NAME, &cfg.telemetry, &env)?;
    let listener = TcpListener::bind(cfg.grpc.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.grpc.listen_addr))?;
    let shutdown = crate::shutdown::on_signal();
    let result = serve::<S>(cfg, listener, shutdown).await;
    telemetry.shutdown().await;
    result
}
