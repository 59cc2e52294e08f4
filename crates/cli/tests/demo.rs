//! `tandem standalone --demo` end to end: the demo tenant is seeded through the public APIs
//! (scenarios, queues, agents, published articles, a trained model, alert and adjustment rules),
//! search finds Chinese and English articles, the bot answers a Chinese and an English customer,
//! and restarting with the same data directory — with or without the marker file — duplicates
//! nothing.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tandem_platform::auth::{Role, TokenIssuer};
use tandem_platform::config::{AuthConfig, Secret};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1::{Customer, Language, PageRequest};
use tandem_proto::pb::dialog::v1 as dialog;
use tandem_proto::pb::feedback::v1 as feedback;
use tandem_proto::pb::knowledge::v1 as knowledge;
use tandem_proto::pb::policy::v1 as policy;
use tandem_proto::pb::routing::v1 as routing;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

use dialog::dialog_service_client::DialogServiceClient;
use dialog::model_service_client::ModelServiceClient;
use feedback::feedback_service_client::FeedbackServiceClient;
use knowledge::knowledge_service_client::KnowledgeServiceClient;
use policy::policy_service_client::PolicyServiceClient;
use routing::routing_service_client::RoutingServiceClient;

const READY_LIMIT: Duration = Duration::from_secs(300);
const EXIT_LIMIT: Duration = Duration::from_secs(10);

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Process {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Process {
    fn spawn(data_dir: &Path, addr: SocketAddr, logs: &Path, name: &str) -> Self {
        let stdout = logs.join(format!("{name}.stdout"));
        let stderr = logs.join(format!("{name}.stderr"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_tandem"));
        command.stdin(Stdio::null());
        for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("TANDEM_")) {
            command.env_remove(key);
        }
        command
            .arg("standalone")
            .arg("--demo")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(addr.to_string())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap());
        Self {
            child: command.spawn().unwrap(),
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap()
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout(),
            std::fs::read_to_string(&self.stderr).unwrap()
        )
    }

    /// Waits for the line announcing the demo tenant and returns it.
    async fn wait_ready(&mut self) -> String {
        let started = Instant::now();
        loop {
            if let Some(line) = self
                .stdout()
                .lines()
                .find(|l| l.starts_with("demo tenant ready"))
            {
                return line.to_owned();
            }
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "tandem exited before the demo was ready\n{}",
                self.output()
            );
            assert!(
                started.elapsed() < READY_LIMIT,
                "demo not ready after {READY_LIMIT:?}\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(&mut self) {
        kill(
            Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            Signal::SIGTERM,
        )
        .unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status:?}\n{}", self.output());
                return;
            }
            assert!(started.elapsed() < EXIT_LIMIT, "{}", self.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
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

/// Signs development tokens with the data directory's secret and sends them.
struct Caller {
    channel: Channel,
    issuer: TokenIssuer,
}

impl Caller {
    async fn new(data_dir: &Path, addr: SocketAddr) -> Self {
        let secret = std::fs::read_to_string(data_dir.join("dev-secret")).unwrap();
        let cfg = AuthConfig {
            allow_hs256: true,
            hs256_secret: Secret::new(secret.trim()),
            ..AuthConfig::default()
        };
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            channel,
            issuer: TokenIssuer::from_config(&cfg).unwrap(),
        }
    }

    fn request<T>(&self, role: Role, message: T) -> Request<T> {
        let token = self
            .issuer
            .issue(
                &TenantId::new("demo".to_owned()).unwrap(),
                "demo-test",
                &[role],
                Duration::from_secs(600),
            )
            .unwrap();
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    }
}

fn page() -> Option<PageRequest> {
    Some(PageRequest {
        page_size: 100,
        page_token: String::new(),
    })
}

/// What the tenant holds, to compare across restarts.
#[derive(Debug, PartialEq)]
struct State {
    scenarios: BTreeMap<String, i64>,
    queues: Vec<String>,
    agents: Vec<String>,
    articles: BTreeMap<String, (i32, i32)>,
    model_versions: Vec<i32>,
    alert_rules: Vec<String>,
    adjustment_rules: Vec<String>,
}

async fn state(caller: &Caller) -> State {
    let scenarios = PolicyServiceClient::new(caller.channel.clone())
        .list_scenarios(caller.request(
            Role::Admin,
            policy::ListScenariosRequest {
                page: page(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .scenarios
        .into_iter()
        .map(|s| (s.id, s.version))
        .collect();
    let mut routing = RoutingServiceClient::new(caller.channel.clone());
    let mut queues: Vec<String> = routing
        .list_queues(caller.request(Role::Admin, routing::ListQueuesRequest { page: page() }))
        .await
        .unwrap()
        .into_inner()
        .queues
        .into_iter()
        .map(|q| q.id)
        .collect();
    queues.sort();
    let mut agents: Vec<String> = routing
        .list_agents(caller.request(
            Role::Admin,
            routing::ListAgentsRequest {
                page: page(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .map(|a| a.id)
        .collect();
    agents.sort();
    let listed = KnowledgeServiceClient::new(caller.channel.clone())
        .list_articles(caller.request(
            Role::Admin,
            knowledge::ListArticlesRequest {
                page: page(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .articles;
    for article in &listed {
        assert_eq!(
            article.status,
            knowledge::ArticleStatus::Published as i32,
            "{article:?}"
        );
    }
    let articles = listed
        .into_iter()
        .map(|a| (a.external_id, (a.published_version, a.current_version)))
        .collect();
    let model_versions = ModelServiceClient::new(caller.channel.clone())
        .list_model_versions(caller.request(
            Role::Admin,
            dialog::ListModelVersionsRequest { page: page() },
        ))
        .await
        .unwrap()
        .into_inner()
        .model_versions
        .into_iter()
        .map(|m| m.version)
        .collect();
    let mut alert_rules: Vec<String> = FeedbackServiceClient::new(caller.channel.clone())
        .list_alert_rules(caller.request(
            Role::Admin,
            feedback::ListAlertRulesRequest {
                page: page(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .rules
        .into_iter()
        .map(|r| r.id)
        .collect();
    alert_rules.sort();
    let mut adjustment_rules: Vec<String> = PolicyServiceClient::new(caller.channel.clone())
        .list_adjustment_rules(caller.request(
            Role::Admin,
            policy::ListAdjustmentRulesRequest {
                page: page(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .rules
        .into_iter()
        .map(|r| r.id)
        .collect();
    adjustment_rules.sort();
    State {
        scenarios,
        queues,
        agents,
        articles,
        model_versions,
        alert_rules,
        adjustment_rules,
    }
}

async fn search(caller: &Caller, query: &str, language: Language) -> Vec<knowledge::SearchHit> {
    KnowledgeServiceClient::new(caller.channel.clone())
        .search(caller.request(
            Role::Service,
            knowledge::SearchRequest {
                query: query.to_owned(),
                language: language as i32,
                audience: knowledge::Audience::Bot as i32,
                limit: 3,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .hits
}

/// A customer asks `text`; returns the bot's turn.
async fn ask(caller: &Caller, key: &str, language: Language, text: &str) -> dialog::BotTurn {
    let mut client = DialogServiceClient::new(caller.channel.clone());
    let conversation = client
        .start_conversation(caller.request(
            Role::Channel,
            dialog::StartConversationRequest {
                customer: Some(Customer {
                    id: format!("customer-{key}"),
                    display_name: "Demo customer".to_owned(),
                    language: language as i32,
                    ..Default::default()
                }),
                client_conversation_id: key.to_owned(),
                test: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    client
        .post_customer_message(caller.request(
            Role::Channel,
            dialog::PostCustomerMessageRequest {
                conversation_id: conversation.id,
                client_message_id: format!("{key}-1"),
                text: text.to_owned(),
                attachments: Vec::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .bot_turn
        .unwrap()
}

#[tokio::test]
async fn demo_tenant_is_seeded_answers_and_survives_restarts_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let addr = free_addr();
    let mut process = Process::spawn(&data_dir, addr, dir.path(), "first");
    let ready = process.wait_ready().await;
    assert!(
        ready.contains("9 scenarios") && ready.contains("20 articles"),
        "{ready}"
    );
    assert!(ready.contains("9 intents"), "{ready}");
    assert!(process.stdout().contains("tandem chat --data-dir"));
    let caller = Caller::new(&data_dir, addr).await;

    let first = state(&caller).await;
    for scenario in [
        "default",
        "returns",
        "refunds",
        "delivery",
        "bank_cards",
        "telecom_billing",
        "flight_rebooking",
        "insurance_claims",
        "complaint",
    ] {
        assert!(first.scenarios.contains_key(scenario), "{first:?}");
    }
    assert_eq!(first.scenarios.len(), 9);
    assert_eq!(
        first.agents,
        ["alex.kim", "chen.jing", "li.na", "sam.taylor", "wang.wei"]
    );
    assert_eq!(first.queues.len(), 7, "{first:?}");
    assert_eq!(first.articles.len(), 20, "{first:?}");
    assert_eq!(first.model_versions, [1]);
    assert_eq!(first.alert_rules.len(), 2);
    assert_eq!(first.adjustment_rules.len(), 2);

    // The active model separates the demo intents on text it was not trained on.
    let evaluated = ModelServiceClient::new(caller.channel.clone())
        .evaluate_model(
            caller.request(
                Role::Admin,
                dialog::EvaluateModelRequest {
                    held_out: [
                        ("退货的话要怎么弄", "return_request", Language::Zh),
                        ("银行卡好像丢在出租车上了", "card_lost", Language::Zh),
                        (
                            "这个月账单里的流量费是怎么回事",
                            "bill_inquiry",
                            Language::Zh,
                        ),
                        (
                            "How can I send these shoes back",
                            "return_request",
                            Language::En,
                        ),
                        (
                            "How do I claim for my broken phone screen",
                            "claim_filing",
                            Language::En,
                        ),
                        (
                            "I'd like to move my flight to Friday",
                            "flight_rebooking",
                            Language::En,
                        ),
                    ]
                    .into_iter()
                    .map(|(text, intent, language)| dialog::IntentExample {
                        text: text.to_owned(),
                        intent: intent.to_owned(),
                        scenario_id: String::new(),
                        language: language as i32,
                    })
                    .collect(),
                    ..Default::default()
                },
            ),
        )
        .await
        .unwrap()
        .into_inner()
        .metrics
        .unwrap();
    assert!(evaluated.accuracy >= 0.8, "{evaluated:?}");

    // Search finds the Chinese and the English article.
    let zh = search(&caller, "银行卡丢了怎么挂失", Language::Zh).await;
    assert_eq!(
        zh.first().map(|h| h.scenario_id.as_str()),
        Some("bank_cards"),
        "{zh:?}"
    );
    let en = search(&caller, "how long does a refund take", Language::En).await;
    assert_eq!(
        en.first().map(|h| h.scenario_id.as_str()),
        Some("refunds"),
        "{en:?}"
    );

    // The bot answers a Chinese and an English customer with the stored answers.
    let turn = ask(&caller, "demo-zh", Language::Zh, "请问退货要怎么申请？").await;
    assert_eq!(
        turn.action,
        dialog::BotAction::Answer as i32,
        "{turn:?}\n{}",
        process.output()
    );
    assert!(turn.reply_text.contains("退货"), "{turn:?}");
    let turn = ask(
        &caller,
        "demo-en",
        Language::En,
        "When will my refund be back on my card?",
    )
    .await;
    assert_eq!(turn.action, dialog::BotAction::Answer as i32, "{turn:?}");
    assert!(turn.reply_text.contains("refund"), "{turn:?}");

    // A restart finds the marker and changes nothing.
    process.stop().await;
    let mut process = Process::spawn(&data_dir, addr, dir.path(), "second");
    let ready = process.wait_ready().await;
    assert!(ready.contains("seeded earlier"), "{ready}");
    let caller = Caller::new(&data_dir, addr).await;
    assert_eq!(state(&caller).await, first);

    // Without the marker every step runs again, and each finds its work done.
    process.stop().await;
    std::fs::remove_file(data_dir.join("demo.seeded")).unwrap();
    let mut process = Process::spawn(&data_dir, addr, dir.path(), "third");
    let ready = process.wait_ready().await;
    assert!(!ready.contains("seeded earlier"), "{ready}");
    let caller = Caller::new(&data_dir, addr).await;
    assert_eq!(state(&caller).await, first);
    assert!(data_dir.join("demo.seeded").exists());
    process.stop().await;
}
