-- Handoffs cancelled and conversations closed in dialog, kept as long as the consumers' inbox
-- claims (the bus's maximum age plus a day). Replicas share dialog's durable consumer, so a
-- `HandoffRequested` can be handled after its own cancellation or its conversation's closing
-- (another replica, a retry); it is then refused instead of queueing a customer who left.
CREATE TABLE routing_ended (
    tenant   TEXT   NOT NULL,
    kind     TEXT   NOT NULL CHECK (kind IN ('handoff', 'conversation')),
    id       TEXT   NOT NULL,
    ended_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, kind, id)
);
CREATE INDEX routing_ended_at ON routing_ended (ended_at);
