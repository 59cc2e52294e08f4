//! Automatic adjustment: when a rule fires, what it changes, and when it steps back.
//!
//! Pure functions over a rule, its per-scenario state and the signal's aggregate over the rule's
//! window; the application layer reads and writes them in one transaction.
//!
//! Hysteresis, so nothing flaps and nothing repeats:
//! - a rule **fires** when it enters its condition: the window holds at least `min_samples`
//!   observations, their value breaches the threshold, and the rule is not already in an episode
//!   (a firing that has not recovered yet). While the breach persists the rule holds, however many
//!   reports arrive; it acts again only after it has recovered. A new episode starts at the
//!   earliest `cooldown` after the previous firing;
//! - it **recovers** from a reading only when the value is back past the threshold by a margin (a
//!   fraction of the threshold, default 10 %) and stays there for a full window; values inside the
//!   band neither fire nor count towards recovery;
//! - a rule fed by analytics alerts also **recovers when the alert resolves** ([`resolve`]): the
//!   resolution is the last report that signal sends, so waiting for a further reading would keep
//!   the change until the next alert;
//! - a rule with a `silence_timeout` also **recovers when its signal goes silent** ([`silence`]):
//!   no report of the signal for the scenario for that long ends the episode;
//! - on recovery, a rule with `revert_when_recovered` restores the value (or strategy) the
//!   scenario had before the firing of the episode.

use tandem_policy_client::strategy_from_wire;
use tandem_policy_engine as engine;
use tandem_proto::pb::policy::v1 as pb;

use crate::store::{Aggregate, RuleState};

/// What to do after evaluating one rule for one scenario.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing to apply; persist the state if it changed.
    Hold(RuleState),
    /// Apply the rule's effect.
    Fire(RuleState),
    /// Restore the baseline (the second field) if the scenario still holds the value the rule
    /// last wrote (the third, when known).
    Revert(RuleState, String, Option<String>),
}

/// Evaluates a rule. `now` and the state's times are µs since the epoch.
pub fn evaluate(
    rule: &pb::AdjustmentRule,
    state: Option<RuleState>,
    scenario_id: &str,
    agg: Aggregate,
    now: i64,
    margin: f64,
) -> Step {
    let mut state = state.unwrap_or_else(|| RuleState {
        rule_id: rule.id.clone(),
        scenario_id: scenario_id.to_owned(),
        firing: false,
        last_fired_at: None,
        recovered_since: None,
        baseline: None,
        applied: None,
        silence_blocked_at: None,
    });
    // The signal reports: a revert blocked while it was silent is no longer due for silence.
    state.silence_blocked_at = None;
    let above = rule.comparison == pb::Comparison::Above as i32;
    let enough = agg.samples >= rule.min_samples.max(1);
    let breach = enough
        && if above {
            agg.mean > rule.threshold
        } else {
            agg.mean < rule.threshold
        };
    let band = rule.threshold.abs() * margin;
    let recovered = if above {
        agg.mean < rule.threshold - band
    } else {
        agg.mean > rule.threshold + band
    };
    if breach {
        state.recovered_since = None;
        if state.firing {
            // Already in an episode: the change it made stays, and nothing is applied again.
            return Step::Hold(state);
        }
        let cooled = state
            .last_fired_at
            .is_none_or(|last| now.saturating_sub(last) >= micros(rule.cooldown.as_ref()));
        if cooled {
            state.firing = true;
            state.last_fired_at = Some(now);
            return Step::Fire(state);
        }
        return Step::Hold(state);
    }
    if !state.firing {
        return Step::Hold(state);
    }
    if !recovered {
        state.recovered_since = None;
        return Step::Hold(state);
    }
    let since = *state.recovered_since.get_or_insert(now);
    if now.saturating_sub(since) < micros(rule.window.as_ref()) {
        return Step::Hold(state);
    }
    end_episode(rule, state)
}

/// Ends a rule's episode: a revert to the baseline when the rule reverts and has one.
fn end_episode(rule: &pb::AdjustmentRule, mut state: RuleState) -> Step {
    state.firing = false;
    state.recovered_since = None;
    state.silence_blocked_at = None;
    let applied = state.applied.take();
    match state.baseline.take() {
        Some(baseline) if rule.revert_when_recovered => Step::Revert(state, baseline, applied),
        _ => Step::Hold(state),
    }
}

/// Evaluates a rule when the analytics alert reporting its signal for the scenario resolves,
/// with the value the alert cleared at (`None` when the alert carries no measurement: its window
/// had no data, or its alert rule was disabled, deleted or re-scoped).
///
/// A rule in an episode recovers at once, without the hysteresis band and without waiting for a
/// full window (the alert applied its own hysteresis before resolving, and no further reading
/// follows a resolution), unless the value still breaches the rule's own threshold: then an alert
/// stricter than the rule has cleared while the rule's condition holds, and the episode goes on.
/// A rule not in an episode is left as it is.
pub fn resolve(
    rule: &pb::AdjustmentRule,
    state: Option<RuleState>,
    value: Option<f64>,
) -> Option<Step> {
    let state = state.filter(|s| s.firing)?;
    let above = rule.comparison == pb::Comparison::Above as i32;
    let still_breached = value.is_some_and(|v| {
        if above {
            v > rule.threshold
        } else {
            v < rule.threshold
        }
    });
    if still_breached {
        return None;
    }
    Some(end_episode(rule, state))
}

/// Evaluates a rule whose signal may have gone silent, at `now` (µs): `last_report` is the time of
/// the newest report of the signal for the scenario still on record, if any.
///
/// A rule in an episode with a `silence_timeout` ends its episode as on recovery (a revert for a
/// rule that reverts) once neither that report nor the firing is more recent than the timeout.
/// Returns the step and how long the signal has been silent (µs); `None` leaves the rule as it is
/// (not in an episode, no timeout, or reported recently enough).
pub fn silence(
    rule: &pb::AdjustmentRule,
    state: Option<RuleState>,
    last_report: Option<i64>,
    now: i64,
) -> Option<(Step, i64)> {
    let timeout = micros(rule.silence_timeout.as_ref());
    let state = state.filter(|s| s.firing && timeout > 0)?;
    let heard = last_report.max(state.last_fired_at)?;
    let silent_for = now.saturating_sub(heard);
    if silent_for < timeout {
        return None;
    }
    Some((end_episode(rule, state), silent_for))
}

/// The value a rule compares for a signal. Queue ETA is an instantaneous reading, so its mean over
/// the window smooths it; the other signals arrive as analytics alerts that already aggregate
/// over their own window, so the newest report is the current value. `samples` counts reports in
/// the window either way.
pub fn value_of(signal: i32, agg: Aggregate) -> Aggregate {
    if signal == pb::AdjustmentSignal::QueueEta as i32 {
        return agg;
    }
    Aggregate {
        mean: agg.latest.map_or(agg.mean, |(v, _)| v),
        ..agg
    }
}

/// Converts an optional protobuf duration to µs (unset is zero).
pub fn micros(d: Option<&prost_types::Duration>) -> i64 {
    d.map_or(0, |d| {
        d.seconds
            .saturating_mul(1_000_000)
            .saturating_add(i64::from(d.nanos / 1_000))
    })
}

/// A proposed change to a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The scenario after the change (version not yet bumped); `None` when nothing changes.
    pub next: Option<pb::Scenario>,
    /// The adjustment record (status, values, explanation), without ids and versions.
    pub record: pb::Adjustment,
    /// The baseline to remember for a later revert.
    pub baseline: Option<String>,
    /// The value written, in the format of `baseline`, when the change applies.
    pub applied: Option<String>,
    /// True when the scenario already holds the target: nothing would change, so nothing is
    /// applied, recorded or published.
    pub unchanged: bool,
}

/// Reads a threshold's effective value.
pub fn read_field(t: &engine::Thresholds, field: pb::ThresholdField) -> Option<f64> {
    use pb::ThresholdField as F;
    Some(match field {
        F::MinIntentConfidence => t.min_intent_confidence,
        F::ClarifyConfidence => t.clarify_confidence,
        F::NegativeSentiment => t.negative_sentiment,
        F::SentimentDrop => t.sentiment_drop,
        F::SentimentWindowTurns => f64::from(t.sentiment_window_turns),
        F::MaxFallbacks => f64::from(t.max_fallbacks),
        F::MaxBotTurns => f64::from(t.max_bot_turns),
        F::MaxComplexity => t.max_complexity,
        F::MaxQueueWait => t.max_queue_wait.as_secs_f64(),
        F::Unspecified => return None,
    })
}

/// Returns the guardrail bounds of a threshold as floats.
fn bounds(g: &engine::Guardrails, field: pb::ThresholdField) -> Option<(f64, f64)> {
    use pb::ThresholdField as F;
    Some(match field {
        F::MinIntentConfidence => (g.min_intent_confidence.min, g.min_intent_confidence.max),
        F::ClarifyConfidence => (g.clarify_confidence.min, g.clarify_confidence.max),
        F::NegativeSentiment => (g.negative_sentiment.min, g.negative_sentiment.max),
        F::SentimentDrop => (g.sentiment_drop.min, g.sentiment_drop.max),
        F::SentimentWindowTurns => (
            f64::from(g.sentiment_window_turns.min),
            f64::from(g.sentiment_window_turns.max),
        ),
        F::MaxFallbacks => (
            f64::from(g.max_fallbacks.min),
            f64::from(g.max_fallbacks.max),
        ),
        F::MaxBotTurns => (
            f64::from(g.max_bot_turns.min),
            f64::from(g.max_bot_turns.max),
        ),
        F::MaxComplexity => (g.max_complexity.min, g.max_complexity.max),
        F::MaxQueueWait => (
            g.max_queue_wait.min.as_secs_f64(),
            g.max_queue_wait.max.as_secs_f64(),
        ),
        F::Unspecified => return None,
    })
}

fn is_integral(field: pb::ThresholdField) -> bool {
    matches!(
        field,
        pb::ThresholdField::SentimentWindowTurns
            | pb::ThresholdField::MaxFallbacks
            | pb::ThresholdField::MaxBotTurns
            | pb::ThresholdField::MaxQueueWait
    )
}

/// Writes a threshold into a wire scenario.
fn write_field(s: &mut pb::Scenario, field: pb::ThresholdField, value: f64) {
    use pb::ThresholdField as F;
    let t = s.thresholds.get_or_insert_with(pb::Thresholds::default);
    // Integral fields were rounded and clamped into u32 guardrails before this call.
    #[allow(clippy::cast_possible_truncation)]
    let whole = value.round() as i32;
    match field {
        F::MinIntentConfidence => t.min_intent_confidence = Some(value),
        F::ClarifyConfidence => t.clarify_confidence = Some(value),
        F::NegativeSentiment => t.negative_sentiment = Some(value),
        F::SentimentDrop => t.sentiment_drop = Some(value),
        F::SentimentWindowTurns => t.sentiment_window_turns = Some(whole),
        F::MaxFallbacks => t.max_fallbacks = Some(whole),
        F::MaxBotTurns => t.max_bot_turns = Some(whole),
        F::MaxComplexity => t.max_complexity = Some(value),
        F::MaxQueueWait => {
            t.max_queue_wait = Some(prost_types::Duration {
                seconds: i64::from(whole.max(0)),
                nanos: 0,
            });
        }
        F::Unspecified => {}
    }
}

fn field_name(field: pb::ThresholdField) -> &'static str {
    use pb::ThresholdField as F;
    match field {
        F::MinIntentConfidence => "min_intent_confidence",
        F::ClarifyConfidence => "clarify_confidence",
        F::NegativeSentiment => "negative_sentiment",
        F::SentimentDrop => "sentiment_drop",
        F::SentimentWindowTurns => "sentiment_window_turns",
        F::MaxFallbacks => "max_fallbacks",
        F::MaxBotTurns => "max_bot_turns",
        F::MaxComplexity => "max_complexity",
        F::MaxQueueWait => "max_queue_wait",
        F::Unspecified => "unspecified",
    }
}

/// The outcome of moving a threshold.
enum Move {
    /// The scenario with the threshold moved.
    To(Box<pb::Scenario>),
    /// The guardrails keep the threshold where it is.
    Blocked,
    /// The threshold already holds the target (after rounding, for whole-number fields).
    Unchanged,
}

/// Moves a threshold to `target`, clamped to its guardrails.
fn move_field(
    wire: &pb::Scenario,
    compiled: &engine::Scenario,
    field: pb::ThresholdField,
    target: f64,
    record: &mut pb::Adjustment,
    applied: pb::AdjustmentStatus,
) -> Move {
    let (Some(current), Some((lo, hi))) = (
        read_field(&compiled.thresholds, field),
        bounds(&compiled.guardrails, field),
    ) else {
        record.status = pb::AdjustmentStatus::BlockedByGuardrail as i32;
        return Move::Blocked;
    };
    let mut next = target.clamp(lo, hi);
    if is_integral(field) {
        next = next.round().clamp(lo, hi);
    }
    record.field = field as i32;
    record.old_value = current;
    record.new_value = next;
    if (next - current).abs() < 1e-12 {
        if (lo..=hi).contains(&target) {
            return Move::Unchanged;
        }
        record.status = pb::AdjustmentStatus::BlockedByGuardrail as i32;
        record.explanation = format!(
            "{} stays at {current}: its guardrails {lo}..={hi} allow no further move",
            field_name(field)
        );
        return Move::Blocked;
    }
    let clamped = (next - target).abs() > 1e-12;
    record.status = if clamped && applied == pb::AdjustmentStatus::Applied {
        pb::AdjustmentStatus::Clamped
    } else {
        applied
    } as i32;
    record.explanation = format!(
        "{} {current} -> {next}{}",
        field_name(field),
        if clamped {
            format!(" (clamped to {lo}..={hi})")
        } else {
            String::new()
        }
    );
    let mut s = wire.clone();
    write_field(&mut s, field, next);
    Move::To(Box::new(s))
}

/// Computes what firing `rule` does to a scenario.
pub fn fire(rule: &pb::AdjustmentRule, wire: &pb::Scenario, compiled: &engine::Scenario) -> Change {
    let mut record = pb::Adjustment {
        scenario_id: wire.id.clone(),
        rule_id: rule.id.clone(),
        ..pb::Adjustment::default()
    };
    let mut unchanged = false;
    let (next, baseline) = match &rule.effect {
        Some(pb::adjustment_rule::Effect::Step(step)) => {
            let field =
                pb::ThresholdField::try_from(step.field).unwrap_or(pb::ThresholdField::Unspecified);
            record.status = pb::AdjustmentStatus::BlockedByGuardrail as i32;
            record.explanation = "the rule names no known threshold".into();
            let current = read_field(&compiled.thresholds, field);
            let next = current.and_then(|c| {
                match move_field(
                    wire,
                    compiled,
                    field,
                    c + step.delta,
                    &mut record,
                    pb::AdjustmentStatus::Applied,
                ) {
                    Move::To(s) => Some(*s),
                    Move::Blocked => None,
                    Move::Unchanged => {
                        unchanged = true;
                        None
                    }
                }
            });
            (next, current.map(|c| c.to_string()))
        }
        Some(pb::adjustment_rule::Effect::SetStrategy(target)) => {
            record.old_strategy = wire.strategy;
            record.new_strategy = *target;
            let allowed = strategy_from_wire(*target)
                .is_some_and(|s| compiled.guardrails.allowed_strategies.contains(&s));
            if wire.strategy == *target {
                unchanged = true;
                (None, None)
            } else if !allowed {
                record.status = pb::AdjustmentStatus::BlockedByGuardrail as i32;
                record.explanation = "the guardrails do not allow this strategy".into();
                (None, None)
            } else {
                record.status = pb::AdjustmentStatus::Applied as i32;
                record.explanation = format!("strategy {} -> {}", wire.strategy, target);
                let mut s = wire.clone();
                s.strategy = *target;
                (Some(s), Some(format!("strategy:{}", wire.strategy)))
            }
        }
        None => {
            record.status = pb::AdjustmentStatus::BlockedByGuardrail as i32;
            record.explanation = "the rule has no effect".into();
            (None, None)
        }
    };
    let baseline = next.as_ref().and(baseline);
    let applied = next.as_ref().map(|_| match &rule.effect {
        Some(pb::adjustment_rule::Effect::SetStrategy(target)) => format!("strategy:{target}"),
        _ => record.new_value.to_string(),
    });
    Change {
        next,
        record,
        baseline,
        applied,
        unchanged,
    }
}

/// Returns whether a scenario still holds `applied`, the value a rule wrote (as stored in its
/// state), so a revert would not overwrite a change made since.
pub fn still_applied(
    rule: &pb::AdjustmentRule,
    applied: &str,
    wire: &pb::Scenario,
    compiled: &engine::Scenario,
) -> bool {
    if let Some(strategy) = applied.strip_prefix("strategy:") {
        return strategy.parse::<i32>() == Ok(wire.strategy);
    }
    let (Ok(value), Some(pb::adjustment_rule::Effect::Step(step))) =
        (applied.parse::<f64>(), &rule.effect)
    else {
        return false;
    };
    let field = pb::ThresholdField::try_from(step.field).unwrap_or(pb::ThresholdField::Unspecified);
    read_field(&compiled.thresholds, field).is_some_and(|current| (current - value).abs() < 1e-9)
}

/// Computes the revert of an episode to `baseline`; `why` opens the explanation (e.g. "signal
/// recovered").
pub fn revert(
    rule: &pb::AdjustmentRule,
    baseline: &str,
    wire: &pb::Scenario,
    compiled: &engine::Scenario,
    why: &str,
) -> Change {
    let mut record = pb::Adjustment {
        scenario_id: wire.id.clone(),
        rule_id: rule.id.clone(),
        status: pb::AdjustmentStatus::Reverted as i32,
        ..pb::Adjustment::default()
    };
    let mut unchanged = false;
    let next = if let Some(strategy) = baseline.strip_prefix("strategy:") {
        match strategy.parse::<i32>() {
            Ok(target) if target != wire.strategy => {
                record.old_strategy = wire.strategy;
                record.new_strategy = target;
                record.explanation = format!("{why}: strategy back to {target}");
                let mut s = wire.clone();
                s.strategy = target;
                Some(s)
            }
            Ok(_) => {
                unchanged = true;
                None
            }
            Err(_) => None,
        }
    } else {
        match (baseline.parse::<f64>(), &rule.effect) {
            (Ok(value), Some(pb::adjustment_rule::Effect::Step(step))) => {
                let field = pb::ThresholdField::try_from(step.field)
                    .unwrap_or(pb::ThresholdField::Unspecified);
                let moved = move_field(
                    wire,
                    compiled,
                    field,
                    value,
                    &mut record,
                    pb::AdjustmentStatus::Reverted,
                );
                record.explanation = format!("{why}: {}", record.explanation);
                match moved {
                    Move::To(s) => Some(*s),
                    Move::Blocked => None,
                    Move::Unchanged => {
                        unchanged = true;
                        None
                    }
                }
            }
            _ => None,
        }
    };
    Change {
        next,
        record,
        baseline: None,
        applied: None,
        unchanged,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const MIN: i64 = 60_000_000;

    fn rule() -> pb::AdjustmentRule {
        pb::AdjustmentRule {
            id: "r1".into(),
            signal: pb::AdjustmentSignal::QueueEta as i32,
            comparison: pb::Comparison::Above as i32,
            threshold: 300.0,
            window: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            min_samples: 2,
            cooldown: Some(prost_types::Duration {
                seconds: 300,
                nanos: 0,
            }),
            revert_when_recovered: true,
            enabled: true,
            effect: Some(pb::adjustment_rule::Effect::Step(pb::ThresholdStep {
                field: pb::ThresholdField::MaxBotTurns as i32,
                delta: 5.0,
            })),
            ..pb::AdjustmentRule::default()
        }
    }

    fn agg(mean: f64, samples: i64) -> Aggregate {
        Aggregate {
            mean,
            samples,
            latest: None,
        }
    }

    #[test]
    fn fires_once_per_cooldown_and_recovers_only_after_a_full_window_past_the_band() {
        let r = rule();
        // Too few samples: nothing.
        let Step::Hold(s) = evaluate(&r, None, "s", agg(900.0, 1), 0, 0.1) else {
            panic!("fired without enough samples")
        };
        let Step::Fire(mut s) = evaluate(&r, Some(s), "s", agg(900.0, 2), 0, 0.1) else {
            panic!("did not fire")
        };
        s.baseline = Some("20".into());
        // Still breaching: hold, the episode runs.
        let Step::Hold(s) = evaluate(&r, Some(s), "s", agg(900.0, 3), 2 * MIN, 0.1) else {
            panic!("fired inside the cooldown")
        };
        // Inside the hysteresis band (above 270): neither fire nor recover.
        let Step::Hold(s) = evaluate(&r, Some(s), "s", agg(290.0, 3), 3 * MIN, 0.1) else {
            panic!()
        };
        assert!(s.firing && s.recovered_since.is_none());
        // Recovered, but not for a full window yet.
        let Step::Hold(s) = evaluate(&r, Some(s), "s", agg(100.0, 3), 4 * MIN, 0.1) else {
            panic!()
        };
        assert_eq!(s.recovered_since, Some(4 * MIN));
        let Step::Revert(s, baseline, _) = evaluate(&r, Some(s), "s", agg(100.0, 3), 14 * MIN, 0.1)
        else {
            panic!("did not revert after a full window")
        };
        assert_eq!(baseline, "20");
        assert!(!s.firing);
    }

    #[test]
    fn a_persisting_breach_holds_and_a_new_episode_waits_for_the_cooldown() {
        let r = rule();
        let Step::Fire(mut s) = evaluate(&r, None, "s", agg(900.0, 2), 0, 0.1) else {
            panic!("did not fire")
        };
        s.baseline = Some("20".into());
        // Past the cooldown (5 minutes), still breaching: the episode holds, nothing re-applies.
        for at in [6 * MIN, 30 * MIN, 120 * MIN] {
            let Step::Hold(held) = evaluate(&r, Some(s), "s", agg(900.0, 3), at, 0.1) else {
                panic!("re-applied at {at} while the condition held")
            };
            assert!(held.firing);
            assert_eq!(held.last_fired_at, Some(0));
            s = held;
        }
        // Leaving the condition for a full window reverts.
        let Step::Hold(s) = evaluate(&r, Some(s), "s", agg(100.0, 3), 121 * MIN, 0.1) else {
            panic!()
        };
        let Step::Revert(s, _, _) = evaluate(&r, Some(s), "s", agg(100.0, 3), 131 * MIN, 0.1)
        else {
            panic!("did not revert")
        };
        // Entering it again fires (the cooldown since the last firing has passed).
        assert!(matches!(
            evaluate(&r, Some(s), "s", agg(900.0, 3), 132 * MIN, 0.1),
            Step::Fire(_)
        ));
        // A new episode waits for the cooldown after the previous firing.
        let recent = RuleState {
            firing: false,
            last_fired_at: Some(130 * MIN),
            ..evaluate_fresh(&r)
        };
        assert!(matches!(
            evaluate(&r, Some(recent), "s", agg(900.0, 3), 132 * MIN, 0.1),
            Step::Hold(_)
        ));
    }

    fn evaluate_fresh(r: &pb::AdjustmentRule) -> RuleState {
        let Step::Hold(s) = evaluate(r, None, "s", agg(0.0, 0), 0, 0.1) else {
            panic!()
        };
        s
    }

    #[test]
    fn a_resolution_ends_the_episode_unless_its_value_still_breaches() {
        let mut r = rule();
        let firing = RuleState {
            firing: true,
            last_fired_at: Some(0),
            baseline: Some("20".into()),
            applied: Some("25".into()),
            ..evaluate_fresh(&r)
        };
        // Not in an episode: nothing to do.
        assert_eq!(resolve(&r, None, Some(100.0)), None);
        assert_eq!(resolve(&r, Some(evaluate_fresh(&r)), Some(100.0)), None);
        // Still above the threshold (300): the episode goes on.
        assert_eq!(resolve(&r, Some(firing.clone()), Some(310.0)), None);
        // Past the threshold, even inside the hysteresis band, or without a value: revert.
        for value in [Some(290.0), Some(100.0), None] {
            let Some(Step::Revert(s, baseline, applied)) = resolve(&r, Some(firing.clone()), value)
            else {
                panic!("{value:?} did not revert")
            };
            assert!(!s.firing && s.baseline.is_none() && s.applied.is_none());
            assert_eq!((baseline.as_str(), applied.as_deref()), ("20", Some("25")));
        }
        // A rule that does not revert only ends its episode.
        r.revert_when_recovered = false;
        let Some(Step::Hold(s)) = resolve(&r, Some(firing), None) else {
            panic!()
        };
        assert!(!s.firing);
    }

    #[test]
    fn a_silent_signal_ends_the_episode_after_the_timeout() {
        let mut r = rule();
        let firing = RuleState {
            firing: true,
            last_fired_at: Some(0),
            baseline: Some("20".into()),
            applied: Some("25".into()),
            silence_blocked_at: Some(MIN),
            ..evaluate_fresh(&r)
        };
        // No timeout: never.
        assert_eq!(
            silence(&r, Some(firing.clone()), None, 365 * 24 * 60 * MIN),
            None
        );
        r.silence_timeout = Some(prost_types::Duration {
            seconds: 1_200,
            nanos: 0,
        });
        // Not in an episode: nothing to end.
        assert_eq!(silence(&r, Some(evaluate_fresh(&r)), None, 100 * MIN), None);
        assert_eq!(silence(&r, None, None, 100 * MIN), None);
        // Measured from the newest report, or from the firing when no report is newer.
        assert_eq!(
            silence(&r, Some(firing.clone()), Some(5 * MIN), 24 * MIN),
            None
        );
        assert_eq!(silence(&r, Some(firing.clone()), None, 19 * MIN), None);
        let Some((Step::Revert(s, baseline, applied), silent_for)) =
            silence(&r, Some(firing.clone()), Some(5 * MIN), 25 * MIN)
        else {
            panic!("did not revert after the timeout")
        };
        assert_eq!(silent_for, 20 * MIN);
        assert!(!s.firing && s.baseline.is_none() && s.silence_blocked_at.is_none());
        assert_eq!((baseline.as_str(), applied.as_deref()), ("20", Some("25")));
        // A rule that does not revert only ends its episode.
        r.revert_when_recovered = false;
        let Some((Step::Hold(s), _)) = silence(&r, Some(firing.clone()), None, 20 * MIN) else {
            panic!()
        };
        assert!(!s.firing);
        // A reading clears a block recorded while the signal was silent.
        let Step::Hold(s) = evaluate(&r, Some(firing), "s", agg(900.0, 3), 30 * MIN, 0.1) else {
            panic!()
        };
        assert!(s.firing && s.silence_blocked_at.is_none());
    }

    #[test]
    fn a_change_to_the_value_already_held_is_unchanged() {
        let mut r = rule();
        let compiled = engine::default_scenario();
        let wire = pb::Scenario {
            id: "s".into(),
            strategy: pb::Strategy::BotFirst as i32,
            ..pb::Scenario::default()
        };
        r.effect = Some(pb::adjustment_rule::Effect::SetStrategy(
            pb::Strategy::BotFirst as i32,
        ));
        let change = fire(&r, &wire, &compiled);
        assert!(change.unchanged && change.next.is_none());
        // A step that rounds back to the current whole number.
        r.effect = Some(pb::adjustment_rule::Effect::Step(pb::ThresholdStep {
            field: pb::ThresholdField::MaxBotTurns as i32,
            delta: 0.4,
        }));
        assert!(fire(&r, &wire, &compiled).unchanged);
        // A revert to the value the scenario holds.
        let current = compiled.thresholds.max_bot_turns.to_string();
        assert!(revert(&r, &current, &wire, &compiled, "signal recovered").unchanged);
        assert!(revert(&r, "strategy:2", &wire, &compiled, "signal recovered").unchanged);
    }

    #[test]
    fn steps_are_clamped_to_the_guardrails_and_blocked_at_the_bound() {
        let r = rule();
        let mut compiled = engine::default_scenario();
        compiled.thresholds.max_bot_turns = 48;
        let wire = pb::Scenario {
            id: "s".into(),
            ..pb::Scenario::default()
        };
        let change = fire(&r, &wire, &compiled);
        assert_eq!(change.record.status, pb::AdjustmentStatus::Clamped as i32);
        assert_eq!(change.record.new_value, 50.0);
        let next = change.next.unwrap();
        assert_eq!(next.thresholds.unwrap().max_bot_turns, Some(50));
        compiled.thresholds.max_bot_turns = 50;
        let blocked = fire(&r, &wire, &compiled);
        assert!(blocked.next.is_none());
        assert_eq!(
            blocked.record.status,
            pb::AdjustmentStatus::BlockedByGuardrail as i32
        );
        assert!(!blocked.unchanged);
    }

    #[test]
    fn strategy_switches_respect_the_allowed_list() {
        let mut r = rule();
        r.effect = Some(pb::adjustment_rule::Effect::SetStrategy(
            pb::Strategy::AgentAssist as i32,
        ));
        let compiled = engine::default_scenario();
        let wire = pb::Scenario {
            id: "s".into(),
            strategy: pb::Strategy::BotFirst as i32,
            ..pb::Scenario::default()
        };
        let change = fire(&r, &wire, &compiled);
        assert_eq!(
            change.next.unwrap().strategy,
            pb::Strategy::AgentAssist as i32
        );
        r.effect = Some(pb::adjustment_rule::Effect::SetStrategy(
            pb::Strategy::HumanFirst as i32,
        ));
        assert!(fire(&r, &wire, &compiled).next.is_none());
    }
}
