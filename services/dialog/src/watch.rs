//! Live updates from the other replicas for this replica's watchers.
//!
//! A replica publishes what it commits to its own watchers at once ([`crate::app::Hub`]). On NATS
//! every replica also subscribes, without a durable consumer (a plain subscription of this
//! process, nothing stored on the server, nothing replayed), to dialog's own `MessagePosted` and
//! `SuggestionCreated` events as the outbox relays them, and hands those of watched conversations
//! to its hub: a watcher connected to one replica sees the messages and suggestions written
//! through any replica. A copy of an update the watcher already has (this replica's own events
//! come back this way too) is skipped by the watcher, by message sequence and suggestion id.
//!
//! State changes, queue updates and typing have no event of their own. Each replica forwards
//! those it publishes on a plain NATS subject ([`live_updates_for`]), outside every stream, with
//! its replica id, the conversation and the view in headers; the others hand them to their
//! watchers of that conversation. Nothing is stored: a watcher that was not connected learns the
//! state from `GetConversation` or its replay. Since messages travel through the outbox, a remote
//! watcher may see a state change a moment before the message that caused it.
//!
//! On the in-process bus there is only one replica, so there is nothing to subscribe to.

use std::sync::Arc;

use prost::Message as _;
use tandem_platform::bus::nats::{header, subject_tenant};
use tandem_platform::bus::{Bus, RawEvent};
use tandem_proto::events::{Event, all_tenants, live_updates_all, live_updates_for};
use tandem_proto::pb::dialog::v1 as pb;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::app::{App, Broadcast, Forward};

/// Header: the replica that sent a live update (its own come back and are skipped).
const REPLICA: &str = "Tandem-Replica";
/// Header: the conversation of a live update.
const CONVERSATION: &str = "Tandem-Conversation";
/// Header: "1" when only the agent view shows the update.
const AGENT_ONLY: &str = "Tandem-Agent-Only";

/// Subscribes to the events of every replica and relays them to this replica's watchers until
/// `shutdown`; a no-op on the in-process bus.
///
/// # Errors
/// When the subscriptions cannot be made.
pub async fn relay_from_replicas(
    bus: &Bus,
    app: Arc<App>,
    tracker: &tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Bus::Nats(nats) = bus else {
        return Ok(());
    };
    let client = nats.client();
    let messages = client.subscribe(all_tenants::<pb::MessagePosted>()).await?;
    let suggestions = client
        .subscribe(all_tenants::<pb::SuggestionCreated>())
        .await?;
    let mut incoming = messages.merge(suggestions);
    let live = client.subscribe(live_updates_all()).await?;
    let replica = uuid::Uuid::now_v7().to_string();
    let (forward, forwarded) = tokio::sync::mpsc::unbounded_channel();
    app.hub.forward_to(forward);
    tracker.spawn(send_live(
        client.clone(),
        replica.clone(),
        forwarded,
        shutdown.clone(),
    ));
    tracker.spawn(receive_live(
        live,
        replica,
        Arc::clone(&app),
        shutdown.clone(),
    ));
    tracker.spawn(async move {
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return,
                m = incoming.next() => match m {
                    Some(m) => m,
                    None => {
                        tracing::warn!("the subscription to other replicas' updates ended");
                        return;
                    }
                },
            };
            match RawEvent::from_nats(message) {
                Ok(event) => relay(&app, &event),
                Err(error) => tracing::debug!(%error, "ignoring a malformed update"),
            }
        }
    });
    Ok(())
}

/// Hands one event to the watchers of its conversation on this replica, if there are any.
fn relay(app: &App, event: &RawEvent) {
    let tenant = &event.tenant;
    // The ordering key is the conversation: skip the decoding when nobody here watches it.
    if let Some(id) = &event.ordering_key
        && !app.hub.watched(tenant, id)
    {
        return;
    }
    let (conversation, broadcast) = match event.type_name.as_str() {
        pb::MessagePosted::TYPE_NAME => {
            let Ok(e) = event.decode::<pb::MessagePosted>() else {
                return;
            };
            let Some(m) = e.event.message else {
                return;
            };
            let b = Broadcast {
                update: pb::ConversationUpdate {
                    cursor: m.sequence.to_string(),
                    occurred_at: e.event.occurred_at,
                    update: Some(pb::conversation_update::Update::MessagePosted(m)),
                },
                agent_only: false,
            };
            (e.event.conversation_id, b)
        }
        pb::SuggestionCreated::TYPE_NAME => {
            let Ok(e) = event.decode::<pb::SuggestionCreated>() else {
                return;
            };
            let Some(s) = e.event.suggestion else {
                return;
            };
            let b = Broadcast {
                update: pb::ConversationUpdate {
                    cursor: String::new(),
                    occurred_at: e.event.occurred_at,
                    update: Some(pb::conversation_update::Update::Suggestion(s)),
                },
                agent_only: true,
            };
            (e.event.conversation_id, b)
        }
        _ => return,
    };
    app.hub.deliver(tenant, &conversation, vec![broadcast]);
}

/// Publishes this replica's live updates for the other replicas until `shutdown`.
async fn send_live(
    client: async_nats::Client,
    replica: String,
    mut forwarded: tokio::sync::mpsc::UnboundedReceiver<Forward>,
    shutdown: CancellationToken,
) {
    loop {
        let batch = tokio::select! {
            () = shutdown.cancelled() => return,
            batch = forwarded.recv() => match batch {
                Some(batch) => batch,
                None => return,
            },
        };
        let subject = live_updates_for(&batch.tenant);
        for b in batch.updates {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(REPLICA, replica.as_str());
            headers.insert(CONVERSATION, batch.conversation_id.as_str());
            headers.insert(AGENT_ONLY, if b.agent_only { "1" } else { "0" });
            let payload = b.update.encode_to_vec();
            if let Err(error) = client
                .publish_with_headers(subject.clone(), headers, payload.into())
                .await
            {
                // Best effort, like the updates themselves: a watcher elsewhere misses one.
                tracing::debug!(%error, "cannot send a live update to the other replicas");
            }
        }
    }
}

/// Hands the other replicas' live updates to this replica's watchers until `shutdown`.
async fn receive_live(
    mut live: async_nats::Subscriber,
    replica: String,
    app: Arc<App>,
    shutdown: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return,
            m = live.next() => match m {
                Some(m) => m,
                None => {
                    tracing::warn!("the subscription to other replicas' live updates ended");
                    return;
                }
            },
        };
        if header(&message, REPLICA).as_deref() == Some(replica.as_str()) {
            continue;
        }
        let (Some(conversation), Some(tenant)) = (
            header(&message, CONVERSATION),
            subject_tenant(&message.subject),
        ) else {
            continue;
        };
        if !app.hub.watched(&tenant, &conversation) {
            continue;
        }
        let Ok(update) = pb::ConversationUpdate::decode(message.payload.as_ref()) else {
            tracing::debug!("ignoring a malformed live update");
            continue;
        };
        let broadcast = Broadcast {
            update,
            agent_only: header(&message, AGENT_ONLY).as_deref() == Some("1"),
        };
        app.hub.deliver(&tenant, &conversation, vec![broadcast]);
    }
}
