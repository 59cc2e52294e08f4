//! Validation of one scenario and of a tenant's catalogue of scenarios. Every check runs, so a
//! caller sees all problems at once, each with the path of the offending field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;

use crate::model::{Bounds, Scenario, Strategy};

/// Longest scenario identifier.
const MAX_ID_CHARS: usize = 64;
/// Most skills a routing target may require.
const MAX_SKILLS: usize = 10;

/// One problem found in a scenario or a catalogue.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyViolation {
    /// A value lies outside its natural range.
    #[error("{path} is {value}, outside its range {min}..={max}")]
    OutOfRange {
        /// Field path, e.g. `thresholds.min_intent_confidence`.
        path: String,
        /// The value found.
        value: String,
        /// Lowest valid value.
        min: String,
        /// Highest valid value.
        max: String,
    },
    /// A threshold lies outside its guardrails.
    #[error("{path} is {value}, outside its guardrails {min}..={max}")]
    OutsideGuardrails {
        /// Field path.
        path: String,
        /// The value found.
        value: String,
        /// Guardrail minimum.
        min: String,
        /// Guardrail maximum.
        max: String,
    },
    /// Guardrail bounds whose minimum exceeds their maximum.
    #[error("{path} has min {min} greater than max {max}")]
    InvertedBounds {
        /// Field path, e.g. `guardrails.max_fallbacks`.
        path: String,
        /// Minimum found.
        min: String,
        /// Maximum found.
        max: String,
    },
    /// The clarify band reaches above the answer threshold.
    #[error("{path} is {clarify}, above thresholds.min_intent_confidence {minimum}")]
    ClarifyAboveMinimum {
        /// Field path.
        path: String,
        /// Clarify confidence found.
        clarify: f64,
        /// Minimum intent confidence found.
        minimum: f64,
    },
    /// The strategy is not among the guardrails' allowed strategies.
    #[error("{path} {strategy:?} is not in guardrails.allowed_strategies")]
    StrategyNotAllowed {
        /// Field path.
        path: String,
        /// Strategy found.
        strategy: Strategy,
    },
    /// A required text is empty.
    #[error("{path} is empty")]
    Empty {
        /// Field path.
        path: String,
    },
    /// A text breaks its format.
    #[error("{path} is malformed: {expected}")]
    Malformed {
        /// Field path.
        path: String,
        /// What the format is.
        expected: &'static str,
    },
    /// A list holds more entries than allowed.
    #[error("{path} has {len} entries, more than {max}")]
    TooMany {
        /// Field path.
        path: String,
        /// Entries found.
        len: usize,
        /// Most entries allowed.
        max: usize,
    },
    /// An intent is listed twice in one scenario.
    #[error("{path} repeats intent {intent:?}")]
    DuplicateIntent {
        /// Field path of the second occurrence.
        path: String,
        /// The repeated intent.
        intent: String,
    },
    /// Two scenarios of a catalogue share an identifier.
    #[error("scenario id {id:?} is used more than once")]
    DuplicateScenario {
        /// The shared identifier.
        id: String,
    },
    /// Two scenarios claim an intent with the same priority, so neither wins.
    #[error("intent {intent:?} is claimed by {first:?} and {second:?} with equal intent_priority")]
    IntentConflict {
        /// The contested intent.
        intent: String,
        /// First scenario claiming it.
        first: String,
        /// Second scenario claiming it.
        second: String,
    },
}

/// Records a violation when `value` lies outside its natural `range`.
fn check_range<T: PartialOrd + Copy + Display>(
    out: &mut Vec<PolicyViolation>,
    path: &str,
    value: T,
    range: Bounds<T>,
) {
    if !range.contains(value) {
        out.push(PolicyViolation::OutOfRange {
            path: path.to_owned(),
            value: value.to_string(),
            min: range.min.to_string(),
            max: range.max.to_string(),
        });
    }
}

/// Records violations for a threshold and its guardrails: both within the natural range, the
/// guardrails ordered, and the value within them.
fn check_threshold<T: PartialOrd + Copy + Display>(
    out: &mut Vec<PolicyViolation>,
    field: &str,
    value: T,
    guard: Bounds<T>,
    range: Bounds<T>,
) {
    let path = format!("thresholds.{field}");
    let guard_path = format!("guardrails.{field}");
    check_range(out, &path, value, range);
    check_range(out, &format!("{guard_path}.min"), guard.min, range);
    check_range(out, &format!("{guard_path}.max"), guard.max, range);
    if guard.min > guard.max {
        out.push(PolicyViolation::InvertedBounds {
            path: guard_path,
            min: guard.min.to_string(),
            max: guard.max.to_string(),
        });
    } else if !guard.contains(value) {
        out.push(PolicyViolation::OutsideGuardrails {
            path,
            value: value.to_string(),
            min: guard.min.to_string(),
            max: guard.max.to_string(),
        });
    }
}

/// Displays a duration as whole seconds with an `s` suffix, for messages.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
struct Seconds(std::time::Duration);

impl Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}s", self.0.as_secs_f64())
    }
}

/// Returns whether `id` uses only lower case letters, digits, '_' and '-'.
fn is_well_formed_id(id: &str) -> bool {
    id.chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl PolicyViolation {
    /// Returns the path of the offending field (`thresholds.max_fallbacks`, `intents[2]`), or for
    /// catalogue-wide problems the path of what they concern (`id`, `intents`).
    pub fn path(&self) -> &str {
        match self {
            Self::OutOfRange { path, .. }
            | Self::OutsideGuardrails { path, .. }
            | Self::InvertedBounds { path, .. }
            | Self::ClarifyAboveMinimum { path, .. }
            | Self::StrategyNotAllowed { path, .. }
            | Self::Empty { path }
            | Self::Malformed { path, .. }
            | Self::TooMany { path, .. }
            | Self::DuplicateIntent { path, .. } => path,
            Self::DuplicateScenario { .. } => "id",
            Self::IntentConflict { .. } => "intents",
        }
    }
}

impl Scenario {
    /// Checks the scenario on its own and returns every violation found.
    ///
    /// Checks: identifier present and well formed, intents non-empty and unique, every threshold
    /// and guardrail bound inside its natural range, guardrails ordered, every threshold inside its
    /// guardrails, the clarify band not above the answer threshold, the strategy allowed by the
    /// guardrails (when they list any), routing priority and skill count.
    pub fn validate(&self) -> Result<(), Vec<PolicyViolation>> {
        let mut out = Vec::new();
        if self.id.is_empty() {
            out.push(PolicyViolation::Empty {
                path: "id".to_owned(),
            });
        } else if self.id.chars().count() > MAX_ID_CHARS || !is_well_formed_id(&self.id) {
            out.push(PolicyViolation::Malformed {
                path: "id".to_owned(),
                expected: "at most 64 lower case letters, digits, '_' or '-'",
            });
        }
        let mut seen = BTreeSet::new();
        for (i, intent) in self.intents.iter().enumerate() {
            let path = format!("intents[{i}]");
            if intent.is_empty() {
                out.push(PolicyViolation::Empty { path });
            } else if !seen.insert(intent.as_str()) {
                out.push(PolicyViolation::DuplicateIntent {
                    path,
                    intent: intent.clone(),
                });
            }
        }
        check_range(
            &mut out,
            "intent_priority",
            self.intent_priority,
            Bounds::new(0, 1000),
        );

        let t = &self.thresholds;
        let g = &self.guardrails;
        let unit = Bounds::new(0.0, 1.0);
        check_threshold(
            &mut out,
            "min_intent_confidence",
            t.min_intent_confidence,
            g.min_intent_confidence,
            unit,
        );
        check_threshold(
            &mut out,
            "clarify_confidence",
            t.clarify_confidence,
            g.clarify_confidence,
            unit,
        );
        if t.clarify_confidence > t.min_intent_confidence {
            out.push(PolicyViolation::ClarifyAboveMinimum {
                path: "thresholds.clarify_confidence".to_owned(),
                clarify: t.clarify_confidence,
                minimum: t.min_intent_confidence,
            });
        }
        check_threshold(
            &mut out,
            "negative_sentiment",
            t.negative_sentiment,
            g.negative_sentiment,
            Bounds::new(-1.0, 0.0),
        );
        check_threshold(
            &mut out,
            "sentiment_drop",
            t.sentiment_drop,
            g.sentiment_drop,
            Bounds::new(0.0, 2.0),
        );
        check_threshold(
            &mut out,
            "sentiment_window_turns",
            t.sentiment_window_turns,
            g.sentiment_window_turns,
            Bounds::new(1, 10),
        );
        check_threshold(
            &mut out,
            "max_fallbacks",
            t.max_fallbacks,
            g.max_fallbacks,
            Bounds::new(0, 10),
        );
        check_threshold(
            &mut out,
            "max_bot_turns",
            t.max_bot_turns,
            g.max_bot_turns,
            Bounds::new(1, 100),
        );
        check_threshold(
            &mut out,
            "max_complexity",
            t.max_complexity,
            g.max_complexity,
            unit,
        );
        check_threshold(
            &mut out,
            "max_queue_wait",
            Seconds(t.max_queue_wait),
            Bounds::new(Seconds(g.max_queue_wait.min), Seconds(g.max_queue_wait.max)),
            Bounds::new(
                Seconds(std::time::Duration::ZERO),
                Seconds(std::time::Duration::MAX),
            ),
        );
        if !g.allowed_strategies.is_empty() && !g.allowed_strategies.contains(&self.strategy) {
            out.push(PolicyViolation::StrategyNotAllowed {
                path: "strategy".to_owned(),
                strategy: self.strategy,
            });
        }

        check_range(
            &mut out,
            "routing.priority",
            self.routing.priority,
            Bounds::new(0, 100),
        );
        if self.routing.skills.len() > MAX_SKILLS {
            out.push(PolicyViolation::TooMany {
                path: "routing.skills".to_owned(),
                len: self.routing.skills.len(),
                max: MAX_SKILLS,
            });
        }
        if out.is_empty() { Ok(()) } else { Err(out) }
    }
}

/// Checks what no single scenario can: identifiers unique across the catalogue, and every intent
/// claimed by several scenarios resolved by distinct `intent_priority` values. Each scenario's own
/// rules are checked by [`Scenario::validate`].
pub fn validate_catalogue(scenarios: &[Scenario]) -> Result<(), Vec<PolicyViolation>> {
    let mut out = Vec::new();
    let mut ids = BTreeSet::new();
    let mut reported_ids = BTreeSet::new();
    for scenario in scenarios {
        if !ids.insert(scenario.id.as_str()) && reported_ids.insert(scenario.id.as_str()) {
            out.push(PolicyViolation::DuplicateScenario {
                id: scenario.id.clone(),
            });
        }
    }
    // intent -> (priority -> first scenario claiming it); BTreeMap keeps reports deterministic.
    let mut claims: BTreeMap<&str, BTreeMap<u32, &str>> = BTreeMap::new();
    for scenario in scenarios {
        let mut own = BTreeSet::new();
        for intent in &scenario.intents {
            if !own.insert(intent.as_str()) {
                continue;
            }
            let by_priority = claims.entry(intent.as_str()).or_default();
            match by_priority.get(&scenario.intent_priority) {
                Some(first) if *first != scenario.id => out.push(PolicyViolation::IntentConflict {
                    intent: intent.clone(),
                    first: (*first).to_owned(),
                    second: scenario.id.clone(),
                }),
                Some(_) => {}
                None => {
                    by_priority.insert(scenario.intent_priority, scenario.id.as_str());
                }
            }
        }
    }
    if out.is_empty() { Ok(()) } else { Err(out) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::default_scenario;

    fn scenario(id: &str, intents: &[&str], priority: u32) -> Scenario {
        Scenario {
            id: id.to_owned(),
            intents: intents.iter().map(|i| (*i).to_owned()).collect(),
            intent_priority: priority,
            ..default_scenario()
        }
    }

    fn paths(violations: &[PolicyViolation]) -> Vec<String> {
        violations
            .iter()
            .map(|v| match v {
                PolicyViolation::OutOfRange { path, .. }
                | PolicyViolation::OutsideGuardrails { path, .. }
                | PolicyViolation::InvertedBounds { path, .. }
                | PolicyViolation::ClarifyAboveMinimum { path, .. }
                | PolicyViolation::StrategyNotAllowed { path, .. }
                | PolicyViolation::Empty { path }
                | PolicyViolation::Malformed { path, .. }
                | PolicyViolation::TooMany { path, .. }
                | PolicyViolation::DuplicateIntent { path, .. } => path.clone(),
                PolicyViolation::DuplicateScenario { id } => format!("id {id}"),
                PolicyViolation::IntentConflict { intent, .. } => format!("intent {intent}"),
            })
            .collect()
    }

    #[test]
    fn default_scenario_is_valid() {
        assert_eq!(default_scenario().validate(), Ok(()));
    }

    #[test]
    fn validate_reports_every_problem_at_once() {
        let mut s = scenario("", &["refund", "refund", ""], 0);
        s.strategy = Strategy::HumanFirst;
        s.thresholds.min_intent_confidence = 1.5;
        s.thresholds.negative_sentiment = -0.95;
        s.guardrails.max_fallbacks = Bounds::new(4, 2);
        s.routing.priority = 101;
        let violations = s.validate().expect_err("the scenario has many problems");
        let paths = paths(&violations);
        for expected in [
            "id",
            "intents[1]",
            "intents[2]",
            "thresholds.min_intent_confidence",
            "thresholds.negative_sentiment",
            "guardrails.max_fallbacks",
            "strategy",
            "routing.priority",
        ] {
            assert!(
                paths.iter().any(|p| p == expected),
                "{expected} missing from {paths:?}"
            );
        }
        assert!(violations.contains(&PolicyViolation::OutOfRange {
            path: "thresholds.min_intent_confidence".to_owned(),
            value: "1.5".to_owned(),
            min: "0".to_owned(),
            max: "1".to_owned(),
        }));
        assert!(violations.contains(&PolicyViolation::OutsideGuardrails {
            path: "thresholds.negative_sentiment".to_owned(),
            value: "-0.95".to_owned(),
            min: "-0.9".to_owned(),
            max: "-0.3".to_owned(),
        }));
        for v in &violations {
            let text = v.to_string();
            assert!(
                text.starts_with(|c: char| !c.is_ascii_uppercase()),
                "{text}"
            );
            assert!(!text.ends_with('.'), "{text}");
        }
    }

    #[test]
    fn validate_rejects_clarify_above_minimum_and_nan() {
        let mut s = default_scenario();
        s.thresholds.clarify_confidence = 0.65;
        s.thresholds.max_complexity = f64::NAN;
        let paths = paths(&s.validate().expect_err("two problems"));
        assert!(paths.contains(&"thresholds.clarify_confidence".to_owned()));
        assert!(paths.contains(&"thresholds.max_complexity".to_owned()));
    }

    #[test]
    fn validate_rejects_malformed_id() {
        let s = scenario("Refund Flow", &["refund"], 0);
        assert_eq!(paths(&s.validate().expect_err("bad id")), ["id"]);
    }

    #[test]
    fn catalogue_rejects_a_shared_intent_with_equal_priority_naming_both() {
        let catalogue = [
            scenario("refund", &["refund_status", "cancel"], 10),
            scenario("rebooking", &["cancel"], 10),
        ];
        assert_eq!(
            validate_catalogue(&catalogue),
            Err(vec![PolicyViolation::IntentConflict {
                intent: "cancel".to_owned(),
                first: "refund".to_owned(),
                second: "rebooking".to_owned(),
            }])
        );
    }

    #[test]
    fn catalogue_accepts_a_shared_intent_with_distinct_priorities() {
        let catalogue = [
            scenario("refund", &["cancel"], 10),
            scenario("rebooking", &["cancel"], 20),
        ];
        assert_eq!(validate_catalogue(&catalogue), Ok(()));
    }

    #[test]
    fn catalogue_rejects_duplicate_scenario_ids_once() {
        let catalogue = [
            scenario("refund", &["a"], 1),
            scenario("refund", &["b"], 2),
            scenario("refund", &[], 3),
        ];
        assert_eq!(
            validate_catalogue(&catalogue),
            Err(vec![PolicyViolation::DuplicateScenario {
                id: "refund".to_owned()
            }])
        );
    }
}
