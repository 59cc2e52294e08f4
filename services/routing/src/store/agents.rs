//! Agents: registration, profile updates, presence and desk sessions.

use chrono::{DateTime, Utc};
use tandem_proto::ids::TenantId;
use tandem_proto::pb::routing::v1 as pb;

use super::sql::{Tx, args, locking};
use super::tickets::OfferRecord;
use super::{AgentRow, Store, events, json, micros};
use crate::domain::agent::{Agent, AgentProfile, Presence};
use crate::error::{RoutingError, RoutingResult};

/// Why presence changed (the event's reason).
pub type PresenceReason = pb::PresenceChangeReason;

/// A desk session opened or resumed ([`Store::open_session`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SessionOpened {
    /// The agent after the open (and its presence change, if any).
    pub agent: Agent,
    /// The session's id: the resumed one, or the new one.
    pub session_id: String,
    /// Opens and resumes of the agent's sessions so far: tells this stream from an older one
    /// holding the same session id.
    pub epoch: i64,
    /// Whether an existing session was resumed.
    pub resumed: bool,
    /// The session that was open when this one opened (the same id when resumed from a stream
    /// that had not ended yet), whose stream is now replaced.
    pub replaced: Option<String>,
}

/// An agent's session columns: (session, last session, when it ended, epoch).
type SessionRow = (Option<String>, Option<String>, Option<i64>, i64);

/// The session and offers version of an agent: (session, epoch, updated_at, load, assigned,
/// pending offers, newest pending offer id).
pub(crate) type VersionRow = (Option<String>, i64, i64, i64, i64, i64, String);

/// An agent's session, stream epoch and offers' version ([`super::OffersVersion`]); `$1` the
/// tenant, `$2` the agent.
pub(crate) const SESSION_VERSION: &str = "SELECT a.session_id, a.session_epoch, a.updated_at, a.active_load, a.assigned, \
     (SELECT COUNT(*) FROM routing_offers o WHERE o.tenant = a.tenant \
      AND o.agent_id = a.id AND o.state = 'pending'), \
     (SELECT COALESCE(MAX(o.id), '') FROM routing_offers o WHERE o.tenant = a.tenant \
      AND o.agent_id = a.id AND o.state = 'pending') \
     FROM routing_agents a WHERE a.tenant = $1 AND a.id = $2";

/// Filters of `ListAgents`.
#[derive(Clone, Debug, Default)]
pub struct AgentFilter {
    /// Only this team.
    pub team: Option<String>,
    /// Only this presence.
    pub presence: Option<Presence>,
    /// Only agents with this skill.
    pub skill: Option<String>,
}

const SELECT_AGENT: &str = "SELECT id, display_name, team, skills, languages, capacity, \
     active_load, assigned, presence, last_heartbeat_at, last_assigned_at, created_at, updated_at \
     FROM routing_agents WHERE tenant = $1 AND id = $2";

pub(crate) async fn load_agent(
    tx: &mut Tx,
    tenant: &TenantId,
    id: &str,
    lock: bool,
) -> RoutingResult<Option<Agent>> {
    let sql = if lock {
        locking!(
            "SELECT id, display_name, team, skills, languages, capacity, active_load, assigned, \
             presence, last_heartbeat_at, last_assigned_at, created_at, updated_at \
             FROM routing_agents WHERE tenant = $1 AND id = $2"
        )
    } else {
        SELECT_AGENT.into()
    };
    let row: Option<AgentRow> = tx.fetch_optional(sql, args![tenant.as_str(), id]).await?;
    row.map(AgentRow::into_agent).transpose()
}

/// Online agents of a tenant (with or without spare capacity).
pub(crate) async fn online_agents(tx: &mut Tx, tenant: &TenantId) -> RoutingResult<Vec<Agent>> {
    let rows: Vec<AgentRow> = tx
        .fetch_all(
            "SELECT id, display_name, team, skills, languages, capacity, active_load, assigned, \
             presence, last_heartbeat_at, last_assigned_at, created_at, updated_at \
             FROM routing_agents WHERE tenant = $1 AND presence = 'online'",
            args![tenant.as_str()],
        )
        .await?;
    rows.into_iter().map(AgentRow::into_agent).collect()
}

/// Changes presence inside `tx`, writing the event and, when the agent stops taking work,
/// expiring its pending offers (their tickets go back to the queue). Returns the agent after
/// the change and the offers released.
#[allow(clippy::too_many_arguments, reason = "the change and its context")]
pub(crate) async fn change_presence(
    tx: &mut Tx,
    tenant: &TenantId,
    agent: Agent,
    to: Presence,
    reason: PresenceReason,
    note: &str,
    now: DateTime<Utc>,
    events_out: &mut Vec<tandem_platform::bus::RawEvent>,
) -> RoutingResult<(Agent, Vec<OfferRecord>)> {
    if agent.presence == to {
        return Ok((agent, Vec::new()));
    }
    tx.execute(
        "UPDATE routing_agents SET presence = $3, updated_at = $4, \
         missed_offers = CASE WHEN $3 = 'online' THEN 0 ELSE missed_offers END \
         WHERE tenant = $1 AND id = $2",
        args![
            tenant.as_str(),
            agent.profile.id.as_str(),
            to.as_str(),
            micros(now)
        ],
    )
    .await?;
    events_out.push(events::presence_changed(
        tenant,
        &agent.profile.id,
        &agent.profile.team,
        agent.presence,
        to,
        reason,
        note,
        agent.assigned,
        now,
    ));
    let mut released = Vec::new();
    if to != Presence::Online {
        released =
            super::tickets::expire_agent_offers(tx, tenant, &agent.profile.id, now, events_out)
                .await?;
    }
    let agent = load_agent(tx, tenant, &agent.profile.id, false)
        .await?
        .ok_or_else(|| RoutingError::NotFound(format!("agent {} not found", agent.profile.id)))?;
    Ok((agent, released))
}

impl Store {
    /// Registers an agent (offline, no load). Fails with `AlreadyExists` for a known id.
    pub async fn register_agent(
        &self,
        tenant: &TenantId,
        profile: &AgentProfile,
        now: DateTime<Utc>,
    ) -> RoutingResult<Agent> {
        profile.validate()?;
        let mut tx = Tx::write(self.db()).await?;
        let inserted = tx
            .execute(
                "INSERT INTO routing_agents (tenant, id, display_name, team, skills, languages, \
                 capacity, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
                 ON CONFLICT DO NOTHING",
                args![
                    tenant.as_str(),
                    profile.id.as_str(),
                    profile.display_name.as_str(),
                    profile.team.as_str(),
                    json(&profile.skills)?,
                    json(&profile.languages)?,
                    profile.capacity,
                    micros(now)
                ],
            )
            .await?;
        if inserted == 0 {
            return Err(RoutingError::AlreadyExists(format!(
                "agent {} is already registered",
                profile.id
            )));
        }
        let agent = load_agent(&mut tx, tenant, &profile.id, false)
            .await?
            .ok_or_else(|| RoutingError::Corrupt("registered agent vanished".into()))?;
        tx.commit().await?;
        Ok(agent)
    }

    /// Replaces an agent's profile. Capacity may not drop below the units in use.
    pub async fn update_agent(
        &self,
        tenant: &TenantId,
        profile: &AgentProfile,
        now: DateTime<Utc>,
    ) -> RoutingResult<Agent> {
        profile.validate()?;
        let replacement = profile.clone();
        let (_, agent) = self
            .change_agent(tenant, &profile.id, move |p| *p = replacement, now)
            .await?;
        Ok(agent)
    }

    /// Changes an agent's profile with `change`, applied to the profile as stored, on the row
    /// locked in the write transaction (`FOR UPDATE` on PostgreSQL; SQLite's one writer), so
    /// concurrent changes of different fields all survive. The id cannot change; capacity may
    /// not drop below the units in use. Returns the agent before and after.
    pub async fn change_agent<F>(
        &self,
        tenant: &TenantId,
        id: &str,
        change: F,
        now: DateTime<Utc>,
    ) -> RoutingResult<(Agent, Agent)>
    where
        F: FnOnce(&mut AgentProfile) + Send,
    {
        let mut tx = Tx::write(self.db()).await?;
        let current = load_agent(&mut tx, tenant, id, true)
            .await?
            .ok_or_else(|| RoutingError::NotFound(format!("agent {id} not found")))?;
        let mut profile = current.profile.clone();
        change(&mut profile);
        profile.id = id.to_owned();
        profile.validate()?;
        if profile.capacity < current.load {
            return Err(RoutingError::FailedPrecondition(format!(
                "agent {} holds {} offers and conversations; max_concurrent cannot go below that",
                profile.id, current.load
            )));
        }
        tx.execute(
            "UPDATE routing_agents SET display_name = $3, team = $4, skills = $5, languages = $6, \
             capacity = $7, updated_at = $8 WHERE tenant = $1 AND id = $2 AND active_load <= $7",
            args![
                tenant.as_str(),
                profile.id.as_str(),
                profile.display_name.as_str(),
                profile.team.as_str(),
                json(&profile.skills)?,
                json(&profile.languages)?,
                profile.capacity,
                micros(now)
            ],
        )
        .await?;
        let agent = load_agent(&mut tx, tenant, &profile.id, false)
            .await?
            .ok_or_else(|| RoutingError::Corrupt("updated agent vanished".into()))?;
        tx.commit().await?;
        Ok((current, agent))
    }

    /// Returns one agent.
    pub async fn agent(&self, tenant: &TenantId, id: &str) -> RoutingResult<Agent> {
        let mut tx = Tx::reads(self.db()).await?;
        let agent = load_agent(&mut tx, tenant, id, false).await?;
        tx.commit().await?;
        agent.ok_or_else(|| RoutingError::NotFound(format!("agent {id} not found")))
    }

    /// Lists agents ordered by id, after `after`, at most `limit`; returns whether more follow.
    pub async fn list_agents(
        &self,
        tenant: &TenantId,
        filter: &AgentFilter,
        after: &str,
        limit: usize,
    ) -> RoutingResult<(Vec<Agent>, bool)> {
        let mut tx = Tx::read(self.db()).await?;
        let skill_pattern = filter
            .skill
            .as_ref()
            .map(|s| format!("%\"name\":\"{s}\"%"))
            .unwrap_or_default();
        let rows: Vec<AgentRow> = tx
            .fetch_all(
                "SELECT id, display_name, team, skills, languages, capacity, active_load, assigned, \
                 presence, last_heartbeat_at, last_assigned_at, created_at, updated_at \
                 FROM routing_agents WHERE tenant = $1 AND id > $2 \
                 AND ($3 = '' OR team = $3) AND ($4 = '' OR presence = $4) \
                 AND ($5 = '' OR skills LIKE $5) ORDER BY id LIMIT $6",
                args![
                    tenant.as_str(),
                    after,
                    filter.team.clone().unwrap_or_default(),
                    filter.presence.map(Presence::as_str).unwrap_or_default(),
                    skill_pattern,
                    i64::try_from(limit + 1).unwrap_or(i64::MAX)
                ],
            )
            .await?;
        tx.commit().await?;
        let more = rows.len() > limit;
        let mut agents = Vec::with_capacity(limit);
        for row in rows.into_iter().take(limit) {
            let agent = row.into_agent()?;
            if filter
                .skill
                .as_ref()
                .is_none_or(|s| agent.profile.level(s).is_some())
            {
                agents.push(agent);
            }
        }
        Ok((agents, more))
    }

    /// Sets presence; when the agent stops taking work its pending offers are expired and their
    /// tickets return to the queue. Returns the agent and the offers released.
    pub async fn set_presence(
        &self,
        tenant: &TenantId,
        id: &str,
        to: Presence,
        reason: PresenceReason,
        note: &str,
        now: DateTime<Utc>,
    ) -> RoutingResult<(Agent, Vec<OfferRecord>)> {
        let mut tx = Tx::write(self.db()).await?;
        let agent = load_agent(&mut tx, tenant, id, true)
            .await?
            .ok_or_else(|| RoutingError::NotFound(format!("agent {id} not found")))?;
        let mut out = Vec::new();
        let changed =
            change_presence(&mut tx, tenant, agent, to, reason, note, now, &mut out).await?;
        tx.enqueue(&out).await?;
        tx.commit().await?;
        if !out.is_empty() {
            self.wake_outbox();
        }
        Ok(changed)
    }

    /// Opens a desk session: records it (replacing any other), counts it as a heartbeat and, if
    /// asked, changes presence.
    ///
    /// With `resume` naming the agent's session that is still open, or the one that ended less
    /// than `grace` ago (before the agent went offline), that session is resumed: it keeps its
    /// id, presence stays as it is (no event) and the stream still holding the id, if any, is
    /// replaced. Any other `resume` (unknown, expired, another agent's) opens `new_session_id`
    /// like no `resume` at all; the caller tells which by [`SessionOpened::resumed`].
    #[allow(clippy::too_many_arguments, reason = "the request and its context")]
    pub async fn open_session(
        &self,
        tenant: &TenantId,
        id: &str,
        new_session_id: &str,
        resume: Option<&str>,
        presence: Option<Presence>,
        grace: std::time::Duration,
        now: DateTime<Utc>,
    ) -> RoutingResult<SessionOpened> {
        let mut tx = Tx::write(self.db()).await?;
        let agent = load_agent(&mut tx, tenant, id, true)
            .await?
            .ok_or_else(|| RoutingError::NotFound(format!("agent {id} is not registered")))?;
        let row: Option<SessionRow> = tx
            .fetch_optional(
                "SELECT session_id, last_session_id, session_closed_at, session_epoch \
                 FROM routing_agents WHERE tenant = $1 AND id = $2",
                args![tenant.as_str(), id],
            )
            .await?;
        let (current, last, closed_at, epoch) =
            row.ok_or_else(|| RoutingError::NotFound(format!("agent {id} is not registered")))?;
        let grace_since = micros(now) - i64::try_from(grace.as_micros()).unwrap_or(i64::MAX);
        let resumed = resume.filter(|r| !r.is_empty()).is_some_and(|r| {
            current.as_deref() == Some(r)
                || (current.is_none()
                    && last.as_deref() == Some(r)
                    && closed_at.is_some_and(|at| at > grace_since))
        });
        let session_id = match resume {
            Some(r) if resumed => r.to_owned(),
            _ => new_session_id.to_owned(),
        };
        let epoch = epoch + 1;
        tx.execute(
            "UPDATE routing_agents SET session_id = $3, session_epoch = $4, \
             session_closed_at = NULL, last_session_id = NULL, last_heartbeat_at = $5, \
             updated_at = $5 WHERE tenant = $1 AND id = $2",
            args![tenant.as_str(), id, session_id.as_str(), epoch, micros(now)],
        )
        .await?;
        let mut out = Vec::new();
        let agent = match presence {
            Some(to) => {
                change_presence(
                    &mut tx,
                    tenant,
                    agent,
                    to,
                    PresenceReason::SessionOpened,
                    "",
                    now,
                    &mut out,
                )
                .await?
                .0
            }
            None => agent,
        };
        tx.enqueue(&out).await?;
        tx.commit().await?;
        if !out.is_empty() {
            self.wake_outbox();
        }
        Ok(SessionOpened {
            agent,
            session_id,
            epoch,
            resumed,
            replaced: current,
        })
    }

    /// Records a heartbeat of the stream `epoch` of a session; returns false when another
    /// session (or another stream resuming this one) replaced it.
    pub async fn heartbeat(
        &self,
        tenant: &TenantId,
        id: &str,
        session_id: &str,
        epoch: i64,
        now: DateTime<Utc>,
    ) -> RoutingResult<bool> {
        let mut tx = Tx::write(self.db()).await?;
        let n = tx
            .execute(
                "UPDATE routing_agents SET last_heartbeat_at = $4 \
                 WHERE tenant = $1 AND id = $2 AND session_id = $3 AND session_epoch = $5",
                args![tenant.as_str(), id, session_id, micros(now), epoch],
            )
            .await?;
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Returns the agent's current session, if one is open.
    pub async fn current_session(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> RoutingResult<Option<String>> {
        let mut tx = Tx::read(self.db()).await?;
        let row: Option<(Option<String>,)> = tx
            .fetch_optional(
                "SELECT session_id FROM routing_agents WHERE tenant = $1 AND id = $2",
                args![tenant.as_str(), id],
            )
            .await?;
        tx.commit().await?;
        Ok(row.and_then(|(s,)| s))
    }

    /// The agent's current session, the stream holding it (its epoch) and a version of its
    /// offers, in one cheap read: the version changes whenever an offer of the agent is made,
    /// answered, expired or revoked (each of those changes the agent's load and `updated_at`,
    /// and the newest pending offer or their number), so a desk session that polls can skip its
    /// full sync while it stays the same.
    pub async fn session_version(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> RoutingResult<Option<(Option<String>, i64, super::OffersVersion)>> {
        let mut tx = Tx::reads(self.db()).await?;
        let row: Option<VersionRow> = tx
            .fetch_optional(SESSION_VERSION, args![tenant.as_str(), id])
            .await?;
        tx.commit().await?;
        Ok(row.map(
            |(session, epoch, updated, load, assigned, pending, newest)| {
                (session, epoch, (updated, load, assigned, pending, newest))
            },
        ))
    }

    /// Marks the stream `epoch` of a session closed (it ended); the agent goes offline after
    /// the grace period unless a session opens or this one is resumed. Nothing happens when
    /// another stream holds the session by then.
    pub async fn close_session(
        &self,
        tenant: &TenantId,
        id: &str,
        session_id: &str,
        epoch: i64,
        now: DateTime<Utc>,
    ) -> RoutingResult<()> {
        let mut tx = Tx::write(self.db()).await?;
        tx.execute(
            "UPDATE routing_agents SET last_session_id = session_id, session_id = NULL, \
             session_closed_at = $4 WHERE tenant = $1 AND id = $2 AND session_id = $3 \
             AND session_epoch = $5",
            args![tenant.as_str(), id, session_id, micros(now), epoch],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Applies presence rules for lost sessions: an open session without a heartbeat for
    /// `heartbeat_timeout` makes an online agent AWAY; a session closed longer than `grace` ago
    /// makes the agent OFFLINE. Either way its pending offers go back to their queues. Returns the
    /// agents changed.
    pub async fn sweep_sessions(
        &self,
        now: DateTime<Utc>,
        heartbeat_timeout: std::time::Duration,
        grace: std::time::Duration,
    ) -> RoutingResult<Vec<(TenantId, Agent)>> {
        let silent_since =
            micros(now) - i64::try_from(heartbeat_timeout.as_micros()).unwrap_or(i64::MAX);
        let closed_since = micros(now) - i64::try_from(grace.as_micros()).unwrap_or(i64::MAX);
        let mut tx = Tx::read(self.db()).await?;
        let lost: Vec<(String, String, bool)> = tx
            .fetch_all(
                "SELECT tenant, id, session_id IS NULL FROM routing_agents WHERE \
                 (session_id IS NOT NULL AND presence = 'online' AND last_heartbeat_at < $1) \
                 OR (session_id IS NULL AND session_closed_at IS NOT NULL \
                     AND session_closed_at < $2) LIMIT 500",
                args![silent_since, closed_since],
            )
            .await?;
        tx.commit().await?;
        let mut changed = Vec::new();
        for (tenant, id, closed) in lost {
            let Ok(tenant) = TenantId::new(tenant) else {
                continue;
            };
            let mut tx = Tx::write(self.db()).await?;
            let Some(agent) = load_agent(&mut tx, &tenant, &id, true).await? else {
                continue;
            };
            // The list above took no locks: since then the agent may have opened or resumed a
            // session or sent a heartbeat. The condition is checked again on the locked row and
            // an agent that no longer meets it is left alone.
            let still_lost = if closed {
                tx.execute(
                    "UPDATE routing_agents SET session_closed_at = NULL \
                     WHERE tenant = $1 AND id = $2 AND session_id IS NULL \
                     AND session_closed_at IS NOT NULL AND session_closed_at < $3",
                    args![tenant.as_str(), id.as_str(), closed_since],
                )
                .await?
                    == 1
            } else {
                let row: Option<(String,)> = tx
                    .fetch_optional(
                        "SELECT id FROM routing_agents WHERE tenant = $1 AND id = $2 \
                         AND session_id IS NOT NULL AND presence = 'online' \
                         AND last_heartbeat_at < $3",
                        args![tenant.as_str(), id.as_str(), silent_since],
                    )
                    .await?;
                row.is_some()
            };
            if !still_lost {
                tx.commit().await?;
                continue;
            }
            let to = if closed {
                Presence::Offline
            } else {
                Presence::Away
            };
            let mut out = Vec::new();
            let (agent, _) = change_presence(
                &mut tx,
                &tenant,
                agent,
                to,
                PresenceReason::SessionLost,
                "",
                now,
                &mut out,
            )
            .await?;
            tx.enqueue(&out).await?;
            tx.commit().await?;
            self.wake_outbox();
            changed.push((tenant, agent));
        }
        Ok(changed)
    }
}
