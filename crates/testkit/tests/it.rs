//! Integration tests: real servers, real crashes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use async_nats::jetstream::{self, stream};
use sqlx::{Connection as _, PgConnection};
use tandem_testkit::{MIN_NATS_VERSION, NatsServer, Postgres, parse_nats_version};
use tokio::io::{AsyncBufReadExt as _, BufReader};

#[tokio::test]
async fn nats_jetstream_data_survives_kill_and_restart() -> Result<()> {
    let mut nats = NatsServer::start().await?;
    assert!(nats.version() >= MIN_NATS_VERSION);
    let port = nats.port();
    {
        let js = jetstream::new(async_nats::connect(nats.url()).await?);
        js.create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        let ack = js.publish("orders.1", "hello".into()).await?.await?;
        assert_eq!(ack.sequence, 1);
    }

    nats.kill().await?;
    assert!(!nats.is_running());
    nats.restart().await?;
    assert!(nats.is_running());
    assert_eq!(nats.port(), port);

    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let mut orders = js.get_stream("ORDERS").await?;
    assert_eq!(orders.info().await?.state.messages, 1);
    let msg = orders.get_raw_message(1).await?;
    assert_eq!(msg.subject.as_str(), "orders.1");
    assert_eq!(&msg.payload[..], b"hello");

    // A graceful stop + restart keeps the data too.
    nats.stop().await?;
    assert!(!nats.is_running());
    nats.restart().await?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    assert_eq!(
        js.get_stream("ORDERS").await?.info().await?.state.messages,
        1
    );
    Ok(())
}

#[tokio::test]
async fn postgres_row_survives_kill_and_restart() -> Result<()> {
    let mut pg = Postgres::start().await?;
    let url = pg.fresh_database().await?;
    assert!(url.starts_with(&format!("postgres://postgres@127.0.0.1:{}/t_", pg.port())));
    {
        let mut conn = PgConnection::connect(&url).await?;
        sqlx::query("CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)")
            .execute(&mut conn)
            .await?;
        sqlx::query("INSERT INTO t VALUES (1, 'survives')")
            .execute(&mut conn)
            .await?;
        conn.close().await?;
    }

    pg.kill().await?;
    assert!(!pg.is_running());
    assert!(PgConnection::connect(&url).await.is_err());
    pg.restart().await?;
    assert!(pg.is_running());

    let mut conn = PgConnection::connect(&url).await?;
    let v: String = sqlx::query_scalar("SELECT v FROM t WHERE id = 1")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(v, "survives");
    conn.close().await?;

    // Graceful stop + restart.
    pg.stop().await?;
    assert!(!pg.is_running());
    pg.restart().await?;
    let mut conn = PgConnection::connect(&url).await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&mut conn)
        .await?;
    assert_eq!(n, 1);
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn postgres_databases_are_isolated_and_names_checked() -> Result<()> {
    let pg = tandem_testkit::shared_postgres().await;
    let a = pg.fresh_database().await?;
    let b = pg.fresh_database().await?;
    assert_ne!(a, b);
    let named = pg.create_database("my_db_1").await?;
    assert!(named.ends_with("/my_db_1"));
    assert!(pg.create_database("my_db_1").await.is_err(), "duplicate");
    assert!(pg.create_database("bad\"name").await.is_err());
    assert!(pg.create_database("").await.is_err());
    PgConnection::connect(&a).await?.close().await?;
    Ok(())
}

#[tokio::test]
async fn dropping_servers_removes_processes_and_dirs() -> Result<()> {
    let nats = NatsServer::start().await?;
    let pg = Postgres::start().await?;
    let dirs = [nats.dir().to_path_buf(), pg.dir().to_path_buf()];
    let pids = [nats.pid().context("nats pid")?, pg.pid().context("pg pid")?];
    drop(nats);
    drop(pg);
    for dir in &dirs {
        ensure!(!dir.exists(), "{} still exists", dir.display());
        ensure!(
            processes_mentioning(dir).is_empty(),
            "processes left for {}",
            dir.display()
        );
    }
    for pid in pids {
        ensure!(!alive(pid), "pid {pid} still alive");
    }
    Ok(())
}

/// An old (< 2.10) nats-server is refused; skipped when none is installed.
#[tokio::test]
async fn old_nats_server_is_refused() -> Result<()> {
    if std::env::var("TANDEM_ALLOW_OLD_NATS").is_ok_and(|v| v == "1") {
        eprintln!("skipped: TANDEM_ALLOW_OLD_NATS=1");
        return Ok(());
    }
    let mut old = None;
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        let Ok(out) = std::process::Command::new(candidate)
            .arg("--version")
            .output()
        else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if parse_nats_version(&text).is_some_and(|v| v < MIN_NATS_VERSION) {
            old = Some(candidate);
            break;
        }
    }
    let Some(old) = old else {
        eprintln!("skipped: no nats-server older than {MIN_NATS_VERSION} installed");
        return Ok(());
    };
    let err = match NatsServer::start_with_binary(old).await {
        Ok(server) => bail!("{old} was accepted: {server:?}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(err.contains("older than 2.10.0"), "unexpected error: {err}");
    Ok(())
}

// ---- no leaks when the test process dies without dropping its servers ----

const LEAK_MODE: &str = "TANDEM_TESTKIT_LEAK_MODE";

/// Run by `no_process_left_behind` as a subprocess: starts the shared servers, reports them on
/// stderr, then exits without dropping them (`exit`) or waits to be SIGKILLed (`hang`).
#[tokio::test]
#[ignore = "helper of no_process_left_behind, which runs it in a subprocess"]
async fn leak_helper() {
    let nats = tandem_testkit::shared_nats().await;
    let pg = tandem_testkit::shared_postgres().await;
    for (name, dir, pid) in [("nats", nats.dir(), nats.pid()), ("pg", pg.dir(), pg.pid())] {
        eprintln!("LEAK {name} {} {}", pid.unwrap_or(0), dir.display());
    }
    eprintln!("LEAK ready");
    if std::env::var(LEAK_MODE).is_ok_and(|m| m == "hang") {
        tokio::time::sleep(Duration::from_secs(120)).await;
    }
}

#[tokio::test]
async fn no_process_left_behind() -> Result<()> {
    for mode in ["exit", "hang"] {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["leak_helper", "--exact", "--ignored", "--nocapture"])
            .env(LEAK_MODE, mode)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let mut servers: Vec<(u32, PathBuf)> = Vec::new();
        let read = async {
            while let Some(line) = lines.next_line().await? {
                let mut words = line.splitn(4, ' ');
                match (words.next(), words.next(), words.next(), words.next()) {
                    (Some("LEAK"), Some("ready"), _, _) => return Ok(()),
                    (Some("LEAK"), Some(_), Some(pid), Some(dir)) => {
                        servers.push((pid.parse()?, PathBuf::from(dir)));
                    }
                    _ => {}
                }
            }
            bail!("helper ended before it was ready")
        };
        tokio::time::timeout(Duration::from_secs(60), read).await??;
        ensure!(servers.len() == 2, "servers: {servers:?}");
        for (pid, dir) in &servers {
            ensure!(alive(*pid) && dir.exists(), "{mode}: server {pid} not up");
        }

        if mode == "hang" {
            child.start_kill()?; // SIGKILL the "test process"
        }
        let status = child.wait().await?;
        ensure!(
            mode == "hang" || status.success(),
            "helper failed: {status}"
        );

        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left: Vec<_> = servers
                .iter()
                .filter(|(pid, dir)| {
                    alive(*pid) || dir.exists() || !processes_mentioning(dir).is_empty()
                })
                .collect();
            if left.is_empty() {
                break;
            }
            ensure!(Instant::now() < deadline, "{mode}: left behind: {left:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Live (non-zombie) process.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Pids of processes whose command line mentions `dir` (like `pgrep -f DIR`).
fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(&needle)
            })
        })
        .filter(|&pid| alive(pid))
        .collect()
}
