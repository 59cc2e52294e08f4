//! Adjustment rules shared by the policy tests.

use tandem_proto::pb::policy::v1 as pb;

/// A live rule on `scenario_id` that applies `effect` once `signal` is below 0.7 over the last
/// `window_seconds` (one sample is enough, no cooldown) and reverts it on recovery.
pub fn live_rule_below_0_7(
    scenario_id: &str,
    signal: pb::AdjustmentSignal,
    window_seconds: i64,
    effect: pb::adjustment_rule::Effect,
) -> pb::AdjustmentRule {
    pb::AdjustmentRule {
        scenario_id: scenario_id.into(),
        signal: signal as i32,
        comparison: pb::Comparison::Below as i32,
        threshold: 0.7,
        window: Some(prost_types::Duration {
            seconds: window_seconds,
            nanos: 0,
        }),
        min_samples: 1,
        cooldown: Some(prost_types::Duration::default()),
        revert_when_recovered: true,
        enabled: true,
        mode: pb::Mode::Live as i32,
        effect: Some(effect),
        ..pb::AdjustmentRule::default()
    }
}
