//! Persistence of the policy service on PostgreSQL or SQLite.
//!
//! Every catalogue change goes through [`Store::commit`]: one transaction that checks and bumps
//! the tenant's catalogue version (optimistic concurrency for the whole catalogue), writes the
//! scenarios, their version records, adjustments, rule states, observations and the outbox
//! events, and claims the inbox entry of the event that caused it, if any. Nothing is half
//! written: a conflict or an error rolls everything back.
//!
//! The SQL is written once and expanded for each engine by the `on_db!` and `in_tx!` macros;
//! placeholders are `$n` in order of first appearance, which both engines accept.

use prost::Message as _;
use sqlx::Row as _;
use tandem_platform::bus::RawEvent;
use tandem_platform::db::Db;
pub use tandem_platform::db::{micros_timestamp, now_micros, timestamp_micros};
use tandem_platform::{in_tx, on_db};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::policy::v1 as pb;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The tenant's catalogue changed since it was read.
    #[error("the catalogue changed concurrently")]
    Conflict,
    /// A stored body does not decode.
    #[error("stored {0} does not decode")]
    Corrupt(&'static str, #[source] prost::DecodeError),
    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
}

/// The current scenarios of a tenant and the catalogue version they were read at.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Catalogue version; pass it back to [`Store::commit`].
    pub catalogue_version: i64,
    /// Live (not deleted) scenarios, ordered by id.
    pub scenarios: Vec<pb::Scenario>,
    /// Versions of deleted scenarios, so a re-creation continues the numbering.
    pub deleted: Vec<(String, i64)>,
}

/// A scenario's new state to write.
#[derive(Debug, Clone)]
pub struct ScenarioWrite {
    /// The scenario with its new version.
    pub scenario: pb::Scenario,
    /// True when this write deletes it.
    pub deleted: bool,
    /// The version record.
    pub record: pb::PolicyVersion,
}

/// The hysteresis state of one rule for one scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleState {
    /// Rule.
    pub rule_id: String,
    /// Scenario.
    pub scenario_id: String,
    /// Whether the rule's condition held at its last firing and has not recovered since.
    pub firing: bool,
    /// When it last fired (µs since the epoch).
    pub last_fired_at: Option<i64>,
    /// Since when the signal has been in recovery (µs), while firing.
    pub recovered_since: Option<i64>,
    /// The value (or strategy number) before the first firing of the current episode, as text.
    pub baseline: Option<String>,
    /// The value (or strategy number) this rule last wrote in the current episode, in the format
    /// of `baseline`. A revert only happens while the scenario still holds it, so a change made
    /// since by a person or another rule is not overwritten. `None` for states written before
    /// this was recorded.
    pub applied: Option<String>,
    /// When the silence sweep found the signal silent for the rule's `silence_timeout` and could
    /// not apply the revert then due (a pinned scenario, or a revert that would not validate),
    /// µs since the epoch. The block is recorded once; later sweeps retry the revert without
    /// recording it again. Cleared when the signal reports again or the episode ends.
    pub silence_blocked_at: Option<i64>,
}

/// One observed value of a signal.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Scenario.
    pub scenario_id: String,
    /// `AdjustmentSignal` number.
    pub signal: i32,
    /// Value.
    pub value: f64,
    /// When (µs since the epoch).
    pub observed_at: i64,
    /// True when the value comes with the resolution of the analytics alert that reported the
    /// signal (`AlertResolved`): besides being a reading, it ends the episodes of the rules on
    /// the signal (see [`crate::adjust::resolve`]). Its value may be NaN when the alert resolved
    /// without a measurement; such a value is not stored.
    pub resolution: bool,
}

/// Everything one catalogue change writes.
#[derive(Debug, Default)]
pub struct Batch {
    /// Scenario writes.
    pub scenarios: Vec<ScenarioWrite>,
    /// Adjustment records.
    pub adjustments: Vec<pb::Adjustment>,
    /// Rule states to upsert.
    pub rule_states: Vec<RuleState>,
    /// Scenarios whose rule states are deleted first (a person replaced their content, so the
    /// episodes of the rules and their baselines no longer apply).
    pub reset_rule_states: Vec<String>,
    /// Observations to record.
    pub observations: Vec<Observation>,
    /// Events for the outbox.
    pub events: Vec<RawEvent>,
    /// `(consumer, event id)` to claim in the inbox; the batch is skipped when already claimed.
    pub claim: Option<(String, String)>,
    /// Checks and bumps the catalogue version even without scenario writes, so two writers that
    /// read the same rule states cannot both act on them (the silence sweep, which every replica
    /// runs and no inbox claim deduplicates).
    pub guard: bool,
}

impl Batch {
    /// Returns whether the batch changes the catalogue (and so needs the version check).
    fn touches_catalogue(&self) -> bool {
        self.guard || !self.scenarios.is_empty()
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Written.
    Applied,
    /// The claimed event had been handled already; nothing was written.
    Duplicate,
}

/// Aggregate of a signal over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregate {
    /// Mean value.
    pub mean: f64,
    /// Number of observations.
    pub samples: i64,
    /// The newest observation and its time (µs), if any.
    pub latest: Option<(f64, i64)>,
}

/// Reads a rule state from a row of `rule_id, scenario_id, firing, last_fired_at,
/// recovered_since, baseline, applied, silence_blocked_at`.
fn rule_state_of<R>(r: &R) -> Result<RuleState, sqlx::Error>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> bool: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(RuleState {
        rule_id: r.try_get(0)?,
        scenario_id: r.try_get(1)?,
        firing: r.try_get(2)?,
        last_fired_at: r.try_get(3)?,
        recovered_since: r.try_get(4)?,
        baseline: r.try_get(5)?,
        applied: r.try_get(6)?,
        silence_blocked_at: r.try_get(7)?,
    })
}

fn decode<M: prost::Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Corrupt(what, e))
}

/// The policy service's repository.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
}

impl Store {
    /// Wraps a migrated database.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// Returns the database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Reads a tenant's scenarios and catalogue version.
    pub async fn snapshot(&self, tenant: &TenantId) -> Result<Snapshot, StoreError> {
        let t = tenant.as_str();
        let (version, rows) = on_db!(&self.db, pool => {
            let version: Option<i64> = sqlx::query_scalar(
                "SELECT catalogue_version FROM policy_tenants WHERE tenant = $1",
            )
            .bind(t)
            .fetch_optional(pool)
            .await?;
            let rows = sqlx::query(
                "SELECT scenario_id, version, deleted, body FROM policy_scenarios \
                 WHERE tenant = $1 ORDER BY scenario_id",
            )
            .bind(t)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|r| -> Result<(String, i64, bool, Vec<u8>), sqlx::Error> {
                Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?))
            })
            .collect::<Result<Vec<_>, _>>()?;
            (version, rows)
        });
        let mut snapshot = Snapshot {
            catalogue_version: version.unwrap_or(0),
            ..Snapshot::default()
        };
        for (id, version, deleted, body) in rows {
            if deleted {
                snapshot.deleted.push((id, version));
            } else {
                snapshot.scenarios.push(decode("scenario", &body)?);
            }
        }
        Ok(snapshot)
    }

    /// Applies a batch atomically. Fails with [`StoreError::Conflict`] when the batch changes
    /// scenarios and the catalogue version is no longer `expected_catalogue_version`.
    pub async fn commit(
        &self,
        tenant: &TenantId,
        expected_catalogue_version: i64,
        batch: &Batch,
    ) -> Result<Committed, StoreError> {
        let t = tenant.as_str();
        let now = now_micros();
        in_tx!(&self.db, tx, enqueue, claim => {
            if let Some((consumer, event_id)) = &batch.claim
                && !claim(&mut tx, consumer, event_id).await?
            {
                return Ok(Committed::Duplicate);
            }
            if batch.touches_catalogue() {
                sqlx::query(
                    "INSERT INTO policy_tenants (tenant, catalogue_version) VALUES ($1, 0) \
                     ON CONFLICT (tenant) DO NOTHING",
                )
                .bind(t)
                .execute(&mut *tx)
                .await?;
                let bumped = sqlx::query(
                    "UPDATE policy_tenants SET catalogue_version = catalogue_version + 1 \
                     WHERE tenant = $1 AND catalogue_version = $2",
                )
                .bind(t)
                .bind(expected_catalogue_version)
                .execute(&mut *tx)
                .await?;
                if bumped.rows_affected() != 1 {
                    return Err(StoreError::Conflict);
                }
            }
            for w in &batch.scenarios {
                let s = &w.scenario;
                sqlx::query(
                    "INSERT INTO policy_scenarios \
                     (tenant, scenario_id, version, deleted, tier, strategy, body, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (tenant, scenario_id) DO UPDATE SET version = excluded.version, \
                     deleted = excluded.deleted, tier = excluded.tier, \
                     strategy = excluded.strategy, body = excluded.body, \
                     updated_at = excluded.updated_at",
                )
                .bind(t)
                .bind(&s.id)
                .bind(s.version)
                .bind(w.deleted)
                .bind(s.tier)
                .bind(s.strategy)
                .bind(s.encode_to_vec())
                .bind(now)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO policy_versions \
                     (tenant, scenario_id, version, cause, body, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(t)
                .bind(&s.id)
                .bind(s.version)
                .bind(w.record.cause)
                .bind(w.record.encode_to_vec())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            for a in &batch.adjustments {
                sqlx::query(
                    "INSERT INTO policy_adjustments (tenant, id, scenario_id, created_at, body) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(t)
                .bind(&a.id)
                .bind(&a.scenario_id)
                // The record's own time: list cursors are built from it.
                .bind(a.created_at.as_ref().map_or(now, timestamp_micros))
                .bind(a.encode_to_vec())
                .execute(&mut *tx)
                .await?;
            }
            for scenario_id in &batch.reset_rule_states {
                sqlx::query("DELETE FROM policy_rule_states WHERE tenant = $1 AND scenario_id = $2")
                    .bind(t)
                    .bind(scenario_id)
                    .execute(&mut *tx)
                    .await?;
            }
            for r in &batch.rule_states {
                sqlx::query(
                    "INSERT INTO policy_rule_states \
                     (tenant, rule_id, scenario_id, firing, last_fired_at, recovered_since, \
                     baseline, applied, silence_blocked_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                     ON CONFLICT (tenant, rule_id, scenario_id) DO UPDATE SET \
                     firing = excluded.firing, last_fired_at = excluded.last_fired_at, \
                     recovered_since = excluded.recovered_since, baseline = excluded.baseline, \
                     applied = excluded.applied, silence_blocked_at = excluded.silence_blocked_at",
                )
                .bind(t)
                .bind(&r.rule_id)
                .bind(&r.scenario_id)
                .bind(r.firing)
                .bind(r.last_fired_at)
                .bind(r.recovered_since)
                .bind(&r.baseline)
                .bind(&r.applied)
                .bind(r.silence_blocked_at)
                .execute(&mut *tx)
                .await?;
            }
            for o in &batch.observations {
                sqlx::query(
                    "INSERT INTO policy_observations \
                     (tenant, scenario_id, signal, value, observed_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(t)
                .bind(&o.scenario_id)
                .bind(o.signal)
                .bind(o.value)
                .bind(o.observed_at)
                .execute(&mut *tx)
                .await?;
            }
            enqueue(&mut tx, &batch.events).await?;
            Committed::Applied
        });
        Ok(Committed::Applied)
    }

    /// Returns one version record of a scenario.
    pub async fn version(
        &self,
        tenant: &TenantId,
        scenario_id: &str,
        version: i64,
    ) -> Result<Option<pb::PolicyVersion>, StoreError> {
        let body: Option<Vec<u8>> = on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT body FROM policy_versions \
                 WHERE tenant = $1 AND scenario_id = $2 AND version = $3",
            )
            .bind(tenant.as_str())
            .bind(scenario_id)
            .bind(version)
            .fetch_optional(pool)
            .await?
        });
        body.map(|b| decode("version", &b)).transpose()
    }

    /// Lists version records newest first, starting below `before` (exclusive) when given.
    pub async fn versions(
        &self,
        tenant: &TenantId,
        scenario_id: &str,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<pb::PolicyVersion>, StoreError> {
        let bodies: Vec<Vec<u8>> = on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT body FROM policy_versions \
                 WHERE tenant = $1 AND scenario_id = $2 AND version < $3 \
                 ORDER BY version DESC LIMIT $4",
            )
            .bind(tenant.as_str())
            .bind(scenario_id)
            .bind(before.unwrap_or(i64::MAX))
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        bodies.iter().map(|b| decode("version", b)).collect()
    }

    /// Returns whether a scenario has any history (live or deleted).
    pub async fn scenario_exists(
        &self,
        tenant: &TenantId,
        scenario_id: &str,
    ) -> Result<bool, StoreError> {
        let found: Option<i64> = on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT version FROM policy_scenarios WHERE tenant = $1 AND scenario_id = $2",
            )
            .bind(tenant.as_str())
            .bind(scenario_id)
            .fetch_optional(pool)
            .await?
        });
        Ok(found.is_some())
    }

    /// Creates or replaces an adjustment rule.
    pub async fn put_rule(
        &self,
        tenant: &TenantId,
        rule: &pb::AdjustmentRule,
    ) -> Result<(), StoreError> {
        on_db!(&self.db, pool => {
            sqlx::query(
                "INSERT INTO policy_rules (tenant, rule_id, scenario_id, signal, enabled, body) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, rule_id) DO UPDATE SET \
                 scenario_id = excluded.scenario_id, signal = excluded.signal, \
                 enabled = excluded.enabled, body = excluded.body",
            )
            .bind(tenant.as_str())
            .bind(&rule.id)
            .bind(&rule.scenario_id)
            .bind(rule.signal)
            .bind(rule.enabled)
            .bind(rule.encode_to_vec())
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Returns one rule.
    pub async fn rule(
        &self,
        tenant: &TenantId,
        rule_id: &str,
    ) -> Result<Option<pb::AdjustmentRule>, StoreError> {
        let body: Option<Vec<u8>> = on_db!(&self.db, pool => {
            sqlx::query_scalar("SELECT body FROM policy_rules WHERE tenant = $1 AND rule_id = $2")
                .bind(tenant.as_str())
                .bind(rule_id)
                .fetch_optional(pool)
                .await?
        });
        body.map(|b| decode("rule", &b)).transpose()
    }

    /// Lists rules ordered by id, after `after` (exclusive); `scenario_id` keeps the rules of
    /// that scenario and those for every scenario.
    pub async fn rules(
        &self,
        tenant: &TenantId,
        scenario_id: Option<&str>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<pb::AdjustmentRule>, StoreError> {
        let bodies: Vec<Vec<u8>> = on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT body FROM policy_rules WHERE tenant = $1 AND rule_id > $2 \
                 AND ($3 = '' OR scenario_id = '' OR scenario_id = $3) \
                 ORDER BY rule_id LIMIT $4",
            )
            .bind(tenant.as_str())
            .bind(after)
            .bind(scenario_id.unwrap_or(""))
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        bodies.iter().map(|b| decode("rule", b)).collect()
    }

    /// Returns the enabled rules watching `signal` for `scenario_id` (own or global).
    pub async fn rules_for(
        &self,
        tenant: &TenantId,
        scenario_id: &str,
        signal: i32,
    ) -> Result<Vec<pb::AdjustmentRule>, StoreError> {
        let bodies: Vec<Vec<u8>> = on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT body FROM policy_rules WHERE tenant = $1 AND signal = $2 \
                 AND enabled = $3 AND (scenario_id = '' OR scenario_id = $4) ORDER BY rule_id",
            )
            .bind(tenant.as_str())
            .bind(signal)
            .bind(true)
            .bind(scenario_id)
            .fetch_all(pool)
            .await?
        });
        bodies.iter().map(|b| decode("rule", b)).collect()
    }

    /// Returns a rule's state for a scenario.
    pub async fn rule_state(
        &self,
        tenant: &TenantId,
        rule_id: &str,
        scenario_id: &str,
    ) -> Result<Option<RuleState>, StoreError> {
        let row = on_db!(&self.db, pool => {
            sqlx::query(
                "SELECT rule_id, scenario_id, firing, last_fired_at, recovered_since, baseline, \
                 applied, silence_blocked_at FROM policy_rule_states \
                 WHERE tenant = $1 AND rule_id = $2 AND scenario_id = $3",
            )
            .bind(tenant.as_str())
            .bind(rule_id)
            .bind(scenario_id)
            .fetch_optional(pool)
            .await?
            .map(|r| rule_state_of(&r))
            .transpose()?
        });
        Ok(row)
    }

    /// Returns the rule states of a tenant that are in an episode, ordered by rule and scenario.
    pub async fn firing_states(&self, tenant: &TenantId) -> Result<Vec<RuleState>, StoreError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query(
                "SELECT rule_id, scenario_id, firing, last_fired_at, recovered_since, baseline, \
                 applied, silence_blocked_at FROM policy_rule_states \
                 WHERE tenant = $1 AND firing = $2 ORDER BY rule_id, scenario_id",
            )
            .bind(tenant.as_str())
            .bind(true)
            .fetch_all(pool)
            .await?
            .iter()
            .map(rule_state_of)
            .collect::<Result<Vec<_>, _>>()?
        }))
    }

    /// Returns the tenants with a rule in an episode, ordered.
    pub async fn tenants_in_episodes(&self) -> Result<Vec<String>, StoreError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT DISTINCT tenant FROM policy_rule_states WHERE firing = $1 ORDER BY tenant",
            )
            .bind(true)
            .fetch_all(pool)
            .await?
        }))
    }

    /// Returns the time (µs) of the newest stored observation of a signal for a scenario.
    pub async fn last_observed(
        &self,
        tenant: &TenantId,
        scenario_id: &str,
        signal: i32,
    ) -> Result<Option<i64>, StoreError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT MAX(observed_at) FROM policy_observations \
                 WHERE tenant = $1 AND scenario_id = $2 AND signal = $3",
            )
            .bind(tenant.as_str())
            .bind(scenario_id)
            .bind(signal)
            .fetch_one(pool)
            .await?
        }))
    }

    /// Aggregates a signal's observations since `since` (µs), plus `extra` not yet stored.
    pub async fn aggregate(
        &self,
        tenant: &TenantId,
        scenario_id: &str,
        signal: i32,
        since: i64,
    ) -> Result<Aggregate, StoreError> {
        let (sum, samples): (Option<f64>, i64) = on_db!(&self.db, pool => {
            let row = sqlx::query(
                "SELECT SUM(value), COUNT(*) FROM policy_observations \
                 WHERE tenant = $1 AND scenario_id = $2 AND signal = $3 AND observed_at >= $4",
            )
            .bind(tenant.as_str())
            .bind(scenario_id)
            .bind(signal)
            .bind(since)
            .fetch_one(pool)
            .await?;
            (row.try_get(0)?, row.try_get(1)?)
        });
        let latest: Option<(f64, i64)> = on_db!(&self.db, pool => {
            sqlx::query(
                "SELECT value, observed_at FROM policy_observations \
                 WHERE tenant = $1 AND scenario_id = $2 AND signal = $3 AND observed_at >= $4 \
                 ORDER BY observed_at DESC LIMIT 1",
            )
            .bind(tenant.as_str())
            .bind(scenario_id)
            .bind(signal)
            .bind(since)
            .fetch_optional(pool)
            .await?
            .map(|r| -> Result<(f64, i64), sqlx::Error> { Ok((r.try_get(0)?, r.try_get(1)?)) })
            .transpose()?
        });
        let mean = if samples > 0 {
            #[allow(clippy::cast_precision_loss)]
            let n = samples as f64;
            sum.unwrap_or(0.0) / n
        } else {
            0.0
        };
        Ok(Aggregate {
            mean,
            samples,
            latest,
        })
    }

    /// Deletes observations older than `before` (µs).
    pub async fn prune_observations(&self, before: i64) -> Result<u64, StoreError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query("DELETE FROM policy_observations WHERE observed_at < $1")
                .bind(before)
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }

    /// Deletes adjustment records created before `before` (µs), of every tenant. They are a
    /// history only: what a running episode needs to revert (its baseline and the value it
    /// wrote) is in its rule state, and each applied change also has its scenario version.
    pub async fn prune_adjustments(&self, before: i64) -> Result<u64, StoreError> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query("DELETE FROM policy_adjustments WHERE created_at < $1")
                .bind(before)
                .execute(pool)
                .await?
                .rows_affected()
        }))
    }

    /// Lists adjustments newest first, filtered by scenario and time, after a keyset cursor.
    pub async fn adjustments(
        &self,
        tenant: &TenantId,
        filter: &ListFilter,
    ) -> Result<Vec<pb::Adjustment>, StoreError> {
        let bodies: Vec<Vec<u8>> = on_db!(&self.db, pool => {
            sqlx::query_scalar(
                "SELECT body FROM policy_adjustments WHERE tenant = $1 \
                 AND ($2 = '' OR scenario_id = $2) AND created_at >= $3 AND created_at < $4 \
                 AND (created_at < $5 OR (created_at = $5 AND id < $6)) \
                 ORDER BY created_at DESC, id DESC LIMIT $7",
            )
            .bind(tenant.as_str())
            .bind(&filter.scenario_id)
            .bind(filter.start)
            .bind(filter.end)
            .bind(filter.cursor.0)
            .bind(&filter.cursor.1)
            .bind(filter.limit)
            .fetch_all(pool)
            .await?
        });
        bodies.iter().map(|b| decode("adjustment", b)).collect()
    }

    /// Records shadow decisions.
    pub async fn put_shadow_decisions(
        &self,
        tenant: &TenantId,
        records: &[pb::ShadowDecisionRecord],
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        on_db!(&self.db, pool => {
            let mut tx = pool.begin().await?;
            for r in records {
                let at = r.decided_at.as_ref().map_or(0, timestamp_micros);
                sqlx::query(
                    "INSERT INTO policy_shadow_decisions \
                     (tenant, id, scenario_id, diverged, decided_at, body) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, id) DO NOTHING",
                )
                .bind(tenant.as_str())
                .bind(&r.id)
                .bind(&r.scenario_id)
                .bind(r.diverged)
                .bind(at)
                .bind(r.encode_to_vec())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Lists shadow decisions newest first and the divergence rate over the whole filtered range.
    pub async fn shadow_decisions(
        &self,
        tenant: &TenantId,
        filter: &ListFilter,
        only_diverged: bool,
    ) -> Result<(Vec<pb::ShadowDecisionRecord>, f64), StoreError> {
        let (bodies, total, diverged): (Vec<Vec<u8>>, i64, Option<i64>) = on_db!(&self.db, pool => {
            let bodies = sqlx::query_scalar(
                "SELECT body FROM policy_shadow_decisions WHERE tenant = $1 \
                 AND ($2 = '' OR scenario_id = $2) AND decided_at >= $3 AND decided_at < $4 \
                 AND (decided_at < $5 OR (decided_at = $5 AND id < $6)) \
                 AND (diverged = $7 OR $8) \
                 ORDER BY decided_at DESC, id DESC LIMIT $9",
            )
            .bind(tenant.as_str())
            .bind(&filter.scenario_id)
            .bind(filter.start)
            .bind(filter.end)
            .bind(filter.cursor.0)
            .bind(&filter.cursor.1)
            .bind(true)
            .bind(!only_diverged)
            .bind(filter.limit)
            .fetch_all(pool)
            .await?;
            let row = sqlx::query(
                "SELECT COUNT(*), SUM(CASE WHEN diverged THEN 1 ELSE 0 END) \
                 FROM policy_shadow_decisions WHERE tenant = $1 \
                 AND ($2 = '' OR scenario_id = $2) AND decided_at >= $3 AND decided_at < $4",
            )
            .bind(tenant.as_str())
            .bind(&filter.scenario_id)
            .bind(filter.start)
            .bind(filter.end)
            .fetch_one(pool)
            .await?;
            (bodies, row.try_get(0)?, row.try_get(1)?)
        });
        let records = bodies
            .iter()
            .map(|b| decode("shadow decision", b))
            .collect::<Result<Vec<_>, _>>()?;
        #[allow(clippy::cast_precision_loss)]
        let rate = if total > 0 {
            diverged.unwrap_or(0) as f64 / total as f64
        } else {
            0.0
        };
        Ok((records, rate))
    }
}

/// Filters and keyset cursor of a newest-first listing.
#[derive(Debug, Clone)]
pub struct ListFilter {
    /// Scenario, or empty for all.
    pub scenario_id: String,
    /// Inclusive start (µs).
    pub start: i64,
    /// Exclusive end (µs).
    pub end: i64,
    /// Continue strictly after `(time, id)` in newest-first order.
    pub cursor: (i64, String),
    /// Page size.
    pub limit: i64,
}
