//! [`SearchIndex`]: the handle the knowledge service holds.

use std::path::Path;
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
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
pub struct SearchIndex {
    reader: IndexReader,
    fields: Fields,
    config: IndexConfig,
    queue: Mutex<Option<Queue>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
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
        Self::start(Index::create_in_ram(schema), config)
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
        Self::start(index, config)
    }

    fn start(index: Index, config: IndexConfig) -> SearchResult<Self> {
        warm_up();
        let fields = Fields::from_schema(&index.schema())?;
        index.tokenizers().register(ANALYZER_NAME, mixed_analyzer());
        let writer: IndexWriter =
            index.writer_with_num_threads(config.indexing_threads, config.writer_memory_bytes)?;
        writer.set_merge_policy(Box::new(merge_policy()));
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let shared = Arc::new(Shared::default());
        let (sender, receiver) = mpsc::sync_channel(config.queue_capacity);
        let batching = Batching {
            commit_interval: config.commit_interval,
            max_pending_ops: config.max_pending_ops,
        };
        let writer_loop = WriterLoop::new(
            writer,
            IndexReader::clone(&reader),
            fields,
            Arc::clone(&shared),
            batching,
        );
        let thread = std::thread::Builder::new()
            .name("search-writer".to_owned())
            .spawn(move || writer_loop.run(receiver))
            .map_err(|e| SearchError::WriterFailed(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            reader,
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
        let searcher = self.reader.searcher();
        let Progress {
            visible_seq,
            commits,
            stale_upserts,
            ..
        } = *self.shared.lock();
        IndexStats {
            visible_seq,
            commits,
            stale_upserts,
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
        let searcher = self.reader.searcher();
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
