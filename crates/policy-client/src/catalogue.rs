//! One tenant's scenarios, compiled for deciding.
//!
//! Resolution: the context's `scenario_id` when given; otherwise the scenario claiming the
//! context's intent with the highest `intent_priority`; otherwise the fallback. The fallback is
//! the tenant's own scenario with id [`DEFAULT_SCENARIO_ID`] when it has one, else the built-in
//! [`engine::default_scenario`]. The fallback's thresholds are also the tenant defaults that fill
//! unset thresholds of the other scenarios.
//!
//! Shadow mode: a scenario in `MODE_SHADOW` does not act. Its turns are decided live by the
//! fallback (with the scenario's routing target, since the conversation still belongs there),
//! and the scenario's own decision is returned in `Decision.shadow` for comparison.

use std::collections::HashMap;

use tandem_policy_engine as engine;
use tandem_proto::pb::common::v1 as common;
use tandem_proto::pb::policy::v1 as pb;

use crate::convert::{context_from_wire, decision_to_wire, explain, scenario_to_engine};

/// Identifier of the scenario that serves as the tenant's defaults and fallback.
pub const DEFAULT_SCENARIO_ID: &str = "default";

/// A compiled scenario: the wire form as stored and the engine form it decides with.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The scenario as stored.
    pub wire: pb::Scenario,
    /// The validated engine form, tenant defaults applied.
    pub engine: engine::Scenario,
}

/// Why a decision could not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CatalogueError {
    /// The context named a scenario the tenant does not have.
    #[error("scenario {0:?} not found")]
    UnknownScenario(String),
    /// The context is out of range.
    #[error("invalid decision context: {}", render(.0))]
    InvalidContext(Vec<common::ValidationError>),
}

fn render(errors: &[common::ValidationError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.path, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A decision and, for shadow scenarios, whether the shadow action differs from the live one.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    /// The wire decision.
    pub decision: pb::Decision,
    /// `Some` when the scenario is in shadow mode: whether the actions diverged.
    pub shadow_diverged: Option<bool>,
}

/// One tenant's compiled scenarios.
#[derive(Debug, Clone)]
pub struct Catalogue {
    entries: HashMap<String, Entry>,
    /// intent → (priority, scenario id), highest priority kept.
    by_intent: HashMap<String, (u32, String)>,
    fallback: Entry,
}

impl Default for Catalogue {
    fn default() -> Self {
        Self::build(Vec::new()).0
    }
}

impl Catalogue {
    /// Compiles scenarios. Stored scenarios were validated when written; any that no longer
    /// converts (e.g. after the tenant defaults changed) is left out and returned with its
    /// problems so the caller can log them.
    pub fn build(
        scenarios: impl IntoIterator<Item = pb::Scenario>,
    ) -> (Self, Vec<(String, Vec<common::ValidationError>)>) {
        let scenarios: Vec<pb::Scenario> = scenarios.into_iter().collect();
        let mut rejected = Vec::new();
        let builtin = engine::default_scenario();
        let fallback = match scenarios.iter().find(|s| s.id == DEFAULT_SCENARIO_ID) {
            Some(wire) => match scenario_to_engine(wire, &builtin.thresholds) {
                Ok(engine) => Entry {
                    wire: wire.clone(),
                    engine,
                },
                Err(errors) => {
                    rejected.push((wire.id.clone(), errors));
                    builtin_entry()
                }
            },
            None => builtin_entry(),
        };
        let defaults = fallback.engine.thresholds.clone();
        let mut entries = HashMap::with_capacity(scenarios.len());
        let mut by_intent: HashMap<String, (u32, String)> = HashMap::new();
        for wire in scenarios {
            let engine = if wire.id == DEFAULT_SCENARIO_ID {
                fallback.engine.clone()
            } else {
                match scenario_to_engine(&wire, &defaults) {
                    Ok(engine) => engine,
                    Err(errors) => {
                        rejected.push((wire.id.clone(), errors));
                        continue;
                    }
                }
            };
            for intent in &engine.intents {
                let claim = (engine.intent_priority, engine.id.clone());
                by_intent
                    .entry(intent.clone())
                    .and_modify(|current| {
                        // Highest priority wins; ties (rejected on write) go to the smaller id.
                        if claim.0 > current.0 || (claim.0 == current.0 && claim.1 < current.1) {
                            *current = claim.clone();
                        }
                    })
                    .or_insert(claim);
            }
            entries.insert(wire.id.clone(), Entry { wire, engine });
        }
        (
            Self {
                entries,
                by_intent,
                fallback,
            },
            rejected,
        )
    }

    /// Returns the tenant defaults used for unset thresholds.
    pub fn defaults(&self) -> &engine::Thresholds {
        &self.fallback.engine.thresholds
    }

    /// Returns a scenario by id.
    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Returns the number of scenarios.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Returns whether the tenant has no scenarios.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Resolves the scenario for a turn, as documented on this module.
    pub fn resolve(&self, scenario_id: &str, intent: &str) -> Result<&Entry, CatalogueError> {
        if !scenario_id.is_empty() {
            if scenario_id == DEFAULT_SCENARIO_ID {
                return Ok(&self.fallback);
            }
            return self
                .entries
                .get(scenario_id)
                .ok_or_else(|| CatalogueError::UnknownScenario(scenario_id.to_owned()));
        }
        Ok(self
            .by_intent
            .get(intent)
            .and_then(|(_, id)| self.entries.get(id))
            .unwrap_or(&self.fallback))
    }

    /// Decides one turn.
    pub fn decide(&self, ctx: &pb::DecisionContext) -> Result<Decided, CatalogueError> {
        let turn = context_from_wire(ctx).map_err(CatalogueError::InvalidContext)?;
        let entry = self.resolve(&ctx.scenario_id, &ctx.intent)?;
        Ok(self.decide_resolved(entry, &turn))
    }

    /// Decides one turn for an already resolved scenario and a converted context.
    pub fn decide_resolved(&self, entry: &Entry, turn: &engine::DecisionContext) -> Decided {
        let own = engine::decide(&entry.engine, turn);
        let routing = entry.wire.routing.as_ref();
        if entry.engine.mode != engine::Mode::Shadow {
            return Decided {
                decision: decision_to_wire(&own, turn, routing),
                shadow_diverged: None,
            };
        }
        let live = engine::decide(&self.fallback.engine, turn);
        let mut decision = decision_to_wire(&live, turn, routing);
        decision.scenario_id.clone_from(&entry.engine.id);
        decision.mode = pb::Mode::Shadow as i32;
        let shadow = decision_to_wire(&own, turn, routing);
        let diverged = shadow.action != decision.action;
        decision.shadow = Some(pb::ShadowDecision {
            policy_version: own.policy_version,
            strategy: shadow.strategy,
            action: shadow.action,
            handoff_reason: shadow.handoff_reason,
            rule_id: shadow.rule_id,
            thresholds: shadow.thresholds,
            explanation: explain(own.rule, turn, &own.thresholds_used),
        });
        Decided {
            decision,
            shadow_diverged: Some(diverged),
        }
    }
}

fn builtin_entry() -> Entry {
    let engine = engine::default_scenario();
    let wire = pb::Scenario {
        id: engine.id.clone(),
        tier: pb::Tier::Standard as i32,
        strategy: pb::Strategy::BotFirst as i32,
        mode: pb::Mode::Live as i32,
        thresholds: Some(crate::convert::thresholds_to_wire(&engine.thresholds)),
        routing: Some(pb::RoutingTarget {
            queue_id: engine.routing.queue_id.clone(),
            skills: Vec::new(),
            priority: i32::try_from(engine.routing.priority).unwrap_or(50),
        }),
        ..pb::Scenario::default()
    };
    Entry { wire, engine }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn scenario(id: &str, intents: &[&str], priority: i32, strategy: pb::Strategy) -> pb::Scenario {
        pb::Scenario {
            id: id.into(),
            intents: intents.iter().map(|s| (*s).to_owned()).collect(),
            intent_priority: priority,
            tier: pb::Tier::Standard as i32,
            strategy: strategy as i32,
            mode: pb::Mode::Live as i32,
            version: 3,
            routing: Some(pb::RoutingTarget {
                queue_id: format!("q-{id}"),
                ..pb::RoutingTarget::default()
            }),
            ..pb::Scenario::default()
        }
    }

    fn ctx(intent: &str, confidence: f64) -> pb::DecisionContext {
        pb::DecisionContext {
            intent: intent.into(),
            intent_confidence: confidence,
            ..pb::DecisionContext::default()
        }
    }

    #[test]
    fn resolves_by_intent_priority_then_falls_back() {
        let (cat, rejected) = Catalogue::build([
            scenario("refund", &["refund"], 10, pb::Strategy::BotFirst),
            scenario(
                "complaint",
                &["refund", "complain"],
                20,
                pb::Strategy::HumanFirst,
            ),
        ]);
        assert!(rejected.is_empty());
        assert_eq!(cat.resolve("", "refund").unwrap().wire.id, "complaint");
        assert_eq!(
            cat.resolve("", "other").unwrap().wire.id,
            DEFAULT_SCENARIO_ID
        );
        assert_eq!(
            cat.resolve("nope", "").unwrap_err(),
            CatalogueError::UnknownScenario("nope".into())
        );
        let d = cat.decide(&ctx("refund", 0.99)).unwrap().decision;
        assert_eq!(d.action, pb::DecisionAction::Handoff as i32);
        assert_eq!(d.rule_id, "human_first");
        assert_eq!(d.policy_version, 3);
        assert_eq!(d.routing.unwrap().queue_id, "q-complaint");
    }

    #[test]
    fn a_tenant_default_scenario_supplies_defaults() {
        let mut default = scenario(
            DEFAULT_SCENARIO_ID,
            &["chitchat"],
            0,
            pb::Strategy::BotFirst,
        );
        default.thresholds = Some(pb::Thresholds {
            min_intent_confidence: Some(0.8),
            ..pb::Thresholds::default()
        });
        let (cat, rejected) = Catalogue::build([
            default,
            scenario("refund", &["refund"], 10, pb::Strategy::BotFirst),
        ]);
        assert!(rejected.is_empty(), "{rejected:?}");
        assert!((cat.defaults().min_intent_confidence - 0.8).abs() < 1e-12);
        let d = cat.decide(&ctx("refund", 0.7)).unwrap().decision;
        assert_eq!(d.action, pb::DecisionAction::Clarify as i32);
    }

    #[test]
    fn shadow_scenarios_act_like_the_fallback_and_report_their_own_decision() {
        let mut s = scenario("claims", &["claim"], 10, pb::Strategy::HumanFirst);
        s.mode = pb::Mode::Shadow as i32;
        let (cat, _) = Catalogue::build([s]);
        let decided = cat.decide(&ctx("claim", 0.95)).unwrap();
        assert_eq!(
            decided.decision.action,
            pb::DecisionAction::BotAnswer as i32
        );
        assert_eq!(decided.decision.mode, pb::Mode::Shadow as i32);
        assert_eq!(decided.decision.scenario_id, "claims");
        let shadow = decided.decision.shadow.unwrap();
        assert_eq!(shadow.action, pb::DecisionAction::Handoff as i32);
        assert_eq!(decided.shadow_diverged, Some(true));
    }

    #[test]
    fn invalid_context_is_rejected() {
        let (cat, _) = Catalogue::build([]);
        assert!(matches!(
            cat.decide(&ctx("x", 2.0)),
            Err(CatalogueError::InvalidContext(_))
        ));
    }
}
