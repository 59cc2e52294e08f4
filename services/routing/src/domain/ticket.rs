//! Tickets (one per handoff): states, dispositions, priority and waiting-time estimates.

use super::queue::PriorityWeights;

/// Where a ticket is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketState {
    /// Waiting for an agent.
    Queued,
    /// Offered to one agent.
    Offered,
    /// Owned by an agent.
    Assigned,
    /// The assignment ended.
    Completed,
    /// The customer left while waiting.
    Abandoned,
    /// Handed back to the bot before assignment.
    Returned,
}

impl TicketState {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            TicketState::Queued => "queued",
            TicketState::Offered => "offered",
            TicketState::Assigned => "assigned",
            TicketState::Completed => "completed",
            TicketState::Abandoned => "abandoned",
            TicketState::Returned => "returned",
        }
    }

    /// Parses the stored form.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "queued" => TicketState::Queued,
            "offered" => TicketState::Offered,
            "assigned" => TicketState::Assigned,
            "completed" => TicketState::Completed,
            "abandoned" => TicketState::Abandoned,
            "returned" => TicketState::Returned,
            _ => return None,
        })
    }

    /// Whether the ticket still waits for an agent.
    pub fn is_waiting(self) -> bool {
        matches!(self, TicketState::Queued | TicketState::Offered)
    }

    /// Whether the ticket is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TicketState::Completed | TicketState::Abandoned | TicketState::Returned
        )
    }
}

/// How an assignment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// The agent resolved it.
    Resolved,
    /// The agent handed it back to the bot.
    ReturnToBot,
    /// It went to another agent or queue.
    Transferred,
    /// The conversation closed under the agent (the customer left).
    Closed,
}

impl Disposition {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Resolved => "resolved",
            Disposition::ReturnToBot => "return_to_bot",
            Disposition::Transferred => "transferred",
            Disposition::Closed => "closed",
        }
    }

    /// Parses the stored form.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "resolved" => Disposition::Resolved,
            "return_to_bot" => Disposition::ReturnToBot,
            "transferred" => Disposition::Transferred,
            "closed" => Disposition::Closed,
            _ => return None,
        })
    }
}

/// Why a handoff went back to the bot before assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnReason {
    /// The queue was closed.
    OutOfHours,
    /// The queue was at its maximum length.
    QueueFull,
    /// The customer cancelled.
    Cancelled,
    /// A newer handoff of the same conversation replaced it.
    Superseded,
}

/// The part of the priority fixed at enqueue: base + VIP boost + emotion weight × severity.
pub fn static_priority(base: i32, vip: bool, severity: f64, weights: &PriorityWeights) -> f64 {
    let vip = if vip { weights.vip_boost } else { 0.0 };
    f64::from(base.clamp(0, 100)) + vip + weights.emotion_weight * severity.clamp(0.0, 1.0)
}

/// The priority now: the static part plus ageing for the seconds waited.
pub fn effective_priority(static_part: f64, ageing_per_second: f64, waited_seconds: f64) -> f64 {
    static_part + ageing_per_second * waited_seconds.max(0.0)
}

/// Severity of negative emotion (0..1) from per-turn sentiment scores (-1..1), oldest first: the
/// most negative of the last three turns.
pub fn negative_severity(scores: &[f64]) -> f64 {
    scores
        .iter()
        .rev()
        .take(3)
        .filter(|s| s.is_finite())
        .map(|s| (-s).clamp(0.0, 1.0))
        .fold(0.0, f64::max)
}

/// Estimated seconds until a ticket at `position` (1 = next) is accepted, from the queue's
/// recent service rate (tickets assigned per minute). Without history it assumes
/// `default_seconds_per_position` per ticket ahead, shared by the agents who could take it.
pub fn eta_seconds(
    position: i64,
    rate_per_minute: f64,
    agents_available: i64,
    default_seconds_per_position: u64,
) -> i32 {
    if position <= 0 {
        return 0;
    }
    let seconds = if rate_per_minute > 0.0 {
        position as f64 * 60.0 / rate_per_minute
    } else {
        let agents = agents_available.max(1) as f64;
        position as f64 * default_seconds_per_position as f64 / agents
    };
    seconds.ceil().clamp(0.0, f64::from(i32::MAX)) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_emotion_and_ageing_raise_priority() {
        let weights = PriorityWeights {
            vip_boost: 20.0,
            emotion_weight: 10.0,
            ageing_per_second: 0.5,
        };
        let plain = static_priority(50, false, 0.0, &weights);
        let vip = static_priority(50, true, 0.0, &weights);
        let angry = static_priority(50, false, 0.8, &weights);
        assert_eq!(plain, 50.0);
        assert_eq!(vip, 70.0);
        assert!((angry - 58.0).abs() < 1e-9);
        assert_eq!(effective_priority(plain, 0.5, 60.0), 80.0);
        assert_eq!(static_priority(500, false, 5.0, &weights), 110.0, "clamped");
    }

    #[test]
    fn severity_is_the_worst_recent_turn() {
        assert_eq!(negative_severity(&[]), 0.0);
        assert_eq!(negative_severity(&[0.5, 0.2]), 0.0);
        assert_eq!(negative_severity(&[-0.9, 0.1, 0.1, -0.4]), 0.4);
        assert_eq!(negative_severity(&[-2.0]), 1.0);
    }

    #[test]
    fn eta_uses_the_service_rate_or_a_default() {
        assert_eq!(eta_seconds(0, 4.0, 1, 60), 0);
        assert_eq!(eta_seconds(2, 4.0, 1, 60), 30);
        assert_eq!(eta_seconds(3, 0.0, 0, 60), 180);
        assert_eq!(eta_seconds(3, 0.0, 3, 60), 60);
    }

    #[test]
    fn states_round_trip() {
        for state in [
            TicketState::Queued,
            TicketState::Offered,
            TicketState::Assigned,
            TicketState::Completed,
            TicketState::Abandoned,
            TicketState::Returned,
        ] {
            assert_eq!(TicketState::parse(state.as_str()), Some(state));
        }
        assert!(TicketState::Offered.is_waiting());
        assert!(TicketState::Returned.is_final());
    }
}
