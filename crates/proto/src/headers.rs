//! Header names carried by every event on the bus.
//!
//! The payload is the protobuf event message; everything about the envelope travels in headers
//! so that a subscriber can route, de-duplicate and trace without decoding the payload.

/// The event's unique id (UUIDv7). JetStream de-duplicates on it within the stream's window.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// Set by the relay on every event of a batch after the first one bound for the same stream:
/// the broker stores the event only if the stream's last message is the one named here.
pub const EXPECTED_LAST_MSG_ID: &str = "Nats-Expected-Last-Msg-Id";
/// The fully qualified protobuf type of the payload, e.g. `tandem.routing.v1.HandoffAssigned`.
pub const EVENT_TYPE: &str = "Tandem-Event-Type";
/// The tenant the event belongs to; also the last token of the subject.
pub const TENANT: &str = "Tandem-Tenant";
/// When the fact happened, RFC 3339 with microseconds.
pub const OCCURRED_AT: &str = "Tandem-Occurred-At";
/// The key whose order consumers keep (usually the conversation id).
pub const ORDERING_KEY: &str = "Tandem-Ordering-Key";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace state.
pub const TRACESTATE: &str = "tracestate";
