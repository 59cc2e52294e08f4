//! The `tandem` binary end to end: the standalone mode starts, serves health and reflection for
//! every service and stops cleanly on SIGINT and SIGTERM; a bad configuration is refused with
//! every problem listed; development tokens verify against the data directory's secret; and
//! every example configuration in `deploy/config` loads.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use tandem_platform::auth::{Authenticator, Role};
use tandem_platform::config::{
    AuthConfig, BusKind, ConfigError, ConfigErrors, GrpcConfig, LogFormat, OutboxConfig, Secret,
    ServiceConfig, TelemetryConfig, Validate,
};

const SERVICES: [&str; 6] = [
    "tandem.dialog.v1.DialogService",
    "tandem.dialog.v1.ModelService",
    "tandem.routing.v1.RoutingService",
    "tandem.knowledge.v1.KnowledgeService",
    "tandem.feedback.v1.FeedbackService",
    "tandem.policy.v1.PolicyService",
];

const STARTUP_LIMIT: Duration = Duration::from_secs(15);
const EXIT_LIMIT: Duration = Duration::from_secs(2);

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The `tandem` command, isolated from any `TANDEM_*` settings of the developer's shell.
fn tandem() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tandem"));
    command.stdin(Stdio::null());
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("TANDEM_")) {
        command.env_remove(key);
    }
    command
}

/// A running `tandem` process; its output goes to files so a failing test can show it, and it
/// is killed if the test ends while it still runs.
struct Process {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Process {
    fn spawn(mut command: Command, logs: &Path, name: &str) -> Self {
        let stdout = logs.join(format!("{name}.stdout"));
        let stderr = logs.join(format!("{name}.stderr"));
        command
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap());
        Self {
            child: command.spawn().unwrap(),
            stdout,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap()
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            std::fs::read_to_string(&self.stdout).unwrap(),
            self.stderr()
        )
    }

    fn signal(&self, signal: Signal) {
        kill(
            Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            signal,
        )
        .unwrap();
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "still running after {limit:?}\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_standalone(data_dir: &Path, addr: SocketAddr, logs: &Path, name: &str) -> Process {
    let mut command = tandem();
    command
        .arg("standalone")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(addr.to_string());
    Process::spawn(command, logs, name)
}

async fn health(channel: &Channel, service: &str) -> ServingStatus {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap();
    response.into_inner().status()
}

/// Waits until the process answers SERVING overall, then returns a channel to it.
async fn wait_until_serving(process: &mut Process, addr: SocketAddr) -> Channel {
    let started = Instant::now();
    loop {
        assert!(
            process.exited().is_none(),
            "tandem exited during startup\n{}",
            process.output()
        );
        assert!(
            started.elapsed() < STARTUP_LIMIT,
            "not serving after {STARTUP_LIMIT:?}\n{}",
            process.output()
        );
        if let Ok(channel) = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            let overall = HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if overall.is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving) {
                return channel;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn list_services(channel: &Channel) -> Vec<String> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    match responses
        .message()
        .await
        .unwrap()
        .and_then(|r| r.message_response)
    {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn serves_every_service_then_stops_cleanly_on(signal: Signal) {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let mut process = spawn_standalone(&dir.path().join("data"), addr, dir.path(), "standalone");
    let channel = wait_until_serving(&mut process, addr).await;

    for service in SERVICES {
        assert_eq!(
            health(&channel, service).await,
            ServingStatus::Serving,
            "{service}"
        );
    }
    let listed = list_services(&channel).await;
    for service in SERVICES.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(
            listed.iter().any(|s| s == service),
            "reflection misses {service}: {listed:?}"
        );
    }

    process.signal(signal);
    let status = process.wait_exit(EXIT_LIMIT).await;
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", process.output());
}

#[tokio::test]
async fn standalone_serves_every_service_and_stops_on_sigint() {
    serves_every_service_then_stops_cleanly_on(Signal::SIGINT).await;
}

#[tokio::test]
async fn standalone_serves_every_service_and_stops_on_sigterm() {
    serves_every_service_then_stops_cleanly_on(Signal::SIGTERM).await;
}

#[tokio::test]
async fn bad_configuration_is_refused_with_every_problem_listed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[grpc]\nmax_message_bytes = 1\n\n[nonsense]\nanswer = 42\n",
    )
    .unwrap();
    let addr = free_addr();
    let mut command = tandem();
    command
        .arg("standalone")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--config")
        .arg(&config)
        .env("TANDEM_STANDALONE__OUTBOX__BATCH_SIZE", "0");
    let mut process = Process::spawn(command, dir.path(), "standalone");

    let status = process.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success(), "{status:?}");
    let stderr = process.stderr();
    for path in ["grpc.max_message_bytes", "nonsense", "outbox.batch_size"] {
        assert!(stderr.contains(path), "{path} is not reported:\n{stderr}");
    }
    assert!(
        TcpStream::connect(addr).is_err(),
        "something listens on {addr}"
    );
}

fn dev_authenticator(data_dir: &Path) -> Authenticator {
    let secret = std::fs::read_to_string(data_dir.join("dev-secret")).unwrap();
    let cfg = AuthConfig {
        allow_hs256: true,
        hs256_secret: Secret::new(secret.trim()),
        ..AuthConfig::default()
    };
    Authenticator::from_config(&cfg).unwrap()
}

#[tokio::test]
async fn token_is_signed_with_the_secret_of_the_running_standalone() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let addr = free_addr();
    let mut process = spawn_standalone(&data_dir, addr, dir.path(), "standalone");
    wait_until_serving(&mut process, addr).await;
    let secret = std::fs::read(data_dir.join("dev-secret")).unwrap();

    let output = tandem()
        .args([
            "token",
            "--tenant",
            "acme",
            "--role",
            "agent",
            "--subject",
            "a1",
            "--data-dir",
        ])
        .arg(&data_dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();

    let caller = dev_authenticator(&data_dir).verify(token.trim()).unwrap();
    assert_eq!(caller.tenant.as_str(), "acme");
    assert_eq!(caller.subject, "a1");
    assert_eq!(caller.roles, [Role::Agent]);
    assert_eq!(
        std::fs::read(data_dir.join("dev-secret")).unwrap(),
        secret,
        "tandem token replaced the secret"
    );
}

#[test]
fn token_refuses_a_bad_tenant_and_an_unknown_role() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |args: &[&str], expected: &str| {
        let output = tandem()
            .arg("token")
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(output.stdout.is_empty(), "{args:?} printed a token");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };
    refused(
        &["--tenant", "Bad Tenant", "--role", "agent"],
        "invalid tenant id \"Bad Tenant\"",
    );
    refused(
        &["--tenant", "acme", "--role", "wizard"],
        "unknown role \"wizard\"",
    );
}

#[tokio::test]
async fn restart_keeps_the_data_dir_and_its_dev_secret() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let addr = free_addr();

    let mut first = spawn_standalone(&data_dir, addr, dir.path(), "first");
    wait_until_serving(&mut first, addr).await;
    first.signal(Signal::SIGTERM);
    assert_eq!(
        first.wait_exit(EXIT_LIMIT).await.code(),
        Some(0),
        "{}",
        first.output()
    );
    let secret = std::fs::read(data_dir.join("dev-secret")).unwrap();
    let files = entries(&data_dir);
    assert!(files.contains("policy.db"), "{files:?}");

    let mut second = spawn_standalone(&data_dir, addr, dir.path(), "second");
    let channel = wait_until_serving(&mut second, addr).await;
    assert_eq!(
        health(&channel, "tandem.policy.v1.PolicyService").await,
        ServingStatus::Serving
    );
    assert_eq!(std::fs::read(data_dir.join("dev-secret")).unwrap(), secret);
    assert!(
        entries(&data_dir).is_superset(&files),
        "{:?} lost files of {files:?}",
        entries(&data_dir)
    );
    second.signal(Signal::SIGINT);
    assert_eq!(
        second.wait_exit(EXIT_LIMIT).await.code(),
        Some(0),
        "{}",
        second.output()
    );
}

fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

// ------------------------------------------------------------------------------------------
// deploy/config/*.example.toml

const PRODUCTION_KEY: &str = "/etc/tandem/jwt/public.pem";

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/config")
        .join(format!("{name}.example.toml"))
}

fn test_public_key() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../platform/tests/fixtures/test-only-rsa-public.pem")
}

fn load_example<T>(
    service: &str,
    env: &HashMap<String, String>,
) -> Result<ServiceConfig<T>, ConfigErrors>
where
    T: Serialize + DeserializeOwned + Default + Validate,
{
    tandem_platform::config::load(service, Some(&example(service)), env)
}

/// Checks one production example: as written, the only problem on this machine is the absent
/// public key; with the key file pointed at a fixture it loads cleanly with production values.
fn check_production_example<T>(service: &str)
where
    T: Serialize + DeserializeOwned + Default + Validate + Debug,
{
    let errors = load_example::<T>(service, &HashMap::new()).unwrap_err().0;
    let absent_key = ConfigError::new(
        "auth.public_key_files[0]",
        format!("{PRODUCTION_KEY} does not exist"),
    );
    assert_eq!(errors, [absent_key], "{service}");

    let key = test_public_key();
    let env = HashMap::from([(
        format!("TANDEM_{}__AUTH__PUBLIC_KEY_FILES", service.to_uppercase()),
        key.display().to_string(),
    )]);
    let cfg = load_example::<T>(service, &env).unwrap_or_else(|e| panic!("{service}: {e}"));
    assert_eq!(cfg.auth.public_key_files, [key], "{service}");
    assert!(!cfg.auth.allow_hs256, "{service}");
    assert!(
        cfg.database.url.expose().starts_with("postgres://"),
        "{service}"
    );
    assert_eq!(cfg.database.schema, service);
    assert_eq!(cfg.bus.kind, BusKind::Nats, "{service}");
    assert!(cfg.bus.nats_url.starts_with("nats://"), "{service}");
    assert_eq!(cfg.telemetry.log_format, LogFormat::Json, "{service}");
    assert_eq!(cfg.telemetry.metrics_addr, "0.0.0.0:9090", "{service}");
    assert_eq!(cfg.telemetry.otlp_endpoint, "", "{service}");
    assert!(cfg.grpc.reflection, "{service}");
    assert_eq!(
        cfg.grpc.not_serving_delay,
        Duration::from_secs(5),
        "{service}"
    );
}

#[test]
fn production_examples_load_and_validate() {
    check_production_example::<tandem_dialog::Settings>("dialog");
    check_production_example::<tandem_routing::Settings>("routing");
    check_production_example::<tandem_knowledge::Settings>("knowledge");
    check_production_example::<tandem_feedback::Settings>("feedback");
    check_production_example::<tandem_policy::Settings>("policy");
}

#[test]
fn standalone_example_loads_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let output = tandem()
        .args(["token", "--tenant", "demo", "--role", "admin", "--config"])
        .arg(example("standalone"))
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let caller = dev_authenticator(dir.path())
        .verify(String::from_utf8(output.stdout).unwrap().trim())
        .unwrap();
    assert_eq!(caller.tenant.as_str(), "demo");
    assert_eq!(caller.roles, [Role::Admin]);
}

/// Returns `section.key` for every key an example file sets or shows commented out, and fails
/// on a key without a comment above it.
fn documented_keys(name: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(example(name)).unwrap();
    let mut keys = BTreeSet::new();
    let (mut section, mut previous) = (String::new(), "");
    for line in text.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = header.to_owned();
        } else if let Some((key, _)) = line.trim_start_matches("# ").split_once(" = ")
            && !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            assert!(
                previous.starts_with('#'),
                "{name}: {section}.{key} has no comment"
            );
            keys.insert(format!("{section}.{key}"));
        }
        previous = line;
    }
    keys
}

/// Returns `section.key` for every field of a configuration, from its defaults.
fn config_keys(config: &impl Serialize) -> BTreeSet<String> {
    let value = serde_json::to_value(config).unwrap();
    let mut keys = BTreeSet::new();
    for (section, fields) in value.as_object().unwrap() {
        for key in fields.as_object().unwrap().keys() {
            keys.insert(format!("{section}.{key}"));
        }
    }
    keys
}

#[test]
fn examples_document_every_configuration_key() {
    let expected = [
        (
            "dialog",
            config_keys(&ServiceConfig::<tandem_dialog::Settings>::default()),
        ),
        (
            "routing",
            config_keys(&ServiceConfig::<tandem_routing::Settings>::default()),
        ),
        (
            "knowledge",
            config_keys(&ServiceConfig::<tandem_knowledge::Settings>::default()),
        ),
        (
            "feedback",
            config_keys(&ServiceConfig::<tandem_feedback::Settings>::default()),
        ),
        (
            "policy",
            config_keys(&ServiceConfig::<tandem_policy::Settings>::default()),
        ),
        (
            "standalone",
            config_keys(&serde_json::json!({
                "grpc": GrpcConfig::default(),
                "telemetry": TelemetryConfig::default(),
                "auth": AuthConfig::default(),
                "outbox": OutboxConfig::default(),
                "dialog": tandem_dialog::Settings::default(),
                "routing": tandem_routing::Settings::default(),
                "knowledge": tandem_knowledge::Settings::default(),
                "feedback": tandem_feedback::Settings::default(),
                "policy": tandem_policy::Settings::default(),
            })),
        ),
    ];
    for (name, keys) in expected {
        assert_eq!(documented_keys(name), keys, "{name}.example.toml");
    }
}

/// Runs `tandem <args>` to the end with empty input and returns (success, stdout, stderr).
fn console(args: &[&str]) -> (bool, String, String) {
    let output = tandem().args(args).output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consoles_explain_bad_input_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data = data_dir.to_str().unwrap().to_owned();

    // Nothing listens yet: the server is down.
    let down = format!("http://{}", free_addr());
    for kind in [&["chat"][..], &["agent", "--agent", "li.na"][..]] {
        let mut args = kind.to_vec();
        args.extend(["--endpoint", &down, "--token", "x.y.z"]);
        let (ok, _, stderr) = console(&args);
        assert!(!ok, "{args:?} succeeded against a closed port");
        assert!(
            stderr.contains("cannot reach") && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
    }
    // No token and no development secret.
    let (ok, _, stderr) = console(&["chat", "--endpoint", &down, "--data-dir", &data]);
    assert!(!ok);
    assert!(stderr.contains("no token"), "{stderr}");

    let addr = free_addr();
    let mut process = spawn_standalone(&data_dir, addr, dir.path(), "standalone");
    wait_until_serving(&mut process, addr).await;
    let endpoint = format!("http://{addr}");

    // A token the server cannot verify.
    let (ok, _, stderr) = console(&["chat", "--endpoint", &endpoint, "--token", "not.a.jwt"]);
    assert!(!ok);
    assert!(stderr.contains("refused the token"), "{stderr}");
    let (ok, _, stderr) = console(&[
        "agent",
        "--agent",
        "li.na",
        "--endpoint",
        &endpoint,
        "--token",
        "not.a.jwt",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("token") && !stderr.contains("panicked"),
        "{stderr}"
    );

    // An unknown conversation, with a valid development token.
    let (ok, _, stderr) = console(&[
        "chat",
        "--endpoint",
        &endpoint,
        "--data-dir",
        &data,
        "--tenant",
        "acme",
        "--conversation",
        "01a00000-0000-7000-8000-000000000000",
    ]);
    assert!(!ok);
    assert!(stderr.contains("not found"), "{stderr}");

    // An agent nobody registered is refused by routing with a sentence.
    let (ok, _, stderr) = console(&[
        "agent",
        "--agent",
        "ghost",
        "--endpoint",
        &endpoint,
        "--data-dir",
        &data,
        "--tenant",
        "acme",
    ]);
    assert!(!ok);
    assert!(
        !stderr.is_empty() && !stderr.contains("panicked"),
        "{stderr}"
    );

    // A conversation in a terminal without a terminal: empty input starts and closes one.
    let (ok, stdout, stderr) = console(&[
        "chat",
        "--endpoint",
        &endpoint,
        "--data-dir",
        &data,
        "--tenant",
        "acme",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("conversation closed"), "{stdout}");
}
