//! Alert rules and their evaluation.
//!
//! One problem raises one alert: while an alert of a rule and scenario is open (firing or
//! acknowledged) no other is raised; it resolves only once the value is back on the good side
//! of the threshold by a margin (hysteresis), and a resolved alert is not raised again before
//! a cool-down has passed, so a value that hovers around its threshold does not flap. An open
//! alert also resolves when its window has no data at all, and (see the evaluation loop) when
//! its rule is disabled, deleted or re-scoped away from its scenario.

use super::rollup::metric;
use super::{DAY, FieldError, HOUR, Micros, chars, truncate_chars};

/// `AlertCondition` values.
pub mod condition {
    /// value > threshold.
    pub const ABOVE: i32 = 1;
    /// value < threshold.
    pub const BELOW: i32 = 2;
    /// value > baseline × (1 + threshold).
    pub const RISE_VS_BASELINE: i32 = 3;
    /// value < baseline × (1 − threshold).
    pub const DROP_VS_BASELINE: i32 = 4;
}

/// `AlertKind` values.
pub mod kind {
    /// Bot CSAT below target.
    pub const BOT_CSAT_BELOW_TARGET: i32 = 1;
    /// Handoff rate spike.
    pub const HANDOFF_RATE_SPIKE: i32 = 2;
    /// Handoff latency over objective.
    pub const HANDOFF_LATENCY_OVER_OBJECTIVE: i32 = 3;
    /// Queue wait over target.
    pub const QUEUE_WAIT_OVER_TARGET: i32 = 4;
    /// Any other.
    pub const OTHER: i32 = 5;
}

/// `AlertStatus` values.
pub mod status {
    /// Firing.
    pub const FIRING: i32 = 1;
    /// Acknowledged.
    pub const ACKNOWLEDGED: i32 = 2;
    /// Resolved.
    pub const RESOLVED: i32 = 3;
}

/// Metrics alert rules can watch: those measurable over a short window from the facts.
pub const ALERTABLE: [i32; 7] = [
    metric::CONTAINMENT_RATE,
    metric::HANDOFF_RATE,
    metric::HANDOFF_SYSTEM_LATENCY,
    metric::QUEUE_WAIT,
    metric::AGENT_ACCEPT_TIME,
    metric::FIRST_HUMAN_REPLY,
    metric::CSAT,
];

/// The share of the threshold (or of the baseline margin) a value must recover by before an
/// alert resolves.
pub const HYSTERESIS: f64 = 0.05;

/// The value an alert resolves with when nothing was measured: its window had no data, or its
/// rule was disabled, deleted or re-scoped. Not a number, so consumers that take the value as a
/// fresh reading (the policy service ignores non-finite values) do not mistake it for one.
pub const NO_MEASUREMENT: f64 = f64::NAN;

/// An alert rule.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertRule {
    /// Identifier.
    pub id: String,
    /// Name.
    pub name: String,
    /// `AlertKind` value.
    pub kind: i32,
    /// Scenario; empty evaluates each scenario separately.
    pub scenario_id: String,
    /// `MetricName` value.
    pub metric: i32,
    /// `AlertCondition` value.
    pub condition: i32,
    /// Threshold (metric units; a fraction for baseline conditions; seconds of p95 for
    /// durations).
    pub threshold: f64,
    /// Window.
    pub window: Micros,
    /// Baseline window.
    pub baseline_window: Micros,
    /// Observations needed before the rule may fire. For CSAT rules, the number of latest
    /// responses the value is computed over.
    pub min_samples: i64,
    /// `Severity` value.
    pub severity: i32,
    /// Evaluated or not.
    pub enabled: bool,
    /// Creation time.
    pub created_at: Micros,
    /// Last change.
    pub updated_at: Micros,
}

impl AlertRule {
    /// Returns whether the rule compares against a baseline.
    pub fn uses_baseline(&self) -> bool {
        matches!(
            self.condition,
            condition::RISE_VS_BASELINE | condition::DROP_VS_BASELINE
        )
    }

    /// Checks every field, listing all problems.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        let name = chars(self.name.trim());
        if name == 0 || name > 100 {
            errors.push(FieldError::new("rule.name", "give 1 to 100 characters"));
        }
        if !(1..=5).contains(&self.kind) {
            errors.push(FieldError::new(
                "rule.kind",
                format!("unknown kind {}", self.kind),
            ));
        }
        if chars(&self.scenario_id) > 128 {
            errors.push(FieldError::new(
                "rule.scenario_id",
                "is longer than 128 characters",
            ));
        }
        if !ALERTABLE.contains(&self.metric) {
            errors.push(FieldError::new(
                "rule.metric",
                "alert rules watch containment, handoff rate, the four handoff clocks or CSAT",
            ));
        }
        if !(1..=4).contains(&self.condition) {
            errors.push(FieldError::new(
                "rule.condition",
                format!("unknown condition {}", self.condition),
            ));
        }
        if !self.threshold.is_finite() {
            errors.push(FieldError::new("rule.threshold", "must be a finite number"));
        } else if self.uses_baseline() && !(self.threshold > 0.0 && self.threshold < 100.0) {
            errors.push(FieldError::new(
                "rule.threshold",
                "a baseline condition takes a fraction above 0",
            ));
        } else if self.threshold < 0.0 {
            errors.push(FieldError::new("rule.threshold", "must not be negative"));
        }
        if self.window < 5 * 60 * 1_000_000 || self.window > 7 * DAY {
            errors.push(FieldError::new(
                "rule.window",
                "must be between 5 minutes and 7 days",
            ));
        }
        if self.uses_baseline() {
            if self.baseline_window < self.window || self.baseline_window > 30 * DAY {
                errors.push(FieldError::new(
                    "rule.baseline_window",
                    "must be at least the window and at most 30 days",
                ));
            }
        } else if self.baseline_window != 0 {
            errors.push(FieldError::new(
                "rule.baseline_window",
                "is only for baseline conditions",
            ));
        }
        if !(0..=100_000).contains(&self.min_samples) {
            errors.push(FieldError::new("rule.min_samples", "must be 0..100000"));
        }
        if !(1..=3).contains(&self.severity) {
            errors.push(FieldError::new(
                "rule.severity",
                format!("unknown severity {}", self.severity),
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// The metric over the rule's window (and baseline window).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observation {
    /// Value: a rate, or p95 seconds for durations.
    pub value: f64,
    /// Observations behind it.
    pub samples: i64,
    /// The baseline value and its observations, for baseline conditions.
    pub baseline: Option<(f64, i64)>,
}

/// What to do after evaluating a rule for one scenario.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Nothing changes.
    Keep,
    /// Raise an alert.
    Raise {
        /// Observed value.
        observed: f64,
        /// Baseline, 0 when none.
        baseline: f64,
        /// Why, in English.
        explanation: String,
    },
    /// Resolve the open alert.
    Resolve {
        /// Value when it cleared; [`NO_MEASUREMENT`] when the window had no data.
        observed: f64,
    },
}

/// Where a scenario stands for a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Standing {
    /// An alert is open (firing or acknowledged).
    pub open: bool,
    /// When the last alert resolved.
    pub last_resolved_at: Option<Micros>,
}

/// Decides whether a rule fires, keeps firing or clears.
pub fn evaluate(
    rule: &AlertRule,
    scenario: &str,
    observation: Option<Observation>,
    standing: Standing,
    now: Micros,
    cooldown: Micros,
) -> Decision {
    let Some(obs) = observation else {
        // No data at all in the window (a scenario gone quiet): nothing is left to breach, so
        // an open alert resolves, with no measurement to report.
        return if standing.open {
            Decision::Resolve {
                observed: NO_MEASUREMENT,
            }
        } else {
            Decision::Keep
        };
    };
    if obs.samples < rule.min_samples.max(1) {
        // Too little data says nothing: neither raise nor resolve on it.
        return Decision::Keep;
    }
    let reference = match (rule.uses_baseline(), obs.baseline) {
        (false, _) => rule.threshold,
        (true, Some((baseline, samples))) if samples > 0 && baseline > 0.0 => baseline,
        (true, _) => return Decision::Keep,
    };
    let t = rule.threshold;
    let (breached, cleared) = match rule.condition {
        condition::ABOVE => (obs.value > t, obs.value <= t * (1.0 - HYSTERESIS)),
        condition::BELOW => (obs.value < t, obs.value >= t * (1.0 + HYSTERESIS)),
        condition::RISE_VS_BASELINE => (
            obs.value > reference * (1.0 + t),
            obs.value <= reference * (1.0 + t * (1.0 - HYSTERESIS * 10.0)),
        ),
        condition::DROP_VS_BASELINE => (
            obs.value < reference * (1.0 - t),
            obs.value >= reference * (1.0 - t * (1.0 - HYSTERESIS * 10.0)),
        ),
        _ => return Decision::Keep,
    };
    if standing.open {
        return if cleared {
            Decision::Resolve {
                observed: obs.value,
            }
        } else {
            Decision::Keep
        };
    }
    if !breached {
        return Decision::Keep;
    }
    if standing
        .last_resolved_at
        .is_some_and(|at| now - at < cooldown)
    {
        return Decision::Keep;
    }
    let baseline = if rule.uses_baseline() { reference } else { 0.0 };
    Decision::Raise {
        observed: obs.value,
        baseline,
        explanation: explain(rule, scenario, &obs, baseline),
    }
}

fn metric_label(metric_name: i32) -> &'static str {
    match metric_name {
        metric::CONTAINMENT_RATE => "containment rate",
        metric::HANDOFF_RATE => "handoff rate",
        metric::HANDOFF_SYSTEM_LATENCY => "p95 handoff system latency (s)",
        metric::QUEUE_WAIT => "p95 queue wait (s)",
        metric::AGENT_ACCEPT_TIME => "p95 agent accept time (s)",
        metric::FIRST_HUMAN_REPLY => "p95 first human reply (s)",
        metric::CSAT => "CSAT",
        _ => "metric",
    }
}

fn explain(rule: &AlertRule, scenario: &str, obs: &Observation, baseline: f64) -> String {
    let scenario = if scenario.is_empty() {
        "all scenarios".to_owned()
    } else {
        format!("scenario {scenario}")
    };
    let window = if rule.metric == metric::CSAT {
        format!("the last {} responses", obs.samples)
    } else {
        format!("the last {}", human_window(rule.window))
    };
    let comparison = match rule.condition {
        condition::ABOVE => format!("above the threshold {:.3}", rule.threshold),
        condition::BELOW => format!("below the target {:.3}", rule.threshold),
        condition::RISE_VS_BASELINE => format!(
            "more than {:.0} % above its baseline {baseline:.3} over the last {}",
            rule.threshold * 100.0,
            human_window(rule.baseline_window)
        ),
        _ => format!(
            "more than {:.0} % below its baseline {baseline:.3} over the last {}",
            rule.threshold * 100.0,
            human_window(rule.baseline_window)
        ),
    };
    truncate_chars(
        &format!(
            "{} of {scenario} was {:.3} over {window} ({} observations), {comparison} (rule {:?})",
            metric_label(rule.metric),
            obs.value,
            obs.samples,
            rule.name
        ),
        500,
    )
}

fn human_window(window: Micros) -> String {
    if window % DAY == 0 {
        format!("{} d", window / DAY)
    } else if window % HOUR == 0 {
        format!("{} h", window / HOUR)
    } else {
        format!("{} min", window / 60_000_000)
    }
}

/// Returns the `q` quantile of raw values (nearest rank), for window evaluation.
pub fn raw_quantile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> AlertRule {
        AlertRule {
            id: "r".into(),
            name: "bot csat".into(),
            kind: kind::BOT_CSAT_BELOW_TARGET,
            scenario_id: "rebooking".into(),
            metric: metric::CSAT,
            condition: condition::BELOW,
            threshold: 0.8,
            window: DAY,
            baseline_window: 0,
            min_samples: 20,
            severity: 2,
            enabled: true,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn obs(value: f64, samples: i64) -> Option<Observation> {
        Some(Observation {
            value,
            samples,
            baseline: None,
        })
    }

    const CLOSED: Standing = Standing {
        open: false,
        last_resolved_at: None,
    };
    const OPEN: Standing = Standing {
        open: true,
        last_resolved_at: None,
    };

    #[test]
    fn fires_once_then_needs_a_margin_to_clear() {
        let r = rule();
        let cooldown = HOUR;
        assert!(matches!(
            evaluate(&r, "rebooking", obs(0.5, 30), CLOSED, 0, cooldown),
            Decision::Raise { .. }
        ));
        assert_eq!(
            evaluate(&r, "rebooking", obs(0.5, 30), OPEN, 0, cooldown),
            Decision::Keep,
            "an open alert is not raised again"
        );
        assert_eq!(
            evaluate(&r, "rebooking", obs(0.81, 30), OPEN, 0, cooldown),
            Decision::Keep,
            "just above the target is not enough to clear"
        );
        assert!(matches!(
            evaluate(&r, "rebooking", obs(0.9, 30), OPEN, 0, cooldown),
            Decision::Resolve { .. }
        ));
        let resolved = Standing {
            open: false,
            last_resolved_at: Some(100),
        };
        assert_eq!(
            evaluate(
                &r,
                "rebooking",
                obs(0.5, 30),
                resolved,
                100 + HOUR / 2,
                cooldown
            ),
            Decision::Keep,
            "cool-down"
        );
        assert!(matches!(
            evaluate(
                &r,
                "rebooking",
                obs(0.5, 30),
                resolved,
                100 + 2 * HOUR,
                cooldown
            ),
            Decision::Raise { .. }
        ));
        assert_eq!(
            evaluate(&r, "rebooking", obs(0.1, 5), CLOSED, 0, cooldown),
            Decision::Keep,
            "too few responses"
        );
        assert_eq!(
            evaluate(&r, "rebooking", obs(0.1, 5), OPEN, 0, cooldown),
            Decision::Keep,
            "too few responses neither raise nor resolve"
        );
    }

    #[test]
    fn an_open_alert_resolves_when_its_window_has_no_data() {
        let r = rule();
        let Decision::Resolve { observed } = evaluate(&r, "rebooking", None, OPEN, 0, HOUR) else {
            panic!("an open alert of a quiet scenario resolves");
        };
        assert!(observed.is_nan(), "nothing was measured: {observed}");
        assert_eq!(
            evaluate(&r, "rebooking", None, CLOSED, 0, HOUR),
            Decision::Keep
        );
    }

    #[test]
    fn baseline_spikes_compare_against_the_baseline() {
        let r = AlertRule {
            kind: kind::HANDOFF_RATE_SPIKE,
            metric: metric::HANDOFF_RATE,
            condition: condition::RISE_VS_BASELINE,
            threshold: 0.5,
            window: HOUR,
            baseline_window: 7 * DAY,
            min_samples: 10,
            ..rule()
        };
        let with = |value, baseline| {
            Some(Observation {
                value,
                samples: 50,
                baseline: Some((baseline, 1000)),
            })
        };
        let raised = evaluate(&r, "s", with(0.4, 0.2), CLOSED, 0, HOUR);
        let Decision::Raise {
            explanation,
            baseline,
            ..
        } = raised
        else {
            panic!("{raised:?}");
        };
        assert_eq!(baseline, 0.2);
        assert!(
            explanation.contains("handoff rate of scenario s"),
            "{explanation}"
        );
        assert_eq!(
            evaluate(&r, "s", with(0.29, 0.2), CLOSED, 0, HOUR),
            Decision::Keep
        );
    }

    #[test]
    fn validation_lists_every_problem() {
        let bad = AlertRule {
            name: String::new(),
            metric: metric::NPS,
            window: 1,
            severity: 9,
            ..rule()
        };
        let fields: Vec<String> = bad
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            ["rule.name", "rule.metric", "rule.window", "rule.severity"]
        );
    }
}
