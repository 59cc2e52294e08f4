//! Persistence of the knowledge service on PostgreSQL or SQLite.
//!
//! Every change to an article goes through [`Store::commit`]: one transaction that checks the
//! article's revision (optimistic concurrency), writes the article, its tags, the versions whose
//! status changed or that are new, the audit entries, the change-feed row that replicas index
//! from, the candidate a review concerns (written only while it is still pending, so two reviews
//! of one candidate cannot both take effect) and the outbox events. A conflict or an error rolls
//! everything back, so nothing is half written.
//!
//! The SQL is written once and expanded for each engine by the `on_db!` and `in_tx!` macros;
//! placeholders are `$n` in order of first appearance, which both engines accept.

use std::collections::{HashMap, HashSet};

use prost::Message as _;
use sqlx::{QueryBuilder, Row as _};
use tandem_platform::bus::RawEvent;
use tandem_platform::db::Db;
pub use tandem_platform::db::{micros_timestamp, now_micros, timestamp_micros};
use tandem_platform::{in_tx, on_db};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::knowledge::v1 as pb;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The article changed since it was read.
    #[error("the article changed concurrently")]
    Conflict,
    /// Another article of the tenant already has this external id.
    #[error("external id {0:?} is already used by another article")]
    DuplicateExternalId(String),
    /// The candidate is no longer pending: it was reviewed or expired concurrently.
    #[error("candidate {0:?} is no longer pending")]
    CandidateNotPending(String),
    /// A stored body does not decode.
    #[error("stored {0} does not decode")]
    Corrupt(&'static str, #[source] prost::DecodeError),
    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

/// Pending candidates a mined question is compared with to find a near duplicate.
pub const DUPLICATE_SCAN: i64 = 500;

/// Inserts a new candidate row inside a transaction.
macro_rules! insert_candidate {
    ($tx:ident, $tenant:expr, $row:expr) => {{
        let row: &CandidateRow = $row;
        let c = &row.candidate;
        sqlx::query(
            "INSERT INTO knowledge_candidates (tenant, id, status, kind, scenario_id, language, \
             dedup_key, source_count, updated_at, expires_at, body) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind($tenant)
        .bind(&c.id)
        .bind(c.status)
        .bind(c.kind)
        .bind(&c.scenario_id)
        .bind(c.language)
        .bind(&row.dedup_key)
        .bind(c.source_count)
        .bind(c.updated_at.as_ref().map_or(0, timestamp_micros))
        .bind(c.expires_at.as_ref().map_or(0, timestamp_micros))
        .bind(c.encode_to_vec())
        .execute(&mut *$tx)
        .await?;
    }};
}

/// Writes a candidate's new state (a review, or a resolution merged into it) inside a
/// transaction, only while the stored candidate is still pending; evaluates to whether it was.
/// A candidate reviewed or expired meanwhile is left as it is: a review is final.
macro_rules! update_pending_candidate {
    ($tx:ident, $tenant:expr, $row:expr) => {{
        let row: &CandidateRow = $row;
        let c = &row.candidate;
        sqlx::query(
            "UPDATE knowledge_candidates SET status = $1, kind = $2, source_count = $3, \
             updated_at = $4, body = $5 WHERE tenant = $6 AND id = $7 AND status = $8",
        )
        .bind(c.status)
        .bind(c.kind)
        .bind(c.source_count)
        .bind(c.updated_at.as_ref().map_or(0, timestamp_micros))
        .bind(c.encode_to_vec())
        .bind($tenant)
        .bind(&c.id)
        .bind(pb::CandidateStatus::Pending as i32)
        .execute(&mut *$tx)
        .await?
        .rows_affected()
            == 1
    }};
}

/// One version with the visibility and tags it gives the article when published.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    /// The immutable content and its status.
    pub version: pb::ArticleVersion,
    /// Visibility of this version.
    pub visibility: i32,
    /// Tags of this version.
    pub tags: Vec<String>,
}

/// An article and the revision it was read at.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The article.
    pub article: pb::Article,
    /// Revision to pass back to [`Store::commit`].
    pub revision: i64,
}

/// A candidate's new state.
#[derive(Debug, Clone)]
pub struct CandidateRow {
    /// The candidate.
    pub candidate: pb::Candidate,
    /// Its deduplication key.
    pub dedup_key: String,
}

/// Everything one article change writes.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// The article's new state.
    pub article: pb::Article,
    /// Revision read; `None` inserts a new article.
    pub expected_revision: Option<i64>,
    /// New versions and versions whose status changed.
    pub versions: Vec<VersionRow>,
    /// Audit entries.
    pub audit: Vec<pb::AuditEntry>,
    /// Change-feed entry: the published version (with the article) or, when `None` inside,
    /// a removal.
    pub feed: Option<Option<pb::GetArticleResponse>>,
    /// Candidate updated by the same change.
    pub candidate: Option<CandidateRow>,
    /// Outbox events.
    pub events: Vec<RawEvent>,
}

/// An article found by external id for an import, with the versions a new version builds on.
#[derive(Debug, Clone)]
pub struct Existing {
    /// The article and its revision.
    pub loaded: Loaded,
    /// Its latest version.
    pub latest: VersionRow,
    /// Its published version, when it has one.
    pub published: Option<VersionRow>,
}

/// One row of the change feed.
#[derive(Debug, Clone)]
pub struct FeedRow {
    /// Sequence number.
    pub seq: i64,
    /// Tenant.
    pub tenant: String,
    /// Article.
    pub article_id: String,
    /// The published article and version, or `None` for a removal.
    pub doc: Option<pb::GetArticleResponse>,
}

/// Filter of an article listing.
#[derive(Debug, Clone, Default)]
pub struct ArticleFilter {
    /// Scenario, or empty.
    pub scenario_id: String,
    /// Language, or 0.
    pub language: i32,
    /// Status, or 0 for every status but archived.
    pub status: i32,
    /// Visibility, or 0.
    pub visibility: i32,
    /// Tag, or empty.
    pub tag: String,
    /// Continue strictly after `(updated_at, article_id)` in newest-first order.
    pub cursor: (i64, String),
    /// Page size.
    pub limit: i64,
}

/// A gap observation to add.
#[derive(Debug, Clone)]
pub struct GapHit {
    /// Scenario.
    pub scenario_id: String,
    /// Language.
    pub language: i32,
    /// Normalised query.
    pub query: String,
    /// Best score seen.
    pub best_score: f64,
    /// Best article seen.
    pub best_article: Option<common::ArticleRef>,
    /// Conversation.
    pub conversation_id: String,
    /// When (µs).
    pub at: i64,
}

/// A bot fallback to count in the gaps.
#[derive(Debug, Clone)]
pub struct Fallback {
    /// Conversation.
    pub conversation_id: String,
    /// Scenario of the turn.
    pub scenario_id: String,
    /// Language of the turn.
    pub language: i32,
    /// When (µs).
    pub at: i64,
}

/// Filter of a gap report.
#[derive(Debug, Clone)]
pub struct GapFilter {
    /// Scenario, or empty.
    pub scenario_id: String,
    /// Language, or 0.
    pub language: i32,
    /// Inclusive start (µs).
    pub start: i64,
    /// Exclusive end (µs).
    pub end: i64,
    /// Maximum gaps.
    pub limit: i64,
}

/// The knowledge store.
#[derive(Clone)]
pub struct Store {
    db: Db,
}

fn decode<M: prost::Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt(what, e))
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// The version and encoded document of a change-feed entry (empty for a removal).
fn feed_doc(feed: &Option<pb::GetArticleResponse>) -> (i32, Vec<u8>) {
    match feed {
        Some(d) => (
            d.version.as_ref().map_or(0, |v| v.version),
            d.encode_to_vec(),
        ),
        None => (0, Vec::new()),
    }
}

fn join_tags(tags: &[String]) -> String {
    tags.join("\n")
}

fn split_tags(tags: &str) -> Vec<String> {
    tags.split('\n')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Store {
    /// Wraps a migrated database.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Writes one article change atomically; see the module documentation.
    pub async fn commit(&self, tenant: &TenantId, change: &Change) -> Result<(), StoreError> {
        self.commit_claiming(tenant, std::slice::from_ref(change), None)
            .await
            .map(|_| ())
    }

    /// Writes several article changes in one transaction: all or none.
    pub async fn commit_all(
        &self,
        tenant: &TenantId,
        changes: &[Change],
    ) -> Result<(), StoreError> {
        self.commit_claiming(tenant, changes, None)
            .await
            .map(|_| ())
    }

    /// Like [`Store::commit_all`], also claiming `(consumer, event id)` in the inbox; returns
    /// false (and writes nothing) when the event was already handled.
    pub async fn commit_claiming(
        &self,
        tenant: &TenantId,
        changes: &[Change],
        claim: Option<(&str, &str)>,
    ) -> Result<bool, StoreError> {
        let t = tenant.as_str();
        let result: Result<bool, StoreError> = in_tx!(&self.db, tx, enqueue, claim_fn, pg => {
            if let Some((consumer, event_id)) = claim
                && !claim_fn(&mut tx, consumer, event_id).await?
            {
                return Ok(false);
            }
            for change in changes {
                let a = &change.article;
                let updated_at = a.updated_at.as_ref().map_or(0, timestamp_micros);
                let written = match change.expected_revision {
                    None => sqlx::query(
                        "INSERT INTO knowledge_articles (tenant, article_id, external_id, scenario_id, \
                         language, visibility, status, revision, updated_at, body) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $9)",
                    )
                    .bind(t)
                    .bind(&a.id)
                    .bind(&a.external_id)
                    .bind(&a.scenario_id)
                    .bind(a.language)
                    .bind(a.visibility)
                    .bind(a.status)
                    .bind(updated_at)
                    .bind(a.encode_to_vec())
                    .execute(&mut *tx)
                    .await
                    .map(|r| r.rows_affected()),
                    Some(rev) => sqlx::query(
                        "UPDATE knowledge_articles SET external_id = $1, scenario_id = $2, \
                         language = $3, visibility = $4, status = $5, revision = revision + 1, \
                         updated_at = $6, body = $7 WHERE tenant = $8 AND article_id = $9 \
                         AND revision = $10",
                    )
                    .bind(&a.external_id)
                    .bind(&a.scenario_id)
                    .bind(a.language)
                    .bind(a.visibility)
                    .bind(a.status)
                    .bind(updated_at)
                    .bind(a.encode_to_vec())
                    .bind(t)
                    .bind(&a.id)
                    .bind(rev)
                    .execute(&mut *tx)
                    .await
                    .map(|r| r.rows_affected()),
                };
                match written {
                    Ok(1) => {}
                    Ok(_) => return Err(StoreError::Conflict),
                    Err(e) if is_unique_violation(&e) => {
                        return Err(if change.expected_revision.is_none()
                            && !a.external_id.is_empty()
                        {
                            StoreError::DuplicateExternalId(a.external_id.clone())
                        } else {
                            StoreError::Conflict
                        });
                    }
                    Err(e) => return Err(e.into()),
                }
                sqlx::query("DELETE FROM knowledge_article_tags WHERE tenant = $1 AND article_id = $2")
                    .bind(t)
                    .bind(&a.id)
                    .execute(&mut *tx)
                    .await?;
                for tag in &a.tags {
                    sqlx::query(
                        "INSERT INTO knowledge_article_tags (tenant, article_id, tag) \
                         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    )
                    .bind(t)
                    .bind(&a.id)
                    .bind(tag)
                    .execute(&mut *tx)
                    .await?;
                }
                for v in &change.versions {
                    sqlx::query(
                        "INSERT INTO knowledge_versions \
                         (tenant, article_id, version, status, visibility, tags, body) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) \
                         ON CONFLICT (tenant, article_id, version) DO UPDATE SET \
                         status = excluded.status, body = excluded.body",
                    )
                    .bind(t)
                    .bind(&a.id)
                    .bind(v.version.version)
                    .bind(v.version.status)
                    .bind(v.visibility)
                    .bind(join_tags(&v.tags))
                    .bind(v.version.encode_to_vec())
                    .execute(&mut *tx)
                    .await?;
                }
                for e in &change.audit {
                    sqlx::query(
                        "INSERT INTO knowledge_audit (tenant, id, article_id, occurred_at, body) \
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(t)
                    .bind(&e.id)
                    .bind(&a.id)
                    .bind(e.occurred_at.as_ref().map_or(0, timestamp_micros))
                    .bind(e.encode_to_vec())
                    .execute(&mut *tx)
                    .await?;
                }
                if let Some(feed) = &change.feed {
                    if pg {
                        // Serialises feed writers so sequence numbers become visible in order.
                        sqlx::query("LOCK TABLE knowledge_changes IN SHARE ROW EXCLUSIVE MODE")
                            .execute(&mut *tx)
                            .await?;
                    }
                    let (version, doc) = match feed {
                        Some(d) => (
                            d.version.as_ref().map_or(0, |v| v.version),
                            d.encode_to_vec(),
                        ),
                        None => (0, Vec::new()),
                    };
                    sqlx::query(
                        "INSERT INTO knowledge_changes (tenant, article_id, version, doc, created_at) \
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(t)
                    .bind(&a.id)
                    .bind(version)
                    .bind(doc)
                    .bind(now_micros())
                    .execute(&mut *tx)
                    .await?;
                }
                if let Some(c) = &change.candidate
                    && !update_pending_candidate!(tx, t, c)
                {
                    // Reviewed concurrently: nothing of this change is written.
                    return Err(StoreError::CandidateNotPending(c.candidate.id.clone()));
                }
                enqueue(&mut tx, &change.events).await?;
            }
            Ok(true)
        });
        result
    }

    /// Finds the articles that import rows with these keys update, with their latest and
    /// published versions, in two queries.
    ///
    /// A key is first an external id; a key that is no article's external id matches the
    /// article with that id, which is the key an export writes for an article without an
    /// external id. The result maps each matched key to its article.
    pub async fn import_lookup(
        &self,
        tenant: &TenantId,
        keys: &[String],
    ) -> Result<HashMap<String, Existing>, StoreError> {
        let t = tenant.as_str();
        let mut out = HashMap::new();
        if keys.is_empty() {
            return Ok(out);
        }
        // The partial index's predicate is repeated so that a generic plan can use the index.
        // PostgreSQL gets the keys as one array: with hundreds of parameters in an IN list its
        // generic plan scans every article of the tenant and rebuilds the list for each row.
        // The two halves use the external-id index and the primary key.
        const COLUMNS: &str = "SELECT external_id, article_id, revision, body FROM \
             knowledge_articles WHERE tenant = ";
        let rows: Vec<(String, String, i64, Vec<u8>)> = match &self.db {
            Db::Postgres(pool) => {
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "{COLUMNS}$1 AND external_id <> '' AND external_id = ANY($2) \
                     UNION ALL {COLUMNS}$1 AND article_id = ANY($2)"
                )))
                .bind(t)
                .bind(keys)
                .fetch_all(pool)
                .await?
            }
            Db::Sqlite(pool) => {
                let mut q = QueryBuilder::new(COLUMNS);
                q.push_bind(t)
                    .push(" AND (external_id <> '' AND external_id IN (");
                let mut list = q.separated(", ");
                for key in keys {
                    list.push_bind(key);
                }
                q.push(") OR article_id IN (");
                let mut list = q.separated(", ");
                for key in keys {
                    list.push_bind(key);
                }
                q.push("))");
                q.build_query_as().fetch_all(pool).await?
            }
        };
        // Each article once, and which key names it: its external id wins over its id.
        let mut articles: Vec<Loaded> = Vec::with_capacity(rows.len());
        let wanted_keys: HashSet<&str> = keys.iter().map(String::as_str).collect();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        let mut by_id: HashMap<String, usize> = HashMap::new();
        for (external_id, article_id, revision, body) in rows {
            let at = match by_id.get(&article_id) {
                Some(&at) => at,
                None => {
                    let article: pb::Article = decode("article", &body)?;
                    articles.push(Loaded { article, revision });
                    by_id.insert(article_id.clone(), articles.len() - 1);
                    articles.len() - 1
                }
            };
            if !external_id.is_empty() && wanted_keys.contains(external_id.as_str()) {
                by_key.insert(external_id, at);
            }
            if wanted_keys.contains(article_id.as_str()) {
                by_key.entry(article_id).or_insert(at);
            }
        }
        let mut wanted: Vec<(&str, i32)> = Vec::with_capacity(articles.len() * 2);
        for l in &articles {
            wanted.push((&l.article.id, l.article.current_version));
            if l.article.published_version > 0
                && l.article.published_version != l.article.current_version
            {
                wanted.push((&l.article.id, l.article.published_version));
            }
        }
        let mut versions: HashMap<(String, i32), VersionRow> = HashMap::new();
        if !wanted.is_empty() {
            let rows: Vec<(String, i32, i32, String, Vec<u8>)> = on_db!(&self.db, pool => {
                let mut q = QueryBuilder::new(
                    "SELECT article_id, version, visibility, tags, body FROM knowledge_versions \
                     WHERE tenant = ",
                );
                q.push_bind(t).push(" AND (");
                for (i, (id, version)) in wanted.iter().enumerate() {
                    if i > 0 {
                        q.push(" OR ");
                    }
                    q.push("(article_id = ")
                        .push_bind(*id)
                        .push(" AND version = ")
                        .push_bind(*version)
                        .push(")");
                }
                q.push(")");
                q.build()
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|r| {
                        Ok((
                            r.try_get(0)?,
                            r.try_get(1)?,
                            r.try_get(2)?,
                            r.try_get(3)?,
                            r.try_get(4)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()?
            });
            for (article_id, number, visibility, tags, body) in rows {
                versions.insert(
                    (article_id, number),
                    VersionRow {
                        version: decode("version", &body)?,
                        visibility,
                        tags: split_tags(&tags),
                    },
                );
            }
        }
        let mut found: Vec<Option<Existing>> = Vec::with_capacity(articles.len());
        for loaded in articles {
            let a = &loaded.article;
            let Some(latest) = versions.get(&(a.id.clone(), a.current_version)).cloned() else {
                found.push(None);
                continue;
            };
            let published = if a.published_version > 0 {
                versions.get(&(a.id.clone(), a.published_version)).cloned()
            } else {
                None
            };
            found.push(Some(Existing {
                loaded,
                latest,
                published,
            }));
        }
        for (key, at) in by_key {
            if let Some(Some(existing)) = found.get(at) {
                out.insert(key, existing.clone());
            }
        }
        Ok(out)
    }

    /// Writes the changes of an import chunk in one transaction with multi-row statements: new
    /// articles are inserted unless their external id exists by now, changed articles are
    /// updated when their revision is still the one read; the tags, versions, audit entries,
    /// change-feed rows and outbox events of the changes written follow. Returns, per change,
    /// whether it was written (false: created or changed concurrently, nothing of it written).
    pub async fn import_changes(
        &self,
        tenant: &TenantId,
        changes: &[Change],
    ) -> Result<Vec<bool>, StoreError> {
        let t = tenant.as_str();
        let now = now_micros();
        let written: Vec<bool> = in_tx!(&self.db, tx, enqueue, _claim, pg => {
            let fresh: Vec<&Change> =
                changes.iter().filter(|c| c.expected_revision.is_none()).collect();
            let mut inserted: HashSet<String> = HashSet::new();
            if !fresh.is_empty() {
                let mut q = QueryBuilder::new(
                    "INSERT INTO knowledge_articles (tenant, article_id, external_id, \
                     scenario_id, language, visibility, status, revision, updated_at, body) ",
                );
                q.push_values(&fresh, |mut row, c| {
                    let a = &c.article;
                    row.push_bind(t)
                        .push_bind(&a.id)
                        .push_bind(&a.external_id)
                        .push_bind(&a.scenario_id)
                        .push_bind(a.language)
                        .push_bind(a.visibility)
                        .push_bind(a.status)
                        .push_bind(1_i64)
                        .push_bind(a.updated_at.as_ref().map_or(0, timestamp_micros))
                        .push_bind(a.encode_to_vec());
                });
                q.push(" ON CONFLICT DO NOTHING RETURNING article_id");
                for r in q.build().fetch_all(&mut *tx).await? {
                    inserted.insert(r.try_get::<String, _>(0)?);
                }
            }
            let mut written = Vec::with_capacity(changes.len());
            for c in changes {
                let a = &c.article;
                let ok = match c.expected_revision {
                    None => inserted.contains(&a.id),
                    Some(rev) => {
                        sqlx::query(
                            "UPDATE knowledge_articles SET external_id = $1, scenario_id = $2, \
                             language = $3, visibility = $4, status = $5, \
                             revision = revision + 1, updated_at = $6, body = $7 \
                             WHERE tenant = $8 AND article_id = $9 AND revision = $10",
                        )
                        .bind(&a.external_id)
                        .bind(&a.scenario_id)
                        .bind(a.language)
                        .bind(a.visibility)
                        .bind(a.status)
                        .bind(a.updated_at.as_ref().map_or(0, timestamp_micros))
                        .bind(a.encode_to_vec())
                        .bind(t)
                        .bind(&a.id)
                        .bind(rev)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                            == 1
                    }
                };
                written.push(ok);
            }
            let kept: Vec<&Change> = changes
                .iter()
                .zip(&written)
                .filter(|(_, ok)| **ok)
                .map(|(c, _)| c)
                .collect();
            let updated: Vec<&str> = kept
                .iter()
                .filter(|c| c.expected_revision.is_some())
                .map(|c| c.article.id.as_str())
                .collect();
            if !updated.is_empty() {
                let mut q = QueryBuilder::new(
                    "DELETE FROM knowledge_article_tags WHERE tenant = ",
                );
                q.push_bind(t).push(" AND article_id IN (");
                let mut list = q.separated(", ");
                for id in &updated {
                    list.push_bind(*id);
                }
                q.push(")");
                q.build().execute(&mut *tx).await?;
            }
            let tags: Vec<(&str, &str)> = kept
                .iter()
                .flat_map(|c| c.article.tags.iter().map(|g| (c.article.id.as_str(), g.as_str())))
                .collect();
            if !tags.is_empty() {
                let mut q = QueryBuilder::new(
                    "INSERT INTO knowledge_article_tags (tenant, article_id, tag) ",
                );
                q.push_values(&tags, |mut row, (id, tag)| {
                    row.push_bind(t).push_bind(*id).push_bind(*tag);
                });
                q.push(" ON CONFLICT DO NOTHING");
                q.build().execute(&mut *tx).await?;
            }
            let versions: Vec<(&str, &VersionRow)> = kept
                .iter()
                .flat_map(|c| c.versions.iter().map(|v| (c.article.id.as_str(), v)))
                .collect();
            if !versions.is_empty() {
                let mut q = QueryBuilder::new(
                    "INSERT INTO knowledge_versions \
                     (tenant, article_id, version, status, visibility, tags, body) ",
                );
                q.push_values(&versions, |mut row, (id, v)| {
                    row.push_bind(t)
                        .push_bind(*id)
                        .push_bind(v.version.version)
                        .push_bind(v.version.status)
                        .push_bind(v.visibility)
                        .push_bind(join_tags(&v.tags))
                        .push_bind(v.version.encode_to_vec());
                });
                q.push(
                    " ON CONFLICT (tenant, article_id, version) DO UPDATE SET \
                     status = excluded.status, body = excluded.body",
                );
                q.build().execute(&mut *tx).await?;
            }
            let audit: Vec<(&str, &pb::AuditEntry)> = kept
                .iter()
                .flat_map(|c| c.audit.iter().map(|e| (c.article.id.as_str(), e)))
                .collect();
            if !audit.is_empty() {
                let mut q = QueryBuilder::new(
                    "INSERT INTO knowledge_audit (tenant, id, article_id, occurred_at, body) ",
                );
                q.push_values(&audit, |mut row, (id, e)| {
                    row.push_bind(t)
                        .push_bind(&e.id)
                        .push_bind(*id)
                        .push_bind(e.occurred_at.as_ref().map_or(0, timestamp_micros))
                        .push_bind(e.encode_to_vec());
                });
                q.build().execute(&mut *tx).await?;
            }
            for c in &kept {
                if let Some(row) = &c.candidate
                    && !update_pending_candidate!(tx, t, row)
                {
                    return Err(StoreError::CandidateNotPending(row.candidate.id.clone()));
                }
            }
            let feed: Vec<(&str, &Option<pb::GetArticleResponse>)> = kept
                .iter()
                .filter_map(|c| c.feed.as_ref().map(|f| (c.article.id.as_str(), f)))
                .collect();
            if !feed.is_empty() {
                if pg {
                    // Serialises feed writers so sequence numbers become visible in order.
                    sqlx::query("LOCK TABLE knowledge_changes IN SHARE ROW EXCLUSIVE MODE")
                        .execute(&mut *tx)
                        .await?;
                }
                let mut q = QueryBuilder::new(
                    "INSERT INTO knowledge_changes (tenant, article_id, version, doc, created_at) ",
                );
                q.push_values(&feed, |mut row, (id, doc)| {
                    let (version, doc) = feed_doc(doc);
                    row.push_bind(t)
                        .push_bind(*id)
                        .push_bind(version)
                        .push_bind(doc)
                        .push_bind(now);
                });
                q.build().execute(&mut *tx).await?;
            }
            let events: Vec<RawEvent> = kept.iter().flat_map(|c| c.events.iter().cloned()).collect();
            enqueue(&mut tx, &events).await?;
            written
        });
        Ok(written)
    }

    /// Returns an article and its revision.
    pub async fn article(
        &self,
        tenant: &TenantId,
        article_id: &str,
    ) -> Result<Option<Loaded>, StoreError> {
        let row: Option<(i64, Vec<u8>)> = on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT revision, body FROM knowledge_articles \
                 WHERE tenant = $1 AND article_id = $2",
            )
            .bind(tenant.as_str())
            .bind(article_id)
            .fetch_optional(pool)
            .await?
        });
        row.map(|(revision, body)| {
            Ok(Loaded {
                article: decode("article", &body)?,
                revision,
            })
        })
        .transpose()
    }

    /// Returns the article id with this external id.
    pub async fn article_by_external_id(
        &self,
        tenant: &TenantId,
        external_id: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT article_id FROM knowledge_articles WHERE tenant = $1 AND external_id = $2",
            )
            .bind(tenant.as_str())
            .bind(external_id)
            .fetch_optional(pool)
            .await?
        }))
    }

    /// Returns one version.
    pub async fn version(
        &self,
        tenant: &TenantId,
        article_id: &str,
        version: i32,
    ) -> Result<Option<VersionRow>, StoreError> {
        let row: Option<(i32, String, Vec<u8>)> = on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT visibility, tags, body FROM knowledge_versions \
                 WHERE tenant = $1 AND article_id = $2 AND version = $3",
            )
            .bind(tenant.as_str())
            .bind(article_id)
            .bind(version)
            .fetch_optional(pool)
            .await?
        });
        row.map(|(visibility, tags, body)| {
            Ok(VersionRow {
                version: decode("version", &body)?,
                visibility,
                tags: split_tags(&tags),
            })
        })
        .transpose()
    }

    /// Lists versions newest first, below `before` (exclusive).
    pub async fn versions(
        &self,
        tenant: &TenantId,
        article_id: &str,
        before: i32,
        limit: i64,
    ) -> Result<Vec<pb::ArticleVersion>, StoreError> {
        let bodies: Vec<Vec<u8>> = on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT body FROM knowledge_versions WHERE tenant = $1 AND article_id = $2 \
                 AND version < $3 ORDER BY version DESC LIMIT $4",
            )
            .bind(tenant.as_str())
            .bind(article_id)
            .bind(before)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        bodies.iter().map(|b| decode("version", b)).collect()
    }

    /// Lists articles most recently updated first.
    pub async fn articles(
        &self,
        tenant: &TenantId,
        f: &ArticleFilter,
    ) -> Result<Vec<pb::Article>, StoreError> {
        let archived = pb::ArticleStatus::Archived as i32;
        let bodies: Vec<Vec<u8>> = on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT a.body FROM knowledge_articles a WHERE a.tenant = $1 \
                 AND ($2 = '' OR a.scenario_id = $2) AND ($3 = 0 OR a.language = $3) \
                 AND (($4 = 0 AND a.status <> $5) OR a.status = $4) \
                 AND ($6 = 0 OR a.visibility = $6) \
                 AND ($7 = '' OR EXISTS (SELECT 1 FROM knowledge_article_tags g \
                      WHERE g.tenant = a.tenant AND g.article_id = a.article_id AND g.tag = $7)) \
                 AND (a.updated_at < $8 OR (a.updated_at = $8 AND a.article_id < $9)) \
                 ORDER BY a.updated_at DESC, a.article_id DESC LIMIT $10",
            )
            .bind(tenant.as_str())
            .bind(&f.scenario_id)
            .bind(f.language)
            .bind(f.status)
            .bind(archived)
            .bind(f.visibility)
            .bind(&f.tag)
            .bind(f.cursor.0)
            .bind(&f.cursor.1)
            .bind(f.limit)
            .fetch_all(pool)
            .await?
        });
        bodies.iter().map(|b| decode("article", b)).collect()
    }

    /// Lists an article's audit trail newest first, after a keyset cursor.
    pub async fn audit(
        &self,
        tenant: &TenantId,
        article_id: &str,
        cursor: &(i64, String),
        limit: i64,
    ) -> Result<Vec<pb::AuditEntry>, StoreError> {
        let bodies: Vec<Vec<u8>> = on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT body FROM knowledge_audit WHERE tenant = $1 AND article_id = $2 \
                 AND (occurred_at < $3 OR (occurred_at = $3 AND id < $4)) \
                 ORDER BY occurred_at DESC, id DESC LIMIT $5",
            )
            .bind(tenant.as_str())
            .bind(article_id)
            .bind(cursor.0)
            .bind(&cursor.1)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        bodies.iter().map(|b| decode("audit entry", b)).collect()
    }

    /// Returns the feed position that includes every change committed so far: the highest
    /// sequence number, or the pruning mark when that is higher (0 when both are empty).
    pub async fn last_change(&self) -> Result<i64, StoreError> {
        let max: Option<i64> = on_db!(&self.db, pool => {
            sqlx::query_scalar("SELECT MAX(seq) FROM knowledge_changes")
                .fetch_one(pool)
                .await?
        });
        Ok(max.unwrap_or(0).max(self.feed_floor().await?))
    }

    /// Returns the highest sequence number pruned from the feed: a replica positioned below it
    /// may have missed rows and must rebuild its index.
    pub async fn feed_floor(&self) -> Result<i64, StoreError> {
        let floor: Option<i64> = on_db!(&self.db, pool => {
            sqlx::query_scalar("SELECT pruned_through FROM knowledge_feed_state WHERE id = 1")
                .fetch_optional(pool)
                .await?
        });
        Ok(floor.unwrap_or(0))
    }

    /// Deletes the feed rows written before `before` (µs), always keeping the newest row, and
    /// raises the pruning mark in the same transaction. Returns how many rows went.
    pub async fn prune_changes(&self, before: i64) -> Result<u64, StoreError> {
        let deleted: u64 = in_tx!(&self.db, tx, _enqueue, _claim => {
            let cut: Option<i64> = sqlx::query_scalar(
                "SELECT MAX(seq) FROM knowledge_changes WHERE created_at < $1 \
                 AND seq < (SELECT MAX(seq) FROM knowledge_changes)",
            )
            .bind(before)
            .fetch_one(&mut *tx)
            .await?;
            match cut {
                None => 0,
                Some(cut) => {
                    let n = sqlx::query("DELETE FROM knowledge_changes WHERE seq <= $1")
                        .bind(cut)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    sqlx::query(
                        "UPDATE knowledge_feed_state SET pruned_through = $1 \
                         WHERE id = 1 AND pruned_through < $1",
                    )
                    .bind(cut)
                    .execute(&mut *tx)
                    .await?;
                    n
                }
            }
        });
        Ok(deleted)
    }

    /// Returns change-feed rows after `seq`, in order.
    pub async fn changes_after(&self, seq: i64, limit: i64) -> Result<Vec<FeedRow>, StoreError> {
        let rows: Vec<(i64, String, String, Vec<u8>)> = on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT seq, tenant, article_id, doc FROM knowledge_changes \
                 WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(seq)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|(seq, tenant, article_id, doc)| {
                Ok(FeedRow {
                    seq,
                    tenant,
                    article_id,
                    doc: if doc.is_empty() {
                        None
                    } else {
                        Some(decode("change", &doc)?)
                    },
                })
            })
            .collect()
    }

    /// Returns every published article with its published version, in pages after
    /// `(tenant, article_id)`.
    pub async fn published(
        &self,
        after: &(String, String),
        limit: i64,
    ) -> Result<Vec<(String, pb::GetArticleResponse)>, StoreError> {
        let rows: Vec<(String, String, Vec<u8>, Vec<u8>)> = on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT a.tenant, a.article_id, a.body, v.body FROM knowledge_articles a \
                 JOIN knowledge_versions v ON v.tenant = a.tenant \
                 AND v.article_id = a.article_id AND v.status = $1 \
                 WHERE a.status = $2 AND (a.tenant > $3 OR (a.tenant = $3 AND a.article_id > $4)) \
                 ORDER BY a.tenant, a.article_id LIMIT $5",
            )
            .bind(pb::VersionStatus::Published as i32)
            .bind(pb::ArticleStatus::Published as i32)
            .bind(&after.0)
            .bind(&after.1)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|(tenant, _, a, v)| {
                Ok((
                    tenant,
                    pb::GetArticleResponse {
                        article: Some(decode("article", &a)?),
                        version: Some(decode("version", &v)?),
                    },
                ))
            })
            .collect()
    }

    /// Adds a miss to a gap, creating it when new.
    pub async fn record_gap(&self, tenant: &TenantId, g: &GapHit) -> Result<(), StoreError> {
        let t = tenant.as_str();
        let best = g
            .best_article
            .as_ref()
            .map(prost::Message::encode_to_vec)
            .unwrap_or_default();
        let _: () = in_tx!(&self.db, tx, _enqueue, _claim, _pg => {
            let row: Option<(f64, String)> = sqlx::query_as(
                "SELECT best_score, examples FROM knowledge_gaps WHERE tenant = $1 \
                 AND scenario_id = $2 AND language = $3 AND query = $4",
            )
            .bind(t)
            .bind(&g.scenario_id)
            .bind(g.language)
            .bind(&g.query)
            .fetch_optional(&mut *tx)
            .await?;
            match row {
                None => {
                    sqlx::query(
                        "INSERT INTO knowledge_gaps (tenant, scenario_id, language, query, \
                         miss_count, fallback_count, best_score, best_article, examples, \
                         first_seen, last_seen) VALUES ($1, $2, $3, $4, 1, 0, $5, $6, $7, $8, $8) \
                         ON CONFLICT (tenant, scenario_id, language, query) DO UPDATE SET \
                         miss_count = knowledge_gaps.miss_count + 1, last_seen = excluded.last_seen",
                    )
                    .bind(t)
                    .bind(&g.scenario_id)
                    .bind(g.language)
                    .bind(&g.query)
                    .bind(g.best_score)
                    .bind(&best)
                    .bind(&g.conversation_id)
                    .bind(g.at)
                    .execute(&mut *tx)
                    .await?;
                }
                Some((best_score, examples)) => {
                    let mut ex = split_tags(&examples);
                    if ex.len() < 5 && !ex.contains(&g.conversation_id) {
                        ex.push(g.conversation_id.clone());
                    }
                    let better = g.best_score > best_score;
                    sqlx::query(
                        "UPDATE knowledge_gaps SET miss_count = miss_count + 1, last_seen = $1, \
                         examples = $2, best_score = CASE WHEN $3 > best_score THEN $3 \
                         ELSE best_score END, best_article = CASE WHEN $4 = 1 THEN $5 \
                         ELSE best_article END WHERE tenant = $6 AND scenario_id = $7 \
                         AND language = $8 AND query = $9",
                    )
                    .bind(g.at)
                    .bind(join_tags(&ex))
                    .bind(g.best_score)
                    .bind(i32::from(better))
                    .bind(&best)
                    .bind(t)
                    .bind(&g.scenario_id)
                    .bind(g.language)
                    .bind(&g.query)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            sqlx::query(
                "INSERT INTO knowledge_gap_links (tenant, conversation_id, scenario_id, language, \
                 query, at) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (tenant, conversation_id) DO UPDATE SET \
                 scenario_id = excluded.scenario_id, language = excluded.language, \
                 query = excluded.query, at = excluded.at",
            )
            .bind(t)
            .bind(&g.conversation_id)
            .bind(&g.scenario_id)
            .bind(g.language)
            .bind(&g.query)
            .bind(g.at)
            .execute(&mut *tx)
            .await?;
        });
        Ok(())
    }

    /// Counts a bot fallback, claiming `(consumer, event id)` in the inbox: on the gap of the
    /// last query the conversation recorded, or else on the scenario's gap without a query
    /// (created when new). `count_unlinked` false ignores a fallback whose conversation has no
    /// recorded query. Returns the gap's query, or `None` when the event was handled before or
    /// ignored.
    pub async fn record_fallback(
        &self,
        tenant: &TenantId,
        claim: (&str, &str),
        f: &Fallback,
        count_unlinked: bool,
    ) -> Result<Option<String>, StoreError> {
        let t = tenant.as_str();
        let out: Option<String> = in_tx!(&self.db, tx, _enqueue, claim_fn => {
            if !claim_fn(&mut tx, claim.0, claim.1).await? {
                return Ok(None);
            }
            let link: Option<(String, i32, String)> = sqlx::query_as(
                "SELECT scenario_id, language, query FROM knowledge_gap_links \
                 WHERE tenant = $1 AND conversation_id = $2",
            )
            .bind(t)
            .bind(&f.conversation_id)
            .fetch_optional(&mut *tx)
            .await?;
            let key = match link {
                Some(k) => Some(k),
                None if count_unlinked => Some((f.scenario_id.clone(), f.language, String::new())),
                None => None,
            };
            match key {
                None => None,
                Some((scenario_id, language, query)) => {
                    let examples: Option<String> = sqlx::query_scalar(
                        "SELECT examples FROM knowledge_gaps WHERE tenant = $1 \
                         AND scenario_id = $2 AND language = $3 AND query = $4",
                    )
                    .bind(t)
                    .bind(&scenario_id)
                    .bind(language)
                    .bind(&query)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let mut ex = examples.as_deref().map(split_tags).unwrap_or_default();
                    if ex.len() < 5 && !ex.contains(&f.conversation_id) {
                        ex.push(f.conversation_id.clone());
                    }
                    sqlx::query(
                        "INSERT INTO knowledge_gaps (tenant, scenario_id, language, query, \
                         miss_count, fallback_count, best_score, best_article, examples, \
                         first_seen, last_seen) VALUES ($1, $2, $3, $4, 0, 1, 0, $5, $6, $7, $7) \
                         ON CONFLICT (tenant, scenario_id, language, query) DO UPDATE SET \
                         fallback_count = knowledge_gaps.fallback_count + 1, \
                         examples = excluded.examples, \
                         last_seen = CASE WHEN excluded.last_seen > knowledge_gaps.last_seen \
                         THEN excluded.last_seen ELSE knowledge_gaps.last_seen END",
                    )
                    .bind(t)
                    .bind(&scenario_id)
                    .bind(language)
                    .bind(&query)
                    .bind(Vec::<u8>::new())
                    .bind(join_tags(&ex))
                    .bind(f.at)
                    .execute(&mut *tx)
                    .await?;
                    Some(query)
                }
            }
        });
        Ok(out)
    }

    /// Forgets which query conversations recorded before `before` (µs); returns how many.
    pub async fn prune_gap_links(&self, before: i64) -> Result<u64, StoreError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query("DELETE FROM knowledge_gap_links WHERE at < $1")
                .bind(before)
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }

    /// Deletes the gaps last seen before `before` (µs); returns how many.
    pub async fn prune_gaps(&self, before: i64) -> Result<u64, StoreError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query("DELETE FROM knowledge_gaps WHERE last_seen < $1")
                .bind(before)
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }

    /// Returns gaps ranked by misses plus fallbacks.
    pub async fn gaps(&self, tenant: &TenantId, f: &GapFilter) -> Result<Vec<pb::Gap>, StoreError> {
        let rows = on_db!(&self.db, pool => {
            sqlx::query(
                "SELECT scenario_id, language, query, miss_count, fallback_count, best_score, \
                 best_article, examples, first_seen, last_seen FROM knowledge_gaps \
                 WHERE tenant = $1 AND ($2 = '' OR scenario_id = $2) AND ($3 = 0 OR language = $3) \
                 AND last_seen >= $4 AND last_seen < $5 \
                 ORDER BY miss_count + fallback_count DESC, last_seen DESC LIMIT $6",
            )
            .bind(tenant.as_str())
            .bind(&f.scenario_id)
            .bind(f.language)
            .bind(f.start)
            .bind(f.end)
            .bind(f.limit)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| -> Result<pb::Gap, StoreError> {
                let best: Vec<u8> = r.try_get(6)?;
                let examples: String = r.try_get(7)?;
                Ok(pb::Gap {
                    scenario_id: r.try_get(0)?,
                    language: r.try_get(1)?,
                    query: r.try_get(2)?,
                    miss_count: r.try_get(3)?,
                    fallback_count: r.try_get(4)?,
                    best_score: r.try_get(5)?,
                    best_article: if best.is_empty() {
                        None
                    } else {
                        Some(decode("gap article", &best)?)
                    },
                    example_conversation_ids: split_tags(&examples),
                    first_seen_at: Some(micros_timestamp(r.try_get(8)?)),
                    last_seen_at: Some(micros_timestamp(r.try_get(9)?)),
                })
            })
            .collect::<Result<Vec<_>, _>>()?
        });
        Ok(rows)
    }

    /// Returns a candidate.
    pub async fn candidate(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<CandidateRow>, StoreError> {
        let row: Option<(String, Vec<u8>)> = on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT dedup_key, body FROM knowledge_candidates WHERE tenant = $1 AND id = $2",
            )
            .bind(tenant.as_str())
            .bind(id)
            .fetch_optional(pool)
            .await?
        });
        row.map(|(dedup_key, body)| {
            Ok(CandidateRow {
                candidate: decode("candidate", &body)?,
                dedup_key,
            })
        })
        .transpose()
    }

    /// Lists candidates by source count, highest first, after an offset.
    pub async fn candidates(
        &self,
        tenant: &TenantId,
        status: i32,
        scenario_id: &str,
        kind: i32,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<pb::Candidate>, StoreError> {
        let bodies: Vec<Vec<u8>> = on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT body FROM knowledge_candidates WHERE tenant = $1 AND status = $2 \
                 AND ($3 = '' OR scenario_id = $3) AND ($4 = 0 OR kind = $4) \
                 ORDER BY source_count DESC, updated_at DESC, id LIMIT $5 OFFSET $6",
            )
            .bind(tenant.as_str())
            .bind(status)
            .bind(scenario_id)
            .bind(kind)
            .bind(limit)
            .bind(offset)
            .fetch_all(pool)
            .await?
        });
        bodies.iter().map(|b| decode("candidate", b)).collect()
    }

    /// Records a mined resolution: merges it into the pending candidate of its scenario and
    /// language that `score` rates highest (`None`: not a duplicate; the newest
    /// [`DUPLICATE_SCAN`] pending candidates are compared) or creates one (with
    /// `created_event`; also when the candidate to merge into was reviewed after it was read),
    /// claiming the event in the inbox. Returns `None` when the event was already handled,
    /// otherwise the candidate and whether it is new.
    pub async fn mine(
        &self,
        tenant: &TenantId,
        claim: (&str, &str),
        fresh: &CandidateRow,
        score: impl Fn(&CandidateRow) -> Option<f64>,
        merge: impl Fn(&mut pb::Candidate),
        created_event: impl Fn(&pb::Candidate) -> RawEvent,
    ) -> Result<Option<(pb::Candidate, bool)>, StoreError> {
        let t = tenant.as_str();
        let c = &fresh.candidate;
        let out: Option<(pb::Candidate, bool)> = in_tx!(&self.db, tx, enqueue, claim_fn, pg => {
            if !claim_fn(&mut tx, claim.0, claim.1).await? {
                return Ok(None);
            }
            if pg {
                // Resolutions are handled concurrently: one at a time per scenario and language,
                // so two near duplicates never both become new candidates. (SQLite writers are
                // serialised, and a stale read fails the write, which is retried.)
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind(format!("knowledge-mining\n{t}\n{}\n{}", c.scenario_id, c.language))
                    .execute(&mut *tx)
                    .await?;
            }
            let pending: Vec<(String, Vec<u8>)> = sqlx::query_as(
                "SELECT dedup_key, body FROM knowledge_candidates WHERE tenant = $1 \
                 AND scenario_id = $2 AND language = $3 AND status = $4 \
                 ORDER BY (dedup_key = $5) DESC, updated_at DESC LIMIT $6",
            )
            .bind(t)
            .bind(&c.scenario_id)
            .bind(c.language)
            .bind(pb::CandidateStatus::Pending as i32)
            .bind(&fresh.dedup_key)
            .bind(DUPLICATE_SCAN)
            .fetch_all(&mut *tx)
            .await?;
            let mut best: Option<(f64, CandidateRow)> = None;
            for (dedup_key, body) in pending {
                let row = CandidateRow {
                    candidate: decode("candidate", &body)?,
                    dedup_key,
                };
                if let Some(s) = score(&row)
                    && best.as_ref().is_none_or(|(b, _)| s > *b)
                {
                    best = Some((s, row));
                }
            }
            // The merge is written only while the candidate is still pending: a review that
            // commits after the read above is final, and the resolution then becomes a new
            // candidate instead of bringing the reviewed one back to pending.
            let merged = match best {
                Some((_, mut row)) => {
                    merge(&mut row.candidate);
                    update_pending_candidate!(tx, t, &row).then_some(row)
                }
                None => None,
            };
            let (row, created) = match merged {
                Some(row) => (row, false),
                None => {
                    insert_candidate!(tx, t, fresh);
                    (fresh.clone(), true)
                }
            };
            if created {
                enqueue(&mut tx, &[created_event(&row.candidate)]).await?;
            }
            Some((row.candidate, created))
        });
        Ok(out)
    }

    /// Writes a pending candidate's review without touching an article; fails with
    /// [`StoreError::CandidateNotPending`] (writing nothing) when it is no longer pending.
    pub async fn put_candidate(
        &self,
        tenant: &TenantId,
        c: &CandidateRow,
    ) -> Result<(), StoreError> {
        let t = tenant.as_str();
        let written: bool = in_tx!(&self.db, tx, _enqueue, _claim, _pg => {
            update_pending_candidate!(tx, t, c)
        });
        if written {
            Ok(())
        } else {
            Err(StoreError::CandidateNotPending(c.candidate.id.clone()))
        }
    }

    /// Marks pending candidates whose expiry passed as expired; returns how many.
    pub async fn expire_candidates(&self, now: i64) -> Result<u64, StoreError> {
        let expired = pb::CandidateStatus::Expired as i32;
        let pending = pb::CandidateStatus::Pending as i32;
        let rows: Vec<(String, Vec<u8>)> = on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT tenant, body FROM knowledge_candidates WHERE status = $1 \
                 AND expires_at < $2 LIMIT 1000",
            )
            .bind(pending)
            .bind(now)
            .fetch_all(pool)
            .await?
        });
        let mut n = 0;
        for (tenant, body) in rows {
            let mut c: pb::Candidate = decode("candidate", &body)?;
            c.status = expired;
            c.updated_at = Some(micros_timestamp(now));
            n += on_db!(&self.db, pool => {
                sqlx::query(
                    "UPDATE knowledge_candidates SET status = $1, updated_at = $2, body = $3 \
                     WHERE tenant = $4 AND id = $5 AND status = $6",
                )
                .bind(expired)
                .bind(now)
                .bind(c.encode_to_vec())
                .bind(&tenant)
                .bind(&c.id)
                .bind(pending)
                .execute(pool)
                .await?
                .rows_affected()
            });
        }
        Ok(n)
    }
}
