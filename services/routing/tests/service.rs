//! The routing service as clients see it, on both deployments: PostgreSQL with a real
//! nats-server (throwaway servers from the testkit) and the standalone engine (SQLite and the
//! in-process bus). A handoff published by "dialog" reaches an agent's desk session as an offer
//! with its package, is accepted and wrapped up; redelivered requests change nothing; a customer
//! who leaves frees the queue; a conversation the agent resolves in dialog frees the agent;
//! bad input gets precise codes.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tandem_platform::auth::{Role, TokenIssuer};
use tandem_platform::bus::memory::MemoryBus;
use tandem_platform::bus::{Bus, Consumer, ConsumerSpec, RawEvent};
use tandem_platform::config::{
    AuthConfig, BusConfig, BusKind, DatabaseConfig, OutboxConfig, Secret, ServiceConfig,
};
use tandem_proto::events::ROUTING;
use tandem_proto::ids::TenantId;
use tandem_proto::pb::common::v1::{
    Customer, CustomerTier, HandlerKind, PageRequest, SkillRequirement,
};
use tandem_proto::pb::dialog::v1::{
    ConversationClosed, ConversationResolved, HandoffPackage, HandoffRequested,
};
use tandem_proto::pb::routing::v1 as pb;
use tandem_proto::pb::routing::v1::routing_service_client::RoutingServiceClient;
use tandem_routing::Routing;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

const SECRET: &str = "routing-test-secret-routing-test-secret";
const WAIT: Duration = Duration::from_secs(10);

/// Adds the caller's token to every request.
type Authorize = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send>;
type Client = RoutingServiceClient<InterceptedService<Channel, Authorize>>;

#[allow(dead_code, clippy::large_enum_variant, reason = "held for their Drop")]
enum Keep {
    Servers(tandem_testkit::Postgres, tandem_testkit::NatsServer),
    Dir(tempfile::TempDir),
}

struct Rig {
    bus: Bus,
    database: DatabaseConfig,
    bus_config: BusConfig,
    url: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _keep: Keep,
}

fn auth() -> AuthConfig {
    AuthConfig {
        hs256_secret: Secret::new(SECRET.to_owned()),
        allow_hs256: true,
        ..AuthConfig::default()
    }
}

fn tenant() -> TenantId {
    TenantId::new("acme").unwrap()
}

impl Rig {
    async fn production() -> Self {
        Self::production_with(tandem_routing::Settings {
            sweep_interval: Duration::from_millis(100),
            position_update_interval: Duration::from_millis(200),
            ..tandem_routing::Settings::default()
        })
        .await
    }

    async fn production_with(settings: tandem_routing::Settings) -> Self {
        let pg = tandem_testkit::Postgres::start().await.unwrap();
        let nats = tandem_testkit::NatsServer::start().await.unwrap();
        let url = pg.fresh_database().await.unwrap();
        let bus_config = BusConfig {
            kind: BusKind::Nats,
            nats_url: nats.url(),
            ..BusConfig::default()
        };
        let database = DatabaseConfig {
            url: Secret::new(url),
            schema: "routing".into(),
            ..DatabaseConfig::default()
        };
        Self::start(
            database,
            bus_config,
            None,
            settings,
            Keep::Servers(pg, nats),
        )
        .await
    }

    async fn standalone() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let database = DatabaseConfig {
            url: Secret::new(format!(
                "sqlite://{}",
                dir.path().join("routing.db").display()
            )),
            ..DatabaseConfig::default()
        };
        let bus_config = BusConfig {
            kind: BusKind::Memory,
            ..BusConfig::default()
        };
        let settings = tandem_routing::Settings {
            sweep_interval: Duration::from_millis(100),
            position_update_interval: Duration::from_millis(200),
            ..tandem_routing::Settings::default()
        };
        Self::start(
            database,
            bus_config,
            Some(MemoryBus::new()),
            settings,
            Keep::Dir(dir),
        )
        .await
    }

    async fn start(
        database: DatabaseConfig,
        bus_config: BusConfig,
        memory: Option<MemoryBus>,
        settings: tandem_routing::Settings,
        keep: Keep,
    ) -> Self {
        let cfg = ServiceConfig {
            auth: auth(),
            database: database.clone(),
            bus: bus_config.clone(),
            outbox: OutboxConfig {
                poll_interval: Duration::from_millis(50),
                ..OutboxConfig::default()
            },
            service: settings,
            ..ServiceConfig::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let server = {
            let (stop, memory) = (stop.clone(), memory.clone());
            tokio::spawn(async move {
                tandem_platform::runtime::serve_with::<Routing>(
                    cfg,
                    memory.as_ref(),
                    listener,
                    stop,
                )
                .await
            })
        };
        let bus = Bus::connect(&bus_config, memory.as_ref()).await.unwrap();
        bus.ensure_streams().await.unwrap();
        let rig = Self {
            bus,
            database,
            bus_config,
            url,
            stop,
            server,
            _keep: keep,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut admin = rig.client("admin", &[Role::Admin]).await;
            if admin
                .list_queues(pb::ListQueuesRequest::default())
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the service did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        rig
    }

    async fn client(&self, subject: &str, roles: &[Role]) -> Client {
        let token = TokenIssuer::from_config(&auth())
            .unwrap()
            .issue(&tenant(), subject, roles, Duration::from_secs(600))
            .unwrap();
        let channel = Channel::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        let interceptor: Authorize = Box::new(move |mut request: Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
            Ok(request)
        });
        RoutingServiceClient::with_interceptor(channel, interceptor)
    }

    async fn publish(&self, event: RawEvent) {
        self.bus.publish_batch(&[event]).await.unwrap();
    }

    async fn routing_events(&self, name: &str) -> Consumer {
        let spec = ConsumerSpec::new(name, &ROUTING, &self.bus_config)
            .event::<pb::HandoffQueued>()
            .event::<pb::HandoffOffered>()
            .event::<pb::HandoffAssigned>()
            .event::<pb::AssignmentCompleted>()
            .event::<pb::HandoffAbandoned>();
        self.bus.consumer(&spec).await.unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn agent(id: &str, capacity: i32, level: i32) -> pb::Agent {
    pb::Agent {
        id: id.into(),
        display_name: format!("Agent {id}"),
        skills: vec![pb::Skill {
            name: "billing".into(),
            level,
        }],
        languages: vec![1],
        team: "care".into(),
        max_concurrent: capacity,
        ..pb::Agent::default()
    }
}

fn handoff_event(handoff: &str, conversation: &str) -> RawEvent {
    let package = HandoffPackage {
        handoff_id: handoff.into(),
        conversation_id: conversation.into(),
        customer: Some(Customer {
            id: "cust-1".into(),
            display_name: "Li Wei".into(),
            tier: CustomerTier::Vip.into(),
            ..Customer::default()
        }),
        scenario_id: "refunds".into(),
        summary: vec!["I was charged twice for order 1234".into()],
        required_skills: vec![SkillRequirement {
            name: "billing".into(),
            min_level: 2,
        }],
        language: 1,
        priority: 40,
        ..HandoffPackage::default()
    };
    let event = HandoffRequested {
        handoff_id: handoff.into(),
        conversation_id: conversation.into(),
        scenario_id: "refunds".into(),
        package: Some(package),
        occurred_at: None,
    };
    RawEvent::new(&tenant(), &event, Some(conversation.into()))
}

/// A desk session: requests in, events out.
struct Desk {
    tx: mpsc::Sender<pb::AgentSessionRequest>,
    rx: Streaming<pb::AgentSessionResponse>,
}

impl Desk {
    async fn open(client: &mut Client) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let stream = client
            .agent_session(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx: stream }
    }

    async fn send(&self, id: &str, command: pb::agent_session_request::Command) {
        self.tx
            .send(pb::AgentSessionRequest {
                request_id: id.into(),
                command: Some(command),
            })
            .await
            .unwrap();
    }

    async fn next(&mut self) -> pb::AgentSessionResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no session event in time")
            .unwrap()
            .expect("session ended")
    }
}

async fn next_event(consumer: &mut Consumer) -> RawEvent {
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("no routing event in time")
        .unwrap();
    let event = delivery.event.clone();
    delivery.ack().await.unwrap();
    event
}

async fn ticket(client: &mut Client, id: &str) -> pb::Ticket {
    client
        .get_ticket(pb::GetTicketRequest {
            key: Some(pb::get_ticket_request::Key::TicketId(id.into())),
        })
        .await
        .unwrap()
        .into_inner()
        .ticket
        .unwrap()
}

async fn wait_for_state(client: &mut Client, id: &str, state: pb::TicketState) -> pb::Ticket {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = client
            .get_ticket(pb::GetTicketRequest {
                key: Some(pb::get_ticket_request::Key::TicketId(id.into())),
            })
            .await;
        if let Ok(found) = found {
            let found = found.into_inner().ticket.unwrap();
            if found.state == i32::from(state) {
                return found;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ticket {id} never reached {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers `agent` through `client`.
async fn register(client: &mut Client, agent: pb::Agent) {
    client
        .register_agent(pb::RegisterAgentRequest { agent: Some(agent) })
        .await
        .unwrap();
}

/// The agent `id` as the service has it now.
async fn agent_of(client: &mut Client, id: &str) -> pb::Agent {
    client
        .get_agent(pb::GetAgentRequest {
            agent_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .agent
        .unwrap()
}

/// A desk's hello, online, resuming the session `resume` (a new session when empty).
fn hello(resume: &str) -> pb::agent_session_request::Command {
    pb::agent_session_request::Command::Hello(pb::SessionHello {
        client_version: "test/1".into(),
        resume_session_id: resume.into(),
        presence: pb::Presence::Online.into(),
    })
}

/// A desk's accept of the offer `offer_id`.
fn accept(offer_id: &str) -> pb::agent_session_request::Command {
    pb::agent_session_request::Command::Accept(pb::SessionAccept {
        offer_id: offer_id.into(),
    })
}

/// The welcome a desk was sent, or a panic.
fn welcome_of(response: pb::AgentSessionResponse) -> pb::SessionWelcome {
    match response.event {
        Some(pb::agent_session_response::Event::Welcome(welcome)) => welcome,
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// Asserts that the desk gets nothing for a while.
async fn quiet(desk: &mut Desk) {
    assert!(
        tokio::time::timeout(Duration::from_millis(700), desk.rx.message())
            .await
            .is_err(),
        "nothing else is pushed"
    );
}

// ---------------------------------------------------------------------------------------------

async fn a_handoff_reaches_the_desk_once_and_is_assigned(rig: &Rig) {
    use pb::agent_session_request::Command;
    use pb::agent_session_response::Event;
    let mut events = rig.routing_events("test-routing-events").await;
    let mut admin = rig.client("admin", &[Role::Admin]).await;
    register(&mut admin, agent("ann", 2, 5)).await;
    let mut ann = rig.client("ann", &[Role::Agent]).await;
    let mut desk = Desk::open(&mut ann).await;
    desk.send("h", hello("")).await;
    let welcome = desk.next().await;
    assert_eq!(welcome.in_reply_to, "h");
    let Some(Event::Welcome(welcome)) = welcome.event else {
        panic!("expected welcome, got {welcome:?}");
    };
    assert_eq!(
        welcome.agent.unwrap().presence,
        i32::from(pb::Presence::Online)
    );

    let requested = handoff_event("h-1", "conv-1");
    rig.publish(requested.clone()).await;
    let offer = desk.next().await;
    let Some(Event::Offer(offer)) = offer.event else {
        panic!("expected an offer, got {offer:?}");
    };
    assert_eq!(offer.handoff_id, "h-1");
    assert_eq!(offer.attempt, 1);
    let package = offer.package.clone().unwrap();
    assert_eq!(package.summary, ["I was charged twice for order 1234"]);
    assert_eq!(package.customer.unwrap().tier, i32::from(CustomerTier::Vip));

    // The same event again, and another event for the same handoff: still one ticket.
    rig.publish(requested).await;
    rig.publish(handoff_event("h-1", "conv-1")).await;

    desk.send("a", accept(&offer.id)).await;
    let confirmed = desk.next().await;
    assert_eq!(confirmed.in_reply_to, "a");
    let Some(Event::AssignmentConfirmed(confirmed)) = confirmed.event else {
        panic!("expected a confirmation, got {confirmed:?}");
    };
    let assigned = confirmed.ticket.unwrap();
    assert_eq!(assigned.state, i32::from(pb::TicketState::Assigned));
    assert_eq!(assigned.assigned_agent_id, "ann");
    assert!(confirmed.package.is_some());
    // Accepting twice is refused on the session, which stays open.
    desk.send("again", accept(&offer.id)).await;
    let again = desk.next().await;
    let Some(Event::Error(error)) = again.event else {
        panic!("expected an error, got {again:?}");
    };
    assert_eq!(error.code, i32::from(pb::SessionErrorCode::OfferTaken));

    let kinds: Vec<String> = [
        next_event(&mut events).await,
        next_event(&mut events).await,
        next_event(&mut events).await,
    ]
    .iter()
    .map(|e| e.type_name.clone())
    .collect();
    assert_eq!(
        kinds,
        [
            "tandem.routing.v1.HandoffQueued",
            "tandem.routing.v1.HandoffOffered",
            "tandem.routing.v1.HandoffAssigned"
        ]
    );
    let agent = agent_of(&mut admin, "ann").await;
    assert_eq!(agent.active_assignments, 1);

    desk.send(
        "w",
        Command::WrapUp(pb::SessionWrapUp {
            ticket_id: "h-1".into(),
            disposition: pb::Disposition::Resolved.into(),
            notes: "refunded".into(),
        }),
    )
    .await;
    let done = wait_for_state(&mut admin, "h-1", pb::TicketState::Completed).await;
    assert_eq!(done.disposition, i32::from(pb::Disposition::Resolved));
    let completed = next_event(&mut events).await;
    assert_eq!(completed.type_name, "tandem.routing.v1.AssignmentCompleted");

    // A customer who leaves while waiting: ann goes away, the next handoff waits, then closes.
    ann.set_presence(pb::SetPresenceRequest {
        agent_id: String::new(),
        presence: pb::Presence::Away.into(),
        reason: "lunch".into(),
    })
    .await
    .unwrap();
    rig.publish(handoff_event("h-2", "conv-2")).await;
    wait_for_state(&mut admin, "h-2", pb::TicketState::Queued).await;
    let position = admin
        .get_queue_position(pb::GetQueuePositionRequest {
            key: Some(pb::get_queue_position_request::Key::ConversationId(
                "conv-2".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(position.position, 1);
    assert_eq!(position.agents_available, 0);
    assert!(position.eta_seconds > 0);
    let closed = ConversationClosed {
        conversation_id: "conv-2".into(),
        handoff_id: "h-2".into(),
        ..ConversationClosed::default()
    };
    rig.publish(RawEvent::new(&tenant(), &closed, Some("conv-2".into())))
        .await;
    wait_for_state(&mut admin, "h-2", pb::TicketState::Abandoned).await;

    let stats = admin
        .get_queue_stats(pb::GetQueueStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(stats.len(), 1, "the default queue, created on first use");
    assert_eq!(stats[0].depth, 0);
}

/// Takes the desk's next offer, of `handoff`: accepts it and expects the confirmation and the
/// ticket's queued, offered and assigned events, in order.
async fn accept_next_offer(desk: &mut Desk, events: &mut Consumer, request: &str, handoff: &str) {
    use pb::agent_session_response::Event;
    let Some(Event::Offer(offer)) = desk.next().await.event else {
        panic!("expected an offer of {handoff}");
    };
    assert_eq!(offer.handoff_id, handoff);
    desk.send(request, accept(&offer.id)).await;
    assert!(matches!(
        desk.next().await.event,
        Some(Event::AssignmentConfirmed(_))
    ));
    for kind in ["HandoffQueued", "HandoffOffered", "HandoffAssigned"] {
        let event = next_event(events).await;
        assert_eq!(event.type_name, format!("tandem.routing.v1.{kind}"));
    }
}

/// Dialog's `ConversationResolved` for a conversation an agent holds (the agent resolved it
/// through dialog, not through routing): the assignment is completed RESOLVED once, the agent's
/// unit is freed, and the conversation's next handoff is queued and offered to that agent.
/// A next handoff handled before the resolution completes the assignment all the same.
/// Redeliveries and a resolution without a handoff change nothing.
async fn a_resolution_in_dialog_frees_the_agent(rig: &Rig) {
    use prost::Message as _;
    let mut events = rig.routing_events("test-resolution-events").await;
    let mut admin = rig.client("admin", &[Role::Admin]).await;
    // One unit: the next handoff can reach ann only once the first one's unit is freed.
    register(&mut admin, agent("ann", 1, 5)).await;
    let mut ann = rig.client("ann", &[Role::Agent]).await;
    let mut desk = Desk::open(&mut ann).await;
    desk.send("h", hello("")).await;
    welcome_of(desk.next().await);
    rig.publish(handoff_event("v-1", "vconv-1")).await;
    accept_next_offer(&mut desk, &mut events, "a", "v-1").await;
    assert_eq!(agent_of(&mut admin, "ann").await.active_assignments, 1);

    // Ann resolves the conversation in dialog.
    let resolution = ConversationResolved {
        conversation_id: "vconv-1".into(),
        scenario_id: "refunds".into(),
        resolved_by: HandlerKind::Agent.into(),
        agent_id: "ann".into(),
        team: "care".into(),
        handoff_id: "v-1".into(),
        ..ConversationResolved::default()
    };
    let resolved = RawEvent::new(&tenant(), &resolution, Some("vconv-1".into()));
    rig.publish(resolved.clone()).await;
    let done = wait_for_state(&mut admin, "v-1", pb::TicketState::Completed).await;
    assert_eq!(done.disposition, i32::from(pb::Disposition::Resolved));
    assert_eq!(agent_of(&mut admin, "ann").await.active_assignments, 0);
    let completed = next_event(&mut events).await;
    assert_eq!(completed.type_name, "tandem.routing.v1.AssignmentCompleted");
    let completed = pb::AssignmentCompleted::decode(&completed.payload[..]).unwrap();
    assert_eq!(
        (
            completed.handoff_id.as_str(),
            completed.agent_id.as_str(),
            completed.disposition
        ),
        ("v-1", "ann", i32::from(pb::Disposition::Resolved))
    );

    // The same event again, the same resolution as a new event, and a later resolution by the
    // bot without a handoff: nothing more happens.
    rig.publish(resolved).await;
    rig.publish(RawEvent::new(
        &tenant(),
        &resolution,
        Some("vconv-1".into()),
    ))
    .await;
    let by_bot = ConversationResolved {
        conversation_id: "vconv-1".into(),
        resolved_by: HandlerKind::Bot.into(),
        ..ConversationResolved::default()
    };
    rig.publish(RawEvent::new(&tenant(), &by_bot, Some("vconv-1".into())))
        .await;

    // The customer comes back and asks for a human again: a new handoff of the conversation,
    // handled after those events (same ordering key), is queued and reaches ann.
    rig.publish(handoff_event("v-2", "vconv-1")).await;
    // The first event after the completion is the new handoff's: one AssignmentCompleted.
    accept_next_offer(&mut desk, &mut events, "b", "v-2").await;
    let first = ticket(&mut admin, "v-1").await;
    assert_eq!(first.state, i32::from(pb::TicketState::Completed));
    let second = ticket(&mut admin, "v-2").await;
    assert_eq!(second.state, i32::from(pb::TicketState::Assigned));
    assert_eq!(second.assigned_agent_id, "ann");
    assert_eq!(agent_of(&mut admin, "ann").await.active_assignments, 1);

    // Ann resolves again and the customer asks for a human again, but the next handoff is
    // handled before the resolution (another replica holds it, or it waits for a retry): the
    // assignment is completed as resolved all the same, and the new handoff reaches ann.
    rig.publish(handoff_event("v-3", "vconv-1")).await;
    let completed = next_event(&mut events).await;
    assert_eq!(completed.type_name, "tandem.routing.v1.AssignmentCompleted");
    let completed = pb::AssignmentCompleted::decode(&completed.payload[..]).unwrap();
    assert_eq!(completed.handoff_id, "v-2");
    assert_eq!(completed.disposition, i32::from(pb::Disposition::Resolved));
    assert_eq!(
        ticket(&mut admin, "v-2").await.state,
        i32::from(pb::TicketState::Completed)
    );
    // The late resolution changes nothing; the older handoff v-1 again changes nothing either.
    let late = ConversationResolved {
        handoff_id: "v-2".into(),
        ..resolution
    };
    rig.publish(RawEvent::new(&tenant(), &late, Some("vconv-1".into())))
        .await;
    rig.publish(handoff_event("v-1", "vconv-1")).await;
    accept_next_offer(&mut desk, &mut events, "c", "v-3").await;
    assert_eq!(
        ticket(&mut admin, "v-3").await.state,
        i32::from(pb::TicketState::Assigned)
    );
    assert_eq!(agent_of(&mut admin, "ann").await.active_assignments, 1);
}

async fn bad_input_gets_precise_codes(rig: &Rig) {
    use pb::agent_session_request::Command;
    use pb::agent_session_response::Event;
    let mut admin = rig.client("admin", &[Role::Admin]).await;
    let code =
        |r: Result<tonic::Response<pb::RegisterAgentResponse>, Status>| r.unwrap_err().code();
    assert_eq!(
        code(
            admin
                .register_agent(pb::RegisterAgentRequest {
                    agent: Some(agent("x", 0, 3))
                })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            admin
                .register_agent(pb::RegisterAgentRequest {
                    agent: Some(agent("x", 51, 3))
                })
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            admin
                .register_agent(pb::RegisterAgentRequest {
                    agent: Some(agent("x", 2, 11))
                })
                .await
        ),
        Code::InvalidArgument
    );
    register(&mut admin, agent("bob", 2, 3)).await;
    assert_eq!(
        code(
            admin
                .register_agent(pb::RegisterAgentRequest {
                    agent: Some(agent("bob", 2, 3))
                })
                .await
        ),
        Code::AlreadyExists
    );
    let mut bob = rig.client("bob", &[Role::Agent]).await;
    assert_eq!(
        code(
            bob.register_agent(pb::RegisterAgentRequest {
                agent: Some(agent("eve", 2, 3))
            })
            .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        admin
            .get_agent(pb::GetAgentRequest {
                agent_id: "ghost".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        bob.set_presence(pb::SetPresenceRequest {
            agent_id: "admin".into(),
            presence: pb::Presence::Online.into(),
            reason: String::new(),
        })
        .await
        .unwrap_err()
        .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        admin
            .get_ticket(pb::GetTicketRequest {
                key: Some(pb::get_ticket_request::Key::TicketId("nope".into())),
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let zoned = |zone: &str| pb::UpsertQueueRequest {
        queue: Some(pb::Queue {
            id: "billing".into(),
            business_hours: Some(pb::BusinessHours {
                timezone: zone.into(),
                ..pb::BusinessHours::default()
            }),
            ..pb::Queue::default()
        }),
    };
    // A malformed offset with a multi-byte character is refused, not a panic in the handler.
    for zone in ["Mars/Olympus", "+1é1"] {
        let refused = admin.upsert_queue(zoned(zone)).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{zone}");
        assert!(
            refused.message().contains("business_hours.timezone"),
            "{}",
            refused.message()
        );
    }
    let stored = admin
        .upsert_queue(zoned("Asia/Shanghai"))
        .await
        .unwrap()
        .into_inner()
        .queue
        .unwrap();
    assert_eq!(stored.business_hours.unwrap().timezone, "Asia/Shanghai");
    assert_eq!(
        admin
            .list_agents(pb::ListAgentsRequest {
                page: Some(PageRequest {
                    page_size: 101,
                    page_token: String::new(),
                }),
                ..pb::ListAgentsRequest::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        admin
            .transfer_conversation(pb::TransferConversationRequest {
                ticket_id: "nope".into(),
                kind: pb::TransferKind::Cold.into(),
                target: Some(pb::TransferTarget {
                    target: Some(pb::transfer_target::Target::QueueId("default".into())),
                }),
                note: String::new(),
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Someone else's assignment: FAILED_PRECONDITION.
    register(&mut admin, agent("cat", 1, 3)).await;
    let mut cat = rig.client("cat", &[Role::Agent]).await;
    cat.set_presence(pb::SetPresenceRequest {
        agent_id: String::new(),
        presence: pb::Presence::Online.into(),
        reason: String::new(),
    })
    .await
    .unwrap();
    let mut desk = Desk::open(&mut cat).await;
    desk.send("h", Command::Hello(pb::SessionHello::default()))
        .await;
    assert!(matches!(desk.next().await.event, Some(Event::Welcome(_))));
    desk.send("x", accept("nope")).await;
    let Some(Event::Error(error)) = desk.next().await.event else {
        panic!("expected an error");
    };
    assert_eq!(error.code, i32::from(pb::SessionErrorCode::NotFound));
    rig.publish(handoff_event("h-9", "conv-9")).await;
    let Some(Event::Offer(offer)) = desk.next().await.event else {
        panic!("expected an offer");
    };
    desk.send("a", accept(&offer.id)).await;
    assert!(matches!(
        desk.next().await.event,
        Some(Event::AssignmentConfirmed(_))
    ));
    assert_eq!(
        bob.complete_assignment(pb::CompleteAssignmentRequest {
            ticket_id: "h-9".into(),
            disposition: pb::Disposition::Resolved.into(),
            notes: String::new(),
        })
        .await
        .unwrap_err()
        .code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        cat.complete_assignment(pb::CompleteAssignmentRequest {
            ticket_id: "h-9".into(),
            disposition: pb::Disposition::Transferred.into(),
            notes: String::new(),
        })
        .await
        .unwrap_err()
        .code(),
        Code::InvalidArgument
    );
    let done = cat
        .complete_assignment(pb::CompleteAssignmentRequest {
            ticket_id: "h-9".into(),
            disposition: pb::Disposition::ReturnToBot.into(),
            notes: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .ticket
        .unwrap();
    assert_eq!(done.state, i32::from(pb::TicketState::Completed));
    assert_eq!(
        ticket(&mut admin, "h-9").await.disposition,
        i32::from(pb::Disposition::ReturnToBot)
    );

    // A session must open with hello.
    let mut other = Desk::open(&mut bob).await;
    other
        .send("first", Command::Heartbeat(pb::SessionHeartbeat {}))
        .await;
    let Some(Event::Error(error)) = other.next().await.event else {
        panic!("expected a protocol error");
    };
    assert_eq!(error.code, i32::from(pb::SessionErrorCode::Protocol));
}

async fn waiting_customers_hear_their_position_move(rig: &Rig) {
    use prost::Message as _;
    let spec = ConsumerSpec::new("test-positions", &ROUTING, &rig.bus_config)
        .event::<pb::HandoffPositionUpdated>();
    let mut positions = rig.bus.consumer(&spec).await.unwrap();
    let mut admin = rig.client("admin", &[Role::Admin]).await;
    register(&mut admin, agent("dan", 1, 5)).await;
    // Three customers wait while nobody is online: places 1, 2, 3 (in HandoffQueued).
    for i in 1..=3 {
        rig.publish(handoff_event(&format!("p-{i}"), &format!("pconv-{i}")))
            .await;
        wait_for_state(&mut admin, &format!("p-{i}"), pb::TicketState::Queued).await;
    }
    // Dan comes online and is offered the first: the other two move up one place each.
    let mut dan = rig.client("dan", &[Role::Agent]).await;
    dan.set_presence(pb::SetPresenceRequest {
        agent_id: String::new(),
        presence: pb::Presence::Online.into(),
        reason: String::new(),
    })
    .await
    .unwrap();
    wait_for_state(&mut admin, "p-1", pb::TicketState::Offered).await;
    let mut moved = Vec::new();
    while moved.len() < 2 {
        let event = next_event(&mut positions).await;
        let update = pb::HandoffPositionUpdated::decode(&event.payload[..]).unwrap();
        assert_eq!(update.queue_id, "default");
        assert_eq!(
            update.conversation_id,
            update.handoff_id.replace("p-", "pconv-")
        );
        assert!(update.eta_seconds > 0);
        // Each ticket moves up by one place (its first update, once per interval).
        let expected = if update.handoff_id == "p-2" { 1 } else { 2 };
        assert_eq!(update.position, expected, "{update:?}");
        assert!(!moved.iter().any(|(id, _)| *id == update.handoff_id));
        moved.push((update.handoff_id, update.position));
    }
    moved.sort();
    assert_eq!(moved, [("p-2".to_owned(), 1), ("p-3".to_owned(), 2)]);
    let position = admin
        .get_queue_position(pb::GetQueuePositionRequest {
            key: Some(pb::get_queue_position_request::Key::ConversationId(
                "pconv-3".into(),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(position.position, 2);
}

async fn a_desk_resumes_its_session_after_a_reconnect(rig: &Rig) {
    use pb::agent_session_response::Event;
    let spec = ConsumerSpec::new("test-presence", &ROUTING, &rig.bus_config)
        .event::<pb::AgentPresenceChanged>();
    let mut presence = rig.bus.consumer(&spec).await.unwrap();
    let mut admin = rig.client("admin", &[Role::Admin]).await;
    register(&mut admin, agent("eve", 2, 5)).await;
    let mut eve = rig.client("eve", &[Role::Agent]).await;
    let mut desk = Desk::open(&mut eve).await;
    desk.send("h", hello("")).await;
    let first = welcome_of(desk.next().await).session_id;
    rig.publish(handoff_event("r-1", "rconv-1")).await;
    let Some(Event::Offer(offer)) = desk.next().await.event else {
        panic!("expected an offer");
    };
    let went_online = next_event(&mut presence).await;
    assert_eq!(
        went_online.type_name,
        "tandem.routing.v1.AgentPresenceChanged"
    );

    // The connection drops; the desk reconnects with its session id.
    drop(desk);
    let mut desk = Desk::open(&mut eve).await;
    desk.send("h2", hello(&first)).await;
    assert_eq!(welcome_of(desk.next().await).session_id, first, "resumed");
    // The pending offer comes again, once.
    let Some(Event::Offer(again)) = desk.next().await.event else {
        panic!("expected the pending offer again");
    };
    assert_eq!(again.id, offer.id);
    quiet(&mut desk).await;
    desk.send("a", accept(&offer.id)).await;
    assert!(matches!(
        desk.next().await.event,
        Some(Event::AssignmentConfirmed(_))
    ));
    let agent = agent_of(&mut admin, "eve").await;
    assert_eq!(agent.presence, i32::from(pb::Presence::Online));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), presence.next())
            .await
            .is_err(),
        "no presence change around the reconnect"
    );

    // An unknown id opens a new session, which replaces the resumed one.
    let mut other = Desk::open(&mut eve).await;
    other.send("h3", hello("not-a-session")).await;
    let fresh = welcome_of(other.next().await).session_id;
    assert_ne!(fresh, first);
    assert_ne!(fresh, "not-a-session");
    let Some(Event::Error(error)) = desk.next().await.event else {
        panic!("expected the resumed session to be replaced");
    };
    assert_eq!(error.code, i32::from(pb::SessionErrorCode::Superseded));
    // A malformed id is refused.
    let mut bad = Desk::open(&mut eve).await;
    bad.send("h4", hello(&"x".repeat(200))).await;
    let Some(Event::Error(error)) = bad.next().await.event else {
        panic!("expected an error");
    };
    assert_eq!(error.code, i32::from(pb::SessionErrorCode::InvalidArgument));
}

/// The desk drops while its accept commits, before it reads the confirmation: the stream it
/// opens next (resumed or new) is told of the assignment, once; after the wrap-up, no longer.
async fn a_desk_that_dropped_during_an_accept_sees_the_assignment(rig: &Rig) {
    use pb::agent_session_request::Command;
    use pb::agent_session_response::Event;
    let mut admin = rig.client("admin", &[Role::Admin]).await;
    register(&mut admin, agent("fay", 2, 5)).await;
    let mut fay = rig.client("fay", &[Role::Agent]).await;
    let confirmed_of = |response: pb::AgentSessionResponse| match response.event {
        Some(Event::AssignmentConfirmed(confirmed)) => {
            assert_eq!(response.in_reply_to, "", "a push");
            confirmed
        }
        other => panic!("expected the assignment, got {other:?}"),
    };
    let mut desk = Desk::open(&mut fay).await;
    desk.send("h", hello("")).await;
    let session = welcome_of(desk.next().await).session_id;
    rig.publish(handoff_event("d-1", "dconv-1")).await;
    let Some(Event::Offer(offer)) = desk.next().await.event else {
        panic!("expected an offer");
    };
    desk.send("a", accept(&offer.id)).await;
    wait_for_state(&mut admin, "d-1", pb::TicketState::Assigned).await;
    // The connection drops with the confirmation unread.
    drop(desk);

    // Resumed: the assignment is shown, once.
    let mut desk = Desk::open(&mut fay).await;
    desk.send("h2", hello(&session)).await;
    assert_eq!(welcome_of(desk.next().await).session_id, session);
    let confirmed = confirmed_of(desk.next().await);
    let ticket = confirmed.ticket.unwrap();
    assert_eq!(
        (ticket.id.as_str(), ticket.assigned_agent_id.as_str()),
        ("d-1", "fay")
    );
    assert_eq!(ticket.state, i32::from(pb::TicketState::Assigned));
    assert_eq!(confirmed.package.unwrap().conversation_id, "dconv-1");
    quiet(&mut desk).await;
    drop(desk);

    // A new session shows it too, and the wrap-up ends it.
    let mut desk = Desk::open(&mut fay).await;
    desk.send("h3", hello("")).await;
    assert_ne!(welcome_of(desk.next().await).session_id, session);
    assert_eq!(confirmed_of(desk.next().await).ticket.unwrap().id, "d-1");
    quiet(&mut desk).await;
    desk.send(
        "w",
        Command::WrapUp(pb::SessionWrapUp {
            ticket_id: "d-1".into(),
            disposition: pb::Disposition::Resolved.into(),
            notes: String::new(),
        }),
    )
    .await;
    wait_for_state(&mut admin, "d-1", pb::TicketState::Completed).await;
    drop(desk);
    let mut desk = Desk::open(&mut fay).await;
    desk.send("h4", hello("")).await;
    welcome_of(desk.next().await);
    quiet(&mut desk).await;
}

/// Another replica (here the test, writing through its own store to the same database) offers a
/// conversation to an agent whose desk is connected to the service: the desk hears of it at
/// once through the bus, not at its next poll (a minute here), and likewise of the offer's
/// expiry.
async fn an_offer_made_elsewhere_reaches_the_desk_at_once(rig: &Rig) {
    use pb::agent_session_request::Command;
    use pb::agent_session_response::Event;
    use prost::Message as _;
    let mut admin = rig.client("admin", &[Role::Admin]).await;
    register(&mut admin, agent("fay", 2, 5)).await;
    let mut fay = rig.client("fay", &[Role::Agent]).await;
    let mut desk = Desk::open(&mut fay).await;
    desk.send(
        "h",
        Command::Hello(pb::SessionHello {
            presence: pb::Presence::Online.into(),
            ..pb::SessionHello::default()
        }),
    )
    .await;
    assert!(matches!(desk.next().await.event, Some(Event::Welcome(_))));

    let db = tandem_platform::db::Db::connect(&rig.database)
        .await
        .unwrap();
    let other = tandem_routing::store::Store::new(
        db,
        tandem_platform::outbox::OutboxWaker::default(),
        "default",
    );
    let now = chrono::Utc::now();
    let package = HandoffPackage {
        handoff_id: "x-1".into(),
        conversation_id: "xconv-1".into(),
        summary: vec!["offered by another replica".into()],
        ..HandoffPackage::default()
    };
    let new = tandem_routing::store::NewTicket {
        handoff_id: "x-1".into(),
        conversation_id: "xconv-1".into(),
        scenario_id: "refunds".into(),
        queue_id: String::new(),
        priority: 50,
        vip: false,
        severity: 0.0,
        skills: Vec::new(),
        language: 1,
        trigger_received_at: None,
        requested_at: now,
        transcript_sequence: 1,
        package: package.encode_to_vec(),
    };
    let eta = tandem_routing::Settings::default().eta();
    other
        .enqueue(&tenant(), &new, None, eta, now)
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let batch = other
        .offer_queued(&tenant(), "default", 8, now)
        .await
        .unwrap();
    assert_eq!(batch.offered.len(), 1);
    let offer_id = batch.offered[0].1.id.clone();
    let Some(Event::Offer(offer)) = desk.next().await.event else {
        panic!("expected the offer");
    };
    assert_eq!(offer.id, offer_id);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "woken through the bus, not by the poll"
    );
    // The other replica expires it: the desk hears that at once too.
    other
        .expire_offers(now + chrono::Duration::seconds(60), 10, 0)
        .await
        .unwrap();
    let Some(Event::OfferRevoked(revoked)) = desk.next().await.event else {
        panic!("expected the revocation");
    };
    assert_eq!(revoked.offer_id, offer_id);
    assert_eq!(revoked.reason, i32::from(pb::OfferRevokedReason::Timeout));
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A desk that answers many offers at once gets every answer: the accepts it sends in a row
/// are committed together by the accept batcher and each is confirmed (or refused) under its
/// own request id; a command sent after them acts after them.
async fn a_desk_accepts_many_offers_at_once(rig: &Rig) {
    use pb::agent_session_request::Command;
    use pb::agent_session_response::Event;
    const OFFERS: usize = 6;
    let mut admin = rig.client("admin", &[Role::Admin]).await;
    register(&mut admin, agent("ann", 10, 5)).await;
    let mut ann = rig.client("ann", &[Role::Agent]).await;
    let mut desk = Desk::open(&mut ann).await;
    desk.send("h", hello("")).await;
    assert!(matches!(desk.next().await.event, Some(Event::Welcome(_))));
    for i in 0..OFFERS {
        rig.publish(handoff_event(&format!("h-{i}"), &format!("conv-{i}")))
            .await;
    }
    let mut offers = Vec::new();
    while offers.len() < OFFERS {
        match desk.next().await.event {
            Some(Event::Offer(offer)) => offers.push(offer),
            other => panic!("expected offers, got {other:?}"),
        }
    }
    for offer in &offers {
        desk.send(&format!("accept-{}", offer.handoff_id), accept(&offer.id))
            .await;
    }
    desk.send("again", accept(&offers[0].id)).await;
    desk.send("unknown", accept("no-such-offer")).await;
    // Ann goes away right after: the accepts before it still count.
    desk.send(
        "away",
        Command::SetPresence(pb::SessionSetPresence {
            presence: pb::Presence::Away.into(),
            reason: String::new(),
        }),
    )
    .await;
    let mut answers = std::collections::HashMap::new();
    while answers.len() < OFFERS + 2 {
        let answer = desk.next().await;
        assert!(
            answers
                .insert(answer.in_reply_to.clone(), answer.event)
                .is_none(),
            "one answer per request"
        );
    }
    for offer in &offers {
        let Some(Some(Event::AssignmentConfirmed(done))) =
            answers.get(&format!("accept-{}", offer.handoff_id))
        else {
            panic!("no confirmation for {}: {answers:?}", offer.handoff_id);
        };
        let ticket = done.ticket.as_ref().unwrap();
        assert_eq!(ticket.id, offer.handoff_id);
        assert_eq!(ticket.assigned_agent_id, "ann");
        assert_eq!(ticket.state, i32::from(pb::TicketState::Assigned));
    }
    let Some(Some(Event::Error(again))) = answers.get("again") else {
        panic!("expected an error for the second accept: {answers:?}");
    };
    assert_eq!(again.code, i32::from(pb::SessionErrorCode::OfferTaken));
    let Some(Some(Event::Error(unknown))) = answers.get("unknown") else {
        panic!("expected an error for the unknown offer: {answers:?}");
    };
    assert_eq!(unknown.code, i32::from(pb::SessionErrorCode::NotFound));
    for offer in &offers {
        let found = ticket(&mut admin, &offer.handoff_id).await;
        assert_eq!(found.state, i32::from(pb::TicketState::Assigned));
    }
    let found = agent_of(&mut admin, "ann").await;
    assert_eq!(found.presence, i32::from(pb::Presence::Away));
    assert_eq!(found.active_assignments, OFFERS as i32);
}

/// Two managers update different fields of one agent at the same moment, many times over: each
/// update's mask is applied to the row as stored, so neither overwrites the other's field.
async fn concurrent_agent_updates_keep_both_fields(rig: &Rig) {
    let mut first = rig.client("admin", &[Role::Admin]).await;
    let mut second = rig.client("admin", &[Role::Admin]).await;
    register(&mut first, agent("ann", 2, 5)).await;
    let update = |field: &str, agent: pb::Agent| pb::UpdateAgentRequest {
        agent: Some(agent),
        update_mask: Some(prost_types::FieldMask {
            paths: vec![field.into()],
        }),
    };
    for round in 0..30 {
        let name = format!("Ann {round}");
        let team = format!("team-{round}");
        let renamed = update(
            "display_name",
            pb::Agent {
                id: "ann".into(),
                display_name: name.clone(),
                ..pb::Agent::default()
            },
        );
        let moved = update(
            "team",
            pb::Agent {
                id: "ann".into(),
                team: team.clone(),
                ..pb::Agent::default()
            },
        );
        let (renamed, moved) =
            tokio::join!(first.update_agent(renamed), second.update_agent(moved));
        renamed.unwrap();
        moved.unwrap();
        let stored = agent_of(&mut first, "ann").await;
        assert_eq!(
            (stored.display_name.as_str(), stored.team.as_str()),
            (name.as_str(), team.as_str()),
            "round {round}"
        );
        assert_eq!(stored.max_concurrent, 2);
    }
}

mod replicas {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_offer_made_elsewhere_reaches_the_desk_at_once() {
        // Neither the sweep nor the desk's poll would find the offer within the test.
        let rig = super::Rig::production_with(tandem_routing::Settings {
            sweep_interval: std::time::Duration::from_secs(60),
            session_poll_interval: std::time::Duration::from_secs(60),
            ..tandem_routing::Settings::default()
        })
        .await;
        super::an_offer_made_elsewhere_reaches_the_desk_at_once(&rig).await;
        rig.stop().await;
    }
}

macro_rules! both {
    ($($case:ident),* $(,)?) => {
        mod production {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let rig = super::Rig::production().await;
                    super::$case(&rig).await;
                    rig.stop().await;
                }
            )*
        }
        mod standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let rig = super::Rig::standalone().await;
                    super::$case(&rig).await;
                    rig.stop().await;
                }
            )*
        }
    };
}

both!(
    a_handoff_reaches_the_desk_once_and_is_assigned,
    a_resolution_in_dialog_frees_the_agent,
    bad_input_gets_precise_codes,
    waiting_customers_hear_their_position_move,
    a_desk_resumes_its_session_after_a_reconnect,
    a_desk_accepts_many_offers_at_once,
    concurrent_agent_updates_keep_both_fields,
    a_desk_that_dropped_during_an_accept_sees_the_assignment
);
