-- The transactional outbox: rows written in the same transaction as the state change they
-- describe, published by the relay in sequence order.
CREATE TABLE IF NOT EXISTS tandem_outbox (
    seq          BIGSERIAL PRIMARY KEY,
    event_id     TEXT        NOT NULL UNIQUE,
    subject      TEXT        NOT NULL,
    type_name    TEXT        NOT NULL,
    tenant       TEXT        NOT NULL,
    ordering_key TEXT,
    occurred_at  TIMESTAMPTZ NOT NULL,
    headers      TEXT        NOT NULL,
    payload      BYTEA       NOT NULL,
    published_at TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS tandem_outbox_unpublished ON tandem_outbox (seq) WHERE published_at IS NULL;

-- The consumer inbox: one row per (consumer, event) handled, written in the same transaction
-- as the effect, so a redelivered event is recognised and skipped.
CREATE TABLE IF NOT EXISTS tandem_inbox (
    consumer     TEXT        NOT NULL,
    event_id     TEXT        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX IF NOT EXISTS tandem_inbox_processed_at ON tandem_inbox (processed_at);
