-- Scenario policies: the current scenarios, their immutable versions, adjustment rules and their
-- state, the signals they watch, adjustment firings and shadow decisions. Bodies are the
-- protobuf encoding of the wire messages; the other columns are what queries filter on.
-- Times are microseconds since the Unix epoch.

-- One row per tenant; every catalogue change bumps `catalogue_version` with a conditional update,
-- which serialises writers per tenant (catalogue-wide rules such as intent conflicts hold).
CREATE TABLE policy_tenants (
    tenant            TEXT PRIMARY KEY,
    catalogue_version BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE policy_scenarios (
    tenant      TEXT    NOT NULL,
    scenario_id TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    deleted     BOOLEAN NOT NULL DEFAULT FALSE,
    tier        INTEGER NOT NULL,
    strategy    INTEGER NOT NULL,
    body        BYTEA   NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (tenant, scenario_id)
);

CREATE TABLE policy_versions (
    tenant      TEXT    NOT NULL,
    scenario_id TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    cause       INTEGER NOT NULL,
    body        BYTEA   NOT NULL,
    created_at  BIGINT  NOT NULL,
    PRIMARY KEY (tenant, scenario_id, version)
);

CREATE TABLE policy_rules (
    tenant      TEXT   NOT NULL,
    rule_id     TEXT   NOT NULL,
    scenario_id TEXT   NOT NULL,
    signal      INTEGER NOT NULL,
    enabled     BOOLEAN NOT NULL,
    body        BYTEA  NOT NULL,
    PRIMARY KEY (tenant, rule_id)
);

CREATE TABLE policy_rule_states (
    tenant          TEXT    NOT NULL,
    rule_id         TEXT    NOT NULL,
    scenario_id     TEXT    NOT NULL,
    firing          BOOLEAN NOT NULL,
    last_fired_at   BIGINT,
    recovered_since BIGINT,
    baseline        TEXT,
    PRIMARY KEY (tenant, rule_id, scenario_id)
);

CREATE TABLE policy_observations (
    tenant      TEXT             NOT NULL,
    scenario_id TEXT             NOT NULL,
    signal      INTEGER          NOT NULL,
    value       DOUBLE PRECISION NOT NULL,
    observed_at BIGINT           NOT NULL
);
CREATE INDEX policy_observations_window
    ON policy_observations (tenant, scenario_id, signal, observed_at);

CREATE TABLE policy_adjustments (
    tenant      TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    scenario_id TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    body        BYTEA   NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX policy_adjustments_recent ON policy_adjustments (tenant, created_at DESC, id DESC);

CREATE TABLE policy_shadow_decisions (
    tenant      TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    scenario_id TEXT    NOT NULL,
    diverged    BOOLEAN NOT NULL,
    decided_at  BIGINT  NOT NULL,
    body        BYTEA   NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX policy_shadow_recent ON policy_shadow_decisions (tenant, decided_at DESC, id DESC);
