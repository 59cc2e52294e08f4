-- The sequence of the conversation's last message when dialog requested the handoff. It orders
-- the handoffs of one conversation, so a handoff that reaches routing after a later one of the
-- same conversation is recognised as stale. Tickets from before this column count as 0.
ALTER TABLE routing_tickets ADD COLUMN transcript_sequence BIGINT NOT NULL DEFAULT 0;
