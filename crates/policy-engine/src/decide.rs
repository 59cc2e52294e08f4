//! The per-turn decision function: a fixed, documented order of rules over one scenario and one
//! turn's context. Pure and deterministic, so the policy service and dialog (from a cached policy)
//! always agree.
//!
//! Rule order; the first that fires decides:
//! 1. `agent_owns_conversation` → [`Action::AgentAssist`] (the bot only suggests).
//! 2. `explicit_request` — the customer asked for a human.
//! 3. `sensitive_topic` — a topic the bot must not handle.
//!
//!    Under [`Strategy::BotOnly`] rules 4–9 are skipped: a bot-only scenario never hands off on a
//!    threshold, and a need from rules 2–3 becomes [`Action::LeaveMessage`].
//! 4. `human_first` — the strategy is [`Strategy::HumanFirst`].
//! 5. `negative_sentiment` — sentiment at or below the threshold.
//! 6. `sentiment_drop` — drop at or above the threshold (a swing, not a level).
//! 7. `max_fallbacks` — more consecutive fallbacks than tolerated.
//! 8. `max_complexity` — complexity above the maximum.
//! 9. `max_bot_turns` — bot turns at or above the maximum (reported as
//!    [`HandoffReason::Complexity`]; the wire has no dedicated reason).
//! 10. `clarify_confidence` — confidence below the minimum but within the clarify band → Clarify.
//! 11. `min_intent_confidence` — confidence below the clarify band → a low-confidence handoff, or
//!     [`Action::Fallback`] under [`Strategy::BotOnly`].
//! 12. `answer` — otherwise the bot answers.
//!
//! Every handoff then passes the availability check, in order: bot-only → `bot_only_no_agent`;
//! outside business hours (known to be closed) → `outside_business_hours`; a non-urgent reason
//! (anything but an explicit request or a sensitive topic) for a non-VIP customer whose queue ETA
//! exceeds `max_queue_wait` → `max_queue_wait`. Each turns the handoff into
//! [`Action::LeaveMessage`] with the same reason, and the decision's rule names the check.
//! `AgentAssist` decides exactly like `BotFirst`; the decision's strategy tells the caller to
//! keep suggesting replies to the agent after the handoff. Unordered inputs (NaN) never fire a
//! threshold, and a NaN confidence counts as below every band.

use crate::model::{Action, Decision, DecisionContext, HandoffReason, RuleId, Scenario, Strategy};

/// Returns the decision for one turn of a conversation in `scenario`.
pub fn decide(scenario: &Scenario, ctx: &DecisionContext) -> Decision {
    let (action, rule) = choose_action(scenario, ctx);
    Decision {
        scenario_id: scenario.id.clone(),
        policy_version: scenario.version,
        tier: scenario.tier,
        strategy: scenario.strategy,
        mode: scenario.mode,
        action,
        rule,
        thresholds_used: scenario.thresholds.clone(),
    }
}

/// Applies the rule order documented on this module.
fn choose_action(scenario: &Scenario, ctx: &DecisionContext) -> (Action, RuleId) {
    if ctx.agent_owns_conversation {
        return (Action::AgentAssist, RuleId::AgentOwnsConversation);
    }
    if let Some((reason, rule)) = find_handoff_trigger(scenario, ctx) {
        return route_handoff(scenario, ctx, reason, rule);
    }
    let t = &scenario.thresholds;
    if ctx.intent_confidence >= t.min_intent_confidence {
        (Action::Answer, RuleId::Answer)
    } else if ctx.intent_confidence >= t.clarify_confidence {
        (Action::Clarify, RuleId::ClarifyConfidence)
    } else if scenario.strategy == Strategy::BotOnly {
        (Action::Fallback, RuleId::MinIntentConfidence)
    } else {
        route_handoff(
            scenario,
            ctx,
            HandoffReason::LowConfidence,
            RuleId::MinIntentConfidence,
        )
    }
}

/// Returns the first handoff rule that fires (rules 2–9), if any.
fn find_handoff_trigger(
    scenario: &Scenario,
    ctx: &DecisionContext,
) -> Option<(HandoffReason, RuleId)> {
    if ctx.human_requested {
        return Some((HandoffReason::ExplicitRequest, RuleId::ExplicitRequest));
    }
    if ctx.sensitive_topic {
        return Some((HandoffReason::SensitiveTopic, RuleId::SensitiveTopic));
    }
    if scenario.strategy == Strategy::BotOnly {
        return None;
    }
    let t = &scenario.thresholds;
    if scenario.strategy == Strategy::HumanFirst {
        Some((HandoffReason::PolicyHumanFirst, RuleId::HumanFirst))
    } else if ctx.sentiment <= t.negative_sentiment {
        Some((HandoffReason::NegativeEmotion, RuleId::NegativeSentiment))
    } else if ctx.sentiment_drop >= t.sentiment_drop {
        Some((HandoffReason::EmotionSwing, RuleId::SentimentDrop))
    } else if ctx.fallbacks > t.max_fallbacks {
        Some((HandoffReason::RepeatedFallback, RuleId::MaxFallbacks))
    } else if ctx.complexity > t.max_complexity {
        Some((HandoffReason::Complexity, RuleId::MaxComplexity))
    } else if ctx.bot_turns >= t.max_bot_turns {
        Some((HandoffReason::Complexity, RuleId::MaxBotTurns))
    } else {
        None
    }
}

/// Returns a handoff, or an offer to leave a message when no human is available.
fn route_handoff(
    scenario: &Scenario,
    ctx: &DecisionContext,
    reason: HandoffReason,
    rule: RuleId,
) -> (Action, RuleId) {
    let urgent = matches!(
        reason,
        HandoffReason::ExplicitRequest | HandoffReason::SensitiveTopic
    );
    let queue_too_long = ctx
        .queue_eta_seconds
        .is_some_and(|eta| u64::from(eta) > scenario.thresholds.max_queue_wait.as_secs());
    if scenario.strategy == Strategy::BotOnly {
        (Action::LeaveMessage(reason), RuleId::BotOnlyNoAgent)
    } else if ctx.within_business_hours == Some(false) {
        (Action::LeaveMessage(reason), RuleId::OutsideBusinessHours)
    } else if !urgent && !ctx.customer_vip && queue_too_long {
        (Action::LeaveMessage(reason), RuleId::MaxQueueWait)
    } else {
        (Action::Handoff(reason), rule)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::{
        Just, any, prop_assert, prop_assert_eq, prop_assume, prop_oneof, proptest,
    };
    use proptest::strategy::Strategy as Gen;

    use super::*;
    use crate::model::{Mode, Thresholds, Tier, default_scenario};

    fn scenario(strategy: Strategy) -> Scenario {
        Scenario {
            id: "refund".to_owned(),
            strategy,
            version: 7,
            ..default_scenario()
        }
    }

    /// A calm, confident turn on which no rule fires.
    fn calm_turn() -> DecisionContext {
        DecisionContext {
            intent: "refund_status".to_owned(),
            intent_confidence: 0.9,
            sentiment: 0.2,
            sentiment_drop: 0.0,
            complexity: 0.1,
            fallbacks: 0,
            bot_turns: 1,
            customer_vip: false,
            queue_eta_seconds: None,
            within_business_hours: None,
            human_requested: false,
            sensitive_topic: false,
            agent_owns_conversation: false,
        }
    }

    fn decide_bot_first(ctx: &DecisionContext) -> (Action, RuleId) {
        let decision = decide(&scenario(Strategy::BotFirst), ctx);
        (decision.action, decision.rule)
    }

    #[test]
    fn answers_when_no_rule_fires() {
        assert_eq!(
            decide_bot_first(&calm_turn()),
            (Action::Answer, RuleId::Answer)
        );
    }

    #[test]
    fn decision_echoes_scenario_and_thresholds() {
        let s = scenario(Strategy::AgentAssist);
        let d = decide(&s, &calm_turn());
        assert_eq!(d.scenario_id, "refund");
        assert_eq!(d.policy_version, 7);
        assert_eq!(d.tier, Tier::Standard);
        assert_eq!(d.strategy, Strategy::AgentAssist);
        assert_eq!(d.mode, Mode::Live);
        assert_eq!(d.thresholds_used, s.thresholds);
        assert_eq!(d.rule.as_str(), "answer");
    }

    #[test]
    fn agent_owning_the_conversation_makes_the_bot_only_suggest() {
        let ctx = DecisionContext {
            agent_owns_conversation: true,
            human_requested: true,
            ..calm_turn()
        };
        assert_eq!(
            decide_bot_first(&ctx),
            (Action::AgentAssist, RuleId::AgentOwnsConversation)
        );
    }

    #[test]
    fn explicit_request_wins_over_sensitive_topic() {
        let ctx = DecisionContext {
            human_requested: true,
            sensitive_topic: true,
            ..calm_turn()
        };
        assert_eq!(
            decide_bot_first(&ctx),
            (
                Action::Handoff(HandoffReason::ExplicitRequest),
                RuleId::ExplicitRequest
            )
        );
    }

    #[test]
    fn sensitive_topic_hands_off_even_when_confident() {
        let ctx = DecisionContext {
            sensitive_topic: true,
            ..calm_turn()
        };
        assert_eq!(
            decide_bot_first(&ctx),
            (
                Action::Handoff(HandoffReason::SensitiveTopic),
                RuleId::SensitiveTopic
            )
        );
    }

    #[test]
    fn human_first_hands_off_at_once() {
        let d = decide(&scenario(Strategy::HumanFirst), &calm_turn());
        assert_eq!(d.action, Action::Handoff(HandoffReason::PolicyHumanFirst));
        assert_eq!(d.rule, RuleId::HumanFirst);
    }

    #[test]
    fn negative_sentiment_fires_at_the_threshold() {
        let ctx = DecisionContext {
            sentiment: -0.6,
            ..calm_turn()
        };
        assert_eq!(
            decide_bot_first(&ctx),
            (
                Action::Handoff(HandoffReason::NegativeEmotion),
                RuleId::NegativeSentiment
            )
        );
        let ctx = DecisionContext {
            sentiment: -0.59,
            ..calm_turn()
        };
        assert_eq!(decide_bot_first(&ctx).0, Action::Answer);
    }

    #[test]
    fn sentiment_drop_fires_as_a_swing() {
        let ctx = DecisionContext {
            sentiment: 0.0,
            sentiment_drop: 0.8,
            ..calm_turn()
        };
        assert_eq!(
            decide_bot_first(&ctx),
            (
                Action::Handoff(HandoffReason::EmotionSwing),
                RuleId::SentimentDrop
            )
        );
    }

    #[test]
    fn fallbacks_hand_off_only_beyond_the_tolerance() {
        let at_limit = DecisionContext {
            fallbacks: 2,
            ..calm_turn()
        };
        assert_eq!(decide_bot_first(&at_limit).0, Action::Answer);
        let beyond = DecisionContext {
            fallbacks: 3,
            ..calm_turn()
        };
        assert_eq!(
            decide_bot_first(&beyond),
            (
                Action::Handoff(HandoffReason::RepeatedFallback),
                RuleId::MaxFallbacks
            )
        );
    }

    #[test]
    fn complexity_above_maximum_hands_off() {
        let ctx = DecisionContext {
            complexity: 0.81,
            ..calm_turn()
        };
        assert_eq!(
            decide_bot_first(&ctx),
            (
                Action::Handoff(HandoffReason::Complexity),
                RuleId::MaxComplexity
            )
        );
    }

    #[test]
    fn too_many_bot_turns_hand_off_as_complexity() {
        let ctx = DecisionContext {
            bot_turns: 20,
            ..calm_turn()
        };
        assert_eq!(
            decide_bot_first(&ctx),
            (
                Action::Handoff(HandoffReason::Complexity),
                RuleId::MaxBotTurns
            )
        );
    }

    #[test]
    fn confidence_in_the_clarify_band_clarifies() {
        let ctx = DecisionContext {
            intent_confidence: 0.4,
            ..calm_turn()
        };
        assert_eq!(
            decide_bot_first(&ctx),
            (Action::Clarify, RuleId::ClarifyConfidence)
        );
    }

    #[test]
    fn confidence_below_the_clarify_band_hands_off_or_falls_back() {
        let ctx = DecisionContext {
            intent_confidence: 0.1,
            ..calm_turn()
        };
        assert_eq!(
            decide_bot_first(&ctx),
            (
                Action::Handoff(HandoffReason::LowConfidence),
                RuleId::MinIntentConfidence
            )
        );
        let d = decide(&scenario(Strategy::BotOnly), &ctx);
        assert_eq!(
            (d.action, d.rule),
            (Action::Fallback, RuleId::MinIntentConfidence)
        );
    }

    #[test]
    fn nan_confidence_counts_as_low() {
        let ctx = DecisionContext {
            intent_confidence: f64::NAN,
            ..calm_turn()
        };
        assert_eq!(
            decide_bot_first(&ctx).0,
            Action::Handoff(HandoffReason::LowConfidence)
        );
    }

    #[test]
    fn bot_only_offers_a_message_for_an_explicit_request() {
        let ctx = DecisionContext {
            human_requested: true,
            ..calm_turn()
        };
        let d = decide(&scenario(Strategy::BotOnly), &ctx);
        assert_eq!(
            d.action,
            Action::LeaveMessage(HandoffReason::ExplicitRequest)
        );
        assert_eq!(d.rule, RuleId::BotOnlyNoAgent);
    }

    #[test]
    fn bot_only_ignores_threshold_handoffs() {
        let ctx = DecisionContext {
            sentiment: -1.0,
            fallbacks: 9,
            complexity: 1.0,
            ..calm_turn()
        };
        assert_eq!(
            decide(&scenario(Strategy::BotOnly), &ctx).action,
            Action::Answer
        );
    }

    #[test]
    fn agent_assist_decides_like_bot_first() {
        let ctx = DecisionContext {
            sentiment: -0.9,
            ..calm_turn()
        };
        let assist = decide(&scenario(Strategy::AgentAssist), &ctx);
        let first = decide(&scenario(Strategy::BotFirst), &ctx);
        assert_eq!((assist.action, assist.rule), (first.action, first.rule));
    }

    #[test]
    fn outside_business_hours_a_handoff_becomes_a_message() {
        let ctx = DecisionContext {
            human_requested: true,
            within_business_hours: Some(false),
            ..calm_turn()
        };
        assert_eq!(
            decide_bot_first(&ctx),
            (
                Action::LeaveMessage(HandoffReason::ExplicitRequest),
                RuleId::OutsideBusinessHours
            )
        );
    }

    #[test]
    fn long_queue_turns_only_non_urgent_handoffs_into_messages() {
        let long_queue = DecisionContext {
            queue_eta_seconds: Some(301),
            ..calm_turn()
        };
        let swing = DecisionContext {
            sentiment_drop: 1.0,
            ..long_queue.clone()
        };
        assert_eq!(
            decide_bot_first(&swing),
            (
                Action::LeaveMessage(HandoffReason::EmotionSwing),
                RuleId::MaxQueueWait
            )
        );
        let vip = DecisionContext {
            customer_vip: true,
            ..swing.clone()
        };
        assert_eq!(
            decide_bot_first(&vip).0,
            Action::Handoff(HandoffReason::EmotionSwing)
        );
        let asked = DecisionContext {
            human_requested: true,
            ..long_queue
        };
        assert_eq!(
            decide_bot_first(&asked).0,
            Action::Handoff(HandoffReason::ExplicitRequest)
        );
        let short = DecisionContext {
            queue_eta_seconds: Some(300),
            ..swing
        };
        assert_eq!(
            decide_bot_first(&short).0,
            Action::Handoff(HandoffReason::EmotionSwing)
        );
    }

    fn any_strategy() -> impl Gen<Value = Strategy> {
        prop_oneof![
            Just(Strategy::BotOnly),
            Just(Strategy::BotFirst),
            Just(Strategy::AgentAssist),
            Just(Strategy::HumanFirst),
        ]
    }

    fn any_scenario() -> impl Gen<Value = Scenario> {
        (
            any_strategy(),
            (0.0..=1.0f64, 0.0..=1.0f64, -1.0..=0.0f64, 0.0..=2.0f64),
            (0u32..=10, 1u32..=100, 0.0..=1.0f64, 0u64..=3600),
        )
            .prop_map(
                |(strategy, (a, b, neg, drop), (fallbacks, turns, complexity, wait))| Scenario {
                    strategy,
                    thresholds: Thresholds {
                        min_intent_confidence: a.max(b),
                        clarify_confidence: a.min(b),
                        negative_sentiment: neg,
                        sentiment_drop: drop,
                        sentiment_window_turns: 3,
                        max_fallbacks: fallbacks,
                        max_bot_turns: turns,
                        max_complexity: complexity,
                        max_queue_wait: std::time::Duration::from_secs(wait),
                    },
                    ..default_scenario()
                },
            )
    }

    fn any_turn() -> impl Gen<Value = DecisionContext> {
        (
            (
                prop_oneof![9 => -0.5..=1.5f64, 1 => Just(f64::NAN)],
                -1.0..=1.0f64,
                0.0..=2.0f64,
            ),
            (0.0..=1.0f64, 0u32..=20, 0u32..=200, any::<bool>()),
            (
                proptest::option::of(0u32..=7200),
                proptest::option::of(any::<bool>()),
            ),
            (any::<bool>(), any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |(
                    (confidence, sentiment, drop),
                    (complexity, fallbacks, bot_turns, vip),
                    (eta, hours),
                    (asked, sensitive, agent_owns),
                )| DecisionContext {
                    intent: "any".to_owned(),
                    intent_confidence: confidence,
                    sentiment,
                    sentiment_drop: drop,
                    complexity,
                    fallbacks,
                    bot_turns,
                    customer_vip: vip,
                    queue_eta_seconds: eta,
                    within_business_hours: hours,
                    human_requested: asked,
                    sensitive_topic: sensitive,
                    agent_owns_conversation: agent_owns,
                },
            )
    }

    proptest! {
        #[test]
        fn decide_is_deterministic(s in any_scenario(), ctx in any_turn()) {
            prop_assert_eq!(decide(&s, &ctx), decide(&s, &ctx));
        }

        #[test]
        fn bot_only_never_hands_off(s in any_scenario(), ctx in any_turn()) {
            let s = Scenario { strategy: Strategy::BotOnly, ..s };
            prop_assert!(!matches!(decide(&s, &ctx).action, Action::Handoff(_)));
        }

        #[test]
        fn explicit_request_in_hours_always_hands_off(s in any_scenario(), ctx in any_turn()) {
            prop_assume!(s.strategy != Strategy::BotOnly);
            let ctx = DecisionContext {
                human_requested: true,
                agent_owns_conversation: false,
                within_business_hours: Some(true),
                ..ctx
            };
            let d = decide(&s, &ctx);
            prop_assert_eq!(d.action, Action::Handoff(HandoffReason::ExplicitRequest));
            prop_assert_eq!(d.rule, RuleId::ExplicitRequest);
        }

        #[test]
        fn outside_business_hours_never_hands_off(s in any_scenario(), ctx in any_turn()) {
            let ctx = DecisionContext { within_business_hours: Some(false), ..ctx };
            prop_assert!(!matches!(decide(&s, &ctx).action, Action::Handoff(_)));
        }
    }
}
