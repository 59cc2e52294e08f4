//! Queues: definitions, the scenario → queue map and deletion.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tandem_proto::ids::TenantId;

use super::sql::{Sql, Tx, args, locking};
use super::{Store, from_json, json, micros, time};
use crate::domain::agent::SkillRequirement;
use crate::domain::queue::{
    BusinessHours, OutOfHours, OverflowStep, PriorityWeights, QueueSpec, Strategy,
};
use crate::error::{RoutingError, RoutingResult};

/// A stored queue.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueRecord {
    /// The definition.
    pub spec: QueueSpec,
    /// Creation.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// The stored JSON of everything but id and name.
#[derive(Serialize, Deserialize)]
struct Definition {
    scenario_ids: Vec<String>,
    required_skills: Vec<SkillRequirement>,
    weights: PriorityWeights,
    hours: BusinessHours,
    out_of_hours: OutOfHours,
    overflow: Vec<OverflowStep>,
    max_length: i32,
    #[serde(with = "humantime_serde")]
    offer_timeout: std::time::Duration,
    strategy: Strategy,
}

#[derive(sqlx::FromRow)]
struct QueueRow {
    id: String,
    name: String,
    definition: String,
    created_at: i64,
    updated_at: i64,
}

impl QueueRow {
    fn into_record(self) -> RoutingResult<QueueRecord> {
        let d: Definition = from_json("queue definition", &self.definition)?;
        Ok(QueueRecord {
            spec: QueueSpec {
                id: self.id,
                name: self.name,
                scenario_ids: d.scenario_ids,
                required_skills: d.required_skills,
                weights: d.weights,
                hours: d.hours,
                out_of_hours: d.out_of_hours,
                overflow: d.overflow,
                max_length: d.max_length,
                offer_timeout: d.offer_timeout,
                strategy: d.strategy,
            },
            created_at: time(self.created_at)?,
            updated_at: time(self.updated_at)?,
        })
    }
}

fn definition(spec: &QueueSpec) -> RoutingResult<String> {
    json(&Definition {
        scenario_ids: spec.scenario_ids.clone(),
        required_skills: spec.required_skills.clone(),
        weights: spec.weights,
        hours: spec.hours.clone(),
        out_of_hours: spec.out_of_hours,
        overflow: spec.overflow.clone(),
        max_length: spec.max_length,
        offer_timeout: spec.offer_timeout,
        strategy: spec.strategy,
    })
}

/// The statement reading one queue by (tenant `$1`, id `$2`).
macro_rules! queue_by_id {
    () => {
        "SELECT id, name, definition, created_at, updated_at FROM routing_queues \
         WHERE tenant = $1 AND id = $2"
    };
}

/// The statement reading the queue candidates of a handoff: the named queue (`$2`), the
/// scenario's (`$3`) and the default one (`$4`), whichever exist; the last column tells the
/// scenario's queue.
macro_rules! queue_candidates {
    () => {
        "SELECT q.id, q.name, q.definition, q.created_at, q.updated_at, \
         CAST(CASE WHEN EXISTS (SELECT 1 FROM routing_queue_scenarios s \
         WHERE s.tenant = q.tenant AND s.scenario_id = $3 AND s.queue_id = q.id) \
         THEN 1 ELSE 0 END AS BIGINT) \
         FROM routing_queues q WHERE q.tenant = $1 AND (q.id = $2 OR q.id = $4 OR q.id IN \
         (SELECT queue_id FROM routing_queue_scenarios WHERE tenant = $1 AND scenario_id = $3))"
    };
}

pub(crate) async fn load_queue(
    tx: &mut Tx,
    tenant: &TenantId,
    id: &str,
) -> RoutingResult<Option<QueueRecord>> {
    let row: Option<QueueRow> = tx
        .fetch_optional(queue_by_id!(), args![tenant.as_str(), id])
        .await?;
    row.map(QueueRow::into_record).transpose()
}

/// Loads a queue a ticket is about to enter and holds it there: on PostgreSQL the row is
/// locked `FOR KEY SHARE` until the transaction ends, so a concurrent [`Store::delete_queue`]
/// (which locks it `FOR UPDATE`) waits for the ticket and then sees it, or deletes first and
/// this finds no queue. Updates of the queue's definition do not wait. On SQLite the single
/// writer serialises them.
pub(crate) async fn hold_queue(
    tx: &mut Tx,
    tenant: &TenantId,
    id: &str,
) -> RoutingResult<Option<QueueRecord>> {
    let row: Option<QueueRow> = tx
        .fetch_optional(
            Sql::Each {
                pg: concat!(queue_by_id!(), " FOR KEY SHARE"),
                sqlite: queue_by_id!(),
            },
            args![tenant.as_str(), id],
        )
        .await?;
    row.map(QueueRow::into_record).transpose()
}

pub(crate) async fn all_queues(tx: &mut Tx) -> RoutingResult<Vec<(TenantId, QueueRecord)>> {
    let rows: Vec<(String, String, String, String, i64, i64)> = tx
        .fetch_all(
            "SELECT tenant, id, name, definition, created_at, updated_at FROM routing_queues \
             ORDER BY tenant, id",
            args![],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for (tenant, id, name, definition, created_at, updated_at) in rows {
        let Ok(tenant) = TenantId::new(tenant) else {
            continue;
        };
        let record = QueueRow {
            id,
            name,
            definition,
            created_at,
            updated_at,
        }
        .into_record()?;
        out.push((tenant, record));
    }
    Ok(out)
}

/// A queue row and whether the handoff's scenario is routed to it (1) or not (0).
type CandidateRow = (String, String, String, i64, i64, i64);

/// Finds the queue of a handoff: the one it names, else its scenario's, else the default queue,
/// which is created (always open, no skills) when it does not exist yet. The queue found is
/// held against deletion until the transaction ends (see [`hold_queue`]); a queue deleted while
/// this waited for it is passed over as if it did not exist.
pub(crate) async fn resolve_queue(
    tx: &mut Tx,
    tenant: &TenantId,
    named: &str,
    scenario_id: &str,
    default_queue: &str,
    now: DateTime<Utc>,
) -> RoutingResult<QueueRecord> {
    // The candidates in one statement, held against deletion on PostgreSQL. A candidate that a
    // delete holds is waited for; once deleted it is not returned.
    let rows: Vec<CandidateRow> = tx
        .fetch_all(
            Sql::Each {
                pg: concat!(queue_candidates!(), " FOR KEY SHARE OF q"),
                sqlite: queue_candidates!(),
            },
            args![tenant.as_str(), named, scenario_id, default_queue],
        )
        .await?;
    let pick = |wanted: &dyn Fn(&CandidateRow) -> bool| {
        rows.iter().find(|row| wanted(row)).map(|row| QueueRow {
            id: row.0.clone(),
            name: row.1.clone(),
            definition: row.2.clone(),
            created_at: row.3,
            updated_at: row.4,
        })
    };
    if !named.is_empty() {
        if let Some(row) = pick(&|row| row.0 == named) {
            return row.into_record();
        }
        tracing::warn!(
            queue = named,
            "handoff names an unknown queue, routing by scenario"
        );
    }
    if !scenario_id.is_empty()
        && let Some(row) = pick(&|row| row.5 != 0)
    {
        return row.into_record();
    }
    if let Some(row) = pick(&|row| row.0 == default_queue) {
        return row.into_record();
    }
    let spec = QueueSpec::open(default_queue);
    // Created, or found created by another transaction and held; a delete that wins the row
    // between the two statements leaves nothing to hold, and the queue is created again.
    for _ in 0..3 {
        tx.execute(
            "INSERT INTO routing_queues (tenant, id, name, definition, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT DO NOTHING",
            args![
                tenant.as_str(),
                spec.id.as_str(),
                spec.name.as_str(),
                definition(&spec)?,
                micros(now)
            ],
        )
        .await?;
        if let Some(queue) = hold_queue(tx, tenant, default_queue).await? {
            return Ok(queue);
        }
    }
    Err(RoutingError::Conflict(format!(
        "default queue {default_queue} deleted while a handoff entered it"
    )))
}

impl Store {
    /// Creates or replaces a queue; returns it and whether it is new. A scenario may be routed
    /// to one queue only.
    pub async fn upsert_queue(
        &self,
        tenant: &TenantId,
        spec: &QueueSpec,
        now: DateTime<Utc>,
    ) -> RoutingResult<(QueueRecord, bool)> {
        spec.validate()?;
        let mut tx = Tx::write(self.db()).await?;
        for scenario in &spec.scenario_ids {
            let owner: Option<(String,)> = tx
                .fetch_optional(
                    "SELECT queue_id FROM routing_queue_scenarios \
                     WHERE tenant = $1 AND scenario_id = $2 AND queue_id <> $3",
                    args![tenant.as_str(), scenario.as_str(), spec.id.as_str()],
                )
                .await?;
            if let Some((other,)) = owner {
                return Err(RoutingError::FailedPrecondition(format!(
                    "scenario {scenario} is already routed to queue {other}"
                )));
            }
        }
        let existed = load_queue(&mut tx, tenant, &spec.id).await?.is_some();
        tx.execute(
            "INSERT INTO routing_queues (tenant, id, name, definition, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (tenant, id) DO UPDATE \
             SET name = excluded.name, definition = excluded.definition, \
             updated_at = excluded.updated_at",
            args![
                tenant.as_str(),
                spec.id.as_str(),
                spec.name.as_str(),
                definition(spec)?,
                micros(now)
            ],
        )
        .await?;
        tx.execute(
            "DELETE FROM routing_queue_scenarios WHERE tenant = $1 AND queue_id = $2",
            args![tenant.as_str(), spec.id.as_str()],
        )
        .await?;
        for scenario in &spec.scenario_ids {
            tx.execute(
                "INSERT INTO routing_queue_scenarios (tenant, scenario_id, queue_id) VALUES ($1, $2, $3)",
                args![tenant.as_str(), scenario.as_str(), spec.id.as_str()],
            )
            .await?;
        }
        let record = load_queue(&mut tx, tenant, &spec.id)
            .await?
            .ok_or_else(|| RoutingError::Corrupt("upserted queue vanished".into()))?;
        tx.commit().await?;
        Ok((record, !existed))
    }

    /// Returns one queue.
    pub async fn queue(&self, tenant: &TenantId, id: &str) -> RoutingResult<QueueRecord> {
        let mut tx = Tx::reads(self.db()).await?;
        let queue = load_queue(&mut tx, tenant, id).await?;
        tx.commit().await?;
        queue.ok_or_else(|| RoutingError::NotFound(format!("queue {id} not found")))
    }

    /// Lists queues ordered by id after `after`; returns whether more follow.
    pub async fn list_queues(
        &self,
        tenant: &TenantId,
        after: &str,
        limit: usize,
    ) -> RoutingResult<(Vec<QueueRecord>, bool)> {
        let mut tx = Tx::read(self.db()).await?;
        let rows: Vec<QueueRow> = tx
            .fetch_all(
                "SELECT id, name, definition, created_at, updated_at FROM routing_queues \
                 WHERE tenant = $1 AND id > $2 ORDER BY id LIMIT $3",
                args![
                    tenant.as_str(),
                    after,
                    i64::try_from(limit + 1).unwrap_or(i64::MAX)
                ],
            )
            .await?;
        tx.commit().await?;
        let more = rows.len() > limit;
        let queues = rows
            .into_iter()
            .take(limit)
            .map(QueueRow::into_record)
            .collect::<RoutingResult<Vec<_>>>()?;
        Ok((queues, more))
    }

    /// Deletes a queue without waiting or assigned tickets and without a pending warm-transfer
    /// offer to it. The queue row is locked first (on
    /// PostgreSQL `FOR UPDATE`), so a ticket entering the queue at the same time (which holds
    /// the row, see [`hold_queue`]) either commits first and is counted here, refusing the
    /// delete with FAILED_PRECONDITION, or waits and then finds the queue gone.
    pub async fn delete_queue(&self, tenant: &TenantId, id: &str) -> RoutingResult<()> {
        let mut tx = Tx::write(self.db()).await?;
        let found: Option<(String,)> = tx
            .fetch_optional(
                locking!("SELECT id FROM routing_queues WHERE tenant = $1 AND id = $2"),
                args![tenant.as_str(), id],
            )
            .await?;
        if found.is_none() {
            return Err(RoutingError::NotFound(format!("queue {id} not found")));
        }
        let live = tx
            .fetch_i64(
                "SELECT COUNT(*) FROM routing_tickets WHERE tenant = $1 AND queue_id = $2 \
                 AND state IN ('queued', 'offered', 'assigned')",
                args![tenant.as_str(), id],
            )
            .await?;
        if live > 0 {
            return Err(RoutingError::FailedPrecondition(format!(
                "queue {id} still has {live} live tickets"
            )));
        }
        // A warm transfer's offer names its target queue while the ticket stays in its own
        // until the offer is accepted; the transfer held the queue row when it made the offer.
        let transfers = tx
            .fetch_i64(
                "SELECT COUNT(*) FROM routing_offers WHERE tenant = $1 AND queue_id = $2 \
                 AND state = 'pending'",
                args![tenant.as_str(), id],
            )
            .await?;
        if transfers > 0 {
            return Err(RoutingError::FailedPrecondition(format!(
                "queue {id} is the target of {transfers} pending transfer offers"
            )));
        }
        tx.execute(
            "DELETE FROM routing_queue_scenarios WHERE tenant = $1 AND queue_id = $2",
            args![tenant.as_str(), id],
        )
        .await?;
        tx.execute(
            "DELETE FROM routing_queues WHERE tenant = $1 AND id = $2",
            args![tenant.as_str(), id],
        )
        .await?;
        tx.execute(
            "DELETE FROM routing_queue_reports WHERE tenant = $1 AND queue_id = $2",
            args![tenant.as_str(), id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
