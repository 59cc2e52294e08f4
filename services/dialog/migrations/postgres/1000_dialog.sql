-- Conversations, transcript, idempotent requests, decision traces, suggestions, handoffs,
-- the policy catalogue kept from PolicyUpdated events, training examples and model versions.
-- Bodies are encoded protobuf messages; the columns beside them are what queries filter on.

CREATE TABLE dialog_conversations (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    client_conversation_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    revision BIGINT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (tenant, id),
    UNIQUE (tenant, client_conversation_id)
);

CREATE TABLE dialog_messages (
    tenant TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    sequence BIGINT NOT NULL,
    id TEXT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (tenant, conversation_id, sequence)
);

CREATE TABLE dialog_requests (
    tenant TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    client_message_id TEXT NOT NULL,
    response BYTEA NOT NULL,
    PRIMARY KEY (tenant, conversation_id, kind, client_message_id)
);

CREATE TABLE dialog_traces (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    turn_index INTEGER NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX dialog_traces_conversation ON dialog_traces (tenant, conversation_id, turn_index);
CREATE INDEX dialog_traces_message ON dialog_traces (tenant, message_id);

CREATE TABLE dialog_suggestions (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (tenant, id)
);

CREATE TABLE dialog_handoffs (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (tenant, id)
);

CREATE TABLE dialog_policies (
    tenant TEXT NOT NULL,
    scenario_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL,
    body BYTEA NOT NULL,
    PRIMARY KEY (tenant, scenario_id)
);

CREATE TABLE dialog_examples (
    tenant TEXT NOT NULL,
    scenario_id TEXT NOT NULL,
    text TEXT NOT NULL,
    intent TEXT NOT NULL,
    PRIMARY KEY (tenant, scenario_id, text, intent)
);

CREATE TABLE dialog_answers (
    tenant TEXT NOT NULL,
    intent TEXT NOT NULL,
    language INTEGER NOT NULL,
    answer TEXT NOT NULL,
    PRIMARY KEY (tenant, intent, language)
);

CREATE TABLE dialog_models (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    active BOOLEAN NOT NULL,
    body BYTEA NOT NULL,
    model BYTEA NOT NULL,
    PRIMARY KEY (tenant, id),
    UNIQUE (tenant, version)
);
