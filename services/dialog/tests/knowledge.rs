//! The bot answers from the knowledge base: a published article answers the customer's question
//! and is cited (message, bot turn, decision trace, `BotReplied`, the handoff package), the
//! agent's suggestion uses it too, and a knowledge service that is down, refuses or does not
//! answer in time leaves the turn answering with the intent's stored answer. Runs on PostgreSQL
//! with a real nats-server (testkit) and on the standalone engine (SQLite and the in-process
//! bus), with a real knowledge service beside dialog.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tandem_dialog::{Dialog, Settings};
use tandem_knowledge::Knowledge;
use tandem_platform::auth::Role;
use tandem_platform::bus::{Consumer, ConsumerSpec, RawEvent};
use tandem_platform::testing::{Intercept, ServiceRig};
use tandem_proto::events::DIALOG;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::dialog::v1 as pb;
use tandem_proto::pb::dialog::v1::dialog_service_client::DialogServiceClient;
use tandem_proto::pb::dialog::v1::model_service_client::ModelServiceClient;
use tandem_proto::pb::knowledge::v1 as kpb;
use tandem_proto::pb::knowledge::v1::knowledge_service_client::KnowledgeServiceClient;
use tandem_proto::pb::routing::v1 as routing;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = DialogServiceClient<InterceptedService<Channel, Intercept>>;
type Kb = KnowledgeServiceClient<InterceptedService<Channel, Intercept>>;

const REFUND_EN: &str = "Refunds go back to your card within 3 working days.";
const REFUND_ZH: &str = "退款会在3个工作日内原路退回。";
const ARTICLE_EN: &str =
    "Once the returned item reaches our warehouse, the refund is sent to your card the same day.";
const ARTICLE_ZH: &str = "退货包裹签收后，退款当天原路退回，一般1到3个工作日到账。";

#[derive(Clone, Copy)]
enum Deployment {
    Production,
    Standalone,
}

async fn rig<S: tandem_platform::runtime::Service>(d: Deployment, s: S::Settings) -> ServiceRig {
    match d {
        Deployment::Production => ServiceRig::production::<S>(s).await,
        Deployment::Standalone => ServiceRig::standalone::<S>(s).await,
    }
}

fn settings(endpoint: &str) -> Settings {
    Settings {
        knowledge_endpoint: endpoint.into(),
        ..Settings::default()
    }
}

async fn dialog(rig: &ServiceRig) -> Client {
    let (channel, intercept) = rig.authorised("acme", "web-widget", &[Role::Channel]).await;
    DialogServiceClient::with_interceptor(channel, intercept)
}

async fn kb(rig: &ServiceRig, subject: &str, role: Role) -> Kb {
    let (channel, intercept) = rig.authorised("acme", subject, &[role]).await;
    KnowledgeServiceClient::with_interceptor(channel, intercept)
}

/// A consumer of dialog's events of type `E`.
async fn events_of<E: tandem_proto::events::Event>(rig: &ServiceRig, name: &str) -> Consumer {
    let spec = ConsumerSpec::new(name, &DIALOG, &rig.bus_config).event::<E>();
    rig.bus.consumer(&spec).await.unwrap()
}

/// The next event on `consumer`, acknowledged; it must come within 10 s.
async fn next_event<E: tandem_proto::events::Event>(consumer: &mut Consumer) -> E {
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap_or_else(|_| panic!("no {} within 10 s", E::TYPE_NAME))
        .unwrap();
    let event = delivery.event.decode::<E>().unwrap().event;
    delivery.ack().await.unwrap();
    event
}

/// Publishes an event of tenant `acme` on the bus, as another service does.
async fn publish_event<E: tandem_proto::events::Event>(rig: &ServiceRig, event: &E) {
    let raw = RawEvent::new(&TenantId::new("acme").unwrap(), event, None);
    rig.bus.publish_batch(&[raw]).await.unwrap();
}

/// The article ids and versions of a list of article references.
fn versions(articles: &[common::ArticleRef]) -> Vec<(&str, i32)> {
    articles
        .iter()
        .map(|a| (a.article_id.as_str(), a.version))
        .collect()
}

/// Trains a refund / delivery model with stored answers in both languages.
async fn train(rig: &ServiceRig) {
    let (channel, intercept) = rig.authorised("acme", "admin-1", &[Role::Admin]).await;
    let mut m = ModelServiceClient::with_interceptor(channel, intercept);
    let sets: [(&str, &str, &[&str], &str); 4] = [
        (
            "refund",
            "en",
            &[
                "how do I get a refund",
                "I want my money back",
                "refund my order",
                "when will my refund arrive",
                "can I return this and get a refund",
            ],
            REFUND_EN,
        ),
        (
            "delivery",
            "en",
            &[
                "where is my parcel",
                "track my delivery",
                "when will my package arrive",
                "my order has not arrived yet",
                "delivery status of my order",
            ],
            "Your parcel is on its way; the courier will call you.",
        ),
        (
            "refund",
            "zh",
            &[
                "我要退款",
                "怎么申请退款",
                "退款什么时候到账",
                "这个订单能退钱吗",
                "我想把钱退回来",
            ],
            REFUND_ZH,
        ),
        (
            "delivery",
            "zh",
            &[
                "快递到哪里了",
                "我的包裹什么时候到",
                "物流信息怎么查",
                "快递怎么还没到",
                "查一下我的快递",
            ],
            "您的包裹正在派送中，请留意快递员电话。",
        ),
    ];
    let mut csv = String::from("text,intent,language,answer\n");
    for (intent, lang, texts, answer) in sets {
        for (i, p) in ["", "hi ", "please ", "你好，"].iter().enumerate() {
            for (j, t) in texts.iter().enumerate() {
                let a = if i == 0 && j == 0 { answer } else { "" };
                csv.push_str(&format!("\"{p}{t}\",{intent},{lang},{a}\n"));
            }
        }
    }
    let up = m
        .upload_examples(pb::UploadExamplesRequest {
            scenario_id: "orders".into(),
            format: pb::ExampleFormat::Csv as i32,
            raw: csv,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(up.errors.is_empty(), "{:?}", up.errors);
    m.train_model(pb::TrainModelRequest {
        activate: true,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Creates, submits, approves (another person) and publishes an article; returns its id.
async fn publish(
    rig: &ServiceRig,
    language: common::Language,
    question: &str,
    answer: &str,
) -> String {
    let mut author = kb(rig, "agent-1", Role::Agent).await;
    let mut reviewer = kb(rig, "lead-1", Role::Supervisor).await;
    let id = author
        .create_article(kpb::CreateArticleRequest {
            scenario_id: "orders".into(),
            language: language as i32,
            visibility: kpb::Visibility::Both as i32,
            title: question.into(),
            questions: vec![question.into()],
            answer: answer.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .article
        .unwrap()
        .id;
    author
        .submit_for_review(kpb::SubmitForReviewRequest {
            article_id: id.clone(),
            version: 1,
            comment: String::new(),
        })
        .await
        .unwrap();
    reviewer
        .approve_version(kpb::ApproveVersionRequest {
            article_id: id.clone(),
            version: 1,
            comment: String::new(),
        })
        .await
        .unwrap();
    reviewer
        .publish_version(kpb::PublishVersionRequest {
            article_id: id.clone(),
            version: 1,
        })
        .await
        .unwrap();
    // Searchable once indexed.
    let mut bot = kb(rig, "web-widget", Role::Channel).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hits = bot
            .search(kpb::SearchRequest {
                query: question.into(),
                audience: kpb::Audience::Bot as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .hits;
        if hits.iter().any(|h| h.article_id == id) {
            return id;
        }
        assert!(Instant::now() < deadline, "article {id} never searchable");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a conversation of customer `cust-{key}` under `key`, the rest of the request from
/// `rest`.
async fn open(c: &mut Client, key: &str, rest: pb::StartConversationRequest) -> pb::Conversation {
    c.start_conversation(pb::StartConversationRequest {
        customer: Some(common::Customer {
            id: format!("cust-{key}"),
            ..Default::default()
        }),
        client_conversation_id: key.into(),
        ..rest
    })
    .await
    .unwrap()
    .into_inner()
    .conversation
    .unwrap()
}

/// Starts a web-chat conversation hinted to the `orders` scenario.
async fn start(c: &mut Client, key: &str) -> pb::Conversation {
    let rest = pb::StartConversationRequest {
        scenario_hint: "orders".into(),
        channel: common::Channel::WebChat as i32,
        ..Default::default()
    };
    open(c, key, rest).await
}

async fn say(c: &mut Client, conv: &str, id: &str, text: &str) -> pb::PostCustomerMessageResponse {
    c.post_customer_message(pb::PostCustomerMessageRequest {
        conversation_id: conv.into(),
        client_message_id: id.into(),
        text: text.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn trace(c: &mut Client, r: &pb::PostCustomerMessageResponse) -> pb::DecisionTrace {
    c.get_decision_trace(pb::GetDecisionTraceRequest {
        key: Some(pb::get_decision_trace_request::Key::TraceId(
            r.bot_turn.as_ref().unwrap().decision_trace_id.clone(),
        )),
    })
    .await
    .unwrap()
    .into_inner()
    .trace
    .unwrap()
}

fn stages(t: &pb::DecisionTrace) -> Vec<&str> {
    t.stage_latencies.iter().map(|s| s.stage.as_str()).collect()
}

/// Checks an answer cites `article` version 1 everywhere the turn reports it.
async fn assert_cited(
    c: &mut Client,
    r: &pb::PostCustomerMessageResponse,
    article: &str,
    text: &str,
) {
    let turn = r.bot_turn.as_ref().unwrap();
    assert_eq!(turn.action, pb::BotAction::Answer as i32, "{r:?}");
    assert_eq!(turn.reply_text, text);
    assert_eq!(versions(&turn.cited_articles), vec![(article, 1)]);
    assert!(turn.cited_articles[0].score >= Settings::default().knowledge_min_score);
    let t = trace(c, r).await;
    assert_eq!(t.articles, turn.cited_articles);
    assert!(stages(&t).contains(&"search"), "{:?}", t.stage_latencies);
    // The transcript's bot message carries the citation.
    let messages = c
        .list_messages(pb::ListMessagesRequest {
            conversation_id: t.conversation_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    let reply = messages
        .iter()
        .find(|m| m.id == turn.reply_message_id)
        .unwrap();
    assert_eq!(reply.cited_articles, turn.cited_articles);
}

async fn answers_cite_published_articles_and_degrade_without_knowledge(d: Deployment) {
    let knowledge = rig::<Knowledge>(d, tandem_knowledge::Settings::default()).await;
    let en_article = publish(
        &knowledge,
        common::Language::En,
        "how do I get a refund",
        ARTICLE_EN,
    )
    .await;
    let zh_article = publish(&knowledge, common::Language::Zh, "怎么申请退款", ARTICLE_ZH).await;
    let dialog_rig = rig::<Dialog>(d, settings(&knowledge.url)).await;
    train(&dialog_rig).await;
    let mut events = events_of::<pb::BotReplied>(&dialog_rig, "test-bot-replied").await;
    let mut resolutions = events_of::<pb::ConversationResolved>(&dialog_rig, "test-resolved").await;
    let mut c = dialog(&dialog_rig).await;

    // English and Chinese questions answered from the articles, cited.
    let conv = start(&mut c, "en").await;
    let en = say(&mut c, &conv.id, "m1", "how do I get a refund").await;
    assert_cited(&mut c, &en, &en_article, ARTICLE_EN).await;
    let zh_conv = start(&mut c, "zh").await;
    let zh = say(&mut c, &zh_conv.id, "m1", "怎么申请退款").await;
    assert_cited(&mut c, &zh, &zh_article, ARTICLE_ZH).await;
    // BotReplied carries the citation too.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e: pb::BotReplied = next_event(&mut events).await;
        seen.push((
            e.conversation_id,
            e.articles.first().map(|a| a.article_id.clone()),
        ));
    }
    assert!(
        seen.contains(&(conv.id.clone(), Some(en_article.clone()))),
        "{seen:?}"
    );
    assert!(
        seen.contains(&(zh_conv.id.clone(), Some(zh_article.clone()))),
        "{seen:?}"
    );

    // Without a scenario hint, and with no scenario of the tenant claiming the intent, the turn
    // is decided by the fallback policy; the search is not filtered on that fallback, so the
    // article answers and the conversation keeps no scenario.
    let bare = open(&mut c, "bare", pb::StartConversationRequest::default()).await;
    let r = say(&mut c, &bare.id, "m1", "how do I get a refund").await;
    assert_cited(&mut c, &r, &en_article, ARTICLE_EN).await;
    assert_eq!(trace(&mut c, &r).await.scenario_id, "");

    // A question the knowledge base cannot answer: the intent's stored answer, no citation.
    let other = say(&mut c, &conv.id, "m2", "where is my parcel").await;
    let turn = other.bot_turn.as_ref().unwrap();
    assert_eq!(turn.action, pb::BotAction::Answer as i32);
    assert!(turn.reply_text.contains("on its way"), "{turn:?}");
    assert!(turn.cited_articles.is_empty());

    // The handoff package lists the article versions used in the conversation.
    let handoff = say(&mut c, &conv.id, "m3", "转人工").await;
    let package = handoff.bot_turn.as_ref().unwrap().handoff.clone().unwrap();
    let used: Vec<&str> = package
        .articles_used
        .iter()
        .map(|a| a.article_id.as_str())
        .collect();
    assert_eq!(used, vec![en_article.as_str()]);

    // While an agent owns the conversation the suggestion comes from the article.
    publish_event(
        &dialog_rig,
        &routing::HandoffAssigned {
            handoff_id: package.handoff_id.clone(),
            conversation_id: conv.id.clone(),
            agent_id: "a-1".into(),
            ..Default::default()
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c
        .get_conversation(pb::GetConversationRequest {
            conversation_id: conv.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap()
        .state
        != pb::ConversationState::Agent as i32
    {
        assert!(Instant::now() < deadline, "never assigned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let suggested = say(&mut c, &conv.id, "m4", "how do I get a refund").await;
    let s = suggested
        .bot_turn
        .as_ref()
        .unwrap()
        .suggestion
        .clone()
        .unwrap();
    assert_eq!(s.text, ARTICLE_EN);
    assert_eq!(
        s.articles.first().map(|a| a.article_id.as_str()),
        Some(en_article.as_str())
    );

    // The agent resolves it: the resolution lists the article versions the bot's answers cited
    // and names the agent's team.
    publish_event(
        &dialog_rig,
        &routing::AssignmentCompleted {
            handoff_id: package.handoff_id.clone(),
            conversation_id: conv.id.clone(),
            agent_id: "a-1".into(),
            team: "returns".into(),
            disposition: routing::Disposition::Resolved as i32,
            ..Default::default()
        },
    )
    .await;
    let resolved: pb::ConversationResolved = next_event(&mut resolutions).await;
    assert_eq!(resolved.conversation_id, conv.id);
    assert_eq!(resolved.team, "returns");
    assert_eq!(
        versions(&resolved.articles_used),
        vec![(en_article.as_str(), 1)]
    );

    // Knowledge stopped: the turn still answers, with the stored answer, and says why.
    knowledge.stop().await;
    let conv2 = start(&mut c, "down").await;
    let started = Instant::now();
    let down = say(&mut c, &conv2.id, "m1", "how do I get a refund").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let turn = down.bot_turn.as_ref().unwrap();
    assert_eq!(turn.action, pb::BotAction::Answer as i32);
    assert_eq!(turn.reply_text, REFUND_EN);
    assert!(turn.cited_articles.is_empty());
    let t = trace(&mut c, &down).await;
    let st = stages(&t);
    assert!(
        st.contains(&"search_error") || st.contains(&"search_timeout"),
        "{st:?}"
    );
    let zh_down = say(&mut c, &zh_conv.id, "m2", "怎么申请退款").await;
    assert_eq!(zh_down.bot_turn.as_ref().unwrap().reply_text, REFUND_ZH);
    dialog_rig.stop().await;
}

/// A knowledge address that accepts connections but never answers: the turn waits the
/// configured timeout, then answers with the stored answer; a closed port degrades at once.
async fn an_unresponsive_or_closed_knowledge_degrades_within_the_timeout(d: Deployment) {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    for (endpoint, stage) in [
        (
            format!("http://{}", silent.local_addr().unwrap()),
            "search_timeout",
        ),
        (format!("http://{closed}"), "search_error"),
    ] {
        let timeout = Duration::from_millis(150);
        let dialog_rig = rig::<Dialog>(
            d,
            Settings {
                knowledge_timeout: timeout,
                ..settings(&endpoint)
            },
        )
        .await;
        train(&dialog_rig).await;
        let mut c = dialog(&dialog_rig).await;
        let conv = start(&mut c, "k").await;
        let started = Instant::now();
        let r = say(&mut c, &conv.id, "m1", "how do I get a refund").await;
        let took = started.elapsed();
        let turn = r.bot_turn.as_ref().unwrap();
        assert_eq!(turn.reply_text, REFUND_EN, "{endpoint}");
        assert!(turn.cited_articles.is_empty());
        let t = trace(&mut c, &r).await;
        let search = t
            .stage_latencies
            .iter()
            .find(|s| s.stage.starts_with("search"))
            .unwrap();
        assert_eq!(search.stage, stage, "{endpoint}");
        let limit = i64::try_from(timeout.as_micros()).unwrap();
        if stage == "search_timeout" {
            assert!(search.micros >= limit, "{search:?}");
        }
        assert!(search.micros < limit + 100_000, "{search:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        let zh = say(&mut c, &conv.id, "m2", "怎么申请退款").await;
        assert_eq!(zh.bot_turn.as_ref().unwrap().reply_text, REFUND_ZH);
        dialog_rig.stop().await;
    }
    drop(silent);
}

mod production {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_cite_published_articles_and_degrade_without_knowledge() {
        (super::answers_cite_published_articles_and_degrade_without_knowledge(
            Deployment::Production,
        ))
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unresponsive_or_closed_knowledge_degrades_within_the_timeout() {
        (super::an_unresponsive_or_closed_knowledge_degrades_within_the_timeout(
            Deployment::Production,
        ))
        .await
    }
}

mod standalone {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_cite_published_articles_and_degrade_without_knowledge() {
        (super::answers_cite_published_articles_and_degrade_without_knowledge(
            Deployment::Standalone,
        ))
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unresponsive_or_closed_knowledge_degrades_within_the_timeout() {
        (super::an_unresponsive_or_closed_knowledge_degrades_within_the_timeout(
            Deployment::Standalone,
        ))
        .await
    }
}
