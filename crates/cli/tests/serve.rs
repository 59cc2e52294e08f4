//! `tandem serve <service>` as production runs it: each of the five services is its own process,
//! configured only through `TANDEM_<SERVICE>__…` variables, on one PostgreSQL (a schema per
//! service) and one NATS JetStream server. Every process reports SERVING for exactly its own
//! gRPC services, declares its stream and migrates its outbox and inbox, serves `/metrics` when
//! asked to, and exits 0 on SIGTERM; a process with a bad configuration refuses to start and
//! names every problem.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sqlx::Connection as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use tandem_testkit::{NatsServer, Postgres};

/// One service as this test expects to find it.
struct Expected {
    /// The `tandem serve` argument, also the schema and the env prefix.
    name: &'static str,
    /// The gRPC services it reports and lists.
    grpc: &'static [&'static str],
    /// Its JetStream stream.
    stream: &'static str,
}

const SERVICES: [Expected; 5] = [
    Expected {
        name: "dialog",
        grpc: tandem_dialog::GRPC_SERVICES,
        stream: "TANDEM_DIALOG",
    },
    Expected {
        name: "routing",
        grpc: tandem_routing::GRPC_SERVICES,
        stream: "TANDEM_ROUTING",
    },
    Expected {
        name: "knowledge",
        grpc: tandem_knowledge::GRPC_SERVICES,
        stream: "TANDEM_KNOWLEDGE",
    },
    Expected {
        name: "feedback",
        grpc: tandem_feedback::GRPC_SERVICES,
        stream: "TANDEM_FEEDBACK",
    },
    Expected {
        name: "policy",
        grpc: tandem_policy::GRPC_SERVICES,
        stream: "TANDEM_POLICY",
    },
];

/// The service that also serves Prometheus metrics.
const WITH_METRICS: &str = "policy";
const HEALTH: &str = "grpc.health.v1.Health";
const DEV_SECRET: &str = "serve-test-secret-of-at-least-32-bytes";

const STARTUP_LIMIT: Duration = Duration::from_secs(20);
const EXIT_LIMIT: Duration = Duration::from_secs(3);
const REFUSAL_LIMIT: Duration = Duration::from_secs(5);
const CALL_LIMIT: Duration = Duration::from_secs(5);

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// `TANDEM_<SERVICE>__<key>`.
fn setting(service: &str, key: &str) -> String {
    format!("TANDEM_{}__{key}", service.to_uppercase())
}

/// A `tandem serve` process. Its output goes to files so a failing test can show it, and it is
/// killed when dropped, so a failing test leaves nothing running.
struct Process {
    name: &'static str,
    child: Child,
    pid: Pid,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Process {
    /// Runs `tandem serve <name>` with only `settings` as configuration: no file, and none of
    /// the developer's own `TANDEM_*` variables.
    fn spawn(name: &'static str, settings: &[(String, String)], logs: &Path) -> Self {
        let stdout = logs.join(format!("{name}.stdout"));
        let stderr = logs.join(format!("{name}.stderr"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_tandem"));
        command
            .args(["serve", name])
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .kill_on_drop(true);
        for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("TANDEM_")) {
            command.env_remove(key);
        }
        command.envs(settings.iter().map(|(k, v)| (k, v)));
        let child = command.spawn().unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
        Self {
            name,
            child,
            pid,
            stdout,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap()
    }

    fn output(&self) -> String {
        format!(
            "{} stdout:\n{}\n{} stderr:\n{}",
            self.name,
            std::fs::read_to_string(&self.stdout).unwrap(),
            self.name,
            self.stderr()
        )
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("still running after {limit:?}\n{}", self.output()),
        }
    }
}

/// A service process with the address it serves gRPC on.
struct Service {
    expected: &'static Expected,
    addr: SocketAddr,
    process: Process,
}

/// The settings every service gets: its own listen address and schema, the shared database and
/// NATS server, and development authentication.
fn service_settings(
    service: &str,
    addr: SocketAddr,
    database_url: &str,
    nats_url: &str,
) -> Vec<(String, String)> {
    vec![
        (setting(service, "GRPC__LISTEN_ADDR"), addr.to_string()),
        (setting(service, "DATABASE__URL"), database_url.to_owned()),
        (setting(service, "DATABASE__SCHEMA"), service.to_owned()),
        (setting(service, "BUS__NATS_URL"), nats_url.to_owned()),
        (setting(service, "AUTH__ALLOW_HS256"), "true".to_owned()),
        (
            setting(service, "AUTH__HS256_SECRET"),
            DEV_SECRET.to_owned(),
        ),
    ]
}

/// Waits until the process answers SERVING overall, or fails at `deadline`.
async fn wait_until_serving(service: &mut Service, deadline: Instant) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{}", service.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(CALL_LIMIT);
    loop {
        assert!(
            service.process.exited().is_none(),
            "exited during startup\n{}",
            service.process.output()
        );
        assert!(
            Instant::now() < deadline,
            "not serving within {STARTUP_LIMIT:?}\n{}",
            service.process.output()
        );
        if let Ok(channel) = endpoint.connect().await
            && health(&channel, "")
                .await
                .is_ok_and(|status| status == ServingStatus::Serving)
        {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn health(channel: &Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status())
}

async fn list_services(channel: &Channel) -> BTreeSet<String> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = tokio::time::timeout(CALL_LIMIT, responses.message())
        .await
        .expect("reflection did not answer in time")
        .unwrap()
        .and_then(|r| r.message_response);
    match answer {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// Returns the tables of a PostgreSQL schema.
async fn tables(database_url: &str, schema: &str) -> BTreeSet<String> {
    let mut conn = sqlx::PgConnection::connect(database_url).await.unwrap();
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1",
    )
    .bind(schema)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    names.into_iter().collect()
}

/// Sends `GET /metrics` over plain HTTP/1.1 and returns the response head (status line and
/// headers), lowercased.
async fn metrics_response_head(addr: SocketAddr) -> String {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        response
    };
    let response = tokio::time::timeout(CALL_LIMIT, exchange)
        .await
        .expect("/metrics did not answer in time");
    let response = String::from_utf8_lossy(&response).to_lowercase();
    match response.split_once("\r\n\r\n") {
        Some((head, _body)) => head.to_owned(),
        None => panic!("not an HTTP response: {response:?}"),
    }
}

#[tokio::test]
async fn each_service_runs_as_its_own_process_on_postgres_and_nats() {
    let (nats, postgres) = tokio::join!(NatsServer::start(), Postgres::start());
    let (nats, postgres) = (nats.unwrap(), postgres.unwrap());
    let database_url = postgres.create_database("tandem").await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let metrics_addr = free_addr();

    let started = Instant::now();
    let mut services: Vec<Service> = SERVICES
        .iter()
        .map(|expected| {
            let addr = free_addr();
            let mut settings = service_settings(expected.name, addr, &database_url, &nats.url());
            if expected.name == WITH_METRICS {
                settings.push((
                    setting(expected.name, "TELEMETRY__METRICS_ADDR"),
                    metrics_addr.to_string(),
                ));
            }
            Service {
                expected,
                addr,
                process: Process::spawn(expected.name, &settings, logs.path()),
            }
        })
        .collect();
    let mut channels = Vec::new();
    for service in &mut services {
        channels.push(wait_until_serving(service, started + STARTUP_LIMIT).await);
    }

    // Health and reflection describe exactly the process's own services.
    for (service, channel) in services.iter().zip(&channels) {
        let Expected { name, grpc, .. } = service.expected;
        for grpc_service in *grpc {
            assert_eq!(
                health(channel, grpc_service).await.unwrap(),
                ServingStatus::Serving,
                "{name}: {grpc_service}"
            );
        }
        let expected: BTreeSet<String> = grpc
            .iter()
            .chain(&[HEALTH])
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(list_services(channel).await, expected, "{name}");
    }
    assert_eq!(
        SERVICES[0].grpc,
        [
            "tandem.dialog.v1.DialogService",
            "tandem.dialog.v1.ModelService"
        ]
    );

    // Each declared its stream on the shared NATS server and migrated its own schema.
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    for Expected { name, stream, .. } in &SERVICES {
        let mut found = jetstream
            .get_stream(*stream)
            .await
            .unwrap_or_else(|e| panic!("{name}: no stream {stream}: {e}"));
        let subjects = found.info().await.unwrap().config.subjects.clone();
        assert_eq!(subjects, [format!("tandem.{name}.v1.>")], "{stream}");

        let tables = tables(&database_url, name).await;
        for table in ["tandem_outbox", "tandem_inbox"] {
            assert!(
                tables.contains(table),
                "schema {name} has no {table}: {tables:?}"
            );
        }
    }

    // Services that share one database each elect their own outbox relay (the election lock
    // is per schema; a database-wide lock would leave all but one service's events unsent).
    for service in &services {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&service.process.stdout)
            .unwrap()
            .contains("outbox relay elected")
        {
            assert!(
                Instant::now() < deadline,
                "no relay elected\n{}",
                service.process.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let head = metrics_response_head(metrics_addr).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.lines()
            .any(|line| line.starts_with("content-type: text/plain")),
        "{head}"
    );

    for service in &mut services {
        kill(service.process.pid, Signal::SIGTERM).unwrap();
        let status = service.process.wait_exit(EXIT_LIMIT).await;
        assert_eq!(
            status.code(),
            Some(0),
            "{status:?}\n{}",
            service.process.output()
        );
    }
}

#[tokio::test]
async fn missing_database_url_and_bad_nats_url_are_refused_together() {
    let logs = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let service = "routing";
    let settings = [
        (setting(service, "GRPC__LISTEN_ADDR"), addr.to_string()),
        (setting(service, "BUS__NATS_URL"), "http://x".to_owned()),
        (setting(service, "AUTH__ALLOW_HS256"), "true".to_owned()),
        (
            setting(service, "AUTH__HS256_SECRET"),
            DEV_SECRET.to_owned(),
        ),
    ];
    let mut process = Process::spawn(service, &settings, logs.path());

    let status = process.wait_exit(REFUSAL_LIMIT).await;
    assert!(!status.success(), "{status:?}\n{}", process.output());
    let stderr = process.stderr();
    for key in ["database.url", "bus.nats_url"] {
        assert!(stderr.contains(key), "{key} is not reported:\n{stderr}");
    }
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "something listens on {addr}"
    );
}

#[tokio::test]
async fn shutdown_is_prompt_while_nats_is_down() {
    let (nats, postgres) = tokio::join!(NatsServer::start(), Postgres::start());
    let (mut nats, postgres) = (nats.unwrap(), postgres.unwrap());
    let database_url = postgres.create_database("tandem").await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let expected = SERVICES.iter().find(|e| e.name == "routing").unwrap();
    let settings = service_settings(expected.name, addr, &database_url, &nats.url());
    let mut service = Service {
        expected,
        addr,
        process: Process::spawn(expected.name, &settings, logs.path()),
    };
    wait_until_serving(&mut service, Instant::now() + STARTUP_LIMIT).await;

    nats.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(service.process.pid, Signal::SIGTERM).unwrap();
    let status = service.process.wait_exit(Duration::from_secs(6)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}\n{}",
        service.process.output()
    );
}
