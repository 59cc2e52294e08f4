//! Two dialog replicas on one PostgreSQL database and one nats-server (testkit): a watcher
//! connected to either replica sees, live and once each, the messages written through both, and
//! the state changes and typing made through the other; both sweeping idle conversations close
//! each one once.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tandem_dialog::{Dialog, Settings};
use tandem_platform::auth::Role;
use tandem_platform::config::{
    BusConfig, BusKind, DatabaseConfig, OutboxConfig, Secret, ServiceConfig,
};
use tandem_platform::testing::{Intercept, auth, bearer, token};
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::dialog::v1 as pb;
use tandem_proto::pb::dialog::v1::dialog_service_client::DialogServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = DialogServiceClient<InterceptedService<Channel, Intercept>>;

struct Replica {
    url: String,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Replica {
    async fn start(database: &str, nats: &str, settings: Settings) -> Self {
        let cfg = ServiceConfig {
            auth: auth(),
            database: DatabaseConfig {
                url: Secret::new(database.to_owned()),
                schema: "dialog".into(),
                ..DatabaseConfig::default()
            },
            bus: BusConfig {
                kind: BusKind::Nats,
                nats_url: nats.to_owned(),
                ..BusConfig::default()
            },
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
            let stop = stop.clone();
            tokio::spawn(async move {
                tandem_platform::runtime::serve_with::<Dialog>(cfg, None, listener, stop).await
            })
        };
        let replica = Self { url, stop, server };
        // Serving once a call answers (after the migrations).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut c = replica.client().await;
            if conversation(&mut c, "none")
                .await
                .is_err_and(|s| s.code() == tonic::Code::NotFound)
            {
                return replica;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica never served"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn client(&self) -> Client {
        let channel = loop {
            match Channel::from_shared(self.url.clone())
                .unwrap()
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        DialogServiceClient::with_interceptor(
            channel,
            bearer(&token("acme", "ch-1", &[Role::Channel])),
        )
    }

    async fn stop(self) {
        self.stop.cancel();
        self.server.await.unwrap().unwrap();
    }
}

/// Reads a conversation.
async fn conversation(c: &mut Client, id: &str) -> Result<pb::Conversation, tonic::Status> {
    c.get_conversation(pb::GetConversationRequest {
        conversation_id: id.into(),
    })
    .await
    .map(|r| r.into_inner().conversation.unwrap())
}

async fn watch(c: &mut Client, id: &str) -> Streaming<pb::WatchConversationResponse> {
    c.watch_conversation(pb::WatchConversationRequest {
        conversation_id: id.into(),
        view: pb::ConversationView::Customer as i32,
        resume_after: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// What `pick` keeps of the updates a watcher receives: it waits long for `want` of them, then
/// a while longer for any more (a duplicate).
async fn collect<T>(
    w: &mut Streaming<pb::WatchConversationResponse>,
    want: usize,
    pick: impl Fn(pb::ConversationUpdate) -> Option<T>,
) -> Vec<T> {
    let mut out = Vec::new();
    loop {
        let wait = if out.len() < want {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(1_500)
        };
        match tokio::time::timeout(wait, w.message()).await {
            Err(_) => return out,
            Ok(m) => out.extend(pick(m.unwrap().unwrap().update.unwrap())),
        }
    }
}

/// The sequences of the messages a watcher receives.
async fn sequences(w: &mut Streaming<pb::WatchConversationResponse>, want: usize) -> Vec<i64> {
    collect(w, want, |u| match u.update {
        Some(pb::conversation_update::Update::MessagePosted(m)) => {
            assert_eq!(u.cursor, m.sequence.to_string());
            Some(m.sequence)
        }
        _ => None,
    })
    .await
}

async fn say(c: &mut Client, conv: &str, id: &str) {
    c.post_customer_message(pb::PostCustomerMessageRequest {
        conversation_id: conv.into(),
        client_message_id: id.into(),
        text: "hello, anyone there?".into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Two replicas on throwaway servers, one conversation started through the first, and a
/// watcher of it on each.
struct Pair {
    _servers: (tandem_testkit::Postgres, tandem_testkit::NatsServer),
    a: Replica,
    b: Replica,
    ca: Client,
    cb: Client,
    conv: pb::Conversation,
    on_a: Streaming<pb::WatchConversationResponse>,
    on_b: Streaming<pb::WatchConversationResponse>,
}

impl Pair {
    async fn start() -> Self {
        Self::start_with(Settings::default()).await
    }

    async fn start_with(settings: Settings) -> Self {
        let pg = tandem_testkit::Postgres::start().await.unwrap();
        let nats = tandem_testkit::NatsServer::start().await.unwrap();
        let database = pg.fresh_database().await.unwrap();
        let a = Replica::start(&database, &nats.url(), settings.clone()).await;
        let b = Replica::start(&database, &nats.url(), settings).await;
        let (mut ca, mut cb) = (a.client().await, b.client().await);
        let conv = ca
            .start_conversation(pb::StartConversationRequest {
                customer: Some(common::Customer {
                    id: "cust-1".into(),
                    ..Default::default()
                }),
                client_conversation_id: "k1".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .conversation
            .unwrap();
        let on_a = watch(&mut ca, &conv.id).await;
        let on_b = watch(&mut cb, &conv.id).await;
        Self {
            _servers: (pg, nats),
            a,
            b,
            ca,
            cb,
            conv,
            on_a,
            on_b,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_the_messages_written_through_another_replica() {
    let mut p = Pair::start().await;

    // Written through A: B's watcher sees the customer message and the bot's reply live; A's
    // watcher sees them once, though its own updates also come back through the bus.
    say(&mut p.ca, &p.conv.id, "m1").await;
    assert_eq!(sequences(&mut p.on_b, 2).await, [1, 2]);
    assert_eq!(sequences(&mut p.on_a, 2).await, [1, 2]);

    // And the other way round.
    say(&mut p.cb, &p.conv.id, "m2").await;
    assert_eq!(sequences(&mut p.on_a, 2).await, [3, 4]);
    assert_eq!(sequences(&mut p.on_b, 2).await, [3, 4]);

    drop((p.on_a, p.on_b));
    p.a.stop().await;
    p.b.stop().await;
}

/// The updates other than messages (state changes, queue updates, typing) a watcher receives.
async fn live_updates(
    w: &mut Streaming<pb::WatchConversationResponse>,
    want: usize,
) -> Vec<pb::conversation_update::Update> {
    collect(w, want, |u| match u.update.unwrap() {
        pb::conversation_update::Update::MessagePosted(_) => None,
        other => Some(other),
    })
    .await
}

/// How many of the updates move the conversation to `state`.
fn moves_to(got: &[pb::conversation_update::Update], state: pb::ConversationState) -> usize {
    got.iter()
        .filter(|u| {
            matches!(u, pb::conversation_update::Update::StateChanged(s)
                if s.to_state == state as i32)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_state_changes_and_typing_made_through_another_replica() {
    let mut p = Pair::start().await;

    // Typing through A reaches B's watcher; A's watcher has it once (its own does not come
    // back).
    p.ca.set_typing(pb::SetTypingRequest {
        conversation_id: p.conv.id.clone(),
        typing: true,
    })
    .await
    .unwrap();
    for w in [&mut p.on_b, &mut p.on_a] {
        let got = live_updates(w, 1).await;
        assert_eq!(got.len(), 1, "{got:?}");
        let pb::conversation_update::Update::Typing(t) = &got[0] else {
            panic!("expected typing, got {got:?}");
        };
        assert!(t.typing);
        assert_eq!(t.sender_kind, pb::SenderKind::Customer as i32);
    }

    // A handoff through A: B's watcher sees the conversation move to QUEUED, once.
    p.ca.post_customer_message(pb::PostCustomerMessageRequest {
        conversation_id: p.conv.id.clone(),
        client_message_id: "m1".into(),
        text: "转人工".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let queued = pb::ConversationState::Queued;
    assert_eq!(moves_to(&live_updates(&mut p.on_b, 1).await, queued), 1);
    assert_eq!(moves_to(&live_updates(&mut p.on_a, 1).await, queued), 1);

    // And the other way round: typing through B reaches A.
    p.cb.set_typing(pb::SetTypingRequest {
        conversation_id: p.conv.id.clone(),
        typing: false,
    })
    .await
    .unwrap();
    let got = live_updates(&mut p.on_a, 1).await;
    assert!(
        matches!(got.as_slice(), [pb::conversation_update::Update::Typing(t)] if !t.typing),
        "{got:?}"
    );

    drop((p.on_a, p.on_b));
    p.a.stop().await;
    p.b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_replicas_sweep_and_an_idle_conversation_closes_once() {
    let mut p = Pair::start_with(Settings {
        idle_close_after: Duration::from_secs(1),
        ..Settings::default()
    })
    .await;
    // Both replicas sweep the same database: whichever closes the conversation first, each
    // watcher sees it closed exactly once.
    let closed = pb::ConversationState::Closed;
    assert_eq!(moves_to(&live_updates(&mut p.on_a, 1).await, closed), 1);
    assert_eq!(moves_to(&live_updates(&mut p.on_b, 1).await, closed), 1);
    let conv = conversation(&mut p.cb, &p.conv.id).await.unwrap();
    assert_eq!(conv.state, pb::ConversationState::Closed as i32);
    assert_eq!(conv.close_reason, pb::CloseReason::Abandoned as i32);

    drop((p.on_a, p.on_b));
    p.a.stop().await;
    p.b.stop().await;
}
