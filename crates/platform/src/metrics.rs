//! Metric names of the platform kit, declared once.

/// Histogram buckets for latencies, in seconds (100 µs to 10 s).
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Requests refused by authentication, by error code.
pub const AUTH_FAILURES_TOTAL: &str = "tandem_auth_failures_total";
/// gRPC requests served, by method and code.
pub const GRPC_REQUESTS_TOTAL: &str = "tandem_grpc_requests_total";
/// gRPC request latency, by method.
pub const GRPC_REQUEST_SECONDS: &str = "tandem_grpc_request_duration_seconds";
/// Events published from the outbox, by stream.
pub const OUTBOX_PUBLISHED_TOTAL: &str = "tandem_outbox_published_total";
/// Outbox rows waiting to be published.
pub const OUTBOX_PENDING: &str = "tandem_outbox_pending";
/// Outbox publish failures.
pub const OUTBOX_FAILURES_TOTAL: &str = "tandem_outbox_failures_total";
/// Events handled by a consumer, by consumer and outcome.
pub const EVENTS_HANDLED_TOTAL: &str = "tandem_events_handled_total";
/// Redelivered events skipped because the inbox had them already, by consumer.
pub const EVENTS_DUPLICATE_TOTAL: &str = "tandem_events_duplicate_total";
/// Time from an event's occurrence to the end of its handling, by consumer.
pub const EVENT_LAG_SECONDS: &str = "tandem_event_lag_seconds";

/// Registers help texts so the exposition passes `promtool check metrics`.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        AUTH_FAILURES_TOTAL,
        "Requests refused by authentication, by error code."
    );
    describe_counter!(
        GRPC_REQUESTS_TOTAL,
        "gRPC requests served, by method and status code."
    );
    describe_histogram!(
        GRPC_REQUEST_SECONDS,
        Unit::Seconds,
        "gRPC request latency, by method."
    );
    describe_counter!(
        OUTBOX_PUBLISHED_TOTAL,
        "Events published from the transactional outbox."
    );
    describe_gauge!(OUTBOX_PENDING, "Outbox rows not yet published.");
    describe_counter!(OUTBOX_FAILURES_TOTAL, "Failed outbox publish rounds.");
    describe_counter!(
        EVENTS_HANDLED_TOTAL,
        "Events handled by a consumer, by consumer and outcome."
    );
    describe_counter!(
        EVENTS_DUPLICATE_TOTAL,
        "Redelivered events skipped by the inbox, by consumer."
    );
    describe_histogram!(
        EVENT_LAG_SECONDS,
        Unit::Seconds,
        "Time from an event's occurrence to the end of its handling."
    );
}
