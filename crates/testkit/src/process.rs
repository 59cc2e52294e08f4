//! Process plumbing shared by the servers: ports, signals, `/proc` probes, logs and the
//! process-death watchdog.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// A loopback TCP port that was free a moment ago (bound to `127.0.0.1:0`, then released).
pub(crate) fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).context("binding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Sends `sig` to `pid`; a process that is already gone is not an error.
pub(crate) fn send(pid: u32, sig: Signal) -> Result<()> {
    let raw = i32::try_from(pid).with_context(|| format!("pid {pid} out of range"))?;
    match signal::kill(Pid::from_raw(raw), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("sending {sig} to pid {pid}")),
    }
}

/// State letter and parent pid from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// True when `pid` no longer names a running process (gone, or a zombie awaiting its reaper).
pub(crate) fn is_dead(pid: u32) -> bool {
    !matches!(stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Pids of the live children of `parent`, found by scanning `/proc`.
pub(crate) fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| matches!(stat(pid), Some((state, ppid)) if ppid == parent && state != 'Z'))
        .collect()
}

/// SIGKILLs a child and reaps it; a child that already exited is fine.
pub(crate) async fn kill_child(child: &mut tokio::process::Child) -> Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    child.kill().await.context("killing a server process")
}

/// Polls until every pid is dead; false on timeout.
pub(crate) async fn wait_dead(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|&p| is_dead(p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocking variant of [`wait_dead`], for `Drop`.
pub(crate) fn wait_dead_blocking(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|&p| is_dead(p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Opens (appending) a server log and returns it as stdout and stderr for a child.
pub(crate) fn log_stdio(path: &Path) -> Result<(Stdio, Stdio)> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log {}", path.display()))?;
    writeln!(file, "---- tandem-testkit: starting server ----")?;
    let err = file.try_clone()?;
    Ok((Stdio::from(file), Stdio::from(err)))
}

/// The last `lines` lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Finds an executable called `name` on `PATH`.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Shell script run by the watchdog; see the crate docs ("Process-death watchdog").
///
/// `$1` = directory to delete afterwards, `$2` = pid file whose first line is one more pid to
/// kill (may be empty), `$3…` = pids to kill.
const WATCHDOG_SCRIPT: &str = r#"
dir=$1; pidfile=$2; shift 2
# Blocks until EOF: only the test process holds the write end of this pipe.
while read -r _; do :; done
pids="$*"
if [ -n "$pidfile" ] && [ -r "$pidfile" ]; then
    read -r pm < "$pidfile" || true
    case "$pm" in ''|*[!0-9]*) ;; *) pids="$pids $pm" ;; esac
fi
for p in $pids; do pkill -KILL -P "$p" 2>/dev/null || true; done
kill -KILL $pids 2>/dev/null || true
alive() {
    s=$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' "/proc/$1/status" 2>/dev/null)
    [ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]
}
i=0
while [ "$i" -lt 200 ]; do
    any=
    for p in $pids; do if alive "$p"; then any=1; fi; done
    [ -z "$any" ] && break
    sleep 0.05
    i=$((i + 1))
done
rm -rf -- "$dir"
"#;

/// A `/bin/sh` process that SIGKILLs a server (and deletes its directory) as soon as the test
/// process that owns this struct exits, however it exits.
///
/// Dropping the `Watchdog` normally also triggers it (its stdin closes), so owners call
/// [`Watchdog::disarm`] first when they mean to keep the server's data (stop, kill, restart) or
/// clean up themselves (`Drop`).
pub(crate) struct Watchdog {
    child: std::process::Child,
}

impl Watchdog {
    pub(crate) fn spawn(dir: &Path, pid_file: Option<&Path>, pids: &[u32]) -> Result<Self> {
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("tandem-testkit-watchdog")
            .arg(dir)
            .arg(pid_file.map(Path::as_os_str).unwrap_or_default());
        for pid in pids {
            cmd.arg(pid.to_string());
        }
        // std creates the pipe with O_CLOEXEC, so no other child inherits the write end: the
        // pipe sees EOF exactly when this process closes it (drop or exit, including SIGKILL).
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning the watchdog (/bin/sh)")?;
        Ok(Self { child })
    }

    /// Stops the watchdog without letting it act.
    pub(crate) fn disarm(mut self) {
        // SIGKILL, then reap; errors mean it is already gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pid on the first line of a pid file (such as PostgreSQL's `postmaster.pid`).
pub(crate) fn pid_file_pid(path: &Path) -> Option<u32> {
    let file = File::open(path).ok()?;
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(file), &mut first).ok()?;
    first.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_bogus_pid_is_dead() {
        assert!(!is_dead(std::process::id()));
        assert!(is_dead(u32::MAX - 1));
    }

    #[test]
    fn free_port_is_nonzero() {
        assert_ne!(free_port().unwrap(), 0);
    }
}
