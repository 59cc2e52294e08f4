//! Routing replicas as separate OS processes (the `tandem-routing` binary, configured through
//! `TANDEM_ROUTING__…` variables) on one throwaway PostgreSQL and one nats-server, agent desks
//! over gRPC, a dialog stand-in that publishes `HandoffRequested`, and the invariant checker
//! over the database and the published events. Shared by the fault test and the benchmark.

#![allow(dead_code, clippy::unwrap_used, reason = "test support")]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::Utc;
use tandem_platform::auth::{Role, TokenIssuer};
use tandem_platform::bus::{Bus, Consumer, ConsumerSpec, RawEvent};
use tandem_platform::config::{AuthConfig, BusConfig, BusKind, DatabaseConfig, Secret};
use tandem_platform::db::Db;
use tandem_platform::outbox::OutboxWaker;
use tandem_platform::runtime::Service as _;
use tandem_proto::events::ROUTING;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::dialog::v1::{HandoffPackage, HandoffRequested};
use tandem_proto::pb::routing::v1 as pb;
use tandem_proto::pb::routing::v1::routing_service_client::RoutingServiceClient;
use tandem_routing::Routing;
use tandem_routing::domain::agent::{AgentProfile, Skill};
use tandem_routing::store::Store;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::transport::Channel;

const SECRET: &str = "routing-cluster-secret-routing-cluster-secret";
pub const TENANT: &str = "acme";

pub fn tenant() -> TenantId {
    TenantId::new(TENANT).unwrap()
}

fn auth() -> AuthConfig {
    AuthConfig {
        hs256_secret: Secret::new(SECRET.to_owned()),
        allow_hs256: true,
        ..AuthConfig::default()
    }
}

/// PostgreSQL, NATS, the routing schema migrated, a bus handle for the test.
pub struct Cluster {
    pub pg: tandem_testkit::Postgres,
    pub nats: tandem_testkit::NatsServer,
    pub db_url: String,
    pub db: Db,
    pub store: Store,
    pub bus: Bus,
    pub bus_config: BusConfig,
    pub logs: tempfile::TempDir,
}

/// One `tandem-routing` process.
pub struct Replica {
    pub name: String,
    pub url: String,
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl Replica {
    /// Kills the process with SIGKILL (no shutdown, nothing flushed) and reaps it.
    pub async fn kill9(&mut self) {
        self.child.start_kill().unwrap();
        let status = self.child.wait().await.unwrap();
        assert!(!status.success(), "{} was killed", self.name);
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Cluster {
    pub async fn start() -> Self {
        let pg = tandem_testkit::Postgres::start().await.unwrap();
        let nats = tandem_testkit::NatsServer::start().await.unwrap();
        let db_url = pg.fresh_database().await.unwrap();
        let db = Db::connect(&DatabaseConfig {
            url: Secret::new(db_url.clone()),
            schema: "routing".into(),
            max_connections: 8,
            ..DatabaseConfig::default()
        })
        .await
        .unwrap();
        db.migrate(Some(Routing::migrations())).await.unwrap();
        let store = Store::new(db.clone(), OutboxWaker::default(), "default");
        let bus_config = BusConfig {
            kind: BusKind::Nats,
            nats_url: nats.url(),
            ack_wait: Duration::from_secs(2),
            ..BusConfig::default()
        };
        let bus = Bus::connect(&bus_config, None).await.unwrap();
        bus.ensure_streams().await.unwrap();
        Self {
            pg,
            nats,
            db_url,
            db,
            store,
            bus,
            bus_config,
            logs: tempfile::tempdir().unwrap(),
        }
    }

    /// Registers `count` agents `agent-000…` (capacity `capacity`, skill billing, English),
    /// offline until a desk opens.
    pub async fn agents(&self, count: usize, capacity: i32) -> Vec<String> {
        let mut ids = Vec::new();
        for i in 0..count {
            let profile = AgentProfile {
                id: format!("agent-{i:03}"),
                display_name: format!("Agent {i}"),
                team: "care".into(),
                skills: vec![Skill {
                    name: "billing".into(),
                    level: 1 + (i % 10) as i32,
                }],
                languages: vec![1],
                capacity,
            };
            self.store
                .register_agent(&tenant(), &profile, Utc::now())
                .await
                .unwrap();
            ids.push(profile.id);
        }
        ids
    }

    /// Starts a routing process; `extra` adds or overrides `TANDEM_ROUTING__…` variables.
    pub async fn replica(&self, name: &str, extra: &[(&str, &str)]) -> Replica {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let log = self.logs.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem-routing"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "TANDEM_ROUTING__GRPC__LISTEN_ADDR",
                format!("127.0.0.1:{port}"),
            )
            .env("TANDEM_ROUTING__GRPC__NOT_SERVING_DELAY", "0s")
            .env("TANDEM_ROUTING__TELEMETRY__LOG_FILTER", "warn")
            .env("TANDEM_ROUTING__TELEMETRY__LOG_FORMAT", "json")
            .env("TANDEM_ROUTING__AUTH__ALLOW_HS256", "true")
            .env("TANDEM_ROUTING__AUTH__HS256_SECRET", SECRET)
            .env("TANDEM_ROUTING__DATABASE__URL", &self.db_url)
            .env("TANDEM_ROUTING__DATABASE__SCHEMA", "routing")
            .env("TANDEM_ROUTING__DATABASE__MAX_CONNECTIONS", "16")
            .env("TANDEM_ROUTING__BUS__KIND", "nats")
            .env("TANDEM_ROUTING__BUS__NATS_URL", self.nats.url())
            .env("TANDEM_ROUTING__BUS__STREAM_REPLICAS", "1")
            .env("TANDEM_ROUTING__BUS__ACK_WAIT", "2s")
            .env("TANDEM_ROUTING__OUTBOX__POLL_INTERVAL", "50ms")
            .env("TANDEM_ROUTING__SERVICE__SWEEP_INTERVAL", "200ms");
        for (key, value) in extra {
            command.env(key, value);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut replica = Replica {
            name: name.to_owned(),
            url: format!("http://127.0.0.1:{port}"),
            child,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                replica.running(),
                "{name} exited: {}",
                std::fs::read_to_string(&replica.log).unwrap_or_default()
            );
            let mut admin = client(&replica.url, "admin", &[Role::Admin]).await;
            if let Some(admin) = admin.as_mut()
                && admin
                    .list_queues(pb::ListQueuesRequest::default())
                    .await
                    .is_ok()
            {
                return replica;
            }
            assert!(Instant::now() < deadline, "{name} did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publishes handoffs as dialog does (one `HandoffRequested` each).
    pub async fn publish(&self, events: &[RawEvent]) {
        self.bus.publish_batch(events).await.unwrap();
    }

    /// A consumer of routing's events from the start of the stream.
    pub async fn routing_events(&self, durable: &str) -> Consumer {
        let spec = ConsumerSpec::new(durable, &ROUTING, &self.bus_config)
            .event::<pb::HandoffQueued>()
            .event::<pb::HandoffOffered>()
            .event::<pb::HandoffAssigned>()
            .event::<pb::HandoffTimedOut>();
        self.bus.consumer(&spec).await.unwrap()
    }
}

pub type Client = RoutingServiceClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        Box<dyn FnMut(Request<()>) -> Result<Request<()>, tonic::Status> + Send>,
    >,
>;

/// A client of `url` with a token for `subject`; `None` while the server is not listening.
pub async fn client(url: &str, subject: &str, roles: &[Role]) -> Option<Client> {
    let token = TokenIssuer::from_config(&auth())
        .unwrap()
        .issue(&tenant(), subject, roles, Duration::from_secs(3600))
        .unwrap();
    let channel = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .ok()?;
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    Some(RoutingServiceClient::with_interceptor(
        channel,
        Box::new(move |mut request: Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
            Ok(request)
        }),
    ))
}

/// A `HandoffRequested` of conversation `c-{key}` (handoff `h-{key}`), 2 KB of summary.
pub fn handoff(key: &str) -> RawEvent {
    let handoff_id = format!("h-{key}");
    let conversation_id = format!("c-{key}");
    let package = HandoffPackage {
        handoff_id: handoff_id.clone(),
        conversation_id: conversation_id.clone(),
        scenario_id: "orders".into(),
        summary: vec!["x".repeat(2_000)],
        language: 1,
        priority: 50,
        ..HandoffPackage::default()
    };
    let event = HandoffRequested {
        handoff_id,
        conversation_id: conversation_id.clone(),
        scenario_id: "orders".into(),
        package: Some(package),
        occurred_at: None,
    };
    RawEvent::new(&tenant(), &event, Some(conversation_id))
}

/// What a desk saw.
#[derive(Debug)]
pub enum DeskEvent {
    /// An offer arrived (handoff id), at this instant.
    Offer(String, Instant),
    /// An accept was confirmed (handoff id, agent).
    Assigned(String, String),
    /// The session ended (agent).
    Closed(String),
}

/// An agent's desk: opens `AgentSession` with `presence`, accepts every offer when
/// `accept`, and reports what it sees on `events`. Dropping `commands` ends the session.
pub struct Desk {
    pub agent: String,
    pub commands: mpsc::Sender<pb::AgentSessionRequest>,
}

impl Desk {
    pub async fn open(
        url: &str,
        agent: &str,
        presence: pb::Presence,
        accept: bool,
        events: mpsc::UnboundedSender<DeskEvent>,
    ) -> Desk {
        let mut client = client(url, agent, &[Role::Agent]).await.unwrap();
        let (tx, rx) = mpsc::channel(1024);
        tx.send(pb::AgentSessionRequest {
            request_id: "hello".into(),
            command: Some(pb::agent_session_request::Command::Hello(
                pb::SessionHello {
                    client_version: "cluster".into(),
                    presence: presence.into(),
                    ..pb::SessionHello::default()
                },
            )),
        })
        .await
        .unwrap();
        let mut inbound = client
            .agent_session(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let first = inbound.message().await.unwrap().unwrap();
        assert!(
            matches!(
                first.event,
                Some(pb::agent_session_response::Event::Welcome(_))
            ),
            "{agent}: {first:?}"
        );
        // A desk sends heartbeats, or routing counts the session lost and sets the agent AWAY.
        let beats = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let beat = pb::AgentSessionRequest {
                    request_id: String::new(),
                    command: Some(pb::agent_session_request::Command::Heartbeat(
                        pb::SessionHeartbeat {},
                    )),
                };
                if beats.send(beat).await.is_err() {
                    return;
                }
            }
        });
        let replies = tx.clone();
        let name = agent.to_owned();
        tokio::spawn(async move {
            let _client = client;
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => match message.event {
                        Some(pb::agent_session_response::Event::Offer(offer)) => {
                            let _ = events
                                .send(DeskEvent::Offer(offer.handoff_id.clone(), Instant::now()));
                            if accept {
                                let _ = replies
                                    .send(pb::AgentSessionRequest {
                                        request_id: offer.handoff_id.clone(),
                                        command: Some(pb::agent_session_request::Command::Accept(
                                            pb::SessionAccept { offer_id: offer.id },
                                        )),
                                    })
                                    .await;
                            }
                        }
                        Some(pb::agent_session_response::Event::AssignmentConfirmed(done)) => {
                            let ticket = done.ticket.map(|t| t.id).unwrap_or_default();
                            let _ = events.send(DeskEvent::Assigned(ticket, name.clone()));
                        }
                        _ => {}
                    },
                    Ok(None) | Err(_) => {
                        let _ = events.send(DeskEvent::Closed(name));
                        return;
                    }
                }
            }
        });
        Desk {
            agent: agent.to_owned(),
            commands: tx,
        }
    }

    /// Changes the agent's presence through the session.
    pub async fn set_presence(&self, presence: pb::Presence) {
        self.commands
            .send(pb::AgentSessionRequest {
                request_id: "presence".into(),
                command: Some(pb::agent_session_request::Command::SetPresence(
                    pb::SessionSetPresence {
                        presence: presence.into(),
                        reason: String::new(),
                    },
                )),
            })
            .await
            .unwrap();
    }
}

/// Counts by state over the tickets of the tenant.
pub async fn ticket_states(db: &Db) -> HashMap<String, i64> {
    let Db::Postgres(pool) = db else {
        panic!("the cluster runs on PostgreSQL")
    };
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, COUNT(*) FROM routing_tickets GROUP BY state")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter().collect()
}

/// The invariants of exactly-once assignment, checked by SQL over the database: returns the
/// violations found (empty = none).
pub async fn check_database(db: &Db) -> Vec<String> {
    let Db::Postgres(pool) = db else {
        panic!("the cluster runs on PostgreSQL")
    };
    let mut violations = Vec::new();
    let checks: [(&str, &str); 7] = [
        (
            "conversations with two active assignments",
            "SELECT COUNT(*) FROM (SELECT conversation_id FROM routing_assignments \
             WHERE ended_at IS NULL GROUP BY tenant, conversation_id HAVING COUNT(*) > 1) d",
        ),
        (
            "tickets assigned twice (any time)",
            "SELECT COUNT(*) FROM (SELECT ticket_id FROM routing_assignments \
             GROUP BY tenant, ticket_id HAVING COUNT(*) > 1) d",
        ),
        (
            "tickets with two accepted offers",
            "SELECT COUNT(*) FROM (SELECT ticket_id FROM routing_offers WHERE state = 'accepted' \
             GROUP BY tenant, ticket_id HAVING COUNT(*) > 1) d",
        ),
        (
            "agents over capacity",
            "SELECT COUNT(*) FROM routing_agents WHERE active_load > capacity",
        ),
        (
            "agents whose load is not pending offers + active assignments",
            "SELECT COUNT(*) FROM routing_agents a WHERE a.active_load <> \
             (SELECT COUNT(*) FROM routing_offers o WHERE o.tenant = a.tenant \
              AND o.agent_id = a.id AND o.state = 'pending') + \
             (SELECT COUNT(*) FROM routing_assignments s WHERE s.tenant = a.tenant \
              AND s.agent_id = a.id AND s.ended_at IS NULL)",
        ),
        (
            "assigned tickets without exactly one active assignment to their agent",
            "SELECT COUNT(*) FROM routing_tickets t WHERE t.state = 'assigned' AND 1 <> \
             (SELECT COUNT(*) FROM routing_assignments s WHERE s.tenant = t.tenant \
              AND s.ticket_id = t.id AND s.ended_at IS NULL AND s.agent_id = t.assigned_agent_id)",
        ),
        (
            "offered tickets without exactly one pending offer",
            "SELECT COUNT(*) FROM routing_tickets t WHERE t.state = 'offered' AND 1 <> \
             (SELECT COUNT(*) FROM routing_offers o WHERE o.tenant = t.tenant \
              AND o.ticket_id = t.id AND o.state = 'pending')",
        ),
    ];
    for (what, sql) in checks {
        let (n,): (i64,) = sqlx::query_as(sql).fetch_one(pool).await.unwrap();
        if n != 0 {
            violations.push(format!("{what}: {n}"));
        }
    }
    violations
}

/// Reads routing's events until `quiet` passes without one; returns, per handoff, the distinct
/// `HandoffAssigned` event ids and agents, and checks that no handoff was assigned twice.
pub async fn check_events(consumer: &mut Consumer, quiet: Duration) -> (EventCounts, Vec<String>) {
    let mut counts = EventCounts::default();
    let mut seen = HashSet::new();
    let mut assigned: HashMap<String, HashSet<String>> = HashMap::new();
    while let Ok(next) = tokio::time::timeout(quiet, consumer.next()).await {
        let delivery = next.unwrap();
        let event = delivery.event.clone();
        delivery.ack().await.unwrap();
        if !seen.insert(event.id.clone()) {
            counts.redelivered += 1;
            continue;
        }
        use tandem_proto::events::Event as _;
        if event.type_name == pb::HandoffAssigned::TYPE_NAME {
            let done = event.decode::<pb::HandoffAssigned>().unwrap().event;
            counts.assigned += 1;
            assigned
                .entry(done.handoff_id)
                .or_default()
                .insert(done.agent_id);
        } else if event.type_name == pb::HandoffQueued::TYPE_NAME {
            counts.queued += 1;
        } else if event.type_name == pb::HandoffOffered::TYPE_NAME {
            counts.offered += 1;
        } else if event.type_name == pb::HandoffTimedOut::TYPE_NAME {
            counts.timed_out += 1;
        }
    }
    let mut violations = Vec::new();
    let twice = assigned.values().filter(|agents| agents.len() > 1).count();
    if twice > 0 {
        violations.push(format!("{twice} handoffs assigned to two agents by events"));
    }
    if counts.assigned != assigned.len() {
        violations.push(format!(
            "{} HandoffAssigned events for {} handoffs",
            counts.assigned,
            assigned.len()
        ));
    }
    (counts, violations)
}

/// Distinct routing events seen.
#[derive(Debug, Default)]
pub struct EventCounts {
    pub queued: usize,
    pub offered: usize,
    pub assigned: usize,
    pub timed_out: usize,
    /// Deliveries of an event id already seen (at-least-once delivery; not a violation).
    pub redelivered: usize,
}
