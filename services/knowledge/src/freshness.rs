//! Keeps a replica's in-memory search index in step with the database.
//!
//! Every publish and archive writes a row to the `knowledge_changes` feed in the same transaction
//! as the change itself, with a sequence number that becomes visible in commit order. Each
//! replica rebuilds its index from the published articles at start, remembers the feed position
//! it started from, and then applies feed rows in order: every `poll_interval` (changes made on
//! other replicas) and at once after a change on this replica. Since the index only ever follows
//! the feed, a crash between a commit and the indexing can never leave the index out of step: the
//! row is still there at the next poll, or at the rebuild after a restart.
//!
//! The feed is pruned (`feed_retention`, 1 h by default; the newest row always stays) and the
//! highest pruned sequence number is kept as a mark. A replica whose position is below the mark
//! may have missed rows: it rebuilds its index from the database, as at start, and goes on from
//! there.
//!
//! A shared durable bus consumer would deliver each event to one replica only, and an ephemeral
//! one loses events while a replica restarts; the feed avoids both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tandem_proto::pb::common::v1::Language;
use tandem_proto::pb::knowledge::v1 as pb;
use tandem_search::{ArticleDoc, SearchIndex, Visibility};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

/// Rows read from the feed per query.
const FEED_BATCH: i64 = 1_000;
/// Articles read per query during a rebuild.
const REBUILD_BATCH: i64 = 2_000;

/// Why the index could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum FreshnessError {
    /// The database failed.
    #[error("reading the change feed failed")]
    Store(#[from] StoreError),
    /// The index failed.
    #[error("search index failed")]
    Index(#[from] tandem_search::SearchError),
    /// A blocking task failed.
    #[error("index task failed: {0}")]
    Task(String),
}

/// The language code the index stores.
pub fn language_code(language: i32) -> &'static str {
    match Language::try_from(language) {
        Ok(Language::Zh) => "zh",
        Ok(Language::En) => "en",
        _ => "",
    }
}

/// The index's visibility of a wire visibility (unspecified means both).
pub fn index_visibility(visibility: i32) -> Visibility {
    match pb::Visibility::try_from(visibility) {
        Ok(pb::Visibility::Bot) => Visibility::Bot,
        Ok(pb::Visibility::Agents) => Visibility::Agents,
        _ => Visibility::Both,
    }
}

/// The index document of a published article version.
pub fn to_doc(tenant: &str, d: &pb::GetArticleResponse) -> Option<ArticleDoc> {
    let a = d.article.as_ref()?;
    let v = d.version.as_ref()?;
    Some(ArticleDoc {
        tenant: tenant.to_owned(),
        article_id: a.id.clone(),
        version: u64::try_from(v.version).unwrap_or(0),
        scenario: a.scenario_id.clone(),
        language: language_code(a.language).to_owned(),
        visibility: index_visibility(a.visibility),
        tags: a.tags.clone(),
        title: v.title.clone(),
        questions: v.questions.clone(),
        answer: v.answer.clone(),
    })
}

fn page_visibility(docs: &[ArticleDoc]) -> VisibilityMap {
    docs.iter()
        .map(|d| {
            let v = match d.visibility {
                Visibility::Bot => pb::Visibility::Bot,
                Visibility::Agents => pb::Visibility::Agents,
                Visibility::Both => pb::Visibility::Both,
            };
            ((d.tenant.clone(), d.article_id.clone()), v as i32)
        })
        .collect()
}

/// The visibility of each indexed article by (tenant, article id).
type VisibilityMap = HashMap<(String, String), i32>;

/// Rebuilds `index` from the published articles; returns the feed position the rebuild
/// includes, the index sequence number of the rebuild and the articles' visibility.
async fn rebuild(
    index: &Arc<SearchIndex>,
    store: &Store,
) -> Result<(i64, u64, VisibilityMap), FreshnessError> {
    // The position is read first: rows committed during the rebuild are applied again
    // afterwards, which is harmless because they are applied in order.
    let position = store.last_change().await?;
    let mut docs = Vec::new();
    let mut after = (String::new(), String::new());
    loop {
        let page = store.published(&after, REBUILD_BATCH).await?;
        let Some((tenant, last)) = page.last() else {
            break;
        };
        after = (
            tenant.clone(),
            last.article
                .as_ref()
                .map(|a| a.id.clone())
                .unwrap_or_default(),
        );
        let full = page.len() == usize::try_from(REBUILD_BATCH).unwrap_or(usize::MAX);
        docs.extend(page.iter().filter_map(|(t, d)| to_doc(t, d)));
        if !full {
            break;
        }
    }
    let count = docs.len();
    let visibility = page_visibility(&docs);
    let idx = Arc::clone(index);
    let report = tokio::task::spawn_blocking(move || idx.rebuild(docs))
        .await
        .map_err(|e| FreshnessError::Task(e.to_string()))??;
    if report.rejected > 0 {
        tracing::warn!(rejected = report.rejected, first = ?report.rejections.first(),
            "articles left out of the search index");
    }
    tracing::info!(
        articles = count,
        position,
        "search index rebuilt from the database"
    );
    Ok((position, report.seq, visibility))
}

/// A replica's index and its position in the change feed.
pub struct Indexer {
    index: Arc<SearchIndex>,
    store: Store,
    /// Last feed row applied and the index sequence number of its write; the lock also keeps
    /// applications in order.
    applied: Mutex<(i64, u64)>,
    /// Visibility of each indexed article by (tenant, article id), which hits do not carry.
    visibility: RwLock<VisibilityMap>,
    /// Rebuilds after falling behind the pruned feed.
    rebuilds: AtomicU64,
}

impl Indexer {
    /// Rebuilds `index` from the published articles and returns an indexer positioned at the
    /// feed row that the rebuild includes.
    pub async fn start(index: Arc<SearchIndex>, store: Store) -> Result<Self, FreshnessError> {
        let (position, seq, visibility) = rebuild(&index, &store).await?;
        Ok(Self {
            index,
            store,
            applied: Mutex::new((position, seq)),
            visibility: RwLock::new(visibility),
            rebuilds: AtomicU64::new(0),
        })
    }

    /// How many times this replica rebuilt its index after falling behind the pruned feed.
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds.load(Ordering::Relaxed)
    }

    /// The wire visibility of an indexed article; unspecified when unknown.
    pub fn visibility_of(&self, tenant: &str, article_id: &str) -> i32 {
        self.visibility
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(tenant.to_owned(), article_id.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// The index.
    pub fn index(&self) -> &Arc<SearchIndex> {
        &self.index
    }

    /// Applies every feed row not applied yet and waits until they are searchable (at most
    /// `wait`). Returns the feed position reached.
    pub async fn catch_up(&self, wait: Duration) -> Result<i64, FreshnessError> {
        let mut applied = self.applied.lock().await;
        loop {
            let rows = self.store.changes_after(applied.0, FEED_BATCH).await?;
            // Read after the rows: a prune that removed rows this replica still needed has
            // raised the mark by then.
            if self.store.feed_floor().await? > applied.0 {
                tracing::warn!(
                    position = applied.0,
                    "the change feed was pruned past this replica's position; rebuilding"
                );
                let (position, seq, visibility) = rebuild(&self.index, &self.store).await?;
                *self
                    .visibility
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = visibility;
                *applied = (position, seq);
                self.rebuilds.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(last) = rows.last() else {
                break;
            };
            let next = last.seq;
            {
                let mut vis = self
                    .visibility
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                for row in &rows {
                    let key = (row.tenant.clone(), row.article_id.clone());
                    match row.doc.as_ref().and_then(|d| d.article.as_ref()) {
                        Some(a) => vis.insert(key, a.visibility),
                        None => vis.remove(&key),
                    };
                }
            }
            let idx = Arc::clone(&self.index);
            let seq = tokio::task::spawn_blocking(move || {
                let mut seq = None;
                for row in rows {
                    let s = match row.doc.as_ref().and_then(|d| to_doc(&row.tenant, d)) {
                        Some(doc) => idx.upsert(doc),
                        None => idx.remove(&row.tenant, &row.article_id),
                    };
                    match s {
                        Ok(s) => seq = Some(s),
                        Err(e) if e.is_invalid_input() => {
                            tracing::warn!(error = %e, seq = row.seq, "feed row not indexable");
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(seq)
            })
            .await
            .map_err(|e| FreshnessError::Task(e.to_string()))??;
            applied.0 = next;
            if let Some(seq) = seq {
                applied.1 = seq;
            }
        }
        // Waits for the last write even when another caller applied it, so a change is
        // searchable when this returns.
        let (position, seq) = *applied;
        drop(applied);
        if self.index.visible_seq() < seq {
            let idx = Arc::clone(&self.index);
            tokio::task::spawn_blocking(move || idx.wait_visible(seq, wait))
                .await
                .map_err(|e| FreshnessError::Task(e.to_string()))??;
        }
        Ok(position)
    }

    /// Polls the feed every `interval` until shutdown.
    pub async fn poll(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if let Err(e) = self.catch_up(Duration::from_secs(1)).await {
                tracing::warn!(error = %tandem_platform::error::DisplayChain(&e),
                    "refreshing the search index failed");
            }
        }
    }
}
