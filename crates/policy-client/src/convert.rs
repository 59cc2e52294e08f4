//! Conversions between the wire model (`tandem.policy.v1`) and the engine model.
//!
//! Wire → engine validates as it converts and reports every problem, each with its field path:
//! unknown enum values, negative counts, malformed durations, texts over their limits, then the
//! engine's own rules ([`engine::Scenario::validate`]). Unset thresholds take the tenant's
//! defaults; unset guardrail bounds freeze the threshold at its value, so automatic adjustment
//! cannot move it (as the contract says).

use std::time::Duration;

use tandem_policy_engine as engine;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::policy::v1 as pb;

/// Longest display name per language.
const MAX_NAME_CHARS: usize = 100;
/// Longest description.
const MAX_DESCRIPTION_CHARS: usize = 2_000;
/// Most intents per scenario.
const MAX_INTENTS: usize = 200;
/// Longest intent name.
const MAX_INTENT_CHARS: usize = 128;
/// Most handoff or sensitive phrases.
const MAX_PHRASES: usize = 100;
/// Longest phrase.
const MAX_PHRASE_CHARS: usize = 64;
/// Longest skill name.
const MAX_SKILL_CHARS: usize = 64;
/// Longest language code used as a key of `names`.
const MAX_LANGUAGE_CODE_CHARS: usize = 16;
/// Longest duration a threshold or bound may hold (one day).
const MAX_DURATION_SECS: i64 = 86_400;

/// Builds a validation error.
pub fn violation(path: impl Into<String>, message: impl Into<String>) -> common::ValidationError {
    common::ValidationError {
        path: path.into(),
        message: message.into(),
    }
}

/// Prefixes every error path, e.g. with `scenarios[3].`.
pub fn prefix_errors(
    prefix: &str,
    errors: Vec<common::ValidationError>,
) -> Vec<common::ValidationError> {
    errors
        .into_iter()
        .map(|mut e| {
            e.path = format!("{prefix}{}", e.path);
            e
        })
        .collect()
}

/// Collects problems while converting.
struct Problems(Vec<common::ValidationError>);

impl Problems {
    fn push(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(violation(path, message));
    }

    fn text(&mut self, path: &str, value: &str, max: usize) {
        let chars = value.chars().count();
        if chars > max {
            self.push(path, format!("has {chars} characters, more than {max}"));
        }
        if value.chars().any(char::is_control) {
            self.push(path, "contains control characters");
        }
    }

    fn duration(&mut self, path: &str, d: &prost_types::Duration) -> Option<Duration> {
        if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
            self.push(path, "must be a non-negative duration");
            return None;
        }
        if d.seconds > MAX_DURATION_SECS {
            self.push(
                path,
                format!("is {}s, longer than {MAX_DURATION_SECS}s", d.seconds),
            );
            return None;
        }
        Some(Duration::new(
            d.seconds.unsigned_abs(),
            d.nanos.unsigned_abs(),
        ))
    }

    fn count(&mut self, path: &str, value: i32) -> Option<u32> {
        if value < 0 {
            self.push(path, format!("is {value}, must not be negative"));
            None
        } else {
            Some(value.unsigned_abs())
        }
    }

    fn bound_count(&mut self, path: &str, value: f64) -> Option<u32> {
        if !value.is_finite() || value < 0.0 || value.fract() != 0.0 || value > f64::from(u32::MAX)
        {
            self.push(
                path,
                format!("is {value}, must be a non-negative whole number"),
            );
            None
        } else {
            // Checked above: whole, non-negative and within u32.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Some(value as u32)
        }
    }
}

fn tier_from_wire(value: i32) -> Option<engine::Tier> {
    match pb::Tier::try_from(value).ok()? {
        pb::Tier::Standard => Some(engine::Tier::Standard),
        pb::Tier::SemiComplex => Some(engine::Tier::SemiComplex),
        pb::Tier::Complex => Some(engine::Tier::Complex),
        pb::Tier::Unspecified => None,
    }
}

fn tier_to_wire(tier: engine::Tier) -> pb::Tier {
    match tier {
        engine::Tier::Standard => pb::Tier::Standard,
        engine::Tier::SemiComplex => pb::Tier::SemiComplex,
        engine::Tier::Complex => pb::Tier::Complex,
    }
}

/// Converts a wire strategy; `None` for unspecified or unknown values.
pub fn strategy_from_wire(value: i32) -> Option<engine::Strategy> {
    match pb::Strategy::try_from(value).ok()? {
        pb::Strategy::BotOnly => Some(engine::Strategy::BotOnly),
        pb::Strategy::BotFirst => Some(engine::Strategy::BotFirst),
        pb::Strategy::AgentAssist => Some(engine::Strategy::AgentAssist),
        pb::Strategy::HumanFirst => Some(engine::Strategy::HumanFirst),
        pb::Strategy::Unspecified => None,
    }
}

pub fn strategy_to_wire(strategy: engine::Strategy) -> pb::Strategy {
    match strategy {
        engine::Strategy::BotOnly => pb::Strategy::BotOnly,
        engine::Strategy::BotFirst => pb::Strategy::BotFirst,
        engine::Strategy::AgentAssist => pb::Strategy::AgentAssist,
        engine::Strategy::HumanFirst => pb::Strategy::HumanFirst,
    }
}

fn mode_to_wire(mode: engine::Mode) -> pb::Mode {
    match mode {
        engine::Mode::Live => pb::Mode::Live,
        engine::Mode::Shadow => pb::Mode::Shadow,
    }
}

fn reason_to_wire(reason: engine::HandoffReason) -> common::HandoffReason {
    use engine::HandoffReason as R;
    match reason {
        R::ExplicitRequest => common::HandoffReason::ExplicitRequest,
        R::NegativeEmotion => common::HandoffReason::NegativeEmotion,
        R::EmotionSwing => common::HandoffReason::EmotionSwing,
        R::LowConfidence => common::HandoffReason::LowConfidence,
        R::RepeatedFallback => common::HandoffReason::RepeatedFallback,
        R::Complexity => common::HandoffReason::Complexity,
        R::PolicyHumanFirst => common::HandoffReason::PolicyHumanFirst,
        R::SensitiveTopic => common::HandoffReason::SensitiveTopic,
    }
}

fn duration_to_wire(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The engine's thresholds as the wire's, every field set.
pub fn thresholds_to_wire(t: &engine::Thresholds) -> pb::Thresholds {
    pb::Thresholds {
        min_intent_confidence: Some(t.min_intent_confidence),
        clarify_confidence: Some(t.clarify_confidence),
        negative_sentiment: Some(t.negative_sentiment),
        sentiment_drop: Some(t.sentiment_drop),
        sentiment_window_turns: Some(i32::try_from(t.sentiment_window_turns).unwrap_or(i32::MAX)),
        max_fallbacks: Some(i32::try_from(t.max_fallbacks).unwrap_or(i32::MAX)),
        max_bot_turns: Some(i32::try_from(t.max_bot_turns).unwrap_or(i32::MAX)),
        max_complexity: Some(t.max_complexity),
        max_queue_wait: Some(duration_to_wire(t.max_queue_wait)),
    }
}

fn thresholds_from_wire(
    wire: Option<&pb::Thresholds>,
    defaults: &engine::Thresholds,
    p: &mut Problems,
) -> engine::Thresholds {
    let mut t = defaults.clone();
    let Some(w) = wire else { return t };
    if let Some(v) = w.min_intent_confidence {
        t.min_intent_confidence = v;
    }
    if let Some(v) = w.clarify_confidence {
        t.clarify_confidence = v;
    }
    if let Some(v) = w.negative_sentiment {
        t.negative_sentiment = v;
    }
    if let Some(v) = w.sentiment_drop {
        t.sentiment_drop = v;
    }
    if let Some(v) = w.sentiment_window_turns
        && let Some(v) = p.count("thresholds.sentiment_window_turns", v)
    {
        t.sentiment_window_turns = v;
    }
    if let Some(v) = w.max_fallbacks
        && let Some(v) = p.count("thresholds.max_fallbacks", v)
    {
        t.max_fallbacks = v;
    }
    if let Some(v) = w.max_bot_turns
        && let Some(v) = p.count("thresholds.max_bot_turns", v)
    {
        t.max_bot_turns = v;
    }
    if let Some(v) = w.max_complexity {
        t.max_complexity = v;
    }
    if let Some(d) = &w.max_queue_wait
        && let Some(d) = p.duration("thresholds.max_queue_wait", d)
    {
        t.max_queue_wait = d;
    }
    t
}

fn float_bounds(
    wire: Option<&pb::Bounds>,
    value: f64,
    path: &str,
    p: &mut Problems,
) -> engine::Bounds<f64> {
    match wire {
        None => engine::Bounds::new(value, value),
        Some(b) => {
            if !b.min.is_finite() || !b.max.is_finite() {
                p.push(path, "bounds must be finite numbers");
                return engine::Bounds::new(value, value);
            }
            engine::Bounds::new(b.min, b.max)
        }
    }
}

fn count_bounds(
    wire: Option<&pb::Bounds>,
    value: u32,
    path: &str,
    p: &mut Problems,
) -> engine::Bounds<u32> {
    match wire {
        None => engine::Bounds::new(value, value),
        Some(b) => {
            let min = p.bound_count(&format!("{path}.min"), b.min);
            let max = p.bound_count(&format!("{path}.max"), b.max);
            engine::Bounds::new(min.unwrap_or(value), max.unwrap_or(value))
        }
    }
}

fn guardrails_from_wire(
    wire: Option<&pb::Guardrails>,
    t: &engine::Thresholds,
    p: &mut Problems,
) -> engine::Guardrails {
    let empty = pb::Guardrails::default();
    let g = wire.unwrap_or(&empty);
    let wait = match &g.max_queue_wait {
        None => engine::Bounds::new(t.max_queue_wait, t.max_queue_wait),
        Some(b) => {
            let min = b
                .min
                .as_ref()
                .and_then(|d| p.duration("guardrails.max_queue_wait.min", d));
            let max = b
                .max
                .as_ref()
                .and_then(|d| p.duration("guardrails.max_queue_wait.max", d));
            engine::Bounds::new(
                min.unwrap_or(Duration::ZERO),
                max.unwrap_or(t.max_queue_wait),
            )
        }
    };
    let mut allowed = Vec::with_capacity(g.allowed_strategies.len());
    for (i, s) in g.allowed_strategies.iter().enumerate() {
        match strategy_from_wire(*s) {
            Some(s) => allowed.push(s),
            None => p.push(
                &format!("guardrails.allowed_strategies[{i}]"),
                format!("unknown strategy {s}; expected one of {}", STRATEGY_NAMES),
            ),
        }
    }
    engine::Guardrails {
        min_intent_confidence: float_bounds(
            g.min_intent_confidence.as_ref(),
            t.min_intent_confidence,
            "guardrails.min_intent_confidence",
            p,
        ),
        clarify_confidence: float_bounds(
            g.clarify_confidence.as_ref(),
            t.clarify_confidence,
            "guardrails.clarify_confidence",
            p,
        ),
        negative_sentiment: float_bounds(
            g.negative_sentiment.as_ref(),
            t.negative_sentiment,
            "guardrails.negative_sentiment",
            p,
        ),
        sentiment_drop: float_bounds(
            g.sentiment_drop.as_ref(),
            t.sentiment_drop,
            "guardrails.sentiment_drop",
            p,
        ),
        sentiment_window_turns: count_bounds(
            g.sentiment_window_turns.as_ref(),
            t.sentiment_window_turns,
            "guardrails.sentiment_window_turns",
            p,
        ),
        max_fallbacks: count_bounds(
            g.max_fallbacks.as_ref(),
            t.max_fallbacks,
            "guardrails.max_fallbacks",
            p,
        ),
        max_bot_turns: count_bounds(
            g.max_bot_turns.as_ref(),
            t.max_bot_turns,
            "guardrails.max_bot_turns",
            p,
        ),
        max_complexity: float_bounds(
            g.max_complexity.as_ref(),
            t.max_complexity,
            "guardrails.max_complexity",
            p,
        ),
        max_queue_wait: wait,
        allowed_strategies: allowed,
    }
}

const TIER_NAMES: &str = "TIER_STANDARD, TIER_SEMI_COMPLEX, TIER_COMPLEX";
const STRATEGY_NAMES: &str =
    "STRATEGY_BOT_ONLY, STRATEGY_BOT_FIRST, STRATEGY_AGENT_ASSIST, STRATEGY_HUMAN_FIRST";

/// Converts and validates a wire scenario. Unset thresholds take `defaults`. Every problem is
/// returned, each with its path relative to the scenario.
pub fn scenario_to_engine(
    s: &pb::Scenario,
    defaults: &engine::Thresholds,
) -> Result<engine::Scenario, Vec<common::ValidationError>> {
    let mut p = Problems(Vec::new());
    for (lang, name) in &s.names {
        if lang.is_empty() || lang.chars().count() > MAX_LANGUAGE_CODE_CHARS {
            p.push(
                "names",
                format!("language code {lang:?} must have 1..=16 characters"),
            );
        }
        p.text(&format!("names.{lang}"), name, MAX_NAME_CHARS);
    }
    p.text("description", &s.description, MAX_DESCRIPTION_CHARS);
    if s.intents.len() > MAX_INTENTS {
        p.push(
            "intents",
            format!("has {} entries, more than {MAX_INTENTS}", s.intents.len()),
        );
    }
    for (i, intent) in s.intents.iter().enumerate() {
        p.text(&format!("intents[{i}]"), intent, MAX_INTENT_CHARS);
    }
    let intent_priority = match s.intent_priority {
        0..=1000 => s.intent_priority.unsigned_abs(),
        other => {
            p.push(
                "intent_priority",
                format!("is {other}, outside its range 0..=1000"),
            );
            0
        }
    };
    let tier = tier_from_wire(s.tier).unwrap_or_else(|| {
        p.push(
            "tier",
            format!("unknown tier {}; expected one of {TIER_NAMES}", s.tier),
        );
        engine::Tier::Standard
    });
    let strategy = strategy_from_wire(s.strategy).unwrap_or_else(|| {
        p.push(
            "strategy",
            format!(
                "unknown strategy {}; expected one of {STRATEGY_NAMES}",
                s.strategy
            ),
        );
        engine::Strategy::BotFirst
    });
    let mode = match pb::Mode::try_from(s.mode) {
        Ok(pb::Mode::Unspecified | pb::Mode::Live) => engine::Mode::Live,
        Ok(pb::Mode::Shadow) => engine::Mode::Shadow,
        Err(_) => {
            p.push(
                "mode",
                format!("unknown mode {}; expected MODE_LIVE or MODE_SHADOW", s.mode),
            );
            engine::Mode::Live
        }
    };
    for (field, phrases) in [
        ("handoff_phrases", &s.handoff_phrases),
        ("sensitive_phrases", &s.sensitive_phrases),
    ] {
        if phrases.len() > MAX_PHRASES {
            p.push(
                field,
                format!("has {} entries, more than {MAX_PHRASES}", phrases.len()),
            );
        }
        for (i, phrase) in phrases.iter().enumerate() {
            if phrase.trim().is_empty() {
                p.push(&format!("{field}[{i}]"), "is empty");
            }
            p.text(&format!("{field}[{i}]"), phrase, MAX_PHRASE_CHARS);
        }
    }
    let thresholds = thresholds_from_wire(s.thresholds.as_ref(), defaults, &mut p);
    let guardrails = guardrails_from_wire(s.guardrails.as_ref(), &thresholds, &mut p);
    let routing = match &s.routing {
        None => engine::RoutingTarget {
            queue_id: String::new(),
            skills: Vec::new(),
            priority: 0,
        },
        Some(r) => {
            p.text("routing.queue_id", &r.queue_id, 64);
            let mut skills = Vec::with_capacity(r.skills.len());
            for (i, skill) in r.skills.iter().enumerate() {
                let path = format!("routing.skills[{i}]");
                if skill.name.is_empty() {
                    p.push(&format!("{path}.name"), "is empty");
                } else if skill.name.chars().count() > MAX_SKILL_CHARS
                    || skill
                        .name
                        .chars()
                        .any(|c| c.is_uppercase() || c.is_whitespace())
                {
                    p.push(
                        &format!("{path}.name"),
                        "must be lower case without spaces, at most 64 characters",
                    );
                }
                if !(1..=10).contains(&skill.min_level) {
                    p.push(
                        &format!("{path}.min_level"),
                        format!("is {}, outside its range 1..=10", skill.min_level),
                    );
                }
                skills.push(skill.name.clone());
            }
            let priority = p.count("routing.priority", r.priority).unwrap_or(0);
            engine::RoutingTarget {
                queue_id: r.queue_id.clone(),
                skills,
                priority,
            }
        }
    };
    let scenario = engine::Scenario {
        id: s.id.clone(),
        intents: s.intents.clone(),
        intent_priority,
        tier,
        strategy,
        thresholds,
        guardrails,
        routing,
        mode,
        version: s.version,
        pinned: s.pinned,
    };
    if let Err(found) = scenario.validate() {
        for v in found {
            p.push(v.path(), v.to_string());
        }
    }
    if p.0.is_empty() {
        Ok(scenario)
    } else {
        Err(p.0)
    }
}

/// Converts and validates a turn's context. Every out-of-range value is reported.
pub fn context_from_wire(
    c: &pb::DecisionContext,
) -> Result<engine::DecisionContext, Vec<common::ValidationError>> {
    let mut p = Problems(Vec::new());
    let mut unit = |path: &str, v: f64, min: f64, max: f64| {
        if !(v.is_finite() && (min..=max).contains(&v)) {
            p.push(path, format!("is {v}, outside its range {min}..={max}"));
        }
    };
    unit("context.intent_confidence", c.intent_confidence, 0.0, 1.0);
    unit("context.out_of_scope", c.out_of_scope, 0.0, 1.0);
    unit("context.sentiment", c.sentiment, -1.0, 1.0);
    unit("context.sentiment_drop", c.sentiment_drop, 0.0, 2.0);
    unit("context.complexity", c.complexity, 0.0, 1.0);
    let fallbacks = p.count("context.fallbacks", c.fallbacks).unwrap_or(0);
    let bot_turns = p.count("context.bot_turns", c.bot_turns).unwrap_or(0);
    let queue_eta_seconds = match c.queue_eta_seconds {
        None => None,
        Some(v) => p.count("context.queue_eta_seconds", v),
    };
    p.text("context.intent", &c.intent, MAX_INTENT_CHARS);
    p.text("context.scenario_id", &c.scenario_id, 64);
    if common::CustomerTier::try_from(c.customer_tier).is_err() {
        p.push(
            "context.customer_tier",
            format!("unknown customer tier {}", c.customer_tier),
        );
    }
    if !p.0.is_empty() {
        return Err(p.0);
    }
    Ok(engine::DecisionContext {
        intent: c.intent.clone(),
        intent_confidence: c.intent_confidence,
        sentiment: c.sentiment,
        sentiment_drop: c.sentiment_drop,
        complexity: c.complexity,
        fallbacks,
        bot_turns,
        customer_vip: c.customer_tier == common::CustomerTier::Vip as i32,
        queue_eta_seconds,
        within_business_hours: c.within_business_hours,
        human_requested: c.human_requested,
        sensitive_topic: c.sensitive_topic,
        agent_owns_conversation: c.agent_owns_conversation,
    })
}

/// Explains in English, for agents and logs, why `rule` decided.
pub fn explain(
    rule: engine::RuleId,
    ctx: &engine::DecisionContext,
    t: &engine::Thresholds,
) -> String {
    use engine::RuleId as R;
    match rule {
        R::AgentOwnsConversation => "an agent owns the conversation: the bot only suggests".into(),
        R::ExplicitRequest => "the customer asked for a human".into(),
        R::SensitiveTopic => "the message touches a sensitive topic".into(),
        R::HumanFirst => "the scenario's strategy is human first".into(),
        R::NegativeSentiment => format!(
            "sentiment {:.2} is at or below negative_sentiment {:.2}",
            ctx.sentiment, t.negative_sentiment
        ),
        R::SentimentDrop => format!(
            "sentiment dropped by {:.2} over {} turns, at or above sentiment_drop {:.2}",
            ctx.sentiment_drop, t.sentiment_window_turns, t.sentiment_drop
        ),
        R::MaxFallbacks => format!(
            "{} consecutive fallbacks exceed max_fallbacks {}",
            ctx.fallbacks, t.max_fallbacks
        ),
        R::MaxComplexity => format!(
            "complexity {:.2} exceeds max_complexity {:.2}",
            ctx.complexity, t.max_complexity
        ),
        R::MaxBotTurns => format!(
            "{} bot turns reached max_bot_turns {}",
            ctx.bot_turns, t.max_bot_turns
        ),
        R::ClarifyConfidence => format!(
            "confidence {:.2} for {:?} is below min_intent_confidence {:.2} but at least \
             clarify_confidence {:.2}",
            ctx.intent_confidence, ctx.intent, t.min_intent_confidence, t.clarify_confidence
        ),
        R::MinIntentConfidence => format!(
            "confidence {:.2} for {:?} is below clarify_confidence {:.2}",
            ctx.intent_confidence, ctx.intent, t.clarify_confidence
        ),
        R::OutsideBusinessHours => {
            "a human is needed but the queue is outside business hours".into()
        }
        R::MaxQueueWait => format!(
            "a human is needed but the queue ETA of {}s exceeds max_queue_wait {}s",
            ctx.queue_eta_seconds.unwrap_or_default(),
            t.max_queue_wait.as_secs()
        ),
        R::BotOnlyNoAgent => "a human is needed but the scenario is bot only".into(),
        R::Answer => format!(
            "confidence {:.2} for {:?} is at least min_intent_confidence {:.2}",
            ctx.intent_confidence, ctx.intent, t.min_intent_confidence
        ),
    }
}

fn action_to_wire(action: engine::Action) -> (pb::DecisionAction, common::HandoffReason) {
    use engine::Action as A;
    match action {
        A::Answer => (
            pb::DecisionAction::BotAnswer,
            common::HandoffReason::Unspecified,
        ),
        A::Clarify => (
            pb::DecisionAction::Clarify,
            common::HandoffReason::Unspecified,
        ),
        A::Fallback => (
            pb::DecisionAction::Fallback,
            common::HandoffReason::Unspecified,
        ),
        A::AgentAssist => (
            pb::DecisionAction::SuggestOnly,
            common::HandoffReason::Unspecified,
        ),
        A::Handoff(r) => (pb::DecisionAction::Handoff, reason_to_wire(r)),
        A::LeaveMessage(r) => (pb::DecisionAction::LeaveMessage, reason_to_wire(r)),
    }
}

/// The engine's decision as the wire's, with the routing target of `wire_scenario`.
pub fn decision_to_wire(
    d: &engine::Decision,
    ctx: &engine::DecisionContext,
    routing: Option<&pb::RoutingTarget>,
) -> pb::Decision {
    let (action, reason) = action_to_wire(d.action);
    pb::Decision {
        scenario_id: d.scenario_id.clone(),
        tier: tier_to_wire(d.tier) as i32,
        strategy: strategy_to_wire(d.strategy) as i32,
        action: action as i32,
        handoff_reason: reason as i32,
        rule_id: d.rule.as_str().to_owned(),
        explanation: explain(d.rule, ctx, &d.thresholds_used),
        thresholds: Some(thresholds_to_wire(&d.thresholds_used)),
        policy_version: d.policy_version,
        mode: mode_to_wire(d.mode) as i32,
        routing: routing.cloned(),
        shadow: None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn valid() -> pb::Scenario {
        pb::Scenario {
            id: "refund".into(),
            intents: vec!["refund_request".into()],
            tier: pb::Tier::SemiComplex as i32,
            strategy: pb::Strategy::BotFirst as i32,
            ..pb::Scenario::default()
        }
    }

    #[test]
    fn unset_thresholds_take_the_defaults_and_freeze_their_guardrails() {
        let defaults = engine::default_scenario().thresholds;
        let s = scenario_to_engine(&valid(), &defaults).unwrap();
        assert_eq!(s.thresholds, defaults);
        assert_eq!(s.guardrails.max_fallbacks.min, defaults.max_fallbacks);
        assert_eq!(s.guardrails.max_fallbacks.max, defaults.max_fallbacks);
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let mut s = valid();
        s.tier = 0;
        s.strategy = 42;
        s.intent_priority = -1;
        s.thresholds = Some(pb::Thresholds {
            max_fallbacks: Some(-3),
            min_intent_confidence: Some(0.95),
            ..pb::Thresholds::default()
        });
        s.guardrails = Some(pb::Guardrails {
            min_intent_confidence: Some(pb::Bounds { min: 0.5, max: 0.9 }),
            max_bot_turns: Some(pb::Bounds {
                min: 2.5,
                max: 10.0,
            }),
            ..pb::Guardrails::default()
        });
        s.sensitive_phrases = vec![" ".into()];
        let errors = scenario_to_engine(&s, &engine::default_scenario().thresholds).unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "tier",
            "strategy",
            "intent_priority",
            "thresholds.max_fallbacks",
            "thresholds.min_intent_confidence",
            "guardrails.max_bot_turns.min",
            "sensitive_phrases[0]",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {paths:?}"
            );
        }
    }

    #[test]
    fn context_ranges_are_checked() {
        let ctx = pb::DecisionContext {
            intent_confidence: 1.5,
            sentiment: f64::NAN,
            fallbacks: -1,
            ..pb::DecisionContext::default()
        };
        let errors = context_from_wire(&ctx).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
    }
}
