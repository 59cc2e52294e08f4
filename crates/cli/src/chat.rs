//! `tandem chat`: a customer in the terminal.
//!
//! Every line typed is a customer message; the bot's answers, clarifications, the handoff with
//! queue position and ETA, the agent's replies and state changes are printed as they happen
//! (from `WatchConversation`, customer view). When the conversation is resolved the customer is
//! asked for a CSAT score. Commands start with `/`; `/help` lists them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tandem_platform::auth::Role;
use tandem_proto::pb::common::v1::{Channel as ChannelKind, Customer, CustomerTier, Language};
use tandem_proto::pb::dialog::v1::conversation_update::Update;
use tandem_proto::pb::dialog::v1::dialog_service_client::DialogServiceClient;
use tandem_proto::pb::dialog::v1::{
    BotAction, CancelHandoffRequest, ClarificationChoice, CloseConversationRequest, CloseReason,
    ConversationState, ConversationView, GetConversationRequest, Message,
    PostCustomerMessageRequest, SenderKind, StartConversationRequest, WatchConversationRequest,
};
use tandem_proto::pb::feedback::v1::feedback::Score;
use tandem_proto::pb::feedback::v1::feedback_service_client::FeedbackServiceClient;
use tandem_proto::pb::feedback::v1::{Feedback, FeedbackSubject, SubmitFeedbackRequest};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::client::{
    Authed, Clients, Connection, Console, Input, describe, duration_words, new_key, parse_wait,
};

/// Options of `tandem chat`.
#[derive(clap::Args)]
pub struct Options {
    #[command(flatten)]
    connection: Connection,
    /// Continue this conversation instead of starting one.
    #[arg(long)]
    conversation: Option<String>,
    /// The customer's id in the integrating system; random when not given.
    #[arg(long)]
    customer: Option<String>,
    /// The customer's name shown to agents.
    #[arg(long, default_value = "Terminal customer")]
    name: String,
    /// standard, premium or vip.
    #[arg(long, default_value = "standard")]
    tier: String,
    /// zh or en; detected from the text when not given.
    #[arg(long)]
    language: Option<String>,
    /// Scenario to start in, when known.
    #[arg(long)]
    scenario: Option<String>,
    /// Mark the conversation as a test (excluded from analytics).
    #[arg(long)]
    test: bool,
}

const HELP: &str = "type a message and press Enter. Commands:
  /cancel [reason]       leave the queue and go back to the bot
  /csat <1-5> [comment]  rate the service
  /wait <text> [secs]    wait until a line containing <text> is printed (for scripts)
  /sleep <millis>        pause (for scripts)
  /quit                  leave (closes the conversation); end of input does the same";

/// What the input loop needs to know about what the watcher printed.
#[derive(Default)]
struct Shared {
    /// Messages already printed.
    seen: HashSet<String>,
    /// The choices of the latest clarification.
    choices: Vec<ClarificationChoice>,
    /// The conversation was resolved and the CSAT question is open.
    awaiting_csat: bool,
    /// An agent took part.
    agent_involved: bool,
    /// Latest state.
    state: i32,
}

type SharedState = Arc<Mutex<Shared>>;

fn lock(shared: &SharedState) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the chat until `/quit` or the end of input.
pub async fn run(options: Options, env: HashMap<String, String>) -> anyhow::Result<()> {
    let clients = Clients::connect(&options.connection, "tandem-chat", Role::Channel, &env).await?;
    let mut dialog = DialogServiceClient::new(clients.authed(&clients.dialog));
    let console = Console::default();
    let shared = SharedState::default();

    let conversation = match &options.conversation {
        Some(id) => {
            dialog
                .get_conversation(GetConversationRequest {
                    conversation_id: id.clone(),
                })
                .await
                .map_err(|s| describe(&format!("conversation {id}"), &s))?
                .into_inner()
                .conversation
        }
        None => {
            let customer = Customer {
                id: options
                    .customer
                    .clone()
                    .unwrap_or_else(|| new_key("customer")),
                display_name: options.name.clone(),
                tier: tier(&options.tier)? as i32,
                language: language(options.language.as_deref())? as i32,
                channel: ChannelKind::WebChat as i32,
                attributes: HashMap::new(),
            };
            dialog
                .start_conversation(StartConversationRequest {
                    customer: Some(customer),
                    scenario_hint: options.scenario.clone().unwrap_or_default(),
                    channel: ChannelKind::WebChat as i32,
                    client_conversation_id: new_key("chat"),
                    test: options.test,
                    proactive: false,
                })
                .await
                .map_err(|s| describe("starting the conversation", &s))?
                .into_inner()
                .conversation
        }
    }
    .context("the server returned no conversation")?;
    let id = conversation.id.clone();
    lock(&shared).state = conversation.state;
    if conversation.state == ConversationState::Closed as i32 {
        bail!("conversation {id} is closed");
    }
    console.line(format!(
        "conversation {id} ({})",
        state_name(conversation.state)
    ));

    let stop = CancellationToken::new();
    let watcher = {
        let mut stream = dialog
            .watch_conversation(WatchConversationRequest {
                conversation_id: id.clone(),
                view: ConversationView::Customer as i32,
                resume_after: String::new(),
            })
            .await
            .map_err(|s| describe("watching the conversation", &s))?
            .into_inner();
        let (console, shared, stop) = (console.clone(), Arc::clone(&shared), stop.clone());
        let mut dialog = dialog.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let mut cursor = String::new();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    item = stream.message() => match item {
                        Ok(Some(response)) => {
                            if let Some(update) = response.update {
                                cursor.clone_from(&update.cursor);
                                show_update(&console, &shared, update.update);
                            }
                        }
                        Ok(None) | Err(_) => {
                            // Reconnect and replay what was missed after the cursor.
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            match dialog
                                .watch_conversation(WatchConversationRequest {
                                    conversation_id: id.clone(),
                                    view: ConversationView::Customer as i32,
                                    resume_after: cursor.clone(),
                                })
                                .await
                            {
                                Ok(response) => stream = response.into_inner(),
                                Err(status) => {
                                    console.line(format!(
                                        "error: {}",
                                        describe("watching the conversation", &status)
                                    ));
                                    return;
                                }
                            }
                        }
                    },
                }
            }
        })
    };
    console.line(HELP.lines().next().unwrap_or_default().to_owned() + " (/help for commands)");

    let mut feedback = FeedbackServiceClient::new(clients.authed(&clients.feedback));
    let mut input = Input::stdin();
    let result = loop {
        let Some(line) = input.next().await? else {
            break Ok(());
        };
        match handle_line(&line, &id, &mut dialog, &mut feedback, &console, &shared).await {
            Ok(Flow::Continue) => {}
            Ok(Flow::Quit) => break Ok(()),
            Err(error) => break Err(error),
        }
    };
    let closing = if result.is_ok() && lock(&shared).state != ConversationState::Closed as i32 {
        dialog
            .close_conversation(CloseConversationRequest {
                conversation_id: id.clone(),
                reason: CloseReason::CustomerLeft as i32,
                note: "the customer left the terminal chat".into(),
            })
            .await
            .map(|_| console.line("conversation closed"))
            .map_err(|s| describe("closing the conversation", &s))
    } else {
        Ok(())
    };
    stop.cancel();
    let _ = watcher.await;
    result.and(closing)
}

enum Flow {
    Continue,
    Quit,
}

async fn handle_line(
    line: &str,
    id: &str,
    dialog: &mut DialogServiceClient<Authed>,
    feedback: &mut FeedbackServiceClient<Authed>,
    console: &Console,
    shared: &SharedState,
) -> anyhow::Result<Flow> {
    if line.is_empty() {
        lock(shared).awaiting_csat = false;
        return Ok(Flow::Continue);
    }
    if let Some(command) = line.strip_prefix('/') {
        let (name, rest) = command.split_once(' ').unwrap_or((command, ""));
        match name {
            "help" => HELP.lines().for_each(|l| console.line(l)),
            "quit" | "exit" => return Ok(Flow::Quit),
            "wait" => {
                let (text, limit) = parse_wait(rest)?;
                console.wait_for(&text, limit).await?;
            }
            "sleep" => {
                let millis: u64 = rest.trim().parse().context("usage: /sleep <millis>")?;
                tokio::time::sleep(Duration::from_millis(millis.min(600_000))).await;
            }
            "cancel" => {
                let result = dialog
                    .cancel_handoff(CancelHandoffRequest {
                        conversation_id: id.to_owned(),
                        handoff_id: String::new(),
                        reason: rest.trim().to_owned(),
                    })
                    .await;
                report(console, "cancelling the handoff", result.map(|_| ()))?;
            }
            "csat" => {
                let (score, comment) = rest.trim().split_once(' ').unwrap_or((rest.trim(), ""));
                rate(score, comment, id, feedback, console, shared).await?;
            }
            other => console.line(format!("error: unknown command /{other}; /help lists them")),
        }
        return Ok(Flow::Continue);
    }
    // A bare score answers the CSAT question; a bare number picks a clarification choice.
    let (first, rest) = line.split_once(' ').unwrap_or((line, ""));
    if lock(shared).awaiting_csat && first.parse::<u8>().is_ok() {
        rate(first, rest, id, feedback, console, shared).await?;
        return Ok(Flow::Continue);
    }
    let text = match line.parse::<usize>() {
        Ok(n) if n >= 1 => lock(shared)
            .choices
            .get(n - 1)
            .map_or_else(|| line.to_owned(), |c| c.label.clone()),
        _ => line.to_owned(),
    };
    lock(shared).awaiting_csat = false;
    let result = dialog
        .post_customer_message(PostCustomerMessageRequest {
            conversation_id: id.to_owned(),
            client_message_id: new_key("msg"),
            text,
            attachments: Vec::new(),
        })
        .await;
    match result {
        Ok(response) => {
            let response = response.into_inner();
            if let Some(message) = response.message {
                lock(shared).seen.insert(message.id);
            }
            if let Some(turn) = response.bot_turn
                && !turn.reply_message_id.is_empty()
            {
                // The watcher usually prints the reply first; print it here when it has not.
                let first = lock(shared).seen.insert(turn.reply_message_id.clone());
                if first {
                    show_bot(
                        console,
                        shared,
                        &turn.reply_text,
                        turn.action,
                        &turn.choices,
                        &turn.cited_articles,
                    );
                }
            }
            Ok(Flow::Continue)
        }
        Err(status) => {
            report(console, "sending the message", Err(status))?;
            Ok(Flow::Continue)
        }
    }
}

/// Prints a refused request and goes on, or ends the chat when it cannot go on.
fn report(console: &Console, what: &str, result: Result<(), tonic::Status>) -> anyhow::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(status)
            if matches!(
                status.code(),
                Code::Unauthenticated | Code::Unavailable | Code::NotFound | Code::PermissionDenied
            ) =>
        {
            Err(describe(what, &status))
        }
        Err(status) => {
            console.line(format!("error: {}", describe(what, &status)));
            Ok(())
        }
    }
}

async fn rate(
    score: &str,
    comment: &str,
    id: &str,
    feedback: &mut FeedbackServiceClient<Authed>,
    console: &Console,
    shared: &SharedState,
) -> anyhow::Result<()> {
    let Ok(score) = score.parse::<i32>() else {
        console.line("error: a CSAT score is a number from 1 to 5");
        return Ok(());
    };
    let subject = if lock(shared).agent_involved {
        FeedbackSubject::Agent
    } else {
        FeedbackSubject::Bot
    };
    let result = feedback
        .submit_feedback(SubmitFeedbackRequest {
            feedback: Some(Feedback {
                client_feedback_id: format!("chat-csat-{id}"),
                conversation_id: id.to_owned(),
                channel: ChannelKind::WebChat as i32,
                subject: subject as i32,
                score: Some(Score::Csat(score)),
                comment: comment.trim().to_owned(),
                ..Feedback::default()
            }),
        })
        .await;
    let ok = result.is_ok();
    report(console, "rating", result.map(|_| ()))?;
    if ok {
        lock(shared).awaiting_csat = false;
        console.line(format!("thank you: rated {score}/5"));
    }
    Ok(())
}

fn show_update(console: &Console, shared: &SharedState, update: Option<Update>) {
    match update {
        Some(Update::MessagePosted(message)) => show_message(console, shared, message),
        Some(Update::StateChanged(change)) => {
            let resolved = change.to_state == ConversationState::Resolved as i32;
            let mut line = format!(
                "state: {} -> {}",
                state_name(change.from_state),
                state_name(change.to_state)
            );
            if !change.assigned_agent_id.is_empty() {
                line += &format!(" (agent {})", change.assigned_agent_id);
            } else if !change.reason.is_empty() {
                line += &format!(" ({})", change.reason);
            }
            {
                let mut shared = lock(shared);
                shared.state = change.to_state;
                if change.to_state == ConversationState::Agent as i32 {
                    shared.agent_involved = true;
                }
                if resolved {
                    shared.awaiting_csat = true;
                }
            }
            console.line(line);
            if resolved {
                console.line(
                    "csat: how satisfied are you with the help you got? Type 1 (bad) to 5 \
                     (great), or Enter to skip",
                );
            }
        }
        Some(Update::QueueUpdated(queue)) => console.line(format!(
            "queue: position {} in {}, about {}",
            queue.position,
            queue.queue_id,
            duration_words(i64::from(queue.eta_seconds))
        )),
        Some(Update::Typing(typing)) if typing.typing && typing.sender_kind == 3 => {
            console.line(format!("typing: {} is typing…", typing.sender_id));
        }
        Some(Update::Typing(_) | Update::Suggestion(_)) | None => {}
    }
}

fn show_message(console: &Console, shared: &SharedState, message: Message) {
    if !lock(shared).seen.insert(message.id.clone()) {
        return;
    }
    match SenderKind::try_from(message.sender_kind).unwrap_or_default() {
        SenderKind::Bot => show_bot(
            console,
            shared,
            &message.text,
            message.bot_action,
            &message.choices,
            &message.cited_articles,
        ),
        SenderKind::Agent => {
            lock(shared).agent_involved = true;
            console.line(format!("agent {}: {}", message.sender_id, message.text));
        }
        SenderKind::System => console.line(format!("system: {}", message.text)),
        SenderKind::Customer | SenderKind::Unspecified => {}
    }
}

fn show_bot(
    console: &Console,
    shared: &SharedState,
    text: &str,
    action: i32,
    choices: &[ClarificationChoice],
    cited: &[tandem_proto::pb::common::v1::ArticleRef],
) {
    console.line(format!("bot: {text}"));
    if action == BotAction::Clarify as i32 {
        for (i, choice) in choices.iter().enumerate() {
            console.line(format!("  {}) {}", i + 1, choice.label));
        }
        lock(shared).choices = choices.to_vec();
    }
    for article in cited {
        console.line(format!(
            "  source: {} (article {} v{})",
            article.title, article.article_id, article.version
        ));
    }
}

/// `BOT`, `QUEUED`, … for a state number.
pub fn state_name(state: i32) -> &'static str {
    match ConversationState::try_from(state).unwrap_or_default() {
        ConversationState::Bot => "BOT",
        ConversationState::Queued => "QUEUED",
        ConversationState::Agent => "AGENT",
        ConversationState::Resolved => "RESOLVED",
        ConversationState::Closed => "CLOSED",
        ConversationState::Unspecified => "UNKNOWN",
    }
}

fn tier(name: &str) -> anyhow::Result<CustomerTier> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "standard" => CustomerTier::Standard,
        "premium" => CustomerTier::Premium,
        "vip" => CustomerTier::Vip,
        other => bail!("unknown tier {other:?}: standard, premium or vip"),
    })
}

/// `zh` / `en` / none.
pub fn language(name: Option<&str>) -> anyhow::Result<Language> {
    Ok(match name.map(str::to_ascii_lowercase).as_deref() {
        None => Language::Unspecified,
        Some("zh") => Language::Zh,
        Some("en") => Language::En,
        Some(other) => bail!("unknown language {other:?}: zh or en"),
    })
}
