-- Routing: agents, queues, tickets, offers and assignments. Times are microseconds since the
-- Unix epoch (BIGINT), the same on both engines. Every row belongs to a tenant.
--
-- Exactly-once assignment is enforced here, not in memory:
-- - an agent's active_load (pending offers + active assignments) never exceeds its capacity
--   (CHECK, plus the conditional `UPDATE … SET active_load = active_load + 1 WHERE
--   active_load < capacity` that reserves a unit);
-- - a conversation has at most one live ticket, one pending offer and one active assignment
--   (partial unique indexes).

CREATE TABLE routing_agents (
    tenant            TEXT    NOT NULL,
    id                TEXT    NOT NULL,
    display_name      TEXT    NOT NULL,
    team              TEXT    NOT NULL,
    skills            TEXT    NOT NULL,
    languages         TEXT    NOT NULL,
    capacity          BIGINT  NOT NULL CHECK (capacity BETWEEN 1 AND 50),
    active_load       BIGINT  NOT NULL DEFAULT 0,
    assigned          BIGINT  NOT NULL DEFAULT 0,
    presence          TEXT    NOT NULL DEFAULT 'offline'
                      CHECK (presence IN ('online', 'away', 'offline')),
    session_id        TEXT,
    session_closed_at BIGINT,
    last_heartbeat_at BIGINT,
    last_assigned_at  BIGINT,
    missed_offers     BIGINT  NOT NULL DEFAULT 0,
    created_at        BIGINT  NOT NULL,
    updated_at        BIGINT  NOT NULL,
    PRIMARY KEY (tenant, id),
    CONSTRAINT routing_agents_load_within_capacity
        CHECK (assigned >= 0 AND assigned <= active_load AND active_load <= capacity)
);
CREATE INDEX routing_agents_online ON routing_agents (tenant, presence);

CREATE TABLE routing_queues (
    tenant     TEXT   NOT NULL,
    id         TEXT   NOT NULL,
    name       TEXT   NOT NULL,
    definition TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, id)
);

-- A scenario routes to at most one queue by default.
CREATE TABLE routing_queue_scenarios (
    tenant      TEXT NOT NULL,
    scenario_id TEXT NOT NULL,
    queue_id    TEXT NOT NULL,
    PRIMARY KEY (tenant, scenario_id)
);

CREATE TABLE routing_tickets (
    tenant              TEXT             NOT NULL,
    id                  TEXT             NOT NULL,
    conversation_id     TEXT             NOT NULL,
    scenario_id         TEXT             NOT NULL,
    queue_id            TEXT             NOT NULL,
    state               TEXT             NOT NULL CHECK (state IN
                        ('queued', 'offered', 'assigned', 'completed', 'abandoned', 'returned')),
    priority            BIGINT           NOT NULL,
    static_priority     DOUBLE PRECISION NOT NULL,
    vip                 BOOLEAN          NOT NULL,
    severity            DOUBLE PRECISION NOT NULL,
    skills              TEXT             NOT NULL,
    language            BIGINT           NOT NULL,
    target_agent_id     TEXT,
    excluded_agent_id   TEXT,
    transfer_from       TEXT,
    transfer_note       TEXT,
    transfer_kind       TEXT,
    offered_agent_id    TEXT,
    assigned_agent_id   TEXT,
    attempts            BIGINT           NOT NULL DEFAULT 0,
    overflow_applied    BIGINT           NOT NULL DEFAULT 0,
    trigger_received_at BIGINT,
    requested_at        BIGINT           NOT NULL,
    enqueued_at         BIGINT           NOT NULL,
    queue_entered_at    BIGINT           NOT NULL,
    offered_at          BIGINT,
    assigned_at         BIGINT,
    ended_at            BIGINT,
    disposition         TEXT,
    package             BYTEA            NOT NULL,
    updated_at          BIGINT           NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE UNIQUE INDEX routing_tickets_one_live_per_conversation
    ON routing_tickets (tenant, conversation_id) WHERE state IN ('queued', 'offered', 'assigned');
CREATE INDEX routing_tickets_waiting ON routing_tickets (tenant, queue_id) WHERE state = 'queued';
CREATE INDEX routing_tickets_queued_age ON routing_tickets (queue_entered_at) WHERE state = 'queued';
CREATE INDEX routing_tickets_conversation ON routing_tickets (tenant, conversation_id, requested_at);

CREATE TABLE routing_offers (
    tenant          TEXT   NOT NULL,
    id              TEXT   NOT NULL,
    ticket_id       TEXT   NOT NULL,
    conversation_id TEXT   NOT NULL,
    agent_id        TEXT   NOT NULL,
    queue_id        TEXT   NOT NULL,
    attempt         BIGINT NOT NULL,
    kind            TEXT   NOT NULL CHECK (kind IN ('route', 'transfer')),
    state           TEXT   NOT NULL
                    CHECK (state IN ('pending', 'accepted', 'declined', 'expired', 'revoked')),
    revoke_reason   TEXT,
    offered_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    resolved_at     BIGINT,
    PRIMARY KEY (tenant, id)
);
CREATE UNIQUE INDEX routing_offers_one_pending_per_conversation
    ON routing_offers (tenant, conversation_id) WHERE state = 'pending';
CREATE INDEX routing_offers_pending_expiry ON routing_offers (expires_at) WHERE state = 'pending';
CREATE INDEX routing_offers_pending_agent ON routing_offers (tenant, agent_id) WHERE state = 'pending';
CREATE INDEX routing_offers_ticket ON routing_offers (tenant, ticket_id);

CREATE TABLE routing_assignments (
    tenant          TEXT   NOT NULL,
    id              TEXT   NOT NULL,
    ticket_id       TEXT   NOT NULL,
    conversation_id TEXT   NOT NULL,
    agent_id        TEXT   NOT NULL,
    queue_id        TEXT   NOT NULL,
    offer_id        TEXT   NOT NULL,
    assigned_at     BIGINT NOT NULL,
    ended_at        BIGINT,
    disposition     TEXT,
    PRIMARY KEY (tenant, id)
);
CREATE UNIQUE INDEX routing_assignments_one_active_per_conversation
    ON routing_assignments (tenant, conversation_id) WHERE ended_at IS NULL;
CREATE UNIQUE INDEX routing_assignments_one_active_per_ticket
    ON routing_assignments (tenant, ticket_id) WHERE ended_at IS NULL;
CREATE INDEX routing_assignments_rate ON routing_assignments (tenant, queue_id, assigned_at);
CREATE INDEX routing_assignments_active_agent
    ON routing_assignments (tenant, agent_id) WHERE ended_at IS NULL;

-- The last queue statistics reported, so replicas report each change once per interval.
CREATE TABLE routing_queue_reports (
    tenant      TEXT   NOT NULL,
    queue_id    TEXT   NOT NULL,
    fingerprint TEXT   NOT NULL,
    reported_at BIGINT NOT NULL,
    PRIMARY KEY (tenant, queue_id)
);
