-- The value an adjustment rule last wrote in its current episode, so a revert leaves alone a
-- value changed since by a person or another rule.
ALTER TABLE policy_rule_states ADD COLUMN applied TEXT;
