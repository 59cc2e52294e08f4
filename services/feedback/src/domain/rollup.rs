//! Rollups: sums per hour (and per day) and per combination of dimensions, from which every
//! published metric is computed.
//!
//! A conversation's [`contribution`] is everything it adds to the rollups: its own rates, its
//! handoffs' clocks, its suggestions and the feedback about it. When its facts change, the
//! service applies `contribution(after) − contribution(before)` ([`Contribution::minus`]); the
//! rollups are therefore always the sum of the contributions of the current facts, whatever the
//! order in which events arrived. All quantities are integers, so differences are exact.

use std::collections::BTreeMap;

use super::fact::{ConversationFact, ConversationState, handler};
use super::feedback::{FeedbackObs, Score, subject};
use super::{DAY, HOUR, Micros};

/// `MetricName` values (tandem.feedback.v1).
pub mod metric {
    /// Containment rate.
    pub const CONTAINMENT_RATE: i32 = 1;
    /// Handoff rate.
    pub const HANDOFF_RATE: i32 = 2;
    /// Handoff system latency.
    pub const HANDOFF_SYSTEM_LATENCY: i32 = 3;
    /// Queue wait.
    pub const QUEUE_WAIT: i32 = 4;
    /// Agent accept time.
    pub const AGENT_ACCEPT_TIME: i32 = 5;
    /// First human reply.
    pub const FIRST_HUMAN_REPLY: i32 = 6;
    /// First-contact resolution.
    pub const FIRST_CONTACT_RESOLUTION: i32 = 7;
    /// Reopen rate.
    pub const REOPEN_RATE: i32 = 8;
    /// Handle time.
    pub const HANDLE_TIME: i32 = 9;
    /// CSAT.
    pub const CSAT: i32 = 10;
    /// NPS.
    pub const NPS: i32 = 11;
    /// CES.
    pub const CES: i32 = 12;
    /// Suggestion acceptance (the trust index).
    pub const SUGGESTION_ACCEPTANCE: i32 = 13;

    /// Returns whether the metric is a duration (reported in seconds with percentiles).
    pub fn is_duration(metric: i32) -> bool {
        matches!(
            metric,
            HANDOFF_SYSTEM_LATENCY
                | QUEUE_WAIT
                | AGENT_ACCEPT_TIME
                | FIRST_HUMAN_REPLY
                | HANDLE_TIME
        )
    }
}

/// Rollup grains: a time bucket and a set of dimensions. The "by scenario" grains keep only the
/// scenario and the "tenant" grains no dimension at all (the others are left unknown), so the
/// common queries — everything, or by scenario — read a small fraction of the rows.
pub mod grain {
    /// One row per UTC hour and combination of all dimensions.
    pub const HOUR: i64 = 1;
    /// One row per UTC day and combination of all dimensions.
    pub const DAY: i64 = 2;
    /// One row per UTC hour and scenario.
    pub const SCENARIO_HOUR: i64 = 3;
    /// One row per UTC day and scenario.
    pub const SCENARIO_DAY: i64 = 4;
    /// One row per UTC hour.
    pub const TENANT_HOUR: i64 = 5;
    /// One row per UTC day.
    pub const TENANT_DAY: i64 = 6;
}

/// The dimensions of one rollup row. Empty strings and zero enums mean "unknown".
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dims {
    /// Scenario.
    pub scenario: String,
    /// Intent.
    pub intent: String,
    /// `Channel` value.
    pub channel: i32,
    /// `HandlerKind` value.
    pub handler: i32,
    /// Agent.
    pub agent: String,
    /// Team.
    pub team: String,
    /// `HandoffReason` value.
    pub reason: i32,
    /// `Language` value.
    pub language: i32,
}

/// The key of one hourly rollup row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RollupKey {
    /// `MetricName` value.
    pub metric: i32,
    /// Start of the UTC hour.
    pub hour: Micros,
    /// Dimensions.
    pub dims: Dims,
}

impl RollupKey {
    /// Returns the (grain, bucket start, dimensions) rows this key is written to: its hour and
    /// its day, with all dimensions, with the scenario only, and with none.
    pub fn grains(&self) -> [(i64, Micros, Dims); 6] {
        let day = self.hour.div_euclid(DAY) * DAY;
        let scenario = Dims {
            scenario: self.dims.scenario.clone(),
            ..Dims::default()
        };
        [
            (grain::HOUR, self.hour, self.dims.clone()),
            (grain::DAY, day, self.dims.clone()),
            (grain::SCENARIO_HOUR, self.hour, scenario.clone()),
            (grain::SCENARIO_DAY, day, scenario),
            (grain::TENANT_HOUR, self.hour, Dims::default()),
            (grain::TENANT_DAY, day, Dims::default()),
        ]
    }
}

/// Sums kept per rollup row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Numerator (rates), promoters − detractors (NPS).
    pub num: i64,
    /// Denominator (rates, NPS).
    pub den: i64,
    /// Observations.
    pub cnt: i64,
    /// Sum of scores (CES) or of durations in microseconds.
    pub total: i64,
    /// Duration histogram: cell → observations.
    pub hist: BTreeMap<i32, i64>,
}

impl Tally {
    fn is_zero(&self) -> bool {
        self.num == 0
            && self.den == 0
            && self.cnt == 0
            && self.total == 0
            && self.hist.values().all(|n| *n == 0)
    }
}

/// Cells per doubling of a duration in the histograms.
const CELLS_PER_DOUBLING: f64 = 16.0;

/// Returns the histogram cell of a duration in microseconds.
pub fn cell_of(micros: Micros) -> i32 {
    if micros < 1 {
        0
    } else {
        1 + (CELLS_PER_DOUBLING * (micros as f64).log2()).floor() as i32
    }
}

/// Returns the value reported for a cell: the geometric middle of its bounds, in microseconds.
pub fn cell_value(cell: i32) -> f64 {
    if cell <= 0 {
        0.0
    } else {
        2f64.powf((f64::from(cell) - 0.5) / CELLS_PER_DOUBLING)
    }
}

/// Returns the `q` quantile (0..1) of a histogram, in microseconds.
pub fn quantile(hist: &BTreeMap<i32, i64>, q: f64) -> Option<f64> {
    let n: i64 = hist.values().filter(|c| **c > 0).sum();
    if n == 0 {
        return None;
    }
    let rank = ((q * n as f64).ceil() as i64).clamp(1, n);
    let mut seen = 0;
    for (cell, count) in hist {
        if *count <= 0 {
            continue;
        }
        seen += count;
        if seen >= rank {
            return Some(cell_value(*cell));
        }
    }
    None
}

/// What a set of facts adds to the rollups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contribution(pub BTreeMap<RollupKey, Tally>);

impl Contribution {
    fn entry(&mut self, metric: i32, at: Micros, dims: &Dims) -> &mut Tally {
        let key = RollupKey {
            metric,
            hour: at.div_euclid(HOUR) * HOUR,
            dims: dims.clone(),
        };
        self.0.entry(key).or_default()
    }

    fn rate(&mut self, metric: i32, at: Micros, dims: &Dims, hit: bool) {
        let tally = self.entry(metric, at, dims);
        tally.num += i64::from(hit);
        tally.den += 1;
        tally.cnt += 1;
    }

    fn duration(&mut self, metric: i32, at: Micros, dims: &Dims, micros: Option<Micros>) {
        if let Some(micros) = micros {
            let tally = self.entry(metric, at, dims);
            tally.cnt += 1;
            tally.total += micros;
            *tally.hist.entry(cell_of(micros)).or_default() += 1;
        }
    }

    /// Adds another contribution.
    pub fn add(&mut self, other: &Contribution) {
        for (key, tally) in &other.0 {
            let mine = self.0.entry(key.clone()).or_default();
            mine.num += tally.num;
            mine.den += tally.den;
            mine.cnt += tally.cnt;
            mine.total += tally.total;
            for (cell, n) in &tally.hist {
                *mine.hist.entry(*cell).or_default() += n;
            }
        }
        self.drop_zeros();
    }

    fn drop_zeros(&mut self) {
        self.0.retain(|_, tally| {
            tally.hist.retain(|_, n| *n != 0);
            !tally.is_zero()
        });
    }

    /// Returns `self − before`, without the rows that do not change.
    pub fn minus(&self, before: &Contribution) -> Contribution {
        let mut delta = self.clone();
        for (key, tally) in &before.0 {
            let mine = delta.0.entry(key.clone()).or_default();
            mine.num -= tally.num;
            mine.den -= tally.den;
            mine.cnt -= tally.cnt;
            mine.total -= tally.total;
            for (cell, n) in &tally.hist {
                *mine.hist.entry(*cell).or_default() -= n;
            }
        }
        delta.drop_zeros();
        delta
    }

    /// Returns whether nothing is contributed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The dimensions of a conversation.
pub fn conversation_dims(c: &ConversationFact) -> Dims {
    Dims {
        scenario: c.scenario_id.value.clone(),
        intent: c.intent.value.clone(),
        channel: c.channel.value,
        handler: c.handler(),
        agent: c.first_assignment.value.0.clone(),
        team: c.first_assignment.value.1.clone(),
        reason: c.first_handoff_reason.value,
        language: c.language.value,
    }
}

/// What the conversation's own facts, handoffs and suggestions contribute (no feedback).
pub fn conversation_part(state_c: &ConversationFact, out: &mut Contribution) {
    let c = state_c;
    let Some(at) = c.bucket_at() else {
        return;
    };
    if c.test {
        return;
    }
    let dims = conversation_dims(c);
    if c.eligible() {
        out.rate(metric::CONTAINMENT_RATE, at, &dims, c.contained());
        out.rate(metric::HANDOFF_RATE, at, &dims, c.handed_off());
    }
    if c.first_resolution.at.is_some() {
        out.rate(metric::REOPEN_RATE, at, &dims, c.reopened());
        if !c.customer_id.value.is_empty() {
            out.rate(metric::FIRST_CONTACT_RESOLUTION, at, &dims, !c.followed_up);
        }
    }
}

/// What a conversation's handoffs and suggestions contribute.
pub fn children_part(state: &ConversationState, out: &mut Contribution) {
    let c = &state.conversation;
    if c.test {
        return;
    }
    let base = conversation_dims(c);
    for handoff in state.handoffs.values() {
        let Some(at) = handoff.bucket_at() else {
            continue;
        };
        if handoff.test {
            continue;
        }
        let dims = Dims {
            reason: handoff.reason.value,
            agent: handoff.assignment.value.1.clone(),
            team: handoff.assignment.value.2.clone(),
            ..base.clone()
        };
        out.duration(
            metric::HANDOFF_SYSTEM_LATENCY,
            at,
            &dims,
            handoff.system_latency(),
        );
        out.duration(metric::QUEUE_WAIT, at, &dims, handoff.queue_wait());
        out.duration(metric::AGENT_ACCEPT_TIME, at, &dims, handoff.agent_accept());
        out.duration(
            metric::FIRST_HUMAN_REPLY,
            at,
            &dims,
            handoff.first_human_reply(),
        );
        out.duration(metric::HANDLE_TIME, at, &dims, handoff.handle_time());
    }
    for suggestion in state.suggestions.values() {
        let Some(at) = suggestion.bucket_at() else {
            continue;
        };
        if suggestion.test {
            continue;
        }
        let mut dims = Dims {
            agent: suggestion.agent_id.value.clone(),
            team: String::new(),
            handler: handler::AGENT,
            ..base.clone()
        };
        if dims.scenario.is_empty() {
            dims.scenario = suggestion.scenario_id.value.clone();
        }
        out.rate(
            metric::SUGGESTION_ACCEPTANCE,
            at,
            &dims,
            suggestion.accepted(),
        );
    }
}

/// Everything a conversation with its handoffs, suggestions and feedback contributes.
pub fn contribution(state: &ConversationState, feedback: &[FeedbackObs]) -> Contribution {
    let mut out = Contribution::default();
    let c = &state.conversation;
    if c.seen() && c.test {
        return out;
    }
    conversation_part(c, &mut out);
    children_part(state, &mut out);
    for fb in feedback {
        feedback_part(Some(c), fb, &mut out);
    }
    out
}

/// What one piece of feedback contributes, given its conversation's facts when known.
pub fn feedback_part(
    conversation: Option<&ConversationFact>,
    fb: &FeedbackObs,
    out: &mut Contribution,
) {
    let explicit = match fb.subject {
        subject::BOT => Some(handler::BOT),
        subject::AGENT => Some(handler::AGENT),
        _ => None,
    };
    let dims = match conversation.filter(|c| c.seen()) {
        Some(c) if c.test => return,
        Some(c) => {
            let mut dims = conversation_dims(c);
            if dims.channel == 0 {
                dims.channel = fb.channel;
            }
            if let Some(handler) = explicit {
                dims.handler = handler;
            }
            dims
        }
        None => Dims {
            channel: fb.channel,
            handler: explicit.unwrap_or(handler::UNSPECIFIED),
            ..Dims::default()
        },
    };
    match fb.score {
        Score::Csat(score) => out.rate(metric::CSAT, fb.at, &dims, score >= 4),
        Score::Nps(score) => {
            let tally = out.entry(metric::NPS, fb.at, &dims);
            tally.num += match score {
                9.. => 1,
                ..=6 => -1,
                _ => 0,
            };
            tally.den += 1;
            tally.cnt += 1;
        }
        Score::Ces(score) => {
            let tally = out.entry(metric::CES, fb.at, &dims);
            tally.cnt += 1;
            tally.total += i64::from(score);
        }
        Score::Thumbs(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::fact::{FactEvent, FactInput};

    #[test]
    fn histogram_quantiles_are_within_the_cell_error() {
        let mut hist = BTreeMap::new();
        for v in 1..=1000i64 {
            *hist.entry(cell_of(v * 1000)).or_default() += 1;
        }
        for (q, exact) in [(0.5, 500_000.0), (0.95, 950_000.0), (0.99, 990_000.0)] {
            let got = quantile(&hist, q).unwrap();
            assert!(
                ((got - exact) / exact).abs() < 0.045,
                "{q}: {got} vs {exact}"
            );
        }
        assert_eq!(quantile(&BTreeMap::new(), 0.5), None);
    }

    #[test]
    fn a_late_start_moves_the_conversation_to_its_true_bucket() {
        let mut state = ConversationState::default();
        let closed = FactInput {
            conversation_id: "c".into(),
            occurred_at: 5 * HOUR + 10,
            scenario_id: "s".into(),
            test: false,
            event: FactEvent::Closed,
        };
        state.apply(&closed);
        let before = contribution(&state, &[]);
        let started = FactInput {
            occurred_at: 2 * HOUR + 5,
            event: FactEvent::Started {
                customer_id: String::new(),
                channel: 1,
                language: 2,
                proactive: false,
            },
            ..closed
        };
        state.apply(&started);
        let after = contribution(&state, &[]);
        let delta = after.minus(&before);
        let mut rebuilt = before;
        rebuilt.add(&delta);
        assert_eq!(rebuilt, after, "before + delta = after");
        let hours: Vec<Micros> = after.0.keys().map(|k| k.hour).collect();
        assert!(hours.iter().all(|h| *h == 2 * HOUR), "{hours:?}");
        assert!(
            delta
                .0
                .iter()
                .any(|(k, t)| k.hour == 5 * HOUR && t.den == -1),
            "the provisional bucket loses the conversation"
        );
    }

    #[test]
    fn conversations_of_tests_contribute_nothing_not_even_their_feedback() {
        let mut state = ConversationState::default();
        state.apply(&FactInput {
            conversation_id: "c".into(),
            occurred_at: 1,
            scenario_id: String::new(),
            test: true,
            event: FactEvent::Closed,
        });
        let fb = FeedbackObs {
            channel: 1,
            subject: subject::BOT,
            score: Score::Csat(1),
            at: 2,
        };
        assert!(contribution(&state, &[fb]).is_empty());
    }
}
