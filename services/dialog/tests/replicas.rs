//! Two dialog replicas on one PostgreSQL database and one nats-server (testkit): a watcher
//! connected to either replica sees, live and once each, the messages written through both, and
//! the state changes and typing made through the other.

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
    async fn start(database: &str, nats: &str) -> Self {
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
            service: Settings::default(),
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
            if c.get_conversation(pb::GetConversationRequest {
                conversation_id: "none".into(),
            })
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

/// The sequences of the messages a watcher receives until `quiet` passes without one.
async fn sequences(w: &mut Streaming<pb::WatchConversationResponse>, want: usize) -> Vec<i64> {
    let mut out = Vec::new();
    loop {
        // Wait long for the expected ones, then a while longer for any duplicate.
        let wait = if out.len() < want {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(1_500)
        };
        match tokio::time::timeout(wait, w.message()).await {
            Err(_) => return out,
            Ok(m) => {
                let u = m.unwrap().unwrap().update.unwrap();
                if let Some(pb::conversation_update::Update::MessagePosted(m)) = u.update {
                    assert_eq!(u.cursor, m.sequence.to_string());
                    out.push(m.sequence);
                }
            }
        }
    }
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
        let pg = tandem_testkit::Postgres::start().await.unwrap();
        let nats = tandem_testkit::NatsServer::start().await.unwrap();
        let database = pg.fresh_database().await.unwrap();
        let a = Replica::start(&database, &nats.url()).await;
        let b = Replica::start(&database, &nats.url()).await;
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
    let Pair {
        _servers,
        a,
        b,
        mut ca,
        mut cb,
        conv,
        mut on_a,
        mut on_b,
    } = Pair::start().await;

    // Written through A: B's watcher sees the customer message and the bot's reply live; A's
    // watcher sees them once, though its own updates also come back through the bus.
    say(&mut ca, &conv.id, "m1").await;
    assert_eq!(sequences(&mut on_b, 2).await, [1, 2]);
    assert_eq!(sequences(&mut on_a, 2).await, [1, 2]);

    // And the other way round.
    say(&mut cb, &conv.id, "m2").await;
    assert_eq!(sequences(&mut on_a, 2).await, [3, 4]);
    assert_eq!(sequences(&mut on_b, 2).await, [3, 4]);

    drop((on_a, on_b));
    a.stop().await;
    b.stop().await;
}

/// The state changes and typing a watcher receives until `quiet` passes without one, skipping
/// messages.
async fn live_updates(
    w: &mut Streaming<pb::WatchConversationResponse>,
    want: usize,
) -> Vec<pb::conversation_update::Update> {
    let mut out = Vec::new();
    loop {
        let wait = if out.len() < want {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(1_500)
        };
        match tokio::time::timeout(wait, w.message()).await {
            Err(_) => return out,
            Ok(m) => match m.unwrap().unwrap().update.unwrap().update.unwrap() {
                pb::conversation_update::Update::MessagePosted(_) => {}
                other => out.push(other),
            },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_state_changes_and_typing_made_through_another_replica() {
    let Pair {
        _servers,
        a,
        b,
        mut ca,
        mut cb,
        conv,
        mut on_a,
        mut on_b,
    } = Pair::start().await;

    // Typing through A reaches B's watcher; A's watcher has it once (its own does not come
    // back).
    ca.set_typing(pb::SetTypingRequest {
        conversation_id: conv.id.clone(),
        typing: true,
    })
    .await
    .unwrap();
    for w in [&mut on_b, &mut on_a] {
        let got = live_updates(w, 1).await;
        assert_eq!(got.len(), 1, "{got:?}");
        let pb::conversation_update::Update::Typing(t) = &got[0] else {
            panic!("expected typing, got {got:?}");
        };
        assert!(t.typing);
        assert_eq!(t.sender_kind, pb::SenderKind::Customer as i32);
    }

    // A handoff through A: B's watcher sees the conversation move to QUEUED, once.
    ca.post_customer_message(pb::PostCustomerMessageRequest {
        conversation_id: conv.id.clone(),
        client_message_id: "m1".into(),
        text: "转人工".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let queued = |got: &[pb::conversation_update::Update]| {
        got.iter()
            .filter(|u| {
                matches!(u, pb::conversation_update::Update::StateChanged(s)
                    if s.to_state == pb::ConversationState::Queued as i32)
            })
            .count()
    };
    assert_eq!(queued(&live_updates(&mut on_b, 1).await), 1);
    assert_eq!(queued(&live_updates(&mut on_a, 1).await), 1);

    // And the other way round: typing through B reaches A.
    cb.set_typing(pb::SetTypingRequest {
        conversation_id: conv.id.clone(),
        typing: false,
    })
    .await
    .unwrap();
    let got = live_updates(&mut on_a, 1).await;
    assert!(
        matches!(got.as_slice(), [pb::conversation_update::Update::Typing(t)] if !t.typing),
        "{got:?}"
    );

    drop((on_a, on_b));
    a.stop().await;
    b.stop().await;
}
