//! [`SearchIndex`]: the handle the knowledge service holds.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tantivy::collector::TopDocs;
use tantivy::directory::MmapDirectory;
use tantivy::indexer::LogMergePolicy;
use tantivy::query::BooleanQuery;
use tantivy::schema::Value;
use tantivy::{
    DocAddress, Index, IndexReader, IndexWriter, ReloadPolicy, Score, Searcher, TantivyDocument,
};

use crate::analyzer::{ANALYZER_NAME, mixed_analyzer, warm_up};
use crate::config::{FilterStrategy, IndexConfig};
use crate::error::{SearchError, SearchResult};
use crate::query::{
    FilteredTopScores, Filters, PreparedQuery, SearchHit, SearchRequest, SearchResponse,
    TermClasses, prepare, rare_required_query, text_query,
};
use crate::schema::{ArticleDoc, Fields, check_identifier, doc_key};
use crate::snippet::SnippetMaker;
#[cfg(any(test, feature = "fault-injection"))]
use crate::writer::Fault;
use crate::writer::{Batching, Command, Progress, RebuildCounts, Shared, WriterLoop};

/// Articles sent to the writer thread per message during a rebuild.
const REBUILD_BATCH: usize = 512;

/// Rejection messages kept in a [`RebuildReport`]; the count covers all of them.
const MAX_REPORTED_REJECTIONS: usize = 100;

/// Fraction of the documents a filter must keep for [`FilterStrategy::Auto`] to post-filter.
const POST_FILTER_MIN_SHARE: u64 = 4;

/// A knowledge-base search index: BM25 over article questions, titles and answers, restricted by
/// tenant, audience, scenario and language.
///
/// Writes go to one background thread that owns the tantivy writer and batches commits (see
/// [`IndexConfig::commit_interval`] and [`IndexConfig::max_pending_ops`]); each write returns a
/// sequence number, and [`SearchIndex::wait_visible`] blocks until that write is searchable.
/// Searches run on the caller's thread against the last committed state.
///
/// The API is synchronous. From async code, run [`SearchIndex::search`] directly when its
/// latency fits the runtime's budget, or in `spawn_blocking`, and always call
/// [`SearchIndex::wait_visible`], [`SearchIndex::flush`] and [`SearchIndex::rebuild`] from a
/// blocking context: they wait for commits. `upsert` and `remove` block only while the
/// writer's queue is full. The handle is `Send + Sync`; share it behind an `Arc`.
///
/// When the writer fails (tantivy reports an error, or its thread panics) every later write
/// fails with [`SearchError::WriterFailed`] and searches keep answering from the last commit,
/// until [`SearchIndex::recover`] starts a new writer.
pub struct SearchIndex {
    /// The tantivy index; replaced by [`SearchIndex::recover`] when no writer can be opened on it.
    index: Mutex<Index>,
    /// Where the index lives, to create it anew.
    storage: Storage,
    reader: RwLock<IndexReader>,
    fields: Fields,
    config: IndexConfig,
    queue: Mutex<Option<Queue>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Where an index is stored.
enum Storage {
    Ram,
    Dir(PathBuf),
}

impl Storage {
    /// Creates an empty index here, deleting what the directory held.
    fn create(&self) -> SearchResult<Index> {
        let (schema, _) = Fields::schema();
        match self {
            Self::Ram => Ok(Index::create_in_ram(schema)),
            Self::Dir(path) => {
                if path.exists() {
                    std::fs::remove_dir_all(path).map_err(|e| SearchError::Storage(e.into()))?;
                }
                std::fs::create_dir_all(path).map_err(|e| SearchError::Storage(e.into()))?;
                let directory =
                    MmapDirectory::open(path).map_err(|e| SearchError::Storage(e.into()))?;
                Ok(Index::create(
                    directory,
                    schema,
                    tantivy::IndexSettings::default(),
                )?)
            }
        }
    }
}

/// What [`SearchIndex::recover`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The writer was running; nothing was done.
    Healthy,
    /// A new writer runs on the index's last commit. Operations not committed by the failed
    /// writer are lost: apply them again (or rebuild).
    WriterRestarted,
    /// No writer could be opened on the index, so an empty index replaced it: rebuild it.
    IndexRecreated,
}

/// The sending side of the writer's queue with the last sequence number handed out. Both live
/// under one lock so sequence numbers enter the queue in order.
struct Queue {
    sender: SyncSender<Command>,
    last_seq: u64,
}

/// What a rebuild did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RebuildReport {
    /// Sequence number of the rebuild; it is visible when this report is returned.
    pub seq: u64,
    /// Articles now in the index.
    pub indexed: u64,
    /// Input articles dropped because the input held a newer version of the same article.
    pub superseded: u64,
    /// Input articles rejected by validation and left out.
    pub rejected: u64,
    /// Validation messages of the first rejected articles.
    pub rejections: Vec<String>,
}

/// Counters describing the index and its writer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexStats {
    /// Every operation with a sequence number up to this one is searchable.
    pub visible_seq: u64,
    /// Commits made since the index was opened.
    pub commits: u64,
    /// Upserts ignored because a newer version of the article was already indexed.
    pub stale_upserts: u64,
    /// Writers started by [`SearchIndex::recover`] after a failure.
    pub writer_restarts: u64,
    /// The writer has failed and not been recovered: writes are refused.
    pub writer_failed: bool,
    /// Searchable documents.
    pub num_docs: u64,
    /// Segments of the searchable index.
    pub num_segments: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its data consistent, so a panic elsewhere while holding
    // a lock does not make the data unusable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The merge policy: few segments, because every query pays for every segment.
///
/// Searches far outnumber writes here, and a query opens each segment's term dictionary and
/// scores each segment separately, so the index is kept at a handful of segments. Tantivy's
/// defaults (levels 1.7× apart, a merge once 8 segments share a level) let an index written in
/// many small commits hold up to 7 segments per level; in one profile of a 100,000-article
/// index imported in 1,000-article commits, a search cost about twice the CPU of the same
/// search on an index built in one commit. Here levels are 4× apart and 3
/// segments of a level are merged, so each document is rewritten about once per 4× growth and
/// the index holds at most two segments per level; segments where over a third of the
/// documents were replaced or removed are merged too, so stale versions stop costing reads.
fn merge_policy() -> LogMergePolicy {
    let mut policy = LogMergePolicy::default();
    policy.set_min_num_segments(3);
    policy.set_level_log_size(2.0);
    policy.set_min_layer_size(10_000);
    policy.set_del_docs_ratio_before_merge(0.33);
    policy
}

impl SearchIndex {
    /// Opens an empty index held in memory.
    pub fn in_ram(config: IndexConfig) -> SearchResult<Self> {
        config.validate()?;
        let (schema, _) = Fields::schema();
        Self::start(Index::create_in_ram(schema), Storage::Ram, config)
    }

    /// Opens the index stored in `path`, creating the directory and an empty index if needed.
    ///
    /// Only one process may hold the index open for writing. An index written with another
    /// schema is refused with [`SearchError::Storage`].
    pub fn in_dir(path: impl AsRef<Path>, config: IndexConfig) -> SearchResult<Self> {
        config.validate()?;
        let path = path.as_ref();
        std::fs::create_dir_all(path).map_err(|e| SearchError::Storage(e.into()))?;
        let directory = MmapDirectory::open(path).map_err(|e| SearchError::Storage(e.into()))?;
        let (schema, _) = Fields::schema();
        let index = Index::open_or_create(directory, schema)?;
        Self::start(index, Storage::Dir(path.to_owned()), config)
    }

    fn start(index: Index, storage: Storage, config: IndexConfig) -> SearchResult<Self> {
        warm_up();
        let fields = Fields::from_schema(&index.schema())?;
        let writer = open_writer(&index, &config)?;
        let reader = open_reader(&index)?;
        let shared = Arc::new(Shared::default());
        let (sender, thread) = spawn_writer(
            writer,
            IndexReader::clone(&reader),
            fields,
            &shared,
            &config,
        )?;
        Ok(Self {
            index: Mutex::new(index),
            storage,
            reader: RwLock::new(reader),
            fields,
            config,
            queue: Mutex::new(Some(Queue {
                sender,
                last_seq: 0,
            })),
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The reader of the current index.
    fn reader(&self) -> IndexReader {
        self.reader
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Returns why the writer stopped, while it has failed and is not recovered.
    pub fn writer_failure(&self) -> Option<String> {
        let progress = self.shared.lock();
        progress.stopped.then(|| {
            progress
                .failure
                .clone()
                .unwrap_or_else(|| "the writer stopped".to_owned())
        })
    }

    /// Replaces a failed writer: starts a new writer thread on the index's last commit, or, when
    /// no writer can be opened on the index, on a new empty index (in the same directory, whose
    /// content is deleted). When another writer holds the index's lock, nothing is deleted and
    /// the lock error is returned. Does nothing while the writer runs.
    ///
    /// Operations queued to the failed writer and not committed are lost; their sequence numbers
    /// make [`SearchIndex::wait_visible`] fail. The caller applies them again, or rebuilds the
    /// index, which [`Recovery::IndexRecreated`] requires. Searches go on during the recovery
    /// and see the last commit (an empty index once one is recreated). On error the writer stays
    /// failed and the call may be repeated.
    pub fn recover(&self) -> SearchResult<Recovery> {
        let mut queue = lock(&self.queue);
        let Some(queue) = queue.as_mut() else {
            return Err(SearchError::Closed);
        };
        if !self.shared.lock().stopped {
            return Ok(Recovery::Healthy);
        }
        if let Some(thread) = lock(&self.thread).take() {
            // A panic is already recorded as the failure.
            let _ = thread.join();
        }
        let mut index = lock(&self.index);
        let (recovery, writer) = match open_writer(&index, &self.config) {
            Ok(writer) => {
                self.reader().reload()?;
                (Recovery::WriterRestarted, writer)
            }
            // Another writer holds the index (another process, or a writer not yet dropped): its
            // content is not this handle's to delete.
            Err(
                error @ SearchError::Storage(tantivy::TantivyError::LockFailure(
                    tantivy::directory::error::LockError::LockBusy,
                    _,
                )),
            ) => return Err(error),
            Err(_) => {
                let fresh = self.storage.create()?;
                let writer = open_writer(&fresh, &self.config)?;
                let reader = open_reader(&fresh)?;
                *index = fresh;
                *self.reader.write().unwrap_or_else(PoisonError::into_inner) = reader;
                (Recovery::IndexRecreated, writer)
            }
        };
        let (sender, thread) = spawn_writer(
            writer,
            self.reader(),
            self.fields,
            &self.shared,
            &self.config,
        )?;
        let last_seq = queue.last_seq;
        self.shared.update(|p| {
            if p.visible_seq < last_seq {
                p.lost.push(p.visible_seq + 1..=last_seq);
            }
            p.failure = None;
            p.stopped = false;
            p.restarts += 1;
        });
        queue.sender = sender;
        *lock(&self.thread) = Some(thread);
        Ok(recovery)
    }

    /// Makes the writer suffer `fault` at its next commit, to test recovery. Faults injected
    /// before and not suffered yet come first: each commit suffers one, so injecting twice makes
    /// a commit and the one after it (a recovery's rebuild, say) fail.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn inject_fault(&self, fault: Fault) {
        self.shared.update(|p| p.faults.push_back(fault));
    }

    /// Drops the faults injected and not suffered yet, so that the next commits succeed.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn clear_faults(&self) {
        self.shared.update(|p| p.faults.clear());
    }

    /// Returns the configuration the index was opened with.
    pub fn config(&self) -> &IndexConfig {
        &self.config
    }

    /// The error to report once the writer no longer accepts work.
    fn stopped_error(&self) -> SearchError {
        match &self.shared.lock().failure {
            Some(failure) => SearchError::WriterFailed(failure.clone()),
            None => SearchError::Closed,
        }
    }

    /// Queues a command under the next sequence number.
    ///
    /// Success means queued, not applied: if the writer fails before the command's commit,
    /// [`SearchIndex::wait_visible`] reports the failure for that sequence number.
    fn enqueue(&self, command: impl FnOnce(u64) -> Command) -> SearchResult<u64> {
        if self.shared.lock().stopped {
            return Err(self.stopped_error());
        }
        let mut queue = lock(&self.queue);
        let Some(queue) = queue.as_mut() else {
            return Err(self.stopped_error());
        };
        let seq = queue.last_seq + 1;
        queue
            .sender
            .send(command(seq))
            .map_err(|_| self.stopped_error())?;
        queue.last_seq = seq;
        Ok(seq)
    }

    /// Queues a published article version for indexing and returns its sequence number.
    ///
    /// The article replaces the indexed version of the same (tenant, article id) unless that one
    /// is newer, in which case this upsert is ignored and counted in
    /// [`IndexStats::stale_upserts`]. It becomes searchable with the next commit; wait for it
    /// with [`SearchIndex::wait_visible`], which also reports a writer failure that happens
    /// after the upsert was queued.
    pub fn upsert(&self, article: ArticleDoc) -> SearchResult<u64> {
        article.validate()?;
        self.enqueue(|seq| Command::Upsert {
            seq,
            doc: Box::new(article),
        })
    }

    /// Queues the removal of an article (archived or unpublished) and returns its sequence
    /// number. Removing an article that is not indexed is not an error.
    pub fn remove(&self, tenant: &str, article_id: &str) -> SearchResult<u64> {
        check_identifier("tenant", tenant, true).map_err(SearchError::InvalidDocument)?;
        check_identifier("article_id", article_id, true).map_err(SearchError::InvalidDocument)?;
        let key = doc_key(tenant, article_id);
        self.enqueue(|seq| Command::Remove { seq, key })
    }

    /// Commits everything queued so far without waiting for the batching interval, waits until
    /// it is searchable and returns the sequence number it reached.
    ///
    /// Meant for tests and shutdown; in normal operation wait with
    /// [`SearchIndex::wait_visible`] so commits stay batched.
    pub fn flush(&self) -> SearchResult<u64> {
        let seq = self.enqueue(|seq| Command::Flush { seq })?;
        self.wait_until(seq, None)?;
        Ok(seq)
    }

    /// Waits until the operation with sequence number `seq` (and every earlier one) is
    /// searchable, for at most `timeout`.
    pub fn wait_visible(&self, seq: u64, timeout: Duration) -> SearchResult<()> {
        self.wait_until(seq, Instant::now().checked_add(timeout))
    }

    fn wait_until(&self, seq: u64, deadline: Option<Instant>) -> SearchResult<()> {
        let mut progress = self.shared.lock();
        loop {
            if progress.is_lost(seq) {
                return Err(SearchError::WriterFailed(format!(
                    "operation {seq} was lost when the writer failed"
                )));
            }
            if progress.visible_seq >= seq {
                return Ok(());
            }
            if let Some(failure) = &progress.failure {
                return Err(SearchError::WriterFailed(failure.clone()));
            }
            if progress.stopped {
                return Err(SearchError::Closed);
            }
            progress = match deadline {
                None => self
                    .shared
                    .changed
                    .wait(progress)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(SearchError::VisibilityTimeout { seq });
                    }
                    self.shared
                        .changed
                        .wait_timeout(progress, deadline - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Returns the highest sequence number that is searchable.
    pub fn visible_seq(&self) -> u64 {
        self.shared.lock().visible_seq
    }

    /// Replaces the whole index content with `articles` in one commit, for start-up or repair.
    ///
    /// Operations queued before the rebuild are committed first; operations queued while it
    /// runs wait behind it. Articles that fail validation are left out and reported, so one bad
    /// article cannot leave the index empty. When the input holds several versions of an
    /// article, the highest wins. Searches see the old content until the final commit. If
    /// `articles` panics, the rebuild is rolled back.
    pub fn rebuild<I>(&self, articles: I) -> SearchResult<RebuildReport>
    where
        I: IntoIterator<Item = ArticleDoc>,
    {
        let mut report = RebuildReport::default();
        let (reply, answer) = mpsc::sync_channel::<SearchResult<RebuildCounts>>(1);
        {
            let mut queue = lock(&self.queue);
            let Some(queue) = queue.as_mut() else {
                return Err(self.stopped_error());
            };
            let send = |command| queue.sender.send(command).map_err(|_| self.stopped_error());
            send(Command::RebuildBegin)?;
            let abort = AbortOnDrop {
                sender: Some(queue.sender.clone()),
            };
            let mut batch = Vec::with_capacity(REBUILD_BATCH);
            for article in articles {
                if let Err(error) = article.validate() {
                    report.rejected += 1;
                    if report.rejections.len() < MAX_REPORTED_REJECTIONS {
                        report.rejections.push(error.to_string());
                    }
                    continue;
                }
                batch.push(article);
                if batch.len() == REBUILD_BATCH {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(REBUILD_BATCH));
                    send(Command::RebuildBatch(full))?;
                }
            }
            if !batch.is_empty() {
                send(Command::RebuildBatch(batch))?;
            }
            let seq = queue.last_seq + 1;
            send(Command::RebuildCommit { seq, reply })?;
            abort.disarm();
            queue.last_seq = seq;
            report.seq = seq;
        }
        let counts = answer.recv().map_err(|_| self.stopped_error())??;
        report.indexed = counts.indexed;
        report.superseded = counts.superseded;
        Ok(report)
    }

    /// Returns the writer's counters and the size of the searchable index.
    pub fn stats(&self) -> IndexStats {
        let searcher = self.reader().searcher();
        let progress = self.shared.lock();
        let Progress {
            visible_seq,
            commits,
            stale_upserts,
            restarts,
            stopped,
            ..
        } = *progress;
        drop(progress);
        IndexStats {
            visible_seq,
            commits,
            stale_upserts,
            writer_restarts: restarts,
            writer_failed: stopped,
            num_docs: searcher.num_docs(),
            num_segments: searcher.segment_readers().len(),
        }
    }

    /// Searches the articles of one tenant visible to one audience.
    ///
    /// The query text is plain: it is cleaned (control characters removed, length capped),
    /// analysed like the documents, and each term is looked up in the questions, title and
    /// answer with the configured boosts. When the query mixes common and rarer terms (see
    /// [`IndexConfig::common_term_share`]), hits must contain a rarer one; if that yields fewer
    /// than `limit` hits, every term becomes optional. Returns [`SearchError::EmptyQuery`] when
    /// no searchable word remains and [`SearchError::InvalidRequest`] for malformed requests.
    pub fn search(&self, request: &SearchRequest) -> SearchResult<SearchResponse> {
        let prepared = prepare(
            request,
            &self.fields,
            self.config.max_query_chars,
            self.config.max_query_terms,
            self.config.max_limit,
        )?;
        let searcher = self.reader().searcher();
        let strategy = self.strategy_for(&searcher, &prepared.filters)?;
        let classes = TermClasses::of(
            &searcher,
            &self.fields,
            &prepared.terms,
            self.config.common_term_share,
        )?;
        let boosts = &self.config.boosts;
        let mut top = Vec::new();
        if classes.is_mixed() {
            let query = rare_required_query(&self.fields, &classes, boosts);
            top = self.top_scores(&searcher, query, &prepared, strategy)?;
        }
        // Too few hits with a rare term required (or nothing to split): every term optional.
        let highlight_terms = if top.len() < prepared.limit {
            let query = text_query(&self.fields, &prepared.terms, boosts);
            top = self.top_scores(&searcher, query, &prepared, strategy)?;
            &prepared.terms
        } else {
            &classes.rare
        };
        let best_score = top.first().map(|(score, _)| *score);
        let threshold = prepared.min_score.unwrap_or(self.config.good_result_score);
        let no_good_result = best_score.is_none_or(|best| best < threshold);
        let kept: Vec<_> = top
            .into_iter()
            .filter(|(score, _)| prepared.min_score.is_none_or(|min| *score >= min))
            .collect();
        let mut hits = Vec::with_capacity(kept.len());
        if !kept.is_empty() {
            let snippets = SnippetMaker::new(
                &searcher,
                self.fields.answer,
                self.fields.questions,
                highlight_terms,
                self.config.snippet_max_bytes,
                &self.config.highlight,
            )?;
            for (score, address) in kept {
                let doc: TantivyDocument = searcher.doc(address)?;
                hits.push(self.hit(&doc, score, &snippets));
            }
        }
        Ok(SearchResponse {
            hits,
            no_good_result,
            best_score,
            terms: prepared.terms,
        })
    }

    /// Returns the best `limit` documents for `text` that pass the request's filters.
    fn top_scores(
        &self,
        searcher: &Searcher,
        text: BooleanQuery,
        prepared: &PreparedQuery,
        strategy: FilterStrategy,
    ) -> SearchResult<Vec<(Score, DocAddress)>> {
        let top = match strategy {
            FilterStrategy::PostFilter => searcher.search(
                &text,
                &FilteredTopScores {
                    limit: prepared.limit,
                    filters: prepared.filters.clone(),
                },
            )?,
            FilterStrategy::Intersect | FilterStrategy::Auto => searcher.search(
                &prepared.filters.intersect_with(text),
                &TopDocs::with_limit(prepared.limit).order_by_score(),
            )?,
        };
        Ok(top)
    }

    /// Chooses how filters are applied: post-filtering pays off when every filter keeps a large
    /// share of the documents, because the text query then keeps its block-max WAND pruning.
    fn strategy_for(&self, searcher: &Searcher, filters: &Filters) -> SearchResult<FilterStrategy> {
        if self.config.filter_strategy != FilterStrategy::Auto {
            return Ok(self.config.filter_strategy);
        }
        let total = searcher.num_docs();
        for term in filters.terms() {
            if searcher.doc_freq(&term)? * POST_FILTER_MIN_SHARE < total {
                return Ok(FilterStrategy::Intersect);
            }
        }
        Ok(FilterStrategy::PostFilter)
    }

    fn hit(&self, doc: &TantivyDocument, score: f32, snippets: &SnippetMaker<'_>) -> SearchHit {
        let text = |field| {
            doc.get_first(field)
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        };
        let answer = text(self.fields.answer);
        SearchHit {
            article_id: text(self.fields.article_id),
            version: doc
                .get_first(self.fields.version)
                .and_then(|v| v.as_u64())
                .unwrap_or_default(),
            score,
            title: text(self.fields.title),
            scenario: text(self.fields.scenario),
            language: text(self.fields.language),
            tags: doc
                .get_all(self.fields.tags)
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            snippet: snippets.answer(&answer),
            matched_question: snippets.best_question(
                doc.get_all(self.fields.questions)
                    .filter_map(|v| v.as_str()),
            ),
        }
    }

    /// Commits what is pending, stops the writer thread and waits for it and its merges.
    pub fn close(self) -> SearchResult<()> {
        self.stop();
        match self.shared.lock().failure.clone() {
            Some(failure) => Err(SearchError::WriterFailed(failure)),
            None => Ok(()),
        }
    }

    fn stop(&self) {
        drop(lock(&self.queue).take());
        if let Some(thread) = lock(&self.thread).take()
            && thread.join().is_err()
        {
            self.shared.lock().failure = Some("writer thread panicked".to_owned());
        }
    }
}

impl Drop for SearchIndex {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens a writer on `index` with the configured threads, memory and merge policy.
fn open_writer(index: &Index, config: &IndexConfig) -> SearchResult<IndexWriter> {
    index.tokenizers().register(ANALYZER_NAME, mixed_analyzer());
    let writer: IndexWriter =
        index.writer_with_num_threads(config.indexing_threads, config.writer_memory_bytes)?;
    writer.set_merge_policy(Box::new(merge_policy()));
    Ok(writer)
}

/// Opens the reader of `index`, reloaded by the writer thread after each commit.
fn open_reader(index: &Index) -> SearchResult<IndexReader> {
    Ok(index
        .reader_builder()
        .reload_policy(ReloadPolicy::Manual)
        .try_into()?)
}

/// Starts the writer thread; returns the sending side of its queue and the thread.
fn spawn_writer(
    writer: IndexWriter,
    reader: IndexReader,
    fields: Fields,
    shared: &Arc<Shared>,
    config: &IndexConfig,
) -> SearchResult<(SyncSender<Command>, JoinHandle<()>)> {
    let (sender, receiver) = mpsc::sync_channel(config.queue_capacity);
    let batching = Batching {
        commit_interval: config.commit_interval,
        max_pending_ops: config.max_pending_ops,
    };
    let writer_loop = WriterLoop::new(writer, reader, fields, Arc::clone(shared), batching);
    let thread = std::thread::Builder::new()
        .name("search-writer".to_owned())
        .spawn(move || writer_loop.run(receiver))
        .map_err(|e| SearchError::WriterFailed(format!("cannot start writer thread: {e}")))?;
    Ok((sender, thread))
}

/// Rolls a rebuild back unless it reached its commit, e.g. when the input iterator panics or
/// the caller returns early.
struct AbortOnDrop {
    sender: Option<SyncSender<Command>>,
}

impl AbortOnDrop {
    fn disarm(mut self) {
        self.sender = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            // If the writer is gone there is nothing left to roll back.
            let _ = sender.send(Command::RebuildAbort);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::query::SearchRequest;
    use crate::schema::{Audience, Visibility};

    fn article(id: &str, question: &str) -> ArticleDoc {
        ArticleDoc {
            tenant: "acme".to_owned(),
            article_id: id.to_owned(),
            version: 1,
            scenario: "general".to_owned(),
            language: "en".to_owned(),
            visibility: Visibility::Both,
            tags: Vec::new(),
            title: question.to_owned(),
            questions: vec![question.to_owned()],
            answer: format!("The answer to {question}."),
        }
    }

    fn found(index: &SearchIndex, query: &str) -> Vec<String> {
        index
            .search(&SearchRequest::new("acme", query, Audience::Agent))
            .unwrap()
            .hits
            .into_iter()
            .map(|h| h.article_id)
            .collect()
    }

    fn index() -> SearchIndex {
        SearchIndex::in_ram(IndexConfig {
            commit_interval: Duration::from_millis(5),
            ..IndexConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn a_failed_commit_stops_the_writer_until_it_is_recovered() {
        let index = index();
        index.upsert(article("kept", "parcel lockers")).unwrap();
        index.flush().unwrap();
        index.inject_fault(Fault::CommitError);
        let lost = index.upsert(article("lost", "gift wrapping")).unwrap();
        let err = index
            .wait_visible(lost, Duration::from_secs(5))
            .unwrap_err();
        assert!(
            matches!(&err, SearchError::WriterFailed(m) if m.contains("injected")),
            "{err}"
        );
        assert!(index.writer_failure().unwrap().contains("injected"));
        assert!(index.stats().writer_failed);
        // Writes are refused, searches answer from the last commit.
        assert!(matches!(
            index.upsert(article("later", "store pickup")),
            Err(SearchError::WriterFailed(_))
        ));
        assert_eq!(found(&index, "parcel lockers"), ["kept"]);

        assert_eq!(index.recover().unwrap(), Recovery::WriterRestarted);
        assert_eq!(index.writer_failure(), None);
        assert_eq!(index.recover().unwrap(), Recovery::Healthy);
        // The lost operation stays reported as failed; the committed content is there.
        let err = index
            .wait_visible(lost, Duration::from_secs(1))
            .unwrap_err();
        assert!(
            matches!(&err, SearchError::WriterFailed(m) if m.contains("lost")),
            "{err}"
        );
        assert_eq!(found(&index, "parcel lockers"), ["kept"]);
        assert!(found(&index, "gift wrapping").is_empty());
        // Written again, it is searchable, and so are new writes.
        index.upsert(article("lost", "gift wrapping")).unwrap();
        let seq = index.upsert(article("later", "store pickup")).unwrap();
        index.wait_visible(seq, Duration::from_secs(5)).unwrap();
        assert_eq!(found(&index, "gift wrapping"), ["lost"]);
        assert_eq!(found(&index, "store pickup"), ["later"]);
        let stats = index.stats();
        assert_eq!((stats.writer_restarts, stats.writer_failed), (1, false));
        assert_eq!(stats.num_docs, 3);
        index.close().unwrap();
    }

    #[test]
    fn a_panicked_writer_is_reported_and_recovered() {
        let index = index();
        index.upsert(article("kept", "parcel lockers")).unwrap();
        index.flush().unwrap();
        index.inject_fault(Fault::Panic);
        index.upsert(article("lost", "gift wrapping")).unwrap();
        // Reported at once, not after a timeout.
        let err = index.flush().unwrap_err();
        assert!(
            matches!(&err, SearchError::WriterFailed(m) if m.contains("panicked")),
            "{err}"
        );
        assert_eq!(index.recover().unwrap(), Recovery::WriterRestarted);
        assert_eq!(found(&index, "parcel lockers"), ["kept"]);
        let report = index
            .rebuild(vec![
                article("kept", "parcel lockers"),
                article("lost", "gift wrapping"),
            ])
            .unwrap();
        assert_eq!(report.indexed, 2);
        assert_eq!(found(&index, "gift wrapping"), ["lost"]);
        index.close().unwrap();
    }

    #[test]
    fn an_index_locked_by_another_writer_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index");
        let index = SearchIndex::in_dir(&path, IndexConfig::default()).unwrap();
        index.upsert(article("kept", "parcel lockers")).unwrap();
        index.flush().unwrap();
        index.inject_fault(Fault::CommitError);
        index.upsert(article("lost", "gift wrapping")).unwrap();
        assert!(index.flush().is_err());
        // Another writer holds the directory's lock: the recovery fails and deletes nothing.
        let other = Index::open_in_dir(&path).unwrap();
        let held: IndexWriter = other.writer(15_000_000).unwrap();
        let err = index.recover().unwrap_err();
        assert!(
            matches!(
                err,
                SearchError::Storage(tantivy::TantivyError::LockFailure(
                    tantivy::directory::error::LockError::LockBusy,
                    _
                ))
            ),
            "{err:?}"
        );
        assert!(index.writer_failure().is_some());
        assert_eq!(found(&index, "parcel lockers"), ["kept"]);
        // Once the lock is released, the writer restarts on the last commit.
        drop(held);
        assert_eq!(index.recover().unwrap(), Recovery::WriterRestarted);
        index.upsert(article("lost", "gift wrapping")).unwrap();
        index.flush().unwrap();
        assert_eq!(found(&index, "gift wrapping"), ["lost"]);
        assert_eq!(found(&index, "parcel lockers"), ["kept"]);
        index.close().unwrap();
    }
}
