//! The knowledge service's use cases: the article workflow with immutable versions, search with
//! gap recording, mining of human resolutions into candidates and their review.
//!
//! Workflow rules (the statuses are those of `tandem.knowledge.v1`):
//! - a change never edits a version's content: `UpdateDraft` adds a version;
//! - a version goes draft → in review → approved → published; a rejection marks it rejected
//!   with the reason and the article falls back to draft (the author then writes a new draft);
//! - the reviewer of a version must not be its author;
//! - publishing needs an approved version newer than the published one; the published one is
//!   superseded;
//! - an archived article accepts no change.
//!
//! Imports with `publish` and candidate approvals with publish skip the review step: the caller,
//! who must hold a reviewing role, is recorded as the reviewer. What they skip review for is
//! only their own change: a candidate builds on the published version, never on a newer
//! unreviewed or rejected one.

use std::sync::Arc;
use std::time::Duration;

use tandem_platform::bus::RawEvent;
use tandem_platform::error::{ErrorCode, ServiceError};
use tandem_platform::outbox::OutboxWaker;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1::{self as common, HandlerKind, Language, ValidationError};
use tandem_proto::pb::dialog::v1::{BotAction, BotReplied, ConversationResolved};
use tandem_proto::pb::knowledge::v1 as pb;
use tandem_search::{Audience, SearchError, SearchRequest};

use crate::freshness::{Indexer, language_code};
use crate::store::{
    ArticleFilter, CandidateRow, Change, Existing, Fallback, GapFilter, GapHit, Loaded, Store,
    StoreError, VersionRow, micros_timestamp, now_micros,
};

/// Longest title.
pub const MAX_TITLE_CHARS: usize = 200;
/// Most question variants.
pub const MAX_QUESTIONS: usize = 50;
/// Longest question variant.
pub const MAX_QUESTION_CHARS: usize = 500;
/// Longest answer.
pub const MAX_ANSWER_CHARS: usize = 20_000;
/// Longest change note.
pub const MAX_NOTE_CHARS: usize = 500;
/// Most tags.
pub const MAX_TAGS: usize = 20;
/// Longest tag.
pub const MAX_TAG_CHARS: usize = 32;
/// Longest external id.
pub const MAX_EXTERNAL_ID_CHARS: usize = 128;
/// Longest comment or reason.
pub const MAX_COMMENT_CHARS: usize = 1_000;
/// Longest identifier (article, scenario, candidate).
pub const MAX_ID_CHARS: usize = 64;
/// Longest candidate question or answer.
const MAX_CANDIDATE_CHARS: usize = 4_000;
/// Conversations kept in a candidate's provenance.
const MAX_PROVENANCE: usize = 50;
/// Longest recorded gap query.
const MAX_GAP_QUERY_CHARS: usize = 200;
/// How long a gap is kept after it was last seen: the longest window gap reports are meant
/// for. Older gaps are deleted hourly.
pub const GAP_RETENTION: Duration = Duration::from_secs(90 * 86_400);
/// The actor of automatic changes.
pub const SYSTEM_ACTOR: &str = "system";

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum KnowledgeError {
    /// Validation failed; every problem is listed.
    #[error("{} problem(s): {}", .0.len(), render(.0))]
    Invalid(Vec<ValidationError>),
    /// Something addressed does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// An optimistic-concurrency check failed.
    #[error("{0}")]
    Aborted(String),
    /// The state does not allow the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The search index failed.
    #[error("search failed")]
    Search(#[source] SearchError),
    /// Storage failed.
    #[error("storage failed")]
    Store(#[source] StoreError),
    /// Storage failed for a row of an import; the message says why.
    #[error("storage failed: {0}")]
    Unavailable(String),
}

impl From<StoreError> for KnowledgeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => {
                Self::Aborted("the article changed concurrently; read it again and retry".into())
            }
            StoreError::CandidateNotPending(id) => Self::Aborted(format!(
                "candidate {id:?} was reviewed or expired concurrently; read it again"
            )),
            StoreError::DuplicateExternalId(id) => {
                Self::AlreadyExists(format!("external id {id:?} is already used"))
            }
            e => Self::Store(e),
        }
    }
}

fn render(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.path, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ServiceError for KnowledgeError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Self::Aborted(_) => ErrorCode::Aborted,
            Self::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Self::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Self::Search(e) if e.is_invalid_input() => ErrorCode::InvalidArgument,
            Self::Search(_) => ErrorCode::Unavailable,
            Self::Store(_) => ErrorCode::Internal,
            Self::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

/// A validation problem at `path`.
pub fn violation(path: &str, message: impl Into<String>) -> ValidationError {
    ValidationError {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// A single validation failure.
pub fn invalid(path: &str, message: impl Into<String>) -> KnowledgeError {
    KnowledgeError::Invalid(vec![violation(path, message)])
}

/// Collects validation problems.
#[derive(Default)]
pub struct Problems(pub Vec<ValidationError>);

impl Problems {
    /// Checks a text: length bounds and no control characters (newlines and tabs allowed when
    /// `multiline`).
    pub fn text(&mut self, path: &str, value: &str, min: usize, max: usize, multiline: bool) {
        let chars = value.chars().count();
        if min > 0 && value.trim().is_empty() {
            self.0.push(violation(path, "is empty"));
        } else if chars > max {
            self.0.push(violation(
                path,
                format!("has {chars} characters, more than {max}"),
            ));
        } else if value
            .chars()
            .any(|c| c.is_control() && !(multiline && matches!(c, '\n' | '\t' | '\r')))
        {
            self.0.push(violation(path, "contains control characters"));
        }
    }

    /// Fails with every problem, if any.
    pub fn done(self) -> Result<(), KnowledgeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(KnowledgeError::Invalid(self.0))
        }
    }
}

/// Checks an identifier.
pub fn check_id(path: &str, id: &str) -> Result<(), KnowledgeError> {
    let mut p = Problems::default();
    p.text(path, id, 1, MAX_ID_CHARS, false);
    p.done()
}

/// Who asks for a change.
#[derive(Debug, Clone)]
pub struct Actor {
    /// User id.
    pub id: String,
}

/// The content of a new version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Content {
    /// Title.
    pub title: String,
    /// Question variants.
    pub questions: Vec<String>,
    /// Answer.
    pub answer: String,
    /// Change note.
    pub change_note: String,
}

impl Content {
    /// Trims the texts and drops empty question variants and duplicates.
    pub fn normalised(mut self) -> Self {
        self.title = self.title.trim().to_owned();
        self.answer = self.answer.trim().to_owned();
        let mut qs: Vec<String> = Vec::with_capacity(self.questions.len());
        for q in self.questions {
            let q = q.trim().to_owned();
            if !q.is_empty() && !qs.contains(&q) {
                qs.push(q);
            }
        }
        self.questions = qs;
        self
    }

    fn check(&self, p: &mut Problems) {
        p.text("title", &self.title, 1, MAX_TITLE_CHARS, false);
        if self.questions.is_empty() {
            p.0.push(violation("questions", "needs at least one question"));
        } else if self.questions.len() > MAX_QUESTIONS {
            p.0.push(violation(
                "questions",
                format!(
                    "has {} variants, more than {MAX_QUESTIONS}",
                    self.questions.len()
                ),
            ));
        }
        for (i, q) in self.questions.iter().enumerate() {
            p.text(&format!("questions[{i}]"), q, 1, MAX_QUESTION_CHARS, false);
        }
        p.text("answer", &self.answer, 1, MAX_ANSWER_CHARS, true);
        p.text("change_note", &self.change_note, 0, MAX_NOTE_CHARS, true);
    }

    fn same_as(&self, v: &pb::ArticleVersion) -> bool {
        self.title == v.title && self.questions == v.questions && self.answer == v.answer
    }
}

/// Checks a tag list.
pub fn check_tags(p: &mut Problems, tags: &[String]) {
    if tags.len() > MAX_TAGS {
        p.0.push(violation(
            "tags",
            format!("has {} tags, more than {MAX_TAGS}", tags.len()),
        ));
    }
    for (i, t) in tags.iter().enumerate() {
        p.text(&format!("tags[{i}]"), t, 1, MAX_TAG_CHARS, false);
    }
}

fn normalised_tags(tags: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for t in tags {
        let t = t.trim().to_owned();
        if !out.contains(&t) {
            out.push(t);
        }
    }
    out
}

/// Guesses the language of a text: Chinese when it has Han characters, English otherwise.
pub fn detect_language(text: &str) -> Language {
    let han = text
        .chars()
        .any(|c| matches!(c, '\u{4e00}'..='\u{9fff}' | '\u{3400}'..='\u{4dbf}'));
    if han { Language::Zh } else { Language::En }
}

/// The fields an import row leaves empty. An existing article keeps its values of these: the
/// import's defaults are for new articles only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unnamed {
    /// No scenario: the article's stays (a named one must be the article's).
    pub scenario: bool,
    /// No language: the article's stays (a named one must be the article's).
    pub language: bool,
    /// No visibility: the current version's stays.
    pub visibility: bool,
    /// No tags: the current version's stay.
    pub tags: bool,
}

/// A new article.
#[derive(Debug, Clone, Default)]
pub struct NewArticle {
    /// External id, or empty.
    pub external_id: String,
    /// Scenario.
    pub scenario_id: String,
    /// Language; unspecified detects it.
    pub language: i32,
    /// Visibility; unspecified means both.
    pub visibility: i32,
    /// Tags.
    pub tags: Vec<String>,
    /// Content of version 1.
    pub content: Content,
    /// For an import row matching an existing article: the fields the row left empty (nothing,
    /// by default).
    pub unnamed: Unnamed,
}

impl NewArticle {
    /// Normalises and checks every field.
    pub fn validated(mut self) -> Result<Self, KnowledgeError> {
        self.content = self.content.normalised();
        self.tags = normalised_tags(self.tags);
        self.external_id = self.external_id.trim().to_owned();
        self.scenario_id = self.scenario_id.trim().to_owned();
        let mut p = Problems::default();
        p.text(
            "external_id",
            &self.external_id,
            0,
            MAX_EXTERNAL_ID_CHARS,
            false,
        );
        p.text("scenario_id", &self.scenario_id, 1, MAX_ID_CHARS, false);
        if Language::try_from(self.language).is_err() {
            p.0.push(violation("language", "is not a known language"));
        }
        if pb::Visibility::try_from(self.visibility).is_err() {
            p.0.push(violation("visibility", "is not a known visibility"));
        }
        check_tags(&mut p, &self.tags);
        self.content.check(&mut p);
        p.done()?;
        if self.language == Language::Unspecified as i32 {
            let sample = format!(
                "{} {}",
                self.content.title,
                self.content.questions.join(" ")
            );
            self.language = detect_language(&sample) as i32;
        }
        if self.visibility == pb::Visibility::Unspecified as i32 {
            self.visibility = pb::Visibility::Both as i32;
        }
        Ok(self)
    }
}

/// A new version of an existing article.
#[derive(Debug, Clone, Default)]
pub struct NewVersion {
    /// Content.
    pub content: Content,
    /// New visibility; unspecified keeps it.
    pub visibility: i32,
    /// New tags; `None` keeps them.
    pub tags: Option<Vec<String>>,
}

impl NewVersion {
    /// Normalises and checks every field.
    pub fn validated(mut self) -> Result<Self, KnowledgeError> {
        self.content = self.content.normalised();
        self.tags = self.tags.map(normalised_tags);
        let mut p = Problems::default();
        if pb::Visibility::try_from(self.visibility).is_err() {
            p.0.push(violation("visibility", "is not a known visibility"));
        }
        if let Some(tags) = &self.tags {
            check_tags(&mut p, tags);
        }
        self.content.check(&mut p);
        p.done()?;
        Ok(self)
    }
}

/// How a new version enters the workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// As a draft.
    Draft,
    /// Published at once, the caller acting as reviewer.
    Publish,
}

/// What an import row did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOutcome {
    /// A new article.
    Created,
    /// A new version of the article with the same external id.
    Updated,
    /// Same content as the latest version.
    Unchanged,
}

/// Settings of the use cases.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// A bot search whose best score is below this records a gap.
    pub good_result_score: f32,
    /// A mined question whose best published match scores at least this (BM25) and shares at
    /// least `edit_proposal_similarity` of its terms with it becomes an edit proposal for that
    /// article.
    pub edit_proposal_score: f32,
    /// Least term similarity (Jaccard, 0..1) of an edit proposal with its article's matched
    /// question.
    pub edit_proposal_similarity: f64,
    /// Least similarity ([`duplicate_similarity`], 0..1) of a mined question with a pending
    /// candidate's question for the resolution to join that candidate.
    pub duplicate_similarity: f64,
    /// How long a candidate waits for review.
    pub candidate_ttl: Duration,
    /// How long a change waits to be searchable on this replica before answering.
    pub visible_wait: Duration,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            good_result_score: 4.0,
            edit_proposal_score: 2.0,
            edit_proposal_similarity: 0.5,
            duplicate_similarity: 0.55,
            candidate_ttl: Duration::from_secs(28 * 86_400),
            visible_wait: Duration::from_secs(1),
        }
    }
}

/// The knowledge service's use cases.
pub struct App {
    store: Store,
    outbox: OutboxWaker,
    indexer: Arc<Indexer>,
    opts: AppOptions,
}

fn now_ts() -> prost_types::Timestamp {
    micros_timestamp(now_micros())
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn audit(
    article_id: &str,
    version: i32,
    action: pb::AuditAction,
    actor: &str,
    comment: &str,
    at: prost_types::Timestamp,
) -> pb::AuditEntry {
    pb::AuditEntry {
        id: new_id(),
        article_id: article_id.to_owned(),
        version,
        action: action as i32,
        actor_id: actor.to_owned(),
        comment: comment.to_owned(),
        occurred_at: Some(at),
    }
}

fn status_name(status: i32) -> &'static str {
    match pb::VersionStatus::try_from(status) {
        Ok(pb::VersionStatus::Draft) => "a draft",
        Ok(pb::VersionStatus::InReview) => "in review",
        Ok(pb::VersionStatus::Approved) => "approved",
        Ok(pb::VersionStatus::Rejected) => "rejected",
        Ok(pb::VersionStatus::Published) => "published",
        Ok(pb::VersionStatus::Superseded) => "superseded",
        Ok(pb::VersionStatus::Archived) => "archived",
        _ => "in an unknown status",
    }
}

fn truncate_chars(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// A text on one line: runs of whitespace and control characters (line breaks included) become
/// one space, and the ends are trimmed. Questions are single-line; a customer's question may not
/// be.
fn single_line(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Normalises a query for gap grouping: lowercase, single spaces, no control characters.
pub fn normalise_query(q: &str) -> String {
    let cleaned: String = q
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .to_lowercase();
    truncate_chars(
        &cleaned.split_whitespace().collect::<Vec<_>>().join(" "),
        MAX_GAP_QUERY_CHARS,
    )
}

fn term_set(text: &str) -> Vec<String> {
    let mut terms = tandem_search::analyze(text);
    terms.sort();
    terms.dedup();
    terms
}

/// Jaccard similarity of the analysed terms of two texts.
fn similarity(a: &str, b: &str) -> f64 {
    let (x, y) = (term_set(a), term_set(b));
    if x.is_empty() || y.is_empty() {
        return 0.0;
    }
    let common = x.iter().filter(|t| y.binary_search(t).is_ok()).count();
    let union = x.len() + y.len() - common;
    #[allow(clippy::cast_precision_loss)]
    let s = common as f64 / union as f64;
    s
}

/// Whether a character is Han (Chinese).
fn is_han(c: char) -> bool {
    matches!(c, '\u{4e00}'..='\u{9fff}' | '\u{3400}'..='\u{4dbf}')
}

/// The features two questions are compared by to find near duplicates: the analysed terms of
/// the text outside Chinese (lowercased, stemmed as the index does) and the character bigrams
/// of each run of Chinese characters (a lone character counts as itself), which do not depend
/// on where word segmentation cuts.
fn duplicate_features(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut other = String::with_capacity(text.len());
    let mut run: Vec<char> = Vec::new();
    let flush = |run: &mut Vec<char>, out: &mut Vec<String>| {
        if run.len() == 1 {
            out.push(run[0].to_string());
        }
        for pair in run.windows(2) {
            out.push(pair.iter().collect());
        }
        run.clear();
    };
    for c in text.chars() {
        if is_han(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            other.push(c);
        }
    }
    flush(&mut run, &mut out);
    out.extend(tandem_search::analyze(&other));
    out.sort();
    out.dedup();
    out
}

/// Jaccard similarity of the near-duplicate features of two questions (0..1).
pub fn duplicate_similarity(a: &str, b: &str) -> f64 {
    let (x, y) = (duplicate_features(a), duplicate_features(b));
    if x.is_empty() || y.is_empty() {
        return 0.0;
    }
    let common = x.iter().filter(|t| y.binary_search(t).is_ok()).count();
    let union = x.len() + y.len() - common;
    #[allow(clippy::cast_precision_loss)]
    let s = common as f64 / union as f64;
    s
}

/// The deduplication key of a mined question: its sorted distinct terms.
pub fn dedup_key(question: &str) -> String {
    let terms = term_set(question);
    if terms.is_empty() {
        normalise_query(question)
    } else {
        terms.join(" ")
    }
}

/// A title derived from a question: its first line, at most 200 characters.
fn derive_title(question: &str) -> String {
    truncate_chars(
        question.lines().next().unwrap_or("").trim(),
        MAX_TITLE_CHARS,
    )
}

impl App {
    /// Wires the use cases.
    pub fn new(store: Store, outbox: OutboxWaker, indexer: Arc<Indexer>, opts: AppOptions) -> Self {
        Self {
            store,
            outbox,
            indexer,
            opts,
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The indexer.
    pub fn indexer(&self) -> &Arc<Indexer> {
        &self.indexer
    }

    async fn load(&self, tenant: &TenantId, article_id: &str) -> Result<Loaded, KnowledgeError> {
        check_id("article_id", article_id)?;
        self.store
            .article(tenant, article_id)
            .await?
            .ok_or_else(|| KnowledgeError::NotFound(format!("article {article_id:?} not found")))
    }

    async fn load_version(
        &self,
        tenant: &TenantId,
        article_id: &str,
        version: i32,
    ) -> Result<VersionRow, KnowledgeError> {
        self.store
            .version(tenant, article_id, version)
            .await?
            .ok_or_else(|| {
                KnowledgeError::NotFound(format!(
                    "version {version} of article {article_id:?} not found"
                ))
            })
    }

    /// Commits a change, wakes the outbox and, when it touches search, indexes it here.
    async fn commit(&self, tenant: &TenantId, change: &Change) -> Result<(), KnowledgeError> {
        self.store.commit(tenant, change).await?;
        self.after_commit(!change.events.is_empty(), change.feed.is_some())
            .await;
        Ok(())
    }

    async fn after_commit(&self, events: bool, feed: bool) {
        if events {
            self.outbox.wake();
        }
        if feed {
            self.refresh().await;
        }
    }

    /// Applies pending feed rows to this replica's index; failures are left to the poller.
    pub async fn refresh(&self) {
        if let Err(e) = self.indexer.catch_up(self.opts.visible_wait).await {
            tracing::warn!(error = %tandem_platform::error::DisplayChain(&e),
                "indexing a change at once failed; the next poll retries");
        }
    }

    /// Returns an article and a version (0: the published one, or the latest).
    pub async fn get(
        &self,
        tenant: &TenantId,
        article_id: &str,
        version: i32,
    ) -> Result<(pb::Article, pb::ArticleVersion), KnowledgeError> {
        let a = self.load(tenant, article_id).await?.article;
        let v = match version {
            0 if a.published_version > 0 => a.published_version,
            0 => a.current_version,
            n if n < 0 => return Err(invalid("version", "must not be negative")),
            n => n,
        };
        let row = self.load_version(tenant, article_id, v).await?;
        Ok((a, row.version))
    }

    /// Lists articles.
    pub async fn list(
        &self,
        tenant: &TenantId,
        filter: &ArticleFilter,
    ) -> Result<Vec<pb::Article>, KnowledgeError> {
        Ok(self.store.articles(tenant, filter).await?)
    }

    /// Lists versions newest first below `before`.
    pub async fn versions(
        &self,
        tenant: &TenantId,
        article_id: &str,
        before: i32,
        limit: i64,
    ) -> Result<Vec<pb::ArticleVersion>, KnowledgeError> {
        self.load(tenant, article_id).await?;
        Ok(self
            .store
            .versions(tenant, article_id, before, limit)
            .await?)
    }

    /// Lists the audit trail newest first.
    pub async fn audit_trail(
        &self,
        tenant: &TenantId,
        article_id: &str,
        cursor: &(i64, String),
        limit: i64,
    ) -> Result<Vec<pb::AuditEntry>, KnowledgeError> {
        self.load(tenant, article_id).await?;
        Ok(self.store.audit(tenant, article_id, cursor, limit).await?)
    }

    /// Builds the change creating an article.
    fn creation(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        new: NewArticle,
        entry: Entry,
        action: pb::AuditAction,
        source_candidate_id: &str,
    ) -> Change {
        let at = now_ts();
        let id = new_id();
        let article = pb::Article {
            id: id.clone(),
            external_id: new.external_id,
            scenario_id: new.scenario_id,
            language: new.language,
            visibility: new.visibility,
            tags: new.tags.clone(),
            status: pb::ArticleStatus::Draft as i32,
            current_version: 1,
            published_version: 0,
            title: new.content.title.clone(),
            created_at: Some(at),
            updated_at: Some(at),
        };
        let version = pb::ArticleVersion {
            article_id: id.clone(),
            version: 1,
            title: new.content.title,
            questions: new.content.questions,
            answer: new.content.answer,
            author_id: actor.id.clone(),
            status: pb::VersionStatus::Draft as i32,
            change_note: new.content.change_note,
            source_candidate_id: source_candidate_id.to_owned(),
            created_at: Some(at),
            ..Default::default()
        };
        let mut change = Change {
            audit: vec![audit(&id, 1, action, &actor.id, "", at)],
            article,
            expected_revision: None,
            ..Change::default()
        };
        let row = VersionRow {
            version,
            visibility: new.visibility,
            tags: new.tags,
        };
        if entry == Entry::Publish {
            publish_into(tenant, &mut change, row, None, actor, at);
        } else {
            change.versions.push(row);
        }
        change
    }

    /// Builds the change adding a version to a loaded article.
    #[allow(clippy::too_many_arguments)]
    async fn revision(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        loaded: &Loaded,
        new: NewVersion,
        entry: Entry,
        action: pb::AuditAction,
        source_candidate_id: &str,
    ) -> Result<Change, KnowledgeError> {
        let a = &loaded.article;
        if a.status == pb::ArticleStatus::Archived as i32 {
            return Err(archived_error(&a.id));
        }
        let latest = self.load_version(tenant, &a.id, a.current_version).await?;
        let previous = if entry == Entry::Publish && a.published_version > 0 {
            Some(
                self.load_version(tenant, &a.id, a.published_version)
                    .await?,
            )
        } else {
            None
        };
        Ok(revision_of(
            tenant,
            actor,
            loaded,
            &latest,
            previous,
            new,
            entry,
            action,
            source_candidate_id,
        ))
    }

    /// Creates an article with a first draft.
    pub async fn create(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        new: NewArticle,
    ) -> Result<(pb::Article, pb::ArticleVersion), KnowledgeError> {
        let new = new.validated()?;
        let change = self.creation(
            tenant,
            actor,
            new,
            Entry::Draft,
            pb::AuditAction::Created,
            "",
        );
        self.commit(tenant, &change).await?;
        Ok(created(change))
    }

    /// Adds a draft version.
    pub async fn update_draft(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        article_id: &str,
        base_version: i32,
        new: NewVersion,
    ) -> Result<(pb::Article, pb::ArticleVersion), KnowledgeError> {
        let new = new.validated()?;
        let loaded = self.load(tenant, article_id).await?;
        if base_version != loaded.article.current_version {
            return Err(KnowledgeError::Aborted(format!(
                "base version {base_version} is not the latest version {}",
                loaded.article.current_version
            )));
        }
        let change = self
            .revision(
                tenant,
                actor,
                &loaded,
                new,
                Entry::Draft,
                pb::AuditAction::DraftUpdated,
                "",
            )
            .await?;
        self.commit(tenant, &change).await?;
        Ok(created(change))
    }

    /// Loads an article and one of its versions for a status change, refusing archived articles
    /// and versions not in `expected` status.
    async fn transition(
        &self,
        tenant: &TenantId,
        article_id: &str,
        version: i32,
        expected: pb::VersionStatus,
        doing: &str,
    ) -> Result<(Loaded, VersionRow), KnowledgeError> {
        if version <= 0 {
            return Err(invalid("version", "must be at least 1"));
        }
        let loaded = self.load(tenant, article_id).await?;
        if loaded.article.status == pb::ArticleStatus::Archived as i32 {
            return Err(KnowledgeError::FailedPrecondition(format!(
                "article {article_id:?} is archived"
            )));
        }
        let row = self.load_version(tenant, article_id, version).await?;
        if row.version.status != expected as i32 {
            return Err(KnowledgeError::FailedPrecondition(format!(
                "version {version} is {}; only a version {} can be {doing}",
                status_name(row.version.status),
                status_name(expected as i32),
                doing = doing
            )));
        }
        Ok((loaded, row))
    }

    /// Submits a draft for review.
    pub async fn submit(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        article_id: &str,
        version: i32,
        comment: &str,
    ) -> Result<pb::ArticleVersion, KnowledgeError> {
        let mut p = Problems::default();
        p.text("comment", comment, 0, MAX_COMMENT_CHARS, true);
        p.done()?;
        let (loaded, mut row) = self
            .transition(
                tenant,
                article_id,
                version,
                pb::VersionStatus::Draft,
                "submitted",
            )
            .await?;
        let at = now_ts();
        row.version.status = pb::VersionStatus::InReview as i32;
        row.version.submitted_at = Some(at);
        let mut article = loaded.article.clone();
        article.updated_at = Some(at);
        if article.published_version == 0 && version == article.current_version {
            article.status = pb::ArticleStatus::InReview as i32;
        }
        let change = Change {
            audit: vec![audit(
                article_id,
                version,
                pb::AuditAction::Submitted,
                &actor.id,
                comment,
                at,
            )],
            article,
            expected_revision: Some(loaded.revision),
            versions: vec![row.clone()],
            ..Change::default()
        };
        self.commit(tenant, &change).await?;
        Ok(row.version)
    }

    /// Approves or rejects a version in review.
    pub async fn review(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        article_id: &str,
        version: i32,
        approve: bool,
        comment: &str,
    ) -> Result<pb::ArticleVersion, KnowledgeError> {
        let mut p = Problems::default();
        if approve {
            p.text("comment", comment, 0, MAX_COMMENT_CHARS, true);
        } else {
            p.text("reason", comment, 1, MAX_COMMENT_CHARS, true);
        }
        p.done()?;
        let doing = if approve { "approved" } else { "rejected" };
        let (loaded, mut row) = self
            .transition(
                tenant,
                article_id,
                version,
                pb::VersionStatus::InReview,
                doing,
            )
            .await?;
        if row.version.author_id == actor.id {
            return Err(KnowledgeError::PermissionDenied(format!(
                "the author of version {version} cannot review it"
            )));
        }
        let at = now_ts();
        row.version.reviewer_id.clone_from(&actor.id);
        row.version.reviewed_at = Some(at);
        let action = if approve {
            row.version.status = pb::VersionStatus::Approved as i32;
            pb::AuditAction::Approved
        } else {
            row.version.status = pb::VersionStatus::Rejected as i32;
            row.version.reject_reason = comment.to_owned();
            pb::AuditAction::Rejected
        };
        let mut article = loaded.article.clone();
        article.updated_at = Some(at);
        if !approve && article.published_version == 0 {
            article.status = pb::ArticleStatus::Draft as i32;
        }
        let change = Change {
            audit: vec![audit(article_id, version, action, &actor.id, comment, at)],
            article,
            expected_revision: Some(loaded.revision),
            versions: vec![row.clone()],
            ..Change::default()
        };
        self.commit(tenant, &change).await?;
        Ok(row.version)
    }

    /// Publishes an approved version.
    pub async fn publish(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        article_id: &str,
        version: i32,
    ) -> Result<(pb::Article, pb::ArticleVersion), KnowledgeError> {
        let (loaded, row) = self
            .transition(
                tenant,
                article_id,
                version,
                pb::VersionStatus::Approved,
                "published",
            )
            .await?;
        let a = &loaded.article;
        if version <= a.published_version {
            return Err(KnowledgeError::FailedPrecondition(format!(
                "version {version} is older than the published version {}",
                a.published_version
            )));
        }
        let previous = if a.published_version > 0 {
            Some(
                self.load_version(tenant, article_id, a.published_version)
                    .await?,
            )
        } else {
            None
        };
        let at = now_ts();
        let mut change = Change {
            article: a.clone(),
            expected_revision: Some(loaded.revision),
            ..Change::default()
        };
        change.article.updated_at = Some(at);
        publish_into(tenant, &mut change, row, previous, actor, at);
        self.commit(tenant, &change).await?;
        let v = change
            .versions
            .iter()
            .find(|v| v.version.version == version)
            .map(|v| v.version.clone())
            .unwrap_or_default();
        Ok((change.article, v))
    }

    /// Archives an article; it leaves search.
    pub async fn archive(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        article_id: &str,
        reason: &str,
    ) -> Result<pb::Article, KnowledgeError> {
        let mut p = Problems::default();
        p.text("reason", reason, 0, MAX_COMMENT_CHARS, true);
        p.done()?;
        let loaded = self.load(tenant, article_id).await?;
        let a = &loaded.article;
        if a.status == pb::ArticleStatus::Archived as i32 {
            return Err(KnowledgeError::FailedPrecondition(format!(
                "article {article_id:?} is already archived"
            )));
        }
        let at = now_ts();
        let mut change = Change {
            article: a.clone(),
            expected_revision: Some(loaded.revision),
            audit: vec![audit(
                article_id,
                0,
                pb::AuditAction::Archived,
                &actor.id,
                reason,
                at,
            )],
            ..Change::default()
        };
        change.article.status = pb::ArticleStatus::Archived as i32;
        change.article.updated_at = Some(at);
        if a.published_version > 0 {
            let mut row = self
                .load_version(tenant, article_id, a.published_version)
                .await?;
            row.version.status = pb::VersionStatus::Archived as i32;
            change.versions.push(row);
            change.feed = Some(None);
        }
        change.events.push(RawEvent::new(
            tenant,
            &pb::ArticleArchived {
                article_id: a.id.clone(),
                last_published_version: a.published_version,
                scenario_id: a.scenario_id.clone(),
                language: a.language,
                actor_id: actor.id.clone(),
                reason: reason.to_owned(),
                occurred_at: Some(at),
            },
            Some(a.id.clone()),
        ));
        self.commit(tenant, &change).await?;
        Ok(change.article)
    }

    /// Imports a chunk of rows: looks up the articles their external ids name (an article's
    /// external id or, failing that, its id, which exports write for articles without an
    /// external id) with two queries, plans each row in memory (a new article, a new version,
    /// or nothing when the content is unchanged) and writes every change in one transaction with multi-row statements. A row
    /// whose article was created or changed concurrently fails alone; when the transaction
    /// fails as a whole, the changes are written one by one so only the offending rows fail.
    /// Returns each row's outcome, in order. Nothing is written on a dry run.
    pub async fn import_rows(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        rows: Vec<NewArticle>,
        entry: Entry,
        dry_run: bool,
    ) -> Vec<Result<RowOutcome, KnowledgeError>> {
        let mut results: Vec<Result<RowOutcome, KnowledgeError>> = Vec::with_capacity(rows.len());
        let mut valid = Vec::with_capacity(rows.len());
        for (i, new) in rows.into_iter().enumerate() {
            match new.validated() {
                Ok(new) => {
                    valid.push((i, new));
                    results.push(Ok(RowOutcome::Unchanged));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        let mut ids: Vec<String> = valid
            .iter()
            .filter(|(_, n)| !n.external_id.is_empty())
            .map(|(_, n)| n.external_id.clone())
            .collect();
        ids.sort();
        ids.dedup();
        let mut existing = match self.store.import_lookup(tenant, &ids).await {
            Ok(found) => found,
            Err(e) => {
                let e = KnowledgeError::from(e);
                let message = tandem_platform::error::DisplayChain(&e).to_string();
                for (i, _) in valid {
                    results[i] = Err(KnowledgeError::Unavailable(message.clone()));
                }
                return results;
            }
        };
        let mut changes = Vec::new();
        let mut positions = Vec::new();
        for (i, new) in valid {
            let found = if new.external_id.is_empty() {
                None
            } else {
                existing.remove(&new.external_id)
            };
            let planned = match found {
                None => Ok((
                    RowOutcome::Created,
                    (!dry_run).then(|| {
                        self.creation(tenant, actor, new, entry, pb::AuditAction::Imported, "")
                    }),
                )),
                Some(found) => plan_update(tenant, actor, &found, new, entry, dry_run),
            };
            match planned {
                Ok((outcome, change)) => {
                    results[i] = Ok(outcome);
                    if let Some(change) = change {
                        positions.push(i);
                        changes.push(change);
                    }
                }
                Err(e) => results[i] = Err(e),
            }
        }
        if changes.is_empty() {
            return results;
        }
        let written = match self.store.import_changes(tenant, &changes).await {
            Ok(written) => written,
            Err(e) => {
                tracing::warn!(error = %tandem_platform::error::DisplayChain(&e),
                    rows = changes.len(), "import chunk failed; writing its rows one by one");
                let mut written = Vec::with_capacity(changes.len());
                for (change, &at) in changes.iter().zip(&positions) {
                    match self
                        .store
                        .import_changes(tenant, std::slice::from_ref(change))
                        .await
                    {
                        Ok(w) => written.push(w.first().copied().unwrap_or(false)),
                        Err(e) => {
                            results[at] = Err(e.into());
                            written.push(true);
                        }
                    }
                }
                written
            }
        };
        for ((&at, ok), change) in positions.iter().zip(&written).zip(&changes) {
            if !ok {
                results[at] = Err(if change.expected_revision.is_none() {
                    KnowledgeError::AlreadyExists(format!(
                        "external id {:?} was created concurrently; import the row again",
                        change.article.external_id
                    ))
                } else {
                    KnowledgeError::Aborted(format!(
                        "article {:?} changed concurrently; import the row again",
                        change.article.id
                    ))
                });
            }
        }
        if changes.iter().any(|c| !c.events.is_empty()) {
            self.outbox.wake();
        }
        results
    }

    /// Searches published articles; records a gap when asked and nothing scores well.
    pub async fn search(
        &self,
        tenant: &TenantId,
        r: &pb::SearchRequest,
    ) -> Result<pb::SearchResponse, KnowledgeError> {
        let started = std::time::Instant::now();
        let mut p = Problems::default();
        if r.query.trim().is_empty() {
            p.0.push(violation("query", "is empty"));
        } else if r.query.chars().count() > 1_000 {
            p.0.push(violation("query", "has more than 1000 characters"));
        }
        p.text("scenario_id", &r.scenario_id, 0, MAX_ID_CHARS, false);
        p.text("conversation_id", &r.conversation_id, 0, 128, false);
        let audience = match pb::Audience::try_from(r.audience) {
            Ok(pb::Audience::Bot) => Some(Audience::Bot),
            Ok(pb::Audience::Agent) => Some(Audience::Agent),
            _ => {
                p.0.push(violation(
                    "audience",
                    "must be AUDIENCE_BOT or AUDIENCE_AGENT",
                ));
                None
            }
        };
        if Language::try_from(r.language).is_err() {
            p.0.push(violation("language", "is not a known language"));
        }
        let limit = match r.limit {
            0 => 5,
            n @ 1..=50 => usize::try_from(n).unwrap_or(5),
            n => {
                p.0.push(violation("limit", format!("is {n}, outside 0..=50")));
                5
            }
        };
        if r.tags.len() > 10 {
            p.0.push(violation("tags", "has more than 10 tags"));
        }
        p.done()?;
        let Some(audience) = audience else {
            return Err(invalid("audience", "is missing"));
        };
        let fetch = if r.tags.is_empty() { limit } else { 100 };
        let request = SearchRequest {
            tenant: tenant.as_str().to_owned(),
            query: r.query.clone(),
            scenario: Some(r.scenario_id.clone()).filter(|s| !s.is_empty()),
            language: Some(language_code(r.language).to_owned()).filter(|s| !s.is_empty()),
            audience,
            limit: fetch,
            min_score: None,
        };
        let (hits, best) = match self.indexer.index().search(&request) {
            Ok(resp) => {
                let best = resp.best_score;
                let hits: Vec<pb::SearchHit> = resp
                    .hits
                    .into_iter()
                    .filter(|h| r.tags.iter().all(|t| h.tags.contains(t)))
                    .take(limit)
                    .map(|h| {
                        let vis = self.indexer.visibility_of(tenant.as_str(), &h.article_id);
                        to_hit(h, r.language, vis)
                    })
                    .collect();
                (hits, best)
            }
            Err(SearchError::EmptyQuery) => (Vec::new(), None),
            Err(e) if e.is_invalid_input() => return Err(invalid("query", e.to_string())),
            Err(e) => return Err(KnowledgeError::Search(e)),
        };
        let best_score = hits.first().map(|h| h.score).or(best.map(f64::from));
        let good = best_score.is_some_and(|s| s >= f64::from(self.opts.good_result_score));
        let mut gap_recorded = false;
        if !good && !r.conversation_id.is_empty() {
            let query = normalise_query(&r.query);
            if !query.is_empty() {
                let hit = GapHit {
                    scenario_id: r.scenario_id.clone(),
                    language: if r.language == 0 {
                        detect_language(&r.query) as i32
                    } else {
                        r.language
                    },
                    query,
                    best_score: best_score.unwrap_or(0.0),
                    best_article: hits.first().map(|h| common::ArticleRef {
                        article_id: h.article_id.clone(),
                        version: h.version,
                        title: h.title.clone(),
                        score: h.score,
                    }),
                    conversation_id: r.conversation_id.clone(),
                    at: now_micros(),
                };
                self.store.record_gap(tenant, &hit).await?;
                gap_recorded = true;
            }
        }
        Ok(pb::SearchResponse {
            hits,
            took_us: i64::try_from(started.elapsed().as_micros()).unwrap_or(i64::MAX),
            gap_recorded,
        })
    }

    /// Returns gaps ranked by misses plus fallbacks.
    pub async fn gaps(
        &self,
        tenant: &TenantId,
        filter: &GapFilter,
    ) -> Result<Vec<pb::Gap>, KnowledgeError> {
        Ok(self.store.gaps(tenant, filter).await?)
    }

    /// Counts a bot turn that found no answer in the gaps: a fallback always (on the gap of the
    /// query its conversation last recorded, or else on its scenario's gap without a query),
    /// a handoff citing no article only when its conversation recorded a gap query. Other
    /// turns and test conversations are ignored. Returns the gap query counted on, or `None`
    /// when nothing was counted or the event was handled before.
    pub async fn record_fallback(
        &self,
        tenant: &TenantId,
        consumer: &str,
        event_id: &str,
        e: &BotReplied,
    ) -> Result<Option<String>, KnowledgeError> {
        let action = BotAction::try_from(e.action).unwrap_or(BotAction::Unspecified);
        let count_unlinked = match action {
            BotAction::Fallback => true,
            BotAction::Handoff if e.articles.is_empty() => false,
            _ => return Ok(None),
        };
        if e.test || e.conversation_id.trim().is_empty() {
            return Ok(None);
        }
        let at = e
            .occurred_at
            .as_ref()
            .map_or_else(now_micros, crate::store::timestamp_micros);
        let fallback = Fallback {
            conversation_id: truncate_chars(&e.conversation_id, 128),
            scenario_id: truncate_chars(&e.scenario_id, MAX_ID_CHARS),
            language: e.language,
            at,
        };
        Ok(self
            .store
            .record_fallback(tenant, (consumer, event_id), &fallback, count_unlinked)
            .await?)
    }

    /// Forgets the gap queries of conversations older than a week.
    pub async fn prune_gap_links(&self) -> Result<u64, KnowledgeError> {
        const WEEK_MICROS: i64 = 7 * 86_400 * 1_000_000;
        Ok(self
            .store
            .prune_gap_links(now_micros() - WEEK_MICROS)
            .await?)
    }

    /// Deletes the gaps not seen for [`GAP_RETENTION`]; returns how many.
    pub async fn prune_gaps(&self) -> Result<u64, KnowledgeError> {
        let keep = i64::try_from(GAP_RETENTION.as_micros()).unwrap_or(i64::MAX);
        Ok(self
            .store
            .prune_gaps(now_micros().saturating_sub(keep))
            .await?)
    }

    /// Mines a human resolution into a candidate (new, or merged into a pending duplicate).
    /// Returns `None` when the event is not minable or was handled before.
    pub async fn mine(
        &self,
        tenant: &TenantId,
        consumer: &str,
        event_id: &str,
        e: &ConversationResolved,
    ) -> Result<Option<(pb::Candidate, bool)>, KnowledgeError> {
        let question = truncate_chars(&single_line(&e.customer_question), MAX_CANDIDATE_CHARS);
        let answers: Vec<&str> = e
            .agent_answers
            .iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
            .collect();
        if e.resolved_by != HandlerKind::Agent as i32
            || e.test
            || question.is_empty()
            || answers.is_empty()
        {
            return Ok(None);
        }
        let answer = truncate_chars(&answers.join("\n\n"), MAX_CANDIDATE_CHARS);
        let language = if e.language == 0 {
            detect_language(&question) as i32
        } else {
            e.language
        };
        let request = SearchRequest {
            tenant: tenant.as_str().to_owned(),
            query: question.clone(),
            scenario: Some(e.scenario_id.clone()).filter(|s| !s.is_empty()),
            language: Some(language_code(language).to_owned()).filter(|s| !s.is_empty()),
            audience: Audience::Agent,
            limit: 1,
            min_score: None,
        };
        let best = match self.indexer.index().search(&request) {
            Ok(resp) => resp.hits.into_iter().next(),
            Err(err) if err.is_invalid_input() => None,
            Err(err) => return Err(KnowledgeError::Search(err)),
        };
        let now = now_micros();
        let ttl = i64::try_from(self.opts.candidate_ttl.as_micros()).unwrap_or(i64::MAX);
        let mut c = pb::Candidate {
            id: new_id(),
            kind: pb::CandidateKind::NewArticle as i32,
            question: question.clone(),
            answer,
            provenance: Some(pb::Provenance {
                conversation_ids: vec![e.conversation_id.clone()],
                agent_ids: if e.agent_id.is_empty() {
                    Vec::new()
                } else {
                    vec![e.agent_id.clone()]
                },
            }),
            source_count: 1,
            status: pb::CandidateStatus::Pending as i32,
            scenario_id: e.scenario_id.clone(),
            language,
            created_at: Some(micros_timestamp(now)),
            updated_at: Some(micros_timestamp(now)),
            expires_at: Some(micros_timestamp(now.saturating_add(ttl))),
            ..Default::default()
        };
        if let Some(hit) = best {
            let matched = hit
                .matched_question
                .as_ref()
                .map_or(hit.title.as_str(), |s| s.fragment.as_str());
            c.similarity = similarity(&question, matched);
            if hit.score >= self.opts.edit_proposal_score
                && c.similarity >= self.opts.edit_proposal_similarity
            {
                c.kind = pb::CandidateKind::EditProposal as i32;
                c.target_article_id = hit.article_id;
                c.target_version = i32::try_from(hit.version).unwrap_or(0);
            }
        }
        let fresh = CandidateRow {
            dedup_key: dedup_key(&question),
            candidate: c,
        };
        let (conversation, agent) = (e.conversation_id.clone(), e.agent_id.clone());
        let merge = move |old: &mut pb::Candidate| {
            let prov = old.provenance.get_or_insert_with(Default::default);
            if prov.conversation_ids.contains(&conversation) {
                return;
            }
            old.source_count += 1;
            if prov.conversation_ids.len() < MAX_PROVENANCE {
                prov.conversation_ids.push(conversation.clone());
            }
            if !agent.is_empty() && !prov.agent_ids.contains(&agent) {
                prov.agent_ids.push(agent.clone());
            }
            old.updated_at = Some(micros_timestamp(now));
        };
        let t = tenant.clone();
        let event = move |c: &pb::Candidate| {
            RawEvent::new(
                &t,
                &pb::CandidateCreated {
                    candidate_id: c.id.clone(),
                    kind: c.kind,
                    scenario_id: c.scenario_id.clone(),
                    language: c.language,
                    target_article_id: c.target_article_id.clone(),
                    conversation_id: c
                        .provenance
                        .as_ref()
                        .and_then(|p| p.conversation_ids.first().cloned())
                        .unwrap_or_default(),
                    source_count: c.source_count,
                    occurred_at: c.created_at,
                },
                Some(c.id.clone()),
            )
        };
        let threshold = self.opts.duplicate_similarity;
        let key = fresh.dedup_key.clone();
        let score = move |row: &CandidateRow| -> Option<f64> {
            if row.dedup_key == key {
                // The same terms: the closest there is.
                return Some(2.0);
            }
            let s = duplicate_similarity(&question, &row.candidate.question);
            (s >= threshold).then_some(s)
        };
        let out = self
            .store
            .mine(tenant, (consumer, event_id), &fresh, score, merge, event)
            .await?;
        if out.as_ref().is_some_and(|(_, created)| *created) {
            self.outbox.wake();
        }
        Ok(out)
    }

    /// Lists candidates.
    pub async fn candidates(
        &self,
        tenant: &TenantId,
        status: i32,
        scenario_id: &str,
        kind: i32,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<pb::Candidate>, KnowledgeError> {
        Ok(self
            .store
            .candidates(tenant, status, scenario_id, kind, offset, limit)
            .await?)
    }

    /// Reviews a candidate.
    pub async fn review_candidate(
        &self,
        tenant: &TenantId,
        actor: &Actor,
        r: &pb::ReviewCandidateRequest,
    ) -> Result<pb::ReviewCandidateResponse, KnowledgeError> {
        use pb::CandidateDecision as D;
        check_id("candidate_id", &r.candidate_id)?;
        let mut p = Problems::default();
        p.text("question", &r.question, 0, MAX_CANDIDATE_CHARS, true);
        p.text("answer", &r.answer, 0, MAX_ANSWER_CHARS, true);
        p.text("title", &r.title, 0, MAX_TITLE_CHARS, false);
        let decision = D::try_from(r.decision).unwrap_or(D::Unspecified);
        if decision == D::Unspecified {
            p.0.push(violation("decision", "is missing"));
        }
        if decision == D::Reject {
            p.text("reason", &r.reason, 1, MAX_COMMENT_CHARS, true);
        } else {
            p.text("reason", &r.reason, 0, MAX_COMMENT_CHARS, true);
        }
        p.text(
            "merge_article_id",
            &r.merge_article_id,
            0,
            MAX_ID_CHARS,
            false,
        );
        p.done()?;
        let mut row = self
            .store
            .candidate(tenant, &r.candidate_id)
            .await?
            .ok_or_else(|| {
                KnowledgeError::NotFound(format!("candidate {:?} not found", r.candidate_id))
            })?;
        if row.candidate.status != pb::CandidateStatus::Pending as i32 {
            return Err(KnowledgeError::FailedPrecondition(format!(
                "candidate {:?} was already reviewed or expired",
                r.candidate_id
            )));
        }
        let at = now_ts();
        row.candidate.reviewed_by.clone_from(&actor.id);
        row.candidate.updated_at = Some(at);
        if decision == D::Reject {
            row.candidate.status = pb::CandidateStatus::Rejected as i32;
            self.store.put_candidate(tenant, &row).await?;
            return Ok(pb::ReviewCandidateResponse {
                candidate: Some(row.candidate),
                ..Default::default()
            });
        }
        let c = row.candidate.clone();
        // A question variant is one line; candidates mined before questions were put on one
        // line, and edited questions, may span several.
        let question = if r.question.trim().is_empty() {
            single_line(&c.question)
        } else {
            single_line(&r.question)
        };
        let answer = if r.answer.trim().is_empty() {
            c.answer.clone()
        } else {
            r.answer.trim().to_owned()
        };
        let entry = if decision == D::ApproveAndPublish {
            Entry::Publish
        } else {
            Entry::Draft
        };
        let target = match decision {
            D::Merge if !r.merge_article_id.is_empty() => Some(r.merge_article_id.clone()),
            D::Merge if c.target_article_id.is_empty() => {
                return Err(invalid(
                    "merge_article_id",
                    "is required: the candidate has no target article",
                ));
            }
            _ if !c.target_article_id.is_empty() => Some(c.target_article_id.clone()),
            _ => None,
        };
        let note = format!("from candidate {}", c.id);
        let mut change = match target {
            None => {
                let title = if r.title.trim().is_empty() {
                    derive_title(&question)
                } else {
                    r.title.trim().to_owned()
                };
                let new = NewArticle {
                    scenario_id: c.scenario_id.clone(),
                    language: c.language,
                    visibility: pb::Visibility::Both as i32,
                    content: Content {
                        title,
                        questions: vec![truncate_chars(&question, MAX_QUESTION_CHARS)],
                        answer,
                        change_note: note,
                    },
                    ..NewArticle::default()
                }
                .validated()?;
                self.creation(tenant, actor, new, entry, pb::AuditAction::Created, &c.id)
            }
            Some(article_id) => {
                let loaded = self.load(tenant, &article_id).await?;
                let base = self.candidate_base(tenant, &loaded, entry).await?;
                let mut questions = base.version.questions.clone();
                let q = truncate_chars(&question, MAX_QUESTION_CHARS);
                if !questions.contains(&q) {
                    questions.push(q);
                }
                let (answer, action) = if decision == D::Merge {
                    (
                        base.version.answer.clone(),
                        pb::AuditAction::CandidateMerged,
                    )
                } else {
                    (answer, pb::AuditAction::DraftUpdated)
                };
                let title = if r.title.trim().is_empty() {
                    base.version.title.clone()
                } else {
                    r.title.trim().to_owned()
                };
                let new = NewVersion {
                    content: Content {
                        title,
                        questions,
                        answer,
                        change_note: note,
                    },
                    visibility: base.visibility,
                    tags: Some(base.tags),
                }
                .validated()?;
                self.revision(tenant, actor, &loaded, new, entry, action, &c.id)
                    .await?
            }
        };
        let version = change
            .versions
            .iter()
            .map(|v| &v.version)
            .find(|v| v.version == change.article.current_version)
            .cloned();
        row.candidate.status = pb::CandidateStatus::Approved as i32;
        row.candidate.result_article_id = change.article.id.clone();
        row.candidate.result_version = change.article.current_version;
        change.candidate = Some(row.clone());
        self.commit(tenant, &change).await?;
        Ok(pb::ReviewCandidateResponse {
            candidate: Some(row.candidate),
            article: Some(change.article),
            version,
        })
    }

    /// The version an approved candidate's change to an existing article builds on (title,
    /// question variants, answer for a merge, visibility and tags): the published version, so
    /// that content nobody approved (a draft, a version in review, a rejected version) never
    /// reaches a new version through a candidate. An article with nothing published builds on
    /// its latest version, as a draft only: publishing it at once would publish that unreviewed
    /// content, so it is refused.
    async fn candidate_base(
        &self,
        tenant: &TenantId,
        loaded: &Loaded,
        entry: Entry,
    ) -> Result<VersionRow, KnowledgeError> {
        let a = &loaded.article;
        if a.published_version > 0 {
            return self.load_version(tenant, &a.id, a.published_version).await;
        }
        if entry == Entry::Publish {
            return Err(KnowledgeError::FailedPrecondition(format!(
                "article {:?} has no published version; approve the candidate as a draft",
                a.id
            )));
        }
        self.load_version(tenant, &a.id, a.current_version).await
    }

    /// Expires candidates not reviewed in time.
    pub async fn expire_candidates(&self) -> Result<u64, KnowledgeError> {
        Ok(self.store.expire_candidates(now_micros()).await?)
    }
}

/// The error of a change to an archived article.
fn archived_error(article_id: &str) -> KnowledgeError {
    KnowledgeError::FailedPrecondition(format!(
        "article {article_id:?} is archived; it cannot be edited"
    ))
}

/// Builds the change adding a version to a loaded article whose latest version is `latest` and,
/// when publishing, whose published version is `previous`. Unset visibility and tags of `new`
/// are taken from `previous` when publishing, otherwise from `latest`.
#[allow(clippy::too_many_arguments)]
fn revision_of(
    tenant: &TenantId,
    actor: &Actor,
    loaded: &Loaded,
    latest: &VersionRow,
    previous: Option<VersionRow>,
    new: NewVersion,
    entry: Entry,
    action: pb::AuditAction,
    source_candidate_id: &str,
) -> Change {
    let a = &loaded.article;
    let at = now_ts();
    let number = a.current_version + 1;
    // Unset visibility and tags keep the published version's when publishing (the latest
    // version may be unreviewed or rejected), otherwise the latest version's.
    let base = match (&previous, entry) {
        (Some(published), Entry::Publish) => published,
        _ => latest,
    };
    let visibility = if new.visibility == 0 {
        base.visibility
    } else {
        new.visibility
    };
    let tags = new.tags.unwrap_or_else(|| base.tags.clone());
    let version = pb::ArticleVersion {
        article_id: a.id.clone(),
        version: number,
        title: new.content.title.clone(),
        questions: new.content.questions,
        answer: new.content.answer,
        author_id: actor.id.clone(),
        status: pb::VersionStatus::Draft as i32,
        change_note: new.content.change_note,
        source_candidate_id: source_candidate_id.to_owned(),
        created_at: Some(at),
        ..Default::default()
    };
    let mut article = a.clone();
    article.current_version = number;
    article.title = new.content.title;
    article.updated_at = Some(at);
    if article.published_version == 0 {
        article.status = pb::ArticleStatus::Draft as i32;
        article.visibility = visibility;
        article.tags.clone_from(&tags);
    }
    let mut change = Change {
        audit: vec![audit(&a.id, number, action, &actor.id, "", at)],
        article,
        expected_revision: Some(loaded.revision),
        ..Change::default()
    };
    let row = VersionRow {
        version,
        visibility,
        tags,
    };
    if entry == Entry::Publish {
        publish_into(tenant, &mut change, row, previous, actor, at);
    } else {
        change.versions.push(row);
    }
    change
}

/// Plans an import row for the existing article its external id names (the article's external
/// id, or its id; see [`Store::import_lookup`]): nothing when the content, visibility and tags
/// are those of the latest version (and, when publishing, that version is published), otherwise
/// a new version. A row naming another scenario or language than the
/// article's fails (an import does not move articles); a row that names no visibility or no
/// tags keeps those of the published version when publishing, otherwise of the latest version.
fn plan_update(
    tenant: &TenantId,
    actor: &Actor,
    found: &Existing,
    new: NewArticle,
    entry: Entry,
    dry_run: bool,
) -> Result<(RowOutcome, Option<Change>), KnowledgeError> {
    let latest = &found.latest;
    let a = &found.loaded.article;
    let mut p = Problems::default();
    if !new.unnamed.scenario && new.scenario_id != a.scenario_id {
        p.0.push(violation(
            "scenario_id",
            format!(
                "is {:?}, but the article with external id {:?} is in scenario {:?}; an import \
                 does not move articles",
                new.scenario_id, new.external_id, a.scenario_id
            ),
        ));
    }
    if !new.unnamed.language && new.language != a.language {
        p.0.push(violation(
            "language",
            format!(
                "is {:?}, but the article with external id {:?} is in {:?}; an import does not \
                 change an article's language",
                language_code(new.language),
                new.external_id,
                language_code(a.language)
            ),
        ));
    }
    p.done()?;
    let base = match (&found.published, entry) {
        (Some(published), Entry::Publish) => published,
        _ => latest,
    };
    let visibility = if new.unnamed.visibility {
        base.visibility
    } else {
        new.visibility
    };
    let tags = if new.unnamed.tags {
        base.tags.clone()
    } else {
        new.tags
    };
    let published_same =
        entry == Entry::Draft || latest.version.status == pb::VersionStatus::Published as i32;
    if new.content.same_as(&latest.version)
        && latest.visibility == visibility
        && latest.tags == tags
        && published_same
    {
        return Ok((RowOutcome::Unchanged, None));
    }
    if found.loaded.article.status == pb::ArticleStatus::Archived as i32 {
        return Err(archived_error(&found.loaded.article.id));
    }
    if dry_run {
        return Ok((RowOutcome::Updated, None));
    }
    let change = revision_of(
        tenant,
        actor,
        &found.loaded,
        latest,
        found.published.clone(),
        NewVersion {
            content: new.content,
            visibility,
            tags: Some(tags),
        },
        entry,
        pb::AuditAction::Imported,
        "",
    );
    Ok((RowOutcome::Updated, Some(change)))
}

/// The article and the newest version of a change that created one.
fn created(change: Change) -> (pb::Article, pb::ArticleVersion) {
    let current = change.article.current_version;
    let v = change
        .versions
        .into_iter()
        .map(|v| v.version)
        .find(|v| v.version == current)
        .unwrap_or_default();
    (change.article, v)
}

/// Marks `row` published in `change` (superseding `previous`), and adds the feed entry, the
/// audit entry and the `ArticlePublished` event.
fn publish_into(
    tenant: &TenantId,
    change: &mut Change,
    mut row: VersionRow,
    previous: Option<VersionRow>,
    actor: &Actor,
    at: prost_types::Timestamp,
) {
    let a = &mut change.article;
    if row.version.reviewer_id.is_empty() {
        row.version.reviewer_id.clone_from(&actor.id);
        row.version.reviewed_at = Some(at);
    }
    row.version.status = pb::VersionStatus::Published as i32;
    row.version.published_at = Some(at);
    let previous_version = previous.as_ref().map_or(0, |p| p.version.version);
    if let Some(mut prev) = previous {
        prev.version.status = pb::VersionStatus::Superseded as i32;
        change.versions.push(prev);
    }
    a.status = pb::ArticleStatus::Published as i32;
    a.published_version = row.version.version;
    a.visibility = row.visibility;
    a.tags.clone_from(&row.tags);
    a.updated_at = Some(at);
    change.audit.push(audit(
        &a.id,
        row.version.version,
        pb::AuditAction::Published,
        &actor.id,
        "",
        at,
    ));
    change.events.push(RawEvent::new(
        tenant,
        &pb::ArticlePublished {
            article_id: a.id.clone(),
            version: row.version.version,
            previous_version,
            scenario_id: a.scenario_id.clone(),
            language: a.language,
            visibility: a.visibility,
            title: row.version.title.clone(),
            external_id: a.external_id.clone(),
            actor_id: actor.id.clone(),
            occurred_at: Some(at),
        },
        Some(a.id.clone()),
    ));
    change.feed = Some(Some(pb::GetArticleResponse {
        article: Some(a.clone()),
        version: Some(row.version.clone()),
    }));
    change.versions.push(row);
}

/// A wire search hit from an index hit; the snippet is at most 300 characters and highlights
/// are counted in characters.
fn to_hit(h: tandem_search::SearchHit, language: i32, visibility: i32) -> pb::SearchHit {
    const MAX_SNIPPET: usize = 300;
    let fragment = &h.snippet.fragment;
    let mut cut = fragment.len();
    if let Some((i, _)) = fragment.char_indices().nth(MAX_SNIPPET) {
        cut = i;
    }
    let snippet = fragment.get(..cut).unwrap_or("").to_owned();
    let char_at = |byte: usize| -> i32 {
        i32::try_from(fragment.get(..byte).map_or(0, |s| s.chars().count())).unwrap_or(i32::MAX)
    };
    let highlights = h
        .snippet
        .highlights
        .iter()
        .filter(|r| r.end <= cut)
        .map(|r| common::TextSpan {
            start: char_at(r.start),
            end: char_at(r.end),
        })
        .collect();
    let lang = match h.language.as_str() {
        "zh" => Language::Zh as i32,
        "en" => Language::En as i32,
        _ => language,
    };
    pb::SearchHit {
        article_id: h.article_id,
        version: i32::try_from(h.version).unwrap_or(i32::MAX),
        title: h.title,
        score: f64::from(h.score),
        snippet,
        highlights,
        matched_question: h.matched_question.map(|s| s.fragment).unwrap_or_default(),
        scenario_id: h.scenario,
        language: lang,
        visibility,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn gap_queries_are_normalised() {
        assert_eq!(
            normalise_query("  Can I\tPAY  with\u{0}crypto? "),
            "can i pay with crypto?"
        );
        assert_eq!(normalise_query(&"x ".repeat(300)).chars().count(), 200);
    }

    #[test]
    fn duplicates_share_a_key_and_similarity_is_bounded() {
        assert_eq!(
            dedup_key("Can I change my delivery address?"),
            dedup_key("can i change MY delivery address")
        );
        assert_ne!(dedup_key("change my address"), dedup_key("cancel my order"));
        let same = similarity(
            "how long does delivery take",
            "How long does delivery take?",
        );
        assert!((same - 1.0).abs() < 1e-9, "{same}");
        let near = similarity(
            "how long does delivery take to Berlin",
            "how long does delivery take",
        );
        assert!(near > 0.5 && near < 1.0, "{near}");
        assert!(similarity("change my address", "how long does delivery take") < 0.2);
        assert!(similarity("", "x").abs() < f64::EPSILON);
    }

    #[test]
    fn near_duplicate_questions_are_similar_in_chinese_and_english() {
        let threshold = AppOptions::default().duplicate_similarity;
        for (a, b) in [
            (
                "Can I change my delivery address?",
                "How can I change the delivery address",
            ),
            (
                "can i change my delivery address",
                "Could I change my delivery address please?",
            ),
            ("修改收货地址怎么操作", "怎么修改收货地址"),
            ("收货地址怎么修改？", "收货地址怎么修改呢"),
        ] {
            let s = duplicate_similarity(a, b);
            assert!(s >= threshold && s < 1.0, "{a} / {b}: {s}");
        }
        for (a, b) in [
            (
                "Can I change my delivery address?",
                "how long does delivery take to Berlin",
            ),
            ("修改收货地址怎么操作", "退款多久到账"),
            ("修改收货地址", "修改支付密码"),
        ] {
            let s = duplicate_similarity(a, b);
            assert!(s < threshold, "{a} / {b}: {s}");
        }
        // Bigrams make Chinese independent of word segmentation; other text is analysed.
        assert_eq!(
            duplicate_features("Changing addresses? 修改地址"),
            ["address", "chang", "修改", "地址", "改地"]
        );
        assert_eq!(duplicate_features("退"), ["退"]);
        assert!(duplicate_similarity("", "x").abs() < f64::EPSILON);
    }

    #[test]
    fn questions_are_put_on_one_line() {
        assert_eq!(
            single_line("  Hello,\nmy parcel\r\n\tis late\u{0}?  "),
            "Hello, my parcel is late ?"
        );
        assert_eq!(single_line("退款\n多久到账"), "退款 多久到账");
        assert_eq!(single_line(" \n\t "), "");
    }

    #[test]
    fn language_is_detected_from_han_characters() {
        assert_eq!(detect_language("退款多久到账"), Language::Zh);
        assert_eq!(detect_language("refund 退款"), Language::Zh);
        assert_eq!(detect_language("refund time"), Language::En);
    }

    #[test]
    fn content_is_checked_with_every_problem_listed() {
        let new = NewArticle {
            scenario_id: String::new(),
            content: Content {
                title: "t".repeat(201),
                questions: vec!["  ".into()],
                answer: "a\u{7}".into(),
                change_note: String::new(),
            },
            ..NewArticle::default()
        };
        let Err(KnowledgeError::Invalid(problems)) = new.validated() else {
            panic!("accepted");
        };
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["scenario_id", "title", "questions", "answer"]);
        let ok = NewArticle {
            scenario_id: "s".into(),
            content: Content {
                title: " Title ".into(),
                questions: vec!["q".into(), "q".into(), " ".into()],
                answer: "line one\nline two".into(),
                change_note: String::new(),
            },
            ..NewArticle::default()
        }
        .validated()
        .unwrap();
        assert_eq!(ok.content.title, "Title");
        assert_eq!(ok.content.questions, ["q"]);
        assert_eq!(ok.language, Language::En as i32);
        assert_eq!(ok.visibility, pb::Visibility::Both as i32);
    }
}
