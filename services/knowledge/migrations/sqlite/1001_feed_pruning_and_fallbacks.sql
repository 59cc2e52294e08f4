-- The change feed is pruned: rows up to pruned_through are gone, so a replica whose position is
-- below it rebuilds its index from the database instead of reading the feed.
CREATE TABLE knowledge_feed_state (
    id INTEGER PRIMARY KEY,
    pruned_through BIGINT NOT NULL
);
INSERT INTO knowledge_feed_state (id, pruned_through) VALUES (1, 0);

-- Links a conversation to the last gap query it recorded, so a bot fallback in it counts for
-- that gap.
CREATE TABLE knowledge_gap_links (
    tenant TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    scenario_id TEXT NOT NULL,
    language INTEGER NOT NULL,
    query TEXT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (tenant, conversation_id)
);
CREATE INDEX knowledge_gap_links_at ON knowledge_gap_links (at);
