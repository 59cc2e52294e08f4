-- The position and ETA last published for a waiting ticket (HandoffQueued or
-- HandoffPositionUpdated) and when, so a change is published once per interval per ticket and
-- replicas do not publish the same change twice.
ALTER TABLE routing_tickets ADD COLUMN reported_position BIGINT;
ALTER TABLE routing_tickets ADD COLUMN reported_eta BIGINT;
ALTER TABLE routing_tickets ADD COLUMN position_reported_at BIGINT;
