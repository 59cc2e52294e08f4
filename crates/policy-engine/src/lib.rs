//! Tandem's scenario-policy engine: the pure rules that decide, for one turn, whether the bot
//! answers, clarifies, falls back, hands off or offers to leave a message.
//!
//! The policy service evaluates it for `Decide` RPCs and shadow decisions; dialog evaluates it
//! locally from cached policies, so both always agree on the same inputs.
//!
//! Modules:
//! - `model`: domain types ([`Scenario`], [`Thresholds`], [`Guardrails`], [`DecisionContext`],
//!   [`Decision`], …), [`Scenario::adjust`] and [`Scenario::clamp_to_guardrails`] for guardrailed
//!   automatic adjustment, and [`default_scenario`] for when no policy is reachable.
//! - `validate`: [`Scenario::validate`] and [`validate_catalogue`], reporting every
//!   [`PolicyViolation`] with its field path.
//! - `decide`: [`decide`]; its rule order is documented at the top of `src/decide.rs`.
//!
//! Boundaries: no I/O, clock, environment, async runtime or generated protobuf types. Conversions
//! from and to the wire model (`tandem.policy.v1`) live in the adapters of the crates that use
//! this one; versioning, pinning and persistence of adjustments belong to the policy service.

mod decide;
mod model;
mod validate;

pub use decide::decide;
pub use model::{
    Action, Bounds, Decision, DecisionContext, Guardrails, HandoffReason, Mode, RoutingTarget,
    RuleId, Scenario, Strategy, ThresholdChange, Thresholds, Tier, default_scenario,
};
pub use validate::{PolicyViolation, validate_catalogue};
