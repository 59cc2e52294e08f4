-- The customer and start time of each conversation as columns, so a new conversation can count
-- the same customer's recent ones (the repeat-contact signal). Conversations stored before this
-- migration keep an empty customer id and are not counted.

ALTER TABLE dialog_conversations ADD COLUMN customer_id TEXT NOT NULL DEFAULT '';
ALTER TABLE dialog_conversations ADD COLUMN created_micros BIGINT NOT NULL DEFAULT 0;
CREATE INDEX dialog_conversations_customer
    ON dialog_conversations (tenant, customer_id, created_micros);
