//! Prometheus metric names of the feedback service, declared once.

/// Feedback records stored, by `kind` (csat, nps, ces, thumbs) and `source` (submit, import).
pub const FEEDBACK_STORED_TOTAL: &str = "tandem_feedback_feedback_stored_total";
/// Dialog and routing events projected into facts (duplicates not counted).
pub const EVENTS_PROJECTED_TOTAL: &str = "tandem_feedback_events_projected_total";
/// Alerts raised, by `kind`.
pub const ALERTS_RAISED_TOTAL: &str = "tandem_feedback_alerts_raised_total";
/// Alerts resolved.
pub const ALERTS_RESOLVED_TOTAL: &str = "tandem_feedback_alerts_resolved_total";
/// Transactions of the feedback writer (each stores a batch of submitted records).
pub const FEEDBACK_BATCHES_TOTAL: &str = "tandem_feedback_feedback_batches_total";
/// Records per transaction of the feedback writer.
pub const FEEDBACK_BATCH_RECORDS: &str = "tandem_feedback_feedback_batch_records";
