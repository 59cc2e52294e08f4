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
//!
//! When the index's writer fails (tantivy reports an error, or the writer thread panics), the
//! writes it had not committed are lost and it refuses new ones. The next [`Indexer::catch_up`]
//! (the poller's, or the one after a change on this replica) notices, logs the failure, starts a
//! new writer ([`SearchIndex::recover`], which replaces the index if no writer can be opened on
//! it) and rebuilds the index from the database, as at start, so the lost writes are applied
//! too. A failed attempt is logged and retried with exponential backoff (100 ms doubling to
//! 30 s); while the writer is down, searches answer from the last commit, the gauge
//! `tandem_knowledge_index_writer_up` is 0 and, once an attempt has failed, the gRPC health
//! service reports the knowledge service NOT_SERVING until an attempt succeeds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tandem_platform::error::DisplayChain;

use tandem_proto::pb::common::v1::Language;
use tandem_proto::pb::knowledge::v1 as pb;
use tandem_search::{ArticleDoc, SearchIndex, Visibility};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::store::{Store, StoreError};

/// Rows read from the feed per query.
const FEED_BATCH: i64 = 1_000;
/// Articles read per query during a rebuild.
const REBUILD_BATCH: i64 = 2_000;
/// Wait before the second attempt to recover a failed index writer; it doubles per attempt.
const RECOVERY_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between attempts to recover a failed index writer.
const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Failures of the search index's writer.
pub const INDEX_WRITER_FAILURES_TOTAL: &str = "tandem_knowledge_index_writer_failures_total";
/// Recoveries of the search index after a writer failure (new writer and rebuild).
pub const INDEX_RECOVERIES_TOTAL: &str = "tandem_knowledge_index_recoveries_total";
/// Whether the search index's writer accepts writes (1) or has failed (0).
pub const INDEX_WRITER_UP: &str = "tandem_knowledge_index_writer_up";

/// Registers the help texts of the index metrics.
pub fn describe_metrics() {
    metrics::describe_counter!(
        INDEX_WRITER_FAILURES_TOTAL,
        "Failures of the search index writer."
    );
    metrics::describe_counter!(
        INDEX_RECOVERIES_TOTAL,
        "Search index recoveries after a writer failure (new writer, rebuild from the database)."
    );
    metrics::describe_gauge!(
        INDEX_WRITER_UP,
        "1 while the search index writer accepts writes, 0 after it failed until it recovers."
    );
}

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
    /// The index's writer failed and the last attempt to recover it failed too; the next
    /// attempt waits for the backoff.
    #[error("search index writer failed ({failure}); next recovery attempt in {retry_in:?}")]
    WriterDown {
        /// Why the writer stopped.
        failure: String,
        /// Time left before the next attempt.
        retry_in: Duration,
    },
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
    /// Writer failures noticed.
    writer_failures: AtomicU64,
    /// Recoveries after a writer failure.
    recoveries: AtomicU64,
    /// Attempts to recover the current writer failure.
    backoff: std::sync::Mutex<Backoff>,
    /// Where the state of the index is reported, if anywhere.
    health: std::sync::Mutex<Option<Health>>,
}

/// Attempts to recover the current writer failure.
#[derive(Debug, Default)]
struct Backoff {
    /// Failed attempts so far; 0 when the writer is running.
    failed: u32,
    /// No attempt before this.
    next_attempt: Option<Instant>,
}

/// The gRPC health service the index's state is reported to.
struct Health {
    reporter: HealthReporter,
    service: &'static str,
    shutdown: CancellationToken,
    /// NOT_SERVING was reported and not taken back yet.
    down: bool,
}

/// The wait after `failed` failed attempts: 100 ms, doubling, at most 30 s.
fn backoff_delay(failed: u32) -> Duration {
    RECOVERY_BACKOFF_FIRST
        .saturating_mul(1_u32 << failed.saturating_sub(1).min(16))
        .min(RECOVERY_BACKOFF_MAX)
}

impl Indexer {
    /// Rebuilds `index` from the published articles and returns an indexer positioned at the
    /// feed row that the rebuild includes.
    pub async fn start(index: Arc<SearchIndex>, store: Store) -> Result<Self, FreshnessError> {
        let (position, seq, visibility) = rebuild(&index, &store).await?;
        metrics::gauge!(INDEX_WRITER_UP).set(1.0);
        Ok(Self {
            index,
            store,
            applied: Mutex::new((position, seq)),
            visibility: RwLock::new(visibility),
            rebuilds: AtomicU64::new(0),
            writer_failures: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            backoff: std::sync::Mutex::new(Backoff::default()),
            health: std::sync::Mutex::new(None),
        })
    }

    /// Reports the index's state as the health of `service`: NOT_SERVING once an attempt to
    /// recover a failed writer has failed, SERVING again after a recovery (unless `shutdown`
    /// is cancelled by then).
    pub fn report_health(
        &self,
        reporter: HealthReporter,
        service: &'static str,
        shutdown: CancellationToken,
    ) {
        *self.health.lock().unwrap_or_else(PoisonError::into_inner) = Some(Health {
            reporter,
            service,
            shutdown,
            down: false,
        });
    }

    /// How many writer failures this replica noticed.
    pub fn writer_failures(&self) -> u64 {
        self.writer_failures.load(Ordering::Relaxed)
    }

    /// How many times this replica recovered its index after a writer failure.
    pub fn recoveries(&self) -> u64 {
        self.recoveries.load(Ordering::Relaxed)
    }

    /// Sets the health of the service to `serving`, if it is reported and changes.
    async fn set_health(&self, serving: bool) {
        let target = {
            let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
            match health.as_mut() {
                Some(h) if h.down == serving && !(serving && h.shutdown.is_cancelled()) => {
                    h.down = !serving;
                    Some((h.reporter.clone(), h.service, h.shutdown.clone()))
                }
                _ => None,
            }
        };
        if let Some((reporter, service, shutdown)) = target {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status(service, status).await;
            // A shutdown that began meanwhile may have reported NOT_SERVING first; it stands.
            if serving && shutdown.is_cancelled() {
                reporter
                    .set_service_status(service, ServingStatus::NotServing)
                    .await;
            }
        }
    }

    /// Recovers from a writer failure: starts a new writer and rebuilds the index from the
    /// database, so writes the failed writer lost are applied too. Attempts after a failed one
    /// wait for the backoff; until then this fails with [`FreshnessError::WriterDown`].
    async fn recover(&self) -> Result<(), FreshnessError> {
        let mut applied = self.applied.lock().await;
        let Some(failure) = self.index.writer_failure() else {
            // Recovered meanwhile by another caller.
            return Ok(());
        };
        let attempt = {
            let mut backoff = self.backoff.lock().unwrap_or_else(PoisonError::into_inner);
            if backoff.failed == 0 && backoff.next_attempt.is_none() {
                self.writer_failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(INDEX_WRITER_FAILURES_TOTAL).increment(1);
                metrics::gauge!(INDEX_WRITER_UP).set(0.0);
                tracing::error!(%failure,
                    "search index writer failed; starting a new one and rebuilding the index \
                     from the database");
            }
            let now = Instant::now();
            if let Some(at) = backoff.next_attempt
                && now < at
            {
                return Err(FreshnessError::WriterDown {
                    failure,
                    retry_in: at - now,
                });
            }
            // Marks the attempt as started, so the failure is logged once.
            backoff.next_attempt = Some(now);
            backoff.failed + 1
        };
        let outcome = async {
            let idx = Arc::clone(&self.index);
            let recovery = tokio::task::spawn_blocking(move || idx.recover())
                .await
                .map_err(|e| FreshnessError::Task(e.to_string()))??;
            let rebuilt = rebuild(&self.index, &self.store).await?;
            Ok::<_, FreshnessError>((recovery, rebuilt))
        }
        .await;
        match outcome {
            Ok((recovery, (position, seq, visibility))) => {
                *self
                    .visibility
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = visibility;
                *applied = (position, seq);
                // `applied` stays locked until the health is set, so that the backoff and the
                // health of concurrent attempts are updated in the attempts' order.
                *self.backoff.lock().unwrap_or_else(PoisonError::into_inner) = Backoff::default();
                self.recoveries.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(INDEX_RECOVERIES_TOTAL).increment(1);
                metrics::gauge!(INDEX_WRITER_UP).set(1.0);
                tracing::warn!(
                    attempt,
                    ?recovery,
                    position,
                    "search index recovered: new writer, rebuilt from the database"
                );
                self.set_health(true).await;
                Ok(())
            }
            Err(e) => {
                let retry_in = {
                    let mut backoff = self.backoff.lock().unwrap_or_else(PoisonError::into_inner);
                    backoff.failed = attempt;
                    let delay = backoff_delay(attempt);
                    backoff.next_attempt = Some(Instant::now() + delay);
                    delay
                };
                tracing::error!(error = %DisplayChain(&e), attempt,
                    retry_in_ms = u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
                    "recovering the search index failed; searches answer from its last commit");
                self.set_health(false).await;
                Err(e)
            }
        }
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
    ///
    /// A failed index writer, found before or while applying, is recovered first (see the
    /// module documentation), and the rows are applied to the recovered index.
    pub async fn catch_up(&self, wait: Duration) -> Result<i64, FreshnessError> {
        if self.index.writer_failure().is_some() {
            self.recover().await?;
        }
        match self.apply_changes(wait).await {
            Err(_) if self.index.writer_failure().is_some() => {
                self.recover().await?;
                self.apply_changes(wait).await
            }
            outcome => outcome,
        }
    }

    /// Applies every feed row not applied yet and waits until they are searchable.
    async fn apply_changes(&self, wait: Duration) -> Result<i64, FreshnessError> {
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
            match self.catch_up(Duration::from_secs(1)).await {
                Ok(_) => {}
                // Logged when the attempt failed.
                Err(e @ FreshnessError::WriterDown { .. }) => {
                    tracing::debug!(error = %DisplayChain(&e), "search index still down");
                }
                Err(e) => {
                    tracing::warn!(error = %DisplayChain(&e), "refreshing the search index failed");
                }
            }
        }
    }
}
