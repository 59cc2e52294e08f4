-- The transactional outbox (see the PostgreSQL migration for the contract).
CREATE TABLE IF NOT EXISTS tandem_outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT    NOT NULL UNIQUE,
    subject      TEXT    NOT NULL,
    type_name    TEXT    NOT NULL,
    tenant       TEXT    NOT NULL,
    ordering_key TEXT,
    occurred_at  TEXT    NOT NULL,
    headers      TEXT    NOT NULL,
    payload      BLOB    NOT NULL,
    published_at TEXT
);
CREATE INDEX IF NOT EXISTS tandem_outbox_unpublished ON tandem_outbox (seq) WHERE published_at IS NULL;

CREATE TABLE IF NOT EXISTS tandem_inbox (
    consumer     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    processed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX IF NOT EXISTS tandem_inbox_processed_at ON tandem_inbox (processed_at);
