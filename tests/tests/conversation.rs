//! The conversation themes end to end, on every service as its own process (PostgreSQL + NATS)
//! and on the standalone process:
//!
//! 1. an emotion swing hands the customer to an agent, who gets the whole context — the order
//!    number the customer already gave is in front of them — driven through `tandem chat` and
//!    `tandem agent` as a customer and an agent would use them;
//! 2. an agent's resolution is mined into a candidate, approved, becomes searchable, and the bot
//!    then answers the same question itself, citing the new article;
//! 3. training a scenario's intents changes what the bot understands;
//! 4. a conversation the agent resolved in dialog frees the agent in routing: when the customer
//!    comes back and asks for a human again, the new handoff is queued and reaches an agent.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tandem_e2e::{BILLING_EXAMPLES, Deployment, eventually, say, seed_tenant, start_conversation};
use tandem_platform::auth::Role;
use tandem_proto::pb::dialog::v1::dialog_service_client::DialogServiceClient;
use tandem_proto::pb::dialog::v1::model_service_client::ModelServiceClient;
use tandem_proto::pb::dialog::v1::{
    BotAction, ExampleFormat, GetConversationRequest, GetDecisionTraceRequest,
    ResolveConversationRequest, TrainModelRequest, UploadExamplesRequest,
    get_decision_trace_request,
};
use tandem_proto::pb::knowledge::v1::knowledge_service_client::KnowledgeServiceClient;
use tandem_proto::pb::knowledge::v1::{
    Audience, CandidateDecision, CandidateStatus, ListCandidatesRequest, ReviewCandidateRequest,
    SearchRequest,
};
use tandem_proto::pb::routing::v1::routing_service_client::RoutingServiceClient;
use tandem_proto::pb::routing::v1::{
    Disposition, GetAgentRequest, GetTicketRequest, TicketState, get_ticket_request,
};

const STEP: Duration = Duration::from_secs(30);

/// 1. An emotion swing triggers a handoff; the agent receives the full context.
async fn emotion_swing(d: &Deployment) {
    let tenant = "e2e-swing";
    seed_tenant(d, tenant).await;
    let mut agent = d.agent_online("agent-ling", tenant, "ling", STEP).await;
    let mut chat = d.console(
        "chat",
        &["chat", "--name", "Ada Lovelace", "--customer", "ada"],
        tenant,
        "web",
        Role::Channel,
    );
    chat.expect("conversation ", STEP).await;

    chat.send("Hi! Where is my order 20240115? Thanks a lot, great shop")
        .await;
    chat.expect("bot: ", STEP).await;
    chat.send("This is terrible. The worst service ever, I am furious and really upset!")
        .await;
    chat.expect("state: BOT -> QUEUED", STEP).await;

    // The offer carries the package: why, the numbers, and what the customer already said.
    agent.expect("offer ", STEP).await;
    let why = agent.expect("why:", STEP).await;
    assert!(
        why.contains("EMOTION"),
        "{}: handoff should be for the emotion, got {why}",
        d.kind
    );
    let entities = agent.expect("entities:", STEP).await;
    assert!(
        entities.contains("20240115"),
        "{}: the order number the customer gave must reach the agent: {entities}",
        d.kind
    );
    agent.expect("sentiment:", STEP).await;
    agent
        .expect("customer: Hi! Where is my order 20240115", STEP)
        .await;
    agent.send("/accept").await;
    agent.expect("assigned: conversation", STEP).await;
    agent.expect("current conversation:", STEP).await;
    chat.expect("state: QUEUED -> AGENT (agent ling)", STEP)
        .await;

    agent
        .send("I am sorry, Ada. Order 20240115 left our warehouse late; it arrives tomorrow.")
        .await;
    let reply = chat.expect("agent ling: ", STEP).await;
    assert!(reply.contains("20240115"), "{}: {reply}", d.kind);
    agent.send("/resolve delay explained").await;
    agent.expect("resolved conversation", STEP).await;
    chat.expect("state: AGENT -> RESOLVED", STEP).await;
    chat.expect("csat:", STEP).await;
    chat.send("5 quick and kind").await;
    chat.expect("thank you: rated 5/5", STEP).await;

    let (ok, lines) = chat.finish().await;
    assert!(ok, "{}: chat failed: {lines:?}", d.kind);
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("bot: ") && l.contains("order number")),
        "{}: the customer was asked for the order number again: {lines:?}",
        d.kind
    );
    let (ok, lines) = agent.finish().await;
    assert!(ok, "{}: agent desk failed: {lines:?}", d.kind);
}

/// 2. An agent's resolution becomes an article the bot answers from.
async fn resolution_becomes_knowledge(d: &Deployment) {
    let tenant = "e2e-mining";
    seed_tenant(d, tenant).await;
    let question = "Can I change the delivery address after paying?";
    let answer = "Yes. Open My orders, pick the order and choose Change address; it works until \
                  the parcel is handed to the courier.";
    let mut agent = d.agent_online("agent-mining", tenant, "ling", STEP).await;
    let mut chat = d.console(
        "chat-mining",
        &["chat", "--language", "en"],
        tenant,
        "web",
        Role::Channel,
    );
    chat.expect("conversation ", STEP).await;
    chat.send(question).await;
    chat.expect("bot: ", STEP).await;
    chat.send("talk to a human please").await;
    chat.expect("state: BOT -> QUEUED", STEP).await;
    agent.expect("offer ", STEP).await;
    agent.send("/accept").await;
    agent.expect("assigned: conversation", STEP).await;
    agent.expect("current conversation:", STEP).await;
    chat.expect("-> AGENT", STEP).await;
    agent.send(answer).await;
    chat.expect("agent ling: Yes. Open My orders", STEP).await;
    agent.send("/resolve address change explained").await;
    chat.expect("-> RESOLVED", STEP).await;
    assert!(chat.finish().await.0, "{}: chat failed", d.kind);
    assert!(agent.finish().await.0, "{}: agent desk failed", d.kind);

    // Mined into a candidate with the customer's question and the agent's answer.
    let mut knowledge = KnowledgeServiceClient::new(
        d.client(d.endpoints.knowledge, tenant, "lead", Role::Supervisor)
            .await,
    );
    let candidate = eventually("the resolution becomes a candidate", STEP, || {
        let mut knowledge = knowledge.clone();
        async move {
            knowledge
                .list_candidates(ListCandidatesRequest {
                    status: CandidateStatus::Pending as i32,
                    ..ListCandidatesRequest::default()
                })
                .await
                .ok()?
                .into_inner()
                .candidates
                .into_iter()
                .find(|c| c.question.contains("delivery address"))
        }
    })
    .await;
    assert!(candidate.answer.contains("Change address"), "{candidate:?}");
    let reviewed = knowledge
        .review_candidate(ReviewCandidateRequest {
            candidate_id: candidate.id.clone(),
            decision: CandidateDecision::ApproveAndPublish as i32,
            title: "Changing the delivery address".into(),
            reason: "good agent answer".into(),
            ..ReviewCandidateRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let article = reviewed.article.unwrap();

    // Searchable, then the bot answers the same question itself and cites it.
    eventually("the article becomes searchable", STEP, || {
        let mut knowledge = knowledge.clone();
        let id = article.id.clone();
        async move {
            let hits = knowledge
                .search(SearchRequest {
                    query: "change delivery address".into(),
                    audience: Audience::Bot as i32,
                    ..SearchRequest::default()
                })
                .await
                .ok()?
                .into_inner()
                .hits;
            hits.iter().any(|h| h.article_id == id).then_some(())
        }
    })
    .await;
    let mut dialog = DialogServiceClient::new(
        d.client(d.endpoints.dialog, tenant, "web", Role::Channel)
            .await,
    );
    let conversation = start_conversation(&mut dialog, "mining-again").await;
    let turn = say(&mut dialog, &conversation, question).await;
    assert_eq!(
        turn.action,
        BotAction::Answer as i32,
        "{}: the bot should answer from the new article: {turn:?}",
        d.kind
    );
    assert!(
        turn.cited_articles
            .iter()
            .any(|a| a.article_id == article.id),
        "{}: the answer should cite article {}: {turn:?}",
        d.kind,
        article.id
    );
    assert!(turn.reply_text.contains("Change address"), "{turn:?}");
}

/// 3. Training a scenario's intents changes what the bot understands.
async fn training_changes_understanding(d: &Deployment) {
    let tenant = "e2e-training";
    seed_tenant(d, tenant).await;
    let mut dialog = DialogServiceClient::new(
        d.client(d.endpoints.dialog, tenant, "web", Role::Channel)
            .await,
    );
    let mut traces = DialogServiceClient::new(
        d.client(d.endpoints.dialog, tenant, "lead", Role::Supervisor)
            .await,
    );
    let question = "why is my bill so high this month";

    let before = start_conversation(&mut dialog, "training-before").await;
    let turn = say(&mut dialog, &before, question).await;
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
    assert!(
        trace.intent_scores.iter().all(|s| s.intent != "bill_query"),
        "{}: an untrained intent cannot be recognised: {trace:?}",
        d.kind
    );
    assert_ne!(
        turn.action,
        BotAction::Answer as i32,
        "{}: {turn:?}",
        d.kind
    );

    let mut models = ModelServiceClient::new(
        d.client(d.endpoints.dialog, tenant, "admin", Role::Admin)
            .await,
    );
    let uploaded = models
        .upload_examples(UploadExamplesRequest {
            scenario_id: "billing".into(),
            format: ExampleFormat::Jsonl as i32,
            raw: BILLING_EXAMPLES.to_owned(),
            ..UploadExamplesRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(uploaded.errors.is_empty(), "{uploaded:?}");
    models
        .train_model(TrainModelRequest {
            activate: true,
            notes: "billing added".into(),
            ..TrainModelRequest::default()
        })
        .await
        .unwrap();

    let after = start_conversation(&mut dialog, "training-after").await;
    let turn = say(&mut dialog, &after, question).await;
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
    assert_eq!(
        trace.intent_scores.first().map(|s| s.intent.as_str()),
        Some("bill_query"),
        "{}: {trace:?}",
        d.kind
    );
    assert_eq!(trace.scenario_id, "billing", "{}", d.kind);
    assert_eq!(
        turn.action,
        BotAction::Answer as i32,
        "{}: {turn:?}",
        d.kind
    );

    // The same in Chinese.
    let zh = start_conversation(&mut dialog, "training-zh").await;
    let turn = say(&mut dialog, &zh, "这个月的话费账单怎么这么高").await;
    assert_eq!(
        turn.action,
        BotAction::Answer as i32,
        "{}: {turn:?}",
        d.kind
    );
    assert!(turn.reply_text.contains("账单"), "{}: {turn:?}", d.kind);
}

/// The word after `label` in `line` (`"conversation c-1 (BOT)"`, `"conversation"` → `c-1`),
/// without the brackets around it.
fn word_after<'a>(line: &'a str, label: &str) -> &'a str {
    line.split_whitespace()
        .skip_while(|w| w.trim_start_matches('(') != label)
        .nth(1)
        .map(|w| w.trim_matches(|c| c == '(' || c == ')'))
        .unwrap_or_else(|| panic!("no {label:?} in {line:?}"))
}

/// 4. A conversation resolved in dialog hands off again.
///
/// The agent resolves the conversation through dialog (`ResolveConversation`), not through
/// routing; the customer writes again and asks for a human: the new handoff is queued (the
/// customer hears the queue position) and reaches the agent, who takes it.
async fn resolved_in_dialog_then_human_again(d: &Deployment) {
    let tenant = "e2e-reopen";
    seed_tenant(d, tenant).await;
    let mut agent = d.agent_online("agent-reopen", tenant, "ling", STEP).await;
    let mut chat = d.console(
        "chat-reopen",
        &["chat", "--language", "en"],
        tenant,
        "web",
        Role::Channel,
    );
    let opened = chat.expect("conversation ", STEP).await;
    let conversation = word_after(&opened, "conversation").to_owned();
    chat.send("Where is my order 20240115?").await;
    chat.expect("bot: ", STEP).await;
    chat.send("talk to a human please").await;
    chat.expect("state: BOT -> QUEUED", STEP).await;
    agent.expect("offer ", STEP).await;
    agent.send("/accept").await;
    let assigned = agent.expect("assigned: conversation", STEP).await;
    let first_ticket = word_after(&assigned, "ticket").to_owned();
    agent.expect("current conversation:", STEP).await;
    chat.expect("state: QUEUED -> AGENT (agent ling)", STEP)
        .await;

    // The agent resolves it in dialog.
    let mut ling = DialogServiceClient::new(
        d.client(d.endpoints.dialog, tenant, "ling", Role::Agent)
            .await,
    );
    ling.resolve_conversation(ResolveConversationRequest {
        conversation_id: conversation.clone(),
        note: "order located".into(),
    })
    .await
    .unwrap();
    chat.expect("state: AGENT -> RESOLVED", STEP).await;

    // Routing completes the assignment and frees the agent.
    let routing = RoutingServiceClient::new(
        d.client(d.endpoints.routing, tenant, "lead", Role::Supervisor)
            .await,
    );
    let done = eventually("routing completes the resolved assignment", STEP, || {
        let mut routing = routing.clone();
        let id = first_ticket.clone();
        async move {
            let ticket = routing
                .get_ticket(GetTicketRequest {
                    key: Some(get_ticket_request::Key::TicketId(id)),
                })
                .await
                .ok()?
                .into_inner()
                .ticket?;
            (ticket.state == TicketState::Completed as i32).then_some(ticket)
        }
    })
    .await;
    assert_eq!(
        done.disposition,
        Disposition::Resolved as i32,
        "{}: {done:?}",
        d.kind
    );
    let ling_now = routing
        .clone()
        .get_agent(GetAgentRequest {
            agent_id: "ling".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .agent
        .unwrap();
    assert_eq!(ling_now.active_assignments, 0, "{}: {ling_now:?}", d.kind);

    // The customer comes back, then asks for a human again.
    chat.send("One more question about order 20240115").await;
    chat.expect("state: RESOLVED -> BOT", STEP).await;
    chat.send("talk to a human please").await;
    chat.expect("state: BOT -> QUEUED", STEP).await;
    chat.expect("queue: position", STEP).await;
    let offer = agent.expect("offer ", STEP).await;
    assert!(offer.contains(&conversation), "{}: {offer}", d.kind);
    agent.send("/accept").await;
    let assigned = agent.expect("assigned: conversation", STEP).await;
    assert_ne!(word_after(&assigned, "ticket"), first_ticket, "{}", d.kind);
    chat.expect("state: QUEUED -> AGENT (agent ling)", STEP)
        .await;
    let mut dialog = DialogServiceClient::new(
        d.client(d.endpoints.dialog, tenant, "lead", Role::Supervisor)
            .await,
    );
    let now = dialog
        .get_conversation(GetConversationRequest {
            conversation_id: conversation.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap();
    assert_eq!(now.assigned_agent_id, "ling", "{}: {now:?}", d.kind);
    assert_ne!(now.handoff_id, first_ticket, "{}: {now:?}", d.kind);
    assert_eq!(now.reopen_count, 1, "{}: {now:?}", d.kind);

    assert!(chat.finish().await.0, "{}: chat failed", d.kind);
    assert!(agent.finish().await.0, "{}: agent desk failed", d.kind);
}

async fn all(d: &Deployment) {
    emotion_swing(d).await;
    training_changes_understanding(d).await;
    resolution_becomes_knowledge(d).await;
    resolved_in_dialog_then_human_again(d).await;
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
