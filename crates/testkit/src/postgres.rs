//! A throwaway PostgreSQL cluster.

use std::fmt;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;
use nix::unistd::{User, chown, geteuid};
use sqlx::{Connection as _, PgConnection};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::process::{self, Watchdog};

const READY_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
/// The OS user the server runs as when the tests run as root.
const OS_USER: &str = "postgres";

/// Where the PostgreSQL programs live.
#[derive(Debug, Clone)]
pub struct PgBins {
    /// `initdb`.
    pub initdb: PathBuf,
    /// `postgres` (the server itself).
    pub postgres: PathBuf,
}

/// Locates `initdb` and `postgres`: `$PG_BIN_DIR`, else the highest
/// `/usr/lib/postgresql/<N>/bin`, else `PATH`.
pub fn find_pg_bins() -> Result<PgBins> {
    let in_dir = |dir: &Path| PgBins {
        initdb: dir.join("initdb"),
        postgres: dir.join("postgres"),
    };
    if let Some(dir) = std::env::var_os("PG_BIN_DIR").filter(|v| !v.is_empty()) {
        let bins = in_dir(Path::new(&dir));
        if !bins.initdb.is_file() || !bins.postgres.is_file() {
            bail!(
                "PG_BIN_DIR={} has no initdb and postgres",
                Path::new(&dir).display()
            );
        }
        return Ok(bins);
    }
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bins = in_dir(&entry.path().join("bin"));
            (bins.initdb.is_file() && bins.postgres.is_file()).then_some((major, bins))
        })
        .max_by_key(|(major, _)| *major);
    if let Some((_, bins)) = debian {
        return Ok(bins);
    }
    match (process::which("initdb"), process::which("postgres")) {
        (Some(initdb), Some(postgres)) => Ok(PgBins { initdb, postgres }),
        _ => bail!(
            "PostgreSQL not found (no /usr/lib/postgresql/*/bin, no initdb+postgres on PATH): \
             apt-get install postgresql, or set PG_BIN_DIR"
        ),
    }
}

/// How to drop root privileges for `initdb`/`postgres`, which refuse to run as root.
#[derive(Debug, Clone)]
enum RunAs {
    /// Run directly (not root).
    Me,
    /// `setpriv … PROGRAM`: execs in place, so our child *is* the server.
    Setpriv(PathBuf),
    /// `runuser -u postgres -- PROGRAM`: forks, so signals go to the postmaster pid instead.
    Runuser(PathBuf),
}

impl RunAs {
    fn command(&self, program: &Path) -> Command {
        match self {
            Self::Me => Command::new(program),
            Self::Setpriv(setpriv) => {
                let mut cmd = Command::new(setpriv);
                cmd.arg(format!("--reuid={OS_USER}"))
                    .arg(format!("--regid={OS_USER}"))
                    .arg("--init-groups")
                    .arg("--")
                    .arg(program);
                cmd
            }
            Self::Runuser(runuser) => {
                let mut cmd = Command::new(runuser);
                cmd.arg("-u").arg(OS_USER).arg("--").arg(program);
                cmd
            }
        }
    }
}

/// A PostgreSQL server (one fresh cluster) on a free loopback port, data in a temp dir under
/// `/tmp`, trust auth, user `postgres`, durability knobs off (`fsync`, `full_page_writes`).
///
/// Dropping it SIGKILLs the server and deletes the cluster.
pub struct Postgres {
    bins: PgBins,
    run_as: RunAs,
    port: u16,
    child: Option<Child>,
    watchdog: Option<Watchdog>,
    // Declared last: dropped after the processes are gone.
    dir: TempDir,
}

impl Postgres {
    /// Creates a cluster with `initdb` and starts `postgres` on it.
    pub async fn start() -> Result<Self> {
        let bins = find_pg_bins()?;
        let dir = tempfile::Builder::new()
            .prefix("tandem-pg-")
            .tempdir_in("/tmp")
            .context("creating the postgres temp dir in /tmp")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .context("chmod 0755 on the postgres temp dir")?;
        let run_as = if geteuid().is_root() {
            let user = User::from_name(OS_USER)
                .context("looking up the postgres OS user")?
                .ok_or_else(|| {
                    anyhow!(
                        "running as root needs a '{OS_USER}' OS user to run PostgreSQL \
                         (apt-get install postgresql creates it)"
                    )
                })?;
            chown(dir.path(), Some(user.uid), Some(user.gid))
                .with_context(|| format!("chown {OS_USER} {}", dir.path().display()))?;
            if let Some(setpriv) = process::which("setpriv") {
                RunAs::Setpriv(setpriv)
            } else if let Some(runuser) = process::which("runuser") {
                RunAs::Runuser(runuser)
            } else {
                bail!("running as root needs setpriv or runuser (util-linux) to drop privileges");
            }
        } else {
            RunAs::Me
        };
        let mut pg = Self {
            bins,
            run_as,
            port: process::free_port()?,
            child: None,
            watchdog: None,
            dir,
        };
        pg.initdb().await?;
        pg.spawn().await?;
        Ok(pg)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `name` on this server.
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://{OS_USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir: `data/` (the cluster), `postgres.log`, `initdb.log` and the Unix socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's combined stdout/stderr, appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The postmaster's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        let child = self.child.as_ref()?.id()?;
        match self.run_as {
            RunAs::Runuser(_) => {
                process::pid_file_pid(&self.data_dir().join("postmaster.pid")).or(Some(child))
            }
            RunAs::Me | RunAs::Setpriv(_) => Some(child),
        }
    }

    /// Whether the postmaster is alive.
    pub fn is_running(&self) -> bool {
        self.pid().is_some_and(|pid| !process::is_dead(pid))
    }

    /// Creates database `name` (letters, digits, `_`; at most 63 bytes) and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            bail!("invalid database name {name:?}: use [A-Za-z0-9_], at most 63 bytes");
        }
        let mut conn = PgConnection::connect(&self.url())
            .await
            .context("connecting to create a database")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        conn.close().await?;
        Ok(self.database_url(name))
    }

    /// Creates a database with a unique name (`t_<uuid>`) and returns its URL.
    pub async fn fresh_database(&self) -> Result<String> {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        self.create_database(&name).await
    }

    /// Fast shutdown: SIGINT to the postmaster and wait (SIGKILL after 15 s). Data is kept.
    pub async fn stop(&mut self) -> Result<()> {
        self.disarm();
        let Some(pid) = self.pid() else {
            self.child = None;
            return Ok(());
        };
        process::send(pid, Signal::SIGINT)?;
        let waited = match self.child.as_mut() {
            Some(child) => tokio::time::timeout(STOP_TIMEOUT, child.wait())
                .await
                .is_ok(),
            None => true,
        };
        if !waited {
            return self.kill().await;
        }
        self.child = None;
        Ok(())
    }

    /// Crash: SIGKILL the postmaster and its children at once (as an OOM kill of the container
    /// would) and wait for them. Data is kept; the next start runs crash recovery.
    pub async fn kill(&mut self) -> Result<()> {
        self.disarm();
        let Some(pid) = self.pid() else {
            self.child = None;
            return Ok(());
        };
        let mut pids = process::children_of(pid);
        pids.push(pid);
        for &p in &pids {
            process::send(p, Signal::SIGKILL)?;
        }
        if let Some(mut child) = self.child.take() {
            // The child is the postmaster (setpriv, direct) or runuser, which exits with it.
            process::kill_child(&mut child).await?;
        }
        if !process::wait_dead(&pids, STOP_TIMEOUT).await {
            bail!("postgres processes {pids:?} survived SIGKILL");
        }
        Ok(())
    }

    /// Starts the server again on the same port and data dir (stopping it first if it runs).
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.stop().await?;
        }
        self.spawn().await
    }

    fn disarm(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.disarm();
        }
    }

    async fn initdb(&self) -> Result<()> {
        let log = self.dir.path().join("initdb.log");
        let (stdout, stderr) = process::log_stdio(&log)?;
        let mut child = self
            .run_as
            .command(&self.bins.initdb)
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-A",
                "trust",
                "-U",
                OS_USER,
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .arg("--no-sync")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", self.bins.initdb.display()))?;
        let status = tokio::time::timeout(INITDB_TIMEOUT, child.wait())
            .await
            .map_err(|_| anyhow!("initdb timed out after {INITDB_TIMEOUT:?}"))?
            .context("waiting for initdb")?;
        if !status.success() {
            bail!(
                "initdb failed ({status}); output:\n{}",
                process::log_tail(&log, 40)
            );
        }
        Ok(())
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = self.log_path();
        let (stdout, stderr) = process::log_stdio(&log)?;
        let child = self
            .run_as
            .command(&self.bins.postgres)
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", self.bins.postgres.display()))?;
        let pid = child.id().context("postgres exited at once")?;
        self.child = Some(child);
        let pid_file = self.data_dir().join("postmaster.pid");
        self.watchdog = Some(Watchdog::spawn(self.dir.path(), Some(&pid_file), &[pid])?);
        if let Err(e) = self.wait_ready().await {
            let _ = self.kill().await;
            return Err(e.context(format!(
                "postgres on port {} did not become ready; log tail:\n{}",
                self.port,
                process::log_tail(&log, 40)
            )));
        }
        Ok(())
    }

    /// Waits until a real connection succeeds (after crash recovery, if any).
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = self.url();
        let mut last_err = anyhow!("not tried");
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("postgres exited early: {status}");
            }
            match tokio::time::timeout(Duration::from_secs(3), PgConnection::connect(&url)).await {
                Ok(Ok(conn)) => {
                    let _ = conn.close().await;
                    return Ok(());
                }
                Ok(Err(e)) => last_err = e.into(),
                Err(_) => last_err = anyhow!("connect timed out"),
            }
            if Instant::now() >= deadline {
                return Err(last_err.context(format!("timed out after {READY_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.disarm();
        let Some(pid) = self.pid() else {
            return;
        };
        let mut pids = process::children_of(pid);
        pids.push(pid);
        for &p in &pids {
            let _ = process::send(p, Signal::SIGKILL);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
        }
        // Let them die before the temp dir is removed (the Child reaps itself later).
        process::wait_dead_blocking(&pids, Duration::from_secs(5));
    }
}

impl fmt::Debug for Postgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Postgres")
            .field("url", &self.url())
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}
