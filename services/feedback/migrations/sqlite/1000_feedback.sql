-- The feedback service's tables (see the PostgreSQL migration for the commentary). Times are
-- microseconds since the Unix epoch (UTC).

-- One row per conversation, projected from dialog and routing events. `state` holds the merge
-- registers (value and observation time of every column) in JSON; the other columns are derived
-- from it on every write, for queries and for people reading the table.
CREATE TABLE fb_conversation (
    tenant               TEXT    NOT NULL,
    conversation_id      TEXT    NOT NULL,
    customer_id          TEXT    NOT NULL DEFAULT '',
    scenario_id          TEXT    NOT NULL DEFAULT '',
    intent               TEXT    NOT NULL DEFAULT '',
    channel              INTEGER NOT NULL DEFAULT 0,
    language             INTEGER NOT NULL DEFAULT 0,
    handler              INTEGER NOT NULL DEFAULT 0,
    agent_id             TEXT    NOT NULL DEFAULT '',
    team                 TEXT    NOT NULL DEFAULT '',
    handoff_reason       INTEGER NOT NULL DEFAULT 0,
    bucket_at            INTEGER,
    started_at           INTEGER,
    handoff_requested_at INTEGER,
    first_assigned_at    INTEGER,
    resolved_at          INTEGER,
    closed_at            INTEGER,
    outcome              TEXT    NOT NULL DEFAULT '',
    eligible             INTEGER NOT NULL DEFAULT 0    ,
    contained            INTEGER NOT NULL DEFAULT 0    ,
    handed_off           INTEGER NOT NULL DEFAULT 0    ,
    reopened             INTEGER NOT NULL DEFAULT 0    ,
    followed_up          INTEGER NOT NULL DEFAULT 0    ,
    test                 INTEGER NOT NULL DEFAULT 0    ,
    proactive            INTEGER NOT NULL DEFAULT 0    ,
    state                TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, conversation_id)
);
CREATE INDEX fb_conversation_customer ON fb_conversation (tenant, customer_id) WHERE customer_id <> '';
CREATE INDEX fb_conversation_bucket ON fb_conversation (tenant, bucket_at);

-- One row per handoff, with the four clocks in microseconds.
CREATE TABLE fb_handoff (
    tenant                TEXT    NOT NULL,
    handoff_id            TEXT    NOT NULL,
    conversation_id       TEXT    NOT NULL,
    scenario_id           TEXT    NOT NULL DEFAULT '',
    language              INTEGER NOT NULL DEFAULT 0,
    reason                INTEGER NOT NULL DEFAULT 0,
    agent_id              TEXT    NOT NULL DEFAULT '',
    team                  TEXT    NOT NULL DEFAULT '',
    bucket_at             INTEGER,
    requested_at          INTEGER,
    trigger_received_at   INTEGER,
    queued_at             INTEGER,
    first_offered_at      INTEGER,
    accepted_offer_at     INTEGER,
    assigned_at           INTEGER,
    first_agent_reply_at  INTEGER,
    system_latency_us     INTEGER,
    queue_wait_us         INTEGER,
    agent_accept_us       INTEGER,
    first_human_reply_us  INTEGER,
    handle_time_us        INTEGER,
    summary               TEXT    NOT NULL DEFAULT '',
    intents               TEXT    NOT NULL DEFAULT '',
    test                  INTEGER NOT NULL DEFAULT 0    ,
    state                 TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, handoff_id)
);
CREATE INDEX fb_handoff_conversation ON fb_handoff (tenant, conversation_id);
CREATE INDEX fb_handoff_bucket ON fb_handoff (tenant, bucket_at);

-- One row per bot suggestion shown to an agent, with the agent's review.
CREATE TABLE fb_suggestion (
    tenant          TEXT    NOT NULL,
    suggestion_id   TEXT    NOT NULL,
    conversation_id TEXT    NOT NULL,
    scenario_id     TEXT    NOT NULL DEFAULT '',
    agent_id        TEXT    NOT NULL DEFAULT '',
    created_at      INTEGER,
    outcome         INTEGER NOT NULL DEFAULT 0,
    reviewed_at     INTEGER,
    test            INTEGER NOT NULL DEFAULT 0    ,
    state           TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (tenant, suggestion_id)
);
CREATE INDEX fb_suggestion_conversation ON fb_suggestion (tenant, conversation_id);

-- Customer feedback, idempotent on the client's id.
CREATE TABLE fb_feedback (
    tenant             TEXT    NOT NULL,
    id                 TEXT    NOT NULL,
    client_feedback_id TEXT    NOT NULL,
    conversation_id    TEXT    NOT NULL DEFAULT '',
    channel            INTEGER NOT NULL,
    subject            INTEGER NOT NULL,
    kind               TEXT    NOT NULL,
    score              INTEGER NOT NULL,
    comment            TEXT    NOT NULL DEFAULT '',
    language_given     INTEGER NOT NULL DEFAULT 0,
    language           INTEGER NOT NULL DEFAULT 0,
    question_id        TEXT    NOT NULL DEFAULT '',
    submitted_at       INTEGER,
    received_at        INTEGER NOT NULL,
    at                 INTEGER NOT NULL,
    negative           INTEGER NOT NULL DEFAULT 0    ,
    PRIMARY KEY (tenant, id),
    UNIQUE (tenant, client_feedback_id)
);
CREATE INDEX fb_feedback_conversation ON fb_feedback (tenant, conversation_id) WHERE conversation_id <> '';
CREATE INDEX fb_feedback_at ON fb_feedback (tenant, at);

-- Agents' reviews of bot answers and suggestions.
CREATE TABLE fb_agent_review (
    tenant           TEXT   NOT NULL,
    id               TEXT   NOT NULL,
    agent_id         TEXT   NOT NULL,
    conversation_id  TEXT   NOT NULL DEFAULT '',
    message_id       TEXT   NOT NULL DEFAULT '',
    suggestion_id    TEXT   NOT NULL DEFAULT '',
    verdict          INTEGERNOT NULL,
    comment          TEXT   NOT NULL DEFAULT '',
    corrected_answer TEXT   NOT NULL DEFAULT '',
    scenario_id      TEXT   NOT NULL DEFAULT '',
    created_at       INTEGERNOT NULL,
    PRIMARY KEY (tenant, id)
);

-- Rollups: sums per grain (1 = hour, 2 = day), bucket and combination of dimensions.
CREATE TABLE fb_rollup (
    tenant   TEXT   NOT NULL,
    grain    INTEGERNOT NULL,
    metric   INTEGERNOT NULL,
    bucket   INTEGERNOT NULL,
    scenario TEXT   NOT NULL,
    intent   TEXT   NOT NULL,
    channel  INTEGERNOT NULL,
    handler  INTEGERNOT NULL,
    agent    TEXT   NOT NULL,
    team     TEXT   NOT NULL,
    reason   INTEGERNOT NULL,
    language INTEGERNOT NULL,
    num      INTEGERNOT NULL DEFAULT 0,
    den      INTEGERNOT NULL DEFAULT 0,
    cnt      INTEGERNOT NULL DEFAULT 0,
    total    INTEGERNOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, grain, metric, bucket, scenario, intent, channel, handler, agent, team, reason, language)
);

-- Duration histograms of the rollups: observations per cell (16 cells per doubling).
CREATE TABLE fb_rollup_hist (
    tenant   TEXT   NOT NULL,
    grain    INTEGERNOT NULL,
    metric   INTEGERNOT NULL,
    bucket   INTEGERNOT NULL,
    scenario TEXT   NOT NULL,
    intent   TEXT   NOT NULL,
    channel  INTEGERNOT NULL,
    handler  INTEGERNOT NULL,
    agent    TEXT   NOT NULL,
    team     TEXT   NOT NULL,
    reason   INTEGERNOT NULL,
    language INTEGERNOT NULL,
    cell     INTEGERNOT NULL,
    cnt      INTEGERNOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, grain, metric, bucket, scenario, intent, channel, handler, agent, team, reason, language, cell)
);

CREATE TABLE fb_alert_rule (
    tenant             TEXT             NOT NULL,
    id                 TEXT             NOT NULL,
    name               TEXT             NOT NULL,
    kind               INTEGER          NOT NULL,
    scenario_id        TEXT             NOT NULL DEFAULT '',
    metric             INTEGER          NOT NULL,
    cond               INTEGER          NOT NULL,
    threshold          REAL             NOT NULL,
    window_us          INTEGER          NOT NULL,
    baseline_window_us INTEGER          NOT NULL DEFAULT 0,
    min_samples        INTEGER          NOT NULL DEFAULT 0,
    severity           INTEGER          NOT NULL,
    enabled            INTEGER          NOT NULL,
    created_at         INTEGER          NOT NULL,
    updated_at         INTEGER          NOT NULL,
    PRIMARY KEY (tenant, id)
);

CREATE TABLE fb_alert (
    tenant          TEXT             NOT NULL,
    id              TEXT             NOT NULL,
    rule_id         TEXT             NOT NULL,
    kind            INTEGER          NOT NULL,
    scenario_id     TEXT             NOT NULL DEFAULT '',
    metric          INTEGER          NOT NULL,
    observed        REAL             NOT NULL,
    threshold       REAL             NOT NULL,
    baseline        REAL             NOT NULL DEFAULT 0,
    window_us       INTEGER          NOT NULL,
    severity        INTEGER          NOT NULL,
    status          INTEGER          NOT NULL,
    explanation     TEXT             NOT NULL DEFAULT '',
    raised_at       INTEGER          NOT NULL,
    acknowledged_at INTEGER,
    acknowledged_by TEXT             NOT NULL DEFAULT '',
    ack_comment     TEXT             NOT NULL DEFAULT '',
    resolved_at     INTEGER,
    PRIMARY KEY (tenant, id)
);
-- One open alert per rule and scenario: a problem raises one alert.
CREATE UNIQUE INDEX fb_alert_open ON fb_alert (tenant, rule_id, scenario_id) WHERE status IN (1, 2);
CREATE INDEX fb_alert_raised ON fb_alert (tenant, raised_at);
