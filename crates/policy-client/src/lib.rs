//! Scenario policies where they are evaluated: the policy service answers `Decide` with it, and
//! dialog evaluates cached policies with it so a conversation never waits on the policy service.
//!
//! - `convert`: the wire model (`tandem.policy.v1`) to the pure engine model and back, with
//!   every validation problem reported with its field path.
//! - `catalogue`: one tenant's scenarios, compiled once: scenario resolution by id or intent,
//!   tenant defaults, shadow mode, and the wire [`Decision`](tandem_proto::pb::policy::v1::Decision).
//!
//! No I/O here: callers load scenarios (from the database, an RPC or an event) and build a
//! [`Catalogue`] from them.

mod catalogue;
mod convert;

pub use catalogue::{Catalogue, CatalogueError, DEFAULT_SCENARIO_ID, Decided, Entry};
pub use convert::{
    context_from_wire, decision_to_wire, explain, prefix_errors, scenario_to_engine,
    strategy_from_wire, strategy_to_wire, thresholds_to_wire, violation,
};
