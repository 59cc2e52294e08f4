//! The single writer: a dedicated thread that owns the tantivy `IndexWriter`, applies operations
//! in sequence order and batches commits.
//!
//! Every accepted operation carries a sequence number. The thread commits when
//! `max_pending_ops` operations are pending or when the oldest pending one has waited
//! `commit_interval`, then reloads the reader and publishes the highest sequence number applied:
//! from then on every operation up to it is visible to searches. A rebuild is one long batch,
//! committed once at its end, during which the timer does not fire.
//!
//! When tantivy reports an error (or the thread panics) the thread records the failure and
//! stops; operations it had not committed are lost. [`crate::SearchIndex::recover`] starts a new
//! thread with a new writer on the last commit and remembers the lost sequence numbers, which
//! [`crate::SearchIndex::wait_visible`] reports as failed.
//!
//! Upserts keep the highest version of an article: the thread looks up the version already
//! indexed (or pending in the current batch) and ignores an older one, so events redelivered out
//! of order cannot roll an article back.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tantivy::schema::IndexRecordOption;
use tantivy::{DocSet, IndexReader, IndexWriter, TERMINATED, TantivyDocument, Term};

use crate::error::{SearchError, SearchResult};
use crate::schema::{ArticleDoc, Fields, VERSION};

/// What the writer thread is asked to do.
pub(crate) enum Command {
    /// Index a validated article, replacing an older version.
    Upsert { seq: u64, doc: Box<ArticleDoc> },
    /// Delete the article with this deletion key.
    Remove { seq: u64, key: String },
    /// Commit now whatever is pending.
    Flush { seq: u64 },
    /// Commit what is pending, then delete every document (uncommitted until `RebuildCommit`).
    RebuildBegin,
    /// Add validated articles to the rebuild.
    RebuildBatch(Vec<ArticleDoc>),
    /// Undo the rebuild: the index returns to its last commit.
    RebuildAbort,
    /// Commit the rebuild and report what it indexed.
    RebuildCommit {
        seq: u64,
        reply: SyncSender<SearchResult<RebuildCounts>>,
    },
}

/// What the writer thread counted during a rebuild.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RebuildCounts {
    pub indexed: u64,
    pub superseded: u64,
}

/// A failure the writer thread is made to suffer at its next commit, to test recovery.
#[cfg(any(test, feature = "fault-injection"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The commit fails as if tantivy had reported an error.
    CommitError,
    /// The writer thread panics.
    Panic,
}

/// State the writer thread publishes to searchers and waiters.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub visible_seq: u64,
    pub commits: u64,
    pub stale_upserts: u64,
    pub failure: Option<String>,
    pub stopped: bool,
    /// Writers started by [`crate::SearchIndex::recover`] after a failure.
    pub restarts: u64,
    /// Sequence numbers queued to writers that failed before committing them, oldest first.
    pub lost: Vec<RangeInclusive<u64>>,
    /// The failures to inject at the next commits, one each, in order.
    #[cfg(any(test, feature = "fault-injection"))]
    pub faults: std::collections::VecDeque<Fault>,
}

impl Progress {
    /// Whether the operation with this sequence number was lost in a writer failure.
    pub fn is_lost(&self, seq: u64) -> bool {
        self.lost.iter().any(|range| range.contains(&seq))
    }
}

/// [`Progress`] with the condition variable that announces its changes.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub progress: Mutex<Progress>,
    pub changed: Condvar,
}

impl Shared {
    /// Locks the progress; a panic elsewhere while holding the lock leaves plain counters
    /// behind, which stay meaningful, so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn update(&self, change: impl FnOnce(&mut Progress)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }
}

/// Batching parameters of the writer thread.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Batching {
    pub commit_interval: Duration,
    pub max_pending_ops: usize,
}

struct Rebuild {
    /// Version indexed so far for each key, to keep the highest when the input repeats a key.
    seen: HashMap<String, u64>,
    counts: RebuildCounts,
}

pub(crate) struct WriterLoop {
    writer: IndexWriter<TantivyDocument>,
    reader: IndexReader,
    fields: Fields,
    shared: Arc<Shared>,
    batching: Batching,
    pending_ops: usize,
    pending_since: Option<Instant>,
    /// Highest sequence number applied, visible after the next commit.
    last_seq: u64,
    /// Versions written since the last commit: `Some` for an upsert, `None` for a removal.
    pending_versions: HashMap<String, Option<u64>>,
    rebuild: Option<Rebuild>,
}

impl WriterLoop {
    pub fn new(
        writer: IndexWriter<TantivyDocument>,
        reader: IndexReader,
        fields: Fields,
        shared: Arc<Shared>,
        batching: Batching,
    ) -> Self {
        Self {
            writer,
            reader,
            fields,
            shared,
            batching,
            pending_ops: 0,
            pending_since: None,
            last_seq: 0,
            pending_versions: HashMap::new(),
            rebuild: None,
        }
    }

    /// Serves commands until every sender is dropped, then commits what is pending and waits for
    /// merges; records a failure instead if tantivy reports one or the thread panics.
    pub fn run(mut self, commands: Receiver<Command>) {
        let shared = Arc::clone(&self.shared);
        // Dropped before `commands`, so a panic is recorded before the queue closes too.
        let _panic = PanicGuard {
            shared: Arc::clone(&shared),
        };
        let outcome = self.serve(&commands).and_then(|()| self.finish());
        // The failure is published before the queue closes, so a sender that finds the queue
        // closed also finds the reason.
        shared.update(|progress| {
            if let Err(error) = outcome {
                progress.failure.get_or_insert_with(|| error_chain(&error));
            }
            progress.stopped = true;
        });
        drop(commands);
    }

    fn finish(mut self) -> tantivy::Result<()> {
        if self.rebuild.is_some() {
            self.writer.rollback()?;
        } else if self.pending_ops > 0 {
            self.commit()?;
        }
        self.writer.wait_merging_threads()
    }

    fn deadline(&self) -> Option<Instant> {
        if self.rebuild.is_some() {
            return None;
        }
        self.pending_since
            .map(|since| since + self.batching.commit_interval)
    }

    fn serve(&mut self, commands: &Receiver<Command>) -> tantivy::Result<()> {
        loop {
            let command = match self.deadline() {
                None => match commands.recv() {
                    Ok(command) => command,
                    Err(_) => return Ok(()),
                },
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        self.commit()?;
                        continue;
                    }
                    match commands.recv_timeout(deadline - now) {
                        Ok(command) => command,
                        Err(RecvTimeoutError::Timeout) => {
                            self.commit()?;
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => return Ok(()),
                    }
                }
            };
            self.apply(command)?;
        }
    }

    fn apply(&mut self, command: Command) -> tantivy::Result<()> {
        match command {
            Command::Upsert { seq, doc } => {
                self.upsert(&doc)?;
                self.note_op(seq)?;
            }
            Command::Remove { seq, key } => {
                self.writer
                    .delete_term(Term::from_field_text(self.fields.doc_key, &key));
                self.pending_versions.insert(key, None);
                self.note_op(seq)?;
            }
            Command::Flush { seq } => {
                self.last_seq = seq;
                if self.pending_ops > 0 {
                    self.commit()?;
                } else {
                    self.shared
                        .update(|p| p.visible_seq = p.visible_seq.max(seq));
                }
            }
            Command::RebuildBegin => {
                if self.pending_ops > 0 {
                    self.commit()?;
                }
                self.writer.delete_all_documents()?;
                self.rebuild = Some(Rebuild {
                    seen: HashMap::new(),
                    counts: RebuildCounts::default(),
                });
            }
            Command::RebuildBatch(docs) => self.rebuild_batch(docs)?,
            Command::RebuildAbort => {
                self.writer.rollback()?;
                self.rebuild = None;
            }
            Command::RebuildCommit { seq, reply } => {
                let counts = self.rebuild.take().map(|r| r.counts).unwrap_or_default();
                self.last_seq = seq;
                // The caller may have stopped waiting, so replies are best effort. A failed commit
                // is answered before the loop stops, so the caller learns why.
                match self.commit() {
                    Ok(()) => {
                        let _ = reply.send(Ok(counts));
                    }
                    Err(error) => {
                        // Published before the answer, so the caller finds the writer stopped.
                        let failure = error_chain(&error);
                        self.shared.update(|p| {
                            p.failure = Some(failure.clone());
                            p.stopped = true;
                        });
                        let _ = reply.send(Err(SearchError::WriterFailed(failure)));
                        return Err(error);
                    }
                }
            }
        }
        Ok(())
    }

    fn upsert(&mut self, doc: &ArticleDoc) -> tantivy::Result<()> {
        let key = doc.key();
        let current = self.current_version(&key)?;
        if current.is_some_and(|version| doc.version < version) {
            self.shared.update(|p| p.stale_upserts += 1);
            return Ok(());
        }
        if current.is_some() {
            self.writer
                .delete_term(Term::from_field_text(self.fields.doc_key, &key));
        }
        self.writer.add_document(self.fields.document(doc))?;
        self.pending_versions.insert(key, Some(doc.version));
        Ok(())
    }

    fn rebuild_batch(&mut self, docs: Vec<ArticleDoc>) -> tantivy::Result<()> {
        let Some(rebuild) = self.rebuild.as_mut() else {
            return Ok(());
        };
        for doc in docs {
            let key = doc.key();
            match rebuild.seen.get(&key) {
                Some(&version) if doc.version < version => {
                    rebuild.counts.superseded += 1;
                    continue;
                }
                Some(_) => {
                    self.writer
                        .delete_term(Term::from_field_text(self.fields.doc_key, &key));
                    rebuild.counts.superseded += 1;
                    rebuild.counts.indexed -= 1;
                }
                None => {}
            }
            self.writer.add_document(self.fields.document(&doc))?;
            rebuild.counts.indexed += 1;
            rebuild.seen.insert(key, doc.version);
        }
        Ok(())
    }

    fn note_op(&mut self, seq: u64) -> tantivy::Result<()> {
        self.last_seq = seq;
        self.pending_ops += 1;
        if self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
        if self.pending_ops >= self.batching.max_pending_ops {
            self.commit()?;
        }
        Ok(())
    }

    fn commit(&mut self) -> tantivy::Result<()> {
        #[cfg(any(test, feature = "fault-injection"))]
        self.injected_fault()?;
        self.writer.commit()?;
        self.reader.reload()?;
        self.pending_ops = 0;
        self.pending_since = None;
        self.pending_versions.clear();
        let seq = self.last_seq;
        self.shared.update(|p| {
            p.visible_seq = p.visible_seq.max(seq);
            p.commits += 1;
        });
        Ok(())
    }

    /// Suffers the oldest fault injected with [`crate::SearchIndex::inject_fault`], once.
    #[cfg(any(test, feature = "fault-injection"))]
    fn injected_fault(&self) -> tantivy::Result<()> {
        let fault = self.shared.lock().faults.pop_front();
        match fault {
            None => Ok(()),
            Some(Fault::CommitError) => Err(tantivy::TantivyError::InternalError(
                "injected commit failure".to_owned(),
            )),
            Some(Fault::Panic) => panic!("injected writer thread panic"),
        }
    }

    /// Returns the version of the article currently indexed or pending, if any.
    fn current_version(&self, key: &str) -> tantivy::Result<Option<u64>> {
        if let Some(pending) = self.pending_versions.get(key) {
            return Ok(*pending);
        }
        let term = Term::from_field_text(self.fields.doc_key, key);
        let searcher = self.reader.searcher();
        for segment in searcher.segment_readers() {
            let inverted = segment.inverted_index(self.fields.doc_key)?;
            let Some(mut postings) = inverted.read_postings(&term, IndexRecordOption::Basic)?
            else {
                continue;
            };
            let versions = segment.fast_fields().u64(VERSION)?;
            let alive = segment.alive_bitset();
            let mut doc = postings.doc();
            while doc != TERMINATED {
                if alive.is_none_or(|bits| bits.is_alive(doc)) {
                    return Ok(versions.first(doc));
                }
                doc = postings.advance();
            }
        }
        Ok(None)
    }
}

/// Records a panic of the writer thread as its failure, so that waiters and writers learn that
/// the writer is gone and [`crate::SearchIndex::recover`] can replace it.
struct PanicGuard {
    shared: Arc<Shared>,
}

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.update(|progress| {
                progress
                    .failure
                    .get_or_insert_with(|| "the writer thread panicked".to_owned());
                progress.stopped = true;
            });
        }
    }
}

/// Formats an error with its sources, since the failure is reported once, as text.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
