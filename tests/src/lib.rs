//! End-to-end scenarios across Tandem's services.
//!
//! A [`Deployment`] is either every service as its own process (`tandem serve <service>`) on a
//! throwaway PostgreSQL (a schema per service) and nats-server from `tandem-testkit`, or one
//! `tandem standalone` process on SQLite and the in-process bus. The scenarios in `tests/` run
//! unchanged against both, through the public gRPC APIs and the `tandem chat` / `tandem agent`
//! consoles driven over their standard input.

#![allow(
    clippy::unwrap_used,
    clippy::missing_panics_doc,
    reason = "test support: a failed set-up ends the test with its output"
)]

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tandem_platform::auth::{Role, TokenIssuer};
use tandem_platform::config::{AuthConfig, Secret};
use tandem_proto::ids::TenantId;
use tandem_testkit::{NatsServer, Postgres};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The development secret every process of a deployment verifies tokens with.
const SECRET: &str = "e2e-secret-of-at-least-thirty-two-bytes-long";
const STARTUP_LIMIT: Duration = Duration::from_secs(60);

/// The five services, in start order (policy first: dialog follows its catalogue).
pub const SERVICES: [&str; 5] = ["policy", "knowledge", "routing", "feedback", "dialog"];

/// The `tandem` binary built beside this test.
pub fn tandem_bin() -> PathBuf {
    if let Ok(path) = std::env::var("TANDEM_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test> → target/<profile>/tandem
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("tandem"))
        .unwrap();
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p tandem-cli`; `make test` does)",
        bin.display()
    );
    bin
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A child process whose output goes to files, killed when dropped.
struct Process {
    name: String,
    _child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Process {
    fn spawn(name: &str, args: &[&str], env: &[(String, String)], logs: &Path) -> Self {
        let stdout = logs.join(format!("{name}.stdout"));
        let stderr = logs.join(format!("{name}.stderr"));
        let mut command = Command::new(tandem_bin());
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .kill_on_drop(true);
        isolate(&mut command);
        command.env("RUST_LOG", "info,tandem=debug");
        command.envs(env.iter().map(|(k, v)| (k, v)));
        Self {
            name: name.to_owned(),
            _child: command.spawn().unwrap(),
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        let tail = |path: &Path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let start = text.len().saturating_sub(6_000);
            text.get(start..).unwrap_or_default().to_owned()
        };
        format!(
            "--- {} stdout:\n{}\n--- {} stderr (tail):\n{}",
            self.name,
            tail(&self.stdout),
            self.name,
            tail(&self.stderr)
        )
    }
}

/// Removes the developer's own `TANDEM_*` settings from a child's environment.
fn isolate(command: &mut Command) {
    for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("TANDEM_")) {
        command.env_remove(key);
    }
}

/// Where each service listens.
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// Dialog.
    pub dialog: SocketAddr,
    /// Routing.
    pub routing: SocketAddr,
    /// Knowledge.
    pub knowledge: SocketAddr,
    /// Feedback.
    pub feedback: SocketAddr,
    /// Policy.
    pub policy: SocketAddr,
}

/// A running Tandem, distributed or standalone.
pub struct Deployment {
    /// A label for messages: "distributed" or "standalone".
    pub kind: &'static str,
    /// Where the services listen.
    pub endpoints: Endpoints,
    processes: Vec<Process>,
    logs: tempfile::TempDir,
    _postgres: Option<Postgres>,
    _nats: Option<NatsServer>,
}

impl Deployment {
    /// Every service as its own `tandem serve` process on PostgreSQL and NATS JetStream.
    pub async fn distributed() -> Self {
        let postgres = Postgres::start().await.unwrap();
        let nats = NatsServer::start().await.unwrap();
        let database = postgres.fresh_database().await.unwrap();
        let logs = logs_dir();
        let addrs: Vec<SocketAddr> = SERVICES.iter().map(|_| free_addr()).collect();
        let endpoints = Endpoints {
            policy: addrs[0],
            knowledge: addrs[1],
            routing: addrs[2],
            feedback: addrs[3],
            dialog: addrs[4],
        };
        let mut processes = Vec::new();
        for (name, addr) in SERVICES.iter().zip(&addrs) {
            let prefix = format!("TANDEM_{}", name.to_uppercase());
            let mut env = vec![
                (format!("{prefix}__GRPC__LISTEN_ADDR"), addr.to_string()),
                (
                    format!("{prefix}__GRPC__NOT_SERVING_DELAY"),
                    "0s".to_owned(),
                ),
                (format!("{prefix}__DATABASE__URL"), database.clone()),
                (format!("{prefix}__DATABASE__SCHEMA"), (*name).to_owned()),
                (format!("{prefix}__BUS__NATS_URL"), nats.url()),
                (format!("{prefix}__AUTH__ALLOW_HS256"), "true".to_owned()),
                (format!("{prefix}__AUTH__HS256_SECRET"), SECRET.to_owned()),
                (
                    format!("{prefix}__TELEMETRY__LOG_FORMAT"),
                    "pretty".to_owned(),
                ),
            ];
            env.extend(service_settings(name, &endpoints));
            processes.push(Process::spawn(name, &["serve", name], &env, logs.path()));
        }
        let deployment = Self {
            kind: "distributed",
            endpoints,
            processes,
            logs,
            _postgres: Some(postgres),
            _nats: Some(nats),
        };
        deployment.wait_until_serving().await;
        deployment
    }

    /// Every service in one `tandem standalone` process on SQLite and the in-process bus.
    pub async fn standalone() -> Self {
        let logs = logs_dir();
        let data = logs.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("dev-secret"), SECRET).unwrap();
        let addr = free_addr();
        let args = [
            "standalone",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &addr.to_string(),
        ];
        let env = vec![
            (
                "TANDEM_STANDALONE__GRPC__NOT_SERVING_DELAY".to_owned(),
                "0s".to_owned(),
            ),
            (
                "TANDEM_STANDALONE__TELEMETRY__LOG_FORMAT".to_owned(),
                "pretty".to_owned(),
            ),
            (
                "TANDEM_STANDALONE__FEEDBACK__ALERT_INTERVAL".to_owned(),
                "2s".to_owned(),
            ),
        ];
        let process = Process::spawn("standalone", &args, &env, logs.path());
        let deployment = Self {
            kind: "standalone",
            endpoints: Endpoints {
                dialog: addr,
                routing: addr,
                knowledge: addr,
                feedback: addr,
                policy: addr,
            },
            processes: vec![process],
            logs,
            _postgres: None,
            _nats: None,
        };
        deployment.wait_until_serving().await;
        deployment
    }

    async fn wait_until_serving(&self) {
        let deadline = Instant::now() + STARTUP_LIMIT;
        let addrs = [
            self.endpoints.policy,
            self.endpoints.knowledge,
            self.endpoints.routing,
            self.endpoints.feedback,
            self.endpoints.dialog,
        ];
        for addr in addrs {
            loop {
                assert!(
                    Instant::now() < deadline,
                    "{addr} not serving within {STARTUP_LIMIT:?}\n{}",
                    self.output()
                );
                if let Ok(channel) = Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_timeout(Duration::from_secs(1))
                    .connect()
                    .await
                    && HealthClient::new(channel)
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Every process's output, for failure messages.
    pub fn output(&self) -> String {
        self.processes
            .iter()
            .map(Process::output)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A token for `subject` of `tenant` with `roles`.
    pub fn token(&self, tenant: &str, subject: &str, roles: &[Role]) -> String {
        let auth = AuthConfig {
            allow_hs256: true,
            hs256_secret: Secret::new(SECRET.to_owned()),
            ..AuthConfig::default()
        };
        TokenIssuer::from_config(&auth)
            .unwrap()
            .issue(
                &TenantId::new(tenant).unwrap(),
                subject,
                roles,
                Duration::from_secs(3600),
            )
            .unwrap()
    }

    /// A connected channel to `addr`.
    pub async fn channel(&self, addr: SocketAddr) -> Channel {
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .timeout(Duration::from_secs(20))
            .connect()
            .await
            .unwrap()
    }

    /// A channel to `addr` that sends a token for `subject` of `tenant` with `role`.
    pub async fn client(
        &self,
        addr: SocketAddr,
        tenant: &str,
        subject: &str,
        role: Role,
    ) -> Authed {
        let bearer = Bearer(
            format!("Bearer {}", self.token(tenant, subject, &[role]))
                .parse()
                .unwrap(),
        );
        InterceptedService::new(self.channel(addr).await, bearer)
    }

    /// `tandem agent --agent <agent>` of `tenant`, once its desk says it is online (within
    /// `limit`).
    pub async fn agent_online(
        &self,
        name: &str,
        tenant: &str,
        agent: &str,
        limit: Duration,
    ) -> Console {
        let mut console = self.console(
            name,
            &["agent", "--agent", agent],
            tenant,
            agent,
            Role::Agent,
        );
        console.expect(&format!("online as {agent}"), limit).await;
        console
    }

    /// `tandem chat` or `tandem agent` against this deployment, with a token for `subject` of
    /// `tenant` with `role`.
    pub fn console(
        &self,
        name: &str,
        args: &[&str],
        tenant: &str,
        subject: &str,
        role: Role,
    ) -> Console {
        let e = &self.endpoints;
        let mut command = Command::new(tandem_bin());
        command
            .args(args)
            .arg("--dialog")
            .arg(format!("http://{}", e.dialog))
            .arg("--routing")
            .arg(format!("http://{}", e.routing))
            .arg("--feedback")
            .arg(format!("http://{}", e.feedback))
            .arg("--token")
            .arg(self.token(tenant, subject, &[role]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(self.logs.path().join(format!("{name}.stderr"))).unwrap())
            .kill_on_drop(true);
        isolate(&mut command);
        let mut child = command.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Console {
            name: name.to_owned(),
            child,
            stdin: Some(stdin),
            lines,
            seen: Vec::new(),
            stderr: self.logs.path().join(format!("{name}.stderr")),
        }
    }
}

/// A directory for process output; kept after the test when `TANDEM_E2E_KEEP_LOGS` is set.
fn logs_dir() -> tempfile::TempDir {
    let keep = std::env::var_os("TANDEM_E2E_KEEP_LOGS").is_some();
    let dir = tempfile::Builder::new()
        .prefix("tandem-e2e-")
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    if keep {
        eprintln!("process output in {}", dir.path().display());
    }
    dir
}

/// Settings each service needs to find the others.
fn service_settings(name: &str, endpoints: &Endpoints) -> Vec<(String, String)> {
    match name {
        "dialog" => vec![(
            "TANDEM_DIALOG__SERVICE__KNOWLEDGE_ENDPOINT".to_owned(),
            format!("http://{}", endpoints.knowledge),
        )],
        "feedback" => vec![(
            "TANDEM_FEEDBACK__SERVICE__ALERT_INTERVAL".to_owned(),
            "2s".to_owned(),
        )],
        _ => Vec::new(),
    }
}

/// A gRPC stub that sends a bearer token.
pub type Authed = InterceptedService<Channel, Bearer>;

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A `tandem chat` / `tandem agent` process driven over its standard input.
pub struct Console {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    stderr: PathBuf,
}

impl Console {
    /// Types a line.
    pub async fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).await.unwrap();
        stdin.write_all(b"\n").await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// Waits for an output line containing `needle` and returns it.
    pub async fn expect(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Ok(None) => panic!(
                    "{} ended before printing {needle:?}\n{}",
                    self.name,
                    self.transcript()
                ),
                Err(_) => panic!(
                    "{} did not print {needle:?} within {limit:?}\n{}",
                    self.name,
                    self.transcript()
                ),
            }
        }
    }

    /// Everything printed so far, with the standard error, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- {} stdout:\n{}\n--- {} stderr:\n{}",
            self.name,
            self.seen.join("\n"),
            self.name,
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// Closes the input and waits for the process to exit; returns whether it succeeded, and
    /// the rest of its output.
    pub async fn finish(mut self) -> (bool, Vec<String>) {
        drop(self.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit\n{}", self.name, self.transcript()))
            .unwrap();
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        (status.success(), self.seen)
    }
}

/// Retries `check` until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The end-to-end tenant's scenario catalogue.
pub const CATALOGUE: &str = include_str!("../fixtures/catalogue.yaml");
/// Intent examples of the `orders` scenario, with stored answers.
pub const ORDERS_EXAMPLES: &str = include_str!("../fixtures/orders.jsonl");
/// Intent examples of the `billing` scenario, with stored answers.
pub const BILLING_EXAMPLES: &str = include_str!("../fixtures/billing.jsonl");

/// An agent of the end-to-end tenant.
pub struct AgentSpec {
    /// Id (token subject).
    pub id: &'static str,
    /// Skills as `name:level`.
    pub skills: &'static [&'static str],
}

/// The agents [`seed_tenant`] registers: one for orders, one for billing, in both languages.
pub const AGENTS: [AgentSpec; 2] = [
    AgentSpec {
        id: "ling",
        skills: &["orders:3", "lang:zh:5", "lang:en:4"],
    },
    AgentSpec {
        id: "sam",
        skills: &["billing:3", "lang:zh:3", "lang:en:5"],
    },
];

/// Sets a tenant up as its administrator would: the scenario catalogue, the `orders` intent
/// examples (trained and activated; `billing` is left untrained), queues `general` and
/// `billing`, and the agents of [`AGENTS`].
pub async fn seed_tenant(d: &Deployment, tenant: &str) {
    use tandem_proto::pb::common::v1::{Language, SkillRequirement};
    use tandem_proto::pb::dialog::v1::model_service_client::ModelServiceClient;
    use tandem_proto::pb::dialog::v1::{ExampleFormat, TrainModelRequest, UploadExamplesRequest};
    use tandem_proto::pb::policy::v1::policy_service_client::PolicyServiceClient;
    use tandem_proto::pb::policy::v1::{ImportScenariosRequest, ScenarioFormat};
    use tandem_proto::pb::routing::v1::routing_service_client::RoutingServiceClient;
    use tandem_proto::pb::routing::v1::{
        Agent, Queue, RegisterAgentRequest, Skill, UpsertQueueRequest,
    };

    let e = &d.endpoints;
    let mut policy =
        PolicyServiceClient::new(d.client(e.policy, tenant, "admin", Role::Admin).await);
    policy
        .import_scenarios(ImportScenariosRequest {
            format: ScenarioFormat::Yaml as i32,
            content: CATALOGUE.to_owned(),
            validate_only: false,
            reason: "end-to-end set-up".into(),
        })
        .await
        .unwrap();
    let mut models =
        ModelServiceClient::new(d.client(e.dialog, tenant, "admin", Role::Admin).await);
    models
        .upload_examples(UploadExamplesRequest {
            scenario_id: "orders".into(),
            format: ExampleFormat::Jsonl as i32,
            raw: ORDERS_EXAMPLES.to_owned(),
            ..UploadExamplesRequest::default()
        })
        .await
        .unwrap();
    models
        .train_model(TrainModelRequest {
            scenario_ids: Vec::new(),
            activate: true,
            notes: "end-to-end set-up".into(),
        })
        .await
        .unwrap();
    let mut routing =
        RoutingServiceClient::new(d.client(e.routing, tenant, "admin", Role::Admin).await);
    for (id, skill) in [("general", "orders"), ("billing", "billing")] {
        routing
            .upsert_queue(UpsertQueueRequest {
                queue: Some(Queue {
                    id: id.into(),
                    name: id.into(),
                    scenario_ids: vec![if id == "general" { "orders" } else { "billing" }.into()],
                    required_skills: vec![SkillRequirement {
                        name: skill.into(),
                        min_level: 1,
                    }],
                    ..Queue::default()
                }),
            })
            .await
            .unwrap();
    }
    for spec in &AGENTS {
        let skills = spec
            .skills
            .iter()
            .map(|s| {
                let (name, level) = s.rsplit_once(':').unwrap();
                Skill {
                    name: name.into(),
                    level: level.parse().unwrap(),
                }
            })
            .collect();
        routing
            .register_agent(RegisterAgentRequest {
                agent: Some(Agent {
                    id: spec.id.into(),
                    display_name: spec.id.into(),
                    skills,
                    languages: vec![Language::Zh as i32, Language::En as i32],
                    team: "e2e".into(),
                    max_concurrent: 3,
                    ..Agent::default()
                }),
            })
            .await
            .unwrap();
    }
}

/// Starts an English web-chat conversation for a customer named after `key`, which is also its
/// idempotency key; returns its id.
pub async fn start_conversation(
    dialog: &mut tandem_proto::pb::dialog::v1::dialog_service_client::DialogServiceClient<Authed>,
    key: &str,
) -> String {
    use tandem_proto::pb::common::v1::{Channel as ChannelKind, Customer, Language};
    use tandem_proto::pb::dialog::v1::StartConversationRequest;
    dialog
        .start_conversation(StartConversationRequest {
            customer: Some(Customer {
                id: format!("customer-{key}"),
                display_name: "E2E customer".into(),
                language: Language::En as i32,
                channel: ChannelKind::WebChat as i32,
                ..Customer::default()
            }),
            channel: ChannelKind::WebChat as i32,
            client_conversation_id: key.into(),
            ..StartConversationRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap()
        .id
}

/// Posts a customer message and returns the bot's turn (default when the bot took no action).
pub async fn say(
    dialog: &mut tandem_proto::pb::dialog::v1::dialog_service_client::DialogServiceClient<Authed>,
    conversation: &str,
    text: &str,
) -> tandem_proto::pb::dialog::v1::BotTurn {
    use tandem_proto::pb::dialog::v1::PostCustomerMessageRequest;
    dialog
        .post_customer_message(PostCustomerMessageRequest {
            conversation_id: conversation.into(),
            client_message_id: format!("{conversation}-{}", text.len()),
            text: text.into(),
            attachments: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .bot_turn
        .unwrap_or_default()
}
