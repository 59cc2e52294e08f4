//! `tandem standalone --demo`: a tenant `demo` with scenarios, trained intents, published
//! articles, queues, agents, alert rules and adjustment rules in Chinese and English, for
//! e-commerce (returns, refunds, delivery), banking (cards), telecom (billing), airline
//! (rebooking) and insurance (claims).
//!
//! Everything is seeded through the services' public gRPC APIs, exactly as a tenant
//! administrator would do it, with development tokens signed by the standalone's key. Every call
//! is idempotent (imports skip unchanged rows, upserts use fixed ids, an agent that already
//! exists is updated, training is skipped when the active model was trained on this content), and
//! a marker file records the content version once everything succeeded, so a restart with the
//! same data directory neither repeats nor duplicates anything.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tandem_platform::auth::{Role, TokenIssuer};
use tandem_platform::config::AuthConfig;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1::{self as common, Language, SkillRequirement};
use tandem_proto::pb::dialog::v1 as dialog;
use tandem_proto::pb::feedback::v1 as feedback;
use tandem_proto::pb::knowledge::v1 as knowledge;
use tandem_proto::pb::policy::v1 as policy;
use tandem_proto::pb::routing::v1 as routing;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use dialog::model_service_client::ModelServiceClient;
use feedback::feedback_service_client::FeedbackServiceClient;
use knowledge::knowledge_service_client::KnowledgeServiceClient;
use policy::policy_service_client::PolicyServiceClient;
use routing::routing_service_client::RoutingServiceClient;

/// The demo tenant.
pub const TENANT: &str = "demo";
/// The file in the data directory that records a completed seeding and its content version.
pub const MARKER_FILE: &str = "demo.seeded";

/// The scenario catalogue (ImportScenarios, YAML).
pub const SCENARIOS: &str = include_str!("../demo/scenarios.yaml");
/// Intent examples with stored answers (UploadExamples, JSON lines).
pub const EXAMPLES: &str = include_str!("../demo/examples.jsonl");
/// Knowledge articles (ImportArticles, JSON lines).
pub const ARTICLES: &str = include_str!("../demo/articles.jsonl");

/// Bumped when the seeding code changes what it creates (queues, agents, rules).
const SEED_REVISION: u32 = 1;
/// The subject of the administrator token used for seeding.
const ADMIN_SUBJECT: &str = "demo-admin";
/// The lowest macro F1 on the training split a demo model must reach.
const MIN_MACRO_F1: f64 = 0.8;
/// The longest one seeding call may take (training included).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// What the demo tenant holds after seeding.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Scenarios in the catalogue, the tenant default included.
    pub scenarios: usize,
    /// Published articles.
    pub articles: usize,
    /// Intents of the active model.
    pub intents: usize,
    /// Version number of the active model.
    pub model_version: i32,
    /// Macro F1 of the active model on its held-out training split.
    pub macro_f1: f64,
    /// Routing queues.
    pub queues: usize,
    /// Registered agents.
    pub agents: usize,
    /// False when an earlier run had seeded the same content.
    pub seeded_now: bool,
}

/// A version of the demo content: changes whenever a data file or the seeding code does.
pub fn content_version() -> String {
    // FNV-1a: stable across builds and platforms, unlike the standard library's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [SCENARIOS, EXAMPLES, ARTICLES] {
        for byte in part.bytes().chain([0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{SEED_REVISION}-{hash:016x}")
}

/// Seeds the demo tenant through the standalone's own gRPC port, unless the data directory's
/// marker says this content was seeded before.
pub async fn seed(addr: SocketAddr, auth: &AuthConfig, data_dir: &Path) -> anyhow::Result<Summary> {
    let version = content_version();
    let marker = data_dir.join(MARKER_FILE);
    let seeded_before = std::fs::read_to_string(&marker)
        .map(|text| text.lines().next() == Some(version.as_str()))
        .unwrap_or(false);
    let api = Api::connect(addr, auth).await?;
    if seeded_before {
        tracing::info!(%version, "demo tenant already seeded with this content");
        return api.summary(false).await;
    }
    tracing::info!(%version, "seeding the demo tenant");
    api.scenarios().await.context("scenarios")?;
    api.queues().await.context("queues")?;
    api.agents().await.context("agents")?;
    api.articles().await.context("knowledge articles")?;
    api.examples().await.context("intent examples")?;
    api.model(&version).await.context("intent model")?;
    api.alert_rules().await.context("alert rules")?;
    api.adjustment_rules().await.context("adjustment rules")?;
    let summary = api.summary(true).await?;
    std::fs::write(&marker, format!("{version}\n"))
        .with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(summary)
}

/// Prints how to use the seeded tenant.
pub fn print_ready(summary: &Summary, addr: SocketAddr, data_dir: &Path) {
    let dir = data_dir.display();
    println!(
        "demo tenant ready{}: {} scenarios, {} articles, {} intents trained (model v{}, macro F1 {:.2}), {} queues, {} agents registered",
        if summary.seeded_now {
            ""
        } else {
            " (seeded earlier)"
        },
        summary.scenarios,
        summary.articles,
        summary.intents,
        summary.model_version,
        summary.macro_f1,
        summary.queues,
        summary.agents,
    );
    let endpoint = if addr.port() == 50051 && addr.ip().is_loopback() {
        String::new()
    } else {
        format!(" --endpoint http://{}", client_addr(addr))
    };
    println!("  customer:  tandem chat --data-dir {dir}{endpoint}");
    println!("  agent:     tandem agent --data-dir {dir}{endpoint} --agent li.na");
    println!("  agents:    li.na, wang.wei, sam.taylor, chen.jing, alex.kim");
    println!("  try:       我想退货 / where is my refund? / 我的银行卡丢了 / I want to complain");
}

/// The address a client on this machine uses for a listen address (`0.0.0.0` → `127.0.0.1`).
pub fn client_addr(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let ip = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    }
}

/// Adds the administrator's bearer token to every request.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

struct Api {
    channel: Channel,
    bearer: Bearer,
}

/// Reads a failed call as an error naming the call.
fn failed(call: &str) -> impl FnOnce(Status) -> anyhow::Error + '_ {
    move |status| anyhow::anyhow!("{call} failed: {:?}: {}", status.code(), status.message())
}

fn skill(name: &str, min_level: i32) -> SkillRequirement {
    SkillRequirement {
        name: name.to_owned(),
        min_level,
    }
}

fn duration(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

/// The demo's queues: one per scenario routing target. Most are always open; the claims queue
/// keeps office hours in China Standard Time so the out-of-hours path can be shown.
fn demo_queues() -> Vec<routing::Queue> {
    let queue =
        |id: &str, name: &str, scenarios: &[&str], skills: Vec<SkillRequirement>| routing::Queue {
            id: id.to_owned(),
            name: name.to_owned(),
            scenario_ids: scenarios.iter().map(|s| (*s).to_owned()).collect(),
            required_skills: skills,
            weights: Some(routing::PriorityWeights {
                vip_boost: 20.0,
                emotion_weight: 15.0,
                ageing_per_second: 0.05,
            }),
            business_hours: Some(routing::BusinessHours {
                timezone: "+08:00".to_owned(),
                windows: Vec::new(),
                holidays: Vec::new(),
            }),
            out_of_hours: routing::OutOfHoursBehaviour::LeaveMessage as i32,
            overflow: Vec::new(),
            max_length: 0,
            offer_timeout: Some(duration(30)),
            assignment_strategy: routing::AssignmentStrategy::LeastLoaded as i32,
            ..Default::default()
        };
    let mut claims = queue(
        "insurance-claims",
        "保险理赔 Insurance claims",
        &["insurance_claims"],
        vec![skill("claims", 2)],
    );
    if let Some(hours) = claims.business_hours.as_mut() {
        hours.windows = (1..=5)
            .map(|day| routing::WeeklyWindow {
                day,
                start_minute: 9 * 60,
                end_minute: 18 * 60,
            })
            .collect();
    }
    let mut general = queue("general", "通用咨询 General", &["default"], Vec::new());
    // A general ticket nobody takes within two minutes goes to the agents who can take anything.
    general.overflow = vec![routing::OverflowStep {
        after: Some(duration(120)),
        action: routing::OverflowAction::WidenSkills as i32,
        target_queue_id: String::new(),
        drop_skills: vec!["lang:zh".to_owned(), "lang:en".to_owned()],
    }];
    vec![
        queue(
            "ecommerce",
            "电商售后 E-commerce",
            &["returns", "refunds", "delivery"],
            Vec::new(),
        ),
        queue(
            "banking-cards",
            "银行卡 Bank cards",
            &["bank_cards"],
            vec![skill("cards", 1)],
        ),
        queue(
            "telecom-billing",
            "话费账单 Phone bills",
            &["telecom_billing"],
            Vec::new(),
        ),
        queue(
            "airline",
            "航班改签 Flight changes",
            &["flight_rebooking"],
            Vec::new(),
        ),
        claims,
        queue(
            "complaints",
            "投诉 Complaints",
            &["complaint"],
            vec![skill("complaints", 1)],
        ),
        general,
    ]
}

/// The demo's agents. Skills match the scenarios' routing skills, and every agent has the
/// `lang:*` skills dialog adds to a handoff's requirements.
fn demo_agents() -> Vec<routing::Agent> {
    let agent =
        |id: &str, name: &str, team: &str, skills: &[(&str, i32)], languages: &[Language]| {
            routing::Agent {
                id: id.to_owned(),
                display_name: name.to_owned(),
                skills: skills
                    .iter()
                    .map(|(name, level)| routing::Skill {
                        name: (*name).to_owned(),
                        level: *level,
                    })
                    .collect(),
                languages: languages.iter().map(|l| *l as i32).collect(),
                team: team.to_owned(),
                max_concurrent: 3,
                ..Default::default()
            }
        };
    let (zh, en) = (Language::Zh, Language::En);
    vec![
        agent(
            "li.na",
            "李娜 Li Na",
            "ecommerce",
            &[
                ("ecommerce", 5),
                ("complaints", 3),
                ("lang:zh", 5),
                ("lang:en", 4),
            ],
            &[zh, en],
        ),
        agent(
            "wang.wei",
            "王伟 Wang Wei",
            "banking",
            &[("cards", 5), ("complaints", 3), ("lang:zh", 5)],
            &[zh],
        ),
        agent(
            "sam.taylor",
            "Sam Taylor",
            "travel-telecom",
            &[("billing", 4), ("rebooking", 4), ("lang:en", 5)],
            &[en],
        ),
        agent(
            "chen.jing",
            "陈静 Chen Jing",
            "insurance",
            &[("claims", 5), ("lang:zh", 5), ("lang:en", 3)],
            &[zh, en],
        ),
        agent(
            "alex.kim",
            "Alex Kim",
            "supervisors",
            &[
                ("ecommerce", 3),
                ("cards", 3),
                ("billing", 3),
                ("rebooking", 3),
                ("claims", 3),
                ("complaints", 5),
                ("lang:zh", 3),
                ("lang:en", 5),
            ],
            &[zh, en],
        ),
    ]
}

/// Alert rules: a burst of low bot CSAT in any scenario, and a handoff rate far above its usual
/// level.
fn demo_alert_rules() -> Vec<feedback::AlertRule> {
    vec![
        feedback::AlertRule {
            id: "demo-bot-csat-low".to_owned(),
            name: "Bot CSAT below 60 % (any scenario)".to_owned(),
            kind: feedback::AlertKind::BotCsatBelowTarget as i32,
            scenario_id: String::new(),
            metric: feedback::MetricName::Csat as i32,
            condition: feedback::AlertCondition::Below as i32,
            threshold: 0.6,
            window: Some(duration(15 * 60)),
            baseline_window: None,
            min_samples: 3,
            severity: feedback::Severity::Warning as i32,
            enabled: true,
            ..Default::default()
        },
        feedback::AlertRule {
            id: "demo-handoff-spike".to_owned(),
            name: "Handoff rate 50 % above the day before".to_owned(),
            kind: feedback::AlertKind::HandoffRateSpike as i32,
            scenario_id: String::new(),
            metric: feedback::MetricName::HandoffRate as i32,
            condition: feedback::AlertCondition::RiseVsBaseline as i32,
            threshold: 0.5,
            window: Some(duration(3600)),
            baseline_window: Some(duration(86_400)),
            min_samples: 10,
            severity: feedback::Severity::Info as i32,
            enabled: true,
            ..Default::default()
        },
    ]
}

/// Adjustment rules reacting to those alerts: low bot CSAT makes the bot answer only when it is
/// surer, and for refunds, where money is at stake, hands the conversation to an agent with the
/// bot assisting. Both revert once CSAT has recovered for a full window.
fn demo_adjustment_rules() -> Vec<policy::AdjustmentRule> {
    vec![
        policy::AdjustmentRule {
            id: "demo-csat-raise-confidence".to_owned(),
            scenario_id: String::new(),
            name: "Low bot CSAT: answer only when surer".to_owned(),
            description: "When the bot's CSAT in a scenario falls below 60 %, raise the minimum \
                          intent confidence by 0.05 (within the guardrails), so unclear questions \
                          are clarified or handed off instead of answered."
                .to_owned(),
            signal: policy::AdjustmentSignal::BotCsat as i32,
            comparison: policy::Comparison::Below as i32,
            threshold: 0.6,
            window: Some(duration(3600)),
            min_samples: 1,
            effect: Some(policy::adjustment_rule::Effect::Step(
                policy::ThresholdStep {
                    field: policy::ThresholdField::MinIntentConfidence as i32,
                    delta: 0.05,
                },
            )),
            revert_when_recovered: true,
            cooldown: Some(duration(15 * 60)),
            enabled: true,
            mode: policy::Mode::Live as i32,
            ..Default::default()
        },
        policy::AdjustmentRule {
            id: "demo-refunds-agent-assist".to_owned(),
            scenario_id: "refunds".to_owned(),
            name: "Refunds: agents take over when CSAT drops".to_owned(),
            description: "When bot CSAT for refunds falls below 50 %, switch the scenario to \
                          agent assist: an agent owns the conversation and the bot suggests."
                .to_owned(),
            signal: policy::AdjustmentSignal::BotCsat as i32,
            comparison: policy::Comparison::Below as i32,
            threshold: 0.5,
            window: Some(duration(3600)),
            min_samples: 1,
            effect: Some(policy::adjustment_rule::Effect::SetStrategy(
                policy::Strategy::AgentAssist as i32,
            )),
            revert_when_recovered: true,
            cooldown: Some(duration(30 * 60)),
            enabled: true,
            mode: policy::Mode::Live as i32,
            ..Default::default()
        },
    ]
}

impl Api {
    async fn connect(addr: SocketAddr, auth: &AuthConfig) -> anyhow::Result<Self> {
        let issuer = TokenIssuer::from_config(auth).context("cannot sign a development token")?;
        let tenant = TenantId::new(TENANT.to_owned())?;
        let token = issuer.issue(
            &tenant,
            ADMIN_SUBJECT,
            &[Role::Admin],
            Duration::from_secs(3600),
        )?;
        let bearer = Bearer(format!("Bearer {token}").parse()?);
        let address = format!("http://{}", client_addr(addr));
        let endpoint = Endpoint::from_shared(address.clone())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {address}"))?;
        Ok(Self { channel, bearer })
    }

    fn authed(&self) -> Authed {
        InterceptedService::new(self.channel.clone(), self.bearer.clone())
    }

    async fn scenarios(&self) -> anyhow::Result<()> {
        let response = PolicyServiceClient::new(self.authed())
            .import_scenarios(policy::ImportScenariosRequest {
                format: policy::ScenarioFormat::Yaml as i32,
                content: SCENARIOS.to_owned(),
                validate_only: false,
                reason: "demo tenant catalogue".to_owned(),
            })
            .await
            .map_err(failed("ImportScenarios"))?
            .into_inner();
        if !response.errors.is_empty() {
            let errors: Vec<String> = response
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.path, e.message))
                .collect();
            bail!("the demo catalogue is invalid: {}", errors.join("; "));
        }
        tracing::info!(
            created = response.created,
            updated = response.updated,
            unchanged = response.unchanged,
            "demo scenarios imported"
        );
        Ok(())
    }

    async fn queues(&self) -> anyhow::Result<()> {
        let mut client = RoutingServiceClient::new(self.authed());
        for queue in demo_queues() {
            let id = queue.id.clone();
            client
                .upsert_queue(routing::UpsertQueueRequest { queue: Some(queue) })
                .await
                .map_err(|s| failed("UpsertQueue")(s).context(format!("queue {id}")))?;
        }
        Ok(())
    }

    async fn agents(&self) -> anyhow::Result<()> {
        let mut client = RoutingServiceClient::new(self.authed());
        for agent in demo_agents() {
            let id = agent.id.clone();
            match client
                .register_agent(routing::RegisterAgentRequest {
                    agent: Some(agent.clone()),
                })
                .await
            {
                Ok(_) => {}
                Err(status) if status.code() == Code::AlreadyExists => {
                    // Registered by an earlier run: bring the profile up to date, leaving the
                    // presence and assignments alone.
                    client
                        .update_agent(routing::UpdateAgentRequest {
                            agent: Some(agent),
                            update_mask: Some(prost_types::FieldMask {
                                paths: ["display_name", "skills", "languages", "team"]
                                    .map(str::to_owned)
                                    .to_vec(),
                            }),
                        })
                        .await
                        .map_err(|s| failed("UpdateAgent")(s).context(format!("agent {id}")))?;
                }
                Err(status) => {
                    return Err(failed("RegisterAgent")(status).context(format!("agent {id}")));
                }
            }
        }
        Ok(())
    }

    async fn articles(&self) -> anyhow::Result<()> {
        let header = knowledge::ImportArticlesRequest {
            part: Some(knowledge::import_articles_request::Part::Header(
                knowledge::ImportHeader {
                    format: knowledge::ArticleFormat::Jsonl as i32,
                    default_scenario_id: String::new(),
                    default_language: Language::Unspecified as i32,
                    default_visibility: knowledge::Visibility::Both as i32,
                    publish: true,
                    dry_run: false,
                },
            )),
        };
        let chunk = knowledge::ImportArticlesRequest {
            part: Some(knowledge::import_articles_request::Part::Chunk(
                ARTICLES.as_bytes().to_vec(),
            )),
        };
        let mut stream = KnowledgeServiceClient::new(self.authed())
            .import_articles(tokio_stream::iter([header, chunk]))
            .await
            .map_err(failed("ImportArticles"))?
            .into_inner();
        let mut row_errors = Vec::new();
        let mut summary = None;
        while let Some(event) = stream.message().await.map_err(failed("ImportArticles"))? {
            match event.event {
                Some(knowledge::import_articles_response::Event::RowError(e)) => {
                    row_errors.push(format!(
                        "row {} ({}) {}: {}",
                        e.row_number, e.external_id, e.field, e.message
                    ));
                }
                Some(knowledge::import_articles_response::Event::Summary(s)) => summary = Some(s),
                _ => {}
            }
        }
        if !row_errors.is_empty() {
            bail!("articles were refused: {}", row_errors.join("; "));
        }
        let summary = summary.context("the import ended without a summary")?;
        tracing::info!(
            created = summary.created,
            updated = summary.updated,
            unchanged = summary.unchanged,
            "demo articles imported and published"
        );
        Ok(())
    }

    async fn examples(&self) -> anyhow::Result<()> {
        let response = ModelServiceClient::new(self.authed())
            .upload_examples(dialog::UploadExamplesRequest {
                format: dialog::ExampleFormat::Jsonl as i32,
                raw: EXAMPLES.to_owned(),
                ..Default::default()
            })
            .await
            .map_err(failed("UploadExamples"))?
            .into_inner();
        if !response.errors.is_empty() {
            let errors: Vec<String> = response
                .errors
                .iter()
                .map(|e| format!("row {} {}: {}", e.row_number, e.field, e.message))
                .collect();
            bail!("examples were refused: {}", errors.join("; "));
        }
        tracing::info!(
            accepted = response.accepted,
            duplicates = response.duplicates,
            "demo intent examples uploaded"
        );
        Ok(())
    }

    /// Trains and activates a model on the demo examples, unless the active one was trained on
    /// this content; refuses a model that does not separate the intents.
    async fn model(&self, version: &str) -> anyhow::Result<()> {
        let notes = format!("demo content {version}");
        let mut client = ModelServiceClient::new(self.authed());
        let active = self.active_model().await?;
        let model = match active {
            Some(model) if model.notes == notes => model,
            _ => client
                .train_model(dialog::TrainModelRequest {
                    scenario_ids: Vec::new(),
                    activate: true,
                    notes,
                })
                .await
                .map_err(failed("TrainModel"))?
                .into_inner()
                .model_version
                .context("TrainModel returned no model")?,
        };
        let f1 = model.metrics.as_ref().map_or(0.0, |m| m.macro_f1);
        if f1 < MIN_MACRO_F1 {
            bail!(
                "the demo model v{} separates the intents poorly (macro F1 {f1:.2} < {MIN_MACRO_F1})",
                model.version
            );
        }
        tracing::info!(
            version = model.version,
            intents = model.intent_count,
            macro_f1 = f1,
            "demo intent model active"
        );
        Ok(())
    }

    async fn active_model(&self) -> anyhow::Result<Option<dialog::ModelVersion>> {
        let mut client = ModelServiceClient::new(self.authed());
        let mut page_token = String::new();
        loop {
            let response = client
                .list_model_versions(dialog::ListModelVersionsRequest {
                    page: Some(common::PageRequest {
                        page_size: 100,
                        page_token,
                    }),
                })
                .await
                .map_err(failed("ListModelVersions"))?
                .into_inner();
            if let Some(active) = response
                .model_versions
                .into_iter()
                .find(|m| m.status == dialog::ModelStatus::Active as i32)
            {
                return Ok(Some(active));
            }
            page_token = response.page.map(|p| p.next_page_token).unwrap_or_default();
            if page_token.is_empty() {
                return Ok(None);
            }
        }
    }

    async fn alert_rules(&self) -> anyhow::Result<()> {
        let mut client = FeedbackServiceClient::new(self.authed());
        for rule in demo_alert_rules() {
            let id = rule.id.clone();
            client
                .upsert_alert_rule(feedback::UpsertAlertRuleRequest { rule: Some(rule) })
                .await
                .map_err(|s| failed("UpsertAlertRule")(s).context(format!("rule {id}")))?;
        }
        Ok(())
    }

    async fn adjustment_rules(&self) -> anyhow::Result<()> {
        let mut client = PolicyServiceClient::new(self.authed());
        for rule in demo_adjustment_rules() {
            let id = rule.id.clone();
            client
                .upsert_adjustment_rule(policy::UpsertAdjustmentRuleRequest { rule: Some(rule) })
                .await
                .map_err(|s| failed("UpsertAdjustmentRule")(s).context(format!("rule {id}")))?;
        }
        Ok(())
    }

    /// Counts what the tenant holds, from the services.
    async fn summary(&self, seeded_now: bool) -> anyhow::Result<Summary> {
        let page = |page_token: String| {
            Some(common::PageRequest {
                page_size: 100,
                page_token,
            })
        };
        let mut scenarios = 0;
        let mut token = String::new();
        let mut policy = PolicyServiceClient::new(self.authed());
        loop {
            let r = policy
                .list_scenarios(policy::ListScenariosRequest {
                    page: page(token),
                    ..Default::default()
                })
                .await
                .map_err(failed("ListScenarios"))?
                .into_inner();
            scenarios += r.scenarios.len();
            token = r.page.map(|p| p.next_page_token).unwrap_or_default();
            if token.is_empty() {
                break;
            }
        }
        let mut articles = 0;
        let mut knowledge = KnowledgeServiceClient::new(self.authed());
        loop {
            let r = knowledge
                .list_articles(knowledge::ListArticlesRequest {
                    page: page(token),
                    status: knowledge::ArticleStatus::Published as i32,
                    ..Default::default()
                })
                .await
                .map_err(failed("ListArticles"))?
                .into_inner();
            articles += r.articles.len();
            token = r.page.map(|p| p.next_page_token).unwrap_or_default();
            if token.is_empty() {
                break;
            }
        }
        let mut routing = RoutingServiceClient::new(self.authed());
        let mut queues = 0;
        loop {
            let r = routing
                .list_queues(routing::ListQueuesRequest { page: page(token) })
                .await
                .map_err(failed("ListQueues"))?
                .into_inner();
            queues += r.queues.len();
            token = r.page.map(|p| p.next_page_token).unwrap_or_default();
            if token.is_empty() {
                break;
            }
        }
        let mut agents = 0;
        loop {
            let r = routing
                .list_agents(routing::ListAgentsRequest {
                    page: page(token),
                    ..Default::default()
                })
                .await
                .map_err(failed("ListAgents"))?
                .into_inner();
            agents += r.agents.len();
            token = r.page.map(|p| p.next_page_token).unwrap_or_default();
            if token.is_empty() {
                break;
            }
        }
        let model = self
            .active_model()
            .await?
            .context("the demo tenant has no active intent model")?;
        Ok(Summary {
            scenarios,
            articles,
            intents: usize::try_from(model.intent_count).unwrap_or_default(),
            model_version: model.version,
            macro_f1: model.metrics.as_ref().map_or(0.0, |m| m.macro_f1),
            queues,
            agents,
            seeded_now,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    #[derive(serde::Deserialize)]
    struct Example {
        text: String,
        intent: String,
        scenario_id: String,
        language: String,
        #[serde(default)]
        answer: String,
    }

    fn examples() -> Vec<Example> {
        EXAMPLES
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn every_intent_has_fifteen_examples_and_an_answer_per_language() {
        let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
        let mut answers: BTreeSet<(String, String)> = BTreeSet::new();
        let mut texts = BTreeSet::new();
        for e in examples() {
            assert!(
                texts.insert(e.text.clone()),
                "duplicate example {:?}",
                e.text
            );
            *counts
                .entry((e.intent.clone(), e.language.clone()))
                .or_default() += 1;
            if !e.answer.is_empty() {
                assert!(answers.insert((e.intent.clone(), e.language.clone())));
            }
        }
        let intents: BTreeSet<_> = counts.keys().map(|(i, _)| i.clone()).collect();
        assert_eq!(intents.len(), 9);
        for intent in &intents {
            for language in ["zh", "en"] {
                let key = (intent.clone(), language.to_owned());
                assert!(counts.get(&key).copied().unwrap_or(0) >= 15, "{key:?}");
                assert!(answers.contains(&key), "no answer for {key:?}");
            }
        }
    }

    #[test]
    fn examples_articles_queues_and_agents_match_the_catalogue() {
        // The catalogue's intents, routing queues and skills, read from the YAML by line.
        let mut scenario_intents: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut queues_used = BTreeSet::new();
        let mut skills_used = BTreeSet::new();
        let mut current = String::new();
        for line in SCENARIOS.lines() {
            let line = line.trim();
            if let Some(id) = line.strip_prefix("- id: ") {
                current = id.to_owned();
                scenario_intents.entry(current.clone()).or_default();
            } else if let Some(list) = line.strip_prefix("intents: [") {
                let list = list.trim_end_matches(']');
                for intent in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    scenario_intents
                        .entry(current.clone())
                        .or_default()
                        .insert(intent.to_owned());
                }
            } else if let Some(queue) = line.strip_prefix("queue_id: ") {
                queues_used.insert(queue.to_owned());
            } else if let Some(rest) = line.strip_prefix("- { name: ") {
                skills_used.insert(rest.split(',').next().unwrap().to_owned());
            }
        }
        assert_eq!(scenario_intents.len(), 9);
        assert!(scenario_intents.contains_key("default"));
        for e in examples() {
            assert!(
                scenario_intents
                    .get(&e.scenario_id)
                    .is_some_and(|i| i.contains(&e.intent)),
                "{} / {} is not in the catalogue",
                e.scenario_id,
                e.intent
            );
            assert!(e.text.chars().count() <= 500 && !e.answer.contains('\u{0}'));
        }
        let article_scenarios: BTreeSet<(String, String)> = ARTICLES
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["scenario_id"].as_str().unwrap().to_owned(),
                    v["language"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        for scenario in scenario_intents.keys().filter(|s| *s != "default") {
            for language in ["zh", "en"] {
                assert!(
                    article_scenarios.contains(&(scenario.clone(), language.to_owned())),
                    "no {language} article for {scenario}"
                );
            }
        }
        let queues: BTreeSet<String> = demo_queues().into_iter().map(|q| q.id).collect();
        assert_eq!(queues, queues_used);
        let agents = demo_agents();
        for skill in &skills_used {
            assert!(
                agents
                    .iter()
                    .any(|a| a.skills.iter().any(|s| &s.name == skill)),
                "no agent has skill {skill}"
            );
        }
        for agent in &agents {
            for language in &agent.languages {
                let name = if *language == Language::Zh as i32 {
                    "lang:zh"
                } else {
                    "lang:en"
                };
                assert!(agent.skills.iter().any(|s| s.name == name), "{}", agent.id);
            }
        }
    }

    #[test]
    fn the_content_version_is_stable_and_client_addresses_are_local() {
        assert_eq!(content_version(), content_version());
        assert!(content_version().starts_with("1-"));
        assert_eq!(
            client_addr("0.0.0.0:50051".parse().unwrap()),
            "127.0.0.1:50051".parse().unwrap()
        );
        assert_eq!(
            client_addr("10.0.0.2:7000".parse().unwrap()),
            "10.0.0.2:7000".parse().unwrap()
        );
    }
}
