-- When an adjustment rule's signal was found silent for its `silence_timeout` while the revert
-- then due could not be applied (a pinned scenario, or a revert that would not validate): the
-- block is recorded once, and the revert retried by every sweep until it applies or the signal
-- reports again.
ALTER TABLE policy_rule_states ADD COLUMN silence_blocked_at BIGINT;
