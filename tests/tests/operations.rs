//! The operations themes end to end, on every service as its own process (PostgreSQL + NATS) and
//! on the standalone process:
//!
//! 4. an agent reads the bot's decision traces and rates a suggestion, and the trust index
//!    (suggestion acceptance) moves;
//! 5. negative feedback on a scenario raises an alert, an adjustment rule changes the scenario's
//!    policy, and the next conversation of that scenario is handled differently;
//! 6. a handoff to a closed queue gets the queue's out-of-hours behaviour, and a handoff nobody
//!    eligible can take overflows to another queue whose agent gets the offer.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use tandem_e2e::{Authed, Deployment, eventually, say, seed_tenant, start_conversation};
use tandem_platform::auth::Role;
use tandem_proto::pb::common::v1::{Channel as ChannelKind, SkillRequirement, TimeRange};
use tandem_proto::pb::dialog::v1::dialog_service_client::DialogServiceClient;
use tandem_proto::pb::dialog::v1::{
    BotAction, BotTurn, ConversationState, GetConversationRequest, GetDecisionTraceRequest,
    ListMessagesRequest, Message, SenderKind, get_decision_trace_request,
};
use tandem_proto::pb::feedback::v1::feedback_service_client::FeedbackServiceClient;
use tandem_proto::pb::feedback::v1::{
    AlertCondition, AlertKind, AlertRule, AlertStatus, Feedback, FeedbackSubject,
    GetMetricsRequest, Granularity, ListAlertsRequest, MetricName, MetricPoint, Severity,
    SubmitFeedbackRequest, UpsertAlertRuleRequest, feedback,
};
use tandem_proto::pb::policy::v1::policy_service_client::PolicyServiceClient;
use tandem_proto::pb::policy::v1::{
    AdjustmentRule, AdjustmentSignal, ChangeCause, Comparison, GetScenarioRequest,
    ListPolicyVersionsRequest, Mode, PolicyVersion, Strategy, UpsertAdjustmentRuleRequest,
    adjustment_rule,
};
use tandem_proto::pb::routing::v1::routing_service_client::RoutingServiceClient;
use tandem_proto::pb::routing::v1::{
    BusinessHours, GetTicketRequest, OutOfHoursBehaviour, OverflowAction, OverflowStep, Queue,
    Ticket, TicketState, UpsertQueueRequest, WeeklyWindow, get_ticket_request,
};

const STEP: Duration = Duration::from_secs(30);

type Dialog = DialogServiceClient<Authed>;

/// The rule and policy version that decided a bot turn, from its decision trace.
async fn decided_by(traces: &mut Dialog, turn: &BotTurn) -> (String, i64) {
    let trace = traces
        .get_decision_trace(GetDecisionTraceRequest {
            key: Some(get_decision_trace_request::Key::TraceId(
                turn.decision_trace_id.clone(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .trace
        .unwrap();
    let decision = trace.policy_decision.unwrap_or_default();
    (decision.rule_id, decision.policy_version)
}

/// The last hour to the next: every hourly bucket a metric of this run can fall in.
fn this_hour() -> TimeRange {
    let now = SystemTime::now();
    TimeRange {
        start: Some((now - Duration::from_secs(3600)).into()),
        end: Some((now + Duration::from_secs(3600)).into()),
    }
}

/// The tenant's trust index over the whole range, or `None` while nothing was counted.
async fn trust_index(feedback: &mut FeedbackServiceClient<Authed>) -> Option<MetricPoint> {
    let series = feedback
        .get_metrics(GetMetricsRequest {
            metrics: vec![MetricName::SuggestionAcceptance as i32],
            range: Some(this_hour()),
            granularity: Granularity::Total as i32,
            ..GetMetricsRequest::default()
        })
        .await
        .ok()?
        .into_inner()
        .series;
    let point = series
        .into_iter()
        .filter(|s| s.metric == MetricName::SuggestionAcceptance as i32)
        .flat_map(|s| s.points)
        .next()?;
    (point.denominator > 0).then_some(point)
}

/// 4. An agent reads the decision traces and rates a suggestion; the trust index moves.
async fn trust(d: &Deployment) {
    let tenant = "ops-trust";
    seed_tenant(d, tenant).await;
    let mut feedback = FeedbackServiceClient::new(
        d.client(d.endpoints.feedback, tenant, "lead", Role::Supervisor)
            .await,
    );
    assert_eq!(
        trust_index(&mut feedback).await,
        None,
        "{}: a new tenant has no trust index yet",
        d.kind
    );

    let mut agent = d.agent_online("ops-trust-ling", tenant, "ling", STEP).await;
    let mut chat = d.console(
        "ops-trust-chat",
        &["chat", "--language", "en", "--customer", "grace"],
        tenant,
        "web",
        Role::Channel,
    );
    chat.expect("conversation ", STEP).await;
    chat.send("where is my order").await;
    chat.expect("bot: ", STEP).await;
    chat.send("talk to a human please").await;
    chat.expect("state: BOT -> QUEUED", STEP).await;
    agent.expect("offer ", STEP).await;
    let why = agent.expect("why:", STEP).await;
    assert!(why.contains("explicit_request"), "{}: {why}", d.kind);
    // Printed once the desk holds the offer.
    agent.expect("/accept to take it", STEP).await;
    agent.send("/accept").await;
    agent.expect("assigned: conversation", STEP).await;
    chat.expect("-> AGENT", STEP).await;
    // The desk watches the conversation once dialog has recorded the assignment.
    agent.expect("current conversation:", STEP).await;

    // A question the bot knows, now that a human owns the conversation: a suggestion for the
    // agent, not an answer to the customer.
    chat.send("has my order shipped yet").await;
    let suggestion = agent.expect("] suggestion ", STEP).await;
    assert!(
        suggestion.contains("My orders"),
        "{}: the suggestion should carry the stored answer: {suggestion}",
        d.kind
    );
    let suggestion_id = suggestion
        .split("suggestion ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .unwrap()
        .to_owned();

    // Shown but not yet rated: counted in the denominator only.
    let shown = eventually("the suggestion is counted as shown", STEP, || {
        let mut feedback = feedback.clone();
        async move { trust_index(&mut feedback).await }
    })
    .await;
    assert_eq!(
        (shown.numerator, shown.denominator),
        (0, 1),
        "{}: {shown:?}",
        d.kind
    );

    // The agent reads why the bot handed off.
    agent.send("/trace").await;
    let handoff_turn = agent.expect("→ HANDOFF by rule", STEP).await;
    assert!(
        handoff_turn.contains("talk to a human please")
            && handoff_turn.contains("explicit_request")
            && handoff_turn.contains("scenario orders"),
        "{}: {handoff_turn}",
        d.kind
    );
    agent.expect("asked for a human", STEP).await;

    agent.send("/rate last used").await;
    agent
        .expect(&format!("rated suggestion {suggestion_id}: USED"), STEP)
        .await;
    let rated = eventually("the used suggestion raises the trust index", STEP, || {
        let mut feedback = feedback.clone();
        async move { trust_index(&mut feedback).await.filter(|p| p.numerator > 0) }
    })
    .await;
    assert_eq!(
        (rated.numerator, rated.denominator),
        (1, 1),
        "{}: {rated:?}",
        d.kind
    );
    assert!(
        rated.value > shown.value && (rated.value - 1.0).abs() < 1e-9,
        "{}: trust index {} -> {}",
        d.kind,
        shown.value,
        rated.value
    );

    agent.send("/resolve shipped yesterday").await;
    chat.expect("-> RESOLVED", STEP).await;
    assert!(chat.finish().await.0, "{}: chat failed", d.kind);
    assert!(agent.finish().await.0, "{}: agent desk failed", d.kind);
}

/// A customer's CSAT answer about the bot; it must be stored on the first attempt.
async fn submit_csat(
    d: &Deployment,
    surveys: &mut FeedbackServiceClient<Authed>,
    conversation: &str,
    score: i32,
) {
    let request = SubmitFeedbackRequest {
        feedback: Some(Feedback {
            client_feedback_id: format!("csat-{conversation}"),
            conversation_id: conversation.into(),
            channel: ChannelKind::WebChat as i32,
            subject: FeedbackSubject::Bot as i32,
            score: Some(feedback::Score::Csat(score)),
            comment: "the answer did not help at all".into(),
            ..Feedback::default()
        }),
    };
    if let Err(status) = surveys.submit_feedback(request).await {
        panic!("{}: SubmitFeedback failed: {status:?}", d.kind);
    }
}

/// 5. Bad bot CSAT raises an alert, the policy adjusts, the next conversation is handed off.
async fn alert_adjusts_policy(d: &Deployment) {
    let tenant = "ops-alert";
    seed_tenant(d, tenant).await;
    let e = &d.endpoints;
    let mut dialog =
        DialogServiceClient::new(d.client(e.dialog, tenant, "web", Role::Channel).await);
    let mut traces =
        DialogServiceClient::new(d.client(e.dialog, tenant, "lead", Role::Supervisor).await);
    let mut surveys =
        FeedbackServiceClient::new(d.client(e.feedback, tenant, "web", Role::Channel).await);
    let mut analytics =
        FeedbackServiceClient::new(d.client(e.feedback, tenant, "admin", Role::Admin).await);
    let mut policy =
        PolicyServiceClient::new(d.client(e.policy, tenant, "admin", Role::Admin).await);
    let question = "where is my order";

    let alert_rule = analytics
        .upsert_alert_rule(UpsertAlertRuleRequest {
            rule: Some(AlertRule {
                name: "orders bot CSAT".into(),
                kind: AlertKind::BotCsatBelowTarget as i32,
                scenario_id: "orders".into(),
                metric: MetricName::Csat as i32,
                condition: AlertCondition::Below as i32,
                threshold: 0.6,
                window: Duration::from_secs(15 * 60).try_into().ok(),
                min_samples: 3,
                severity: Severity::Warning as i32,
                enabled: true,
                ..AlertRule::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .rule
        .unwrap();
    let adjustment_rule = policy
        .upsert_adjustment_rule(UpsertAdjustmentRuleRequest {
            rule: Some(AdjustmentRule {
                scenario_id: "orders".into(),
                name: "humans take orders while the bot disappoints".into(),
                signal: AdjustmentSignal::BotCsat as i32,
                comparison: Comparison::Below as i32,
                threshold: 0.6,
                window: Duration::from_secs(10 * 60).try_into().ok(),
                min_samples: 1,
                effect: Some(adjustment_rule::Effect::SetStrategy(
                    Strategy::HumanFirst as i32,
                )),
                cooldown: Duration::from_secs(30 * 60).try_into().ok(),
                enabled: true,
                mode: Mode::Live as i32,
                ..AdjustmentRule::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .rule
        .unwrap();
    let before = policy
        .get_scenario(GetScenarioRequest {
            scenario_id: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .scenario
        .unwrap();
    assert_eq!(before.strategy, Strategy::BotFirst as i32, "{}", d.kind);

    // The bot answers; the customers are unhappy with the answers.
    for i in 0..3 {
        let conversation = start_conversation(&mut dialog, &format!("alert-unhappy-{i}")).await;
        let turn = say(&mut dialog, &conversation, question).await;
        assert_eq!(
            turn.action,
            BotAction::Answer as i32,
            "{}: bot first, the bot answers: {turn:?}",
            d.kind
        );
        submit_csat(d, &mut surveys, &conversation, 1).await;
    }

    let alert = eventually(
        "the bot CSAT alert is raised",
        Duration::from_secs(60),
        || {
            let mut analytics = analytics.clone();
            let rule = alert_rule.id.clone();
            async move {
                analytics
                    .list_alerts(ListAlertsRequest {
                        scenario_id: "orders".into(),
                        ..ListAlertsRequest::default()
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .alerts
                    .into_iter()
                    .find(|a| a.rule_id == rule)
            }
        },
    )
    .await;
    assert_eq!(
        alert.status,
        AlertStatus::Firing as i32,
        "{}: {alert:?}",
        d.kind
    );
    assert_eq!(
        alert.kind,
        AlertKind::BotCsatBelowTarget as i32,
        "{alert:?}"
    );
    assert!(alert.observed_value < 0.6, "{}: {alert:?}", d.kind);

    let adjusted: PolicyVersion = eventually(
        "the adjustment rule changes the orders policy",
        STEP,
        || {
            let mut policy = policy.clone();
            async move {
                policy
                    .list_policy_versions(ListPolicyVersionsRequest {
                        scenario_id: "orders".into(),
                        page: None,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .versions
                    .into_iter()
                    .find(|v| v.cause == ChangeCause::Adjustment as i32)
            }
        },
    )
    .await;
    assert_eq!(
        adjusted.rule_id, adjustment_rule.id,
        "{}: {adjusted:?}",
        d.kind
    );
    assert!(
        adjusted.version > before.version,
        "{}: {adjusted:?}",
        d.kind
    );
    assert_eq!(
        adjusted.scenario.as_ref().map(|s| s.strategy),
        Some(Strategy::HumanFirst as i32),
        "{}: {adjusted:?}",
        d.kind
    );
    let after = policy
        .get_scenario(GetScenarioRequest {
            scenario_id: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .scenario
        .unwrap();
    assert_eq!(after.strategy, Strategy::HumanFirst as i32, "{}", d.kind);
    assert_eq!(after.version, adjusted.version, "{}", d.kind);

    // The same question in a new conversation now goes to a human. Dialog follows the catalogue
    // from the policy events, so give it a moment (each attempt is a fresh conversation).
    let mut attempt = 0;
    let turn = eventually("the next orders conversation is handed off", STEP, || {
        attempt += 1;
        let mut dialog = dialog.clone();
        async move {
            let conversation =
                start_conversation(&mut dialog, &format!("alert-after-{attempt}")).await;
            let turn = say(&mut dialog, &conversation, question).await;
            (turn.action == BotAction::Handoff as i32).then_some(turn)
        }
    })
    .await;
    let (rule, version) = decided_by(&mut traces, &turn).await;
    assert_eq!(rule, "human_first", "{}: {turn:?}", d.kind);
    assert_eq!(version, adjusted.version, "{}", d.kind);
}

fn queue(id: &str, scenario: &str, skill: &str) -> Queue {
    Queue {
        id: id.into(),
        name: id.into(),
        scenario_ids: vec![scenario.into()],
        required_skills: vec![SkillRequirement {
            name: skill.into(),
            min_level: 1,
        }],
        ..Queue::default()
    }
}

/// The ISO weekday (Monday = 1) `days_ahead` days from today, in UTC.
fn weekday_in(days_ahead: u64) -> i32 {
    let days = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    // 1970-01-01 was a Thursday.
    i32::try_from((days + days_ahead + 3) % 7).unwrap() + 1
}

async fn messages(dialog: &mut Dialog, conversation: &str) -> Vec<Message> {
    dialog
        .list_messages(ListMessagesRequest {
            conversation_id: conversation.into(),
            ..ListMessagesRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .messages
}

async fn ticket(routing: &mut RoutingServiceClient<Authed>, conversation: &str) -> Option<Ticket> {
    routing
        .get_ticket(GetTicketRequest {
            key: Some(get_ticket_request::Key::ConversationId(conversation.into())),
        })
        .await
        .ok()?
        .into_inner()
        .ticket
}

/// The handoff `turn` of `conversation` went to a closed queue: routing returns it, the
/// conversation is back with the bot, and the customer is told and offered to leave a message.
async fn returned_to_the_bot(
    d: &Deployment,
    dialog: &mut Dialog,
    lead: &mut RoutingServiceClient<Authed>,
    conversation: &str,
    turn: &BotTurn,
) {
    let closed = conversation.to_owned();
    let returned = eventually("the handoff comes back from the closed queue", STEP, || {
        let mut lead = lead.clone();
        let closed = closed.clone();
        async move {
            ticket(&mut lead, &closed)
                .await
                .filter(|t| t.state == TicketState::Returned as i32)
        }
    })
    .await;
    assert_eq!(returned.queue_id, "general", "{}: {returned:?}", d.kind);
    assert!(returned.assigned_agent_id.is_empty(), "{returned:?}");
    let conversation = eventually("the conversation is back with the bot", STEP, || {
        let mut dialog = dialog.clone();
        let closed = closed.clone();
        async move {
            dialog
                .get_conversation(GetConversationRequest {
                    conversation_id: closed,
                })
                .await
                .ok()?
                .into_inner()
                .conversation
                .filter(|c| c.state == ConversationState::Bot as i32)
        }
    })
    .await;
    assert!(
        conversation.assigned_agent_id.is_empty(),
        "{conversation:?}"
    );
    let after_handoff: Vec<Message> = messages(dialog, &closed)
        .await
        .into_iter()
        .skip_while(|m| m.id != turn.reply_message_id)
        .skip(1)
        .collect();
    let notice = after_handoff
        .iter()
        .find(|m| m.sender_kind != SenderKind::Customer as i32)
        .unwrap_or_else(|| {
            panic!(
                "{}: the customer is told nothing after the handoff came back: {after_handoff:?}",
                d.kind
            )
        });
    assert!(
        notice.text.contains("No agent"),
        "{}: the customer should learn that no agent can take it: {notice:?}",
        d.kind
    );
    // The closed queue's behaviour is LEAVE_MESSAGE: routing returns the ticket with
    // `leave_message = true` (HandoffReturned), and the customer should be offered to leave a
    // message rather than only be told that the bot carries on.
    assert!(
        after_handoff
            .iter()
            .any(|m| m.text.contains("leave a message")),
        "{}: out of hours with LEAVE_MESSAGE, the customer should be offered to leave a message: \
         {after_handoff:?}",
        d.kind
    );
}

/// 6. Out of hours, then overflow to another queue.
async fn hours_and_overflow(d: &Deployment) {
    let tenant = "ops-hours";
    seed_tenant(d, tenant).await;
    let e = &d.endpoints;
    let mut dialog =
        DialogServiceClient::new(d.client(e.dialog, tenant, "web", Role::Channel).await);
    let mut admin =
        RoutingServiceClient::new(d.client(e.routing, tenant, "admin", Role::Admin).await);
    let mut lead =
        RoutingServiceClient::new(d.client(e.routing, tenant, "lead", Role::Supervisor).await);

    // The orders queue opens only on the day after tomorrow (UTC): closed now.
    admin
        .upsert_queue(UpsertQueueRequest {
            queue: Some(Queue {
                business_hours: Some(BusinessHours {
                    timezone: "UTC".into(),
                    windows: vec![WeeklyWindow {
                        day: weekday_in(2),
                        start_minute: 0,
                        end_minute: 1440,
                    }],
                    holidays: Vec::new(),
                }),
                out_of_hours: OutOfHoursBehaviour::LeaveMessage as i32,
                ..queue("general", "orders", "orders")
            }),
        })
        .await
        .unwrap();
    let closed = start_conversation(&mut dialog, "hours-closed").await;
    let turn = say(&mut dialog, &closed, "talk to a human please").await;
    // Dialog hands off while it has not heard from routing about the new queue; should routing's
    // first report of it already have arrived, dialog decides as checked below.
    if turn.action == BotAction::Handoff as i32 {
        returned_to_the_bot(d, &mut dialog, &mut lead, &closed, &turn).await;
    } else {
        assert_eq!(
            decided_by(&mut dialog, &turn).await.0,
            "outside_business_hours",
            "{}: {turn:?}",
            d.kind
        );
    }
    // Once routing has reported the closed queue, dialog knows before anyone waits: the same
    // request gets the offer to leave a message at once, and no ticket is made.
    let mut attempt = 0;
    let (direct, turn) = eventually("dialog learns that the queue is closed", STEP, || {
        attempt += 1;
        let mut dialog = dialog.clone();
        async move {
            let key = format!("hours-known-{attempt}");
            let conversation = start_conversation(&mut dialog, &key).await;
            let turn = say(&mut dialog, &conversation, "talk to a human please").await;
            if turn.action == BotAction::Handoff as i32 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                return None;
            }
            Some((conversation, turn))
        }
    })
    .await;
    assert_eq!(
        decided_by(&mut dialog, &turn).await.0,
        "outside_business_hours",
        "{}: {turn:?}",
        d.kind
    );
    assert!(
        turn.reply_text.contains("leave a message"),
        "{}: {turn:?}",
        d.kind
    );
    assert!(ticket(&mut lead, &direct).await.is_none(), "{}", d.kind);
    // Open again, but only sam (billing) is online: nobody eligible for orders. After 3 s the
    // ticket overflows to the billing queue, where sam is.
    admin
        .upsert_queue(UpsertQueueRequest {
            queue: Some(Queue {
                overflow: vec![OverflowStep {
                    after: Duration::from_secs(3).try_into().ok(),
                    action: OverflowAction::MoveToQueue as i32,
                    target_queue_id: "billing".into(),
                    drop_skills: Vec::new(),
                }],
                ..queue("general", "orders", "orders")
            }),
        })
        .await
        .unwrap();
    let mut sam = d.console(
        "ops-hours-sam",
        &["agent", "--agent", "sam"],
        tenant,
        "sam",
        Role::Agent,
    );
    sam.expect("online as sam", STEP).await;
    // Dialog offers to leave a message until routing reports the queue open again.
    let mut attempt = 0;
    let (overflowing, asked) = eventually("dialog learns that the queue is open", STEP, || {
        attempt += 1;
        let mut dialog = dialog.clone();
        async move {
            let conversation =
                start_conversation(&mut dialog, &format!("hours-overflow-{attempt}")).await;
            let asked = Instant::now();
            let turn = say(&mut dialog, &conversation, "talk to a human please").await;
            if turn.action != BotAction::Handoff as i32 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                return None;
            }
            Some((conversation, asked))
        }
    })
    .await;
    let queued = eventually("the ticket waits in the orders queue", STEP, || {
        let mut lead = lead.clone();
        let overflowing = overflowing.clone();
        async move { ticket(&mut lead, &overflowing).await }
    })
    .await;
    assert_eq!(queued.queue_id, "general", "{}: {queued:?}", d.kind);
    let offer = sam
        .expect(&format!("conversation {overflowing}"), STEP)
        .await;
    let waited = asked.elapsed();
    assert!(offer.starts_with("offer "), "{}: {offer}", d.kind);
    assert!(
        waited >= Duration::from_secs(3),
        "{}: the offer came after {waited:?}, before the overflow step",
        d.kind
    );
    let moved = ticket(&mut lead, &overflowing).await.unwrap();
    assert_eq!(moved.queue_id, "billing", "{}: {moved:?}", d.kind);
    assert_eq!(moved.offered_agent_id, "sam", "{}: {moved:?}", d.kind);
    sam.expect("/accept to take it", STEP).await;
    sam.send("/accept").await;
    sam.expect(&format!("assigned: conversation {overflowing}"), STEP)
        .await;
    // Printed once the desk made it the current conversation.
    sam.expect("current conversation:", STEP).await;
    sam.send("/resolve passed on to the orders team").await;
    sam.expect("resolved conversation", STEP).await;
    assert!(sam.finish().await.0, "{}: agent desk failed", d.kind);
}

async fn all(d: &Deployment) {
    trust(d).await;
    alert_adjusts_policy(d).await;
    hours_and_overflow(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed() {
    let d = Deployment::distributed().await;
    all(&d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone() {
    let d = Deployment::standalone().await;
    all(&d).await;
}
