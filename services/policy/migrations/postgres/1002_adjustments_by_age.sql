-- Adjustment records are deleted by age across tenants (the `adjustment_retention` setting).
CREATE INDEX policy_adjustments_age ON policy_adjustments (created_at);
