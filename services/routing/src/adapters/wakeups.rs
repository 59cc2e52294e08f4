//! Cross-replica wake-ups: a desk session connected to this replica hears at once about an offer
//! another replica made to (or expired for) its agent, instead of at its next poll.
//!
//! Each replica subscribes, without a durable consumer (a plain NATS subscription that lives and
//! dies with the process, nothing to clean up), to the `HandoffOffered` and `HandoffTimedOut`
//! subjects of every tenant, which the outbox relay publishes as soon as the change commits, and
//! wakes the local session of the agent named in each. A wake-up only makes the session read
//! the database sooner; a lost or duplicated one changes nothing, and the session's poll
//! (`service.session_poll_interval`) stays the fallback. With the in-process bus (standalone,
//! one process) the engine already wakes its sessions itself, so there is nothing to do.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tandem_platform::bus::{Bus, RawEvent};
use tandem_proto::events::{Event as _, all_tenants};
use tandem_proto::pb::routing::v1::{HandoffOffered, HandoffTimedOut};
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;

/// Wakes the local sessions of agents named in the offer events until `shutdown`; returns at
/// once on the in-process bus.
pub async fn run(engine: Arc<Engine>, bus: Bus, shutdown: CancellationToken) {
    let Bus::Nats(nats) = bus else {
        return;
    };
    let subjects = [
        all_tenants::<HandoffOffered>(),
        all_tenants::<HandoffTimedOut>(),
    ];
    let mut subscriptions = Vec::with_capacity(subjects.len());
    for subject in subjects {
        loop {
            match nats.client().subscribe(subject.clone()).await {
                Ok(subscription) => {
                    subscriptions.push(subscription);
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, %subject, "cannot subscribe to offer wake-ups, retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
    let mut messages = futures::stream::select_all(subscriptions);
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return,
            message = messages.next() => message,
        };
        // The client resubscribes by itself after a reconnect; the stream ends only when the
        // connection is closed for good, and then the poll carries on alone.
        let Some(message) = message else {
            tracing::warn!("offer wake-ups ended; desk sessions rely on their poll");
            return;
        };
        match RawEvent::from_nats(message) {
            Ok(event) => wake(&engine, &event),
            Err(error) => tracing::debug!(%error, "ignoring a malformed offer event"),
        }
    }
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
        Ok((tenant, agent_id)) => engine.hub.notify(&tenant, &agent_id),
        Err(error) => tracing::debug!(%error, "ignoring an undecodable offer event"),
    }
}
