//! Use cases of the dialog service: the conversation's lifecycle, the bot's turn, handoff,
//! suggestions, routing's feedback and the per-tenant intent models.
//!
//! Each use case reads what it needs, computes the change, and writes it with one
//! [`Store::commit`]; when the conversation changed in between (another replica or request), the
//! whole use case runs again on the fresh state, up to a few times, then answers `ABORTED`.
//! After a commit the updates are published to this replica's watchers ([`Hub`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use tandem_nlu::{Analyzer, ConversationSignals, TurnAnalysis};
use tandem_platform::bus::RawEvent;
use tandem_platform::error::{ErrorCode, ServiceError};
use tandem_platform::outbox::OutboxWaker;
use tandem_policy_client::{Catalogue, Entry};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::dialog::v1 as pb;
use tandem_proto::pb::policy::v1 as policy;
use tandem_proto::pb::routing::v1 as routing;
use tokio::sync::broadcast;
use tonic::metadata::AsciiMetadataValue;

use crate::knowledge::{self as kb, KnowledgeClient};
use crate::nlu::{self, Texts};
use crate::store::{Change, Committed, Store, StoreError};

/// Longest accepted message text, in characters.
pub const MAX_TEXT_CHARS: usize = 4_000;
/// Longest idempotency key, in characters.
pub const MAX_CLIENT_ID_CHARS: usize = 128;
const ATTEMPTS: usize = 4;
/// How many of a conversation's last bot turns a new turn reads: the sentiment trend, the
/// fallbacks in a row and the handoff package (intents tried, sentiment trajectory, entities and
/// articles) all come from them, so a turn costs the same in a long conversation as in a short
/// one.
const RECENT_TURNS: i64 = 50;

/// Why a use case failed.
#[derive(Debug, thiserror::Error)]
pub enum DialogError {
    /// Bad input.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Unknown entity for this tenant.
    #[error("{0} not found")]
    NotFound(String),
    /// Wrong state.
    #[error("{0}")]
    Precondition(String),
    /// The caller may not do this.
    #[error("{0}")]
    Denied(String),
    /// The key of the entity to create is taken by another.
    #[error("{0}")]
    Conflict(String),
    /// Lost a race too often.
    #[error("the conversation changed concurrently; retry")]
    Aborted,
    /// Training failed.
    #[error("training failed: {0}")]
    Training(String),
    /// Storage failed.
    #[error("storage failed")]
    Store(#[source] StoreError),
    /// An invariant does not hold (a bug); the detail is logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for DialogError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Self::Aborted,
            other => Self::Store(other),
        }
    }
}

impl ServiceError for DialogError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Precondition(_) | Self::Training(_) => ErrorCode::FailedPrecondition,
            Self::Denied(_) => ErrorCode::PermissionDenied,
            Self::Conflict(_) => ErrorCode::AlreadyExists,
            Self::Aborted => ErrorCode::Aborted,
            Self::Store(_) | Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// Result of the use cases.
pub type DialogResult<T> = Result<T, DialogError>;

/// Who calls.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Token subject.
    pub id: String,
    /// Has the agent role (and no channel or service role).
    pub agent: bool,
    /// Has the supervisor or admin role.
    pub supervisor: bool,
}

/// Checks a message text: 1..=4,000 characters after trimming, no control characters other
/// than line breaks and tabs.
pub fn check_text(field: &str, text: &str) -> DialogResult<()> {
    if text.trim().is_empty() {
        return Err(DialogError::Invalid(format!("{field} is empty")));
    }
    let n = text.chars().count();
    if n > MAX_TEXT_CHARS {
        return Err(DialogError::Invalid(format!(
            "{field} has {n} characters, more than {MAX_TEXT_CHARS}"
        )));
    }
    reject_controls(field, text, true)
}

/// Refuses control characters; with `breaks`, line breaks and tabs are allowed.
fn reject_controls(field: &str, text: &str, breaks: bool) -> DialogResult<()> {
    if let Some(c) = text
        .chars()
        .find(|c| c.is_control() && !(breaks && matches!(c, '\n' | '\r' | '\t')))
    {
        return Err(DialogError::Invalid(format!(
            "{field} contains the control character U+{:04X}",
            u32::from(c)
        )));
    }
    Ok(())
}

/// Checks an optional free text (a note, a reason): at most `max` characters, no control
/// characters other than line breaks and tabs.
pub(crate) fn check_note(field: &str, text: &str, max: usize) -> DialogResult<()> {
    check_len(field, text, max)?;
    reject_controls(field, text, true)
}

/// Checks an optional one-line value (a name, an id, an address): at most `max` characters, no
/// control characters at all.
fn check_line(field: &str, text: &str, max: usize) -> DialogResult<()> {
    check_len(field, text, max)?;
    reject_controls(field, text, false)
}

/// Checks a media type: `type/subtype`, each 1..=127 characters of letters, digits and
/// `!#$&^_.+-` starting with a letter or digit (RFC 6838), without parameters.
fn check_media_type(field: &str, media_type: &str) -> DialogResult<()> {
    let part = |p: &str| {
        (1..=127).contains(&p.len())
            && p.starts_with(|c: char| c.is_ascii_alphanumeric())
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "!#$&^_.+-".contains(c))
    };
    match media_type.split_once('/') {
        Some((t, sub)) if part(t) && part(sub) => Ok(()),
        _ => Err(DialogError::Invalid(format!(
            "{field} must be a media type like image/png, got {:?}",
            media_type.chars().take(64).collect::<String>()
        ))),
    }
}

/// Checks an idempotency key.
pub fn check_client_id(field: &str, id: &str) -> DialogResult<()> {
    let n = id.chars().count();
    if n == 0 || n > MAX_CLIENT_ID_CHARS || id.chars().any(char::is_control) {
        return Err(DialogError::Invalid(format!(
            "{field} must have 1..={MAX_CLIENT_ID_CHARS} characters without control characters"
        )));
    }
    Ok(())
}

fn check_len(field: &str, text: &str, max: usize) -> DialogResult<()> {
    let n = text.chars().count();
    if n > max {
        return Err(DialogError::Invalid(format!(
            "{field} has {n} characters, more than {max}"
        )));
    }
    Ok(())
}

/// Refuses an enum value this version does not know (zero, unspecified, is accepted).
fn check_enum<E: TryFrom<i32>>(field: &str, value: i32) -> DialogResult<()> {
    if E::try_from(value).is_err() {
        return Err(DialogError::Invalid(format!(
            "{field} is {value}, not a known value"
        )));
    }
    Ok(())
}

fn check_attachments(attachments: &[pb::Attachment]) -> DialogResult<()> {
    if attachments.len() > 10 {
        return Err(DialogError::Invalid(format!(
            "attachments: {} given, at most 10",
            attachments.len()
        )));
    }
    for (i, a) in attachments.iter().enumerate() {
        check_line(&format!("attachments[{i}].file_name"), &a.file_name, 255)?;
        check_media_type(&format!("attachments[{i}].media_type"), &a.media_type)?;
        check_line(&format!("attachments[{i}].url"), &a.url, 2_048)?;
        if a.size_bytes < 0 {
            return Err(DialogError::Invalid(format!(
                "attachments[{i}].size_bytes is negative"
            )));
        }
    }
    Ok(())
}

/// Current time as a protobuf timestamp.
pub fn now() -> prost_types::Timestamp {
    let t = chrono::Utc::now();
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn state_of(c: &pb::Conversation) -> pb::ConversationState {
    pb::ConversationState::try_from(c.state).unwrap_or(pb::ConversationState::Unspecified)
}

fn is_zh(c: &pb::Conversation) -> bool {
    c.language != common::Language::En as i32
}

/// The answer to a start whose `client_conversation_id` names an existing conversation: that
/// conversation, unless it belongs to another customer, whose transcript the caller must not get.
fn replayed(
    existing: pb::Conversation,
    customer_id: &str,
) -> DialogResult<pb::StartConversationResponse> {
    let owner = existing.customer.as_ref().map_or("", |c| c.id.as_str());
    if owner != customer_id {
        return Err(DialogError::Conflict(format!(
            "client_conversation_id {} belongs to a conversation of another customer",
            existing.client_conversation_id
        )));
    }
    Ok(pb::StartConversationResponse {
        conversation: Some(existing),
        created: false,
    })
}

/// Refuses an empty conversation id.
fn check_conversation_id(id: &str) -> DialogResult<()> {
    if id.is_empty() {
        return Err(DialogError::Invalid("conversation_id is empty".into()));
    }
    Ok(())
}

/// One update and whether only the agent view sees it.
#[derive(Debug, Clone)]
pub struct Broadcast {
    /// The update.
    pub update: pb::ConversationUpdate,
    /// Only for the agent view (suggestions).
    pub agent_only: bool,
}

/// In-process fan-out of conversation updates to the watchers connected to this replica.
#[derive(Debug, Default)]
pub struct Hub {
    channels: Mutex<HashMap<(TenantId, String), broadcast::Sender<Broadcast>>>,
    /// Where updates for the other replicas' watchers go, when there are other replicas.
    forward: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Forward>>,
}

/// Updates of one conversation for the watchers on other replicas ([`Hub::forward_to`]).
#[derive(Debug)]
pub struct Forward {
    /// The tenant.
    pub tenant: TenantId,
    /// The conversation.
    pub conversation_id: String,
    /// The updates.
    pub updates: Vec<Broadcast>,
}

/// Whether an update reaches other replicas only by the live path: messages and suggestions
/// travel as events through the outbox (and are relayed from there); state changes, queue
/// updates and typing have no event of their own.
fn travels_live(update: &pb::ConversationUpdate) -> bool {
    matches!(
        update.update,
        Some(
            pb::conversation_update::Update::StateChanged(_)
                | pb::conversation_update::Update::QueueUpdated(_)
                | pb::conversation_update::Update::Typing(_)
        )
    )
}

impl Hub {
    /// Subscribes to a conversation's updates.
    pub fn subscribe(&self, tenant: &TenantId, id: &str) -> broadcast::Receiver<Broadcast> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((tenant.clone(), id.to_owned()))
            .or_insert_with(|| broadcast::channel(256).0)
            .subscribe()
    }

    /// Drops a conversation's channel when nobody listens any more (a watch refused after it
    /// subscribed).
    pub fn release(&self, tenant: &TenantId, id: &str) {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant.clone(), id.to_owned());
        if map.get(&key).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(&key);
        }
    }

    /// Whether a watcher on this replica follows the conversation.
    pub fn watched(&self, tenant: &TenantId, id: &str) -> bool {
        let map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(tenant.clone(), id.to_owned()))
            .is_some_and(|tx| tx.receiver_count() > 0)
    }

    /// From now on, hands the updates published here that have no event of their own (state
    /// changes, queue updates, typing) to `forward`, for the watchers on other replicas. Set
    /// once; later calls change nothing.
    pub fn forward_to(&self, forward: tokio::sync::mpsc::UnboundedSender<Forward>) {
        let _ = self.forward.set(forward);
    }

    /// Publishes updates made on this replica to its watchers and, when set, forwards those
    /// with no event of their own to the other replicas ([`Hub::forward_to`]).
    pub fn publish(&self, tenant: &TenantId, id: &str, updates: Vec<Broadcast>) {
        if let Some(forward) = self.forward.get() {
            let live: Vec<Broadcast> = updates
                .iter()
                .filter(|b| travels_live(&b.update))
                .cloned()
                .collect();
            if !live.is_empty() {
                let _ = forward.send(Forward {
                    tenant: tenant.clone(),
                    conversation_id: id.to_owned(),
                    updates: live,
                });
            }
        }
        self.deliver(tenant, id, updates);
    }

    /// Hands updates to this replica's watchers only (updates that came from other replicas);
    /// drops the channel when nobody listens.
    pub fn deliver(&self, tenant: &TenantId, id: &str, updates: Vec<Broadcast>) {
        if updates.is_empty() {
            return;
        }
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant.clone(), id.to_owned());
        if let Some(tx) = map.get(&key) {
            if tx.receiver_count() == 0 {
                map.remove(&key);
                return;
            }
            for u in updates {
                let _ = tx.send(u);
            }
        }
    }
}

/// Cursor of an update: the conversation's last message sequence when it happened.
fn update(sequence: i64, update: pb::conversation_update::Update, agent_only: bool) -> Broadcast {
    Broadcast {
        update: pb::ConversationUpdate {
            cursor: sequence.to_string(),
            occurred_at: Some(now()),
            update: Some(update),
        },
        agent_only,
    }
}

/// A tenant's language understanding: the analyser with the active model.
struct TenantNlu {
    analyzer: Arc<Analyzer>,
    model_version_id: String,
}

/// Options of the application.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// How long a tenant's catalogue and model are reused before being read again.
    pub cache_ttl: Duration,
    /// The knowledge search client; `None` answers with the intents' stored answers only.
    pub knowledge: Option<Arc<KnowledgeClient>>,
    /// How far back a new conversation counts the customer's earlier ones; zero counts none.
    pub repeat_contact_window: Duration,
    /// How long a queue's last reported statistics inform policy decisions.
    pub queue_stats_max_age: Duration,
}

/// The dialog application.
pub struct App {
    store: Store,
    outbox: OutboxWaker,
    /// Watchers of this replica.
    pub hub: Hub,
    options: AppOptions,
    nlu: Mutex<HashMap<TenantId, (Instant, Arc<TenantNlu>)>>,
    catalogues: Mutex<HashMap<TenantId, (Instant, Arc<Catalogue>)>>,
    queues: Mutex<HashMap<TenantId, (Instant, QueueStats)>>,
}

/// The last statistics reported of each of a tenant's queues.
type QueueStats = Arc<Vec<routing::QueueStatsReported>>;

/// Data of one customer turn gathered before deciding.
struct TurnInput<'a> {
    tenant: &'a TenantId,
    conversation: &'a pb::Conversation,
    received: Instant,
    received_at: prost_types::Timestamp,
    authorization: Option<&'a AsciiMetadataValue>,
    /// This message reopens a resolved conversation.
    reopened: bool,
}

/// What the bot's turn produced.
struct TurnOutput {
    bot_turn: pb::BotTurn,
    messages: Vec<pb::Message>,
    trace: pb::DecisionTrace,
    suggestion: Option<pb::Suggestion>,
    handoff: Option<pb::HandoffPackage>,
    conversation: pb::Conversation,
}

impl App {
    /// Builds the application.
    pub fn new(store: Store, outbox: OutboxWaker, options: AppOptions) -> Self {
        Self {
            store,
            outbox,
            hub: Hub::default(),
            options,
            nlu: Mutex::new(HashMap::new()),
            catalogues: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    async fn commit(&self, tenant: &TenantId, change: Change) -> Result<Committed, StoreError> {
        let has_events = !change.events.is_empty();
        let out = self.store.commit(tenant, change).await?;
        if has_events && out == Committed::Applied {
            self.outbox.wake();
        }
        Ok(out)
    }

    async fn load(&self, tenant: &TenantId, id: &str) -> DialogResult<(pb::Conversation, i64)> {
        check_conversation_id(id)?;
        self.store
            .conversation(tenant, id)
            .await?
            .ok_or_else(|| DialogError::NotFound(format!("conversation {id}")))
    }

    /// The tenant's catalogue: from the scenarios received in `PolicyUpdated` events, or the
    /// built-in default policy when there are none.
    async fn catalogue(&self, tenant: &TenantId) -> DialogResult<Arc<Catalogue>> {
        {
            let map = self.catalogues.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, c)) = map.get(tenant)
                && at.elapsed() < self.options.cache_ttl
            {
                return Ok(Arc::clone(c));
            }
        }
        let scenarios = self.store.policies(tenant).await?;
        let (cat, rejected) = Catalogue::build(scenarios);
        for (id, errors) in rejected {
            tracing::warn!(tenant = %tenant, scenario = %id, problems = errors.len(),
                "scenario left out of the catalogue");
        }
        let cat = Arc::new(cat);
        self.catalogues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), (Instant::now(), Arc::clone(&cat)));
        Ok(cat)
    }

    /// The last statistics reported of each of the tenant's queues, cached like the catalogue.
    async fn queue_stats(&self, tenant: &TenantId) -> DialogResult<QueueStats> {
        {
            let map = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, q)) = map.get(tenant)
                && at.elapsed() < self.options.cache_ttl
            {
                return Ok(Arc::clone(q));
            }
        }
        let stats = Arc::new(self.store.queue_stats(tenant).await?);
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), (Instant::now(), Arc::clone(&stats)));
        Ok(stats)
    }

    /// Forgets a tenant's cached catalogue.
    pub fn forget_catalogue(&self, tenant: &TenantId) {
        self.catalogues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
    }

    async fn tenant_nlu(&self, tenant: &TenantId) -> DialogResult<Arc<TenantNlu>> {
        {
            let map = self.nlu.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, n)) = map.get(tenant)
                && at.elapsed() < self.options.cache_ttl
            {
                return Ok(Arc::clone(n));
            }
        }
        let nlu = match self.store.active_model(tenant).await? {
            Some(m) => match tandem_nlu::TextClassifier::from_bytes(&m.bytes) {
                Ok(model) => TenantNlu {
                    analyzer: Arc::new(Analyzer::new().with_intent_model(model)),
                    model_version_id: m.version.id,
                },
                Err(e) => {
                    tracing::error!(tenant = %tenant, error = %e, "active model does not load");
                    TenantNlu {
                        analyzer: Arc::new(Analyzer::new()),
                        model_version_id: String::new(),
                    }
                }
            },
            None => TenantNlu {
                analyzer: Arc::new(Analyzer::new()),
                model_version_id: String::new(),
            },
        };
        let nlu = Arc::new(nlu);
        self.nlu
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.clone(), (Instant::now(), Arc::clone(&nlu)));
        Ok(nlu)
    }

    // ---------------------------------------------------------------- lifecycle

    /// Starts a conversation, or returns the one started with the same idempotency key.
    pub async fn start(
        &self,
        tenant: &TenantId,
        req: pb::StartConversationRequest,
    ) -> DialogResult<pb::StartConversationResponse> {
        check_client_id("client_conversation_id", &req.client_conversation_id)?;
        let mut customer = req
            .customer
            .ok_or_else(|| DialogError::Invalid("customer is required".into()))?;
        check_client_id("customer.id", &customer.id)?;
        check_line("customer.display_name", &customer.display_name, 200)?;
        check_line("scenario_hint", &req.scenario_hint, 64)?;
        if customer.attributes.len() > 50 {
            return Err(DialogError::Invalid(
                "customer.attributes has more than 50 entries".into(),
            ));
        }
        for (key, value) in &customer.attributes {
            if key.is_empty() {
                return Err(DialogError::Invalid(
                    "customer.attributes has an empty key".into(),
                ));
            }
            check_line("customer.attributes key", key, 64)?;
            check_note(&format!("customer.attributes[{key}]"), value, 1_000)?;
        }
        check_enum::<common::CustomerTier>("customer.tier", customer.tier)?;
        check_enum::<common::Language>("customer.language", customer.language)?;
        check_enum::<common::Channel>("customer.channel", customer.channel)?;
        check_enum::<common::Channel>("channel", req.channel)?;
        if req.channel != 0 {
            customer.channel = req.channel;
        }
        if let Some(c) = self
            .store
            .conversation_by_client_id(tenant, &req.client_conversation_id)
            .await?
        {
            return replayed(c, &customer.id);
        }
        let at = now();
        let repeat_contacts = self.repeat_contacts(tenant, &customer.id, &at).await?;
        // A hint naming no scenario of the tenant is dropped: the conversation keeps no scenario
        // until the policy resolves one, and the knowledge search is not filtered on it.
        let scenario_id = if req.scenario_hint.is_empty()
            || self
                .catalogue(tenant)
                .await?
                .get(&req.scenario_hint)
                .is_none()
        {
            String::new()
        } else {
            req.scenario_hint.clone()
        };
        let customer_id = customer.id.clone();
        let conversation = pb::Conversation {
            id: new_id(),
            repeat_contacts,
            scenario_id,
            state: pb::ConversationState::Bot as i32,
            created_at: Some(at),
            updated_at: Some(at),
            test: req.test,
            proactive: req.proactive,
            channel: customer.channel,
            language: customer.language,
            client_conversation_id: req.client_conversation_id.clone(),
            customer: Some(customer.clone()),
            ..Default::default()
        };
        let event = pb::ConversationStarted {
            conversation_id: conversation.id.clone(),
            scenario_id: conversation.scenario_id.clone(),
            customer: Some(customer),
            channel: conversation.channel,
            language: conversation.language,
            test: conversation.test,
            proactive: conversation.proactive,
            occurred_at: Some(at),
        };
        let change = Change {
            create: Some(conversation.clone()),
            events: vec![RawEvent::new(tenant, &event, Some(conversation.id.clone()))],
            ..Default::default()
        };
        match self.commit(tenant, change).await {
            Ok(_) => Ok(pb::StartConversationResponse {
                conversation: Some(conversation),
                created: true,
            }),
            Err(StoreError::Conflict) => {
                let existing = self
                    .store
                    .conversation_by_client_id(tenant, &req.client_conversation_id)
                    .await?
                    .ok_or(DialogError::Aborted)?;
                replayed(existing, &customer_id)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The customer's conversations started within the repeat-contact window before `at`:
    /// looked up once, when a conversation starts, and kept on it.
    async fn repeat_contacts(
        &self,
        tenant: &TenantId,
        customer_id: &str,
        at: &prost_types::Timestamp,
    ) -> DialogResult<i32> {
        let window = self.options.repeat_contact_window;
        if window.is_zero() || customer_id.is_empty() {
            return Ok(0);
        }
        let since = crate::store::timestamp_micros(at)
            .saturating_sub(i64::try_from(window.as_micros()).unwrap_or(i64::MAX));
        let n = self
            .store
            .conversations_since(tenant, customer_id, since)
            .await?;
        Ok(i32::try_from(n).unwrap_or(i32::MAX))
    }

    /// Returns a conversation.
    pub async fn get(&self, tenant: &TenantId, id: &str) -> DialogResult<pb::Conversation> {
        Ok(self.load(tenant, id).await?.0)
    }

    /// Lists messages after a sequence.
    pub async fn messages(
        &self,
        tenant: &TenantId,
        id: &str,
        after: i64,
        limit: i64,
    ) -> DialogResult<Vec<pb::Message>> {
        self.load(tenant, id).await?;
        Ok(self.store.messages(tenant, id, after, limit).await?)
    }

    fn message_event(
        tenant: &TenantId,
        c: &pb::Conversation,
        m: &pb::Message,
        at: prost_types::Timestamp,
    ) -> RawEvent {
        RawEvent::new(
            tenant,
            &pb::MessagePosted {
                conversation_id: c.id.clone(),
                scenario_id: c.scenario_id.clone(),
                message: Some(m.clone()),
                state: c.state,
                assigned_agent_id: c.assigned_agent_id.clone(),
                handoff_id: c.handoff_id.clone(),
                test: c.test,
                occurred_at: Some(at),
            },
            Some(c.id.clone()),
        )
    }

    /// Appends a message to `c` (sequence, count, time).
    fn append(
        c: &mut pb::Conversation,
        kind: pb::SenderKind,
        sender: &str,
        text: &str,
        at: prost_types::Timestamp,
    ) -> pb::Message {
        c.message_count += 1;
        c.updated_at = Some(at);
        pb::Message {
            id: new_id(),
            conversation_id: c.id.clone(),
            sequence: c.message_count,
            sender_kind: kind as i32,
            sender_id: sender.to_owned(),
            text: text.to_owned(),
            language: c.language,
            created_at: Some(at),
            ..Default::default()
        }
    }

    /// Posts a customer message and runs the bot's turn. `authorization` is the caller's own
    /// `authorization` metadata, forwarded to the knowledge search; without it the bot answers
    /// with the intents' stored answers.
    pub async fn post_customer(
        &self,
        tenant: &TenantId,
        req: pb::PostCustomerMessageRequest,
        authorization: Option<&AsciiMetadataValue>,
    ) -> DialogResult<pb::PostCustomerMessageResponse> {
        let received = Instant::now();
        let received_at = now();
        check_client_id("client_message_id", &req.client_message_id)?;
        check_text("text", &req.text)?;
        check_attachments(&req.attachments)?;
        check_conversation_id(&req.conversation_id)?;
        for _ in 0..ATTEMPTS {
            let Some(found) = self
                .store
                .conversation_for_request(
                    tenant,
                    &req.conversation_id,
                    "customer",
                    &req.client_message_id,
                )
                .await?
            else {
                return Err(DialogError::NotFound(format!(
                    "conversation {}",
                    req.conversation_id
                )));
            };
            if let Some(bytes) = found.response {
                let mut r = pb::PostCustomerMessageResponse::decode(bytes.as_slice())
                    .map_err(|e| DialogError::Store(StoreError::Corrupt("response", e)))?;
                r.duplicate = true;
                return Ok(r);
            }
            let (mut c, revision) = (found.conversation, found.revision);
            let state = state_of(&c);
            if state == pb::ConversationState::Closed {
                return Err(DialogError::Precondition(format!(
                    "conversation {} is closed",
                    c.id
                )));
            }
            let mut updates = Vec::new();
            let mut events = Vec::new();
            let reopened = state == pb::ConversationState::Resolved;
            if reopened {
                c.state = pb::ConversationState::Bot as i32;
                c.reopen_count = c.reopen_count.saturating_add(1);
                // The agent who resolved it holds the new matter no more: their view ends, and
                // they no longer type, close or review as its agent.
                c.assigned_agent_id.clear();
                updates.push((
                    pb::ConversationState::Resolved,
                    pb::ConversationState::Bot,
                    "reopened by a new customer message",
                ));
            }
            let customer_id = c
                .customer
                .as_ref()
                .map(|x| x.id.clone())
                .unwrap_or_default();
            let mut message = Self::append(
                &mut c,
                pb::SenderKind::Customer,
                &customer_id,
                &req.text,
                received_at,
            );
            message.client_message_id = req.client_message_id.clone();
            message.attachments = req.attachments.clone();
            let state_now = state_of(&c);
            let mut messages = Vec::new();
            let mut change = Change::default();
            let mut response = pb::PostCustomerMessageResponse::default();
            if state_now == pb::ConversationState::Queued {
                // Waiting for a human: the bot does not answer.
                messages.push(message.clone());
            } else {
                let out = self
                    .bot_turn(
                        TurnInput {
                            tenant,
                            conversation: &c,
                            received,
                            received_at,
                            authorization,
                            reopened,
                        },
                        &mut message,
                    )
                    .await?;
                let from = state_of(&c);
                c = out.conversation;
                let to = state_of(&c);
                if from != to {
                    updates.push((from, to, "handed off to a human"));
                }
                messages.push(message.clone());
                messages.extend(out.messages);
                change.traces.push(out.trace.clone());
                if let Some(s) = out.suggestion {
                    events.push(RawEvent::new(
                        tenant,
                        &pb::SuggestionCreated {
                            conversation_id: c.id.clone(),
                            scenario_id: c.scenario_id.clone(),
                            agent_id: c.assigned_agent_id.clone(),
                            suggestion: Some(s.clone()),
                            occurred_at: Some(received_at),
                        },
                        Some(c.id.clone()),
                    ));
                    change.suggestions.push(s);
                }
                if let Some(h) = out.handoff {
                    events.push(RawEvent::new(
                        tenant,
                        &pb::HandoffRequested {
                            handoff_id: h.handoff_id.clone(),
                            conversation_id: c.id.clone(),
                            scenario_id: c.scenario_id.clone(),
                            package: Some(h.clone()),
                            occurred_at: h.requested_at,
                        },
                        Some(c.id.clone()),
                    ));
                    change.handoffs.push(h);
                }
                let trace = &out.trace;
                events.push(RawEvent::new(
                    tenant,
                    &pb::BotReplied {
                        conversation_id: c.id.clone(),
                        scenario_id: c.scenario_id.clone(),
                        message_id: message.id.clone(),
                        reply_message_id: out.bot_turn.reply_message_id.clone(),
                        action: out.bot_turn.action,
                        intent: trace
                            .intent_scores
                            .first()
                            .map(|s| s.intent.clone())
                            .unwrap_or_default(),
                        confidence: trace.intent_scores.first().map_or(0.0, |s| s.confidence),
                        articles: trace.articles.clone(),
                        decision_trace_id: trace.id.clone(),
                        latency_micros: trace.total_micros,
                        policy_version: trace
                            .policy_decision
                            .as_ref()
                            .map_or(0, |d| d.policy_version),
                        model_version_id: trace.model_version_id.clone(),
                        language: message.language,
                        channel: c.channel,
                        test: c.test,
                        occurred_at: Some(now()),
                    },
                    Some(c.id.clone()),
                ));
                response.bot_turn = Some(out.bot_turn);
            }
            for m in &messages {
                events.push(Self::message_event(tenant, &c, m, received_at));
            }
            response.message = Some(message);
            response.state = c.state;
            let seq = c.message_count;
            change.update = Some((c.clone(), revision));
            change.request = Some((
                c.id.clone(),
                "customer",
                req.client_message_id.clone(),
                response.encode_to_vec(),
            ));
            change.messages = messages.clone();
            change.events = events;
            let suggestion = change.suggestions.first().cloned();
            match self.commit(tenant, change).await {
                Ok(_) => {}
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
            let mut b: Vec<Broadcast> = updates
                .into_iter()
                .map(|(from, to, reason)| {
                    update(
                        seq,
                        pb::conversation_update::Update::StateChanged(pb::StateChange {
                            from_state: from as i32,
                            to_state: to as i32,
                            assigned_agent_id: c.assigned_agent_id.clone(),
                            reason: reason.into(),
                        }),
                        false,
                    )
                })
                .collect();
            b.extend(messages.into_iter().map(|m| {
                update(
                    m.sequence,
                    pb::conversation_update::Update::MessagePosted(m),
                    false,
                )
            }));
            if let Some(s) = suggestion {
                b.push(update(
                    seq,
                    pb::conversation_update::Update::Suggestion(s),
                    true,
                ));
            }
            self.hub.publish(tenant, &c.id, b);
            return Ok(response);
        }
        Err(DialogError::Aborted)
    }

    /// The bot's turn on one customer message; `message` gets its detected language.
    async fn bot_turn(
        &self,
        input: TurnInput<'_>,
        message: &mut pb::Message,
    ) -> DialogResult<TurnOutput> {
        let tenant = input.tenant;
        let mut c = input.conversation.clone();
        let history = self
            .store
            .recent_traces(tenant, &c.id, RECENT_TURNS)
            .await?;
        // Turns are numbered from 0 without gaps, so the next one follows the last.
        let turn_index = history.last().map_or(0, |t| t.turn_index.saturating_add(1));
        if input.reopened {
            c.reopened_at_turn = turn_index;
        }
        // The sentiment trend and the fallbacks in a row count the turns since the last reopen:
        // a resolution ends the matter the earlier turns were about.
        let since_reopen =
            &history[history.partition_point(|t| t.turn_index < c.reopened_at_turn)..];
        let tn = self.tenant_nlu(tenant).await?;
        let signals = ConversationSignals {
            previous_sentiment: since_reopen
                .iter()
                .rev()
                .take(50)
                .rev()
                .map(|t| t.sentiment.as_ref().map_or(0.0, |s| s.score as f32))
                .collect(),
            consecutive_fallbacks: u32::try_from(
                since_reopen
                    .iter()
                    .rev()
                    .take_while(|t| t.action == pb::BotAction::Fallback as i32)
                    .count(),
            )
            .unwrap_or(u32::MAX),
            repeat_contacts: u32::try_from(c.repeat_contacts).unwrap_or(0),
        };
        let t0 = Instant::now();
        let a: TurnAnalysis = tn.analyzer.analyse(&message.text, &signals);
        let analyse_micros = micros(t0.elapsed());
        let lang = nlu::language(a.language.language);
        if lang != common::Language::Unspecified {
            message.language = lang as i32;
            c.language = lang as i32;
        }
        let zh = is_zh(&c);
        let (top, confidence, out_of_scope) = match &a.intent {
            Some(p) => (
                p.ranked
                    .first()
                    .map(|l| l.label.clone())
                    .unwrap_or_default(),
                f64::from(p.confidence),
                p.out_of_scope && !ambiguous(p, tn.analyzer.intent_model()),
            ),
            None => (String::new(), 0.0, true),
        };
        let oos_score = if out_of_scope {
            1.0
        } else {
            (1.0 - confidence).clamp(0.0, 1.0)
        };
        let agent_owns = state_of(&c) == pb::ConversationState::Agent;
        let catalogue = self.catalogue(tenant).await?;
        // A scenario the tenant no longer has (deleted, or stored by an older version) is
        // forgotten: the turn is resolved afresh and the knowledge search is not filtered on it.
        if !c.scenario_id.is_empty() && catalogue.get(&c.scenario_id).is_none() {
            c.scenario_id.clear();
        }
        let scenario = c.scenario_id.clone();
        let t1 = Instant::now();
        // The scenario's own phrases: "get me a human" and topics the bot must not handle.
        let phrase = |phrases: &[String]| {
            phrases.iter().find_map(|p| {
                let p = tandem_text::normalise(p);
                (!p.is_empty() && a.normalised.contains(p.as_str())).then_some(p)
            })
        };
        let entry = catalogue
            .resolve(&scenario, if out_of_scope { "" } else { &top })
            .ok();
        let scenario_human = entry.and_then(|e| phrase(&e.wire.handoff_phrases));
        let sensitive = entry
            .and_then(|e| phrase(&e.wire.sensitive_phrases))
            .is_some();
        let human_requested = a.escalation.human_requested || scenario_human.is_some();
        // The queue a handoff would wait in, as routing last reported it: its ETA and business
        // hours let the scenario offer to leave a message instead of a long or closed queue.
        let queues = self.queue_stats(tenant).await?;
        let queue = entry.and_then(|e| {
            let named = e.wire.routing.as_ref().map_or("", |r| r.queue_id.as_str());
            queue_for(
                &queues,
                named,
                &e.wire.id,
                std::time::SystemTime::now(),
                self.options.queue_stats_max_age,
            )
        });
        let ctx = policy::DecisionContext {
            scenario_id: scenario,
            intent: if out_of_scope {
                String::new()
            } else {
                top.clone()
            },
            intent_confidence: if out_of_scope { 0.0 } else { confidence },
            out_of_scope: oos_score,
            sentiment: f64::from(a.sentiment.score),
            sentiment_drop: f64::from(a.trend.drop_from_peak).clamp(0.0, 2.0),
            complexity: f64::from(a.complexity.score).clamp(0.0, 1.0),
            fallbacks: i32::try_from(signals.consecutive_fallbacks)
                .unwrap_or(i32::MAX)
                .saturating_add(i32::from(out_of_scope)),
            // Like the trend and the fallbacks, the turn limit counts since the last reopen.
            bot_turns: turn_index.saturating_sub(c.reopened_at_turn).max(0),
            customer_tier: c.customer.as_ref().map_or(0, |x| x.tier),
            queue_eta_seconds: queue.map(|q| q.eta_seconds.max(0)),
            within_business_hours: queue.and_then(|q| q.within_business_hours),
            human_requested,
            sensitive_topic: sensitive,
            agent_owns_conversation: agent_owns,
            language: lang as i32,
            channel: c.channel,
            conversation_id: c.id.clone(),
            message_id: message.id.clone(),
        };
        // The context is built from checked values and a scenario of this catalogue: a refusal
        // is a bug, not the caller's doing.
        let decision = catalogue
            .decide(&ctx)
            .map_err(|e| DialogError::Internal(format!("policy: {e}")))?
            .decision;
        let policy_micros = micros(t1.elapsed());
        // The conversation keeps the scenario the policy resolved from the intent; a turn that
        // fell back to the default scenario leaves it unset, so a later turn with a recognised
        // intent still finds its scenario.
        if c.scenario_id.is_empty()
            && let Some(id) = entry.and_then(|e| claimed_scenario(e, &ctx.intent))
        {
            c.scenario_id = id.to_owned();
        }
        let mut action = policy::DecisionAction::try_from(decision.action)
            .unwrap_or(policy::DecisionAction::Fallback);
        // An out-of-scope turn whose only trigger is the low confidence gets a fallback (asking to
        // rephrase) until the scenario's fallback allowance is used up; the policy's own
        // `max_fallbacks` rule hands off after that.
        let allowance = decision
            .thresholds
            .as_ref()
            .and_then(|t| t.max_fallbacks)
            .unwrap_or(2);
        if out_of_scope
            && action == policy::DecisionAction::Handoff
            && decision.handoff_reason == common::HandoffReason::LowConfidence as i32
            && ctx.fallbacks <= allowance
        {
            action = policy::DecisionAction::Fallback;
        }
        let trace_id = new_id();
        let t2 = Instant::now();
        let mut bot_turn = pb::BotTurn {
            decision_trace_id: trace_id.clone(),
            ..Default::default()
        };
        let mut messages = Vec::new();
        let mut suggestion = None;
        let mut handoff = None;
        let entities = nlu::entities(&message.text, &message.id, &a);
        let sentiment = nlu::sentiment(&a);
        let scores: Vec<pb::IntentScore> = a
            .intent
            .as_ref()
            .map(|p| {
                p.ranked
                    .iter()
                    .take(5)
                    .map(|l| pb::IntentScore {
                        intent: l.label.clone(),
                        confidence: f64::from(l.probability),
                    })
                    .collect()
            })
            .unwrap_or_default();
        // The knowledge base, when the bot is to answer or suggest: the best published article
        // version scoring well enough answers and is cited; a failed or late look-up degrades to
        // the intent's stored answer.
        // When the only thing holding the bot back is that the intent model did not recognise the
        // message (a fallback, a clarification, or a low-confidence handoff), a published article
        // that matches well answers instead: what agents taught the knowledge base is understood
        // before any intent is trained for it.
        let unrecognised = !agent_owns
            && match action {
                policy::DecisionAction::Fallback | policy::DecisionAction::Clarify => true,
                policy::DecisionAction::Handoff => {
                    decision.handoff_reason == common::HandoffReason::LowConfidence as i32
                }
                _ => false,
            };
        let mut search_stage = None;
        let found = match (&self.options.knowledge, input.authorization) {
            (Some(kc), Some(authorization))
                if agent_owns || action == policy::DecisionAction::BotAnswer || unrecognised =>
            {
                let ts = Instant::now();
                let got = kc
                    .best(&kb::Query {
                        tenant,
                        authorization,
                        text: &message.text,
                        scenario_id: &c.scenario_id,
                        language: lang,
                        conversation_id: &c.id,
                    })
                    .await;
                let (stage, found) = match got {
                    Ok(found) => ("search", found),
                    Err(e) => (
                        if matches!(e, kb::LookupError::Timeout(_)) {
                            "search_timeout"
                        } else {
                            "search_error"
                        },
                        None,
                    ),
                };
                search_stage = Some(pb::StageLatency {
                    stage: stage.into(),
                    micros: micros(ts.elapsed()),
                });
                found
            }
            _ => None,
        };
        if unrecognised && found.is_some() {
            action = policy::DecisionAction::BotAnswer;
        }
        let articles: Vec<common::ArticleRef> = found
            .as_ref()
            .map(|f| f.article.clone())
            .into_iter()
            .collect();
        let at = now();
        let bot_action = if agent_owns {
            // A human owns the conversation: only a suggestion to the agent, whatever the policy
            // says.
            let text = match &found {
                Some(f) => f.answer.clone(),
                None => self.answer_text(tenant, &top, &c, zh).await?,
            };
            let s = pb::Suggestion {
                id: new_id(),
                conversation_id: c.id.clone(),
                for_message_id: message.id.clone(),
                text,
                articles: articles.clone(),
                confidence,
                decision_trace_id: trace_id.clone(),
                created_at: Some(at),
                review: None,
            };
            bot_turn.suggestion = Some(s.clone());
            suggestion = Some(s);
            pb::BotAction::Suggest
        } else {
            let (kind, text) = match action {
                policy::DecisionAction::BotAnswer => (
                    pb::BotAction::Answer,
                    match &found {
                        Some(f) => f.answer.clone(),
                        None => self.answer_text(tenant, &top, &c, zh).await?,
                    },
                ),
                policy::DecisionAction::Clarify => {
                    bot_turn.choices = scores
                        .iter()
                        .take(3)
                        .map(|s| pb::ClarificationChoice {
                            intent: s.intent.clone(),
                            label: s.intent.replace('_', " "),
                        })
                        .collect();
                    (pb::BotAction::Clarify, Texts::clarify(zh).to_owned())
                }
                policy::DecisionAction::Handoff => {
                    (pb::BotAction::Handoff, Texts::handoff(zh).to_owned())
                }
                policy::DecisionAction::LeaveMessage => {
                    (pb::BotAction::Fallback, Texts::leave_message(zh).to_owned())
                }
                _ => (pb::BotAction::Fallback, Texts::fallback(zh).to_owned()),
            };
            let mut reply = Self::append(&mut c, pb::SenderKind::Bot, "bot", &text, at);
            reply.bot_action = kind as i32;
            reply.choices = bot_turn.choices.clone();
            reply.decision_trace_id = trace_id.clone();
            if kind == pb::BotAction::Answer {
                reply.cited_articles.clone_from(&articles);
                bot_turn.cited_articles.clone_from(&articles);
            }
            bot_turn.reply_text = text;
            bot_turn.reply_message_id = reply.id.clone();
            if kind == pb::BotAction::Handoff {
                let mut recent = self.store.last_messages(tenant, &c.id, 18).await?;
                recent.push(message.clone());
                recent.push(reply.clone());
                let package = build_package(PackageInput {
                    c: &c,
                    decision: &decision,
                    ctx: &ctx,
                    history: &history,
                    this_turn: (turn_index, &top, confidence, message, &sentiment, &entities),
                    recent,
                    trace_id: &trace_id,
                    received_at: input.received_at,
                });
                c.state = pb::ConversationState::Queued as i32;
                c.handoff_id.clone_from(&package.handoff_id);
                c.queue = None;
                bot_turn.handoff = Some(package.clone());
                handoff = Some(package);
            }
            messages.push(reply);
            kind
        };
        bot_turn.action = bot_action as i32;
        let reply_micros = micros(t2.elapsed());
        let total = micros(input.received.elapsed());
        let trace = pb::DecisionTrace {
            id: trace_id,
            message_id: message.id.clone(),
            conversation_id: c.id.clone(),
            scenario_id: c.scenario_id.clone(),
            turn_index,
            normalized_text: a.normalised.clone(),
            language: Some(pb::LanguageDetection {
                language: lang as i32,
                // The share of the script that decided the language.
                confidence: f64::from(if lang == common::Language::Zh {
                    a.language.han_share
                } else {
                    1.0 - a.language.han_share
                }),
            }),
            token_count: i32::try_from(a.tokens.len()).unwrap_or(i32::MAX),
            intent_scores: scores,
            out_of_scope_score: oos_score,
            sentiment: Some(sentiment),
            sentiment_trend: f64::from(a.trend.slope),
            complexity: Some(pb::Complexity {
                score: f64::from(a.complexity.score),
                factors: a
                    .complexity
                    .factors
                    .iter()
                    .map(|f| pb::ComplexityFactor {
                        name: nlu::complexity_factor_name(f.kind).into(),
                        value: f64::from(f.value),
                        contribution: f64::from(f.contribution),
                    })
                    .collect(),
            }),
            entities,
            human_request: Some(pb::HumanRequest {
                detected: human_requested,
                matched_phrase: a
                    .escalation
                    .matches
                    .iter()
                    .find(|m| !m.negated && format!("{:?}", m.kind).contains("Human"))
                    .map(|m| m.phrase.clone())
                    .or(scenario_human)
                    .unwrap_or_default(),
            }),
            sensitive_topic: sensitive,
            articles,
            policy_decision: Some(decision),
            action: bot_action as i32,
            stage_latencies: vec![
                pb::StageLatency {
                    stage: "intent".into(),
                    micros: analyse_micros,
                },
                pb::StageLatency {
                    stage: "policy".into(),
                    micros: policy_micros,
                },
            ]
            .into_iter()
            .chain(search_stage)
            .chain([pb::StageLatency {
                stage: "reply".into(),
                micros: reply_micros,
            }])
            .collect(),
            total_micros: total,
            model_version_id: tn.model_version_id.clone(),
            created_at: Some(at),
        };
        Ok(TurnOutput {
            bot_turn,
            messages,
            trace,
            suggestion,
            handoff,
            conversation: c,
        })
    }

    /// The answer of an intent: its stored answer, or a notice that none is written yet.
    async fn answer_text(
        &self,
        tenant: &TenantId,
        intent: &str,
        c: &pb::Conversation,
        zh: bool,
    ) -> DialogResult<String> {
        if intent.is_empty() {
            return Ok(Texts::fallback(zh).to_owned());
        }
        Ok(match self.store.answer(tenant, intent, c.language).await? {
            Some(a) => a,
            None => Texts::answer_missing(zh, intent),
        })
    }

    /// Posts a message from the assigned agent.
    pub async fn post_agent(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        req: pb::PostAgentMessageRequest,
    ) -> DialogResult<pb::PostAgentMessageResponse> {
        check_client_id("client_message_id", &req.client_message_id)?;
        check_text("text", &req.text)?;
        check_attachments(&req.attachments)?;
        for _ in 0..ATTEMPTS {
            let (mut c, revision) = self.load(tenant, &req.conversation_id).await?;
            // A retry of the caller's own message gets the response it was given, whatever
            // happened to the conversation since (resolved, transferred): the message was posted.
            let recorded = self
                .store
                .request(tenant, &c.id, "agent", &req.client_message_id)
                .await?;
            if let Some(bytes) = &recorded {
                let mut r = pb::PostAgentMessageResponse::decode(bytes.as_slice())
                    .map_err(|e| DialogError::Store(StoreError::Corrupt("response", e)))?;
                if r.message.as_ref().is_some_and(|m| m.sender_id == actor.id) {
                    r.duplicate = true;
                    return Ok(r);
                }
            }
            if state_of(&c) != pb::ConversationState::Agent {
                return Err(DialogError::Precondition(format!(
                    "conversation {} is not owned by an agent",
                    c.id
                )));
            }
            if c.assigned_agent_id != actor.id {
                return Err(DialogError::Denied(format!(
                    "agent {} is not assigned to conversation {}",
                    actor.id, c.id
                )));
            }
            if recorded.is_some() {
                return Err(DialogError::Precondition(format!(
                    "client_message_id {} was used by another agent in conversation {}",
                    req.client_message_id, c.id
                )));
            }
            let at = now();
            let mut m = Self::append(&mut c, pb::SenderKind::Agent, &actor.id, &req.text, at);
            m.client_message_id = req.client_message_id.clone();
            m.attachments = req.attachments.clone();
            let mut change = Change::default();
            if !req.suggestion_id.is_empty() {
                let mut s = self
                    .store
                    .suggestion(tenant, &req.suggestion_id)
                    .await?
                    .filter(|s| s.conversation_id == c.id)
                    .ok_or_else(|| {
                        DialogError::NotFound(format!("suggestion {}", req.suggestion_id))
                    })?;
                if s.review.is_none() {
                    let outcome = if s.text.trim() == req.text.trim() {
                        pb::SuggestionOutcome::Used
                    } else {
                        pb::SuggestionOutcome::Edited
                    };
                    s.review = Some(pb::SuggestionReview {
                        suggestion_id: s.id.clone(),
                        outcome: outcome as i32,
                        edited_text: if outcome == pb::SuggestionOutcome::Edited {
                            req.text.clone()
                        } else {
                            String::new()
                        },
                        reason: String::new(),
                        agent_id: actor.id.clone(),
                        reviewed_at: Some(at),
                    });
                    change.events.push(suggestion_reviewed(tenant, &c, &s, at));
                    change.suggestions.push(s);
                }
            }
            let response = pb::PostAgentMessageResponse {
                message: Some(m.clone()),
                state: c.state,
                duplicate: false,
            };
            change.events.push(Self::message_event(tenant, &c, &m, at));
            change.update = Some((c.clone(), revision));
            change.request = Some((
                c.id.clone(),
                "agent",
                req.client_message_id.clone(),
                response.encode_to_vec(),
            ));
            change.messages = vec![m.clone()];
            match self.commit(tenant, change).await {
                Ok(_) => {}
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
            self.hub.publish(
                tenant,
                &c.id,
                vec![update(
                    m.sequence,
                    pb::conversation_update::Update::MessagePosted(m),
                    false,
                )],
            );
            return Ok(response);
        }
        Err(DialogError::Aborted)
    }

    /// Applies a state transition with an optional system message and events; `f` checks the
    /// current conversation and returns the change to make, or `None` to leave it as it is.
    async fn transition<F>(
        &self,
        tenant: &TenantId,
        id: &str,
        claim: Option<(String, String)>,
        f: F,
    ) -> DialogResult<pb::Conversation>
    where
        F: Fn(&pb::Conversation) -> DialogResult<Option<Transition>>,
    {
        for _ in 0..ATTEMPTS {
            let (mut c, revision) = self.load(tenant, id).await?;
            let Some(t) = f(&c)? else {
                if let Some(claim) = claim.clone() {
                    // Record the event as handled even when it changes nothing.
                    self.commit(
                        tenant,
                        Change {
                            claim: Some(claim),
                            ..Default::default()
                        },
                    )
                    .await?;
                }
                return Ok(c);
            };
            let at = now();
            let from = state_of(&c);
            let agent_changed = t.agent.as_ref().is_some_and(|a| *a != c.assigned_agent_id);
            c.state = t.to as i32;
            c.updated_at = Some(at);
            if let Some(agent) = &t.agent {
                c.assigned_agent_id.clone_from(agent);
            }
            if let Some(q) = &t.queue {
                c.queue = Some(q.clone());
            }
            if t.to != pb::ConversationState::Queued {
                c.queue = None;
            }
            if t.to == pb::ConversationState::Closed {
                c.closed_at = Some(at);
                c.close_reason = t.close_reason as i32;
            }
            let mut messages = Vec::new();
            if let Some(text) = &t.system_text {
                messages.push(Self::append(
                    &mut c,
                    pb::SenderKind::System,
                    "system",
                    text,
                    at,
                ));
            }
            let mut events: Vec<RawEvent> = (t.events)(&c, from, at)
                .into_iter()
                .map(|e| e(tenant, &c))
                .collect();
            for m in &messages {
                events.push(Self::message_event(tenant, &c, m, at));
            }
            let change = Change {
                update: Some((c.clone(), revision)),
                messages: messages.clone(),
                events,
                claim: claim.clone(),
                ..Default::default()
            };
            match self.commit(tenant, change).await {
                Ok(Committed::Applied) => {}
                Ok(Committed::Duplicate) => return Ok(c),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
            let seq = c.message_count;
            let mut b = Vec::new();
            // A change of hands within AGENT (a transfer) is reported like a state change, so
            // watchers learn who owns the conversation now.
            if from != t.to || agent_changed {
                b.push(update(
                    seq,
                    pb::conversation_update::Update::StateChanged(pb::StateChange {
                        from_state: from as i32,
                        to_state: t.to as i32,
                        assigned_agent_id: c.assigned_agent_id.clone(),
                        reason: t.reason.clone(),
                    }),
                    false,
                ));
            }
            if let Some(q) = &t.queue {
                b.push(update(
                    seq,
                    pb::conversation_update::Update::QueueUpdated(q.clone()),
                    false,
                ));
            }
            b.extend(messages.into_iter().map(|m| {
                update(
                    m.sequence,
                    pb::conversation_update::Update::MessagePosted(m),
                    false,
                )
            }));
            self.hub.publish(tenant, &c.id, b);
            return Ok(c);
        }
        Err(DialogError::Aborted)
    }

    /// Closes a conversation (a closed one is returned as it is): the customer's side
    /// (channel, service), a supervisor or administrator, or the agent assigned to it.
    pub async fn close(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        req: pb::CloseConversationRequest,
    ) -> DialogResult<pb::Conversation> {
        check_note("note", &req.note, 1_000)?;
        let reason = pb::CloseReason::try_from(req.reason)
            .ok()
            .filter(|r| *r != pb::CloseReason::Unspecified)
            .ok_or_else(|| DialogError::Invalid("reason is required".into()))?;
        self.transition(tenant, &req.conversation_id, None, |c| {
            if actor.agent && !actor.supervisor && c.assigned_agent_id != actor.id {
                return Err(DialogError::Denied(format!(
                    "agent {} is not assigned to conversation {}",
                    actor.id, c.id
                )));
            }
            if state_of(c) == pb::ConversationState::Closed {
                return Ok(None);
            }
            Ok(Some(close_transition(reason, req.note.clone())))
        })
        .await
    }

    /// One round of the idle sweep: closes up to `limit` conversations without activity (no
    /// message, no state change) for longer than `idle_after`, oldest first, through the same
    /// transition as `CloseConversation`. A BOT conversation closes for inactivity
    /// (`ABANDONED`), a RESOLVED one as resolved (`RESOLVED`); QUEUED and AGENT ones, where a
    /// human is involved, are left alone. Safe on every replica at once: a conversation closed
    /// meanwhile, or active again, is skipped, and one that keeps changing under the sweep is left
    /// for the next round.
    pub async fn close_idle(&self, idle_after: Duration, limit: i64) -> DialogResult<Sweep> {
        let cutoff = crate::store::timestamp_micros(&now())
            .saturating_sub(i64::try_from(idle_after.as_micros()).unwrap_or(i64::MAX));
        let idle = self
            .store
            .idle_conversations(
                &[pb::ConversationState::Bot, pb::ConversationState::Resolved],
                cutoff,
                limit,
            )
            .await?;
        let mut sweep = Sweep {
            found: idle.len(),
            closed: 0,
        };
        for (tenant, id) in idle {
            let Ok(tenant) = TenantId::new(&tenant) else {
                tracing::warn!(tenant = %tenant, conversation = %id,
                    "idle conversation of an invalid tenant id left open");
                continue;
            };
            // Whether the last attempt of the transition closed the conversation (rather than
            // finding it closed or active again).
            let closing = std::sync::atomic::AtomicBool::new(false);
            let result = self
                .transition(&tenant, &id, None, |c| {
                    let reason = match state_of(c) {
                        pb::ConversationState::Bot => pb::CloseReason::Abandoned,
                        pb::ConversationState::Resolved => pb::CloseReason::Resolved,
                        // A human is involved, or it is closed already.
                        _ => pb::CloseReason::Unspecified,
                    };
                    let last = c
                        .updated_at
                        .as_ref()
                        .map_or(0, crate::store::timestamp_micros);
                    let close = reason != pb::CloseReason::Unspecified && last < cutoff;
                    closing.store(close, std::sync::atomic::Ordering::Relaxed);
                    Ok(close.then(|| close_transition(reason, "closed for inactivity".into())))
                })
                .await;
            match result {
                Ok(_) if closing.load(std::sync::atomic::Ordering::Relaxed) => sweep.closed += 1,
                Ok(_) | Err(DialogError::NotFound(_)) => {}
                Err(DialogError::Aborted) => {
                    tracing::debug!(tenant = %tenant, conversation = %id,
                        "idle conversation kept changing; left for the next round");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(sweep)
    }

    /// Cancels a pending handoff (QUEUED → BOT).
    pub async fn cancel_handoff(
        &self,
        tenant: &TenantId,
        req: pb::CancelHandoffRequest,
    ) -> DialogResult<pb::Conversation> {
        check_note("reason", &req.reason, 500)?;
        self.transition(tenant, &req.conversation_id, None, |c| {
            if state_of(c) != pb::ConversationState::Queued {
                return Err(DialogError::Precondition(format!(
                    "conversation {} has no pending handoff",
                    c.id
                )));
            }
            if !req.handoff_id.is_empty() && req.handoff_id != c.handoff_id {
                return Err(DialogError::Precondition(format!(
                    "handoff {} is not the current one",
                    req.handoff_id
                )));
            }
            let reason = req.reason.clone();
            Ok(Some(Transition {
                reason: "handoff cancelled by customer".into(),
                events: Box::new(move |c, _, at| {
                    vec![ev(pb::HandoffCancelled {
                        handoff_id: c.handoff_id.clone(),
                        conversation_id: c.id.clone(),
                        scenario_id: c.scenario_id.clone(),
                        reason: reason.clone(),
                        occurred_at: Some(at),
                    })]
                }),
                ..Transition::new(pb::ConversationState::Bot)
            }))
        })
        .await
    }

    /// What a resolution event reports: the customer's first question, the agents' answers, the
    /// article versions the bot's answers cited (both from the last 200 messages) and the
    /// conversation's last recognised intent.
    async fn resolution_facts(
        &self,
        tenant: &TenantId,
        conversation_id: &str,
    ) -> DialogResult<ResolutionFacts> {
        let recent = self
            .store
            .last_messages(tenant, conversation_id, 200)
            .await?;
        let mut articles: Vec<common::ArticleRef> = Vec::new();
        for a in recent
            .iter()
            .filter(|m| m.sender_kind == pb::SenderKind::Bot as i32)
            .flat_map(|m| m.cited_articles.iter())
        {
            if !articles
                .iter()
                .any(|x| x.article_id == a.article_id && x.version == a.version)
            {
                articles.push(a.clone());
            }
        }
        let answers: Vec<String> = recent
            .into_iter()
            .filter(|m| m.sender_kind == pb::SenderKind::Agent as i32)
            .map(|m| m.text)
            .collect();
        let question = self
            .store
            .messages(tenant, conversation_id, 0, 50)
            .await?
            .into_iter()
            .find(|m| m.sender_kind == pb::SenderKind::Customer as i32)
            .map(|m| m.text)
            .unwrap_or_default();
        let traces = self
            .store
            .recent_traces(tenant, conversation_id, RECENT_TURNS)
            .await?;
        let intent = traces
            .iter()
            .rev()
            .find_map(|t| t.intent_scores.first().map(|s| s.intent.clone()))
            .unwrap_or_default();
        Ok(ResolutionFacts {
            question,
            answers,
            intent,
            articles,
            team: String::new(),
        })
    }

    /// Resolves a conversation: the assigned agent while AGENT, the channel while BOT.
    pub async fn resolve(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        req: pb::ResolveConversationRequest,
    ) -> DialogResult<pb::Conversation> {
        check_note("note", &req.note, 1_000)?;
        let (c, _) = self.load(tenant, &req.conversation_id).await?;
        let facts = self.resolution_facts(tenant, &c.id).await?;
        let actor = actor.clone();
        self.transition(tenant, &req.conversation_id, None, move |c| {
            let by = match state_of(c) {
                pb::ConversationState::Agent => {
                    // The assigned agent or a supervisor resolves for the agent; the channel
                    // resolves only what the bot holds.
                    let holder = actor.agent && c.assigned_agent_id == actor.id;
                    if !(actor.supervisor || holder) {
                        return Err(DialogError::Denied(format!(
                            "conversation {} is held by an agent; only that agent or a \
                             supervisor resolves it",
                            c.id
                        )));
                    }
                    common::HandlerKind::Agent
                }
                pb::ConversationState::Bot => {
                    if actor.agent && !actor.supervisor {
                        return Err(DialogError::Denied(
                            "an agent can only resolve a conversation assigned to them".into(),
                        ));
                    }
                    common::HandlerKind::Bot
                }
                s => {
                    return Err(DialogError::Precondition(format!(
                        "conversation {} is {}; it can be resolved from BOT or AGENT",
                        c.id,
                        s.as_str_name()
                    )));
                }
            };
            let agent_id = if by == common::HandlerKind::Agent {
                c.assigned_agent_id.clone()
            } else {
                String::new()
            };
            let facts = facts.clone();
            Ok(Some(Transition {
                reason: "resolved".into(),
                events: Box::new(move |c, _, at| {
                    vec![ev(facts.event(c, by, agent_id.clone(), at))]
                }),
                ..Transition::new(pb::ConversationState::Resolved)
            }))
        })
        .await
    }

    /// Records an agent's review of a suggestion. A suggestion is reviewed once: the write is
    /// conditional on it having no review yet, so of two concurrent reviews one wins and the
    /// other is refused like a late one.
    pub async fn review(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        req: pb::ReviewSuggestionRequest,
    ) -> DialogResult<pb::Suggestion> {
        if req.suggestion_id.is_empty() {
            return Err(DialogError::Invalid("suggestion_id is empty".into()));
        }
        check_note("edited_text", &req.edited_text, MAX_TEXT_CHARS)?;
        check_note("reason", &req.reason, 1_000)?;
        let outcome = pb::SuggestionOutcome::try_from(req.outcome)
            .ok()
            .filter(|o| *o != pb::SuggestionOutcome::Unspecified)
            .ok_or_else(|| DialogError::Invalid("outcome is required".into()))?;
        if outcome == pb::SuggestionOutcome::Edited {
            check_text("edited_text", &req.edited_text)?;
        }
        for _ in 0..ATTEMPTS {
            let mut s = self
                .store
                .suggestion(tenant, &req.suggestion_id)
                .await?
                .ok_or_else(|| {
                    DialogError::NotFound(format!("suggestion {}", req.suggestion_id))
                })?;
            if s.review.is_some() {
                return Err(DialogError::Precondition(format!(
                    "suggestion {} was reviewed already",
                    s.id
                )));
            }
            let (c, _) = self.load(tenant, &s.conversation_id).await?;
            if actor.agent && !actor.supervisor && c.assigned_agent_id != actor.id {
                return Err(DialogError::Denied(format!(
                    "agent {} is not assigned to conversation {}",
                    actor.id, c.id
                )));
            }
            let at = now();
            s.review = Some(pb::SuggestionReview {
                suggestion_id: s.id.clone(),
                outcome: outcome as i32,
                edited_text: req.edited_text.clone(),
                reason: req.reason.clone(),
                agent_id: actor.id.clone(),
                reviewed_at: Some(at),
            });
            let change = Change {
                suggestions: vec![s.clone()],
                events: vec![suggestion_reviewed(tenant, &c, &s, at)],
                ..Default::default()
            };
            match self.commit(tenant, change).await {
                Ok(_) => return Ok(s),
                // Reviewed concurrently: the next read finds the review and refuses.
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(DialogError::Aborted)
    }

    // ---------------------------------------------------------------- routing's feedback

    /// Applies one of routing's events to the conversation it concerns.
    pub async fn on_routing(
        &self,
        tenant: &TenantId,
        claim: (String, String),
        conversation_id: &str,
        handoff_id: &str,
        effect: RoutingEffect,
    ) -> DialogResult<()> {
        // A resolution by the agent is reported like one through `ResolveConversation`, so
        // knowledge can mine it and analytics can count it.
        let facts = match effect {
            RoutingEffect::Resolved { ref team, .. } => {
                match self.resolution_facts(tenant, conversation_id).await {
                    Ok(facts) => Some(ResolutionFacts {
                        team: team.clone(),
                        ..facts
                    }),
                    Err(DialogError::NotFound(_)) => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            _ => None,
        };
        let result = self
            .transition(tenant, conversation_id, Some(claim), |c| {
                if c.handoff_id != handoff_id {
                    return Ok(None);
                }
                let state = state_of(c);
                let zh = is_zh(c);
                Ok(match &effect {
                    RoutingEffect::Queued(q) if state == pb::ConversationState::Queued => {
                        Some(Transition {
                            queue: Some(q.clone()),
                            system_text: Some(Texts::queued(zh, q.position, q.eta_seconds)),
                            reason: "queued".into(),
                            ..Transition::new(pb::ConversationState::Queued)
                        })
                    }
                    RoutingEffect::Assigned(agent) if state == pb::ConversationState::Queued => {
                        Some(Transition {
                            agent: Some(agent.clone()),
                            system_text: Some(Texts::agent_joined(zh).into()),
                            reason: "agent assigned".into(),
                            ..Transition::new(pb::ConversationState::Agent)
                        })
                    }
                    // A warm transfer: the target accepted, the conversation changes hands.
                    RoutingEffect::Assigned(agent)
                        if state == pb::ConversationState::Agent
                            && !agent.is_empty()
                            && *agent != c.assigned_agent_id =>
                    {
                        Some(Transition {
                            agent: Some(agent.clone()),
                            system_text: Some(Texts::agent_changed(zh).into()),
                            reason: "transferred to another agent".into(),
                            ..Transition::new(pb::ConversationState::Agent)
                        })
                    }
                    // A cold transfer: the agent let go, the conversation waits for the next one.
                    // Routing's events can reach dialog's replicas out of order: a transfer by
                    // an agent who no longer holds the conversation (the next agent's
                    // assignment came first) is stale.
                    RoutingEffect::Requeued { from_agent }
                        if state == pb::ConversationState::Agent
                            && (from_agent.is_empty() || *from_agent == c.assigned_agent_id) =>
                    {
                        Some(Transition {
                            agent: Some(String::new()),
                            system_text: Some(Texts::transferring(zh).into()),
                            reason: "transferred back to the queue".into(),
                            ..Transition::new(pb::ConversationState::Queued)
                        })
                    }
                    RoutingEffect::BackToBot { leave_message }
                        if matches!(
                            state,
                            pb::ConversationState::Queued | pb::ConversationState::Agent
                        ) =>
                    {
                        Some(Transition {
                            agent: Some(String::new()),
                            system_text: Some(
                                if *leave_message {
                                    Texts::leave_message(zh)
                                } else {
                                    Texts::back_to_bot(zh)
                                }
                                .into(),
                            ),
                            reason: "returned to the bot".into(),
                            ..Transition::new(pb::ConversationState::Bot)
                        })
                    }
                    // Final for the handoff. While QUEUED, the assignment it ends has not been
                    // applied yet (handled by another replica, or retried): it is not needed
                    // any more, and when it comes the conversation is no longer waiting for it.
                    RoutingEffect::Resolved { agent, .. }
                        if matches!(
                            state,
                            pb::ConversationState::Agent | pb::ConversationState::Queued
                        ) =>
                    {
                        let facts = facts.clone().unwrap_or_default();
                        let agent_id = if state == pb::ConversationState::Agent {
                            c.assigned_agent_id.clone()
                        } else {
                            agent.clone()
                        };
                        Some(Transition {
                            agent: Some(agent_id.clone()),
                            reason: "resolved by the agent".into(),
                            events: Box::new(move |c, _, at| {
                                vec![ev(facts.event(
                                    c,
                                    common::HandlerKind::Agent,
                                    agent_id.clone(),
                                    at,
                                ))]
                            }),
                            ..Transition::new(pb::ConversationState::Resolved)
                        })
                    }
                    _ => None,
                })
            })
            .await;
        match result {
            Ok(_) | Err(DialogError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stores a queue's statistics received in a `QueueStatsReported` event.
    pub async fn on_queue_stats(
        &self,
        tenant: &TenantId,
        claim: (String, String),
        stats: routing::QueueStatsReported,
    ) -> DialogResult<()> {
        if stats.queue_id.is_empty() || stats.occurred_at.is_none() {
            return Ok(());
        }
        self.commit(
            tenant,
            Change {
                queue_stats: vec![stats],
                claim: Some(claim),
                ..Default::default()
            },
        )
        .await?;
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
        Ok(())
    }

    /// Stores a scenario received in a `PolicyUpdated` event.
    pub async fn on_policy(
        &self,
        tenant: &TenantId,
        claim: (String, String),
        update: policy::PolicyUpdated,
    ) -> DialogResult<()> {
        let Some(mut scenario) = update.scenario else {
            return Ok(());
        };
        if scenario.id.is_empty() {
            scenario.id.clone_from(&update.scenario_id);
        }
        self.commit(
            tenant,
            Change {
                policies: vec![(scenario, update.version, update.deleted)],
                claim: Some(claim),
                ..Default::default()
            },
        )
        .await?;
        self.forget_catalogue(tenant);
        Ok(())
    }

    // ---------------------------------------------------------------- traces

    /// Returns one trace.
    pub async fn trace(
        &self,
        tenant: &TenantId,
        id: Option<&str>,
        message_id: Option<&str>,
    ) -> DialogResult<pb::DecisionTrace> {
        if id.is_none_or(str::is_empty) && message_id.is_none_or(str::is_empty) {
            return Err(DialogError::Invalid(
                "trace_id or message_id is required".into(),
            ));
        }
        self.store
            .trace(tenant, id, message_id)
            .await?
            .ok_or_else(|| DialogError::NotFound("decision trace".into()))
    }

    /// Lists a conversation's traces.
    pub async fn traces(
        &self,
        tenant: &TenantId,
        id: &str,
        offset: i64,
        limit: i64,
    ) -> DialogResult<Vec<pb::DecisionTrace>> {
        self.load(tenant, id).await?;
        Ok(self.store.traces(tenant, id, offset, limit).await?)
    }

    /// Drops the cached model of a tenant (after an activation).
    pub fn forget_model(&self, tenant: &TenantId) {
        self.nlu
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
    }
}

/// What one round of the idle sweep did ([`App::close_idle`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Idle conversations found.
    pub found: usize,
    /// Of those, closed by this round.
    pub closed: usize,
}

/// The transition to CLOSED with its `ConversationClosed` event; `note` is the state change's
/// reason shown to watchers.
fn close_transition(reason: pb::CloseReason, note: String) -> Transition {
    Transition {
        reason: note,
        close_reason: reason,
        events: Box::new(move |c, from, at| {
            let e = pb::ConversationClosed {
                conversation_id: c.id.clone(),
                scenario_id: c.scenario_id.clone(),
                reason: reason as i32,
                final_state: from as i32,
                handoff_id: c.handoff_id.clone(),
                agent_id: c.assigned_agent_id.clone(),
                test: c.test,
                occurred_at: Some(at),
            };
            vec![ev(e)]
        }),
        ..Transition::new(pb::ConversationState::Closed)
    }
}

/// Builds a boxed event constructor.
fn ev<E: tandem_proto::events::Event>(e: E) -> EventFn {
    Box::new(move |tenant, c| RawEvent::new(tenant, &e, Some(c.id.clone())))
}

type EventFn = Box<dyn FnOnce(&TenantId, &pb::Conversation) -> RawEvent + Send>;
type EventsFn = Box<
    dyn Fn(&pb::Conversation, pb::ConversationState, prost_types::Timestamp) -> Vec<EventFn> + Send,
>;

/// A state transition.
pub struct Transition {
    to: pb::ConversationState,
    agent: Option<String>,
    queue: Option<pb::QueueInfo>,
    system_text: Option<String>,
    reason: String,
    close_reason: pb::CloseReason,
    events: EventsFn,
}

impl Transition {
    fn new(to: pb::ConversationState) -> Self {
        Self {
            to,
            agent: None,
            queue: None,
            system_text: None,
            reason: String::new(),
            close_reason: pb::CloseReason::Unspecified,
            events: Box::new(|_, _, _| Vec::new()),
        }
    }
}

/// What a routing event does to its conversation.
#[derive(Debug, Clone)]
pub enum RoutingEffect {
    /// Queued, or the position changed.
    Queued(pb::QueueInfo),
    /// An agent accepted: the first one, or the target of a warm transfer.
    Assigned(String),
    /// A cold transfer: the assigned agent let go and the conversation waits in the queue for
    /// another agent.
    Requeued {
        /// The agent who let go (empty when routing did not say).
        from_agent: String,
    },
    /// Back to the bot (returned, abandoned by routing, assignment returned); with
    /// `leave_message` (a queue closed with that behaviour) the customer is offered to leave a
    /// message.
    BackToBot {
        /// Offer to leave a message instead of carrying on with the bot.
        leave_message: bool,
    },
    /// The agent resolved it.
    Resolved {
        /// The agent's team, as routing reports it.
        team: String,
        /// The agent, as routing reports it.
        agent: String,
    },
}

/// Whether a prediction the classifier rejects is really torn between two known intents (the
/// words are known and two intents share most of the probability): the bot then clarifies
/// instead of falling back.
fn ambiguous(p: &tandem_nlu::Prediction, model: Option<&tandem_nlu::TextClassifier>) -> bool {
    let coverage_ok = model.is_none_or(|m| p.word_coverage >= m.min_word_coverage());
    match p.ranked.as_slice() {
        [first, second, ..] => {
            coverage_ok
                && first.probability + second.probability >= 0.8
                && second.probability >= 0.2
        }
        _ => false,
    }
}

/// The scenario a turn was resolved to when it claims the turn's intent: a scenario of the
/// tenant, not the fallback the catalogue uses when no scenario claims the intent.
/// The statistics of the queue a handoff of `scenario` would wait in, chosen as routing chooses
/// it: the queue the scenario names, else the queue the scenario is routed to, else the default
/// queue. `None` when that queue has not reported, or its last report is older than `max_age`.
fn queue_for<'a>(
    stats: &'a [routing::QueueStatsReported],
    named: &str,
    scenario: &str,
    now: std::time::SystemTime,
    max_age: Duration,
) -> Option<&'a routing::QueueStatsReported> {
    let chosen = stats
        .iter()
        .find(|q| !named.is_empty() && q.queue_id == named)
        .or_else(|| {
            stats
                .iter()
                .find(|q| !scenario.is_empty() && q.scenario_ids.iter().any(|s| s == scenario))
        })
        .or_else(|| stats.iter().find(|q| q.default_queue))?;
    let measured = chosen.occurred_at.and_then(|t| {
        let secs = u64::try_from(t.seconds).ok()?;
        let nanos = u32::try_from(t.nanos).ok()?;
        std::time::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
    })?;
    // A report from a clock slightly ahead counts as fresh.
    let age = now.duration_since(measured).unwrap_or_default();
    (age <= max_age).then_some(chosen)
}

fn claimed_scenario<'a>(entry: &'a Entry, intent: &str) -> Option<&'a str> {
    (!intent.is_empty() && entry.engine.intents.iter().any(|i| i == intent))
        .then_some(entry.wire.id.as_str())
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

struct PackageInput<'a> {
    c: &'a pb::Conversation,
    decision: &'a policy::Decision,
    ctx: &'a policy::DecisionContext,
    history: &'a [pb::DecisionTrace],
    this_turn: (
        i32,
        &'a str,
        f64,
        &'a pb::Message,
        &'a common::Sentiment,
        &'a [common::Entity],
    ),
    recent: Vec<pb::Message>,
    trace_id: &'a str,
    received_at: prost_types::Timestamp,
}

/// The observed values and thresholds of the rule that fired, by its id (the policy engine's
/// `RuleId` names): each rule reports the numbers it compared. `human_first` fires on the
/// scenario's strategy alone and reports none; rules that never hand off report none either.
fn trigger_numbers(
    rule: &str,
    ctx: &policy::DecisionContext,
    th: Option<&policy::Thresholds>,
) -> (HashMap<String, f64>, HashMap<String, f64>) {
    let th = th.cloned().unwrap_or_default();
    let flag = |on: bool| if on { 1.0 } else { 0.0 };
    let (key, value, threshold) = match rule {
        "explicit_request" => ("human_requested", flag(ctx.human_requested), Some(1.0)),
        "sensitive_topic" => ("sensitive_topic", flag(ctx.sensitive_topic), Some(1.0)),
        "negative_sentiment" => ("sentiment", ctx.sentiment, th.negative_sentiment),
        "sentiment_drop" => ("sentiment_drop", ctx.sentiment_drop, th.sentiment_drop),
        "max_fallbacks" => (
            "fallbacks",
            f64::from(ctx.fallbacks),
            th.max_fallbacks.map(f64::from),
        ),
        "max_complexity" => ("complexity", ctx.complexity, th.max_complexity),
        "max_bot_turns" => (
            "bot_turns",
            f64::from(ctx.bot_turns),
            th.max_bot_turns.map(f64::from),
        ),
        "min_intent_confidence" | "clarify_confidence" => (
            "intent_confidence",
            ctx.intent_confidence,
            th.min_intent_confidence,
        ),
        _ => return (HashMap::new(), HashMap::new()),
    };
    let values = HashMap::from([(key.to_owned(), value)]);
    let thresholds = threshold
        .map(|t| HashMap::from([(key.to_owned(), t)]))
        .unwrap_or_default();
    (values, thresholds)
}

/// Splits customer text into sentences.
fn sentences(text: &str) -> Vec<String> {
    text.split(['。', '！', '？', '!', '?', '\n', '；', ';'])
        .flat_map(|s| s.split(". "))
        .map(str::trim)
        .filter(|s| s.chars().count() >= 2)
        .map(str::to_owned)
        .collect()
}

/// Builds the handoff package of a turn.
fn build_package(p: PackageInput<'_>) -> pb::HandoffPackage {
    let (turn_index, top, confidence, message, sentiment, entities) = p.this_turn;
    let d = p.decision;
    let (values, thresholds) = trigger_numbers(&d.rule_id, p.ctx, d.thresholds.as_ref());
    let mut intents_tried: Vec<pb::IntentAttempt> = p
        .history
        .iter()
        .filter_map(|t| {
            t.intent_scores.first().map(|s| pb::IntentAttempt {
                intent: s.intent.clone(),
                confidence: s.confidence,
                turn_index: t.turn_index,
                action: t.action,
            })
        })
        .collect();
    if !top.is_empty() {
        intents_tried.push(pb::IntentAttempt {
            intent: top.to_owned(),
            confidence,
            turn_index,
            action: pb::BotAction::Handoff as i32,
        });
    }
    let skip = intents_tried.len().saturating_sub(20);
    intents_tried.drain(..skip);
    let mut trajectory: Vec<pb::SentimentPoint> = p
        .history
        .iter()
        .map(|t| pb::SentimentPoint {
            turn_index: t.turn_index,
            message_id: t.message_id.clone(),
            sentiment: t.sentiment.clone(),
        })
        .collect();
    trajectory.push(pb::SentimentPoint {
        turn_index,
        message_id: message.id.clone(),
        sentiment: Some(sentiment.clone()),
    });
    let skip = trajectory.len().saturating_sub(50);
    trajectory.drain(..skip);
    // Extractive summary: the customer sentences carrying the most information (entities and
    // digits weigh more, then length), in their order of appearance.
    let customer: Vec<&pb::Message> = p
        .recent
        .iter()
        .filter(|m| m.sender_kind == pb::SenderKind::Customer as i32)
        .collect();
    let mut all: Vec<(usize, String, usize)> = Vec::new();
    for m in customer {
        for s in sentences(&m.text) {
            let digits = s.chars().filter(char::is_ascii_digit).count();
            let score = s.chars().count().min(80) + if digits > 3 { 40 } else { 0 };
            if !all.iter().any(|(_, t, _)| *t == s) {
                all.push((all.len(), s, score));
            }
        }
    }
    let mut ranked = all.clone();
    ranked.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    let mut keep: Vec<usize> = ranked.iter().take(5).map(|x| x.0).collect();
    keep.sort_unstable();
    let summary = keep.iter().map(|&i| all[i].1.clone()).collect();
    let mut all_entities: Vec<common::Entity> = p
        .history
        .iter()
        .flat_map(|t| t.entities.iter().cloned())
        .chain(entities.iter().cloned())
        .collect();
    let mut seen = std::collections::HashSet::new();
    all_entities.retain(|e| seen.insert((e.kind, e.normalized.clone())));
    all_entities.truncate(50);
    let mut articles: Vec<common::ArticleRef> = Vec::new();
    for a in p.history.iter().flat_map(|t| t.articles.iter()) {
        if !articles
            .iter()
            .any(|x| x.article_id == a.article_id && x.version == a.version)
        {
            articles.push(a.clone());
        }
    }
    let routing = d.routing.clone().unwrap_or_default();
    let mut skills = routing.skills.clone();
    let lang_skill = match common::Language::try_from(p.c.language) {
        Ok(common::Language::En) => Some("lang:en"),
        Ok(common::Language::Zh) => Some("lang:zh"),
        _ => None,
    };
    if let Some(l) = lang_skill
        && !skills.iter().any(|s| s.name == l)
    {
        skills.push(common::SkillRequirement {
            name: l.to_owned(),
            min_level: 1,
        });
    }
    let last_sequence = p.recent.last().map_or(0, |m| m.sequence);
    let mut recent = p.recent;
    let skip = recent.len().saturating_sub(20);
    recent.drain(..skip);
    pb::HandoffPackage {
        handoff_id: new_id(),
        conversation_id: p.c.id.clone(),
        customer: p.c.customer.clone(),
        trigger: Some(pb::HandoffTrigger {
            reason: d.handoff_reason,
            rule_id: d.rule_id.clone(),
            explanation: d.explanation.chars().take(500).collect(),
            values,
            thresholds,
        }),
        // The policy's decision names only the first rule that fired (its rule order), not the
        // others that would have fired too.
        other_triggers: Vec::new(),
        scenario_id: p.c.scenario_id.clone(),
        tier: d.tier,
        policy_version: d.policy_version,
        intents_tried,
        sentiment_trajectory: trajectory,
        summary,
        entities: all_entities,
        recent_messages: recent,
        transcript: Some(pb::TranscriptRef {
            conversation_id: p.c.id.clone(),
            last_sequence,
            message_count: p.c.message_count,
        }),
        articles_used: articles,
        required_skills: skills,
        language: p.c.language,
        priority: if routing.priority > 0 {
            routing.priority
        } else {
            50
        },
        queue_id: routing.queue_id,
        decision_trace_id: p.trace_id.to_owned(),
        triggered_by_message_id: message.id.clone(),
        trigger_received_at: Some(p.received_at),
        requested_at: Some(now()),
        test: p.c.test,
    }
}

/// What a `ConversationResolved` event reports besides the conversation itself.
#[derive(Clone, Debug, Default)]
struct ResolutionFacts {
    question: String,
    answers: Vec<String>,
    intent: String,
    /// Article versions cited by the bot's answers, first citation first.
    articles: Vec<common::ArticleRef>,
    /// The resolving agent's team, when routing reported it.
    team: String,
}

impl ResolutionFacts {
    fn event(
        &self,
        c: &pb::Conversation,
        by: common::HandlerKind,
        agent_id: String,
        at: prost_types::Timestamp,
    ) -> pb::ConversationResolved {
        let n = self.answers.len();
        pb::ConversationResolved {
            conversation_id: c.id.clone(),
            scenario_id: c.scenario_id.clone(),
            resolved_by: by as i32,
            agent_id,
            team: if by == common::HandlerKind::Agent {
                self.team.clone()
            } else {
                String::new()
            },
            handoff_id: c.handoff_id.clone(),
            intent: self.intent.clone(),
            customer_question: self.question.chars().take(MAX_TEXT_CHARS).collect(),
            agent_answers: self.answers[n.saturating_sub(5)..].to_vec(),
            articles_used: self.articles.clone(),
            language: c.language,
            channel: c.channel,
            reopen_count: c.reopen_count,
            test: c.test,
            occurred_at: Some(at),
        }
    }
}

/// The `SuggestionReviewed` event of suggestion `s` of conversation `c`, reviewed at `at`.
fn suggestion_reviewed(
    tenant: &TenantId,
    c: &pb::Conversation,
    s: &pb::Suggestion,
    at: prost_types::Timestamp,
) -> RawEvent {
    RawEvent::new(
        tenant,
        &pb::SuggestionReviewed {
            conversation_id: c.id.clone(),
            scenario_id: c.scenario_id.clone(),
            suggestion: Some(s.clone()),
            occurred_at: Some(at),
        },
        Some(c.id.clone()),
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn report(
        queue: &str,
        scenarios: &[&str],
        default_queue: bool,
        age: u64,
    ) -> routing::QueueStatsReported {
        routing::QueueStatsReported {
            queue_id: queue.into(),
            scenario_ids: scenarios.iter().map(|s| (*s).to_owned()).collect(),
            default_queue,
            occurred_at: Some(prost_types::Timestamp {
                seconds: i64::try_from(NOW - age).unwrap_or_default(),
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    fn pick<'a>(
        stats: &'a [routing::QueueStatsReported],
        named: &str,
        scenario: &str,
    ) -> Option<&'a str> {
        let now = UNIX_EPOCH + Duration::from_secs(NOW);
        queue_for(stats, named, scenario, now, Duration::from_secs(600))
            .map(|q| q.queue_id.as_str())
    }

    #[test]
    fn the_queue_is_chosen_as_routing_chooses_it() {
        let stats = [
            report("billing", &["refunds"], false, 10),
            report("default", &[], true, 10),
            report("vip", &[], false, 10),
        ];
        assert_eq!(pick(&stats, "vip", "refunds"), Some("vip"));
        assert_eq!(pick(&stats, "", "refunds"), Some("billing"));
        // A named queue that has not reported falls back like routing does.
        assert_eq!(pick(&stats, "gone", "refunds"), Some("billing"));
        assert_eq!(pick(&stats, "", "orders"), Some("default"));
        assert_eq!(pick(&stats, "", ""), Some("default"));
        assert_eq!(pick(&stats[..1], "", "orders"), None);
        assert_eq!(pick(&[], "vip", "refunds"), None);
    }

    #[test]
    fn a_stale_report_counts_as_unknown() {
        let stats = [
            report("billing", &["refunds"], false, 601),
            report("default", &[], true, 0),
        ];
        // The scenario's queue is stale: unknown, not another queue's figures.
        assert_eq!(pick(&stats, "", "refunds"), None);
        assert_eq!(pick(&stats, "", "orders"), Some("default"));
        // A report from a clock ahead of this one is fresh.
        let ahead = [routing::QueueStatsReported {
            occurred_at: Some(prost_types::Timestamp {
                seconds: i64::try_from(NOW + 5).unwrap_or_default(),
                nanos: 0,
            }),
            ..report("default", &[], true, 0)
        }];
        assert_eq!(pick(&ahead, "", ""), Some("default"));
    }
}
