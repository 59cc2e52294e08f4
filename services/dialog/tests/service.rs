//! The dialog service end to end over gRPC and the bus, on both deployments: PostgreSQL with a
//! real nats-server (throwaway servers from the testkit), and the standalone engine (SQLite and
//! the in-process bus). Every case runs on both through the `both!` macro.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tandem_dialog::{Dialog, Settings};
use tandem_platform::auth::Role;
use tandem_platform::bus::{Consumer, ConsumerSpec, RawEvent};
use tandem_platform::testing::{Intercept, ServiceRig};
use tandem_proto::events::DIALOG;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::dialog::v1 as pb;
use tandem_proto::pb::dialog::v1::dialog_service_client::DialogServiceClient;
use tandem_proto::pb::dialog::v1::model_service_client::ModelServiceClient;
use tandem_proto::pb::policy::v1 as policy;
use tandem_proto::pb::routing::v1 as routing;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = DialogServiceClient<InterceptedService<Channel, Intercept>>;
type Models = ModelServiceClient<InterceptedService<Channel, Intercept>>;

/// The dialog service running in-process, and what a test needs around it.
struct Rig(ServiceRig);

impl Rig {
    async fn production() -> Self {
        Self(ServiceRig::production::<Dialog>(Settings::default()).await)
    }

    async fn standalone() -> Self {
        Self(ServiceRig::standalone::<Dialog>(Settings::default()).await)
    }

    async fn production_with(settings: Settings) -> Self {
        Self(ServiceRig::production::<Dialog>(settings).await)
    }

    async fn standalone_with(settings: Settings) -> Self {
        Self(ServiceRig::standalone::<Dialog>(settings).await)
    }

    async fn channel(&self, tenant: &str, subject: &str, roles: &[Role]) -> (Channel, Intercept) {
        self.0.authorised(tenant, subject, roles).await
    }

    async fn client(&self, tenant: &str, subject: &str, roles: &[Role]) -> Client {
        let (channel, intercept) = self.channel(tenant, subject, roles).await;
        DialogServiceClient::with_interceptor(channel, intercept)
    }

    async fn models(&self, tenant: &str) -> Models {
        let (channel, intercept) = self.channel(tenant, "admin-1", &[Role::Admin]).await;
        ModelServiceClient::with_interceptor(channel, intercept)
    }

    async fn dialog_events(&self, name: &str) -> Consumer {
        let spec = ConsumerSpec::new(name, &DIALOG, &self.0.bus_config)
            .event::<pb::HandoffRequested>()
            .event::<pb::SuggestionReviewed>();
        self.0.bus.consumer(&spec).await.unwrap()
    }

    /// A consumer of dialog's events of type `E` alone.
    async fn events_of<E: tandem_proto::events::Event>(&self, name: &str) -> Consumer {
        let spec = ConsumerSpec::new(name, &DIALOG, &self.0.bus_config).event::<E>();
        self.0.bus.consumer(&spec).await.unwrap()
    }

    async fn publish<E: tandem_proto::events::Event>(&self, tenant: &str, event: &E) {
        let raw = RawEvent::new(&TenantId::new(tenant).unwrap(), event, None);
        self.0.bus.publish_batch(&[raw]).await.unwrap();
    }

    /// Publishes `scenario` at its version, as the policy service does.
    async fn apply_policy(&self, tenant: &str, scenario: policy::Scenario) {
        self.publish(
            tenant,
            &policy::PolicyUpdated {
                scenario_id: scenario.id.clone(),
                version: scenario.version,
                scenario: Some(scenario),
                ..Default::default()
            },
        )
        .await;
    }

    /// Routing assigns the handoff of an `acme` conversation to `agent`.
    async fn assign(&self, handoff_id: &str, conversation_id: &str, agent: &str) {
        self.publish(
            "acme",
            &routing::HandoffAssigned {
                handoff_id: handoff_id.into(),
                conversation_id: conversation_id.into(),
                agent_id: agent.into(),
                ..Default::default()
            },
        )
        .await;
    }

    async fn stop(self) {
        self.0.stop().await;
    }
}

/// Waits for the next event of type `E` on `consumer`, skipping others.
async fn next_event<E: tandem_proto::events::Event>(consumer: &mut Consumer) -> E {
    loop {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("no event within 10 s")
            .unwrap();
        let matches = delivery.event.type_name == E::TYPE_NAME;
        let decoded = matches.then(|| delivery.event.decode::<E>().unwrap().event);
        delivery.ack().await.unwrap();
        if let Some(e) = decoded {
            return e;
        }
    }
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod production {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Rig::production()).await }) *
        }
        mod standalone {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Rig::standalone()).await }) *
        }
    };
}

both!(
    a_trained_model_changes_what_the_bot_understands,
    explicit_request_hands_off_once_with_the_package,
    emotion_swing_hands_off_and_routing_moves_the_conversation,
    policy_updates_from_events_drive_the_bot,
    bad_input_is_refused_and_nothing_written,
    the_sentiment_trend_starts_again_after_a_reopen,
    a_long_conversation_keeps_numbering_its_turns,
    a_transfer_hands_the_conversation_to_the_new_agent,
    a_suggestion_is_reviewed_once,
    only_the_assigned_agent_closes_or_types_as_the_agent,
    a_fallback_turn_leaves_the_scenario_unset,
    resolutions_report_the_team_and_confusion_is_an_emotion,
    routing_events_out_of_order_leave_the_latest_state,
    queue_reports_let_the_policy_offer_to_leave_a_message,
    a_resolved_agent_lets_go_of_the_conversation,
    starts_check_the_customer,
);

/// The repeat-contact window of the tests that count earlier conversations.
const REPEAT_WINDOW: Duration = Duration::from_secs(2);

fn repeat_settings() -> Settings {
    Settings {
        repeat_contact_window: REPEAT_WINDOW,
        ..Settings::default()
    }
}

/// Runs the case `$name` on both deployments with the settings `$settings()`, as the tests
/// `$module::production` and `$module::standalone`.
macro_rules! both_with {
    ($module:ident, $settings:ident, $name:ident) => {
        mod $module {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn production() {
                super::$name(super::Rig::production_with(super::$settings())).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn standalone() {
                super::$name(super::Rig::standalone_with(super::$settings())).await;
            }
        }
    };
}

both_with!(
    repeat_contacts,
    repeat_settings,
    repeat_contacts_count_the_customers_recent_conversations
);

/// Training examples: core phrases with polite prefixes, answers on the first row of each
/// intent and language.
fn examples_csv() -> String {
    type Set<'a> = (&'a str, &'a str, &'a [&'a str], &'a [&'a str], &'a str);
    let sets: [Set; 4] = [
        (
            "refund",
            "zh",
            &["", "请问", "你好，", "麻烦问下"],
            &[
                "我要退款",
                "怎么申请退款",
                "退款什么时候到账",
                "这个订单能退钱吗",
                "我想把钱退回来",
            ],
            "退款会在3个工作日内原路退回。",
        ),
        (
            "delivery",
            "zh",
            &["", "请问", "你好，", "麻烦问下"],
            &[
                "快递到哪里了",
                "我的包裹什么时候到",
                "物流信息怎么查",
                "快递怎么还没到",
                "查一下我的快递",
            ],
            "您的包裹正在派送中，请留意快递员电话。",
        ),
        (
            "refund",
            "en",
            &["", "hi ", "please ", "hello, "],
            &[
                "how do I get a refund",
                "I want my money back",
                "can I return this and get a refund",
                "refund my order",
                "when will my refund arrive",
            ],
            "Refunds go back to your card within 3 working days.",
        ),
        (
            "delivery",
            "en",
            &["", "hi ", "please ", "hello, "],
            &[
                "where is my parcel",
                "track my delivery",
                "when will my package arrive",
                "my order has not arrived yet",
                "delivery status of my order",
            ],
            "Your parcel is on its way; the courier will call you.",
        ),
    ];
    let mut csv = String::from("text,intent,language,answer\n");
    for (intent, lang, prefixes, cores, answer) in sets {
        let mut first = true;
        for p in prefixes {
            for c in cores {
                let a = if first { answer } else { "" };
                first = false;
                csv.push_str(&format!("\"{p}{c}\",{intent},{lang},{a}\n"));
            }
        }
    }
    // One phrase that belongs to both intents: the model cannot choose between them.
    for p in ["", "请问", "你好，", "麻烦问下"] {
        for intent in ["refund", "delivery"] {
            csv.push_str(&format!("\"{p}我的订单有问题\",{intent},zh,\n"));
        }
    }
    csv
}

async fn train(rig: &Rig, tenant: &str) -> pb::ModelVersion {
    let mut m = rig.models(tenant).await;
    let up = m
        .upload_examples(pb::UploadExamplesRequest {
            scenario_id: "orders".into(),
            format: pb::ExampleFormat::Csv as i32,
            raw: examples_csv(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(up.accepted, 88, "{:?}", up.errors);
    assert_eq!(up.total_examples, 88);
    m.train_model(pb::TrainModelRequest {
        activate: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .model_version
    .unwrap()
}

/// Sends a `StartConversation` request.
async fn begin(
    c: &mut Client,
    req: pb::StartConversationRequest,
) -> Result<pb::StartConversationResponse, tonic::Status> {
    c.start_conversation(req)
        .await
        .map(tonic::Response::into_inner)
}

async fn start(c: &mut Client, key: &str, language: common::Language) -> pb::Conversation {
    let req = pb::StartConversationRequest {
        customer: Some(common::Customer {
            id: format!("cust-{key}"),
            display_name: "王小明".into(),
            language: language as i32,
            tier: common::CustomerTier::Vip as i32,
            ..Default::default()
        }),
        channel: common::Channel::WebChat as i32,
        client_conversation_id: key.into(),
        ..Default::default()
    };
    begin(c, req).await.unwrap().conversation.unwrap()
}

/// Posts a customer message with the client's message id `id`.
async fn try_say(
    c: &mut Client,
    conv: &str,
    id: &str,
    text: &str,
) -> Result<pb::PostCustomerMessageResponse, tonic::Status> {
    c.post_customer_message(pb::PostCustomerMessageRequest {
        conversation_id: conv.into(),
        client_message_id: id.into(),
        text: text.into(),
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn say(c: &mut Client, conv: &str, id: &str, text: &str) -> pb::PostCustomerMessageResponse {
    try_say(c, conv, id, text).await.unwrap()
}

/// The messages of a conversation.
async fn messages(c: &mut Client, conv: &str) -> Vec<pb::Message> {
    c.list_messages(pb::ListMessagesRequest {
        conversation_id: conv.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .messages
}

/// One page of a conversation's decision traces.
async fn traces_page(
    c: &mut Client,
    conv: &str,
    page: Option<common::PageRequest>,
) -> Result<pb::ListDecisionTracesResponse, tonic::Status> {
    c.list_decision_traces(pb::ListDecisionTracesRequest {
        conversation_id: conv.into(),
        page,
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Resolves a conversation from the channel's side.
async fn resolve(c: &mut Client, conv: &str) {
    c.resolve_conversation(pb::ResolveConversationRequest {
        conversation_id: conv.into(),
        note: String::new(),
    })
    .await
    .unwrap();
}

/// Watches a conversation in `view`.
async fn watch_as(
    c: &mut Client,
    conv: &str,
    view: pb::ConversationView,
) -> Result<tonic::Streaming<pb::WatchConversationResponse>, tonic::Status> {
    c.watch_conversation(pb::WatchConversationRequest {
        conversation_id: conv.into(),
        view: view as i32,
        resume_after: String::new(),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Watches a conversation as the customer sees it.
async fn watch(c: &mut Client, conv: &str) -> tonic::Streaming<pb::WatchConversationResponse> {
    watch_as(c, conv, pb::ConversationView::Customer)
        .await
        .unwrap()
}

/// The next update a watcher gets, within 5 s.
async fn next_update(
    w: &mut tonic::Streaming<pb::WatchConversationResponse>,
) -> pb::ConversationUpdate {
    tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .update
        .unwrap()
}

/// The next update a watcher gets that `pick` keeps, skipping the others.
async fn next_picked<T>(
    w: &mut tonic::Streaming<pb::WatchConversationResponse>,
    pick: impl Fn(pb::conversation_update::Update) -> Option<T>,
) -> T {
    loop {
        if let Some(t) = next_update(w).await.update.and_then(&pick) {
            return t;
        }
    }
}

/// The next state change a watcher gets.
async fn next_state_change(
    w: &mut tonic::Streaming<pb::WatchConversationResponse>,
) -> pb::StateChange {
    next_picked(w, |u| match u {
        pb::conversation_update::Update::StateChanged(s) => Some(s),
        _ => None,
    })
    .await
}

/// Posts an agent message with the client's message id `id`.
async fn agent_says(
    agent: &mut Client,
    conv: &str,
    id: &str,
    text: &str,
) -> Result<pb::PostAgentMessageResponse, tonic::Status> {
    agent
        .post_agent_message(pb::PostAgentMessageRequest {
            conversation_id: conv.into(),
            client_message_id: id.into(),
            text: text.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Closes a conversation for `reason`, with `note`.
async fn close_with(
    c: &mut Client,
    conv: &str,
    reason: pb::CloseReason,
    note: &str,
) -> Result<pb::Conversation, tonic::Status> {
    c.close_conversation(pb::CloseConversationRequest {
        conversation_id: conv.into(),
        reason: reason as i32,
        note: note.into(),
    })
    .await
    .map(|r| r.into_inner().conversation.unwrap())
}

/// An agent's review rejecting a suggestion for `reason`.
fn rejection(suggestion_id: &str, reason: &str) -> pb::ReviewSuggestionRequest {
    pb::ReviewSuggestionRequest {
        suggestion_id: suggestion_id.into(),
        outcome: pb::SuggestionOutcome::Rejected as i32,
        reason: reason.into(),
        ..Default::default()
    }
}

/// What routing reports when `agent`'s assignment to a handoff ends with `disposition`.
fn completed(
    handoff_id: &str,
    conversation_id: &str,
    agent: &str,
    disposition: routing::Disposition,
) -> routing::AssignmentCompleted {
    routing::AssignmentCompleted {
        handoff_id: handoff_id.into(),
        conversation_id: conversation_id.into(),
        agent_id: agent.into(),
        disposition: disposition as i32,
        ..Default::default()
    }
}

fn action(r: &pb::PostCustomerMessageResponse) -> pb::BotAction {
    pb::BotAction::try_from(r.bot_turn.as_ref().unwrap().action).unwrap()
}

async fn a_trained_model_changes_what_the_bot_understands(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let conv = start(&mut c, "k1", common::Language::Unspecified).await;
    // Same key, same conversation.
    let again = begin(
        &mut c,
        pb::StartConversationRequest {
            customer: conv.customer.clone(),
            client_conversation_id: "k1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(!again.created);
    assert_eq!(again.conversation.unwrap().id, conv.id);

    // No model yet: the bot cannot tell what the customer wants.
    let before = say(&mut c, &conv.id, "m1", "我要退款").await;
    assert_eq!(action(&before), pb::BotAction::Fallback);

    let version = train(&rig, "acme").await;
    assert_eq!(version.version, 1);
    assert_eq!(version.intent_count, 2);
    assert_eq!(version.status, pb::ModelStatus::Active as i32);

    // Chinese answer from the stored answer of the intent.
    let zh = say(&mut c, &conv.id, "m2", "我要退款").await;
    assert_eq!(action(&zh), pb::BotAction::Answer, "{zh:?}");
    assert_eq!(
        zh.bot_turn.as_ref().unwrap().reply_text,
        "退款会在3个工作日内原路退回。"
    );
    // English answer.
    let en = say(&mut c, &conv.id, "m3", "where is my parcel").await;
    assert_eq!(action(&en), pb::BotAction::Answer, "{en:?}");
    assert!(en.bot_turn.as_ref().unwrap().reply_text.contains("parcel"));

    // An ambiguous question: the bot asks which intent was meant.
    let mut c2 = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let amb = start(&mut c2, "k1-ambiguous", common::Language::Zh).await;
    let clarify = say(&mut c2, &amb.id, "q1", "我的订单有问题").await;
    assert_eq!(action(&clarify), pb::BotAction::Clarify, "{clarify:?}");
    let choices: Vec<String> = clarify
        .bot_turn
        .as_ref()
        .unwrap()
        .choices
        .iter()
        .map(|c| c.intent.clone())
        .collect();
    assert!(choices.contains(&"refund".to_owned()) && choices.contains(&"delivery".to_owned()));

    // Idempotent retry: same result, marked duplicate, nothing appended.
    let dup = say(&mut c, &conv.id, "m3", "where is my parcel").await;
    assert!(dup.duplicate);
    assert_eq!(
        dup.message.as_ref().unwrap().id,
        en.message.as_ref().unwrap().id
    );
    let msgs = messages(&mut c, &conv.id).await;
    assert_eq!(msgs.len(), 6);
    assert_eq!(
        msgs.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );

    // Decision traces: by id and by message, in turn order.
    let trace = trace_of(&mut c, &zh).await;
    assert_eq!(trace.intent_scores[0].intent, "refund");
    assert_eq!(trace.model_version_id, version.id);
    assert_eq!(
        trace.language.unwrap().language,
        common::Language::Zh as i32
    );
    assert!(trace.policy_decision.as_ref().unwrap().rule_id.len() > 1);
    assert!(trace.total_micros > 0);
    let by_message = c
        .get_decision_trace(pb::GetDecisionTraceRequest {
            key: Some(pb::get_decision_trace_request::Key::MessageId(
                en.message.as_ref().unwrap().id.clone(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .trace
        .unwrap();
    assert_eq!(by_message.intent_scores[0].intent, "delivery");
    let traces = traces_page(&mut c, &conv.id, None).await.unwrap().traces;
    assert_eq!(
        traces.iter().map(|t| t.turn_index).collect::<Vec<_>>(),
        [0, 1, 2]
    );

    // Versions, evaluation and rollback.
    let mut m = rig.models("acme").await;
    let eval = m
        .evaluate_model(pb::EvaluateModelRequest {
            held_out: vec![
                pb::IntentExample {
                    text: "退款多久到账".into(),
                    intent: "refund".into(),
                    ..Default::default()
                },
                pb::IntentExample {
                    text: "where is my delivery".into(),
                    intent: "delivery".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let metrics = eval.metrics.unwrap();
    assert_eq!(metrics.evaluated_count, 2);
    assert!(metrics.accuracy >= 0.5, "{metrics:?}");
    let v2 = m
        .train_model(pb::TrainModelRequest::default())
        .await
        .unwrap()
        .into_inner()
        .model_version
        .unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.status, pb::ModelStatus::Inactive as i32);
    let act = m
        .activate_model_version(pb::ActivateModelVersionRequest {
            model_version_id: v2.id.clone(),
            reason: "newer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(act.previous_model_version_id, version.id);
    let list = m
        .list_model_versions(pb::ListModelVersionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .model_versions;
    assert_eq!(list.iter().map(|v| v.version).collect::<Vec<_>>(), [2, 1]);
    assert_eq!(list[1].status, pb::ModelStatus::Inactive as i32);
    rig.stop().await;
}

async fn explicit_request_hands_off_once_with_the_package(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut events = rig.dialog_events("test-handoffs").await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let conv = start(&mut c, "k2", common::Language::Zh).await;
    train(&rig, "acme").await;
    let first = say(
        &mut c,
        &conv.id,
        "m1",
        "我的订单号是 A12345678，一直没有收到货",
    )
    .await;
    assert_ne!(action(&first), pb::BotAction::Handoff, "{first:?}");
    let r = say(&mut c, &conv.id, "m2", "转人工").await;
    assert_eq!(action(&r), pb::BotAction::Handoff, "{r:?}");
    assert_eq!(r.state, pb::ConversationState::Queued as i32);
    let package = r.bot_turn.as_ref().unwrap().handoff.clone().unwrap();
    let trigger = package.trigger.clone().unwrap();
    assert_eq!(
        trigger.reason,
        common::HandoffReason::ExplicitRequest as i32
    );
    assert_eq!(trigger.rule_id, "explicit_request");
    let numbers = |m: &std::collections::HashMap<String, f64>| {
        let mut v: Vec<(String, f64)> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(numbers(&trigger.values), [("human_requested".into(), 1.0)]);
    assert_eq!(
        numbers(&trigger.thresholds),
        [("human_requested".into(), 1.0)]
    );
    assert_eq!(
        package.customer.as_ref().unwrap().tier,
        common::CustomerTier::Vip as i32
    );
    assert_eq!(package.sentiment_trajectory.len(), 2);
    assert_eq!(package.recent_messages.len(), 4);
    assert!(!package.summary.is_empty());
    assert!(
        package
            .entities
            .iter()
            .any(|e| e.kind == common::EntityKind::OrderNumber as i32),
        "{:?}",
        package.entities
    );
    assert!(package.required_skills.iter().any(|s| s.name == "lang:zh"));
    assert_eq!(package.language, common::Language::Zh as i32);
    assert_eq!(
        package.triggered_by_message_id,
        r.message.as_ref().unwrap().id
    );

    // The event carries the same package.
    let requested: pb::HandoffRequested = next_event(&mut events).await;
    assert_eq!(requested.handoff_id, package.handoff_id);
    assert_eq!(requested.package.unwrap(), package);

    // Retrying the same message never hands off twice.
    let dup = say(&mut c, &conv.id, "m2", "转人工").await;
    assert!(dup.duplicate);
    assert_eq!(
        dup.bot_turn.unwrap().handoff.unwrap().handoff_id,
        package.handoff_id
    );
    // While queued the bot does not answer.
    let waiting = say(&mut c, &conv.id, "m3", "还要等多久").await;
    assert!(waiting.bot_turn.is_none());
    assert_eq!(waiting.state, pb::ConversationState::Queued as i32);
    // Cancelling brings it back to the bot.
    let back = c
        .cancel_handoff(pb::CancelHandoffRequest {
            conversation_id: conv.id.clone(),
            handoff_id: package.handoff_id.clone(),
            reason: "不用了".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    assert_eq!(back.state, pb::ConversationState::Bot as i32);
    let err = c
        .cancel_handoff(pb::CancelHandoffRequest {
            conversation_id: conv.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    rig.stop().await;
}

/// Reads a conversation.
async fn conversation(c: &mut Client, id: &str) -> pb::Conversation {
    c.get_conversation(pb::GetConversationRequest {
        conversation_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .conversation
    .unwrap()
}

/// Waits up to 10 s until the conversation passes `done`; returns it then.
async fn wait_until(
    c: &mut Client,
    id: &str,
    done: impl Fn(&pb::Conversation) -> bool,
) -> pb::Conversation {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let conv = conversation(c, id).await;
        if done(&conv) {
            return conv;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "conversation stayed {:?} with {:?}",
            conv.state,
            conv.assigned_agent_id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_state(c: &mut Client, id: &str, state: pb::ConversationState) -> pb::Conversation {
    wait_until(c, id, |conv| conv.state == state as i32).await
}

async fn emotion_swing_hands_off_and_routing_moves_the_conversation(
    rig: impl Future<Output = Rig>,
) {
    let rig = rig.await;
    let mut events = rig.dialog_events("test-reviews").await;
    train(&rig, "acme").await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let conv = start(&mut c, "k3", common::Language::En).await;
    let mut watch = watch(&mut c, &conv.id).await;
    say(
        &mut c,
        &conv.id,
        "m1",
        "Thanks, that is great, you are very helpful!",
    )
    .await;
    let r = say(
        &mut c,
        &conv.id,
        "m2",
        "This is terrible!!! I am furious, worst service ever, absolutely useless!",
    )
    .await;
    assert_eq!(action(&r), pb::BotAction::Handoff, "{r:?}");
    let package = r.bot_turn.unwrap().handoff.unwrap();
    let reason = package.trigger.as_ref().unwrap().reason;
    assert!(
        reason == common::HandoffReason::EmotionSwing as i32
            || reason == common::HandoffReason::NegativeEmotion as i32,
        "{package:?}"
    );
    assert!(!package.trigger.as_ref().unwrap().values.is_empty());
    let trajectory: Vec<f64> = package
        .sentiment_trajectory
        .iter()
        .map(|p| p.sentiment.as_ref().unwrap().score)
        .collect();
    assert!(trajectory[0] > trajectory[1], "{trajectory:?}");

    // The watcher saw the messages and the state change.
    let mut seen_state = false;
    let mut seen_messages = 0;
    while !(seen_state && seen_messages >= 4) {
        match next_update(&mut watch).await.update.unwrap() {
            pb::conversation_update::Update::StateChanged(s) => {
                seen_state |= s.to_state == pb::ConversationState::Queued as i32;
            }
            pb::conversation_update::Update::MessagePosted(_) => seen_messages += 1,
            _ => {}
        }
    }

    // Routing queues, then assigns agent a-1.
    rig.publish(
        "acme",
        &routing::HandoffQueued {
            handoff_id: package.handoff_id.clone(),
            conversation_id: conv.id.clone(),
            position: 2,
            eta_seconds: 90,
            queue_id: "general".into(),
            ..Default::default()
        },
    )
    .await;
    let shown = wait_until(&mut c, &conv.id, |got| got.queue.is_some()).await;
    assert_eq!(shown.queue.unwrap().position, 2);
    rig.assign(&package.handoff_id, &conv.id, "a-1").await;
    let owned = wait_state(&mut c, &conv.id, pb::ConversationState::Agent).await;
    assert_eq!(owned.assigned_agent_id, "a-1");

    // Only the assigned agent may write.
    let mut other = rig.client("acme", "a-2", &[Role::Agent]).await;
    let err = agent_says(&mut other, &conv.id, "x", "hello")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut agent = rig.client("acme", "a-1", &[Role::Agent]).await;
    // The customer writes; the bot only suggests to the agent.
    let turn = say(&mut c, &conv.id, "m3", "how do I get a refund").await;
    assert_eq!(action(&turn), pb::BotAction::Suggest);
    let bt = turn.bot_turn.unwrap();
    assert!(bt.reply_message_id.is_empty());
    assert!(bt.reply_text.is_empty());
    let suggestion = bt.suggestion.unwrap();
    let posted = agent
        .post_agent_message(pb::PostAgentMessageRequest {
            conversation_id: conv.id.clone(),
            client_message_id: "a1".into(),
            text: format!("{} Sorry for the trouble.", suggestion.text),
            suggestion_id: suggestion.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(posted.state, pb::ConversationState::Agent as i32);
    let err = agent
        .review_suggestion(pb::ReviewSuggestionRequest {
            suggestion_id: suggestion.id.clone(),
            outcome: pb::SuggestionOutcome::Used as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "reviewed when posted");
    // A second suggestion, rejected by the agent; another agent may not review it.
    let turn2 = say(&mut c, &conv.id, "m3b", "when will my refund arrive").await;
    assert_eq!(action(&turn2), pb::BotAction::Suggest);
    let s2 = turn2.bot_turn.unwrap().suggestion.unwrap();
    let reject = rejection(&s2.id, "does not apply to this order");
    let err = other.review_suggestion(reject.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let reviewed = agent
        .review_suggestion(reject)
        .await
        .unwrap()
        .into_inner()
        .suggestion
        .unwrap()
        .review
        .unwrap();
    assert_eq!(reviewed.outcome, pb::SuggestionOutcome::Rejected as i32);
    assert_eq!(reviewed.agent_id, "a-1");
    let first: pb::SuggestionReviewed = next_event(&mut events).await;
    assert_eq!(
        first.suggestion.unwrap().review.unwrap().outcome,
        pb::SuggestionOutcome::Edited as i32
    );
    let second: pb::SuggestionReviewed = next_event(&mut events).await;
    assert_eq!(second.suggestion.unwrap().id, s2.id);

    // The agent resolves through routing.
    let resolved = completed(
        &package.handoff_id,
        &conv.id,
        "a-1",
        routing::Disposition::Resolved,
    );
    rig.publish("acme", &resolved).await;
    wait_state(&mut c, &conv.id, pb::ConversationState::Resolved).await;
    drop(watch);
    // A new message reopens it with the bot; closing ends it.
    let reopened = say(&mut c, &conv.id, "m4", "where is my parcel").await;
    assert!(
        reopened.bot_turn.is_some(),
        "the bot takes the reopened conversation"
    );
    assert_ne!(reopened.state, pb::ConversationState::Resolved as i32);
    let closed = close_with(&mut c, &conv.id, pb::CloseReason::CustomerLeft, "")
        .await
        .unwrap();
    assert_eq!(closed.state, pb::ConversationState::Closed as i32);
    let err = try_say(&mut c, &conv.id, "m5", "hello?").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    rig.stop().await;
}

async fn policy_updates_from_events_drive_the_bot(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    train(&rig, "acme").await;
    // The policy service makes refunds human-first, routed to a refunds queue.
    let scenario = policy::Scenario {
        id: "refunds".into(),
        intents: vec!["refund".into()],
        tier: policy::Tier::Complex as i32,
        strategy: policy::Strategy::HumanFirst as i32,
        version: 3,
        routing: Some(policy::RoutingTarget {
            queue_id: "refunds-queue".into(),
            skills: vec![common::SkillRequirement {
                name: "refunds".into(),
                min_level: 3,
            }],
            priority: 70,
        }),
        ..Default::default()
    };
    rig.apply_policy("acme", scenario).await;
    // Deliveries stay with the bot, except for a topic it must not handle.
    rig.apply_policy(
        "acme",
        policy::Scenario {
            id: "deliveries".into(),
            intents: vec!["delivery".into()],
            tier: policy::Tier::Standard as i32,
            strategy: policy::Strategy::BotFirst as i32,
            version: 1,
            sensitive_phrases: vec!["律师函".into()],
            ..Default::default()
        },
    )
    .await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        // A fresh conversation per attempt, as a turn under the old policy answers.
        n += 1;
        let conv = start(&mut c, &format!("k4-{n}"), common::Language::Zh).await;
        let r = say(&mut c, &conv.id, "m1", "我要退款").await;
        let trace = trace_of(&mut c, &r).await;
        let bt = r.bot_turn.unwrap();
        let decision = trace.policy_decision.unwrap();
        if decision.policy_version == 3 {
            assert_eq!(decision.scenario_id, "refunds");
            assert_eq!(trace.scenario_id, "refunds");
            assert_eq!(bt.action, pb::BotAction::Handoff as i32);
            let package = bt.handoff.unwrap();
            let trigger = package.trigger.clone().unwrap();
            assert_eq!(
                trigger.reason,
                common::HandoffReason::PolicyHumanFirst as i32
            );
            // The strategy alone fired it: no observed number to report.
            assert_eq!(trigger.rule_id, "human_first");
            assert!(trigger.values.is_empty(), "{trigger:?}");
            assert!(trigger.thresholds.is_empty(), "{trigger:?}");
            assert_eq!(package.queue_id, "refunds-queue");
            assert_eq!(package.priority, 70);
            assert_eq!(package.policy_version, 3);
            assert!(package.required_skills.iter().any(|s| s.name == "refunds"));
            let conv = start(&mut c, &format!("k4-d{n}"), common::Language::Zh).await;
            let r = say(&mut c, &conv.id, "m1", "快递到哪里了，我已经准备好律师函").await;
            let package = r
                .bot_turn
                .unwrap()
                .handoff
                .expect("sensitive topic hands off");
            let trigger = package.trigger.clone().unwrap();
            assert_eq!(trigger.reason, common::HandoffReason::SensitiveTopic as i32);
            assert_eq!(trigger.rule_id, "sensitive_topic");
            assert_eq!(trigger.values.get("sensitive_topic"), Some(&1.0));
            assert_eq!(trigger.thresholds.get("sensitive_topic"), Some(&1.0));
            assert_eq!(trigger.values.len(), 1, "{trigger:?}");
            assert_eq!(package.scenario_id, "deliveries");
            break;
        }
        assert_eq!(bt.action, pb::BotAction::Answer as i32);
        assert!(
            tokio::time::Instant::now() < deadline,
            "policy never applied: {decision:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    rig.stop().await;
}

/// Routing's queue statistics as of now.
fn queue_report(queue: &str, eta_seconds: i32, open: bool) -> routing::QueueStatsReported {
    routing::QueueStatsReported {
        queue_id: queue.into(),
        eta_seconds,
        within_business_hours: Some(open),
        occurred_at: Some(tandem_dialog::app::now()),
        ..Default::default()
    }
}

/// Starts a conversation in Chinese with a standard-tier customer (`start` has a VIP).
async fn start_standard(c: &mut Client, key: &str) -> pb::Conversation {
    let req = pb::StartConversationRequest {
        customer: Some(common::Customer {
            id: format!("cust-{key}"),
            language: common::Language::Zh as i32,
            tier: common::CustomerTier::Standard as i32,
            ..Default::default()
        }),
        channel: common::Channel::WebChat as i32,
        client_conversation_id: key.into(),
        ..Default::default()
    };
    begin(c, req).await.unwrap().conversation.unwrap()
}

/// Posts a turn in a fresh conversation until its decision's rule is `rule` (events reach the
/// service asynchronously); returns that turn.
async fn turn_until_rule(
    c: &mut Client,
    key: &str,
    text: &str,
    rule: &str,
) -> (pb::PostCustomerMessageResponse, policy::Decision) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for n in 0.. {
        let conv = start_standard(c, &format!("{key}-{n}")).await;
        let r = say(c, &conv.id, "m1", text).await;
        let decision = decision_of(c, &r).await;
        if decision.rule_id == rule {
            return (r, decision);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rule {rule} never fired: {decision:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unreachable!()
}

/// The queue's ETA and business hours, as routing reports them, reach the bot's policy
/// decisions: a long queue turns a non-urgent handoff into an offer to leave a message, a closed
/// queue turns every handoff into one, and the conversation stays with the bot.
async fn queue_reports_let_the_policy_offer_to_leave_a_message(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    train(&rig, "acme").await;
    rig.apply_policy(
        "acme",
        policy::Scenario {
            id: "refunds".into(),
            intents: vec!["refund".into()],
            tier: policy::Tier::Complex as i32,
            strategy: policy::Strategy::HumanFirst as i32,
            version: 2,
            thresholds: Some(policy::Thresholds {
                max_queue_wait: Some(prost_types::Duration {
                    seconds: 120,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            routing: Some(policy::RoutingTarget {
                queue_id: "refunds-queue".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    // No report yet: the human-first scenario hands off.
    let (r, _) = turn_until_rule(&mut c, "q1", "我要退款", "human_first").await;
    assert_eq!(r.bot_turn.unwrap().action, pb::BotAction::Handoff as i32);
    // Another queue's long wait changes nothing; this scenario's queue waits 15 minutes.
    rig.publish("acme", &queue_report("other", 3_600, true))
        .await;
    rig.publish("acme", &queue_report("refunds-queue", 900, true))
        .await;
    let (r, decision) = turn_until_rule(&mut c, "q2", "我要退款", "max_queue_wait").await;
    assert_eq!(decision.action, policy::DecisionAction::LeaveMessage as i32);
    assert_eq!(
        decision.handoff_reason,
        common::HandoffReason::PolicyHumanFirst as i32
    );
    assert_eq!(r.state, pb::ConversationState::Bot as i32);
    let bt = r.bot_turn.unwrap();
    assert_ne!(bt.action, pb::BotAction::Handoff as i32);
    assert!(bt.handoff.is_none());
    // An explicit request is urgent: it still reaches the queue despite the wait. It goes to
    // the default queue, which takes handoffs of scenarios routed nowhere.
    let default_queue = |eta_seconds, open| routing::QueueStatsReported {
        default_queue: true,
        ..queue_report("default", eta_seconds, open)
    };
    rig.publish("acme", &default_queue(3_600, true)).await;
    let conv = start_standard(&mut c, "q3").await;
    let r = say(&mut c, &conv.id, "m1", "转人工").await;
    assert_eq!(r.bot_turn.unwrap().action, pb::BotAction::Handoff as i32);
    // The queue closes: even an explicit request is offered to leave a message.
    rig.publish("acme", &default_queue(30, false)).await;
    let (r, decision) = turn_until_rule(&mut c, "q4", "转人工", "outside_business_hours").await;
    assert_eq!(decision.action, policy::DecisionAction::LeaveMessage as i32);
    assert_eq!(r.state, pb::ConversationState::Bot as i32);
    rig.stop().await;
}

async fn bad_input_is_refused_and_nothing_written(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let conv = start(&mut c, "k5", common::Language::En).await;
    for (text, id) in [
        (String::new(), "e1"),
        ("   ".to_owned(), "e2"),
        ("a".repeat(4_001), "e3"),
        ("bell\u{7}".to_owned(), "e4"),
    ] {
        let err = try_say(&mut c, &conv.id, id, &text).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    let err = try_say(&mut c, &conv.id, "", "hi").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = try_say(&mut c, "nope", "x", "hi").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Another tenant does not see the conversation.
    let mut other = rig.client("globex", "ch-9", &[Role::Channel]).await;
    let err = other
        .get_conversation(pb::GetConversationRequest {
            conversation_id: conv.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // An agent message while the bot owns the conversation.
    let mut agent = rig.client("acme", "a-1", &[Role::Agent]).await;
    let err = agent_says(&mut agent, &conv.id, "a", "hello")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // A channel token cannot post as an agent; an agent cannot train models.
    let err = agent_says(&mut c, &conv.id, "a", "hello")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Training without examples of two intents.
    let mut m = rig.models("acme").await;
    let err = m
        .train_model(pb::TrainModelRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let up = m
        .upload_examples(pb::UploadExamplesRequest {
            format: pb::ExampleFormat::Json as i32,
            raw: r#"[{"text":"hi","intent":"greet"},{"text":"","intent":"x"}]"#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((up.accepted, up.errors.len()), (1, 1));
    assert_eq!(up.errors[0].row_number, 2);
    // Nothing was written by the refused requests.
    assert!(messages(&mut c, &conv.id).await.is_empty());
    let got = conversation(&mut c, &conv.id).await;
    assert_eq!(got.message_count, 0);

    // Enum values this version does not know are refused at the start, naming the field, and
    // no conversation is created under the key.
    let refused = |err: tonic::Status, field: &str| {
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message()
                .starts_with(&format!("invalid argument: {field} ")),
            "{field}: {err:?}"
        );
    };
    let customer = |tier: i32, language: i32, channel: i32| common::Customer {
        id: "cust-enum".into(),
        tier,
        language,
        channel,
        ..Default::default()
    };
    for (who, channel, field) in [
        (customer(7, 0, 0), 0, "customer.tier"),
        (customer(0, 9, 0), 0, "customer.language"),
        (customer(0, 0, 42), 0, "customer.channel"),
        (customer(0, 0, 0), 42, "channel"),
    ] {
        let req = pb::StartConversationRequest {
            customer: Some(who),
            channel,
            client_conversation_id: "k5-enum".into(),
            ..Default::default()
        };
        refused(begin(&mut c, req).await.unwrap_err(), field);
    }
    let fresh = start_for(&mut c, "cust-enum", "k5-enum").await;
    assert!(fresh.created);

    // Control characters are refused in the customer's name and the scenario hint, naming the
    // field, and no conversation is created under the key.
    for (name, hint, field) in [
        ("bell\u{7}", "", "customer.display_name"),
        ("王\n小明", "", "customer.display_name"),
        ("王小明", "orders\u{0}", "scenario_hint"),
        ("王小明", "orders\t", "scenario_hint"),
    ] {
        let req = pb::StartConversationRequest {
            customer: Some(common::Customer {
                id: "cust-ctl".into(),
                display_name: name.into(),
                ..Default::default()
            }),
            scenario_hint: hint.into(),
            client_conversation_id: "k5-ctl".into(),
            ..Default::default()
        };
        refused(begin(&mut c, req).await.unwrap_err(), field);
    }
    assert!(start_for(&mut c, "cust-ctl", "k5-ctl").await.created);

    // Attachments: a media type that is not `type/subtype`, or a control character in the file
    // name, is refused and nothing is posted; a good one is accepted.
    let attachment = |name: &str, media_type: &str| pb::Attachment {
        file_name: name.into(),
        media_type: media_type.into(),
        size_bytes: 10,
        url: "https://files.example/a".into(),
    };
    let target = start_for(&mut c, "cust-att", "k5-att")
        .await
        .conversation
        .unwrap();
    let with_photo = |a: pb::Attachment| pb::PostCustomerMessageRequest {
        conversation_id: target.id.clone(),
        client_message_id: "att".into(),
        text: "see the photo".into(),
        attachments: vec![a],
    };
    for (a, field) in [
        (attachment("a.png", ""), "attachments[0].media_type"),
        (attachment("a.png", "png"), "attachments[0].media_type"),
        (attachment("a.png", "image/"), "attachments[0].media_type"),
        (
            attachment("a.png", "image/png\r"),
            "attachments[0].media_type",
        ),
        (
            attachment("a.png", "image png/x"),
            "attachments[0].media_type",
        ),
        (
            attachment("a\u{1b}.png", "image/png"),
            "attachments[0].file_name",
        ),
    ] {
        let err = c.post_customer_message(with_photo(a)).await.unwrap_err();
        refused(err, field);
    }
    assert_eq!(conversation(&mut c, &target.id).await.message_count, 0);
    let ok = c
        .post_customer_message(with_photo(attachment("a.png", "image/png")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.message.unwrap().attachments[0].media_type, "image/png");

    // A close note, a cancel reason and a review reason with control characters are refused,
    // naming the field, and change nothing.
    let queued = start_for(&mut c, "cust-q", "k5-q")
        .await
        .conversation
        .unwrap();
    let r = say(&mut c, &queued.id, "m1", "转人工").await;
    assert_eq!(r.state, pb::ConversationState::Queued as i32, "{r:?}");
    let left = pb::CloseReason::CustomerLeft;
    let err = close_with(&mut c, &queued.id, left, "left\u{8}")
        .await
        .unwrap_err();
    refused(err, "note");
    let err = c
        .cancel_handoff(pb::CancelHandoffRequest {
            conversation_id: queued.id.clone(),
            handoff_id: String::new(),
            reason: "never mind\u{7f}".into(),
        })
        .await
        .unwrap_err();
    refused(err, "reason");
    assert_eq!(
        conversation(&mut c, &queued.id).await.state,
        pb::ConversationState::Queued as i32
    );
    let err = agent
        .review_suggestion(rejection("s-1", "wrong\u{0}"))
        .await
        .unwrap_err();
    refused(err, "reason");
    // Line breaks and tabs are fine in a note.
    let closed = close_with(&mut c, &queued.id, left, "left:\n\tno answer")
        .await
        .unwrap();
    assert_eq!(closed.state, pb::ConversationState::Closed as i32);

    // Page tokens near the top of the range are refused, not overflowed.
    let huge = common::PageRequest {
        page_size: 100,
        page_token: (i64::MAX - 50).to_string(),
    };
    let err = traces_page(&mut c, &conv.id, Some(huge.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = m
        .list_model_versions(pb::ListModelVersionsRequest {
            page: Some(huge.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // The largest token that fits reads an empty page.
    let fits = common::PageRequest {
        page_size: 100,
        page_token: (i64::MAX - 101).to_string(),
    };
    let last = traces_page(&mut c, &conv.id, Some(fits)).await.unwrap();
    assert!(last.traces.is_empty());
    rig.stop().await;
}

async fn start_for(c: &mut Client, customer: &str, key: &str) -> pb::StartConversationResponse {
    let req = pb::StartConversationRequest {
        customer: Some(common::Customer {
            id: customer.into(),
            ..Default::default()
        }),
        client_conversation_id: key.into(),
        ..Default::default()
    };
    begin(c, req).await.unwrap()
}

async fn trace_of(c: &mut Client, r: &pb::PostCustomerMessageResponse) -> pb::DecisionTrace {
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

fn factor(t: &pb::DecisionTrace, name: &str) -> f64 {
    t.complexity
        .as_ref()
        .unwrap()
        .factors
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no factor {name} in {:?}", t.complexity))
        .value
}

async fn repeat_contacts_count_the_customers_recent_conversations(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let counted =
        |r: &pb::StartConversationResponse| r.conversation.as_ref().unwrap().repeat_contacts;
    // Each new conversation of the customer counts the earlier ones within the window.
    let first = start_for(&mut c, "cust-r", "r1").await;
    let second = start_for(&mut c, "cust-r", "r2").await;
    let third = start_for(&mut c, "cust-r", "r3").await;
    assert_eq!(
        [counted(&first), counted(&second), counted(&third)],
        [0, 1, 2]
    );
    // Another customer, and another tenant with the same customer id, count only their own.
    assert_eq!(counted(&start_for(&mut c, "cust-s", "s1").await), 0);
    let mut other = rig.client("globex", "ch-1", &[Role::Channel]).await;
    assert_eq!(counted(&start_for(&mut other, "cust-r", "r1").await), 0);
    // The count is kept on the conversation: a retried start returns it unchanged.
    let again = start_for(&mut c, "cust-r", "r2").await;
    assert!(!again.created);
    assert_eq!(counted(&again), 1);
    let stored = conversation(&mut c, &third.conversation.as_ref().unwrap().id).await;
    assert_eq!(stored.repeat_contacts, 2);

    // Every turn of the conversation feeds it to the complexity score.
    let third_id = third.conversation.as_ref().unwrap().id.clone();
    let first_id = first.conversation.as_ref().unwrap().id.clone();
    for n in 1..=2 {
        let r = say(&mut c, &third_id, &format!("m{n}"), "where is my parcel").await;
        let t = trace_of(&mut c, &r).await;
        assert!(
            (factor(&t, "repeat_contact") - 2.0 / 3.0).abs() < 1e-6,
            "{t:?}"
        );
    }
    let r = say(&mut c, &first_id, "m1", "where is my parcel").await;
    assert_eq!(factor(&trace_of(&mut c, &r).await, "repeat_contact"), 0.0);

    // Conversations older than the window no longer count.
    tokio::time::sleep(REPEAT_WINDOW + Duration::from_millis(200)).await;
    assert_eq!(counted(&start_for(&mut c, "cust-r", "r4").await), 0);
    rig.stop().await;
}

async fn the_sentiment_trend_starts_again_after_a_reopen(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    train(&rig, "acme").await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    const HAPPY: &str = "Thanks, that is great, you are very helpful!";
    // Mildly negative (about -0.3): no negative-sentiment handoff on its own, but more than the
    // swing threshold (0.8) below the happy turn.
    const UNHAPPY: &str = "hmm, the parcel is late again";

    // Without a resolution in between, the drop from the happy turn is a swing: handoff.
    let control = start(&mut c, "k-swing", common::Language::En).await;
    say(&mut c, &control.id, "m1", HAPPY).await;
    let swing = say(&mut c, &control.id, "m2", UNHAPPY).await;
    assert_eq!(action(&swing), pb::BotAction::Handoff, "{swing:?}");
    let trigger = swing.bot_turn.unwrap().handoff.unwrap().trigger.unwrap();
    assert_eq!(
        trigger.reason,
        common::HandoffReason::EmotionSwing as i32,
        "{trigger:?}"
    );

    // The same turns with a resolution in between: the reopened conversation starts afresh.
    let conv = start(&mut c, "k-reopen", common::Language::En).await;
    let happy = say(&mut c, &conv.id, "m1", HAPPY).await;
    assert_ne!(action(&happy), pb::BotAction::Handoff, "{happy:?}");
    resolve(&mut c, &conv.id).await;
    let reopened = say(&mut c, &conv.id, "m2", UNHAPPY).await;
    assert_ne!(action(&reopened), pb::BotAction::Handoff, "{reopened:?}");
    assert_eq!(reopened.state, pb::ConversationState::Bot as i32);
    let first_after = trace_of(&mut c, &reopened).await;
    assert_eq!(first_after.turn_index, 1);
    assert_eq!(first_after.sentiment_trend, 0.0, "{first_after:?}");
    let got = conversation(&mut c, &conv.id).await;
    assert_eq!((got.reopen_count, got.reopened_at_turn), (1, 1));

    // The next turn's trend is over the turns since the reopen only: two points, so the slope is
    // their difference.
    let next = say(&mut c, &conv.id, "m3", HAPPY).await;
    let second_after = trace_of(&mut c, &next).await;
    let score = |t: &pb::DecisionTrace| t.sentiment.as_ref().unwrap().score;
    let expected = score(&second_after) - score(&first_after);
    assert!(
        (second_after.sentiment_trend - expected).abs() < 1e-4,
        "slope {} expected {expected}",
        second_after.sentiment_trend
    );
    rig.stop().await;
}

/// A turn reads only the conversation's last turns; numbering, reopening and the trace list
/// still cover the whole conversation, and the bot-turn limit counts from the last reopen.
async fn a_long_conversation_keeps_numbering_its_turns(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    train(&rig, "acme").await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let conv = start(&mut c, "k-long", common::Language::Zh).await;
    // Four matters of 15 turns each, 60 in all: more than a turn reads back, and more in all
    // than the default policy's 20 bot turns before a handoff, but fewer within each matter.
    const ROUNDS: i32 = 4;
    const PER_ROUND: i32 = 15;
    for round in 0..ROUNDS {
        for i in 0..PER_ROUND {
            let turn = round * PER_ROUND + i;
            let r = say(&mut c, &conv.id, &format!("m{turn}"), "快递到哪里了").await;
            assert_eq!(action(&r), pb::BotAction::Answer, "turn {turn}: {r:?}");
            assert_eq!(trace_of(&mut c, &r).await.turn_index, turn);
        }
        resolve(&mut c, &conv.id).await;
    }
    let got = conversation(&mut c, &conv.id).await;
    assert_eq!(
        (got.reopen_count, got.reopened_at_turn),
        (ROUNDS - 1, (ROUNDS - 1) * PER_ROUND)
    );

    let mut indices = Vec::new();
    let mut token = String::new();
    loop {
        let request = common::PageRequest {
            page_size: 25,
            page_token: token.clone(),
        };
        let page = traces_page(&mut c, &conv.id, Some(request)).await.unwrap();
        indices.extend(page.traces.iter().map(|t| t.turn_index));
        token = page.page.map(|p| p.next_page_token).unwrap_or_default();
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(indices, (0..ROUNDS * PER_ROUND).collect::<Vec<_>>());
    rig.stop().await;
}

/// Hands a new conversation off to a human and has routing assign `agent`; returns the
/// conversation and its handoff id.
async fn assigned_to(
    rig: &Rig,
    c: &mut Client,
    key: &str,
    agent: &str,
) -> (pb::Conversation, String) {
    let conv = start(c, key, common::Language::Zh).await;
    let r = say(c, &conv.id, "h1", "转人工").await;
    assert_eq!(action(&r), pb::BotAction::Handoff, "{r:?}");
    let handoff_id = r.bot_turn.unwrap().handoff.unwrap().handoff_id;
    rig.assign(&handoff_id, &conv.id, agent).await;
    let owned = wait_state(c, &conv.id, pb::ConversationState::Agent).await;
    assert_eq!(owned.assigned_agent_id, agent);
    (owned, handoff_id)
}

/// Waits until the conversation is in `state` with `agent` assigned.
async fn wait_owner(c: &mut Client, id: &str, state: pb::ConversationState, agent: &str) {
    wait_until(c, id, |conv| {
        conv.state == state as i32 && conv.assigned_agent_id == agent
    })
    .await;
}

/// The text of the agents' messages in the transfer test.
const AGENT_TEXT: &str = "hello from the agent";

async fn post_as(agent: &mut Client, conv: &str, id: &str) -> Result<pb::Message, tonic::Status> {
    agent_says(agent, conv, id, AGENT_TEXT)
        .await
        .map(|r| r.message.unwrap())
}

async fn agent_view(
    agent: &mut Client,
    conv: &str,
) -> Result<tonic::Streaming<pb::WatchConversationResponse>, tonic::Status> {
    watch_as(agent, conv, pb::ConversationView::Agent).await
}

/// Routing's transfers move the conversation: a warm one (the old assignment ends as
/// TRANSFERRED and the target's `HandoffAssigned` follows) hands it to the new agent at once, a
/// cold one puts it back in the queue until the next agent is assigned.
async fn a_transfer_hands_the_conversation_to_the_new_agent(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let (conv, handoff_id) = assigned_to(&rig, &mut c, "k-transfer", "a-1").await;
    let mut a1 = rig.client("acme", "a-1", &[Role::Agent]).await;
    let mut a2 = rig.client("acme", "a-2", &[Role::Agent]).await;
    let mut a3 = rig.client("acme", "a-3", &[Role::Agent]).await;
    let first = post_as(&mut a1, &conv.id, "a1-1").await.unwrap();
    // Only the assigned agent gets a recorded message back, as a duplicate: another agent
    // reusing its id is refused before the look-up.
    let err = post_as(&mut a2, &conv.id, "a1-1").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let again = agent_says(&mut a1, &conv.id, "a1-1", AGENT_TEXT)
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message.unwrap().id, first.id);
    let mut watch = watch(&mut c, &conv.id).await;
    let mut old_view = agent_view(&mut a1, &conv.id).await.unwrap();

    // Warm transfer to a-2, as routing reports it.
    let transferred = |agent: &str| {
        completed(
            &handoff_id,
            &conv.id,
            agent,
            routing::Disposition::Transferred,
        )
    };
    rig.publish("acme", &transferred("a-1")).await;
    rig.assign(&handoff_id, &conv.id, "a-2").await;
    wait_owner(&mut c, &conv.id, pb::ConversationState::Agent, "a-2").await;
    // Watchers learn of the new owner.
    let change = next_state_change(&mut watch).await;
    assert_eq!(change.assigned_agent_id, "a-2");
    assert_eq!(change.to_state, pb::ConversationState::Agent as i32);
    // The old agent's open agent view ends after telling of the change.
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(5), old_view.message())
            .await
            .unwrap()
        {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the old agent's view ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    // The old agent may no longer write nor take the agent view; the new one may.
    let err = post_as(&mut a1, &conv.id, "a1-2").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = agent_view(&mut a1, &conv.id).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The new agent reusing the old agent's id does not get the old agent's message.
    let err = post_as(&mut a2, &conv.id, "a1-1").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let posted = post_as(&mut a2, &conv.id, "a2-1").await.unwrap();
    assert_eq!(posted.sender_id, "a-2");
    agent_view(&mut a2, &conv.id).await.unwrap();

    // Cold transfer from a-2: back in the queue with nobody assigned, then a-3 takes it.
    rig.publish("acme", &transferred("a-2")).await;
    rig.publish(
        "acme",
        &routing::HandoffTransferred {
            handoff_id: handoff_id.clone(),
            conversation_id: conv.id.clone(),
            kind: routing::TransferKind::Cold as i32,
            from_agent_id: "a-2".into(),
            target: Some(routing::TransferTarget {
                target: Some(routing::transfer_target::Target::QueueId("general".into())),
            }),
            ..Default::default()
        },
    )
    .await;
    wait_owner(&mut c, &conv.id, pb::ConversationState::Queued, "").await;
    let err = post_as(&mut a2, &conv.id, "a2-2").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // The customer waits for the next agent: the bot stays silent.
    let waiting = say(&mut c, &conv.id, "h2", "还在吗").await;
    assert!(waiting.bot_turn.is_none());
    rig.assign(&handoff_id, &conv.id, "a-3").await;
    wait_owner(&mut c, &conv.id, pb::ConversationState::Agent, "a-3").await;
    let err = post_as(&mut a2, &conv.id, "a2-3").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    post_as(&mut a3, &conv.id, "a3-1").await.unwrap();
    drop(watch);
    rig.stop().await;
}

/// Concurrent reviews of one suggestion: one wins, the others are refused, and one
/// `SuggestionReviewed` is published. Empty ids are refused as bad input.
async fn a_suggestion_is_reviewed_once(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut events = rig.dialog_events("test-review-once").await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let (conv, _) = assigned_to(&rig, &mut c, "k-review", "a-1").await;
    let mut suggest = async |id: &str| {
        let turn = say(&mut c, &conv.id, id, "where is my parcel").await;
        assert_eq!(action(&turn), pb::BotAction::Suggest, "{turn:?}");
        turn.bot_turn.unwrap().suggestion.unwrap()
    };
    let s1 = suggest("s1").await;
    let s2 = suggest("s2").await;
    let review = |id: &str| rejection(id, "not for this customer");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut agent = rig.client("acme", "a-1", &[Role::Agent]).await;
        let req = review(&s1.id);
        tasks.push(tokio::spawn(
            async move { agent.review_suggestion(req).await },
        ));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(e) => assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}"),
        }
    }
    assert_eq!(won, 1);
    // A later review is the marker: every event of the race comes before it.
    let mut agent = rig.client("acme", "a-1", &[Role::Agent]).await;
    agent.review_suggestion(review(&s2.id)).await.unwrap();
    let mut reviews_of_s1 = 0;
    loop {
        let e: pb::SuggestionReviewed = next_event(&mut events).await;
        let id = e.suggestion.unwrap().id;
        if id == s2.id {
            break;
        }
        assert_eq!(id, s1.id);
        reviews_of_s1 += 1;
    }
    assert_eq!(reviews_of_s1, 1);

    let err = agent.review_suggestion(review("")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = rig
        .models("acme")
        .await
        .get_model_version(pb::GetModelVersionRequest {
            model_version_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    rig.stop().await;
}

async fn close_as(c: &mut Client, conv: &str) -> Result<pb::Conversation, tonic::Status> {
    close_with(c, conv, pb::CloseReason::Resolved, "").await
}

async fn type_as(c: &mut Client, conv: &str) -> Result<(), tonic::Status> {
    c.set_typing(pb::SetTypingRequest {
        conversation_id: conv.into(),
        typing: true,
    })
    .await
    .map(drop)
}

/// The next typing update a watcher gets.
async fn next_typing(w: &mut tonic::Streaming<pb::WatchConversationResponse>) -> pb::Typing {
    next_picked(w, |u| match u {
        pb::conversation_update::Update::Typing(t) => Some(t),
        _ => None,
    })
    .await
}

/// Closing and typing as the agent are for the agent assigned to the conversation; the
/// customer's side types as the customer, and supervisors may close but type only when assigned.
async fn only_the_assigned_agent_closes_or_types_as_the_agent(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let (conv, _) = assigned_to(&rig, &mut c, "k-close", "a-1").await;
    let mut a1 = rig.client("acme", "a-1", &[Role::Agent]).await;
    let mut a2 = rig.client("acme", "a-2", &[Role::Agent]).await;
    let mut sup = rig.client("acme", "sup-1", &[Role::Supervisor]).await;
    let mut watch = watch(&mut c, &conv.id).await;

    // Another agent neither types nor closes; a supervisor not assigned does not type.
    let err = type_as(&mut a2, &conv.id).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = type_as(&mut sup, &conv.id).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = close_as(&mut a2, &conv.id).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        conversation(&mut c, &conv.id).await.state,
        pb::ConversationState::Agent as i32
    );

    // The assigned agent types as the agent, the channel as the customer.
    type_as(&mut a1, &conv.id).await.unwrap();
    let typing = next_typing(&mut watch).await;
    assert_eq!(
        (typing.sender_kind, typing.sender_id.as_str()),
        (pb::SenderKind::Agent as i32, "a-1")
    );
    type_as(&mut c, &conv.id).await.unwrap();
    let typing = next_typing(&mut watch).await;
    assert_eq!(typing.sender_kind, pb::SenderKind::Customer as i32);

    // The assigned agent closes it.
    let closed = close_as(&mut a1, &conv.id).await.unwrap();
    assert_eq!(closed.state, pb::ConversationState::Closed as i32);
    drop(watch);

    // An agent may not close a conversation the bot holds; a supervisor may.
    let bot = start(&mut c, "k-close-bot", common::Language::En).await;
    let err = close_as(&mut a2, &bot.id).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let closed = close_as(&mut sup, &bot.id).await.unwrap();
    assert_eq!(closed.state, pb::ConversationState::Closed as i32);
    rig.stop().await;
}

/// The agent holding a conversation resolves it (not the channel); a retry of the agent's last
/// message is still answered as a retry; once the customer writes again, the agent who resolved
/// it no longer acts as its agent; a closed conversation takes no typing.
async fn a_resolved_agent_lets_go_of_the_conversation(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let (conv, handoff_id) = assigned_to(&rig, &mut c, "k-res", "a-1").await;
    let mut a1 = rig.client("acme", "a-1", &[Role::Agent]).await;
    let sent = post_as(&mut a1, &conv.id, "am1").await.unwrap();
    // The channel does not resolve what an agent holds.
    let err = c
        .resolve_conversation(pb::ResolveConversationRequest {
            conversation_id: conv.id.clone(),
            note: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Routing reports the agent's resolution.
    rig.publish(
        "acme",
        &routing::AssignmentCompleted {
            handoff_id,
            conversation_id: conv.id.clone(),
            agent_id: "a-1".into(),
            disposition: routing::Disposition::Resolved as i32,
            ..Default::default()
        },
    )
    .await;
    wait_state(&mut c, &conv.id, pb::ConversationState::Resolved).await;
    // The agent's desk retries its last message: the same message, as a retry.
    let again = agent_says(&mut a1, &conv.id, "am1", AGENT_TEXT)
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message.unwrap().id, sent.id);
    // A new message reopens it for the bot: the former agent's rights end with the matter.
    say(&mut c, &conv.id, "m-again", "你好").await;
    let reopened = conversation(&mut c, &conv.id).await;
    assert_eq!(reopened.state, pb::ConversationState::Bot as i32);
    assert_eq!(reopened.assigned_agent_id, "");
    let err = type_as(&mut a1, &conv.id).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = close_as(&mut a1, &conv.id).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = agent_view(&mut a1, &conv.id).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Closed: no typing on either side.
    close_as(&mut c, &conv.id).await.unwrap();
    let err = type_as(&mut c, &conv.id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    rig.stop().await;
}

/// A start checks the customer's attributes as the contract bounds them, and a
/// `client_conversation_id` of another customer's conversation is refused, not answered with
/// that conversation.
async fn starts_check_the_customer(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let with_attributes = |key: &str, attributes: &[(&str, String)]| pb::StartConversationRequest {
        customer: Some(common::Customer {
            id: "cust-a".into(),
            attributes: attributes
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            ..Default::default()
        }),
        client_conversation_id: key.into(),
        ..Default::default()
    };
    for attributes in [
        vec![("member_since", "x".repeat(1_001))],
        vec![("bad\u{0}key", "1".to_owned())],
        vec![("", "1".to_owned())],
        vec![(&*"k".repeat(65), "1".to_owned())],
        vec![("note", "bell\u{7}".to_owned())],
    ] {
        let err = begin(&mut c, with_attributes("k-attr", &attributes))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{attributes:?}: {err:?}");
    }
    let first = begin(
        &mut c,
        with_attributes("k-attr", &[("member_since", "2019".to_owned())]),
    )
    .await
    .unwrap();
    assert!(first.created);
    // The same customer again: the same conversation.
    let again = begin(&mut c, with_attributes("k-attr", &[])).await.unwrap();
    assert!(!again.created);
    assert_eq!(
        again.conversation.unwrap().id,
        first.conversation.unwrap().id
    );
    // Another customer with the same key: refused.
    let err = begin(
        &mut c,
        pb::StartConversationRequest {
            customer: Some(common::Customer {
                id: "cust-b".into(),
                ..Default::default()
            }),
            client_conversation_id: "k-attr".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    rig.stop().await;
}

/// Starts a conversation with a scenario hint.
async fn start_hinted(c: &mut Client, key: &str, hint: &str) -> pb::Conversation {
    let req = pb::StartConversationRequest {
        customer: Some(common::Customer {
            id: format!("cust-{key}"),
            language: common::Language::Zh as i32,
            ..Default::default()
        }),
        scenario_hint: hint.into(),
        client_conversation_id: key.into(),
        ..Default::default()
    };
    begin(c, req).await.unwrap().conversation.unwrap()
}

/// The policy's decision of a turn.
async fn decision_of(c: &mut Client, r: &pb::PostCustomerMessageResponse) -> policy::Decision {
    trace_of(c, r).await.policy_decision.unwrap()
}

/// Words the trained model does not know: the turn goes to the fallback scenario.
const GIBBERISH: &str = "xyzzy plugh frobnicate";

/// A conversation keeps only a scenario the policy resolved from a recognised intent: a turn
/// decided by the fallback scenario, or a hint naming no scenario of the tenant, leaves it unset,
/// so a later turn still goes to the scenario claiming its intent.
async fn a_fallback_turn_leaves_the_scenario_unset(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    train(&rig, "acme").await;
    // The tenant has its own default scenario (the fallback) and one claiming refunds.
    for (id, intents, version) in [
        ("default", vec![], 5),
        ("refunds", vec!["refund".into()], 3),
    ] {
        rig.apply_policy(
            "acme",
            policy::Scenario {
                id: id.into(),
                intents,
                tier: policy::Tier::Standard as i32,
                strategy: policy::Strategy::BotFirst as i32,
                version,
                ..Default::default()
            },
        )
        .await;
    }
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    // Wait until both scenarios decide turns.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for n in 0.. {
        let probe = start(&mut c, &format!("k-probe-{n}"), common::Language::Zh).await;
        let fallback = say(&mut c, &probe.id, "m1", GIBBERISH).await;
        let probe = start(&mut c, &format!("k-probe-r{n}"), common::Language::Zh).await;
        let refund = say(&mut c, &probe.id, "m1", "我要退款").await;
        let (f, r) = (
            decision_of(&mut c, &fallback).await,
            decision_of(&mut c, &refund).await,
        );
        if (f.scenario_id.as_str(), f.policy_version) == ("default", 5)
            && (r.scenario_id.as_str(), r.policy_version) == ("refunds", 3)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "policies never applied: {f:?} {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A turn decided by the fallback leaves the conversation without a scenario.
    let conv = start(&mut c, "k-scenario", common::Language::Zh).await;
    let first = say(&mut c, &conv.id, "m1", GIBBERISH).await;
    assert_eq!(decision_of(&mut c, &first).await.scenario_id, "default");
    assert_eq!(trace_of(&mut c, &first).await.scenario_id, "");
    assert_eq!(conversation(&mut c, &conv.id).await.scenario_id, "");
    // The next turn with a recognised intent goes to the scenario claiming it, which the
    // conversation then keeps.
    let second = say(&mut c, &conv.id, "m2", "我要退款").await;
    assert_eq!(action(&second), pb::BotAction::Answer, "{second:?}");
    assert_eq!(decision_of(&mut c, &second).await.scenario_id, "refunds");
    assert_eq!(conversation(&mut c, &conv.id).await.scenario_id, "refunds");
    let third = say(&mut c, &conv.id, "m3", GIBBERISH).await;
    assert_eq!(decision_of(&mut c, &third).await.scenario_id, "refunds");

    // A hint naming no scenario of the tenant is not kept; a known one is.
    let unknown = start_hinted(&mut c, "k-hint-unknown", "no-such-scenario").await;
    assert_eq!(unknown.scenario_id, "");
    let r = say(&mut c, &unknown.id, "m1", "我要退款").await;
    assert_eq!(decision_of(&mut c, &r).await.scenario_id, "refunds");
    assert_eq!(
        conversation(&mut c, &unknown.id).await.scenario_id,
        "refunds"
    );
    let known = start_hinted(&mut c, "k-hint-known", "refunds").await;
    assert_eq!(known.scenario_id, "refunds");
    rig.stop().await;
}

/// The idle time after which the sweep closes a conversation, in the sweep test.
const IDLE: Duration = Duration::from_secs(1);

fn idle_settings() -> Settings {
    Settings {
        idle_close_after: IDLE,
        ..Settings::default()
    }
}

both_with!(
    idle_sweep,
    idle_settings,
    idle_conversations_with_the_bot_are_closed
);

/// The idle sweep closes BOT conversations for inactivity and RESOLVED ones as resolved, like
/// `CloseConversation` (event, watchers); a conversation kept active, or waiting for a human,
/// stays open.
async fn idle_conversations_with_the_bot_are_closed(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut closed_events = rig.events_of::<pb::ConversationClosed>("test-closed").await;
    // A model, so the active conversation's questions are answered rather than handed off after
    // a few fallbacks.
    train(&rig, "acme").await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;
    let idle = start(&mut c, "k-idle", common::Language::Zh).await;
    say(&mut c, &idle.id, "m1", "你好").await;
    let mut watch = watch(&mut c, &idle.id).await;
    let resolved = start(&mut c, "k-resolved", common::Language::Zh).await;
    resolve(&mut c, &resolved.id).await;
    let queued = start(&mut c, "k-queued", common::Language::Zh).await;
    let r = say(&mut c, &queued.id, "m1", "转人工").await;
    assert_eq!(r.state, pb::ConversationState::Queued as i32, "{r:?}");
    let active = start(&mut c, "k-active", common::Language::Zh).await;

    // The active conversation gets a message every 200 ms until the idle one is closed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        n += 1;
        let r = say(&mut c, &active.id, &format!("a{n}"), "快递到哪里了").await;
        assert_eq!(action(&r), pb::BotAction::Answer, "{r:?}");
        if conversation(&mut c, &idle.id).await.state == pb::ConversationState::Closed as i32 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never swept");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = conversation(&mut c, &idle.id).await;
    assert_eq!(got.close_reason, pb::CloseReason::Abandoned as i32);
    assert!(got.closed_at.is_some());
    assert_eq!(
        conversation(&mut c, &active.id).await.state,
        pb::ConversationState::Bot as i32
    );
    let got = wait_state(&mut c, &resolved.id, pb::ConversationState::Closed).await;
    assert_eq!(got.close_reason, pb::CloseReason::Resolved as i32);

    // The watcher saw the state change.
    let s = next_state_change(&mut watch).await;
    assert_eq!(s.from_state, pb::ConversationState::Bot as i32);
    assert_eq!(s.to_state, pb::ConversationState::Closed as i32);
    assert_eq!(s.reason, "closed for inactivity");
    drop(watch);
    // One event per closed conversation.
    let mut events = Vec::new();
    for _ in 0..2 {
        let e: pb::ConversationClosed = next_event(&mut closed_events).await;
        events.push((e.conversation_id, e.reason, e.final_state));
    }
    events.sort();
    let mut want = vec![
        (
            idle.id.clone(),
            pb::CloseReason::Abandoned as i32,
            pb::ConversationState::Bot as i32,
        ),
        (
            resolved.id.clone(),
            pb::CloseReason::Resolved as i32,
            pb::ConversationState::Resolved as i32,
        ),
    ];
    want.sort();
    assert_eq!(events, want);

    // The conversation waiting for a human stays, however long it waits; a closed one takes no
    // more messages.
    tokio::time::sleep(IDLE + Duration::from_millis(500)).await;
    assert_eq!(
        conversation(&mut c, &queued.id).await.state,
        pb::ConversationState::Queued as i32
    );
    let err = try_say(&mut c, &idle.id, "m2", "还在吗").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    rig.stop().await;
}

/// `ConversationResolved` names the resolving agent's team as routing reports it, and a confused
/// customer's turn carries the confusion emotion.
async fn resolutions_report_the_team_and_confusion_is_an_emotion(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut resolved = rig
        .events_of::<pb::ConversationResolved>("test-resolved")
        .await;
    train(&rig, "acme").await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;

    let conv = start(&mut c, "k-confused", common::Language::En).await;
    let r = say(&mut c, &conv.id, "m1", "I am confused, this makes no sense").await;
    let emotions: Vec<i32> = trace_of(&mut c, &r)
        .await
        .sentiment
        .unwrap()
        .emotions
        .iter()
        .map(|e| e.emotion)
        .collect();
    assert_eq!(emotions, [common::Emotion::Confusion as i32]);

    let (conv, handoff_id) = assigned_to(&rig, &mut c, "k-team", "a-1").await;
    let by_billing = routing::AssignmentCompleted {
        team: "billing".into(),
        ..completed(&handoff_id, &conv.id, "a-1", routing::Disposition::Resolved)
    };
    rig.publish("acme", &by_billing).await;
    let e: pb::ConversationResolved = next_event(&mut resolved).await;
    assert_eq!(e.conversation_id, conv.id);
    assert_eq!(e.resolved_by, common::HandlerKind::Agent as i32);
    assert_eq!((e.agent_id.as_str(), e.team.as_str()), ("a-1", "billing"));
    // No bot answer cited an article.
    assert!(e.articles_used.is_empty(), "{e:?}");
    rig.stop().await;
}

/// Checks for a second that the conversation stays as `ok` says: an event that must change
/// nothing has had time to be handled.
async fn stays(c: &mut Client, id: &str, ok: impl Fn(&pb::Conversation) -> bool) {
    for _ in 0..10 {
        let conv = conversation(c, id).await;
        assert!(ok(&conv), "{conv:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Routing's events of one handoff can reach dialog out of order (replicas share the durable
/// consumer, and a retried event comes back later). A resolution that arrives before its
/// assignment resolves the waiting conversation, and the late assignment changes nothing; a
/// cold transfer that arrives after the next agent's assignment changes nothing either.
async fn routing_events_out_of_order_leave_the_latest_state(rig: impl Future<Output = Rig>) {
    let rig = rig.await;
    let mut c = rig.client("acme", "ch-1", &[Role::Channel]).await;

    let conv = start(&mut c, "k-late-assignment", common::Language::Zh).await;
    let r = say(&mut c, &conv.id, "h1", "转人工").await;
    assert_eq!(action(&r), pb::BotAction::Handoff, "{r:?}");
    let handoff_id = r.bot_turn.unwrap().handoff.unwrap().handoff_id;
    let resolution = completed(&handoff_id, &conv.id, "a-1", routing::Disposition::Resolved);
    rig.publish("acme", &resolution).await;
    let resolved = wait_state(&mut c, &conv.id, pb::ConversationState::Resolved).await;
    assert_eq!(resolved.assigned_agent_id, "a-1");
    rig.assign(&handoff_id, &conv.id, "a-1").await;
    stays(&mut c, &conv.id, |conv| {
        conv.state == pb::ConversationState::Resolved as i32
    })
    .await;

    let (conv, handoff_id) = assigned_to(&rig, &mut c, "k-late-transfer", "a-1").await;
    let cold = |from: &str| routing::HandoffTransferred {
        handoff_id: handoff_id.clone(),
        conversation_id: conv.id.clone(),
        kind: routing::TransferKind::Cold as i32,
        from_agent_id: from.into(),
        ..Default::default()
    };
    // a-1 let go and a-2 took the conversation; a-2's assignment arrives first.
    rig.assign(&handoff_id, &conv.id, "a-2").await;
    wait_owner(&mut c, &conv.id, pb::ConversationState::Agent, "a-2").await;
    rig.publish("acme", &cold("a-1")).await;
    stays(&mut c, &conv.id, |conv| {
        conv.state == pb::ConversationState::Agent as i32 && conv.assigned_agent_id == "a-2"
    })
    .await;
    // A cold transfer by the agent who holds the conversation puts it back in the queue.
    rig.publish("acme", &cold("a-2")).await;
    wait_owner(&mut c, &conv.id, pb::ConversationState::Queued, "").await;
    rig.stop().await;
}
