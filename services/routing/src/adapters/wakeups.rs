//! Cross-replica wake-ups: a desk session connected to this replica hears at once about a change
//! another replica made to its agent's offers or session, instead of at its next poll.
//!
//! Every wake-up a replica gives its own sessions ([`crate::engine::SessionHub::notify`]: an
//! offer made, answered, expired or revoked, a presence set, a transfer, a session opened
//! elsewhere) is also published on a plain NATS subject ([`desk_wakeups_for`]), outside every
//! stream, with the replica and the agent in headers; the other replicas wake the agent's
//! session if it is connected to them. Each replica also subscribes to the `HandoffOffered` and
//! `HandoffTimedOut` events as the outbox relays them, for changes made by a process that does
//! not forward its wake-ups. The subscriptions are not durable (they live and die with the
//! process, nothing to clean up). A wake-up only makes the session read the database sooner; a
//! lost or duplicated one changes nothing, and the session's poll
//! (`service.session_poll_interval`) stays the fallback. With the in-process bus (standalone,
//! one process) the engine already wakes its sessions itself, so there is nothing to do.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tandem_platform::bus::nats::{header, subject_tenant};
use tandem_platform::bus::{Bus, RawEvent};
use tandem_proto::events::{
    DESK_WAKEUPS, Event as _, all_tenants, desk_wakeups_all, desk_wakeups_for,
};
use tandem_proto::pb::routing::v1::{HandoffOffered, HandoffTimedOut};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::{DeskWakeup, Engine};

/// Header: the replica that sent a wake-up (its own come back and are skipped).
const REPLICA: &str = "Tandem-Replica";
/// Header: the agent whose desk to wake.
const AGENT: &str = "Tandem-Agent";

/// Passes wake-ups between this replica and the others until `shutdown`; returns at once on the
/// in-process bus.
pub async fn run(engine: Arc<Engine>, bus: Bus, shutdown: CancellationToken) {
    let Bus::Nats(nats) = bus else {
        return;
    };
    let client = nats.client().clone();
    let replica = uuid::Uuid::now_v7().to_string();
    let subjects = [
        desk_wakeups_all(),
        all_tenants::<HandoffOffered>(),
        all_tenants::<HandoffTimedOut>(),
    ];
    let mut subscriptions = Vec::with_capacity(subjects.len());
    for subject in subjects {
        loop {
            match client.subscribe(subject.clone()).await {
                Ok(subscription) => {
                    subscriptions.push(subscription);
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, %subject, "cannot subscribe to desk wake-ups, retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
    // Forward only once subscribed, so a replica never sends what it could not also receive.
    let (forward, forwarded) = mpsc::unbounded_channel();
    engine.hub.forward_to(forward);
    let sender = tokio::spawn(send(client, replica.clone(), forwarded, shutdown.clone()));
    let mut messages = futures::stream::select_all(subscriptions);
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => break,
            message = messages.next() => message,
        };
        // The client resubscribes by itself after a reconnect; the stream ends only when the
        // connection is closed for good, and then the poll carries on alone.
        let Some(message) = message else {
            tracing::warn!("desk wake-ups ended; desk sessions rely on their poll");
            break;
        };
        if message.subject.starts_with(DESK_WAKEUPS) {
            receive(&engine, &replica, &message);
            continue;
        }
        match RawEvent::from_nats(message) {
            Ok(event) => wake(&engine, &event),
            Err(error) => tracing::debug!(%error, "ignoring a malformed offer event"),
        }
    }
    sender.abort();
}

/// Publishes this replica's wake-ups for the other replicas until `shutdown`.
async fn send(
    client: async_nats::Client,
    replica: String,
    mut forwarded: mpsc::UnboundedReceiver<DeskWakeup>,
    shutdown: CancellationToken,
) {
    loop {
        let wakeup = tokio::select! {
            () = shutdown.cancelled() => return,
            wakeup = forwarded.recv() => match wakeup {
                Some(wakeup) => wakeup,
                None => return,
            },
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(REPLICA, replica.as_str());
        headers.insert(AGENT, wakeup.agent_id.as_str());
        if let Err(error) = client
            .publish_with_headers(
                desk_wakeups_for(&wakeup.tenant),
                headers,
                Default::default(),
            )
            .await
        {
            // Best effort: the session elsewhere finds the change at its next poll.
            tracing::debug!(%error, "cannot send a desk wake-up to the other replicas");
        }
    }
}

/// Wakes the local session named in another replica's wake-up.
fn receive(engine: &Engine, replica: &str, message: &async_nats::Message) {
    if header(message, REPLICA).as_deref() == Some(replica) {
        return;
    }
    let (Some(agent), Some(tenant)) = (header(message, AGENT), subject_tenant(&message.subject))
    else {
        return;
    };
    engine.hub.notify_local(&tenant, &agent);
}

/// Wakes the session of the agent an offer event names, if it is connected here.
fn wake(engine: &Engine, event: &RawEvent) {
    let decoded = if event.type_name == HandoffOffered::TYPE_NAME {
        event
            .decode::<HandoffOffered>()
            .map(|e| (e.tenant, e.event.agent_id))
    } else if event.type_name == HandoffTimedOut::TYPE_NAME {
        event
            .decode::<HandoffTimedOut>()
            .map(|e| (e.tenant, e.event.agent_id))
    } else {
        return;
    };
    match decoded {
        Ok((tenant, agent_id)) => engine.hub.notify_local(&tenant, &agent_id),
        Err(error) => tracing::debug!(%error, "ignoring an undecodable offer event"),
    }
}
