//! The domain model of a scenario policy: what a scenario is, what a turn looks like to the
//! policy, and what the policy decides.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How complex a scenario is (标准化 / 半复杂 / 复杂).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Routine questions the bot can usually answer alone.
    Standard,
    /// The bot starts, humans take over readily.
    SemiComplex,
    /// Humans lead, the bot assists.
    Complex,
}

/// How bot and humans share a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Only the bot answers; a need for a human becomes an offer to leave a message.
    BotOnly,
    /// The bot answers first and hands off when a threshold fires.
    BotFirst,
    /// Like `BotFirst`, but after a handoff the bot keeps suggesting replies to the agent.
    AgentAssist,
    /// Hand off at once; the bot only collects context while the customer waits.
    HumanFirst,
}

/// Whether a scenario's policy is acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Decisions are acted on.
    Live,
    /// Decisions are computed and recorded but not acted on.
    Shadow,
}

/// The thresholds that make the bot answer, clarify or hand off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Minimum calibrated intent confidence (0..1) to answer directly.
    pub min_intent_confidence: f64,
    /// Confidence (0..1, at most `min_intent_confidence`) at or above which the bot asks a
    /// clarifying question instead of giving up on the intent.
    pub clarify_confidence: f64,
    /// Sentiment score (-1..0) at or below which a turn counts as negative emotion.
    pub negative_sentiment: f64,
    /// Drop in sentiment (0..2) across the window that counts as an emotion swing.
    pub sentiment_drop: f64,
    /// Number of recent customer turns (1..10) the sentiment drop is measured over.
    pub sentiment_window_turns: u32,
    /// Consecutive bot fallbacks (0..10) tolerated before handoff.
    pub max_fallbacks: u32,
    /// Bot turns (1..100) after which the conversation is handed off.
    pub max_bot_turns: u32,
    /// Complexity score (0..1) above which the conversation is handed off.
    pub max_complexity: f64,
    /// Queue wait above which a non-urgent handoff becomes an offer to leave a message.
    pub max_queue_wait: Duration,
}

/// Inclusive bounds; valid only when `min <= max`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bounds<T> {
    /// Lowest allowed value.
    pub min: T,
    /// Highest allowed value.
    pub max: T,
}

impl<T: PartialOrd + Copy> Bounds<T> {
    /// Returns inclusive bounds from `min` to `max`.
    pub const fn new(min: T, max: T) -> Self {
        Self { min, max }
    }

    /// Returns whether `value` lies within the bounds (false for NaN).
    pub fn contains(&self, value: T) -> bool {
        self.min <= value && value <= self.max
    }

    /// Returns `value` moved into the bounds. Never panics (unlike `f64::clamp`): with inverted
    /// bounds the result is one of the two bounds, and an unordered value (NaN) becomes `min`.
    pub fn clamp(&self, value: T) -> T {
        if value < self.min {
            self.min
        } else if value > self.max {
            self.max
        } else if self.contains(value) {
            value
        } else {
            self.min
        }
    }
}

/// Limits that automatic adjustments may never cross.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guardrails {
    /// Bounds for `Thresholds::min_intent_confidence`.
    pub min_intent_confidence: Bounds<f64>,
    /// Bounds for `Thresholds::clarify_confidence`.
    pub clarify_confidence: Bounds<f64>,
    /// Bounds for `Thresholds::negative_sentiment`.
    pub negative_sentiment: Bounds<f64>,
    /// Bounds for `Thresholds::sentiment_drop`.
    pub sentiment_drop: Bounds<f64>,
    /// Bounds for `Thresholds::sentiment_window_turns`.
    pub sentiment_window_turns: Bounds<u32>,
    /// Bounds for `Thresholds::max_fallbacks`.
    pub max_fallbacks: Bounds<u32>,
    /// Bounds for `Thresholds::max_bot_turns`.
    pub max_bot_turns: Bounds<u32>,
    /// Bounds for `Thresholds::max_complexity`.
    pub max_complexity: Bounds<f64>,
    /// Bounds for `Thresholds::max_queue_wait`.
    pub max_queue_wait: Bounds<Duration>,
    /// Strategies an adjustment may switch to; empty means the strategy is never changed
    /// automatically (and any current strategy is accepted).
    pub allowed_strategies: Vec<Strategy>,
}

/// Where handed-off conversations of a scenario go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingTarget {
    /// Routing queue identifier.
    pub queue_id: String,
    /// Skills the agent needs, at most 10.
    pub skills: Vec<String>,
    /// Base priority 0..100; higher is served first.
    pub priority: u32,
}

/// A business scenario (e.g. "refund") with its collaboration policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    /// Identifier: lower case letters, digits, '_' and '-', at most 64 characters.
    pub id: String,
    /// Intent names that belong to this scenario.
    pub intents: Vec<String>,
    /// Precedence (0..1000) when a message matches intents of several scenarios; higher wins.
    pub intent_priority: u32,
    /// Complexity tier.
    pub tier: Tier,
    /// Collaboration strategy.
    pub strategy: Strategy,
    /// Current thresholds.
    pub thresholds: Thresholds,
    /// Bounds for automatic adjustments.
    pub guardrails: Guardrails,
    /// Where handoffs go.
    pub routing: RoutingTarget,
    /// Live or shadow.
    pub mode: Mode,
    /// Version, incremented by the owner of the scenario on every change.
    pub version: i64,
    /// True when a human pinned the scenario: automatic adjustments are recorded, not applied.
    pub pinned: bool,
}

/// Why a conversation needs a human.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandoffReason {
    /// The customer asked for a human.
    ExplicitRequest,
    /// The turn's sentiment fell at or below the negative-sentiment threshold.
    NegativeEmotion,
    /// Sentiment dropped by at least the threshold across recent turns.
    EmotionSwing,
    /// Intent confidence fell below the clarify band.
    LowConfidence,
    /// The bot fell back more times than the scenario tolerates.
    RepeatedFallback,
    /// The conversation is too complex (complexity score or too many bot turns).
    Complexity,
    /// The scenario's strategy is human-first.
    PolicyHumanFirst,
    /// The message touches a topic the bot must not handle.
    SensitiveTopic,
}

/// Everything the policy needs to decide one turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionContext {
    /// Top intent of the turn; empty when none.
    pub intent: String,
    /// Calibrated confidence of `intent`, 0..1.
    pub intent_confidence: f64,
    /// Sentiment score of the turn, -1..1.
    pub sentiment: f64,
    /// Drop in sentiment across the scenario's window (positive means worse), 0..2.
    pub sentiment_drop: f64,
    /// Complexity score, 0..1.
    pub complexity: f64,
    /// Consecutive bot fallbacks so far, including this turn's if any.
    pub fallbacks: u32,
    /// Bot turns so far in the conversation.
    pub bot_turns: u32,
    /// Whether the customer is a VIP (never offered a message instead of a long queue).
    pub customer_vip: bool,
    /// Live queue ETA for the target queue; `None` when unknown.
    pub queue_eta_seconds: Option<u32>,
    /// Whether the target queue is within business hours; `None` when unknown (treated as open).
    pub within_business_hours: Option<bool>,
    /// Whether the customer asked for a human in this turn.
    pub human_requested: bool,
    /// Whether a sensitive topic was detected in this turn.
    pub sensitive_topic: bool,
    /// Whether a human already owns the conversation (the bot may then only suggest).
    pub agent_owns_conversation: bool,
}

/// The one action the policy chooses for a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The bot answers from the knowledge base.
    Answer,
    /// The bot asks which of the top intents the customer meant.
    Clarify,
    /// Hand the conversation to a human.
    Handoff(HandoffReason),
    /// A human owns the conversation: the bot only suggests a reply to the agent.
    AgentAssist,
    /// A human is needed but none is available (out of hours, queue too long, bot-only
    /// scenario): offer to leave a message.
    LeaveMessage(HandoffReason),
    /// The bot says it did not understand and asks the customer to rephrase.
    Fallback,
}

/// Identifier of the rule that determined a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleId {
    /// A human already owns the conversation.
    AgentOwnsConversation,
    /// The customer asked for a human.
    ExplicitRequest,
    /// A sensitive topic was detected.
    SensitiveTopic,
    /// The strategy is human-first.
    HumanFirst,
    /// Sentiment at or below `negative_sentiment`.
    NegativeSentiment,
    /// Sentiment drop at or above `sentiment_drop`.
    SentimentDrop,
    /// Fallbacks above `max_fallbacks`.
    MaxFallbacks,
    /// Complexity above `max_complexity`.
    MaxComplexity,
    /// Bot turns at or above `max_bot_turns`.
    MaxBotTurns,
    /// Confidence below `min_intent_confidence` but within the clarify band.
    ClarifyConfidence,
    /// Confidence below the clarify band.
    MinIntentConfidence,
    /// A handoff was needed but the queue is outside business hours.
    OutsideBusinessHours,
    /// A non-urgent handoff was needed but the queue ETA exceeds `max_queue_wait`.
    MaxQueueWait,
    /// A human was needed but the scenario is bot-only.
    BotOnlyNoAgent,
    /// No rule fired: the bot answers.
    Answer,
}

impl RuleId {
    /// Returns the stable wire identifier of the rule (`Decision.rule_id`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AgentOwnsConversation => "agent_owns_conversation",
            Self::ExplicitRequest => "explicit_request",
            Self::SensitiveTopic => "sensitive_topic",
            Self::HumanFirst => "human_first",
            Self::NegativeSentiment => "negative_sentiment",
            Self::SentimentDrop => "sentiment_drop",
            Self::MaxFallbacks => "max_fallbacks",
            Self::MaxComplexity => "max_complexity",
            Self::MaxBotTurns => "max_bot_turns",
            Self::ClarifyConfidence => "clarify_confidence",
            Self::MinIntentConfidence => "min_intent_confidence",
            Self::OutsideBusinessHours => "outside_business_hours",
            Self::MaxQueueWait => "max_queue_wait",
            Self::BotOnlyNoAgent => "bot_only_no_agent",
            Self::Answer => "answer",
        }
    }
}

/// The policy's decision for one turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Scenario the decision was made for.
    pub scenario_id: String,
    /// Scenario version the decision was made with.
    pub policy_version: i64,
    /// Tier of the scenario.
    pub tier: Tier,
    /// Strategy applied; `AgentAssist` tells the caller to keep suggesting replies after a handoff.
    pub strategy: Strategy,
    /// Mode of the scenario; the caller acts only on `Live` decisions.
    pub mode: Mode,
    /// Action to take.
    pub action: Action,
    /// Rule that determined the action.
    pub rule: RuleId,
    /// The scenario's thresholds the decision was made with.
    pub thresholds_used: Thresholds,
}

/// A proposed change to a scenario; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThresholdChange {
    /// New `min_intent_confidence`.
    pub min_intent_confidence: Option<f64>,
    /// New `clarify_confidence`.
    pub clarify_confidence: Option<f64>,
    /// New `negative_sentiment`.
    pub negative_sentiment: Option<f64>,
    /// New `sentiment_drop`.
    pub sentiment_drop: Option<f64>,
    /// New `sentiment_window_turns`.
    pub sentiment_window_turns: Option<u32>,
    /// New `max_fallbacks`.
    pub max_fallbacks: Option<u32>,
    /// New `max_bot_turns`.
    pub max_bot_turns: Option<u32>,
    /// New `max_complexity`.
    pub max_complexity: Option<f64>,
    /// New `max_queue_wait`.
    pub max_queue_wait: Option<Duration>,
    /// New strategy; applied only when listed in the guardrails' allowed strategies.
    pub strategy: Option<Strategy>,
}

impl Scenario {
    /// Returns a copy with `change` applied and every threshold clamped into its guardrails.
    ///
    /// Non-finite proposals are ignored. A strategy outside `allowed_strategies` (or any strategy
    /// when that list is empty) is ignored. `pinned` and `version` are left to the caller, which
    /// records the adjustment and decides whether to apply it.
    pub fn adjust(&self, change: &ThresholdChange) -> Self {
        let mut next = self.clone();
        let t = &mut next.thresholds;
        let finite = |v: Option<f64>| v.filter(|v| v.is_finite());
        if let Some(v) = finite(change.min_intent_confidence) {
            t.min_intent_confidence = v;
        }
        if let Some(v) = finite(change.clarify_confidence) {
            t.clarify_confidence = v;
        }
        if let Some(v) = finite(change.negative_sentiment) {
            t.negative_sentiment = v;
        }
        if let Some(v) = finite(change.sentiment_drop) {
            t.sentiment_drop = v;
        }
        if let Some(v) = finite(change.max_complexity) {
            t.max_complexity = v;
        }
        if let Some(v) = change.sentiment_window_turns {
            t.sentiment_window_turns = v;
        }
        if let Some(v) = change.max_fallbacks {
            t.max_fallbacks = v;
        }
        if let Some(v) = change.max_bot_turns {
            t.max_bot_turns = v;
        }
        if let Some(v) = change.max_queue_wait {
            t.max_queue_wait = v;
        }
        if let Some(strategy) = change.strategy
            && self.guardrails.allowed_strategies.contains(&strategy)
        {
            next.strategy = strategy;
        }
        next.clamp_to_guardrails()
    }

    /// Returns a copy whose thresholds all lie within their guardrails.
    ///
    /// `clarify_confidence` is first capped at `min_intent_confidence`, then clamped, so the
    /// guardrails win when the two disagree (validation reports that case).
    pub fn clamp_to_guardrails(&self) -> Self {
        let mut next = self.clone();
        let g = &self.guardrails;
        let t = &mut next.thresholds;
        t.min_intent_confidence = g.min_intent_confidence.clamp(t.min_intent_confidence);
        let clarify = if t.clarify_confidence > t.min_intent_confidence {
            t.min_intent_confidence
        } else {
            t.clarify_confidence
        };
        t.clarify_confidence = g.clarify_confidence.clamp(clarify);
        t.negative_sentiment = g.negative_sentiment.clamp(t.negative_sentiment);
        t.sentiment_drop = g.sentiment_drop.clamp(t.sentiment_drop);
        t.sentiment_window_turns = g.sentiment_window_turns.clamp(t.sentiment_window_turns);
        t.max_fallbacks = g.max_fallbacks.clamp(t.max_fallbacks);
        t.max_bot_turns = g.max_bot_turns.clamp(t.max_bot_turns);
        t.max_complexity = g.max_complexity.clamp(t.max_complexity);
        t.max_queue_wait = g.max_queue_wait.clamp(t.max_queue_wait);
        next
    }
}

/// Returns the bot-first scenario used when no policy is reachable or none matches.
pub fn default_scenario() -> Scenario {
    Scenario {
        id: "default".to_owned(),
        intents: Vec::new(),
        intent_priority: 0,
        tier: Tier::Standard,
        strategy: Strategy::BotFirst,
        thresholds: Thresholds {
            min_intent_confidence: 0.6,
            clarify_confidence: 0.4,
            negative_sentiment: -0.6,
            sentiment_drop: 0.8,
            sentiment_window_turns: 3,
            max_fallbacks: 2,
            max_bot_turns: 20,
            max_complexity: 0.8,
            max_queue_wait: Duration::from_secs(300),
        },
        guardrails: Guardrails {
            min_intent_confidence: Bounds::new(0.3, 0.9),
            clarify_confidence: Bounds::new(0.2, 0.7),
            negative_sentiment: Bounds::new(-0.9, -0.3),
            sentiment_drop: Bounds::new(0.4, 1.5),
            sentiment_window_turns: Bounds::new(1, 10),
            max_fallbacks: Bounds::new(1, 5),
            max_bot_turns: Bounds::new(5, 50),
            max_complexity: Bounds::new(0.5, 0.95),
            max_queue_wait: Bounds::new(Duration::from_secs(60), Duration::from_secs(1800)),
            allowed_strategies: vec![Strategy::BotFirst, Strategy::AgentAssist],
        },
        routing: RoutingTarget {
            queue_id: "default".to_owned(),
            skills: Vec::new(),
            priority: 50,
        },
        mode: Mode::Live,
        version: 0,
        pinned: false,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::{any, prop_assert, proptest};
    use proptest::strategy::Strategy as Gen;

    use super::*;

    #[test]
    fn default_scenario_is_bot_first_and_within_its_guardrails() {
        let s = default_scenario();
        assert_eq!(s.strategy, Strategy::BotFirst);
        assert_eq!(s.clamp_to_guardrails(), s);
    }

    #[test]
    fn adjust_applies_a_change_inside_the_guardrails() {
        let change = ThresholdChange {
            max_fallbacks: Some(3),
            ..ThresholdChange::default()
        };
        let next = default_scenario().adjust(&change);
        assert_eq!(next.thresholds.max_fallbacks, 3);
        assert_eq!(next.version, 0, "versioning belongs to the caller");
    }

    #[test]
    fn adjust_clamps_a_change_to_the_guardrails() {
        let change = ThresholdChange {
            min_intent_confidence: Some(0.99),
            negative_sentiment: Some(-1.0),
            max_bot_turns: Some(1),
            max_queue_wait: Some(Duration::from_secs(86_400)),
            ..ThresholdChange::default()
        };
        let t = default_scenario().adjust(&change).thresholds;
        assert_eq!(t.min_intent_confidence, 0.9);
        assert_eq!(t.negative_sentiment, -0.9);
        assert_eq!(t.max_bot_turns, 5);
        assert_eq!(t.max_queue_wait, Duration::from_secs(1800));
    }

    #[test]
    fn adjust_ignores_non_finite_proposals_and_disallowed_strategies() {
        let change = ThresholdChange {
            sentiment_drop: Some(f64::NAN),
            strategy: Some(Strategy::HumanFirst),
            ..ThresholdChange::default()
        };
        let next = default_scenario().adjust(&change);
        assert_eq!(next.thresholds.sentiment_drop, 0.8);
        assert_eq!(next.strategy, Strategy::BotFirst);
        let allowed = ThresholdChange {
            strategy: Some(Strategy::AgentAssist),
            ..change
        };
        assert_eq!(
            default_scenario().adjust(&allowed).strategy,
            Strategy::AgentAssist
        );
    }

    #[test]
    fn adjust_keeps_clarify_at_or_below_the_answer_threshold() {
        let change = ThresholdChange {
            min_intent_confidence: Some(0.5),
            clarify_confidence: Some(0.65),
            ..ThresholdChange::default()
        };
        let t = default_scenario().adjust(&change).thresholds;
        assert_eq!(t.clarify_confidence, 0.5);
    }

    #[test]
    fn inverted_bounds_clamp_without_panicking() {
        let b = Bounds::new(5, 1);
        assert_eq!(b.clamp(3), 5);
        assert_eq!(Bounds::new(0.0, 1.0).clamp(f64::NAN), 0.0);
    }

    /// Ordered bounds inside `lo..=hi`.
    fn float_bounds(lo: f64, hi: f64) -> impl Gen<Value = Bounds<f64>> {
        (lo..=hi, lo..=hi).prop_map(|(a, b)| Bounds::new(a.min(b), a.max(b)))
    }

    fn int_bounds(lo: u32, hi: u32) -> impl Gen<Value = Bounds<u32>> {
        (lo..=hi, lo..=hi).prop_map(|(a, b)| Bounds::new(a.min(b), a.max(b)))
    }

    fn any_guardrails() -> impl Gen<Value = Guardrails> {
        (
            (
                float_bounds(0.0, 1.0),
                float_bounds(0.0, 1.0),
                float_bounds(-1.0, 0.0),
            ),
            (float_bounds(0.0, 2.0), int_bounds(1, 10), int_bounds(0, 10)),
            (
                int_bounds(1, 100),
                float_bounds(0.0, 1.0),
                int_bounds(0, 3600),
            ),
        )
            .prop_map(
                |((conf, clarify, neg), (drop, window, fallbacks), (turns, cx, wait))| Guardrails {
                    min_intent_confidence: conf,
                    clarify_confidence: clarify,
                    negative_sentiment: neg,
                    sentiment_drop: drop,
                    sentiment_window_turns: window,
                    max_fallbacks: fallbacks,
                    max_bot_turns: turns,
                    max_complexity: cx,
                    max_queue_wait: Bounds::new(
                        Duration::from_secs(u64::from(wait.min)),
                        Duration::from_secs(u64::from(wait.max)),
                    ),
                    allowed_strategies: vec![Strategy::BotFirst],
                },
            )
    }

    fn any_change() -> impl Gen<Value = ThresholdChange> {
        let f = || proptest::option::of(any::<f64>());
        let n = || proptest::option::of(any::<u32>());
        (
            (f(), f(), f(), f(), f()),
            (n(), n(), n(), proptest::option::of(any::<u64>())),
        )
            .prop_map(
                |((conf, clarify, neg, drop, cx), (window, fallbacks, turns, wait))| {
                    ThresholdChange {
                        min_intent_confidence: conf,
                        clarify_confidence: clarify,
                        negative_sentiment: neg,
                        sentiment_drop: drop,
                        sentiment_window_turns: window,
                        max_fallbacks: fallbacks,
                        max_bot_turns: turns,
                        max_complexity: cx,
                        max_queue_wait: wait.map(Duration::from_secs),
                        strategy: None,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn adjusted_thresholds_stay_within_guardrails(
            guardrails in any_guardrails(),
            first in any_change(),
            second in any_change(),
        ) {
            // Start from arbitrary (possibly out-of-bounds) thresholds, then adjust.
            let start = Scenario { guardrails, ..default_scenario() }.adjust(&first);
            let g = &start.guardrails;
            for s in [&start, &start.adjust(&second)] {
                let t = &s.thresholds;
                prop_assert!(g.min_intent_confidence.contains(t.min_intent_confidence));
                prop_assert!(g.clarify_confidence.contains(t.clarify_confidence));
                prop_assert!(g.negative_sentiment.contains(t.negative_sentiment));
                prop_assert!(g.sentiment_drop.contains(t.sentiment_drop));
                prop_assert!(g.sentiment_window_turns.contains(t.sentiment_window_turns));
                prop_assert!(g.max_fallbacks.contains(t.max_fallbacks));
                prop_assert!(g.max_bot_turns.contains(t.max_bot_turns));
                prop_assert!(g.max_complexity.contains(t.max_complexity));
                prop_assert!(g.max_queue_wait.contains(t.max_queue_wait));
            }
        }
    }
}
