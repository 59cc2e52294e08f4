//! The policy service's use cases: the scenario catalogue and its versions, decisions with a
//! per-tenant cache, shadow recording, pins, rollbacks and adjustments from live signals.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tandem_platform::bus::RawEvent;
use tandem_platform::error::{ErrorCode, ServiceError};
use tandem_platform::outbox::OutboxWaker;
use tandem_policy_client::{
    Catalogue, CatalogueError, DEFAULT_SCENARIO_ID, prefix_errors, scenario_to_engine, violation,
};
use tandem_policy_engine as engine;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1::ValidationError;
use tandem_proto::pb::policy::v1 as pb;
use tokio::sync::mpsc;

use crate::adjust::{self, Step};
use crate::store::{
    Batch, Committed, ListFilter, Observation, ScenarioWrite, Snapshot, Store, StoreError,
    micros_timestamp, now_micros,
};

/// Longest reason for a change.
const MAX_REASON_CHARS: usize = 1_000;
/// Longest pin reason.
const MAX_PIN_REASON_CHARS: usize = 500;
/// Attempts of a change that lost an optimistic-concurrency race to an unrelated change.
const ATTEMPTS: usize = 5;
/// The actor of automatic changes.
pub const SYSTEM_ACTOR: &str = "system";

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Validation failed; every problem is listed.
    #[error("{} problem(s): {}", .0.len(), render(.0))]
    Invalid(Vec<ValidationError>),
    /// Something addressed does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An optimistic-concurrency check failed.
    #[error("{0}")]
    Aborted(String),
    /// The entity's state does not allow the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Storage failed.
    #[error("storage failed")]
    Store(#[from] StoreError),
}

fn render(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.path, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ServiceError for PolicyError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) => ErrorCode::InvalidArgument,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Aborted(_) => ErrorCode::Aborted,
            Self::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Self::Store(StoreError::Conflict) => ErrorCode::Aborted,
            Self::Store(_) => ErrorCode::Internal,
        }
    }
}

impl From<CatalogueError> for PolicyError {
    fn from(e: CatalogueError) -> Self {
        match e {
            CatalogueError::UnknownScenario(id) => {
                Self::NotFound(format!("scenario {id:?} not found"))
            }
            CatalogueError::InvalidContext(errors) => Self::Invalid(errors),
        }
    }
}

fn invalid(path: &str, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid(vec![violation(path, message)])
}

fn check_text(path: &str, value: &str, max: usize) -> Result<(), PolicyError> {
    let chars = value.chars().count();
    if chars > max {
        return Err(invalid(
            path,
            format!("has {chars} characters, more than {max}"),
        ));
    }
    if value.chars().any(|c| c.is_control() && c != '\n') {
        return Err(invalid(path, "contains control characters"));
    }
    Ok(())
}

/// Who asks for a change and why.
#[derive(Debug, Clone)]
pub struct Actor {
    /// User id, or [`SYSTEM_ACTOR`].
    pub id: String,
    /// Why.
    pub reason: String,
}

/// Tunables of the application.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// How long a tenant's compiled catalogue is reused before it is read again.
    pub catalogue_ttl: Duration,
    /// Hysteresis band of adjustment rules, as a fraction of the threshold.
    pub hysteresis_margin: f64,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            catalogue_ttl: Duration::from_secs(2),
            hysteresis_margin: 0.1,
        }
    }
}

/// A shadow decision waiting to be written.
pub type ShadowItem = (TenantId, pb::ShadowDecisionRecord);

/// The policy application.
pub struct App {
    store: Store,
    outbox: OutboxWaker,
    options: AppOptions,
    cache: RwLock<HashMap<TenantId, (Instant, Arc<Catalogue>)>>,
    shadow: Option<mpsc::Sender<ShadowItem>>,
}

/// Result of an upsert.
#[derive(Debug, Clone)]
pub struct Upserted {
    /// The scenario as stored (or as it would be).
    pub scenario: pb::Scenario,
    /// The version record created, if any.
    pub version: Option<pb::PolicyVersion>,
    /// Whether the scenario did not exist before.
    pub created: bool,
}

/// Result of an import.
#[derive(Debug, Clone, Default)]
pub struct Imported {
    /// Scenarios as stored (or as they would be).
    pub scenarios: Vec<pb::Scenario>,
    /// Counts.
    pub created: i32,
    /// Counts.
    pub updated: i32,
    /// Counts.
    pub unchanged: i32,
}

impl App {
    /// Builds the application; `shadow` receives shadow decisions to record.
    pub fn new(
        store: Store,
        outbox: OutboxWaker,
        options: AppOptions,
        shadow: Option<mpsc::Sender<ShadowItem>>,
    ) -> Self {
        Self {
            store,
            outbox,
            options,
            cache: RwLock::new(HashMap::new()),
            shadow,
        }
    }

    /// Returns the store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    // ----- reads ---------------------------------------------------------------------------

    /// Returns a tenant's compiled catalogue, from the cache while fresh.
    pub async fn catalogue(&self, tenant: &TenantId) -> Result<Arc<Catalogue>, PolicyError> {
        if let Ok(cache) = self.cache.read()
            && let Some((at, cat)) = cache.get(tenant)
            && at.elapsed() < self.options.catalogue_ttl
        {
            return Ok(Arc::clone(cat));
        }
        let snapshot = self.store.snapshot(tenant).await?;
        let (cat, rejected) = Catalogue::build(snapshot.scenarios);
        for (id, errors) in rejected {
            tracing::warn!(tenant = %tenant, scenario = %id, problems = %render(&errors),
                "stored scenario no longer converts; deciding without it");
        }
        let cat = Arc::new(cat);
        if let Ok(mut cache) = self.cache.write() {
            cache.insert(tenant.clone(), (Instant::now(), Arc::clone(&cat)));
        }
        Ok(cat)
    }

    fn invalidate(&self, tenant: &TenantId) {
        if let Ok(mut cache) = self.cache.write() {
            cache.remove(tenant);
        }
    }

    /// Returns one live scenario.
    pub async fn get(&self, tenant: &TenantId, id: &str) -> Result<pb::Scenario, PolicyError> {
        let snapshot = self.store.snapshot(tenant).await?;
        snapshot
            .scenarios
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| PolicyError::NotFound(format!("scenario {id:?} not found")))
    }

    /// Lists live scenarios ordered by id.
    pub async fn list(&self, tenant: &TenantId) -> Result<Vec<pb::Scenario>, PolicyError> {
        Ok(self.store.snapshot(tenant).await?.scenarios)
    }

    /// Decides one turn and records the shadow decision, if any, off the request path.
    pub async fn decide(
        &self,
        tenant: &TenantId,
        ctx: &pb::DecisionContext,
    ) -> Result<pb::Decision, PolicyError> {
        let cat = self.catalogue(tenant).await?;
        let decided = cat.decide(ctx)?;
        if let (Some(diverged), Some(tx)) = (decided.shadow_diverged, &self.shadow) {
            let record = pb::ShadowDecisionRecord {
                id: uuid::Uuid::now_v7().to_string(),
                scenario_id: decided.decision.scenario_id.clone(),
                conversation_id: ctx.conversation_id.clone(),
                message_id: ctx.message_id.clone(),
                context: Some(ctx.clone()),
                decision: Some(decided.decision.clone()),
                diverged,
                decided_at: Some(micros_timestamp(now_micros())),
            };
            if tx.try_send((tenant.clone(), record)).is_err() {
                metrics::counter!("tandem_policy_shadow_dropped_total").increment(1);
            }
        }
        Ok(decided.decision)
    }

    // ----- validation ----------------------------------------------------------------------

    /// Validates a whole catalogue as it would be after a change: each scenario (with the tenant
    /// defaults it would get) and the catalogue-wide rules. Paths are `scenarios[<id>].…`.
    fn validate(scenarios: &[pb::Scenario]) -> Result<(), Vec<ValidationError>> {
        let builtin = engine::default_scenario().thresholds;
        let mut errors = Vec::new();
        let defaults = match scenarios.iter().find(|s| s.id == DEFAULT_SCENARIO_ID) {
            Some(d) => match scenario_to_engine(d, &builtin) {
                Ok(d) => d.thresholds,
                Err(e) => {
                    errors.extend(prefix_errors(
                        &format!("scenarios[{DEFAULT_SCENARIO_ID}]."),
                        e,
                    ));
                    builtin
                }
            },
            None => builtin,
        };
        let mut compiled = Vec::with_capacity(scenarios.len());
        for s in scenarios {
            let own_defaults = if s.id == DEFAULT_SCENARIO_ID {
                &engine::default_scenario().thresholds
            } else {
                &defaults
            };
            match scenario_to_engine(s, own_defaults) {
                Ok(c) => compiled.push(c),
                Err(e) => {
                    if s.id != DEFAULT_SCENARIO_ID {
                        errors.extend(prefix_errors(&format!("scenarios[{}].", s.id), e));
                    }
                    // Still take part in the catalogue-wide checks (ids, intent claims).
                    compiled.push(engine::Scenario {
                        id: s.id.clone(),
                        intents: s.intents.clone(),
                        intent_priority: u32::try_from(s.intent_priority).unwrap_or(0),
                        ..engine::default_scenario()
                    });
                }
            }
        }
        if let Err(found) = engine::validate_catalogue(&compiled) {
            for v in found {
                errors.push(violation(format!("scenarios.{}", v.path()), v.to_string()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    // ----- writes --------------------------------------------------------------------------

    /// Creates or replaces a scenario.
    pub async fn upsert(
        &self,
        tenant: &TenantId,
        input: pb::Scenario,
        expected_version: i64,
        actor: &Actor,
        validate_only: bool,
    ) -> Result<Upserted, PolicyError> {
        check_text("reason", &actor.reason, MAX_REASON_CHARS)?;
        if expected_version < 0 {
            return Err(invalid("expected_version", "must not be negative"));
        }
        let input = crate::document::strip_server_fields(input);
        for _ in 0..ATTEMPTS {
            let snapshot = self.store.snapshot(tenant).await?;
            let current = snapshot
                .scenarios
                .iter()
                .find(|s| s.id == input.id)
                .cloned();
            let current_version = current.as_ref().map_or(0, |s| s.version);
            if expected_version != 0 && expected_version != current_version {
                return Err(PolicyError::Aborted(format!(
                    "scenario {:?} is at version {current_version}, not {expected_version}",
                    input.id
                )));
            }
            let mut next = input.clone();
            carry_server_fields(&mut next, current.as_ref());
            let after = replace(&snapshot.scenarios, &next);
            Self::validate(&after).map_err(PolicyError::Invalid)?;
            let created = current.is_none();
            if let Some(current) = &current
                && same_content(current, &next)
            {
                return Ok(Upserted {
                    scenario: current.clone(),
                    version: None,
                    created: false,
                });
            }
            next.version = next_version(&snapshot, &next.id);
            let now = micros_timestamp(now_micros());
            next.updated_at = Some(now);
            if next.created_at.is_none() {
                next.created_at = Some(now);
            }
            if validate_only {
                return Ok(Upserted {
                    scenario: next,
                    version: None,
                    created,
                });
            }
            let write = scenario_write(next, pb::ChangeCause::Manual, actor, false);
            let record = write.record.clone();
            match self
                .commit_writes(tenant, &snapshot, vec![write], true)
                .await
            {
                Ok(()) => {
                    return Ok(Upserted {
                        scenario: record.scenario.clone().unwrap_or_default(),
                        version: Some(record),
                        created,
                    });
                }
                Err(PolicyError::Store(StoreError::Conflict)) => {}
                Err(e) => return Err(e),
            }
        }
        Err(PolicyError::Aborted(
            "the catalogue kept changing concurrently; retry".into(),
        ))
    }

    /// Deletes a scenario, keeping its history.
    pub async fn delete(
        &self,
        tenant: &TenantId,
        id: &str,
        expected_version: i64,
        actor: &Actor,
    ) -> Result<(), PolicyError> {
        check_text("reason", &actor.reason, MAX_REASON_CHARS)?;
        self.change(
            tenant,
            id,
            |current| {
                if expected_version != 0 && expected_version != current.version {
                    return Err(PolicyError::Aborted(format!(
                        "scenario {id:?} is at version {}, not {expected_version}",
                        current.version
                    )));
                }
                Ok(Some((current.clone(), pb::ChangeCause::Delete, true, 0)))
            },
            actor,
        )
        .await
        .map(drop)
    }

    /// Restores an earlier version as a new version.
    pub async fn rollback(
        &self,
        tenant: &TenantId,
        id: &str,
        to_version: i64,
        actor: &Actor,
    ) -> Result<(pb::Scenario, pb::PolicyVersion), PolicyError> {
        check_text("reason", &actor.reason, MAX_REASON_CHARS)?;
        if to_version <= 0 {
            return Err(invalid("to_version", "must be a positive version number"));
        }
        let target = self
            .store
            .version(tenant, id, to_version)
            .await?
            .ok_or_else(|| {
                PolicyError::NotFound(format!(
                    "version {to_version} of scenario {id:?} does not exist"
                ))
            })?;
        let restored = target.scenario.unwrap_or_default();
        if target.cause == pb::ChangeCause::Delete as i32 {
            return Err(PolicyError::FailedPrecondition(format!(
                "version {to_version} of scenario {id:?} records its deletion; roll back to an \
                 earlier version"
            )));
        }
        for _ in 0..ATTEMPTS {
            let snapshot = self.store.snapshot(tenant).await?;
            let current = snapshot.scenarios.iter().find(|s| s.id == id).cloned();
            if current.as_ref().is_some_and(|c| c.version == to_version) {
                return Err(PolicyError::FailedPrecondition(format!(
                    "scenario {id:?} is already at version {to_version}"
                )));
            }
            let mut next = crate::document::strip_server_fields(restored.clone());
            carry_server_fields(&mut next, current.as_ref());
            if next.created_at.is_none() {
                next.created_at = restored.created_at;
            }
            let after = replace(&snapshot.scenarios, &next);
            Self::validate(&after).map_err(PolicyError::Invalid)?;
            next.version = next_version(&snapshot, id);
            next.updated_at = Some(micros_timestamp(now_micros()));
            let mut write = scenario_write(next, pb::ChangeCause::Rollback, actor, false);
            write.record.restored_version = to_version;
            let record = write.record.clone();
            match self
                .commit_writes(tenant, &snapshot, vec![write], true)
                .await
            {
                Ok(()) => return Ok((record.scenario.clone().unwrap_or_default(), record)),
                Err(PolicyError::Store(StoreError::Conflict)) => {}
                Err(e) => return Err(e),
            }
        }
        Err(PolicyError::Aborted(
            "the catalogue kept changing concurrently; retry".into(),
        ))
    }

    /// Pins or unpins a scenario. Pinning a pinned scenario (or unpinning an unpinned one)
    /// changes nothing.
    pub async fn set_pin(
        &self,
        tenant: &TenantId,
        id: &str,
        pinned: bool,
        actor: &Actor,
    ) -> Result<pb::Scenario, PolicyError> {
        check_text("reason", &actor.reason, MAX_PIN_REASON_CHARS)?;
        let result = self
            .change(
                tenant,
                id,
                |current| {
                    if current.pinned == pinned {
                        return Ok(None);
                    }
                    let mut next = current.clone();
                    next.pinned = pinned;
                    if pinned {
                        next.pinned_by.clone_from(&actor.id);
                        next.pinned_reason.clone_from(&actor.reason);
                    } else {
                        next.pinned_by.clear();
                        next.pinned_reason.clear();
                    }
                    Ok(Some((next, pb::ChangeCause::Manual, false, 0)))
                },
                actor,
            )
            .await?;
        match result {
            Some(s) => Ok(s),
            None => self.get(tenant, id).await,
        }
    }

    /// Applies `f` to the live scenario `id` and commits its result (retrying races).
    /// `f` returns the next state, the cause, whether it deletes, and a restored version.
    async fn change<F>(
        &self,
        tenant: &TenantId,
        id: &str,
        f: F,
        actor: &Actor,
    ) -> Result<Option<pb::Scenario>, PolicyError>
    where
        F: Fn(
            &pb::Scenario,
        ) -> Result<Option<(pb::Scenario, pb::ChangeCause, bool, i64)>, PolicyError>,
    {
        for _ in 0..ATTEMPTS {
            let snapshot = self.store.snapshot(tenant).await?;
            let current = snapshot
                .scenarios
                .iter()
                .find(|s| s.id == id)
                .ok_or_else(|| PolicyError::NotFound(format!("scenario {id:?} not found")))?;
            let Some((mut next, cause, deleted, _)) = f(current)? else {
                return Ok(None);
            };
            if deleted {
                let after: Vec<pb::Scenario> = snapshot
                    .scenarios
                    .iter()
                    .filter(|s| s.id != id)
                    .cloned()
                    .collect();
                Self::validate(&after).map_err(PolicyError::Invalid)?;
            }
            next.version = current.version + 1;
            next.updated_at = Some(micros_timestamp(now_micros()));
            let write = scenario_write(next.clone(), cause, actor, deleted);
            // Pinning keeps the rule states (a revert blocked by the pin is still due); a
            // deletion drops them.
            match self
                .commit_writes(tenant, &snapshot, vec![write], deleted)
                .await
            {
                Ok(()) => return Ok(Some(next)),
                Err(PolicyError::Store(StoreError::Conflict)) => {}
                Err(e) => return Err(e),
            }
        }
        Err(PolicyError::Aborted(
            "the catalogue kept changing concurrently; retry".into(),
        ))
    }

    /// Imports scenarios all or nothing.
    pub async fn import(
        &self,
        tenant: &TenantId,
        scenarios: Vec<pb::Scenario>,
        actor: &Actor,
        validate_only: bool,
    ) -> Result<Imported, PolicyError> {
        check_text("reason", &actor.reason, MAX_REASON_CHARS)?;
        for _ in 0..ATTEMPTS {
            let snapshot = self.store.snapshot(tenant).await?;
            let mut after = snapshot.scenarios.clone();
            let mut out = Imported::default();
            let mut writes = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let now = micros_timestamp(now_micros());
            let mut pending = Vec::new();
            for s in &scenarios {
                let current = snapshot.scenarios.iter().find(|c| c.id == s.id);
                let mut next = crate::document::strip_server_fields(s.clone());
                carry_server_fields(&mut next, current);
                if !seen.insert(next.id.clone()) {
                    // Duplicates are reported by the catalogue validation below.
                    after.push(next);
                    continue;
                }
                after = replace(&after, &next);
                pending.push((current.cloned(), next));
            }
            Self::validate(&after).map_err(PolicyError::Invalid)?;
            for (current, mut next) in pending {
                match &current {
                    Some(c) if same_content(c, &next) => {
                        out.unchanged += 1;
                        out.scenarios.push(c.clone());
                        continue;
                    }
                    Some(_) => out.updated += 1,
                    None => out.created += 1,
                }
                next.version = next_version(&snapshot, &next.id);
                next.updated_at = Some(now);
                if next.created_at.is_none() {
                    next.created_at = Some(now);
                }
                out.scenarios.push(next.clone());
                writes.push(scenario_write(next, pb::ChangeCause::Import, actor, false));
            }
            if validate_only || writes.is_empty() {
                return Ok(out);
            }
            match self.commit_writes(tenant, &snapshot, writes, true).await {
                Ok(()) => return Ok(out),
                Err(PolicyError::Store(StoreError::Conflict)) => {}
                Err(e) => return Err(e),
            }
        }
        Err(PolicyError::Aborted(
            "the catalogue kept changing concurrently; retry".into(),
        ))
    }

    /// Commits scenario writes. With `reset`, the written scenarios' rule states are deleted
    /// too: a person set their content, so running episodes must neither revert it later to a
    /// baseline from before nor keep a stale baseline for the next firing.
    async fn commit_writes(
        &self,
        tenant: &TenantId,
        snapshot: &Snapshot,
        writes: Vec<ScenarioWrite>,
        reset: bool,
    ) -> Result<(), PolicyError> {
        let events = writes.iter().map(|w| updated_event(tenant, w)).collect();
        let reset_rule_states = if reset {
            writes.iter().map(|w| w.scenario.id.clone()).collect()
        } else {
            Vec::new()
        };
        let batch = Batch {
            scenarios: writes,
            events,
            reset_rule_states,
            ..Batch::default()
        };
        self.store
            .commit(tenant, snapshot.catalogue_version, &batch)
            .await?;
        self.invalidate(tenant);
        self.outbox.wake();
        Ok(())
    }

    // ----- rules ---------------------------------------------------------------------------

    /// Creates or replaces an adjustment rule.
    pub async fn upsert_rule(
        &self,
        tenant: &TenantId,
        mut rule: pb::AdjustmentRule,
    ) -> Result<pb::AdjustmentRule, PolicyError> {
        validate_rule(&rule).map_err(PolicyError::Invalid)?;
        if !rule.scenario_id.is_empty()
            && !self
                .store
                .scenario_exists(tenant, &rule.scenario_id)
                .await?
        {
            return Err(PolicyError::NotFound(format!(
                "scenario {:?} not found",
                rule.scenario_id
            )));
        }
        let now = Some(micros_timestamp(now_micros()));
        if rule.id.is_empty() {
            rule.id = uuid::Uuid::now_v7().to_string();
            rule.created_at = now;
        } else {
            let existing = self.store.rule(tenant, &rule.id).await?;
            rule.created_at = existing.and_then(|r| r.created_at).or(now);
        }
        rule.updated_at = now;
        self.store.put_rule(tenant, &rule).await?;
        Ok(rule)
    }

    /// Feeds observed signal values and applies the rules they fire (or the reverts that
    /// resolutions bring), in one transaction with the inbox claim of the event that carried
    /// them. Values that are not finite are not stored; a resolution without a value still ends
    /// the episodes of the rules it concerns.
    pub async fn observe(
        &self,
        tenant: &TenantId,
        claim: Option<(String, String)>,
        observations: Vec<Observation>,
    ) -> Result<Committed, PolicyError> {
        self.observe_at(tenant, claim, observations, now_micros())
            .await
    }

    /// [`App::observe`] with the current time given (µs since the epoch), so windows, cooldowns
    /// and recoveries can be replayed.
    pub async fn observe_at(
        &self,
        tenant: &TenantId,
        claim: Option<(String, String)>,
        observations: Vec<Observation>,
        now: i64,
    ) -> Result<Committed, PolicyError> {
        for _ in 0..ATTEMPTS {
            let snapshot = self.store.snapshot(tenant).await?;
            let (cat, _) = Catalogue::build(snapshot.scenarios.clone());
            let mut batch = Batch {
                claim: claim.clone(),
                observations: observations
                    .iter()
                    .filter(|o| o.value.is_finite())
                    .cloned()
                    .collect(),
                ..Batch::default()
            };
            // Scenario states as changed so far within this batch.
            let mut working: HashMap<String, pb::Scenario> = HashMap::new();
            for o in &observations {
                let Some(entry) = cat.get(&o.scenario_id) else {
                    continue;
                };
                for rule in self
                    .store
                    .rules_for(tenant, &o.scenario_id, o.signal)
                    .await?
                {
                    let since = now - adjust::micros(rule.window.as_ref());
                    let mut agg = self
                        .store
                        .aggregate(tenant, &o.scenario_id, o.signal, since)
                        .await?;
                    // Include this batch's observations of the same series.
                    for extra in observations.iter().filter(|x| {
                        x.scenario_id == o.scenario_id
                            && x.signal == o.signal
                            && x.value.is_finite()
                    }) {
                        #[allow(clippy::cast_precision_loss)]
                        let n = agg.samples as f64;
                        agg.mean = (agg.mean * n + extra.value) / (n + 1.0);
                        agg.samples += 1;
                        if agg.latest.is_none_or(|(_, at)| extra.observed_at >= at) {
                            agg.latest = Some((extra.value, extra.observed_at));
                        }
                    }
                    let agg = adjust::value_of(o.signal, agg);
                    let state = self
                        .store
                        .rule_state(tenant, &rule.id, &o.scenario_id)
                        .await?;
                    let wire = working
                        .get(&o.scenario_id)
                        .cloned()
                        .unwrap_or_else(|| entry.wire.clone());
                    let compiled = scenario_to_engine(&wire, cat.defaults())
                        .unwrap_or_else(|_| entry.engine.clone());
                    let recovering_since = state.as_ref().and_then(|s| s.recovered_since);
                    // For a revert: its baseline and the value the rule wrote, to keep if the
                    // revert is blocked.
                    let mut reverting = None;
                    let step = if o.resolution {
                        let value = o.value.is_finite().then_some(o.value);
                        match adjust::resolve(&rule, state, value) {
                            Some(step) => step,
                            // Not in an episode, or still breaching: nothing to change.
                            None => continue,
                        }
                    } else {
                        adjust::evaluate(
                            &rule,
                            state,
                            &o.scenario_id,
                            agg,
                            now,
                            self.options.hysteresis_margin,
                        )
                    };
                    let why = if o.resolution {
                        "alert resolved"
                    } else {
                        "signal recovered"
                    };
                    let (mut change, mut state) = match step {
                        Step::Hold(state) => {
                            batch.rule_states.push(state);
                            continue;
                        }
                        Step::Fire(state) => (adjust::fire(&rule, &wire, &compiled), state),
                        Step::Revert(state, baseline, applied) => {
                            if applied
                                .as_deref()
                                .is_some_and(|a| !adjust::still_applied(&rule, a, &wire, &compiled))
                            {
                                // Changed since the rule wrote it (by another rule, or by a
                                // person racing this batch): the episode ends, the change stays.
                                batch.rule_states.push(state);
                                continue;
                            }
                            let change = adjust::revert(&rule, &baseline, &wire, &compiled, why);
                            reverting = Some((baseline, applied));
                            (change, state)
                        }
                    };
                    if change.unchanged {
                        // The scenario already holds the target: the episode starts (or ends)
                        // without an adjustment, a version or an event.
                        batch.rule_states.push(state);
                        continue;
                    }
                    let signal_name = pb::AdjustmentSignal::try_from(o.signal)
                        .map_or("unknown", |s| s.as_str_name());
                    change.record.metrics = HashMap::from([
                        ("samples".to_owned(), agg.samples as f64),
                        ("threshold".to_owned(), rule.threshold),
                    ]);
                    // A resolution reports its own value; one without a value reports none.
                    let value = if o.resolution { o.value } else { agg.mean };
                    if value.is_finite() {
                        change.record.metrics.insert(signal_name.to_owned(), value);
                    }
                    change.record.id = uuid::Uuid::now_v7().to_string();
                    change.record.from_version = wire.version;
                    change.record.created_at = Some(micros_timestamp(now));
                    let (apply, blocked) = gate(
                        &rule,
                        &wire,
                        &snapshot.scenarios,
                        &working,
                        &mut change.record,
                        change.next.take(),
                    );
                    if blocked && let Some((baseline, applied)) = reverting {
                        // The revert is still due: keep the episode and retry it on the next
                        // recovered observation.
                        state.firing = true;
                        state.recovered_since = Some(recovering_since.unwrap_or(now));
                        state.baseline = Some(baseline);
                        state.applied = applied;
                    }
                    if let Some(next) = apply {
                        if state.baseline.is_none() {
                            state.baseline = change.baseline.clone();
                        }
                        state.applied = change.applied.clone();
                        apply_adjustment(
                            &mut batch,
                            &mut working,
                            &rule,
                            &mut change.record,
                            next,
                            now,
                        );
                    }
                    batch.adjustments.push(change.record);
                    batch.rule_states.push(state);
                }
            }
            // Events for the final state of each changed scenario.
            batch.events = batch
                .scenarios
                .iter()
                .map(|w| updated_event(tenant, w))
                .collect::<Vec<RawEvent>>();
            match self
                .store
                .commit(tenant, snapshot.catalogue_version, &batch)
                .await
            {
                Ok(done) => {
                    if !batch.scenarios.is_empty() {
                        self.invalidate(tenant);
                        self.outbox.wake();
                    }
                    return Ok(done);
                }
                Err(StoreError::Conflict) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(PolicyError::Aborted(
            "the catalogue kept changing concurrently".into(),
        ))
    }

    /// Ends the episodes of rules whose signal has sent no report for their `silence_timeout`, in
    /// every tenant, reverting as a recovery does. Returns the number of adjustments recorded.
    /// A tenant that fails is logged and skipped until the next sweep.
    pub async fn sweep_silent(&self) -> Result<usize, PolicyError> {
        self.sweep_silent_at(now_micros()).await
    }

    /// [`App::sweep_silent`] with the current time given (µs since the epoch).
    pub async fn sweep_silent_at(&self, now: i64) -> Result<usize, PolicyError> {
        let mut recorded = 0;
        for tenant in self.store.tenants_in_episodes().await? {
            let Ok(tenant) = TenantId::new(tenant) else {
                continue;
            };
            match self.sweep_tenant_at(&tenant, now).await {
                Ok(n) => recorded += n,
                Err(e) => tracing::warn!(tenant = %tenant,
                    error = %tandem_platform::error::DisplayChain(&e),
                    "ending silent adjustment episodes failed"),
            }
        }
        Ok(recorded)
    }

    /// Ends the silent episodes of one tenant at `now` (µs since the epoch), in one transaction
    /// guarded by the catalogue version: replicas sweeping at the same time cannot both act on
    /// an episode, the loser re-reads the ended episode and does nothing. Each applied revert is
    /// a new scenario version and a `PolicyUpdated` event, as on recovery. A revert blocked by a
    /// pin (or by a catalogue that would not validate) keeps the episode, is recorded once, and
    /// is retried by every sweep. Returns the number of adjustments recorded.
    pub async fn sweep_tenant_at(&self, tenant: &TenantId, now: i64) -> Result<usize, PolicyError> {
        for _ in 0..ATTEMPTS {
            // The catalogue version is read before the rule states: states another sweep (or an
            // adjustment that changed a scenario) committed since come with a newer version, and
            // the commit below conflicts.
            let snapshot = self.store.snapshot(tenant).await?;
            let (cat, _) = Catalogue::build(snapshot.scenarios.clone());
            let mut batch = Batch {
                guard: true,
                ..Batch::default()
            };
            let mut working: HashMap<String, pb::Scenario> = HashMap::new();
            for state in self.store.firing_states(tenant).await? {
                let Some(rule) = self.store.rule(tenant, &state.rule_id).await? else {
                    continue;
                };
                let scoped = rule.scenario_id.is_empty() || rule.scenario_id == state.scenario_id;
                if !rule.enabled || !scoped {
                    continue;
                }
                let Some(entry) = cat.get(&state.scenario_id) else {
                    continue;
                };
                let last_report = self
                    .store
                    .last_observed(tenant, &state.scenario_id, rule.signal)
                    .await?;
                let (recovering_since, blocked_before) =
                    (state.recovered_since, state.silence_blocked_at);
                let Some((step, silent_for)) =
                    adjust::silence(&rule, Some(state), last_report, now)
                else {
                    continue;
                };
                let (mut state, baseline, applied) = match step {
                    Step::Revert(state, baseline, applied) => (state, baseline, applied),
                    // The rule does not revert (or has nothing to revert to): the episode ends.
                    Step::Hold(state) | Step::Fire(state) => {
                        batch.rule_states.push(state);
                        continue;
                    }
                };
                let wire = working
                    .get(&state.scenario_id)
                    .cloned()
                    .unwrap_or_else(|| entry.wire.clone());
                let compiled = scenario_to_engine(&wire, cat.defaults())
                    .unwrap_or_else(|_| entry.engine.clone());
                if applied
                    .as_deref()
                    .is_some_and(|a| !adjust::still_applied(&rule, a, &wire, &compiled))
                {
                    // Changed since the rule wrote it: the episode ends, the change stays.
                    batch.rule_states.push(state);
                    continue;
                }
                let silent_seconds = silent_for / 1_000_000;
                let why = format!("signal silent for {silent_seconds}s");
                let mut change = adjust::revert(&rule, &baseline, &wire, &compiled, &why);
                if change.unchanged {
                    batch.rule_states.push(state);
                    continue;
                }
                #[allow(clippy::cast_precision_loss)]
                let silent = silent_seconds as f64;
                change.record.metrics = HashMap::from([
                    ("silent_seconds".to_owned(), silent),
                    ("threshold".to_owned(), rule.threshold),
                ]);
                change.record.id = uuid::Uuid::now_v7().to_string();
                change.record.from_version = wire.version;
                change.record.created_at = Some(micros_timestamp(now));
                let (apply, blocked) = gate(
                    &rule,
                    &wire,
                    &snapshot.scenarios,
                    &working,
                    &mut change.record,
                    change.next.take(),
                );
                if blocked {
                    // The revert is still due: keep the episode and retry it on the next sweep
                    // (or on the signal's next recovered reading or resolution).
                    state.firing = true;
                    state.recovered_since = recovering_since;
                    state.baseline = Some(baseline);
                    state.applied = applied;
                    state.silence_blocked_at = Some(blocked_before.unwrap_or(now));
                    if blocked_before.is_none() {
                        batch.adjustments.push(change.record);
                        batch.rule_states.push(state);
                    }
                    continue;
                }
                if let Some(next) = apply {
                    apply_adjustment(
                        &mut batch,
                        &mut working,
                        &rule,
                        &mut change.record,
                        next,
                        now,
                    );
                }
                batch.adjustments.push(change.record);
                batch.rule_states.push(state);
            }
            if batch.rule_states.is_empty() {
                return Ok(0);
            }
            batch.events = batch
                .scenarios
                .iter()
                .map(|w| updated_event(tenant, w))
                .collect();
            match self
                .store
                .commit(tenant, snapshot.catalogue_version, &batch)
                .await
            {
                Ok(_) => {
                    if !batch.scenarios.is_empty() {
                        self.invalidate(tenant);
                        self.outbox.wake();
                    }
                    return Ok(batch.adjustments.len());
                }
                Err(StoreError::Conflict) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(PolicyError::Aborted(
            "the catalogue kept changing concurrently".into(),
        ))
    }

    /// Lists adjustments.
    pub async fn adjustments(
        &self,
        tenant: &TenantId,
        filter: &ListFilter,
    ) -> Result<Vec<pb::Adjustment>, PolicyError> {
        Ok(self.store.adjustments(tenant, filter).await?)
    }
}

/// Decides whether a proposed change (`proposed`) applies: not for a rule in shadow mode (recorded
/// as `SHADOW`), not to a pinned scenario (`BLOCKED_BY_PIN`), and not when the catalogue would no
/// longer validate (`BLOCKED_BY_GUARDRAIL`). Returns the scenario to write, if any, and whether
/// the change was blocked (so a revert stays due).
fn gate(
    rule: &pb::AdjustmentRule,
    wire: &pb::Scenario,
    stored: &[pb::Scenario],
    working: &HashMap<String, pb::Scenario>,
    record: &mut pb::Adjustment,
    proposed: Option<pb::Scenario>,
) -> (Option<pb::Scenario>, bool) {
    let Some(next) = proposed else {
        return (None, false);
    };
    if rule.mode == pb::Mode::Shadow as i32 {
        record.status = pb::AdjustmentStatus::Shadow as i32;
        return (None, false);
    }
    if wire.pinned {
        record.status = pb::AdjustmentStatus::BlockedByPin as i32;
        return (None, true);
    }
    if !still_validates(stored, working, &next, record) {
        return (None, true);
    }
    (Some(next), false)
}

/// Returns whether the catalogue as changed so far in an adjustment batch (`working` over
/// `stored`) still validates with `next`. Each value stays inside its own guardrails, but the
/// scenario as a whole (e.g. the clarify band not above the answer threshold) and the catalogue
/// must validate too: an invalid scenario would silently drop out of the decisions. When it does
/// not, `record` says why, as `BLOCKED_BY_GUARDRAIL`.
fn still_validates(
    stored: &[pb::Scenario],
    working: &HashMap<String, pb::Scenario>,
    next: &pb::Scenario,
    record: &mut pb::Adjustment,
) -> bool {
    let before = current_catalogue(stored, working);
    let problems = new_problems(&before, &replace(&before, next));
    if problems.is_empty() {
        return true;
    }
    record.status = pb::AdjustmentStatus::BlockedByGuardrail as i32;
    record.explanation = format!(
        "{}: not applied, the scenario would not validate: {}",
        record.explanation,
        render(&problems)
    );
    false
}

/// Adds an adjustment's new scenario version to `batch` (replacing an earlier change of the
/// same scenario in the batch) and to `working`, and sets the record's `to_version`. The version
/// record names the rule, its signal and the explanation, with the adjustment's metrics.
fn apply_adjustment(
    batch: &mut Batch,
    working: &mut HashMap<String, pb::Scenario>,
    rule: &pb::AdjustmentRule,
    record: &mut pb::Adjustment,
    mut next: pb::Scenario,
    now: i64,
) {
    let signal_name =
        pb::AdjustmentSignal::try_from(rule.signal).map_or("unknown", |s| s.as_str_name());
    next.version = record.from_version + 1;
    next.updated_at = Some(micros_timestamp(now));
    record.to_version = next.version;
    let reason = format!(
        "rule {:?} ({}): {}",
        if rule.name.is_empty() {
            &rule.id
        } else {
            &rule.name
        },
        signal_name,
        record.explanation
    );
    let actor = Actor {
        id: SYSTEM_ACTOR.into(),
        reason,
    };
    let mut write = scenario_write(next.clone(), pb::ChangeCause::Adjustment, &actor, false);
    write.record.metrics = record.metrics.clone();
    write.record.rule_id.clone_from(&rule.id);
    batch.scenarios.retain(|w| w.scenario.id != next.id);
    batch.scenarios.push(write);
    working.insert(next.id.clone(), next);
}

/// The catalogue as changed so far within an adjustment batch.
fn current_catalogue(
    stored: &[pb::Scenario],
    working: &HashMap<String, pb::Scenario>,
) -> Vec<pb::Scenario> {
    stored
        .iter()
        .map(|s| working.get(&s.id).unwrap_or(s).clone())
        .collect()
}

/// The validation problems of `after` that `before` does not have already, so a catalogue that
/// was invalid before for other reasons does not block every adjustment.
fn new_problems(before: &[pb::Scenario], after: &[pb::Scenario]) -> Vec<ValidationError> {
    let Err(found) = App::validate(after) else {
        return Vec::new();
    };
    let known = App::validate(before).err().unwrap_or_default();
    found.into_iter().filter(|e| !known.contains(e)).collect()
}

/// Replaces (or appends) `next` in a catalogue by id.
fn replace(scenarios: &[pb::Scenario], next: &pb::Scenario) -> Vec<pb::Scenario> {
    let mut out: Vec<pb::Scenario> = scenarios
        .iter()
        .filter(|s| s.id != next.id)
        .cloned()
        .collect();
    out.push(next.clone());
    out
}

/// Keeps the server-owned fields of the current state (pin, creation time).
fn carry_server_fields(next: &mut pb::Scenario, current: Option<&pb::Scenario>) {
    if let Some(c) = current {
        next.pinned = c.pinned;
        next.pinned_by.clone_from(&c.pinned_by);
        next.pinned_reason.clone_from(&c.pinned_reason);
        next.created_at = c.created_at;
        next.version = c.version;
    }
}

/// Compares what a person controls, ignoring version and timestamps.
fn same_content(a: &pb::Scenario, b: &pb::Scenario) -> bool {
    let strip = |s: &pb::Scenario| {
        let mut s = s.clone();
        s.version = 0;
        s.created_at = None;
        s.updated_at = None;
        s
    };
    strip(a) == strip(b)
}

/// The next version number of a scenario: after its live or deleted history.
fn next_version(snapshot: &Snapshot, id: &str) -> i64 {
    let live = snapshot
        .scenarios
        .iter()
        .find(|s| s.id == id)
        .map(|s| s.version);
    let deleted = snapshot
        .deleted
        .iter()
        .find(|(d, _)| d == id)
        .map(|(_, v)| *v);
    live.or(deleted).unwrap_or(0) + 1
}

fn scenario_write(
    scenario: pb::Scenario,
    cause: pb::ChangeCause,
    actor: &Actor,
    deleted: bool,
) -> ScenarioWrite {
    let record = pb::PolicyVersion {
        scenario_id: scenario.id.clone(),
        version: scenario.version,
        reason: actor.reason.clone(),
        cause: cause as i32,
        metrics: HashMap::new(),
        actor: actor.id.clone(),
        rule_id: String::new(),
        restored_version: 0,
        scenario: Some(scenario.clone()),
        created_at: scenario.updated_at,
    };
    ScenarioWrite {
        scenario,
        deleted,
        record,
    }
}

fn updated_event(tenant: &TenantId, w: &ScenarioWrite) -> RawEvent {
    let event = pb::PolicyUpdated {
        scenario_id: w.scenario.id.clone(),
        version: w.scenario.version,
        scenario: Some(w.scenario.clone()),
        cause: w.record.cause,
        reason: w.record.reason.clone(),
        actor: w.record.actor.clone(),
        deleted: w.deleted,
        occurred_at: w.scenario.updated_at,
    };
    RawEvent::new(tenant, &event, Some(w.scenario.id.clone()))
}

/// Checks an adjustment rule, reporting every problem.
pub fn validate_rule(rule: &pb::AdjustmentRule) -> Result<(), Vec<ValidationError>> {
    let mut e = Vec::new();
    let text = |e: &mut Vec<ValidationError>, path: &str, v: &str, max: usize| {
        if v.chars().count() > max {
            e.push(violation(path, format!("has more than {max} characters")));
        }
        if v.chars().any(char::is_control) {
            e.push(violation(path, "contains control characters"));
        }
    };
    text(&mut e, "rule.id", &rule.id, 64);
    text(&mut e, "rule.scenario_id", &rule.scenario_id, 64);
    text(&mut e, "rule.name", &rule.name, 100);
    text(&mut e, "rule.description", &rule.description, 1_000);
    let signal =
        pb::AdjustmentSignal::try_from(rule.signal).unwrap_or(pb::AdjustmentSignal::Unspecified);
    if signal == pb::AdjustmentSignal::Unspecified {
        e.push(violation(
            "rule.signal",
            format!("unknown signal {}", rule.signal),
        ));
    }
    if !matches!(
        pb::Comparison::try_from(rule.comparison),
        Ok(pb::Comparison::Above | pb::Comparison::Below)
    ) {
        e.push(violation(
            "rule.comparison",
            "must be COMPARISON_ABOVE or COMPARISON_BELOW",
        ));
    }
    let ratio = matches!(
        signal,
        pb::AdjustmentSignal::BotCsat
            | pb::AdjustmentSignal::HandoffRate
            | pb::AdjustmentSignal::ReopenRate
            | pb::AdjustmentSignal::ContainmentRate
    );
    if !rule.threshold.is_finite()
        || (ratio && !(0.0..=1.0).contains(&rule.threshold))
        || (!ratio && rule.threshold < 0.0)
    {
        e.push(violation(
            "rule.threshold",
            format!(
                "is {}, outside the range of its signal ({})",
                rule.threshold,
                if ratio {
                    "0..=1"
                } else {
                    "seconds, at least 0"
                }
            ),
        ));
    }
    let window = adjust::micros(rule.window.as_ref());
    if !(60_000_000..=7 * 86_400_000_000).contains(&window) {
        e.push(violation(
            "rule.window",
            "must be between 1 minute and 7 days",
        ));
    }
    let cooldown = adjust::micros(rule.cooldown.as_ref());
    if !(0..=7 * 86_400_000_000).contains(&cooldown) {
        e.push(violation("rule.cooldown", "must be between 0 and 7 days"));
    }
    let silence = adjust::micros(rule.silence_timeout.as_ref());
    if silence != 0 {
        if !(60_000_000..=7 * 86_400_000_000).contains(&silence) {
            e.push(violation(
                "rule.silence_timeout",
                "must be unset or 0 (never), or between 1 minute and 7 days",
            ));
        } else if silence < window {
            e.push(violation(
                "rule.silence_timeout",
                "must be at least the rule's window",
            ));
        }
    }
    if rule.min_samples < 0 {
        e.push(violation("rule.min_samples", "must not be negative"));
    }
    match &rule.effect {
        None => e.push(violation(
            "rule.effect",
            "is missing: set `step` or `set_strategy`",
        )),
        Some(pb::adjustment_rule::Effect::Step(step)) => {
            if matches!(
                pb::ThresholdField::try_from(step.field),
                Err(_) | Ok(pb::ThresholdField::Unspecified)
            ) {
                e.push(violation(
                    "rule.step.field",
                    format!("unknown threshold {}", step.field),
                ));
            }
            if !step.delta.is_finite() || step.delta == 0.0 {
                e.push(violation(
                    "rule.step.delta",
                    "must be a finite, non-zero number",
                ));
            }
        }
        Some(pb::adjustment_rule::Effect::SetStrategy(s)) => {
            if tandem_policy_client::strategy_from_wire(*s).is_none() {
                e.push(violation(
                    "rule.set_strategy",
                    format!("unknown strategy {s}"),
                ));
            }
        }
    }
    if !matches!(
        pb::Mode::try_from(rule.mode),
        Ok(pb::Mode::Unspecified | pb::Mode::Live | pb::Mode::Shadow)
    ) {
        e.push(violation(
            "rule.mode",
            format!("unknown mode {}", rule.mode),
        ));
    }
    if e.is_empty() { Ok(()) } else { Err(e) }
}
