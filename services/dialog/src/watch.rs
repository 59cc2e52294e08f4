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
//! On the in-process bus there is only one replica, so there is nothing to subscribe to.

use std::sync::Arc;

use tandem_platform::bus::{Bus, RawEvent};
use tandem_proto::events::{Event, all_tenants};
use tandem_proto::pb::dialog::v1 as pb;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::app::{App, Broadcast};

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
    app.hub.publish(tenant, &conversation, vec![broadcast]);
}
