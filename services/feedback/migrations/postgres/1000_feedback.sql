-- The feedback service's tables. Times are microseconds since the Unix epoch (UTC), the same on
-- both engines, so one set of queries serves PostgreSQL and SQLite.

-- One row per conversation, projected from dialog and routing events. `state` holds the merge
-- registers (value and observation time of every column) in JSON; the other columns are derived
-- from it on every write, for queries and for people reading the table.
CREATE TABLE fb_conversation (
    tenant               TEXT    NOT NULL,
    conversation_id      TEXT    NOT NULL,
    customer_id          TEXT    NOT NULL DEFAULT '',
    scenario_id          TEXT    NOT NULL DEFAULT '',
    intent               TEXT    NOT NULL DEFAULT '',
    channel              BIGINT  NOT NULL DEFAULT 0,
    language             BIGINT  NOT NULL DEFAULT 0,
    handler              BIGINT  NOT NULL DEFAULT 0,
    agent_id             TEXT    NOT NULL DEFAULT '',
    team                 TEXT    NOT NULL DEFAULT '',
    handoff_reason       BIGINT  NOT NULL DEFAULT 0,
    bucket_at            BIGINT,
    started_at           BIGINT,
    handoff_requested_at BIGINT,
    first_assigned_at    BIGINT,
    resolved_at          BIGINT,
    closed_at            BIGINT,
    outcome              TEXT    NOT NULL DEFAULT '',
    eligible             BOOLEAN NOT NULL DEFAULT FALSE,
    contained            BOOLEAN NOT NULL DEFAULT FALSE,
    handed_off           BOOLEAN NOT NULL DEFAULT FALSE,
    reopened             BOOLEAN NOT NULL DEFAULT FALSE,
    followed_up          BOOLEAN NOT NULL DEFAULT FALSE,
    test                 BOOLEAN NOT NULL DEFAULT FALSE,
    proactive            BOOLEAN NOT NULL DEFAULT FALSE,
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
    language              BIGINT  NOT NULL DEFAULT 0,
    reason                BIGINT  NOT NULL DEFAULT 0,
    agent_id              TEXT    NOT NULL DEFAULT '',
    team                  TEXT    NOT NULL DEFAULT '',
    bucket_at             BIGINT,
    requested_at          BIGINT,
    trigger_received_at   BIGINT,
    queued_at             BIGINT,
    first_offered_at      BIGINT,
    accepted_offer_at     BIGINT,
    assigned_at           BIGINT,
    first_agent_reply_at  BIGINT,
    system_latency_us     BIGINT,
    queue_wait_us         BIGINT,
    agent_accept_us       BIGINT,
    first_human_reply_us  BIGINT,
    handle_time_us        BIGINT,
    summary               TEXT    NOT NULL DEFAULT '',
    intents               TEXT    NOT NULL DEFAULT '',
    test                  BOOLEAN NOT NULL DEFAULT FALSE,
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
    created_at      BIGINT,
    outcome         BIGINT  NOT NULL DEFAULT 0,
    reviewed_at     BIGINT,
    test            BOOLEAN NOT NULL DEFAULT FALSE,
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
    channel            BIGINT  NOT NULL,
    subject            BIGINT  NOT NULL,
    kind               TEXT    NOT NULL,
    score              BIGINT  NOT NULL,
    comment            TEXT    NOT NULL DEFAULT '',
    language_given     BIGINT  NOT NULL DEFAULT 0,
    language           BIGINT  NOT NULL DEFAULT 0,
    question_id        TEXT    NOT NULL DEFAULT '',
    submitted_at       BIGINT,
    received_at        BIGINT  NOT NULL,
    at                 BIGINT  NOT NULL,
    negative           BOOLEAN NOT NULL DEFAULT FALSE,
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
    verdict          BIGINT NOT NULL,
    comment          TEXT   NOT NULL DEFAULT '',
    corrected_answer TEXT   NOT NULL DEFAULT '',
    scenario_id      TEXT   NOT NULL DEFAULT '',
    created_at       BIGINT NOT NULL,
    PRIMARY KEY (tenant, id)
);

-- Rollups: sums per grain (1 = hour, 2 = day), bucket and combination of dimensions.
CREATE TABLE fb_rollup (
    tenant   TEXT   NOT NULL,
    grain    BIGINT NOT NULL,
    metric   BIGINT NOT NULL,
    bucket   BIGINT NOT NULL,
    scenario TEXT   NOT NULL,
    intent   TEXT   NOT NULL,
    channel  BIGINT NOT NULL,
    handler  BIGINT NOT NULL,
    agent    TEXT   NOT NULL,
    team     TEXT   NOT NULL,
    reason   BIGINT NOT NULL,
    language BIGINT NOT NULL,
    num      BIGINT NOT NULL DEFAULT 0,
    den      BIGINT NOT NULL DEFAULT 0,
    cnt      BIGINT NOT NULL DEFAULT 0,
    total    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, grain, metric, bucket, scenario, intent, channel, handler, agent, team, reason, language)
);

-- Duration histograms of the rollups: observations per cell (16 cells per doubling).
CREATE TABLE fb_rollup_hist (
    tenant   TEXT   NOT NULL,
    grain    BIGINT NOT NULL,
    metric   BIGINT NOT NULL,
    bucket   BIGINT NOT NULL,
    scenario TEXT   NOT NULL,
    intent   TEXT   NOT NULL,
    channel  BIGINT NOT NULL,
    handler  BIGINT NOT NULL,
    agent    TEXT   NOT NULL,
    team     TEXT   NOT NULL,
    reason   BIGINT NOT NULL,
    language BIGINT NOT NULL,
    cell     BIGINT NOT NULL,
    cnt      BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, grain, metric, bucket, scenario, intent, channel, handler, agent, team, reason, language, cell)
);

CREATE TABLE fb_alert_rule (
    tenant             TEXT             NOT NULL,
    id                 TEXT             NOT NULL,
    name               TEXT             NOT NULL,
    kind               BIGINT           NOT NULL,
    scenario_id        TEXT             NOT NULL DEFAULT '',
    metric             BIGINT           NOT NULL,
    cond               BIGINT           NOT NULL,
    threshold          DOUBLE PRECISION NOT NULL,
    window_us          BIGINT           NOT NULL,
    baseline_window_us BIGINT           NOT NULL DEFAULT 0,
    min_samples        BIGINT           NOT NULL DEFAULT 0,
    severity           BIGINT           NOT NULL,
    enabled            BOOLEAN          NOT NULL,
    created_at         BIGINT           NOT NULL,
    updated_at         BIGINT           NOT NULL,
    PRIMARY KEY (tenant, id)
);

CREATE TABLE fb_alert (
    tenant          TEXT             NOT NULL,
    id              TEXT             NOT NULL,
    rule_id         TEXT             NOT NULL,
    kind            BIGINT           NOT NULL,
    scenario_id     TEXT             NOT NULL DEFAULT '',
    metric          BIGINT           NOT NULL,
    observed        DOUBLE PRECISION NOT NULL,
    threshold       DOUBLE PRECISION NOT NULL,
    baseline        DOUBLE PRECISION NOT NULL DEFAULT 0,
    window_us       BIGINT           NOT NULL,
    severity        BIGINT           NOT NULL,
    status          BIGINT           NOT NULL,
    explanation     TEXT             NOT NULL DEFAULT '',
    raised_at       BIGINT           NOT NULL,
    acknowledged_at BIGINT,
    acknowledged_by TEXT             NOT NULL DEFAULT '',
    ack_comment     TEXT             NOT NULL DEFAULT '',
    resolved_at     BIGINT,
    PRIMARY KEY (tenant, id)
);
-- One open alert per rule and scenario: a problem raises one alert.
CREATE UNIQUE INDEX fb_alert_open ON fb_alert (tenant, rule_id, scenario_id) WHERE status IN (1, 2);
CREATE INDEX fb_alert_raised ON fb_alert (tenant, raised_at);
