//! `tandem agent`: an agent desk in the terminal.
//!
//! Opens the agent session with routing (online, heartbeats), prints offers with the full
//! handoff package, accepts or declines them, and for each assigned conversation watches the
//! agent view: customer messages and the bot's suggestions. Plain lines are replies to the
//! current conversation; commands start with `/` (`/help` lists them).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tandem_platform::auth::Role;
use tandem_proto::pb::common::v1::{ArticleRef, Entity, HandoffReason};
use tandem_proto::pb::dialog::v1::conversation_update::Update;
use tandem_proto::pb::dialog::v1::dialog_service_client::DialogServiceClient;
use tandem_proto::pb::dialog::v1::{
    BotAction, ConversationView, DecisionTrace, HandoffPackage, ListDecisionTracesRequest,
    PostAgentMessageRequest, ReviewSuggestionRequest, SenderKind, Suggestion, SuggestionOutcome,
    WatchConversationRequest,
};
use tandem_proto::pb::feedback::v1::feedback_service_client::FeedbackServiceClient;
use tandem_proto::pb::feedback::v1::{
    AgentReview, SubmitAgentReviewRequest, Verdict, agent_review,
};
use tandem_proto::pb::routing::v1::agent_session_request::Command;
use tandem_proto::pb::routing::v1::agent_session_response::Event;
use tandem_proto::pb::routing::v1::routing_service_client::RoutingServiceClient;
use tandem_proto::pb::routing::v1::{
    AgentSessionRequest, CompleteAssignmentRequest, Disposition, Offer, Presence, SessionAccept,
    SessionDecline, SessionHeartbeat, SessionHello, SessionSetPresence, SetPresenceRequest,
    TransferConversationRequest, TransferKind, TransferTarget, transfer_target,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::chat::state_name;
use crate::client::{
    Authed, Clients, Connection, Console, Input, describe, duration_words, new_key, parse_wait,
};

/// Options of `tandem agent`.
#[derive(clap::Args)]
pub struct Options {
    #[command(flatten)]
    connection: Connection,
    /// The agent's id (the token's subject), as registered with routing.
    #[arg(long)]
    agent: String,
    /// Accept every offer as it arrives.
    #[arg(long)]
    auto_accept: bool,
}

const HELP: &str = "lines you type go to the current conversation. Commands:
  /accept [offer]                 take an offer (the latest when none given)
  /decline [offer] [reason]       pass an offer on
  /list                           your conversations; /switch <conversation> changes the current one
  /context                        the handoff package of the current conversation again
  /trace                          the bot's decision traces of the current conversation
  /use [suggestion]               send the bot's suggestion as is (the latest when none given)
  /rate <suggestion|last> used|edited|rejected [reason]   rate a suggestion
  /review <message|last> correct|partial|wrong|harmful [corrected answer]   review a bot answer
  /transfer queue:<id>|agent:<id> [warm|cold] [note]      hand the conversation on
  /resolve [notes]                resolved: end the assignment
  /bot [notes]                    give the customer back to the bot
  /away, /online                  presence
  /wait <text> [secs]             wait until a line containing <text> is printed (for scripts)
  /sleep <millis>                 pause (for scripts)
  /quit                           go offline and leave";

/// One conversation the agent owns.
struct Assignment {
    ticket_id: String,
    conversation_id: String,
    package: Option<HandoffPackage>,
    watch: CancellationToken,
}

#[derive(Default)]
struct Desk {
    offers: Vec<Offer>,
    assignments: Vec<Assignment>,
    current: Option<String>,
    suggestions: HashMap<String, Suggestion>,
    last_suggestion: Option<String>,
    last_bot_message: HashMap<String, String>,
}

type SharedDesk = Arc<Mutex<Desk>>;

fn lock(desk: &SharedDesk) -> std::sync::MutexGuard<'_, Desk> {
    desk.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Context {
    agent: String,
    console: Console,
    desk: SharedDesk,
    session: mpsc::Sender<AgentSessionRequest>,
    dialog: DialogServiceClient<Authed>,
    routing: RoutingServiceClient<Authed>,
    feedback: FeedbackServiceClient<Authed>,
    stop: CancellationToken,
}

/// Runs the desk until `/quit` or the end of input.
pub async fn run(options: Options, env: HashMap<String, String>) -> anyhow::Result<()> {
    let clients = Clients::connect(&options.connection, &options.agent, Role::Agent, &env).await?;
    let console = Console::default();
    let desk = SharedDesk::default();
    let mut routing = RoutingServiceClient::new(clients.authed(&clients.routing));
    let (session, requests) = mpsc::channel(64);
    session
        .send(request(Command::Hello(SessionHello {
            client_version: format!("tandem-cli/{}", env!("CARGO_PKG_VERSION")),
            resume_session_id: String::new(),
            presence: Presence::Online as i32,
        })))
        .await
        .context("session closed")?;
    let mut events = routing
        .agent_session(ReceiverStream::new(requests))
        .await
        .map_err(|s| describe("opening the agent session", &s))?
        .into_inner();
    // The first event is the welcome, or the reason the session was refused.
    let welcome = match events.message().await {
        Ok(Some(response)) => match response.event {
            Some(Event::Welcome(welcome)) => welcome,
            Some(Event::Error(error)) => bail!("the session was refused: {}", error.message),
            _ => bail!("the session did not start with a welcome"),
        },
        Ok(None) => bail!("routing closed the session at once"),
        Err(status) => return Err(describe("opening the agent session", &status)),
    };
    let heartbeat = welcome
        .heartbeat_interval
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(10));
    let name = welcome
        .agent
        .as_ref()
        .map_or(options.agent.as_str(), |a| a.display_name.as_str())
        .to_owned();
    console.line(format!(
        "online as {} ({name}), session {}",
        options.agent, welcome.session_id
    ));
    console.line(HELP.lines().next().unwrap_or_default().to_owned() + " (/help for commands)");

    let stop = CancellationToken::new();
    let ctx = Arc::new(Context {
        agent: options.agent.clone(),
        console: console.clone(),
        desk: Arc::clone(&desk),
        session: session.clone(),
        dialog: DialogServiceClient::new(clients.authed(&clients.dialog)),
        routing: routing.clone(),
        feedback: FeedbackServiceClient::new(clients.authed(&clients.feedback)),
        stop: stop.clone(),
    });
    let beating = {
        let (session, stop) = (session.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {
                        if session.send(request(Command::Heartbeat(SessionHeartbeat {}))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        })
    };
    let listening = {
        let ctx = Arc::clone(&ctx);
        let auto_accept = options.auto_accept;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = ctx.stop.cancelled() => return Ok(()),
                    item = events.message() => match item {
                        Ok(Some(response)) => {
                            if let Some(event) = response.event {
                                on_event(&ctx, event, auto_accept).await;
                            }
                        }
                        Ok(None) => return Err(anyhow::anyhow!("routing closed the agent session")),
                        Err(status) => return Err(describe("the agent session", &status)),
                    },
                }
            }
        })
    };

    let mut input = Input::stdin();
    let mut result = loop {
        if listening.is_finished() {
            break Ok(());
        }
        let line = tokio::select! {
            line = input.next() => line?,
            () = stop.cancelled() => None,
        };
        let Some(line) = line else {
            break Ok(());
        };
        match handle_line(&ctx, &line).await {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(error) => break Err(error),
        }
    };
    // Leave cleanly: offline now rather than after the grace period.
    let _ = routing
        .set_presence(SetPresenceRequest {
            agent_id: String::new(),
            presence: Presence::Offline as i32,
            reason: "desk closed".into(),
        })
        .await;
    stop.cancel();
    for assignment in &lock(&desk).assignments {
        assignment.watch.cancel();
    }
    drop(session);
    let _ = beating.await;
    if let Ok(Err(error)) = listening.await
        && result.is_ok()
    {
        result = Err(error);
    }
    result
}

fn request(command: Command) -> AgentSessionRequest {
    AgentSessionRequest {
        request_id: new_key("req"),
        command: Some(command),
    }
}

async fn on_event(ctx: &Arc<Context>, event: Event, auto_accept: bool) {
    match event {
        Event::Offer(offer) => {
            let expires = offer
                .expires_at
                .as_ref()
                .map(|t| t.seconds - now_seconds())
                .unwrap_or_default()
                .max(0);
            let id = offer.id.clone();
            let package = offer.package.clone();
            let header = format!(
                "offer {}: conversation {} (attempt {}), expires in {}",
                offer.id,
                package.as_ref().map_or("?", |p| p.conversation_id.as_str()),
                offer.attempt,
                duration_words(expires)
            );
            // Stored before anything is printed, so a script reacting to the output can accept.
            lock(&ctx.desk).offers.push(offer);
            ctx.console.line(header);
            if let Some(package) = &package {
                print_package(&ctx.console, package);
            }
            if auto_accept {
                let _ = ctx
                    .session
                    .send(request(Command::Accept(SessionAccept { offer_id: id })))
                    .await;
            } else {
                ctx.console.line("  /accept to take it, /decline to pass");
            }
        }
        Event::OfferRevoked(revoked) => {
            lock(&ctx.desk).offers.retain(|o| o.id != revoked.offer_id);
            let reason = revoked_reason(revoked.reason);
            ctx.console
                .line(format!("offer {} withdrawn: {reason}", revoked.offer_id));
        }
        Event::AssignmentConfirmed(confirmed) => {
            let Some(ticket) = confirmed.ticket else {
                return;
            };
            let line = format!(
                "assigned: conversation {} (ticket {})",
                ticket.conversation_id, ticket.id
            );
            start_assignment(ctx, ticket.id, ticket.conversation_id, confirmed.package);
            ctx.console.line(line);
        }
        Event::TransferNote(note) => {
            let conversation = note
                .package
                .as_ref()
                .map(|p| p.conversation_id.clone())
                .unwrap_or_default();
            ctx.console.line(format!(
                "transfer from {} for conversation {conversation}: {}",
                note.from_agent_id,
                if note.note.is_empty() {
                    "(no note)"
                } else {
                    &note.note
                }
            ));
        }
        Event::Error(error) => ctx.console.line(format!("error: {}", error.message)),
        Event::Welcome(_) => {}
    }
}

fn start_assignment(
    ctx: &Arc<Context>,
    ticket_id: String,
    conversation_id: String,
    package: Option<HandoffPackage>,
) {
    let watch = ctx.stop.child_token();
    // Start the watch after the last message the package carries: whatever the customer wrote
    // while waiting or since the assignment is replayed, nothing is missed.
    let after = package
        .as_ref()
        .and_then(|p| p.transcript.as_ref())
        .map(|t| t.last_sequence.to_string())
        .unwrap_or_default();
    {
        let mut desk = lock(&ctx.desk);
        desk.offers.retain(|o| {
            o.handoff_id != ticket_id
                && o.package.as_ref().is_none_or(|p| p.handoff_id != ticket_id)
        });
        desk.assignments.retain(|a| a.ticket_id != ticket_id);
        desk.assignments.push(Assignment {
            ticket_id,
            conversation_id: conversation_id.clone(),
            package,
            watch: watch.clone(),
        });
        desk.current = Some(conversation_id.clone());
    }
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move { watch_conversation(ctx, conversation_id, after, watch).await });
}

async fn watch_conversation(
    ctx: Arc<Context>,
    conversation_id: String,
    after: String,
    stop: CancellationToken,
) {
    let mut dialog = ctx.dialog.clone();
    let mut cursor = after;
    let mut attempts = 0;
    let mut announced = false;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let stream = dialog
            .watch_conversation(WatchConversationRequest {
                conversation_id: conversation_id.clone(),
                view: ConversationView::Agent as i32,
                resume_after: cursor.clone(),
            })
            .await;
        let mut stream = match stream {
            Ok(response) => {
                attempts = 0;
                if !announced {
                    // Dialog knows the agent owns it now: replies will be accepted.
                    announced = true;
                    ctx.console.line(format!(
                        "current conversation: {conversation_id} (type to reply)"
                    ));
                }
                response.into_inner()
            }
            Err(status) => {
                // Dialog learns of the assignment from routing's event; give it a moment.
                attempts += 1;
                if attempts > 100 || status.code() != Code::PermissionDenied {
                    ctx.console.line(format!(
                        "error: {}",
                        describe(&format!("watching {conversation_id}"), &status)
                    ));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                item = stream.message() => match item {
                    Ok(Some(response)) => {
                        if let Some(update) = response.update {
                            cursor.clone_from(&update.cursor);
                            show_update(&ctx, &conversation_id, update.update);
                        }
                    }
                    Ok(None) | Err(_) => break,
                },
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn show_update(ctx: &Context, conversation_id: &str, update: Option<Update>) {
    let tag = short(conversation_id);
    match update {
        Some(Update::MessagePosted(message)) => {
            match SenderKind::try_from(message.sender_kind).unwrap_or_default() {
                SenderKind::Customer => ctx
                    .console
                    .line(format!("[{tag}] customer: {}", message.text)),
                SenderKind::Bot => {
                    lock(&ctx.desk)
                        .last_bot_message
                        .insert(conversation_id.to_owned(), message.id.clone());
                    ctx.console.line(format!("[{tag}] bot: {}", message.text));
                }
                SenderKind::Agent if message.sender_id != ctx.agent => ctx.console.line(format!(
                    "[{tag}] agent {}: {}",
                    message.sender_id, message.text
                )),
                SenderKind::System => ctx
                    .console
                    .line(format!("[{tag}] system: {}", message.text)),
                SenderKind::Agent | SenderKind::Unspecified => {}
            }
        }
        Some(Update::Suggestion(suggestion)) => {
            let mut line = format!(
                "[{tag}] suggestion {}: {} (confidence {:.2}",
                suggestion.id, suggestion.text, suggestion.confidence
            );
            for article in &suggestion.articles {
                let _ = write!(line, "; {} v{}", article.title, article.version);
            }
            line.push_str(") — /use, or /rate last used|edited|rejected");
            {
                let mut desk = lock(&ctx.desk);
                desk.last_suggestion = Some(suggestion.id.clone());
                desk.suggestions.insert(suggestion.id.clone(), suggestion);
            }
            ctx.console.line(line);
        }
        Some(Update::StateChanged(change)) => {
            ctx.console.line(format!(
                "[{tag}] state: {} -> {}",
                state_name(change.from_state),
                state_name(change.to_state)
            ));
        }
        Some(Update::Typing(typing))
            if typing.typing && typing.sender_kind == SenderKind::Customer as i32 =>
        {
            ctx.console.line(format!("[{tag}] customer is typing…"));
        }
        Some(Update::QueueUpdated(_) | Update::Typing(_)) | None => {}
    }
}

/// Handles one input line; false ends the desk.
async fn handle_line(ctx: &Arc<Context>, line: &str) -> anyhow::Result<bool> {
    if line.is_empty() {
        return Ok(true);
    }
    let Some(command) = line.strip_prefix('/') else {
        let Some(conversation_id) = lock(&ctx.desk).current.clone() else {
            ctx.console
                .line("error: no current conversation; accept an offer first");
            return Ok(true);
        };
        let result = ctx
            .dialog
            .clone()
            .post_agent_message(PostAgentMessageRequest {
                conversation_id,
                client_message_id: new_key("agent-msg"),
                text: line.to_owned(),
                attachments: Vec::new(),
                suggestion_id: String::new(),
            })
            .await;
        report(ctx, "sending the reply", result.map(|_| ()))?;
        return Ok(true);
    };
    let (name, rest) = command.split_once(' ').unwrap_or((command, ""));
    let rest = rest.trim();
    match name {
        "help" => HELP.lines().for_each(|l| ctx.console.line(l)),
        "quit" | "exit" => return Ok(false),
        "wait" => {
            let (text, limit) = parse_wait(rest)?;
            ctx.console.wait_for(&text, limit).await?;
        }
        "sleep" => {
            let millis: u64 = rest.parse().context("usage: /sleep <millis>")?;
            tokio::time::sleep(Duration::from_millis(millis.min(600_000))).await;
        }
        "accept" | "decline" => {
            let (offer, reason) = rest.split_once(' ').unwrap_or((rest, ""));
            let offer_id = if offer.is_empty() {
                lock(&ctx.desk).offers.last().map(|o| o.id.clone())
            } else {
                Some(offer.to_owned())
            };
            let Some(offer_id) = offer_id else {
                ctx.console.line("error: no offer waiting");
                return Ok(true);
            };
            let command = if name == "accept" {
                Command::Accept(SessionAccept { offer_id })
            } else {
                lock(&ctx.desk).offers.retain(|o| o.id != offer_id);
                Command::Decline(SessionDecline {
                    offer_id,
                    reason: reason.to_owned(),
                })
            };
            ctx.session
                .send(request(command))
                .await
                .context("the agent session is closed")?;
        }
        "list" => {
            let desk = lock(&ctx.desk);
            if desk.assignments.is_empty() {
                ctx.console.line("no conversations");
            }
            for a in &desk.assignments {
                let mark = if desk.current.as_deref() == Some(&a.conversation_id) {
                    "*"
                } else {
                    " "
                };
                ctx.console.line(format!(
                    "{mark} conversation {} (ticket {})",
                    a.conversation_id, a.ticket_id
                ));
            }
        }
        "switch" => {
            let mut desk = lock(&ctx.desk);
            if desk.assignments.iter().any(|a| a.conversation_id == rest) {
                desk.current = Some(rest.to_owned());
                ctx.console.line(format!("current conversation: {rest}"));
            } else {
                ctx.console
                    .line(format!("error: {rest:?} is not one of your conversations"));
            }
        }
        "context" => match current(ctx) {
            Some(a) => match a.2 {
                Some(package) => print_package(&ctx.console, &package),
                None => ctx.console.line("no handoff package for this conversation"),
            },
            None => ctx.console.line("error: no current conversation"),
        },
        "trace" => {
            let Some((_, conversation_id, _)) = current(ctx) else {
                ctx.console.line("error: no current conversation");
                return Ok(true);
            };
            let result = ctx
                .dialog
                .clone()
                .list_decision_traces(ListDecisionTracesRequest {
                    conversation_id,
                    page: None,
                })
                .await;
            match result {
                Ok(response) => {
                    let traces = response.into_inner().traces;
                    if traces.is_empty() {
                        ctx.console.line("no decision traces");
                    }
                    for trace in &traces {
                        print_trace(&ctx.console, trace);
                    }
                }
                Err(status) => report(ctx, "reading decision traces", Err(status))?,
            }
        }
        "use" => {
            let (id, suggestion) = {
                let desk = lock(&ctx.desk);
                let id = if rest.is_empty() || rest == "last" {
                    desk.last_suggestion.clone()
                } else {
                    Some(rest.to_owned())
                };
                let suggestion = id.as_ref().and_then(|id| desk.suggestions.get(id).cloned());
                (id, suggestion)
            };
            let Some(suggestion) = suggestion else {
                ctx.console.line(format!(
                    "error: no suggestion {}",
                    id.unwrap_or_else(|| "yet".into())
                ));
                return Ok(true);
            };
            let result = ctx
                .dialog
                .clone()
                .post_agent_message(PostAgentMessageRequest {
                    conversation_id: suggestion.conversation_id.clone(),
                    client_message_id: new_key("agent-msg"),
                    text: suggestion.text.clone(),
                    attachments: Vec::new(),
                    suggestion_id: suggestion.id.clone(),
                })
                .await;
            if result.is_ok() {
                ctx.console
                    .line(format!("sent suggestion {}", suggestion.id));
            }
            report(ctx, "sending the suggestion", result.map(|_| ()))?;
        }
        "rate" => {
            let mut words = rest.splitn(3, ' ');
            let (id, outcome, reason) = (
                words.next().unwrap_or_default(),
                words.next().unwrap_or_default(),
                words.next().unwrap_or_default(),
            );
            let id = if id == "last" || id.is_empty() {
                lock(&ctx.desk).last_suggestion.clone().unwrap_or_default()
            } else {
                id.to_owned()
            };
            let outcome = match outcome {
                "used" => SuggestionOutcome::Used,
                "edited" => SuggestionOutcome::Edited,
                "rejected" => SuggestionOutcome::Rejected,
                _ => {
                    ctx.console
                        .line("usage: /rate <suggestion|last> used|edited|rejected [reason]");
                    return Ok(true);
                }
            };
            let result = ctx
                .dialog
                .clone()
                .review_suggestion(ReviewSuggestionRequest {
                    suggestion_id: id.clone(),
                    outcome: outcome as i32,
                    edited_text: String::new(),
                    reason: reason.to_owned(),
                })
                .await;
            if result.is_ok() {
                ctx.console.line(format!(
                    "rated suggestion {id}: {}",
                    outcome
                        .as_str_name()
                        .trim_start_matches("SUGGESTION_OUTCOME_")
                ));
            }
            report(ctx, "rating the suggestion", result.map(|_| ()))?;
        }
        "review" => review(ctx, rest).await?,
        "transfer" => transfer(ctx, rest).await?,
        "resolve" | "bot" => {
            let Some((ticket_id, conversation_id, _)) = current(ctx) else {
                ctx.console.line("error: no current conversation");
                return Ok(true);
            };
            let disposition = if name == "resolve" {
                Disposition::Resolved
            } else {
                Disposition::ReturnToBot
            };
            let result = ctx
                .routing
                .clone()
                .complete_assignment(CompleteAssignmentRequest {
                    ticket_id: ticket_id.clone(),
                    disposition: disposition as i32,
                    notes: rest.to_owned(),
                })
                .await;
            if result.is_ok() {
                finish(ctx, &ticket_id);
                ctx.console.line(format!(
                    "{} conversation {conversation_id}",
                    if name == "resolve" {
                        "resolved"
                    } else {
                        "returned to the bot:"
                    }
                ));
            }
            report(ctx, "ending the assignment", result.map(|_| ()))?;
        }
        "away" | "online" => {
            let presence = if name == "away" {
                Presence::Away
            } else {
                Presence::Online
            };
            ctx.session
                .send(request(Command::SetPresence(SessionSetPresence {
                    presence: presence as i32,
                    reason: rest.to_owned(),
                })))
                .await
                .context("the agent session is closed")?;
            ctx.console.line(format!("presence: {name}"));
        }
        other => ctx
            .console
            .line(format!("error: unknown command /{other}; /help lists them")),
    }
    Ok(true)
}

/// The current assignment: ticket, conversation, package.
fn current(ctx: &Context) -> Option<(String, String, Option<HandoffPackage>)> {
    let desk = lock(&ctx.desk);
    let id = desk.current.as_ref()?;
    desk.assignments
        .iter()
        .find(|a| &a.conversation_id == id)
        .map(|a| {
            (
                a.ticket_id.clone(),
                a.conversation_id.clone(),
                a.package.clone(),
            )
        })
}

fn finish(ctx: &Context, ticket_id: &str) {
    let mut desk = lock(&ctx.desk);
    if let Some(a) = desk.assignments.iter().find(|a| a.ticket_id == ticket_id) {
        a.watch.cancel();
    }
    desk.assignments.retain(|a| a.ticket_id != ticket_id);
    desk.current = desk.assignments.last().map(|a| a.conversation_id.clone());
}

async fn review(ctx: &Context, rest: &str) -> anyhow::Result<()> {
    let mut words = rest.splitn(3, ' ');
    let (target, verdict, corrected) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
    );
    let Some((_, conversation_id, _)) = current(ctx) else {
        ctx.console.line("error: no current conversation");
        return Ok(());
    };
    let message_id = if target == "last" || target.is_empty() {
        lock(&ctx.desk)
            .last_bot_message
            .get(&conversation_id)
            .cloned()
            .or_else(|| {
                // The bot's answers before the handoff are in the package.
                current(ctx).and_then(|(_, _, p)| {
                    p?.recent_messages
                        .iter()
                        .rev()
                        .find(|m| {
                            m.sender_kind == SenderKind::Bot as i32
                                && m.bot_action == BotAction::Answer as i32
                        })
                        .map(|m| m.id.clone())
                })
            })
    } else {
        Some(target.to_owned())
    };
    let Some(message_id) = message_id else {
        ctx.console.line("error: no bot answer to review");
        return Ok(());
    };
    let verdict = match verdict {
        "correct" => Verdict::Correct,
        "partial" => Verdict::PartiallyCorrect,
        "wrong" => Verdict::Wrong,
        "harmful" => Verdict::Harmful,
        _ => {
            ctx.console.line(
                "usage: /review <message|last> correct|partial|wrong|harmful [corrected answer]",
            );
            return Ok(());
        }
    };
    let result = ctx
        .feedback
        .clone()
        .submit_agent_review(SubmitAgentReviewRequest {
            review: Some(AgentReview {
                conversation_id,
                target: Some(agent_review::Target::MessageId(message_id.clone())),
                verdict: verdict as i32,
                corrected_answer: corrected.to_owned(),
                ..AgentReview::default()
            }),
        })
        .await;
    if result.is_ok() {
        ctx.console.line(format!(
            "reviewed bot message {message_id}: {}",
            verdict.as_str_name().trim_start_matches("VERDICT_")
        ));
    }
    report(ctx, "reviewing the answer", result.map(|_| ()))
}

async fn transfer(ctx: &Context, rest: &str) -> anyhow::Result<()> {
    let mut words = rest.splitn(2, ' ');
    let target = words.next().unwrap_or_default();
    let mut rest = words.next().unwrap_or_default().trim();
    let kind = if let Some(note) = rest.strip_prefix("cold") {
        rest = note.trim();
        TransferKind::Cold
    } else {
        rest = rest.strip_prefix("warm").unwrap_or(rest).trim();
        TransferKind::Warm
    };
    let target = match target.split_once(':') {
        Some(("queue", id)) if !id.is_empty() => transfer_target::Target::QueueId(id.to_owned()),
        Some(("agent", id)) if !id.is_empty() => transfer_target::Target::AgentId(id.to_owned()),
        _ => {
            ctx.console
                .line("usage: /transfer queue:<id>|agent:<id> [warm|cold] [note]");
            return Ok(());
        }
    };
    let Some((ticket_id, conversation_id, _)) = current(ctx) else {
        ctx.console.line("error: no current conversation");
        return Ok(());
    };
    let result = ctx
        .routing
        .clone()
        .transfer_conversation(TransferConversationRequest {
            ticket_id: ticket_id.clone(),
            kind: kind as i32,
            target: Some(TransferTarget {
                target: Some(target),
            }),
            note: rest.to_owned(),
        })
        .await;
    if result.is_ok() {
        if kind == TransferKind::Cold {
            finish(ctx, &ticket_id);
        }
        ctx.console.line(format!(
            "transfer of {conversation_id} started ({})",
            if kind == TransferKind::Cold {
                "cold"
            } else {
                "warm: you keep it until it is accepted"
            }
        ));
    }
    report(ctx, "transferring", result.map(|_| ()))
}

/// Prints a refused request and goes on, or ends the desk when it cannot go on.
fn report(ctx: &Context, what: &str, result: Result<(), tonic::Status>) -> anyhow::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(status) if matches!(status.code(), Code::Unauthenticated | Code::Unavailable) => {
            Err(describe(what, &status))
        }
        Err(status) => {
            ctx.console
                .line(format!("error: {}", describe(what, &status)));
            Ok(())
        }
    }
}

fn print_package(console: &Console, p: &HandoffPackage) {
    if let Some(customer) = &p.customer {
        console.line(format!(
            "  customer:  {} ({}, {})",
            if customer.display_name.is_empty() {
                &customer.id
            } else {
                &customer.display_name
            },
            customer.id,
            strip(
                tandem_proto::pb::common::v1::CustomerTier::try_from(customer.tier)
                    .unwrap_or_default()
                    .as_str_name(),
                "CUSTOMER_TIER_"
            ),
        ));
    }
    if let Some(trigger) = &p.trigger {
        console.line(format!(
            "  why:       {} (rule {}): {}",
            strip(
                HandoffReason::try_from(trigger.reason)
                    .unwrap_or_default()
                    .as_str_name(),
                "HANDOFF_REASON_"
            ),
            trigger.rule_id,
            trigger.explanation
        ));
    }
    console.line(format!(
        "  scenario:  {} (policy v{}), language {}, priority {}, queue {}",
        p.scenario_id,
        p.policy_version,
        strip(
            tandem_proto::pb::common::v1::Language::try_from(p.language)
                .unwrap_or_default()
                .as_str_name(),
            "LANGUAGE_"
        ),
        p.priority,
        if p.queue_id.is_empty() {
            "(by scenario)"
        } else {
            &p.queue_id
        }
    ));
    if !p.required_skills.is_empty() {
        let skills: Vec<String> = p
            .required_skills
            .iter()
            .map(|s| format!("{}:{}", s.name, s.min_level))
            .collect();
        console.line(format!("  skills:    {}", skills.join(", ")));
    }
    for (i, sentence) in p.summary.iter().enumerate() {
        let label = if i == 0 { "summary:" } else { "" };
        console.line(format!("  {label:<10} - {sentence}"));
    }
    if !p.entities.is_empty() {
        console.line(format!("  entities:  {}", entities(&p.entities)));
    }
    if !p.intents_tried.is_empty() {
        let intents: Vec<String> = p
            .intents_tried
            .iter()
            .map(|a| {
                format!(
                    "turn {} {} {:.2} {}",
                    a.turn_index + 1,
                    a.intent,
                    a.confidence,
                    strip(
                        BotAction::try_from(a.action)
                            .unwrap_or_default()
                            .as_str_name(),
                        "BOT_ACTION_"
                    )
                )
            })
            .collect();
        console.line(format!("  intents:   {}", intents.join("; ")));
    }
    if !p.sentiment_trajectory.is_empty() {
        let points: Vec<String> = p
            .sentiment_trajectory
            .iter()
            .map(|s| format!("{:+.2}", s.sentiment.as_ref().map_or(0.0, |s| s.score)))
            .collect();
        console.line(format!("  sentiment: {}", points.join(" → ")));
    }
    if !p.articles_used.is_empty() {
        console.line(format!("  articles:  {}", articles(&p.articles_used)));
    }
    console.line("  messages:");
    for m in &p.recent_messages {
        let who = match SenderKind::try_from(m.sender_kind).unwrap_or_default() {
            SenderKind::Customer => "customer".to_owned(),
            SenderKind::Bot => "bot".to_owned(),
            SenderKind::Agent => format!("agent {}", m.sender_id),
            SenderKind::System | SenderKind::Unspecified => "system".to_owned(),
        };
        console.line(format!("    {who}: {}", indent(&m.text, "      ")));
    }
    if !p.decision_trace_id.is_empty() {
        console.line(format!(
            "  trace:     {} (/trace after accepting shows every turn)",
            p.decision_trace_id
        ));
    }
}

fn print_trace(console: &Console, t: &DecisionTrace) {
    let intents: Vec<String> = t
        .intent_scores
        .iter()
        .take(3)
        .map(|i| format!("{} {:.2}", i.intent, i.confidence))
        .collect();
    let sentiment = t.sentiment.as_ref().map_or(0.0, |s| s.score);
    let (rule, policy) = t.policy_decision.as_ref().map_or(("-".to_owned(), 0), |d| {
        (d.rule_id.clone(), d.policy_version)
    });
    console.line(format!(
        "trace turn {}: \"{}\" → {} by rule {} (scenario {}, policy v{})",
        t.turn_index + 1,
        t.normalized_text,
        strip(
            BotAction::try_from(t.action)
                .unwrap_or_default()
                .as_str_name(),
            "BOT_ACTION_"
        ),
        rule,
        t.scenario_id,
        policy
    ));
    console.line(format!(
        "  intents {}; out-of-scope {:.2}; sentiment {sentiment:+.2} (trend {:+.2}); complexity {:.2}; {} µs",
        if intents.is_empty() {
            "-".to_owned()
        } else {
            intents.join(", ")
        },
        t.out_of_scope_score,
        t.sentiment_trend,
        t.complexity.as_ref().map_or(0.0, |c| c.score),
        t.total_micros
    ));
    if !t.entities.is_empty() {
        console.line(format!("  entities {}", entities(&t.entities)));
    }
    if !t.articles.is_empty() {
        console.line(format!("  articles {}", articles(&t.articles)));
    }
    if let Some(human) = &t.human_request
        && human.detected
    {
        console.line(format!("  asked for a human: {:?}", human.matched_phrase));
    }
}

fn entities(entities: &[Entity]) -> String {
    entities
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                strip(
                    tandem_proto::pb::common::v1::EntityKind::try_from(e.kind)
                        .unwrap_or_default()
                        .as_str_name(),
                    "ENTITY_KIND_"
                )
                .to_ascii_lowercase(),
                if e.normalized.is_empty() {
                    &e.text
                } else {
                    &e.normalized
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn articles(articles: &[ArticleRef]) -> String {
    articles
        .iter()
        .map(|a| format!("{} ({} v{})", a.title, a.article_id, a.version))
        .collect::<Vec<_>>()
        .join(", ")
}

fn revoked_reason(reason: i32) -> &'static str {
    use tandem_proto::pb::routing::v1::OfferRevokedReason as R;
    match R::try_from(reason).unwrap_or_default() {
        R::Timeout => "not accepted in time",
        R::Taken => "taken by someone else",
        R::CustomerLeft => "the customer left",
        R::Cancelled => "the customer cancelled",
        R::Unspecified => "withdrawn",
    }
}

/// Continuation lines of a multi-line text, indented under its first line.
fn indent(text: &str, by: &str) -> String {
    text.trim_end().replace('\n', &format!("\n{by}"))
}

fn strip<'a>(name: &'a str, prefix: &str) -> &'a str {
    name.strip_prefix(prefix).unwrap_or(name)
}

fn short(id: &str) -> &str {
    let start = id.len().saturating_sub(6);
    id.get(start..).unwrap_or(id)
}

fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
