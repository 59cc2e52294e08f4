//! The routing repository's contract, run against PostgreSQL (a throwaway server) and SQLite
//! (a temp dir): agents, queues, idempotent enqueue, offers, accept, decline, expiry, transfers,
//! abandonment, priority, position and ETA, the events written with each change, and the
//! exactly-once invariants under concurrent routing, checked by SQL over the tables.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};
use tandem_platform::config::{DatabaseConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::outbox::OutboxWaker;
use tandem_platform::runtime::Service as _;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::routing::v1 as rpb;
use tandem_routing::Routing;
use tandem_routing::domain::agent::{AgentProfile, Presence, Skill, SkillRequirement};
use tandem_routing::domain::queue::{
    BusinessHours, OverflowAction, OverflowStep, PriorityWeights, QueueSpec, WeeklyWindow,
};
use tandem_routing::domain::ticket::{Disposition, TicketState};
use tandem_routing::error::RoutingError;
use tandem_routing::store::{
    AcceptRequest, AgentFilter, EtaSettings, NewTicket, OfferOutcome, OfferRecord, PositionUpdates,
    PresenceReason, Store, TicketRecord, TransferKind, TransferTarget, Unassigned,
};

#[allow(
    dead_code,
    clippy::large_enum_variant,
    reason = "held for its Drop, one per test"
)]
enum Keep {
    Postgres,
    Sqlite(tempfile::TempDir),
}

async fn postgres() -> (Store, Keep) {
    let pg = tandem_testkit::shared_postgres().await;
    let url = pg.fresh_database().await.unwrap();
    let db = postgres_pool(&url).await;
    db.migrate(Some(Routing::migrations())).await.unwrap();
    (
        Store::new(db, OutboxWaker::default(), "default"),
        Keep::Postgres,
    )
}

async fn postgres_pool(url: &str) -> Db {
    Db::connect(&DatabaseConfig {
        url: Secret::new(url.to_owned()),
        schema: "routing".into(),
        max_connections: 16,
        ..DatabaseConfig::default()
    })
    .await
    .unwrap()
}

async fn sqlite() -> (Store, Keep) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("routing.db").display());
    let db = Db::connect(&DatabaseConfig {
        url: Secret::new(url),
        max_connections: 8,
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    db.migrate(Some(Routing::migrations())).await.unwrap();
    (
        Store::new(db, OutboxWaker::default(), "default"),
        Keep::Sqlite(dir),
    )
}

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

fn t0() -> DateTime<Utc> {
    // A Monday, 10:00 UTC.
    Utc.with_ymd_and_hms(2026, 9, 28, 10, 0, 0).unwrap()
}

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

const GRACE: Duration = Duration::from_secs(10);

const ETA: EtaSettings = EtaSettings {
    window: Duration::from_secs(900),
    default_seconds_per_position: 60,
};

fn profile(id: &str, skills: &[(&str, i32)], capacity: i32) -> AgentProfile {
    AgentProfile {
        id: id.into(),
        display_name: format!("Agent {id}"),
        team: "care".into(),
        skills: skills
            .iter()
            .map(|(name, level)| Skill {
                name: (*name).into(),
                level: *level,
            })
            .collect(),
        languages: vec![1],
        capacity,
    }
}

async fn online(store: &Store, id: &str, skills: &[(&str, i32)], capacity: i32) {
    store
        .register_agent(&tenant(), &profile(id, skills, capacity), t0())
        .await
        .unwrap();
    store
        .set_presence(
            &tenant(),
            id,
            Presence::Online,
            PresenceReason::Manual,
            "",
            t0(),
        )
        .await
        .unwrap();
}

/// A handoff; the number in its id is its transcript sequence, which orders the handoffs of one
/// conversation (all are requested at `t0`).
fn handoff(id: &str, conversation: &str) -> NewTicket {
    NewTicket {
        handoff_id: id.into(),
        conversation_id: conversation.into(),
        scenario_id: "billing-questions".into(),
        queue_id: String::new(),
        priority: 50,
        vip: false,
        severity: 0.0,
        skills: Vec::new(),
        language: 1,
        trigger_received_at: Some(t0() - secs(1)),
        requested_at: t0(),
        transcript_sequence: id
            .trim_start_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .unwrap_or(0),
        package: vec![1, 2, 3],
    }
}

async fn enqueue(store: &Store, new: &NewTicket, at: DateTime<Utc>) {
    let outcome = store
        .enqueue(&tenant(), new, None, ETA, at)
        .await
        .unwrap()
        .unwrap();
    assert!(outcome.created);
}

async fn offer(store: &Store, ticket: &str, at: DateTime<Utc>) -> (String, String) {
    match store.offer_ticket(&tenant(), ticket, at).await.unwrap() {
        OfferOutcome::Offered(made) => (made.1.id.clone(), made.1.agent_id.clone()),
        other => panic!("expected an offer for {ticket}, got {other:?}"),
    }
}

/// Counts outbox rows of one event type.
async fn events(store: &Store, type_name: &str) -> i64 {
    let sql = "SELECT COUNT(*) FROM tandem_outbox WHERE type_name = $1";
    match store.db() {
        Db::Postgres(pool) => {
            sqlx::query_scalar(sql)
                .bind(type_name)
                .fetch_one(pool)
                .await
        }
        Db::Sqlite(pool) => {
            sqlx::query_scalar(sql)
                .bind(type_name)
                .fetch_one(pool)
                .await
        }
    }
    .unwrap()
}

/// The outbox's events of type `E`, in order.
async fn outbox<E: tandem_proto::events::Event>(store: &Store) -> Vec<E> {
    let sql = "SELECT payload FROM tandem_outbox WHERE type_name = $1 ORDER BY seq";
    let payloads: Vec<Vec<u8>> = match store.db() {
        Db::Postgres(pool) => {
            sqlx::query_scalar(sql)
                .bind(E::TYPE_NAME)
                .fetch_all(pool)
                .await
        }
        Db::Sqlite(pool) => {
            sqlx::query_scalar(sql)
                .bind(E::TYPE_NAME)
                .fetch_all(pool)
                .await
        }
    }
    .unwrap();
    payloads
        .iter()
        .map(|p| E::decode(p.as_slice()).unwrap())
        .collect()
}

async fn scalar(store: &Store, sql: &'static str) -> i64 {
    match store.db() {
        Db::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
        Db::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
    }
    .unwrap()
}

/// Every exactly-once invariant, checked over the tables; returns the violations found.
async fn violations(store: &Store) -> Vec<String> {
    let checks: [(&str, &'static str); 7] = [
        (
            "agents over capacity",
            "SELECT COUNT(*) FROM routing_agents WHERE active_load > capacity OR active_load < 0",
        ),
        (
            "conversations with two active assignments",
            "SELECT COUNT(*) FROM (SELECT conversation_id FROM routing_assignments \
             WHERE ended_at IS NULL GROUP BY tenant, conversation_id HAVING COUNT(*) > 1) x",
        ),
        (
            "conversations with two pending offers",
            "SELECT COUNT(*) FROM (SELECT conversation_id FROM routing_offers \
             WHERE state = 'pending' GROUP BY tenant, conversation_id HAVING COUNT(*) > 1) x",
        ),
        (
            "agents whose load is not offers + assignments",
            "SELECT COUNT(*) FROM routing_agents a WHERE a.active_load <> \
             (SELECT COUNT(*) FROM routing_offers o WHERE o.tenant = a.tenant \
              AND o.agent_id = a.id AND o.state = 'pending') + \
             (SELECT COUNT(*) FROM routing_assignments s WHERE s.tenant = a.tenant \
              AND s.agent_id = a.id AND s.ended_at IS NULL) \
             OR a.assigned <> (SELECT COUNT(*) FROM routing_assignments s \
              WHERE s.tenant = a.tenant AND s.agent_id = a.id AND s.ended_at IS NULL)",
        ),
        (
            "assigned tickets without exactly one active assignment",
            "SELECT COUNT(*) FROM routing_tickets t WHERE t.state = 'assigned' AND 1 <> \
             (SELECT COUNT(*) FROM routing_assignments s WHERE s.tenant = t.tenant \
              AND s.ticket_id = t.id AND s.ended_at IS NULL)",
        ),
        (
            "live tickets in a queue that does not exist",
            "SELECT COUNT(*) FROM routing_tickets t WHERE t.state IN ('queued', 'offered', \
             'assigned') AND NOT EXISTS (SELECT 1 FROM routing_queues q \
              WHERE q.tenant = t.tenant AND q.id = t.queue_id)",
        ),
        (
            "pending offers to a queue that does not exist",
            "SELECT COUNT(*) FROM routing_offers o WHERE o.state = 'pending' AND NOT EXISTS \
             (SELECT 1 FROM routing_queues q WHERE q.tenant = o.tenant AND q.id = o.queue_id)",
        ),
    ];
    let mut found = Vec::new();
    for (what, sql) in checks {
        let n = scalar(store, sql).await;
        if n != 0 {
            found.push(format!("{n} {what}"));
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// The contract.

async fn agents_register_update_list_and_validate(store: Store) {
    let t = tenant();
    let agent = store
        .register_agent(&t, &profile("ann", &[("billing", 3)], 2), t0())
        .await
        .unwrap();
    assert_eq!(agent.presence, Presence::Offline);
    assert_eq!(agent.load, 0);
    assert!(matches!(
        store
            .register_agent(&t, &profile("ann", &[], 2), t0())
            .await,
        Err(RoutingError::AlreadyExists(_))
    ));
    for capacity in [0, 51] {
        assert!(matches!(
            store
                .register_agent(&t, &profile("bob", &[], capacity), t0())
                .await,
            Err(RoutingError::InvalidArgument(_))
        ));
    }
    assert!(matches!(
        store
            .register_agent(&t, &profile("bob", &[("billing", 11)], 2), t0())
            .await,
        Err(RoutingError::InvalidArgument(_))
    ));
    store
        .register_agent(&t, &profile("bob", &[("refunds", 5)], 4), t0())
        .await
        .unwrap();
    let updated = store
        .update_agent(&t, &profile("ann", &[("billing", 7)], 5), t0() + secs(1))
        .await
        .unwrap();
    assert_eq!(updated.profile.capacity, 5);
    assert_eq!(updated.profile.level("billing"), Some(7));
    assert!(matches!(
        store
            .update_agent(&t, &profile("nobody", &[], 5), t0())
            .await,
        Err(RoutingError::NotFound(_))
    ));
    assert!(matches!(
        store.agent(&t, "nobody").await,
        Err(RoutingError::NotFound(_))
    ));
    let other = TenantId::new("globex").unwrap();
    assert!(
        matches!(
            store.agent(&other, "ann").await,
            Err(RoutingError::NotFound(_))
        ),
        "tenants are isolated"
    );

    let (page, more) = store
        .list_agents(&t, &AgentFilter::default(), "", 1)
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert!(more);
    assert_eq!(page[0].profile.id, "ann");
    let (page, more) = store
        .list_agents(&t, &AgentFilter::default(), "ann", 1)
        .await
        .unwrap();
    assert_eq!(page[0].profile.id, "bob");
    assert!(!more);
    let refunds = AgentFilter {
        skill: Some("refunds".into()),
        ..AgentFilter::default()
    };
    let (page, _) = store.list_agents(&t, &refunds, "", 10).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].profile.id, "bob");

    let (agent, _) = store
        .set_presence(
            &t,
            "bob",
            Presence::Online,
            PresenceReason::Manual,
            "",
            t0(),
        )
        .await
        .unwrap();
    assert_eq!(agent.presence, Presence::Online);
    let online = AgentFilter {
        presence: Some(Presence::Online),
        ..AgentFilter::default()
    };
    let (page, _) = store.list_agents(&t, &online, "", 10).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(
        events(&store, "tandem.routing.v1.AgentPresenceChanged").await,
        1
    );
    // Setting the same presence again changes nothing and publishes nothing.
    store
        .set_presence(
            &t,
            "bob",
            Presence::Online,
            PresenceReason::Manual,
            "",
            t0(),
        )
        .await
        .unwrap();
    assert_eq!(
        events(&store, "tandem.routing.v1.AgentPresenceChanged").await,
        1
    );
}

async fn queues_upsert_list_and_delete(store: Store) {
    let t = tenant();
    let mut spec = QueueSpec::open("billing");
    spec.scenario_ids = vec!["billing-questions".into()];
    spec.required_skills = vec![SkillRequirement {
        name: "billing".into(),
        min_level: 2,
    }];
    let (record, created) = store.upsert_queue(&t, &spec, t0()).await.unwrap();
    assert!(created);
    assert_eq!(record.spec, spec);
    spec.name = "Billing".into();
    let (record, created) = store.upsert_queue(&t, &spec, t0()).await.unwrap();
    assert!(!created);
    assert_eq!(record.spec.name, "Billing");
    let mut other = QueueSpec::open("refunds");
    other.scenario_ids = vec!["billing-questions".into()];
    assert!(matches!(
        store.upsert_queue(&t, &other, t0()).await,
        Err(RoutingError::FailedPrecondition(_))
    ));
    other.scenario_ids.clear();
    store.upsert_queue(&t, &other, t0()).await.unwrap();
    let (queues, more) = store.list_queues(&t, "", 10).await.unwrap();
    assert_eq!(
        queues
            .iter()
            .map(|q| q.spec.id.as_str())
            .collect::<Vec<_>>(),
        ["billing", "refunds"]
    );
    assert!(!more);

    // The scenario routes the handoff to billing.
    enqueue(&store, &handoff("h1", "c1"), t0()).await;
    assert_eq!(store.ticket(&t, "h1").await.unwrap().queue_id, "billing");
    assert!(matches!(
        store.delete_queue(&t, "billing").await,
        Err(RoutingError::FailedPrecondition(_))
    ));
    store.delete_queue(&t, "refunds").await.unwrap();
    assert!(matches!(
        store.queue(&t, "refunds").await,
        Err(RoutingError::NotFound(_))
    ));
    assert!(matches!(
        store.delete_queue(&t, "refunds").await,
        Err(RoutingError::NotFound(_))
    ));
}

async fn enqueue_is_idempotent_by_handoff_id(store: Store) {
    let t = tenant();
    let new = handoff("h1", "c1");
    enqueue(&store, &new, t0()).await;
    let again = store
        .enqueue(&t, &new, None, ETA, t0() + secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(!again.created, "same handoff id, same ticket");
    assert_eq!(again.ticket.id, "h1");
    assert_eq!(
        scalar(&store, "SELECT COUNT(*) FROM routing_tickets").await,
        1
    );
    assert_eq!(events(&store, "tandem.routing.v1.HandoffQueued").await, 1);
    // The default queue was created on first use.
    assert_eq!(store.ticket(&t, "h1").await.unwrap().queue_id, "default");

    // Through the inbox: an event handled once is skipped, with nothing written.
    let second = handoff("h2", "c2");
    let first = store
        .enqueue(&t, &second, Some(("routing-handoffs", "e-2")), ETA, t0())
        .await
        .unwrap();
    assert!(first.unwrap().created);
    let redelivered = store
        .enqueue(&t, &second, Some(("routing-handoffs", "e-2")), ETA, t0())
        .await
        .unwrap();
    assert!(redelivered.is_none());
    assert_eq!(events(&store, "tandem.routing.v1.HandoffQueued").await, 2);
}

/// Live tickets of conversation `c1`: (id, state).
async fn live_tickets_of_c1(store: &Store) -> Vec<(String, String)> {
    let sql = "SELECT id, state FROM routing_tickets WHERE conversation_id = 'c1' \
               AND state IN ('queued', 'offered', 'assigned') ORDER BY id";
    match store.db() {
        Db::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await,
        Db::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await,
    }
    .unwrap()
}

/// A new handoff of a conversation whose earlier handoff still waits (queued or offered)
/// replaces it: the earlier ticket is returned (its offer revoked, the agent freed) and the new
/// one queued, so the conversation keeps one live ticket, the one dialog now follows. An
/// assignment is completed as resolved. A handoff older than the live ticket is refused.
/// Redeliveries change nothing.
async fn a_new_handoff_replaces_the_waiting_one_of_its_conversation(store: Store) {
    let t = tenant();
    online(&store, "ann", &[], 2).await;
    enqueue(&store, &handoff("h1", "c1"), t0()).await;

    // Queued: replaced.
    let second = store
        .enqueue(&t, &handoff("h2", "c1"), None, ETA, t0() + secs(1))
        .await
        .unwrap()
        .unwrap();
    assert!(second.created);
    let replaced = second.superseded.unwrap();
    assert_eq!(replaced.ticket.unwrap().id, "h1");
    assert!(replaced.revoked.is_empty());
    assert_eq!(
        store.ticket(&t, "h1").await.unwrap().state,
        TicketState::Returned
    );
    assert_eq!(
        live_tickets_of_c1(&store).await,
        [("h2".to_owned(), "queued".to_owned())]
    );
    assert_eq!(events(&store, "tandem.routing.v1.HandoffReturned").await, 1);
    assert_eq!(events(&store, "tandem.routing.v1.HandoffQueued").await, 2);

    let returned = outbox::<rpb::HandoffReturned>(&store).await;
    assert_eq!(returned[0].handoff_id, "h1");
    assert_eq!(returned[0].reason, rpb::ReturnReason::Superseded as i32);

    // The same handoff again, and the replaced one again: nothing changes.
    for id in ["h2", "h1"] {
        let again = store
            .enqueue(&t, &handoff(id, "c1"), None, ETA, t0() + secs(2))
            .await
            .unwrap()
            .unwrap();
        assert!(!again.created);
        assert!(again.superseded.is_none());
    }
    assert_eq!(
        live_tickets_of_c1(&store).await,
        [("h2".to_owned(), "queued".to_owned())]
    );
    assert_eq!(events(&store, "tandem.routing.v1.HandoffReturned").await, 1);
    assert_eq!(events(&store, "tandem.routing.v1.HandoffQueued").await, 2);

    // Offered: replaced, the offer revoked and the agent's unit freed.
    let (offer_id, agent) = offer(&store, "h2", t0() + secs(3)).await;
    assert_eq!(store.agent(&t, &agent).await.unwrap().load, 1);
    let third = store
        .enqueue(&t, &handoff("h3", "c1"), None, ETA, t0() + secs(4))
        .await
        .unwrap()
        .unwrap();
    let replaced = third.superseded.unwrap();
    assert_eq!(replaced.ticket.unwrap().id, "h2");
    assert_eq!(replaced.revoked.len(), 1);
    assert_eq!(replaced.revoked[0].id, offer_id);
    assert_eq!(replaced.freed_agents, std::slice::from_ref(&agent));
    assert_eq!(store.agent(&t, &agent).await.unwrap().load, 0);
    assert_eq!(
        store.offer(&t, &offer_id).await.unwrap().state,
        tandem_routing::store::OfferState::Revoked
    );
    assert!(store.pending_offers(&t, &agent).await.unwrap().is_empty());
    assert_eq!(
        live_tickets_of_c1(&store).await,
        [("h3".to_owned(), "queued".to_owned())]
    );
    assert_eq!(events(&store, "tandem.routing.v1.HandoffReturned").await, 2);

    // Assigned: dialog asks again only after the conversation left the agent, so the
    // assignment is completed as resolved (the resolution itself may still be on its way) and
    // the new handoff queued.
    let (offer_id, agent) = offer(&store, "h3", t0() + secs(5)).await;
    store
        .accept(&t, &agent, &offer_id, t0() + secs(5))
        .await
        .unwrap();
    assert_eq!(store.agent(&t, &agent).await.unwrap().load, 1);
    let fourth = store
        .enqueue(&t, &handoff("h4", "c1"), None, ETA, t0() + secs(6))
        .await
        .unwrap()
        .unwrap();
    assert!(fourth.created);
    let completed = fourth.superseded.unwrap();
    let h3 = completed.ticket.unwrap();
    assert_eq!((h3.id.as_str(), h3.state), ("h3", TicketState::Completed));
    assert_eq!(h3.disposition, Some(Disposition::Resolved));
    assert_eq!(completed.freed_agents, std::slice::from_ref(&agent));
    assert_eq!(store.agent(&t, &agent).await.unwrap().load, 0);
    assert_eq!(
        live_tickets_of_c1(&store).await,
        [("h4".to_owned(), "queued".to_owned())]
    );
    let done = outbox::<rpb::AssignmentCompleted>(&store).await;
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].handoff_id, "h3");
    assert_eq!(done[0].disposition, rpb::Disposition::Resolved as i32);
    // The late resolution of h3 finds it completed and changes nothing.
    assert!(
        store
            .resolve_handoff(&t, "h3", "c1", None, t0() + secs(7))
            .await
            .unwrap()
            .is_none()
    );

    // A handoff older than the live ticket reached routing late: refused, nothing written,
    // whether the live ticket waits or is assigned.
    let stale = |id: &str| {
        let mut new = handoff(id, "c1");
        new.requested_at = t0() - secs(60);
        new
    };
    assert!(matches!(
        store
            .enqueue(&t, &stale("h0"), None, ETA, t0() + secs(8))
            .await,
        Err(RoutingError::AlreadyExists(m)) if m.contains("older than ticket h4")
    ));
    let (offer_id, agent) = offer(&store, "h4", t0() + secs(9)).await;
    store
        .accept(&t, &agent, &offer_id, t0() + secs(9))
        .await
        .unwrap();
    assert!(matches!(
        store
            .enqueue(&t, &stale("h2b"), None, ETA, t0() + secs(10))
            .await,
        Err(RoutingError::AlreadyExists(_))
    ));
    for id in ["h0", "h2b"] {
        assert!(matches!(
            store.ticket(&t, id).await,
            Err(RoutingError::NotFound(_))
        ));
    }
    assert_eq!(
        live_tickets_of_c1(&store).await,
        [("h4".to_owned(), "assigned".to_owned())]
    );
    assert_eq!(store.agent(&t, &agent).await.unwrap().load, 1);
    assert_eq!(events(&store, "tandem.routing.v1.HandoffReturned").await, 2);
    assert_eq!(events(&store, "tandem.routing.v1.HandoffQueued").await, 4);
    assert_eq!(
        events(&store, "tandem.routing.v1.AssignmentCompleted").await,
        1
    );
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

async fn enqueue_and_offer_offers_at_once_only_to_the_first_in_line(store: Store) {
    let t = tenant();
    online(&store, "ann", &[], 1).await;
    let first = store
        .enqueue_and_offer(&t, &handoff("h1", "c1"), None, ETA, t0())
        .await
        .unwrap()
        .unwrap();
    assert!(first.created);
    assert_eq!(
        first.offered.len(),
        1,
        "nobody ahead, ann free: offered at once"
    );
    let (ticket, offer) = &first.offered[0];
    assert_eq!(offer.agent_id, "ann");
    assert_eq!(ticket.state, TicketState::Offered);
    assert_eq!(
        store.ticket(&t, "h1").await.unwrap().state,
        TicketState::Offered
    );
    assert_eq!(store.agent(&t, "ann").await.unwrap().load, 1);
    assert_eq!(events(&store, "tandem.routing.v1.HandoffQueued").await, 1);
    assert_eq!(events(&store, "tandem.routing.v1.HandoffOffered").await, 1);

    // The same handoff again: its ticket, nothing new.
    let again = store
        .enqueue_and_offer(&t, &handoff("h1", "c1"), None, ETA, t0() + secs(1))
        .await
        .unwrap()
        .unwrap();
    assert!(!again.created);
    assert!(again.offered.is_empty());

    // Ann is full: the next ticket waits.
    let second = store
        .enqueue_and_offer(&t, &handoff("h2", "c2"), None, ETA, t0() + secs(2))
        .await
        .unwrap()
        .unwrap();
    assert!(second.offered.is_empty());
    assert_eq!(
        store.ticket(&t, "h2").await.unwrap().state,
        TicketState::Queued
    );

    // Bob comes online, but h2 waits ahead of h3: h3 is not offered past it.
    online(&store, "bob", &[], 1).await;
    let third = store
        .enqueue_and_offer(&t, &handoff("h3", "c3"), None, ETA, t0() + secs(3))
        .await
        .unwrap()
        .unwrap();
    assert!(third.offered.is_empty(), "h2 is first in line");
    assert_eq!(
        store.ticket(&t, "h3").await.unwrap().state,
        TicketState::Queued
    );
    let drained = store
        .offer_queued(&t, "default", 8, t0() + secs(4))
        .await
        .unwrap();
    let offered: Vec<(&str, &str)> = drained
        .offered
        .iter()
        .map(|(ticket, offer)| (ticket.id.as_str(), offer.agent_id.as_str()))
        .collect();
    assert_eq!(offered, [("h2", "bob")]);
    assert!(violations(&store).await.is_empty());
}

async fn offer_reserves_capacity_and_accept_assigns_exactly_once(store: Store) {
    let t = tenant();
    online(&store, "ann", &[], 1).await;
    enqueue(&store, &handoff("h1", "c1"), t0()).await;
    enqueue(&store, &handoff("h2", "c2"), t0() + secs(1)).await;
    let (offer_id, agent) = offer(&store, "h1", t0() + secs(2)).await;
    assert_eq!(agent, "ann");
    assert_eq!(store.agent(&t, "ann").await.unwrap().load, 1);
    let ticket = store.ticket(&t, "h1").await.unwrap();
    assert_eq!(ticket.state, TicketState::Offered);
    assert_eq!(ticket.offered_agent_id.as_deref(), Some("ann"));
    assert_eq!(
        store.offer_ticket(&t, "h2", t0() + secs(2)).await.unwrap(),
        OfferOutcome::NoAgent,
        "ann's only unit is reserved by the pending offer"
    );
    assert_eq!(
        store.offer_ticket(&t, "h1", t0() + secs(2)).await.unwrap(),
        OfferOutcome::Gone,
        "an offered ticket cannot be offered again"
    );

    assert!(matches!(
        store.accept(&t, "bob", &offer_id, t0() + secs(3)).await,
        Err(RoutingError::NotYours(_))
    ));
    assert!(matches!(
        store
            .accept(&t, "ann", "no-such-offer", t0() + secs(3))
            .await,
        Err(RoutingError::NotFound(_))
    ));
    let accepted = store
        .accept(&t, "ann", &offer_id, t0() + secs(3))
        .await
        .unwrap();
    assert_eq!(accepted.ticket.state, TicketState::Assigned);
    assert_eq!(accepted.ticket.assigned_agent_id.as_deref(), Some("ann"));
    assert!(matches!(
        store.accept(&t, "ann", &offer_id, t0() + secs(3)).await,
        Err(RoutingError::OfferTaken(_))
    ));
    let agent = store.agent(&t, "ann").await.unwrap();
    assert_eq!((agent.load, agent.assigned), (1, 1));

    assert!(matches!(
        store
            .complete(&t, "h1", Some("bob"), Disposition::Resolved, t0() + secs(9))
            .await,
        Err(RoutingError::NotYours(_))
    ));
    let (done, _) = store
        .complete(&t, "h1", Some("ann"), Disposition::Resolved, t0() + secs(9))
        .await
        .unwrap();
    assert_eq!(done.ticket.state, TicketState::Completed);
    assert_eq!(done.ticket.disposition, Some(Disposition::Resolved));
    assert!(matches!(
        store
            .complete(&t, "h1", Some("ann"), Disposition::Resolved, t0() + secs(9))
            .await,
        Err(RoutingError::FailedPrecondition(_))
    ));
    let agent = store.agent(&t, "ann").await.unwrap();
    assert_eq!((agent.load, agent.assigned), (0, 0));
    // The freed unit takes the next ticket.
    let (_, agent) = offer(&store, "h2", t0() + secs(10)).await;
    assert_eq!(agent, "ann");
    for (name, count) in [
        ("HandoffQueued", 2),
        ("HandoffOffered", 2),
        ("HandoffAssigned", 1),
        ("AssignmentCompleted", 1),
    ] {
        assert_eq!(
            events(&store, &format!("tandem.routing.v1.{name}")).await,
            count,
            "{name}"
        );
    }
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

async fn skills_levels_and_language_pick_the_agent(store: Store) {
    let t = tenant();
    online(&store, "junior", &[("billing", 2)], 3).await;
    online(&store, "senior", &[("billing", 8)], 3).await;
    let mut english = profile("english", &[("billing", 9)], 3);
    english.languages = vec![2];
    store.register_agent(&t, &english, t0()).await.unwrap();
    store
        .set_presence(
            &t,
            "english",
            Presence::Online,
            PresenceReason::Manual,
            "",
            t0(),
        )
        .await
        .unwrap();
    let mut needs = handoff("h1", "c1");
    needs.skills = vec![SkillRequirement {
        name: "billing".into(),
        min_level: 5,
    }];
    enqueue(&store, &needs, t0()).await;
    let (_, agent) = offer(&store, "h1", t0()).await;
    assert_eq!(agent, "senior", "level 5 needed, Chinese speaker");
    let mut nobody = handoff("h2", "c2");
    nobody.skills = vec![SkillRequirement {
        name: "legal".into(),
        min_level: 1,
    }];
    enqueue(&store, &nobody, t0()).await;
    assert_eq!(
        store.offer_ticket(&t, "h2", t0()).await.unwrap(),
        OfferOutcome::NoAgent
    );
}

async fn decline_and_timeout_requeue_and_skip_the_agent(store: Store) {
    let t = tenant();
    online(&store, "ann", &[("billing", 9)], 2).await;
    online(&store, "bob", &[("billing", 1)], 2).await;
    enqueue(&store, &handoff("h1", "c1"), t0()).await;
    let (first, agent) = offer(&store, "h1", t0()).await;
    assert_eq!(agent, "ann", "best skill match first");
    let ticket = store
        .decline(&t, "ann", &first, "busy", t0() + secs(1))
        .await
        .unwrap();
    assert_eq!(ticket.state, TicketState::Queued);
    assert_eq!(store.agent(&t, "ann").await.unwrap().load, 0);
    assert!(matches!(
        store
            .decline(&t, "ann", &first, "again", t0() + secs(1))
            .await,
        Err(RoutingError::OfferTaken(_))
    ));
    let (second, agent) = offer(&store, "h1", t0() + secs(1)).await;
    assert_eq!(agent, "bob", "the agent who declined is passed over");
    // Bob lets it expire (default offer timeout 30 s).
    assert!(
        store
            .expire_offers(t0() + secs(20), 100, 0)
            .await
            .unwrap()
            .is_empty()
    );
    let expired = store.expire_offers(t0() + secs(40), 100, 0).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].1.id, second);
    assert_eq!(
        store.ticket(&t, "h1").await.unwrap().state,
        TicketState::Queued
    );
    assert!(matches!(
        store.accept(&t, "bob", &second, t0() + secs(41)).await,
        Err(RoutingError::OfferExpired(_))
    ));
    // Both turned it down: it goes to them again rather than wait forever.
    let (_, agent) = offer(&store, "h1", t0() + secs(42)).await;
    assert_eq!(agent, "ann");
    assert_eq!(store.ticket(&t, "h1").await.unwrap().attempts, 3);
    assert_eq!(events(&store, "tandem.routing.v1.HandoffDeclined").await, 1);
    assert_eq!(events(&store, "tandem.routing.v1.HandoffTimedOut").await, 1);
    let lapse = outbox::<rpb::HandoffTimedOut>(&store).await[0].lapse;
    assert_eq!(lapse, rpb::OfferLapse::Expired as i32);
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

async fn an_offer_accepted_late_expires_and_frees_the_agent(store: Store) {
    let t = tenant();
    online(&store, "ann", &[], 1).await;
    enqueue(&store, &handoff("h1", "c1"), t0()).await;
    let (offer_id, _) = offer(&store, "h1", t0()).await;
    assert!(matches!(
        store.accept(&t, "ann", &offer_id, t0() + secs(31)).await,
        Err(RoutingError::OfferExpired(_))
    ));
    assert_eq!(store.agent(&t, "ann").await.unwrap().load, 0);
    assert_eq!(
        store.ticket(&t, "h1").await.unwrap().state,
        TicketState::Queued
    );
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

async fn priority_orders_the_queue_and_position_follows(store: Store) {
    let t = tenant();
    let mut spec = QueueSpec::open("default");
    spec.weights = PriorityWeights {
        vip_boost: 30.0,
        emotion_weight: 20.0,
        ageing_per_second: 0.0,
    };
    store.upsert_queue(&t, &spec, t0()).await.unwrap();
    enqueue(&store, &handoff("plain", "c1"), t0()).await;
    let mut angry = handoff("angry", "c2");
    angry.severity = 1.0;
    enqueue(&store, &angry, t0() + secs(1)).await;
    let mut vip = handoff("vip", "c3");
    vip.vip = true;
    enqueue(&store, &vip, t0() + secs(2)).await;
    let queue = store.queue(&t, "default").await.unwrap();
    assert_eq!(
        store.queued_ids(&t, &queue, 10).await.unwrap(),
        ["vip", "angry", "plain"]
    );
    let plain = store.ticket(&t, "plain").await.unwrap();
    let view = store
        .position(&t, plain, ETA, t0() + secs(3))
        .await
        .unwrap();
    assert_eq!(view.position, 3);
    assert_eq!(
        view.eta_seconds, 180,
        "no history: 60 s per position, no agent online"
    );
    assert!(view.within_business_hours);

    // With ageing, the oldest ticket overtakes a VIP boost once it has waited long enough.
    spec.weights.ageing_per_second = 1.0;
    store.upsert_queue(&t, &spec, t0()).await.unwrap();
    let queue = store.queue(&t, "default").await.unwrap();
    assert_eq!(store.queued_ids(&t, &queue, 10).await.unwrap()[0], "vip");
    let mut late = handoff("late", "c4");
    late.vip = true;
    late.requested_at = t0() + secs(100);
    enqueue(&store, &late, t0() + secs(100)).await;
    assert_eq!(
        store.queued_ids(&t, &queue, 10).await.unwrap(),
        ["vip", "angry", "plain", "late"],
        "late's boost of 30 is less than the 98 s others waited longer"
    );

    // A served ticket feeds the service rate: 1 assignment in 15 minutes.
    online(&store, "ann", &[], 1).await;
    let (offer_id, _) = offer(&store, "vip", t0() + secs(101)).await;
    store
        .accept(&t, "ann", &offer_id, t0() + secs(102))
        .await
        .unwrap();
    let plain = store.ticket(&t, "plain").await.unwrap();
    let view = store
        .position(&t, plain, ETA, t0() + secs(103))
        .await
        .unwrap();
    assert_eq!(view.position, 2);
    assert_eq!(view.eta_seconds, 1800, "2 positions at 1/15 per minute");
    let stats = store
        .queue_stats(&t, &[], ETA, t0() + secs(103))
        .await
        .unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].0.depth, 3);
    assert_eq!(stats[0].0.agents_online, 1);
    assert_eq!(stats[0].0.agents_available, 0);
    assert!((stats[0].0.service_rate_per_minute - 1.0 / 15.0).abs() < 1e-9);
}

async fn out_of_hours_and_full_queues_return_to_the_bot(store: Store) {
    let t = tenant();
    let mut spec = QueueSpec::open("default");
    spec.hours = BusinessHours {
        timezone: "+08:00".into(),
        windows: vec![WeeklyWindow {
            day: 1,
            start_minute: 9 * 60,
            end_minute: 18 * 60,
        }],
        holidays: Vec::new(),
    };
    spec.max_length = 1;
    store.upsert_queue(&t, &spec, t0()).await.unwrap();
    // t0 is Monday 10:00 UTC = 18:00 local: closed.
    enqueue(&store, &handoff("late", "c1"), t0()).await;
    assert_eq!(
        store.ticket(&t, "late").await.unwrap().state,
        TicketState::Returned
    );
    let open = t0() - secs(6 * 3600);
    enqueue(&store, &handoff("h1", "c2"), open).await;
    assert_eq!(
        store.ticket(&t, "h1").await.unwrap().state,
        TicketState::Queued
    );
    enqueue(&store, &handoff("h2", "c3"), open).await;
    assert_eq!(
        store.ticket(&t, "h2").await.unwrap().state,
        TicketState::Returned,
        "max_length 1"
    );
    assert_eq!(events(&store, "tandem.routing.v1.HandoffReturned").await, 2);
}

async fn overflow_widens_skills_then_moves_the_ticket(store: Store) {
    let t = tenant();
    let mut spec = QueueSpec::open("default");
    spec.overflow = vec![
        OverflowStep {
            after: Duration::from_secs(60),
            action: OverflowAction::WidenSkills(vec!["legal".into()]),
        },
        OverflowStep {
            after: Duration::from_secs(120),
            action: OverflowAction::MoveToQueue("backup".into()),
        },
    ];
    store.upsert_queue(&t, &spec, t0()).await.unwrap();
    store
        .upsert_queue(&t, &QueueSpec::open("backup"), t0())
        .await
        .unwrap();
    let mut hard = handoff("h1", "c1");
    hard.skills = vec![
        SkillRequirement {
            name: "legal".into(),
            min_level: 5,
        },
        SkillRequirement {
            name: "vip".into(),
            min_level: 5,
        },
    ];
    enqueue(&store, &hard, t0()).await;
    assert!(
        store
            .apply_overflow(t0() + secs(30), ETA)
            .await
            .unwrap()
            .is_empty()
    );
    store.apply_overflow(t0() + secs(61), ETA).await.unwrap();
    let ticket = store.ticket(&t, "h1").await.unwrap();
    assert_eq!(
        ticket
            .skills
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["vip"]
    );
    let touched = store.apply_overflow(t0() + secs(121), ETA).await.unwrap();
    assert_eq!(touched, [(t.clone(), "backup".to_owned())]);
    assert_eq!(store.ticket(&t, "h1").await.unwrap().queue_id, "backup");
}

async fn transfers_move_the_assignment(store: Store) {
    let t = tenant();
    online(&store, "ann", &[], 2).await;
    online(&store, "bob", &[], 2).await;
    store
        .upsert_queue(&t, &QueueSpec::open("tier2"), t0())
        .await
        .unwrap();
    enqueue(&store, &handoff("h1", "c1"), t0()).await;
    let (offer_id, first) = offer(&store, "h1", t0()).await;
    store.accept(&t, &first, &offer_id, t0()).await.unwrap();
    let second = if first == "ann" { "bob" } else { "ann" };

    // Warm to the other agent: the first keeps it until the second accepts.
    assert!(matches!(
        store
            .transfer(
                &t,
                "h1",
                Some(second),
                TransferKind::Warm,
                &TransferTarget::Agent(first.clone()),
                "",
                t0()
            )
            .await,
        Err(RoutingError::NotYours(_))
    ));
    assert!(matches!(
        store
            .transfer(
                &t,
                "h1",
                Some(&first),
                TransferKind::Warm,
                &TransferTarget::Agent("ghost".into()),
                "",
                t0()
            )
            .await,
        Err(RoutingError::NotFound(_))
    ));
    let (ticket, warm, from) = store
        .transfer(
            &t,
            "h1",
            Some(&first),
            TransferKind::Warm,
            &TransferTarget::Agent(second.into()),
            "refund approved, needs the form",
            t0() + secs(1),
        )
        .await
        .unwrap();
    assert_eq!(from, first);
    assert_eq!(ticket.state, TicketState::Assigned);
    assert_eq!(ticket.assigned_agent_id.as_deref(), Some(first.as_str()));
    assert_eq!(
        ticket.transfer_note.as_deref(),
        Some("refund approved, needs the form")
    );
    let warm = warm.unwrap();
    assert_eq!(warm.agent_id, second);
    assert_eq!(violations(&store).await, Vec::<String>::new());
    let accepted = store
        .accept(&t, second, &warm.id, t0() + secs(2))
        .await
        .unwrap();
    assert_eq!(accepted.previous_agent.as_deref(), Some(first.as_str()));
    assert_eq!(accepted.ticket.assigned_agent_id.as_deref(), Some(second));
    assert_eq!(store.agent(&t, &first).await.unwrap().load, 0);

    // Cold to a queue: released at once and queued there, not for the agent who let it go.
    let (ticket, none, _) = transfer(
        &store,
        "h1",
        second,
        TransferKind::Cold,
        TransferTarget::Queue("tier2".into()),
        t0() + secs(3),
    )
    .await;
    assert!(none.is_none());
    assert_eq!(ticket.state, TicketState::Queued);
    assert_eq!(ticket.queue_id, "tier2");
    assert_eq!(store.agent(&t, second).await.unwrap().load, 0);
    let (_, agent) = offer(&store, "h1", t0() + secs(4)).await;
    assert_eq!(agent, first);
    assert_eq!(
        events(&store, "tandem.routing.v1.HandoffTransferred").await,
        2
    );
    assert_eq!(
        events(&store, "tandem.routing.v1.AssignmentCompleted").await,
        2
    );
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

/// Transfers `ticket` away from `from` without a note, which must succeed: the store's answer.
async fn transfer(
    store: &Store,
    ticket: &str,
    from: &str,
    kind: TransferKind,
    target: TransferTarget,
    at: DateTime<Utc>,
) -> (TicketRecord, Option<OfferRecord>, String) {
    store
        .transfer(&tenant(), ticket, Some(from), kind, &target, "", at)
        .await
        .unwrap()
}

fn skill_names(skills: &[SkillRequirement]) -> Vec<String> {
    let mut names: Vec<String> = skills.iter().map(|s| s.name.clone()).collect();
    names.sort();
    names
}

/// A transfer takes the target queue's skill requirements and leaves the old queue's behind; a
/// transfer to a named agent drops the queue's requirement (the handoff's own skills stay).
async fn transfers_take_the_target_queues_skills(store: Store) {
    let t = tenant();
    let needs = |name: &str| SkillRequirement {
        name: name.into(),
        min_level: 3,
    };
    let mut billing = QueueSpec::open("default");
    billing.required_skills = vec![needs("billing")];
    store.upsert_queue(&t, &billing, t0()).await.unwrap();
    let mut tech = QueueSpec::open("tech");
    tech.required_skills = vec![needs("tech")];
    store.upsert_queue(&t, &tech, t0()).await.unwrap();
    online(&store, "bill", &[("billing", 5), ("vip", 5)], 2).await;
    online(&store, "tess", &[("tech", 5), ("vip", 5)], 2).await;
    online(&store, "nina", &[("vip", 5)], 2).await;
    let mut new = handoff("h1", "c1");
    new.skills = vec![needs("vip")];
    enqueue(&store, &new, t0()).await;
    let (offer_id, agent) = offer(&store, "h1", t0()).await;
    assert_eq!(agent, "bill");
    store.accept(&t, &agent, &offer_id, t0()).await.unwrap();

    // Cold to a queue: its skill, not billing, is needed now.
    let (ticket, _, _) = transfer(
        &store,
        "h1",
        "bill",
        TransferKind::Cold,
        TransferTarget::Queue("tech".into()),
        t0() + secs(1),
    )
    .await;
    assert_eq!(skill_names(&ticket.skills), ["tech", "vip"]);
    let (offer_id, agent) = offer(&store, "h1", t0() + secs(1)).await;
    assert_eq!(agent, "tess");
    store
        .accept(&t, &agent, &offer_id, t0() + secs(1))
        .await
        .unwrap();

    // Warm to a queue: once accepted there, the ticket needs that queue's skills.
    let (_, warm, _) = transfer(
        &store,
        "h1",
        "tess",
        TransferKind::Warm,
        TransferTarget::Queue("default".into()),
        t0() + secs(2),
    )
    .await;
    let warm = warm.unwrap();
    assert_eq!(warm.agent_id, "bill");
    let accepted = store
        .accept(&t, "bill", &warm.id, t0() + secs(2))
        .await
        .unwrap();
    assert_eq!(accepted.ticket.queue_id, "default");
    assert_eq!(skill_names(&accepted.ticket.skills), ["billing", "vip"]);

    // Cold to a named agent without the queue's skill.
    let (ticket, _, _) = transfer(
        &store,
        "h1",
        "bill",
        TransferKind::Cold,
        TransferTarget::Agent("nina".into()),
        t0() + secs(3),
    )
    .await;
    assert_eq!(skill_names(&ticket.skills), ["vip"]);
    let (_, agent) = offer(&store, "h1", t0() + secs(3)).await;
    assert_eq!(agent, "nina");
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

/// A queue that is the target of a pending warm-transfer offer is not deleted: the ticket stays
/// in its own queue until the offer is accepted, and would then enter the deleted queue.
async fn a_queue_with_a_pending_transfer_to_it_is_not_deleted(store: Store) {
    let t = tenant();
    store
        .upsert_queue(&t, &QueueSpec::open("default"), t0())
        .await
        .unwrap();
    store
        .upsert_queue(&t, &QueueSpec::open("tech"), t0())
        .await
        .unwrap();
    online(&store, "bill", &[], 2).await;
    online(&store, "tess", &[], 2).await;
    enqueue(&store, &handoff("h1", "c1"), t0()).await;
    let (offer_id, holder) = offer(&store, "h1", t0()).await;
    store.accept(&t, &holder, &offer_id, t0()).await.unwrap();

    for round in 0..2 {
        let at = t0() + secs(1 + round);
        let (_, warm, _) = transfer(
            &store,
            "h1",
            &holder,
            TransferKind::Warm,
            TransferTarget::Queue("tech".into()),
            at,
        )
        .await;
        let warm = warm.unwrap();
        assert_eq!(warm.queue_id, "tech");
        assert!(matches!(
            store.delete_queue(&t, "tech").await,
            Err(RoutingError::FailedPrecondition(m)) if m.contains("pending transfer")
        ));
        assert!(store.queue(&t, "tech").await.is_ok());
        if round == 0 {
            // Declined: the queue is no longer anyone's target, but the first round goes on.
            store
                .decline(&t, &warm.agent_id, &warm.id, "busy", at)
                .await
                .unwrap();
        } else {
            let accepted = store
                .accept(&t, &warm.agent_id, &warm.id, at)
                .await
                .unwrap();
            assert_eq!(accepted.ticket.queue_id, "tech");
        }
        assert_eq!(violations(&store).await, Vec::<String>::new());
    }
    // The ticket is assigned in "tech" now: still refused, for the live ticket.
    assert!(matches!(
        store.delete_queue(&t, "tech").await,
        Err(RoutingError::FailedPrecondition(m)) if m.contains("live tickets")
    ));
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

/// Replicas share dialog's durable consumer, so a handoff can be handled after its own
/// cancellation or its conversation's closing. It is then refused: the customer has left.
/// Memory of the cancellations and closings is kept until pruned.
async fn a_handoff_handled_after_its_cancellation_or_closing_is_refused(store: Store) {
    let t = tenant();
    online(&store, "ann", &[], 2).await;
    let cancelled = store
        .cancel_handoff(&t, "c1", "h1", None, t0())
        .await
        .unwrap();
    assert_eq!(cancelled, Unassigned::default());
    let closed = store
        .close_conversation(&t, "c2", None, t0())
        .await
        .unwrap();
    assert_eq!(closed, Unassigned::default());
    // Redelivered cancellations and closings remember nothing twice.
    store
        .cancel_handoff(&t, "c1", "h1", None, t0() + secs(1))
        .await
        .unwrap();

    for (new, why) in [
        (handoff("h1", "c1"), "handoff h1 was cancelled"),
        (handoff("h2", "c2"), "conversation c2 was closed"),
    ] {
        let refused = store
            .enqueue_and_offer(&t, &new, None, ETA, t0() + secs(2))
            .await;
        assert!(
            matches!(&refused, Err(RoutingError::AlreadyExists(m)) if m.contains(why)),
            "{refused:?}"
        );
        assert!(matches!(
            store.ticket(&t, &new.handoff_id).await,
            Err(RoutingError::NotFound(_))
        ));
    }
    // Another handoff of the conversation whose earlier handoff was cancelled is queued.
    enqueue(&store, &handoff("h3", "c1"), t0() + secs(3)).await;
    assert_eq!(events(&store, "tandem.routing.v1.HandoffQueued").await, 1);
    assert_eq!(store.agent(&t, "ann").await.unwrap().load, 0);

    // Forgotten once pruned.
    assert_eq!(store.prune_ended(t0()).await.unwrap(), 0);
    assert_eq!(store.prune_ended(t0() + secs(60)).await.unwrap(), 2);
    enqueue(&store, &handoff("h2", "c2"), t0() + secs(61)).await;
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

/// A handoff and its cancellation, or its conversation's closing, handled at the same moment
/// (two replicas): whichever commits first, the other sees it, so no live ticket is left for a
/// customer who has left.
async fn a_handoff_racing_its_cancellation_leaves_no_live_ticket(store: Store) {
    let t = tenant();
    online(&store, "ann", &[], 50).await;
    let rounds = if matches!(store.db(), Db::Postgres(_)) {
        60
    } else {
        15
    };
    let (mut refused, mut ended) = (0, 0);
    for round in 0..rounds {
        let (id, conversation) = (format!("h{round}"), format!("c{round}"));
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let enqueuing = {
            let (store, start, t) = (store.clone(), start.clone(), t.clone());
            let new = handoff(&id, &conversation);
            tokio::spawn(async move {
                start.wait().await;
                store
                    .enqueue_and_offer(&t, &new, None, ETA, t0())
                    .await
                    .map(|_| ())
            })
        };
        let ending = {
            let (store, start, t) = (store.clone(), start.clone(), t.clone());
            let (id, conversation) = (id.clone(), conversation.clone());
            tokio::spawn(async move {
                start.wait().await;
                if round % 2 == 0 {
                    store
                        .cancel_handoff(&t, &conversation, &id, None, t0())
                        .await
                } else {
                    store
                        .close_conversation(&t, &conversation, None, t0())
                        .await
                }
            })
        };
        ending.await.unwrap().unwrap();
        match enqueuing.await.unwrap() {
            Ok(()) => ended += 1,
            Err(RoutingError::AlreadyExists(_)) => refused += 1,
            Err(other) => panic!("round {round}: enqueue failed: {other}"),
        }
        let live = scalar(
            &store,
            "SELECT COUNT(*) FROM routing_tickets WHERE state IN ('queued', 'offered', \
             'assigned')",
        )
        .await;
        assert_eq!(
            live, 0,
            "round {round}: a live ticket for a customer who left"
        );
    }
    assert_eq!(refused + ended, rounds);
    assert_eq!(store.agent(&t, "ann").await.unwrap().load, 0);
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

async fn customers_who_leave_or_cancel_free_everything(store: Store) {
    let t = tenant();
    online(&store, "ann", &[], 2).await;
    enqueue(&store, &handoff("h1", "c1"), t0()).await;
    enqueue(&store, &handoff("h2", "c2"), t0()).await;
    enqueue(&store, &handoff("h3", "c3"), t0()).await;
    offer(&store, "h1", t0()).await;
    let (offer_id, _) = offer(&store, "h2", t0()).await;
    store.accept(&t, "ann", &offer_id, t0()).await.unwrap();

    let gone = store
        .close_conversation(&t, "c1", Some(("routing-closed", "e1")), t0() + secs(5))
        .await
        .unwrap();
    assert_eq!(gone.ticket.unwrap().state, TicketState::Abandoned);
    assert_eq!(gone.revoked.len(), 1);
    let again = store
        .close_conversation(&t, "c1", Some(("routing-closed", "e1")), t0() + secs(5))
        .await
        .unwrap();
    assert!(again.ticket.is_none(), "redelivery is a no-op");
    let closed = store
        .close_conversation(&t, "c2", None, t0() + secs(6))
        .await
        .unwrap();
    assert_eq!(closed.ticket.unwrap().state, TicketState::Completed);
    assert_eq!(store.agent(&t, "ann").await.unwrap().load, 0);
    let cancelled = store
        .cancel_handoff(&t, "c3", "h3", None, t0() + secs(7))
        .await
        .unwrap();
    assert_eq!(cancelled.ticket.unwrap().state, TicketState::Returned);
    assert_eq!(
        events(&store, "tandem.routing.v1.HandoffAbandoned").await,
        1
    );
    // The conversation whose handoff was cancelled can hand off again later; a closed one
    // cannot (closing is final in dialog).
    enqueue(&store, &handoff("h4", "c3"), t0() + secs(8)).await;
    assert!(matches!(
        store
            .enqueue(&t, &handoff("h5", "c1"), None, ETA, t0() + secs(8))
            .await,
        Err(RoutingError::AlreadyExists(_))
    ));
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

/// Opens a warm transfer of the assigned `ticket` from `from` to `to`; returns the offer id.
async fn warm_to(store: &Store, ticket: &str, from: &str, to: &str, at: DateTime<Utc>) -> String {
    let (_, offer, _) = transfer(
        store,
        ticket,
        from,
        TransferKind::Warm,
        TransferTarget::Agent(to.into()),
        at,
    )
    .await;
    offer.unwrap().id
}

/// Withdrawing a warm transfer's offer (the handoff cancelled, the customer gone, the
/// assignment completed, the conversation resolved in dialog) is reported with
/// `HandoffTimedOut`, as any offer withdrawn from an agent, and clears the target's offer and
/// load; the current agent keeps a cancelled handoff's conversation.
async fn a_withdrawn_warm_transfer_offer_is_reported(store: Store) {
    let t = tenant();
    online(&store, "ann", &[], 3).await;
    online(&store, "bob", &[], 3).await;
    let timed_out = "tandem.routing.v1.HandoffTimedOut";
    let mut withdrawn = 0;
    for (n, ending) in ["cancel", "close", "complete", "resolve"]
        .into_iter()
        .enumerate()
    {
        let at = t0() + secs(10 * i64::try_from(n).unwrap());
        let (id, conversation) = (format!("h{n}"), format!("c{n}"));
        enqueue(&store, &handoff(&id, &conversation), at).await;
        let (offer_id, holder) = offer(&store, &id, at).await;
        store.accept(&t, &holder, &offer_id, at).await.unwrap();
        let target = if holder == "ann" { "bob" } else { "ann" };
        let target_load = store.agent(&t, target).await.unwrap().load;
        let warm = warm_to(&store, &id, &holder, target, at + secs(1)).await;
        assert_eq!(store.pending_offers(&t, target).await.unwrap().len(), 1);
        let revoked = match ending {
            "cancel" => {
                store
                    .cancel_handoff(&t, &conversation, &id, None, at + secs(2))
                    .await
                    .unwrap()
                    .revoked
            }
            "close" => {
                store
                    .close_conversation(&t, &conversation, None, at + secs(2))
                    .await
                    .unwrap()
                    .revoked
            }
            "complete" => {
                store
                    .complete(&t, &id, Some(&holder), Disposition::Resolved, at + secs(2))
                    .await
                    .unwrap()
                    .1
            }
            _ => {
                store
                    .resolve_handoff(&t, &id, &conversation, None, at + secs(2))
                    .await
                    .unwrap()
                    .unwrap()
                    .1
            }
        };
        withdrawn += 1;
        assert_eq!(revoked.len(), 1, "{ending}");
        assert_eq!(revoked[0].id, warm, "{ending}");
        assert_eq!(events(&store, timed_out).await, withdrawn, "{ending}");
        assert_eq!(
            store.offer(&t, &warm).await.unwrap().state,
            tandem_routing::store::OfferState::Revoked,
            "{ending}"
        );
        assert!(store.pending_offers(&t, target).await.unwrap().is_empty());
        assert_eq!(store.agent(&t, target).await.unwrap().load, target_load);
        let ticket = store.ticket(&t, &id).await.unwrap();
        assert_eq!(ticket.offered_agent_id, None, "{ending}");
        if ending == "cancel" {
            assert_eq!(ticket.state, TicketState::Assigned);
            assert_eq!(ticket.assigned_agent_id.as_deref(), Some(holder.as_str()));
        } else {
            assert_eq!(ticket.state, TicketState::Completed);
        }
        assert_eq!(violations(&store).await, Vec::<String>::new());
    }
    // The event names the handoff, the withdrawn offer and its agent.
    let withdrawals = outbox::<rpb::HandoffTimedOut>(&store).await;
    let first = &withdrawals[0];
    assert_eq!(first.handoff_id, "h0");
    assert_eq!(first.conversation_id, "c0");
    assert!(!first.offer_id.is_empty() && !first.agent_id.is_empty());
    // Withdrawn, not missed by the target.
    let lapses: Vec<i32> = withdrawals.iter().map(|e| e.lapse).collect();
    assert_eq!(lapses, vec![rpb::OfferLapse::Withdrawn as i32; 4]);
}

/// Dialog's `ConversationResolved` completes the assignment of the handoff it names, RESOLVED,
/// once: the agent's unit is freed and the conversation can hand off again. A redelivery, a
/// resolution of a ticket of another conversation, a waiting ticket or one already completed
/// change nothing.
async fn a_resolution_in_dialog_completes_the_assignment_once(store: Store) {
    let t = tenant();
    let completed = "tandem.routing.v1.AssignmentCompleted";
    online(&store, "ann", &[], 2).await;
    enqueue(&store, &handoff("h1", "c1"), t0()).await;
    let (offer_id, holder) = offer(&store, "h1", t0()).await;
    store.accept(&t, &holder, &offer_id, t0()).await.unwrap();
    enqueue(&store, &handoff("h2", "c2"), t0()).await;
    assert_eq!(store.agent(&t, "ann").await.unwrap().load, 1);

    // Named with another conversation, or a waiting ticket: nothing.
    let claim = |id: &'static str| Some(("routing-dialog", id));
    let at = t0() + secs(5);
    let other = store.resolve_handoff(&t, "h1", "c2", claim("e0"), at);
    assert!(other.await.unwrap().is_none());
    let waiting = store.resolve_handoff(&t, "h2", "c2", claim("e1"), at);
    assert!(waiting.await.unwrap().is_none());
    assert_eq!(
        store.ticket(&t, "h2").await.unwrap().state,
        TicketState::Queued
    );
    assert_eq!(events(&store, completed).await, 0);

    let (done, revoked) = store
        .resolve_handoff(&t, "h1", "c1", claim("e2"), at)
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.is_empty());
    assert_eq!(done.agent_id, "ann");
    assert_eq!(done.ticket.state, TicketState::Completed);
    assert_eq!(done.ticket.disposition, Some(Disposition::Resolved));
    assert_eq!(store.agent(&t, "ann").await.unwrap().load, 0);
    let reported = outbox::<rpb::AssignmentCompleted>(&store).await;
    assert_eq!(reported.len(), 1);
    assert_eq!(reported[0].handoff_id, "h1");
    assert_eq!(reported[0].disposition, rpb::Disposition::Resolved as i32);

    // The same event again, and the same resolution as another event: nothing.
    let again = store.resolve_handoff(&t, "h1", "c1", claim("e2"), at + secs(1));
    assert!(again.await.unwrap().is_none());
    let later = store.resolve_handoff(&t, "h1", "c1", claim("e3"), at + secs(1));
    assert!(later.await.unwrap().is_none());
    assert_eq!(events(&store, completed).await, 1);

    // The conversation's next handoff is queued, not refused.
    enqueue(&store, &handoff("h3", "c1"), at + secs(2)).await;
    assert_eq!(
        store.ticket(&t, "h3").await.unwrap().state,
        TicketState::Queued
    );
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

async fn presence_loss_returns_offers_to_the_queue(store: Store) {
    let t = tenant();
    online(&store, "ann", &[], 2).await;
    enqueue(&store, &handoff("h1", "c1"), t0()).await;
    offer(&store, "h1", t0()).await;
    let opened = store
        .open_session(&t, "ann", "s1", None, None, GRACE, t0())
        .await
        .unwrap();
    assert_eq!(opened.agent.presence, Presence::Online);
    assert_eq!((opened.session_id.as_str(), opened.resumed), ("s1", false));
    let epoch = opened.epoch;
    assert!(
        store
            .heartbeat(&t, "ann", "s1", epoch, t0() + secs(5))
            .await
            .unwrap()
    );
    assert!(
        !store
            .heartbeat(&t, "ann", "other", epoch, t0() + secs(5))
            .await
            .unwrap()
    );
    // Silent for longer than the timeout: AWAY, offer expired, ticket queued again.
    let changed = store
        .sweep_sessions(
            t0() + secs(40),
            Duration::from_secs(30),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].1.presence, Presence::Away);
    assert_eq!(
        store.ticket(&t, "h1").await.unwrap().state,
        TicketState::Queued
    );
    assert_eq!(store.agent(&t, "ann").await.unwrap().load, 0);
    // The stream ends: OFFLINE once the grace period is over.
    store
        .close_session(&t, "ann", "s1", epoch, t0() + secs(41))
        .await
        .unwrap();
    assert!(
        store
            .sweep_sessions(
                t0() + secs(45),
                Duration::from_secs(30),
                Duration::from_secs(10)
            )
            .await
            .unwrap()
            .is_empty()
    );
    let changed = store
        .sweep_sessions(
            t0() + secs(52),
            Duration::from_secs(30),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(changed[0].1.presence, Presence::Offline);
    assert_eq!(violations(&store).await, Vec::<String>::new());
    // The offers an agent lost by going away were not missed by them.
    let lapses: Vec<i32> = outbox::<rpb::HandoffTimedOut>(&store)
        .await
        .iter()
        .map(|e| e.lapse)
        .collect();
    assert!(
        lapses.contains(&(rpb::OfferLapse::AgentUnavailable as i32)),
        "{lapses:?}"
    );
}

/// The session sweep lists lost sessions without locks; an agent who sends a heartbeat or opens a
/// new session between that list and the sweep taking its row keeps its presence. PostgreSQL
/// only: the test holds the agents' rows so the sweep waits, and changes them meanwhile.
async fn a_session_sweep_spares_agents_who_came_back(store: Store) {
    let t = tenant();
    let timeout = Duration::from_secs(30);
    online(&store, "ann", &[], 2).await;
    online(&store, "bob", &[], 2).await;
    store
        .open_session(&t, "ann", "s-ann", None, None, GRACE, t0())
        .await
        .unwrap();
    let bob = store
        .open_session(&t, "bob", "s-bob", None, None, GRACE, t0())
        .await
        .unwrap();
    store
        .close_session(&t, "bob", "s-bob", bob.epoch, t0())
        .await
        .unwrap();
    // Ann has been silent past the timeout, Bob's session closed past the grace period.
    let now = t0() + secs(60);
    let Db::Postgres(pool) = store.db() else {
        panic!("PostgreSQL only");
    };
    let mut held = pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM routing_agents WHERE tenant = $1 ORDER BY id FOR UPDATE")
        .bind(t.as_str())
        .fetch_all(&mut *held)
        .await
        .unwrap();
    let sweep = tokio::spawn({
        let store = store.clone();
        async move { store.sweep_sessions(now, timeout, GRACE).await }
    });
    // The sweep has listed both agents once it waits for a row lock.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweep never waited for the agents"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Ann's heartbeat and Bob's new session (as the store writes them) commit first.
    sqlx::query("UPDATE routing_agents SET last_heartbeat_at = $1 WHERE id = 'ann'")
        .bind(now.timestamp_micros())
        .execute(&mut *held)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE routing_agents SET session_id = 's-bob-2', session_epoch = session_epoch + 1, \
         session_closed_at = NULL, last_session_id = NULL, last_heartbeat_at = $1 \
         WHERE id = 'bob'",
    )
    .bind(now.timestamp_micros())
    .execute(&mut *held)
    .await
    .unwrap();
    held.commit().await.unwrap();
    let changed = tokio::time::timeout(Duration::from_secs(10), sweep)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        changed.is_empty(),
        "{:?}",
        changed
            .iter()
            .map(|(_, a)| (a.profile.id.clone(), a.presence))
            .collect::<Vec<_>>()
    );
    for id in ["ann", "bob"] {
        assert_eq!(
            store.agent(&t, id).await.unwrap().presence,
            Presence::Online,
            "{id}"
        );
    }
    assert_eq!(
        events(&store, "tandem.routing.v1.AgentPresenceChanged").await,
        2
    );
}

/// Many tasks route the same tickets to the same agents at once, accept, decline and complete;
/// afterwards the tables hold no double assignment and no agent above capacity.
async fn concurrent_routing_never_double_assigns_or_overfills(store: Store) {
    const AGENTS: usize = 12;
    const TICKETS: usize = 80;
    for i in 0..AGENTS {
        online(&store, &format!("agent-{i:02}"), &[], 2).await;
    }
    for i in 0..TICKETS {
        enqueue(
            &store,
            &handoff(&format!("h{i:03}"), &format!("c{i:03}")),
            t0(),
        )
        .await;
    }
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let t = tenant();
            let at = t0() + secs(1);
            let mut assigned = 0;
            for round in 0..3u64 {
                let mut ids: Vec<usize> = (0..TICKETS).collect();
                // Each worker walks the tickets in its own order, so they collide.
                ids.rotate_left(((worker * 11 + round * 7) % TICKETS as u64) as usize);
                for i in ids {
                    let id = format!("h{i:03}");
                    let outcome = loop {
                        match store.offer_ticket(&t, &id, at).await {
                            Err(e) if e.is_conflict() => continue,
                            other => break other.unwrap(),
                        }
                    };
                    let OfferOutcome::Offered(made) = outcome else {
                        continue;
                    };
                    let offer = &made.1;
                    // Everyone races to accept (only the offered agent may), some decline.
                    if (i as u64 + worker).is_multiple_of(5) {
                        let _ = store
                            .decline(&t, &offer.agent_id, &offer.id, "no", at)
                            .await;
                    } else {
                        for _ in 0..2 {
                            if store
                                .accept(&t, &offer.agent_id, &offer.id, at)
                                .await
                                .is_ok()
                            {
                                assigned += 1;
                            }
                        }
                        if (i as u64 + worker).is_multiple_of(7) {
                            let _ = store
                                .complete(&t, &id, None, Disposition::Resolved, at)
                                .await;
                        }
                    }
                }
            }
            assigned
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.unwrap();
    }
    assert_eq!(violations(&store).await, Vec::<String>::new());
    let active = scalar(
        &store,
        "SELECT COUNT(*) FROM routing_assignments WHERE ended_at IS NULL",
    )
    .await;
    let total = scalar(&store, "SELECT COUNT(*) FROM routing_assignments").await;
    assert_eq!(
        total, accepted,
        "every accept that succeeded made exactly one assignment"
    );
    assert!(active <= (AGENTS * 2) as i64);
    assert!(active > 0);
    assert_eq!(
        scalar(
            &store,
            "SELECT COUNT(*) FROM routing_tickets WHERE state = 'assigned'"
        )
        .await,
        active
    );
}

/// Batched offers: 6 workers claim batches of the same queue at once (SKIP LOCKED), each
/// matching in memory and reserving capacity with one conditional update, then accept or
/// decline; one batch spreads over agents, capacity is never exceeded, nothing is assigned
/// twice, and every ticket ends assigned once the agents have room for all.
async fn batched_offers_spread_respect_capacity_and_assign_once(store: Store) {
    const AGENTS: usize = 10;
    const TICKETS: usize = 90;
    for i in 0..AGENTS {
        online(&store, &format!("agent-{i:02}"), &[], 10).await;
    }
    for i in 0..TICKETS {
        enqueue(
            &store,
            &handoff(&format!("h{i:03}"), &format!("c{i:03}")),
            t0(),
        )
        .await;
    }
    let t = tenant();
    let first = store.offer_queued(&t, "default", 8, t0()).await.unwrap();
    assert_eq!(first.claimed, 8);
    assert_eq!(first.offered.len(), 8);
    let agents: std::collections::HashSet<&str> = first
        .offered
        .iter()
        .map(|(_, offer)| offer.agent_id.as_str())
        .collect();
    assert_eq!(
        agents.len(),
        8,
        "one batch spreads over equally good agents"
    );
    for (ticket, offer) in &first.offered {
        assert_eq!(ticket.state, TicketState::Offered);
        assert_eq!(
            ticket.offered_agent_id.as_deref(),
            Some(offer.agent_id.as_str())
        );
        assert_eq!(
            store.ticket(&t, &ticket.id).await.unwrap().state,
            TicketState::Offered
        );
    }
    assert_eq!(violations(&store).await, Vec::<String>::new());
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for worker in 0..6usize {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let t = tenant();
            let at = t0() + secs(1);
            let mut assigned = 0;
            let mut idle = 0;
            let mut declined = false;
            while idle < 5 {
                let batch = match store.offer_queued(&t, "default", 4 + worker, at).await {
                    Err(e) if e.is_conflict() => continue,
                    other => other.unwrap(),
                };
                if batch.offered.is_empty() {
                    idle += 1;
                    tokio::task::yield_now().await;
                    continue;
                }
                idle = 0;
                for (_, offer) in batch.offered {
                    if !declined && worker == 0 {
                        declined = true;
                        store
                            .decline(&t, &offer.agent_id, &offer.id, "busy", at)
                            .await
                            .unwrap();
                        continue;
                    }
                    store
                        .accept(&t, &offer.agent_id, &offer.id, at)
                        .await
                        .unwrap();
                    assigned += 1;
                }
            }
            assigned
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.unwrap();
    }
    // The first batch's offers are still pending: accept them now.
    for (_, offer) in &first.offered {
        store
            .accept(&t, &offer.agent_id, &offer.id, t0() + secs(2))
            .await
            .unwrap();
        accepted += 1;
    }
    // A ticket declined in the race may still wait; one more pass offers it.
    let last = store
        .offer_queued(&t, "default", 8, t0() + secs(3))
        .await
        .unwrap();
    for (_, offer) in &last.offered {
        store
            .accept(&t, &offer.agent_id, &offer.id, t0() + secs(3))
            .await
            .unwrap();
        accepted += 1;
    }
    assert_eq!(violations(&store).await, Vec::<String>::new());
    assert_eq!(accepted, TICKETS as i64);
    assert_eq!(
        scalar(
            &store,
            "SELECT COUNT(*) FROM routing_tickets WHERE state = 'assigned'"
        )
        .await,
        TICKETS as i64
    );
    assert_eq!(
        scalar(&store, "SELECT COUNT(*) FROM routing_assignments").await,
        TICKETS as i64
    );
    assert_eq!(
        scalar(
            &store,
            "SELECT COUNT(*) FROM routing_agents WHERE active_load > capacity"
        )
        .await,
        0
    );
    // Room for 10 more: of 11 late tickets, 10 are offered and the last stays queued.
    for i in 0..11 {
        enqueue(
            &store,
            &handoff(&format!("late-{i:02}"), &format!("c-late-{i:02}")),
            t0() + secs(4),
        )
        .await;
    }
    let full = store
        .offer_queued(&t, "default", 16, t0() + secs(4))
        .await
        .unwrap();
    assert_eq!((full.claimed, full.offered.len()), (11, 10));
    let none = store
        .offer_queued(&t, "default", 16, t0() + secs(4))
        .await
        .unwrap();
    assert_eq!((none.claimed, none.offered.len()), (1, 0));
    assert_eq!(
        scalar(
            &store,
            "SELECT COUNT(*) FROM routing_tickets WHERE state = 'queued'"
        )
        .await,
        1
    );
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

/// The HandoffPositionUpdated payloads in the outbox, in order: (handoff, position, eta).
async fn position_updates(store: &Store) -> Vec<(String, i32, i32)> {
    outbox::<rpb::HandoffPositionUpdated>(store)
        .await
        .into_iter()
        .map(|e| {
            assert_eq!(e.queue_id, "default");
            assert!(e.conversation_id.starts_with('c'));
            (e.handoff_id, e.position, e.eta_seconds)
        })
        .collect()
}

/// Waiting customers hear when their place moves: the first position travels in HandoffQueued,
/// changes of position (tickets ahead assigned) or of the ETA beyond the threshold are
/// published as HandoffPositionUpdated, at most once per interval per ticket, once across
/// replicas running the same round.
async fn position_changes_are_published_once_per_interval(store: Store) {
    let t = tenant();
    for i in 1..=3 {
        let at = t0() + chrono::Duration::milliseconds(i);
        enqueue(&store, &handoff(&format!("h{i}"), &format!("c{i}")), at).await;
    }
    let updates = PositionUpdates {
        interval: Duration::from_secs(5),
        eta_delta: Duration::from_secs(40),
        scan_limit: 100,
    };
    // Nothing moved, and the enqueue's position is too recent anyway.
    assert_eq!(
        store
            .report_positions(t0() + secs(1), updates, ETA)
            .await
            .unwrap(),
        0
    );
    // Two agents come online (nothing offered yet): ETAs halve, positions stay. Only moves
    // beyond 40 s are published: h1 60 -> 30 is not, h2 120 -> 60 and h3 180 -> 90 are.
    online(&store, "ann", &[], 1).await;
    online(&store, "bob", &[], 1).await;
    assert_eq!(
        store
            .report_positions(t0() + secs(6), updates, ETA)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        position_updates(&store).await,
        [("h2".to_owned(), 2, 60), ("h3".to_owned(), 3, 90)]
    );
    // h1 is offered and accepted: the others move up, but not before their interval is over.
    let (offer_id, agent) = offer(&store, "h1", t0() + secs(7)).await;
    store
        .accept(&t, &agent, &offer_id, t0() + secs(7))
        .await
        .unwrap();
    assert_eq!(
        store
            .report_positions(t0() + secs(8), updates, ETA)
            .await
            .unwrap(),
        0
    );
    // Two replicas run the same round: each change is published once.
    let (a, b) = tokio::join!(
        store.report_positions(t0() + secs(12), updates, ETA),
        store.report_positions(t0() + secs(12), updates, ETA)
    );
    assert_eq!(a.unwrap() + b.unwrap(), 2);
    let published = position_updates(&store).await;
    assert_eq!(published.len(), 4);
    let mut moved: Vec<(String, i32)> = published[2..]
        .iter()
        .map(|(id, position, _)| (id.clone(), *position))
        .collect();
    moved.sort();
    assert_eq!(moved, [("h2".to_owned(), 1), ("h3".to_owned(), 2)]);
    // Nothing changes: nothing is published, however often the round runs.
    for at in [13, 18, 30] {
        assert_eq!(
            store
                .report_positions(t0() + secs(at), updates, ETA)
                .await
                .unwrap(),
            0
        );
    }
    // A scan limit of one looks at the first waiting ticket only.
    let (offer_id, agent) = offer(&store, "h2", t0() + secs(31)).await;
    store
        .accept(&t, &agent, &offer_id, t0() + secs(31))
        .await
        .unwrap();
    enqueue(&store, &handoff("h4", "c4"), t0() + secs(31)).await;
    let first_only = PositionUpdates {
        scan_limit: 1,
        ..updates
    };
    assert_eq!(
        store
            .report_positions(t0() + secs(40), first_only, ETA)
            .await
            .unwrap(),
        1
    );
    assert_eq!(position_updates(&store).await.last().unwrap().0, "h3");
    assert_eq!(events(&store, "tandem.routing.v1.HandoffQueued").await, 4);
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

/// A queue's statistics are reported when they change, at most once per interval, and again
/// every five minutes while they do not, so a consumer can tell fresh figures from stale ones.
/// Each report says whether the queue is within its business hours and whether it is the
/// default queue.
async fn queue_stats_are_reported_on_change_and_refreshed_while_unchanged(store: Store) {
    let t = tenant();
    let mut billing = QueueSpec::open("billing");
    billing.scenario_ids = vec!["refunds".into()];
    // t0 is Monday 10:00 UTC; the queue closes at 10:03.
    billing.hours = BusinessHours {
        timezone: "+00:00".into(),
        windows: vec![WeeklyWindow {
            day: 1,
            start_minute: 9 * 60,
            end_minute: 10 * 60 + 3,
        }],
        holidays: Vec::new(),
    };
    store.upsert_queue(&t, &billing, t0()).await.unwrap();
    store
        .upsert_queue(&t, &QueueSpec::open("default"), t0())
        .await
        .unwrap();
    let interval = Duration::from_secs(5);
    let report = |at: DateTime<Utc>| {
        let store = &store;
        async move { store.report_queue_stats(at, interval, ETA).await.unwrap() }
    };
    assert_eq!(report(t0()).await, 2);
    // Unchanged within five minutes: nothing.
    assert_eq!(report(t0() + secs(60)).await, 0);
    // The billing queue closes: reported at once.
    assert_eq!(report(t0() + secs(181)).await, 1);
    assert_eq!(report(t0() + secs(182)).await, 0);
    // Five minutes without a change: each queue is reported again.
    assert_eq!(report(t0() + secs(301)).await, 1);
    assert_eq!(report(t0() + secs(400)).await, 0);
    assert_eq!(report(t0() + secs(482)).await, 1);
    let seen: Vec<(String, Option<bool>, bool, Vec<String>)> =
        outbox::<rpb::QueueStatsReported>(&store)
            .await
            .into_iter()
            .map(|e| {
                (
                    e.queue_id,
                    e.within_business_hours,
                    e.default_queue,
                    e.scenario_ids,
                )
            })
            .collect();
    let billing = |open: bool| {
        (
            "billing".to_owned(),
            Some(open),
            false,
            vec!["refunds".to_owned()],
        )
    };
    let default = ("default".to_owned(), Some(true), true, Vec::new());
    assert_eq!(
        seen,
        vec![
            billing(true),
            default.clone(),
            billing(false),
            default,
            billing(false)
        ]
    );
}

/// Business hours in IANA zones: Europe/Berlin on the day clocks go forward (a fixed +01:00
/// would open an hour late), Asia/Shanghai on a weekday and a holiday; an unknown zone is
/// refused naming the field and nothing is stored.
async fn business_hours_in_iana_zones(store: Store) {
    let t = tenant();
    let queue = |id: &str, zone: &str, days: std::ops::RangeInclusive<u32>, close: u32| {
        let mut spec = QueueSpec::open(id);
        spec.hours = BusinessHours {
            timezone: zone.into(),
            windows: days
                .map(|day| WeeklyWindow {
                    day,
                    start_minute: 9 * 60,
                    end_minute: close * 60,
                })
                .collect(),
            holidays: vec!["2026-10-01".into()],
        };
        spec
    };
    store
        .upsert_queue(&t, &queue("berlin", "Europe/Berlin", 1..=7, 17), t0())
        .await
        .unwrap();
    store
        .upsert_queue(&t, &queue("shanghai", "Asia/Shanghai", 1..=5, 18), t0())
        .await
        .unwrap();
    assert_eq!(
        store.queue(&t, "berlin").await.unwrap().spec.hours.timezone,
        "Europe/Berlin"
    );
    let refused = store
        .upsert_queue(&t, &queue("mars", "Mars/Olympus", 1..=5, 18), t0())
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, RoutingError::InvalidArgument(m) if m.contains("queue.business_hours.timezone")),
        "{refused}"
    );
    assert!(matches!(
        store.queue(&t, "mars").await,
        Err(RoutingError::NotFound(_))
    ));
    let at = |m, d, h, min| Utc.with_ymd_and_hms(2026, m, d, h, min, 0).unwrap();
    let cases = [
        // Sunday 2026-03-29, summer time from 02:00: 06:59 UTC is 08:59, 07:00 UTC is 09:00.
        ("berlin", at(3, 29, 6, 59), TicketState::Returned),
        ("berlin", at(3, 29, 7, 0), TicketState::Queued),
        // The Saturday before, winter time: 07:30 UTC is 08:30, 08:00 UTC is 09:00.
        ("berlin", at(3, 28, 7, 30), TicketState::Returned),
        ("berlin", at(3, 28, 8, 0), TicketState::Queued),
        // Monday 2026-09-28 in Shanghai (UTC+8): 00:30 UTC is 08:30, 01:30 UTC is 09:30,
        // 10:00 UTC is 18:00.
        ("shanghai", at(9, 28, 0, 30), TicketState::Returned),
        ("shanghai", at(9, 28, 1, 30), TicketState::Queued),
        ("shanghai", at(9, 28, 10, 0), TicketState::Returned),
        // National Day, a Thursday, 10:00 local.
        ("shanghai", at(10, 1, 2, 0), TicketState::Returned),
    ];
    for (i, (queue_id, when, expected)) in cases.into_iter().enumerate() {
        let id = format!("tz-{i}");
        let mut new = handoff(&id, &format!("tz-conv-{i}"));
        new.queue_id = queue_id.into();
        new.requested_at = when;
        enqueue(&store, &new, when).await;
        let ticket = store.ticket(&t, &id).await.unwrap();
        assert_eq!(ticket.queue_id, queue_id);
        assert_eq!(ticket.state, expected, "{queue_id} at {when}");
    }
    assert_eq!(events(&store, "tandem.routing.v1.HandoffReturned").await, 5);
    assert_eq!(events(&store, "tandem.routing.v1.HandoffQueued").await, 3);
}

/// A desk reconnecting within the grace period with its session's id resumes it: same id, no
/// presence change, the pending offer still there, the older stream of the id replaced (its
/// heartbeat and its end no longer count). An unknown, expired or other agent's id opens a new
/// session.
async fn sessions_resume_within_the_grace_period(store: Store) {
    let t = tenant();
    online(&store, "ann", &[], 2).await;
    online(&store, "bob", &[], 2).await;
    enqueue(&store, &handoff("h1", "c1"), t0()).await;
    let (offer_id, agent) = offer(&store, "h1", t0()).await;
    let presence_events = events(&store, "tandem.routing.v1.AgentPresenceChanged").await;
    let first = store
        .open_session(&t, &agent, "s1", None, Some(Presence::Online), GRACE, t0())
        .await
        .unwrap();
    assert_eq!((first.session_id.as_str(), first.resumed), ("s1", false));
    store
        .close_session(&t, &agent, "s1", first.epoch, t0() + secs(1))
        .await
        .unwrap();
    assert_eq!(store.current_session(&t, &agent).await.unwrap(), None);

    // Back within the grace period: the same session, still online, the offer still pending.
    let resumed = store
        .open_session(
            &t,
            &agent,
            "s2",
            Some("s1"),
            Some(Presence::Online),
            GRACE,
            t0() + secs(5),
        )
        .await
        .unwrap();
    assert_eq!((resumed.session_id.as_str(), resumed.resumed), ("s1", true));
    assert_eq!(resumed.replaced, None);
    assert!(resumed.epoch > first.epoch);
    assert_eq!(resumed.agent.presence, Presence::Online);
    assert_eq!(
        store.current_session(&t, &agent).await.unwrap().as_deref(),
        Some("s1")
    );
    assert_eq!(
        events(&store, "tandem.routing.v1.AgentPresenceChanged").await,
        presence_events,
        "no presence flap"
    );
    let pending = store.pending_offers(&t, &agent).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].0.id, offer_id);
    // The grace period of the old end does not apply any more.
    assert!(
        store
            .sweep_sessions(t0() + secs(20), Duration::from_secs(30), GRACE)
            .await
            .unwrap()
            .is_empty()
    );
    // The first stream's heartbeat and end no longer count; the resumed stream's do.
    assert!(
        !store
            .heartbeat(&t, &agent, "s1", first.epoch, t0() + secs(21))
            .await
            .unwrap()
    );
    assert!(
        store
            .heartbeat(&t, &agent, "s1", resumed.epoch, t0() + secs(21))
            .await
            .unwrap()
    );
    store
        .close_session(&t, &agent, "s1", first.epoch, t0() + secs(21))
        .await
        .unwrap();
    assert_eq!(
        store.current_session(&t, &agent).await.unwrap().as_deref(),
        Some("s1")
    );

    // Resuming a session whose stream has not ended yet (the server did not notice the drop)
    // replaces that stream.
    let again = store
        .open_session(&t, &agent, "s3", Some("s1"), None, GRACE, t0() + secs(22))
        .await
        .unwrap();
    assert_eq!((again.session_id.as_str(), again.resumed), ("s1", true));
    assert_eq!(again.replaced.as_deref(), Some("s1"));
    store
        .close_session(&t, &agent, "s1", again.epoch, t0() + secs(23))
        .await
        .unwrap();

    // Too late (the grace period is over, even before the sweep ran): a new session.
    let late = store
        .open_session(&t, &agent, "s4", Some("s1"), None, GRACE, t0() + secs(34))
        .await
        .unwrap();
    assert_eq!((late.session_id.as_str(), late.resumed), ("s4", false));
    // Unknown, and another agent's session: new sessions too.
    let unknown = store
        .open_session(&t, &agent, "s5", Some("nope"), None, GRACE, t0() + secs(35))
        .await
        .unwrap();
    assert_eq!(
        (unknown.session_id.as_str(), unknown.resumed),
        ("s5", false)
    );
    assert_eq!(unknown.replaced.as_deref(), Some("s4"));
    let other = if agent == "ann" { "bob" } else { "ann" };
    let theirs = store
        .open_session(&t, other, "b1", None, None, GRACE, t0() + secs(35))
        .await
        .unwrap();
    store
        .close_session(&t, other, "b1", theirs.epoch, t0() + secs(36))
        .await
        .unwrap();
    let stolen = store
        .open_session(&t, &agent, "s6", Some("b1"), None, GRACE, t0() + secs(37))
        .await
        .unwrap();
    assert_eq!((stolen.session_id.as_str(), stolen.resumed), ("s6", false));
    // Once the agent went offline, its last session cannot be resumed.
    store
        .close_session(&t, &agent, "s6", stolen.epoch, t0() + secs(38))
        .await
        .unwrap();
    let swept = store
        .sweep_sessions(t0() + secs(49), Duration::from_secs(30), GRACE)
        .await
        .unwrap();
    assert!(
        swept
            .iter()
            .any(|(_, a)| a.profile.id == agent && a.presence == Presence::Offline)
    );
    let gone = store
        .open_session(&t, &agent, "s7", Some("s6"), None, GRACE, t0() + secs(49))
        .await
        .unwrap();
    assert_eq!((gone.session_id.as_str(), gone.resumed), ("s7", false));
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

/// Desks accept their offers while the same agents' presence flips between ONLINE and AWAY (each
/// flip to AWAY expires their pending offers), offers expire and batches keep offering. Every
/// transaction that touches an agent's offers locks the agent row first, so PostgreSQL never
/// has to abort one of them as a deadlock: no call fails other than with the offer's own fate
/// (expired, taken), and the invariants hold.
async fn accepts_and_presence_flips_never_deadlock(store: Store) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    const AGENTS: usize = 6;
    const TICKETS: usize = 150;
    const FLIPS: usize = 30;
    for i in 0..AGENTS {
        online(&store, &format!("agent-{i}"), &[], 3).await;
    }
    for i in 0..TICKETS {
        enqueue(
            &store,
            &handoff(&format!("h{i:03}"), &format!("c{i:03}")),
            t0(),
        )
        .await;
    }
    let store = Arc::new(store);
    let done = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let at = t0() + secs(1);
    let mut tasks: Vec<tokio::task::JoinHandle<Vec<String>>> = Vec::new();
    // Two routers keep offering until the flips are over.
    for _ in 0..2 {
        let (store, done) = (Arc::clone(&store), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !done.load(Ordering::Relaxed) {
                if let Err(e) = store.offer_queued(&tenant(), "default", 8, at).await {
                    errors.push(format!("offer batch: {e:?}"));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            errors
        }));
    }
    // Offers also expire under them (and missed offers set agents AWAY).
    {
        let (store, done) = (Arc::clone(&store), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !done.load(Ordering::Relaxed) {
                if let Err(e) = store.expire_offers(at + secs(60), 5, 3).await {
                    errors.push(format!("expire: {e:?}"));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            errors
        }));
    }
    let mut flippers = Vec::new();
    for i in 0..AGENTS {
        let agent = format!("agent-{i}");
        // The desk accepts whatever it has and wraps every third up.
        let (store_, done_, accepted_) =
            (Arc::clone(&store), Arc::clone(&done), Arc::clone(&accepted));
        let desk_agent = agent.clone();
        tasks.push(tokio::spawn(async move {
            let (store, agent) = (store_, desk_agent);
            let mut errors = Vec::new();
            while !done_.load(Ordering::Relaxed) {
                let pending = match store.pending_offers(&tenant(), &agent).await {
                    Ok(pending) => pending,
                    Err(e) => {
                        errors.push(format!("pending offers: {e:?}"));
                        continue;
                    }
                };
                for (offer, ticket) in pending {
                    match store.accept(&tenant(), &agent, &offer.id, at).await {
                        Ok(_) => {
                            if accepted_.fetch_add(1, Ordering::Relaxed) % 3 == 0
                                && let Err(e) = store
                                    .complete(
                                        &tenant(),
                                        &ticket.id,
                                        Some(&agent),
                                        Disposition::Resolved,
                                        at,
                                    )
                                    .await
                            {
                                errors.push(format!("complete: {e:?}"));
                            }
                        }
                        // The offer's own fate: a flip to AWAY or the expiry got there first.
                        Err(RoutingError::OfferExpired(_) | RoutingError::OfferTaken(_)) => {}
                        Err(e) => errors.push(format!("accept: {e:?}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            errors
        }));
        // Its presence flips meanwhile.
        let store = Arc::clone(&store);
        flippers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            for round in 0..FLIPS {
                let to = if round % 2 == 0 {
                    Presence::Away
                } else {
                    Presence::Online
                };
                if let Err(e) = store
                    .set_presence(&tenant(), &agent, to, PresenceReason::Manual, "", at)
                    .await
                {
                    errors.push(format!("presence: {e:?}"));
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for flipper in flippers {
        errors.extend(flipper.await.unwrap());
    }
    done.store(true, Ordering::Relaxed);
    for task in tasks {
        errors.extend(task.await.unwrap());
    }
    assert_eq!(errors, Vec::<String>::new());
    assert!(
        accepted.load(Ordering::Relaxed) > 0,
        "accepts went through while presence flipped"
    );
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

fn request(agent: &str, offer: &str) -> AcceptRequest {
    AcceptRequest {
        agent_id: agent.into(),
        offer_id: offer.into(),
    }
}

fn another(agent: &str) -> &'static str {
    ["ann", "bob", "cat"]
        .into_iter()
        .find(|a| *a != agent)
        .unwrap()
}

/// One batch of accepts answers every request on its own: valid offers are assigned together,
/// an expired one is expired (its ticket queued again), someone else's, an unknown, a declined
/// and a repeated one fail alone, and a warm transfer's offer takes the single path; the
/// records returned equal what the database holds.
async fn batched_accepts_answer_each_request_on_its_own(store: Store) {
    let t = tenant();
    for name in ["ann", "bob", "cat"] {
        online(&store, name, &[], 5).await;
    }
    for i in 1..=6 {
        enqueue(&store, &handoff(&format!("h{i}"), &format!("c{i}")), t0()).await;
    }
    // h1 is offered first and expires (30 s) before the batch; the others are offered later.
    let (o1, a1) = offer(&store, "h1", t0()).await;
    let (o2, a2) = offer(&store, "h2", t0() + secs(20)).await;
    let (o3, a3) = offer(&store, "h3", t0() + secs(20)).await;
    let (o4, a4) = offer(&store, "h4", t0() + secs(20)).await;
    let (o5, a5) = offer(&store, "h5", t0() + secs(20)).await;
    let (o6, a6) = offer(&store, "h6", t0() + secs(20)).await;
    store.accept(&t, &a6, &o6, t0() + secs(20)).await.unwrap();
    let target = another(&a6);
    let (_, warm, _) = transfer(
        &store,
        "h6",
        &a6,
        TransferKind::Warm,
        TransferTarget::Agent(target.into()),
        t0() + secs(21),
    )
    .await;
    let warm = warm.unwrap();
    store
        .decline(&t, &a5, &o5, "busy", t0() + secs(22))
        .await
        .unwrap();

    let requests = vec![
        request(&a1, &o1),
        request(&a2, &o2),
        request(another(&a3), &o3),
        request(&a4, &o4),
        request(&a2, &o2),
        request(&a5, &o5),
        request(&a1, "no-such-offer"),
        request(target, &warm.id),
    ];
    let at = t0() + secs(35);
    let results = store.accept_many(&t, &requests, at).await.unwrap();
    assert_eq!(results.len(), requests.len());
    assert!(
        matches!(&results[0], Err(RoutingError::OfferExpired(id)) if *id == o1),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(&results[2], Err(RoutingError::NotYours(_))),
        "{:?}",
        results[2]
    );
    assert!(
        matches!(&results[4], Err(RoutingError::OfferTaken(_))),
        "{:?}",
        results[4]
    );
    assert!(
        matches!(&results[5], Err(RoutingError::OfferTaken(_))),
        "{:?}",
        results[5]
    );
    assert!(
        matches!(&results[6], Err(RoutingError::NotFound(_))),
        "{:?}",
        results[6]
    );
    for (i, (ticket, agent)) in [(1, ("h2", &a2)), (3, ("h4", &a4))] {
        let done = results[i].as_ref().unwrap();
        assert_eq!(done.ticket.state, TicketState::Assigned);
        assert_eq!(
            done.ticket.assigned_agent_id.as_deref(),
            Some(agent.as_str())
        );
        assert_eq!(
            done.offer.state,
            tandem_routing::store::OfferState::Accepted
        );
        assert_eq!(done.previous_agent, None);
        assert_eq!(
            done.ticket,
            store.ticket(&t, ticket).await.unwrap(),
            "the returned ticket is the stored one"
        );
        assert_eq!(
            done.offer,
            store.offer(&t, &done.offer.id).await.unwrap(),
            "the returned offer is the stored one"
        );
    }
    let moved = results[7].as_ref().unwrap();
    assert_eq!(moved.previous_agent.as_deref(), Some(a6.as_str()));
    assert_eq!(moved.ticket.assigned_agent_id.as_deref(), Some(target));

    // The expired offer's ticket is waiting again; the foreign request left o3 pending.
    assert_eq!(
        store.ticket(&t, "h1").await.unwrap().state,
        TicketState::Queued
    );
    assert_eq!(
        store.ticket(&t, "h3").await.unwrap().state,
        TicketState::Offered
    );
    assert_eq!(
        store.ticket(&t, "h5").await.unwrap().state,
        TicketState::Queued
    );
    let late = store
        .accept_many(&t, &[request(&a3, &o3)], t0() + secs(36))
        .await
        .unwrap();
    assert_eq!(
        late[0]
            .as_ref()
            .unwrap()
            .ticket
            .assigned_agent_id
            .as_deref(),
        Some(a3.as_str())
    );
    for (name, count) in [
        // h6 by the single accept, h2 and h4 in the batch, h6 again by the warm transfer, h3.
        ("HandoffAssigned", 5),
        ("HandoffTimedOut", 1),
        ("HandoffDeclined", 1),
    ] {
        assert_eq!(
            events(&store, &format!("tandem.routing.v1.{name}")).await,
            count,
            "{name}"
        );
    }
    assert_eq!(
        scalar(
            &store,
            "SELECT COUNT(*) FROM routing_assignments WHERE ended_at IS NULL"
        )
        .await,
        4
    );
    assert_eq!(violations(&store).await, Vec::<String>::new());
    assert!(store.accept_many(&t, &[], at).await.unwrap().is_empty());
}

/// Accept batches racing over the same offers, from several tasks on one store or (PostgreSQL)
/// from separate connection pools standing in for replicas: every offer is accepted exactly
/// once, every other request for it fails alone (taken, or not the agent's), and the
/// invariants hold.
async fn concurrent_accept_batches_assign_once(stores: Vec<Store>) {
    const AGENTS: usize = 6;
    const TICKETS: usize = 48;
    const TASKS: usize = 4;
    let store = stores[0].clone();
    let t = tenant();
    for i in 0..AGENTS {
        online(&store, &format!("agent-{i:02}"), &[], 10).await;
    }
    for i in 0..TICKETS {
        enqueue(
            &store,
            &handoff(&format!("h{i:03}"), &format!("c{i:03}")),
            t0(),
        )
        .await;
    }
    let mut offers = Vec::new();
    while offers.len() < TICKETS {
        let batch = store
            .offer_queued(&t, "default", 16, t0() + secs(1))
            .await
            .unwrap();
        assert!(
            !batch.offered.is_empty(),
            "the agents have room for every ticket"
        );
        offers.extend(batch.offered.into_iter().map(|(_, o)| (o.id, o.agent_id)));
    }
    let offers = Arc::new(offers);
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = stores[task % stores.len()].clone();
        let offers = Arc::clone(&offers);
        tasks.push(tokio::spawn(async move {
            let t = tenant();
            let mut won = Vec::new();
            let mut lost = 0;
            // Each task asks for every offer twice over in its own order and batch sizes; one
            // in five of its requests names the wrong agent.
            let mut order: Vec<usize> = (0..offers.len()).collect();
            order.rotate_left(task * 11 % offers.len());
            let size = 3 + task * 4;
            for (n, chunk) in order.chunks(size).enumerate() {
                let requests: Vec<AcceptRequest> = chunk
                    .iter()
                    .map(|&i| {
                        let (offer, agent) = &offers[i];
                        if (i + n + task).is_multiple_of(5) {
                            request("agent-99", offer)
                        } else {
                            request(agent, offer)
                        }
                    })
                    .collect();
                let results = loop {
                    match store.accept_many(&t, &requests, t0() + secs(2)).await {
                        Err(e) if e.is_conflict() => continue,
                        other => break other.unwrap(),
                    }
                };
                for (request, result) in requests.iter().zip(results) {
                    match result {
                        Ok(done) => won.push(done.offer.id.clone()),
                        Err(RoutingError::OfferTaken(_)) => lost += 1,
                        Err(RoutingError::NotYours(_)) => {
                            assert_eq!(request.agent_id, "agent-99");
                        }
                        Err(other) => panic!("unexpected {other:?}"),
                    }
                }
            }
            (won, lost)
        }));
    }
    let mut won = Vec::new();
    for task in tasks {
        won.extend(task.await.unwrap().0);
    }
    let accepted = won.len();
    won.sort();
    won.dedup();
    assert_eq!(won.len(), accepted, "no offer was accepted twice");
    // An offer that every task named with the wrong agent stays pending; accept the rest.
    let mut missing = Vec::new();
    for (offer, agent) in offers.iter() {
        if won.binary_search(offer).is_err() {
            missing.push(request(agent, offer));
        }
    }
    for result in store
        .accept_many(&t, &missing, t0() + secs(3))
        .await
        .unwrap()
    {
        result.unwrap();
    }
    assert_eq!(violations(&store).await, Vec::<String>::new());
    assert_eq!(
        scalar(&store, "SELECT COUNT(*) FROM routing_assignments").await,
        TICKETS as i64
    );
    assert_eq!(
        scalar(
            &store,
            "SELECT COUNT(*) FROM routing_tickets WHERE state = 'assigned'"
        )
        .await,
        TICKETS as i64
    );
    assert_eq!(
        events(&store, "tandem.routing.v1.HandoffAssigned").await,
        TICKETS as i64
    );
}

/// A queue deleted while handoffs enter it: each handoff either entered first (and the delete
/// is refused with FAILED_PRECONDITION) or finds the queue gone and goes to the default queue.
/// No live ticket is ever left in a deleted queue.
async fn deleting_a_queue_never_strands_a_ticket(store: Store) {
    let t = tenant();
    let rounds = if matches!(store.db(), Db::Postgres(_)) {
        60
    } else {
        15
    };
    let (mut refused, mut deleted) = (0, 0);
    for round in 0..rounds {
        let queue = format!("q{round}");
        let mut spec = QueueSpec::open(&queue);
        spec.scenario_ids = vec![format!("s{round}")];
        store.upsert_queue(&t, &spec, t0()).await.unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(4));
        let mut tasks = Vec::new();
        for k in 0..3 {
            let (store, start, t) = (store.clone(), start.clone(), t.clone());
            let mut new = handoff(&format!("h{round}-{k}"), &format!("c{round}-{k}"));
            new.queue_id = queue.clone();
            new.scenario_id = format!("s{round}");
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                store.enqueue(&t, &new, None, ETA, t0()).await.map(|_| ())
            }));
        }
        let deleting = {
            let (store, start, t, queue) = (store.clone(), start.clone(), t.clone(), queue.clone());
            tokio::spawn(async move {
                start.wait().await;
                store.delete_queue(&t, &queue).await
            })
        };
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        match deleting.await.unwrap() {
            Ok(()) => deleted += 1,
            Err(RoutingError::FailedPrecondition(_)) => refused += 1,
            Err(other) => panic!("delete failed: {other}"),
        }
        let stranded = scalar(
            &store,
            "SELECT COUNT(*) FROM routing_tickets t WHERE t.state IN \
             ('queued', 'offered', 'assigned') AND NOT EXISTS (SELECT 1 FROM routing_queues q \
             WHERE q.tenant = t.tenant AND q.id = t.queue_id)",
        )
        .await;
        assert_eq!(
            stranded, 0,
            "round {round}: live tickets in a deleted queue"
        );
        let mut tickets = 0;
        for k in 0..3 {
            let ticket = store.ticket(&t, &format!("h{round}-{k}")).await.unwrap();
            assert!(
                ticket.queue_id == queue || ticket.queue_id == "default",
                "round {round}: ticket in {}",
                ticket.queue_id
            );
            tickets += 1;
        }
        assert_eq!(tickets, 3);
    }
    assert_eq!(refused + deleted, rounds);
    assert_eq!(violations(&store).await, Vec::<String>::new());
}

async fn accept_batches_race_on_one_store(store: Store) {
    concurrent_accept_batches_assign_once(vec![store]).await;
}

macro_rules! store_contract_tests {
    ($engine:ident: $($case:ident),* $(,)?) => {
        mod $engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _keep) = super::$engine().await;
                    super::$case(store).await;
                }
            )*
        }
    };
}

macro_rules! both_engines {
    ($($case:ident),* $(,)?) => {
        store_contract_tests!(postgres: $($case),*);
        store_contract_tests!(sqlite: $($case),*);
    };
}

both_engines!(
    agents_register_update_list_and_validate,
    queues_upsert_list_and_delete,
    enqueue_is_idempotent_by_handoff_id,
    enqueue_and_offer_offers_at_once_only_to_the_first_in_line,
    offer_reserves_capacity_and_accept_assigns_exactly_once,
    skills_levels_and_language_pick_the_agent,
    decline_and_timeout_requeue_and_skip_the_agent,
    an_offer_accepted_late_expires_and_frees_the_agent,
    priority_orders_the_queue_and_position_follows,
    out_of_hours_and_full_queues_return_to_the_bot,
    overflow_widens_skills_then_moves_the_ticket,
    transfers_move_the_assignment,
    transfers_take_the_target_queues_skills,
    customers_who_leave_or_cancel_free_everything,
    a_new_handoff_replaces_the_waiting_one_of_its_conversation,
    a_withdrawn_warm_transfer_offer_is_reported,
    a_resolution_in_dialog_completes_the_assignment_once,
    deleting_a_queue_never_strands_a_ticket,
    a_queue_with_a_pending_transfer_to_it_is_not_deleted,
    a_handoff_handled_after_its_cancellation_or_closing_is_refused,
    a_handoff_racing_its_cancellation_leaves_no_live_ticket,
    presence_loss_returns_offers_to_the_queue,
    concurrent_routing_never_double_assigns_or_overfills,
    batched_offers_spread_respect_capacity_and_assign_once,
    position_changes_are_published_once_per_interval,
    business_hours_in_iana_zones,
    queue_stats_are_reported_on_change_and_refreshed_while_unchanged,
    sessions_resume_within_the_grace_period,
    batched_accepts_answer_each_request_on_its_own,
    accept_batches_race_on_one_store,
);

// Lock ordering matters only where rows are locked: PostgreSQL (SQLite has one writer).
mod postgres_locking {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn accepts_and_presence_flips_never_deadlock() {
        let (store, _keep) = super::postgres().await;
        super::accepts_and_presence_flips_never_deadlock(store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_sweep_spares_agents_who_came_back() {
        let (store, _keep) = super::postgres().await;
        super::a_session_sweep_spares_agents_who_came_back(store).await;
    }

    /// Two connection pools on one database stand in for two replicas batching accepts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn accept_batches_of_two_replicas_assign_once() {
        let pg = tandem_testkit::shared_postgres().await;
        let url = pg.fresh_database().await.unwrap();
        let first = super::postgres_pool(&url).await;
        first
            .migrate(Some(
                <super::Routing as tandem_platform::runtime::Service>::migrations(),
            ))
            .await
            .unwrap();
        let first = super::Store::new(first, super::OutboxWaker::default(), "default");
        let second = super::Store::new(
            super::postgres_pool(&url).await,
            super::OutboxWaker::default(),
            "default",
        );
        super::concurrent_accept_batches_assign_once(vec![first, second]).await;
    }
}
