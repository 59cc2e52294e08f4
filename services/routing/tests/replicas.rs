//! Two routing processes (the `tandem-routing` binary) on one PostgreSQL and one nats-server, with
//! desk sessions that only poll once a minute: a change made through one replica reaches a desk
//! connected to the other at once, through the wake-ups the replicas pass to each other.

#![allow(clippy::unwrap_used)]

#[path = "support/cluster.rs"]
mod cluster;

use std::time::{Duration, Instant};

use cluster::{Cluster, client};
use tandem_platform::auth::Role;
use tandem_proto::pb::routing::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Neither the desk's poll nor a heartbeat (the desks below send none) would find the change
/// within the test.
const SLOW_POLL: [(&str, &str); 1] = [("TANDEM_ROUTING__SERVICE__SESSION_POLL_INTERVAL", "60s")];

/// Opens a desk session that sends `hello` and nothing else; returns its stream of events and
/// the sender that keeps it open.
async fn bare_desk(
    url: &str,
    agent: &str,
) -> (
    tonic::Streaming<pb::AgentSessionResponse>,
    mpsc::Sender<pb::AgentSessionRequest>,
) {
    let mut desk = client(url, agent, &[Role::Agent]).await.unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(pb::AgentSessionRequest {
        request_id: "hello".into(),
        command: Some(pb::agent_session_request::Command::Hello(
            pb::SessionHello {
                presence: pb::Presence::Online.into(),
                ..pb::SessionHello::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut events = desk
        .agent_session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let welcome = events.message().await.unwrap().unwrap();
    assert!(
        matches!(
            welcome.event,
            Some(pb::agent_session_response::Event::Welcome(_))
        ),
        "{welcome:?}"
    );
    (events, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opened_on_another_replica_supersedes_at_once() {
    let cluster = Cluster::start().await;
    let agents = cluster.agents(1, 5).await;
    let a = cluster.replica("a", &SLOW_POLL).await;
    let b = cluster.replica("b", &SLOW_POLL).await;

    let (mut first, _keep_first) = bare_desk(&a.url, &agents[0]).await;
    let started = Instant::now();
    let (_second, _keep_second) = bare_desk(&b.url, &agents[0]).await;

    // Replica b replaced the session in the database and woke its own sessions of the agent
    // (there are none); replica a hears the wake-up and ends the stream it holds.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match first.message().await {
                Ok(Some(pb::AgentSessionResponse {
                    event: Some(pb::agent_session_response::Event::Error(error)),
                    ..
                })) => break Some(error.code),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break None,
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the first session was not superseded within 10 s\n{}",
            std::fs::read_to_string(&a.log).unwrap_or_default()
        )
    });
    assert_eq!(ended, Some(i32::from(pb::SessionErrorCode::Superseded)));
    assert!(started.elapsed() < Duration::from_secs(10));
}
