//! The assignment engine: turns queued tickets into offers, expires offers, applies overflow
//! and presence rules, reports queue statistics and waiting tickets' position changes, and tells
//! desk sessions when their offers changed.
//!
//! Every decision is made by the store inside a transaction (see [`crate::store`]); the engine
//! only decides *when* to try. It drains a queue when a ticket arrives, an offer is declined or
//! expires, an assignment ends or an agent comes online, and it also sweeps every
//! `sweep_interval` so work left by another replica or a lost trigger is picked up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use chrono::{DateTime, Utc};
use tandem_proto::ids::TenantId;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::error::{RoutingError, RoutingResult};
use crate::store::{AcceptRequest, Accepted, MAX_ACCEPT_BATCH, Store};

/// The time source (a port, so tests can move time).
pub trait Clock: Send + Sync + 'static {
    /// Returns the current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Wakes the desk sessions of agents whose offers changed. Sessions connected to this process
/// are woken at once; with a forwarder set ([`SessionHub::forward_to`]) every wake-up is also
/// passed on to the other replicas (`adapters::wakeups`), whose sessions would otherwise learn of
/// the change only at their next poll.
#[derive(Clone, Default)]
pub struct SessionHub {
    agents: Arc<Mutex<Signals>>,
    forward: Arc<OnceLock<mpsc::UnboundedSender<DeskWakeup>>>,
}

/// One wake-up signal per (tenant, agent).
type Signals = HashMap<(String, String), Arc<Notify>>;

/// A wake-up for an agent's desk, passed between replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeskWakeup {
    /// The agent's tenant.
    pub tenant: TenantId,
    /// The agent.
    pub agent_id: String,
}

impl SessionHub {
    /// Returns the signal of an agent's session.
    pub fn subscribe(&self, tenant: &TenantId, agent_id: &str) -> Arc<Notify> {
        let mut agents = self
            .agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            agents
                .entry((tenant.to_string(), agent_id.to_owned()))
                .or_default(),
        )
    }

    /// Passes every later [`SessionHub::notify`] on to `forward` as well; the first call wins.
    pub fn forward_to(&self, forward: mpsc::UnboundedSender<DeskWakeup>) {
        let _ = self.forward.set(forward);
    }

    /// Wakes an agent's session, here and, through the forwarder, on the other replicas.
    pub fn notify(&self, tenant: &TenantId, agent_id: &str) {
        self.notify_local(tenant, agent_id);
        if let Some(forward) = self.forward.get() {
            let _ = forward.send(DeskWakeup {
                tenant: tenant.clone(),
                agent_id: agent_id.to_owned(),
            });
        }
    }

    /// Wakes an agent's session if it is connected here, and tells no other replica: for
    /// wake-ups that came from them.
    pub fn notify_local(&self, tenant: &TenantId, agent_id: &str) {
        let agents = self
            .agents
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(signal) = agents.get(&(tenant.to_string(), agent_id.to_owned())) {
            signal.notify_waiters();
            signal.notify_one();
        }
    }
}

/// One accept waiting for the batcher.
struct AcceptJob {
    tenant: TenantId,
    request: AcceptRequest,
    now: DateTime<Utc>,
    reply: oneshot::Sender<RoutingResult<Accepted>>,
}

/// Group commit of the accepts of this process: desk sessions hand their accepts to one task,
/// which takes everything waiting (up to [`MAX_ACCEPT_BATCH`]) and answers it with one
/// transaction per tenant ([`Store::accept_many`]). While a batch commits the next one gathers,
/// so the number of transactions follows the database's pace, not the number of accepts. An
/// accept that finds the task idle is sent at once: nothing waits for a batch to fill.
struct AcceptBatcher {
    jobs: mpsc::UnboundedSender<AcceptJob>,
}

impl AcceptBatcher {
    fn start(store: Store) -> Self {
        let (jobs, mut waiting) = mpsc::unbounded_channel::<AcceptJob>();
        tokio::spawn(async move {
            while let Some(first) = waiting.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_ACCEPT_BATCH {
                    match waiting.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let mut by_tenant: Vec<(TenantId, Vec<AcceptJob>)> = Vec::new();
                for job in batch {
                    match by_tenant.iter_mut().find(|(t, _)| *t == job.tenant) {
                        Some((_, jobs)) => jobs.push(job),
                        None => by_tenant.push((job.tenant.clone(), vec![job])),
                    }
                }
                for (tenant, jobs) in by_tenant {
                    answer(&store, &tenant, jobs).await;
                }
            }
        });
        Self { jobs }
    }
}

/// Answers one tenant's accepts: as one batch, or one by one when the batch as a whole failed
/// (then each request gets its own answer, e.g. the constraint it broke).
async fn answer(store: &Store, tenant: &TenantId, jobs: Vec<AcceptJob>) {
    let requests: Vec<AcceptRequest> = jobs.iter().map(|j| j.request.clone()).collect();
    // One time for the batch: the latest of the requests' (each was taken when it arrived).
    let now = jobs.iter().map(|j| j.now).max().unwrap_or_else(Utc::now);
    match store.accept_many(tenant, &requests, now).await {
        Ok(results) => {
            for (job, result) in jobs.into_iter().zip(results) {
                let _ = job.reply.send(result);
            }
        }
        Err(error) => {
            tracing::debug!(error = %tandem_platform::error::DisplayChain(&error), size = jobs.len(), "accept batch failed, answering one by one");
            for job in jobs {
                let result = store
                    .accept(
                        tenant,
                        &job.request.agent_id,
                        &job.request.offer_id,
                        job.now,
                    )
                    .await;
                let _ = job.reply.send(result);
            }
        }
    }
}

/// The engine, shared by the gRPC service, the consumers and the background loop.
pub struct Engine {
    /// The repository.
    pub store: Store,
    /// Settings.
    pub settings: Settings,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Session wake-ups.
    pub hub: SessionHub,
    /// The accept batcher, started on first use (it needs the runtime).
    accepts: OnceLock<AcceptBatcher>,
    /// Queues being drained in this process, with whether another pass was asked for.
    draining: Mutex<HashMap<(String, String), bool>>,
}

/// Ends a drain's claim on its queue when the drain fails (or its task is dropped).
struct DrainGuard<'a> {
    engine: &'a Engine,
    key: &'a (String, String),
    armed: bool,
}

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.engine.draining().remove(self.key);
        }
    }
}

/// Passes in a row without an offer (only lost races) after which a drain stops; the sweep
/// and the next trigger retry.
const MAX_IDLE_PASSES: usize = 3;

impl Engine {
    /// Creates an engine.
    pub fn new(store: Store, settings: Settings, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            settings,
            clock,
            hub: SessionHub::default(),
            accepts: OnceLock::new(),
            draining: Mutex::new(HashMap::new()),
        }
    }

    /// Accepts an offer for `agent_id` through this process's accept batcher (group commit with
    /// the other accepts waiting); the answer is the one [`Store::accept`] would give.
    pub async fn accept(
        &self,
        tenant: &TenantId,
        agent_id: &str,
        offer_id: &str,
        now: DateTime<Utc>,
    ) -> RoutingResult<Accepted> {
        let (reply, answer) = oneshot::channel();
        let job = AcceptJob {
            tenant: tenant.clone(),
            request: AcceptRequest {
                agent_id: agent_id.to_owned(),
                offer_id: offer_id.to_owned(),
            },
            now,
            reply,
        };
        let batcher = self
            .accepts
            .get_or_init(|| AcceptBatcher::start(self.store.clone()));
        if batcher.jobs.send(job).is_err() {
            return Err(RoutingError::Conflict("the accept batcher stopped".into()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(RoutingError::Conflict("the accept batcher stopped".into())))
    }

    /// Returns the current time.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Offers a queue's waiting tickets, best first, to the best eligible agents until no agent
    /// can take more, in batches of `offer_batch` tickets per transaction. Returns how many
    /// offers were made.
    ///
    /// One drain of a queue runs at a time in this process: a drain asked for while one runs
    /// only tells it to pass over the queue once more when it is done, and returns 0 at once.
    /// Many triggers at one moment (a hundred desks going online) then cost one drain, not a
    /// hundred transactions queueing for the same agent rows and holding the pool's
    /// connections while they wait. Other replicas drain the same queue beside it; their
    /// claims skip each other's tickets.
    pub async fn drain_queue(&self, tenant: &TenantId, queue_id: &str) -> RoutingResult<usize> {
        let key = (tenant.to_string(), queue_id.to_owned());
        {
            let mut running = self.draining();
            if let Some(again) = running.get_mut(&key) {
                *again = true;
                return Ok(0);
            }
            running.insert(key.clone(), false);
        }
        let mut guard = DrainGuard {
            engine: self,
            key: &key,
            armed: true,
        };
        let mut offered = 0;
        loop {
            offered += self.drain_pass(tenant, queue_id).await?;
            // Checked and released under one lock, so no request for another pass is lost.
            let mut running = self.draining();
            match running.get_mut(&key) {
                Some(again) if *again => *again = false,
                _ => {
                    running.remove(&key);
                    guard.armed = false;
                    break;
                }
            }
        }
        Ok(offered)
    }

    fn draining(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), bool>> {
        self.draining
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One pass of [`Engine::drain_queue`].
    async fn drain_pass(&self, tenant: &TenantId, queue_id: &str) -> RoutingResult<usize> {
        let batch = self.settings.offer_batch.max(1);
        let mut offered = 0;
        let mut idle_passes = 0;
        loop {
            let done = match self
                .store
                .offer_queued(tenant, queue_id, batch, self.now())
                .await
            {
                Err(error) if error.is_conflict() => {
                    idle_passes += 1;
                    if idle_passes >= MAX_IDLE_PASSES {
                        return Ok(offered);
                    }
                    continue;
                }
                other => other?,
            };
            for (_, offer) in &done.offered {
                self.hub.notify(tenant, &offer.agent_id);
            }
            offered += done.offered.len();
            if done.offered.is_empty() {
                // Nobody can take the waiting tickets, unless agents changed under this batch.
                idle_passes += 1;
                if done.contended == 0 || idle_passes >= MAX_IDLE_PASSES {
                    return Ok(offered);
                }
            } else {
                idle_passes = 0;
                if done.claimed < batch && done.contended == 0 {
                    return Ok(offered);
                }
            }
        }
    }

    /// Drains every queue of a tenant that has waiting tickets.
    pub async fn drain_tenant(&self, tenant: &TenantId) -> RoutingResult<usize> {
        let mut offered = 0;
        for (owner, queue) in self.store.waiting_queues().await? {
            if owner == *tenant {
                offered += self.drain_queue(&owner, &queue).await?;
            }
        }
        Ok(offered)
    }

    /// Drains in the background, logging failures (the sweep retries).
    pub fn drain_later(self: &Arc<Self>, tenant: &TenantId, queue_id: Option<&str>) {
        let engine = Arc::clone(self);
        let tenant = tenant.clone();
        let queue = queue_id.map(str::to_owned);
        tokio::spawn(async move {
            let result = match queue {
                Some(queue) => engine.drain_queue(&tenant, &queue).await,
                None => engine.drain_tenant(&tenant).await,
            };
            if let Err(error) = result {
                tracing::warn!(error = %tandem_platform::error::DisplayChain(&error), "drain failed");
            }
        });
    }

    /// One sweep: expire offers, apply presence and overflow rules, drain every waiting queue.
    pub async fn sweep(&self) -> RoutingResult<()> {
        let now = self.now();
        for (tenant, offer) in self
            .store
            .expire_offers(now, 500, self.settings.missed_offers_before_away)
            .await?
        {
            self.hub.notify(&tenant, &offer.agent_id);
        }
        for (tenant, agent) in self
            .store
            .sweep_sessions(
                now,
                self.settings.heartbeat_timeout(),
                self.settings.session_grace,
            )
            .await?
        {
            self.hub.notify(&tenant, &agent.profile.id);
        }
        self.store.apply_overflow(now, self.settings.eta()).await?;
        for (tenant, queue) in self.store.waiting_queues().await? {
            self.drain_queue(&tenant, &queue).await?;
        }
        Ok(())
    }

    /// Runs the sweep, the statistics reports and the position updates until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(self.settings.sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stats = tokio::time::interval(self.settings.stats_interval);
        stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Twice per update interval, so a ticket due for an update waits at most half an
        // interval past it.
        let mut positions = tokio::time::interval(
            (self.settings.position_update_interval / 2).max(std::time::Duration::from_millis(50)),
        );
        positions.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = sweep.tick() => {
                    if let Err(error) = self.sweep().await {
                        tracing::warn!(error = %tandem_platform::error::DisplayChain(&error), "routing sweep failed");
                    }
                }
                _ = stats.tick() => {
                    let reported = self
                        .store
                        .report_queue_stats(self.now(), self.settings.stats_interval, self.settings.eta())
                        .await;
                    if let Err(error) = reported {
                        tracing::warn!(error = %tandem_platform::error::DisplayChain(&error), "queue statistics failed");
                    }
                }
                _ = positions.tick() => {
                    let reported = self
                        .store
                        .report_positions(self.now(), self.settings.position_updates(), self.settings.eta())
                        .await;
                    if let Err(error) = reported {
                        tracing::warn!(error = %tandem_platform::error::DisplayChain(&error), "queue position updates failed");
                    }
                }
            }
        }
    }
}
