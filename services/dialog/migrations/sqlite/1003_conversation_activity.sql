-- The last activity of each conversation (its last message or state change) as a column, so the
-- idle sweep finds the conversations to close for inactivity. Conversations stored before this
-- migration count as active at the time it runs.

ALTER TABLE dialog_conversations ADD COLUMN updated_micros BIGINT NOT NULL DEFAULT 0;
UPDATE dialog_conversations
    SET updated_micros = CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER);
CREATE INDEX dialog_conversations_activity ON dialog_conversations (state, updated_micros);
