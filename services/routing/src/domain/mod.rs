//! Pure routing rules: no I/O, no clock, no transport. Time comes in as arguments.
//!
//! - [`agent`]: agents, skills, presence and their validation.
//! - [`queue`]: queues, business hours, overflow steps, priority weights.
//! - [`ticket`]: ticket states, dispositions, priority and ETA arithmetic.
//! - [`select`]: which agent gets an offer.

pub mod agent;
pub mod queue;
pub mod select;
pub mod ticket;

/// Counts Unicode scalar values, the unit every length limit of the contracts uses.
pub(crate) fn chars(text: &str) -> usize {
    text.chars().count()
}

/// Checks an identifier chosen by a client (agent ids are token subjects): 1 to 128 characters,
/// no control characters.
pub(crate) fn check_id(field: &str, value: &str) -> Result<(), crate::error::RoutingError> {
    if value.is_empty() {
        return Err(crate::error::invalid(format!("{field} is required")));
    }
    if chars(value) > 128 {
        return Err(crate::error::invalid(format!(
            "{field} is longer than 128 characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(crate::error::invalid(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

/// Checks a free-text field against its limit.
pub(crate) fn check_len(
    field: &str,
    value: &str,
    max: usize,
) -> Result<(), crate::error::RoutingError> {
    if chars(value) > max {
        return Err(crate::error::invalid(format!(
            "{field} is longer than {max} characters"
        )));
    }
    Ok(())
}
