//! Pure rules of the feedback context: no I/O, no clock, no infrastructure types.
//!
//! - [`fact`]: per-conversation, per-handoff and per-suggestion facts merged from events by
//!   rules that do not depend on arrival order.
//! - [`rollup`]: what a conversation contributes to the hourly and daily rollups, and the
//!   difference between two contributions.
//! - [`feedback`]: customer feedback records, their validation and idempotency.
//! - [`query`]: metric queries: validation, and turning rollup rows into series.
//! - [`alert`]: alert rules, their validation and evaluation with hysteresis.
//! - [`problems`]: keyword clustering of complaints and failed bot turns.
//! - [`csv`]: the bulk import format.

pub mod alert;
pub mod csv;
pub mod fact;
pub mod feedback;
pub mod problems;
pub mod query;
pub mod rollup;

/// Microseconds since the Unix epoch, UTC: how every time is kept, compared and stored.
pub type Micros = i64;

/// One hour in microseconds.
pub const HOUR: Micros = 3_600_000_000;
/// One day in microseconds.
pub const DAY: Micros = 24 * HOUR;
/// The window of first-contact resolution and of the reopen rate.
pub const SEVEN_DAYS: Micros = 7 * DAY;

/// A validation problem with one field of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `feedback.csat`.
    pub field: String,
    /// What is wrong, lowercase, no trailing punctuation.
    pub message: String,
}

impl FieldError {
    /// Creates a field error.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Joins field errors into one message that names every field.
pub fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Counts characters as the contracts do (Unicode scalar values).
pub fn chars(text: &str) -> usize {
    text.chars().count()
}

/// Cuts `text` to at most `max` characters.
pub fn truncate_chars(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}
