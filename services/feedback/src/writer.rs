//! Group commit of submitted feedback.
//!
//! Each `SubmitFeedback` call queues its record on a bounded channel and waits for its own
//! answer. A writer takes what is queued (up to `max_batch` records, waiting at most `linger`
//! for more once it holds one) and stores it in one transaction: one multi-row insert
//! per tenant with `ON CONFLICT DO NOTHING` on the client id, one rollup update for the batch,
//! one outbox insert. Then it answers every caller with its own outcome: new, or a replay of the
//! stored record (a duplicate inside the batch replays the first one). `writers` writers take
//! turns at the queue, so one batch is gathered and written while another commits; their
//! rollup rows are updated in key order, so concurrent batches wait for each other there but
//! never deadlock, and the database's unique client id decides between two batches that carry
//! the same record.
//!
//! A caller is answered only after the commit, so an acknowledged record is never lost: if the
//! writer dies mid-batch, the transaction rolls back and the callers get `Unavailable`, which a
//! retry with the same client id resolves (new, or a replay when the commit did happen).
//! When a batch fails for a reason other than a transient one, its records are written one by
//! one, so a row the database refuses fails its own call only.

use std::collections::BTreeMap;
use std::time::Duration;

use tandem_platform::bus::RawEvent;
use tandem_proto::ids::TenantId;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::adapters::sql::{Store, StoreError, StoreResult, Stored};
use crate::domain::fact::ConversationFact;
use crate::domain::feedback::FeedbackRecord;
use crate::metrics::{FEEDBACK_BATCH_RECORDS, FEEDBACK_BATCHES_TOTAL};

/// How the writer batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterOptions {
    /// The most records stored in one transaction.
    pub max_batch: usize,
    /// How long the writer waits for more records once it holds one, unless the batch is full.
    pub linger: Duration,
    /// Records that may wait in the queue; callers beyond it wait for room.
    pub queue: usize,
    /// Batches written at the same time.
    pub writers: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            max_batch: 512,
            linger: Duration::from_millis(1),
            queue: 8192,
            writers: 2,
        }
    }
}

/// What a caller gets back: the outcome and, for a new record, its conversation's facts.
pub type Answer = StoreResult<(Stored, Option<ConversationFact>)>;

struct Job {
    tenant: TenantId,
    record: FeedbackRecord,
    reply: oneshot::Sender<Answer>,
}

/// Makes the event of a new record from its tenant, the record and its conversation's facts.
pub type EventMaker = dyn Fn(&TenantId, &FeedbackRecord, Option<&ConversationFact>) -> RawEvent
    + Send
    + Sync
    + 'static;

/// The handle callers submit through; cheap to clone.
#[derive(Clone)]
pub struct FeedbackWriter {
    queue: mpsc::Sender<Job>,
}

/// Transient failures of a whole batch are retried this many times before the callers hear.
const RETRIES: usize = 3;

impl FeedbackWriter {
    /// Creates the writer: the handle, and the task to spawn, which stores batches (with
    /// `writers` writers) until every handle is dropped or `shutdown` is cancelled, then stores
    /// what is queued and returns.
    pub fn new(
        store: Store,
        options: WriterOptions,
        event: std::sync::Arc<EventMaker>,
        shutdown: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (queue, jobs) = mpsc::channel(options.queue.max(1));
        let jobs = std::sync::Arc::new(tokio::sync::Mutex::new(jobs));
        let writers: Vec<_> = (0..options.writers.max(1))
            .map(|_| {
                run(
                    store.clone(),
                    options,
                    std::sync::Arc::clone(&event),
                    std::sync::Arc::clone(&jobs),
                    shutdown.clone(),
                )
            })
            .collect();
        // Dropping the task (an abort, or the runtime shutting down) stops every writer.
        let task = async move {
            let mut set = tokio::task::JoinSet::new();
            for writer in writers {
                set.spawn(writer);
            }
            while let Some(done) = set.join_next().await {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a feedback writer failed");
                }
            }
        };
        (Self { queue }, task)
    }

    /// Stores one record of `tenant` in the next batch and returns its outcome once the batch
    /// committed.
    pub async fn submit(&self, tenant: &TenantId, record: FeedbackRecord) -> Answer {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            tenant: tenant.clone(),
            record,
            reply,
        };
        if self.queue.send(job).await.is_err() {
            return Err(StoreError::Unavailable(
                "the feedback writer has stopped".into(),
            ));
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the feedback writer stopped before answering; retry with the same client_feedback_id"
                    .into(),
            ))
        })
    }
}

async fn run(
    store: Store,
    options: WriterOptions,
    event: std::sync::Arc<EventMaker>,
    jobs: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    shutdown: CancellationToken,
) {
    loop {
        // One writer gathers at a time; the others write or commit meanwhile.
        let batch = {
            let mut jobs = jobs.lock().await;
            gather(&mut jobs, options, &shutdown).await
        };
        let Some(batch) = batch else {
            return;
        };
        write(&store, &*event, batch).await;
    }
}

/// Takes the next batch from the queue; `None` once the queue is closed and empty.
async fn gather(
    jobs: &mut mpsc::Receiver<Job>,
    options: WriterOptions,
    shutdown: &CancellationToken,
) -> Option<Vec<Job>> {
    let max_batch = options.max_batch.max(1);
    let first = tokio::select! {
        biased;
        job = jobs.recv() => job,
        () = shutdown.cancelled() => {
            // Refuse new work and store what is queued.
            jobs.close();
            jobs.recv().await
        }
    };
    let first = first?;
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + options.linger;
    while batch.len() < max_batch {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                if options.linger.is_zero() || shutdown.is_cancelled() {
                    break;
                }
                match tokio::time::timeout_at(deadline, jobs.recv()).await {
                    Ok(Some(job)) => batch.push(job),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
    Some(batch)
}

/// Stores one batch and answers its callers.
async fn write(store: &Store, event: &EventMaker, batch: Vec<Job>) {
    metrics::counter!(FEEDBACK_BATCHES_TOTAL).increment(1);
    metrics::histogram!(FEEDBACK_BATCH_RECORDS).record(batch.len() as f64);
    // Group by tenant, keeping each tenant's records in arrival order.
    let mut by_tenant: BTreeMap<String, Vec<Job>> = BTreeMap::new();
    for job in batch {
        by_tenant
            .entry(job.tenant.as_str().to_owned())
            .or_default()
            .push(job);
    }
    let tenants: Vec<TenantId> = by_tenant
        .values()
        .filter_map(|jobs| jobs.first())
        .map(|j| j.tenant.clone())
        .collect();
    let groups: Vec<(String, Vec<FeedbackRecord>)> = by_tenant
        .iter()
        .map(|(tenant, jobs)| {
            (
                tenant.clone(),
                jobs.iter().map(|j| j.record.clone()).collect(),
            )
        })
        .collect();
    let make = |group: usize, record: &FeedbackRecord, fact: Option<&ConversationFact>| {
        event(&tenants[group], record, fact)
    };
    let mut attempt = 0;
    let failure = loop {
        match store.insert_feedback_groups(&groups, &make).await {
            Ok(outcomes) => {
                for (jobs, outcomes) in by_tenant.into_values().zip(outcomes) {
                    for (job, outcome) in jobs.into_iter().zip(outcomes) {
                        // A caller that went away needs no answer: its record is stored.
                        let _ = job.reply.send(Ok(outcome));
                    }
                }
                return;
            }
            Err(e) if e.is_transient() && attempt < RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
            }
            Err(e) => break e,
        }
    };
    let mut jobs: Vec<Job> = by_tenant.into_values().flatten().collect();
    let reason = tandem_platform::error::DisplayChain(&failure).to_string();
    if jobs.len() == 1 {
        tracing::warn!(error = %reason, "feedback write failed");
        if let Some(job) = jobs.pop() {
            let _ = job.reply.send(Err(failure));
        }
        return;
    }
    if failure.is_transient() {
        tracing::warn!(error = %reason, records = jobs.len(), "feedback batch failed");
        for job in jobs {
            let _ = job.reply.send(Err(StoreError::Unavailable(reason.clone())));
        }
        return;
    }
    // Isolate the record the database refuses: each one alone, in its own transaction.
    tracing::warn!(error = %reason, records = jobs.len(), "feedback batch failed; storing its records one by one");
    for job in jobs {
        let groups = [(job.tenant.as_str().to_owned(), vec![job.record.clone()])];
        let make = |_: usize, record: &FeedbackRecord, fact: Option<&ConversationFact>| {
            event(&job.tenant, record, fact)
        };
        let answer = match store.insert_feedback_groups(&groups, &make).await {
            Ok(outcomes) => outcomes
                .into_iter()
                .flatten()
                .next()
                .ok_or_else(|| StoreError::Corrupt("the store answered no row".into())),
            Err(e) => Err(e),
        };
        let _ = job.reply.send(answer);
    }
}
