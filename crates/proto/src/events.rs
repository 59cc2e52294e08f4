//! The event catalogue: every event type, its subject and its stream, declared once.
//!
//! Subjects follow `tandem.<context>.v1.<entity>.<event>.<tenant>`. The part before the tenant
//! is [`Event::SUBJECT`]; [`subject_for`] appends the tenant. A subscriber that wants one tenant
//! filters on the full subject, one that wants every tenant on `<SUBJECT>.*`.
//!
//! Each context has one stream (`TANDEM_DIALOG` over `tandem.dialog.v1.>`, …), listed in
//! [`STREAMS`].

use crate::ids::TenantId;
use crate::pb;

/// A fact published on the bus.
pub trait Event: prost::Message + Default + Send + Sync + 'static {
    /// The subject without the trailing tenant token, e.g. `tandem.routing.v1.handoff.assigned`.
    const SUBJECT: &'static str;
    /// The stream that stores the event.
    const STREAM: &'static Stream;
    /// The fully qualified protobuf message name, e.g. `tandem.routing.v1.HandoffAssigned`.
    const TYPE_NAME: &'static str;
}

/// A JetStream stream: one per bounded context.
#[derive(Debug, PartialEq, Eq)]
pub struct Stream {
    /// The stream name, e.g. `TANDEM_ROUTING`.
    pub name: &'static str,
    /// The context token, e.g. `routing`.
    pub context: &'static str,
    /// The subjects the stream captures, e.g. `tandem.routing.v1.>`.
    pub subjects: &'static str,
}

/// One row of the catalogue, for documentation, validation and subscribers that list events.
#[derive(Debug, PartialEq, Eq)]
pub struct EventSpec {
    /// The fully qualified protobuf message name.
    pub type_name: &'static str,
    /// The subject without the tenant token.
    pub subject: &'static str,
    /// The stream that stores the event.
    pub stream: &'static Stream,
}

/// Returns the full subject of event `E` for `tenant`.
pub fn subject_for<E: Event>(tenant: &TenantId) -> String {
    format!("{}.{}", E::SUBJECT, tenant)
}

/// Returns the subject filter that matches event `E` for every tenant.
pub fn all_tenants<E: Event>() -> String {
    format!("{}.*", E::SUBJECT)
}

/// Subject prefix of the live conversation updates dialog replicas pass to each other's
/// watchers (state changes, queue updates, typing): plain NATS, outside every stream, so nothing
/// is stored or replayed. The tenant is the last token.
pub const LIVE_UPDATES: &str = "tandem.live.dialog.v1.update";

/// Returns the live-update subject of `tenant` ([`LIVE_UPDATES`]).
pub fn live_updates_for(tenant: &TenantId) -> String {
    format!("{LIVE_UPDATES}.{tenant}")
}

/// Returns the subject filter of every tenant's live updates ([`LIVE_UPDATES`]).
pub fn live_updates_all() -> String {
    format!("{LIVE_UPDATES}.*")
}

/// Subject prefix of the desk wake-ups routing replicas pass to each other: "this agent's offers
/// or session changed, read them again". Plain NATS like [`LIVE_UPDATES`]; the tenant is the last
/// token and the agent travels in a header.
pub const DESK_WAKEUPS: &str = "tandem.live.routing.v1.desk";

/// Returns the desk wake-up subject of `tenant` ([`DESK_WAKEUPS`]).
pub fn desk_wakeups_for(tenant: &TenantId) -> String {
    format!("{DESK_WAKEUPS}.{tenant}")
}

/// Returns the subject filter of every tenant's desk wake-ups ([`DESK_WAKEUPS`]).
pub fn desk_wakeups_all() -> String {
    format!("{DESK_WAKEUPS}.*")
}

/// Subject prefix of the outbox wake-ups: a replica that committed events while another replica
/// of its service holds the outbox relay tells that one to publish them now. Plain NATS like
/// [`LIVE_UPDATES`]; the service's name is the last token.
pub const OUTBOX_WAKEUPS: &str = "tandem.live.outbox.v1.wake";

/// Returns the outbox wake-up subject of `service` ([`OUTBOX_WAKEUPS`]).
pub fn outbox_wakeups_for(service: &str) -> String {
    format!("{OUTBOX_WAKEUPS}.{service}")
}

/// Splits a full subject into its catalogue entry and tenant, or `None` if it is not one of ours.
pub fn parse_subject(subject: &str) -> Option<(&'static EventSpec, TenantId)> {
    let (base, tenant) = subject.rsplit_once('.')?;
    let spec = CATALOGUE.iter().find(|spec| spec.subject == base)?;
    Some((spec, TenantId::new(tenant).ok()?))
}

/// Looks an event up by its protobuf type name.
pub fn spec_by_type(type_name: &str) -> Option<&'static EventSpec> {
    CATALOGUE.iter().find(|spec| spec.type_name == type_name)
}

macro_rules! streams {
    ($($konst:ident = $name:literal, $context:literal;)*) => {
        $(
            #[doc = concat!("The `", $name, "` stream over `tandem.", $context, ".v1.>`.")]
            pub static $konst: Stream = Stream {
                name: $name,
                context: $context,
                subjects: concat!("tandem.", $context, ".v1.>"),
            };
        )*
        /// Every stream, one per context.
        pub static STREAMS: &[&Stream] = &[$(&$konst),*];
    };
}

macro_rules! catalogue {
    ($($stream:ident, $context:literal, $package:literal {
        $($ty:ident => $entity:literal . $event:literal,)*
    })*) => {
        $($(
            impl Event for $ty {
                const SUBJECT: &'static str = concat!("tandem.", $context, ".v1.", $entity, ".", $event);
                const STREAM: &'static Stream = &$stream;
                const TYPE_NAME: &'static str = concat!($package, ".", stringify!($ty));
            }
        )*)*
        /// Every event type Tandem publishes.
        pub static CATALOGUE: &[EventSpec] = &[$($(
            EventSpec {
                type_name: <$ty as Event>::TYPE_NAME,
                subject: <$ty as Event>::SUBJECT,
                stream: &$stream,
            },
        )*)*];
    };
}

streams! {
    DIALOG = "TANDEM_DIALOG", "dialog";
    ROUTING = "TANDEM_ROUTING", "routing";
    KNOWLEDGE = "TANDEM_KNOWLEDGE", "knowledge";
    FEEDBACK = "TANDEM_FEEDBACK", "feedback";
    POLICY = "TANDEM_POLICY", "policy";
}

use pb::dialog::v1::{
    BotReplied, ConversationClosed, ConversationResolved, ConversationStarted, HandoffCancelled,
    HandoffRequested, IntentModelActivated, MessagePosted, SuggestionCreated, SuggestionReviewed,
};
use pb::feedback::v1::{AlertRaised, AlertResolved, FeedbackReceived};
use pb::knowledge::v1::{ArticleArchived, ArticlePublished, CandidateCreated};
use pb::policy::v1::PolicyUpdated;
use pb::routing::v1::{
    AgentPresenceChanged, AssignmentCompleted, HandoffAbandoned, HandoffAssigned, HandoffDeclined,
    HandoffOffered, HandoffPositionUpdated, HandoffQueued, HandoffReturned, HandoffTimedOut,
    HandoffTransferred, QueueStatsReported,
};

catalogue! {
    DIALOG, "dialog", "tandem.dialog.v1" {
        ConversationStarted => "conversation"."started",
        ConversationResolved => "conversation"."resolved",
        ConversationClosed => "conversation"."closed",
        MessagePosted => "message"."posted",
        BotReplied => "bot"."replied",
        HandoffRequested => "handoff"."requested",
        HandoffCancelled => "handoff"."cancelled",
        SuggestionCreated => "suggestion"."created",
        SuggestionReviewed => "suggestion"."reviewed",
        IntentModelActivated => "intent_model"."activated",
    }
    ROUTING, "routing", "tandem.routing.v1" {
        HandoffQueued => "handoff"."queued",
        HandoffOffered => "handoff"."offered",
        HandoffAssigned => "handoff"."assigned",
        HandoffDeclined => "handoff"."declined",
        HandoffTimedOut => "handoff"."timed_out",
        HandoffAbandoned => "handoff"."abandoned",
        HandoffReturned => "handoff"."returned",
        HandoffTransferred => "handoff"."transferred",
        HandoffPositionUpdated => "handoff"."position_updated",
        AssignmentCompleted => "assignment"."completed",
        AgentPresenceChanged => "agent"."presence_changed",
        QueueStatsReported => "queue"."stats_reported",
    }
    KNOWLEDGE, "knowledge", "tandem.knowledge.v1" {
        ArticlePublished => "article"."published",
        ArticleArchived => "article"."archived",
        CandidateCreated => "candidate"."created",
    }
    FEEDBACK, "feedback", "tandem.feedback.v1" {
        FeedbackReceived => "feedback"."received",
        AlertRaised => "alert"."raised",
        AlertResolved => "alert"."resolved",
    }
    POLICY, "policy", "tandem.policy.v1" {
        PolicyUpdated => "policy"."updated",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use prost::Name as _;

    use super::*;

    fn is_token(token: &str) -> bool {
        !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !token.starts_with('_')
            && !token.ends_with('_')
    }

    #[test]
    fn subjects_are_unique_and_follow_the_grammar() {
        let mut seen = HashSet::new();
        for spec in CATALOGUE {
            assert!(
                seen.insert(spec.subject),
                "duplicate subject {}",
                spec.subject
            );
            let tokens: Vec<&str> = spec.subject.split('.').collect();
            assert_eq!(
                tokens.len(),
                5,
                "{}: tandem.<context>.v1.<entity>.<event>",
                spec.subject
            );
            assert_eq!(tokens[0], "tandem", "{}", spec.subject);
            assert_eq!(tokens[1], spec.stream.context, "{}", spec.subject);
            assert_eq!(tokens[2], "v1", "{}", spec.subject);
            assert!(is_token(tokens[3]), "entity token of {}", spec.subject);
            assert!(is_token(tokens[4]), "event token of {}", spec.subject);
            assert!(
                spec.type_name
                    .starts_with(&format!("tandem.{}.v1.", spec.stream.context)),
                "{} is published on {} but lives in another package",
                spec.type_name,
                spec.subject
            );
        }
    }

    #[test]
    fn type_names_are_unique_and_match_the_protobuf_names() {
        let mut seen = HashSet::new();
        for spec in CATALOGUE {
            assert!(
                seen.insert(spec.type_name),
                "duplicate type {}",
                spec.type_name
            );
        }
        assert_eq!(HandoffRequested::TYPE_NAME, HandoffRequested::full_name());
        assert_eq!(PolicyUpdated::TYPE_NAME, PolicyUpdated::full_name());
        assert_eq!(
            QueueStatsReported::TYPE_NAME,
            QueueStatsReported::full_name()
        );
    }

    #[test]
    fn live_subjects_stay_outside_every_stream() {
        let tenant = TenantId::new("acme").unwrap();
        assert_eq!(live_updates_for(&tenant), format!("{LIVE_UPDATES}.acme"));
        assert_eq!(live_updates_all(), format!("{LIVE_UPDATES}.*"));
        assert_eq!(desk_wakeups_for(&tenant), format!("{DESK_WAKEUPS}.acme"));
        assert_eq!(desk_wakeups_all(), format!("{DESK_WAKEUPS}.*"));
        assert_eq!(
            outbox_wakeups_for("dialog"),
            format!("{OUTBOX_WAKEUPS}.dialog")
        );
        for (prefix, subject) in [
            (LIVE_UPDATES, live_updates_for(&tenant)),
            (DESK_WAKEUPS, desk_wakeups_for(&tenant)),
            (OUTBOX_WAKEUPS, outbox_wakeups_for("dialog")),
        ] {
            for stream in STREAMS {
                let stored = stream.subjects.trim_end_matches('>');
                assert!(
                    !subject.starts_with(stored),
                    "{} stores {subject}",
                    stream.name
                );
            }
            assert!(
                CATALOGUE
                    .iter()
                    .all(|spec| !spec.subject.starts_with(prefix))
            );
        }
    }

    #[test]
    fn every_stream_is_used_and_named_after_its_context() {
        for stream in STREAMS {
            assert_eq!(
                stream.name,
                format!("TANDEM_{}", stream.context.to_uppercase())
            );
            assert!(
                CATALOGUE.iter().any(|spec| spec.stream == *stream),
                "{} unused",
                stream.name
            );
            assert_eq!(stream.subjects, format!("tandem.{}.v1.>", stream.context));
        }
    }

    #[test]
    fn subjects_carry_the_tenant_as_last_token_and_parse_back() {
        let tenant = TenantId::new("acme").unwrap();
        let subject = subject_for::<HandoffAssigned>(&tenant);
        assert_eq!(subject, "tandem.routing.v1.handoff.assigned.acme");
        let (spec, parsed) = parse_subject(&subject).unwrap();
        assert_eq!(spec.type_name, "tandem.routing.v1.HandoffAssigned");
        assert_eq!(parsed, tenant);
        assert_eq!(
            all_tenants::<HandoffAssigned>(),
            "tandem.routing.v1.handoff.assigned.*"
        );
        assert!(parse_subject("tandem.routing.v1.handoff.unknown.acme").is_none());
        assert!(parse_subject("tandem.routing.v1.handoff.assigned.Bad Tenant").is_none());
    }

    #[test]
    fn every_event_message_in_the_descriptor_set_is_catalogued() {
        use prost::Message as _;
        let fds = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let catalogued: HashSet<&str> = CATALOGUE.iter().map(|spec| spec.type_name).collect();
        for file in &fds.file {
            if !file.name().ends_with("/events.proto") {
                continue;
            }
            for message in &file.message_type {
                let name = format!("{}.{}", file.package(), message.name());
                assert!(
                    catalogued.contains(name.as_str()),
                    "{name} has no subject in the catalogue"
                );
            }
        }
    }
}
